//! apalis wiring the stock defaults get wrong (see `docs/ARCHITECTURE.md`):
//!
//! - [`feed_wakes`] and [`WakeStrategy`]: the poll strategy. apalis-redis's interval
//!   poller can stall until the 30 s heartbeat, so workers fetch when a producer
//!   `PUBLISH`es on the wake channel, plus on a fallback timer that re-arms itself
//!   correctly (tokio's interval).
//! - [`GatedConnection`]: the storage's connection, which lets a fetch reach Redis only
//!   when it may find something, through the process's one [`FetchGate`]. apalis-core's
//!   poll loop ignores the poll strategy's answer and fetches again whenever the worker's
//!   loop is woken (a job starting or finishing), which made seven fetch scripts per
//!   message, five of them empty; and a process runs two fetch loops, of which one
//!   fetches per wake.
//! - [`Periodic`]: periodic work that runs once per tick across all worker processes:
//!   each tick is claimed with `SET NX PX` in Redis, so no process is special and any
//!   of them may die without stopping the schedule.
//! - [`worker_name`]: a name unique per apalis worker built (a fetch loop, and again after
//!   each restart), so a restarted worker never waits for its previous incarnation's
//!   registration to expire.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis_core::backend::ext::poll_strategy::{PollSnapshot, PollStrategy};
use futures::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{AsyncCommands, Cmd, RedisFuture, Value};
use shared::metrics::{Counter, Registry};
use tokio::sync::mpsc;

/// A name for an apalis worker (a fetch loop) that no other has used.
pub fn worker_name(queue: &str) -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "worker".into());
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{queue}-{host}-{}-{}", std::process::id(), &id[..8])
}

