//! Group writes: a few writer tasks take whatever requests wait and serve them with one
//! call, the way a database groups commits.
//!
//! Alone, a request is served at once, in the caller's own task (no hand-over to another
//! task); while others are in flight, requests wait for a writer, and those that arrive
//! while the writers are busy go out together, so the cost per request falls as the load
//! rises. With a linger (`LINGER`), under a steady flow (requests coming on average
//! less than the linger apart) a writer that takes a request also waits up to the linger
//! from its arrival for the ones right behind it: at moderate rates, where few would
//! otherwise meet in a writer's queue, each statement then serves several. With
//! `Linger::WhileItGathers`, a wait also ends as soon as its batch holds `ENOUGH`
//! requests (many clients that send their next request only once answered come back
//! together: they would otherwise wait a full linger each round for nobody more), and
//! waits stop while they gather too few requests arriving late in them (`late_after`;
//! fewer than a quarter a wait on a moving mean: one or a few such clients, whose next
//! requests come at once or not at all), but for one steady request in `PROBE_EVERY`,
//! which tries again. A request is answered only when the call that served it has
//! returned.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use sea_orm::DbErr;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;

/// A request waiting for a writer: what it asks, where to answer it, when it came, and
/// whether a writer that takes it waits for the ones behind it (from the arrival of the
/// first such request it took).
struct Waiting<I, O> {
    item: I,
    reply: oneshot::Sender<Result<O, DbErr>>,
    came: Instant,
    wait: bool,
}

/// How long a writer waits for more requests after the first it takes, counted from that
/// request's arrival, while requests come on average closer together than this: 2 ms
/// (the timer counts whole milliseconds, so 2–3), from about 500 evenly spaced requests a
/// second (with random arrivals, some from about 300). Measured in `docs/PERFORMANCE.md`
/// ("A twenty-second machine"; the stop of `Linger::WhileItGathers`: "A twenty-third
/// machine").
pub const LINGER: Duration = Duration::from_millis(2);

/// Whether a writer waits for the requests behind the first it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linger {
    /// Never: a writer serves what waits when it takes it.
    Off,
    /// Under a steady flow, until this long after the first request that waits came
    /// (`LINGER`).
    Steady(Duration),
    /// As `Steady`, but a wait ends once its batch holds [`ENOUGH`] requests, and none
    /// is made while waits gather too few late requests (`late_after`): for callers that
    /// send their next request only once answered, such as clients submitting in a
    /// loop, for whom a wait for nobody is pure delay.
    WhileItGathers(Duration),
}

impl Linger {
    /// How long a writer waits under a steady flow; zero: it never waits.
    fn wait(self) -> Duration {
        match self {
            Self::Off => Duration::ZERO,
            Self::Steady(wait) | Self::WhileItGathers(wait) => wait,
        }
    }

    /// How many requests a batch holds, at most `max_batch`, before its writer stops
    /// waiting for more (it still takes any that wait, up to `max_batch`).
    fn enough(self, max_batch: usize) -> usize {
        match self {
            Self::Off | Self::Steady(_) => max_batch,
            Self::WhileItGathers(_) => ENOUGH.min(max_batch),
        }
    }
}

/// With `Linger::WhileItGathers`, a writer's wait ends once its batch holds this many
/// requests: one statement for eight already costs each little, and clients that send
/// again only once answered come back together, so a wait past them held every client a
/// full linger each round (measured in `docs/PERFORMANCE.md`, "A twenty-fourth machine":
/// 32 such clients got 6,500 submissions a second with the cores half idle, 14,000
/// with this bound).
pub const ENOUGH: usize = 8;

/// A request that joins a writer's wait of up to `wait` this long or longer after the
/// wait began (half of it: 1 ms with `LINGER`) counts as gathered by it: one that came
/// sooner was on its way already (a closed loop's clients answered together send again
/// together), and would have met the others in the writer's queue anyway.
fn late_after(wait: Duration) -> Duration {
    wait / 2
}

