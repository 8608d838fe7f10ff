//! A small HTTP client for the REST API, with errors a person can act on.

use anyhow::{Result, anyhow};
use serde_json::Value;

pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub(crate) fn new(base: &str) -> Result<Client> {
        let base = base.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(anyhow!(
                "--server {base:?} must be an http:// URL such as http://127.0.0.1:7878"
            ));
        }
        let http = reqwest::Client::builder().build()?;
        Ok(Client { http, base })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach the troupe server at {}: is `troupe serve` running? (set --server or TROUPE_SERVER)",
                    self.base
                )
            } else {
                anyhow!("request to {} failed: {e}", self.base)
            }
        })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        match (
            body["error"]["code"].as_str(),
            body["error"]["message"].as_str(),
        ) {
            (Some(code), Some(message)) => Err(anyhow!("{message} [{code}]")),
            _ => Err(anyhow!("the server answered {status}")),
        }
    }

    pub(crate) async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await
    }

    pub(crate) async fn post(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<Value> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        self.send(req).await
    }

    /// Pushes a bundle and its signature (multipart).
    pub(crate) async fn push(&self, bundle: Vec<u8>, signature: String) -> Result<Value> {
        let form = reqwest::multipart::Form::new()
            .part(
                "bundle",
                reqwest::multipart::Part::bytes(bundle).file_name("bundle.zip"),
            )
            .text("signature", signature);
        self.send(
            self.http
                .post(format!("{}/v1/bundles", self.base))
                .multipart(form),
        )
        .await
    }

    pub(crate) async fn submit(&self, body: &Value) -> Result<Value> {
        self.send(
            self.http
                .post(format!("{}/v1/actions", self.base))
                .json(body),
        )
        .await
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
