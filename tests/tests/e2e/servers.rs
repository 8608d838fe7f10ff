//! Several servers on one database: each registers under an id of its own,
//! holds a lease renewed by the database's clock, and takes over the
//! actions of a server that died or froze past its lease. A server that
//! lost its lease writes nothing more to the actions handed on (every write
//! of a runner is fenced on the action's epoch), and rejoins.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Db, Env, Server, troupe_bin};

/// The `troupe serve` arguments to start a server by hand (to see it refused).
fn serve_args(env: &Env, dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--db".into(),
        env.db_url.clone(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts a server that must refuse to run; returns what it said.
fn refused(env: &Env, extra: &[&str]) -> String {
    let dir = env.dir.join(format!("refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(troupe_bin())
        .args(serve_args(env, &dir, extra))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the server started: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls `/v1/servers` on `server` until `check` holds (at most 30 s).
async fn servers_until(
    server: &Server,
    what: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server.get("/v1/servers").await;
        assert_eq!(status, 200, "{body}");
        let list = body["servers"].as_array().cloned().unwrap_or_default();
        if check(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "servers never {what}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state_of<'a>(list: &'a [Value], id: &str) -> &'a str {
    list.iter()
        .find(|s| s["id"] == id)
        .and_then(|s| s["state"].as_str())
        .unwrap_or("absent")
}

/// Every server lists every other, with its address, version and
/// incarnation; the CLI prints them as a table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_list_each_other() {
    let env = Env::new(Db::MySql).await;
    let a = env.serve_with(&["--server-id", "s-a"]);
    let b = env.serve_another(&["--server-id", "s-b"]);
    let c = env.serve_another(&["--server-id", "s-c"]);
    let list = servers_until(&b, "listed all three", |l| {
        ["s-a", "s-b", "s-c"]
            .iter()
            .all(|id| state_of(l, id) == "live")
    })
    .await;
    let me: Vec<&Value> = list.iter().filter(|s| s["this_server"] == true).collect();
    assert_eq!(me.len(), 1, "{list:?}");
    assert_eq!(me[0]["id"], "s-b");
    let sa = list.iter().find(|s| s["id"] == "s-a").unwrap();
    assert_eq!(sa["incarnation"], 1, "{sa}");
    assert_eq!(sa["version"], env!("CARGO_PKG_VERSION"), "{sa}");
    assert_eq!(
        format!("http://{}", sa["address"].as_str().unwrap()),
        a.url,
        "{sa}"
    );
    let out = c.cli(&["servers", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID"), "{text}");
    assert!(
        lines[0].contains("STATE") && lines[0].contains("LAST SEEN"),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("s-c*")),
        "this server marked: {text}"
    );
    for id in ["s-a", "s-b"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(id) && l.contains("live")),
            "{id} missing: {text}"
        );
    }
    // A server that stops says so at once.
    a.sigterm();
    servers_until(&c, "showed s-a stopped", |l| {
        state_of(l, "s-a") == "stopped"
    })
    .await;
}

/// A server SIGKILLed with actions running: once its lease has run out the
/// others declare it lost and finish its actions, each once, its
/// idempotent step run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_servers_actions_finish_on_the_others() {
    let env = Env::new(Db::MySql).await;
    let lease = ["--lease", "2s"];
    let a = env.serve_with(&[&lease[..], &["--server-id", "s-a"]].concat());
    let b = env.serve_another(&[&lease[..], &["--server-id", "s-b"]].concat());
    let _c = env.serve_another(&[&lease[..], &["--server-id", "s-c"]].concat());
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(
            b.submit("sleep", &format!("vps-{n}"), json!({ "ms": 1500 }))
                .await,
        );
    }
    for &id in &ids {
        let a = b
            .until(id, "running on s-b", |a| a["current_step"] == "sleep_ms")
            .await;
        assert_eq!(a["server"], "s-b", "{a}");
    }
    let killed = Instant::now();
    b.kill9();
    for &id in &ids {
        let done = a.finished(id).await;
        assert_eq!(done["status"], "succeeded", "{done}\n{}", a.log());
        assert_eq!(
            done["steps"][0]["attempt"], 2,
            "the interrupted idempotent step ran again, once: {done}"
        );
        assert_eq!(done["server"], Value::Null, "{done}");
    }
    // Lease (2 s) + margin + a rescue pass + the step again (1.5 s), with
    // room for a loaded machine.
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let list = servers_until(&a, "showed s-b lost", |l| state_of(l, "s-b") == "lost").await;
    assert_eq!(state_of(&list, "s-c"), "live");
    // Every action ended exactly once: one finish each, by s-a or s-c.
    let pool = env.sql().await;
    for &id in &ids {
        let (status, owner): (String, Option<String>) =
            sqlx::query_as("SELECT status, owner FROM actions WHERE id = ?")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((status.as_str(), owner), ("succeeded", None));
    }
}

/// A server frozen (SIGSTOP) past its lease loses its actions to another;
/// woken, it writes nothing more to them (the row stays as the other left
/// it), says so, and registers again as a new incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_writes_nothing_after_losing_its_lease() {
    let env = Env::new(Db::MySql).await;
    let lease = ["--lease", "1s"];
    let a = env.serve_with(&[&lease[..], &["--server-id", "s-a"]].concat());
    let b = env.serve_another(&[&lease[..], &["--server-id", "s-b"]].concat());
    let id = b.submit("sleep", "vps-1", json!({ "ms": 2500 })).await;
    b.until(id, "running on s-b", |a| a["current_step"] == "sleep_ms")
        .await;
    b.signal("STOP");
    // s-a takes it over and finishes it while s-b sleeps; s-b's step host
    // (not frozen) finishes its attempt too, its answer unread.
    let done = a.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", a.log());
    assert_eq!(done["steps"][0]["attempt"], 2, "{done}");
    let revision = done["revision"].clone();
    b.signal("CONT");
    b.log_until("no longer holds this action").await;
    b.log_until("server registered").await;
    let list = servers_until(&a, "showed s-b back", |l| {
        l.iter()
            .any(|s| s["id"] == "s-b" && s["state"] == "live" && s["incarnation"] == 2)
    })
    .await;
    assert_eq!(state_of(&list, "s-a"), "live");
    let (_, after) = a.get(&format!("/v1/actions/{id}")).await;
    assert_eq!(
        after["revision"], revision,
        "s-b wrote to the action: {after}"
    );
    assert_eq!(after["steps"], done["steps"], "{after}");
    assert_eq!(after["status"], "succeeded");
    // Rejoined, it takes work again.
    let next = b.submit("sleep", "vps-2", json!({ "ms": 1 })).await;
    assert_eq!(b.finished(next).await["status"], "succeeded");
}

/// Two live servers under one id would write each other's actions: the
/// second is refused, naming the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_with_a_taken_id_is_refused() {
    let env = Env::new(Db::MySql).await;
    let _first = env.serve_with(&["--server-id", "s-a"]);
    let said = refused(&env, &["--server-id", "s-a"]);
    assert!(
        said.contains("server id \"s-a\" is held by a live server"),
        "{said}"
    );
    assert!(said.contains("--server-id"), "says what to do: {said}");
}

