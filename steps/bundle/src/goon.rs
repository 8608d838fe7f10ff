//! Goons: stand-ins that make one step misbehave on purpose, so a test
//! sees what troupe does when it happens for real. `troupe-test` runs them
//! in `cargo test`; a server started with `--goons` (a test deployment)
//! takes them over its API, so an operator can rehearse failures.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A fault injected into one step of a run: it fails, overruns its timeout,
/// crashes its host, is cancelled, or loses its node — on one attempt or on
/// every one.
///
/// ```
/// use troupe_bundle::goon::Goon;
///
/// // The first attempt of `reboot` fails with a retryable error;
/// let flaky = Goon::fail("reboot");
/// // the second overruns its timeout;
/// let slow = Goon::past_timeout("reboot").on_attempt(2);
/// // every attempt of `wait_network` loses its node.
/// let cut_off = Goon::lose_node("wait_network").every_attempt();
/// ```
///
/// As JSON (`POST /v1/goons`): `{"step": "reboot", "attempt": 1, "act":
/// {"fail": {"retryable": true, "message": "busy"}}}`; `"attempt": null` for
/// every attempt, `"kind"` to act on one kind's actions only, `"times"` to
/// act that many times and then stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Goon {
    /// The step it acts on: its name in the kind.
    pub step: String,
    /// The attempt it acts on (1 is the first); `None`: every attempt.
    #[serde(default = "first")]
    pub attempt: Option<u32>,
    /// Only actions of this kind; any kind when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// How many times it acts, then it is spent; `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
    /// What it does.
    pub act: Act,
}

fn first() -> Option<u32> {
    Some(1)
}

/// What a goon does to the attempt it acts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Act {
    /// The step is not called; the attempt fails with this error.
    Fail {
        /// Retryable (the step's `retry` applies) or fatal.
        #[serde(default = "yes")]
        retryable: bool,
        /// The error message.
        #[serde(default = "failed_by_a_goon")]
        message: String,
    },
    /// The attempt takes this long before the step is called, and overruns
    /// its timeout if that is longer; `ms` absent: it overruns.
    Delay {
        /// How long, in milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ms: Option<u64>,
    },
    /// The step's host crashes while it runs.
    Crash,
    /// The action is cancelled as the step starts: the step is called with
    /// its cancel flag already set.
    Cancel,
    /// The node running the step goes away while it runs.
    LoseNode {
        /// The node's name, for the error; the step's own node (or
        /// `node-1`) when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    /// The step is not called; the attempt succeeds with this output.
    Output {
        /// The output.
        output: serde_json::Value,
    },
}

/// The error of an attempt whose host a goon crashed.
pub const CRASHED: &str = "step host crashed (a goon killed it)";

/// The error of an attempt whose node a goon took away.
pub fn lost(node: &str) -> String {
    format!(
        "node {node} went away while the step ran and did not come back in time (a goon took it)"
    )
}

fn yes() -> bool {
    true
}

fn failed_by_a_goon() -> String {
    "failed by a goon".to_owned()
}

impl Act {
    /// How long a delay goon holds the attempt, and whether that overruns
    /// `timeout` (then the attempt times out after `timeout`).
    pub fn delay(&self, timeout: Duration) -> Option<(Duration, bool)> {
        match self {
            Act::Delay { ms: Some(ms) } if Duration::from_millis(*ms) <= timeout => {
                Some((Duration::from_millis(*ms), false))
            }
            Act::Delay { .. } => Some((timeout, true)),
            _ => None,
        }
    }
}

