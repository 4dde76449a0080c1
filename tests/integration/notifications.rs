//! The notifications panel, the admin service worker and the hashed static assets.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE};
use tidings_tests::harness::{TEST_PASSWORD, TestApp, extract_attribute, new_client, spawn_app};

async fn logged_in(app: &TestApp, email: &str) -> reqwest::Client {
    app.create_admin_with_email(email).await;
    let client = new_client();
    assert_eq!(app.login(&client, email, TEST_PASSWORD).await.status(), StatusCode::SEE_OTHER);
    client
}

async fn page(app: &TestApp, client: &reqwest::Client) -> String {
    let response = client.get(format!("{}/admin/notifications", app.address)).send().await.expect("page");
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("body")
}

#[tokio::test]
async fn the_panel_explains_first_and_lists_this_admins_devices() {
    let app = spawn_app().await;
    let client = logged_in(&app, "ada@tidings.test").await;
    let token = app.admin_csrf_token(&client).await;
    let browser = app.push.new_subscription();
    client
        .post(format!("{}/admin/push/subscribe", app.address))
        .header("X-CSRF-Token", &token)
        .header("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0")
        .json(&browser.to_json())
        .send()
        .await
        .expect("subscribed");

    let html = page(&app, &client).await;

    assert!(html.contains("Nothing is asked of your"), "the panel explains before it asks");
    assert!(html.contains("data-push-toggle"));
    assert_eq!(
        extract_attribute(&html, "<meta name=\"vapid-public-key\" content=\"").as_deref(),
        app.settings.push.vapid_public_key.as_deref()
    );
    assert!(html.contains("Firefox on Linux"));
    assert!(html.contains("Send test notification"));
    assert!(!html.contains(&browser.endpoint), "endpoints are not shown");
}

#[tokio::test]
async fn a_test_notification_goes_through_the_queue_to_this_admins_devices_only() {
    let app = spawn_app().await;
    let client = logged_in(&app, "ada@tidings.test").await;
    let token = app.admin_csrf_token(&client).await;
    let mine = app.push.new_subscription();
    app.post_push(&client, "subscribe", Some(&token), &mine.to_json()).await;
    let someone_elses = app.subscribe_browser().await;

    let response = client
        .post(format!("{}/admin/notifications/test", app.address))
        .form(&[("csrf_token", token.as_str())])
        .send()
        .await
        .expect("test");

    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let received = app.push.wait_for_received(1, Duration::from_secs(15)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, mine.endpoint);
    assert_eq!(received[0].json()["title"], "Test notification");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.push.received().iter().all(|p| p.endpoint != someone_elses.endpoint));
    let location = response.headers()["location"].to_str().expect("ascii").to_owned();
    let notice =
        client.get(format!("{}{location}", app.address)).send().await.expect("page").text().await.expect("body");
    assert!(notice.contains("on its way"));
}

#[tokio::test]
async fn a_device_can_only_be_removed_by_its_owner() {
    let app = spawn_app().await;
    let ada = logged_in(&app, "ada@tidings.test").await;
    let bob = logged_in(&app, "bob@tidings.test").await;
    let ada_token = app.admin_csrf_token(&ada).await;
    let bob_token = app.admin_csrf_token(&bob).await;
    let browser = app.push.new_subscription();
    app.post_push(&ada, "subscribe", Some(&ada_token), &browser.to_json()).await;
    let id = extract_attribute(&page(&app, &ada).await, "name=\"id\" value=\"").expect("a remove button");
    let remove = |client: &reqwest::Client, token: &str| {
        client
            .post(format!("{}/admin/notifications/remove", app.address))
            .form(&[("csrf_token", token.to_owned()), ("id", id.clone())])
            .send()
    };

    assert_eq!(remove(&bob, &bob_token).await.expect("sent").status(), StatusCode::SEE_OTHER);
    assert_eq!(shared::queries::subscription::count(&app.db).await.expect("count"), 1);
    assert_eq!(remove(&ada, "forged").await.expect("sent").status(), StatusCode::FORBIDDEN);
    assert_eq!(shared::queries::subscription::count(&app.db).await.expect("count"), 1);
    assert_eq!(remove(&ada, &ada_token).await.expect("sent").status(), StatusCode::SEE_OTHER);
    assert_eq!(shared::queries::subscription::count(&app.db).await.expect("count"), 0);
}

#[tokio::test]
async fn the_admin_service_worker_is_served_fresh_with_push_and_click_handlers() {
    let app = spawn_app().await;

    let response = new_client().get(format!("{}/admin/sw.js", app.address)).send().await.expect("sw");

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[CACHE_CONTROL], "no-cache");
    assert!(response.headers()[CONTENT_TYPE].to_str().expect("ascii").starts_with("text/javascript"));
    let js = response.text().await.expect("body");
    for needle in ["addEventListener('push'", "showNotification", "addEventListener('notificationclick'", "openWindow"]
    {
        assert!(js.contains(needle), "{needle}");
    }
    assert!(js.contains("const ICON_URL = \"/static/icon-192."));
}

#[tokio::test]
async fn assets_are_served_under_hashed_names_and_cached_forever() {
    let app = spawn_app().await;
    let client = new_client();
    let html = client.get(format!("{}/feedback", app.address)).send().await.expect("form").text().await.expect("body");
    let css = extract_attribute(&html, "<link rel=\"stylesheet\" href=\"").expect("a stylesheet link");
    assert!(css.starts_with("/static/app.") && css.ends_with(".css") && css.len() > "/static/app.css".len(), "{css}");

    let hashed = client.get(format!("{}{css}", app.address)).send().await.expect("css");
    let unhashed = client.get(format!("{}/static/app.css", app.address)).send().await.expect("css");

    assert_eq!(hashed.status(), StatusCode::OK);
    assert_eq!(hashed.headers()[CACHE_CONTROL], "public, max-age=31536000, immutable");
    assert!(hashed.headers()[CONTENT_TYPE].to_str().expect("ascii").starts_with("text/css"));
    assert_eq!(unhashed.status(), StatusCode::NOT_FOUND, "no unhashed copy can be served stale");
}
