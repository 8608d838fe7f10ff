//! The store: actions and their steps in SQLite or MySQL/MariaDB.
//!
//! Reads go straight to a pool. Writes ([`Write`], in `write.rs`) go
//! through one writer task (`writer.rs`) that commits everything waiting in
//! a single transaction (group commit) and only then answers each caller,
//! so a state change is durable before the caller moves on; `watchers.rs`
//! tells those waiting on an action. Both backends run the same SQL text,
//! expanded per backend by `sql_backend!` in `sql.rs`.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{MySqlPool, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::model::{Action, ActionFilter, ActionId, Timestamp};

mod access;
mod limits;
mod nodes;
mod records;
mod servers;
mod sql;
mod watchers;
mod write;
mod writer;

pub use limits::HoldRow;
pub(crate) use limits::{Claim, Hold};
pub use nodes::NotWritable;
pub use servers::{Renewal, ServerRow, ServerSpec};
pub use watchers::Change;
use watchers::Watchers;
pub(crate) use write::{Outcome, Turn, Write};

/// Who may write an action a runner drives: its owner, at the epoch its
/// claim gave it. A fenced request's writes land only if the action is
/// still unfinished, owned by `owner` and at `epoch`, checked in the
/// transaction that makes them; otherwise each answers [`Outcome::Fenced`]
/// and nothing of it is written. Checked on MySQL/MariaDB, where several
/// servers share the database; SQLite serves one server, which holds every
/// action it runs.
#[derive(Debug, Clone)]
pub(crate) struct Fence {
    pub(crate) id: ActionId,
    pub(crate) owner: Arc<str>,
    pub(crate) epoch: i64,
}
use writer::{Caps, Failed, InFlight, Request, WriterConn, mariadb_has_returning};

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
    /// JSON list of the capability patterns its admission allowed
    /// (`engine::join`); `None`: any it reports.
    pub allowed_capabilities: Option<String>,
}

/// Why a guarded change was not written: another server changed this
/// configuration since the caller last loaded it ([`Write::Guard`]).
#[derive(Debug)]
pub(crate) struct Stale(pub(crate) ConfigKind);

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} changed on another server meanwhile",
            self.0.as_str()
        )
    }
}

impl std::error::Error for Stale {}

/// A row of `node_results`: a node's report of one call, its body and log
/// sealed (`crate::node_results`).
#[derive(Debug, Clone)]
pub struct NodeResultRow {
    pub node: String,
    pub action_id: ActionId,
    pub seq: u32,
    pub attempt: u32,
    pub status: i32,
    pub nonce: Vec<u8>,
    pub sealed: Vec<u8>,
    pub stored_at: Timestamp,
    pub stored_by: String,
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
    /// JSON [`crate::join::JoinRules`] of a join token.
    pub join_rules: Option<String>,
    /// Nodes admitted with it.
    pub uses: i64,
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

/// A kind of shared configuration that servers hold in memory: each has a
/// counter in `generations`, bumped in the commit of every change to it
/// ([`Store::record`]), which every server polls (`engine::config_watch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConfigKind {
    /// `api_tokens`: the `Tokens` cache.
    Tokens,
    /// `trusted_keys`: the Source Authority's trust.
    Keys,
    /// `bundles` and `active_bundles`: what the Agency has loaded and active.
    Bundles,
    /// `nodes`: drains and removals.
    Nodes,
}

impl ConfigKind {
    pub const ALL: [ConfigKind; 4] = [
        ConfigKind::Tokens,
        ConfigKind::Keys,
        ConfigKind::Bundles,
        ConfigKind::Nodes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConfigKind::Tokens => "tokens",
            ConfigKind::Keys => "keys",
            ConfigKind::Bundles => "bundles",
            ConfigKind::Nodes => "nodes",
        }
    }
}

