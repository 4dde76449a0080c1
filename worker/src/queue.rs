//! apalis wiring the stock defaults get wrong (see `docs/ARCHITECTURE.md`):
//!
//! - [`wake_strategy`]: the poll strategy. apalis-redis's interval poller can stall until
//!   the 30 s heartbeat, so workers fetch when a producer `PUBLISH`es on the wake
//!   channel, plus on a fallback timer that re-arms itself correctly (tokio's interval).
//! - [`Periodic`]: periodic work that runs once per tick across all worker processes:
//!   each tick is claimed with `SET NX PX` in Redis, so no process is special and any
//!   of them may die without stopping the schedule.
//! - [`worker_name`]: a name unique per process start, so a restarted worker never
//!   waits for its previous incarnation's registration to expire.

use std::future::Future;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis_core::backend::ext::poll_strategy::{PollSnapshot, PollStrategy};
use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

/// Delay of the second wake after each published one: a wake that lands while a fetch
/// is already in flight (and so is consumed without effect) is repeated once.
const REPEAT_WAKE_AFTER: Duration = Duration::from_millis(15);

/// A name for this worker process that no other process has used.
pub fn worker_name(queue: &str) -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "worker".into());
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{queue}-{host}-{}-{}", std::process::id(), &id[..8])
}

/// Wakes the worker's fetch loop: once per message on the wake channel (with one repeat
/// shortly after) and every `fallback` at the latest. Reconnects to Redis by itself.
pub fn wake_strategy(redis_url: &str, channel: String, fallback: Duration) -> WakeStrategy {
    let (tx, rx) = mpsc::channel::<()>(1);
    let timer_tx = tx.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(fallback);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            // A full channel already holds a pending wake: dropping this one is fine.
            if let Err(mpsc::error::TrySendError::Closed(())) = timer_tx.try_send(()) {
                return;
            }
        }
    });
    let redis_url = redis_url.to_owned();
    tokio::spawn(async move {
        loop {
            if tx.is_closed() {
                return;
            }
            if let Err(e) = forward_wakes(&redis_url, &channel, &tx).await {
                tracing::warn!(error = %e, "queue.wake_subscription_lost; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    WakeStrategy { wakes: rx }
}

/// The poll strategy [`wake_strategy`] builds.
///
/// Unlike apalis' stream strategy it drains every pending wake and always leaves its
/// waker registered, so a wake can never be consumed without arming the next one (the
/// way the stock interval poller stalls until the heartbeat).
#[derive(Debug)]
pub struct WakeStrategy {
    wakes: mpsc::Receiver<()>,
}

impl PollStrategy for WakeStrategy {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut woken = false;
        loop {
            match self.wakes.poll_recv(cx) {
                Poll::Ready(Some(())) => woken = true,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => break,
            }
        }
        if woken { Poll::Ready(Some(())) } else { Poll::Pending }
    }
}

async fn forward_wakes(redis_url: &str, channel: &str, tx: &mpsc::Sender<()>) -> redis::RedisResult<()> {
    let client = redis::Client::open(redis_url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    let mut messages = pubsub.on_message();
    while messages.next().await.is_some() {
        if tx.try_send(()).is_err() && tx.is_closed() {
            return Ok(());
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REPEAT_WAKE_AFTER).await;
            let _ = tx.try_send(());
        });
    }
    Err(redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connection closed")))
}

/// Periodic work shared by all worker processes: each tick runs in exactly one of them.
#[derive(Clone)]
pub struct Periodic {
    conn: ConnectionManager,
    namespace: String,
}

impl Periodic {
    /// Periodic work on the Redis of `conn`, keys under `namespace`.
    pub fn new(conn: ConnectionManager, namespace: &str) -> Self {
        Self { conn, namespace: namespace.to_owned() }
    }

    /// Claims tick `tick` of task `name`; true for exactly one caller per tick.
    pub async fn claim(&self, name: &str, tick: u64, every: Duration) -> redis::RedisResult<bool> {
        let key = format!("{}:tick:{name}:{tick}", self.namespace);
        let ttl = u64::try_from((every * 4).as_millis()).unwrap_or(u64::MAX).max(1000);
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(worker_pid_tag())
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            // A bounded history of who ran which tick (for `worker status` and tests).
            let runs = runs_key(&self.namespace, name);
            let _: () = redis::pipe()
                .rpush(&runs, format!("{tick} {}", std::process::id()))
                .ignore()
                .ltrim(&runs, -RUN_HISTORY, -1)
                .ignore()
                .query_async(&mut conn)
                .await?;
        }
        Ok(set.is_some())
    }

    /// The remembered runs of `name`, oldest first, as (tick, process id).
    pub async fn runs(&self, name: &str) -> redis::RedisResult<Vec<(u64, u32)>> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = conn.lrange(runs_key(&self.namespace, name), 0, -1).await?;
        Ok(raw
            .iter()
            .filter_map(|r| {
                let (tick, pid) = r.split_once(' ')?;
                Some((tick.parse().ok()?, pid.parse().ok()?))
            })
            .collect())
    }

    /// Runs `work` once per `every` (aligned to wall-clock multiples of `every`, so all
    /// processes agree on tick numbers) until `stop` resolves.
    pub async fn every<F, Fut>(self, name: &'static str, every: Duration, stop: impl Future<Output = ()>, work: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        let every = every.max(Duration::from_millis(10));
        let period_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        tokio::pin!(stop);
        loop {
            let now_ms = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis())
                .unwrap_or(u64::MAX);
            let tick = now_ms / period_ms;
            let next = (tick + 1) * period_ms;
            match self.claim(name, tick, every).await {
                Ok(true) => self.run_alone(name, tick, &work).await,
                Ok(false) => {}
                Err(e) => tracing::warn!(task = name, error = %e, "periodic.claim_failed"),
            }
            let wait = Duration::from_millis(next.saturating_sub(now_ms));
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs the work of a claimed tick unless a run of an earlier tick is still in flight
    /// (in any process): one trim, one relay pass at a time. The lock expires
    /// [`PERIODIC_LOCK_TTL`] after a process that died holding it.
    async fn run_alone<F, Fut>(&self, name: &'static str, tick: u64, work: &F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        let key = format!("periodic:{name}");
        match shared::lock::try_acquire(&self.conn, &self.namespace, &key, PERIODIC_LOCK_TTL).await {
            Ok(Some(lock)) => {
                work().await;
                if let Err(e) = lock.release().await {
                    tracing::debug!(task = name, error = %e, "periodic.unlock_failed");
                }
            }
            Ok(None) => tracing::info!(task = name, tick, "periodic.skipped_previous_run_in_flight"),
            Err(e) => tracing::warn!(task = name, error = %e, "periodic.lock_failed"),
        }
    }

    /// Number of ticks of `name` claimed and still remembered (for tests and status).
    pub async fn remembered_ticks(&self, name: &str) -> redis::RedisResult<usize> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = conn.keys(format!("{}:tick:{name}:*", self.namespace)).await?;
        Ok(keys.len())
    }
}

/// How long a periodic task's lock outlives a process that died holding it.
pub const PERIODIC_LOCK_TTL: Duration = Duration::from_secs(30);

/// Runs remembered per periodic task.
const RUN_HISTORY: isize = 1000;

/// The list of `name`'s recent runs.
pub fn runs_key(namespace: &str, name: &str) -> String {
    format!("{namespace}:periodic:{name}:runs")
}

fn worker_pid_tag() -> String {
    format!("pid-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_are_unique_per_start() {
        assert_ne!(worker_name("q"), worker_name("q"));
        assert!(worker_name("q").starts_with("q-"));
    }
}
