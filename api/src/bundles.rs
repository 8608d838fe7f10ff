//! Bundle and key endpoints: pushing signed bundles, listing and activating
//! versions, and managing the keys trusted to sign them.

use axum::Json;
use axum::body::Body;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use engine::{BundleInfo, Engine, KeyInfo};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiError, AppState, wire};

/// Largest bundle upload accepted.
pub(crate) const MAX_BUNDLE: usize = 64 << 20;

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "bundle_too_large",
        format!("bundle uploads are limited to {MAX_BUNDLE} bytes"),
    )
}

pub(crate) fn bundle_json(b: BundleInfo) -> Value {
    json!({
        "hash": b.hash,
        "name": b.name,
        "version": b.version,
        "abi": b.abi,
        "size": b.size,
        "signer": b.signer,
        "status": b.status.as_str(),
        "in_flight": b.in_flight,
        "host_running": b.host_running,
        "kinds": b.kinds,
        "steps": b.steps,
        "created_at": wire::time(&b.created_at),
        "activated_at": wire::time(&b.activated_at),
    })
}

fn key_json(k: KeyInfo) -> Value {
    json!({
        "key_id": k.key.id().to_string(),
        "public_key": k.key.to_string(),
        "revoked": k.revoked,
        "source": if k.configured { "config" } else { "api" },
    })
}

/// `POST /v1/bundles`: multipart with a `bundle` file and its `signature`.
pub(crate) async fn push(
    State(engine): State<Engine>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::bad_request(
            "invalid_request",
            format!(
                "{}; send multipart/form-data with fields `bundle` and `signature`",
                e.body_text()
            ),
        )
    })?;
    let (mut bundle, mut signature) = (None, None);
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Err(e) => {
                return Err(ApiError::bad_request(
                    "bundle_incomplete",
                    format!(
                        "the upload was cut short or is malformed: {}",
                        e.body_text()
                    ),
                ));
            }
        };
        let name = field.name().unwrap_or_default().to_owned();
        let bytes = field.bytes().await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::bad_request(
                    "bundle_incomplete",
                    format!("the upload was cut short: {}", e.body_text()),
                )
            }
        })?;
        match name.as_str() {
            "bundle" => bundle = Some(bytes),
            "signature" => signature = Some(String::from_utf8_lossy(&bytes).into_owned()),
            other => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!("unknown field {other:?}; send `bundle` and `signature`"),
                ));
            }
        }
    }
    let bundle = bundle
        .ok_or_else(|| ApiError::bad_request("invalid_request", "the `bundle` field is missing"))?;
    let signature = signature.ok_or_else(|| {
        ApiError::bad_request(
            "invalid_request",
            "the `signature` field is missing; sign the bundle with `troupe bundle sign`",
        )
    })?;
    if bundle.len() > MAX_BUNDLE {
        return Err(too_large());
    }
    let admitted = engine.admit_bundle(bundle.to_vec(), signature).await?;
    let hash = admitted.bundle.hash.to_string();
    let info = engine.bundle(&hash).await?;
    let status = if admitted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(header::LOCATION, format!("/v1/bundles/{hash}"))],
        Json(bundle_json(info)),
    )
        .into_response())
}

pub(crate) async fn list(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    let bundles: Vec<Value> = engine
        .bundles()
        .await?
        .into_iter()
        .map(bundle_json)
        .collect();
    Ok(Json(json!({ "bundles": bundles })))
}

pub(crate) async fn show(
    State(engine): State<Engine>,
    Path(hash): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(bundle_json(engine.bundle(&hash).await?)))
}

pub(crate) async fn content(
    State(engine): State<Engine>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = engine.bundle_content(&hash).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/zip")],
        Body::from(bytes),
    )
        .into_response())
}

pub(crate) async fn activate(
    State(engine): State<Engine>,
    Path(hash): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(bundle_json(engine.activate_bundle(&hash).await?)))
}

/// Key management changes what code the server will run, so it needs the
/// admin token; without one configured it is switched off.
fn admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "key management is off: start the server with --admin-token (or TROUPE_ADMIN_TOKEN)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit so timing does not reveal the token.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the admin token as `Authorization: Bearer TOKEN`",
        ))
    }
}

pub(crate) async fn keys(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let keys: Vec<Value> = state
        .engine
        .keys()
        .await?
        .into_iter()
        .map(key_json)
        .collect();
    Ok(Json(json!({ "keys": keys })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddKey {
    public_key: String,
}

pub(crate) async fn add_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin(&state, &headers)?;
    let req: AddKey = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_request",
            format!("{e}; expected {{\"public_key\": \"ed25519:…\"}}"),
        )
    })?;
    Ok((
        StatusCode::CREATED,
        Json(key_json(state.engine.trust_key(&req.public_key).await?)),
    ))
}

pub(crate) async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &headers)?;
    Ok(Json(key_json(state.engine.revoke_key(&id).await?)))
}
