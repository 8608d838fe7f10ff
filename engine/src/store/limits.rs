//! The SQL of `limit_holds` (`crate::schedule::limits`): one row per slot
//! of a concurrency limit held. The primary key `(name, lkey, slot)` is the
//! claim, so no two attempts ever hold one slot and no more than `max` hold
//! one key; a hold is fenced on its action's epoch and its step's attempt,
//! so one its holder can no longer release (a server that died, a release
//! that failed) is stale and the next claimer deletes it.

use super::writer::retrying;
use super::{Pool, Store};
use crate::Result;
use crate::model::{self, ActionId};

/// An attempt's hold on one key of a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hold {
    pub(crate) name: String,
    /// The key as stored: the resolved key, or `sha256:HEX` of a long one.
    pub(crate) key: String,
    pub(crate) action: ActionId,
    pub(crate) epoch: i64,
    pub(crate) seq: u32,
    pub(crate) attempt: u32,
    /// The server claiming it.
    pub(crate) owner: String,
}

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The hold has this slot.
    Held(u32),
    /// Every slot below the max is held by a live attempt.
    Full,
}

/// A hold as `GET /v1/limits` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HoldRow {
    pub name: String,
    pub key: String,
    pub slot: u32,
    pub action_id: ActionId,
    pub seq: u32,
    pub attempt: u32,
    pub owner: String,
    pub since: model::Timestamp,
}

/// A hold stays while its action runs at the hold's epoch and its step has
/// not moved past the hold's attempt (the attempt claims before its start
/// is recorded, so a lower attempt on the step row is its own, to come).
macro_rules! live {
    () => {
        "EXISTS (SELECT 1 FROM actions a JOIN action_steps s ON s.action_id = a.id \
     WHERE a.id = limit_holds.action_id AND a.epoch = limit_holds.epoch AND a.status = 'running' \
     AND s.seq = limit_holds.seq AND (s.attempt < limit_holds.attempt \
     OR (s.attempt = limit_holds.attempt AND s.status IN ('pending', 'waiting', 'running'))))"
    };
}

