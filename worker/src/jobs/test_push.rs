//! The test-notification job: one push to each device of one admin, through the same
//! queue, sender and outcome handling as real notifications (a gone device is deleted).
//! Nothing is recorded per delivery: a test is not retried.

use shared::domain::Notification;
use shared::queries::subscription;

use super::JobError;
use crate::context::WorkerContext;
use crate::push::{PushMessage, PushOutcome, PushTarget, Urgency};

/// Sends the test notification to admin `admin_id`'s devices; returns how many took it.
pub async fn run(admin_id: i64, ctx: &WorkerContext) -> Result<usize, JobError> {
    let payload = Notification::test(&ctx.settings.web.public_url).to_payload();
    let message = PushMessage { payload: &payload, topic: "test", urgency: Urgency::High };
    let mut delivered = 0;
    for sub in subscription::of_owner(&ctx.db, admin_id).await? {
        let target = PushTarget { endpoint: &sub.endpoint, p256dh: &sub.p256dh, auth: &sub.auth };
        let started = std::time::Instant::now();
        let outcome = ctx.sender.send(&target, &message).await;
        crate::push::record(&ctx.metrics, &outcome, started.elapsed());
        match outcome {
            PushOutcome::Delivered => {
                subscription::record_success(&ctx.db, sub.id).await?;
                delivered += 1;
            }
            PushOutcome::Gone { status } => {
                tracing::info!(subscription_id = sub.id, status, "push.subscription_gone");
                subscription::delete(&ctx.db, sub.id).await?;
            }
            PushOutcome::Retry { reason, .. } | PushOutcome::Rejected { reason, .. } => {
                tracing::warn!(subscription_id = sub.id, %reason, "test_push.failed");
                subscription::record_failure(&ctx.db, sub.id, &reason).await?;
            }
        }
    }
    tracing::info!(admin_id, delivered, "test_push.finished");
    Ok(delivered)
}
