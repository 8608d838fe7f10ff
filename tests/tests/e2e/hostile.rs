//! Hostile clients on loopback, without a credential: half-sent requests
//! and idle sockets, anonymous node hellos by the hundred, oversized first
//! messages, a squatted node name. Each is bounded in count and time; each
//! checks what the server wrote, buffered and held open (SECURITY.md).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use node_protocol::{FromNode, PROTOCOL, ToNode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Db, Env, Server, both_dbs, scratch_dir, strings};
use crate::nodes::{Node, connected, join_token};

fn addr(server: &Server) -> String {
    server
        .url
        .strip_prefix("http://")
        .expect("a plain-HTTP test server")
        .to_owned()
}

/// Whether the server closes `socket` (EOF or reset) before `deadline`.
async fn closed_by(socket: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or other answer before the close is fine.
            Ok(Ok(_)) => continue,
        }
    }
}

/// 150 sockets, over a cap of 64: 100 send half a request, 50 send
/// nothing. The server closes each within its header deadline (waves of
/// 64, 2 s each), and `/v1/health` answers meanwhile.
async fn half_sent_requests_and_idle_sockets_are_closed(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--max-connections", "64", "--header-timeout", "2s"]);
    let target = addr(&server);
    let mut sockets = Vec::new();
    for i in 0..150 {
        let mut s = TcpStream::connect(&target).await.unwrap();
        if i % 3 != 0 {
            s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        sockets.push(s);
    }
    // Answered while the hostile sockets are all still open on our side.
    let started = Instant::now();
    let health = tokio::time::timeout(
        Duration::from_secs(20),
        reqwest::get(format!("{}/v1/health", server.url)),
    )
    .await
    .expect("health answers while half-sent requests hold connections")
    .unwrap();
    assert_eq!(health.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(40);
    for (i, s) in sockets.iter_mut().enumerate() {
        assert!(
            closed_by(s, deadline).await,
            "socket {i} is still open 40 s on: the server holds connections that send no request"
        );
    }
}

/// A fresh node key and its hello to `challenge` under `name`.
fn hello(challenge: &str, name: &str, key: &signing::SecretKey) -> Message {
    let hello = FromNode::Hello {
        name: name.to_owned(),
        public_key: key.public().to_string(),
        answer: signing::node::answer(key, challenge, name),
        capabilities: [("hypervisor".to_owned(), "kvm".to_owned())].into(),
        version: "hostile".to_owned(),
        protocol: PROTOCOL,
        uptime_ms: 0,
    };
    Message::Text(serde_json::to_string(&hello).unwrap().into())
}

fn fresh_key() -> signing::SecretKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).unwrap();
    signing::SecretKey::from_seed(seed)
}

type Socket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// An anonymous WebSocket to the node endpoint.
async fn anonymous(server: &Server) -> Socket {
    let url = format!("{}/v1/nodes/connect", server.url.replacen("http", "ws", 1));
    let tcp = TcpStream::connect(addr(server)).await.unwrap();
    let (socket, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    socket
}

/// The next protocol message from the server.
async fn next(socket: &mut Socket) -> Option<ToNode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), socket.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).ok(),
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Says hello under `name` with `key`; what the server answered.
async fn say_hello(server: &Server, name: &str, key: &signing::SecretKey) -> Option<ToNode> {
    let mut socket = anonymous(server).await;
    let Some(ToNode::Challenge { nonce, .. }) = next(&mut socket).await else {
        panic!("no challenge");
    };
    socket.send(hello(&nonce, name, key)).await.unwrap();
    next(&mut socket).await
}

async fn node_rows(env: &Env) -> i64 {
    use sqlx::Row;
    let pool = env.sql().await;
    sqlx::query("SELECT COUNT(*) AS n FROM nodes")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get::<i64, _>("n")
}

