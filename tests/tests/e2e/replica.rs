//! troupe on a MariaDB primary/replica pair on loopback (GTID replication,
//! the replica read-only), which `tests/run` starts
//! (`tests/replica/start.sh`) and names in `TROUPE_TEST_REPLICA` (`host:port`
//! of each server, the first primary at the start) and
//! `TROUPE_TEST_REPLICA_DIR`. A switchover is what an operator's tool does
//! (`tests/replica/switchover.sh`): the primary turns read-only, the
//! replica catches up and becomes the writable primary, the old primary
//! replicates from it. The module shares the one pair; each test takes a
//! database of its own, and they run one at a time. Without
//! `TROUPE_TEST_REPLICA` the tests say so and pass without running.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

use crate::harness::{Env, Server, workspace};

/// Held by each test: they switch the pair over.
static PAIR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The servers' `host:port` and the pair's directory, or `None` (and a note
/// why) when no pair is set.
fn pair() -> Option<(Vec<String>, String)> {
    match (
        std::env::var("TROUPE_TEST_REPLICA"),
        std::env::var("TROUPE_TEST_REPLICA_DIR"),
    ) {
        (Ok(list), Ok(dir)) if !list.is_empty() => {
            Some((list.split(',').map(str::to_owned).collect(), dir))
        }
        _ => {
            eprintln!(
                "skipped: TROUPE_TEST_REPLICA or TROUPE_TEST_REPLICA_DIR is not set; `bash tests/run` \
                 starts a primary/replica pair (or start one with `bash tests/replica/start.sh DIR` \
                 and source DIR/env)"
            );
            None
        }
    }
}

fn url(node: &str, db: &str) -> String {
    format!("mysql://troupe_test:troupe-test@{node}/{db}")
}

async fn connect(node: &str, db: &str) -> sqlx::MySqlConnection {
    sqlx::MySqlConnection::connect(&url(node, db))
        .await
        .unwrap_or_else(|e| panic!("connecting to {node}: {e}"))
}

/// The pair's servers, the writable one (the primary) first.
async fn primary_first(nodes: &[String]) -> Vec<String> {
    let mut writable = Vec::new();
    for node in nodes {
        let mut conn = connect(node, "").await;
        let read_only: i64 = sqlx::query_scalar("SELECT CAST(@@read_only AS SIGNED)")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if read_only == 0 {
            writable.push(node.clone());
        }
    }
    assert_eq!(writable.len(), 1, "one primary in {nodes:?}: {writable:?}");
    let mut ordered = writable.clone();
    ordered.extend(nodes.iter().filter(|n| **n != writable[0]).cloned());
    ordered
}

/// Switches the pair over (`tests/replica/switchover.sh`), with `pause`
/// between the primary turning read-only and the replica's promotion;
/// returns how long it took.
fn switch_over(dir: &str, pause: Duration) -> Duration {
    let began = Instant::now();
    let o = std::process::Command::new("bash")
        .arg(workspace().join("tests/replica/switchover.sh"))
        .args([dir, &pause.as_secs_f64().to_string()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "switchover.sh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    began.elapsed()
}

/// The server `/v1/health` says the server writes through.
async fn writes_through(server: &Server) -> String {
    let (_, body) = server.get("/v1/health").await;
    body["database"]["writes_through"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits until the server writes through `node`; returns how long it took.
async fn writes_through_until(server: &Server, node: &str, within: Duration) -> Duration {
    let began = Instant::now();
    loop {
        let now = writes_through(server).await;
        if now == node {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < within,
            "still writing through {now:?}, not {node}, after {within:?}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The actions in the database on `node`: idempotency key → (id, status).
async fn actions_on(node: &str, db: &str) -> BTreeMap<String, Vec<(i64, String)>> {
    let mut conn = connect(node, db).await;
    let rows: Vec<(i64, Option<String>, String)> =
        sqlx::query_as("SELECT id, idempotency_key, status FROM actions")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let mut by_key: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for (id, key, status) in rows {
        by_key
            .entry(key.unwrap_or_else(|| format!("(no key, id {id})")))
            .or_default()
            .push((id, status));
    }
    by_key
}

/// One submit of the load: when it was sent and answered, and its answer.
#[derive(Debug)]
struct Sent {
    key: String,
    target: String,
    sent: Instant,
    answered: Instant,
    status: Option<u16>,
    code: Option<String>,
    id: Option<i64>,
}

async fn submit(http: &reqwest::Client, server: &Server, key: &str, target: &str) -> Sent {
    let sent = Instant::now();
    let answer = http
        .post(format!("{}/v1/actions", server.url))
        .bearer_auth(&server.token)
        .json(&json!({ "kind": "noop3", "target": target, "params": {}, "idempotency_key": key }))
        .send()
        .await;
    let (status, body) = match answer {
        Ok(resp) => (
            Some(resp.status().as_u16()),
            resp.json::<Value>().await.unwrap_or(Value::Null),
        ),
        Err(_) => (None, Value::Null),
    };
    Sent {
        key: key.to_owned(),
        target: target.to_owned(),
        sent,
        answered: Instant::now(),
        status,
        code: body["error"]["code"].as_str().map(str::to_owned),
        id: body["id"].as_i64(),
    }
}

/// A server on a fresh database on the pair, given both addresses, the
/// primary first; the primary's and the replica's addresses.
async fn serve_on_pair(nodes: &[String], label: &str) -> (Arc<Server>, String, String, String) {
    let nodes = primary_first(nodes).await;
    let (primary, replica) = (nodes[0].clone(), nodes[1].clone());
    let db = format!("troupe_r{}_{label}", std::process::id());
    let mut conn = connect(&primary, "").await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let env = Env {
        db_url: format!("mysql://troupe_test:troupe-test@{}/{db}", nodes.join(",")),
        dir: crate::harness::scratch_dir("replica"),
    };
    let server = Arc::new(env.serve());
    writes_through_until(&server, &primary, Duration::from_secs(5)).await;
    (server, db, primary, replica)
}

/// What a load through switchovers saw.
struct Seen {
    /// Every submit, as sent and answered.
    sent: Vec<Sent>,
    /// When each switchover began.
    switches: Vec<Instant>,
    /// When the server wrote through each new primary.
    moved: Vec<Instant>,
    /// `/v1/health/ready` every 50 ms: when asked, its status and body.
    looks: Vec<(Instant, u16, Value)>,
}

/// Three clients submit back to back (each submit with an idempotency
/// key; at most 800 each) while readiness is looked at every 50 ms; after
/// 2 s the pair is switched over to each of `plan` in turn (with its
/// pause), the server writing through the new primary within 10 s each
/// time, and the load goes on 3 s after each.
async fn load_through(server: &Arc<Server>, dir: &str, plan: &[(&str, Duration)]) -> Seen {
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let ready = {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(async move {
            let mut looks = Vec::new();
            for _ in 0..1200 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let asked = Instant::now();
                let (status, body) = server
                    .request_as(None, reqwest::Method::GET, "/v1/health/ready", None)
                    .await;
                looks.push((asked, status.as_u16(), body));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            looks
        })
    };
    let mut clients = Vec::new();
    for c in 0..3 {
        let (server, stop, http) = (server.clone(), stop.clone(), http.clone());
        clients.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0..800 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let s = submit(
                    &http,
                    &server,
                    &format!("load-{c}-{n}"),
                    &format!("vps-{c}"),
                )
                .await;
                if s.status != Some(202) {
                    // As a client would, after a refusal.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                sent.push(s);
            }
            sent
        }));
    }
    // Some acknowledged first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut switches = Vec::new();
    let mut moved = Vec::new();
    for &(to, pause) in plan {
        let at = Instant::now();
        let took = tokio::task::spawn_blocking({
            let dir = dir.to_owned();
            move || switch_over(&dir, pause)
        })
        .await
        .unwrap();
        let followed = writes_through_until(server, to, Duration::from_secs(10)).await;
        eprintln!("switched over to {to} in {took:?}; troupe wrote through it {followed:?} later");
        switches.push(at);
        moved.push(Instant::now());
        // The load goes on through the new primary for a while.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for c in clients {
        sent.extend(c.await.unwrap());
    }
    Seen {
        sent,
        switches,
        moved,
        looks: ready.await.unwrap(),
    }
}

/// What must hold after a load through switchovers: no submit refused
/// (only an unknown outcome allowed); after each switchover a submit
/// acknowledged within 10 s; an unknown outcome sent again with its key
/// makes one action; every action succeeded and is in the primary's
/// database exactly once, and in the replica's as well; readiness 503 for
/// no more than `unready` in a row, and ready at the end. Returns the
/// longest stretch readiness was 503, and the codes it gave.
async fn check(
    server: &Server,
    seen: &Seen,
    db: &str,
    primary: &str,
    replica: &str,
    unready: Duration,
) -> (Duration, Vec<String>) {
    let all = &seen.sent;
    let refused: Vec<&Sent> = all
        .iter()
        .filter(|s| s.status != Some(202) && s.code.as_deref() != Some("outcome_unknown"))
        .collect();
    assert!(
        refused.is_empty(),
        "submits refused during a switchover (a write the old primary refused as read-only \
         must be retried on the new one): {refused:#?}\n{}",
        server.log()
    );
    for &at in &seen.switches {
        let before = all
            .iter()
            .filter(|s| s.status == Some(202) && s.answered < at)
            .count();
        let first_after = all
            .iter()
            .filter(|s| s.status == Some(202) && s.sent > at)
            .map(|s| s.answered - at)
            .min()
            .expect("nothing sent after the switchover was acknowledged");
        eprintln!(
            "{before} acknowledged before the switchover; the first sent after it answered {first_after:?} after it"
        );
        assert!(before > 0, "nothing was acknowledged before the switchover");
        assert!(
            first_after < Duration::from_secs(10),
            "work stalled {first_after:?} after the switchover"
        );
    }
    // The stall: the longest time no submit was acknowledged, from the
    // first switchover on (every client submits back to back).
    let mut acked: Vec<Instant> = all
        .iter()
        .filter(|s| s.status == Some(202) && s.answered > seen.switches[0])
        .map(|s| s.answered)
        .collect();
    acked.insert(0, seen.switches[0]);
    acked.sort();
    let stall = acked
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!("the longest time without an acknowledged submit: {stall:?}");
    assert!(
        stall < Duration::from_secs(10),
        "no submit was acknowledged for {stall:?}"
    );
    let slowest = all
        .iter()
        .map(|s| s.answered - s.sent)
        .max()
        .unwrap_or_default();
    let unknown: Vec<&Sent> = all.iter().filter(|s| s.status != Some(202)).collect();
    eprintln!(
        "{} submits, {} left with an unknown outcome; the slowest answered in {slowest:?}",
        all.len(),
        unknown.len()
    );

    // An unknown outcome, sent again with its key: one action.
    let http = reqwest::Client::new();
    let mut ids: BTreeMap<String, i64> = all
        .iter()
        .filter_map(|s| s.id.map(|id| (s.key.clone(), id)))
        .collect();
    for s in &unknown {
        let again = submit(&http, server, &s.key, &s.target).await;
        assert_eq!(again.status, Some(202), "{again:?}\n{}", server.log());
        ids.insert(s.key.clone(), again.id.unwrap());
    }
    assert_eq!(ids.len(), all.len());
    for (key, &id) in &ids {
        let done = server.finished(id).await;
        assert_eq!(done["status"], "succeeded", "{key}: {done}");
    }

    // In the primary's database: each once, succeeded, and nothing else.
    let held = actions_on(primary, db).await;
    let mut wrong = Vec::new();
    for (key, &id) in &ids {
        match held.get(key).map(Vec::as_slice) {
            Some([(held_id, status)]) if *held_id == id && status == "succeeded" => {}
            other => wrong.push(format!("{key} (id {id}): {other:?}")),
        }
    }
    wrong.extend(
        held.iter()
            .filter(|(key, _)| !ids.contains_key(*key))
            .map(|(key, rows)| format!("{key}: {rows:?}, never acknowledged")),
    );
    assert!(
        wrong.is_empty(),
        "actions not held exactly once: {wrong:#?}"
    );
    // And the replica (the old primary) holds the same, having replicated
    // from the new primary without a conflict.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let copy = actions_on(replica, db).await;
        if copy == held {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica holds {} actions, the primary {}",
            copy.len(),
            held.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Readiness: never unready for long, and ready at the end.
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    let mut codes = Vec::new();
    for (at, status, body) in &seen.looks {
        if *status == 200 {
            since = None;
            continue;
        }
        codes.push(format!(
            "{status} {}",
            body["code"].as_str().unwrap_or_default()
        ));
        let from = *since.get_or_insert(*at);
        longest = longest.max(*at - from);
    }
    let unready_at: Vec<Duration> = seen
        .looks
        .iter()
        .filter(|l| l.1 != 200)
        .map(|l| l.0.saturating_duration_since(seen.switches[0]))
        .collect();
    eprintln!(
        "{} readiness looks, {} not ready (from {:?} to {:?} after the first switchover began); \
         the longest stretch {longest:?}",
        seen.looks.len(),
        codes.len(),
        unready_at.first(),
        unready_at.last(),
    );
    assert!(
        longest < unready,
        "/v1/health/ready was 503 for {longest:?} in a row ({codes:?})"
    );
    assert_eq!(seen.looks.last().map(|l| l.1), Some(200));
    // Ready again once the writes moved (a readiness check stands for 1 s),
    // until the next switchover begins: its reads do not go to the old
    // primary after the move.
    for (i, &moved) in seen.moved.iter().enumerate() {
        let next = seen.switches.get(i + 1).copied();
        let late: Vec<_> = seen
            .looks
            .iter()
            .filter(|l| {
                l.1 != 200
                    && l.0 > moved + Duration::from_millis(1500)
                    && next.is_none_or(|next| l.0 < next)
            })
            .map(|l| (l.0 - moved, l.2.clone()))
            .collect();
        assert!(
            late.is_empty(),
            "not ready after the writes moved to the new primary: {late:?}"
        );
    }
    (longest, codes)
}

/// `--db` naming both servers, the primary first. Under a bounded load
/// (three clients submitting back to back, each submit with an idempotency
/// key), the pair is switched over and, once the load has gone on through
/// the new primary, switched back. Each time the server writes through the
/// new primary within 10 s (as `/v1/health` says) and acknowledges submits
/// again within 10 s of the switchover; a transaction the demoted primary
/// refused as read-only is retried on the new one, so no submit is refused
/// for it; `/v1/health/ready` is 503 only briefly. At the end every
/// acknowledged action is in the primary's database exactly once and
/// succeeded, a submit whose outcome was unknown, sent again with its key,
/// makes one action, and the replica holds the same actions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troupe_follows_a_switchover_and_back() {
    let Some((nodes, dir)) = pair() else { return };
    let _alone = PAIR.lock().await;
    let (server, db, primary, replica) = serve_on_pair(&nodes, "back").await;
    let seen = load_through(
        &server,
        &dir,
        &[(&replica, Duration::ZERO), (&primary, Duration::ZERO)],
    )
    .await;
    check(
        &server,
        &seen,
        &db,
        &primary,
        &replica,
        Duration::from_secs(5),
    )
    .await;
}

/// A slow switchover: the primary read-only for 3 s before the replica is
/// promoted, under the same load. Commits refused as read-only meanwhile
/// (`store.rolled_back` in `/v1/health` counts them) are tried again until
/// the new primary takes them: no submit is refused, each action is stored
/// once; readiness says `database_read_only` for about those 3 s and no
/// longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_through_a_slow_switchover() {
    let Some((nodes, dir)) = pair() else { return };
    let _alone = PAIR.lock().await;
    let (server, db, primary, replica) = serve_on_pair(&nodes, "slow").await;
    let seen = load_through(&server, &dir, &[(&replica, Duration::from_secs(3))]).await;
    let (_, body) = server.get("/v1/health").await;
    let retried = body["store"]["rolled_back"].as_u64().unwrap();
    eprintln!("commits tried again: {retried}");
    assert!(retried > 0, "no commit was refused as read-only: {body}");
    let (longest, codes) = check(
        &server,
        &seen,
        &db,
        &replica,
        &primary,
        Duration::from_secs(6),
    )
    .await;
    assert!(
        longest >= Duration::from_secs(2),
        "/v1/health/ready was 503 only {longest:?} of the 3 s the primary was read-only"
    );
    assert!(
        codes.iter().all(|c| c == "503 database_read_only"),
        "{codes:?}"
    );
}

/// Runs `sql` as root on server `node` of the pair (its socket in `dir`).
fn root_sql(dir: &str, nodes: &[String], node: &str, sql: &str) {
    let n = nodes.iter().position(|x| x == node).unwrap() + 1;
    let o = std::process::Command::new("mariadb")
        .args([
            "--no-defaults",
            "-uroot",
            &format!("--socket={dir}/s{n}.sock"),
        ])
        .args(["-e", sql])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The primary turns read-only and nothing replaces it (a switchover that
/// does not finish): a submit is refused `database_unavailable` within the
/// submit timeout and stored nothing, even once the primary is writable
/// again; readiness says `database_read_only`. Writable again, the same
/// submit goes through once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_left_read_only_refuses_submits_and_stores_nothing() {
    let Some((nodes, dir)) = pair() else { return };
    let _alone = PAIR.lock().await;
    let (server, db, primary, _) = serve_on_pair(&nodes, "stuck").await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    root_sql(&dir, &nodes, &primary, "SET GLOBAL read_only = ON");
    let refused = submit(&http, &server, "stuck-1", "vps-1").await;
    let (ready, body) = server
        .request_as(None, reqwest::Method::GET, "/v1/health/ready", None)
        .await;
    root_sql(&dir, &nodes, &primary, "SET GLOBAL read_only = OFF");
    let took = refused.answered - refused.sent;
    assert_eq!(
        (refused.status, refused.code.as_deref()),
        (Some(503), Some("database_unavailable")),
        "{refused:?}\n{}",
        server.log()
    );
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(10),
        "answered after {took:?}"
    );
    assert_eq!(ready.as_u16(), 503, "{body}");
    assert_eq!(body["code"], "database_read_only");
    // Nothing was stored: the writer gave up on it before answering, so
    // nothing of it is left to commit once the primary is writable (looked
    // at again a second after, when a retry still under way would have
    // committed).
    writes_through_until(&server, &primary, Duration::from_secs(5)).await;
    for _ in 0..2 {
        let held = actions_on(&primary, &db).await;
        assert!(
            held.is_empty(),
            "stored after database_unavailable: {held:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let again = submit(&http, &server, "stuck-1", "vps-1").await;
    assert_eq!(again.status, Some(202), "{again:?}");
    assert_eq!(
        server.finished(again.id.unwrap()).await["status"],
        "succeeded"
    );
    let held = actions_on(&primary, &db).await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held["stuck-1"].len(), 1, "{held:?}");
}
