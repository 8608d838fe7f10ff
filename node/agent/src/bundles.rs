//! The node's bundle cache: fetched by hash on first need, verified with
//! the node's own keys, kept as the signed archive and its signature
//! (read-only) beside the unpacked copy, and checked again before every
//! load — also after a restart — by the same code as the server's.
//!
//! A loaded bundle's step host is stopped once no call uses it and either
//! a newer load of the same bundle name has happened (a new version took
//! over) or it has been idle for `unload_after`. Archives not loaded are
//! evicted, least recently used first, while the cache is over its size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use engine::host::{HostCommand, StepHost};
use signing::{BundleHash, Signature, Trust, VerifiedBundle};

pub struct Bundles {
    dir: PathBuf,
    trust: Trust,
    /// Where bundles are downloaded from, and with which credential.
    servers: Arc<crate::servers::Servers>,
    http: reqwest::Client,
    host_command: HostCommand,
    /// One entry per hash used since the node started.
    entries: Mutex<HashMap<BundleHash, Entry>>,
    /// Bumped when what the cache holds or has loaded may have changed.
    changed: tokio::sync::watch::Sender<u64>,
    unload_after: Duration,
    cache_size: u64,
    /// Counts loads, to tell which of two versions came later.
    loads: std::sync::atomic::AtomicU64,
}

/// What the node knows of one bundle hash.
#[derive(Default)]
struct Entry {
    /// Callers needing the bundle wait on it, so one fetch serves them all.
    slot: Arc<tokio::sync::Mutex<Option<Loaded>>>,
    /// Calls using it now.
    in_flight: usize,
    last_used: Option<Instant>,
}

struct Loaded {
    host: StepHost,
    /// The bundle's name in its manifest: versions share it.
    name: String,
    /// Which load this was ([`Bundles::loads`]).
    seq: u64,
}

/// A bundle's step host, held for one call: while any lease is out, the
/// host stays loaded and the archive stays cached.
pub(crate) struct Lease {
    pub(crate) host: StepHost,
    _use: Use,
}

/// One call's use of a bundle, counted until it drops.
struct Use {
    hash: BundleHash,
    bundles: Arc<Bundles>,
}

impl Drop for Use {
    fn drop(&mut self) {
        self.bundles.release(self.hash);
    }
}

/// How often the cache looks for hosts to stop and archives to evict.
const TIDY_EVERY: Duration = Duration::from_secs(1);

/// How long a host a newer version took over stays loaded once idle.
const SUPERSEDED_LINGER: Duration = Duration::from_secs(5);

impl Bundles {
    pub(crate) fn new(
        config: &crate::Config,
        servers: Arc<crate::servers::Servers>,
    ) -> Result<Bundles> {
        let dir = config.data_dir.join("bundles");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        sweep(&dir);
        let builder = reqwest::Client::builder();
        let builder = match &config.tls {
            Some(tls) => builder.tls_backend_preconfigured((**tls).clone()),
            None => builder.tls_certs_only([]),
        };
        Ok(Bundles {
            dir,
            trust: config.trust.clone(),
            servers,
            http: builder.build().context("setting up the HTTP client")?,
            host_command: config.host_command.clone(),
            entries: Mutex::default(),
            changed: tokio::sync::watch::channel(0).0,
            unload_after: config.unload_after,
            cache_size: config.cache_size,
            loads: Default::default(),
        })
    }

