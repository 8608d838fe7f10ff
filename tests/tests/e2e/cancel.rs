//! A cancel that was answered `202` sticks: it is recorded before the
//! answer, and every path honours it — a crash, a shutdown, a retry's
//! backoff, a database write that fails after the action left the queue.

use serde_json::json;

use crate::harness::{Db, Env, Server, both_dbs};

/// Starts a 4 s step that ignores cancellation and cancels its action once
/// the step runs; the cancel is answered `202`, recorded.
async fn cancel_a_stubborn_step(server: &Server) -> i64 {
    let id = server
        .submit("stubborn", "vps-1", json!({ "ms": 4000 }))
        .await;
    server
        .until(id, "running", |a| a["current_step"] == "stubborn")
        .await;
    let (status, resp) = server
        .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{resp}");
    assert!(resp["cancel_requested_at"].is_string(), "{resp}");
    id
}

/// The cancel is accepted while the step ignores it; the server dies
/// before the step ends. After the restart the action ends `cancelled`,
/// and its step is not run again.
async fn a_cancel_survives_a_crash(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let id = cancel_a_stubborn_step(&server).await;
    server.kill9();

    let server = env.serve();
    let a = server.finished(id).await;
    assert_eq!(a["status"], "cancelled", "{a}");
    assert_eq!(a["steps"][0]["status"], "cancelled", "{a}");
    assert_eq!(a["steps"][0]["attempt"], 1, "not run again: {a}");
    assert_eq!(a["steps"][1]["status"], "skipped", "{a}");
}

/// A cancel accepted just before a shutdown whose grace runs out does not
/// become a pause: the action does not run again on the next start.
async fn a_cancel_survives_a_shutdown(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--shutdown-grace", "300ms"]);
    let id = cancel_a_stubborn_step(&server).await;
    assert!(server.sigterm().success());

    let server = env.serve();
    let a = server.finished(id).await;
    assert_eq!(a["status"], "cancelled", "{a}");
    assert_eq!(a["steps"][0]["attempt"], 1, "not run again: {a}");
}

/// Cancelled while waiting to retry: the action and its step both end
/// `cancelled`, at once.
async fn a_cancel_during_a_retry_backoff_ends_the_step(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let id = server.submit("flaky_slow", "vps-1", json!({})).await;
    // The first attempt fails at once; the retry waits 5 s.
    server
        .until(id, "its first attempt failed", |a| {
            a["steps"][0]["attempt"] == 1 && a["steps"][0]["error"].is_string()
        })
        .await;
    let (status, _) = server
        .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    let a = server.finished(id).await;
    assert_eq!(a["status"], "cancelled", "{a}");
    assert_eq!(a["steps"][0]["status"], "cancelled", "{a}");
    assert_eq!(a["steps"][0]["attempt"], 1, "{a}");
}

/// The write that ends a queued action fails after Control let go of it:
/// the cancel was recorded first, so the answer is still `202` and the
/// action still ends `cancelled` rather than sitting `queued`.
async fn a_cancel_whose_last_write_fails_still_ends_the_action(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(&[], &[("FAILPOINTS", "store.cancel_queued=1*return->off")]);
    let first = server.submit("sleep", "vps-1", json!({ "ms": 1500 })).await;
    let queued = server.submit("noop1", "vps-1", json!({})).await;
    let (_, a) = server.get(&format!("/v1/actions/{queued}")).await;
    assert_eq!(a["status"], "queued");
    let (status, resp) = server
        .post(&format!("/v1/actions/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{resp}");
    assert!(
        server.log().contains("(injected)"),
        "the failure point fired: {}",
        server.log()
    );
    let a = server.finished(queued).await;
    assert_eq!(a["status"], "cancelled", "{a}");
    assert_eq!(a["steps"][0]["status"], "skipped", "it never ran: {a}");
    assert_eq!(server.finished(first).await["status"], "succeeded");
}

both_dbs!(
    a_cancel_survives_a_crash,
    a_cancel_survives_a_shutdown,
    a_cancel_during_a_retry_backoff_ends_the_step,
    a_cancel_whose_last_write_fails_still_ends_the_action,
);
