//! The after-commit step: hand a committed feedback's dispatch record to the queue.
//!
//! It runs after the transaction committed, in the background, so the visitor's answer
//! never waits for Redis. If Redis is down or failing the announcer holds what it has, in
//! order, and pushes it once Redis answers again; what it cannot hold (past its bounds, or
//! when the web stops) stays un-enqueued in the database and the worker's relay enqueues
//! it later: nothing is lost, and nothing is ever enqueued for a transaction that rolled
//! back (this code only sees committed ids). When the web stops, [`Dispatcher::drain`]
//! announces and marks what it has taken before the process exits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;
use shared::jobs::FanOut;
use shared::metrics::Registry;
use shared::queries::feedback::Submitted;
use shared::queue::{JobQueue, JobRunner};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

/// Submissions announced in one round of the announcer, at most.
const MAX_BATCH: usize = 256;

/// Committed submissions waiting in the announcer's inbox, at most, and held by it for
/// room in Redis or for Redis to answer again, at most; past that (Redis slow or down, or
/// the backlog at its bound, for long) new ones are left to the relay instead of piling
/// up in memory.
const MAX_WAITING: usize = 10_000;

/// How long the marker gathers records enqueued before it marks them, in one statement.
/// Well under the relay's grace (`RELAY_GRACE_MS`, at least five of these): a record
/// the relay finds unmarked in between is enqueued again under the same idempotency key,
/// which Redis drops.
const MARK_EVERY: Duration = Duration::from_millis(50);
const _: () = assert!(5 * MARK_EVERY.as_millis() <= shared::settings::MIN_RELAY_GRACE_MS as u128);

/// Records marked in one statement, at most.
const MAX_MARKS: usize = 1024;

/// While the backlog is at its bound (or Redis fails) the announcer holds its batch and
/// reads the backlog again (tries again) after this long, then twice as long each time it
/// is still full (still failing), up to [`ROOM_POLL_MAX`]: under a steady overload the
/// workers make room within the first wait, and with no worker running it reads Redis a
/// few times a second. (Leaving those records to the relay, as a web that is stopping
/// does, would hold them for its grace, `RELAY_GRACE_MS`, seconds behind the messages that
/// came after them.)
const ROOM_POLL_FIRST: Duration = Duration::from_millis(5);
const ROOM_POLL_MAX: Duration = Duration::from_millis(200);

/// A backlog figure older than this is read again before it decides anything.
const BACKLOG_FRESH_FOR: Duration = Duration::from_millis(500);

/// A committed submission waiting to be announced, with the id of its request.
type Announcement = (Submitted, Option<String>);

/// Connects to Redis lazily and re-connects after failures, so the web starts and keeps
/// accepting feedback while Redis is down.
///
/// Committed submissions are announced by one task per process, in batches: whatever
/// committed while the previous batch was on its way goes out together — one script call
/// pushes the jobs, one round trip wakes the workers and reads the backlog — so under
/// load the cost per submission falls, and alone a submission is announced at once (the
/// way a database groups commits). A second task marks the enqueued records, one
/// statement for whatever was enqueued within [`MARK_EVERY`].
pub struct Dispatcher {
    /// Database pool, to mark records enqueued.
    db: DatabaseConnection,
    /// Redis URL of the queue.
    redis_url: String,
    /// Key namespace of the queue.
    namespace: String,
    /// The connected queue, once a connection succeeded.
    queue: RwLock<Option<JobQueue>>,
    /// One connection attempt at a time.
    connecting: Mutex<()>,
    /// Jobs Redis may hold waiting before new ones are held for room.
    max_backlog: u64,
    /// Counts enqueued and deferred jobs.
    metrics: Registry,
    /// In-process mode (tests): jobs run in the request instead of going to Redis.
    immediate: Option<Arc<dyn JobRunner>>,
    /// The read cache's settings, when it is on: a new message drops what it changes.
    cache: Option<shared::cache::CacheSettings>,
    /// The announcer's inbox, once it runs.
    announcer: OnceLock<mpsc::Sender<Announcement>>,
    /// The marker's inbox (dispatch record ids enqueued), once it runs.
    marker: OnceLock<mpsc::Sender<i64>>,
    /// The announcer's and the marker's tasks, for [`Dispatcher::drain`] to wait for.
    announcer_task: StdMutex<Option<JoinHandle<()>>>,
    marker_task: StdMutex<Option<JoinHandle<()>>>,
    /// Set by [`Dispatcher::drain`]: the announcer takes nothing more, finishes what it has.
    announcer_stop: watch::Sender<bool>,
    /// Set once the announcer has finished: the marker marks what it has, and ends.
    marker_stop: watch::Sender<bool>,
    /// How long the marker gathers records, in milliseconds ([`MARK_EVERY`] unless set).
    mark_every_ms: AtomicU64,
    /// Set while pushes to Redis fail, so a failure is logged once, not at every try.
    redis_failing: AtomicBool,
}

