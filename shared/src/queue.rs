//! The Redis job queue, as both binaries see it.
//!
//! apalis-redis is the engine; this module fixes what its defaults get wrong for us
//! (see `docs/ARCHITECTURE.md`):
//!
//! - **Wake on push.** After every push the producer `PUBLISH`es on the namespace's wake
//!   channel; workers subscribe to it and fetch at once, with a slow fallback timer
//!   (`QUEUE_POLL_MS`) in case a message is missed.
//! - **Payloads never crash a worker.** Jobs travel as raw bytes ([`RawJob`]) through a
//!   codec that cannot fail ([`RawCodec`]); the handler parses them and dead-letters what
//!   it can't read, so a malformed payload can't kill the worker's fetch loop.
//! - **Results are acknowledged** (`persist_results(true)`): without it apalis-redis
//!   never acks a job, so it stays in its worker's in-flight set forever and would be
//!   re-run when that worker's registration expires. Finished records are then trimmed
//!   by the worker's trim task.
//! - **No task-locking `LREM` per job** (`lock_tasks(false)`): every job is idempotent
//!   against the database, which is what guards against double work.
//! - **Idempotency keys on**: a dispatch record is enqueued at most once per enqueue
//!   attempt, so a relay racing the web can't pile up copies.

use std::convert::Infallible;
use std::time::Duration;

use apalis_core::backend::codec::Codec;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::metadata::MetadataStore;
use apalis_core::task::task_id::TaskId;
use apalis_redis::{Config, ConnectionManager};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::jobs::{Digest, FAN_OUT_QUEUE, FanOut, TestPush};

/// How long pushes may take before a submission stops waiting for Redis.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The attempt limit recorded in apalis' metadata of a job. The worker enforces the
/// limits of [`crate::jobs::RetryPolicy`] itself and never hands a failure to apalis, whose
/// own retry schedule is fixed; this number only shows in apalis' records.
pub const JOB_MAX_ATTEMPTS: usize = 25;

/// Metadata Tidings keeps with a job (in apalis-redis's metadata hash, beside its own
/// `attempts` and `status`); the worker's handler reads it back.
pub mod meta {
    /// The id of the web request that enqueued the job (its `X-Request-Id`); job spans
    /// carry it, so a job's logs can be joined to the request's.
    pub const REQUEST_ID: &str = "request_id";
    /// When the job became due (milliseconds since the epoch): its queue wait is measured
    /// from here.
    pub const DUE_AT_MS: &str = "due_at_ms";
    /// The id of the first run of a job that is retried (each retry is a new task).
    pub const FIRST_ID: &str = "first_id";
}

/// The metadata of a new job: due at `due_at_ms`, enqueued by request `request_id`.
fn job_metadata(request_id: Option<&str>, due_at_ms: i64) -> MetadataStore {
    let mut metadata = MetadataStore::new();
    metadata.replace(meta::DUE_AT_MS, due_at_ms.to_string());
    if let Some(id) = request_id {
        metadata.replace(meta::REQUEST_ID, id);
    }
    metadata
}

/// A task for `payload`, due now, with its metadata.
fn new_task(payload: Vec<u8>, request_id: Option<&str>) -> TaskBuilder<Vec<u8>> {
    task_due_at(payload, request_id, chrono::Utc::now().timestamp_millis())
}

/// A task for `payload` with its metadata, due at `due_at_ms` (the caller schedules it
/// for then when that is later than now).
fn task_due_at(payload: Vec<u8>, request_id: Option<&str>, due_at_ms: i64) -> TaskBuilder<Vec<u8>> {
    TaskBuilder::new(payload).max_attempts(JOB_MAX_ATTEMPTS).with_metadata(job_metadata(request_id, due_at_ms))
}

