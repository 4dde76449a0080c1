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
    /// Jobs scheduled for later in Redis (digests, retries).
    pub scheduled: u64,
    /// Jobs in the hands of live workers: running, or fetched and about to start (their
    /// in-flight sets).
    pub running: u64,
    /// Jobs that finished in the last minute and in the last hour (succeeded, failed).
    pub finished_last_minute: (u64, u64),
    /// The same over the last hour.
    pub finished_last_hour: (u64, u64),
    /// Waiting jobs that failed before: their next run is a retry.
    pub retries: Vec<shared::queue::WaitingJob>,
    /// Registered apalis workers: a worker process's fetch loops, one each.
    pub workers: u64,
    /// Dispatch records not yet completed (includes what waits to be relayed).
    pub outstanding_dispatches: u64,
    /// Jobs the worker refused to run.
    pub dead_letters: u64,
    /// What each live worker process reports about itself.
    pub processes: Vec<shared::worker_health::WorkerReport>,
    /// What Redis holds for this namespace, by kind of data.
    pub redis: Vec<shared::redis_usage::KindUsage>,
    /// What the last trim removed.
    pub last_trim: Option<crate::jobs::trim::TrimReport>,
}

/// The budget of Redis kind `kind` under `settings`, as `worker status` prints it.
pub fn budget_of(settings: &Settings, kind: &str) -> Option<String> {
    let cache = &settings.cache;
    Some(match kind {
        "cache" => format!("{}entries/{}bytes", cache.max_entries, cache.max_bytes),
        "job_records" => {
            format!("{}records/{}s", settings.worker.job_retention_count, settings.worker.job_retention.as_secs())
        }
        "sessions" => settings.budgets.sessions.to_string(),
        "rate_limits" => settings.budgets.rate_limits.to_string(),
        "idempotency_keys" => settings.budgets.idempotency_keys.to_string(),
        "dead_letters" => shared::queue::MAX_DEAD_LETTERS.to_string(),
        _ => return None,
    })
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
    let running = queue.running().await?;
    let now = chrono::Utc::now().timestamp();
    let minutes = shared::job_stats::last_minutes(&mut conn, &settings.redis_namespace, now, 60).await?;
    let sum = |ms: &[shared::job_stats::Minute]| {
        ms.iter().fold((0, 0), |(ok, failed), m| (ok + m.succeeded, failed + m.failed))
    };
    let finished_last_hour = sum(&minutes);
    let finished_last_minute = sum(&minutes[minutes.len().saturating_sub(1)..]);
    let retries = queue.waiting_jobs(1000).await?.into_iter().filter(|j| j.failed_attempts > 0).take(20).collect();
    let dead_letters = queue.dead_letter_count().await?;
    let outstanding_dispatches = shared::queries::dispatch::outstanding(&db).await?;
    let processes = shared::worker_health::read_all(&mut conn, &settings.redis_namespace).await?;
    let redis = shared::redis_usage::by_kind(&mut conn, &settings.redis_namespace).await?;
    let last_trim: Option<String> = conn.get(crate::jobs::trim::report_key(&settings.redis_namespace)).await?;
    let last_trim = last_trim.and_then(|raw| serde_json::from_str(&raw).ok());
    Ok(Status {
        last_trim,
        queued,
        scheduled,
        running,
        finished_last_minute,
        finished_last_hour,
        retries,
        workers,
        outstanding_dispatches,
        dead_letters,
        processes,
        redis,
    })
}

/// Prints the status, one `name value` line each.
pub async fn print(settings: &Settings) -> anyhow::Result<()> {
    let status = read(settings).await?;
    println!("queued {}", status.queued);
    println!("scheduled {}", status.scheduled);
    println!("running {}", status.running);
    println!("workers {}", status.workers);
    println!("outstanding_dispatches {}", status.outstanding_dispatches);
    println!("dead_letters {}", status.dead_letters);
    let (ok, failed) = status.finished_last_minute;
    println!("finished_last_minute succeeded={ok} failed={failed}");
    let (ok, failed) = status.finished_last_hour;
    println!("finished_last_hour succeeded={ok} failed={failed}");
    for job in &status.retries {
        let at =
            chrono::DateTime::from_timestamp(job.run_at, 0).map_or_else(|| job.run_at.to_string(), |t| t.to_rfc3339());
        println!("retry {} {} attempt={} at={at}", job.id, job.kind, job.failed_attempts + 1);
    }
    for usage in &status.redis {
        let budget = budget_of(settings, usage.kind).map(|b| format!(" budget={b}")).unwrap_or_default();
        println!("redis {} keys={} bytes={}{budget}", usage.kind, usage.keys, usage.bytes);
    }
    if let Some(trim) = &status.last_trim {
        let removed: Vec<String> = trim.removed.iter().map(|(kind, n)| format!("{kind}:{n}")).collect();
        let cache = trim.cache_after.map(|(e, b)| format!(" cache_entries={e} cache_bytes={b}")).unwrap_or_default();
        println!(
            "last_trim at={:?} trigger={} took_ms={} removed={}{cache}",
            trim.at,
            trim.trigger,
            trim.took_ms,
            if removed.is_empty() { "-".to_owned() } else { removed.join(",") }
        );
    }
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
