//! The Control actor: decides which action runs when. Actions for the same
//! target run one at a time in submission order; actions for different
//! targets run concurrently up to `max_running`. Each running action is
//! driven by its own runner task (see `runner`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::model::{Action, ActionId};
use crate::runner::{self, Begun, Shared};

enum Msg {
    Enqueue(Box<Action>),
    /// Claim an idle target for an action about to be inserted running.
    Reserve {
        target: String,
        reply: oneshot::Sender<bool>,
    },
    /// The reserved action was inserted running (its first step on a
    /// node, if placed): run it now.
    Begin(Box<Action>, Option<crate::nodes::Placed>),
    /// The reserved action was not inserted.
    Unreserve {
        target: String,
    },
    Cancel {
        id: ActionId,
        reply: oneshot::Sender<CancelOutcome>,
    },
    Finished {
        id: ActionId,
        target: String,
        bundle: String,
    },
    /// Stop starting actions; answer once none is running.
    Drain {
        reply: oneshot::Sender<()>,
    },
    Stats {
        reply: oneshot::Sender<ControlStats>,
    },
    /// The actions Control holds, queued or running.
    Held {
        reply: oneshot::Sender<std::collections::HashSet<ActionId>>,
    },
}

/// Where Control found an action it was asked to cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelOutcome {
    /// It was running; its current step has been asked to stop.
    Running,
    /// It was waiting its turn and has been taken out of the queue.
    Dequeued,
    /// Control does not hold it.
    Unknown,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ControlStats {
    pub running: usize,
    pub queued: usize,
    /// Actions that could start now (none while draining).
    pub room: usize,
}

#[derive(Clone)]
pub(crate) struct ControlHandle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl ControlHandle {
    /// With `next_of` (several servers), a target whose action ends here
    /// with nothing queued behind it locally is handed to the claimer: its
    /// next action may have been submitted through another server.
    pub(crate) fn spawn(
        shared: Arc<Shared>,
        max_running: usize,
        next_of: Option<super::claimer::NextOf>,
    ) -> ControlHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = ControlHandle { tx };
        let control = Control {
            handle: handle.clone(),
            shared,
            max_running: max_running.max(1),
            targets: HashMap::new(),
            ready: VecDeque::new(),
            queued: HashMap::new(),
            rerun: HashMap::new(),
            running: HashMap::new(),
            reserved: 0,
            next_of,
            draining: false,
            drain_waiters: Vec::new(),
        };
        crate::tasks::spawn(crate::tasks::TaskKind::Control, control.run(rx));
        handle
    }

    /// Hands Control an action to run (new, or unfinished after a restart).
    pub(crate) fn enqueue(&self, action: Action) {
        let _ = self.tx.send(Msg::Enqueue(Box::new(action)));
    }

    /// Claims `target` for an action that is about to be inserted, if the
    /// target is idle and there is room to run it at once. Then the insert
    /// also starts it, and the caller must follow with [`Self::begin`] (it
    /// was inserted) or [`Self::unreserve`] (it was not).
    pub(crate) async fn reserve(&self, target: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        let target = target.to_owned();
        let _ = self.tx.send(Msg::Reserve { target, reply });
        rx.await.unwrap_or(false)
    }

    /// Runs an action inserted running on a reservation.
    pub(crate) fn begin(&self, action: Action, placed: Option<crate::nodes::Placed>) {
        let _ = self.tx.send(Msg::Begin(Box::new(action), placed));
    }

    pub(crate) fn unreserve(&self, target: String) {
        let _ = self.tx.send(Msg::Unreserve { target });
    }

    pub(crate) async fn cancel(&self, id: ActionId) -> CancelOutcome {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Cancel { id, reply });
        rx.await.unwrap_or(CancelOutcome::Unknown)
    }

    pub(crate) async fn drain(&self) {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Drain { reply });
        let _ = rx.await;
    }

    pub(crate) async fn stats(&self) -> ControlStats {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Stats { reply });
        rx.await.unwrap_or_default()
    }

    pub(crate) async fn held(&self) -> std::collections::HashSet<ActionId> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Held { reply });
        rx.await.unwrap_or_default()
    }
}

#[derive(Default)]
struct Target {
    queue: VecDeque<Action>,
    busy: bool,
}

struct Control {
    handle: ControlHandle,
    shared: Arc<Shared>,
    max_running: usize,
    targets: HashMap<String, Target>,
    /// Targets with a queued action and none running, in the order they
    /// became ready. Invariant: a target is here iff it is idle with work.
    ready: VecDeque<String>,
    queued: HashMap<ActionId, String>,
    running: HashMap<ActionId, CancellationToken>,
    /// Actions claimed again (a later epoch) while a runner of an earlier
    /// epoch still runs here, fenced out: queued again once it ends.
    rerun: HashMap<ActionId, Action>,
    /// Targets reserved for actions being inserted; each counts as running.
    reserved: usize,
    next_of: Option<super::claimer::NextOf>,
    draining: bool,
    drain_waiters: Vec<oneshot::Sender<()>>,
}