impl Goon {
    fn new(step: &str, act: Act) -> Goon {
        Goon {
            step: step.to_owned(),
            attempt: Some(1),
            kind: None,
            times: None,
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
                message: failed_by_a_goon(),
            },
        )
    }

    /// `step` takes `d` of virtual time instead of running: a `d` past the
    /// step's `timeout_ms` times it out, as a slow target would.
    pub fn delay(step: &str, d: Duration) -> Goon {
        Goon::new(
            step,
            Act::Delay {
                ms: Some(d.as_millis().min(u64::MAX as u128) as u64),
            },
        )
    }

    /// `step` overruns its `timeout_ms` and is stopped.
    pub fn past_timeout(step: &str) -> Goon {
        Goon::new(step, Act::Delay { ms: None })
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
        Goon::new(step, Act::LoseNode { node: None })
    }

    /// `step` is not called and succeeds with `output`: a stand-in for a
    /// step that needs what a test does not have (a hypervisor, a BMC), so
    /// the rest of the kind can be tested.
    pub fn output(step: &str, output: serde_json::Value) -> Goon {
        Goon::new(step, Act::Output { output })
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
            Act::LoseNode { node } => *node = Some(text.to_owned()),
            _ => {}
        }
        self
    }

    /// Acts only on actions of `kind`.
    pub fn for_kind(mut self, kind: &str) -> Goon {
        self.kind = Some(kind.to_owned());
        self
    }

    /// Acts `n` times, then is spent.
    pub fn times(mut self, n: u32) -> Goon {
        self.times = Some(n);
        self
    }

    /// Whether it acts on `attempt` of step `step` of an action of `kind`
    /// (not counting `times`, which its keeper counts).
    pub fn acts_on(&self, kind: &str, step: &str, attempt: u32) -> bool {
        self.step == step
            && self.kind.as_deref().is_none_or(|k| k == kind)
            && self.attempt.is_none_or(|n| n == attempt)
    }

    /// Checks what a request could get wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.step.is_empty() {
            return Err("a goon needs the step it acts on".into());
        }
        if self.attempt == Some(0) || self.times == Some(0) {
            return Err("attempt and times count from 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goons_read_and_write_as_json() {
        let goon: Goon =
            serde_json::from_str(r#"{"step": "reboot", "act": {"fail": {"message": "busy"}}}"#)
                .unwrap();
        assert_eq!(goon, Goon::fail("reboot").message("busy"));
        let every: Goon =
            serde_json::from_str(r#"{"step": "x", "attempt": null, "times": 2, "act": "crash"}"#)
                .unwrap();
        assert_eq!(every, Goon::crash("x").every_attempt().times(2));
        let timeout: Goon = serde_json::from_str(r#"{"step": "x", "act": {"delay": {}}}"#).unwrap();
        assert_eq!(timeout, Goon::past_timeout("x"));
        for goon in [
            Goon::lose_node("x").message("hv-1").for_kind("k"),
            Goon::output("x", serde_json::json!({"a": 1})),
        ] {
            let text = serde_json::to_string(&goon).unwrap();
            assert_eq!(serde_json::from_str::<Goon>(&text).unwrap(), goon, "{text}");
        }
        assert!(serde_json::from_str::<Goon>(r#"{"step": "x", "act": "explode"}"#).is_err());
        assert!(Goon::fail("x").on_attempt(0).check().is_err());
    }

    #[test]
    fn a_delay_holds_the_attempt_or_overruns_its_timeout() {
        let timeout = Duration::from_millis(10);
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(
            Goon::delay("x", ms(4)).act.delay(timeout),
            Some((ms(4), false))
        );
        assert_eq!(
            Goon::delay("x", ms(10)).act.delay(timeout),
            Some((ms(10), false))
        );
        assert_eq!(
            Goon::delay("x", ms(11)).act.delay(timeout),
            Some((timeout, true))
        );
        assert_eq!(
            Goon::past_timeout("x").act.delay(timeout),
            Some((timeout, true))
        );
        assert_eq!(Goon::crash("x").act.delay(timeout), None);
        assert_eq!(Goon::fail("x").act.delay(timeout), None);
    }

    #[test]
    fn a_goon_acts_on_its_step_attempt_and_kind() {
        let first = Goon::fail("a");
        assert!(first.acts_on("k", "a", 1));
        assert!(!first.acts_on("k", "a", 2));
        assert!(!first.acts_on("k", "b", 1));
        let second = Goon::fail("a").on_attempt(2).for_kind("k");
        assert!(second.acts_on("k", "a", 2));
        assert!(!second.acts_on("k", "a", 1));
        assert!(!second.acts_on("other", "a", 2));
        let every = Goon::fail("a").every_attempt();
        assert!(every.acts_on("k", "a", 1) && every.acts_on("other", "a", 9));
    }

    #[test]
    fn check_refuses_what_a_request_could_get_wrong() {
        assert_eq!(
            Goon::fail("").check().unwrap_err(),
            "a goon needs the step it acts on"
        );
        assert!(Goon::fail("x").times(0).check().is_err());
        assert!(Goon::fail("x").on_attempt(0).check().is_err());
        Goon::fail("x").on_attempt(3).times(1).check().unwrap();
        Goon::fail("x").every_attempt().check().unwrap();
    }

    #[test]
    fn fatal_and_message_shape_the_failure() {
        assert_eq!(
            Goon::fail("x").fatal().message("gone").act,
            Act::Fail {
                retryable: false,
                message: "gone".into()
            }
        );
        assert_eq!(
            Goon::lose_node("x").message("hv-1").act,
            Act::LoseNode {
                node: Some("hv-1".into())
            }
        );
        assert_eq!(Goon::crash("x").fatal().message("m").act, Act::Crash);
    }

    #[test]
    fn errors_say_a_goon_did_it() {
        let goon: Goon = serde_json::from_str(r#"{"step": "x", "act": {"fail": {}}}"#).unwrap();
        assert_eq!(
            goon.act,
            Act::Fail {
                retryable: true,
                message: "failed by a goon".into()
            }
        );
        assert_eq!(
            lost("hv-1"),
            "node hv-1 went away while the step ran and did not come back in time (a goon took it)"
        );
    }
}
