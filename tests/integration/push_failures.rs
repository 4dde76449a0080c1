//! What the worker does with each kind of answer from the push service.

use std::time::Duration;

use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait, TransactionTrait};
use tidings_tests::harness::{Backend, Options, TestApp, spawn_app_with};
use tidings_tests::push_service::Scripted;

use crate::pipeline::wait_until;

async fn app() -> TestApp {
    spawn_app_with(Options::default()).await
}

async fn subscription_exists(app: &TestApp, endpoint: &str) -> bool {
    use sea_orm::{ColumnTrait, QueryFilter};
    use shared::entities::push_subscription::{Column, Entity};
    Entity::find().filter(Column::Endpoint.eq(endpoint)).count(&app.db).await.expect("query") > 0
}

#[tokio::test]
async fn gone_subscriptions_are_deleted_while_the_others_still_get_theirs() {
    let app = app().await;
    let expired = app.subscribe_browser().await;
    let unsubscribed = app.subscribe_browser().await;
    let healthy = app.subscribe_browser().await;
    app.push.script(&expired.endpoint, vec![Scripted::Status(404)]);
    app.push.script(&unsubscribed.endpoint, vec![Scripted::Status(410)]);

    app.submit_valid_feedback("Ann", "hello").await;

    let received = app.push.wait_for_received(1, Duration::from_secs(15)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, healthy.endpoint);
    assert!(wait_until(|| async { !subscription_exists(&app, &expired.endpoint).await }).await);
    assert!(wait_until(|| async { !subscription_exists(&app, &unsubscribed.endpoint).await }).await);
    assert!(subscription_exists(&app, &healthy.endpoint).await);
}

#[tokio::test]
async fn throttled_and_failing_deliveries_are_retried_alone_without_duplicates() {
    retried_alone_without_duplicates(Backend::Postgres).await;
}

#[tokio::test]
async fn throttled_and_failing_deliveries_are_retried_alone_without_duplicates_on_sqlite() {
    retried_alone_without_duplicates(Backend::Sqlite).await;
}

/// PostgreSQL claims, records and closes a run in one statement each; SQLite in several.
async fn retried_alone_without_duplicates(backend: Backend) {
    let app = spawn_app_with(Options { backend, ..Options::default() }).await;
    let throttled = app.subscribe_browser().await;
    let flaky = app.subscribe_browser().await;
    let healthy = app.subscribe_browser().await;
    app.push.script(&throttled.endpoint, vec![Scripted::RetryAfter { status: 429, seconds: 1 }]);
    app.push.script(&flaky.endpoint, vec![Scripted::Status(500), Scripted::Status(503)]);

    app.submit_valid_feedback("Ann", "retry me").await;

    let received = app.push.wait_for_received(3, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 3, "each subscription eventually got the message");
    // Let any stray duplicate arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = app.push.received();
    for browser in [&throttled, &flaky, &healthy] {
        let copies = received.iter().filter(|p| p.endpoint == browser.endpoint).count();
        assert_eq!(copies, 1, "exactly one accepted push per subscription");
    }
    let attempts = app.push.attempts();
    let healthy_attempts = attempts.iter().filter(|a| a.endpoint == healthy.endpoint).count();
    assert_eq!(healthy_attempts, 1, "the healthy subscription was not re-sent");
    assert_eq!(attempts.iter().filter(|a| a.endpoint == flaky.endpoint).count(), 3);
    let throttled_attempts: Vec<_> = attempts.iter().filter(|a| a.endpoint == throttled.endpoint).collect();
    assert_eq!(throttled_attempts.len(), 2);
    let waited = throttled_attempts[1].at - throttled_attempts[0].at;
    assert!(waited >= Duration::from_millis(950), "Retry-After honoured, waited {waited:?}");
}

