//! Test fixtures: a real `troupe serve` process on loopback, on a fresh SQLite
//! file or a fresh MariaDB database, with real bundles built by `troupe
//! bundle build` from the workspace's plugin libraries.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Db {
    Sqlite,
    MySql,
}

/// Generates one test per database for each named scenario `async fn(Db)`.
macro_rules! both_dbs {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::harness::Db::Sqlite).await
                }
            )*
        }
        mod mariadb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::harness::Db::MySql).await
                }
            )*
        }
    };
}
pub(crate) use both_dbs;

/// Where cargo put the troupe binary and the plugin libraries.
pub(crate) fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/e2e-HASH → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf()
}

pub(crate) fn troupe_bin() -> PathBuf {
    let bin = target_dir().join("troupe");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace` first (tests/run does)",
        bin.display()
    );
    bin
}

pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub(crate) fn scratch_dir(label: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("troupe-e2e-{}-{n}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the troupe CLI to completion.
pub(crate) fn troupe(args: &[&str]) -> std::process::Output {
    Command::new(troupe_bin())
        .args(args)
        .output()
        .expect("running troupe")
}

/// The testkit and builtin bundles, built and signed once per test run with
/// the CLI, and the key that signed them.
pub(crate) struct Bundles {
    pub(crate) testkit: PathBuf,
    pub(crate) builtin: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) public_key: String,
}

pub(crate) fn bundles() -> &'static Bundles {
    static BUNDLES: OnceLock<Bundles> = OnceLock::new();
    BUNDLES.get_or_init(|| {
        let dir = scratch_dir("bundles");
        let key = dir.join("test.key");
        let o = troupe(&["keys", "generate", "--out", key.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "keys generate failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let public_key = String::from_utf8(o.stdout).unwrap().trim().to_owned();
        let build = |name: &str| {
            let out = dir.join(format!("{name}.bundle"));
            let manifest = workspace().join(format!("steps/{name}/bundle.toml"));
            let library = target_dir().join(format!("lib{name}.so"));
            let o = troupe(&[
                "bundle",
                "build",
                manifest.to_str().unwrap(),
                "--library",
                library.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(
                o.status.success(),
                "bundle build failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let o = troupe(&[
                "bundle",
                "sign",
                out.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
            ]);
            assert!(
                o.status.success(),
                "bundle sign failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            out
        };
        Bundles {
            testkit: build("testkit"),
            builtin: build("builtin"),
            key,
            public_key,
        }
    })
}

/// Signs arbitrary bytes with `key`, claiming the given name and version:
/// how tests make validly signed bundles with broken insides.
pub(crate) fn sign_with(
    key: &signing::SecretKey,
    bytes: &[u8],
    name: &str,
    version: &str,
) -> String {
    let claims = signing::Claims {
        name: name.into(),
        version: version.into(),
        sha256: signing::BundleHash::of(bytes),
        size: bytes.len() as u64,
        // What the testkit's manifest says.
        abi: 2,
        signed_at: 1_800_000_000,
    };
    signing::Signature::sign(key, claims).unwrap().to_text()
}

/// The test signing key (trusted by every test server).
pub(crate) fn test_key() -> signing::SecretKey {
    signing::SecretKey::from_text(&std::fs::read_to_string(&bundles().key).unwrap()).unwrap()
}

/// The testkit bundle rebuilt with another version in its manifest (same
/// library), signed by `key`.
pub(crate) fn testkit_version(version: &str, key: &signing::SecretKey) -> (Vec<u8>, String) {
    let dir = scratch_dir("testkit-version");
    let manifest = std::fs::read_to_string(workspace().join("steps/testkit/bundle.toml"))
        .unwrap()
        .replace("version = \"0.1.0\"", &format!("version = \"{version}\""));
    let manifest_path = dir.join("bundle.toml");
    std::fs::write(&manifest_path, manifest).unwrap();
    let out = dir.join("t.bundle");
    let library = target_dir().join("libtestkit.so");
    let o = troupe(&[
        "bundle",
        "build",
        manifest_path.to_str().unwrap(),
        "--library",
        library.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let sig = sign_with(key, &bytes, "testkit", version);
    let _ = std::fs::remove_dir_all(&dir);
    (bytes, sig)
}

/// Runs `troupe bundle build` on `manifest` with the testkit library;
/// returns the bundle's bytes, or what the build said when it refused.
pub(crate) fn build_testkit(manifest: &str) -> Result<Vec<u8>, String> {
    build_bundle("testkit", manifest)
}

/// Runs `troupe bundle build` on `manifest` with the library of the
/// workspace's bundle `name` (`testkit`, `builtin`).
pub(crate) fn build_bundle(name: &str, manifest: &str) -> Result<Vec<u8>, String> {
    let dir = scratch_dir("bundle-manifest");
    let manifest_path = dir.join("bundle.toml");
    std::fs::write(&manifest_path, manifest).unwrap();
    let out = dir.join("t.bundle");
    let library = target_dir().join(format!("lib{name}.so"));
    let o = troupe(&[
        "bundle",
        "build",
        manifest_path.to_str().unwrap(),
        "--library",
        library.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let result = if o.status.success() {
        Ok(std::fs::read(&out).unwrap())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// An HTTP client for tests (reqwest is built with rustls and no default
/// crypto provider: the one process-wide provider is installed first). It
/// lets go of an idle connection before the server closes it (after its
/// 10 s header timeout), so a request never goes out on a connection the
/// server is closing at that moment.
pub(crate) fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(5))
        .tls_certs_only([])
        .build()
        .expect("an HTTP client")
}

/// A database and data directory for one test.
pub(crate) struct Env {
    pub(crate) db_url: String,
    pub(crate) dir: PathBuf,
}

impl Env {
    pub(crate) async fn new(db: Db) -> Env {
        let dir = scratch_dir(match db {
            Db::Sqlite => "sqlite",
            Db::MySql => "mariadb",
        });
        let db_url = match db {
            Db::Sqlite => format!("sqlite://{}", dir.join("troupe.db").display()),
            Db::MySql => {
                let base = std::env::var("TROUPE_TEST_MYSQL").expect(
                    "TROUPE_TEST_MYSQL is not set: run the tests with `bash tests/run`, which starts a throwaway MariaDB",
                );
                let name = format!(
                    "troupe_t{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::SeqCst)
                );
                let pool = any_pool(&base).await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                format!("{}/{name}", base.trim_end_matches('/'))
            }
        };
        Env { db_url, dir }
    }

    /// Starts `troupe serve` with the test bundles.
    pub(crate) fn serve(&self) -> Server {
        self.serve_with(&[])
    }

    pub(crate) fn serve_with(&self, extra: &[&str]) -> Server {
        self.serve_with_env(extra, &[])
    }

    /// Starts `troupe serve` with extra flags and environment variables.
    pub(crate) fn serve_with_env(&self, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        self.serve_in(&self.db_url, &self.dir, "test-node", extra, envs)
    }

    /// Starts another server on the same database while the first runs (as
    /// on another host): a data directory of its own (one server per data
    /// directory), with the first one's admin token and secrets key.
    pub(crate) fn serve_another(&self, extra: &[&str]) -> Server {
        self.serve_another_with_env(extra, &[])
    }

    /// [`Env::serve_another`] with environment variables (failure points).
    pub(crate) fn serve_another_with_env(&self, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        self.serve_another_at(&self.db_url, extra, envs)
    }

    /// [`Env::serve_another_with_env`] through another URL to the same
    /// database (as through another node of a cluster).
    pub(crate) fn serve_another_at(
        &self,
        db_url: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Server {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = self.dir.join(format!("another-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["admin.token", "secrets.key"] {
            if self.dir.join(file).is_file() {
                std::fs::copy(self.dir.join(file), dir.join(file)).unwrap();
            }
        }
        self.serve_in(db_url, &dir, &format!("test-node-{n}"), extra, envs)
    }

    /// Starts a server on `dir`, with `id` unless `extra` names one.
    fn serve_in(
        &self,
        db_url: &str,
        dir: &Path,
        id: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Server {
        let b = bundles();
        let mut args = vec![
            "serve".to_owned(),
            "--data-dir".into(),
            dir.to_str().unwrap().into(),
            "--db".into(),
            db_url.to_owned(),
            "--bundle".into(),
            b.testkit.to_str().unwrap().into(),
            "--bundle".into(),
            b.builtin.to_str().unwrap().into(),
            "--trust".into(),
            b.public_key.clone(),
            "--cancel-grace".into(),
            "500ms".into(),
        ];
        // Any free port and one server id per data directory, unless
        // `extra` names others (to restart at an address, to run a second
        // server under an id of the test's).
        if !extra.contains(&"--listen") {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        if !extra.contains(&"--node-id") && !extra.contains(&"--server-id") {
            args.extend(["--server-id".into(), id.to_owned()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::start(&args, dir, envs)
    }

    /// A pool on the test's database, to check what the tables hold.
    pub(crate) async fn sql(&self) -> sqlx::AnyPool {
        any_pool(&self.db_url).await
    }
}

async fn any_pool(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("connecting to the test database")
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `troupe serve` process, killed when dropped. Its requests carry
/// the admin token the server wrote to its data directory on first start.
pub(crate) struct Server {
    child: Child,
    pub(crate) url: String,
    http: reqwest::Client,
    stderr_log: PathBuf,
    /// The file holding the server's first admin token.
    pub(crate) token_file: PathBuf,
    pub(crate) token: String,
    /// How it was started, to start it again ([`Server::restart`]).
    args: Vec<String>,
    data_dir: PathBuf,
    envs: Vec<(String, String)>,
}

impl Server {
    pub(crate) fn start(args: &[String], data_dir: &Path, envs: &[(&str, &str)]) -> Server {
        let log = std::env::temp_dir().join(format!(
            "troupe-e2e-{}-{}.log",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let mut child = Command::new(troupe_bin())
            .args(args)
            .env("RUST_LOG", "info,sqlx=warn")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting troupe serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "troupe serve did not start:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let url = line
            .strip_prefix("troupe listening on ")
            .expect("the listening line")
            .trim()
            .to_owned();
        let token_file = data_dir.join("admin.token");
        let token = std::fs::read_to_string(&token_file)
            .expect("the server wrote its first admin token")
            .trim()
            .to_owned();
        Server {
            child,
            url,
            http: http_client(),
            stderr_log: log,
            token_file,
            token,
            args: args.to_vec(),
            data_dir: data_dir.to_owned(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Runs the CLI against this server as its admin.
    pub(crate) fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(troupe_bin())
            .args(args)
            .args(["--server", &self.url])
            .env("TROUPE_TOKEN_FILE", &self.token_file)
            .output()
            .expect("running troupe")
    }

    /// A request with `token` as its bearer credential, or none.
    pub(crate) async fn request_as(
        &self,
        token: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().await.expect("HTTP request to troupe");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a token with these scopes (and kinds); returns its text.
    pub(crate) async fn token_with(
        &self,
        name: &str,
        scopes: &[&str],
        kinds: Option<&[&str]>,
    ) -> String {
        let mut body = json!({ "name": name, "scopes": scopes });
        if let Some(kinds) = kinds {
            body["kinds"] = json!(kinds);
        }
        let (status, t) = self.post("/v1/tokens", &body).await;
        assert_eq!(status, StatusCode::CREATED, "{t}");
        t["token"].as_str().unwrap().to_owned()
    }

    /// What the server has logged so far. Never empty (the server logs as
    /// it starts): a check that the log lacks something must not pass on a
    /// log that was never written.
    pub(crate) fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.stderr_log).expect("reading the server's log");
        assert!(
            !log.trim().is_empty(),
            "the server's log {} is empty",
            self.stderr_log.display()
        );
        log
    }

    /// Polls (at most 30 s) until the server's log contains `text`; returns
    /// the log.
    pub(crate) async fn log_until(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the log never said {text:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> (StatusCode, Value) {
        self.request_as(Some(&self.token), method, path, body).await
    }

    pub(crate) async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, Some(body.to_string()))
            .await
    }

    /// Pushes a bundle and its signature as `troupe bundle push` does.
    pub(crate) async fn push(&self, bundle: Vec<u8>, signature: &str) -> (StatusCode, Value) {
        let form = reqwest::multipart::Form::new()
            .part(
                "bundle",
                reqwest::multipart::Part::bytes(bundle).file_name("b.bundle"),
            )
            .text("signature", signature.to_owned());
        let resp = self
            .http
            .post(format!("{}/v1/bundles", self.url))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await
            .expect("push");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Submits an action and returns its id.
    pub(crate) async fn submit(&self, kind: &str, target: &str, params: Value) -> i64 {
        let (status, body) = self
            .post(
                "/v1/actions",
                &json!({ "kind": kind, "target": target, "params": params }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "submit {kind}: {body}");
        body["id"].as_i64().unwrap()
    }

    /// Long-polls until the action is terminal (at most 60 s).
    pub(crate) async fn finished(&self, id: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.get(&format!("/v1/actions/{id}?wait=10s")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if matches!(
                body["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "action {id} did not finish: {body}\n{}",
                self.log()
            );
        }
    }

    /// Polls until `check` holds for the action (at most 30 s).
    pub(crate) async fn until(&self, id: i64, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut revision = -1;
        loop {
            let (_, body) = self
                .get(&format!("/v1/actions/{id}?wait=5s&since={revision}"))
                .await;
            if check(&body) {
                return body;
            }
            revision = body["revision"].as_i64().unwrap_or(-1);
            assert!(
                Instant::now() < deadline,
                "action {id} never reached {what}: {body}\n{}",
                self.log()
            );
        }
    }

    /// Sends a signal (`HUP`, `STOP`, …) to the server process.
    pub(crate) fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{name}");
    }

    pub(crate) fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server with SIGTERM (it drains and hands its actions on)
    /// and starts it again as it was started: same data directory and id,
    /// a new port unless it was given one.
    pub(crate) fn restart(self) -> Server {
        let (args, dir, envs) = (self.args.clone(), self.data_dir.clone(), self.envs.clone());
        let status = self.sigterm();
        assert!(status.success(), "troupe exited with {status} on SIGTERM");
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (&**k, &**v)).collect();
        Server::start(&args, &dir, &envs)
    }

    /// Sends SIGTERM and waits (at most 30 s) for the process to exit.
    pub(crate) fn sigterm(mut self) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "troupe did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_log);
    }
}

pub(crate) fn steps(action: &Value) -> Vec<Value> {
    action["steps"].as_array().cloned().unwrap_or_default()
}

/// The statuses of an action's steps, in order.
pub(crate) fn step_statuses(action: &Value) -> Vec<String> {
    steps(action)
        .iter()
        .map(|s| s["status"].as_str().unwrap().to_owned())
        .collect()
}

/// The `field` of each object in the JSON list `items`, where it is a string.
pub(crate) fn strings<'a>(items: &'a serde_json::Value, field: &str) -> Vec<&'a str> {
    items
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item[field].as_str())
        .collect()
}
