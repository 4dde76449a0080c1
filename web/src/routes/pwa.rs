//! The installable, offline-tolerant site: `/manifest.webmanifest`, the site service
//! worker at `/sw.js` (scope `/`) and the `/offline` page it falls back to.

use poem::http::{StatusCode, header};
use poem::web::Data;
use poem::{IntoResponse, Response, Route, get, handler};

use crate::routes::assets;
use crate::state::AppState;
use crate::templates::{Offline, render};

/// Adds this module's routes (at the site root) to `route`.
pub fn add_to(route: Route) -> Route {
    route.at("/manifest.webmanifest", get(manifest)).at("/sw.js", get(service_worker)).at("/offline", get(offline))
}

#[handler]
fn manifest() -> Response {
    let manifest = serde_json::json!({
        "name": "Tidings",
        "short_name": "Tidings",
        "description": "Send us feedback; we read every message.",
        "start_url": "/feedback",
        "scope": "/",
        "display": "standalone",
        "theme_color": "#2456c7",
        "background_color": "#f7f8fb",
        "icons": [
            { "src": assets::url("icon-192.png"), "sizes": "192x192", "type": "image/png", "purpose": "any" },
            { "src": assets::url("icon-512.png"), "sizes": "512x512", "type": "image/png", "purpose": "any" },
        ],
    });
    manifest
        .to_string()
        .with_content_type("application/manifest+json")
        .with_header(header::CACHE_CONTROL, "no-cache")
        .into_response()
}

#[handler]
fn service_worker(state: Data<&AppState>) -> Response {
    let mut precache = vec!["/feedback".to_owned(), "/offline".to_owned()];
    precache.extend(assets::all_urls());
    let header_lines = format!(
        "const VERSION = {:?};\nconst PRECACHE = {};\nconst MAX_ENTRIES = {};\nconst OUTBOX_URL = {:?};\n",
        assets::version(),
        serde_json::to_string(&precache).unwrap_or_else(|_| "[]".into()),
        state.settings.web.sw_cache_entries.max(1),
        assets::url("outbox.js"),
    );
    format!("{header_lines}{}", include_str!("../../static/site-sw.js"))
        .with_content_type("text/javascript; charset=utf-8")
        .with_header(header::CACHE_CONTROL, "no-cache")
        .into_response()
}

#[handler]
fn offline() -> Response {
    render(StatusCode::OK, &Offline)
}
