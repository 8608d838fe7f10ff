//! troupe's engine: everything between "an action was accepted" and "its row
//! reads `succeeded`". It knows nothing of HTTP; `api` drives it through
//! [`Engine`], which hands out [`Actions`] (submit, read, follow, cancel)
//! and [`Admin`] (nodes, bundles, keys, tokens, secrets, goons, audit).
//!
//! The arrows point down: `Actions → Scheduler → Control → runner →
//! {Store, Agency, Nodes}`, `Admin → {Authority, Nodes, Tokens, Store}`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub mod access;
mod actions;
pub mod admin;
mod agency;
mod authority;
pub mod bundle;
pub mod config_watch;
mod error;
pub mod failpoints;
pub mod goons;
pub mod host;
pub mod join;
pub mod limits;
pub mod model;
mod node_results;
pub mod nodes;
pub mod placement;
mod runner;
mod schedule;
pub mod secrets;
pub mod step;
pub mod store;
pub mod targets;
mod tasks;

#[cfg(feature = "bench-probes")]
#[doc(hidden)]
pub mod bench;

pub use actions::{Actions, KindInfo, KindLimit, MAX_KEY_LEN, MAX_TARGET_LEN};
pub use admin::{Admin, BundleInfo, BundleStatus, SecretInfo};
pub use agency::LoadedBundle;
pub use authority::{Admitted, KeyInfo};
pub use error::{Error, Result};
pub use host::HostCommand;
pub use schedule::ControlStats;
pub use signing::{self, BundleHash, PublicKey};

use access::{Principal, Refused, Tokens};
use agency::AgencyHandle;
use authority::AuthorityHandle;
use runner::Shared;
use schedule::{Lease, Scheduler};
use store::Store;

/// Validated engine settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://PATH` or `mysql://USER:PASSWORD@HOST:PORT/DB`.
    pub database_url: String,
    /// Where unpacked bundles live.
    pub data_dir: PathBuf,
    /// This server's id: unique among the servers sharing the database, and
    /// its name in the `owner` column.
    pub server_id: String,
    /// The API address this server advertises (in `troupe servers list`).
    pub address: Option<String>,
    /// Actions running at once, across all targets.
    pub max_running: usize,
    /// How long this server's lease lasts unrenewed: once it has run out,
    /// another server takes its actions over.
    pub lease: Duration,
    /// How long a step may take to stop after being asked before its host is killed.
    pub cancel_grace: Duration,
    /// How long a connected node may stay silent before it counts as gone
    /// (the server pings it every second).
    pub node_timeout: Duration,
    /// How long a call on a node that went away (or was in flight when
    /// this server stopped) waits for the node to come back and report it.
    pub node_grace: Duration,
    pub host_command: HostCommand,
    /// Keys trusted to sign bundles, besides those added through the API.
    pub trusted_keys: Vec<PublicKey>,
    /// Deployment variables for manifests' `{{vars.NAME}}` (e.g. the
    /// command that reboots a server here): set by the operator, never by
    /// a request.
    pub vars: std::collections::BTreeMap<String, String>,
    /// The operator's maxes of concurrency limits (`--limit bmc=4`), over
    /// the manifests' defaults. Every server sharing a database should be
    /// given the same: each lets no more than its own max hold a key.
    pub limits: Vec<limits::LimitSetting>,
    /// The key secrets are encrypted under (see `secrets`).
    pub secrets_key: secrets::SecretsKey,
    /// Whether goons may be added over the API (a test deployment only).
    pub goons: bool,
    /// How long a submit may take to be recorded: past it, the API answers
    /// `outcome_unknown` (the insert may still commit) instead of waiting
    /// on a database that does not answer.
    pub submit_timeout: Duration,
}

/// How step hosts are started here. Where several servers may share the
/// database, a host ends its steps and itself once it has heard nothing
/// from this server for the lease less a second (at least 2 s: with a
/// shorter lease it does not watch), so a frozen server's steps end before
/// another server can take their actions over and run them again.
fn host_command(config: &Config, store: &Store) -> HostCommand {
    let mut cmd = config.host_command.clone();
    let silence = config.lease.saturating_sub(Duration::from_secs(1));
    if store.shared() && silence >= Duration::from_secs(2) {
        cmd.watch = Some(silence);
    }
    cmd
}

/// A handle to a running engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Store,
    agency: AgencyHandle,
    shared: Arc<Shared>,
    scheduler: Arc<Scheduler>,
    actions: Actions,
    admin: Admin,
    tokens: Tokens,
}

