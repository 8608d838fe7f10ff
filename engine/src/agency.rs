//! The Agency: the singleton factory of Step actors. It holds the loaded
//! bundles, which version of each bundle name is active, how many actions are
//! pinned to each bundle, and one step host per bundle; it creates each
//! (bundle, step) actor on first use.
//!
//! A bundle that is no longer active and has no action pinned to it is
//! drained: its Step actors are dropped and its step host exits, so its code
//! is unloaded. It loads again on demand if an action names it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use signing::{BundleHash, KeyId};
use tokio::sync::{mpsc, oneshot};

use crate::bundle::{self, Manifest};
use crate::error::{Error, Result};
use crate::host::{HostCommand, StepHost};
use crate::step::StepHandle;

/// A bundle that passed every check and is ready to run.
#[derive(Debug)]
pub struct LoadedBundle {
    pub hash: BundleHash,
    pub manifest: Manifest,
    pub library: PathBuf,
    pub signer: KeyId,
    /// Set by the Agency when the signer's key is revoked: no further step
    /// of this bundle starts.
    revoked: AtomicBool,
    /// Its Step actors, made by the Agency on first use, so that runners
    /// find them without asking (dropped when the bundle drains).
    steps: Mutex<HashMap<String, StepHandle>>,
}

/// What the Agency knows of one bundle.
#[derive(Debug, Clone)]
pub(crate) struct BundleState {
    pub(crate) bundle: Arc<LoadedBundle>,
    pub(crate) active: bool,
    pub(crate) revoked: bool,
    /// Whether its step host is running.
    pub(crate) host_running: bool,
}

enum Msg {
    Register {
        unpacked: bundle::Unpacked,
        signer: KeyId,
        reply: oneshot::Sender<Result<Arc<LoadedBundle>>>,
    },
    Activate {
        hash: BundleHash,
        reply: oneshot::Sender<Result<()>>,
    },
    Resolve {
        kind: String,
        bundle: Option<String>,
        may_pin: crate::model::MayPin,
        reply: oneshot::Sender<Result<Arc<LoadedBundle>>>,
    },
    Bundle {
        hash: String,
        reply: oneshot::Sender<Option<Arc<LoadedBundle>>>,
    },
    Step {
        hash: BundleHash,
        step: String,
        reply: oneshot::Sender<Result<StepHandle>>,
    },
    Host {
        hash: BundleHash,
        reply: oneshot::Sender<Result<StepHost>>,
    },
    Pin {
        hash: String,
    },
    Unpin {
        hash: String,
    },
    Revoke {
        key: KeyId,
    },
    States {
        reply: oneshot::Sender<Vec<BundleState>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Clone)]
pub(crate) struct AgencyHandle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl AgencyHandle {
    pub(crate) fn spawn(host_command: HostCommand, grace: Duration) -> AgencyHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = AgencyHandle { tx };
        let agency = Agency {
            handle: handle.clone(),
            host_command,
            grace,
            bundles: HashMap::new(),
            active: BTreeMap::new(),
            revoked: HashSet::new(),
            pins: HashMap::new(),
            hosts: HashMap::new(),
        };
        crate::tasks::spawn(crate::tasks::TaskKind::Agency, agency.run(rx));
        handle
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Probes an unpacked bundle's library in a step host and registers it
    /// (not yet active). Only the Source Authority calls this.
    pub(crate) async fn register(
        &self,
        unpacked: bundle::Unpacked,
        signer: KeyId,
    ) -> Result<Arc<LoadedBundle>> {
        self.ask(|reply| Msg::Register {
            unpacked,
            signer,
            reply,
        })
        .await?
    }

    /// Makes a registered bundle the active version of its name.
    pub(crate) async fn activate(&self, hash: BundleHash) -> Result<()> {
        self.ask(|reply| Msg::Activate { hash, reply }).await?
    }

