//! The SQL of `target_records` (`crate::targets`), expanded for each backend
//! like `access.rs`. A change is read, merged and written back in the
//! transaction that commits it, the row locked on MySQL/MariaDB, so two
//! changes to one target through two servers both land.

use std::collections::BTreeMap;

use super::Write;
use crate::targets::TargetRecord;

macro_rules! records_backend {
    ($module:ident, $db:ty, $pool:ty, $conn:ty, $insert_ignore:literal, $lock:literal) => {
        pub(super) mod $module {
            use sqlx::Row;

            use super::*;

            type DbRow = <$db as sqlx::Database>::Row;

            /// Runs one record write; returns the rows it changed (0: a
            /// change that would overfill the record, nothing written; a
            /// delete that found none).
            pub(crate) async fn apply(tx: &mut $conn, w: &Write) -> Result<u64, sqlx::Error> {
                let audit = super::super::access::$module::insert_audit;
                match w {
                    Write::PutTargetRecord { target, change, at, by, audit: entry } => {
                        // Made first if missing, so the row exists to lock.
                        sqlx::query(concat!(
                            $insert_ignore,
                            " INTO target_records (target, attributes, updated_at, updated_by) VALUES (?, '{}', ?, ?)"
                        ))
                        .bind(target)
                        .bind(at)
                        .bind(by)
                        .execute(&mut *tx)
                        .await?;
                        let row = sqlx::query(concat!(
                            "SELECT attributes FROM target_records WHERE target = ?",
                            $lock
                        ))
                        .bind(target)
                        .fetch_one(&mut *tx)
                        .await?;
                        let Some(attributes) = crate::targets::merged(attributes(&row)?, change) else {
                            return Ok(0);
                        };
                        let text = serde_json::to_string(&attributes).expect("JSON serializes");
                        let done = sqlx::query(
                            "UPDATE target_records SET attributes = ?, updated_at = ?, updated_by = ? WHERE target = ?",
                        )
                        .bind(text)
                        .bind(at)
                        .bind(by)
                        .bind(target)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        Ok(done + audit(tx, entry).await?)
                    }
                    Write::DeleteTargetRecord { target, audit: entry } => {
                        let deleted = sqlx::query("DELETE FROM target_records WHERE target = ?")
                            .bind(target)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        if deleted > 0 {
                            audit(tx, entry).await?;
                        }
                        Ok(deleted)
                    }
                    _ => unreachable!("records::apply takes target record writes"),
                }
            }

            fn attributes(r: &DbRow) -> Result<BTreeMap<String, String>, sqlx::Error> {
                let text: String = r.try_get("attributes")?;
                serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
            }

            fn record(r: &DbRow) -> Result<TargetRecord, sqlx::Error> {
                Ok(TargetRecord {
                    target: r.try_get("target")?,
                    attributes: attributes(r)?,
                    updated_at: r.try_get("updated_at")?,
                    updated_by: r.try_get("updated_by")?,
                })
            }

            pub(crate) async fn one(pool: &$pool, target: &str) -> Result<Option<TargetRecord>, sqlx::Error> {
                sqlx::query("SELECT target, attributes, updated_at, updated_by FROM target_records WHERE target = ?")
                    .bind(target)
                    .fetch_optional(pool)
                    .await?
                    .as_ref()
                    .map(record)
                    .transpose()
            }

            pub(crate) async fn page(
                pool: &$pool,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<TargetRecord>, sqlx::Error> {
                sqlx::query(
                    "SELECT target, attributes, updated_at, updated_by FROM target_records \
                     WHERE (? IS NULL OR target > ?) ORDER BY target LIMIT ?",
                )
                .bind(after)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
                .iter()
                .map(record)
                .collect()
            }
        }
    };
}

records_backend!(
    sqlite,
    sqlx::Sqlite,
    sqlx::SqlitePool,
    sqlx::SqliteConnection,
    "INSERT OR IGNORE",
    ""
);
records_backend!(
    mysql,
    sqlx::MySql,
    sqlx::MySqlPool,
    sqlx::MySqlConnection,
    "INSERT IGNORE",
    " FOR UPDATE"
);
