//! The read cache in Redis: what it serves, what drops its entries, the trim that keeps
//! it (and every other kind of data in Redis) within budget, and the number of queries
//! the admin's pages cost.

use std::time::Duration;

use reqwest::StatusCode;
use shared::cache::{Cache, CacheSettings, Cover, Lookup};
use shared::domain::NewFeedback;
use tidings_tests::harness::{Options, TEST_PASSWORD, TestApp, new_client, spawn_app_with};

use crate::pipeline::wait_until;

const ADMIN: &str = "ada@tidings.test";

/// An app (no worker unless asked) with admin `ADMIN` and a client logged in as them.
async fn logged_in(options: Options) -> (TestApp, reqwest::Client) {
    let app = spawn_app_with(options).await;
    app.create_admin_with_email(ADMIN).await;
    let client = new_client();
    assert_eq!(app.login(&client, ADMIN, TEST_PASSWORD).await.status(), StatusCode::SEE_OTHER);
    (app, client)
}

/// Stores a message straight in the database (no job): the cache learns of it only
/// through an invalidation.
async fn insert(app: &TestApp, content: &str) -> i64 {
    let feedback = NewFeedback::parse("Ann", "ann@example.com", content).expect("valid");
    shared::queries::feedback::insert_with_dispatch(&app.db, &feedback).await.expect("insert").feedback_id
}

/// Waits until the worker has announced every stored message (its fan-out jobs drop
/// cache entries too, which would race a test's own steps).
async fn settle(app: &TestApp) {
    let settled =
        wait_until(|| async { shared::queries::dispatch::outstanding(&app.db).await.expect("outstanding") == 0 }).await;
    assert!(settled, "the worker announced every message");
}

/// A counter or gauge of the web's `/metrics` (0 when absent).
async fn web_metric(app: &TestApp, line_start: &str) -> u64 {
    let text =
        app.client.get(format!("{}/metrics", app.address)).send().await.expect("metrics").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(line_start).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map_or(0, |v| v as u64)
}

/// A counter of the in-process worker's `/metrics` (0 when absent).
async fn worker_metric(app: &TestApp, line_start: &str) -> u64 {
    let text = app.worker_metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(line_start).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map_or(0, |v| v as u64)
}

/// SQL statements the web ran while `request` ran.
async fn queries_during(app: &TestApp, request: impl std::future::Future<Output = String>) -> (u64, String) {
    let before = web_metric(app, "tidings_db_queries_total ").await;
    let body = request.await;
    let after = web_metric(app, "tidings_db_queries_total ").await;
    (after - before, body)
}

async fn get(client: &reqwest::Client, url: String) -> String {
    let response = client.get(url).send().await.expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("body")
}

fn test_cache(app: &TestApp, settings: CacheSettings) -> impl std::future::Future<Output = Cache> {
    let (url, ns) = (app.settings.redis_url.clone(), app.settings.redis_namespace.clone());
    async move {
        let queue = shared::queue::JobQueue::connect(&url, &ns).await.expect("redis");
        Cache::new(queue.connection(), &ns, &settings)
    }
}

#[tokio::test]
async fn a_warm_inbox_and_message_page_are_served_without_the_database_and_a_delete_drops_them() {
    let (app, client) = logged_in(Options { worker: false, ..Options::default() }).await;
    let keep = insert(&app, "keep me").await;
    let doomed = insert(&app, "delete me").await;
    let inbox = format!("{}/admin/", app.address);
    let page = format!("{}/admin/feedback/{doomed}", app.address);

    let (cold, first) = queries_during(&app, get(&client, inbox.clone())).await;
    assert!(first.contains("delete me") && first.contains("2 messages, 2 unread"), "{first}");
    get(&client, page.clone()).await; // opens it: read, and the counts change
    let second = get(&client, inbox.clone()).await;
    get(&client, page.clone()).await;
    let (warm_page, shown) = queries_during(&app, get(&client, page.clone())).await;
    let (warm, _) = queries_during(&app, get(&client, inbox.clone())).await;

    assert!(cold > 0);
    assert!(second.contains("2 messages, 1 unread"), "the read invalidated the counts: {second}");
    assert!(shown.contains("delete me"));
    assert_eq!(warm_page, 0, "a read message's page comes from the cache");
    assert_eq!(warm, 0, "a warm inbox costs no query");
    assert!(web_metric(&app, "tidings_cache_requests_total{result=\"hit\"} ").await >= 3);

    // Delete it: no admin (this one, or another logged in elsewhere) sees it from cache.
    let token = app.admin_csrf_token(&client).await;
    let deleted = client
        .post(format!("{page}/delete"))
        .header("Origin", &app.address)
        .form(&[("csrf_token", token.as_str())])
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), StatusCode::SEE_OTHER);
    let other = new_client();
    app.login(&other, ADMIN, TEST_PASSWORD).await;
    for c in [&client, &other] {
        let inbox = get(c, inbox.clone()).await;
        assert!(!inbox.contains("delete me") && inbox.contains("1 message, 1 unread"), "{inbox}");
        assert_eq!(c.get(&page).send().await.expect("answer").status(), StatusCode::NOT_FOUND);
    }
    assert!(get(&client, format!("{}/admin/feedback/{keep}", app.address)).await.contains("keep me"));
}

