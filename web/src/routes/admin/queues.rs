//! `/admin/queues`: the job system at a glance — backlog, running jobs, waiting jobs with
//! their attempt numbers, dead letters, worker processes, and throughput and latency (run
//! time, queue wait) per minute over the last hour — with retry and discard buttons for
//! dead letters. The page refreshes itself every 10 seconds.

use std::fmt::Write as _;

use poem::http::StatusCode;
use poem::session::Session;
use poem::web::{CsrfToken, CsrfVerifier, Data, Form, Path, Redirect};
use poem::{IntoResponse, Request, Response, handler};
use serde::Deserialize;
use shared::job_stats::Minute;

use super::{current_admin, push::same_origin, to_login};
use crate::error::{Result, WebError};
use crate::state::AppState;
use crate::templates::{AdminQueues, render};

/// Minutes shown in the charts.
const MINUTES: i64 = 60;

#[handler]
pub(super) async fn page(state: Data<&AppState>, session: &Session, token: &CsrfToken) -> Result<Response> {
    if current_admin(session).is_none() {
        return Ok(to_login());
    }
    let queue = state
        .dispatcher
        .queue()
        .await
        .ok_or_else(|| WebError::Unavailable(anyhow::anyhow!("redis is not reachable")))?;
    let unavailable = |e: shared::queue::QueueError| WebError::Unavailable(e.into());
    let backlog = queue.backlog().await.map_err(unavailable)?;
    let dead_letters = queue.dead_letters(20).await.map_err(unavailable)?;
    let dead_count = queue.dead_letter_count().await.map_err(unavailable)?;
    let mut conn = queue.connection();
    let redis_down = |e: redis::RedisError| WebError::Unavailable(e.into());
    let workers =
        shared::worker_health::read_all(&mut conn, &state.settings.redis_namespace).await.map_err(redis_down)?;
    let now = chrono::Utc::now().timestamp();
    let minutes = shared::job_stats::last_minutes(&mut conn, &state.settings.redis_namespace, now, MINUTES)
        .await
        .map_err(redis_down)?;
    let waiting = shared::queries::dispatch::outstanding(&state.db).await?;
    let jobs = queue.waiting_jobs(20).await.map_err(unavailable)?;
    let running = queue.running().await.map_err(unavailable)?;
    let last_hour: u64 = minutes.iter().map(|m| m.succeeded + m.failed).sum();
    let page = AdminQueues {
        csrf_token: &token.0,
        backlog,
        waiting,
        dead_count,
        dead_letters,
        workers,
        last_hour,
        throughput_svg: throughput_chart(&minutes),
        latency_svg: latency_chart(&minutes),
        running,
        now,
        jobs,
    };
    Ok(render(StatusCode::OK, &page))
}

/// The retry/discard buttons' form.
#[derive(Debug, Deserialize)]
pub(super) struct DeadForm {
    #[serde(default)]
    csrf_token: String,
}

#[handler]
pub(super) async fn settle(
    req: &Request,
    state: Data<&AppState>,
    session: &Session,
    verifier: &CsrfVerifier,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<DeadForm>,
) -> Result<Response> {
    if !verifier.is_valid(&form.csrf_token) || !same_origin(req) {
        return Err(WebError::Forbidden("This form has expired. Please reload the page and try again."));
    }
    let Some(admin) = current_admin(session) else { return Ok(to_login()) };
    let queue = state
        .dispatcher
        .queue()
        .await
        .ok_or_else(|| WebError::Unavailable(anyhow::anyhow!("redis is not reachable")))?;
    let done = match action.as_str() {
        "retry" => queue.retry_dead_letter(&state.db, &id).await,
        "discard" => queue.discard_dead_letter(&id).await,
        _ => return Err(WebError::NotFound),
    }
    .map_err(|e| WebError::Unavailable(e.into()))?;
    if !done {
        return Err(WebError::NotFound);
    }
    tracing::info!(admin_id = admin, dead_letter = %id, action = %action, "queues.dead_letter_settled");
    Ok(Redirect::see_other("/admin/queues").into_response())
}

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 120.0;

