//! The Agency: the singleton factory of Step actors. It holds the loaded
//! bundles and their step hosts, and creates each (bundle, step) actor on
//! first use. Loading a bundle goes through [`AgencyHandle::load`], the one
//! gate: nothing in a bundle runs before it passes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use signing::BundleHash;
use tokio::sync::{mpsc, oneshot};

use crate::bundle::{self, Invalid, Manifest};
use crate::error::{Error, Result};
use crate::host::{HostCommand, StepHost};
use crate::step::StepHandle;

/// A bundle that passed every check and is ready to run.
#[derive(Debug)]
pub struct LoadedBundle {
    pub hash: BundleHash,
    pub manifest: Manifest,
    pub library: PathBuf,
}

enum Msg {
    Load {
        unpacked: bundle::Unpacked,
        reply: oneshot::Sender<Result<Arc<LoadedBundle>>>,
    },
    Resolve {
        kind: String,
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
    Kinds {
        reply: oneshot::Sender<Vec<(String, Arc<LoadedBundle>)>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Clone)]
pub(crate) struct AgencyHandle {
    tx: mpsc::Sender<Msg>,
}

impl AgencyHandle {
    pub(crate) fn spawn(host_command: HostCommand, grace: Duration) -> AgencyHandle {
        let (tx, rx) = mpsc::channel(1024);
        let handle = AgencyHandle { tx };
        let agency = Agency {
            handle: handle.clone(),
            host_command,
            grace,
            bundles: HashMap::new(),
            active: HashMap::new(),
            hosts: HashMap::new(),
            steps: HashMap::new(),
        };
        crate::actor::spawn("agency", agency.run(rx));
        handle
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// The gate: probes an unpacked bundle in a step host and registers it.
    pub(crate) async fn load(&self, unpacked: bundle::Unpacked) -> Result<Arc<LoadedBundle>> {
        self.ask(|reply| Msg::Load { unpacked, reply }).await?
    }

    /// The bundle that provides `kind` for new actions.
    pub(crate) async fn resolve(&self, kind: String) -> Result<Arc<LoadedBundle>> {
        self.ask(|reply| Msg::Resolve { kind, reply }).await?
    }

    pub(crate) async fn bundle(&self, hash: String) -> Result<Option<Arc<LoadedBundle>>> {
        self.ask(|reply| Msg::Bundle { hash, reply }).await
    }

    pub(crate) async fn step(&self, hash: BundleHash, step: String) -> Result<StepHandle> {
        self.ask(|reply| Msg::Step { hash, step, reply }).await?
    }

    /// A live host for the bundle, starting a fresh one if the last died.
    pub(crate) async fn host(&self, hash: BundleHash) -> Result<StepHost> {
        self.ask(|reply| Msg::Host { hash, reply }).await?
    }

    pub(crate) async fn kinds(&self) -> Result<Vec<(String, Arc<LoadedBundle>)>> {
        self.ask(|reply| Msg::Kinds { reply }).await
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
    /// kind → the bundle new actions of that kind are pinned to.
    active: HashMap<String, BundleHash>,
    hosts: HashMap<BundleHash, StepHost>,
    steps: HashMap<(BundleHash, String), StepHandle>,
}

impl Agency {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Load { unpacked, reply } => {
                    let _ = reply.send(self.load(unpacked).await);
                }
                Msg::Resolve { kind, reply } => {
                    let found = self
                        .active
                        .get(&kind)
                        .and_then(|h| self.bundles.get(h))
                        .cloned();
                    let _ = reply.send(found.ok_or_else(|| {
                        let mut known: Vec<&str> = self.active.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        Error::UnknownKind {
                            kind,
                            known: if known.is_empty() {
                                "none (no bundle is loaded)".into()
                            } else {
                                known.join(", ")
                            },
                        }
                    }));
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
                Msg::Kinds { reply } => {
                    let mut kinds: Vec<_> = self
                        .active
                        .iter()
                        .filter_map(|(k, h)| Some((k.clone(), self.bundles.get(h)?.clone())))
                        .collect();
                    kinds.sort_by(|a, b| a.0.cmp(&b.0));
                    let _ = reply.send(kinds);
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

    async fn load(&mut self, unpacked: bundle::Unpacked) -> Result<Arc<LoadedBundle>> {
        if let Some(existing) = self.bundles.get(&unpacked.hash) {
            return Ok(existing.clone());
        }
        let label = format!("{}@{}", unpacked.manifest.name, unpacked.hash.short());
        // Probe the library in a step host, never in this process.
        let host = StepHost::spawn(&self.host_command, &unpacked.library, &label).await?;
        let missing: Vec<String> = unpacked
            .manifest
            .functions()
            .into_iter()
            .filter(|f| !host.exports().iter().any(|e| e == f))
            .map(str::to_owned)
            .collect();
        if !missing.is_empty() {
            host.shutdown("bundle rejected").await;
            return Err(Invalid::MissingSteps(missing).into());
        }
        let loaded = Arc::new(LoadedBundle {
            hash: unpacked.hash,
            manifest: unpacked.manifest,
            library: unpacked.library,
        });
        for kind in loaded.manifest.kinds.keys() {
            self.active.insert(kind.clone(), loaded.hash);
        }
        self.hosts.insert(loaded.hash, host);
        self.bundles.insert(loaded.hash, loaded.clone());
        tracing::info!(bundle = %label, kinds = loaded.manifest.kinds.len(), "bundle loaded");
        Ok(loaded)
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
        tracing::info!(bundle = %label, "starting a fresh step host");
        let host = StepHost::spawn(&self.host_command, &bundle.library, &label).await?;
        self.hosts.insert(hash, host.clone());
        Ok(host)
    }

    async fn step(&mut self, hash: BundleHash, step: String) -> Result<StepHandle> {
        if let Some(handle) = self.steps.get(&(hash, step.clone())) {
            return Ok(handle.clone());
        }
        let bundle = self
            .bundles
            .get(&hash)
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_string()))?;
        let def = bundle.manifest.steps.get(&step).cloned().ok_or_else(|| {
            Error::InvalidRequest(format!("bundle {} has no step {step:?}", hash.short()))
        })?;
        let host = self.host(hash).await?;
        let handle = StepHandle::spawn(
            hash,
            step.clone(),
            def,
            host,
            self.handle.clone(),
            self.grace,
        );
        self.steps.insert((hash, step), handle.clone());
        Ok(handle)
    }
}
