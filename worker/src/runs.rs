//! Opening and closing fan-out runs together: the runs that start (or finish) while an
//! open (or a close) is being written go out in the next statement
//! (`shared::queries::delivery::{open_runs, close_runs}`, through `shared::batch`), so
//! under load a worker spends one statement on many runs instead of one each. Alone, a
//! run is opened and closed at once, in its own task; under a steady flow, with enough
//! slots, a group writer waits briefly for the runs behind the first (`linger_for`).
//! Should a batch's statement fail (a deadlock with another statement, say), its runs are
//! served one by one.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, DbErr};
use shared::batch::{Batcher, Linger, after_failure};
use shared::metrics::Registry;
use shared::queries::delivery::{self, Coalescing, Opening, RunToClose, RunToOpen};

/// Statements of each kind in flight at once.
const WRITERS: usize = 2;

/// Runs in one statement, at most.
const MAX_BATCH: usize = 64;

/// Runs waiting to be closed, at most (the worker's concurrency bounds it well below).
const MAX_WAITING: usize = 1024;

/// A run's close: its message, dispatch record, successes not yet recorded and token.
struct Close {
    feedback_id: i64,
    dispatch_id: i64,
    sent: Vec<i64>,
    token: String,
}

impl Close {
    fn as_run(&self) -> RunToClose<'_> {
        RunToClose {
            feedback_id: self.feedback_id,
            dispatch_id: self.dispatch_id,
            sent: &self.sent,
            token: &self.token,
        }
    }
}

/// How long a group writer waits for the runs behind the first under a steady flow
/// (`shared::batch::LINGER`), for a worker process running `concurrency` jobs at once:
/// from 16, the linger; below, none. A run that waits holds its job's slot, so each job
/// can take up to two lingers longer (its open and its close): with 4 slots that would
/// cap the process near the rate at which the linger begins (about 500 runs a second).
/// The threshold is reasoned from that, not measured: the benchmark's runs use 16 or 64.
/// The wait is `Linger::Steady`, kept even when it gathers nothing late: a fetch's jobs
/// open within a millisecond of each other, and without the wait the first goes alone
/// (measured: with the web's rule, `Linger::WhileItGathers`, the stack spent 9–17% more
/// a message at 1,000–2,000/s, `docs/PERFORMANCE.md`, "A twenty-third machine"). Nor
/// does it end at `shared::batch::ENOUGH`: a fetch's jobs are not clients that send
/// again once answered (ended at 16 it measured the same at 2,000/s, "A twenty-fourth
/// machine"; at 8, not measured).
pub fn linger_for(concurrency: usize) -> Linger {
    if concurrency >= 16 { Linger::Steady(shared::batch::LINGER) } else { Linger::Off }
}

/// Opens and closes the runs of a worker process; cheap to clone.
#[derive(Clone)]
pub struct Runs {
    openers: Batcher<(i64, String), Opening>,
    closers: Batcher<Close, Option<DateTime<Utc>>>,
}

impl Runs {
    /// Starts the openers and closers, counting their statements in `metrics`: a run alone
    /// on `db`, a group on `groups` (`shared::db::connect_for_groups`). A run claims a
    /// first page of `first_page` subscriptions, each claim held for `hold`, and folds
    /// into a digest as `coalescing` says. Under a steady flow a group writer waits up to
    /// `linger` for more runs (`linger_for`).
    pub fn start(
        db: DatabaseConnection,
        groups: DatabaseConnection,
        metrics: &Registry,
        first_page: u64,
        hold: Duration,
        coalescing: Coalescing,
        linger: Linger,
    ) -> Self {
        let pools = Pools { alone: db, groups };
        Self {
            openers: openers(pools.clone(), metrics, first_page, hold, coalescing, linger),
            closers: closers(pools, metrics, linger),
        }
    }

