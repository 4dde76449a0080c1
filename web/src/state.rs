//! What every handler can reach.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use shared::settings::Settings;

use crate::dispatch::Dispatcher;
use crate::middleware::rate_limit::SubmitLimiter;

/// Shared by all requests; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Database pool.
    pub db: DatabaseConnection,
    /// Hands committed feedback to the Redis queue.
    pub dispatcher: Arc<Dispatcher>,
    /// Per-client limit on feedback submissions.
    pub submit_limiter: Arc<SubmitLimiter>,
    /// The process's settings.
    pub settings: Arc<Settings>,
}
