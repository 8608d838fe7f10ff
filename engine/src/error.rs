//! The engine's error type. Each variant maps to one stable API error code.

use crate::model::{ActionId, ActionStatus};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown action kind {kind:?}; known kinds: {known}")]
    UnknownKind { kind: String, known: String },
    #[error("action kind {kind:?} needs the param {param:?}")]
    MissingParam { kind: String, param: String },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("no action with id {0}")]
    ActionNotFound(ActionId),
    #[error("idempotency key {0:?} was already used for a different request; use a new key")]
    IdempotencyConflict(String),
    #[error("action {id} is already {status} and cannot be cancelled")]
    NotCancellable { id: ActionId, status: ActionStatus },
    #[error("no bundle with hash {0} is loaded")]
    BundleNotLoaded(String),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::Invalid),
    #[error(transparent)]
    Signature(#[from] signing::Error),
    #[error("bundle {hash} was signed by key {key}, which has been revoked")]
    BundleRevoked { hash: String, key: String },
    #[error("the signature is for {signed}, but the bundle's manifest says {manifest}")]
    ClaimsMismatch { signed: String, manifest: String },
    #[error(
        "bundle {name} {version} is not newer than {newest}, which this server already accepted; bump the version, or use `troupe bundle activate HASH` to go back to a version the server holds"
    )]
    VersionNotNewer {
        name: String,
        version: String,
        newest: String,
    },
    #[error("key {0} was revoked; a revoked key cannot be trusted again, generate a new one")]
    KeyRevoked(String),
    #[error("no key with id {0} is known")]
    KeyNotFound(String),
    #[error("the database is unavailable: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("the engine is shutting down")]
    ShuttingDown,
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
