//! The trim-caches task: keeps every kind of data Tidings keeps in Redis within its
//! budget. It runs once per tick (whichever worker claims it) and on demand, when the web
//! sees the cache past its budget; the two share one lock, so two trims never overlap.
//!
//! - Job records: see below.
//! - The read cache: entries of other versions, then least recently used first
//!   ([`shared::cache::Cache::trim`]).
//! - Sessions, login-failure counters, idempotency keys, the metadata of workers that are
//!   gone ([`shared::budget::sweep`]).
//!
//! What it removed is counted in `tidings_trimmed_total{kind}` and kept as the last
//! report in Redis, which `worker status` shows.
//!
//! Job records:
//! apalis-redis keeps every finished job forever (about 421 B each: its `meta:<id>`
//! hash, its payload in the `data` hash, its id in the `done` set), and its `vacuum()`
//! deletes everything in one blocking script, including jobs waiting to retry. This task
//! removes finished records older than `JOB_RETENTION_SECS`, and the oldest beyond
//! `JOB_RETENTION_COUNT`, a small batch per round trip so Redis never blocks for long,
//! for as long as records are due (up to half the interval, at most 30 s).
//! Jobs that are pending, scheduled or in flight are never touched: only ids in the
//! `done` and `dead` sets are considered.

use redis::AsyncCommands;
use shared::queue::JobQueue;

use super::JobError;
use crate::context::WorkerContext;

/// Records examined per round trip.
const BATCH: usize = 500;

/// The longest one run spends on job records: half the trim's interval, at most this.
/// Within it a run goes on while records are due, so a tick removes what finished since
/// the last one however busy the queue was (not a fixed number of batches); what is left
/// past it waits for the next tick.
const MAX_RECORDS_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// What one run removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Finished (done) job records removed.
    pub done: u64,
    /// Dead job records removed.
    pub dead: u64,
}

/// What one trim removed, by kind, as `worker status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrimReport {
    /// When it ran (UTC).
    pub at: String,
    /// `tick` or `on_demand`.
    pub trigger: String,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
    /// Keys or entries removed, by kind; kinds with nothing removed are left out.
    pub removed: Vec<(String, u64)>,
    /// The cache's entries and bytes after the trim, when the cache is on.
    pub cache_after: Option<(u64, u64)>,
}

/// The key of the last [`TrimReport`].
pub fn report_key(namespace: &str) -> String {
    format!("{namespace}:trim-caches:last")
}

/// Runs one trim of everything: job records (when there is a queue), the cache (when
/// it is on), and the budgeted kinds. `trigger` says why, for the report.
pub async fn run(ctx: &WorkerContext, trigger: &str) -> Result<TrimReport, JobError> {
    let started = std::time::Instant::now();
    let mut removed: Vec<(String, u64)> = Vec::new();
    // The cache first: it is what an on-demand trim was asked for, and the job records
    // can take longer.
    let mut cache_after = None;
    if let Some(cache) = &ctx.cache {
        let cache_trimmed = cache.trim().await.map_err(JobError::retryable)?;
        removed.push(("cache_old_version".into(), cache_trimmed.old_version));
        removed.push(("cache_expired".into(), cache_trimmed.expired));
        removed.push(("cache_evicted".into(), cache_trimmed.evicted));
        let usage = cache.usage().await.map_err(JobError::retryable)?;
        cache_after = Some((usage.entries, usage.bytes));
    }
    if let Some(queue) = &ctx.queue {
        let jobs = trim_job_records(ctx, queue).await?;
        removed.push(("done_jobs".into(), jobs.done));
        removed.push(("dead_jobs".into(), jobs.dead));
    }
    // The on-demand trim is about the cache; the walk of the whole namespace waits for the
    // tick.
    if let (Some(queue), "tick") = (&ctx.queue, trigger) {
        let mut conn = queue.connection();
        let swept = shared::budget::sweep(&mut conn, queue.namespace(), &ctx.settings.budgets)
            .await
            .map_err(JobError::retryable)?;
        removed.push(("expired_sessions".into(), swept.expired_sessions));
        removed.push(("sessions".into(), swept.sessions));
        removed.push(("rate_limits".into(), swept.rate_limits));
        removed.push(("idempotency_keys".into(), swept.idempotency_keys));
        removed.push(("worker_metadata".into(), swept.worker_metadata));
    }
    removed.retain(|(_, n)| *n > 0);
    for (kind, n) in &removed {
        ctx.metrics
            .counter(
                "tidings_trimmed_total",
                "Keys and entries removed from Redis by the trim, by kind.",
                &[("kind", kind.as_str())],
            )
            .add(*n);
    }
    ctx.metrics.counter("tidings_trims_total", "Trims run, by trigger.", &[("trigger", trigger)]).inc();
    let report = TrimReport {
        at: chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        trigger: trigger.to_owned(),
        took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        removed,
        cache_after,
    };
    if !report.removed.is_empty() {
        tracing::info!(trigger, removed = ?report.removed, took_ms = report.took_ms, "trim.removed");
    }
    if let Some(queue) = &ctx.queue {
        let mut conn = queue.connection();
        let body = serde_json::to_string(&report).map_err(JobError::retryable)?;
        let _: () = conn.set(report_key(queue.namespace()), body).await.map_err(JobError::retryable)?;
    }
    Ok(report)
}

