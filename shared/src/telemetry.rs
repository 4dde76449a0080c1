//! Tracing set-up, shared by every binary.
//!
//! Logs go to stderr; `RUST_LOG` filters them (default `info`), `LOG_FORMAT=json` gives
//! one JSON object per line for log shippers. Logging rules: log ids, never secrets,
//! email addresses, push endpoints or feedback text.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // Already installed: keep the first one.
    drop(result);
}
