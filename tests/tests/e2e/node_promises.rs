//! What README.md and ARCHITECTURE.md promise about plugin code and nodes,
//! each broken on purpose with real parts: a plugin library that writes
//! down every process that loads it, results cut on their way between a
//! real `troupe node` and a real server (the node's failure points), a
//! bundle download and a server's heartbeats cut by a TCP proxy on
//! loopback, a node frozen with SIGSTOP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{
    Db, Env, Server, both_dbs, bundles, scratch_dir, target_dir, troupe, workspace,
};
use crate::nodes::{Node, connected, join_token, signal};

/// The `loadmark` bundle (`tests/loadmark`), built and signed once per run
/// with the test key: its library's load-time constructor writes down the
/// process that loaded it.
fn loadmark() -> &'static PathBuf {
    static BUNDLE: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let dir = scratch_dir("loadmark");
        let out = dir.join("loadmark.bundle");
        let manifest = workspace().join("tests/loadmark/bundle.toml");
        let library = target_dir().join("libloadmark.so");
        let o = troupe(&[
            "bundle",
            "build",
            manifest.to_str().unwrap(),
            "--library",
            library.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let key = bundles().key.to_str().unwrap();
        let o = troupe(&["bundle", "sign", out.to_str().unwrap(), "--key", key]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    })
}

/// What `loadmark` wrote: one record per process that loaded it.
fn loaders(dir: &Path) -> Vec<Value> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect()
}

