//! The HTML feedback form: validation, CSRF, limits, honeypot.

use reqwest::StatusCode;
use sea_orm::EntityTrait;
use tidings_tests::harness::{Options, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_valid_submission_redirects_to_thanks_and_is_stored() {
    let app = spawn_app().await;

    let response = app.submit_valid_feedback("Ann", "The form works").await;

    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/feedback/thanks");
    assert_eq!(app.feedback_count().await, 1);
}

#[tokio::test]
async fn each_invalid_field_gets_a_422_with_its_message_and_the_input_kept() {
    let app = spawn_app().await;
    let long_name = "n".repeat(201);
    let long_content = "c".repeat(5001);
    let cases = [
        ("submitter_name", "", "Name is required"),
        ("submitter_name", long_name.as_str(), "Name must be at most 200 characters"),
        ("submitter_email", "not-an-email", "Email is not a valid email address"),
        ("submitter_email", "", "Email is required"),
        ("content", "   ", "Message is required"),
        ("content", long_content.as_str(), "Message must be at most 5000 characters"),
    ];
    for (field, value, message) in cases {
        let mut fields =
            vec![("submitter_name", "Ann"), ("submitter_email", "ann@example.com"), ("content", "Kept content")];
        for f in &mut fields {
            if f.0 == field {
                f.1 = value;
            }
        }

        let response = app.post_feedback(&fields).await;

        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{field}={value:?}");
        let html = response.text().await.expect("body");
        assert!(html.contains(message), "{field}: expected {message:?}");
        if field != "content" {
            assert!(html.contains("Kept content"), "the visitor's input is kept");
        }
    }
    assert_eq!(app.feedback_count().await, 0, "nothing invalid is stored");
}

#[tokio::test]
async fn user_input_is_escaped_when_the_form_is_re_rendered() {
    let app = spawn_app().await;

    let response = app
        .post_feedback(&[("submitter_name", "<script>alert(1)</script>"), ("submitter_email", "bad"), ("content", "x")])
        .await;

    let html = response.text().await.expect("body");
    assert!(!html.contains("<script>alert(1)</script>"));
    assert!(html.contains("&lt;script&gt;") || html.contains("&#60;script&#62;"), "the name is shown escaped");
}

#[tokio::test]
async fn extra_fields_are_ignored_and_never_stored() {
    let app = spawn_app().await;

    let response = app
        .post_feedback(&[
            ("submitter_name", "Ann"),
            ("submitter_email", "ann@example.com"),
            ("content", "Hello"),
            ("id", "999"),
            ("handled_at", "2020-01-01T00:00:00Z"),
            ("read_at", "2020-01-01T00:00:00Z"),
        ])
        .await;

    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let stored = shared::entities::feedback_message::Entity::find().all(&app.db).await.expect("query");
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0].id, 999);
    assert!(stored[0].handled_at.is_none() && stored[0].read_at.is_none());
}

#[tokio::test]
async fn a_missing_or_forged_csrf_token_is_refused_with_403() {
    let app = spawn_app().await;
    let _ = app.form_token().await;

    for token in ["", "forged-token"] {
        let response = app
            .client
            .post(format!("{}/feedback", app.address))
            .form(&[("csrf_token", token), ("submitter_name", "A"), ("submitter_email", "a@b.co"), ("content", "x")])
            .send()
            .await
            .expect("POST");

        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(response.text().await.expect("body").contains("reload the page"));
    }
    assert_eq!(app.feedback_count().await, 0);
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let app = spawn_app().await;
    let huge = "x".repeat(200_000);

    let response =
        app.post_feedback(&[("submitter_name", "A"), ("submitter_email", "a@b.co"), ("content", &huge)]).await;

    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.feedback_count().await, 0);
}

#[tokio::test]
async fn submissions_over_the_rate_limit_get_429_with_retry_after() {
    let app =
        spawn_app_with(Options { env: vec![("SUBMIT_RATE_LIMIT".into(), "2".into())], ..Options::default() }).await;

    for _ in 0..2 {
        assert_eq!(app.submit_valid_feedback("Ann", "hi").await.status(), StatusCode::SEE_OTHER);
    }
    let response = app.submit_valid_feedback("Ann", "one too many").await;

    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=60).contains(&retry_after));
    assert_eq!(app.feedback_count().await, 2);
}

#[tokio::test]
async fn a_filled_honeypot_pretends_success_but_stores_nothing() {
    let app = spawn_app().await;

    let response = app
        .post_feedback(&[
            ("submitter_name", "Bot"),
            ("submitter_email", "bot@example.com"),
            ("content", "spam"),
            ("website", "http://spam.example"),
        ])
        .await;

    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(app.feedback_count().await, 0);
}

#[tokio::test]
async fn security_headers_are_on_pages_and_on_errors() {
    let app = spawn_app().await;

    for path in ["/feedback", "/no-such-page"] {
        let response = app.client.get(format!("{}{path}", app.address)).send().await.expect("GET");
        let headers = response.headers();
        assert!(
            headers["content-security-policy"].to_str().expect("ascii").contains("frame-ancestors 'none'"),
            "{path}"
        );
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["referrer-policy"], "same-origin", "{path}");
    }
}
