//! API tokens, secrets and the audit log: who may call the API, what steps
//! may be given, and what admins did. All admin-only.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use engine::access::{Scope, TokenSpec};

use crate::auth::{Admin, Caller};
use crate::wire::{
    AuditList, AuditView, CreateToken, ErrorBody, SecretList, SecretView, SetSecret, TokenCreated,
    TokenList, TokenView,
};
use crate::{ApiError, AppState};

/// Create an API token; the answer holds its text, shown this once.
#[utoipa::path(
    post, path = "/v1/tokens", tag = "admin",
    request_body = CreateToken,
    security(("bearer" = ["admin"])),
    responses(
        (status = 201, body = TokenCreated), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, description = "token_name_taken", body = ErrorBody),
    )
)]
pub(crate) async fn create(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let expected = r#"expected {"name": string, "scopes": ["read"|"submit"|"operate"|"admin"|"join", …], "kinds": [string]?, "expires_at": RFC 3339?, "join": {"names": string?, "capabilities": [string]?, "max_uses": number?}?}"#;
    let req: CreateToken = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_request", format!("{e}; {expected}")))?;
    let scopes = req
        .scopes
        .iter()
        .map(|s| s.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::bad_request("invalid_request", e))?;
    let expires_at = req
        .expires_at
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(&t)
                .map(|t| t.to_utc())
                .map_err(|e| {
                    ApiError::bad_request(
                        "invalid_request",
                        format!("expires_at {t:?} is not an RFC 3339 time: {e}"),
                    )
                })
        })
        .transpose()?;
    let spec = TokenSpec {
        name: req.name,
        scopes,
        kinds: req.kinds,
        expires_at,
        join: req.join.map(Into::into),
    };
    let (info, token) = state
        .engine
        .admin()
        .create_token(spec, &caller.principal.name)
        .await?;
    let created = TokenCreated {
        info: TokenView::from(&info),
        token,
    };
    Ok((StatusCode::CREATED, Json(created)))
}

/// Every API token (never their secrets).
#[utoipa::path(
    get, path = "/v1/tokens", tag = "admin",
    security(("bearer" = ["admin"])),
    responses((status = 200, body = TokenList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody))
)]
pub(crate) async fn list(
    _: Caller<Admin>,
    State(state): State<AppState>,
) -> Result<Json<TokenList>, ApiError> {
    let tokens = state
        .engine
        .admin()
        .tokens()
        .await?
        .iter()
        .map(TokenView::from)
        .collect();
    Ok(Json(TokenList { tokens }))
}

/// Revoke a token: refused from its next request. The last active admin
/// token cannot be revoked (409 `last_admin_token`): create another first.
#[utoipa::path(
    post, path = "/v1/tokens/{id}/revoke", tag = "admin",
    params(("id" = String, Path, description = "the token's id")),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = TokenView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "last_admin_token", body = ErrorBody),
    )
)]
pub(crate) async fn revoke(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let info = state
        .engine
        .admin()
        .revoke_token(&id, &caller.principal.name)
        .await?;
    Ok(Json(TokenView::from(&info)))
}

/// The audit log, newest first.
#[utoipa::path(
    get, path = "/v1/audit", tag = "admin",
    params(
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 50"),
        ("before" = Option<i64>, Query, description = "only entries with an id below this"),
    ),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = AuditList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub(crate) async fn audit(
    _: Caller<Admin>,
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<AuditList>, ApiError> {
    let bad = |m: &str| ApiError::bad_request("invalid_query", m);
    if let Some(k) = q
        .keys()
        .find(|k| !["limit", "before"].contains(&k.as_str()))
    {
        return Err(bad(&format!(
            "unknown query parameter {k:?}; use limit, before"
        )));
    }
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| bad("limit must be 1 to 1000"))?,
    };
    let before = q
        .get("before")
        .map(|b| b.parse::<i64>())
        .transpose()
        .map_err(|_| bad("before must be an audit entry id"))?;
    let entries = state.engine.admin().audit(limit, before).await?;
    let next_before = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditList {
        entries: entries.iter().map(AuditView::from).collect(),
        next_before,
    }))
}

/// Set a secret for steps (`{{secrets.NAME}}`). The value is never echoed,
/// logged or returned.
#[utoipa::path(
    put, path = "/v1/secrets/{name}", tag = "admin",
    params(("name" = String, Path, description = "letters, digits, '_' or '-'")),
    request_body = SetSecret,
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = SecretView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub(crate) async fn set_secret(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<SecretView>, ApiError> {
    // serde's message could quote the value: say only what was expected.
    let req: SetSecret = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "invalid_request",
            r#"expected {"value": string}; the value is stored encrypted and never shown again"#,
        )
    })?;
    let info = state
        .engine
        .admin()
        .set_secret(&name, &req.value, &caller.principal.name)
        .await?;
    Ok(Json(SecretView::from(&info)))
}

/// The secrets that are set: names only.
#[utoipa::path(
    get, path = "/v1/secrets", tag = "admin",
    security(("bearer" = ["admin"])),
    responses((status = 200, body = SecretList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody))
)]
pub(crate) async fn list_secrets(
    _: Caller<Admin>,
    State(state): State<AppState>,
) -> Result<Json<SecretList>, ApiError> {
    let secrets = state
        .engine
        .admin()
        .secrets()
        .await?
        .iter()
        .map(SecretView::from)
        .collect();
    Ok(Json(SecretList { secrets }))
}

/// Delete a secret.
#[utoipa::path(
    delete, path = "/v1/secrets/{name}", tag = "admin",
    params(("name" = String, Path)),
    security(("bearer" = ["admin"])),
    responses(
        (status = 204, description = "deleted"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn delete_secret(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .engine
        .admin()
        .delete_secret(&name, &caller.principal.name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
