//! Several addresses for one MySQL/MariaDB database (the nodes of a Galera
//! cluster): `mysql://USER:PASSWORD@HOST1:PORT1,HOST2:PORT2/DATABASE`.
//! troupe writes through one node at a time, the first healthy one in the
//! list, so every server that was given the same list writes through the
//! same node (no certification conflicts between them); it moves on when
//! that node is gone, not ready (`wsrep_ready=OFF`), not Primary, not
//! Synced, or read-only, and back once an earlier node is healthy again.
//!
//! The same list names a primary/replica pair (or a primary and several
//! replicas): a replica is read-only, so it is never written through while
//! a writable node exists, whatever its place in the list. After a
//! switchover the old primary is read-only and the new one writable, and
//! the writes follow the new one; the list's order only says which to
//! prefer when several are writable at once, which a primary/replica setup
//! avoids (and which, on Galera, is the normal case).

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlSslMode};
use tokio::sync::Notify;

/// How often the nodes are looked at while all is well.
const EVERY: Duration = Duration::from_secs(1);

/// How often they are looked at while none takes writes (a switchover
/// under way: the old primary read-only, the new one not yet writable).
const EVERY_WHILE_NONE: Duration = Duration::from_millis(200);

/// How long a node may take to answer a look before it counts as gone.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The database's addresses and the one written through now.
pub(crate) struct Nodes {
    options: Vec<MySqlConnectOptions>,
    labels: Vec<String>,
    current: AtomicUsize,
    /// Bumped at each move: a connection opened before it is not used again.
    generation: AtomicU64,
    /// When the last move happened (pooled connections older than this
    /// belong to the previous node).
    moved_at: std::sync::Mutex<Instant>,
    /// Woken when a write failed for the connection's sake: look now.
    kick: Notify,
}

