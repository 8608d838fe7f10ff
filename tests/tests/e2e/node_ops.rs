//! Running a fleet of nodes: probes that come and go, new bundle versions
//! taking over on a node, step timeouts there, join tokens that expire or
//! are revoked, and drains that outlive a restart.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Db, Env, Server, both_dbs, strings, test_key, testkit_version};
use crate::nodes::{Node, connected, free_port, join_token, kvm_node, running_on_node, wait_exit};

/// `GET /v1/nodes/{name}`, until `ready` holds (at most 30 s).
async fn node_until(
    server: &Server,
    name: &str,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, node) = server.get(&format!("/v1/nodes/{name}")).await;
        assert_eq!(status, 200, "{node}");
        if ready(&node) {
            return node;
        }
        assert!(
            Instant::now() < deadline,
            "node {name} never got {what}: {node}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_failing_probe_takes_its_capability_away(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    let flag = env.dir.join("kvm-ok");
    std::fs::write(&flag, "").unwrap();
    let probe = format!("hypervisor=test -e '{}' && echo kvm", flag.display());
    let node = Node::start(
        &server,
        &token,
        "hv-17",
        &["--probe", &probe, "--probe-every", "200ms"],
    );
    connected(&server, &["hv-17"], &[&node]).await;
    let n = node_until(&server, "hv-17", "its probed capability", |n| {
        n["capabilities"]["hypervisor"] == "kvm"
    })
    .await;
    assert!(n["capabilities"]["memory_mb"].is_string(), "built in: {n}");
    assert!(n["capabilities"]["hostname"].is_string(), "built in: {n}");
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 1 }))
        .await;
    assert_eq!(server.finished(id).await["status"], "succeeded");

    // The probe fails: the capability goes, and steps that need it wait.
    std::fs::remove_file(&flag).unwrap();
    node_until(&server, "hv-17", "the capability dropped", |n| {
        n["capabilities"].get("hypervisor").is_none()
    })
    .await;
    let id = server
        .submit("node_sleep", "vps-2", json!({ "ms": 1 }))
        .await;
    let waiting = server
        .until(id, "waiting for a node", |a| {
            a["steps"][0]["status"] == "waiting"
        })
        .await;
    assert_eq!(
        waiting["steps"][0]["waiting_for"], "hypervisor=kvm",
        "{waiting}"
    );

    // It passes again: the waiting step runs there.
    std::fs::write(&flag, "").unwrap();
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log());
    assert_eq!(done["steps"][0]["node"], "hv-17");
}

