//! Node admission and the admin's say over nodes: accept, remove, drain.

use serde_json::json;

use super::Admin;
use crate::model::{self, NodeStatus};
use crate::store::{self, AuditEntry, Store, Write};
use crate::{Error, Result, access, nodes, placement, signing};

impl Admin {
    /// Decides on a node's hello, its key already proven (it signed the
    /// challenge). A name belongs to the key it was accepted with: another
    /// key is refused, and so is a removed one. A new name is accepted with
    /// a join token whose rules allow it (the name, a use left); without
    /// one the node waits in memory (`Nodes::ask_to_join`, capped), nothing
    /// written, until an admin accepts its key.
    pub async fn admit_node(
        &self,
        name: &str,
        key: &signing::PublicKey,
        token: Option<&access::Principal>,
        capabilities: &std::collections::BTreeMap<String, String>,
        address: Option<&str>,
    ) -> Result<nodes::Admission> {
        use nodes::Admission;
        let now = model::now();
        let key_text = key.to_string();
        let known = match self.node(name).await {
            Ok(row) => Some(row),
            Err(Error::NodeNotFound(_)) => None,
            Err(e) => return Err(e),
        };
        match known {
            Some(row) if row.status == NodeStatus::Accepted && row.public_key == key_text => {
                let allowed = allowed_capabilities(&row);
                let mut row = row;
                row.capabilities = Some(json!(capabilities).to_string());
                row.last_seen_at = Some(now);
                self.store
                    .write(vec![Write::PutNode(Box::new(row))])
                    .await?;
                return Ok(Admission::Accepted { allowed });
            }
            Some(row) if row.status == NodeStatus::Accepted => {
                return Ok(Admission::Refused(format!(
                    "the name {name:?} belongs to another node key; pick another --name, or have an admin remove the old node (`troupe nodes remove {name}`)"
                )));
            }
            Some(row) if row.status == NodeStatus::Removed && row.public_key == key_text => {
                return Ok(Admission::Refused(format!(
                    "node {name:?} was removed; its key is no longer accepted (a new key, from a fresh data directory, can join again)"
                )));
            }
            // New, waiting (a row from before waiting nodes were kept in
            // memory), or a removed name taken by a new key.
            _ => {}
        }
        let Some(token) = token else {
            let asked = self.shared.nodes.ask_to_join(nodes::PendingNode {
                name: name.to_owned(),
                key: key.clone(),
                capabilities: capabilities.clone(),
                address: address.map(str::to_owned),
                first_seen: now,
                last_seen: now,
            });
            return Ok(if asked {
                Admission::Pending
            } else {
                Admission::Refused(format!(
                    "{} nodes already wait for an admin on this server; join with a join token (`troupe nodes token create`)",
                    nodes::MAX_PENDING
                ))
            });
        };
        let rules = token.join.clone();
        if let Some(rules) = &rules {
            if !rules.allows_name(name) {
                return Ok(Admission::Refused(format!(
                    "join token {:?} does not let a node take the name {name:?} (it allows {})",
                    token.name,
                    rules.names.as_deref().unwrap_or("*")
                )));
            }
            let used = self
                .store
                .write(vec![Write::UseJoinToken {
                    id: token.token_id.clone(),
                    max_uses: rules.max_uses,
                    at: now,
                }])
                .await?;
            if !matches!(used.first(), Some(store::Outcome::Done { rows: 1 })) {
                return Ok(Admission::Refused(format!(
                    "join token {:?} has no uses left (it admitted {} node(s)); ask an admin for a new one",
                    token.name,
                    rules.max_uses.unwrap_or_default()
                )));
            }
        }
        let allowed = rules.and_then(|r| r.capabilities);
        let row = store::NodeRow {
            name: name.to_owned(),
            public_key: key_text,
            status: NodeStatus::Accepted,
            created_at: now,
            accepted_at: Some(now),
            accepted_by: Some(token.name.clone()),
            capabilities: Some(json!(capabilities).to_string()),
            last_seen_at: Some(now),
            draining_since: None,
            allowed_capabilities: allowed.as_ref().map(|a| json!(a).to_string()),
        };
        let audit = AuditEntry::new(
            &token.name,
            "node.joined",
            name,
            json!({ "public_key": row.public_key, "fingerprint": key.fingerprint(), "allowed_capabilities": allowed }),
        );
        self.store
            .record(vec![Write::PutNode(Box::new(row))], audit)
            .await?;
        self.shared.nodes.forget_pending(name);
        Ok(Admission::Accepted { allowed })
    }

