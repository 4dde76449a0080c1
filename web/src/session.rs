//! Server-side admin sessions and login throttling, both kept in Redis.
//!
//! Sessions use the same redis 1.x connection as the queue (poem's own Redis storage
//! would pull in a second Redis client). A session key expires after the idle timeout;
//! the login time stored inside bounds its absolute age. When Redis is down, admin pages
//! answer 503 while the feedback form keeps working.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use poem::http::StatusCode;
use redis::AsyncCommands;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::dispatch::Dispatcher;

/// A session not used for this long is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(8 * 3600);

/// A session older than this is gone, however active.
pub const ABSOLUTE_TIMEOUT: Duration = shared::budget::SESSION_ABSOLUTE_TIMEOUT;

/// Failed logins per account before that account is throttled.
pub const ACCOUNT_FAILURES: u64 = 5;

/// Failed logins per client address before that address is throttled.
pub const ADDRESS_FAILURES: u64 = 20;

/// The window failures are counted over.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);

fn unavailable(e: impl std::fmt::Display) -> poem::Error {
    tracing::warn!(error = %e, "session.redis_unavailable");
    poem::Error::from_string(
        "The admin area is briefly unavailable. Please try again.",
        StatusCode::SERVICE_UNAVAILABLE,
    )
}

/// poem `SessionStorage` over the queue's Redis connection.
#[derive(Clone)]
pub struct RedisSessions {
    dispatcher: Arc<Dispatcher>,
    namespace: String,
}

impl RedisSessions {
    /// Sessions under `{namespace}:session:`.
    pub fn new(dispatcher: Arc<Dispatcher>, namespace: &str) -> Self {
        Self { dispatcher, namespace: namespace.to_owned() }
    }

    fn key(&self, id: &str) -> String {
        // The id is hashed so that a key listing does not reveal live cookies.
        format!("{}:session:{}", self.namespace, hex(&Sha256::digest(id.as_bytes())))
    }

    async fn connection(&self) -> poem::Result<redis::aio::ConnectionManager> {
        match self.dispatcher.queue().await {
            Some(queue) => Ok(queue.connection()),
            None => Err(unavailable("redis is not reachable")),
        }
    }
}

impl poem::session::SessionStorage for RedisSessions {
    async fn load_session<'a>(&'a self, session_id: &'a str) -> poem::Result<Option<BTreeMap<String, Value>>> {
        let mut conn = self.connection().await?;
        let raw: Option<String> = conn.get(self.key(session_id)).await.map_err(unavailable)?;
        Ok(raw.and_then(|raw| serde_json::from_str(&raw).ok()))
    }

    async fn update_session<'a>(
        &'a self,
        session_id: &'a str,
        entries: &'a BTreeMap<String, Value>,
        _expires: Option<Duration>,
    ) -> poem::Result<()> {
        let mut conn = self.connection().await?;
        let body = serde_json::to_string(entries).map_err(unavailable)?;
        let ttl = u64::try_from(IDLE_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        let _: () = conn.pset_ex(self.key(session_id), body, ttl).await.map_err(unavailable)?;
        Ok(())
    }

    async fn remove_session<'a>(&'a self, session_id: &'a str) -> poem::Result<()> {
        let mut conn = self.connection().await?;
        let _: i64 = conn.del(self.key(session_id)).await.map_err(unavailable)?;
        Ok(())
    }
}

/// Counts failed logins per account and per client address.
#[derive(Clone)]
pub struct LoginThrottle {
    dispatcher: Arc<Dispatcher>,
    namespace: String,
}

impl LoginThrottle {
    /// Counters under `{namespace}:login-failures:`.
    pub fn new(dispatcher: Arc<Dispatcher>, namespace: &str) -> Self {
        Self { dispatcher, namespace: namespace.to_owned() }
    }

    fn keys(&self, email: &str, address: &str) -> [(String, u64); 2] {
        let account = hex(&Sha256::digest(email.trim().to_lowercase().as_bytes()));
        [
            (format!("{}:login-failures:account:{account}", self.namespace), ACCOUNT_FAILURES),
            (format!("{}:login-failures:address:{address}", self.namespace), ADDRESS_FAILURES),
        ]
    }

    /// `Err(seconds to wait)` when the account or the address failed too often.
    pub async fn check(&self, email: &str, address: &str) -> poem::Result<Result<(), u64>> {
        let mut conn = self.connection().await?;
        for (key, limit) in self.keys(email, address) {
            let failures: Option<u64> = conn.get(&key).await.map_err(unavailable)?;
            if failures.unwrap_or(0) >= limit {
                let ttl: i64 = conn.ttl(&key).await.map_err(unavailable)?;
                return Ok(Err(u64::try_from(ttl).unwrap_or(1).max(1)));
            }
        }
        Ok(Ok(()))
    }

    /// Counts one failed login.
    pub async fn record_failure(&self, email: &str, address: &str) -> poem::Result<()> {
        let mut conn = self.connection().await?;
        let window = i64::try_from(FAILURE_WINDOW.as_secs()).unwrap_or(900);
        for (key, _) in self.keys(email, address) {
            let count: i64 = conn.incr(&key, 1).await.map_err(unavailable)?;
            if count == 1 {
                let _: bool = conn.expire(&key, window).await.map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// Forgets the account's failures after a successful login.
    pub async fn reset_account(&self, email: &str, address: &str) -> poem::Result<()> {
        let mut conn = self.connection().await?;
        let [(account, _), _] = self.keys(email, address);
        let _: i64 = conn.del(account).await.map_err(unavailable)?;
        Ok(())
    }

    async fn connection(&self) -> poem::Result<redis::aio::ConnectionManager> {
        match self.dispatcher.queue().await {
            Some(queue) => Ok(queue.connection()),
            None => Err(unavailable("redis is not reachable")),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
