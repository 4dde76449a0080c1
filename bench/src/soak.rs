//! `soak`: N submissions at R per second with one subscription, while an admin browses
//! the inbox (filling the read cache), sampling Redis every second: `used_memory` and the
//! namespace's key count. It shows that what Tidings keeps in Redis stays within its
//! budgets under sustained load (the trim, per tick and on demand) and that every
//! message was pushed exactly once. The curves are written as SVG beside the JSON.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;
use tidings_tests::push_service::PushService;

use crate::plot::{Chart, Series};
use crate::report::Report;

/// Settings of the soak: budgets small enough that the trim has work to do.
pub const ENV: [(&str, &str); 5] = [
    ("JOB_RETENTION_COUNT", "5000"),
    ("CACHE_MAX_ENTRIES", "500"),
    ("CACHE_MAX_BYTES", "4194304"),
    ("TRIM_INTERVAL_MS", "5000"),
    ("QUEUE_MAX_BACKLOG", "5000"),
];

/// What the budgets above allow in keys: finished job records and their idempotency keys,
/// the backlog's records, cache entries, and a margin for the fixed structures
/// (queues, locks, per-minute stats, the session) and the jobs that finish between two
/// trims.
pub fn key_budget() -> f64 {
    let setting = |name: &str| ENV.iter().find(|(k, _)| *k == name).and_then(|(_, v)| v.parse::<f64>().ok());
    2.0 * setting("JOB_RETENTION_COUNT").unwrap_or(0.0)
        + 2.0 * setting("QUEUE_MAX_BACKLOG").unwrap_or(0.0)
        + setting("CACHE_MAX_ENTRIES").unwrap_or(0.0)
        + 1000.0
}

/// One sample: seconds since the start, used_memory (MiB), the namespace's keys, and
/// submissions accepted and pushes received so far.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    used_mib: f64,
    keys: f64,
    accepted: f64,
    received: f64,
}

async fn key_count(conn: &mut redis::aio::MultiplexedConnection, namespace: &str) -> anyhow::Result<f64> {
    let mut scan = shared::redis_usage::KeyScan::new(namespace);
    let mut count = 0usize;
    while let Some(keys) = scan.next(conn).await? {
        count += keys.len();
    }
    Ok(count as f64)
}

