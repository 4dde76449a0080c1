//! Storing submissions: a few writer tasks insert whatever submissions wait, together.
//!
//! Each submission is still atomic on its own (its message and its dispatch record), and
//! a request is answered only after the statement holding it committed. Under load the
//! submissions that arrive while the writers are busy go out in one statement
//! (`shared::queries::feedback::insert_many_for_requests`, through `shared::batch`), so
//! the database's cost per submission falls the way a database groups commits; alone, a
//! submission is written at once, and under a steady flow (from about 500 a second) a
//! writer waits up to `shared::batch::LINGER` for the submissions right behind the one it
//! took, so at moderate rates they share statements too; a wait ends once its batch
//! holds `shared::batch::ENOUGH`, and waits stop while they gather too few late
//! submissions (`shared::batch::Linger::WhileItGathers`: clients submitting in a loop,
//! whom a wait would only delay), but for a probe now and then. Should a batch's
//! statement fail, its submissions are
//! written one by one, so one bad row never fails the others (a lost connection fails
//! them all at once: see `shared::batch::after_failure`).

use sea_orm::{DatabaseConnection, DbErr};
use shared::batch::{Batcher, Linger, after_failure};
use shared::domain::NewFeedback;
use shared::metrics::Registry;
use shared::queries::feedback::{self, Submitted};

/// Writer tasks: two, so one commits while the next group gathers (and a submission
/// that finds nothing waiting and does not wait for others goes out at once from its
/// own request). Four split the groups under load, for more statements and commits on
/// the same cores.
const WRITERS: usize = 2;

/// Submissions in one statement, at most.
const MAX_BATCH: usize = 64;

/// Submissions waiting for a writer, at most; past it a request waits for room.
const MAX_WAITING: usize = 1024;

/// The writers' inbox; cheap to clone.
#[derive(Clone)]
pub struct Intake {
    writers: Batcher<(NewFeedback, Option<String>), Submitted>,
}

impl Intake {
    /// Starts the writers on `db`; they count their statements in `metrics`.
    pub fn start(db: DatabaseConnection, metrics: &Registry) -> Self {
        let statements = metrics.counter(
            "tidings_submission_writes_total",
            "Statements (transactions on SQLite) that stored submissions; under load one stores many.",
            &[],
        );
        let writers = Batcher::start(
            WRITERS,
            MAX_BATCH,
            MAX_WAITING,
            Linger::WhileItGathers(shared::batch::LINGER),
            move |batch: Vec<(NewFeedback, Option<String>)>| {
                let (db, statements) = (db.clone(), statements.clone());
                async move {
                    statements.inc();
                    let rows: Vec<(&NewFeedback, Option<&str>)> =
                        batch.iter().map(|(f, r)| (f, r.as_deref())).collect();
                    match feedback::insert_many_for_requests(&db, &rows).await {
                        Ok(submitted) => submitted.into_iter().map(Ok).collect(),
                        Err(e) => {
                            after_failure(e, batch.len(), || async {
                                let mut answers = Vec::with_capacity(batch.len());
                                for (feedback, request_id) in &batch {
                                    statements.inc();
                                    answers
                                        .push(feedback::insert_for_request(&db, feedback, request_id.as_deref()).await);
                                }
                                answers
                            })
                            .await
                        }
                    }
                }
            },
        );
        Self { writers }
    }

    /// Stores `feedback` with its dispatch record; returns once they are committed.
    pub async fn submit(&self, feedback: NewFeedback, request_id: Option<String>) -> Result<Submitted, DbErr> {
        self.writers.call((feedback, request_id)).await
    }
}
