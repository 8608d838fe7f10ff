//! troupe's engine: everything between "an action was accepted" and "its row
//! reads `succeeded`". It knows nothing of HTTP; `api` drives it through
//! [`Engine`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

mod actor;
mod agency;
mod authority;
pub mod bundle;
mod control;
mod error;
pub mod host;
pub mod model;
mod runner;
mod step;
pub mod store;

#[doc(hidden)]
pub mod bench;

pub use agency::LoadedBundle;
pub use authority::{Admitted, KeyInfo};
pub use control::ControlStats;
pub use error::{Error, Result};
pub use host::HostCommand;
pub use signing::{self, BundleHash, PublicKey};

use agency::AgencyHandle;
use authority::AuthorityHandle;
use control::{CancelOutcome, ControlHandle};
use model::{Action, ActionFilter, ActionId, ActionStatus, NewAction, Submitted};
use runner::Shared;
use store::{Outcome, Store, Write};

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
    pub host_command: HostCommand,
    /// Keys trusted to sign bundles, besides those added through the API.
    pub trusted_keys: Vec<PublicKey>,
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

/// Summary of a kind the engine can run.
#[derive(Debug, Clone)]
pub struct KindInfo {
    pub name: String,
    pub description: String,
    pub params: Vec<String>,
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
        let agency = AgencyHandle::spawn(config.host_command.clone(), config.cancel_grace);
        let shared = Arc::new(Shared {
            store: store.clone(),
            agency: agency.clone(),
            owner: config.node_id.clone(),
            lease: config.lease,
            stopping: CancellationToken::new(),
        });
        let authority = AuthorityHandle::start(
            store.clone(),
            agency.clone(),
            bundles,
            config.trusted_keys.clone(),
        )
        .await?;
        let control = ControlHandle::spawn(shared.clone(), config.max_running);
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                store,
                agency,
                authority,
                control,
                shared,
            }),
        };
        engine.spawn_lease_renewal();
        Ok(engine)
    }

    fn spawn_lease_renewal(&self) {
        let shared = self.inner.shared.clone();
        tokio::spawn(async move {
            let every = shared.lease / 3;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shared.stopping.cancelled() => return,
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

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Hands a bundle and its detached signature to the Source Authority:
    /// the one way code gets into the engine.
    pub async fn admit_bundle(&self, bytes: Vec<u8>, signature: String) -> Result<Admitted> {
        self.inner.authority.admit(bytes, signature).await
    }

    /// Makes a bundle the server holds the active version of its name again.
    pub async fn activate_bundle(&self, hash: &str) -> Result<BundleInfo> {
        self.inner.authority.activate(hash.to_owned()).await?;
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
        self.inner
            .store
            .bundle_content(hash)
            .await?
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_owned()))
    }

    pub async fn keys(&self) -> Result<Vec<KeyInfo>> {
        self.inner.authority.keys().await
    }

    /// Trusts a public key (in its `ed25519:…` text form) for signing bundles.
    pub async fn trust_key(&self, public_key: &str) -> Result<KeyInfo> {
        self.inner.authority.trust(public_key.parse()?).await
    }

    /// Revokes a key: its bundles take no new actions, and actions in flight
    /// on them fail at their next step.
    pub async fn revoke_key(&self, key_id: &str) -> Result<KeyInfo> {
        self.inner.authority.revoke(key_id.to_owned()).await
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
                        params: k.params.clone(),
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
    pub async fn submit(&self, new: NewAction) -> Result<Submitted> {
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
            .resolve(new.kind.clone(), new.bundle.clone())
            .await?;
        let kind = &bundle.manifest.kinds[&new.kind];
        if let Some(param) = kind.params.iter().find(|p| !new.params.contains_key(*p)) {
            return Err(Error::MissingParam {
                kind: new.kind.clone(),
                param: param.clone(),
            });
        }
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
        let reserved = !steps.is_empty() && self.inner.control.reserve(&new.target).await;
        let at = crate::model::now();
        let insert = Write::Insert {
            new: new.clone(),
            bundle: bundle.hash.to_string(),
            request_hash,
            owner: self.inner.config.node_id.clone(),
            steps,
            at,
            start: reserved.then(|| at + self.inner.config.lease),
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
                _ => None,
            };
            match (&action, reserved) {
                (Some(a), true) => inner.control.begin(a.clone()),
                (Some(a), false) => inner.control.enqueue(a.clone()),
                (None, true) => inner.control.unreserve(target),
                (None, false) => {}
            }
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

    pub async fn action(&self, id: ActionId) -> Result<Action> {
        self.inner
            .store
            .action(id)
            .await?
            .ok_or(Error::ActionNotFound(id))
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
                _ = self.inner.shared.stopping.cancelled() => break,
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
    pub async fn cancel(&self, id: ActionId) -> Result<Action> {
        let action = self.action(id).await?;
        if action.status.is_terminal() {
            return Err(Error::NotCancellable {
                id,
                status: action.status,
            });
        }
        match self.inner.control.cancel(id).await {
            CancelOutcome::Running => {}
            CancelOutcome::Dequeued | CancelOutcome::Unknown => {
                let outcome = self
                    .inner
                    .store
                    .write(vec![Write::CancelQueued {
                        id,
                        at: crate::model::now(),
                    }])
                    .await?[0];
                if outcome == (Outcome::Done { rows: 0 }) {
                    // It started meanwhile: ask Control again.
                    self.inner.control.cancel(id).await;
                }
            }
        }
        self.action(id).await
    }

    pub async fn control_stats(&self) -> ControlStats {
        self.inner.control.stats().await
    }

    /// Stops starting steps and ends long-polls; [`Engine::shutdown`] finishes the job.
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
        let release = Write::Release {
            owner: self.inner.config.node_id.clone(),
            at: crate::model::now(),
        };
        if let Err(e) = self.inner.store.write(vec![release]).await {
            tracing::warn!(error = %e, "could not release unfinished actions; they resume when their lease expires");
        }
        self.inner.agency.shutdown().await;
    }
}
