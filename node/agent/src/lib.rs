//! `troupe node`: the agent on a remote host. It keeps one outbound
//! WebSocket to its app server (see `node_protocol`), says what it can do,
//! and runs the step calls it is sent in step hosts of its own, exactly as
//! the server runs local ones (`engine::step::run_on_host`: the same
//! timeout, cancel and kill-after-grace rules).
//!
//! Bundles are fetched by hash on first need and verified here, with this
//! node's own trusted keys, by the same checks the server's Source
//! Authority makes (`signing::verify`, then `engine::bundle::open`): the
//! server only carries the bytes. A bundle that fails is not kept.
//!
//! Failure points for tests, armed through `FAILPOINTS` as the engine's
//! are (`engine::failpoints`; compiled out of builds without them):
//!
//! | name | where | what `return` does |
//! | --- | --- | --- |
//! | `node.lose_result` | a call's `Done`, about to be written | counts it sent but never writes it, and ends the connection |
//! | `node.cut_after_results` | results just written | ends the connection, dropping the server's acknowledgements |

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use node_protocol::{CallKey, FromNode, PROTOCOL, ToNode};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

mod bundles;
mod capabilities;
mod servers;

pub use bundles::Bundles;
use capabilities::Capabilities;
pub use capabilities::{Probe, built_in};
use servers::{Duplicate, Servers};

/// How to reach the server and what this node is.
pub struct Config {
    /// `http://HOST:PORT` or `https://HOST:PORT`: the API of each server
    /// (all sharing one database); the node connects to every one.
    pub servers: Vec<String>,
    /// An API token with the `join` scope, to join without an admin's
    /// accept; a node that has joined needs none.
    pub token: Option<String>,
    pub name: String,
    /// This node's identity (`node.key` in its data directory).
    pub key: signing::SecretKey,
    /// What it can do, besides its probes' findings ([`built_in`] and the
    /// operator's pairs).
    pub capabilities: BTreeMap<String, String>,
    /// Capabilities found by commands, run again every `probe_every`.
    pub probes: Vec<Probe>,
    pub probe_every: Duration,
    /// Where fetched bundles are kept, by hash.
    pub data_dir: PathBuf,
    /// The keys this node accepts bundles from; the server's word counts
    /// for nothing.
    pub trust: signing::Trust,
    pub host_command: engine::host::HostCommand,
    /// For an `https://` server: the roots its certificate must chain to.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// A loaded bundle no call used for this long is unloaded.
    pub unload_after: Duration,
    /// The bundle cache's size limit, in bytes: bundles not in use are
    /// evicted, least recently used first, to stay under it.
    pub cache_size: u64,
}

