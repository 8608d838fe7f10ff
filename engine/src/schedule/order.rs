//! The order in which one server accepts a target's submits.

use std::collections::HashMap;
use std::sync::Arc;

/// Turns for submits to one target. A submit holds its target's turn from
/// before it asks Control for a reservation until Control holds the inserted
/// action, so two submits for one target cannot swap places between taking
/// their ids and reaching Control's queue. Other targets never wait.
///
/// This orders the submits one server accepts; servers sharing a database
/// each keep their own turns.
#[derive(Default)]
pub(crate) struct SubmitOrder {
    turns: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A target's turn; give it back with [`SubmitOrder::done`].
pub(crate) struct Turn {
    target: String,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl SubmitOrder {
    /// Waits for `target`'s turn; submits get it in the order they asked.
    pub(crate) async fn turn(&self, target: &str) -> Turn {
        let lock = self
            .turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(target.to_owned())
            .or_default()
            .clone();
        Turn {
            target: target.to_owned(),
            _guard: lock.lock_owned().await,
        }
    }

    /// Ends a turn, forgetting the target when nobody else is waiting.
    pub(crate) fn done(&self, turn: Turn) {
        let Turn { target, _guard } = turn;
        drop(_guard);
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        // The map's own reference is the only one left: nobody holds or
        // awaits this lock.
        if turns
            .get(&target)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            turns.remove(&target);
        }
    }
}
