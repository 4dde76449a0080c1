//! Budgets of the short-lived kinds of data kept in Redis: admin sessions, login-failure
//! counters and the queue's idempotency keys; and the metadata the queue keeps of worker
//! processes that are gone.
//!
//! Each of them expires on its own; a budget bounds a flood of them (many logins, a
//! password-guessing run from many addresses, a burst of jobs). [`sweep`] walks the
//! namespace once, a batch of keys per round trip, and removes sessions past their
//! absolute lifetime, then, for each kind past its budget, the keys closest to expiring
//! (keeping in memory only the budget's worth of keys it will keep).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::settings::RedisBudgets;

/// A session older than this is gone, however active (the web checks it on every
/// request; the sweep removes the ones nobody comes back with).
pub const SESSION_ABSOLUTE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Sessions past their absolute lifetime.
    pub expired_sessions: u64,
    /// Sessions removed to get within the budget.
    pub sessions: u64,
    /// Login-failure counters removed to get within the budget.
    pub rate_limits: u64,
    /// Idempotency keys removed to get within the budget.
    pub idempotency_keys: u64,
    /// Metadata of worker processes no longer registered (apalis-redis writes one hash
    /// per worker and never removes it; each process start is a new worker).
    pub worker_metadata: u64,
}

/// The keys of one kind kept so far: the budget's worth with the longest time to live.
struct Keep {
    budget: usize,
    heap: BinaryHeap<Reverse<(i64, String)>>,
}

impl Keep {
    fn new(budget: u64) -> Self {
        Self { budget: usize::try_from(budget).unwrap_or(usize::MAX), heap: BinaryHeap::new() }
    }

    /// Adds `key`; returns a key to remove when the kind is past its budget.
    fn add(&mut self, key: String, pttl: i64) -> Option<String> {
        // No expiry at all sorts first: such a key would otherwise stay forever.
        let ttl = if pttl < 0 { 0 } else { pttl };
        self.heap.push(Reverse((ttl, key)));
        (self.heap.len() > self.budget).then(|| self.heap.pop().map(|Reverse((_, key))| key)).flatten()
    }
}

