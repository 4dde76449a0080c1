//! `/admin/notifications`: the panel that subscribes this browser, the admin's devices
//! (with remove buttons), "Send test notification", and the admin service worker.

use poem::http::{StatusCode, header};
use poem::session::Session;
use poem::web::{CsrfToken, CsrfVerifier, Data, Form, Query, Redirect};
use poem::{IntoResponse, Request, Response, handler};
use serde::Deserialize;
use shared::jobs::TestPush;

use super::{current_admin, push::same_origin, to_login};
use crate::error::{Result, WebError};
use crate::state::AppState;
use crate::templates::{AdminNotifications, DeviceLine, render};

/// `?done=` after an action: which notice to show.
#[derive(Debug, Deserialize)]
pub(super) struct Notice {
    done: Option<String>,
}

#[handler]
pub(super) async fn page(
    state: Data<&AppState>,
    session: &Session,
    token: &CsrfToken,
    Query(notice): Query<Notice>,
) -> Result<Response> {
    let Some(admin) = current_admin(session) else { return Ok(to_login()) };
    let devices = shared::queries::subscription::of_owner(&state.db, admin)
        .await?
        .into_iter()
        .map(|s| DeviceLine {
            id: s.id,
            browser: browser_label(s.user_agent.as_deref().unwrap_or_default()),
            added: s.created_at.format("%Y-%m-%d").to_string(),
            last_delivery: s
                .last_success_at
                .map_or_else(|| "never".to_owned(), |t| t.format("%Y-%m-%d %H:%M UTC").to_string()),
        })
        .collect();
    let notice = match notice.done.as_deref() {
        Some("test") => "A test notification is on its way to your devices.",
        Some("removed") => "The device was removed; it gets no more notifications.",
        _ => "",
    };
    let page = AdminNotifications {
        csrf_token: &token.0,
        vapid_public_key: state.settings.push.vapid_public_key.as_deref().unwrap_or_default(),
        devices,
        notice,
    };
    Ok(render(StatusCode::OK, &page))
}

/// A form with only a CSRF token.
#[derive(Debug, Deserialize)]
pub(super) struct TokenForm {
    #[serde(default)]
    csrf_token: String,
}

/// Checks CSRF and origin of a form post; the admin's id, or where to go instead.
fn authorize_form(req: &Request, session: &Session, verifier: &CsrfVerifier, token: &str) -> Result<Option<i64>> {
    if !verifier.is_valid(token) || !same_origin(req) {
        return Err(WebError::Forbidden("This form has expired. Please reload the page and try again."));
    }
    Ok(current_admin(session))
}

#[handler]
pub(super) async fn send_test(
    req: &Request,
    state: Data<&AppState>,
    session: &Session,
    verifier: &CsrfVerifier,
    Form(form): Form<TokenForm>,
) -> Result<Response> {
    let Some(admin) = authorize_form(req, session, verifier, &form.csrf_token)? else { return Ok(to_login()) };
    let job = TestPush::new(admin);
    if let Some(runner) = state.dispatcher.immediate() {
        let payload = serde_json::to_vec(&job).map_err(|e| WebError::Unavailable(e.into()))?;
        runner.run_now(payload).await.map_err(|e| WebError::Unavailable(anyhow::anyhow!(e)))?;
    } else {
        let queue = state.dispatcher.queue().await.ok_or_else(|| {
            WebError::Unavailable(anyhow::anyhow!("redis is not reachable; the test notification was not queued"))
        })?;
        let request_id = crate::middleware::request_id::current();
        queue.enqueue_test_push(&job, request_id.as_deref()).await.map_err(|e| WebError::Unavailable(e.into()))?;
    }
    tracing::info!(admin_id = admin, "push.test_queued");
    Ok(Redirect::see_other("/admin/notifications?done=test").into_response())
}

/// The remove button's form.
#[derive(Debug, Deserialize)]
pub(super) struct RemoveForm {
    #[serde(default)]
    csrf_token: String,
    #[serde(default)]
    id: i64,
}

#[handler]
pub(super) async fn remove(
    req: &Request,
    state: Data<&AppState>,
    session: &Session,
    verifier: &CsrfVerifier,
    Form(form): Form<RemoveForm>,
) -> Result<Response> {
    let Some(admin) = authorize_form(req, session, verifier, &form.csrf_token)? else { return Ok(to_login()) };
    let deleted = shared::queries::subscription::delete_owned_by_id(&state.db, form.id, admin).await?;
    tracing::info!(admin_id = admin, subscription_id = form.id, deleted, "push.device_removed");
    Ok(Redirect::see_other("/admin/notifications?done=removed").into_response())
}

/// `/admin/sw.js`: scope `/admin/`, revalidated on every load so a deploy reaches
/// browsers at once; its version line changes with the assets.
#[handler]
pub(super) fn service_worker() -> Response {
    let body = format!(
        "// version {}\nconst ICON_URL = {:?};\n{}",
        crate::routes::assets::version(),
        crate::routes::assets::url("icon-192.png"),
        include_str!("../../../static/admin-sw.js"),
    );
    body.with_content_type("text/javascript; charset=utf-8")
        .with_header(header::CACHE_CONTROL, "no-cache")
        .into_response()
}

/// "Firefox on Linux" from a User-Agent header; "Unknown browser" when unsure.
pub fn browser_label(user_agent: &str) -> String {
    let browser = if user_agent.contains("Edg/") {
        "Edge"
    } else if user_agent.contains("Firefox/") {
        "Firefox"
    } else if user_agent.contains("Chrome/") || user_agent.contains("Chromium/") {
        "Chrome"
    } else if user_agent.contains("Safari/") {
        "Safari"
    } else {
        return "Unknown browser".into();
    };
    let system = if user_agent.contains("Android") {
        "Android"
    } else if user_agent.contains("iPhone") || user_agent.contains("iPad") {
        "iOS"
    } else if user_agent.contains("Windows") {
        "Windows"
    } else if user_agent.contains("Mac OS X") {
        "macOS"
    } else if user_agent.contains("Linux") {
        "Linux"
    } else {
        return browser.into();
    };
    format!("{browser} on {system}")
}

#[cfg(test)]
mod tests {
    use super::browser_label;

    #[test]
    fn user_agents_become_short_labels() {
        let firefox = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
        assert_eq!(browser_label(firefox), "Firefox on Linux");
        let chrome = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36";
        assert_eq!(browser_label(chrome), "Chrome on Windows");
        assert_eq!(browser_label("curl/8"), "Unknown browser");
    }
}
