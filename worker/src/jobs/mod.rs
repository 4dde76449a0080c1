//! Jobs, one module each; all are idempotent and carry ids, not data.

pub mod backoff;
pub mod digest;
pub mod fan_out;
pub mod relay;
pub mod test_push;
pub mod trim;

/// How a job failed, which decides whether it is tried again.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// May succeed later (database or Redis unreachable): run the job again.
    #[error("retryable: {0:#}")]
    Retryable(anyhow::Error),
    /// Will never succeed (unsupported payload): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sea_orm::DbErr> for JobError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::Retryable(e.into())
    }
}
