//! The store: actions and their steps in SQLite or MySQL/MariaDB.
//!
//! Reads go straight to a pool. Writes go through one writer task that
//! commits everything waiting in a single transaction (group commit) and only
//! then answers each caller, so a state change is durable before the caller
//! moves on. Both backends run the same SQL text, expanded per backend by
//! `sql_backend!` in `sql.rs`.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{MySqlPool, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::model::{
    Action, ActionFilter, ActionId, ActionStatus, NewAction, StepStatus, Timestamp,
};

mod access;
mod sql;

/// One change to the database. A caller's list of writes commits atomically.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    Insert {
        new: NewAction,
        bundle: String,
        request_hash: String,
        owner: String,
        /// (name, step definition) for each step, in order.
        steps: Vec<(String, String)>,
        at: Timestamp,
        /// Set when Control starts the action as it is inserted (its target
        /// was idle): the action is stored `running` under `owner`'s lease
        /// until this time, with its first step started (attempt 1), which
        /// saves the separate commit that would start it.
        start: Option<Timestamp>,
        /// With `start`: the node the first step was placed on, when it
        /// requires one and one was free at submission.
        node: Option<String>,
    },
    Start {
        id: ActionId,
        owner: String,
        lease_until: Timestamp,
        at: Timestamp,
    },
    StepStarted {
        id: ActionId,
        seq: u32,
        name: String,
        attempt: u32,
        at: Timestamp,
        /// The remote node the attempt runs on; `None`: the app server.
        node: Option<String>,
    },
    StepSucceeded {
        id: ActionId,
        seq: u32,
        output: String,
        at: Timestamp,
    },
    /// An attempt failed and another will follow.
    StepAttemptFailed {
        id: ActionId,
        seq: u32,
        attempt: u32,
        started_at: Timestamp,
        /// The remote node it ran on; `None`: the app server.
        node: Option<String>,
        error: String,
        at: Timestamp,
    },
    /// No node meets what the step requires (`waiting_for`): it waits,
    /// without an attempt started.
    StepWaiting {
        id: ActionId,
        seq: u32,
        name: String,
        waiting_for: String,
    },
    /// What an attempt logged. Stored once per attempt (writing it again
    /// replaces it); never on its own, always with the attempt's outcome.
    StepLog {
        id: ActionId,
        seq: u32,
        attempt: u32,
        log: String,
        at: Timestamp,
    },
    /// The step ended without success (failed or cancelled).
    StepEnded {
        id: ActionId,
        seq: u32,
        status: StepStatus,
        error: String,
        at: Timestamp,
    },
    /// The action ended; its pending steps become `skipped`.
    Finish {
        id: ActionId,
        status: ActionStatus,
        error: Option<String>,
        at: Timestamp,
        /// The action as it is once this commits, if the writer knows it:
        /// published to waiters so they need not read it back.
        last: Option<Arc<Action>>,
    },
    /// Records that a cancel was asked for, if the action is unfinished
    /// (`Done { rows: 0 }` if it had already ended). The first request's
    /// time stays.
    RequestCancel {
        id: ActionId,
        at: Timestamp,
    },
    /// Cancels an action only if it is still queued.
    CancelQueued {
        id: ActionId,
        at: Timestamp,
    },
    /// Takes ownership of an action (used when resuming after a restart).
    Claim {
        id: ActionId,
        owner: String,
        lease_until: Timestamp,
    },
    RenewLeases {
        owner: String,
        until: Timestamp,
    },
    /// Gives up ownership of unfinished actions so they resume on next start.
    Release {
        owner: String,
        at: Timestamp,
    },
    /// Stores a verified bundle; it becomes its name's active version.
    InsertBundle(Box<BundleRow>, Arc<[u8]>),
    /// Makes a stored bundle its name's active version.
    ActivateBundle {
        hash: String,
        at: Timestamp,
    },
    TrustKey {
        key_id: String,
        public_key: String,
        at: Timestamp,
    },
    /// Revokes a key (recording it first if it came from configuration).
    RevokeKey {
        key_id: String,
        public_key: String,
        at: Timestamp,
    },
    /// Stores a new API token (its hash, never its text).
    CreateToken(Box<TokenRow>),
    /// Stores a node's row, replacing one of the same name.
    PutNode(Box<NodeRow>),
    RevokeToken {
        id: String,
        at: Timestamp,
    },
    /// Records an administrative change in `audit_log`.
    Audit(Box<AuditEntry>),
    /// Stores a secret (encrypted), replacing any of the same name.
    SetSecret(Box<SecretRow>),
    DeleteSecret {
        name: String,
    },
}

