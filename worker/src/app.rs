//! The worker process: connects, builds its fetch loops (an apalis worker each) and the
//! periodic tasks, and runs until SIGTERM/SIGINT (or [`ShutdownHandle::shutdown`]).
//!
//! It fails loudly instead of the stock behaviour (a warning, then exit 0): an apalis
//! worker that dies (Redis unreachable) is logged as an error and rebuilt under a new
//! name with a backoff, so the process reconnects by itself; an error while stopping
//! makes `worker run` exit non-zero.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apalis::prelude::WorkerBuilderExt;
use apalis_core::backend::ext::BackendExt;
use apalis_core::task::attempt::Attempt;
use apalis_core::task::data::Data;
use apalis_core::task::metadata::MetadataStore;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_redis::RedisStorage;
use poem::Server;
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use secrecy::SecretString;
use shared::jobs::QueuedJob;
use shared::metrics::Registry;
use shared::queue::{DeadLetter, JobQueue, RawCodec, RawJob, meta as queue_meta};
use shared::settings::Settings;
use shared::worker_health::{self, WorkerReport};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::context::WorkerContext;
use crate::jobs::{JobError, prune, relay, trim};
use crate::push::{PushSender, PushSenderConfig};
use crate::queue::{FetchGate, GatedConnection, LoopSlots, Periodic, feed_wakes, worker_name};

/// What the apalis handler and the process's own tasks share: the jobs' context, and the
/// queue that is always there in a worker process. Derefs to the jobs' context.
#[derive(Clone)]
struct Process {
    ctx: WorkerContext,
    queue: JobQueue,
}

impl std::ops::Deref for Process {
    type Target = WorkerContext;

    fn deref(&self) -> &WorkerContext {
        &self.ctx
    }
}

/// The periodic trim's name; its lock is [`shared::jobs::TRIM_LOCK`], which the on-demand
/// trim job takes too.
pub const TRIM_TASK: &str = "trim-caches";

/// A built worker process, ready to run.
pub struct Application {
    ctx: Process,
    concurrency: usize,
    /// Each fetch loop's concurrency and its own connection to Redis.
    loops: Vec<(usize, redis::aio::ConnectionManager)>,
    stop_tx: watch::Sender<bool>,
    /// The bound `/metrics` listener, when metrics are on.
    metrics: Option<(TcpAcceptor, u16)>,
}

/// Stops a running [`Application`] as SIGTERM would: no new jobs, in-flight ones finish.
#[derive(Clone)]
pub struct ShutdownHandle {
    stop_tx: watch::Sender<bool>,
}

impl ShutdownHandle {
    /// Asks the worker to stop.
    pub fn shutdown(&self) {
        let _ = self.stop_tx.send(true);
    }
}

