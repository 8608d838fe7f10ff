//! `wait_tcp`: wait until a host:port accepts TCP connections, for example
//! until a rebooted server's SSH is back.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use troupe_sdk::{Context, StepError, StepInput};

#[derive(Deserialize)]
pub(crate) struct Settings {
    host: String,
    /// A number, or a string holding one (params often arrive as strings).
    port: serde_json::Value,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_interval")]
    interval_ms: u64,
}

fn default_timeout() -> u64 {
    300_000
}

fn default_interval() -> u64 {
    1000
}

#[derive(Serialize)]
pub(crate) struct Output {
    address: String,
    waited_ms: u64,
    tries: u32,
}

pub(crate) fn wait_tcp(cx: &Context<'_>, input: StepInput<Settings>) -> Result<Output, StepError> {
    let s = input.settings;
    let port: u16 = match &s.port {
        serde_json::Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        serde_json::Value::String(p) => p.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| {
        StepError::fatal(format!(
            "port must be a number from 0 to 65535, got {}",
            s.port
        ))
    })?;
    let address = format!("{}:{port}", s.host);
    let started = Instant::now();
    let deadline = started + Duration::from_millis(s.timeout_ms);
    let mut tries = 0;
    let mut last_error = String::new();
    loop {
        tries += 1;
        match (s.host.as_str(), port).to_socket_addrs() {
            Ok(addrs) => {
                for addr in addrs {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(10));
                    match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
                        Ok(_) => {
                            return Ok(Output {
                                address,
                                waited_ms: started.elapsed().as_millis() as u64,
                                tries,
                            });
                        }
                        Err(e) => last_error = e.to_string(),
                    }
                }
            }
            Err(e) => last_error = format!("cannot resolve {}: {e}", s.host),
        }
        if Instant::now() + Duration::from_millis(s.interval_ms) > deadline {
            return Err(StepError::retryable(format!(
                "{address} did not accept a connection within {} ms ({tries} tries, last error: {last_error})",
                s.timeout_ms
            )));
        }
        cx.sleep(Duration::from_millis(s.interval_ms))?;
    }
}
