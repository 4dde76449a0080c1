//! Storing submissions in batches: every submission keeps its own message, dispatch
//! record and request id, on both databases.

use reqwest::StatusCode;
use sea_orm::EntityTrait;
use shared::domain::NewFeedback;
use shared::entities::{dispatch, feedback_message};
use shared::queries::feedback::insert_many_for_requests;
use tidings_tests::harness::{Backend, Options, TestApp, spawn_app_with};

/// Content that a hand-built literal would get wrong.
fn tricky(i: usize) -> String {
    format!("\"quoted\" {{braces}}, [brackets] \\back\\slash\n'single' é ✓ 🎉 NULL {i}")
}

async fn a_batch_keeps_each_submission_apart(backend: Backend) {
    // Arrange
    let app = spawn_app_with(Options { backend, worker: false, ..Options::default() }).await;
    let feedback: Vec<NewFeedback> = (0..5)
        .map(|i| NewFeedback::parse(&format!("Visitor {i}"), &format!("v{i}@example.com"), &tricky(i)).expect("valid"))
        .collect();
    let request_ids: Vec<Option<String>> = (0..5).map(|i| (i % 2 == 0).then(|| format!("req-{i}"))).collect();
    let rows: Vec<(&NewFeedback, Option<&str>)> =
        feedback.iter().zip(&request_ids).map(|(f, r)| (f, r.as_deref())).collect();

    // Act
    let submitted = insert_many_for_requests(&app.db, &rows).await.expect("stored");

    // Assert: the answers come back in the submissions' order, each with its own rows.
    assert_eq!(submitted.len(), 5);
    for (i, one) in submitted.iter().enumerate() {
        let message = feedback_message::Entity::find_by_id(one.feedback_id).one(&app.db).await.expect("query");
        let message = message.expect("the message exists");
        assert_eq!(message.submitter_name, format!("Visitor {i}"));
        assert_eq!(message.submitter_email, format!("v{i}@example.com"));
        assert_eq!(message.content, tricky(i));
        let record = dispatch::Entity::find_by_id(one.dispatch_id).one(&app.db).await.expect("query");
        let record = record.expect("the dispatch record exists");
        assert_eq!(record.feedback_id, one.feedback_id);
        assert_eq!(record.request_id, request_ids[i]);
        assert_eq!(record.completed_at, None);
    }
    assert!(insert_many_for_requests(&app.db, &[]).await.expect("nothing to store").is_empty());
}

#[tokio::test]
async fn a_batch_keeps_each_submission_apart_on_postgres() {
    a_batch_keeps_each_submission_apart(Backend::Postgres).await;
}

#[tokio::test]
async fn a_batch_keeps_each_submission_apart_on_sqlite() {
    a_batch_keeps_each_submission_apart(Backend::Sqlite).await;
}

async fn marking_records_enqueued_leaves_those_their_jobs_completed_alone(backend: Backend) {
    use shared::queries::dispatch::{mark_completed, mark_enqueued_many};
    // Arrange: two stored submissions; the job of the first has completed its record.
    let app = spawn_app_with(Options { backend, worker: false, ..Options::default() }).await;
    let (_, done) = tidings_tests::harness::store_unannounced(&app.db, shared::queries::now(), "Ann").await;
    let (_, waiting) = tidings_tests::harness::store_unannounced(&app.db, shared::queries::now(), "Bob").await;
    mark_completed(&app.db, done).await.expect("completed");

    // Act: the marker marks both as enqueued, as the web does once their jobs are pushed.
    mark_enqueued_many(&app.db, &[done, waiting]).await.expect("marked");

    // Assert: only the outstanding record is marked; the completed one is left as it was.
    let db = &app.db;
    let record = |id| async move { dispatch::Entity::find_by_id(id).one(db).await.expect("query").expect("record") };
    let (done, waiting) = (record(done).await, record(waiting).await);
    assert!(done.completed_at.is_some());
    assert_eq!((done.enqueued_at, done.enqueue_count), (None, 0), "a completed record is not written again");
    assert!(waiting.enqueued_at.is_some());
    assert_eq!(waiting.enqueue_count, 1);
}

#[tokio::test]
async fn marking_records_enqueued_leaves_those_their_jobs_completed_alone_on_postgres() {
    marking_records_enqueued_leaves_those_their_jobs_completed_alone(Backend::Postgres).await;
}