/// A row of `secrets`: the value only as ciphertext.
#[derive(Debug, Clone)]
pub struct SecretRow {
    pub name: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub updated_at: Timestamp,
    pub updated_by: String,
}

/// A row of `nodes`.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    pub public_key: String,
    pub status: crate::model::NodeStatus,
    pub created_at: Timestamp,
    pub accepted_at: Option<Timestamp>,
    pub accepted_by: Option<String>,
    /// JSON object.
    pub capabilities: Option<String>,
    pub last_seen_at: Option<Timestamp>,
    /// Set while it is drained: it gets no new steps.
    pub draining_since: Option<Timestamp>,
}

/// A row of `api_tokens`.
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    /// Comma-separated scopes.
    pub scopes: String,
    /// Comma-separated kinds, for a submit token limited to some.
    pub kinds: Option<String>,
    pub secret_hash: String,
    pub created_by: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

/// A row of `audit_log`: who changed what, when.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// Assigned by the database; 0 before the entry is stored.
    pub id: i64,
    pub at: Timestamp,
    pub actor: String,
    /// What happened, e.g. `bundle.pushed`, `key.revoked`, `token.created`.
    pub event: String,
    /// What it happened to: a bundle hash, a key id, a token id.
    pub subject: String,
    /// More about it, as JSON.
    pub detail: Option<serde_json::Value>,
}

impl AuditEntry {
    pub fn new(actor: &str, event: &str, subject: &str, detail: serde_json::Value) -> AuditEntry {
        AuditEntry {
            id: 0,
            at: crate::model::now(),
            actor: actor.to_owned(),
            event: event.to_owned(),
            subject: subject.to_owned(),
            detail: Some(detail),
        }
    }
}

/// A stored bundle's metadata (its bytes are fetched separately).
#[derive(Debug, Clone)]
pub struct BundleRow {
    pub hash: String,
    pub name: String,
    pub version: String,
    pub abi: u32,
    pub size: u64,
    pub signer: String,
    pub signature: String,
    pub created_at: Timestamp,
    pub activated_at: Timestamp,
}

/// A key recorded in `trusted_keys`.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub key_id: String,
    pub public_key: String,
    pub added_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

