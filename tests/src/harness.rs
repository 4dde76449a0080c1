//! `spawn_app()`: a running Tidings (web + worker, in-process) on its own database, its
//! own Redis key namespace and its own push-service stand-in, so tests run in parallel.
//!
//! Set `TEST_LOG=1` to see the application's logs. `TEST_DATABASE_URL` names the
//! PostgreSQL server databases are created on (default: the local server, user postgres).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use shared::settings::Settings;

use crate::push_service::{BrowserSubscription, PushService};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A fresh SQLite file.
    Sqlite,
    /// A fresh PostgreSQL database.
    Postgres,
}

/// Knobs a test may turn before the app starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Database backend.
    pub backend: Backend,
    /// Start a worker in-process.
    pub worker: bool,
    /// Jobs the in-process worker runs at once (from 16, in two fetch loops).
    pub worker_concurrency: usize,
    /// In-process mode: no worker, jobs run in the request through
    /// `worker::immediate::Immediate` and Redis is not used for them.
    pub immediate: bool,
    /// Extra or overriding environment variables.
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self { backend: Backend::Postgres, worker: true, worker_concurrency: 2, immediate: false, env: Vec::new() }
    }
}

/// A running application and handles on everything around it.
pub struct TestApp {
    /// Base URL of the web, e.g. `http://127.0.0.1:40123`.
    pub address: String,
    /// The app's database.
    pub db: DatabaseConnection,
    /// The settings both processes run with.
    pub settings: Settings,
    /// The environment those settings were read from (to start the real binaries).
    pub env: HashMap<String, String>,
    /// The push-service stand-in.
    pub push: PushService,
    /// An HTTP client with a cookie store that does not follow redirects.
    pub client: reqwest::Client,
    /// Stops the in-process worker, if one runs.
    worker_stop: Option<worker::app::ShutdownHandle>,
    /// Where the in-process worker serves `/metrics`.
    pub worker_metrics_port: Option<u16>,
    /// Deletes the namespace's Redis keys and the database when dropped.
    _cleanup: Cleanup,
}

