//! The admin area, mounted at `/admin`: login and logout, the inbox, a message's page
//! (the notification's click target) and the push-subscription endpoints.
//!
//! Every route sits behind a server-side session ([`crate::session::RedisSessions`]);
//! every page and JSON answer is `Cache-Control: no-store`; every state change needs the
//! CSRF token (form field, or `X-CSRF-Token` for JSON).

mod notifications;
mod push;
mod queues;

use std::time::{SystemTime, UNIX_EPOCH};

use poem::http::{HeaderValue, StatusCode, header};
use poem::session::{CookieConfig, ServerSession, Session};
use poem::web::cookie::SameSite;
use poem::web::{CsrfToken, CsrfVerifier, Data, Form, Path, Query, Redirect};
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route, get, handler, post};
use serde::Deserialize;
use shared::domain::EmailAddress;

use crate::cache::ReadCache;
use crate::error::{Result, WebError};
use crate::session::{ABSOLUTE_TIMEOUT, IDLE_TIMEOUT, LoginThrottle, RedisSessions};
use crate::state::AppState;
use crate::templates::{
    AdminFeedback, AdminFeedbackMessage, AdminInbox, AdminLogin, InboxLine, MessageView, PREVIEW_CHARS, render,
};
use shared::cache::Cover;
use shared::queries::feedback::PageFrom;

/// Messages per inbox page.
const PER_PAGE: u64 = 50;

/// Session keys.
const ADMIN_ID: &str = "admin_id";
const LOGGED_IN_AT: &str = "logged_in_at";
const SEEN_AT: &str = "seen_at";

/// Activity is written back to the session at most this often (each write renews the
/// idle timeout of the session's Redis key).
const SEEN_RESOLUTION_SECS: u64 = 60;

/// The routes of the admin area, mounted at `/admin`.
pub fn router(state: &AppState) -> poem::endpoint::BoxEndpoint<'static> {
    let secure = state.settings.web.secure_cookies();
    let cookie = CookieConfig::new()
        .name("tidings-session")
        .path("/admin")
        .http_only(true)
        .secure(secure)
        .same_site(SameSite::Lax)
        .max_age(ABSOLUTE_TIMEOUT);
    let sessions = RedisSessions::new(state.dispatcher.clone(), &state.settings.redis_namespace);
    Route::new()
        .at("/", get(inbox))
        .at("/counts", get(counts_json))
        .at("/login", get(login_form).post(login))
        .at("/logout", post(logout))
        .at("/feedback/:id", get(detail))
        .at("/feedback/:id/handled", post(mark_handled))
        .at("/feedback/:id/delete", post(delete))
        .at("/notifications", get(notifications::page))
        .at("/notifications/test", post(notifications::send_test))
        .at("/notifications/remove", post(notifications::remove))
        .at("/sw.js", get(notifications::service_worker))
        .at("/queues", get(queues::page))
        .at("/queues/dead/:id/:action", post(queues::settle))
        .at("/push/subscribe", post(push::subscribe))
        .at("/push/unsubscribe", post(push::unsubscribe))
        .with(ServerSession::new(cookie, sessions))
        .around(no_store)
        .boxed()
}

