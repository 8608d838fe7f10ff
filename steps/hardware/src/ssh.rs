//! `ssh_run`: run one command on a host over SSH, its host key pinned.
//!
//! Why the `ssh` program and not a crate (`russh`): OpenSSH is what the
//! hosts run and what their operators know, its `known_hosts` matching and
//! its refusal of unknown or changed keys (`StrictHostKeyChecking=yes`) are
//! the reference, and it is installed everywhere; `russh` would bring an
//! async runtime and a second SSH implementation into the plugin for one
//! command per call. The cost is a process per call, and the way a remote
//! command is stopped (below).
//!
//! `ssh` is run with argv and a configuration of its own (`-F /dev/null`,
//! every option on the command line): the pinned host keys (the secret
//! `ssh_known_hosts`) and the client key (the secret `ssh_key`) are files
//! of mode 0600 in a private directory (0700) made for the call and removed
//! after it; their paths are in argv, never their contents. Its environment
//! holds only `HOME` (that directory).
//!
//! Stopping the remote command: without a terminal, sshd does not signal a
//! command whose client went away. So the command runs under a small
//! POSIX `sh` wrapper, in a session of its own (`setsid`), while the wrapper
//! waits for the end of its stdin, which `ssh` holds open; when the step's
//! time is up or it is cancelled, the step closes `ssh`'s stdin (or, after
//! a grace, kills `ssh`, which closes the connection: the same end of input
//! on the remote side), and the wrapper kills the command's whole session.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use troupe_sdk::{Context, StepError, StepInput};

use crate::process::{self, Stop};

#[derive(Deserialize)]
pub(crate) struct Settings {
    /// `HOST` or `HOST:PORT` (`[V6]:PORT`), one of the deployment's
    /// `--var ssh_hosts`.
    host: String,
    /// The hosts the deployment allows.
    hosts: String,
    user: String,
    command: String,
    timeout_ms: u64,
    /// The client's private key (OpenSSH format).
    key: String,
    /// `known_hosts` lines: the host keys to accept.
    known_hosts: String,
}

#[derive(Serialize)]
pub(crate) struct Output {
    host: String,
    exit_status: i32,
    stdout: String,
    stderr: String,
    duration_ms: u64,
}

/// How much of stdout and of stderr is kept, from the end.
const KEEP: usize = 16 * 1024;

/// How long `ssh` has, once its stdin is closed, to end on its own.
const GRACE: Duration = Duration::from_secs(3);

/// The wrapper the remote `sh` runs, the command as `$1`. It exits with
/// the command's status; when its stdin ends first, it kills the command's
/// session (TERM, then KILL after 5 s).
const WRAPPER: &str = r#"exec 3<&0
if command -v setsid >/dev/null 2>&1; then setsid sh -c "$1" </dev/null 3<&- & else sh -c "$1" </dev/null 3<&- & fi
p=$!
(read _ <&3; kill -TERM -$p 2>/dev/null || kill -TERM $p 2>/dev/null; sleep 5; kill -KILL -$p 2>/dev/null || kill -KILL $p 2>/dev/null) >/dev/null 2>&1 &
w=$!
exec 3<&-
wait $p
s=$?
kill $w 2>/dev/null
exit $s"#;

pub(crate) fn run(cx: &Context<'_>, input: StepInput<Settings>) -> Result<Output, StepError> {
    let s = input.settings;
    let session = Session::open(&s.host, &s.hosts, &s.user, &s.key, &s.known_hosts)?;
    let target = &session.target;
    cx.log(format_args!("running on {target}: {}", s.command));
    let timeout = Duration::from_millis(s.timeout_ms);
    let ran = session.exec(cx, &s.command, timeout).map_err(|e| e.error)?;
    cx.log(format_args!(
        "the command on {target} exited with status {} after {} ms",
        ran.code, ran.duration_ms
    ));
    if ran.code != 0 {
        return Err(ran.failed(target, "the command"));
    }
    Ok(Output {
        host: s.host.clone(),
        exit_status: ran.code,
        stdout: ran.stdout,
        stderr: ran.stderr,
        duration_ms: ran.duration_ms,
    })
}

