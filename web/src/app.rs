//! Builds the web application from settings and serves it.
//!
//! `main` and the tests call the same [`Application::build`]; tests bind port 0 and read
//! the chosen port back with [`Application::port`].

use std::sync::Arc;

use anyhow::Context;
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::middleware::Csrf;
use poem::web::cookie::SameSite;
use poem::{EndpointExt, Route, Server};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use shared::queue::JobRunner;
use shared::settings::Settings;

use crate::dispatch::Dispatcher;
use crate::middleware::body_limit::limit_body;
use crate::middleware::rate_limit::SubmitLimiter;
use crate::middleware::request_id::request_id;
use crate::middleware::respond::respond;
use crate::routes;
use crate::state::AppState;

/// A built, bound application, ready to serve.
pub struct Application {
    /// The bound listener.
    acceptor: TcpAcceptor,
    /// The port actually bound (differs from the setting when it was 0).
    port: u16,
    /// The application's state (tests reach the database through it).
    state: AppState,
}

impl Application {
    /// Connects to the database, binds the address and assembles the routes.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with(settings, None).await
    }

    /// As [`Application::build`]; with `runner`, jobs run in the request that asks for
    /// them instead of going to Redis (the in-process mode of tests).
    pub async fn build_with(settings: Settings, runner: Option<Arc<dyn JobRunner>>) -> anyhow::Result<Self> {
        if settings.web.secret_key.is_none() {
            anyhow::bail!("SECRET_KEY is not set: generate one (e.g. `openssl rand -hex 32`) and put it in .env");
        }
        let mut db = shared::db::connect(&settings.database_url).await?;
        let metrics = shared::metrics::Registry::new();
        // Every statement is counted: N+1 queries show up in /metrics (and in a test).
        let queries = metrics.counter("tidings_db_queries_total", "SQL statements the web sent to the database.", &[]);
        db.set_metric_callback(move |_| queries.inc());
        let mut dispatcher = Dispatcher::new(
            db.clone(),
            &settings.redis_url,
            &settings.redis_namespace,
            settings.worker.max_backlog,
            metrics.clone(),
        )
        .with_cache(&settings.cache);
        if let Some(runner) = runner {
            dispatcher = dispatcher.run_jobs_in_process(runner);
        }
        let dispatcher = Arc::new(dispatcher);
        let state = AppState {
            intake: crate::intake::Intake::start(db.clone(), &metrics),
            db,
            dispatcher,
            submit_limiter: Arc::new(SubmitLimiter::new(settings.web.submit_rate_limit)),
            metrics,
            settings: Arc::new(settings),
        };
        let acceptor = TcpListener::bind(state.settings.web.bind)
            .into_acceptor()
            .await
            .with_context(|| format!("binding {}", state.settings.web.bind))?;
        let port = acceptor
            .local_addr()
            .first()
            .and_then(|addr| addr.as_socket_addr().map(|a| a.port()))
            .context("reading the bound port")?;
        Ok(Self { acceptor, port, state })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The application state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until SIGINT or SIGTERM, then finishes in-flight requests and announces
    /// what they committed.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` resolves; then finishes in-flight requests (up to 10 s) and
    /// drains the dispatcher (up to 5 s): every submission committed is in Redis and its
    /// record marked, or left to the relay.
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()> + Send) -> anyhow::Result<()> {
        let endpoint = endpoint(&self.state);
        tracing::info!(port = self.port, "web.listening");
        let served = Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(endpoint, stop, Some(std::time::Duration::from_secs(10)))
            .await
            .context("serving");
        self.state.dispatcher.drain(std::time::Duration::from_secs(5)).await;
        tracing::info!("web.stopped");
        served
    }
}

/// The whole application as one endpoint.
pub fn endpoint(state: &AppState) -> impl poem::Endpoint + use<> {
    let settings = &state.settings;
    let secure_cookies = settings.web.secure_cookies();
    Route::new()
        .at("/", poem::endpoint::make_sync(|_| poem::web::Redirect::see_other("/feedback")))
        .nest("/feedback", routes::feedback::router())
        .nest("/api", routes::api::router(env!("CARGO_PKG_VERSION")))
        .nest("/admin", routes::admin::router(state))
        .nest("/static", routes::assets::router())
        .nest("/", routes::pwa::add_to(routes::health::router()))
        .with(
            Csrf::new()
                .cookie_name("tidings-csrf")
                .key(derive_key(settings, b"csrf"))
                .secure(secure_cookies)
                .same_site(SameSite::Strict),
        )
        .data(state.clone())
        .around(limit_body)
        .around(respond)
        .around(request_id)
}

/// A 32-byte key for `purpose`, derived from `SECRET_KEY`.
pub fn derive_key(settings: &Settings, purpose: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(purpose);
    hasher.update(b":");
    if let Some(secret) = &settings.web.secret_key {
        hasher.update(secret.expose_secret().as_bytes());
    }
    hasher.finalize().into()
}

/// Resolves on SIGINT or SIGTERM (`ctrl_c` alone misses SIGTERM, which supervisors send).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("web.shutdown_requested");
}