    /// Changes when the cache's report ([`Bundles::report`]) may have.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// A running step host for bundle `hash`, fetching (from server number
    /// `server`, or another if it is gone), verifying and loading the
    /// bundle first if need be, held until the lease drops.
    pub(crate) async fn host(self: &Arc<Self>, hash: &str, server: usize) -> Result<Lease> {
        let hash: BundleHash = hash
            .parse()
            .map_err(|_| anyhow!("{hash:?} is not a bundle hash"))?;
        let slot = {
            let mut entries = self.entries.lock().unwrap();
            let entry = entries.entry(hash).or_default();
            entry.in_flight += 1;
            entry.last_used = Some(Instant::now());
            entry.slot.clone()
        };
        // From here on, the use is released when this drops (also on error).
        let used = Use {
            hash,
            bundles: self.clone(),
        };
        let mut slot = slot.lock().await;
        if let Some(loaded) = slot.as_ref().filter(|l| l.host.is_alive()) {
            return Ok(Lease {
                host: loaded.host.clone(),
                _use: used,
            });
        }
        let verified = self.verified(hash, server).await?;
        let root = self.dir.clone();
        let unpacked = tokio::task::spawn_blocking(move || engine::bundle::open(&verified, &root))
            .await?
            .map_err(|e| anyhow!("bundle {hash} refused on this node: {e}"))?;
        let host = match StepHost::start(&self.host_command, &unpacked).await {
            Ok(host) => host,
            Err(e) => {
                // The archive stays cached (it verified); its unpacked copy
                // is made again from it, as the server does.
                let dir = unpacked.dir.clone();
                tokio::task::spawn_blocking(move || {
                    make_writable(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                })
                .await?;
                return Err(anyhow!("bundle {hash} refused on this node: {e}"));
            }
        };
        tracing::info!(bundle = %format!("{}@{}", unpacked.manifest.name, hash.short()), "bundle loaded");
        let seq = self
            .loads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *slot = Some(Loaded {
            host: host.clone(),
            name: unpacked.manifest.name.clone(),
            seq,
        });
        self.bump();
        Ok(Lease { host, _use: used })
    }

    fn release(&self, hash: BundleHash) {
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get_mut(&hash) {
            entry.in_flight -= 1;
            entry.last_used = Some(Instant::now());
        }
    }

    /// Stops step hosts no call needs and evicts archives over the cache
    /// size, every [`TIDY_EVERY`] until `stop`.
    pub(crate) async fn tidy(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(TIDY_EVERY);
        let mut changes = self.subscribe();
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            for (hash, host) in self.unloadable() {
                tracing::info!(bundle = %hash, "unloading a bundle no call uses");
                host.shutdown("unloaded: no call uses it").await;
                self.bump();
            }
            // The cache grows only by a load, and a host stopped may free
            // an archive for eviction: look again only after a change.
            if !changes.has_changed().unwrap_or(false) {
                continue;
            }
            changes.mark_unchanged();
            let dir = self.dir.clone();
            let (keep, recent) = self.in_use();
            let limit = self.cache_size;
            let evicted = tokio::task::spawn_blocking(move || evict(&dir, &keep, &recent, limit))
                .await
                .unwrap_or_default();
            if !evicted.is_empty() {
                self.bump();
            }
        }
    }

    /// Loaded hosts to stop now: idle, and superseded by a later load of
    /// the same bundle name or unused for `unload_after`. Taken out of
    /// their slots, so a new call loads them again.
    fn unloadable(&self) -> Vec<(BundleHash, StepHost)> {
        let entries = self.entries.lock().unwrap();
        // The latest load of each bundle name.
        let mut latest: HashMap<String, u64> = HashMap::new();
        for entry in entries.values() {
            if let Ok(slot) = entry.slot.try_lock()
                && let Some(l) = slot.as_ref()
            {
                let seq = latest.entry(l.name.clone()).or_default();
                *seq = (*seq).max(l.seq);
            }
        }
        let mut out = Vec::new();
        for (hash, entry) in entries.iter() {
            if entry.in_flight > 0 {
                continue;
            }
            let Ok(mut slot) = entry.slot.try_lock() else {
                continue;
            };
            let Some(l) = slot.as_ref() else { continue };
            let idle_for = entry.last_used.map_or(Duration::MAX, |t| t.elapsed());
            // A short linger, so that two versions in use at once (actions
            // pinned to the old one finishing) do not unload each other.
            let superseded = latest.get(&l.name).is_some_and(|s| *s > l.seq)
                && idle_for >= SUPERSEDED_LINGER.min(self.unload_after);
            let idle = idle_for >= self.unload_after;
            if superseded || idle || !l.host.is_alive() {
                let l = slot.take().expect("checked above");
                out.push((*hash, l.host));
            }
        }
        out
    }

    /// Hashes that must stay cached (loaded, or used by a call), and when
    /// each hash used since the node started was last used.
    fn in_use(&self) -> (Vec<BundleHash>, HashMap<BundleHash, std::time::SystemTime>) {
        let entries = self.entries.lock().unwrap();
        let keep = entries
            .iter()
            .filter(|(_, e)| e.in_flight > 0 || e.slot.try_lock().map_or(true, |s| s.is_some()))
            .map(|(h, _)| *h)
            .collect();
        let now = std::time::SystemTime::now();
        let recent = entries
            .iter()
            .filter_map(|(h, e)| Some((*h, now - e.last_used?.elapsed())))
            .collect();
        (keep, recent)
    }

