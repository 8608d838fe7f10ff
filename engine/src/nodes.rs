//! Remote nodes as the engine sees them: which are connected, what they
//! can do, how busy they are, and the one thing the engine needs from a
//! connection to each — a [`NodeLink`] that carries step calls. How a node
//! connects (transport, TLS, its identity) is not the engine's business:
//! the transport attaches a link with [`Nodes::attach`] and the link stays
//! placeable until the returned [`Attached`] is dropped.
//!
//! The runner places a step that requires capabilities with
//! [`Nodes::place`]: among the connected, non-draining nodes whose
//! capabilities meet the requirement, the one with the fewest steps in
//! flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::host::Answer;
use crate::model::{ActionId, Timestamp};
use crate::node_results::NodeResults;
use crate::placement::Requirement;

/// Names one attempt of one step everywhere: in the engine, on the wire and
/// on the node (which reports results by it, also after a reconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallKey {
    pub action: ActionId,
    pub seq: u32,
    pub attempt: u32,
}

impl std::fmt::Display for CallKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.action, self.seq, self.attempt)
    }
}

/// One step call for a node.
#[derive(Debug, Clone)]
pub struct RemoteCall {
    pub key: CallKey,
    /// The bundle the action is pinned to; the node fetches it by this hash
    /// if it lacks it, and verifies it with its own keys.
    pub bundle: signing::BundleHash,
    /// The exported function to call.
    pub function: String,
    /// The step's input JSON, as a local step host would get it.
    pub input: Vec<u8>,
    /// The step's timeout and the grace after a cancel before the node
    /// kills its step host, which the node enforces itself.
    pub timeout: Duration,
    pub grace: Duration,
    /// Whether running it twice is harmless: if the node goes away, an
    /// idempotent call fails at once (to be retried, maybe elsewhere); any
    /// other waits for the node to come back and report (`Nodes::park`).
    pub idempotent: bool,
}

/// The engine's side of a connection to one node.
pub trait NodeLink: Send + Sync + 'static {
    /// Sends a call. The receiver yields its answer, or a
    /// `CallResult::Lost` naming the node if the link ends first.
    fn call(&self, call: RemoteCall) -> oneshot::Receiver<Answer>;
    /// Asks the node to stop the call: its step sees the cancel flag, and
    /// the node kills its step host if the step has not stopped after the
    /// grace.
    fn cancel(&self, key: CallKey);
    /// Ends the connection (the node was removed), telling the node why.
    fn close(&self, reason: &str);
    /// Asks the node which calls it holds now: its answer comes to
    /// [`Nodes::holding`].
    fn report(&self);
}

/// What a node's hello gets (see `Admin::admit_node`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// It may take calls, placed on the capabilities its admission allowed
    /// (`None`: any it reports; see `join::admitted`).
    Accepted { allowed: Option<Vec<String>> },
    /// It waits for an operator: `troupe nodes accept NAME`.
    Pending,
    /// Not with this key; why, for the node's operator.
    Refused(String),
}

/// What the registry shows of a connected node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub capabilities: BTreeMap<String, String>,
    pub connected_at: Timestamp,
    /// When the server last heard from it (any message or heartbeat).
    pub last_heard: Timestamp,
    /// The address its connection comes from.
    pub address: Option<String>,
    pub in_flight: usize,
    pub draining: bool,
    /// The bundles in its cache and those loaded in its step hosts, as it
    /// last reported them.
    pub bundles: NodeBundles,
}

/// A node's report of its bundle cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeBundles {
    /// Verified archives kept on the node, by hash, with their sizes.
    pub cached: Vec<(String, u64)>,
    /// Hashes of the bundles loaded in a running step host.
    pub loaded: Vec<String>,
}

/// How many nodes may wait for an admin's accept on one server at once.
/// They are held in memory only: a peer without a join token writes
/// nothing to the database.
pub const MAX_PENDING: usize = 64;

