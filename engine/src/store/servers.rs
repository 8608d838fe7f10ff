//! The `servers` table: each `troupe serve` on the database, its lease, and
//! the hand-over of a lost server's actions. On MySQL/MariaDB every time
//! that decides ownership is the database's (`NOW(6)`), so no server's
//! clock matters; SQLite serves one server and binds its clock.

use std::time::Duration;

use sqlx::Row;

use super::writer::retrying;
use super::{Pool, Store};
use crate::model::{self, Timestamp};
use crate::{Error, Result};

/// A server as it registers.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub id: String,
    pub address: Option<String>,
    pub host: String,
    pub data_dir: String,
    pub version: String,
}

/// A server as listed.
#[derive(Debug, Clone)]
pub struct ServerRow {
    pub id: String,
    pub incarnation: i64,
    /// `live`, `stopped` or `lost`.
    pub state: String,
    pub address: Option<String>,
    pub host: String,
    pub data_dir: String,
    pub version: String,
    pub running: i64,
    pub nodes_connected: i64,
    /// MySQL/MariaDB: the database node it writes through (`host:port`),
    /// as of its last renewal.
    pub db_node: Option<String>,
    pub started_at: Timestamp,
    pub heartbeat_at: Timestamp,
    pub lease_expires_at: Timestamp,
    pub stopped_at: Option<Timestamp>,
    /// Live, but its lease ran out: it has gone silent.
    pub silent: bool,
}

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// Another server declared this one lost (its actions were handed on),
    /// or another process took its id: this incarnation holds nothing.
    Lost,
}

const COLUMNS: &str = "id, incarnation, state, address, host, data_dir, version, running, nodes_connected, db_node, \
                       started_at, heartbeat_at, lease_expires_at, stopped_at";

/// Hands on the unfinished actions whose owner is no live server.
const ORPHANS: &str = "UPDATE actions SET owner = NULL, epoch = epoch + 1, revision = revision + 1 \
                       WHERE status IN ('queued', 'running') AND owner IS NOT NULL \
                       AND owner NOT IN (SELECT id FROM servers WHERE state = 'live')";

fn micros(d: Duration) -> i64 {
    d.as_micros().min(i64::MAX as u128) as i64
}

macro_rules! row {
    ($r:expr, $silent:expr) => {
        ServerRow {
            id: $r.try_get("id")?,
            incarnation: $r.try_get("incarnation")?,
            state: $r.try_get("state")?,
            address: $r.try_get("address")?,
            host: $r.try_get("host")?,
            data_dir: $r.try_get("data_dir")?,
            version: $r.try_get("version")?,
            running: $r.try_get("running")?,
            nodes_connected: $r.try_get("nodes_connected")?,
            db_node: $r.try_get("db_node")?,
            started_at: $r.try_get("started_at")?,
            heartbeat_at: $r.try_get("heartbeat_at")?,
            lease_expires_at: $r.try_get("lease_expires_at")?,
            stopped_at: $r.try_get("stopped_at")?,
            silent: $silent,
        }
    };
}

impl Store {
    /// Registers this server as live for `lease`, as a new incarnation of
    /// its id; returns the incarnation. Refused when another live server
    /// holds the id (one whose lease has not run out, somewhere other than
    /// this host and data directory, which this process holds locked), and,
    /// on SQLite, when any other server is live on the database.
    ///
    /// Every write here runs again while the database rolls it back for a
    /// conflict ([`super::writer::retrying`]).
    pub async fn register_server(&self, me: &ServerSpec, lease: Duration) -> Result<i64> {
        retrying(&self.stats, || async move {
            self.register_server_once(me, lease).await
        })
        .await
    }

