//! The whole path: form -> commit -> Redis -> worker -> encrypted push, on both databases.

use std::time::Duration;

use reqwest::StatusCode;
use tidings_tests::harness::{Backend, Options, TestApp, spawn_app_with};

const WAIT: Duration = Duration::from_secs(15);

async fn a_submission_notifies_every_subscribed_browser(backend: Backend) {
    // Arrange
    let app = spawn_app_with(Options { backend, ..Options::default() }).await;
    let first = app.subscribe_browser().await;
    let second = app.subscribe_browser().await;

    // Act
    let response = app.submit_valid_feedback("Ann", "The checkout page is broken").await;

    // Assert
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let received = app.push.wait_for_received(2, WAIT).await;
    assert_eq!(received.len(), 2, "one push per subscription");
    let feedback_id = only_feedback_id(&app).await;
    for browser in [&first, &second] {
        let push = received.iter().find(|p| p.endpoint == browser.endpoint).expect("this browser got a push");
        let payload = push.json();
        assert_eq!(payload["title"], "Ann:");
        assert_eq!(payload["body"], "The checkout page is broken");
        assert_eq!(payload["url"], format!("{}/admin/feedback/{feedback_id}", app.address));
        assert_eq!(push.ttl, 3600);
        assert_eq!(push.urgency.as_deref(), Some("high"));
        assert_eq!(push.topic.as_deref(), Some(format!("feedback{feedback_id}").as_str()));
        assert_eq!(push.vapid_subject, "mailto:ops@tidings.test");
    }
}

async fn only_feedback_id(app: &TestApp) -> i64 {
    use sea_orm::EntityTrait;
    let rows = shared::entities::feedback_message::Entity::find().all(&app.db).await.expect("query");
    assert_eq!(rows.len(), 1);
    rows[0].id
}

#[tokio::test]
async fn a_submission_notifies_every_subscribed_browser_on_postgres() {
    a_submission_notifies_every_subscribed_browser(Backend::Postgres).await;
}

#[tokio::test]
async fn a_submission_notifies_every_subscribed_browser_on_sqlite() {
    a_submission_notifies_every_subscribed_browser(Backend::Sqlite).await;
}

#[tokio::test]
async fn long_content_is_cut_to_120_characters_with_an_ellipsis() {
    let app = spawn_app_with(Options::default()).await;
    app.subscribe_browser().await;
    let content = "é".repeat(300);

    app.submit_valid_feedback("Ann", &content).await;

    let received = app.push.wait_for_received(1, WAIT).await;
    assert_eq!(received[0].json()["body"], format!("{}…", "é".repeat(120)));
}

#[tokio::test]
async fn an_api_submission_notifies_too() {
    let app = spawn_app_with(Options::default()).await;
    app.subscribe_browser().await;

    let response = app
        .post_api_feedback(
            &serde_json::json!({"submitter_name": "Bo", "submitter_email": "bo@example.com", "content": "Via API"}),
        )
        .await;

    assert_eq!(response.status(), StatusCode::CREATED);
    let received = app.push.wait_for_received(1, WAIT).await;
    assert_eq!(received[0].json()["title"], "Bo:");
}

#[tokio::test]
async fn every_delivery_is_recorded_and_the_dispatch_completed() {
    let app = spawn_app_with(Options::default()).await;
    app.subscribe_browser().await;
    app.submit_valid_feedback("Ann", "hi").await;
    app.push.wait_for_received(1, WAIT).await;
    let feedback_id = only_feedback_id(&app).await;

    let outstanding =
        wait_until(|| async { shared::queries::dispatch::outstanding(&app.db).await.expect("query") == 0 }).await;

    assert!(outstanding, "the dispatch record is completed");
    let deliveries = shared::queries::delivery::of_feedback(&app.db, feedback_id).await.expect("query");
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].status, "sent");
}

/// Polls `check` for up to 15 s.
pub async fn wait_until<F, Fut>(check: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