#[tokio::test]
async fn permanent_rejections_are_recorded_as_failed_with_the_reason() {
    let app = app().await;
    let too_big = app.subscribe_browser().await;
    app.push.script(&too_big.endpoint, vec![Scripted::Status(413)]);

    app.submit_valid_feedback("Ann", "hello").await;

    let failed = wait_until(|| async {
        let rows = shared::entities::delivery::Entity::find().all(&app.db).await.expect("query");
        rows.len() == 1 && rows[0].status == "failed"
    })
    .await;
    assert!(failed);
    let rows = shared::entities::delivery::Entity::find().all(&app.db).await.expect("query");
    assert!(rows[0].last_error.as_deref().is_some_and(|e| e.starts_with("413")), "{:?}", rows[0].last_error);
    assert_eq!(app.push.attempts().len(), 1, "a permanent failure is not retried");
    assert!(subscription_exists(&app, &too_big.endpoint).await, "413 does not delete the subscription");
}

#[tokio::test]
async fn retries_stop_after_the_last_attempt_and_record_the_reason() {
    let app =
        spawn_app_with(Options { env: vec![("PUSH_MAX_ATTEMPTS".into(), "2".into())], ..Options::default() }).await;
    let down = app.subscribe_browser().await;
    app.push.script(&down.endpoint, vec![Scripted::Status(502); 5]);

    app.submit_valid_feedback("Ann", "hello").await;

    let failed = wait_until(|| async {
        let rows = shared::entities::delivery::Entity::find().all(&app.db).await.expect("query");
        rows.len() == 1 && rows[0].status == "failed"
    })
    .await;
    assert!(failed);
    let rows = shared::entities::delivery::Entity::find().all(&app.db).await.expect("query");
    assert!(rows[0].last_error.as_deref().is_some_and(|e| e.contains("gave up after 2 attempts")));
    assert_eq!(app.push.attempts().len(), 2);
}

#[tokio::test]
async fn a_push_service_that_hangs_times_out_and_the_delivery_is_retried() {
    let app =
        spawn_app_with(Options { env: vec![("PUSH_TIMEOUT_MS".into(), "500".into())], ..Options::default() }).await;
    let hanging = app.subscribe_browser().await;
    let healthy = app.subscribe_browser().await;
    app.push.script(&hanging.endpoint, vec![Scripted::Hang]);

    app.submit_valid_feedback("Ann", "hello").await;

    let received = app.push.wait_for_received(2, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 2, "the timed-out delivery went out on a retry");
    let attempts = app.push.attempts();
    assert_eq!(attempts.iter().filter(|a| a.endpoint == hanging.endpoint).count(), 2);
    assert_eq!(attempts.iter().filter(|a| a.endpoint == healthy.endpoint).count(), 1);
}

#[tokio::test]
async fn a_push_that_hangs_on_the_first_page_does_not_hold_up_the_next_page() {
    // Arrange: more subscriptions than a run's first page (64); the first of them hangs
    // until the request times out, long after every other push could have gone out.
    let app =
        spawn_app_with(Options { env: vec![("PUSH_TIMEOUT_MS".into(), "60000".into())], ..Options::default() }).await;
    let admin = app.create_admin().await;
    let hanging = app.subscribe_device(admin).await;
    let mut others = Vec::new();
    for _ in 0..79 {
        others.push(app.subscribe_device(admin).await);
    }
    app.push.script(&hanging.endpoint, vec![Scripted::Hang]);

    // Act
    app.submit_valid_feedback("Ann", "hello").await;

    // Assert: the other 79, on the first page and on the next, arrive while the hung push
    // still waits out its timeout.
    let received = app.push.wait_for_received(79, Duration::from_secs(20)).await;
    let served = others.iter().filter(|b| received.iter().any(|p| p.endpoint == b.endpoint)).count();
    assert_eq!(served, 79, "{served} of the 79 other subscriptions served while one push hangs");
    let hung = || async { app.push.attempts().iter().any(|a| a.endpoint == hanging.endpoint) };
    assert!(wait_until(hung).await, "the hung push was sent");
}

