//! The prune task: deletes push subscriptions that have failed for
//! `PRUNE_FAILING_SUBSCRIPTIONS_DAYS` days (no successful push since, at least one
//! failure), and dispatch records completed `PRUNE_DISPATCHES_DAYS` days ago. Gone
//! subscriptions (404/410) are deleted at once by the sender; this catches the ones a
//! push service keeps refusing in other ways. Runs once per tick across all workers.

use shared::queries::{dispatch, subscription};

use super::JobError;
use crate::context::WorkerContext;

/// Dispatch records deleted per statement.
const DISPATCH_BATCH: u64 = 1000;

/// Runs one prune pass: failing subscriptions and old dispatch records, each pass run
/// even when the other failed; returns the first failure.
pub async fn run(ctx: &WorkerContext) -> Result<(), JobError> {
    let dispatches = prune_dispatches(ctx).await;
    let subscriptions = prune_subscriptions(ctx).await;
    dispatches.and(subscriptions)
}

/// When a record `days` days old was made.
fn days_ago(days: u32) -> chrono::DateTime<chrono::Utc> {
    shared::queries::now() - chrono::Duration::days(i64::from(days))
}

/// Deletes the subscriptions failing for `PRUNE_FAILING_SUBSCRIPTIONS_DAYS` days.
async fn prune_subscriptions(ctx: &WorkerContext) -> Result<(), JobError> {
    let Some(days) = ctx.settings.worker.prune_failing_after_days else { return Ok(()) };
    let pruned = subscription::delete_failing_since(&ctx.db, days_ago(days)).await?;
    if pruned > 0 {
        tracing::info!(pruned, days, "prune.subscriptions_deleted");
        ctx.metrics
            .counter("tidings_subscriptions_pruned_total", "Subscriptions deleted after failing for days.", &[])
            .add(pruned);
    }
    Ok(())
}

/// Deletes the dispatch records completed `PRUNE_DISPATCHES_DAYS` days ago.
async fn prune_dispatches(ctx: &WorkerContext) -> Result<(), JobError> {
    let Some(days) = ctx.settings.worker.prune_dispatches_after_days else { return Ok(()) };
    let pruned = dispatch::delete_completed_before(&ctx.db, days_ago(days), DISPATCH_BATCH).await?;
    if pruned > 0 {
        tracing::info!(pruned, days, "prune.dispatches_deleted");
        ctx.metrics
            .counter("tidings_dispatches_pruned_total", "Completed dispatch records deleted after days.", &[])
            .add(pruned);
    }
    Ok(())
}
