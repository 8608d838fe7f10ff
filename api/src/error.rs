//! The API's one error type. Every error leaves as
//! `{"error": {"code": "...", "message": "..."}}` with a stable code.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response()
    }
}

impl From<engine::Error> for ApiError {
    fn from(e: engine::Error) -> ApiError {
        use engine::Error as E;
        let (status, code) = match &e {
            E::UnknownKind { .. } => (StatusCode::BAD_REQUEST, "unknown_kind"),
            E::MissingParam { .. } => (StatusCode::BAD_REQUEST, "missing_param"),
            E::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::ActionNotFound(_) => (StatusCode::NOT_FOUND, "action_not_found"),
            E::IdempotencyConflict(_) => (StatusCode::CONFLICT, "idempotency_conflict"),
            E::NotCancellable { .. } => (StatusCode::CONFLICT, "not_cancellable"),
            E::BundleNotLoaded(_) => (StatusCode::NOT_FOUND, "bundle_not_found"),
            E::Bundle(invalid) => (StatusCode::UNPROCESSABLE_ENTITY, invalid.code()),
            E::Signature(e) => match e {
                engine::signing::Error::UntrustedKey(_) | engine::signing::Error::RevokedKey(_) => {
                    (StatusCode::FORBIDDEN, e.code())
                }
                engine::signing::Error::Incomplete { .. } => (StatusCode::BAD_REQUEST, e.code()),
                _ => (StatusCode::UNPROCESSABLE_ENTITY, e.code()),
            },
            E::BundleRevoked { .. } => (StatusCode::CONFLICT, "bundle_revoked"),
            E::ClaimsMismatch { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "signature_claims_mismatch",
            ),
            E::VersionNotNewer { .. } => (StatusCode::CONFLICT, "bundle_version_not_newer"),
            E::KeyNotFound(_) => (StatusCode::NOT_FOUND, "key_not_found"),
            E::KeyRevoked(_) => (StatusCode::CONFLICT, "key_revoked"),
            E::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            E::Database(_) | E::Migrate(_) => {
                // Log the details once, here; never send SQL to clients.
                tracing::error!(error = %e, "database error while serving a request");
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is unavailable; nothing was changed, retry shortly",
                );
            }
            E::Io { .. } => {
                tracing::error!(error = %e, "I/O error while serving a request");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server log",
                );
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}
