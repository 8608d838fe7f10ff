//! The Source Authority: every bundle passes through it before anything in
//! it runs. It accepts a bundle only if its signature verifies under a trusted
//! key that is not revoked, its bytes are complete and hash to what was
//! signed, its archive and manifest are sound, its library exports every step
//! (probed in a step host), and its version is newer than every version of
//! that name accepted before. A rejected bundle leaves nothing behind.
//!
//! It also owns the trusted keys (configuration plus `trusted_keys`) and
//! restores accepted bundles from the database at start.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;
use signing::{BundleHash, KeyId, PublicKey, Signature, Trust, VerifiedBundle};
use tokio::sync::{mpsc, oneshot};

use crate::agency::{AgencyHandle, LoadedBundle};
use crate::bundle::{self, manifest::compare_versions};
use crate::error::{Error, Result};
use crate::store::{AuditEntry, BundleRow, ConfigKind, Store, Write};

/// What happened to a pushed bundle.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub bundle: Arc<LoadedBundle>,
    /// False when the server already held these exact bytes.
    pub created: bool,
}

/// A key the server knows.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub key: PublicKey,
    pub revoked: bool,
    /// Whether it came from the server's configuration (else the API added it).
    pub configured: bool,
}

enum Msg {
    Admit {
        bytes: Vec<u8>,
        signature: String,
        by: String,
        reply: oneshot::Sender<Result<Admitted>>,
    },
    Activate {
        hash: String,
        by: String,
        reply: oneshot::Sender<Result<Arc<LoadedBundle>>>,
    },
    Trust {
        key: PublicKey,
        by: String,
        reply: oneshot::Sender<Result<KeyInfo>>,
    },
    Revoke {
        id: String,
        by: String,
        reply: oneshot::Sender<Result<KeyInfo>>,
    },
    Keys {
        reply: oneshot::Sender<Vec<KeyInfo>>,
    },
    Fetch {
        hash: String,
        reply: oneshot::Sender<Result<Arc<LoadedBundle>>>,
    },
    Sync {
        reply: oneshot::Sender<Result<()>>,
    },
}

#[derive(Clone)]
pub(crate) struct AuthorityHandle {
    tx: mpsc::Sender<Msg>,
}