/// Runs the node until `stop` is cancelled, with one connection to each
/// server (those given, and those a server names), each reconnecting (1 s
/// doubling to 30 s, with jitter) whenever it ends. A refusal that cannot
/// change by retrying (a bad token, a name in use) ends it with an error.
pub async fn run(config: Config, stop: CancellationToken) -> Result<()> {
    if config.servers.is_empty() {
        bail!("a node needs at least one --server");
    }
    let (servers, mut numbers) = Servers::new(&config.servers);
    let servers = Arc::new(servers);
    let config = Arc::new(config);
    let bundles = Arc::new(Bundles::new(&config, servers.clone())?);
    let calls = Arc::new(Calls::default());
    let caps = Arc::new(
        Capabilities::new(
            config.capabilities.clone(),
            config.probes.clone(),
            config.probe_every,
        )
        .await,
    );
    tokio::spawn(bundles.clone().tidy(stop.clone()));
    {
        let (caps, stop) = (caps.clone(), stop.clone());
        tokio::spawn(async move { caps.run(stop).await });
    }
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(n) = numbers.recv() => {
                let node = Node {
                    config: config.clone(),
                    servers: servers.clone(),
                    bundles: bundles.clone(),
                    calls: calls.clone(),
                    caps: caps.clone(),
                };
                connections.spawn(async move { node.stay_connected(n).await });
            }
            Some(ended) = connections.join_next() => {
                ended.context("a connection's task failed")??;
            }
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// What every connection shares.
struct Node {
    config: Arc<Config>,
    servers: Arc<Servers>,
    bundles: Arc<Bundles>,
    calls: Arc<Calls>,
    caps: Arc<Capabilities>,
}

/// How long a server another named may stay unreachable before the node
/// stops trying it (until a server names it again).
const LEARNED_FOR: Duration = Duration::from_secs(120);

/// How long a given address that led to a server connected already waits
/// before trying again (a load balancer may lead elsewhere next time).
const DUPLICATE_RETRY: Duration = Duration::from_secs(30);

impl Node {
    /// Keeps a connection to server number `n`. Ends with an error on a
    /// refusal that retrying cannot change, and quietly when `n` is an
    /// address another server named and it is given up.
    async fn stay_connected(&self, n: usize) -> Result<()> {
        let url = self.servers.url(n);
        let learned = self.servers.learned(n);
        let mut delay = Duration::from_secs(1);
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            let outcome = self.session(n).await;
            self.calls.disconnected(n);
            self.servers.ended(n);
            let mut wait = delay;
            match outcome {
                Ok(()) => {
                    tracing::warn!(server = %url, "the server closed the connection; reconnecting");
                    delay = Duration::from_secs(1);
                    failing_since = None;
                    wait = delay;
                }
                Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
                Err(e) if e.downcast_ref::<Duplicate>().is_some() => {
                    if learned {
                        tracing::debug!(server = %url, error = %e, "not connecting twice");
                        self.servers.retire(n);
                        return Ok(());
                    }
                    tracing::info!(server = %url, error = %e, "not connecting twice; trying this address again later");
                    wait = DUPLICATE_RETRY;
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if learned && since.elapsed() >= LEARNED_FOR {
                        tracing::warn!(server = %url, error = %format!("{e:#}"), "giving up a server another named: unreachable for {} s", LEARNED_FOR.as_secs());
                        self.servers.retire(n);
                        return Ok(());
                    }
                    tracing::warn!(server = %url, error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "not connected to the server");
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
            let jitter = Duration::from_millis(u64::from(std::process::id() % 250));
            tokio::time::sleep(wait + jitter).await;
        }
    }
}

/// How long the server may stay silent before the node connects again.
const SERVER_SILENCE: Duration = Duration::from_secs(15);

/// The server refused this node for a reason retrying cannot fix.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// The node's calls, across connections and servers: a call keeps running
/// when its connection drops, and its result waits here until a
/// connection can carry it.
struct Calls {
    /// When this process started taking calls.
    born: std::time::Instant,
    running: Mutex<HashMap<CallKey, CancellationToken>>,
    results: Mutex<Results>,
    /// Bumped when a result is kept or a connection ends: each
    /// connection then looks for what it should send.
    ready: tokio::sync::watch::Sender<u64>,
    /// Calls whose results a server acknowledged, newest last, kept for
    /// [`ACKED_FOR`]: a server that restarts (or takes an action over)
    /// asks about them.
    acked: Mutex<std::collections::VecDeque<(std::time::Instant, CallKey)>>,
}

impl Default for Calls {
    fn default() -> Self {
        Calls {
            born: std::time::Instant::now(),
            running: Mutex::default(),
            results: Mutex::default(),
            ready: tokio::sync::watch::channel(0).0,
            acked: Mutex::default(),
        }
    }
}

/// How long a node remembers that a result was acknowledged (longer than
/// a server takes to restart), and how many it remembers at most.
const ACKED_FOR: Duration = Duration::from_secs(600);
const ACKED_MAX: usize = 20_000;

/// Ended calls' `Done` messages, kept until a server acknowledges them.
#[derive(Default)]
struct Results {
    /// Oldest first.
    kept: Vec<Kept>,
    /// The servers connected now, by number.
    connected: std::collections::HashSet<usize>,
}

/// One call's result, and where it went.
struct Kept {
    key: CallKey,
    done: FromNode,
    /// The server that sent the call: the result goes back to it while it
    /// is connected, else to every server connected.
    origin: usize,
    /// The connections it was sent on and not acknowledged yet.
    sent_on: std::collections::HashSet<usize>,
}

impl Calls {
    fn finished(&self, key: CallKey, origin: usize, done: FromNode) {
        self.running.lock().unwrap().remove(&key);
        self.results.lock().unwrap().kept.push(Kept {
            key,
            done,
            origin,
            sent_on: Default::default(),
        });
        self.ready.send_modify(|n| *n += 1);
    }

    fn connected(&self, server: usize) {
        self.results.lock().unwrap().connected.insert(server);
    }

    /// Server `server`'s connection ended: what was sent on it and not
    /// acknowledged goes again (on its next connection, or on the others
    /// while it is down).
    fn disconnected(&self, server: usize) {
        let mut results = self.results.lock().unwrap();
        results.connected.remove(&server);
        for kept in &mut results.kept {
            kept.sent_on.remove(&server);
        }
        drop(results);
        self.ready.send_modify(|n| *n += 1);
    }

    /// What connection `server` should send now: results of the calls its
    /// server sent, and of those whose server is not connected; each
    /// counted sent on it.
    fn to_send(&self, server: usize) -> Vec<(CallKey, FromNode)> {
        let mut results = self.results.lock().unwrap();
        let Results { kept, connected } = &mut *results;
        kept.iter_mut()
            .filter(|k| {
                (k.origin == server || !connected.contains(&k.origin))
                    && !k.sent_on.contains(&server)
            })
            .map(|k| {
                k.sent_on.insert(server);
                (k.key, k.done.clone())
            })
            .collect()
    }

    /// A server has the result: every connection forgets it.
    fn acknowledged(&self, key: CallKey) {
        self.results.lock().unwrap().kept.retain(|k| k.key != key);
        let mut acked = self.acked.lock().unwrap();
        acked.push_back((std::time::Instant::now(), key));
        while acked.len() > ACKED_MAX
            || acked
                .front()
                .is_some_and(|(at, _)| at.elapsed() > ACKED_FOR)
        {
            acked.pop_front();
        }
    }

    /// The calls acknowledged lately.
    fn acked(&self) -> Vec<CallKey> {
        let acked = self.acked.lock().unwrap();
        acked
            .iter()
            .filter(|(at, _)| at.elapsed() <= ACKED_FOR)
            .map(|(_, k)| *k)
            .collect()
    }

    /// What the node holds, for a server: the calls running, or ended and
    /// not yet acknowledged, and those acknowledged lately.
    fn holding(&self) -> FromNode {
        let mut keys: Vec<CallKey> = self.running.lock().unwrap().keys().copied().collect();
        keys.extend(self.results.lock().unwrap().kept.iter().map(|k| k.key));
        FromNode::Holding {
            keys,
            acked: self.acked(),
        }
    }
}

impl Node {
    /// One connection to server number `server`: hello, then calls until it
    /// ends.
    async fn session(&self, server: usize) -> Result<()> {
        let Node {
            config,
            servers,
            bundles,
            calls,
            caps,
        } = self;
        let url = &servers.url(server);
        let mut ws = connect(url, config).await?;
        let mut ready = calls.ready.subscribe();
        let mut caps_changed = caps.subscribe();
        let mut bundles_changed = bundles.subscribe();
        let nonce = match next_message(&mut ws).await? {
            ToNode::Challenge { nonce, server: id } => {
                if !id.is_empty() && !servers.claim(server, &id) {
                    let _ = ws.close(None).await;
                    return Err(Duplicate(id).into());
                }
                nonce
            }
            other => bail!("the server began with {other:?} instead of a challenge"),
        };
        let hello = FromNode::Hello {
            name: config.name.clone(),
            public_key: config.key.public().to_string(),
            answer: signing::node::answer(&config.key, &nonce, &config.name),
            capabilities: caps_changed.borrow_and_update().clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: PROTOCOL,
            uptime_ms: calls.born.elapsed().as_millis() as u64,
        };
        ws.send(Message::text(serde_json::to_string(&hello)?))
            .await?;
        match next_message(&mut ws).await? {
            ToNode::Welcome {
                session,
                servers: others,
                ..
            } => {
                servers.welcomed(server, session);
                servers.learn(server, &others);
            }
            ToNode::Refused {
                retry: true,
                reason,
            } => bail!("{reason}"),
            ToNode::Refused {
                retry: false,
                reason,
            } => return Err(Refused(format!("the server refused this node: {reason}")).into()),
            other => bail!("the server answered the hello with {other:?}"),
        }
        tracing::info!(server = %url, node = %config.name, "connected");

        let (mut sink, mut stream) = ws.split();
        calls.connected(server);
        sink.send(Message::text(serde_json::to_string(&calls.holding())?))
            .await?;
        bundles_changed.mark_unchanged();
        sink.send(Message::text(serde_json::to_string(&bundles.report())?))
            .await?;
        // A heartbeat every second tells the server this node is alive; the
        // server's, every few seconds, that it is: silence this long means it
        // is gone (or the way to it is), so connect again.
        let mut check = tokio::time::interval(node_protocol::HEARTBEAT);
        let mut heard = tokio::time::Instant::now();
        loop {
            // Results first: those kept while disconnected, then new ones, in
            // one write.
            ready.mark_unchanged();
            let mut fed = false;
            for (key, done) in calls.to_send(server) {
                let text = serde_json::to_string(&done)?;
                if failpoint("node.lose_result") {
                    // A test's cut between a result leaving the node and the
                    // server reading it: counted sent, never written.
                    return cut(sink, stream, "a result was lost on the way").await;
                }
                tracing::debug!(?key, "result sent");
                sink.feed(Message::text(text)).await?;
                fed = true;
            }
            if fed {
                sink.flush().await?;
                if failpoint("node.cut_after_results") {
                    // A test's cut between the server reading a result and its
                    // acknowledgement reaching the node.
                    return cut(sink, stream, "the connection was cut after sending results").await;
                }
            }
            tokio::select! {
                message = stream.next() => {
                    heard = tokio::time::Instant::now();
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None => return Ok(()),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e.into()),
                    };
                    match serde_json::from_str::<ToNode>(&text) {
                        Ok(ToNode::Call { key, bundle, function, input, timeout_ms, grace_ms }) => {
                            tracing::debug!(?key, %function, "call received");
                            let cancel = CancellationToken::new();
                            calls.running.lock().unwrap().insert(key, cancel.clone());
                            let call = Call {
                                key,
                                bundle,
                                function,
                                input,
                                timeout: Duration::from_millis(timeout_ms),
                                grace: Duration::from_millis(grace_ms),
                            };
                            let (bundles, calls) = (bundles.clone(), calls.clone());
                            tokio::spawn(async move {
                                let done = call.run(&bundles, server, cancel).await;
                                calls.finished(key, server, done);
                            });
                        }
                        Ok(ToNode::Cancel { key }) => {
                            if let Some(cancel) = calls.running.lock().unwrap().get(&key) {
                                cancel.cancel();
                            }
                        }
                        Ok(ToNode::Ack { key }) => {
                            tracing::debug!(?key, "result acknowledged");
                            calls.acknowledged(key);
                        }
                        Ok(ToNode::Report) => {
                            sink.send(Message::text(serde_json::to_string(&calls.holding())?)).await?;
                        }
                        Ok(ToNode::Refused { reason, .. }) => {
                            return Err(Refused(format!("the server refused this node: {reason}")).into());
                        }
                        Ok(ToNode::Welcome { .. } | ToNode::Challenge { .. }) => {}
                        Err(e) => tracing::warn!(error = %e, "ignoring a message this node does not understand"),
                    }
                }
                Ok(()) = ready.changed() => {}
                Ok(()) = caps_changed.changed() => {
                    let capabilities = caps_changed.borrow_and_update().clone();
                    let message = FromNode::Capabilities { capabilities };
                    sink.send(Message::text(serde_json::to_string(&message)?)).await?;
                }
                Ok(()) = bundles_changed.changed() => {
                    bundles_changed.mark_unchanged();
                    sink.send(Message::text(serde_json::to_string(&bundles.report())?)).await?;
                }
                _ = check.tick() => {
                    if heard.elapsed() > SERVER_SILENCE {
                        bail!("the server sent nothing for {} s", SERVER_SILENCE.as_secs());
                    }
                    sink.send(Message::Pong(Default::default())).await?;
                }
            }
        }
    }
}

