//! `vm_power`: start, shut down, reboot, destroy or read the state of a
//! libvirt domain, by running `virsh -c URI` with argv (never a shell).
//!
//! The hypervisor's URI comes from the request but must be one of the
//! operator's `--var hypervisors` (refused at submit, and here again before
//! `virsh` runs): `qemu:///system` for a step placed on the hypervisor's own
//! node, `qemu+ssh://user@host/system` to reach one over SSH (with the node
//! user's own key and known hosts), `test:///default` for libvirt's test
//! driver.
//!
//! Like `power`, it is idempotent by state: `start` on a running domain,
//! `shutdown` or `destroy` on one that is shut off send nothing and say so.
//! `start` and `destroy` are done when `virsh` returns (libvirt returns once
//! the domain runs, or once its process is gone); a graceful `shutdown` is
//! a request to the guest, so `domstate` is read with backoff until it says
//! `shut off`, and, with `force`, the domain is destroyed when the guest has
//! not shut down within `grace_ms`. `reboot` is a graceful shutdown, forced
//! after `grace_ms`, then a start: unlike `virsh reboot` (which the guest
//! may ignore, and which keeps the running definition), each step of it is
//! seen to happen.
//!
//! `virsh`'s messages (in the C locale) tell an unknown domain, an
//! unreachable hypervisor and a refused permission apart; each is an error
//! of its own.

use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use troupe_sdk::{Context, StepError, StepInput};

use crate::process;

#[derive(Deserialize)]
pub(crate) struct Settings {
    /// start, shutdown, reboot, destroy or status.
    op: String,
    /// The libvirt connection URI.
    hypervisor: String,
    /// The domain's name or UUID.
    domain: String,
    /// `shutdown`: destroy the domain when it has not shut down within
    /// `grace_ms`.
    #[serde(default)]
    force: bool,
    #[serde(default = "default_grace")]
    grace_ms: u64,
    /// How long a graceful shutdown (without `force`) may take.
    #[serde(default = "default_wait")]
    wait_ms: u64,
    /// The hypervisors the deployment allows (`--var hypervisors`).
    hypervisors: String,
}

fn default_grace() -> u64 {
    120_000
}

fn default_wait() -> u64 {
    300_000
}

#[derive(Serialize)]
pub(crate) struct Output {
    hypervisor: String,
    domain: String,
    op: String,
    /// The domain's state at the end, as `virsh domstate` says it:
    /// running, shut off, paused, …
    state: String,
    /// The `virsh` commands that changed something, in order.
    sent: Vec<String>,
    /// What happened, in a sentence.
    summary: String,
    waited_ms: u64,
}

/// Each `virsh` run's limit.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

const RUNNING: &str = "running";
const SHUT_OFF: &str = "shut off";

/// Finds `uri` in the deployment's list (whitespace- or comma-separated
/// URIs, compared exactly, a trailing slash aside).
pub(crate) fn allowed<'a>(list: &'a str, uri: &str) -> Result<&'a str, String> {
    let wanted = uri.trim().trim_end_matches('/');
    list.split(|c: char| c.is_whitespace() || c == ',')
        .find(|entry| !entry.is_empty() && entry.trim_end_matches('/') == wanted)
        .ok_or_else(|| {
            format!(
                "the hypervisor {} is not one this deployment allows: add it to the server's --var hypervisors",
                shown(wanted)
            )
        })
}

/// A URI as messages show it: without its query (`?keyfile=…`,
/// `?socket=…`), which is the operator's configuration, not the request's.
fn shown(uri: &str) -> &str {
    uri.split('?').next().unwrap_or(uri)
}

/// A domain name or UUID `virsh` takes as one argument and never as an
/// option.
fn check_domain(domain: &str) -> Result<(), StepError> {
    let ok = !domain.is_empty()
        && domain.len() <= 256
        && !domain.starts_with('-')
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StepError::fatal(format!(
            "`{domain}` is not a domain name: letters, digits and . _ + : - only"
        )))
    }
}