#[derive(Deserialize)]
pub(crate) struct RebootSettings {
    host: String,
    hosts: String,
    user: String,
    key: String,
    known_hosts: String,
    /// What reboots the host.
    command: String,
    /// What prints a string that changes with each boot.
    boot_time_command: String,
    /// How long the host has to come back.
    wait_ms: u64,
}

#[derive(Serialize)]
pub(crate) struct RebootOutput {
    host: String,
    boot_before: String,
    boot_after: String,
    /// From the reboot command to the new boot seen.
    waited_ms: u64,
    summary: String,
}

/// `ssh_reboot`: reads the host's boot id, runs the reboot command (its
/// connection may end under it), then reads the boot id again, with
/// backoff, until it has changed or `wait_ms` has passed (as Ansible's
/// `reboot` does). The host must come back with the pinned key.
pub(crate) fn reboot(
    cx: &Context<'_>,
    input: StepInput<RebootSettings>,
) -> Result<RebootOutput, StepError> {
    let s = input.settings;
    let session = Session::open(&s.host, &s.hosts, &s.user, &s.key, &s.known_hosts)?;
    let target = &session.target;
    let boot = |timeout: Duration| -> Result<String, SshError> {
        let ran = session.exec(cx, &s.boot_time_command, timeout)?;
        let id = ran.stdout.trim();
        if ran.code != 0 || id.is_empty() {
            return Err(SshError {
                kind: Failure::Refused,
                error: ran.failed(target, "the boot_time_command"),
            });
        }
        Ok(id.to_owned())
    };
    // Nothing is done before this succeeds, so its failures may be retried.
    let before = boot(Duration::from_secs(60)).map_err(|e| e.error)?;
    cx.log(format_args!(
        "{target} booted as {before}; running {}",
        s.command
    ));
    let started = Instant::now();
    match session.exec(cx, &s.command, Duration::from_secs(120)) {
        Ok(ran) if ran.code == 0 => {}
        Ok(ran) => return Err(ran.failed(target, "the reboot command")),
        Err(e) => match e.kind {
            Failure::Dropped | Failure::TimedOut => cx.log(format_args!(
                "the connection to {target} ended under the reboot command, as a reboot ends it"
            )),
            Failure::Unreachable | Failure::Refused | Failure::Cancelled => return Err(e.error),
        },
    }
    let deadline = started + Duration::from_millis(s.wait_ms);
    let mut delay = Duration::from_secs(1);
    loop {
        cx.sleep(delay)?;
        let last = match boot(Duration::from_secs(30)) {
            Ok(after) if after != before => {
                let waited_ms = started.elapsed().as_millis() as u64;
                let summary = format!("{target} rebooted: it booted as {after} ({waited_ms} ms)");
                cx.log(&summary);
                return Ok(RebootOutput {
                    host: s.host.clone(),
                    boot_before: before,
                    boot_after: after,
                    waited_ms,
                    summary,
                });
            }
            Ok(_) => format!("it still runs the boot {before}"),
            Err(e) => match e.kind {
                Failure::Cancelled => return Err(e.error),
                // A host that comes back with another key is refused.
                Failure::Refused => {
                    return Err(StepError::fatal(format!(
                        "{target} was asked to reboot, but: {}",
                        e.error.message()
                    )));
                }
                _ => e.error.message().to_owned(),
            },
        };
        cx.log(format_args!("{target}: {last}"));
        if Instant::now() + delay > deadline {
            return Err(StepError::fatal(format!(
                "{target} did not come back from its reboot within {} ms: {last}",
                s.wait_ms
            )));
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Why a command did not run to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Before a session began: nothing ran.
    Unreachable,
    /// The host key or the client key was refused, or the key unreadable.
    Refused,
    /// The connection ended while the command ran.
    Dropped,
    TimedOut,
    Cancelled,
}

struct SshError {
    kind: Failure,
    error: StepError,
}

/// A command that ran to its end, whatever its status.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
    duration_ms: u64,
}

impl Ran {
    /// The error for a non-zero status: the status and stderr's end.
    fn failed(&self, target: &str, what: &str) -> StepError {
        let tail = last_chars(self.stderr.trim(), 2000);
        let code = self.code;
        StepError::fatal(if tail.is_empty() {
            format!("{what} on {target} exited with status {code}")
        } else {
            format!("{what} on {target} exited with status {code}: {tail}")
        })
    }
}

/// A host to run commands on: where, as whom, and the keys, in a private
/// directory for as long as the step runs.
struct Session {
    ssh: PathBuf,
    dir: PrivateDir,
    key: PathBuf,
    known_hosts: PathBuf,
    host: String,
    port: u16,
    user: String,
    /// `user@host[:port]`, for messages.
    target: String,
}

impl Session {
    fn open(
        wanted: &str,
        hosts: &str,
        user: &str,
        key: &str,
        known_hosts: &str,
    ) -> Result<Session, StepError> {
        let (host, port) = allowed(hosts, wanted).map_err(StepError::fatal)?;
        if user.is_empty() || user.starts_with('-') {
            return Err(StepError::fatal(format!(
                "the user {user:?} is not a user name"
            )));
        }
        if known_hosts.trim().is_empty() {
            return Err(StepError::fatal(
                "the secret ssh_known_hosts is empty: set it to the host's known_hosts line (ssh-keyscan -p PORT HOST), never trusted on first use",
            ));
        }
        let ssh = process::find_program("ssh", "openssh-client")?;
        let dir = PrivateDir::new()?;
        let key = dir.write("key", &with_newline(key))?;
        let known = dir.write("known_hosts", &with_newline(known_hosts))?;
        Ok(Session {
            ssh,
            dir,
            key,
            known_hosts: known,
            host,
            port,
            user: user.to_owned(),
            target: format!("{user}@{wanted}"),
        })
    }

    /// Runs `remote` under the wrapper; stops it there too when `timeout`
    /// passes or the step is cancelled.
    fn exec(&self, cx: &Context<'_>, remote: &str, timeout: Duration) -> Result<Ran, SshError> {
        let mut cmd = Command::new(&self.ssh);
        cmd.env_clear()
            .env("HOME", &self.dir.0)
            .args(["-F", "/dev/null", "-T"]);
        for option in [
            "BatchMode=yes".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "GlobalKnownHostsFile=/dev/null".to_owned(),
            "UpdateHostKeys=no".to_owned(),
            "CheckHostIP=no".to_owned(),
            format!("IdentityFile={}", self.key.display()),
            "IdentitiesOnly=yes".to_owned(),
            "IdentityAgent=none".to_owned(),
            "PasswordAuthentication=no".to_owned(),
            "KbdInteractiveAuthentication=no".to_owned(),
            "ControlMaster=no".to_owned(),
            "ControlPath=none".to_owned(),
            "ForwardAgent=no".to_owned(),
            "ClearAllForwardings=yes".to_owned(),
            "ConnectTimeout=15".to_owned(),
            "ServerAliveInterval=15".to_owned(),
            "ServerAliveCountMax=4".to_owned(),
            "LogLevel=ERROR".to_owned(),
        ] {
            cmd.arg("-o").arg(option);
        }
        let port = self.port.to_string();
        cmd.args(["-p", &port, "-l", &self.user, "--", &self.host]);
        cmd.arg(format!(
            "sh -c {} troupe-ssh-run {}",
            quote(WRAPPER),
            quote(remote)
        ));
        let target = &self.target;
        let fail = |kind, error| SshError { kind, error };
        let started = Instant::now();
        let done = process::run(cx, cmd, true, timeout, GRACE, KEEP)
            .map_err(|e| fail(Failure::Refused, e))?;
        let duration_ms = started.elapsed().as_millis() as u64;
        match done.stopped {
            Some(Stop::Cancelled) => {
                cx.log(format_args!(
                    "cancelled: the command on {target} was stopped"
                ));
                return Err(fail(Failure::Cancelled, StepError::cancelled()));
            }
            Some(Stop::TimedOut) => {
                return Err(fail(
                    Failure::TimedOut,
                    StepError::fatal(format!(
                        "the command on {target} did not finish within {} ms and was stopped there",
                        timeout.as_millis()
                    )),
                ));
            }
            None => {}
        }
        let code = done.status.and_then(|s| s.code()).unwrap_or(-1);
        if code == 255
            && let Some((kind, error)) = ssh_failure(target, &done.stderr)
        {
            return Err(fail(kind, error));
        }
        Ok(Ran {
            code,
            stdout: done.stdout,
            stderr: done.stderr,
            duration_ms,
        })
    }
}

/// What `ssh`'s own messages say went wrong, when they say it.
fn ssh_failure(target: &str, stderr: &str) -> Option<(Failure, StepError)> {
    let said = || last_chars(stderr.trim(), 1000).replace('\n', " ");
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("Host key for") && stderr.contains("has changed")
    {
        Some((
            Failure::Refused,
            StepError::fatal(format!(
                "{target} presented a host key other than the one pinned in the secret ssh_known_hosts: refused (if the host was reinstalled, pin its new key)"
            )),
        ))
    } else if stderr.contains("Host key verification failed")
        || stderr.contains("host key is known for")
    {
        Some((
            Failure::Refused,
            StepError::fatal(format!(
                "{target} has no host key pinned in the secret ssh_known_hosts (add its line, from ssh-keyscan): refused, never trusted on first use"
            )),
        ))
    } else if stderr.contains("Permission denied") {
        Some((
            Failure::Refused,
            StepError::fatal(format!(
                "{target} refused the client key in the secret ssh_key: {}",
                said()
            )),
        ))
    } else if [
        "closed by remote host",
        "Read from remote host",
        "client_loop",
        "Broken pipe",
    ]
    .iter()
    .any(|m| stderr.contains(m))
        && !stderr.contains("kex_exchange_identification")
    {
        // The session was under way: the command may have run (a reboot
        // ends its own connection so). Not retried.
        Some((
            Failure::Dropped,
            StepError::fatal(format!(
                "the connection to {target} ended while the command ran: {}",
                said()
            )),
        ))
    } else if [
        // Before the session: nothing ran, so trying again is safe.
        "Connection refused",
        "Connection timed out",
        "No route to host",
        "Network is unreachable",
        "Could not resolve hostname",
        "kex_exchange_identification",
        "Connection closed by",
        "Connection reset by",
    ]
    .iter()
    .any(|m| stderr.contains(m))
    {
        Some((
            Failure::Unreachable,
            StepError::retryable(format!("cannot reach {target} over SSH: {}", said())),
        ))
    } else if stderr.contains("Load key") || stderr.contains("invalid format") {
        Some((
            Failure::Refused,
            StepError::fatal(format!(
                "the secret ssh_key is not a private key ssh can read (OpenSSH or PEM format, no passphrase): {}",
                said()
            )),
        ))
    } else {
        None
    }
}

/// `HOST` or `HOST:PORT` from the deployment's list → host and port (22).
fn allowed(list: &str, wanted: &str) -> Result<(String, u16), String> {
    let listed = list
        .split(|c: char| c.is_whitespace() || c == ',')
        .any(|entry| !entry.is_empty() && entry.eq_ignore_ascii_case(wanted));
    if !listed {
        return Err(format!(
            "the host {wanted} is not one this deployment allows: add it to the server's --var ssh_hosts"
        ));
    }
    let bad = || format!("the host {wanted} is not HOST or HOST:PORT");
    let (host, port) = if let Some(v6) = wanted.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match wanted.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (wanted, None),
        }
    };
    if host.is_empty() || host.starts_with('-') {
        return Err(bad());
    }
    let port = match port {
        None => 22,
        Some(p) => p.parse().map_err(|_| bad())?,
    };
    Ok((host.to_owned(), port))
}

