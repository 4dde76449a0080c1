//! The digest job: one notification for the messages of a burst ("5 new feedback
//! messages"), sent to every subscription shortly after the burst's window ends
//! (`shared::queue::DIGEST_DELAY_SECS`).
//!
//! It counts the window's messages that fold, by the rule each message's first run
//! applies (past the window's first `NOTIFY_BURST_THRESHOLD` by creation time, the
//! threshold carried by the job) and with no delivery recorded, or that folded before an
//! earlier message was deleted (`shared::queries::feedback::folded_between`). So a
//! message the window announces one by one is never counted, even when its run opens
//! after the digest, and a folded one is counted even before its run opens. Before it
//! sends, the digest completes the dispatch records of what it counted, so a run of one
//! of them that opens later folds whatever became of its window
//! (`shared::queries::delivery::open_run`).
//!
//! Like the test push, it records no per-subscription deliveries: pushes that may pass
//! later (429, 5xx, timeouts) are retried as a digest limited to those subscriptions, and
//! its `Topic` names the window, so a re-run replaces a copy the push service still
//! holds.

use shared::domain::Notification;
use shared::jobs::Digest;
use shared::queries::{feedback, subscription};

use super::{JobError, Retries};
use crate::context::WorkerContext;
use crate::push::{PushMessage, Urgency};

/// Subscriptions read per page.
const PAGE: u64 = 500;

/// Sends the digest of `job`'s window; returns how many subscriptions took it.
pub async fn run(job: &Digest, ctx: &WorkerContext) -> Result<usize, JobError> {
    let from = chrono::DateTime::from_timestamp(job.window_start, 0).unwrap_or_default();
    let to = chrono::DateTime::from_timestamp(job.window_end, 0).unwrap_or_default();
    let threshold = job.threshold.unwrap_or(ctx.settings.worker.burst_threshold);
    let folded = feedback::folded_between(&ctx.db, from, to, threshold).await?;
    let Some(latest) = folded.first() else { return Ok(0) };
    // Before anything is sent: a run of one of them still waiting behind a backlog folds
    // when it opens, however its window changed meanwhile (a message deleted).
    let ids: Vec<i64> = folded.iter().map(|m| m.id).collect();
    shared::queries::dispatch::complete_for_messages(&ctx.db, &ids).await?;
    let notification =
        Notification::digest(folded.len(), &latest.submitter_name, &latest.content, &ctx.settings.web.public_url);
    let payload = notification.to_payload();
    let topic = format!("digest{}", job.window_end);
    let message = PushMessage { payload: &payload, topic: &topic, urgency: Urgency::High };
    let mut delivered = 0;
    let mut retries = Retries::default();
    let mut after = 0;
    loop {
        let ids = match &job.only {
            Some(only) => only.iter().copied().filter(|id| *id > after).take(PAGE as usize).collect(),
            None => subscription::ids_after(&ctx.db, after, PAGE).await?,
        };
        let Some(&last) = ids.last() else { break };
        after = last;
        for sub in subscription::by_ids(&ctx.db, &ids).await? {
            let outcome = super::send_untracked(ctx, &sub, &message).await;
            delivered += usize::from(retries.note(sub.id, outcome));
        }
    }
    tracing::info!(
        messages = folded.len(),
        delivered,
        retrying = retries.ids.len(),
        window_end = job.window_end,
        "digest.sent"
    );
    retries.into_result(|ids| {
        let rest = Digest { only: Some(ids), ..job.clone() };
        serde_json::to_vec(&rest).unwrap_or_default()
    })?;
    Ok(delivered)
}