/// One late request a wait, in the fixed point of the waits' moving mean (256ths).
const ONE_LATE: u64 = 256;

/// While waits gather fewer late requests than this on average (a quarter), writers stop
/// waiting.
const LEAST_GAIN: u64 = ONE_LATE / 4;

/// While waits gather too little, one steady request in this many still waits, so a
/// flow that changes is seen.
const PROBE_EVERY: u64 = 16;

/// Gaps longer than this (100 ms, in nanoseconds) count as this in the mean (so a flow
/// that starts after an idle is seen within a few dozen requests).
const LONGEST_GAP_NANOS: u64 = 100_000_000;

/// The flow of requests: when the last came (nanoseconds since `start`), the moving
/// mean of the gaps between them (nanoseconds; each new gap weighs an eighth), the moving
/// mean of the late requests a wait gathered (in [`ONE_LATE`]s; each wait with time left
/// weighs an eighth, but for one its batch ended with none late), and the steady
/// requests that found waits not worth it (each [`PROBE_EVERY`]-th of them waits all the
/// same).
struct Flow {
    start: Instant,
    last: AtomicU64,
    mean_gap: AtomicU64,
    gain: AtomicU64,
    unwaited: AtomicU64,
}

impl Flow {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            mean_gap: AtomicU64::new(LONGEST_GAP_NANOS),
            // Waits are worth it until they show they are not.
            gain: AtomicU64::new(ONE_LATE),
            unwaited: AtomicU64::new(0),
        }
    }

    /// Whether a request in a steady flow waits: while waits gather late requests, or
    /// as the probe of one in [`PROBE_EVERY`].
    fn worth_waiting(&self) -> bool {
        self.gain.load(Ordering::Relaxed) >= LEAST_GAIN
            || self.unwaited.fetch_add(1, Ordering::Relaxed) % PROBE_EVERY == PROBE_EVERY - 1
    }

    /// Counts a wait that gathered `late` requests.
    fn waited(&self, late: usize) {
        let late = u64::try_from(late).unwrap_or(u64::MAX).min(64) * ONE_LATE;
        let _ = self.gain.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |gain| Some(gain - gain / 8 + late / 8));
    }

    /// Counts a request arriving at `now`; returns whether requests now come steadily
    /// closer together than `linger` (on average).
    fn arrive(&self, now: Instant, linger: Duration) -> bool {
        let at = u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        let gap = at.saturating_sub(self.last.swap(at, Ordering::Relaxed)).min(LONGEST_GAP_NANOS);
        let previous = self
            .mean_gap
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mean| Some(mean - mean / 8 + gap / 8))
            .unwrap_or(LONGEST_GAP_NANOS);
        let mean = previous - previous / 8 + gap / 8;
        u128::from(mean) < linger.as_nanos()
    }
}

/// Moves the requests waiting in `waiting` into `batch`, without waiting, until it holds
/// `max_batch`.
fn take_waiting<T>(waiting: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max_batch: usize) {
    while batch.len() < max_batch {
        match waiting.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
}

/// What serves a batch: one answer per request, in its place.
type Write<I, O> = Arc<dyn Fn(Vec<I>) -> Pin<Box<dyn Future<Output = Vec<Result<O, DbErr>>> + Send>> + Send + Sync>;

/// The writers' inbox; cheap to clone.
pub struct Batcher<I, O> {
    inbox: mpsc::Sender<Waiting<I, O>>,
    write: Write<I, O>,
    /// Requests not answered yet (served, waiting or in a batch).
    pending: Arc<AtomicUsize>,
    flow: Arc<Flow>,
    /// Whether and how long a writer waits for more under a steady flow.
    linger: Linger,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            inbox: self.inbox.clone(),
            write: Arc::clone(&self.write),
            pending: Arc::clone(&self.pending),
            flow: Arc::clone(&self.flow),
            linger: self.linger,
        }
    }
}

