//! The HTTP layer's error type.
//!
//! Policy: a handler returns [`WebError`]; each variant has one status code. Client
//! errors (4xx) carry a message meant for the user. Server errors (5xx) carry the
//! internal cause, which is logged once here, with its chain, and never sent: the client
//! gets a generic page (or JSON under `/api/` and `/admin/push/`). A database that
//! can't be reached is a 503 ("try again shortly"), anything else unexpected a 500.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use sea_orm::DbErr;
use shared::domain::FieldErrors;

/// `Result` with [`WebError`] as the default error.
pub type Result<T, E = WebError> = std::result::Result<T, E>;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// Invalid input, per field (422).
    #[error("the submitted data is invalid: {0}")]
    Validation(FieldErrors),
    /// A malformed request (400).
    #[error("{0}")]
    BadRequest(String),
    /// Not logged in (401, or a redirect to the login page for HTML).
    #[error("login required")]
    Unauthorized,
    /// Not allowed, e.g. a bad CSRF token or a foreign origin (403).
    #[error("{0}")]
    Forbidden(&'static str),
    /// No such thing (404).
    #[error("not found")]
    NotFound,
    /// Too many requests from this client (429).
    #[error("too many requests; try again in {retry_after_secs} s")]
    RateLimited {
        /// Seconds until a request will be accepted.
        retry_after_secs: u64,
    },
    /// A dependency is down (503).
    #[error("service unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// A bug or an unexpected failure (500).
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<DbErr> for WebError {
    fn from(e: DbErr) -> Self {
        if shared::db::is_connection_failure(&e) { Self::Unavailable(e.into()) } else { Self::Internal(e.into()) }
    }
}

impl WebError {
    /// The status code of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message safe to show the client.
    pub fn public_message(&self) -> String {
        match self {
            Self::Unavailable(_) => {
                "The service is briefly unavailable. Please try again in a moment; nothing you sent was stored.".into()
            }
            Self::Internal(_) => "Something went wrong on our side. Please try again.".into(),
            other => other.to_string(),
        }
    }

    fn log(&self) {
        match self {
            Self::Unavailable(cause) => tracing::warn!(error = format!("{cause:#}"), "request.unavailable"),
            Self::Internal(cause) => tracing::error!(error = format!("{cause:#}"), "request.internal_error"),
            _ => {}
        }
    }
}

impl poem::error::ResponseError for WebError {
    fn status(&self) -> StatusCode {
        WebError::status(self)
    }

    fn as_response(&self) -> Response {
        self.log();
        let mut response = crate::templates::error_page(self.status(), &self.public_message()).into_response();
        if let Self::RateLimited { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(poem::http::header::RETRY_AFTER, poem::http::HeaderValue::from(*retry_after_secs));
        }
        response
    }
}
