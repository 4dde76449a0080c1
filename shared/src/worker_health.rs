//! What each worker process reports about itself in Redis, so `worker status` and the
//! web's `/readyz` can show dead or restarting workers instead of hiding them.
//!
//! Every process refreshes `{namespace}:worker-health:{process}` every few seconds with a
//! short expiry: a process that is gone (even by `kill -9`) disappears on its own.

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// How often a process refreshes its report.
pub const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A report older than this has expired (the process stopped refreshing it).
pub const REPORT_TTL_SECS: u64 = 15;

/// One worker process's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Unique per process start.
    pub process: String,
    /// The current names of its fetch loops' apalis workers, comma-separated (a loop
    /// takes a new one after each restart).
    pub worker: String,
    /// Host name.
    pub host: String,
    /// Operating-system process id.
    pub pid: u32,
    /// Jobs run at once.
    pub concurrency: usize,
    /// `running`, or `restarting` (one of its apalis workers died and is being rebuilt).
    pub state: String,
    /// How many times its apalis workers died and were rebuilt.
    pub restarts: u32,
    /// Why it last died.
    pub last_error: Option<String>,
    /// When the process started (UTC).
    pub started_at: String,
    /// When this report was written (UTC).
    pub reported_at: String,
}

/// The key of `process`'s report.
pub fn report_key(namespace: &str, process: &str) -> String {
    format!("{namespace}:worker-health:{process}")
}

/// Writes `report`, valid for [`REPORT_TTL_SECS`].
pub async fn publish(conn: &mut ConnectionManager, namespace: &str, report: &WorkerReport) -> redis::RedisResult<()> {
    let body = serde_json::to_string(report).unwrap_or_default();
    conn.set_ex(report_key(namespace, &report.process), body, REPORT_TTL_SECS).await
}

/// Removes `process`'s report (clean stop).
pub async fn withdraw(conn: &mut ConnectionManager, namespace: &str, process: &str) -> redis::RedisResult<()> {
    conn.del(report_key(namespace, process)).await
}

/// Every live report under `namespace`, sorted by process.
pub async fn read_all(conn: &mut ConnectionManager, namespace: &str) -> redis::RedisResult<Vec<WorkerReport>> {
    let pattern = format!("{namespace}:worker-health:*");
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(500).query_async(conn).await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
    let mut reports: Vec<WorkerReport> = raw.iter().flatten().filter_map(|r| serde_json::from_str(r).ok()).collect();
    reports.sort_by(|a, b| a.process.cmp(&b.process));
    Ok(reports)
}