/// Why the queue could not take a job.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// apalis-redis failed to push.
    #[error("queue: {0}")]
    Backend(#[from] apalis_redis::Error),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The payload could not be encoded.
    #[error("payload: {0}")]
    Encode(#[from] serde_json::Error),
    /// The database refused what goes with the job (a fan-out's dispatch record).
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

/// How long a queued trim request blocks the next one if its job never starts.
pub const TRIM_REQUEST_TTL: Duration = Duration::from_secs(60);

/// How long after its window ends a digest runs, so that it counts every message of its
/// window: on PostgreSQL a message's creation time is taken before its statement waits
/// for a database connection (at most 3 s), on SQLite before it waits for the write lock
/// (at most 5 s), so one created just before the end may commit that much later.
pub const DIGEST_DELAY_SECS: i64 = 10;

/// How a digest's idempotency key starts (`digest-{start}-{end}`). It is what makes a
/// window's digest run once however many of its messages fold, so it is kept until it
/// expires: no budget removes it early (one a window, a day's windows at most).
pub const DIGEST_KEY_PREFIX: &str = "digest-";

/// How long the mark of a window's digest having read its messages is kept
/// ([`JobQueue::mark_digest_read`]) from when it is set: as long as a digest's
/// idempotency key lives, so it outlasts the window's key (set when the first message
/// folded, before the digest ran). Past both, a late message of the window would schedule
/// a new digest.
pub const DIGEST_READ_TTL: Duration = Duration::from_secs(24 * 3600);

fn digest_read_key(namespace: &str, job: &Digest) -> String {
    format!("{namespace}:digest-read:{}-{}", job.window_start, job.window_end)
}

/// The key that marks a [`crate::jobs::TrimCaches`] job as queued.
pub fn trim_request_key(namespace: &str) -> String {
    format!("{namespace}:trim-caches:queued")
}

/// A job's payload exactly as stored in Redis; parsed by the handler, not the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawJob(pub Vec<u8>);

impl RawJob {
    /// Parses the payload; the error text is what a dead letter records.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }
}

/// A codec that hands the stored bytes to the handler untouched, so decoding never fails
/// inside apalis (where a failure would stop the worker).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec<RawJob> for RawCodec {
    type Error = Infallible;
    type Compact = Vec<u8>;

    fn encode(&self, val: &RawJob) -> Result<Vec<u8>, Infallible> {
        Ok(val.0.clone())
    }

    fn decode(&self, val: &Vec<u8>) -> Result<RawJob, Infallible> {
        Ok(RawJob(val.clone()))
    }
}

/// The apalis-redis configuration of `queue` inside `namespace`.
pub fn config_for_queue(namespace: &str, queue: &str) -> Config {
    Config::default()
        .queue(format!("{namespace}:{queue}"))
        .lock_tasks(false)
        .idempotency_ttl(Some(Duration::from_secs(24 * 3600)))
        .persist_results(true)
        .emit_events(false)
}

/// The pub/sub channel producers publish on after each push.
pub fn wake_channel(namespace: &str) -> String {
    format!("{namespace}:wake")
}

/// The Redis hash dead letters are kept in (id → letter as JSON).
pub fn dead_letter_hash(namespace: &str) -> String {
    format!("{namespace}:dead-letters")
}

/// The sorted set ordering dead letters by time (score: milliseconds since the epoch).
pub fn dead_letter_index(namespace: &str) -> String {
    format!("{namespace}:dead-letters:by-time")
}

/// Dead letters kept at most; the oldest go first (Redis memory stays bounded).
pub const MAX_DEAD_LETTERS: u64 = 10_000;

/// The sorted set, outside every namespace, where apalis-redis registers each queue it
/// serves (one member per queue, named after its namespace). A deployment keeps one
/// namespace, so it holds a few members; whoever removes a namespace removes its members.
pub const APALIS_QUEUES_LIST: &str = "core:apalis:queues:list";

/// The command that removes `namespace`'s queues from [`APALIS_QUEUES_LIST`] (for a
/// namespace being removed); it answers how many it removed.
pub fn forget_queues_of(namespace: &str) -> redis::Cmd {
    const FORGET: &str = r"
local n = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.find(m, ARGV[1], 1, true) then redis.call('ZREM', KEYS[1], m); n = n + 1 end
end
return n
";
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(FORGET).arg(1).arg(APALIS_QUEUES_LIST).arg(namespace);
    cmd
}

/// A dead letter: a job the worker will not run, kept for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Identifies the letter for `worker dead retry|discard`.
    #[serde(default)]
    pub id: String,
    /// The queue the job came from.
    pub queue: String,
    /// The stored payload, lossily decoded as text.
    pub payload: String,
    /// Why it was not run.
    pub error: String,
    /// Attempt number when it was given up.
    pub attempt: usize,
    /// When it was given up (RFC 3339).
    pub at: String,
}