/// A key recorded in `trusted_keys`.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub key_id: String,
    pub public_key: String,
    pub added_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// Counters for benchmarks: how hard the store works the database.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub transactions: AtomicU64,
    pub rows_written: AtomicU64,
    /// Time spent committing (statements and the commit itself), in µs.
    pub commit_micros: AtomicU64,
    pub writes: AtomicU64,
    /// Transactions the database rolled back for a conflict (deadlock, lock
    /// wait timeout, Galera certification) or a node not ready, or refused
    /// on a node turned read-only (a switchover), each retried.
    pub rolled_back: AtomicU64,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    MySql(MySqlPool),
}

/// A handle to the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    read: Pool,
    writer: mpsc::Sender<Request>,
    watchers: Arc<Watchers>,
    stats: Arc<StoreStats>,
    backend: &'static str,
    shared: bool,
    /// MySQL/MariaDB: the database's addresses and the one written through.
    nodes: Option<Arc<nodes::Nodes>>,
    /// The migrations this connect applied (`0003 access`), oldest first.
    migrated: Vec<String>,
}

/// Group commits in flight at once on MySQL/MariaDB.
const MYSQL_WRITERS: usize = 3;

/// Prepared statements kept per connection: enough for every shape the
/// batched writes come in (see `sql.rs`), so none is re-prepared under load.
const STATEMENT_CACHE: usize = 256;

/// Makes a SQLite database readable by its owner only (it holds params,
/// outputs and node keys): a new one is created 0600, and an existing one
/// (with its `-wal`, `-shm` and `-journal`) is tightened to 0600. SQLite
/// gives the `-wal` and `-shm` files it creates the database file's mode.
fn private_database(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |what: &str, p: &std::path::Path| Error::io(format!("{what} {}", p.display()));
    if !path.exists() {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("creating the database", path)(e)),
        }
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = std::path::PathBuf::from(name);
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(io("tightening the mode of", &file))?;
            tracing::warn!(
                file = %file.display(),
                was = format!("{mode:o}"),
                "tightened a database file to 0600: it holds params, outputs and node keys"
            );
        }
    }
    Ok(())
}

