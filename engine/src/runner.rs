//! Drives one action through its steps, in order, recording every state
//! change durably before moving on. Spawned by Control, one task per action.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::agency::{AgencyHandle, LoadedBundle};
use crate::bundle::template;
use crate::model::{Action, ActionStatus, StepStatus};
use crate::step::StepResult;
use crate::store::{Outcome, Store, Write};

/// What every runner needs.
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) agency: AgencyHandle,
    pub(crate) owner: String,
    pub(crate) lease: Duration,
    /// Set when the server shuts down: runners stop before their next step.
    pub(crate) stopping: CancellationToken,
}

impl Shared {
    /// Writes, retrying while the database is unavailable: the engine cannot
    /// move an action on without recording it, so it waits instead.
    async fn persist(&self, writes: &[Write]) -> Option<Vec<Outcome>> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.store.write(writes.to_vec()).await {
                Ok(outcomes) => return Some(outcomes),
                Err(crate::Error::ShuttingDown) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot record action progress; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn lease_until(&self) -> crate::model::Timestamp {
        crate::model::now() + self.lease
    }
}

/// Commits `writes`, then applies them to `mirror`, the runner's copy of
/// the action as committed.
async fn commit(shared: &Shared, mirror: &mut Action, writes: Vec<Write>) -> Option<Vec<Outcome>> {
    let outcomes = shared.persist(&writes).await?;
    for w in &writes {
        w.apply_to(mirror);
    }
    Some(outcomes)
}

enum End {
    /// Cancelled before it started: nothing left to do or write.
    Gone,
    Finished(ActionStatus, Option<String>),
    /// The server is stopping; the action resumes on the next start.
    Paused,
}

/// Runs `action`. `begun` when its insert also started it and its first
/// step (stored `running`, attempt 1) has yet to be called.
pub(crate) async fn run(
    shared: Arc<Shared>,
    action: Action,
    cancel: CancellationToken,
    begun: bool,
) {
    let id = action.id;
    let mut mirror = action.clone();
    let bundle = match shared.agency.bundle(action.bundle.clone()).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            let error = format!(
                "bundle {} that this action is pinned to is not loaded on this server; load it and resubmit",
                action.bundle
            );
            let mut writes = Vec::new();
            if begun {
                writes.push(step_failed(id, 0, &error));
            }
            finish(&shared, mirror, ActionStatus::Failed, Some(error), writes).await;
            return;
        }
        Err(_) => return,
    };
    // The start rides with the first step's start, in one commit (or was
    // committed with the insert).
    let mut carry = Vec::new();
    if !begun {
        carry.push(Write::Start {
            id,
            owner: shared.owner.clone(),
            lease_until: shared.lease_until(),
            at: crate::model::now(),
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
        End::Gone => {}
        End::Paused => {
            if !carry.is_empty() {
                shared.persist(&carry).await;
            }
            tracing::info!(
                action_id = id,
                "action paused for shutdown; it resumes on the next start"
            );
        }
    }
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
    for w in &writes {
        w.apply_to(&mut mirror);
    }
    if let Some(Write::Finish { last, .. }) = writes.last_mut() {
        *last = Some(Arc::new(mirror));
    }
    shared.persist(&writes).await;
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
    begun: bool,
) -> End {
    let id = action.id;
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
    for (seq, step_use) in kind.steps.iter().enumerate() {
        let seq = seq as u32;
        let name = step_use.name();
        let record = action.steps.iter().find(|s| s.seq == seq);
        let mut attempt = record.map_or(0, |r| r.attempt);
        // Started with the insert, not interrupted: it has not run yet.
        let mut prestarted = begun && seq == 0;
        match record.map(|r| r.status).filter(|_| !prestarted) {
            Some(StepStatus::Succeeded) => {
                let output = record.and_then(|r| r.output.clone()).unwrap_or(Value::Null);
                outputs.insert(name.to_owned(), output);
                continue;
            }
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
        let mut failures = 0;
        loop {
            if cancel.is_cancelled() {
                return cancelled(carry, action, seq, prestarted);
            }
            let started_at;
            if prestarted {
                // Its start is durable, so it runs even if the server is stopping.
                prestarted = false;
                started_at = record
                    .and_then(|r| r.started_at)
                    .unwrap_or_else(crate::model::now);
            } else {
                if shared.stopping.is_cancelled() {
                    return End::Paused;
                }
                attempt += 1;
                started_at = crate::model::now();
                let start = Write::StepStarted {
                    id,
                    seq,
                    name: name.to_owned(),
                    attempt,
                    at: started_at,
                };
                let starting = matches!(carry.first(), Some(Write::Start { .. }));
                match commit(shared, mirror, with(carry, start)).await {
                    None => return End::Paused,
                    Some(o) if starting && o[0] == (Outcome::Done { rows: 0 }) => return End::Gone,
                    Some(_) => {}
                }
            }
            let scope = json!({
                "action": { "id": id, "kind": action.kind, "target": action.target, "params": action.params },
                "target": action.target,
                "kind": action.kind,
                "params": action.params,
                "steps": outputs,
            });
            let result = match template::resolve(&step_use.settings, &scope) {
                Ok(settings) => {
                    let input = json!({
                        "action": scope["action"],
                        "settings": settings,
                        "outputs": outputs,
                        "attempt": attempt,
                        "bundle": {
                            "name": bundle.manifest.name,
                            "version": bundle.manifest.version,
                            "hash": bundle.hash.to_string(),
                        },
                    });
                    handle
                        .run(
                            serde_json::to_vec(&input).expect("JSON serializes"),
                            cancel.child_token(),
                        )
                        .await
                }
                Err(e) => StepResult::Fatal(format!("invalid settings: {e}")),
            };
            // A step cut short by the server stopping did not fail: leave it
            // `running`, and the next start applies the interrupted-step rules.
            if shared.stopping.is_cancelled() && !matches!(result, StepResult::Ok(_)) {
                return End::Paused;
            }
            // A timeout is retried only when running the step twice is harmless.
            let (error, may_retry) = match result {
                StepResult::Ok(output) => {
                    let text = serde_json::to_string(&output).expect("JSON serializes");
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
                StepResult::Cancelled => return cancelled(carry, action, seq, true),
                StepResult::Retryable(msg) => (msg, true),
                StepResult::TimedOut(msg) => (msg, handle.def.idempotent),
                StepResult::Fatal(msg) => (msg, false),
            };
            failures += 1;
            let policy = &handle.def.retry;
            if may_retry && failures < policy.attempts && !cancel.is_cancelled() {
                let failed = Write::StepAttemptFailed {
                    id,
                    seq,
                    attempt,
                    started_at,
                    error,
                    at: crate::model::now(),
                };
                commit(shared, mirror, with(carry, failed)).await;
                tokio::select! {
                    _ = tokio::time::sleep(policy.backoff(failures)) => {}
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

fn cancelled(carry: &mut Vec<Write>, action: &Action, seq: u32, in_step: bool) -> End {
    if in_step {
        let end = Write::StepEnded {
            id: action.id,
            seq,
            status: StepStatus::Cancelled,
            error: "cancelled".into(),
            at: crate::model::now(),
        };
        carry.push(end);
    }
    End::Finished(ActionStatus::Cancelled, Some("cancelled on request".into()))
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

/// The carried writes followed by `next`, to commit together.
fn with(carry: &mut Vec<Write>, next: Write) -> Vec<Write> {
    let mut writes = std::mem::take(carry);
    writes.push(next);
    writes
}
