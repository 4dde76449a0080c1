//! The test-notification job: one push to each device of one admin, through the same
//! queue, sender and outcome handling as real notifications (a gone device is deleted).
//! Nothing is recorded per delivery: a test is not retried.

use shared::domain::Notification;
use shared::queries::subscription;

use super::JobError;
use crate::context::WorkerContext;
use crate::push::{PushMessage, Urgency};

/// Sends the test notification to admin `admin_id`'s devices; returns how many took it.
pub async fn run(admin_id: i64, ctx: &WorkerContext) -> Result<usize, JobError> {
    let payload = Notification::test(&ctx.settings.web.public_url).to_payload();
    let message = PushMessage { payload: &payload, topic: "test", urgency: Urgency::High };
    let mut delivered = 0;
    for sub in subscription::of_owner(&ctx.db, admin_id).await? {
        if super::send_untracked(ctx, &sub, &message).await? {
            delivered += 1;
        }
    }
    tracing::info!(admin_id, delivered, "test_push.finished");
    Ok(delivered)
}
