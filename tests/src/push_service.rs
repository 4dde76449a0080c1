//! A local Web Push service that behaves like the real ones (FCM, Mozilla autopush) and
//! checks every push it gets with implementations independent of the sender's:
//!
//! - browser-like subscriptions: a fresh P-256 key pair and auth secret each;
//! - `TTL` required (400), `Content-Encoding: aes128gcm` required (415);
//! - VAPID (RFC 8292): `Authorization: vapid t=<JWT>, k=<key>`, the ES256 signature
//!   verified with `p256`, `aud` equal to the endpoint's origin *with its port*, `exp`
//!   in the future and at most 24 h ahead, `sub` a `mailto:` or `https:` URI (401);
//!   a key other than the application server's → 403;
//! - `Topic` (≤ 32 URL-safe base64 characters) and `Urgency` values checked (400);
//! - bodies over 4096 bytes → 413; the body decrypted with the `ece` crate (400);
//! - then the scripted answer for that endpoint, if any (status, 429 + `Retry-After`,
//!   or a hang), else 201 and the push is recorded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use poem::http::{HeaderMap, StatusCode};
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::web::{Data, Path, RemoteAddr};
use poem::{Body, EndpointExt, Response, Route, Server, handler};
use tokio::sync::Notify;

/// An answer the stand-in gives instead of 201, once, for one endpoint.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// Answer with this status.
    Status(u16),
    /// Answer with `status` and `Retry-After: seconds`.
    RetryAfter {
        /// The status (usually 429 or 503).
        status: u16,
        /// The `Retry-After` value.
        seconds: u64,
    },
    /// Never answer (the sender's timeout must fire).
    Hang,
}

/// A push the stand-in accepted, decrypted.
#[derive(Clone, Debug)]
pub struct ReceivedPush {
    /// The subscription's endpoint URL.
    pub endpoint: String,
    /// The decrypted payload.
    pub payload: Vec<u8>,
    /// The `TTL` header.
    pub ttl: u64,
    /// The `Topic` header.
    pub topic: Option<String>,
    /// The `Urgency` header.
    pub urgency: Option<String>,
    /// The VAPID `sub` claim.
    pub vapid_subject: String,
    /// When it arrived.
    pub at: Instant,
}

impl ReceivedPush {
    /// The payload as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!("the push payload is not JSON ({e}): {}", String::from_utf8_lossy(&self.payload))
        })
    }
}

/// Any request that reached a push endpoint, with the answer given.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The endpoint URL.
    pub endpoint: String,
    /// The status answered (0 for a hang).
    pub status: u16,
    /// Why it was refused, when it was.
    pub rejection: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

/// A browser's subscription on the stand-in.
#[derive(Clone, Debug)]
pub struct BrowserSubscription {
    /// The push endpoint URL.
    pub endpoint: String,
    /// The public key, base64url (65-byte uncompressed P-256 point).
    pub p256dh: String,
    /// The auth secret, base64url (16 bytes).
    pub auth: String,
}

impl BrowserSubscription {
    /// What `PushSubscription.toJSON()` gives a page.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "endpoint": self.endpoint,
            "expirationTime": null,
            "keys": { "p256dh": self.p256dh, "auth": self.auth },
        })
    }
}

/// A browser's private side of a subscription.
struct Keys {
    components: ece::crypto::EcKeyComponents,
    auth: Vec<u8>,
}

#[derive(Default)]
struct State {
    subscriptions: HashMap<String, Keys>,
    scripts: HashMap<String, VecDeque<Scripted>>,
    received: Vec<ReceivedPush>,
    attempts: Vec<Attempt>,
    delay: Duration,
    expected_key: Option<String>,
    peers: HashSet<String>,
    /// Deferred mode: pushes accepted unchecked, checked by [`PushService::verify_deferred`].
    defer: bool,
    deferred: Vec<RawPush>,
}

/// A push accepted in deferred mode, kept as it came.
struct RawPush {
    id: String,
    endpoint: String,
    headers: HeaderMap,
    body: Vec<u8>,
    at: Instant,
}

