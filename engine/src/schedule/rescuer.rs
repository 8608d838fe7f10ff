//! Takes over unfinished actions nobody runs, shaped like River's job
//! rescuer: a config with defaults, a jittered ticker, `run_once` returning
//! what it did.
//!
//! A pass declares lost every server whose lease ran out (its actions are
//! handed on in the same transaction: owner cleared, epoch bumped), then
//! claims actions owned by nobody, each with a conditional `UPDATE` on the
//! epoch it read, so of two servers claiming one action exactly one wins,
//! and hands them to Control. Passes run at start, after an insert whose
//! outcome is unknown (it may have been stored all the same), and, where
//! several servers may share the database, every `period`; those also end
//! the actions held here whose cancel was asked for through another server.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::Result;
use crate::model::Action;
use crate::runner::Shared;
use crate::store::Write;
use crate::tasks::{self, TaskKind};

use super::control::ControlHandle;
use super::lease::ServerLease;

#[derive(Debug, Clone, Copy)]
pub(super) struct RescuerConfig {
    /// Between passes (with ±20 % jitter, so servers do not pass in step);
    /// `None`: only when woken (one server on SQLite).
    pub(super) period: Option<Duration>,
    /// How long past its lease a server is declared lost: room for clock
    /// differences between database nodes.
    pub(super) margin: Duration,
    /// Actions claimed in one pass, at most.
    pub(super) batch: usize,
    /// The first wait after a failed pass, doubled up to `max_delay`.
    pub(super) first_delay: Duration,
    pub(super) max_delay: Duration,
}

impl Default for RescuerConfig {
    fn default() -> RescuerConfig {
        RescuerConfig {
            period: Some(Duration::from_secs(1)),
            margin: Duration::from_millis(500),
            batch: 256,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// What a pass did.
#[derive(Debug, Default)]
pub(super) struct Rescued {
    /// Servers declared lost.
    pub(super) lost: Vec<String>,
    /// Actions handed on (by this pass's declarations, or found orphaned).
    pub(super) handed_on: u64,
    /// Actions this server claimed and handed to Control.
    pub(super) claimed: usize,
    /// Actions held here that a cancel through another server reached.
    pub(super) cancelled: usize,
}

pub(super) struct Rescuer {
    shared: Arc<Shared>,
    control: ControlHandle,
    lease: Arc<ServerLease>,
    config: RescuerConfig,
    wake: Notify,
}

impl Rescuer {
    pub(super) fn new(
        shared: Arc<Shared>,
        control: ControlHandle,
        lease: Arc<ServerLease>,
        config: RescuerConfig,
    ) -> Arc<Rescuer> {
        Arc::new(Rescuer {
            shared,
            control,
            lease,
            config,
            wake: Notify::new(),
        })
    }

    /// Asks for a pass that also looks at this server's own actions: some
    /// may be stored without Control holding them.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    pub(super) fn spawn(self: &Arc<Self>) {
        let rescuer = self.clone();
        tasks::spawn(TaskKind::Rescuer, async move {
            let stopping = rescuer.shared.stopping.clone();
            loop {
                let tick = async {
                    match rescuer.config.period {
                        Some(p) => tokio::time::sleep(crate::tasks::jitter(p)).await,
                        None => std::future::pending().await,
                    }
                };
                let mine = tokio::select! {
                    _ = rescuer.wake.notified() => true,
                    _ = tick => false,
                    _ = stopping.cancelled() => return,
                };
                let mut delay = rescuer.config.first_delay;
                loop {
                    match rescuer.run_once(mine).await {
                        Ok(r) => {
                            if !r.lost.is_empty() || r.handed_on > 0 || r.claimed > 0 || mine {
                                tracing::info!(
                                    lost = ?r.lost,
                                    handed_on = r.handed_on,
                                    claimed = r.claimed,
                                    cancelled = r.cancelled,
                                    "looked for actions nobody runs"
                                );
                            }
                            break;
                        }
                        Err(e) if mine => {
                            tracing::warn!(error = %e, "cannot yet look for actions stored while the database failed; retrying");
                        }
                        // The next tick tries again.
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot look for actions nobody runs");
                            break;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopping.cancelled() => return,
                    }
                    delay = (delay * 2).min(rescuer.config.max_delay);
                }
            }
        });
    }

    /// One pass. With `mine`, also claims unfinished actions owned by this
    /// server's id that Control does not hold (an earlier incarnation's, or
    /// an insert whose answer was lost).
    pub(super) async fn run_once(&self, mine: bool) -> Result<Rescued> {
        let shared = &self.shared;
        if self.shared.stopping.is_cancelled() {
            return Ok(Rescued::default());
        }
        let mut done = Rescued::default();
        // While this server's own renewals fail, the database (or this
        // server) is what stalls: nobody is declared lost for it.
        if self.lease.healthy() {
            let (lost, handed) = shared.store.rescue_lost(self.config.margin).await?;
            for server in &lost {
                tracing::warn!(server = %server, "server declared lost (its lease ran out); its actions are handed on");
            }
            done.lost = lost;
            done.handed_on = handed;
        }
        if !mine {
            done.cancelled = self.cancel_asked_elsewhere().await?;
        }
        let held: HashSet<_> = if mine {
            self.control.held().await
        } else {
            HashSet::new()
        };
        let owner = shared.lease.owner.clone();
        let limit = if mine { usize::MAX } else { self.config.batch };
        let candidates: Vec<Action> = shared
            .store
            .unfinished(mine.then_some(&*owner), limit)
            .await?
            .into_iter()
            .filter(|a| !held.contains(&a.id))
            .collect();
        if candidates.is_empty() {
            return Ok(done);
        }
        let claims: Vec<Write> = candidates
            .iter()
            .map(|a| Write::Claim {
                id: a.id,
                owner: owner.to_string(),
                epoch: a.epoch,
                lease_until: shared.lease.until(),
            })
            .collect();
        let outcomes = shared.store.write(claims.clone()).await?;
        let mut claimed = Vec::new();
        for ((mut action, claim), outcome) in candidates.into_iter().zip(&claims).zip(outcomes) {
            // Another server's claim came first.
            if outcome.rows() == 0 {
                continue;
            }
            claim.apply_to(&mut action);
            claimed.push(action);
        }
        done.claimed = claimed.len();
        shared.store.hold(claimed.iter().map(|a| a.id));
        for action in claimed {
            self.control.enqueue(action);
        }
        Ok(done)
    }

    /// Cancels the actions held here whose cancel was committed through
    /// another server (this one's own cancels reach Control at once).
    async fn cancel_asked_elsewhere(&self) -> Result<usize> {
        let asked = self
            .shared
            .store
            .cancels_for(&self.shared.lease.owner)
            .await?;
        let mut n = 0;
        for id in asked {
            match self.control.cancel(id).await {
                super::control::CancelOutcome::Running => n += 1,
                super::control::CancelOutcome::Dequeued => {
                    let write = Write::CancelQueued {
                        id,
                        at: crate::model::now(),
                    };
                    self.shared.store.write(vec![write]).await?;
                    n += 1;
                }
                super::control::CancelOutcome::Unknown => {}
            }
        }
        Ok(n)
    }
}
