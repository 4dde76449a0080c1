//! The admin's Queues page: figures, workers, charts, and dead letters settled by hand.

use std::time::Duration;

use reqwest::StatusCode;
use shared::jobs::FAN_OUT_QUEUE;
use shared::queue::{DeadLetter, JobQueue};
use tidings_tests::harness::{TEST_PASSWORD, new_client, spawn_app};

use crate::pipeline::wait_until;

#[tokio::test]
async fn the_queues_page_shows_the_job_system_and_settles_dead_letters() {
    let app = spawn_app().await;
    app.subscribe_browser().await;
    app.submit_valid_feedback("Ann", "one job").await;
    app.push.wait_for_received(1, Duration::from_secs(15)).await;
    let queue = JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let letter = |payload: &str| DeadLetter {
        id: String::new(),
        queue: FAN_OUT_QUEUE.into(),
        payload: payload.into(),
        error: "malformed payload: expected value".into(),
        attempt: 1,
        at: "2026-11-24T10:00:00Z".into(),
    };
    let first = queue.dead_letter(&letter("garbage one")).await.expect("stored");
    let second = queue.dead_letter(&letter("garbage two")).await.expect("stored");
    let later =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs())
            .expect("fits")
            + 3600;
    let digest = shared::jobs::Digest::new(later - 60, later, 6);
    queue.schedule_digest(&digest, Some("req-queues-page")).await.expect("scheduled");
    app.create_admin_with_email("ops@tidings.test").await;
    let client = new_client();
    app.login(&client, "ops@tidings.test", TEST_PASSWORD).await;

    let shows_worker_and_job = wait_until(|| async {
        let html =
            client.get(format!("{}/admin/queues", app.address)).send().await.expect("page").text().await.expect("html");
        html.contains("<td>2</td>") && html.contains("1 succeeded")
    })
    .await;
    assert!(shows_worker_and_job, "the worker (concurrency 2) and the finished job are shown");
    let html =
        client.get(format!("{}/admin/queues", app.address)).send().await.expect("page").text().await.expect("html");
    assert!(html.contains("<svg") && html.contains("Jobs per minute"));
    assert!(html.contains("wait in the queue") && html.contains("ms</title>"), "the latency chart has points");
    assert!(html.contains("<td>digest</td>") && html.contains("<code>req-queues-page</code>"), "waiting jobs listed");
    assert!(html.contains("s from now</td>\n      <td>1</td>"), "with their attempt number");
    assert!(html.contains("malformed payload: expected value"));
    let token =
        tidings_tests::harness::extract_attribute(&html, "<meta name=\"csrf-token\" content=\"").expect("token");

    let discard = client
        .post(format!("{}/admin/queues/dead/{first}/discard", app.address))
        .form(&[("csrf_token", token.as_str())])
        .send()
        .await
        .expect("discard");
    let forged = client
        .post(format!("{}/admin/queues/dead/{second}/discard", app.address))
        .form(&[("csrf_token", "forged")])
        .send()
        .await
        .expect("forged");
    let retry = client
        .post(format!("{}/admin/queues/dead/{second}/retry", app.address))
        .form(&[("csrf_token", token.as_str())])
        .send()
        .await
        .expect("retry");

    assert_eq!(discard.status(), StatusCode::SEE_OTHER);
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert_eq!(retry.status(), StatusCode::SEE_OTHER);
    // The retried garbage fails again and comes back as a new letter; the discarded one is gone.
    assert!(wait_until(|| async { queue.dead_letter_count().await.expect("count") == 1 }).await);
    let letters = queue.dead_letters(10).await.expect("letters");
    assert_eq!(letters[0].payload, "garbage two");
    assert_ne!(letters[0].id, second);
}
