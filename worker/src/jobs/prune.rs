//! The prune task: deletes push subscriptions that have failed for
//! `PRUNE_FAILING_SUBSCRIPTIONS_DAYS` days (no successful push since, at least one
//! failure). Gone subscriptions (404/410) are deleted at once by the sender; this catches
//! the ones a push service keeps refusing in other ways. Runs once per tick across all
//! workers.

use shared::queries::subscription;

use super::JobError;
use crate::context::WorkerContext;

/// Runs one prune pass; returns how many subscriptions were deleted.
pub async fn run(ctx: &WorkerContext) -> Result<u64, JobError> {
    let Some(days) = ctx.settings.worker.prune_failing_after_days else { return Ok(0) };
    let cutoff = shared::queries::now() - chrono::Duration::days(i64::from(days));
    let pruned = subscription::delete_failing_since(&ctx.db, cutoff).await?;
    if pruned > 0 {
        tracing::info!(pruned, days, "prune.subscriptions_deleted");
        ctx.metrics
            .counter("tidings_subscriptions_pruned_total", "Subscriptions deleted after failing for days.", &[])
            .add(pruned);
    }
    Ok(pruned)
}