/// Plugin code runs in step hosts only, never in the server's process or a
/// node's; and a step host on a node, like one on the server, sees none of
/// its parent's environment beyond `host::HOST_ENV`.
async fn plugin_code_runs_only_in_step_hosts_with_a_clean_environment(db: Db) {
    let env = Env::new(db).await;
    // `loadmark` writes to `$TMPDIR/troupe-loadmark` when that exists.
    let tmp = env.dir.join("tmp");
    let marks = tmp.join("troupe-loadmark");
    std::fs::create_dir_all(&marks).unwrap();
    let tmp = tmp.to_str().unwrap();
    let server = env.serve_with_env(
        &["--bundle", loadmark().to_str().unwrap()],
        &[
            ("TMPDIR", tmp),
            ("LOADMARK_SERVER_SECRET", "server-secret-marker"),
        ],
    );
    // Loaded at start (its exports listed), in a step host of the server.
    let server_pid = server.pid();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !loaders(&marks).iter().any(|r| r["ppid"] == server_pid) {
        assert!(Instant::now() < deadline, "never loaded: {}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let token = join_token(&server, &env).await;
    let node = Node::start_with_env(
        &server.url,
        Some(&token),
        "hv-1",
        &["--capability", "hypervisor=kvm"],
        scratch_dir("node-hv-1-loadmark"),
        &[
            ("TMPDIR", tmp),
            ("TROUPE_NODE_SECRET", "node-secret-marker"),
            ("TROUPE_TOKEN", "node-secret-marker-token"),
        ],
    );
    connected(&server, &["hv-1"], &[&node]).await;
    let node_pid = node.child.id();

    let id = server.submit("whoami", "vps-1", json!({})).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log());
    let here = &done["steps"][0]["output"];
    let there = &done["steps"][1]["output"];
    assert_eq!(done["steps"][1]["node"], "hv-1", "{done}");
    // Each call ran in a child of the server or of the node, not in it.
    assert_eq!(here["ppid"], server_pid, "{here}");
    assert_eq!(there["ppid"], node_pid, "{there}");
    for (output, parent) in [(here, server_pid), (there, node_pid)] {
        assert_ne!(output["pid"], parent, "{output}");
    }

    // Every process that ever loaded the library is a step host of one of
    // them; both loaded it; the calls ran in processes that loaded it.
    let records = loaders(&marks);
    for r in &records {
        let pid = r["pid"].as_u64().unwrap() as u32;
        let ppid = r["ppid"].as_u64().unwrap() as u32;
        assert!(
            pid != server_pid && pid != node_pid,
            "plugin code loaded in the server or node process: {r}"
        );
        assert!(
            ppid == server_pid || ppid == node_pid,
            "loaded by a process that is no step host of the server ({server_pid}) or the node ({node_pid}): {r}"
        );
    }
    for parent in [server_pid, node_pid] {
        assert!(
            records.iter().any(|r| r["ppid"] == parent),
            "{parent} started no step host: {records:?}"
        );
    }
    for output in [here, there] {
        assert!(
            records.iter().any(|r| r["pid"] == output["pid"]),
            "{output} not among {records:?}"
        );
    }

    // What each step host saw: the allow-list at most, and no secret of
    // the server's or the node's.
    let mut seen: Vec<&Value> = records.iter().map(|r| &r["env"]).collect();
    seen.extend([&here["env"], &there["env"]]);
    for env in seen {
        let env: BTreeMap<String, String> = serde_json::from_value(env.clone()).unwrap();
        for (name, value) in &env {
            assert!(
                engine::host::HOST_ENV.contains(&name.as_str()) || name == "STEP_HOST_MARK",
                "a step host inherited {name}: {env:?}"
            );
            assert!(!value.contains("secret-marker"), "{env:?}");
        }
        assert_eq!(env.get("TMPDIR").map(String::as_str), Some(tmp));
    }
}

/// A node's `troupe node` log lines that say `what` about any call.
fn count(node: &Node, what: &str) -> usize {
    node.log().lines().filter(|l| l.contains(what)).count()
}

/// Waits until the node's log says `what` `n` times (at most 30 s).
async fn logged(node: &Node, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(node, what) < n {
        assert!(
            Instant::now() < deadline,
            "{what:?} not {n} times:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The action's step ran once, on hv-17, and its one result is recorded.
async fn ran_once(env: &Env, server: &Server, node: &Node, id: i64) {
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log());
    assert_eq!(done["steps"][0]["attempt"], 1, "{done}");
    assert_eq!(done["steps"][0]["node"], "hv-17", "{done}");
    assert_eq!(done["steps"][0]["output"]["slept_ms"], 200, "{done}");
    assert_eq!(count(node, "call received"), 1, "{}", node.log());
    let pool = env.sql().await;
    let retried: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM action_step_attempts WHERE action_id = ?")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(retried, 0, "no attempt was recorded lost");
}

/// A node with the failure points `failpoints` armed.
fn failing_node(server: &Server, token: &Path, failpoints: &str) -> Node {
    Node::start_with_env(
        &server.url,
        Some(token),
        "hv-17",
        &["--capability", "hypervisor=kvm"],
        scratch_dir("node-hv-17-results"),
        &[("FAILPOINTS", failpoints)],
    )
}

/// The connection ends after the node counted a result sent but before
/// the server read it: the node sends it again on its next connection and
/// the server records it, once (the step is not idempotent, so the server
/// waits for it rather than running it again).
async fn a_result_lost_on_the_way_is_sent_again_and_recorded_once(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let node = failing_node(&server, &token, "node.lose_result=1*return");
    connected(&server, &["hv-17"], &[&node]).await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 200 }))
        .await;
    ran_once(&env, &server, &node, id).await;
    assert_eq!(
        count(&node, "a result was lost on the way"),
        1,
        "{}",
        node.log()
    );
    assert_eq!(count(&node, "result sent"), 1, "{}", node.log());
    logged(&node, "result acknowledged", 1).await;
}

/// The connection ends after the server read a result and before its
/// acknowledgement reached the node: the node sends it again, the server
/// acknowledges the repeat without recording anything twice, and the node
/// forgets it.
async fn a_result_whose_acknowledgement_was_cut_is_recorded_once(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let node = failing_node(&server, &token, "node.cut_after_results=1*return");
    connected(&server, &["hv-17"], &[&node]).await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 200 }))
        .await;
    ran_once(&env, &server, &node, id).await;
    assert_eq!(
        count(&node, "the connection was cut after sending results"),
        1,
        "{}",
        node.log()
    );
    // Sent twice (the second time on the new connection), acknowledged then.
    logged(&node, "result acknowledged", 1).await;
    assert_eq!(count(&node, "result sent"), 2, "{}", node.log());
}

