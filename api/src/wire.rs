//! The JSON the API speaks. These types are the public contract (and the
//! source of `/openapi.json`); the engine's own types never leave the server
//! directly.

use std::collections::BTreeMap;

use chrono::SecondsFormat;
use engine::model::{Action, StepRecord, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A request to run an action.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"kind": "reboot", "target": "vps-123", "params": {"host": "10.0.0.5", "port": 22}, "idempotency_key": "req-8c1f"}))]
pub struct SubmitRequest {
    /// The action kind (see `GET /v1/kinds`).
    pub kind: String,
    /// What the action is for; one target's actions run one at a time, in order.
    pub target: String,
    /// The kind's params, checked against its schema.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: Map<String, Value>,
    /// Makes resubmitting safe: the same key and request return the first action.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Pin the action to this bundle hash instead of the kind's active
    /// bundle. Any token that may submit may name the active version; a
    /// version other than the active one (a rollback) needs the admin scope.
    #[serde(default)]
    pub bundle: Option<String>,
}

/// An action; `steps` only where one action is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionView {
    pub id: i64,
    pub kind: String,
    pub target: String,
    #[schema(value_type = Object)]
    pub params: Map<String, Value>,
    /// queued, running, succeeded, failed or cancelled.
    #[schema(value_type = String, example = "running")]
    pub status: &'static str,
    /// SHA-256 of the bundle the action is pinned to.
    pub bundle: String,
    pub current_step: Option<String>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    /// The name of the API token that submitted it.
    pub submitted_by: Option<String>,
    /// The server that holds it while it is unfinished (`troupe servers
    /// list`); none once it has ended, or while it waits to be taken over.
    pub server: Option<String>,
    /// Bumped on every change; pass it as `since` to wait for the next one.
    pub revision: i64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// When a cancel was first asked for. Once set, the action ends
    /// `cancelled` at its next chance, even across a restart.
    pub cancel_requested_at: Option<String>,
    /// While its current step waits for a node: what that node must have
    /// (the step's `waiting_for`).
    pub waiting_for: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepView>>,
}

/// One step of an action.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepView {
    pub seq: u32,
    pub name: String,
    /// The bundle step definition it runs.
    pub step: String,
    /// pending, waiting (for a node), running, succeeded, failed, skipped or cancelled.
    #[schema(value_type = String, example = "succeeded")]
    pub status: &'static str,
    pub attempt: u32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// What the step returned, any JSON (secrets masked as `***`).
    #[schema(value_type = Option<Value>)]
    pub output: Option<Value>,
    pub error: Option<String>,
    /// While `waiting`: the capabilities no connected node has
    /// (`hypervisor=kvm, node=hv-17`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// The remote node its latest attempt ran on; absent: the app server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Every attempt so far, oldest first: those that failed (why a retry
    /// happened) and the latest. Only on `GET /v1/actions/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptView>>,
}

/// One attempt of a step.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub attempt: u32,
    /// failed for an earlier attempt; the step's status for its latest.
    #[schema(value_type = String, example = "failed")]
    pub status: &'static str,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The remote node it ran on; null: the app server.
    pub node: Option<String>,
    /// Why it failed (secrets masked).
    pub error: Option<String>,
}

