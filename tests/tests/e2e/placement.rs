//! Placement: a step that requires capabilities never runs on the app
//! server; while no connected node has them it waits (`waiting`, naming the
//! requirement), then fails after its placement timeout. A waiting step can
//! be cancelled, and, not having run, is placed again after a crash even
//! when it is not idempotent.

use serde_json::json;

use crate::harness::{Db, Env, both_dbs, steps};

async fn a_step_no_node_can_run_waits_then_fails(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let id = server
        .submit("placed", "vps-123", json!({ "hypervisor": "hv-17" }))
        .await;
    let waiting = server
        .until(id, "the second step waiting", |a| {
            a["steps"][1]["status"] == "waiting"
        })
        .await;
    assert_eq!(waiting["status"], "running", "{waiting}");
    assert_eq!(waiting["current_step"], "on_kvm", "{waiting}");
    assert_eq!(
        waiting["steps"][1]["waiting_for"], "hypervisor=kvm, node=hv-17",
        "{waiting}"
    );
    assert_eq!(waiting["steps"][1]["attempt"], 0, "it has not started");
    let shown = server.cli(&["status", &id.to_string()]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("waiting") && shown.contains("for a node with hypervisor=kvm, node=hv-17"),
        "{shown}"
    );

    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}");
    let statuses: Vec<_> = steps(&done).iter().map(|s| s["status"].clone()).collect();
    assert_eq!(statuses, ["succeeded", "failed"], "{done}");
    let error = done["steps"][1]["error"].as_str().unwrap();
    assert!(
        error.starts_with("no node with hypervisor=kvm, node=hv-17 was connected within 1.5 s"),
        "{error}"
    );
    assert!(done["steps"][1]["waiting_for"].is_null(), "{done}");
    assert_eq!(done["steps"][1]["attempt"], 0, "it never ran");

    // The target is free again.
    let next = server.submit("noop1", "vps-123", json!({})).await;
    assert_eq!(server.finished(next).await["status"], "succeeded");
}

async fn a_waiting_step_can_be_cancelled(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let id = server.submit("placed_gpu", "vps-1", json!({})).await;
    let waiting = server
        .until(id, "its first step waiting", |a| {
            a["steps"][0]["status"] == "waiting"
        })
        .await;
    assert_eq!(waiting["steps"][0]["waiting_for"], "gpu=*", "{waiting}");
    let (status, body) = server
        .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = server.finished(id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let statuses: Vec<_> = steps(&done).iter().map(|s| s["status"].clone()).collect();
    assert_eq!(statuses, ["cancelled", "skipped"], "{done}");
}

async fn a_waiting_step_is_placed_again_after_a_crash(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let id = server.submit("placed_gpu", "vps-1", json!({})).await;
    server
        .until(id, "its first step waiting", |a| {
            a["steps"][0]["status"] == "waiting"
        })
        .await;
    server.kill9();

    // Not idempotent, but it never started: it waits again instead of
    // failing as an interrupted step would.
    let server = env.serve();
    let again = server
        .until(id, "waiting again", |a| {
            a["steps"][0]["status"] == "waiting" && a["revision"].as_i64() > Some(2)
        })
        .await;
    assert_eq!(again["status"], "running", "{again}");
    assert!(again["steps"][0]["error"].is_null(), "{again}");
    assert_eq!(again["steps"][0]["waiting_for"], "gpu=*");
    let (status, body) = server
        .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(server.finished(id).await["status"], "cancelled");
}

both_dbs!(
    a_step_no_node_can_run_waits_then_fails,
    a_waiting_step_can_be_cancelled,
    a_waiting_step_is_placed_again_after_a_crash,
);
