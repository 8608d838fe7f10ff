//! Promises README.md and ARCHITECTURE.md make that no other area holds:
//! how credentials and keys are kept, what a database error tells a client,
//! revocations that reach other servers, and the way back from a lost admin
//! token.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::harness::{Db, Env, both_dbs, test_key, testkit_version};
use crate::nodes::{join_token, kvm_node};

/// SHA-256 of `text`, in hex (the bundle hash is SHA-256 too).
fn sha256_hex(text: &str) -> String {
    signing::BundleHash::of(text.as_bytes()).to_string()
}

/// The permission bits of `path`.
fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The database keeps only the SHA-256 of each whole token: no column of
/// `api_tokens` or `audit_log` holds a token's secret.
async fn token_secrets_are_stored_only_as_their_sha256(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let made = server
        .token_with("probe", &["read", "submit"], Some(&["noop1"]))
        .await;
    let pool = env.sql().await;
    let rows: Vec<(String, String, String, Option<String>, String, String)> = sqlx::query_as(
        "SELECT id, name, scopes, kinds, secret_hash, created_by FROM api_tokens ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let audit: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT actor, event, subject, detail FROM audit_log")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(!audit.is_empty(), "the token's creation is audited");
    for token in [server.token.as_str(), made.as_str()] {
        let (head, secret) = token.rsplit_once('_').unwrap();
        let id = head.strip_prefix("troupe_").unwrap();
        assert!(secret.len() >= 32, "{token}");
        let row = rows
            .iter()
            .find(|r| r.0 == id)
            .unwrap_or_else(|| panic!("no row for token {id}: {rows:?}"));
        assert_eq!(row.4, sha256_hex(token), "the hash of the whole token");
        let stored = format!("{rows:?} {audit:?}");
        assert!(
            !stored.contains(secret),
            "a token secret is stored: {stored}"
        );
    }
}

/// A database error reaches the client as `database_unavailable` with a
/// message of our own: no SQL, no table, no driver text; the details are in
/// the server's log.
async fn sql_never_leaves_the_server(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let (status, _) = server.get("/v1/audit").await;
    assert_eq!(status, 200);
    let pool = env.sql().await;
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_gone")
        .execute(&pool)
        .await
        .unwrap();
    let (status, resp) = server.get("/v1/audit").await;
    assert_eq!(status, 503, "{resp}");
    assert_eq!(resp["error"]["code"], "database_unavailable", "{resp}");
    let message = resp["error"]["message"].as_str().unwrap();
    assert_eq!(
        message, "the database is unavailable; nothing was changed, retry shortly",
        "{resp}"
    );
    let body = resp.to_string().to_lowercase();
    for sql in ["audit_log", "select", "table", "sqlx", "mysql", "sqlite"] {
        assert!(!body.contains(sql), "{sql:?} reached the client: {resp}");
    }
    // The error was the database's own, and the operator can read it.
    let log = server
        .log_until("database error while serving a request")
        .await;
    assert!(log.contains("audit_log"), "{log}");
}

/// Going back to a version whose signer was revoked is refused:
/// `409 bundle_revoked`, and the kinds stay on the version that is active.
async fn activating_a_revoked_signers_bundle_is_refused(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let key = signing::SecretKey::from_seed([42; 32]);
    let (status, resp) = server
        .post(
            "/v1/keys",
            &json!({ "public_key": key.public().to_string() }),
        )
        .await;
    assert_eq!(status, 201, "{resp}");
    let (bytes, sig) = testkit_version("0.2.0", &key);
    let (status, resp) = server.push(bytes, &sig).await;
    assert_eq!(status, 201, "{resp}");
    let revoked = resp["hash"].as_str().unwrap().to_owned();
    let (bytes, sig) = testkit_version("0.3.0", &test_key());
    let (status, resp) = server.push(bytes, &sig).await;
    assert_eq!(status, 201, "{resp}");
    let active = resp["hash"].as_str().unwrap().to_owned();
    let (status, resp) = server
        .post(
            &format!("/v1/keys/{}/revoke", key.public().id()),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");

    let (status, resp) = server
        .post(&format!("/v1/bundles/{revoked}/activate"), &json!({}))
        .await;
    assert_eq!(status, 409, "{resp}");
    assert_eq!(resp["error"]["code"], "bundle_revoked", "{resp}");
    // Refused before anything was written: no activation recorded.
    let pool = env.sql().await;
    let activated: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE event = 'bundle.activated' AND subject = ?",
    )
    .bind(&revoked)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(activated, 0, "a refused activation is not recorded");
    let id = server.submit("noop1", "vps-1", json!({})).await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(a["bundle"], active.as_str(), "{a}");
}