impl Application {
    /// Connects to the database and Redis and prepares a worker running up to
    /// `concurrency` jobs at once.
    pub async fn build(settings: Settings, concurrency: usize) -> anyhow::Result<Self> {
        let private_key = settings
            .push
            .vapid_private_key
            .clone()
            .context("VAPID_PRIVATE_KEY is not set: run `web vapid generate` and put its output in .env")?;
        let sender = PushSender::new(sender_config(&settings, private_key))?;
        let db = shared::db::connect(&settings.database_url).await?;
        let groups = shared::db::connect_for_groups(&db, &settings.database_url).await?;
        let registry = Registry::new();
        let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace)
            .await
            .context("connecting to Redis (REDIS_URL)")?;
        // Each loop's fetches and acknowledgements go on a connection of its own: on one
        // shared link they wait behind each other's round trips.
        let mut loops = Vec::new();
        for share in loop_concurrency(concurrency.max(1)) {
            let own = JobQueue::connect(&settings.redis_url, &settings.redis_namespace)
                .await
                .context("connecting to Redis (REDIS_URL)")?;
            loops.push((share, own.connection()));
        }
        let (stop_tx, _) = watch::channel(false);
        let metrics = match settings.worker.metrics_bind {
            Some(addr) => {
                let acceptor = TcpListener::bind(addr)
                    .into_acceptor()
                    .await
                    .with_context(|| format!("binding WORKER_METRICS_BIND {addr}"))?;
                let port =
                    acceptor.local_addr().first().and_then(|a| a.as_socket_addr().map(|s| s.port())).unwrap_or(0);
                Some((acceptor, port))
            }
            None => None,
        };
        Ok(Self {
            ctx: Process {
                ctx: WorkerContext {
                    runs: crate::runs::Runs::start(
                        db.clone(),
                        groups,
                        &registry,
                        crate::jobs::fan_out::FIRST_PAGE,
                        crate::jobs::fan_out::claim_hold(&settings),
                        crate::jobs::fan_out::coalescing_of(&settings, true),
                        crate::runs::linger_for(concurrency.max(1)),
                    ),
                    db,
                    sender: Arc::new(sender),
                    queue: Some(queue.clone()),
                    cache: settings.cache.enabled.then(|| {
                        shared::cache::Cache::new(queue.connection(), &settings.redis_namespace, &settings.cache)
                    }),
                    settings: Arc::new(settings),
                    metrics: registry,
                },
                queue,
            },
            concurrency: concurrency.max(1),
            loops,
            stop_tx,
            metrics,
        })
    }

    /// The port `/metrics` is served on, when metrics are on.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics.as_ref().map(|(_, port)| *port)
    }

    /// A handle that stops this worker.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle { stop_tx: self.stop_tx.clone() }
    }

    /// Runs until a signal or the shutdown handle; an error means a worker died while
    /// stopping.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self { ctx, concurrency, loops, stop_tx, metrics } = self;
        let settings = Arc::clone(&ctx.settings);

        // OS signals feed the same stop channel as the handle.
        let signal_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = signal_tx.send(true);
        });
        let stopped = {
            let rx = stop_tx.subscribe();
            move || wait_for_stop(rx.clone())
        };

        let names: Vec<String> = loops.iter().map(|_| worker_name(shared::jobs::FAN_OUT_QUEUE)).collect();
        let health = Arc::new(std::sync::Mutex::new(Health {
            report: WorkerReport {
                process: uuid::Uuid::new_v4().simple().to_string(),
                worker: names.join(","),
                host: host_name(),
                pid: std::process::id(),
                concurrency,
                state: "running".into(),
                restarts: 0,
                last_error: None,
                started_at: chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                reported_at: String::new(),
            },
            loops: names.iter().map(|name| LoopHealth { name: name.clone(), restarting: false }).collect(),
        }));
        let reporter = tokio::spawn(report_health(Arc::clone(&health), ctx.queue.clone(), stopped()));

        if let Some((acceptor, port)) = metrics {
            tracing::info!(port, "worker.metrics_listening");
            let endpoint = metrics_endpoint(ctx.clone());
            let stop = stopped();
            tokio::spawn(async move {
                let _ = Server::new_with_acceptor(acceptor).run_with_graceful_shutdown(endpoint, stop, None).await;
            });
        }

        let periodic = Periodic::new(ctx.queue.connection(), ctx.queue.namespace());
        let trim_ctx = ctx.clone();
        let trim =
            tokio::spawn(periodic.clone().every(TRIM_TASK, settings.worker.trim_interval, stopped(), move || {
                let ctx = trim_ctx.clone();
                async move {
                    if let Err(e) = trim::run(&ctx, "tick").await {
                        tracing::warn!(error = %e, "trim.failed");
                    }
                }
            }));
        let prune_ctx = ctx.clone();
        let prune = tokio::spawn(periodic.clone().every(
            "prune-subscriptions",
            settings.worker.prune_interval,
            stopped(),
            move || {
                let ctx = prune_ctx.clone();
                async move {
                    if let Err(e) = prune::run(&ctx).await {
                        tracing::warn!(error = %e, "prune.failed");
                    }
                }
            },
        ));
        let relay_ctx = ctx.clone();
        let relay = tokio::spawn(periodic.every("relay", settings.worker.relay_interval, stopped(), move || {
            let ctx = relay_ctx.clone();
            async move {
                if let Err(e) = relay::run(&ctx, &ctx.queue).await {
                    tracing::warn!(error = %e, "relay.failed");
                }
            }
        }));

        // Everything that stops on the signal shares one bound, counted from the signal.
        let stop_seen = Arc::new(std::sync::OnceLock::new());
        tokio::spawn({
            let (stop, stop_seen) = (stopped(), Arc::clone(&stop_seen));
            async move {
                stop.await;
                stop_seen.get_or_init(tokio::time::Instant::now);
            }
        });
        // One gate for the process's loops: a wake lets one fetch through, made by the
        // first loop free to take a job.
        let gate = FetchGate::new(&ctx.metrics);
        feed_wakes(
            &settings.redis_url,
            shared::queue::wake_channel(ctx.queue.namespace()),
            settings.worker.poll_interval,
            &gate,
        );
        let process = ProcessLoops {
            ctx: ctx.clone(),
            health: Arc::clone(&health),
            stopped: &stopped,
            stop_tx: &stop_tx,
            stop_seen: &stop_seen,
            gate,
            drain_timed_out: std::sync::atomic::AtomicBool::new(false),
        };
        let ended = futures::future::join_all(
            loops
                .into_iter()
                .zip(names)
                .enumerate()
                .map(|(index, ((concurrency, conn), name))| process.run_loop(index, concurrency, conn, name)),
        )
        .await;
        let result = ended.into_iter().collect::<anyhow::Result<Vec<()>>>().map(drop);
        // The periodic tasks and the health reporter stop on the same signal (they ran
        // beside the drain): wait for them within the bound counted from the signal.
        let deadline = *stop_seen.get_or_init(tokio::time::Instant::now) + settings.worker.shutdown_timeout;
        let rest = async {
            let _ = tokio::join!(relay, trim, prune, reporter);
        };
        let _ = tokio::time::timeout_at(deadline, rest).await;
        if result.is_ok() {
            tracing::info!(worker = %health.lock().map(|h| h.report.worker.clone()).unwrap_or_default(), "worker.stopped");
        }
        result
    }
}

