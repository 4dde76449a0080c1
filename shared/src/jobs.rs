//! Job payloads: what the web (and the relay) put on the Redis queue for the worker.
//!
//! Payloads carry ids, never data, so a job always acts on the current state of the
//! database and running it twice is harmless. Each payload carries a `version`; a worker
//! refuses a payload newer than it understands with [`PayloadError::UnsupportedVersion`]
//! so the job is dead-lettered instead of being half-understood.

use std::time::Duration;

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

/// The kind a [`FanOut`] is counted and retried under (its payload carries no `kind`).
pub const FAN_OUT_KIND: &str = "fan_out";

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
    /// Only these of the devices (a retry of the pushes that may still pass); all of
    /// them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<Vec<i64>>,
}

impl TestPush {
    /// The payload version this build writes and understands.
    pub const VERSION: u16 = 1;

    /// A test push to admin `admin_id`'s devices.
    pub fn new(admin_id: i64) -> Self {
        Self { kind: TEST_PUSH_KIND.to_owned(), version: Self::VERSION, admin_id, only: None }
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

/// One notification for the messages of a burst, sent shortly after its window ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Always [`DIGEST_KIND`].
    pub kind: String,
    /// Payload format version; see [`Digest::VERSION`].
    pub version: u16,
    /// Start of the window (Unix seconds, inclusive).
    pub window_start: i64,
    /// End of the window (Unix seconds, exclusive); the job runs shortly after
    /// (`queue::DIGEST_DELAY_SECS`).
    pub window_end: i64,
    /// Only these subscriptions (a retry of the pushes that may still pass); all of
    /// them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<Vec<i64>>,
    /// And every subscription after this id (a retry of a digest whose reading of the
    /// subscriptions failed part-way): with `only`, those listed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    /// The coalescing threshold the message that asked for the digest folded by, so the
    /// digest counts by the same rule whatever the settings of the worker that runs it;
    /// absent in payloads of older builds (the running worker's setting then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u64>,
}

impl Digest {
    /// The payload version this build writes for a digest without a cursor (`after`),
    /// which every build reads.
    pub const VERSION: u16 = 1;

    /// The version of a payload with a cursor, the highest this build understands: a
    /// build before it would ignore the cursor and skip the subscriptions after it, so
    /// it dead-letters such a payload instead.
    pub const VERSION_WITH_CURSOR: u16 = 2;

    /// The digest of the window `[start, end)`, whose messages fold past `threshold`.
    pub fn new(window_start: i64, window_end: i64, threshold: u64) -> Self {
        Self {
            kind: DIGEST_KIND.to_owned(),
            version: Self::VERSION,
            window_start,
            window_end,
            only: None,
            after: None,
            threshold: Some(threshold),
        }
    }
}

/// The `kind` of an [`InvalidateCache`] payload.
pub const INVALIDATE_CACHE_KIND: &str = "invalidate_cache";

/// Drop what the read cache holds about some messages (they were handled, read or
/// deleted); the web enqueues it after the change commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidateCache {
    /// Always [`INVALIDATE_CACHE_KIND`].
    pub kind: String,
    /// Payload format version; see [`InvalidateCache::VERSION`].
    pub version: u16,
    /// The messages that changed.
    pub feedback_ids: Vec<i64>,
}

impl InvalidateCache {
    /// The payload version this build writes and understands.
    pub const VERSION: u16 = 1;

    /// Invalidates what shows the messages `feedback_ids`.
    pub fn new(feedback_ids: Vec<i64>) -> Self {
        Self { kind: INVALIDATE_CACHE_KIND.to_owned(), version: Self::VERSION, feedback_ids }
    }
}

/// The `kind` of a [`TrimCaches`] payload.
pub const TRIM_CACHES_KIND: &str = "trim_caches";

/// Bring everything Tidings keeps in Redis within its budget now (the web asks for it when
/// it sees the cache past its budget; the worker also runs it once per tick).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimCaches {
    /// Always [`TRIM_CACHES_KIND`].
    pub kind: String,
    /// Payload format version; see [`TrimCaches::VERSION`].
    pub version: u16,
}

impl TrimCaches {
    /// The payload version this build writes and understands.
    pub const VERSION: u16 = 1;

    /// A trim on demand.
    pub fn new() -> Self {
        Self { kind: TRIM_CACHES_KIND.to_owned(), version: Self::VERSION }
    }
}

impl Default for TrimCaches {
    fn default() -> Self {
        Self::new()
    }
}

/// The `kind` of a [`Ping`] payload.
pub const PING_KIND: &str = "ping";

/// A job that does nothing: `worker ping` times the queue's round trip with it (and the
/// benchmark its raw throughput).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Always [`PING_KIND`].
    pub kind: String,
    /// Payload format version; see [`Ping::VERSION`].
    pub version: u16,
}

