//! Prometheus `/metrics` on the web and on the worker.

use std::time::Duration;

use tidings_tests::harness::{Options, spawn_app_with};
use tidings_tests::push_service::Scripted;

use crate::pipeline::wait_until;

#[tokio::test]
async fn web_and_worker_count_submissions_jobs_and_pushes_by_outcome() {
    let app = spawn_app_with(Options::default()).await;
    app.subscribe_browser().await;
    let gone = app.subscribe_browser().await;
    app.push.script(&gone.endpoint, vec![Scripted::Status(410)]);

    app.submit_valid_feedback("Ann", "counted").await;
    app.post_api_feedback(&serde_json::json!({"submitter_name": "", "submitter_email": "x", "content": ""})).await;
    app.push.wait_for_received(1, Duration::from_secs(15)).await;
    let worker_counted = wait_until(|| async {
        app.worker_metrics().await.contains("tidings_jobs_total{kind=\"fan_out\",outcome=\"succeeded\"} 1")
    })
    .await;
    assert!(worker_counted);
    let worker = app.worker_metrics().await;
    assert!(worker.contains("tidings_pushes_total{outcome=\"delivered\"} 1"), "{worker}");
    assert!(worker.contains("tidings_pushes_total{outcome=\"gone\"} 1"), "{worker}");
    assert!(worker.contains("# TYPE tidings_push_duration_seconds histogram"), "{worker}");
    assert!(worker.contains("tidings_queue_backlog 0"), "{worker}");
    assert!(
        worker.contains("# TYPE tidings_log_lines_dropped_total counter\ntidings_log_lines_dropped_total 0\n"),
        "{worker}"
    );
    assert!(worker.contains("tidings_jobs_started_total{kind=\"fan_out\"} 1"), "{worker}");
    assert!(worker.contains("tidings_job_queue_wait_seconds_count{kind=\"fan_out\"} 1"), "{worker}");
    assert!(worker.contains("tidings_job_duration_seconds_count{kind=\"fan_out\"} 1"), "{worker}");
    let web = app.client.get(format!("{}/metrics", app.address)).send().await.expect("web metrics");
    assert!(web.headers()["content-type"].to_str().expect("ascii").starts_with("text/plain"));
    let web = web.text().await.expect("text");
    assert!(web.contains("tidings_feedback_total{channel=\"form\",outcome=\"accepted\"} 1"), "{web}");
    assert!(web.contains("tidings_feedback_total{channel=\"api\",outcome=\"invalid\"} 1"), "{web}");
    assert!(web.contains("tidings_dispatch_total{outcome=\"enqueued\"} 1"), "{web}");
    assert!(web.contains("tidings_jobs_enqueued_total{kind=\"fan_out\"} 1"), "{web}");
    assert!(web.contains("tidings_worker_processes 1"), "{web}");
    assert!(
        web.contains("# TYPE tidings_log_lines_dropped_total counter\ntidings_log_lines_dropped_total 0\n"),
        "{web}"
    );
}