/// The jobs each fetch loop of a worker process runs at once. From a concurrency of 16
/// a process runs two loops, an apalis worker each with half the concurrency and its own
/// connection to Redis: apalis-core makes one fetch at a time per worker, its fetch,
/// acknowledgements and heartbeat taking turns, so a second loop fetches and
/// acknowledges while the first waits for Redis. Below that one loop runs them all (a
/// fetch takes only a loop's free slots, and under a backlog, when it takes whole
/// batches, `FetchGate` trims it while the other loop has more room).
fn loop_concurrency(concurrency: usize) -> Vec<usize> {
    if concurrency >= 16 { vec![concurrency - concurrency / 2, concurrency / 2] } else { vec![concurrency.max(1)] }
}

/// The health report of the process and the state of each of its fetch loops.
struct Health {
    report: WorkerReport,
    loops: Vec<LoopHealth>,
}

/// A fetch loop's worker name (a new one after each restart) and whether it is being
/// rebuilt.
struct LoopHealth {
    name: String,
    restarting: bool,
}

impl Health {
    /// Changes fetch loop `index`'s state and the report with it: the loops' names, and
    /// `restarting` while any loop is being rebuilt.
    fn set_loop(&mut self, index: usize, name: &str, restarting: bool) {
        if let Some(state) = self.loops.get_mut(index) {
            state.name = name.to_owned();
            state.restarting = restarting;
        }
        self.report.worker = self.loops.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(",");
        self.report.state = if self.loops.iter().any(|l| l.restarting) { "restarting" } else { "running" }.into();
    }
}

/// What the fetch loops of a process share.
struct ProcessLoops<'a, S> {
    ctx: Process,
    health: Arc<std::sync::Mutex<Health>>,
    stopped: &'a S,
    stop_tx: &'a watch::Sender<bool>,
    stop_seen: &'a std::sync::OnceLock<tokio::time::Instant>,
    gate: Arc<FetchGate>,
    /// Whether a loop's drain was cut short (logged and counted once per process).
    drain_timed_out: std::sync::atomic::AtomicBool,
}

impl<S, F> ProcessLoops<'_, S>
where
    S: Fn() -> F,
    F: Future<Output = ()> + Send + 'static,
{
    fn update(&self, change: impl FnOnce(&mut Health)) {
        if let Ok(mut health) = self.health.lock() {
            change(&mut health);
        }
    }

    /// Runs fetch loop `index` (an apalis worker named `name` running `concurrency` jobs
    /// at once, fetching on `conn`) until the stop.
    ///
    /// A worker that dies (Redis unreachable) is rebuilt under a new name after a backoff,
    /// so the loop reconnects by itself; each death is logged as an error and counted. The
    /// backoff grows with the deaths in a row: a worker that ran for a while before dying
    /// starts again from the shortest wait.
    async fn run_loop(
        &self,
        index: usize,
        concurrency: usize,
        conn: redis::aio::ConnectionManager,
        mut name: String,
    ) -> anyhow::Result<()> {
        let (ctx, stopped) = (&self.ctx, self.stopped);
        let settings = &ctx.settings;
        let mut in_a_row: u32 = 0;
        loop {
            let built = std::time::Instant::now();
            // A fetch takes the loop's free slots, and under a backlog as many jobs as the
            // loop runs at once (apalis-redis takes 10; `FetchGate::batch_for`). It comes
            // once a slot is free, so under a backlog a busy loop may hold up to its
            // concurrency less one fetched and not started. Those count as in flight; they go back to
            // the queue when a graceful stop's drain ends in time (with those of a fetch that
            // was on its way, `deregister`), and otherwise (the drain timed out, the worker
            // died) they are taken back as orphans after `WORKER_RECOVERY_SECS`.
            let config =
                recovery_config(ctx.queue.fan_out_config().clone(), settings.worker.recovery).batch_size(concurrency);
            let slots = LoopSlots::new(concurrency);
            let storage = RedisStorage::<RawJob, _>::new(GatedConnection::new(
                conn.clone(),
                &config,
                self.gate.clone(),
                slots.clone(),
            ))
            .with_config(config)
            .with_codec(RawCodec)
            .poll_with_strategy(self.gate.strategy(index, slots.clone()));
            self.update(|h| h.set_loop(index, &name, false));
            let worker = WorkerBuilder::new(name.clone())
                .backend(storage)
                .data(ctx.clone())
                .data(slots.clone())
                .concurrency(concurrency)
                .build(handle_fan_out);
            tracing::info!(worker = %name, concurrency, "worker.started");
            // apalis stops heartbeating once draining starts; keep the registration fresh
            // ourselves so no other worker takes back the jobs this one is finishing.
            let drain_beat = tokio::spawn({
                let (stop, queue, name) = (stopped(), ctx.queue.clone(), name.clone());
                let every = heartbeat_interval(settings.worker.recovery);
                async move {
                    stop.await;
                    keep_registered_while_draining(&queue, &name, every).await;
                }
            });
            let stop = stopped();
            // apalis runs every job inside the future that runs the worker. Spawned, that
            // future lives on the runtime's threads beside the sockets' reactor, and a
            // reply wakes the job on the thread that read it; awaited here, on the thread
            // that blocks on `main`, every reply would cross threads to reach its job.
            // A job's panic ends it here (not the process): the worker is rebuilt. The
            // panic's text stays in the log; the health report, which others read, only
            // says that it happened.
            // The drain gets `SHUTDOWN_TIMEOUT_SECS`: past it the worker is stopped with the
            // jobs still running (their claims lapse and another worker takes them back).
            let mut running = AbortOnDropHandle::new(tokio::spawn(worker.run_until(async move {
                stop.await;
                tracing::info!("worker.draining");
                Ok::<(), std::io::Error>(())
            })));
            let drain_limit = settings.worker.shutdown_timeout;
            let (result, timed_out) = tokio::select! {
                joined = &mut running => (joined.unwrap_or_else(|e| {
                    let what = if e.is_panic() { "a job panicked" } else { "the worker's task was cancelled" };
                    Err(apalis_core::error::WorkerError::PanicError(what.into()))
                }), false),
                () = async {
                    stopped().await;
                    tokio::time::sleep_until(*self.stop_seen.get_or_init(tokio::time::Instant::now) + drain_limit).await;
                } => {
                    if !self.drain_timed_out.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        tracing::warn!(
                            timeout_secs = drain_limit.as_secs(),
                            "worker.drain_timed_out; the jobs still running stop here and another worker takes them back"
                        );
                        ctx.metrics
                            .counter("tidings_worker_drain_timeouts_total", "Drains cut short by SHUTDOWN_TIMEOUT_SECS.", &[])
                            .inc();
                    }
                    (Ok(()), true)
                }
            };
            if timed_out {
                // Aborted and waited for, so its jobs are dropped (their tasks aborted) before
                // the process goes on to exit; a lock not released in time lapses by itself.
                running.abort();
                let _ = (&mut running).await;
            }
            drop(running);
            slots.retire();
            drain_beat.abort();
            if result.is_ok() && !timed_out {
                deregister(&ctx.queue, &name).await;
            }
            match result {
                Ok(()) => return Ok(()),
                Err(e) if *self.stop_tx.borrow() => {
                    return Err(anyhow::anyhow!("worker {name} failed while stopping: {e}"));
                }
                Err(e) => {
                    in_a_row = deaths_in_a_row(in_a_row, built.elapsed());
                    ctx.metrics.counter("tidings_worker_restarts_total", "Dead apalis workers rebuilt.", &[]).inc();
                    let wait = restart_delay(in_a_row);
                    let mut restarts = 0;
                    self.update(|h| {
                        h.set_loop(index, &name, true);
                        h.report.restarts += 1;
                        h.report.last_error = Some(e.to_string());
                        restarts = h.report.restarts;
                    });
                    tracing::error!(worker = %name, error = %e, restarts, retry_in_ms = wait.as_millis() as u64, "worker.died");
                    tokio::select! {
                        () = stopped() => return Ok(()),
                        () = tokio::time::sleep(wait) => {}
                    }
                    name = worker_name(shared::jobs::FAN_OUT_QUEUE);
                }
            }
        }
    }
}

