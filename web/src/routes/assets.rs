//! Static assets, embedded in the binary.

use poem::http::header;
use poem::{IntoResponse, Response, Route, get, handler};

/// The routes of this module, mounted at `/static`.
pub fn router() -> Route {
    Route::new().at("/app.css", get(app_css))
}

#[handler]
fn app_css() -> Response {
    include_str!("../../static/app.css")
        .with_content_type("text/css; charset=utf-8")
        .with_header(header::CACHE_CONTROL, "public, max-age=3600")
        .into_response()
}
