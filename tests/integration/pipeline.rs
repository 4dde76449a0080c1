//! The whole path: form -> commit -> Redis -> worker -> encrypted push, on both databases.

use std::time::Duration;

use reqwest::StatusCode;
use sea_orm::TransactionTrait;
use tidings_tests::harness::{Backend, Options, TestApp, spawn_app_with, store_unannounced};

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
    wait_until_for(WAIT, check).await
}

/// Polls `check` for up to `limit`.
pub async fn wait_until_for<F, Fut>(limit: Duration, check: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_burst_becomes_one_digest_notification_while_a_single_message_goes_out_at_once() {
    let app = spawn_app_with(Options {
        env: vec![("NOTIFY_BURST_THRESHOLD".into(), "2".into()), ("NOTIFY_BURST_WINDOW_SECS".into(), "3".into())],
        ..Options::default()
    })
    .await;
    app.subscribe_browser().await;
    // Start the burst just after a window opens, so it does not straddle two windows.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(3000 - now_ms % 3000 + 100)).await;

    // A burst of 7 messages, sent as fast as possible.
    for i in 0..7 {
        let body = serde_json::json!({"submitter_name": format!("Visitor {i}"), "submitter_email": "v@example.com", "content": format!("message {i}")});
        assert_eq!(app.post_api_feedback(&body).await.status(), StatusCode::CREATED);
    }

    // Every message is announced exactly once: on its own (the first ones of a window) or
    // counted in its window's digest, sent shortly after the window ends.
    let announced = || {
        let received = app.push.received();
        let single =
            received.iter().filter(|p| p.json()["title"].as_str().is_some_and(|t| t.starts_with("Visitor"))).count();
        let digests: Vec<u64> = received
            .iter()
            .filter_map(|p| {
                p.json()["title"]
                    .as_str()
                    .and_then(|t| t.trim_end_matches('s').strip_suffix(" new feedback message")?.parse().ok())
            })
            .collect();
        (single, digests)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let (single, digests) = announced();
        if single as u64 + digests.iter().sum::<u64>() >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (single, digests) = announced();
    assert_eq!(single as u64 + digests.iter().sum::<u64>(), 7, "single {single}, digests {digests:?}");
    assert!(!digests.is_empty(), "the burst was folded into a digest");
    assert!(single <= 4, "at most the threshold per window went out one by one ({single})");
    assert!(app.push.received().len() <= 6, "far fewer pushes than messages");
    let digest = app
        .push
        .received()
        .into_iter()
        .find(|p| p.json()["title"].as_str().is_some_and(|t| t.contains(" new feedback message")))
        .expect("a digest");
    assert_eq!(digest.json()["url"], format!("{}/admin/", app.address));
    assert!(digest.json()["body"].as_str().is_some_and(|b| b.starts_with("Latest from Visitor")));

    // A single message after the burst goes out at once, on its own.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = app.push.received().len();
    app.submit_valid_feedback("Solo", "just me").await;
    let received = app.push.wait_for_received(before + 1, Duration::from_secs(5)).await;
    assert_eq!(received.last().map(|p| p.json()["title"].clone()), Some(serde_json::json!("Solo:")));
}

#[tokio::test]
async fn a_scheduled_job_survives_a_worker_restart() {
    // Arrange: one message more than a window announces one by one, whose runs have all
    // folded (their dispatch records completed), and the digest of their window scheduled
    // to run 3 s from now.
    let mut app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    app.subscribe_browser().await;
    let window_end = shared::queries::now().timestamp() + 3 - shared::queue::DIGEST_DELAY_SECS;
    let created_at = chrono::DateTime::from_timestamp(window_end - 1, 0).expect("a time");
    for _ in 0..=app.settings.worker.burst_threshold {
        let (_, record) = store_unannounced(&app.db, created_at, "Ann").await;
        shared::queries::dispatch::mark_completed(&app.db, record).await.expect("completed");
    }
    let queue =
        shared::queue::JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let job = shared::jobs::Digest::new(window_end - 60, window_end, app.settings.worker.burst_threshold);
    queue.schedule_digest(&job, None).await.expect("scheduled");

    // Act: a worker starts and stops before it is due; another starts after.
    app.start_worker().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.stop_worker();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let digest = |app: &tidings_tests::harness::TestApp| {
        app.push.received().iter().any(|p| p.json()["title"].as_str().is_some_and(|t| t.contains("new feedback")))
    };
    assert!(!digest(&app), "nothing ran it before it was due or while no worker was up");
    app.start_worker().await;

    // Assert: the new worker runs the scheduled job.
    assert!(wait_until(|| async { digest(&app) }).await, "the scheduled digest ran after the restart");
}

#[tokio::test]
async fn a_message_that_commits_after_its_windows_digest_read_the_window_goes_out_alone_on_postgres() {
    a_message_that_commits_after_its_windows_digest_read_the_window_goes_out_alone(Backend::Postgres).await;
}

#[tokio::test]
async fn a_message_that_commits_after_its_windows_digest_read_the_window_goes_out_alone_on_sqlite() {
    a_message_that_commits_after_its_windows_digest_read_the_window_goes_out_alone(Backend::Sqlite).await;
}

async fn a_message_that_commits_after_its_windows_digest_read_the_window_goes_out_alone(backend: Backend) {
    // Windows of a minute; the first two messages of a window go out alone.
    let app = spawn_app_with(Options {
        backend,
        env: vec![("NOTIFY_BURST_THRESHOLD".into(), "2".into()), ("NOTIFY_BURST_WINDOW_SECS".into(), "60".into())],
        ..Options::default()
    })
    .await;
    app.subscribe_browser().await;
    let titles =
        || app.push.received().iter().map(|p| p.json()["title"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>();

    // Four messages of a window that ended over a minute ago, so its digest is due as soon
    // as one of them folds: two go out alone, two are counted in the digest.
    let start = (shared::queries::now().timestamp() / 60 - 2) * 60;
    let at = |secs: i64| chrono::DateTime::from_timestamp(start + secs, 0).expect("a time");
    // In one transaction, so the relay enqueues all four at once.
    let burst = app.db.begin().await.expect("begin");
    for n in 0..4 {
        store_unannounced(&burst, at(n + 1), &format!("Visitor {n}")).await;
    }
    burst.commit().await.expect("commit");
    assert_eq!(app.push.wait_for_received(3, Duration::from_secs(20)).await.len(), 3);
    let mut announced = titles();
    announced.sort();
    assert_eq!(announced, ["2 new feedback messages", "Visitor 0:", "Visitor 1:"]);

    // A fifth message of that window commits only now (its statement was held up): the
    // digest read the window before it existed, so it goes out alone, once.
    store_unannounced(&app.db, at(30), "Visitor 4").await;
    let received = app.push.wait_for_received(4, Duration::from_secs(15)).await;
    assert_eq!(received.len(), 4, "the late message was announced: {:?}", titles());
    assert_eq!(titles().last().map(String::as_str), Some("Visitor 4:"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.push.received().len(), 4, "and nothing else: {:?}", titles());
}
