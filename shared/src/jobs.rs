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

/// The `kind` of a [`TestPush`] payload ([`FanOut`] payloads carry no `kind`).
pub const TEST_PUSH_KIND: &str = "test_push";

/// Send a test notification to every device of one admin ("Send test notification").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestPush {
    /// Always [`TEST_PUSH_KIND`].
    pub kind: String,
    /// Payload format version; see [`TestPush::VERSION`].
    pub version: u16,
    /// Whose devices get it.
    pub admin_id: i64,
}

impl TestPush {
    /// The payload version this build writes and understands.
    pub const VERSION: u16 = 1;

    /// A test push to admin `admin_id`'s devices.
    pub fn new(admin_id: i64) -> Self {
        Self { kind: TEST_PUSH_KIND.to_owned(), version: Self::VERSION, admin_id }
    }

    /// Refuses payloads written by a newer build.
    pub fn check_version(&self) -> Result<(), PayloadError> {
        if self.version > Self::VERSION {
            return Err(PayloadError::UnsupportedVersion { found: self.version, supported: Self::VERSION });
        }
        Ok(())
    }
}

/// The `kind` of a [`Digest`] payload.
pub const DIGEST_KIND: &str = "digest";

/// One notification for the messages of a burst, sent when its window ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Always [`DIGEST_KIND`].
    pub kind: String,
    /// Payload format version; see [`Digest::VERSION`].
    pub version: u16,
    /// Start of the window (Unix seconds, inclusive).
    pub window_start: i64,
    /// End of the window (Unix seconds, exclusive); the job runs then.
    pub window_end: i64,
}

impl Digest {
    /// The payload version this build writes and understands.
    pub const VERSION: u16 = 1;

    /// The digest of the window `[start, end)`.
    pub fn new(window_start: i64, window_end: i64) -> Self {
        Self { kind: DIGEST_KIND.to_owned(), version: Self::VERSION, window_start, window_end }
    }
}

/// Every job the fan-out queue carries, told apart by the payload's `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueuedJob {
    /// A feedback message to announce.
    FanOut(FanOut),
    /// A test notification.
    TestPush(TestPush),
    /// The notification for a burst.
    Digest(Digest),
}

impl QueuedJob {
    /// Parses a stored payload; the error text is what a dead letter records.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("malformed payload: {e}"))?;
        let job = match value.get("kind").and_then(|k| k.as_str()) {
            None => {
                let job: FanOut = serde_json::from_value(value).map_err(|e| format!("malformed payload: {e}"))?;
                job.check_version().map_err(|e| e.to_string())?;
                Self::FanOut(job)
            }
            Some(TEST_PUSH_KIND) => {
                let job: TestPush = serde_json::from_value(value).map_err(|e| format!("malformed payload: {e}"))?;
                job.check_version().map_err(|e| e.to_string())?;
                Self::TestPush(job)
            }
            Some(DIGEST_KIND) => {
                let job: Digest = serde_json::from_value(value).map_err(|e| format!("malformed payload: {e}"))?;
                if job.version > Digest::VERSION {
                    return Err(
                        PayloadError::UnsupportedVersion { found: job.version, supported: Digest::VERSION }.to_string()
                    );
                }
                Self::Digest(job)
            }
            Some(other) => return Err(format!("unknown job kind {other:?}")),
        };
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_told_apart_by_kind() {
        let fan_out = serde_json::to_vec(&FanOut::new(1, 2)).expect("json");
        assert_eq!(QueuedJob::parse(&fan_out), Ok(QueuedJob::FanOut(FanOut::new(1, 2))));
        let test = serde_json::to_vec(&TestPush::new(3)).expect("json");
        assert_eq!(QueuedJob::parse(&test), Ok(QueuedJob::TestPush(TestPush::new(3))));
        assert!(QueuedJob::parse(br#"{"kind":"nope"}"#).is_err_and(|e| e.contains("unknown job kind")));
        assert!(
            QueuedJob::parse(br#"{"version":9,"feedback_id":1,"dispatch_id":1}"#)
                .is_err_and(|e| e.contains("version 9"))
        );
        assert!(QueuedJob::parse(b"garbage").is_err_and(|e| e.starts_with("malformed payload")));
    }
}
