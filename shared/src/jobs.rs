//! Job payloads: what the web (and the relay) put on the Redis queue for the worker.
//!
//! Payloads carry ids, never data, so a job always acts on the current state of the
//! database and running it twice is harmless. Each payload carries a `version`; a worker
//! refuses a payload newer than it understands with [`PayloadError::UnsupportedVersion`]
//! so the job is dead-lettered instead of being half-understood.

use serde::{Deserialize, Serialize};

/// Name of the queue that carries [`FanOut`] jobs (inside the Redis namespace).
pub const FAN_OUT_QUEUE: &str = "fanout";

/// Why a payload can't be run by this build.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// The payload was written by a newer build than this worker.
    #[error("payload version {found} is newer than the supported version {supported}")]
    UnsupportedVersion {
        /// The version found in the payload.
        found: u16,
        /// The newest version this build understands.
        supported: u16,
    },
}

/// Send one feedback message to every push subscription that exists when the job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanOut {
    /// Payload format version; see [`FanOut::VERSION`].
    pub version: u16,
    /// The feedback message to announce.
    pub feedback_id: i64,
    /// The dispatch record this job was created from, marked done when the job ends.
    pub dispatch_id: i64,
}

impl FanOut {
    /// The payload version this build writes and understands.
    pub const VERSION: u16 = 1;

    /// A job for `feedback_id`, created from dispatch record `dispatch_id`.
    pub fn new(feedback_id: i64, dispatch_id: i64) -> Self {
        Self { version: Self::VERSION, feedback_id, dispatch_id }
    }

    /// Refuses payloads written by a newer build.
    pub fn check_version(&self) -> Result<(), PayloadError> {
        if self.version > Self::VERSION {
            return Err(PayloadError::UnsupportedVersion { found: self.version, supported: Self::VERSION });
        }
        Ok(())
    }
}
