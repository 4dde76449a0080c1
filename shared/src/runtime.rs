//! The async runtime of the `web` and `worker` processes: one thread unless configured
//! otherwise (`WEB_THREADS`, `WORKER_THREADS`).
//!
//! Both processes mostly wait on PostgreSQL, Redis and the network. On one thread a
//! reply reaches the task waiting for it without a hand-off between threads; with one
//! thread per core, each hand-off wakes another thread. Measured on 2 cores: 8–22% less
//! worker CPU and about a fifth less web CPU a message at 2,000 messages a second, with
//! the same latency at 50/s (`docs/PERFORMANCE-HISTORY.md`). A bigger machine runs more
//! processes, or sets the variable: `N` threads, `0` one per core.

/// Builds the runtime that the variable `var` asks for. The error is a sentence for
/// standard error.
fn build(var: &str) -> Result<tokio::runtime::Runtime, String> {
    let threads = threads_of(var, std::env::var(var).ok().as_deref())?;
    with_threads(threads).map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// A runtime on `threads` threads: 1 runs everything on the calling thread, 0 one
/// thread per core.
pub fn with_threads(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
}

/// Loads `.env`, parses the command line with `parse` (which answers `--help`,
/// `--version` and usage errors itself and exits), then runs `main` with it to
/// completion on the runtime `var` asks for, with logging installed
/// ([`crate::telemetry::init`]). `program` names the process in the message when the
/// runtime cannot be built (exit code 1): a bad `var` stops the commands that run, not
/// the help that says how to set it.
pub fn run<C, F: std::future::Future<Output = std::process::ExitCode>>(
    program: &str,
    var: &str,
    parse: impl FnOnce() -> C,
    main: impl FnOnce(C) -> F,
) -> std::process::ExitCode {
    // `.env` first: the command line's defaults read the environment too.
    crate::settings::load_dotenv();
    let cli = parse();
    match build(var) {
        Ok(runtime) => {
            // Logging starts after `.env` is loaded and ends after the runtime: what its
            // tasks log while they are cancelled is written out too.
            let logs = crate::telemetry::init();
            let code = runtime.block_on(main(cli));
            drop(runtime);
            drop(logs);
            code
        }
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The thread count `value` (of variable `var`) asks for: 1 when unset or empty.
fn threads_of(var: &str, value: Option<&str>) -> Result<usize, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(1),
        Some(value) => value
            .parse::<usize>()
            .map_err(|_| format!("{var} must be a whole number (0 for one thread per core), not {value:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::threads_of;

    #[test]
    fn one_thread_unless_a_count_is_given() {
        assert_eq!(threads_of("WEB_THREADS", None), Ok(1));
        assert_eq!(threads_of("WEB_THREADS", Some(" ")), Ok(1));
        assert_eq!(threads_of("WEB_THREADS", Some("0")), Ok(0));
        assert_eq!(threads_of("WEB_THREADS", Some("4")), Ok(4));
        let refused = threads_of("WEB_THREADS", Some("two")).expect_err("not a number");
        assert!(refused.contains("WEB_THREADS must be a whole number"), "{refused}");
    }
}
