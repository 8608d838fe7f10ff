//! The `power` kind over IPMI v2.0 (RMCP+, `lanplus`), by running
//! `ipmitool` with argv.
//!
//! Why `ipmitool` and not a crate: IPMI over LAN is a protocol of many BMC
//! quirks (cipher suite negotiation, vendors' RAKP variants, session
//! sequence bugs), and `ipmitool` is what Ironic and MAAS drive, packaged by
//! every distribution and met daily against real hardware. The Rust crates
//! (`ipmi-rs`, `rust-ipmi`) are young, carry RMCP+ as a recent addition and
//! have been run against few BMCs. The cost is a program to install where
//! the step runs, and a process per call.
//!
//! The password reaches `ipmitool` in its environment (`-E` reads
//! `IPMI_PASSWORD`), never in its argv (which `ps` shows to every user) or
//! a file; its environment holds nothing else. `ipmitool`'s messages are
//! read to tell a wrong password from an unreachable BMC.

use std::process::Command;
use std::time::{Duration, Instant};

use troupe_sdk::{Context, StepError};

use crate::process;
use crate::reboot::{self, PowerControl};
use crate::redfish::{Output, Settings, Waited, wait_for_state};

/// Each `ipmitool` run's limit (it retries a lost packet itself).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// An IPMI BMC and how to log in to it.
struct Ipmitool<'a> {
    program: std::path::PathBuf,
    /// `ipmi://host[:port]`, for messages.
    url: &'a str,
    host: String,
    port: u16,
    user: &'a str,
    password: &'a str,
    cipher: u8,
}

pub(crate) fn power(
    cx: &Context<'_>,
    s: &Settings,
    url: &str,
    cipher: u8,
) -> Result<Output, StepError> {
    let Some((user, password)) = s.credentials.split_once(':') else {
        return Err(StepError::fatal(
            "the BMC credentials (the secret bmc_credentials) must be user:password",
        ));
    };
    let (host, port) = host_port(url)?;
    let ipmi = Ipmitool {
        program: process::find_program("ipmitool", "ipmitool")?,
        url,
        host,
        port,
        user,
        password,
        cipher,
    };
    let state = ipmi.power_state(cx)?;
    cx.log(format_args!("{url}: chassis power is {state}"));
    let done = |power_state: String, command: Option<&str>, summary: String, waited: u64| {
        cx.log(&summary);
        Ok(Output {
            bmc: url.to_owned(),
            system: String::new(),
            op: s.op.clone(),
            power_state,
            reset_type: command.map(|c| format!("chassis power {c}")),
            summary,
            waited_ms: waited,
        })
    };
    if s.op == "reboot" {
        let (grace, wait) = (
            Duration::from_millis(s.grace_ms),
            Duration::from_millis(s.wait_ms),
        );
        let r = reboot::reboot(cx, url, &ipmi, &state, grace, wait)?;
        cx.log(&r.summary);
        return Ok(Output {
            bmc: url.to_owned(),
            system: String::new(),
            op: s.op.clone(),
            power_state: r.state,
            reset_type: Some(r.sent.join(", ")),
            summary: r.summary,
            waited_ms: r.waited_ms,
        });
    }
    let expected = match s.op.as_str() {
        "status" => return done(state.clone(), None, format!("{url} is {state}"), 0),
        "on" | "cycle" | "reset" => "On",
        "off" | "soft_off" => "Off",
        other => {
            return Err(StepError::fatal(format!(
                "unknown power op `{other}`: use on, off, soft_off, cycle, reset, reboot or status"
            )));
        }
    };
    if matches!(s.op.as_str(), "on" | "off" | "soft_off") && state == expected {
        return done(
            state,
            None,
            format!("{url} is already {expected}: no command sent"),
            0,
        );
    }
    let command = match s.op.as_str() {
        // Cycling or resetting a server that is off powers it on.
        "cycle" | "reset" if state == "Off" => {
            cx.log(format_args!("{url} is Off: powering it on instead"));
            "on"
        }
        "on" => "on",
        "off" => "off",
        "soft_off" => "soft",
        "cycle" => "cycle",
        _ => "reset",
    };
    cx.log(format_args!("sending chassis power {command} to {url}"));
    let started = Instant::now();
    ipmi.control(cx, command)?;
    let deadline = started + Duration::from_millis(s.wait_ms);
    let read = || ipmi.power_state(cx);
    let last = match wait_for_state(cx, read, expected, deadline)? {
        Waited::Reached(state) => state,
        Waited::StillAt(last) => {
            return Err(StepError::fatal(format!(
                "{url} accepted chassis power {command} but its power is still {last} after {} ms, not {expected}",
                started.elapsed().as_millis()
            )));
        }
    };
    let waited = started.elapsed().as_millis() as u64;
    done(
        last,
        Some(command),
        format!("{url} is {expected} after chassis power {command} ({waited} ms)"),
        waited,
    )
}

/// `ipmi://host[:port]` (`[v6]:port` for IPv6) → host and port (623).
fn host_port(url: &str) -> Result<(String, u16), StepError> {
    let bad = || {
        StepError::fatal(format!(
            "the BMC {url} is not ipmi://HOST or ipmi://HOST:PORT"
        ))
    };
    let rest = url.strip_prefix("ipmi://").ok_or_else(bad)?;
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host.starts_with('-') {
        return Err(bad());
    }
    let port = match port {
        None => 623,
        Some(p) => p.parse().map_err(|_| bad())?,
    };
    Ok((host.to_owned(), port))
}

