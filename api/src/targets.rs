//! Target records (`engine::targets`): what the operator keeps about each
//! target, read by step templates as `{{target.KEY}}`. Reading needs the
//! read scope; changing one needs admin, as an attribute can choose which
//! secret a step is given for the target. Every change is audited.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use engine::targets::{Change, TargetRecord};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Admin, Caller, Read};
use crate::wire::{ErrorBody, time};
use crate::{ApiError, AppState};

/// A target's record.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"target": "vps-123", "attributes": {"bmc": "https://10.0.0.5", "bmc_credentials": "dc1-bmc"}, "updated_at": "2026-01-02T03:04:05.000000Z", "updated_by": "ops"}))]
pub struct TargetView {
    pub target: String,
    /// Key to value: names and addresses, never secrets.
    pub attributes: BTreeMap<String, String>,
    pub updated_at: String,
    /// The token that last changed it.
    pub updated_by: String,
}

impl From<&TargetRecord> for TargetView {
    fn from(r: &TargetRecord) -> TargetView {
        TargetView {
            target: r.target.clone(),
            attributes: r.attributes.clone(),
            updated_at: time(&r.updated_at),
            updated_by: r.updated_by.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TargetList {
    pub targets: Vec<TargetView>,
    /// Pass as `after` to get the next page; null on the last page.
    pub next_after: Option<String>,
}

/// `PUT`: the record's whole content.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"attributes": {"bmc": "https://10.0.0.5", "bmc_credentials": "dc1-bmc"}}))]
pub struct ReplaceTarget {
    pub attributes: BTreeMap<String, String>,
}

/// `PATCH`: keys to add or replace and keys to remove; others are kept.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"set": {"hypervisor": "hv-17"}, "unset": ["rack"]}))]
pub struct PatchTarget {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

/// Parses a body without echoing any of it: a value in the wrong place
/// could be something that should never have been sent.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes, expected: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let (code, what) = if e.is_syntax() || e.is_eof() {
            ("malformed_json", "the body is not JSON")
        } else {
            ("invalid_request", "the body has the wrong shape")
        };
        ApiError::bad_request(
            code,
            format!(
                "{what} (line {}, column {}); expected {expected}",
                e.line(),
                e.column()
            ),
        )
    })
}

/// Replace a target's record (making it): its attributes become exactly
/// these. Values name things (an address, a secret's name), never hold a
/// secret: one that looks like it does is refused (`secret_in_record`).
#[utoipa::path(
    put, path = "/v1/targets/{name}", tag = "targets",
    params(("name" = String, Path, description = "the target, as actions name it")),
    request_body = ReplaceTarget,
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = TargetView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, description = "secret_in_record", body = ErrorBody),
    )
)]
pub(crate) async fn replace(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Json<TargetView>, ApiError> {
    let req: ReplaceTarget = body(&bytes, r#"{"attributes": {KEY: string, …}}"#)?;
    let change = Change {
        set: req.attributes,
        unset: Vec::new(),
        replace: true,
    };
    let record = state
        .engine
        .admin()
        .set_target(&name, change, &caller.principal.name)
        .await?;
    Ok(Json(TargetView::from(&record)))
}

/// Change some of a target's attributes (making its record): `set` adds or
/// replaces, `unset` removes, the rest are kept. Applied in one
/// transaction, so changes made at once through several servers all land.
#[utoipa::path(
    patch, path = "/v1/targets/{name}", tag = "targets",
    params(("name" = String, Path, description = "the target, as actions name it")),
    request_body = PatchTarget,
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = TargetView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, description = "target_record_full", body = ErrorBody),
        (status = 422, description = "secret_in_record", body = ErrorBody),
    )
)]
pub(crate) async fn patch(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Json<TargetView>, ApiError> {
    let req: PatchTarget = body(&bytes, r#"{"set": {KEY: string, …}?, "unset": [KEY, …]?}"#)?;
    let change = Change {
        set: req.set,
        unset: req.unset,
        replace: false,
    };
    let record = state
        .engine
        .admin()
        .set_target(&name, change, &caller.principal.name)
        .await?;
    Ok(Json(TargetView::from(&record)))
}

/// A target's record.
#[utoipa::path(
    get, path = "/v1/targets/{name}", tag = "targets",
    params(("name" = String, Path)),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, body = TargetView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "target_not_found", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    _: Caller<Read>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<TargetView>, ApiError> {
    let record = state.engine.admin().target(&name).await?;
    Ok(Json(TargetView::from(&record)))
}

/// Target records, by name.
#[utoipa::path(
    get, path = "/v1/targets", tag = "targets",
    params(
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 100"),
        ("after" = Option<String>, Query, description = "only targets named after this (the last page's next_after)"),
    ),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, body = TargetList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub(crate) async fn list(
    _: Caller<Read>,
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<TargetList>, ApiError> {
    let bad = |m: &str| ApiError::bad_request("invalid_query", m);
    if let Some(k) = q.keys().find(|k| !["limit", "after"].contains(&k.as_str())) {
        return Err(bad(&format!(
            "unknown query parameter {k:?}; use limit, after"
        )));
    }
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| bad("limit must be 1 to 1000"))?,
    };
    let records = state
        .engine
        .admin()
        .targets(q.get("after").map(String::as_str), limit)
        .await?;
    let next_after = (records.len() == limit as usize)
        .then(|| records.last().map(|r| r.target.clone()))
        .flatten();
    Ok(Json(TargetList {
        targets: records.iter().map(TargetView::from).collect(),
        next_after,
    }))
}

/// Delete a target's record. Its actions are not touched; steps that read
/// the record fail from now on, naming what is missing.
#[utoipa::path(
    delete, path = "/v1/targets/{name}", tag = "targets",
    params(("name" = String, Path)),
    security(("bearer" = ["admin"])),
    responses(
        (status = 204, description = "deleted"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "target_not_found", body = ErrorBody),
    )
)]
pub(crate) async fn delete(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .engine
        .admin()
        .delete_target(&name, &caller.principal.name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
