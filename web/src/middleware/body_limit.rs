//! Refuses request bodies over a limit with 413, whether or not `Content-Length` is sent.
//!
//! poem's `Form` and `Json` extractors read bodies without any limit, so the body is read
//! here, bounded, and put back for the handler.

use poem::http::{StatusCode, header};
use poem::{Body, Endpoint, Request, error::ReadBodyError};

/// Largest body accepted (a 5,000-character message in 4-byte characters, plus fields).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Wraps an endpoint with the body limit.
pub async fn limit_body<E: Endpoint>(ep: E, mut req: Request) -> poem::Result<E::Output> {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES) {
        return Err(poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE));
    }
    let body = req.take_body();
    match body.into_bytes_limit(MAX_BODY_BYTES).await {
        Ok(bytes) => req.set_body(Body::from_bytes(bytes)),
        Err(ReadBodyError::PayloadTooLarge) => {
            return Err(poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE));
        }
        Err(_) => return Err(poem::Error::from_status(StatusCode::BAD_REQUEST)),
    }
    ep.call(req).await
}
