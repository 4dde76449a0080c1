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
use shared::domain::Notification;
use shared::jobs::FanOut;
use shared::queries::delivery::{self, Coalescing, Opening, Outcome};
use shared::queries::{dispatch, subscription};

use super::{JobError, backoff};
use crate::context::WorkerContext;
use crate::push::{PushMessage, PushOutcome, PushTarget, Urgency};

/// Subscriptions read and claimed per page.
const PAGE: u64 = 500;

/// The first page: small, so that the first pushes do not wait for 500 claims.
pub const FIRST_PAGE: u64 = 64;

/// Runs one fan-out job.
pub async fn run(job: FanOut, ctx: &WorkerContext) -> Result<(), JobError> {
    job.check_version().map_err(|e| JobError::Permanent(e.to_string()))?;
    let token = uuid::Uuid::new_v4().simple().to_string();
    // A new message changes the inbox's first page and counts: drop them (while the run
    // opens) before anyone is notified, so the click lands on an inbox that shows it.
    let ids = [job.feedback_id];
    let opening = ctx.runs.open(job.feedback_id, token.clone());
    let (opened, invalidated) = tokio::join!(opening, super::invalidate(ctx, &ids));
    if let Err(e) = invalidated {
        tracing::warn!(feedback_id = job.feedback_id, error = %e, "cache.invalidate_failed");
    }
    let mut opened = opened?;
    if let Opening::Folded { message, .. } = &opened
        && uncounted_by_a_digest_that_read(message, ctx).await?
    {
        // Committed after its window's digest read the window: nothing else announces
        // it, so it goes out alone.
        tracing::info!(feedback_id = message.id, "fan_out.after_digest_alone");
        opened = delivery::open_run(&ctx.db, message.id, FIRST_PAGE, &token, lease(ctx), Coalescing::OFF).await?;
    }
    let (message, page) = match opened {
        Opening::Claimed { message, page } => (message, page),
        // Deleted since it was submitted: there is nothing left to announce.
        Opening::Missing => {
            dispatch::mark_completed(&ctx.db, job.dispatch_id).await?;
            return Ok(());
        }
        Opening::Folded { message, in_window } => {
            fold_into_digest(&message, in_window, ctx).await?;
            dispatch::mark_completed(&ctx.db, job.dispatch_id).await?;
            return Ok(());
        }
    };
    let notification =
        Notification::for_feedback(message.id, &message.submitter_name, &message.content, &ctx.settings.web.public_url);
    let run = Run {
        ctx,
        feedback_id: message.id,
        payload: notification.to_payload(),
        topic: format!("feedback{}", message.id),
        token,
    };
    let (stats, sent) = run.renewing_claims(run.deliver_all(page)).await?;
    if let Err(e) = ctx.runs.close(message.id, job.dispatch_id, sent.clone(), run.token.clone()).await {
        // The close records the only page's successes; it failed as a whole, so record
        // them on their own before the job is retried, or their claims would lapse and
        // those pushes go out again.
        if let Err(record) = delivery::record_sent(&ctx.db, message.id, &sent, &run.token).await {
            tracing::warn!(feedback_id = message.id, error = %record, "fan_out.record_after_failed_close_failed");
        }
        return Err(e.into());
    }
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

/// How long a claim holds: longer than one send can take (the request timeout) plus a
/// margin for recording it. If the worker dies, the claim lapses after this and the
/// delivery is sent again (the only duplicates possible are these in-flight ones).
pub fn claim_hold(settings: &shared::settings::Settings) -> Duration {
    settings.push.request_timeout + Duration::from_secs(5)
}

fn lease(ctx: &WorkerContext) -> chrono::DateTime<Utc> {
    crate::runs::lease_until(claim_hold(&ctx.settings))
}

/// Coalescing as configured: past `NOTIFY_BURST_THRESHOLD` messages in one window, a
/// message's first run folds it into the window's digest. In-process mode (no queue to
/// schedule a digest on) passes `queued: false`: every message goes out alone.
pub fn coalescing_of(settings: &shared::settings::Settings, queued: bool) -> Coalescing {
    let worker = &settings.worker;
    if !queued {
        return Coalescing::OFF;
    }
    let window_secs = i64::try_from(worker.burst_window.as_secs()).unwrap_or(60).max(1);
    Coalescing { threshold: worker.burst_threshold, window_secs }
}

fn coalescing(ctx: &WorkerContext) -> Coalescing {
    coalescing_of(&ctx.settings, ctx.queue.is_some())
}

/// Schedules the digest of the window `message` falls in, for shortly after the window's
/// end (once per window however many messages ask), with the threshold it folded by.
async fn fold_into_digest(
    message: &shared::entities::feedback_message::Model,
    in_window: u64,
    ctx: &WorkerContext,
) -> Result<(), JobError> {
    let Some(queue) = &ctx.queue else { return Ok(()) };
    let digest = window_of(message, ctx);
    queue.schedule_digest(&digest, None).await.map_err(JobError::retryable)?;
    tracing::info!(feedback_id = message.id, in_window, window_end = digest.window_end, "fan_out.folded_into_digest");
    Ok(())
}

/// Whether `message`, which folds, was left out by its window's digest: the digest has
/// read the window (and completed the records of what it counted) and the message's
/// dispatch record is not completed. The digest marks the window read only after it
/// completed those records, so a run that sees the mark sees them too.
async fn uncounted_by_a_digest_that_read(
    message: &shared::entities::feedback_message::Model,
    ctx: &WorkerContext,
) -> Result<bool, JobError> {
    let Some(queue) = &ctx.queue else { return Ok(false) };
    if !queue.digest_has_read(&window_of(message, ctx)).await.map_err(JobError::retryable)? {
        return Ok(false);
    }
    Ok(!dispatch::any_completed_of_feedback(&ctx.db, message.id).await?)
}

/// The digest of the window `message` falls in, by the threshold it folds by.
fn window_of(message: &shared::entities::feedback_message::Model, ctx: &WorkerContext) -> shared::jobs::Digest {
    let coalescing = coalescing(ctx);
    let start = coalescing.window_start(message.created_at);
    shared::jobs::Digest::new(start, start + coalescing.window_secs, coalescing.threshold)
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

/// Counts the outcomes of some pushes; returns them, the subscriptions sent to (whose
/// success the caller records, even when another push of the chunk failed) and the
/// first error.
fn tally(results: Vec<Result<Delivered, JobError>>) -> (Stats, Vec<i64>, Option<JobError>) {
    let mut stats = Stats::default();
    let mut sent = Vec::with_capacity(results.len());
    let mut error = None;
    for result in results {
        match result {
            Ok(Delivered::Sent(id)) => sent.push(id),
            Ok(Delivered::Other(other)) => stats.add(other),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    stats.sent += sent.len();
    (stats, sent, error)
}

/// Bounds one sending: a push takes a permit when it starts and gives it back once its
/// outcome is recorded, so no more than the permits are ever sent and not yet recorded.
/// A failure closes it: no further push starts.
struct Gate {
    unrecorded: tokio::sync::Semaphore,
}

impl Gate {
    fn new(permits: usize) -> Self {
        Self { unrecorded: tokio::sync::Semaphore::new(permits) }
    }

    /// Waits for a permit; false once the gate is closed.
    async fn enter(&self) -> bool {
        match self.unrecorded.acquire().await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back the permits of `recorded` pushes.
    fn release(&self, recorded: usize) {
        if recorded > 0 {
            self.unrecorded.add_permits(recorded);
        }
    }

    /// No further push starts.
    fn close(&self) {
        self.unrecorded.close();
    }
}

/// Runs `deliver` over `targets`, at most `concurrency` at once and each once `gate`
/// lets it in, in groups of the results that completed together. While the gate has no
/// permit, the pushes in flight are still driven to their end, so a slow write of their
/// successes never makes a delivered push look timed out. Once one fails (the gate
/// closes), no further target starts, but those in flight run to their end and are
/// yielded: a push that went out and was dropped unrecorded would be sent again by the
/// job's retry.
fn until_failed<'a, T, R, Fut>(
    targets: impl futures::Stream<Item = T> + 'a,
    concurrency: usize,
    gate: &'a Gate,
    deliver: impl Fn(T) -> Fut + 'a,
) -> impl futures::Stream<Item = Vec<Result<R, JobError>>> + 'a
where
    T: 'a,
    Fut: std::future::Future<Output = Result<R, JobError>> + 'a,
{
    targets
        .then(move |target| async move { gate.enter().await.then_some(target) })
        .take_while(|target| std::future::ready(target.is_some()))
        .filter_map(std::future::ready)
        .map(move |target| {
            let delivered = deliver(target);
            async move {
                let result = delivered.await;
                if result.is_err() {
                    gate.close();
                }
                result
            }
        })
        .buffer_unordered(concurrency)
        .ready_chunks(concurrency)
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
    /// Runs `work`, renewing the run's claims every third of their hold while it lasts,
    /// so a fan-out that outlasts one hold (a slow push service, a slow write, many
    /// pages) keeps the deliveries it has yet to send: another run takes over only the
    /// claims of a run that died. A renewal that fails is logged and tried again a third
    /// of a hold later, before the claims lapse; `work` is driven meanwhile.
    async fn renewing_claims<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let every = claim_hold(&self.ctx.settings) / 3;
        let renew = async {
            loop {
                tokio::time::sleep(every).await;
                let renewed = delivery::renew_claims(&self.ctx.db, self.feedback_id, &self.token, lease(self.ctx));
                if let Err(e) = renewed.await {
                    tracing::warn!(feedback_id = self.feedback_id, error = %e, "fan_out.renew_claims_failed");
                }
            }
        };
        match futures::future::select(std::pin::pin!(work), std::pin::pin!(renew)).await {
            futures::future::Either::Left((done, _)) => done,
            // The renewals never end on their own.
            futures::future::Either::Right((_, work)) => work.await,
        }
    }

    /// Sends the run's deliveries, starting with its first `page` (claimed when the run
    /// opened, with the deliveries due again: retries whose time has come, claims
    /// abandoned by a crashed worker; small, so the first pushes leave at once). A page
    /// that is not full is the last. With more pages to come, the pushes go out as one
    /// stream across them: every further page is claimed while the one before it is being
    /// sent, and its first pushes start as soon as the last of the page before have
    /// started, so `PUSH_CONCURRENCY` stay in flight from the first page to the last
    /// instead of draining at each page's end. Returns the counts and, when the first page
    /// was the only one and was sent all at once (no more than `PUSH_CONCURRENCY`), its
    /// successes: the caller records them with the run's close.
    async fn deliver_all(&self, first: delivery::ClaimedPage) -> Result<(Stats, Vec<i64>), JobError> {
        let Some(after) = first.last.filter(|_| first.full) else {
            return self.send_page(first.targets).await;
        };
        // One page waits, claimed, while the one before it is being sent: a page is
        // claimed only once there is room for it.
        let (claimed, mut pages) = tokio::sync::mpsc::channel::<Vec<delivery::Target>>(1);
        let claimer = async move {
            let mut after = Some(after);
            while let Some(last) = after {
                // No room ever comes once the sending has ended (after a failed push, with
                // those in flight finished): nothing more to claim.
                let Ok(room) = claimed.reserve().await else { break };
                let page = self.claim_page(last).await?;
                after = page.last.filter(|_| page.full);
                room.send(page.targets);
            }
            // Dropping `claimed` ends the stream of targets once its pages are sent.
            Ok::<(), JobError>(())
        };
        let pages = futures::stream::poll_fn(move |cx| pages.poll_recv(cx));
        let targets = futures::stream::iter(first.targets).chain(pages.flat_map(futures::stream::iter));
        // The sending ends when the claimer's pages do, or when a push failed; either way
        // what went out is recorded before it returns.
        let (sent, claims) = tokio::join!(self.send_stream(targets), claimer);
        let stats = sent?;
        claims?;
        Ok((stats, Vec::new()))
    }

    /// Claims the deliveries to the next page of subscriptions after id `after`.
    async fn claim_page(&self, after: i64) -> Result<delivery::ClaimedPage, JobError> {
        let db = &self.ctx.db;
        Ok(delivery::claim_page(db, self.feedback_id, after, PAGE, &self.token, lease(self.ctx), false).await?)
    }

    /// Sends the claimed deliveries `targets` of a run's only page, at most
    /// `PUSH_CONCURRENCY` at once. When every push came to an outcome, the successes of
    /// a page sent all at once (no more than `PUSH_CONCURRENCY`) are returned unrecorded:
    /// the caller records them with its next statement. A larger page goes out as
    /// [`Self::send_stream`] sends it.
    async fn send_page(&self, targets: Vec<delivery::Target>) -> Result<(Stats, Vec<i64>), JobError> {
        if targets.is_empty() {
            return Ok((Stats::default(), Vec::new()));
        }
        let concurrency = self.ctx.settings.push.concurrency.max(1);
        if targets.len() > concurrency {
            return Ok((self.send_stream(futures::stream::iter(targets)).await?, Vec::new()));
        }
        // All at once: send them, then hand the successes back (or record them on a failure).
        let results = futures::stream::iter(targets).map(|target| self.deliver(target)).buffer_unordered(concurrency);
        let (stats, sent, error) = tally(results.collect::<Vec<_>>().await);
        let Some(error) = error else { return Ok((stats, sent)) };
        delivery::record_sent(&self.ctx.db, self.feedback_id, &sent, &self.token).await?;
        Err(error)
    }

    /// Sends the claimed deliveries `targets`, with bounded concurrency, and records them.
    ///
    /// Successes are recorded in batches (the pushes that completed together go in one
    /// statement, with any that completed during the write before it) while the sending
    /// goes on, so a fan-out costs a few commits, not two per subscription. No push
    /// starts while three times `PUSH_CONCURRENCY` are sent and not yet recorded; those
    /// in flight are still driven to their end meanwhile, so a slow write never makes a
    /// delivered push time out. If the worker dies, those unrecorded pushes are the only
    /// ones sent again.
    async fn send_stream(&self, targets: impl futures::Stream<Item = delivery::Target>) -> Result<Stats, JobError> {
        let concurrency = self.ctx.settings.push.concurrency.max(1);
        // In flight, and two batches' worth waiting for or in a write: past that no push
        // starts until the recorder catches up, while those in flight are still driven.
        let gate = &Gate::new(3 * concurrency);
        let (done, mut to_record) = tokio::sync::mpsc::unbounded_channel::<Vec<i64>>();
        let sender = async move {
            let mut results = std::pin::pin!(until_failed(targets, concurrency, gate, |target| self.deliver(target)));
            let mut stats = Stats::default();
            let mut first_error = None;
            while let Some(chunk) = results.next().await {
                let finished = chunk.len();
                let (chunk_stats, sent, error) = tally(chunk);
                stats.add(chunk_stats);
                // The other outcomes are recorded already (or failed, and the gate is shut).
                gate.release(finished - sent.len());
                if !sent.is_empty() {
                    // The recorder takes every batch until this sender is done.
                    let _ = done.send(sent);
                }
                if let Some(error) = error {
                    first_error.get_or_insert(error);
                }
            }
            first_error.map_or(Ok(stats), Err)
        };
        let recorder = async move {
            let mut first_error = None;
            let mut unrecorded = Vec::new();
            while let Some(mut batch) = to_record.recv().await {
                // The batches that came in during the last write go in one statement.
                while let Ok(more) = to_record.try_recv() {
                    batch.extend(more);
                }
                if first_error.is_some() {
                    unrecorded.extend(batch);
                } else if let Err(e) = delivery::record_sent(&self.ctx.db, self.feedback_id, &batch, &self.token).await
                {
                    gate.close();
                    unrecorded.extend(batch);
                    first_error = Some(e);
                } else {
                    gate.release(batch.len());
                }
            }
            let Some(error) = first_error else { return Ok(()) };
            // Once more, all together, before the job is retried: what is recorded now
            // is not sent again.
            if let Err(again) = delivery::record_sent(&self.ctx.db, self.feedback_id, &unrecorded, &self.token).await {
                tracing::warn!(feedback_id = self.feedback_id, error = %again, "fan_out.record_after_failed_batch_failed");
            }
            Err::<(), JobError>(error.into())
        };
        let (stats, recorded) = tokio::join!(sender, recorder);
        recorded?;
        stats
    }

    /// Sends to one subscription and records the outcome, except a success, which the
    /// caller records in its batch.
    async fn deliver(&self, sub: delivery::Target) -> Result<Delivered, JobError> {
        let db = &self.ctx.db;
        let push = &self.ctx.settings.push;
        let attempts = sub.attempts;
        let target = PushTarget { endpoint: &sub.endpoint, p256dh: &sub.p256dh, auth: &sub.auth };
        let message = PushMessage { payload: &self.payload, topic: &self.topic, urgency: Urgency::High };
        let started = std::time::Instant::now();
        let outcome = self.ctx.sender.send(&target, &message).await;
        crate::push::record(&self.ctx.metrics, &outcome, started.elapsed());
        let mut stats = Stats::default();
        match outcome {
            PushOutcome::Delivered => return Ok(Delivered::Sent(sub.subscription_id)),
            PushOutcome::Gone { status } => {
                tracing::info!(subscription_id = sub.subscription_id, status, "push.subscription_gone");
                subscription::delete(db, sub.subscription_id).await?;
                stats.gone = 1;
            }
            PushOutcome::Retry { reason, retry_after } => {
                let attempts = u32::try_from(attempts).unwrap_or(1);
                if attempts >= push.max_attempts {
                    let reason = format!("gave up after {attempts} attempts: {reason}");
                    tracing::warn!(subscription_id = sub.subscription_id, feedback_id = self.feedback_id, %reason, "push.failed");
                    delivery::finish(
                        db,
                        self.feedback_id,
                        sub.subscription_id,
                        &self.token,
                        &Outcome::Failed { reason: reason.clone() },
                    )
                    .await?;
                    subscription::record_failure(db, sub.subscription_id, &reason).await?;
                    stats.failed = 1;
                } else {
                    let wait = backoff::delay(attempts, push.retry_base, push.retry_cap, retry_after);
                    let at = shared::queries::now()
                        + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(1));
                    tracing::info!(
                        subscription_id = sub.subscription_id,
                        feedback_id = self.feedback_id,
                        attempt = attempts,
                        retry_in_ms = wait.as_millis() as u64,
                        %reason,
                        "push.retry_scheduled"
                    );
                    delivery::finish(
                        db,
                        self.feedback_id,
                        sub.subscription_id,
                        &self.token,
                        &Outcome::Retry { at, reason },
                    )
                    .await?;
                    stats.retrying = 1;
                }
            }
            PushOutcome::Rejected { status, reason } => {
                let reason = match status {
                    Some(code) => format!("{code}: {reason}"),
                    None => reason,
                };
                tracing::warn!(subscription_id = sub.subscription_id, feedback_id = self.feedback_id, %reason, "push.rejected");
                delivery::finish(
                    db,
                    self.feedback_id,
                    sub.subscription_id,
                    &self.token,
                    &Outcome::Failed { reason: reason.clone() },
                )
                .await?;
                subscription::record_failure(db, sub.subscription_id, &reason).await?;
                stats.failed = 1;
            }
        }
        Ok(Delivered::Other(stats))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use futures::StreamExt;

    use super::{Gate, JobError, until_failed};

    #[tokio::test]
    async fn after_a_failure_no_push_starts_and_those_in_flight_finish() {
        // Twenty targets, four at a time; the third fails at once, the others take 20 ms.
        let started = AtomicUsize::new(0);
        let gate = Gate::new(100);
        let deliver = |i: usize| {
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                if i == 2 {
                    return Err(JobError::retryable(anyhow::anyhow!("the database went away")));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(i)
            }
        };
        let chunks: Vec<Vec<Result<usize, JobError>>> =
            until_failed(futures::stream::iter(0..20), 4, &gate, deliver).collect().await;
        let results: Vec<_> = chunks.into_iter().flatten().collect();

        // Every push that started came to its end and is reported, the failure among
        // them; none started after it but the one taking its place as it failed.
        let started = started.load(Ordering::SeqCst);
        assert!(started < 20, "pushes stopped starting ({started} started)");
        assert_eq!(results.len(), started, "every push in flight finished");
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        let mut sent: Vec<usize> = results.into_iter().filter_map(Result::ok).collect();
        sent.sort_unstable();
        assert_eq!(sent, (0..started).filter(|i| *i != 2).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn while_no_permit_is_free_no_push_starts_and_those_in_flight_still_finish() {
        // Six permits, four at a time, twenty targets; nothing is recorded for a while.
        let started = AtomicUsize::new(0);
        let finished = AtomicUsize::new(0);
        let gate = Gate::new(6);
        let deliver = |i: usize| {
            started.fetch_add(1, Ordering::SeqCst);
            let finished = &finished;
            async move {
                tokio::time::sleep(Duration::from_millis(10 * (i as u64 % 3 + 1))).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok::<_, JobError>(i)
            }
        };
        let mut results = std::pin::pin!(until_failed(futures::stream::iter(0..20), 4, &gate, deliver));
        let mut yielded = 0;
        // The consumer keeps polling, as the sender does, but gives no permit back: the
        // six started pushes all finish and are yielded, and no seventh starts.
        while yielded < 6 {
            let chunk = tokio::time::timeout(Duration::from_secs(5), results.next()).await.expect("a chunk");
            yielded += chunk.expect("not the end").len();
        }
        assert!(tokio::time::timeout(Duration::from_millis(200), results.next()).await.is_err(), "nothing more");
        assert_eq!(started.load(Ordering::SeqCst), 6);
        assert_eq!(finished.load(Ordering::SeqCst), 6);

        // Once the recorder gives the permits back, the rest go out.
        gate.release(6);
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), results.next()).await.expect("a chunk") {
            yielded += chunk.len();
            gate.release(chunk.len());
        }
        assert_eq!(yielded, 20);
        assert_eq!(started.load(Ordering::SeqCst), 20);
    }
}
