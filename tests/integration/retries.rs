//! Job-level retries: the worker, not apalis-redis, decides when a failed job runs again
//! (the kind's policy: attempts, exponential backoff with jitter, cap, `Retry-After`)
//! and dead-letters it after its last attempt.

use std::time::Duration;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use shared::entities::push_subscription;
use shared::jobs::TestPush;
use shared::queue::JobQueue;
use tidings_tests::harness::{Options, TestApp, spawn_app_with};
use tidings_tests::push_service::Scripted;

use crate::pipeline::wait_until;

async fn app_with_policy(policy: &str) -> TestApp {
    spawn_app_with(Options { env: vec![("JOB_RETRY_TEST_PUSH".into(), policy.into())], ..Options::default() }).await
}

async fn queue(app: &TestApp) -> JobQueue {
    JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis")
}

async fn subscription_id(app: &TestApp, endpoint: &str) -> i64 {
    push_subscription::Entity::find()
        .filter(push_subscription::Column::Endpoint.eq(endpoint))
        .one(&app.db)
        .await
        .expect("query")
        .expect("stored")
        .id
}

fn attempts_at(app: &TestApp, endpoint: &str) -> Vec<tidings_tests::push_service::Attempt> {
    app.push.attempts().into_iter().filter(|a| a.endpoint == endpoint).collect()
}

#[tokio::test]
async fn a_failed_job_is_retried_for_what_failed_only_honouring_retry_after_and_shows_its_attempt() {
    // Arrange: one admin, two devices; one device's push service is briefly down.
    let app = app_with_policy("4/200/3000").await;
    let admin = app.create_admin().await;
    let flaky = app.subscribe_device(admin).await;
    let healthy = app.subscribe_device(admin).await;
    app.push.script(&flaky.endpoint, vec![Scripted::RetryAfter { status: 503, seconds: 2 }, Scripted::Status(500)]);

    // Act
    queue(&app).await.enqueue_test_push(&TestPush::new(admin), Some("req-retry-1")).await.expect("queued");

    // Assert: while the retry waits, status shows it as attempt 2 of the same request.
    let shown = wait_until(|| async {
        let status = worker::status::read(&app.settings).await.expect("status");
        status
            .retries
            .iter()
            .any(|j| j.failed_attempts == 1 && j.kind == "test_push" && j.request_id.as_deref() == Some("req-retry-1"))
    })
    .await;
    assert!(shown, "the waiting retry is listed with its attempt number and request id");
    // Each device ends with exactly one notification…
    let received = app.push.wait_for_received(2, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.push.received().iter().filter(|p| p.endpoint == flaky.endpoint).count(), 1);
    // …the healthy one was not sent again, the flaky one took three attempts…
    assert_eq!(attempts_at(&app, &healthy.endpoint).len(), 1, "only what failed is retried");
    let flaky_attempts = attempts_at(&app, &flaky.endpoint);
    assert_eq!(flaky_attempts.len(), 3);
    // …the first retry waited for Retry-After, the second only for the backoff.
    let first_wait = flaky_attempts[1].at - flaky_attempts[0].at;
    assert!(first_wait >= Duration::from_millis(1900), "Retry-After: 2 honoured, waited {first_wait:?}");
    assert!(queue(&app).await.dead_letters(10).await.expect("list").is_empty());
}

#[tokio::test]
async fn a_job_that_keeps_failing_is_dead_lettered_after_its_last_attempt_with_what_is_left() {
    // Arrange
    let app = app_with_policy("2/200/200").await;
    let admin = app.create_admin().await;
    let down = app.subscribe_device(admin).await;
    let healthy = app.subscribe_device(admin).await;
    app.push.script(&down.endpoint, vec![Scripted::Status(502); 5]);

    // Act
    queue(&app).await.enqueue_test_push(&TestPush::new(admin), None).await.expect("queued");

    // Assert: after two attempts (the policy's limit) the job is a dead letter that
    // carries only the device still owed its push.
    assert!(wait_until(|| async { queue(&app).await.dead_letter_count().await.expect("count") == 1 }).await);
    let letter = queue(&app).await.dead_letters(1).await.expect("list").remove(0);
    assert_eq!(letter.attempt, 2);
    assert!(letter.error.contains("gave up after 2 attempts"), "{}", letter.error);
    let down_id = subscription_id(&app, &down.endpoint).await;
    let rest: serde_json::Value = serde_json::from_str(&letter.payload).expect("json");
    assert_eq!(rest["only"], serde_json::json!([down_id]), "{}", letter.payload);
    assert_eq!(attempts_at(&app, &down.endpoint).len(), 2);
    assert_eq!(attempts_at(&app, &healthy.endpoint).len(), 1);
}

#[tokio::test]
async fn a_permanent_refusal_is_not_retried() {
    let app = app_with_policy("5/200/200").await;
    let admin = app.create_admin().await;
    let refused = app.subscribe_device(admin).await;
    app.push.script(&refused.endpoint, vec![Scripted::Status(400)]);

    queue(&app).await.enqueue_test_push(&TestPush::new(admin), None).await.expect("queued");

    assert!(wait_until(|| async { !attempts_at(&app, &refused.endpoint).is_empty() }).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(attempts_at(&app, &refused.endpoint).len(), 1, "a 4xx is not retried");
    let status = worker::status::read(&app.settings).await.expect("status");
    assert!(status.retries.is_empty() && status.scheduled == 0);
}

#[tokio::test]
async fn a_fan_out_waiting_for_its_retry_is_not_taken_for_lost_by_the_relay() {
    use sea_orm::ConnectionTrait;
    // Arrange: a fan-out fails as a whole while its database is broken (the table of
    // deliveries renamed away), and is retried after at least 250 ms.
    let app =
        spawn_app_with(Options { env: vec![("JOB_RETRY_FAN_OUT".into(), "10/500/500".into())], ..Options::default() })
            .await;
    app.subscribe_browser().await;
    app.db.execute_unprepared("ALTER TABLE deliveries RENAME TO deliveries_away").await.expect("renamed");

    // Act: a submission; its fan-out fails, and fails again at its first retry.
    let answer = app.submit_valid_feedback("Ann", "while the database is broken").await;
    assert!(answer.status().is_redirection(), "{}", answer.status());
    let retried_twice = wait_until(|| async {
        queue(&app).await.waiting_jobs(10).await.expect("waiting").iter().any(|job| job.failed_attempts >= 2)
    })
    .await;
    assert!(retried_twice, "the fan-out failed twice and waits for its third attempt");

    // Assert: the record shows the job enqueued when a retry was scheduled, not when the
    // web first enqueued it (each retry restarts the relay's count towards "lost", so a
    // job retrying for longer than that is not enqueued a second time beside it).
    let record =
        || async { shared::entities::dispatch::Entity::find().one(&app.db).await.expect("query").expect("the record") };
    let touched = wait_until(|| async {
        let record = record().await;
        record.enqueued_at.is_some_and(|at| at - record.created_at >= chrono::Duration::milliseconds(200))
    })
    .await;
    let record = record().await;
    assert!(
        touched,
        "enqueued at {:?}, created at {}: the retries did not touch it",
        record.enqueued_at, record.created_at
    );
    assert_eq!(record.enqueue_count, 1, "the relay's key is left as the web's mark made it");
}
