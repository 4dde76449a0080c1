//! Building and running the release binaries, and reading their CPU time and memory.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// Paths of the release binaries.
pub struct Binaries {
    web: PathBuf,
    worker: PathBuf,
    migrations: PathBuf,
}

/// Builds the release binaries (a no-op when they are up to date).
pub async fn build_release() -> anyhow::Result<Binaries> {
    eprintln!("building the release binaries…");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "web", "--bin", "worker", "--bin", "migrations"])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "cargo build --release failed");
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let release = dir.join("release");
    Ok(Binaries { web: release.join("web"), worker: release.join("worker"), migrations: release.join("migrations") })
}

impl Binaries {
    /// The first 12 hex digits of the SHA-256 of web and worker, so that runs of two
    /// builds interleaved in one series are told apart by their files.
    pub fn fingerprints(&self) -> anyhow::Result<[(&'static str, String); 2]> {
        let of = |path: &PathBuf| -> anyhow::Result<String> {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(std::fs::read(path)?);
            Ok(digest.iter().take(6).map(|b| format!("{b:02x}")).collect())
        };
        Ok([("web_sha256", of(&self.web)?), ("worker_sha256", of(&self.worker)?)])
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The web and worker processes under test.
pub struct Stack {
    web: Child,
    /// The first worker process; none with `--workers 0` (the web alone).
    worker: Option<Child>,
    /// Further worker processes (`--workers`).
    more_workers: Vec<Child>,
    /// The first worker's `/metrics`.
    worker_metrics: Option<String>,
    /// The web's `/metrics`.
    web_metrics: String,
}

impl Stack {
    /// Migrates the database, starts web and worker, and waits for `/readyz`.
    /// `workers` worker processes run `concurrency` jobs each.
    pub async fn start(
        binaries: &Binaries,
        env: &HashMap<String, String>,
        concurrency: usize,
        workers: usize,
    ) -> anyhow::Result<Self> {
        let status = Command::new(&binaries.migrations).arg("up").envs(env).status().await?;
        anyhow::ensure!(status.success(), "migrations up failed");
        let web = Command::new(&binaries.web).arg("serve").envs(env).kill_on_drop(true).spawn()?;
        let worker_process = |metrics: Option<&str>| {
            let mut command = Command::new(&binaries.worker);
            command.args(["run", "--concurrency", &concurrency.to_string()]).envs(env).kill_on_drop(true);
            if let Some(bind) = metrics {
                command.env("WORKER_METRICS_BIND", bind);
            }
            command.spawn()
        };
        let metrics_bind = format!("127.0.0.1:{}", free_port()?);
        let worker = if workers == 0 { None } else { Some(worker_process(Some(&metrics_bind))?) };
        let worker_metrics = worker.as_ref().map(|_| format!("http://{metrics_bind}/metrics"));
        let more_workers = (1..workers.max(1)).map(|_| worker_process(None)).collect::<Result<Vec<_>, _>>()?;
        let bind = env.get("BIND").context("BIND")?;
        let (ready, web_metrics) = (format!("http://{bind}/readyz"), format!("http://{bind}/metrics"));
        for _ in 0..100 {
            if reqwest::get(&ready).await.is_ok_and(|r| r.status().is_success()) {
                return Ok(Self { web, worker, more_workers, worker_metrics, web_metrics });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the web did not become ready")
    }

    /// Operating-system process id of the web.
    pub fn web_pid(&self) -> u32 {
        self.web.id().unwrap_or(0)
    }

    /// Operating-system process id of the worker.
    pub fn worker_pid(&self) -> u32 {
        self.worker.as_ref().and_then(Child::id).unwrap_or(0)
    }

    /// CPU seconds used so far by (web, all worker processes).
    pub fn cpu(&self) -> (f64, f64) {
        let more: f64 = self.more_workers.iter().map(|w| cpu_seconds(w.id().unwrap_or(0))).sum();
        (cpu_seconds(self.web_pid()), cpu_seconds(self.worker_pid()) + more)
    }

    /// The first worker's `/metrics`, scraped once; None without a worker.
    pub async fn worker_metrics(&self) -> Option<String> {
        scrape(self.worker_metrics.as_deref()?).await
    }

    /// The web's `/metrics`, scraped once; None when it does not answer.
    pub async fn web_metrics(&self) -> Option<String> {
        scrape(&self.web_metrics).await
    }

    /// What the stack did about each second until `done` resolves: for each second,
    /// `(seconds since the start, [(name, rate)])`, each rate a running total's growth
    /// over the time since the sample before (at least half a second), per second. The
    /// totals: the first worker's run statements and fetches that reached Redis
    /// (`worker_statements`, `worker_fetches`, with a worker), and the CPU seconds of the
    /// web, the worker processes, PostgreSQL, Redis, this process (the load and the
    /// stand-in) and the whole machine, with its steal (`web_cpu`, `worker_cpu`,
    /// `postgres_cpu`, `redis_cpu`, `bench_cpu`, `machine_busy_cpu`,
    /// `machine_steal_cpu`): a second that slows is traced to a process. A worker scrape
    /// that fails or takes over a second skips that sample.
    pub async fn by_second(
        &self,
        mut done: tokio::sync::oneshot::Receiver<()>,
    ) -> Vec<(f64, Vec<(&'static str, f64)>)> {
        let Ok(client) = reqwest::Client::builder().timeout(Duration::from_secs(1)).build() else { return Vec::new() };
        let start = std::time::Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(f64, Totals)> = None;
        let mut seconds = Vec::new();
        loop {
            tokio::select! {
                biased;
                _ = &mut done => break,
                _ = ticks.tick() => {}
            }
            let metrics = match self.worker_metrics.as_deref() {
                Some(url) => {
                    let scrape = async { client.get(url).send().await.ok()?.text().await.ok() };
                    let text = tokio::select! {
                        biased;
                        _ = &mut done => break,
                        text = scrape => text,
                    };
                    let Some(text) = text else { continue };
                    Some(text)
                }
                None => None,
            };
            let at = start.elapsed().as_secs_f64();
            let totals = self.totals(metrics.as_deref());
            match &last {
                // Held up (the stand-in's checks after the load run on this thread): no
                // point from a sliver of time.
                Some((before, _)) if at - before < 0.5 => continue,
                Some((before, totals_before)) => seconds.push((at, totals.rates_since(totals_before, at - before))),
                None => {}
            }
            last = Some((at, totals));
        }
        seconds
    }

    /// The running totals [`Stack::by_second`] samples, read now (`metrics`: the first
    /// worker's, when it runs).
    fn totals(&self, metrics: Option<&str>) -> Totals {
        let mut counters = Vec::new();
        if let Some(text) = metrics {
            counters.push(("worker_statements", run_statements(text).map_or(0.0, |(opens, closes)| opens + closes)));
            counters.push(("worker_fetches", worker_fetches(text).map_or(0.0, |(to_redis, _)| to_redis)));
        }
        let (web, worker) = self.cpu();
        counters.extend([
            ("web_cpu", web),
            ("worker_cpu", worker),
            ("bench_cpu", cpu_seconds(std::process::id())),
            ("machine_busy_cpu", machine_busy_seconds()),
            ("machine_steal_cpu", machine_steal_seconds()),
        ]);
        Totals { counters, postgres: cpu_by_name(&["postgres"]), redis: cpu_by_name(&["redis-server"]) }
    }

    /// SIGTERM every process and wait for them.
    pub async fn stop(mut self) {
        let more: Vec<u32> = self.more_workers.iter().map(|w| w.id().unwrap_or(0)).collect();
        // (`kill 0` would signal this whole process group: a pid of 0 is no process.)
        for pid in [self.web_pid(), self.worker_pid()].into_iter().chain(more).filter(|&pid| pid != 0) {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(40), self.web.wait()).await;
        if let Some(worker) = &mut self.worker {
            let _ = tokio::time::timeout(Duration::from_secs(40), worker.wait()).await;
        }
        for worker in &mut self.more_workers {
            let _ = tokio::time::timeout(Duration::from_secs(40), worker.wait()).await;
        }
    }
}

/// Running totals at one moment: counters under their names, and the CPU seconds of
/// PostgreSQL's and Redis's processes by process (one that ends between two moments
/// would otherwise count as negative).
struct Totals {
    counters: Vec<(&'static str, f64)>,
    postgres: HashMap<u32, f64>,
    redis: HashMap<u32, f64>,
}

impl Totals {
    /// Each total's growth since `before`, per second over `span` seconds.
    fn rates_since(&self, before: &Totals, span: f64) -> Vec<(&'static str, f64)> {
        let mut rates: Vec<(&'static str, f64)> = self
            .counters
            .iter()
            .filter_map(|(name, now)| {
                let (_, then) = before.counters.iter().find(|(n, _)| n == name)?;
                // A process gone since (its time read as 0) counts nothing, not less.
                Some((*name, ((now - then) / span).max(0.0)))
            })
            .collect();
        rates.push(("postgres_cpu", cpu_between(&before.postgres, &self.postgres) / span));
        rates.push(("redis_cpu", cpu_between(&before.redis, &self.redis) / span));
        rates
    }
}

/// The text at `url`; None when it does not answer.
async fn scrape(url: &str) -> Option<String> {
    reqwest::get(url).await.ok()?.text().await.ok()
}

/// A worker's fetches of jobs from its `/metrics` `text`: (those that reached Redis,
/// those its gate answered itself), from its `tidings_queue_fetches_total`.
pub fn worker_fetches(text: &str) -> Option<(f64, f64)> {
    if !text.contains("tidings_queue_fetches_total") {
        return None;
    }
    let count = |result: &str| {
        let series = format!("tidings_queue_fetches_total{{result=\"{result}\"}}");
        tidings_tests::harness::metric_value(text, &series).unwrap_or(0.0)
    };
    Some((count("jobs") + count("empty"), count("skipped")))
}

/// The statements the web sent to store submissions, from its `/metrics` `text`
/// (`tidings_submission_writes_total`: under load one stores many).
pub fn intake_statements(text: &str) -> Option<f64> {
    tidings_tests::harness::metric_value(text, "tidings_submission_writes_total")
}

/// The statements a worker sent to open fan-out runs and to close them, from its
/// `tidings_run_open_writes_total` and `tidings_run_close_writes_total` (each carries
/// every run that waited for it); None when the worker exposes neither counter.
pub fn run_statements(text: &str) -> Option<(f64, f64)> {
    let count = |name: &str| tidings_tests::harness::metric_value(text, name);
    match (count("tidings_run_open_writes_total"), count("tidings_run_close_writes_total")) {
        (None, None) => None,
        (opens, closes) => Some((opens.unwrap_or(0.0), closes.unwrap_or(0.0))),
    }
}

/// The mean time a worker's fan-out jobs took to run, in milliseconds, over its whole
/// life (from the sum and count of its `tidings_job_duration_seconds`: the handler's
/// time, without the lock before it and the acknowledgement after it); None before its
/// first. Times the rate, it is how many of the worker's slots are busy on average
/// (Little's law).
pub fn mean_job_ms(text: &str) -> Option<f64> {
    let value = |part: &str| {
        tidings_tests::harness::metric_value(text, &format!("tidings_job_duration_seconds_{part}{{kind=\"fan_out\"}}"))
    };
    let count = value("count").filter(|n| *n > 0.0)?;
    Some(value("sum")? * 1000.0 / count)
}

/// How soon a worker picked its fan-out jobs up (queued by the web, or due again), over
/// its whole life, from the buckets of its histogram
/// (bounds in [`shared::metrics::BUCKETS`], each counting the jobs that waited at most
/// that long; the worker measures in whole milliseconds of the system clock).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pickups {
    /// Fan-out jobs started.
    pub jobs: f64,
    /// The percentage of them started within 5 ms of being due, as the worker counts
    /// (whole milliseconds): 99 or more is a p99 of at most 5 counted, under 6 real.
    pub within_5ms_percent: f64,
    /// The 99th percentile in milliseconds, interpolated linearly within its bucket: an
    /// estimate, infinite when it lies past the last bound.
    pub p99_ms: f64,
}

impl Pickups {
    const SERIES: &str = "tidings_job_queue_wait_seconds";

    /// From a worker's `/metrics` `text`; None before its first fan-out.
    pub fn from_exposition(text: &str) -> Option<Self> {
        let value = |le: &str| {
            let series = format!("{}_bucket{{kind=\"fan_out\",le=\"{le}\"}}", Self::SERIES);
            tidings_tests::harness::metric_value(text, &series)
        };
        let jobs = value("+Inf").filter(|n| *n > 0.0)?;
        let buckets: Vec<(f64, f64)> =
            shared::metrics::BUCKETS.iter().map(|bound| (*bound, value(&bound.to_string()).unwrap_or(0.0))).collect();
        let within_5ms = buckets.iter().find(|(bound, _)| (*bound - 0.005).abs() < 1e-12).map_or(0.0, |(_, n)| *n);
        let rank = 0.99 * jobs;
        let (mut lower, mut below) = (0.0, 0.0);
        let mut p99 = f64::INFINITY;
        for (bound, count) in buckets {
            if count >= rank {
                let share = if count > below { (rank - below) / (count - below) } else { 1.0 };
                p99 = lower + (bound - lower) * share;
                break;
            }
            (lower, below) = (bound, count);
        }
        Some(Self { jobs, within_5ms_percent: 100.0 * within_5ms / jobs, p99_ms: p99 * 1000.0 })
    }
}

/// User + system CPU seconds of process `pid` (from `/proc`).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may contain spaces) start after ") ".
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    ticks / 100.0
}

/// The machine's speed at this moment: milliseconds one core takes to sort a fixed
/// pseudo-random million numbers, the best of five. Machines of one kind differ, and one
/// machine's speed moves from one stretch of an hour to the next; this tells a slower
/// moment from a slower build when runs are compared.
pub fn cpu_probe_ms() -> f64 {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let numbers: Vec<u64> = (0..1_000_000)
        .map(|_| {
            // xorshift64: the same sequence every time, with no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        })
        .collect();
    (0..5)
        .map(|_| {
            let mut work = numbers.clone();
            let started = std::time::Instant::now();
            work.sort_unstable();
            std::hint::black_box(&work);
            started.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

/// CPU seconds the whole machine has been busy (every process and the kernel: user,
/// nice, system, interrupts, steal; from `/proc/stat`).
pub fn machine_busy_seconds() -> f64 {
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    machine_seconds(&[0, 1, 2, 5, 6, 7])
}

/// CPU seconds the hypervisor has given the machine's cores to others while they had
/// work (steal, from `/proc/stat`): a neighbour's load, which slows a run without
/// showing in any process's time.
pub fn machine_steal_seconds() -> f64 {
    machine_seconds(&[7])
}

/// The sum of the `/proc/stat` columns `columns` (0 is user) of all cores, in seconds.
fn machine_seconds(columns: &[usize]) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0.0 };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let fields: Vec<f64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    columns.iter().filter_map(|&i| fields.get(i)).sum::<f64>() / 100.0
}

/// Peak resident memory of process `pid` in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// Resident memory of process `pid` now, in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Redis's `used_memory` in MiB (0 when unreachable).
pub async fn redis_used_memory_mib(redis_url: &str) -> f64 {
    let Ok(client) = redis_client(redis_url) else { return 0.0 };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return 0.0 };
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut conn).await.unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0.0, |bytes| bytes / (1024.0 * 1024.0))
}

/// Deletes every Redis key of `namespace`.
pub async fn remove_namespace(redis_url: &str, namespace: &str) {
    let Ok(client) = redis_client(redis_url) else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("*{namespace}*")).query_async(&mut conn).await.unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
    // apalis-redis also registers each queue in one set shared by every namespace.
    let _: redis::RedisResult<u64> = shared::queue::forget_queues_of(namespace).query_async(&mut conn).await;
}

fn redis_client(url: &str) -> redis::RedisResult<redis::Client> {
    redis::Client::open(url)
}

/// One progress line on standard error, rewritten in place.
pub fn progress(elapsed: Duration, total: Duration, detail: &str) {
    let fraction = (elapsed.as_secs_f64() / total.as_secs_f64().max(0.001)).min(1.0);
    let filled = (fraction * 30.0) as usize;
    let mut err = std::io::stderr();
    let _ =
        write!(err, "\r[{}{}] {:>3.0}%  {detail}   ", "#".repeat(filled), ".".repeat(30 - filled), fraction * 100.0);
    let _ = err.flush();
}

/// A progress line for `done` of `total` steps.
pub fn progress_count(elapsed: Duration, done: usize, total: usize, detail: &str) {
    let fraction = done as f64 / total.max(1) as f64;
    let filled = ((fraction * 30.0) as usize).min(30);
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r[{}{}] {:>3.0}%  {done}/{total} {detail} ({:.0} s)   ",
        "#".repeat(filled),
        ".".repeat(30 - filled),
        fraction * 100.0,
        elapsed.as_secs_f64()
    );
    let _ = err.flush();
}

/// CPU seconds so far of every running process named one of `names` (by process id):
/// the database and Redis servers, whose share of each scenario is reported too.
pub fn cpu_by_name(names: &[&str]) -> HashMap<u32, f64> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return HashMap::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| names.contains(&comm.trim()))
        })
        .map(|pid| (pid, cpu_seconds(pid)))
        .collect()
}

