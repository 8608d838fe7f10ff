//! Actions: submit, show (with long-polls), list, cancel; the kinds this
//! server runs; and health.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use engine::Engine;
use engine::access::Scope;
use engine::model::{ActionFilter, ActionId, ActionStatus, MayPin, NewAction};

use crate::auth::{Caller, MaybeCaller, Operate, Read, Submit};
use crate::wire::{
    ActionCounts, ActionList, ActionView, DatabaseHealth, ErrorBody, Health, KindList, KindView,
    Readiness, StepLogList, StepLogView, StoreCounters, SubmitRequest,
};
use crate::{ApiError, MAX_BODY, MAX_WAIT};

/// Submit an action.
///
/// Answers 202 with the action (200 when an earlier request with the same
/// idempotency key made it). With `wait`, answers once the action finishes
/// or the wait runs out. Needs the submit scope. Answers within the
/// server's submit timeout (10 s by default): 503 `outcome_unknown` when the
/// action may or may not have been stored, in which case submit the same
/// body with the same idempotency key again.
#[utoipa::path(
    post, path = "/v1/actions", tag = "actions",
    params(("wait" = Option<String>, Query, description = "hold the answer until the action finishes, e.g. 30s (at most 120s)")),
    request_body = SubmitRequest,
    security(("bearer" = ["submit"])),
    responses(
        (status = 202, description = "stored (and started if its target was idle)", body = ActionView),
        (status = 200, description = "an idempotent replay: the action an earlier request made", body = ActionView),
        (status = 400, description = "malformed_json, invalid_request, missing_target, unknown_kind, missing_param, invalid_param, invalid_query", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, description = "missing_scope_submit, kind_not_allowed, bundle_pin_needs_admin", body = ErrorBody),
        (status = 409, description = "idempotency_conflict, kind_not_configured", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "outcome_unknown (the action may have been stored: submit again with the same idempotency key), database_unavailable (nothing was stored), shutting_down", body = ErrorBody),
    )
)]
pub(crate) async fn submit(
    caller: Caller<Submit>,
    State(engine): State<Engine>,
    Query(q): Query<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // Checked before anything is stored, so a bad value stores nothing.
    let wait = q.get("wait").map(|w| parse_wait(w)).transpose()?;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is over {MAX_BODY} bytes"),
        )
    };
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::bad_request("unreadable_body", e.body_text())
        }
    })?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    let req: SubmitRequest = serde_json::from_slice(&body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
            }
            Category::Data if e.to_string().contains("missing field `target`") => {
                ApiError::bad_request("missing_target", "`target` is required: the server or thing the action is for")
            }
            Category::Data => ApiError::bad_request(
                "invalid_request",
                format!("{e}; expected {{\"kind\": string, \"target\": string, \"params\": object, \"idempotency_key\": string?}}"),
            ),
        }
    })?;
    if req.target.trim().is_empty() {
        return Err(ApiError::bad_request(
            "missing_target",
            "`target` must not be empty",
        ));
    }
    if !caller.principal.may_submit(&req.kind) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "kind_not_allowed",
            format!(
                "token {:?} may submit only these kinds: {}",
                caller.principal.name,
                caller
                    .principal
                    .kinds
                    .as_deref()
                    .unwrap_or_default()
                    .join(", ")
            ),
        ));
    }
    // Pinning another version than the active one is a rollback: admins only.
    let may_pin = if caller.principal.allows(Scope::Admin) {
        MayPin::Any
    } else {
        MayPin::Active
    };
    let submitted = engine
        .actions()
        .submit(
            NewAction {
                kind: req.kind,
                target: req.target,
                params: req.params,
                idempotency_key: req.idempotency_key,
                bundle: req.bundle,
                submitted_by: Some(caller.principal.name),
            },
            may_pin,
        )
        .await?;
    let location = format!("/v1/actions/{}", submitted.action.id);
    let mut action = submitted.action;
    if let Some(wait) = wait
        && !action.status.is_terminal()
    {
        action = engine.actions().wait(action.id, None, wait).await?;
    }
    let status = if submitted.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(ActionView::new(action, true)),
    )
        .into_response())
}

pub(crate) fn parse_id(raw: &str) -> Result<ActionId, ApiError> {
    raw.parse::<ActionId>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "action_not_found",
                format!("no action with id {raw:?}; ids are positive integers"),
            )
        })
}

/// Parses `30s`, `500ms`, `2m` or a bare number of seconds.
fn parse_wait(raw: &str) -> Result<Duration, ApiError> {
    let raw = raw.trim();
    let (digits, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = digits.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_query",
            format!("wait={raw:?}: use e.g. 30s, 500ms or 2m"),
        )
    })?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("wait={raw:?}: use e.g. 30s, 500ms or 2m"),
            ));
        }
    };
    Ok(d.min(MAX_WAIT))
}

