//! Jobs, one module each; all are idempotent and carry ids, not data.

pub mod backoff;
pub mod digest;
pub mod fan_out;
pub mod relay;
pub mod test_push;
pub mod trim;

/// How a job failed, which decides whether it is tried again.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// May succeed later (database or Redis unreachable): run the job again.
    #[error("retryable: {0:#}")]
    Retryable(anyhow::Error),
    /// Will never succeed (unsupported payload): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sea_orm::DbErr> for JobError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::Retryable(e.into())
    }
}

/// Sends `message` to `sub` without a delivery record (test pushes, digests): counts and
/// times it, deletes a gone subscription, records success or failure on it. True when the
/// push service took it.
pub(crate) async fn send_untracked(
    ctx: &crate::context::WorkerContext,
    sub: &shared::entities::push_subscription::Model,
    message: &crate::push::PushMessage<'_>,
) -> Result<bool, JobError> {
    use crate::push::{PushOutcome, PushTarget};
    use shared::queries::subscription;
    let target = PushTarget { endpoint: &sub.endpoint, p256dh: &sub.p256dh, auth: &sub.auth };
    let started = std::time::Instant::now();
    let outcome = ctx.sender.send(&target, message).await;
    crate::push::record(&ctx.metrics, &outcome, started.elapsed());
    match outcome {
        PushOutcome::Delivered => {
            subscription::record_success(&ctx.db, sub.id).await?;
            Ok(true)
        }
        PushOutcome::Gone { status } => {
            tracing::info!(subscription_id = sub.id, status, "push.subscription_gone");
            subscription::delete(&ctx.db, sub.id).await?;
            Ok(false)
        }
        PushOutcome::Retry { reason, .. } | PushOutcome::Rejected { reason, .. } => {
            tracing::warn!(subscription_id = sub.id, %reason, "push.untracked_failed");
            subscription::record_failure(&ctx.db, sub.id, &reason).await?;
            Ok(false)
        }
    }
}
