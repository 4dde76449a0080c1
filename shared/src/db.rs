//! Database connections: SQLite (the default, a local file) or PostgreSQL.

use std::time::Duration;

use anyhow::Context;
use sea_orm::{ConnectOptions, Database, DatabaseConnection};

/// Connects to `url`, creating the SQLite file (and its folder) if needed.
///
/// SQLite runs in WAL mode with a busy timeout, so the web and worker processes can
/// write to one file at once; pools are bounded and fail fast when the database is down.
pub async fn connect(url: &str) -> anyhow::Result<DatabaseConnection> {
    if let Some(path) = sqlite_path(url)
        && let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the folder of {path}"))?;
    }
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(if url.starts_with("sqlite:") { 8 } else { 20 })
        .min_connections(1)
        .connect_timeout(Duration::from_secs(3))
        .acquire_timeout(Duration::from_secs(3))
        // A connection is checked with a round trip only after it sat idle for a second:
        // checking it on every use would double the round trips of every statement, and
        // a busy pool reuses its connections well within that. A database restart takes
        // longer, so connections it broke are found by the check, not by a statement.
        .test_before_acquire_if_idle_for(Duration::from_secs(1))
        // Every connection of the pool gets these, not only the first.
        .map_sqlx_sqlite_opts(|sqlite| {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true)
                .synchronous(SqliteSynchronous::Normal)
        })
        .sqlx_logging(false);
    Database::connect(options).await.context("connecting to the database (DATABASE_URL)")
}

/// Runs `sql` with `values` on PostgreSQL as a one-off statement and returns its rows.
///
/// The statement goes out unnamed, so the server plans it for these very values. The
/// statements that take a group's ids as arrays need that: a plan the server cached
/// while a table was small reads that table whole once it has grown (a grouped close
/// went from 0.2 ms to 5–20 ms a call over one `submit` run), and the server replans
/// only when the table's statistics change, which may be never (autovacuum off) or long
/// after. A group's statement is planned for each call instead, a cost its runs share.
pub async fn query_one_off(
    db: &DatabaseConnection,
    sql: &'static str,
    values: Vec<sea_orm::Value>,
) -> Result<Vec<sea_orm::QueryResult>, sea_orm::DbErr> {
    use sea_orm::sqlx::{self, Error};
    use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr, Value};
    let mut query = sqlx::query(sql).persistent(false);
    for value in values {
        query = match value {
            Value::BigInt(v) => query.bind(v),
            Value::Int(v) => query.bind(v),
            Value::String(v) => query.bind(v),
            Value::ChronoDateTimeUtc(v) => query.bind(v),
            other => return Err(DbErr::Custom(format!("query_one_off cannot bind {other:?}"))),
        };
    }
    let rows = query.fetch_all(db.get_postgres_connection_pool()).await.map_err(|e| match e {
        Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
        Error::PoolClosed => DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed),
        e => DbErr::Query(RuntimeErr::SqlxError(e.into())),
    })?;
    Ok(rows.into_iter().map(sea_orm::QueryResult::from).collect())
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
