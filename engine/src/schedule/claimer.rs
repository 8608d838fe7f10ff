//! Starts queued actions whose turn has come, wherever they were submitted
//! (several servers on one database only; one server on SQLite queues in
//! memory).
//!
//! Where several servers share the database, a queued action belongs to
//! nobody: whichever server has room claims it once it is its target's
//! head and none of the target's actions runs (the claim rides with its
//! first step's start, [`crate::store::Turn`]). The claimer finds such
//! heads and hands them to Control: at once for a target whose action just
//! ended here with nothing queued behind it locally (the next one was most
//! likely submitted through another server), and every `period` while this
//! server has room (one submitted while its target ran elsewhere, or a
//! claim that lost a race). Claims decide; the claimer only proposes, so
//! two servers proposing one action cost a claim that touches no row.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::runner::Shared;
use crate::store::Write;
use crate::tasks::{self, TaskKind};

use super::control::ControlHandle;

/// Between polls while there is room (±20 %).
const PERIOD: Duration = Duration::from_millis(500);

/// How long ended targets are gathered into one look: under load, one
/// query for many ends instead of one each.
const GATHER: Duration = Duration::from_millis(10);

/// Asks the claimer to look at targets whose action just ended here.
#[derive(Clone)]
pub(super) struct NextOf {
    tx: mpsc::UnboundedSender<String>,
}

impl NextOf {
    pub(super) fn target(&self, target: String) {
        let _ = self.tx.send(target);
    }
}

pub(super) struct Claimer {
    shared: Arc<Shared>,
    control: ControlHandle,
    rx: mpsc::UnboundedReceiver<String>,
}

impl Claimer {
    pub(super) fn channel() -> (NextOf, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (NextOf { tx }, rx)
    }

    pub(super) fn spawn(
        shared: Arc<Shared>,
        control: ControlHandle,
        rx: mpsc::UnboundedReceiver<String>,
    ) {
        let claimer = Claimer {
            shared,
            control,
            rx,
        };
        tasks::spawn(TaskKind::Claimer, claimer.run());
    }

    async fn run(mut self) {
        let stopping = self.shared.stopping.clone();
        let mut first = true;
        loop {
            let mut targets = Vec::new();
            if !std::mem::take(&mut first) {
                tokio::select! {
                    next = self.rx.recv() => match next {
                        Some(t) => {
                            targets.push(t);
                            tokio::time::sleep(GATHER).await;
                        }
                        None => return,
                    },
                    _ = tokio::time::sleep(crate::tasks::jitter(PERIOD)) => {}
                    _ = stopping.cancelled() => return,
                }
            }
            while let Ok(t) = self.rx.try_recv() {
                targets.push(t);
            }
            targets.sort_unstable();
            targets.dedup();
            if let Err(e) = self.pass(&targets).await {
                tracing::warn!(error = %e, "cannot look for queued actions whose turn has come; trying again");
            }
        }
    }

    /// One look: at `targets`, or at every target when empty (a poll).
    async fn pass(&self, targets: &[String]) -> crate::Result<()> {
        // Most ended targets have nothing queued: one index probe says so.
        let queued;
        let targets = if targets.is_empty() {
            targets
        } else {
            queued = self.shared.store.queued_targets(targets).await?;
            if queued.is_empty() {
                return Ok(());
            }
            &queued[..]
        };
        let room = self.control.stats().await.room;
        if room == 0 {
            return Ok(());
        }
        let only = (!targets.is_empty()).then_some(targets);
        let limit = only.map_or(room, |t| t.len().min(room));
        for action in self.shared.store.heads(only, limit).await? {
            if action.cancel_requested_at.is_some() {
                // Cancelled while it waited: it ends without a claim.
                let write = Write::CancelQueued {
                    id: action.id,
                    at: crate::model::now(),
                };
                self.shared.store.write(vec![write]).await?;
            } else {
                self.control.enqueue(action);
            }
        }
        Ok(())
    }
}
