//! The admin area: login, sessions, the inbox, and subscribing browsers.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, LOCATION, SET_COOKIE};
use tidings_tests::harness::{TEST_PASSWORD, TestApp, new_client, spawn_app};

const ADMIN: &str = "ada@tidings.test";

/// An app with admin `ADMIN` and a client logged in as them.
async fn logged_in() -> (TestApp, reqwest::Client) {
    let app = spawn_app().await;
    app.create_admin_with_email(ADMIN).await;
    let client = new_client();
    let response = app.login(&client, ADMIN, TEST_PASSWORD).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    (app, client)
}

async fn subscription_count(app: &TestApp) -> u64 {
    shared::queries::subscription::count(&app.db).await.expect("count")
}

#[tokio::test]
async fn a_correct_login_opens_a_session_in_an_http_only_cookie() {
    let app = spawn_app().await;
    app.create_admin_with_email(ADMIN).await;
    let client = new_client();

    let response = app.login(&client, ADMIN, TEST_PASSWORD).await;

    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/admin/");
    let cookie = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("tidings-session="))
        .expect("a session cookie")
        .to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    let inbox = client.get(format!("{}/admin/", app.address)).send().await.expect("inbox");
    assert_eq!(inbox.status(), StatusCode::OK);
    assert_eq!(inbox.headers()[CACHE_CONTROL], "no-store");
}

#[tokio::test]
async fn wrong_passwords_and_unknown_accounts_get_the_same_answer() {
    let app = spawn_app().await;
    app.create_admin_with_email(ADMIN).await;

    let wrong = app.login(&new_client(), ADMIN, "not the password at all").await;
    let unknown = app.login(&new_client(), "nobody@tidings.test", TEST_PASSWORD).await;

    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    let wrong = wrong.text().await.expect("body");
    let unknown = unknown.text().await.expect("body");
    assert!(wrong.contains("Email or password is incorrect."));
    assert!(unknown.contains("Email or password is incorrect."));
}

#[tokio::test]
async fn repeated_failures_throttle_the_account_with_a_clear_429() {
    let app = spawn_app().await;
    app.create_admin_with_email(ADMIN).await;
    for _ in 0..5 {
        let response = app.login(&new_client(), ADMIN, "wrong password, again").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }

    // Even the right password waits now: the account is throttled.
    let response = app.login(&new_client(), ADMIN, TEST_PASSWORD).await;

    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = response.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!(wait > 0 && wait <= 15 * 60);
    assert!(response.text().await.expect("body").contains("try again"));
}

