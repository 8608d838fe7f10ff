//! Concurrency limits (`[limits]` in a manifest, `serve --limit`): at most
//! `max` attempts at once hold one key, on one server and across several;
//! a waiting step says what it waits for; one key does not hold up another;
//! a target record's attribute keys a limit, and a target without it is
//! not limited; a cancel while waiting, or while holding, lets the next
//! one in; and a slot held by a server frozen past its lease is freed when
//! its action is taken over, not held for good; a `--limit` no bundle
//! declares is warned of. The side-effect log of the
//! testkit's `mark` step is the evidence: the times each attempt ran.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Db, Env, Server, both_dbs};

/// One run of a `mark` step: when it started and ended (µs), and the
/// process that ran it (its step host's parent: the server).
#[derive(Debug, Clone, Copy)]
struct Run {
    action: i64,
    start: u64,
    end: u64,
    server: u32,
}

/// The runs of `ids`, each started and ended exactly once.
fn runs(dir: &Path, ids: &[i64]) -> Vec<Run> {
    let text = std::fs::read_to_string(dir.join("marks.jsonl")).unwrap_or_default();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    ids.iter()
        .map(|&id| {
            let of: Vec<&Value> = lines.iter().filter(|l| l["action"] == id).collect();
            let events: Vec<&str> = of.iter().map(|l| l["event"].as_str().unwrap()).collect();
            assert_eq!(events, ["start", "end"], "action {id}: {of:?}");
            Run {
                action: id,
                start: of[0]["at_us"].as_u64().unwrap(),
                end: of[1]["at_us"].as_u64().unwrap(),
                server: of[0]["ppid"].as_u64().unwrap() as u32,
            }
        })
        .collect()
}

/// The most runs under way at one moment.
fn most_at_once(runs: &[Run]) -> usize {
    let mut edges: Vec<(u64, i32)> = runs
        .iter()
        .flat_map(|r| [(r.start, 1), (r.end, -1)])
        .collect();
    // An end at the moment of a start comes first: the slot was given back.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

fn overlaps(a: &[Run], b: &[Run]) -> bool {
    a.iter()
        .any(|x| b.iter().any(|y| x.start < y.end && y.start < x.end))
}

fn marks_dir(env: &Env) -> (std::path::PathBuf, String) {
    let dir = env.dir.join("marks");
    std::fs::create_dir_all(&dir).unwrap();
    let var = format!("record_dirs={}", dir.display());
    (dir, var)
}

/// Submits one action of `kind` per `(target, lane)`.
async fn submit_all(
    server: &Server,
    kind: &str,
    jobs: &[(String, String)],
    params: &Value,
) -> Vec<i64> {
    let mut ids = Vec::new();
    for (target, lane) in jobs {
        let mut p = params.clone();
        p["lane"] = json!(lane);
        ids.push(server.submit(kind, target, p).await);
    }
    ids
}

async fn all_succeed(server: &Server, ids: &[i64]) {
    for &id in ids {
        let done = server.finished(id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
}

/// Polls the actions until one's waiting step says it waits for `what`
/// (which of them waits is up to whose runner claims first).
async fn one_waits_for(server: &Server, ids: &[i64], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for id in ids {
            let (_, a) = server.get(&format!("/v1/actions/{id}")).await;
            if waiting(&a, what) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "none of {ids:?} waited for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the action is running with a step waiting for `what`.
fn waiting(a: &Value, what: &str) -> bool {
    a["status"] == "running"
        && a["waiting_for"] == what
        && a["steps"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["status"] == "waiting" && s["waiting_for"] == what)
        })
}

/// Polls the action until its waiting step says it waits for `what`.
async fn waits_for(server: &Server, id: i64, what: &str) -> Value {
    server
        .until(id, what, |a| {
            a["status"] == "running"
                && a["waiting_for"] == what
                && a["steps"].as_array().is_some_and(|s| {
                    s.iter()
                        .any(|s| s["status"] == "waiting" && s["waiting_for"] == what)
                })
        })
        .await
}

async fn one_key_lets_max_attempts_in_at_once(db: Db) {
    let env = Env::new(db).await;
    let (dir, var) = marks_dir(&env);
    // lane's max is 1 (the manifest's); the operator gives key "wide" 3.
    let server = env.serve_with(&["--var", &var, "--limit", "lane:wide=3"]);
    let params = json!({ "dir": dir, "ms": 700 });
    let jobs = |n: usize, lane: &str| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("{lane}-{i}"), lane.to_owned()))
            .collect()
    };
    let narrow_ids = submit_all(&server, "limited", &jobs(4, "narrow"), &params).await;
    let wide_ids = submit_all(&server, "limited", &jobs(5, "wide"), &params).await;
    // Those not let in yet wait, and their steps say for what.
    one_waits_for(&server, &narrow_ids, "lane limit narrow").await;
    all_succeed(&server, &narrow_ids).await;
    all_succeed(&server, &wide_ids).await;
    let (narrow_runs, wide_runs) = (runs(&dir, &narrow_ids), runs(&dir, &wide_ids));
    assert_eq!(most_at_once(&narrow_runs), 1, "{narrow_runs:?}");
    let wide_most = most_at_once(&wide_runs);
    assert!(
        (2..=3).contains(&wide_most),
        "{wide_most} at once: {wide_runs:?}"
    );
    // Keys are apart: the wide lane ran while the narrow one did.
    assert!(
        overlaps(&narrow_runs, &wide_runs),
        "{narrow_runs:?} {wide_runs:?}"
    );
    // Nothing is held once every attempt is over.
    let pool = env.sql().await;
    let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM limit_holds")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(held, 0);
}

