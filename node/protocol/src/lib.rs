//! What a troupe server and a remote node say to each other over their one
//! connection: a WebSocket (`GET /v1/nodes/connect`, over the API's TLS),
//! one JSON message per text frame. The node connects out (no inbound port
//! on the node) and proves its identity by signing the server's challenge
//! with its node key (`signing::node`); a name is bound to the first key
//! that used it. A new node joins with an API token with the `join` scope,
//! or waits for an admin to accept it. Many step calls share the
//! connection, each named by its [`CallKey`].
//!
//! ```text
//! server → node   Challenge { nonce, server }
//! node → server   Hello { name, public_key, answer, capabilities, version, protocol, uptime_ms }
//! server → node   Welcome { protocol, session, servers }  or  Refused { retry, reason }
//! node → server   Holding { keys, acked }       (calls it runs or will report; reported lately)
//! server → node   Report                        (asks for a fresh Holding)
//! server → node   Call { key, bundle, function, input, timeout_ms, grace_ms }
//! server → node   Cancel { key }
//! node → server   Done { key, status, body, log }  (kept and sent again until acknowledged)
//! server → node   Ack { key }                   (handed to the call's runner, or stored)
//! node → server   Capabilities { capabilities }  (a probe's result changed)
//! node → server   Bundles { cached, loaded }     (after Welcome, and when its cache changes)
//! ```
//!
//! A node may be given several servers (all sharing one database), or one
//! address of any of them (a load balancer's): `Welcome` lists the other
//! live servers' advertised addresses, and the node keeps one connection
//! to each server (told apart by the id its `Challenge` names, so two
//! addresses of one server make one connection). Each server sends calls
//! on its own connection.
//! A call's `Done` goes back on the connection of the server that sent it,
//! or, while that one is down, on every other connection: a server that
//! has no runner waiting for it stores it (`node_results`) for the server
//! that took the action over, and acknowledges it only then.
//!
//! Both ends send heartbeats as unsolicited pongs: the node every
//! [`HEARTBEAT`], the server every [`SERVER_HEARTBEAT`].
//!
//! A node lacking a call's bundle fetches it by hash
//! (`GET /v1/nodes/bundles/{hash}` and `…/signature`, with the session
//! credential from `Welcome`) and verifies it with its own trusted keys
//! before loading it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped when a message changes incompatibly.
pub const PROTOCOL: u32 = 3;

/// How often a node sends its heartbeat: an unsolicited WebSocket pong
/// (RFC 6455, 5.5.3), which needs no answer. The server drops a node it
/// has heard nothing from for its node timeout.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the server sends its own (also an unsolicited pong); a node
/// that hears nothing from its server for three of these connects again.
pub const SERVER_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// One attempt of one step: the same key on the server and on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CallKey {
    pub action: i64,
    pub seq: u32,
    pub attempt: u32,
}

/// Messages from a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromNode {
    /// The first message: who the node is and what it can do.
    Hello {
        name: String,
        /// The node key, `ed25519:…`.
        public_key: String,
        /// The key's signature of the challenge and the name.
        answer: String,
        capabilities: BTreeMap<String, String>,
        /// The troupe version the node runs.
        version: String,
        protocol: u32,
        /// How long the node's process has run: a call sent before it
        /// started may have been lost with a restart; one sent after it
        /// was not.
        #[serde(default)]
        uptime_ms: u64,
    },
    /// A call's end. `status` is one of `troupe_sdk::ffi::STATUS_*`; `body` is the
    /// output JSON or the error message; `log` what the step logged.
    Done {
        key: CallKey,
        status: i32,
        body: String,
        log: String,
    },
    /// Sent right after `Welcome`, and in answer to `Report`: the calls
    /// the node holds (running, or ended and about to be reported), so the
    /// server can settle at once those it waits for that the node does not
    /// hold (lost with a restart, or never received).
    Holding {
        keys: Vec<CallKey>,
        /// Calls it reported and had acknowledged in the last minutes: they
        /// ran, whatever became of their result.
        #[serde(default)]
        acked: Vec<CallKey>,
    },
    /// The node's capabilities changed.
    Capabilities {
        capabilities: BTreeMap<String, String>,
    },
    /// What the node's bundle cache holds (verified archives, by hash) and
    /// which of them are loaded in a running step host.
    Bundles {
        cached: Vec<CachedBundle>,
        loaded: Vec<String>,
    },
}

/// A verified bundle archive in a node's cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedBundle {
    /// SHA-256, hex.
    pub hash: String,
    /// The archive's size.
    pub bytes: u64,
}

/// Messages to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToNode {
    /// The first message: what the node signs to prove its key, and which
    /// server this is (its id).
    Challenge {
        nonce: String,
        #[serde(default)]
        server: String,
    },
    /// The node is in: calls may follow. `session` is the bearer
    /// credential for its bundle downloads, valid while this connection
    /// lasts; `servers`, the addresses the other live servers sharing the
    /// database advertise (`https://HOST:PORT`, or `HOST:PORT` meaning
    /// this connection's scheme), for the node to connect to each.
    Welcome {
        protocol: u32,
        session: String,
        #[serde(default)]
        servers: Vec<String>,
    },
    /// The node may not take calls; the connection ends. With `retry`, it
    /// may later (it waits for an admin to accept it); without, not with
    /// this key.
    Refused { retry: bool, reason: String },
    /// Run `function` of bundle `bundle` (SHA-256, hex) with `input` (the
    /// step's input JSON, as text). The node enforces `timeout_ms` too, and
    /// after a cancel kills its step host once `grace_ms` have passed.
    Call {
        key: CallKey,
        bundle: String,
        function: String,
        input: String,
        timeout_ms: u64,
        grace_ms: u64,
    },
    /// Stop the call: set its cancel flag.
    Cancel { key: CallKey },
    /// Answer with a fresh `Holding`: the server follows a call another
    /// server sent (it took the action over) and needs to know whether
    /// the node holds it now.
    Report,
    /// The server has the call's `Done` (handed to the runner waiting for
    /// it, or stored for whichever server runs the action): the node may
    /// forget it. Until then the node sends it again on every new
    /// connection.
    Ack { key: CallKey },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json() {
        let key = CallKey {
            action: 7,
            seq: 1,
            attempt: 2,
        };
        let m = ToNode::Cancel { key };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"type":"cancel","key":{"action":7,"seq":1,"attempt":2}}"#
        );
        assert_eq!(serde_json::from_str::<ToNode>(&text).unwrap(), m);
        let hello: FromNode = serde_json::from_str(
            r#"{"type":"hello","name":"hv-1","public_key":"k","answer":"a","capabilities":{"a":"b"},"version":"0.1.0","protocol":1}"#,
        )
        .unwrap();
        assert!(matches!(hello, FromNode::Hello { name, .. } if name == "hv-1"));
    }
}