/// Backoff between restarts of a dead worker: 0.5 s doubling up to 30 s, by its deaths in
/// a row.
fn restart_delay(in_a_row: u32) -> Duration {
    Duration::from_millis(500).saturating_mul(1 << in_a_row.saturating_sub(1).min(6)).min(Duration::from_secs(30))
}

/// A worker that ran this long before it died was healthy: its death starts a new count.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// The deaths in a row after a worker that ran for `ran` died, `before` deaths having
/// come before it in a row.
fn deaths_in_a_row(before: u32, ran: Duration) -> u32 {
    if ran >= HEALTHY_RUN { 1 } else { before.saturating_add(1) }
}

/// `GET /metrics` of the worker: its counters and histograms, plus the queue's depth and
/// dead letters read at scrape time.
fn metrics_endpoint(ctx: Process) -> impl poem::Endpoint {
    poem::Route::new().at(
        "/metrics",
        poem::get(poem::endpoint::make(move |_| {
            let ctx = ctx.clone();
            async move {
                let backlog = ctx.queue.backlog().await.map(|b| b as f64).unwrap_or(f64::NAN);
                let dead = ctx.queue.dead_letter_count().await.map(|d| d as f64).unwrap_or(f64::NAN);
                shared::telemetry::count_dropped_lines(&ctx.metrics);
                let text = ctx.metrics.render(&[
                    ("tidings_queue_backlog", "Jobs waiting in Redis (due and pending).", backlog),
                    ("tidings_dead_letters", "Jobs kept as dead letters.", dead),
                ]);
                poem::Response::builder().content_type("text/plain; version=0.0.4").body(text)
            }
        })),
    )
}

/// This machine's name (`HOSTNAME`, else `/etc/hostname`).
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into())
}

