//! `GET/POST /feedback` and `GET /feedback/thanks`: the visitor's form.

use poem::http::StatusCode;
use poem::web::{CsrfToken, CsrfVerifier, Data, Form, Redirect};
use poem::{IntoResponse, Request, Response, Route, get, handler};
use serde::Deserialize;
use shared::domain::{FieldErrors, NewFeedback};

use crate::error::{Result, WebError};
use crate::state::AppState;
use crate::templates::{FeedbackForm, FeedbackValues, Thanks, render};

/// The routes of this module, mounted at `/feedback`.
pub fn router() -> Route {
    Route::new().at("/", get(show_form).post(submit)).at("/thanks", get(thanks))
}

/// The posted form. Only these fields are read: anything else a client sends is ignored,
/// and nothing is ever deserialised into an entity (no mass assignment).
#[derive(Debug, Deserialize)]
pub struct FeedbackFormData {
    #[serde(default)]
    csrf_token: String,
    #[serde(default)]
    submitter_name: String,
    #[serde(default)]
    submitter_email: String,
    #[serde(default)]
    content: String,
    /// Honeypot: hidden from people, filled in by naive bots.
    #[serde(default)]
    website: String,
}

#[handler]
async fn show_form(token: &CsrfToken) -> Response {
    let form =
        FeedbackForm { csrf_token: &token.0, values: &FeedbackValues::default(), errors: &FieldErrors::default() };
    render(StatusCode::OK, &form)
}

#[handler]
async fn submit(
    req: &Request,
    state: Data<&AppState>,
    token: &CsrfToken,
    verifier: &CsrfVerifier,
    Form(data): Form<FeedbackFormData>,
) -> Result<Response> {
    if !verifier.is_valid(&data.csrf_token) {
        return Err(WebError::Forbidden(
            "This form has expired or was not sent from this site. Please reload the page and send it again.",
        ));
    }
    if let Err(wait) = state.submit_limiter.check(super::client_ip(req, &state.settings.web.trusted_proxies)) {
        state.count_submission("form", "rate_limited");
        return Err(WebError::RateLimited { retry_after_secs: wait.as_secs().max(1) });
    }
    if !data.website.is_empty() {
        tracing::info!("feedback.honeypot_triggered");
        state.count_submission("form", "honeypot");
        return Ok(Redirect::see_other("/feedback/thanks").into_response());
    }
    let feedback = match NewFeedback::parse(&data.submitter_name, &data.submitter_email, &data.content) {
        Ok(feedback) => feedback,
        Err(errors) => {
            let values = FeedbackValues {
                submitter_name: data.submitter_name,
                submitter_email: data.submitter_email,
                content: data.content,
            };
            let form = FeedbackForm { csrf_token: &token.0, values: &values, errors: &errors };
            state.count_submission("form", "invalid");
            return Ok(render(StatusCode::UNPROCESSABLE_ENTITY, &form));
        }
    };
    let submitted = state.intake.submit(feedback, crate::middleware::request_id::current()).await?;
    tracing::info!(feedback_id = submitted.feedback_id, "feedback.submitted");
    state.count_submission("form", "accepted");
    state.dispatcher.announce_after_commit(submitted).await;
    Ok(Redirect::see_other("/feedback/thanks").into_response())
}

#[handler]
async fn thanks() -> Response {
    render(StatusCode::OK, &Thanks)
}
