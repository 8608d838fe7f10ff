//! `http_request`: call an HTTP endpoint and check its status; the response
//! becomes the step's output for later steps to use.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use troupe_sdk::{Context, StepError, StepInput};

#[derive(Deserialize)]
pub(crate) struct Settings {
    #[serde(default = "get")]
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// A string is sent as is; any other JSON value is sent as JSON.
    #[serde(default)]
    body: Option<serde_json::Value>,
    /// The statuses that count as success; default: any 2xx.
    #[serde(default)]
    expect_status: Option<Vec<u16>>,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
}

fn get() -> String {
    "GET".to_owned()
}

fn default_timeout() -> u64 {
    30_000
}

#[derive(Serialize)]
pub(crate) struct Output {
    status: u16,
    headers: BTreeMap<String, String>,
    /// The body parsed as JSON when it is JSON, else as text.
    body: serde_json::Value,
}

pub(crate) fn http_request(
    _cx: &Context<'_>,
    input: StepInput<Settings>,
) -> Result<Output, StepError> {
    let s = input.settings;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(s.timeout_ms)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = ureq::http::Request::builder()
        .method(s.method.to_uppercase().as_str())
        .uri(&s.url);
    for (k, v) in &s.headers {
        req = req.header(k, v);
    }
    let body = match &s.body {
        None => Vec::new(),
        Some(serde_json::Value::String(text)) => text.clone().into_bytes(),
        Some(json) => {
            if !s
                .headers
                .keys()
                .any(|k| k.eq_ignore_ascii_case("content-type"))
            {
                req = req.header("content-type", "application/json");
            }
            serde_json::to_vec(json).map_err(StepError::fatal)?
        }
    };
    let req = req
        .body(body)
        .map_err(|e| StepError::fatal(format!("invalid request to {}: {e}", s.url)))?;
    let mut resp = agent
        .run(req)
        .map_err(|e| StepError::retryable(format!("{} {} failed: {e}", s.method, s.url)))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let text = resp
        .body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_string()
        .map_err(|e| {
            StepError::retryable(format!("reading the response of {} failed: {e}", s.url))
        })?;
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    let ok = match &s.expect_status {
        Some(list) => list.contains(&status),
        None => (200..300).contains(&status),
    };
    if !ok {
        let err = format!(
            "{} {} answered {status}, expected {}",
            s.method,
            s.url,
            match &s.expect_status {
                Some(list) => format!("{list:?}"),
                None => "2xx".to_owned(),
            }
        );
        // Server errors and throttling may pass; anything else will not.
        return Err(if status >= 500 || status == 429 {
            StepError::retryable(err)
        } else {
            StepError::fatal(err)
        });
    }
    Ok(Output {
        status,
        headers,
        body,
    })
}