/// Counts a request as pending until it is dropped (answered, or its caller gone).
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer in first place of `answers`, or an error saying there was none.
fn first<O>(answers: Vec<Result<O, DbErr>>) -> Result<O, DbErr> {
    answers.into_iter().next().unwrap_or_else(|| Err(no_answer()))
}

fn no_answer() -> DbErr {
    DbErr::Custom("the batch gave no answer".into())
}

/// The answers to a batch of `n` requests whose one call failed with `e`. When the
/// connection failed, every request gets that failure at once (trying them one by one
/// would wait for the connection once each, and a batch whose answer was lost on the way
/// might have committed). When the statement failed (a deadlock, one bad row), they
/// are served one by one by `one_by_one`, so one request never fails the others.
pub async fn after_failure<O, Fut>(e: DbErr, n: usize, one_by_one: impl FnOnce() -> Fut) -> Vec<Result<O, DbErr>>
where
    Fut: Future<Output = Vec<Result<O, DbErr>>>,
{
    if n <= 1 || crate::db::is_connection_failure(&e) {
        return (0..n).map(|_| Err(e.clone())).collect();
    }
    tracing::warn!(error = %e, requests = n, "batch.failed; serving its requests one by one");
    one_by_one().await
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts `writers` tasks that each take up to `max_batch` waiting requests and
    /// serve them with `write`, which answers each request in its place. At most
    /// `max_waiting` requests wait; past it a caller waits for room. Under a steady flow
    /// a writer waits for more as `linger` says, from the arrival of the first request it
    /// took that waits (a caller that needs a slot of its own to send the next request,
    /// as a worker's jobs do, should weigh that wait against its slots; `Linger::Off`
    /// turns it off).
    pub fn start<F, Fut>(writers: usize, max_batch: usize, max_waiting: usize, linger: Linger, write: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<O, DbErr>>> + Send + 'static,
    {
        let write: Write<I, O> = Arc::new(move |batch| Box::pin(write(batch)));
        let (inbox, waiting) = mpsc::channel::<Waiting<I, O>>(max_waiting.max(1));
        let waiting = Arc::new(Mutex::new(waiting));
        let flow = Arc::new(Flow::new());
        let longest = linger.wait();
        let (max_batch, enough) = (max_batch.max(1), linger.enough(max_batch.max(1)));
        for _ in 0..writers.max(1) {
            let (waiting, write, flow) = (Arc::clone(&waiting), Arc::clone(&write), Arc::clone(&flow));
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut waiting = waiting.lock().await;
                        let Some(first) = waiting.recv().await else { return };
                        let mut batch = vec![first];
                        take_waiting(&mut waiting, &mut batch, max_batch);
                        // The first request taken that waits (a probe may come behind
                        // others that do not) sets the wait, unless the batch holds
                        // enough already.
                        let waits_from = batch.iter().find(|w| w.wait).map(|w| w.came);
                        if let Some(came) = waits_from.filter(|_| batch.len() < enough) {
                            let begun = Instant::now();
                            let late = begun + late_after(longest);
                            let lingering = tokio::time::sleep_until(came + longest);
                            tokio::pin!(lingering);
                            while batch.len() < enough {
                                tokio::select! {
                                    next = waiting.recv() => match next {
                                        Some(next) => batch.push(next),
                                        None => break,
                                    },
                                    () = &mut lingering => break,
                                }
                            }
                            // Only a wait that had time left for a late request (not one
                            // behind busy writers) says whether waits gather, and one
                            // its batch ended only if a late request came (a batch filled
                            // at once by clients answered together says nothing of what
                            // a wait gathers; a dense open flow's does).
                            if came + longest > late {
                                let gathered = batch.iter().filter(|w| w.came >= late).count();
                                if batch.len() < enough || gathered > 0 {
                                    flow.waited(gathered);
                                }
                            }
                            take_waiting(&mut waiting, &mut batch, max_batch);
                        }
                        batch
                    };
                    let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().map(|w| (w.item, w.reply)).unzip();
                    let mut answers = write(items).await.into_iter();
                    for reply in replies {
                        let _ = reply.send(answers.next().unwrap_or_else(|| Err(no_answer())));
                    }
                }
            });
        }
        Self { inbox, write, pending: Arc::new(AtomicUsize::new(0)), flow, linger }
    }

    /// Serves `item`: at once in this task when nothing else is pending and it does not
    /// wait for others (it comes in a steady flow whose waits gather requests), else
    /// through the writers; returns its answer.
    pub async fn call(&self, item: I) -> Result<O, DbErr> {
        // With no linger there is no flow to follow.
        let linger = self.linger.wait();
        let came = if linger.is_zero() { self.flow.start } else { Instant::now() };
        let wait = !linger.is_zero()
            && self.flow.arrive(came, linger)
            && (matches!(self.linger, Linger::Steady(_)) || self.flow.worth_waiting());
        let alone = self.pending.fetch_add(1, Ordering::AcqRel) == 0 && !wait;
        let _pending = Pending(Arc::clone(&self.pending));
        if alone {
            return first((self.write)(vec![item]).await);
        }
        let (reply, answer) = oneshot::channel();
        let stopped = || DbErr::Conn(sea_orm::RuntimeErr::Internal("the writers stopped".into()));
        self.inbox.send(Waiting { item, reply, came, wait }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

#[cfg(test)]
mod tests {
    use super::{Batcher, LINGER, Linger};

    // Twenty requests at once are too few to make a steady flow: no writer waits here.
    #[tokio::test]
    async fn every_request_gets_its_own_answer_and_waiting_ones_go_together() {
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&sizes);
        let batcher = Batcher::start(1, 8, 100, Linger::Steady(LINGER), move |items: Vec<u32>| {
            seen.lock().expect("lock").push(items.len());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                items.into_iter().map(|i| Ok(i * 10)).collect()
            }
        });

        let calls: Vec<_> = (0..20)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.call(i).await })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.expect("joined").expect("answered"));
        }

        assert_eq!(answers, (0..20).map(|i| i * 10).collect::<Vec<_>>());
        let sizes = sizes.lock().expect("lock").clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.len() < 20 && sizes.iter().all(|&n| n <= 8), "{sizes:?}");
    }

    #[tokio::test]
    async fn a_lone_request_is_served_in_the_callers_task() {
        let batcher = Batcher::start(1, 8, 100, Linger::Steady(LINGER), |items: Vec<()>| async move {
            items.into_iter().map(|()| Ok(tokio::task::try_id())).collect()
        });

        let caller = tokio::spawn(async move { (tokio::task::try_id(), batcher.call(()).await) });

        let (caller, served) = caller.await.expect("joined");
        assert!(caller.is_some());
        assert_eq!(served.expect("answered"), caller);
    }

    #[test]
    fn the_flow_is_steady_only_while_requests_come_on_average_closer_than_the_linger() {
        use std::time::Duration;
        let flow = super::Flow::new();
        let mut at = flow.start;
        let mut arrive = |gap: Duration| {
            at += gap;
            flow.arrive(at, LINGER)
        };

        // 50 a second, with an occasional pair a microsecond apart: never steady.
        for i in 0..200 {
            assert!(!arrive(if i % 10 == 0 { Duration::from_micros(1) } else { Duration::from_millis(20) }));
        }
        // 1,000 a second: steady within a few dozen requests, and stays so.
        let steady: Vec<bool> = (0..100).map(|_| arrive(Duration::from_millis(1))).collect();
        assert!(steady[..10].iter().all(|&s| !s), "a few close requests after a slow flow are not a steady flow");
        assert!(steady[40..].iter().all(|&s| s), "{steady:?}");
        // One long pause ends it at once.
        assert!(!arrive(Duration::from_secs(1)));
    }

    type Sizes = std::sync::Arc<std::sync::Mutex<Vec<usize>>>;

    /// A batcher whose writes answer at once, recording how many requests each served.
    fn recording(linger: Linger) -> (Batcher<u32, u32>, Sizes) {
        let sizes = Sizes::default();
        let seen = std::sync::Arc::clone(&sizes);
        let batcher = Batcher::start(2, 64, 1000, linger, move |items: Vec<u32>| {
            seen.lock().expect("lock").push(items.len());
            async move { items.into_iter().map(Ok).collect() }
        });
        (batcher, sizes)
    }

    /// Sends `n` requests a millisecond apart (on the test's own clock: an open flow,
    /// each request sent whatever became of the one before) and checks their answers
    /// and that none waited longer than the linger.
    async fn open_flow(batcher: &Batcher<u32, u32>, n: u32) {
        use tokio::time::{Duration, Instant};
        let mut calls = Vec::new();
        for i in 0..n {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let batcher = batcher.clone();
            let came = Instant::now();
            calls.push(tokio::spawn(async move { (batcher.call(i).await, came.elapsed()) }));
        }
        for (i, call) in (0..n).zip(calls) {
            let (answer, waited) = call.await.expect("joined");
            assert_eq!(answer.expect("answered"), i);
            // The linger, rounded up to the timer's next millisecond, and no more.
            assert!(waited <= LINGER + Duration::from_millis(1), "request {i} waited {waited:?}");
        }
    }

    /// Four clients each sending 300 requests, the next once the last is answered;
    /// returns how long they took on the test's clock, which moves only while a writer
    /// waits.
    async fn four_closed_loops(batcher: &Batcher<u32, u32>) -> std::time::Duration {
        let started = tokio::time::Instant::now();
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    for i in 0..300 {
                        assert_eq!(batcher.call(i).await.expect("answered"), i);
                    }
                })
            })
            .collect();
        for client in clients {
            client.await.expect("joined");
        }
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn under_a_steady_flow_a_writer_waits_for_the_requests_behind_the_first() {
        for linger in [Linger::Steady(LINGER), Linger::WhileItGathers(LINGER)] {
            // Served at once: without the wait every request would be alone.
            let (batcher, sizes) = recording(linger);

            open_flow(&batcher, 300).await;

            let sizes = sizes.lock().expect("lock").clone();
            assert_eq!(sizes.iter().sum::<usize>(), 300);
            // Alone until the mean gap falls under the linger (a few dozen), then two or
            // three a statement.
            assert!(sizes.len() < 200, "{linger:?}: {} statements for 300 requests: {sizes:?}", sizes.len());
            // (The very last may go alone: nothing comes behind it.)
            assert!(sizes[sizes.len() - 50..sizes.len() - 1].iter().all(|&n| n >= 2), "{linger:?}: {sizes:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_waits_for_each_answer_is_soon_served_at_once() {
        use tokio::time::{Duration, Instant};
        let (batcher, sizes) = recording(Linger::WhileItGathers(LINGER));

        // One client, its next request as soon as it is answered (on the test's clock,
        // which moves only while a writer waits): a steady flow in which a wait never
        // gathers anyone.
        let mut waited = Vec::new();
        for i in 0..300 {
            tokio::task::yield_now().await;
            let came = Instant::now();
            assert_eq!(batcher.call(i).await.expect("answered"), i);
            waited.push(came.elapsed() >= Duration::from_millis(1));
        }

        // The waits stop within a dozen requests, but for one probe in `PROBE_EVERY`.
        let probes = u64::try_from(waited[100..].iter().filter(|&&w| w).count()).expect("small");
        assert!(probes <= 200 / super::PROBE_EVERY + 1, "{probes} of the last 200 waited: {waited:?}");
        assert!(waited.iter().filter(|&&w| w).count() < 50, "{waited:?}");

        // An open flow after it: the probes see its waits gather, and they resume.
        let before = sizes.lock().expect("lock").len();
        open_flow(&batcher, 200).await;
        let sizes = sizes.lock().expect("lock")[before..].to_vec();
        // (The very last may go alone: nothing comes behind it.)
        assert!(sizes[sizes.len() - 50..sizes.len() - 1].iter().all(|&n| n >= 2), "{sizes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn clients_that_wait_for_their_answers_together_soon_stop_the_waits() {
        use tokio::time::Duration;
        // Four clients answered together come back together, so a wait gathers them at
        // once and never later. A plain linger waits every round all the same: 300
        // waits.
        let (batcher, _) = recording(Linger::Steady(LINGER));
        let elapsed = four_closed_loops(&batcher).await;
        assert!(elapsed >= LINGER * 250, "{elapsed:?} for 300 rounds with a plain linger");

        // With the stop, only the waits before it and the probes (one request in
        // `PROBE_EVERY`, a quarter of them or more), each up to 3 ms.
        let (batcher, _) = recording(Linger::WhileItGathers(LINGER));
        let elapsed = four_closed_loops(&batcher).await;
        let probes = u32::try_from(1200 / super::PROBE_EVERY).expect("small");
        assert!(elapsed >= LINGER * (probes / 4), "{elapsed:?}: the probes stopped");
        assert!(elapsed <= (LINGER + Duration::from_millis(1)) * (probes + 20), "{elapsed:?} for 300 rounds");
    }

    /// Sends request `i` from a task of its own.
    fn spawn_call(batcher: &Batcher<u32, u32>, i: u32) -> tokio::task::JoinHandle<Result<u32, sea_orm::DbErr>> {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.call(i).await })
    }

    /// Checks that each of `calls`, sent with requests `first`, `first + 1`, …, got its
    /// own request back.
    async fn check_answers(calls: Vec<tokio::task::JoinHandle<Result<u32, sea_orm::DbErr>>>, first: u32) {
        for (i, call) in (first..).zip(calls) {
            assert_eq!(call.await.expect("joined").expect("answered"), i);
        }
    }

    /// Sends a request and then, while a writer waits for the ones behind it, `more`
    /// (on the test's clock, which moves only while a writer waits, no time passes
    /// between them); checks their answers and returns how long they took.
    async fn burst(batcher: &Batcher<u32, u32>, more: u32) -> std::time::Duration {
        let started = tokio::time::Instant::now();
        let mut calls = Vec::new();
        for i in 0..=more {
            calls.push(spawn_call(batcher, i));
            // Lets a writer take the first and begin its wait.
            tokio::task::yield_now().await;
        }
        check_answers(calls, 0).await;
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_of_clients_that_send_again_once_answered_ends_once_its_batch_holds_enough() {
        let enough = u32::try_from(super::ENOUGH).expect("small");
        let (batcher, sizes) = recording(Linger::WhileItGathers(LINGER));
        // A steady flow whose waits gather late requests: the writers wait.
        open_flow(&batcher, 100).await;

        // Fewer than enough behind the first: the wait lasts the linger.
        assert!(burst(&batcher, enough - 2).await >= LINGER);
        // Enough: served as soon as the last joins. Waits their batches ended say nothing
        // of late requests, so they do not stop the waits.
        for _ in 0..20 {
            assert!(burst(&batcher, enough - 1).await.is_zero());
            assert_eq!(sizes.lock().expect("lock").last(), Some(&super::ENOUGH));
        }
        assert!(burst(&batcher, enough - 2).await >= LINGER, "the waits stopped");

        // The plain wait (the worker's) waits its linger for as many as a statement takes.
        let (batcher, _) = recording(Linger::Steady(LINGER));
        open_flow(&batcher, 100).await;
        assert!(burst(&batcher, enough - 1).await >= LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_its_batch_ended_takes_the_rest_that_wait_with_it() {
        let (batcher, sizes) = recording(Linger::WhileItGathers(LINGER));
        open_flow(&batcher, 100).await;

        // A first request, its writer waiting, then more than enough at once behind it.
        let started = tokio::time::Instant::now();
        let first = spawn_call(&batcher, 0);
        tokio::task::yield_now().await;
        let rest: Vec<_> = (1..12).map(|i| spawn_call(&batcher, i)).collect();
        check_answers(vec![first], 0).await;
        check_answers(rest, 1).await;

        // One statement, at once: the ones past enough do not wait another linger.
        assert!(started.elapsed().is_zero(), "{:?}", started.elapsed());
        assert_eq!(sizes.lock().expect("lock").last(), Some(&12));
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_stop_a_dense_open_flow_resumes_the_waits() {
        use tokio::time::Duration;
        let (batcher, sizes) = recording(Linger::WhileItGathers(LINGER));
        // One client submitting in a loop stops the waits.
        for i in 0..100 {
            tokio::task::yield_now().await;
            assert_eq!(batcher.call(i).await.expect("answered"), i);
        }
        // (The premise: the waits stopped.)
        let gain = batcher.flow.gain.load(std::sync::atomic::Ordering::Relaxed);
        assert!(gain < super::LEAST_GAIN, "the waits did not stop: {gain}");
        let before = sizes.lock().expect("lock").len();

        // Then seven requests each millisecond from clients that do not wait for their
        // answers: a probe's wait fills with the next millisecond's, late in it.
        let mut calls = Vec::new();
        for i in 0..500 {
            if i % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            calls.push(spawn_call(&batcher, i));
        }
        check_answers(calls, 0).await;

        // Waits resume: most statements hold eight or more, where without waits each
        // request went in a statement of its own but for the probes' (189 statements).
        let sizes = sizes.lock().expect("lock")[before..].to_vec();
        assert!(sizes.len() < 100, "{} statements for 500 requests: {sizes:?}", sizes.len());
    }

    #[tokio::test]
    async fn at_a_low_rate_every_request_is_served_at_once_in_its_callers_task() {
        let batcher = Batcher::start(1, 8, 100, Linger::Steady(LINGER), |items: Vec<()>| async move {
            items.into_iter().map(|()| Ok(tokio::task::try_id())).collect()
        });

        let mut ticks = tokio::time::interval(std::time::Duration::from_millis(20));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..20 {
            ticks.tick().await;
            let batcher = batcher.clone();
            let caller = tokio::spawn(async move { (tokio::task::try_id(), batcher.call(()).await) });
            let (caller, served) = caller.await.expect("joined");
            assert_eq!(served.expect("answered"), caller);
        }
    }

    #[tokio::test]
    async fn a_failed_batch_is_served_one_by_one_unless_the_connection_failed() {
        use sea_orm::{DbErr, RuntimeErr};
        let statement = DbErr::Exec(RuntimeErr::Internal("deadlock detected".into()));
        let answers = super::after_failure(statement, 3, || async { vec![Ok(1), Ok(2), Ok(3)] }).await;
        assert_eq!(answers, vec![Ok(1), Ok(2), Ok(3)]);

        let connection = DbErr::Conn(RuntimeErr::Internal("connection refused".into()));
        let answers: Vec<Result<u32, DbErr>> =
            super::after_failure(connection, 3, || async { panic!("not one by one") }).await;
        assert_eq!(answers.len(), 3);
        assert!(answers.iter().all(|a| matches!(a, Err(DbErr::Conn(_)))));
    }

    #[tokio::test]
    async fn a_batch_that_answers_short_fails_the_rest_clearly() {
        let batcher = Batcher::start(1, 8, 100, Linger::Steady(LINGER), |items: Vec<u32>| async move {
            items.into_iter().take(0).map(Ok).collect::<Vec<_>>()
        });

        let answer = batcher.call(1).await;

        assert!(answer.is_err());
    }
}
