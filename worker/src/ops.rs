//! `worker dead list|retry|discard`: what an operator does with dead letters.

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
    if !queue.retry_dead_letter(id).await? {
        anyhow::bail!("no dead letter {id}");
    }
    println!("{id} queued again");
    Ok(())
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