/// One URL per host of a URL listing several (`HOST1:PORT1,HOST2:PORT2`);
/// the URL itself when it names one.
pub(crate) fn split_url(url: &str) -> Vec<String> {
    let Some(scheme) = url.find("://") else {
        return vec![url.to_owned()];
    };
    let rest = &url[scheme + 3..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    if !hosts.contains(',') {
        return vec![url.to_owned()];
    }
    hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{}{userinfo}{h}{}", &url[..scheme + 3], &rest[end..]))
        .collect()
}

impl Nodes {
    /// The nodes `urls` name (see [`split_url`]). A host name that
    /// resolves to several addresses (one DNS name for the nodes of a
    /// Galera cluster) stands for each of them, in address order, as if the
    /// list named them: troupe writes through one at a time, and every
    /// server given the name prefers the same one. Looked
    /// up once, here; a name with one address is kept as the name, so each
    /// new connection resolves it again (a managed database that fails over
    /// by pointing its name elsewhere). With `ssl-mode=VERIFY_IDENTITY` a
    /// name is kept as it is, since the certificate is checked against the
    /// name connected to: list the nodes' names instead.
    pub(crate) async fn open(urls: &[String], statement_cache: usize) -> crate::Result<Nodes> {
        let mut options = Vec::new();
        for url in urls {
            let opts =
                MySqlConnectOptions::from_str(url)?.statement_cache_capacity(statement_cache);
            options.push(opts);
        }
        Ok(Nodes::new(expand(options, lookup).await))
    }

    fn new(options: Vec<(MySqlConnectOptions, String)>) -> Nodes {
        let (options, labels) = options.into_iter().unzip();
        Nodes {
            options,
            labels,
            current: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            moved_at: std::sync::Mutex::new(Instant::now()),
            kick: Notify::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.options.len()
    }

    pub(crate) fn options(&self, i: usize) -> &MySqlConnectOptions {
        &self.options[i]
    }

    /// `host:port` of the node written through now.
    pub(crate) fn current_label(&self) -> &str {
        &self.labels[self.current.load(Ordering::SeqCst)]
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Asks for a look at the nodes now (a write failed for the
    /// connection's sake).
    pub(crate) fn kick(&self) {
        self.kick.notify_one();
    }

    /// Whether a pooled connection opened `age` ago was opened before the
    /// last move, to another node.
    pub(crate) fn stale(&self, age: Duration) -> bool {
        self.len() > 1 && age >= self.moved_at.lock().unwrap().elapsed()
    }

    /// Whether the node written through now takes writes, looked at on a
    /// connection of its own: a pooled one asks for causal reads, which a
    /// node out of the Primary component refuses even for `SHOW`.
    pub(crate) async fn look_current(&self) -> Result<(), NotWritable> {
        let opts = &self.options[self.current.load(Ordering::SeqCst)];
        match tokio::time::timeout(PROBE_TIMEOUT, probe(opts)).await {
            Ok(r) => r,
            Err(_) => Err(NotWritable::Gone(format!(
                "no answer within {PROBE_TIMEOUT:?}"
            ))),
        }
    }

    /// Looks at every node at once; the first healthy one in the list, or
    /// why each is not.
    pub(crate) async fn choose(&self) -> Result<usize, Vec<(String, NotWritable)>> {
        let probes: Vec<_> = self
            .options
            .iter()
            .map(|o| {
                let o = o.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(PROBE_TIMEOUT, probe(&o)).await {
                        Ok(r) => r,
                        Err(_) => Err(NotWritable::Gone(format!(
                            "no answer within {PROBE_TIMEOUT:?}"
                        ))),
                    }
                })
            })
            .collect();
        let mut looks = Vec::with_capacity(probes.len());
        for p in probes {
            looks.push(
                p.await
                    .unwrap_or_else(|e| Err(NotWritable::Gone(e.to_string()))),
            );
        }
        if let Some(i) = looks.iter().position(Result::is_ok) {
            return Ok(i);
        }
        Err(looks
            .into_iter()
            .zip(&self.labels)
            .filter_map(|(r, label)| r.err().map(|why| (label.clone(), why)))
            .collect())
    }

    /// Makes node `to` the one written through: new connections go to it,
    /// and connections to the previous one are not used again.
    pub(crate) fn move_to(&self, to: usize, pool: &MySqlPool) {
        pool.set_connect_options(self.options[to].clone());
        *self.moved_at.lock().unwrap() = Instant::now();
        self.current.store(to, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Looks at the nodes every second, and at once when kicked, and moves
    /// to the first healthy one when that is not the current one. Ends when
    /// the pool is closed.
    pub(crate) async fn watch(self: Arc<Self>, pool: MySqlPool) {
        let mut none = false;
        while !pool.is_closed() {
            tokio::select! {
                _ = tokio::time::sleep(if none { EVERY_WHILE_NONE } else { EVERY }) => {}
                _ = self.kick.notified() => {}
            }
            let now = self.current.load(Ordering::SeqCst);
            let chosen = self.choose().await;
            none = chosen.is_err();
            match chosen {
                Ok(best) if best != now => {
                    tracing::warn!(
                        from = %self.labels[now],
                        to = %self.labels[best],
                        "moving the database writes to another node (the first healthy one in the list)"
                    );
                    self.move_to(best, &pool);
                }
                Ok(_) => {}
                Err(why) => {
                    let why: Vec<String> = why
                        .iter()
                        .map(|(node, why)| format!("{node}: {why}"))
                        .collect();
                    tracing::warn!(nodes = ?why, "no database node is healthy; staying where the writes are");
                }
            }
        }
    }
}

/// The addresses `host:port` resolves to, or none when it does not (within
/// 5 s): the connection then says why.
async fn lookup(host: String, port: u16) -> Vec<IpAddr> {
    let found = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await;
    match found {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
        Ok(Err(e)) => {
            tracing::warn!(host = %host, error = %e, "cannot resolve the database's host name");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(host = %host, "the database's host name did not resolve within 5 s");
            Vec::new()
        }
    }
}

/// Each node's options and label (`host:port`), a host name with several
/// addresses replaced by one node per address (labelled `ip:port (name)`),
/// as [`Nodes::open`] says.
async fn expand<F, Fut>(
    options: Vec<MySqlConnectOptions>,
    lookup: F,
) -> Vec<(MySqlConnectOptions, String)>
where
    F: Fn(String, u16) -> Fut,
    Fut: std::future::Future<Output = Vec<IpAddr>>,
{
    let mut nodes = Vec::new();
    for opts in options {
        let (host, port) = (opts.get_host().to_owned(), opts.get_port());
        let label = format!("{host}:{port}");
        let a_name = opts.get_socket().is_none()
            && host.trim_matches(['[', ']']).parse::<IpAddr>().is_err()
            && !matches!(opts.get_ssl_mode(), MySqlSslMode::VerifyIdentity);
        let mut addrs = if a_name {
            lookup(host.clone(), port).await
        } else {
            Vec::new()
        };
        // In address order, not the resolver's (which may rotate): every
        // server given the name agrees on the first.
        addrs.sort();
        addrs.dedup();
        if addrs.len() < 2 {
            nodes.push((opts, label));
            continue;
        }
        for addr in addrs {
            let at = match addr {
                IpAddr::V4(a) => format!("{a}:{port}"),
                IpAddr::V6(a) => format!("[{a}]:{port}"),
            };
            nodes.push((
                opts.clone().host(&addr.to_string()),
                format!("{at} ({host})"),
            ));
        }
    }
    nodes
}

/// Why a node does not take writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotWritable {
    /// It does not answer (or answers with an error): the text says what.
    Gone(String),
    /// `read_only` is on: a replica, or a primary after a switchover.
    ReadOnly,
    /// A Galera node that is no working member of its cluster: not ready
    /// (`wsrep_ready=OFF`), not in the Primary component (the cluster lost
    /// its quorum, or this node is cut off from it), or not Synced.
    NotInCluster(String),
}

impl std::fmt::Display for NotWritable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotWritable::Gone(why) => f.write_str(why),
            NotWritable::ReadOnly => f.write_str("read-only"),
            NotWritable::NotInCluster(why) => f.write_str(why),
        }
    }
}