/// Publishes this process's report every few seconds until stopped, then withdraws it.
async fn report_health(health: Arc<std::sync::Mutex<Health>>, queue: JobQueue, stop: impl Future<Output = ()>) {
    let mut conn = queue.connection();
    let namespace = queue.namespace().to_owned();
    tokio::pin!(stop);
    loop {
        let report = match health.lock() {
            Ok(mut health) => {
                health.report.reported_at = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC").to_string();
                health.report.clone()
            }
            Err(_) => return,
        };
        if let Err(e) = worker_health::publish(&mut conn, &namespace, &report).await {
            tracing::debug!(error = %e, "worker.health_report_failed");
        }
        tokio::select! {
            () = &mut stop => break,
            () = tokio::time::sleep(worker_health::REPORT_EVERY) => {}
        }
    }
    let process = health.lock().map(|h| h.report.process.clone()).unwrap_or_default();
    let _ = worker_health::withdraw(&mut conn, &namespace, &process).await;
}

/// Heartbeats every quarter of the recovery bound, and a worker silent for three of them
/// counts as dead: another worker's next heartbeat then takes its jobs back, so a killed
/// worker's jobs wait at most about the bound (apalis' default is 300 s).
fn recovery_config(config: apalis_redis::Config, bound: std::time::Duration) -> apalis_redis::Config {
    config.heartbeat_interval(heartbeat_interval(bound)).missed_heartbeats(3)
}

/// Removes worker `name`'s registration once it has drained (called only after a clean
/// drain), so `worker status` counts it gone at once (apalis-redis's own clean stop
/// removes another member of the set, and the registration would stay until another
/// worker's heartbeat found it silent).
///
/// The jobs still in its in-flight set then are ones it fetched and never started: a
/// fetch that was on its way to Redis when the loop stopped, whose reply apalis-core
/// drops (the jobs it had buffered, apalis-core puts back itself). Every job the loop
/// started has finished and been acknowledged by then. So the same script puts those
/// back at the head of the queue, where they were (another worker's orphan recovery
/// would have put them at its tail), and at once rather than after
/// `WORKER_RECOVERY_SECS`: a rolling restart under load does not hold a few messages
/// back by the recovery bound.
///
/// Nothing of the stop itself wakes the other workers (apalis-core puts its buffered
/// jobs back with no `PUBLISH`, where a producer's push comes with one): if jobs wait on
/// the queue now, the same script wakes them, or they would find those only on their
/// next wake or fallback poll (`QUEUE_POLL_MS`). A job due later does not count.
async fn deregister(queue: &JobQueue, name: &str) {
    const SCRIPT: &str = "local held = redis.call('SMEMBERS', KEYS[2]) \
        if #held > 0 then redis.call('LPUSH', KEYS[3], unpack(held)) redis.call('DEL', KEYS[2]) end \
        redis.call('ZREM', KEYS[1], ARGV[1]) \
        if redis.call('LLEN', KEYS[3]) + redis.call('ZCOUNT', KEYS[4], 0, ARGV[4]) > 0 then \
        redis.call('PUBLISH', ARGV[2], ARGV[3]) end \
        return #held";
    let config = queue.fan_out_config();
    let inflight = queue.inflight_set_of(name);
    let released: redis::RedisResult<i64> = redis::cmd("EVAL")
        .arg(SCRIPT)
        .arg(4)
        .arg(config.workers_set())
        .arg(inflight)
        .arg(config.active_jobs_list())
        .arg(config.scheduled_jobs_set())
        .arg(name)
        .arg(shared::queue::wake_channel(queue.namespace()))
        .arg(shared::jobs::FAN_OUT_QUEUE)
        .arg(chrono::Utc::now().timestamp())
        .query_async(&mut queue.connection())
        .await;
    match released {
        Ok(0) => {}
        Ok(jobs) => tracing::info!(worker = %name, jobs, "worker.unstarted_jobs_requeued"),
        // Left registered: its jobs are taken back as orphans after the recovery bound.
        Err(e) => tracing::warn!(worker = %name, error = %e, "worker.deregister_failed"),
    }
}

/// A quarter of the recovery bound.
fn heartbeat_interval(bound: std::time::Duration) -> std::time::Duration {
    (bound / 4).max(std::time::Duration::from_millis(250))
}

/// Refreshes worker `name`'s registration every `every` while it drains (apalis-redis's
/// heartbeat does not run then), so its in-flight jobs are not taken for orphans and run
/// a second time elsewhere. `XX`: a registration that is gone is not recreated.
async fn keep_registered_while_draining(queue: &JobQueue, name: &str, every: std::time::Duration) {
    let mut conn = queue.connection();
    let workers = queue.fan_out_config().workers_set();
    loop {
        let now = chrono::Utc::now().timestamp();
        let refreshed: redis::RedisResult<i64> =
            redis::cmd("ZADD").arg(&workers).arg("XX").arg("CH").arg(now).arg(name).query_async(&mut conn).await;
        if let Err(e) = refreshed {
            tracing::debug!(error = %e, "worker.drain_heartbeat_failed");
        }
        tokio::time::sleep(every).await;
    }
}

pub(crate) fn sender_config(settings: &Settings, private_key: SecretString) -> PushSenderConfig {
    PushSenderConfig {
        vapid_private_key: private_key,
        vapid_subject: settings.push.vapid_subject.clone(),
        ttl: settings.push.ttl,
        request_timeout: settings.push.request_timeout,
        allowed_hosts: settings.push.allowed_hosts.clone(),
    }
}