/// CPU seconds `names` used between two [`cpu_by_name`] snapshots (processes started in
/// between count whole; those that ended are missed).
pub fn cpu_between(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    // A fold from +0.0: an empty `sum` of floats is -0.0, which a report would print as such.
    after
        .iter()
        .map(|(pid, cpu)| cpu - before.get(pid).copied().unwrap_or(0.0))
        .filter(|d| *d > 0.0)
        .fold(0.0, |a, d| a + d)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{Pickups, Totals, cpu_between};

    #[test]
    fn rates_are_growth_per_second_and_a_process_that_ended_counts_nothing() {
        let before = Totals {
            counters: vec![("web_cpu", 1.0), ("worker_statements", 100.0)],
            postgres: HashMap::from([(1, 2.0), (2, 5.0)]),
            redis: HashMap::from([(9, 1.0)]),
        };
        let after = Totals {
            counters: vec![("web_cpu", 1.5), ("worker_statements", 300.0)],
            postgres: HashMap::from([(1, 3.0), (3, 0.5)]),
            redis: HashMap::from([(9, 1.25)]),
        };
        // PostgreSQL: process 1 grew by 1.0, process 3 started (counted whole), process 2
        // ended (not counted): 1.5 over 2 s.
        assert_eq!(
            after.rates_since(&before, 2.0),
            vec![("web_cpu", 0.25), ("worker_statements", 100.0), ("postgres_cpu", 0.75), ("redis_cpu", 0.125)]
        );
    }

    #[test]
    fn cpu_between_counts_what_grew_and_is_never_negative_zero() {
        let nothing = cpu_between(&HashMap::new(), &HashMap::new());
        assert!(nothing == 0.0 && nothing.is_sign_positive(), "{nothing:?}");
        let before = HashMap::from([(1, 2.0), (2, 5.0)]);
        let after = HashMap::from([(1, 2.5), (2, 5.0), (3, 1.0)]);
        assert!((cpu_between(&before, &after) - 1.5).abs() < 1e-9);
    }

    #[test]
    fn the_run_statements_are_read_from_the_workers_counters() {
        let text = "tidings_run_open_writes_total 40\ntidings_run_close_writes_total 25\n";
        assert_eq!(super::run_statements(text), Some((40.0, 25.0)));
        assert_eq!(super::run_statements("tidings_run_open_writes_total 3\n"), Some((3.0, 0.0)));
        assert_eq!(super::run_statements("tidings_queue_fetches_total{result=\"jobs\"} 1\n"), None);
    }

    #[test]
    fn the_mean_job_time_is_read_from_the_workers_histogram() {
        let text = "tidings_job_duration_seconds_sum{kind=\"fan_out\"} 0.5\n\
                    tidings_job_duration_seconds_count{kind=\"fan_out\"} 100\n\
                    tidings_job_duration_seconds_sum{kind=\"prune\"} 9\n\
                    tidings_job_duration_seconds_count{kind=\"prune\"} 1\n";
        assert_eq!(super::mean_job_ms(text), Some(5.0));
        assert_eq!(super::mean_job_ms("tidings_job_duration_seconds_count{kind=\"fan_out\"} 0\n"), None);
    }

    #[test]
    fn pickups_are_read_from_the_workers_histogram() {
        let exposition = |counts: [u64; 12], total: u64| {
            let mut text = String::new();
            for (bound, count) in shared::metrics::BUCKETS.iter().zip(counts) {
                text += &format!("tidings_job_queue_wait_seconds_bucket{{kind=\"fan_out\",le=\"{bound}\"}} {count}\n");
            }
            text += &format!("tidings_job_queue_wait_seconds_bucket{{kind=\"fan_out\",le=\"+Inf\"}} {total}\n");
            text
        };
        // 100 jobs: 60 within 1 ms, 99 within 2.5 ms, all within 5 ms.
        let quick =
            Pickups::from_exposition(&exposition([60, 99, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100], 100))
                .expect("jobs");
        assert_eq!(quick.jobs, 100.0);
        assert_eq!(quick.within_5ms_percent, 100.0);
        assert!((quick.p99_ms - 2.5).abs() < 1e-9, "{quick:?}");
        // 200 jobs, 10 of them slower than 5 ms: 95%, and the p99 in the 10–25 ms bucket.
        let slow =
            Pickups::from_exposition(&exposition([100, 150, 190, 197, 200, 200, 200, 200, 200, 200, 200, 200], 200))
                .expect("jobs");
        assert_eq!(slow.within_5ms_percent, 95.0);
        assert!(slow.p99_ms > 10.0 && slow.p99_ms < 25.0, "{slow:?}");
        // Past the last bound, the p99 is unbounded; no fan-out at all is no figure.
        let lost = Pickups::from_exposition(&exposition([0; 12], 10)).expect("jobs");
        assert!(lost.p99_ms.is_infinite());
        assert_eq!(Pickups::from_exposition(&exposition([0; 12], 0)), None);
        assert_eq!(Pickups::from_exposition("tidings_queue_fetches_total{result=\"jobs\"} 3\n"), None);
    }
}