impl Write {
    /// Applies this write to `action` in memory exactly as its SQL changes
    /// the rows (`store::tests` holds the two to each other).
    pub(crate) fn apply_to(&self, action: &mut Action) {
        if self.action_id() != Some(action.id) {
            return;
        }
        fn step(action: &mut Action, seq: u32) -> Option<&mut crate::model::StepRecord> {
            action.steps.iter_mut().find(|s| s.seq == seq)
        }
        match self {
            Write::Start { owner, at, .. } => {
                if matches!(action.status, ActionStatus::Queued | ActionStatus::Running) {
                    action.status = ActionStatus::Running;
                    action.owner = Some(owner.clone());
                    action.started_at.get_or_insert(*at);
                    action.revision += 1;
                }
            }
            // Only for a running action, as in the SQL.
            Write::StepStarted {
                seq,
                name,
                attempt,
                at,
                node,
                ..
            } if action.status == ActionStatus::Running => {
                if let Some(s) = step(action, *seq) {
                    s.status = StepStatus::Running;
                    s.attempt = *attempt;
                    s.started_at = Some(*at);
                    s.finished_at = None;
                    s.waiting_for = None;
                    s.node = node.clone();
                }
                action.current_step = Some(name.clone());
                action.revision += 1;
            }
            Write::StepWaiting {
                seq,
                name,
                waiting_for,
                ..
            } => {
                if let Some(s) = step(action, *seq) {
                    s.status = StepStatus::Waiting;
                    s.waiting_for = Some(waiting_for.clone());
                }
                if action.status == ActionStatus::Running {
                    action.current_step = Some(name.clone());
                    action.revision += 1;
                }
            }
            Write::StepSucceeded {
                seq, output, at, ..
            } => {
                if let Some(s) = step(action, *seq) {
                    s.status = StepStatus::Succeeded;
                    s.output = Some(
                        serde_json::from_str(output)
                            .unwrap_or_else(|_| serde_json::Value::String(output.clone())),
                    );
                    s.error = None;
                    s.finished_at = Some(*at);
                }
            }
            Write::StepAttemptFailed { seq, error, .. } => {
                if let Some(s) = step(action, *seq) {
                    s.error = Some(error.clone());
                }
                action.revision += 1;
            }
            Write::StepEnded {
                seq,
                status,
                error,
                at,
                ..
            } => {
                if let Some(s) = step(action, *seq) {
                    s.status = *status;
                    s.error = Some(error.clone());
                    s.finished_at = Some(*at);
                    s.waiting_for = None;
                }
            }
            Write::Finish {
                status, error, at, ..
            } => end(action, *status, error.clone(), *at),
            Write::RequestCancel { at, .. } if !action.status.is_terminal() => {
                action.cancel_requested_at.get_or_insert(*at);
                action.revision += 1;
            }
            Write::CancelQueued { at, .. } if action.status == ActionStatus::Queued => {
                let error = Some("cancelled before it started".to_owned());
                end(action, ActionStatus::Cancelled, error, *at);
            }
            Write::Claim { owner, .. } => {
                action.owner = Some(owner.clone());
                action.revision += 1;
            }
            _ => {}
        }
    }

    /// The action an insert stores, given the id it got: the same values
    /// its SQL writes (`store::tests` holds the two to each other).
    pub(crate) fn inserted(&self, id: ActionId) -> Option<Action> {
        let Write::Insert {
            new,
            bundle,
            owner,
            steps,
            at,
            start,
            node,
            ..
        } = self
        else {
            return None;
        };
        let begun = start.is_some() && !steps.is_empty();
        Some(Action {
            id,
            kind: new.kind.clone(),
            target: new.target.clone(),
            params: new.params.clone(),
            status: if begun {
                ActionStatus::Running
            } else {
                ActionStatus::Queued
            },
            bundle: bundle.clone(),
            current_step: steps
                .first()
                .filter(|_| begun)
                .map(|(name, _)| name.clone()),
            error: None,
            idempotency_key: new.idempotency_key.clone(),
            submitted_by: new.submitted_by.clone(),
            owner: Some(owner.clone()),
            revision: i64::from(begun),
            created_at: *at,
            started_at: begun.then_some(*at),
            finished_at: None,
            cancel_requested_at: None,
            steps: steps
                .iter()
                .enumerate()
                .map(|(seq, (name, step))| {
                    let first = begun && seq == 0;
                    crate::model::StepRecord {
                        seq: seq as u32,
                        name: name.clone(),
                        step: step.clone(),
                        status: if first {
                            StepStatus::Running
                        } else {
                            StepStatus::Pending
                        },
                        attempt: u32::from(first),
                        waiting_for: None,
                        node: node.clone().filter(|_| first),
                        started_at: first.then_some(*at),
                        finished_at: None,
                        output: None,
                        error: None,
                    }
                })
                .collect(),
        })
    }

    fn action_id(&self) -> Option<ActionId> {
        match self {
            Write::Start { id, .. }
            | Write::StepStarted { id, .. }
            | Write::StepSucceeded { id, .. }
            | Write::StepAttemptFailed { id, .. }
            | Write::StepLog { id, .. }
            | Write::StepWaiting { id, .. }
            | Write::StepEnded { id, .. }
            | Write::Finish { id, .. }
            | Write::RequestCancel { id, .. }
            | Write::CancelQueued { id, .. }
            | Write::Claim { id, .. } => Some(*id),
            Write::Insert { .. }
            | Write::RenewLeases { .. }
            | Write::Release { .. }
            | Write::InsertBundle(..)
            | Write::ActivateBundle { .. }
            | Write::TrustKey { .. }
            | Write::RevokeKey { .. }
            | Write::CreateToken(..)
            | Write::PutNode(..)
            | Write::RevokeToken { .. }
            | Write::Audit(..)
            | Write::SetSecret(..)
            | Write::DeleteSecret { .. } => None,
        }
    }
}

