//! Bundle and key endpoints: pushing signed bundles, listing and activating
//! versions, and managing the keys trusted to sign them.

use axum::Json;
use axum::body::Body;
use axum::extract::{Multipart, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use engine::Engine;

use crate::auth::{Admin, Caller, Read};
use crate::wire::{AddKey, BundleList, BundleUpload, BundleView, ErrorBody, KeyList, KeyView};
use crate::{ApiError, AppState};

/// Largest bundle upload accepted.
pub(crate) const MAX_BUNDLE: usize = 64 << 20;

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "bundle_too_large",
        format!("bundle uploads are limited to {MAX_BUNDLE} bytes"),
    )
}

/// Push a signed bundle: multipart with a `bundle` file and its `signature`.
///
/// The Source Authority checks it; accepted, it becomes its name's active
/// version. 201 for a new bundle, 200 if the server already held these bytes.
#[utoipa::path(
    post, path = "/v1/bundles", tag = "bundles",
    request_body(content = BundleUpload, content_type = "multipart/form-data"),
    security(("bearer" = ["admin"])),
    responses(
        (status = 201, body = BundleView), (status = 200, body = BundleView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "missing_scope_admin, signature_untrusted_key, signature_revoked_key", body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, description = "the archive, manifest, library or signature is unusable", body = ErrorBody),
        (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn push(
    caller: Caller<Admin>,
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
    let admitted = engine
        .admin()
        .admit_bundle(bundle.to_vec(), signature, &caller.principal.name)
        .await?;
    let hash = admitted.bundle.hash.to_string();
    let info = engine.admin().bundle(&hash).await?;
    let status = if admitted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(header::LOCATION, format!("/v1/bundles/{hash}"))],
        Json(BundleView::from(info)),
    )
        .into_response())
}

/// The bundles the server holds, oldest first.
#[utoipa::path(
    get, path = "/v1/bundles", tag = "bundles",
    security(("bearer" = ["read"])),
    responses((status = 200, body = BundleList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody))
)]
pub(crate) async fn list(
    _: Caller<Read>,
    State(engine): State<Engine>,
) -> Result<Json<BundleList>, ApiError> {
    let bundles = engine
        .admin()
        .bundles()
        .await?
        .into_iter()
        .map(BundleView::from)
        .collect();
    Ok(Json(BundleList { bundles }))
}

/// One bundle.
#[utoipa::path(
    get, path = "/v1/bundles/{hash}", tag = "bundles",
    params(("hash" = String, Path, description = "SHA-256, hex")),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, body = BundleView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn show(
    _: Caller<Read>,
    State(engine): State<Engine>,
    Path(hash): Path<String>,
) -> Result<Json<BundleView>, ApiError> {
    Ok(Json(engine.admin().bundle(&hash).await?.into()))
}

/// The signed bytes: code, so admins only.
#[utoipa::path(
    get, path = "/v1/bundles/{hash}/content", tag = "bundles",
    params(("hash" = String, Path)),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, content_type = "application/zip", body = Vec<u8>),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn content(
    _: Caller<Admin>,
    State(engine): State<Engine>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = engine.admin().bundle_content(&hash).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/zip")],
        Body::from(bytes),
    )
        .into_response())
}

/// Make a held version its name's active version again (rollback).
#[utoipa::path(
    post, path = "/v1/bundles/{hash}/activate", tag = "bundles",
    params(("hash" = String, Path)),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = BundleView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "bundle_revoked", body = ErrorBody),
    )
)]
pub(crate) async fn activate(
    caller: Caller<Admin>,
    State(engine): State<Engine>,
    Path(hash): Path<String>,
) -> Result<Json<BundleView>, ApiError> {
    let info = engine
        .admin()
        .activate_bundle(&hash, &caller.principal.name)
        .await?;
    Ok(Json(info.into()))
}

/// The keys trusted to sign bundles.
#[utoipa::path(
    get, path = "/v1/keys", tag = "bundles",
    security(("bearer" = ["read"])),
    responses((status = 200, body = KeyList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody))
)]
pub(crate) async fn keys(
    _: Caller<Read>,
    State(state): State<AppState>,
) -> Result<Json<KeyList>, ApiError> {
    let keys = state
        .engine
        .admin()
        .keys()
        .await?
        .into_iter()
        .map(KeyView::from)
        .collect();
    Ok(Json(KeyList { keys }))
}

/// Trust a public key for signing bundles.
#[utoipa::path(
    post, path = "/v1/keys", tag = "bundles",
    request_body = AddKey,
    security(("bearer" = ["admin"])),
    responses(
        (status = 201, body = KeyView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, description = "key_revoked", body = ErrorBody),
        (status = 422, description = "key_malformed", body = ErrorBody),
    )
)]
pub(crate) async fn add_key(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<KeyView>), ApiError> {
    let req: AddKey = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_request",
            format!("{e}; expected {{\"public_key\": \"ed25519:…\"}}"),
        )
    })?;
    let key = state
        .engine
        .admin()
        .trust_key(&req.public_key, &caller.principal.name)
        .await?;
    Ok((StatusCode::CREATED, Json(key.into())))
}

/// Revoke a key: its bundles take no new actions, and actions in flight
/// on them fail at their next step.
#[utoipa::path(
    post, path = "/v1/keys/{id}/revoke", tag = "bundles",
    params(("id" = String, Path, description = "key id")),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = KeyView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn revoke_key(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    let key = state
        .engine
        .admin()
        .revoke_key(&id, &caller.principal.name)
        .await?;
    Ok(Json(key.into()))
}
