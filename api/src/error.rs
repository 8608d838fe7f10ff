//! The API's one error type. Every error leaves as
//! `{"error": {"code": "...", "message": "..."}}` with a stable code from
//! [`CODES`], the table `/openapi.json` publishes as the `ErrorCode` schema.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Every error code the API answers with, its HTTP status and when.
pub const CODES: &[(&str, u16, &str)] = &[
    ("malformed_json", 400, "the body is not JSON"),
    ("unreadable_body", 400, "the body could not be read"),
    (
        "invalid_request",
        400,
        "wrong types, unknown fields, or values out of range",
    ),
    ("missing_target", 400, "`target` missing or empty"),
    ("unknown_kind", 400, "no active bundle provides the kind"),
    (
        "missing_param",
        400,
        "the kind needs params the request lacks (all are named)",
    ),
    (
        "invalid_param",
        400,
        "an unknown param, or one that breaks the kind's schema",
    ),
    ("invalid_query", 400, "a bad query parameter"),
    (
        "bundle_incomplete",
        400,
        "fewer bytes arrived than were signed",
    ),
    (
        "unauthorized",
        401,
        "no credential, or one that is not a valid token",
    ),
    ("token_revoked", 401, "the token was revoked"),
    ("token_expired", 401, "the token has expired"),
    ("missing_scope_read", 403, "the token lacks the read scope"),
    (
        "missing_scope_submit",
        403,
        "the token lacks the submit scope",
    ),
    (
        "missing_scope_operate",
        403,
        "the token lacks the operate scope",
    ),
    (
        "missing_scope_admin",
        403,
        "the token lacks the admin scope",
    ),
    ("missing_scope_join", 403, "the token lacks the join scope"),
    (
        "kind_not_allowed",
        403,
        "a submit token limited to other kinds",
    ),
    (
        "bundle_pin_needs_admin",
        403,
        "pinning a bundle version other than the active one (a rollback) needs the admin scope",
    ),
    (
        "param_not_allowed",
        403,
        "a param outside the list the server's operator set for it (allowed_in)",
    ),
    (
        "signature_untrusted_key",
        403,
        "signed by a key the server does not trust",
    ),
    ("signature_revoked_key", 403, "signed by a revoked key"),
    ("action_not_found", 404, "no action with that id"),
    ("bundle_not_found", 404, "no bundle with that hash"),
    ("key_not_found", 404, "no key with that id"),
    ("token_not_found", 404, "no token with that id"),
    ("node_not_found", 404, "no node by that name"),
    (
        "key_required",
        400,
        "accepting a node needs the key to let in",
    ),
    (
        "not_a_websocket",
        400,
        "the node endpoint was called without a WebSocket upgrade",
    ),
    (
        "too_many_handshakes",
        503,
        "too many node connections are saying hello at once",
    ),
    (
        "pending_key_not_found",
        404,
        "no node waits under that name with that key",
    ),
    (
        "node_key_conflict",
        409,
        "the node's name is in with another key",
    ),
    ("secret_not_found", 404, "no secret with that name"),
    ("goon_not_found", 404, "no goon with that id"),
    ("target_not_found", 404, "the target has no record"),
    ("no_route", 404, "no such endpoint"),
    (
        "idempotency_conflict",
        409,
        "the idempotency key was used for a different request",
    ),
    ("not_cancellable", 409, "the action already finished"),
    (
        "goons_off",
        409,
        "goons were asked of a server not started with --goons",
    ),
    (
        "kind_not_configured",
        409,
        "the kind uses a deployment variable this server does not set",
    ),
    (
        "kind_conflict",
        409,
        "another active bundle already provides one of the bundle's kinds",
    ),
    (
        "write_conflict",
        409,
        "the change kept conflicting with concurrent writes and was rolled back each time; nothing changed, retry",
    ),
    (
        "bundle_version_not_newer",
        409,
        "a version at or below one already accepted",
    ),
    ("bundle_revoked", 409, "the bundle's signer was revoked"),
    ("key_revoked", 409, "re-trusting a revoked key"),
    ("token_name_taken", 409, "a token with that name exists"),
    (
        "last_admin_token",
        409,
        "revoking the last active admin token; create another admin token first",
    ),
    (
        "target_record_full",
        409,
        "the change would leave the target's record with more than 64 attributes",
    ),
    ("body_too_large", 413, "request body over 1 MiB"),
    ("bundle_too_large", 413, "bundle upload over 64 MiB"),
    ("bundle_not_zip", 422, "the bundle is not a zip archive"),
    ("bundle_no_manifest", 422, "the bundle has no manifest.toml"),
    ("bundle_manifest_invalid", 422, "the manifest is invalid"),
    (
        "bundle_abi_unsupported",
        422,
        "the manifest names an unsupported ABI",
    ),
    (
        "bundle_no_library_for_platform",
        422,
        "no library for this platform",
    ),
    (
        "bundle_missing_steps",
        422,
        "the library does not export a step the manifest names",
    ),
    (
        "bundle_unsafe_entry",
        422,
        "an absolute path, `..`, a link, a device or other special file, a duplicate entry, or a path that is both a file and a directory",
    ),
    (
        "bundle_entry_too_large",
        422,
        "an entry inflates past the limit",
    ),
    ("bundle_library_invalid", 422, "the library does not load"),
    (
        "bundle_over_limit",
        422,
        "over 256 kinds, 256 steps (also in one kind), 256 KiB of manifest or 1024 entries",
    ),
    (
        "key_malformed",
        422,
        "a public key that is not ed25519:<64 hex>",
    ),
    ("signature_malformed", 422, "the signature is unreadable"),
    ("signature_invalid", 422, "the signature does not verify"),
    (
        "signature_claims_mismatch",
        422,
        "the signature does not match the manifest",
    ),
    (
        "bundle_hash_mismatch",
        422,
        "the bytes do not hash to what was signed",
    ),
    (
        "secret_in_record",
        422,
        "a target attribute looks like it holds a secret (a password, a URL with one, a private key, a token); records name secrets, they never hold them",
    ),
    (
        "target_attribute_missing",
        422,
        "the kind reads an attribute of the target's record that is not set (a {{target.KEY}} template or a param defaulting from the record)",
    ),
    ("internal", 500, "an unexpected error; see the server log"),
    (
        "database_unavailable",
        503,
        "the database did not answer; nothing changed, retry",
    ),
    (
        "outcome_unknown",
        503,
        "the database connection was lost while committing, or the submit timeout passed: the change may or may not have been made (a submit may still be stored and run); submit again with the same idempotency key, which answers with the action if it exists",
    ),
    ("shutting_down", 503, "the server is stopping"),
];