/// The server acknowledged a result and stopped before storing it: the
/// node says so when it comes back, and the step fails saying that it ran
/// and its result was lost, without running it again.
async fn a_result_acknowledged_but_lost_with_its_server_fails_saying_so(db: Db) {
    let env = Env::new(db).await;
    let listen = format!("127.0.0.1:{}", crate::nodes::free_port());
    // The commit that would store the step's success waits, so the server
    // can be killed after its acknowledgement and before that commit.
    let server = env.serve_with_env(
        &["--listen", &listen],
        &[("FAILPOINTS", "store.refuse_step_success=1*sleep(60000)")],
    );
    let token = join_token(&server, &env).await;
    let node = crate::nodes::kvm_node(&server, &token, "hv-17").await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 200 }))
        .await;
    // (The server answers nothing while that commit waits.)
    logged(&node, "result acknowledged", 1).await;
    server.kill9();
    let pool = env.sql().await;
    let status: String =
        sqlx::query_scalar("SELECT status FROM action_steps WHERE action_id = ? AND seq = 0")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "running", "its success was never stored");

    let server = env.serve_with(&["--listen", &listen, "--node-grace", "30s"]);
    let started = Instant::now();
    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}\n{}", node.log());
    let error = done["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains(
            "node hv-17 went away while the step ran and ran it, but its result was lost with a server that stopped before storing it"
        ),
        "{error}\n{}",
        server.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "settled when the node came back, not after the grace: {:?}",
        started.elapsed()
    );
    assert_eq!(count(&node, "call received"), 1, "{}", node.log());
}

/// A TCP proxy on loopback in front of a server, to cut a node's bundle
/// download midway or keep the server's bytes from reaching it, as a
/// network would.
struct Proxy {
    url: String,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    /// Cut the next bundle download after this many bytes of its answer
    /// (0: none armed).
    cut_download_after: AtomicUsize,
    /// Downloads cut.
    cuts: AtomicUsize,
    /// Connections are numbered; those below this carry nothing more from
    /// the server.
    muted_below: AtomicU64,
    next: AtomicU64,
}

