//! Running actions: success, ordering, isolation, retries, timeouts, cancel,
//! plugin panics and crashes.

use serde_json::{Value, json};

use crate::harness::{Db, Env, both_dbs, step_statuses, steps};

async fn success_path(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let id = server.submit("noop3", "vps-1", json!({})).await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(
        a["bundle"].as_str().unwrap().len(),
        64,
        "pinned to a SHA-256: {a}"
    );
    assert_eq!(step_statuses(&a), ["succeeded"; 3]);
    for s in steps(&a) {
        assert_eq!(s["attempt"], 1);
        assert!(s["started_at"].as_str().unwrap() <= s["finished_at"].as_str().unwrap());
    }
    assert!(a["created_at"].as_str().unwrap() <= a["started_at"].as_str().unwrap());
    assert!(a["started_at"].as_str().unwrap() <= a["finished_at"].as_str().unwrap());

    // The same facts are in the public tables.
    let pool = env.sql().await;
    let (status, steps_done): (String, i64) = sqlx::query_as(
        "SELECT a.status, (SELECT COUNT(*) FROM action_steps s WHERE s.action_id = a.id AND s.status = 'succeeded') \
         FROM actions a WHERE a.id = ?",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), steps_done), ("succeeded", 3));
}

/// `POST /v1/actions?wait=…` answers with the action as it is when it
/// finishes, or when the wait runs out; a bad wait stores nothing.
async fn submit_can_wait_for_the_end(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let body = json!({ "kind": "noop3", "target": "vps-1", "params": {} });
    let (code, a) = server.post("/v1/actions?wait=30s", &body).await;
    assert_eq!(code, 202, "{a}");
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(step_statuses(&a), ["succeeded"; 3]);

    let slow = json!({ "kind": "sleep", "target": "vps-2", "params": { "ms": 3000 } });
    let (code, b) = server.post("/v1/actions?wait=100ms", &slow).await;
    assert_eq!(code, 202, "{b}");
    assert_eq!(b["status"], "running", "the wait ran out first: {b}");

    let (code, e) = server
        .post(
            "/v1/actions?wait=soon",
            &json!({ "kind": "noop3", "target": "vps-3", "params": {} }),
        )
        .await;
    assert_eq!(code, 400, "{e}");
    assert_eq!(e["error"]["code"], "invalid_query", "{e}");
    let (_, list) = server.get("/v1/actions?target=vps-3").await;
    assert_eq!(list["actions"], json!([]), "nothing stored for a bad wait");
}

/// Five actions for one target never overlap and finish in submission
/// order, while another target's actions run alongside them.
async fn same_target_runs_in_order_others_in_parallel(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let mut a_ids = Vec::new();
    let mut b_ids = Vec::new();
    for i in 0..5 {
        a_ids.push(server.submit("sleep", "vps-a", json!({ "ms": 150 })).await);
        if i < 3 {
            b_ids.push(server.submit("sleep", "vps-b", json!({ "ms": 150 })).await);
        }
    }
    let mut a_runs = Vec::new();
    for id in &a_ids {
        let a = server.finished(*id).await;
        assert_eq!(a["status"], "succeeded", "{a}");
        a_runs.push((
            a["started_at"].as_str().unwrap().to_owned(),
            a["finished_at"].as_str().unwrap().to_owned(),
        ));
    }
    for pair in a_runs.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "actions for one target overlapped: {pair:?}"
        );
    }
    let mut b_runs = Vec::new();
    for id in &b_ids {
        let b = server.finished(*id).await;
        assert_eq!(b["status"], "succeeded", "{b}");
        b_runs.push((
            b["started_at"].as_str().unwrap().to_owned(),
            b["finished_at"].as_str().unwrap().to_owned(),
        ));
    }
    let overlaps = b_runs
        .iter()
        .any(|b| a_runs.iter().any(|a| b.0 < a.1 && a.0 < b.1));
    assert!(
        overlaps,
        "the other target's actions should run alongside: a={a_runs:?} b={b_runs:?}"
    );
}

