//! The admin area (being written): login, logout, inbox, push subscriptions.

use poem::Route;

use crate::state::AppState;

/// The routes of the admin area, mounted at `/admin`.
pub fn router(state: &AppState) -> poem::endpoint::BoxEndpoint<'static> {
    let _ = state;
    poem::EndpointExt::boxed(Route::new())
}