async fn wait_for_stop(mut rx: watch::Receiver<bool>) {
    // An error means every sender is gone: nobody can stop us any more, so stop now.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The apalis handler of the fan-out queue: runs each job in a task of its own
/// ([`run_job`]).
///
/// apalis-core polls every job inside the worker's own future, and each time that
/// future is woken its storage builds a fetch (apalis-redis hashes the fetch script
/// anew each time, and the fetch gate answers it): run in place, each reply to a job —
/// from Redis, PostgreSQL, the push service — woke the worker and cost such a fetch,
/// about fourteen per message at 50/s. In a task of its own, a job's replies wake only
/// the job.
///
/// The job lives exactly as long as this handler: when apalis drops it (the worker died,
/// and every job in flight with it), the job is aborted at its next await, as it was when
/// it ran in place — its lock is released, its claims lapse and the job is taken back
/// like any other orphan, never run twice at once. A job that panics takes the worker
/// down with it, as before; the worker is then rebuilt (a job that keeps panicking is
/// set aside by its start count, like one that crashes its process).
async fn handle_fan_out(
    job: RawJob,
    ctx: Data<Process>,
    slots: Data<Arc<LoopSlots>>,
    attempt: Attempt,
    task_id: TaskId,
    meta: MetadataStore,
) -> Result<(), JobError> {
    // The job leaves its loop's hands however it ends.
    struct Finished(Arc<LoopSlots>);
    impl Drop for Finished {
        fn drop(&mut self) {
            self.0.finished();
        }
    }
    let _finished = Finished(Arc::clone(&slots));
    let task = task_id.clone();
    match AbortOnDropHandle::new(tokio::spawn(run_job(job, ctx, attempt.current(), task_id, meta))).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => {
            tracing::error!(task = %task, "job.panicked");
            std::panic::resume_unwind(e.into_panic())
        }
        // Only when the runtime shuts down: the job did not finish, and apalis runs it again.
        Err(e) => Err(JobError::retryable(anyhow::anyhow!("the job's task was cancelled: {e}"))),
    }
}

/// Runs one job of the fan-out queue: parses the payload, runs the job in a span that
/// names it (task, kind, attempt, the request that enqueued it), and settles failures
/// itself: a retryable one is scheduled again under the kind's retry policy, a
/// permanent one or the last attempt is dead-lettered. apalis only ever sees success,
/// so its fixed retry schedule never applies.
async fn run_job(
    job: RawJob,
    ctx: Data<Process>,
    attempt: usize,
    task_id: TaskId,
    meta: MetadataStore,
) -> Result<(), JobError> {
    let parsed = QueuedJob::parse(&job.0);
    let kind = parsed.as_ref().map_or("unreadable", QueuedJob::kind);
    let request_id = meta.get(queue_meta::REQUEST_ID).unwrap_or("-");
    let span = tracing::info_span!("job", task = %task_id, kind, attempt, request_id);
    async move {
        // A job with a unique key runs at most once at a time across all workers; a second
        // copy waits its turn (deferred a second, its attempt not counted).
        // The start is counted (poison jobs, below) in the lock's round trip.
        let starts_key = starts_key(&ctx, &task_id);
        let (mut lock, starts) = match parsed.as_ref().ok().and_then(QueuedJob::unique_key) {
            Some(key) => match shared::lock::try_acquire_with::<u64>(
                &ctx.queue.connection(),
                ctx.queue.namespace(),
                &key,
                job_lock_ttl(&ctx),
                |pipe| {
                    pipe.incr(&starts_key, 1).expire(&starts_key, START_COUNT_TTL_SECS).ignore();
                },
            )
            .await
            {
                Ok((Some(guard), starts)) => (Some(guard), starts),
                Ok((None, _)) => return defer_locked(&ctx, job.0, attempt, &task_id, &meta, kind, &key).await,
                Err(e) => {
                    // Redis is failing us; the job is idempotent, so run it unlocked.
                    tracing::warn!(lock = %key, error = %e, "job.lock_failed");
                    (None, 0)
                }
            },
            None => (None, count_start(&ctx, &starts_key).await),
        };
        let result = async {
            let waited = meta
                .get(queue_meta::DUE_AT_MS)
                .and_then(|v| v.parse::<i64>().ok())
                .map(|due_ms| std::time::Duration::from_millis(millis_since(due_ms)));
            ctx.metrics.counter("tidings_jobs_started_total", "Jobs started, by kind.", &[("kind", kind)]).inc();
            if let Some(waited) = waited {
                ctx.metrics
                    .histogram(
                        "tidings_job_queue_wait_seconds",
                        "Time from when a job was due to when a worker started it, by kind.",
                        &[("kind", kind)],
                    )
                    .observe(waited);
            }
            // Poison jobs: a job started again and again without ever returning is taking its
            // worker down with it (a crash, an OOM kill). Past POISON_AFTER starts it is set aside.
            if starts > ctx.settings.worker.poison_after {
                let reason = format!("started {starts} times without finishing: it may be crashing its worker");
                tracing::error!(starts, "job.poison");
                account(&ctx, &task_id, &mut lock, kind, "dead", std::time::Duration::ZERO, waited).await;
                return dead_letter(&ctx, job.0, reason, attempt).await;
            }
            let started = std::time::Instant::now();
            let result = crate::jobs::run(parsed, &ctx).await;
            let took = started.elapsed();
            match result {
                Ok(()) => {
                    account(&ctx, &task_id, &mut lock, kind, "succeeded", took, waited).await;
                    Ok(())
                }
                Err(JobError::Permanent(reason)) => {
                    tracing::error!(%reason, "job.dead_lettered");
                    account(&ctx, &task_id, &mut lock, kind, "dead", took, waited).await;
                    dead_letter(&ctx, job.0, reason, attempt).await
                }
                Err(JobError::Retryable { error, retry_after, rest }) => {
                    let payload = rest.unwrap_or(job.0);
                    let policy = ctx.settings.worker.retry_policy(kind);
                    if attempt >= policy.max_attempts as usize {
                        let reason = format!("gave up after {attempt} attempts: {error:#}");
                        tracing::error!(%reason, "job.dead_lettered");
                        account(&ctx, &task_id, &mut lock, kind, "dead", took, waited).await;
                        return dead_letter(&ctx, payload, reason, attempt).await;
                    }
                    account(&ctx, &task_id, &mut lock, kind, "retried", took, waited).await;
                    let attempts = u32::try_from(attempt).unwrap_or(u32::MAX);
                    let wait = crate::jobs::backoff::delay(attempts, policy.base, policy.cap, retry_after);
                    let fan_out = shared::jobs::QueuedJob::dispatch_of(&payload);
                    match ctx.queue.schedule_retry(payload, attempt, wait, &task_id.to_string(), &meta).await {
                        Ok(next) => {
                            // The relay takes a record enqueued long ago and never completed
                            // for lost: this one is waiting for its retry, not lost.
                            if let Some(dispatch_id) = fan_out
                                && let Err(e) = shared::queries::dispatch::touch_enqueued(&ctx.db, dispatch_id).await
                            {
                                tracing::debug!(dispatch_id, error = %e, "dispatch.touch_failed");
                            }
                            tracing::warn!(
                                error = %format!("{error:#}"),
                                next_task = %next,
                                retry_in_ms = wait.as_millis() as u64,
                                max_attempts = policy.max_attempts,
                                "job.retry_scheduled"
                            );
                            Ok(())
                        }
                        Err(e) => {
                            // Redis failed us: leave the job to apalis (it re-runs it later).
                            tracing::warn!(error = %e, "job.retry_not_scheduled");
                            Err(JobError::retryable(error))
                        }
                    }
                }
            }
        }
        .await;
        if let Some(lock) = lock
            && let Err(e) = lock.release().await
        {
            tracing::debug!(error = %e, "job.lock_release_failed");
        }
        result
    }
    .instrument(span)
    .await
}