impl Proxy {
    async fn start(server: &Server) -> Proxy {
        let upstream = server.url.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(ProxyState::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let id = shared.next.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(relay(client, upstream, id, shared.clone()));
            }
        });
        Proxy { url, state, task }
    }

    /// From now on, connections open now get nothing more from the server;
    /// new ones work.
    fn mute_open_connections(&self) {
        let next = self.state.next.load(Ordering::SeqCst);
        self.state.muted_below.store(next, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Carries one connection both ways until either side ends it, or the
/// proxy cuts it.
async fn relay(
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    id: u64,
    state: Arc<ProxyState>,
) {
    let (mut client_r, mut client_w) = client.into_split();
    let (mut up_r, mut up_w) = upstream.into_split();
    // Set when this connection asked for a bundle's bytes while a cut is armed.
    let download = AtomicBool::new(false);
    let requests = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = client_r.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            tail.extend_from_slice(&buf[..n]);
            if state.cut_download_after.load(Ordering::SeqCst) > 0 && asks_for_bundle(&tail) {
                download.store(true, Ordering::SeqCst);
            }
            let keep = tail.len().saturating_sub(256);
            tail.drain(..keep);
            if up_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let answers = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut carried = 0;
        loop {
            let n = up_r.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if id < state.muted_below.load(Ordering::SeqCst) {
                // Muted: nothing more reaches the node on this connection.
                return std::future::pending().await;
            }
            let mut n = n;
            if download.load(Ordering::SeqCst) {
                let limit = state.cut_download_after.load(Ordering::SeqCst);
                if limit > 0 && carried + n >= limit {
                    n = limit - carried;
                    let _ = client_w.write_all(&buf[..n]).await;
                    state.cut_download_after.store(0, Ordering::SeqCst);
                    state.cuts.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                carried += n;
            }
            if client_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever ends first ends the connection both ways.
    tokio::select! {
        _ = requests => {}
        _ = answers => {}
    }
}

/// Whether `bytes` hold a request for a bundle's bytes (not its signature).
fn asks_for_bundle(bytes: &[u8]) -> bool {
    let pattern = b"GET /v1/nodes/bundles/";
    bytes
        .windows(pattern.len())
        .enumerate()
        .any(|(i, w)| w == pattern && bytes.get(i + pattern.len() + 64) == Some(&b' '))
}

/// A bundle download cut midway is tried again, and the node ends with
/// the whole archive, verified.
async fn a_bundle_download_cut_midway_is_tried_again(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let (_, listed) = server.get("/v1/bundles").await;
    let testkit = listed["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "testkit")
        .unwrap()
        .clone();
    let size = testkit["size"].as_u64().unwrap() as usize;
    let proxy = Proxy::start(&server).await;
    // Cut well inside the archive: past the answer's head, far from its end.
    assert!(size > 64 * 1024, "{testkit}");
    proxy
        .state
        .cut_download_after
        .store(size / 2, Ordering::SeqCst);
    let node = Node::start_with_env(
        &proxy.url,
        Some(&token),
        "hv-17",
        &["--capability", "hypervisor=kvm"],
        scratch_dir("node-hv-17-cut"),
        &[],
    );
    connected(&server, &["hv-17"], &[&node]).await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 1 }))
        .await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log());
    assert_eq!(proxy.state.cuts.load(Ordering::SeqCst), 1, "cut once");
    assert_eq!(
        count(&node, "bundle download cut short; trying again"),
        1,
        "{}",
        node.log()
    );
    // The whole archive, kept under its hash, which it has.
    let cached = node.cached();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let bytes = std::fs::read(node.data.join("bundles").join(&cached[0])).unwrap();
    assert_eq!(bytes.len(), size);
    let hash = signing::BundleHash::of(&bytes).to_string();
    assert_eq!(cached[0], format!("{hash}.bundle"));
    assert_eq!(testkit["hash"], hash, "{testkit}");
}

/// A node that hears nothing from its server for 15 s (its heartbeats are
/// kept from it) connects again, and is placed on as before.
async fn a_node_connects_again_after_15_s_of_server_silence(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let proxy = Proxy::start(&server).await;
    let node = Node::start_with_env(
        &proxy.url,
        Some(&token),
        "hv-17",
        &["--capability", "hypervisor=kvm"],
        scratch_dir("node-hv-17-silence"),
        &[],
    );
    let before = connected(&server, &["hv-17"], &[&node]).await;
    let first_connected = before["nodes"][0]["connected_at"].clone();
    let connections = count(&node, "connected server=");

    proxy.mute_open_connections();
    let muted = Instant::now();
    let silence = "the server sent nothing for 15 s";
    let deadline = muted + Duration::from_secs(40);
    while count(&node, silence) == 0 {
        assert!(Instant::now() < deadline, "{}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Silence is counted from the last thing heard (up to one server
    // heartbeat before the mute), checked every node heartbeat.
    let took = muted.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(30),
        "noticed after {took:?}"
    );
    // On a new connection, which the server lists, and steps reach it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = server.get("/v1/nodes").await;
        let node_now = &list["nodes"][0];
        if node_now["connected"] == true
            && node_now["connected_at"] != first_connected
            && count(&node, "connected server=") > connections
        {
            break;
        }
        assert!(Instant::now() < deadline, "{list}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::nodes::runs_there(&server, &node, "hv-17").await;
}

/// A node frozen for 15 s is dropped within its timeout; meanwhile a step
/// another node can run goes there, and one only it can run waits for it;
/// thawed, it connects again and runs it.
async fn a_node_frozen_for_15_s_is_dropped_and_comes_back(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    // Only hv-1 has a gpu.
    let hv1 = Node::start(
        &server,
        &token,
        "hv-1",
        &["--capability", "hypervisor=kvm", "--capability", "gpu=a100"],
    );
    let hv2 = crate::nodes::kvm_node(&server, &token, "hv-2").await;
    connected(&server, &["hv-1", "hv-2"], &[&hv1, &hv2]).await;

    signal(&hv1, "STOP");
    let frozen = Instant::now();
    let deadline = frozen + Duration::from_secs(20);
    loop {
        let (_, list) = server.get("/v1/nodes").await;
        let hv1_now = list["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "hv-1")
            .cloned()
            .unwrap_or(Value::Null);
        if hv1_now["connected"] != true {
            break;
        }
        assert!(Instant::now() < deadline, "never dropped: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The default node timeout (4 s) from its last heartbeat (up to 2 s
    // before the stop), with room for a loaded machine.
    let took = frozen.elapsed();
    assert!(took < Duration::from_secs(12), "dropped after {took:?}");

    // Meanwhile: any kvm node will do, so hv-2 runs it; a gpu step waits
    // (up to its placement timeout, 2 minutes) for the one node with a gpu.
    let anywhere = server
        .submit("node_sleep", "vps-1", json!({ "ms": 1 }))
        .await;
    let gpu = server.submit("placed_gpu", "vps-2", json!({})).await;
    let done = server.finished(anywhere).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"][0]["node"], "hv-2", "{done}");
    server
        .until(gpu, "waiting for a gpu node", |a| {
            a["steps"][0]["status"] == "waiting"
        })
        .await;
    // Frozen for 15 s in all (the scenario, not a wait for an effect).
    if let Some(rest) = Duration::from_secs(15).checked_sub(frozen.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let (_, action) = server.get(&format!("/v1/actions/{gpu}")).await;
    assert_eq!(action["steps"][0]["status"], "waiting", "{action}");

    signal(&hv1, "CONT");
    let done = server.finished(gpu).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", hv1.log());
    assert_eq!(done["steps"][0]["node"], "hv-1", "{done}");
    connected(&server, &["hv-1", "hv-2"], &[&hv1, &hv2]).await;
}

/// A restarted server whose runner reaches a step that ran on a node only
/// after the node has come back and reported it (the `nodes.reattach`
/// failure point holds the runner back) still gets the result: a report
/// that arrives before anyone waits for it is kept.
async fn a_result_reported_before_the_restarted_server_follows_its_step_counts(db: Db) {
    let env = Env::new(db).await;
    let listen = format!("127.0.0.1:{}", crate::nodes::free_port());
    let server = env.serve_with(&["--listen", &listen]);
    let token = join_token(&server, &env).await;
    let node = crate::nodes::kvm_node(&server, &token, "hv-17").await;
    crate::nodes::warm(&server).await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 200 }))
        .await;
    crate::nodes::running_on_node(&server, id).await;
    logged(&node, "call received", 2).await;
    server.kill9();
    // Ended while no server was up: reported (and acknowledged) on the
    // next connection, before the runner follows it.
    let server = env.serve_with_env(
        &["--listen", &listen, "--node-grace", "30s"],
        &[("FAILPOINTS", "nodes.reattach=return(8000)")],
    );
    logged(&node, "result acknowledged", 2).await;
    let started = Instant::now();
    let done = server.finished(id).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}\n{}",
        node.log(),
        server.log()
    );
    assert_eq!(done["steps"][0]["attempt"], 1, "{done}");
    assert_eq!(done["steps"][0]["output"]["slept_ms"], 200, "{done}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "not after the grace: {:?}",
        started.elapsed()
    );
    assert_eq!(count(&node, "call received"), 2, "{}", node.log());
}

/// As above, with the step still running when the node reports what it
/// holds, and acknowledged but never stored by the server that stopped:
/// the runner that follows it late is told at once.
async fn a_nodes_report_before_the_restarted_server_follows_its_step_counts(db: Db) {
    let env = Env::new(db).await;
    let listen = format!("127.0.0.1:{}", crate::nodes::free_port());
    let server = env.serve_with_env(
        &["--listen", &listen],
        &[("FAILPOINTS", "store.refuse_step_success=1*sleep(60000)")],
    );
    let token = join_token(&server, &env).await;
    let node = crate::nodes::kvm_node(&server, &token, "hv-17").await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 200 }))
        .await;
    logged(&node, "result acknowledged", 1).await;
    server.kill9();
    let server = env.serve_with_env(
        &["--listen", &listen, "--node-grace", "30s"],
        &[("FAILPOINTS", "nodes.reattach=return(8000)")],
    );
    let started = Instant::now();
    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}\n{}", node.log());
    let error = done["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains(
            "ran it, but its result was lost with a server that stopped before storing it"
        ),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "not after the grace: {:?}",
        started.elapsed()
    );
}