async fn a_failing_action_affects_only_itself(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let bad = server
        .submit("fail", "vps-1", json!({ "message": "disk on fire" }))
        .await;
    let good = server.submit("noop3", "vps-2", json!({})).await;
    let next_on_same_target = server.submit("noop3", "vps-1", json!({})).await;
    let a = server.finished(bad).await;
    assert_eq!(a["status"], "failed");
    assert_eq!(step_statuses(&a), ["succeeded", "failed", "skipped"]);
    assert!(a["error"].as_str().unwrap().contains("disk on fire"), "{a}");
    assert_eq!(steps(&a)[1]["error"], "disk on fire");
    assert_eq!(server.finished(good).await["status"], "succeeded");
    assert_eq!(
        server.finished(next_on_same_target).await["status"],
        "succeeded"
    );
}

async fn retryable_errors_follow_the_retry_policy(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let ok = server.submit("flaky", "vps-1", json!({})).await;
    let exhausted = server.submit("flaky_exhausted", "vps-2", json!({})).await;

    let a = server.finished(ok).await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(steps(&a)[0]["attempt"], 3);
    assert_eq!(steps(&a)[0]["output"], json!({ "succeeded_on_attempt": 3 }));

    let b = server.finished(exhausted).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert_eq!(steps(&b)[0]["attempt"], 3);
    assert!(
        b["error"].as_str().unwrap().contains("after 3 attempts"),
        "{b}"
    );

    // Each failed attempt is recorded.
    let pool = env.sql().await;
    let count = |id: i64| {
        let pool = pool.clone();
        async move {
            let (n,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM action_step_attempts WHERE action_id = ?")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            n
        }
    };
    assert_eq!(count(ok).await, 2);
    assert_eq!(count(exhausted).await, 2);
}

async fn steps_that_overrun_their_timeout_are_stopped(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    // Honours the cancel flag: stops when asked.
    let slow = server.submit("slow", "vps-1", json!({})).await;
    // Ignores it: its host is killed after the grace period.
    let hang = server.submit("hang", "vps-2", json!({})).await;
    let a = server.finished(slow).await;
    assert_eq!(a["status"], "failed");
    let err = a["error"].as_str().unwrap();
    // It stopped on the flag: its host was not killed.
    assert!(
        err.contains("timed out after 300 ms") && !err.contains("did not stop"),
        "{a}"
    );
    let b = server.finished(hang).await;
    assert_eq!(b["status"], "failed");
    let err = b["error"].as_str().unwrap();
    assert!(
        err.contains("timed out after 300 ms") && err.contains("did not stop"),
        "{b}"
    );
    // A fresh host serves what comes next.
    let after = server.submit("noop3", "vps-2", json!({})).await;
    assert_eq!(server.finished(after).await["status"], "succeeded");
}

async fn cancel_queued_and_running_actions(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let running = server
        .submit("sleep", "vps-1", json!({ "ms": 30000 }))
        .await;
    let queued = server.submit("noop3", "vps-1", json!({})).await;
    server
        .until(running, "running", |a| a["current_step"] == "sleep_ms")
        .await;

    let (status, q) = server
        .post(&format!("/v1/actions/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{q}");
    assert_eq!(
        q["status"], "cancelled",
        "a queued action is cancelled at once: {q}"
    );
    assert_eq!(step_statuses(&q), ["skipped"; 3]);

    let (status, _) = server
        .post(&format!("/v1/actions/{running}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    let r = server.finished(running).await;
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(step_statuses(&r), ["cancelled", "skipped"]);

    let (status, again) = server
        .post(&format!("/v1/actions/{running}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(again["error"]["code"], "not_cancellable");
}

async fn plugin_panic_and_abort_fail_only_their_steps(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let panics = server.submit("panic", "vps-1", json!({})).await;
    let a = server.finished(panics).await;
    assert_eq!(a["status"], "failed");
    assert_eq!(step_statuses(&a), ["succeeded", "failed"]);
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("step panicked: testkit panic step was asked to panic"),
        "{a}"
    );

    // An abort takes down its step host, failing the steps in flight there.
    // A step running meanwhile on another bundle's host is untouched.
    let release = env.dir.join("release");
    let wait = format!("while [ ! -e {} ]; do sleep 0.05; done", release.display());
    let bystander = server
        .submit("run", "vps-3", json!({ "argv": ["sh", "-c", wait] }))
        .await;
    server
        .until(bystander, "running", |a| a["current_step"] == "run_command")
        .await;
    let aborts = server.submit("abort", "vps-2", json!({})).await;
    let b = server.finished(aborts).await;
    assert_eq!(b["status"], "failed");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("step host crashed (signal 6)"),
        "{b}"
    );

    crate::faults::still_running(&server, bystander).await;
    std::fs::write(&release, "").unwrap();
    let c = server.finished(bystander).await;
    assert_eq!(c["status"], "succeeded", "a step on another host: {c}");
    // The engine carries on with a fresh host.
    let after = server.submit("noop3", "vps-2", json!({})).await;
    assert_eq!(server.finished(after).await["status"], "succeeded");
    let (status, health) = server.get("/v1/health").await;
    assert_eq!(status, 200, "{health}");
}

async fn idempotency_keys_make_resubmission_safe(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let body = json!({ "kind": "echo", "target": "vps-1", "params": { "size": 1 }, "idempotency_key": "req-42" });
    let (s1, first) = server.post("/v1/actions", &body).await;
    assert_eq!(s1, 202, "{first}");
    let (s2, second) = server.post("/v1/actions", &body).await;
    assert_eq!(s2, 200, "{second}");
    assert_eq!(first["id"], second["id"]);
    let mut other: Value = body.clone();
    other["params"]["size"] = json!(2);
    let (s3, conflict) = server.post("/v1/actions", &other).await;
    assert_eq!(s3, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "idempotency_conflict");
    let (_, list) = server.get("/v1/actions?target=vps-1").await;
    assert_eq!(list["actions"].as_array().unwrap().len(), 1, "{list}");
}

async fn list_filters_and_pages_newest_first(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let mut ids = Vec::new();
    for target in ["x-1", "x-2", "x-1", "x-1"] {
        ids.push(server.submit("noop3", target, json!({})).await);
    }
    for id in &ids {
        server.finished(*id).await;
    }
    let failed = server
        .submit("fail", "x-2", json!({ "message": "no" }))
        .await;
    server.finished(failed).await;

    let (_, all) = server.get("/v1/actions?limit=2").await;
    let page: Vec<i64> = all["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect();
    assert_eq!(page, [failed, ids[3]]);
    let before = all["next_before"].as_i64().unwrap();
    let (_, next) = server
        .get(&format!("/v1/actions?limit=2&before={before}"))
        .await;
    let page: Vec<i64> = next["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect();
    assert_eq!(page, [ids[2], ids[1]]);

    let (_, x1) = server.get("/v1/actions?target=x-1").await;
    assert_eq!(x1["actions"].as_array().unwrap().len(), 3);
    let (_, f) = server.get("/v1/actions?status=failed").await;
    assert_eq!(f["actions"][0]["id"], failed);
    assert_eq!(f["actions"].as_array().unwrap().len(), 1);
    let (_, k) = server.get("/v1/actions?kind=fail&target=x-2").await;
    assert_eq!(k["actions"].as_array().unwrap().len(), 1);
}

both_dbs!(
    success_path,
    submit_can_wait_for_the_end,
    same_target_runs_in_order_others_in_parallel,
    a_failing_action_affects_only_itself,
    retryable_errors_follow_the_retry_policy,
    steps_that_overrun_their_timeout_are_stopped,
    cancel_queued_and_running_actions,
    plugin_panic_and_abort_fail_only_their_steps,
    idempotency_keys_make_resubmission_safe,
    list_filters_and_pages_newest_first,
);
