//! Server-rendered pages (askama, auto-escaped). Every page works without JavaScript.

use askama::Template;
use poem::http::StatusCode;
use poem::web::Html;
use poem::{IntoResponse, Response};
use shared::domain::FieldErrors;

/// Renders `template` with `status`; a rendering failure (a bug) becomes a plain 500.
pub fn render<T: Template>(status: StatusCode, template: &T) -> Response {
    match template.render() {
        Ok(html) => Html(html).with_status(status).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "template.render failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "Internal error").into_response()
        }
    }
}

/// What the visitor typed, echoed back when the form is re-rendered with errors.
#[derive(Debug, Default, Clone)]
pub struct FeedbackValues {
    /// The name field.
    pub submitter_name: String,
    /// The email field.
    pub submitter_email: String,
    /// The message field.
    pub content: String,
}

/// `GET /feedback`, and the 422 re-render.
#[derive(Template)]
#[template(path = "feedback_form.html")]
pub struct FeedbackForm<'a> {
    /// The CSRF token for the hidden field.
    pub csrf_token: &'a str,
    /// The visitor's input (empty on first view).
    pub values: &'a FeedbackValues,
    /// Field errors (empty on first view).
    pub errors: &'a FieldErrors,
}

impl FeedbackForm<'_> {
    /// The messages for `field`, joined for display.
    pub fn error_for(&self, field: &str) -> String {
        self.errors.get(field).join("; ")
    }
}

/// `GET /feedback/thanks`.
#[derive(Template)]
#[template(path = "thanks.html")]
pub struct Thanks;

/// Any error page.
#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage<'a> {
    /// e.g. 404.
    pub status: u16,
    /// e.g. "Not Found".
    pub title: &'a str,
    /// A message for the user; never internal error text.
    pub message: &'a str,
}

/// An HTML error page for `status` saying `message`.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let page = ErrorPage { status: status.as_u16(), title: status.canonical_reason().unwrap_or("Error"), message };
    render(status, &page)
}

/// `GET /admin/login`, and the page re-rendered after a failed login.
#[derive(Template)]
#[template(path = "admin_login.html")]
pub struct AdminLogin<'a> {
    /// The CSRF token for the hidden field and the meta tag.
    pub csrf_token: &'a str,
    /// The email typed, kept after a failure.
    pub email: &'a str,
    /// A message for the admin (empty on first view).
    pub error: &'a str,
}

/// One line of the inbox.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InboxLine {
    /// The message.
    pub id: i64,
    /// Who wrote it.
    pub submitter_name: String,
    /// The first characters of the message.
    pub content: String,
    /// When it arrived.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When it was first opened.
    pub read_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether an admin marked it handled.
    pub handled: bool,
}

impl InboxLine {
    /// The first 80 characters of the message.
    pub fn preview(&self) -> String {
        let mut preview: String = self.content.chars().take(PREVIEW_CHARS).collect();
        if self.content.chars().count() > PREVIEW_CHARS {
            preview.push('…');
        }
        preview
    }
}

/// Characters of a message an inbox line shows.
pub const PREVIEW_CHARS: usize = 80;

/// `GET /admin/`.
#[derive(Template)]
#[template(path = "admin_inbox.html")]
pub struct AdminInbox<'a> {
    /// For the meta tag and the logout form.
    pub csrf_token: &'a str,
    /// This page's messages, newest first.
    pub messages: Vec<InboxLine>,
    /// The id older messages are listed before, when there are any.
    pub older: Option<i64>,
    /// The id newer messages are listed after, when there are any.
    pub newer: Option<i64>,
    /// All messages, unread ones, and arrivals per day.
    pub counts: shared::queries::feedback::InboxCounts,
}

/// `GET /admin/feedback/{id}`.
#[derive(Template)]
#[template(path = "admin_feedback.html")]
pub struct AdminFeedback<'a> {
    /// For the meta tag and the logout form.
    pub csrf_token: &'a str,
    /// The message, rendered ([`AdminFeedbackMessage`], cached).
    pub view: &'a crate::templates::MessageView,
}

/// The part of a message's page that shows the message: rendered once and cached.
#[derive(Template)]
#[template(path = "admin_feedback_message.html")]
pub struct AdminFeedbackMessage<'a> {
    /// The message.
    pub message: &'a shared::entities::feedback_message::Model,
}

/// A message's page as the cache keeps it: the rendered message and what the page's
/// forms need.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MessageView {
    /// The message's id.
    pub id: i64,
    /// Who wrote it (for the page title).
    pub submitter_name: String,
    /// [`AdminFeedbackMessage`], rendered (escaped).
    pub html: String,
    /// Whether an admin marked it handled.
    pub handled: bool,
    /// Whether an admin opened it before.
    pub read: bool,
}

/// One subscribed device on the notifications page.
pub struct DeviceLine {
    /// The subscription's id (for the remove button).
    pub id: i64,
    /// e.g. "Firefox on Linux".
    pub browser: String,
    /// When it was subscribed.
    pub added: String,
    /// When a push last reached it, or "never".
    pub last_delivery: String,
}

/// `GET /admin/notifications`.
#[derive(Template)]
#[template(path = "admin_notifications.html")]
pub struct AdminNotifications<'a> {
    /// For the meta tag and the forms.
    pub csrf_token: &'a str,
    /// The application server key browsers subscribe with (empty when not configured).
    pub vapid_public_key: &'a str,
    /// This admin's devices.
    pub devices: Vec<DeviceLine>,
    /// The outcome of the last action, if any.
    pub notice: &'a str,
}

/// `GET /offline`: what the site service worker shows without a connection.
#[derive(Template)]
#[template(path = "offline.html")]
pub struct Offline;

/// `GET /admin/queues`.
#[derive(Template)]
#[template(path = "admin_queues.html")]
pub struct AdminQueues<'a> {
    /// For the meta tag and the forms.
    pub csrf_token: &'a str,
    /// Jobs waiting in Redis.
    pub backlog: u64,
    /// Dispatch records not yet completed.
    pub waiting: u64,
    /// Dead letters kept.
    pub dead_count: u64,
    /// The newest dead letters.
    pub dead_letters: Vec<shared::queue::DeadLetter>,
    /// Live worker processes.
    pub workers: Vec<shared::worker_health::WorkerReport>,
    /// Jobs finished in the last hour.
    pub last_hour: u64,
    /// Server-drawn SVG (numbers only): jobs per minute.
    pub throughput_svg: String,
    /// Server-drawn SVG (numbers only): run time and queue wait per minute.
    pub latency_svg: String,
    /// Jobs running now.
    pub running: u64,
    /// Unix time the page was drawn (for "runs in …").
    pub now: i64,
    /// The first waiting jobs, with their attempt numbers.
    pub jobs: Vec<shared::queue::WaitingJob>,
}