#[tokio::test]
async fn admin_pages_need_a_login() {
    let app = spawn_app().await;
    let client = new_client();

    let inbox = client.get(format!("{}/admin/", app.address)).send().await.expect("inbox");
    let detail = client.get(format!("{}/admin/feedback/1", app.address)).send().await.expect("detail");
    let subscribe = app.post_push(&client, "subscribe", None, &serde_json::json!({})).await;

    assert_eq!(inbox.status(), StatusCode::SEE_OTHER);
    assert_eq!(inbox.headers()[LOCATION], "/admin/login");
    assert_eq!(detail.status(), StatusCode::SEE_OTHER);
    assert_eq!(subscribe.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = subscribe.json().await.expect("JSON error");
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn the_inbox_and_detail_show_feedback_escaped() {
    let (app, client) = logged_in().await;
    app.submit_valid_feedback("<script>alert(1)</script>", "<b>bold</b> & more").await;
    let id = shared::queries::feedback::page(&app.db, 0, 1).await.expect("query")[0].id;

    let inbox = client.get(format!("{}/admin/", app.address)).send().await.expect("inbox");
    let inbox = inbox.text().await.expect("body");
    let detail = client.get(format!("{}/admin/feedback/{id}", app.address)).send().await.expect("detail");
    assert_eq!(detail.headers()[CACHE_CONTROL], "no-store");
    let detail = detail.text().await.expect("body");
    let missing = client.get(format!("{}/admin/feedback/999999", app.address)).send().await.expect("missing");

    assert!(inbox.contains("1 unread"), "the new message counts as unread");
    for page in [&inbox, &detail] {
        assert!(!page.contains("<script>alert(1)</script>"));
        assert!(page.contains("&#60;script&#62;") || page.contains("&lt;script&gt;"));
    }
    assert!(detail.contains("<meta name=\"csrf-token\" content=\""));
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let after = client.get(format!("{}/admin/", app.address)).send().await.expect("inbox").text().await.expect("body");
    assert!(after.contains("0 unread"), "opening it marked it read");
}

#[tokio::test]
async fn a_subscribed_browser_gets_the_next_feedback() {
    let (app, client) = logged_in().await;
    let token = app.admin_csrf_token(&client).await;
    let browser = app.push.new_subscription();

    let response = app.post_push(&client, "subscribe", Some(&token), &browser.to_json()).await;

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(subscription_count(&app).await, 1);
    app.submit_valid_feedback("Ann", "through the admin's own subscription").await;
    let received = app.push.wait_for_received(1, Duration::from_secs(15)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, browser.endpoint);
    // Subscribing the same browser again updates it in place.
    let again = app.post_push(&client, "subscribe", Some(&token), &browser.to_json()).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(subscription_count(&app).await, 1);
}

#[tokio::test]
async fn subscribing_needs_the_csrf_header_and_the_same_origin() {
    let (app, client) = logged_in().await;
    let token = app.admin_csrf_token(&client).await;
    let browser = app.push.new_subscription();

    let no_token = app.post_push(&client, "subscribe", None, &browser.to_json()).await;
    let forged = app.post_push(&client, "subscribe", Some("forged"), &browser.to_json()).await;
    let cross_site = client
        .post(format!("{}/admin/push/subscribe", app.address))
        .header("X-CSRF-Token", &token)
        .header("Origin", "https://evil.example")
        .json(&browser.to_json())
        .send()
        .await
        .expect("sent");

    for response in [no_token, forged, cross_site] {
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(subscription_count(&app).await, 0);
}

#[tokio::test]
async fn bad_subscriptions_get_a_clear_error_per_field_and_store_nothing() {
    let (app, client) = logged_in().await;
    let token = app.admin_csrf_token(&client).await;
    let good = app.push.new_subscription();
    let cases = [
        (
            serde_json::json!({"endpoint": "https://evil.example/push/1", "keys": {"p256dh": good.p256dh, "auth": good.auth}}),
            "endpoint",
        ),
        (serde_json::json!({"endpoint": good.endpoint, "keys": {"p256dh": "AAAA", "auth": good.auth}}), "keys.p256dh"),
        (serde_json::json!({"endpoint": good.endpoint, "keys": {"p256dh": good.p256dh, "auth": "short"}}), "keys.auth"),
        (serde_json::json!({"endpoint": good.endpoint}), "keys.p256dh"),
    ];

    for (body, field) in cases {
        let response = app.post_push(&client, "subscribe", Some(&token), &body).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let errors: serde_json::Value = response.json().await.expect("JSON");
        assert!(errors["errors"][field].is_array(), "{field} in {errors}");
    }
    let malformed = client
        .post(format!("{}/admin/push/subscribe", app.address))
        .header("X-CSRF-Token", &token)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let error: serde_json::Value = malformed.json().await.expect("JSON");
    assert!(error["error"].as_str().is_some_and(|e| e.contains("not valid JSON")));
    assert_eq!(subscription_count(&app).await, 0);
}

#[tokio::test]
async fn only_the_owner_can_remove_a_subscription() {
    let (app, owner) = logged_in().await;
    let owner_token = app.admin_csrf_token(&owner).await;
    let browser = app.push.new_subscription();
    app.post_push(&owner, "subscribe", Some(&owner_token), &browser.to_json()).await;
    app.create_admin_with_email("bob@tidings.test").await;
    let other = new_client();
    app.login(&other, "bob@tidings.test", TEST_PASSWORD).await;
    let other_token = app.admin_csrf_token(&other).await;
    let body = serde_json::json!({ "endpoint": browser.endpoint });

    let by_other = app.post_push(&other, "unsubscribe", Some(&other_token), &body).await;
    assert_eq!(by_other.status(), StatusCode::NO_CONTENT);
    assert_eq!(subscription_count(&app).await, 1, "another admin cannot remove it");

    let by_owner = app.post_push(&owner, "unsubscribe", Some(&owner_token), &body).await;
    assert_eq!(by_owner.status(), StatusCode::NO_CONTENT);
    assert_eq!(subscription_count(&app).await, 0);
}

#[tokio::test]
async fn logout_destroys_the_session_on_the_server() {
    let (app, _client) = logged_in().await;
    // Keep a copy of the session cookie, as a thief would.
    let stolen = new_client();
    let login_cookie = {
        let other = new_client();
        let response = app.login(&other, ADMIN, TEST_PASSWORD).await;
        let cookie = response
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with("tidings-session="))
            .expect("cookie")
            .split(';')
            .next()
            .expect("name=value")
            .to_owned();
        let logout_token = app.admin_csrf_token(&other).await;
        let works =
            stolen.get(format!("{}/admin/", app.address)).header("Cookie", &cookie).send().await.expect("inbox");
        assert_eq!(works.status(), StatusCode::OK, "the copied cookie works while logged in");
        let response = other
            .post(format!("{}/admin/logout", app.address))
            .form(&[("csrf_token", logout_token.as_str())])
            .send()
            .await
            .expect("logout");
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        cookie
    };

    let replay =
        stolen.get(format!("{}/admin/", app.address)).header("Cookie", &login_cookie).send().await.expect("inbox");

    assert_eq!(replay.status(), StatusCode::SEE_OTHER, "the session is gone on the server");
}

#[tokio::test]
async fn a_cross_site_login_or_logout_is_refused() {
    let app = spawn_app().await;
    app.create_admin_with_email(ADMIN).await;
    let client = new_client();
    let html =
        client.get(format!("{}/admin/login", app.address)).send().await.expect("form").text().await.expect("html");
    let token = tidings_tests::harness::extract_attribute(&html, "name=\"csrf_token\" value=\"").expect("token");

    let login = client
        .post(format!("{}/admin/login", app.address))
        .header("Origin", "https://evil.example")
        .form(&[("csrf_token", token.as_str()), ("email", ADMIN), ("password", TEST_PASSWORD)])
        .send()
        .await
        .expect("login");
    let fetch_site = client
        .post(format!("{}/admin/login", app.address))
        .header("Sec-Fetch-Site", "cross-site")
        .form(&[("csrf_token", token.as_str()), ("email", ADMIN), ("password", TEST_PASSWORD)])
        .send()
        .await
        .expect("login");

    assert_eq!(login.status(), StatusCode::FORBIDDEN);
    assert_eq!(fetch_site.status(), StatusCode::FORBIDDEN);
    let inbox = client.get(format!("{}/admin/", app.address)).send().await.expect("inbox");
    assert_eq!(inbox.status(), StatusCode::SEE_OTHER, "no session was opened");
}

#[tokio::test]
async fn messages_can_be_marked_handled_and_deleted() {
    let (app, client) = logged_in().await;
    app.submit_valid_feedback("Ann", "please handle me").await;
    let id = shared::queries::feedback::page(&app.db, 0, 1).await.expect("query")[0].id;
    let token = app.admin_csrf_token(&client).await;
    let post = |path: String, form: Vec<(&'static str, String)>| {
        client.post(format!("{}{path}", app.address)).form(&form).send()
    };

    let forged =
        post(format!("/admin/feedback/{id}/handled"), vec![("csrf_token", "x".into()), ("handled", "true".into())]);
    assert_eq!(forged.await.expect("sent").status(), StatusCode::FORBIDDEN);
    let handled =
        post(format!("/admin/feedback/{id}/handled"), vec![("csrf_token", token.clone()), ("handled", "true".into())]);
    assert_eq!(handled.await.expect("sent").status(), StatusCode::SEE_OTHER);
    let row = shared::queries::feedback::find(&app.db, id).await.expect("query").expect("still there");
    assert!(row.handled_at.is_some());
    let inbox = client.get(format!("{}/admin/", app.address)).send().await.expect("inbox").text().await.expect("html");
    assert!(inbox.contains("handled"));

    let deleted = post(format!("/admin/feedback/{id}/delete"), vec![("csrf_token", token.clone())]);
    assert_eq!(deleted.await.expect("sent").status(), StatusCode::SEE_OTHER);
    assert!(shared::queries::feedback::find(&app.db, id).await.expect("query").is_none());
    let detail = client.get(format!("{}/admin/feedback/{id}", app.address)).send().await.expect("detail");
    assert_eq!(detail.status(), StatusCode::NOT_FOUND);
    let again = post(format!("/admin/feedback/{id}/delete"), vec![("csrf_token", token)]);
    assert_eq!(again.await.expect("sent").status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
    use tidings_tests::harness::{Options, spawn_app_with};
    // Without a trusted proxy, X-Forwarded-For is ignored: one client is one address.
    let app =
        spawn_app_with(Options { env: vec![("SUBMIT_RATE_LIMIT".into(), "2".into())], ..Options::default() }).await;
    for i in 0..2 {
        let response = app
            .post_api_feedback(&serde_json::json!({"submitter_name": "Ann", "submitter_email": "a@example.com", "content": format!("{i}")}))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let spoofed = app
        .client
        .post(format!("{}/api/feedback", app.address))
        .header("X-Forwarded-For", "203.0.113.9")
        .json(&serde_json::json!({"submitter_name": "Ann", "submitter_email": "a@example.com", "content": "x"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(spoofed.status(), StatusCode::TOO_MANY_REQUESTS, "a client cannot pick its own address");

    // Behind a trusted proxy (here: this machine), each forwarded client has its own limit.
    let proxied = spawn_app_with(Options {
        env: vec![("SUBMIT_RATE_LIMIT".into(), "2".into()), ("TRUSTED_PROXIES".into(), "127.0.0.1".into())],
        ..Options::default()
    })
    .await;
    for client_ip in ["203.0.113.1", "203.0.113.1", "203.0.113.2", "203.0.113.2"] {
        let response = proxied
            .client
            .post(format!("{}/api/feedback", proxied.address))
            .header("X-Forwarded-For", client_ip)
            .json(&serde_json::json!({"submitter_name": "Ann", "submitter_email": "a@example.com", "content": "x"}))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::CREATED, "{client_ip}");
    }
}

#[tokio::test]
async fn the_inbox_pages_by_keyset_newest_first() {
    use tidings_tests::harness::{Options, extract_attribute, spawn_app_with};
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    for i in 0..120 {
        let feedback =
            shared::domain::NewFeedback::parse(&format!("Visitor {i:03}"), "v@example.com", "hello").expect("valid");
        shared::queries::feedback::insert_with_dispatch(&app.db, &feedback).await.expect("stored");
    }
    app.create_admin_with_email(ADMIN).await;
    let client = new_client();
    app.login(&client, ADMIN, TEST_PASSWORD).await;
    let get = |path: String| {
        let client = client.clone();
        let base = app.address.clone();
        async move { client.get(format!("{base}{path}")).send().await.expect("page").text().await.expect("html") }
    };
    let names = |html: &str| html.matches("<strong>Visitor ").count();

    let first = get("/admin/".into()).await;
    assert_eq!(names(&first), 50);
    assert!(first.contains("Visitor 119") && !first.contains("Visitor 069"));
    assert!(!first.contains(">Newer<"));
    let older = extract_attribute(&first, "<a href=\"/admin/?before=").expect("an Older link");
    let second = get(format!("/admin/?before={older}")).await;
    assert_eq!(names(&second), 50);
    assert!(second.contains("Visitor 069") && second.contains("Visitor 020"));
    let older = extract_attribute(&second, "<a href=\"/admin/?before=").expect("an Older link");
    let last = get(format!("/admin/?before={older}")).await;
    assert_eq!(names(&last), 20);
    assert!(last.contains("Visitor 000") && !last.contains(">Older<"));
    let newer = extract_attribute(&last, "<a href=\"/admin/?after=").expect("a Newer link");
    let back = get(format!("/admin/?after={newer}")).await;
    assert_eq!(names(&back), 50);
    assert!(back.contains("Visitor 069") && back.contains("Visitor 020"), "back to the second page");
}
