//! troupe on a three-node MariaDB Galera cluster on loopback, which
//! `tests/run` starts (`tests/galera/start.sh`) and names in
//! `TROUPE_TEST_GALERA` (`host:port` of each node; user `troupe_test`,
//! password `troupe-test`). The module shares the one cluster; each test
//! takes a database of its own, and they run one at a time (one kills a
//! node). Without `TROUPE_TEST_GALERA` the tests say so and pass without
//! running.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

use crate::harness::{Env, Server, troupe, workspace};

/// Held by each test: some take a node away.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The nodes' `host:port`, or `None` (and a note why) when no cluster is set.
fn nodes() -> Option<Vec<String>> {
    match std::env::var("TROUPE_TEST_GALERA") {
        Ok(list) if !list.is_empty() => Some(list.split(',').map(str::to_owned).collect()),
        _ => {
            eprintln!(
                "skipped: TROUPE_TEST_GALERA is not set; `bash tests/run` starts a Galera cluster \
                 (or start one with `bash tests/galera/start.sh DIR` and source DIR/env)"
            );
            None
        }
    }
}

fn url(node: &str, db: &str) -> String {
    format!("mysql://troupe_test:troupe-test@{node}/{db}")
}

/// A fresh database on the cluster, made through node 1, and an Env whose
/// servers use it through node 1.
async fn galera_env(nodes: &[String]) -> (Env, String) {
    let name = format!("troupe_g{}_{}", std::process::id(), rand_suffix());
    let mut conn = sqlx::MySqlConnection::connect(&url(&nodes[0], ""))
        .await
        .expect("connecting to Galera node 1");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let dir = crate::harness::scratch_dir("galera");
    (
        Env {
            db_url: url(&nodes[0], &name),
            dir,
        },
        name,
    )
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// Certification failures and brute-force aborts so far, summed over the nodes.
async fn conflicts(nodes: &[String]) -> i64 {
    let mut sum = 0;
    for node in nodes {
        let mut conn = sqlx::MySqlConnection::connect(&url(node, ""))
            .await
            .unwrap();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_local_cert_failures', 'wsrep_local_bf_aborts')",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        sum += rows
            .iter()
            .map(|(_, v)| v.parse::<i64>().unwrap_or(0))
            .sum::<i64>();
    }
    sum
}

/// `troupe migrate` and a server on node 1: actions run, and what they
/// stored is on node 3 as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troupe_migrates_and_runs_actions_on_galera() {
    let Some(nodes) = nodes() else { return };
    let _alone = CLUSTER.lock().await;
    let (env, db) = galera_env(&nodes).await;
    let o = troupe(&["migrate", "--db", &env.db_url]);
    assert!(
        o.status.success(),
        "migrate on Galera: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let server = env.serve();
    let mut ids = Vec::new();
    for n in 0..12 {
        ids.push(
            server
                .submit("noop3", &format!("vps-{}", n % 4), json!({}))
                .await,
        );
    }
    for &id in &ids {
        let a = server.finished(id).await;
        assert_eq!(a["status"], "succeeded", "{a}\n{}", server.log());
    }
    // Node 3 holds them too (a causal read: it waits until it applied
    // everything committed before it).
    let mut n3 = sqlx::MySqlConnection::connect(&url(&nodes[2], &db))
        .await
        .unwrap();
    sqlx::raw_sql("SET SESSION wsrep_sync_wait = 1")
        .execute(&mut n3)
        .await
        .unwrap();
    let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM actions WHERE status = 'succeeded'")
        .fetch_one(&mut n3)
        .await
        .unwrap();
    assert_eq!(done, ids.len() as i64);
}

/// Any answer the flood got that is a server error, with what was asked.
fn server_errors(answers: &[(String, u16, Value)]) -> Vec<String> {
    answers
        .iter()
        .filter(|(_, status, _)| *status >= 500)
        .map(|(what, status, body)| format!("{what}: {status} {body}"))
        .collect()
}

/// Two servers writing through two nodes, which makes write-write
/// conflicts between nodes (a cancel through one for an action the other
/// runs; both writing one target's actions): every conflict the cluster
/// rolls back is retried, so no client sees a 5xx, every action ends, and
/// each server starts its own submits of one target in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_two_nodes_answer_no_5xx_for_conflicts() {
    let Some(nodes) = nodes() else { return };
    let _alone = CLUSTER.lock().await;
    let (env, db) = galera_env(&nodes).await;
    let a = env.serve_with(&["--server-id", "g-a"]);
    let b = env.serve_another_at(&url(&nodes[1], &db), &["--server-id", "g-b"], &[]);
    let before = conflicts(&nodes).await;

    // A cancel through either server for an action the other runs.
    for (runs, asks) in [(&a, &b), (&b, &a)] {
        let running = runs.submit("sleep", "vps-1", json!({ "ms": 60000 })).await;
        runs.until(running, "running", |x| x["current_step"] == "sleep_ms")
            .await;
        let queued = runs.submit("sleep", "vps-1", json!({ "ms": 1 })).await;
        let asked = Instant::now();
        for id in [queued, running] {
            let (status, body) = asks
                .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
                .await;
            assert_eq!(status, 202, "{body}\n{}", asks.log());
        }
        for id in [queued, running] {
            let done = runs.finished(id).await;
            assert_eq!(done["status"], "cancelled", "{done}\n{}", runs.log());
        }
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    // One target flooded through both servers at once, every second action
    // cancelled through the other server as its own server starts it
    // (both write its row, through two nodes): bounded, 30 submits each.
    async fn flood(
        me: &Server,
        other: &Server,
        label: &str,
    ) -> (Vec<i64>, Vec<(String, u16, Value)>) {
        let mut ids = Vec::new();
        let mut answers = Vec::new();
        for n in 0..30 {
            let (status, body) = me
                .post(
                    "/v1/actions",
                    &json!({ "kind": "noop3", "target": "vps-flood", "params": {} }),
                )
                .await;
            answers.push((
                format!("submit {n} through {label}"),
                status.as_u16(),
                body.clone(),
            ));
            let Some(id) = body["id"].as_i64() else {
                continue;
            };
            ids.push(id);
            if n % 2 == 1 {
                let (status, body) = other
                    .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
                    .await;
                answers.push((
                    format!("cancel {id} through the other"),
                    status.as_u16(),
                    body,
                ));
            }
        }
        (ids, answers)
    }
    let ((ids_a, answers_a), (ids_b, answers_b)) =
        tokio::join!(flood(&a, &b, "a"), flood(&b, &a, "b"));
    let answers: Vec<_> = answers_a.into_iter().chain(answers_b).collect();
    let errors = server_errors(&answers);
    assert!(
        errors.is_empty(),
        "server errors: {errors:#?}\n--- a ---\n{}\n--- b ---\n{}",
        a.log(),
        b.log()
    );
    for (what, status, body) in &answers {
        if what.starts_with("submit") {
            assert_eq!(*status, 202, "{what}: {body}");
        } else {
            // Unless it had finished first.
            assert!(
                *status == 202 || body["error"]["code"] == "not_cancellable",
                "{what}: {status} {body}"
            );
        }
    }
    assert_eq!(ids_a.len() + ids_b.len(), 60);
    for (server, ids) in [(&a, &ids_a), (&b, &ids_b)] {
        let mut started = BTreeMap::new();
        for &id in ids {
            let done = server.finished(id).await;
            let status = done["status"].as_str().unwrap();
            assert!(
                status == "succeeded" || status == "cancelled",
                "{done}\n{}",
                server.log()
            );
            if let Some(at) = done["started_at"].as_str() {
                started.insert(id, at.to_owned());
            }
        }
        let times: Vec<&String> = started.values().collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "one server's submits of a target start in order: {started:?}"
        );
    }
    let retried = |body: &Value| body["store"]["rolled_back"].as_u64().unwrap();
    eprintln!(
        "certification conflicts and aborts during the test: {}; transactions retried: {} and {}",
        conflicts(&nodes).await - before,
        retried(&a.get("/v1/health").await.1),
        retried(&b.get("/v1/health").await.1),
    );
}

