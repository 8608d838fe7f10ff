//! troupe's engine: everything between "an action was accepted" and "its row
//! reads `succeeded`". It knows nothing of HTTP; `api` drives it through
//! [`Engine`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub mod access;
mod actor;
mod agency;
mod authority;
pub mod bundle;
mod control;
mod error;
pub mod failpoints;
pub mod goons;
pub mod host;
pub mod join;
pub mod model;
pub mod nodes;
pub mod placement;
mod runner;
pub mod secrets;
pub mod step;
pub mod store;

#[cfg(feature = "bench-probes")]
#[doc(hidden)]
pub mod bench;

pub use agency::LoadedBundle;
pub use authority::{Admitted, KeyInfo};
pub use control::ControlStats;
pub use error::{Error, Result};
pub use host::HostCommand;
pub use signing::{self, BundleHash, PublicKey};

use access::{Principal, Refused, Scope, TokenInfo, TokenSpec, Tokens};
use agency::AgencyHandle;
use authority::AuthorityHandle;
use control::{CancelOutcome, ControlHandle, SubmitOrder};
use model::{
    Action, ActionFilter, ActionId, ActionStatus, MayPin, NewAction, NodeStatus, Submitted,
};
use runner::Shared;
use store::{AuditEntry, Outcome, Store, TokenRow, Write};

/// Validated engine settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://PATH` or `mysql://USER:PASSWORD@HOST:PORT/DB`.
    pub database_url: String,
    /// Where unpacked bundles live.
    pub data_dir: PathBuf,
    /// This server's name in the `owner` column.
    pub node_id: String,
    /// Actions running at once, across all targets.
    pub max_running: usize,
    /// How long this server's claim on a running action lasts unrenewed.
    pub lease: Duration,
    /// How long a step may take to stop after being asked before its host is killed.
    pub cancel_grace: Duration,
    /// How long a connected node may stay silent before it counts as gone
    /// (the server pings it every second).
    pub node_timeout: Duration,
    /// How long a call on a node that went away (or was in flight when
    /// this server stopped) waits for the node to come back and report it.
    pub node_grace: Duration,
    pub host_command: HostCommand,
    /// Keys trusted to sign bundles, besides those added through the API.
    pub trusted_keys: Vec<PublicKey>,
    /// Deployment variables for manifests' `{{vars.NAME}}` (e.g. the
    /// command that reboots a server here): set by the operator, never by
    /// a request.
    pub vars: std::collections::BTreeMap<String, String>,
    /// The key secrets are encrypted under (see `secrets`).
    pub secrets_key: secrets::SecretsKey,
    /// Whether goons may be added over the API (a test deployment only).
    pub goons: bool,
}

pub const MAX_TARGET_LEN: usize = 255;
pub const MAX_KEY_LEN: usize = 255;

/// A handle to a running engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Store,
    agency: AgencyHandle,
    authority: AuthorityHandle,
    control: ControlHandle,
    shared: Arc<Shared>,
    tokens: Tokens,
    submits: SubmitOrder,
    /// Woken when an action may be stored without Control holding it (an
    /// insert whose commit answered with an error may still have gone
    /// through); see [`Engine::spawn_adopter`].
    adopt: tokio::sync::Notify,
}

/// Where a bundle is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleStatus {
    /// New actions of its kinds use it.
    Active,
    /// Superseded, with actions still pinned to it.
    Draining,
    /// Superseded and unused; its step host has exited.
    Drained,
    /// Its signing key was revoked.
    Revoked,
}

impl BundleStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BundleStatus::Active => "active",
            BundleStatus::Draining => "draining",
            BundleStatus::Drained => "drained",
            BundleStatus::Revoked => "revoked",
        }
    }
}

/// A bundle the server holds.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    pub hash: String,
    pub name: String,
    pub version: String,
    pub abi: u32,
    pub size: u64,
    pub signer: String,
    pub status: BundleStatus,
    /// Unfinished actions pinned to it, across all servers.
    pub in_flight: i64,
    pub host_running: bool,
    pub kinds: Vec<String>,
    pub steps: Vec<String>,
    pub created_at: model::Timestamp,
    pub activated_at: model::Timestamp,
}

/// A secret as listed: never its value.
#[derive(Debug, Clone)]
pub struct SecretInfo {
    pub name: String,
    pub updated_at: model::Timestamp,
    pub updated_by: String,
}

impl From<&store::SecretRow> for SecretInfo {
    fn from(row: &store::SecretRow) -> SecretInfo {
        SecretInfo {
            name: row.name.clone(),
            updated_at: row.updated_at,
            updated_by: row.updated_by.clone(),
        }
    }
}

/// Summary of a kind the engine can run.
#[derive(Debug, Clone)]
pub struct KindInfo {
    pub name: String,
    pub description: String,
    pub params: std::collections::BTreeMap<String, bundle::params::ParamSpec>,
    pub steps: Vec<String>,
    pub bundle: String,
    pub bundle_name: String,
    pub bundle_version: String,
}

