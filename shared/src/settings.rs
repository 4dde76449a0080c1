//! Configuration, read once at start-up from the environment (and a `.env` file if present).
//!
//! Variables read (see the README for the full reference):
//! `DATABASE_URL`, `REDIS_URL`, `REDIS_NAMESPACE`, `BIND`, `PUBLIC_URL`, `SECRET_KEY`,
//! `VAPID_PRIVATE_KEY`, `VAPID_PUBLIC_KEY`, `VAPID_SUBJECT`, `PUSH_ALLOWED_HOSTS`,
//! `SUBMIT_RATE_LIMIT`, `PUSH_TTL_SECS`, `PUSH_TIMEOUT_MS`, `PUSH_CONCURRENCY`,
//! `PUSH_MAX_ATTEMPTS`, `PUSH_RETRY_BASE_MS`, `PUSH_RETRY_CAP_SECS`, `RELAY_INTERVAL_MS`,
//! `RELAY_GRACE_MS`, `QUEUE_POLL_MS`, `SHUTDOWN_TIMEOUT_SECS`, `LOG_FORMAT`, `JOB_RETRY_*`
//! and the others the README lists.
//!
//! Everything is parsed here (URLs, durations, numbers), so a bad value stops the
//! process at start-up with a message naming the variable, never later at first use.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use crate::domain::PushHostPolicy;
use crate::jobs::RetryPolicy;

/// A variable that is missing or can't be parsed.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct SettingsError {
    /// The environment variable at fault.
    pub name: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// Everything either binary can be configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Database connection URL (`sqlite://...` or `postgres://...`).
    pub database_url: String,
    /// Redis connection URL; a database index (`/7`) isolates an instance.
    pub redis_url: String,
    /// Prefix of every Redis key Tidings writes, so several instances (or tests) can
    /// share one Redis database.
    pub redis_namespace: String,
    /// Web settings.
    pub web: WebSettings,
    /// Web Push settings (VAPID keys, allowed push services, delivery policy).
    pub push: PushSettings,
    /// Worker and queue settings.
    pub worker: WorkerSettings,
    /// The admin's read cache in Redis.
    pub cache: crate::cache::CacheSettings,
    /// Most keys kept in Redis of the kinds that have no budget of their own.
    pub budgets: RedisBudgets,
}

/// Budgets (in keys) of the short-lived kinds of data kept in Redis; each also expires
/// on its own, the budget bounds a flood of them. The trim removes the keys closest to
/// expiring first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisBudgets {
    /// `SESSIONS_MAX_KEYS`: admin sessions.
    pub sessions: u64,
    /// `RATE_LIMITS_MAX_KEYS`: login-failure counters.
    pub rate_limits: u64,
    /// `IDEMPOTENCY_MAX_KEYS`: the queue's idempotency keys.
    pub idempotency_keys: u64,
}

/// Settings of the web process.
#[derive(Debug, Clone)]
pub struct WebSettings {
    /// Address to listen on; port 0 picks a free port (tests).
    pub bind: SocketAddr,
    /// Base of absolute links (notification click targets).
    pub public_url: Url,
    /// Key for CSRF tokens and session cookies; at least 32 bytes.
    pub secret_key: Option<SecretString>,
    /// Feedback submissions allowed per client address per minute; 0 = no limit.
    pub submit_rate_limit: u32,
    /// Pages the site service worker keeps for offline use (oldest dropped first).
    pub sw_cache_entries: u32,
    /// Reverse proxies whose `X-Forwarded-For` is believed; empty = use the peer address.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl WebSettings {
    /// Whether cookies are marked `Secure`: always, except for plain http on this
    /// machine (development), where a browser would drop them.
    pub fn secure_cookies(&self) -> bool {
        let local = match self.public_url.host() {
            Some(url::Host::Domain(name)) => name == "localhost",
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        };
        !(self.public_url.scheme() == "http" && local)
    }
}

/// Settings of Web Push delivery.
#[derive(Debug, Clone)]
pub struct PushSettings {
    /// VAPID private key: the raw 32-byte P-256 scalar, base64url.
    pub vapid_private_key: Option<SecretString>,
    /// VAPID public key: the 65-byte uncompressed point, base64url (given to browsers).
    pub vapid_public_key: Option<String>,
    /// VAPID `sub` claim: a `mailto:` or `https:` contact for the push services.
    pub vapid_subject: String,
    /// Which push-service endpoints subscriptions may point at.
    pub allowed_hosts: PushHostPolicy,
    /// How long the push service keeps an undelivered message.
    pub ttl: Duration,
    /// Time limit of one request to a push service.
    pub request_timeout: Duration,
    /// Pushes in flight at once per fan-out job.
    pub concurrency: usize,
    /// Attempts per delivery before it is recorded as failed.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with jitter.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_cap: Duration,
}