async fn a_new_version_takes_over_on_the_node(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    // A cache too small for two versions: the one no call uses goes.
    let node = Node::start(
        &server,
        &token,
        "hv-17",
        &["--capability", "hypervisor=kvm", "--cache-size", "1"],
    );
    connected(&server, &["hv-17"], &[&node]).await;
    assert!(node.cached().is_empty(), "nothing before it is needed");

    let (v2_bytes, v2_sig) = testkit_version("0.2.0", &test_key());
    let mut before = Vec::new();
    for i in 0..4 {
        before.push(
            server
                .submit("node_version", &format!("pre-{i}"), json!({ "ms": 3000 }))
                .await,
        );
    }
    for id in &before {
        running_on_node(&server, *id).await;
    }
    let (status, v2) = server.push(v2_bytes, &v2_sig).await;
    assert_eq!(status, 201, "{v2}");
    let v2_hash = v2["hash"].as_str().unwrap().to_owned();
    let mut after = Vec::new();
    for i in 0..4 {
        after.push(
            server
                .submit("node_version", &format!("post-{i}"), json!({ "ms": 10 }))
                .await,
        );
    }
    let mut v1 = (String::new(), 0);
    for id in before {
        let a = server.finished(id).await;
        assert_eq!(a["status"], "succeeded", "{a}\n{}", node.log());
        let out = &a["steps"][1]["output"];
        assert_eq!(out["version"], "0.1.0", "pinned before the push: {a}");
        assert_eq!(a["steps"][1]["node"], "hv-17");
        v1 = (
            out["bundle"].as_str().unwrap().to_owned(),
            out["pid"].as_u64().unwrap(),
        );
    }
    for id in after {
        let a = server.finished(id).await;
        assert_eq!(a["status"], "succeeded", "{a}");
        let out = &a["steps"][1]["output"];
        assert_eq!(out["version"], "0.2.0", "submitted after the push: {a}");
        assert_ne!(out["pid"].as_u64().unwrap(), v1.1, "its own step host");
    }

    // v1's host on the node stops once nothing uses it, and its archive
    // leaves the cache; the server hears of both.
    let (v1_hash, v1_pid) = v1;
    let n = node_until(&server, "hv-17", "v1 unloaded and evicted", |n| {
        let hashes = strings(&n["bundles"], "hash");
        hashes == [v2_hash.as_str()]
    })
    .await;
    assert_eq!(n["bundles"][0]["loaded"], true, "{n}");
    assert!(
        !std::path::Path::new(&format!("/proc/{v1_pid}")).exists(),
        "v1's step host (pid {v1_pid}) still runs\n{}",
        node.log()
    );
    assert_eq!(
        node.cached(),
        [format!("{v2_hash}.bundle")],
        "{v1_hash} evicted"
    );
    let shown = server.cli(&["nodes", "show", "hv-17"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains(&v2_hash) && text.contains("loaded"), "{text}");
}

async fn a_step_on_a_node_times_out(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = join_token(&server, &env).await;
    // Kept alive to the end of the test.
    let _node = kvm_node(&server, &token, "hv-17").await;
    let started = Instant::now();
    let id = server
        .submit("node_timeout", "vps-1", json!({ "ms": 20000 }))
        .await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["steps"][0]["node"], "hv-17");
    let error = done["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("1000 ms"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // The node is free for the next step.
    let id = server
        .submit("node_timeout", "vps-2", json!({ "ms": 1 }))
        .await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

/// `troupe nodes token create`: the token it prints, and its id.
fn create_join_token(server: &Server, ttl: &str) -> (String, String) {
    let out = server.cli(&["nodes", "token", "create", "--ttl", ttl, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["scopes"], json!(["join"]), "{t}");
    (
        t["token"].as_str().unwrap().to_owned(),
        t["id"].as_str().unwrap().to_owned(),
    )
}

/// What a join token allows: names that match its pattern, capabilities
/// its patterns list (others a node reports are not placed on), and as
/// many nodes as its uses.
async fn join_tokens_limit_names_capabilities_and_uses(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let out = server.cli(&[
        "nodes",
        "token",
        "create",
        "--ttl",
        "1h",
        "--names",
        "hv-*",
        "--capability",
        "hypervisor=kvm",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        t["join"],
        json!({ "names": "hv-*", "capabilities": ["hypervisor=kvm"], "max_uses": 1 }),
        "{t}"
    );
    let file = env.dir.join("hv.token");
    std::fs::write(&file, t["token"].as_str().unwrap()).unwrap();

    // A name outside the pattern: refused, and no use spent.
    let mut db_node = Node::start(&server, &file, "db-1", &["--capability", "hypervisor=kvm"]);
    let status = wait_exit(&mut db_node.child, Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        db_node
            .log()
            .contains("does not let a node take the name \"db-1\""),
        "{}",
        db_node.log()
    );

    // In, but placed only on what the token allows: `oob` is not.
    let hv = Node::start(
        &server,
        &file,
        "hv-5",
        &["--capability", "hypervisor=kvm", "--capability", "oob=dc2"],
    );
    let list = connected(&server, &["hv-5"], &[&hv]).await;
    let node = &list["nodes"].as_array().unwrap()[0];
    assert_eq!(node["capabilities"]["hypervisor"], "kvm", "{node}");
    assert!(node["capabilities"].get("oob").is_none(), "{node}");
    assert_eq!(
        node["allowed_capabilities"],
        json!(["hypervisor=kvm"]),
        "{node}"
    );
    let id = server
        .submit("placed", "vps-1", json!({ "hypervisor": "hv-5" }))
        .await;
    assert_eq!(server.finished(id).await["status"], "succeeded");

    // Its one use is spent: the next node is refused.
    let mut second = Node::start(&server, &file, "hv-6", &["--capability", "hypervisor=kvm"]);
    let status = wait_exit(&mut second.child, Duration::from_secs(30));
    assert!(!status.success());
    assert!(second.log().contains("no uses left"), "{}", second.log());
    let (_, tokens) = server.get("/v1/tokens").await;
    let used = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == t["id"])
        .cloned()
        .unwrap();
    assert_eq!(used["uses"], 1, "{used}");
    let (_, list) = server.get("/v1/nodes").await;
    assert_eq!(strings(&list["nodes"], "name"), ["hv-5"], "{list}");
}

async fn join_tokens_expire_and_can_be_revoked(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();

    // Joined while the token was good: it stays in after the token expires.
    let made = Instant::now();
    let (short, _) = create_join_token(&server, "10s");
    let short_file = env.dir.join("short.token");
    std::fs::write(&short_file, &short).unwrap();
    let data = env.dir.join("hv-1-data");
    let mut hv1 = Node::start_in(&server, Some(&short_file), "hv-1", &[], data.clone());
    connected(&server, &["hv-1"], &[&hv1]).await;
    // Until the token has expired (by the clock, not a guess).
    tokio::time::sleep_until((made + Duration::from_secs(11)).into()).await;
    hv1.kill9();
    let hv1 = Node::start_in(&server, Some(&short_file), "hv-1", &[], data);
    connected(&server, &["hv-1"], &[&hv1]).await;

    // A new node with the expired token: refused, saying why; nothing kept.
    let mut late = Node::start(&server, &short_file, "hv-2", &[]);
    let status = wait_exit(&mut late.child, Duration::from_secs(30));
    assert!(!status.success());
    assert!(late.log().contains("expired"), "{}", late.log());

    // A revoked one: the same.
    let (revoked, id) = create_join_token(&server, "1h");
    let out = server.cli(&["tokens", "revoke", &id]);
    assert!(out.status.success(), "{out:?}");
    let revoked_file = env.dir.join("revoked.token");
    std::fs::write(&revoked_file, &revoked).unwrap();
    let mut refused = Node::start(&server, &revoked_file, "hv-3", &[]);
    let status = wait_exit(&mut refused.child, Duration::from_secs(30));
    assert!(!status.success());
    assert!(refused.log().contains("revoked"), "{}", refused.log());

    let (_, list) = server.get("/v1/nodes").await;
    let names = strings(&list["nodes"], "name");
    assert_eq!(names, ["hv-1"], "{list}");
}

async fn a_drained_node_stays_drained_across_a_restart(db: Db) {
    let env = Env::new(db).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let server = env.serve_with(&["--listen", &listen]);
    let token = join_token(&server, &env).await;
    let node = kvm_node(&server, &token, "hv-17").await;
    let out = server.cli(&["nodes", "drain", "hv-17"]);
    assert!(out.status.success(), "{out:?}");
    server.kill9();

    let server = env.serve_with(&["--listen", &listen]);
    connected(&server, &["hv-17"], &[&node]).await;
    let n = node_until(&server, "hv-17", "listed", |n| n["connected"] == true).await;
    assert_eq!(n["draining"], true, "{n}");
    assert!(
        n["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{n}"
    );
    assert!(n["last_heard_at"].is_string(), "{n}");
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 1 }))
        .await;
    server
        .until(id, "waiting", |a| a["steps"][0]["status"] == "waiting")
        .await;

    let out = server.cli(&["nodes", "drain", "hv-17", "--undo"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(server.finished(id).await["status"], "succeeded");
    let (_, audit) = server.get("/v1/audit").await;
    let events = strings(&audit["entries"], "event");
    assert!(
        events.contains(&"node.drained") && events.contains(&"node.undrained"),
        "{audit}"
    );
}

async fn a_call_its_node_never_got_runs_elsewhere(db: Db) {
    let env = Env::new(db).await;
    // The first call to a node waits 3 s after its step is recorded
    // running: the node goes away in that window.
    let server = env.serve_with_env(
        &[],
        &[("FAILPOINTS", "runner.before_remote_call=1*return(3000)")],
    );
    let token = join_token(&server, &env).await;
    let mut hv17 = Node::start(
        &server,
        &token,
        "hv-17",
        &["--capability", "hypervisor=kvm"],
    );
    connected(&server, &["hv-17"], &[&hv17]).await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 10 }))
        .await;
    let running = running_on_node(&server, id).await;
    assert_eq!(running["steps"][0]["node"], "hv-17", "{running}");
    hv17.kill9();
    let hv18 = Node::start(
        &server,
        &token,
        "hv-18",
        &["--capability", "hypervisor=kvm"],
    );
    // Not idempotent, but it never reached hv-17: it runs on hv-18, once.
    let done = server.finished(id).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}\n{}",
        hv18.log(),
        server.log()
    );
    assert_eq!(done["steps"][0]["node"], "hv-18", "{done}");
    let pool = env.sql().await;
    let errors: Vec<String> =
        sqlx::query_scalar("SELECT error FROM action_step_attempts WHERE action_id = ?")
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("never reached node hv-17"), "{errors:?}");
}

