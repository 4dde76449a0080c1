//! `POST /api/feedback` and the OpenAPI document.

use reqwest::StatusCode;
use serde_json::json;
use tidings_tests::harness::spawn_app;

#[tokio::test]
async fn a_valid_json_submission_gets_201_with_its_id() {
    let app = spawn_app().await;

    let response = app
        .post_api_feedback(
            &json!({"submitter_name": "Ann", "submitter_email": "ann@example.com", "content": "Hi", "admin": true}),
        )
        .await;

    assert_eq!(response.status(), StatusCode::CREATED);
    let body: serde_json::Value = response.json().await.expect("json");
    assert!(body["id"].as_i64().is_some_and(|id| id > 0));
    assert_eq!(app.feedback_count().await, 1);
}

#[tokio::test]
async fn invalid_fields_get_422_with_errors_per_field() {
    let app = spawn_app().await;

    let response = app.post_api_feedback(&json!({"submitter_name": "", "submitter_email": "nope"})).await;

    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["errors"]["submitter_name"][0], "is required");
    assert_eq!(body["errors"]["submitter_email"][0], "is not a valid email address");
    assert_eq!(body["errors"]["content"][0], "is required");
    assert_eq!(app.feedback_count().await, 0);
}

#[tokio::test]
async fn malformed_json_gets_a_clear_400() {
    let app = spawn_app().await;

    let response = app
        .client
        .post(format!("{}/api/feedback", app.address))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("POST");

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.expect("errors are JSON on the API");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(app.feedback_count().await, 0);
}

#[tokio::test]
async fn the_openapi_document_describes_the_feedback_endpoint() {
    let app = spawn_app().await;

    let response = app.client.get(format!("{}/api/openapi.json", app.address)).send().await.expect("GET");

    assert_eq!(response.status(), StatusCode::OK);
    let spec: serde_json::Value = response.json().await.expect("json");
    assert!(spec["paths"]["/feedback"]["post"].is_object());
    assert!(spec["servers"][0]["url"].as_str().is_some_and(|u| u.ends_with("/api")));
}