/// Runs `tests/galera/node.sh DIR what N`.
fn node(dir: &str, what: &str, n: usize) {
    let o = std::process::Command::new("bash")
        .arg(workspace().join("tests/galera/node.sh"))
        .args([dir, what, &n.to_string()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "node.sh {what} {n}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A node SIGKILLed, started again when dropped if the test did not (a
/// failed test leaves the cluster whole for the next).
struct Killed<'a> {
    dir: &'a str,
    n: usize,
    started: bool,
}

impl<'a> Killed<'a> {
    fn new(dir: &'a str, n: usize) -> Killed<'a> {
        node(dir, "kill", n);
        Killed {
            dir,
            n,
            started: false,
        }
    }

    /// Starts it again and waits until it is Synced.
    fn start(mut self) {
        self.started = true;
        node(self.dir, "start", self.n);
    }
}

impl Drop for Killed<'_> {
    fn drop(&mut self) {
        if !self.started {
            node(self.dir, "start", self.n);
        }
    }
}

/// The node `/v1/health` says the server writes through.
async fn writes_through(server: &Server) -> String {
    let (_, body) = server.get("/v1/health").await;
    body["database"]["writes_through"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn writes_through_until(server: &Server, node: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = writes_through(server).await;
        if now == node {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still writing through {now:?}, not {node}, after {within:?}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One submit of the load: when it was sent and answered, and its answer.
struct Sent {
    key: String,
    sent: Instant,
    answered: Instant,
    id: Option<i64>,
    status: Option<u16>,
}

/// `--db` naming the three nodes: the server writes through the first.
/// SIGKILL that node under a bounded load (four clients submitting back to
/// back): the server moves to the next node (as `/v1/health` and
/// `/v1/servers` say) and acknowledges submits again within 10 s of the
/// kill, every action it acknowledged runs to the end, and once the node is
/// back and Synced the writes return to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_writer_node_moves_the_writes_to_the_next() {
    let Some(nodes) = nodes() else { return };
    let Ok(dir) = std::env::var("TROUPE_TEST_GALERA_DIR") else {
        eprintln!(
            "skipped: TROUPE_TEST_GALERA_DIR is not set (tests/galera/start.sh writes it to DIR/env)"
        );
        return;
    };
    let _alone = CLUSTER.lock().await;
    let (mut env, db) = galera_env(&nodes).await;
    env.db_url = format!("mysql://troupe_test:troupe-test@{}/{db}", nodes.join(","));
    // A lease longer than the cluster's eviction of a dead node, as
    // deploy/galera.md says to set: with the default 6 s the stall may
    // outlast it, and the server's own actions are taken over and their
    // interrupted steps run again.
    let server = std::sync::Arc::new(env.serve_with(&["--lease", "15s"]));
    writes_through_until(&server, &nodes[0], Duration::from_secs(5)).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (server, stop, http) = (server.clone(), stop.clone(), http.clone());
        clients.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0..400 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let key = format!("load-{c}-{n}");
                let at = Instant::now();
                let answer = http
                    .post(format!("{}/v1/actions", server.url))
                    .bearer_auth(&server.token)
                    .json(&json!({ "kind": "noop3", "target": format!("vps-{c}"), "params": {}, "idempotency_key": key }))
                    .send()
                    .await;
                let (status, id) = match answer {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let body: Value = resp.json().await.unwrap_or(Value::Null);
                        (Some(status), body["id"].as_i64())
                    }
                    Err(_) => (None, None),
                };
                sent.push(Sent { key, sent: at, answered: Instant::now(), id, status });
                if status != Some(202) {
                    // As a client would, after a refusal.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            sent
        }));
    }
    // Some acknowledged before the kill.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let down = Killed::new(&dir, 1);
    let killed = Instant::now();
    // The writes move, and the load goes on for a while after.
    writes_through_until(&server, &nodes[1], Duration::from_secs(10)).await;
    // So does what the server tells the others (at its next renewal).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = server.get("/v1/servers").await;
        let me = body["servers"]
            .as_array()
            .and_then(|l| l.iter().find(|s| s["this_server"] == true).cloned())
            .unwrap_or_default();
        if me["writes_through"] == nodes[1].as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "/v1/servers: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap());
    }

    let acked: Vec<&Sent> = all.iter().filter(|s| s.status == Some(202)).collect();
    let before = acked.iter().filter(|s| s.answered < killed).count();
    let first_after = acked
        .iter()
        .filter(|s| s.sent > killed)
        .map(|s| s.answered - killed)
        .min();
    let refused: Vec<String> = all
        .iter()
        .filter(|s| s.status != Some(202))
        .map(|s| format!("{} {:?}", s.key, s.status))
        .collect();
    eprintln!(
        "{} submits, {before} acknowledged before the kill, {} after; refused: {refused:?}; \
         first acknowledged submit sent after the kill answered {first_after:?} after it",
        all.len(),
        acked.len() - before,
    );
    assert!(before > 0, "nothing was acknowledged before the kill");
    let stall = first_after.expect("nothing sent after the kill was acknowledged");
    assert!(
        stall < Duration::from_secs(10),
        "work stalled {stall:?} after the writer node died"
    );
    // Nothing acknowledged is lost: every one runs to the end, and no step
    // ran twice.
    let mut twice = Vec::new();
    for s in &acked {
        let done = server.finished(s.id.unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{}: {done}", s.key);
        for step in done["steps"].as_array().unwrap() {
            let attempts = step["attempts"].as_array().map_or(0, Vec::len);
            if attempts != 1 {
                twice.push(format!(
                    "{} step {}: {attempts} attempts",
                    s.key, step["name"]
                ));
            }
        }
    }
    assert!(
        twice.is_empty(),
        "steps not run exactly once: {twice:?}\n{}",
        server.log()
    );

    // The node comes back (as a joiner), and the writes follow it back.
    down.start();
    writes_through_until(&server, &nodes[0], Duration::from_secs(30)).await;
    let id = server.submit("noop3", "vps-after", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

/// SIGKILL a node troupe does not write through, under a bounded load:
/// commits stall until the cluster evicts it, but no submit fails and the
/// writes stay where they were; the node rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_another_node_fails_no_request() {
    let Some(nodes) = nodes() else { return };
    let Ok(dir) = std::env::var("TROUPE_TEST_GALERA_DIR") else {
        eprintln!(
            "skipped: TROUPE_TEST_GALERA_DIR is not set (tests/galera/start.sh writes it to DIR/env)"
        );
        return;
    };
    let _alone = CLUSTER.lock().await;
    let (mut env, db) = galera_env(&nodes).await;
    env.db_url = format!("mysql://troupe_test:troupe-test@{}/{db}", nodes.join(","));
    // A lease longer than the cluster's eviction of a dead node, as
    // deploy/galera.md says to set: with the default 6 s the stall may
    // outlast it, and the server's own actions are taken over and their
    // interrupted steps run again.
    let server = std::sync::Arc::new(env.serve_with(&["--lease", "15s"]));
    writes_through_until(&server, &nodes[0], Duration::from_secs(5)).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..2 {
        let (server, stop, http) = (server.clone(), stop.clone(), http.clone());
        clients.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            // Paced, so that it outlasts the stall: at most 600 each.
            for n in 0..600 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let at = Instant::now();
                let answer = http
                    .post(format!("{}/v1/actions", server.url))
                    .bearer_auth(&server.token)
                    .json(&json!({ "kind": "noop3", "target": format!("vps-{c}"), "params": {} }))
                    .send()
                    .await;
                let (status, id) = match answer {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let body: Value = resp.json().await.unwrap_or(Value::Null);
                        (Some(status), body["id"].as_i64())
                    }
                    Err(_) => (None, None),
                };
                answers.push((format!("submit {c}-{n}"), status, id, at.elapsed()));
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Killed::new(&dir, 3);
    // Past the cluster's eviction of the node (about 5 s), and some more.
    tokio::time::sleep(Duration::from_secs(9)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap());
    }
    let failed: Vec<_> = all.iter().filter(|(_, s, _, _)| *s != Some(202)).collect();
    assert!(
        failed.is_empty(),
        "failed submits: {failed:?}\n{}",
        server.log()
    );
    assert_eq!(writes_through(&server).await, nodes[0]);
    for (what, _, id, _) in &all {
        let done = server.finished(id.unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{what}: {done}");
    }
    let slowest = all
        .iter()
        .map(|(_, _, _, took)| *took)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} submits, none failed; the slowest took {slowest:?}",
        all.len()
    );
    killed.start();
}

