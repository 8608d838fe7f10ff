//! Actions as callers see them: submitting one (every check a request must
//! pass before anything is stored), reading, following, listing and
//! cancelling them, and the kinds they may be.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::agency::AgencyHandle;
use crate::model::{Action, ActionFilter, ActionId, MayPin, NewAction, Submitted};
use crate::runner::Shared;
use crate::schedule::{Scheduler, Validated};
use crate::store::{Outcome, Store, Write};
use crate::{Error, Result, bundle, model};

pub const MAX_TARGET_LEN: usize = 255;
pub const MAX_KEY_LEN: usize = 255;

/// Summary of a kind the engine can run.
#[derive(Debug, Clone)]
pub struct KindInfo {
    pub name: String,
    pub description: String,
    pub params: std::collections::BTreeMap<String, bundle::params::ParamSpec>,
    pub steps: Vec<String>,
    /// The concurrency limits its steps hold.
    pub limits: Vec<KindLimit>,
    pub bundle: String,
    pub bundle_name: String,
    pub bundle_version: String,
}

/// A concurrency limit a kind's step holds, with this server's max.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KindLimit {
    /// The step (its name in the kind) that holds it.
    pub step: String,
    pub name: String,
    /// The key's template (`{{params.bmc}}`).
    pub key: String,
    /// How many attempts may hold one key at once (the operator's
    /// `--limit NAME=MAX`, else the manifest's).
    pub max: u32,
    /// Keys the operator gave a max of their own: `dc1=10`.
    pub keys: Vec<String>,
}

pub struct Actions {
    store: Store,
    agency: AgencyHandle,
    shared: Arc<Shared>,
    scheduler: Arc<Scheduler>,
    /// How long a submit may take to be recorded.
    submit_timeout: std::time::Duration,
}

impl Actions {
    pub(crate) fn new(
        shared: Arc<Shared>,
        scheduler: Arc<Scheduler>,
        submit_timeout: std::time::Duration,
    ) -> Actions {
        Actions {
            store: shared.store.clone(),
            agency: shared.agency.clone(),
            shared,
            scheduler,
            submit_timeout,
        }
    }

    /// Validates a request, records the action durably and hands it to Control.
    /// A pinned version must be one `may_pin` allows. Answers within the
    /// submit timeout: [`Error::OutcomeUnknown`] once it is past and the
    /// insert may still commit.
    pub async fn submit(&self, new: NewAction, may_pin: MayPin) -> Result<Submitted> {
        let deadline = tokio::time::Instant::now() + self.submit_timeout;
        if self.shared.stopping.is_cancelled() {
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
        let mut new = NewAction {
            target: target.to_owned(),
            ..new
        };
        let bundle = self
            .agency
            .resolve(new.kind.clone(), new.bundle.clone(), may_pin)
            .await?;
        let kind = &bundle.manifest.kinds[&new.kind];
        crate::targets::fill(&self.store, &new.kind, kind, &new.target, &mut new.params).await?;
        kind.params.apply(&mut new.params).map_err(|e| match e {
            bundle::params::ParamError::Missing(params) => Error::MissingParam {
                kind: new.kind.clone(),
                params,
            },
            bundle::params::ParamError::Invalid(message) => Error::InvalidParam(message),
        })?;
        if let Some(var) = bundle::manifest::vars_used(kind)
            .into_iter()
            .find(|v| !self.shared.vars.contains_key(v))
        {
            return Err(Error::KindNotConfigured {
                kind: new.kind.clone(),
                var,
            });
        }
        kind.params
            .check_allowed(&new.params, &self.shared.vars)
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
        // A first step that holds limits claims them before it starts, so
        // it never starts with the insert.
        let first_requires = kind
            .steps
            .first()
            .filter(|u| u.limits.is_empty())
            .map(|u| u.requires(&bundle.manifest.steps[&u.step]));
        let validated = Validated {
            new,
            bundle: bundle.hash.to_string(),
            request_hash,
            steps,
            first_requires,
            deadline,
            timeout: self.submit_timeout,
        };
        self.scheduler.submit(validated).await
    }

    pub async fn action(&self, id: ActionId) -> Result<Action> {
        self.store
            .action(id)
            .await?
            .ok_or(Error::ActionNotFound(id))
    }

    /// The attempts of action `id`'s steps that failed (each tried again or
    /// ending the step), by step and attempt: why a retry happened.
    pub async fn failed_attempts(&self, id: ActionId) -> Result<Vec<model::FailedAttempt>> {
        self.store.failed_attempts(id).await
    }

    /// What action `id`'s steps logged (`troupe_sdk::Context::log`), by step and
    /// attempt; empty if nothing was logged yet. A running attempt's lines
    /// are stored when it ends.
    pub async fn logs(&self, id: ActionId) -> Result<Vec<model::StepLog>> {
        let action = self.action(id).await?;
        let mut logs = self.store.logs(id).await?;
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
        // Where several servers share the database, another may end the
        // action (a cancel of a queued one, a takeover): read it every
        // second, so a long-poll here learns of that within one.
        let recheck = (self.store.backend() != "sqlite").then_some(Duration::from_secs(1));
        // Subscribe before reading, so no change can slip between the two. A
        // live action is not finished yet, so waiting for its end needs no read.
        let (mut changes, live) = self.store.watch(id);
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
                _ = async {
                    match recheck {
                        Some(every) => tokio::time::sleep(every).await,
                        None => std::future::pending().await,
                    }
                } => {
                    action = Some(self.action(id).await?);
                }
                // Served through a shutdown's drain, so a client following an
                // action sees it end if it ends by then.
                _ = self.shared.closed.cancelled() => break,
            }
        }
        match action {
            Some(a) => Ok(a),
            None => self.action(id).await,
        }
    }

    pub async fn list(&self, filter: &ActionFilter) -> Result<Vec<Action>> {
        self.store.list(filter).await
    }

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
        if self.store.write(vec![request]).await?[0] == (Outcome::Done { rows: 0 }) {
            // Unknown, or already ended.
            let action = self.action(id).await?;
            return Err(Error::NotCancellable {
                id,
                status: action.status,
            });
        }
        self.scheduler.cancel(id).await;
        self.action(id).await
    }

    /// The kinds new actions can use, from the active bundles.
    pub async fn kinds(&self) -> Result<Vec<KindInfo>> {
        let mut kinds: Vec<KindInfo> = self
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
                        limits: k
                            .steps
                            .iter()
                            .flat_map(|u| {
                                u.limits.iter().map(|(limit, key)| {
                                    let def = &b.manifest.limits[limit];
                                    let (max, keys) = self.shared.limits.maxes(limit, def);
                                    KindLimit {
                                        step: u.name().to_owned(),
                                        name: limit.clone(),
                                        key: key.clone(),
                                        max,
                                        keys,
                                    }
                                })
                            })
                            .collect(),
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
}
