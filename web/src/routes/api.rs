//! `POST /api/feedback` (JSON) and its OpenAPI document at `GET /api/openapi.json`.

use std::collections::BTreeMap;

use poem::{Request, Route};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, OpenApiService};
use shared::domain::NewFeedback;

use crate::state::AppState;

/// The routes of this module, mounted at `/api`.
pub fn router(version: &str) -> Route {
    let service = OpenApiService::new(FeedbackApi, "Tidings", version).server("/api");
    let spec = service.spec_endpoint();
    Route::new().nest("/", service).at("/openapi.json", spec)
}

/// A feedback submission. Unknown fields are ignored.
#[derive(Debug, Object)]
struct FeedbackRequest {
    /// Who is writing (1–200 characters).
    submitter_name: Option<String>,
    /// Their email address (at most 254 characters).
    submitter_email: Option<String>,
    /// The message (1–5,000 characters).
    content: Option<String>,
}

/// The stored message's id.
#[derive(Debug, Object)]
struct Created {
    /// Id of the new feedback message.
    id: i64,
}

/// Messages per invalid field.
#[derive(Debug, Object)]
struct ValidationErrors {
    /// Field name -> messages.
    errors: BTreeMap<String, Vec<String>>,
}

/// A single error message.
#[derive(Debug, Object)]
struct ErrorBody {
    /// What went wrong, for people.
    error: String,
}

#[derive(ApiResponse)]
enum SubmitResponse {
    /// Stored; the admins are being notified.
    #[oai(status = 201)]
    Created(Json<Created>),
    /// Some fields are invalid; nothing was stored.
    #[oai(status = 422)]
    Invalid(Json<ValidationErrors>),
    /// Too many submissions from this address; retry after the given seconds.
    #[oai(status = 429)]
    RateLimited(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// The database is unreachable; nothing was stored.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

struct FeedbackApi;

#[OpenApi]
impl FeedbackApi {
    /// Submit feedback.
    #[oai(path = "/feedback", method = "post")]
    async fn submit(
        &self,
        req: &Request,
        state: poem::web::Data<&AppState>,
        body: Json<FeedbackRequest>,
    ) -> poem::Result<SubmitResponse> {
        if let Err(wait) = state.submit_limiter.check(super::client_ip(req, &state.settings.web.trusted_proxies)) {
            let secs = wait.as_secs().max(1);
            let error = format!("Too many submissions; try again in {secs} s.");
            state.count_submission("api", "rate_limited");
            return Ok(SubmitResponse::RateLimited(Json(ErrorBody { error }), secs));
        }
        let body = body.0;
        let feedback = match NewFeedback::parse(
            body.submitter_name.as_deref().unwrap_or_default(),
            body.submitter_email.as_deref().unwrap_or_default(),
            body.content.as_deref().unwrap_or_default(),
        ) {
            Ok(feedback) => feedback,
            Err(errors) => {
                let errors = errors.iter().map(|(k, v)| (k.to_owned(), v.to_vec())).collect();
                state.count_submission("api", "invalid");
                return Ok(SubmitResponse::Invalid(Json(ValidationErrors { errors })));
            }
        };
        match state.intake.submit(feedback, crate::middleware::request_id::current()).await {
            Ok(submitted) => {
                tracing::info!(feedback_id = submitted.feedback_id, "feedback.submitted");
                state.count_submission("api", "accepted");
                state.dispatcher.announce_after_commit(submitted).await;
                Ok(SubmitResponse::Created(Json(Created { id: submitted.feedback_id })))
            }
            Err(e) => match crate::error::WebError::from(e) {
                unavailable @ crate::error::WebError::Unavailable(_) => {
                    let error = unavailable.public_message();
                    let _ = poem::error::ResponseError::as_response(&unavailable);
                    Ok(SubmitResponse::Unavailable(Json(ErrorBody { error })))
                }
                other => Err(other.into()),
            },
        }
    }
}