impl Ping {
    /// The payload version this build writes and understands.
    pub const VERSION: u16 = 1;

    /// A ping.
    pub fn new() -> Self {
        Self { kind: PING_KIND.to_owned(), version: Self::VERSION }
    }
}

impl Default for Ping {
    fn default() -> Self {
        Self::new()
    }
}

/// The lock a trim holds, shared by the periodic tick and the on-demand job so that two
/// trims never run at once.
pub const TRIM_LOCK: &str = "periodic:trim-caches";

/// How one kind of job is retried when it fails in a way that may pass (the database or
/// Redis unreachable, a push service answering 429/5xx): the worker enforces it, not
/// apalis-redis (whose own schedule is fixed and ignores both the limit and
/// `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Runs in all, the first included; the last failure dead-letters the job.
    pub max_attempts: u32,
    /// Delay after the first failure; it doubles with each further one (with jitter).
    pub base: Duration,
    /// Longest delay, also the most a `Retry-After` can ask for.
    pub cap: Duration,
}

impl RetryPolicy {
    /// Parses `ATTEMPTS/BASE_MS/CAP_MS`, e.g. `25/1000/600000`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let parts: Vec<&str> = raw.split('/').map(str::trim).collect();
        let [attempts, base, cap] = parts[..] else {
            return Err(format!("{raw:?} is not ATTEMPTS/BASE_MS/CAP_MS (e.g. 25/1000/600000)"));
        };
        let number = |s: &str| s.parse::<u64>().map_err(|_| format!("{s:?} in {raw:?} is not a whole number"));
        let max_attempts = u32::try_from(number(attempts)?).map_err(|_| format!("{attempts:?} is too large"))?;
        let (base, cap) = (number(base)?, number(cap)?);
        if max_attempts == 0 || base == 0 || cap < base {
            return Err(format!("{raw:?}: attempts and base must be at least 1, and the cap at least the base"));
        }
        Ok(Self { max_attempts, base: Duration::from_millis(base), cap: Duration::from_millis(cap) })
    }
}

impl std::fmt::Display for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.max_attempts, self.base.as_millis(), self.cap.as_millis())
    }
}

/// The job kinds, as metrics, logs, dead letters and settings name them.
pub const KINDS: [&str; 5] = ["fan_out", DIGEST_KIND, TEST_PUSH_KIND, INVALIDATE_CACHE_KIND, TRIM_CACHES_KIND];

/// The retry policy of `kind` unless settings say otherwise (`JOB_RETRY_<KIND>`).
///
/// A fan-out fails as a whole only when the database or Redis is unreachable (pushes are
/// retried one by one inside it), so it keeps trying for about an hour; a digest retries
/// the pushes that may still pass for a few minutes; a test notification is worth
/// little after a minute.
pub fn default_retry_policy(kind: &str) -> RetryPolicy {
    let policy = |max_attempts, base_ms, cap_ms| RetryPolicy {
        max_attempts,
        base: Duration::from_millis(base_ms),
        cap: Duration::from_millis(cap_ms),
    };
    match kind {
        TEST_PUSH_KIND => policy(3, 2_000, 30_000),
        INVALIDATE_CACHE_KIND => policy(5, 500, 10_000),
        TRIM_CACHES_KIND => policy(3, 1_000, 10_000),
        DIGEST_KIND => policy(6, 5_000, 120_000),
        _ => policy(15, 1_000, 600_000),
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
    /// Messages whose cached views must go.
    InvalidateCache(InvalidateCache),
    /// A trim of Redis on demand.
    TrimCaches(TrimCaches),
    /// Nothing to do (the queue's round trip is what is measured).
    Ping(Ping),
}

impl QueuedJob {
    /// The key of the lock this job holds while it runs, so that two copies of it (a
    /// relay re-enqueue racing the original, an orphan taken back while its first worker
    /// still drains) never run at the same time. `None`: copies may overlap.
    pub fn unique_key(&self) -> Option<String> {
        match self {
            Self::FanOut(job) => Some(format!("job:fan_out:{}", job.feedback_id)),
            Self::Digest(job) => Some(format!("job:digest:{}:{}", job.window_start, job.window_end)),
            Self::TrimCaches(_) => Some(TRIM_LOCK.to_owned()),
            Self::TestPush(_) | Self::InvalidateCache(_) | Self::Ping(_) => None,
        }
    }

    /// The kind, as in [`KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Self::FanOut(_) => FAN_OUT_KIND,
            Self::TestPush(_) => TEST_PUSH_KIND,
            Self::Digest(_) => DIGEST_KIND,
            Self::InvalidateCache(_) => INVALIDATE_CACHE_KIND,
            Self::TrimCaches(_) => TRIM_CACHES_KIND,
            Self::Ping(_) => PING_KIND,
        }
    }

    /// The dispatch record of a stored fan-out payload; `None` for other kinds and for
    /// payloads that do not parse.
    pub fn dispatch_of(bytes: &[u8]) -> Option<i64> {
        match Self::parse(bytes) {
            Ok(Self::FanOut(job)) => Some(job.dispatch_id),
            _ => None,
        }
    }

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
                check_version(job.version, Digest::VERSION_WITH_CURSOR)?;
                Self::Digest(job)
            }
            Some(INVALIDATE_CACHE_KIND) => {
                let job: InvalidateCache =
                    serde_json::from_value(value).map_err(|e| format!("malformed payload: {e}"))?;
                check_version(job.version, InvalidateCache::VERSION)?;
                Self::InvalidateCache(job)
            }
            Some(TRIM_CACHES_KIND) => {
                let job: TrimCaches = serde_json::from_value(value).map_err(|e| format!("malformed payload: {e}"))?;
                check_version(job.version, TrimCaches::VERSION)?;
                Self::TrimCaches(job)
            }
            Some(PING_KIND) => {
                let job: Ping = serde_json::from_value(value).map_err(|e| format!("malformed payload: {e}"))?;
                check_version(job.version, Ping::VERSION)?;
                Self::Ping(job)
            }
            Some(other) => return Err(format!("unknown job kind {other:?}")),
        };
        Ok(job)
    }
}