fn end(action: &mut Action, status: ActionStatus, error: Option<String>, at: Timestamp) {
    action.status = status;
    action.error = error;
    action.finished_at = Some(at);
    action.owner = None;
    action.revision += 1;
    if status != ActionStatus::Succeeded {
        for s in action
            .steps
            .iter_mut()
            .filter(|s| matches!(s.status, StepStatus::Pending | StepStatus::Waiting))
        {
            s.status = StepStatus::Skipped;
            s.waiting_for = None;
        }
    }
}

/// What one write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done {
        rows: u64,
    },
    Inserted(ActionId),
    /// The idempotency key exists with the same request.
    Existing(ActionId),
    /// The idempotency key exists with a different request.
    Conflict,
}

impl Outcome {
    fn rows(&self) -> u64 {
        match self {
            Outcome::Done { rows } => *rows,
            Outcome::Inserted(_) => 1,
            Outcome::Existing(_) | Outcome::Conflict => 0,
        }
    }
}

/// Counters for benchmarks: how hard the store works the database.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub transactions: AtomicU64,
    pub rows_written: AtomicU64,
    /// Time spent committing (statements and the commit itself), in µs.
    pub commit_micros: AtomicU64,
    pub writes: AtomicU64,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    MySql(MySqlPool),
}

/// What the writer's database can do beyond the common SQL.
#[derive(Debug, Clone, Copy)]
struct Caps {
    /// `INSERT … RETURNING` (SQLite 3.35+, MariaDB 10.5+; not MySQL).
    returning: bool,
    /// Group commits in flight at once: one for SQLite, which has a single
    /// writer lock; more for a server, which flushes concurrent commits together.
    writers: usize,
}

struct Request {
    writes: Vec<Write>,
    reply: oneshot::Sender<Result<Vec<Outcome>, Failed>>,
}

/// Why a commit failed, as the writer saw it.
#[derive(Debug, Clone)]
struct Failed {
    message: String,
    /// It failed at `COMMIT`: it may have been committed all the same.
    unknown: bool,
    /// The database refused the write itself (a constraint, a value it
    /// cannot hold): trying again cannot help. Otherwise the failure is the
    /// connection's or the moment's (lost connection, deadlock, lock wait
    /// timeout, the server restarting) and a retry may succeed.
    permanent: bool,
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Failed {
        Failed {
            permanent: is_permanent(&e),
            unknown: false,
            message: e.to_string(),
        }
    }
}

impl From<sql::ApplyError> for Failed {
    fn from(e: sql::ApplyError) -> Failed {
        Failed {
            unknown: e.at_commit,
            ..Failed::from(e.error)
        }
    }
}

/// Whether the database refused a write for what it holds, not for the
/// state of the connection.
fn is_permanent(e: &sqlx::Error) -> bool {
    use sqlx::error::ErrorKind;
    let sqlx::Error::Database(db) = e else {
        // Lost connections, pool timeouts, I/O: worth another try.
        return false;
    };
    if matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    ) {
        return true;
    }
    match db.code().as_deref() {
        // MySQL/MariaDB: data too long, incorrect value, out of range,
        // packet too large.
        Some("1406" | "1366" | "1264" | "1153" | "22001" | "22003" | "22007") => true,
        // SQLite: string or blob too big, constraint, mismatch.
        Some("18" | "19" | "20") => true,
        _ => false,
    }
}

/// A handle to the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    read: Pool,
    writer: mpsc::Sender<Request>,
    watchers: Arc<Watchers>,
    stats: Arc<StoreStats>,
    backend: &'static str,
}

/// Group commits in flight at once on MySQL/MariaDB.
const MYSQL_WRITERS: usize = 3;

