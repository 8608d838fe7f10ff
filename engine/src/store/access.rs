//! The SQL of `api_tokens`, `audit_log`, `secrets`, `nodes`, `generations`
//! and `active_bundles`, expanded for each backend like
//! `sql.rs`. These writes are rare (an operator's change), so each runs as
//! its own statement inside whatever group commit carries it.

use super::{AuditEntry, NodeResultRow, NodeRow, SecretRow, TokenRow, Write};

/// The active admin tokens, as `RevokeToken` reads them before it writes;
/// each backend adds what locks them until the commit.
macro_rules! admin_tokens {
    ($lock:literal) => {
        concat!(
            "SELECT id, scopes, expires_at FROM api_tokens \
             WHERE revoked_at IS NULL AND scopes LIKE '%admin%' ORDER BY id",
            $lock
        )
    };
}

macro_rules! access_backend {
    ($module:ident, $db:ty, $pool:ty, $conn:ty, $lock:literal) => {
        pub(super) mod $module {
            use sqlx::Row;

            use super::*;

            type DbRow = <$db as sqlx::Database>::Row;

            /// Runs one token or audit write; returns the rows it changed.
            pub(crate) async fn apply(tx: &mut $conn, w: &Write) -> Result<u64, sqlx::Error> {
                let done = match w {
                    Write::CreateToken(t) => sqlx::query(
                        "INSERT INTO api_tokens (id, name, scopes, kinds, secret_hash, created_by, created_at, expires_at, join_rules) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&t.id)
                    .bind(&t.name)
                    .bind(&t.scopes)
                    .bind(&t.kinds)
                    .bind(&t.secret_hash)
                    .bind(&t.created_by)
                    .bind(t.created_at)
                    .bind(t.expires_at)
                    .bind(&t.join_rules)
                    .execute(&mut *tx)
                    .await?,
                    // Counted only while uses are left: the row it touched
                    // says whether this node may join.
                    Write::UseJoinToken { id, max_uses, at } => sqlx::query(
                        "UPDATE api_tokens SET uses = uses + 1 WHERE id = ? AND revoked_at IS NULL \
                         AND (expires_at IS NULL OR expires_at > ?) \
                         AND (? IS NULL OR uses < ?)",
                    )
                    .bind(id)
                    .bind(at)
                    .bind(max_uses.map(i64::from))
                    .bind(max_uses.map(i64::from))
                    .execute(&mut *tx)
                    .await?,
                    Write::RevokeToken { id, at, audit } => {
                        // SQLite runs one write transaction at a time; on
                        // MySQL the rows stay locked (FOR UPDATE) until the
                        // commit, and a revoke waiting for them reads them
                        // as the other left them.
                        let mut admins = Vec::new();
                        for r in sqlx::query(admin_tokens!($lock)).fetch_all(&mut *tx).await? {
                            let scopes: String = r.try_get("scopes")?;
                            let expires_at: Option<crate::model::Timestamp> = r.try_get("expires_at")?;
                            if crate::access::parse_scopes(&scopes).contains(&crate::access::Scope::Admin)
                                && expires_at.is_none_or(|e| e > *at)
                            {
                                admins.push(r.try_get::<String, _>("id")?);
                            }
                        }
                        fail::fail_point!("store.revoke_token");
                        if admins.len() == 1 && admins[0] == *id {
                            return Ok(0);
                        }
                        let revoked = sqlx::query("UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                            .bind(at)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        if revoked == 0 {
                            return Ok(0);
                        }
                        return Ok(revoked + insert_audit(tx, audit).await?);
                    }
                    Write::Audit(e) => return insert_audit(tx, e).await,
                    Write::Bump(kind) => sqlx::query("UPDATE generations SET generation = generation + 1 WHERE kind = ?")
                        .bind(kind.as_str())
                        .execute(&mut *tx)
                        .await?,
                    Write::Guard { kind, seen } => {
                        let bumped = sqlx::query(
                            "UPDATE generations SET generation = generation + 1 WHERE kind = ? AND generation = ?",
                        )
                        .bind(kind.as_str())
                        .bind(seen)
                        .execute(&mut *tx)
                        .await?;
                        if bumped.rows_affected() == 0 {
                            return Err(sqlx::Error::Configuration(Box::new(super::super::Stale(*kind))));
                        }
                        bumped
                    }
                    // Delete and insert: the same SQL on both databases.
                    Write::SetSecret(row) => {
                        sqlx::query("DELETE FROM secrets WHERE name = ?")
                            .bind(&row.name)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(
                            "INSERT INTO secrets (name, nonce, ciphertext, updated_at, updated_by) VALUES (?, ?, ?, ?, ?)",
                        )
                        .bind(&row.name)
                        .bind(&row.nonce)
                        .bind(&row.ciphertext)
                        .bind(row.updated_at)
                        .bind(&row.updated_by)
                        .execute(&mut *tx)
                        .await?
                    }
                    // Delete and insert, as for secrets.
                    Write::PutNode(n) => {
                        sqlx::query("DELETE FROM nodes WHERE name = ?")
                            .bind(&n.name)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(
                            "INSERT INTO nodes (name, public_key, status, created_at, accepted_at, accepted_by, capabilities, last_seen_at, draining_since, allowed_capabilities) \
                             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        )
                        .bind(&n.name)
                        .bind(&n.public_key)
                        .bind(n.status.as_str())
                        .bind(n.created_at)
                        .bind(n.accepted_at)
                        .bind(&n.accepted_by)
                        .bind(&n.capabilities)
                        .bind(n.last_seen_at)
                        .bind(n.draining_since)
                        .bind(&n.allowed_capabilities)
                        .execute(&mut *tx)
                        .await?
                    }
                    // Delete and insert: a repeat of a result replaces it.
                    Write::PutNodeResult { row, forget_before } => {
                        sqlx::query("DELETE FROM node_results WHERE stored_at < ?")
                            .bind(forget_before)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("DELETE FROM node_results WHERE node = ? AND action_id = ? AND seq = ? AND attempt = ?")
                            .bind(&row.node)
                            .bind(row.action_id)
                            .bind(row.seq)
                            .bind(row.attempt)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(
                            "INSERT INTO node_results (node, action_id, seq, attempt, status, nonce, sealed, stored_at, stored_by) \
                             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        )
                        .bind(&row.node)
                        .bind(row.action_id)
                        .bind(row.seq)
                        .bind(row.attempt)
                        .bind(row.status)
                        .bind(&row.nonce)
                        .bind(&row.sealed)
                        .bind(row.stored_at)
                        .bind(&row.stored_by)
                        .execute(&mut *tx)
                        .await?
                    }
                    Write::DeleteSecret { name, audit: entry } => {
                        let deleted = sqlx::query("DELETE FROM secrets WHERE name = ?")
                            .bind(name)
                            .execute(&mut *tx)
                            .await?;
                        if deleted.rows_affected() > 0 {
                            insert_audit(tx, entry).await?;
                        }
                        deleted
                    }
                    _ => unreachable!("access::apply takes token, audit and secret writes"),
                };
                Ok(done.rows_affected())
            }

            pub(crate) async fn insert_audit(tx: &mut $conn, e: &AuditEntry) -> Result<u64, sqlx::Error> {
                fail::fail_point!("store.audit", |_| Err(sqlx::Error::Protocol(
                    "the audit entry could not be written (injected)".into()
                )));
                Ok(sqlx::query(
                    "INSERT INTO audit_log (at, actor, event, subject, detail) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(e.at)
                .bind(&e.actor)
                .bind(&e.event)
                .bind(&e.subject)
                .bind(e.detail.as_ref().map(|d| d.to_string()))
                .execute(&mut *tx)
                .await?
                .rows_affected())
            }

            fn secret_row(r: &DbRow) -> Result<SecretRow, sqlx::Error> {
                Ok(SecretRow {
                    name: r.try_get("name")?,
                    nonce: r.try_get("nonce")?,
                    ciphertext: r.try_get("ciphertext")?,
                    updated_at: r.try_get("updated_at")?,
                    updated_by: r.try_get("updated_by")?,
                })
            }

            pub(crate) async fn secrets(pool: &$pool, names: &[String]) -> Result<Vec<SecretRow>, sqlx::Error> {
                if names.is_empty() {
                    return Ok(Vec::new());
                }
                let text = format!(
                    "SELECT name, nonce, ciphertext, updated_at, updated_by FROM secrets WHERE name IN ({})",
                    vec!["?"; names.len()].join(", ")
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
                for n in names {
                    q = q.bind(n);
                }
                q.fetch_all(pool).await?.iter().map(secret_row).collect()
            }

            pub(crate) async fn all_secrets(pool: &$pool) -> Result<Vec<SecretRow>, sqlx::Error> {
                sqlx::query("SELECT name, nonce, ciphertext, updated_at, updated_by FROM secrets ORDER BY name")
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(secret_row)
                    .collect()
            }

            /// A stored result of one call on `node`.
            pub(crate) async fn node_result(
                pool: &$pool,
                node: &str,
                id: i64,
                seq: u32,
                attempt: u32,
            ) -> Result<Option<NodeResultRow>, sqlx::Error> {
                let row = sqlx::query(
                    "SELECT status, nonce, sealed, stored_at, stored_by FROM node_results \
                     WHERE node = ? AND action_id = ? AND seq = ? AND attempt = ?",
                )
                .bind(node)
                .bind(id)
                .bind(seq)
                .bind(attempt)
                .fetch_optional(pool)
                .await?;
                row.map(|r| {
                    Ok(NodeResultRow {
                        node: node.to_owned(),
                        action_id: id,
                        seq,
                        attempt,
                        status: r.try_get("status")?,
                        nonce: r.try_get("nonce")?,
                        sealed: r.try_get("sealed")?,
                        stored_at: r.try_get("stored_at")?,
                        stored_by: r.try_get("stored_by")?,
                    })
                })
                .transpose()
            }

            /// Every node, or the one named `name`.
            pub(crate) async fn nodes(pool: &$pool, name: Option<&str>) -> Result<Vec<NodeRow>, sqlx::Error> {
                let columns = "SELECT name, public_key, status, created_at, accepted_at, accepted_by, capabilities, last_seen_at, draining_since, allowed_capabilities FROM nodes";
                let rows = match name {
                    Some(name) => sqlx::query(sqlx::AssertSqlSafe(format!("{columns} WHERE name = ?")))
                        .bind(name)
                        .fetch_all(pool)
                        .await?,
                    None => sqlx::query(sqlx::AssertSqlSafe(format!("{columns} ORDER BY name")))
                        .fetch_all(pool)
                        .await?,
                };
                rows.iter()
                    .map(|r| {
                        Ok(NodeRow {
                            name: r.try_get("name")?,
                            public_key: r.try_get("public_key")?,
                            status: r
                                .try_get::<String, _>("status")?
                                .parse()
                                .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
                            created_at: r.try_get("created_at")?,
                            accepted_at: r.try_get("accepted_at")?,
                            accepted_by: r.try_get("accepted_by")?,
                            capabilities: r.try_get("capabilities")?,
                            last_seen_at: r.try_get("last_seen_at")?,
                            draining_since: r.try_get("draining_since")?,
                            allowed_capabilities: r.try_get("allowed_capabilities")?,
                        })
                    })
                    .collect()
            }

            fn token_row(r: &DbRow) -> Result<TokenRow, sqlx::Error> {
                Ok(TokenRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    scopes: r.try_get("scopes")?,
                    kinds: r.try_get("kinds")?,
                    secret_hash: r.try_get("secret_hash")?,
                    created_by: r.try_get("created_by")?,
                    created_at: r.try_get("created_at")?,
                    expires_at: r.try_get("expires_at")?,
                    revoked_at: r.try_get("revoked_at")?,
                    join_rules: r.try_get("join_rules")?,
                    uses: r.try_get::<i64, _>("uses")?,
                })
            }

            /// `generations` as stored: (kind, generation).
            pub(crate) async fn generations(pool: &$pool) -> Result<Vec<(String, i64)>, sqlx::Error> {
                sqlx::query_as("SELECT kind, generation FROM generations").fetch_all(pool).await
            }

            /// `active_bundles`: name → hash.
            pub(crate) async fn active_bundles(
                pool: &$pool,
            ) -> Result<std::collections::HashMap<String, String>, sqlx::Error> {
                sqlx::query_as("SELECT name, hash FROM active_bundles").fetch_all(pool).await.map(|rows: Vec<(String, String)>| rows.into_iter().collect())
            }

            pub(crate) async fn tokens(pool: &$pool) -> Result<Vec<TokenRow>, sqlx::Error> {
                sqlx::query(
                    "SELECT id, name, scopes, kinds, secret_hash, created_by, created_at, expires_at, revoked_at, join_rules, uses \
                     FROM api_tokens ORDER BY created_at, id",
                )
                .fetch_all(pool)
                .await?
                .iter()
                .map(token_row)
                .collect()
            }

            pub(crate) async fn audit(
                pool: &$pool,
                limit: u32,
                before: Option<i64>,
            ) -> Result<Vec<AuditEntry>, sqlx::Error> {
                let rows = sqlx::query(
                    "SELECT id, at, actor, event, subject, detail FROM audit_log \
                     WHERE (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
                )
                .bind(before)
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        let detail: Option<String> = r.try_get("detail")?;
                        Ok(AuditEntry {
                            id: r.try_get("id")?,
                            at: r.try_get("at")?,
                            actor: r.try_get("actor")?,
                            event: r.try_get("event")?,
                            subject: r.try_get("subject")?,
                            detail: detail.map(|d| serde_json::from_str(&d).unwrap_or(serde_json::Value::String(d))),
                        })
                    })
                    .collect()
            }
        }
    };
}

access_backend!(
    sqlite,
    sqlx::Sqlite,
    sqlx::SqlitePool,
    sqlx::SqliteConnection,
    ""
);
access_backend!(
    mysql,
    sqlx::MySql,
    sqlx::MySqlPool,
    sqlx::MySqlConnection,
    " FOR UPDATE"
);