/// How long a waiting node is remembered after its last hello (a waiting
/// node says hello again every few seconds).
pub const PENDING_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// A node that proved its key but has neither a join token nor an
/// admin's accept: shown by `troupe nodes list` until one of its keys is
/// accepted (`troupe nodes accept NAME --key FINGERPRINT`).
#[derive(Debug, Clone)]
pub struct PendingNode {
    pub name: String,
    pub key: signing::PublicKey,
    pub capabilities: BTreeMap<String, String>,
    pub address: Option<String>,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
}

/// A connection about to be attached to the registry.
pub struct Connection {
    /// What it says it can do. `node` is always its name, whatever it says.
    pub capabilities: BTreeMap<String, String>,
    /// The capability patterns its admission allowed; `None`: any.
    pub allowed: Option<Vec<String>>,
    pub link: Arc<dyn NodeLink>,
    /// The bearer credential the node downloads bundles with while this
    /// connection lasts (see [`Nodes::by_session`]).
    pub session: String,
    pub address: Option<String>,
    /// When the node's process started, by this server's clock (its
    /// uptime taken from now): a node that started after a call was sent
    /// may have lost it; one that did not has never seen a call it
    /// neither holds nor acknowledged.
    pub started: Timestamp,
}

fn expired(p: &PendingNode, now: Timestamp) -> bool {
    (now - p.last_seen).to_std().unwrap_or_default() > PENDING_FOR
}

/// The capabilities placement sees: those the admission allowed, and
/// `node` always the node's name.
fn admitted(
    name: &str,
    allowed: Option<&[String]>,
    capabilities: BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let (kept, dropped) = crate::join::admitted(allowed, capabilities);
    if !dropped.is_empty() {
        tracing::warn!(node = %name, ?dropped, "a node reports capabilities its admission does not allow; steps are not placed on them");
    }
    own_name(name, kept)
}

/// The connected nodes. Cheap to clone.
#[derive(Clone)]
pub struct Nodes {
    inner: Arc<Registry>,
}

struct Registry {
    nodes: Mutex<BTreeMap<String, Entry>>,
    /// Calls whose node is away, or that this server follows for another
    /// (it took the action over), by node and key: answered when the node
    /// reports, a server stored its report, or with an error once the
    /// grace is over.
    parked: Mutex<HashMap<(String, CallKey), Parked>>,
    /// Where results nobody here waits for are stored, and parked calls
    /// look for theirs; `None` in unit tests.
    results: Option<NodeResults>,
    /// Nodes drained on this server, connected or not: a reconnect does not
    /// undo a drain.
    draining: Mutex<std::collections::BTreeSet<String>>,
    /// Bundle bytes each node downloaded, across its connections.
    pulled: Mutex<HashMap<String, u64>>,
    /// Nodes waiting for an admin, by name and key; at most [`MAX_PENDING`].
    pending: Mutex<Vec<PendingNode>>,
    /// Bumped whenever placement could come out differently.
    changed: watch::Sender<u64>,
}

/// How often a parked call looks for a result another server stored: at
/// first, doubling up to [`STORED_POLL_MAX`].
const STORED_POLL: Duration = Duration::from_millis(250);
const STORED_POLL_MAX: Duration = Duration::from_secs(2);

/// A call waiting for its node to come back and report it.
struct Parked {
    tx: oneshot::Sender<Answer>,
    /// A time before the call was sent, by this server's clock.
    sent_after: Timestamp,
}

struct Entry {
    started: Timestamp,
    capabilities: BTreeMap<String, String>,
    /// The patterns its admission allowed; what it reports beyond them is
    /// not placed on.
    allowed: Option<Vec<String>>,
    address: Option<String>,
    /// Unix milliseconds; shared with the connection's [`Attached`].
    last_heard: Arc<AtomicI64>,
    bundles: NodeBundles,
    /// SHA-256 (hex) of the connection's session credential.
    session: String,
    link: Arc<dyn NodeLink>,
    in_flight: Arc<AtomicUsize>,
    draining: bool,
    connected_at: Timestamp,
    /// Which connection this is: a reconnect replaces the entry, and the
    /// old connection's [`Attached`] must not remove the new one.
    epoch: u64,
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes::new(None)
    }
}

