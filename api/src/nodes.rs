//! Remote nodes: the server's end of their connection (a WebSocket carrying
//! `node_protocol` messages), the bundle downloads they verify themselves,
//! and the list of connected nodes.
//!
//! A connection that says hello is attached to the engine's node registry
//! (`engine::nodes::Nodes`) as a [`Link`] until it ends; calls in flight on
//! a connection that ends fail naming the node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use engine::Engine;
use engine::host::{Answer, CallResult};
use engine::nodes::{CallKey, NodeLink, RemoteCall};
use futures_util::{FutureExt, SinkExt, StreamExt};
use node_protocol::{FromNode, PROTOCOL, ToNode};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::ApiError;
use crate::auth::{Admin, Caller, Join, MaybeCaller, Read, missing_scope};
use crate::wire::{ErrorBody, NodeList, NodeView};
use crate::ws::{BEFORE_HELLO, Budget, NodeSocket, Upgrade};
use engine::access::Scope;
use engine::nodes::Admission;

/// How long a new connection has to say hello.
const HELLO_WITHIN: Duration = Duration::from_secs(10);

/// Connections that have not said hello yet, at once, per server: each
/// holds at most [`BEFORE_HELLO`] bytes and [`HELLO_WITHIN`].
pub(crate) const HANDSHAKES: usize = 256;

type Sink = futures_util::stream::SplitSink<NodeSocket, Message>;
type Stream = futures_util::stream::SplitStream<NodeSocket>;

/// A node's connection: upgrade to a WebSocket, then `node_protocol`. A
/// node that has joined needs no token; a new one joins with a `join`
/// token, or without one waits for an admin's `accept`.
#[utoipa::path(
    get, path = "/v1/nodes/connect", tag = "nodes",
    security((), ("bearer" = ["join"])),
    responses(
        (status = 101, description = "switching to the node protocol (a WebSocket)"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    )
)]
pub(crate) async fn connect(
    caller: Result<MaybeCaller, ApiError>,
    State(state): State<crate::AppState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    let address = peer.map(|p| p.0.0.to_string());
    // A token that no longer works (expired, revoked) does not keep out a
    // node that joined with it: the handshake refuses only new ones.
    let token = match caller {
        Ok(MaybeCaller(Some(p))) if p.allows(Scope::Join) => Ok(Some(p)),
        Ok(MaybeCaller(Some(p))) => return Err(missing_scope(&p, Scope::Join)),
        Ok(MaybeCaller(None)) => Ok(None),
        Err(e) => Err(e.message),
    };
    let Ok(permit) = state.handshakes.clone().try_acquire_owned() else {
        tracing::warn!(
            peer = address.as_deref().unwrap_or("?"),
            "refused a node connection: {HANDSHAKES} others have not said hello yet"
        );
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too_many_handshakes",
            format!("{HANDSHAKES} node connections are saying hello already; try again shortly"),
        ));
    };
    let engine = state.engine.clone();
    let budget = Budget::new(BEFORE_HELLO);
    Ok(ws.on_upgrade(budget.clone(), move |socket| {
        session(engine, token, address, socket, budget, permit)
    }))
}