async fn a_call_lost_with_a_server_crash_before_it_was_sent_runs_after_the_restart(db: Db) {
    let env = Env::new(db).await;
    let listen = format!("127.0.0.1:{}", free_port());
    // The step is recorded running on hv-17, then the server dies before
    // the call leaves it.
    let server = env.serve_with_env(
        &["--listen", &listen],
        &[("FAILPOINTS", "runner.before_remote_call=1*return(5000)")],
    );
    let token = join_token(&server, &env).await;
    let node = kvm_node(&server, &token, "hv-17").await;
    // A node up a while, as nodes are: one that connected just before the
    // call could have restarted since, as far as the server can tell.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = server
        .submit("node_sleep", "vps-1", json!({ "ms": 10 }))
        .await;
    let running = running_on_node(&server, id).await;
    assert_eq!(running["steps"][0]["node"], "hv-17", "{running}");
    server.kill9();

    // The node was up all along and never got it: it did not run, so the
    // restarted server places it again (not idempotent, and run once).
    let server = env.serve_with(&["--listen", &listen]);
    let done = server.finished(id).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}\n{}",
        node.log(),
        server.log()
    );
    assert_eq!(done["steps"][0]["node"], "hv-17");
}

both_dbs!(
    a_call_lost_with_a_server_crash_before_it_was_sent_runs_after_the_restart,
    a_call_its_node_never_got_runs_elsewhere,
    a_failing_probe_takes_its_capability_away,
    a_new_version_takes_over_on_the_node,
    a_step_on_a_node_times_out,
    join_tokens_expire_and_can_be_revoked,
    join_tokens_limit_names_capabilities_and_uses,
    a_drained_node_stays_drained_across_a_restart,
);
