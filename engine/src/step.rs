//! The Step actor: one per (bundle hash, step), created by the Agency on
//! first use. It runs calls of its step on the bundle's step host, enforcing
//! the step's timeout and cancellation.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agency::AgencyHandle;
use crate::bundle::manifest::StepDef;
use crate::host::{CallResult, StepHost};

/// How one attempt of a step ended.
#[derive(Debug)]
pub(crate) enum StepResult {
    Ok(Value),
    Retryable(String),
    Fatal(String),
    TimedOut(String),
    Cancelled,
}

enum Msg {
    Run {
        input: Vec<u8>,
        cancel: CancellationToken,
        reply: oneshot::Sender<StepResult>,
    },
}

#[derive(Clone)]
pub(crate) struct StepHandle {
    tx: mpsc::Sender<Msg>,
    pub(crate) def: Arc<StepDef>,
}

impl StepHandle {
    pub(crate) fn spawn(
        bundle: signing::BundleHash,
        name: String,
        def: StepDef,
        host: StepHost,
        agency: AgencyHandle,
        grace: Duration,
    ) -> StepHandle {
        let (tx, rx) = mpsc::channel(1024);
        let def = Arc::new(def);
        let actor = StepActor {
            bundle,
            function: def.function(&name).to_owned(),
            name,
            def: def.clone(),
            host,
            agency,
            grace,
        };
        crate::actor::spawn("step", actor.run(rx));
        StepHandle { tx, def }
    }

    /// Runs one attempt. `cancel` stops it early (its result is `Cancelled`).
    pub(crate) async fn run(&self, input: Vec<u8>, cancel: CancellationToken) -> StepResult {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Msg::Run {
                input,
                cancel,
                reply,
            })
            .await
            .is_err()
        {
            return StepResult::Fatal("step actor stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| StepResult::Fatal("step actor dropped the call".into()))
    }
}

struct StepActor {
    bundle: signing::BundleHash,
    name: String,
    function: String,
    def: Arc<StepDef>,
    host: StepHost,
    agency: AgencyHandle,
    grace: Duration,
}

impl StepActor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(Msg::Run {
            input,
            cancel,
            reply,
        }) = rx.recv().await
        {
            if !self.host.is_alive() {
                match self.agency.host(self.bundle).await {
                    Ok(host) => self.host = host,
                    Err(e) => {
                        let _ =
                            reply.send(StepResult::Fatal(format!("cannot start a step host: {e}")));
                        continue;
                    }
                }
            }
            let call = Call {
                host: self.host.clone(),
                name: self.name.clone(),
                function: self.function.clone(),
                timeout: self.def.timeout(),
                grace: self.grace,
            };
            tokio::spawn(async move {
                let _ = reply.send(call.execute(input, cancel).await);
            });
        }
    }
}

struct Call {
    host: StepHost,
    name: String,
    function: String,
    timeout: Duration,
    grace: Duration,
}

impl Call {
    async fn execute(self, input: Vec<u8>, cancel: CancellationToken) -> StepResult {
        let (id, rx) = self.host.call(&self.function, &input);
        tokio::pin!(rx);
        let timed_out = tokio::select! {
            r = &mut rx => return outcome(r.ok()),
            _ = tokio::time::sleep(self.timeout) => true,
            _ = cancel.cancelled() => false,
        };
        self.host.cancel(id);
        let why = if timed_out {
            format!(
                "step {:?} timed out after {} ms",
                self.name,
                self.timeout.as_millis()
            )
        } else {
            format!("step {:?} was cancelled", self.name)
        };
        tokio::select! {
            r = &mut rx => match (timed_out, outcome(r.ok())) {
                (false, StepResult::Ok(v)) => StepResult::Ok(v),
                (false, _) => StepResult::Cancelled,
                (true, _) => StepResult::TimedOut(why),
            },
            _ = tokio::time::sleep(self.grace) => {
                let reason = format!("{why} and did not stop within {} ms", self.grace.as_millis());
                tracing::warn!(step = %self.name, pid = self.host.pid(), "{reason}; killing its step host");
                self.host.kill(reason.clone());
                if timed_out { StepResult::TimedOut(reason) } else { StepResult::Cancelled }
            }
        }
    }
}

fn outcome(r: Option<CallResult>) -> StepResult {
    use sdk::ffi::*;
    match r {
        None => StepResult::Fatal("step host dropped the call".into()),
        Some(CallResult::Crashed(msg)) => StepResult::Fatal(msg),
        Some(CallResult::Done { status, body }) => {
            let text = || String::from_utf8_lossy(&body).into_owned();
            match status {
                STATUS_OK => match serde_json::from_slice(&body) {
                    Ok(v) => StepResult::Ok(v),
                    Err(e) => StepResult::Fatal(format!("step returned invalid JSON: {e}")),
                },
                STATUS_RETRYABLE => StepResult::Retryable(text()),
                STATUS_FATAL => StepResult::Fatal(text()),
                STATUS_PANIC => StepResult::Fatal(format!("step panicked: {}", text())),
                STATUS_UNKNOWN_STEP => StepResult::Fatal(text()),
                other => {
                    StepResult::Fatal(format!("step returned unknown status {other}: {}", text()))
                }
            }
        }
    }
}