#[tokio::test]
async fn a_write_that_fails_mid_fan_out_ends_the_run_and_the_retries_send_every_push_once() {
    // Arrange: 600 subscriptions (a first page of 64, then 500 and 36), one on the first
    // page gone at the push service, and its removal refused by the database for now.
    let app = spawn_app_with(Options {
        env: vec![
            ("JOB_RETRY_FAN_OUT".into(), "15/200/1000".into()),
            ("PUSH_CONCURRENCY".into(), "8".into()),
            ("PUSH_TIMEOUT_MS".into(), "1000".into()),
        ],
        ..Options::default()
    })
    .await;
    let admin = app.create_admin().await;
    let mut browsers = Vec::new();
    for _ in 0..600 {
        browsers.push(app.subscribe_device(admin).await);
    }
    let gone = browsers.remove(10);
    app.push.script(&gone.endpoint, vec![Scripted::Status(410); 2]);
    for statement in [
        "CREATE FUNCTION refuse_removal() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ \
         LANGUAGE plpgsql",
        "CREATE TRIGGER refuse BEFORE DELETE ON push_subscriptions FOR EACH ROW EXECUTE FUNCTION refuse_removal()",
    ] {
        app.db.execute_unprepared(statement).await.expect("trigger created");
    }

    // Act: the first run fails at that write, with the next page claimed and waiting;
    // then the database takes the removal again.
    app.submit_valid_feedback("Ann", "hello").await;
    let refused = || async { app.push.attempts().iter().any(|a| a.endpoint == gone.endpoint) };
    assert!(wait_until(refused).await, "the gone subscription was pushed to");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_the_retry = app.push.received().len();
    app.db.execute_unprepared("DROP TRIGGER refuse ON push_subscriptions").await.expect("trigger dropped");

    // Assert: the first run stopped short; the retries send every other subscription its
    // push exactly once, and the gone one is removed.
    assert!(before_the_retry < 599, "the first run stopped at the failed write ({before_the_retry} sent)");
    let received = app.push.wait_for_received(599, Duration::from_secs(60)).await;
    let served = browsers.iter().filter(|b| received.iter().any(|p| p.endpoint == b.endpoint)).count();
    assert_eq!(served, 599, "{served} of 599 served");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = app.push.received();
    let twice = browsers.iter().filter(|b| received.iter().filter(|p| p.endpoint == b.endpoint).count() > 1).count();
    assert_eq!(twice, 0, "{twice} subscriptions got the message twice");
    assert!(wait_until(|| async { !subscription_exists(&app, &gone.endpoint).await }).await, "the gone one is removed");
}

#[tokio::test]
async fn completed_dispatch_records_are_pruned_after_their_retention_on_postgres() {
    dispatch_records_are_pruned_after_their_retention(Backend::Postgres).await;
}

#[tokio::test]
async fn completed_dispatch_records_are_pruned_after_their_retention_on_sqlite() {
    dispatch_records_are_pruned_after_their_retention(Backend::Sqlite).await;
}