struct Inner {
    origin: String,
    state: Mutex<State>,
    arrived: Notify,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The running stand-in; stops with the test's runtime.
pub struct PushService {
    inner: Arc<Inner>,
}

impl PushService {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start() -> anyhow::Result<Self> {
        let acceptor = TcpListener::bind("127.0.0.1:0").into_acceptor().await?;
        let port = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().map(|s| s.port()))
            .ok_or_else(|| anyhow::anyhow!("no local address"))?;
        let inner = Arc::new(Inner {
            origin: format!("http://127.0.0.1:{port}"),
            state: Mutex::new(State::default()),
            arrived: Notify::new(),
        });
        let app = Route::new()
            .at("/push/:id", poem::post(receive))
            .at("/received", poem::get(list_received))
            .data(Arc::clone(&inner));
        tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(app).await;
        });
        Ok(Self { inner })
    }

    /// Forgets everything since the start (subscriptions, scripts, the delay, the key
    /// expected, pushes received and deferred), for a new run on the same server.
    pub fn reset(&self) {
        *self.inner.state() = State::default();
    }

    /// `http://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        self.inner.origin.clone()
    }

    /// A new browser subscription with fresh keys.
    pub fn new_subscription(&self) -> BrowserSubscription {
        let (key_pair, auth) = ece::generate_keypair_and_auth_secret().expect("ece generates keys");
        let components = key_pair.raw_components().expect("raw key components");
        let public = key_pair.pub_as_raw().expect("raw public key");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let endpoint = format!("{}/push/{id}", self.inner.origin);
        self.inner.state().subscriptions.insert(id, Keys { components, auth: auth.to_vec() });
        BrowserSubscription { endpoint, p256dh: URL_SAFE_NO_PAD.encode(public), auth: URL_SAFE_NO_PAD.encode(auth) }
    }

    /// Queues answers for `endpoint`, used in order before the default 201.
    pub fn script(&self, endpoint: &str, answers: Vec<Scripted>) {
        self.inner.state().scripts.entry(endpoint.to_owned()).or_default().extend(answers);
    }

    /// Latency added before every answer.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.state().delay = delay;
    }

    /// The application server key pushes must be signed with (base64url, uncompressed).
    pub fn expect_vapid_public_key(&self, key: &str) {
        self.inner.state().expected_key = Some(key.trim_end_matches('=').to_owned());
    }

    /// Accepted pushes, in arrival order.
    pub fn received(&self) -> Vec<ReceivedPush> {
        self.inner.state().received.clone()
    }

    /// Deferred mode (benchmarks): answer 201 at once and keep each push as it came, so
    /// checking and decrypting do not compete with the sender for the CPU during a timed
    /// window; [`PushService::verify_deferred`] checks them all afterwards. Scripts are
    /// not consulted in this mode.
    pub fn set_deferred(&self, defer: bool) {
        self.inner.state().defer = defer;
    }

    /// Checks every push kept in deferred mode exactly as an undeferred one is checked
    /// (VAPID signature and claims, headers, decryption) and moves the good ones to
    /// [`PushService::received`] with their arrival time; returns the refusals.
    pub fn verify_deferred(&self) -> Vec<String> {
        let raw = std::mem::take(&mut self.inner.state().deferred);
        let mut refusals = Vec::new();
        for push in raw {
            match check(&self.inner, &push.id, &push.endpoint, &push.headers, &push.body) {
                Ok(mut received) => {
                    received.at = push.at;
                    self.inner.state().received.push(received);
                }
                Err((status, reason)) => refusals.push(format!("{}: {status} {reason}", push.endpoint)),
            }
        }
        self.inner.arrived.notify_waiters();
        refusals
    }

    /// Waits until `n` pushes are kept in deferred mode or `timeout` passed; returns how
    /// many are.
    pub async fn wait_for_deferred(&self, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.arrived.notified();
            let count = self.deferred_count();
            if count >= n || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.deferred_count();
            }
        }
    }

    /// Pushes kept in deferred mode and not verified yet.
    pub fn deferred_count(&self) -> usize {
        self.inner.state().deferred.len()
    }

    /// How many pushes were accepted so far (without copying them).
    pub fn received_count(&self) -> usize {
        self.inner.state().received.len()
    }

    /// [`PushService::received_count`] as a function another task can keep.
    pub fn received_counter(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let inner = Arc::clone(&self.inner);
        move || inner.state().received.len()
    }

    /// Every request to a push endpoint, in arrival order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.inner.state().attempts.clone()
    }

    /// Waits until `n` pushes were accepted or `timeout` passed; returns what arrived.
    pub async fn wait_for_received(&self, n: usize, timeout: Duration) -> Vec<ReceivedPush> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.arrived.notified();
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.received();
            }
        }
    }

    /// Distinct client connections seen so far.
    pub fn connections_opened(&self) -> usize {
        self.inner.state().peers.len()
    }
}

/// `GET /received`: the decrypted pushes as JSON, for tests driven from outside Rust
/// (the browser tests poll it).
#[handler]
async fn list_received(inner: Data<&Arc<Inner>>) -> poem::web::Json<serde_json::Value> {
    let received: Vec<serde_json::Value> = inner
        .state()
        .received
        .iter()
        .map(|p| serde_json::json!({ "endpoint": p.endpoint, "payload": String::from_utf8_lossy(&p.payload) }))
        .collect();
    poem::web::Json(serde_json::Value::Array(received))
}

