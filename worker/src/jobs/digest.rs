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
//! (`shared::queries::delivery::open_run`), and then marks its window read
//! (`shared::queue::JobQueue::mark_digest_read`): a message that folds after that without
//! a completed record was not counted (its statement committed late) and goes out alone
//! (`super::fan_out`). It then reads the window again and announces what folds with no
//! record outstanding: what it completed, what committed late but folded before the
//! mark (its run completed its record), and what lost its record to the prune. Once the
//! window is marked, a retry or a re-run completes nothing (`announced`).
//!
//! Like the test push, it records no per-subscription deliveries: pushes that may pass
//! later (429, 5xx, timeouts) are retried as a digest limited to those subscriptions,
//! a reading of the subscriptions that fails part-way as one limited to those not reached
//! yet, and its `Topic` names the window, so a re-run replaces a copy the push service
//! still holds.

use sea_orm::DatabaseConnection;
use shared::domain::Notification;
use shared::jobs::Digest;
use shared::queries::{dispatch, feedback, subscription};
use shared::queue::JobQueue;

use super::{JobError, Retries};
use crate::context::WorkerContext;
use crate::push::{PushMessage, Urgency};

/// Subscriptions read per page.
const PAGE: u64 = 500;

/// Sends the digest of `job`'s window; returns how many subscriptions took it.
pub async fn run(job: &Digest, ctx: &WorkerContext) -> Result<usize, JobError> {
    let threshold = job.threshold.unwrap_or(ctx.settings.worker.burst_threshold);
    let folded = announced(&ctx.db, ctx.queue.as_ref(), job, threshold).await?;
    let Some(latest) = feedback::newest_of(&ctx.db, &folded).await? else { return Ok(0) };
    let notification =
        Notification::digest(folded.len(), &latest.submitter_name, &latest.content, &ctx.settings.web.public_url);
    let payload = notification.to_payload();
    let topic = format!("digest{}", job.window_end);
    let message = PushMessage { payload: &payload, topic: &topic, urgency: Urgency::High };
    let mut delivered = 0;
    let mut retries = Retries::default();
    // The listed subscriptions first (a retry), then every one after `job.after` (all
    // of them when nothing is listed). A read that fails part-way is retried as what is
    // still owed, so no subscription reached gets the digest twice.
    let mut listed = job.only.clone().unwrap_or_default();
    listed.sort_unstable();
    for page in listed.chunks(PAGE as usize) {
        let Ok(subs) = subscription::by_ids(&ctx.db, page).await else {
            return Err(retry_rest(job, &retries, Owed::Listed(page[0])));
        };
        for sub in subs {
            let outcome = super::send_untracked(ctx, &sub, &message).await;
            delivered += usize::from(retries.note(sub.id, outcome));
        }
    }
    if job.only.is_none() || job.after.is_some() {
        let mut after = job.after.unwrap_or(0);
        loop {
            let page = match subscription::ids_after(&ctx.db, after, PAGE).await {
                Ok(page) => page,
                Err(_) => return Err(retry_rest(job, &retries, Owed::After(after))),
            };
            let Some(&last) = page.last() else { break };
            let Ok(subs) = subscription::by_ids(&ctx.db, &page).await else {
                return Err(retry_rest(job, &retries, Owed::After(after)));
            };
            after = last;
            for sub in subs {
                let outcome = super::send_untracked(ctx, &sub, &message).await;
                delivered += usize::from(retries.note(sub.id, outcome));
            }
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
        let rest = Digest { version: Digest::VERSION, only: Some(ids), after: None, ..job.clone() };
        serde_json::to_vec(&rest).unwrap_or_default()
    })?;
    Ok(delivered)
}