/// Refuses a payload version newer than `supported`, with the dead letter's reason.
fn check_version(found: u16, supported: u16) -> Result<(), String> {
    if found > supported {
        return Err(PayloadError::UnsupportedVersion { found, supported }.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policies_parse_and_refuse_nonsense() {
        let policy = RetryPolicy::parse("5/250/10000").expect("valid");
        assert_eq!(policy.max_attempts, 5);
        assert_eq!(policy.base, Duration::from_millis(250));
        assert_eq!(policy.to_string(), "5/250/10000");
        for bad in ["5", "0/1/1", "5/0/1", "5/100/10", "a/1/1", "1/2/3/4"] {
            assert!(RetryPolicy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_digest_carries_its_threshold_and_reads_a_payload_without_one() {
        let digest = Digest::new(60, 120, 6);
        let json = serde_json::to_vec(&digest).expect("json");
        assert_eq!(QueuedJob::parse(&json), Ok(QueuedJob::Digest(digest)));
        // As an older build wrote it: the worker's own setting applies.
        let older = br#"{"kind":"digest","version":1,"window_start":60,"window_end":120}"#;
        let Ok(QueuedJob::Digest(parsed)) = QueuedJob::parse(older) else { panic!("a digest") };
        assert_eq!((parsed.window_end, parsed.threshold, parsed.only, parsed.after), (120, None, None, None));
        // With a cursor: version 2, which this build reads and a build before it refuses.
        let cursor = br#"{"kind":"digest","version":2,"window_start":60,"window_end":120,"after":40}"#;
        let Ok(QueuedJob::Digest(parsed)) = QueuedJob::parse(cursor) else { panic!("a digest") };
        assert_eq!(parsed.after, Some(40));
        assert!(QueuedJob::parse(br#"{"kind":"digest","version":3,"window_start":60,"window_end":120}"#).is_err());
    }

    #[test]
    fn payloads_are_told_apart_by_kind() {
        let fan_out = serde_json::to_vec(&FanOut::new(1, 2)).expect("json");
        assert_eq!(QueuedJob::parse(&fan_out), Ok(QueuedJob::FanOut(FanOut::new(1, 2))));
        let test = serde_json::to_vec(&TestPush::new(3)).expect("json");
        assert_eq!(QueuedJob::parse(&test), Ok(QueuedJob::TestPush(TestPush::new(3))));
        let invalidate = serde_json::to_vec(&InvalidateCache::new(vec![4, 5])).expect("json");
        assert_eq!(QueuedJob::parse(&invalidate), Ok(QueuedJob::InvalidateCache(InvalidateCache::new(vec![4, 5]))));
        let trim = serde_json::to_vec(&TrimCaches::new()).expect("json");
        assert_eq!(QueuedJob::parse(&trim), Ok(QueuedJob::TrimCaches(TrimCaches::new())));
        assert!(QueuedJob::parse(br#"{"kind":"trim_caches","version":7}"#).is_err_and(|e| e.contains("version 7")));
        assert!(QueuedJob::parse(br#"{"kind":"nope"}"#).is_err_and(|e| e.contains("unknown job kind")));
        assert!(
            QueuedJob::parse(br#"{"version":9,"feedback_id":1,"dispatch_id":1}"#)
                .is_err_and(|e| e.contains("version 9"))
        );
        assert!(QueuedJob::parse(b"garbage").is_err_and(|e| e.starts_with("malformed payload")));
    }
}