/// `secrets.key` and `admin.token` are the server's, `node.key` the node's:
/// each readable by its owner only. A node's cached bundles and signatures
/// are read-only (the tests run as root, where read-only stops nothing, so
/// the mode is what is checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_private_and_a_nodes_cache_read_only() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    for file in ["secrets.key", "admin.token"] {
        assert_eq!(mode(&env.dir.join(file)), 0o600, "{file}");
    }
    let token = join_token(&server, &env).await;
    let node = kvm_node(&server, &token, "hv-17").await;
    assert_eq!(mode(&node.data.join("node.key")), 0o600, "node.key");
    let id = server
        .submit("placed", "vps-1", json!({ "hypervisor": "hv-17" }))
        .await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
    let cache = node.data.join("bundles");
    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    let kept = |ext: &str| -> Vec<&std::path::PathBuf> {
        files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect()
    };
    assert_eq!(kept("bundle").len(), 1, "{files:?}");
    assert_eq!(kept("sig").len(), 1, "{files:?}");
    for file in [kept("bundle"), kept("sig")].concat() {
        assert_eq!(
            mode(file) & 0o222,
            0,
            "{} is writable: {:o}",
            file.display(),
            mode(file)
        );
    }
}

/// A token revoked on one server is refused by another sharing the
/// database soon after (README: within 2 s; allowed more here, for a loaded
/// machine, but far less than a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_another_server() {
    let env = Env::new(Db::MySql).await;
    let first = env.serve();
    let second = env.serve_another(&["--node-id", "other-node"]);
    let token = first.token_with("roaming", &["read"], None).await;
    let id = token
        .strip_prefix("troupe_")
        .unwrap()
        .split('_')
        .next()
        .unwrap();
    // The other server learns of the new token the same way.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = second
            .request_as(Some(&token), Method::GET, "/v1/actions", None)
            .await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 401);
        assert!(
            Instant::now() < deadline,
            "the second server never knew the token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, resp) = first
        .post(&format!("/v1/tokens/{id}/revoke"), &json!({}))
        .await;
    assert_eq!(status, 200, "{resp}");
    let revoked = Instant::now();
    let (status, _) = first
        .request_as(Some(&token), Method::GET, "/v1/actions", None)
        .await;
    assert_eq!(status, 401, "refused at once where it was revoked");
    loop {
        let (status, resp) = second
            .request_as(Some(&token), Method::GET, "/v1/actions", None)
            .await;
        if status == 401 {
            assert_eq!(resp["error"]["code"], "token_revoked", "{resp}");
            break;
        }
        assert_eq!(status, 200, "{resp}");
        assert!(
            revoked.elapsed() < Duration::from_secs(8),
            "still accepted {:?} after it was revoked",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every admin token lost: revoke them all in SQL and restart, and the
/// server writes a new `admin.token` that works, while the old is refused.
async fn admin_recovery_by_revoking_in_sql_and_restarting(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let lost = server.token.clone();
    let listen = server.url.trim_start_matches("http://").to_owned();
    drop(server);
    let pool = env.sql().await;
    let revoke = match db {
        Db::Sqlite => {
            "UPDATE api_tokens SET revoked_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now') WHERE scopes LIKE '%admin%'"
        }
        Db::MySql => "UPDATE api_tokens SET revoked_at = NOW(6) WHERE scopes LIKE '%admin%'",
    };
    let n = sqlx::query(revoke)
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 1, "the one admin token");
    let server = env.serve_with(&["--listen", &listen]);
    assert_ne!(server.token, lost, "a new admin.token was written");
    assert_eq!(mode(&server.token_file), 0o600);
    let (status, resp) = server
        .request_as(Some(&lost), Method::GET, "/v1/tokens", None)
        .await;
    assert_eq!(status, 401, "{resp}");
    assert_eq!(resp["error"]["code"], "token_revoked", "{resp}");
    let (status, resp) = server.get("/v1/tokens").await;
    assert_eq!(status, 200, "the new token is an admin's: {resp}");
    let (status, resp) = server
        .post("/v1/tokens", &json!({ "name": "ops", "scopes": ["admin"] }))
        .await;
    assert_eq!(status, 201, "{resp}");
}

/// An audit entry commits in the same transaction as the change it records:
/// with its write failing (the `store.audit` failure point), the change is
/// not made either, and the client hears of it.
async fn an_audit_entry_commits_with_its_change(db: Db) {
    let env = Env::new(db).await;
    // The first start writes what a new install needs (and audits it).
    drop(env.serve());
    let server = env.serve_with_env(&[], &[("FAILPOINTS", "store.audit=return")]);
    server.log_until("failure points armed").await;
    let pool = env.sql().await;
    let count = async |table: &str| -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let tables = ["audit_log", "api_tokens", "secrets", "trusted_keys"];
    let mut before = Vec::new();
    for t in tables {
        before.push(count(t).await);
    }
    let key = signing::SecretKey::from_seed([9; 32]);
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/tokens",
            json!({ "name": "ops", "scopes": ["read"] }),
        ),
        (
            Method::PUT,
            "/v1/secrets/db_password",
            json!({ "value": "hunter2" }),
        ),
        (
            Method::POST,
            "/v1/keys",
            json!({ "public_key": key.public().to_string() }),
        ),
    ] {
        let (status, resp) = server.request(method, path, Some(body.to_string())).await;
        assert!(status.is_server_error(), "{path}: {status} {resp}");
    }
    let mut after = Vec::new();
    for t in tables {
        after.push(count(t).await);
    }
    assert_eq!(after, before, "nothing of {tables:?} changed");
    let (_, tokens) = server.get("/v1/tokens").await;
    assert!(!tokens.to_string().contains("\"ops\""), "{tokens}");
}

