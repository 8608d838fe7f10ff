//! Someone can always administer a server: the last admin token cannot be
//! revoked, not even by two revokes racing, and an operator on the host who
//! lost every admin token makes a new one there, recorded in the audit log.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Db, Env, Server, both_dbs, troupe_bin};

async fn revoke(server: &Server, as_token: &str, id: &str) -> (StatusCode, Value) {
    server
        .request_as(
            Some(as_token),
            Method::POST,
            &format!("/v1/tokens/{id}/revoke"),
            Some("{}".into()),
        )
        .await
}

/// Creates an admin token; returns its id and text.
async fn admin_token(
    server: &Server,
    as_token: &str,
    name: &str,
    expires: Option<String>,
) -> (String, String) {
    let mut body = json!({ "name": name, "scopes": ["admin"] });
    if let Some(at) = expires {
        body["expires_at"] = json!(at);
    }
    let (status, t) = server
        .request_as(
            Some(as_token),
            Method::POST,
            "/v1/tokens",
            Some(body.to_string()),
        )
        .await;
    assert_eq!(status, 201, "{t}");
    (
        t["id"].as_str().unwrap().to_owned(),
        t["token"].as_str().unwrap().to_owned(),
    )
}

/// The id in a token's text (`troupe_<id>_<secret>`).
fn id_of(token: &str) -> String {
    token.split('_').nth(1).unwrap().to_owned()
}

/// Admin tokens not revoked, as the database holds them, by id.
async fn unrevoked_admins(env: &Env) -> Vec<String> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id, scopes FROM api_tokens WHERE revoked_at IS NULL ORDER BY id")
            .fetch_all(&env.sql().await)
            .await
            .unwrap();
    rows.into_iter()
        .filter(|(_, scopes)| scopes.split(',').any(|s| s == "admin"))
        .map(|(id, _)| id)
        .collect()
}

