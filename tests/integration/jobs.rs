//! The job queue's own promises: bad payloads are dead-lettered and the worker goes on.

use std::time::Duration;

use apalis_core::task::builder::TaskBuilder;
use sea_orm::EntityTrait;
use shared::jobs::FAN_OUT_QUEUE;
use shared::queue::{JobQueue, config_for_queue, wake_channel};
use tidings_tests::harness::{Options, TestApp, metric_value, spawn_app_with};

use crate::pipeline::wait_until;

/// Puts `payload` on the fan-out queue as a producer would, bypassing our own encoder.
async fn push_raw(app: &TestApp, payload: &[u8]) {
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let mut conn = queue.connection();
    let config = config_for_queue(&app.settings.redis_namespace, FAN_OUT_QUEUE);
    let task = TaskBuilder::new(payload.to_vec()).build();
    apalis_redis::queries::push_tasks(&mut conn, &config, &[task]).await.expect("pushed");
    let _: i64 = redis::AsyncCommands::publish(&mut conn, wake_channel(&app.settings.redis_namespace), "x")
        .await
        .expect("published");
}

async fn dead_letters(app: &TestApp) -> Vec<shared::queue::DeadLetter> {
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    queue.dead_letters(100).await.expect("dead letters")
}

#[tokio::test]
async fn malformed_and_too_new_payloads_are_dead_lettered_and_the_worker_keeps_going() {
    // Arrange
    let app = spawn_app_with(Options::default()).await;
    let browser = app.subscribe_browser().await;

    // Act: garbage, valid JSON of the wrong shape, and a payload from a newer build.
    push_raw(&app, b"\xff not json").await;
    push_raw(&app, br#"{"hello":"world"}"#).await;
    push_raw(&app, br#"{"version":99,"feedback_id":1,"dispatch_id":1}"#).await;

    // Assert: each is kept with its error…
    assert!(wait_until(|| async { dead_letters(&app).await.len() == 3 }).await, "three dead letters");
    let letters = dead_letters(&app).await;
    assert!(letters.iter().any(|l| l.error.contains("malformed payload") && l.payload.contains("not json")));
    assert!(letters.iter().any(|l| l.error.contains("version 99")));
    assert!(letters.iter().all(|l| l.queue == FAN_OUT_QUEUE && !l.at.is_empty()));
    // …and the same worker still delivers real work.
    app.submit_valid_feedback("Ann", "still working").await;
    let received = app.push.wait_for_received(1, Duration::from_secs(15)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, browser.endpoint);
}

#[tokio::test]
async fn a_job_for_deleted_feedback_completes_without_sending() {
    let app = spawn_app_with(Options::default()).await;
    app.subscribe_browser().await;
    let dispatch_id = shared::queries::dispatch::create(&app.db, 424_242, shared::queries::now()).await;
    // The foreign key refuses a dispatch for missing feedback on PostgreSQL; either way
    // a job naming a missing feedback must finish quietly.
    let dispatch_id = dispatch_id.unwrap_or(0);
    push_raw(&app, format!(r#"{{"version":1,"feedback_id":424242,"dispatch_id":{dispatch_id}}}"#).as_bytes()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(app.push.attempts().is_empty());
    assert!(dead_letters(&app).await.is_empty());
}

#[tokio::test]
async fn stopping_the_worker_lets_the_job_in_flight_finish() {
    // Arrange: a slow push service keeps the fan-out in flight.
    let mut app = spawn_app_with(Options::default()).await;
    let browser = app.subscribe_browser().await;
    app.push.set_delay(Duration::from_millis(1500));
    app.submit_valid_feedback("Ann", "in flight at shutdown").await;
    assert!(wait_until(|| async { !app.push.attempts().is_empty() || pending_attempt(&app).await }).await);

    // Act: SIGTERM, as a supervisor sends it.
    app.stop_worker();

    // Assert: the push in flight completed and was recorded, exactly once.
    let received = app.push.wait_for_received(1, Duration::from_secs(15)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, browser.endpoint);
    let recorded = wait_until(|| async {
        let rows = shared::entities::delivery::Entity::find().all(&app.db).await.expect("query");
        rows.len() == 1 && rows[0].status == "sent"
    })
    .await;
    assert!(recorded, "the delivery was recorded before the worker stopped");
    assert_eq!(app.push.attempts().len(), 1);
    // Drained with nothing left in flight, the worker leaves the registry at once.
    let mut conn =
        JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis").connection();
    let workers_set = config_for_queue(&app.settings.redis_namespace, FAN_OUT_QUEUE).workers_set();
    let gone = wait_until(|| {
        let (mut conn, workers_set) = (conn.clone(), workers_set.clone());
        async move { redis::AsyncCommands::zcard::<_, u64>(&mut conn, &workers_set).await.expect("zcard") == 0 }
    })
    .await;
    let left: Vec<String> = redis::AsyncCommands::zrange(&mut conn, &workers_set, 0, -1).await.expect("zrange");
    assert!(gone, "still registered: {left:?}");
}

/// Whether a delivery is claimed (its push is on the wire).
async fn pending_attempt(app: &TestApp) -> bool {
    deliveries(app, "sending").await > 0
}

#[tokio::test]
async fn a_backlog_left_in_the_database_flows_in_through_the_relay_and_redis_never_holds_more_than_the_bound() {
    // Arrange: 150 messages whose records wait in the database, never enqueued (as a
    // burst leaves them while Redis is down), no worker yet, a small bound.
    let mut app = spawn_app_with(Options {
        worker: false,
        env: vec![("QUEUE_MAX_BACKLOG".into(), "20".into())],
        ..Options::default()
    })
    .await;
    app.subscribe_browser().await;
    app.insert_burst(150).await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");

    // Act: a worker starts; its relay feeds the records in as the queue drains.
    app.start_worker().await;
    let most = most_backlog_until_received(&app, &queue, 150, 0, Duration::from_secs(60)).await;

    // Assert: everything delivered, once, and the bound held throughout.
    assert_eq!(app.pushed_bodies(), (150, 150), "every message was delivered, once");
    assert!(most <= 20, "the backlog reached {most}, above the bound of 20");
}

#[tokio::test]
async fn a_burst_past_the_bound_is_pushed_by_the_web_as_the_workers_make_room_not_left_to_the_relay() {
    // Arrange: no worker yet, a small bound, and a relay whose grace outlasts the test, so
    // whatever is delivered was pushed by the web.
    let mut app = spawn_app_with(Options {
        worker: false,
        env: vec![("QUEUE_MAX_BACKLOG".into(), "20".into()), ("RELAY_GRACE_MS".into(), "600000".into())],
        ..Options::default()
    })
    .await;
    app.subscribe_browser().await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");

    // Act: a burst of 100 submissions, five times the bound; then a worker starts.
    app.submit_burst(100, "held").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = queue.backlog().await.expect("backlog");
    app.start_worker().await;
    let most = most_backlog_until_received(&app, &queue, 100, held, Duration::from_secs(30)).await;

    // Assert: every message delivered once, long before the relay's grace; the bound
    // held throughout; the web left nothing to the relay.
    assert!(held <= 20, "Redis held {held} jobs before the worker, above the bound of 20");
    assert_eq!(app.pushed_bodies(), (100, 100), "every submission was delivered by the web's pushes, once");
    assert!(most <= 20, "the backlog reached {most}, above the bound of 20");
    let metrics = app.client.get(format!("{}/metrics", app.address)).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("text");
    assert_eq!(metric_value(&metrics, r#"tidings_dispatch_total{outcome="enqueued"}"#), Some(100.0), "{metrics}");
    assert_eq!(metric_value(&metrics, r#"tidings_dispatch_total{outcome="deferred_backlog_full"}"#), None, "{metrics}");
}

#[tokio::test]
async fn what_the_web_holds_for_room_enters_redis_oldest_first() {
    // Arrange: no worker (so no relay either: every job in Redis is the web's) and room
    // for five jobs.
    let app = spawn_app_with(Options {
        worker: false,
        env: vec![("QUEUE_MAX_BACKLOG".into(), "5".into())],
        ..Options::default()
    })
    .await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let mut submitted = Vec::new();
    for i in 0..20 {
        let body = serde_json::json!({"submitter_name": "Ann", "submitter_email": "a@example.com", "content": format!("in order {i}")});
        let answer = app.post_api_feedback(&body).await;
        assert_eq!(answer.status().as_u16(), 201);
        submitted.push(answer.json::<serde_json::Value>().await.expect("json")["id"].as_i64().expect("an id"));
    }

    // Act: the test makes room as a worker would, taking whatever waits in Redis, round
    // after round, until every message's job has come.
    let mut rounds: Vec<Vec<i64>> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rounds.iter().map(Vec::len).sum::<usize>() < submitted.len() && tokio::time::Instant::now() < deadline {
        let waiting = queue.waiting_jobs(100).await.expect("waiting jobs");
        assert!(waiting.len() <= 5, "Redis holds {} jobs, above the bound of 5", waiting.len());
        let mut round = Vec::new();
        for job in waiting {
            let Ok(shared::jobs::QueuedJob::FanOut(fan_out)) = shared::jobs::QueuedJob::parse(job.payload.as_bytes())
            else {
                panic!("not a fan-out: {}", job.payload)
            };
            assert!(queue.cancel(&job.id).await.expect("cancel").is_some());
            round.push(fan_out.feedback_id);
        }
        if !round.is_empty() {
            round.sort_unstable();
            rounds.push(round);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Assert: the jobs came in the order the messages were stored, once each, five at a
    // time at most.
    assert_eq!(rounds.concat(), submitted, "rounds as taken: {rounds:?}");
    assert!(rounds.len() >= 4, "{rounds:?}");
}

/// Waits, up to `within`, for `count` pushes to arrive, reading Redis's backlog every
/// 10 ms; returns the most it held (`held` at least).
async fn most_backlog_until_received(
    app: &TestApp,
    queue: &JobQueue,
    count: usize,
    held: u64,
    within: Duration,
) -> u64 {
    let mut most = held;
    let deadline = tokio::time::Instant::now() + within;
    while app.push.received().len() < count && tokio::time::Instant::now() < deadline {
        most = most.max(queue.backlog().await.expect("backlog"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    most
}

#[tokio::test]
async fn dead_letters_can_be_retried_or_discarded() {
    // Arrange: a valid job an older build dead-lettered, and a hopeless one.
    let app = spawn_app_with(Options::default()).await;
    let browser = app.subscribe_browser().await;
    let (_, good) = stored_fan_out(&app, "kept in a dead letter").await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let retry_id = queue.dead_letter(&dead_letter_of(good)).await.expect("stored");
    let discard_id = queue.dead_letter(&dead_letter_of("garbage".into())).await.expect("stored");
    assert_eq!(queue.dead_letter_count().await.expect("count"), 2);

    // Act
    assert!(queue.retry_dead_letter(&app.db, &retry_id).await.expect("retried"));
    assert!(queue.discard_dead_letter(&discard_id).await.expect("discarded"));

    // Assert: the retried job ran; both letters are gone; unknown ids say so.
    let received = app.push.wait_for_received(1, Duration::from_secs(15)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, browser.endpoint);
    assert_eq!(queue.dead_letter_count().await.expect("count"), 0);
    assert!(!queue.retry_dead_letter(&app.db, &retry_id).await.expect("answered"));
    assert!(!queue.discard_dead_letter("no-such-id").await.expect("answered"));
}

#[tokio::test]
async fn every_dead_letter_can_be_retried_or_discarded_at_once() {
    // Arrange: three valid jobs an older build dead-lettered, each with its own message.
    let app = spawn_app_with(Options::default()).await;
    let browser = app.subscribe_browser().await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let mut ids = Vec::new();
    for body in ["first of three", "second of three", "third of three"] {
        let (submitted, payload) = stored_fan_out(&app, body).await;
        // Set aside, its record is completed (`worker/src/app.rs::dead_letter`).
        shared::queries::dispatch::mark_completed(&app.db, submitted.dispatch_id).await.expect("completed");
        ids.push(queue.dead_letter(&dead_letter_of(payload)).await.expect("stored"));
        // Letters are ordered by the millisecond they were stored in.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(queue.dead_letter_ids().await.expect("ids"), ids, "oldest first");

    // Act: an operator retries them all (`worker dead retry --all`).
    assert_eq!(worker::ops::retry_all(&app.settings).await.expect("retried"), 3);

    // Assert: each message is pushed once (their order is the workers'); no letter is left.
    let received = app.push.wait_for_received(3, Duration::from_secs(15)).await;
    let mut bodies: Vec<String> =
        received.iter().map(|push| push.json()["body"].as_str().expect("body").to_owned()).collect();
    bodies.sort();
    assert_eq!(bodies, ["first of three", "second of three", "third of three"]);
    assert!(received.iter().all(|push| push.endpoint == browser.endpoint));
    assert_eq!(queue.dead_letter_count().await.expect("count"), 0);
    assert_eq!(worker::ops::retry_all(&app.settings).await.expect("none left"), 0);

    // Arrange: two hopeless letters.
    for _ in 0..2 {
        queue.dead_letter(&dead_letter_of("garbage".into())).await.expect("stored");
    }

    // Act: `worker dead discard --all`.
    assert_eq!(worker::ops::discard_all(&app.settings).await.expect("discarded"), 2);

    // Assert: none left, nothing more sent; a second call finds nothing.
    assert_eq!(queue.dead_letter_count().await.expect("count"), 0);
    assert!(queue.dead_letter_ids().await.expect("ids").is_empty());
    assert_eq!(worker::ops::discard_all(&app.settings).await.expect("none left"), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.push.received().len(), 3, "each message once");
}

/// Stores a message by Ann with its dispatch record, marked enqueued as the web marks it;
/// returns its submission and its fan-out job's payload.
async fn stored_fan_out(app: &TestApp, content: &str) -> (shared::queries::feedback::Submitted, String) {
    let submitted = shared::queries::feedback::insert_with_dispatch(
        &app.db,
        &shared::domain::NewFeedback::parse("Ann", "ann@example.com", content).expect("valid"),
    )
    .await
    .expect("stored");
    shared::queries::dispatch::mark_enqueued(&app.db, submitted.dispatch_id).await.expect("marked");
    let payload =
        serde_json::to_string(&shared::jobs::FanOut::new(submitted.feedback_id, submitted.dispatch_id)).expect("json");
    (submitted, payload)
}

/// A dead letter of the fan-out queue holding `payload`.
fn dead_letter_of(payload: String) -> shared::queue::DeadLetter {
    shared::queue::DeadLetter {
        id: String::new(),
        queue: FAN_OUT_QUEUE.into(),
        payload,
        error: "payload version 2 is newer than the supported version 1".into(),
        attempt: 1,
        at: "2026-11-24T10:00:00Z".into(),
    }
}

#[tokio::test]
async fn running_workers_report_themselves_to_readyz_and_status() {
    let app = spawn_app_with(Options::default()).await;

    let ready = wait_until(|| async {
        let body: serde_json::Value =
            app.client.get(format!("{}/readyz", app.address)).send().await.expect("readyz").json().await.expect("json");
        body["workers"]["live"] == 1 && body["workers"]["restarting"] == 0
    })
    .await;

    assert!(ready, "the in-process worker shows up in /readyz");
    let status = worker::status::read(&app.settings).await.expect("status");
    assert_eq!(status.processes.len(), 1);
    assert_eq!(status.processes[0].pid, std::process::id());
    assert_eq!(status.processes[0].concurrency, 2);

    // What Redis holds is reported by kind: after one job, its record and the reports.
    app.subscribe_browser().await;
    app.submit_valid_feedback("Ann", "counted in Redis").await;
    app.push.wait_for_received(1, std::time::Duration::from_secs(15)).await;
    let kinds = |status: &worker::status::Status| -> Vec<(&'static str, u64)> {
        status.redis.iter().filter(|u| u.bytes > 0).map(|u| (u.kind, u.keys)).collect()
    };
    let reported = wait_until(|| async {
        let status = worker::status::read(&app.settings).await.expect("status");
        let kinds = kinds(&status);
        ["job_records", "worker_reports", "queue", "job_stats"].iter().all(|k| kinds.iter().any(|(kind, _)| kind == k))
    })
    .await;
    let status = worker::status::read(&app.settings).await.expect("status");
    assert!(reported, "{:?}", status.redis);
    assert!(kinds(&status).contains(&("job_records", 1)), "{:?}", status.redis);
}

#[tokio::test]
async fn a_worker_idle_for_longer_than_a_heartbeat_still_picks_a_job_up_at_once() {
    // apalis' own poller can sit idle until the 30 s heartbeat; ours must not. The
    // fallback timer, the relay and the heartbeat (a quarter of the recovery bound) are
    // set far away, so only the wake on push can deliver in time.
    let app = spawn_app_with(Options {
        env: vec![
            ("QUEUE_POLL_MS".into(), "600000".into()),
            ("RELAY_INTERVAL_MS".into(), "600000".into()),
            ("WORKER_RECOVERY_SECS".into(), "600".into()),
        ],
        ..Options::default()
    })
    .await;
    app.subscribe_browser().await;
    tokio::time::sleep(Duration::from_secs(35)).await;

    app.submit_valid_feedback("Ann", "after a long silence").await;

    // A stall would last until the next heartbeat (150 s) or fallback poll (600 s).
    let received = app.push.wait_for_received(1, Duration::from_secs(5)).await;
    assert_eq!(received.len(), 1, "picked up by the wake, not by a heartbeat");
}

/// The worker's `tidings_queue_fetches_total{result}`.
async fn fetches(app: &TestApp, result: &str) -> u64 {
    let text = app.worker_metrics().await;
    let series = format!("tidings_queue_fetches_total{{result=\"{result}\"}}");
    metric_value(&text, &series).map_or(0, |n| n as u64)
}

#[tokio::test]
async fn the_worker_asks_redis_for_jobs_only_when_woken() {
    // apalis-core's poll loop fetches again every time a job starts or finishes; the
    // gate answers those itself. The fallback timer and the relay are minutes away, so
    // every fetch that reaches Redis here was let through by a wake. The worker runs two
    // fetch loops, both woken by each wake: one of them fetches.
    let app = spawn_app_with(Options {
        env: vec![("QUEUE_POLL_MS".into(), "600000".into()), ("RELAY_INTERVAL_MS".into(), "600000".into())],
        worker_concurrency: 16,
        ..Options::default()
    })
    .await;
    app.subscribe_browser().await;
    let messages = 12;

    for i in 0..messages {
        app.submit_valid_feedback("Ann", &format!("one at a time {i}")).await;
        let received = app.push.wait_for_received(i + 1, Duration::from_secs(10)).await;
        assert_eq!(received.len(), i + 1, "message {i} pushed");
    }

    // Each message's wake lets one fetch through, which finds its job; the loops' first
    // fetch and a wake racing a fetch may add an empty one or two.
    let found = fetches(&app, "jobs").await;
    let empty = fetches(&app, "empty").await;
    let skipped = fetches(&app, "skipped").await;
    let messages = u64::try_from(messages).expect("small");
    assert!(found >= messages, "every job was fetched: {found}");
    assert!(
        found + empty <= messages + 3,
        "{found} fetches found jobs and {empty} found none, for {messages} messages"
    );
    // Both loops are woken by each wake and both ask: the gate lets one through and
    // answers the other itself. (Each job also runs in a task of its own, so a loop asks
    // again about once per finished job; how often varies.) Without the gate each of
    // these would have reached Redis and counted as an empty fetch above.
    assert!(skipped >= messages, "the other loop's fetch was held back for each message: {skipped}");
}

#[tokio::test]
async fn one_tick_trims_every_finished_record_however_many_finished_since_the_last() {
    // Arrange: 120,000 finished records, more than a fixed number of batches a tick would
    // remove (the queue at 2,000 jobs/s finishes that many in a minute), all past their
    // retention; a worker whose trim ticks every 20 s.
    let (mut app, config, mut conn) = app_trimming_every_20s("0", "0").await;
    const FINISHED: usize = 120_000;
    seed_finished(&mut conn, &config, "finished", FINISHED, 1).await;

    // Act: the worker starts; its first trim runs.
    app.start_worker().await;
    let report = first_trim(&app, &conn).await;

    // Assert: that one trim removed them all, with their payloads and metadata.
    assert!(report.removed.contains(&("done_jobs".to_owned(), FINISHED as u64)), "{report:?}");
    let done: u64 = redis::AsyncCommands::scard(&mut conn, config.done_jobs_set()).await.expect("scard");
    let data: u64 = redis::AsyncCommands::hlen(&mut conn, config.job_data_hash()).await.expect("hlen");
    let meta: bool = redis::AsyncCommands::exists(&mut conn, format!("{}:finished-7", config.job_meta_hash()))
        .await
        .expect("exists");
    assert_eq!((done, data, meta), (0, 0, false));
}

#[tokio::test]
async fn one_tick_trims_the_records_past_their_age_among_younger_ones() {
    // Arrange: 20,000 finished records past their hour and 20,000 finished now, a count
    // budget that does not bind, and a worker whose trim ticks every 20 s.
    let (mut app, config, mut conn) = app_trimming_every_20s("3600", "1000000").await;
    let now = chrono::Utc::now().timestamp();
    seed_finished(&mut conn, &config, "old", 20_000, 1).await;
    seed_finished(&mut conn, &config, "new", 20_000, now).await;

    // Act
    app.start_worker().await;
    let report = first_trim(&app, &conn).await;

    // Assert: one tick removed nearly all the old ones (the records are sampled at
    // random, so the walk stops at a sample with none due: a few may wait for the next
    // tick), and none of the new.
    let removed = report.removed.iter().find(|(kind, _)| kind == "done_jobs").map_or(0, |(_, n)| *n);
    assert!(removed >= 19_000, "{report:?}");
    let new_left: u64 =
        redis::AsyncCommands::exists(&mut conn, format!("{}:new-7", config.job_meta_hash())).await.expect("exists");
    let done: u64 = redis::AsyncCommands::scard(&mut conn, config.done_jobs_set()).await.expect("scard");
    assert_eq!((new_left, done), (1, 40_000 - removed));
}

/// An app with no worker yet, keeping finished job records `retention_secs` and at most
/// `retention_count`, its trim ticking every 20 s; its queue's layout and a connection.
async fn app_trimming_every_20s(
    retention_secs: &str,
    retention_count: &str,
) -> (TestApp, apalis_redis::Config, redis::aio::ConnectionManager) {
    let app = spawn_app_with(Options {
        worker: false,
        env: vec![
            ("JOB_RETENTION_SECS".into(), retention_secs.into()),
            ("JOB_RETENTION_COUNT".into(), retention_count.into()),
            ("TRIM_INTERVAL_MS".into(), "20000".into()),
        ],
        ..Options::default()
    })
    .await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let config = queue.fan_out_config().clone();
    let conn = queue.connection();
    (app, config, conn)
}

/// Seeds `n` finished records `{prefix}-{i}` that finished at `done_at` (Unix seconds).
async fn seed_finished(
    conn: &mut redis::aio::ConnectionManager,
    config: &apalis_redis::Config,
    prefix: &str,
    n: usize,
    done_at: i64,
) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let id = format!("{prefix}-{i}");
            pipe.sadd(config.done_jobs_set(), &id).ignore();
            pipe.hset(config.job_data_hash(), &id, "{}").ignore();
            pipe.hset(format!("{}:{id}", config.job_meta_hash()), "done_at", done_at).ignore();
        }
        let _: () = pipe.query_async(conn).await.expect("seeded");
    }
}

/// The report of the first trim the app's worker runs.
async fn first_trim(app: &TestApp, conn: &redis::aio::ConnectionManager) -> worker::jobs::trim::TrimReport {
    let report_key = worker::jobs::trim::report_key(&app.settings.redis_namespace);
    let reported = crate::pipeline::wait_until_for(Duration::from_secs(60), || {
        let mut conn = conn.clone();
        let key = report_key.clone();
        async move { redis::AsyncCommands::exists::<_, bool>(&mut conn, key).await.expect("exists") }
    })
    .await;
    assert!(reported, "a trim ran");
    let mut conn = conn.clone();
    let report: String = redis::AsyncCommands::get(&mut conn, &report_key).await.expect("report");
    serde_json::from_str(&report).expect("json")
}

#[tokio::test]
async fn finished_job_records_are_trimmed_and_waiting_jobs_are_left_alone() {
    // Arrange: keep finished records for 0 s, trim often.
    let app = spawn_app_with(Options {
        env: vec![("JOB_RETENTION_SECS".into(), "0".into()), ("TRIM_INTERVAL_MS".into(), "200".into())],
        ..Options::default()
    })
    .await;
    app.subscribe_browser().await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let config = queue.fan_out_config().clone();
    let mut conn = queue.connection();
    // A job scheduled for later must survive every trim.
    let later =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs())
            .expect("fits")
            + 3600;
    queue.schedule_digest(&shared::jobs::Digest::new(later - 60, later, 6), None).await.expect("scheduled");

    // Act: three jobs run and finish.
    for i in 0..3 {
        app.submit_valid_feedback("Ann", &format!("trim me {i}")).await;
    }
    app.push.wait_for_received(3, Duration::from_secs(15)).await;

    // Assert: the finished records go; the scheduled one stays whole.
    let trimmed = wait_until(|| {
        let mut conn = conn.clone();
        let config = config.clone();
        async move {
            let done: u64 = redis::AsyncCommands::scard(&mut conn, config.done_jobs_set()).await.expect("scard");
            let data: u64 = redis::AsyncCommands::hlen(&mut conn, config.job_data_hash()).await.expect("hlen");
            done == 0 && data == 1
        }
    })
    .await;
    assert!(trimmed, "finished records were removed");
    let scheduled: Vec<String> =
        redis::AsyncCommands::zrange(&mut conn, config.scheduled_jobs_set(), 0, -1).await.expect("zrange");
    assert_eq!(scheduled.len(), 1, "the scheduled job is still there");
    let meta_keys: Vec<String> =
        redis::AsyncCommands::keys(&mut conn, format!("{}:*", config.job_meta_hash())).await.expect("keys");
    assert_eq!(meta_keys, vec![format!("{}:{}", config.job_meta_hash(), scheduled[0])], "only its metadata remains");
    // The finished jobs' idempotency keys went with their records; the digest's stays.
    let idempotency: Vec<String> =
        redis::AsyncCommands::keys(&mut conn, format!("{}:*", config.idempotency_key_set())).await.expect("keys");
    assert_eq!(idempotency.len(), 1, "{idempotency:?}");
    assert!(idempotency[0].contains("digest-"), "{idempotency:?}");
    // Finished jobs were acknowledged: no worker still holds them as in flight.
    let inflight: Vec<String> =
        redis::AsyncCommands::keys(&mut conn, format!("{}*", config.inflight_jobs_set())).await.expect("keys");
    for key in inflight {
        let held: u64 = redis::AsyncCommands::scard(&mut conn, &key).await.expect("scard");
        assert_eq!(held, 0, "{key} still holds finished jobs");
    }
}

#[tokio::test]
async fn a_waiting_job_can_be_listed_and_revoked() {
    // Arrange: no worker, so the job waits.
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let response = app
        .client
        .post(format!("{}/api/feedback", app.address))
        .header("x-request-id", "proxy-7f3a.1")
        .json(
            &serde_json::json!({"submitter_name": "Ann", "submitter_email": "ann@example.com", "content": "revoke me"}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-request-id"], "proxy-7f3a.1", "the request id is echoed");
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    assert!(wait_until(|| async { queue.waiting_jobs(10).await.expect("list").len() == 1 }).await);
    let waiting = queue.waiting_jobs(10).await.expect("list").remove(0);
    assert_eq!((waiting.kind, waiting.failed_attempts), ("fan_out", 0));
    assert_eq!(waiting.request_id.as_deref(), Some("proxy-7f3a.1"), "the job carries the request's id");
    let dispatch = shared::entities::dispatch::Entity::find().one(&app.db).await.expect("query").expect("row");
    assert_eq!(dispatch.request_id.as_deref(), Some("proxy-7f3a.1"), "so does its dispatch, for the relay");
    let (id, payload) = (waiting.id, waiting.payload);
    assert!(payload.contains("\"feedback_id\""));

    // Act: the operator's command.
    worker::ops::cancel(&app.settings, &id).await.expect("cancelled");

    // Assert: gone from Redis, its dispatch settled (the relay will not bring it back),
    // and a second cancel says there is nothing to cancel.
    assert!(queue.waiting_jobs(10).await.expect("list").is_empty());
    assert_eq!(queue.backlog().await.expect("backlog"), 0);
    assert_eq!(shared::queries::dispatch::outstanding(&app.db).await.expect("count"), 0);
    assert!(worker::ops::cancel(&app.settings, &id).await.is_err());
}

/// Stores a message with its dispatch record ([`stored_fan_out`]) and queues its fan-out
/// as a job already started POISON_AFTER (3) times without ever finishing, as when each
/// run crashed its worker; returns the message's submission.
async fn queue_poisoned_fan_out(app: &TestApp, content: &str) -> shared::queries::feedback::Submitted {
    let task_id = "01HX0000000000000000000001";
    let mut conn =
        JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis").connection();
    let _: () =
        redis::AsyncCommands::set(&mut conn, format!("{}:job-starts:{task_id}", app.settings.redis_namespace), 3)
            .await
            .expect("set");
    let (submitted, payload) = stored_fan_out(app, content).await;
    let task = TaskBuilder::new(payload.into_bytes())
        .task_id(apalis_core::task::task_id::TaskId::from_string(task_id))
        .build();
    let config = config_for_queue(&app.settings.redis_namespace, FAN_OUT_QUEUE);
    apalis_redis::queries::push_tasks(&mut conn, &config, &[task]).await.expect("pushed");
    let _: i64 = redis::AsyncCommands::publish(&mut conn, wake_channel(&app.settings.redis_namespace), "x")
        .await
        .expect("published");
    submitted
}

#[tokio::test]
async fn a_job_that_keeps_killing_its_worker_is_dead_lettered() {
    // Arrange: a fan-out already started POISON_AFTER (3) times without ever finishing.
    let app = spawn_app_with(Options::default()).await;
    app.subscribe_browser().await;
    queue_poisoned_fan_out(&app, "poison").await;

    // Assert: its fourth start sets it aside instead of running it.
    assert!(wait_until(|| async { !dead_letters(&app).await.is_empty() }).await, "the poison job was dead-lettered");
    let letter = dead_letters(&app).await.remove(0);
    assert!(letter.error.contains("started 4 times without finishing"), "{}", letter.error);
    assert!(app.push.attempts().is_empty(), "it did not run");
}

#[tokio::test]
async fn a_dead_lettered_fan_out_is_not_run_again_by_the_relay_and_a_hand_retry_sends_it() {
    // Arrange: coalescing on (a run that finds its record completed with nothing sent
    // takes the message for one a digest announced); a poisoned fan-out, dead-lettered.
    let app =
        spawn_app_with(Options { env: vec![("NOTIFY_BURST_THRESHOLD".into(), "6".into())], ..Options::default() })
            .await;
    app.subscribe_browser().await;
    let submitted = queue_poisoned_fan_out(&app, "poison, then retried").await;
    let record = || async {
        shared::entities::dispatch::Entity::find_by_id(submitted.dispatch_id)
            .one(&app.db)
            .await
            .expect("query")
            .expect("the record")
    };
    assert!(wait_until(|| async { !dead_letters(&app).await.is_empty() }).await, "the poison job was dead-lettered");
    assert!(wait_until(|| async { record().await.completed_at.is_some() }).await, "and its record settled");

    // Act: its record is made to look enqueued 20 minutes ago, past the 15 after which the
    // relay takes an uncompleted record's job for lost (the default retry cap of 10 minutes
    // plus 5); the relay makes several passes (one every 200 ms).
    {
        use sea_orm::sea_query::Expr;
        use sea_orm::{ColumnTrait, QueryFilter};
        use shared::entities::dispatch::{Column, Entity};
        let long_ago = shared::queries::now() - chrono::Duration::minutes(20);
        Entity::update_many()
            .col_expr(Column::EnqueuedAt, Expr::value(long_ago))
            .filter(Column::Id.eq(submitted.dispatch_id))
            .exec(&app.db)
            .await
            .expect("backdated");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Assert: the dead letter is the job's only copy: nothing ran, the record is settled.
    assert!(app.push.attempts().is_empty(), "the relay ran the dead-lettered job again");
    let settled = record().await;
    assert!(settled.completed_at.is_some(), "{settled:?}");

    // Act: an operator retries the letter (`worker dead retry ID`).
    let letter = dead_letters(&app).await.remove(0);
    worker::ops::retry(&app.settings, &letter.id).await.expect("retried");

    // Assert: the message goes out on its own (not folded into a digest), once.
    let received = app.push.wait_for_received(1, Duration::from_secs(15)).await;
    assert_eq!(received.len(), 1, "the retried fan-out sent the message");
    let push = received[0].json();
    assert_eq!(push["tag"], format!("feedback-{}", submitted.feedback_id), "{push}");
    assert_eq!(push["body"], "poison, then retried");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.push.received().len(), 1, "and only once");
}

#[tokio::test]
async fn worker_ping_answers_while_a_worker_runs() {
    let mut app = spawn_app_with(Options { worker: false, ..Options::default() }).await;

    let unanswered = worker::ops::ping(&app.settings, Duration::from_millis(500)).await;
    app.start_worker().await;
    let answered = worker::ops::ping(&app.settings, Duration::from_secs(10)).await;

    let error = unanswered.expect_err("no worker runs").to_string();
    assert!(error.contains("are workers running"), "{error}");
    answered.expect("a worker ran the ping");
}

#[tokio::test]
async fn each_fetch_loop_takes_as_many_jobs_per_fetch_as_it_runs_at_once() {
    // A backlog of no-op jobs for a worker running 32 at once, 16 in each of its two fetch
    // loops: the loops' first fetches, of their free slots, come back full, which makes a
    // backlog, and from then on each fetch takes up to 16 (apalis-redis's default took
    // 10, so 30 fetches for these 300), and the two loops share them.
    let mut app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let jobs = 300;
    let payload = serde_json::to_vec(&shared::jobs::Ping::new()).expect("encoded");
    queue.enqueue_many(vec![payload; jobs]).await.expect("enqueued");

    let worker = worker::app::Application::build(app.settings.clone(), 32).await.expect("the worker starts");
    let stop = worker.shutdown_handle();
    app.worker_metrics_port = worker.metrics_port();
    tokio::spawn(worker.run_until_stopped());
    let done = || async { queue.done_count().await.expect("done count") };
    assert!(wait_until(|| async { done().await >= jobs as u64 }).await, "every job ran");

    // Each full batch lets the other loop fetch too; a loop's fetch is trimmed to its
    // free slots while the other has more room, and the last fetches come back short:
    // at least one fetch per 16 jobs, and fewer than the 30 of apalis-redis's 10.
    let found = fetches(&app, "jobs").await as usize;
    assert!((jobs.div_ceil(16)..jobs.div_ceil(10)).contains(&found), "{found} fetches found the {jobs} jobs");
    // Both loops, an apalis worker each, are named in the process's report and registered.
    let status = worker::status::read(&app.settings).await.expect("status");
    let loops: Vec<&str> = status.processes[0].worker.split(',').collect();
    assert_eq!(loops.len(), 2, "{:?}", status.processes[0].worker);
    assert_ne!(loops[0], loops[1]);
    let mut conn = queue.connection();
    let workers_set = config_for_queue(&app.settings.redis_namespace, FAN_OUT_QUEUE).workers_set();
    for name in &loops {
        let registered: Option<f64> =
            redis::AsyncCommands::zscore(&mut conn, &workers_set, name).await.expect("zscore");
        assert!(registered.is_some(), "{name} is registered");
    }
    stop.shutdown();
}

#[tokio::test]
async fn a_worker_that_stops_with_jobs_waiting_wakes_the_other_workers() {
    use futures::StreamExt;
    // Arrange: a worker running two jobs at once, both busy with slow pushes, and a third
    // job waiting on the queue for a free slot. The wake is for the jobs a stopping worker
    // held, which go back to the queue with no `PUBLISH` (unlike a producer's push, whose
    // wake other workers already had); the script wakes whenever jobs wait, as this one
    // does. The fallback poll is a minute away.
    let (mut app, queue) = two_busy_slots_and_a_job_waiting(Vec::new()).await;
    let waiting = || async { queue.backlog().await.expect("backlog") };
    let client = redis::Client::open(app.settings.redis_url.as_str()).expect("client");
    let mut wakes = client.get_async_pubsub().await.expect("pub/sub");
    wakes.subscribe(wake_channel(&app.settings.redis_namespace)).await.expect("subscribed");

    // Act: the worker stops (as on SIGTERM): it finishes its two pushes, and leaves.
    app.stop_worker();

    // Assert: once it has drained, it wakes the other workers for the job left waiting.
    let woken = tokio::time::timeout(Duration::from_secs(20), wakes.on_message().next()).await;
    assert!(matches!(woken, Ok(Some(_))), "no wake after the stop");
    assert_eq!(deliveries(&app, "sent").await, 2, "the wake came after the drain");
    assert_eq!(waiting().await, 1);
    // A worker started later takes it at once, as any worker does when it starts.
    app.push.set_delay(Duration::ZERO);
    app.start_worker().await;
    assert_eq!(app.push.wait_for_received(3, Duration::from_secs(15)).await.len(), 3);
}

#[tokio::test]
async fn a_fetch_on_its_way_at_a_stop_puts_its_jobs_back_at_once_instead_of_after_the_recovery_bound() {
    // Arrange: a worker running two jobs at once, busy with two slow pushes, a third job
    // on the queue, and the orphan recovery two minutes away.
    let (mut app, queue) = two_busy_slots_and_a_job_waiting(vec![("WORKER_RECOVERY_SECS".into(), "120".into())]).await;
    let waiting = || async { queue.backlog().await.expect("backlog") };
    // One of the worker's loops fetched it just as the worker stopped: the fetch script
    // ran in Redis, and its reply went to a loop that no longer reads it (apalis-core
    // drops a fetch in flight when it stops). The script's effect, staged: the job moves
    // from the queue into that loop's in-flight set.
    let config = queue.fan_out_config();
    let mut conn = queue.connection();
    let loops: Vec<String> = redis::AsyncCommands::zrange(&mut conn, config.workers_set(), 0, -1).await.expect("loops");
    let fetched: i64 = redis::Script::new(
        "local ids = redis.call('ZRANGE', KEYS[1], 0, -1) \
         for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do table.insert(ids, id) end \
         redis.call('DEL', KEYS[1], KEYS[2]) \
         if #ids > 0 then redis.call('SADD', KEYS[3], unpack(ids)) end \
         return #ids",
    )
    .key(config.scheduled_jobs_set())
    .key(config.active_jobs_list())
    .key(queue.inflight_set_of(&loops[0]))
    .invoke_async(&mut conn)
    .await
    .expect("staged");
    assert_eq!((fetched, waiting().await), (1, 0));

    // Act: the worker stops (as on SIGTERM), finishing its two pushes.
    app.stop_worker();

    // Assert: once it has drained, the job it never started is back on the queue, and
    // its loop is no longer registered (another worker's orphan recovery would have
    // taken two minutes) ...
    assert!(wait_until(|| async { deliveries(&app, "sent").await == 2 }).await, "the drain ends");
    assert!(wait_until(|| async { waiting().await == 1 }).await, "the unstarted job went back to the queue");
    let registered: Vec<String> =
        redis::AsyncCommands::zrange(&mut conn, config.workers_set(), 0, -1).await.expect("loops");
    assert!(registered.is_empty(), "{registered:?}");
    // ... where a worker takes it and sends its push.
    app.push.set_delay(Duration::ZERO);
    app.start_worker().await;
    assert_eq!(app.push.wait_for_received(3, Duration::from_secs(15)).await.len(), 3);
}

#[tokio::test]
async fn a_busy_worker_leaves_the_jobs_it_cannot_start_to_other_workers() {
    // Arrange: a worker running two jobs at once, busy with two slow pushes (the first
    // answered after 2 s, the second after 10 s), and two more jobs waiting on the queue.
    let app =
        spawn_app_with(Options { env: vec![("PUSH_TIMEOUT_MS".into(), "15000".into())], ..Options::default() }).await;
    app.subscribe_browser().await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let waiting = || async { queue.backlog().await.expect("backlog") };
    app.push.set_delay(Duration::from_secs(2));
    app.submit_valid_feedback("Ann", "first").await;
    assert!(wait_until(|| async { deliveries(&app, "sending").await == 1 }).await);
    app.push.set_delay(Duration::from_secs(10));
    app.submit_valid_feedback("Ann", "second").await;
    assert!(wait_until(|| async { deliveries(&app, "sending").await == 2 }).await);
    app.submit_valid_feedback("Ann", "third").await;
    app.submit_valid_feedback("Ann", "fourth").await;
    assert!(wait_until(|| async { waiting().await == 2 }).await, "both wait for a free slot");

    // Act: the first push ends, freeing one slot.
    let freed =
        wait_until(|| async { deliveries(&app, "sent").await == 1 && deliveries(&app, "sending").await == 2 }).await;

    // Assert: the worker took one job for it, and left the other on the queue (a fetch
    // of two would have held it here behind the second push) ...
    assert!(freed, "the third job started in the freed slot");
    assert_eq!(waiting().await, 1, "the fourth job was taken though no slot was free for it");
    // ... where a second worker takes it at once.
    app.push.set_delay(Duration::ZERO);
    let second = worker::app::Application::build(app.settings.clone(), 2).await.expect("the second worker starts");
    let second_stop = second.shutdown_handle();
    tokio::spawn(second.run_until_stopped());
    let received = app.push.wait_for_received(2, Duration::from_secs(5)).await;
    second_stop.shutdown();
    let bodies: Vec<String> =
        received.iter().map(|p| p.json()["body"].as_str().unwrap_or_default().to_owned()).collect();
    assert!(bodies.iter().any(|b| b.contains("fourth")), "{bodies:?}");
}

/// An app whose worker (its fallback poll a minute away, and `env` besides) runs two jobs
/// at once, both busy with 4 s pushes, while a third job waits on the queue for a slot.
async fn two_busy_slots_and_a_job_waiting(mut env: Vec<(String, String)>) -> (TestApp, JobQueue) {
    env.extend([("QUEUE_POLL_MS".into(), "60000".into()), ("PUSH_TIMEOUT_MS".into(), "15000".into())]);
    let app = spawn_app_with(Options { env, ..Options::default() }).await;
    app.subscribe_browser().await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    app.push.set_delay(Duration::from_secs(4));
    app.submit_valid_feedback("Ann", "first").await;
    app.submit_valid_feedback("Ann", "second").await;
    assert!(wait_until(|| async { deliveries(&app, "sending").await == 2 }).await);
    app.submit_valid_feedback("Ann", "third").await;
    let waiting = || async { queue.backlog().await.expect("backlog") };
    assert!(wait_until(|| async { waiting().await == 1 }).await, "the third job waits on the queue");
    (app, queue)
}

/// The deliveries in `status`.
async fn deliveries(app: &TestApp, status: &str) -> usize {
    let rows = shared::entities::delivery::Entity::find().all(&app.db).await.expect("query");
    rows.iter().filter(|r| r.status == status).count()
}
