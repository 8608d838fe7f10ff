//! The audit log records what happened, and only that: an admin write that
//! failed, or changed nothing, leaves no entry.

use crate::cli::text;
use crate::harness::{Db, Env, Server, both_dbs, scratch_dir, troupe};

/// How many audit entries record `event`.
async fn count(server: &Server, event: &str) -> usize {
    let (status, audit) = server.get("/v1/audit?limit=1000").await;
    assert_eq!(status, 200, "{audit}");
    crate::harness::strings(&audit["entries"], "event")
        .iter()
        .filter(|e| **e == event)
        .count()
}

/// Runs the CLI as the admin; returns whether it succeeded, and what it said.
fn cli(server: &Server, args: &[&str]) -> (bool, String) {
    let out = server.cli(args);
    (out.status.success(), text(&out))
}

async fn only_what_happened_is_audited(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--goons"]);

    // Secrets: deleting one that was never set fails and is not audited;
    // deleting one that was is, once.
    let (ok, said) = cli(&server, &["secrets", "delete", "never_existed"]);
    assert!(!ok && said.contains("secret_not_found"), "{said}");
    assert_eq!(count(&server, "secret.deleted").await, 0);
    let out = std::process::Command::new(crate::harness::troupe_bin())
        .args(["secrets", "set", "bmc", "--server", &server.url])
        .env("TROUPE_TOKEN_FILE", &server.token_file)
        .stdin(std::fs::File::open("/etc/hostname").unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(cli(&server, &["secrets", "delete", "bmc"]).0);
    assert!(!cli(&server, &["secrets", "delete", "bmc"]).0);
    assert_eq!(count(&server, "secret.deleted").await, 1);
    // A secret with a bad name is refused and not audited.
    let (status, _) = server
        .request(
            reqwest::Method::PUT,
            "/v1/secrets/bad%20name",
            Some(r#"{"value":"x"}"#.into()),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(count(&server, "secret.set").await, 1);

    // Tokens: a name taken, a token revoked twice, one that does not exist.
    let created = count(&server, "token.created").await;
    assert!(
        cli(
            &server,
            &["tokens", "create", "--name", "ci", "--scope", "read"]
        )
        .0
    );
    let (ok, said) = cli(
        &server,
        &["tokens", "create", "--name", "ci", "--scope", "read"],
    );
    assert!(!ok, "{said}");
    assert_eq!(count(&server, "token.created").await, created + 1);
    let (_, list) = server.get("/v1/tokens").await;
    let id = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .and_then(|t| t["id"].as_str())
        .unwrap()
        .to_owned();
    assert!(cli(&server, &["tokens", "revoke", &id]).0);
    let (ok, said) = cli(&server, &["tokens", "revoke", &id]);
    assert!(ok && said.contains("already revoked"), "{said}");
    assert!(!cli(&server, &["tokens", "revoke", "0000000000000000"]).0);
    assert_eq!(count(&server, "token.revoked").await, 1);

    // Keys: trusted twice, revoked twice.
    let dir = scratch_dir("audit-keys");
    let key = dir.join("k.key");
    let out = troupe(&["keys", "generate", "--out", key.to_str().unwrap()]);
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(cli(&server, &["keys", "trust", &public]).0);
    assert!(cli(&server, &["keys", "trust", &public]).0);
    assert_eq!(count(&server, "key.trusted").await, 1);
    let (_, keys) = server.get("/v1/keys").await;
    let key_id = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["public_key"] == public.as_str())
        .and_then(|k| k["key_id"].as_str())
        .unwrap_or_else(|| panic!("{keys}"))
        .to_owned();
    assert!(cli(&server, &["keys", "revoke", &key_id]).0);
    let (ok, said) = cli(&server, &["keys", "revoke", &key_id]);
    assert!(ok && said.contains("already revoked"), "{said}");
    assert_eq!(count(&server, "key.revoked").await, 1);
    // A revoked key cannot be trusted again, and that is not audited.
    assert!(!cli(&server, &["keys", "trust", &public]).0);
    assert_eq!(count(&server, "key.trusted").await, 1);

    // Goons: removing none removes nothing.
    assert!(cli(&server, &["goons", "remove", "--all"]).0);
    assert!(!cli(&server, &["goons", "remove", "7"]).0);
    assert_eq!(count(&server, "goon.removed").await, 0);

    // Bundles: activating the active version changes nothing.
    let (_, bundles) = server.get("/v1/bundles").await;
    let active = bundles["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["status"] == "active")
        .and_then(|b| b["hash"].as_str())
        .unwrap()
        .to_owned();
    let (ok, said) = cli(&server, &["bundle", "activate", &active]);
    assert!(ok && said.contains("already active"), "{said}");
    assert_eq!(count(&server, "bundle.activated").await, 0);

    // Nodes: removing a node twice, accepting an accepted one.
    let token = crate::nodes::join_token(&server, &env).await;
    let _node = crate::nodes::kvm_node(&server, &token, "hv-1").await;
    let (_, node) = server.get("/v1/nodes/hv-1").await;
    let key = node["fingerprint"].as_str().unwrap().to_owned();
    let accepted = count(&server, "node.accepted").await;
    assert!(cli(&server, &["nodes", "accept", "hv-1", "--key", &key]).0);
    assert_eq!(count(&server, "node.accepted").await, accepted);
    assert!(cli(&server, &["nodes", "remove", "hv-1"]).0);
    let (ok, said) = cli(&server, &["nodes", "remove", "hv-1"]);
    assert!(ok && said.contains("already removed"), "{said}");
    assert_eq!(count(&server, "node.removed").await, 1);
    assert!(!cli(&server, &["nodes", "remove", "hv-none"]).0);
    assert_eq!(count(&server, "node.removed").await, 1);
}

both_dbs!(only_what_happened_is_audited);