/// How long a job's lock outlives a worker that died holding it: half the recovery
/// bound, so the job's orphaned copy finds it free by the time it is taken back.
fn job_lock_ttl(ctx: &Process) -> std::time::Duration {
    (ctx.settings.worker.recovery / 2).max(std::time::Duration::from_secs(1))
}

/// Puts a job whose lock another worker holds back on the queue for a second later,
/// with the same attempt number.
async fn defer_locked(
    ctx: &Process,
    payload: Vec<u8>,
    attempt: usize,
    task_id: &TaskId,
    meta: &MetadataStore,
    kind: &'static str,
    key: &str,
) -> Result<(), JobError> {
    // Its start was counted with the attempt, but this task did not run: take it back.
    let _: redis::RedisResult<i64> =
        redis::AsyncCommands::decr(&mut ctx.queue.connection(), starts_key(ctx, task_id), 1).await;
    let again = std::time::Duration::from_secs(1);
    let failed = attempt.saturating_sub(1);
    match ctx.queue.schedule_retry(payload, failed, again, &task_id.to_string(), meta).await {
        Ok(next) => {
            tracing::info!(lock = %key, next_task = %next, "job.deferred_while_locked");
            ctx.metrics
                .counter(
                    "tidings_jobs_deferred_total",
                    "Jobs put back because another worker ran the same key.",
                    &[("kind", kind)],
                )
                .inc();
            Ok(())
        }
        Err(e) => Err(JobError::retryable(e)),
    }
}

fn starts_key(ctx: &Process, task_id: &TaskId) -> String {
    format!("{}:job-starts:{task_id}", ctx.queue.namespace())
}

/// How long a job's start count is kept.
const START_COUNT_TTL_SECS: i64 = 24 * 3600;

/// Counts a start of a job at its start-count `key`; 0 when Redis does not answer.
async fn count_start(ctx: &Process, key: &str) -> u64 {
    let mut conn = ctx.queue.connection();
    redis::pipe()
        .incr(key, 1)
        .expire(key, START_COUNT_TTL_SECS)
        .ignore()
        .query_async::<(u64,)>(&mut conn)
        .await
        .map(|(n,)| n)
        .unwrap_or(0)
}

