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
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use engine::Engine;
use engine::host::{Answer, CallResult};
use engine::nodes::{CallKey, NodeLink, RemoteCall};
use futures_util::{SinkExt, StreamExt};
use node_protocol::{FromNode, PROTOCOL, ToNode};
use tokio::sync::{mpsc, oneshot};

use crate::ApiError;
use crate::auth::{Caller, Join, Read};
use crate::wire::{ErrorBody, NodeList, NodeView};

/// How long a new connection has to say hello.
const HELLO_WITHIN: Duration = Duration::from_secs(10);

/// A node's connection: upgrade to a WebSocket, then `node_protocol`.
#[utoipa::path(
    get, path = "/v1/nodes/connect", tag = "nodes",
    security(("bearer" = ["join"])),
    responses(
        (status = 101, description = "switching to the node protocol (a WebSocket)"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    )
)]
pub(crate) async fn connect(
    caller: Caller<Join>,
    State(engine): State<Engine>,
    ws: WebSocketUpgrade,
) -> Response {
    let token = caller.principal.name.clone();
    ws.on_upgrade(move |socket| session(engine, token, socket))
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
    _: Caller<Join>,
    State(engine): State<Engine>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = engine.bundle_content(&hash).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Bytes::from(bytes),
    )
        .into_response())
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
    _: Caller<Join>,
    State(engine): State<Engine>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let text = engine.bundle_signature(&hash).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain")], text).into_response())
}

/// The connected nodes: capabilities, since when, steps in flight.
#[utoipa::path(
    get, path = "/v1/nodes", tag = "nodes",
    security(("bearer" = ["read"])),
    responses((status = 200, body = NodeList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody))
)]
pub(crate) async fn list(_: Caller<Read>, State(engine): State<Engine>) -> Json<NodeList> {
    let nodes = engine
        .nodes()
        .list()
        .into_iter()
        .map(NodeView::from)
        .collect();
    Json(NodeList { nodes })
}

/// Calls sent on one connection and not answered yet.
type Pending = Mutex<HashMap<node_protocol::CallKey, oneshot::Sender<Answer>>>;

/// The engine's handle on one connection.
struct Link {
    name: String,
    out: mpsc::UnboundedSender<ToNode>,
    pending: Pending,
}

impl NodeLink for Link {
    fn call(&self, call: RemoteCall) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        let key = wire_key(call.key);
        self.pending.lock().unwrap().insert(key, tx);
        let message = ToNode::Call {
            key,
            bundle: call.bundle.to_string(),
            function: call.function,
            input: String::from_utf8_lossy(&call.input).into_owned(),
            timeout_ms: call.timeout.as_millis() as u64,
            grace_ms: call.grace.as_millis() as u64,
        };
        if self.out.send(message).is_err()
            && let Some(tx) = self.pending.lock().unwrap().remove(&key)
        {
            let _ = tx.send(gone(&self.name));
        }
        rx
    }

    fn cancel(&self, key: CallKey) {
        let _ = self.out.send(ToNode::Cancel { key: wire_key(key) });
    }
}

fn wire_key(key: CallKey) -> node_protocol::CallKey {
    node_protocol::CallKey {
        action: key.action,
        seq: key.seq,
        attempt: key.attempt,
    }
}

fn gone(node: &str) -> Answer {
    Answer {
        result: CallResult::Crashed(format!("node {node} went away while the step ran")),
        log: String::new(),
    }
}

/// One node connection, from its hello to its end.
async fn session(engine: Engine, token: String, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let hello = tokio::time::timeout(HELLO_WITHIN, stream.next()).await;
    let (name, capabilities) = match hello {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<FromNode>(&text) {
            Ok(FromNode::Hello {
                name,
                capabilities,
                protocol,
                ..
            }) => {
                if protocol != PROTOCOL {
                    let why = format!(
                        "this server speaks node protocol {PROTOCOL}, the node {protocol}; run the same troupe version on both"
                    );
                    return refuse(&mut sink, &why).await;
                }
                if !engine::placement::is_capability_name(&name) {
                    let why = format!(
                        "{name:?} is not a node name (letters, digits, '-', '_', '.'; at most 64)"
                    );
                    return refuse(&mut sink, &why).await;
                }
                if let Some(bad) = capabilities
                    .keys()
                    .find(|k| !engine::placement::is_capability_name(k))
                {
                    let why = format!("{bad:?} is not a capability name");
                    return refuse(&mut sink, &why).await;
                }
                (name, capabilities)
            }
            _ => return refuse(&mut sink, "the first message must be a hello").await,
        },
        _ => return,
    };
    let (out, mut outbox) = mpsc::unbounded_channel();
    let link = Arc::new(Link {
        name: name.clone(),
        out,
        pending: Mutex::default(),
    });
    let welcome = ToNode::Welcome { protocol: PROTOCOL };
    if send(&mut sink, &welcome).await.is_err() {
        return;
    }
    let attached = engine
        .nodes()
        .attach(&name, capabilities.clone(), link.clone());
    tracing::info!(node = %name, token = %token, ?capabilities, "node connected");
    // Heartbeats: a ping every second; a node silent for the timeout (cut
    // off, stopped, its host frozen) counts as gone.
    let silence = engine.config().node_timeout;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            message = stream.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {
                        heard = tokio::time::Instant::now();
                        continue;
                    }
                };
                heard = tokio::time::Instant::now();
                match serde_json::from_str::<FromNode>(&text) {
                    Ok(FromNode::Done { key, status, body, log }) => {
                        if let Some(tx) = link.pending.lock().unwrap().remove(&key) {
                            let result = CallResult::Done { status, body: body.into_bytes() };
                            let _ = tx.send(Answer { result, log });
                        }
                    }
                    Ok(FromNode::Capabilities { capabilities }) => {
                        engine.nodes().set_capabilities(&name, capabilities);
                    }
                    Ok(FromNode::Hello { .. }) => {}
                    Err(e) => tracing::warn!(node = %name, error = %e, "ignoring a message the server does not understand"),
                }
            }
            Some(message) = outbox.recv() => {
                if send(&mut sink, &message).await.is_err() {
                    break;
                }
            }
            _ = heartbeat.tick() => {
                if heard.elapsed() > silence {
                    tracing::warn!(node = %name, silent_ms = heard.elapsed().as_millis() as u64, "node stopped answering; dropping its connection");
                    break;
                }
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(attached);
    let pending: Vec<_> = link.pending.lock().unwrap().drain().collect();
    tracing::warn!(node = %name, in_flight = pending.len(), "node disconnected");
    for (_, tx) in pending {
        let _ = tx.send(gone(&name));
    }
}

async fn send(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    message: &ToNode,
) -> Result<(), axum::Error> {
    let text = serde_json::to_string(message).expect("messages serialize");
    sink.send(Message::Text(text.into())).await
}

/// Closes the connection saying why (a close frame's reason is at most 123
/// bytes).
async fn refuse(sink: &mut futures_util::stream::SplitSink<WebSocket, Message>, why: &str) {
    tracing::warn!("refused a node: {why}");
    let mut reason = why.to_owned();
    while reason.len() > 120 {
        reason.pop();
    }
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::POLICY,
            reason: reason.into(),
        })))
        .await;
}
