//! apalis wiring the stock defaults get wrong (see `docs/ARCHITECTURE.md`):
//!
//! - [`wake_strategy`]: the poll strategy. apalis-redis's interval poller can stall until
//!   the 30 s heartbeat, so workers fetch when a producer `PUBLISH`es on the wake
//!   channel, plus on a fallback timer that re-arms itself correctly (tokio's interval).
//! - [`GatedConnection`]: the storage's connection, which lets a fetch reach Redis only
//!   when it may find something. apalis-core's poll loop ignores the poll strategy's
//!   answer and fetches again whenever the worker's loop is woken (a job starting or
//!   finishing), which made seven fetch scripts per message, five of them empty.
//! - [`Periodic`]: periodic work that runs once per tick across all worker processes:
//!   each tick is claimed with `SET NX PX` in Redis, so no process is special and any
//!   of them may die without stopping the schedule.
//! - [`worker_name`]: a name unique per process start, so a restarted worker never
//!   waits for its previous incarnation's registration to expire.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis_core::backend::ext::poll_strategy::{PollSnapshot, PollStrategy};
use futures::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{AsyncCommands, Cmd, RedisFuture, Value};
use shared::metrics::{Counter, Registry};
use tokio::sync::mpsc;

/// A name for this worker process that no other process has used.
pub fn worker_name(queue: &str) -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "worker".into());
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{queue}-{host}-{}-{}", std::process::id(), &id[..8])
}

