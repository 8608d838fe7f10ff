//! The writer: one task (or a few, on MySQL/MariaDB) that commits every
//! write waiting in one transaction (group commit) and only then answers
//! each caller.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Outcome, Pool, StoreStats, Watchers, Write, sql};

/// What the writer's database can do beyond the common SQL.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caps {
    /// `INSERT … RETURNING` (SQLite 3.35+, MariaDB 10.5+; not MySQL).
    pub(super) returning: bool,
    /// Group commits in flight at once: one for SQLite, which has a single
    /// writer lock; more for a server, which flushes concurrent commits together.
    pub(super) writers: usize,
    /// Several servers may share the database (MySQL/MariaDB): fenced
    /// requests are checked ([`super::Fence`]), a target's order is kept in
    /// the database (`targets`, `seq`) and queued actions are claimed at
    /// their turn ([`super::Turn`]). One server on SQLite keeps these in
    /// memory.
    pub(super) shared: bool,
}

pub(super) struct Request {
    pub(super) writes: Vec<Write>,
    pub(super) fence: Option<super::Fence>,
    pub(super) reply: oneshot::Sender<Result<Vec<Outcome>, Failed>>,
}

/// Why a commit failed, as the writer saw it.
#[derive(Debug, Clone)]
pub(super) struct Failed {
    pub(super) message: String,
    /// It failed at `COMMIT` without the database saying it rolled back
    /// (the connection was lost): it may have been committed all the same.
    pub(super) unknown: bool,
    /// The database rolled the whole transaction back and said so (see
    /// [`rolled_back`]): nothing of it was written, and the same
    /// transaction again may well succeed.
    pub(super) rolled_back: bool,
    /// Rolled back for a conflict with other writes (1213: a deadlock, or a
    /// Galera certification conflict), not for a lock wait that timed out
    /// (1205): tried [`ATTEMPTS`] times over, the first is a conflict the
    /// client may retry (`write_conflict`), the second a database that
    /// holds locks for seconds, as one waiting for its cluster does
    /// (`database_unavailable`).
    pub(super) conflict: bool,
    /// The node refused the transaction because it takes no writes now (see
    /// [`not_writable`]): nothing of it was written, and it may succeed once
    /// the writes moved to a node that does.
    pub(super) not_writable: bool,
    /// The database refused the write itself (a constraint, a value it
    /// cannot hold): trying again cannot help. Otherwise the failure is the
    /// connection's or the moment's (lost connection, deadlock, lock wait
    /// timeout, the server restarting) and a retry may succeed.
    pub(super) permanent: bool,
    /// A unique key already held, before `COMMIT`: as when another server
    /// inserted an action with the same idempotency key meanwhile (see
    /// [`commit_retrying`]).
    pub(super) duplicate: bool,
    /// A [`Write::Guard`](super::Write::Guard) found its configuration
    /// changed by another server: nothing was written.
    pub(super) stale: Option<super::ConfigKind>,
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Failed {
        Failed {
            permanent: is_permanent(&e),
            duplicate: matches!(&e, sqlx::Error::Database(db)
                if db.kind() == sqlx::error::ErrorKind::UniqueViolation),
            unknown: false,
            stale: match &e {
                sqlx::Error::Configuration(b) => b.downcast_ref::<super::Stale>().map(|s| s.0),
                _ => None,
            },
            rolled_back: rolled_back(&e),
            conflict: number(&e) == Some(1213),
            not_writable: not_writable(&e),
            message: e.to_string(),
        }
    }
}

impl From<sql::ApplyError> for Failed {
    fn from(e: sql::ApplyError) -> Failed {
        let failed = Failed::from(e.error);
        Failed {
            // A conflict reported at `COMMIT` (Galera's certification) is a
            // rollback like any other, and a node turned read-only refuses
            // the `COMMIT` itself; only a lost answer leaves it open.
            unknown: e.at_commit && !failed.rolled_back && !failed.not_writable,
            ..failed
        }
    }
}

/// Whether the database refused a write for what it holds, not for the
/// state of the connection.
pub(super) fn is_permanent(e: &sqlx::Error) -> bool {
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

/// Whether the database rolled the transaction back for the moment's sake
/// and said so, so that running it again is safe and may succeed.
/// MySQL/MariaDB: 1213 (a deadlock, or on Galera a certification conflict
/// with a write through another node, or a brute-force abort by one),
/// 1205 (a lock wait timeout; the writer rolls back the rest itself).
/// The MySQL/MariaDB error number of `e`, if the database answered with one.
fn number(e: &sqlx::Error) -> Option<u16> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|e| e.number())
}

