//! `bmc_power`: power a server on or off, cycle or reset it, or read its
//! power state, through its BMC's Redfish API (or, for an `ipmi://` BMC,
//! over IPMI: `ipmi.rs`).
//!
//! The reset type is chosen from what the BMC advertises for
//! `ComputerSystem.Reset`; a returned Task is followed; then `PowerState`
//! is read, with backoff, until it is the state asked for or `wait_ms` has
//! passed. `on` for a server that is on (and `off`, `soft_off` for one that
//! is off) sends nothing. Errors are retryable only before a reset is sent.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use troupe_sdk::{Context, StepError, StepInput};

use crate::bmcs::{self, Protocol};
use crate::{ipmi, reboot, tls};

#[derive(Deserialize)]
pub(crate) struct Settings {
    /// on, off, soft_off, cycle, reset or status.
    pub(crate) op: String,
    /// The BMC's Redfish base URL: `https://host[:port]`.
    pub(crate) bmc: String,
    /// The Systems member id; empty: the BMC's only one.
    #[serde(default)]
    pub(crate) system: String,
    /// How long to wait for the power state to follow a reset.
    #[serde(default = "default_wait")]
    pub(crate) wait_ms: u64,
    /// `reboot`: how long a graceful shutdown may take before the server
    /// is forced off.
    #[serde(default = "default_grace")]
    pub(crate) grace_ms: u64,
    /// The BMCs the deployment allows (see `bmcs`).
    pub(crate) bmcs: String,
    /// `user:password`.
    pub(crate) credentials: String,
}

fn default_wait() -> u64 {
    300_000
}

fn default_grace() -> u64 {
    120_000
}

#[derive(Serialize)]
pub(crate) struct Output {
    pub(crate) bmc: String,
    /// The Redfish system; empty over IPMI.
    pub(crate) system: String,
    pub(crate) op: String,
    /// The power state at the end: On or Off.
    pub(crate) power_state: String,
    /// The `ResetType` sent (IPMI: the `chassis power` command), if one was.
    pub(crate) reset_type: Option<String>,
    /// What happened, in a sentence.
    pub(crate) summary: String,
    pub(crate) waited_ms: u64,
}