/// 200 anonymous hellos under random names: no row written; at most 64
/// wait in memory, the rest are told to use a join token.
async fn anonymous_hellos_write_nothing_and_wait_in_a_bounded_list(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let started = Instant::now();
    let mut refused = 0;
    for i in 0..200 {
        let answer = say_hello(&server, &format!("squat-{i}"), &fresh_key()).await;
        match answer {
            Some(ToNode::Refused {
                retry: true,
                reason,
            }) => {
                assert!(reason.contains("waits for an admin"), "{reason}")
            }
            Some(ToNode::Refused {
                retry: false,
                reason,
            }) => {
                assert!(reason.contains("join token"), "{reason}");
                refused += 1;
            }
            other => panic!("hello {i}: {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "bounded in time"
        );
    }
    assert_eq!(refused, 200 - 64, "all past the 64th refused");
    assert_eq!(node_rows(&env).await, 0, "an anonymous hello writes no row");
    let (_, list) = server.get("/v1/nodes").await;
    let nodes = list["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 64, "{list}");
    assert!(
        nodes.iter().all(|n| n["status"] == "pending"
            && n["fingerprint"].as_str().unwrap().starts_with("SHA256:"))
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Eight anonymous connections each start a 60 MiB first message: the
/// server reads a few KiB of each, then cuts it off; its memory barely
/// moves.
async fn an_oversized_first_message_is_cut_off(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let before = rss_kib(server.pid());
    let big = "x".repeat(60 << 20);
    let mut cut = 0;
    for _ in 0..8 {
        let mut socket = anonymous(&server).await;
        let Some(ToNode::Challenge { .. }) = next(&mut socket).await else {
            panic!("no challenge");
        };
        let sent = tokio::time::timeout(
            Duration::from_secs(30),
            socket.send(Message::Text(big.clone().into())),
        )
        .await
        .expect("the server neither read nor refused 60 MiB within 30 s");
        // The write fails once the server hangs up; if the kernel took it
        // all, the server's close comes next.
        if sent.is_err() || next(&mut socket).await.is_none() {
            cut += 1;
        }
    }
    assert_eq!(cut, 8);
    let after = rss_kib(server.pid());
    assert!(
        after < before + 32 * 1024,
        "the server grew from {before} KiB to {after} KiB on messages it should not have read"
    );
    assert_eq!(node_rows(&env).await, 0);
    assert!(
        server.log().contains("bytes before its hello was accepted")
            || server.log().contains("refused a node")
            || !server.log().contains("node connected"),
        "{}",
        server.log()
    );
}

/// An anonymous peer asks to join as `hv-future` first: the real node,
/// with a join token, still joins under that name, and the squatter's key
/// is gone from the waiting list. An accept by name alone is refused.
async fn a_squatted_name_does_not_keep_the_real_node_out(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let squatter = fresh_key();
    match say_hello(&server, "hv-future", &squatter).await {
        Some(ToNode::Refused { retry: true, .. }) => {}
        other => panic!("{other:?}"),
    }
    let (_, list) = server.get("/v1/nodes").await;
    assert_eq!(strings(&list["nodes"], "status"), ["pending"], "{list}");

    let (status, body) = server
        .post("/v1/nodes/hv-future/accept", &serde_json::json!({}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "key_required", "{body}");

    let token = join_token(&server, &env).await;
    let node = Node::start_in(
        &server,
        Some(&token),
        "hv-future",
        &["--capability", "hypervisor=kvm"],
        scratch_dir("hv-future"),
    );
    let list = connected(&server, &["hv-future"], &[&node]).await;
    let real: Vec<&Value> = list["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["name"] == "hv-future")
        .collect();
    assert_eq!(real.len(), 1, "{list}");
    assert_eq!(real[0]["status"], "accepted");
    assert_ne!(real[0]["public_key"], squatter.public().to_string());

    // The squatter's key comes back: refused, the name is taken.
    match say_hello(&server, "hv-future", &squatter).await {
        Some(ToNode::Refused {
            retry: false,
            reason,
        }) => {
            assert!(reason.contains("belongs to another node key"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // And an admin cannot hand the name to another key without removing
    // the node first.
    let (status, body) = server
        .post(
            "/v1/nodes/hv-future/accept",
            &serde_json::json!({ "key": squatter.public().to_string() }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "node_key_conflict", "{body}");
}

both_dbs!(
    half_sent_requests_and_idle_sockets_are_closed,
    anonymous_hellos_write_nothing_and_wait_in_a_bounded_list,
    an_oversized_first_message_is_cut_off,
    a_squatted_name_does_not_keep_the_real_node_out,
);
