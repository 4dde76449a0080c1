//! Request ids: every request gets one, taken from a well-formed `X-Request-Id` (a
//! proxy's) or made up, echoed in the response, and carried by the request's tracing
//! span and by every job the request enqueues, so a job's logs join the request's.

use poem::http::HeaderValue;
use poem::{Endpoint, IntoResponse, Request, Response};
use tracing::Instrument;

/// The header read and written.
pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled by this task, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Accepts ids of up to 128 letters, digits and `-_.:`, as proxies and load balancers
/// write them; anything else is replaced, so logs never carry a visitor's free text.
fn accepted(raw: &str) -> bool {
    !raw.is_empty()
        && raw.len() <= 128
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Wraps an endpoint: assigns the id, scopes it to the request's task and span, and
/// echoes it in the response.
pub async fn request_id<E: Endpoint>(ep: E, req: Request) -> poem::Result<Response> {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| accepted(v))
        .map_or_else(|| uuid::Uuid::now_v7().simple().to_string(), str::to_owned);
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let response = REQUEST_ID.scope(id.clone(), ep.call(req).instrument(span)).await?;
    let mut response = response.into_response();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_are_taken_over() {
        assert!(accepted("0190c7a2-5b1e-7c3d-9f00-1234567890ab"));
        assert!(accepted("lb:abc.def_1"));
        assert!(!accepted(""));
        assert!(!accepted("has space"));
        assert!(!accepted("<script>"));
        assert!(!accepted(&"a".repeat(129)));
    }
}