impl Store {
    /// Connects, applies migrations and starts the writer.
    pub async fn connect(url: &str) -> Result<Store> {
        let mut db_nodes = None;
        let (read, write, backend, caps, migrated) = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?;
            if !url.contains(":memory:") {
                private_database(opts.get_filename())?;
            }
            let opts = opts
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
            let mut migrator = sqlx::migrate!("../migrations/sqlite");
            newer_tolerated(&mut migrator);
            let pending = pending(&migrator, &Pool::Sqlite(write.clone())).await;
            migrator.run(&write).await?;
            let read = SqlitePoolOptions::new()
                .max_connections(4)
                .test_before_acquire(false)
                .connect_with(opts)
                .await?;
            let caps = Caps {
                returning: true,
                writers: 1,
                shared: false,
            };
            (
                Pool::Sqlite(read),
                Pool::Sqlite(write),
                "sqlite",
                caps,
                pending,
            )
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let found =
                Arc::new(nodes::Nodes::open(&nodes::split_url(&url), STATEMENT_CACHE).await?);
            let first = if found.len() > 1 {
                found.choose().await.map_err(|why| {
                    Error::DatabaseConnect(format!(
                        "none of the database's addresses takes writes now: {}",
                        why.iter()
                            .map(|(node, why)| format!("{node}: {why}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ))
                })?
            } else {
                0
            };
            let opts = found.options(first).clone();
            // One connection first: a pool would retry until its timeout and
            // then say only that it timed out, hiding the cause.
            let probe = tokio::time::timeout(
                Duration::from_secs(10),
                sqlx::ConnectOptions::connect(&opts),
            )
            .await;
            match probe {
                Ok(Ok(conn)) => {
                    let _ = sqlx::Connection::close(conn).await;
                }
                Ok(Err(e)) => return Err(connect_error(&opts, &e)),
                Err(_) => {
                    return Err(Error::DatabaseConnect(format!(
                        "no answer from the database at {} within 10 s",
                        address(&opts)
                    )));
                }
            }
            let fresh = found.clone();
            let pool = MySqlPoolOptions::new()
                .max_connections(8)
                .test_before_acquire(false)
                .acquire_timeout(Duration::from_secs(10))
                // After a move to another node, connections to the previous
                // one are closed rather than used.
                .before_acquire(move |_, meta| {
                    let stale = fresh.stale(meta.age);
                    Box::pin(async move { Ok(!stale) })
                })
                // Causal reads on Galera: a read waits until the node has
                // applied everything committed anywhere before it, so a
                // server sees a row another server just wrote through
                // another node (an action submitted there, then cancelled
                // here). Elsewhere the setting does nothing, or is unknown.
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        let _ = sqlx::raw_sql("SET SESSION wsrep_sync_wait = 1")
                            .execute(conn)
                            .await;
                        Ok(())
                    })
                })
                .connect_with(opts)
                .await?;
            if found.len() > 1 {
                found.move_to(first, &pool);
                crate::tasks::spawn(
                    crate::tasks::TaskKind::DatabaseNodes,
                    found.clone().watch(pool.clone()),
                );
            }
            db_nodes = Some(found);
            let version: String = sqlx::query_scalar("SELECT VERSION()")
                .fetch_one(&pool)
                .await?;
            supported(&version).map_err(Error::DatabaseConnect)?;
            let mut migrator = sqlx::migrate!("../migrations/mysql");
            newer_tolerated(&mut migrator);
            let pending = pending(&migrator, &Pool::MySql(pool.clone())).await;
            migrator.run(&pool).await?;
            let caps = Caps {
                returning: mariadb_has_returning(&version),
                writers: MYSQL_WRITERS,
                shared: true,
            };
            (
                Pool::MySql(pool.clone()),
                Pool::MySql(pool),
                "mysql",
                caps,
                pending,
            )
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
                nodes: db_nodes.clone(),
                generation: 0,
            };
            crate::tasks::spawn(
                crate::tasks::TaskKind::StoreWriter,
                writer::run(
                    conn,
                    caps,
                    rx.clone(),
                    commits.clone(),
                    watchers.clone(),
                    stats.clone(),
                ),
            );
        }
        Ok(Store {
            read,
            writer: tx,
            watchers,
            stats,
            backend,
            shared: caps.shared,
            nodes: db_nodes,
            migrated,
        })
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Whether several servers may share this database (MySQL/MariaDB):
    /// then it orders each target's actions, queued actions belong to
    /// nobody until claimed at their turn, and runners' writes are fenced.
    /// One server on SQLite keeps the order in memory.
    pub(crate) fn shared(&self) -> bool {
        self.shared
    }

    /// MySQL/MariaDB: `host:port` of the database node written through now
    /// (the first healthy one of the addresses `--db` lists).
    pub fn writes_through(&self) -> Option<String> {
        self.nodes.as_ref().map(|n| n.current_label().to_owned())
    }

    /// The migrations connecting applied (`0003 access`), oldest first:
    /// none when the schema was up to date.
    pub fn migrated(&self) -> &[String] {
        &self.migrated
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Commits `writes` atomically (possibly together with others' writes).
    pub(crate) async fn write(&self, writes: Vec<Write>) -> Result<Vec<Outcome>> {
        self.send(writes, None).await
    }

    /// Commits a runner's `writes` if `fence` holds; each answers
    /// [`Outcome::Fenced`] if it does not.
    pub(crate) async fn write_fenced(
        &self,
        fence: Fence,
        writes: Vec<Write>,
    ) -> Result<Vec<Outcome>> {
        self.send(writes, Some(fence)).await
    }

    async fn send(&self, writes: Vec<Write>, fence: Option<Fence>) -> Result<Vec<Outcome>> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Request {
                writes,
                fence,
                reply,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        match rx.await {
            Ok(Ok(outcomes)) => Ok(outcomes),
            Ok(Err(Failed {
                stale: Some(kind), ..
            })) => Err(Error::StaleConfig(kind)),
            Ok(Err(Failed {
                message,
                permanent: true,
                ..
            })) => Err(Error::WriteRefused(message)),
            Ok(Err(Failed {
                message,
                rolled_back: true,
                conflict: true,
                ..
            })) => Err(Error::WriteConflict(message)),
            Ok(Err(Failed {
                message,
                unknown: true,
                ..
            })) => Err(Error::OutcomeUnknown {
                timed_out: None,
                detail: message,
            }),
            Ok(Err(Failed { message, .. })) => Err(Error::Database(sqlx::Error::Protocol(message))),
            Err(_) => Err(Error::ShuttingDown),
        }
    }

    /// Commits a change to shared configuration (tokens, keys, bundles,
    /// nodes, secrets) together with the audit entry that records it: both
    /// or neither. Returns the change's outcomes (the audit entry's is
    /// dropped). A change that must be recorded only if it touched a row
    /// carries its entry inside its own write instead (`DeleteSecret`,
    /// `RevokeToken`). The same commit bumps the generation of each kind
    /// of configuration servers hold in memory that the change touches
    /// ([`ConfigKind`]), so every server reloads it.
    pub(crate) async fn record(
        &self,
        change: Vec<Write>,
        audit: AuditEntry,
    ) -> Result<Vec<Outcome>> {
        let n = change.len();
        let mut kinds: Vec<ConfigKind> = change.iter().filter_map(Write::config_kind).collect();
        kinds.sort();
        kinds.dedup();
        let mut writes = change;
        writes.extend(kinds.into_iter().map(Write::Bump));
        writes.push(Write::Audit(Box::new(audit)));
        let mut outcomes = self.write(writes).await?;
        outcomes.truncate(n);
        Ok(outcomes)
    }

    /// [`Store::record`], made only if `guard`'s configuration is still at
    /// the generation the caller loaded (`(kind, seen)`): else nothing is
    /// written and the answer is [`Error::StaleConfig`].
    pub(crate) async fn record_guarded(
        &self,
        change: Vec<Write>,
        audit: AuditEntry,
        (kind, seen): (ConfigKind, i64),
    ) -> Result<Vec<Outcome>> {
        let n = change.len();
        let mut kinds: Vec<ConfigKind> = change
            .iter()
            .filter_map(Write::config_kind)
            .filter(|k| *k != kind)
            .collect();
        kinds.sort();
        kinds.dedup();
        let mut writes = vec![Write::Guard { kind, seen }];
        writes.extend(change);
        writes.extend(kinds.into_iter().map(Write::Bump));
        writes.push(Write::Audit(Box::new(audit)));
        let mut outcomes = self.write(writes).await?;
        outcomes.remove(0);
        outcomes.truncate(n);
        Ok(outcomes)
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

    /// The failed attempts of action `id`'s steps, by step and attempt.
    pub async fn failed_attempts(&self, id: ActionId) -> Result<Vec<crate::model::FailedAttempt>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::failed_attempts(p, id).await?,
            Pool::MySql(p) => sql::mysql::failed_attempts(p, id).await?,
        })
    }

    pub async fn list(&self, filter: &ActionFilter) -> Result<Vec<Action>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::list(p, filter).await?,
            Pool::MySql(p) => sql::mysql::list(p, filter).await?,
        })
    }

    /// Unfinished actions owned by nobody, or by `mine` (this server's
    /// earlier self), oldest first, at most `limit`. Where several servers
    /// share the database, running ones only: queued ones are claimed at
    /// their turn ([`Store::heads`]).
    pub(crate) async fn unfinished(&self, mine: Option<&str>, limit: usize) -> Result<Vec<Action>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        let running_only = self.shared;
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::unfinished(p, mine, limit, running_only).await?,
            Pool::MySql(p) => sql::mysql::unfinished(p, mine, limit, running_only).await?,
        })
    }

    /// Which of `targets` have a queued action.
    pub(crate) async fn queued_targets(&self, targets: &[String]) -> Result<Vec<String>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::queued_targets(p, targets).await?,
            Pool::MySql(p) => sql::mysql::queued_targets(p, targets).await?,
        })
    }

    /// Queued actions whose turn has come (their target's head, none of its
    /// actions running), owned by nobody; of `targets` only, if given;
    /// oldest first, at most `limit`. Where several servers share the
    /// database (on SQLite every queued action is its one server's).
    pub(crate) async fn heads(
        &self,
        targets: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<Action>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        Ok(match &self.read {
            Pool::Sqlite(p) => sql::sqlite::heads(p, targets, limit).await?,
            Pool::MySql(p) => sql::mysql::heads(p, targets, limit).await?,
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

    /// The result `node` reported for attempt `attempt` of step `seq` of
    /// action `id`, if a server stored it.
    pub(crate) async fn node_result(
        &self,
        node: &str,
        (id, seq, attempt): (ActionId, u32, u32),
    ) -> Result<Option<NodeResultRow>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => access::sqlite::node_result(p, node, id, seq, attempt).await?,
            Pool::MySql(p) => access::mysql::node_result(p, node, id, seq, attempt).await?,
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

    /// `target`'s record, if it has one.
    pub async fn target_record(
        &self,
        target: &str,
    ) -> Result<Option<crate::targets::TargetRecord>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => records::sqlite::one(p, target).await?,
            Pool::MySql(p) => records::mysql::one(p, target).await?,
        })
    }

    /// Target records by name: at most `limit`, names after `after`.
    pub async fn target_records(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<crate::targets::TargetRecord>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => records::sqlite::page(p, after, limit).await?,
            Pool::MySql(p) => records::mysql::page(p, after, limit).await?,
        })
    }

    /// Audit entries, newest first: at most `limit`, ids below `before`.
    pub async fn audit(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => access::sqlite::audit(p, limit, before).await?,
            Pool::MySql(p) => access::mysql::audit(p, limit, before).await?,
        })
    }

    /// The generation of each kind of shared configuration.
    pub async fn generations(&self) -> Result<Vec<(ConfigKind, i64)>> {
        let rows = match &self.read {
            Pool::Sqlite(p) => access::sqlite::generations(p).await?,
            Pool::MySql(p) => access::mysql::generations(p).await?,
        };
        Ok(rows
            .into_iter()
            .filter_map(|(kind, g)| {
                ConfigKind::ALL
                    .into_iter()
                    .find(|k| k.as_str() == kind)
                    .map(|k| (k, g))
            })
            .collect())
    }

    /// One kind of configuration's generation as stored now.
    pub(crate) async fn generation(&self, kind: ConfigKind) -> Result<i64> {
        Ok(self
            .generations()
            .await?
            .into_iter()
            .find_map(|(k, g)| (k == kind).then_some(g))
            .unwrap_or_default())
    }

    /// The active version of each bundle name: name → hash.
    pub async fn active_bundles(&self) -> Result<std::collections::HashMap<String, String>> {
        Ok(match &self.read {
            Pool::Sqlite(p) => access::sqlite::active_bundles(p).await?,
            Pool::MySql(p) => access::mysql::active_bundles(p).await?,
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

    /// Whether the database takes writes now: it answers and, on
    /// MySQL/MariaDB, the node written through is not read-only (a replica,
    /// or a primary a switchover demoted) and, on Galera, is a working
    /// member of its cluster (ready, in the Primary component, Synced).
    pub async fn takes_writes(&self) -> std::result::Result<(), NotWritable> {
        match &self.read {
            Pool::Sqlite(p) => {
                sqlx::query("SELECT 1")
                    .execute(p)
                    .await
                    .map_err(|e| NotWritable::Gone(e.to_string()))?;
                Ok(())
            }
            Pool::MySql(_) => match &self.nodes {
                Some(nodes) => nodes.look_current().await,
                None => Ok(()),
            },
        }
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

/// A database URL with any password replaced, for messages and logs.
/// The migrations of `migrator` the database has not applied yet, as
/// `0003 access`.
/// Refuses a MySQL or MariaDB older than the oldest releases still
/// maintained (MariaDB 10.6, MySQL 8.0), before anything is written: what
/// troupe's claims and fences need (conditional `UPDATE`s, row
/// constructors, READ COMMITTED) is older, but nothing older is tested, and
/// several servers on an unmaintained database is a guarantee on trust.
/// `version` is what `SELECT VERSION()` says (`10.11.6-MariaDB-0+deb12u1`,
/// `8.0.36`).
fn supported(version: &str) -> std::result::Result<(), String> {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
        return Err(format!("cannot read the database's version {version:?}"));
    };
    let (name, oldest) = if version.contains("MariaDB") {
        ("MariaDB", (10, 6))
    } else {
        ("MySQL", (8, 0))
    };
    if (major, minor) < oldest {
        return Err(format!(
            "{name} {major}.{minor} is too old: troupe needs MariaDB 10.6 or later, or MySQL 8.0 or \
             later (the oldest releases still maintained); upgrade the database server"
        ));
    }
    Ok(())
}

/// Lets a database that a newer troupe migrated further serve this one.
/// Migrations are expand-only (new tables, nullable or defaulted columns,
/// indexes; a change that removes or narrows something waits for a later
/// release, once no server of the version that needs it runs), so during a
/// rolling upgrade an older server keeps running, and may restart, on the
/// expanded schema. [`pending`] names what it does not know.
fn newer_tolerated(migrator: &mut sqlx::migrate::Migrator) {
    migrator.set_ignore_missing(true);
}

/// The migrations this version knows that the database lacks (to apply),
/// after a warning naming any the database has that this version does not
/// know (a newer troupe applied them).
async fn pending(migrator: &sqlx::migrate::Migrator, pool: &Pool) -> Vec<String> {
    const APPLIED: &str = "SELECT version FROM _sqlx_migrations WHERE success";
    // No table yet: nothing applied.
    let applied: Vec<i64> = match pool {
        Pool::Sqlite(p) => sqlx::query_scalar(APPLIED).fetch_all(p).await,
        Pool::MySql(p) => sqlx::query_scalar(APPLIED).fetch_all(p).await,
    }
    .unwrap_or_default();
    let newer: Vec<i64> = applied
        .iter()
        .filter(|v| !migrator.iter().any(|m| m.version == **v))
        .copied()
        .collect();
    if !newer.is_empty() {
        tracing::warn!(
            ?newer,
            version = env!("CARGO_PKG_VERSION"),
            "a newer troupe migrated this database further than this version knows; running on the expanded schema (finish the upgrade of every server)"
        );
    }
    migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
        .map(|m| format!("{:04} {}", m.version, m.description))
        .collect()
}

/// `host:port` of a MySQL URL, to name in errors.
fn address(opts: &MySqlConnectOptions) -> String {
    format!("{}:{}", opts.get_host(), opts.get_port())
}

/// Why a first connection to MySQL/MariaDB failed, in words an operator
/// acts on (never the password).
fn connect_error(opts: &MySqlConnectOptions, e: &sqlx::Error) -> Error {
    let at = address(opts);
    let user = opts.get_username();
    let why = match e {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("connection refused at {at}; is MariaDB running and listening there?")
        }
        sqlx::Error::Io(io) => format!("cannot reach the database at {at}: {io}"),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // ER_ACCESS_DENIED_ERROR's SQLSTATE
            Some("28000") => format!(
                "access denied for user {user} at {at}; check the user and password in the URL"
            ),
            // ER_BAD_DB_ERROR
            Some("42000") if db.message().contains("Unknown database") => format!(
                "{} at {at}; create it first (CREATE DATABASE …)",
                db.message()
            ),
            _ => format!(
                "the database at {at} refused the connection: {}",
                db.message()
            ),
        },
        sqlx::Error::Tls(tls) => format!("TLS with the database at {at} failed: {tls}"),
        other => format!("cannot connect to the database at {at}: {other}"),
    };
    Error::DatabaseConnect(why)
}

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
pub(crate) mod tests;
