//! Goons: stand-ins that make one step misbehave on purpose, so a test
//! sees what the engine does when it happens for real.

use std::time::Duration;

/// A fault injected into one step of a run: it fails, overruns its timeout,
/// crashes its host, is cancelled, or loses its node — on one attempt or on
/// every one.
///
/// ```
/// use troupe_test::Goon;
///
/// // The first attempt of `reboot` fails with a retryable error;
/// let flaky = Goon::fail("reboot");
/// // the second overruns its timeout;
/// let slow = Goon::past_timeout("reboot").on_attempt(2);
/// // every attempt of `wait_network` loses its node.
/// let cut_off = Goon::lose_node("wait_network").every_attempt();
/// ```
#[derive(Debug, Clone)]
pub struct Goon {
    pub(crate) step: String,
    /// `None`: every attempt.
    pub(crate) attempt: Option<u32>,
    pub(crate) act: Act,
}

#[derive(Debug, Clone)]
pub(crate) enum Act {
    /// The step is not called; the attempt fails with this error.
    Fail { retryable: bool, message: String },
    /// The step is not called; it takes this long (virtual time), and
    /// overruns its timeout if that is longer.
    Delay(Option<Duration>),
    /// The step's host crashes while it runs.
    Crash,
    /// The action is cancelled as the step starts: the step is called with
    /// its cancel flag already set.
    Cancel,
    /// The node running the step goes away while it runs.
    LoseNode(String),
    /// The step is not called; the attempt succeeds with this output.
    Output(serde_json::Value),
}

impl Goon {
    fn new(step: &str, act: Act) -> Goon {
        Goon {
            step: step.to_owned(),
            attempt: Some(1),
            act,
        }
    }

    /// `step` fails with a retryable error instead of running ("failed by a
    /// goon"; see [`Goon::message`]).
    pub fn fail(step: &str) -> Goon {
        Goon::new(
            step,
            Act::Fail {
                retryable: true,
                message: "failed by a goon".to_owned(),
            },
        )
    }

    /// `step` takes `d` of virtual time instead of running: a `d` past the
    /// step's `timeout_ms` times it out, as a slow target would.
    pub fn delay(step: &str, d: Duration) -> Goon {
        Goon::new(step, Act::Delay(Some(d)))
    }

    /// `step` overruns its `timeout_ms` and is stopped.
    pub fn past_timeout(step: &str) -> Goon {
        Goon::new(step, Act::Delay(None))
    }

    /// The step host running `step` crashes while it runs (as if the
    /// plugin aborted or segfaulted): the attempt fails for good, like any
    /// crash of a step host.
    pub fn crash(step: &str) -> Goon {
        Goon::new(step, Act::Crash)
    }

    /// The action is cancelled as `step` starts: the step runs with its
    /// cancel flag set ([`troupe_sdk::Context::is_cancelled`]), and the
    /// action ends `cancelled` unless the step still succeeds, in which
    /// case it ends before the next step.
    pub fn cancel_at(step: &str) -> Goon {
        Goon::new(step, Act::Cancel)
    }

    /// The node running `step` goes away mid-call and does not come back
    /// in time: the attempt is lost, so it is retried (on another node)
    /// only when the step is idempotent.
    pub fn lose_node(step: &str) -> Goon {
        Goon::new(step, Act::LoseNode("node-1".to_owned()))
    }

    /// `step` is not called and succeeds with `output`: a stand-in for a
    /// step that needs what a test does not have (a hypervisor, a BMC), so
    /// the rest of the kind can be tested.
    pub fn output(step: &str, output: serde_json::Value) -> Goon {
        Goon::new(step, Act::Output(output))
    }

    /// Acts on attempt `n` (1 is the first) instead of the first.
    pub fn on_attempt(mut self, n: u32) -> Goon {
        self.attempt = Some(n);
        self
    }

    /// Acts on every attempt of the step.
    pub fn every_attempt(mut self) -> Goon {
        self.attempt = None;
        self
    }

    /// For [`Goon::fail`]: the error is fatal (no retry) instead of
    /// retryable.
    pub fn fatal(mut self) -> Goon {
        if let Act::Fail { retryable, .. } = &mut self.act {
            *retryable = false;
        }
        self
    }

    /// For [`Goon::fail`]: the error message; for [`Goon::lose_node`]: the
    /// name of the node that goes away.
    pub fn message(mut self, text: &str) -> Goon {
        match &mut self.act {
            Act::Fail { message, .. } => *message = text.to_owned(),
            Act::LoseNode(node) => *node = text.to_owned(),
            _ => {}
        }
        self
    }

    pub(crate) fn acts_on(&self, step: &str, attempt: u32) -> bool {
        self.step == step && self.attempt.is_none_or(|n| n == attempt)
    }
}