pub(super) fn rolled_back(e: &sqlx::Error) -> bool {
    matches!(number(e), Some(1213 | 1205))
}

/// Whether the node refused a statement, or the `COMMIT`, because it takes
/// no writes now: it is read-only (MySQL/MariaDB 1290, as `read_only` or
/// `super_read_only` makes it answer for a user without `READ_ONLY ADMIN`
/// or `SUPER`: a primary demoted by a switchover), or it is a Galera node
/// that is not ready (1047: joining, or out of the Primary component
/// after the cluster lost its quorum). The transaction was not committed;
/// it is tried again, on a fresh connection, for up to
/// [`READ_ONLY_PATIENCE`] while the writes move to a node that takes them.
/// Past that it fails as the database's (`database_unavailable`), never as
/// a conflict: trying at once again would not help.
pub(super) fn not_writable(e: &sqlx::Error) -> bool {
    matches!(number(e), Some(1290 | 1047))
}

/// How long a transaction a read-only node refused is tried again (every
/// [`READ_ONLY_PAUSE`]) before the failure is reported: a planned
/// switchover makes the new primary writable within a second or two of
/// the old one turning read-only. Shorter than the default submit timeout
/// (10 s), so that a submit during a switchover that does not finish (or
/// to a database left read-only) is refused as `database_unavailable`,
/// nothing written, rather than left `outcome_unknown`.
pub(super) const READ_ONLY_PATIENCE: Duration = Duration::from_secs(8);

/// The pause between tries of a transaction a read-only node refused.
const READ_ONLY_PAUSE: Duration = Duration::from_millis(100);

/// Whether an engine error is worth trying again at once (see
/// [`retrying`]): rolled back, or refused by a node that takes no writes
/// for the moment.
pub(super) fn error_rolled_back(e: &crate::Error) -> bool {
    matches!(e, crate::Error::Database(e) if rolled_back(e) || not_writable(e))
}

/// Times a transaction the database keeps rolling back is tried, in all.
pub(super) const ATTEMPTS: u32 = 6;

/// The pause before try `attempt + 2`: 10, 20, 40, 80, 160 ms, each
/// stretched by up to half at random, so that transactions which collided do
/// not collide again in step.
pub(super) fn backoff(attempt: u32) -> Duration {
    let base = 10u64 << attempt.min(4);
    let noise = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    Duration::from_millis(base + noise % (base / 2 + 1))
}