    /// Lets in the node that holds `key` under `name` (it takes calls from
    /// its next connection): `key` is a waiting node's fingerprint
    /// (`SHA256:…`) or a whole public key (`ed25519:…`), which admits a
    /// node before it has ever connected. Accepting the key already in is
    /// no change and writes nothing.
    pub async fn accept_node(&self, name: &str, key: &str, by: &str) -> Result<store::NodeRow> {
        if !placement::is_capability_name(name) {
            return Err(Error::InvalidRequest(format!(
                "{name:?} is not a node name (letters, digits, '-', '_', '.'; at most 64)"
            )));
        }
        let key = key.trim();
        let known = match self.node(name).await {
            Ok(row) => Some(row),
            Err(Error::NodeNotFound(_)) => None,
            Err(e) => return Err(e),
        };
        // The key the name already has, named by its text or fingerprint.
        let known_key = known
            .as_ref()
            .and_then(|r| r.public_key.parse::<signing::PublicKey>().ok())
            .filter(|k| k.to_string() == key || k.fingerprint() == key);
        let public_key = match (known_key, key.parse::<signing::PublicKey>()) {
            (Some(k), _) | (None, Ok(k)) => k,
            (None, Err(_)) if key.starts_with("ed25519:") => {
                return Err(Error::InvalidRequest(format!(
                    "{key:?} is not a public key (ed25519:<64 hex digits>)"
                )));
            }
            (None, Err(_)) => match self.shared.nodes.pending_key(name, key) {
                Some(p) => p.key,
                None => {
                    return Err(Error::PendingKeyNotFound {
                        name: name.to_owned(),
                        key: key.to_owned(),
                    });
                }
            },
        };
        let key_text = public_key.to_string();
        if let Some(row) = &known
            && row.status == NodeStatus::Accepted
        {
            if row.public_key == key_text {
                return Ok(row.clone());
            }
            let fingerprint = row
                .public_key
                .parse::<signing::PublicKey>()
                .map(|k| k.fingerprint())
                .unwrap_or_else(|_| row.public_key.clone());
            return Err(Error::NodeKeyConflict {
                name: name.to_owned(),
                fingerprint,
            });
        }
        let now = model::now();
        let row = store::NodeRow {
            name: name.to_owned(),
            public_key: key_text,
            status: NodeStatus::Accepted,
            created_at: known.as_ref().map_or(now, |r| r.created_at),
            accepted_at: Some(now),
            accepted_by: Some(by.to_owned()),
            capabilities: known.as_ref().and_then(|r| r.capabilities.clone()),
            last_seen_at: known.as_ref().and_then(|r| r.last_seen_at),
            draining_since: known.as_ref().and_then(|r| r.draining_since),
            allowed_capabilities: None,
        };
        self.put_node(&row, by, "node.accepted").await?;
        self.shared.nodes.forget_pending(name);
        Ok(row)
    }

    /// Removes a node: its key is refused from now on and its connection
    /// ends at once (its steps in flight fail naming it).
    pub async fn remove_node(&self, name: &str, by: &str) -> Result<store::NodeRow> {
        let mut row = self.node(name).await?;
        // Removed already: nothing changes, nothing to record.
        if row.status != NodeStatus::Removed {
            row.status = NodeStatus::Removed;
            self.put_node(&row, by, "node.removed").await?;
            tracing::warn!(node = %name, by, "node removed");
        }
        self.shared.nodes.forget_pending(name);
        self.shared
            .nodes
            .disconnect(name, "this node was removed by an admin");
        Ok(row)
    }

    /// Stores a node's changed row with the audit entry that records it.
    async fn put_node(&self, row: &store::NodeRow, by: &str, event: &str) -> Result<()> {
        let fingerprint = row
            .public_key
            .parse::<signing::PublicKey>()
            .map(|k| k.fingerprint())
            .ok();
        let audit = AuditEntry::new(
            by,
            event,
            &row.name,
            json!({ "public_key": row.public_key, "fingerprint": fingerprint }),
        );
        self.store
            .record(vec![Write::PutNode(Box::new(row.clone()))], audit)
            .await?;
        Ok(())
    }

    /// Drains a node (or, with `draining: false`, gives it steps again):
    /// it gets no new steps; those in flight finish. Kept in its row, so it
    /// holds across reconnects and server restarts.
    pub async fn drain_node(&self, name: &str, draining: bool, by: &str) -> Result<store::NodeRow> {
        let mut row = self.node(name).await?;
        if row.draining_since.is_some() != draining {
            row.draining_since = draining.then(model::now);
            let event = if draining {
                "node.drained"
            } else {
                "node.undrained"
            };
            self.put_node(&row, by, event).await?;
        }
        self.shared.nodes.set_draining(name, draining);
        Ok(row)
    }

    /// Every node that joined (or, before waiting nodes were kept in memory,
    /// asked to), by name.
    pub async fn node_rows(&self) -> Result<Vec<store::NodeRow>> {
        self.store.node_rows(None).await
    }

    /// The node that joined or asked to under `name`.
    pub async fn node(&self, name: &str) -> Result<store::NodeRow> {
        self.store
            .node_rows(Some(name))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::NodeNotFound(name.to_owned()))
    }
}

/// The node registry, with the nodes an admin drained marked so.
pub(crate) async fn drained_nodes(
    store: &Store,
    results: crate::node_results::NodeResults,
) -> Result<nodes::Nodes> {
    let nodes = nodes::Nodes::new(Some(results));
    for row in store.node_rows(None).await? {
        if row.draining_since.is_some() {
            nodes.set_draining(&row.name, true);
        }
    }
    Ok(nodes)
}

/// The capability patterns a node's admission allowed, as stored in its
/// row; `None`: any it reports.
fn allowed_capabilities(row: &store::NodeRow) -> Option<Vec<String>> {
    row.allowed_capabilities
        .as_deref()
        .and_then(|a| serde_json::from_str(a).ok())
}
