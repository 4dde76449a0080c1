//! `worker status`: the state of the queue as an operator needs it at a glance.

use apalis_redis::Config;
use redis::AsyncCommands;
use shared::queue::JobQueue;
use shared::settings::Settings;

/// Counts read from Redis and the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Jobs waiting in Redis.
    pub queued: u64,
    /// Jobs scheduled for later in Redis.
    pub scheduled: u64,
    /// Registered worker processes.
    pub workers: u64,
    /// Dispatch records not yet completed (includes what waits to be relayed).
    pub outstanding_dispatches: u64,
    /// Jobs the worker refused to run.
    pub dead_letters: u64,
    /// What each live worker process reports about itself.
    pub processes: Vec<shared::worker_health::WorkerReport>,
}

/// Reads the status.
pub async fn read(settings: &Settings) -> anyhow::Result<Status> {
    let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await?;
    let db = shared::db::connect(&settings.database_url).await?;
    let config: &Config = queue.fan_out_config();
    let mut conn = queue.connection();
    let queued: u64 = conn.llen(config.active_jobs_list()).await?;
    let scheduled: u64 = conn.zcard(config.scheduled_jobs_set()).await?;
    let workers: u64 = conn.zcard(config.workers_set()).await?;
    let dead_letters = queue.dead_letter_count().await?;
    let outstanding_dispatches = shared::queries::dispatch::outstanding(&db).await?;
    let processes = shared::worker_health::read_all(&mut conn, &settings.redis_namespace).await?;
    Ok(Status { queued, scheduled, workers, outstanding_dispatches, dead_letters, processes })
}

/// Prints the status, one `name value` line each.
pub async fn print(settings: &Settings) -> anyhow::Result<()> {
    let status = read(settings).await?;
    println!("queued {}", status.queued);
    println!("scheduled {}", status.scheduled);
    println!("workers {}", status.workers);
    println!("outstanding_dispatches {}", status.outstanding_dispatches);
    println!("dead_letters {}", status.dead_letters);
    println!("processes {}", status.processes.len());
    for p in &status.processes {
        println!(
            "process {} host={} pid={} worker={} concurrency={} state={} restarts={} reported_at={}{}",
            p.process,
            p.host,
            p.pid,
            p.worker,
            p.concurrency,
            p.state,
            p.restarts,
            p.reported_at,
            p.last_error.as_deref().map(|e| format!(" last_error={e:?}")).unwrap_or_default(),
        );
    }
    Ok(())
}