#[tokio::test]
async fn marking_records_enqueued_leaves_those_their_jobs_completed_alone_on_sqlite() {
    marking_records_enqueued_leaves_those_their_jobs_completed_alone(Backend::Sqlite).await;
}

async fn concurrent_submissions_each_get_their_own_message(backend: Backend) {
    // Arrange: enough at once that the writers batch them.
    let app = spawn_app_with(Options { backend, worker: false, ..Options::default() }).await;
    let count = 120;

    // Act
    let answers = futures::future::join_all((0..count).map(|i| {
        let app = &app;
        async move {
            let body = serde_json::json!({
                "submitter_name": format!("Visitor {i}"),
                "submitter_email": "v@example.com",
                "content": tricky(i),
            });
            let response = app.post_api_feedback(&body).await;
            assert_eq!(response.status(), StatusCode::CREATED);
            let created: serde_json::Value = response.json().await.expect("json");
            (i, created["id"].as_i64().expect("an id"))
        }
    }))
    .await;

    // Assert: every answer names the message its request sent, and nothing else was stored.
    assert_eq!(app.feedback_count().await, count as u64);
    for (i, id) in answers {
        let message = feedback_message::Entity::find_by_id(id).one(&app.db).await.expect("query").expect("stored");
        assert_eq!((message.submitter_name, message.content), (format!("Visitor {i}"), tricky(i)));
    }
    // ... and they were written together: fewer statements than submissions.
    let metrics = app.client.get(format!("{}/metrics", app.address)).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("text");
    let writes: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("tidings_submission_writes_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the writes are counted");
    assert!(writes < count as u64, "{writes} writes for {count} submissions");
}

#[tokio::test]
async fn concurrent_submissions_each_get_their_own_message_on_postgres() {
    concurrent_submissions_each_get_their_own_message(Backend::Postgres).await;
}

#[tokio::test]
async fn concurrent_submissions_each_get_their_own_message_on_sqlite() {
    concurrent_submissions_each_get_their_own_message(Backend::Sqlite).await;
}

/// A web of the test's own on `app`'s database and Redis, on a port of its own.
async fn own_web(app: &TestApp) -> web::app::Application {
    let mut settings = app.settings.clone();
    settings.web.bind = "127.0.0.1:0".parse().expect("address");
    web::app::Application::build(settings).await.expect("the web builds")
}

/// A web running until [`RunningWeb::stop`].
struct RunningWeb {
    address: String,
    client: reqwest::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningWeb {
    fn start(web: web::app::Application) -> Self {
        let address = format!("http://127.0.0.1:{}", web.port());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(web.run_until(async {
            let _ = stopped.await;
        }));
        Self { address, client: reqwest::Client::new(), stop, running }
    }

    /// Posts feedback `i` through the JSON API, its content `{content} {i}`.
    async fn submit(&self, i: usize, content: &str) -> StatusCode {
        let body = serde_json::json!({
            "submitter_name": format!("Visitor {i}"),
            "submitter_email": "v@example.com",
            "content": format!("{content} {i}"),
        });
        self.client.post(format!("{}/api/feedback", self.address)).json(&body).send().await.expect("POST").status()
    }

    /// Stops it and waits, at most 30 s, until it has stopped cleanly.
    async fn stop(self) {
        self.stop.send(()).expect("the web is running");
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(30), self.running).await;
        stopped.expect("the web stops").expect("the web's task").expect("the web stops cleanly");
    }
}

#[tokio::test]
async fn a_stopping_web_enqueues_and_marks_what_it_committed_before_it_exits() {
    // Arrange: a web of its own on the app's database and Redis, and no worker, so every
    // job it enqueues stays waiting.
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let web = own_web(&app).await;
    // The marker gathers for 10 s instead of 50 ms: only the drain marks in time.
    web.state().dispatcher.set_mark_every(std::time::Duration::from_secs(10));
    let web = RunningWeb::start(web);
    let submissions = (0..20).map(|i| web.submit(i, "sent as the web stops"));
    for status in futures::future::join_all(submissions).await {
        assert_eq!(status, StatusCode::CREATED);
    }

    // Act: stop it right after the last answer.
    web.stop().await;

    // Assert, at once: every record is marked enqueued (without the drain they would all
    // still be waiting in the marker), and every job waits in Redis.
    let records = dispatch::Entity::find().all(&app.db).await.expect("records");
    assert_eq!(records.len(), 20);
    let unmarked: Vec<i64> = records.iter().filter(|r| r.enqueued_at.is_none()).map(|r| r.id).collect();
    assert!(unmarked.is_empty(), "records left unmarked by the stopping web: {unmarked:?}");
    let queue =
        shared::queue::JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    assert_eq!(queue.backlog().await.expect("backlog"), 20, "every committed submission's job is queued");
}