/// Admin answers are private and change with every action: never stored by caches.
async fn no_store<E: Endpoint>(ep: E, req: Request) -> poem::Result<Response> {
    let mut response = ep.call(req).await?.into_response();
    // The service worker sets its own (`no-cache`): browsers must be able to keep it.
    if !response.headers().contains_key(header::CACHE_CONTROL) {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    Ok(response)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The logged-in admin's id; `None` (and the session purged) once it expired: idle for
/// longer than the idle timeout, or older than the absolute one.
pub fn current_admin(session: &Session) -> Option<i64> {
    let id = session.get::<i64>(ADMIN_ID)?;
    let now = now_secs();
    let logged_in_at = session.get::<u64>(LOGGED_IN_AT).unwrap_or(0);
    let seen_at = session.get::<u64>(SEEN_AT).unwrap_or(logged_in_at);
    if now.saturating_sub(logged_in_at) > ABSOLUTE_TIMEOUT.as_secs()
        || now.saturating_sub(seen_at) > IDLE_TIMEOUT.as_secs()
    {
        session.purge();
        return None;
    }
    if now.saturating_sub(seen_at) >= SEEN_RESOLUTION_SECS {
        session.set(SEEN_AT, now);
    }
    Some(id)
}

/// A page that needs login sends visitors to the login form instead.
pub(super) fn to_login() -> Response {
    Redirect::see_other("/admin/login").into_response()
}

#[handler]
async fn login_form(session: &Session, token: &CsrfToken) -> Response {
    if current_admin(session).is_some() {
        return Redirect::see_other("/admin/").into_response();
    }
    render(StatusCode::OK, &AdminLogin { csrf_token: &token.0, email: "", error: "" })
}

/// The login form's fields; nothing else is read.
#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    csrf_token: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

#[handler]
async fn login(
    req: &Request,
    state: Data<&AppState>,
    session: &Session,
    token: &CsrfToken,
    verifier: &CsrfVerifier,
    Form(form): Form<LoginForm>,
) -> Result<Response> {
    if !verifier.is_valid(&form.csrf_token) || !push::same_origin(req) {
        return Err(WebError::Forbidden("This form has expired. Please reload the page and log in again."));
    }
    let address = super::client_ip(req, &state.settings.web.trusted_proxies).to_string();
    let throttle = LoginThrottle::new(state.dispatcher.clone(), &state.settings.redis_namespace);
    if let Err(retry_after_secs) = throttle.check(&form.email, &address).await.map_err(unavailable)? {
        tracing::warn!("admin.login_throttled");
        return Err(WebError::RateLimited { retry_after_secs });
    }
    let admin = match EmailAddress::parse(&form.email) {
        Ok(email) => shared::queries::admin::find_by_email(&state.db, &email).await?,
        Err(_) => None,
    };
    let hash = admin.as_ref().map(|a| a.password_hash.clone());
    let valid = crate::auth::password::verify(form.password, hash).await.map_err(WebError::Internal)?;
    match admin {
        Some(admin) if valid => {
            throttle.reset_account(&form.email, &address).await.map_err(unavailable)?;
            // A new session id at login: a planted or leaked pre-login id is worthless.
            session.renew();
            session.set(ADMIN_ID, admin.id);
            session.set(LOGGED_IN_AT, now_secs());
            session.set(SEEN_AT, now_secs());
            tracing::info!(admin_id = admin.id, "admin.logged_in");
            Ok(Redirect::see_other("/admin/").into_response())
        }
        _ => {
            throttle.record_failure(&form.email, &address).await.map_err(unavailable)?;
            tracing::info!("admin.login_failed");
            let page =
                AdminLogin { csrf_token: &token.0, email: &form.email, error: "Email or password is incorrect." };
            Ok(render(StatusCode::UNAUTHORIZED, &page))
        }
    }
}

fn unavailable(e: poem::Error) -> WebError {
    WebError::Unavailable(anyhow::anyhow!("{e}"))
}

/// The logout form's field.
#[derive(Debug, Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf_token: String,
}

#[handler]
async fn logout(
    req: &Request,
    session: &Session,
    verifier: &CsrfVerifier,
    Form(form): Form<LogoutForm>,
) -> Result<Response> {
    if !verifier.is_valid(&form.csrf_token) || !push::same_origin(req) {
        return Err(WebError::Forbidden("This form has expired. Please reload the page and try again."));
    }
    if let Some(id) = current_admin(session) {
        tracing::info!(admin_id = id, "admin.logged_out");
    }
    session.purge();
    Ok(Redirect::see_other("/admin/login").into_response())
}

/// `?page=` of the inbox, 1-based.
#[derive(Debug, Deserialize)]
struct PageQuery {
    /// Show messages older than this id.
    before: Option<i64>,
    /// Show messages newer than this id.
    after: Option<i64>,
}

#[handler]
async fn inbox(
    state: Data<&AppState>,
    session: &Session,
    token: &CsrfToken,
    Query(query): Query<PageQuery>,
) -> Result<Response> {
    if current_admin(session).is_none() {
        return Ok(to_login());
    }
    let (from, name) = match (query.before, query.after) {
        (Some(before), _) => (PageFrom::Before(before), format!("page:before:{before}")),
        (None, Some(after)) => (PageFrom::After(after), format!("page:after:{after}")),
        (None, None) => (PageFrom::Newest, "page:newest".to_owned()),
    };
    let cache = ReadCache::new(&state);
    let page =
        cache.get_or_load(&name, |page: &InboxPage| Some(page.cover(from)), || inbox_page(&state.db, from)).await?;
    let counts = inbox_counts(&cache, &state.db).await?;
    let InboxPage { messages, older, newer } = page;
    Ok(render(StatusCode::OK, &AdminInbox { csrf_token: &token.0, messages, older, newer, counts }))
}

/// `GET /admin/counts`: the inbox's figures as JSON (total, unread, arrivals per day), for
/// pages that refresh them without reloading the inbox.
#[handler]
async fn counts_json(state: Data<&AppState>, session: &Session) -> Result<Response> {
    if current_admin(session).is_none() {
        return Ok(to_login());
    }
    let counts = inbox_counts(&ReadCache::new(&state), &state.db).await?;
    Ok(poem::web::Json(counts).into_response())
}

/// The inbox's figures, through the cache.
async fn inbox_counts(
    cache: &ReadCache<'_>,
    db: &sea_orm::DatabaseConnection,
) -> Result<shared::queries::feedback::InboxCounts> {
    cache.get_or_load("counts", |_| Some(Cover::Everything), || shared::queries::feedback::counts(db, COUNT_DAYS)).await
}

/// Days the inbox counts arrivals for.
const COUNT_DAYS: u32 = 14;

/// One page of the inbox as the cache keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct InboxPage {
    messages: Vec<InboxLine>,
    older: Option<i64>,
    newer: Option<i64>,
}

