//! Uniqueness: a job key (or a periodic task) runs at most once at a time across
//! workers, and a lock whose owner died expires.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sea_orm::EntityTrait;
use shared::jobs::FanOut;
use shared::queue::JobQueue;
use tidings_tests::harness::{Options, TestApp, spawn_app_with};

use crate::pipeline::wait_until;

async fn queue(app: &TestApp) -> JobQueue {
    JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis")
}

#[tokio::test]
async fn a_lock_has_one_owner_is_renewed_while_held_and_expires_when_its_owner_dies() {
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let conn = queue(&app).await.connection();
    let ns = app.settings.redis_namespace.clone();
    let ttl = Duration::from_millis(600);

    // One owner at a time, kept past its TTL by renewal, free once released.
    let held = shared::lock::try_acquire(&conn, &ns, "trim", ttl).await.expect("redis").expect("free");
    assert!(shared::lock::try_acquire(&conn, &ns, "trim", ttl).await.expect("redis").is_none());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(shared::lock::try_acquire(&conn, &ns, "trim", ttl).await.expect("redis").is_none(), "renewed");
    assert!(held.release().await.expect("redis"));
    let again = shared::lock::try_acquire(&conn, &ns, "trim", ttl).await.expect("redis");
    assert!(again.is_some(), "free after release");
    drop(again);

    // An owner that died (it set the lock, then nothing renewed it): the lock expires.
    let mut raw = conn.clone();
    let key = shared::lock::lock_key(&ns, "digest");
    let _: () =
        redis::cmd("SET").arg(&key).arg("dead-owner").arg("PX").arg(500).query_async(&mut raw).await.expect("set");
    assert!(shared::lock::try_acquire(&conn, &ns, "digest", ttl).await.expect("redis").is_none());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(shared::lock::try_acquire(&conn, &ns, "digest", ttl).await.expect("redis").is_some(), "stale lock gone");
}

#[tokio::test]
async fn two_copies_of_a_fan_out_never_run_at_the_same_time() {
    // Arrange: a slow push keeps the first copy running; both copies are queued before
    // the worker (concurrency 2) starts, so it fetches them together.
    let mut app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let browser = app.subscribe_browser().await;
    app.push.set_delay(Duration::from_millis(1200));
    app.submit_valid_feedback("Ann", "one message, two jobs").await;
    let queue = queue(&app).await;
    assert!(wait_until(|| async { queue.backlog().await.expect("backlog") == 1 }).await);
    let dispatch = shared::entities::dispatch::Entity::find().one(&app.db).await.expect("query").expect("dispatch");
    let copy = FanOut::new(dispatch.feedback_id, dispatch.id);
    queue.enqueue_fan_out(copy, 99, None).await.expect("second copy queued");
    assert_eq!(queue.backlog().await.expect("backlog"), 2);

    // Act
    app.start_worker().await;

    // Assert: the second copy was put back while the first ran, then both finished,
    // and the browser got one push.
    let both_done = wait_until(|| async {
        app.worker_metrics().await.contains("tidings_jobs_total{kind=\"fan_out\",outcome=\"succeeded\"} 2")
    })
    .await;
    let text = app.worker_metrics().await;
    assert!(both_done, "{text}");
    assert!(text.contains("tidings_jobs_deferred_total{kind=\"fan_out\"}"), "the copy waited its turn: {text}");
    let received = app.push.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, browser.endpoint);
}

#[tokio::test]
async fn a_periodic_run_that_outlasts_its_interval_never_overlaps_the_next() {
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let conn = queue(&app).await.connection();
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let (stop_tx, _) = tokio::sync::watch::channel(false);

    // Two "processes" share the schedule; each run takes 3.5 ticks.
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let periodic = worker::queue::Periodic::new(conn.clone(), &app.settings.redis_namespace);
        let (running, most, runs) = (Arc::clone(&running), Arc::clone(&most), Arc::clone(&runs));
        let mut stop = stop_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            periodic
                .every("slow", Duration::from_millis(100), stopped, move || {
                    let (running, most, runs) = (Arc::clone(&running), Arc::clone(&most), Arc::clone(&runs));
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(350)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        runs.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .await;
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    for task in tasks {
        task.await.expect("joined");
    }

    assert_eq!(most.load(Ordering::SeqCst), 1, "never two runs at once");
    assert!(runs.load(Ordering::SeqCst) >= 3, "the schedule went on: {} runs", runs.load(Ordering::SeqCst));
}
