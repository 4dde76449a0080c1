//! The Web Push sender: VAPID (RFC 8292), aes128gcm (RFC 8291), and what each answer of
//! a push service means for us.
//!
//! The `web-push` crate signs the VAPID JWT (one signature per push-service origin, cached);
//! the payload is encrypted by [`crate::encrypt`] (the same `aes128gcm` as `web-push`'s,
//! on `ring`, about three times cheaper). We send through one shared `reqwest` client so
//! that we control what `web-push`'s own clients don't: timeouts, no redirects, no proxy,
//! connection reuse, `Retry-After`, and which addresses may be reached at all (the worker
//! must not become a way into internal hosts).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use secrecy::{ExposeSecret, SecretString};
use shared::domain::{PushEndpoint, PushHostPolicy};
use url::Url;
use web_push::{SubscriptionInfo, VapidSignatureBuilder};

/// How long a VAPID JWT is valid (push services accept at most 24 h).
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// A cached signature is replaced this long before it expires.
const SIGNATURE_REFRESH_MARGIN: Duration = Duration::from_secs(3600);

/// Largest plaintext `web-push` can encrypt into one aes128gcm record.
pub const MAX_PAYLOAD: usize = 3052;

/// Where a push goes: one browser's subscription.
#[derive(Debug, Clone, Copy)]
pub struct PushTarget<'a> {
    /// The push service URL of the subscription.
    pub endpoint: &'a str,
    /// The browser's public key (base64url).
    pub p256dh: &'a str,
    /// The browser's auth secret (base64url).
    pub auth: &'a str,
}

/// What is sent.
#[derive(Debug, Clone, Copy)]
pub struct PushMessage<'a> {
    /// Plaintext payload (JSON).
    pub payload: &'a [u8],
    /// `Topic` header: a later push with the same topic replaces an undelivered one.
    pub topic: &'a str,
    /// `Urgency` header.
    pub urgency: Urgency,
}

/// RFC 8030 urgency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Delivered even to devices saving battery.
    High,
    /// The default.
    Normal,
}

/// What a push service's answer means for the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Accepted (2xx).
    Delivered,
    /// The subscription no longer exists (404/410): delete it.
    Gone {
        /// The status received.
        status: u16,
    },
    /// May succeed later (429, 5xx, timeouts, connection errors).
    Retry {
        /// Why, for the record.
        reason: String,
        /// The push service's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// Will not succeed by retrying (400, 401, 403, 413, a refused endpoint…).
    Rejected {
        /// The status received, if the request was sent at all.
        status: Option<u16>,
        /// Why, for the record.
        reason: String,
    },
}

/// Settings of a [`PushSender`].
#[derive(Clone)]
pub struct PushSenderConfig {
    /// The application server's VAPID private key (raw 32-byte scalar, base64url).
    pub vapid_private_key: SecretString,
    /// The VAPID `sub` claim (`mailto:` or `https:` contact).
    pub vapid_subject: String,
    /// `TTL` header: how long the push service keeps an undelivered message.
    pub ttl: Duration,
    /// Time limit of one request, connection included.
    pub request_timeout: Duration,
    /// Which endpoints may be reached (checked again at send, not only at subscribe).
    pub allowed_hosts: PushHostPolicy,
}

/// Why a sender could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PushSetupError {
    /// The VAPID private key is not a valid P-256 scalar in base64url.
    #[error("VAPID_PRIVATE_KEY is not a valid base64url P-256 private key")]
    InvalidVapidKey,
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A cached VAPID signature for one push-service origin.
#[derive(Clone)]
struct CachedSignature {
    /// The `Authorization` header it makes: `vapid t=<JWT>, k=<public key>`.
    header: String,
    refresh_at: Instant,
}

/// Sends Web Pushes; one per process, shared by all jobs.
pub struct PushSender {
    client: reqwest::Client,
    config: PushSenderConfig,
    /// The private key, padded to 32 bytes and re-encoded (what `web-push` parses).
    private_key: SecretString,
    signatures: Mutex<HashMap<String, CachedSignature>>,
}

impl std::fmt::Debug for PushSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushSender").field("ttl", &self.config.ttl).finish_non_exhaustive()
    }
}

