//! Tracing set-up, shared by every binary.
//!
//! Logs go to stderr; `RUST_LOG` filters them (default `info`), `LOG_FORMAT=json` gives
//! one JSON object per line for log shippers. Logging rules: log ids, never secrets,
//! email addresses, push endpoints or feedback text.
//!
//! A line is formatted where it is logged and written by a thread of its own, so a
//! process never waits for whatever reads its stderr: a log shipper that stalls (a full
//! pipe) would otherwise stop every request of the web and every job of a worker at
//! their next log line. Up to [`BUFFERED_LINES`] lines wait for that thread; past them,
//! new lines are dropped until the reader catches up, and how many is counted
//! ([`dropped_lines`]).

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// Lines that may wait for the writer thread before new ones are dropped.
pub const BUFFERED_LINES: usize = 16_384;

/// The writer of the installed subscriber, for its count of dropped lines.
static WRITER: OnceLock<tracing_appender::non_blocking::NonBlocking> = OnceLock::new();

/// Keeps the log writer's thread: hold it until the end of `main`, so that what was
/// logged is written out before the process exits.
#[must_use = "lines logged after the guard is dropped are lost"]
pub struct Logs(#[allow(dead_code)] Option<tracing_appender::non_blocking::WorkerGuard>);

/// Installs the global subscriber; a second call (tests) is a no-op and returns a guard
/// that holds nothing.
pub fn init() -> Logs {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer.clone());
    let installed = if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    match installed {
        Ok(()) => {
            let _ = WRITER.set(writer);
            Logs(Some(guard))
        }
        // Already installed: keep the first one (this writer's thread ends with `guard`).
        Err(_) => Logs(None),
    }
}

/// Lines dropped so far because the reader of stderr fell [`BUFFERED_LINES`] behind.
pub fn dropped_lines() -> u64 {
    WRITER.get().map_or(0, |w| w.error_counter().dropped_lines() as u64)
}
