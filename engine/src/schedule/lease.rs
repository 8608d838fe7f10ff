//! This server's lease: its `servers` row, renewed by the database's clock
//! while it runs, so that when it dies (or freezes, or is cut off) another
//! server can tell and take its actions over. Every running action is
//! owned by one server; a runner's writes are fenced on the action's epoch
//! (`store::Fence`), so a server that lost its lease writes nothing more
//! to an action another has taken.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crate::Result;
use crate::model::Timestamp;
use crate::runner::Shared;
use crate::store::{Renewal, ServerSpec};
use crate::tasks::{self, TaskKind};

use super::control::ControlHandle;

/// Who owns the actions this server runs, and how long its lease lasts
/// unrenewed.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    /// This server's id, in the `owner` column.
    pub(crate) owner: Arc<str>,
    pub(crate) length: Duration,
}

impl Lease {
    /// When a lease taken or renewed now runs out (the column an action
    /// still carries for servers of earlier versions).
    pub(crate) fn until(&self) -> Timestamp {
        crate::model::now() + self.length
    }

    /// How often the lease is renewed: six times a lease, so a renewal
    /// may fail five times in a row before the lease is at risk.
    pub(crate) fn renew_every(&self) -> Duration {
        self.length / 6
    }
}

/// This server's registration: which incarnation of its id it is, and when
/// its lease was last renewed.
pub(crate) struct ServerLease {
    spec: ServerSpec,
    length: Duration,
    incarnation: AtomicI64,
    renewed: std::sync::Mutex<Instant>,
}

impl ServerLease {
    /// Registers this server (a new incarnation of its id), refusing when
    /// another live server holds the id.
    pub(crate) async fn register(shared: &Shared, spec: ServerSpec) -> Result<Arc<ServerLease>> {
        let length = shared.lease.length;
        let incarnation = shared.store.register_server(&spec, length).await?;
        tracing::info!(server = %spec.id, incarnation, lease_ms = length.as_millis() as u64, "server registered");
        Ok(Arc::new(ServerLease {
            spec,
            length,
            incarnation: AtomicI64::new(incarnation),
            renewed: std::sync::Mutex::new(Instant::now()),
        }))
    }

    /// Whether this server's own renewals have succeeded lately: while
    /// they do not (the database stalls, or this server did), another
    /// server's late renewal is no sign of its death.
    pub(crate) fn healthy(&self) -> bool {
        let renewed = *self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        renewed.elapsed() < self.length / 6 * 2 + Duration::from_millis(500)
    }

    /// Renews the lease every sixth of it until the shutdown's drain is
    /// over (the actions are still ours through it). Declared lost (frozen
    /// or cut off past the lease), the server registers again as a new
    /// incarnation: its runners of the old one are fenced out at their
    /// next write, and it claims work like any other server.
    pub(super) fn spawn_renewal(
        self: &Arc<Self>,
        shared: Arc<Shared>,
        control: ControlHandle,
        rescue: Arc<super::rescuer::Rescuer>,
    ) {
        let lease = self.clone();
        tasks::spawn(TaskKind::LeaseRenewal, async move {
            let every = shared.lease.renew_every();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shared.closed.cancelled() => return,
                }
                let running = control.stats().await.running;
                let incarnation = lease.incarnation.load(Ordering::SeqCst);
                let renewed = shared
                    .store
                    .renew_server(
                        &lease.spec.id,
                        incarnation,
                        lease.length,
                        running,
                        shared.nodes.list().len(),
                    )
                    .await;
                match renewed {
                    Ok(Renewal::Renewed) => {
                        *lease.renewed.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                    }
                    // This server's own release (at shutdown) came first.
                    Ok(Renewal::Lost) if shared.closed.is_cancelled() => return,
                    Ok(Renewal::Lost) => {
                        tracing::error!(
                            server = %lease.spec.id,
                            incarnation,
                            "this server's lease was lost (it was frozen, cut off or starved past it) and its actions \
                             handed to other servers; its runners stop at their next write; registering again"
                        );
                        match ServerLease::register(&shared, lease.spec.clone()).await {
                            Ok(again) => {
                                let n = again.incarnation.load(Ordering::SeqCst);
                                lease.incarnation.store(n, Ordering::SeqCst);
                                *lease.renewed.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Instant::now();
                                rescue.wake();
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot register again; exiting so the supervisor restarts this server");
                                std::process::exit(75);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not renew this server's lease"),
                }
            }
        });
    }

    /// Records the address this server listens at.
    pub(super) async fn advertise(&self, shared: &Shared, address: &str) {
        let incarnation = self.incarnation.load(Ordering::SeqCst);
        if let Err(e) = shared
            .store
            .set_server_address(&self.spec.id, incarnation, address)
            .await
        {
            tracing::warn!(error = %e, "could not record this server's address");
        }
    }

    /// Marks this server stopped and hands its unfinished actions on, once
    /// none of its steps runs.
    pub(super) async fn release(&self, shared: &Shared) {
        let incarnation = self.incarnation.load(Ordering::SeqCst);
        match shared.store.stop_server(&self.spec.id, incarnation).await {
            Ok(n) => tracing::info!(
                handed_on = n,
                "server stopped; unfinished actions handed on"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not release unfinished actions; other servers take them once this server's lease runs out")
            }
        }
    }
}
