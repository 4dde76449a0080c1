//! Jobs, one module each; all are idempotent and carry ids, not data.

pub mod backoff;
pub mod digest;
pub mod fan_out;
pub mod prune;
pub mod relay;
pub mod test_push;
pub mod trim;

/// Runs a parsed job (an unreadable payload is a permanent failure).
pub async fn run(
    job: Result<shared::jobs::QueuedJob, String>,
    ctx: &crate::context::WorkerContext,
) -> Result<(), JobError> {
    use shared::jobs::QueuedJob;
    match job {
        Ok(QueuedJob::FanOut(payload)) => fan_out::run(payload, ctx).await,
        Ok(QueuedJob::TestPush(payload)) => test_push::run(&payload, ctx).await.map(|_| ()),
        Ok(QueuedJob::Digest(payload)) => digest::run(&payload, ctx).await.map(|_| ()),
        Ok(QueuedJob::Ping(_)) => Ok(()),
        Ok(QueuedJob::InvalidateCache(payload)) => invalidate(ctx, &payload.feedback_ids).await,
        Ok(QueuedJob::TrimCaches(_)) => {
            if let Some(queue) = &ctx.queue {
                // Started: the next budget overrun may queue another.
                use redis::AsyncCommands;
                let _: () = queue
                    .connection()
                    .del(shared::queue::trim_request_key(queue.namespace()))
                    .await
                    .map_err(JobError::retryable)?;
            }
            trim::run(ctx, "on_demand").await.map(|_| ())
        }
        Err(reason) => Err(JobError::Permanent(reason)),
    }
}

/// Drops what the read cache shows of the messages `ids` (nothing to do when the cache
/// is off).
pub async fn invalidate(ctx: &crate::context::WorkerContext, ids: &[i64]) -> Result<(), JobError> {
    let Some(cache) = &ctx.cache else { return Ok(()) };
    let dropped = cache.invalidate(ids).await.map_err(JobError::retryable)?;
    ctx.metrics
        .counter("tidings_cache_invalidated_total", "Cache entries dropped because a message they show changed.", &[])
        .add(dropped);
    tracing::debug!(?ids, dropped, "cache.invalidated");
    Ok(())
}

/// How a job failed, which decides whether it is tried again.
///
/// The classification follows the push services' answers (and the seed's SMS module):
/// timeouts, connection errors, 429 and 5xx may pass later and are retried under the
/// kind's [`shared::jobs::RetryPolicy`]; other 4xx, and payloads this build can't read,
/// never will and are not.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// May succeed later: run the job again after a backoff.
    #[error("retryable: {error:#}")]
    Retryable {
        /// What failed.
        error: anyhow::Error,
        /// Not before this long (a push service's `Retry-After`).
        retry_after: Option<std::time::Duration>,
        /// The payload to retry when it is not the job's own (only the part that failed).
        rest: Option<Vec<u8>>,
    },
    /// Will never succeed (unsupported payload): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl JobError {
    /// A failure that may pass: the whole job runs again.
    pub fn retryable(error: impl Into<anyhow::Error>) -> Self {
        Self::Retryable { error: error.into(), retry_after: None, rest: None }
    }
}

impl From<sea_orm::DbErr> for JobError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::retryable(e)
    }
}

/// What became of one untracked push.
#[derive(Debug)]
pub(crate) enum Untracked {
    /// The push service took it.
    Delivered,
    /// The subscription is gone (and was deleted), or the push was refused for good.
    NotDelivered,
    /// May pass later; not before `retry_after` if the push service said so.
    Retry {
        /// Why it failed.
        reason: String,
        /// The push service's `Retry-After`.
        retry_after: Option<std::time::Duration>,
    },
}

/// Pushes of an untracked job (test push, digest) that may pass later.
#[derive(Debug, Default)]
pub(crate) struct Retries {
    /// The subscriptions to try again.
    pub ids: Vec<i64>,
    /// The longest `Retry-After` among them.
    pub retry_after: Option<std::time::Duration>,
    /// The last reason.
    pub reason: String,
}

impl Retries {
    /// Notes the outcome of the push to `id`; true when it was delivered.
    pub fn note(&mut self, id: i64, outcome: Untracked) -> bool {
        match outcome {
            Untracked::Delivered => true,
            Untracked::NotDelivered => false,
            Untracked::Retry { reason, retry_after } => {
                self.ids.push(id);
                self.retry_after = self.retry_after.max(retry_after);
                self.reason = reason;
                false
            }
        }
    }

    /// `Ok` when nothing is left to retry, else the error that retries the rest with
    /// `rest(ids)` as the payload.
    pub fn into_result(mut self, rest: impl FnOnce(Vec<i64>) -> Vec<u8>) -> Result<(), JobError> {
        if self.ids.is_empty() {
            return Ok(());
        }
        self.ids.sort_unstable();
        let error = anyhow::anyhow!("{} push(es) may pass later: {}", self.ids.len(), self.reason);
        Err(JobError::Retryable { error, retry_after: self.retry_after, rest: Some(rest(self.ids)) })
    }
}

/// Sends `message` to `sub` without a delivery record (test pushes, digests): counts and
/// times it, deletes a gone subscription, records success or failure on it.
///
/// The push's outcome stands even when that bookkeeping fails (it is logged): failing
/// the job there would retry it, and send the push again to every subscription it
/// already reached.
pub(crate) async fn send_untracked(
    ctx: &crate::context::WorkerContext,
    sub: &shared::entities::push_subscription::Model,
    message: &crate::push::PushMessage<'_>,
) -> Untracked {
    use crate::push::{PushOutcome, PushTarget};
    use shared::queries::subscription;
    let target = PushTarget { endpoint: &sub.endpoint, p256dh: &sub.p256dh, auth: &sub.auth };
    let started = std::time::Instant::now();
    let outcome = ctx.sender.send(&target, message).await;
    crate::push::record(&ctx.metrics, &outcome, started.elapsed());
    let (untracked, recorded) = match outcome {
        PushOutcome::Delivered => (Untracked::Delivered, subscription::record_success(&ctx.db, sub.id).await),
        PushOutcome::Gone { status } => {
            tracing::info!(subscription_id = sub.id, status, "push.subscription_gone");
            (Untracked::NotDelivered, subscription::delete(&ctx.db, sub.id).await.map(|_| ()))
        }
        PushOutcome::Retry { reason, retry_after } => {
            tracing::warn!(subscription_id = sub.id, %reason, "push.untracked_retry");
            (Untracked::Retry { reason, retry_after }, Ok(()))
        }
        PushOutcome::Rejected { reason, .. } => {
            tracing::warn!(subscription_id = sub.id, %reason, "push.untracked_failed");
            (Untracked::NotDelivered, subscription::record_failure(&ctx.db, sub.id, &reason).await)
        }
    };
    if let Err(e) = recorded {
        tracing::warn!(subscription_id = sub.id, error = %e, "push.untracked_record_failed");
    }
    untracked
}
