//! `POST /admin/push/subscribe` and `/admin/push/unsubscribe`: the browser's
//! `PushSubscription.toJSON()`, sent by the admin page's script.
//!
//! Both need a logged-in admin, the CSRF token in `X-CSRF-Token`, and a same-origin
//! request (`Origin` matching the host, `Sec-Fetch-Site` not cross-site). The body is
//! parsed here, field by field, so a malformed one gets a 400 that says what is wrong
//! and invalid values a 422 per field; nothing is stored unless all of it is valid.

use poem::http::StatusCode;
use poem::session::Session;
use poem::web::{CsrfVerifier, Data, Json};
use poem::{Body, IntoResponse, Request, Response, handler};
use serde::Deserialize;
use shared::domain::NewSubscription;

use super::current_admin;
use crate::error::{Result, WebError};
use crate::state::AppState;

/// `PushSubscription.toJSON()`; unknown fields (`expirationTime`, …) are ignored.
#[derive(Debug, Deserialize)]
struct SubscribeBody {
    #[serde(default)]
    endpoint: String,
    #[serde(default)]
    keys: SubscriptionKeys,
}

#[derive(Debug, Default, Deserialize)]
struct SubscriptionKeys {
    #[serde(default)]
    p256dh: String,
    #[serde(default)]
    auth: String,
}

/// `{endpoint}`.
#[derive(Debug, Deserialize)]
struct UnsubscribeBody {
    #[serde(default)]
    endpoint: String,
}

/// Login, CSRF header and same-origin checks shared by both endpoints; the admin's id.
fn authorize(req: &Request, session: &Session, verifier: &CsrfVerifier) -> Result<i64> {
    let admin = current_admin(session).ok_or(WebError::Unauthorized)?;
    let token = req.headers().get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !verifier.is_valid(token) {
        return Err(WebError::Forbidden("missing or invalid X-CSRF-Token header; reload the page"));
    }
    if !same_origin(req) {
        return Err(WebError::Forbidden("cross-origin requests are not allowed"));
    }
    Ok(admin)
}

/// `Origin` (when sent) must name the host the request was sent to, and
/// `Sec-Fetch-Site` (when sent) must not say cross-site.
pub(super) fn same_origin(req: &Request) -> bool {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    match (header("origin"), header("host")) {
        (None, _) => true,
        (Some(origin), Some(host)) => {
            url::Url::parse(origin).ok().is_some_and(|o| o.host_str().is_some() && authority(&o) == host)
        }
        (Some(_), None) => false,
    }
}

/// `host[:port]` of `url`, as a `Host` header writes it.
fn authority(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        _ => String::new(),
    }
}

async fn parse_json<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T> {
    let bytes = body.into_vec().await.map_err(|_| WebError::BadRequest("could not read the request body".into()))?;
    serde_json::from_slice(&bytes).map_err(|e| WebError::BadRequest(format!("the body is not valid JSON: {e}")))
}

#[handler]
pub(super) async fn subscribe(
    req: &Request,
    state: Data<&AppState>,
    session: &Session,
    verifier: &CsrfVerifier,
    body: Body,
) -> Result<Response> {
    let admin = authorize(req, session, verifier)?;
    let body: SubscribeBody = parse_json(body).await?;
    let subscription =
        NewSubscription::parse(&body.endpoint, &body.keys.p256dh, &body.keys.auth, &state.settings.push.allowed_hosts)
            .map_err(WebError::Validation)?;
    let user_agent = req.headers().get("user-agent").and_then(|v| v.to_str().ok());
    shared::queries::subscription::upsert(&state.db, &subscription, admin, user_agent).await?;
    tracing::info!(admin_id = admin, "push.subscribed");
    Ok(Json(serde_json::json!({ "subscribed": true })).with_status(StatusCode::CREATED).into_response())
}

#[handler]
pub(super) async fn unsubscribe(
    req: &Request,
    state: Data<&AppState>,
    session: &Session,
    verifier: &CsrfVerifier,
    body: Body,
) -> Result<Response> {
    let admin = authorize(req, session, verifier)?;
    let body: UnsubscribeBody = parse_json(body).await?;
    // Only the owner's subscription is deleted; the answer is the same either way, so it
    // tells nothing about other admins' devices.
    let deleted = shared::queries::subscription::delete_owned(&state.db, &body.endpoint, admin).await?;
    tracing::info!(admin_id = admin, deleted, "push.unsubscribed");
    Ok(StatusCode::NO_CONTENT.into_response())
}
