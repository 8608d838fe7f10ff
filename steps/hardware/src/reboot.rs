//! `power` with `op = reboot`, over Redfish or IPMI alike: a graceful
//! shutdown, a forced power-off when the server is still on after the
//! grace, then power on (Ironic's soft reboot). Every state change is
//! watched on the BMC, so the step ends with the server seen back on.

use std::time::{Duration, Instant};

use troupe_sdk::{Context, StepError};

use crate::redfish::{Waited, wait_for_state};

/// What a reboot needs of a BMC.
pub(crate) trait PowerControl {
    /// The server's power state: "On", "Off" or whatever else the BMC says.
    fn state(&self, cx: &Context<'_>) -> Result<String, StepError>;
    /// Sends `on`, `off` (forced) or `soft_off`; returns what was sent
    /// (a Redfish `ResetType`, an IPMI `chassis power` command). Once it
    /// may have been sent, an error is fatal.
    fn send(&self, cx: &Context<'_>, op: &str) -> Result<String, StepError>;
}

pub(crate) struct Rebooted {
    pub(crate) state: String,
    /// What was sent, in order.
    pub(crate) sent: Vec<String>,
    pub(crate) summary: String,
    pub(crate) waited_ms: u64,
}

/// Reboots the server `name` (now in power state `state`): waits `grace`
/// for a graceful shutdown, then at most `wait` for each further change.
pub(crate) fn reboot(
    cx: &Context<'_>,
    name: &str,
    bmc: &dyn PowerControl,
    state: &str,
    grace: Duration,
    wait: Duration,
) -> Result<Rebooted, StepError> {
    let started = Instant::now();
    let read = || bmc.state(cx);
    let mut sent = Vec::new();
    let how = if state == "Off" {
        format!("{name} was Off")
    } else {
        sent.push(bmc.send(cx, "soft_off")?);
        match wait_for_state(cx, read, "Off", Instant::now() + grace)? {
            Waited::Reached(_) => format!(
                "{name} shut down gracefully in {} ms",
                started.elapsed().as_millis()
            ),
            Waited::StillAt(last) => {
                cx.log(format_args!(
                    "{name} is still {last} {} ms after {}: forcing it off",
                    grace.as_millis(),
                    sent[0]
                ));
                sent.push(bmc.send(cx, "off")?);
                if let Waited::StillAt(last) =
                    wait_for_state(cx, read, "Off", Instant::now() + wait)?
                {
                    return Err(StepError::fatal(format!(
                        "{name} is still {last} after {} and a forced {}, {} ms in",
                        sent[0],
                        sent[1],
                        started.elapsed().as_millis()
                    )));
                }
                format!(
                    "{name} did not shut down within the grace of {} ms and was forced off",
                    grace.as_millis()
                )
            }
        }
    };
    let on = bmc.send(cx, "on")?;
    sent.push(on.clone());
    let state = match wait_for_state(cx, read, "On", Instant::now() + wait)? {
        Waited::Reached(state) => state,
        Waited::StillAt(last) => {
            return Err(StepError::fatal(format!(
                "{how}, but is still {last} {} ms after {on}: it is not back on",
                wait.as_millis()
            )));
        }
    };
    let waited_ms = started.elapsed().as_millis() as u64;
    Ok(Rebooted {
        state,
        summary: format!(
            "{how}; powered on again ({}), {waited_ms} ms in all",
            sent.join(", ")
        ),
        sent,
        waited_ms,
    })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A BMC whose server ignores graceful shutdowns when `stubborn`.
    struct Fake {
        state: RefCell<&'static str>,
        stubborn: bool,
        sent: RefCell<Vec<String>>,
    }

    impl PowerControl for Fake {
        fn state(&self, _: &Context<'_>) -> Result<String, StepError> {
            Ok(self.state.borrow().to_string())
        }
        fn send(&self, _: &Context<'_>, op: &str) -> Result<String, StepError> {
            self.sent.borrow_mut().push(op.to_owned());
            match op {
                "soft_off" if self.stubborn => {}
                "soft_off" | "off" => *self.state.borrow_mut() = "Off",
                _ => *self.state.borrow_mut() = "On",
            }
            Ok(op.to_owned())
        }
    }

    fn fake(state: &'static str, stubborn: bool) -> Fake {
        Fake {
            state: RefCell::new(state),
            stubborn,
            sent: RefCell::new(Vec::new()),
        }
    }

    #[test]
    fn graceful_then_forced_after_the_grace_then_on() {
        let cx = Context::detached();
        let (grace, wait) = (Duration::from_millis(600), Duration::from_secs(5));
        let polite = fake("On", false);
        let done = reboot(&cx, "srv", &polite, "On", grace, wait).unwrap();
        assert_eq!(done.sent, ["soft_off", "on"]);
        assert!(
            done.summary.starts_with("srv shut down gracefully"),
            "{}",
            done.summary
        );

        let stubborn = fake("On", true);
        let started = Instant::now();
        let done = reboot(&cx, "srv", &stubborn, "On", grace, wait).unwrap();
        assert_eq!(done.sent, ["soft_off", "off", "on"]);
        assert_eq!(done.state, "On");
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "it waited the grace"
        );
        assert!(done.summary.contains("forced off"), "{}", done.summary);

        let off = fake("Off", false);
        let done = reboot(&cx, "srv", &off, "Off", grace, wait).unwrap();
        assert_eq!(done.sent, ["on"]);
    }
}
