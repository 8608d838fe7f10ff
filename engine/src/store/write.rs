//! What a change to the database is: the `Write`s callers hand the store,
//! how each one changes an action in memory (the same as its SQL changes
//! the rows), and what it did.

use std::sync::Arc;

use super::{AuditEntry, BundleRow, NodeResultRow, NodeRow, SecretRow, TokenRow};
use crate::model::{Action, ActionId, ActionStatus, NewAction, StepStatus, Timestamp};

/// One change to the database. A caller's list of writes commits atomically.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    Insert {
        new: NewAction,
        bundle: String,
        request_hash: String,
        /// The server that runs it. `None`: queued and owned by nobody,
        /// where several servers share the database; whichever has room
        /// claims it at its turn ([`Write::Start`] with a [`Turn`]).
        owner: Option<String>,
        /// (name, step definition) for each step, in order.
        steps: Vec<(String, String)>,
        at: Timestamp,
        /// Set when Control starts the action as it is inserted (its target
        /// was idle): the action is stored `running` under `owner`'s lease
        /// until this time, with its first step started (attempt 1), which
        /// saves the separate commit that would start it. Where several
        /// servers share the database, only if the database finds its
        /// target idle too ([`Outcome::Behind`] otherwise).
        start: Option<Timestamp>,
        /// With `start`: the node the first step was placed on, when it
        /// requires one and one was free at submission.
        node: Option<String>,
    },
    Start {
        id: ActionId,
        owner: String,
        lease_until: Timestamp,
        at: Timestamp,
        /// Set for a queued action owned by nobody: the start is a claim.
        turn: Option<Turn>,
    },
    StepStarted {
        id: ActionId,
        seq: u32,
        name: String,
        attempt: u32,
        at: Timestamp,
        /// The remote node the attempt runs on; `None`: the app server.
        node: Option<String>,
    },
    StepSucceeded {
        id: ActionId,
        seq: u32,
        output: String,
        at: Timestamp,
    },
    /// An attempt failed and another will follow.
    StepAttemptFailed {
        id: ActionId,
        seq: u32,
        attempt: u32,
        started_at: Timestamp,
        /// The remote node it ran on; `None`: the app server.
        node: Option<String>,
        error: String,
        at: Timestamp,
    },
    /// No node meets what the step requires (`waiting_for`): it waits,
    /// without an attempt started.
    StepWaiting {
        id: ActionId,
        seq: u32,
        name: String,
        waiting_for: String,
    },
    /// What an attempt logged. Stored once per attempt (writing it again
    /// replaces it); never on its own, always with the attempt's outcome.
    StepLog {
        id: ActionId,
        seq: u32,
        attempt: u32,
        log: String,
        at: Timestamp,
    },
    /// The step ended without success (failed or cancelled).
    StepEnded {
        id: ActionId,
        seq: u32,
        status: StepStatus,
        error: String,
        at: Timestamp,
    },
    /// The action ended; its pending steps become `skipped`.
    Finish {
        id: ActionId,
        status: ActionStatus,
        error: Option<String>,
        at: Timestamp,
        /// The action as it is once this commits, if the writer knows it:
        /// published to waiters so they need not read it back.
        last: Option<Arc<Action>>,
    },
    /// Records that a cancel was asked for, if the action is unfinished
    /// (`Done { rows: 0 }` if it had already ended). The first request's
    /// time stays.
    RequestCancel { id: ActionId, at: Timestamp },
    /// Cancels an action only if it is still queued.
    CancelQueued { id: ActionId, at: Timestamp },
    /// Takes an unfinished action over, if it is still at `epoch` (as the
    /// claimer read it) and owned by nobody or `owner` itself: the epoch is
    /// bumped, so a runner of the old one writes nothing more. `Done { rows:
    /// 0 }` when another claim came first.
    Claim {
        id: ActionId,
        owner: String,
        epoch: i64,
        lease_until: Timestamp,
    },
    /// Stores a verified bundle; it becomes its name's active version.
    InsertBundle(Box<BundleRow>, Arc<[u8]>),
    /// Makes a stored bundle its name's active version.
    ActivateBundle { hash: String, at: Timestamp },
    TrustKey {
        key_id: String,
        public_key: String,
        at: Timestamp,
    },
    /// Revokes a key (recording it first if it came from configuration).
    RevokeKey {
        key_id: String,
        public_key: String,
        at: Timestamp,
    },
    /// Stores a new API token (its hash, never its text).
    CreateToken(Box<TokenRow>),
    /// Stores a node's row, replacing one of the same name.
    PutNode(Box<NodeRow>),
    /// Bumps `kind`'s generation only if it is still `seen`, the one the
    /// writer's caller last loaded; otherwise the whole transaction fails
    /// ([`super::Stale`]): another server changed that configuration
    /// meanwhile, and the caller's checks must be made again against it.
    Guard { kind: super::ConfigKind, seen: i64 },
    /// Keeps a result a node reported that no runner here waited for,
    /// replacing a repeat of it, and forgets those stored before
    /// `forget_before`.
    PutNodeResult {
        row: Box<NodeResultRow>,
        forget_before: Timestamp,
    },
    /// Revokes a token and records `audit`, unless it is already revoked
    /// or is the last active admin token (then `Done { rows: 0 }` and
    /// nothing is written). The active admin tokens are read locked, so two
    /// revokes of the last two cannot both pass, however their commits
    /// interleave.
    RevokeToken {
        id: String,
        at: Timestamp,
        audit: Box<AuditEntry>,
    },
    /// Counts a node admitted with join token `id`, if the token is live
    /// and has uses left (`Outcome::Done { rows: 0 }` when not).
    UseJoinToken {
        id: String,
        max_uses: Option<u32>,
        at: Timestamp,
    },
    /// Records an administrative change in `audit_log`.
    Audit(Box<AuditEntry>),
    /// Bumps a kind's generation: the change it commits with reaches every
    /// server's memory.
    Bump(super::ConfigKind),
    /// Stores a secret (encrypted), replacing any of the same name.
    SetSecret(Box<SecretRow>),
    /// Deletes a secret and, if there was one, records `audit` (a delete
    /// that found nothing is no change to record).
    DeleteSecret {
        name: String,
        audit: Box<AuditEntry>,
    },
    /// Applies `change` to `target`'s record (making one) and records
    /// `audit`; `Done { rows: 0 }`, nothing written, when the record would
    /// hold more than `targets::MAX_ATTRIBUTES`.
    PutTargetRecord {
        target: String,
        change: crate::targets::Change,
        at: Timestamp,
        by: String,
        audit: Box<AuditEntry>,
    },
    /// Deletes `target`'s record and, if there was one, records `audit`.
    DeleteTargetRecord {
        target: String,
        audit: Box<AuditEntry>,
    },
}

