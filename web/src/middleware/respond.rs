//! The layer inside the request id's: turns every error into a uniform page (HTML, or
//! JSON under the JSON routes) and puts the security headers on every response, errors
//! included.
//!
//! A handler that panics is answered the same way, with a 500, instead of a connection
//! closed without an answer; the panic hook (`shared::telemetry`) logs the panic, in the
//! request's span.
//!
//! poem's `SetHeader` skips error responses, and its own error bodies can carry internal
//! text (the static-files 403 leaks paths), so neither is used for this.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use poem::http::{HeaderValue, StatusCode, header};
use poem::{Endpoint, IntoResponse, Request, Response};

use crate::error::WebError;

/// Content-Security-Policy: no inline script anywhere, no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; worker-src 'self'; manifest-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// Whether responses under `path` are JSON.
fn is_json_route(path: &str) -> bool {
    path.starts_with("/api/") || path.starts_with("/admin/push/")
}

/// Wraps an endpoint: errors rendered, security headers added.
pub async fn respond<E: Endpoint>(ep: E, req: Request) -> poem::Result<Response> {
    let json = is_json_route(req.uri().path());
    let https =
        req.uri().scheme_str() == Some("https") || req.headers().get("x-forwarded-proto").is_some_and(|v| v == "https");
    // A panic leaves nothing the requests share half-changed: the shared state's locks
    // are held for a line that cannot panic (and the metrics' are read through poisoning),
    // and a transaction the handler had open is rolled back when dropped.
    let mut response = match AssertUnwindSafe(ep.call(req)).catch_unwind().await {
        Ok(Ok(response)) => response.into_response(),
        Ok(Err(e)) => error_response(&e, json),
        Err(_) => error_response(&poem::Error::from_status(StatusCode::INTERNAL_SERVER_ERROR), json),
    };
    add_security_headers(&mut response, https);
    default_html_to_no_cache(&mut response);
    Ok(response)
}

fn error_response(e: &poem::Error, json: bool) -> Response {
    let (status, message, retry_after) = match e.downcast_ref::<WebError>() {
        Some(web) => {
            // WebError::as_response logs 5xx causes; rendering here must log them too.
            let _ = poem::error::ResponseError::as_response(web);
            let retry = match web {
                WebError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
                _ => None,
            };
            if let (true, WebError::Validation(errors)) = (json, web) {
                return poem::web::Json(serde_json::json!({ "errors": errors }))
                    .with_status(StatusCode::UNPROCESSABLE_ENTITY)
                    .into_response();
            }
            (web.status(), web.public_message(), retry)
        }
        None => {
            let status = e.status();
            if status.is_server_error() {
                tracing::error!(error = %e, "request.internal_error");
            }
            (status, generic_message(status).to_owned(), None)
        }
    };
    let mut response = if json {
        poem::web::Json(serde_json::json!({ "error": message })).with_status(status).into_response()
    } else {
        crate::templates::error_page(status, &message)
    };
    if let Some(secs) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// A message for errors raised outside our handlers (routing, body parsing).
fn generic_message(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "There is no page at this address.",
        StatusCode::METHOD_NOT_ALLOWED => "This address does not accept that method.",
        StatusCode::PAYLOAD_TOO_LARGE => "The request is too large.",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "The request body has an unsupported content type.",
        StatusCode::FORBIDDEN => "You are not allowed to do that.",
        StatusCode::UNAUTHORIZED => "Please log in first.",
        s if s.is_client_error() => "The request could not be understood.",
        StatusCode::SERVICE_UNAVAILABLE => "The service is briefly unavailable. Please try again in a moment.",
        _ => "Something went wrong on our side. Please try again.",
    }
}

/// HTML is revalidated on every use unless a route says otherwise (admin pages say
/// `no-store`): a deploy is seen at once, while the service worker may still keep a copy
/// for offline use.
fn default_html_to_no_cache(response: &mut Response) {
    let html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html && !response.headers().contains_key(header::CACHE_CONTROL) {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
}

fn add_security_headers(response: &mut Response, https: bool) {
    let headers = response.headers_mut();
    let fixed = [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    if https {
        headers
            .insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=63072000; includeSubDomains"));
    }
}

#[cfg(test)]
mod tests {
    use poem::http::{StatusCode, header};
    use poem::{Request, endpoint::make};

    async fn panicking(path: &str) -> poem::Response {
        let ep = make(|_| async {
            panic!("a secret detail");
            #[expect(unreachable_code, reason = "the endpoint's answer type")]
            ""
        });
        super::respond(ep, Request::builder().uri_str(path).finish()).await.expect("an answer")
    }

    #[tokio::test]
    async fn a_handler_that_panics_is_answered_with_a_500_page_and_the_security_headers() {
        // Act: a page's handler panics.
        let mut response = panicking("/feedback").await;

        // Assert: a 500 page, as for any other error, with nothing of the panic's text.
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers()[header::CONTENT_TYPE].to_str().unwrap_or("").starts_with("text/html"));
        assert!(response.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        let body = response.take_body().into_string().await.expect("a body");
        assert!(body.contains("Something went wrong on our side"), "{body}");
        assert!(!body.contains("secret"), "{body}");
    }

    #[tokio::test]
    async fn a_json_route_that_panics_is_answered_with_a_500_json_error() {
        // Act: a JSON route's handler panics.
        let mut response = panicking("/api/feedback").await;

        // Assert: the JSON routes' error shape.
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body: serde_json::Value = response.take_body().into_json().await.expect("JSON");
        assert_eq!(body["error"], "Something went wrong on our side. Please try again.");
    }
}
