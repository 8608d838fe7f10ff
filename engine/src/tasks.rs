//! The one place the engine's long-lived tasks are spawned, each with a
//! declared meaning for its failure, so what a crash means is decided once.
//!
//! A task the engine cannot work without ends the process when it panics
//! ([`OnFailure::Exit`]): a supervisor (systemd) restarts the server and
//! start-up recovery resumes every unfinished action from the database. A
//! lease renewer that died while its server kept running actions is how a
//! second server would come to run them too; a configuration watch that
//! died would accept a token or key revoked on another server for ever. A task whose loss costs one
//! connection or one call logs and ends ([`OnFailure::Log`]).

use std::future::Future;
use std::time::Duration;

/// What happens when a task panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFailure {
    /// Log, then exit with status 70 (`EX_SOFTWARE`) so the server restarts cleanly.
    Exit,
    /// Log, and let the task end.
    Log,
}

/// Every kind of long-lived task, with what its failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskKind {
    /// The Control actor: which action runs when.
    Control,
    /// The Agency actor: step hosts and bundle pins.
    Agency,
    /// The Source Authority actor: the one way code gets in.
    SourceAuthority,
    /// A group-commit writer of the store.
    StoreWriter,
    /// Chooses the database node to write through, when `--db` lists several.
    DatabaseNodes,
    /// Renews this server's leases on the actions it runs.
    LeaseRenewal,
    /// Hands over unfinished actions nobody runs.
    Rescuer,
    /// Proposes queued actions whose turn has come (several servers): dead,
    /// a target's next action submitted elsewhere would wait for a poll
    /// that never comes.
    Claimer,
    /// Reloads the shared configuration other servers change (tokens,
    /// keys, bundles, node drains) when its generation moves.
    ConfigWatch,
    /// Follows a parked node call: hands it a result another server
    /// stored, or fails it when its node does not come back in time.
    NodeCallTimer,
    /// Stores a result a node reported that no runner here waits for, then
    /// tells the node it may forget it.
    NodeResult,
    /// Reads or writes one step host's pipes.
    HostIo,
    /// Stops a drained bundle's step host.
    HostStop,
    /// Gives back the slots of concurrency limits an attempt held.
    LimitRelease,
}

impl TaskKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TaskKind::Control => "control",
            TaskKind::Agency => "agency",
            TaskKind::SourceAuthority => "source-authority",
            TaskKind::StoreWriter => "store-writer",
            TaskKind::DatabaseNodes => "database-nodes",
            TaskKind::LeaseRenewal => "lease-renewal",
            TaskKind::Rescuer => "rescuer",
            TaskKind::Claimer => "claimer",
            TaskKind::ConfigWatch => "config-watch",
            TaskKind::NodeCallTimer => "node-call-timer",
            TaskKind::NodeResult => "node-result",
            TaskKind::HostIo => "host-io",
            TaskKind::HostStop => "host-stop",
            TaskKind::LimitRelease => "limit-release",
        }
    }

    pub(crate) fn on_failure(self) -> OnFailure {
        match self {
            TaskKind::Control
            | TaskKind::Agency
            | TaskKind::SourceAuthority
            | TaskKind::StoreWriter
            | TaskKind::DatabaseNodes
            | TaskKind::LeaseRenewal
            | TaskKind::Rescuer
            | TaskKind::Claimer
            | TaskKind::ConfigWatch => OnFailure::Exit,
            TaskKind::NodeCallTimer
            | TaskKind::NodeResult
            | TaskKind::HostIo
            | TaskKind::HostStop
            | TaskKind::LimitRelease => OnFailure::Log,
        }
    }
}

/// Spawns a long-lived task of `kind`; its panic is handled as the kind declares.
pub(crate) fn spawn<F>(kind: TaskKind, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(task);
    tokio::spawn(async move {
        let Err(e) = handle.await else { return };
        if !e.is_panic() {
            return;
        }
        match kind.on_failure() {
            OnFailure::Exit => {
                tracing::error!(
                    task = kind.name(),
                    "task panicked; exiting so the server restarts cleanly"
                );
                std::process::exit(70);
            }
            OnFailure::Log => tracing::error!(task = kind.name(), "task panicked"),
        }
    });
}

/// `period` ± 20 %, so servers do not pass in step.
pub(crate) fn jitter(period: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = f64::from(nanos % 1000) / 1000.0 * 0.4 - 0.2;
    period.mul_f64(1.0 + spread)
}