/// Each HTTP call's limit.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn power(cx: &Context<'_>, input: StepInput<Settings>) -> Result<Output, StepError> {
    let s = input.settings;
    let bmc = bmcs::find(&s.bmcs, &s.bmc).map_err(StepError::fatal)?;
    let trust = match bmc.protocol {
        Protocol::Redfish(trust) => trust,
        Protocol::Ipmi { cipher } => return ipmi::power(cx, &s, &bmc.url, cipher),
    };
    let Some((user, password)) = s.credentials.split_once(':') else {
        return Err(StepError::fatal(
            "the BMC credentials (the secret bmc_credentials) must be user:password",
        ));
    };
    let client = Client {
        agent: tls::agent(&trust, CALL_TIMEOUT),
        base: bmc.url.clone(),
        authorization: format!("Basic {}", base64(format!("{user}:{password}").as_bytes())),
    };
    let system = client.system(&s.system)?;
    let state = power_state(&system.body);
    cx.log(format_args!(
        "{} at {}: PowerState {state}",
        system.id, client.base
    ));
    let done = |power_state: String, reset_type: Option<String>, summary: String, waited: u64| {
        cx.log(&summary);
        Ok(Output {
            bmc: client.base.clone(),
            system: system.id.clone(),
            op: s.op.clone(),
            power_state,
            reset_type,
            summary,
            waited_ms: waited,
        })
    };
    if s.op == "reboot" {
        let (target, allowed) = client.reset_action(&system)?;
        let control = Control {
            client: &client,
            system: &system,
            target,
            allowed,
            wait: Duration::from_millis(s.wait_ms),
        };
        let grace = Duration::from_millis(s.grace_ms);
        let r = reboot::reboot(cx, &system.id, &control, &state, grace, control.wait)?;
        return done(r.state, Some(r.sent.join(", ")), r.summary, r.waited_ms);
    }
    let expected = match s.op.as_str() {
        "status" => return done(state.clone(), None, format!("{} is {state}", system.id), 0),
        "on" | "cycle" | "reset" => "On",
        "off" | "soft_off" => "Off",
        other => {
            return Err(StepError::fatal(format!(
                "unknown power op `{other}`: use on, off, soft_off, cycle, reset, reboot or status"
            )));
        }
    };
    // Idempotent by design: a server already in the state asked for is left alone.
    if matches!(s.op.as_str(), "on" | "off" | "soft_off") && state == expected {
        return done(
            state,
            None,
            format!("{} is already {expected}: no reset sent", system.id),
            0,
        );
    }
    // Cycling or resetting a server that is off powers it on (as Ironic's reboot does).
    let op = if matches!(s.op.as_str(), "cycle" | "reset") && state == "Off" {
        cx.log(format_args!("{} is Off: powering it on instead", system.id));
        "on"
    } else {
        s.op.as_str()
    };
    let (target, allowed) = client.reset_action(&system)?;
    let reset_type = choose_reset(op, allowed.as_deref())
        .map_err(|e| StepError::fatal(format!("{} at {}: {e}", system.id, client.base)))?;
    cx.log(format_args!("sending ResetType {reset_type} to {target}"));
    let started = Instant::now();
    let deadline = started + Duration::from_millis(s.wait_ms);
    let task = client.reset(&target, reset_type)?;
    if let Some(task) = task {
        client.follow_task(cx, &task, deadline)?;
    }
    let read = || {
        client
            .get(&system.path, "reading the power state")
            .map(|body| power_state(&body))
    };
    let last = match wait_for_state(cx, read, expected, deadline)? {
        Waited::Reached(state) => state,
        Waited::StillAt(last) => {
            return Err(StepError::fatal(format!(
                "{} at {} accepted ResetType {reset_type} but its PowerState is still {last} after {} ms, not {expected}",
                system.id,
                client.base,
                started.elapsed().as_millis()
            )));
        }
    };
    let waited = started.elapsed().as_millis() as u64;
    done(
        last,
        Some(reset_type.to_owned()),
        format!(
            "{} is {expected} after ResetType {reset_type} ({waited} ms)",
            system.id
        ),
        waited,
    )
}

/// One system's resets, for `reboot`.
struct Control<'a> {
    client: &'a Client,
    system: &'a System,
    target: String,
    allowed: Option<Vec<String>>,
    wait: Duration,
}

impl reboot::PowerControl for Control<'_> {
    fn state(&self, _: &Context<'_>) -> Result<String, StepError> {
        self.client
            .get(&self.system.path, "reading the power state")
            .map(|body| power_state(&body))
    }

    fn send(&self, cx: &Context<'_>, op: &str) -> Result<String, StepError> {
        let reset_type = choose_reset(op, self.allowed.as_deref()).map_err(|e| {
            StepError::fatal(format!("{} at {}: {e}", self.system.id, self.client.base))
        })?;
        cx.log(format_args!(
            "sending ResetType {reset_type} to {}",
            self.target
        ));
        if let Some(task) = self.client.reset(&self.target, reset_type)? {
            self.client
                .follow_task(cx, &task, Instant::now() + self.wait)?;
        }
        Ok(reset_type.to_owned())
    }
}

#[derive(Debug, PartialEq)]
pub(crate) enum Waited {
    Reached(String),
    /// The deadline came; the last state seen.
    StillAt(String),
}