/// SQLite takes one server at a time: a second one on the same file is
/// refused, pointing at MySQL/MariaDB for several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_one_sqlite_file_is_refused() {
    let env = Env::new(Db::Sqlite).await;
    let _first = env.serve();
    let said = refused(&env, &["--server-id", "other"]);
    assert!(
        said.contains("already serves this SQLite database"),
        "{said}"
    );
    assert!(said.contains("MySQL/MariaDB"), "{said}");
}

/// Without --server-id a server makes an id once and keeps it: two servers
/// on one host get two ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_keeps_the_id_it_made() {
    let env = Env::new(Db::MySql).await;
    let dir = env.dir.join("own-id");
    std::fs::create_dir_all(&dir).unwrap();
    let b = crate::harness::bundles();
    let mut args = serve_args(&env, &dir, &["--trust", &b.public_key]);
    args.extend(["--bundle".into(), b.builtin.display().to_string()]);
    let first = Server::start(&args, &dir, &[]);
    let id = std::fs::read_to_string(dir.join("server.id")).unwrap();
    let id = id.trim().to_owned();
    assert!(id.len() > 7 && id.contains('-'), "{id:?}");
    let (_, health) = first.get("/v1/health").await;
    assert_eq!(health["node"], id.as_str(), "{health}");
    first.sigterm();
    let again = Server::start(&args, &dir, &[]);
    let (_, health) = again.get("/v1/health").await;
    assert_eq!(health["node"], id.as_str(), "the same id after a restart");
    // Another server on this host, with the first one's admin token.
    std::fs::copy(dir.join("admin.token"), env.dir.join("admin.token")).unwrap();
    let other = env.serve_another(&[]);
    let list = servers_until(&other, "listed both", |l| l.len() >= 2).await;
    assert!(
        list.iter()
            .any(|s| s["id"] == id.as_str() && s["incarnation"] == 2),
        "{list:?}"
    );
}

