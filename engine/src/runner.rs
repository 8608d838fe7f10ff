//! Drives one action through its steps, in order, recording every state
//! change durably before moving on. Spawned by Control, one task per action.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use troupe_bundle::goon::Act;
use troupe_bundle::rules::{self, Ending};

use crate::agency::{AgencyHandle, LoadedBundle};
use crate::bundle::template;
use crate::model::{Action, ActionStatus, StepStatus};
use crate::nodes::{CallKey, Placed};
use crate::placement::Requirement;
use crate::secrets::{self, LoadError};
use crate::step::{Attempt, StepResult};
use crate::store::{Fence, Outcome, Store, Turn, Write};

/// What every runner needs.
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) agency: AgencyHandle,
    /// Loads a bundle stored by another server that an action here is
    /// pinned to.
    pub(crate) authority: crate::authority::AuthorityHandle,
    /// Who this server is in `owner`, and how long its claims last.
    pub(crate) lease: crate::schedule::Lease,
    /// Set when the server shuts down: runners stop before their next step.
    pub(crate) stopping: CancellationToken,
    /// Set once the shutdown's drain is over: long-polls end, leases are no
    /// longer renewed.
    pub(crate) closed: CancellationToken,
    /// Deployment variables, for `{{vars.NAME}}`.
    pub(crate) vars: serde_json::Map<String, serde_json::Value>,
    pub(crate) secrets_key: crate::secrets::SecretsKey,
    /// Connected remote nodes, for steps that require capabilities.
    pub(crate) nodes: crate::nodes::Nodes,
    /// How long a step in flight on a node waits for the node to report it
    /// after this server restarted.
    pub(crate) node_grace: Duration,
    /// Faults to inject, when the server runs with goons on.
    pub(crate) goons: Option<Arc<crate::goons::Goons>>,
    /// Concurrency limits: the operator's maxes, and whom to wake.
    pub(crate) limits: crate::limits::Limits,
}

