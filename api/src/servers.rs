//! The servers sharing the database, as each registered itself.

use axum::Json;
use axum::extract::State;

use crate::AppState;
use crate::auth::{Caller, Read};
use crate::error::ApiError;
use crate::wire::{ErrorBody, ServerList, ServerView};

/// Every server the database knows: live ones (a silent one is live but
/// has not renewed its lease), then those stopped or declared lost in the
/// last hour.
#[utoipa::path(
    get, path = "/v1/servers", tag = "server",
    security(("bearer" = ["read"])),
    responses((status = 200, body = ServerList), (status = 401, body = ErrorBody))
)]
pub(crate) async fn list(
    _: Caller<Read>,
    State(state): State<AppState>,
) -> Result<Json<ServerList>, ApiError> {
    let me = &state.engine.config().server_id;
    let servers = state
        .engine
        .store()
        .servers()
        .await?
        .iter()
        .map(|s| ServerView::from_row(s, &s.id == me))
        .collect();
    Ok(Json(ServerList { servers }))
}
