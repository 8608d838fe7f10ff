//! troupe's REST API, v1. The only crate that knows HTTP and the wire JSON;
//! it translates requests into [`engine::Engine`] calls.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | POST | `/v1/actions` | submit an action → 202 (200 for an idempotent replay); `wait=30s` answers once it finishes |
//! | GET | `/v1/actions` | list, newest first: `target`, `status`, `kind`, `limit`, `before` |
//! | GET | `/v1/actions/{id}` | one action with its steps; `wait=30s` long-polls until it finishes, `since=REV` until it changes |
//! | POST | `/v1/actions/{id}/cancel` | cancel |
//! | GET | `/v1/actions/{id}/logs` | what its steps logged, by step and attempt |
//! | GET | `/v1/kinds` | the action kinds this server runs |
//! | GET | `/v1/health` | liveness (open); with a credential, database and queue details |
//! | GET | `/v1/health/live`, `/v1/health/ready` | liveness; readiness: not shutting down and the database takes writes (open) |
//! | GET, POST | `/v1/bundles`, `/v1/bundles/{hash}[/content\|/activate]` | bundles (see `bundles`) |
//! | GET, POST | `/v1/keys`, `/v1/keys/{id}/revoke` | signing keys |
//! | GET, POST | `/v1/tokens`, `/v1/tokens/{id}/revoke` | API tokens (see `admin`) |
//! | GET | `/v1/audit` | the audit log |
//! | GET, PUT, DELETE | `/v1/secrets`, `/v1/secrets/{name}` | secrets for steps (values never leave) |
//! | GET, PUT, PATCH, DELETE | `/v1/targets`, `/v1/targets/{name}` | target records: attributes templates read as `{{target.KEY}}` (see `targets`) |
//! | GET, POST | `/v1/nodes`, `/v1/nodes/{name}[/accept\|remove\|drain]` | remote nodes |
//! | GET | `/v1/nodes/connect` | a node's connection (WebSocket; see `nodes`) |
//! | GET | `/v1/nodes/bundles/{hash}[/signature]` | a bundle's bytes and signature, for a node to verify |
//! | GET | `/openapi.json` | this API's OpenAPI 3.1 description (open) |
//!
//! Every endpoint but `/v1/health[/live|/ready]` and `/openapi.json` needs a bearer token
//! with a scope (`auth`): `read` for GETs, `submit` to create actions,
//! `operate` to cancel, `admin` for bundles, keys, tokens, secrets, target records' changes
//! and the audit log. Handlers are annotated with `#[utoipa::path]` and registered
//! through `utoipa_axum`, so the router and `/openapi.json` are made from
//! the same list and cannot drift apart.

use std::time::Duration;

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::get;
use engine::Engine;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod actions;
mod admin;
mod auth;
mod bundles;
mod error;
mod goons;
mod listen;
mod nodes;
mod openapi;
mod servers;
pub mod targets;
pub mod tls;
pub mod wire;
mod ws;

pub use error::{ApiError, CODES};
pub use listen::{Limits, fit_connections};

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
    /// Bundle bytes recently served to nodes, shared by every download.
    pub node_bundles: nodes::BundleCache,
    /// Node connections that have not said hello yet.
    handshakes: std::sync::Arc<tokio::sync::Semaphore>,
    /// The last readiness check and when it was made.
    readiness: std::sync::Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, Verdict)>>>,
}

type Verdict = Result<(), (&'static str, String)>;

impl AppState {
    /// Probes within [`READY_FRESH`] of each other share one check (held
    /// across it, so a burst of probes costs one database query).
    async fn readiness(&self) -> Verdict {
        let mut last = self.readiness.lock().await;
        if let Some((at, verdict)) = &*last
            && at.elapsed() < READY_FRESH
        {
            return verdict.clone();
        }
        let verdict = self.engine.readiness(READY_WITHIN).await;
        *last = Some((tokio::time::Instant::now(), verdict.clone()));
        verdict
    }
}

/// How long a readiness check stands for.
const READY_FRESH: Duration = Duration::from_secs(1);
/// How long a readiness check may wait for the database.
const READY_WITHIN: Duration = Duration::from_secs(2);

impl AppState {
    pub fn new(engine: Engine) -> AppState {
        AppState {
            engine,
            node_bundles: nodes::BundleCache::default(),
            handshakes: std::sync::Arc::new(tokio::sync::Semaphore::new(nodes::HANDSHAKES)),
            readiness: Default::default(),
        }
    }
}

impl axum::extract::FromRef<AppState> for Engine {
    fn from_ref(state: &AppState) -> Engine {
        state.engine.clone()
    }
}

/// The API's routes and their OpenAPI description, from one list.
fn routes() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    // Bundle uploads may be larger than any other body.
    let uploads = OpenApiRouter::new()
        .routes(routes!(bundles::push, bundles::list))
        .layer(DefaultBodyLimit::max(bundles::MAX_BUNDLE + (1 << 20)));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(actions::submit, actions::list))
        .routes(routes!(actions::show))
        .routes(routes!(actions::cancel))
        .routes(routes!(actions::logs))
        .routes(routes!(actions::kinds))
        .routes(routes!(actions::health))
        .routes(routes!(actions::live))
        .routes(routes!(actions::ready))
        .merge(uploads)
        .routes(routes!(bundles::show))
        .routes(routes!(bundles::content))
        .routes(routes!(bundles::activate))
        .routes(routes!(bundles::keys, bundles::add_key))
        .routes(routes!(bundles::revoke_key))
        .routes(routes!(admin::create, admin::list))
        .routes(routes!(admin::revoke))
        .routes(routes!(admin::audit))
        .routes(routes!(admin::list_secrets))
        .routes(routes!(admin::set_secret, admin::delete_secret))
        .routes(routes!(targets::list))
        .routes(routes!(
            targets::show,
            targets::replace,
            targets::patch,
            targets::delete
        ))
        .routes(routes!(goons::list, goons::add, goons::clear))
        .routes(routes!(goons::remove))
        .routes(routes!(servers::list))
        .routes(routes!(nodes::list))
        .routes(routes!(nodes::get))
        .routes(routes!(nodes::accept))
        .routes(routes!(nodes::remove))
        .routes(routes!(nodes::drain))
        .routes(routes!(nodes::connect))
        .routes(routes!(nodes::bundle))
        .routes(routes!(nodes::signature))
        .split_for_parts()
}

/// The OpenAPI description of this API, as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

pub fn router(state: AppState) -> axum::Router {
    let (router, api) = routes();
    router
        .route("/openapi.json", get(move || async move { Json(api) }))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                "no such endpoint; see /openapi.json for the ones there are",
            )
        })
        .layer(DefaultBodyLimit::max(READ_LIMIT))
        .layer(axum::middleware::map_response(private_headers))
        .with_state(state)
}

/// Headers on every answer, errors and the fallback included: browsers
/// must not guess a type other than the one sent (`nosniff`), and nothing
/// between client and server may keep a copy (`no-store`): answers carry
/// new tokens, params, outputs and bundle bytes, and none is worth caching.
async fn private_headers(mut response: axum::response::Response) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Serves the API on `listener` (over TLS with `tls`) under `limits` until
/// `shutdown` resolves, then lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    tls: Option<tls::Tls>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listen::serve(listener, router(state), tls, limits, shutdown).await
}
