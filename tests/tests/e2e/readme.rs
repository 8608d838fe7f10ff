//! The SQL the README offers for watching actions runs, on both databases,
//! and means what it says.

use serde_json::json;
use sqlx::Row;

use crate::harness::{Db, Env, both_dbs, workspace};

/// The README's "Watching" queries: (for which database, if one, the SQL).
fn readme_queries() -> Vec<(Option<Db>, String)> {
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let start = readme.find("Watching:").expect("a Watching section");
    let block = &readme[start..];
    let block = &block[block.find("```sql").unwrap() + 6..];
    let block = &block[..block.find("```").unwrap()];
    let mut out = Vec::new();
    let mut only = None;
    let mut sql = String::new();
    for line in block.lines() {
        if let Some(comment) = line.trim().strip_prefix("--") {
            only = if comment.contains("(MariaDB)") {
                Some(Db::MySql)
            } else if comment.contains("(SQLite)") {
                Some(Db::Sqlite)
            } else {
                None
            };
            continue;
        }
        sql.push_str(line);
        sql.push('\n');
        if line.trim_end().ends_with(';') {
            out.push((only, std::mem::take(&mut sql)));
        }
    }
    assert!(out.len() >= 5, "{out:?}");
    out
}

async fn the_readmes_sql_runs_and_means_what_it_says(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let old = server.submit("fail", "vps-old", json!({})).await;
    let new = server.submit("fail", "vps-new", json!({})).await;
    for id in [old, new] {
        assert_eq!(server.finished(id).await["status"], "failed");
    }
    // Two targets busy with a long step, with two and one actions queued
    // behind them.
    let long = json!({ "ms": 120_000 });
    let mut running = Vec::new();
    for (target, queued) in [("vps-a", 2), ("vps-b", 1)] {
        let id = server.submit("sleep", target, long.clone()).await;
        server
            .until(id, "running", |a| a["status"] == "running")
            .await;
        running.push(id);
        for _ in 0..queued {
            let id = server.submit("sleep", target, long.clone()).await;
            let (_, body) = server.get(&format!("/v1/actions/{id}")).await;
            assert_eq!(body["status"], "queued", "{body}");
        }
    }
    // One failure two hours ago, written as the server writes times.
    let pool = env.sql().await;
    let two_hours_ago = match db {
        Db::Sqlite => {
            "UPDATE actions SET finished_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now', '-2 hours') WHERE id = ?"
        }
        Db::MySql => "UPDATE actions SET finished_at = NOW(6) - INTERVAL 2 HOUR WHERE id = ?",
    };
    sqlx::query(two_hours_ago)
        .bind(old)
        .execute(&pool)
        .await
        .unwrap();

    // Each query is recognised by what it asks for and run, and what it
    // returns is checked; a query this test does not know fails it.
    let mut ran = Vec::new();
    for (only, sql) in readme_queries() {
        if only.is_some_and(|d| d != db) {
            continue;
        }
        let sql = sql.replace("action_id = 17", &format!("action_id = {new}"));
        let inner = sql.trim().trim_end_matches(';');
        let query = |wrapped: String| sqlx::query(sqlx::AssertSqlSafe(wrapped));
        if sql.contains("status = 'running'") {
            // What is running now, and where: the two busy actions, on their
            // step, started, owned by this server.
            let rows = query(format!(
                "SELECT q.id, q.kind, q.target, q.current_step, q.owner, \
                 q.started_at IS NOT NULL FROM ({inner}) q ORDER BY q.id"
            ))
            .fetch_all(&pool)
            .await
            .unwrap();
            type Running = (i64, String, String, Option<String>, Option<String>, bool);
            let got: Vec<Running> = rows
                .iter()
                .map(|r| {
                    let started = r.get::<i64, _>(5) != 0;
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), started)
                })
                .collect();
            let want: Vec<Running> = running
                .iter()
                .zip(["vps-a", "vps-b"])
                .map(|(id, target)| {
                    let s = |t: &str| t.to_owned();
                    let (step, owner) = (Some(s("sleep_ms")), Some(s("test-node")));
                    (*id, s("sleep"), s(target), step, owner, true)
                })
                .collect();
            assert_eq!(got, want, "{sql}");
            ran.push("running");
        } else if sql.contains("status = 'failed'") {
            let ids: Vec<i64> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT q.id FROM ({inner}) q")))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            assert_eq!(ids, [new], "the last hour's failures only: {sql}");
            ran.push("failures");
        } else if sql.contains("FROM action_steps") {
            // One action's steps, in order, each as it ended.
            let rows = query(format!(
                "SELECT q.name, q.status, q.error IS NULL FROM ({inner}) q"
            ))
            .fetch_all(&pool)
            .await
            .unwrap();
            let got: Vec<(String, String, bool)> = rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get::<i64, _>(2) != 0))
                .collect();
            let want = [
                ("noop", "succeeded", true),
                ("fail", "failed", false),
                ("never", "skipped", true),
            ]
            .map(|(n, s, e)| (n.to_owned(), s.to_owned(), e));
            assert_eq!(got, want, "{sql}");
            ran.push("steps");
        } else if sql.contains("status = 'queued'") {
            // Queue depth per target, deepest first.
            let rows = query(format!("SELECT * FROM ({inner}) q"))
                .fetch_all(&pool)
                .await
                .unwrap();
            let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            assert_eq!(
                got,
                [("vps-a".to_owned(), 2), ("vps-b".to_owned(), 1)],
                "{sql}"
            );
            ran.push("queue");
        } else {
            panic!("a README query this test does not check: {sql}");
        }
    }
    ran.sort();
    assert_eq!(ran, ["failures", "queue", "running", "steps"]);
}

