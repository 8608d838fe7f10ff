//! Scheduling: the rule "one running action per target, in submission
//! order, owned by one server", and the state that keeps it. Control holds
//! the queues and runners; the submit order, this server's lease and the
//! rescuer of actions nobody runs live beside it. Nothing outside this
//! module decides who runs what.

mod claimer;
mod control;
mod lease;
mod order;
mod rescuer;
mod submit;

use std::sync::Arc;
use std::time::Duration;

pub use control::ControlStats;
pub(crate) use lease::Lease;
use lease::ServerLease;
pub(crate) use submit::Validated;

use crate::Result;
use crate::model::ActionId;
use crate::runner::Shared;
use crate::store::{Outcome, Write};
use claimer::Claimer;
use control::{CancelOutcome, ControlHandle};
use order::SubmitOrder;
use rescuer::{Rescuer, RescuerConfig};

/// Owns Control, the submit order, the lease renewal and the rescuer.
pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    control: ControlHandle,
    submits: SubmitOrder,
    rescuer: Arc<Rescuer>,
    lease: Arc<ServerLease>,
}

impl Scheduler {
    /// Registers this server (refused if another live one holds its id, or
    /// any other the SQLite database), then starts Control, the lease
    /// renewal and the rescuer.
    pub(crate) async fn start(
        shared: Arc<Shared>,
        me: crate::store::ServerSpec,
        max_running: usize,
    ) -> Result<Arc<Scheduler>> {
        let lease = ServerLease::register(&shared, me).await?;
        let (next_of, next) = Claimer::channel();
        let several = shared.store.shared();
        let control = ControlHandle::spawn(shared.clone(), max_running, several.then_some(next_of));
        if several {
            Claimer::spawn(shared.clone(), control.clone(), next);
        }
        let config = RescuerConfig {
            // One server on SQLite: nobody else's actions to take over.
            period: (shared.store.backend() != "sqlite").then_some(shared.lease.length / 6),
            ..RescuerConfig::default()
        };
        let rescuer = Rescuer::new(shared.clone(), control.clone(), lease.clone(), config);
        lease.spawn_renewal(shared.clone(), control.clone(), rescuer.clone());
        Ok(Arc::new(Scheduler {
            shared,
            control,
            submits: SubmitOrder::default(),
            rescuer,
            lease,
        }))
    }

    /// The start-up pass: hands over the actions of servers found lost,
    /// claims every unfinished action owned by nobody or by this server's
    /// earlier self, and gives them to Control, oldest first; returns how
    /// many. Then the rescuer keeps looking.
    pub(crate) async fn resume(&self) -> Result<usize> {
        let done = self.rescuer.run_once(true).await?;
        self.rescuer.spawn();
        Ok(done.claimed)
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

    pub(crate) async fn advertise(&self, address: &str) {
        self.lease.advertise(&self.shared, address).await;
    }

    /// Marks this server stopped and hands its unfinished actions on, once
    /// no step of ours runs.
    pub(crate) async fn release(&self) {
        self.lease.release(&self.shared).await;
    }
}
