//! The dispatch relay: hands due dispatch records to the queue.
//!
//! Runs once per tick across all workers. It enqueues records the web could not enqueue
//! (Redis was down), retries scheduled for now, and records whose job was enqueued long
//! ago but never completed (lost from Redis). Jobs are idempotent, so enqueueing one
//! twice is harmless; skipping one would lose a notification.

use shared::jobs::FanOut;
use shared::queries::dispatch;

use super::JobError;
use crate::context::WorkerContext;

/// Records handed over per pass; the rest wait for the next tick.
const BATCH: u64 = 1000;

/// A job enqueued this long ago and still not completed is considered lost.
const LOST_AFTER: chrono::Duration = chrono::Duration::minutes(10);

/// Runs one relay pass; returns how many jobs it enqueued.
pub async fn run(ctx: &WorkerContext) -> Result<usize, JobError> {
    let grace = chrono::Duration::from_std(ctx.settings.worker.relay_grace).unwrap_or(chrono::Duration::seconds(5));
    let due = dispatch::due_for_relay(&ctx.db, grace, shared::queries::now() - LOST_AFTER, BATCH).await?;
    let mut enqueued = 0;
    for record in due {
        ctx.queue
            .enqueue_fan_out(FanOut::new(record.feedback_id, record.id), record.enqueue_count)
            .await
            .map_err(|e| JobError::Retryable(e.into()))?;
        dispatch::mark_enqueued(&ctx.db, record.id).await?;
        enqueued += 1;
    }
    if enqueued > 0 {
        tracing::info!(enqueued, "relay.enqueued");
    }
    Ok(enqueued)
}
