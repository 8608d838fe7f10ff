//! troupe's REST API, v1. The only crate that knows HTTP and the wire JSON;
//! it translates requests into [`engine::Engine`] calls.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | POST | `/v1/actions` | submit an action → 202 (200 for an idempotent replay); `wait=30s` answers once it finishes |
//! | GET | `/v1/actions` | list, newest first: `target`, `status`, `kind`, `limit`, `before` |
//! | GET | `/v1/actions/{id}` | one action with its steps; `wait=30s` long-polls until it finishes, `since=REV` until it changes |
//! | POST | `/v1/actions/{id}/cancel` | cancel |
//! | GET | `/v1/kinds` | the action kinds this server runs |
//! | GET | `/v1/health` | liveness and database reachability |

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::Engine;
use engine::model::{ActionFilter, ActionId, ActionStatus, NewAction};
use serde_json::json;

mod bundles;
mod error;
pub mod wire;

pub use error::ApiError;
use wire::{ActionList, ActionView, SubmitRequest};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Bodies up to this size are read in full so the client reliably gets the
/// JSON `body_too_large` answer; beyond it the connection is cut.
const READ_LIMIT: usize = 16 << 20;
/// Longest a `wait` may hold a request open.
pub const MAX_WAIT: Duration = Duration::from_secs(120);

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    /// Required (as a bearer token) to add or revoke signing keys; `None`
    /// switches key management off.
    pub admin_token: Option<String>,
}

impl axum::extract::FromRef<AppState> for Engine {
    fn from_ref(state: &AppState) -> Engine {
        state.engine.clone()
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/actions", post(submit).get(list))
        .route("/v1/actions/{id}", get(show))
        .route("/v1/actions/{id}/cancel", post(cancel))
        .route("/v1/kinds", get(kinds))
        .route(
            "/v1/bundles",
            post(bundles::push)
                .get(bundles::list)
                .layer(DefaultBodyLimit::max(bundles::MAX_BUNDLE + (1 << 20))),
        )
        .route("/v1/bundles/{hash}", get(bundles::show))
        .route("/v1/bundles/{hash}/content", get(bundles::content))
        .route("/v1/bundles/{hash}/activate", post(bundles::activate))
        .route("/v1/keys", get(bundles::keys).post(bundles::add_key))
        .route("/v1/keys/{id}/revoke", post(bundles::revoke_key))
        .route("/v1/health", get(health))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                "no such endpoint; see /v1/health, /v1/actions, /v1/kinds",
            )
        })
        .layer(DefaultBodyLimit::max(READ_LIMIT))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves, then lets
/// requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn submit(
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
    let submitted = engine
        .submit(NewAction {
            kind: req.kind,
            target: req.target,
            params: req.params,
            idempotency_key: req.idempotency_key,
            bundle: req.bundle,
        })
        .await?;
    let location = format!("/v1/actions/{}", submitted.action.id);
    let mut action = submitted.action;
    if let Some(wait) = wait
        && !action.status.is_terminal()
    {
        action = engine.wait(action.id, None, wait).await?;
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

fn parse_id(raw: &str) -> Result<ActionId, ApiError> {
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

async fn show(
    State(engine): State<Engine>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<ActionView>, ApiError> {
    let id = parse_id(&id)?;
    let action = match q.get("wait") {
        None => engine.action(id).await?,
        Some(w) => {
            let since = q
                .get("since")
                .map(|s| {
                    s.parse::<i64>().map_err(|_| {
                        ApiError::bad_request("invalid_query", "since must be a revision number")
                    })
                })
                .transpose()?;
            engine.wait(id, since, parse_wait(w)?).await?
        }
    };
    Ok(Json(ActionView::new(action, true)))
}

async fn list(
    State(engine): State<Engine>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<ActionList>, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_query", m);
    let known = ["target", "status", "kind", "limit", "before"];
    if let Some(k) = q.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown query parameter {k:?}; use {}",
            known.join(", ")
        )));
    }
    let status = q
        .get("status")
        .map(|s| s.parse::<ActionStatus>())
        .transpose()
        .map_err(bad)?;
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| bad("limit must be 1 to 1000".into()))?,
    };
    let before = q
        .get("before")
        .map(|b| b.parse::<i64>())
        .transpose()
        .map_err(|_| bad("before must be an action id".into()))?;
    let filter = ActionFilter {
        target: q.get("target").cloned(),
        status,
        kind: q.get("kind").cloned(),
        before,
        limit,
    };
    let actions = engine.list(&filter).await?;
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

async fn cancel(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<ActionView>), ApiError> {
    let action = engine.cancel(parse_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, Json(ActionView::new(action, true))))
}

async fn kinds(State(engine): State<Engine>) -> Result<Json<serde_json::Value>, ApiError> {
    let kinds: Vec<_> = engine
        .kinds()
        .await?
        .into_iter()
        .map(|k| {
            json!({
                "name": k.name, "description": k.description, "params": k.params, "steps": k.steps,
                "bundle": k.bundle, "bundle_name": k.bundle_name, "bundle_version": k.bundle_version,
            })
        })
        .collect();
    Ok(Json(json!({ "kinds": kinds })))
}

async fn health(State(engine): State<Engine>) -> Response {
    let db = engine.store().ping().await;
    let stats = engine.control_stats().await;
    let body = json!({
        "status": if db.is_ok() { "ok" } else { "degraded" },
        "database": { "backend": engine.store().backend(), "reachable": db.is_ok() },
        "actions": { "running": stats.running, "queued": stats.queued },
        "node": engine.config().node_id,
        "store": stats_of(engine.store()),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let status = if db.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// The store's counters since start.
fn stats_of(store: &engine::store::Store) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = store.stats();
    json!({
        "transactions": s.transactions.load(Relaxed),
        "rows_written": s.rows_written.load(Relaxed),
        "writes": s.writes.load(Relaxed),
        "commit_seconds": s.commit_micros.load(Relaxed) as f64 / 1e6,
    })
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