/// Whether the test failure point `name` is armed to fire now (see
/// `engine::failpoints`); never in a build without failure points.
fn failpoint(name: &str) -> bool {
    let _ = name;
    fail::fail_point!(name, |_| true);
    false
}

/// Ends the connection the way a cut does for the server, on purpose (a
/// failure point): nothing more is sent, what the server sends meanwhile
/// (acknowledgements too) is read and dropped until it closes, within
/// 30 s. Reading it all first keeps the close a clean one, so the server
/// reads everything that was sent before.
async fn cut(
    mut sink: futures_util::stream::SplitSink<Socket, Message>,
    mut stream: futures_util::stream::SplitStream<Socket>,
    why: &str,
) -> Result<()> {
    let _ = sink.send(Message::Close(None)).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    bail!("{why} (a test's failure point)")
}

/// The next protocol message during the handshake (within 30 s).
async fn next_message(ws: &mut Socket) -> Result<ToNode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                return serde_json::from_str(&text)
                    .with_context(|| format!("the server sent {text:?}"));
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => {
                bail!("the server closed the connection")
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.into()),
            Err(_) => bail!("the server did not answer within 30 s"),
        }
    }
}

type Socket = tokio_tungstenite::WebSocketStream<Box<dyn Stream>>;

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Opens the WebSocket to `server`, over TLS for an `https://` one.
async fn connect(server: &str, config: &Config) -> Result<Socket> {
    let (secure, rest) = if let Some(rest) = server.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = server.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(Refused(format!(
            "--server {server:?} must be an http:// or https:// URL"
        ))
        .into());
    };
    let authority = rest.trim_end_matches('/');
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:{}", if secure { 443 } else { 80 })
    };
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let stream: Box<dyn Stream> = if secure {
        let tls = config
            .tls
            .clone()
            .ok_or_else(|| anyhow!("an https:// server needs TLS roots"))?;
        let name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| anyhow!("{host:?} is not a server name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .with_context(|| {
                format!("TLS with {addr} (pass the CA that signed its certificate with --ca-cert)")
            })?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let scheme = if secure { "wss" } else { "ws" };
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "{scheme}://{authority}/v1/nodes/connect"
        ))?;
    if let Some(token) = &config.token {
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| Refused("the token is not a valid header value".into()))?,
        );
    }
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status();
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            let message = format!("the server refused the connection ({status}): {body}");
            if matches!(status.as_u16(), 401 | 403) {
                Err(Refused(message).into())
            } else {
                Err(anyhow!(message))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// One call to run.
struct Call {
    key: CallKey,
    bundle: String,
    function: String,
    input: String,
    timeout: Duration,
    grace: Duration,
}

impl Call {
    /// Runs the call `server` sent, fetching its bundle from that server
    /// first (or another, if it is gone) if need be.
    async fn run(
        self,
        bundles: &Arc<Bundles>,
        server: usize,
        cancel: CancellationToken,
    ) -> FromNode {
        let key = self.key;
        let done = |status: i32, body: String, log: String| FromNode::Done {
            key,
            status,
            body,
            log,
        };
        let lease = match bundles.host(&self.bundle, server).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(bundle = %self.bundle, error = %e, "cannot run a call");
                return done(
                    troupe_sdk::ffi::STATUS_FATAL,
                    format!("{e:#}"),
                    String::new(),
                );
            }
        };
        let attempt = engine::step::run_on_host(
            lease.host.clone(),
            &self.function,
            &self.function,
            self.input.into_bytes(),
            self.timeout,
            self.grace,
            cancel,
        )
        .await;
        let log = attempt.log.clone();
        let (status, body) = attempt.into_status();
        done(status, body, log)
    }
}