#[tokio::test]
async fn a_new_message_shows_in_a_cached_inbox_once_its_fan_out_job_ran() {
    let (app, client) = logged_in(Options::default()).await;
    insert(&app, "already there").await;
    settle(&app).await;
    let inbox = format!("{}/admin/", app.address);
    assert!(get(&client, inbox.clone()).await.contains("already there"));

    app.submit_valid_feedback("Bob", "brand new").await;

    let shown = wait_until(|| async { get(&client, inbox.clone()).await.contains("brand new") }).await;
    assert!(shown, "the worker's job dropped the cached first page");
    assert!(get(&client, inbox).await.contains("2 messages"));
}

/// A message only the relay announces (the web never dropped anything for it): its
/// fan-out job drops the cached inbox before anyone is notified, also once Redis has
/// lost the cache's scripts (a restart).
async fn a_relayed_message_shows_in_a_cached_inbox(scripts_lost: bool) {
    use tidings_tests::redis_server::RedisServer;
    // Arrange: a Redis of the test's own; a cached inbox.
    let redis = RedisServer::start().await.expect("redis-server starts");
    let (app, client) = logged_in(Options { env: vec![("REDIS_URL".into(), redis.url())], ..Options::default() }).await;
    insert(&app, "already there").await;
    settle(&app).await;
    let inbox = format!("{}/admin/", app.address);
    assert!(get(&client, inbox.clone()).await.contains("already there"));
    if scripts_lost {
        // As after a restart of Redis: every script must be loaded again.
        let mut conn =
            redis::Client::open(redis.url()).expect("url").get_multiplexed_async_connection().await.expect("redis");
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.expect("flushed");
    }

    let dropped_before = worker_metric(&app, "tidings_cache_invalidated_total ").await;

    // Act: a message stored behind the web's back, which only the relay announces.
    insert(&app, "relayed").await;

    // Assert
    let shown = wait_until(|| async { get(&client, inbox.clone()).await.contains("relayed") }).await;
    assert!(shown, "the fan-out job dropped the cached first page");
    settle(&app).await;
    let dropped = worker_metric(&app, "tidings_cache_invalidated_total ").await - dropped_before;
    assert!(dropped >= 1, "the worker dropped the cached page ({dropped} entries)");
}

#[tokio::test]
async fn a_relayed_message_shows_in_a_cached_inbox_once_its_fan_out_job_ran() {
    a_relayed_message_shows_in_a_cached_inbox(false).await;
}

#[tokio::test]
async fn a_relayed_message_shows_in_a_cached_inbox_even_after_redis_lost_its_scripts() {
    a_relayed_message_shows_in_a_cached_inbox(true).await;
}

#[tokio::test]
async fn the_worker_invalidates_what_shows_a_message_changed_behind_the_caches_back() {
    let (app, client) = logged_in(Options::default()).await;
    let id = insert(&app, "will be handled").await;
    settle(&app).await;
    let page = format!("{}/admin/feedback/{id}", app.address);
    get(&client, page.clone()).await; // the first look marks it read (and drops its page)
    let read_handled = "tidings_jobs_total{kind=\"invalidate_cache\",outcome=\"succeeded\"} ";
    assert!(wait_until(|| async { worker_metric(&app, read_handled).await == 1 }).await, "the read's job ran");
    assert!(get(&client, page.clone()).await.contains("Mark as handled"));
    // Changed in the database only: the cache still shows the old state...
    shared::queries::feedback::set_handled(&app.db, id, true).await.expect("update");
    assert!(get(&client, page.clone()).await.contains("Mark as handled"));

    // ...until the job the web would enqueue after commit runs on the worker.
    let queue =
        shared::queue::JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let job = serde_json::to_vec(&shared::jobs::InvalidateCache::new(vec![id])).expect("json");
    queue.enqueue(job, None).await.expect("enqueued");

    let updated = wait_until(|| async { get(&client, page.clone()).await.contains("Mark as not handled") }).await;
    assert!(updated);
}

