//! What a run did: the action's end, each step's status and attempts.

use std::fmt;
use std::time::Duration;

use serde_json::Value;
use troupe_bundle::plugin::Answer;

/// How the action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every step succeeded.
    Succeeded,
    /// A step failed and was not retried (any more).
    Failed,
    /// The action was cancelled.
    Cancelled,
}

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    /// It succeeded; its output is in [`StepReport::output`].
    Succeeded,
    /// It failed for good; the action failed with it.
    Failed,
    /// The action was cancelled while it ran.
    Cancelled,
    /// It never started: an earlier step failed, or the action was
    /// cancelled before it.
    NotRun,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The step returned this output.
    Succeeded(Value),
    /// The step returned a retryable error.
    Retryable(String),
    /// The step returned a fatal error, panicked, or its host crashed.
    Fatal(String),
    /// The step overran its `timeout_ms`.
    TimedOut(String),
    /// The node running it went away.
    Lost(String),
    /// The step stopped because the action was cancelled.
    Cancelled,
}

impl From<Answer> for Outcome {
    fn from(answer: Answer) -> Outcome {
        match answer {
            Answer::Output(v) => Outcome::Succeeded(v),
            Answer::Retryable(m) => Outcome::Retryable(m),
            Answer::Fatal(m) => Outcome::Fatal(m),
        }
    }
}

/// One attempt of a step.
#[derive(Debug, Clone)]
pub struct AttemptReport {
    /// 1 for the first attempt.
    pub number: u32,
    /// When it started on the run's virtual clock (0 for the action's start).
    pub started_at: Duration,
    /// How long it took: real time for a step that ran, the goon's time for
    /// one a goon stood in for.
    pub took: Duration,
    /// How it ended.
    pub outcome: Outcome,
    /// What the step logged (`troupe_sdk::Context::log`), one line each.
    pub log: Vec<String>,
    /// Whether a goon acted on it.
    pub goon: bool,
}

/// One step of the action.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The step's name in the kind (its `name`, or the step it uses).
    pub name: String,
    /// How it ended.
    pub status: StepStatus,
    /// Its output, if it succeeded.
    pub output: Option<Value>,
    /// Its attempts, first to last.
    pub attempts: Vec<AttemptReport>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// How the action ended.
    pub status: Status,
    /// Why it failed or was cancelled, worded as a server words it.
    pub error: Option<String>,
    /// Every step of the kind, in order, run or not.
    pub steps: Vec<StepReport>,
    /// The run's virtual time: what the action would have taken, backoffs
    /// and goons' delays included.
    pub elapsed: Duration,
}

impl Report {
    /// The step named `name`.
    ///
    /// # Panics
    /// If the kind has no such step; the message lists the ones it has.
    pub fn step(&self, name: &str) -> &StepReport {
        self.steps
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| {
                let names: Vec<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
                panic!(
                    "the kind has no step {name:?}; its steps: {}",
                    names.join(", ")
                )
            })
    }

    /// The output of step `name`, if it succeeded.
    pub fn output(&self, name: &str) -> Option<&Value> {
        self.step(name).output.as_ref()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        })
    }
}

/// The run as `troupe status` would show it: one line per step.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {} ms", self.status, self.elapsed.as_millis())?;
        if let Some(error) = &self.error {
            write!(f, ": {error}")?;
        }
        for step in &self.steps {
            write!(
                f,
                "\n  {:<20} {:?} ({} attempt",
                step.name,
                step.status,
                step.attempts.len()
            )?;
            if step.attempts.len() != 1 {
                f.write_str("s")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}
