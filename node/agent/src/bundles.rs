//! The node's bundle cache: fetched by hash on first need, verified with
//! the node's own keys, kept as the signed archive and its signature
//! (read-only) beside the unpacked copy, and checked again before every
//! load — also after a restart — by the same code as the server's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use engine::host::{HostCommand, StepHost};
use signing::{BundleHash, Signature, Trust, VerifiedBundle};

pub struct Bundles {
    dir: PathBuf,
    trust: Trust,
    server: String,
    /// The session credential of the current connection.
    session: Mutex<Option<String>>,
    http: reqwest::Client,
    host_command: HostCommand,
    /// One slot per hash: callers needing the same bundle wait on it, so
    /// one fetch serves them all.
    slots: Mutex<HashMap<BundleHash, Arc<tokio::sync::Mutex<Option<StepHost>>>>>,
}

impl Bundles {
    pub(crate) fn new(config: &crate::Config) -> Result<Bundles> {
        let dir = config.data_dir.join("bundles");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let builder = reqwest::Client::builder();
        let builder = match &config.tls {
            Some(tls) => builder.tls_backend_preconfigured((**tls).clone()),
            None => builder.tls_certs_only([]),
        };
        Ok(Bundles {
            dir,
            trust: config.trust.clone(),
            server: config.server.trim_end_matches('/').to_owned(),
            session: Mutex::default(),
            http: builder.build().context("setting up the HTTP client")?,
            host_command: config.host_command.clone(),
            slots: Mutex::default(),
        })
    }

    /// Downloads use this connection's session credential.
    pub(crate) fn set_session(&self, session: String) {
        *self.session.lock().unwrap() = Some(session);
    }

    /// A running step host for bundle `hash`, fetching, verifying and
    /// loading the bundle first if need be.
    pub(crate) async fn host(&self, hash: &str) -> Result<StepHost> {
        let hash: BundleHash = hash
            .parse()
            .map_err(|_| anyhow!("{hash:?} is not a bundle hash"))?;
        let slot = self.slots.lock().unwrap().entry(hash).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(host) = slot.as_ref().filter(|h| h.is_alive()) {
            return Ok(host.clone());
        }
        let verified = self.verified(hash).await?;
        let root = self.dir.clone();
        let unpacked = tokio::task::spawn_blocking(move || engine::bundle::open(&verified, &root))
            .await?
            .map_err(|e| anyhow!("bundle {hash} refused on this node: {e}"))?;
        let host = StepHost::start(&self.host_command, &unpacked)
            .await
            .map_err(|e| anyhow!("bundle {hash} refused on this node: {e}"))?;
        tracing::info!(bundle = %format!("{}@{}", unpacked.manifest.name, hash.short()), "bundle loaded");
        *slot = Some(host.clone());
        Ok(host)
    }

    /// The bundle's bytes, verified with this node's keys: the cached copy
    /// if it still verifies, else fetched from the server.
    async fn verified(&self, hash: BundleHash) -> Result<VerifiedBundle> {
        let (archive, sig_file) = self.files(hash);
        if let (Ok(bytes), Ok(text)) = (std::fs::read(&archive), std::fs::read_to_string(&sig_file))
        {
            match self.check(hash, bytes, &text) {
                Ok(verified) => return Ok(verified),
                Err(e) => {
                    tracing::warn!(bundle = %hash, error = %format!("{e:#}"), "the cached copy does not verify; fetching it again");
                    remove(&archive);
                    remove(&sig_file);
                }
            }
        }
        let (bytes, text) = self.download(hash).await?;
        let text =
            String::from_utf8(text).map_err(|_| anyhow!("the signature of {hash} is not text"))?;
        let verified = self.check(hash, bytes, &text)?;
        // Kept only once verified, read-only.
        write_readonly(&archive, verified.bytes())?;
        write_readonly(&sig_file, text.as_bytes())?;
        Ok(verified)
    }

    /// The bundle's bytes and signature from the server. A download cut
    /// short (the server restarting, the connection between sessions) is
    /// tried again for up to a minute; what the server refuses is not.
    async fn download(&self, hash: BundleHash) -> Result<(Vec<u8>, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + DOWNLOAD_FOR;
        let mut delay = Duration::from_millis(250);
        loop {
            let attempt = async {
                let bytes = self.get(&format!("/v1/nodes/bundles/{hash}")).await?;
                let text = self
                    .get(&format!("/v1/nodes/bundles/{hash}/signature"))
                    .await?;
                Ok::<_, Fetch>((bytes, text))
            };
            match attempt.await {
                Ok(got) => return Ok(got),
                Err(Fetch::Refused(e)) => return Err(e),
                Err(Fetch::Cut(e)) if tokio::time::Instant::now() + delay > deadline => {
                    return Err(e.context(format!(
                        "could not download bundle {hash} within {} s",
                        DOWNLOAD_FOR.as_secs()
                    )));
                }
                Err(Fetch::Cut(e)) => {
                    tracing::warn!(bundle = %hash, error = %format!("{e:#}"), "bundle download cut short; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn check(&self, hash: BundleHash, bytes: Vec<u8>, signature: &str) -> Result<VerifiedBundle> {
        let refused =
            |e: &dyn std::fmt::Display| anyhow!("bundle {hash} refused on this node: {e}");
        let signature = Signature::from_text(signature).map_err(|e| refused(&e))?;
        if signature.claims.sha256 != hash {
            return Err(refused(&format!(
                "its signature is for {}, not for the bundle asked for",
                signature.claims.sha256
            )));
        }
        signing::verify(bytes, &signature, &self.trust).map_err(|e| match e {
            // The signing crate speaks for a server; say it for the node.
            signing::Error::UntrustedKey(id) => refused(&format!(
                "it is signed by key {id}, which this node does not trust; add the key to the node's --trust"
            )),
            e => refused(&e),
        })
    }

    fn files(&self, hash: BundleHash) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{hash}.bundle")),
            self.dir.join(format!("{hash}.sig")),
        )
    }

    async fn get(&self, path: &str) -> Result<Vec<u8>, Fetch> {
        let url = format!("{}{path}", self.server);
        let mut req = self.http.get(&url);
        let session = self.session.lock().unwrap().clone();
        if let Some(session) = session {
            req = req.bearer_auth(session);
        }
        let cut = |e: reqwest::Error| {
            Fetch::Cut(anyhow::Error::new(e).context(format!("fetching {url}")))
        };
        let resp = req.send().await.map_err(cut)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(cut)?;
        if status.is_success() {
            return Ok(body.to_vec());
        }
        let e = anyhow!(
            "fetching {url}: {status}: {}",
            String::from_utf8_lossy(&body)
        );
        // A session that ended with its connection comes back with the
        // next one; a server error may pass.
        if status == reqwest::StatusCode::UNAUTHORIZED || status.is_server_error() {
            Err(Fetch::Cut(e))
        } else {
            Err(Fetch::Refused(e))
        }
    }
}

/// How long a bundle download keeps trying through connection trouble.
const DOWNLOAD_FOR: Duration = Duration::from_secs(60);

/// Why a download failed.
enum Fetch {
    /// Worth trying again.
    Cut(anyhow::Error),
    /// The server's answer stands.
    Refused(anyhow::Error),
}

fn write_readonly(path: &Path, bytes: &[u8]) -> Result<()> {
    let staging = path.with_extension(format!("part{}", std::process::id()));
    std::fs::write(&staging, bytes).with_context(|| format!("writing {}", staging.display()))?;
    let mut perms = std::fs::metadata(&staging)?.permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&staging, perms)?;
    std::fs::rename(&staging, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}