async fn a_record_attribute_keys_a_limit_and_a_target_without_it_is_not_limited(db: Db) {
    let env = Env::new(db).await;
    let (dir, var) = marks_dir(&env);
    let server = env.serve_with(&["--var", &var]);
    // site's max is 2 (the manifest's). Each action has a lane of its own.
    for n in 0..4 {
        let (status, body) = server
            .request(
                Method::PATCH,
                &format!("/v1/targets/dc1-{n}"),
                Some(json!({ "set": { "site": "dc1" } }).to_string()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let params = json!({ "dir": dir, "ms": 700 });
    let sited: Vec<(String, String)> = (0..4)
        .map(|n| (format!("dc1-{n}"), format!("s{n}")))
        .collect();
    let free: Vec<(String, String)> = (0..4)
        .map(|n| (format!("free-{n}"), format!("f{n}")))
        .collect();
    let sited_ids = submit_all(&server, "limited", &sited, &params).await;
    let free_ids = submit_all(&server, "limited", &free, &params).await;
    one_waits_for(&server, &sited_ids, "site limit dc1").await;
    all_succeed(&server, &sited_ids).await;
    all_succeed(&server, &free_ids).await;
    let sited_runs = runs(&dir, &sited_ids);
    assert_eq!(most_at_once(&sited_runs), 2, "{sited_runs:?}");
    // No site: nothing but its own lane held it back.
    let free_runs = runs(&dir, &free_ids);
    assert!(most_at_once(&free_runs) >= 3, "{free_runs:?}");
}

async fn a_cancel_while_waiting_or_holding_lets_the_next_one_in(db: Db) {
    let env = Env::new(db).await;
    let (dir, var) = marks_dir(&env);
    let server = env.serve_with(&["--var", &var]);
    let long = json!({ "dir": dir, "ms": 60000, "lane": "c" });
    // The limited step comes second here: the first holds the slot...
    let holder = server.submit("limited_later", "c-1", long.clone()).await;
    server
        .until(holder, "its limited step running", |a| {
            a["steps"][1]["status"] == "running"
        })
        .await;
    // ...so the second waits, and is cancelled while it waits.
    let waiter = server.submit("limited_later", "c-2", long.clone()).await;
    waits_for(&server, waiter, "lane limit c").await;
    let (status, body) = server
        .post(&format!("/v1/actions/{waiter}/cancel"), &json!({}))
        .await;
    assert!(status.is_success(), "{body}");
    let done = server.finished(waiter).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["steps"][1]["status"], "cancelled", "{done}");
    // The holder is cancelled too: its slot goes back, and the next runs.
    let next = server
        .submit(
            "limited_later",
            "c-3",
            json!({ "dir": dir, "ms": 10, "lane": "c" }),
        )
        .await;
    waits_for(&server, next, "lane limit c").await;
    let (status, body) = server
        .post(&format!("/v1/actions/{holder}/cancel"), &json!({}))
        .await;
    assert!(status.is_success(), "{body}");
    assert_eq!(server.finished(holder).await["status"], "cancelled");
    let done = server.finished(next).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // The one cancelled while waiting never ran its step.
    let text = std::fs::read_to_string(dir.join("marks.jsonl")).unwrap();
    assert!(
        !text
            .lines()
            .any(|l| l.contains(&format!("\"action\":{waiter},"))),
        "{text}"
    );
}

both_dbs!(
    one_key_lets_max_attempts_in_at_once,
    a_record_attribute_keys_a_limit_and_a_target_without_it_is_not_limited,
    a_cancel_while_waiting_or_holding_lets_the_next_one_in,
);

/// Two servers share one key's single slot: their attempts never overlap,
/// and both ran some.
/// A `--limit` naming a limit no active bundle declares (a typo of
/// `lane`) is warned of at start, by name, and the server runs; the
/// declared one is not warned of.
#[tokio::test]
async fn a_limit_no_bundle_declares_is_warned_of_at_start() {
    let env = Env::new(Db::Sqlite).await;
    let (dir, var) = marks_dir(&env);
    let server = env.serve_with(&["--var", &var, "--limit", "lane=2", "--limit", "lnae:wide=3"]);
    let log = server
        .log_until("--limit lnae: no active bundle declares a limit \"lnae\"")
        .await;
    assert!(!log.contains("--limit lane:"), "{log}");
    assert_eq!(log.matches("no active bundle declares").count(), 1, "{log}");
    let id = server
        .submit(
            "limited",
            "t-1",
            json!({ "dir": dir, "ms": 1, "lane": "wide" }),
        )
        .await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_holds_across_servers() {
    let env = Env::new(Db::MySql).await;
    let (dir, var) = marks_dir(&env);
    let servers = [
        env.serve_with(&["--server-id", "s-a", "--var", &var]),
        env.serve_another(&["--server-id", "s-b", "--var", &var]),
    ];
    let params = json!({ "dir": dir, "ms": 300, "lane": "shared" });
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push((
            n % 2,
            servers[n % 2]
                .submit("limited", &format!("t-{n}"), params.clone())
                .await,
        ));
    }
    for &(s, id) in &ids {
        let done = servers[s].finished(id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let ids: Vec<i64> = ids.iter().map(|(_, id)| *id).collect();
    let all = runs(&dir, &ids);
    assert_eq!(most_at_once(&all), 1, "{all:?}");
    let by: std::collections::BTreeSet<u32> = all.iter().map(|r| r.server).collect();
    let pids: std::collections::BTreeSet<u32> = servers.iter().map(|s| s.pid()).collect();
    assert_eq!(by, pids, "both servers ran some: {all:?}");
}

/// A server frozen (SIGSTOP) while its attempt holds a key's only slot
/// loses its lease; the server that takes its action over ends that step
/// (interrupted, not idempotent) and the slot is freed with it, so an
/// action waiting on the other server runs. Thawed, the frozen server
/// writes nothing more of that action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_held_by_a_server_frozen_past_its_lease_is_freed() {
    let env = Env::new(Db::MySql).await;
    let (dir, var) = marks_dir(&env);
    let lease = ["--lease", "4s"];
    let frozen = env.serve_with(&["--server-id", "s-frozen", "--var", &var, lease[0], lease[1]]);
    let other = env.serve_another(&["--server-id", "s-other", "--var", &var, lease[0], lease[1]]);
    let holder = frozen
        .submit(
            "limited",
            "h-1",
            json!({ "dir": dir, "ms": 60000, "lane": "z" }),
        )
        .await;
    frozen
        .until(holder, "its limited step running", |a| {
            a["steps"][0]["status"] == "running"
        })
        .await;
    let waiter = other
        .submit(
            "limited",
            "w-1",
            json!({ "dir": dir, "ms": 10, "lane": "z" }),
        )
        .await;
    waits_for(&other, waiter, "lane limit z").await;
    frozen.signal("STOP");
    let frozen_at = Instant::now();
    let done = other.finished(waiter).await;
    frozen.signal("CONT");
    assert_eq!(done["status"], "succeeded", "{done}");
    // It ran only once the frozen server's lease had run out (4 s from its
    // last renewal, at most a sixth of it before the freeze).
    assert!(frozen_at.elapsed() >= Duration::from_secs(3), "{done}");
    let taken = other.finished(holder).await;
    assert_eq!(taken["status"], "failed", "{taken}");
    assert!(
        taken["error"]
            .as_str()
            .unwrap_or("")
            .contains("interrupted"),
        "{taken}"
    );
    // Thawed, the old owner changes nothing; nothing stays held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, again) = other.get(&format!("/v1/actions/{holder}")).await;
    assert_eq!(again["status"], "failed", "{again}");
    assert_eq!(again["revision"], taken["revision"], "{again}");
    let pool = env.sql().await;
    let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM limit_holds")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(held, 0);
    let run = runs(&dir, &[waiter]);
    assert_eq!(run[0].action, waiter);
}

/// When each action's first step ran, from its record (µs).
fn step_runs(actions: &[Value]) -> Vec<Run> {
    let at = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("{v}")))
            .unwrap()
            .timestamp_micros() as u64
    };
    actions
        .iter()
        .map(|a| Run {
            action: a["id"].as_i64().unwrap(),
            start: at(&a["steps"][0]["started_at"]),
            end: at(&a["steps"][0]["finished_at"]),
            server: 0,
        })
        .collect()
}

