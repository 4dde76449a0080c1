//! `queue`: the job queue's own throughput. N `ping` jobs (they do nothing) are fed into
//! Redis as fast as the backlog bound lets them — a burst of N arriving at once — and the
//! worker processes drain them; completions are sampled every 100 ms. The same Redis's
//! `redis-benchmark -t lpush,rpop` figure, taken in the same run, is the ceiling the
//! result is compared with.

use std::time::{Duration, Instant};

use shared::queue::JobQueue;

use crate::plot::{Chart, Series};
use crate::report::Report;

/// Settings of the run: finished records are kept (the done set is how completions are
/// counted) and the trim stays out of the way.
pub const ENV: [(&str, &str); 3] =
    [("JOB_RETENTION_COUNT", "10000000"), ("TRIM_INTERVAL_MS", "3600000"), ("QUEUE_MAX_BACKLOG", "5000")];

/// Jobs pushed per script call.
const BATCH: usize = 1000;

/// `redis-benchmark -t lpush,rpop` against `redis_url`: requests per second of each.
async fn ceiling(redis_url: &str) -> anyhow::Result<(f64, f64)> {
    let rest = redis_url.trim_start_matches("redis://");
    let address = rest.split(['/', '@']).next().unwrap_or("127.0.0.1:6379");
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "6379"));
    let output = tokio::process::Command::new("redis-benchmark")
        .args(["-h", host, "-p", port, "-t", "lpush,rpop", "-n", "200000", "-q"])
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "redis-benchmark failed");
    let text = String::from_utf8_lossy(&output.stdout).replace('\r', "\n");
    let rate = |name: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(name))
            .filter_map(|r| r.split_whitespace().next()?.parse::<f64>().ok())
            .next_back()
            .unwrap_or(0.0)
    };
    // It leaves its list behind.
    let mut conn = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("DEL").arg("mylist").query_async(&mut conn).await?;
    Ok((rate("LPUSH:"), rate("RPOP:")))
}

/// Runs the scenario.
pub async fn run(redis_url: &str, namespace: &str, jobs: u64, report: &mut Report) -> anyhow::Result<()> {
    let (lpush, rpop) = ceiling(redis_url).await?;
    let queue = JobQueue::connect(redis_url, namespace).await?;
    let payload = serde_json::to_vec(&shared::jobs::Ping::new())?;
    let started = Instant::now();
    let mut fed = 0u64;
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut last_sample = Instant::now();
    let mut done = 0u64;
    let deadline = Duration::from_secs(600);
    while done < jobs && started.elapsed() < deadline {
        if fed < jobs && queue.backlog().await? + (BATCH as u64) < 5000 {
            let n = (jobs - fed).min(BATCH as u64) as usize;
            queue.enqueue_many(vec![payload.clone(); n]).await?;
            fed += n as u64;
            continue;
        }
        if last_sample.elapsed() >= Duration::from_millis(100) || fed == jobs {
            done = queue.done_count().await?;
            samples.push((started.elapsed().as_secs_f64(), done as f64));
            last_sample = Instant::now();
            crate::procs::progress_count(started.elapsed(), done as usize, jobs as usize, "jobs done");
        }
        tokio::time::sleep(Duration::from_millis(if fed == jobs { 20 } else { 2 })).await;
    }
    eprintln!();
    let seconds =
        samples.iter().rev().find(|(_, d)| *d as u64 >= jobs).map_or(started.elapsed().as_secs_f64(), |s| s.0);
    let rate = done as f64 / seconds.max(0.001);
    report.figure("jobs_done", done as f64);
    report.figure("seconds", seconds);
    report.figure("jobs_per_second", rate);
    report.figure("redis_lpush_per_second", lpush);
    report.figure("redis_rpop_per_second", rpop);
    report.figure("ratio_to_redis_ceiling", rate / lpush.min(rpop).max(1.0));
    // Throughput per second of the run.
    let per_second: Vec<(f64, f64)> =
        samples.windows(2).map(|w| (w[1].0, (w[1].1 - w[0].1) / (w[1].0 - w[0].0).max(0.001))).collect();
    report.series("jobs_done", &samples);
    report.series("jobs_per_second", &per_second);
    Chart {
        title: &format!("{jobs} ping jobs fed in as a burst: throughput"),
        x_label: "seconds",
        y_label: "jobs per second",
        series: vec![Series { name: "jobs/s (100 ms samples)", points: &per_second }],
        limit: Some(("target 10,000/s", 10_000.0)),
    }
    .save(&report.artefact("throughput.svg")?)?;
    Ok(())
}