/// A claim of a queued action owned by nobody (several servers share the
/// database). It is taken, and its epoch bumped, only if it is still queued
/// and unclaimed, no cancel was asked for, and it is its target's head: the
/// lowest `seq` of the target's unfinished actions, so none of them runs.
/// Otherwise the start answers `Done { rows: 0 }` and the request's other
/// writes [`Outcome::Fenced`]: it is not this server's to run, or not yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Turn {
    pub(crate) target: String,
    /// The epoch the claimer read.
    pub(crate) epoch: i64,
}

impl Write {
    /// Applies this write to `action` in memory exactly as its SQL changes
    /// the rows (`store::tests` holds the two to each other).
    pub(crate) fn apply_to(&self, action: &mut Action) {
        if self.action_id() != Some(action.id) {
            return;
        }
        fn step(action: &mut Action, seq: u32) -> Option<&mut crate::model::StepRecord> {
            action.steps.iter_mut().find(|s| s.seq == seq)
        }
        match self {
            Write::Start {
                owner, at, turn, ..
            } => {
                if matches!(action.status, ActionStatus::Queued | ActionStatus::Running) {
                    action.status = ActionStatus::Running;
                    action.owner = Some(owner.clone());
                    action.started_at.get_or_insert(*at);
                    action.revision += 1;
                    if let Some(turn) = turn {
                        action.epoch = turn.epoch + 1;
                    }
                }
            }
            // Only for a running action, as in the SQL.
            Write::StepStarted {
                seq,
                name,
                attempt,
                at,
                node,
                ..
            } if action.status == ActionStatus::Running => {
                if let Some(s) = step(action, *seq) {
                    s.status = StepStatus::Running;
                    s.attempt = *attempt;
                    s.started_at = Some(*at);
                    s.finished_at = None;
                    s.waiting_for = None;
                    s.node = node.clone();
                }
                action.current_step = Some(name.clone());
                action.revision += 1;
            }
            Write::StepWaiting {
                seq,
                name,
                waiting_for,
                ..
            } => {
                if let Some(s) = step(action, *seq) {
                    s.status = StepStatus::Waiting;
                    s.waiting_for = Some(waiting_for.clone());
                }
                if action.status == ActionStatus::Running {
                    action.current_step = Some(name.clone());
                    action.revision += 1;
                }
            }
            Write::StepSucceeded {
                seq, output, at, ..
            } => {
                if let Some(s) = step(action, *seq) {
                    s.status = StepStatus::Succeeded;
                    s.output = Some(
                        serde_json::from_str(output)
                            .unwrap_or_else(|_| serde_json::Value::String(output.clone())),
                    );
                    s.error = None;
                    s.finished_at = Some(*at);
                }
            }
            Write::StepAttemptFailed { seq, error, .. } => {
                if let Some(s) = step(action, *seq) {
                    s.error = Some(error.clone());
                }
                action.revision += 1;
            }
            Write::StepEnded {
                seq,
                status,
                error,
                at,
                ..
            } => {
                if let Some(s) = step(action, *seq) {
                    s.status = *status;
                    s.error = Some(error.clone());
                    s.finished_at = Some(*at);
                    s.waiting_for = None;
                }
            }
            Write::Finish {
                status, error, at, ..
            } => end(action, *status, error.clone(), *at),
            Write::RequestCancel { at, .. } if !action.status.is_terminal() => {
                action.cancel_requested_at.get_or_insert(*at);
                action.revision += 1;
            }
            Write::CancelQueued { at, .. } if action.status == ActionStatus::Queued => {
                let error = Some("cancelled before it started".to_owned());
                end(action, ActionStatus::Cancelled, error, *at);
            }
            Write::Claim { owner, epoch, .. }
                if *epoch == action.epoch
                    && matches!(action.status, ActionStatus::Queued | ActionStatus::Running)
                    && action.owner.as_ref().is_none_or(|o| o == owner) =>
            {
                action.owner = Some(owner.clone());
                action.epoch += 1;
                action.revision += 1;
            }
            _ => {}
        }
    }