/// The environment every test app starts from.
fn base_env(database_url: &str, namespace: &str, push_origin: &str) -> HashMap<String, String> {
    let (private, public) = web::commands::new_vapid_keys();
    let redis_url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    [
        ("DATABASE_URL", database_url.to_owned()),
        ("REDIS_URL", redis_url),
        ("REDIS_NAMESPACE", namespace.to_owned()),
        ("BIND", "127.0.0.1:0".into()),
        ("SECRET_KEY", "test-secret-key-that-is-long-enough-0123456789".into()),
        ("VAPID_PRIVATE_KEY", private),
        ("VAPID_PUBLIC_KEY", public),
        ("VAPID_SUBJECT", "mailto:ops@tidings.test".into()),
        ("PUSH_ALLOWED_HOSTS", push_origin.to_owned()),
        ("SUBMIT_RATE_LIMIT", "0".into()),
        ("PUSH_TIMEOUT_MS", "2000".into()),
        ("PUSH_RETRY_BASE_MS", "200".into()),
        ("PUSH_RETRY_CAP_SECS", "5".into()),
        ("RELAY_INTERVAL_MS", "200".into()),
        ("RELAY_GRACE_MS", "300".into()),
        ("QUEUE_POLL_MS", "500".into()),
        ("WORKER_METRICS_BIND", "127.0.0.1:0".into()),
        // Coalescing would fold the bursts many tests send; its own test turns it on.
        ("NOTIFY_BURST_THRESHOLD", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Starts web and worker on PostgreSQL with default options.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

/// Starts an app with `options`; panics with the reason if anything fails to start.
pub async fn spawn_app_with(options: Options) -> TestApp {
    init_test_logging();
    try_spawn(options).await.expect("the test app starts")
}

async fn try_spawn(options: Options) -> anyhow::Result<TestApp> {
    let push = PushService::start().await?;
    let namespace = format!("test-{}", uuid::Uuid::new_v4().simple());
    let (database_url, dropper) = create_database(options.backend, &namespace).await?;
    let mut env = base_env(&database_url, &namespace, &push.origin());
    env.extend(options.env);
    let settings = Settings::from_map(&env)?;
    push.expect_vapid_public_key(settings.push.vapid_public_key.as_deref().unwrap_or_default());

    let db = shared::db::connect(&settings.database_url).await?;
    Migrator::up(&db, None).await.context("migrating the test database")?;

    // In-process mode: the web runs jobs itself, so links in pushes need the web's
    // address before it is bound; bind a port first and hand it over.
    let mut settings = settings;
    let web_app = if options.immediate {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        settings.web.bind = format!("127.0.0.1:{port}").parse()?;
        settings.web.public_url = url::Url::parse(&format!("http://127.0.0.1:{port}/"))?;
        let mut runner = worker::immediate::Immediate::new(settings.clone(), db.clone())?;
        // The cache lives in Redis: with Redis unreachable, jobs run without it.
        if settings.cache.enabled
            && let Ok(queue) = shared::queue::JobQueue::connect(&settings.redis_url, &settings.redis_namespace).await
        {
            let cache = shared::cache::Cache::new(queue.connection(), &settings.redis_namespace, &settings.cache);
            runner = runner.with_cache(cache);
        }
        web::app::Application::build_with(settings.clone(), Some(std::sync::Arc::new(runner))).await?
    } else {
        web::app::Application::build(settings.clone()).await?
    };
    let address = format!("http://127.0.0.1:{}", web_app.port());
    settings.web.public_url = url::Url::parse(&format!("{address}/"))?;
    tokio::spawn(web_app.run_until_stopped());

    let (worker_stop, worker_metrics_port) = if options.worker && !options.immediate {
        let worker_app = worker::app::Application::build(settings.clone(), options.worker_concurrency).await?;
        let handle = worker_app.shutdown_handle();
        let port = worker_app.metrics_port();
        tokio::spawn(worker_app.run_until_stopped());
        (Some(handle), port)
    } else {
        (None, None)
    };

    let client = new_client();
    let cleanup = Cleanup { redis_url: settings.redis_url.clone(), namespace, database: dropper };
    Ok(TestApp { address, db, settings, env, push, client, worker_stop, worker_metrics_port, _cleanup: cleanup })
}

impl TestApp {
    /// Starts an in-process worker (for apps spawned with `worker: false`).
    pub async fn start_worker(&mut self) {
        let worker_app = worker::app::Application::build(self.settings.clone(), 2).await.expect("the worker starts");
        self.worker_stop = Some(worker_app.shutdown_handle());
        self.worker_metrics_port = worker_app.metrics_port();
        tokio::spawn(worker_app.run_until_stopped());
    }

    /// Stops the in-process worker (as SIGTERM would).
    pub fn stop_worker(&mut self) {
        if let Some(handle) = self.worker_stop.take() {
            handle.shutdown();
        }
    }

    /// A fresh subscription on the stand-in, stored for a new admin.
    pub async fn subscribe_browser(&self) -> BrowserSubscription {
        let admin = self.create_admin().await;
        self.subscribe_device(admin).await
    }

    /// A fresh subscription on the stand-in, stored as a device of admin `admin`.
    pub async fn subscribe_device(&self, admin: i64) -> BrowserSubscription {
        let browser = self.push.new_subscription();
        let sub = shared::domain::NewSubscription::parse(
            &browser.endpoint,
            &browser.p256dh,
            &browser.auth,
            &self.settings.push.allowed_hosts,
        )
        .expect("the stand-in's subscription is valid");
        shared::queries::subscription::upsert(&self.db, &sub, admin, Some("test browser"))
            .await
            .expect("subscription stored");
        browser
    }

    /// Creates an admin account directly in the database; returns its id.
    pub async fn create_admin(&self) -> i64 {
        self.create_admin_with_email(&format!("admin-{}@tidings.test", uuid::Uuid::new_v4().simple())).await
    }

    /// Creates (or resets) the admin `email` with [`TEST_PASSWORD`]; returns its id.
    pub async fn create_admin_with_email(&self, email: &str) -> i64 {
        let email = shared::domain::EmailAddress::parse(email).expect("valid");
        // A precomputed hash would do too; hashing keeps the test honest about the format.
        let hash = web::auth::password::hash(shared::domain::Password::parse(TEST_PASSWORD).expect("valid"))
            .await
            .expect("hashing works");
        shared::queries::admin::upsert(&self.db, &email, &hash).await.expect("admin stored")
    }

    /// Logs `client` in through the login form; returns the login answer.
    pub async fn login(&self, client: &reqwest::Client, email: &str, password: &str) -> reqwest::Response {
        let html = client
            .get(format!("{}/admin/login", self.address))
            .send()
            .await
            .expect("GET /admin/login")
            .text()
            .await
            .expect("body");
        let token = extract_attribute(&html, "name=\"csrf_token\" value=\"").expect("the login form has a token");
        client
            .post(format!("{}/admin/login", self.address))
            .form(&[("csrf_token", token.as_str()), ("email", email), ("password", password)])
            .send()
            .await
            .expect("POST /admin/login")
    }

    /// The CSRF token of the admin pages (from `<meta name="csrf-token">`).
    pub async fn admin_csrf_token(&self, client: &reqwest::Client) -> String {
        let html = client
            .get(format!("{}/admin/", self.address))
            .send()
            .await
            .expect("GET /admin/")
            .text()
            .await
            .expect("body");
        extract_attribute(&html, "<meta name=\"csrf-token\" content=\"").expect("admin pages carry a csrf-token meta")
    }

    /// `POST /admin/push/{action}` with `body` and the CSRF header.
    pub async fn post_push(
        &self,
        client: &reqwest::Client,
        action: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        let mut request = client.post(format!("{}/admin/push/{action}", self.address)).json(body);
        if let Some(token) = token {
            request = request.header("X-CSRF-Token", token);
        }
        request.send().await.expect("POST /admin/push")
    }

    /// `GET /feedback` and the CSRF token from its hidden field.
    pub async fn form_token(&self) -> String {
        let html = self
            .client
            .get(format!("{}/feedback", self.address))
            .send()
            .await
            .expect("GET /feedback")
            .text()
            .await
            .expect("body");
        extract_attribute(&html, "name=\"csrf_token\" value=\"").expect("the form has a csrf_token field")
    }

    /// Posts the feedback form (fetching a CSRF token first) with `fields`.
    pub async fn post_feedback(&self, fields: &[(&str, &str)]) -> reqwest::Response {
        let token = self.form_token().await;
        let mut form: Vec<(&str, &str)> = vec![("csrf_token", token.as_str())];
        form.extend_from_slice(fields);
        self.client.post(format!("{}/feedback", self.address)).form(&form).send().await.expect("POST /feedback")
    }

    /// The in-process worker's `/metrics` exposition (its metrics port must be on).
    pub async fn worker_metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.worker_metrics_port.expect("worker metrics on"));
        reqwest::get(url).await.expect("worker metrics").text().await.expect("text")
    }

    /// Posts valid feedback through the form.
    pub async fn submit_valid_feedback(&self, name: &str, content: &str) -> reqwest::Response {
        self.post_feedback(&[("submitter_name", name), ("submitter_email", "ann@example.com"), ("content", content)])
            .await
    }

    /// `POST /api/feedback` with a JSON body.
    pub async fn post_api_feedback(&self, body: &serde_json::Value) -> reqwest::Response {
        self.client.post(format!("{}/api/feedback", self.address)).json(body).send().await.expect("POST /api/feedback")
    }

    /// Stores `count` feedback messages with their dispatch records in one statement
    /// (PostgreSQL), as a burst of submissions leaves them while Redis is full or down.
    pub async fn insert_burst(&self, count: u64) {
        use sea_orm::ConnectionTrait;
        self.db
            .execute_unprepared(&format!(
                "INSERT INTO feedback_messages (submitter_name, submitter_email, content, created_at) \
                 SELECT 'Ann', 'ann@example.com', 'burst ' || n, now() FROM generate_series(1, {count}) AS n; \
                 INSERT INTO dispatches (feedback_id, created_at, due_at, enqueue_count) \
                 SELECT id, now() - interval '1 minute', now() - interval '1 minute', 0 FROM feedback_messages"
            ))
            .await
            .expect("burst inserted");
    }

    /// Posts `count` messages through the API, 16 at a time, each `{label} {i}`; every one
    /// must be accepted.
    pub async fn submit_burst(&self, count: usize, label: &str) {
        use futures::StreamExt;
        let statuses: Vec<u16> = futures::stream::iter(0..count)
            .map(|i| async move {
                let body = serde_json::json!({"submitter_name": "Ann", "submitter_email": "a@example.com", "content": format!("{label} {i}")});
                self.post_api_feedback(&body).await.status().as_u16()
            })
            .buffer_unordered(16)
            .collect()
            .await;
        assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    }

    /// The pushes received so far: how many, and how many different bodies among them
    /// (fewer when a message went out twice).
    pub fn pushed_bodies(&self) -> (usize, usize) {
        let received = self.push.received();
        let mut bodies: Vec<String> =
            received.iter().map(|p| p.json()["body"].as_str().unwrap_or_default().to_owned()).collect();
        bodies.sort();
        bodies.dedup();
        (received.len(), bodies.len())
    }

    /// Number of feedback rows stored.
    pub async fn feedback_count(&self) -> u64 {
        shared::queries::feedback::count(&self.db).await.expect("count")
    }
}

/// Stores a message from `name` created at `created_at` with its dispatch record, never
/// enqueued, as a submission leaves them while Redis is down (the relay enqueues it);
/// returns the message's id and the record's.
pub async fn store_unannounced<C: ConnectionTrait>(
    db: &C,
    created_at: chrono::DateTime<chrono::Utc>,
    name: &str,
) -> (i64, i64) {
    use sea_orm::ActiveModelTrait;
    use sea_orm::ActiveValue::Set;
    let message = shared::entities::feedback_message::ActiveModel {
        submitter_name: Set(name.into()),
        submitter_email: Set("v@example.com".into()),
        content: Set(format!("from {name}")),
        created_at: Set(created_at),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("stored");
    let record = shared::entities::dispatch::ActiveModel {
        feedback_id: Set(message.id),
        created_at: Set(created_at),
        due_at: Set(created_at),
        enqueue_count: Set(0),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("stored");
    (message.id, record.id)
}

/// An HTTP client with its own cookie store that does not follow redirects.
pub fn new_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("the HTTP client builds")
}

/// The password of admins made by [`TestApp::create_admin`].
pub const TEST_PASSWORD: &str = "a long test password";

/// The text after `prefix` up to the next `"`.
pub fn extract_attribute(html: &str, prefix: &str) -> Option<String> {
    let start = html.find(prefix)? + prefix.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].to_owned())
}