/// One action with its steps; `wait` long-polls.
#[utoipa::path(
    get, path = "/v1/actions/{id}", tag = "actions",
    params(
        ("id" = i64, Path),
        ("wait" = Option<String>, Query, description = "wait until the action finishes (or, with since, changes), e.g. 30s"),
        ("since" = Option<i64>, Query, description = "with wait: answer once the revision passes this"),
    ),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, body = ActionView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn show(
    _: Caller<Read>,
    State(engine): State<Engine>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<ActionView>, ApiError> {
    let id = parse_id(&id)?;
    let action = match q.get("wait") {
        None => engine.actions().action(id).await?,
        Some(w) => {
            let since = q
                .get("since")
                .map(|s| {
                    s.parse::<i64>().map_err(|_| {
                        ApiError::bad_request("invalid_query", "since must be a revision number")
                    })
                })
                .transpose()?;
            engine.actions().wait(id, since, parse_wait(w)?).await?
        }
    };
    let failed = engine.actions().failed_attempts(id).await?;
    Ok(Json(ActionView::new(action, true).with_attempts(failed)))
}

/// What an action's steps logged, by step and attempt (a running attempt's
/// lines appear when it ends).
#[utoipa::path(
    get, path = "/v1/actions/{id}/logs", tag = "actions",
    params(("id" = i64, Path)),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, body = StepLogList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn logs(
    _: Caller<Read>,
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Json<StepLogList>, ApiError> {
    let logs = engine.actions().logs(parse_id(&id)?).await?;
    Ok(Json(StepLogList {
        logs: logs.into_iter().map(StepLogView::from).collect(),
    }))
}

/// List actions, newest first.
#[utoipa::path(
    get, path = "/v1/actions", tag = "actions",
    params(
        ("target" = Option<String>, Query), ("kind" = Option<String>, Query),
        ("status" = Option<String>, Query,
            description = "one status or several, comma-separated or repeated: failed,cancelled"),
        ("submitted_by" = Option<String>, Query, description = "the name of the token that submitted them"),
        ("since" = Option<String>, Query,
            description = "submitted at or after: a duration ago (2h, 30m, 1d) or an RFC 3339 time"),
        ("until" = Option<String>, Query,
            description = "submitted at or before: a duration ago (2h, 30m, 1d) or an RFC 3339 time"),
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 50"),
        ("before" = Option<i64>, Query, description = "only ids below this (the last page's next_before)"),
    ),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, body = ActionList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn list(
    _: Caller<Read>,
    State(engine): State<Engine>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Json<ActionList>, ApiError> {
    let filter = list_filter(&q, engine::model::now())
        .map_err(|m| ApiError::bad_request("invalid_query", m))?;
    let limit = filter.limit;
    let actions = engine.actions().list(&filter).await?;
    let next_before = (actions.len() == limit as usize)
        .then(|| actions.last().map(|a| a.id))
        .flatten();
    Ok(Json(ActionList {
        actions: actions
            .into_iter()
            .map(|a| ActionView::new(a, false))
            .collect(),
        next_before,
    }))
}

/// The filter a list's query asks for, or what is wrong with it. `status`
/// may repeat; any other parameter given twice is refused.
fn list_filter(
    q: &[(String, String)],
    now: engine::model::Timestamp,
) -> Result<ActionFilter, String> {
    const KNOWN: [&str; 8] = [
        "target",
        "status",
        "kind",
        "submitted_by",
        "since",
        "until",
        "limit",
        "before",
    ];
    let mut one: HashMap<&str, &str> = HashMap::new();
    let mut statuses = Vec::new();
    for (k, v) in q {
        if !KNOWN.contains(&k.as_str()) {
            return Err(format!(
                "unknown query parameter {k:?}; use {}",
                KNOWN.join(", ")
            ));
        }
        if k == "status" {
            for s in v.split(',').map(str::trim) {
                if s.is_empty() {
                    return Err(format!(
                        "status={v:?} names no status; use one or several of {}, comma-separated",
                        status_names()
                    ));
                }
                let s = s.parse::<ActionStatus>()?;
                if !statuses.contains(&s) {
                    statuses.push(s);
                }
            }
        } else if one.insert(k, v).is_some() {
            return Err(format!("{k} is given twice; give it once"));
        }
    }
    for k in ["target", "kind", "submitted_by"] {
        if one.get(k).is_some_and(|v| v.is_empty()) {
            return Err(format!("{k} is empty; leave it out to list every {k}"));
        }
    }
    let limit = match one.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| "limit must be 1 to 1000".to_owned())?,
    };
    let before = one
        .get("before")
        .map(|b| b.parse::<i64>())
        .transpose()
        .map_err(|_| "before must be an action id".to_owned())?;
    let since = one
        .get("since")
        .map(|t| point_in_time("since", t, now))
        .transpose()?;
    let until = one
        .get("until")
        .map(|t| point_in_time("until", t, now))
        .transpose()?;
    if let (Some(since), Some(until)) = (since, until)
        && since > until
    {
        return Err(format!(
            "since ({}) is after until ({}); no action could match",
            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ));
    }
    let owned = |k: &str| one.get(k).map(|v| v.to_string());
    Ok(ActionFilter {
        target: owned("target"),
        statuses,
        kind: owned("kind"),
        submitted_by: owned("submitted_by"),
        since,
        until,
        before,
        limit,
    })
}

fn status_names() -> String {
    ActionStatus::ALL
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `2h` (that long ago) or an RFC 3339 time, for the query parameter `name`.
fn point_in_time(
    name: &str,
    raw: &str,
    now: engine::model::Timestamp,
) -> Result<engine::model::Timestamp, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    humantime::parse_duration(raw)
        .ok()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| {
            format!(
                "{name}={raw:?} is neither a duration ago with a unit (2h, 30m, 1d) \
                 nor an RFC 3339 time (2026-01-31T08:00:00Z)"
            )
        })
}

