//! Hands unfinished actions nobody runs to Control: every one at start, and
//! after an insert whose commit answered with an error (it may have gone
//! through all the same), so an action stored just as the database failed is
//! not left unrun.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::Result;
use crate::model::ActionStatus;
use crate::runner::Shared;
use crate::store::Write;
use crate::tasks::{self, TaskKind};

use super::control::ControlHandle;

/// How the rescuer retries while the database does not answer.
#[derive(Debug, Clone, Copy)]
pub(super) struct RescuerConfig {
    /// The first wait after being woken, and after the first failure.
    pub(super) first_delay: Duration,
    /// The longest wait between retries.
    pub(super) max_delay: Duration,
}

impl Default for RescuerConfig {
    fn default() -> RescuerConfig {
        RescuerConfig {
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

pub(super) struct Rescuer {
    shared: Arc<Shared>,
    control: ControlHandle,
    config: RescuerConfig,
    wake: Notify,
}

impl Rescuer {
    pub(super) fn new(shared: Arc<Shared>, control: ControlHandle) -> Arc<Rescuer> {
        Arc::new(Rescuer {
            shared,
            control,
            config: RescuerConfig::default(),
            wake: Notify::new(),
        })
    }

    /// Asks for a pass: some action may be stored without Control holding it.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs a pass each time it is woken, retrying until the database answers.
    pub(super) fn spawn(self: &Arc<Self>) {
        let rescuer = self.clone();
        tasks::spawn(TaskKind::Rescuer, async move {
            let stopping = rescuer.shared.stopping.clone();
            loop {
                tokio::select! {
                    _ = rescuer.wake.notified() => {}
                    _ = stopping.cancelled() => return,
                }
                let mut delay = rescuer.config.first_delay;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopping.cancelled() => return,
                    }
                    match rescuer.run_once().await {
                        Ok(n) => {
                            tracing::info!(
                                unfinished = n,
                                "checked for actions stored while the database failed"
                            );
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot yet check for actions stored while the database failed; retrying");
                            delay = (delay * 2).min(rescuer.config.max_delay);
                        }
                    }
                }
            }
        });
    }

    /// Claims every unfinished action this server may run and hands them
    /// to Control, oldest first (Control ignores the ones it holds);
    /// returns how many.
    pub(super) async fn run_once(&self) -> Result<usize> {
        let shared = &self.shared;
        let now = crate::model::now();
        let actions = shared.store.unfinished(&shared.lease.owner, now).await?;
        let claims: Vec<Write> = actions
            .iter()
            .filter(|a| a.status == ActionStatus::Running)
            .map(|a| Write::Claim {
                id: a.id,
                owner: shared.lease.owner.clone(),
                lease_until: shared.lease.until(),
            })
            .collect();
        if !claims.is_empty() {
            shared.store.write(claims).await?;
        }
        let n = actions.len();
        shared.store.hold(actions.iter().map(|a| a.id));
        for action in actions {
            self.control.enqueue(action);
        }
        Ok(n)
    }
}
