//! The after-commit step: hand a committed feedback's dispatch record to the queue.
//!
//! It runs after the transaction committed, in the background, so the visitor's answer
//! never waits for Redis. If Redis is down the record stays un-enqueued and the worker's
//! relay enqueues it later: nothing is lost, and nothing is ever enqueued for a
//! transaction that rolled back (this code only sees committed ids).

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use shared::jobs::FanOut;
use shared::metrics::Registry;
use shared::queries::feedback::Submitted;
use shared::queue::{JobQueue, JobRunner};
use tokio::sync::Mutex;

/// Connects to Redis lazily and re-connects after failures, so the web starts and keeps
/// accepting feedback while Redis is down.
pub struct Dispatcher {
    /// Database pool, to mark records enqueued.
    db: DatabaseConnection,
    /// Redis URL of the queue.
    redis_url: String,
    /// Key namespace of the queue.
    namespace: String,
    /// The connected queue, once a connection succeeded.
    queue: Mutex<Option<JobQueue>>,
    /// Jobs Redis may hold waiting before new ones are left to the relay.
    max_backlog: u64,
    /// Makes "check the backlog, then push" one step within this process, so concurrent
    /// submissions cannot all see room for one job and overshoot the bound together.
    enqueue_lock: Mutex<()>,
    /// Counts enqueued and deferred jobs.
    metrics: Registry,
    /// In-process mode (tests): jobs run in the request instead of going to Redis.
    immediate: Option<Arc<dyn JobRunner>>,
    /// The read cache's settings, when it is on: a new message drops what it changes.
    cache: Option<shared::cache::CacheSettings>,
}

impl Dispatcher {
    /// A dispatcher for the queue at `redis_url` / `namespace`; connects on first use.
    pub fn new(db: DatabaseConnection, redis_url: &str, namespace: &str, max_backlog: u64, metrics: Registry) -> Self {
        Self {
            db,
            redis_url: redis_url.to_owned(),
            namespace: namespace.to_owned(),
            queue: Mutex::new(None),
            max_backlog,
            enqueue_lock: Mutex::new(()),
            metrics,
            immediate: None,
            cache: None,
        }
    }

    /// With the read cache on, a committed message also drops the cached first page and
    /// counts at once (its fan-out job does it too; this way they are fresh even while
    /// no worker runs or the queue has a backlog).
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
        let mut guard = self.queue.lock().await;
        if guard.is_none() {
            match JobQueue::connect(&self.redis_url, &self.namespace).await {
                Ok(queue) => *guard = Some(queue),
                Err(e) => tracing::warn!(error = %e, "queue.connect failed; the relay will enqueue later"),
            }
        }
        guard.clone()
    }

    /// Enqueues the job of a committed submission and marks its record; failures are
    /// logged and left to the relay.
    /// `request_id` is the submitting request's, carried by the job.
    pub async fn announce(&self, submitted: Submitted, request_id: Option<String>) {
        let outcome = self.try_announce(submitted, request_id.as_deref()).await;
        self.count_dispatch(outcome);
        self.invalidate_new(submitted.feedback_id).await;
    }

    /// The read cache, when it is on and Redis is reachable (on the queue's connection).
    pub async fn cache(&self) -> Option<shared::cache::Cache> {
        let settings = self.cache.as_ref()?;
        let queue = self.queue().await?;
        Some(shared::cache::Cache::new(queue.connection(), &self.namespace, settings))
    }

    /// Drops what a new message changes from the read cache (best effort: its fan-out
    /// job does it again).
    async fn invalidate_new(&self, feedback_id: i64) {
        let Some(cache) = self.cache().await else { return };
        if let Err(e) = cache.invalidate(&[feedback_id]).await {
            tracing::debug!(feedback_id, error = %e, "cache.invalidate_failed; the fan-out job will");
        }
    }

    /// Counts what became of a committed submission's announcement.
    fn count_dispatch(&self, outcome: &'static str) {
        self.metrics
            .counter(
                "tidings_dispatch_total",
                "Committed submissions handed to Redis, run in process, or left to the relay.",
                &[("outcome", outcome)],
            )
            .inc();
    }

    async fn try_announce(&self, submitted: Submitted, request_id: Option<&str>) -> &'static str {
        let Some(queue) = self.queue().await else { return "deferred_redis_down" };
        let one_at_a_time = self.enqueue_lock.lock().await;
        // Over the backlog bound, the record waits in the database for the relay.
        match queue.backlog().await {
            Ok(backlog) if backlog >= self.max_backlog => {
                tracing::debug!(feedback_id = submitted.feedback_id, backlog, "queue.full; left to the relay");
                return "deferred_backlog_full";
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(feedback_id = submitted.feedback_id, error = %e, "queue.backlog failed; left to the relay");
                return "deferred_redis_error";
            }
        }
        let job = FanOut::new(submitted.feedback_id, submitted.dispatch_id);
        if let Err(e) = queue.enqueue_fan_out(job, 0, request_id).await {
            tracing::warn!(
                feedback_id = submitted.feedback_id,
                error = %e,
                "queue.enqueue failed; the relay will enqueue later"
            );
            return "deferred_redis_error";
        }
        // Only the check and the push need to be one step; the bookkeeping does not.
        drop(one_at_a_time);
        self.metrics
            .counter("tidings_jobs_enqueued_total", "Jobs put on the Redis queue, by kind.", &[("kind", "fan_out")])
            .inc();
        if let Err(e) = shared::queries::dispatch::mark_enqueued(&self.db, submitted.dispatch_id).await {
            // The job is queued; at worst the relay enqueues it once more (jobs are idempotent).
            tracing::warn!(dispatch_id = submitted.dispatch_id, error = %e, "dispatch.mark_enqueued failed");
        }
        "enqueued"
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
            self.count_dispatch(outcome);
            return;
        }
        let this = Arc::clone(self);
        let request_id = crate::middleware::request_id::current();
        tokio::spawn(async move { this.announce(submitted, request_id).await });
    }
}