async fn the_last_admin_token_cannot_be_revoked(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let first = server.token.clone();
    let first_id = id_of(&first);

    // The only admin token: refused, and it still works.
    let (status, body) = revoke(&server, &first, &first_id).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "last_admin_token", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("create another admin token first"),
        "{message}"
    );
    let (status, _) = server.get("/v1/tokens").await;
    assert_eq!(status, 200, "the token was not revoked");

    // An admin token that has expired does not count as another.
    let soon = (chrono::Utc::now() + Duration::from_millis(1200)).to_rfc3339();
    let (expiring_id, expiring) = admin_token(&server, &first, "expiring", Some(soon)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = server
            .request_as(Some(&expiring), Method::GET, "/v1/tokens", None)
            .await;
        if status == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = revoke(&server, &first, &first_id).await;
    assert_eq!(status, 409, "{body}");

    // With another active admin token, it may go; then that one is the last.
    let (second_id, second) = admin_token(&server, &first, "second", None).await;
    let (status, body) = revoke(&server, &second, &first_id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["active"], false);
    let (status, body) = revoke(&server, &second, &second_id).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "last_admin_token");
    // Revoking one already revoked changes nothing and says so plainly.
    let (status, body) = revoke(&server, &second, &first_id).await;
    assert_eq!(status, 200, "{body}");
    // Other tokens are revoked as before.
    let (status, reader) = server
        .request_as(
            Some(&second),
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "reader", "scopes": ["read"] }).to_string()),
        )
        .await;
    assert_eq!(status, 201, "{reader}");
    let (status, body) = revoke(&server, &second, reader["id"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{body}");

    let mut left = vec![expiring_id, second_id];
    left.sort();
    assert_eq!(unrevoked_admins(&env).await, left);
    let audit = server
        .request_as(Some(&second), Method::GET, "/v1/audit?limit=1000", None)
        .await
        .1
        .to_string();
    assert_eq!(
        audit.matches("token.revoked").count(),
        2,
        "one entry per revoke that happened (the first token, the reader): {audit}"
    );
}

/// Two revokes of the last two admin tokens, at once: exactly one succeeds,
/// round after round, whichever commits first. Each revoke holds its
/// transaction open for a while after reading the admin tokens, so the two
/// overlap; on MariaDB they come from two servers sharing the database (one
/// server's group commits would take them one after the other).
async fn racing_revokes_leave_one_admin_token(db: Db) {
    let env = Env::new(db).await;
    let hold = [("FAILPOINTS", "store.revoke_token=sleep(300)")];
    let server = env.serve_with_env(&[], &hold);
    let second = match db {
        Db::MySql => Some(env.serve_another_with_env(&["--node-id", "other-node"], &hold)),
        Db::Sqlite => None,
    };
    let other_server = second.as_ref().unwrap_or(&server);
    let mut survivor = server.token.clone();
    for round in 0..4 {
        let (_, other) = admin_token(&server, &survivor, &format!("racer-{round}"), None).await;
        // The other server knows the new token within its refresh.
        let deadline = Instant::now() + Duration::from_secs(10);
        while other_server
            .request_as(Some(&other), Method::GET, "/v1/kinds", None)
            .await
            .0
            != 200
        {
            assert!(
                Instant::now() < deadline,
                "the other server never took the token"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (survivor_id, other_id) = (id_of(&survivor), id_of(&other));
        let (a, b) = tokio::join!(
            revoke(&server, &survivor, &survivor_id),
            revoke(other_server, &other, &other_id),
        );
        let statuses = [a.0.as_u16(), b.0.as_u16()];
        assert!(
            statuses == [200, 409] || statuses == [409, 200],
            "round {round}: {a:?} {b:?}"
        );
        if a.0 == 200 {
            survivor = other;
        }
        assert_eq!(
            unrevoked_admins(&env).await,
            vec![id_of(&survivor)],
            "round {round}"
        );
        let (status, _) = server
            .request_as(Some(&survivor), Method::GET, "/v1/tokens", None)
            .await;
        assert_eq!(status, 200, "round {round}: the survivor still works");
    }
}

/// Runs `troupe tokens create --admin` on the host, with no API token.
fn host_create(env: &Env, db: Db, extra: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(troupe_bin());
    cmd.args(["tokens", "create", "--admin"]).args(extra);
    match db {
        Db::Sqlite => cmd.args(["--data-dir", env.dir.to_str().unwrap()]),
        Db::MySql => cmd.args(["--db", &env.db_url]),
    };
    cmd.env_remove("TROUPE_TOKEN")
        .env_remove("TROUPE_TOKEN_FILE")
        .env_remove("TROUPE_DATA")
        .env_remove("TROUPE_DB")
        .env("TROUPE_SERVER", "http://127.0.0.1:9")
        .output()
        .unwrap()
}

async fn a_lost_admin_token_is_made_again_on_the_host(db: Db) {
    use std::os::unix::fs::PermissionsExt;

    let env = Env::new(db).await;
    let server = env.serve();
    // Every admin token is lost: the first one's file is gone, and the only
    // other one was never written down.
    let (_, lost) = admin_token(&server, &server.token, "lost", None).await;
    let (status, body) = revoke(&server, &lost, &id_of(&server.token)).await;
    assert_eq!(status, 200, "{body}");
    std::fs::remove_file(&server.token_file).unwrap();
    drop(lost);

    let out_file = env.dir.join("rescue.token");
    let out = host_create(
        &env,
        db,
        &["--name", "rescue", "--out", out_file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(out_file.to_str().unwrap()), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "with --out the token is not printed: {out:?}"
    );
    assert_eq!(
        std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&out_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(token.starts_with("troupe_"), "{token}");

    // The running server takes it within its token refresh.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = server
            .request_as(Some(&token), Method::GET, "/v1/tokens", None)
            .await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 401, "{body}");
        assert!(
            Instant::now() < deadline,
            "the server never took the new token"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Recorded, with who on the host made it.
    let (_, audit) = server
        .request_as(Some(&token), Method::GET, "/v1/audit", None)
        .await;
    let entry = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "token.created" && e["subject"] == id_of(&token).as_str())
        .unwrap_or_else(|| panic!("no audit entry for the new token: {audit}"))
        .clone();
    let actor = entry["actor"].as_str().unwrap();
    assert!(actor.starts_with("host:") && actor.len() > 5, "{entry}");

    // An existing file is never overwritten, and nothing is created then.
    let count = |v: &Value| v["tokens"].as_array().unwrap().len();
    let (_, before) = server
        .request_as(Some(&token), Method::GET, "/v1/tokens", None)
        .await;
    let again = host_create(
        &env,
        db,
        &["--name", "rescue-2", "--out", out_file.to_str().unwrap()],
    );
    assert!(!again.status.success(), "{again:?}");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap().trim(), token);
    let (_, after) = server
        .request_as(Some(&token), Method::GET, "/v1/tokens", None)
        .await;
    assert_eq!(count(&before), count(&after), "{after}");

    // Without --out it prints the token.
    let printed = host_create(&env, db, &["--name", "rescue-3"]);
    assert!(printed.status.success(), "{printed:?}");
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(text.trim().starts_with("troupe_"), "{text}");

    // Pointed at the wrong place, it says so and creates no database.
    let nowhere = env.dir.join("not-a-data-dir");
    std::fs::create_dir(&nowhere).unwrap();
    let wrong = std::process::Command::new(troupe_bin())
        .args(["tokens", "create", "--admin", "--name", "x", "--data-dir"])
        .arg(&nowhere)
        .env_remove("TROUPE_DB")
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "{wrong:?}");
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("no troupe database"), "{err}");
    assert_eq!(std::fs::read_dir(&nowhere).unwrap().count(), 0);
}

both_dbs!(
    the_last_admin_token_cannot_be_revoked,
    racing_revokes_leave_one_admin_token,
    a_lost_admin_token_is_made_again_on_the_host,
);