/// A runner never starts a step whose start it could not record: with the
/// database refusing the write that starts `reboot` (the `reboot` kind's
/// second step), the action fails and the reboot command never runs. The
/// same command runs once the write goes through.
async fn a_step_whose_start_was_not_recorded_never_runs(db: Db) {
    let env = Env::new(db).await;
    let marker = env.dir.join("rebooted");
    let var = format!("reboot_command=touch {}", marker.display());
    let server = env.serve_with_env(
        &["--var", &var],
        &[("FAILPOINTS", "store.refuse_step_start=return")],
    );
    let port: u16 = server.url.rsplit(':').next().unwrap().parse().unwrap();
    let params = json!({ "host": "127.0.0.1", "port": port });
    let id = server.submit("reboot", "vps-1", params.clone()).await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "failed", "{a}");
    let error = a["error"].as_str().unwrap();
    assert!(error.contains("(injected)"), "{error}");
    assert_ne!(a["steps"][1]["status"], "succeeded", "{a}");
    assert!(!marker.exists(), "the reboot ran: {a}");
    drop(server);

    let server = env.serve_with(&["--var", &var]);
    let port: u16 = server.url.rsplit(':').next().unwrap().parse().unwrap();
    let id = server
        .submit(
            "reboot",
            "vps-1",
            json!({ "host": "127.0.0.1", "port": port }),
        )
        .await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert!(
        marker.exists(),
        "the reboot command runs when its start is recorded"
    );
}

both_dbs!(
    a_step_whose_start_was_not_recorded_never_runs,
    an_audit_entry_commits_with_its_change,
    token_secrets_are_stored_only_as_their_sha256,
    sql_never_leaves_the_server,
    activating_a_revoked_signers_bundle_is_refused,
    admin_recovery_by_revoking_in_sql_and_restarting,
);