/// Reads the power state until it is `expected` or the deadline comes,
/// backing off from 0.5 s to 5 s; `Err` only when the step is cancelled. A
/// read that fails is logged and tried again: a BMC may be busy while it
/// resets.
pub(crate) fn wait_for_state(
    cx: &Context<'_>,
    mut read: impl FnMut() -> Result<String, StepError>,
    expected: &str,
    deadline: Instant,
) -> Result<Waited, StepError> {
    let mut delay = Duration::from_millis(500);
    let mut last = String::from("(not read yet)");
    loop {
        match read() {
            Ok(state) if state == expected => return Ok(Waited::Reached(state)),
            Ok(state) => last = state,
            Err(e) => cx.log(format_args!("{}", e.message())),
        }
        if Instant::now() + delay > deadline {
            return Ok(Waited::StillAt(last));
        }
        cx.sleep(delay)?;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The reset type for `op`, the first of its choices that the BMC allows
/// (any, when it does not say).
fn choose_reset(op: &str, allowed: Option<&[String]>) -> Result<&'static str, String> {
    let choices: &[&'static str] = match op {
        "on" => &["On", "ForceOn"],
        "off" => &["ForceOff"],
        "soft_off" => &["GracefulShutdown"],
        "cycle" => &["PowerCycle", "ForceRestart"],
        "reset" => &["ForceRestart"],
        _ => return Err(format!("no reset type for `{op}`")),
    };
    let Some(allowed) = allowed else {
        return Ok(choices[0]);
    };
    choices
        .iter()
        .find(|c| allowed.iter().any(|a| a == *c))
        .copied()
        .ok_or_else(|| {
            format!(
                "the BMC does not allow {} for `{op}`; it allows {}",
                choices.join(" or "),
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            )
        })
}

fn power_state(system: &Value) -> String {
    system["PowerState"]
        .as_str()
        .unwrap_or("(not given)")
        .to_owned()
}

struct System {
    id: String,
    path: String,
    body: Value,
}

struct Client {
    agent: ureq::Agent,
    base: String,
    authorization: String,
}

impl Client {
    /// `path` (an `@odata.id`) as a URL on this BMC; anything pointing
    /// elsewhere is refused, so the credentials go nowhere else.
    fn url(&self, path: &str) -> Result<String, StepError> {
        if path.starts_with('/') {
            Ok(format!("{}{path}", self.base))
        } else if path.starts_with(&format!("{}/", self.base)) {
            Ok(path.to_owned())
        } else {
            Err(StepError::fatal(format!(
                "the BMC {} pointed to {path}, which is not on it",
                self.base
            )))
        }
    }

    fn transport_error(&self, what: &str, e: ureq::Error) -> StepError {
        let text = e.to_string();
        let tls = matches!(e, ureq::Error::Tls(_) | ureq::Error::Rustls(_))
            || text.contains("certificate")
            || text.contains("Certificate");
        if tls {
            StepError::fatal(format!(
                "{what}: TLS to the BMC {} failed: {text} (a self-signed certificate can be pinned in the server's --var bmc_trust: URL=sha256:FINGERPRINT)",
                self.base
            ))
        } else {
            StepError::retryable(format!(
                "{what}: cannot reach the BMC {}: {text}",
                self.base
            ))
        }
    }

    /// Sends a request; returns the status, the Location header and the body.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<(u16, Option<String>, String), StepError> {
        let url = self.url(path)?;
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", &self.authorization)
            .header("accept", "application/json")
            .header("content-type", "application/json");
        let req = req
            .body(body.map(|b| b.to_string()).unwrap_or_default())
            .map_err(|e| StepError::fatal(format!("{what}: invalid request to {url}: {e}")))?;
        let mut resp = self
            .agent
            .run(req)
            .map_err(|e| self.transport_error(what, e))?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string()
            .unwrap_or_default();
        if (200..300).contains(&status) {
            return Ok((status, location, text));
        }
        let detail = redfish_message(&text);
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        };
        Err(match status {
            401 => StepError::fatal(format!(
                "{what}: the BMC {} refused the credentials (401 Unauthorized): check the secret bmc_credentials{detail}",
                self.base
            )),
            403 => StepError::fatal(format!(
                "{what}: the BMC {} did not allow it (403 Forbidden): the user in bmc_credentials lacks the privilege{detail}",
                self.base
            )),
            429 | 500.. => StepError::retryable(format!(
                "{what}: the BMC {} answered {status}{detail}",
                self.base
            )),
            _ => StepError::fatal(format!(
                "{what}: the BMC {} answered {status} for {method} {url}{detail}",
                self.base
            )),
        })
    }

    fn get(&self, path: &str, what: &str) -> Result<Value, StepError> {
        let (_, _, text) = self.send("GET", path, None, what)?;
        serde_json::from_str(&text).map_err(|e| {
            StepError::fatal(format!(
                "{what}: the BMC {} answered {path} with something that is not JSON: {e}",
                self.base
            ))
        })
    }

    /// The system to act on: the one named, or the only one.
    fn system(&self, wanted: &str) -> Result<System, StepError> {
        let systems = self.get("/redfish/v1/Systems", "listing the systems")?;
        let members: Vec<(String, String)> = systems["Members"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m["@odata.id"].as_str())
            .map(|path| {
                let path = path.trim_end_matches('/');
                let id = path.rsplit('/').next().unwrap_or(path);
                (id.to_owned(), path.to_owned())
            })
            .collect();
        let ids = || {
            members
                .iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (id, path) = if wanted.is_empty() {
            match members.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(StepError::fatal(format!(
                        "the BMC {} lists no systems",
                        self.base
                    )));
                }
                _ => {
                    return Err(StepError::fatal(format!(
                        "the BMC {} has {} systems ({}): say which with the param system",
                        self.base,
                        members.len(),
                        ids()
                    )));
                }
            }
        } else {
            members
                .iter()
                .find(|(id, _)| id == wanted)
                .cloned()
                .ok_or_else(|| {
                    StepError::fatal(format!(
                        "the BMC {} has no system {wanted}; it has {}",
                        self.base,
                        ids()
                    ))
                })?
        };
        let body = self.get(&path, "reading the system")?;
        Ok(System { id, path, body })
    }

    /// The reset action's target and the reset types the BMC allows (None:
    /// it does not say, so any).
    fn reset_action(&self, system: &System) -> Result<(String, Option<Vec<String>>), StepError> {
        let action = &system.body["Actions"]["#ComputerSystem.Reset"];
        let target = action["target"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}/Actions/ComputerSystem.Reset", system.path));
        let strings = |v: &Value| {
            v.as_array().map(|list| {
                list.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect::<Vec<_>>()
            })
        };
        if let Some(allowed) = strings(&action["ResetType@Redfish.AllowableValues"]) {
            return Ok((target, Some(allowed)));
        }
        if let Some(info) = action["@Redfish.ActionInfo"].as_str() {
            let info = self.get(info, "reading the reset action's parameters")?;
            let allowed = info["Parameters"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["Name"] == "ResetType"))
                .and_then(|p| strings(&p["AllowableValues"]));
            return Ok((target, allowed));
        }
        Ok((target, None))
    }

    /// Posts the reset; returns the Task to follow, if the BMC started one.
    /// Whatever goes wrong here is fatal: the reset may have been done.
    fn reset(&self, target: &str, reset_type: &str) -> Result<Option<String>, StepError> {
        let body = serde_json::json!({ "ResetType": reset_type });
        let (status, location, text) = self
            .send("POST", target, Some(&body), "sending the reset")
            .map_err(|e| match e {
                StepError::Retryable(m) => StepError::fatal(format!(
                    "{m} (the reset may or may not have been done: check the server before trying again)"
                )),
                other => other,
            })?;
        if status != 202 {
            return Ok(None);
        }
        let from_body = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|b| b["@odata.id"].as_str().map(str::to_owned));
        Ok(location.or(from_body))
    }

    /// Waits for a Task to end; fails if it ends other than Completed.
    fn follow_task(
        &self,
        cx: &Context<'_>,
        task: &str,
        deadline: Instant,
    ) -> Result<(), StepError> {
        cx.log(format_args!("following the BMC's task {task}"));
        let mut delay = Duration::from_millis(500);
        loop {
            let body = self.get(task, "reading the reset's task")?;
            let state = body["TaskState"].as_str().unwrap_or("");
            match state {
                "Completed" => return Ok(()),
                "Exception" | "Killed" | "Cancelled" => {
                    let messages: Vec<&str> = body["Messages"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|m| m["Message"].as_str())
                        .collect();
                    return Err(StepError::fatal(format!(
                        "the BMC {}'s reset task {task} ended {state}: {}",
                        self.base,
                        messages.join("; ")
                    )));
                }
                _ => {}
            }
            if Instant::now() + delay > deadline {
                return Err(StepError::fatal(format!(
                    "the BMC {}'s reset task {task} is still {state} at the deadline",
                    self.base
                )));
            }
            cx.sleep(delay)?;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// A Redfish error body's messages: `error.message` and each
/// `error.@Message.ExtendedInfo[].Message`.
fn redfish_message(body: &str) -> String {
    let Ok(json) = serde_json::from_str::<Value>(body) else {
        return String::new();
    };
    let error = &json["error"];
    let mut parts: Vec<&str> = error["message"].as_str().into_iter().collect();
    for info in error["@Message.ExtendedInfo"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if let Some(m) = info["Message"].as_str()
            && !parts.contains(&m)
        {
            parts.push(m);
        }
    }
    parts.join("; ")
}

/// Standard base64, for the Basic authorization header.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_types_come_from_what_the_bmc_allows() {
        let sushy: Vec<String> = ["On", "ForceOff", "GracefulShutdown", "ForceRestart"]
            .map(String::from)
            .to_vec();
        assert_eq!(choose_reset("on", Some(&sushy)), Ok("On"));
        assert_eq!(
            choose_reset("soft_off", Some(&sushy)),
            Ok("GracefulShutdown")
        );
        // No PowerCycle: a forced restart instead.
        assert_eq!(choose_reset("cycle", Some(&sushy)), Ok("ForceRestart"));
        let with_cycle = vec!["PowerCycle".to_owned(), "ForceRestart".to_owned()];
        assert_eq!(choose_reset("cycle", Some(&with_cycle)), Ok("PowerCycle"));
        assert_eq!(choose_reset("off", None), Ok("ForceOff"));
        let err = choose_reset("off", Some(&with_cycle)).unwrap_err();
        assert_eq!(
            err,
            "the BMC does not allow ForceOff for `off`; it allows PowerCycle, ForceRestart"
        );
    }

    #[test]
    fn redfish_error_bodies_give_their_messages() {
        let body = r#"{"error": {"code": "Base.1.0.GeneralError", "message": "A general error has occurred.",
            "@Message.ExtendedInfo": [{"MessageId": "Base.1.8.ActionParameterNotSupported",
            "Message": "The parameter ResetType for the action ComputerSystem.Reset is not supported on the target resource."}]}}"#;
        assert_eq!(
            redfish_message(body),
            "A general error has occurred.; The parameter ResetType for the action ComputerSystem.Reset is not supported on the target resource."
        );
        assert_eq!(redfish_message("<html>"), "");
    }

    #[test]
    fn a_state_that_never_changes_fails_at_the_deadline_with_the_last_one_seen() {
        let cx = Context::detached();
        let reads = std::cell::Cell::new(0);
        let read = || {
            reads.set(reads.get() + 1);
            Ok("On".to_owned())
        };
        let started = Instant::now();
        let deadline = started + Duration::from_millis(1200);
        assert_eq!(
            wait_for_state(&cx, read, "Off", deadline).unwrap(),
            Waited::StillAt("On".to_owned())
        );
        // Read at 0, 0.5 s and 1.5 s would pass the deadline: two reads, then it gives up.
        assert_eq!(reads.get(), 2);
        assert!(started.elapsed() < Duration::from_millis(1200));
    }

    #[test]
    fn a_failing_read_is_tried_again_until_the_state_comes() {
        let cx = Context::detached();
        let mut reads = 0;
        let read = || {
            reads += 1;
            match reads {
                1 => Err(StepError::retryable("busy")),
                2 => Ok("Off".to_owned()),
                _ => Ok("On".to_owned()),
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = wait_for_state(&cx, read, "On", deadline).unwrap();
        assert_eq!(got, Waited::Reached("On".to_owned()));
        assert_eq!(reads, 3);
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b"admin:pw"), "YWRtaW46cHc=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"abc"), "YWJj");
    }
}
