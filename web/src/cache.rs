//! The web's side of the read cache ([`shared::cache`]): read through it, and announce
//! changes so what shows them is dropped.
//!
//! Reads never depend on it: with the cache off (`CACHE_ENABLED=false`), Redis
//! unreachable or an entry unreadable, the database answers. After a change commits,
//! [`ReadCache::changed`] drops the affected entries at once (the admin who made the
//! change sees it on the next page) and enqueues an `invalidate_cache` job, which the
//! worker runs, so the drop happens even if this first attempt failed.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::cache::{Cover, Lookup};
use shared::jobs::InvalidateCache;

use crate::dispatch::Dispatcher;
use crate::error::WebError;
use crate::state::AppState;

/// Reads through the cache for one request.
pub struct ReadCache<'a> {
    state: &'a AppState,
}

impl<'a> ReadCache<'a> {
    /// The cache as `state` configures it.
    pub fn new(state: &'a AppState) -> Self {
        Self { state }
    }

    fn count(&self, result: &'static str) {
        self.state
            .metrics
            .counter("tidings_cache_requests_total", "Reads through the cache, by result.", &[("result", result)])
            .inc();
    }

    /// Entry `name`: from the cache, or from `load` (then stored when `cover` gives what
    /// it shows; `None` keeps it out of the cache).
    pub async fn get_or_load<T, F, Fut>(
        &self,
        name: &str,
        cover: impl FnOnce(&T) -> Option<Cover>,
        load: F,
    ) -> Result<T, WebError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, sea_orm::DbErr>>,
    {
        let Some(cache) = self.state.dispatcher.cache().await else {
            self.count("off");
            return Ok(load().await?);
        };
        let seq = match cache.get(name).await {
            Ok(Lookup::Hit(bytes)) => match serde_json::from_slice(&bytes) {
                Ok(value) => {
                    self.count("hit");
                    return Ok(value);
                }
                Err(e) => {
                    // Written by a build that shaped it differently: drop it, fill it again.
                    tracing::warn!(entry = name, error = %e, "cache.unreadable_entry");
                    match cache.remove(&[name]).await {
                        Ok(_) => match cache.get(name).await {
                            Ok(Lookup::Miss { seq }) => Some(seq),
                            _ => None,
                        },
                        Err(_) => None,
                    }
                }
            },
            Ok(Lookup::Miss { seq }) => Some(seq),
            Err(e) => {
                tracing::warn!(entry = name, error = %e, "cache.unavailable");
                None
            }
        };
        self.count("miss");
        let value = load().await?;
        if let (Some(seq), Some(cover)) = (seq, cover(&value)) {
            match serde_json::to_vec(&value) {
                Ok(bytes) => match cache.put(name, &bytes, &seq, cover).await {
                    Ok(stored) if stored.over_budget => request_trim(&self.state.dispatcher),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(entry = name, error = %e, "cache.put_failed"),
                },
                Err(e) => tracing::warn!(entry = name, error = %e, "cache.encode_failed"),
            }
        }
        Ok(value)
    }

    /// Messages `ids` changed (handled, read, deleted) and the change committed: drop what
    /// shows them now, and enqueue the job that makes sure of it.
    pub async fn changed(&self, ids: &[i64]) {
        let Some(cache) = self.state.dispatcher.cache().await else { return };
        if let Err(e) = cache.invalidate(ids).await {
            tracing::warn!(?ids, error = %e, "cache.invalidate_failed; the job will");
        }
        let payload = match serde_json::to_vec(&InvalidateCache::new(ids.to_vec())) {
            Ok(payload) => payload,
            Err(e) => return tracing::warn!(error = %e, "cache.invalidate_job_encode_failed"),
        };
        let dispatcher = &self.state.dispatcher;
        if let Some(runner) = dispatcher.immediate() {
            if let Err(e) = runner.run_now(payload).await {
                tracing::warn!(?ids, error = %e, "cache.invalidate_job_failed");
            }
            return;
        }
        let request_id = crate::middleware::request_id::current();
        match dispatcher.queue().await {
            Some(queue) => {
                if let Err(e) = queue.enqueue(payload, request_id.as_deref()).await {
                    tracing::warn!(?ids, error = %e, "cache.invalidate_job_enqueue_failed");
                }
            }
            None => tracing::warn!(?ids, "cache.invalidate_job_not_enqueued; redis is not reachable"),
        }
    }
}

/// The cache is past its budget: ask the worker for a trim (at most one waits at a
/// time), in the background.
fn request_trim(dispatcher: &Arc<Dispatcher>) {
    let dispatcher = Arc::clone(dispatcher);
    tokio::spawn(async move {
        if let Some(runner) = dispatcher.immediate() {
            if let Ok(payload) = serde_json::to_vec(&shared::jobs::TrimCaches::new())
                && let Err(e) = runner.run_now(payload).await
            {
                tracing::warn!(error = %e, "cache.trim_failed");
            }
            return;
        }
        if let Some(queue) = dispatcher.queue().await {
            match queue.request_trim(None).await {
                Ok(true) => tracing::info!("cache.over_budget; trim queued"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cache.trim_request_failed"),
            }
        }
    });
}