    async fn register_server_once(&self, me: &ServerSpec, lease: Duration) -> Result<i64> {
        let now = model::now();
        let others = self.servers().await?;
        for other in others.iter().filter(|s| s.state == "live" && !s.silent) {
            let same_place = other.host == me.host && other.data_dir == me.data_dir;
            if other.id == me.id && !same_place {
                return Err(Error::ServerConflict(format!(
                    "server id {:?} is held by a live server on host {:?} (data dir {}), seen {}; \
                     give this server another --server-id, or stop that one and start this one {} s later",
                    me.id,
                    other.host,
                    other.data_dir,
                    other.heartbeat_at.format("%H:%M:%S UTC"),
                    lease.as_secs().max(1)
                )));
            }
            if self.backend == "sqlite" && other.id != me.id {
                return Err(Error::ServerConflict(format!(
                    "server {:?} on host {:?} (data dir {}) already serves this SQLite database, which takes one \
                     server at a time; stop it first, or run several servers on MySQL/MariaDB (--db mysql://…)",
                    other.id, other.host, other.data_dir
                )));
            }
        }
        if let Pool::Sqlite(p) = &self.read {
            // One server at a time: any other one found is gone.
            sqlx::query("UPDATE servers SET state = 'lost', stopped_at = ? WHERE id <> ? AND state = 'live'")
                .bind(now)
                .bind(&me.id)
                .execute(p)
                .await?;
        }
        let known = others.iter().find(|s| s.id == me.id);
        let incarnation = known.map_or(1, |s| s.incarnation + 1);
        let written = match &self.read {
            Pool::MySql(p) => {
                let q = if known.is_some() {
                    "UPDATE servers SET incarnation = ?, state = 'live', address = ?, host = ?, data_dir = ?, version = ?, \
                     running = 0, nodes_connected = 0, started_at = NOW(6), heartbeat_at = NOW(6), \
                     lease_expires_at = NOW(6) + INTERVAL ? MICROSECOND, stopped_at = NULL, db_node = ? \
                     WHERE id = ? AND incarnation = ?"
                } else {
                    "INSERT IGNORE INTO servers (incarnation, state, address, host, data_dir, version, started_at, heartbeat_at, \
                     lease_expires_at, db_node, id) VALUES (?, 'live', ?, ?, ?, ?, NOW(6), NOW(6), NOW(6) + INTERVAL ? MICROSECOND, ?, ?)"
                };
                let mut q = sqlx::query(q)
                    .bind(incarnation)
                    .bind(&me.address)
                    .bind(&me.host)
                    .bind(&me.data_dir)
                    .bind(&me.version)
                    .bind(micros(lease))
                    .bind(self.writes_through())
                    .bind(&me.id);
                if known.is_some() {
                    q = q.bind(incarnation - 1);
                }
                q.execute(p).await?.rows_affected()
            }
            Pool::Sqlite(p) => {
                let q = if known.is_some() {
                    "UPDATE servers SET incarnation = ?, state = 'live', address = ?, host = ?, data_dir = ?, version = ?, \
                     running = 0, nodes_connected = 0, started_at = ?, heartbeat_at = ?, lease_expires_at = ?, stopped_at = NULL \
                     WHERE id = ? AND incarnation = ?"
                } else {
                    "INSERT OR IGNORE INTO servers (incarnation, state, address, host, data_dir, version, started_at, heartbeat_at, \
                     lease_expires_at, id) VALUES (?, 'live', ?, ?, ?, ?, ?, ?, ?, ?)"
                };
                let mut q = sqlx::query(q)
                    .bind(incarnation)
                    .bind(&me.address)
                    .bind(&me.host)
                    .bind(&me.data_dir)
                    .bind(&me.version)
                    .bind(now)
                    .bind(now)
                    .bind(now + lease)
                    .bind(&me.id);
                if known.is_some() {
                    q = q.bind(incarnation - 1);
                }
                q.execute(p).await?.rows_affected()
            }
        };
        if written != 1 {
            return Err(Error::ServerConflict(format!(
                "another server registered as {:?} at the same moment; give each server its own --server-id",
                me.id
            )));
        }
        Ok(incarnation)
    }

    /// Renews this server's lease, and what it reports of itself, unless it
    /// was declared lost or another process took its id.
    pub async fn renew_server(
        &self,
        id: &str,
        incarnation: i64,
        lease: Duration,
        running: usize,
        nodes: usize,
    ) -> Result<Renewal> {
        retrying(&self.stats, || async move {
            self.renew_server_once(id, incarnation, lease, running, nodes)
                .await
        })
        .await
    }

