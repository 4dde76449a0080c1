//! Database connections: SQLite (the default, a local file) or PostgreSQL.

use std::time::Duration;

use anyhow::Context;
use sea_orm::{ConnectOptions, Database, DatabaseConnection};

/// Connects to `url`, creating the SQLite file (and its folder) if needed.
///
/// SQLite runs in WAL mode with a busy timeout, so the web and worker processes can
/// write to one file at once, and with `synchronous=FULL`, so a commit is on disk before
/// a visitor is told it was stored (in WAL mode `NORMAL` can lose the last commits to a
/// power cut); pools are bounded and fail fast when the database is down.
pub async fn connect(url: &str) -> anyhow::Result<DatabaseConnection> {
    if let Some(path) = sqlite_path(url)
        && let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the folder of {path}"))?;
    }
    let mut options = pool_options(url, if url.starts_with("sqlite:") { 8 } else { 20 });
    options
        // Every connection of the pool gets these, not only the first.
        .map_sqlx_sqlite_opts(|sqlite| {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true)
                .synchronous(SqliteSynchronous::Full)
        });
    Database::connect(options).await.context("connecting to the database (DATABASE_URL)")
}

/// What every pool shares: at most `max` connections, fail fast when the database is
/// down, and a check of a connection only after it sat idle.
fn pool_options(url: &str, max: u32) -> ConnectOptions {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(3))
        .acquire_timeout(Duration::from_secs(3))
        // A connection is checked with a round trip only after it sat idle for a second:
        // checking it on every use would double the round trips of every statement, and
        // a busy pool reuses its connections well within that. A database restart takes
        // longer, so connections it broke are found by the check, not by a statement.
        .test_before_acquire_if_idle_for(Duration::from_secs(1))
        .sqlx_logging(false);
    options
}

/// The settings of a connection that plans each statement once and reuses that plan
/// whatever the tables look like later: a generic plan, no sequential scan where an index
/// can answer, and no JIT compilation (a generic plan's costs are guesses, and JIT
/// compiles at every run: 26 ms of a grouped open's 40 ms when, with sequential scans
/// allowed, its plan read a table whole). Only statements written so that every table is read through an
/// index, whatever the plan (a condition on it, or its order up to a limit), run there.
pub const PLANNED_ONCE: [(&str, &str); 3] =
    [("plan_cache_mode", "force_generic_plan"), ("enable_seqscan", "off"), ("jit", "off")];

/// The pool for statements that write a group of runs at once
/// (`queries::delivery::open_runs`, `close_runs`): on PostgreSQL a few connections on
/// which each statement is planned once ([`PLANNED_ONCE`]); elsewhere `db` itself.
///
/// Those statements take a group's ids as arrays, and planning them for their values
/// cost more than running them (0.77 ms against 0.13 ms for a grouped open, 0.66 against
/// 0.21 ms for a close, measured under `submit`). A plan made once depends on the tables
/// as they were when it was made: written with joins, a grouped close cached while the
/// tables were small went from 0.2 ms to 5–20 ms a call, and with sequential scans priced
/// out it still hashed whole tables when made on small analysed tables, or joined the
/// group with itself when made on empty ones. So neither statement joins a table: each
/// is read through an index condition on the group's ids, row by row from a group's row,
/// or in index order up to a limit, whatever the plan (see their plan tests in
/// `integration/runs.rs`: plans made on empty, empty analysed, small analysed and large
/// tables and run on grown ones). A run alone keeps its statements' cached plans on the
/// main pool, its ids passed one by one.
pub async fn connect_for_groups(db: &DatabaseConnection, url: &str) -> anyhow::Result<DatabaseConnection> {
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(db.clone());
    }
    let mut options = pool_options(url, 4);
    options.map_sqlx_postgres_opts(|pg| pg.options(PLANNED_ONCE));
    Database::connect(options).await.context("connecting to the database for group writes (DATABASE_URL)")
}

/// Whether `e` says the connection failed (unreachable, refused, pool exhausted,
/// dropped, SQLite busy), not the statement.
pub fn is_connection_failure(e: &sea_orm::DbErr) -> bool {
    use sea_orm::DbErr;
    match e {
        DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => true,
        DbErr::Exec(inner) | DbErr::Query(inner) => {
            let text = inner.to_string().to_ascii_lowercase();
            ["connection", "pool timed out", "broken pipe", "io error", "database is locked"]
                .iter()
                .any(|needle| text.contains(needle))
        }
        _ => false,
    }
}

/// The file path of a `sqlite:` URL, if it names a file.
fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then_some(path)
}

#[cfg(test)]
mod tests {
    use super::sqlite_path;

    #[test]
    fn sqlite_paths_are_found_in_urls() {
        assert_eq!(sqlite_path("sqlite://data/t.sqlite?mode=rwc"), Some("data/t.sqlite"));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://localhost/x"), None);
    }
}