/// Wakes the worker's fetch loop: once per message on the wake channel and every
/// `fallback` at the latest, and opens `gate` for each wake. Reconnects to Redis by itself.
pub fn wake_strategy(redis_url: &str, channel: String, fallback: Duration, gate: Arc<FetchGate>) -> WakeStrategy {
    let (tx, rx) = mpsc::channel::<()>(1);
    gate.set_rewake(tx.clone());
    let timer_tx = tx.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(fallback);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            // A full channel already holds a pending wake: dropping this one is fine.
            if let Err(mpsc::error::TrySendError::Closed(())) = timer_tx.try_send(()) {
                return;
            }
        }
    });
    let redis_url = redis_url.to_owned();
    tokio::spawn(async move {
        loop {
            if tx.is_closed() {
                return;
            }
            if let Err(e) = forward_wakes(&redis_url, &channel, &tx).await {
                tracing::warn!(error = %e, "queue.wake_subscription_lost; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    WakeStrategy { wakes: rx, gate }
}

/// The poll strategy [`wake_strategy`] builds.
///
/// Unlike apalis' stream strategy it drains every pending wake and always leaves its
/// waker registered, so a wake can never be consumed without arming the next one (the
/// way the stock interval poller stalls until the heartbeat). apalis-core drops its
/// answer, so each wake is recorded in the [`FetchGate`], which is what lets a fetch
/// through.
#[derive(Debug)]
pub struct WakeStrategy {
    wakes: mpsc::Receiver<()>,
    gate: Arc<FetchGate>,
}

impl PollStrategy for WakeStrategy {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut woken = false;
        loop {
            match self.wakes.poll_recv(cx) {
                Poll::Ready(Some(())) => woken = true,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => break,
            }
        }
        if woken {
            self.gate.wake();
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

async fn forward_wakes(redis_url: &str, channel: &str, tx: &mpsc::Sender<()>) -> redis::RedisResult<()> {
    let client = redis::Client::open(redis_url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    let mut messages = pubsub.on_message();
    while messages.next().await.is_some() {
        // A full channel already holds a pending wake, which covers this message too.
        if tx.try_send(()).is_err() && tx.is_closed() {
            return Ok(());
        }
    }
    Err(redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connection closed")))
}

/// Whether the worker's next fetch may find a job: a wake came after the last fetch
/// that came back short of a full batch.
///
/// Wakes are counted, and a short fetch settles the count it started under. A wake that
/// lands while a fetch is in flight keeps the gate open, and since apalis-core does not
/// poll again after a fetch comes back empty (it waits for the worker's next wake), the
/// gate then wakes the poll loop itself, so that job is fetched at once. A fetch that
/// fills its batch leaves the gate open: more may be waiting. A job that reaches
/// Redis without a wake (a retry coming due, a `PUBLISH` lost with a dropped
/// subscription) waits at most for the fallback timer's wake (`QUEUE_POLL_MS`), as it did
/// before the gate.
#[derive(Debug)]
pub struct FetchGate {
    wakes: AtomicU64,
    settled: AtomicU64,
    /// The poll strategy's wake channel.
    rewake: OnceLock<mpsc::Sender<()>>,
    /// Fetches that reached Redis and found jobs (or a reply the gate cannot read).
    found: Arc<Counter>,
    /// Fetches that reached Redis and found none.
    empty: Arc<Counter>,
    /// Fetches the gate answered itself.
    skipped: Arc<Counter>,
}

impl FetchGate {
    /// An open gate (a worker's first fetch always goes through), counting fetches in
    /// `tidings_queue_fetches_total{result}`.
    pub fn new(metrics: &Registry) -> Arc<Self> {
        let help = "The worker's fetches of jobs from Redis, by result (`skipped`: held back by the gate).";
        let counter = |result| metrics.counter("tidings_queue_fetches_total", help, &[("result", result)]);
        Arc::new(Self {
            wakes: AtomicU64::new(1),
            settled: AtomicU64::new(0),
            rewake: OnceLock::new(),
            found: counter("jobs"),
            empty: counter("empty"),
            skipped: counter("skipped"),
        })
    }

    fn set_rewake(&self, wakes: mpsc::Sender<()>) {
        let _ = self.rewake.set(wakes);
    }

    fn wake(&self) {
        self.wakes.fetch_add(1, Ordering::AcqRel);
    }

    /// The wake count a fetch starts under, or `None` while nothing can have arrived.
    fn open(&self) -> Option<u64> {
        let wakes = self.wakes.load(Ordering::Acquire);
        (wakes != self.settled.load(Ordering::Acquire)).then_some(wakes)
    }

    /// Records a fetch that started under wake count `seen` and found `jobs` (`None`: a
    /// reply of another shape) in batches of `batch`.
    fn fetched(&self, seen: u64, jobs: Option<usize>, batch: usize) {
        if jobs == Some(0) { &self.empty } else { &self.found }.inc();
        // A full batch, or a reply this gate does not understand: fetch again.
        if jobs.is_none_or(|n| n >= batch) {
            return;
        }
        self.settled.fetch_max(seen, Ordering::AcqRel);
        if self.open().is_some()
            && let Some(wakes) = self.rewake.get()
        {
            // A full channel already holds a wake, which does the same.
            let _ = wakes.try_send(());
        }
    }
}

/// The worker storage's connection to Redis: every command goes through, except the
/// fetch script while its [`FetchGate`] is closed, which is answered "no jobs" at once.
#[derive(Clone)]
pub struct GatedConnection {
    inner: ConnectionManager,
    gate: Arc<FetchGate>,
    /// The fetch script's second and fifth keys: this queue's active list and signal list.
    active_list: Arc<str>,
    signal_list: Arc<str>,
    batch: usize,
}

impl GatedConnection {
    /// `inner`, gating the fetches of the queue `config` describes.
    pub fn new(inner: ConnectionManager, config: &apalis_redis::Config, gate: Arc<FetchGate>) -> Self {
        Self {
            inner,
            gate,
            active_list: config.active_jobs_list().into(),
            signal_list: config.signal_list().into(),
            batch: config.batch_size,
        }
    }

    /// Whether `cmd` is apalis-redis's fetch script for this queue: `EVALSHA` (or `EVAL`)
    /// with seven keys, the active list second and the signal list fifth.
    fn is_fetch(&self, cmd: &Cmd) -> bool {
        let mut args = cmd.args_iter().map(|a| match a {
            redis::Arg::Simple(bytes) => bytes,
            _ => &[],
        });
        let Some(name) = args.next() else { return false };
        if !(name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL")) {
            return false;
        }
        // The script (or its SHA), the key count, then the keys.
        args.nth(1) == Some(b"7".as_slice())
            && args.nth(1) == Some(self.active_list.as_bytes())
            && args.nth(2) == Some(self.signal_list.as_bytes())
    }
}

/// The reply of a fetch that found nothing: no job data, no metadata.
fn no_jobs() -> Value {
    Value::Array(vec![Value::Array(Vec::new()), Value::Array(Vec::new())])
}

/// How many jobs a fetch's reply holds; `None` for a reply of another shape.
fn jobs_in(reply: &Value) -> Option<usize> {
    match reply {
        Value::Array(parts) => match parts.first() {
            Some(Value::Array(jobs)) => Some(jobs.len()),
            _ => None,
        },
        _ => None,
    }
}

impl ConnectionLike for GatedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if !self.is_fetch(cmd) {
            return self.inner.req_packed_command(cmd);
        }
        let Some(seen) = self.gate.open() else {
            self.gate.skipped.inc();
            return Box::pin(std::future::ready(Ok(no_jobs())));
        };
        Box::pin(async move {
            let reply = self.inner.req_packed_command(cmd).await?;
            self.gate.fetched(seen, jobs_in(&reply), self.batch);
            Ok(reply)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// Periodic work shared by all worker processes: each tick runs in exactly one of them.
#[derive(Clone)]
pub struct Periodic {
    conn: ConnectionManager,
    namespace: String,
}

impl Periodic {
    /// Periodic work on the Redis of `conn`, keys under `namespace`.
    pub fn new(conn: ConnectionManager, namespace: &str) -> Self {
        Self { conn, namespace: namespace.to_owned() }
    }

    /// Claims tick `tick` of task `name`; true for exactly one caller per tick.
    ///
    /// Ticks are numbered by each host's clock, so a claim is kept for four ticks and at
    /// least [`TICK_CLAIM_MIN_TTL`]: a host whose clock is behind by less than that
    /// reaches the tick while its claim still stands, and does not run it again.
    pub async fn claim(&self, name: &str, tick: u64, every: Duration) -> redis::RedisResult<bool> {
        let key = format!("{}:tick:{name}:{tick}", self.namespace);
        let ttl = u64::try_from((every * 4).max(TICK_CLAIM_MIN_TTL).as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(worker_pid_tag())
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            // A bounded history of who ran which tick (for `worker status` and tests).
            let runs = runs_key(&self.namespace, name);
            let _: () = redis::pipe()
                .rpush(&runs, format!("{tick} {}", std::process::id()))
                .ignore()
                .ltrim(&runs, -RUN_HISTORY, -1)
                .ignore()
                .query_async(&mut conn)
                .await?;
        }
        Ok(set.is_some())
    }

    /// The remembered runs of `name`, oldest first, as (tick, process id).
    pub async fn runs(&self, name: &str) -> redis::RedisResult<Vec<(u64, u32)>> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = conn.lrange(runs_key(&self.namespace, name), 0, -1).await?;
        Ok(raw
            .iter()
            .filter_map(|r| {
                let (tick, pid) = r.split_once(' ')?;
                Some((tick.parse().ok()?, pid.parse().ok()?))
            })
            .collect())
    }

    /// Runs `work` once per `every` (aligned to wall-clock multiples of `every`, so all
    /// processes agree on tick numbers) until `stop` resolves.
    pub async fn every<F, Fut>(self, name: &'static str, every: Duration, stop: impl Future<Output = ()>, work: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        let every = every.max(Duration::from_millis(10));
        let period_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        tokio::pin!(stop);
        loop {
            let now_ms = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis())
                .unwrap_or(u64::MAX);
            let tick = now_ms / period_ms;
            let next = (tick + 1) * period_ms;
            match self.claim(name, tick, every).await {
                Ok(true) => self.run_alone(name, tick, &work).await,
                Ok(false) => {}
                Err(e) => tracing::warn!(task = name, error = %e, "periodic.claim_failed"),
            }
            let wait = Duration::from_millis(next.saturating_sub(now_ms));
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs the work of a claimed tick unless a run of an earlier tick is still in flight
    /// (in any process): one trim, one relay pass at a time. The lock expires
    /// [`PERIODIC_LOCK_TTL`] after a process that died holding it.
    async fn run_alone<F, Fut>(&self, name: &'static str, tick: u64, work: &F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        let key = format!("periodic:{name}");
        match shared::lock::try_acquire(&self.conn, &self.namespace, &key, PERIODIC_LOCK_TTL).await {
            Ok(Some(lock)) => {
                work().await;
                if let Err(e) = lock.release().await {
                    tracing::debug!(task = name, error = %e, "periodic.unlock_failed");
                }
            }
            Ok(None) => tracing::info!(task = name, tick, "periodic.skipped_previous_run_in_flight"),
            Err(e) => tracing::warn!(task = name, error = %e, "periodic.lock_failed"),
        }
    }

    /// Number of ticks of `name` claimed and still remembered (for tests and status).
    pub async fn remembered_ticks(&self, name: &str) -> redis::RedisResult<usize> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = conn.keys(format!("{}:tick:{name}:*", self.namespace)).await?;
        Ok(keys.len())
    }
}

/// The shortest a tick's claim is kept: the most two worker hosts' clocks may differ
/// without a tick running twice.
pub const TICK_CLAIM_MIN_TTL: Duration = Duration::from_secs(120);

/// How long a periodic task's lock outlives a process that died holding it.
pub const PERIODIC_LOCK_TTL: Duration = Duration::from_secs(30);

/// Runs remembered per periodic task.
const RUN_HISTORY: isize = 1000;

/// The list of `name`'s recent runs.
pub fn runs_key(namespace: &str, name: &str) -> String {
    format!("{namespace}:periodic:{name}:runs")
}

fn worker_pid_tag() -> String {
    format!("pid-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> (Arc<FetchGate>, mpsc::Receiver<()>) {
        let gate = FetchGate::new(&Registry::new());
        let (tx, rx) = mpsc::channel(1);
        gate.set_rewake(tx);
        (gate, rx)
    }

    #[test]
    fn a_short_fetch_closes_the_gate_until_the_next_wake() {
        let (gate, mut rewakes) = gate();
        let seen = gate.open().expect("a worker's first fetch goes through");
        gate.fetched(seen, Some(3), 10);
        assert_eq!(gate.open(), None, "nothing can have arrived since");
        assert!(rewakes.try_recv().is_err(), "no wake of its own");
        gate.wake();
        assert!(gate.open().is_some(), "a wake opens it");
    }

    #[test]
    fn a_full_batch_or_an_unknown_reply_leaves_the_gate_open() {
        let (gate, _rewakes) = gate();
        let seen = gate.open().expect("open");
        gate.fetched(seen, Some(10), 10);
        assert!(gate.open().is_some(), "more may be waiting");
        gate.fetched(seen, None, 10);
        assert!(gate.open().is_some(), "a reply it cannot read");
    }

    #[test]
    fn a_wake_during_an_empty_fetch_wakes_the_poll_loop_again() {
        // apalis-core does not poll after an empty fetch; the wake drained while the
        // fetch was in flight would otherwise wait for the fallback timer.
        let (gate, mut rewakes) = gate();
        let seen = gate.open().expect("open");
        gate.wake();
        gate.fetched(seen, Some(0), 10);
        assert!(gate.open().is_some(), "the wake that came during the fetch still counts");
        assert!(rewakes.try_recv().is_ok(), "and the poll loop is woken to fetch for it");
    }

    #[test]
    fn worker_names_are_unique_per_start() {
        assert_ne!(worker_name("q"), worker_name("q"));
        assert!(worker_name("q").starts_with("q-"));
    }
}
