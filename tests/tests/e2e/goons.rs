//! Goons on a real server (`troupe serve --goons`): armed over the API and
//! the CLI, they make real actions' steps misbehave, as `troupe-test`'s do
//! in `cargo test`; a server without the flag refuses them.

use serde_json::json;

use crate::cli::text;
use crate::harness::{Db, Env, strings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goons_are_off_unless_the_server_is_started_with_them() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let (status, body) = server
        .post("/v1/goons", &json!({ "step": "two", "act": "crash" }))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "goons_off", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--goons"),
        "{body}"
    );
    let out = server.cli(&["goons", "list"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--goons"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goons_make_real_steps_misbehave_until_spent_or_removed() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve_with(&["--goons"]);

    // Fail step "two" fatally, once, from the CLI.
    let add = server.cli(&[
        "goons",
        "add",
        "two",
        "--fatal",
        "disk on fire",
        "--times",
        "1",
    ]);
    assert!(add.status.success(), "{}", text(&add));
    assert!(
        text(&add).contains("goon 1 armed: two attempt 1: fail (fatal): disk on fire, 1 time"),
        "{}",
        text(&add)
    );
    let id = server.submit("noop3", "vps-1", json!({})).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"], "step \"two\" failed: disk on fire", "{done}");
    // Spent: the next action runs clean.
    let id = server.submit("noop3", "vps-1", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
    let list = server.cli(&["goons", "list"]);
    assert!(text(&list).contains("acted 1 time"), "{}", text(&list));

    // Cancel the action as its second step starts; only actions of noop3.
    let (status, goon) = server
        .post(
            "/v1/goons",
            &json!({ "step": "two", "kind": "noop3", "act": "cancel" }),
        )
        .await;
    assert_eq!(status, 201, "{goon}");
    let id = server.submit("noop3", "vps-2", json!({})).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(
        done["cancel_requested_at"].is_string(),
        "recorded as a cancel: {done}"
    );
    assert_eq!(done["steps"][0]["status"], "succeeded", "{done}");

    // Remove it by id: actions run clean again.
    let remove = server.cli(&["goons", "remove", &goon["id"].to_string()]);
    assert!(remove.status.success(), "{}", text(&remove));
    let id = server.submit("noop3", "vps-2", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");

    // A lost node on a retried idempotent step: run again, then succeeds.
    let add = server.cli(&["goons", "add", "flaky", "--lose-node", "hv-9"]);
    assert!(add.status.success(), "{}", text(&add));
    let id = server.submit("flaky", "vps-3", json!({})).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"][0]["attempt"], 3, "{done}");
    let first: (String,) = sqlx::query_as(
        "SELECT error FROM action_step_attempts WHERE action_id = ? AND attempt = 1",
    )
    .bind(id)
    .fetch_one(&env.sql().await)
    .await
    .unwrap();
    assert!(first.0.starts_with("node hv-9 went away"), "{first:?}");

    // A spent goon stays listed until removed. Everything is audited.
    let clear = server.cli(&["goons", "remove", "--all"]);
    assert!(text(&clear).contains("2 goons removed"), "{}", text(&clear));
    let (_, audit) = server.get("/v1/audit").await;
    let events = strings(&audit["entries"], "event");
    assert_eq!(
        events.iter().filter(|e| **e == "goon.added").count(),
        3,
        "{events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| **e == "goon.removed").count(),
        2,
        "{events:?}"
    );

    // A bad goon says what one looks like.
    let (status, body) = server
        .post("/v1/goons", &json!({ "step": "two", "act": "explode" }))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"crash\""),
        "{body}"
    );
}