/// Runs a job in the caller instead of queueing it: the in-process mode tests use
/// (implemented by the worker's `Immediate`). `Err` carries the job's failure.
pub trait JobRunner: Send + Sync {
    /// Runs the job `payload` describes and returns when it is done.
    fn run_now<'a>(
        &'a self,
        payload: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;
}

/// A job waiting in Redis, as `worker jobs list` and the Queues page show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingJob {
    /// Task id (what `worker jobs cancel` takes).
    pub id: String,
    /// When it runs (Unix seconds); 0 or the past means it is due.
    pub run_at: i64,
    /// The job's kind, or `unreadable`.
    pub kind: &'static str,
    /// The payload, lossily decoded as text.
    pub payload: String,
    /// Runs that failed before: its next run is attempt `failed_attempts + 1`.
    pub failed_attempts: usize,
    /// The request that enqueued it, when one did.
    pub request_id: Option<String>,
}

/// Redis as a job queue: push jobs and wake the workers.
#[derive(Clone)]
pub struct JobQueue {
    conn: ConnectionManager,
    namespace: String,
    fan_out: Config,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

impl JobQueue {
    /// Connects to `redis_url`, giving up after [`CONNECT_TIMEOUT`].
    pub async fn connect(redis_url: &str, namespace: &str) -> Result<Self, QueueError> {
        let client = redis::Client::open(redis_url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| QueueError::Timeout(CONNECT_TIMEOUT))??;
        Ok(Self { conn, namespace: namespace.to_owned(), fan_out: config_for_queue(namespace, FAN_OUT_QUEUE) })
    }

    /// The key namespace every key of this queue lives under.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The apalis-redis configuration of the fan-out queue.
    pub fn fan_out_config(&self) -> &Config {
        &self.fan_out
    }

    /// A connection sharing this queue's multiplexed link.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Puts a fan-out job on the queue and wakes a worker.
    ///
    /// The idempotency key is the dispatch record and its enqueue count, so the same
    /// enqueue attempt retried lands once, while a deliberate re-enqueue (relay of a lost
    /// job) is accepted.
    pub async fn enqueue_fan_out(
        &self,
        job: FanOut,
        enqueue_count: i32,
        request_id: Option<&str>,
    ) -> Result<(), QueueError> {
        let payload = serde_json::to_vec(&job)?;
        let task = new_task(payload, request_id)
            .idempotency_key(format!("dispatch-{}-{}", job.dispatch_id, enqueue_count))
            .build();
        self.push_and_wake(task).await
    }

    /// Puts many fan-out jobs on the queue in one script call and wakes the workers:
    /// each with its enqueue count and the id of the request that asked for it. Returns
    /// the backlog right after (read with the wake, in the same round trip).
    pub async fn enqueue_fan_outs(&self, jobs: &[(FanOut, i32, Option<String>)]) -> Result<u64, QueueError> {
        if jobs.is_empty() {
            return self.backlog().await;
        }
        let mut tasks = Vec::with_capacity(jobs.len());
        for (job, enqueue_count, request_id) in jobs {
            tasks.push(
                new_task(serde_json::to_vec(job)?, request_id.as_deref())
                    .idempotency_key(format!("dispatch-{}-{}", job.dispatch_id, enqueue_count))
                    .build(),
            );
        }
        self.push_and_wake_all(&tasks).await
    }

    /// Jobs Redis holds that are waiting to run: due or scheduled, and pending.
    pub async fn backlog(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let (scheduled, active): (u64, u64) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            redis::pipe()
                .zcard(self.fan_out.scheduled_jobs_set())
                .llen(self.fan_out.active_jobs_list())
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| QueueError::Timeout(CONNECT_TIMEOUT))??;
        Ok(scheduled + active)
    }

