//! `admin`: the admin's reads at scale. Seeds R feedback rows and S subscriptions in
//! PostgreSQL, logs in over HTTP, and times the inbox's first page, a deep page (keyset),
//! the counts and a message's page, each cold (the read cache emptied before every
//! request: the database answers) and warm (the cache answers). It also records the
//! query plans (`EXPLAIN (ANALYZE, BUFFERS)`) of the very statements those pages run,
//! captured from the shared query functions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::report::Report;

/// The benchmark admin's password.
const PASSWORD: &str = "bench-admin-password-1";

/// Stores `rows` messages, one a minute up to now, every tenth unread, and refreshes the
/// planner's statistics and the visibility map (as autovacuum would).
pub async fn seed_messages(db: &DatabaseConnection, rows: u64) -> anyhow::Result<()> {
    eprintln!("seeding {rows} messages…");
    db.execute_unprepared(&format!(
        "INSERT INTO feedback_messages (submitter_name, submitter_email, content, created_at, read_at) \
         SELECT 'Visitor ' || n, 'visitor' || n || '@example.com', \
                'Message ' || n || ': ' || repeat('the form works, thank you. ', 6), \
                now() - ({rows} - n) * interval '1 minute', \
                CASE WHEN n % 10 = 0 THEN NULL ELSE now() END \
         FROM generate_series(1, {rows}) AS n"
    ))
    .await?;
    db.execute_unprepared("VACUUM ANALYZE feedback_messages").await?;
    Ok(())
}

/// Creates the admin with [`PASSWORD`] and returns a client logged in as them.
pub async fn logged_in_client(db: &DatabaseConnection, address: &str) -> anyhow::Result<reqwest::Client> {
    let email = shared::domain::EmailAddress::parse("bench@tidings.test").map_err(|e| anyhow::anyhow!("{e}"))?;
    let password = shared::domain::Password::parse(PASSWORD).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hash = web::auth::password::hash(password).await?;
    shared::queries::admin::upsert(db, &email, &hash).await?;
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()?;
    let html = client.get(format!("{address}/admin/login")).send().await?.text().await?;
    let token = tidings_tests::harness::extract_attribute(&html, "name=\"csrf_token\" value=\"")
        .context("no csrf_token on the login page")?;
    let response = client
        .post(format!("{address}/admin/login"))
        .header("Origin", address)
        .form(&[("csrf_token", token.as_str()), ("email", "bench@tidings.test"), ("password", PASSWORD)])
        .send()
        .await?;
    anyhow::ensure!(response.status().as_u16() == 303, "login failed: {}", response.status());
    Ok(client)
}

/// Deletes every read-cache key of `namespace` (a cold start for the next request).
async fn empty_cache(conn: &mut redis::aio::MultiplexedConnection, namespace: &str) -> anyhow::Result<()> {
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{namespace}:cache:*")).query_async(conn).await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
    }
    Ok(())
}

async fn timed_get(client: &reqwest::Client, url: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let response = client.get(url).send().await?;
    let status = response.status();
    response.bytes().await?;
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    Ok(started.elapsed())
}

/// The path of the `i`-th request to one page.
type PathOf = Box<dyn Fn(usize) -> String>;