    /// What the cache holds and has loaded, for the server.
    pub(crate) fn report(&self) -> node_protocol::FromNode {
        let mut cached = Vec::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(hash) = name.strip_suffix(".bundle") {
                let bytes = entry.metadata().map(|m| m.len()).unwrap_or_default();
                cached.push(node_protocol::CachedBundle {
                    hash: hash.to_owned(),
                    bytes,
                });
            }
        }
        cached.sort_by(|a, b| a.hash.cmp(&b.hash));
        let entries = self.entries.lock().unwrap();
        let mut loaded: Vec<String> = entries
            .iter()
            .filter(|(_, e)| {
                e.slot
                    .try_lock()
                    .map_or(true, |s| s.as_ref().is_some_and(|l| l.host.is_alive()))
            })
            .map(|(h, _)| h.to_string())
            .collect();
        loaded.sort();
        node_protocol::FromNode::Bundles { cached, loaded }
    }

    /// The bundle's bytes, verified with this node's keys: the cached copy
    /// if it still verifies, else fetched from the server.
    async fn verified(&self, hash: BundleHash, server: usize) -> Result<VerifiedBundle> {
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
        let (bytes, text) = self.download(hash, server).await?;
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
    async fn download(&self, hash: BundleHash, server: usize) -> Result<(Vec<u8>, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + DOWNLOAD_FOR;
        let mut delay = Duration::from_millis(250);
        loop {
            let attempt = async {
                let bytes = self
                    .get(&format!("/v1/nodes/bundles/{hash}"), server)
                    .await?;
                let text = self
                    .get(&format!("/v1/nodes/bundles/{hash}/signature"), server)
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

    async fn get(&self, path: &str, server: usize) -> Result<Vec<u8>, Fetch> {
        let (base, session) = self.servers.source(server);
        let url = format!("{base}{path}");
        let mut req = self.http.get(&url);
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

/// Removes what a crash left half-written: staging directories of an
/// unpack and partial archives (`<hash>.part<pid>`).
fn sweep(dir: &Path) {
    engine::bundle::sweep_staging(dir);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let partial = name.split_once(".part").is_some_and(|(hash, pid)| {
            hash.parse::<BundleHash>().is_ok() && pid.parse::<u32>().is_ok()
        });
        if partial {
            tracing::info!(file = %name, "removing a partial archive left by an interrupted download");
            remove(&entry.path());
        }
    }
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Removes cached bundles not in `keep`, least recently used first (by
/// `recent`, else when the archive was fetched), until the cache takes at
/// most `limit` bytes. Returns the evicted hashes.
fn evict(
    dir: &Path,
    keep: &[BundleHash],
    recent: &HashMap<BundleHash, std::time::SystemTime>,
    limit: u64,
) -> Vec<BundleHash> {
    let mut cached = Vec::new();
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(hash) = name
            .strip_suffix(".bundle")
            .and_then(|h| h.parse::<BundleHash>().ok())
        else {
            continue;
        };
        let size = entry.metadata().map(|m| m.len()).unwrap_or_default()
            + dir_size(&dir.join(hash.to_string()));
        total += size;
        let used = recent.get(&hash).copied().unwrap_or_else(|| {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
        });
        cached.push((used, hash, size));
    }
    cached.sort();
    let mut evicted = Vec::new();
    for (_, hash, size) in cached {
        if total <= limit {
            break;
        }
        if keep.contains(&hash) {
            continue;
        }
        tracing::info!(bundle = %hash, bytes = size, "evicting a bundle from the cache");
        remove(&dir.join(format!("{hash}.bundle")));
        remove(&dir.join(format!("{hash}.sig")));
        let unpacked = dir.join(hash.to_string());
        make_writable(&unpacked);
        let _ = std::fs::remove_dir_all(&unpacked);
        total -= size;
        evicted.push(hash);
    }
    evicted
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Unpacked copies may be read-only; their directories must be writable
/// to be removed.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.metadata().is_ok_and(|m| m.is_dir()) {
            make_writable(&entry.path());
        }
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}
