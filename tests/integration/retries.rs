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