/// A refusal: status and reason.
type Refusal = (StatusCode, String);

#[handler]
async fn receive(
    Path(id): Path<String>,
    headers: &HeaderMap,
    remote: &RemoteAddr,
    body: Body,
    inner: Data<&Arc<Inner>>,
) -> Response {
    let endpoint = format!("{}/push/{id}", inner.origin);
    let at = Instant::now();
    let (delay, defer) = {
        let mut state = inner.state();
        state.peers.insert(remote.to_string());
        (state.delay, state.defer)
    };
    let body = body.into_vec().await.unwrap_or_default();
    if defer {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let raw = RawPush { id, endpoint: endpoint.clone(), headers: headers.clone(), body, at };
        inner.state().deferred.push(raw);
        inner.arrived.notify_waiters();
        return Response::builder()
            .status(StatusCode::CREATED)
            .header("Location", format!("{endpoint}/messages/{}", uuid::Uuid::new_v4().simple()))
            .finish();
    }
    let checked = check(&inner, &id, &endpoint, headers, &body);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let decided = {
        let mut state = inner.state();
        let decided = match checked {
            Err((status, reason)) => Some((status, Some(reason), None)),
            Ok(push) => match state.scripts.get_mut(&endpoint).and_then(VecDeque::pop_front) {
                Some(Scripted::Status(code)) => Some((status_of(code), Some(format!("scripted {code}")), None)),
                Some(Scripted::RetryAfter { status, seconds }) => {
                    Some((status_of(status), Some(format!("scripted {status}")), Some(seconds)))
                }
                Some(Scripted::Hang) => None,
                None => {
                    state.received.push(push);
                    Some((StatusCode::CREATED, None, None))
                }
            },
        };
        let (status, rejection) = match &decided {
            Some((status, rejection, _)) => (status.as_u16(), rejection.clone()),
            None => (0, Some("hang".to_owned())),
        };
        state.attempts.push(Attempt { endpoint: endpoint.clone(), status, rejection, at });
        decided
    };
    inner.arrived.notify_waiters();
    let Some((status, rejection, retry_after)) = decided else {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return Response::builder().status(StatusCode::GATEWAY_TIMEOUT).finish();
    };
    let mut response = Response::builder().status(status);
    if let Some(seconds) = retry_after {
        response = response.header("Retry-After", seconds.to_string());
    }
    if status == StatusCode::CREATED {
        response = response.header("Location", format!("{endpoint}/messages/{}", uuid::Uuid::new_v4().simple()));
    }
    response.body(rejection.unwrap_or_default())
}

fn status_of(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Everything a real push service checks, in the order they check it.
fn check(inner: &Inner, id: &str, endpoint: &str, headers: &HeaderMap, body: &[u8]) -> Result<ReceivedPush, Refusal> {
    let refuse = |status: StatusCode, reason: &str| (status, reason.to_owned());
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (components, auth, expected_key) = {
        let state = inner.state();
        let Some(keys) = state.subscriptions.get(id) else {
            return Err(refuse(StatusCode::NOT_FOUND, "no such subscription"));
        };
        let components = ece::crypto::EcKeyComponents::new(keys.components.private_key(), keys.components.public_key());
        (components, keys.auth.clone(), state.expected_key.clone())
    };
    let ttl = header("TTL")
        .and_then(|t| t.trim().parse::<u64>().ok())
        .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "TTL header missing or invalid"))?;
    if header("Content-Encoding").as_deref() != Some("aes128gcm") {
        return Err(refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Encoding must be aes128gcm"));
    }
    let authorization =
        header("Authorization").ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "Authorization header missing"))?;
    let vapid = parse_vapid(&authorization).map_err(|e| refuse(StatusCode::UNAUTHORIZED, &e))?;
    let subject = verify_vapid(&vapid, &inner.origin).map_err(|e| refuse(StatusCode::UNAUTHORIZED, &e))?;
    if expected_key.is_some_and(|expected| expected != vapid.key.trim_end_matches('=')) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "VAPID key does not match the subscription's application server key",
        ));
    }
    let topic = header("Topic");
    if let Some(topic) = &topic
        && (topic.len() > 32 || !topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(refuse(StatusCode::BAD_REQUEST, "Topic must be at most 32 URL-safe base64 characters"));
    }
    let urgency = header("Urgency");
    if let Some(urgency) = &urgency
        && !["very-low", "low", "normal", "high"].contains(&urgency.as_str())
    {
        return Err(refuse(StatusCode::BAD_REQUEST, "Urgency must be very-low, low, normal or high"));
    }
    if body.len() > 4096 {
        return Err(refuse(StatusCode::PAYLOAD_TOO_LARGE, "payload over 4096 bytes"));
    }
    let payload = ece::decrypt(&components, &auth, body)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, &format!("could not decrypt the payload: {e}")))?;
    Ok(ReceivedPush {
        endpoint: endpoint.to_owned(),
        payload,
        ttl,
        topic,
        urgency,
        vapid_subject: subject,
        at: Instant::now(),
    })
}

