//! The Step actor: one per (bundle hash, step), created by the Agency on
//! first use and kept with its bundle. It runs calls of its step on the
//! bundle's step host, enforcing the step's timeout and cancellation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::agency::AgencyHandle;
use crate::bundle::manifest::StepDef;
use crate::host::{Answer, CallResult, StepHost};
use crate::nodes::{CallKey, Nodes, Placed, RemoteCall};

/// How one attempt of a step ended.
#[derive(Debug)]
pub enum StepResult {
    Ok(Value),
    Retryable(String),
    Fatal(String),
    TimedOut(String),
    /// Its node went away: retried only if running it twice is harmless.
    Lost(String),
    /// The call never reached its node: it did not run, so it is placed
    /// again whatever its retry policy.
    NotRun(String),
    Cancelled,
}

impl StepResult {
    /// The error message of an attempt that did not succeed.
    pub(crate) fn message_mut(&mut self) -> Option<&mut String> {
        match self {
            StepResult::Retryable(m)
            | StepResult::Fatal(m)
            | StepResult::TimedOut(m)
            | StepResult::Lost(m)
            | StepResult::NotRun(m) => Some(m),
            StepResult::Ok(_) | StepResult::Cancelled => None,
        }
    }
}

/// One attempt: how it ended and what the step logged.
#[derive(Debug)]
pub struct Attempt {
    pub result: StepResult,
    pub log: String,
}

impl Attempt {
    /// The attempt as a step host reports one: `(troupe_sdk::ffi::STATUS_*, output
    /// JSON or message)`. A timeout or cancel is a fatal error here; the
    /// caller's own timer decides what it was.
    pub fn into_status(self) -> (i32, String) {
        use troupe_sdk::ffi::*;
        match self.result {
            StepResult::Ok(v) => (STATUS_OK, v.to_string()),
            StepResult::Retryable(m) => (STATUS_RETRYABLE, m),
            StepResult::Fatal(m)
            | StepResult::TimedOut(m)
            | StepResult::Lost(m)
            | StepResult::NotRun(m) => (STATUS_FATAL, m),
            StepResult::Cancelled => (STATUS_FATAL, "cancelled".into()),
        }
    }
}

/// Runs one call of `function` on `host` under the rules every step call
/// follows (timeout, cancel, kill after the grace): how a remote node runs
/// the calls it is sent.
pub async fn run_on_host(
    host: StepHost,
    name: &str,
    function: &str,
    input: Vec<u8>,
    timeout: Duration,
    grace: Duration,
    cancel: CancellationToken,
) -> Attempt {
    let call = Call {
        on: On::Host(host),
        name,
        timeout,
        grace,
        idempotent: false,
    };
    call.execute(function, input, cancel).await
}

impl From<StepResult> for Attempt {
    fn from(result: StepResult) -> Attempt {
        Attempt {
            result,
            log: String::new(),
        }
    }
}

/// The Step actor for one (bundle, step). Its state is the step's
/// definition and the step host it calls; a call runs on the caller's task
/// (no mailbox hop on the hot path), and replacing a dead host goes through
/// the Agency, which owns hosts. Cheap to clone.
#[derive(Clone)]
pub(crate) struct StepHandle {
    inner: Arc<Inner>,
    pub(crate) def: Arc<StepDef>,
}

struct Inner {
    bundle: signing::BundleHash,
    name: String,
    function: String,
    host: Mutex<StepHost>,
    agency: AgencyHandle,
    grace: Duration,
}

impl std::fmt::Debug for StepHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepHandle")
            .field("bundle", &self.inner.bundle)
            .field("step", &self.inner.name)
            .finish()
    }
}

impl StepHandle {
    pub(crate) fn new(
        bundle: signing::BundleHash,
        name: String,
        def: StepDef,
        host: StepHost,
        agency: AgencyHandle,
        grace: Duration,
    ) -> StepHandle {
        let inner = Inner {
            bundle,
            function: def.function(&name).to_owned(),
            name,
            host: Mutex::new(host),
            agency,
            grace,
        };
        StepHandle {
            inner: Arc::new(inner),
            def: Arc::new(def),
        }
    }

    /// Runs one attempt. `cancel` stops it early (its result is `Cancelled`).
    pub(crate) async fn run(&self, input: Vec<u8>, cancel: CancellationToken) -> Attempt {
        let host = match self.live_host().await {
            Ok(host) => host,
            Err(e) => return StepResult::Fatal(format!("cannot start a step host: {e}")).into(),
        };
        let call = Call {
            on: On::Host(host),
            name: &self.inner.name,
            timeout: self.def.timeout(),
            grace: self.inner.grace,
            idempotent: self.def.idempotent,
        };
        call.execute(&self.inner.function, input, cancel).await
    }

    /// Follows an attempt that was running on `node` when this server
    /// stopped: the node reports it when it reconnects (within `wait`),
    /// under the same timeout and cancel rules, timed from now.
    /// `started_at` is when the attempt was recorded started (before its
    /// call could have been sent).
    pub(crate) async fn reattach(
        &self,
        nodes: &Nodes,
        node: &str,
        key: CallKey,
        (wait, started_at): (Duration, crate::model::Timestamp),
        cancel: CancellationToken,
    ) -> Attempt {
        let rx = nodes.reattach(node, key, wait, started_at);
        let call = Call {
            on: On::Reattached { nodes, node, key },
            name: &self.inner.name,
            timeout: self.def.timeout().max(wait),
            grace: self.inner.grace,
            idempotent: self.def.idempotent,
        };
        call.follow(0, rx, cancel).await
    }