impl AuthorityHandle {
    /// Starts the authority and restores the bundles the database holds: for
    /// each name its active version, plus any version unfinished actions are
    /// pinned to.
    pub(crate) async fn start(
        store: Store,
        agency: AgencyHandle,
        root: PathBuf,
        configured: Vec<PublicKey>,
    ) -> Result<AuthorityHandle> {
        let mut trust = Trust::default();
        for key in &configured {
            trust.add(key.clone());
        }
        take_keys(&mut trust, &store.keys().await?);
        for (key, revoked) in trust.keys() {
            if revoked {
                agency.revoke(key.id());
            }
        }
        let configured = configured.iter().map(PublicKey::id).collect();
        let seen = store.generation(ConfigKind::Bundles).await?;
        let mut authority = Authority {
            store,
            agency,
            root,
            trust,
            configured,
            seen,
        };
        authority.restore().await?;
        let (tx, rx) = mpsc::channel(64);
        crate::tasks::spawn(crate::tasks::TaskKind::SourceAuthority, authority.run(rx));
        Ok(AuthorityHandle { tx })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// `by` names who asked, for the audit log.
    pub(crate) async fn admit(
        &self,
        bytes: Vec<u8>,
        signature: String,
        by: String,
    ) -> Result<Admitted> {
        self.ask(|reply| Msg::Admit {
            bytes,
            signature,
            by,
            reply,
        })
        .await?
    }

    pub(crate) async fn activate(&self, hash: String, by: String) -> Result<Arc<LoadedBundle>> {
        self.ask(|reply| Msg::Activate { hash, by, reply }).await?
    }

    pub(crate) async fn trust(&self, key: PublicKey, by: String) -> Result<KeyInfo> {
        self.ask(|reply| Msg::Trust { key, by, reply }).await?
    }

    pub(crate) async fn revoke(&self, id: String, by: String) -> Result<KeyInfo> {
        self.ask(|reply| Msg::Revoke { id, by, reply }).await?
    }

    pub(crate) async fn keys(&self) -> Result<Vec<KeyInfo>> {
        self.ask(|reply| Msg::Keys { reply }).await
    }

    /// The bundle `hash`, loaded: as the Agency holds it, else from the
    /// database through this server's own checks (verified under its own
    /// trust, unpacked, probed). It is not made active.
    pub(crate) async fn fetch(&self, hash: String) -> Result<Arc<LoadedBundle>> {
        self.ask(|reply| Msg::Fetch { hash, reply }).await?
    }

    /// Takes in what other servers changed: keys trusted or revoked in
    /// `trusted_keys`, and the active version of each bundle name in
    /// `active_bundles`, each loaded through this server's own checks.
    pub(crate) async fn sync(&self) -> Result<()> {
        self.ask(|reply| Msg::Sync { reply }).await?
    }
}

/// Takes what `trusted_keys` holds into `trust`: the keys it does not know
/// yet, and revocations. Returns the keys it revoked.
fn take_keys(trust: &mut Trust, rows: &[crate::store::KeyRow]) -> Vec<KeyId> {
    let mut revoked = Vec::new();
    for row in rows {
        let key = match row.public_key.parse::<PublicKey>() {
            Ok(key) => key,
            Err(e) => {
                tracing::warn!(key_id = %row.key_id, error = %e, "ignoring an unreadable key in trusted_keys");
                continue;
            }
        };
        let id = key.id();
        if !trust.keys().any(|(k, _)| k.id() == id) {
            trust.add(key);
        }
        if row.revoked_at.is_some() && !trust.is_revoked(id) {
            trust.revoke(id);
            revoked.push(id);
        }
    }
    revoked
}

struct Authority {
    store: Store,
    agency: AgencyHandle,
    root: PathBuf,
    trust: Trust,
    configured: HashSet<KeyId>,
    /// The bundles' generation what this authority holds reflects: a push
    /// or activation is written only if it is still current
    /// ([`Store::record_guarded`]), so one checked against a stale view
    /// (another server activated something meanwhile) is checked again.
    seen: i64,
}

/// How many times a push or activation is checked again after another
/// server changed the bundles meanwhile.
const STALE_TRIES: usize = 5;

impl Authority {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Admit {
                    bytes,
                    signature,
                    by,
                    reply,
                } => {
                    let _ = reply.send(self.admit(bytes, &signature, &by).await);
                }
                Msg::Activate { hash, by, reply } => {
                    let _ = reply.send(self.activate(&hash, &by).await);
                }
                Msg::Trust { key, by, reply } => {
                    let _ = reply.send(self.add_key(key, &by).await);
                }
                Msg::Revoke { id, by, reply } => {
                    let _ = reply.send(self.revoke(&id, &by).await);
                }
                Msg::Keys { reply } => {
                    let _ = reply.send(self.key_infos());
                }
                Msg::Fetch { hash, reply } => {
                    let _ = reply.send(self.fetch(&hash).await);
                }
                Msg::Sync { reply } => {
                    let _ = reply.send(self.sync().await);
                }
            }
        }
    }

    fn key_infos(&self) -> Vec<KeyInfo> {
        self.trust
            .keys()
            .map(|(key, revoked)| KeyInfo {
                key: key.clone(),
                revoked,
                configured: self.configured.contains(&key.id()),
            })
            .collect()
    }

    fn key_info(&self, id: KeyId) -> Result<KeyInfo> {
        self.key_infos()
            .into_iter()
            .find(|k| k.key.id() == id)
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))
    }

    /// [`Authority::try_admit`], checked again against what another server
    /// changed meanwhile.
    async fn admit(&mut self, bytes: Vec<u8>, signature: &str, by: &str) -> Result<Admitted> {
        for _ in 1..STALE_TRIES {
            match self.try_admit(bytes.clone(), signature, by).await {
                Err(Error::StaleConfig(_)) => {
                    tracing::info!(
                        "the bundles changed on another server while this change was checked; checking it again"
                    );
                    self.sync().await?
                }
                done => return done,
            }
        }
        self.try_admit(bytes, signature, by).await
    }

    /// [`Authority::try_activate`], checked again against what another
    /// server changed meanwhile.
    async fn activate(&mut self, hash: &str, by: &str) -> Result<Arc<LoadedBundle>> {
        for _ in 1..STALE_TRIES {
            match self.try_activate(hash, by).await {
                Err(Error::StaleConfig(_)) => {
                    tracing::info!(
                        "the bundles changed on another server while this change was checked; checking it again"
                    );
                    self.sync().await?
                }
                done => return done,
            }
        }
        self.try_activate(hash, by).await
    }

    /// Records a change to the bundles, if nothing changed them since this
    /// authority last looked.
    async fn record_bundles(&mut self, change: Write, audit: AuditEntry, name: &str) -> Result<()> {
        // A test's slow commit: `return(NAME:MS)` holds a change to the
        // bundle NAME for MS milliseconds between its checks and its commit.
        #[cfg(feature = "failpoints")]
        if let Some(ms) = (|| {
            fail::fail_point!("authority.before_record", |arg| arg.and_then(|a| {
                let (held, ms) = a.split_once(':')?;
                (held == name).then(|| ms.parse::<u64>().ok()).flatten()
            }));
            None
        })() {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let _ = name;
        self.store
            .record_guarded(vec![change], audit, (ConfigKind::Bundles, self.seen))
            .await?;
        self.seen += 1;
        Ok(())
    }

    async fn try_admit(&mut self, bytes: Vec<u8>, signature: &str, by: &str) -> Result<Admitted> {
        let signature = Signature::from_text(signature)?;
        let verified = signing::verify(bytes, &signature, &self.trust)?;
        let hash = verified.hash();
        let rows = self.store.bundles().await?;
        if rows.iter().any(|r| r.hash == hash.to_string()) {
            let bundle = self.load(&verified).await?;
            // Held already: only make it active if its name has no active
            // version here (going back to an older one stays explicit).
            let name_active = self
                .agency
                .states()
                .await?
                .iter()
                .any(|st| st.active && st.bundle.manifest.name == bundle.manifest.name);
            if !name_active {
                self.check_kinds(&bundle.manifest).await?;
                self.agency.activate(hash).await?;
            }
            return Ok(Admitted {
                bundle,
                created: false,
            });
        }
        let claims = verified.claims();
        let manifest = bundle::inspect(verified.bytes())?;
        manifest.check_new()?;
        self.check_kinds(&manifest).await?;
        if let Some(newest) = rows
            .iter()
            .filter(|r| r.name == claims.name)
            .map(|r| r.version.as_str())
            .max_by(|a, b| compare_versions(a, b))
            && compare_versions(&claims.version, newest) != std::cmp::Ordering::Greater
        {
            return Err(Error::VersionNotNewer {
                name: claims.name.clone(),
                version: claims.version.clone(),
                newest: newest.to_owned(),
            });
        }
        let bundle = self.load(&verified).await?;
        let now = crate::model::now();
        let row = BundleRow {
            hash: hash.to_string(),
            name: claims.name.clone(),
            version: claims.version.clone(),
            abi: claims.abi,
            size: claims.size,
            signer: verified.key_id().to_string(),
            signature: verified.signature().to_text(),
            created_at: now,
            activated_at: now,
        };
        let content: Arc<[u8]> = verified.bytes().into();
        let audit = AuditEntry::new(
            by,
            "bundle.pushed",
            &row.hash,
            json!({ "name": row.name, "version": row.version, "signer": row.signer }),
        );
        let name = row.name.clone();
        self.record_bundles(Write::InsertBundle(Box::new(row), content), audit, &name)
            .await?;
        self.agency.activate(hash).await?;
        Ok(Admitted {
            bundle,
            created: true,
        })
    }

    /// Refuses a bundle that would provide a kind another bundle name's
    /// active version provides: each kind comes from exactly one bundle, so
    /// which code runs never depends on order.
    async fn check_kinds(&self, manifest: &bundle::Manifest) -> Result<()> {
        for state in self.agency.states().await? {
            let other = &state.bundle.manifest;
            if !state.active || state.revoked || other.name == manifest.name {
                continue;
            }
            let kinds: Vec<String> = manifest
                .kinds
                .keys()
                .filter(|k| other.kinds.contains_key(*k))
                .cloned()
                .collect();
            if !kinds.is_empty() {
                return Err(Error::KindConflict {
                    bundle: manifest.name.clone(),
                    other: format!("{} {}", other.name, other.version),
                    kinds,
                });
            }
        }
        Ok(())
    }

    /// Unpacks and probes a verified bundle; on any failure removes what it
    /// unpacked.
    async fn load(&self, verified: &VerifiedBundle) -> Result<Arc<LoadedBundle>> {
        let root = self.root.clone();
        let v = verified.clone();
        let unpacked = tokio::task::spawn_blocking(move || bundle::open(&v, &root))
            .await
            .map_err(|_| Error::ShuttingDown)??;
        let dir = unpacked.dir.clone();
        let claims = verified.claims();
        let m = &unpacked.manifest;
        let result = if (m.name.as_str(), m.version.as_str(), m.abi)
            != (claims.name.as_str(), claims.version.as_str(), claims.abi)
        {
            Err(Error::ClaimsMismatch {
                signed: format!("{} {} (ABI {})", claims.name, claims.version, claims.abi),
                manifest: format!("{} {} (ABI {})", m.name, m.version, m.abi),
            })
        } else {
            self.agency.register(unpacked, verified.key_id()).await
        };
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    async fn try_activate(&mut self, hash: &str, by: &str) -> Result<Arc<LoadedBundle>> {
        let parsed: BundleHash = hash
            .parse()
            .map_err(|_| Error::BundleNotLoaded(hash.to_owned()))?;
        let bundle = self.fetch(hash).await?;
        if self.trust.is_revoked(bundle.signer) {
            return Err(Error::BundleRevoked {
                hash: hash.to_owned(),
                key: bundle.signer.to_string(),
            });
        }
        let active = self
            .agency
            .states()
            .await?
            .iter()
            .any(|st| st.active && st.bundle.hash == bundle.hash);
        if active {
            // Active already: nothing changes, nothing to record.
            return Ok(bundle);
        }
        self.check_kinds(&bundle.manifest).await?;
        let audit = AuditEntry::new(
            by,
            "bundle.activated",
            hash,
            json!({ "name": bundle.manifest.name, "version": bundle.manifest.version }),
        );
        let activate = Write::ActivateBundle {
            hash: hash.to_owned(),
            at: crate::model::now(),
        };
        self.record_bundles(activate, audit, &bundle.manifest.name)
            .await?;
        self.agency.activate(parsed).await?;
        Ok(bundle)
    }

    /// See [`AuthorityHandle::fetch`].
    async fn fetch(&self, hash: &str) -> Result<Arc<LoadedBundle>> {
        if let Some(b) = self.agency.bundle(hash.to_owned()).await? {
            return Ok(b);
        }
        let content = self
            .store
            .bundle_content(hash)
            .await?
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_owned()))?;
        let row = self
            .store
            .bundles()
            .await?
            .into_iter()
            .find(|r| r.hash == hash);
        let signature = row
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_owned()))?
            .signature;
        let verified = signing::verify(content, &Signature::from_text(&signature)?, &self.trust)?;
        self.load(&verified).await
    }

    /// See [`AuthorityHandle::sync`]. A bundle this server cannot load (a
    /// signer it does not trust, a library that does not probe) is not
    /// made active here: the server keeps what it had, and says so.
    async fn sync(&mut self) -> Result<()> {
        // Read first: what follows reflects at least this generation.
        let seen = self.store.generation(ConfigKind::Bundles).await?;
        for id in take_keys(&mut self.trust, &self.store.keys().await?) {
            self.agency.revoke(id);
            tracing::warn!(key_id = %id, "key revoked on another server: its bundles take no new actions here and in-flight ones fail at their next step");
        }
        let pointers = self.store.active_bundles().await?;
        let rows = self.store.bundles().await?;
        let states = self.agency.states().await?;
        for (name, hash) in &pointers {
            if states
                .iter()
                .any(|st| st.active && st.bundle.hash.to_string() == *hash)
            {
                continue;
            }
            let Some(row) = rows.iter().find(|r| r.hash == *hash) else {
                continue;
            };
            if row
                .signer
                .parse()
                .is_ok_and(|id: KeyId| self.trust.is_revoked(id))
            {
                continue;
            }
            let loaded = match self.fetch(hash).await {
                Ok(b) => self.agency.activate(b.hash).await,
                Err(e) => Err(e),
            };
            match loaded {
                Ok(()) => {
                    tracing::info!(bundle = %name, version = %row.version, hash = %hash, "bundle activated on another server is active here")
                }
                Err(e) => {
                    tracing::warn!(bundle = %name, version = %row.version, hash = %hash, error = %e, "a bundle activated on another server is not loaded here; this server keeps the version it had")
                }
            }
        }
        self.seen = seen;
        Ok(())
    }

    async fn add_key(&mut self, key: PublicKey, by: &str) -> Result<KeyInfo> {
        let id = key.id();
        if self.trust.is_revoked(id) {
            return Err(Error::KeyRevoked(id.to_string()));
        }
        let known = self
            .store
            .keys()
            .await?
            .iter()
            .any(|k| k.key_id == id.to_string());
        if !known {
            let write = Write::TrustKey {
                key_id: id.to_string(),
                public_key: key.to_string(),
                at: crate::model::now(),
            };
            let audit = AuditEntry::new(
                by,
                "key.trusted",
                &id.to_string(),
                json!({ "public_key": key.to_string() }),
            );
            self.store.record(vec![write], audit).await?;
        }
        self.trust.add(key);
        tracing::info!(key_id = %id, "key trusted");
        self.key_info(id)
    }

    async fn revoke(&mut self, id: &str, by: &str) -> Result<KeyInfo> {
        let id: KeyId = id.parse().map_err(|_| Error::KeyNotFound(id.to_owned()))?;
        let info = self.key_info(id)?;
        if info.revoked {
            return Ok(info);
        }
        let key = info.key;
        let write = Write::RevokeKey {
            key_id: id.to_string(),
            public_key: key.to_string(),
            at: crate::model::now(),
        };
        let audit = AuditEntry::new(by, "key.revoked", &id.to_string(), json!({}));
        self.store.record(vec![write], audit).await?;
        self.trust.revoke(id);
        self.agency.revoke(id);
        tracing::warn!(key_id = %id, "key revoked: its bundles take no new actions and in-flight ones fail at their next step");
        self.key_info(id)
    }

    /// Loads, at start, what the database says should be loaded.
    async fn restore(&mut self) -> Result<()> {
        let rows = self.store.bundles().await?;
        let pinned = self.store.in_flight_by_bundle().await?;
        let pointers = self.store.active_bundles().await?;
        let usable = |r: &&BundleRow| r.signer.parse().is_ok_and(|id| !self.trust.is_revoked(id));
        // Each name's version in `active_bundles`; if its signer is
        // revoked, the usable one activated last.
        let mut active: std::collections::HashMap<&str, &BundleRow> =
            std::collections::HashMap::new();
        for row in rows.iter().filter(usable) {
            let pointed = |r: &BundleRow| pointers.get(&r.name) == Some(&r.hash);
            let e = active.entry(row.name.as_str()).or_insert(row);
            if !pointed(e) && (pointed(row) || row.activated_at > e.activated_at) {
                *e = row;
            }
        }
        for row in &rows {
            let is_active = active
                .get(row.name.as_str())
                .is_some_and(|a| a.hash == row.hash);
            if !is_active && !pinned.contains_key(&row.hash) {
                continue;
            }
            let content = match self.store.bundle_content(&row.hash).await? {
                Some(c) => c,
                None => continue,
            };
            let loaded = async {
                let verified =
                    signing::verify(content, &Signature::from_text(&row.signature)?, &self.trust)?;
                self.load(&verified).await
            }
            .await;
            match loaded {
                Ok(b) if is_active => self.agency.activate(b.hash).await?,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(bundle = %row.name, version = %row.version, hash = %row.hash, error = %e, "stored bundle not loaded")
                }
            }
        }
        Ok(())
    }
}
