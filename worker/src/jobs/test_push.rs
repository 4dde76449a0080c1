//! The test-notification job: one push to each device of one admin, through the same
//! queue, sender and outcome handling as real notifications (a gone device is deleted).
//! Nothing is recorded per delivery: pushes that may pass later are retried as a test
//! push limited to those devices.

use shared::domain::Notification;
use shared::jobs::TestPush;
use shared::queries::subscription;

use super::{JobError, Retries};
use crate::context::WorkerContext;
use crate::push::{PushMessage, Urgency};

/// Sends the test notification to the admin's devices (those of `job.only`, when set);
/// returns how many took it.
pub async fn run(job: &TestPush, ctx: &WorkerContext) -> Result<usize, JobError> {
    let payload = Notification::test(&ctx.settings.web.public_url).to_payload();
    let message = PushMessage { payload: &payload, topic: "test", urgency: Urgency::High };
    let mut delivered = 0;
    let mut retries = Retries::default();
    for sub in subscription::of_owner(&ctx.db, job.admin_id).await? {
        if job.only.as_ref().is_some_and(|only| !only.contains(&sub.id)) {
            continue;
        }
        let outcome = super::send_untracked(ctx, &sub, &message).await;
        delivered += usize::from(retries.note(sub.id, outcome));
    }
    tracing::info!(admin_id = job.admin_id, delivered, retrying = retries.ids.len(), "test_push.finished");
    retries.into_result(|ids| {
        let rest = TestPush { only: Some(ids), ..job.clone() };
        serde_json::to_vec(&rest).unwrap_or_default()
    })?;
    Ok(delivered)
}