#[tokio::test]
async fn with_the_cache_off_every_page_still_works_and_nothing_is_cached() {
    let env = vec![("CACHE_ENABLED".to_owned(), "false".to_owned())];
    let (app, client) = logged_in(Options { worker: false, env, ..Options::default() }).await;
    let id = insert(&app, "uncached").await;

    assert!(get(&client, format!("{}/admin/", app.address)).await.contains("uncached"));
    assert!(get(&client, format!("{}/admin/feedback/{id}", app.address)).await.contains("uncached"));
    let token = app.admin_csrf_token(&client).await;
    let handled = client
        .post(format!("{}/admin/feedback/{id}/handled", app.address))
        .header("Origin", &app.address)
        .form(&[("csrf_token", token.as_str()), ("handled", "true")])
        .send()
        .await
        .expect("answer");
    assert_eq!(handled.status(), StatusCode::SEE_OTHER);
    assert!(get(&client, format!("{}/admin/feedback/{id}", app.address)).await.contains("Mark as not handled"));

    let mut conn = redis::Client::open(app.settings.redis_url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:cache:*", app.settings.redis_namespace))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(keys.is_empty(), "{keys:?}");
    assert!(web_metric(&app, "tidings_cache_requests_total{result=\"off\"} ").await >= 4);
}

#[tokio::test]
async fn the_inbox_and_a_message_page_cost_the_same_queries_however_many_messages_there_are() {
    let env = vec![("CACHE_ENABLED".to_owned(), "false".to_owned())];
    let (app, client) = logged_in(Options { worker: false, env, ..Options::default() }).await;
    let first = insert(&app, "one").await;
    let inbox = format!("{}/admin/", app.address);
    let (few, _) = queries_during(&app, get(&client, inbox.clone())).await;
    let (one_page, _) = queries_during(&app, get(&client, format!("{inbox}feedback/{first}"))).await;

    app.insert_burst(120).await;
    let (many, _) = queries_during(&app, get(&client, inbox.clone())).await;
    let (deep, body) = queries_during(&app, get(&client, format!("{inbox}?before={}", first + 60))).await;
    let (page_again, _) = queries_during(&app, get(&client, format!("{inbox}feedback/{}", first + 5))).await;

    // A page: its rows, one look each way for more pages, and the counts (total, unread,
    // per day) — no query per message.
    assert_eq!(few, 6, "queries for the inbox");
    assert_eq!(many, few, "the inbox with 121 messages");
    assert_eq!(deep, few, "a deep page");
    assert!(body.contains("burst"));
    // A message's page: the row, then marking it read the first time.
    assert_eq!(one_page, 2);
    assert_eq!(page_again, one_page);
}

#[tokio::test]
async fn the_cache_keeps_the_most_recently_used_entries_within_its_budget() {
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let settings = CacheSettings { max_entries: 5, ..CacheSettings::default() };
    let cache = test_cache(&app, settings.clone()).await;
    let old = test_cache(&app, CacheSettings { deploy_version: "previous".into(), ..settings }).await;
    let Lookup::Miss { seq } = old.get("counts").await.expect("get") else { panic!("empty cache") };
    assert!(old.put("counts", b"old build", &seq, Cover::Everything).await.expect("put").stored);
    for i in 0..10 {
        let name = format!("detail:{i}");
        let Lookup::Miss { seq } = cache.get(&name).await.expect("get") else { panic!("not there yet") };
        let stored = cache.put(&name, b"page", &seq, Cover::Ids { lo: Some(i), hi: Some(i) }).await.expect("put");
        assert_eq!(stored.over_budget, i >= 4, "entry {i}: 11 entries in all past a budget of 5");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Use two of the oldest: they become the most recently used.
    for i in [0, 1] {
        assert!(matches!(cache.get(&format!("detail:{i}")).await.expect("get"), Lookup::Hit(_)));
    }

    let trimmed = cache.trim().await.expect("trim");

    assert_eq!(trimmed.old_version, 1, "the previous build's entry goes whatever its use");
    assert_eq!(trimmed.evicted, 5);
    let usage = cache.usage().await.expect("usage");
    assert_eq!(usage.entries, 5);
    for i in 0..10 {
        let kept = matches!(cache.get(&format!("detail:{i}")).await.expect("get"), Lookup::Hit(_));
        assert_eq!(kept, [0, 1, 7, 8, 9].contains(&i), "entry {i}");
    }
    assert!(usage.bytes > 0 && usage.bytes < 5 * 200, "{usage:?}");
}

#[tokio::test]
async fn invalidation_drops_exactly_what_shows_a_message_and_a_racing_read_is_not_stored() {
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let cache = test_cache(&app, CacheSettings::default()).await;
    let covers = [
        ("page:newest", Cover::Ids { lo: Some(51), hi: None }),
        ("page:before:51", Cover::Ids { lo: Some(1), hi: Some(50) }),
        ("detail:7", Cover::Ids { lo: Some(7), hi: Some(7) }),
        ("detail:60", Cover::Ids { lo: Some(60), hi: Some(60) }),
        ("counts", Cover::Everything),
    ];
    for (name, cover) in covers {
        let Lookup::Miss { seq } = cache.get(name).await.expect("get") else { panic!() };
        assert!(cache.put(name, b"x", &seq, cover).await.expect("put").stored);
    }
    let cached = |name: &'static str| {
        let cache = cache.clone();
        async move { matches!(cache.get(name).await.expect("get"), Lookup::Hit(_)) }
    };

    // Message 7 changed: its page, the page listing it and the counts go.
    assert_eq!(cache.invalidate(&[7]).await.expect("invalidate"), 3);
    assert!(!cached("detail:7").await && !cached("page:before:51").await && !cached("counts").await);
    assert!(cached("page:newest").await && cached("detail:60").await);
    // A new message (id 100): the first page, not message 60's page.
    assert_eq!(cache.invalidate(&[100]).await.expect("invalidate"), 1);
    assert!(!cached("page:newest").await && cached("detail:60").await);

    // A read that began before a change must not store what it read after the change's
    // invalidation ran.
    let Lookup::Miss { seq } = cache.get("counts").await.expect("get") else { panic!() };
    cache.invalidate(&[60]).await.expect("invalidate");
    assert!(!cache.put("counts", b"stale", &seq, Cover::Everything).await.expect("put").stored);
    assert!(!cached("counts").await);
}

#[tokio::test]
async fn past_its_budget_the_web_asks_for_one_trim_and_the_worker_runs_it() {
    let env = vec![
        ("CACHE_MAX_ENTRIES".to_owned(), "4".to_owned()),
        // No tick during the test: only the on-demand trim can do it.
        ("TRIM_INTERVAL_MS".to_owned(), "3600000".to_owned()),
    ];
    let (app, client) = logged_in(Options { env, ..Options::default() }).await;
    let ids = [insert(&app, "a").await, insert(&app, "b").await, insert(&app, "c").await, insert(&app, "d").await];
    // Read already, so looking at them changes nothing (and drops nothing).
    for id in ids {
        shared::queries::feedback::mark_read(&app.db, id).await.expect("read");
    }
    settle(&app).await;
    let cache = test_cache(&app, app.settings.cache.clone()).await;

    // Four pages, the inbox and its counts: six entries for a budget of four.
    for id in ids {
        get(&client, format!("{}/admin/feedback/{id}", app.address)).await;
    }
    get(&client, format!("{}/admin/", app.address)).await;

    let on_demand = "tidings_trims_total{trigger=\"on_demand\"} ";
    // Every put past the budget may ask again (once the queued trim started): wait for
    // the last one.
    let trimmed = wait_until(|| async {
        worker_metric(&app, on_demand).await >= 1 && cache.usage().await.expect("usage").entries <= 4
    })
    .await;
    assert!(trimmed, "the web queued a trim and the worker ran it: {:?}", cache.usage().await);
    let evicted = worker_metric(&app, "tidings_trimmed_total{kind=\"cache_evicted\"} ").await;
    assert!(evicted > 0, "entries were evicted");
}

#[tokio::test]
async fn the_trim_bounds_sessions_login_counters_and_idempotency_keys() {
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let ns = app.settings.redis_namespace.clone();
    let mut conn = shared::queue::JobQueue::connect(&app.settings.redis_url, &ns).await.expect("redis").connection();
    let now = chrono::Utc::now().timestamp();
    let mut pipe = redis::pipe();
    for i in 0..30_u64 {
        let body = serde_json::json!({"admin_id": 1, "logged_in_at": now - 60}).to_string();
        pipe.pset_ex(format!("{ns}:session:s{i}"), body, 60_000 + i * 1000).ignore();
        pipe.pset_ex(format!("{ns}:login-failures:address:10.0.0.{i}"), 1, 60_000 + i * 1000).ignore();
        pipe.pset_ex(format!("{ns}:fanout:idempotency:dispatch-{i}-0"), "task", 60_000 + i * 1000).ignore();
    }
    // A digest's key, the closest of all to expiring: it stays, so its window's digest
    // runs once.
    pipe.pset_ex(format!("{ns}:fanout:idempotency:digest-60-120"), "task", 30_000).ignore();
    // The queue's metadata of a worker still registered, and of one that is gone.
    pipe.zadd(format!("{ns}:fanout:workers"), "alive", now).ignore();
    pipe.hset(format!("{ns}:fanout:workers:metadata:alive"), "service", "fan_out").ignore();
    pipe.hset(format!("{ns}:fanout:workers:metadata:gone"), "service", "fan_out").ignore();
    // Active, but logged in more than a day ago: past its absolute lifetime.
    let stale = serde_json::json!({"admin_id": 1, "logged_in_at": now - 25 * 3600}).to_string();
    pipe.pset_ex(format!("{ns}:session:old"), stale, 3_600_000).ignore();
    let _: () = pipe.query_async(&mut conn).await.expect("seeded");
    let budgets = shared::settings::RedisBudgets { sessions: 10, rate_limits: 5, idempotency_keys: 20 };

    let swept = shared::budget::sweep(&mut conn, &ns, &budgets).await.expect("sweep");

    assert_eq!(swept.expired_sessions, 1);
    assert_eq!(swept.worker_metadata, 1);
    assert_eq!((swept.sessions, swept.rate_limits, swept.idempotency_keys), (20, 25, 10));
    let left = |pattern: &str| {
        let (mut conn, pattern) = (conn.clone(), format!("{ns}:{pattern}"));
        async move {
            let mut keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut conn).await.expect("keys");
            keys.sort();
            keys
        }
    };
    let sessions = left("session:*").await;
    assert_eq!(sessions.len(), 10);
    assert!(sessions.iter().all(|k| k[k.rfind(":s").expect("id") + 2..].parse::<u32>().expect("n") >= 20));
    assert_eq!(left("login-failures:*").await.len(), 5);
    assert_eq!(left("fanout:workers:metadata:*").await, [format!("{ns}:fanout:workers:metadata:alive")]);
    let idempotency = left("fanout:idempotency:*").await;
    assert_eq!(idempotency.len(), 21);
    assert!(idempotency.contains(&format!("{ns}:fanout:idempotency:digest-60-120")), "{idempotency:?}");
}

