//! Crash safety and graceful shutdown, with a real process killed for real.

use serde_json::json;

use crate::harness::{Db, Env, both_dbs, step_statuses, steps};

/// SIGKILL mid-run: queued actions still run in order, running ones resume
/// without re-running completed steps, an interrupted step re-runs only if it
/// is idempotent, and nothing is left `running`.
async fn sigkill_then_restart_resumes_safely(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let once = server
        .submit("sleep_once", "vps-x", json!({ "ms": 5000 }))
        .await;
    let queued = server.submit("noop3", "vps-x", json!({})).await;
    let idem = server.submit("sleep", "vps-y", json!({ "ms": 3000 })).await;
    server
        .until(once, "its second step", |a| {
            a["current_step"] == "sleep_once"
        })
        .await;
    server
        .until(idem, "its first step", |a| a["current_step"] == "sleep_ms")
        .await;
    server.kill9();

    let server = env.serve();
    let a = server.finished(once).await;
    assert_eq!(a["status"], "failed", "{a}");
    let err = a["error"].as_str().unwrap();
    assert!(
        err.contains("\"sleep_once\"")
            && err.contains("interrupted")
            && err.contains("not idempotent"),
        "{a}"
    );
    assert_eq!(step_statuses(&a), ["succeeded", "failed", "skipped"]);
    assert_eq!(steps(&a)[0]["attempt"], 1, "a completed step is not re-run");

    let q = server.finished(queued).await;
    assert_eq!(q["status"], "succeeded", "{q}");
    assert!(
        q["started_at"].as_str().unwrap() >= a["finished_at"].as_str().unwrap(),
        "queued action kept its turn"
    );

    let y = server.finished(idem).await;
    assert_eq!(y["status"], "succeeded", "{y}");
    assert_eq!(
        steps(&y)[0]["attempt"],
        2,
        "the interrupted idempotent step ran again"
    );
    assert_eq!(steps(&y)[1]["attempt"], 1);

    let (_, running) = server.get("/v1/actions?status=running").await;
    assert_eq!(running["actions"].as_array().unwrap().len(), 0, "{running}");
}

async fn status_and_owner(pool: &sqlx::AnyPool, id: i64) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, owner FROM actions WHERE id = ?")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// SIGTERM lets a running step finish but starts no new one; a step that
/// outlasts the grace period is left for the next start. Either way the
/// action is left unowned and the next start completes it.
async fn sigterm_drains_then_resumes_leftovers(db: Db) {
    let env = Env::new(db).await;

    let server = env.serve();
    let short = server.submit("sleep", "vps-g", json!({ "ms": 500 })).await;
    server
        .until(short, "running", |a| a["current_step"] == "sleep_ms")
        .await;
    let status = server.sigterm();
    assert!(status.success(), "troupe exited with {status}");
    let pool = env.sql().await;
    let (s,): (String,) =
        sqlx::query_as("SELECT status FROM action_steps WHERE action_id = ? AND seq = 0")
            .bind(short)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(s, "succeeded", "the running step finished before exit");
    assert_eq!(
        status_and_owner(&pool, short).await,
        ("running".to_owned(), None),
        "its next step waits for the next start"
    );

    let server = env.serve_with(&["--shutdown-grace", "200ms"]);
    let long = server.submit("sleep", "vps-h", json!({ "ms": 3000 })).await;
    let behind = server.submit("noop3", "vps-h", json!({})).await;
    server
        .until(long, "running", |a| a["current_step"] == "sleep_ms")
        .await;
    let status = server.sigterm();
    assert!(status.success(), "troupe exited with {status}");
    assert_eq!(
        status_and_owner(&pool, long).await,
        ("running".to_owned(), None),
        "left consistent and unowned for the next start"
    );

    let server = env.serve();
    let a = server.finished(short).await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(
        steps(&a)[0]["attempt"],
        1,
        "the finished step was not run again"
    );
    assert_eq!(server.finished(long).await["status"], "succeeded");
    assert_eq!(server.finished(behind).await["status"], "succeeded");
}

/// SIGKILL in the middle of a load: every acknowledged action is still there
/// and finishes, and no step recorded as succeeded runs again.
async fn sigkill_under_load_loses_nothing_acknowledged(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let mut acked = Vec::new();
    for i in 0..60 {
        let (kind, params) = if i % 2 == 0 {
            ("noop3", json!({}))
        } else {
            ("sleep", json!({ "ms": 30 }))
        };
        acked.push(
            server
                .submit(kind, &format!("load-{}", i % 12), params)
                .await,
        );
    }
    server.kill9();

    // What the database says had finished at the moment of the kill.
    let pool = env.sql().await;
    let done_before: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT action_id, seq, attempt FROM action_steps WHERE status = 'succeeded' ORDER BY action_id, seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    let (stored,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM actions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        stored,
        acked.len() as i64,
        "every acknowledged action was stored"
    );

    let server = env.serve();
    for id in &acked {
        let a = server.finished(*id).await;
        assert_eq!(a["status"], "succeeded", "{a}");
    }
    let done_after: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT action_id, seq, attempt FROM action_steps WHERE status = 'succeeded' ORDER BY action_id, seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    for step in &done_before {
        assert!(
            done_after.contains(step),
            "step {step:?} (action, seq, attempt) ran again after the restart"
        );
    }
}

both_dbs!(
    sigkill_then_restart_resumes_safely,
    sigterm_drains_then_resumes_leftovers,
    sigkill_under_load_loses_nothing_acknowledged,
);
