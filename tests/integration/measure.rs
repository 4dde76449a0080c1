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

/// Jobs per second through real worker processes draining a burst of dispatch records
/// (no subscriptions: the job's own database and Redis work only). Knobs:
/// `MEASURE_JOBS` (20000), `MEASURE_PROCESSES` (1), `MEASURE_CONCURRENCY` (16).
#[tokio::test]
#[ignore = "a measurement; run on demand"]
async fn measure_burst_throughput() {
    let knob = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (jobs, processes, concurrency) =
        (knob("MEASURE_JOBS", 20_000), knob("MEASURE_PROCESSES", 1), knob("MEASURE_CONCURRENCY", 16));
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    app.insert_burst(jobs).await;
    let mut env = app.env.clone();
    env.insert("RELAY_INTERVAL_MS".into(), "100".into());
    env.insert("WORKER_METRICS_BIND".into(), "off".into());
    env.insert("RUST_LOG".into(), "warn".into());
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..processes {
        workers.push(
            tokio::process::Command::new(env!("CARGO_BIN_EXE_worker-process"))
                .args(["run", "--concurrency", &concurrency.to_string()])
                .envs(&env)
                .kill_on_drop(true)
                .spawn()
                .expect("worker starts"),
        );
    }
    while shared::queries::dispatch::outstanding(&app.db).await.expect("count") > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    println!(
        "{jobs} jobs, {processes} process(es) x {concurrency}: {:.1} s, {:.0} jobs/s",
        took.as_secs_f64(),
        jobs as f64 / took.as_secs_f64()
    );
}
