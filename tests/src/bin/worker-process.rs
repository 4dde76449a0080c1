//! The `worker` command line, built with the tests so that process tests can start real
//! worker processes (`CARGO_BIN_EXE_worker-process`) without a separate build step.

fn main() -> std::process::ExitCode {
    worker::cli::main()
}
