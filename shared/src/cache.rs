//! The read cache in Redis: the admin's inbox counts, inbox pages and rendered message
//! pages, so the admin stays fast however many messages pile up.
//!
//! Layout, under `{ns}:cache:`:
//! - entries `{ns}:cache:{version}:{name}`: the version is the package version, the
//!   cache format and a hash of the template rendered into cached HTML (plus
//!   `CACHE_VERSION`), so a deploy that changes any of them never reads what an older
//!   build wrote; the trim removes every entry of another version.
//! - `lru` (sorted set: entry → last use, ms), `size` (hash: entry → bytes) and `bytes`
//!   (their sum): what the trim needs to evict the least recently used first.
//! - `lo`/`hi` (sorted sets: entry → lowest / highest message id it shows; ±inf for "any"):
//!   what invalidation needs to find exactly the entries that show a message.
//! - `seq`: bumped by every invalidation. A reader notes it before reading the database
//!   and stores its result only if it has not moved, so a read that raced a change never
//!   puts the old state back after the change's invalidation ran.
//!
//! Every entry also expires on its own after `CACHE_TTL_SECS`, which bounds staleness
//! whatever happens to the jobs that invalidate (Redis failing at the wrong moment, no
//! worker running).
//!
//! The trim brings the cache down to 90% of its budget (a low-water mark), so that a
//! full cache does not ask for a trim with every new entry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

/// Bumped when the shape of what is cached changes.
pub const FORMAT: u32 = 1;

/// The template of the one thing cached as rendered HTML (a message's page): a change to
/// it changes the version, so a deploy never serves HTML an older template rendered.
/// Web and worker share this crate, so both always agree on the version.
const RENDERED_TEMPLATE: &[u8] = include_bytes!("../../web/templates/admin_feedback_message.html");

/// FNV-1a, at compile time.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

const TEMPLATE_HASH: u64 = fnv1a(RENDERED_TEMPLATE);

/// The cache's budget and switches (`CACHE_*` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// `CACHE_ENABLED`: off, every read goes to the database.
    pub enabled: bool,
    /// `CACHE_MAX_ENTRIES`: entries kept at most.
    pub max_entries: u64,
    /// `CACHE_MAX_BYTES`: bytes of keys and values kept at most.
    pub max_bytes: u64,
    /// `CACHE_TTL_SECS`: an entry's longest life.
    pub ttl: Duration,
    /// `CACHE_VERSION`: a deploy's own tag, added to the build's version.
    pub deploy_version: String,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_entries: 10_000,
            max_bytes: 32 * 1024 * 1024,
            ttl: Duration::from_secs(600),
            deploy_version: String::new(),
        }
    }
}

/// Which messages an entry shows: invalidating any of them drops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cover {
    /// Every message (counts and aggregates).
    Everything,
    /// The messages with ids in `lo..=hi`; `hi: None` reaches past the newest one (the
    /// first page, or any page a new message would appear on or change the links of).
    Ids {
        /// Lowest id shown (`None`: no lower bound).
        lo: Option<i64>,
        /// Highest id shown (`None`: no upper bound).
        hi: Option<i64>,
    },
}

impl Cover {
    fn bounds(self) -> (String, String) {
        match self {
            Self::Everything => ("-inf".into(), "+inf".into()),
            Self::Ids { lo, hi } => (
                lo.map_or_else(|| "-inf".into(), |v| v.to_string()),
                hi.map_or_else(|| "+inf".into(), |v| v.to_string()),
            ),
        }
    }
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The stored bytes.
    Hit(Vec<u8>),
    /// Nothing stored; pass `seq` to [`Cache::put`] with what the database returned.
    Miss {
        /// The invalidation sequence when the lookup ran.
        seq: String,
    },
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// False when an invalidation ran since the lookup (the value may be stale).
    pub stored: bool,
    /// Entries or bytes are past the budget: a trim is due.
    pub over_budget: bool,
}