/// The backlog as last seen, and when.
#[derive(Clone, Copy)]
struct Backlog {
    jobs: u64,
    at: Instant,
}

impl Dispatcher {
    /// A dispatcher for the queue at `redis_url` / `namespace`; connects on first use.
    pub fn new(db: DatabaseConnection, redis_url: &str, namespace: &str, max_backlog: u64, metrics: Registry) -> Self {
        Self {
            db,
            redis_url: redis_url.to_owned(),
            namespace: namespace.to_owned(),
            queue: RwLock::new(None),
            connecting: Mutex::new(()),
            max_backlog,
            metrics,
            immediate: None,
            cache: None,
            announcer: OnceLock::new(),
            marker: OnceLock::new(),
            announcer_task: StdMutex::new(None),
            marker_task: StdMutex::new(None),
            announcer_stop: watch::channel(false).0,
            marker_stop: watch::channel(false).0,
            mark_every_ms: AtomicU64::new(MARK_EVERY.as_millis() as u64),
            redis_failing: AtomicBool::new(false),
        }
    }

    /// Stops taking announcements and finishes, within `within`, what was taken: every
    /// committed submission handed to the announcer is pushed to Redis as far as the
    /// backlog's bound leaves room (the rest, and all that is left once Redis fails, is
    /// left to the relay at once), and every record enqueued is marked (otherwise the
    /// marker's last 50 ms would be left unmarked, and what the announcer still had would
    /// wait for the relay's grace). Called once the server has answered its last request; a submission
    /// announced after it is left to the relay.
    ///
    /// The marker keeps a fifth of `within` (at most a second) for itself: however long
    /// the announcer takes, what it did push is marked.
    pub async fn drain(&self, within: Duration) {
        let for_marks = (within / 5).min(Duration::from_secs(1));
        self.announcer_stop.send_replace(true);
        if !finished(&self.announcer_task, within.saturating_sub(for_marks)).await {
            tracing::warn!(?within, "dispatch.drain_timed_out; the relay will enqueue what the announcer held");
        }
        // The announcer has handed the marker its last records (or ran out of time).
        self.marker_stop.send_replace(true);
        if !finished(&self.marker_task, for_marks).await {
            tracing::warn!("dispatch.mark_drain_timed_out; the relay may enqueue those records once more");
        }
    }