/// Settings of worker processes and the queue.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// How often the dispatch relay runs (once per tick across all workers).
    pub relay_interval: Duration,
    /// Age a dispatch record must reach before the relay enqueues it, leaving the web
    /// time to enqueue it itself after commit.
    pub relay_grace: Duration,
    /// Fallback poll interval of idle workers (they are normally woken on push).
    pub poll_interval: Duration,
    /// Time in-flight jobs get to finish on SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Most jobs Redis may hold waiting (due or pending); the rest wait in the database's
    /// dispatch table. Kept well below apalis-redis's fetch limit (about 8,000).
    pub max_backlog: u64,
    /// Where the worker serves `/metrics`; `None` turns it off.
    pub metrics_bind: Option<SocketAddr>,
    /// Messages per window notified one by one; more are folded into one digest.
    /// 0 turns coalescing off.
    pub burst_threshold: u64,
    /// The coalescing window (windows are aligned to multiples of it).
    pub burst_window: Duration,
    /// Finished job records older than this are removed from Redis.
    pub job_retention: Duration,
    /// At most this many finished job records are kept, whatever their age.
    pub job_retention_count: u64,
    /// How often the trim task runs (once per tick across all workers).
    pub trim_interval: Duration,
    /// Bound on how long a killed worker's jobs wait before another worker takes them.
    pub recovery: Duration,
    /// A job started more often than this without ever finishing is dead-lettered.
    pub poison_after: u64,
    /// Subscriptions that failed and took no push for this many days are deleted;
    /// `None` (`PRUNE_FAILING_SUBSCRIPTIONS_DAYS=0`) keeps them.
    pub prune_failing_after_days: Option<u32>,
    /// Dispatch records completed this many days ago are deleted;
    /// `None` (`PRUNE_DISPATCHES_DAYS=0`) keeps them.
    pub prune_dispatches_after_days: Option<u32>,
    /// How often the prune task runs (once per tick across all workers).
    pub prune_interval: Duration,
    /// Retry policy of each job kind (`JOB_RETRY_FAN_OUT`, `JOB_RETRY_DIGEST`,
    /// `JOB_RETRY_TEST_PUSH`).
    pub retry_policies: Vec<(&'static str, RetryPolicy)>,
}

impl WorkerSettings {
    /// The retry policy of job kind `kind`.
    pub fn retry_policy(&self, kind: &str) -> RetryPolicy {
        self.retry_policies
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or_else(|| crate::jobs::default_retry_policy(kind), |(_, p)| *p)
    }
}

/// Reads `JOB_RETRY_<KIND>` for each job kind, defaulting to the kind's own policy.
fn parse_retry_policies(env: &Env<'_>) -> Result<Vec<(&'static str, RetryPolicy)>, SettingsError> {
    const NAMES: [&str; 5] = [
        "JOB_RETRY_FAN_OUT",
        "JOB_RETRY_DIGEST",
        "JOB_RETRY_TEST_PUSH",
        "JOB_RETRY_INVALIDATE_CACHE",
        "JOB_RETRY_TRIM_CACHES",
    ];
    crate::jobs::KINDS
        .iter()
        .zip(NAMES)
        .map(|(kind, name)| {
            let policy = match env.get(name) {
                Some(raw) => RetryPolicy::parse(raw).map_err(|problem| SettingsError { name, problem })?,
                None => crate::jobs::default_retry_policy(kind),
            };
            Ok((*kind, policy))
        })
        .collect()
}

/// Loads `.env` (if present) into the process environment, under what is already set.
/// A missing `.env` is normal; a malformed one is reported by the values it breaks.
pub fn load_dotenv() {
    let _ = dotenvy::dotenv();
}

