//! troupe's engine: everything between "an action was accepted" and "its row
//! reads `succeeded`". It knows nothing of HTTP; `api` drives it through
//! [`Engine`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

mod actor;
mod agency;
pub mod bundle;
mod control;
mod error;
pub mod host;
pub mod model;
mod runner;
mod step;
pub mod store;

pub use agency::LoadedBundle;
pub use control::ControlStats;
pub use error::{Error, Result};
pub use host::HostCommand;
pub use signing::BundleHash;

use agency::AgencyHandle;
use control::{CancelOutcome, ControlHandle};
use model::{
    Action, ActionFilter, ActionId, ActionStatus, NewAction, StepRecord, StepStatus, Submitted,
};
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
    control: ControlHandle,
    shared: Arc<Shared>,
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
        let control = ControlHandle::spawn(shared.clone(), config.max_running);
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                store,
                agency,
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
                    until: Utc::now() + shared.lease,
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

    /// Checks and loads a bundle: the one way code gets into the engine.
    pub async fn load_bundle(&self, bytes: Vec<u8>) -> Result<Arc<LoadedBundle>> {
        let root = self.inner.config.data_dir.join("bundles");
        let unpacked = tokio::task::spawn_blocking(move || bundle::open(&bytes, &root))
            .await
            .map_err(|_| Error::ShuttingDown)??;
        self.inner.agency.load(unpacked).await
    }

    /// Hands every unfinished action in the database to Control, oldest first.
    pub async fn resume(&self) -> Result<usize> {
        let now = Utc::now();
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
        for action in actions {
            self.inner.control.enqueue(action);
        }
        Ok(n)
    }

    pub async fn kinds(&self) -> Result<Vec<KindInfo>> {
        Ok(self
            .inner
            .agency
            .kinds()
            .await?
            .into_iter()
            .map(|(name, b)| {
                let k = &b.manifest.kinds[&name];
                KindInfo {
                    description: k.description.clone(),
                    params: k.params.clone(),
                    steps: k.steps.iter().map(|s| s.name().to_owned()).collect(),
                    bundle: b.hash.to_string(),
                    bundle_name: b.manifest.name.clone(),
                    bundle_version: b.manifest.version.clone(),
                    name,
                }
            })
            .collect())
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
        let bundle = self.inner.agency.resolve(new.kind.clone()).await?;
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
        let at = Utc::now();
        let insert = Write::Insert {
            new: new.clone(),
            bundle: bundle.hash.to_string(),
            request_hash,
            owner: self.inner.config.node_id.clone(),
            steps: steps.clone(),
            at,
        };
        let outcome = self.inner.store.write(vec![insert]).await?[0];
        match outcome {
            Outcome::Inserted(id) => {
                let action = Action {
                    id,
                    kind: new.kind,
                    target: new.target,
                    params: new.params,
                    status: ActionStatus::Queued,
                    bundle: bundle.hash.to_string(),
                    current_step: None,
                    error: None,
                    idempotency_key: new.idempotency_key,
                    owner: Some(self.inner.config.node_id.clone()),
                    revision: 0,
                    created_at: at,
                    started_at: None,
                    finished_at: None,
                    steps: steps
                        .into_iter()
                        .enumerate()
                        .map(|(seq, (name, step))| StepRecord {
                            seq: seq as u32,
                            name,
                            step,
                            status: StepStatus::Pending,
                            attempt: 0,
                            started_at: None,
                            finished_at: None,
                            output: None,
                            error: None,
                        })
                        .collect(),
                };
                self.inner.control.enqueue(action.clone());
                Ok(Submitted {
                    action,
                    created: true,
                })
            }
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
        let mut events = self.inner.store.subscribe();
        loop {
            let action = self.action(id).await?;
            if action.status.is_terminal() || since.is_some_and(|r| action.revision > r) {
                return Ok(action);
            }
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(changed) if changed == id => break,
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(action),
                    },
                    _ = tokio::time::sleep_until(deadline) => return Ok(action),
                    _ = self.inner.shared.stopping.cancelled() => return Ok(action),
                }
            }
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
                    .write(vec![Write::CancelQueued { id, at: Utc::now() }])
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
            at: Utc::now(),
        };
        if let Err(e) = self.inner.store.write(vec![release]).await {
            tracing::warn!(error = %e, "could not release unfinished actions; they resume when their lease expires");
        }
        self.inner.agency.shutdown().await;
    }
}