impl InboxPage {
    /// The messages the page, read from `from`, shows. The first page, and a page with
    /// no newer link or room for more, also reach past the newest message: a new one
    /// would land on them or give them that link. (Not `newer` alone: a message committed
    /// between reading the rows and looking for newer ones gives the first page a newer
    /// link without showing it.)
    fn cover(&self, from: PageFrom) -> Cover {
        let lo = self.messages.last().map(|m| m.id);
        let open_above = match from {
            PageFrom::Newest => true,
            PageFrom::After(_) => self.newer.is_none() || (self.messages.len() as u64) < PER_PAGE,
            PageFrom::Before(_) => self.newer.is_none(),
        };
        let hi = if open_above { None } else { self.messages.first().map(|m| m.id) };
        Cover::Ids { lo, hi }
    }
}

/// Reads one page of the inbox: the rows and whether pages exist on either side (three
/// queries on the primary key, however deep the page).
async fn inbox_page(
    db: &sea_orm::DatabaseConnection,
    from: PageFrom,
) -> std::result::Result<InboxPage, sea_orm::DbErr> {
    let rows = shared::queries::feedback::keyset_page(db, from, PER_PAGE).await?;
    let (older, newer) = match (rows.last(), rows.first()) {
        (Some(oldest), Some(newest)) => {
            let (has_older, has_newer) = shared::queries::feedback::has_older_newer(db, oldest.id, newest.id).await?;
            (has_older.then_some(oldest.id), has_newer.then_some(newest.id))
        }
        _ => (None, None),
    };
    let messages = rows
        .into_iter()
        .map(|m| InboxLine {
            id: m.id,
            submitter_name: m.submitter_name,
            // The line shows a preview: keep just enough to know it was cut.
            content: m.content.chars().take(PREVIEW_CHARS + 1).collect(),
            created_at: m.created_at,
            read_at: m.read_at,
            handled: m.handled_at.is_some(),
        })
        .collect();
    Ok(InboxPage { messages, older, newer })
}

/// The handled toggle's form.
#[derive(Debug, Deserialize)]
struct HandledForm {
    #[serde(default)]
    csrf_token: String,
    /// `"true"` to mark handled, anything else to mark unhandled.
    #[serde(default)]
    handled: String,
}

#[handler]
async fn mark_handled(
    req: &Request,
    state: Data<&AppState>,
    session: &Session,
    verifier: &CsrfVerifier,
    Path(id): Path<i64>,
    Form(form): Form<HandledForm>,
) -> Result<Response> {
    if !verifier.is_valid(&form.csrf_token) || !push::same_origin(req) {
        return Err(WebError::Forbidden("This form has expired. Please reload the page and try again."));
    }
    let Some(admin) = current_admin(session) else { return Ok(to_login()) };
    let handled = form.handled == "true";
    if !shared::queries::feedback::set_handled(&state.db, id, handled).await? {
        return Err(WebError::NotFound);
    }
    ReadCache::new(&state).changed(&[id]).await;
    tracing::info!(admin_id = admin, feedback_id = id, handled, "feedback.handled_changed");
    Ok(Redirect::see_other(format!("/admin/feedback/{id}")).into_response())
}