/// Runs the scenario.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    db: &DatabaseConnection,
    address: &str,
    push: &PushService,
    redis_url: &str,
    namespace: &str,
    submissions: u64,
    rate: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let admin_client = crate::admin::logged_in_client(db, address).await?;
    let admin = shared::queries::admin::find_by_email(
        db,
        &shared::domain::EmailAddress::parse("bench@tidings.test").map_err(|e| anyhow::anyhow!("{e}"))?,
    )
    .await?
    .map(|a| a.id)
    .unwrap_or_default();
    crate::subscribe(db, push, &push.new_subscription(), admin).await?;
    let redis = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
    let baseline_mib = crate::procs::redis_used_memory_mib(redis_url).await;

    let accepted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let samples: Arc<std::sync::Mutex<Vec<Sample>>> = Arc::default();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (samples, sampling, accepted, namespace, redis_url) = (
            Arc::clone(&samples),
            Arc::clone(&sampling),
            Arc::clone(&accepted),
            namespace.to_owned(),
            redis_url.to_owned(),
        );
        let mut redis = redis.clone();
        let received = push.received_counter();
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let sample = Sample {
                    at: started.elapsed().as_secs_f64(),
                    used_mib: crate::procs::redis_used_memory_mib(&redis_url).await,
                    keys: key_count(&mut redis, &namespace).await.unwrap_or(0.0),
                    accepted: accepted.load(Ordering::Relaxed) as f64,
                    received: received() as f64,
                };
                if let Ok(mut samples) = samples.lock() {
                    samples.push(sample);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    // An admin browsing while the load runs: pages and messages all over the inbox.
    let reader = {
        let (address, accepted) = (address.to_owned(), Arc::clone(&accepted));
        tokio::spawn(async move {
            let mut i: u64 = 0;
            loop {
                i += 1;
                let newest = accepted.load(Ordering::Relaxed).max(1);
                let id = (i.wrapping_mul(7919) % newest) + 1;
                let path =
                    if i.is_multiple_of(2) { format!("/admin/?before={id}") } else { format!("/admin/feedback/{id}") };
                let _ = admin_client.get(format!("{address}{path}")).send().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Open-loop submissions at `rate`, from 32 browsers.
    let browsers = Arc::new(crate::browser::Browsers::open(address, 32).await?);
    let load = Duration::from_secs_f64(submissions as f64 / rate.max(1) as f64);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
    let rejected = Arc::new(AtomicU64::new(0));
    for i in 0..submissions {
        ticker.tick().await;
        let permit = Arc::clone(&in_flight).acquire_owned().await?;
        let (browsers, ok, refused) = (Arc::clone(&browsers), Arc::clone(&accepted), Arc::clone(&rejected));
        tokio::spawn(async move {
            if browsers.post_form(&format!("soak {i}")).await.accepted {
                ok.fetch_add(1, Ordering::Relaxed);
            } else {
                refused.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
        if i % rate.max(1) == 0 {
            crate::procs::progress(
                started.elapsed(),
                load,
                &format!("{} accepted, {} pushed", accepted.load(Ordering::Relaxed), push.received_count()),
            );
        }
    }
    let _ = in_flight.acquire_many(64).await?;
    let load_seconds = started.elapsed().as_secs_f64();
    let expected = usize::try_from(accepted.load(Ordering::Relaxed)).unwrap_or(0);
    eprintln!("\nload done in {load_seconds:.0} s; waiting for the pushes…");
    let drain = Instant::now();
    while push.received_count() < expected && drain.elapsed() < Duration::from_secs(900) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        crate::procs::progress(drain.elapsed(), Duration::from_secs(900), &format!("{} pushed", push.received_count()));
    }
    let drained_seconds = started.elapsed().as_secs_f64();
    // A minute more: trims run, retention applies, the curve settles.
    eprintln!("\nall in; sampling one more minute…");
    tokio::time::sleep(Duration::from_secs(60)).await;
    reader.abort();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();

    let received = push.received();
    let mut seen: HashMap<String, u32> = HashMap::new();
    for push in &received {
        *seen.entry(push.json()["body"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
    }
    let peak = |f: fn(&Sample) -> f64| samples.iter().map(f).fold(0.0, f64::max);
    let last =
        samples.last().copied().unwrap_or(Sample { at: 0.0, used_mib: 0.0, keys: 0.0, accepted: 0.0, received: 0.0 });
    report.figure("accepted", expected as f64);
    report.figure("rejected", rejected.load(Ordering::Relaxed) as f64);
    report.figure("delivered", seen.len() as f64);
    report.figure("lost", expected.saturating_sub(seen.len()) as f64);
    report.figure("duplicated", seen.values().filter(|n| **n > 1).count() as f64);
    report.figure("load_seconds", load_seconds);
    report.figure("all_pushed_after_seconds", drained_seconds);
    report.figure("redis_used_mib_at_start", baseline_mib);
    report.figure("redis_used_mib_peak", peak(|s| s.used_mib));
    report.figure("redis_used_mib_end", last.used_mib);
    report.figure("keys_peak", peak(|s| s.keys));
    report.figure("keys_end", last.keys);
    report.figure("key_budget", key_budget());
    let memory: Vec<(f64, f64)> = samples.iter().map(|s| (s.at, s.used_mib)).collect();
    let keys: Vec<(f64, f64)> = samples.iter().map(|s| (s.at, s.keys)).collect();
    let progress: Vec<(f64, f64)> = samples.iter().map(|s| (s.at, s.accepted)).collect();
    let pushed: Vec<(f64, f64)> = samples.iter().map(|s| (s.at, s.received)).collect();
    report.series("redis_used_mib", &memory);
    report.series("namespace_keys", &keys);
    report.series("accepted", &progress);
    report.series("pushed", &pushed);
    let title = format!("Redis during {submissions} submissions at {rate}/s (with notifications)");
    Chart {
        title: &title,
        x_label: "seconds",
        y_label: "keys in the namespace",
        series: vec![Series { name: "keys", points: &keys }],
        limit: Some(("key budget", key_budget())),
    }
    .save(&report.artefact("keys.svg")?)?;
    Chart {
        title: &title,
        x_label: "seconds",
        y_label: "MiB",
        series: vec![Series { name: "Redis used_memory", points: &memory }],
        limit: None,
    }
    .save(&report.artefact("memory.svg")?)?;
    let scale = |points: &[(f64, f64)]| points.iter().map(|(x, y)| (*x, y / 1000.0)).collect::<Vec<_>>();
    let (progress, pushed) = (scale(&progress), scale(&pushed));
    Chart {
        title: &title,
        x_label: "seconds",
        y_label: "thousands",
        series: vec![
            Series { name: "submissions accepted", points: &progress },
            Series { name: "pushes received", points: &pushed },
        ],
        limit: None,
    }
    .save(&report.artefact("progress.svg")?)?;
    Ok(())
}