    async fn renew_server_once(
        &self,
        id: &str,
        incarnation: i64,
        lease: Duration,
        running: usize,
        nodes: usize,
    ) -> Result<Renewal> {
        let rows = match &self.read {
            Pool::MySql(p) => sqlx::query(
                "UPDATE servers SET heartbeat_at = NOW(6), lease_expires_at = NOW(6) + INTERVAL ? MICROSECOND, \
                 running = ?, nodes_connected = ?, db_node = ? WHERE id = ? AND incarnation = ? AND state = 'live'",
            )
            .bind(micros(lease))
            .bind(running as i64)
            .bind(nodes as i64)
            .bind(self.writes_through())
            .bind(id)
            .bind(incarnation)
            .execute(p)
            .await?
            .rows_affected(),
            Pool::Sqlite(p) => {
                let now = model::now();
                sqlx::query(
                    "UPDATE servers SET heartbeat_at = ?, lease_expires_at = ?, running = ?, nodes_connected = ? \
                     WHERE id = ? AND incarnation = ? AND state = 'live'",
                )
                .bind(now)
                .bind(now + lease)
                .bind(running as i64)
                .bind(nodes as i64)
                .bind(id)
                .bind(incarnation)
                .execute(p)
                .await?
                .rows_affected()
            }
        };
        Ok(if rows == 1 {
            Renewal::Renewed
        } else {
            Renewal::Lost
        })
    }

    /// Declares every live server whose lease ran out more than `margin`
    /// ago lost, and hands its unfinished actions on (owner cleared, epoch
    /// bumped), each in one transaction whose first statement re-checks the
    /// expiry: a server that renewed meanwhile keeps its lease. Also hands
    /// on unfinished actions whose owner is no live server (a crash during
    /// a release; an owner from before servers registered). Returns the
    /// servers declared lost and the actions handed on. MySQL/MariaDB only.
    pub async fn rescue_lost(&self, margin: Duration) -> Result<(Vec<String>, u64)> {
        let p = match &self.read {
            Pool::MySql(p) => p,
            Pool::Sqlite(p) => {
                // One server: every other owner is gone.
                let handed = sqlx::query(ORPHANS).execute(p).await?.rows_affected();
                return Ok((Vec::new(), handed));
            }
        };
        let expired: Vec<(String, i64)> = sqlx::query(
            "SELECT id, incarnation FROM servers WHERE state = 'live' \
             AND lease_expires_at < NOW(6) - INTERVAL ? MICROSECOND",
        )
        .bind(micros(margin))
        .fetch_all(p)
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()?;
        let mut lost = Vec::new();
        let mut handed = 0;
        for (id, incarnation) in expired {
            let id_ref = id.as_str();
            let (declared, actions) = retrying(&self.stats, || async move {
                Self::declare_lost(p, id_ref, incarnation, margin).await
            })
            .await?;
            if declared {
                handed += actions;
                lost.push(id);
            }
        }
        handed += retrying(&self.stats, || async move {
            Ok(sqlx::query(ORPHANS).execute(p).await?.rows_affected())
        })
        .await?;
        // Forget servers that ended an hour ago.
        retrying(&self.stats, || async move {
            sqlx::query(
                "DELETE FROM servers WHERE state <> 'live' AND stopped_at < NOW(6) - INTERVAL 1 HOUR",
            )
            .execute(p)
            .await?;
            Ok(())
        })
        .await?;
        Ok((lost, handed))
    }

