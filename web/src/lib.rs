//! The Tidings web application (poem).
//!
//! - [`app`]: builds the application from settings and serves it (used by `main` and tests).
//! - [`state`]: [`state::AppState`], what every handler can reach.
//! - [`error`]: the one error type of the HTTP layer and its policy.
//! - [`routes`]: one module per area, each owning its `router()`.
//! - [`middleware`]: security headers, body limits, rate limits.
//! - [`dispatch`]: hands committed feedback to the queue (the after-commit step).
//! - [`commands`]: the non-serving subcommands (`admin create`, `vapid generate`).

pub mod app;
pub mod auth;
pub mod cache;
pub mod commands;
pub mod dispatch;
pub mod error;
pub mod intake;
pub mod middleware;
pub mod routes;
pub mod session;
pub mod state;
pub mod templates;
