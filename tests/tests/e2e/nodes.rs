//! Remote nodes: real `troupe node` processes connect to a real server over
//! loopback, run the steps placed on them, fetch bundles by hash on first
//! need and verify them with their own keys.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Db, Env, Server, both_dbs, bundles, scratch_dir, strings, troupe_bin};

/// A running `troupe node`, killed when dropped.
pub(crate) struct Node {
    pub(crate) child: Child,
    log: PathBuf,
    pub(crate) data: PathBuf,
}

impl Node {
    pub(crate) fn start(
        server: &Server,
        token_file: &std::path::Path,
        name: &str,
        extra: &[&str],
    ) -> Node {
        Node::start_in(
            server,
            Some(token_file),
            name,
            extra,
            scratch_dir(&format!("node-{name}")),
        )
    }

    /// With `token_file: None`, the node has no join token: it waits for an
    /// admin's accept unless it joined before (`data` holds its key).
    pub(crate) fn start_in(
        server: &Server,
        token_file: Option<&std::path::Path>,
        name: &str,
        extra: &[&str],
        data: PathBuf,
    ) -> Node {
        Node::start_with_env(&server.url, token_file, name, extra, data, &[])
    }

    /// [`Node::start_in`] with the server at `url` (a proxy in front of
    /// it) and environment variables (failure points, markers).
    pub(crate) fn start_with_env(
        url: &str,
        token_file: Option<&std::path::Path>,
        name: &str,
        extra: &[&str],
        data: PathBuf,
        envs: &[(&str, &str)],
    ) -> Node {
        let log = data.with_extension("log");
        let trust = bundles().public_key.clone();
        let mut args = vec![
            "node",
            "--server",
            url,
            "--name",
            name,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        if let Some(token) = token_file {
            args.extend(["--token-file", token.to_str().unwrap()]);
        }
        if !extra.contains(&"--trust") {
            args.extend(["--trust", &trust]);
        }
        args.extend(extra);
        let child = Command::new(troupe_bin())
            .args(&args)
            .env("RUST_LOG", "info,node=debug")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting troupe node");
        Node { child, log, data }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The signed archives in its cache.
    pub(crate) fn cached(&self) -> Vec<String> {
        std::fs::read_dir(self.data.join("bundles"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".bundle"))
            .collect()
    }

    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A token with the join scope that admits many nodes, in a file.
pub(crate) async fn join_token(server: &Server, env: &Env) -> PathBuf {
    let body = json!({ "name": "nodes", "scopes": ["join"], "join": { "max_uses": 1000 } });
    let (status, t) = server.post("/v1/tokens", &body).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{t}");
    let token = t["token"].as_str().unwrap().to_owned();
    let path = env.dir.join("join.token");
    std::fs::write(&path, token).unwrap();
    path
}

/// A node named `name` with `hypervisor=kvm`, once the server lists it
/// connected.
pub(crate) async fn kvm_node(server: &Server, token: &std::path::Path, name: &str) -> Node {
    let node = Node::start(server, token, name, &["--capability", "hypervisor=kvm"]);
    connected(server, &[name], &[&node]).await;
    node
}

/// Waits until the server lists these nodes connected (at most 30 s).
pub(crate) async fn connected(server: &Server, names: &[&str], nodes: &[&Node]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, list) = server.get("/v1/nodes").await;
        assert_eq!(status, 200, "{list}");
        let listed: Vec<&str> = list["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["connected"] == true)
            .filter_map(|n| n["name"].as_str())
            .collect();
        if names.iter().all(|n| listed.contains(n)) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "nodes {names:?} did not connect: {list}\n{}",
            nodes
                .iter()
                .map(|n| n.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn steps_run_on_the_node_that_has_what_they_need(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let hv17 = Node::start(
        &server,
        &token,
        "hv-17",
        &["--capability", "hypervisor=kvm"],
    );
    let hv18 = Node::start(
        &server,
        &token,
        "hv-18",
        &["--capability", "hypervisor=kvm"],
    );
    let gpu = Node::start(&server, &token, "gpu-1", &["--capability", "gpu=a100"]);
    let list = connected(&server, &["hv-17", "hv-18", "gpu-1"], &[&hv17, &hv18, &gpu]).await;
    let hv = list["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "hv-17")
        .unwrap();
    assert_eq!(hv["capabilities"]["hypervisor"], "kvm", "{list}");
    assert_eq!(hv["capabilities"]["node"], "hv-17", "built in: {list}");
    assert_eq!(hv["capabilities"]["os"], std::env::consts::OS);
    assert!(hv18.cached().is_empty() && hv17.cached().is_empty());

    // The step that names its node runs there, the one before it here.
    let id = server
        .submit("placed", "vps-123", json!({ "hypervisor": "hv-17" }))
        .await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", hv17.log());
    assert!(done["steps"][0]["node"].is_null(), "{done}");
    assert_eq!(done["steps"][1]["node"], "hv-17", "{done}");
    let shown = server.cli(&["status", &id.to_string()]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("on hv-17"),
        "the CLI shows where it ran: {shown}"
    );
    // Pulled on demand, by the node that needed it only.
    assert_eq!(hv17.cached().len(), 1, "{:?}", hv17.cached());
    assert!(hv18.cached().is_empty(), "{:?}", hv18.cached());
    let pool = env.sql().await;
    let node: Option<String> =
        sqlx::query_scalar("SELECT node FROM action_steps WHERE action_id = ? AND seq = 1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(node.as_deref(), Some("hv-17"));

    // Presence: any node with a gpu; never one without.
    let id = server.submit("placed_gpu", "vps-1", json!({})).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"][0]["node"], "gpu-1", "{done}");

    // A node no step names gets nothing; one that is named but absent waits.
    let id = server
        .submit("placed", "vps-9", json!({ "hypervisor": "hv-99" }))
        .await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["steps"][1]["error"]
            .as_str()
            .unwrap()
            .starts_with("no node with hypervisor=kvm, node=hv-99"),
        "{done}"
    );

    let out = server.cli(&["nodes", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hv-17") && text.contains("hypervisor=kvm"),
        "{text}"
    );
    // A header row, and each column starts under its name.
    let header = text.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("CAPABILITIES"),
        "{text}"
    );
    let row = text.lines().find(|l| l.starts_with("hv-17 ")).unwrap();
    let state = header.find("STATE").expect("a STATE column");
    assert!(row[state..].starts_with("connected"), "{text}");
    let caps = header.find("CAPABILITIES").unwrap();
    assert!(row[caps..].contains("hypervisor=kvm"), "{text}");
    assert!(row.contains(" ago "), "a relative time: {text}");
    // Wide: absolute times, the key's fingerprint, who let it in.
    let out = server.cli(&["nodes", "list", "--output", "wide"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap();
    for column in ["CONNECTED", "FINGERPRINT", "ACCEPTED BY"] {
        assert!(header.contains(column), "{text}");
    }
    let row = text.lines().find(|l| l.starts_with("hv-17 ")).unwrap();
    assert!(row.contains("SHA256:") && row.contains('Z'), "{text}");
}

async fn steps_that_need_one_bundle_at_once_make_one_download(db: Db) {
    let env = Env::new(db).await;
    // The server takes 2 s over the bundle's bytes, so the four calls reach
    // the node while its first download is still under way.
    let server = env.serve_with_env(&[], &[("FAILPOINTS", "engine.bundle_content=return(2000)")]);
    let token = join_token(&server, &env).await;
    let node = kvm_node(&server, &token, "hv-17").await;
    // Submitted together: the four calls reach the node before its bundle does.
    let submit = |i: u32| {
        let server = &server;
        async move {
            server
                .submit("node_sleep", &format!("vps-{i}"), json!({ "ms": 200 }))
                .await
        }
    };
    let (a, b, c, d) = tokio::join!(submit(0), submit(1), submit(2), submit(3));
    let ids = [a, b, c, d];
    let mut steps = Vec::new();
    for id in ids {
        let a = server.finished(id).await;
        assert_eq!(a["status"], "succeeded", "{a}");
        steps.push(a["steps"][0].clone());
    }
    // All four were sent before any ended: they overlapped the download.
    let first_end = strings(&json!(steps), "finished_at")
        .into_iter()
        .min()
        .unwrap()
        .to_owned();
    for started in strings(&json!(steps), "started_at") {
        assert!(
            started < first_end.as_str(),
            "not in flight together: {steps:?}"
        );
    }
    let (_, bundles) = server.get("/v1/bundles").await;
    let size = bundles["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "testkit")
        .unwrap()["size"]
        .as_u64()
        .unwrap();
    let (_, list) = server.get("/v1/nodes").await;
    assert_eq!(
        list["nodes"][0]["pulled_bytes"], size,
        "one download: {list}"
    );
    assert_eq!(node.cached().len(), 1);
}

async fn a_corrupted_node_cache_is_found_on_restart(db: Db) {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let data = scratch_dir("node-hv-17-cache");
    let caps = ["--capability", "hypervisor=kvm"];
    let mut node = Node::start_in(&server, Some(&token), "hv-17", &caps, data.clone());
    connected(&server, &["hv-17"], &[&node]).await;
    warm(&server).await;
    node.kill9();
    let (_, list) = server.get("/v1/nodes").await;
    let first_pull = list["nodes"][0]["pulled_bytes"].as_u64().unwrap();

    // Someone changes the cached archive while the node is down.
    let archive = std::fs::read_dir(data.join("bundles"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "bundle"))
        .expect("the signed archive is cached");
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&archive).unwrap();
    let n = bytes.len() / 2;
    bytes[n] ^= 0xff;
    std::fs::write(&archive, bytes).unwrap();

    let again = Node::start_in(&server, None, "hv-17", &caps, data);
    connected(&server, &["hv-17"], &[&again]).await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 1 }))
        .await;
    assert_eq!(
        server.finished(id).await["status"],
        "succeeded",
        "{}",
        again.log()
    );
    assert!(
        again
            .log()
            .contains("the cached copy does not verify; fetching it again"),
        "{}",
        again.log()
    );
    let (_, list) = server.get("/v1/nodes").await;
    assert_eq!(
        list["nodes"][0]["pulled_bytes"].as_u64().unwrap(),
        2 * first_pull,
        "fetched again, once: {list}"
    );
    drop(node);
}

async fn a_node_refuses_a_bundle_signed_by_a_key_it_does_not_trust(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let other = signing::SecretKey::from_seed([9; 32]).public().to_string();
    let node = Node::start(
        &server,
        &token,
        "hv-17",
        &["--capability", "hypervisor=kvm", "--trust", &other],
    );
    connected(&server, &["hv-17"], &[&node]).await;
    let id = server
        .submit("placed", "vps-123", json!({ "hypervisor": "hv-17" }))
        .await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["steps"][1]["error"].as_str().unwrap();
    assert!(
        error.contains("refused on this node") && error.contains("which this node does not trust"),
        "{error}"
    );
    assert!(
        node.cached().is_empty(),
        "nothing is kept: {:?}",
        node.cached()
    );
}

async fn a_node_without_a_join_token_is_refused(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let read = server.token_with("reader", &["read"], None).await;
    let path = env.dir.join("read.token");
    std::fs::write(&path, read).unwrap();
    let mut node = Node::start(&server, &path, "hv-17", &["--capability", "hypervisor=kvm"]);
    let status = wait_exit(&mut node.child, Duration::from_secs(30));
    assert!(!status.success(), "it gives up: {}", node.log());
    assert!(node.log().contains("missing_scope_join"), "{}", node.log());
    let (_, list) = server.get("/v1/nodes").await;
    assert_eq!(list["nodes"], json!([]), "{list}");

    // A join token cannot read anything else.
    let join = std::fs::read_to_string(join_token(&server, &env).await).unwrap();
    let (status, body) = server
        .request_as(Some(&join), reqwest::Method::GET, "/v1/actions", None)
        .await;
    assert_eq!(status, 403, "{body}");
}

async fn cancel_and_loss_reach_steps_on_nodes(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--node-grace", "3s"]);
    let token = join_token(&server, &env).await;
    let mut node = Node::start(
        &server,
        &token,
        "hv-17",
        &["--capability", "hypervisor=kvm"],
    );
    connected(&server, &["hv-17"], &[&node]).await;

    // Cancel reaches the step on the node, which stops.
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 30000 }))
        .await;
    running_on_node(&server, id).await;
    let started = Instant::now();
    let (status, body) = server
        .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = server.finished(id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // A node that dies mid-step and does not come back within the grace
    // fails its (not idempotent) step, naming it.
    let id = server
        .submit("node_sleep", "vps-2", json!({ "ms": 30000 }))
        .await;
    running_on_node(&server, id).await;
    node.kill9();
    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("node hv-17 went away while the step ran and did not come back within 3 s"),
        "{error}"
    );
}

async fn an_idempotent_step_of_a_lost_node_runs_again_elsewhere(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let mut nodes = [
        Node::start(&server, &token, "hv-1", &["--capability", "hypervisor=kvm"]),
        Node::start(&server, &token, "hv-2", &["--capability", "hypervisor=kvm"]),
    ];
    connected(&server, &["hv-1", "hv-2"], &[&nodes[0], &nodes[1]]).await;
    let id = server
        .submit("node_sleep_again", "vps-1", json!({ "ms": 3000 }))
        .await;
    let running = running_on_node(&server, id).await;
    let first = running["steps"][0]["node"].as_str().unwrap().to_owned();
    let index = if first == "hv-1" { 0 } else { 1 };
    nodes[index].kill9();
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"][0]["attempt"], 2, "{done}");
    assert_ne!(
        done["steps"][0]["node"],
        first.as_str(),
        "retried on the other node: {done}"
    );
    let pool = env.sql().await;
    let (node, error): (Option<String>, String) = sqlx::query_as(
        "SELECT node, error FROM action_step_attempts WHERE action_id = ? AND attempt = 1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(node.as_deref(), Some(first.as_str()));
    assert!(
        error.contains("it is idempotent, so it may run again"),
        "{error}"
    );
}

async fn a_restarted_node_fails_the_steps_it_lost_at_once(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let data = scratch_dir("node-hv-17-lost");
    let mut node = Node::start_in(
        &server,
        Some(&token),
        "hv-17",
        &["--capability", "hypervisor=kvm"],
        data.clone(),
    );
    connected(&server, &["hv-17"], &[&node]).await;
    let id = server
        .submit("node_sleep", "vps-2", json!({ "ms": 30000 }))
        .await;
    running_on_node(&server, id).await;
    node.kill9();
    // The same node (same key, same data), restarted: it no longer has the call.
    let keep = std::mem::ManuallyDrop::new(node);
    let again = Node::start_in(
        &server,
        None,
        "hv-17",
        &["--capability", "hypervisor=kvm"],
        data,
    );
    let started = Instant::now();
    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}\n{}", again.log());
    let error = done["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("came back without it (the node restarted)"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not the 60 s grace: {:?}",
        started.elapsed()
    );
    drop(again);
    let _ = std::fs::remove_file(&keep.log);
}

async fn a_step_on_a_node_survives_a_server_restart(db: Db) {
    let env = Env::new(db).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = env.serve_with(&["--listen", &listen]);
    let token = join_token(&server, &env).await;
    let node = kvm_node(&server, &token, "hv-17").await;
    warm(&server).await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 3000 }))
        .await;
    running_on_node(&server, id).await;
    // Running there, not only recorded so: the node has the call (its
    // second, after the warm-up's).
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.log().matches("call received").count() < 2 {
        assert!(Instant::now() < deadline, "{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill9();

    // The node keeps running it, reconnects, and reports; the action goes
    // on, and the step (not idempotent) ran once.
    let server = env.serve_with(&["--listen", &listen]);
    let done = server.finished(id).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}\n{}",
        node.log(),
        server.log()
    );
    assert_eq!(done["steps"][0]["attempt"], 1, "{done}");
    assert_eq!(done["steps"][0]["node"], "hv-17");
    assert_eq!(done["steps"][0]["output"]["slept_ms"], 3000, "{done}");
    let pool = env.sql().await;
    let retried: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM action_step_attempts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(retried, 0);
}

