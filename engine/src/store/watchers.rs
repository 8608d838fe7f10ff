//! Watching an action: a channel per action someone waits on, told of
//! every commit that touched it.

use std::sync::Arc;

use tokio::sync::watch;

use super::{Outcome, Write};
use crate::model::{Action, ActionId};

/// The latest committed change of one action, as seen by its watchers.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// Counts commits that touched the action since the first watcher came.
    pub seq: u64,
    /// Whether the action reached a final status.
    pub terminal: bool,
    /// Its final state, when the write that ended it carried it.
    pub last: Option<Arc<Action>>,
}

/// Per-action watch channels, created when someone waits on an action and
/// dropped once nobody does, so a commit wakes only that action's waiters.
/// Also the set of live actions: those this server inserted (to run here),
/// claimed or resumed and has not yet seen end. A waiter that finds its action live needs not read
/// it first: its end is still to be published, under the same lock.
#[derive(Default)]
pub(super) struct Watchers {
    state: std::sync::Mutex<WatchState>,
}

#[derive(Default)]
pub(super) struct WatchState {
    channels: std::collections::HashMap<ActionId, watch::Sender<Change>>,
    live: std::collections::HashSet<ActionId>,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn watch(&self, id: ActionId) -> (watch::Receiver<Change>, bool) {
        let mut state = self.lock();
        let rx = state
            .channels
            .entry(id)
            .or_insert_with(|| watch::channel(Change::default()).0)
            .subscribe();
        (rx, state.live.contains(&id))
    }

    pub(super) fn hold(&self, ids: impl IntoIterator<Item = ActionId>) {
        self.lock().live.extend(ids);
    }

    pub(super) fn publish(&self, writes: &[&Write], outcomes: &[Outcome]) {
        let mut state = self.lock();
        let WatchState { channels, live } = &mut *state;
        for (w, outcome) in writes.iter().zip(outcomes) {
            let (ended, last) = match (w, outcome) {
                // Not written: nothing changed.
                (_, Outcome::Fenced) => continue,
                // Owned by nobody (several servers), it may end elsewhere.
                (Write::Insert { owner: Some(_), .. }, Outcome::Inserted(id)) => {
                    live.insert(*id);
                    continue;
                }
                (
                    Write::Start {
                        turn: Some(_), id, ..
                    },
                    Outcome::Done { rows: 1 },
                ) => {
                    live.insert(*id);
                    continue;
                }
                (Write::Finish { last, .. }, _) => (true, last.clone()),
                (Write::CancelQueued { .. }, Outcome::Done { rows }) => (*rows > 0, None),
                _ => (false, None),
            };
            let Some(id) = w.action_id() else { continue };
            if ended {
                live.remove(&id);
            }
            if let Some(tx) = channels.get(&id) {
                tx.send_modify(|c| {
                    c.seq += 1;
                    c.terminal |= ended;
                    if last.is_some() {
                        c.last = last;
                    }
                });
            }
        }
        channels.retain(|_, tx| tx.receiver_count() > 0);
    }
}
