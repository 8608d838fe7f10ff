//! The database goes away under load and comes back: a MariaDB of the
//! test's own, SIGKILLed and restarted while clients submit. Nothing
//! acknowledged or stored may be lost or left unrun.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Env, scratch_dir};

/// A MariaDB server for one test, which the test may kill and restart.
struct PrivateMariaDb {
    dir: PathBuf,
    port: u16,
    server: Child,
}

fn find(names: &[&str]) -> PathBuf {
    for name in names {
        for dir in std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .chain(["/usr/sbin", "/usr/bin"])
        {
            let path = PathBuf::from(dir).join(name);
            if path.is_file() {
                return path;
            }
        }
    }
    panic!("none of {names:?} is installed (bash tests/run installs mariadb-server)");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl PrivateMariaDb {
    fn start() -> PrivateMariaDb {
        let dir = scratch_dir("private-mariadb");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut install = Command::new(find(&["mariadb-install-db", "mysql_install_db"]));
        install.args([
            "--no-defaults",
            &format!("--datadir={}", dir.join("data").display()),
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ]);
        if is_root() {
            install.arg("--user=root");
        }
        let out = install.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = Self::spawn(&dir, port);
        let db = PrivateMariaDb { dir, port, server };
        db.wait_ready();
        db.sql(
            "CREATE USER 'troupe'@'127.0.0.1' IDENTIFIED BY 'troupe'; \
             CREATE DATABASE troupe; GRANT ALL ON troupe.* TO 'troupe'@'127.0.0.1';",
        );
        db
    }

    fn spawn(dir: &std::path::Path, port: u16) -> Child {
        let mut cmd = Command::new(find(&["mariadbd", "mysqld"]));
        cmd.args([
            "--no-defaults".to_owned(),
            format!("--datadir={}", dir.join("data").display()),
            format!("--socket={}", dir.join("mysql.sock").display()),
            format!("--pid-file={}", dir.join("mysqld.pid").display()),
            "--bind-address=127.0.0.1".to_owned(),
            format!("--port={port}"),
            "--skip-name-resolve".to_owned(),
            "--innodb-buffer-pool-size=64M".to_owned(),
            format!("--log-error={}", dir.join("error.log").display()),
        ]);
        if is_root() {
            cmd.arg("--user=root");
        }
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn sql(&self, statements: &str) -> std::process::Output {
        Command::new(find(&["mariadb", "mysql"]))
            .args(["--no-defaults", "-uroot"])
            .arg(format!(
                "--socket={}",
                self.dir.join("mysql.sock").display()
            ))
            .args(["-e", statements])
            .output()
            .unwrap()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.sql("SELECT 1").status.success() {
            assert!(
                Instant::now() < deadline,
                "MariaDB did not start: {}",
                std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self) -> String {
        format!("mysql://troupe:troupe@127.0.0.1:{}/troupe", self.port)
    }

    /// SIGKILLs the server, waits `down`, and starts it again.
    fn crash_and_restart(&mut self, down: Duration) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        std::thread::sleep(down);
        self.server = Self::spawn(&self.dir, self.port);
        self.wait_ready();
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const CLIENTS: usize = 6;
/// Each client submits until the database has been restarted twice, or
/// this many times.
const MAX_PER_CLIENT: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_killed_under_load_loses_and_strands_nothing() {
    let db = tokio::task::spawn_blocking(PrivateMariaDb::start)
        .await
        .unwrap();
    let env = Env {
        db_url: db.url(),
        dir: scratch_dir("db-restart"),
    };
    let server = Arc::new(env.serve());

    // Clients submit with idempotency keys, retrying (bounded) on 503 and
    // on a broken connection, as a careful client does.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (server, done) = (server.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let (mut acknowledged, mut unavailable) = (Vec::new(), 0);
            for n in 0..MAX_PER_CLIENT {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let body = json!({
                    "kind": "noop1",
                    "target": format!("vps-{c}"),
                    "params": {},
                    "idempotency_key": format!("c{c}-{n}"),
                });
                let mut tries = 0;
                loop {
                    tries += 1;
                    assert!(tries < 300, "request c{c}-{n} never went through");
                    let (status, resp) = server.post("/v1/actions", &body).await;
                    match status.as_u16() {
                        200..=202 => {
                            acknowledged.push(resp["id"].as_i64().unwrap());
                            break;
                        }
                        503 => {
                            unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        other => panic!("c{c}-{n}: {other} {resp}"),
                    }
                }
            }
            (acknowledged, unavailable)
        }));
    }
    // Twice, while they submit, the database is SIGKILLed: down for a
    // moment (requests wait for it), then for longer than the server waits
    // for a connection (10 s), so requests are answered 503.
    let db = tokio::task::spawn_blocking(move || {
        let mut db = db;
        for down in [500, 11_000] {
            std::thread::sleep(Duration::from_millis(700));
            db.crash_and_restart(Duration::from_millis(down));
        }
        // A little load after the last restart, too.
        std::thread::sleep(Duration::from_millis(500));
        db
    })
    .await
    .unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);

    let (mut acknowledged, mut unavailable) = (Vec::new(), 0);
    for c in clients {
        let (ids, refused) = c.await.unwrap();
        acknowledged.extend(ids);
        unavailable += refused;
    }
    let submitted = acknowledged.len();
    // The outages reached the server while it worked: clients were told
    // 503, or (when every request waited long enough) its writes failed.
    assert!(
        unavailable > 0 || server.log().contains("the database is unavailable"),
        "the database never went away under load"
    );

    // Everything stored finishes; everything acknowledged succeeded.
    let pool = env.sql().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, status FROM actions")
            .fetch_all(&pool)
            .await
            .unwrap();
        let unfinished: Vec<_> = rows
            .iter()
            .filter(|(_, s)| s == "queued" || s == "running")
            .collect();
        if unfinished.is_empty() {
            assert_eq!(rows.len(), submitted, "one action per key");
            for id in &acknowledged {
                let status = &rows.iter().find(|(i, _)| i == id).unwrap().1;
                assert_eq!(status, "succeeded", "action {id}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stranded after the database came back: {unfinished:?}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(db);
}

/// Polls `/v1/health/ready` (no credential) until its status is `want`
/// (and, when not ready, its code `code`), for at most `within`.
async fn ready_becomes(
    server: &crate::harness::Server,
    want: u16,
    code: Option<&str>,
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = server
            .request_as(None, reqwest::Method::GET, "/v1/health/ready", None)
            .await;
        if status.as_u16() == want && body["code"].as_str() == code {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/v1/health/ready is still {status} {body} after {within:?}; wanted {want} {code:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Readiness follows the database: 503 `database_read_only` while it is
/// read-only (as a demoted primary is), 503 `database_unavailable` while it
/// is down, ready again when it takes writes; liveness stays 200 and says
/// nothing of the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database() {
    let mut db = tokio::task::spawn_blocking(PrivateMariaDb::start)
        .await
        .unwrap();
    let env = Env {
        db_url: db.url(),
        dir: scratch_dir("db-ready"),
    };
    let server = env.serve();
    let body = ready_becomes(&server, 200, None, Duration::from_secs(10)).await;
    assert_eq!(body["status"], "ready", "{body}");

    let out = db.sql("SET GLOBAL read_only = 1;");
    assert!(out.status.success(), "{out:?}");
    let body = ready_becomes(
        &server,
        503,
        Some("database_read_only"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(body["status"], "not_ready", "{body}");
    let out = db.sql("SET GLOBAL read_only = 0;");
    assert!(out.status.success(), "{out:?}");
    ready_becomes(&server, 200, None, Duration::from_secs(10)).await;

    let _ = db.server.kill();
    let _ = db.server.wait();
    let body = ready_becomes(
        &server,
        503,
        Some("database_unavailable"),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        !body["reason"].as_str().unwrap().contains("127.0.0.1"),
        "the reason names no address: {body}"
    );
    let (status, live) = server
        .request_as(None, reqwest::Method::GET, "/v1/health/live", None)
        .await;
    assert_eq!(status, 200, "{live}");
    db.server = PrivateMariaDb::spawn(&db.dir, db.port);
    let db = tokio::task::spawn_blocking(move || {
        db.wait_ready();
        db
    })
    .await
    .unwrap();
    ready_becomes(&server, 200, None, Duration::from_secs(60)).await;
    drop(server);
    drop(db);
}
