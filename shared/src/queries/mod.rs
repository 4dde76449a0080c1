//! Database queries used by both binaries.
//!
//! Each is a free async function generic over `ConnectionTrait`, so it runs on a pool or
//! inside a caller's transaction alike. Handlers and jobs stay thin: parse, call, respond.

pub mod admin;
pub mod delivery;
pub mod dispatch;
pub mod feedback;
pub mod subscription;

use chrono::{DateTime, Utc};

/// The current time as stored in the database (microsecond precision on every backend).
pub fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}
