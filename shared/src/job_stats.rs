//! Per-minute job statistics in Redis, for the admin's Queues page: jobs finished and
//! failed, their total run time and their total wait in the queue, per minute, kept for
//! two hours.

use redis::aio::ConnectionManager;

/// How long a minute's counters are kept.
pub const KEEP_SECS: i64 = 2 * 3600;

/// One minute's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Minute {
    /// Unix time of the minute's start.
    pub at: i64,
    /// Jobs that succeeded.
    pub succeeded: u64,
    /// Jobs that failed (retried or dead-lettered).
    pub failed: u64,
    /// Total run time of those jobs, in milliseconds.
    pub run_ms: u64,
    /// Total time those jobs waited between being due and starting, in milliseconds.
    pub wait_ms: u64,
}

fn key(namespace: &str, minute: i64) -> String {
    format!("{namespace}:stats:jobs:{minute}")
}

/// Counts one job that waited `wait_ms`, ran for `run_ms` and `succeeded` (or not), at
/// `now` (Unix secs).
pub async fn record(
    conn: &mut ConnectionManager,
    namespace: &str,
    now: i64,
    succeeded: bool,
    run_ms: u64,
    wait_ms: u64,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    add_to(&mut pipe, namespace, now, succeeded, run_ms, wait_ms);
    pipe.query_async(conn).await
}

/// Adds what [`record`] sends to `pipe`, for a caller that has more to send in the same
/// round trip.
pub fn add_to(pipe: &mut redis::Pipeline, namespace: &str, now: i64, succeeded: bool, run_ms: u64, wait_ms: u64) {
    let minute = now - now.rem_euclid(60);
    let key = key(namespace, minute);
    pipe.hincr(&key, if succeeded { "succeeded" } else { "failed" }, 1)
        .ignore()
        .hincr(&key, "run_ms", run_ms)
        .ignore()
        .hincr(&key, "wait_ms", wait_ms)
        .ignore()
        .expire(&key, KEEP_SECS)
        .ignore();
}

/// The last `minutes` minutes up to `now`, oldest first (zeros where nothing ran).
pub async fn last_minutes(
    conn: &mut ConnectionManager,
    namespace: &str,
    now: i64,
    minutes: i64,
) -> redis::RedisResult<Vec<Minute>> {
    let current = now - now.rem_euclid(60);
    let starts: Vec<i64> = (0..minutes).rev().map(|i| current - i * 60).collect();
    let mut pipe = redis::pipe();
    for start in &starts {
        pipe.cmd("HMGET").arg(key(namespace, *start)).arg("succeeded").arg("failed").arg("run_ms").arg("wait_ms");
    }
    // succeeded, failed, run_ms, wait_ms
    type Row = (Option<u64>, Option<u64>, Option<u64>, Option<u64>);
    let rows: Vec<Row> = pipe.query_async(conn).await?;
    Ok(starts
        .into_iter()
        .zip(rows)
        .map(|(at, (succeeded, failed, run_ms, wait_ms))| Minute {
            at,
            succeeded: succeeded.unwrap_or(0),
            failed: failed.unwrap_or(0),
            run_ms: run_ms.unwrap_or(0),
            wait_ms: wait_ms.unwrap_or(0),
        })
        .collect())
}
