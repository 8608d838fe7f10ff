//! Step hosts: one subprocess per bundle hash runs that bundle's plugin code,
//! so a crashing plugin takes down only its host. [`StepHost`] is the
//! engine's handle to one; `server` is the process side.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::unix::pipe;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::tasks::TaskKind;

pub(crate) mod protocol;
pub mod server;
mod session;

use crate::bundle::Invalid;

/// How to start a step host: a program and its leading arguments; the
/// library path is appended. `troupe` uses itself in a hidden mode.
#[derive(Debug, Clone)]
pub struct HostCommand {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// A host hearing nothing from its engine this long (the engine froze
    /// or hung) ends its steps and itself: set where another server takes
    /// over a silent one's actions, so a frozen server's steps cannot
    /// overlap their re-run there. `None`: a host waits for its engine.
    pub watch: Option<Duration>,
}

/// The outcome of one call, as the host (or node) reported it.
#[derive(Debug)]
pub enum CallResult {
    /// `status` is one of `troupe_sdk::ffi::STATUS_*`.
    Done { status: i32, body: Vec<u8> },
    /// The host died before answering.
    Crashed(String),
    /// The node running it went away; whether the step ran, and how far,
    /// is unknown.
    Lost(String),
    /// The call never reached its node: the step did not run.
    NotSent(String),
}

/// What a caller gets back: the call's result and what it logged
/// (`troupe_sdk::Context::log`), one line per line, at most
/// [`protocol::MAX_CALL_LOG`] bytes.
#[derive(Debug)]
pub struct Answer {
    pub result: CallResult,
    pub log: String,
}

/// A call sent and not yet answered.
struct Pending {
    tx: oneshot::Sender<Answer>,
    log: Vec<u8>,
}

impl Pending {
    fn new(tx: oneshot::Sender<Answer>) -> Pending {
        Pending {
            tx,
            log: Vec::new(),
        }
    }

    /// The host keeps a call's log under [`protocol::MAX_CALL_LOG`] and
    /// then sends one line saying so; the slack here keeps that line
    /// (and bounds a host that would not stop).
    fn log(&mut self, line: &[u8]) {
        if self.log.len() + line.len() < protocol::MAX_CALL_LOG + 256 {
            self.log.extend_from_slice(line);
            self.log.push(b'\n');
        }
    }

    fn answer(self, result: CallResult) {
        answer(self.tx, result, self.log);
    }
}