impl Nodes {
    /// The registry; results nobody waits for go to `results`.
    pub(crate) fn new(results: Option<NodeResults>) -> Nodes {
        Nodes {
            inner: Arc::new(Registry {
                nodes: Mutex::default(),
                parked: Mutex::default(),
                results,
                draining: Mutex::default(),
                pulled: Mutex::default(),
                pending: Mutex::default(),
                changed: watch::channel(0).0,
            }),
        }
    }

    /// Makes a connected node placeable until the returned guard is dropped.
    /// A node that connects again replaces its earlier connection.
    pub fn attach(&self, name: &str, connection: Connection) -> Attached {
        static EPOCH: AtomicUsize = AtomicUsize::new(1);
        let epoch = EPOCH.fetch_add(1, Ordering::Relaxed) as u64;
        let last_heard = Arc::new(AtomicI64::new(unix_ms()));
        let capabilities = admitted(name, connection.allowed.as_deref(), connection.capabilities);
        let entry = Entry {
            started: connection.started,
            capabilities,
            allowed: connection.allowed,
            address: connection.address,
            last_heard: last_heard.clone(),
            bundles: NodeBundles::default(),
            session: digest(&connection.session),
            link: connection.link,
            in_flight: Arc::default(),
            draining: self.inner.draining.lock().unwrap().contains(name),
            connected_at: crate::model::now(),
            epoch,
        };
        self.inner.lock().insert(name.to_owned(), entry);
        self.inner.bump();
        Attached {
            registry: Arc::downgrade(&self.inner),
            name: name.to_owned(),
            epoch,
            last_heard,
        }
    }

    /// A connected node's capabilities changed (a probe's result). `node`
    /// stays its name, whatever it says.
    pub fn set_capabilities(&self, name: &str, capabilities: BTreeMap<String, String>) {
        if let Some(e) = self.inner.lock().get_mut(name) {
            e.capabilities = admitted(name, e.allowed.as_deref(), capabilities);
        }
        self.inner.bump();
    }

    /// Remembers a node that asks to join without a join token, until an
    /// admin accepts its key or it stops asking. `false` when
    /// [`MAX_PENDING`] others wait already.
    pub fn ask_to_join(&self, node: PendingNode) -> bool {
        let mut pending = self.inner.pending.lock().unwrap();
        let now = crate::model::now();
        pending.retain(|p| !expired(p, now));
        if let Some(p) = pending
            .iter_mut()
            .find(|p| p.name == node.name && p.key == node.key)
        {
            p.capabilities = node.capabilities;
            p.address = node.address;
            p.last_seen = node.last_seen;
            return true;
        }
        if pending.len() >= MAX_PENDING {
            return false;
        }
        pending.push(node);
        true
    }

    /// The nodes waiting for an admin, oldest first.
    pub fn pending(&self) -> Vec<PendingNode> {
        let mut pending = self.inner.pending.lock().unwrap();
        let now = crate::model::now();
        pending.retain(|p| !expired(p, now));
        pending.clone()
    }

    /// The waiting node named `name` whose key is `key` (its fingerprint
    /// or its whole text).
    pub fn pending_key(&self, name: &str, key: &str) -> Option<PendingNode> {
        self.pending()
            .into_iter()
            .find(|p| p.name == name && (p.key.fingerprint() == key || p.key.to_string() == key))
    }

    /// Forgets every key waiting under `name` (it is in now, or removed).
    pub fn forget_pending(&self, name: &str) {
        self.inner
            .pending
            .lock()
            .unwrap()
            .retain(|p| p.name != name);
    }

    /// What a connected node reports of its bundle cache.
    pub fn set_bundles(&self, name: &str, bundles: NodeBundles) {
        if let Some(e) = self.inner.lock().get_mut(name) {
            e.bundles = bundles;
        }
    }