    /// The bundle a new action of `kind` is pinned to: the named one if
    /// given, else the active bundle providing the kind.
    pub(crate) async fn resolve(
        &self,
        kind: String,
        bundle: Option<String>,
        may_pin: crate::model::MayPin,
    ) -> Result<Arc<LoadedBundle>> {
        self.ask(|reply| Msg::Resolve {
            kind,
            bundle,
            may_pin,
            reply,
        })
        .await?
    }

    pub(crate) async fn bundle(&self, hash: String) -> Result<Option<Arc<LoadedBundle>>> {
        self.ask(|reply| Msg::Bundle { hash, reply }).await
    }

    /// The Step actor for `step` of `bundle`; the Agency starts it (and the
    /// bundle's step host) on first use.
    pub(crate) async fn step(&self, bundle: &LoadedBundle, step: &str) -> Result<StepHandle> {
        if bundle.revoked.load(Ordering::Acquire) {
            return Err(revoked(bundle));
        }
        if let Some(handle) = bundle.steps.lock().unwrap().get(step) {
            return Ok(handle.clone());
        }
        let (hash, step) = (bundle.hash, step.to_owned());
        self.ask(|reply| Msg::Step { hash, step, reply }).await?
    }

    /// A live host for the bundle, starting a fresh one if the last died.
    pub(crate) async fn host(&self, hash: BundleHash) -> Result<StepHost> {
        self.ask(|reply| Msg::Host { hash, reply }).await?
    }

    /// An action was pinned to `hash` (submitted or resumed).
    pub(crate) fn pin(&self, hash: &str) {
        let _ = self.tx.send(Msg::Pin {
            hash: hash.to_owned(),
        });
    }

    /// An action pinned to `hash` finished.
    pub(crate) fn unpin(&self, hash: &str) {
        let _ = self.tx.send(Msg::Unpin {
            hash: hash.to_owned(),
        });
    }

    pub(crate) fn revoke(&self, key: KeyId) {
        let _ = self.tx.send(Msg::Revoke { key });
    }

    pub(crate) async fn states(&self) -> Result<Vec<BundleState>> {
        self.ask(|reply| Msg::States { reply }).await
    }

    pub(crate) async fn shutdown(&self) {
        let _ = self.ask(|reply| Msg::Shutdown { reply }).await;
    }
}

struct Agency {
    handle: AgencyHandle,
    host_command: HostCommand,
    grace: Duration,
    bundles: HashMap<BundleHash, Arc<LoadedBundle>>,
    /// bundle name → its active version.
    /// Ordered by name, so that should two active bundles provide one kind
    /// (the Source Authority refuses that; data from older versions may hold
    /// it) the one whose name sorts first serves it, every time.
    active: BTreeMap<String, BundleHash>,
    revoked: HashSet<KeyId>,
    pins: HashMap<BundleHash, usize>,
    hosts: HashMap<BundleHash, StepHost>,
}