/// Runs the scenario.
pub async fn run(
    db: &DatabaseConnection,
    address: &str,
    redis_url: &str,
    namespace: &str,
    rows: u64,
    requests: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    seed_messages(db, rows).await?;
    let client = logged_in_client(db, address).await?;
    let mut redis = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
    // Ids run 1..=rows; pick read messages (not a multiple of ten) so a page view does not
    // write.
    let id_at = move |fraction: f64| {
        let id = ((rows as f64 * fraction) as i64).max(1);
        if id % 10 == 0 { id + 1 } else { id }
    };
    let endpoints: Vec<(&str, PathOf)> = vec![
        ("first_page", Box::new(move |_| "/admin/".to_owned())),
        ("deep_page", Box::new(move |i| format!("/admin/?before={}", id_at(0.1 + 0.8 * (i % 97) as f64 / 97.0)))),
        ("counts", Box::new(move |_| "/admin/counts".to_owned())),
        ("message_page", Box::new(move |i| format!("/admin/feedback/{}", id_at(0.05 + 0.9 * (i % 89) as f64 / 89.0)))),
    ];
    let total = endpoints.len() * requests * 2;
    let started = Instant::now();
    let mut done = 0usize;
    for (name, path) in &endpoints {
        let mut cold = Vec::with_capacity(requests);
        for i in 0..requests {
            empty_cache(&mut redis, namespace).await?;
            cold.push(timed_get(&client, &format!("{address}{}", path(i))).await?);
            done += 1;
            crate::procs::progress_count(started.elapsed(), done, total, name);
        }
        // Warm: the same URLs again, each already in the cache once.
        for i in 0..requests.min(100) {
            timed_get(&client, &format!("{address}{}", path(i))).await?;
        }
        let mut warm = Vec::with_capacity(requests);
        for i in 0..requests {
            warm.push(timed_get(&client, &format!("{address}{}", path(i % requests.min(100)))).await?);
            done += 1;
            crate::procs::progress_count(started.elapsed(), done, total, name);
        }
        cold.sort();
        warm.sort();
        report.latencies(&format!("{name}_cold"), &cold);
        report.latencies(&format!("{name}_warm"), &warm);
    }
    eprintln!();
    explain(db, rows, report).await
}

/// Captures the statements the inbox, counts, message page and a fan-out page run, and
/// records the plan PostgreSQL executes each with.
async fn explain(db: &DatabaseConnection, rows: u64, report: &mut Report) -> anyhow::Result<()> {
    use shared::queries::{feedback, subscription};
    let captured: Arc<Mutex<Vec<Statement>>> = Arc::default();
    let mut probe = db.clone();
    let sink = Arc::clone(&captured);
    probe.set_metric_callback(move |info| {
        if let Ok(mut statements) = sink.lock() {
            statements.push(info.statement.clone());
        }
    });
    let deep = i64::try_from(rows / 2).unwrap_or(1);
    let mut labelled: Vec<(String, Vec<Statement>)> = Vec::new();
    let mut take = |label: &str, captured: &Arc<Mutex<Vec<Statement>>>| {
        let statements = captured.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        labelled.push((label.to_owned(), statements));
    };
    feedback::keyset_page(&probe, feedback::PageFrom::Newest, 50).await?;
    take("inbox first page", &captured);
    let page = feedback::keyset_page(&probe, feedback::PageFrom::Before(deep), 50).await?;
    take("inbox deep page (keyset)", &captured);
    if let (Some(oldest), Some(newest)) = (page.last(), page.first()) {
        feedback::has_older_newer(&probe, oldest.id, newest.id).await?;
        take("pages on either side", &captured);
    }
    feedback::counts(&probe, 14).await?;
    take("counts (total, unread, per day)", &captured);
    feedback::find(&probe, deep + 1).await?;
    take("message page", &captured);
    let ids = subscription::ids_after(&probe, 0, 500).await?;
    take("fan-out: a page of subscription ids", &captured);
    subscription::by_ids(&probe, &ids).await?;
    take("fan-out: that page's subscriptions", &captured);

    let mut text = String::new();
    for (label, statements) in labelled {
        for statement in statements {
            let explain = Statement {
                sql: format!("EXPLAIN (ANALYZE, BUFFERS) {}", statement.sql),
                values: statement.values.clone(),
                db_backend: statement.db_backend,
            };
            let plan = db.query_all_raw(explain).await?;
            text.push_str(&format!("-- {label}\n{}\n", statement.sql));
            for row in plan {
                let line: String = row.try_get_by_index(0)?;
                text.push_str(&format!("  {line}\n"));
            }
            text.push('\n');
        }
    }
    report.note("query_plans", text);
    Ok(())
}