/// Removes finished job records past their retention (age and count).
async fn trim_job_records(ctx: &WorkerContext, queue: &JobQueue) -> Result<Trimmed, JobError> {
    let config = queue.fan_out_config().clone();
    let retention = ctx.settings.worker.job_retention.as_secs();
    let keep = ctx.settings.worker.job_retention_count;
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let mut conn = queue.connection();
    let redis_error = |e: redis::RedisError| JobError::retryable(e);
    let mut trimmed = Trimmed::default();
    // Each set gets half the time: finished records cannot crowd out the dead ones.
    let per_set = (ctx.settings.worker.trim_interval / 2).min(MAX_RECORDS_TIME) / 2;
    for (set, counter) in [(config.done_jobs_set(), &mut trimmed.done), (config.dead_jobs_set(), &mut trimmed.dead)] {
        let deadline = std::time::Instant::now() + per_set;
        while std::time::Instant::now() < deadline {
            let total: u64 = conn.scard(&set).await.map_err(redis_error)?;
            if total == 0 {
                break;
            }
            let ids: Vec<String> =
                redis::cmd("SRANDMEMBER").arg(&set).arg(BATCH).query_async(&mut conn).await.map_err(redis_error)?;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET").arg(format!("{}:{id}", config.job_meta_hash())).arg("done_at").arg("idempotency_key");
            }
            let meta: Vec<(Option<u64>, Option<String>)> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
            let mut aged: Vec<(&String, u64, Option<String>)> =
                ids.iter().zip(meta).map(|(id, (at, key))| (id, at.unwrap_or(0), key)).collect();
            aged.sort_by_key(|(_, at, _)| *at);
            let over_count = total.saturating_sub(keep) as usize;
            let expired = aged.iter().filter(|(_, at, _)| now.saturating_sub(*at) >= retention).count();
            let remove = expired.max(over_count.min(aged.len()));
            if remove == 0 {
                break;
            }
            let victims: Vec<&String> = aged.iter().take(remove).map(|(id, _, _)| *id).collect();
            let mut pipe = redis::pipe();
            pipe.srem(&set, &victims).ignore().hdel(config.job_data_hash(), &victims).ignore();
            for id in &victims {
                pipe.del(format!("{}:{id}", config.job_meta_hash())).ignore();
            }
            // A finished fan-out's idempotency key has done its work (its dispatch is
            // settled, nothing enqueues it again): it goes with the record. A digest's key
            // stays until it expires: it keeps a burst's window to one digest however
            // late its messages' fan-outs run.
            let done_with = |key: &&str| key.starts_with("dispatch-");
            for key in aged.iter().take(remove).filter_map(|(_, _, key)| key.as_deref().filter(done_with)) {
                pipe.del(format!("{}:{key}", config.idempotency_key_set())).ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.map_err(redis_error)?;
            *counter += victims.len() as u64;
            // The sample is random: one with records to keep says nothing of the rest.
            // The walk stops at a sample with nothing due, or at the deadline.
        }
    }
    Ok(trimmed)
}
