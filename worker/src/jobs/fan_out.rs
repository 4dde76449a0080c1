//! The fan-out job: send one feedback message to every push subscription.
//!
//! Subscriptions are read in pages (memory stays flat however many there are; the next
//! page is claimed while the current one is sent) and each
//! delivery is *claimed* in the database before its push is sent (see
//! `shared::queries::delivery`), so re-running the job — a retry, a second worker during
//! a graceful drain, the relay re-enqueueing a lost job — never sends a subscription the
//! same message twice. Deliveries that may succeed later are retried on their own: the
//! job records when each is due and leaves a dispatch record for that time.

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use sea_orm::TransactionTrait;
use shared::domain::Notification;
use shared::entities::push_subscription;
use shared::jobs::FanOut;
use shared::queries::delivery::{self, Outcome};
use shared::queries::{dispatch, feedback, subscription};

use super::{JobError, backoff};
use crate::context::WorkerContext;
use crate::push::{PushMessage, PushOutcome, PushTarget, Urgency};

/// Subscriptions read and claimed per page.
const PAGE: u64 = 500;

/// The first page: small, so that the first pushes do not wait for 500 claims.
const FIRST_PAGE: u64 = 64;

/// Runs one fan-out job.
pub async fn run(job: FanOut, ctx: &WorkerContext) -> Result<(), JobError> {
    job.check_version().map_err(|e| JobError::Permanent(e.to_string()))?;
    let Some(message) = feedback::find(&ctx.db, job.feedback_id).await? else {
        // Deleted since it was submitted: there is nothing left to announce.
        dispatch::mark_completed(&ctx.db, job.dispatch_id).await?;
        return Ok(());
    };
    // A new message changes the inbox's first page and counts: drop them before anyone is
    // notified, so the click lands on an inbox that shows it.
    if let Err(e) = super::invalidate(ctx, &[message.id]).await {
        tracing::warn!(feedback_id = message.id, error = %e, "cache.invalidate_failed");
    }
    if fold_into_digest(&message, ctx).await? {
        dispatch::mark_completed(&ctx.db, job.dispatch_id).await?;
        return Ok(());
    }
    let notification =
        Notification::for_feedback(message.id, &message.submitter_name, &message.content, &ctx.settings.web.public_url);
    let run = Run {
        ctx,
        feedback_id: message.id,
        payload: notification.to_payload(),
        topic: format!("feedback{}", message.id),
        token: uuid::Uuid::new_v4().simple().to_string(),
    };
    let stats = run.deliver_all().await?;
    if let Some(due) = delivery::next_due(&ctx.db, message.id).await? {
        dispatch::create(&ctx.db, message.id, due).await?;
    }
    dispatch::mark_completed(&ctx.db, job.dispatch_id).await?;
    tracing::info!(
        feedback_id = message.id,
        sent = stats.sent,
        retrying = stats.retrying,
        failed = stats.failed,
        gone = stats.gone,
        "fan_out.finished"
    );
    Ok(())
}

/// Coalescing: past `NOTIFY_BURST_THRESHOLD` messages in one window, a message is not
/// announced on its own but counted in the window's digest, scheduled for the window's
/// end (once per window). Only a first run folds: a message some deliveries already went
/// out for is finished normally.
async fn fold_into_digest(
    message: &shared::entities::feedback_message::Model,
    ctx: &WorkerContext,
) -> Result<bool, JobError> {
    let worker = &ctx.settings.worker;
    // In-process mode has no queue to schedule a digest on: every message goes out alone.
    let Some(queue) = &ctx.queue else { return Ok(false) };
    if worker.burst_threshold == 0 || !delivery::of_feedback(&ctx.db, message.id).await?.is_empty() {
        return Ok(false);
    }
    let window = i64::try_from(worker.burst_window.as_secs()).unwrap_or(60).max(1);
    let created = message.created_at.timestamp();
    let start = created.div_euclid(window) * window;
    let from = chrono::DateTime::from_timestamp(start, 0).unwrap_or(message.created_at);
    let in_window = feedback::count_created_between(&ctx.db, from, message.created_at).await?;
    if in_window <= worker.burst_threshold {
        return Ok(false);
    }
    queue
        .schedule_digest(&shared::jobs::Digest::new(start, start + window), None)
        .await
        .map_err(JobError::retryable)?;
    tracing::info!(feedback_id = message.id, in_window, window_end = start + window, "fan_out.folded_into_digest");
    Ok(true)
}

