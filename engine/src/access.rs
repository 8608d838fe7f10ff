//! Who may do what: API tokens with scopes, and the audit log.
//!
//! A token reads `troupe_<id>_<secret>`: the id is public (it names the
//! token in listings and logs), the secret is 32 random bytes. The database
//! keeps only the SHA-256 of the whole token. Authentication looks the id up
//! in an in-memory copy of `api_tokens` (reloaded when another server or
//! the host changes it, see `config_watch`, and at once for changes made on
//! this server) and compares
//! hashes in constant time, so a request costs no database read and an
//! unknown id costs nothing either.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::model::Timestamp;
use crate::store::TokenRow;

/// What a token allows. Every scope includes `read`; `admin` includes all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Actions, kinds, bundles, keys and health details.
    Read,
    /// Create actions (optionally only of some kinds).
    Submit,
    /// Cancel actions.
    Operate,
    /// Bundles, keys, tokens, the audit log.
    Admin,
    /// A remote node: connect, take step calls, fetch bundles. Nothing
    /// else, not even `read`.
    Join,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Read,
        Scope::Submit,
        Scope::Operate,
        Scope::Admin,
        Scope::Join,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Operate => "operate",
            Scope::Admin => "admin",
            Scope::Join => "join",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| format!("unknown scope {s:?}; use read, submit, operate, admin or join"))
    }
}

/// Who is making a request: an authenticated token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token_id: String,
    /// The token's name, recorded as `submitted_by` and in the audit log.
    pub name: String,
    pub scopes: Vec<Scope>,
    /// The kinds a submit token may create; `None` for any.
    pub kinds: Option<Vec<String>>,
    /// What a join token lets a new node claim; `None` for tokens
    /// without rules (and every admin token).
    pub join: Option<crate::join::JoinRules>,
}

impl Principal {
    /// Admin allows everything; every scope but `join` allows `read`.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|&s| s == scope || s == Scope::Admin || (scope == Scope::Read && s != Scope::Join))
    }

    /// Whether this principal may submit actions of `kind`.
    pub fn may_submit(&self, kind: &str) -> bool {
        self.allows(Scope::Submit)
            && (self.scopes.contains(&Scope::Admin)
                || self
                    .kinds
                    .as_ref()
                    .is_none_or(|kinds| kinds.iter().any(|k| k == kind)))
    }
}

/// Why a presented token was refused. The messages never repeat the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the token is not a troupe API token (expected troupe_<id>_<secret>)")]
    Malformed,
    #[error("unknown token {id}")]
    Unknown { id: String },
    #[error("token {id} does not match its stored hash")]
    WrongSecret { id: String },
    #[error("token {id} was revoked")]
    Revoked { id: String },
    #[error("token {id} expired at {at}")]
    Expired { id: String, at: String },
}

/// What a new token is for.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub name: String,
    pub scopes: Vec<Scope>,
    pub kinds: Option<Vec<String>>,
    pub expires_at: Option<Timestamp>,
    /// For a join token: the names, capabilities and uses it allows.
    pub join: Option<crate::join::JoinRules>,
}

/// A token as listed: never its secret.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub kinds: Option<Vec<String>>,
    pub created_by: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub join: Option<crate::join::JoinRules>,
    /// Nodes admitted with it (join tokens).
    pub uses: i64,
}