impl Engine {
    /// Connects to the database (applying migrations) and starts the actors.
    /// Call [`Engine::resume`] after loading bundles to pick up unfinished actions.
    pub async fn start(config: Config) -> Result<Engine> {
        let store = Store::connect(&config.database_url).await?;
        let bundles = config.data_dir.join("bundles");
        std::fs::create_dir_all(&bundles)
            .map_err(Error::io(format!("creating {}", bundles.display())))?;
        bundle::sweep_staging(&bundles);
        let agency = AgencyHandle::spawn(config.host_command.clone(), config.cancel_grace);
        let shared = Arc::new(Shared {
            store: store.clone(),
            agency: agency.clone(),
            owner: config.node_id.clone(),
            lease: config.lease,
            stopping: CancellationToken::new(),
            closed: CancellationToken::new(),
            secrets_key: config.secrets_key.clone(),
            nodes: drained_nodes(&store).await?,
            node_grace: config.node_grace,
            goons: config.goons.then(Default::default),
            vars: config
                .vars
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        });
        let authority = AuthorityHandle::start(
            store.clone(),
            agency.clone(),
            bundles,
            config.trusted_keys.clone(),
        )
        .await?;
        let control = ControlHandle::spawn(shared.clone(), config.max_running);
        let tokens = Tokens::default();
        tokens.replace_all(store.tokens().await?);
        tokens.spawn_refresh(store.clone(), shared.stopping.clone());
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                store,
                agency,
                authority,
                control,
                shared,
                tokens,
                submits: SubmitOrder::default(),
                adopt: tokio::sync::Notify::new(),
            }),
        };
        engine.spawn_lease_renewal();
        engine.spawn_adopter();
        Ok(engine)
    }

    /// After an insert whose outcome is unknown, looks for unfinished
    /// actions Control does not hold and hands them over (as on a restart;
    /// Control ignores the ones it has), so an action stored just as the
    /// database failed is not left unrun. Retries until the database answers.
    fn spawn_adopter(&self) {
        let engine = self.clone();
        tokio::spawn(async move {
            let stopping = engine.inner.shared.stopping.clone();
            loop {
                tokio::select! {
                    _ = engine.inner.adopt.notified() => {}
                    _ = stopping.cancelled() => return,
                }
                let mut delay = Duration::from_millis(200);
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopping.cancelled() => return,
                    }
                    match engine.resume().await {
                        Ok(n) => {
                            tracing::info!(
                                unfinished = n,
                                "checked for actions stored while the database failed"
                            );
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot yet check for actions stored while the database failed; retrying");
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        });
    }

    fn spawn_lease_renewal(&self) {
        let shared = self.inner.shared.clone();
        tokio::spawn(async move {
            let every = shared.lease / 3;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    // Renewed through the drain: the actions are still ours.
                    _ = shared.closed.cancelled() => return,
                }
                let renew = Write::RenewLeases {
                    owner: shared.owner.clone(),
                    until: crate::model::now() + shared.lease,
                };
                if let Err(e) = shared.store.write(vec![renew]).await {
                    tracing::warn!(error = %e, "could not renew action leases");
                }
            }
        });
    }

    /// The connected remote nodes: the transport attaches them here.
    pub fn nodes(&self) -> &nodes::Nodes {
        &self.inner.shared.nodes
    }

    /// Decides on a node's hello, its key already proven (it signed the
    /// challenge). A name belongs to the key it was accepted with: another
    /// key is refused, and so is a removed one. A new name is accepted with
    /// a join token whose rules allow it (the name, a use left); without
    /// one the node waits in memory (`Nodes::ask_to_join`, capped), nothing
    /// written, until an admin accepts its key.
    pub async fn admit_node(
        &self,
        name: &str,
        key: &signing::PublicKey,
        token: Option<&access::Principal>,
        capabilities: &std::collections::BTreeMap<String, String>,
        address: Option<&str>,
    ) -> Result<nodes::Admission> {
        use nodes::Admission;
        let now = model::now();
        let key_text = key.to_string();
        let known = match self.node(name).await {
            Ok(row) => Some(row),
            Err(Error::NodeNotFound(_)) => None,
            Err(e) => return Err(e),
        };
        match known {
            Some(row) if row.status == NodeStatus::Accepted && row.public_key == key_text => {
                let allowed = allowed_capabilities(&row);
                let mut row = row;
                row.capabilities = Some(json!(capabilities).to_string());
                row.last_seen_at = Some(now);
                self.inner
                    .store
                    .write(vec![Write::PutNode(Box::new(row))])
                    .await?;
                return Ok(Admission::Accepted { allowed });
            }
            Some(row) if row.status == NodeStatus::Accepted => {
                return Ok(Admission::Refused(format!(
                    "the name {name:?} belongs to another node key; pick another --name, or have an admin remove the old node (`troupe nodes remove {name}`)"
                )));
            }
            Some(row) if row.status == NodeStatus::Removed && row.public_key == key_text => {
                return Ok(Admission::Refused(format!(
                    "node {name:?} was removed; its key is no longer accepted (a new key, from a fresh data directory, can join again)"
                )));
            }
            // New, waiting (a row from before waiting nodes were kept in
            // memory), or a removed name taken by a new key.
            _ => {}
        }
        let Some(token) = token else {
            let asked = self.nodes().ask_to_join(nodes::PendingNode {
                name: name.to_owned(),
                key: key.clone(),
                capabilities: capabilities.clone(),
                address: address.map(str::to_owned),
                first_seen: now,
                last_seen: now,
            });
            return Ok(if asked {
                Admission::Pending
            } else {
                Admission::Refused(format!(
                    "{} nodes already wait for an admin on this server; join with a join token (`troupe nodes token create`)",
                    nodes::MAX_PENDING
                ))
            });
        };
        let rules = token.join.clone();
        if let Some(rules) = &rules {
            if !rules.allows_name(name) {
                return Ok(Admission::Refused(format!(
                    "join token {:?} does not let a node take the name {name:?} (it allows {})",
                    token.name,
                    rules.names.as_deref().unwrap_or("*")
                )));
            }
            let used = self
                .inner
                .store
                .write(vec![Write::UseJoinToken {
                    id: token.token_id.clone(),
                    max_uses: rules.max_uses,
                    at: now,
                }])
                .await?;
            if !matches!(used.first(), Some(store::Outcome::Done { rows: 1 })) {
                return Ok(Admission::Refused(format!(
                    "join token {:?} has no uses left (it admitted {} node(s)); ask an admin for a new one",
                    token.name,
                    rules.max_uses.unwrap_or_default()
                )));
            }
        }
        let allowed = rules.and_then(|r| r.capabilities);
        let row = store::NodeRow {
            name: name.to_owned(),
            public_key: key_text,
            status: NodeStatus::Accepted,
            created_at: now,
            accepted_at: Some(now),
            accepted_by: Some(token.name.clone()),
            capabilities: Some(json!(capabilities).to_string()),
            last_seen_at: Some(now),
            draining_since: None,
            allowed_capabilities: allowed.as_ref().map(|a| json!(a).to_string()),
        };
        let audit = AuditEntry::new(
            &token.name,
            "node.joined",
            name,
            json!({ "public_key": row.public_key, "fingerprint": key.fingerprint(), "allowed_capabilities": allowed }),
        );
        self.inner
            .store
            .write(vec![
                Write::PutNode(Box::new(row)),
                Write::Audit(Box::new(audit)),
            ])
            .await?;
        self.nodes().forget_pending(name);
        Ok(Admission::Accepted { allowed })
    }

    /// Lets in the node that holds `key` under `name` (it takes calls from
    /// its next connection): `key` is a waiting node's fingerprint
    /// (`SHA256:…`) or a whole public key (`ed25519:…`), which admits a
    /// node before it has ever connected. Accepting the key already in is
    /// no change and writes nothing.
    pub async fn accept_node(&self, name: &str, key: &str, by: &str) -> Result<store::NodeRow> {
        if !placement::is_capability_name(name) {
            return Err(Error::InvalidRequest(format!(
                "{name:?} is not a node name (letters, digits, '-', '_', '.'; at most 64)"
            )));
        }
        let key = key.trim();
        let known = match self.node(name).await {
            Ok(row) => Some(row),
            Err(Error::NodeNotFound(_)) => None,
            Err(e) => return Err(e),
        };
        // The key the name already has, named by its text or fingerprint.
        let known_key = known
            .as_ref()
            .and_then(|r| r.public_key.parse::<signing::PublicKey>().ok())
            .filter(|k| k.to_string() == key || k.fingerprint() == key);
        let public_key = match (known_key, key.parse::<signing::PublicKey>()) {
            (Some(k), _) | (None, Ok(k)) => k,
            (None, Err(_)) if key.starts_with("ed25519:") => {
                return Err(Error::InvalidRequest(format!(
                    "{key:?} is not a public key (ed25519:<64 hex digits>)"
                )));
            }
            (None, Err(_)) => match self.nodes().pending_key(name, key) {
                Some(p) => p.key,
                None => {
                    return Err(Error::PendingKeyNotFound {
                        name: name.to_owned(),
                        key: key.to_owned(),
                    });
                }
            },
        };
        let key_text = public_key.to_string();
        if let Some(row) = &known
            && row.status == NodeStatus::Accepted
        {
            if row.public_key == key_text {
                return Ok(row.clone());
            }
            let fingerprint = row
                .public_key
                .parse::<signing::PublicKey>()
                .map(|k| k.fingerprint())
                .unwrap_or_else(|_| row.public_key.clone());
            return Err(Error::NodeKeyConflict {
                name: name.to_owned(),
                fingerprint,
            });
        }
        let now = model::now();
        let row = store::NodeRow {
            name: name.to_owned(),
            public_key: key_text,
            status: NodeStatus::Accepted,
            created_at: known.as_ref().map_or(now, |r| r.created_at),
            accepted_at: Some(now),
            accepted_by: Some(by.to_owned()),
            capabilities: known.as_ref().and_then(|r| r.capabilities.clone()),
            last_seen_at: known.as_ref().and_then(|r| r.last_seen_at),
            draining_since: known.as_ref().and_then(|r| r.draining_since),
            allowed_capabilities: None,
        };
        self.put_node(&row, by, "node.accepted").await?;
        self.nodes().forget_pending(name);
        Ok(row)
    }

    /// Removes a node: its key is refused from now on and its connection
    /// ends at once (its steps in flight fail naming it).
    pub async fn remove_node(&self, name: &str, by: &str) -> Result<store::NodeRow> {
        let mut row = self.node(name).await?;
        // Removed already: nothing changes, nothing to record.
        if row.status != NodeStatus::Removed {
            row.status = NodeStatus::Removed;
            self.put_node(&row, by, "node.removed").await?;
            tracing::warn!(node = %name, by, "node removed");
        }
        self.nodes().forget_pending(name);
        self.nodes()
            .disconnect(name, "this node was removed by an admin");
        Ok(row)
    }

    /// Stores a node's changed row with the audit entry that records it.
    async fn put_node(&self, row: &store::NodeRow, by: &str, event: &str) -> Result<()> {
        let fingerprint = row
            .public_key
            .parse::<signing::PublicKey>()
            .map(|k| k.fingerprint())
            .ok();
        let audit = AuditEntry::new(
            by,
            event,
            &row.name,
            json!({ "public_key": row.public_key, "fingerprint": fingerprint }),
        );
        self.inner
            .store
            .write(vec![
                Write::PutNode(Box::new(row.clone())),
                Write::Audit(Box::new(audit)),
            ])
            .await?;
        Ok(())
    }

    /// Drains a node (or, with `draining: false`, gives it steps again):
    /// it gets no new steps; those in flight finish. Kept in its row, so it
    /// holds across reconnects and server restarts.
    pub async fn drain_node(&self, name: &str, draining: bool, by: &str) -> Result<store::NodeRow> {
        let mut row = self.node(name).await?;
        if row.draining_since.is_some() != draining {
            row.draining_since = draining.then(model::now);
            let event = if draining {
                "node.drained"
            } else {
                "node.undrained"
            };
            self.put_node(&row, by, event).await?;
        }
        self.nodes().set_draining(name, draining);
        Ok(row)
    }

    /// Every node that joined (or, before waiting nodes were kept in memory,
    /// asked to), by name.
    pub async fn node_rows(&self) -> Result<Vec<store::NodeRow>> {
        self.inner.store.node_rows(None).await
    }

    /// The node that joined or asked to under `name`.
    pub async fn node(&self, name: &str) -> Result<store::NodeRow> {
        self.inner
            .store
            .node_rows(Some(name))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::NodeNotFound(name.to_owned()))
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Hands a bundle and its detached signature to the Source Authority:
    /// the one way code gets into the engine. `by` names who asked (a
    /// token's name) for the audit log.
    pub async fn admit_bundle(
        &self,
        bytes: Vec<u8>,
        signature: String,
        by: &str,
    ) -> Result<Admitted> {
        self.inner
            .authority
            .admit(bytes, signature, by.to_owned())
            .await
    }

    /// Makes a bundle the server holds the active version of its name again.
    pub async fn activate_bundle(&self, hash: &str, by: &str) -> Result<BundleInfo> {
        self.inner
            .authority
            .activate(hash.to_owned(), by.to_owned())
            .await?;
        self.bundle(hash).await
    }

    /// Every bundle the server holds, oldest first.
    pub async fn bundles(&self) -> Result<Vec<BundleInfo>> {
        let rows = self.inner.store.bundles().await?;
        let in_flight = self.inner.store.in_flight_by_bundle().await?;
        let states = self.inner.agency.states().await?;
        let revoked_keys: std::collections::HashSet<String> = self
            .keys()
            .await?
            .into_iter()
            .filter(|k| k.revoked)
            .map(|k| k.key.id().to_string())
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let state = states
                .iter()
                .find(|s| s.bundle.hash.to_string() == row.hash);
            let revoked = revoked_keys.contains(&row.signer);
            let n = in_flight.get(&row.hash).copied().unwrap_or(0);
            let status = match (revoked, state.is_some_and(|s| s.active), n) {
                (true, _, _) => BundleStatus::Revoked,
                (false, true, _) => BundleStatus::Active,
                (false, false, 0) => BundleStatus::Drained,
                (false, false, _) => BundleStatus::Draining,
            };
            let manifest = match state {
                Some(s) => Some(s.bundle.manifest.clone()),
                None => match self.inner.store.bundle_content(&row.hash).await? {
                    Some(bytes) => bundle::inspect(&bytes).ok(),
                    None => None,
                },
            };
            let (kinds, steps) = manifest
                .map(|m| {
                    (
                        m.kinds.keys().cloned().collect(),
                        m.steps.keys().cloned().collect(),
                    )
                })
                .unwrap_or_default();
            out.push(BundleInfo {
                host_running: state.is_some_and(|s| s.host_running),
                hash: row.hash,
                name: row.name,
                version: row.version,
                abi: row.abi,
                size: row.size,
                signer: row.signer,
                status,
                in_flight: n,
                kinds,
                steps,
                created_at: row.created_at,
                activated_at: row.activated_at,
            });
        }
        Ok(out)
    }

    pub async fn bundle(&self, hash: &str) -> Result<BundleInfo> {
        self.bundles()
            .await?
            .into_iter()
            .find(|b| b.hash == hash)
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_owned()))
    }

    /// The signed bytes of a bundle the server holds.
    pub async fn bundle_content(&self, hash: &str) -> Result<Vec<u8>> {
        #[cfg(feature = "failpoints")]
        if let Some(ms) = (|| {
            fail::fail_point!("engine.bundle_content", |ms| ms
                .and_then(|ms| ms.parse::<u64>().ok()));
            None
        })() {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        self.inner
            .store
            .bundle_content(hash)
            .await?
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_owned()))
    }

    /// The detached signature the bundle was admitted with (what a node
    /// verifies it by, with its own keys).
    pub async fn bundle_signature(&self, hash: &str) -> Result<String> {
        self.inner
            .store
            .bundles()
            .await?
            .into_iter()
            .find(|b| b.hash == hash)
            .map(|b| b.signature)
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_owned()))
    }

    pub async fn keys(&self) -> Result<Vec<KeyInfo>> {
        self.inner.authority.keys().await
    }

    /// Trusts a public key (in its `ed25519:…` text form) for signing bundles.
    pub async fn trust_key(&self, public_key: &str, by: &str) -> Result<KeyInfo> {
        self.inner
            .authority
            .trust(public_key.parse()?, by.to_owned())
            .await
    }

    /// Revokes a key: its bundles take no new actions, and actions in flight
    /// on them fail at their next step.
    pub async fn revoke_key(&self, key_id: &str, by: &str) -> Result<KeyInfo> {
        self.inner
            .authority
            .revoke(key_id.to_owned(), by.to_owned())
            .await
    }

    /// Who a bearer token belongs to, checked against the in-memory copy of
    /// `api_tokens` (no database read).
    pub fn authenticate(&self, token: &str) -> Result<Principal, Refused> {
        self.inner.tokens.authenticate(token, model::now())
    }

    /// Creates an API token; returns it as listed and its text, which is
    /// shown this once and stored only as a hash.
    pub async fn create_token(&self, spec: TokenSpec, by: &str) -> Result<(TokenInfo, String)> {
        let (row, text) = Engine::store_token(&self.inner.store, spec, by).await?;
        self.inner.tokens.put(row.clone());
        tracing::info!(token_id = %row.id, name = %row.name, scopes = %row.scopes, by, "API token created");
        Ok((TokenInfo::from_row(&row), text))
    }

    /// Creates an API token straight in the database at `database_url`,
    /// with no engine running: on a server's host, the way back in when
    /// every admin token is lost. Audited like any other; running servers
    /// take it within [`access::REFRESH`]. The database must exist already.
    pub async fn create_token_in(
        database_url: &str,
        spec: TokenSpec,
        by: &str,
    ) -> Result<(TokenInfo, String)> {
        let store = Store::connect(database_url).await?;
        let (row, text) = Engine::store_token(&store, spec, by).await?;
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
            .write(vec![
                Write::CreateToken(Box::new(row.clone())),
                Write::Audit(Box::new(audit)),
            ])
            .await?;
        Ok((row, text))
    }

    /// Stores a token whose text the operator chose (the old single
    /// `--admin-token`), with the admin scope, unless it is already stored.
    /// A stored one that was revoked stays revoked.
    pub async fn import_admin_token(&self, text: &str) -> Result<()> {
        let id = access::legacy_id(text);
        if self.inner.store.tokens().await?.iter().any(|t| t.id == id) {
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
        self.inner
            .store
            .write(vec![
                Write::CreateToken(Box::new(row.clone())),
                Write::Audit(Box::new(audit)),
            ])
            .await?;
        self.inner.tokens.put(row);
        Ok(())
    }

    /// Every API token, oldest first (never their secrets).
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let rows = self.inner.store.tokens().await?;
        self.inner.tokens.replace_all(rows.clone());
        Ok(rows.iter().map(TokenInfo::from_row).collect())
    }

    /// Revokes an API token: refused from the next request on, on this
    /// server at once and on others within [`access::REFRESH`]. The last
    /// active admin token is not revoked ([`Error::LastAdminToken`]): the
    /// database decides, so two revokes racing cannot leave none. Revoking
    /// a revoked token changes nothing.
    pub async fn revoke_token(&self, id: &str, by: &str) -> Result<TokenInfo> {
        let find = async || -> Result<TokenRow> {
            self.inner
                .store
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
            .inner
            .store
            .write(vec![Write::RevokeToken {
                id: id.to_owned(),
                at,
                audit: Box::new(audit),
            }])
            .await?;
        if outcome.first().is_none_or(|o| o.rows() == 0) {
            // Revoked meanwhile by another request, or the last admin token.
            let now = find().await?;
            if now.revoked_at.is_some() {
                self.inner.tokens.put(now.clone());
                return Ok(TokenInfo::from_row(&now));
            }
            tracing::warn!(token_id = %id, name = %row.name, by, "refused to revoke the last active admin token");
            return Err(Error::LastAdminToken(id.to_owned()));
        }
        row.revoked_at = Some(at);
        self.inner.tokens.put(row.clone());
        tracing::warn!(token_id = %id, name = %row.name, by, "API token revoked");
        Ok(TokenInfo::from_row(&row))
    }

    /// Stores a secret for steps (encrypted); replaces one of the same name.
    pub async fn set_secret(&self, name: &str, value: &str, by: &str) -> Result<SecretInfo> {
        if !secrets::is_valid_name(name) {
            return Err(Error::InvalidRequest(
                "a secret name is 1 to 128 letters, digits, '_' or '-'".into(),
            ));
        }
        if value.is_empty() || value.len() > secrets::MAX_SECRET {
            return Err(Error::InvalidRequest(format!(
                "a secret's value is 1 to {} bytes",
                secrets::MAX_SECRET
            )));
        }
        let (nonce, ciphertext) = self
            .inner
            .config
            .secrets_key
            .seal(name, value)
            .map_err(Error::io("encrypting a secret"))?;
        let row = store::SecretRow {
            name: name.to_owned(),
            nonce,
            ciphertext,
            updated_at: model::now(),
            updated_by: by.to_owned(),
        };
        let audit = AuditEntry::new(by, "secret.set", name, json!({}));
        self.inner
            .store
            .write(vec![
                Write::SetSecret(Box::new(row.clone())),
                Write::Audit(Box::new(audit)),
            ])
            .await?;
        tracing::info!(secret = name, by, "secret set");
        Ok(SecretInfo::from(&row))
    }

    pub async fn delete_secret(&self, name: &str, by: &str) -> Result<()> {
        let audit = AuditEntry::new(by, "secret.deleted", name, json!({}));
        let outcome = self
            .inner
            .store
            .write(vec![Write::DeleteSecret {
                name: name.to_owned(),
                audit: Box::new(audit),
            }])
            .await?;
        if outcome[0] == (Outcome::Done { rows: 0 }) {
            return Err(Error::SecretNotFound(name.to_owned()));
        }
        Ok(())
    }

    /// The secrets that are set: names and who set them, never values.
    pub async fn secrets(&self) -> Result<Vec<SecretInfo>> {
        Ok(self
            .inner
            .store
            .all_secrets()
            .await?
            .iter()
            .map(SecretInfo::from)
            .collect())
    }

    /// The goons this server holds, if it was started with them on.
    pub fn goons(&self) -> Result<Vec<goons::Armed>> {
        Ok(self.goons_on()?.list())
    }

    fn goons_on(&self) -> Result<&goons::Goons> {
        self.inner.shared.goons.as_deref().ok_or(Error::GoonsOff)
    }

    /// Arms a goon: from now on it acts on the attempts it matches.
    pub async fn add_goon(&self, goon: goons::Goon, by: &str) -> Result<goons::Armed> {
        let goons = self.goons_on()?;
        goon.check().map_err(Error::InvalidRequest)?;
        let armed = goons.add(goon, by);
        let audit = AuditEntry::new(by, "goon.added", &armed.id.to_string(), json!(armed.goon));
        if let Err(e) = self
            .inner
            .store
            .write(vec![Write::Audit(Box::new(audit))])
            .await
        {
            goons.remove(armed.id);
            return Err(e);
        }
        tracing::warn!(goon = armed.id, by, step = %armed.goon.step, "goon added");
        Ok(armed)
    }

    /// Disarms goon `id`, or every goon with `None`; returns how many.
    pub async fn remove_goons(&self, id: Option<u64>, by: &str) -> Result<usize> {
        let goons = self.goons_on()?;
        let removed = match id {
            Some(id) if goons.remove(id) => 1,
            Some(id) => return Err(Error::GoonNotFound(id)),
            None => goons.clear(),
        };
        if removed == 0 {
            return Ok(0);
        }
        let what = id.map_or_else(|| "all".to_owned(), |id| id.to_string());
        let audit = AuditEntry::new(by, "goon.removed", &what, json!({ "removed": removed }));
        self.inner
            .store
            .write(vec![Write::Audit(Box::new(audit))])
            .await?;
        Ok(removed)
    }

    /// The audit log, newest first.
    pub async fn audit(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        self.inner.store.audit(limit, before).await
    }

    /// Hands every unfinished action in the database to Control, oldest first.
    pub async fn resume(&self) -> Result<usize> {
        let now = crate::model::now();
        let actions = self
            .inner
            .store
            .unfinished(&self.inner.config.node_id, now)
            .await?;
        let claims: Vec<Write> = actions
            .iter()
            .filter(|a| a.status == ActionStatus::Running)
            .map(|a| Write::Claim {
                id: a.id,
                owner: self.inner.config.node_id.clone(),
                lease_until: now + self.inner.config.lease,
            })
            .collect();
        if !claims.is_empty() {
            self.inner.store.write(claims).await?;
        }
        let n = actions.len();
        self.inner.store.hold(actions.iter().map(|a| a.id));
        for action in actions {
            self.inner.control.enqueue(action);
        }
        Ok(n)
    }

    /// The kinds new actions can use, from the active bundles.
    pub async fn kinds(&self) -> Result<Vec<KindInfo>> {
        let mut kinds: Vec<KindInfo> = self
            .inner
            .agency
            .states()
            .await?
            .into_iter()
            .filter(|s| s.active && !s.revoked)
            .flat_map(|s| {
                let b = s.bundle;
                b.manifest
                    .kinds
                    .iter()
                    .map(|(name, k)| KindInfo {
                        name: name.clone(),
                        description: k.description.clone(),
                        params: k.params.specs(),
                        steps: k.steps.iter().map(|s| s.name().to_owned()).collect(),
                        bundle: b.hash.to_string(),
                        bundle_name: b.manifest.name.clone(),
                        bundle_version: b.manifest.version.clone(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        kinds.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(kinds)
    }

    /// Validates a request, records the action durably and hands it to Control.
    /// A pinned version must be one `may_pin` allows.
    pub async fn submit(&self, new: NewAction, may_pin: MayPin) -> Result<Submitted> {
        if self.inner.shared.stopping.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let target = new.target.trim();
        if target.is_empty() {
            return Err(Error::InvalidRequest("target must not be empty".into()));
        }
        if target.len() > MAX_TARGET_LEN || target.chars().any(char::is_control) {
            return Err(Error::InvalidRequest(format!(
                "target must be at most {MAX_TARGET_LEN} bytes with no control characters"
            )));
        }
        if let Some(key) = &new.idempotency_key
            && (key.is_empty() || key.len() > MAX_KEY_LEN)
        {
            return Err(Error::InvalidRequest(format!(
                "idempotency_key must be 1 to {MAX_KEY_LEN} bytes"
            )));
        }
        let new = NewAction {
            target: target.to_owned(),
            ..new
        };
        let bundle = self
            .inner
            .agency
            .resolve(new.kind.clone(), new.bundle.clone(), may_pin)
            .await?;
        let kind = &bundle.manifest.kinds[&new.kind];
        let mut new = new;
        kind.params.apply(&mut new.params).map_err(|e| match e {
            bundle::params::ParamError::Missing(params) => Error::MissingParam {
                kind: new.kind.clone(),
                params,
            },
            bundle::params::ParamError::Invalid(message) => Error::InvalidParam(message),
        })?;
        if let Some(var) = bundle::manifest::vars_used(kind)
            .into_iter()
            .find(|v| !self.inner.config.vars.contains_key(v))
        {
            return Err(Error::KindNotConfigured {
                kind: new.kind.clone(),
                var,
            });
        }
        kind.params
            .check_allowed(&new.params, &self.inner.shared.vars)
            .map_err(Error::ParamNotAllowed)?;
        let request = json!({ "kind": new.kind, "target": new.target, "params": new.params });
        let request_hash: String = Sha256::digest(request.to_string().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let steps: Vec<(String, String)> = kind
            .steps
            .iter()
            .map(|s| (s.name().to_owned(), s.step.clone()))
            .collect();
        // When the target is idle and there is room, Control reserves it and
        // the insert starts the action too: one commit fewer before its
        // first step runs.
        //
        // Submits for one target go one at a time from here until Control
        // holds the action, so ids, and so start order, follow the order in
        // which they were accepted even when they share a group commit.
        let turn = self.inner.submits.turn(&new.target).await;
        // A first step that needs a node starts with the insert only when a
        // node that has what it needs is free now (it is counted busy
        // from here); otherwise the runner places it and records it waiting.
        let first = kind.steps.first();
        let requires = first.map(|u| u.requires(&bundle.manifest.steps[&u.step]));
        let placed = match &requires {
            Some(r) if !r.is_empty() => self.place_at_submit(&new, r),
            _ => None,
        };
        let startable = requires.is_some_and(|r| r.is_empty()) || placed.is_some();
        let reserved = startable && self.inner.control.reserve(&new.target).await;
        let placed = placed.filter(|_| reserved);
        let at = crate::model::now();
        let insert = Write::Insert {
            new: new.clone(),
            bundle: bundle.hash.to_string(),
            request_hash,
            owner: self.inner.config.node_id.clone(),
            steps,
            at,
            start: reserved.then(|| at + self.inner.config.lease),
            node: placed.as_ref().map(|p| p.name.clone()),
        };
        // Recording and handing over run on their own task, so a caller that
        // goes away mid-request cannot leave an action stored but not run.
        let (inner, target) = (self.inner.clone(), new.target.clone());
        // The action as the insert stores it, less the id it will get.
        let built = insert.inserted(0).expect("an insert builds its action");
        let handover = tokio::spawn(async move {
            let outcome = inner.store.write(vec![insert]).await.map(|o| o[0]);
            let action = match outcome {
                Ok(Outcome::Inserted(id)) => Some(Action { id, ..built }),
                // The commit may have gone through all the same.
                Err(_) => {
                    inner.adopt.notify_one();
                    None
                }
                _ => None,
            };
            match (&action, reserved) {
                (Some(a), true) => inner.control.begin(a.clone(), placed),
                (Some(a), false) => inner.control.enqueue(a.clone()),
                (None, true) => inner.control.unreserve(target),
                (None, false) => {}
            }
            inner.submits.done(turn);
            outcome.map(|o| (o, action))
        });
        let (outcome, action) = handover.await.map_err(|_| Error::ShuttingDown)??;
        match outcome {
            Outcome::Inserted(_) => Ok(Submitted {
                action: action.expect("an inserted action is built"),
                created: true,
            }),
            Outcome::Existing(id) => Ok(Submitted {
                action: self.action(id).await?,
                created: false,
            }),
            Outcome::Conflict => Err(Error::IdempotencyConflict(
                new.idempotency_key.unwrap_or_default(),
            )),
            Outcome::Done { .. } => {
                unreachable!("an insert reports Inserted, Existing or Conflict")
            }
        }
    }

    /// A free node for a new action's first step, if its requirements
    /// resolve before the action has an id (they may name params, the
    /// target, vars) and a connected node meets them.
    fn place_at_submit(
        &self,
        new: &NewAction,
        requires: &std::collections::BTreeMap<String, String>,
    ) -> Option<nodes::Placed> {
        if requires.values().any(|v| v.contains("action.id")) {
            return None;
        }
        let action = bundle::template::Action {
            id: 0,
            kind: &new.kind,
            target: &new.target,
            params: &new.params,
        };
        let scope = bundle::template::scope(action, &Default::default(), &self.inner.shared.vars);
        let wants = placement::Requirement::resolve(requires, &scope).ok()?;
        self.inner.shared.nodes.place(&wants)
    }

    pub async fn action(&self, id: ActionId) -> Result<Action> {
        self.inner
            .store
            .action(id)
            .await?
            .ok_or(Error::ActionNotFound(id))
    }

    /// The attempts of action `id`'s steps that failed (each tried again or
    /// ending the step), by step and attempt: why a retry happened.
    pub async fn failed_attempts(&self, id: ActionId) -> Result<Vec<model::FailedAttempt>> {
        self.inner.store.failed_attempts(id).await
    }

    /// What action `id`'s steps logged (`troupe_sdk::Context::log`), by step and
    /// attempt; empty if nothing was logged yet. A running attempt's lines
    /// are stored when it ends.
    pub async fn logs(&self, id: ActionId) -> Result<Vec<model::StepLog>> {
        let action = self.action(id).await?;
        let mut logs = self.inner.store.logs(id).await?;
        for log in &mut logs {
            if let Some(step) = action.steps.iter().find(|s| s.seq == log.seq) {
                log.step = step.name.clone();
            }
        }
        Ok(logs)
    }

    /// Waits up to `timeout` for the action to finish or, with `since`, for
    /// its revision to pass `since`; returns it as it is then.
    pub async fn wait(
        &self,
        id: ActionId,
        since: Option<i64>,
        timeout: Duration,
    ) -> Result<Action> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribe before reading, so no change can slip between the two. A
        // live action is not finished yet, so waiting for its end needs no read.
        let (mut changes, live) = self.inner.store.watch(id);
        let mut action = match (since, live) {
            (None, true) => None,
            _ => Some(self.action(id).await?),
        };
        loop {
            if let Some(a) = action.take() {
                if a.status.is_terminal() || since.is_some_and(|r| a.revision > r) {
                    return Ok(a);
                }
                action = Some(a);
            }
            tokio::select! {
                changed = changes.changed() => {
                    let change = changes.borrow_and_update().clone();
                    let terminal = changed.is_err() || change.terminal;
                    // The end usually comes with the final state; without
                    // `since`, intermediate states are not read at all.
                    if let Some(last) = change.last.filter(|_| terminal) {
                        return Ok(Arc::unwrap_or_clone(last));
                    }
                    if since.is_some() || terminal {
                        action = Some(self.action(id).await?);
                    }
                    if changed.is_err() {
                        break;
                    }
                }
                // Intermediate changes were not read: read the state now.
                _ = tokio::time::sleep_until(deadline) => return self.action(id).await,
                // Served through a shutdown's drain, so a client following an
                // action sees it end if it ends by then.
                _ = self.inner.shared.closed.cancelled() => break,
            }
        }
        match action {
            Some(a) => Ok(a),
            None => self.action(id).await,
        }
    }

    pub async fn list(&self, filter: &ActionFilter) -> Result<Vec<Action>> {
        self.inner.store.list(filter).await
    }

    /// Cancels a queued action at once; asks a running one to stop (its
    /// current step is cancelled and the rest skipped).
    /// Cancels an unfinished action. The request is committed first
    /// (`cancel_requested_at`), so once this returns `Ok` the action ends
    /// `cancelled` whatever happens next: a running step is asked to stop,
    /// a queued action ends at once, and a runner that starts or resumes the
    /// action later (after a crash, a shutdown, a failed write) ends it.
    pub async fn cancel(&self, id: ActionId) -> Result<Action> {
        let request = Write::RequestCancel {
            id,
            at: crate::model::now(),
        };
        if self.inner.store.write(vec![request]).await?[0] == (Outcome::Done { rows: 0 }) {
            // Unknown, or already ended.
            let action = self.action(id).await?;
            return Err(Error::NotCancellable {
                id,
                status: action.status,
            });
        }
        match self.inner.control.cancel(id).await {
            CancelOutcome::Running => {}
            CancelOutcome::Dequeued | CancelOutcome::Unknown => {
                match self.cancel_queued(id).await {
                    Ok(Outcome::Done { rows: 0 }) => {
                        // It started meanwhile: ask Control again.
                        self.inner.control.cancel(id).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Out of Control's queue but still `queued` in the
                        // database: hand it back, and its runner ends it.
                        tracing::warn!(action_id = id, error = %e, "could not end a cancelled queued action; it ends when the database answers");
                        self.inner.adopt.notify_one();
                    }
                }
            }
        }
        self.action(id).await
    }

    async fn cancel_queued(&self, id: ActionId) -> Result<Outcome> {
        fail::fail_point!("store.cancel_queued", |_| Err(Error::Database(
            sqlx::Error::Protocol("the write failed (injected)".into())
        )));
        let write = Write::CancelQueued {
            id,
            at: crate::model::now(),
        };
        Ok(self.inner.store.write(vec![write]).await?[0])
    }

    pub async fn control_stats(&self) -> ControlStats {
        self.inner.control.stats().await
    }

    /// Stops starting steps and refuses new submits (`ShuttingDown`);
    /// [`Engine::shutdown`] finishes the job.
    /// Whether this server should be sent work: `Err` says why not, as a
    /// stable code and a sentence (never the database's own message).
    /// Answers within `within` whatever the database does.
    pub async fn readiness(
        &self,
        within: Duration,
    ) -> std::result::Result<(), (&'static str, String)> {
        if self.inner.shared.stopping.is_cancelled() {
            return Err((
                "shutting_down",
                "this server is shutting down; send work to another".into(),
            ));
        }
        match tokio::time::timeout(within, self.inner.store.writable()).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err((
                "database_read_only",
                "the database is read-only (a replica, or a primary after a switchover)".into(),
            )),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: the database does not answer");
                Err((
                    "database_unavailable",
                    "the database does not answer".into(),
                ))
            }
            Err(_) => Err((
                "database_unavailable",
                format!("the database did not answer within {within:?}"),
            )),
        }
    }

    pub fn begin_shutdown(&self) {
        self.inner.shared.stopping.cancel();
    }

    /// Graceful stop: starts no new step, lets running steps finish for up to
    /// `grace`, then releases unfinished actions (they resume on the next
    /// start) and stops the step hosts.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shared.stopping.cancel();
        if tokio::time::timeout(grace, self.inner.control.drain())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "steps still running at the shutdown deadline; they resume on the next start"
            );
        }
        // Hosts first: once they (and what their plugins started) are gone,
        // no step of ours is running, and the actions may be handed over.
        self.inner.agency.shutdown().await;
        self.inner.shared.closed.cancel();
        let release = Write::Release {
            owner: self.inner.config.node_id.clone(),
            at: crate::model::now(),
        };
        if let Err(e) = self.inner.store.write(vec![release]).await {
            tracing::warn!(error = %e, "could not release unfinished actions; they resume when their lease expires");
        }
    }
}

/// The node registry, with the nodes an admin drained marked so.
async fn drained_nodes(store: &Store) -> Result<nodes::Nodes> {
    let nodes = nodes::Nodes::default();
    for row in store.node_rows(None).await? {
        if row.draining_since.is_some() {
            nodes.set_draining(&row.name, true);
        }
    }
    Ok(nodes)
}

/// The capability patterns a node's admission allowed, as stored in its
/// row; `None`: any it reports.
fn allowed_capabilities(row: &store::NodeRow) -> Option<Vec<String>> {
    row.allowed_capabilities
        .as_deref()
        .and_then(|a| serde_json::from_str(a).ok())
}