impl Ipmitool<'_> {
    /// Runs `ipmitool … chassis power ARG`; its stdout, or the error.
    fn chassis_power(&self, cx: &Context<'_>, arg: &str) -> Result<String, StepError> {
        let mut cmd = Command::new(&self.program);
        cmd.env_clear()
            .env("IPMI_PASSWORD", self.password)
            .args(["-I", "lanplus", "-H", &self.host])
            .args(["-p", &self.port.to_string()])
            .args(["-C", &self.cipher.to_string()])
            .args(["-U", self.user, "-E"])
            // Two tries of a lost packet, 2 s apart; -v names why a session failed.
            .args(["-N", "2", "-R", "2", "-v", "chassis", "power", arg]);
        let done = process::run(cx, cmd, false, CALL_TIMEOUT, Duration::ZERO, 16 * 1024)?;
        match (done.stopped, done.status) {
            (Some(process::Stop::Cancelled), _) => Err(StepError::cancelled()),
            (Some(process::Stop::TimedOut), _) | (None, None) => {
                Err(StepError::retryable(format!(
                    "ipmitool did not answer about {} within {} s",
                    self.url,
                    CALL_TIMEOUT.as_secs()
                )))
            }
            (None, Some(status)) if status.success() => Ok(done.stdout),
            (None, Some(_)) => Err(self.error(arg, &done.stderr)),
        }
    }

    /// What a failed run means, from `ipmitool`'s messages.
    fn error(&self, arg: &str, stderr: &str) -> StepError {
        let url = self.url;
        let said: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty()
                    && !l.starts_with("Loading IANA")
                    && !l.starts_with("Running Get VSO")
                    && !l.starts_with("Discovered IPMB")
                    && !l.contains("Invalid completion code received: Invalid command")
            })
            .collect();
        // Never echo the password, whatever a program says.
        let said = said.join("; ").replace(self.password, "***");
        if said.contains("RAKP 2 HMAC is invalid") {
            StepError::fatal(format!(
                "the BMC {url} refused the password for user {}: check the secret bmc_credentials",
                self.user
            ))
        } else if said.contains("unauthorized name") {
            StepError::fatal(format!(
                "the BMC {url} does not know the user {}: check the secret bmc_credentials",
                self.user
            ))
        } else if said.contains("privilege") {
            StepError::fatal(format!(
                "the BMC {url} did not allow chassis power {arg} to user {}: it needs the operator or administrator privilege ({said})",
                self.user
            ))
        } else if said.contains("Unable to establish")
            || said.contains("Get Auth Capabilities error")
            || said.contains("no response")
        {
            StepError::retryable(format!("cannot reach the BMC {url} over IPMI: {said}"))
        } else if arg == "status" {
            StepError::retryable(format!("the BMC {url} did not say its power state: {said}"))
        } else {
            StepError::fatal(format!("the BMC {url} refused chassis power {arg}: {said}"))
        }
    }

    /// "On" or "Off".
    fn power_state(&self, cx: &Context<'_>) -> Result<String, StepError> {
        let out = self.chassis_power(cx, "status")?;
        let line = out
            .lines()
            .find(|l| l.starts_with("Chassis Power is"))
            .unwrap_or("");
        match line.trim_start_matches("Chassis Power is").trim() {
            "on" => Ok("On".to_owned()),
            "off" => Ok("Off".to_owned()),
            _ => Err(StepError::retryable(format!(
                "the BMC {} answered chassis power status with {:?}",
                self.url,
                out.trim()
            ))),
        }
    }

    /// Sends a chassis control. Once sent, nothing is retried: it may have
    /// been done.
    fn control(&self, cx: &Context<'_>, command: &str) -> Result<(), StepError> {
        self.chassis_power(cx, command).map(|_| ()).map_err(|e| match e {
            StepError::Retryable(m) => StepError::fatal(format!(
                "{m} (chassis power {command} may or may not have been done: check the server before trying again)"
            )),
            other => other,
        })
    }
}

impl PowerControl for Ipmitool<'_> {
    fn state(&self, cx: &Context<'_>) -> Result<String, StepError> {
        self.power_state(cx)
    }

    fn send(&self, cx: &Context<'_>, op: &str) -> Result<String, StepError> {
        let command = match op {
            "soft_off" => "soft",
            "off" => "off",
            _ => "on",
        };
        cx.log(format_args!(
            "sending chassis power {command} to {}",
            self.url
        ));
        self.control(cx, command)?;
        Ok(format!("chassis power {command}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_give_host_and_port() {
        assert_eq!(
            host_port("ipmi://10.0.0.7").unwrap(),
            ("10.0.0.7".to_owned(), 623)
        );
        assert_eq!(
            host_port("ipmi://127.0.0.1:6230").unwrap(),
            ("127.0.0.1".to_owned(), 6230)
        );
        assert_eq!(
            host_port("ipmi://[fd00::7]:624").unwrap(),
            ("fd00::7".to_owned(), 624)
        );
        assert!(host_port("ipmi://-oops").is_err());
        assert!(host_port("ipmi://host:port").is_err());
    }
}