/// A cancel sent to a server that does not run the action reaches the one
/// that does: the action ends `cancelled` within a rescue pass or two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_another_server_ends_the_action() {
    let env = Env::new(Db::MySql).await;
    let a = env.serve_with(&["--server-id", "s-a"]);
    let b = env.serve_another(&["--server-id", "s-b"]);
    let running = a.submit("sleep", "vps-1", json!({ "ms": 60000 })).await;
    a.until(running, "running on s-a", |x| {
        x["current_step"] == "sleep_ms"
    })
    .await;
    // Queued behind it, on the same server.
    let queued = a.submit("sleep", "vps-1", json!({ "ms": 1 })).await;
    let asked = Instant::now();
    for id in [queued, running] {
        let (status, body) = b
            .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    for id in [queued, running] {
        let done = a.finished(id).await;
        assert_eq!(done["status"], "cancelled", "{done}\n{}", a.log());
    }
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}\n{}", a.log());
}

/// One target's actions submitted round-robin through three servers run
/// one at a time, in the order they were submitted, whichever server
/// received each and whichever runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_targets_actions_run_one_at_a_time_in_order_across_servers() {
    let env = Env::new(Db::MySql).await;
    let servers = [
        env.serve_with(&["--server-id", "s-a"]),
        env.serve_another(&["--server-id", "s-b"]),
        env.serve_another(&["--server-id", "s-c"]),
    ];
    let mut ids = Vec::new();
    for n in 0..12 {
        let through = &servers[n % 3];
        ids.push(through.submit("sleep", "vps-1", json!({ "ms": 200 })).await);
        // Another target between them, so the servers also have other work.
        through
            .submit("sleep", &format!("vps-other-{n}"), json!({ "ms": 50 }))
            .await;
    }
    for &id in &ids {
        let done = servers[0].finished(id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let pool = env.sql().await;
    // Microseconds since the first start (one host, one clock).
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT id, \
                CAST(TIMESTAMPDIFF(MICROSECOND, '2000-01-01', started_at) AS SIGNED), \
                CAST(TIMESTAMPDIFF(MICROSECOND, '2000-01-01', finished_at) AS SIGNED) \
         FROM actions WHERE target = 'vps-1' ORDER BY started_at, id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let started: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(started, ids, "started out of submission order");
    for pair in rows.windows(2) {
        assert!(
            pair[1].1 >= pair[0].2,
            "{} started at {} before {} finished at {}",
            pair[1].0,
            pair[1].1,
            pair[0].0,
            pair[0].2
        );
    }
}

/// One line of the `marked` kind's side-effect log.
#[derive(Debug, Clone)]
struct Mark {
    event: String,
    action: i64,
    target: String,
    attempt: u64,
    /// The process that ran the step host: the server.
    ppid: u32,
    at_us: u64,
}

fn marks(dir: &std::path::Path) -> Vec<Mark> {
    let text = std::fs::read_to_string(dir.join("marks.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            Mark {
                event: v["event"].as_str().unwrap().to_owned(),
                action: v["action"].as_i64().unwrap(),
                target: v["target"].as_str().unwrap().to_owned(),
                attempt: v["attempt"].as_u64().unwrap(),
                ppid: v["ppid"].as_u64().unwrap() as u32,
                at_us: v["at_us"].as_u64().unwrap(),
            }
        })
        .collect()
}