/// Cancel an action: a queued one at once, a running one at its current step.
#[utoipa::path(
    post, path = "/v1/actions/{id}/cancel", tag = "actions",
    params(("id" = i64, Path)),
    security(("bearer" = ["operate"])),
    responses(
        (status = 202, body = ActionView),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "not_cancellable", body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn cancel(
    _: Caller<Operate>,
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<ActionView>), ApiError> {
    let action = engine.actions().cancel(parse_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, Json(ActionView::new(action, true))))
}

/// The action kinds this server runs, with their params' schemas.
#[utoipa::path(
    get, path = "/v1/kinds", tag = "actions",
    security(("bearer" = ["read"])),
    responses((status = 200, body = KindList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody))
)]
pub(crate) async fn kinds(
    _: Caller<Read>,
    State(engine): State<Engine>,
) -> Result<Json<KindList>, ApiError> {
    let kinds = engine
        .actions()
        .kinds()
        .await?
        .into_iter()
        .map(KindView::from)
        .collect();
    Ok(Json(KindList { kinds }))
}

/// Liveness, open to all; the details (database, queue, counters) only for
/// a caller with the read scope.
#[utoipa::path(
    get, path = "/v1/health", tag = "server",
    security((), ("bearer" = ["read"])),
    responses(
        (status = 200, description = "alive (with a credential: and the database answers)", body = Health),
        (status = 503, description = "the database does not answer", body = Health),
    )
)]
pub(crate) async fn health(
    MaybeCaller(caller): MaybeCaller,
    State(engine): State<Engine>,
) -> Response {
    if !caller.is_some_and(|p| p.allows(engine::access::Scope::Read)) {
        return Json(Health {
            status: "ok",
            ..Health::default()
        })
        .into_response();
    }
    use std::sync::atomic::Ordering::Relaxed;
    let db = engine.store().ping().await;
    let stats = engine.control_stats().await;
    let s = engine.store().stats();
    let body = Health {
        status: if db.is_ok() { "ok" } else { "degraded" },
        database: Some(DatabaseHealth {
            backend: engine.store().backend(),
            reachable: db.is_ok(),
            writes_through: engine.store().writes_through(),
        }),
        actions: Some(ActionCounts {
            running: stats.running,
            queued: stats.queued,
        }),
        node: Some(engine.config().server_id.clone()),
        store: Some(StoreCounters {
            transactions: s.transactions.load(Relaxed),
            rows_written: s.rows_written.load(Relaxed),
            writes: s.writes.load(Relaxed),
            commit_seconds: s.commit_micros.load(Relaxed) as f64 / 1e6,
            rolled_back: s.rolled_back.load(Relaxed),
        }),
        version: Some(env!("CARGO_PKG_VERSION")),
    };
    let status = if db.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
/// Liveness, open to all: the process serves requests. A load balancer or
/// supervisor restarts a server that stops answering this.
#[utoipa::path(
    get, path = "/v1/health/live", tag = "server",
    security(()),
    responses((status = 200, description = "the process serves requests", body = Readiness))
)]
pub(crate) async fn live() -> Json<Readiness> {
    Json(Readiness {
        status: "ok",
        code: None,
        reason: None,
    })
}

/// Readiness, open to all: whether this server should be sent work — it is
/// not shutting down and its database takes writes. A load balancer takes
/// a server that answers 503 out of rotation. Answered within 2 s; probes
/// within a second of each other share one check.
#[utoipa::path(
    get, path = "/v1/health/ready", tag = "server",
    security(()),
    responses(
        (status = 200, description = "ready for work", body = Readiness),
        (status = 503, description = "not ready, and why", body = Readiness),
    )
)]
pub(crate) async fn ready(State(state): State<crate::AppState>) -> Response {
    let verdict = state.readiness().await;
    let (status, body) = match verdict {
        Ok(()) => (
            StatusCode::OK,
            Readiness {
                status: "ready",
                code: None,
                reason: None,
            },
        ),
        Err((code, reason)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Readiness {
                status: "not_ready",
                code: Some(code),
                reason: Some(reason),
            },
        ),
    };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_parse() {
        assert_eq!(parse_wait("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wait("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_wait("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_wait("1000m").unwrap(), MAX_WAIT);
        assert!(parse_wait("soon").is_err());
    }
}