impl Shared {
    /// Writes, retrying while the database is unavailable: the engine cannot
    /// move an action on without recording it, so it waits instead. A write
    /// the database refuses for its content is not retried.
    ///
    /// Every write is fenced on `action`'s epoch: once another server has
    /// taken the action over, nothing more of this runner's lands
    /// ([`Halt::Lost`]).
    async fn persist(&self, action: &Action, writes: &[Write]) -> Result<Vec<Outcome>, Halt> {
        // A claim at the action's turn rides with its first writes, which
        // hold only if it succeeds (it bumps the epoch).
        let turn = match writes.first() {
            Some(Write::Start { turn: Some(t), .. }) => Some(t.epoch),
            _ => None,
        };
        let fence = Fence {
            id: action.id,
            owner: self.lease.owner.clone(),
            epoch: turn.map_or(action.epoch, |seen| seen + 1),
        };
        let mut delay = Duration::from_millis(100);
        // A try whose commit may have gone through all the same.
        let mut unknown = false;
        loop {
            match self
                .store
                .write_fenced(fence.clone(), writes.to_vec())
                .await
            {
                // Nothing to claim: not its turn after all (another
                // server's action of the target runs, or it was claimed or
                // cancelled), and the caller leaves it; unless an earlier
                // try whose answer was lost claimed it, and it is this
                // runner's at the new epoch already (the rest of the
                // writes, fenced on that epoch, held this time).
                Ok(mut outcomes)
                    if turn.is_some() && outcomes[0] == (Outcome::Done { rows: 0 }) =>
                {
                    if !unknown {
                        return Ok(outcomes);
                    }
                    match self.store.action(action.id).await {
                        Ok(Some(now)) => {
                            if now.owner.as_deref() == Some(&*fence.owner)
                                && now.epoch == fence.epoch
                            {
                                tracing::info!(
                                    action_id = action.id,
                                    "the turn was claimed by the try whose answer was lost; going on"
                                );
                                outcomes[0] = Outcome::Done { rows: 1 };
                            }
                            return Ok(outcomes);
                        }
                        Ok(None) => return Ok(outcomes),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read whose the action is after a lost answer; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                Ok(outcomes) if outcomes.contains(&Outcome::Fenced) => {
                    tracing::warn!(
                        action_id = action.id,
                        epoch = action.epoch,
                        "this server no longer holds this action (another server took it over, or it ended elsewhere, e.g. cancelled); stopping without writing more"
                    );
                    return Err(Halt::Lost);
                }
                Ok(outcomes) => return Ok(outcomes),
                Err(crate::Error::ShuttingDown) => return Err(Halt::Stopping),
                Err(crate::Error::WriteRefused(why)) => return Err(Halt::Refused(why)),
                Err(e) => {
                    unknown |= matches!(e, crate::Error::OutcomeUnknown { .. });
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot record action progress; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Why a runner could not record its progress.
enum Halt {
    /// The server is stopping: the action resumes on the next start.
    Stopping,
    /// The database refused the write itself; the action cannot go on.
    Refused(String),
    /// Another server holds the action now: write nothing more.
    Lost,
}

impl From<Halt> for End {
    fn from(halt: Halt) -> End {
        match halt {
            Halt::Stopping => End::Paused,
            Halt::Refused(why) => End::Refused(why),
            Halt::Lost => End::Lost,
        }
    }
}

/// Commits `writes`, then applies them to `mirror`, the runner's copy of
/// the action as committed.
async fn commit(
    shared: &Shared,
    mirror: &mut Action,
    writes: Vec<Write>,
) -> Result<Vec<Outcome>, Halt> {
    let outcomes = shared.persist(mirror, &writes).await?;
    for w in &writes {
        w.apply_to(mirror);
    }
    Ok(outcomes)
}

enum End {
    /// Cancelled before it started: nothing left to do or write.
    Gone,
    Finished(ActionStatus, Option<String>),
    /// The server is stopping; the action resumes on the next start.
    Paused,
    /// The database refused a write of the action's progress.
    Refused(String),
    /// Another server took the action over: nothing more is written.
    Lost,
}

/// How a runner finds its action.
pub(crate) enum Begun {
    /// As stored: queued, or resumed after a restart.
    No,
    /// Its insert also started it: its first step is stored `running`
    /// (attempt 1) and has yet to be called, on the node it was placed on
    /// if it needs one.
    WithInsert(Option<Placed>),
}

/// Runs `action`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    action: Action,
    cancel: CancellationToken,
    begun: Begun,
) {
    let inserted_running = matches!(begun, Begun::WithInsert(_));
    let id = action.id;
    let mut mirror = action.clone();
    // Not loaded here (an action taken over from another server, pinned
    // to a bundle pushed there): loaded from the database through this
    // server's own Source Authority, or the action fails saying why.
    let loaded = match shared.agency.bundle(action.bundle.clone()).await {
        Ok(Some(b)) => Ok(Ok(b)),
        Ok(None) => match shared.authority.fetch(action.bundle.clone()).await {
            Ok(b) => Ok(Ok(b)),
            Err(crate::Error::ShuttingDown) => Err(()),
            Err(e) => {
                tracing::warn!(action_id = id, bundle = %action.bundle, error = %e, "the bundle this action is pinned to could not be loaded here");
                Ok(Err(e))
            }
        },
        Err(_) => Err(()),
    };
    let bundle = match loaded {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let why = match e {
                crate::Error::BundleNotLoaded(_) => "the database does not hold it".to_owned(),
                e => e.to_string(),
            };
            let error = format!(
                "bundle {} that this action is pinned to is not loaded on this server ({why}); load it and resubmit",
                action.bundle
            );
            let mut writes = Vec::new();
            if inserted_running {
                writes.push(step_failed(id, 0, &error));
            }
            finish(&shared, mirror, ActionStatus::Failed, Some(error), writes).await;
            return;
        }
        Err(_) => return,
    };
    // A cancel recorded before this runner began (while the action waited,
    // or before a crash or shutdown) ends it without running anything more.
    // Queued and owned by nobody (several servers): starting claims it.
    let turn = (action.status == ActionStatus::Queued && action.owner.is_none()).then(|| Turn {
        target: action.target.clone(),
        epoch: action.epoch,
    });
    if action.cancel_requested_at.is_some() && turn.is_some() {
        let write = Write::CancelQueued {
            id,
            at: crate::model::now(),
        };
        if let Err(e) = shared.store.write(vec![write]).await {
            tracing::warn!(action_id = id, error = %e, "cannot yet end an action cancelled while it waited its turn; it is looked at again");
        }
        return;
    }
    if action.cancel_requested_at.is_some() {
        let writes = end_running_steps(&action, |seq| step_cancelled(id, seq));
        tracing::info!(action_id = id, "action cancelled before it could go on");
        let error = Some(CANCELLED.to_owned());
        finish(&shared, mirror, ActionStatus::Cancelled, error, writes).await;
        return;
    }
    // The start rides with the first step's start, in one commit (or was
    // committed with the insert).
    let mut carry = Vec::new();
    if !inserted_running {
        carry.push(Write::Start {
            id,
            owner: shared.lease.owner.to_string(),
            lease_until: shared.lease.until(),
            at: crate::model::now(),
            turn,
        });
    }
    tracing::debug!(action_id = id, kind = %action.kind, target = %action.target, "action starting");
    match steps(
        &shared,
        &bundle,
        &action,
        &mut mirror,
        &cancel,
        &mut carry,
        begun,
    )
    .await
    {
        End::Finished(status, error) => {
            tracing::info!(action_id = id, kind = %action.kind, target = %action.target, %status, "action finished");
            finish(&shared, mirror, status, error, carry).await
        }
        End::Gone | End::Lost => {}
        End::Refused(why) => {
            tracing::error!(action_id = id, error = %why, "the database refused to record this action's progress; ending it");
            refused(&shared, mirror, &why).await;
        }
        End::Paused => {
            if !carry.is_empty() {
                let _ = shared.persist(&mirror, &carry).await;
            }
            tracing::info!(
                action_id = id,
                "action paused for shutdown; it resumes on the next start"
            );
        }
    }
}

/// Ends an action whose runner died (`why`, e.g. "panicked: …") with its
/// step, if one was running, failed: it is not resumed, since the failure
/// would likely repeat, and a half-run step needs a person to look.
pub(crate) async fn abandon(shared: &Shared, id: crate::model::ActionId, why: &str) {
    let action = loop {
        match shared.store.action(id).await {
            Ok(a) => break a,
            Err(crate::Error::ShuttingDown) => return,
            Err(e) => {
                tracing::warn!(action_id = id, error = %e, "cannot read the action to end it; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let Some(action) = action.filter(|a| !a.status.is_terminal()) else {
        return;
    };
    let error = format!(
        "internal error: the engine's runner for this action {why}; the action was stopped \
         (see the server log) and may be resubmitted once the target's state is checked"
    );
    let writes = end_running_steps(&action, |seq| step_failed(id, seq, &error));
    finish(shared, action, ActionStatus::Failed, Some(error), writes).await;
}

/// Ends the action; the last write carries its final state for waiters.
async fn finish(
    shared: &Shared,
    mut mirror: Action,
    status: ActionStatus,
    error: Option<String>,
    mut writes: Vec<Write>,
) {
    writes.push(Write::Finish {
        id: mirror.id,
        status,
        error,
        at: crate::model::now(),
        last: None,
    });
    let committed = mirror.clone();
    for w in &writes {
        w.apply_to(&mut mirror);
    }
    if let Some(Write::Finish { last, .. }) = writes.last_mut() {
        *last = Some(Arc::new(mirror));
    }
    if let Err(Halt::Refused(why)) = shared.persist(&committed, &writes).await {
        tracing::error!(action_id = committed.id, error = %why, "the database refused to record this action's end; ending it failed");
        refused(shared, committed, &why).await;
    }
}

/// Ends an action `failed` after the database refused a write of its
/// progress (so the write is lost: the error says so), with the step that
/// was running (as `action`, the state last committed, has it). If even that
/// is refused, the action is left for an operator, and the log says why.
async fn refused(shared: &Shared, action: Action, why: &str) {
    let error = format!(
        "troupe could not record this action's progress and stopped it: the database refused the write ({why}); \
         the last step may have run: check the target before resubmitting"
    );
    let mut writes = end_running_steps(&action, |seq| step_failed(action.id, seq, &error));
    writes.push(Write::Finish {
        id: action.id,
        status: ActionStatus::Failed,
        error: Some(error),
        at: crate::model::now(),
        last: None,
    });
    if let Err(Halt::Refused(again)) = shared.persist(&action, &writes).await {
        tracing::error!(action_id = action.id, error = %again, "the database refused to end the action too; it stays as it is");
    }
}

/// Runs the action's steps. A step's success is not written on its own: it
/// rides in `carry` with the next write (the next step's start, or the
/// action's end), which still commits it before anything else happens.
/// With `begun`, the first step's start is already committed.
async fn steps(
    shared: &Shared,
    bundle: &LoadedBundle,
    action: &Action,
    mirror: &mut Action,
    cancel: &CancellationToken,
    carry: &mut Vec<Write>,
    begun: Begun,
) -> End {
    let id = action.id;
    let (begun, mut first_node) = match begun {
        Begun::No => (false, None),
        Begun::WithInsert(placed) => (true, placed),
    };
    let Some(kind) = bundle.manifest.kinds.get(&action.kind) else {
        return End::Finished(
            ActionStatus::Failed,
            Some(format!(
                "bundle {} does not define kind {:?}",
                bundle.hash.short(),
                action.kind
            )),
        );
    };
    let mut outputs = Map::new();
    // Every secret value delivered to this action's steps so far: masked in
    // whatever any of its steps output or report.
    let mut delivered: Vec<String> = Vec::new();
    let mut masker = secrets::Masker::default();
    for (seq, step_use) in kind.steps.iter().enumerate() {
        fail::fail_point!("runner.before_step");
        let seq = seq as u32;
        let name = step_use.name();
        let needs = crate::bundle::manifest::secrets_used(step_use);
        let record = action.steps.iter().find(|s| s.seq == seq);
        let mut attempt = record.map_or(0, |r| r.attempt);
        // Started with the insert, not interrupted: it has not run yet.
        let mut prestarted = begun && seq == 0;
        // Whether the step is recorded `running` (or `waiting`), so that
        // ending the action must end the step too.
        let mut open = prestarted
            || record
                .is_some_and(|r| matches!(r.status, StepStatus::Running | StepStatus::Waiting));
        match record.map(|r| r.status).filter(|_| !prestarted) {
            Some(StepStatus::Succeeded) => {
                let output = record.and_then(|r| r.output.clone()).unwrap_or(Value::Null);
                outputs.insert(name.to_owned(), output);
                continue;
            }
            // It was running on a node, which keeps running it without us
            // and reports it when it reconnects: follow it there.
            Some(StepStatus::Running) if record.is_some_and(|r| r.node.is_some()) => {}
            Some(StepStatus::Running) => {
                let def = &bundle.manifest.steps[&step_use.step];
                if !def.idempotent {
                    let error = format!(
                        "step {name:?} was interrupted (the server stopped while it ran) and is not idempotent, \
                         so it was not run again; check the target's state before resubmitting"
                    );
                    carry.push(step_failed(id, seq, &error));
                    return End::Finished(ActionStatus::Failed, Some(error));
                }
                tracing::info!(
                    action_id = id,
                    step = name,
                    "re-running interrupted idempotent step"
                );
            }
            _ => {}
        }
        let handle = match shared.agency.step(bundle, &step_use.step).await {
            Ok(h) => h,
            Err(e) => {
                let error = format!("step {name:?}: {e}");
                if prestarted {
                    carry.push(step_failed(id, seq, &error));
                }
                return End::Finished(ActionStatus::Failed, Some(error));
            }
        };
        let requires = step_use.requires(&handle.def);
        let mut failures = rules::Failures::default();
        // An attempt this server sent to a node before it stopped.
        let mut resume_on = record
            .filter(|r| r.status == StepStatus::Running && !prestarted)
            .and_then(|r| r.node.clone());
        loop {
            if cancel.is_cancelled() {
                return cancelled(carry, action, seq, open);
            }
            let started_at;
            let mut placed = None;
            // The limits' slots this attempt holds, given back when it ends.
            let mut held = None;
            let reattached = resume_on.take();
            if reattached.is_none() && !requires.is_empty() && !prestarted {
                let scope = scope_of(action, &outputs, &shared.vars);
                let placing = Placing {
                    shared,
                    action,
                    seq,
                    name,
                    timeout: handle.def.placement_timeout(),
                    cancel,
                };
                match placing.wait(mirror, carry, &requires, &scope).await {
                    Ok(node) => placed = Some(node),
                    Err(end) => return end,
                }
            }
            if prestarted || reattached.is_some() {
                // Its start is durable, so it runs even if the server is
                // stopping (on the node it was placed on at submission, if
                // it needs one).
                if prestarted {
                    placed = first_node.take();
                }
                prestarted = false;
                started_at = record
                    .and_then(|r| r.started_at)
                    .unwrap_or_else(crate::model::now);
            } else {
                if shared.stopping.is_cancelled() {
                    return End::Paused;
                }
                attempt += 1;
                if !step_use.limits.is_empty() {
                    let gate = Gate {
                        shared,
                        action,
                        seq,
                        name,
                        attempt,
                        cancel,
                    };
                    match gate
                        .wait(mirror, carry, step_use, bundle, &outputs, open)
                        .await
                    {
                        Ok(h) => held = h,
                        Err(end) => return end,
                    }
                }
                started_at = crate::model::now();
                let start = Write::StepStarted {
                    id,
                    seq,
                    name: name.to_owned(),
                    attempt,
                    at: started_at,
                    node: placed.as_ref().map(|n| n.name.clone()),
                };
                let starting = matches!(carry.first(), Some(Write::Start { .. }));
                match commit(shared, mirror, with(carry, start)).await {
                    Err(halt) => return halt.into(),
                    Ok(o) if starting && o[0] == (Outcome::Done { rows: 0 }) => return End::Gone,
                    Ok(_) => open = true,
                }
            }
            // Read now, not at submit: a change to the record (made
            // through any server) holds for every step that starts after it.
            let record = crate::targets::for_step(
                &shared.store,
                &action.target,
                crate::targets::read_by(step_use),
            )
            .await;
            let secrets = match &record {
                Err(m) => Err(LoadError::Unavailable(m.clone())),
                Ok(record) => {
                    crate::targets::load_secrets(
                        &shared.store,
                        &shared.secrets_key,
                        &action.target,
                        &needs,
                        record.as_ref(),
                    )
                    .await
                }
            };
            let secrets = match secrets {
                Ok(values) => {
                    if remember(&mut delivered, &values) {
                        masker = secrets::Masker::new(&delivered);
                        secrets::given(&values);
                    }
                    Ok(values)
                }
                Err(LoadError::Missing(m)) => Err(StepResult::Fatal(m)),
                Err(LoadError::Unavailable(m)) => Err(StepResult::Retryable(m)),
            };
            // A goon of a test deployment may stand in for this attempt.
            let goon = match (&shared.goons, &reattached) {
                (Some(goons), None) => goons.take(&action.kind, name, attempt),
                _ => None,
            };
            if let Some(Act::Cancel) = goon {
                carry.push(Write::RequestCancel {
                    id,
                    at: crate::model::now(),
                });
                cancel.cancel();
            }
            let mut scope = scope_of(action, &outputs, &shared.vars);
            template::with_record(&mut scope, record.ok().flatten().as_ref());
            scope["secrets"] = json!(secrets.as_ref().ok());
            let ran = match (secrets, template::resolve(&step_use.settings, &scope)) {
                (Err(failed), _) => failed.into(),
                (Ok(_), Ok(settings)) => {
                    let hash = bundle.hash.to_string();
                    let manifest = &bundle.manifest;
                    let input = template::input(
                        &scope,
                        settings,
                        &outputs,
                        attempt,
                        [&manifest.name, &manifest.version, &hash],
                    );
                    let input = serde_json::to_vec(&input).expect("JSON serializes");
                    let key = CallKey {
                        action: id,
                        seq,
                        attempt,
                    };
                    let call = async {
                        match (&reattached, &placed) {
                            (Some(node), _) => {
                                tracing::info!(action_id = id, step = name, node = %node, "following a step that ran on a node while this server was down");
                                handle
                                    .reattach(
                                        &shared.nodes,
                                        node,
                                        key,
                                        (shared.node_grace, started_at),
                                        cancel.child_token(),
                                    )
                                    .await
                            }
                            (None, None) => handle.run(input, cancel.child_token()).await,
                            (None, Some(node)) => {
                                #[cfg(feature = "failpoints")]
                                if let Some(ms) = (|| {
                                    fail::fail_point!("runner.before_remote_call", |ms| ms
                                        .and_then(|ms| ms.parse::<u64>().ok()));
                                    None
                                })() {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                                handle.run_on(node, key, input, cancel.child_token()).await
                            }
                        }
                    };
                    match goon {
                        None => call.await,
                        Some(act) => {
                            let node = placed.as_ref().map(|n| n.name.as_str());
                            let stand_in = StandIn {
                                name,
                                timeout: handle.def.timeout(),
                                node,
                                cancel,
                            };
                            stand_in.act(act, call).await
                        }
                    }
                }
                (Ok(_), Err(e)) => StepResult::Fatal(format!("invalid settings: {e}")).into(),
            };
            drop(scope);
            let Attempt { result, mut log } = ran;
            drop(held);
            // Masked before anything is cut, so no cut leaves a piece of a
            // secret behind.
            let result = bound(mask(result, &masker));
            // What the attempt logged rides with its outcome, whatever that is.
            if !log.is_empty() {
                masker.text(&mut log);
                carry.push(Write::StepLog {
                    id,
                    seq,
                    attempt,
                    log,
                    at: crate::model::now(),
                });
            }
            // A step that ended any way but well after a cancel was asked
            // for ends cancelled (also while the server stops: a cancel is
            // never turned into a pause).
            if cancel.is_cancelled() && !matches!(result, StepResult::Ok(_)) {
                return cancelled(carry, action, seq, true);
            }
            // A step cut short by the server stopping did not fail: leave it
            // `running`, and the next start applies the interrupted-step rules.
            if shared.stopping.is_cancelled() && !matches!(result, StepResult::Ok(_)) {
                return End::Paused;
            }
            let (error, ending) = match result {
                StepResult::Ok(output) => {
                    let text = serde_json::to_string(&output).expect("JSON serializes");
                    if text.len() > MAX_OUTPUT_BYTES {
                        (output_too_large(text.len()), Ending::Fatal)
                    } else {
                        let done = Write::StepSucceeded {
                            id,
                            seq,
                            output: text,
                            at: crate::model::now(),
                        };
                        carry.push(done);
                        outputs.insert(name.to_owned(), output);
                        break;
                    }
                }
                StepResult::Cancelled => return cancelled(carry, action, seq, true),
                StepResult::Retryable(msg) => (msg, Ending::Retryable),
                StepResult::TimedOut(msg) => (msg, Ending::TimedOut),
                StepResult::Lost(msg) => (msg, Ending::Lost),
                StepResult::Fatal(msg) => (msg, Ending::Fatal),
                StepResult::NotRun(msg) => (msg, Ending::NotRun),
            };
            let policy = &handle.def.retry;
            let again = failures.after(ending, policy, handle.def.idempotent);
            if again && !cancel.is_cancelled() {
                let failed = Write::StepAttemptFailed {
                    id,
                    seq,
                    attempt,
                    started_at,
                    node: placed
                        .as_ref()
                        .map(|n| n.name.clone())
                        .or(reattached.clone()),
                    error,
                    at: crate::model::now(),
                };
                match commit(shared, mirror, with(carry, failed)).await {
                    Err(Halt::Refused(why)) => return End::Refused(why),
                    Err(Halt::Lost) => return End::Lost,
                    // Stopping: the wait below ends at once, and the next
                    // attempt is not started.
                    Err(Halt::Stopping) | Ok(_) => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(failures.backoff(policy)) => {}
                    _ = cancel.cancelled() => {}
                    _ = shared.stopping.cancelled() => {}
                }
                continue;
            }
            let attempts = if attempt > 1 {
                format!(" (after {attempt} attempts)")
            } else {
                String::new()
            };
            carry.push(step_failed(id, seq, &error));
            return End::Finished(
                ActionStatus::Failed,
                Some(format!("step {name:?} failed{attempts}: {error}")),
            );
        }
    }
    End::Finished(ActionStatus::Succeeded, None)
}

/// What a goon does in place of (or before) an attempt's call.
struct StandIn<'a> {
    name: &'a str,
    timeout: Duration,
    node: Option<&'a str>,
    cancel: &'a CancellationToken,
}

impl StandIn<'_> {
    async fn act(self, act: Act, call: impl std::future::Future<Output = Attempt>) -> Attempt {
        match act {
            Act::Fail {
                retryable: true,
                message,
            } => StepResult::Retryable(message).into(),
            Act::Fail { message, .. } => StepResult::Fatal(message).into(),
            Act::Crash => StepResult::Fatal(troupe_bundle::goon::CRASHED.to_owned()).into(),
            Act::LoseNode { node } => {
                let node = node.as_deref().or(self.node).unwrap_or("node-1");
                StepResult::Lost(troupe_bundle::goon::lost(node)).into()
            }
            Act::Output { output } => StepResult::Ok(output).into(),
            Act::Cancel => call.await,
            Act::Delay { .. } => {
                let (wait, overruns) = act.delay(self.timeout).expect("a delay");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.cancel.cancelled() => return StepResult::Cancelled.into(),
                }
                if overruns {
                    let why = format!(
                        "step {:?} timed out after {} ms",
                        self.name,
                        self.timeout.as_millis()
                    );
                    return StepResult::TimedOut(why).into();
                }
                call.await
            }
        }
    }
}

/// Finds where a step that requires capabilities runs.
struct Placing<'a> {
    shared: &'a Shared,
    action: &'a Action,
    seq: u32,
    name: &'a str,
    timeout: Duration,
    cancel: &'a CancellationToken,
}

impl Placing<'_> {
    /// Finds a connected node that meets the step's requirements and
    /// returns it, counted busy until dropped. While there is none, the
    /// step is recorded `waiting` and waits for the nodes to change: until
    /// the placement timeout (the action fails naming the requirement), a
    /// cancel, or the server stopping (paused: a waiting step has not run,
    /// so it is placed again on the next start, idempotent or not).
    async fn wait(
        self,
        mirror: &mut Action,
        carry: &mut Vec<Write>,
        requires: &std::collections::BTreeMap<String, String>,
        scope: &Value,
    ) -> Result<Placed, End> {
        let (id, seq, name) = (self.action.id, self.seq, self.name);
        let wants = match Requirement::resolve(requires, scope) {
            Ok(wants) => wants,
            Err(e) => {
                let error = format!("cannot place step {name:?}: {e}");
                carry.push(step_failed(id, seq, &error));
                return Err(End::Finished(ActionStatus::Failed, Some(error)));
            }
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut changed = self.shared.nodes.changed();
        let mut recorded = false;
        loop {
            changed.borrow_and_update();
            if let Some(node) = self.shared.nodes.place(&wants) {
                return Ok(node);
            }
            if !recorded {
                recorded = true;
                let waiting = Write::StepWaiting {
                    id,
                    seq,
                    name: name.to_owned(),
                    waiting_for: wants.to_string(),
                };
                let starting = matches!(carry.first(), Some(Write::Start { .. }));
                match commit(self.shared, mirror, with(carry, waiting)).await {
                    Err(halt) => return Err(halt.into()),
                    Ok(o) if starting && o[0] == (Outcome::Done { rows: 0 }) => {
                        return Err(End::Gone);
                    }
                    // A node may have come while that committed: look again.
                    Ok(_) => continue,
                }
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let error = format!(
                        "no node with {wants} was connected within {} s; connect a node that has it, or give the step a longer placement_timeout_ms",
                        self.timeout.as_secs_f64()
                    );
                    carry.push(step_failed(id, seq, &error));
                    return Err(End::Finished(
                        ActionStatus::Failed,
                        Some(format!("step {name:?} failed: {error}")),
                    ));
                }
                _ = self.cancel.cancelled() => return Err(cancelled(carry, self.action, seq, true)),
                _ = self.shared.stopping.cancelled() => return Err(End::Paused),
            }
        }
    }
}

/// Holds the concurrency limits a step use names (`crate::limits`) for
/// one attempt.
struct Gate<'a> {
    shared: &'a Shared,
    action: &'a Action,
    seq: u32,
    name: &'a str,
    attempt: u32,
    cancel: &'a CancellationToken,
}

impl Gate<'_> {
    /// Claims a slot of every limit key the step use names, before the
    /// attempt's start is recorded. While one is full the step is recorded
    /// `waiting` (`bmc limit https://10.0.0.5`) and waits for a slot: woken
    /// when this server gives one back, looking again every
    /// `Limits::poll` for those given back elsewhere; until a cancel, or
    /// the server stopping (paused: nothing ran). `None`: no key applies.
    async fn wait(
        self,
        mirror: &mut Action,
        carry: &mut Vec<Write>,
        step_use: &crate::bundle::manifest::StepUse,
        bundle: &LoadedBundle,
        outputs: &Map<String, Value>,
        open: bool,
    ) -> Result<Option<crate::limits::Held>, End> {
        let (shared, id, seq, name) = (self.shared, self.action.id, self.seq, self.name);
        // A hold lives while its action runs at the hold's epoch, so the
        // action's start (and the claim of its turn, which moves the epoch)
        // is made durable first.
        if matches!(carry.first(), Some(Write::Start { .. })) {
            let writes = std::mem::take(carry);
            match commit(shared, mirror, writes).await {
                Err(halt) => return Err(halt.into()),
                Ok(o) if o[0] == (Outcome::Done { rows: 0 }) => return Err(End::Gone),
                Ok(_) => {}
            }
        }
        let mut recorded: Option<String> = None;
        loop {
            let record = match crate::targets::for_step(&shared.store, &self.action.target, true)
                .await
            {
                Ok(record) => Some(record),
                Err(e) => {
                    tracing::warn!(action_id = id, step = name, error = %e, "cannot read the target's record for the step's limits; trying again");
                    None
                }
            };
            let mut full: Option<crate::limits::Want> = None;
            if let Some(record) = record {
                let mut scope = scope_of(self.action, outputs, &shared.vars);
                template::with_record(&mut scope, record.as_ref());
                let wants = match crate::limits::wants(
                    &step_use.limits,
                    &bundle.manifest.limits,
                    &scope,
                    &shared.limits,
                ) {
                    Ok(wants) => wants,
                    Err(e) => {
                        let error = format!("step {name:?}: cannot resolve its limits: {e}");
                        carry.push(step_failed(id, seq, &error));
                        return Err(End::Finished(ActionStatus::Failed, Some(error)));
                    }
                };
                if wants.is_empty() {
                    return Ok(None);
                }
                let holder = crate::limits::Holder {
                    action: id,
                    epoch: mirror.epoch,
                    seq,
                    attempt: self.attempt,
                    owner: shared.lease.owner.to_string(),
                };
                match crate::limits::claim(&shared.store, &shared.limits, &wants, &holder).await {
                    Ok(Ok(held)) => return Ok(Some(held)),
                    Ok(Err(want)) => full = Some(want),
                    Err(e) => {
                        tracing::warn!(action_id = id, step = name, error = %e, "cannot claim the step's limits; trying again");
                    }
                }
            }
            // Woken when this server gives a slot of the full key back (the
            // step here that has waited longest first), or after a poll.
            let queue = match full {
                Some(want) if recorded.as_deref() != Some(&want.to_string()) => {
                    let waiting_for = want.to_string();
                    recorded = Some(waiting_for.clone());
                    let waiting = Write::StepWaiting {
                        id,
                        seq,
                        name: name.to_owned(),
                        waiting_for,
                    };
                    if let Err(halt) = commit(shared, mirror, with(carry, waiting)).await {
                        return Err(halt.into());
                    }
                    // A slot may have come while that committed: look again.
                    continue;
                }
                Some(want) => Some(shared.limits.waiting_for(&want)),
                // The database did not answer: look again after a poll.
                None => None,
            };
            let woken = async {
                match &queue {
                    Some(queue) => queue.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(crate::tasks::jitter(shared.limits.poll)) => {}
                _ = self.cancel.cancelled() => {
                    return Err(cancelled(carry, self.action, seq, open || recorded.is_some()));
                }
                _ = shared.stopping.cancelled() => return Err(End::Paused),
            }
        }
    }
}

/// What templates in a step use's settings and requirements see (secrets
/// are added for settings only).
fn scope_of(action: &Action, outputs: &Map<String, Value>, vars: &Map<String, Value>) -> Value {
    let action = template::Action {
        id: action.id,
        kind: &action.kind,
        target: &action.target,
        params: &action.params,
    };
    template::scope(action, outputs, vars)
}

/// The error a cancelled action ends with.
const CANCELLED: &str = "cancelled on request";

fn cancelled(carry: &mut Vec<Write>, action: &Action, seq: u32, in_step: bool) -> End {
    if in_step {
        carry.push(step_cancelled(action.id, seq));
    }
    End::Finished(ActionStatus::Cancelled, Some(CANCELLED.into()))
}

/// A write ending each step the action has recorded `running` or `waiting`.
fn end_running_steps(action: &Action, end: impl Fn(u32) -> Write) -> Vec<Write> {
    action
        .steps
        .iter()
        .filter(|s| matches!(s.status, StepStatus::Running | StepStatus::Waiting))
        .map(|s| end(s.seq))
        .collect()
}

fn step_cancelled(id: crate::model::ActionId, seq: u32) -> Write {
    Write::StepEnded {
        id,
        seq,
        status: StepStatus::Cancelled,
        error: "cancelled".into(),
        at: crate::model::now(),
    }
}

fn step_failed(id: crate::model::ActionId, seq: u32, error: &str) -> Write {
    Write::StepEnded {
        id,
        seq,
        status: StepStatus::Failed,
        error: error.to_owned(),
        at: crate::model::now(),
    }
}

/// Adds newly delivered secret values; true if there was one.
fn remember(
    delivered: &mut Vec<String>,
    values: &std::collections::BTreeMap<String, String>,
) -> bool {
    let mut added = false;
    for v in values.values() {
        if !delivered.contains(v) {
            delivered.push(v.clone());
            added = true;
        }
    }
    added
}

/// The step's result with every delivered secret masked: its output, or
/// its error message whatever the ending (one place, so that no ending can
/// be left out).
fn mask(mut result: StepResult, masker: &secrets::Masker) -> StepResult {
    if masker.is_empty() {
        return result;
    }
    if let StepResult::Ok(v) = &mut result {
        masker.value(v);
    } else if let Some(message) = result.message_mut() {
        masker.text(message);
    }
    result
}

/// The most of a step's error message troupe stores; the rest is cut.
pub(crate) const MAX_ERROR_BYTES: usize = 16 << 10;
/// The largest step output troupe stores; a larger one fails its step.
pub(crate) const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Why an output of `len` bytes (as JSON) fails its step.
fn output_too_large(len: usize) -> String {
    format!(
        "the step's output is {len} bytes as JSON, over the limit of {} MiB that troupe stores; \
         have the step return less (a summary, or where it put the rest)",
        MAX_OUTPUT_BYTES >> 20
    )
}

/// The step's error message cut to [`MAX_ERROR_BYTES`] (saying how much was
/// cut). An output's size is checked where it is serialized for storing.
fn bound(mut result: StepResult) -> StepResult {
    if let Some(message) = result.message_mut() {
        *message = cut(std::mem::take(message));
    }
    result
}

/// `text` cut to [`MAX_ERROR_BYTES`] on a character boundary.
fn cut(mut text: String) -> String {
    if text.len() <= MAX_ERROR_BYTES {
        return text;
    }
    let mut end = MAX_ERROR_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let rest = text.len() - end;
    text.truncate(end);
    text.push_str(&format!(" [… {rest} more bytes cut]"));
    text
}

/// The carried writes followed by `next`, to commit together.
fn with(carry: &mut Vec<Write>, next: Write) -> Vec<Write> {
    let mut writes = std::mem::take(carry);
    writes.push(next);
    writes
}
