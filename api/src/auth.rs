//! Authentication and scopes. Every handler names the scope it needs by
//! taking a [`Caller<S>`]; the extractor reads `Authorization: Bearer …`,
//! asks the engine who the token belongs to, and answers `401` (no or bad
//! credential) or `403` (a credential without the scope) before the handler
//! runs — and before the body is read.

use std::marker::PhantomData;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use engine::access::{Principal, Refused, Scope};

use crate::{ApiError, AppState};

/// A scope a handler needs, as a type.
pub(crate) trait Need {
    const SCOPE: Scope;
}

macro_rules! needs {
    ($($name:ident => $scope:ident),*) => {$(
        pub(crate) struct $name;
        impl Need for $name {
            const SCOPE: Scope = Scope::$scope;
        }
    )*};
}
needs!(Read => Read, Submit => Submit, Operate => Operate, Admin => Admin, Join => Join);

/// The authenticated caller of a handler that needs scope `S`.
pub(crate) struct Caller<S> {
    pub(crate) principal: Principal,
    _scope: PhantomData<S>,
}

impl<S: Need> FromRequestParts<AppState> for Caller<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = authenticate(parts, state).await?.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint needs a credential: send `Authorization: Bearer TOKEN` \
                 (create a token with `troupe tokens create`; a new server writes its first \
                 admin token to DATA_DIR/admin.token)",
            )
        })?;
        if !principal.allows(S::SCOPE) {
            return Err(missing_scope(&principal, S::SCOPE));
        }
        Ok(Caller {
            principal,
            _scope: PhantomData,
        })
    }
}

/// The caller if a credential was sent; a bad one is still refused.
pub(crate) struct MaybeCaller(pub(crate) Option<Principal>);

impl FromRequestParts<AppState> for MaybeCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state).await.map(MaybeCaller)
    }
}

pub(crate) fn missing_scope(principal: &Principal, scope: Scope) -> ApiError {
    let code = match scope {
        Scope::Read => "missing_scope_read",
        Scope::Submit => "missing_scope_submit",
        Scope::Operate => "missing_scope_operate",
        Scope::Admin => "missing_scope_admin",
        Scope::Join => "missing_scope_join",
    };
    let has: Vec<&str> = principal.scopes.iter().map(|s| s.as_str()).collect();
    ApiError::new(
        StatusCode::FORBIDDEN,
        code,
        format!(
            "token {:?} has the scopes [{}]; this needs the {scope} scope",
            principal.name,
            has.join(", ")
        ),
    )
}

/// The credential in an `Authorization: Bearer …` header value.
pub(crate) fn bearer(value: &axum::http::HeaderValue) -> Option<&str> {
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// The principal behind the request's bearer token, `None` without one.
async fn authenticate(parts: &Parts, state: &AppState) -> Result<Option<Principal>, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let Some(token) = bearer(value) else {
        tracing::warn!(%peer, path = %parts.uri.path(), "refused a request: the Authorization header is not `Bearer TOKEN`");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the Authorization header must be `Bearer TOKEN`",
        ));
    };
    state.engine.authenticate(token).await.map(Some).map_err(|refused| {
        // The reason names the token's public id at most, never its text.
        tracing::warn!(%peer, path = %parts.uri.path(), reason = %refused, "refused a request with a bad credential");
        let (code, message) = match &refused {
            Refused::Revoked { id } => (
                "token_revoked",
                format!("token {id} was revoked; ask an admin for a new one"),
            ),
            Refused::Expired { id, at } => (
                "token_expired",
                format!("token {id} expired at {at}; ask an admin for a new one"),
            ),
            Refused::Malformed | Refused::Unknown { .. } | Refused::WrongSecret { .. } => (
                "unauthorized",
                "the token is not valid; check it, or create one with `troupe tokens create`"
                    .to_owned(),
            ),
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    })
}
