//! Locks in Redis: a key held by at most one owner at a time, across processes.
//!
//! A lock is `SET {ns}:lock:{name} TOKEN NX PX ttl`. Its guard renews it every third of
//! the TTL while the owner lives, and releases it (only if it still holds it) when the
//! work ends. An owner that dies — `kill -9`, a lost machine — stops renewing, so its
//! lock expires after at most the TTL and the work can run elsewhere.

use std::time::Duration;

use redis::aio::ConnectionManager;

/// Deletes the key only if it still holds our token.
const RELEASE: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Extends the key's TTL only if it still holds our token.
const RENEW: &str =
    r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0";

/// The Redis key of lock `name`.
pub fn lock_key(namespace: &str, name: &str) -> String {
    format!("{namespace}:lock:{name}")
}

/// A held lock. Dropping it stops the renewal and releases the lock in the background;
/// [`LockGuard::release`] does so and waits.
#[derive(Debug)]
pub struct LockGuard {
    conn: ConnectionManager,
    key: String,
    token: String,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

/// Takes lock `name` for `ttl` unless someone holds it; `None` when they do.
pub async fn try_acquire(
    conn: &ConnectionManager,
    namespace: &str,
    name: &str,
    ttl: Duration,
) -> redis::RedisResult<Option<LockGuard>> {
    let (key, token, ttl_ms) = attempt(namespace, name, ttl);
    let mut conn = conn.clone();
    let set: Option<String> =
        redis::cmd("SET").arg(&key).arg(&token).arg("NX").arg("PX").arg(ttl_ms).query_async(&mut conn).await?;
    Ok(set.map(|_| held(conn, key, token, ttl_ms)))
}

/// The key, a fresh token and the TTL in milliseconds of an attempt to take `name`.
fn attempt(namespace: &str, name: &str, ttl: Duration) -> (String, String, u64) {
    let token = uuid::Uuid::new_v4().simple().to_string();
    (lock_key(namespace, name), token, u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(100))
}

/// The guard of a lock just taken, renewing it.
fn held(conn: ConnectionManager, key: String, token: String, ttl_ms: u64) -> LockGuard {
    let renewer = tokio::spawn(renew(conn.clone(), key.clone(), token.clone(), ttl_ms));
    LockGuard { conn, key, token, renewer: Some(renewer) }
}

/// As [`try_acquire`], sending the commands `also` adds in the same round trip (after
/// the attempt, whether or not it succeeds); `T` decodes the one reply they leave (mark
/// the others ignored).
pub async fn try_acquire_with<T: redis::FromRedisValue>(
    conn: &ConnectionManager,
    namespace: &str,
    name: &str,
    ttl: Duration,
    also: impl FnOnce(&mut redis::Pipeline),
) -> redis::RedisResult<(Option<LockGuard>, T)> {
    let (key, token, ttl_ms) = attempt(namespace, name, ttl);
    let mut conn = conn.clone();
    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg(&key).arg(&token).arg("NX").arg("PX").arg(ttl_ms);
    also(&mut pipe);
    let (set, more): (Option<String>, T) = pipe.query_async(&mut conn).await?;
    Ok((set.map(|_| held(conn, key, token, ttl_ms)), more))
}

/// Keeps the lock alive every third of its TTL until aborted or the lock is lost.
async fn renew(mut conn: ConnectionManager, key: String, token: String, ttl_ms: u64) {
    let every = Duration::from_millis((ttl_ms / 3).max(30));
    loop {
        tokio::time::sleep(every).await;
        let renewed: redis::RedisResult<i64> =
            redis::Script::new(RENEW).key(&key).arg(&token).arg(ttl_ms).invoke_async(&mut conn).await;
        match renewed {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(lock = %key, "lock.lost");
                return;
            }
            // Redis briefly unreachable: try again next time; the TTL covers the gap.
            Err(e) => tracing::debug!(lock = %key, error = %e, "lock.renew_failed"),
        }
    }
}

impl LockGuard {
    /// Releases the lock now; false if it had expired or been taken over meanwhile.
    pub async fn release(mut self) -> redis::RedisResult<bool> {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        let released: i64 =
            redis::Script::new(RELEASE).key(&self.key).arg(&self.token).invoke_async(&mut self.conn).await?;
        Ok(released == 1)
    }
}

impl LockGuard {
    /// Adds the release to `pipe`, to go with other commands in one round trip; the
    /// lock is no longer renewed. The caller sends `pipe` (if it never does, the lock
    /// expires after its TTL).
    pub fn release_in(mut self, pipe: &mut redis::Pipeline) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        pipe.cmd("EVAL").arg(RELEASE).arg(1).arg(&self.key).arg(&self.token).ignore();
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
            let (mut conn, key, token) = (self.conn.clone(), self.key.clone(), self.token.clone());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _: redis::RedisResult<i64> =
                        redis::Script::new(RELEASE).key(&key).arg(&token).invoke_async(&mut conn).await;
                });
            }
        }
    }
}