impl Control {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Enqueue(action) => self.enqueue(*action),
                Msg::Reserve { target, reply } => {
                    let _ = reply.send(self.reserve(target));
                }
                Msg::Begin(action, placed) => {
                    self.reserved -= 1;
                    self.shared.agency.pin(&action.bundle);
                    self.start(*action, Begun::WithInsert(placed));
                }
                Msg::Unreserve { target } => {
                    self.reserved -= 1;
                    self.finished(None, target);
                }
                Msg::Cancel { id, reply } => {
                    let _ = reply.send(self.cancel(id));
                }
                Msg::Finished { id, target, bundle } => {
                    self.shared.agency.unpin(&bundle);
                    self.finished(Some(id), target);
                    if let Some(again) = self.rerun.remove(&id) {
                        self.enqueue(again);
                    }
                }
                Msg::Drain { reply } => {
                    self.draining = true;
                    self.drain_waiters.push(reply);
                    self.check_drained();
                }
                Msg::Held { reply } => {
                    let _ = reply.send(
                        self.queued
                            .keys()
                            .chain(self.running.keys())
                            .copied()
                            .collect(),
                    );
                }
                Msg::Stats { reply } => {
                    let busy = self.running.len() + self.reserved;
                    let _ = reply.send(ControlStats {
                        running: self.running.len(),
                        queued: self.queued.len(),
                        room: if self.draining {
                            0
                        } else {
                            self.max_running.saturating_sub(busy)
                        },
                    });
                }
            }
            self.pump();
        }
    }

    fn enqueue(&mut self, action: Action) {
        if self.running.contains_key(&action.id) {
            // Its runner holds an earlier epoch and is fenced out at its
            // next write: this one runs once it has ended.
            self.rerun.insert(action.id, action);
            return;
        }
        if let Some(target) = self.queued.get(&action.id) {
            // Claimed again while it waited here: the later epoch replaces it.
            if let Some(waiting) = self
                .targets
                .get_mut(target)
                .and_then(|t| t.queue.iter_mut().find(|a| a.id == action.id))
                && waiting.epoch < action.epoch
            {
                *waiting = action;
            }
            return;
        }
        self.shared.agency.pin(&action.bundle);
        self.queued.insert(action.id, action.target.clone());
        let target = self.targets.entry(action.target.clone()).or_default();
        target.queue.push_back(action);
        if !target.busy && target.queue.len() == 1 {
            self.ready.push_back(target.queue[0].target.clone());
        }
    }

    /// Reserves an idle target if an action could start on it now.
    fn reserve(&mut self, target: String) -> bool {
        if self.draining
            || self.running.len() + self.reserved >= self.max_running
            || self.targets.contains_key(&target)
        {
            return false;
        }
        self.targets.insert(
            target,
            Target {
                queue: VecDeque::new(),
                busy: true,
            },
        );
        self.reserved += 1;
        true
    }

    fn cancel(&mut self, id: ActionId) -> CancelOutcome {
        if let Some(token) = self.running.get(&id) {
            token.cancel();
            return CancelOutcome::Running;
        }
        let Some(target_name) = self.queued.remove(&id) else {
            return CancelOutcome::Unknown;
        };
        if let Some(target) = self.targets.get_mut(&target_name) {
            if let Some(a) = target.queue.iter().find(|a| a.id == id) {
                self.shared.agency.unpin(&a.bundle);
            }
            target.queue.retain(|a| a.id != id);
            if target.queue.is_empty() && !target.busy {
                self.targets.remove(&target_name);
                self.ready.retain(|t| *t != target_name);
            }
        }
        CancelOutcome::Dequeued
    }

    /// Frees the target of a finished action (or of a reservation, `None`).
    fn finished(&mut self, id: Option<ActionId>, target_name: String) {
        if let Some(id) = id {
            self.running.remove(&id);
        }
        if let Some(target) = self.targets.get_mut(&target_name) {
            target.busy = false;
            if target.queue.is_empty() {
                self.targets.remove(&target_name);
                if let (Some(next_of), Some(_)) = (&self.next_of, id) {
                    next_of.target(target_name);
                }
            } else {
                self.ready.push_back(target_name);
            }
        }
        self.check_drained();
    }

    /// Starts ready actions while there is room.
    fn pump(&mut self) {
        while !self.draining && self.running.len() + self.reserved < self.max_running {
            let Some(name) = self.ready.pop_front() else {
                break;
            };
            let Some(target) = self.targets.get_mut(&name) else {
                continue;
            };
            let Some(action) = target.queue.pop_front() else {
                continue;
            };
            target.busy = true;
            self.queued.remove(&action.id);
            self.start(action, Begun::No);
        }
    }

    /// Spawns the action's runner.
    fn start(&mut self, action: Action, begun: Begun) {
        let cancel = CancellationToken::new();
        self.running.insert(action.id, cancel.clone());
        let (shared, control) = (self.shared.clone(), self.handle.clone());
        let (id, target, bundle) = (action.id, action.target.clone(), action.bundle.clone());
        // The runner and its watcher are the one exception to `tasks`: the
        // watcher is this failure's meaning (the action is abandoned).
        let task = tokio::spawn(runner::run(shared.clone(), action, cancel, begun));
        tokio::spawn(async move {
            if let Err(e) = task.await {
                // A runner is engine code: its panic is a bug, and the action
                // it drove must not stay `running` under a renewed lease.
                let why = if e.is_panic() {
                    format!("panicked: {}", panic_message(e.into_panic()))
                } else {
                    "was stopped".to_owned()
                };
                tracing::error!(action_id = id, "the runner for this action {why}");
                runner::abandon(&shared, id, &why).await;
            }
            let _ = control.tx.send(Msg::Finished { id, target, bundle });
        });
    }

    fn check_drained(&mut self) {
        if self.draining && self.running.is_empty() && self.reserved == 0 {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "(no message)".to_owned(),
        },
    }
}
