//! This server's claim on the actions it runs: renewed while it runs them,
//! released when it stops, so another start (of this server or, once the
//! lease runs out, of another) resumes them.

use std::sync::Arc;
use std::time::Duration;

use crate::model::Timestamp;
use crate::runner::Shared;
use crate::store::Write;
use crate::tasks::{self, TaskKind};

/// Who holds the running actions this server writes, and for how long a
/// claim lasts unrenewed.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    /// This server's name in the `owner` column.
    pub(crate) owner: String,
    pub(crate) length: Duration,
}

impl Lease {
    /// When a claim taken or renewed now runs out.
    pub(crate) fn until(&self) -> Timestamp {
        crate::model::now() + self.length
    }
}

/// Renews the lease on every action this server runs, three times a lease,
/// until the shutdown's drain is over (the actions are still ours through it).
pub(super) fn spawn_renewal(shared: Arc<Shared>) {
    tasks::spawn(TaskKind::LeaseRenewal, async move {
        let every = shared.lease.length / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shared.closed.cancelled() => return,
            }
            let renew = Write::RenewLeases {
                owner: shared.lease.owner.clone(),
                until: shared.lease.until(),
            };
            if let Err(e) = shared.store.write(vec![renew]).await {
                tracing::warn!(error = %e, "could not renew action leases");
            }
        }
    });
}

/// Gives up this server's unfinished actions, once none of its steps runs:
/// the next start resumes them.
pub(super) async fn release(shared: &Shared) {
    let release = Write::Release {
        owner: shared.lease.owner.clone(),
        at: crate::model::now(),
    };
    if let Err(e) = shared.store.write(vec![release]).await {
        tracing::warn!(error = %e, "could not release unfinished actions; they resume when their lease expires");
    }
}
