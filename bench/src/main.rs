//! `cargo run --release -p bench -- <scenario>`: starts the release binaries of web and
//! worker on a fresh PostgreSQL database and an isolated Redis namespace, with the
//! push-service stand-in (which verifies and decrypts every push — in `e2e` and `fanout`
//! after the timed window, so it does not compete with the sender for the CPU, arrival
//! times kept), drives load over real
//! HTTP connections, and prints a table plus a JSON file under `bench/results/`.
//!
//! Scenarios:
//! - `submit`: closed-loop form posts (GET the form once per connection, then POST with
//!   cookie and token) from C connections for D seconds after a warm-up.
//! - `e2e`: open-loop submissions at R per second with one subscription, after a second
//!   of the same load as a warm-up: submit -> push received latency (the warm-up's
//!   apart), lost and duplicated counts (the warm-up's included); with `--gap-secs G`,
//!   one submission every G seconds to an idle worker, no warm-up, coalescing as shipped.
//! - `fanout`: one submission to S subscriptions, the stand-in answering at once or after
//!   a delay (a real push service's round trip): time to the first, 50%, 99% and last
//!   push, pushes per second, connections opened to the push service, duplicates.
//! - `admin`: R messages and S subscriptions in PostgreSQL; the inbox's first page, a
//!   deep page, the counts and a message's page, cold and warm, plus their query plans.
//! - `queue`: N `ping` jobs (they do nothing) fed in as a burst and drained by the
//!   worker processes (`--workers`): jobs per second against `redis-benchmark`'s
//!   LPUSH/RPOP figure for the same Redis.
//! - `capacity`: `e2e` at rising rates, the stack started anew for each, up to the
//!   first rate not sustained (p99 past 50 ms, or a submission refused, lost or pushed
//!   twice, or a push refused by the push service): the highest rate sustained here.
//! - `soak`: N submissions at R per second while an admin browses; Redis memory and keys
//!   sampled every second and plotted (SVG) beside the JSON.

mod admin;
mod browser;
mod capacity;
mod django;
mod plot;
mod procs;
mod queue;
mod report;
mod soak;
mod targets;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use sea_orm::{ConnectionTrait, Database};
use tidings_tests::push_service::PushService;

use crate::browser::{Browser, Browsers};
use crate::procs::{Stack, peak_rss_kib};
use crate::report::Report;

#[derive(Parser, Clone)]
#[command(name = "bench", about = "Measures Tidings end to end on this machine.")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// PostgreSQL server to create the benchmark database on. On one host TLS is off
    /// (`sslmode=disable`); the reference stack is given the same `sslmode`.
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
    )]
    database: String,
    /// Run the stack on a fresh SQLite file (the product's embedded default) instead of
    /// PostgreSQL. The targets are set for PostgreSQL, so on SQLite only memory and
    /// nothing lost or duplicated are checked; `admin` needs PostgreSQL.
    #[arg(long)]
    sqlite: bool,
    /// Redis to use (a fresh key namespace is used and removed).
    #[arg(long, env = "BENCH_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Worker concurrency.
    #[arg(long, default_value_t = 16)]
    worker_concurrency: usize,
    /// Worker processes (0 with `submit`: the web's intake alone, nothing draining the
    /// queue — what the web takes while the workers run elsewhere).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Coalescing threshold of the stack (`NOTIFY_BURST_THRESHOLD`): 0, the default here,
    /// pushes every message on its own; as shipped (6), a flood is folded into one digest
    /// per window and each message's run counts its window first.
    #[arg(long, default_value_t = 0)]
    burst_threshold: u64,
    /// What to measure: Tidings, or the reference stack (`submit`, `e2e`, `fanout`,
    /// `capacity`).
    #[arg(long, value_enum, default_value_t = Target::Tidings)]
    target: Target,
    /// The reference stack's folder (for `--target django`).
    #[arg(long, default_value = "../shared/peers/django_huey")]
    peer_dir: PathBuf,
    /// `RUST_LOG` of the web and worker processes (their logs go to this terminal).
    #[arg(long, default_value = "warn")]
    log: String,
    /// Threads of the load generator and the push-service stand-in (one runtime), 0 for
    /// one per core: 1 runs them on one thread, which costs the cores they share with
    /// the stack least.
    #[arg(long, default_value_t = 1)]
    load_threads: usize,
}

/// The system under test.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    /// Tidings' release binaries.
    Tidings,
    /// Django + Huey + pywebpush, as the seed builds it.
    Django,
}

/// The feedback form of a target: where it is, its CSRF field, its success status.
#[derive(Clone, Copy)]
struct Form {
    path: &'static str,
    token_field: &'static str,
    accepted: u16,
}

const TIDINGS_FORM: Form = Form { path: "/feedback", token_field: "csrf_token", accepted: 303 };
const DJANGO_FORM: Form = Form { path: "/feedback/", token_field: "csrfmiddlewaretoken", accepted: 302 };

/// The form of this run's target.
static FORM: std::sync::OnceLock<Form> = std::sync::OnceLock::new();

fn form() -> Form {
    *FORM.get_or_init(|| TIDINGS_FORM)
}