/// What one trim of the cache removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheTrimmed {
    /// Entries of another version.
    pub old_version: u64,
    /// Bookkeeping of entries that had expired.
    pub expired: u64,
    /// Entries evicted, least recently used first, to get under the budget.
    pub evicted: u64,
}

/// Entries and bytes held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheUsage {
    /// Entries (of every version).
    pub entries: u64,
    /// Bytes of keys and values.
    pub bytes: u64,
}

/// Drops entries `ARGV` with all their bookkeeping. KEYS: lru, size, bytes, lo, hi.
const DROP: &str = r"
local function drop(k)
  redis.call('DEL', k)
  local sz = tonumber(redis.call('HGET', KEYS[2], k) or '0')
  if sz > 0 then
    if tonumber(redis.call('DECRBY', KEYS[3], sz)) < 0 then redis.call('SET', KEYS[3], 0) end
  end
  redis.call('HDEL', KEYS[2], k)
  redis.call('ZREM', KEYS[1], k)
  redis.call('ZREM', KEYS[4], k)
  redis.call('ZREM', KEYS[5], k)
end
";

/// KEYS: lru, size, bytes, lo, hi, seq, entry. ARGV: value, ttl ms, expected seq, now ms,
/// lo, hi. Returns {stored (0/1), entries, bytes}.
const PUT: &str = r"
local cur = redis.call('GET', KEYS[6]) or '0'
if cur ~= ARGV[3] then return {0, redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0')} end
local k = KEYS[7]
local old = tonumber(redis.call('HGET', KEYS[2], k) or '0')
local sz = string.len(ARGV[1]) + string.len(k)
redis.call('SET', k, ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], k, sz)
local total = redis.call('INCRBY', KEYS[3], sz - old)
redis.call('ZADD', KEYS[1], ARGV[4], k)
redis.call('ZADD', KEYS[4], ARGV[5], k)
redis.call('ZADD', KEYS[5], ARGV[6], k)
return {1, redis.call('ZCARD', KEYS[1]), total}
";

/// KEYS: lru, size, bytes, lo, hi, seq. ARGV: ids. Drops every entry whose cover holds
/// one of the ids, walking the shorter side of the two indexes. Returns entries dropped.
const INVALIDATE: &str = r"
redis.call('INCR', KEYS[6])
local dropped = 0
for _, id in ipairs(ARGV) do
  local n = tonumber(id)
  local below = redis.call('ZCOUNT', KEYS[4], '-inf', n)
  local above = redis.call('ZCOUNT', KEYS[5], n, '+inf')
  local victims = {}
  if below <= above then
    for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', n)) do
      if (tonumber(redis.call('ZSCORE', KEYS[5], k)) or math.huge) >= n then victims[#victims + 1] = k end
    end
  else
    for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], n, '+inf')) do
      if (tonumber(redis.call('ZSCORE', KEYS[4], k)) or -math.huge) <= n then victims[#victims + 1] = k end
    end
  end
  for _, k in ipairs(victims) do
    drop(k)
    dropped = dropped + 1
  end
end
return dropped
";

/// KEYS: lru, size, bytes, lo, hi. ARGV: entries to drop. Returns how many.
const DROP_ALL: &str = r"
for _, k in ipairs(ARGV) do drop(k) end
return #ARGV
";

static PUT_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(PUT));
static INVALIDATE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{DROP}{INVALIDATE}")));
static DROP_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{DROP}{DROP_ALL}")));

/// The cache of one namespace, on a shared Redis connection; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    conn: ConnectionManager,
    root: String,
    prefix: String,
    settings: CacheSettings,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// The version entries of this build are written under.
pub fn version(deploy_version: &str) -> String {
    let build = format!("{}.{FORMAT}.{:08x}", env!("CARGO_PKG_VERSION"), TEMPLATE_HASH & 0xffff_ffff);
    if deploy_version.is_empty() { build } else { format!("{build}-{deploy_version}") }
}