/// The parts of `vapid t=…, k=…`.
struct Vapid {
    token: String,
    key: String,
}

fn parse_vapid(header: &str) -> Result<Vapid, String> {
    let rest = header.strip_prefix("vapid ").ok_or("Authorization must use the vapid scheme")?;
    let mut token = None;
    let mut key = None;
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(t) = part.strip_prefix("t=") {
            token = Some(t.to_owned());
        } else if let Some(k) = part.strip_prefix("k=") {
            key = Some(k.to_owned());
        }
    }
    Ok(Vapid { token: token.ok_or("vapid t= missing")?, key: key.ok_or("vapid k= missing")? })
}

/// Verifies the JWT; returns its `sub`.
fn verify_vapid(vapid: &Vapid, origin: &str) -> Result<String, String> {
    let decode = |s: &str| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).map_err(|_| "bad base64url".to_owned());
    let key = VerifyingKey::from_sec1_bytes(&decode(&vapid.key)?).map_err(|_| "k is not a P-256 public key")?;
    let mut parts = vapid.token.split('.');
    let (Some(header), Some(claims), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the JWT must have three parts".into());
    };
    let header_json: serde_json::Value =
        serde_json::from_slice(&decode(header)?).map_err(|_| "the JWT header is not JSON")?;
    if header_json["alg"] != "ES256" {
        return Err("the JWT must be signed with ES256".into());
    }
    let signature = Signature::from_slice(&decode(signature)?).map_err(|_| "the JWT signature is not r||s")?;
    key.verify(format!("{header}.{claims}").as_bytes(), &signature).map_err(|_| "bad JWT signature")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&decode(claims)?).map_err(|_| "the JWT claims are not JSON")?;
    if claims["aud"].as_str() != Some(origin) {
        return Err(format!("aud must be {origin}, got {}", claims["aud"]));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let exp = claims["exp"].as_u64().ok_or("exp missing")?;
    if exp <= now || exp > now + 24 * 3600 {
        return Err("exp must be in the future and at most 24 h ahead".into());
    }
    let sub = claims["sub"].as_str().ok_or("sub missing")?;
    if !(sub.starts_with("mailto:") || sub.starts_with("https:")) {
        return Err("sub must be a mailto: or https: URI".into());
    }
    Ok(sub.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vapid_headers_are_parsed() {
        let v = parse_vapid("vapid t=a.b.c, k=KEY").expect("valid");
        assert_eq!(v.token, "a.b.c");
        assert_eq!(v.key, "KEY");
        assert!(parse_vapid("WebPush a.b.c").is_err());
        assert!(parse_vapid("vapid t=a.b.c").is_err());
    }

    /// A push with the right headers and no VAPID signature.
    async fn unsigned_push(client: &reqwest::Client, endpoint: &str) -> reqwest::Response {
        client
            .post(endpoint)
            .header("TTL", "60")
            .header("Content-Encoding", "aes128gcm")
            .body(vec![0u8; 10])
            .send()
            .await
            .expect("sent")
    }

    #[tokio::test]
    async fn unknown_endpoints_missing_ttl_and_bad_vapid_are_refused() {
        let service = PushService::start().await.expect("starts");
        let browser = service.new_subscription();
        let client = reqwest::Client::new();
        let unknown = client.post(format!("{}/push/nope", service.origin())).send().await.expect("sent");
        assert_eq!(unknown.status(), 404);
        let no_ttl = client.post(&browser.endpoint).send().await.expect("sent");
        assert_eq!(no_ttl.status(), 400);
        let no_vapid = unsigned_push(&client, &browser.endpoint).await;
        assert_eq!(no_vapid.status(), 401);
        assert_eq!(service.attempts().len(), 3);
        assert!(service.received().is_empty());
    }

    #[tokio::test]
    async fn deferred_pushes_are_accepted_at_once_and_checked_all_the_same_afterwards() {
        let service = PushService::start().await.expect("starts");
        let browser = service.new_subscription();
        service.set_deferred(true);
        let client = reqwest::Client::new();
        let forged = unsigned_push(&client, &browser.endpoint).await;
        assert_eq!(forged.status(), 201, "answered without looking");
        assert_eq!(service.deferred_count(), 1);

        let refusals = service.verify_deferred();

        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert!(refusals[0].contains("401"), "{refusals:?}");
        assert!(service.received().is_empty());
        assert_eq!(service.deferred_count(), 0);
    }
}