/// Nodes frozen with SIGSTOP, thawed when dropped (a failed test leaves the
/// cluster whole for the next).
struct Frozen<'a> {
    dir: &'a str,
    nodes: Vec<usize>,
}

impl<'a> Frozen<'a> {
    fn new(dir: &'a str, nodes: &[usize]) -> Frozen<'a> {
        for &n in nodes {
            node(dir, "freeze", n);
        }
        Frozen {
            dir,
            nodes: nodes.to_vec(),
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        for &n in &self.nodes {
            node(self.dir, "thaw", n);
        }
        whole(self.dir);
    }
}

/// Waits (at most 90 s) until every node of the cluster is Synced again.
fn whole(dir: &str) {
    let began = Instant::now();
    let mut states = Vec::new();
    while began.elapsed() < Duration::from_secs(90) {
        states = (1..=3)
            .map(|n| {
                let o = std::process::Command::new("bash")
                    .arg(workspace().join("tests/galera/node.sh"))
                    .args([dir, "state", &n.to_string()])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&o.stdout).trim().to_owned()
            })
            .collect();
        if states.iter().all(|s| s == "Synced") {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("the cluster is not whole 90 s after the thaw: {states:?}");
}

/// `/v1/health/ready`: its status and body.
async fn ready(server: &Server) -> (u16, Value) {
    let (status, body) = server
        .request_as(None, reqwest::Method::GET, "/v1/health/ready", None)
        .await;
    (status.as_u16(), body)
}

/// Two of the three nodes frozen (SIGSTOP: hosts that stop answering): the
/// one left loses its quorum and leaves the Primary component, so no node
/// takes writes. Readiness answers 503 `database_not_in_cluster` and says
/// why, without naming a node (it answers without a credential), within
/// 30 s of the freeze (Galera's own suspicion and eviction come first); a
/// submit is refused `database_unavailable` and stores nothing. Thawed,
/// the cluster forms again, the server is ready again and the same submit
/// makes one action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_quorum_is_not_ready_and_says_why() {
    let Some(nodes) = nodes() else { return };
    let Ok(dir) = std::env::var("TROUPE_TEST_GALERA_DIR") else {
        eprintln!(
            "skipped: TROUPE_TEST_GALERA_DIR is not set (tests/galera/start.sh writes it to DIR/env)"
        );
        return;
    };
    let _alone = CLUSTER.lock().await;
    let (mut env, db) = galera_env(&nodes).await;
    env.db_url = format!("mysql://troupe_test:troupe-test@{}/{db}", nodes.join(","));
    let server = env.serve();
    writes_through_until(&server, &nodes[0], Duration::from_secs(5)).await;
    assert_eq!(ready(&server).await.0, 200);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let submit = |key: &'static str| {
        let http = http.clone();
        let (url, token) = (server.url.clone(), server.token.clone());
        async move {
            let resp = http
                .post(format!("{url}/v1/actions"))
                .bearer_auth(token)
                .json(&json!({ "kind": "noop3", "target": "vps-q", "params": {}, "idempotency_key": key }))
                .send()
                .await
                .expect("an answer within 30 s");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    let frozen = Frozen::new(&dir, &[2, 3]);
    let froze = Instant::now();
    let body = loop {
        let (status, body) = ready(&server).await;
        if status == 503 && body["code"] == "database_not_in_cluster" {
            break body;
        }
        assert!(
            froze.elapsed() < Duration::from_secs(30),
            "readiness still {status} {body} 30 s after the quorum was lost\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("not ready {:?} after the freeze: {body}", froze.elapsed());
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("not in the Primary component"), "{body}");
    assert!(
        !reason.contains("127.0.0.1"),
        "a node named without a credential: {body}"
    );
    let (status, refused) = submit("quorum-1").await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (503, Some("database_unavailable")),
        "{refused}\n{}",
        server.log()
    );

    drop(frozen);
    let thawed = Instant::now();
    loop {
        let (status, body) = ready(&server).await;
        if status == 200 {
            break;
        }
        assert!(
            thawed.elapsed() < Duration::from_secs(60),
            "not ready 60 s after the cluster was whole again: {body}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("ready {:?} after the thaw", thawed.elapsed());
    let (status, body) = submit("quorum-1").await;
    assert_eq!(status, 202, "{body}\n{}", server.log());
    let id = body["id"].as_i64().unwrap();
    assert_eq!(server.finished(id).await["status"], "succeeded");
    let mut conn = sqlx::MySqlConnection::connect(&url(&nodes[0], &db))
        .await
        .unwrap();
    let stored: Vec<i64> = sqlx::query_scalar("SELECT id FROM actions")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, [id], "one action for the one key");
}
