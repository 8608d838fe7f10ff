//! The SQL, written once and expanded for each backend. Both SQLite and
//! MySQL/MariaDB take `?` placeholders, so the text is shared verbatim.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{BundleRow, Fence, KeyRow, Outcome, Turn, Write};
use crate::model::{
    Action, ActionFilter, ActionId, ActionStatus, StepRecord, StepStatus, Timestamp,
};

macro_rules! action_columns {
    () => {
        "id, kind, target, params, status, bundle, current_step, error, idempotency_key, submitted_by, owner, \
         epoch, revision, created_at, started_at, finished_at, cancel_requested_at"
    };
}

macro_rules! select_actions {
    ($($rest:literal),*) => {
        concat!("SELECT ", action_columns!(), " FROM actions", $($rest),*)
    };
}

fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, sqlx::Error> {
    s.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))
}

fn parse_params(s: &str) -> Result<Map<String, Value>, sqlx::Error> {
    serde_json::from_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Most rows in one multi-row statement (SQLite allows 500 terms in a
/// compound SELECT).
const MAX_ROWS: usize = 256;

/// A run of hot-path writes to commit as one statement per kind: inserts
/// (without an idempotency key), starts, step successes, step starts and
/// successful finishes. They run in that order, which is the order one action's writes
/// always come in; a write that would break it for its action (or any other
/// kind of write) ends the segment. Writes to different actions commute.
#[derive(Default)]
struct Segment {
    inserts: Vec<usize>,
    starts: Vec<usize>,
    succeeded: Vec<usize>,
    started: Vec<usize>,
    finishes: Vec<usize>,
    /// The latest phase each action reached in this segment.
    phase: std::collections::HashMap<ActionId, u8>,
}

impl Segment {
    /// Adds write `i`; false if it cannot join this segment. An empty
    /// segment takes any hot-path write.
    fn add(&mut self, i: usize, w: &Write) -> bool {
        let (phase, list) = match w {
            Write::Insert { new, .. } if new.idempotency_key.is_none() => (0, &mut self.inserts),
            Write::Start { .. } => (1, &mut self.starts),
            Write::StepSucceeded { .. } => (2, &mut self.succeeded),
            Write::StepStarted { .. } => (3, &mut self.started),
            Write::Finish {
                status: ActionStatus::Succeeded,
                ..
            } => (4, &mut self.finishes),
            _ => return false,
        };
        if let Some(id) = w.action_id() {
            if self.phase.get(&id).is_some_and(|&p| p >= phase) {
                return false;
            }
            self.phase.insert(id, phase);
        }
        list.push(i);
        true
    }

    fn clear(&mut self) {
        self.inserts.clear();
        self.starts.clear();
        self.succeeded.clear();
        self.started.clear();
        self.finishes.clear();
        self.phase.clear();
    }
}

/// A value bound into a batched statement.
enum Arg<'a> {
    Int(i64),
    Text(&'a str),
    OptText(Option<&'a str>),
    Time(Timestamp),
}

/// One `UPDATE` of many rows of `table`, each found by action id (`key`),
/// with per-row values picked by `CASE key WHEN ? THEN ? … END`. Plain
/// single-table SQL, the same for SQLite and MySQL/MariaDB, and no
/// temporary tables (an `UPDATE … JOIN` a derived table needs one in
/// MariaDB, on disk when a text column is involved). A segment holds at most
/// one write per action and kind, so the key is unique per row.
struct CaseUpdate {
    table: &'static str,
    key: &'static str,
    /// Assignments that are the same for every row.
    set: &'static str,
    /// Columns set per row: (column, expression with `{}` for the row's value).
    columns: &'static [(&'static str, &'static str)],
    /// A column that must also equal a per-row value (the step's `seq`);
    /// with the key, the row's primary key.
    matching: Option<&'static str>,
    cond: Option<&'static str>,
    /// A write's key and per-row values: the columns' in order, then the
    /// matching value.
    row: for<'a> fn(&'a Write) -> (ActionId, Vec<Arg<'a>>),
}

impl CaseUpdate {
    fn text(&self, rows: usize) -> String {
        let key = self.key;
        let case = format!("CASE {key}{} END", " WHEN ? THEN ?".repeat(rows));
        let mut text = format!("UPDATE {} SET {}", self.table, self.set);
        for (column, expr) in self.columns {
            text.push_str(&format!(", {column} = {}", expr.replace("{}", &case)));
        }
        // With a matching column, `(key, column) IN ((?, ?), …)`: an exact
        // primary-key lookup per row on both databases. MariaDB scans the
        // whole index for a one-row list, so one row is spelled out.
        match self.matching {
            None => text.push_str(&format!(" WHERE {key} IN ({})", placeholders(rows))),
            Some(column) if rows == 1 => {
                text.push_str(&format!(" WHERE {key} = ? AND {column} = ?"))
            }
            Some(column) => text.push_str(&format!(
                " WHERE ({key}, {column}) IN ({})",
                vec!["(?, ?)"; rows].join(", ")
            )),
        }
        if let Some(cond) = self.cond {
            text.push_str(&format!(" AND {cond}"));
        }
        text
    }
}

const START: CaseUpdate = CaseUpdate {
    table: "actions",
    key: "id",
    set: "status = 'running', revision = revision + 1",
    columns: &[
        ("owner", "{}"),
        ("lease_expires_at", "{}"),
        ("started_at", "COALESCE(started_at, {})"),
    ],
    matching: None,
    cond: Some("status IN ('queued', 'running')"),
    row: start_row,
};

/// A queued action's claim at its turn (its target's head, checked just
/// before): only if nobody claimed it or asked for its cancel meanwhile.
const CLAIM: CaseUpdate = CaseUpdate {
    table: "actions",
    key: "id",
    set: "status = 'running', epoch = epoch + 1, revision = revision + 1",
    columns: START.columns,
    matching: None,
    cond: Some("status = 'queued' AND owner IS NULL AND cancel_requested_at IS NULL"),
    row: start_row,
};

/// No revision bump: a success always commits with the next write, which bumps.
const STEP_SUCCEEDED: CaseUpdate = CaseUpdate {
    table: "action_steps",
    key: "action_id",
    set: "status = 'succeeded', error = NULL",
    columns: &[("output", "{}"), ("finished_at", "{}")],
    matching: Some("seq"),
    cond: None,
    row: step_succeeded_row,
};

/// Only for a running action: a cancel may have won the race to the row.
const STEP_STARTED: CaseUpdate = CaseUpdate {
    table: "action_steps",
    key: "action_id",
    set: "status = 'running', finished_at = NULL, waiting_for = NULL",
    columns: &[("attempt", "{}"), ("started_at", "{}"), ("node", "{}")],
    matching: Some("seq"),
    cond: Some(
        "EXISTS (SELECT 1 FROM actions WHERE actions.id = action_steps.action_id AND actions.status = 'running')",
    ),
    row: step_started_row,
};

/// The same, when every action in the statement is known to be running.
const STEP_STARTED_RUNNING: CaseUpdate = CaseUpdate {
    cond: None,
    ..STEP_STARTED
};

const CURRENT_STEP: CaseUpdate = CaseUpdate {
    table: "actions",
    key: "id",
    set: "revision = revision + 1",
    columns: &[("current_step", "{}")],
    matching: None,
    cond: Some("status = 'running'"),
    row: current_step_row,
};

/// Successful finishes only: a succeeded action has no pending steps to skip.
const SUCCEEDED: CaseUpdate = CaseUpdate {
    table: "actions",
    key: "id",
    set: "status = 'succeeded', error = NULL, owner = NULL, lease_expires_at = NULL, \
          revision = revision + 1",
    columns: &[("finished_at", "{}")],
    matching: None,
    cond: None,
    row: succeeded_row,
};

fn start_row(w: &Write) -> (ActionId, Vec<Arg<'_>>) {
    match w {
        Write::Start {
            id,
            owner,
            lease_until,
            at,
            ..
        } => (
            *id,
            vec![Arg::Text(owner), Arg::Time(*lease_until), Arg::Time(*at)],
        ),
        _ => unreachable!("START takes starts"),
    }
}

fn step_succeeded_row(w: &Write) -> (ActionId, Vec<Arg<'_>>) {
    match w {
        Write::StepSucceeded {
            id,
            seq,
            output,
            at,
        } => (
            *id,
            vec![Arg::Text(output), Arg::Time(*at), Arg::Int(*seq as i64)],
        ),
        _ => unreachable!("STEP_SUCCEEDED takes step successes"),
    }
}

fn step_started_row(w: &Write) -> (ActionId, Vec<Arg<'_>>) {
    match w {
        Write::StepStarted {
            id,
            seq,
            attempt,
            at,
            node,
            ..
        } => (
            *id,
            vec![
                Arg::Int(*attempt as i64),
                Arg::Time(*at),
                Arg::OptText(node.as_deref()),
                Arg::Int(*seq as i64),
            ],
        ),
        _ => unreachable!("STEP_STARTED takes step starts"),
    }
}

fn current_step_row(w: &Write) -> (ActionId, Vec<Arg<'_>>) {
    match w {
        Write::StepStarted { id, name, .. } => (*id, vec![Arg::Text(name)]),
        _ => unreachable!("CURRENT_STEP takes step starts"),
    }
}

fn succeeded_row(w: &Write) -> (ActionId, Vec<Arg<'_>>) {
    match w {
        Write::Finish { id, at, .. } => (*id, vec![Arg::Time(*at)]),
        _ => unreachable!("SUCCEEDED takes finishes"),
    }
}

/// Whether an insert asks to start its action with it.
fn wants_start(w: &Write) -> bool {
    matches!(w, Write::Insert { start: Some(_), steps, .. } if !steps.is_empty())
}

/// `?, ?, ?` (`n` placeholders).
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `row, row, …` (`n` times), for a multi-row `VALUES`.
fn rows(row: &str, n: usize) -> String {
    vec![row; n].join(", ")
}

/// Splits `items` into runs whose lengths are powers of two (at most `max`),
/// so multi-row inserts come in few distinct shapes for the statement cache.
fn pow2_chunks<T>(mut items: &[T], max: usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    while !items.is_empty() {
        let n = items.len().min(max);
        let n = 1 << n.ilog2();
        let (head, tail) = items.split_at(n);
        out.push(head);
        items = tail;
    }
    out
}

/// Splits an insert's step rows into statements: up to 16 rows exactly
/// (one statement for a typical action), larger runs in power-of-two chunks,
/// so few distinct statements are prepared.
fn step_chunks<T>(items: &[T]) -> Vec<&[T]> {
    match items.len() {
        0 => Vec::new(),
        1..=16 => vec![items],
        _ => pow2_chunks(items, MAX_ROWS),
    }
}

/// Where a row holds a step's columns: `seq, name, step, status, attempt,
/// started_at, finished_at, output, error, waiting_for, node`.
type StepColumns = [&'static str; 11];

const STEP_COLUMNS: StepColumns = [
    "seq",
    "name",
    "step",
    "status",
    "attempt",
    "started_at",
    "finished_at",
    "output",
    "error",
    "waiting_for",
    "node",
];

/// The same, as aliased when joined with `actions`.
const JOINED_STEP_COLUMNS: StepColumns = [
    "s_seq",
    "s_name",
    "s_step",
    "s_status",
    "s_attempt",
    "s_started_at",
    "s_finished_at",
    "s_output",
    "s_error",
    "s_waiting_for",
    "s_node",
];

/// A failed [`sqlite::apply`] or [`mysql::apply`].
pub(crate) struct ApplyError {
    pub(crate) error: sqlx::Error,
    /// It failed at `COMMIT`, so the database may have committed it all the
    /// same: the outcome is unknown. Before `COMMIT`, nothing was.
    pub(crate) at_commit: bool,
}

impl ApplyError {
    fn at_commit(error: sqlx::Error) -> ApplyError {
        ApplyError {
            error,
            at_commit: true,
        }
    }
}

impl From<sqlx::Error> for ApplyError {
    fn from(error: sqlx::Error) -> ApplyError {
        ApplyError {
            error,
            at_commit: false,
        }
    }
}

macro_rules! sql_backend {
    ($module:ident, $db:ty, $pool:ty, $conn:ty, $last_id:ident) => {
        pub(super) mod $module {
            use sqlx::Row;

            use super::*;

            type DbRow = <$db as sqlx::Database>::Row;

            type Q = sqlx::query::Query<'static, $db, <$db as sqlx::Database>::Arguments>;

            /// Commits `writes` in one transaction. Runs of hot-path writes
            /// (see [`Segment`]) become one multi-row statement per kind;
            /// anything else runs on its own, in order. Returns each write's
            /// outcome and the rows written in all.
            ///
            /// With `implicit`, the connection runs with `autocommit = 0`, so
            /// the transaction needs no `BEGIN` (one round trip fewer); a
            /// failed one is rolled back by dropping the connection.
            pub(crate) async fn apply(
                conn: &mut $conn,
                writes: &[&Write],
                fences: &[Option<&Fence>],
                shared: bool,
                returning: bool,
                implicit: bool,
            ) -> Result<(Vec<Outcome>, u64), ApplyError> {
                if implicit {
                    let applied = apply_in(conn, writes, fences, shared, returning).await?;
                    // Test builds: `sleep(MS)` holds a transaction that
                    // inserted actions open, written but not committed.
                    if writes.iter().any(|w| matches!(w, Write::Insert { .. })) {
                        fail::fail_point!("store.insert_uncommitted");
                    }
                    sqlx::raw_sql("COMMIT")
                        .execute(&mut *conn)
                        .await
                        .map_err(ApplyError::at_commit)?;
                    return Ok(applied);
                }
                // SQLite (the one explicit caller): take the write lock at
                // once. A deferred transaction that read and then wants to
                // write fails at once (`SQLITE_BUSY_SNAPSHOT`, no busy wait)
                // if another connection wrote meanwhile, as the server's
                // lease renewal does.
                let mut tx = sqlx::Connection::begin_with(conn, "BEGIN IMMEDIATE").await?;
                let applied = apply_in(&mut tx, writes, fences, shared, returning).await?;
                tx.commit().await.map_err(ApplyError::at_commit)?;
                Ok(applied)
            }

            /// `fences` is empty (nothing is checked) or has each write's
            /// request's fence, if any. With `shared` (several servers may
            /// share the database), inserts take their target's next `seq`
            /// and start only if the target is idle here too, and starts
            /// with a [`Turn`] are claims, made first (their requests are
            /// fenced on the epoch the claim gives).
            async fn apply_in(
                tx: &mut $conn,
                writes: &[&Write],
                fences: &[Option<&Fence>],
                shared: bool,
                returning: bool,
            ) -> Result<(Vec<Outcome>, u64), sqlx::Error> {
                let mut out = vec![Outcome::Done { rows: 0 }; writes.len()];
                let turns = if shared { claim_turns(tx, writes).await? } else { Default::default() };
                let mut rows = turns.values().filter(|&&claimed| claimed).count() as u64;
                let lost = check_fences(tx, fences).await?;
                let mut segment = Segment::default();
                for (i, w) in writes.iter().enumerate() {
                    if let Some(&claimed) = turns.get(&i) {
                        out[i] = Outcome::Done { rows: u64::from(claimed) };
                        continue;
                    }
                    if fences.get(i).copied().flatten().is_some_and(|f| lost.contains(&(&*f.owner, f.id, f.epoch))) {
                        out[i] = Outcome::Fenced;
                        continue;
                    }
                    if segment.add(i, w) {
                        continue;
                    }
                    rows += run_segment(tx, &mut segment, writes, &mut out, shared, returning).await?;
                    if !segment.add(i, w) {
                        let outcome = apply_one(tx, w, shared, returning).await?;
                        rows += outcome.rows();
                        out[i] = outcome;
                    }
                }
                rows += run_segment(tx, &mut segment, writes, &mut out, shared, returning).await?;
                Ok((out, rows))
            }

            /// Claims the queued actions whose starts carry a [`Turn`], each
            /// only if it is its target's head; returns, by write index,
            /// whether it was claimed. Each target's row is written first
            /// (sorted, so concurrent claims lock in one order): two starts
            /// of one target, wherever they run, are serialized by it (on
            /// one node by its row lock, on Galera by certification), and
            /// the reads after it see every earlier start (the writer's
            /// connections read committed).
            async fn claim_turns(
                tx: &mut $conn,
                writes: &[&Write],
            ) -> Result<std::collections::HashMap<usize, bool>, sqlx::Error> {
                let claims: Vec<(usize, &Write, &Turn)> = writes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, w)| match w {
                        Write::Start { turn: Some(t), .. } => Some((i, *w, t)),
                        _ => None,
                    })
                    .collect();
                let mut out = std::collections::HashMap::new();
                if claims.is_empty() {
                    return Ok(out);
                }
                let mut targets: Vec<&str> = claims.iter().map(|c| c.2.target.as_str()).collect();
                targets.sort_unstable();
                targets.dedup();
                let text = format!(
                    "INSERT INTO targets (target, last_seq, starts) VALUES {} ON DUPLICATE KEY UPDATE starts = starts + 1",
                    rows("(?, 0, 1)", targets.len())
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                for t in &targets {
                    q = q.bind(*t);
                }
                q.execute(&mut *tx).await?;
                // Heads: queued, unclaimed, and the lowest seq of their
                // target's unfinished actions, so none of those runs.
                let text = format!(
                    "SELECT a.id FROM actions a WHERE a.id IN ({}) AND a.status = 'queued' AND a.owner IS NULL \
                     AND a.cancel_requested_at IS NULL AND a.seq = (SELECT MIN(b.seq) FROM actions b \
                     WHERE b.target = a.target AND b.status IN ('queued', 'running'))",
                    placeholders(claims.len())
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                for c in &claims {
                    q = q.bind(c.1.action_id());
                }
                let heads: Vec<ActionId> =
                    q.fetch_all(&mut *tx).await?.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
                let take: Vec<&Write> = claims
                    .iter()
                    .filter(|c| c.1.action_id().is_some_and(|id| heads.contains(&id)))
                    .map(|c| c.1)
                    .collect();
                let mut won = heads.clone();
                if !take.is_empty() && case_update(tx, &CLAIM, &take).await? < take.len() as u64 {
                    // Taken meanwhile by a claim that did not wait for the
                    // target's row (none should): which are ours.
                    let text = format!(
                        "SELECT id FROM actions WHERE status = 'running' AND owner = ? AND id IN ({})",
                        placeholders(take.len())
                    );
                    let Write::Start { owner, .. } = take[0] else { unreachable!("claims are starts") };
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(text)).bind(owner.clone());
                    for w in &take {
                        q = q.bind(w.action_id());
                    }
                    won = q.fetch_all(&mut *tx).await?.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
                }
                for (i, w, _) in claims {
                    out.insert(i, w.action_id().is_some_and(|id| won.contains(&id)));
                }
                Ok(out)
            }

            /// Checks every fence of the batch in one statement, before any
            /// of its writes; returns the actions whose fence failed. The
            /// check changes the rows it matches (`progress`), so it holds
            /// them until the commit: a takeover on one database node waits
            /// for it, and on Galera one of the two fails certification.
            /// Returns the failed fences as (owner, action, epoch).
            async fn check_fences<'f>(
                tx: &mut $conn,
                fences: &[Option<&'f Fence>],
            ) -> Result<std::collections::HashSet<(&'f str, ActionId, i64)>, sqlx::Error> {
                let mut lost = std::collections::HashSet::new();
                let mut all: Vec<&Fence> = fences.iter().flatten().copied().collect();
                all.sort_by(|a, b| (&a.owner, a.id, a.epoch).cmp(&(&b.owner, b.id, b.epoch)));
                all.dedup_by(|a, b| (&a.owner, a.id, a.epoch) == (&b.owner, b.id, b.epoch));
                let mut owners: Vec<&str> = all.iter().map(|f| &*f.owner).collect();
                owners.dedup();
                for owner in owners {
                    let mine: Vec<&Fence> = all.iter().filter(|f| &*f.owner == owner).copied().collect();
                    let cond = if mine.len() == 1 {
                        "id = ? AND epoch = ?".to_owned()
                    } else {
                        format!("id IN ({}) AND (id, epoch) IN ({})", placeholders(mine.len()), vec!["(?, ?)"; mine.len()].join(", "))
                    };
                    let bind = |mut q: Q| {
                        if mine.len() > 1 {
                            for f in &mine {
                                q = q.bind(f.id);
                            }
                        }
                        for f in &mine {
                            q = q.bind(f.id).bind(f.epoch);
                        }
                        q
                    };
                    let text = format!(
                        "UPDATE actions SET progress = progress + 1 WHERE owner = ? AND status IN ('queued', 'running') AND {cond}"
                    );
                    let held = bind(sqlx::query(sqlx::AssertSqlSafe(text)).bind(owner.to_owned())).execute(&mut *tx).await?.rows_affected();
                    if held == mine.len() as u64 {
                        continue;
                    }
                    let text = format!(
                        "SELECT id, epoch FROM actions WHERE owner = ? AND status IN ('queued', 'running') AND {cond}"
                    );
                    let kept: Vec<(ActionId, i64)> = bind(sqlx::query(sqlx::AssertSqlSafe(text)).bind(owner.to_owned()))
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                        .collect::<Result<_, sqlx::Error>>()?;
                    lost.extend(
                        mine.iter()
                            .filter(|f| !kept.contains(&(f.id, f.epoch)))
                            .map(|f| (&*f.owner, f.id, f.epoch)),
                    );
                }
                Ok(lost)
            }

            async fn run_segment(
                tx: &mut $conn,
                seg: &mut Segment,
                writes: &[&Write],
                out: &mut [Outcome],
                shared: bool,
                returning: bool,
            ) -> Result<u64, sqlx::Error> {
                let mut rows = 0;
                let pick = |idx: &[usize]| idx.iter().map(|&i| writes[i]).collect::<Vec<&Write>>();
                if !seg.inserts.is_empty() {
                    rows += insert_actions(tx, &seg.inserts, writes, out, shared, returning).await?;
                }
                if !seg.starts.is_empty() {
                    let starts = pick(&seg.starts);
                    let n = case_update(tx, &START, &starts).await?;
                    rows += n;
                    // A start that changed no row lost a race with a cancel.
                    let mut started = vec![true; starts.len()];
                    if n < starts.len() as u64 {
                        let text = format!(
                            "SELECT id FROM actions WHERE status = 'running' AND id IN ({})",
                            placeholders(starts.len())
                        );
                        let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                        for w in &starts {
                            q = q.bind(w.action_id());
                        }
                        let running: Vec<ActionId> =
                            q.fetch_all(&mut *tx).await?.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
                        for (s, w) in started.iter_mut().zip(&starts) {
                            *s = w.action_id().is_some_and(|id| running.contains(&id));
                        }
                    }
                    for (&i, s) in seg.starts.iter().zip(started) {
                        out[i] = Outcome::Done { rows: u64::from(s) };
                    }
                }
                if !seg.succeeded.is_empty() {
                    rows += case_update(tx, &STEP_SUCCEEDED, &pick(&seg.succeeded)).await?;
                }
                if !seg.started.is_empty() {
                    let started = pick(&seg.started);
                    // The actions first: when all of them are running (one
                    // per write), the step rows need no check of their own.
                    let running = case_update(tx, &CURRENT_STEP, &started).await?;
                    rows += running;
                    let spec = if running == started.len() as u64 { &STEP_STARTED_RUNNING } else { &STEP_STARTED };
                    rows += case_update(tx, spec, &started).await?;
                }
                if !seg.finishes.is_empty() {
                    rows += case_update(tx, &SUCCEEDED, &pick(&seg.finishes)).await?;
                }
                seg.clear();
                Ok(rows)
            }

            /// One multi-row insert per chunk for the actions, then one for all
            /// their steps. Ids come back with `RETURNING` where the server has
            /// it; elsewhere each action is inserted on its own.
            async fn insert_actions(
                tx: &mut $conn,
                idx: &[usize],
                writes: &[&Write],
                out: &mut [Outcome],
                shared: bool,
                returning: bool,
            ) -> Result<u64, sqlx::Error> {
                let items: Vec<&Write> = idx.iter().map(|&i| writes[i]).collect();
                let (inserted, rows) = insert_rows(tx, &items, shared, returning).await?;
                for (&i, outcome) in idx.iter().zip(inserted) {
                    out[i] = outcome;
                }
                Ok(rows)
            }

            /// Takes each insert's `seq` from its target's row (created, or
            /// moved on by the batch's count: sorted, so concurrent batches
            /// lock in one order) and says which start: those that ask to,
            /// whose target has no unfinished action, here or before them
            /// in the batch. The target's row is held to the commit, so the
            /// answer stays true (every start of a target writes it).
            async fn sequence(tx: &mut $conn, items: &[&Write]) -> Result<Vec<(bool, Option<i64>)>, sqlx::Error> {
                let target = |w: &Write| match w {
                    Write::Insert { new, .. } => new.target.clone(),
                    _ => unreachable!("only inserts are sequenced"),
                };
                let mut counts = std::collections::BTreeMap::<String, i64>::new();
                for w in items {
                    *counts.entry(target(w)).or_default() += 1;
                }
                let text = format!(
                    "INSERT INTO targets (target, last_seq) VALUES {} \
                     ON DUPLICATE KEY UPDATE last_seq = last_seq + VALUES(last_seq)",
                    rows("(?, ?)", counts.len())
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                for (t, n) in &counts {
                    q = q.bind(t.clone()).bind(*n);
                }
                q.execute(&mut *tx).await?;
                let bind_targets = |text: String| {
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                    for t in counts.keys() {
                        q = q.bind(t.clone());
                    }
                    q
                };
                // The rows just written, and (only if an insert asks to
                // start) whether each target has an unfinished action, in
                // the same statement: one round trip, the same reads
                // (`actions_ready`) the busy check made on its own.
                let busy_check = if items.iter().any(|w| wants_start(w)) {
                    "EXISTS (SELECT 1 FROM actions a WHERE a.status IN ('queued', 'running') AND a.target = t.target)"
                } else {
                    "0"
                };
                let text = format!(
                    "SELECT t.target, t.last_seq, {busy_check} FROM targets t WHERE t.target IN ({})",
                    placeholders(counts.len())
                );
                let mut next = std::collections::HashMap::<String, i64>::new();
                let mut busy = std::collections::HashSet::<String>::new();
                for row in bind_targets(text).fetch_all(&mut *tx).await? {
                    let (t, last, has_unfinished): (String, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                    let first = last - counts.get(&t).copied().unwrap_or(0) + 1;
                    if has_unfinished != 0 {
                        busy.insert(t.clone());
                    }
                    next.insert(t, first);
                }
                items
                    .iter()
                    .map(|w| {
                        let t = target(w);
                        let seq = next.get_mut(&t).ok_or_else(|| {
                            sqlx::Error::Protocol(format!("no targets row for {t:?} after writing it"))
                        })?;
                        let this = *seq;
                        *seq += 1;
                        // Whatever it does, a later insert of the target is
                        // behind it (marked busy even when it only queues).
                        let idle = busy.insert(t);
                        let begins = wants_start(w) && idle;
                        Ok((begins, Some(this)))
                    })
                    .collect()
            }

            /// Inserts actions and their steps; returns their outcomes
            /// ([`Outcome::Inserted`], or [`Outcome::Behind`] for one that
            /// asked to start but found its target busy), in order, and the
            /// rows written. [`Write::inserted`] is the same in memory.
            async fn insert_rows(
                tx: &mut $conn,
                items: &[&Write],
                shared: bool,
                returning: bool,
            ) -> Result<(Vec<Outcome>, u64), sqlx::Error> {
                // (starts, seq) of each; one server orders its targets in memory.
                let plan = if shared {
                    sequence(tx, items).await?
                } else {
                    items.iter().map(|w| (wants_start(w), None)).collect()
                };
                // The inserting server holds it from epoch 1; nobody holds
                // an action queued where several servers share the database.
                const ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
                const INSERT: &str = "INSERT INTO actions (kind, target, params, status, bundle, idempotency_key, \
                                      submitted_by, request_hash, owner, revision, created_at, started_at, lease_expires_at, current_step, epoch, seq) VALUES ";
                let bind = |q: Q, w: &Write, (begun, seq): (bool, Option<i64>)| match w {
                    Write::Insert { new, bundle, request_hash, owner, steps, at, start, .. } => {
                        // One that asked to start but is behind another: nobody's.
                        let owner = owner.as_ref().filter(|_| begun || !wants_start(w));
                        q.bind(&new.kind)
                            .bind(&new.target)
                            .bind(serde_json::to_string(&new.params).expect("a JSON map serializes"))
                            .bind(if begun { "running" } else { "queued" })
                            .bind(bundle)
                            .bind(&new.idempotency_key)
                            .bind(&new.submitted_by)
                            .bind(request_hash)
                            .bind(owner)
                            .bind(i64::from(begun))
                            .bind(at)
                            .bind(begun.then_some(*at))
                            .bind(start.filter(|_| begun))
                            .bind(steps.first().filter(|_| begun).map(|(name, _)| name.clone()))
                            .bind(i64::from(owner.is_some()))
                            .bind(seq)
                    }
                    _ => unreachable!("only inserts are inserted"),
                };
                let mut ids = Vec::with_capacity(items.len());
                if returning {
                    let mut from = 0;
                    for chunk in pow2_chunks(items, 128) {
                        let mut q = sqlx::query(sqlx::AssertSqlSafe(format!("{INSERT}{} RETURNING id", rows(ROW, chunk.len()))));
                        for (w, p) in chunk.iter().zip(&plan[from..]) {
                            q = bind(q, w, *p);
                        }
                        from += chunk.len();
                        let mut got: Vec<ActionId> =
                            q.fetch_all(&mut *tx).await?.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
                        // Rows are inserted in order, so ids rise with them.
                        got.sort_unstable();
                        if got.len() != chunk.len() {
                            return Err(sqlx::Error::Protocol(format!(
                                "inserted {} actions but {} ids came back",
                                chunk.len(),
                                got.len()
                            )));
                        }
                        ids.extend(got);
                    }
                } else {
                    for (w, p) in items.iter().zip(&plan) {
                        let q = bind(sqlx::query(sqlx::AssertSqlSafe(format!("{INSERT}{ROW}"))), w, *p);
                        ids.push(q.execute(&mut *tx).await?.$last_id() as ActionId);
                    }
                }
                // (action, seq, name, step, started, node): the first step of
                // an action that begins as it is inserted is started (on its
                // node, if it was placed on one).
                type Row<'a> = (ActionId, usize, &'a String, &'a String, Option<Timestamp>, Option<&'a String>);
                let mut steps: Vec<Row<'_>> = Vec::new();
                for ((w, &id), &(begun, _)) in items.iter().zip(&ids).zip(&plan) {
                    if let Write::Insert { steps: s, at, node, .. } = w {
                        steps.extend(s.iter().enumerate().map(|(seq, (name, step))| {
                            let first = begun && seq == 0;
                            (id, seq, name, step, first.then_some(*at), node.as_ref().filter(|_| first))
                        }));
                    }
                }
                let mut written = ids.len() as u64;
                for chunk in step_chunks(&steps) {
                    let text = format!(
                        "INSERT INTO action_steps (action_id, seq, name, step, status, attempt, started_at, node) VALUES {}",
                        rows("(?, ?, ?, ?, ?, ?, ?, ?)", chunk.len())
                    );
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                    for (id, seq, name, step, started, node) in chunk {
                        q = q
                            .bind(id)
                            .bind(*seq as i64)
                            .bind(*name)
                            .bind(*step)
                            .bind(if started.is_some() { "running" } else { "pending" })
                            .bind(i64::from(started.is_some()))
                            .bind(*started)
                            .bind(*node);
                    }
                    written += q.execute(&mut *tx).await?.rows_affected();
                }
                let outcomes = items
                    .iter()
                    .zip(ids)
                    .zip(&plan)
                    .map(|((w, id), &(begun, _))| {
                        if wants_start(w) && !begun { Outcome::Behind(id) } else { Outcome::Inserted(id) }
                    })
                    .collect();
                Ok((outcomes, written))
            }

            /// Runs `spec` over `items` in chunks, each padded to a power of
            /// two rows (repeating the last, which changes nothing) so few
            /// distinct statements are prepared.
            async fn case_update(tx: &mut $conn, spec: &CaseUpdate, items: &[&Write]) -> Result<u64, sqlx::Error> {
                fn bind(q: Q, arg: &Arg<'_>) -> Q {
                    match arg {
                        Arg::Int(v) => q.bind(*v),
                        Arg::Text(v) => q.bind(*v),
                        Arg::OptText(v) => q.bind(*v),
                        Arg::Time(v) => q.bind(*v),
                    }
                }
                let mut rows = 0;
                for chunk in items.chunks(MAX_ROWS) {
                    let n = chunk.len().next_power_of_two();
                    let values: Vec<(ActionId, Vec<Arg<'_>>)> = (0..n)
                        .map(|i| (spec.row)(chunk[i.min(chunk.len() - 1)]))
                        .collect();
                    debug_assert!(values.iter().all(|(_, args)| {
                        args.len() == spec.columns.len() + usize::from(spec.matching.is_some())
                    }));
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(spec.text(n)));
                    for c in 0..spec.columns.len() {
                        for (key, args) in &values {
                            q = bind(q.bind(key), &args[c]);
                        }
                    }
                    for (key, args) in &values {
                        q = q.bind(key);
                        if spec.matching.is_some() {
                            q = bind(q, &args[spec.columns.len()]);
                        }
                    }
                    rows += q.execute(&mut *tx).await?.rows_affected();
                }
                Ok(rows)
            }

            async fn apply_one(tx: &mut $conn, w: &Write, shared: bool, returning: bool) -> Result<Outcome, sqlx::Error> {
                let rows = match w {
                    Write::Insert { new, request_hash, .. } => {
                        if let Some(key) = &new.idempotency_key {
                            let found = sqlx::query("SELECT id, request_hash FROM actions WHERE idempotency_key = ?")
                                .bind(key)
                                .fetch_optional(&mut *tx)
                                .await?;
                            if let Some(row) = found {
                                let hash: String = row.try_get(1)?;
                                return Ok(if hash == *request_hash {
                                    Outcome::Existing(row.try_get(0)?)
                                } else {
                                    Outcome::Conflict
                                });
                            }
                        }
                        let (outcomes, _) = insert_rows(tx, &[w], shared, returning).await?;
                        return Ok(outcomes[0]);
                    }
                    // These always join a segment (an empty one takes any of them).
                    Write::Start { .. } | Write::StepStarted { .. } | Write::StepSucceeded { .. } => {
                        unreachable!("{w:?} is committed with its segment")
                    }
                    Write::StepAttemptFailed { id, seq, attempt, started_at, node, error, at } => {
                        let a = sqlx::query(
                            // REPLACE (the same in both databases): writing an
                            // attempt again, after a commit whose answer was
                            // lost, is harmless.
                            "REPLACE INTO action_step_attempts (action_id, seq, attempt, started_at, finished_at, node, error) \
                             VALUES (?, ?, ?, ?, ?, ?, ?)",
                        )
                        .bind(id)
                        .bind(*seq as i64)
                        .bind(*attempt as i64)
                        .bind(started_at)
                        .bind(at)
                        .bind(node)
                        .bind(error)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        let b = sqlx::query("UPDATE action_steps SET error = ? WHERE action_id = ? AND seq = ?")
                            .bind(error)
                            .bind(id)
                            .bind(*seq as i64)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        a + b + bump(tx, *id).await?
                    }
                    Write::StepWaiting { id, seq, name, waiting_for } => {
                        let a = sqlx::query(
                            "UPDATE action_steps SET status = 'waiting', waiting_for = ? WHERE action_id = ? AND seq = ?",
                        )
                        .bind(waiting_for)
                        .bind(id)
                        .bind(*seq as i64)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        let b = sqlx::query(
                            "UPDATE actions SET current_step = ?, revision = revision + 1 WHERE id = ? AND status = 'running'",
                        )
                        .bind(name)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        a + b
                    }
                    Write::StepLog { id, seq, attempt, log, at } => {
                        // REPLACE, like an attempt's row: safe to repeat.
                        sqlx::query("REPLACE INTO step_logs (action_id, seq, attempt, log, logged_at) VALUES (?, ?, ?, ?, ?)")
                            .bind(id)
                            .bind(*seq as i64)
                            .bind(*attempt as i64)
                            .bind(log)
                            .bind(at)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected()
                    }
                    Write::StepEnded { id, seq, status, error, at } => {
                        let a = sqlx::query(
                            "UPDATE action_steps SET status = ?, error = ?, finished_at = ?, waiting_for = NULL WHERE action_id = ? AND seq = ?",
                        )
                        .bind(status.as_str())
                        .bind(error)
                        .bind(at)
                        .bind(id)
                        .bind(*seq as i64)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        a
                    }
                    Write::Finish { id, status, error, at, .. } => {
                        let a = sqlx::query(
                            "UPDATE actions SET status = ?, error = ?, finished_at = ?, owner = NULL, lease_expires_at = NULL, \
                             revision = revision + 1 WHERE id = ?",
                        )
                        .bind(status.as_str())
                        .bind(error)
                        .bind(at)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        // A succeeded action has no pending steps left to skip.
                        if *status == ActionStatus::Succeeded { a } else { a + skip_pending(tx, *id).await? }
                    }
                    Write::RequestCancel { id, at } => {
                        sqlx::query(
                            "UPDATE actions SET cancel_requested_at = COALESCE(cancel_requested_at, ?), revision = revision + 1 \
                             WHERE id = ? AND status IN ('queued', 'running')",
                        )
                        .bind(at)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                    }
                    Write::CancelQueued { id, at } => {
                        let a = sqlx::query(
                            "UPDATE actions SET status = 'cancelled', error = 'cancelled before it started', finished_at = ?, \
                             owner = NULL, lease_expires_at = NULL, revision = revision + 1 WHERE id = ? AND status = 'queued'",
                        )
                        .bind(at)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        if a == 0 {
                            return Ok(Outcome::Done { rows: 0 });
                        }
                        a + skip_pending(tx, *id).await?
                    }
                    Write::Claim { id, owner, epoch, lease_until } => {
                        sqlx::query(
                            "UPDATE actions SET owner = ?, epoch = epoch + 1, lease_expires_at = ?, revision = revision + 1 \
                             WHERE id = ? AND epoch = ? AND status IN ('queued', 'running') AND (owner IS NULL OR owner = ?)",
                        )
                        .bind(owner)
                        .bind(lease_until)
                        .bind(id)
                        .bind(epoch)
                        .bind(owner)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                    }
                    Write::InsertBundle(b, content) => {
                        let rows = sqlx::query(
                            "INSERT INTO bundles (hash, name, version, abi, size, signer, signature, content, created_at, activated_at) \
                             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        )
                        .bind(&b.hash)
                        .bind(&b.name)
                        .bind(&b.version)
                        .bind(b.abi as i64)
                        .bind(b.size as i64)
                        .bind(&b.signer)
                        .bind(&b.signature)
                        .bind(content.to_vec())
                        .bind(b.created_at)
                        .bind(b.activated_at)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        point_at(tx, &b.hash).await?;
                        rows
                    }
                    Write::ActivateBundle { hash, at } => {
                        let rows = sqlx::query("UPDATE bundles SET activated_at = ? WHERE hash = ?")
                            .bind(at)
                            .bind(hash)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        point_at(tx, hash).await?;
                        rows
                    }
                    Write::TrustKey { key_id, public_key, at } => {
                        sqlx::query("INSERT INTO trusted_keys (key_id, public_key, added_at) VALUES (?, ?, ?)")
                            .bind(key_id)
                            .bind(public_key)
                            .bind(at)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected()
                    }
                    Write::RevokeKey { key_id, public_key, at } => {
                        let known = sqlx::query("SELECT key_id FROM trusted_keys WHERE key_id = ?")
                            .bind(key_id)
                            .fetch_optional(&mut *tx)
                            .await?
                            .is_some();
                        if known {
                            sqlx::query("UPDATE trusted_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?")
                                .bind(at)
                                .bind(key_id)
                                .execute(&mut *tx)
                                .await?
                                .rows_affected()
                        } else {
                            sqlx::query(
                                "INSERT INTO trusted_keys (key_id, public_key, added_at, revoked_at) VALUES (?, ?, ?, ?)",
                            )
                            .bind(key_id)
                            .bind(public_key)
                            .bind(at)
                            .bind(at)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected()
                        }
                    }
                    Write::CreateToken(..)
                    | Write::PutNode(..)
                    | Write::PutNodeResult { .. }
                    | Write::Guard { .. }
                    | Write::RevokeToken { .. }
                    | Write::UseJoinToken { .. }
                    | Write::Audit(..)
                    | Write::Bump(..)
                    | Write::SetSecret(..)
                    | Write::DeleteSecret { .. } => {
                        super::super::access::$module::apply(tx, w).await?
                    }
                    Write::PutTargetRecord { .. } | Write::DeleteTargetRecord { .. } => {
                        super::super::records::$module::apply(tx, w).await?
                    }
                };
                Ok(Outcome::Done { rows })
            }

            /// Makes the stored bundle `hash` its name's active version in
            /// `active_bundles` (delete and insert: the same SQL on both
            /// databases).
            async fn point_at(tx: &mut $conn, hash: &str) -> Result<(), sqlx::Error> {
                sqlx::query("DELETE FROM active_bundles WHERE name = (SELECT name FROM bundles WHERE hash = ?)")
                    .bind(hash)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO active_bundles (name, hash) SELECT name, hash FROM bundles WHERE hash = ?")
                    .bind(hash)
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            }

            async fn bump(tx: &mut $conn, id: ActionId) -> Result<u64, sqlx::Error> {
                Ok(sqlx::query("UPDATE actions SET revision = revision + 1 WHERE id = ?")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected())
            }

            /// Steps that never ran (pending, or waiting for a node) are skipped.
            async fn skip_pending(tx: &mut $conn, id: ActionId) -> Result<u64, sqlx::Error> {
                Ok(sqlx::query(
                    "UPDATE action_steps SET status = 'skipped', waiting_for = NULL \
                     WHERE action_id = ? AND status IN ('pending', 'waiting')",
                )
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected())
            }

            fn action_row(row: &DbRow) -> Result<Action, sqlx::Error> {
                Ok(Action {
                    id: row.try_get("id")?,
                    kind: row.try_get("kind")?,
                    target: row.try_get("target")?,
                    params: parse_params(&row.try_get::<String, _>("params")?)?,
                    status: parse::<ActionStatus>(&row.try_get::<String, _>("status")?)?,
                    bundle: row.try_get("bundle")?,
                    current_step: row.try_get("current_step")?,
                    error: row.try_get("error")?,
                    idempotency_key: row.try_get("idempotency_key")?,
                    submitted_by: row.try_get("submitted_by")?,
                    owner: row.try_get("owner")?,
                    epoch: row.try_get("epoch")?,
                    revision: row.try_get("revision")?,
                    created_at: row.try_get::<DateTime<Utc>, _>("created_at")?,
                    started_at: row.try_get("started_at")?,
                    finished_at: row.try_get("finished_at")?,
                    cancel_requested_at: row.try_get("cancel_requested_at")?,
                    waiting_for: None,
                    steps: Vec::new(),
                })
            }

            /// A step from `row`, whose columns are named as in `cols`.
            fn step_row(row: &DbRow, cols: &StepColumns) -> Result<StepRecord, sqlx::Error> {
                let [seq, name, step, status, attempt, started_at, finished_at, output, error, waiting_for, node] = cols;
                let output: Option<String> = row.try_get(*output)?;
                Ok(StepRecord {
                    seq: row.try_get::<i64, _>(*seq)? as u32,
                    name: row.try_get(*name)?,
                    step: row.try_get(*step)?,
                    status: parse::<StepStatus>(&row.try_get::<String, _>(*status)?)?,
                    attempt: row.try_get::<i64, _>(*attempt)? as u32,
                    started_at: row.try_get(*started_at)?,
                    finished_at: row.try_get(*finished_at)?,
                    output: output.map(|o| serde_json::from_str(&o).unwrap_or(Value::String(o))),
                    error: row.try_get(*error)?,
                    waiting_for: row.try_get(*waiting_for)?,
                    node: row.try_get(*node)?,
                })
            }

            async fn with_steps(pool: &$pool, mut action: Action) -> Result<Action, sqlx::Error> {
                let rows = sqlx::query(
                    "SELECT seq, name, step, status, attempt, started_at, finished_at, output, error, waiting_for, node \
                     FROM action_steps WHERE action_id = ? ORDER BY seq",
                )
                .bind(action.id)
                .fetch_all(pool)
                .await?;
                action.steps = rows.iter().map(|r| step_row(r, &STEP_COLUMNS)).collect::<Result<_, _>>()?;
                Ok(action)
            }

            /// One action with its steps, in one statement.
            pub(crate) async fn action(pool: &$pool, id: ActionId) -> Result<Option<Action>, sqlx::Error> {
                const Q: &str = "SELECT a.id, a.kind, a.target, a.params, a.status, a.bundle, a.current_step, a.error, \
                     a.idempotency_key, a.submitted_by, a.owner, a.epoch, a.revision, a.created_at, a.started_at, a.finished_at, \
                     a.cancel_requested_at, s.seq AS s_seq, s.name AS s_name, s.step AS s_step, s.status AS s_status, s.attempt AS s_attempt, \
                     s.started_at AS s_started_at, s.finished_at AS s_finished_at, s.output AS s_output, s.error AS s_error, \
                     s.waiting_for AS s_waiting_for, s.node AS s_node \
                     FROM actions a LEFT JOIN action_steps s ON s.action_id = a.id WHERE a.id = ?";
                let rows = sqlx::query(Q).bind(id).fetch_all(pool).await?;
                let Some(first) = rows.first() else {
                    return Ok(None);
                };
                let mut action = action_row(first)?;
                for row in &rows {
                    if row.try_get::<Option<i64>, _>("s_seq")?.is_some() {
                        action.steps.push(step_row(row, &JOINED_STEP_COLUMNS)?);
                    }
                }
                // Sorted here: an ORDER BY makes MariaDB sort the joined text
                // columns in an on-disk temporary table.
                action.steps.sort_by_key(|s| s.seq);
                Ok(Some(action))
            }

            pub(crate) async fn logs(pool: &$pool, id: ActionId) -> Result<Vec<crate::model::StepLog>, sqlx::Error> {
                let rows = sqlx::query(
                    "SELECT seq, attempt, log, logged_at FROM step_logs WHERE action_id = ? ORDER BY seq, attempt",
                )
                .bind(id)
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(crate::model::StepLog {
                            seq: r.try_get::<i64, _>("seq")? as u32,
                            step: String::new(),
                            attempt: r.try_get::<i64, _>("attempt")? as u32,
                            log: r.try_get("log")?,
                            logged_at: r.try_get("logged_at")?,
                        })
                    })
                    .collect()
            }

            pub(crate) async fn failed_attempts(pool: &$pool, id: ActionId) -> Result<Vec<crate::model::FailedAttempt>, sqlx::Error> {
                let rows = sqlx::query(
                    "SELECT seq, attempt, started_at, finished_at, node, error FROM action_step_attempts \
                     WHERE action_id = ? ORDER BY seq, attempt",
                )
                .bind(id)
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(crate::model::FailedAttempt {
                            seq: r.try_get::<i64, _>("seq")? as u32,
                            attempt: r.try_get::<i64, _>("attempt")? as u32,
                            started_at: r.try_get("started_at")?,
                            finished_at: r.try_get("finished_at")?,
                            node: r.try_get("node")?,
                            error: r.try_get("error")?,
                        })
                    })
                    .collect()
            }

            pub(crate) async fn list(pool: &$pool, f: &ActionFilter) -> Result<Vec<Action>, sqlx::Error> {
                // One text for every filter: a filter left out binds NULL
                // (or no statuses), which its clause lets through. What a
                // running action's step waits for is looked up by key for
                // the running rows only.
                const Q: &str = concat!(
                    "SELECT ", action_columns!(), ", CASE WHEN status = 'running' THEN \
                     (SELECT MAX(s.waiting_for) FROM action_steps s WHERE s.action_id = actions.id AND s.status = 'waiting') \
                     END AS waiting_for FROM actions \
                     WHERE (? IS NULL OR target = ?) \
                     AND (? = 0 OR status IN (?, ?, ?, ?, ?)) \
                     AND (? IS NULL OR kind = ?) AND (? IS NULL OR submitted_by = ?) \
                     AND (? IS NULL OR created_at >= ?) AND (? IS NULL OR created_at <= ?) \
                     AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?"
                );
                const _: () = assert!(ActionStatus::ALL.len() == 5, "one placeholder per status");
                let mut q = sqlx::query(Q)
                    .bind(&f.target)
                    .bind(&f.target)
                    .bind(f.statuses.len() as i64);
                for i in 0..ActionStatus::ALL.len() {
                    q = q.bind(f.statuses.get(i).map(|s| s.as_str()));
                }
                let rows = q
                    .bind(&f.kind)
                    .bind(&f.kind)
                    .bind(&f.submitted_by)
                    .bind(&f.submitted_by)
                    .bind(f.since)
                    .bind(f.since)
                    .bind(f.until)
                    .bind(f.until)
                    .bind(f.before)
                    .bind(f.before)
                    .bind(f.limit as i64)
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        let mut action = action_row(row)?;
                        action.waiting_for = row.try_get("waiting_for")?;
                        Ok(action)
                    })
                    .collect()
            }

            pub(crate) async fn bundles(pool: &$pool) -> Result<Vec<BundleRow>, sqlx::Error> {
                let rows = sqlx::query(
                    "SELECT hash, name, version, abi, size, signer, signature, created_at, activated_at FROM bundles ORDER BY created_at",
                )
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(BundleRow {
                            hash: r.try_get("hash")?,
                            name: r.try_get("name")?,
                            version: r.try_get("version")?,
                            abi: r.try_get::<i64, _>("abi")? as u32,
                            size: r.try_get::<i64, _>("size")? as u64,
                            signer: r.try_get("signer")?,
                            signature: r.try_get("signature")?,
                            created_at: r.try_get("created_at")?,
                            activated_at: r.try_get("activated_at")?,
                        })
                    })
                    .collect()
            }

            pub(crate) async fn bundle_content(pool: &$pool, hash: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
                let row = sqlx::query("SELECT content FROM bundles WHERE hash = ?").bind(hash).fetch_optional(pool).await?;
                row.map(|r| r.try_get::<Vec<u8>, _>(0)).transpose()
            }

            pub(crate) async fn keys(pool: &$pool) -> Result<Vec<KeyRow>, sqlx::Error> {
                let rows = sqlx::query("SELECT key_id, public_key, added_at, revoked_at FROM trusted_keys ORDER BY added_at")
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(KeyRow {
                            key_id: r.try_get("key_id")?,
                            public_key: r.try_get("public_key")?,
                            added_at: r.try_get("added_at")?,
                            revoked_at: r.try_get("revoked_at")?,
                        })
                    })
                    .collect()
            }

            pub(crate) async fn in_flight_by_bundle(
                pool: &$pool,
            ) -> Result<std::collections::HashMap<String, i64>, sqlx::Error> {
                let rows = sqlx::query(
                    "SELECT bundle, COUNT(*) AS n FROM actions WHERE status IN ('queued', 'running') GROUP BY bundle",
                )
                .fetch_all(pool)
                .await?;
                rows.iter().map(|r| Ok((r.try_get("bundle")?, r.try_get("n")?))).collect()
            }

            /// Unfinished actions owned by nobody, or by `mine` (this
            /// server's earlier self), oldest first, at most `limit`. With
            /// `running_only`, no queued ones (several servers: they are
            /// claimed at their turn, [`heads`]).
            pub(crate) async fn unfinished(
                pool: &$pool,
                mine: Option<&str>,
                limit: i64,
                running_only: bool,
            ) -> Result<Vec<Action>, sqlx::Error> {
                const ALL: &str = select_actions!(
                    " WHERE status IN ('queued', 'running') AND (owner IS NULL OR owner = ?) ORDER BY id LIMIT ?"
                );
                const RUNNING: &str = select_actions!(
                    " WHERE status = 'running' AND (owner IS NULL OR owner = ?) ORDER BY id LIMIT ?"
                );
                let q = if running_only { RUNNING } else { ALL };
                let rows = sqlx::query(q).bind(mine).bind(limit).fetch_all(pool).await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in &rows {
                    out.push(with_steps(pool, action_row(row)?).await?);
                }
                Ok(out)
            }

            /// Which of `targets` have a queued action (an index probe each).
            pub(crate) async fn queued_targets(pool: &$pool, targets: &[String]) -> Result<Vec<String>, sqlx::Error> {
                let text = format!(
                    "SELECT DISTINCT target FROM actions WHERE status = 'queued' AND target IN ({})",
                    placeholders(targets.len())
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                for t in targets {
                    q = q.bind(t.clone());
                }
                q.fetch_all(pool).await?.iter().map(|r| r.try_get(0)).collect()
            }

            /// Queued actions whose turn has come: each its target's head
            /// (lowest `seq` queued) with none of the target's actions
            /// running, owned by nobody; of `targets` only, if given;
            /// oldest first, at most `limit`. Several servers only.
            pub(crate) async fn heads(
                pool: &$pool,
                targets: Option<&[String]>,
                limit: i64,
            ) -> Result<Vec<Action>, sqlx::Error> {
                // One index probe per target with queued work (a loose scan
                // of `actions_ready`), however many are queued behind.
                let only = targets.map_or(String::new(), |t| format!(" AND target IN ({})", placeholders(t.len())));
                let text = format!(
                    "SELECT {} FROM actions a JOIN \
                       (SELECT target AS h_target, MIN(seq) AS h_seq FROM actions WHERE status = 'queued'{only} GROUP BY target) h \
                       ON a.status = 'queued' AND a.target = h.h_target AND a.seq = h.h_seq \
                     WHERE a.owner IS NULL \
                       AND NOT EXISTS (SELECT 1 FROM actions r WHERE r.status = 'running' AND r.target = h.h_target) \
                     ORDER BY a.id LIMIT ?",
                    action_columns!().split(", ").map(|c| format!("a.{c}")).collect::<Vec<_>>().join(", ")
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                for t in targets.unwrap_or_default() {
                    q = q.bind(t.clone());
                }
                let rows = q.bind(limit).fetch_all(pool).await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in &rows {
                    out.push(with_steps(pool, action_row(row)?).await?);
                }
                Ok(out)
            }
        }
    };
}

sql_backend!(
    sqlite,
    sqlx::Sqlite,
    sqlx::SqlitePool,
    sqlx::SqliteConnection,
    last_insert_rowid
);
sql_backend!(
    mysql,
    sqlx::MySql,
    sqlx::MySqlPool,
    sqlx::MySqlConnection,
    last_insert_id
);