/// Waits until the action's first step runs (on a node).
pub(crate) async fn running_on_node(server: &Server, id: i64) -> Value {
    server
        .until(id, "running on a node", |a| {
            a["steps"][0]["status"] == "running"
        })
        .await
}

/// Runs one short step through `server` and checks that it ran on `node`
/// (named `name`).
pub(crate) async fn runs_there(server: &Server, node: &Node, name: &str) {
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 1 }))
        .await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log());
    assert_eq!(done["steps"][0]["node"], name, "{done}");
}

/// Runs one short step on the node, so it holds the bundle before a test
/// interrupts a step there (rather than its download).
pub(crate) async fn warm(server: &Server) {
    let id = server
        .submit("node_sleep", "warm-up", json!({ "ms": 1 }))
        .await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn a_silent_node_is_detected_and_comes_back(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--node-timeout", "3s"]);
    let token = join_token(&server, &env).await;
    let node = kvm_node(&server, &token, "hv-17").await;
    warm(&server).await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 4000 }))
        .await;
    running_on_node(&server, id).await;

    // Frozen: its heartbeats stop, and within the timeout it is dropped.
    signal(&node, "STOP");
    let frozen = Instant::now();
    let deadline = frozen + Duration::from_secs(20);
    loop {
        let (_, list) = server.get("/v1/nodes").await;
        if list["nodes"][0]["connected"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "never dropped: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Silence counts from the last heartbeat (up to 2 s before the stop):
    // not at once, and (with room for a loaded machine) not much later than
    // the 3 s timeout.
    let took = frozen.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(9),
        "detected after {took:?}"
    );

    // Thawed within the grace: it connects again and reports the step it
    // kept running; the action succeeds, the step ran once.
    signal(&node, "CONT");
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log());
    assert_eq!(done["steps"][0]["attempt"], 1, "{done}");
    connected(&server, &["hv-17"], &[&node]).await;
}