    /// Declares server `id` lost if its lease still ran out more than
    /// `margin` ago, and hands its unfinished actions on, in one
    /// transaction: whether it did, and how many actions.
    async fn declare_lost(
        p: &sqlx::MySqlPool,
        id: &str,
        incarnation: i64,
        margin: Duration,
    ) -> Result<(bool, u64)> {
        let mut handed = 0;
        let mut tx = p.begin().await?;
        let declared = sqlx::query(
                "UPDATE servers SET state = 'lost', stopped_at = NOW(6) WHERE id = ? AND incarnation = ? \
                 AND state = 'live' AND lease_expires_at < NOW(6) - INTERVAL ? MICROSECOND",
            )
            .bind(id)
            .bind(incarnation)
            .bind(micros(margin))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if declared == 1 {
            handed += sqlx::query(
                "UPDATE actions SET owner = NULL, epoch = epoch + 1, revision = revision + 1 \
                     WHERE owner = ? AND status IN ('queued', 'running')",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok((declared == 1, handed))
    }

    /// Records the address this incarnation listens at.
    pub async fn set_server_address(
        &self,
        id: &str,
        incarnation: i64,
        address: &str,
    ) -> Result<()> {
        retrying(&self.stats, || async move {
            self.set_server_address_once(id, incarnation, address).await
        })
        .await
    }

    async fn set_server_address_once(
        &self,
        id: &str,
        incarnation: i64,
        address: &str,
    ) -> Result<()> {
        const Q: &str = "UPDATE servers SET address = ? WHERE id = ? AND incarnation = ?";
        match &self.read {
            Pool::MySql(p) => {
                sqlx::query(Q)
                    .bind(address)
                    .bind(id)
                    .bind(incarnation)
                    .execute(p)
                    .await?;
            }
            Pool::Sqlite(p) => {
                sqlx::query(Q)
                    .bind(address)
                    .bind(id)
                    .bind(incarnation)
                    .execute(p)
                    .await?;
            }
        }
        Ok(())
    }

    /// Marks this incarnation stopped and hands its unfinished actions on,
    /// in one transaction; nothing if it was declared lost meanwhile (its
    /// actions were handed on then).
    pub async fn stop_server(&self, id: &str, incarnation: i64) -> Result<u64> {
        retrying(&self.stats, || async move {
            self.stop_server_once(id, incarnation).await
        })
        .await
    }

    async fn stop_server_once(&self, id: &str, incarnation: i64) -> Result<u64> {
        let at = model::now();
        macro_rules! stop {
            ($p:expr, $now:literal, $bind_now:expr) => {{
                let mut tx = $p.begin().await?;
                let mut q = sqlx::query(concat!(
                    "UPDATE servers SET state = 'stopped', stopped_at = ",
                    $now,
                    " WHERE id = ? AND incarnation = ? AND state = 'live'"
                ));
                if $bind_now {
                    q = q.bind(at);
                }
                let stopped = q.bind(id).bind(incarnation).execute(&mut *tx).await?.rows_affected();
                let mut handed = 0;
                if stopped == 1 {
                    handed = sqlx::query(
                        "UPDATE actions SET owner = NULL, epoch = epoch + 1, revision = revision + 1 \
                         WHERE owner = ? AND status IN ('queued', 'running')",
                    )
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                tx.commit().await?;
                handed
            }};
        }
        Ok(match &self.read {
            Pool::MySql(p) => stop!(p, "NOW(6)", false),
            Pool::Sqlite(p) => stop!(p, "?", true),
        })
    }

    /// The unfinished actions `owner` holds that a cancel was asked for
    /// (through any server).
    pub async fn cancels_for(&self, owner: &str) -> Result<Vec<crate::model::ActionId>> {
        const Q: &str = "SELECT id FROM actions WHERE owner = ? AND status IN ('queued', 'running') \
                         AND cancel_requested_at IS NOT NULL";
        Ok(match &self.read {
            Pool::MySql(p) => sqlx::query_scalar(Q).bind(owner).fetch_all(p).await?,
            Pool::Sqlite(p) => sqlx::query_scalar(Q).bind(owner).fetch_all(p).await?,
        })
    }

    /// Every server the database knows, live ones first, each with whether
    /// its lease ran out (by the database's clock).
    pub async fn servers(&self) -> Result<Vec<ServerRow>> {
        let order = " ORDER BY state = 'live' DESC, id";
        let mut out = Vec::new();
        match &self.read {
            Pool::MySql(p) => {
                let q = format!(
                    "SELECT {COLUMNS}, lease_expires_at < NOW(6) AS silent FROM servers{order}"
                );
                for r in sqlx::query(sqlx::AssertSqlSafe(q)).fetch_all(p).await? {
                    let silent: bool = r.try_get::<i64, _>("silent")? != 0;
                    out.push(row!(r, silent));
                }
            }
            Pool::Sqlite(p) => {
                let now = model::now();
                let q = format!("SELECT {COLUMNS} FROM servers{order}");
                for r in sqlx::query(sqlx::AssertSqlSafe(q)).fetch_all(p).await? {
                    let expires: Timestamp = r.try_get("lease_expires_at")?;
                    out.push(row!(r, expires < now));
                }
            }
        }
        Ok(out)
    }
}