#[tokio::test]
async fn at_most_one_trim_waits_however_often_it_is_asked_for() {
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let queue =
        shared::queue::JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");

    let asked: Vec<bool> = futures::future::join_all((0..5).map(|_| queue.request_trim(None)))
        .await
        .into_iter()
        .map(|r| r.expect("redis"))
        .collect();

    assert_eq!(asked.iter().filter(|queued| **queued).count(), 1, "{asked:?}");
    let waiting = queue.waiting_jobs(100).await.expect("jobs");
    assert_eq!(waiting.iter().filter(|j| j.kind == shared::jobs::TRIM_CACHES_KIND).count(), 1, "{waiting:?}");
}

#[tokio::test]
async fn a_new_message_shows_in_a_cached_inbox_even_while_no_worker_runs() {
    let (app, client) = logged_in(Options { worker: false, ..Options::default() }).await;
    insert(&app, "already there").await;
    let inbox = format!("{}/admin/", app.address);
    assert!(get(&client, inbox.clone()).await.contains("already there"));

    app.submit_valid_feedback("Bob", "while the workers are down").await;

    let shown = wait_until(|| async { get(&client, inbox.clone()).await.contains("while the workers are down") }).await;
    assert!(shown, "the web dropped the cached first page after the commit");
}

#[tokio::test]
async fn a_new_message_shows_in_a_cached_inbox_while_the_web_holds_it_for_room_in_redis() {
    // Arrange: no worker and room in Redis for one job, so the web holds every message
    // after the first, more than one batch of them; the inbox cached after them.
    let (app, client) =
        logged_in(Options { worker: false, env: vec![("QUEUE_MAX_BACKLOG".into(), "1".into())], ..Options::default() })
            .await;
    app.submit_burst(300, "filler").await;
    let inbox = format!("{}/admin/", app.address);
    assert!(get(&client, inbox.clone()).await.contains("filler"));
    // The first page is cached once the web has taken every filler (each one it takes
    // drops the page again): served without a statement.
    let cached = wait_until(|| async { queries_during(&app, get(&client, inbox.clone())).await.0 == 0 }).await;
    assert!(cached, "the inbox's first page is served from the cache");

    // Act: one more message, behind the held ones.
    app.submit_valid_feedback("Bob", "behind the held ones").await;

    // Assert: the web dropped the cached first page although the message waits for room.
    let shown = wait_until(|| async { get(&client, inbox.clone()).await.contains("behind the held ones") }).await;
    assert!(shown, "the cached first page still hides the new message");
}
