//! Cross-cutting request handling.
//!
//! - [`respond`]: security headers on every response and uniform error pages.
//! - [`body_limit`]: refuses request bodies over a size limit with 413.
//! - [`rate_limit`]: per-client limit on feedback submissions.
//! - [`request_id`]: an id per request, in its span, its response and the jobs it enqueues.

pub mod body_limit;
pub mod rate_limit;
pub mod request_id;
pub mod respond;
