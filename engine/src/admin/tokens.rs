//! API tokens: created, listed and revoked, each change audited.

use serde_json::json;

use super::Admin;
use crate::access::{self, Scope, TokenInfo, TokenSpec};
use crate::store::{AuditEntry, ConfigKind, Store, TokenRow, Write};
use crate::{Error, Result, join, model};

impl Admin {
    /// Creates an API token; returns it as listed and its text, which is
    /// shown this once and stored only as a hash.
    pub async fn create_token(&self, spec: TokenSpec, by: &str) -> Result<(TokenInfo, String)> {
        let (row, text) = Admin::store_token(&self.store, spec, by).await?;
        self.tokens.put(row.clone());
        tracing::info!(token_id = %row.id, name = %row.name, scopes = %row.scopes, by, "API token created");
        Ok((TokenInfo::from_row(&row), text))
    }

    /// Creates an API token straight in the database at `database_url`,
    /// with no engine running: on a server's host, the way back in when
    /// every admin token is lost. Audited like any other; running servers
    /// take it within [`crate::config_watch::POLL`] and a reload. The
    /// database must exist already.
    pub async fn create_token_in(
        database_url: &str,
        spec: TokenSpec,
        by: &str,
    ) -> Result<(TokenInfo, String)> {
        let store = Store::connect(database_url).await?;
        let (row, text) = Admin::store_token(&store, spec, by).await?;
        Ok((TokenInfo::from_row(&row), text))
    }

    /// Checks a new token, stores it with its audit entry, and returns its
    /// row and its text.
    async fn store_token(store: &Store, spec: TokenSpec, by: &str) -> Result<(TokenRow, String)> {
        let name = spec.name.trim();
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        {
            return Err(Error::InvalidRequest(
                "a token name is 1 to 64 letters, digits, '.', '_', '-' or '@'".into(),
            ));
        }
        if spec.scopes.is_empty() {
            return Err(Error::InvalidRequest(
                "a token needs at least one scope: read, submit, operate or admin".into(),
            ));
        }
        if let Some(kinds) = &spec.kinds {
            if !spec.scopes.contains(&Scope::Submit) {
                return Err(Error::InvalidRequest(
                    "kinds limit what a token may submit: give it the submit scope too".into(),
                ));
            }
            if kinds.is_empty() || kinds.iter().any(|k| k.is_empty() || k.contains(',')) {
                return Err(Error::InvalidRequest(
                    "kinds must be a non-empty list of kind names".into(),
                ));
            }
        }
        // A join token admits one node unless its creator says more: a
        // leaked one is then worth nothing once its node has joined.
        let join = match (spec.scopes.contains(&Scope::Join), spec.join) {
            (true, rules) => {
                let mut rules = rules.unwrap_or_default();
                rules.max_uses.get_or_insert(join::DEFAULT_USES);
                rules.check().map_err(Error::InvalidRequest)?;
                Some(rules)
            }
            (false, None) => None,
            (false, Some(_)) => {
                return Err(Error::InvalidRequest(
                    "names, capabilities and uses are rules of a join token: give it the join scope"
                        .into(),
                ));
            }
        };
        let now = model::now();
        if spec.expires_at.is_some_and(|at| at <= now) {
            return Err(Error::InvalidRequest(
                "the expiry is in the past; give a time in the future".into(),
            ));
        }
        if store.tokens().await?.iter().any(|t| t.name == name) {
            return Err(Error::TokenNameTaken(name.to_owned()));
        }
        let (id, text) =
            access::generate().map_err(Error::io("generating a token from the OS's randomness"))?;
        let row = TokenRow {
            id: id.clone(),
            name: name.to_owned(),
            scopes: access::scopes_text(&spec.scopes),
            kinds: spec.kinds.as_ref().map(|k| k.join(",")),
            secret_hash: access::hash(&text),
            created_by: by.to_owned(),
            created_at: now,
            expires_at: spec.expires_at,
            revoked_at: None,
            join_rules: join
                .as_ref()
                .map(|j| serde_json::to_string(j).expect("rules serialize")),
            uses: 0,
        };
        let audit = AuditEntry::new(
            by,
            "token.created",
            &id,
            json!({ "name": row.name, "scopes": row.scopes, "kinds": row.kinds, "expires_at": row.expires_at, "join": join }),
        );
        store
            .record(vec![Write::CreateToken(Box::new(row.clone()))], audit)
            .await?;
        Ok((row, text))
    }

    /// Stores a token whose text the operator chose (the old single
    /// `--admin-token`), with the admin scope, unless it is already stored.
    /// A stored one that was revoked stays revoked.
    pub async fn import_admin_token(&self, text: &str) -> Result<()> {
        let id = access::legacy_id(text);
        if self.store.tokens().await?.iter().any(|t| t.id == id) {
            return Ok(());
        }
        let row = TokenRow {
            id: id.clone(),
            name: format!("admin-token-{}", &id[..8]),
            scopes: Scope::Admin.as_str().to_owned(),
            kinds: None,
            secret_hash: access::hash(text),
            created_by: "--admin-token".into(),
            created_at: model::now(),
            expires_at: None,
            revoked_at: None,
            join_rules: None,
            uses: 0,
        };
        let audit = AuditEntry::new(
            "--admin-token",
            "token.created",
            &id,
            json!({ "name": row.name, "scopes": "admin", "imported": true }),
        );
        self.store
            .record(vec![Write::CreateToken(Box::new(row.clone()))], audit)
            .await?;
        self.tokens.put(row);
        Ok(())
    }

    /// Every API token, oldest first (never their secrets).
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let rows = self.store.tokens().await?;
        self.tokens.replace_all(rows.clone());
        Ok(rows.iter().map(TokenInfo::from_row).collect())
    }

    /// Revokes an API token: refused from the next request on, on this
    /// server at once and on others within [`crate::config_watch::POLL`]
    /// and a reload. The last
    /// active admin token is not revoked ([`Error::LastAdminToken`]): the
    /// database decides, so two revokes racing cannot leave none. Revoking
    /// a revoked token changes nothing.
    pub async fn revoke_token(&self, id: &str, by: &str) -> Result<TokenInfo> {
        let find = async || -> Result<TokenRow> {
            self.store
                .tokens()
                .await?
                .into_iter()
                .find(|t| t.id == id)
                .ok_or_else(|| Error::TokenNotFound(id.to_owned()))
        };
        let mut row = find().await?;
        if row.revoked_at.is_some() {
            // Nothing changes: nothing to record.
            return Ok(TokenInfo::from_row(&row));
        }
        let at = model::now();
        let audit = AuditEntry::new(by, "token.revoked", id, json!({ "name": row.name }));
        let outcome = self
            .store
            .write(vec![
                Write::RevokeToken {
                    id: id.to_owned(),
                    at,
                    audit: Box::new(audit),
                },
                Write::Bump(ConfigKind::Tokens),
            ])
            .await?;
        if outcome.first().is_none_or(|o| o.rows() == 0) {
            // Revoked meanwhile by another request, or the last admin token.
            let now = find().await?;
            if now.revoked_at.is_some() {
                self.tokens.put(now.clone());
                return Ok(TokenInfo::from_row(&now));
            }
            tracing::warn!(token_id = %id, name = %row.name, by, "refused to revoke the last active admin token");
            return Err(Error::LastAdminToken(id.to_owned()));
        }
        row.revoked_at = Some(at);
        self.tokens.put(row.clone());
        tracing::warn!(token_id = %id, name = %row.name, by, "API token revoked");
        Ok(TokenInfo::from_row(&row))
    }
}