/// Checks the side-effect log of `ids`: each action's step that is not
/// idempotent started once and ended once, and one target's steps never
/// overlapped, starting in the order of their `seq`. Returns the servers
/// (pids) that ran them.
async fn check_marks(
    env: &Env,
    dir: &std::path::Path,
    ids: &[i64],
) -> std::collections::BTreeSet<u32> {
    let all = marks(dir);
    let pool = env.sql().await;
    let seqs: std::collections::HashMap<i64, i64> =
        sqlx::query_as::<_, (i64, i64)>("SELECT id, seq FROM actions WHERE seq IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut by_target: std::collections::BTreeMap<&str, Vec<(u64, u64, i64)>> = Default::default();
    for &id in ids {
        let of: Vec<&Mark> = all.iter().filter(|m| m.action == id).collect();
        let events: Vec<(&str, u64)> = of.iter().map(|m| (m.event.as_str(), m.attempt)).collect();
        assert_eq!(events, [("start", 1), ("end", 1)], "action {id}: {of:?}");
        assert_eq!(of[0].ppid, of[1].ppid, "{of:?}");
        by_target
            .entry(&of[0].target)
            .or_default()
            .push((of[0].at_us, of[1].at_us, seqs[&id]));
    }
    for (target, mut runs) in by_target {
        runs.sort();
        for pair in runs.windows(2) {
            assert!(
                pair[1].0 >= pair[0].1,
                "{target}: a step started at {} before the one before it ended at {}",
                pair[1].0,
                pair[0].1
            );
            assert!(
                pair[1].2 > pair[0].2,
                "{target}: started out of seq order: {runs:?}"
            );
        }
    }
    all.iter().map(|m| m.ppid).collect()
}

/// Three servers share a load submitted through all of them: every action
/// succeeds, its step that is not idempotent run once (a side-effect log
/// the step writes), one target's actions never overlapping and starting
/// in order; and every server ran some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_a_load_and_run_each_step_once() {
    let env = Env::new(Db::MySql).await;
    let dir = env.dir.join("marks");
    std::fs::create_dir_all(&dir).unwrap();
    let var = format!("record_dirs={}", dir.display());
    let servers = [
        env.serve_with(&["--server-id", "s-a", "--var", &var]),
        env.serve_another(&["--server-id", "s-b", "--var", &var]),
        env.serve_another(&["--server-id", "s-c", "--var", &var]),
    ];
    let params = json!({ "dir": dir, "ms": 20 });
    let mut ids = Vec::new();
    // 90 actions on 6 targets, nine submitted at once, round-robin.
    for round in 0..10 {
        let batch = (0..9).map(|k| {
            let n = round * 9 + k;
            let (server, params) = (&servers[n % 3], params.clone());
            async move {
                server
                    .submit("marked", &format!("vps-{}", n % 6), params)
                    .await
            }
        });
        ids.extend(futures_util::future::join_all(batch).await);
    }
    for &id in &ids {
        let done = servers[id as usize % 3].finished(id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let ran_on = check_marks(&env, &dir, &ids).await;
    let pids: std::collections::BTreeSet<u32> = servers.iter().map(|s| s.pid()).collect();
    assert_eq!(ran_on, pids, "every server ran some, and only they did");
}

/// A rolling restart of three servers under load: each in turn is stopped
/// (SIGTERM: it drains and hands its actions on) and started again while
/// the others keep taking submits. Every acknowledged action succeeds, its
/// step that is not idempotent run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing() {
    let env = Env::new(Db::MySql).await;
    let dir = env.dir.join("marks");
    std::fs::create_dir_all(&dir).unwrap();
    let var = format!("record_dirs={}", dir.display());
    let flags = |id: &'static str| ["--server-id", id, "--var", var.as_str(), "--lease", "2s"];
    let mut servers = [
        Some(env.serve_with(&flags("s-a"))),
        Some(env.serve_another(&flags("s-b"))),
        Some(env.serve_another(&flags("s-c"))),
    ];
    let params = json!({ "dir": dir, "ms": 100 });
    let mut ids = Vec::new();
    let mut n = 0;
    for i in 0..3 {
        // Work on the server about to stop: running, and queued behind.
        for _ in 0..6 {
            let s = servers[i].as_ref().unwrap();
            ids.push(
                s.submit("marked", &format!("vps-{}", n % 4), params.clone())
                    .await,
            );
            n += 1;
        }
        let stopping = servers[i].take().unwrap();
        let restarted = std::thread::spawn(move || stopping.restart());
        // The others keep taking submits until it is back (bounded).
        let until = Instant::now() + Duration::from_secs(60);
        while !restarted.is_finished() {
            assert!(Instant::now() < until, "the server did not come back");
            for s in servers.iter().flatten() {
                ids.push(
                    s.submit("marked", &format!("vps-{}", n % 4), params.clone())
                        .await,
                );
                n += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        servers[i] = Some(restarted.join().unwrap());
    }
    let any = servers[0].as_ref().unwrap();
    for &id in &ids {
        let done = any.finished(id).await;
        assert_eq!(done["status"], "succeeded", "{done}\n{}", any.log());
    }
    check_marks(&env, &dir, &ids).await;
    // Each came back as a new incarnation of its id.
    let list = servers_until(any, "showed all three back", |l| {
        ["s-a", "s-b", "s-c"].iter().all(|id| {
            l.iter()
                .any(|s| s["id"] == *id && s["state"] == "live" && s["incarnation"] == 2)
        })
    })
    .await;
    assert_eq!(list.len(), 3, "{list:?}");
}

/// A rolling upgrade's middle: a newer troupe has expanded the schema (a
/// column, and a migration this version does not know) while this one
/// runs. It keeps working, starts again on that schema saying so, and a
/// second server of this version joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_runs_on_a_schema_a_newer_version_expanded() {
    let env = Env::new(Db::MySql).await;
    let a = env.serve_with(&["--server-id", "s-a"]);
    let pool = env.sql().await;
    for statement in [
        "ALTER TABLE actions ADD COLUMN added_later BIGINT NULL",
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (999999, 'from a newer troupe', 1, X'00', 1)",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let id = a.submit("sleep", "vps-1", json!({ "ms": 1 })).await;
    assert_eq!(a.finished(id).await["status"], "succeeded");
    let a = a.restart();
    a.log_until("a newer troupe migrated this database further than this version knows")
        .await;
    let id = a.submit("sleep", "vps-1", json!({ "ms": 1 })).await;
    assert_eq!(a.finished(id).await["status"], "succeeded");
    let b = env.serve_another(&["--server-id", "s-b"]);
    let id = b.submit("sleep", "vps-2", json!({ "ms": 1 })).await;
    assert_eq!(b.finished(id).await["status"], "succeeded");
}

/// A node given two servers keeps a connection to each and runs the steps
/// of actions either one owns. When the server that sent its call dies,
/// the node reports the call's result to the other: stored there if it
/// arrives before the takeover (found by the runner that follows the
/// call), handed to the follower if after. Each non-idempotent step ran
/// once and is recorded once, sealed while stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_result_reaches_the_server_that_took_its_action_over() {
    use crate::nodes::{Node, connected, join_token};
    let env = Env::new(Db::MySql).await;
    let lease = ["--lease", "2s", "--node-grace", "60s"];
    let a = env.serve_with(&[&lease[..], &["--server-id", "s-a"]].concat());
    let b = env.serve_another(&[&lease[..], &["--server-id", "s-b"]].concat());
    let token = join_token(&a, &env).await;
    let node = Node::start(
        &a,
        &token,
        "hv-17",
        &["--capability", "hypervisor=kvm", "--server", &b.url],
    );
    connected(&a, &["hv-17"], &[&node]).await;
    connected(&b, &["hv-17"], &[&node]).await;
    // Steps of actions each server owns run there (and the node holds the
    // bundle before the kill).
    for server in [&a, &b] {
        crate::nodes::runs_there(server, &node, "hv-17").await;
    }
    // One call ends after s-a takes its action over (the lease is 2 s),
    // one before: s-b is killed well within its 1.5 s.
    let late = b
        .submit("node_sleep", "vps-late", json!({ "ms": 8000 }))
        .await;
    running_on(&b, late).await;
    let submitted = Instant::now();
    let early = b
        .submit("node_sleep", "vps-early", json!({ "ms": 1500 }))
        .await;
    running_on(&b, early).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.log().matches("call received").count() < 4 {
        assert!(Instant::now() < deadline, "{}", node.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        submitted.elapsed() < Duration::from_millis(1000),
        "too slow to kill s-b before the early call ends: {:?}",
        submitted.elapsed()
    );
    b.kill9();
    for (id, ms) in [(early, 1500), (late, 8000)] {
        let done = a.finished(id).await;
        assert_eq!(
            done["status"],
            "succeeded",
            "{done}\n{}\n{}",
            node.log(),
            a.log()
        );
        assert_eq!(done["steps"][0]["attempt"], 1, "not run again: {done}");
        assert_eq!(done["steps"][0]["node"], "hv-17", "{done}");
        assert_eq!(done["steps"][0]["output"]["slept_ms"], ms, "{done}");
    }
    assert_eq!(
        node.log().matches("call received").count(),
        4,
        "each step ran once: {}",
        node.log()
    );
    let stored_here = |id: i64| {
        a.log().lines().any(|l| {
            l.contains("stored a result no runner here waits for")
                && l.contains(&format!("call={id}/0/1"))
        })
    };
    assert!(
        stored_here(early),
        "the early result was stored by s-a before it followed the call:\n{}",
        a.log()
    );
    assert!(
        !stored_here(late),
        "the late result went to s-a's runner directly:\n{}",
        a.log()
    );
    let pool = env.sql().await;
    let lost: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM action_step_attempts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(lost, 0, "no attempt was recorded lost");
    let stored: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT action_id, sealed FROM node_results WHERE node = 'hv-17'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        stored.iter().any(|(id, _)| *id == early),
        "the early result was stored: {:?}",
        stored.iter().map(|(id, _)| id).collect::<Vec<_>>()
    );
    for (_, sealed) in &stored {
        assert!(
            !String::from_utf8_lossy(sealed).contains("slept_ms"),
            "stored in the clear"
        );
    }
}

/// Waits until the action's first step runs on `server`.
async fn running_on(server: &Server, id: i64) {
    server
        .until(id, "running", |a| a["steps"][0]["status"] == "running")
        .await;
}

/// A node given one server's address (as it would be a load balancer's)
/// learns the others from its welcome and connects to each, once per
/// server however many of its addresses it has; steps of actions any
/// server owns run on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_given_one_server_connects_to_every_server() {
    use crate::nodes::{Node, connected, join_token};
    let env = Env::new(Db::MySql).await;
    let a = env.serve_with(&["--server-id", "s-a"]);
    let b = env.serve_another(&["--server-id", "s-b"]);
    let c = env.serve_another(&["--server-id", "s-c"]);
    let token = join_token(&a, &env).await;
    // A second address of s-a: one connection all the same.
    let alias = a.url.replace("127.0.0.1", "localhost");
    let node = Node::start(
        &a,
        &token,
        "hv-17",
        &["--capability", "hypervisor=kvm", "--server", &alias],
    );
    for server in [&a, &b, &c] {
        connected(server, &["hv-17"], &[&node]).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.log().contains("not connecting twice") {
        assert!(Instant::now() < deadline, "{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        node.log().matches("learned of another server").count(),
        2,
        "s-b and s-c, once each: {}",
        node.log()
    );
    for server in [&a, &b, &c] {
        crate::nodes::runs_there(server, &node, "hv-17").await;
    }
    // One connection to s-a: its registry shows the node once, and the
    // duplicate's hello never reached it.
    assert_eq!(a.log().matches("node connected").count(), 1, "{}", a.log());
}

/// A server frozen past its lease: its step host hears nothing from it for
/// the lease less a second and ends the step it runs (and itself) before
/// another server takes the action over, so the step cannot go on beside
/// its re-run there. This step is not idempotent, so it is not run again:
/// the action fails naming it, and the frozen server's attempt never
/// reaches its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_servers_steps_end_before_another_takes_them_over() {
    let env = Env::new(Db::MySql).await;
    let dir = env.dir.join("marks");
    std::fs::create_dir_all(&dir).unwrap();
    let var = format!("record_dirs={}", dir.display());
    let args = ["--lease", "3s", "--var", &var];
    let a = env.serve_with(&[&args[..], &["--server-id", "s-a"]].concat());
    let b = env.serve_another(&[&args[..], &["--server-id", "s-b"]].concat());
    let id = b
        .submit("marked", "vps-1", json!({ "dir": dir, "ms": 8000 }))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marks(&dir)
        .iter()
        .any(|m| m.action == id && m.event == "start")
    {
        assert!(Instant::now() < deadline, "the step never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    b.signal("STOP");
    let done = a.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}\n{}", a.log());
    assert!(
        done["error"].as_str().unwrap_or_default().contains("mark"),
        "{done}"
    );
    // Unwatched, the frozen server's host would write its end 8 s after
    // the start; look until well past that.
    while started.elapsed() < Duration::from_secs(11) {
        let ends: Vec<Mark> = marks(&dir)
            .into_iter()
            .filter(|m| m.action == id && m.event == "end")
            .collect();
        assert!(
            ends.is_empty(),
            "the frozen server's step went on: {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.signal("CONT");
    b.log_until("heard nothing from the server").await;
    b.log_until("server registered").await;
}