impl PushSender {
    /// Builds the sender and its HTTP client.
    pub fn new(config: PushSenderConfig) -> Result<Self, PushSetupError> {
        let private_key = padded_private_key(config.vapid_private_key.expose_secret())?;
        let resolver = PublicOnlyResolver { allowed: Arc::new(config.allowed_hosts.explicit_origins()) };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .dns_resolver(Arc::new(resolver))
            .user_agent(concat!("tidings/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, config, private_key, signatures: Mutex::new(HashMap::new()) })
    }

    /// Sends `message` to `target` and classifies the answer. Never panics, never hangs
    /// longer than the request timeout.
    pub async fn send(&self, target: &PushTarget<'_>, message: &PushMessage<'_>) -> PushOutcome {
        match self.try_send(target, message).await {
            Ok(outcome) => outcome,
            Err(outcome) => outcome,
        }
    }

    async fn try_send(&self, target: &PushTarget<'_>, message: &PushMessage<'_>) -> Result<PushOutcome, PushOutcome> {
        let rejected = |reason: String| PushOutcome::Rejected { status: None, reason };
        let endpoint = PushEndpoint::parse(target.endpoint, &self.config.allowed_hosts)
            .map_err(|e| rejected(format!("endpoint refused: {e}")))?;
        let url = Url::parse(endpoint.as_str()).map_err(|e| rejected(format!("endpoint refused: {e}")))?;
        if let Some(reason) = self.refuse_address(&url) {
            return Err(rejected(reason));
        }
        if message.payload.len() > MAX_PAYLOAD {
            return Err(rejected(format!("payload of {} bytes exceeds {MAX_PAYLOAD}", message.payload.len())));
        }
        let authorization = self.signature_for(&url, target).map_err(rejected)?;
        let key = |name: &str, value: &str| {
            URL_SAFE_NO_PAD
                .decode(value.trim_end_matches('='))
                .map_err(|_| rejected(format!("the subscription's {name} is not base64url")))
        };
        let body =
            crate::encrypt::aes128gcm(&key("p256dh", target.p256dh)?, &key("auth", target.auth)?, message.payload)
                .map_err(|e| rejected(e.to_string()))?;
        let urgency = match message.urgency {
            Urgency::High => "high",
            Urgency::Normal => "normal",
        };
        let outgoing = self
            .client
            .post(url.clone())
            .header("TTL", self.config.ttl.as_secs().to_string())
            .header("Urgency", urgency)
            .header("Topic", message.topic)
            .header(reqwest::header::CONTENT_ENCODING, "aes128gcm")
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::AUTHORIZATION, authorization);
        // Spreads sends over the pooled connections instead of opening one per request.
        tokio::task::yield_now().await;
        let response = match outgoing.body(body).send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Ok(PushOutcome::Retry { reason: "timed out".into(), retry_after: None });
            }
            Err(e) => {
                let kind = if e.is_connect() { "connection failed" } else { "request failed" };
                return Ok(PushOutcome::Retry { reason: kind.into(), retry_after: None });
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = response.text().await.unwrap_or_default();
        Ok(classify(status, retry_after, &body))
    }

    /// The `Authorization` header for the endpoint's origin (a VAPID signature, re-signed
    /// only when close to expiry).
    fn signature_for(&self, url: &Url, target: &PushTarget<'_>) -> Result<String, String> {
        let audience = url.origin().ascii_serialization();
        let now = Instant::now();
        {
            let cache = self.signatures.lock().map_err(|_| "signature cache poisoned".to_owned())?;
            if let Some(cached) = cache.get(&audience)
                && cached.refresh_at > now
            {
                return Ok(cached.header.clone());
            }
        }
        let expires = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + SIGNATURE_LIFETIME;
        let info = SubscriptionInfo::new(target.endpoint, target.p256dh, target.auth);
        let mut builder = VapidSignatureBuilder::from_base64(self.private_key.expose_secret(), &info)
            .map_err(|e| format!("VAPID key: {e}"))?;
        builder.add_claim("sub", self.config.vapid_subject.as_str());
        // web-push would drop the port from `aud`; push services check the full origin.
        builder.add_claim("aud", audience.as_str());
        builder.add_claim("exp", expires.as_secs());
        let signature = builder.build().map_err(|e| format!("VAPID signing: {e}"))?;
        // RFC 8292 §3: the JWT and the public key, as `web-push` writes them.
        let header = format!("vapid t={}, k={}", signature.auth_t, URL_SAFE_NO_PAD.encode(&signature.auth_k));
        let refresh_at = now + SIGNATURE_LIFETIME - SIGNATURE_REFRESH_MARGIN;
        if let Ok(mut cache) = self.signatures.lock() {
            cache.insert(audience, CachedSignature { header: header.clone(), refresh_at });
        }
        Ok(header)
    }

    /// Refuses IP-literal endpoints on private, loopback or link-local addresses, unless
    /// that exact origin is allowed explicitly. Host names are checked by the resolver.
    fn refuse_address(&self, url: &Url) -> Option<String> {
        let ip = match url.host()? {
            url::Host::Ipv4(ip) => IpAddr::V4(ip),
            url::Host::Ipv6(ip) => IpAddr::V6(ip),
            url::Host::Domain(_) => return None,
        };
        if is_public(ip) || origin_allowed(&self.config.allowed_hosts.explicit_origins(), url) {
            return None;
        }
        Some("endpoint refused: it points at a private address".into())
    }
}

/// Counts a push by outcome and times it.
pub fn record(metrics: &shared::metrics::Registry, outcome: &PushOutcome, took: Duration) {
    let label = match outcome {
        PushOutcome::Delivered => "delivered",
        PushOutcome::Gone { .. } => "gone",
        PushOutcome::Retry { .. } => "retry",
        PushOutcome::Rejected { .. } => "rejected",
    };
    metrics.counter("tidings_pushes_total", "Pushes sent, by outcome.", &[("outcome", label)]).inc();
    metrics.histogram("tidings_push_duration_seconds", "Time to send one push and read the answer.", &[]).observe(took);
}

/// What an HTTP answer from a push service means.
pub fn classify(status: u16, retry_after: Option<Duration>, body: &str) -> PushOutcome {
    let detail = body.chars().take(200).collect::<String>();
    let reason =
        if detail.trim().is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {}", detail.trim()) };
    match status {
        200..=299 => PushOutcome::Delivered,
        404 | 410 => PushOutcome::Gone { status },
        408 | 429 | 500..=599 => PushOutcome::Retry { reason, retry_after },
        _ => PushOutcome::Rejected { status: Some(status), reason },
    }
}

/// `Retry-After` in seconds or as an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// `web-push` wants exactly 32 bytes; a scalar with leading zero bytes may be shorter.
fn padded_private_key(raw: &str) -> Result<SecretString, PushSetupError> {
    let bytes =
        URL_SAFE_NO_PAD.decode(raw.trim().trim_end_matches('=')).map_err(|_| PushSetupError::InvalidVapidKey)?;
    if bytes.is_empty() || bytes.len() > 32 {
        return Err(PushSetupError::InvalidVapidKey);
    }
    let mut padded = vec![0u8; 32 - bytes.len()];
    padded.extend_from_slice(&bytes);
    Ok(SecretString::from(URL_SAFE_NO_PAD.encode(padded)))
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

fn origin_allowed(allowed: &[Url], url: &Url) -> bool {
    allowed.iter().any(|a| a.origin() == url.origin())
}

/// Resolves host names and drops private addresses, so a push-service name that points
/// inside our network is never connected to (origins allowed explicitly excepted).
struct PublicOnlyResolver {
    allowed: Arc<Vec<Url>>,
}

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allowed = Arc::clone(&self.allowed);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let explicitly_allowed = allowed.iter().any(|a| a.host_str() == Some(host.as_str()));
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| explicitly_allowed || is_public(addr.ip()))
                .collect();
            if addrs.is_empty() {
                return Err("the push service resolves only to private addresses".into());
            }
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_the_push_services_document_them() {
        assert_eq!(classify(201, None, ""), PushOutcome::Delivered);
        assert_eq!(classify(404, None, ""), PushOutcome::Gone { status: 404 });
        assert_eq!(classify(410, None, ""), PushOutcome::Gone { status: 410 });
        let wait = Some(Duration::from_secs(3));
        assert!(matches!(classify(429, wait, ""), PushOutcome::Retry { retry_after, .. } if retry_after == wait));
        assert!(matches!(classify(503, None, ""), PushOutcome::Retry { .. }));
        for status in [400, 401, 403, 413] {
            assert!(
                matches!(classify(status, None, "no"), PushOutcome::Rejected { status: Some(s), .. } if s == status)
            );
        }
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn short_private_keys_are_padded_to_32_bytes() {
        let short = URL_SAFE_NO_PAD.encode([7u8; 31]);
        let padded = padded_private_key(&short).expect("valid");
        let bytes = URL_SAFE_NO_PAD.decode(padded.expose_secret()).expect("base64");
        assert_eq!(bytes.len(), 32);
        assert_eq!(bytes[0], 0);
        assert!(padded_private_key("not base64 !").is_err());
    }

    #[test]
    fn private_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip}");
        }
        assert!(is_public("142.250.74.100".parse().expect("ip")));
    }
}
