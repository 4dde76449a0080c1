//! Static assets, embedded in the binary and served under content-hashed names
//! (`app.3f9a1c2e.css`) with `Cache-Control: public, max-age=31536000, immutable`.
//!
//! A deploy that changes a file changes its name, so no browser or proxy can keep a
//! stale copy; the unhashed name is not served at all. Pages link assets through
//! [`url`]; the service workers' version derives from [`version`], so a deploy also
//! replaces them and purges their caches.

use std::sync::LazyLock;

use poem::http::{StatusCode, header};
use poem::web::Path;
use poem::{IntoResponse, Response, Route, get, handler};
use sha2::{Digest, Sha256};

/// One embedded file.
struct Asset {
    /// The file's name in `web/static/`.
    name: &'static str,
    /// Its `Content-Type`.
    content_type: &'static str,
    /// Its bytes.
    body: &'static [u8],
    /// `stem.<hash>.ext`.
    hashed: String,
}

/// Every embedded asset, hashed once at start-up.
static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    let files: [(&str, &str, &[u8]); 6] = [
        ("app.css", "text/css; charset=utf-8", include_bytes!("../../static/app.css")),
        ("admin.js", "text/javascript; charset=utf-8", include_bytes!("../../static/admin.js")),
        ("site.js", "text/javascript; charset=utf-8", include_bytes!("../../static/site.js")),
        ("outbox.js", "text/javascript; charset=utf-8", include_bytes!("../../static/outbox.js")),
        ("icon-192.png", "image/png", include_bytes!("../../static/icon-192.png")),
        ("icon-512.png", "image/png", include_bytes!("../../static/icon-512.png")),
    ];
    files
        .into_iter()
        .map(|(name, content_type, body)| Asset { name, content_type, body, hashed: hashed_name(name, body) })
        .collect()
});

/// A version string that changes whenever any asset changes.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut hasher = Sha256::new();
    for asset in ASSETS.iter() {
        hasher.update(asset.hashed.as_bytes());
    }
    hex(&hasher.finalize()[..6])
});

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `app.css` + its bytes → `app.<first 8 hex of sha256>.css`.
fn hashed_name(name: &str, body: &[u8]) -> String {
    let hash = hex(&Sha256::digest(body)[..4]);
    match name.rsplit_once('.') {
        Some((stem, ext)) => format!("{stem}.{hash}.{ext}"),
        None => format!("{name}.{hash}"),
    }
}

/// The URL of asset `name` (e.g. `"app.css"` → `/static/app.3f9a1c2e.css`).
pub fn url(name: &str) -> String {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => format!("/static/{}", asset.hashed),
        None => {
            tracing::error!(asset = name, "assets.unknown_name");
            format!("/static/{name}")
        }
    }
}

/// The deploy's asset version (part of the service workers' cache names).
pub fn version() -> &'static str {
    &VERSION
}

/// The URLs of every asset (what the site service worker precaches).
pub fn all_urls() -> Vec<String> {
    ASSETS.iter().map(|a| format!("/static/{}", a.hashed)).collect()
}

/// The routes of this module, mounted at `/static`.
pub fn router() -> Route {
    Route::new().at("/:file", get(serve_asset))
}

#[handler]
fn serve_asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.hashed == file) {
        Some(asset) => asset
            .body
            .with_content_type(asset.content_type)
            .with_header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
            .into_response(),
        // Unknown and unhashed names alike: only the current hashed name is ever served.
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_content_hash() {
        assert_eq!(hashed_name("app.css", b"a"), "app.ca978112.css");
        assert_ne!(hashed_name("app.css", b"a"), hashed_name("app.css", b"b"));
        assert!(url("app.css").starts_with("/static/app."));
        assert_eq!(version().len(), 12);
    }
}