    /// The set of jobs registered worker `name` holds (apalis-redis's in-flight set).
    pub fn inflight_set_of(&self, name: &str) -> String {
        format!("{}:{name}", self.fan_out.inflight_jobs_set())
    }

    /// Jobs in the hands of workers now, running or fetched and about to start: the sum
    /// of the in-flight sets of the registered workers.
    pub async fn running(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let names: Vec<String> = conn.zrange(self.fan_out.workers_set(), 0, -1).await?;
        if names.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.scard(self.inflight_set_of(name));
        }
        let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(counts.iter().sum())
    }

    /// Schedules the digest of `job`'s window to run [`DIGEST_DELAY_SECS`] after the window
    /// ends, once however many messages of the burst ask for it (the idempotency key is
    /// the window).
    pub async fn schedule_digest(&self, job: &Digest, request_id: Option<&str>) -> Result<(), QueueError> {
        let payload = serde_json::to_vec(job)?;
        let due = job.window_end.saturating_add(DIGEST_DELAY_SECS);
        let run_at = u64::try_from(due).unwrap_or(0);
        let task = task_due_at(payload, request_id, due.saturating_mul(1000))
            .idempotency_key(format!("{DIGEST_KEY_PREFIX}{}-{}", job.window_start, job.window_end))
            .run_at_timestamp(run_at)
            .build();
        self.push_and_wake(task).await
    }

    /// Marks `job`'s window as read by its digest: the digest has counted the window's
    /// messages and completed their dispatch records. A message of the window that folds
    /// after this (its statement committed late) was not counted, and goes out alone
    /// ([`Self::digest_has_read`]). One key a window with a digest, expiring after
    /// [`DIGEST_READ_TTL`].
    pub async fn mark_digest_read(&self, job: &Digest) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let ttl = DIGEST_READ_TTL.as_secs();
        let _: () = conn.set_ex(digest_read_key(&self.namespace, job), 1, ttl).await?;
        Ok(())
    }

    /// Whether the digest of `job`'s window has read its messages.
    pub async fn digest_has_read(&self, job: &Digest) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(digest_read_key(&self.namespace, job)).await?)
    }

    /// Puts a test-notification job on the queue and wakes a worker.
    pub async fn enqueue_test_push(&self, job: &TestPush, request_id: Option<&str>) -> Result<(), QueueError> {
        self.enqueue(serde_json::to_vec(job)?, request_id).await
    }

    /// Puts the job `payload` (any kind) on the queue, due now, and wakes a worker.
    pub async fn enqueue(&self, payload: Vec<u8>, request_id: Option<&str>) -> Result<(), QueueError> {
        self.push_and_wake(new_task(payload, request_id).build()).await
    }

    /// Puts each of `payloads` on the queue, due now, in one script call, and wakes the
    /// workers; returns the tasks' ids.
    pub async fn enqueue_many(&self, payloads: Vec<Vec<u8>>) -> Result<Vec<String>, QueueError> {
        let mut ids = Vec::with_capacity(payloads.len());
        let tasks: Vec<_> = payloads
            .into_iter()
            .map(|payload| {
                let id = ulid::Ulid::generate();
                ids.push(id.to_string());
                new_task(payload, None).task_id(TaskId::from_ulid(id)).build()
            })
            .collect();
        self.push_and_wake_all(&tasks).await?;
        Ok(ids)
    }

    /// Whether task `id` finished (its id is in the queue's done set).
    pub async fn is_done(&self, id: &str) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.sismember(self.fan_out.done_jobs_set(), id).await?)
    }

    /// Jobs finished and still remembered (the done set; the trim keeps it bounded).
    pub async fn done_count(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.scard(self.fan_out.done_jobs_set()).await?)
    }

    /// Queues a [`crate::jobs::TrimCaches`] job unless one is queued already (at most
    /// one waits at a time, however many processes see a budget exceeded); true when
    /// this call queued it. The job clears the mark when it starts; the mark also
    /// expires after [`TRIM_REQUEST_TTL`] should the job be lost.
    pub async fn request_trim(&self, request_id: Option<&str>) -> Result<bool, QueueError> {
        let key = trim_request_key(&self.namespace);
        let mut conn = self.conn.clone();
        let ttl_ms = u64::try_from(TRIM_REQUEST_TTL.as_millis()).unwrap_or(u64::MAX);
        let marked: Option<String> =
            redis::cmd("SET").arg(&key).arg(1).arg("NX").arg("PX").arg(ttl_ms).query_async(&mut conn).await?;
        if marked.is_none() {
            return Ok(false);
        }
        if let Err(e) = self.enqueue(serde_json::to_vec(&crate::jobs::TrimCaches::new())?, request_id).await {
            let _: Result<(), _> = conn.del(&key).await;
            return Err(e);
        }
        Ok(true)
    }

    /// Schedules the next attempt of a failed job, `delay` from now, as a new task that
    /// keeps the failed one's request id and first id; returns the new task's id.
    ///
    /// `attempts` is how many runs failed so far: the next run sees `attempts + 1`.
    pub async fn schedule_retry(
        &self,
        payload: Vec<u8>,
        attempts: usize,
        delay: Duration,
        failed_id: &str,
        failed_meta: &MetadataStore,
    ) -> Result<String, QueueError> {
        let due = chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::seconds(1));
        // apalis-redis schedules in whole seconds: round up, so a Retry-After is honoured.
        let due_secs = due.timestamp() + i64::from(due.timestamp_subsec_millis() > 0);
        let mut metadata = job_metadata(failed_meta.get(meta::REQUEST_ID), due_secs * 1000);
        metadata.replace(meta::FIRST_ID, failed_meta.get(meta::FIRST_ID).unwrap_or(failed_id));
        let id = ulid::Ulid::generate();
        let task = task_due_at(payload, None, 0)
            .with_metadata(metadata)
            .task_id(TaskId::from_ulid(id))
            .attempt(attempts)
            .run_at_timestamp(u64::try_from(due_secs).unwrap_or(0))
            .build();
        self.push_and_wake(task).await?;
        Ok(id.to_string())
    }

    async fn push_and_wake(&self, task: apalis_redis::RedisTask) -> Result<(), QueueError> {
        self.push_and_wake_all(std::slice::from_ref(&task)).await.map(|_| ())
    }

    /// Pushes `tasks`, wakes the workers and reads the backlog, all in one round trip;
    /// returns the backlog.
    ///
    /// The push script and the pipeline after it go out back to back on the one
    /// multiplexed connection (polled in that order), so Redis runs them in that order:
    /// the wake follows the push and the backlog counts it. Should the wake ever come
    /// first (Redis had to load the script again, or the connection was being
    /// re-established), the worker's repeated wake fetches the job 15 ms later.
    async fn push_and_wake_all(&self, tasks: &[apalis_redis::RedisTask]) -> Result<u64, QueueError> {
        let (mut conn, mut then) = (self.conn.clone(), self.conn.clone());
        let mut wake_and_count = redis::pipe();
        wake_and_count
            .publish(wake_channel(&self.namespace), FAN_OUT_QUEUE)
            .ignore()
            .zcard(self.fan_out.scheduled_jobs_set())
            .llen(self.fan_out.active_jobs_list());
        let both = async {
            let (pushed, counted) = tokio::join!(
                biased;
                apalis_redis::queries::push_tasks(&mut conn, &self.fan_out, tasks),
                wake_and_count.query_async::<(u64, u64)>(&mut then)
            );
            pushed?;
            let (scheduled, active) = counted?;
            Ok::<_, QueueError>(scheduled + active)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, both).await.map_err(|_| QueueError::Timeout(CONNECT_TIMEOUT))?
    }

    /// Stores a dead letter for an operator to inspect; returns its id.
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<String, QueueError> {
        let mut letter = letter.clone();
        if letter.id.is_empty() {
            letter.id = uuid::Uuid::now_v7().simple().to_string();
        }
        let score = chrono::Utc::now().timestamp_millis();
        let mut conn = self.conn.clone();
        let (hash, index) = (dead_letter_hash(&self.namespace), dead_letter_index(&self.namespace));
        let _: () = redis::pipe()
            .atomic()
            .hset(&hash, &letter.id, serde_json::to_string(&letter)?)
            .ignore()
            .zadd(&index, &letter.id, score)
            .ignore()
            .query_async(&mut conn)
            .await?;
        // Keep the newest MAX_DEAD_LETTERS.
        let count: u64 = conn.zcard(&index).await?;
        if count > MAX_DEAD_LETTERS {
            let excess = isize::try_from(count - MAX_DEAD_LETTERS).unwrap_or(isize::MAX);
            let oldest: Vec<String> = conn.zrange(&index, 0, excess - 1).await?;
            if !oldest.is_empty() {
                let _: () = redis::pipe()
                    .zrem(&index, &oldest)
                    .ignore()
                    .hdel(&hash, &oldest)
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
            }
        }
        Ok(letter.id)
    }

    /// The stored dead letters, newest first, at most `limit`.
    pub async fn dead_letters(&self, limit: isize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.zrevrange(dead_letter_index(&self.namespace), 0, limit - 1).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> =
            redis::cmd("HMGET").arg(dead_letter_hash(&self.namespace)).arg(&ids).query_async(&mut conn).await?;
        Ok(raw.iter().flatten().filter_map(|r| serde_json::from_str(r).ok()).collect())
    }

    /// Number of stored dead letters.
    pub async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.zcard(dead_letter_index(&self.namespace)).await?)
    }

    /// Deletes dead letter `id`; false if there is none.
    pub async fn discard_dead_letter(&self, id: &str) -> Result<bool, QueueError> {
        Ok(self.discard_dead_letters(&[id]).await? > 0)
    }

    /// Deletes the dead letters `ids` in one round trip; returns how many there were.
    async fn discard_dead_letters(&self, ids: &[&str]) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let (removed, _): (u64, u64) = redis::pipe()
            .atomic()
            .hdel(dead_letter_hash(&self.namespace), ids)
            .zrem(dead_letter_index(&self.namespace), ids)
            .query_async(&mut conn)
            .await?;
        Ok(removed)
    }

    /// Puts dead letter `id`'s payload back on the queue as a new job and deletes the
    /// letter; false if there is none.
    ///
    /// A fan-out's dispatch record, completed when its job was dead-lettered (so that the
    /// relay does not run it again behind the dead letter), is opened again in `db` first:
    /// a run that found it completed with nothing sent would take the message for one a
    /// digest announced. Should the push fail after that, the relay enqueues the record
    /// once it looks lost.
    pub async fn retry_dead_letter<C: sea_orm::ConnectionTrait>(&self, db: &C, id: &str) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.hget(dead_letter_hash(&self.namespace), id).await?;
        let Some(letter) = raw.and_then(|r| serde_json::from_str::<DeadLetter>(&r).ok()) else {
            return Ok(false);
        };
        if let Some(dispatch_id) = crate::jobs::QueuedJob::dispatch_of(letter.payload.as_bytes()) {
            crate::queries::dispatch::reopen(db, dispatch_id).await?;
        }
        self.push_and_wake(new_task(letter.payload.into_bytes(), None).build()).await?;
        self.discard_dead_letter(id).await
    }

    /// The ids of every stored dead letter, oldest first.
    pub async fn dead_letter_ids(&self) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.zrange(dead_letter_index(&self.namespace), 0, -1).await?)
    }

    /// Deletes every dead letter stored when it is called, in one round trip; letters
    /// stored meanwhile stay. Returns how many were deleted.
    pub async fn discard_all_dead_letters(&self) -> Result<u64, QueueError> {
        let ids = self.dead_letter_ids().await?;
        if ids.is_empty() {
            return Ok(0);
        }
        self.discard_dead_letters(&ids.iter().map(String::as_str).collect::<Vec<_>>()).await
    }

    /// Jobs waiting to run (due and pending first, then scheduled ones soonest first), at
    /// most `limit`.
    pub async fn waiting_jobs(&self, limit: isize) -> Result<Vec<WaitingJob>, QueueError> {
        type AttemptsAndRequest = (Option<usize>, Option<String>);
        let mut conn = self.conn.clone();
        let scheduled: Vec<(String, f64)> =
            conn.zrange_withscores(self.fan_out.scheduled_jobs_set(), 0, limit - 1).await?;
        let pending: Vec<String> = conn.lrange(self.fan_out.active_jobs_list(), 0, limit - 1).await?;
        let mut jobs: Vec<(String, i64)> = pending.into_iter().map(|id| (id, 0)).collect();
        jobs.extend(scheduled.into_iter().map(|(id, at)| (id, at as i64)));
        jobs.truncate(usize::try_from(limit).unwrap_or(0));
        // Payload, attempts and request id of every job in one round trip.
        let mut pipe = redis::pipe();
        for (id, _) in &jobs {
            pipe.hget(self.fan_out.job_data_hash(), id)
                .cmd("HMGET")
                .arg(format!("{}:{id}", self.fan_out.job_meta_hash()))
                .arg("attempts")
                .arg(meta::REQUEST_ID);
        }
        let details: Vec<(Option<Vec<u8>>, AttemptsAndRequest)> =
            if jobs.is_empty() { Vec::new() } else { pipe.query_async(&mut conn).await? };
        let mut out = Vec::with_capacity(jobs.len());
        for ((id, run_at), (payload, (attempts, request_id))) in jobs.into_iter().zip(details) {
            let payload = String::from_utf8_lossy(&payload.unwrap_or_default()).into_owned();
            let kind = crate::jobs::QueuedJob::parse(payload.as_bytes()).map_or("unreadable", |j| j.kind());
            out.push(WaitingJob { id, run_at, kind, payload, failed_attempts: attempts.unwrap_or(0), request_id });
        }
        Ok(out)
    }

    /// Revokes waiting job `id` (scheduled or pending): it will not run. Returns its
    /// payload, or `None` when no such job waits (it already ran, runs now, or never
    /// existed). A fan-out's dispatch record is the caller's to complete.
    pub async fn cancel(&self, id: &str) -> Result<Option<Vec<u8>>, QueueError> {
        let mut conn = self.conn.clone();
        let payload: Option<Vec<u8>> = conn.hget(self.fan_out.job_data_hash(), id).await?;
        let (from_scheduled, from_pending): (u64, u64) = redis::pipe()
            .atomic()
            .zrem(self.fan_out.scheduled_jobs_set(), id)
            .lrem(self.fan_out.active_jobs_list(), 0, id)
            .query_async(&mut conn)
            .await?;
        if from_scheduled + from_pending == 0 {
            return Ok(None);
        }
        let _: () = redis::pipe()
            .hdel(self.fan_out.job_data_hash(), id)
            .ignore()
            .del(format!("{}:{id}", self.fan_out.job_meta_hash()))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(Some(payload.unwrap_or_default()))
    }

    /// `PING`: is Redis answering?
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        tokio::time::timeout(CONNECT_TIMEOUT, redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map_err(|_| QueueError::Timeout(CONNECT_TIMEOUT))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codec_never_fails_and_round_trips() {
        let garbage = vec![0xff, 0x00, b'{'];
        let job = RawCodec.decode(&garbage).expect("infallible");
        assert_eq!(RawCodec.encode(&job).expect("infallible"), garbage);
        assert!(job.parse::<FanOut>().is_err());
    }

    #[test]
    fn keys_live_under_the_namespace() {
        assert_eq!(wake_channel("t1"), "t1:wake");
        assert_eq!(dead_letter_hash("t1"), "t1:dead-letters");
        assert_eq!(dead_letter_index("t1"), "t1:dead-letters:by-time");
        assert!(config_for_queue("t1", FAN_OUT_QUEUE).scheduled_jobs_set().contains("t1:"));
    }
}