/// The fleet promise (`troupe bench fleet` holds it at scale with
/// simulated nodes), with real ones: of 24 `troupe node`s running steps, 6
/// are killed and 6 frozen (SIGSTOP); each of those is listed disconnected
/// within two node timeouts (8 s), and none of the other 12 is ever listed
/// disconnected while the server is watched for 12 s (three timeouts) under
/// a steady load of steps placed on them, every one of which succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn among_many_real_nodes_none_live_is_dropped_and_every_lost_one_is_seen() {
    const NODES: usize = 24;
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| {
            Node::start(
                &server,
                &token,
                &format!("fleet-{i}"),
                &["--capability", "bench=1"],
            )
        })
        .collect();
    let names: Vec<String> = (0..NODES).map(|i| format!("fleet-{i}")).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    connected(&server, &all, &nodes.iter().collect::<Vec<_>>()).await;
    // Every node has the bundle before the clock starts.
    let warm: Vec<i64> = futures_util::future::join_all((0..NODES).map(|i| {
        let server = &server;
        async move {
            server
                .submit("noop3_remote", &format!("warm-{i}"), json!({}))
                .await
        }
    }))
    .await;
    for id in warm {
        assert_eq!(server.finished(id).await["status"], "succeeded");
    }

    let (killed, frozen, live) = (&names[..6], &names[6..12], &names[12..]);
    for node in &mut nodes[..6] {
        node.kill9();
    }
    for node in &nodes[6..12] {
        signal(node, "STOP");
    }
    let lost_at = Instant::now();
    let mut seen_lost: BTreeMap<&str, Duration> = BTreeMap::new();
    let mut load = Vec::new();
    while lost_at.elapsed() < Duration::from_secs(12) {
        load.push(
            server
                .submit(
                    "noop3_remote",
                    &format!("load-{}", load.len() % 8),
                    json!({}),
                )
                .await,
        );
        let (status, list) = server.get("/v1/nodes").await;
        assert_eq!(status, 200, "{list}");
        let up = |name: &str| {
            list["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == name && n["connected"] == true)
        };
        for name in live {
            assert!(
                up(name),
                "live node {name} listed disconnected {:?} after the losses: {list}\n{}",
                lost_at.elapsed(),
                server.log()
            );
        }
        for name in killed.iter().chain(frozen) {
            if !up(name) {
                seen_lost.entry(name).or_insert_with(|| lost_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for node in &nodes[6..12] {
        signal(node, "CONT");
    }
    let lost: Vec<&str> = killed.iter().chain(frozen).map(String::as_str).collect();
    assert_eq!(
        seen_lost.keys().copied().collect::<Vec<_>>().len(),
        lost.len(),
        "not every lost node was seen: {seen_lost:?}"
    );
    for (name, after) in &seen_lost {
        assert!(
            *after <= Duration::from_secs(8),
            "{name} seen lost after {after:?}"
        );
    }
    for id in load {
        let done = server.finished(id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
}

both_dbs!(
    plugin_code_runs_only_in_step_hosts_with_a_clean_environment,
    a_result_lost_on_the_way_is_sent_again_and_recorded_once,
    a_result_whose_acknowledgement_was_cut_is_recorded_once,
    a_result_acknowledged_but_lost_with_its_server_fails_saying_so,
    a_bundle_download_cut_midway_is_tried_again,
    a_node_connects_again_after_15_s_of_server_silence,
    a_node_frozen_for_15_s_is_dropped_and_comes_back,
    a_result_reported_before_the_restarted_server_follows_its_step_counts,
    a_nodes_report_before_the_restarted_server_follows_its_step_counts,
);
