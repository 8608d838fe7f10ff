//! `run_command`: run a program (argv) or a `sh -c` string, with a timeout,
//! keeping the tail of its output. A non-zero exit fails the step. The
//! command runs in a process group of its own; a cancel or a timeout kills
//! the whole group.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use troupe_sdk::{Context, StepError, StepInput};

#[derive(Deserialize)]
pub(crate) struct Settings {
    /// The program and its arguments. Exactly one of `argv` and `shell`.
    #[serde(default)]
    argv: Option<Vec<String>>,
    /// A command line for `sh -c`.
    #[serde(default)]
    shell: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// How many bytes of stdout and stderr to keep, from the end.
    #[serde(default = "default_tail")]
    tail_bytes: usize,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
}

fn default_tail() -> usize {
    4096
}

#[derive(Serialize)]
pub(crate) struct Output {
    exit_code: i32,
    stdout: String,
    stderr: String,
    duration_ms: u64,
}

pub(crate) fn run_command(
    cx: &Context<'_>,
    input: StepInput<Settings>,
) -> Result<Output, StepError> {
    let s = input.settings;
    let mut cmd = match (&s.argv, &s.shell) {
        (Some(argv), None) if !argv.is_empty() => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        (None, Some(line)) if !line.trim().is_empty() => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(line);
            c
        }
        _ => {
            return Err(StepError::fatal(
                "run_command needs exactly one of `argv` (non-empty list) or `shell` (non-empty string)",
            ));
        }
    };
    // A process group of its own, so a cancel or timeout can stop everything
    // the command started, not just the command.
    cmd.process_group(0)
        .envs(&s.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = &s.cwd {
        cmd.current_dir(dir);
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| StepError::fatal(format!("cannot start {}: {e}", describe(&s))))?;
    let stdout = tail_reader(child.stdout.take(), s.tail_bytes);
    let stderr = tail_reader(child.stderr.take(), s.tail_bytes);
    let deadline = s.timeout_ms.map(|ms| started + Duration::from_millis(ms));
    let status = loop {
        if let Some(status) = child.try_wait().map_err(StepError::retryable)? {
            break status;
        }
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        if cx.is_cancelled() || timed_out {
            if let Some(group) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(if timed_out {
                StepError::retryable(format!(
                    "{} did not finish within {} ms and was killed",
                    describe(&s),
                    s.timeout_ms.unwrap_or_default()
                ))
            } else {
                StepError::cancelled()
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Output {
        exit_code: status.code().unwrap_or(-1),
        stdout: stdout.finish(),
        stderr: stderr.finish(),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    if status.success() {
        Ok(out)
    } else {
        let how = match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => "was killed by a signal".to_owned(),
        };
        let tail = out.stderr.trim();
        Err(StepError::retryable(if tail.is_empty() {
            format!("{} {how}", describe(&s))
        } else {
            format!("{} {how}: {tail}", describe(&s))
        }))
    }
}

fn describe(s: &Settings) -> String {
    match (&s.argv, &s.shell) {
        (Some(argv), _) => format!("command {:?}", argv.join(" ")),
        (_, Some(line)) => format!("shell command {line:?}"),
        _ => "command".to_owned(),
    }
}

/// Reads a pipe on its own thread, keeping the last `keep` bytes.
struct Tail {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn tail_reader<R: Read + Send + 'static>(pipe: Option<R>, keep: usize) -> Tail {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let thread = pipe.map(|mut pipe| {
        let buf = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                b.extend_from_slice(&chunk[..n]);
                if b.len() > keep {
                    let cut = b.len() - keep;
                    b.drain(..cut);
                }
            }
        })
    });
    Tail { buf, thread }
}

impl Tail {
    fn finish(mut self) -> String {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&b).into_owned()
    }
}