/// `text` quoted for a POSIX shell.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn with_newline(text: &str) -> String {
    let text = text.trim_end_matches(['\r', '\n']).replace("\r\n", "\n");
    format!("{text}\n")
}

/// The last `n` characters of `text`, `[…]` before them when cut.
fn last_chars(text: &str, n: usize) -> String {
    let count = text.chars().count();
    if count <= n {
        text.to_owned()
    } else {
        let tail: String = text.chars().skip(count - n).collect();
        format!("[…]{tail}")
    }
}

/// A directory only this user can enter, removed with what it holds when
/// dropped.
struct PrivateDir(PathBuf);

/// The start of each private directory's name; the step host's pid follows.
const PREFIX: &str = "troupe-ssh-";

/// Removes the private directories of step hosts that are gone: a host
/// killed outright never dropped its own.
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl PrivateDir {
    fn new() -> Result<PrivateDir, StepError> {
        sweep(&std::env::temp_dir());
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        DirBuilder::new().mode(0o700).create(&path).map_err(|e| {
            StepError::retryable(format!("cannot make a private directory for ssh: {e}"))
        })?;
        Ok(PrivateDir(path))
    }

    /// Writes `name` (mode 0600, never an existing file) in the directory.
    fn write(&self, name: &str, text: &str) -> Result<PathBuf, StepError> {
        let path = self.0.join(name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()).map(|()| f));
        match &mut file {
            Ok(_) => Ok(path),
            Err(e) => Err(StepError::retryable(format!(
                "cannot write {} for ssh: {e}",
                Path::new(name).display()
            ))),
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_hosts_are_reached() {
        let list = "10.0.0.9, 127.0.0.1:2222 [fd00::9]:22";
        assert_eq!(allowed(list, "10.0.0.9").unwrap(), ("10.0.0.9".into(), 22));
        assert_eq!(
            allowed(list, "127.0.0.1:2222").unwrap(),
            ("127.0.0.1".into(), 2222)
        );
        assert_eq!(
            allowed(list, "[fd00::9]:22").unwrap(),
            ("fd00::9".into(), 22)
        );
        let err = allowed(list, "127.0.0.1").unwrap_err();
        assert!(err.contains("--var ssh_hosts"), "{err}");
        assert!(allowed("-oProxyCommand=x", "-oProxyCommand=x").is_err());
    }

    #[test]
    fn the_private_directories_of_hosts_that_are_gone_are_swept() {
        let parent = std::env::temp_dir().join(format!("troupe-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&parent).unwrap();
        // A pid that was and is no more: a child that has been reaped.
        let mut child = Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let stale = parent.join(format!("{PREFIX}{gone}-0-1"));
        let mine = parent.join(format!("{PREFIX}{}-0-1", std::process::id()));
        let other = parent.join("someone-else");
        for dir in [&stale, &mine, &other] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("key"), "k").unwrap();
        }
        sweep(&parent);
        assert!(!stale.exists());
        assert!(mine.join("key").exists());
        assert!(other.join("key").exists());
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote("a 'b' $HOME \"c\"")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "a 'b' $HOME \"c\"");
    }

    fn wrapped(command: &str) -> std::process::Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sh -c {} troupe-ssh-run {}",
                quote(WRAPPER),
                quote(command)
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    #[test]
    fn the_wrapper_gives_the_commands_status_and_output() {
        let mut child = wrapped("echo out; echo err >&2; exit 7");
        // Its stdin stays open until it has ended.
        let stdin = child.stdin.take();
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        assert_eq!(out.status.code(), Some(7));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    }

    #[test]
    fn the_end_of_its_input_stops_the_wrapped_command_and_its_children() {
        let mut child = wrapped("sleep 300 & echo $!; sleep 300");
        let mut stdout = child.stdout.take().unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8];
        while std::io::Read::read(&mut stdout, &mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let pid: u32 = String::from_utf8(line).unwrap().trim().parse().unwrap();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        let started = Instant::now();
        drop(child.stdin.take());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + 15), "ended by TERM");
        assert!(started.elapsed() < Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                Instant::now() < deadline,
                "the command's child {pid} lives on"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
