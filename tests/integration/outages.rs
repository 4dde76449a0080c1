//! Outages: Redis down at submit time, database down, a transaction that fails midway.

use std::time::Duration;

use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, Database, EntityTrait, PaginatorTrait};
use tidings_tests::harness::{Backend, Options, postgres_server_url, spawn_app_with};
use tidings_tests::redis_server::RedisServer;

#[tokio::test]
async fn feedback_submitted_while_redis_is_down_is_delivered_after_it_returns() {
    // Arrange: the app runs on a Redis of its own, which then goes down.
    let mut redis = RedisServer::start().await.expect("redis-server starts");
    // The worker runs two fetch loops: both die with Redis and are rebuilt on their own.
    let app = spawn_app_with(Options {
        env: vec![("REDIS_URL".into(), redis.url())],
        worker_concurrency: 16,
        ..Options::default()
    })
    .await;
    app.subscribe_browser().await;
    let client = redis::Client::open(redis.url().as_str()).expect("url");
    let mut conn = client.get_connection_manager().await.expect("redis");
    let report = || {
        let mut conn = conn.clone();
        let namespace = app.settings.redis_namespace.clone();
        async move { shared::worker_health::read_all(&mut conn, &namespace).await.unwrap_or_default() }
    };
    assert!(crate::pipeline::wait_until(|| async { report().await.len() == 1 }).await, "the worker reports itself");
    let before: Vec<String> = report().await[0].worker.split(',').map(str::to_owned).collect();
    assert_eq!(before.len(), 2, "two fetch loops: {before:?}");
    redis.stop();

    // Act
    let response = app.submit_valid_feedback("Ann", "sent during an outage").await;

    // Assert: the visitor is answered at once and nothing is lost.
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(app.feedback_count().await, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(app.push.received().is_empty());
    redis.restart().await.expect("redis-server restarts");
    let received = app.push.wait_for_received(1, Duration::from_secs(30)).await;
    assert_eq!(received.len(), 1, "the relay delivered it once Redis was back");
    assert_eq!(received[0].json()["body"], "sent during an outage");
    // Both loops' workers died with Redis and were rebuilt under new names, and the
    // process says so.
    let restarted = crate::pipeline::wait_until(|| async {
        let reports = report().await;
        reports.len() == 1
            && reports[0].restarts >= 2
            && reports[0].state == "running"
            && reports[0].worker.split(',').filter(|name| !before.iter().any(|b| b == name)).count() == 2
    })
    .await;
    assert!(restarted, "{:?}", shared::worker_health::read_all(&mut conn, &app.settings.redis_namespace).await);
}

#[tokio::test]
async fn the_database_going_down_gives_a_503_page_and_the_app_recovers_by_itself() {
    let app = spawn_app_with(Options { backend: Backend::Postgres, ..Options::default() }).await;
    assert_eq!(app.submit_valid_feedback("Ann", "before").await.status(), StatusCode::SEE_OTHER);
    let name = database_name(&app.settings.database_url);
    let server = Database::connect(postgres_server_url()).await.expect("server");
    set_connections_allowed(&server, &name, false).await;

    let token = app.form_token().await;
    let response = app
        .client
        .post(format!("{}/feedback", app.address))
        .form(&[
            ("csrf_token", token.as_str()),
            ("submitter_name", "Ann"),
            ("submitter_email", "a@example.com"),
            ("content", "during"),
        ])
        .send()
        .await
        .expect("POST");

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let page = response.text().await.expect("body");
    assert!(page.contains("briefly unavailable"), "a clear page");
    assert!(!page.to_lowercase().contains("error returned from database"), "no internal error text");
    set_connections_allowed(&server, &name, true).await;
    let mut recovered = false;
    for _ in 0..50 {
        if app.submit_valid_feedback("Ann", "after").await.status() == StatusCode::SEE_OTHER {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "the app recovers without a restart");
}

fn database_name(url: &str) -> String {
    url.rsplit('/').next().expect("a database name").to_owned()
}

async fn set_connections_allowed(server: &sea_orm::DatabaseConnection, name: &str, allowed: bool) {
    server
        .execute_unprepared(&format!("ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {allowed}"))
        .await
        .expect("alter database");
    if !allowed {
        server
            .execute_unprepared(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            ))
            .await
            .expect("terminate backends");
    }
}

#[tokio::test]
async fn a_submission_whose_transaction_fails_is_not_stored_and_never_enqueued() {
    // Arrange: make the dispatch insert (the second statement of the transaction) fail.
    let app = spawn_app_with(Options { backend: Backend::Postgres, ..Options::default() }).await;
    app.subscribe_browser().await;
    app.db
        .execute_unprepared(
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql;
             CREATE TRIGGER refuse_dispatch BEFORE INSERT ON dispatches FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .await
        .expect("trigger");

    // Act
    let response = app.submit_valid_feedback("Ann", "rolled back").await;

    // Assert
    assert!(response.status().is_server_error());
    assert_eq!(app.feedback_count().await, 0, "the feedback row was rolled back");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(app.push.attempts().is_empty(), "no job ran");
    let queued = queue_length(&app).await;
    assert_eq!(queued, 0, "nothing was enqueued");
    let dispatches = shared::entities::dispatch::Entity::find().count(&app.db).await.expect("count");
    assert_eq!(dispatches, 0);
}

/// Jobs of any state the app's namespace holds in Redis.
async fn queue_length(app: &tidings_tests::harness::TestApp) -> usize {
    let client = redis::Client::open(app.settings.redis_url.as_str()).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{}*", app.settings.redis_namespace))
        .query_async(&mut conn)
        .await
        .expect("keys");
    let mut jobs = 0;
    for key in keys.iter().filter(|k| k.contains("meta:") || k.ends_with(":data")) {
        let _ = key;
        jobs += 1;
    }
    jobs
}