/// Prepared statements kept per connection: enough for every shape the
/// batched writes come in (see `sql.rs`), so none is re-prepared under load.
const STATEMENT_CACHE: usize = 256;

/// Largest number of writes committed in one transaction.
const MAX_BATCH: usize = 512;

impl Store {
    /// Connects, applies migrations and starts the writer.
    pub async fn connect(url: &str) -> Result<Store> {
        let (read, write, backend, caps) = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .statement_cache_capacity(STATEMENT_CACHE);
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts.clone())
                .await?;
            sqlx::migrate!("../migrations/sqlite").run(&write).await?;
            let read = SqlitePoolOptions::new()
                .max_connections(4)
                .test_before_acquire(false)
                .connect_with(opts)
                .await?;
            let caps = Caps {
                returning: true,
                writers: 1,
            };
            (Pool::Sqlite(read), Pool::Sqlite(write), "sqlite", caps)
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let opts =
                MySqlConnectOptions::from_str(&url)?.statement_cache_capacity(STATEMENT_CACHE);
            let pool = MySqlPoolOptions::new()
                .max_connections(8)
                .test_before_acquire(false)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            sqlx::migrate!("../migrations/mysql").run(&pool).await?;
            let version: String = sqlx::query_scalar("SELECT VERSION()")
                .fetch_one(&pool)
                .await?;
            let caps = Caps {
                returning: mariadb_has_returning(&version),
                writers: MYSQL_WRITERS,
            };
            (Pool::MySql(pool.clone()), Pool::MySql(pool), "mysql", caps)
        } else {
            return Err(Error::InvalidRequest(format!(
                "unsupported database URL {:?}: use sqlite://PATH or mysql://USER:PASSWORD@HOST:PORT/DATABASE",
                redact(url)
            )));
        };
        let (tx, rx) = mpsc::channel(4096);
        let watchers = Arc::new(Watchers::default());
        let stats = Arc::new(StoreStats::default());
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let commits = Arc::new(InFlight::default());
        for _ in 0..caps.writers {
            let conn = WriterConn {
                pool: write.clone(),
                conn: None,
            };
            tokio::spawn(writer(
                conn,
                caps,
                rx.clone(),
                commits.clone(),
                watchers.clone(),
                stats.clone(),
            ));
        }
        Ok(Store {
            read,
            writer: tx,
            watchers,
            stats,
            backend,
        })
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Commits `writes` atomically (possibly together with others' writes).
    pub(crate) async fn write(&self, writes: Vec<Write>) -> Result<Vec<Outcome>> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Request { writes, reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        match rx.await {
            Ok(Ok(outcomes)) => Ok(outcomes),
            Ok(Err(Failed {
                message,
                permanent: true,
                ..
            })) => Err(Error::WriteRefused(message)),
            Ok(Err(Failed { message, .. })) => Err(Error::Database(sqlx::Error::Protocol(message))),
            Err(_) => Err(Error::ShuttingDown),
        }
    }

    /// Changes to action `id`, published after each commit, and whether it
    /// is live (inserted or resumed here and not yet ended), in which case
    /// its end is certain to be published to the receiver.
    pub fn watch(&self, id: ActionId) -> (watch::Receiver<Change>, bool) {
        self.watchers.watch(id)
    }

    /// Marks resumed actions live (see [`Store::watch`]).
    pub(crate) fn hold(&self, ids: impl IntoIterator<Item = ActionId>) {
        self.watchers.hold(ids);
    }

    pub async fn action(&self, id: ActionId) -> Result<Option<Action>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::action(p, id).await?,
            Pool::MySql(p) => sql::mysql::action(p, id).await?,
        })
    }

    /// What action `id`'s steps logged, by step and attempt.
    pub async fn logs(&self, id: ActionId) -> Result<Vec<crate::model::StepLog>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::logs(p, id).await?,
            Pool::MySql(p) => sql::mysql::logs(p, id).await?,
        })
    }

    pub async fn list(&self, filter: &ActionFilter) -> Result<Vec<Action>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::list(p, filter).await?,
            Pool::MySql(p) => sql::mysql::list(p, filter).await?,
        })
    }

    /// Unfinished actions this server should run, oldest first: queued ones,
    /// and running ones it owns, nobody owns, or whose lease ran out.
    pub(crate) async fn unfinished(&self, owner: &str, now: Timestamp) -> Result<Vec<Action>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::unfinished(p, owner, now).await?,
            Pool::MySql(p) => sql::mysql::unfinished(p, owner, now).await?,
        })
    }

    pub async fn bundles(&self) -> Result<Vec<BundleRow>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::bundles(p).await?,
            Pool::MySql(p) => sql::mysql::bundles(p).await?,
        })
    }

    pub async fn bundle_content(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::bundle_content(p, hash).await?,
            Pool::MySql(p) => sql::mysql::bundle_content(p, hash).await?,
        })
    }

    /// Every node that joined or asked to, or only the one named `name`.
    pub async fn node_rows(&self, name: Option<&str>) -> Result<Vec<NodeRow>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => access::sqlite::nodes(p, name).await?,
            Pool::MySql(p) => access::mysql::nodes(p, name).await?,
        })
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => access::sqlite::tokens(p).await?,
            Pool::MySql(p) => access::mysql::tokens(p).await?,
        })
    }

    /// The named secrets that are set (as stored: encrypted).
    pub async fn secrets(&self, names: &[String]) -> Result<Vec<SecretRow>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => access::sqlite::secrets(p, names).await?,
            Pool::MySql(p) => access::mysql::secrets(p, names).await?,
        })
    }

    /// Every secret, by name (as stored: encrypted).
    pub async fn all_secrets(&self) -> Result<Vec<SecretRow>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => access::sqlite::all_secrets(p).await?,
            Pool::MySql(p) => access::mysql::all_secrets(p).await?,
        })
    }

    /// Audit entries, newest first: at most `limit`, ids below `before`.
    pub async fn audit(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => access::sqlite::audit(p, limit, before).await?,
            Pool::MySql(p) => access::mysql::audit(p, limit, before).await?,
        })
    }

    pub async fn keys(&self) -> Result<Vec<KeyRow>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::keys(p).await?,
            Pool::MySql(p) => sql::mysql::keys(p).await?,
        })
    }

    /// How many unfinished (queued or running) actions are pinned to each bundle.
    pub async fn in_flight_by_bundle(&self) -> Result<std::collections::HashMap<String, i64>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::in_flight_by_bundle(p).await?,
            Pool::MySql(p) => sql::mysql::in_flight_by_bundle(p).await?,
        })
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<()> {
        match &self.read {
            Pool::Sqlite(p) => {
                sqlx::query("SELECT 1").execute(p).await?;
            }
            Pool::MySql(p) => {
                sqlx::query("SELECT 1").execute(p).await?;
            }
        }
        Ok(())
    }
}