#[derive(Subcommand, Clone, Copy)]
pub(crate) enum Scenario {
    /// Closed-loop form submissions.
    Submit {
        /// Concurrent connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Measured seconds (after a 2 s warm-up).
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Open-loop submissions at a fixed rate, measured until the push arrives.
    E2e {
        /// Submissions per second.
        #[arg(long, default_value_t = 50)]
        rate: u64,
        /// Measured seconds of load (after a 1 s warm-up at the same rate; none with
        /// `--gap-secs`).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Instead of `--rate`: one submission every this many seconds, so the worker is
        /// idle between them (and coalescing runs at its default, as on a quiet site).
        #[arg(long)]
        gap_secs: Option<u64>,
    },
    /// One message to many subscriptions.
    Fanout {
        /// Subscriptions to notify.
        #[arg(long, default_value_t = 1000)]
        subscriptions: usize,
        /// Delay of every answer of the push-service stand-in, in milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// The admin's pages over a large inbox, cold and warm.
    Admin {
        /// Feedback rows to seed.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Subscriptions to seed.
        #[arg(long, default_value_t = 1000)]
        subscriptions: usize,
        /// Timed requests per page, cold and warm each.
        #[arg(long, default_value_t = 200)]
        requests: usize,
    },
    /// No-op jobs through the queue, against Redis's own ceiling.
    Queue {
        /// Jobs in all, fed in as fast as the backlog bound allows.
        #[arg(long, default_value_t = 50_000)]
        jobs: u64,
    },
    /// `e2e` at rising rates, the stack started anew for each, up to the first rate not
    /// sustained (p99 past 50 ms, or a submission refused, lost or pushed twice, or a
    /// push refused by the push service): the highest rate sustained here.
    Capacity {
        /// The first rate, in submissions per second.
        #[arg(long, default_value_t = 1000)]
        from: u64,
        /// How much each rate adds to the one before.
        #[arg(long, default_value_t = 500)]
        step: u64,
        /// The last rate tried, at most.
        #[arg(long, default_value_t = 8000)]
        to: u64,
        /// Measured seconds at each rate (after its warm-up second).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Sustained submissions with notifications; Redis memory and keys over time.
    Soak {
        /// Submissions in all.
        #[arg(long, default_value_t = 100_000)]
        submissions: u64,
        /// Submissions per second.
        #[arg(long, default_value_t = 400)]
        rate: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    shared::runtime::with_threads(cli.load_threads)?.block_on(bench(cli))
}

async fn bench(cli: Cli) -> anyhow::Result<()> {
    anyhow::ensure!(!(cli.sqlite && cli.target == Target::Django), "the reference runs on PostgreSQL: drop --sqlite");
    // The machine's speed at this moment, before anything of this run starts (a sweep's
    // steps each take their own).
    let probe_ms = (!matches!(cli.scenario, Scenario::Capacity { .. })).then(procs::cpu_probe_ms);
    let push = PushService::start().await?;
    if let Some(mode) = cli.database.split_once("sslmode=").map(|(_, m)| m.split('&').next().unwrap_or(m)) {
        let _ = django::SSLMODE.set(mode.to_owned());
    }
    let mut report = match (cli.scenario, cli.target) {
        (Scenario::Capacity { .. }, _) => capacity::run(&cli, &push).await?,
        (_, Target::Django) => run_django(&cli, &push).await?,
        (_, Target::Tidings) => run_tidings(&cli, &push).await?,
    };
    if let Some(probe_ms) = probe_ms {
        report.figure("cpu_probe_ms", probe_ms);
    }
    report.print();
    println!("\nsaved {}", report.save()?.display());
    Ok(())
}

/// Runs the scenario against Tidings' release binaries, on a database and a Redis
/// namespace of the run's own, removed after it whatever the outcome.
async fn run_tidings(cli: &Cli, push: &PushService) -> anyhow::Result<Report> {
    anyhow::ensure!(
        !(cli.sqlite && matches!(cli.scenario, Scenario::Admin { .. })),
        "`admin` seeds its rows with PostgreSQL's generate_series: run it without --sqlite"
    );
    let binaries = procs::build_release().await?;
    let namespace = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let database = RunDatabase::create(cli, &namespace).await?;

    let result = run(cli, &binaries, push, &namespace, &database.url).await;

    procs::remove_namespace(&cli.redis, &namespace).await;
    database.drop().await;
    result
}

/// The run's own database: a fresh one on the PostgreSQL server, or a fresh SQLite file
/// in a folder of its own.
struct RunDatabase {
    /// The stack's `DATABASE_URL`.
    url: String,
    kind: RunDatabaseKind,
}

enum RunDatabaseKind {
    Postgres { server: sea_orm::DatabaseConnection, name: String },
    Sqlite { folder: PathBuf },
}

impl RunDatabase {
    async fn create(cli: &Cli, namespace: &str) -> anyhow::Result<Self> {
        if cli.sqlite {
            let folder = std::env::temp_dir().join(namespace);
            std::fs::create_dir_all(&folder)?;
            let url = format!("sqlite://{}?mode=rwc", folder.join("tidings.sqlite").display());
            return Ok(Self { url, kind: RunDatabaseKind::Sqlite { folder } });
        }
        let name = namespace.replace('-', "_");
        let server = Database::connect(&cli.database).await.context("connecting to PostgreSQL")?;
        server.execute_unprepared(&format!("CREATE DATABASE \"{name}\"")).await?;
        // The same server and options (`?sslmode=…`), the run's own database.
        let (url, options) = cli.database.split_once('?').map_or((cli.database.as_str(), None), |(u, o)| (u, Some(o)));
        let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
        let url = match options {
            Some(options) => format!("{base}/{name}?{options}"),
            None => format!("{base}/{name}"),
        };
        Ok(Self { url, kind: RunDatabaseKind::Postgres { server, name } })
    }

    async fn drop(self) {
        match self.kind {
            RunDatabaseKind::Postgres { server, name } => {
                let _ = server.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
            }
            RunDatabaseKind::Sqlite { folder } => {
                let _ = std::fs::remove_dir_all(folder);
            }
        }
    }
}

async fn run(
    cli: &Cli,
    binaries: &procs::Binaries,
    push: &PushService,
    namespace: &str,
    database_url: &str,
) -> anyhow::Result<Report> {
    let (private, public) = web::commands::new_vapid_keys();
    push.expect_vapid_public_key(&public);
    let port = procs::free_port()?;
    let env: HashMap<String, String> = [
        ("DATABASE_URL", database_url.to_owned()),
        ("REDIS_URL", cli.redis.clone()),
        ("REDIS_NAMESPACE", namespace.to_owned()),
        ("BIND", format!("127.0.0.1:{port}")),
        ("PUBLIC_URL", format!("http://127.0.0.1:{port}/")),
        ("SECRET_KEY", format!("bench-secret-{}", uuid::Uuid::new_v4().simple())),
        ("VAPID_PRIVATE_KEY", private),
        ("VAPID_PUBLIC_KEY", public),
        ("VAPID_SUBJECT", "mailto:bench@tidings.test".into()),
        ("PUSH_ALLOWED_HOSTS", push.origin()),
        ("SUBMIT_RATE_LIMIT", "0".into()),
        ("NOTIFY_BURST_THRESHOLD", cli.burst_threshold.to_string()),
        ("WORKER_METRICS_BIND", "off".into()),
        ("RUST_LOG", cli.log.clone()),
    ]
    .into_iter()
    .chain(scenario_env(cli.scenario).iter().map(|(k, v)| (*k, (*v).to_owned())))
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let stack = Stack::start(binaries, &env, cli.worker_concurrency, cli.workers).await?;
    let db = shared::db::connect(database_url).await?;
    let address = format!("http://127.0.0.1:{port}");

    let mut report = Report::new(scenario_name(cli.scenario), &env);
    // Inherited by web and worker from this process's environment.
    for (param, var) in [("web_threads", "WEB_THREADS"), ("worker_threads", "WORKER_THREADS")] {
        report.param(param, std::env::var(var).unwrap_or_else(|_| "default".into()));
    }
    for (param, fingerprint) in binaries.fingerprints()? {
        report.param(param, fingerprint);
    }
    report.param("worker_concurrency", cli.worker_concurrency);
    report.param("load_threads", cli.load_threads);
    report.param("load_client", browser::CLIENT);
    report.param("database", if cli.sqlite { "sqlite" } else { "postgresql" });
    // Memory before any load: both processes idle after start, and Redis.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.figure("web_idle_rss_mib", procs::rss_kib(stack.web_pid()) as f64 / 1024.0);
    report.figure("worker_idle_rss_mib", procs::rss_kib(stack.worker_pid()) as f64 / 1024.0);
    report.figure("redis_used_mib_before", procs::redis_used_memory_mib(&cli.redis).await);
    let mut window = if cli.sqlite { Window::over(&stack).without_postgres() } else { Window::over(&stack) };
    match cli.scenario {
        Scenario::Submit { connections, seconds } => {
            report.param("connections", connections);
            report.param("seconds", seconds);
            report.param("workers", cli.workers);
            window.open();
            submit(&address, connections, Duration::from_secs(seconds), &mut report).await?;
            window.close(&mut report);
            worker_progress(&db, &mut report).await?;
        }
        Scenario::E2e { rate, seconds, gap_secs } => {
            report.param("workers", cli.workers);
            let (interval, total) = e2e_pace(&mut report, rate, seconds, gap_secs);
            durable_commits(&db, &mut report).await?;
            // The machine's floor at this pace; past 100 a second no one idles.
            if interval >= Duration::from_millis(10) {
                idle_round_trips(&cli.redis, database_url, interval, &mut report).await?;
            }
            let browser = push.new_subscription();
            let admin = bench_admin(&db).await?;
            subscribe(&db, push, &browser, admin).await?;
            push.set_deferred(true);
            // What the stack did each second of the load, beside it: whether a backlog
            // that forms comes with more or fewer statements and fetches, and which
            // process's CPU a slow second went to.
            let (done, sampled) = tokio::sync::oneshot::channel();
            let load = async {
                let result = e2e(&address, push, interval, total, &mut window, &mut report).await;
                let _ = done.send(());
                result
            };
            let (result, by_second) = tokio::join!(load, stack.by_second(sampled));
            result?;
            for name in by_second.first().map(|(_, rates)| rates.iter().map(|(name, _)| *name)).into_iter().flatten() {
                let points: Vec<(f64, f64)> = by_second
                    .iter()
                    .filter_map(|(at, rates)| rates.iter().find(|(n, _)| *n == name).map(|(_, rate)| (*at, *rate)))
                    .collect();
                report.series(&format!("{name}_by_second"), &points);
            }
        }
        Scenario::Fanout { subscriptions, delay_ms } => {
            report.param("subscriptions", subscriptions);
            report.param("delay_ms", delay_ms);
            let admin = bench_admin(&db).await?;
            subscribe_many(&db, push, admin, subscriptions).await?;
            push.set_delay(Duration::from_millis(delay_ms));
            window.open();
            fanout(&address, push, subscriptions, &mut window, &mut report).await?;
        }
        Scenario::Admin { rows, subscriptions, requests } => {
            report.param("rows", rows);
            report.param("subscriptions", subscriptions);
            report.param("requests", requests);
            window.open();
            let admin = bench_admin(&db).await?;
            subscribe_many(&db, push, admin, subscriptions).await?;
            admin::run(&db, &address, &cli.redis, namespace, rows, requests, &mut report).await?;
        }
        Scenario::Queue { jobs } => {
            report.param("jobs", jobs);
            report.param("workers", cli.workers);
            report.param("worker_concurrency", cli.worker_concurrency);
            window.open();
            queue::run(&cli.redis, namespace, jobs, &mut report).await?;
        }
        Scenario::Capacity { .. } => anyhow::bail!("`capacity` runs its rates as `e2e` runs"),
        Scenario::Soak { submissions, rate } => {
            report.param("submissions", submissions);
            report.param("rate_per_second", rate);
            for (key, value) in soak::ENV {
                report.param(&key.to_lowercase(), value);
            }
            window.open();
            soak::run(&db, &address, push, &cli.redis, namespace, submissions, rate, &mut report).await?;
        }
    }
    window.close(&mut report);
    report.figure("web_peak_rss_mib", peak_rss_kib(stack.web_pid()) as f64 / 1024.0);
    report.figure("worker_peak_rss_mib", peak_rss_kib(stack.worker_pid()) as f64 / 1024.0);
    report.figure("redis_used_mib_after", procs::redis_used_memory_mib(&cli.redis).await);
    // The web's statements that stored submissions, over the whole run (warm-ups
    // included), and the messages stored: under load a statement carries every
    // submission that waited for it.
    if matches!(cli.scenario, Scenario::Submit { .. } | Scenario::E2e { .. })
        && let Some(statements) = stack.web_metrics().await.as_deref().and_then(procs::intake_statements)
    {
        report.figure("web_intake_statements", statements);
        if let Ok(stored) = shared::queries::feedback::count(&db).await
            && statements > 0.0
        {
            report.figure("submissions_per_intake_statement", stored as f64 / statements);
        }
    }
    // The first worker's fetches over the whole run (start and drain included).
    let metrics = stack.worker_metrics().await.unwrap_or_default();
    if let Some((to_redis, held_back)) = procs::worker_fetches(&metrics) {
        report.figure("worker_fetches_to_redis", to_redis);
        report.figure("worker_fetches_held_back", held_back);
    }
    // The first worker's statements that opened and closed runs, over the whole run:
    // under load each carries every run that waited for it.
    if let Some((opens, closes)) = procs::run_statements(&metrics) {
        report.figure("worker_open_statements", opens);
        report.figure("worker_close_statements", closes);
        // Per message accepted (warm-up included): a refused one opens no run.
        let accepted = report.get("submitted").map(|n| n - report.get("rejected").unwrap_or(0.0));
        if let Some(accepted) = accepted.filter(|n| *n > 0.0 && cli.workers == 1) {
            report.figure("worker_statements_per_message", (opens + closes) / accepted);
        }
    }
    // How soon the first worker started each fan-out once it was due (the web queued it):
    // the pick-up, part of the e2e latency.
    if matches!(cli.scenario, Scenario::E2e { .. })
        && let Some(pickups) = procs::Pickups::from_exposition(&metrics)
    {
        report.figure("pickup_within_5ms_percent", pickups.within_5ms_percent);
        if pickups.p99_ms.is_finite() {
            report.figure("pickup_p99_ms", pickups.p99_ms);
        }
    }
    // How long the first worker's fan-outs ran once started (the handler only: the lock
    // before it and the acknowledgement after it hold the slot too), and, at a steady
    // rate with one worker process, how many of its slots that keeps busy on average
    // (Little's law: the rate times the mean time), against its concurrency.
    if let Scenario::E2e { rate, gap_secs, .. } = cli.scenario
        && let Some(mean) = procs::mean_job_ms(&metrics)
    {
        report.figure("worker_job_mean_ms", mean);
        if gap_secs.is_none() && cli.workers == 1 {
            report.figure("worker_jobs_in_flight_mean", rate as f64 * mean / 1000.0);
        }
    }
    drop(window);
    stack.stop().await;
    targets::check(&mut report, cli.scenario, cli.workers, !cli.sqlite);
    Ok(report)
}

/// The timed part of a run: the CPU seconds of each process and of the whole machine
/// from [`Window::open`] to [`Window::close`]. In `submit`, `e2e` and `fanout` it opens
/// once the scenario is set up (subscriptions, the durable-commit probe; in `e2e` at a
/// steady rate, once its warm-up has been sent) and closes when
/// the load ends, before the stand-in checks its deferred pushes; in `admin`, `queue` and
/// `soak` it spans the whole scenario, its own set-up included.
struct Window<'a> {
    /// CPU seconds so far of the stack's own processes, each under its figure's name.
    processes: Box<dyn Fn() -> Vec<(&'static str, f64)> + 'a>,
    /// Set by [`Window::open`], taken by [`Window::close`].
    opened: Option<WindowStart>,
    /// Whether PostgreSQL is part of the stack (not on SQLite, where the database runs
    /// inside web and worker).
    postgres: bool,
}

struct WindowStart {
    at: Instant,
    processes: Vec<(&'static str, f64)>,
    postgres: HashMap<u32, f64>,
    redis: HashMap<u32, f64>,
    bench: f64,
    machine: f64,
    steal: f64,
}

impl<'a> Window<'a> {
    fn new(processes: impl Fn() -> Vec<(&'static str, f64)> + 'a) -> Self {
        Self { processes: Box::new(processes), opened: None, postgres: true }
    }

    /// The same window with PostgreSQL's processes left out of the stack.
    fn without_postgres(mut self) -> Self {
        self.postgres = false;
        self
    }

    /// A window over Tidings' web and worker processes.
    fn over(stack: &'a Stack) -> Self {
        Self::new(move || {
            let (web, worker) = stack.cpu();
            vec![("web_cpu_seconds", web), ("worker_cpu_seconds", worker)]
        })
    }

    fn open(&mut self) {
        self.opened = Some(WindowStart {
            at: Instant::now(),
            processes: (self.processes)(),
            postgres: procs::cpu_by_name(&["postgres"]),
            redis: procs::cpu_by_name(&["redis-server"]),
            bench: procs::cpu_seconds(std::process::id()),
            machine: procs::machine_busy_seconds(),
            steal: procs::machine_steal_seconds(),
        });
    }

    /// Records the window's figures; only the first call after [`Window::open`] counts.
    fn close(&mut self, report: &mut Report) {
        let Some(start) = self.opened.take() else { return };
        report.figure("wall_seconds", start.at.elapsed().as_secs_f64());
        let mut stack = 0.0;
        for ((name, after), (_, before)) in (self.processes)().into_iter().zip(&start.processes) {
            report.figure(name, after - before);
            stack += after - before;
        }
        let redis = procs::cpu_between(&start.redis, &procs::cpu_by_name(&["redis-server"]));
        let postgres = if self.postgres {
            let postgres = procs::cpu_between(&start.postgres, &procs::cpu_by_name(&["postgres"]));
            report.figure("postgres_cpu_seconds", postgres);
            postgres
        } else {
            0.0
        };
        report.figure("redis_cpu_seconds", redis);
        // The stack under test: its own processes, PostgreSQL and Redis.
        report.figure("stack_cpu_seconds", stack + postgres + redis);
        // The load generator and the push-service stand-in run in this process.
        report.figure("bench_cpu_seconds", procs::cpu_seconds(std::process::id()) - start.bench);
        report.figure("machine_busy_cpu_seconds", procs::machine_busy_seconds() - start.machine);
        // Part of the busy time above: the cores taken by the hypervisor's other guests.
        report.figure("machine_steal_cpu_seconds", procs::machine_steal_seconds() - start.steal);
    }
}

/// What the machine's cores allow at the CPU one submission cost in the timed window,
/// counting every process (the load generator, PostgreSQL, Redis and the kernel too):
/// the ceiling no change to the web or the worker alone can lift past.
fn cpu_ceiling(report: &mut Report, accepted: usize, machine_busy: f64) {
    if accepted == 0 || machine_busy <= 0.0 {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    report.figure("window_machine_busy_cpu_seconds", machine_busy);
    report.figure("machine_cpu_ms_per_submission", machine_busy * 1000.0 / accepted as f64);
    report.figure("cpu_ceiling_per_second", cores * accepted as f64 / machine_busy);
}

/// How far the worker got while the submissions came in: the dispatch records it had
/// completed when the load stopped, of all stored (warm-up included).
async fn worker_progress(db: &sea_orm::DatabaseConnection, report: &mut Report) -> anyhow::Result<()> {
    use sea_orm::ConnectionTrait;
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) AS stored, count(completed_at) AS completed FROM dispatches",
        ))
        .await?
        .context("counting dispatch records")?;
    let (stored, completed): (i64, i64) = (row.try_get("", "stored")?, row.try_get("", "completed")?);
    report.figure("dispatches_stored", stored as f64);
    report.figure("dispatches_completed_by_the_end", completed as f64);
    Ok(())
}

fn scenario_name(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Submit { .. } => "submit",
        Scenario::E2e { .. } => "e2e",
        Scenario::Fanout { .. } => "fanout",
        Scenario::Admin { .. } => "admin",
        Scenario::Queue { .. } => "queue",
        Scenario::Soak { .. } => "soak",
        Scenario::Capacity { .. } => "capacity",
    }
}

/// Runs `submit`, `e2e` or `fanout` against the reference stack; when it cannot be
/// started, says why and reports the figures measured for it on this machine kind.
async fn run_django(cli: &Cli, push: &PushService) -> anyhow::Result<Report> {
    let _ = FORM.set(DJANGO_FORM);
    let mut report = Report::new(scenario_name(cli.scenario), &HashMap::new());
    report.param("target", "django");
    report.param("load_threads", cli.load_threads);
    report.param("load_client", browser::CLIENT);
    let peer = match django::Peer::start(&cli.peer_dir).await {
        Ok(peer) => peer,
        Err(e) => {
            eprintln!("the reference stack cannot be started on this machine: {e:#}");
            eprintln!("reporting the figures measured for it on this machine kind instead");
            report.param("fallback", format!("not started: {e:#}"));
            for (name, value) in django::MEASURED {
                report.figure(name, value);
            }
            return Ok(report);
        }
    };
    let result = async {
        push.expect_vapid_public_key(&peer.vapid_public_key()?);
        let address = django::ADDRESS;
        let mut window = Window::new(|| vec![("reference_cpu_seconds", peer.cpu_seconds())]);
        match cli.scenario {
            Scenario::Submit { connections, seconds } => {
                report.param("connections", connections);
                report.param("seconds", seconds);
                peer.subscribe(&[]).await?;
                window.open();
                submit(address, connections, Duration::from_secs(seconds), &mut report).await?;
            }
            Scenario::E2e { rate, seconds, gap_secs } => {
                let (interval, total) = e2e_pace(&mut report, rate, seconds, gap_secs);
                django::subscribe_many(&peer, push, 1).await?;
                push.set_deferred(true);
                e2e(address, push, interval, total, &mut window, &mut report).await?;
            }
            Scenario::Fanout { subscriptions, delay_ms } => {
                report.param("subscriptions", subscriptions);
                report.param("delay_ms", delay_ms);
                django::subscribe_many(&peer, push, subscriptions).await?;
                push.set_delay(Duration::from_millis(delay_ms));
                window.open();
                fanout(address, push, subscriptions, &mut window, &mut report).await?;
            }
            _ => anyhow::bail!("--target django runs submit, e2e and fanout"),
        }
        window.close(&mut report);
        Ok(())
    }
    .await;
    peer.drain(Duration::from_secs(120)).await;
    peer.stop().await;
    result.map(|()| report)
}

/// Settings a scenario runs with beyond the common ones.
fn scenario_env(scenario: Scenario) -> &'static [(&'static str, &'static str)] {
    match scenario {
        Scenario::Soak { .. } => &soak::ENV,
        Scenario::Queue { .. } => &queue::ENV,
        // Spaced submissions: coalescing as shipped.
        Scenario::E2e { gap_secs: Some(_), .. } => &[("NOTIFY_BURST_THRESHOLD", "6")],
        _ => &[],
    }
}

async fn submit(address: &str, connections: usize, measured: Duration, report: &mut Report) -> anyhow::Result<()> {
    let warm_up = Duration::from_secs(2);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for connection in 0..connections {
        let (address, measuring, stop, accepted) =
            (address.to_owned(), Arc::clone(&measuring), Arc::clone(&stop), Arc::clone(&accepted));
        tasks.push(tokio::spawn(async move {
            let mut browser = Browser::open(&address).await?;
            let mut latencies = Vec::new();
            let mut completed_at = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let started = Instant::now();
                let accepted_now = browser.post_form(&format!("submit {connection}-{i}")).await;
                if measuring.load(Ordering::Relaxed) {
                    match accepted_now {
                        Ok(true) => {
                            latencies.push(started.elapsed());
                            completed_at.push(Instant::now());
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => errors += 1,
                    }
                }
            }
            Ok::<_, anyhow::Error>((latencies, completed_at, errors))
        }));
    }
    tokio::time::sleep(warm_up).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let busy_before = procs::machine_busy_seconds();
    while started.elapsed() < measured {
        tokio::time::sleep(Duration::from_millis(500)).await;
        procs::progress(started.elapsed(), measured, &format!("{} accepted", accepted.load(Ordering::Relaxed)));
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let busy = procs::machine_busy_seconds() - busy_before;
    let mut latencies = Vec::new();
    let mut completions = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, c, e) = task.await??;
        latencies.extend(l);
        completions.extend(c.iter().map(|at| at.saturating_duration_since(started).as_secs_f64()));
        errors += e;
    }
    eprintln!();
    latencies.sort();
    completions.sort_by(f64::total_cmp);
    report.plot_latencies("latency", &latencies)?;
    report.plot_throughput("accepted", &completions)?;
    report.figure("accepted", latencies.len() as f64);
    report.figure("errors", errors as f64);
    cpu_ceiling(report, latencies.len(), busy);
    report.figure("accepted_per_second", latencies.len() as f64 / elapsed.as_secs_f64());
    report.latencies("latency", &latencies);
    Ok(())
}

/// The interval between `e2e` submissions and how many there are, recorded as parameters.
fn e2e_pace(report: &mut Report, rate: u64, seconds: u64, gap_secs: Option<u64>) -> (Duration, u64) {
    report.param("seconds", seconds);
    match gap_secs {
        Some(gap) => {
            report.param("gap_seconds", gap);
            (Duration::from_secs(gap.max(1)), (seconds / gap.max(1)).max(1))
        }
        None => {
            report.param("rate_per_second", rate);
            (Duration::from_secs_f64(1.0 / rate.max(1) as f64), rate * seconds)
        }
    }
}

async fn e2e(
    address: &str,
    push: &PushService,
    interval: Duration,
    total: u64,
    window: &mut Window<'_>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let per_second = (1.0 / interval.as_secs_f64()).ceil().max(1.0) as u64;
    // At a steady rate, a second of the same load first, reported apart: the stack's
    // first second after it starts (on a fresh database) is slower, most likely from what
    // warms once (docs/PERFORMANCE.md, "An eighteenth machine").
    let warmup = if interval < Duration::from_secs(1) { per_second } else { 0 };
    report.param("warmup_messages", warmup);
    let duration = interval.mul_f64((warmup + total) as f64);
    // Browsers that keep their connection, cookie and token, 32 to start with.
    let browsers = Arc::new(Browsers::open(address, 32).await?);
    let sent_at: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let begun = Instant::now();
    let mut started = begun;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut handles = Vec::new();
    for i in 0..warmup + total {
        ticker.tick().await;
        if i == warmup {
            // The measured load starts here, and with it the CPU window.
            window.open();
            started = Instant::now();
        }
        let (browsers, sent_at) = (Arc::clone(&browsers), Arc::clone(&sent_at));
        handles.push(tokio::spawn(async move {
            let content = format!("e2e {i}");
            // Read only once every submission has been answered.
            let posted = browsers.post_form(&content).await;
            if let Ok(mut map) = sent_at.lock() {
                map.insert(content, posted.at);
            }
            (posted.accepted, posted.took)
        }));
        if i % per_second == 0 {
            procs::progress(begun.elapsed(), duration, &format!("{} received", push.deferred_count()));
        }
    }
    let mut rejected = 0u64;
    // How long each submission took to be answered, by its number.
    let mut answered = Vec::with_capacity(handles.len());
    for handle in handles {
        let (accepted, took) = handle.await?;
        answered.push(took);
        if !accepted {
            rejected += 1;
        }
    }
    let expected = usize::try_from((warmup + total).saturating_sub(rejected)).unwrap_or(0);
    push.wait_for_deferred(expected, Duration::from_secs(60)).await;
    window.close(report);
    eprintln!();
    let refused = push.verify_deferred();
    report.figure("refused_by_push_service", refused.len() as f64);
    let received = push.received();
    let sent_at = sent_at.lock().map(|m| m.clone()).unwrap_or_default();
    let mut latencies = Vec::new();
    let mut warmup_latencies = Vec::new();
    // Each first copy's delay by the second of the load its submission was made in.
    let mut by_second: Vec<Vec<Duration>> = Vec::new();
    // Each first copy's delay with how long its submission (`e2e {i}`) took to be
    // answered: the part of the delay spent before the commit, and the part after it.
    let mut slowest: Vec<(Duration, Duration)> = Vec::new();
    let mut seen: HashMap<String, u32> = HashMap::new();
    for push in &received {
        let body = push.json()["body"].as_str().unwrap_or_default().to_owned();
        *seen.entry(body.clone()).or_default() += 1;
        let i = body.strip_prefix("e2e ").and_then(|i| i.parse::<u64>().ok());
        if seen[&body] == 1
            && let Some(at) = sent_at.get(&body)
        {
            let delay = push.at.saturating_duration_since(*at);
            if i.is_none_or(|i| i < warmup) {
                warmup_latencies.push(delay);
                continue;
            }
            latencies.push(delay);
            let second = usize::try_from(at.saturating_duration_since(started).as_secs()).unwrap_or(0);
            if by_second.len() <= second {
                by_second.resize_with(second + 1, Vec::new);
            }
            by_second[second].push(delay);
            if let Some(answer) = i.and_then(|i| answered.get(usize::try_from(i).ok()?)) {
                slowest.push((delay, *answer));
            }
        }
    }
    slowest.sort_by_key(|&(push, _)| std::cmp::Reverse(push));
    for (n, (push, answer)) in slowest.iter().take(3).enumerate() {
        report.note(
            &format!("slowest_push_{}", n + 1),
            format!(
                "{:.1} ms after its submission, which was answered after {:.1} ms",
                push.as_secs_f64() * 1000.0,
                answer.as_secs_f64() * 1000.0
            ),
        );
    }
    latencies.sort();
    warmup_latencies.sort();
    // The answers of the measured submissions only.
    let mut answered = answered.split_off(usize::try_from(warmup).unwrap_or(0).min(answered.len()));
    answered.sort();
    latency_by_second(report, &mut by_second)?;
    report.latencies("answered", &answered);
    report.plot_latencies("submit_to_push", &latencies)?;
    let mut arrivals: Vec<f64> = received
        .iter()
        .filter(|p| p.at >= started)
        .map(|p| p.at.saturating_duration_since(started).as_secs_f64())
        .collect();
    arrivals.sort_by(f64::total_cmp);
    report.plot_throughput("pushes", &arrivals)?;
    let duplicated = seen.values().filter(|n| **n > 1).count();
    report.figure("submitted", (warmup + total) as f64);
    report.figure("rejected", rejected as f64);
    report.figure("delivered", seen.len() as f64);
    report.figure("lost", expected.saturating_sub(seen.len()) as f64);
    report.figure("duplicated", duplicated as f64);
    // CPU per measured message delivered, in the window: the stack under test (its
    // processes, PostgreSQL, Redis), and the load generator with the stand-in.
    if !latencies.is_empty() {
        let per_message = |figure: &str| report.get(figure).map(|s| s * 1000.0 / latencies.len() as f64);
        if let (Some(tidings), Some(bench)) = (per_message("stack_cpu_seconds"), per_message("bench_cpu_seconds")) {
            report.figure("stack_cpu_ms_per_message", tidings);
            report.figure("bench_cpu_ms_per_message", bench);
        }
    }
    report.latencies("submit_to_push", &latencies);
    if !warmup_latencies.is_empty() {
        report.latencies("warmup_submit_to_push", &warmup_latencies);
    }
    Ok(())
}

/// The p50 and p99 of the submit-to-push delays of each second of the load, by the
/// second their submissions were made in, recorded and plotted: a backlog from the
/// start, a stall midway and a steady shortfall each draw their own shape.
fn latency_by_second(report: &mut Report, by_second: &mut [Vec<Duration>]) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let points = report::percentile_by_second(by_second, p);
        report.series(&format!("submit_to_push_{name}_ms_by_second"), &points);
        lines.push((name, points));
    }
    plot::Chart {
        title: "e2e: submission to push, by the second of the submission",
        x_label: "second of the load",
        y_label: "milliseconds",
        series: lines.iter().map(|(name, points)| plot::Series { name, points }).collect(),
        limit: None,
    }
    .save(&report.artefact("submit_to_push-by-second.svg")?)
}