macro_rules! limits_backend {
    ($module:ident, $pool:ty, $insert_ignore:literal) => {
        pub(super) mod $module {
            use sqlx::Row;

            use super::*;

            pub(crate) async fn claim(p: &$pool, hold: &Hold, max: u32) -> Result<Claim> {
                // Its own holds of an earlier attempt or epoch go first: a
                // retry claims again, and an action taken over is fenced.
                sqlx::query(
                    "DELETE FROM limit_holds WHERE name = ? AND lkey = ? AND action_id = ? \
                     AND NOT (epoch = ? AND seq = ? AND attempt = ?)",
                )
                .bind(&hold.name)
                .bind(&hold.key)
                .bind(hold.action)
                .bind(hold.epoch)
                .bind(hold.seq as i64)
                .bind(hold.attempt as i64)
                .execute(p)
                .await?;
                let stale = sqlx::query(concat!(
                    "DELETE FROM limit_holds WHERE name = ? AND lkey = ? AND NOT ",
                    live!()
                ))
                .bind(&hold.name)
                .bind(&hold.key)
                .execute(p)
                .await?
                .rows_affected();
                if stale > 0 {
                    tracing::info!(limit = %hold.name, key = %hold.key, stale, "released holds whose attempts had ended");
                }
                // Another claimer may take the free slot first: look again.
                for _ in 0..3 {
                    let rows = sqlx::query(
                        "SELECT slot, action_id, epoch, seq, attempt FROM limit_holds WHERE name = ? AND lkey = ?",
                    )
                    .bind(&hold.name)
                    .bind(&hold.key)
                    .fetch_all(p)
                    .await?;
                    let mut taken = Vec::with_capacity(rows.len());
                    for r in &rows {
                        let slot: i64 = r.try_get("slot")?;
                        let mine = r.try_get::<i64, _>("action_id")? == hold.action
                            && r.try_get::<i64, _>("epoch")? == hold.epoch
                            && r.try_get::<i64, _>("seq")? == hold.seq as i64
                            && r.try_get::<i64, _>("attempt")? == hold.attempt as i64;
                        // A try whose answer was lost claimed it already.
                        if mine {
                            return Ok(Claim::Held(slot as u32));
                        }
                        taken.push(slot);
                    }
                    let Some(free) = (0..max as i64).find(|s| !taken.contains(s)) else {
                        return Ok(Claim::Full);
                    };
                    let inserted = sqlx::query(concat!(
                        $insert_ignore,
                        " INTO limit_holds (name, lkey, slot, action_id, epoch, seq, attempt, owner, since) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    ))
                    .bind(&hold.name)
                    .bind(&hold.key)
                    .bind(free)
                    .bind(hold.action)
                    .bind(hold.epoch)
                    .bind(hold.seq as i64)
                    .bind(hold.attempt as i64)
                    .bind(&hold.owner)
                    .bind(model::now())
                    .execute(p)
                    .await?
                    .rows_affected();
                    if inserted == 1 {
                        return Ok(Claim::Held(free as u32));
                    }
                }
                Ok(Claim::Full)
            }

            pub(crate) async fn release(p: &$pool, hold: &Hold, slot: u32) -> Result<u64> {
                Ok(sqlx::query(
                    "DELETE FROM limit_holds WHERE name = ? AND lkey = ? AND slot = ? AND action_id = ? \
                     AND epoch = ? AND seq = ? AND attempt = ?",
                )
                .bind(&hold.name)
                .bind(&hold.key)
                .bind(slot as i64)
                .bind(hold.action)
                .bind(hold.epoch)
                .bind(hold.seq as i64)
                .bind(hold.attempt as i64)
                .execute(p)
                .await?
                .rows_affected())
            }

            pub(crate) async fn holds(p: &$pool) -> Result<Vec<HoldRow>> {
                let rows = sqlx::query(concat!(
                    "SELECT name, lkey, slot, action_id, seq, attempt, owner, since FROM limit_holds WHERE ",
                    live!(),
                    " ORDER BY name, lkey, slot LIMIT 10000"
                ))
                .fetch_all(p)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(HoldRow {
                            name: r.try_get("name")?,
                            key: r.try_get("lkey")?,
                            slot: r.try_get::<i64, _>("slot")? as u32,
                            action_id: r.try_get("action_id")?,
                            seq: r.try_get::<i64, _>("seq")? as u32,
                            attempt: r.try_get::<i64, _>("attempt")? as u32,
                            owner: r.try_get("owner")?,
                            since: r.try_get("since")?,
                        })
                    })
                    .collect::<std::result::Result<_, sqlx::Error>>()
                    .map_err(Into::into)
            }
        }
    };
}

limits_backend!(sqlite, sqlx::SqlitePool, "INSERT OR IGNORE");
limits_backend!(mysql, sqlx::MySqlPool, "INSERT IGNORE");

impl Store {
    /// Claims a slot of `hold`'s limit key below `max`, unless `max` live
    /// attempts hold it already. Safe to try again after a lost answer.
    pub(crate) async fn claim_limit(&self, hold: &Hold, max: u32) -> Result<Claim> {
        retrying(&self.stats, || async move {
            match &self.read {
                Pool::Sqlite(p) => sqlite::claim(p, hold, max).await,
                Pool::MySql(p) => mysql::claim(p, hold, max).await,
            }
        })
        .await
    }

    /// Gives a slot back; 0 when it was not held (any more).
    pub(crate) async fn release_limit(&self, hold: &Hold, slot: u32) -> Result<u64> {
        retrying(&self.stats, || async move {
            match &self.read {
                Pool::Sqlite(p) => sqlite::release(p, hold, slot).await,
                Pool::MySql(p) => mysql::release(p, hold, slot).await,
            }
        })
        .await
    }

    /// The slots held now by attempts that still run, by limit and key.
    pub async fn limit_holds(&self) -> Result<Vec<HoldRow>> {
        match &self.read {
            Pool::Sqlite(p) => sqlite::holds(p).await,
            Pool::MySql(p) => mysql::holds(p).await,
        }
    }
}