    /// Runs one attempt on a remote node, under the same timeout, cancel
    /// and grace rules as on a local host (the node enforces the kill).
    pub(crate) async fn run_on(
        &self,
        node: &Placed,
        key: CallKey,
        input: Vec<u8>,
        cancel: CancellationToken,
    ) -> Attempt {
        let call = Call {
            on: On::Node {
                node,
                key,
                bundle: self.inner.bundle,
            },
            name: &self.inner.name,
            timeout: self.def.timeout(),
            grace: self.inner.grace,
            idempotent: self.def.idempotent,
        };
        call.execute(&self.inner.function, input, cancel).await
    }

    /// The step's host, or a fresh one from the Agency if it died.
    async fn live_host(&self) -> crate::Result<StepHost> {
        let host = self.inner.host.lock().unwrap().clone();
        if host.is_alive() {
            return Ok(host);
        }
        let fresh = self.inner.agency.host(self.inner.bundle).await?;
        *self.inner.host.lock().unwrap() = fresh.clone();
        Ok(fresh)
    }
}

/// Where one attempt runs: the step's local host or a remote node. The
/// timeout, cancel and grace rules below are the same for both.
enum On<'a> {
    Host(StepHost),
    Node {
        node: &'a Placed,
        key: CallKey,
        bundle: signing::BundleHash,
    },
    /// A call already running on `node` (sent before this server
    /// restarted), whose answer the node reports when it reconnects.
    Reattached {
        nodes: &'a Nodes,
        node: &'a str,
        key: CallKey,
    },
}

struct Call<'a> {
    on: On<'a>,
    name: &'a str,
    timeout: Duration,
    grace: Duration,
    idempotent: bool,
}

impl Call<'_> {
    async fn execute(self, function: &str, input: Vec<u8>, cancel: CancellationToken) -> Attempt {
        let (id, rx) = match &self.on {
            On::Host(host) => host.call(function, &input),
            On::Node { node, key, bundle } => {
                let rx = node.link.call(RemoteCall {
                    key: *key,
                    bundle: *bundle,
                    function: function.to_owned(),
                    input,
                    timeout: self.timeout,
                    grace: self.grace,
                    idempotent: self.idempotent,
                });
                (0, rx)
            }
            On::Reattached { .. } => unreachable!("a reattached call is only followed"),
        };
        self.follow(id, rx, cancel).await
    }

    /// Waits for a started call under the timeout, cancel and grace rules.
    async fn follow(
        self,
        id: u64,
        rx: tokio::sync::oneshot::Receiver<Answer>,
        cancel: CancellationToken,
    ) -> Attempt {
        tokio::pin!(rx);
        let timed_out = tokio::select! {
            r = &mut rx => return outcome(r.ok()),
            _ = tokio::time::sleep(self.timeout) => true,
            _ = cancel.cancelled() => false,
        };
        match &self.on {
            On::Host(host) => host.cancel(id),
            On::Node { node, key, .. } => node.link.cancel(*key),
            On::Reattached { nodes, node, key } => nodes.cancel(node, *key),
        }
        let why = if timed_out {
            format!(
                "step {:?} timed out after {} ms",
                self.name,
                self.timeout.as_millis()
            )
        } else {
            format!("step {:?} was cancelled", self.name)
        };
        let stopped = |attempt: Attempt| {
            let result = match (timed_out, attempt.result) {
                (false, StepResult::Ok(v)) => StepResult::Ok(v),
                (false, _) => StepResult::Cancelled,
                (true, _) => StepResult::TimedOut(why.clone()),
            };
            Attempt {
                result,
                log: attempt.log,
            }
        };
        tokio::select! {
            r = &mut rx => stopped(outcome(r.ok())),
            _ = tokio::time::sleep(self.grace) => {
                let reason = format!("{why} and did not stop within {} ms", self.grace.as_millis());
                match &self.on {
                    On::Host(host) => {
                        tracing::warn!(step = self.name, pid = host.pid(), "{reason}; killing its step host");
                        host.kill(reason.clone());
                    }
                    // The node kills its own step host after the grace.
                    On::Node { node, key, .. } => {
                        tracing::warn!(step = self.name, node = %node.name, call = %key, "{reason}");
                    }
                    On::Reattached { node, key, .. } => {
                        tracing::warn!(step = self.name, node = %node, call = %key, "{reason}");
                    }
                }
                // The host's end answers the call, with what it logged.
                let log = tokio::time::timeout(KILLED_ANSWER, rx).await;
                let log = log.ok().and_then(|r| r.ok()).map(|a| a.log).unwrap_or_default();
                let result = if timed_out { StepResult::TimedOut(reason) } else { StepResult::Cancelled };
                Attempt { result, log }
            }
        }
    }
}

/// How long a call on a killed host waits for the host's end to answer it
/// (with what the step logged) before giving up on the log.
const KILLED_ANSWER: Duration = Duration::from_secs(2);

fn outcome(r: Option<Answer>) -> Attempt {
    let Some(Answer { result, log }) = r else {
        return StepResult::Fatal("step host dropped the call".into()).into();
    };
    Attempt {
        result: result_of(result),
        log,
    }
}

fn result_of(r: CallResult) -> StepResult {
    use troupe_bundle::plugin::Answer;
    match r {
        CallResult::Crashed(msg) => StepResult::Fatal(msg),
        CallResult::Lost(msg) => StepResult::Lost(msg),
        CallResult::NotSent(msg) => StepResult::NotRun(msg),
        CallResult::Done { status, body } => match troupe_bundle::plugin::answer(status, &body) {
            Answer::Output(v) => StepResult::Ok(v),
            Answer::Retryable(m) => StepResult::Retryable(m),
            Answer::Fatal(m) => StepResult::Fatal(m),
        },
    }
}