/// The latency of a durable commit on this server, from one client at a time: 400 one-row
/// inserts, 5 ms apart, before the load. Every submission waits for one such commit
/// before it is answered, so this distribution's tail is a floor for `e2e`'s: where the
/// disk's flushes stall, no durable pipeline on it answers faster.
async fn durable_commits(db: &sea_orm::DatabaseConnection, report: &mut Report) -> anyhow::Result<()> {
    let backend = db.get_database_backend();
    let (create, insert) = match backend {
        sea_orm::DbBackend::Sqlite => (
            "CREATE TABLE bench_commit_probe (id INTEGER PRIMARY KEY, at TEXT NOT NULL)",
            "INSERT INTO bench_commit_probe (at) VALUES (datetime('now'))",
        ),
        _ => (
            "CREATE TABLE bench_commit_probe (id bigserial PRIMARY KEY, at timestamptz NOT NULL)",
            "INSERT INTO bench_commit_probe (at) VALUES (now())",
        ),
    };
    db.execute_unprepared(create).await?;
    let insert = sea_orm::Statement::from_string(backend, insert);
    let mut took = Vec::with_capacity(400);
    for _ in 0..400 {
        let started = Instant::now();
        db.execute_raw(insert.clone()).await?;
        took.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    db.execute_unprepared("DROP TABLE bench_commit_probe").await?;
    took.sort();
    report.latencies("durable_commit", &took);
    Ok(())
}

/// Bare round trips over loopback, each after `idle` with nothing to do, before the load
/// of an `e2e` run whose submissions idle as long between them (at most 100 a second):
/// each time a `PING` to Redis, then a `SELECT 1` to the database on a connection of its
/// own that is not checked before use; 25 of each, or 3 (six idles before the load) when
/// `idle` is a second or more. On a virtual machine whose idle
/// cores are halted, or whose host lets an idle process's memory go cold, the first
/// round trip after a pause costs time of its own, and every hop of an idle pipeline pays
/// it: these are the machine's floor for the idle pick-up and the idle answer.
async fn idle_round_trips(
    redis_url: &str,
    database_url: &str,
    idle: Duration,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut redis = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
    let mut options = sea_orm::ConnectOptions::new(database_url.to_owned());
    options.max_connections(1).min_connections(1).test_before_acquire(false).sqlx_logging(false);
    let db = sea_orm::Database::connect(options).await?;
    let select = sea_orm::Statement::from_string(db.get_database_backend(), "SELECT 1");
    let count = if idle >= Duration::from_secs(1) { 3 } else { 25 };
    let (mut to_redis, mut to_database) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for i in 0..count {
        eprint!("\ridle round trips {i}/{count}");
        tokio::time::sleep(idle).await;
        let started = Instant::now();
        redis::cmd("PING").query_async::<String>(&mut redis).await?;
        to_redis.push(started.elapsed());
        tokio::time::sleep(idle).await;
        let started = Instant::now();
        db.query_one_raw(select.clone()).await?;
        to_database.push(started.elapsed());
    }
    eprintln!();
    for (name, mut took) in [("idle_redis_round_trip", to_redis), ("idle_database_round_trip", to_database)] {
        took.sort();
        report.latencies(name, &took);
    }
    Ok(())
}

/// The admin owning the benchmark's subscriptions.
async fn bench_admin(db: &sea_orm::DatabaseConnection) -> anyhow::Result<i64> {
    let email = shared::domain::EmailAddress::parse("bench@tidings.test").map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(shared::queries::admin::upsert(db, &email, "unused").await?)
}

/// Stores `browser`'s subscription for `admin`.
async fn subscribe(
    db: &sea_orm::DatabaseConnection,
    push: &PushService,
    browser: &tidings_tests::push_service::BrowserSubscription,
    admin: i64,
) -> anyhow::Result<()> {
    let subscription = shared::domain::NewSubscription::parse(
        &browser.endpoint,
        &browser.p256dh,
        &browser.auth,
        &shared::domain::PushHostPolicy::parse(&push.origin()).map_err(|e| anyhow::anyhow!("{e}"))?,
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    shared::queries::subscription::upsert(db, &subscription, admin, Some("bench")).await?;
    Ok(())
}

/// Stores `count` fresh subscriptions on the stand-in for `admin`.
async fn subscribe_many(
    db: &sea_orm::DatabaseConnection,
    push: &PushService,
    admin: i64,
    count: usize,
) -> anyhow::Result<()> {
    for i in 0..count {
        subscribe(db, push, &push.new_subscription(), admin).await?;
        if i % 500 == 0 {
            eprint!("\rsubscribing {i}/{count}");
        }
    }
    eprintln!("\rsubscribed {count}        ");
    Ok(())
}

/// One submission, then every push: how long until the first, half, 99% and all of them
/// arrived (from the submission), at what rate, over how many connections.
async fn fanout(
    address: &str,
    push: &PushService,
    subscriptions: usize,
    window: &mut Window<'_>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut browser = Browser::open(address).await?;
    // The stand-in checks and decrypts every push after the timed window, so it does not
    // compete with the sender for the CPU while it is timed.
    push.set_deferred(true);
    let started = Instant::now();
    anyhow::ensure!(browser.post_form("fan-out").await?, "the submission was refused");
    push.wait_for_deferred(subscriptions, Duration::from_secs(300)).await;
    window.close(report);
    let refused = push.verify_deferred();
    report.figure("refused_by_push_service", refused.len() as f64);
    let received = push.received();
    let mut arrivals: Vec<Duration> = received.iter().map(|p| p.at.saturating_duration_since(started)).collect();
    arrivals.sort();
    report.plot_latencies("arrival", &arrivals)?;
    report.plot_throughput("pushes", &arrivals.iter().map(Duration::as_secs_f64).collect::<Vec<_>>())?;
    let at = |fraction: f64| {
        let index = ((subscriptions as f64 * fraction).ceil() as usize).clamp(1, arrivals.len().max(1)) - 1;
        arrivals.get(index).copied().unwrap_or_default().as_secs_f64()
    };
    let mut endpoints: Vec<&str> = received.iter().map(|p| p.endpoint.as_str()).collect();
    endpoints.sort_unstable();
    let total = endpoints.len();
    endpoints.dedup();
    let all = at(1.0);
    report.figure("delivered", endpoints.len() as f64);
    report.figure("lost", subscriptions.saturating_sub(endpoints.len()) as f64);
    report.figure("duplicated", (total - endpoints.len()) as f64);
    report.figure("first_seconds", arrivals.first().copied().unwrap_or_default().as_secs_f64());
    report.figure("half_seconds", at(0.5));
    report.figure("p99_seconds", at(0.99));
    report.figure("all_seconds", all);
    report.figure("pushes_per_second", if all > 0.0 { endpoints.len() as f64 / all } else { 0.0 });
    report.figure("push_service_connections", push.connections_opened() as f64);
    Ok(())
}