/// Group commits under way, shared by the writers.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    /// Notified as each commit ends.
    ended: tokio::sync::Notify,
}

/// While another commit is under way, a writer keeps gathering writes until
/// it ends or the batch reaches this many, rather than starting a small
/// commit beside it: fewer, fuller commits cost the database less per write.
const GATHER: usize = 32;

/// The group-commit loop: takes every request waiting, commits them in one
/// transaction, answers them all. If the batch fails, each request is retried
/// alone so one bad write cannot fail its neighbours.
///
/// Several writers may share one queue (see [`Caps::writers`]): while one
/// waits for its commit to be flushed, the next collects what arrived
/// meanwhile ([`next_batch`]) and starts its own transaction. A caller has at most one
/// request in flight per action, so requests that touch the same action
/// never commit out of order.
async fn writer(
    mut conn: WriterConn,
    caps: Caps,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>,
    commits: Arc<InFlight>,
    watchers: Arc<Watchers>,
    stats: Arc<StoreStats>,
) {
    let mut batch: Vec<Request> = Vec::new();
    loop {
        next_batch(&mut *rx.lock().await, &commits, &mut batch).await;
        if batch.is_empty() {
            return;
        }
        let all: Vec<&Write> = batch.iter().flat_map(|r| r.writes.iter()).collect();
        commits.count.fetch_add(1, Ordering::SeqCst);
        let applied = commit_once(&mut conn, caps, &all, &stats).await;
        commits.count.fetch_sub(1, Ordering::SeqCst);
        commits.ended.notify_waiters();
        match applied {
            Ok(mut outcomes) => {
                watchers.publish(&all, &outcomes);
                for req in batch.drain(..) {
                    let rest = outcomes.split_off(req.writes.len());
                    let _ = req.reply.send(Ok(std::mem::replace(&mut outcomes, rest)));
                }
            }
            Err(e) if batch.len() == 1 => {
                let req = batch.pop().unwrap();
                let _ = req.reply.send(Err(e));
            }
            // The batch may have been committed: applying its writes again
            // one by one could store them twice. Every caller hears of it
            // (and those that may go on retry idempotent writes).
            Err(e) if e.unknown => {
                for req in batch.drain(..) {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
            // Rolled back: one bad write must not fail its neighbours.
            Err(_) => {
                for req in batch.drain(..) {
                    let writes: Vec<&Write> = req.writes.iter().collect();
                    let result = commit_once(&mut conn, caps, &writes, &stats).await;
                    if let Ok(outcomes) = &result {
                        watchers.publish(&writes, outcomes);
                    }
                    let _ = req.reply.send(result);
                }
            }
        }
    }
}

/// One transaction for `writes`, with the failure points around it.
async fn commit_once(
    conn: &mut WriterConn,
    caps: Caps,
    writes: &[&Write],
    stats: &StoreStats,
) -> Result<Vec<Outcome>, Failed> {
    injected_refusal(writes)?;
    let outcomes = conn.apply(caps, writes, stats).await?;
    injected_after_commit(writes)?;
    Ok(outcomes)
}

/// The `store.refuse_step_success` failure point: the database refuses a
/// step's result as it would a value it cannot hold.
fn injected_refusal(writes: &[&Write]) -> Result<(), Failed> {
    if writes
        .iter()
        .any(|w| matches!(w, Write::StepSucceeded { .. }))
    {
        fail::fail_point!("store.refuse_step_success", |_| Err(Failed {
            message: "Data too long for column 'output' (injected)".into(),
            permanent: true,
            unknown: false,
        }));
    }
    Ok(())
}

/// The `store.after_insert_commit` failure point: a commit that went
/// through but whose answer was lost (see [`crate::failpoints`]).
fn injected_after_commit(writes: &[&Write]) -> Result<(), Failed> {
    if writes.iter().any(|w| matches!(w, Write::Insert { .. })) {
        fail::fail_point!("store.after_insert_commit", |_| Err(Failed {
            message: "the connection was lost during COMMIT (injected)".into(),
            permanent: false,
            unknown: true,
        }));
    }
    Ok(())
}

/// Fills `batch` with the next requests: everything waiting and, while
/// another commit is under way, what arrives until it ends or [`GATHER`]
/// writes are in. With the database idle a lone write goes at once. Leaves
/// `batch` empty when the store has closed.
async fn next_batch(
    rx: &mut mpsc::Receiver<Request>,
    commits: &InFlight,
    batch: &mut Vec<Request>,
) {
    let Some(first) = rx.recv().await else { return };
    // Test builds: `sleep(MS)` here lets concurrent writes pile up, so a
    // test can count on them sharing this batch.
    fail::fail_point!("store.before_batch");
    let mut count = first.writes.len();
    batch.push(first);
    while count < MAX_BATCH {
        let req = match rx.try_recv() {
            Ok(req) => req,
            Err(mpsc::error::TryRecvError::Disconnected) => return,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Registered before the count is read, so an ending commit
                // cannot be missed.
                let ended = commits.ended.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                if count >= GATHER || commits.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                tokio::select! {
                    req = rx.recv() => match req {
                        Some(req) => req,
                        None => return,
                    },
                    _ = &mut ended => return,
                }
            }
        };
        count += req.writes.len();
        batch.push(req);
    }
}

/// A writer's own connection, taken out of the pool: a pooled connection is
/// pinged on every release (and, by default, every acquire), which would
/// cost a round trip per commit. Dropped after any error, since the error may
/// have broken it; the next commit takes a fresh one.
struct WriterConn {
    pool: Pool,
    conn: Option<Conn>,
}

enum Conn {
    Sqlite(sqlx::SqliteConnection),
    MySql(sqlx::MySqlConnection),
}

impl WriterConn {
    async fn apply(
        &mut self,
        caps: Caps,
        writes: &[&Write],
        stats: &StoreStats,
    ) -> Result<Vec<Outcome>, Failed> {
        let began = std::time::Instant::now();
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(match &self.pool {
                Pool::Sqlite(p) => Conn::Sqlite(p.acquire().await?.detach()),
                Pool::MySql(p) => {
                    let mut conn = p.acquire().await?.detach();
                    // Concurrent group commits touch disjoint rows; without
                    // gap locks (taken under REPEATABLE READ by the range
                    // scans of batched updates) they cannot deadlock on them.
                    // With autocommit off, a group commit needs no `BEGIN`.
                    sqlx::raw_sql(
                        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; SET autocommit = 0",
                    )
                    .execute(&mut conn)
                    .await?;
                    Conn::MySql(conn)
                }
            }),
        };
        let result = match conn {
            Conn::Sqlite(c) => sql::sqlite::apply(c, writes, caps.returning, false).await,
            Conn::MySql(c) => sql::mysql::apply(c, writes, caps.returning, true).await,
        };
        let (outcomes, rows) = result.inspect_err(|_| self.conn = None)?;
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        stats
            .writes
            .fetch_add(writes.len() as u64, Ordering::Relaxed);
        stats.rows_written.fetch_add(rows, Ordering::Relaxed);
        stats
            .commit_micros
            .fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(outcomes)
    }
}