/// Counts of outcomes in one run.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    sent: usize,
    retrying: usize,
    failed: usize,
    gone: usize,
}

impl Stats {
    fn add(&mut self, other: Stats) {
        self.sent += other.sent;
        self.retrying += other.retrying;
        self.failed += other.failed;
        self.gone += other.gone;
    }
}

/// What one push came to: a success for the batch, or the counts of an outcome already
/// recorded.
enum Delivered {
    Sent(i64),
    Other(Stats),
}

/// One execution of the job.
struct Run<'a> {
    ctx: &'a WorkerContext,
    feedback_id: i64,
    payload: Vec<u8>,
    topic: String,
    /// Marks the deliveries this run claimed.
    token: String,
}

impl Run<'_> {
    /// How long a claim holds: longer than one send can take (the request timeout) plus
    /// a margin for recording it. If the worker dies, the claim lapses after this and the
    /// delivery is sent again (the only duplicates possible are these in-flight ones).
    fn lease(&self) -> chrono::DateTime<Utc> {
        let hold = self.ctx.settings.push.request_timeout + Duration::from_secs(5);
        shared::queries::now() + chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::seconds(30))
    }

    async fn deliver_all(&self) -> Result<Stats, JobError> {
        let db = &self.ctx.db;
        let mut stats = Stats::default();
        // Retries that are due, and claims abandoned by a crashed worker.
        delivery::claim_due(db, self.feedback_id, &self.token, self.lease()).await?;
        stats.add(self.send_claimed().await?);
        // The first page is small, so the first pushes leave at once; every further page
        // is claimed while the one before it is being sent.
        let mut claimed = self.claim_page(0, FIRST_PAGE).await?;
        while let Some(last) = claimed {
            let (sent, next) = tokio::join!(self.send_claimed(), self.claim_page(last, PAGE));
            stats.add(sent?);
            claimed = next?;
        }
        Ok(stats)
    }

    /// Claims the deliveries to the next `size` subscriptions after id `after`; returns
    /// the last subscription id of the page, `None` when there are no more.
    async fn claim_page(&self, after: i64, size: u64) -> Result<Option<i64>, JobError> {
        let db = &self.ctx.db;
        let ids = subscription::ids_after(db, after, size).await?;
        let Some(&last) = ids.last() else { return Ok(None) };
        delivery::claim_new(db, self.feedback_id, &ids, &self.token, self.lease()).await?;
        Ok(Some(last))
    }

    /// Sends every delivery this run holds a claim on, with bounded concurrency.
    ///
    /// Successes are recorded in batches: whatever pushes have completed when the
    /// previous batch is written (at most `PUSH_CONCURRENCY`) go in one transaction, so
    /// a fan-out costs a few commits, not two per subscription. If the worker dies, the
    /// pushes not yet recorded (in flight, or sent and waiting for their batch: at most
    /// twice `PUSH_CONCURRENCY`) are the only ones sent again.
    async fn send_claimed(&self) -> Result<Stats, JobError> {
        let db = &self.ctx.db;
        let claimed = delivery::claimed(db, self.feedback_id, &self.token).await?;
        if claimed.is_empty() {
            return Ok(Stats::default());
        }
        let ids: Vec<i64> = claimed.iter().map(|c| c.subscription_id).collect();
        let subscriptions = subscription::by_ids(db, &ids).await?;
        let attempts_of = |id: i64| claimed.iter().find(|c| c.subscription_id == id).map_or(1, |c| c.attempts);
        let concurrency = self.ctx.settings.push.concurrency.max(1);
        let mut results = futures::stream::iter(subscriptions)
            .map(|sub| {
                let attempts = attempts_of(sub.id);
                async move { self.deliver(sub, attempts).await }
            })
            .buffer_unordered(concurrency)
            .ready_chunks(concurrency);
        let mut stats = Stats::default();
        while let Some(batch) = results.next().await {
            let mut sent = Vec::with_capacity(batch.len());
            for result in batch {
                match result? {
                    Delivered::Sent(id) => sent.push(id),
                    Delivered::Other(other) => stats.add(other),
                }
            }
            stats.sent += sent.len();
            self.record_sent(&sent).await?;
        }
        Ok(stats)
    }

    /// Records pushes the push service took, in one transaction.
    async fn record_sent(&self, ids: &[i64]) -> Result<(), JobError> {
        if ids.is_empty() {
            return Ok(());
        }
        let txn = self.ctx.db.begin().await?;
        delivery::finish_sent_many(&txn, self.feedback_id, ids, &self.token).await?;
        subscription::record_successes(&txn, ids).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Sends to one subscription and records the outcome, except a success, which the
    /// caller records in its batch.
    async fn deliver(&self, sub: push_subscription::Model, attempts: i32) -> Result<Delivered, JobError> {
        let db = &self.ctx.db;
        let push = &self.ctx.settings.push;
        let target = PushTarget { endpoint: &sub.endpoint, p256dh: &sub.p256dh, auth: &sub.auth };
        let message = PushMessage { payload: &self.payload, topic: &self.topic, urgency: Urgency::High };
        let started = std::time::Instant::now();
        let outcome = self.ctx.sender.send(&target, &message).await;
        crate::push::record(&self.ctx.metrics, &outcome, started.elapsed());
        let mut stats = Stats::default();
        match outcome {
            PushOutcome::Delivered => return Ok(Delivered::Sent(sub.id)),
            PushOutcome::Gone { status } => {
                tracing::info!(subscription_id = sub.id, status, "push.subscription_gone");
                subscription::delete(db, sub.id).await?;
                stats.gone = 1;
            }
            PushOutcome::Retry { reason, retry_after } => {
                let attempts = u32::try_from(attempts).unwrap_or(1);
                if attempts >= push.max_attempts {
                    let reason = format!("gave up after {attempts} attempts: {reason}");
                    tracing::warn!(subscription_id = sub.id, feedback_id = self.feedback_id, %reason, "push.failed");
                    delivery::finish(
                        db,
                        self.feedback_id,
                        sub.id,
                        &self.token,
                        &Outcome::Failed { reason: reason.clone() },
                    )
                    .await?;
                    subscription::record_failure(db, sub.id, &reason).await?;
                    stats.failed = 1;
                } else {
                    let wait = backoff::delay(attempts, push.retry_base, push.retry_cap, retry_after);
                    let at = shared::queries::now()
                        + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(1));
                    tracing::info!(
                        subscription_id = sub.id,
                        feedback_id = self.feedback_id,
                        attempt = attempts,
                        retry_in_ms = wait.as_millis() as u64,
                        %reason,
                        "push.retry_scheduled"
                    );
                    delivery::finish(db, self.feedback_id, sub.id, &self.token, &Outcome::Retry { at, reason }).await?;
                    stats.retrying = 1;
                }
            }
            PushOutcome::Rejected { status, reason } => {
                let reason = match status {
                    Some(code) => format!("{code}: {reason}"),
                    None => reason,
                };
                tracing::warn!(subscription_id = sub.id, feedback_id = self.feedback_id, %reason, "push.rejected");
                delivery::finish(
                    db,
                    self.feedback_id,
                    sub.id,
                    &self.token,
                    &Outcome::Failed { reason: reason.clone() },
                )
                .await?;
                subscription::record_failure(db, sub.id, &reason).await?;
                stats.failed = 1;
            }
        }
        Ok(Delivered::Other(stats))
    }
}
