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
//! ([`dropped_lines`]; lines a closed stderr refuses are not counted). When the guard
//! is dropped, the waiting lines are written out, for at most about a second.
//!
//! A panic is logged as an error event like any other line (`thread.panicked`, target
//! `panic`, with the panic's text, where it happened, the thread and, when
//! `RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` asks for one, the backtrace), so that under
//! `LOG_FORMAT=json` it is one JSON object a log shipper parses rather than plain text
//! among them. It goes through the writer thread like any line, so it can be lost the
//! ways a line can (above), and with a process that aborts at once (a panic while
//! unwinding). Where `RUST_LOG` filters the target out, and on the writer's own thread,
//! a panic is printed to stderr directly, as by default.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// Lines that may wait for the writer thread before new ones are dropped.
pub const BUFFERED_LINES: usize = 16_384;

/// The writer of the installed subscriber, for its count of dropped lines.
static WRITER: OnceLock<tracing_appender::non_blocking::NonBlocking> = OnceLock::new();

/// Keeps the log writer's thread: hold it until the end of `main`, so that what was
/// logged is written out before the process exits.
#[must_use = "lines logged after the guard is dropped are lost"]
pub struct Logs {
    _guard: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Installs the global subscriber; a second call (tests) is a no-op and returns a guard
/// that holds nothing.
pub fn init() -> Logs {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = writer(std::io::stderr(), BUFFERED_LINES);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer.clone());
    let installed = if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    match installed {
        Ok(()) => {
            let _ = WRITER.set(writer);
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let logged = std::thread::current().name() != Some(WRITER_THREAD)
                    && tracing::enabled!(target: PANIC_TARGET, tracing::Level::ERROR);
                if logged { log_panic(info) } else { default(info) }
            }));
            Logs { _guard: Some(guard) }
        }
        // Already installed: keep the first one (this writer's thread ends with `guard`).
        Err(_) => Logs { _guard: None },
    }
}

/// The name of the thread that writes the log lines out.
const WRITER_THREAD: &str = "log-writer";

/// The target of a panic's event, for `RUST_LOG` (`panic=off` prints panics as plain text).
const PANIC_TARGET: &str = "panic";

/// Logs the panic `info` describes as the error event `thread.panicked`.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let text = info.payload_as_str().unwrap_or("(a panic without text)");
    let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("(unnamed)");
    let backtrace = std::backtrace::Backtrace::capture();
    // Left out of the event (a field of `None`) unless the environment asked for one.
    let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured).then(|| backtrace.to_string());
    tracing::error!(target: PANIC_TARGET, panic = text, location, thread, backtrace, "thread.panicked");
}

/// A writer to `sink` from a thread of its own, which drops lines past `limit` waiting
/// rather than make the caller wait.
fn writer<W: std::io::Write + Send + 'static>(
    sink: W,
    limit: usize,
) -> (tracing_appender::non_blocking::NonBlocking, tracing_appender::non_blocking::WorkerGuard) {
    tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(limit)
        .lossy(true)
        .thread_name(WRITER_THREAD)
        .finish(sink)
}

/// Brings the counter `tidings_log_lines_dropped_total` of `metrics` up to
/// [`dropped_lines`]: a metrics page calls it before it renders.
pub fn count_dropped_lines(metrics: &crate::metrics::Registry) {
    metrics
        .counter(
            "tidings_log_lines_dropped_total",
            "Log lines dropped because the reader of standard error fell behind.",
            &[],
        )
        .raise_to(dropped_lines());
}

/// Lines dropped so far because the reader of stderr fell [`BUFFERED_LINES`] behind.
pub fn dropped_lines() -> u64 {
    WRITER.get().map_or(0, |w| w.error_counter().dropped_lines() as u64)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A sink whose reader has stalled: every write waits until the test lets go.
    struct Stalled(mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that keeps what is written, for a test to read.
    #[derive(Clone, Default)]
    struct Kept(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_panic_is_logged_as_one_json_event_with_its_text_and_place() {
        // Arrange: a JSON subscriber on this thread, and the hook that logs panics.
        let kept = Kept::default();
        let sink = kept.clone();
        let subscriber = tracing_subscriber::fmt().json().with_writer(move || sink.clone()).finish();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(super::log_panic));

        // Act: a panic, caught.
        let line = line!() + 2;
        let caught = tracing::subscriber::with_default(subscriber, || {
            std::panic::catch_unwind(|| panic!("the {} went wrong", "thing"))
        });
        std::panic::set_hook(previous);

        // Assert: one line, a JSON object with the panic's text, file and line.
        assert!(caught.is_err());
        let written = String::from_utf8(kept.0.lock().expect("not poisoned").clone()).expect("UTF-8");
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 1, "{written}");
        let event: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON object");
        assert_eq!(event["level"], "ERROR", "{event}");
        assert_eq!(event["target"], "panic", "{event}");
        assert_eq!(event["fields"]["message"], "thread.panicked", "{event}");
        assert_eq!(event["fields"]["panic"], "the thing went wrong", "{event}");
        let location = event["fields"]["location"].as_str().expect("a location");
        assert!(location.starts_with(&format!("{}:{line}:", file!())), "{location}");
        assert!(event["fields"]["thread"].is_string(), "{event}");
    }

    #[test]
    fn past_the_buffer_lines_are_dropped_and_counted_instead_of_waited_for() {
        // Arrange: a writer with room for 4 lines, whose sink never answers.
        let (release, stalled) = mpsc::channel::<()>();
        let (writer, guard) = super::writer(Stalled(stalled), 4);

        // Act: 100 lines, logged from a thread of their own (a writer that waited would
        // never return).
        let (done, finished) = mpsc::channel();
        let mut logging = writer.clone();
        std::thread::spawn(move || {
            for i in 0..100 {
                // One write a line, as the subscriber makes (it formats a line first).
                let _ = logging.write_all(format!("line {i}\n").as_bytes());
            }
            let _ = done.send(());
        });

        // Assert: every call returned, and what found no room was dropped and counted.
        finished.recv_timeout(Duration::from_secs(10)).expect("logging never waits for the sink");
        let dropped = writer.error_counter().dropped_lines();
        assert!((90..=96).contains(&dropped), "{dropped} of 100 lines dropped with room for 4 (and one being written)");
        drop(release);
        drop(guard);
    }
}