/// A remote node that joined or asked to.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    pub name: String,
    /// pending (waits for `troupe nodes accept`), accepted or removed.
    #[schema(example = "accepted")]
    pub status: String,
    /// Its node key (`ed25519:…`).
    pub public_key: String,
    /// `SHA256:…` of its key: what `troupe node` prints at start and
    /// `troupe nodes accept NAME --key` takes.
    pub fingerprint: String,
    pub connected: bool,
    /// What it can do (as it said when it last connected): key/value pairs
    /// steps' `requires` match against.
    #[schema(value_type = Object)]
    pub capabilities: serde_json::Map<String, Value>,
    /// Since when it is connected, if it is.
    pub connected_at: Option<String>,
    /// The address its connection comes from, if it is connected.
    pub address: Option<String>,
    /// When the server last heard from it (a message or a heartbeat), if it
    /// is connected.
    pub last_heard_at: Option<String>,
    /// When it last connected.
    pub last_seen_at: Option<String>,
    /// Steps it runs now.
    pub in_flight: usize,
    /// A draining node gets no new steps.
    pub draining: bool,
    /// Who let it in: an admin token's name, or the join token it joined with.
    pub accepted_by: Option<String>,
    /// The capability patterns its admission allowed (its join token's);
    /// null: any it reports. Steps are placed only on capabilities these
    /// match.
    pub allowed_capabilities: Option<Vec<String>>,
    /// Bundle bytes it downloaded from this server since the server started.
    pub pulled_bytes: u64,
    /// The verified bundles in its cache, as it last reported them (empty
    /// while it is not connected).
    pub bundles: Vec<NodeBundleView>,
}

/// A bundle in a node's cache.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeBundleView {
    pub hash: String,
    /// The signed archive's size.
    pub bytes: u64,
    /// Whether a step host on the node has it loaded now.
    pub loaded: bool,
}