/// Bars of jobs per minute: succeeded in blue, failed stacked on top in red.
pub fn throughput_chart(minutes: &[Minute]) -> String {
    let max = minutes.iter().map(|m| m.succeeded + m.failed).max().unwrap_or(0).max(1) as f64;
    let bar = WIDTH / minutes.len().max(1) as f64;
    let mut svg = open_svg("Jobs per minute over the last hour");
    for (i, m) in minutes.iter().enumerate() {
        let x = i as f64 * bar;
        let ok = m.succeeded as f64 / max * HEIGHT;
        let failed = m.failed as f64 / max * HEIGHT;
        let _ = write!(
            svg,
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{ok:.1}" fill="#2456c7"><title>{} succeeded</title></rect>"##,
            HEIGHT - ok,
            (bar - 1.0).max(1.0),
            m.succeeded
        );
        if m.failed > 0 {
            let _ = write!(
                svg,
                r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{failed:.1}" fill="#b42318"><title>{} failed</title></rect>"##,
                HEIGHT - ok - failed,
                (bar - 1.0).max(1.0),
                m.failed
            );
        }
    }
    close_svg(svg, &format!("max {max:.0}/min"))
}

/// Latency per minute, where jobs ran: the average run time (blue) and the average wait
/// between being due and starting (orange), in ms on one scale.
pub fn latency_chart(minutes: &[Minute]) -> String {
    let average = |total: fn(&Minute) -> u64| -> Vec<Option<f64>> {
        minutes
            .iter()
            .map(|m| {
                let n = m.succeeded + m.failed;
                (n > 0).then(|| total(m) as f64 / n as f64)
            })
            .collect()
    };
    let (run, wait) = (average(|m| m.run_ms), average(|m| m.wait_ms));
    let max = run.iter().chain(&wait).flatten().copied().fold(1.0_f64, f64::max);
    let step = WIDTH / minutes.len().max(1) as f64;
    let mut svg = open_svg("Average job run time and queue wait per minute over the last hour");
    for (series, colour, what) in [(&run, "#2456c7", "run"), (&wait, "#c76a00", "wait")] {
        let points: Vec<(f64, f64, f64)> = series
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.map(|a| (i as f64 * step + step / 2.0, HEIGHT - a / max * HEIGHT, a)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let line: Vec<String> = points.iter().map(|(x, y, _)| format!("{x:.1},{y:.1}")).collect();
        let _ =
            write!(svg, r##"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"##, line.join(" "));
        for (x, y, ms) in &points {
            let _ = write!(
                svg,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{colour}"><title>{what} {ms:.1} ms</title></circle>"##
            );
        }
    }
    close_svg(svg, &format!("max {max:.1} ms"))
}

fn open_svg(label: &str) -> String {
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {}" role="img" aria-label="{label}"><rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff" stroke="#e3e6ee"/>"##,
        HEIGHT + 16.0
    )
}

fn close_svg(mut svg: String, caption: &str) -> String {
    let _ = write!(
        svg,
        r##"<text x="0" y="{}" font-size="11" fill="#5b6475">60 min ago</text><text x="{WIDTH}" y="{}" font-size="11" fill="#5b6475" text-anchor="end">now · {caption}</text></svg>"##,
        HEIGHT + 13.0,
        HEIGHT + 13.0
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_draw_a_bar_per_busy_minute_and_lines_through_run_times_and_waits() {
        let minutes = [
            Minute { at: 0, succeeded: 10, failed: 0, run_ms: 50, wait_ms: 20 },
            Minute { at: 60, succeeded: 0, failed: 0, run_ms: 0, wait_ms: 0 },
            Minute { at: 120, succeeded: 5, failed: 5, run_ms: 200, wait_ms: 30 },
        ];
        let bars = throughput_chart(&minutes);
        assert_eq!(bars.matches("<title>").count(), 4, "three success bars (one empty) and one failure bar");
        assert!(bars.contains("10 succeeded") && bars.contains("5 failed"));
        let line = latency_chart(&minutes);
        assert_eq!(line.matches("<circle").count(), 4, "two points per line: minutes without jobs have none");
        assert!(line.contains("run 5.0 ms") && line.contains("wait 2.0 ms") && line.contains("run 20.0 ms"));
        assert!(!bars.contains("<script") && !line.contains("style="));
    }
}