    /// The action an insert stores, given the id it got: the same values
    /// its SQL writes (`store::tests` holds the two to each other).
    pub(crate) fn inserted(&self, id: ActionId) -> Option<Action> {
        let Write::Insert {
            new,
            bundle,
            owner,
            steps,
            at,
            start,
            node,
            ..
        } = self
        else {
            return None;
        };
        let begun = start.is_some() && !steps.is_empty();
        Some(Action {
            id,
            kind: new.kind.clone(),
            target: new.target.clone(),
            params: new.params.clone(),
            status: if begun {
                ActionStatus::Running
            } else {
                ActionStatus::Queued
            },
            bundle: bundle.clone(),
            current_step: steps
                .first()
                .filter(|_| begun)
                .map(|(name, _)| name.clone()),
            error: None,
            idempotency_key: new.idempotency_key.clone(),
            submitted_by: new.submitted_by.clone(),
            owner: owner.clone(),
            // The inserting server holds it from epoch 1; nobody holds a
            // queued action until it is claimed.
            epoch: i64::from(owner.is_some()),
            revision: i64::from(begun),
            created_at: *at,
            started_at: begun.then_some(*at),
            finished_at: None,
            waiting_for: None,
            cancel_requested_at: None,
            steps: steps
                .iter()
                .enumerate()
                .map(|(seq, (name, step))| {
                    let first = begun && seq == 0;
                    crate::model::StepRecord {
                        seq: seq as u32,
                        name: name.clone(),
                        step: step.clone(),
                        status: if first {
                            StepStatus::Running
                        } else {
                            StepStatus::Pending
                        },
                        attempt: u32::from(first),
                        waiting_for: None,
                        node: node.clone().filter(|_| first),
                        started_at: first.then_some(*at),
                        finished_at: None,
                        output: None,
                        error: None,
                    }
                })
                .collect(),
        })
    }