/// Whether a server's `VERSION()` is MariaDB 10.5 or later.
fn mariadb_has_returning(version: &str) -> bool {
    if !version.contains("MariaDB") {
        return false;
    }
    let mut parts = version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (10, 5)
}

/// The latest committed change of one action, as seen by its watchers.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// Counts commits that touched the action since the first watcher came.
    pub seq: u64,
    /// Whether the action reached a final status.
    pub terminal: bool,
    /// Its final state, when the write that ended it carried it.
    pub last: Option<Arc<Action>>,
}

/// Per-action watch channels, created when someone waits on an action and
/// dropped once nobody does, so a commit wakes only that action's waiters.
/// Also the set of live actions: those this server inserted or resumed and
/// has not yet seen end. A waiter that finds its action live needs not read
/// it first: its end is still to be published, under the same lock.
#[derive(Default)]
struct Watchers {
    state: std::sync::Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    channels: std::collections::HashMap<ActionId, watch::Sender<Change>>,
    live: std::collections::HashSet<ActionId>,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn watch(&self, id: ActionId) -> (watch::Receiver<Change>, bool) {
        let mut state = self.lock();
        let rx = state
            .channels
            .entry(id)
            .or_insert_with(|| watch::channel(Change::default()).0)
            .subscribe();
        (rx, state.live.contains(&id))
    }

    fn hold(&self, ids: impl IntoIterator<Item = ActionId>) {
        self.lock().live.extend(ids);
    }

    fn publish(&self, writes: &[&Write], outcomes: &[Outcome]) {
        let mut state = self.lock();
        let WatchState { channels, live } = &mut *state;
        for (w, outcome) in writes.iter().zip(outcomes) {
            let (ended, last) = match (w, outcome) {
                (Write::Insert { .. }, Outcome::Inserted(id)) => {
                    live.insert(*id);
                    continue;
                }
                (Write::Finish { last, .. }, _) => (true, last.clone()),
                (Write::CancelQueued { .. }, Outcome::Done { rows }) => (*rows > 0, None),
                _ => (false, None),
            };
            let Some(id) = w.action_id() else { continue };
            if ended {
                live.remove(&id);
            }
            if let Some(tx) = channels.get(&id) {
                tx.send_modify(|c| {
                    c.seq += 1;
                    c.terminal |= ended;
                    if last.is_some() {
                        c.last = last;
                    }
                });
            }
        }
        channels.retain(|_, tx| tx.receiver_count() > 0);
    }
}

/// A database URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;