/// The bytes of a bundle, for a node to verify with its own keys.
#[utoipa::path(
    get, path = "/v1/nodes/bundles/{hash}", tag = "nodes",
    params(("hash" = String, Path)),
    security(("bearer" = ["join"])),
    responses(
        (status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn bundle(
    NodeSession(node): NodeSession,
    State(state): State<crate::AppState>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = state.node_bundles.get(&state.engine, &hash).await?;
    if let Some(node) = node {
        state.engine.nodes().pulled(&node, bytes.len() as u64);
    }
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// The bytes of the bundles nodes downloaded last, so that a thousand
/// nodes fetching a new version share one copy in memory (and one read
/// from the database) instead of holding one each.
#[derive(Clone, Default)]
pub struct BundleCache {
    /// Most recently used last; at most [`BundleCache::KEEP`].
    recent: Arc<tokio::sync::Mutex<Vec<(String, Bytes)>>>,
}

impl BundleCache {
    const KEEP: usize = 4;

    async fn get(&self, engine: &Engine, hash: &str) -> Result<Bytes, ApiError> {
        // Held across the read, so concurrent first downloads read once.
        let mut recent = self.recent.lock().await;
        if let Some(i) = recent.iter().position(|(h, _)| h == hash) {
            let entry = recent.remove(i);
            let bytes = entry.1.clone();
            recent.push(entry);
            return Ok(bytes);
        }
        let bytes = Bytes::from(engine.admin().bundle_content(hash).await?);
        recent.push((hash.to_owned(), bytes.clone()));
        if recent.len() > Self::KEEP {
            recent.remove(0);
        }
        Ok(bytes)
    }
}

/// The detached signature a bundle was admitted with.
#[utoipa::path(
    get, path = "/v1/nodes/bundles/{hash}/signature", tag = "nodes",
    params(("hash" = String, Path)),
    security(("bearer" = ["join"])),
    responses(
        (status = 200, content_type = "text/plain", body = String),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn signature(
    _: NodeSession,
    State(engine): State<Engine>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let text = engine.admin().bundle_signature(&hash).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain")], text).into_response())
}

/// The nodes that joined or asked to: status, key, connected or not,
/// capabilities, steps in flight.
#[utoipa::path(
    get, path = "/v1/nodes", tag = "nodes",
    security(("bearer" = ["read"])),
    responses(
        (status = 200, body = NodeList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn list(
    _: Caller<Read>,
    State(engine): State<Engine>,
) -> Result<Json<NodeList>, ApiError> {
    let live = engine.nodes().list();
    let mut nodes: Vec<NodeView> = engine
        .admin()
        .node_rows()
        .await?
        .into_iter()
        .map(|row| view(&engine, &live, row))
        .collect();
    nodes.extend(engine.nodes().pending().iter().map(NodeView::pending));
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(NodeList { nodes }))
}

/// One node: its row, and what the registry knows of it now.
#[utoipa::path(
    get, path = "/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path)),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, body = NodeView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn get(
    _: Caller<Read>,
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let row = engine.admin().node(&name).await?;
    Ok(Json(view(&engine, &engine.nodes().list(), row)))
}

/// A node's row with what the registry knows of it now.
fn view(
    engine: &Engine,
    live: &[engine::nodes::NodeInfo],
    row: engine::store::NodeRow,
) -> NodeView {
    let connected = live.iter().find(|n| n.name == row.name);
    let pulled = engine.nodes().pulled_bytes(&row.name);
    NodeView::new(row, connected, pulled)
}

/// Let a node in by its key: one that waits (its fingerprint), or one that
/// has not connected yet (its whole key). It takes calls from its next
/// connection.
#[utoipa::path(
    post, path = "/v1/nodes/{name}/accept", tag = "nodes",
    params(("name" = String, Path)),
    request_body = crate::wire::AcceptNode,
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = NodeView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn accept(
    caller: Caller<Admin>,
    State(engine): State<Engine>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<NodeView>, ApiError> {
    let expected = r#"expected {"key": "SHA256:…" or "ed25519:…"}: the key of the node to let in, as `troupe nodes list` shows it"#;
    let req: crate::wire::AcceptNode = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("key_required", format!("{e}; {expected}")))?;
    let row = engine
        .admin()
        .accept_node(&name, &req.key, &caller.principal.name)
        .await?;
    Ok(Json(view(&engine, &engine.nodes().list(), row)))
}

/// Remove a node: its key is refused from now on and its connection ends
/// at once; its steps in flight fail naming it.
#[utoipa::path(
    post, path = "/v1/nodes/{name}/remove", tag = "nodes",
    params(("name" = String, Path)),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = NodeView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn remove(
    caller: Caller<Admin>,
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let row = engine
        .admin()
        .remove_node(&name, &caller.principal.name)
        .await?;
    Ok(Json(view(&engine, &engine.nodes().list(), row)))
}

/// Drain a node (`?undo=true` to stop draining): it gets no new steps;
/// those in flight finish. It stays drained across reconnects and server
/// restarts.
#[utoipa::path(
    post, path = "/v1/nodes/{name}/drain", tag = "nodes",
    params(("name" = String, Path), ("undo" = Option<bool>, Query)),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, body = NodeView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
pub(crate) async fn drain(
    caller: Caller<Admin>,
    State(engine): State<Engine>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Result<Json<NodeView>, ApiError> {
    let undo = q.get("undo").is_some_and(|v| v == "true");
    let row = engine
        .admin()
        .drain_node(&name, !undo, &caller.principal.name)
        .await?;
    Ok(Json(view(&engine, &engine.nodes().list(), row)))
}

/// Calls sent on one connection and not answered yet.
/// Calls sent on one connection and not answered yet: who waits, whether
/// the call is idempotent, and a time before it was sent.
type Pending = Mutex<
    HashMap<node_protocol::CallKey, (oneshot::Sender<Answer>, bool, engine::model::Timestamp)>,
>;

/// The engine's handle on one connection.
struct Link {
    name: String,
    out: mpsc::UnboundedSender<ToNode>,
    pending: Pending,
    /// Set when the node is removed: the session says why and ends.
    closed: Mutex<Option<String>>,
    close: tokio::sync::Notify,
}

impl NodeLink for Link {
    fn call(&self, call: RemoteCall) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        let key = wire_key(call.key);
        self.pending
            .lock()
            .unwrap()
            .insert(key, (tx, call.idempotent, engine::model::now()));
        let message = ToNode::Call {
            key,
            bundle: call.bundle.to_string(),
            function: call.function,
            input: String::from_utf8_lossy(&call.input).into_owned(),
            timeout_ms: call.timeout.as_millis() as u64,
            grace_ms: call.grace.as_millis() as u64,
        };
        if self.out.send(message).is_err()
            && let Some((tx, ..)) = self.pending.lock().unwrap().remove(&key)
        {
            let _ = tx.send(engine::nodes::unsent(&self.name));
        }
        rx
    }

    fn cancel(&self, key: CallKey) {
        let _ = self.out.send(ToNode::Cancel { key: wire_key(key) });
    }

    fn close(&self, reason: &str) {
        *self.closed.lock().unwrap() = Some(reason.to_owned());
        self.close.notify_one();
    }

    fn report(&self) {
        let _ = self.out.send(ToNode::Report);
    }
}

fn engine_key(key: node_protocol::CallKey) -> CallKey {
    CallKey {
        action: key.action,
        seq: key.seq,
        attempt: key.attempt,
    }
}

fn wire_key(key: CallKey) -> node_protocol::CallKey {
    node_protocol::CallKey {
        action: key.action,
        seq: key.seq,
        attempt: key.attempt,
    }
}

/// The hello: checks the node's proof of its key and asks the engine
/// whether it may take calls. `None`: the node was told why not.
async fn handshake(
    engine: &Engine,
    token: Result<Option<&engine::access::Principal>, &str>,
    address: Option<&str>,
    sink: &mut Sink,
    stream: &mut Stream,
) -> Option<(
    String,
    std::collections::BTreeMap<String, String>,
    u64,
    Option<Vec<String>>,
)> {
    let nonce = random_hex()?;
    let challenge = ToNode::Challenge {
        nonce: nonce.clone(),
        server: engine.config().server_id.clone(),
    };
    send(sink, &challenge).await.ok()?;
    let hello = tokio::time::timeout(HELLO_WITHIN, stream.next()).await;
    match hello {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<FromNode>(&text) {
            Ok(FromNode::Hello {
                name,
                public_key,
                answer,
                capabilities,
                protocol,
                uptime_ms,
                ..
            }) => {
                if protocol != PROTOCOL {
                    let why = format!(
                        "this server speaks node protocol {PROTOCOL}, the node {protocol}; run the same troupe version on both"
                    );
                    {
                        refuse(sink, &why).await;
                        return None;
                    }
                }
                if !engine::placement::is_capability_name(&name) {
                    let why = format!(
                        "{name:?} is not a node name (letters, digits, '-', '_', '.'; at most 64)"
                    );
                    {
                        refuse(sink, &why).await;
                        return None;
                    }
                }
                if let Some(bad) = capabilities
                    .keys()
                    .find(|k| !engine::placement::is_capability_name(k))
                {
                    let why = format!("{bad:?} is not a capability name");
                    {
                        refuse(sink, &why).await;
                        return None;
                    }
                }
                let key = match public_key.parse::<signing::PublicKey>() {
                    Ok(key) if signing::node::check(&key, &nonce, &name, &answer) => key,
                    _ => {
                        let why = "the hello is not signed by the node key it names";
                        {
                            refuse(sink, why).await;
                            return None;
                        }
                    }
                };
                if let Err(why) = token {
                    // Only a node that is in already gets past a bad token.
                    let known = engine.admin().node(&name).await.ok();
                    let member = known.is_some_and(|n| {
                        n.status == engine::model::NodeStatus::Accepted
                            && n.public_key == key.to_string()
                    });
                    if !member {
                        refuse(sink, &format!("its token was refused: {why}")).await;
                        return None;
                    }
                }
                let allowed = match engine
                    .admin()
                    .admit_node(&name, &key, token.ok().flatten(), &capabilities, address)
                    .await
                {
                    Ok(Admission::Accepted { allowed }) => allowed,
                    Ok(Admission::Pending) => {
                        let fingerprint = key.fingerprint();
                        let reason = format!(
                            "node {name:?} waits for an admin: `troupe nodes accept {name} --key {fingerprint}` (or start it with a join token)"
                        );
                        tracing::info!(node = %name, key = %fingerprint, "a node asked to join; it waits for `troupe nodes accept`");
                        let _ = send(
                            sink,
                            &ToNode::Refused {
                                retry: true,
                                reason,
                            },
                        )
                        .await;
                        return None;
                    }
                    Ok(Admission::Refused(why)) => {
                        refuse(sink, &why).await;
                        return None;
                    }
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, "cannot record a node's hello");
                        let reason = "the server cannot reach its database; try again".to_owned();
                        let _ = send(
                            sink,
                            &ToNode::Refused {
                                retry: true,
                                reason,
                            },
                        )
                        .await;
                        return None;
                    }
                };
                Some((name, capabilities, uptime_ms, allowed))
            }
            _ => {
                refuse(sink, "the first message must be a hello").await;
                None
            }
        },
        _ => None,
    }
}

/// One node connection, from its hello to its end.
async fn session(
    engine: Engine,
    token: Result<Option<engine::access::Principal>, String>,
    address: Option<String>,
    socket: NodeSocket,
    budget: Budget,
    handshaking: tokio::sync::OwnedSemaphorePermit,
) {
    let (mut sink, mut stream) = socket.split();
    let Some((name, capabilities, uptime_ms, allowed)) = handshake(
        &engine,
        token.as_ref().map(Option::as_ref).map_err(String::as_str),
        address.as_deref(),
        &mut sink,
        &mut stream,
    )
    .await
    else {
        return;
    };
    budget.lift();
    drop(handshaking);
    let (out, mut outbox) = mpsc::unbounded_channel();
    let link = Arc::new(Link {
        name: name.clone(),
        out,
        pending: Mutex::default(),
        closed: Mutex::default(),
        close: tokio::sync::Notify::new(),
    });
    let Some(session) = random_hex() else {
        return;
    };
    let session = format!("node_{session}");
    let attached = engine.nodes().attach(
        &name,
        engine::nodes::Connection {
            capabilities: capabilities.clone(),
            allowed,
            link: link.clone(),
            session: session.clone(),
            address,
            started: engine::model::now()
                - chrono::TimeDelta::milliseconds(uptime_ms.min(i64::MAX as u64) as i64),
        },
    );
    let welcome = ToNode::Welcome {
        protocol: PROTOCOL,
        session,
        servers: peers(&engine).await,
    };
    if send(&mut sink, &welcome).await.is_err() {
        return;
    }
    let token = token.ok().flatten().map(|p| p.name);
    tracing::info!(node = %name, token = token.as_deref().unwrap_or("none"), ?capabilities, "node connected");
    // Heartbeats: the node sends one every second (`node_protocol::HEARTBEAT`),
    // and the server only reads; a node silent for the timeout (cut off,
    // stopped, its host frozen) counts as gone the moment it is up. The
    // server's own heartbeat, less often, lets the node notice a server
    // that is gone.
    let silence = engine.config().node_timeout;
    let mut heartbeat = tokio::time::interval(node_protocol::SERVER_HEARTBEAT);
    let mut heard = tokio::time::Instant::now();
    // Moved on when it fires, not at each message: a live node costs one
    // timer per timeout.
    let gone = tokio::time::sleep_until(heard + silence);
    tokio::pin!(gone);
    'session: loop {
        tokio::select! {
            message = stream.next() => {
                heard = tokio::time::Instant::now();
                attached.heard();
                // Whatever else has arrived is read in this turn too, and the
                // acknowledgements go out in one write.
                let mut message = message;
                let mut acks = 0;
                for _ in 0..64 {
                    match message {
                        Some(Ok(Message::Text(text))) => {
                            if let Some(key) = handle(&engine, &name, &link, &text) {
                                if sink.feed(ack(key)).await.is_err() {
                                    break 'session;
                                }
                                acks += 1;
                            }
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 'session,
                        Some(Ok(_)) => {}
                    }
                    match stream.next().now_or_never() {
                        Some(next) => message = next,
                        None => break,
                    }
                }
                if acks > 0 && sink.flush().await.is_err() {
                    break;
                }
            }
            Some(message) = outbox.recv() => {
                // Calls queued meanwhile go in the same write.
                let mut batch = vec![message];
                while batch.len() < 64 && let Ok(more) = outbox.try_recv() {
                    batch.push(more);
                }
                if send_all(&mut sink, &batch).await.is_err() {
                    break;
                }
            }
            _ = link.close.notified() => {
                let reason = link.closed.lock().unwrap().clone().unwrap_or_default();
                let _ = send(&mut sink, &ToNode::Refused { retry: false, reason }).await;
                break;
            }
            _ = &mut gone => {
                if heard.elapsed() >= silence {
                    tracing::warn!(node = %name, silent_ms = heard.elapsed().as_millis() as u64, "node stopped answering; dropping its connection");
                    break;
                }
                gone.as_mut().reset(heard + silence);
            }
            _ = heartbeat.tick() => {
                // Unsolicited: the node does not answer it.
                if sink.send(Message::Pong(Bytes::new())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(attached);
    // Its calls go on without us. An idempotent one fails now, to be
    // retried (maybe elsewhere); any other waits for the node to come back
    // and report it, up to the grace.
    let pending: Vec<_> = link.pending.lock().unwrap().drain().collect();
    tracing::warn!(node = %name, in_flight = pending.len(), "node disconnected");
    let grace = engine.config().node_grace;
    let removed = link.closed.lock().unwrap().is_some();
    for (key, (tx, idempotent, sent_after)) in pending {
        if removed {
            let _ = tx.send(engine::nodes::away(&name, "was removed"));
        } else if idempotent {
            let _ = tx.send(engine::nodes::away(
                &name,
                "it is idempotent, so it may run again",
            ));
        } else {
            engine
                .nodes()
                .park(&name, engine_key(key), tx, grace, sent_after);
        }
    }
}

/// The addresses the other live servers advertise, for a node to connect
/// to each. Read at each `Welcome` (the handshakes are few at once:
/// [`HANDSHAKES`]); a server whose address is its wildcard listen address
/// is left out, as no node can reach it there.
async fn peers(engine: &Engine) -> Vec<String> {
    let me = &engine.config().server_id;
    let servers = match engine.store().servers().await {
        Ok(servers) => servers,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the other servers for a node");
            return Vec::new();
        }
    };
    servers
        .into_iter()
        .filter(|s| &s.id != me && s.state == "live" && !s.silent)
        .filter_map(|s| s.address)
        .filter(|a| {
            let host = a.split("://").last().unwrap_or(a);
            !(host.starts_with("0.0.0.0:") || host.starts_with("[::]:"))
        })
        .collect()
}

/// Handles one message from a node; the key of a `Done` to acknowledge.
fn handle(engine: &Engine, name: &str, link: &Link, text: &str) -> Option<node_protocol::CallKey> {
    match serde_json::from_str::<FromNode>(text) {
        Ok(FromNode::Done {
            key,
            status,
            body,
            log,
        }) => {
            let waiting = link.pending.lock().unwrap().remove(&key).map(|(tx, ..)| tx);
            let answer = |body: String, log: String| Answer {
                result: CallResult::Done {
                    status,
                    body: body.into_bytes(),
                },
                log,
            };
            if let Some(tx) = waiting {
                let _ = tx.send(answer(body, log));
                return Some(key);
            }
            let nodes = engine.nodes();
            match nodes.deliver(name, engine_key(key), answer(body, log)) {
                // Handed to the runner that parked it: the node may forget it.
                Ok(()) => return Some(key),
                // Nobody here waits for it (its server stopped, or another
                // took its action over, or it is a repeat): stored first,
                // acknowledged then.
                Err(answer) => {
                    let out = link.out.clone();
                    nodes.keep(name, engine_key(key), answer, move || {
                        let _ = out.send(ToNode::Ack { key });
                    });
                }
            }
        }
        Ok(FromNode::Holding { keys, acked }) => {
            let keys: Vec<_> = keys.into_iter().map(engine_key).collect();
            let acked: Vec<_> = acked.into_iter().map(engine_key).collect();
            engine.nodes().holding(name, &keys, &acked);
        }
        Ok(FromNode::Capabilities { capabilities }) => {
            match capabilities
                .keys()
                .find(|k| !engine::placement::is_capability_name(k))
            {
                Some(bad) => {
                    tracing::warn!(node = %name, capability = %bad, "ignoring capabilities with a bad name")
                }
                None => {
                    tracing::info!(node = %name, ?capabilities, "node capabilities changed");
                    engine.nodes().set_capabilities(name, capabilities);
                }
            }
        }
        Ok(FromNode::Bundles { cached, loaded }) => {
            let cached = cached.into_iter().map(|b| (b.hash, b.bytes)).collect();
            engine
                .nodes()
                .set_bundles(name, engine::nodes::NodeBundles { cached, loaded });
        }
        Ok(FromNode::Hello { .. }) => {}
        Err(e) => {
            tracing::warn!(node = %name, error = %e, "ignoring a message the server does not understand")
        }
    }
    None
}

fn ack(key: node_protocol::CallKey) -> Message {
    let text = serde_json::to_string(&ToNode::Ack { key }).expect("messages serialize");
    Message::Text(text.into())
}

/// 32 random bytes as hex.
fn random_hex() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A connected node, by the session credential its `Welcome` carried (its
/// name), or a join token's holder (`None`).
pub(crate) struct NodeSession(Option<String>);

impl axum::extract::FromRequestParts<crate::AppState> for NodeSession {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &crate::AppState,
    ) -> Result<Self, ApiError> {
        let session = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(crate::auth::bearer)
            .filter(|v| v.starts_with("node_"));
        match session {
            Some(s) => match state.engine.nodes().by_session(s) {
                Some(name) => Ok(NodeSession(Some(name))),
                None => Err(ApiError::new(
                    axum::http::StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this node session has ended; the node gets a new one when it connects again",
                )),
            },
            // Not a node session: a join token (or admin) will do.
            None => Caller::<Join>::from_request_parts(parts, state)
                .await
                .map(|_| NodeSession(None)),
        }
    }
}

async fn send(
    sink: &mut Sink,
    message: &ToNode,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let text = serde_json::to_string(message).expect("messages serialize");
    sink.send(Message::Text(text.into())).await
}

/// Sends several messages with one flush.
async fn send_all(
    sink: &mut Sink,
    messages: &[ToNode],
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    for message in messages {
        let text = serde_json::to_string(message).expect("messages serialize");
        sink.feed(Message::Text(text.into())).await?;
    }
    sink.flush().await
}

/// Refuses the node for good, saying why, and ends the connection.
async fn refuse(sink: &mut Sink, why: &str) {
    tracing::warn!("refused a node: {why}");
    let refused = ToNode::Refused {
        retry: false,
        reason: why.to_owned(),
    };
    let _ = send(sink, &refused).await;
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: "refused".into(),
        })))
        .await;
}
