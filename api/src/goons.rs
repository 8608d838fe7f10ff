//! Goons over the API: faults injected into the steps of a test deployment
//! (`troupe serve --goons`). Admin-only; `409 goons_off` elsewhere.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use crate::auth::{Admin, Caller};
use crate::wire::{ErrorBody, GoonList, GoonView, GoonsRemoved};
use crate::{ApiError, AppState};

/// The goons this server holds, and how often each acted.
#[utoipa::path(
    get, path = "/v1/goons", tag = "goons",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = GoonList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "goons_off", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    _: Caller<Admin>,
    State(state): State<AppState>,
) -> Result<Json<GoonList>, ApiError> {
    let goons = state
        .engine
        .admin()
        .goons()?
        .iter()
        .map(GoonView::from)
        .collect();
    Ok(Json(GoonList { goons }))
}

/// Arm a goon: from now on it acts on the attempts it matches, until it is
/// spent (`times`) or removed.
#[utoipa::path(
    post, path = "/v1/goons", tag = "goons",
    request_body(content = Object, description = "a goon: {\"step\": \"reboot\", \"attempt\": 1, \"kind\": \"reboot\", \"times\": 1, \"act\": {\"fail\": {\"retryable\": true, \"message\": \"busy\"}}}; act is one of fail, delay {ms}, crash, cancel, lose_node {node}, output {output}"),
    security(("bearer" = ["admin"])),
    responses(
        (status = 201, body = GoonView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, description = "goons_off", body = ErrorBody),
    )
)]
pub(crate) async fn add(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<GoonView>), ApiError> {
    let goon = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_request",
            format!(
                "not a goon ({e}); expected {{\"step\": NAME, \"act\": ACT}} with optional attempt, kind and times, \
                 ACT being \"crash\", \"cancel\", {{\"fail\": {{\"retryable\": BOOL, \"message\": TEXT}}}}, \
                 {{\"delay\": {{\"ms\": N}}}}, {{\"lose_node\": {{\"node\": NAME}}}} or {{\"output\": {{\"output\": JSON}}}}"
            ),
        )
    })?;
    let armed = state
        .engine
        .admin()
        .add_goon(goon, &caller.principal.name)
        .await?;
    Ok((StatusCode::CREATED, Json(GoonView::from(&armed))))
}

/// Remove every goon.
#[utoipa::path(
    delete, path = "/v1/goons", tag = "goons",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = GoonsRemoved), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "goons_off", body = ErrorBody),
    )
)]
pub(crate) async fn clear(
    caller: Caller<Admin>,
    State(state): State<AppState>,
) -> Result<Json<GoonsRemoved>, ApiError> {
    let removed = state
        .engine
        .admin()
        .remove_goons(None, &caller.principal.name)
        .await?;
    Ok(Json(GoonsRemoved { removed }))
}

/// Remove one goon.
#[utoipa::path(
    delete, path = "/v1/goons/{id}", tag = "goons",
    params(("id" = u64, Path)),
    security(("bearer" = ["admin"])),
    responses(
        (status = 204, description = "removed"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "goons_off", body = ErrorBody),
    )
)]
pub(crate) async fn remove(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = id.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_request",
            "a goon id is a number, as `troupe goons list` shows",
        )
    })?;
    state
        .engine
        .admin()
        .remove_goons(Some(id), &caller.principal.name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