/// The value of the series `series` (a metric's name with its labels, as in
/// `name{label="value"}`) in a Prometheus text exposition; `None` when it is absent.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What to remove when a test ends.
struct Cleanup {
    redis_url: String,
    namespace: String,
    database: DatabaseDropper,
}

enum DatabaseDropper {
    /// Removed (with the database file) when dropped.
    Sqlite {
        _dir: tempfile::TempDir,
    },
    Postgres {
        server_url: String,
        name: String,
    },
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(self.redis_url.as_str())
            && let Ok(mut conn) = client.get_connection()
        {
            let pattern = format!("{}*", self.namespace);
            let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut conn).unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
            // apalis-redis keeps some keys under its own prefixes built from the queue name.
            let pattern = format!("*{}*", self.namespace);
            let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut conn).unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
            // ...and registers each queue in one set shared by every namespace.
            let _: redis::RedisResult<u64> = shared::queue::forget_queues_of(&self.namespace).query(&mut conn);
        }
        if let DatabaseDropper::Postgres { server_url, name } = &self.database {
            let server_url = server_url.clone();
            let name = name.clone();
            // Drop runs outside any runtime guarantee: use a short-lived one of our own.
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    rt.block_on(async {
                        if let Ok(db) = Database::connect(&server_url).await {
                            let _ = db
                                .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                                .await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

async fn create_database(backend: Backend, namespace: &str) -> anyhow::Result<(String, DatabaseDropper)> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir()?;
            let url = format!("sqlite://{}?mode=rwc", dir.path().join("tidings.sqlite").display());
            Ok((url, DatabaseDropper::Sqlite { _dir: dir }))
        }
        Backend::Postgres => {
            let server_url = postgres_server_url();
            let name = namespace.replace('-', "_");
            let admin = Database::connect(&server_url).await.context("connecting to PostgreSQL")?;
            admin.execute_unprepared(&format!("CREATE DATABASE \"{name}\"")).await?;
            let base = server_url.rsplit_once('/').map_or(server_url.as_str(), |(b, _)| b);
            Ok((format!("{base}/{name}"), DatabaseDropper::Postgres { server_url: server_url.clone(), name }))
        }
    }
}

/// The PostgreSQL server tests create databases on.
pub fn postgres_server_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn init_test_logging() {
    // The writer's thread lives as long as the test process.
    static LOGS: std::sync::OnceLock<shared::telemetry::Logs> = std::sync::OnceLock::new();
    if std::env::var("TEST_LOG").is_ok() {
        LOGS.get_or_init(shared::telemetry::init);
    }
}
