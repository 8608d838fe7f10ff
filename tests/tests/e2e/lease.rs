//! Leases: a server keeps the actions it runs by renewing its lease,
//! through a shutdown's drain too; a lease that ran out lets another server
//! take the action over.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Db, Env, both_dbs};

/// A server that dies stops renewing: once the lease has run out, another
/// server (another node id) resumes the action when it starts.
async fn an_expired_lease_lets_another_server_resume(db: Db) {
    let env = Env::new(db).await;
    let first = env.serve_with(&["--lease", "1s"]);
    let id = first.submit("sleep", "vps-1", json!({ "ms": 3000 })).await;
    first
        .until(id, "running", |a| a["current_step"] == "sleep_ms")
        .await;
    first.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = env.serve_with(&["--lease", "1s", "--node-id", "other-node"]);
    let a = second.finished(id).await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(
        a["steps"][0]["attempt"], 2,
        "the idempotent step ran again: {a}"
    );
}

/// A draining server still renews: another server starting meanwhile does
/// not take the action (which would run a non-idempotent step twice, or
/// fail it as interrupted); it ends once, on its first attempt. (MariaDB:
/// SQLite takes one server at a time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_keeps_its_leases() {
    let env = Env::new(Db::MySql).await;
    let first = env.serve_with(&["--lease", "1s", "--shutdown-grace", "120s"]);
    // run_command is not idempotent; this one ends when the test says so.
    let release = env.dir.join("release");
    let wait = format!("while [ ! -e {} ]; do sleep 0.05; done", release.display());
    let id = first
        .submit("run", "vps-1", json!({ "argv": ["sh", "-c", wait] }))
        .await;
    first
        .until(id, "running", |a| a["current_step"] == "run_command")
        .await;
    first.signal("TERM");
    // Three lease lengths into the drain.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = env.serve_another(&["--lease", "1s", "--node-id", "other-node"]);
    // The second server looked for stranded actions as it started, while
    // this one was still running: otherwise there was nothing to take.
    let (_, a) = second.get(&format!("/v1/actions/{id}")).await;
    assert_eq!(
        a["status"],
        "running",
        "the step ended before the second server started: {a}\n{}",
        second.log()
    );
    std::fs::write(&release, "").unwrap();
    let a = second.finished(id).await;
    assert_eq!(a["status"], "succeeded", "{a}\n{}", second.log());
    assert_eq!(a["steps"][0]["attempt"], 1, "{a}");
    drop(first);
}

both_dbs!(an_expired_lease_lets_another_server_resume);