impl Settings {
    /// Reads `.env` (if present) and then the process environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        load_dotenv();
        Self::from_map(&std::env::vars().collect())
    }

    /// Builds settings from a map of variables (the environment, or a test's map).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, SettingsError> {
        let env = Env(vars);
        let bind: SocketAddr = env.parse("BIND", "127.0.0.1:8000")?;
        let public_url = match env.get("PUBLIC_URL") {
            Some(raw) => parse_base_url("PUBLIC_URL", raw)?,
            None => parse_base_url("PUBLIC_URL", &format!("http://{bind}"))?,
        };
        let secret_key = env.get("SECRET_KEY").map(|s| SecretString::from(s.to_owned()));
        if let Some(key) = env.get("SECRET_KEY")
            && key.len() < 32
        {
            return Err(SettingsError { name: "SECRET_KEY", problem: "must be at least 32 characters".into() });
        }
        let allowed_hosts = match env.get("PUSH_ALLOWED_HOSTS") {
            Some(raw) => PushHostPolicy::parse(raw)
                .map_err(|e| SettingsError { name: "PUSH_ALLOWED_HOSTS", problem: e.to_string() })?,
            None => PushHostPolicy::default(),
        };
        let vapid_subject = env.get("VAPID_SUBJECT").unwrap_or("mailto:admin@localhost");
        if !(vapid_subject.starts_with("mailto:") || vapid_subject.starts_with("https:")) {
            return Err(SettingsError { name: "VAPID_SUBJECT", problem: "must start with mailto: or https:".into() });
        }
        Ok(Self {
            database_url: env.get("DATABASE_URL").unwrap_or("sqlite://data/tidings.sqlite?mode=rwc").to_owned(),
            redis_url: env.get("REDIS_URL").unwrap_or("redis://127.0.0.1:6379").to_owned(),
            redis_namespace: env.get("REDIS_NAMESPACE").unwrap_or("tidings").to_owned(),
            web: WebSettings {
                bind,
                public_url,
                secret_key,
                submit_rate_limit: env.parse("SUBMIT_RATE_LIMIT", "10")?,
                sw_cache_entries: env.parse("SW_CACHE_ENTRIES", "50")?,
                trusted_proxies: parse_ip_list("TRUSTED_PROXIES", env.get("TRUSTED_PROXIES").unwrap_or_default())?,
            },
            push: PushSettings {
                vapid_private_key: env.get("VAPID_PRIVATE_KEY").map(|s| SecretString::from(s.to_owned())),
                vapid_public_key: env.get("VAPID_PUBLIC_KEY").map(str::to_owned),
                vapid_subject: vapid_subject.to_owned(),
                allowed_hosts,
                ttl: Duration::from_secs(env.parse("PUSH_TTL_SECS", "3600")?),
                request_timeout: Duration::from_millis(env.parse("PUSH_TIMEOUT_MS", "10000")?),
                concurrency: env.parse("PUSH_CONCURRENCY", "64")?,
                max_attempts: env.parse("PUSH_MAX_ATTEMPTS", "5")?,
                retry_base: Duration::from_millis(env.parse("PUSH_RETRY_BASE_MS", "1000")?),
                retry_cap: Duration::from_secs(env.parse("PUSH_RETRY_CAP_SECS", "600")?),
            },
            cache: crate::cache::CacheSettings {
                enabled: env.parse("CACHE_ENABLED", "true")?,
                max_entries: env.parse::<u64>("CACHE_MAX_ENTRIES", "10000")?.max(1),
                max_bytes: env.parse::<u64>("CACHE_MAX_BYTES", "33554432")?.max(1024),
                ttl: Duration::from_secs(env.parse::<u64>("CACHE_TTL_SECS", "600")?.max(1)),
                deploy_version: env.get("CACHE_VERSION").unwrap_or_default().to_owned(),
            },
            budgets: RedisBudgets {
                sessions: env.parse("SESSIONS_MAX_KEYS", "10000")?,
                rate_limits: env.parse("RATE_LIMITS_MAX_KEYS", "50000")?,
                idempotency_keys: env.parse("IDEMPOTENCY_MAX_KEYS", "20000")?,
            },
            worker: WorkerSettings {
                relay_interval: Duration::from_millis(env.parse("RELAY_INTERVAL_MS", "1000")?),
                relay_grace: parse_relay_grace(env.parse("RELAY_GRACE_MS", "5000")?)?,
                poll_interval: Duration::from_millis(env.parse("QUEUE_POLL_MS", "1000")?),
                shutdown_timeout: Duration::from_secs(env.parse("SHUTDOWN_TIMEOUT_SECS", "30")?),
                max_backlog: parse_backlog(env.parse("QUEUE_MAX_BACKLOG", "5000")?)?,
                burst_threshold: env.parse("NOTIFY_BURST_THRESHOLD", "6")?,
                job_retention: Duration::from_secs(env.parse("JOB_RETENTION_SECS", "3600")?),
                job_retention_count: env.parse("JOB_RETENTION_COUNT", "10000")?,
                poison_after: env.parse::<u64>("POISON_AFTER", "3")?.max(1),
                retry_policies: parse_retry_policies(&env)?,
                prune_failing_after_days: Some(env.parse::<u32>("PRUNE_FAILING_SUBSCRIPTIONS_DAYS", "7")?)
                    .filter(|days| *days > 0),
                prune_dispatches_after_days: Some(env.parse::<u32>("PRUNE_DISPATCHES_DAYS", "30")?)
                    .filter(|days| *days > 0),
                prune_interval: Duration::from_millis(env.parse::<u64>("PRUNE_INTERVAL_MS", "3600000")?.max(10)),
                recovery: parse_recovery(env.parse::<u64>("WORKER_RECOVERY_SECS", "30")?)?,
                trim_interval: Duration::from_millis(env.parse::<u64>("TRIM_INTERVAL_MS", "60000")?.max(10)),
                burst_window: Duration::from_secs(env.parse::<u64>("NOTIFY_BURST_WINDOW_SECS", "60")?.max(1)),
                metrics_bind: match env.get("WORKER_METRICS_BIND").unwrap_or("127.0.0.1:9187") {
                    "off" => None,
                    raw => Some(raw.parse().map_err(|_| SettingsError {
                        name: "WORKER_METRICS_BIND",
                        problem: format!("{raw:?} is not an address like 127.0.0.1:9187 (or \"off\")"),
                    })?),
                },
            },
        })
    }
}

