//! The context every job runs with.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use shared::metrics::Registry;
use shared::queue::JobQueue;
use shared::settings::Settings;

use crate::push::PushSender;

/// Shared by all jobs of a worker process; cheap to clone.
#[derive(Clone)]
pub struct WorkerContext {
    /// Database pool.
    pub db: DatabaseConnection,
    /// Sends Web Pushes (one HTTP client and VAPID signature cache per process).
    pub sender: Arc<PushSender>,
    /// The queue, for jobs that schedule others (a burst's digest). `None` in the
    /// in-process mode ([`crate::immediate`]), where nothing is scheduled.
    pub queue: Option<JobQueue>,
    /// The admin's read cache, when it is on: jobs invalidate and trim it.
    pub cache: Option<shared::cache::Cache>,
    /// The process's settings.
    pub settings: Arc<Settings>,
    /// The process's metrics, served at `/metrics`.
    pub metrics: Registry,
    /// Opens and closes fan-out runs, many in one statement under load.
    pub runs: crate::runs::Runs,
}
