//! In-process mode (Huey's "immediate" mode), for tests: a job runs at once, in the
//! caller, with the same code as in a worker process, and no Redis is involved.
//!
//! What differs from a worker process: nothing is retried (a failure is returned to the
//! caller), nothing is scheduled (bursts are not folded into a digest: every message is
//! announced on its own), and no locks, metrics of the queue or dead letters exist. The
//! web takes it through [`shared::queue::JobRunner`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use sea_orm::DatabaseConnection;
use shared::jobs::QueuedJob;
use shared::metrics::Registry;
use shared::settings::Settings;

use crate::context::WorkerContext;
use crate::jobs::JobError;
use crate::push::PushSender;

/// Runs jobs in the caller.
#[derive(Clone)]
pub struct Immediate {
    ctx: WorkerContext,
}

impl Immediate {
    /// Jobs run on `db` with `settings`' push configuration; Redis is never contacted.
    pub fn new(settings: Settings, db: DatabaseConnection) -> anyhow::Result<Self> {
        let private_key = settings
            .push
            .vapid_private_key
            .clone()
            .context("VAPID_PRIVATE_KEY is not set: run `web vapid generate` and put its output in .env")?;
        let sender = PushSender::new(crate::app::sender_config(&settings, private_key))?;
        let metrics = Registry::new();
        let ctx = WorkerContext {
            runs: crate::runs::Runs::start(
                db.clone(),
                db.clone(),
                &metrics,
                crate::jobs::fan_out::FIRST_PAGE,
                crate::jobs::fan_out::claim_hold(&settings),
                crate::jobs::fan_out::coalescing_of(&settings, false),
                shared::batch::Linger::Off,
            ),
            db,
            sender: Arc::new(sender),
            queue: None,
            cache: None,
            settings: Arc::new(settings),
            metrics,
        };
        Ok(Self { ctx })
    }

    /// Jobs also invalidate and trim `cache` (the web's read cache, in Redis).
    pub fn with_cache(mut self, cache: shared::cache::Cache) -> Self {
        self.ctx.cache = Some(cache);
        self
    }

    /// Runs the job `payload` describes, now.
    pub async fn run(&self, payload: &[u8]) -> Result<(), JobError> {
        crate::jobs::run(QueuedJob::parse(payload), &self.ctx).await
    }
}

impl shared::queue::JobRunner for Immediate {
    fn run_now<'a>(&'a self, payload: Vec<u8>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move { self.run(&payload).await.map_err(|e| e.to_string()) })
    }
}