pub(crate) fn vm(cx: &Context<'_>, input: StepInput<Settings>) -> Result<Output, StepError> {
    let s = input.settings;
    let uri = allowed(&s.hypervisors, &s.hypervisor).map_err(StepError::fatal)?;
    check_domain(&s.domain)?;
    let virsh = Virsh {
        program: process::find_program("virsh", "libvirt-clients")?,
        uri,
        domain: &s.domain,
    };
    let name = format!("{} on {}", s.domain, shown(uri));
    let started = Instant::now();
    let state = virsh.state(cx)?;
    cx.log(format_args!("{name} is {state}"));
    let mut sent = Vec::new();
    let result = (|| -> Result<(String, String), StepError> {
        Ok(match s.op.as_str() {
            "status" => (state.clone(), format!("{name} is {state}")),
            "start" if state == RUNNING => {
                (state, format!("{name} is already running: not started"))
            }
            "start" => {
                virsh.start(cx, &state, &mut sent)?;
                (
                    RUNNING.to_owned(),
                    format!("{name} was {state} and is started"),
                )
            }
            "destroy" if state == SHUT_OFF => {
                (state, format!("{name} is already shut off: not destroyed"))
            }
            "destroy" => {
                virsh.change(cx, "destroy", &mut sent)?;
                (
                    SHUT_OFF.to_owned(),
                    format!("{name} was {state} and is destroyed (forced off)"),
                )
            }
            "shutdown" if state == SHUT_OFF => {
                (state, format!("{name} is already shut off: nothing sent"))
            }
            "shutdown" => {
                let wait = Duration::from_millis(if s.force { s.grace_ms } else { s.wait_ms });
                let how = virsh.shut_down(cx, &name, &state, wait, s.force, &mut sent)?;
                (SHUT_OFF.to_owned(), how)
            }
            "reboot" => {
                let how = if state == SHUT_OFF {
                    format!("{name} was shut off")
                } else {
                    let grace = Duration::from_millis(s.grace_ms);
                    virsh.shut_down(cx, &name, &state, grace, true, &mut sent)?
                };
                virsh.start(cx, SHUT_OFF, &mut sent)?;
                (RUNNING.to_owned(), format!("{how}; started again"))
            }
            other => {
                return Err(StepError::fatal(format!(
                    "unknown vm op `{other}`: use start, shutdown, reboot, destroy or status"
                )));
            }
        })
    })();
    // A reboot that has sent something is not tried again: a second one
    // would interrupt the boot of the first. The other ops are idempotent
    // by state, so a retry reads the state first and does what is left.
    let (state, summary) = match result {
        Err(StepError::Retryable(m)) if s.op == "reboot" && !sent.is_empty() => {
            return Err(StepError::fatal(format!(
                "{m} (after virsh {}: the reboot may be under way; check the domain before trying again)",
                sent.join(", ")
            )));
        }
        other => other?,
    };
    let waited_ms = if sent.is_empty() {
        0
    } else {
        started.elapsed().as_millis() as u64
    };
    let summary = if sent.is_empty() {
        summary
    } else {
        format!("{summary} ({}; {waited_ms} ms)", sent.join(", "))
    };
    cx.log(&summary);
    Ok(Output {
        hypervisor: uri.to_owned(),
        domain: s.domain,
        op: s.op,
        state,
        sent,
        summary,
        waited_ms,
    })
}

/// One domain on one hypervisor, through `virsh`.
struct Virsh<'a> {
    program: std::path::PathBuf,
    uri: &'a str,
    domain: &'a str,
}