/// The `ErrorCode` schema: a string, one of [`CODES`].
pub(crate) struct ErrorCode;

impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
        let description: Vec<String> = CODES
            .iter()
            .map(|(code, status, when)| format!("`{code}` ({status}): {when}"))
            .collect();
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::String))
            .enum_values(Some(CODES.iter().map(|(code, _, _)| *code)))
            .description(Some(description.join("\n")))
            .into()
    }
}

impl utoipa::ToSchema for ErrorCode {}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        debug_assert!(
            CODES
                .iter()
                .any(|(c, s, _)| *c == code && *s == status.as_u16()),
            "error code {code} ({status}) is not in the CODES table"
        );
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
        let body = crate::wire::ErrorBody {
            error: crate::wire::ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"troupe\""),
            );
        }
        response
    }
}

impl From<engine::Error> for ApiError {
    fn from(e: engine::Error) -> ApiError {
        use engine::Error as E;
        let (status, code) = match &e {
            E::UnknownKind { .. } => (StatusCode::BAD_REQUEST, "unknown_kind"),
            E::MissingParam { .. } => (StatusCode::BAD_REQUEST, "missing_param"),
            E::InvalidParam(_) => (StatusCode::BAD_REQUEST, "invalid_param"),
            E::ParamNotAllowed(_) => (StatusCode::FORBIDDEN, "param_not_allowed"),
            E::KindNotConfigured { .. } => (StatusCode::CONFLICT, "kind_not_configured"),
            E::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::ActionNotFound(_) => (StatusCode::NOT_FOUND, "action_not_found"),
            E::IdempotencyConflict(_) => (StatusCode::CONFLICT, "idempotency_conflict"),
            E::NotCancellable { .. } => (StatusCode::CONFLICT, "not_cancellable"),
            E::BundleNotLoaded(_) => (StatusCode::NOT_FOUND, "bundle_not_found"),
            E::PinNeedsAdmin { .. } => (StatusCode::FORBIDDEN, "bundle_pin_needs_admin"),
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
            E::KindConflict { .. } => (StatusCode::CONFLICT, "kind_conflict"),
            E::WriteConflict(_) | E::StaleConfig(_) => {
                tracing::warn!(error = %e, "a write kept conflicting while serving a request");
                return ApiError::new(
                    StatusCode::CONFLICT,
                    "write_conflict",
                    "the change kept conflicting with concurrent writes and was rolled back each time; nothing was changed, retry",
                );
            }
            E::KeyNotFound(_) => (StatusCode::NOT_FOUND, "key_not_found"),
            E::KeyRevoked(_) => (StatusCode::CONFLICT, "key_revoked"),
            E::TokenNameTaken(_) => (StatusCode::CONFLICT, "token_name_taken"),
            E::TokenNotFound(_) => (StatusCode::NOT_FOUND, "token_not_found"),
            E::LastAdminToken(_) => (StatusCode::CONFLICT, "last_admin_token"),
            E::NodeNotFound(_) => (StatusCode::NOT_FOUND, "node_not_found"),
            E::PendingKeyNotFound { .. } => (StatusCode::NOT_FOUND, "pending_key_not_found"),
            E::NodeKeyConflict { .. } => (StatusCode::CONFLICT, "node_key_conflict"),
            E::SecretNotFound(_) => (StatusCode::NOT_FOUND, "secret_not_found"),
            E::TargetNotFound(_) => (StatusCode::NOT_FOUND, "target_not_found"),
            E::TargetRecordFull(_) => (StatusCode::CONFLICT, "target_record_full"),
            E::SecretInRecord { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "secret_in_record"),
            E::TargetAttributeMissing { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "target_attribute_missing")
            }
            E::GoonsOff => (StatusCode::CONFLICT, "goons_off"),
            E::GoonNotFound(_) => (StatusCode::NOT_FOUND, "goon_not_found"),
            E::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            E::OutcomeUnknown { timed_out, .. } => {
                tracing::warn!(error = %e, "a write's outcome is unknown while serving a request");
                let why = match timed_out {
                    Some(t) => format!(
                        "the change was not committed within the submit timeout ({}s) and may still be",
                        t.as_secs_f64()
                    ),
                    None => "the database connection was lost while committing".to_owned(),
                };
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outcome_unknown",
                    format!(
                        "{why}: the change may or may not have been made; a submit is safe to repeat \
                         with the same idempotency key, which answers with the action if it was stored"
                    ),
                );
            }
            E::Database(_) | E::DatabaseConnect(_) | E::Migrate(_) | E::ServerConflict(_) => {
                // Log the details once, here; never send SQL to clients.
                tracing::error!(error = %e, "database error while serving a request");
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is unavailable; nothing was changed, retry shortly",
                );
            }
            E::WriteRefused(_) => {
                tracing::error!(error = %e, "the database refused a write while serving a request");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error: the database refused the change, which was not made; see the server log",
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