    /// Opens the run of `feedback_id` with claim `token` (see `delivery::open_run`).
    pub async fn open(&self, feedback_id: i64, token: String) -> Result<Opening, DbErr> {
        self.openers.call((feedback_id, token)).await
    }

    /// Closes the run of `dispatch_id` for `feedback_id` as `close_run` does, recording
    /// `sent` with it; returns when the message is next due, if a retry is owed.
    pub async fn close(
        &self,
        feedback_id: i64,
        dispatch_id: i64,
        sent: Vec<i64>,
        token: String,
    ) -> Result<Option<DateTime<Utc>>, DbErr> {
        self.closers.call(Close { feedback_id, dispatch_id, sent, token }).await
    }
}

/// The pool a run alone is written on, and the one for groups.
#[derive(Clone)]
struct Pools {
    alone: DatabaseConnection,
    groups: DatabaseConnection,
}

impl Pools {
    /// The pool for a batch of `n` runs.
    fn for_batch(&self, n: usize) -> &DatabaseConnection {
        if n > 1 { &self.groups } else { &self.alone }
    }
}

/// Until when a claim made now holds.
pub fn lease_until(hold: Duration) -> DateTime<Utc> {
    shared::queries::now() + chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::seconds(30))
}

fn openers(
    pools: Pools,
    metrics: &Registry,
    first_page: u64,
    hold: Duration,
    coalescing: Coalescing,
    linger: Linger,
) -> Batcher<(i64, String), Opening> {
    let statements = metrics.counter(
        "tidings_run_open_writes_total",
        "Statements that opened fan-out runs; under load one opens many.",
        &[],
    );
    Batcher::start(WRITERS, MAX_BATCH, MAX_WAITING, linger, move |batch: Vec<(i64, String)>| {
        let (pools, statements) = (pools.clone(), statements.clone());
        async move {
            statements.inc();
            let lease = lease_until(hold);
            let runs: Vec<RunToOpen<'_>> = batch.iter().map(|(f, t)| RunToOpen { feedback_id: *f, token: t }).collect();
            match delivery::open_runs(pools.for_batch(runs.len()), &runs, first_page, lease, coalescing).await {
                Ok(opened) => opened.into_iter().map(Ok).collect(),
                Err(e) => {
                    after_failure(e, batch.len(), || async {
                        let mut answers = Vec::with_capacity(batch.len());
                        for run in &runs {
                            statements.inc();
                            // A fresh lease: the failed batch used up some of the first.
                            let lease = lease_until(hold);
                            let opened = delivery::open_run(
                                &pools.alone,
                                run.feedback_id,
                                first_page,
                                run.token,
                                lease,
                                coalescing,
                            );
                            answers.push(opened.await);
                        }
                        answers
                    })
                    .await
                }
            }
        }
    })
}

fn closers(pools: Pools, metrics: &Registry, linger: Linger) -> Batcher<Close, Option<DateTime<Utc>>> {
    let statements = metrics.counter(
        "tidings_run_close_writes_total",
        "Statements that closed fan-out runs; under load one closes many.",
        &[],
    );
    Batcher::start(WRITERS, MAX_BATCH, MAX_WAITING, linger, move |batch: Vec<Close>| {
        let (pools, statements) = (pools.clone(), statements.clone());
        async move {
            statements.inc();
            let runs: Vec<RunToClose<'_>> = batch.iter().map(Close::as_run).collect();
            match delivery::close_runs(pools.for_batch(runs.len()), &runs).await {
                Ok(due) => due.into_iter().map(Ok).collect(),
                Err(e) => {
                    after_failure(e, batch.len(), || async {
                        let mut answers = Vec::with_capacity(batch.len());
                        for run in &runs {
                            statements.inc();
                            let closed = delivery::close_run(
                                &pools.alone,
                                run.feedback_id,
                                run.dispatch_id,
                                run.sent,
                                run.token,
                            );
                            answers.push(closed.await);
                        }
                        answers
                    })
                    .await
                }
            }
        }
    })
}