async fn nodes_prove_their_key_and_need_a_join_token_or_an_accept(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let node_of = |list: &Value, name: &str| -> Value {
        list["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };

    // No token: it asks to join and waits; nothing is placed on it.
    let data = scratch_dir("node-hv-17-data");
    let node = Node::start_in(
        &server,
        None,
        "hv-17",
        &["--capability", "hypervisor=kvm"],
        data.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let pending = loop {
        let (_, list) = server.get("/v1/nodes").await;
        let n = node_of(&list, "hv-17");
        if n["status"] == "pending" {
            break n;
        }
        assert!(Instant::now() < deadline, "{list}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(pending["connected"], false, "{pending}");
    assert!(
        pending["public_key"]
            .as_str()
            .unwrap()
            .starts_with("ed25519:")
    );
    let key = std::fs::read_to_string(data.join("node.key")).unwrap();
    assert!(key.starts_with("troupe-secret-key-v1"), "its own key, kept");
    let id = server
        .submit("placed", "vps-1", json!({ "hypervisor": "hv-17" }))
        .await;
    server
        .until(id, "waiting for the node", |a| {
            a["steps"][1]["status"] == "waiting"
        })
        .await;

    // Accepted: it connects on its next try, and the step runs there.
    // An accept names the key to let in, never a name alone; the list
    // shows the key and how.
    let out = server.cli(&["nodes", "accept", "hv-17"]);
    assert!(!out.status.success(), "{out:?}");
    let fingerprint = pending["fingerprint"].as_str().unwrap();
    assert!(fingerprint.starts_with("SHA256:"), "{pending}");
    let out = server.cli(&["nodes", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("troupe nodes accept hv-17 --key {fingerprint}")),
        "{out:?}"
    );
    let out = server.cli(&["nodes", "accept", "hv-17", "--key", fingerprint]);
    assert!(out.status.success(), "{out:?}");
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log());
    assert_eq!(done["steps"][1]["node"], "hv-17");

    // Another key under its name is refused, join token or not.
    let token = join_token(&server, &env).await;
    let mut impostor = Node::start(
        &server,
        &token,
        "hv-17",
        &["--capability", "hypervisor=kvm"],
    );
    let status = wait_exit(&mut impostor.child, Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        impostor.log().contains("belongs to another node key"),
        "{}",
        impostor.log()
    );

    // Removed: disconnected at once and refused from then on; its step in
    // flight fails now, not after the grace.
    let busy = server
        .submit("node_sleep", "vps-2", json!({ "ms": 30000 }))
        .await;
    running_on_node(&server, busy).await;
    let out = server.cli(&["nodes", "remove", "hv-17"]);
    assert!(out.status.success(), "{out:?}");
    let removed_at = Instant::now();
    let done = server.finished(busy).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["steps"][0]["error"]
            .as_str()
            .unwrap()
            .contains("node hv-17 went away while the step ran and was removed"),
        "{done}"
    );
    assert!(
        removed_at.elapsed() < Duration::from_secs(10),
        "{:?}",
        removed_at.elapsed()
    );
    let mut node = node;
    let status = wait_exit(&mut node.child, Duration::from_secs(10));
    assert!(!status.success());
    assert!(node.log().contains("removed"), "{}", node.log());
    let (_, list) = server.get("/v1/nodes").await;
    assert_eq!(node_of(&list, "hv-17")["status"], "removed", "{list}");
    let restarted = Node::start_in(&server, Some(&token), "hv-17", &[], data.clone());
    let mut restarted = restarted;
    let status = wait_exit(&mut restarted.child, Duration::from_secs(30));
    assert!(
        !status.success(),
        "a removed key stays out, even with a join token"
    );

    // Who let whom in, and who removed it, is audited.
    let (_, audit) = server.get("/v1/audit").await;
    let events = strings(&audit["entries"], "event");
    assert!(
        events.contains(&"node.accepted") && events.contains(&"node.removed"),
        "{audit}"
    );
}

pub(crate) fn signal(node: &Node, which: &str) {
    let status = Command::new("kill")
        .args([format!("-{which}"), node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

pub(crate) fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the node did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
}

both_dbs!(
    steps_run_on_the_node_that_has_what_they_need,
    steps_that_need_one_bundle_at_once_make_one_download,
    a_corrupted_node_cache_is_found_on_restart,
    a_node_refuses_a_bundle_signed_by_a_key_it_does_not_trust,
    a_node_without_a_join_token_is_refused,
    cancel_and_loss_reach_steps_on_nodes,
    a_silent_node_is_detected_and_comes_back,
    a_restarted_node_fails_the_steps_it_lost_at_once,
    an_idempotent_step_of_a_lost_node_runs_again_elsewhere,
    a_step_on_a_node_survives_a_server_restart,
    nodes_prove_their_key_and_need_a_join_token_or_an_accept,
);