impl NodeView {
    pub fn new(
        row: engine::store::NodeRow,
        live: Option<&engine::nodes::NodeInfo>,
        pulled_bytes: u64,
    ) -> NodeView {
        let capabilities = match live {
            Some(n) => n
                .capabilities
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
            None => row
                .capabilities
                .as_deref()
                .and_then(|c| serde_json::from_str(c).ok())
                .unwrap_or_default(),
        };
        let fingerprint = row
            .public_key
            .parse::<signing::PublicKey>()
            .map(|k| k.fingerprint())
            .unwrap_or_default();
        NodeView {
            name: row.name,
            status: row.status.as_str().to_owned(),
            public_key: row.public_key,
            fingerprint,
            connected: live.is_some(),
            capabilities,
            connected_at: live.map(|n| time(&n.connected_at)),
            address: live.and_then(|n| n.address.clone()),
            last_heard_at: live.map(|n| time(&n.last_heard)),
            last_seen_at: row.last_seen_at.as_ref().map(time),
            in_flight: live.map_or(0, |n| n.in_flight),
            draining: row.draining_since.is_some(),
            accepted_by: row.accepted_by,
            allowed_capabilities: row
                .allowed_capabilities
                .as_deref()
                .and_then(|a| serde_json::from_str(a).ok()),
            pulled_bytes,
            bundles: live
                .map(|n| {
                    n.bundles
                        .cached
                        .iter()
                        .map(|(hash, bytes)| NodeBundleView {
                            hash: hash.clone(),
                            bytes: *bytes,
                            loaded: n.bundles.loaded.contains(hash),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

impl NodeView {
    /// A node that waits for an admin, held in this server's memory.
    pub fn pending(p: &engine::nodes::PendingNode) -> NodeView {
        NodeView {
            name: p.name.clone(),
            status: "pending".to_owned(),
            public_key: p.key.to_string(),
            fingerprint: p.key.fingerprint(),
            connected: false,
            capabilities: p
                .capabilities
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
            connected_at: None,
            address: p.address.clone(),
            last_heard_at: None,
            last_seen_at: Some(time(&p.last_seen)),
            in_flight: 0,
            draining: false,
            accepted_by: None,
            allowed_capabilities: None,
            pulled_bytes: 0,
            bundles: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// What one attempt of a step logged.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepLogView {
    pub seq: u32,
    /// The step's name in its kind.
    pub step: String,
    pub attempt: u32,
    /// The lines the step logged, each ending in a newline (secrets masked
    /// as `***`; at most 64 KiB, a cut is marked).
    pub log: String,
    /// When the attempt ended.
    pub logged_at: String,
}

impl From<engine::model::StepLog> for StepLogView {
    fn from(l: engine::model::StepLog) -> StepLogView {
        StepLogView {
            seq: l.seq,
            step: l.step,
            attempt: l.attempt,
            log: l.log,
            logged_at: time(&l.logged_at),
        }
    }
}

/// The logs of an action's steps, by step and attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepLogList {
    pub logs: Vec<StepLogView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActionList {
    pub actions: Vec<ActionView>,
    /// Pass as `before` to get the next page; null on the last page.
    pub next_before: Option<i64>,
}

/// An action kind new actions can use.
#[derive(Debug, Serialize, ToSchema)]
pub struct KindView {
    pub name: String,
    pub description: String,
    /// Each param's schema (a JSON Schema subset: type, enum, pattern, …).
    #[schema(value_type = Object)]
    pub params: BTreeMap<String, Value>,
    /// Step names, in order.
    pub steps: Vec<String>,
    /// The concurrency limits its steps hold: at most `max` attempts at
    /// once per key, across every server.
    pub limits: Vec<KindLimitView>,
    pub bundle: String,
    pub bundle_name: String,
    pub bundle_version: String,
}

/// A concurrency limit a kind's step holds, with this server's max.
#[derive(Debug, Serialize, ToSchema)]
pub struct KindLimitView {
    /// The step that holds it.
    pub step: String,
    pub name: String,
    /// The key's template (`{{params.bmc}}`).
    pub key: String,
    pub max: u32,
    /// Keys with a max of their own: `dc1=10`.
    pub keys: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KindList {
    pub kinds: Vec<KindView>,
}

/// `/v1/health`: `status` alone without a credential; the rest with a read
/// credential.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Health {
    /// ok, or degraded when the database does not answer.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseHealth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<ActionCounts>,
    /// This server's name (`actions.owner`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreCounters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
}

/// `/v1/health/live` and `/v1/health/ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// ok (live), ready, or not_ready.
    pub status: &'static str,
    /// Why not: shutting_down, database_unavailable, database_read_only or
    /// database_not_in_cluster (a Galera node not ready, not Primary or not Synced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DatabaseHealth {
    /// sqlite or mysql.
    pub backend: &'static str,
    pub reachable: bool,
    /// MySQL/MariaDB: `host:port` of the database node this server writes
    /// through (the first healthy one of the addresses `--db` lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes_through: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActionCounts {
    pub running: usize,
    pub queued: usize,
}

/// The store's counters since start.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreCounters {
    pub transactions: u64,
    pub rows_written: u64,
    pub writes: u64,
    pub commit_seconds: f64,
    /// Transactions the database rolled back for a conflict (a deadlock, a
    /// lock wait timeout, a Galera certification conflict) or a node not
    /// ready, each tried again.
    pub rolled_back: u64,
}

/// A bundle the server holds.
#[derive(Debug, Serialize, ToSchema)]
pub struct BundleView {
    pub hash: String,
    pub name: String,
    pub version: String,
    pub abi: u32,
    pub size: u64,
    /// Key id of the signing key.
    pub signer: String,
    /// active, draining, drained or revoked.
    #[schema(value_type = String, example = "active")]
    pub status: &'static str,
    /// Unfinished actions pinned to it.
    pub in_flight: i64,
    pub host_running: bool,
    pub kinds: Vec<String>,
    pub steps: Vec<String>,
    pub created_at: String,
    pub activated_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BundleList {
    pub bundles: Vec<BundleView>,
}

/// The multipart body of `POST /v1/bundles`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BundleUpload {
    /// The bundle's bytes.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    bundle: String,
    /// The detached signature text (`troupe bundle sign` writes it to BUNDLE.sig).
    signature: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub key_id: String,
    /// `ed25519:<64 hex>`.
    pub public_key: String,
    pub revoked: bool,
    /// config (from --trust) or api.
    #[schema(value_type = String, example = "api")]
    pub source: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"public_key": "ed25519:3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"}))]
pub struct AddKey {
    pub public_key: String,
}

/// An API token as listed: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    /// The public part of the token (`troupe_<id>_<secret>`).
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// Kinds a submit token may use; null for any.
    pub kinds: Option<Vec<String>>,
    pub created_by: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// Neither revoked nor expired.
    pub active: bool,
    /// A join token's rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinRulesView>,
    /// Nodes admitted with it (join tokens).
    pub uses: i64,
}

/// A new token, with its text: shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub info: TokenView,
    /// `troupe_<id>_<secret>`; only its hash is stored.
    pub token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "panel", "scopes": ["submit", "operate"], "kinds": ["reboot"], "expires_at": "2027-03-01T00:00:00Z"}))]