impl Engine {
    /// Connects to the database (applying migrations) and starts the actors.
    /// Call [`Engine::resume`] after loading bundles to pick up unfinished actions.
    pub async fn start(config: Config) -> Result<Engine> {
        let store = Store::connect(&config.database_url).await?;
        // Read before what they count is loaded: a change made meanwhile is
        // reloaded at the first poll.
        let generations = config_watch::generations(&store).await?;
        let bundles = config.data_dir.join("bundles");
        std::fs::create_dir_all(&bundles)
            .map_err(Error::io(format!("creating {}", bundles.display())))?;
        bundle::sweep_staging(&bundles);
        let agency = AgencyHandle::spawn(host_command(&config, &store), config.cancel_grace);
        let authority = AuthorityHandle::start(
            store.clone(),
            agency.clone(),
            bundles,
            config.trusted_keys.clone(),
        )
        .await?;
        let shared = Arc::new(Shared {
            store: store.clone(),
            agency: agency.clone(),
            authority: authority.clone(),
            lease: Lease {
                owner: config.server_id.as_str().into(),
                length: config.lease,
            },
            stopping: CancellationToken::new(),
            closed: CancellationToken::new(),
            secrets_key: config.secrets_key.clone(),
            nodes: admin::drained_nodes(
                &store,
                node_results::NodeResults {
                    store: store.clone(),
                    key: config.secrets_key.clone(),
                    server: config.server_id.clone(),
                },
            )
            .await?,
            node_grace: config.node_grace,
            goons: config.goons.then(Default::default),
            vars: config
                .vars
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
            limits: limits::Limits::new(&config.limits, store.shared()),
        });
        let tokens = Tokens::default();
        tokens.replace_all(store.tokens().await?);
        // Until the shutdown's drain is over: the API answers through it,
        // and a token revoked elsewhere meanwhile is refused here too.
        config_watch::ConfigWatch {
            store: store.clone(),
            tokens: tokens.clone(),
            authority: authority.clone(),
            nodes: shared.nodes.clone(),
        }
        .spawn(generations, shared.closed.clone());
        let me = store::ServerSpec {
            id: config.server_id.clone(),
            address: config.address.clone(),
            host: host_name(),
            data_dir: config.data_dir.display().to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let scheduler = Scheduler::start(shared.clone(), me, config.max_running).await?;
        let actions = Actions::new(shared.clone(), scheduler.clone(), config.submit_timeout);
        let admin = Admin::new(shared.clone(), authority, tokens.clone());
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                store,
                agency,
                shared,
                scheduler,
                actions,
                admin,
                tokens,
            }),
        })
    }

    /// Hands every unfinished action in the database to Control, oldest
    /// first: the start-up pass, once the bundles are loaded.
    pub async fn resume(&self) -> Result<usize> {
        let shared = &self.inner.shared;
        shared.limits.warn_undeclared(&shared.agency).await?;
        self.inner.scheduler.resume().await
    }

    /// Submitting, reading, following and cancelling actions.
    pub fn actions(&self) -> &Actions {
        &self.inner.actions
    }

    /// Nodes, bundles and keys, tokens, secrets, goons and the audit log.
    pub fn admin(&self) -> &Admin {
        &self.inner.admin
    }

    /// The connected remote nodes: the transport attaches them here.
    pub fn nodes(&self) -> &nodes::Nodes {
        &self.inner.shared.nodes
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Who a bearer token belongs to, checked against the in-memory copy of
    /// `api_tokens`. Where several servers share the database, a token
    /// this copy does not know may have been made through another server
    /// since the last poll: the copy is read again first (at most four
    /// times a second however many unknown tokens come), so a token works
    /// through every server as soon as it is made.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, Refused> {
        let tokens = &self.inner.tokens;
        match tokens.authenticate(token, model::now()) {
            Err(Refused::Unknown { .. }) if self.inner.store.shared() => {
                let missed = std::time::Instant::now();
                // Bounded: with the database away, an unknown token is
                // refused after 2 s, not after the pool's own timeout.
                let read = async {
                    tokio::time::timeout(Duration::from_secs(2), self.inner.store.tokens())
                        .await
                        .map_err(|_| Error::DatabaseConnect("no answer within 2 s".into()))?
                };
                if let Err(e) = tokens.reread(missed, read).await {
                    tracing::warn!(error = %e, "cannot read the tokens again");
                }
                tokens.authenticate(token, model::now())
            }
            answer => answer,
        }
    }

    /// Records the API address this server is reached at (once it is
    /// listening), for `troupe servers list`.
    pub async fn advertise(&self, address: &str) {
        self.inner.scheduler.advertise(address).await;
    }

    /// How many actions run here and wait their turn here.
    pub async fn control_stats(&self) -> ControlStats {
        self.inner.scheduler.stats().await
    }

    /// Whether this server should be sent work: `Err` says why not, as a
    /// stable code and a sentence (never the database's own message).
    /// Answers within `within` whatever the database does.
    pub async fn readiness(
        &self,
        within: Duration,
    ) -> std::result::Result<(), (&'static str, String)> {
        if self.inner.shared.stopping.is_cancelled() {
            return Err((
                "shutting_down",
                "this server is shutting down; send work to another".into(),
            ));
        }
        let looked = tokio::time::timeout(within, self.inner.store.takes_writes()).await;
        let why = match looked {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(why)) => why,
            Err(_) => {
                return Err((
                    "database_unavailable",
                    format!("the database did not answer within {within:?}"),
                ));
            }
        };
        // The details (which node, the database's own words) go to the
        // log: readiness answers without a credential.
        let node = self.inner.store.writes_through();
        tracing::warn!(node = ?node, why = %why, "not ready: the database does not take writes");
        Err(match why {
            store::NotWritable::Gone(_) => (
                "database_unavailable",
                "the database does not answer".into(),
            ),
            store::NotWritable::ReadOnly => (
                "database_read_only",
                "the database is read-only (a replica, or a primary after a switchover)".into(),
            ),
            store::NotWritable::NotInCluster(state) => (
                "database_not_in_cluster",
                format!(
                    "the database node written through is not a working member of its Galera \
                     cluster: {state}; the writes move to another listed node that is, if any"
                ),
            ),
        })
    }

    /// Stops starting steps and refuses new submits (`ShuttingDown`);
    /// [`Engine::shutdown`] finishes the job.
    pub fn begin_shutdown(&self) {
        self.inner.shared.stopping.cancel();
    }

    /// Graceful stop: starts no new step, lets running steps finish for up to
    /// `grace`, then releases unfinished actions (they resume on the next
    /// start) and stops the step hosts.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.scheduler.drain(grace).await;
        // Hosts first: once they (and what their plugins started) are gone,
        // no step of ours is running, and the actions may be handed over.
        self.inner.agency.shutdown().await;
        self.inner.shared.closed.cancel();
        self.inner.scheduler.release().await;
    }
}

/// This machine's host name, as servers list it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
