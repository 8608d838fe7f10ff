//! The trust boundary: every endpoint needs a credential with the right
//! scope, tokens are revoked and expire at once, who did what is recorded,
//! and no secret leaks into logs or answers.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Db, Env, both_dbs, test_key, testkit_version, troupe_bin};

/// Every route the server serves, the scope it needs, and a body to send.
/// A request with the scope must get past authentication; what it then
/// answers (200, 404, 422…) depends on the body, which is not the point.
pub(crate) fn routes() -> Vec<(Method, &'static str, &'static str, Option<Value>)> {
    let h = "0".repeat(64);
    let leak = |p: String| -> &'static str { Box::leak(p.into_boxed_str()) };
    vec![
        (
            Method::POST,
            "/v1/actions",
            "submit",
            Some(json!({ "kind": "noop1", "target": "scope-test" })),
        ),
        (Method::GET, "/v1/actions", "read", None),
        (Method::GET, "/v1/actions/1", "read", None),
        (Method::POST, "/v1/actions/1/cancel", "operate", None),
        (Method::GET, "/v1/actions/1/logs", "read", None),
        (Method::GET, "/v1/kinds", "read", None),
        (Method::GET, "/v1/bundles", "read", None),
        (Method::POST, "/v1/bundles", "admin", None),
        (Method::GET, leak(format!("/v1/bundles/{h}")), "read", None),
        (
            Method::GET,
            leak(format!("/v1/bundles/{h}/content")),
            "admin",
            None,
        ),
        (
            Method::POST,
            leak(format!("/v1/bundles/{h}/activate")),
            "admin",
            None,
        ),
        (Method::GET, "/v1/keys", "read", None),
        (
            Method::POST,
            "/v1/keys",
            "admin",
            Some(json!({ "public_key": "ed25519:00" })),
        ),
        (
            Method::POST,
            "/v1/keys/0011223344556677/revoke",
            "admin",
            None,
        ),
        (Method::GET, "/v1/tokens", "admin", None),
        (
            Method::POST,
            "/v1/tokens",
            "admin",
            Some(json!({ "name": "made-in-scope-test", "scopes": ["read"] })),
        ),
        (
            Method::POST,
            "/v1/tokens/0011223344556677/revoke",
            "admin",
            None,
        ),
        (Method::GET, "/v1/audit", "admin", None),
        (Method::GET, "/v1/secrets", "admin", None),
        (
            Method::PUT,
            "/v1/secrets/scope_test",
            "admin",
            Some(json!({ "value": "v" })),
        ),
        (Method::DELETE, "/v1/secrets/scope_test", "admin", None),
        (Method::GET, "/v1/targets", "read", None),
        (Method::GET, "/v1/targets/hv-x", "read", None),
        (
            Method::PUT,
            "/v1/targets/hv-x",
            "admin",
            Some(json!({ "attributes": { "rack": "r1" } })),
        ),
        (
            Method::PATCH,
            "/v1/targets/hv-x",
            "admin",
            Some(json!({ "set": { "rack": "r1" } })),
        ),
        (Method::DELETE, "/v1/targets/hv-x", "admin", None),
        (Method::GET, "/v1/goons", "admin", None),
        (
            Method::POST,
            "/v1/goons",
            "admin",
            Some(json!({ "step": "x", "act": "crash" })),
        ),
        (Method::DELETE, "/v1/goons", "admin", None),
        (Method::DELETE, "/v1/goons/1", "admin", None),
        (Method::GET, "/v1/nodes", "read", None),
        (Method::GET, "/v1/servers", "read", None),
        (Method::GET, "/v1/nodes/hv-x", "read", None),
        (Method::POST, "/v1/nodes/hv-x/accept", "admin", None),
        (Method::POST, "/v1/nodes/hv-x/remove", "admin", None),
        (Method::POST, "/v1/nodes/hv-x/drain", "admin", None),
        (
            Method::GET,
            leak(format!("/v1/nodes/bundles/{h}")),
            "join",
            None,
        ),
        (
            Method::GET,
            leak(format!("/v1/nodes/bundles/{h}/signature")),
            "join",
            None,
        ),
    ]
}