impl Virsh<'_> {
    /// Runs `virsh -c URI COMMAND --domain DOMAIN`; its stdout, or the
    /// error its messages mean.
    fn run(&self, cx: &Context<'_>, command: &str) -> Result<String, StepError> {
        let mut cmd = Command::new(&self.program);
        cmd.env_clear();
        // What `virsh` needs to reach a hypervisor (`ssh` for qemu+ssh://,
        // the user's key and known hosts, a session's runtime directory),
        // and messages in English, which `error` reads.
        for name in [
            "PATH",
            "HOME",
            "USER",
            "LOGNAME",
            "XDG_RUNTIME_DIR",
            "SSH_AUTH_SOCK",
        ] {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.env("LC_ALL", "C")
            .args(["--quiet", "-c", self.uri, command, "--domain", self.domain]);
        let done = process::run(cx, cmd, false, CALL_TIMEOUT, Duration::ZERO, 16 * 1024)?;
        match (done.stopped, done.status) {
            (Some(process::Stop::Cancelled), _) => Err(StepError::cancelled()),
            (Some(process::Stop::TimedOut), _) | (None, None) => {
                Err(StepError::retryable(format!(
                    "virsh {command} did not finish within {} s on {}",
                    CALL_TIMEOUT.as_secs(),
                    shown(self.uri)
                )))
            }
            (None, Some(status)) if status.success() => Ok(done.stdout),
            (None, Some(_)) => Err(error(self.uri, self.domain, command, &done.stderr)),
        }
    }

    /// `virsh domstate`: running, shut off, paused, in shutdown, …
    fn state(&self, cx: &Context<'_>) -> Result<String, StepError> {
        let out = self.run(cx, "domstate")?;
        let state = out.lines().map(str::trim).find(|l| !l.is_empty());
        state.map(str::to_owned).ok_or_else(|| {
            StepError::retryable(format!(
                "virsh domstate said nothing about {} on {}",
                self.domain,
                shown(self.uri)
            ))
        })
    }

    /// Runs a command that changes the domain, recording it in `sent`.
    fn change(
        &self,
        cx: &Context<'_>,
        command: &str,
        sent: &mut Vec<String>,
    ) -> Result<(), StepError> {
        cx.log(format_args!(
            "virsh {command} {} on {}",
            self.domain,
            shown(self.uri)
        ));
        let result = self.run(cx, command).map(|_| ());
        sent.push(command.to_owned());
        result
    }

    /// Starts a domain last seen in `state`. A domain someone else started
    /// meanwhile ("already active") is running, which is what was asked.
    fn start(
        &self,
        cx: &Context<'_>,
        state: &str,
        sent: &mut Vec<String>,
    ) -> Result<(), StepError> {
        if state != SHUT_OFF && state != "crashed" {
            return Err(StepError::fatal(format!(
                "{} on {} is {state}, not shut off: start does not resume or wake a domain (virsh resume or dompmwakeup does)",
                self.domain,
                shown(self.uri)
            )));
        }
        match self.change(cx, "start", sent) {
            Err(e) if e.message().contains("already active") => match self.state(cx)? {
                now if now == RUNNING => {
                    cx.log(format_args!("{} was started meanwhile", self.domain));
                    Ok(())
                }
                now => Err(StepError::fatal(format!(
                    "{} on {} is active but {now}, not running",
                    self.domain,
                    shown(self.uri)
                ))),
            },
            other => other,
        }
    }

    /// Asks the guest to shut down and waits `wait` for `shut off`; then,
    /// with `force`, destroys the domain, or fails naming the last state.
    fn shut_down(
        &self,
        cx: &Context<'_>,
        name: &str,
        state: &str,
        wait: Duration,
        force: bool,
        sent: &mut Vec<String>,
    ) -> Result<String, StepError> {
        let started = Instant::now();
        let refused = match self.change(cx, "shutdown", sent) {
            Ok(()) => None,
            // A guest that cannot take the request (a paused one, say) may
            // still be forced off.
            Err(StepError::Fatal(m)) if force && !cx.is_cancelled() => Some(m),
            Err(e) => return Err(e),
        };
        let last = if let Some(m) = refused {
            cx.log(format_args!("{m}: forcing it off"));
            state.to_owned()
        } else {
            match self.wait_shut_off(cx, started + wait)? {
                None => {
                    return Ok(format!(
                        "{name} shut down gracefully in {} ms",
                        started.elapsed().as_millis()
                    ));
                }
                Some(last) => last,
            }
        };
        if !force {
            return Err(StepError::fatal(format!(
                "{name} is still {last} {} ms after virsh shutdown: the guest did not shut down (give it longer with wait_ms, or force = true to destroy it after grace_ms)",
                started.elapsed().as_millis()
            )));
        }
        cx.log(format_args!(
            "{name} is still {last} {} ms after virsh shutdown: destroying it",
            started.elapsed().as_millis()
        ));
        self.change(cx, "destroy", sent)?;
        Ok(format!(
            "{name} did not shut down within the grace of {} ms and was destroyed (forced off)",
            wait.as_millis()
        ))
    }

    /// Reads `domstate` until it says `shut off` (None) or `deadline`
    /// comes (the last state seen), backing off from 0.5 s to 5 s, the
    /// last read at the deadline. A transient domain is gone once it has
    /// shut down: "no domain" counts as shut off. Other failed reads are
    /// logged and tried again.
    fn wait_shut_off(
        &self,
        cx: &Context<'_>,
        deadline: Instant,
    ) -> Result<Option<String>, StepError> {
        let mut delay = Duration::from_millis(500);
        let mut last = String::from("(not read yet)");
        loop {
            match self.state(cx) {
                Ok(state) if state == SHUT_OFF => return Ok(None),
                Ok(state) => last = state,
                Err(e) if e.message().starts_with("there is no domain") => {
                    cx.log(format_args!("{} is gone (a transient domain)", self.domain));
                    return Ok(None);
                }
                Err(e) if cx.is_cancelled() => return Err(e),
                Err(e) => cx.log(format_args!("{}", e.message())),
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Some(last));
            }
            cx.sleep(delay.min(deadline - now))?;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// What a failed `virsh` run means, from its messages.
fn error(uri: &str, domain: &str, command: &str, stderr: &str) -> StepError {
    let said: Vec<&str> = stderr
        .lines()
        .map(|l| l.trim().trim_start_matches("error: ").trim())
        .filter(|l| !l.is_empty())
        .collect();
    let said = said.join("; ");
    let lower = said.to_ascii_lowercase();
    let at = shown(uri);
    let denied = [
        "permission denied",
        "authentication failed",
        "access denied",
    ]
    .iter()
    .any(|m| lower.contains(m));
    if denied {
        StepError::fatal(format!(
            "permission denied on the hypervisor {at}: the user this step runs as may not manage domains there (for qemu:///system: root or the libvirt group; over SSH: the key and the remote user) ({said})"
        ))
    } else if lower.contains("failed to connect to the hypervisor") {
        StepError::retryable(format!("cannot reach the hypervisor {at}: {said}"))
    } else if lower.contains("failed to get domain") || lower.contains("domain not found") {
        StepError::fatal(format!(
            "there is no domain {domain} on the hypervisor {at} (virsh -c {at} list --all lists them)"
        ))
    } else if command == "domstate" {
        StepError::retryable(format!(
            "the hypervisor {at} did not say the state of {domain}: {said}"
        ))
    } else {
        StepError::fatal(format!(
            "the hypervisor {at} refused virsh {command} {domain}: {said}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_hypervisors_are_allowed() {
        let list =
            "qemu:///system, qemu+ssh://root@kvm-1/system?keyfile=/etc/troupe/id\n test:///default";
        assert_eq!(allowed(list, "qemu:///system/").unwrap(), "qemu:///system");
        assert_eq!(allowed(list, "test:///default").unwrap(), "test:///default");
        assert!(allowed(list, "qemu+ssh://root@kvm-1/system").is_err());
        let err = allowed(list, "qemu+ssh://root@kvm-2/system?no_verify=1").unwrap_err();
        assert!(
            err.contains("qemu+ssh://root@kvm-2/system ") && err.contains("--var hypervisors"),
            "{err}"
        );
        assert!(!err.contains("no_verify"), "{err}");
        assert!(allowed("", "test:///default").is_err());
    }

    #[test]
    fn domain_names_are_never_options() {
        for good in [
            "web-1",
            "db.example",
            "c0ffee00-1111-2222-3333-444455556666",
        ] {
            assert!(check_domain(good).is_ok(), "{good}");
        }
        for bad in ["", "-h", "--all", "a b", "a;b", "a'b", "a\\b"] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn virsh_messages_are_told_apart() {
        let msg = |stderr: &str, command: &str| {
            let e = error(
                "qemu+ssh://root@kvm-1/system?keyfile=/k",
                "web",
                command,
                stderr,
            );
            (matches!(e, StepError::Retryable(_)), e.message().to_owned())
        };
        let (retry, m) = msg(
            "error: failed to connect to the hypervisor\nerror: Cannot recv data: root@kvm-1: Permission denied (publickey,password).: Connection reset by peer\n",
            "domstate",
        );
        assert!(
            !retry
                && m.starts_with(
                    "permission denied on the hypervisor qemu+ssh://root@kvm-1/system:"
                ),
            "{m}"
        );
        assert!(!m.contains("keyfile"), "{m}");
        let (retry, m) = msg(
            "error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/var/run/libvirt/libvirt-sock': Permission denied\n",
            "domstate",
        );
        assert!(!retry && m.starts_with("permission denied"), "{m}");
        let (retry, m) = msg(
            "error: failed to connect to the hypervisor\nerror: unable to connect to server at 'kvm-1:22': Connection refused\n",
            "domstate",
        );
        assert!(
            retry
                && m.starts_with(
                    "cannot reach the hypervisor qemu+ssh://root@kvm-1/system: failed to connect"
                ),
            "{m}"
        );
        let (retry, m) = msg("error: failed to get domain 'web'\n", "domstate");
        assert!(
            !retry && m.starts_with("there is no domain web on the hypervisor"),
            "{m}"
        );
        let (retry, m) = msg(
            "error: access denied: 'domain:start' denied by the hypervisor's ACL\n",
            "start",
        );
        assert!(!retry && m.starts_with("permission denied"), "{m}");
        let (retry, m) = msg(
            "error: Failed to start domain 'web'\nerror: internal error: no disk\n",
            "start",
        );
        assert!(
            !retry
                && m.ends_with(
                    "refused virsh start web: Failed to start domain 'web'; internal error: no disk"
                ),
            "{m}"
        );
    }
}
