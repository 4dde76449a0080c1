//! `migrations up|down|status`: applies, reverts or lists schema migrations on the
//! database named by `DATABASE_URL` (default: the local SQLite file).

use std::process::ExitCode;

use migrations::{Migrator, MigratorTrait};

const USAGE: &str = "usage: migrations up | down [N] | status";

#[tokio::main]
async fn main() -> ExitCode {
    let _logs = shared::telemetry::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrations: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> anyhow::Result<()> {
    let command = args.first().map(String::as_str);
    if !matches!(command, Some("up" | "down" | "status")) {
        anyhow::bail!("{USAGE}");
    }
    let settings = shared::settings::Settings::from_env()?;
    let db = shared::db::connect(&settings.database_url).await?;
    match (command, args.get(1)) {
        (Some("up"), None) => Migrator::up(&db, None).await?,
        (Some("down"), steps) => {
            let steps = match steps {
                Some(raw) => raw.parse().map_err(|_| anyhow::anyhow!("{USAGE}"))?,
                None => 1,
            };
            Migrator::down(&db, Some(steps)).await?;
        }
        (Some("status"), None) => Migrator::status(&db).await?,
        _ => anyhow::bail!("{USAGE}"),
    }
    Ok(())
}