both_dbs!(the_readmes_sql_runs_and_means_what_it_says);

/// The commands of the README's "Using it" block, run as written, one after
/// another in one directory, against MariaDB as it says. Only what stands
/// for the reader's own world is put in: the database URL, the public key
/// `keys generate` printed, the hash and ids the earlier commands made, the
/// customer server's address (a listener on loopback), and a `virsh` on the
/// PATH that only says what it would do. The server listens on a free port
/// (`TROUPE_SERVER` points the CLI at it) rather than 7878.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_using_it_block_runs_as_written() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let start = readme.find("## Using it").expect("a Using it section");
    let block = &readme[start..];
    let block = &block[block.find("```sh").unwrap() + 5..];
    let block = &block[..block.find("```").unwrap()];
    // Commands, with continued lines joined.
    let mut commands: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(commands.len() >= 10, "{commands:?}");

    let env = Env::new(Db::MySql).await;
    let dir = crate::harness::scratch_dir("readme-using-it");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let virsh = bin.join("virsh");
    std::fs::write(&virsh, "#!/bin/sh\necho \"virsh $*\"\n").unwrap();
    std::fs::set_permissions(&virsh, std::fs::Permissions::from_mode(0o755)).unwrap();
    // What the README's paths name, as a checkout after a release build.
    std::fs::create_dir_all(dir.join("target")).unwrap();
    std::os::unix::fs::symlink(crate::harness::target_dir(), dir.join("target/release")).unwrap();
    std::os::unix::fs::symlink(workspace().join("steps"), dir.join("steps")).unwrap();
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        crate::harness::target_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let customer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let customer_port = customer.local_addr().unwrap().port().to_string();

    let mut public_key = String::new();
    let mut server: Option<KillOnDrop> = None;
    let mut server_url = String::new();
    let mut action_id = String::new();
    let sh = |command: &str, server_url: &str| {
        std::process::Command::new("sh")
            .args(["-c", command])
            .current_dir(&dir)
            .env("PATH", &path)
            .env("TROUPE_SERVER", server_url)
            .output()
            .unwrap()
    };
    for command in &commands {
        let mut command = command
            .replace("ed25519:…", &public_key)
            .replace("mysql://troupe:pw@127.0.0.1:3306/troupe", &env.db_url)
            .replace("host=10.0.0.5", "host=127.0.0.1")
            .replace("port=22", &format!("port={customer_port}"))
            .replace("status 17", &format!("status {action_id}"));
        if command.contains("cancel 18") {
            // Something to cancel: a reboot whose server never comes back.
            let closed = crate::nodes::free_port();
            let out = sh(
                &format!(
                    "troupe submit reboot --target vps-124 --param host=127.0.0.1 --param-json port={closed} --json"
                ),
                &server_url,
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            command = command.replace("cancel 18", &format!("cancel {}", v["id"]));
        }
        if command.contains("<hash of 0.2.0>") {
            let list = sh("troupe bundle list --json", &server_url);
            let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
            let hash = list["bundles"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["version"] == "0.2.0")
                .and_then(|b| b["hash"].as_str())
                .unwrap_or_else(|| panic!("no 0.2.0 in {list}"))
                .to_owned();
            command = command.replace("<hash of 0.2.0>", &hash[..8]);
        }
        if command.contains("builtin-0.3.0.bundle") && !dir.join("builtin-0.3.0.bundle").exists() {
            // The reader's next release: the same bundle, version 0.3.0,
            // built and signed as the README showed.
            let manifest = std::fs::read_to_string(workspace().join("steps/builtin/bundle.toml"))
                .unwrap()
                .replace("version = \"0.2.0\"", "version = \"0.3.0\"");
            std::fs::write(dir.join("bundle-0.3.0.toml"), manifest).unwrap();
            let out = sh(
                "troupe bundle build bundle-0.3.0.toml --library target/release/libbuiltin.so --out builtin-0.3.0.bundle \
                 && troupe bundle sign builtin-0.3.0.bundle --key release.key",
                &server_url,
            );
            assert!(out.status.success(), "{}", crate::cli::text(&out));
        }
        if command.starts_with("troupe serve ") {
            let mut child = std::process::Command::new("sh")
                .args(["-c", &format!("exec {command} --listen 127.0.0.1:0")])
                .current_dir(&dir)
                .env("PATH", &path)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut first = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut first)
                .unwrap();
            server_url = first
                .strip_prefix("troupe listening on ")
                .unwrap_or_else(|| panic!("{command}: {first:?}"))
                .trim()
                .to_owned();
            server = Some(KillOnDrop(child));
            continue;
        }
        let out = sh(&command, &server_url);
        let said = crate::cli::text(&out);
        assert!(out.status.success(), "{command}:\n{said}");
        if command.starts_with("troupe keys generate") {
            public_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        if command.starts_with("troupe submit") {
            assert!(said.contains("succeeded"), "{command}:\n{said}");
            assert!(said.contains("virsh reboot vps-123"), "{command}:\n{said}");
            action_id = said
                .split_whitespace()
                .nth(1)
                .unwrap()
                .trim_end_matches(':')
                .to_owned();
        }
        if command.starts_with("troupe bundle activate") {
            assert!(
                said.contains("builtin 0.2.0 is now active, was 0.3.0"),
                "{said}"
            );
        }
    }
    assert!(server.is_some(), "the block starts a server");
    drop(customer);
}

/// A process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
