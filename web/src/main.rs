//! `web serve | admin create --email E --password-stdin | vapid generate`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The Tidings web application.
#[derive(Parser)]
#[command(name = "web", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the site on BIND (default 127.0.0.1:8000).
    Serve,
    /// Manage admin accounts.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Manage VAPID keys.
    Vapid {
        #[command(subcommand)]
        command: VapidCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an admin, or set the password of an existing one.
    Create {
        /// The admin's email address (their login).
        #[arg(long)]
        email: String,
        /// Read the password from standard input (one line).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
}

#[derive(Subcommand)]
enum VapidCommand {
    /// Print a new key pair as `.env` lines.
    Generate,
}

fn main() -> ExitCode {
    // One thread unless WEB_THREADS asks for more, logging installed (see `shared::runtime`).
    shared::runtime::run("web", "WEB_THREADS", Cli::parse, async_main)
}

async fn async_main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Vapid { command: VapidCommand::Generate } => {
            web::commands::vapid_generate();
            Ok(())
        }
        Command::Admin { command: AdminCommand::Create { email, .. } } => web::commands::admin_create(&email).await,
        Command::Serve => serve().await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("web: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let settings = shared::settings::Settings::from_env()?;
    web::app::Application::build(settings).await?.run_until_stopped().await
}