impl Cache {
    /// The cache of namespace `ns` on `conn`.
    pub fn new(conn: ConnectionManager, ns: &str, settings: &CacheSettings) -> Self {
        let root = format!("{ns}:cache");
        let prefix = format!("{root}:{}:", version(&settings.deploy_version));
        Self { conn, root, prefix, settings: settings.clone() }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    fn key(&self, part: &str) -> String {
        format!("{}:{part}", self.root)
    }

    /// The Redis key of entry `name` in this build's version.
    pub fn entry_key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn bookkeeping(&self, script: &mut redis::ScriptInvocation<'_>) {
        for part in ["lru", "size", "bytes", "lo", "hi"] {
            script.key(self.key(part));
        }
    }

    /// Looks entry `name` up, marking it used when found.
    pub async fn get(&self, name: &str) -> redis::RedisResult<Lookup> {
        let key = self.entry_key(name);
        let mut conn = self.conn.clone();
        let (value, seq): (Option<Vec<u8>>, Option<String>) = redis::pipe()
            .get(&key)
            .get(self.key("seq"))
            .cmd("ZADD")
            .arg(self.key("lru"))
            .arg("XX")
            .arg(now_ms())
            .arg(&key)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(match value {
            Some(bytes) => Lookup::Hit(bytes),
            None => Lookup::Miss { seq: seq.unwrap_or_else(|| "0".into()) },
        })
    }

    /// Stores `value` as entry `name`, showing the messages of `cover`, unless an
    /// invalidation ran since the lookup that returned `seq`.
    pub async fn put(&self, name: &str, value: &[u8], seq: &str, cover: Cover) -> redis::RedisResult<Stored> {
        let mut invocation = PUT_SCRIPT.prepare_invoke();
        self.bookkeeping(&mut invocation);
        let (lo, hi) = cover.bounds();
        let ttl_ms = u64::try_from(self.settings.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        invocation.key(self.key("seq")).key(self.entry_key(name));
        invocation.arg(value).arg(ttl_ms).arg(seq).arg(now_ms()).arg(lo).arg(hi);
        let mut conn = self.conn.clone();
        let (stored, entries, bytes): (u8, u64, u64) = invocation.invoke_async(&mut conn).await?;
        Ok(Stored {
            stored: stored == 1,
            over_budget: entries > self.settings.max_entries || bytes > self.settings.max_bytes,
        })
    }

    /// Drops every entry, of any version, that shows one of the messages `ids` (and the
    /// counts); returns how many.
    pub async fn invalidate(&self, ids: &[i64]) -> redis::RedisResult<u64> {
        let mut invocation = INVALIDATE_SCRIPT.prepare_invoke();
        self.bookkeeping(&mut invocation);
        invocation.key(self.key("seq"));
        for id in ids {
            invocation.arg(id);
        }
        let mut conn = self.conn.clone();
        invocation.invoke_async(&mut conn).await
    }

    /// Entries and bytes held now.
    pub async fn usage(&self) -> redis::RedisResult<CacheUsage> {
        let mut conn = self.conn.clone();
        let (entries, bytes): (u64, Option<i64>) =
            redis::pipe().zcard(self.key("lru")).get(self.key("bytes")).query_async(&mut conn).await?;
        Ok(CacheUsage { entries, bytes: bytes.unwrap_or(0).max(0) as u64 })
    }

    /// Drops entries `names` of this build's version (an entry that could not be read).
    pub async fn remove(&self, names: &[&str]) -> redis::RedisResult<u64> {
        let keys: Vec<String> = names.iter().map(|n| self.entry_key(n)).collect();
        self.drop_entries(&keys).await
    }

    async fn drop_entries(&self, keys: &[String]) -> redis::RedisResult<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut invocation = DROP_SCRIPT.prepare_invoke();
        self.bookkeeping(&mut invocation);
        for key in keys {
            invocation.arg(key);
        }
        let mut conn = self.conn.clone();
        invocation.invoke_async(&mut conn).await
    }

    /// Brings the cache within its budget: entries of other versions and the bookkeeping
    /// of expired ones go first, then the least recently used until both the entry count
    /// and the bytes are within bounds. Works in batches, so Redis never blocks for long.
    pub async fn trim(&self) -> redis::RedisResult<CacheTrimmed> {
        const BATCH: usize = 500;
        let mut trimmed = CacheTrimmed::default();
        let mut conn = self.conn.clone();
        let lru = self.key("lru");
        let mut cursor: u64 = 0;
        loop {
            let (next, page): (u64, Vec<String>) =
                redis::cmd("ZSCAN").arg(&lru).arg(cursor).arg("COUNT").arg(BATCH).query_async(&mut conn).await?;
            // ZSCAN returns member, score, member, score...
            let members: Vec<String> = page.into_iter().step_by(2).collect();
            let (old, ours): (Vec<String>, Vec<String>) =
                members.into_iter().partition(|k| !k.starts_with(&self.prefix));
            let mut pipe = redis::pipe();
            for key in &ours {
                pipe.exists(key);
            }
            let exists: Vec<bool> = if ours.is_empty() { Vec::new() } else { pipe.query_async(&mut conn).await? };
            let expired: Vec<String> = ours.into_iter().zip(exists).filter(|(_, e)| !e).map(|(k, _)| k).collect();
            trimmed.old_version += self.drop_entries(&old).await?;
            trimmed.expired += self.drop_entries(&expired).await?;
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let (keep_entries, keep_bytes) = low_water(&self.settings);
        loop {
            let usage = self.usage().await?;
            if usage.entries == 0 && usage.bytes > 0 {
                // Nothing left to account for: a drifted sum starts again from zero.
                let _: () = redis::cmd("SET").arg(self.key("bytes")).arg(0).query_async(&mut conn).await?;
                break;
            }
            let over_entries = usage.entries.saturating_sub(keep_entries);
            if over_entries == 0 && usage.bytes <= keep_bytes {
                break;
            }
            // Over on bytes alone: evict about as many average entries as the excess.
            let take = if over_entries > 0 {
                over_entries
            } else {
                let average = (usage.bytes / usage.entries.max(1)).max(1);
                (usage.bytes - keep_bytes) / average + 1
            };
            let take = take.min(BATCH as u64) as isize;
            let victims: Vec<String> =
                redis::cmd("ZRANGE").arg(&lru).arg(0).arg(take - 1).query_async(&mut conn).await?;
            if victims.is_empty() {
                break;
            }
            trimmed.evicted += self.drop_entries(&victims).await?;
        }
        Ok(trimmed)
    }
}

/// What a trim leaves: 90% of the budget (all of it for budgets under ten).
fn low_water(settings: &CacheSettings) -> (u64, u64) {
    (settings.max_entries - settings.max_entries / 10, settings.max_bytes - settings.max_bytes / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_leaves_room_below_the_budget() {
        let settings = CacheSettings { max_entries: 10_000, max_bytes: 1000, ..CacheSettings::default() };
        assert_eq!(low_water(&settings), (9_000, 900));
        assert_eq!(low_water(&CacheSettings { max_entries: 5, ..settings }).0, 5);
    }

    #[test]
    fn covers_become_score_bounds() {
        assert_eq!(Cover::Everything.bounds(), ("-inf".into(), "+inf".into()));
        assert_eq!(Cover::Ids { lo: Some(3), hi: None }.bounds(), ("3".into(), "+inf".into()));
        assert_eq!(Cover::Ids { lo: Some(3), hi: Some(9) }.bounds(), ("3".into(), "9".into()));
    }

    #[test]
    fn versions_include_the_format_and_the_deploy_tag() {
        assert!(version("").contains(&format!(".{FORMAT}.")));
        assert_eq!(version(""), version(""), "web and worker compute the same");
        assert!(version("blue").ends_with("-blue"));
    }
}
