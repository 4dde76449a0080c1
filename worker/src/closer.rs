//! Closing fan-out runs together: the runs that finish while a close is being written go
//! out in the next statement (`shared::queries::delivery::close_runs`, through
//! `shared::batch`), so under load a worker spends one statement on many runs instead
//! of one each. Alone, a run is closed at once. Should a batch fail (a deadlock with
//! another statement, say), its runs are closed one by one.

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, DbErr};
use shared::batch::Batcher;
use shared::metrics::Registry;
use shared::queries::delivery::{self, RunToClose};

/// Close statements in flight at once.
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

/// The closers' inbox; cheap to clone.
#[derive(Clone)]
pub struct Closer {
    writers: Batcher<Close, Option<DateTime<Utc>>>,
}

impl Closer {
    /// Starts the closers on `db`; they count their statements in `metrics`.
    pub fn start(db: DatabaseConnection, metrics: &Registry) -> Self {
        let statements = metrics.counter(
            "tidings_run_close_writes_total",
            "Statements that closed fan-out runs; under load one closes many.",
            &[],
        );
        let writers = Batcher::start(WRITERS, MAX_BATCH, MAX_WAITING, move |batch: Vec<Close>| {
            let (db, statements) = (db.clone(), statements.clone());
            async move {
                statements.inc();
                let runs: Vec<RunToClose<'_>> = batch.iter().map(Close::as_run).collect();
                match delivery::close_runs(&db, &runs).await {
                    Ok(due) => due.into_iter().map(Ok).collect(),
                    Err(e) if batch.len() == 1 => vec![Err(e)],
                    Err(e) => {
                        tracing::warn!(error = %e, runs = batch.len(), "fan_out.close_batch_failed; closing one by one");
                        let mut answers = Vec::with_capacity(batch.len());
                        for run in &runs {
                            statements.inc();
                            let closed =
                                delivery::close_run(&db, run.feedback_id, run.dispatch_id, run.sent, run.token);
                            answers.push(closed.await);
                        }
                        answers
                    }
                }
            }
        });
        Self { writers }
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
        self.writers.call(Close { feedback_id, dispatch_id, sent, token }).await
    }
}