    /// Sets how long the marker gathers records before it marks them ([`MARK_EVERY`]
    /// unless set): call before the first submission. Tests make it long, to see what a
    /// drain marks.
    pub fn set_mark_every(&self, every: Duration) {
        self.mark_every_ms.store(u64::try_from(every.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// With the read cache on, a committed message also drops the cached first page and
    /// counts as the announcer takes it: at once, or, while it holds messages for room in
    /// Redis, at its next look at the backlog (its fan-out job does it too; this way they
    /// are fresh even while no worker runs or the queue has a backlog).
    pub fn with_cache(mut self, settings: &shared::cache::CacheSettings) -> Self {
        self.cache = settings.enabled.then(|| settings.clone());
        self
    }

    /// In-process mode: every job runs at once through `runner`, in the request that
    /// asked for it, and Redis is not used for jobs.
    pub fn run_jobs_in_process(mut self, runner: Arc<dyn JobRunner>) -> Self {
        self.immediate = Some(runner);
        self
    }

    /// The in-process runner, when jobs run in the request.
    pub fn immediate(&self) -> Option<&Arc<dyn JobRunner>> {
        self.immediate.as_ref()
    }

    /// The queue, connecting if needed.
    pub async fn queue(&self) -> Option<JobQueue> {
        if let Some(queue) = self.connected() {
            return Some(queue);
        }
        let _one_attempt = self.connecting.lock().await;
        if let Some(queue) = self.connected() {
            return Some(queue);
        }
        match JobQueue::connect(&self.redis_url, &self.namespace).await {
            Ok(queue) => {
                if let Ok(mut slot) = self.queue.write() {
                    *slot = Some(queue.clone());
                }
                Some(queue)
            }
            Err(e) => {
                // Once the announcer has logged that Redis fails, not again at each try.
                if self.redis_failing.load(Ordering::Relaxed) {
                    tracing::debug!(error = %e, "queue.connect failed");
                } else {
                    tracing::warn!(error = %e, "queue.connect failed");
                }
                None
            }
        }
    }

    fn connected(&self) -> Option<JobQueue> {
        self.queue.read().ok().and_then(|slot| slot.clone())
    }

    /// The read cache, when it is on and Redis is reachable (on the queue's connection).
    pub async fn cache(&self) -> Option<shared::cache::Cache> {
        let settings = self.cache.as_ref()?;
        let queue = self.queue().await?;
        Some(shared::cache::Cache::new(queue.connection(), &self.namespace, settings))
    }

    /// Counts what became of committed submissions' announcements.
    fn count_dispatch(&self, outcome: &'static str, n: usize) {
        self.metrics
            .counter(
                "tidings_dispatch_total",
                "Committed submissions handed to Redis, run in process, or left to the relay.",
                &[("outcome", outcome)],
            )
            .add(n as u64);
    }

    /// The announcer: takes whatever committed submissions are waiting, announces them
    /// together, and starts over. What the backlog's bound leaves no room for, or what
    /// Redis fails to take, it holds, in order, and pushes as the workers make room (as
    /// Redis answers again), taking what commits meanwhile behind it (each submission's
    /// cached pages are dropped as it is taken, held or not; when Redis fails then, by its
    /// fan-out job once it runs).
    async fn announce_all(self: Arc<Self>, mut inbox: mpsc::Receiver<Announcement>) {
        let mut stop = self.announcer_stop.subscribe();
        let mut backlog: Option<Backlog> = None;
        // Taken from the inbox and not yet pushed or left to the relay, oldest first.
        let mut held: VecDeque<Announcement> = VecDeque::new();
        let mut fresh = Vec::with_capacity(MAX_BATCH);
        let mut wait = ROOM_POLL_FIRST;
        loop {
            if held.is_empty() {
                if receive(&mut inbox, &mut fresh, MAX_BATCH, &mut stop).await == 0 {
                    break;
                }
            } else {
                // Held for room (the workers drain the backlog) or for Redis: look again shortly.
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|stopping| *stopping) => {}
                }
                wait = (wait * 2).min(ROOM_POLL_MAX);
                while held.len() + fresh.len() < MAX_WAITING {
                    let Ok(next) = inbox.try_recv() else { break };
                    fresh.push(next);
                }
                backlog = None;
                if *stop.borrow() && self.redis_failing.load(Ordering::Relaxed) {
                    // Stopping while Redis fails: no try again within the drain's time.
                    held.extend(fresh.drain(..));
                    self.leave_to_relay(&mut held, &mut inbox);
                    break;
                }
            }
            let mut new_ids: Vec<i64> = fresh.iter().map(|(s, _)| s.feedback_id).collect();
            held.extend(fresh.drain(..));
            let hold = !*stop.borrow();
            // From the oldest, a batch at a time, while Redis has room (or, stopping, until
            // everything is pushed or left to the relay).
            while !held.is_empty() {
                let n = held.len().min(MAX_BATCH);
                let batch = &held.make_contiguous()[..n];
                let (done, seen) = self.announce_batch(batch, &std::mem::take(&mut new_ids), backlog, hold).await;
                backlog = seen;
                held.drain(..done);
                if done > 0 {
                    wait = ROOM_POLL_FIRST;
                }
                if done < n || (backlog.is_none() && *stop.borrow()) {
                    break;
                }
            }
            if backlog.is_none() && *stop.borrow() {
                // Stopping, and Redis failed that batch: the rest waits for the relay too,
                // rather than each batch trying Redis again until the drain's time is up.
                self.leave_to_relay(&mut held, &mut inbox);
                break;
            }
        }
    }

    /// Leaves what the announcer holds and what waits in its inbox (closed here) to the
    /// relay, counted as Redis being down: the web is stopping and Redis failed.
    fn leave_to_relay(&self, held: &mut VecDeque<Announcement>, inbox: &mut mpsc::Receiver<Announcement>) {
        inbox.close();
        let mut left = held.len();
        held.clear();
        while inbox.try_recv().is_ok() {
            left += 1;
        }
        self.count_dispatch("deferred_redis_down", left);
    }

    /// Enqueues the jobs of committed submissions and marks their records (and drops
    /// from the read cache what the messages `new_ids` change). What the backlog's bound
    /// leaves no room for, and what cannot go to Redis now (down, or failing), is held,
    /// when `hold`, for the announcer to push once the workers make room or Redis answers,
    /// and otherwise (the web is stopping) left to the relay. Returns how many of `batch`,
    /// from its start, are done with (pushed or left to the relay), and the backlog as
    /// seen after the push (none when Redis failed).
    async fn announce_batch(
        &self,
        batch: &[Announcement],
        new_ids: &[i64],
        known: Option<Backlog>,
        hold: bool,
    ) -> (usize, Option<Backlog>) {
        let Some(queue) = self.queue().await else {
            return (self.redis_failed(batch.len(), hold, "deferred_redis_down", "redis is not reachable"), None);
        };
        // The cache drop goes out on the same connection while the jobs are pushed.
        let (pushed, ()) = tokio::join!(self.push(&queue, batch, known), self.invalidate_new(new_ids));
        let (taken, seen) = match pushed {
            Ok(pushed) => pushed,
            Err(e) => {
                return (self.redis_failed(batch.len(), hold, "deferred_redis_error", &e.to_string()), None);
            }
        };
        if self.redis_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(jobs = taken, "queue.enqueue_recovered");
        }
        let done = if taken == batch.len() || hold {
            taken
        } else {
            tracing::debug!(deferred = batch.len() - taken, "queue.full; left to the relay");
            self.count_dispatch("deferred_backlog_full", batch.len() - taken);
            batch.len()
        };
        if taken > 0 {
            self.count_dispatch("enqueued", taken);
            self.metrics
                .counter("tidings_jobs_enqueued_total", "Jobs put on the Redis queue, by kind.", &[("kind", "fan_out")])
                .add(taken as u64);
            self.mark_enqueued(batch[..taken].iter().map(|(s, _)| s.dispatch_id));
        }
        (done, seen)
    }

