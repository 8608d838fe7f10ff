//! Handles on internal parts (the Agency actor, a step host's pipes) for
//! the criterion benchmarks in `benches/`, compiled only with the
//! `bench-probes` feature, which the engine's own dev-dependency on itself
//! turns on. Not an interface.

use std::path::Path;
use std::time::Duration;

use crate::agency::AgencyHandle;
use crate::host::{Answer, CallResult, HostCommand, StepHost};

/// A real Agency actor, to time one `tell` and one `ask` through its mailbox.
pub struct AgencyProbe(AgencyHandle);

impl AgencyProbe {
    pub fn spawn(host_command: HostCommand) -> AgencyProbe {
        AgencyProbe(AgencyHandle::spawn(host_command, Duration::from_secs(1)))
    }

    /// A fire-and-forget message (an unpin of an unknown bundle).
    pub fn tell(&self) {
        self.0.unpin("not-a-hash");
    }

    /// A request and its reply (a lookup of an unknown bundle).
    pub async fn ask(&self) -> bool {
        matches!(self.0.bundle("not-a-hash".into()).await, Ok(None))
    }
}

/// A real step host with a plugin loaded.
pub struct HostProbe(StepHost);

impl HostProbe {
    pub async fn spawn(host_command: &HostCommand, library: &Path) -> crate::Result<HostProbe> {
        Ok(HostProbe(
            StepHost::spawn(host_command, library, "bench").await?,
        ))
    }

    /// One call over the pipes; true if the step succeeded.
    pub async fn call(&self, function: &str, input: &[u8]) -> bool {
        let (_, rx) = self.0.call(function, input);
        matches!(
            rx.await,
            Ok(Answer {
                result: CallResult::Done { status: 0, .. },
                ..
            })
        )
    }
}
