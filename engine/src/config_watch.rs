//! Shared configuration in every server's memory: API tokens (`Tokens`),
//! trusted keys and active bundles (the Source Authority, the Agency), and
//! node drains and removals (`Nodes`).
//!
//! Every change to one of them commits with a bump of its kind's counter
//! in `generations` ([`crate::store::Store::record`]). Each server polls
//! the counters every [`POLL`] and reloads a kind whose counter moved, so a
//! change made through any server holds on every other within a poll and
//! a reload: a revoked token or key is refused within about 0.6 s, a
//! pushed bundle runs within 2 s (its reload unpacks and probes it). A
//! bundle is taken in only through this server's own Source Authority
//! (verified under its own trusted keys, unpacked, probed): no server
//! trusts another's verdict. The server that made a change applies it at
//! once, as before; its own reload then finds nothing to do.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::access::Tokens;
use crate::authority::AuthorityHandle;
use crate::model::NodeStatus;
use crate::nodes::Nodes;
use crate::store::{ConfigKind, Store};

/// How often every server reads `generations`.
pub const POLL: Duration = Duration::from_millis(500);

/// What the watch reloads.
pub(crate) struct ConfigWatch {
    pub(crate) store: Store,
    pub(crate) tokens: Tokens,
    pub(crate) authority: AuthorityHandle,
    pub(crate) nodes: Nodes,
}

impl ConfigWatch {
    /// Polls until `stop`, starting from the generations `seen` (read
    /// before this server loaded what they count).
    pub(crate) fn spawn(self, mut seen: HashMap<ConfigKind, i64>, stop: CancellationToken) {
        crate::tasks::spawn(crate::tasks::TaskKind::ConfigWatch, async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = stop.cancelled() => return,
                }
                let generations = match self.store.generations().await {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the generations of shared configuration");
                        continue;
                    }
                };
                let moved: BTreeSet<ConfigKind> = generations
                    .iter()
                    .filter(|(kind, g)| seen.get(kind) != Some(g))
                    .map(|(kind, _)| *kind)
                    .collect();
                if moved.is_empty() {
                    continue;
                }
                #[cfg(feature = "failpoints")]
                if let Some(ms) = (|| {
                    fail::fail_point!("config_watch.reload", |ms| ms
                        .and_then(|ms| ms.parse::<u64>().ok()));
                    None
                })() {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let mut done = BTreeSet::new();
                if moved.contains(&ConfigKind::Tokens) {
                    match self.store.tokens().await {
                        Ok(rows) => {
                            self.tokens.replace_all(rows);
                            done.insert(ConfigKind::Tokens);
                        }
                        Err(e) => tracing::warn!(error = %e, "could not reload API tokens"),
                    }
                }
                // Keys before bundles: what a bundle may be loaded under
                // depends on them.
                if moved.contains(&ConfigKind::Keys) || moved.contains(&ConfigKind::Bundles) {
                    match self.authority.sync().await {
                        Ok(()) => {
                            done.insert(ConfigKind::Keys);
                            done.insert(ConfigKind::Bundles);
                        }
                        Err(e) => tracing::warn!(error = %e, "could not reload keys and bundles"),
                    }
                }
                if moved.contains(&ConfigKind::Nodes) {
                    match self.sync_nodes().await {
                        Ok(()) => {
                            done.insert(ConfigKind::Nodes);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not reload node drains and removals")
                        }
                    }
                }
                // A kind that failed keeps its old generation: tried again
                // at the next poll.
                for (kind, g) in generations {
                    if done.contains(&kind) {
                        seen.insert(kind, g);
                    }
                }
            }
        });
    }

    /// Applies the drains and removals the `nodes` table holds.
    async fn sync_nodes(&self) -> crate::Result<()> {
        let rows = self.store.node_rows(None).await?;
        let drained = rows
            .iter()
            .filter(|r| r.draining_since.is_some())
            .map(|r| r.name.clone())
            .collect();
        let removed: Vec<String> = rows
            .iter()
            .filter(|r| r.status == NodeStatus::Removed)
            .map(|r| r.name.clone())
            .collect();
        let accepted: Vec<String> = rows
            .iter()
            .filter(|r| r.status == NodeStatus::Accepted)
            .map(|r| r.name.clone())
            .collect();
        self.nodes.apply_admin(&drained, &removed, &accepted);
        Ok(())
    }
}

/// The generations as they stand, to start a watch from.
pub(crate) async fn generations(store: &Store) -> crate::Result<HashMap<ConfigKind, i64>> {
    Ok(store.generations().await?.into_iter().collect())
}