/// What the digest of `job` announces, newest first: the ids of its window's messages
/// that fold by `threshold` with no dispatch record outstanding (completed, or pruned
/// long since).
///
/// Until the window is marked read, it first reads the window and completes the records
/// of what folds (before anything is sent: a run of one of them still waiting behind a
/// backlog folds when it opens, however its window changed meanwhile, a message
/// deleted), then marks the window read: a message of it that folds from then on with
/// its record outstanding committed after that reading and goes out alone. The second
/// reading adds what committed late but folded before the mark (its run completed its
/// own record). Once the window is marked — a retry for some subscriptions, or the whole
/// digest again after a failure past the mark — it completes nothing: a message that
/// committed since goes out alone to everyone, where a retry would tell a few
/// subscriptions, and is not counted as well.
pub async fn announced(
    db: &DatabaseConnection,
    queue: Option<&JobQueue>,
    job: &Digest,
    threshold: u64,
) -> Result<Vec<i64>, JobError> {
    let from = chrono::DateTime::from_timestamp(job.window_start, 0).unwrap_or_default();
    let to = chrono::DateTime::from_timestamp(job.window_end, 0).unwrap_or_default();
    // A retry (`only`, `after`) comes after the first attempt marked the window.
    let marked = match queue {
        _ if job.only.is_some() || job.after.is_some() => true,
        Some(queue) => queue.digest_has_read(job).await.map_err(JobError::retryable)?,
        None => false,
    };
    if !marked {
        let folded = feedback::folded_between(db, from, to, threshold).await?;
        dispatch::complete_for_messages(db, &folded).await?;
        if let Some(queue) = queue {
            queue.mark_digest_read(job).await.map_err(JobError::retryable)?;
        }
    }
    let mut folded = feedback::folded_between(db, from, to, threshold).await?;
    let outstanding = dispatch::outstanding_among(db, &folded).await?;
    folded.retain(|id| !outstanding.contains(id));
    Ok(folded)
}

/// What a digest still owes when reading its subscriptions failed.
#[derive(Debug, Clone, Copy)]
enum Owed {
    /// The listed subscriptions from this one on (and, as before, those after
    /// `job.after`).
    Listed(i64),
    /// Every subscription after this id.
    After(i64),
}

/// The digest that retries what `job` still owes when a read failed at `owed`: the
/// pushes that may pass later, and the subscriptions not reached yet.
fn rest_of(job: &Digest, may_pass: &[i64], owed: Owed) -> Digest {
    let mut only = may_pass.to_vec();
    let after = match owed {
        Owed::Listed(from) => {
            only.extend(job.only.iter().flatten().copied().filter(|id| *id >= from));
            job.after
        }
        Owed::After(after) => Some(after),
    };
    only.sort_unstable();
    only.dedup();
    let version = if after.is_some() { Digest::VERSION_WITH_CURSOR } else { Digest::VERSION };
    Digest { version, only: Some(only), after, ..job.clone() }
}

/// The job's error after a failed read: retried as [`rest_of`] it.
fn retry_rest(job: &Digest, retries: &Retries, owed: Owed) -> JobError {
    let rest = rest_of(job, &retries.ids, owed);
    tracing::warn!(window_end = job.window_end, ?owed, "digest.read_failed; the rest is retried");
    JobError::Retryable {
        error: anyhow::anyhow!("reading the subscriptions failed part-way"),
        retry_after: retries.retry_after,
        rest: Some(serde_json::to_vec(&rest).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use shared::jobs::Digest;

    use super::{Owed, rest_of};

    #[test]
    fn a_failed_read_is_retried_as_what_is_still_owed() {
        let all = Digest::new(60, 120, 6);
        // Every subscription: up to 40 reached (7 may pass later), the rest after 40.
        let rest = rest_of(&all, &[7], Owed::After(40));
        assert_eq!((rest.only, rest.after, rest.version), (Some(vec![7]), Some(40), Digest::VERSION_WITH_CURSOR));

        // A retry of listed ones: failed at the page from 30 on.
        let listed = Digest { only: Some(vec![3, 30, 31, 50]), ..all.clone() };
        let rest = rest_of(&listed, &[3], Owed::Listed(30));
        assert_eq!((rest.only, rest.after, rest.version), (Some(vec![3, 30, 31, 50]), None, Digest::VERSION));

        // Listed ones and every one after 100, failed past 100: the listed are done.
        let both = Digest { only: Some(vec![5, 9]), after: Some(100), ..all };
        let rest = rest_of(&both, &[9], Owed::After(250));
        assert_eq!((rest.only, rest.after), (Some(vec![9]), Some(250)));
        assert_eq!(rest.threshold, Some(6), "the rule stays the same");
    }
}