    /// A draining node gets no new steps; those in flight finish.
    pub fn set_draining(&self, name: &str, draining: bool) {
        let mut drained = self.inner.draining.lock().unwrap();
        if draining {
            drained.insert(name.to_owned());
        } else {
            drained.remove(name);
        }
        drop(drained);
        if let Some(e) = self.inner.lock().get_mut(name) {
            e.draining = draining;
        }
        self.inner.bump();
    }

    /// Applies the admin's changes the `nodes` table holds, made on any
    /// server: exactly the `drained` nodes drain, `removed` ones connected
    /// here are disconnected, and nodes waiting here under an `accepted`
    /// name are forgotten (they are let in at their next hello).
    pub(crate) fn apply_admin(
        &self,
        drained: &std::collections::BTreeSet<String>,
        removed: &[String],
        accepted: &[String],
    ) {
        let current = self.inner.draining.lock().unwrap().clone();
        for name in current.difference(drained) {
            tracing::info!(node = %name, "node undrained on another server");
            self.set_draining(name, false);
        }
        for name in drained.difference(&current) {
            tracing::info!(node = %name, "node drained on another server");
            self.set_draining(name, true);
        }
        for name in removed {
            if self.inner.lock().contains_key(name) {
                tracing::warn!(node = %name, "node removed on another server; disconnecting it");
                self.disconnect(name, "this node was removed by an admin");
            }
        }
        for name in accepted {
            self.forget_pending(name);
        }
    }

    /// Keeps `tx` for the answer to `key` while `node` is away (or runs
    /// it for another server): the node keeps running its calls and
    /// reports them when it reconnects ([`Nodes::deliver`]), maybe to
    /// another server, which stores the result (looked for here every
    /// 0.25 s at first, doubling to 2 s); after `grace` the call fails
    /// naming the node. `sent_after` is a time before the call was sent.
    pub fn park(
        &self,
        node: &str,
        key: CallKey,
        tx: oneshot::Sender<Answer>,
        grace: Duration,
        sent_after: Timestamp,
    ) {
        let slot = (node.to_owned(), key);
        self.inner
            .parked()
            .insert(slot.clone(), Parked { tx, sent_after });
        let registry = Arc::downgrade(&self.inner);
        let results = self.inner.results.clone();
        crate::tasks::spawn(crate::tasks::TaskKind::NodeCallTimer, async move {
            let deadline = tokio::time::Instant::now() + grace;
            let mut poll = STORED_POLL;
            loop {
                if let Some(results) = &results {
                    match results.find(&slot.0, slot.1).await {
                        Ok(Some(answer)) => {
                            let Some(registry) = registry.upgrade() else {
                                return;
                            };
                            let parked = registry.parked().remove(&slot);
                            if let Some(p) = parked {
                                tracing::info!(node = %slot.0, call = %slot.1, "a result the node reported to another server reached its runner");
                                let _ = p.tx.send(answer);
                            }
                            return;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(node = %slot.0, call = %slot.1, error = %e, "cannot look for a stored node result; trying again")
                        }
                    }
                }
                let now = tokio::time::Instant::now();
                tokio::time::sleep(poll.min(deadline.saturating_duration_since(now))).await;
                poll = (poll * 2).min(STORED_POLL_MAX);
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                let mut parked = registry.parked();
                if !parked.contains_key(&slot) {
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    let tx = parked.remove(&slot).map(|p| p.tx);
                    drop(parked);
                    if let Some(tx) = tx {
                        let _ = tx.send(away(
                            &slot.0,
                            &format!(
                                "did not come back within {} s to report it",
                                grace.as_secs()
                            ),
                        ));
                    }
                    return;
                }
            }
        });
    }

    /// Hands a result `node` reported for a call no connection waits for
    /// to the runner that parked it here; gives it back if none did.
    pub fn deliver(&self, node: &str, key: CallKey, answer: Answer) -> Result<(), Answer> {
        let parked = self.inner.parked().remove(&(node.to_owned(), key));
        match parked {
            Some(p) => {
                let _ = p.tx.send(answer);
                Ok(())
            }
            None => Err(answer),
        }
    }

