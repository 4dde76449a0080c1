//! What every handler can reach.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use shared::metrics::Registry;
use shared::settings::Settings;

use crate::dispatch::Dispatcher;
use crate::middleware::rate_limit::SubmitLimiter;

/// Shared by all requests; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Database pool.
    pub db: DatabaseConnection,
    /// Stores submissions (in batches under load).
    pub intake: crate::intake::Intake,
    /// Hands committed feedback to the Redis queue.
    pub dispatcher: Arc<Dispatcher>,
    /// Per-client limit on feedback submissions.
    pub submit_limiter: Arc<SubmitLimiter>,
    /// The process's settings.
    pub settings: Arc<Settings>,
    /// The process's metrics, served at `/metrics`.
    pub metrics: Registry,
}

impl AppState {
    /// Counts one submission through `channel` ("form" or "api") with its `outcome`.
    pub fn count_submission(&self, channel: &'static str, outcome: &'static str) {
        self.metrics
            .counter(
                "tidings_feedback_total",
                "Feedback submissions, by channel and outcome.",
                &[("channel", channel), ("outcome", outcome)],
            )
            .inc();
    }
}
