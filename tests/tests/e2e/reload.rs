//! Hot reload: new versions go live without a restart, running actions finish
//! on the version they started with, drained versions are unloaded, rollback
//! is an explicit activation, and revoking a signer takes effect at once.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Db, Env, Server, both_dbs, steps, test_key, testkit_version};

async fn bundle_named(server: &Server, name: &str, version: &str) -> Value {
    let (_, list) = server.get("/v1/bundles").await;
    list["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name && b["version"] == version)
        .cloned()
        .unwrap_or_else(|| panic!("no bundle {name} {version} in {list}"))
}

/// Polls a bundle until `check` holds (at most 30 s).
async fn bundle_until(
    server: &Server,
    hash: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, b) = server.get(&format!("/v1/bundles/{hash}")).await;
        if check(&b) {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "bundle {hash} never became {what}: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ran_on(action: &Value) -> (String, String, u64) {
    let out = &steps(action)[1]["output"];
    (
        out["version"].as_str().unwrap().to_owned(),
        out["bundle"].as_str().unwrap().to_owned(),
        out["pid"].as_u64().unwrap(),
    )
}

async fn new_versions_go_live_while_old_ones_finish(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let v1 = bundle_named(&server, "testkit", "0.1.0").await["hash"]
        .as_str()
        .unwrap()
        .to_owned();

    let (v2_bytes, v2_sig) = testkit_version("0.2.0", &test_key());
    // Load on v1: actions that are still running when v2 arrives.
    let mut before = Vec::new();
    for i in 0..10 {
        before.push(
            server
                .submit("sleep", &format!("pre-{i}"), json!({ "ms": 3000 }))
                .await,
        );
    }
    let (status, v2) = server.push(v2_bytes, &v2_sig).await;
    assert_eq!(status, 201, "{v2}");
    assert_eq!(v2["status"], "active");
    let v2_hash = v2["hash"].as_str().unwrap().to_owned();
    let (_, old) = server.get(&format!("/v1/bundles/{v1}")).await;
    assert_eq!(
        old["status"], "draining",
        "v1 still has actions in flight: {old}"
    );
    assert!(old["in_flight"].as_i64().unwrap() > 0);

    let mut after = Vec::new();
    for i in 0..10 {
        after.push(
            server
                .submit("sleep", &format!("post-{i}"), json!({ "ms": 50 }))
                .await,
        );
    }
    let mut v1_pid = 0;
    for id in before {
        let a = server.finished(id).await;
        assert_eq!(a["status"], "succeeded", "{a}");
        assert_eq!(a["bundle"], v1.as_str());
        let (version, hash, pid) = ran_on(&a);
        assert_eq!(
            (version.as_str(), hash.as_str()),
            ("0.1.0", v1.as_str()),
            "submitted before the push: {a}"
        );
        v1_pid = pid;
    }
    for id in after {
        let a = server.finished(id).await;
        assert_eq!(a["status"], "succeeded", "{a}");
        let (version, hash, pid) = ran_on(&a);
        assert_eq!(
            (version.as_str(), hash.as_str()),
            ("0.2.0", v2_hash.as_str()),
            "submitted after the push: {a}"
        );
        assert_ne!(pid, v1_pid, "each version runs in its own step host");
    }

    // Once its last action finished, v1 is drained and its host has exited.
    bundle_until(&server, &v1, "drained", |b| {
        b["status"] == "drained" && b["host_running"] == false
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{v1_pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "v1's step host (pid {v1_pid}) is still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Rollback is an explicit activation of a version the server holds.
    let (status, b) = server
        .post(&format!("/v1/bundles/{v1}/activate"), &json!({}))
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["status"], "active");
    let id = server
        .submit("sleep", "rollback", json!({ "ms": 10 }))
        .await;
    let a = server.finished(id).await;
    assert_eq!(ran_on(&a).0, "0.1.0", "{a}");
    bundle_until(&server, &v2_hash, "drained", |b| b["status"] == "drained").await;

    // An action can also name a held version explicitly.
    let (status, a) = server
        .post(
            "/v1/actions",
            &json!({ "kind": "version", "target": "pinned", "bundle": v2_hash }),
        )
        .await;
    assert_eq!(status, 202, "{a}");
    let a = server.finished(a["id"].as_i64().unwrap()).await;
    assert_eq!(steps(&a)[0]["output"]["version"], "0.2.0", "{a}");

    // Everything survives a restart: v1 is still the active version.
    drop(server);
    let server = env.serve();
    let (_, list) = server.get("/v1/bundles").await;
    let active: Vec<&str> = list["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["name"] == "testkit" && b["status"] == "active")
        .map(|b| b["version"].as_str().unwrap())
        .collect();
    assert_eq!(active, ["0.1.0"], "{list}");
    let (status, content) = server.get(&format!("/v1/bundles/{v2_hash}")).await;
    assert_eq!(status, 200, "{content}");
}

async fn revoking_a_signer_stops_its_bundles(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let other = signing::SecretKey::from_seed([9; 32]);
    let id = other.public().id().to_string();

    let (status, body) = server
        .request_as(
            None,
            reqwest::Method::POST,
            "/v1/keys",
            Some(json!({ "public_key": other.public().to_string() }).to_string()),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    let (status, body) = server
        .post(
            "/v1/keys",
            &json!({ "public_key": other.public().to_string() }),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let (bytes, sig) = testkit_version("0.4.0", &other);
    let (status, pushed) = server.push(bytes.clone(), &sig).await;
    assert_eq!(status, 201, "{pushed}");
    assert_eq!(pushed["signer"], id.as_str());

    let running = server.submit("sleep", "vps-r", json!({ "ms": 3000 })).await;
    server
        .until(running, "running", |a| a["current_step"] == "sleep_ms")
        .await;
    let (status, body) = server
        .post(&format!("/v1/keys/{id}/revoke"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked"], true);

    let a = server.finished(running).await;
    assert_eq!(a["status"], "failed", "{a}");
    let err = a["error"].as_str().unwrap();
    assert!(err.contains(&id) && err.contains("revoked"), "{a}");
    assert_eq!(steps(&a)[0]["status"], "succeeded");

    let hash = pushed["hash"].as_str().unwrap();
    let (_, b) = server.get(&format!("/v1/bundles/{hash}")).await;
    assert_eq!(b["status"], "revoked", "{b}");
    let (status, body) = server
        .post(
            "/v1/actions",
            &json!({ "kind": "sleep", "target": "t", "params": { "ms": 1 } }),
        )
        .await;
    assert_eq!(status, 400, "new actions cannot use it: {body}");

    // The revocation is persisted.
    drop(server);
    let server = env.serve();
    let (_, keys) = server.get("/v1/keys").await;
    let k = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(k["revoked"], true, "{keys}");
    let (newer, newer_sig) = testkit_version("0.9.0", &other);
    let (status, body) = server.push(newer, &newer_sig).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (403, Some("signature_revoked_key")),
        "{body}"
    );
}

both_dbs!(
    new_versions_go_live_while_old_ones_finish,
    revoking_a_signer_stops_its_bundles
);