/// A form with only a CSRF token.
#[derive(Debug, Deserialize)]
struct TokenOnly {
    #[serde(default)]
    csrf_token: String,
}

#[handler]
async fn delete(
    req: &Request,
    state: Data<&AppState>,
    session: &Session,
    verifier: &CsrfVerifier,
    Path(id): Path<i64>,
    Form(form): Form<TokenOnly>,
) -> Result<Response> {
    if !verifier.is_valid(&form.csrf_token) || !push::same_origin(req) {
        return Err(WebError::Forbidden("This form has expired. Please reload the page and try again."));
    }
    let Some(admin) = current_admin(session) else { return Ok(to_login()) };
    if !shared::queries::feedback::delete(&state.db, id).await? {
        return Err(WebError::NotFound);
    }
    ReadCache::new(&state).changed(&[id]).await;
    tracing::info!(admin_id = admin, feedback_id = id, "feedback.deleted");
    Ok(Redirect::see_other("/admin/").into_response())
}

#[handler]
async fn detail(state: Data<&AppState>, session: &Session, token: &CsrfToken, Path(id): Path<i64>) -> Result<Response> {
    if current_admin(session).is_none() {
        return Ok(to_login());
    }
    let cache = ReadCache::new(&state);
    let view = cache
        .get_or_load(
            &format!("detail:{id}"),
            |view: &Option<MessageView>| view.as_ref().map(|_| Cover::Ids { lo: Some(id), hi: Some(id) }),
            || message_view(&state.db, id),
        )
        .await?
        .ok_or(WebError::NotFound)?;
    // Opening a message the first time changes the unread count and the inbox line.
    if !view.read && shared::queries::feedback::mark_read(&state.db, id).await? {
        cache.changed(&[id]).await;
    }
    Ok(render(StatusCode::OK, &AdminFeedback { csrf_token: &token.0, view: &view }))
}

/// A message's page, rendered; `None` when there is no such message.
async fn message_view(
    db: &sea_orm::DatabaseConnection,
    id: i64,
) -> std::result::Result<Option<MessageView>, sea_orm::DbErr> {
    let Some(message) = shared::queries::feedback::find(db, id).await? else { return Ok(None) };
    let html = askama::Template::render(&AdminFeedbackMessage { message: &message })
        .map_err(|e| sea_orm::DbErr::Custom(format!("rendering message {id}: {e}")))?;
    Ok(Some(MessageView {
        id,
        submitter_name: message.submitter_name,
        html,
        handled: message.handled_at.is_some(),
        read: message.read_at.is_some(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(ids: std::ops::RangeInclusive<i64>, newer: Option<i64>) -> InboxPage {
        let messages = ids
            .rev()
            .map(|id| InboxLine {
                id,
                submitter_name: "Ann".into(),
                content: "hi".into(),
                created_at: chrono::Utc::now(),
                read_at: None,
                handled: false,
            })
            .collect();
        InboxPage { messages, older: None, newer }
    }

    #[test]
    fn the_first_page_reaches_past_the_newest_message_even_with_a_newer_link() {
        // A message committed between reading the rows and looking for newer ones.
        let first = page(51..=100, Some(100));
        assert_eq!(first.cover(PageFrom::Newest), Cover::Ids { lo: Some(51), hi: None });
        let deep = page(1..=50, Some(50));
        assert_eq!(deep.cover(PageFrom::Before(51)), Cover::Ids { lo: Some(1), hi: Some(50) });
        let short_after = page(90..=100, Some(100));
        assert_eq!(short_after.cover(PageFrom::After(89)), Cover::Ids { lo: Some(90), hi: None });
        let empty = InboxPage { messages: Vec::new(), older: None, newer: None };
        assert_eq!(empty.cover(PageFrom::Newest), Cover::Ids { lo: None, hi: None });
    }
}