/// Keeps `payload` as a dead letter; completing the job keeps apalis from retrying it.
///
/// A fan-out's dispatch record is completed too, or the relay would enqueue the job again
/// each time it looked lost (a job that crashes its workers, a failure no rerun mends,
/// again and again), and *Discard* would not stop it; a hand retry of the letter opens it
/// again (`JobQueue::retry_dead_letter`). Should that write fail (the database is down,
/// the usual reason a fan-out runs out of attempts), the record stays open and the relay
/// runs the job again once the database is back.
async fn dead_letter(ctx: &Process, payload: Vec<u8>, reason: String, attempt: usize) -> Result<(), JobError> {
    let fan_out = shared::jobs::QueuedJob::dispatch_of(&payload);
    let letter = DeadLetter {
        id: String::new(),
        queue: shared::jobs::FAN_OUT_QUEUE.to_owned(),
        payload: String::from_utf8_lossy(&payload).into_owned(),
        error: reason,
        attempt,
        at: chrono::Utc::now().to_rfc3339(),
    };
    ctx.queue.dead_letter(&letter).await.map_err(JobError::retryable)?;
    if let Some(dispatch_id) = fan_out
        && let Err(e) = shared::queries::dispatch::mark_completed(&ctx.db, dispatch_id).await
    {
        tracing::warn!(dispatch_id, error = %e, "dispatch.complete_failed; the relay will run the dead letter's job again");
    }
    Ok(())
}

/// Milliseconds from `then_ms` (since the epoch) to now; 0 for the future.
fn millis_since(then_ms: i64) -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis().saturating_sub(then_ms)).unwrap_or(0)
}

/// Counts and times a finished run (`outcome` is succeeded, retried or dead), forgets
/// its start count and releases its lock, in one round trip to Redis.
async fn account(
    ctx: &Process,
    task_id: &TaskId,
    lock: &mut Option<shared::lock::LockGuard>,
    kind: &'static str,
    outcome: &'static str,
    took: std::time::Duration,
    waited: Option<std::time::Duration>,
) {
    ctx.metrics
        .counter("tidings_jobs_total", "Jobs run, by kind and outcome.", &[("kind", kind), ("outcome", outcome)])
        .inc();
    ctx.metrics
        .histogram("tidings_job_duration_seconds", "How long jobs ran, by kind.", &[("kind", kind)])
        .observe(took);
    let mut conn = ctx.queue.connection();
    let as_ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let now = chrono::Utc::now().timestamp();
    let (run_ms, wait_ms) = (as_ms(took), waited.map_or(0, as_ms));
    let succeeded = outcome == "succeeded";
    let mut pipe = redis::pipe();
    pipe.del(starts_key(ctx, task_id)).ignore();
    shared::job_stats::add_to(&mut pipe, ctx.queue.namespace(), now, succeeded, run_ms, wait_ms);
    if let Some(lock) = lock.take() {
        lock.release_in(&mut pipe);
    }
    if let Err(e) = pipe.query_async::<()>(&mut conn).await {
        tracing::debug!(error = %e, "job_stats.record_failed");
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("worker.shutdown_requested");
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio_util::task::AbortOnDropHandle;

    use super::{deaths_in_a_row, restart_delay};

    #[test]
    fn from_a_concurrency_of_16_two_fetch_loops_share_it() {
        assert_eq!(super::loop_concurrency(64), vec![32, 32]);
        assert_eq!(super::loop_concurrency(17), vec![9, 8]);
        assert_eq!(super::loop_concurrency(16), vec![8, 8]);
        assert_eq!(super::loop_concurrency(15), vec![15]);
        assert_eq!(super::loop_concurrency(1), vec![1]);
    }

    #[test]
    fn the_restart_backoff_starts_again_after_a_worker_ran_for_a_while() {
        let quick = Duration::from_secs(1);
        let mut in_a_row = 0;
        for _ in 0..10 {
            in_a_row = deaths_in_a_row(in_a_row, quick);
        }
        assert_eq!(restart_delay(in_a_row), Duration::from_secs(30), "ten quick deaths wait the longest");
        in_a_row = deaths_in_a_row(in_a_row, Duration::from_secs(3600));
        assert_eq!(restart_delay(in_a_row), Duration::from_millis(500), "after an hour's run, the shortest wait");
        assert_eq!(restart_delay(deaths_in_a_row(in_a_row, quick)), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_job_task_ends_with_the_handler_that_waits_for_it() {
        /// Raises its flag when the job's future is dropped (the job ended, or was aborted).
        struct Ended(Arc<AtomicBool>);
        impl Drop for Ended {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let ended = Arc::new(AtomicBool::new(false));
        let guard = Ended(Arc::clone(&ended));
        let job = AbortOnDropHandle::new(tokio::spawn(async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }));
        // The handler gives up on the job (its worker died) long before the job would end.
        assert!(tokio::time::timeout(Duration::from_millis(5), job).await.is_err());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !ended.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(ended.load(Ordering::SeqCst), "the job went on after its handler was dropped");

        // Awaited to the end, the job's own answer comes back.
        assert_eq!(AbortOnDropHandle::new(tokio::spawn(async { 7 })).await.expect("the job ran"), 7);
    }
}