impl TokenInfo {
    pub(crate) fn from_row(row: &TokenRow) -> TokenInfo {
        TokenInfo {
            id: row.id.clone(),
            name: row.name.clone(),
            scopes: parse_scopes(&row.scopes),
            kinds: row
                .kinds
                .as_ref()
                .map(|k| k.split(',').map(str::to_owned).collect()),
            created_by: row.created_by.clone(),
            created_at: row.created_at,
            expires_at: row.expires_at,
            revoked_at: row.revoked_at,
            join: row
                .join_rules
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok()),
            uses: row.uses,
        }
    }

    pub fn is_active(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

/// Scopes as stored: comma-separated, unknown names ignored.
pub(crate) fn parse_scopes(text: &str) -> Vec<Scope> {
    text.split(',').filter_map(|s| s.parse().ok()).collect()
}

pub(crate) fn scopes_text(scopes: &[Scope]) -> String {
    let mut scopes = scopes.to_vec();
    scopes.sort();
    scopes.dedup();
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The prefix every token starts with, so secret scanners can find leaked ones.
pub const TOKEN_PREFIX: &str = "troupe_";

/// A fresh token: its id and its full text (shown once).
pub(crate) fn generate() -> std::io::Result<(String, String)> {
    let mut bytes = [0u8; 40];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let id = hex(&bytes[..8]);
    let secret = hex(&bytes[8..]);
    Ok((id.clone(), format!("{TOKEN_PREFIX}{id}_{secret}")))
}

/// SHA-256 of a token's text, in hex: what the database keeps.
pub(crate) fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The id a presented token claims. A token from before scoped tokens (the
/// old `--admin-token` value, imported at start) has no id of its own: it is
/// known by a prefix of its hash.
pub(crate) fn claimed_id(token: &str) -> Result<String, Refused> {
    if token.is_empty() || token.len() > 512 || token.chars().any(|c| c.is_control()) {
        return Err(Refused::Malformed);
    }
    match token.strip_prefix(TOKEN_PREFIX) {
        Some(rest) => {
            let (id, secret) = rest.split_once('_').ok_or(Refused::Malformed)?;
            if id.len() != 16 || secret.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Refused::Malformed);
            }
            Ok(id.to_owned())
        }
        None => Ok(legacy_id(token)),
    }
}

/// The id under which a token imported from `--admin-token` is stored.
pub(crate) fn legacy_id(token: &str) -> String {
    hash(token)[..16].to_owned()
}

/// The in-memory copy of `api_tokens` that authenticates requests.
#[derive(Clone, Default)]
pub(crate) struct Tokens {
    by_id: Arc<RwLock<HashMap<String, TokenRow>>>,
    /// When the copy was last read again for an unknown token.
    reread: Arc<tokio::sync::Mutex<Option<std::time::Instant>>>,
}

/// How often unknown tokens may have the copy read again.
const REREAD_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Tokens {
    /// Reads the copy again with `read` for a token it did not know at
    /// `missed`, unless a read that began since then already did: one
    /// read at a time, at most one per [`REREAD_EVERY`] however many
    /// unknown tokens come, and each waits for one that began after it.
    pub(crate) async fn reread<F, E>(&self, missed: std::time::Instant, read: F) -> Result<(), E>
    where
        F: std::future::Future<Output = Result<Vec<TokenRow>, E>>,
    {
        let mut last = self.reread.lock().await;
        if last.is_some_and(|at| at >= missed) {
            return Ok(());
        }
        if let Some(at) = *last {
            tokio::time::sleep_until((at + REREAD_EVERY).into()).await;
        }
        *last = Some(std::time::Instant::now());
        self.replace_all(read.await?);
        Ok(())
    }

    pub(crate) fn replace_all(&self, rows: Vec<TokenRow>) {
        let map = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
        *self.by_id.write().expect("token cache lock") = map;
    }

    pub(crate) fn put(&self, row: TokenRow) {
        self.by_id
            .write()
            .expect("token cache lock")
            .insert(row.id.clone(), row);
    }

    pub(crate) fn authenticate(&self, token: &str, now: Timestamp) -> Result<Principal, Refused> {
        let id = claimed_id(token)?;
        let map = self.by_id.read().expect("token cache lock");
        let row = map
            .get(&id)
            .ok_or_else(|| Refused::Unknown { id: id.clone() })?;
        let presented = hash(token);
        if !bool::from(presented.as_bytes().ct_eq(row.secret_hash.as_bytes())) {
            return Err(Refused::WrongSecret { id });
        }
        if row.revoked_at.is_some() {
            return Err(Refused::Revoked { id });
        }
        if let Some(at) = row.expires_at
            && at <= now
        {
            return Err(Refused::Expired {
                id,
                at: at.to_rfc3339(),
            });
        }
        let info = TokenInfo::from_row(row);
        Ok(Principal {
            token_id: info.id,
            name: info.name,
            scopes: info.scopes,
            kinds: info.kinds,
            join: info.join,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(token: &str, id: &str, scopes: &str) -> TokenRow {
        TokenRow {
            id: id.to_owned(),
            name: "t".into(),
            scopes: scopes.into(),
            kinds: None,
            secret_hash: hash(token),
            created_by: "test".into(),
            created_at: crate::model::now(),
            expires_at: None,
            revoked_at: None,
            join_rules: None,
            uses: 0,
        }
    }

    #[test]
    fn a_token_authenticates_only_with_its_secret() {
        let (id, token) = generate().unwrap();
        let tokens = Tokens::default();
        tokens.put(row(&token, &id, "submit"));
        let now = crate::model::now();
        let p = tokens.authenticate(&token, now).unwrap();
        assert_eq!(p.token_id, id);
        assert!(p.allows(Scope::Read) && p.allows(Scope::Submit));
        assert!(!p.allows(Scope::Operate) && !p.allows(Scope::Admin));
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push(if token.ends_with('0') { '1' } else { '0' });
        assert_eq!(
            tokens.authenticate(&wrong, now).unwrap_err(),
            Refused::WrongSecret { id: id.clone() }
        );
        assert_eq!(
            tokens.authenticate("troupe_zz_x", now).unwrap_err(),
            Refused::Malformed
        );
        let (other, text) = generate().unwrap();
        assert_eq!(
            tokens.authenticate(&text, now).unwrap_err(),
            Refused::Unknown { id: other }
        );
    }

    #[test]
    fn revoked_and_expired_tokens_are_refused() {
        let (id, token) = generate().unwrap();
        let tokens = Tokens::default();
        let now = crate::model::now();
        let mut r = row(&token, &id, "admin");
        r.expires_at = Some(now - chrono::Duration::seconds(1));
        tokens.put(r.clone());
        assert!(matches!(
            tokens.authenticate(&token, now),
            Err(Refused::Expired { .. })
        ));
        r.expires_at = None;
        r.revoked_at = Some(now);
        tokens.put(r);
        assert!(matches!(
            tokens.authenticate(&token, now),
            Err(Refused::Revoked { .. })
        ));
    }

    #[test]
    fn kinds_limit_submit_but_not_admin() {
        let p = Principal {
            token_id: "x".into(),
            name: "panel".into(),
            scopes: vec![Scope::Submit],
            kinds: Some(vec!["reboot".into()]),
            join: None,
        };
        assert!(p.may_submit("reboot") && !p.may_submit("run"));
        let admin = Principal {
            scopes: vec![Scope::Admin],
            ..p
        };
        assert!(admin.may_submit("run") && admin.allows(Scope::Operate));
    }

    #[test]
    fn legacy_tokens_are_known_by_their_hash() {
        let tokens = Tokens::default();
        let legacy = "an-old-admin-token";
        tokens.put(row(legacy, &legacy_id(legacy), "admin"));
        let p = tokens
            .authenticate(legacy, crate::model::now())
            .expect("the imported token works");
        assert!(p.allows(Scope::Admin));
    }
}
