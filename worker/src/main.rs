//! `worker run --concurrency N` and `worker status`.

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
    /// Inspect, retry or discard jobs the worker refused to run.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
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
    /// Put a dead letter's job back on its queue.
    Retry {
        /// The letter's id (from `worker dead list`).
        id: String,
    },
    /// Delete a dead letter.
    Discard {
        /// The letter's id (from `worker dead list`).
        id: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    shared::telemetry::init();
    let cli = Cli::parse();
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
            let app = worker::app::Application::build(settings, concurrency).await?;
            app.run_until_stopped().await
        }
        Command::Status => worker::status::print(&settings).await,
        Command::Dead { command: DeadCommand::List { limit } } => worker::ops::list(&settings, limit).await,
        Command::Dead { command: DeadCommand::Retry { id } } => worker::ops::retry(&settings, &id).await,
        Command::Dead { command: DeadCommand::Discard { id } } => worker::ops::discard(&settings, &id).await,
    }
}