fn parse_url(name: &'static str, raw: &str) -> Result<Url, SettingsError> {
    Url::parse(raw).map_err(|e| SettingsError { name, problem: format!("not a URL: {e}") })
}

/// The Redis backlog bound: at least 1, and below the fetch limit of apalis-redis.
fn parse_backlog(value: u64) -> Result<u64, SettingsError> {
    if value == 0 || value > 7000 {
        return Err(SettingsError { name: "QUEUE_MAX_BACKLOG", problem: "must be between 1 and 7000".into() });
    }
    Ok(value)
}

/// The shortest relay grace: five times the 50 ms in which the web marks the records
/// it enqueued. A shorter grace would have the relay enqueue again, under the same
/// idempotency key, records the web had just enqueued: dropped by Redis, but wasted work.
pub const MIN_RELAY_GRACE_MS: u64 = 250;

/// The relay's grace, in milliseconds: at least [`MIN_RELAY_GRACE_MS`].
fn parse_relay_grace(ms: u64) -> Result<Duration, SettingsError> {
    if ms < MIN_RELAY_GRACE_MS {
        return Err(SettingsError {
            name: "RELAY_GRACE_MS",
            problem: format!(
                "must be at least {MIN_RELAY_GRACE_MS} (the web marks what it enqueued within 50 ms; a shorter grace \
                 has the relay enqueue it again)"
            ),
        });
    }
    Ok(Duration::from_millis(ms))
}

/// The recovery bound: at least 4 s, because apalis-redis compares heartbeats in whole
/// seconds (a quarter of the bound is the heartbeat, three of them mark a worker dead;
/// below one second per heartbeat, live workers would be taken for dead).
fn parse_recovery(secs: u64) -> Result<Duration, SettingsError> {
    if secs < 4 {
        return Err(SettingsError {
            name: "WORKER_RECOVERY_SECS",
            problem: "must be at least 4 (heartbeats are counted in whole seconds)".into(),
        });
    }
    Ok(Duration::from_secs(secs))
}

/// A comma-separated list of IP addresses.
fn parse_ip_list(name: &'static str, raw: &str) -> Result<Vec<std::net::IpAddr>, SettingsError> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| SettingsError { name, problem: format!("{s:?} is not an IP address") }))
        .collect()
}

/// A base URL links are joined onto: http(s), and ending in `/` so that
/// `https://example.com/tidings` keeps its path when `admin/...` is joined.
fn parse_base_url(name: &'static str, raw: &str) -> Result<Url, SettingsError> {
    let with_slash = if raw.ends_with('/') { raw.to_owned() } else { format!("{raw}/") };
    let url = parse_url(name, &with_slash)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(SettingsError { name, problem: "must be an http or https URL".into() });
    }
    Ok(url)
}