    /// Stores a result nobody here waits for, for the server that follows
    /// its call (or this one, later); `then` runs once it is stored (the
    /// node may forget it then). Tried again for up to a minute; if it
    /// cannot be stored, the node keeps it and sends it again on its next
    /// connection.
    pub fn keep(
        &self,
        node: &str,
        key: CallKey,
        answer: Answer,
        then: impl FnOnce() + Send + 'static,
    ) {
        let Some(results) = self.inner.results.clone() else {
            then();
            return;
        };
        let node = node.to_owned();
        crate::tasks::spawn(crate::tasks::TaskKind::NodeResult, async move {
            let mut delay = Duration::from_millis(250);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                match results.keep(&node, key, &answer).await {
                    Ok(()) => {
                        tracing::info!(node = %node, call = %key, "stored a result no runner here waits for, for the server that follows its call");
                        then();
                        return;
                    }
                    Err(e) if tokio::time::Instant::now() + delay > deadline => {
                        tracing::warn!(node = %node, call = %key, error = %e, "cannot store a node's result; the node keeps it and reports it again when it reconnects");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, call = %key, error = %e, "cannot store a node's result yet; trying again");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    /// A node says which calls it holds now (running, or done and not yet
    /// acknowledged) and which it reported and had acknowledged lately:
    /// on each connection, and when asked ([`NodeLink::report`]). A parked
    /// call it does neither of:
    /// - if the node has been up since before the call was sent, the call
    ///   never reached it and did not run (it is placed again);
    /// - if it acknowledged it, it ran: its result is stored, or went with
    ///   a server that stopped before storing it;
    /// - else the node restarted and may have run it.
    ///
    /// A result another server stored wins over each of these.
    pub fn holding(&self, node: &str, held: &[CallKey], acked: &[CallKey]) {
        let started = self.inner.lock().get(node).map(|e| e.started);
        for (key, p) in self.take_parked(node, held) {
            let answer = settled(node, key, p.sent_after, started, acked);
            let Some(results) = self.inner.results.clone() else {
                let _ = p.tx.send(answer);
                continue;
            };
            let node = node.to_owned();
            crate::tasks::spawn(crate::tasks::TaskKind::NodeCallTimer, async move {
                let stored = results.find(&node, key).await.ok().flatten();
                let _ = p.tx.send(stored.unwrap_or(answer));
            });
        }
    }

    /// Takes `node`'s parked calls but those in `keep`.
    fn take_parked(&self, node: &str, keep: &[CallKey]) -> Vec<(CallKey, Parked)> {
        let mut parked = self.inner.parked();
        let keys: Vec<_> = parked
            .keys()
            .filter(|(n, k)| n == node && !keep.contains(k))
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|slot| parked.remove(&slot).map(|p| (slot.1, p)))
            .collect()
    }

    /// Waits for the answer to a call that was in flight on `node` when its
    /// server stopped (this one, or another whose action this one took
    /// over): the node reports it (up to `grace`), here or to another
    /// server that stores it; a node connected here is asked at once what
    /// it holds, so a call it never received or lost is settled now.
    pub(crate) fn reattach(
        &self,
        node: &str,
        key: CallKey,
        grace: Duration,
        sent_after: Timestamp,
    ) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        // A test's slow resume: the runner reaches its step only after
        // `MS` milliseconds (the `nodes.reattach` failure point).
        #[cfg(feature = "failpoints")]
        if let Some(ms) = (|| {
            fail::fail_point!("nodes.reattach", |ms| ms
                .and_then(|ms| ms.parse::<u64>().ok()));
            None
        })() {
            let (nodes, node) = (self.clone(), node.to_owned());
            crate::tasks::spawn(crate::tasks::TaskKind::NodeCallTimer, async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                nodes.follow(&node, key, tx, grace, sent_after);
            });
            return rx;
        }
        self.follow(node, key, tx, grace, sent_after);
        rx
    }

    fn follow(
        &self,
        node: &str,
        key: CallKey,
        tx: oneshot::Sender<Answer>,
        grace: Duration,
        sent_after: Timestamp,
    ) {
        self.park(node, key, tx, grace, sent_after);
        let link = self.inner.lock().get(node).map(|e| e.link.clone());
        if let Some(link) = link {
            link.report();
        }
    }

    /// Asks `node`, if it is connected, to stop call `key`.
    pub(crate) fn cancel(&self, node: &str, key: CallKey) {
        let link = self.inner.lock().get(node).map(|e| e.link.clone());
        if let Some(link) = link {
            link.cancel(key);
        }
    }

    /// The connected node whose session credential this is.
    pub fn by_session(&self, session: &str) -> Option<String> {
        let wanted = digest(session);
        self.inner
            .lock()
            .iter()
            .find(|(_, e)| e.session == wanted)
            .map(|(name, _)| name.clone())
    }

    /// Ends a node's connection at once, and fails the calls that waited
    /// for it to come back (it was removed).
    pub fn disconnect(&self, name: &str, reason: &str) {
        let entry = self.inner.lock().remove(name);
        if let Some(e) = entry {
            e.link.close(reason);
        }
        for (_, p) in self.take_parked(name, &[]) {
            let _ = p.tx.send(away(name, "was removed"));
        }
        self.inner.bump();
    }

    /// Counts bundle bytes a node downloaded.
    pub fn pulled(&self, node: &str, bytes: u64) {
        *self
            .inner
            .pulled
            .lock()
            .unwrap()
            .entry(node.to_owned())
            .or_default() += bytes;
    }

    /// Bundle bytes `node` downloaded since this server started, connected
    /// now or not.
    pub fn pulled_bytes(&self, node: &str) -> u64 {
        self.inner
            .pulled
            .lock()
            .unwrap()
            .get(node)
            .copied()
            .unwrap_or_default()
    }

    pub fn list(&self) -> Vec<NodeInfo> {
        self.inner
            .lock()
            .iter()
            .map(|(name, e)| NodeInfo {
                name: name.clone(),
                capabilities: e.capabilities.clone(),
                connected_at: e.connected_at,
                last_heard: from_unix_ms(e.last_heard.load(Ordering::Relaxed)),
                address: e.address.clone(),
                in_flight: e.in_flight.load(Ordering::Relaxed),
                draining: e.draining,
                bundles: e.bundles.clone(),
            })
            .collect()
    }

    /// The least busy connected, non-draining node that meets `wants`
    /// (ties go to the first name), counted busy until the `Placed` drops.
    pub(crate) fn place(&self, wants: &Requirement) -> Option<Placed> {
        let nodes = self.inner.lock();
        let (name, e) = nodes
            .iter()
            .filter(|(_, e)| !e.draining && wants.matches(&e.capabilities))
            .min_by_key(|(_, e)| e.in_flight.load(Ordering::Relaxed))?;
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Placed {
            name: name.clone(),
            link: e.link.clone(),
            in_flight: e.in_flight.clone(),
        })
    }

