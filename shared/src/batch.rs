//! Group writes: a few writer tasks take whatever requests wait and serve them with one
//! call, the way a database groups commits.
//!
//! Alone, a request is served at once, in the caller's own task (no hand-over to another
//! task); while others are in flight, requests wait for a writer, and those that arrive
//! while the writers are busy go out together, so the cost per request falls as the load
//! rises. A request is answered only when the call that served it has returned.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sea_orm::DbErr;
use tokio::sync::{Mutex, mpsc, oneshot};

/// A request waiting for a writer, and where to answer it.
type Waiting<I, O> = (I, oneshot::Sender<Result<O, DbErr>>);

/// What serves a batch: one answer per request, in its place.
type Write<I, O> = Arc<dyn Fn(Vec<I>) -> Pin<Box<dyn Future<Output = Vec<Result<O, DbErr>>> + Send>> + Send + Sync>;

/// The writers' inbox; cheap to clone.
pub struct Batcher<I, O> {
    inbox: mpsc::Sender<Waiting<I, O>>,
    write: Write<I, O>,
    /// Requests not answered yet (served, waiting or in a batch).
    pending: Arc<AtomicUsize>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self { inbox: self.inbox.clone(), write: Arc::clone(&self.write), pending: Arc::clone(&self.pending) }
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
    /// `max_waiting` requests wait; past it a caller waits for room.
    pub fn start<F, Fut>(writers: usize, max_batch: usize, max_waiting: usize, write: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<O, DbErr>>> + Send + 'static,
    {
        let write: Write<I, O> = Arc::new(move |batch| Box::pin(write(batch)));
        let (inbox, waiting) = mpsc::channel::<Waiting<I, O>>(max_waiting.max(1));
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..writers.max(1) {
            let (waiting, write) = (Arc::clone(&waiting), Arc::clone(&write));
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut waiting = waiting.lock().await;
                        let Some(first) = waiting.recv().await else { return };
                        let mut batch = vec![first];
                        while batch.len() < max_batch.max(1) {
                            match waiting.try_recv() {
                                Ok(next) => batch.push(next),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
                    let mut answers = write(items).await.into_iter();
                    for reply in replies {
                        let _ = reply.send(answers.next().unwrap_or_else(|| Err(no_answer())));
                    }
                }
            });
        }
        Self { inbox, write, pending: Arc::new(AtomicUsize::new(0)) }
    }

    /// Serves `item`: at once in this task when nothing else is pending, else through
    /// the writers; returns its answer.
    pub async fn call(&self, item: I) -> Result<O, DbErr> {
        let alone = self.pending.fetch_add(1, Ordering::AcqRel) == 0;
        let _pending = Pending(Arc::clone(&self.pending));
        if alone {
            return first((self.write)(vec![item]).await);
        }
        let (reply, answer) = oneshot::channel();
        let stopped = || DbErr::Conn(sea_orm::RuntimeErr::Internal("the writers stopped".into()));
        self.inbox.send((item, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

#[cfg(test)]
mod tests {
    use super::Batcher;

    #[tokio::test]
    async fn every_request_gets_its_own_answer_and_waiting_ones_go_together() {
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&sizes);
        let batcher = Batcher::start(1, 8, 100, move |items: Vec<u32>| {
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
        let batcher = Batcher::start(1, 8, 100, |items: Vec<()>| async move {
            items.into_iter().map(|()| Ok(tokio::task::try_id())).collect()
        });

        let caller = tokio::spawn(async move { (tokio::task::try_id(), batcher.call(()).await) });

        let (caller, served) = caller.await.expect("joined");
        assert!(caller.is_some());
        assert_eq!(served.expect("answered"), caller);
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
        let batcher = Batcher::start(1, 8, 100, |items: Vec<u32>| async move {
            items.into_iter().take(0).map(Ok).collect::<Vec<_>>()
        });

        let answer = batcher.call(1).await;

        assert!(answer.is_err());
    }
}
