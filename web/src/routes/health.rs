//! `GET /healthz` (the process is up) and `GET /readyz` (database and Redis answer).

use std::time::Duration;

use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{IntoResponse, Response, Route, get, handler};
use sea_orm::ConnectionTrait;

use crate::state::AppState;

/// The routes of this module, mounted at `/`.
pub fn router() -> Route {
    Route::new().at("/healthz", get(healthz)).at("/readyz", get(readyz)).at("/metrics", get(metrics))
}

#[handler]
async fn healthz() -> &'static str {
    "ok"
}

#[handler]
async fn readyz(state: Data<&AppState>) -> Response {
    let database = tokio::time::timeout(Duration::from_secs(2), state.db.execute_unprepared("SELECT 1"))
        .await
        .is_ok_and(|r| r.is_ok());
    let redis = redis_answers(&state.settings.redis_url).await;
    let status = if database && redis { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    // Workers are reported, not required: the web takes feedback without them.
    let workers = worker_summary(&state).await;
    Json(serde_json::json!({ "database": word(database), "redis": word(redis), "workers": workers }))
        .with_status(status)
        .into_response()
}

/// `GET /metrics`: Prometheus text format. Counters of this process, plus the queue's
/// backlog and the live worker processes read at scrape time.
#[handler]
async fn metrics(state: Data<&AppState>) -> Response {
    let (backlog, workers) = match state.dispatcher.queue().await {
        Some(queue) => {
            let backlog = queue.backlog().await.map(|b| b as f64).unwrap_or(f64::NAN);
            let mut conn = queue.connection();
            let workers = shared::worker_health::read_all(&mut conn, &state.settings.redis_namespace)
                .await
                .map(|r| r.len() as f64)
                .unwrap_or(f64::NAN);
            (backlog, workers)
        }
        None => (f64::NAN, f64::NAN),
    };
    shared::telemetry::count_dropped_lines(&state.metrics);
    let text = state.metrics.render(&[
        ("tidings_queue_backlog", "Jobs waiting in Redis (due and pending).", backlog),
        ("tidings_worker_processes", "Worker processes reporting themselves.", workers),
    ]);
    text.with_content_type("text/plain; version=0.0.4").into_response()
}

/// Live worker processes and how many are rebuilding a dead worker.
async fn worker_summary(state: &AppState) -> serde_json::Value {
    let Some(queue) = state.dispatcher.queue().await else { return serde_json::Value::Null };
    let mut conn = queue.connection();
    let read = shared::worker_health::read_all(&mut conn, &state.settings.redis_namespace);
    match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(reports)) => serde_json::json!({
            "live": reports.len(),
            "restarting": reports.iter().filter(|r| r.state == "restarting").count(),
            "restarts": reports.iter().map(|r| r.restarts).sum::<u32>(),
        }),
        _ => serde_json::Value::Null,
    }
}

async fn redis_answers(url: &str) -> bool {
    let ping = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_)))
}
