//! The dispatch relay: hands due dispatch records to the queue.
//!
//! Runs once per tick across all workers. It enqueues records the web could not enqueue
//! (Redis was down), retries scheduled for now, and records whose job was enqueued long
//! ago but never completed (lost from Redis). Jobs are idempotent, so enqueueing one
//! twice is harmless; skipping one would lose a notification.

use shared::jobs::FanOut;
use shared::queries::dispatch;
use shared::queue::JobQueue;

use super::JobError;
use crate::context::WorkerContext;

/// Records read and enqueued per round trip.
const BATCH: u64 = 500;

/// A job enqueued (or scheduled for a retry) this long ago and still not completed is
/// considered lost, unless the fan-out's retry policy waits longer between attempts.
const LOST_AFTER: chrono::Duration = chrono::Duration::minutes(10);

/// How long after its record was last marked enqueued (or its job scheduled for a retry)
/// an uncompleted fan-out is taken for lost: [`LOST_AFTER`], or the longest wait between
/// two attempts (`JOB_RETRY_FAN_OUT`'s cap) and five minutes more, whichever is longer
/// (15 minutes with the default cap), at most [`LOST_AFTER_MAX`]. A job waiting out its
/// retry is not lost, and enqueueing it again would start a second chain of attempts
/// beside it.
fn lost_after(retry_cap: std::time::Duration) -> chrono::Duration {
    let cap = chrono::Duration::from_std(retry_cap).unwrap_or(LOST_AFTER_MAX);
    LOST_AFTER.max(cap.checked_add(&chrono::Duration::minutes(5)).unwrap_or(LOST_AFTER_MAX)).min(LOST_AFTER_MAX)
}

/// The longest [`lost_after`], whatever the retry cap says.
const LOST_AFTER_MAX: chrono::Duration = chrono::Duration::days(7);

/// Runs one relay pass; returns how many jobs it enqueued.
///
/// It keeps Redis's backlog at or below `QUEUE_MAX_BACKLOG`: it only fills the room the
/// backlog leaves, so a burst waits in the dispatch table and flows in as workers drain
/// the queue (apalis-redis fails every fetch once about 8,000 jobs are due at once).
pub async fn run(ctx: &WorkerContext, queue: &JobQueue) -> Result<usize, JobError> {
    let grace = chrono::Duration::from_std(ctx.settings.worker.relay_grace).unwrap_or(chrono::Duration::seconds(5));
    let max_backlog = ctx.settings.worker.max_backlog;
    let lost = lost_after(ctx.settings.worker.retry_policy(shared::jobs::FAN_OUT_KIND).cap);
    let mut enqueued = 0;
    loop {
        let backlog = queue.backlog().await.map_err(JobError::retryable)?;
        let room = max_backlog.saturating_sub(backlog).min(BATCH);
        if room == 0 {
            break;
        }
        let due = dispatch::due_for_relay(&ctx.db, grace, shared::queries::now() - lost, room).await?;
        if due.is_empty() {
            break;
        }
        let jobs: Vec<(FanOut, i32, Option<String>)> = due
            .iter()
            .map(|record| (FanOut::new(record.feedback_id, record.id), record.enqueue_count, record.request_id.clone()))
            .collect();
        queue.enqueue_fan_outs(&jobs).await.map_err(JobError::retryable)?;
        let ids: Vec<i64> = due.iter().map(|record| record.id).collect();
        dispatch::mark_enqueued_many(&ctx.db, &ids).await?;
        enqueued += due.len();
        ctx.metrics
            .counter("tidings_jobs_enqueued_total", "Jobs put on the Redis queue, by kind.", &[("kind", "fan_out")])
            .add(due.len() as u64);
        if (due.len() as u64) < room {
            break;
        }
    }
    if enqueued > 0 {
        tracing::info!(enqueued, "relay.enqueued");
    }
    Ok(enqueued)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::lost_after;

    #[test]
    fn a_job_waiting_out_its_longest_retry_is_not_taken_for_lost() {
        assert_eq!(lost_after(Duration::from_secs(60)), chrono::Duration::minutes(10));
        assert_eq!(lost_after(Duration::from_secs(600)), chrono::Duration::minutes(15));
        assert_eq!(lost_after(Duration::from_secs(3600)), chrono::Duration::minutes(65));
        assert_eq!(lost_after(Duration::MAX), chrono::Duration::days(7));
    }
}