/// Which of the test tokens hold each scope (every scope but join includes
/// read; admin includes all).
fn holders(scope: &str) -> &'static [&'static str] {
    match scope {
        "read" => &["read", "submit", "operate", "admin"],
        "submit" => &["submit", "admin"],
        "operate" => &["operate", "admin"],
        "admin" => &["admin"],
        "join" => &["join", "admin"],
        _ => unreachable!(),
    }
}

async fn every_endpoint_needs_its_scope(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let mut tokens = std::collections::HashMap::new();
    for scope in ["read", "submit", "operate", "join"] {
        tokens.insert(
            scope,
            server
                .token_with(&format!("only-{scope}"), &[scope], None)
                .await,
        );
    }
    tokens.insert("admin", server.token.clone());

    for (method, path, needs, body) in routes() {
        let body = body.map(|b| b.to_string());
        let what = format!("{method} {path}");
        let (status, resp) = server
            .request_as(None, method.clone(), path, body.clone())
            .await;
        assert_eq!(status, 401, "{what} without a credential: {resp}");
        assert_eq!(resp["error"]["code"], "unauthorized", "{what}");
        let (status, resp) = server
            .request_as(
                Some("troupe_0011223344556677_nope"),
                method.clone(),
                path,
                body.clone(),
            )
            .await;
        assert_eq!(status, 401, "{what} with an unknown token: {resp}");

        for (scope, token) in &tokens {
            let (status, resp) = server
                .request_as(Some(token), method.clone(), path, body.clone())
                .await;
            if holders(needs).contains(scope) {
                assert!(
                    status != 401 && status != 403,
                    "{what} with scope {scope} was refused: {status} {resp}"
                );
            } else {
                assert_eq!(status, 403, "{what} with scope {scope}: {resp}");
                assert_eq!(
                    resp["error"]["code"],
                    format!("missing_scope_{needs}"),
                    "{what}"
                );
            }
        }
    }

    // Health stays open, but says no more than that the server lives.
    let (status, open) = server
        .request_as(None, Method::GET, "/v1/health", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(open, json!({ "status": "ok" }));
    let (status, detailed) = server
        .request_as(Some(&tokens["read"]), Method::GET, "/v1/health", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(detailed["database"]["reachable"], true, "{detailed}");
    // So do liveness and readiness, for load balancers: a status and, when
    // not ready, why; nothing else.
    for (path, want) in [
        ("/v1/health/live", json!({ "status": "ok" })),
        ("/v1/health/ready", json!({ "status": "ready" })),
    ] {
        let (status, open) = server.request_as(None, Method::GET, path, None).await;
        assert_eq!((status.as_u16(), open), (200, want), "{path}");
    }
}

async fn revoked_and_expired_tokens_are_refused_at_once(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let token = server.token_with("short-lived", &["read"], None).await;
    let (status, _) = server
        .request_as(Some(&token), Method::GET, "/v1/actions", None)
        .await;
    assert_eq!(status, 200);
    let (_, list) = server.get("/v1/tokens").await;
    let id = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "short-lived")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(token.contains(&id), "the token's text carries its id");
    let (status, revoked) = server
        .post(&format!("/v1/tokens/{id}/revoke"), &json!({}))
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["active"], false);
    let (status, resp) = server
        .request_as(Some(&token), Method::GET, "/v1/actions", None)
        .await;
    assert_eq!(status, 401, "{resp}");
    assert_eq!(resp["error"]["code"], "token_revoked");

    let expires = chrono_in(Duration::from_millis(1500));
    let (status, t) = server
        .post(
            "/v1/tokens",
            &json!({ "name": "expiring", "scopes": ["read"], "expires_at": expires }),
        )
        .await;
    assert_eq!(status, 201, "{t}");
    let expiring = t["token"].as_str().unwrap().to_owned();
    let (status, _) = server
        .request_as(Some(&expiring), Method::GET, "/v1/kinds", None)
        .await;
    assert_eq!(status, 200, "works before it expires");
    let deadline = Instant::now() + Duration::from_secs(10);
    let resp = loop {
        let (status, resp) = server
            .request_as(Some(&expiring), Method::GET, "/v1/kinds", None)
            .await;
        if status == 401 {
            break resp;
        }
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(resp["error"]["code"], "token_expired", "{resp}");

    // Bad requests for tokens: a clear error, nothing created.
    for (body, code) in [
        (json!({ "name": "x", "scopes": [] }), "invalid_request"),
        (
            json!({ "name": "x", "scopes": ["root"] }),
            "invalid_request",
        ),
        (
            json!({ "name": "has space", "scopes": ["read"] }),
            "invalid_request",
        ),
        (
            json!({ "name": "x", "scopes": ["read"], "kinds": ["noop1"] }),
            "invalid_request",
        ),
        (
            json!({ "name": "x", "scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z" }),
            "invalid_request",
        ),
        (
            json!({ "name": "short-lived", "scopes": ["read"] }),
            "token_name_taken",
        ),
    ] {
        let (status, resp) = server.post("/v1/tokens", &body).await;
        // A malformed request is the caller's mistake; a taken name, a
        // conflict with what is stored.
        let expected = if code == "token_name_taken" { 409 } else { 400 };
        assert_eq!(status, expected, "{body}: {resp}");
        assert_eq!(resp["error"]["code"], code, "{body}");
    }
    let (_, list) = server.get("/v1/tokens").await;
    assert_eq!(list["tokens"].as_array().unwrap().len(), 3, "{list}");
}

fn chrono_in(d: Duration) -> String {
    (chrono::Utc::now() + d).to_rfc3339()
}

async fn who_did_what_is_recorded(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let panel = server
        .token_with("panel", &["submit"], Some(&["noop1"]))
        .await;
    let (status, action) = server
        .request_as(
            Some(&panel),
            Method::POST,
            "/v1/actions",
            Some(json!({ "kind": "noop1", "target": "vps-1" }).to_string()),
        )
        .await;
    assert_eq!(status, 202, "{action}");
    assert_eq!(action["submitted_by"], "panel");
    let (status, refused) = server
        .request_as(
            Some(&panel),
            Method::POST,
            "/v1/actions",
            Some(json!({ "kind": "noop3", "target": "vps-1" }).to_string()),
        )
        .await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "kind_not_allowed");

    let pool = env.sql().await;
    let by: String = sqlx::query_scalar("SELECT submitted_by FROM actions WHERE id = ?")
        .bind(action["id"].as_i64().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(by, "panel");
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM actions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 1, "the refused submit stored nothing");

    // Admin changes, each recorded with who made it.
    let key = signing::SecretKey::from_seed([77; 32]);
    let (s, _) = server
        .post(
            "/v1/keys",
            &json!({ "public_key": key.public().to_string() }),
        )
        .await;
    assert_eq!(s, 201);
    let (s, _) = server
        .post(
            &format!("/v1/keys/{}/revoke", key.public().id()),
            &json!({}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, bundles) = server.get("/v1/bundles").await;
    let testkit = bundles["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "testkit")
        .unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, _) = server
        .post(&format!("/v1/bundles/{testkit}/activate"), &json!({}))
        .await;
    assert_eq!(s, 200);

    let (status, audit) = server.get("/v1/audit").await;
    assert_eq!(status, 200, "{audit}");
    let entries: Vec<(String, String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["event"].as_str().unwrap().to_owned(),
                e["subject"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let key_id = key.public().id().to_string();
    // testkit was active already: nothing changed, nothing recorded (the
    // record of a real activation: cli::pushing_and_activating_say_what_changed).
    assert!(
        !entries
            .iter()
            .any(|(_, event, _)| event == "bundle.activated"),
        "{entries:?}"
    );
    for expected in [
        ("admin", "key.revoked", key_id.as_str()),
        ("admin", "key.trusted", key_id.as_str()),
    ] {
        assert!(
            entries
                .iter()
                .any(|(a, e, s)| (a.as_str(), e.as_str(), s.as_str()) == expected),
            "{expected:?} missing from {entries:?}"
        );
    }
    for event in ["token.created", "bundle.pushed"] {
        assert!(
            entries.iter().any(|(_, e, _)| e == event),
            "{event} missing from {entries:?}"
        );
    }
    let (_, page) = server.get("/v1/audit?limit=2").await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    let next = page["next_before"].as_i64().unwrap();
    let (_, rest) = server.get(&format!("/v1/audit?before={next}")).await;
    assert_eq!(
        rest["entries"].as_array().unwrap().len(),
        entries.len() - 2,
        "{rest}"
    );
}

/// The number of actions stored.
async fn actions_stored(env: &Env) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM actions")
        .fetch_one(&env.sql().await)
        .await
        .unwrap()
}

/// Pinning a version other than the active one is a rollback, an admin's
/// act: a submit token may pin only the active version.
async fn only_an_admin_pins_a_version_that_is_not_active(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let submitter = server.token_with("panel", &["submit"], None).await;
    let hash_of = |list: &Value, version: &str| -> String {
        list["bundles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "testkit" && b["version"] == version)
            .unwrap_or_else(|| panic!("testkit {version} in {list}"))["hash"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (_, list) = server.get("/v1/bundles").await;
    let drained = hash_of(&list, "0.1.0");
    // Rolled forward from 0.1.0: 0.2.0 is pushed and becomes active.
    let (v2, v2_sig) = testkit_version("0.2.0", &test_key());
    let (status, body) = server.push(v2, &v2_sig).await;
    assert_eq!(status, 201, "{body}");
    let (_, list) = server.get("/v1/bundles").await;
    let active = hash_of(&list, "0.2.0");
    let submit = |token: String, hash: String, target: &'static str| {
        let server = &server;
        async move {
            let body = json!({ "kind": "noop1", "target": target, "bundle": hash });
            server
                .request_as(
                    Some(&token),
                    Method::POST,
                    "/v1/actions",
                    Some(body.to_string()),
                )
                .await
        }
    };

    // A submit token may name the active version.
    let (status, action) = submit(submitter.clone(), active.clone(), "vps-1").await;
    assert_eq!(status, 202, "{action}");
    assert_eq!(action["bundle"], active.as_str());
    let before = actions_stored(&env).await;

    // Not the one an admin rolled forward from.
    let (status, refused) = submit(submitter.clone(), drained.clone(), "vps-2").await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(
        refused["error"]["code"], "bundle_pin_needs_admin",
        "{refused}"
    );
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("admin") && message.contains("active"),
        "the message says why and what to do: {message}"
    );
    assert_eq!(
        actions_stored(&env).await,
        before,
        "the refused submit stored nothing"
    );

    // An admin may, and the action runs on that version.
    let (status, action) = submit(server.token.clone(), drained.clone(), "vps-3").await;
    assert_eq!(status, 202, "{action}");
    assert_eq!(action["bundle"], drained.as_str());
    let done = server.finished(action["id"].as_i64().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["bundle"], drained.as_str());
}

/// Every answer, whoever asks and whatever it says, tells browsers not to
/// guess its type and caches not to keep it.
async fn every_answer_says_nosniff_and_no_store(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let http = crate::harness::http_client();
    let mut checked = Vec::new();
    let mut requests: Vec<(Method, String, Option<Value>)> = routes()
        .into_iter()
        .map(|(method, path, _, body)| (method, path.to_owned(), body))
        .collect();
    requests.extend([
        (Method::GET, "/v1/health".to_owned(), None),
        (Method::GET, "/openapi.json".to_owned(), None),
        (Method::GET, "/no/such/route".to_owned(), None),
        (Method::GET, "/v1/nodes/connect".to_owned(), None),
        (Method::PATCH, "/v1/actions".to_owned(), None),
        (
            Method::POST,
            "/v1/tokens".to_owned(),
            Some(json!({ "name": "fresh", "scopes": ["read"] })),
        ),
    ]);
    for (method, path, body) in requests {
        for token in [None, Some(server.token.as_str())] {
            let mut req = http.request(method.clone(), format!("{}{path}", server.url));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = &body {
                req = req
                    .header("content-type", "application/json")
                    .body(body.to_string());
            }
            let resp = req.send().await.unwrap();
            let what = format!(
                "{method} {path} (credential: {}) → {}",
                token.is_some(),
                resp.status()
            );
            let headers = resp.headers();
            assert_eq!(
                headers
                    .get("x-content-type-options")
                    .map(|v| v.to_str().unwrap()),
                Some("nosniff"),
                "{what}"
            );
            assert_eq!(
                headers.get("cache-control").map(|v| v.to_str().unwrap()),
                Some("no-store"),
                "{what}"
            );
            checked.push(what);
        }
    }
    // The answer that carries a new token is among them.
    assert!(
        checked
            .iter()
            .any(|w| w.starts_with("POST /v1/tokens (credential: true) → 201")),
        "{checked:#?}"
    );
}

both_dbs!(
    every_endpoint_needs_its_scope,
    revoked_and_expired_tokens_are_refused_at_once,
    who_did_what_is_recorded,
    only_an_admin_pins_a_version_that_is_not_active,
    every_answer_says_nosniff_and_no_store,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_or_an_answer() {
    use std::os::unix::fs::PermissionsExt;

    let env = Env::new(Db::Sqlite).await;
    let server = env.serve_with(&["--admin-token", "legacy-admin-secret-value"]);
    assert_eq!(
        std::fs::metadata(&server.token_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "the first admin token is readable by its owner only"
    );
    // The deprecated --admin-token still works, as an admin token.
    let (status, body) = server
        .request_as(
            Some("legacy-admin-secret-value"),
            Method::GET,
            "/v1/tokens",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let text = body.to_string();
    assert!(!text.contains(&server.token) && !text.contains("legacy-admin-secret-value"));

    // A wrong secret for a real token id: refused, and the log names the id only.
    let (id_part, _) = server.token.rsplit_once('_').unwrap();
    let wrong = format!("{id_part}_{}", "f".repeat(64));
    let (status, _) = server
        .request_as(Some(&wrong), Method::GET, "/v1/actions", None)
        .await;
    assert_eq!(status, 401);
    let made = server.token_with("made", &["read"], None).await;
    let (status, _) = server
        .request_as(Some(&made), Method::GET, "/v1/actions", None)
        .await;
    assert_eq!(status, 200);
    let log = server
        .log_until("refused a request with a bad credential")
        .await;
    for secret in [
        server.token.as_str(),
        wrong.as_str(),
        made.as_str(),
        "legacy-admin-secret-value",
    ] {
        let (_, secret_part) = secret.rsplit_once('_').unwrap_or(("", secret));
        assert!(!log.contains(secret_part), "the log holds a secret:\n{log}");
    }

    // A restart keeps the first token: it is not rotated behind the operator's back.
    let first = server.token.clone();
    drop(server);
    let again = env.serve();
    assert_eq!(again.token, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_tokens_and_says_what_is_missing() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let out = server.cli(&[
        "tokens",
        "create",
        "--name",
        "panel",
        "--scope",
        "submit",
        "--kinds",
        "noop1,noop3",
        "--expires-in",
        "30d",
    ]);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("troupe_"), "{token}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shown only now"), "{stderr}");

    let submit = std::process::Command::new(troupe_bin())
        .args([
            "submit",
            "noop1",
            "--target",
            "t",
            "--wait",
            "--server",
            &server.url,
        ])
        .env("TROUPE_TOKEN", &token)
        .output()
        .unwrap();
    assert!(submit.status.success(), "{submit:?}");

    let list = server.cli(&["tokens", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("panel") && text.contains("submit (kinds: noop1,noop3)"),
        "{text}"
    );
    assert!(!text.contains(&token), "a listing never shows a secret");
    let id = text
        .lines()
        .find(|l| l.contains("panel"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let revoke = server.cli(&["tokens", "revoke", id]);
    assert!(revoke.status.success(), "{revoke:?}");

    let refused = std::process::Command::new(troupe_bin())
        .args(["list", "--server", &server.url])
        .env("TROUPE_TOKEN", &token)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("was revoked") && err.contains("token_revoked"),
        "{err}"
    );

    // No credential at all: the error says where to get one.
    let none = std::process::Command::new(troupe_bin())
        .args(["list", "--server", &server.url])
        .current_dir(&env.dir)
        .env_remove("TROUPE_TOKEN")
        .env_remove("TROUPE_TOKEN_FILE")
        .env_remove("TROUPE_DATA")
        .output()
        .unwrap();
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("no API token was given") && err.contains("--token-file"),
        "{err}"
    );

    let audit = server.cli(&["audit"]);
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(
        text.contains("token.created") && text.contains("token.revoked"),
        "{text}"
    );
}