/// Runs `once` (a whole transaction, or one autocommitted statement) again
/// while the database rolls it back ([`rolled_back`]), up to [`ATTEMPTS`]
/// times with a [`backoff`] between: the write paths outside the writer
/// (leases, hand-overs) use this as the writer does for its commits.
pub(super) async fn retrying<T, F, Fut>(stats: &StoreStats, mut once: F) -> crate::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = crate::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match once().await {
            Err(e) if error_rolled_back(&e) => {
                stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                if attempt + 1 >= ATTEMPTS {
                    return Err(e);
                }
                tracing::debug!(error = %e, attempt, "the database rolled a write back; trying again");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Group commits under way, shared by the writers.
#[derive(Default)]
pub(super) struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    /// Notified as each commit ends.
    ended: tokio::sync::Notify,
}

/// While another commit is under way, a writer keeps gathering writes until
/// it ends or the batch reaches this many, rather than starting a small
/// commit beside it: fewer, fuller commits cost the database less per write.
const GATHER: usize = 32;

/// Largest number of writes committed in one transaction.
const MAX_BATCH: usize = 512;

/// The group-commit loop: takes every request waiting, commits them in one
/// transaction, answers them all. If the batch fails, each request is retried
/// alone so one bad write cannot fail its neighbours.
///
/// Several writers may share one queue (see [`Caps::writers`]): while one
/// waits for its commit to be flushed, the next collects what arrived
/// meanwhile ([`next_batch`]) and starts its own transaction. A caller has at most one
/// request in flight per action, so requests that touch the same action
/// never commit out of order.
pub(super) async fn run(
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
        let fences: Vec<Option<&super::Fence>> = batch
            .iter()
            .flat_map(|r| r.writes.iter().map(|_| r.fence.as_ref()))
            .collect();
        commits.count.fetch_add(1, Ordering::SeqCst);
        let applied = commit_retrying(&mut conn, caps, &all, &fences, &stats).await;
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
            // Refused as read-only for all of [`READ_ONLY_PATIENCE`]: no
            // node takes writes, and each alone would wait as long again.
            Err(e) if e.not_writable => {
                for req in batch.drain(..) {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
            // Rolled back: one bad write must not fail its neighbours (nor
            // one that keeps conflicting).
            Err(_) => {
                for req in batch.drain(..) {
                    let writes: Vec<&Write> = req.writes.iter().collect();
                    let fences = vec![req.fence.as_ref(); writes.len()];
                    let result = commit_retrying(&mut conn, caps, &writes, &fences, &stats).await;
                    if let Ok(outcomes) = &result {
                        watchers.publish(&writes, outcomes);
                    }
                    let _ = req.reply.send(result);
                }
            }
        }
    }
}

/// [`commit_once`], again while the database rolls it back for a conflict
/// or a node not ready ([`rolled_back`]), up to [`ATTEMPTS`] times: the whole
/// transaction each time, since nothing of it was kept.
///
/// Also again, every [`READ_ONLY_PAUSE`] for up to [`READ_ONLY_PATIENCE`],
/// while the node refuses it as read-only (a switchover under way): the
/// node watcher moves the writes to the new primary meanwhile, and each try
/// takes a fresh connection (to the new primary once they moved, or through
/// a proxy to wherever it sends them now).
///
/// Also once more, at once, when it holds an insert with an idempotency key
/// and failed on a unique key before `COMMIT`: another server inserted the
/// same key after this one looked for it (a client's retry through another
/// server while the first try's insert was uncommitted). Tried again, the
/// insert finds that action and answers with it.
pub(super) async fn commit_retrying(
    conn: &mut WriterConn,
    caps: Caps,
    writes: &[&Write],
    fences: &[Option<&super::Fence>],
    stats: &StoreStats,
) -> Result<Vec<Outcome>, Failed> {
    let mut attempt = 0;
    let mut unwritable_since: Option<std::time::Instant> = None;
    loop {
        match commit_once(conn, caps, writes, fences, stats).await {
            Err(e) if e.not_writable => {
                stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                let since = *unwritable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= READ_ONLY_PATIENCE {
                    return Err(e);
                }
                tracing::debug!(error = %e.message, writes = writes.len(), "the database node is read-only; trying the commit again once the writes moved");
                tokio::time::sleep(READ_ONLY_PAUSE).await;
            }
            Err(e) if e.rolled_back => {
                stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                if attempt + 1 >= ATTEMPTS {
                    return Err(e);
                }
                tracing::debug!(error = %e.message, attempt, writes = writes.len(), "the database rolled a commit back; trying it again");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) if e.duplicate && !e.unknown && attempt == 0 && keyed_insert(writes) => {
                tracing::debug!(error = %e.message, "an idempotency key was inserted meanwhile; trying again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Whether `writes` insert an action with an idempotency key.
fn keyed_insert(writes: &[&Write]) -> bool {
    writes
        .iter()
        .any(|w| matches!(w, Write::Insert { new, .. } if new.idempotency_key.is_some()))
}

/// One transaction for `writes`, with the failure points around it.
pub(super) async fn commit_once(
    conn: &mut WriterConn,
    caps: Caps,
    writes: &[&Write],
    fences: &[Option<&super::Fence>],
    stats: &StoreStats,
) -> Result<Vec<Outcome>, Failed> {
    injected_refusal(writes)?;
    injected_before_commit(writes)?;
    let outcomes = conn.apply(caps, writes, fences, stats).await?;
    injected_after_commit(writes)?;
    Ok(outcomes)
}

/// The `store.refuse_step_success` and `store.refuse_step_start` failure
/// points: the database refuses a step's result, or a commit recording a
/// step started, as it would a value it cannot hold.
pub(super) fn injected_refusal(writes: &[&Write]) -> Result<(), Failed> {
    if writes
        .iter()
        .any(|w| matches!(w, Write::StepSucceeded { .. }))
    {
        fail::fail_point!("store.refuse_step_success", |_| Err(Failed {
            message: "Data too long for column 'output' (injected)".into(),
            permanent: true,
            unknown: false,
            rolled_back: false,
            conflict: false,
            not_writable: false,
            duplicate: false,
            stale: None,
        }));
    }
    if writes
        .iter()
        .any(|w| matches!(w, Write::StepStarted { .. }))
    {
        fail::fail_point!("store.refuse_step_start", |_| Err(Failed {
            message: "Data too long for column 'name' (injected)".into(),
            permanent: true,
            unknown: false,
            rolled_back: false,
            conflict: false,
            not_writable: false,
            duplicate: false,
            stale: None,
        }));
    }
    Ok(())
}

/// The `store.before_insert_commit` failure point: a commit that inserts
/// actions fails before `COMMIT` (the connection lost mid-transaction), so
/// nothing of it was written.
pub(super) fn injected_before_commit(writes: &[&Write]) -> Result<(), Failed> {
    if writes.iter().any(|w| matches!(w, Write::Insert { .. })) {
        fail::fail_point!("store.before_insert_commit", |_| Err(Failed {
            message: "the connection was lost before COMMIT (injected)".into(),
            permanent: false,
            unknown: false,
            rolled_back: false,
            conflict: false,
            not_writable: false,
            duplicate: false,
            stale: None,
        }));
    }
    Ok(())
}

/// The `store.after_insert_commit` and `store.after_turn_commit` failure
/// points (a commit inserting actions, or claiming a turn): a commit that went
/// through but whose answer was lost (see [`crate::failpoints`]).
pub(super) fn injected_after_commit(writes: &[&Write]) -> Result<(), Failed> {
    // Unused when the failure points are compiled out.
    #[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
    let lost = || Failed {
        message: "the connection was lost during COMMIT (injected)".into(),
        permanent: false,
        unknown: true,
        rolled_back: false,
        conflict: false,
        not_writable: false,
        duplicate: false,
        stale: None,
    };
    if writes.iter().any(|w| matches!(w, Write::Insert { .. })) {
        fail::fail_point!("store.after_insert_commit", |_| Err(lost()));
    }
    if writes
        .iter()
        .any(|w| matches!(w, Write::Start { turn: Some(_), .. }))
    {
        fail::fail_point!("store.after_turn_commit", |_| Err(lost()));
    }
    Ok(())
}

/// Fills `batch` with the next requests: everything waiting and, while
/// another commit is under way, what arrives until it ends or [`GATHER`]
/// writes are in. With the database idle a lone write goes at once. Leaves
/// `batch` empty when the store has closed.
pub(super) async fn next_batch(
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
pub(super) struct WriterConn {
    pub(super) pool: Pool,
    pub(super) conn: Option<Conn>,
    /// MySQL/MariaDB: the database's nodes; `conn` is dropped once writes
    /// moved to another node since it was opened (at `generation`).
    pub(super) nodes: Option<Arc<super::nodes::Nodes>>,
    pub(super) generation: u64,
}

pub(super) enum Conn {
    Sqlite(sqlx::SqliteConnection),
    MySql(sqlx::MySqlConnection),
}

impl WriterConn {
    async fn apply(
        &mut self,
        caps: Caps,
        writes: &[&Write],
        fences: &[Option<&super::Fence>],
        stats: &StoreStats,
    ) -> Result<Vec<Outcome>, Failed> {
        let fences = if caps.shared { fences } else { &[] };
        let began = std::time::Instant::now();
        if let Some(nodes) = &self.nodes
            && nodes.generation() != self.generation
        {
            self.conn = None;
            self.generation = nodes.generation();
        }
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
            Conn::Sqlite(c) => {
                sql::sqlite::apply(c, writes, fences, caps.shared, caps.returning, false).await
            }
            Conn::MySql(c) => {
                sql::mysql::apply(c, writes, fences, caps.shared, caps.returning, true).await
            }
        };
        let (outcomes, rows) = match result {
            Ok(applied) => applied,
            Err(e) => {
                let failed = Failed::from(e);
                // Not a refusal of the write itself: the node may be gone,
                // not ready or read-only; look at the nodes now.
                if !failed.permanent
                    && let Some(nodes) = &self.nodes
                {
                    nodes.kick();
                }
                // A transaction the database rolled back leaves the
                // connection sound; a lock wait timeout leaves the rest of
                // the transaction open, so roll it back here. Any other
                // error may have broken the connection: drop it.
                if failed.rolled_back
                    && let Conn::MySql(c) = conn
                    && sqlx::raw_sql("ROLLBACK").execute(&mut *c).await.is_ok()
                {
                    return Err(failed);
                }
                self.conn = None;
                return Err(failed);
            }
        };
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
pub(super) fn mariadb_has_returning(version: &str) -> bool {
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
