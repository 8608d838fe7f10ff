//! Scheduling: the rule "one running action per target, in submission
//! order, owned by one server", and the state that keeps it. Control holds
//! the queues and runners; the submit order, the lease on running actions
//! and the rescuer of actions nobody runs live beside it. Nothing outside
//! this module decides who runs what.

mod control;
mod lease;
mod order;
mod rescuer;
mod submit;

use std::sync::Arc;
use std::time::Duration;

pub use control::ControlStats;
pub(crate) use lease::Lease;
pub(crate) use submit::Validated;

use crate::Result;
use crate::model::ActionId;
use crate::runner::Shared;
use crate::store::{Outcome, Write};
use control::{CancelOutcome, ControlHandle};
use order::SubmitOrder;
use rescuer::Rescuer;

/// Owns Control, the submit order, the lease renewal and the rescuer.
pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    control: ControlHandle,
    submits: SubmitOrder,
    rescuer: Arc<Rescuer>,
}

impl Scheduler {
    /// Starts Control, the lease renewal and the rescuer.
    pub(crate) fn start(shared: Arc<Shared>, max_running: usize) -> Arc<Scheduler> {
        let control = ControlHandle::spawn(shared.clone(), max_running);
        let rescuer = Rescuer::new(shared.clone(), control.clone());
        lease::spawn_renewal(shared.clone());
        rescuer.spawn();
        Arc::new(Scheduler {
            shared,
            control,
            submits: SubmitOrder::default(),
            rescuer,
        })
    }

    /// Hands every unfinished action in the database to Control, oldest
    /// first; returns how many (the start-up pass).
    pub(crate) async fn resume(&self) -> Result<usize> {
        self.rescuer.run_once().await
    }

    /// Ends a cancelled action whose cancel request is committed: asks its
    /// runner to stop, or ends it at once if it was waiting its turn.
    pub(crate) async fn cancel(&self, id: ActionId) {
        match self.control.cancel(id).await {
            CancelOutcome::Running => {}
            CancelOutcome::Dequeued | CancelOutcome::Unknown => {
                match self.cancel_queued(id).await {
                    Ok(Outcome::Done { rows: 0 }) => {
                        // It started meanwhile: ask Control again.
                        self.control.cancel(id).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Out of Control's queue but still `queued` in the
                        // database: hand it back, and its runner ends it.
                        tracing::warn!(action_id = id, error = %e, "could not end a cancelled queued action; it ends when the database answers");
                        self.rescuer.wake();
                    }
                }
            }
        }
    }

    async fn cancel_queued(&self, id: ActionId) -> Result<Outcome> {
        fail::fail_point!("store.cancel_queued", |_| Err(crate::Error::Database(
            sqlx::Error::Protocol("the write failed (injected)".into())
        )));
        let write = Write::CancelQueued {
            id,
            at: crate::model::now(),
        };
        Ok(self.shared.store.write(vec![write]).await?[0])
    }

    pub(crate) async fn stats(&self) -> ControlStats {
        self.control.stats().await
    }

    /// Waits up to `grace` for the running steps to finish (none starts
    /// from now on).
    pub(crate) async fn drain(&self, grace: Duration) {
        self.shared.stopping.cancel();
        if tokio::time::timeout(grace, self.control.drain())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "steps still running at the shutdown deadline; they resume on the next start"
            );
        }
    }

    /// Gives up the unfinished actions, once no step of ours runs.
    pub(crate) async fn release(&self) {
        lease::release(&self.shared).await;
    }
}
