//! Lists as on-call reads them: actions filtered by when they were
//! submitted, by several statuses at once and by who submitted them, on the
//! API and the CLI; what a table shows (duration, submitter, error, a step
//! waiting for a node); and `--watch`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::cli::text;
use crate::harness::{Db, Env, Server, both_dbs, troupe_bin};

/// The ids `GET /v1/actions?{query}` lists, in order.
async fn ids(server: &Server, query: &str) -> Vec<i64> {
    let (status, list) = server.get(&format!("/v1/actions?{query}")).await;
    assert_eq!(status, 200, "{query}: {list}");
    list["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect()
}

/// Moves action `id`'s submission `hours` into the past, in the format each
/// database keeps times in.
async fn backdate(env: &Env, db: Db, id: i64, hours: i64) {
    let at = chrono::Utc::now() - chrono::Duration::hours(hours);
    let text = match db {
        Db::Sqlite => at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string(),
        Db::MySql => at.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
    };
    let pool = env.sql().await;
    let done = sqlx::query("UPDATE actions SET created_at = ? WHERE id = ?")
        .bind(text)
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
}

/// Three finished actions: one submitted three hours ago by the admin that
/// succeeded, one failed submitted by `alice`, one cancelled.
struct Three {
    old: i64,
    failed: i64,
    cancelled: i64,
    /// When `failed` was submitted (RFC 3339, as the API gives it).
    failed_at: String,
}

async fn three_actions(env: &Env, db: Db, server: &Server) -> Three {
    let alice = server.token_with("alice", &["submit", "read"], None).await;
    let old = server.submit("noop3", "t-1", json!({})).await;
    server.finished(old).await;
    let body = json!({ "kind": "fail", "target": "t-2", "params": { "message": "disk full" } });
    let (status, failed) = server
        .request_as(
            Some(&alice),
            Method::POST,
            "/v1/actions",
            Some(body.to_string()),
        )
        .await;
    assert_eq!(status, 202, "{failed}");
    let failed_at = failed["created_at"].as_str().unwrap().to_owned();
    let failed = failed["id"].as_i64().unwrap();
    server.finished(failed).await;
    let cancelled = server.submit("sleep", "t-3", json!({ "ms": 60000 })).await;
    server
        .until(cancelled, "running", |a| a["status"] == "running")
        .await;
    let (status, resp) = server
        .post(&format!("/v1/actions/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(server.finished(cancelled).await["status"], "cancelled");
    backdate(env, db, old, 3).await;
    Three {
        old,
        failed,
        cancelled,
        failed_at,
    }
}

async fn list_filters_by_time_status_and_submitter(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let Three {
        old,
        failed,
        cancelled,
        failed_at,
    } = three_actions(&env, db, &server).await;

    // Several statuses, by comma or repeated.
    assert_eq!(
        ids(&server, "status=failed,cancelled").await,
        [cancelled, failed]
    );
    assert_eq!(
        ids(&server, "status=failed&status=cancelled").await,
        [cancelled, failed]
    );
    assert_eq!(ids(&server, "status=succeeded").await, [old]);
    // Who submitted it: the token's name.
    assert_eq!(ids(&server, "submitted_by=alice").await, [failed]);
    assert_eq!(ids(&server, "submitted_by=nobody").await, Vec::<i64>::new());
    // Durations mean "ago"; timestamps are RFC 3339; both ends inclusive.
    assert_eq!(ids(&server, "since=2h").await, [cancelled, failed]);
    assert_eq!(ids(&server, "until=2h").await, [old]);
    let at = failed_at.replace('+', "%2B");
    assert_eq!(
        ids(&server, &format!("since={at}")).await,
        [cancelled, failed]
    );
    assert_eq!(ids(&server, &format!("until={at}")).await, [failed, old]);
    assert_eq!(
        ids(&server, "since=4h&until=1h&status=succeeded,failed").await,
        [old]
    );
    // All together, with the older filters.
    assert_eq!(
        ids(
            &server,
            "since=2h&status=failed&submitted_by=alice&kind=fail&target=t-2"
        )
        .await,
        [failed]
    );
    // Paging keeps the filters.
    let (_, page) = server
        .get("/v1/actions?status=failed,cancelled&limit=1")
        .await;
    let before = page["next_before"].as_i64().unwrap();
    assert_eq!(
        ids(
            &server,
            &format!("status=failed,cancelled&limit=1&before={before}")
        )
        .await,
        [failed]
    );

    // Bad values are refused, saying what was wrong and what is meant.
    for (query, says) in [
        ("since=soon", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("since=5", "unit"),
        ("status=failed,bogus", "\"bogus\" is not a status"),
        ("status=", "status"),
        ("since=1h&until=2h", "after"),
        ("submitted_by=", "submitted_by"),
    ] {
        let (status, resp) = server.get(&format!("/v1/actions?{query}")).await;
        assert_eq!(status, 400, "{query}: {resp}");
        assert_eq!(resp["error"]["code"], "invalid_query", "{query}: {resp}");
        let message = resp["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{query}: {message}");
    }
    let (_, resp) = server.get("/v1/actions?since=soon").await;
    let message = resp["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("2h") && message.contains("RFC 3339"),
        "says what is meant: {message}"
    );

    // The CLI passes them on.
    let out = server.cli(&[
        "list",
        "--status",
        "failed",
        "--status",
        "cancelled",
        "--since",
        "2h",
        "--submitted-by",
        "alice",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let rows: Vec<&str> = t.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{t}");
    assert!(rows[0].trim_start().starts_with(&failed.to_string()), "{t}");
    assert!(
        rows[0].contains("alice") && rows[0].contains("disk full"),
        "{t}"
    );
    let out = server.cli(&["list", "--status", "failed,cancelled", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["actions"].as_array().unwrap().len(), 2, "{list}");
    let out = server.cli(&["list", "--until", "yesterday"]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("until") && t.contains("[invalid_query]"), "{t}");
}

/// A step waiting for a node is said so in lists, on the API and the CLI.
async fn lists_say_when_an_action_waits_for_a_node(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let id = server.submit("placed_gpu", "t-9", json!({})).await;
    server
        .until(id, "its step waiting", |a| {
            a["steps"][0]["status"] == "waiting"
        })
        .await;
    let (_, list) = server.get("/v1/actions").await;
    let a = &list["actions"][0];
    assert_eq!(a["id"], id, "{list}");
    assert_eq!(a["status"], "running", "{list}");
    assert!(a["waiting_for"].is_string(), "{list}");
    let t = text(&server.cli(&["list"]));
    let row = t.lines().nth(1).unwrap();
    assert!(row.contains("waiting for a node"), "{t}");
}

/// `list --watch` redraws when an action appears or changes, rides over a
/// server restart (saying so once), until Ctrl-C, which ends it with 130 as
/// a shell reports an interrupt.
async fn list_watch_redraws_until_interrupted(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--shutdown-grace", "200ms"]);
    let addr = server.url.trim_start_matches("http://").to_owned();
    let first = server.submit("noop3", "w-1", json!({})).await;
    server.finished(first).await;
    let mut child = Command::new(troupe_bin())
        .args(["list", "--watch", "--server", &server.url])
        .env("TROUPE_TOKEN_FILE", &server.token_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Each line of stdout and stderr as it comes, in the order read.
    let (tx, rx) = std::sync::mpsc::channel::<(bool, String)>();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut readers = Vec::new();
    for (is_err, stream) in [
        (false, Box::new(stdout) as Box<dyn std::io::Read + Send>),
        (true, Box::new(stderr)),
    ] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                if tx.send((is_err, line.unwrap_or_default())).is_err() {
                    break;
                }
            }
        }));
    }
    let (mut seen, mut errors) = (Vec::new(), Vec::new());
    let mut wait_for = |what: &dyn Fn(bool, &str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((is_err, line)) = rx.recv_timeout(Duration::from_millis(200)) {
                let hit = what(is_err, &line);
                if is_err { &mut errors } else { &mut seen }.push(line);
                if hit {
                    return;
                }
            }
        }
        panic!(
            "never printed what was awaited:\n{}\nstderr:\n{}",
            seen.join("\n"),
            errors.join("\n")
        );
    };
    let starts = |id: i64| {
        move |is_err: bool, l: &str| !is_err && l.trim_start().starts_with(&format!("{id} "))
    };
    wait_for(&starts(first));
    let second = server.submit("noop3", "w-2", json!({})).await;
    server.finished(second).await;
    wait_for(&starts(second));
    // Gone until the watcher has noticed, then back at the same address.
    assert!(server.sigterm().success());
    wait_for(&|is_err, l| is_err && l.starts_with("lost the server"));
    let server = env.serve_with(&["--listen", &addr]);
    let third = server.submit("noop3", "w-3", json!({})).await;
    server.finished(third).await;
    wait_for(&starts(third));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    // The readers end with the child's pipes; then take what they read last.
    for reader in readers {
        reader.join().unwrap();
    }
    for (is_err, line) in rx.try_iter() {
        if is_err { &mut errors } else { &mut seen }.push(line);
    }
    assert_eq!(status.code(), Some(130), "{}", seen.join("\n"));
    let stderr = errors.join("\n");
    assert_eq!(stderr.matches("lost the server").count(), 1, "{stderr}");
    assert!(stderr.contains("reconnected"), "{stderr}");
}

/// `status ID --watch` redraws the action as it changes and ends with it.
async fn status_watch_follows_to_the_end(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let id = server.submit("sleep", "w-3", json!({ "ms": 3000 })).await;
    let out = server.cli(&["status", &id.to_string(), "--watch"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let views = t.matches(&format!("action {id} ")).count();
    assert!(views >= 2, "drawn once running and again at the end:\n{t}");
    assert!(t.trim_end().lines().any(|l| l.contains("succeeded")), "{t}");
}

both_dbs!(
    list_filters_by_time_status_and_submitter,
    lists_say_when_an_action_waits_for_a_node,
    list_watch_redraws_until_interrupted,
    status_watch_follows_to_the_end,
);
