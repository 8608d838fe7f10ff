//! When a step runs again: the rules every runner of steps applies (the
//! engine's, on a server or a node, and the test harness's).

use std::time::Duration;

use crate::manifest::Retry;

/// How an attempt that did not succeed ended, as far as trying again goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The step returned a retryable error.
    Retryable,
    /// The step returned a fatal error, panicked, or its host crashed.
    Fatal,
    /// The step overran its `timeout_ms` and was stopped; it may have done
    /// part of its work.
    TimedOut,
    /// The node running it went away; whether it ran, and how far, is
    /// unknown.
    Lost,
    /// The call never reached the node: the step did not run.
    NotRun,
}

impl Ending {
    /// Whether the step may be run again after an attempt that ended so: a
    /// retryable error and a call that never ran, yes; a timeout or a lost
    /// node only when running it twice is harmless (`idempotent`), as it
    /// may have run partly; a fatal error never.
    pub fn may_retry(self, idempotent: bool) -> bool {
        match self {
            Ending::Retryable | Ending::NotRun => true,
            Ending::TimedOut | Ending::Lost => idempotent,
            Ending::Fatal => false,
        }
    }

    /// Whether the attempt counts against `retry.attempts`: a call that
    /// never ran does not.
    pub fn counts(self) -> bool {
        self != Ending::NotRun
    }
}

/// Whether to run the step again after an attempt that ended `ending`,
/// with `failures` counted failures so far (this one included).
pub fn try_again(retry: &Retry, idempotent: bool, ending: Ending, failures: u32) -> bool {
    ending.may_retry(idempotent) && (failures < retry.attempts || !ending.counts())
}

/// A step's failed attempts so far, counted as [`try_again`] counts them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Failures(u32);

impl Failures {
    /// Counts an attempt that ended `ending`, and says whether to run the
    /// step again.
    pub fn after(&mut self, ending: Ending, retry: &Retry, idempotent: bool) -> bool {
        if ending.counts() {
            self.0 += 1;
        }
        try_again(retry, idempotent, ending, self.0)
    }

    /// The wait before the next attempt.
    pub fn backoff(&self, retry: &Retry) -> Duration {
        retry.backoff(self.0.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_table() {
        let retry = Retry {
            attempts: 2,
            ..Retry::default()
        };
        assert!(try_again(&retry, false, Ending::Retryable, 1));
        assert!(!try_again(&retry, false, Ending::Retryable, 2));
        assert!(!try_again(&retry, true, Ending::Fatal, 1));
        assert!(!try_again(&retry, false, Ending::TimedOut, 1));
        assert!(try_again(&retry, true, Ending::TimedOut, 1));
        assert!(!try_again(&retry, false, Ending::Lost, 1));
        assert!(try_again(&retry, true, Ending::Lost, 1));
        // Never ran: placed again, however many failures came before.
        assert!(try_again(&retry, false, Ending::NotRun, 7));
    }

    /// A call that never ran is not counted: it neither uses up an attempt
    /// nor lengthens the backoff.
    #[test]
    fn failures_count_only_attempts_that_ran() {
        let retry = Retry {
            attempts: 2,
            backoff_ms: 100,
            max_backoff_ms: 10_000,
        };
        let mut failures = Failures::default();
        assert_eq!(failures.backoff(&retry), Duration::from_millis(100));
        assert!(failures.after(Ending::NotRun, &retry, false));
        assert!(failures.after(Ending::NotRun, &retry, false));
        assert_eq!(failures.backoff(&retry), Duration::from_millis(100));
        assert!(failures.after(Ending::Retryable, &retry, false));
        assert_eq!(failures.backoff(&retry), Duration::from_millis(100));
        assert!(!failures.after(Ending::Retryable, &retry, false));
        assert_eq!(failures.backoff(&retry), Duration::from_millis(200));
        assert!(Ending::Retryable.counts() && !Ending::NotRun.counts());
    }
}