#[tokio::test]
async fn a_web_stopping_while_redis_hangs_leaves_what_it_committed_to_the_relay_and_nothing_is_lost() {
    use tidings_tests::harness::metric_value;
    use tidings_tests::redis_server::RedisServer;
    // Arrange: a Redis of the test's own; a web of its own on it, already connected (one
    // submission went through); a subscribed browser and no worker yet.
    let redis = RedisServer::start().await.expect("redis-server starts");
    let mut app =
        spawn_app_with(Options { worker: false, env: vec![("REDIS_URL".into(), redis.url())], ..Options::default() })
            .await;
    app.subscribe_browser().await;
    let web = own_web(&app).await;
    let metrics = web.state().metrics.clone();
    let web = RunningWeb::start(web);
    let submit = |i: usize| web.submit(i, "message");
    assert_eq!(submit(0).await, StatusCode::CREATED);
    let enqueued = r#"tidings_dispatch_total{outcome="enqueued"}"#;
    assert!(
        crate::pipeline::wait_until(|| async { metric_value(&metrics.render(&[]), enqueued) == Some(1.0) }).await,
        "the first submission's job went to Redis"
    );

    // Act: Redis hangs; twenty submissions come in; the web stops while its announcer
    // still waits for Redis.
    let paused = redis.pause();
    let statuses = futures::future::join_all((1..=20).map(submit)).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::CREATED), "every visitor is answered: {statuses:?}");
    web.stop().await;

    // Assert: the web stopped without pushing anything more (each of the twenty counted
    // as left to the relay) and left their records unmarked for the relay.
    let exposition = metrics.render(&[]);
    let deferred: f64 = ["deferred_redis_down", "deferred_redis_error"]
        .iter()
        .filter_map(|outcome| metric_value(&exposition, &format!(r#"tidings_dispatch_total{{outcome="{outcome}"}}"#)))
        .sum();
    assert_eq!(deferred, 20.0, "{exposition}");
    assert_eq!(metric_value(&exposition, enqueued), Some(1.0));
    let records = dispatch::Entity::find().all(&app.db).await.expect("records");
    assert_eq!(records.len(), 21);
    assert_eq!(records.iter().filter(|r| r.enqueued_at.is_none()).count(), 20);

    // Redis comes back and answers what it was sent while it hung; a worker starts. Every
    // message is pushed exactly once: the relay's enqueue and any the web's timed-out
    // request made after all are the same job.
    paused.resume();
    app.start_worker().await;
    app.push.wait_for_received(21, std::time::Duration::from_secs(30)).await;
    assert_eq!(app.pushed_bodies().1, 21, "every message once");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(app.push.received().len(), 21, "and no message twice");
}

#[tokio::test]
async fn a_web_holds_what_it_committed_while_redis_is_down_and_pushes_it_once_redis_is_back() {
    use tidings_tests::harness::metric_value;
    use tidings_tests::redis_server::RedisServer;
    // Arrange: a Redis of the test's own; a web of its own on it, already connected (one
    // submission went through); no worker, so no relay: whatever reaches Redis, the web
    // pushed.
    let mut redis = RedisServer::start().await.expect("redis-server starts");
    let app =
        spawn_app_with(Options { worker: false, env: vec![("REDIS_URL".into(), redis.url())], ..Options::default() })
            .await;
    let web = own_web(&app).await;
    let metrics = web.state().metrics.clone();
    let web = RunningWeb::start(web);
    assert_eq!(web.submit(0, "before").await, StatusCode::CREATED);
    let enqueued = r#"tidings_dispatch_total{outcome="enqueued"}"#;
    let enqueued_reaches = |n: f64| {
        let metrics = metrics.clone();
        async move { metric_value(&metrics.render(&[]), enqueued) == Some(n) }
    };
    assert!(crate::pipeline::wait_until(|| enqueued_reaches(1.0)).await, "the first job went to Redis");

    // Act: Redis goes down; ten submissions come in, one after another; Redis comes back.
    redis.stop();
    for i in 1..=10 {
        assert_eq!(web.submit(i, "during").await, StatusCode::CREATED, "every visitor is answered");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let while_down = metrics.render(&[]);
    redis.restart().await.expect("redis-server restarts");

    // Assert: while Redis was down the web left nothing to the relay; once it was back the
    // web pushed the ten jobs itself and marked their records.
    for outcome in ["deferred_redis_down", "deferred_redis_error"] {
        let counted = metric_value(&while_down, &format!(r#"tidings_dispatch_total{{outcome="{outcome}"}}"#));
        assert_eq!(counted, None, "{outcome}: {while_down}");
    }
    assert!(crate::pipeline::wait_until(|| enqueued_reaches(11.0)).await, "{}", metrics.render(&[]));
    let queue = shared::queue::JobQueue::connect(&redis.url(), &app.settings.redis_namespace).await.expect("redis");
    assert_eq!(queue.backlog().await.expect("backlog"), 10, "the ten jobs wait in the restarted Redis");
    let marked = || async {
        let records = dispatch::Entity::find().all(&app.db).await.expect("records");
        records.len() == 11 && records.iter().all(|r| r.enqueued_at.is_some())
    };
    assert!(crate::pipeline::wait_until(marked).await, "every record is marked enqueued");
    web.stop().await;
}

#[tokio::test]
async fn a_web_that_stops_with_a_full_backlog_leaves_what_it_holds_to_the_relay() {
    use tidings_tests::harness::metric_value;
    // Arrange: no worker, a bound of 5 jobs; a web of its own on the app's settings.
    let mut app = spawn_app_with(Options {
        worker: false,
        env: vec![("QUEUE_MAX_BACKLOG".into(), "5".into())],
        ..Options::default()
    })
    .await;
    app.subscribe_browser().await;
    let web = own_web(&app).await;
    let metrics = web.state().metrics.clone();
    let web = RunningWeb::start(web);
    let enqueued = r#"tidings_dispatch_total{outcome="enqueued"}"#;

    // Act: twenty submissions, of which Redis has room for five; the web holds the rest
    // for room that no worker makes, and stops.
    let statuses = futures::future::join_all((0..20).map(|i| web.submit(i, "held"))).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::CREATED), "{statuses:?}");
    assert!(
        crate::pipeline::wait_until(|| async { metric_value(&metrics.render(&[]), enqueued) == Some(5.0) }).await,
        "five jobs went to Redis"
    );
    let deferred = r#"tidings_dispatch_total{outcome="deferred_backlog_full"}"#;
    assert_eq!(metric_value(&metrics.render(&[]), deferred), None, "the web holds the rest while it runs");
    web.stop().await;

    // Assert: it stopped leaving the fifteen it held to the relay (their records
    // unmarked), and once a worker runs every message goes out once.
    let exposition = metrics.render(&[]);
    assert_eq!(metric_value(&exposition, enqueued), Some(5.0), "{exposition}");
    assert_eq!(metric_value(&exposition, deferred), Some(15.0), "{exposition}");
    let records = dispatch::Entity::find().all(&app.db).await.expect("records");
    assert_eq!(records.iter().filter(|r| r.enqueued_at.is_none()).count(), 15);
    app.start_worker().await;
    app.push.wait_for_received(20, std::time::Duration::from_secs(30)).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(app.pushed_bodies(), (20, 20), "every message once");
}

#[tokio::test]
async fn on_sqlite_every_connection_commits_to_disk_before_answering() {
    use sea_orm::ConnectionTrait;
    // A commit that only reached the WAL file's page cache (`synchronous=NORMAL`) can be
    // lost to a power cut after the visitor was told it was stored.
    let app = spawn_app_with(Options { backend: Backend::Sqlite, worker: false, ..Options::default() }).await;
    let statement = sea_orm::Statement::from_string(sea_orm::DbBackend::Sqlite, "PRAGMA synchronous");
    let checks = (0..4).map(|_| app.db.query_one_raw(statement.clone()));
    for row in futures::future::join_all(checks).await {
        let row = row.expect("pragma").expect("a row");
        assert_eq!(row.try_get::<i32>("", "synchronous").expect("a number"), 2, "FULL");
    }
}
