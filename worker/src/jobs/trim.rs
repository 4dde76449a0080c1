//! The trim task: keeps apalis-redis's finished job records within a budget.
//!
//! apalis-redis keeps every finished job forever (about 421 B each: its `meta:<id>`
//! hash, its payload in the `data` hash, its id in the `done` set), and its `vacuum()`
//! deletes everything in one blocking script, including jobs waiting to retry. This task
//! removes finished records older than `JOB_RETENTION_SECS`, and the oldest beyond
//! `JOB_RETENTION_COUNT`, a small batch per round trip so Redis never blocks for long.
//! Jobs that are pending, scheduled or in flight are never touched: only ids in the
//! `done` and `dead` sets are considered.

use redis::AsyncCommands;
use shared::queue::JobQueue;

use super::JobError;
use crate::context::WorkerContext;

/// Records examined per round trip.
const BATCH: usize = 500;

/// Most batches per run; the rest waits for the next tick.
const MAX_BATCHES: usize = 200;

/// What one run removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Finished (done) job records removed.
    pub done: u64,
    /// Dead job records removed.
    pub dead: u64,
}

/// Runs one trim pass.
pub async fn run(ctx: &WorkerContext, queue: &JobQueue) -> Result<Trimmed, JobError> {
    let config = queue.fan_out_config().clone();
    let retention = ctx.settings.worker.job_retention.as_secs();
    let keep = ctx.settings.worker.job_retention_count;
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let mut conn = queue.connection();
    let redis_error = |e: redis::RedisError| JobError::retryable(e);
    let mut trimmed = Trimmed::default();
    for (set, counter) in [(config.done_jobs_set(), &mut trimmed.done), (config.dead_jobs_set(), &mut trimmed.dead)] {
        for _ in 0..MAX_BATCHES {
            let total: u64 = conn.scard(&set).await.map_err(redis_error)?;
            if total == 0 {
                break;
            }
            let ids: Vec<String> =
                redis::cmd("SRANDMEMBER").arg(&set).arg(BATCH).query_async(&mut conn).await.map_err(redis_error)?;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hget(format!("{}:{id}", config.job_meta_hash()), "done_at");
            }
            let done_at: Vec<Option<u64>> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
            let mut aged: Vec<(&String, u64)> = ids.iter().zip(done_at).map(|(id, at)| (id, at.unwrap_or(0))).collect();
            aged.sort_by_key(|(_, at)| *at);
            let over_count = total.saturating_sub(keep) as usize;
            let expired = aged.iter().filter(|(_, at)| now.saturating_sub(*at) >= retention).count();
            let remove = expired.max(over_count.min(aged.len()));
            if remove == 0 {
                break;
            }
            let victims: Vec<&String> = aged.iter().take(remove).map(|(id, _)| *id).collect();
            let mut pipe = redis::pipe();
            pipe.srem(&set, &victims).ignore().hdel(config.job_data_hash(), &victims).ignore();
            for id in &victims {
                pipe.del(format!("{}:{id}", config.job_meta_hash())).ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.map_err(redis_error)?;
            *counter += victims.len() as u64;
            if remove < ids.len() && over_count <= remove {
                // The sample had records to keep: the rest are younger, stop here.
                break;
            }
        }
    }
    if trimmed.done + trimmed.dead > 0 {
        tracing::info!(done = trimmed.done, dead = trimmed.dead, "trim.removed");
        ctx.metrics
            .counter("tidings_trimmed_total", "Records removed from Redis by the trim task.", &[("kind", "done_jobs")])
            .add(trimmed.done);
        ctx.metrics
            .counter("tidings_trimmed_total", "Records removed from Redis by the trim task.", &[("kind", "dead_jobs")])
            .add(trimmed.dead);
    }
    Ok(trimmed)
}