async fn dispatch_records_are_pruned_after_their_retention(backend: Backend) {
    use sea_orm::{ActiveModelTrait, QueryOrder, Set};
    use shared::entities::dispatch;

    // Arrange: more than a batch of records completed 40 days ago, one still outstanding
    // since then, one completed yesterday (retention 30 days).
    let app = spawn_app_with(Options {
        backend,
        worker: false,
        env: vec![("PRUNE_INTERVAL_MS".into(), "200".into()), ("PRUNE_DISPATCHES_DAYS".into(), "30".into())],
        ..Options::default()
    })
    .await;
    app.submit_valid_feedback("Ann", "long ago").await;
    let feedback_id = dispatch::Entity::find().one(&app.db).await.expect("query").expect("stored").feedback_id;
    let long_ago = shared::queries::now() - chrono::Duration::days(40);
    let yesterday = shared::queries::now() - chrono::Duration::days(1);
    for _ in 0..1_050 {
        let id = shared::queries::dispatch::create(&app.db, feedback_id, long_ago).await.expect("created");
        set_times(&app, id, long_ago, Some(long_ago + chrono::Duration::minutes(1))).await;
    }
    let owed = shared::queries::dispatch::create(&app.db, feedback_id, long_ago).await.expect("created");
    set_times(&app, owed, long_ago, None).await;
    let recent = shared::queries::dispatch::create(&app.db, feedback_id, yesterday).await.expect("created");
    set_times(&app, recent, yesterday, Some(yesterday)).await;
    let first = dispatch::Entity::find().order_by_asc(dispatch::Column::Id).one(&app.db).await.expect("query");
    let first = first.expect("stored").id;

    // Act: a worker runs its periodic tasks.
    let mut app = app;
    app.start_worker().await;

    // Assert: the records completed 40 days ago go; the one still owed (the relay takes it
    // up) and the recent one stay, and so does the submission's own.
    let remaining = || async { dispatch::Entity::find().count(&app.db).await.expect("count") };
    assert!(wait_until(|| async { remaining().await == 3 }).await, "{} records left", remaining().await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(remaining().await, 3);
    for id in [first, owed, recent] {
        assert!(dispatch::Entity::find_by_id(id).one(&app.db).await.expect("query").is_some(), "record {id} stays");
    }

    async fn set_times(
        app: &TestApp,
        id: i64,
        created: chrono::DateTime<chrono::Utc>,
        completed: Option<chrono::DateTime<chrono::Utc>>,
    ) {
        let row = dispatch::Entity::find_by_id(id).one(&app.db).await.expect("query").expect("stored");
        let mut row: dispatch::ActiveModel = row.into();
        row.created_at = Set(created);
        row.completed_at = Set(completed);
        row.enqueued_at = Set(completed);
        row.update(&app.db).await.expect("updated");
    }
}

#[tokio::test]
async fn subscriptions_failing_for_days_are_pruned_by_the_periodic_task() {
    use sea_orm::{ActiveModelTrait, ColumnTrait, QueryFilter, Set};
    use shared::entities::push_subscription;

    // Arrange: a subscription failing for ten days, one failing since yesterday's success,
    // one healthy and old.
    let app = spawn_app_with(Options {
        worker: false,
        env: vec![("PRUNE_INTERVAL_MS".into(), "200".into()), ("PRUNE_FAILING_SUBSCRIPTIONS_DAYS".into(), "7".into())],
        ..Options::default()
    })
    .await;
    let ten_days_ago = shared::queries::now() - chrono::Duration::days(10);
    let yesterday = shared::queries::now() - chrono::Duration::days(1);
    let mut set_up = Vec::new();
    for (failures, last_success) in [(4, Some(ten_days_ago)), (2, Some(yesterday)), (0, None)] {
        let browser = app.subscribe_browser().await;
        let row = push_subscription::Entity::find()
            .filter(push_subscription::Column::Endpoint.eq(&browser.endpoint))
            .one(&app.db)
            .await
            .expect("query")
            .expect("stored");
        let mut row: push_subscription::ActiveModel = row.into();
        row.failure_count = Set(failures);
        row.last_success_at = Set(last_success);
        row.created_at = Set(ten_days_ago - chrono::Duration::days(1));
        row.update(&app.db).await.expect("updated");
        set_up.push(browser.endpoint);
    }

    // Act: a worker runs its periodic tasks.
    let mut app = app;
    app.start_worker().await;

    // Assert: only the one failing for more than seven days goes.
    assert!(wait_until(|| async { !subscription_exists(&app, &set_up[0]).await }).await, "pruned");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(subscription_exists(&app, &set_up[1]).await, "a recent success keeps it");
    assert!(subscription_exists(&app, &set_up[2]).await, "a healthy subscription stays");
}

#[tokio::test]
async fn a_retry_past_the_first_page_is_sent_once_on_sqlite() {
    // A due retry is claimed with the first page; the second page, claimed while it is
    // still being sent, must not take it again.
    let app = spawn_app_with(Options { backend: Backend::Sqlite, ..Options::default() }).await;
    let mut browsers = Vec::new();
    for _ in 0..100 {
        browsers.push(app.subscribe_browser().await);
    }
    let late = &browsers[80];
    app.push.script(&late.endpoint, vec![Scripted::Status(500)]);
    app.push.set_delay(Duration::from_millis(200));

    app.submit_valid_feedback("Ann", "one hundred browsers").await;

    let received = app.push.wait_for_received(100, Duration::from_secs(30)).await;
    assert_eq!(received.len(), 100, "every subscription got the message");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let received = app.push.received();
    for browser in &browsers {
        let copies = received.iter().filter(|p| p.endpoint == browser.endpoint).count();
        assert_eq!(copies, 1, "exactly one accepted push per subscription");
    }
    let late_attempts = app.push.attempts().iter().filter(|a| a.endpoint == late.endpoint).count();
    assert_eq!(late_attempts, 2, "the failed push was tried once more, not twice");
}

/// An app whose pushes time out after `timeout_ms`, `concurrency` at a time, to
/// `subscriptions` subscriptions the stand-in answers after `delay`; returns it and the
/// subscriptions' endpoints.
async fn slow_pushes(
    timeout_ms: u64,
    concurrency: usize,
    subscriptions: usize,
    delay: Duration,
) -> (TestApp, Vec<String>) {
    let app = spawn_app_with(Options {
        env: vec![
            ("PUSH_TIMEOUT_MS".into(), timeout_ms.to_string()),
            ("PUSH_CONCURRENCY".into(), concurrency.to_string()),
        ],
        ..Options::default()
    })
    .await;
    let mut endpoints = Vec::new();
    for _ in 0..subscriptions {
        endpoints.push(app.subscribe_browser().await.endpoint);
    }
    app.push.set_delay(delay);
    (app, endpoints)
}

/// Each of `endpoints` was sent exactly one push.
fn assert_one_push_each(app: &TestApp, endpoints: &[String]) {
    let attempts = app.push.attempts();
    for endpoint in endpoints {
        assert_eq!(attempts.iter().filter(|a| &a.endpoint == endpoint).count(), 1, "one push to {endpoint}");
    }
}

#[tokio::test]
async fn a_slow_write_of_successes_makes_no_push_in_flight_time_out_or_go_twice() {
    // Four pushes at a time, each timing out after a second and a half and answered
    // after 20 ms, a real push service's round trip. Forty subscriptions: one page, sent
    // in many small batches.
    let (app, endpoints) = slow_pushes(1500, 4, 40, Duration::from_millis(20)).await;

    // Every success is recorded on its subscription's row too: hold those rows for five
    // seconds, over three times the push timeout, so the first batch's write waits that
    // long.
    let holder = app.db.begin().await.expect("begin");
    holder.execute_unprepared("SELECT id FROM push_subscriptions FOR NO KEY UPDATE").await.expect("lock");
    app.submit_valid_feedback("Ann", "hello").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    holder.commit().await.expect("commit");

    let received = app.push.wait_for_received(40, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 40);
    assert!(
        wait_until(|| async {
            use sea_orm::{ColumnTrait, QueryFilter};
            use shared::entities::delivery::{Column, Entity, SENT};
            Entity::find().filter(Column::Status.eq(SENT)).count(&app.db).await.expect("count") == 40
        })
        .await,
        "every delivery is recorded as sent"
    );
    // Past the first retry's time: a push reported as timed out would have gone again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = shared::entities::delivery::Entity::find().all(&app.db).await.expect("query");
    let retried: Vec<i64> = rows.iter().filter(|row| row.attempts > 1).map(|row| row.subscription_id).collect();
    assert!(retried.is_empty(), "no push was retried, but these were: {retried:?}");
    assert_one_push_each(&app, &endpoints);
}

#[tokio::test]
async fn a_fan_out_that_outlasts_a_claims_hold_keeps_its_claims_until_it_sends_them() {
    use sea_orm::{ColumnTrait, QueryFilter};
    use shared::entities::delivery::{Column, Entity, SENDING};
    // A push timeout of a second makes a claim hold 6 s. Two pushes at a time, each
    // answered after 500 ms: forty subscriptions take about 10 s.
    let (app, endpoints) = slow_pushes(1000, 2, 40, Duration::from_millis(500)).await;

    app.submit_valid_feedback("Ann", "hello").await;

    // Past one hold, with deliveries still to send: none has a claim that lapsed, which
    // another run would take over and send as well.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let sending = || Entity::find().filter(Column::Status.eq(SENDING));
    let waiting = sending().count(&app.db).await.expect("count");
    let lapsed = sending().filter(Column::LeaseUntil.lt(shared::queries::now())).count(&app.db).await.expect("count");
    assert!(waiting > 0, "the fan-out is still sending");
    assert_eq!(lapsed, 0, "{lapsed} of the {waiting} claims still being sent lapsed");

    // And every subscription gets its push, once.
    assert_eq!(app.push.wait_for_received(40, Duration::from_secs(20)).await.len(), 40);
    assert_one_push_each(&app, &endpoints);
}
