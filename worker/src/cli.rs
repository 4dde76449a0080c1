//! The `worker` command line: `run --concurrency N`, `status`, `ping`,
//! `dead list|retry|discard`, `jobs list|cancel`.
//! The binary's `main` is [`main`]; the tests start the same code as a process.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shared::settings::Settings;

#[derive(Parser)]
#[command(name = "worker", version, about = "Sends Web Pushes and runs Tidings' periodic work.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume jobs until SIGTERM or SIGINT.
    Run {
        /// Jobs run at once by this process.
        #[arg(long, default_value_t = 4, env = "WORKER_CONCURRENCY")]
        concurrency: usize,
    },
    /// Print the queue's state: pending dispatches, dead letters.
    Status,
    /// Put a job that does nothing on the queue and wait for a worker to run it: says
    /// whether workers are consuming, and how long the round trip took.
    Ping {
        /// Give up after this many seconds (exit 1).
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// Inspect, retry or discard jobs the worker refused to run.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// List or cancel jobs waiting to run.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List waiting jobs (pending first, then scheduled, soonest first).
    List {
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: isize,
    },
    /// Revoke a waiting job so it never runs.
    Cancel {
        /// The job's id (from `worker jobs list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List the newest dead letters with their error, attempt and time.
    List {
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: isize,
    },
    /// Put a dead letter's job back on its queue, or every letter's with `--all`.
    Retry {
        /// The letter's id (from `worker dead list`).
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Every dead letter, oldest first.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete a dead letter, or every one with `--all`.
    Discard {
        /// The letter's id (from `worker dead list`).
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

/// Parses the arguments, runs the command, and returns the process's exit code.
pub fn main() -> ExitCode {
    // One thread unless WORKER_THREADS asks for more, logging installed (see `shared::runtime`).
    shared::runtime::run("worker", "WORKER_THREADS", Cli::parse, async_main)
}

async fn async_main(cli: Cli) -> ExitCode {
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "worker.exit");
            eprintln!("worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    match cli.command {
        Command::Run { concurrency } => {
            let app = crate::app::Application::build(settings, concurrency).await?;
            app.run_until_stopped().await
        }
        Command::Status => crate::status::print(&settings).await,
        Command::Ping { timeout_secs } => {
            crate::ops::ping(&settings, std::time::Duration::from_secs(timeout_secs)).await
        }
        Command::Dead { command: DeadCommand::List { limit } } => crate::ops::list(&settings, limit).await,
        Command::Dead { command: DeadCommand::Retry { id: Some(id), .. } } => crate::ops::retry(&settings, &id).await,
        // Without an id clap has required `--all`.
        Command::Dead { command: DeadCommand::Retry { id: None, .. } } => {
            crate::ops::retry_all(&settings).await.map(drop)
        }
        Command::Dead { command: DeadCommand::Discard { id: Some(id), .. } } => {
            crate::ops::discard(&settings, &id).await
        }
        Command::Dead { command: DeadCommand::Discard { id: None, .. } } => {
            crate::ops::discard_all(&settings).await.map(drop)
        }
        Command::Jobs { command: JobsCommand::List { limit } } => crate::ops::list_jobs(&settings, limit).await,
        Command::Jobs { command: JobsCommand::Cancel { id } } => crate::ops::cancel(&settings, &id).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead(args: &[&str]) -> Result<DeadCommand, clap::Error> {
        let cli = Cli::try_parse_from(["worker", "dead"].iter().chain(args))?;
        match cli.command {
            Command::Dead { command } => Ok(command),
            _ => unreachable!("a dead command"),
        }
    }

    #[test]
    fn dead_retry_and_discard_take_one_id_or_all_and_not_both() {
        assert!(
            matches!(dead(&["retry", "42-1"]), Ok(DeadCommand::Retry { id: Some(id), all: false }) if id == "42-1")
        );
        assert!(matches!(dead(&["retry", "--all"]), Ok(DeadCommand::Retry { id: None, all: true })));
        assert!(
            matches!(dead(&["discard", "7-0"]), Ok(DeadCommand::Discard { id: Some(id), all: false }) if id == "7-0")
        );
        assert!(matches!(dead(&["discard", "--all"]), Ok(DeadCommand::Discard { id: None, all: true })));
        for refused in [&["retry"][..], &["retry", "42-1", "--all"], &["discard"], &["discard", "7-0", "--all"]] {
            let error = dead(refused).err().unwrap_or_else(|| panic!("{refused:?} was accepted"));
            assert!(
                matches!(
                    error.kind(),
                    clap::error::ErrorKind::MissingRequiredArgument | clap::error::ErrorKind::ArgumentConflict
                ),
                "{refused:?}: {error}"
            );
        }
    }
}
