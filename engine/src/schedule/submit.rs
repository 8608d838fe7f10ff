//! Recording a validated action and handing it to Control: started with
//! its insert when its target is idle and there is room, queued otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::{Action, NewAction, Submitted};
use crate::store::{Outcome, Write};
use crate::{Error, Result, bundle, nodes, placement};

use super::Scheduler;

/// An action that passed every check, ready to be recorded.
pub(crate) struct Validated {
    pub(crate) new: NewAction,
    /// The bundle it runs on (pinned or active).
    pub(crate) bundle: String,
    pub(crate) request_hash: String,
    /// Its steps: (name, step) in order.
    pub(crate) steps: Vec<(String, String)>,
    /// What its first step needs of a node; empty: it runs on this server;
    /// `None`: it cannot start with the insert (it holds limits).
    pub(crate) first_requires: Option<BTreeMap<String, String>>,
    /// When the submit must have answered, `timeout` after it began.
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) timeout: std::time::Duration,
}

impl Scheduler {
    /// Records the action durably and hands it to Control, answering by
    /// `v.deadline`: past it, before the insert was handed to the writer,
    /// nothing was written ([`Error::Database`]); after, the insert may
    /// still commit ([`Error::OutcomeUnknown`]), and if it does the action
    /// runs.
    pub(crate) async fn submit(self: &Arc<Self>, v: Validated) -> Result<Submitted> {
        let Validated {
            new,
            bundle,
            request_hash,
            steps,
            first_requires,
            deadline,
            timeout,
        } = v;
        let late = || {
            Error::Database(sqlx::Error::Protocol(format!(
                "the database did not answer the submit within {timeout:?}; nothing was written"
            )))
        };
        let shared = &self.shared;
        // When the target is idle and there is room, Control reserves it and
        // the insert starts the action too: one commit fewer before its
        // first step runs.
        //
        // Submits for one target go one at a time from here until Control
        // holds the action, so ids, and so start order, follow the order in
        // which they were accepted even when they share a group commit.
        let turn = tokio::time::timeout_at(deadline, self.submits.turn(&new.target))
            .await
            .map_err(|_| late())?;
        // A first step that needs a node starts with the insert only when a
        // node that has what it needs is free now (it is counted busy
        // from here); otherwise the runner places it and records it waiting.
        let placed = match &first_requires {
            Some(r) if !r.is_empty() => self.place_at_submit(&new, r),
            _ => None,
        };
        let startable = first_requires.as_ref().is_some_and(|r| r.is_empty()) || placed.is_some();
        let reserved = startable && self.control.reserve(&new.target).await;
        let placed = placed.filter(|_| reserved);
        let at = crate::model::now();
        // Where several servers share the database, a queued action is
        // nobody's until claimed at its turn, and one that asks to start
        // starts only if the database finds its target idle too.
        let owner = (reserved || !shared.store.shared()).then(|| shared.lease.owner.to_string());
        let insert = Write::Insert {
            new: new.clone(),
            bundle,
            request_hash,
            owner,
            steps,
            at,
            start: reserved.then(|| at + shared.lease.length),
            node: placed.as_ref().map(|p| p.name.clone()),
        };
        // Recording and handing over run on their own task, so a caller that
        // goes away mid-request cannot leave an action stored but not run.
        let (scheduler, target) = (self.clone(), new.target.clone());
        // The action as the insert stores it, less the id it will get
        // (started, or queued behind its target's other actions).
        let built = insert.inserted(0).expect("an insert builds its action");
        let behind = match &insert {
            Write::Insert {
                new,
                bundle,
                request_hash,
                steps,
                at,
                ..
            } => Write::Insert {
                new: new.clone(),
                bundle: bundle.clone(),
                request_hash: request_hash.clone(),
                owner: None,
                steps: steps.clone(),
                at: *at,
                start: None,
                node: None,
            },
            _ => unreachable!("an insert"),
        };
        let handover = tokio::spawn(async move {
            let outcome = scheduler
                .shared
                .store
                .write(vec![insert])
                .await
                .map(|o| o[0]);
            let action = match outcome {
                Ok(Outcome::Inserted(id)) => Some(Action { id, ..built }),
                Ok(Outcome::Behind(id)) => behind.inserted(id),
                // The commit may have gone through all the same.
                Err(_) => {
                    scheduler.rescuer.wake();
                    None
                }
                _ => None,
            };
            let control = &scheduler.control;
            match (&action, reserved) {
                // Its turn comes after an action of its target that another
                // server holds: whichever server has room then claims it.
                (Some(a), true) if a.status == crate::model::ActionStatus::Queued => {
                    control.unreserve(target)
                }
                (Some(a), true) => control.begin(a.clone(), placed),
                (Some(a), false) => control.enqueue(a.clone()),
                (None, true) => control.unreserve(target),
                (None, false) => {}
            }
            scheduler.submits.done(turn);
            outcome.map(|o| (o, action))
        });
        // Past the deadline the handover goes on without its caller: the
        // insert may still commit, and then the action runs.
        let (outcome, action) = match tokio::time::timeout_at(deadline, handover).await {
            Ok(joined) => joined.map_err(|_| Error::ShuttingDown)??,
            Err(_) => {
                return Err(Error::OutcomeUnknown {
                    timed_out: Some(timeout),
                    detail: String::new(),
                });
            }
        };
        match outcome {
            Outcome::Inserted(_) | Outcome::Behind(_) => Ok(Submitted {
                action: action.expect("an inserted action is built"),
                created: true,
            }),
            Outcome::Existing(id) => Ok(Submitted {
                action: tokio::time::timeout_at(deadline, shared.store.action(id))
                    .await
                    .map_err(|_| late())??
                    .ok_or(Error::ActionNotFound(id))?,
                created: false,
            }),
            Outcome::Conflict => Err(Error::IdempotencyConflict(
                new.idempotency_key.unwrap_or_default(),
            )),
            Outcome::Done { .. } | Outcome::Fenced => {
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
        requires: &BTreeMap<String, String>,
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
        let scope = bundle::template::scope(action, &Default::default(), &self.shared.vars);
        let wants = placement::Requirement::resolve(requires, &scope).ok()?;
        self.shared.nodes.place(&wants)
    }
}