    /// A batch of `n` Redis failed to take: held (none done) when `hold`, else left to the
    /// relay and counted as `outcome` (all done). Logged once while the failures last.
    fn redis_failed(&self, n: usize, hold: bool, outcome: &'static str, error: &str) -> usize {
        if !self.redis_failing.swap(true, Ordering::Relaxed) || !hold {
            let then = if hold { "held until Redis answers" } else { "left to the relay" };
            tracing::warn!(jobs = n, error, "queue.enqueue failed; {then}");
        }
        if hold {
            return 0;
        }
        self.count_dispatch(outcome, n);
        n
    }

    /// Hands enqueued records to the marker, off the announcer's path. A mark that
    /// cannot be made (the marker has this many waiting, or a statement fails) costs at
    /// most one more enqueue by the relay, under the same idempotency key: the record's
    /// enqueue count is still the one the web enqueued with.
    fn mark_enqueued(&self, records: impl Iterator<Item = i64>) {
        let marker = self.marker.get_or_init(|| {
            let (tx, rx) = mpsc::channel(MAX_WAITING);
            let every = Duration::from_millis(self.mark_every_ms.load(Ordering::Relaxed));
            keep(&self.marker_task, tokio::spawn(mark_all(self.db.clone(), rx, every, self.marker_stop.subscribe())));
            tx
        });
        for record in records {
            if marker.try_send(record).is_err() {
                tracing::debug!(record, "dispatch.mark_skipped; the relay may enqueue it once more");
            }
        }
    }

    /// Pushes as many of `batch` as the backlog bound leaves room for (in order); returns
    /// how many, and the backlog after.
    async fn push(
        &self,
        queue: &JobQueue,
        batch: &[Announcement],
        known: Option<Backlog>,
    ) -> Result<(usize, Option<Backlog>), shared::queue::QueueError> {
        // This task is the only one of this process that pushes, so a backlog it read
        // after its own last push is only ever too high (workers drain it) — unless it
        // is old, when other processes may have added to it.
        let backlog = match known.filter(|b| b.at.elapsed() < BACKLOG_FRESH_FOR) {
            Some(known) => known,
            None => Backlog { jobs: queue.backlog().await?, at: Instant::now() },
        };
        let room = usize::try_from(self.max_backlog.saturating_sub(backlog.jobs)).unwrap_or(usize::MAX);
        let taken = batch.len().min(room);
        if taken == 0 {
            return Ok((0, Some(backlog)));
        }
        let jobs: Vec<(FanOut, i32, Option<String>)> = batch[..taken]
            .iter()
            .map(|(s, request_id)| (FanOut::new(s.feedback_id, s.dispatch_id), 0, request_id.clone()))
            .collect();
        let after = queue.enqueue_fan_outs(&jobs).await?;
        Ok((taken, Some(Backlog { jobs: after, at: Instant::now() })))
    }

