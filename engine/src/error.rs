//! The engine's error type. Each variant maps to one stable API error code.

use crate::model::{ActionId, ActionStatus};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown action kind {kind:?}; known kinds: {known}")]
    UnknownKind { kind: String, known: String },
    #[error("action kind {kind:?} needs the params {}", params.join(", "))]
    MissingParam { kind: String, params: Vec<String> },
    #[error("{0}")]
    InvalidParam(String),
    /// A param outside the list the operator set for it (`allowed_in`).
    #[error("{0}")]
    ParamNotAllowed(String),
    #[error(
        "action kind {kind:?} needs the deployment variable {var:?}, which this server does not set; \
         start it with --var {var}=… (or TROUPE_VAR_{})", var.to_uppercase()
    )]
    KindNotConfigured { kind: String, var: String },
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
    #[error(
        "bundle {pinned} is not the active version of {name} ({}); pinning another version is a rollback, \
         which needs a token with the admin scope: leave `bundle` out to use the active version, or ask an admin",
        match active { Some(a) => format!("that is {a}"), None => "it has none".to_owned() }
    )]
    PinNeedsAdmin {
        name: String,
        pinned: String,
        active: Option<String>,
    },
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
    #[error(
        "bundle {bundle} provides the kind{} {} that the active bundle {other} provides; \
         a kind comes from one bundle: rename the kind, or remove it from one of them",
        if kinds.len() == 1 { "" } else { "s" }, kinds.join(", ")
    )]
    KindConflict {
        bundle: String,
        other: String,
        kinds: Vec<String>,
    },
    /// Another server changed this configuration while this one checked a
    /// change against it; checked again, it is tried again.
    #[error("{} changed on another server at the same moment; try again", .0.as_str())]
    StaleConfig(crate::store::ConfigKind),
    #[error("key {0} was revoked; a revoked key cannot be trusted again, generate a new one")]
    KeyRevoked(String),
    #[error(
        "goons are off on this server; they inject faults on purpose, so only a test deployment started with `troupe serve --goons` takes them"
    )]
    GoonsOff,
    #[error("no goon with id {0}; `troupe goons list` shows them")]
    GoonNotFound(u64),
    #[error("no key with id {0} is known")]
    KeyNotFound(String),
    #[error(
        "a token named {0:?} already exists (names stay taken after a token is revoked); choose another name"
    )]
    TokenNameTaken(String),
    #[error("no secret named {0:?} is set")]
    SecretNotFound(String),
    #[error(
        "attribute {key:?} looks like it holds a secret ({why}); a target record names secrets, it does not \
         hold them (every reader sees it, and the audit log keeps it): store the value with \
         `troupe secrets set NAME` and set the attribute to NAME"
    )]
    SecretInRecord { key: String, why: &'static str },
    #[error("target {0:?} has no record; `troupe targets set {0} KEY=VALUE` makes one")]
    TargetNotFound(String),
    #[error(
        "target {0:?}'s record would hold more than {max} attributes; unset some first",
        max = crate::targets::MAX_ATTRIBUTES
    )]
    TargetRecordFull(String),
    /// A kind reads an attribute the target's record lacks.
    #[error(
        "{used_by} needs attribute {key:?} of target {target:?}, {}; set it with \
         `troupe targets set {target} {key}=…`{}",
        if *has_record { "whose record lacks it" } else { "which has no record" },
        if let Some(p) = param { format!(" or give the param {p:?}") } else { String::new() }
    )]
    TargetAttributeMissing {
        target: String,
        key: String,
        used_by: String,
        has_record: bool,
        param: Option<String>,
    },
    #[error("no API token with id {0}")]
    TokenNotFound(String),
    #[error(
        "token {0} is the last active admin token: revoking it would leave no one able to administer \
         this server; create another admin token first (troupe tokens create --name NAME --scope admin), then revoke this one"
    )]
    LastAdminToken(String),
    #[error("no node named {0:?} has joined or asked to")]
    NodeNotFound(String),
    #[error(
        "no node waits under the name {name:?} with key {key} on this server; `troupe nodes list` shows the keys of nodes that wait, or give the node's whole public key (ed25519:…, printed by `troupe node` when it starts)"
    )]
    PendingKeyNotFound { name: String, key: String },
    #[error(
        "node {name:?} is in with another key ({fingerprint}); remove it first (`troupe nodes remove {name}`) if the host was rebuilt"
    )]
    NodeKeyConflict { name: String, fingerprint: String },
    /// The database refused a write for its content (a constraint, a value
    /// it cannot hold); trying it again cannot succeed.
    #[error("the database refused a write: {0}")]
    WriteRefused(String),
    /// The database rolled the write back (a deadlock, a lock wait timeout,
    /// a Galera certification conflict, a node not ready) every time it was
    /// tried: nothing of it was written, and it may be tried again.
    #[error(
        "the write conflicted with concurrent writes and was rolled back each time it was tried: {0}"
    )]
    WriteConflict(String),
    /// A write that may or may not have been committed: the connection
    /// was lost at `COMMIT` (`timed_out: None`; `detail` says how), or it
    /// had not finished within the submit timeout and may still commit.
    /// Repeating it is safe only where it is idempotent (a submit with the
    /// same idempotency key).
    #[error(
        "the outcome of the write is unknown: {}",
        match timed_out {
            Some(t) => format!("it had not committed after {t:?} and may still"),
            None => detail.clone(),
        }
    )]
    OutcomeUnknown {
        timed_out: Option<std::time::Duration>,
        detail: String,
    },
    #[error("the database is unavailable: {0}")]
    Database(#[from] sqlx::Error),
    /// A first connection failed; the text says why (refused, access
    /// denied, no such database).
    #[error("{0}")]
    DatabaseConnect(String),
    /// Another live server holds this server's id, or (SQLite) the
    /// database: the text says which and what to do.
    #[error("{0}")]
    ServerConflict(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(
        "the server is shutting down and takes no new work; submit again once it is back \
         (with an idempotency key, a retry is safe)"
    )]
    ShuttingDown,
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<troupe_bundle::Invalid> for Error {
    fn from(e: troupe_bundle::Invalid) -> Error {
        Error::Bundle(e.into())
    }
}