/// Walks namespace `ns` and brings sessions, login-failure counters and idempotency
/// keys within `budgets` (digests' idempotency keys apart: they stay until they expire).
pub async fn sweep(conn: &mut ConnectionManager, ns: &str, budgets: &RedisBudgets) -> redis::RedisResult<Swept> {
    let mut swept = Swept::default();
    let mut keep = [
        ("sessions", Keep::new(budgets.sessions)),
        ("rate_limits", Keep::new(budgets.rate_limits)),
        ("idempotency_keys", Keep::new(budgets.idempotency_keys)),
    ];
    let now = chrono::Utc::now().timestamp();
    let mut scan = crate::redis_usage::KeyScan::new(ns);
    while let Some(keys) = scan.next(conn).await? {
        swept.worker_metadata += drop_unregistered_workers_metadata(conn, &keys).await?;
        let ours: Vec<(String, &'static str)> = keys
            .into_iter()
            .filter_map(|key| {
                let kind = crate::redis_usage::kind_of(ns, &key)?;
                if kind == "idempotency_keys" && is_digest_key(&key) {
                    return None;
                }
                keep.iter().any(|(k, _)| *k == kind).then_some((key, kind))
            })
            .collect();
        if !ours.is_empty() {
            let mut pipe = redis::pipe();
            for (key, _) in &ours {
                pipe.pttl(key);
            }
            let ttls: Vec<i64> = pipe.query_async(conn).await?;
            // Sessions carry their login time: read it to find the ones past their life.
            let sessions: Vec<&String> = ours.iter().filter(|(_, kind)| *kind == "sessions").map(|(k, _)| k).collect();
            let bodies: Vec<Option<String>> = if sessions.is_empty() {
                Vec::new()
            } else {
                redis::cmd("MGET").arg(&sessions).query_async(conn).await?
            };
            let mut bodies = bodies.into_iter();
            let mut victims = Vec::new();
            for ((key, kind), pttl) in ours.into_iter().zip(ttls) {
                let body = if kind == "sessions" { bodies.next().flatten() } else { None };
                if pttl == -2 {
                    continue; // expired meanwhile
                }
                if kind == "sessions" && past_absolute_lifetime(body.as_deref(), now) {
                    victims.push(key);
                    swept.expired_sessions += 1;
                    continue;
                }
                let Some((_, kept)) = keep.iter_mut().find(|(k, _)| *k == kind) else { continue };
                if let Some(victim) = kept.add(key, pttl) {
                    victims.push(victim);
                    match kind {
                        "sessions" => swept.sessions += 1,
                        "rate_limits" => swept.rate_limits += 1,
                        _ => swept.idempotency_keys += 1,
                    }
                }
            }
            if !victims.is_empty() {
                let _: () = redis::cmd("UNLINK").arg(&victims).query_async(conn).await?;
            }
        }
    }
    Ok(swept)
}

/// The part of a worker's metadata key between its queue and its name.
const WORKER_METADATA: &str = ":workers:metadata:";

/// Removes, among `keys`, the metadata of workers no longer in their queue's workers set
/// (a worker past its heartbeat is taken out of it, and its jobs taken back, by the
/// orphan sweep; a registration writes both at once). Returns how many it removed.
async fn drop_unregistered_workers_metadata(conn: &mut ConnectionManager, keys: &[String]) -> redis::RedisResult<u64> {
    let workers: Vec<(&String, &str, &str)> =
        keys.iter().filter_map(|key| key.split_once(WORKER_METADATA).map(|(queue, name)| (key, queue, name))).collect();
    if workers.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    for (_, queue, name) in &workers {
        pipe.zscore(format!("{queue}:workers"), *name);
    }
    let seen: Vec<Option<f64>> = pipe.query_async(conn).await?;
    let gone: Vec<&String> =
        workers.iter().zip(seen).filter(|(_, s)| s.is_none()).map(|((key, _, _), _)| *key).collect();
    if gone.is_empty() {
        return Ok(0);
    }
    let _: () = redis::cmd("UNLINK").arg(&gone).query_async(conn).await?;
    Ok(gone.len() as u64)
}

/// True for a digest's idempotency key, which stays until it expires
/// ([`crate::queue::DIGEST_KEY_PREFIX`]): removed early, a window still folding
/// messages would schedule its digest again.
fn is_digest_key(key: &str) -> bool {
    key.rsplit_once(":idempotency:").is_some_and(|(_, name)| name.starts_with(crate::queue::DIGEST_KEY_PREFIX))
}

/// True for a session whose login was longer ago than [`SESSION_ABSOLUTE_TIMEOUT`].
fn past_absolute_lifetime(body: Option<&str>, now: i64) -> bool {
    let Some(logged_in_at) = body
        .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .and_then(|v| v.get("logged_in_at").and_then(serde_json::Value::as_i64))
    else {
        return false;
    };
    now.saturating_sub(logged_in_at) > i64::try_from(SESSION_ABSOLUTE_TIMEOUT.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_closest_to_expiring_go_first() {
        let mut keep = Keep::new(2);
        assert_eq!(keep.add("a".into(), 5_000), None);
        assert_eq!(keep.add("b".into(), 9_000), None);
        assert_eq!(keep.add("c".into(), 1_000), Some("c".into()));
        assert_eq!(keep.add("d".into(), 7_000), Some("a".into()));
        assert_eq!(keep.add("e".into(), -1), Some("e".into()), "no expiry sorts first");
    }

    #[test]
    fn sessions_past_their_absolute_lifetime_are_recognised() {
        let now = 100_000;
        assert!(past_absolute_lifetime(Some(r#"{"admin_id":1,"logged_in_at":1}"#), now));
        assert!(!past_absolute_lifetime(Some(r#"{"admin_id":1,"logged_in_at":99000}"#), now));
        assert!(!past_absolute_lifetime(Some("not json"), now));
        assert!(!past_absolute_lifetime(None, now));
    }
}