fn answer(tx: oneshot::Sender<Answer>, result: CallResult, log: Vec<u8>) {
    let log = match String::from_utf8(log) {
        Ok(log) => log,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    let _ = tx.send(Answer { result, log });
}

/// A handle to a running step host. Cheap to clone.
#[derive(Clone)]
pub struct StepHost {
    inner: Arc<Inner>,
}

struct Inner {
    outbox: Arc<Outbox>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    alive: AtomicBool,
    kill: Notify,
    kill_reason: Mutex<Option<String>>,
    exited: Notify,
    pid: u32,
    exports: Vec<String>,
}

/// Variables a step host inherits from the server; everything else is
/// dropped.
pub const HOST_ENV: &[&str] = &[
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME", "USER", "LOGNAME",
];

fn host_env() -> impl Iterator<Item = (OsString, OsString)> {
    HOST_ENV
        .iter()
        .filter_map(|name| std::env::var_os(name).map(|v| (OsString::from(name), v)))
}

impl StepHost {
    /// Starts a host for `library` and waits for its `HELLO`.
    pub async fn spawn(
        cmd: &HostCommand,
        library: &Path,
        label: &str,
    ) -> Result<StepHost, crate::Error> {
        let mut child = tokio::process::Command::new(&cmd.program)
            .args(&cmd.args)
            .arg(library)
            // Plugins get a clean environment: never the server's
            // configuration (database URL, tokens) or anything else it
            // inherited. Secrets reach a step through its input only.
            .env_clear()
            .envs(host_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(crate::Error::io(format!(
                "starting a step host with {:?}",
                cmd.program
            )))?;
        let pid = child.id().unwrap_or_default();
        let stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        crate::tasks::spawn(TaskKind::HostIo, log_output(stderr, label.to_owned()));

        let hello =
            tokio::time::timeout(Duration::from_secs(30), protocol::read_async(&mut stdout)).await;
        let exports = match hello {
            Ok(Ok(Some(f))) if f.kind == protocol::HELLO && f.payload.len() >= 4 => {
                let abi = u32::from_le_bytes(f.payload[..4].try_into().unwrap());
                if !(troupe_sdk::OLDEST_ABI_VERSION..=troupe_sdk::ABI_VERSION).contains(&abi) {
                    return Err(Invalid::Abi { found: abi }.into());
                }
                serde_json::from_slice::<Vec<String>>(&f.payload[4..]).map_err(|e| {
                    Invalid::Library(format!("the library listed its steps as invalid JSON: {e}"))
                })?
            }
            Ok(Ok(Some(f))) if f.kind == protocol::FAILED => {
                return Err(
                    Invalid::Library(String::from_utf8_lossy(&f.payload).into_owned()).into(),
                );
            }
            Ok(Ok(_)) | Ok(Err(_)) => {
                let status = child.wait().await.ok();
                let how = status.map(describe_exit).unwrap_or_else(|| "died".into());
                return Err(Invalid::Library(format!(
                    "the step host {how} while loading the library"
                ))
                .into());
            }
            Err(_) => {
                return Err(
                    Invalid::Library("the step host did not start within 30 s".into()).into(),
                );
            }
        };

        let stdin = stdin
            .into_owned_fd()
            .and_then(pipe::Sender::from_owned_fd)
            .map_err(crate::Error::io("setting up the step host's input pipe"))?;
        let (outbox, backlog) = Outbox::new(stdin);
        let inner = Arc::new(Inner {
            outbox: Arc::new(outbox),
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            kill: Notify::new(),
            kill_reason: Mutex::default(),
            exited: Notify::new(),
            pid,
            exports,
        });

        if let Some(silence) = cmd.watch {
            watch(&inner.outbox, silence);
        }

        // Writer: sends what callers could not write at once (a full pipe).
        // It holds the outbox weakly: when the last handle goes, the pipe
        // closes and the host exits.
        crate::tasks::spawn(
            TaskKind::HostIo,
            write_backlog(Arc::downgrade(&inner.outbox), backlog),
        );

        // Supervisor: owns the child; kills it on request, reports its exit.
        let (exit_tx, exit_rx) = oneshot::channel();
        {
            let inner = inner.clone();
            crate::tasks::spawn(TaskKind::HostIo, async move {
                let status = tokio::select! {
                    status = child.wait() => status,
                    _ = inner.kill.notified() => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                };
                // Whatever its plugin started goes with it.
                if pid != 0 {
                    let _ = tokio::task::spawn_blocking(move || session::kill_marked(pid)).await;
                }
                let _ = exit_tx.send(
                    status
                        .map(describe_exit)
                        .unwrap_or_else(|e| format!("could not be waited for: {e}")),
                );
            });
        }

        // Reader: routes answers to callers; on end of stream fails the rest.
        {
            let inner = inner.clone();
            let label = label.to_owned();
            crate::tasks::spawn(TaskKind::HostIo, async move {
                loop {
                    match protocol::read_async(&mut stdout).await {
                        Ok(Some(f)) if f.kind == protocol::DONE && f.payload.len() >= 4 => {
                            let status = i32::from_le_bytes(f.payload[..4].try_into().unwrap());
                            let body = f.payload[4..].to_vec();
                            if let Some(call) = inner.pending.lock().unwrap().remove(&f.id) {
                                call.answer(CallResult::Done { status, body });
                            }
                        }
                        Ok(Some(f)) if f.kind == protocol::LOG => {
                            if let Some(call) = inner.pending.lock().unwrap().get_mut(&f.id) {
                                call.log(&f.payload);
                            }
                        }
                        Ok(Some(f)) => {
                            tracing::warn!(host = %label, kind = f.kind, "unexpected frame from step host")
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                inner.alive.store(false, Ordering::SeqCst);
                // Closing stdout usually means the process is gone; make sure.
                inner.kill.notify_one();
                let how = exit_rx.await.unwrap_or_else(|_| "vanished".into());
                let reason = inner.kill_reason.lock().unwrap().clone();
                let message = match reason {
                    Some(reason) => format!("step host was killed ({reason})"),
                    None => format!("step host crashed ({how})"),
                };
                let pending: Vec<_> = inner.pending.lock().unwrap().drain().collect();
                if !pending.is_empty() || reason_is_none(&inner) {
                    tracing::warn!(host = %label, pid = inner.pid, in_flight = pending.len(), "{message}");
                }
                for (_, call) in pending {
                    call.answer(CallResult::Crashed(message.clone()));
                }
                inner.exited.notify_waiters();
            });
        }
        tracing::debug!(host = %label, pid, "step host started");
        Ok(StepHost { inner })
    }

    /// Starts a host for an unpacked bundle and checks that its library
    /// exports every function the manifest names.
    pub async fn start(
        cmd: &HostCommand,
        unpacked: &crate::bundle::Unpacked,
    ) -> Result<StepHost, crate::Error> {
        let label = format!("{}@{}", unpacked.manifest.name, unpacked.hash.short());
        let host = StepHost::spawn(cmd, &unpacked.library, &label).await?;
        let missing: Vec<String> = unpacked
            .manifest
            .functions()
            .into_iter()
            .filter(|f| !host.exports().iter().any(|e| e == f))
            .map(str::to_owned)
            .collect();
        if !missing.is_empty() {
            host.shutdown("bundle rejected").await;
            return Err(Invalid::MissingSteps(missing).into());
        }
        Ok(host)
    }

    pub fn exports(&self) -> &[String] {
        &self.inner.exports
    }

    pub fn is_alive(&self) -> bool {
        self.inner.alive.load(Ordering::SeqCst)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// Sends a call; the receiver yields its result (or the host's crash).
    pub(crate) fn call(&self, function: &str, input: &[u8]) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if !self.is_alive() {
            answer(
                tx,
                CallResult::Crashed("step host is not running".into()),
                Vec::new(),
            );
            return (id, rx);
        }
        let frame = protocol::call(id, function, input);
        if let Some(message) = protocol::too_large("input", frame.len(), input.len()) {
            let body = message.into_bytes();
            let status = troupe_sdk::ffi::STATUS_FATAL;
            answer(tx, CallResult::Done { status, body }, Vec::new());
            return (id, rx);
        }
        self.inner
            .pending
            .lock()
            .unwrap()
            .insert(id, Pending::new(tx));
        if !self.inner.outbox.send(frame)
            && let Some(call) = self.inner.pending.lock().unwrap().remove(&id)
        {
            call.answer(CallResult::Crashed("step host is not running".into()));
        }
        (id, rx)
    }

    /// Asks a call to stop: sets the flag its step can poll.
    pub(crate) fn cancel(&self, id: u64) {
        self.inner
            .outbox
            .send(protocol::encode(protocol::CANCEL, id, &[]));
    }

    /// Kills the process; in-flight calls fail with `reason`.
    pub(crate) fn kill(&self, reason: String) {
        self.inner.kill_reason.lock().unwrap().get_or_insert(reason);
        self.inner.alive.store(false, Ordering::SeqCst);
        self.inner.kill.notify_one();
    }

    /// Stops the host and waits until it has exited.
    pub async fn shutdown(&self, reason: &str) {
        let exited = self.inner.exited.notified();
        tokio::pin!(exited);
        exited.as_mut().enable();
        if self.inner.pending.lock().unwrap().is_empty() && !self.is_alive() {
            return;
        }
        self.kill(reason.to_owned());
        let _ = tokio::time::timeout(Duration::from_secs(5), exited).await;
    }
}

/// Sends what callers could not write at once (a full pipe), in order. It
/// holds the outbox weakly: when the last handle goes, the pipe closes and
/// the host exits.
async fn write_backlog(outbox: Weak<Outbox>, mut backlog: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut buf = Vec::new();
    while let Some(frame) = backlog.recv().await {
        buf.clear();
        buf.extend_from_slice(&frame);
        while let Ok(more) = backlog.try_recv() {
            buf.extend_from_slice(&more);
        }
        let Some(outbox) = outbox.upgrade() else {
            break;
        };
        if outbox.drain(&buf).await.is_err() {
            break;
        }
        outbox.caught_up(&backlog);
    }
}

/// Tells the host to end itself after `silence` without a word, and pings
/// it three times within that (at least every second) while it lives.
fn watch(outbox: &Arc<Outbox>, silence: Duration) {
    let ms = silence.as_millis().min(u64::MAX as u128) as u64;
    outbox.send(protocol::encode(protocol::WATCH, 0, &[&ms.to_le_bytes()]));
    let every = (silence / 3).min(Duration::from_secs(1));
    let outbox = Arc::downgrade(outbox);
    crate::tasks::spawn(TaskKind::HostIo, async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(outbox) = outbox.upgrade() else {
                return;
            };
            if !outbox.send(protocol::encode(protocol::PING, 0, &[])) {
                return;
            }
        }
    });
}

/// The host's input pipe. A caller writes its frame straight into the pipe
/// (no hand-off to another task) unless the pipe is full or earlier frames
/// are still waiting; then the frame joins the backlog that the writer task
/// sends in order. Nothing ever blocks a caller.
struct Outbox {
    pipe: pipe::Sender,
    /// Whether frames are waiting in the backlog; guards the order.
    state: Mutex<Backlog>,
}

struct Backlog {
    queued: bool,
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl Outbox {
    fn new(pipe: pipe::Sender) -> (Outbox, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Mutex::new(Backlog { queued: false, tx });
        (Outbox { pipe, state }, rx)
    }

    /// Writes or queues `frame`; false if the host's input is gone.
    fn send(&self, frame: Vec<u8>) -> bool {
        let mut state = self.state.lock().unwrap();
        let rest = if state.queued {
            frame
        } else {
            match self.pipe.try_write(&frame) {
                Ok(n) if n == frame.len() => return true,
                Ok(n) => frame[n..].to_vec(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => frame,
                Err(_) => return false,
            }
        };
        state.queued = true;
        state.tx.send(rest).is_ok()
    }

    /// Writes queued bytes, waiting for room in the pipe.
    async fn drain(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            self.pipe.writable().await?;
            match self.pipe.try_write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Callers may write directly again once nothing is queued.
    fn caught_up(&self, backlog: &mpsc::UnboundedReceiver<Vec<u8>>) {
        let mut state = self.state.lock().unwrap();
        if backlog.is_empty() {
            state.queued = false;
        }
    }
}

/// The longest line of plugin output logged whole; longer ones are cut.
const MAX_LOG_LINE: usize = 4096;

/// Logs what the host and its plugin print (their stdout and stderr both
/// arrive here), a line at a time, each cut at `MAX_LOG_LINE` bytes.
async fn log_output(mut from: impl tokio::io::AsyncRead + Unpin, host: String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(MAX_LOG_LINE);
    let mut chunk = vec![0u8; 8192];
    let mut skipping = false;
    let emit = |line: &[u8], cut: bool| {
        let mut text = String::from_utf8_lossy(line).into_owned();
        crate::secrets::mask_printed(&mut text);
        let text = text.trim_end_matches('\r');
        let more = if cut { " [line cut]" } else { "" };
        tracing::info!(target: "troupe::plugin", host = %host, "{text}{more}");
    };
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &chunk[..n] {
            if b == b'\n' {
                if !skipping {
                    emit(&buf, false);
                }
                buf.clear();
                skipping = false;
            } else if !skipping {
                buf.push(b);
                if buf.len() >= MAX_LOG_LINE {
                    emit(&buf, true);
                    buf.clear();
                    skipping = true;
                }
            }
        }
    }
    if !buf.is_empty() {
        emit(&buf, false);
    }
}

fn reason_is_none(inner: &Inner) -> bool {
    inner.kill_reason.lock().unwrap().is_none()
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("signal {sig}"),
        (Some(code), _) => format!("exit status {code}"),
        _ => "unknown exit".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Frames too big for the pipe wait in the backlog; later frames queue
    /// behind them, and everything arrives whole and in order.
    #[tokio::test]
    async fn a_full_pipe_queues_frames_in_order() {
        let (tx, mut rx) = pipe::pipe().unwrap();
        let (outbox, backlog) = Outbox::new(tx);
        let outbox = Arc::new(outbox);
        let frames: Vec<Vec<u8>> = [300_000, 10, 200_000, 7]
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8 + 1; n])
            .collect();
        // (Until the reactor has seen the pipe writable, a write is queued.)
        outbox.pipe.writable().await.unwrap();
        assert!(outbox.send(frames[0].clone()));
        assert!(outbox.state.lock().unwrap().queued, "the pipe filled up");
        // Room in the pipe again, but the first frame's rest is still queued:
        // the next frames must not jump ahead of it.
        let mut got = vec![0; 4096];
        rx.read_exact(&mut got).await.unwrap();
        for f in &frames[1..] {
            assert!(outbox.send(f.clone()));
        }
        tokio::spawn(write_backlog(Arc::downgrade(&outbox), backlog));
        let want: Vec<u8> = frames.concat();
        got.resize(want.len(), 0);
        rx.read_exact(&mut got[4096..]).await.unwrap();
        assert!(got == want, "bytes arrived out of order");

        // Once caught up, callers write straight into the pipe again.
        tokio::time::timeout(Duration::from_secs(5), async {
            while outbox.state.lock().unwrap().queued {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the backlog drains");
        assert!(outbox.send(vec![9; 3]));
        let mut tail = [0; 3];
        rx.read_exact(&mut tail).await.unwrap();
        assert_eq!(tail, [9; 3]);

        // The last handle gone, the pipe closes.
        drop(outbox);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), rx.read_to_end(&mut rest))
            .await
            .expect("the pipe closes")
            .unwrap();
        assert!(rest.is_empty());
    }
}