    /// Changes whenever placement could come out differently (a node came,
    /// went, changed capabilities or drain state).
    pub(crate) fn changed(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}

/// The answer to a parked call its node came back without (see
/// [`Nodes::holding`]): `started` is when the node's process started.
fn settled(
    node: &str,
    key: CallKey,
    sent_after: Timestamp,
    started: Option<Timestamp>,
    acked: &[CallKey],
) -> Answer {
    // `started` errs late (it is taken when the hello arrives), so a node
    // that may have restarted after the call counts as having restarted;
    // the slack covers a clock step between.
    let up_throughout =
        started.is_some_and(|s| s < sent_after - chrono::TimeDelta::milliseconds(250));
    if acked.contains(&key) {
        away(
            node,
            "ran it, but its result was lost with a server that stopped before storing it",
        )
    } else if up_throughout {
        unsent(node)
    } else {
        away(node, "came back without it (the node restarted)")
    }
}

/// A node's capabilities with `node` set to its name: a node cannot claim
/// another's name to be sent its steps.
fn own_name(name: &str, mut capabilities: BTreeMap<String, String>) -> BTreeMap<String, String> {
    capabilities.insert("node".to_owned(), name.to_owned());
    capabilities
}

fn unix_ms() -> i64 {
    crate::model::now().timestamp_millis()
}

fn from_unix_ms(ms: i64) -> Timestamp {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Credentials are compared by digest, so a lookup's timing says nothing
/// about the secret.
fn digest(secret: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The answer of a call that could not be sent to its node: it did not run
/// there.
pub fn unsent(node: &str) -> Answer {
    Answer {
        result: crate::host::CallResult::NotSent(format!(
            "the call never reached node {node} (its connection had ended): the step did not run there"
        )),
        log: String::new(),
    }
}

/// The answer of a call whose node went away.
pub fn away(node: &str, what: &str) -> Answer {
    Answer {
        result: crate::host::CallResult::Lost(format!(
            "node {node} went away while the step ran and {what}"
        )),
        log: String::new(),
    }
}

impl Registry {
    fn parked(&self) -> std::sync::MutexGuard<'_, HashMap<(String, CallKey), Parked>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Keeps a node placeable; dropping it detaches the node (its connection
/// ended).
pub struct Attached {
    registry: Weak<Registry>,
    name: String,
    epoch: u64,
    last_heard: Arc<AtomicI64>,
}

impl Attached {
    /// The node was heard from just now.
    pub fn heard(&self) {
        self.last_heard.store(unix_ms(), Ordering::Relaxed);
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut nodes = registry.lock();
        if nodes.get(&self.name).is_some_and(|e| e.epoch == self.epoch) {
            nodes.remove(&self.name);
        }
        drop(nodes);
        registry.bump();
    }
}

/// A node chosen for one attempt; it counts as busy until this drops.
pub(crate) struct Placed {
    pub(crate) name: String,
    pub(crate) link: Arc<dyn NodeLink>,
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Idle;

    impl NodeLink for Idle {
        fn call(&self, _: RemoteCall) -> oneshot::Receiver<Answer> {
            oneshot::channel().1
        }
        fn cancel(&self, _: CallKey) {}
        fn close(&self, _: &str) {}
        fn report(&self) {}
    }

    fn caps(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn idle(pairs: &[(&str, &str)], session: &str) -> Connection {
        Connection {
            capabilities: caps(pairs),
            allowed: None,
            link: Arc::new(Idle),
            session: session.to_owned(),
            address: None,
            started: crate::model::now(),
        }
    }

    #[test]
    fn a_node_cannot_claim_another_nodes_name() {
        let nodes = Nodes::default();
        let _a = nodes.attach("hv-1", idle(&[("node", "hv-2")], "s"));
        assert!(nodes.place(&wants(&[("node", "hv-2")])).is_none());
        nodes.set_capabilities("hv-1", caps(&[("node", "hv-2")]));
        assert!(nodes.place(&wants(&[("node", "hv-2")])).is_none());
        assert_eq!(
            nodes.place(&wants(&[("node", "hv-1")])).unwrap().name,
            "hv-1"
        );
    }

    fn wants(pairs: &[(&str, &str)]) -> Requirement {
        Requirement::resolve(&caps(pairs), &json!({})).unwrap()
    }

    #[test]
    fn places_on_the_least_busy_matching_node_and_never_elsewhere() {
        let nodes = Nodes::default();
        let mut changed = nodes.changed();
        let _a = nodes.attach("hv-1", idle(&[("hypervisor", "kvm")], "s"));
        let _b = nodes.attach("hv-2", idle(&[("hypervisor", "kvm")], "s"));
        let _c = nodes.attach("gpu-1", idle(&[("gpu", "a100")], "gpu-session"));
        assert!(changed.has_changed().unwrap());
        changed.mark_unchanged();

        let kvm = wants(&[("hypervisor", "kvm")]);
        let first = nodes.place(&kvm).unwrap();
        assert_eq!(first.name, "hv-1");
        let second = nodes.place(&kvm).unwrap();
        assert_eq!(second.name, "hv-2", "the idle one");
        drop(first);
        assert_eq!(nodes.place(&kvm).unwrap().name, "hv-1");

        assert!(nodes.place(&wants(&[("hypervisor", "xen")])).is_none());
        assert_eq!(nodes.place(&wants(&[("gpu", "*")])).unwrap().name, "gpu-1");
        assert_eq!(nodes.by_session("gpu-session").as_deref(), Some("gpu-1"));
        assert_eq!(nodes.by_session("nope"), None);

        nodes.set_draining("gpu-1", true);
        assert!(changed.has_changed().unwrap());
        assert!(nodes.place(&wants(&[("gpu", "*")])).is_none(), "draining");
    }

    /// A call followed for a server that stopped: the node is asked what it
    /// holds, and its answer (or its result) settles the call.
    #[tokio::test]
    async fn a_followed_call_is_settled_by_the_nodes_fresh_report() {
        let nodes = Nodes::default();
        let asked = Arc::new(Asked::default());
        let _a = nodes.attach(
            "hv-1",
            Connection {
                link: asked.clone(),
                ..idle(&[], "s")
            },
        );
        let before = crate::model::now() - chrono::TimeDelta::seconds(10);
        let grace = Duration::from_secs(60);
        let within = Duration::from_secs(5);
        let ran = CallKey {
            action: 1,
            seq: 0,
            attempt: 1,
        };
        let rx = nodes.reattach("hv-1", ran, grace, before);
        assert_eq!(
            asked.reports.load(Ordering::Relaxed),
            1,
            "the node is asked"
        );
        let done = crate::host::CallResult::Done {
            status: 0,
            body: b"{}".to_vec(),
        };
        let answer = Answer {
            result: done,
            log: String::new(),
        };
        assert!(nodes.deliver("hv-1", ran, answer).is_ok());
        let answer = tokio::time::timeout(within, rx).await.unwrap().unwrap();
        assert!(
            matches!(
                answer.result,
                crate::host::CallResult::Done { status: 0, .. }
            ),
            "{answer:?}"
        );
        let nobody = Answer {
            result: crate::host::CallResult::NotSent(String::new()),
            log: String::new(),
        };
        assert!(
            nodes.deliver("hv-1", ran, nobody).is_err(),
            "a repeat finds nobody waiting"
        );

        let lost = CallKey { action: 2, ..ran };
        let held = CallKey { action: 3, ..ran };
        let rx_lost = nodes.reattach("hv-1", lost, grace, before);
        let mut rx_held = nodes.reattach("hv-1", held, grace, before);
        nodes.holding("hv-1", &[held], &[lost]);
        let answer = tokio::time::timeout(within, rx_lost)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(&answer.result, crate::host::CallResult::Lost(m) if m.contains("its result was lost")),
            "{answer:?}"
        );
        // One it holds waits for its result.
        tokio::task::yield_now().await;
        assert!(rx_held.try_recv().is_err());
    }

    #[derive(Default)]
    struct Asked {
        reports: AtomicUsize,
    }

    impl NodeLink for Asked {
        fn call(&self, _: RemoteCall) -> oneshot::Receiver<Answer> {
            oneshot::channel().1
        }
        fn cancel(&self, _: CallKey) {}
        fn close(&self, _: &str) {}
        fn report(&self) {
            self.reports.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_reconnect_replaces_the_old_connection() {
        let nodes = Nodes::default();
        let old = nodes.attach("hv-1", idle(&[("a", "1")], "s"));
        let new = nodes.attach("hv-1", idle(&[("a", "2")], "s"));
        drop(old);
        let listed = nodes.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].capabilities["a"], "2");
        drop(new);
        assert!(nodes.list().is_empty());
    }
}