pub struct CreateToken {
    pub name: String,
    /// read, submit, operate or admin.
    pub scopes: Vec<String>,
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
    /// RFC 3339; absent for a token that does not expire.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// For a join token: what a new node may claim with it.
    #[serde(default)]
    pub join: Option<JoinRulesView>,
}

/// What a join token lets a new node claim. A token with the join scope
/// admits one node unless `max_uses` says more.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"names": "hv-*", "capabilities": ["hypervisor=kvm", "oob=dc1"], "max_uses": 20}))]
pub struct JoinRulesView {
    /// Names a node may take (`*` matches any run); absent: any free name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<String>,
    /// Capability patterns (`KEY` or `KEY=VALUE`, `*` matches any run) the
    /// node may be placed on; absent: any it reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// New nodes it admits in all (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
}

impl From<JoinRulesView> for engine::join::JoinRules {
    fn from(j: JoinRulesView) -> engine::join::JoinRules {
        engine::join::JoinRules {
            names: j.names,
            capabilities: j.capabilities,
            max_uses: j.max_uses,
        }
    }
}

impl From<&engine::join::JoinRules> for JoinRulesView {
    fn from(j: &engine::join::JoinRules) -> JoinRulesView {
        JoinRulesView {
            names: j.names.clone(),
            capabilities: j.capabilities.clone(),
            max_uses: j.max_uses,
        }
    }
}

/// Which key of a waiting node to let in.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"key": "SHA256:3f0c…"}))]
pub struct AcceptNode {
    /// The node key's fingerprint (`SHA256:…`, as `troupe node` prints it
    /// and `GET /v1/nodes` shows it), or the whole key (`ed25519:…`).
    pub key: String,
}

/// An administrative change.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub id: i64,
    pub at: String,
    /// The token's name, or how the server was configured.
    pub actor: String,
    /// bundle.pushed, bundle.activated, key.trusted, key.revoked,
    /// token.created, token.revoked, secret.set or secret.deleted.
    pub event: String,
    /// A bundle hash, key id, token id or secret name.
    pub subject: String,
    #[schema(value_type = Option<Value>)]
    pub detail: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    pub entries: Vec<AuditView>,
    pub next_before: Option<i64>,
}

/// A server sharing the database.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerView {
    pub id: String,
    /// `live`, `silent` (live, but its lease ran out: frozen, cut off or
    /// dead, and about to be declared lost), `stopped` or `lost`.
    pub state: String,
    /// Bumped at every start of this id.
    pub incarnation: i64,
    pub address: Option<String>,
    pub host: String,
    pub data_dir: String,
    pub version: String,
    /// Actions it ran at its last renewal.
    pub running: i64,
    pub nodes_connected: i64,
    /// MySQL/MariaDB: the database node it writes through (`host:port`),
    /// as of its last renewal.
    pub writes_through: Option<String>,
    pub started_at: String,
    pub last_seen_at: String,
    pub lease_expires_at: String,
    pub stopped_at: Option<String>,
    /// The server that answered.
    pub this_server: bool,
}

