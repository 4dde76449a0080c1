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