impl Agency {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Register {
                    unpacked,
                    signer,
                    reply,
                } => {
                    let _ = reply.send(self.register(unpacked, signer).await);
                }
                Msg::Activate { hash, reply } => {
                    let _ = reply.send(self.activate(hash));
                }
                Msg::Resolve {
                    kind,
                    bundle,
                    may_pin,
                    reply,
                } => {
                    let _ = reply.send(self.resolve(kind, bundle, may_pin));
                }
                Msg::Bundle { hash, reply } => {
                    let found = hash
                        .parse()
                        .ok()
                        .and_then(|h: BundleHash| self.bundles.get(&h).cloned());
                    let _ = reply.send(found);
                }
                Msg::Step { hash, step, reply } => {
                    let _ = reply.send(self.step(hash, step).await);
                }
                Msg::Host { hash, reply } => {
                    let _ = reply.send(self.host(hash).await);
                }
                Msg::Pin { hash } => {
                    if let Ok(h) = hash.parse() {
                        *self.pins.entry(h).or_default() += 1;
                    }
                }
                Msg::Unpin { hash } => {
                    if let Ok(h) = hash.parse() {
                        if let Some(n) = self.pins.get_mut(&h) {
                            *n = n.saturating_sub(1);
                        }
                        self.drain_if_idle(h);
                    }
                }
                Msg::Revoke { key } => {
                    self.revoked.insert(key);
                    let revoked: Vec<BundleHash> = self
                        .bundles
                        .values()
                        .filter(|b| b.signer == key)
                        .inspect(|b| b.revoked.store(true, Ordering::Release))
                        .map(|b| b.hash)
                        .collect();
                    self.active.retain(|_, h| !revoked.contains(h));
                    for h in revoked {
                        self.drain_if_idle(h);
                    }
                }
                Msg::States { reply } => {
                    let mut states: Vec<BundleState> = self
                        .bundles
                        .values()
                        .map(|b| BundleState {
                            bundle: b.clone(),
                            active: self.is_active(b.hash),
                            revoked: self.revoked.contains(&b.signer),
                            host_running: self.hosts.get(&b.hash).is_some_and(StepHost::is_alive),
                        })
                        .collect();
                    states.sort_by(|a, b| {
                        (&a.bundle.manifest.name, &a.bundle.manifest.version)
                            .cmp(&(&b.bundle.manifest.name, &b.bundle.manifest.version))
                    });
                    let _ = reply.send(states);
                }
                Msg::Shutdown { reply } => {
                    for host in self.hosts.values() {
                        host.shutdown("the server is shutting down").await;
                    }
                    let _ = reply.send(());
                }
            }
        }
    }

    /// A loaded bundle whose signer is not revoked.
    fn usable(&self, hash: BundleHash) -> Result<&Arc<LoadedBundle>> {
        let bundle = self
            .bundles
            .get(&hash)
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_string()))?;
        if self.revoked.contains(&bundle.signer) {
            return Err(revoked(bundle));
        }
        Ok(bundle)
    }

    fn is_active(&self, hash: BundleHash) -> bool {
        self.bundles
            .get(&hash)
            .is_some_and(|b| self.active.get(&b.manifest.name) == Some(&hash))
    }

    fn label(&self, hash: BundleHash) -> String {
        match self.bundles.get(&hash) {
            Some(b) => format!(
                "{} {} ({})",
                b.manifest.name,
                b.manifest.version,
                hash.short()
            ),
            None => hash.short(),
        }
    }

    async fn register(
        &mut self,
        unpacked: bundle::Unpacked,
        signer: KeyId,
    ) -> Result<Arc<LoadedBundle>> {
        if let Some(existing) = self.bundles.get(&unpacked.hash) {
            return Ok(existing.clone());
        }
        let label = format!("{}@{}", unpacked.manifest.name, unpacked.hash.short());
        // Probe the library in a step host, never in this process.
        let host = StepHost::start(&self.host_command, &unpacked).await?;
        let loaded = Arc::new(LoadedBundle {
            hash: unpacked.hash,
            manifest: unpacked.manifest,
            library: unpacked.library,
            revoked: AtomicBool::new(self.revoked.contains(&signer)),
            signer,
            steps: Mutex::default(),
        });
        self.hosts.insert(loaded.hash, host);
        self.bundles.insert(loaded.hash, loaded.clone());
        tracing::info!(bundle = %label, kinds = loaded.manifest.kinds.len(), "bundle loaded");
        Ok(loaded)
    }

    fn activate(&mut self, hash: BundleHash) -> Result<()> {
        let bundle = self.usable(hash)?;
        let previous = self.active.insert(bundle.manifest.name.clone(), hash);
        tracing::info!(bundle = %self.label(hash), "bundle active for new actions");
        if let Some(old) = previous.filter(|old| *old != hash) {
            self.drain_if_idle(old);
        }
        Ok(())
    }

    /// The bundle an action of `kind` runs on: the active one that provides
    /// it, or the `pinned` one; a version other than the active one of its
    /// name (a rollback) only if `may_pin` allows any.
    fn resolve(
        &self,
        kind: String,
        pinned: Option<String>,
        may_pin: crate::model::MayPin,
    ) -> Result<Arc<LoadedBundle>> {
        if let Some(hash) = pinned {
            let parsed = hash
                .parse::<BundleHash>()
                .map_err(|_| Error::BundleNotLoaded(hash.clone()))?;
            let bundle = self.usable(parsed)?;
            if may_pin == crate::model::MayPin::Active && !self.is_active(parsed) {
                return Err(Error::PinNeedsAdmin {
                    name: bundle.manifest.name.clone(),
                    pinned: self.label(parsed),
                    active: self
                        .active
                        .get(&bundle.manifest.name)
                        .map(|&h| self.label(h)),
                });
            }
            if !bundle.manifest.kinds.contains_key(&kind) {
                return Err(Error::UnknownKind {
                    known: self.known_kinds(Some(bundle)),
                    kind,
                });
            }
            return Ok(bundle.clone());
        }
        // Of the active bundles, the first by name that provides the kind.
        self.active
            .values()
            .filter_map(|h| self.bundles.get(h))
            .find(|b| b.manifest.kinds.contains_key(&kind))
            .cloned()
            .ok_or_else(|| Error::UnknownKind {
                known: self.known_kinds(None),
                kind,
            })
    }

    fn known_kinds(&self, within: Option<&Arc<LoadedBundle>>) -> String {
        let mut known: Vec<&str> = match within {
            Some(b) => b.manifest.kinds.keys().map(String::as_str).collect(),
            None => self
                .active
                .values()
                .filter_map(|h| self.bundles.get(h))
                .flat_map(|b| b.manifest.kinds.keys().map(String::as_str))
                .collect(),
        };
        known.sort_unstable();
        known.dedup();
        if known.is_empty() {
            "none (no bundle is loaded)".into()
        } else {
            known.join(", ")
        }
    }

    /// Unloads a bundle's code once nothing can use it.
    fn drain_if_idle(&mut self, hash: BundleHash) {
        if self.is_active(hash) || self.pins.get(&hash).copied().unwrap_or(0) > 0 {
            return;
        }
        if let Some(bundle) = self.bundles.get(&hash) {
            bundle.steps.lock().unwrap().clear();
        }
        if let Some(host) = self.hosts.remove(&hash) {
            tracing::info!(bundle = %self.label(hash), pid = host.pid(), "bundle drained; stopping its step host");
            crate::tasks::spawn(crate::tasks::TaskKind::HostStop, async move {
                host.shutdown("its bundle is drained").await
            });
        }
    }

    async fn host(&mut self, hash: BundleHash) -> Result<StepHost> {
        if let Some(host) = self.hosts.get(&hash)
            && host.is_alive()
        {
            return Ok(host.clone());
        }
        let bundle = self
            .bundles
            .get(&hash)
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_string()))?;
        let label = format!("{}@{}", bundle.manifest.name, hash.short());
        tracing::info!(bundle = %label, "starting a step host");
        let host = StepHost::spawn(&self.host_command, &bundle.library, &label).await?;
        self.hosts.insert(hash, host.clone());
        Ok(host)
    }

    async fn step(&mut self, hash: BundleHash, step: String) -> Result<StepHandle> {
        let bundle = self.usable(hash)?.clone();
        if let Some(handle) = bundle.steps.lock().unwrap().get(&step) {
            return Ok(handle.clone());
        }
        let def = bundle.manifest.steps.get(&step).cloned().ok_or_else(|| {
            Error::InvalidRequest(format!("bundle {} has no step {step:?}", hash.short()))
        })?;
        let host = self.host(hash).await?;
        let handle = StepHandle::new(
            hash,
            step.clone(),
            def,
            host,
            self.handle.clone(),
            self.grace,
        );
        bundle.steps.lock().unwrap().insert(step, handle.clone());
        Ok(handle)
    }
}

fn revoked(bundle: &LoadedBundle) -> Error {
    Error::BundleRevoked {
        hash: bundle.hash.to_string(),
        key: bundle.signer.to_string(),
    }
}
