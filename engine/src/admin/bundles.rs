//! Bundles and the keys that sign them, through the Source Authority.

use super::Admin;
use crate::authority::{Admitted, KeyInfo};
use crate::{Error, Result, bundle, model};

/// Where a bundle is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleStatus {
    /// New actions of its kinds use it.
    Active,
    /// Superseded, with actions still pinned to it.
    Draining,
    /// Superseded and unused; its step host has exited.
    Drained,
    /// Its signing key was revoked.
    Revoked,
}

impl BundleStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BundleStatus::Active => "active",
            BundleStatus::Draining => "draining",
            BundleStatus::Drained => "drained",
            BundleStatus::Revoked => "revoked",
        }
    }
}

/// A bundle the server holds.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    pub hash: String,
    pub name: String,
    pub version: String,
    pub abi: u32,
    pub size: u64,
    pub signer: String,
    pub status: BundleStatus,
    /// Unfinished actions pinned to it, across all servers.
    pub in_flight: i64,
    pub host_running: bool,
    pub kinds: Vec<String>,
    pub steps: Vec<String>,
    pub created_at: model::Timestamp,
    pub activated_at: model::Timestamp,
}

impl Admin {
    /// Hands a bundle and its detached signature to the Source Authority:
    /// the one way code gets into the engine. `by` names who asked (a
    /// token's name) for the audit log.
    pub async fn admit_bundle(
        &self,
        bytes: Vec<u8>,
        signature: String,
        by: &str,
    ) -> Result<Admitted> {
        self.authority.admit(bytes, signature, by.to_owned()).await
    }

    /// Makes a bundle the server holds the active version of its name again.
    pub async fn activate_bundle(&self, hash: &str, by: &str) -> Result<BundleInfo> {
        self.authority
            .activate(hash.to_owned(), by.to_owned())
            .await?;
        self.bundle(hash).await
    }

    /// Every bundle the server holds, oldest first.
    pub async fn bundles(&self) -> Result<Vec<BundleInfo>> {
        let rows = self.store.bundles().await?;
        let in_flight = self.store.in_flight_by_bundle().await?;
        let states = self.agency.states().await?;
        let revoked_keys: std::collections::HashSet<String> = self
            .keys()
            .await?
            .into_iter()
            .filter(|k| k.revoked)
            .map(|k| k.key.id().to_string())
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let state = states
                .iter()
                .find(|s| s.bundle.hash.to_string() == row.hash);
            let revoked = revoked_keys.contains(&row.signer);
            let n = in_flight.get(&row.hash).copied().unwrap_or(0);
            let status = match (revoked, state.is_some_and(|s| s.active), n) {
                (true, _, _) => BundleStatus::Revoked,
                (false, true, _) => BundleStatus::Active,
                (false, false, 0) => BundleStatus::Drained,
                (false, false, _) => BundleStatus::Draining,
            };
            let manifest = match state {
                Some(s) => Some(s.bundle.manifest.clone()),
                None => match self.store.bundle_content(&row.hash).await? {
                    Some(bytes) => bundle::inspect(&bytes).ok(),
                    None => None,
                },
            };
            let (kinds, steps) = manifest
                .map(|m| {
                    (
                        m.kinds.keys().cloned().collect(),
                        m.steps.keys().cloned().collect(),
                    )
                })
                .unwrap_or_default();
            out.push(BundleInfo {
                host_running: state.is_some_and(|s| s.host_running),
                hash: row.hash,
                name: row.name,
                version: row.version,
                abi: row.abi,
                size: row.size,
                signer: row.signer,
                status,
                in_flight: n,
                kinds,
                steps,
                created_at: row.created_at,
                activated_at: row.activated_at,
            });
        }
        Ok(out)
    }

    pub async fn bundle(&self, hash: &str) -> Result<BundleInfo> {
        self.bundles()
            .await?
            .into_iter()
            .find(|b| b.hash == hash)
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_owned()))
    }

    /// The signed bytes of a bundle the server holds.
    pub async fn bundle_content(&self, hash: &str) -> Result<Vec<u8>> {
        #[cfg(feature = "failpoints")]
        if let Some(ms) = (|| {
            fail::fail_point!("engine.bundle_content", |ms| ms
                .and_then(|ms| ms.parse::<u64>().ok()));
            None
        })() {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        self.store
            .bundle_content(hash)
            .await?
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_owned()))
    }

    /// The detached signature the bundle was admitted with (what a node
    /// verifies it by, with its own keys).
    pub async fn bundle_signature(&self, hash: &str) -> Result<String> {
        self.store
            .bundles()
            .await?
            .into_iter()
            .find(|b| b.hash == hash)
            .map(|b| b.signature)
            .ok_or_else(|| Error::BundleNotLoaded(hash.to_owned()))
    }

    pub async fn keys(&self) -> Result<Vec<KeyInfo>> {
        self.authority.keys().await
    }

    /// Trusts a public key (in its `ed25519:…` text form) for signing bundles.
    pub async fn trust_key(&self, public_key: &str, by: &str) -> Result<KeyInfo> {
        self.authority
            .trust(public_key.parse()?, by.to_owned())
            .await
    }

    /// Revokes a key: its bundles take no new actions, and actions in flight
    /// on them fail at their next step.
    pub async fn revoke_key(&self, key_id: &str, by: &str) -> Result<KeyInfo> {
        self.authority
            .revoke(key_id.to_owned(), by.to_owned())
            .await
    }
}
