//! A small HTTP client for the REST API, with errors a person can act on.

use anyhow::{Result, anyhow};
use serde_json::Value;

/// The server could not be reached or is briefly unable to answer
/// (stopping, restarting, its database away): worth trying again. Found with
/// `anyhow::Error::downcast_ref`.
#[derive(Debug)]
pub(crate) struct Unavailable(String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// The server answered with an error code of the API's table (other than
/// those [`Unavailable`] stands for). Found with `anyhow::Error::downcast_ref`.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) code: String,
    message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]", self.message, self.code)
    }
}

impl std::error::Error for Refused {}

/// The longest one submit attempt waits for its answer. A server answers a
/// submit within its submit timeout (10 s by default); past this, the
/// request counts as lost, and the submit is tried again with its key.
const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Whether a failed submit may be sent again (with its idempotency key):
/// the server was not reached, the request or its answer was lost, or the
/// server said nothing was written or the outcome is unknown. Never a
/// refusal of the request itself (4xx).
pub(crate) fn retryable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unavailable>().is_some()
        || e.downcast_ref::<Refused>()
            .is_some_and(|r| r.code == "write_conflict")
}

/// The pause before try `attempt + 2`: 0.25, 0.5, 1, 2, 4 s, then 4 s,
/// each somewhere between half and all of it at random so that clients
/// refused together do not come back together.
fn backoff(attempt: u32) -> std::time::Duration {
    let full = 250u64 << attempt.min(4);
    let mut noise = [0u8; 8];
    // Without randomness the pause is simply the whole of it.
    let noise = getrandom::fill(&mut noise).map_or(0, |()| u64::from_le_bytes(noise));
    std::time::Duration::from_millis(full / 2 + noise % (full / 2 + 1))
}

pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client for the server and credential the command line names.
    pub(crate) fn connect(arg: &crate::args::ServerArg) -> Result<Client> {
        let target = arg.target()?;
        Client::with_ca(&target.server, target.token, target.ca_cert.as_deref())
    }

    pub(crate) fn new(base: &str, token: Option<String>) -> Result<Client> {
        Client::with_ca(base, token, None)
    }

    /// With `ca_cert`, an https:// server's certificate must chain to the
    /// CA(s) in that PEM file, and nothing else is trusted; without it, to
    /// the system's trusted roots.
    pub(crate) fn with_ca(
        base: &str,
        token: Option<String>,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Client> {
        let base = base.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(anyhow!(
                "--server {base:?} must be an http:// or https:// URL such as http://127.0.0.1:7878"
            ));
        }
        let builder = reqwest::Client::builder();
        let builder = match ca_cert {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| anyhow!("reading the CA certificate {}: {e}", path.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| anyhow!("{} is not a PEM certificate: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(anyhow!("{} holds no PEM certificate", path.display()));
                }
                builder.tls_certs_only(certs)
            }
            // Plain HTTP needs no trust store (and a machine may have none).
            None if base.starts_with("http://") => builder.tls_certs_only([]),
            None => builder,
        };
        let http = builder
            .build()
            .map_err(|e| anyhow!("setting up the HTTP client: {e}"))?;
        Ok(Client { http, base, token })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        Ok(self.send_for_status(req).await?.1)
    }

    /// Sends `req`; a success's status code and body.
    async fn send_for_status(
        &self,
        mut req: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Value)> {
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| {
            if self.base.starts_with("https://") && not_tls(&e) {
                anyhow!(
                    "TLS handshake failed with {}; is the server plain http? (try {})",
                    self.base,
                    self.base.replacen("https://", "http://", 1)
                )
            } else if let Some(reason) = tls_failure(&e) {
                anyhow!(
                    "cannot verify the TLS certificate of {}: {reason}; pass the CA that signed it with --ca-cert FILE (or TROUPE_CA_CERT)",
                    self.base
                )
            } else if e.is_connect() {
                anyhow::Error::new(Unavailable(format!(
                    "cannot reach the troupe server at {}: is `troupe serve` running? (set --server or TROUPE_SERVER)",
                    self.base
                )))
            } else {
                // The connection broke mid-request (the server went away).
                anyhow::Error::new(Unavailable(format!("request to {} failed: {e}", self.base)))
            }
        })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok((status, body));
        }
        match (
            body["error"]["code"].as_str(),
            body["error"]["message"].as_str(),
        ) {
            (Some("unauthorized"), Some(message)) if self.token.is_none() => Err(anyhow!(
                "{message} [unauthorized]\nno API token was given: pass --token-file FILE or set TROUPE_TOKEN \
                 (a new server writes its first admin token to DATA_DIR/{})",
                crate::args::ADMIN_TOKEN_FILE
            )),
            (
                Some(code @ ("shutting_down" | "database_unavailable" | "outcome_unknown")),
                Some(message),
            ) => Err(anyhow::Error::new(Unavailable(format!(
                "{message} [{code}]"
            )))),
            (Some(code), Some(message)) => Err(anyhow::Error::new(Refused {
                code: code.to_owned(),
                message: message.to_owned(),
            })),
            // A proxy in front of the server, which is away.
            _ if matches!(status.as_u16(), 502..=504) => Err(anyhow::Error::new(Unavailable(
                format!("the server answered {status}"),
            ))),
            _ => Err(anyhow!("the server answered {status}")),
        }
    }

    pub(crate) async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await
    }

    pub(crate) async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub(crate) async fn patch(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.patch(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub(crate) async fn delete(&self, path: &str) -> Result<Value> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Pushes a bundle and its signature (multipart); whether the server
    /// stored it (false: it held these bytes already), and the bundle.
    pub(crate) async fn push(&self, bundle: Vec<u8>, signature: String) -> Result<(bool, Value)> {
        let form = reqwest::multipart::Form::new()
            .part(
                "bundle",
                reqwest::multipart::Part::bytes(bundle).file_name("bundle.zip"),
            )
            .text("signature", signature);
        let (status, body) = self
            .send_for_status(
                self.http
                    .post(format!("{}/v1/bundles", self.base))
                    .multipart(form),
            )
            .await?;
        Ok((status == reqwest::StatusCode::CREATED, body))
    }

    /// Submits `body`, which holds an idempotency key, and while the
    /// failure is [`retryable`] sends it again after a [`backoff`], for up
    /// to `retry_for` from the first try: the key makes the server answer a
    /// repeat with the action the first made, if it made one. The last
    /// failure if none went through.
    pub(crate) async fn submit(
        &self,
        body: &Value,
        retry_for: std::time::Duration,
    ) -> Result<Value> {
        let began = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            let req = self
                .http
                .post(format!("{}/v1/actions", self.base))
                .timeout(ATTEMPT_TIMEOUT)
                .json(body);
            match self.send(req).await {
                Err(e) if retryable(&e) => {
                    let pause = backoff(attempt);
                    if began.elapsed() + pause > retry_for {
                        return Err(e);
                    }
                    eprintln!(
                        "the submit did not go through ({e}); trying again in {:.1}s with the same idempotency key",
                        pause.as_secs_f64()
                    );
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Submits and holds the request until the action finishes (or the
    /// server's wait runs out): one round trip for a whole action.
    pub(crate) async fn submit_and_wait(&self, body: &Value) -> Result<Value> {
        self.send(
            self.http
                .post(format!("{}/v1/actions", self.base))
                .query(&[("wait", "30s")])
                .json(body),
        )
        .await
    }

    pub(crate) async fn action(&self, id: i64) -> Result<Value> {
        self.get(&format!("/v1/actions/{id}"), &[]).await
    }

    /// What the action's steps logged: `{"logs": [...]}`.
    pub(crate) async fn logs(&self, id: i64) -> Result<Value> {
        self.get(&format!("/v1/actions/{id}/logs"), &[]).await
    }

    /// Long-polls until the action changes past `since` or finishes.
    pub(crate) async fn wait(&self, id: i64, since: i64) -> Result<Value> {
        self.get(
            &format!("/v1/actions/{id}"),
            &[("wait", "30s".into()), ("since", since.to_string())],
        )
        .await
    }

    pub(crate) async fn list(&self, query: &[(&str, String)]) -> Result<Value> {
        self.get("/v1/actions", query).await
    }

    pub(crate) async fn cancel(&self, id: i64) -> Result<Value> {
        self.send(
            self.http
                .post(format!("{}/v1/actions/{id}/cancel", self.base)),
        )
        .await
    }
}

/// The certificate error under a failed request, if that is why it failed.
fn tls_failure(e: &reqwest::Error) -> Option<String> {
    causes(e)
        .find_map(|err| err.downcast_ref::<rustls::Error>())
        .map(rustls::Error::to_string)
}

/// Whether a request to an https:// URL failed because what answered does
/// not speak TLS: its reply is no TLS record, or it closed the connection
/// (a plain-HTTP server answering the ClientHello with 400) during the
/// handshake.
fn not_tls(e: &reqwest::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    causes(e).any(|err| {
        matches!(
            err.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidMessage(_))
        ) || (e.is_connect()
            && err.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(io.kind(), BrokenPipe | ConnectionReset | UnexpectedEof)
            }))
    })
}

/// The errors under `e`, outermost first.
fn causes(e: &reqwest::Error) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    let first: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    std::iter::successors(first, |err| {
        // An io::Error's `source` skips the error it wraps: look inside.
        match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        }
    })
}