/// Feeds `gate` the wakes of a worker process: one per message on the wake channel and
/// one every `fallback` at the latest. Reconnects to Redis by itself; stops once the gate
/// is dropped.
pub fn feed_wakes(redis_url: &str, channel: String, fallback: Duration, gate: &Arc<FetchGate>) {
    let timer_gate = Arc::downgrade(gate);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(fallback);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(gate) = timer_gate.upgrade() else { return };
            gate.wake();
        }
    });
    let (redis_url, gate) = (redis_url.to_owned(), Arc::downgrade(gate));
    tokio::spawn(async move {
        while gate.strong_count() > 0 {
            if let Err(e) = forward_wakes(&redis_url, &channel, &gate).await {
                tracing::warn!(error = %e, "queue.wake_subscription_lost; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// The poll strategy of one fetch loop ([`FetchGate::strategy`]).
///
/// Unlike apalis' stream strategy it drains every pending wake and always leaves its
/// waker registered, so a wake can never be consumed without arming the next one (the
/// way the stock interval poller stalls until the heartbeat). apalis-core drops its
/// answer, so what lets a fetch through is the [`FetchGate`], which counted the wake.
#[derive(Debug)]
pub struct WakeStrategy {
    wakes: mpsc::Receiver<()>,
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
        if woken { Poll::Ready(Some(())) } else { Poll::Pending }
    }
}

async fn forward_wakes(redis_url: &str, channel: &str, gate: &std::sync::Weak<FetchGate>) -> redis::RedisResult<()> {
    let client = redis::Client::open(redis_url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    let mut messages = pubsub.on_message();
    // Checked now and then too, so the subscription ends soon after the gate does.
    let mut check = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            message = messages.next() => {
                if message.is_none() {
                    return Err(redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connection closed")));
                }
                let Some(gate) = gate.upgrade() else { return Ok(()) };
                gate.wake();
            }
            _ = check.tick() => {
                if gate.strong_count() == 0 {
                    return Ok(());
                }
            }
        }
    }
}

/// Whether a fetch of the process's fetch loops may find a job, and which loop makes it:
/// a wake came after the last fetch that came back short of a full batch, and no fetch
/// has claimed it yet.
///
/// Wakes are counted, once per process, and every loop is woken for each. The first
/// loop to poll claims the count and its fetch reaches Redis; the others' are answered
/// "no jobs" at once, so a message costs one fetch however many loops there are, and a
/// loop that is busy (all its slots taken, so it does not poll) leaves the job to one
/// that is free. A short fetch settles the count it claimed. A wake that lands while a
/// fetch is in flight stays unclaimed, and since apalis-core does not poll again after a
/// fetch comes back empty (it waits for the worker's next wake), the gate then wakes the
/// loops itself, so that job is fetched at once. A fetch that fills its batch, or fails,
/// or gets a reply the gate cannot read counts as a wake: more may be waiting, and every
/// loop may fetch again. A job that reaches Redis without a wake (a retry coming due, a
/// `PUBLISH` lost with a dropped subscription) waits at most for the fallback timer's
/// wake (`QUEUE_POLL_MS`), as it did before the gate.
#[derive(Debug)]
pub struct FetchGate {
    wakes: AtomicU64,
    settled: AtomicU64,
    claimed: AtomicU64,
    /// Fetches in a row that came back full (a fetch of one job for one free slot not
    /// counted): from [`BACKLOG_STREAK`] on, jobs are waiting each time slots free, a
    /// backlog.
    full_in_a_row: AtomicU64,
    /// Each fetch loop's strategy channel and slots, by loop.
    loops: std::sync::Mutex<Vec<Option<FetchLoop>>>,
    /// Fetches that reached Redis and found jobs (or a reply the gate cannot read).
    found: Arc<Counter>,
    /// Fetches that reached Redis and found none.
    empty: Arc<Counter>,
    /// Fetches the gate answered itself.
    skipped: Arc<Counter>,
}

impl FetchGate {
    /// An open gate (the first fetch always goes through), counting fetches in
    /// `tidings_queue_fetches_total{result}`.
    pub fn new(metrics: &Registry) -> Arc<Self> {
        let help = "The worker's fetches of jobs from Redis, by result (`skipped`: held back by the gate).";
        let counter = |result| metrics.counter("tidings_queue_fetches_total", help, &[("result", result)]);
        Arc::new(Self {
            wakes: AtomicU64::new(1),
            settled: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            full_in_a_row: AtomicU64::new(0),
            loops: std::sync::Mutex::new(Vec::new()),
            found: counter("jobs"),
            empty: counter("empty"),
            skipped: counter("skipped"),
        })
    }

    /// The poll strategy of fetch loop `index`, whose jobs `slots` counts, replacing that
    /// loop's previous one (a loop rebuilt after its worker died). The gate opens for it:
    /// the first of the loops to poll then fetches.
    pub fn strategy(&self, index: usize, slots: Arc<LoopSlots>) -> WakeStrategy {
        let (tx, rx) = mpsc::channel(1);
        if let Ok(mut loops) = self.loops.lock() {
            if loops.len() <= index {
                loops.resize_with(index + 1, || None);
            }
            loops[index] = Some((tx, slots));
        }
        self.wake();
        WakeStrategy { wakes: rx }
    }

    /// How many jobs a fetch of the loop whose jobs `own` counts takes.
    ///
    /// Only its free slots, so that the jobs it cannot start stay on the queue for the
    /// other loop or another worker process (a job taken beyond them would wait in this
    /// loop for one of its own jobs to end), unless there is a backlog (the last
    /// [`BACKLOG_STREAK`] fetches or more came back full): then every worker is busy and a
    /// job waits anyway, and a fetch takes as many jobs as its loop runs at once (fewer
    /// round trips for the same jobs), still only its free slots while another live loop
    /// of the process has more.
    fn batch_for(&self, own: &Arc<LoopSlots>) -> usize {
        let free = own.free().max(1);
        if self.full_in_a_row.load(Ordering::Acquire) < BACKLOG_STREAK {
            return free;
        }
        let freer = self.loops.lock().is_ok_and(|loops| {
            loops.iter().flatten().any(|(_, other)| !Arc::ptr_eq(other, own) && other.is_live() && other.free() > free)
        });
        if freer { free } else { own.capacity }
    }

    /// Counts a wake (a job may have arrived) and wakes every fetch loop.
    pub fn wake(&self) {
        self.wakes.fetch_add(1, Ordering::AcqRel);
        self.wake_loops();
    }

    fn wake_loops(&self) {
        if let Ok(loops) = self.loops.lock() {
            // A full channel already holds a pending wake, which does the same.
            for (tx, _) in loops.iter().flatten() {
                let _ = tx.try_send(());
            }
        }
    }

    /// Claims the wakes counted so far for one fetch: the count, or `None` while nothing
    /// can have arrived or another fetch claimed them.
    fn claim(&self) -> Option<u64> {
        let wakes = self.wakes.load(Ordering::Acquire);
        if wakes == self.settled.load(Ordering::Acquire) {
            return None;
        }
        (self.claimed.fetch_max(wakes, Ordering::AcqRel) < wakes).then_some(wakes)
    }

    /// Records a fetch that claimed wake count `seen` and found `jobs` (`None`: a reply
    /// of another shape) in batches of `batch`.
    fn fetched(&self, seen: u64, jobs: Option<usize>, batch: usize) {
        if jobs == Some(0) { &self.empty } else { &self.found }.inc();
        match jobs {
            // One job found for one free slot may have come for that slot: it says
            // nothing of a backlog.
            Some(1) if batch == 1 => {}
            Some(n) if n >= batch => {
                self.full_in_a_row.fetch_add(1, Ordering::AcqRel);
            }
            Some(_) => self.full_in_a_row.store(0, Ordering::Release),
            None => {}
        }
        // A full batch, or a reply this gate does not understand: fetch again.
        if jobs.is_none_or(|n| n >= batch) {
            self.wake();
            return;
        }
        self.settled.fetch_max(seen, Ordering::AcqRel);
        if self.wakes.load(Ordering::Acquire) > self.claimed.load(Ordering::Acquire) {
            self.wake_loops();
        }
    }

    /// Records a claimed fetch that failed or was dropped: it settled nothing.
    fn failed(&self) {
        self.wake();
    }
}

/// Fetches in a row that came back full from which the gate takes it for a backlog: two,
/// so that one burst that fills the free slots is not yet a backlog.
const BACKLOG_STREAK: u64 = 2;

/// A fetch loop as the gate knows it: its strategy's channel and its slots.
type FetchLoop = (mpsc::Sender<()>, Arc<LoopSlots>);

/// The jobs a fetch loop holds, fetched and not yet finished, against how many it runs at
/// once.
#[derive(Debug)]
pub struct LoopSlots {
    capacity: usize,
    held: AtomicUsize,
    live: AtomicBool,
}

impl LoopSlots {
    /// A loop that runs `capacity` jobs at once and holds none yet.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self { capacity, held: AtomicUsize::new(0), live: AtomicBool::new(true) })
    }

    fn free(&self) -> usize {
        self.capacity.saturating_sub(self.held.load(Ordering::Acquire))
    }

    fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    fn took(&self, jobs: usize) {
        self.held.fetch_add(jobs, Ordering::AcqRel);
    }

    /// One of the loop's jobs ended.
    pub fn finished(&self) {
        let _ = self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// The loop's worker ended: its free slots no longer take jobs.
    pub fn retire(&self) {
        self.live.store(false, Ordering::Release);
    }
}

/// The worker storage's connection to Redis: every command goes through, except the
/// fetch script while its [`FetchGate`] is closed, which is answered "no jobs" at once,
/// and whose batch the gate may trim ([`FetchGate`]'s `batch_for`).
#[derive(Clone)]
pub struct GatedConnection {
    inner: ConnectionManager,
    gate: Arc<FetchGate>,
    slots: Arc<LoopSlots>,
    /// The fetch script's second and fifth keys: this queue's active list and signal list.
    active_list: Arc<str>,
    signal_list: Arc<str>,
}

impl GatedConnection {
    /// `inner`, gating the fetches of the queue `config` describes for the loop whose
    /// jobs `slots` counts.
    pub fn new(
        inner: ConnectionManager,
        config: &apalis_redis::Config,
        gate: Arc<FetchGate>,
        slots: Arc<LoopSlots>,
    ) -> Self {
        Self {
            inner,
            gate,
            slots,
            active_list: config.active_jobs_list().into(),
            signal_list: config.signal_list().into(),
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

/// Where the fetch script's batch (its second argument) sits among a call's arguments:
/// the command, the script or its SHA, the key count, seven keys, the time.
const BATCH_ARG: usize = 11;

/// The fetch script call `cmd` with a batch of `batch`, or `None` for a call of another
/// shape.
fn with_batch(cmd: &Cmd, batch: usize) -> Option<Cmd> {
    let mut out = Cmd::new();
    let mut count = 0;
    for (i, arg) in cmd.args_iter().enumerate() {
        let redis::Arg::Simple(bytes) = arg else { return None };
        if i == BATCH_ARG {
            out.arg(batch);
        } else {
            out.arg(bytes);
        }
        count += 1;
    }
    (count == BATCH_ARG + 2).then_some(out)
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

/// Reopens the gate for a claimed fetch that did not come back.
struct Unsettled(Option<Arc<FetchGate>>);

impl Unsettled {
    /// The fetch came back: it settles the gate itself.
    fn came_back(&mut self) {
        self.0 = None;
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if let Some(gate) = self.0.take() {
            gate.failed();
        }
    }
}

impl ConnectionLike for GatedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if !self.is_fetch(cmd) {
            return self.inner.req_packed_command(cmd);
        }
        let Some(seen) = self.gate.claim() else {
            self.gate.skipped.inc();
            return Box::pin(std::future::ready(Ok(no_jobs())));
        };
        let batch = self.gate.batch_for(&self.slots);
        let trimmed = if batch < self.slots.capacity { with_batch(cmd, batch) } else { None };
        let batch = if trimmed.is_some() { batch } else { self.slots.capacity };
        // A fetch that fails, or is dropped on its way (even before it is first polled),
        // settled nothing.
        let mut unsettled = Unsettled(Some(Arc::clone(&self.gate)));
        Box::pin(async move {
            let reply = self.inner.req_packed_command(trimmed.as_ref().unwrap_or(cmd)).await?;
            unsettled.came_back();
            let jobs = jobs_in(&reply);
            self.slots.took(jobs.unwrap_or(0));
            self.gate.fetched(seen, jobs, batch);
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

    /// A gate with `n` fetch loops, their strategies' pending wakes drained.
    fn gate_with_loops(n: usize) -> (Arc<FetchGate>, Vec<WakeStrategy>) {
        let gate = FetchGate::new(&Registry::new());
        let mut loops: Vec<WakeStrategy> = (0..n).map(|i| gate.strategy(i, LoopSlots::new(8))).collect();
        for l in &mut loops {
            while l.wakes.try_recv().is_ok() {}
        }
        (gate, loops)
    }

    /// A fetch after a wake that found `jobs` in batches of `batch`.
    fn fetch_after_a_wake(gate: &FetchGate, jobs: Option<usize>, batch: usize) {
        gate.wake();
        let seen = gate.claim().expect("a wake opens the gate");
        gate.fetched(seen, jobs, batch);
    }

    fn woken(strategy: &mut WakeStrategy) -> bool {
        let mut woken = false;
        while strategy.wakes.try_recv().is_ok() {
            woken = true;
        }
        woken
    }

    #[test]
    fn a_short_fetch_closes_the_gate_until_the_next_wake() {
        let (gate, mut loops) = gate_with_loops(1);
        let seen = gate.claim().expect("a loop's first fetch goes through");
        gate.fetched(seen, Some(3), 10);
        assert_eq!(gate.claim(), None, "nothing can have arrived since");
        assert!(!woken(&mut loops[0]), "no wake of its own");
        gate.wake();
        assert!(woken(&mut loops[0]), "a wake wakes the loop");
        assert!(gate.claim().is_some(), "and opens the gate");
    }

    #[test]
    fn a_full_batch_an_unknown_reply_or_a_failure_leaves_the_gate_open() {
        let (gate, _loops) = gate_with_loops(1);
        let seen = gate.claim().expect("open");
        gate.fetched(seen, Some(10), 10);
        let seen = gate.claim().expect("more may be waiting");
        gate.fetched(seen, None, 10);
        let _ = gate.claim().expect("a reply it cannot read");
        gate.failed();
        assert!(gate.claim().is_some(), "a failed fetch settled nothing");
    }

    #[test]
    fn a_wake_during_an_empty_fetch_wakes_the_poll_loop_again() {
        // apalis-core does not poll after an empty fetch; the wake drained while the
        // fetch was in flight would otherwise wait for the fallback timer.
        let (gate, mut loops) = gate_with_loops(1);
        let seen = gate.claim().expect("open");
        gate.wake();
        let _ = woken(&mut loops[0]);
        gate.fetched(seen, Some(0), 10);
        assert!(woken(&mut loops[0]), "the poll loop is woken to fetch for it");
        assert!(gate.claim().is_some(), "the wake that came during the fetch still counts");
    }

    #[test]
    fn a_wake_wakes_every_loop_and_lets_one_fetch_through_unless_its_batch_fills() {
        let (gate, mut loops) = gate_with_loops(2);
        let _ = gate.claim().expect("the loops' first fetch");
        gate.wake();
        assert!(loops.iter_mut().all(woken), "every loop is woken");
        let seen = gate.claim().expect("the first loop to poll fetches");
        assert_eq!(gate.claim(), None, "the other's fetch is answered at once");
        gate.fetched(seen, Some(16), 16);
        assert!(loops.iter_mut().all(woken), "a full batch wakes them all again");
        assert!(gate.claim().is_some(), "and lets another fetch through");
    }

    #[test]
    fn a_fetch_takes_only_the_free_slots_until_fetches_come_back_full_in_a_row() {
        let gate = FetchGate::new(&Registry::new());
        let slots = LoopSlots::new(8);
        let _strategy = gate.strategy(0, slots.clone());
        let fetch = |jobs: usize, batch: usize| fetch_after_a_wake(&gate, Some(jobs), batch);
        assert_eq!(gate.batch_for(&slots), 8, "all free");
        slots.took(7);
        fetch(1, 1);
        fetch(1, 1);
        assert_eq!(gate.batch_for(&slots), 1, "one job a time for one free slot is no backlog");
        slots.finished();
        assert_eq!(gate.batch_for(&slots), 2, "the jobs it cannot start stay queued for others");
        fetch(2, 2);
        assert_eq!(gate.batch_for(&slots), 2, "one full fetch is not a backlog yet");
        fetch(2, 2);
        assert_eq!(gate.batch_for(&slots), 8, "two in a row: a backlog, a whole batch");
        fetch(8, 8);
        fetch_after_a_wake(&gate, None, 8);
        assert_eq!(gate.batch_for(&slots), 8, "a reply it cannot read changes nothing");
        fetch(3, 8);
        assert_eq!(gate.batch_for(&slots), 2, "a short fetch emptied the queue: free slots again");
        slots.took(2);
        assert_eq!(gate.batch_for(&slots), 1, "none free (a fetch then is a wake's): one");
    }

    #[test]
    fn under_a_backlog_a_loop_takes_only_its_free_slots_while_another_has_more() {
        let gate = FetchGate::new(&Registry::new());
        let (busy, idle) = (LoopSlots::new(8), LoopSlots::new(8));
        let _strategies = (gate.strategy(0, busy.clone()), gate.strategy(1, idle.clone()));
        for _ in 0..BACKLOG_STREAK {
            fetch_after_a_wake(&gate, Some(8), 8);
        }
        assert_eq!(gate.batch_for(&busy), 8, "both idle: a whole batch");
        busy.took(7);
        assert_eq!(gate.batch_for(&busy), 1, "the other loop has 8 free: one job");
        assert_eq!(gate.batch_for(&idle), 8);
        idle.took(8);
        assert_eq!(gate.batch_for(&busy), 8, "the other is full: a whole batch");
        (0..6).for_each(|_| idle.finished());
        assert_eq!(gate.batch_for(&busy), 1, "the other has 6 free again");
        idle.retire();
        assert_eq!(gate.batch_for(&busy), 8, "a retired loop takes nothing");
    }

    #[test]
    fn a_trimmed_fetch_changes_only_the_batch() {
        // The fetch script's call as apalis-redis makes it, with a batch of `batch`.
        let fetch = |batch: usize| {
            let mut call = redis::cmd("EVALSHA");
            call.arg("sha").arg(7);
            for key in ["w", "active", "inflight", "data", "signal", "meta", "scheduled"] {
                call.arg(key);
            }
            call.arg(1_700_000_000).arg(batch).arg("worker-1");
            call
        };
        let trimmed = with_batch(&fetch(16), 3).expect("a fetch");
        assert_eq!(trimmed.get_packed_command(), fetch(3).get_packed_command());
        assert!(with_batch(redis::cmd("EVALSHA").arg("sha").arg(0), 3).is_none(), "another shape");
    }

    #[test]
    fn worker_names_are_unique_per_start() {
        assert_ne!(worker_name("q"), worker_name("q"));
        assert!(worker_name("q").starts_with("q-"));
    }
}