/// Whether the node at `opts` takes writes now: it answers, is not
/// read-only and, on Galera, is ready, in the Primary component and Synced.
async fn probe(opts: &MySqlConnectOptions) -> Result<(), NotWritable> {
    let mut conn = MySqlConnection::connect_with(opts)
        .await
        .map_err(|e| NotWritable::Gone(e.to_string()))?;
    let looked = look(&mut conn).await;
    let _ = conn.close().await;
    looked
}

/// Whether the node `conn` is connected to takes writes now.
async fn look(conn: &mut MySqlConnection) -> Result<(), NotWritable> {
    let gone = |e: sqlx::Error| NotWritable::Gone(e.to_string());
    let vars: Vec<(String, String)> =
        sqlx::query_as("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('read_only', 'wsrep_on')")
            .fetch_all(&mut *conn)
            .await
            .map_err(gone)?;
    let var = |name: &str| {
        vars.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    if var("read_only").is_some_and(|v| v.eq_ignore_ascii_case("ON") || v == "1") {
        return Err(NotWritable::ReadOnly);
    }
    if !var("wsrep_on").is_some_and(|v| v.eq_ignore_ascii_case("ON")) {
        return Ok(());
    }
    let status: Vec<(String, String)> = sqlx::query_as(
        "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_cluster_status', 'wsrep_local_state')",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(gone)?;
    let get = |name: &str| {
        status
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    };
    if get("wsrep_cluster_status") != "Primary" {
        return Err(NotWritable::NotInCluster(format!(
            "not in the Primary component ({}): the cluster lost its quorum, or this node is cut off from it",
            get("wsrep_cluster_status")
        )));
    }
    if !get("wsrep_ready").eq_ignore_ascii_case("ON") {
        return Err(NotWritable::NotInCluster(
            "not ready (wsrep_ready=OFF)".into(),
        ));
    }
    // 4: Synced. A donor (2) may be blocked by its state transfer.
    if get("wsrep_local_state") != "4" {
        return Err(NotWritable::NotInCluster(format!(
            "not Synced (state {})",
            get("wsrep_local_state")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::str::FromStr;

    use sqlx::mysql::MySqlConnectOptions;

    use super::{expand, split_url};

    /// What [`expand`] makes of `urls` when `db.example` resolves to
    /// fd00::2, 10.0.0.1 and 10.0.0.1 again, and `one.example` to 10.0.0.9:
    /// each node's host and label.
    async fn expanded(urls: &[&str]) -> Vec<(String, String)> {
        let options = urls
            .iter()
            .map(|u| MySqlConnectOptions::from_str(u).unwrap())
            .collect();
        let looked_up = std::sync::Mutex::new(Vec::new());
        let nodes = expand(options, |host: String, _port| {
            looked_up.lock().unwrap().push(host.clone());
            async move {
                match host.as_str() {
                    "db.example" => ["fd00::2", "10.0.0.1", "10.0.0.1"]
                        .iter()
                        .map(|a| a.parse::<IpAddr>().unwrap())
                        .collect(),
                    "one.example" => vec!["10.0.0.9".parse().unwrap()],
                    _ => Vec::new(),
                }
            }
        })
        .await;
        let looked_up = looked_up.into_inner().unwrap();
        assert!(
            looked_up.iter().all(|h| h.ends_with(".example")),
            "only names are looked up: {looked_up:?}"
        );
        nodes
            .into_iter()
            .map(|(o, label)| (o.get_host().to_owned(), label))
            .collect()
    }

    #[tokio::test]
    async fn a_name_with_several_addresses_is_one_node_per_address() {
        assert_eq!(
            expanded(&["mysql://u:p@db.example:3307/troupe"]).await,
            [
                ("10.0.0.1".into(), "10.0.0.1:3307 (db.example)".into()),
                ("fd00::2".into(), "[fd00::2]:3307 (db.example)".into()),
            ]
        );
        // Beside other nodes, in its place in the list.
        assert_eq!(
            expanded(&["mysql://u:p@10.0.0.7:3306/t", "mysql://u:p@db.example/t"]).await,
            [
                ("10.0.0.7".into(), "10.0.0.7:3306".into()),
                ("10.0.0.1".into(), "10.0.0.1:3306 (db.example)".into()),
                ("fd00::2".into(), "[fd00::2]:3306 (db.example)".into()),
            ]
        );
    }

    #[tokio::test]
    async fn a_name_with_one_address_or_none_or_a_checked_identity_stays_a_name() {
        for url in [
            "mysql://u:p@one.example:3306/t",
            "mysql://u:p@gone.example:3306/t",
            "mysql://u:p@db.example:3306/t?ssl-mode=VERIFY_IDENTITY",
        ] {
            let host = MySqlConnectOptions::from_str(url)
                .unwrap()
                .get_host()
                .to_owned();
            assert_eq!(
                expanded(&[url]).await,
                [(host.clone(), format!("{host}:3306"))],
                "{url}"
            );
        }
    }

    #[test]
    fn a_url_with_several_hosts_is_one_url_per_host() {
        assert_eq!(
            split_url("mysql://u:p,w@a:1,b:2,c/db?ssl-mode=REQUIRED"),
            [
                "mysql://u:p,w@a:1/db?ssl-mode=REQUIRED",
                "mysql://u:p,w@b:2/db?ssl-mode=REQUIRED",
                "mysql://u:p,w@c/db?ssl-mode=REQUIRED",
            ]
        );
        assert_eq!(split_url("mysql://u:p@a:1/db"), ["mysql://u:p@a:1/db"]);
        assert_eq!(split_url("mysql://a,b"), ["mysql://a", "mysql://b"]);
    }
}