    pub(super) fn action_id(&self) -> Option<ActionId> {
        match self {
            Write::Start { id, .. }
            | Write::StepStarted { id, .. }
            | Write::StepSucceeded { id, .. }
            | Write::StepAttemptFailed { id, .. }
            | Write::StepLog { id, .. }
            | Write::StepWaiting { id, .. }
            | Write::StepEnded { id, .. }
            | Write::Finish { id, .. }
            | Write::RequestCancel { id, .. }
            | Write::CancelQueued { id, .. }
            | Write::Claim { id, .. } => Some(*id),
            Write::Insert { .. }
            | Write::InsertBundle(..)
            | Write::ActivateBundle { .. }
            | Write::TrustKey { .. }
            | Write::RevokeKey { .. }
            | Write::CreateToken(..)
            | Write::PutNode(..)
            | Write::PutNodeResult { .. }
            | Write::Guard { .. }
            | Write::RevokeToken { .. }
            | Write::UseJoinToken { .. }
            | Write::Audit(..)
            | Write::Bump(..)
            | Write::SetSecret(..)
            | Write::DeleteSecret { .. }
            | Write::PutTargetRecord { .. }
            | Write::DeleteTargetRecord { .. } => None,
        }
    }

    /// The kind of configuration servers hold in memory that this write
    /// changes, if any.
    pub(super) fn config_kind(&self) -> Option<super::ConfigKind> {
        use super::ConfigKind;
        match self {
            Write::CreateToken(..) | Write::RevokeToken { .. } => Some(ConfigKind::Tokens),
            Write::TrustKey { .. } | Write::RevokeKey { .. } => Some(ConfigKind::Keys),
            Write::InsertBundle(..) | Write::ActivateBundle { .. } => Some(ConfigKind::Bundles),
            Write::PutNode(..) => Some(ConfigKind::Nodes),
            _ => None,
        }
    }
}

fn end(action: &mut Action, status: ActionStatus, error: Option<String>, at: Timestamp) {
    action.status = status;
    action.error = error;
    action.finished_at = Some(at);
    action.owner = None;
    action.revision += 1;
    if status != ActionStatus::Succeeded {
        for s in action
            .steps
            .iter_mut()
            .filter(|s| matches!(s.status, StepStatus::Pending | StepStatus::Waiting))
        {
            s.status = StepStatus::Skipped;
            s.waiting_for = None;
        }
    }
}

/// What one write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done {
        rows: u64,
    },
    Inserted(ActionId),
    /// Inserted queued, owned by nobody, though it asked to start: the
    /// database found its target busy (another server runs or holds one of
    /// its actions). It starts when its turn comes, on whichever server.
    Behind(ActionId),
    /// The idempotency key exists with the same request.
    Existing(ActionId),
    /// The idempotency key exists with a different request.
    Conflict,
    /// Not written: its request's [`Fence`](super::Fence) no longer holds
    /// (another server took the action over).
    Fenced,
}

impl Outcome {
    pub(crate) fn rows(&self) -> u64 {
        match self {
            Outcome::Done { rows } => *rows,
            Outcome::Inserted(_) | Outcome::Behind(_) => 1,
            Outcome::Existing(_) | Outcome::Conflict | Outcome::Fenced => 0,
        }
    }
}
