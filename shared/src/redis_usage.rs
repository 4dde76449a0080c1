//! What Tidings keeps in Redis, by kind: keys and bytes, for `worker status` (every kind
//! of data has a budget; this is how an operator sees each one against it).

use redis::aio::ConnectionManager;

/// Keys and memory of one kind of data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindUsage {
    /// The kind (see [`kind_of`]).
    pub kind: &'static str,
    /// Keys of that kind.
    pub keys: u64,
    /// Their memory, as `MEMORY USAGE` reports it.
    pub bytes: u64,
}

/// Kinds told apart by what follows the namespace: (pattern, kind, anywhere in the key
/// rather than at its start). The first match wins; the queue's own structures
/// (payloads, pending, scheduled, done and dead sets) are what is left.
const KINDS: [(&str, &str, bool); 14] = [
    ("cache:", "cache", false),
    ("trim-caches:", "coordination", false),
    (":meta:", "job_records", true),
    (":idempotency", "idempotency_keys", true),
    ("session:", "sessions", false),
    ("login-failures:", "rate_limits", false),
    ("stats:", "job_stats", false),
    ("dead-letters", "dead_letters", false),
    ("worker-health:", "worker_reports", false),
    ("lock:", "coordination", false),
    ("tick:", "coordination", false),
    ("periodic:", "coordination", false),
    ("job-starts:", "coordination", false),
    ("digest-read:", "coordination", false),
];

/// The kind of key `key` (inside namespace `ns`), or `None` for a key not ours.
pub fn kind_of(ns: &str, key: &str) -> Option<&'static str> {
    let rest = key.strip_prefix(ns)?.strip_prefix(':')?;
    let matches = |(pattern, _, anywhere): &(&str, &str, bool)| {
        if *anywhere { rest.contains(pattern) } else { rest.starts_with(pattern) }
    };
    Some(KINDS.iter().find(|k| matches(k)).map_or("queue", |(_, kind, _)| kind))
}

/// Walks the keys of a namespace with `SCAN`, a batch per round trip (never `KEYS`,
/// which blocks Redis for the whole keyspace).
#[derive(Debug)]
pub struct KeyScan {
    pattern: String,
    cursor: u64,
    done: bool,
}

impl KeyScan {
    /// Every key of namespace `ns`.
    pub fn new(ns: &str) -> Self {
        Self { pattern: format!("{ns}:*"), cursor: 0, done: false }
    }

    /// The next batch (possibly empty), or `None` once the walk is over.
    pub async fn next<C: redis::aio::ConnectionLike>(
        &mut self,
        conn: &mut C,
    ) -> redis::RedisResult<Option<Vec<String>>> {
        if self.done {
            return Ok(None);
        }
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(self.cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        self.cursor = next;
        self.done = next == 0;
        Ok(Some(keys))
    }
}

/// Scans the namespace `ns` and sums keys and bytes by kind, biggest first.
pub async fn by_kind(conn: &mut ConnectionManager, ns: &str) -> redis::RedisResult<Vec<KindUsage>> {
    let mut usage: Vec<KindUsage> = Vec::new();
    let mut scan = KeyScan::new(ns);
    while let Some(keys) = scan.next(conn).await? {
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("MEMORY").arg("USAGE").arg(key);
            }
            let sizes: Vec<Option<u64>> = pipe.query_async(conn).await?;
            for (key, size) in keys.iter().zip(sizes) {
                let Some(kind) = kind_of(ns, key) else { continue };
                match usage.iter_mut().find(|u| u.kind == kind) {
                    Some(u) => {
                        u.keys += 1;
                        u.bytes += size.unwrap_or(0);
                    }
                    None => usage.push(KindUsage { kind, keys: 1, bytes: size.unwrap_or(0) }),
                }
            }
        }
    }
    usage.sort_by_key(|u| std::cmp::Reverse(u.bytes));
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_told_apart_by_kind_and_foreign_keys_ignored() {
        assert_eq!(kind_of("t", "t:fanout:meta:01J"), Some("job_records"));
        assert_eq!(kind_of("t", "t:fanout:idempotency:dispatch-1-0"), Some("idempotency_keys"));
        assert_eq!(kind_of("t", "t:session:abc"), Some("sessions"));
        assert_eq!(kind_of("t", "t:login-failures:account:x"), Some("rate_limits"));
        assert_eq!(kind_of("t", "t:stats:jobs:1700000000"), Some("job_stats"));
        assert_eq!(kind_of("t", "t:dead-letters:by-time"), Some("dead_letters"));
        assert_eq!(kind_of("t", "t:lock:job:fan_out:1"), Some("coordination"));
        assert_eq!(kind_of("t", "t:digest-read:60-120"), Some("coordination"));
        assert_eq!(kind_of("t", "t:fanout:data"), Some("queue"));
        assert_eq!(kind_of("t", "other:fanout:data"), None);
        assert_eq!(kind_of("t", "tx:fanout:data"), None);
    }
}
