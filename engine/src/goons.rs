//! Goons on a server: faults injected on purpose into the steps of a test
//! deployment (`troupe serve --goons`), so an operator can rehearse what a
//! failing, slow, crashing or cancelled step, or a lost node, does to real
//! actions. Off unless the server is started with the flag; kept in memory
//! (a restart clears them); adding and clearing them is audited.
//!
//! A goon is the same [`Goon`] `troupe-test` runs in `cargo test`; the
//! runner asks [`Goons::take`] before each attempt it starts.

use std::sync::Mutex;

use serde::Serialize;
pub use troupe_bundle::goon::{Act, Goon};

use crate::model::Timestamp;

/// A goon a server holds, and how often it acted.
#[derive(Debug, Clone, Serialize)]
pub struct Armed {
    /// Its number on this server, for removing it.
    pub id: u64,
    #[serde(flatten)]
    pub goon: Goon,
    /// How many attempts it acted on so far.
    pub acted: u32,
    pub added_by: String,
    pub added_at: Timestamp,
}

impl Armed {
    fn spent(&self) -> bool {
        self.goon.times.is_some_and(|n| self.acted >= n)
    }
}

/// The goons a server holds.
#[derive(Debug, Default)]
pub struct Goons {
    armed: Mutex<(u64, Vec<Armed>)>,
}

impl Goons {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<Armed>)> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add(&self, goon: Goon, by: &str) -> Armed {
        let mut armed = self.lock();
        armed.0 += 1;
        let new = Armed {
            id: armed.0,
            goon,
            acted: 0,
            added_by: by.to_owned(),
            added_at: crate::model::now(),
        };
        armed.1.push(new.clone());
        new
    }

    pub fn list(&self) -> Vec<Armed> {
        self.lock().1.clone()
    }

    /// Removes goon `id`; false if there is none.
    pub(crate) fn remove(&self, id: u64) -> bool {
        let mut armed = self.lock();
        let before = armed.1.len();
        armed.1.retain(|a| a.id != id);
        armed.1.len() != before
    }

    /// Removes every goon; returns how many there were.
    pub(crate) fn clear(&self) -> usize {
        std::mem::take(&mut self.lock().1).len()
    }

    /// What the first goon that acts on this attempt does (counted), if any.
    pub(crate) fn take(&self, kind: &str, step: &str, attempt: u32) -> Option<Act> {
        let mut armed = self.lock();
        let goon = armed
            .1
            .iter_mut()
            .find(|a| !a.spent() && a.goon.acts_on(kind, step, attempt))?;
        goon.acted += 1;
        tracing::warn!(goon = goon.id, kind, step, attempt, act = ?goon.goon.act, "a goon acts on this attempt");
        Some(goon.goon.act.clone())
    }
}
