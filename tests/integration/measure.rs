//! Measurements, not tests: run on demand, they print figures and assert nothing about
//! speed. `cargo nextest run -p tidings-tests --run-ignored only measure`
//! (add `--release` for release-build figures; the benchmark tool covers the rest).

use std::time::{Duration, Instant};

use tidings_tests::harness::{Options, spawn_app_with};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Submit → push received, one message at a time, with an idle worker between them.
#[tokio::test]
#[ignore = "a measurement; run on demand"]
async fn measure_submit_to_push_latency() {
    let app = spawn_app_with(Options::default()).await;
    app.subscribe_browser().await;
    let mut latencies = Vec::new();
    for i in 0..200 {
        let token = app.form_token().await;
        let started = Instant::now();
        let response = app
            .client
            .post(format!("{}/feedback", app.address))
            .form(&[
                ("csrf_token", token.as_str()),
                ("submitter_name", "Ann"),
                ("submitter_email", "ann@example.com"),
                ("content", "measuring"),
            ])
            .send()
            .await
            .expect("submitted");
        assert!(response.status().is_redirection());
        let received = app.push.wait_for_received(i + 1, Duration::from_secs(10)).await;
        let arrived = received.last().expect("a push").at;
        latencies.push(arrived.saturating_duration_since(started));
        // Let the worker go idle again, so each message measures a cold pickup.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort();
    println!(
        "submit -> push, {} messages: p50 {:?}, p95 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.95),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
}