    /// Drops what new messages change from the read cache (best effort: their fan-out
    /// jobs do it again).
    async fn invalidate_new(&self, feedback_ids: &[i64]) {
        if feedback_ids.is_empty() {
            return;
        }
        let Some(cache) = self.cache().await else { return };
        if let Err(e) = cache.invalidate(feedback_ids).await {
            tracing::debug!(?feedback_ids, error = %e, "cache.invalidate_failed; the fan-out jobs will");
        }
    }

    /// Announces a committed submission: in the background (the visitor never waits for
    /// Redis), or, in the in-process mode, by running the job before returning.
    pub async fn announce_after_commit(self: &Arc<Self>, submitted: Submitted) {
        if let Some(runner) = &self.immediate {
            let outcome = match serde_json::to_vec(&FanOut::new(submitted.feedback_id, submitted.dispatch_id)) {
                Ok(payload) => match runner.run_now(payload).await {
                    Ok(()) => "ran_in_process",
                    Err(e) => {
                        tracing::warn!(feedback_id = submitted.feedback_id, error = %e, "job.in_process_failed");
                        "failed_in_process"
                    }
                },
                Err(_) => "failed_in_process",
            };
            self.count_dispatch(outcome, 1);
            return;
        }
        let inbox = self.announcer.get_or_init(|| {
            let (tx, rx) = mpsc::channel(MAX_WAITING);
            keep(&self.announcer_task, tokio::spawn(Arc::clone(self).announce_all(rx)));
            tx
        });
        let request_id = crate::middleware::request_id::current();
        match inbox.try_send((submitted, request_id)) {
            Ok(()) => {}
            // Redis is slow or down and the announcer has this much to do: the record
            // waits in the database for the relay.
            Err(mpsc::error::TrySendError::Full(_)) => self.count_dispatch("deferred_announcer_full", 1),
            // The announcer is gone (the web is stopping): the relay will do it.
            Err(mpsc::error::TrySendError::Closed(_)) => self.count_dispatch("deferred_announcer_gone", 1),
        }
    }
}

/// Keeps `task` in `slot`, for [`Dispatcher::drain`] to wait for.
fn keep(slot: &StdMutex<Option<JoinHandle<()>>>, task: JoinHandle<()>) {
    if let Ok(mut slot) = slot.lock() {
        *slot = Some(task);
    }
}

/// Waits up to `within` for the task kept in `slot` (taking it); false if it is still
/// running then. A slot never filled is finished.
async fn finished(slot: &StdMutex<Option<JoinHandle<()>>>, within: Duration) -> bool {
    let task = slot.lock().ok().and_then(|mut task| task.take());
    match task {
        Some(task) => tokio::time::timeout(within, task).await.is_ok(),
        None => true,
    }
}

/// Up to `limit` messages of `inbox` into `into`, waiting for the first; 0 once the
/// inbox is closed and empty. Once `stop` is set the inbox takes nothing more (senders
/// find it closed) and what it holds is still received.
async fn receive<T>(
    inbox: &mut mpsc::Receiver<T>,
    into: &mut Vec<T>,
    limit: usize,
    stop: &mut watch::Receiver<bool>,
) -> usize {
    if !inbox.is_closed() {
        tokio::select! {
            n = inbox.recv_many(into, limit) => return n,
            _ = stop.wait_for(|stopping| *stopping) => inbox.close(),
        }
    }
    inbox.recv_many(into, limit).await
}

/// The marker: gathers the records enqueued within `every` ([`MARK_EVERY`]) of the first
/// one waiting (at most [`MAX_MARKS`]), marks them in one statement, and starts over.
/// Once `stop` is set it marks what it holds at once, and ends when nothing is left.
async fn mark_all(
    db: DatabaseConnection,
    mut inbox: mpsc::Receiver<i64>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut records = Vec::with_capacity(MAX_MARKS);
    while receive(&mut inbox, &mut records, MAX_MARKS, &mut stop).await > 0 {
        let until = tokio::time::Instant::now() + every;
        while records.len() < MAX_MARKS && !inbox.is_closed() {
            let room = MAX_MARKS - records.len();
            match tokio::time::timeout_at(until, receive(&mut inbox, &mut records, room, &mut stop)).await {
                Ok(n) if n > 0 => {}
                // The time is up, or the web is stopping: mark what is here.
                _ => break,
            }
        }
        if let Err(e) = shared::queries::dispatch::mark_enqueued_many(&db, &records).await {
            tracing::warn!(records = records.len(), error = %e, "dispatch.mark_enqueued failed");
        }
        records.clear();
    }
}
