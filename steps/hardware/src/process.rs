//! Running a helper program (`ipmitool`, `ssh`) from a step: argv only
//! (never a shell), an environment holding only what the caller sets (and
//! the step host's mark, so the program ends with its host), a process
//! group of its own, the tail of its output kept, and the whole group
//! stopped when the step is cancelled or its time is up.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use troupe_sdk::{Context, StepError};

/// The variable by which a step host finds (and, when it ends, kills)
/// every process it started.
const HOST_MARK: &str = "STEP_HOST_MARK";

/// How a program's run ended.
pub(crate) struct Finished {
    /// None: it was stopped (see `stopped`).
    pub(crate) status: Option<ExitStatus>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    /// Why it was stopped, if it was.
    pub(crate) stopped: Option<Stop>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    TimedOut,
    Cancelled,
}

/// The program `name` from the step host's `PATH` (the environment given
/// to the program itself is cleared, so it is looked up here).
pub(crate) fn find_program(name: &str, package: &str) -> Result<PathBuf, StepError> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            StepError::fatal(format!(
                "{name} is not installed where this step runs: install it (Debian: apt install {package})"
            ))
        })
}

/// Runs `cmd` until it exits, `timeout` passes or the step is cancelled,
/// keeping the last `keep` bytes of stdout and of stderr.
///
/// With `hold_stdin`, the program's stdin is a pipe held open while it
/// runs; when it must stop, the pipe is closed first and the program has
/// `grace` to end on its own (`ssh` passes the end of input on, and the
/// remote side stops its command) before its group is killed. Without,
/// stdin is `/dev/null` and the group is killed at once.
pub(crate) fn run(
    cx: &Context<'_>,
    mut cmd: Command,
    hold_stdin: bool,
    timeout: Duration,
    grace: Duration,
    keep: usize,
) -> Result<Finished, StepError> {
    // The callers clear the environment; the step host's mark must stay,
    // or the program would outlive a host that is killed.
    if let Some(mark) = std::env::var_os(HOST_MARK) {
        cmd.env(HOST_MARK, mark);
    }
    cmd.process_group(0)
        .stdin(if hold_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .spawn()
        .map_err(|e| StepError::fatal(format!("cannot start {program}: {e}")))?;
    let mut stdin = child.stdin.take();
    let stdout = Tail::read(child.stdout.take(), keep);
    let stderr = Tail::read(child.stderr.take(), keep);
    let deadline = Instant::now() + timeout;
    let mut stopped = None;
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(StepError::retryable)? {
            break Some(status);
        }
        let now = Instant::now();
        if stopped.is_none() {
            if cx.is_cancelled() {
                stopped = Some(Stop::Cancelled);
            } else if now >= deadline {
                stopped = Some(Stop::TimedOut);
            }
            if stopped.is_some() {
                // Closing stdin asks the program to end; killing it is next.
                let asked: Option<ChildStdin> = stdin.take();
                kill_at = Some(if asked.is_some() { now + grace } else { now });
                drop(asked);
            }
        }
        if kill_at.is_some_and(|at| now >= at) {
            kill_group(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(stdin);
    Ok(Finished {
        status,
        stdout: stdout.finish(),
        stderr: stderr.finish(),
        stopped,
    })
}

fn kill_group(child: &mut Child) {
    if let Some(group) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads a pipe on its own thread, keeping the last `keep` bytes.
struct Tail {
    buf: Arc<Mutex<(Vec<u8>, bool)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tail {
    fn read<R: Read + Send + 'static>(pipe: Option<R>, keep: usize) -> Tail {
        let buf = Arc::new(Mutex::new((Vec::new(), false)));
        let thread = pipe.map(|mut pipe| {
            let buf = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                    b.0.extend_from_slice(&chunk[..n]);
                    if b.0.len() > keep {
                        let cut = b.0.len() - keep;
                        b.0.drain(..cut);
                        b.1 = true;
                    }
                }
            })
        });
        Tail { buf, thread }
    }

    /// The text kept; `[…]` first when the start was cut.
    fn finish(mut self) -> String {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&b.0);
        if b.1 {
            format!("[…]{text}")
        } else {
            text.into_owned()
        }
    }
}