/// Read access to the variables, treating empty values as unset.
struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn parse<T>(&self, name: &'static str, default: &str) -> Result<T, SettingsError>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        let raw = self.get(name).unwrap_or(default);
        raw.parse().map_err(|e| SettingsError { name, problem: format!("{raw:?} is not valid: {e}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let settings = Settings::from_map(&HashMap::new()).expect("defaults are valid");
        assert_eq!(settings.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(settings.web.bind.port(), 8000);
        assert_eq!(settings.push.ttl, Duration::from_secs(3600));
    }

    #[test]
    fn a_bad_number_names_its_variable() {
        let vars = HashMap::from([("SUBMIT_RATE_LIMIT".to_owned(), "ten".to_owned())]);
        let err = Settings::from_map(&vars).expect_err("must fail");
        assert_eq!(err.name, "SUBMIT_RATE_LIMIT");
    }

    #[test]
    fn a_short_secret_key_is_refused() {
        let vars = HashMap::from([("SECRET_KEY".to_owned(), "short".to_owned())]);
        assert_eq!(Settings::from_map(&vars).expect_err("must fail").name, "SECRET_KEY");
    }

    #[test]
    fn public_url_keeps_its_path_as_a_base() {
        let vars = HashMap::from([("PUBLIC_URL".to_owned(), "https://example.com/tidings".to_owned())]);
        let settings = Settings::from_map(&vars).expect("valid");
        assert_eq!(settings.web.public_url.as_str(), "https://example.com/tidings/");
        let vars = HashMap::from([("PUBLIC_URL".to_owned(), "ftp://example.com/".to_owned())]);
        assert_eq!(Settings::from_map(&vars).expect_err("must fail").name, "PUBLIC_URL");
    }

    #[test]
    fn cookies_are_secure_except_for_plain_http_on_this_machine() {
        let with = |url: &str| {
            let vars = HashMap::from([("PUBLIC_URL".to_owned(), url.to_owned())]);
            Settings::from_map(&vars).expect("valid").web.secure_cookies()
        };
        assert!(!with("http://127.0.0.1:8000/"));
        assert!(!with("http://localhost:8000/"));
        assert!(with("http://example.com/"));
        assert!(with("https://example.com/"));
    }

    #[test]
    fn retry_policies_default_per_kind_and_can_be_set() {
        let settings = Settings::from_map(&HashMap::new()).expect("defaults are valid");
        assert_eq!(settings.worker.retry_policy("test_push").max_attempts, 3);
        let vars = HashMap::from([("JOB_RETRY_DIGEST".to_owned(), "2/100/100".to_owned())]);
        let settings = Settings::from_map(&vars).expect("valid");
        assert_eq!(settings.worker.retry_policy("digest").max_attempts, 2);
        assert_eq!(settings.worker.retry_policy("fan_out"), crate::jobs::default_retry_policy("fan_out"));
        let vars = HashMap::from([("JOB_RETRY_FAN_OUT".to_owned(), "0/1/1".to_owned())]);
        assert_eq!(Settings::from_map(&vars).expect_err("must fail").name, "JOB_RETRY_FAN_OUT");
        let vars = HashMap::from([("WORKER_RECOVERY_SECS".to_owned(), "2".to_owned())]);
        assert_eq!(Settings::from_map(&vars).expect_err("must fail").name, "WORKER_RECOVERY_SECS");
    }

    #[test]
    fn the_relay_grace_leaves_the_web_time_to_mark_what_it_enqueued() {
        let with = |ms: &str| Settings::from_map(&HashMap::from([("RELAY_GRACE_MS".to_owned(), ms.to_owned())]));
        let err = with("0").expect_err("must fail");
        assert_eq!(err.name, "RELAY_GRACE_MS");
        assert!(err.problem.contains("at least 250"), "{}", err.problem);
        assert_eq!(with("249").expect_err("must fail").name, "RELAY_GRACE_MS");
        assert_eq!(with("250").expect("valid").worker.relay_grace, Duration::from_millis(250));
        assert_eq!(with("5000").expect("valid").worker.relay_grace, Duration::from_secs(5));
    }

    #[test]
    fn trusted_proxies_are_ip_addresses() {
        let vars = HashMap::from([("TRUSTED_PROXIES".to_owned(), "10.0.0.1, ::1".to_owned())]);
        assert_eq!(Settings::from_map(&vars).expect("valid").web.trusted_proxies.len(), 2);
        let vars = HashMap::from([("TRUSTED_PROXIES".to_owned(), "proxy.local".to_owned())]);
        assert_eq!(Settings::from_map(&vars).expect_err("must fail").name, "TRUSTED_PROXIES");
    }
}