/// Twenty servers behind one Redfish BMC (sushy-tools' emulator), their
/// power states all read at once: with the hardware bundle's default of
/// one call at a time per BMC, the emulator serves one step at a time (its
/// log shows each step's two requests, the systems then the server, never
/// another's between them) and the steps never overlap; with `--limit
/// bmc=4`, up to four at once. (`status`: the emulator takes 1 to 11 s to
/// carry out a reset, which twenty in turn would spend.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_behind_one_bmc_take_turns_at_it() {
    const SERVERS: usize = 20;
    let password = "pw-limit-5d1c";
    let bmc = crate::power::Bmc::with_systems(password, SERVERS);
    let env = Env::new(Db::MySql).await;
    let bmcs = format!("bmcs={}", bmc.url);
    let trust = format!("bmc_trust={}", bmc.pinned);
    let bundle = crate::power::hardware_bundle().to_str().unwrap();
    let flags = ["--bundle", bundle, "--var", &bmcs, "--var", &trust];
    let server = env.serve_with(&flags);
    let (status, body) = server
        .request(
            Method::PUT,
            "/v1/secrets/bmc_credentials",
            Some(json!({ "value": format!("admin:{password}") }).to_string()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let read_all = async |server: &Server| -> Vec<Value> {
        let submits = (0..SERVERS).map(|n| {
            let params =
                json!({ "op": "status", "bmc": bmc.url, "system": crate::power::system(n) });
            async move { server.submit("power", &format!("srv-{n}"), params).await }
        });
        let ids = futures_util::future::join_all(submits).await;
        let mut done = Vec::new();
        for id in ids {
            let action = server.finished(id).await;
            assert_eq!(action["status"], "succeeded", "{action}\n{}", bmc.log());
            assert_eq!(
                action["steps"][0]["output"]["power_state"], "On",
                "{action}"
            );
            done.push(action);
        }
        done
    };
    // The emulator's requests from `from` on: "systems" for the
    // collection, else the server's id.
    let requests = |from: usize| -> Vec<String> {
        bmc.log()[from..]
            .lines()
            .filter_map(|l| {
                let rest = l.split(" /redfish/v1/Systems").nth(1)?;
                Some(match rest.strip_prefix('/') {
                    Some(id) => id.split(['/', ' ']).next()?.to_owned(),
                    None => "systems".to_owned(),
                })
            })
            .collect()
    };

    let reads = read_all(&server).await;
    let seen = requests(0);
    assert_eq!(seen.len(), 2 * SERVERS, "{seen:?}");
    let mut ids = std::collections::BTreeSet::new();
    for pair in seen.chunks(2) {
        assert_eq!(
            pair[0], "systems",
            "another step's request came between: {seen:?}"
        );
        assert!(pair[1] != "systems" && ids.insert(&pair[1]), "{seen:?}");
    }
    let runs = step_runs(&reads);
    assert_eq!(most_at_once(&runs), 1, "{runs:?}");

    // Four at once when the operator allows it: the same log interleaves.
    server.sigterm();
    let logged = bmc.log().len();
    let server = env.serve_with(&[&flags[..], &["--limit", "bmc=4"]].concat());
    let reads = read_all(&server).await;
    let runs = step_runs(&reads);
    let most = most_at_once(&runs);
    assert!((2..=4).contains(&most), "{most} at once: {runs:?}");
    let seen = requests(logged);
    assert!(
        seen.windows(2)
            .any(|w| w[0] == "systems" && w[1] == "systems"),
        "never interleaved: {seen:?}"
    );
}
