//! The in-process mode: jobs run in the request, with the worker's own code, and no
//! Redis at all (the app is pointed at a port where nothing listens).

use tidings_tests::harness::{Options, spawn_app_with};

fn no_redis() -> Options {
    Options { immediate: true, env: vec![("REDIS_URL".into(), "redis://127.0.0.1:9/0".into())], ..Options::default() }
}

#[tokio::test]
async fn a_submission_is_pushed_before_the_response_without_redis() {
    let app = spawn_app_with(no_redis()).await;
    let browser = app.subscribe_browser().await;

    let response = app.submit_valid_feedback("Ann", "no queue needed").await;

    // The push was sent, checked and decrypted by the stand-in before the answer came.
    assert_eq!(response.status(), 303);
    let received = app.push.received();
    assert_eq!(received.len(), 1, "the job ran in the request");
    assert_eq!(received[0].endpoint, browser.endpoint);
    assert!(received[0].json()["body"].as_str().is_some_and(|b| b.contains("no queue needed")));
    let deliveries = shared::queries::delivery::of_feedback(&app.db, 1).await.expect("query");
    assert_eq!(deliveries.len(), 1, "recorded like a worker records it");
    assert_eq!(shared::queries::dispatch::outstanding(&app.db).await.expect("count"), 0, "the dispatch is settled");
}

#[tokio::test]
async fn a_gone_subscription_is_deleted_in_process_too() {
    let app = spawn_app_with(no_redis()).await;
    let gone = app.subscribe_browser().await;
    app.push.script(&gone.endpoint, vec![tidings_tests::push_service::Scripted::Status(410)]);

    let response = app
        .post_api_feedback(
            &serde_json::json!({"submitter_name": "Ann", "submitter_email": "a@example.com", "content": "x"}),
        )
        .await;

    assert_eq!(response.status(), 201);
    assert!(app.push.received().is_empty());
    let left = shared::queries::subscription::ids_after(&app.db, 0, 10).await.expect("query");
    assert!(left.is_empty(), "the 410 deleted the subscription before the response");
}