impl ServerView {
    pub(crate) fn from_row(s: &engine::store::ServerRow, this_server: bool) -> ServerView {
        ServerView {
            id: s.id.clone(),
            state: if s.state == "live" && s.silent {
                "silent".to_owned()
            } else {
                s.state.clone()
            },
            incarnation: s.incarnation,
            address: s.address.clone(),
            host: s.host.clone(),
            data_dir: s.data_dir.clone(),
            version: s.version.clone(),
            running: s.running,
            nodes_connected: s.nodes_connected,
            writes_through: s.db_node.clone(),
            started_at: time(&s.started_at),
            last_seen_at: time(&s.heartbeat_at),
            lease_expires_at: time(&s.lease_expires_at),
            stopped_at: s.stopped_at.as_ref().map(time),
            this_server,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServerList {
    pub servers: Vec<ServerView>,
}

/// A secret as listed: never its value.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretView {
    pub name: String,
    pub updated_at: String,
    pub updated_by: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SecretList {
    pub secrets: Vec<SecretView>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"value": "correct horse battery staple"}))]
pub struct SetSecret {
    pub value: String,
}

/// A goon a test deployment holds (`troupe serve --goons`).
#[derive(Debug, Serialize, ToSchema)]
pub struct GoonView {
    pub id: u64,
    /// The step (its name in the kind) it acts on.
    pub step: String,
    /// The attempt it acts on; null: every attempt.
    pub attempt: Option<u32>,
    /// Only actions of this kind; null: any.
    pub kind: Option<String>,
    /// How many times it acts in all; null: until removed.
    pub times: Option<u32>,
    /// What it does: "crash", "cancel", {"fail": …}, {"delay": …},
    /// {"lose_node": …} or {"output": …}.
    #[schema(value_type = Object)]
    pub act: Value,
    /// How many attempts it acted on so far.
    pub acted: u32,
    pub added_by: String,
    pub added_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GoonList {
    pub goons: Vec<GoonView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GoonsRemoved {
    pub removed: usize,
}

impl From<&engine::goons::Armed> for GoonView {
    fn from(a: &engine::goons::Armed) -> GoonView {
        GoonView {
            id: a.id,
            step: a.goon.step.clone(),
            attempt: a.goon.attempt,
            kind: a.goon.kind.clone(),
            times: a.goon.times,
            act: serde_json::to_value(&a.goon.act).unwrap_or_default(),
            acted: a.acted,
            added_by: a.added_by.clone(),
            added_at: time(&a.added_at),
        }
    }
}

/// Every error: a stable code and a message for people.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable; see the `ErrorCode` schema for every code.
    #[schema(value_type = crate::error::ErrorCode)]
    pub code: &'static str,
    pub message: String,
}

pub fn time(t: &Timestamp) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl ActionView {
    pub fn new(a: Action, with_steps: bool) -> ActionView {
        let waiting_for = a
            .waiting_for
            .clone()
            .or_else(|| a.steps.iter().find_map(|s| s.waiting_for.clone()));
        ActionView {
            id: a.id,
            kind: a.kind,
            target: a.target,
            params: a.params,
            status: a.status.as_str(),
            bundle: a.bundle,
            current_step: a.current_step,
            error: a.error,
            idempotency_key: a.idempotency_key,
            submitted_by: a.submitted_by,
            server: a.owner,
            revision: a.revision,
            created_at: time(&a.created_at),
            started_at: a.started_at.as_ref().map(time),
            finished_at: a.finished_at.as_ref().map(time),
            cancel_requested_at: a.cancel_requested_at.as_ref().map(time),
            waiting_for,
            steps: with_steps.then(|| a.steps.into_iter().map(StepView::new).collect()),
        }
    }
}

impl StepView {
    fn new(s: StepRecord) -> StepView {
        StepView {
            seq: s.seq,
            name: s.name,
            step: s.step,
            status: s.status.as_str(),
            attempt: s.attempt,
            started_at: s.started_at.as_ref().map(time),
            finished_at: s.finished_at.as_ref().map(time),
            output: s.output,
            error: s.error,
            waiting_for: s.waiting_for,
            node: s.node,
            attempts: None,
        }
    }
}

impl ActionView {
    /// Fills in each step's `attempts`: the failed ones stored, then the
    /// step's latest (unless that is one of them).
    pub fn with_attempts(mut self, failed: Vec<engine::model::FailedAttempt>) -> ActionView {
        for step in self.steps.iter_mut().flatten() {
            let mut attempts: Vec<AttemptView> = failed
                .iter()
                .filter(|f| f.seq == step.seq)
                .map(|f| AttemptView {
                    attempt: f.attempt,
                    status: "failed",
                    started_at: f.started_at.as_ref().map(time),
                    finished_at: Some(time(&f.finished_at)),
                    node: f.node.clone(),
                    error: Some(f.error.clone()),
                })
                .collect();
            if step.attempt > 0 && attempts.iter().all(|a| a.attempt != step.attempt) {
                attempts.push(AttemptView {
                    attempt: step.attempt,
                    status: step.status,
                    started_at: step.started_at.clone(),
                    finished_at: step.finished_at.clone(),
                    node: step.node.clone(),
                    error: step.error.clone(),
                });
            }
            step.attempts = Some(attempts);
        }
        self
    }
}

impl From<engine::BundleInfo> for BundleView {
    fn from(b: engine::BundleInfo) -> BundleView {
        BundleView {
            hash: b.hash,
            name: b.name,
            version: b.version,
            abi: b.abi,
            size: b.size,
            signer: b.signer,
            status: b.status.as_str(),
            in_flight: b.in_flight,
            host_running: b.host_running,
            kinds: b.kinds,
            steps: b.steps,
            created_at: time(&b.created_at),
            activated_at: time(&b.activated_at),
        }
    }
}

impl From<engine::KeyInfo> for KeyView {
    fn from(k: engine::KeyInfo) -> KeyView {
        KeyView {
            key_id: k.key.id().to_string(),
            public_key: k.key.to_string(),
            revoked: k.revoked,
            source: if k.configured { "config" } else { "api" },
        }
    }
}

impl From<&engine::access::TokenInfo> for TokenView {
    fn from(t: &engine::access::TokenInfo) -> TokenView {
        TokenView {
            id: t.id.clone(),
            name: t.name.clone(),
            scopes: t.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
            kinds: t.kinds.clone(),
            created_by: t.created_by.clone(),
            created_at: time(&t.created_at),
            expires_at: t.expires_at.as_ref().map(time),
            revoked_at: t.revoked_at.as_ref().map(time),
            active: t.is_active(engine::model::now()),
            join: t.join.as_ref().map(JoinRulesView::from),
            uses: t.uses,
        }
    }
}

impl From<&engine::store::AuditEntry> for AuditView {
    fn from(e: &engine::store::AuditEntry) -> AuditView {
        AuditView {
            id: e.id,
            at: time(&e.at),
            actor: e.actor.clone(),
            event: e.event.clone(),
            subject: e.subject.clone(),
            detail: e.detail.clone(),
        }
    }
}

impl From<&engine::SecretInfo> for SecretView {
    fn from(s: &engine::SecretInfo) -> SecretView {
        SecretView {
            name: s.name.clone(),
            updated_at: time(&s.updated_at),
            updated_by: s.updated_by.clone(),
        }
    }
}

impl From<engine::KindInfo> for KindView {
    fn from(k: engine::KindInfo) -> KindView {
        KindView {
            name: k.name,
            description: k.description,
            params: k
                .params
                .into_iter()
                .map(|(name, spec)| {
                    (
                        name,
                        serde_json::to_value(spec).expect("a schema serializes"),
                    )
                })
                .collect(),
            steps: k.steps,
            limits: k
                .limits
                .into_iter()
                .map(|l| KindLimitView {
                    step: l.step,
                    name: l.name,
                    key: l.key,
                    max: l.max,
                    keys: l.keys,
                })
                .collect(),
            bundle: k.bundle,
            bundle_name: k.bundle_name,
            bundle_version: k.bundle_version,
        }
    }
}
