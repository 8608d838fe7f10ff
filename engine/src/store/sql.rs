//! The SQL, written once and expanded for each backend. Both SQLite and
//! MySQL/MariaDB take `?` placeholders, so the text is shared verbatim.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{BundleRow, KeyRow, Outcome, Write};
use crate::model::{
    Action, ActionFilter, ActionId, ActionStatus, StepRecord, StepStatus, Timestamp,
};

macro_rules! select_actions {
    ($($rest:literal),*) => {
        concat!(
            "SELECT id, kind, target, params, status, bundle, current_step, error, idempotency_key, owner, revision, \
             created_at, started_at, finished_at FROM actions",
            $($rest),*
        )
    };
}

fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, sqlx::Error> {
    s.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))
}

fn parse_params(s: &str) -> Result<Map<String, Value>, sqlx::Error> {
    serde_json::from_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

macro_rules! sql_backend {
    ($module:ident, $db:ty, $pool:ty, $last_id:ident) => {
        pub(super) mod $module {
            use sqlx::Row;

            use super::*;

            type Tx = sqlx::Transaction<'static, $db>;
            type DbRow = <$db as sqlx::Database>::Row;

            pub(crate) async fn apply(pool: &$pool, writes: &[&Write]) -> Result<Vec<Outcome>, sqlx::Error> {
                let mut tx = pool.begin().await?;
                let mut out = Vec::with_capacity(writes.len());
                for w in writes {
                    out.push(apply_one(&mut tx, w).await?);
                }
                tx.commit().await?;
                Ok(out)
            }

            async fn apply_one(tx: &mut Tx, w: &Write) -> Result<Outcome, sqlx::Error> {
                let rows = match w {
                    Write::Insert { new, bundle, request_hash, owner, steps, at } => {
                        if let Some(key) = &new.idempotency_key {
                            let found = sqlx::query("SELECT id, request_hash FROM actions WHERE idempotency_key = ?")
                                .bind(key)
                                .fetch_optional(&mut **tx)
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
                        let params = serde_json::to_string(&new.params).expect("a JSON map serializes");
                        let id = sqlx::query(
                            "INSERT INTO actions (kind, target, params, status, bundle, idempotency_key, request_hash, owner, revision, created_at) \
                             VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, 0, ?)",
                        )
                        .bind(&new.kind)
                        .bind(&new.target)
                        .bind(params)
                        .bind(bundle)
                        .bind(&new.idempotency_key)
                        .bind(request_hash)
                        .bind(owner)
                        .bind(at)
                        .execute(&mut **tx)
                        .await?
                        .$last_id() as ActionId;
                        if !steps.is_empty() {
                            // One statement for all steps; the text holds only placeholders.
                            let mut text = String::from(
                                "INSERT INTO action_steps (action_id, seq, name, step, status, attempt) VALUES ",
                            );
                            for i in 0..steps.len() {
                                text.push_str(if i == 0 { "(?, ?, ?, ?, 'pending', 0)" } else { ", (?, ?, ?, ?, 'pending', 0)" });
                            }
                            let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                            for (seq, (name, step)) in steps.iter().enumerate() {
                                q = q.bind(id).bind(seq as i64).bind(name.clone()).bind(step.clone());
                            }
                            q.execute(&mut **tx).await?;
                        }
                        return Ok(Outcome::Inserted(id));
                    }
                    Write::Start { id, owner, lease_until, at } => {
                        sqlx::query(
                            "UPDATE actions SET status = 'running', owner = ?, lease_expires_at = ?, \
                             started_at = COALESCE(started_at, ?), revision = revision + 1 WHERE id = ? AND status IN ('queued', 'running')",
                        )
                        .bind(owner)
                        .bind(lease_until)
                        .bind(at)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected()
                    }
                    Write::StepStarted { id, seq, name, attempt, at } => {
                        let a = sqlx::query(
                            "UPDATE action_steps SET status = 'running', attempt = ?, started_at = ?, finished_at = NULL \
                             WHERE action_id = ? AND seq = ? AND EXISTS (SELECT 1 FROM actions WHERE id = ? AND status = 'running')",
                        )
                        .bind(*attempt as i64)
                        .bind(at)
                        .bind(id)
                        .bind(*seq as i64)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                        // Only for a running action: a cancel may have won the race to the row.
                        let b = sqlx::query(
                            "UPDATE actions SET current_step = ?, revision = revision + 1 WHERE id = ? AND status = 'running'",
                        )
                            .bind(name)
                            .bind(id)
                            .execute(&mut **tx)
                            .await?
                            .rows_affected();
                        a + b
                    }
                    Write::StepSucceeded { id, seq, output, at } => {
                        // No revision bump: a success always commits with the next write, which bumps.
                        sqlx::query(
                            "UPDATE action_steps SET status = 'succeeded', output = ?, error = NULL, finished_at = ? \
                             WHERE action_id = ? AND seq = ?",
                        )
                        .bind(output)
                        .bind(at)
                        .bind(id)
                        .bind(*seq as i64)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected()
                    }
                    Write::StepAttemptFailed { id, seq, attempt, started_at, error, at } => {
                        let a = sqlx::query(
                            "INSERT INTO action_step_attempts (action_id, seq, attempt, started_at, finished_at, error) \
                             VALUES (?, ?, ?, ?, ?, ?)",
                        )
                        .bind(id)
                        .bind(*seq as i64)
                        .bind(*attempt as i64)
                        .bind(started_at)
                        .bind(at)
                        .bind(error)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                        let b = sqlx::query("UPDATE action_steps SET error = ? WHERE action_id = ? AND seq = ?")
                            .bind(error)
                            .bind(id)
                            .bind(*seq as i64)
                            .execute(&mut **tx)
                            .await?
                            .rows_affected();
                        a + b + bump(tx, *id).await?
                    }
                    Write::StepEnded { id, seq, status, error, at } => {
                        let a = sqlx::query(
                            "UPDATE action_steps SET status = ?, error = ?, finished_at = ? WHERE action_id = ? AND seq = ?",
                        )
                        .bind(status.as_str())
                        .bind(error)
                        .bind(at)
                        .bind(id)
                        .bind(*seq as i64)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                        a
                    }
                    Write::Finish { id, status, error, at } => {
                        let a = sqlx::query(
                            "UPDATE actions SET status = ?, error = ?, finished_at = ?, owner = NULL, lease_expires_at = NULL, \
                             revision = revision + 1 WHERE id = ?",
                        )
                        .bind(status.as_str())
                        .bind(error)
                        .bind(at)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                        // A succeeded action has no pending steps left to skip.
                        if *status == ActionStatus::Succeeded { a } else { a + skip_pending(tx, *id).await? }
                    }
                    Write::CancelQueued { id, at } => {
                        let a = sqlx::query(
                            "UPDATE actions SET status = 'cancelled', error = 'cancelled before it started', finished_at = ?, \
                             owner = NULL, lease_expires_at = NULL, revision = revision + 1 WHERE id = ? AND status = 'queued'",
                        )
                        .bind(at)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                        if a == 0 {
                            return Ok(Outcome::Done { rows: 0 });
                        }
                        a + skip_pending(tx, *id).await?
                    }
                    Write::Claim { id, owner, lease_until } => {
                        sqlx::query("UPDATE actions SET owner = ?, lease_expires_at = ?, revision = revision + 1 WHERE id = ?")
                            .bind(owner)
                            .bind(lease_until)
                            .bind(id)
                            .execute(&mut **tx)
                            .await?
                            .rows_affected()
                    }
                    Write::RenewLeases { owner, until } => {
                        sqlx::query("UPDATE actions SET lease_expires_at = ? WHERE owner = ? AND status = 'running'")
                            .bind(until)
                            .bind(owner)
                            .execute(&mut **tx)
                            .await?
                            .rows_affected()
                    }
                    Write::Release { owner, at } => {
                        sqlx::query(
                            "UPDATE actions SET owner = NULL, lease_expires_at = ?, revision = revision + 1 \
                             WHERE owner = ? AND status IN ('queued', 'running')",
                        )
                        .bind(at)
                        .bind(owner)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected()
                    }
                    Write::InsertBundle(b, content) => {
                        sqlx::query(
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
                        .execute(&mut **tx)
                        .await?
                        .rows_affected()
                    }
                    Write::ActivateBundle { hash, at } => {
                        sqlx::query("UPDATE bundles SET activated_at = ? WHERE hash = ?")
                            .bind(at)
                            .bind(hash)
                            .execute(&mut **tx)
                            .await?
                            .rows_affected()
                    }
                    Write::TrustKey { key_id, public_key, at } => {
                        sqlx::query("INSERT INTO trusted_keys (key_id, public_key, added_at) VALUES (?, ?, ?)")
                            .bind(key_id)
                            .bind(public_key)
                            .bind(at)
                            .execute(&mut **tx)
                            .await?
                            .rows_affected()
                    }
                    Write::RevokeKey { key_id, public_key, at } => {
                        let known = sqlx::query("SELECT key_id FROM trusted_keys WHERE key_id = ?")
                            .bind(key_id)
                            .fetch_optional(&mut **tx)
                            .await?
                            .is_some();
                        if known {
                            sqlx::query("UPDATE trusted_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?")
                                .bind(at)
                                .bind(key_id)
                                .execute(&mut **tx)
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
                            .execute(&mut **tx)
                            .await?
                            .rows_affected()
                        }
                    }
                };
                Ok(Outcome::Done { rows })
            }

            async fn bump(tx: &mut Tx, id: ActionId) -> Result<u64, sqlx::Error> {
                Ok(sqlx::query("UPDATE actions SET revision = revision + 1 WHERE id = ?")
                    .bind(id)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected())
            }

            async fn skip_pending(tx: &mut Tx, id: ActionId) -> Result<u64, sqlx::Error> {
                Ok(sqlx::query("UPDATE action_steps SET status = 'skipped' WHERE action_id = ? AND status = 'pending'")
                    .bind(id)
                    .execute(&mut **tx)
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
                    owner: row.try_get("owner")?,
                    revision: row.try_get("revision")?,
                    created_at: row.try_get::<DateTime<Utc>, _>("created_at")?,
                    started_at: row.try_get("started_at")?,
                    finished_at: row.try_get("finished_at")?,
                    steps: Vec::new(),
                })
            }

            fn step_row(row: &DbRow) -> Result<StepRecord, sqlx::Error> {
                let output: Option<String> = row.try_get("output")?;
                Ok(StepRecord {
                    seq: row.try_get::<i64, _>("seq")? as u32,
                    name: row.try_get("name")?,
                    step: row.try_get("step")?,
                    status: parse::<StepStatus>(&row.try_get::<String, _>("status")?)?,
                    attempt: row.try_get::<i64, _>("attempt")? as u32,
                    started_at: row.try_get("started_at")?,
                    finished_at: row.try_get("finished_at")?,
                    output: output.map(|o| serde_json::from_str(&o).unwrap_or(Value::String(o))),
                    error: row.try_get("error")?,
                })
            }

            async fn with_steps(pool: &$pool, mut action: Action) -> Result<Action, sqlx::Error> {
                let rows = sqlx::query(
                    "SELECT seq, name, step, status, attempt, started_at, finished_at, output, error \
                     FROM action_steps WHERE action_id = ? ORDER BY seq",
                )
                .bind(action.id)
                .fetch_all(pool)
                .await?;
                action.steps = rows.iter().map(step_row).collect::<Result<_, _>>()?;
                Ok(action)
            }

            pub(crate) async fn action(pool: &$pool, id: ActionId) -> Result<Option<Action>, sqlx::Error> {
                const Q: &str = select_actions!(" WHERE id = ?");
                let Some(row) = sqlx::query(Q).bind(id).fetch_optional(pool).await? else {
                    return Ok(None);
                };
                Ok(Some(with_steps(pool, action_row(&row)?).await?))
            }

            pub(crate) async fn list(pool: &$pool, f: &ActionFilter) -> Result<Vec<Action>, sqlx::Error> {
                const Q: &str = select_actions!(
                    " WHERE (? IS NULL OR target = ?) AND (? IS NULL OR status = ?) AND (? IS NULL OR kind = ?) \
                     AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?"
                );
                let status = f.status.map(|s| s.as_str());
                let rows = sqlx::query(Q)
                    .bind(&f.target)
                    .bind(&f.target)
                    .bind(status)
                    .bind(status)
                    .bind(&f.kind)
                    .bind(&f.kind)
                    .bind(f.before)
                    .bind(f.before)
                    .bind(f.limit as i64)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(action_row).collect()
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

            pub(crate) async fn unfinished(pool: &$pool, owner: &str, now: Timestamp) -> Result<Vec<Action>, sqlx::Error> {
                const Q: &str = select_actions!(
                    " WHERE status = 'queued' OR (status = 'running' AND (owner IS NULL OR owner = ? OR lease_expires_at < ?)) \
                     ORDER BY id"
                );
                let rows = sqlx::query(Q).bind(owner).bind(now).fetch_all(pool).await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in &rows {
                    out.push(with_steps(pool, action_row(row)?).await?);
                }
                Ok(out)
            }
        }
    };
}

sql_backend!(sqlite, sqlx::Sqlite, sqlx::SqlitePool, last_insert_rowid);
sql_backend!(mysql, sqlx::MySql, sqlx::MySqlPool, last_insert_id);
