//! `worker dead list|retry|discard` and `worker jobs list|cancel`: what an operator does
//! with dead letters and waiting jobs.

use shared::queue::JobQueue;
use shared::settings::Settings;

/// Prints the newest `limit` dead letters, one block each.
pub async fn list(settings: &Settings, limit: isize) -> anyhow::Result<()> {
    let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await?;
    let letters = queue.dead_letters(limit).await?;
    if letters.is_empty() {
        println!("no dead letters");
    }
    for letter in letters {
        println!("{}  {}  queue={} attempt={}", letter.id, letter.at, letter.queue, letter.attempt);
        println!("    error:   {}", letter.error);
        println!("    payload: {}", letter.payload.chars().take(200).collect::<String>());
    }
    Ok(())
}

/// Puts dead letter `id` back on its queue.
pub async fn retry(settings: &Settings, id: &str) -> anyhow::Result<()> {
    let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await?;
    let db = shared::db::connect(&settings.database_url).await?;
    if !queue.retry_dead_letter(&db, id).await? {
        anyhow::bail!("no dead letter {id}");
    }
    println!("{id} queued again");
    Ok(())
}

/// Puts every dead letter stored when it starts back on its queue, oldest first, each as
/// [`retry`] does, over one database pool; returns how many went back. Letters stored
/// meanwhile wait for the next call. On an error the letters not yet retried stay, and
/// the error says how many went back before it.
pub async fn retry_all(settings: &Settings) -> anyhow::Result<u64> {
    let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await?;
    let db = shared::db::connect(&settings.database_url).await?;
    let mut retried = 0;
    for id in queue.dead_letter_ids().await? {
        match queue.retry_dead_letter(&db, &id).await {
            Ok(true) => retried += 1,
            // Settled by someone else since the list was read: not counted.
            Ok(false) => {}
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("{retried} {} queued again before", dead_letters_noun(retried))));
            }
        }
    }
    println!("{retried} {} queued again", dead_letters_noun(retried));
    Ok(retried)
}

/// Deletes every dead letter stored when it starts, in one round trip; returns how many.
pub async fn discard_all(settings: &Settings) -> anyhow::Result<u64> {
    let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await?;
    let discarded = queue.discard_all_dead_letters().await?;
    println!("{discarded} {} discarded", dead_letters_noun(discarded));
    Ok(discarded)
}

/// "dead letter" or "dead letters", as `n` asks.
fn dead_letters_noun(n: u64) -> &'static str {
    if n == 1 { "dead letter" } else { "dead letters" }
}

/// Deletes dead letter `id`.
pub async fn discard(settings: &Settings, id: &str) -> anyhow::Result<()> {
    let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await?;
    if !queue.discard_dead_letter(id).await? {
        anyhow::bail!("no dead letter {id}");
    }
    println!("{id} discarded");
    Ok(())
}

/// Prints waiting jobs: id, when they run (now, or a time), kind, attempt, payload.
pub async fn list_jobs(settings: &Settings, limit: isize) -> anyhow::Result<()> {
    let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await?;
    let jobs = queue.waiting_jobs(limit).await?;
    if jobs.is_empty() {
        println!("no waiting jobs");
    }
    let now = chrono::Utc::now().timestamp();
    for job in jobs {
        let when = if job.run_at <= now {
            "due".to_owned()
        } else {
            chrono::DateTime::from_timestamp(job.run_at, 0).map_or_else(|| job.run_at.to_string(), |t| t.to_rfc3339())
        };
        let request = job.request_id.as_deref().unwrap_or("-");
        println!(
            "{}  {when}  {} attempt={} request={request}  {}",
            job.id,
            job.kind,
            job.failed_attempts + 1,
            job.payload.chars().take(120).collect::<String>()
        );
    }
    Ok(())
}

/// Revokes waiting job `id`. A revoked fan-out's dispatch record is completed too, or
/// the relay would enqueue the job again once it looked lost.
pub async fn cancel(settings: &Settings, id: &str) -> anyhow::Result<()> {
    let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await?;
    let Some(payload) = queue.cancel(id).await? else {
        anyhow::bail!("no waiting job {id} (it may have run already)");
    };
    if let Some(dispatch_id) = shared::jobs::QueuedJob::dispatch_of(&payload) {
        let db = shared::db::connect(&settings.database_url).await?;
        shared::queries::dispatch::mark_completed(&db, dispatch_id).await?;
    }
    println!("{id} cancelled");
    Ok(())
}

/// `worker ping`: a job that does nothing, and the time until a worker ran it.
pub async fn ping(settings: &Settings, timeout: std::time::Duration) -> anyhow::Result<()> {
    let queue = JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await?;
    let payload = serde_json::to_vec(&shared::jobs::Ping::new())?;
    let started = std::time::Instant::now();
    let ids = queue.enqueue_many(vec![payload]).await?;
    let id = ids.first().map(String::as_str).unwrap_or_default();
    while started.elapsed() < timeout {
        if queue.is_done(id).await? {
            println!("pong {id} in {:.1} ms", started.elapsed().as_secs_f64() * 1000.0);
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    anyhow::bail!("no worker ran ping {id} within {timeout:?}: are workers running (`worker status`)?")
}
