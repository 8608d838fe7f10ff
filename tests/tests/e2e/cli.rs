//! The command line, run as a user would: the demo, submit --wait, status,
//! list, cancel, and their errors.

use crate::harness::{Db, Env, scratch_dir, troupe, troupe_bin};

pub(crate) fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn demo_runs_a_reboot_to_completion() {
    let dir = scratch_dir("demo");
    let out = std::process::Command::new(troupe_bin())
        .args(["demo", "--exit", "--listen", "127.0.0.1:0"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for expected in [
        "check_disk",
        "reboot",
        "wait_network",
        "succeeded",
        "SELECT id, kind, target, status",
    ] {
        assert!(t.contains(expected), "demo output lacks {expected:?}:\n{t}");
    }
    assert!(dir.join("troupe-data/troupe.db").is_file());
}

/// An installed troupe (the layout `deploy/install.sh` makes: bin/troupe and
/// lib/troupe/) finds its step library; a lone binary says where it looked
/// and what to do.
#[test]
fn an_installed_binary_finds_its_step_library() {
    use std::os::unix::fs::PermissionsExt;
    let prefix = scratch_dir("installed");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::create_dir_all(prefix.join("lib/troupe")).unwrap();
    let bin = prefix.join("bin/troupe");
    std::fs::copy(troupe_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let work = scratch_dir("installed-work");
    let alone = std::process::Command::new(&bin)
        .args(["demo", "--exit", "--listen", "127.0.0.1:0"])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(!alone.status.success());
    assert!(
        text(&alone).contains("install.sh") && text(&alone).contains("TROUPE_LIB_DIR"),
        "{}",
        text(&alone)
    );

    let lib = crate::harness::target_dir().join("libbuiltin.so");
    std::fs::copy(lib, prefix.join("lib/troupe/libbuiltin.so")).unwrap();
    let demo = std::process::Command::new(&bin)
        .args(["demo", "--exit", "--listen", "127.0.0.1:0"])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(demo.status.success(), "{}", text(&demo));
    assert!(text(&demo).contains("succeeded"), "{}", text(&demo));
}

/// A `troupe demo` serving on, started in `dir` trusting `keys`.
pub(crate) struct Demo {
    process: std::process::Child,
    /// Its API's address.
    pub url: String,
    /// What it printed up to "Press Ctrl-C".
    pub said: String,
}

impl Demo {
    pub(crate) fn start(dir: &std::path::Path, keys: &[&str]) -> Demo {
        use std::io::BufRead;
        let mut args = vec!["demo", "--listen", "127.0.0.1:0"];
        for key in keys {
            args.extend(["--trust", key]);
        }
        let mut process = std::process::Command::new(troupe_bin())
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut url = None;
        let mut said = String::new();
        for line in std::io::BufReader::new(process.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            said.push_str(&line);
            said.push('\n');
            if let Some(rest) = line.strip_prefix("troupe listening on ") {
                url = rest.split_whitespace().next().map(str::to_owned);
            }
            if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
        let url = url.unwrap_or_else(|| panic!("no address in:\n{said}"));
        Demo { process, url, said }
    }

    /// Runs the CLI in `dir` against this demo (it finds the demo's
    /// credential there).
    pub(crate) fn cli(&self, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
        std::process::Command::new(troupe_bin())
            .args(args)
            .args(["--server", &self.url])
            .current_dir(dir)
            .output()
            .unwrap()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// `demo --trust KEY`: the demo server takes a bundle its user signed, and
/// the CLI in the same directory needs no credential step to push it.
#[test]
fn the_demo_trusts_the_users_key() {
    let dir = scratch_dir("demo-trust");
    let b = crate::harness::bundles();
    let demo = Demo::start(&dir, &[&b.public_key]);
    assert!(demo.said.contains("troupe bundle push"), "{}", demo.said);
    let push = demo.cli(&dir, &["bundle", "push", b.testkit.to_str().unwrap()]);
    assert!(push.status.success(), "{}", text(&push));
    assert!(text(&push).contains("testkit"), "{}", text(&push));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_status_list_and_cancel() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();

    let ok = server.cli(&["submit", "noop3", "--target", "vps-1", "--wait"]);
    let t = text(&ok);
    assert!(ok.status.success(), "{t}");
    assert!(
        t.contains("one") && t.contains("three") && t.contains("succeeded"),
        "{t}"
    );

    let failed = server.cli(&[
        "submit",
        "fail",
        "--target",
        "vps-1",
        "--param",
        "message=broken on purpose",
        "--wait",
    ]);
    assert!(!failed.status.success(), "a failed action exits non-zero");
    assert!(text(&failed).contains("broken on purpose"));

    let status = server.cli(&["status", "1"]);
    assert!(status.status.success());
    assert!(
        text(&status).contains("noop3 on vps-1"),
        "{}",
        text(&status)
    );

    let list = server.cli(&["list"]);
    assert!(
        text(&list).contains("fail") && text(&list).contains("noop3"),
        "{}",
        text(&list)
    );
    // The next page's hint keeps the filters.
    let page = server.cli(&["list", "--target", "vps-1", "--limit", "1"]);
    assert!(
        text(&page).contains("more: troupe list --limit 1 --target vps-1 --before"),
        "{}",
        text(&page)
    );

    // Outputs show in text, cut to a line unless --full.
    let blob = server.cli(&[
        "submit",
        "blob",
        "--target",
        "vps-9",
        "--param-json",
        "bytes=500",
        "--wait",
    ]);
    let t = text(&blob);
    assert!(blob.status.success(), "{t}");
    assert!(t.contains("→ ") && t.contains("(--full for all)"), "{t}");
    let id = t
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_owned();
    let full = server.cli(&["status", &id, "--full"]);
    let ft = text(&full);
    assert!(!ft.contains("(--full for all)") && ft.len() > 500, "{ft}");

    let json = server.cli(&[
        "submit",
        "echo",
        "--target",
        "vps-2",
        "--param-json",
        "size=3",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["params"]["size"], 3);

    let long = server.cli(&[
        "submit",
        "sleep",
        "--target",
        "vps-3",
        "--param-json",
        "ms=30000",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&long.stdout).unwrap();
    let id = v["id"].to_string();
    server
        .until(v["id"].as_i64().unwrap(), "running", |a| {
            a["status"] == "running"
        })
        .await;
    let cancel = server.cli(&["cancel", &id]);
    assert!(
        text(&cancel).contains(&format!("cancel requested; action {id} is stopping")),
        "{}",
        text(&cancel)
    );
    let cancel = server.cli(&["cancel", &id, "--wait"]);
    assert!(text(&cancel).contains("cancelled"), "{}", text(&cancel));

    let unknown = server.cli(&["submit", "nope", "--target", "t"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("unknown_kind"),
        "{}",
        text(&unknown)
    );

    let down = troupe(&["list", "--server", "http://127.0.0.1:9"]);
    assert!(!down.status.success());
    assert!(
        text(&down).contains("is `troupe serve` running?"),
        "{}",
        text(&down)
    );

    // `submit --help` documents every flag the README shows for it.
    let help = troupe(&["submit", "--help"]);
    assert!(help.status.success());
    for flag in [
        "--target",
        "--param ",
        "--param-json",
        "--idempotency-key",
        "--wait",
    ] {
        assert!(
            text(&help).contains(flag),
            "{flag} is not in:\n{}",
            text(&help)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_sign_verify_push_list_activate() {
    use std::os::unix::fs::PermissionsExt;

    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let dir = scratch_dir("cli-keys");
    let key = dir.join("release.key");
    let out = troupe(&["keys", "generate", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(public.starts_with("ed25519:"), "{public}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = troupe(&["keys", "generate", "--out", key.to_str().unwrap()]);
    assert!(!again.status.success(), "never overwrites a key");
    // The public half of an existing key, any time.
    let shown = troupe(&["keys", "public", key.to_str().unwrap()]);
    assert!(shown.status.success(), "{}", text(&shown));
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), public);
    let missing = troupe(&["keys", "public", "/nonexistent/k.key"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("/nonexistent/k.key"),
        "{}",
        text(&missing)
    );

    // A v2 of testkit, signed with the new key.
    let (bytes, _) = crate::harness::testkit_version("0.2.0", &crate::harness::test_key());
    let bundle = dir.join("testkit-0.2.0.bundle");
    std::fs::write(&bundle, &bytes).unwrap();
    let sign = troupe(&[
        "bundle",
        "sign",
        bundle.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(sign.status.success(), "{}", text(&sign));
    let verify = troupe(&[
        "bundle",
        "verify",
        bundle.to_str().unwrap(),
        "--trust",
        &public,
    ]);
    assert!(
        verify.status.success() && text(&verify).contains("ok: testkit 0.2.0"),
        "{}",
        text(&verify)
    );
    let wrong = troupe(&[
        "bundle",
        "verify",
        bundle.to_str().unwrap(),
        "--trust",
        &crate::harness::bundles().public_key,
    ]);
    assert!(!wrong.status.success(), "{}", text(&wrong));

    // The server does not trust the new key until the admin says so.
    let push = server.cli(&["bundle", "push", bundle.to_str().unwrap()]);
    assert!(
        !push.status.success() && text(&push).contains("signature_untrusted_key"),
        "{}",
        text(&push)
    );
    let trust = server.cli(&["keys", "trust", &public]);
    assert!(trust.status.success(), "{}", text(&trust));
    let push = server.cli(&["bundle", "push", bundle.to_str().unwrap(), "--json"]);
    assert!(push.status.success(), "{}", text(&push));
    let pushed: serde_json::Value = serde_json::from_slice(&push.stdout).unwrap();
    assert_eq!(pushed["status"], "active");

    let list = server.cli(&["bundle", "list"]);
    let t = text(&list);
    assert!(
        t.contains("testkit 0.1.0") && t.contains("testkit 0.2.0") && t.contains("active"),
        "{t}"
    );
    let v1 = t
        .lines()
        .find(|l| l.contains("testkit 0.1.0"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    // A prefix will do when only one bundle has it; none or two, it says so.
    let nothing = server.cli(&["bundle", "activate", "ffffffffff"]);
    assert!(!nothing.status.success());
    assert!(text(&nothing).contains("no bundle"), "{}", text(&nothing));
    let activate = server.cli(&["bundle", "activate", &v1[..8]]);
    assert!(
        activate.status.success() && text(&activate).contains("active"),
        "{}",
        text(&activate)
    );
    // The key trusted over the API is listed as such, beside the one from
    // --trust.
    let keys = server.cli(&["keys", "list", "--json"]);
    assert!(keys.status.success(), "{}", text(&keys));
    let keys: serde_json::Value = serde_json::from_slice(&keys.stdout).unwrap();
    let find = |public: &str| {
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["public_key"] == public)
            .cloned()
            .unwrap_or_else(|| panic!("{public} not listed: {keys}"))
    };
    let added = find(&public);
    assert_eq!(
        (&added["source"], &added["revoked"]),
        (&"api".into(), &false.into()),
        "{added}"
    );
    let configured = find(&crate::harness::bundles().public_key);
    assert_eq!(configured["source"], "config", "{configured}");
}

/// `troupe status … | head` ends the way any Unix tool does when its
/// reader goes away (SIGPIPE), not with a panic and a backtrace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_a_client_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let id = server.submit("noop1", "t", serde_json::json!({})).await;
    server.finished(id).await;
    let mut child = std::process::Command::new(troupe_bin())
        .args(["status", &id.to_string(), "--server", &server.url])
        .env("TROUPE_TOKEN_FILE", &server.token_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader is gone before the command prints anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(13), "SIGPIPE: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Ctrl-C while `--wait` follows an action stops the following, not the
/// action, and says so: how to follow again and how to stop it. The exit
/// status is 130, as for any command stopped by Ctrl-C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_following_and_says_the_action_runs_on() {
    use std::io::BufRead;
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let first = server
        .submit("sleep", "vps-int", serde_json::json!({ "ms": 60000 }))
        .await;
    server
        .until(first, "running", |a| a["status"] == "running")
        .await;
    let status_wait = vec!["status".to_owned(), first.to_string(), "--wait".into()];
    let submit_wait: Vec<String> = [
        "submit",
        "sleep",
        "--target",
        "vps-int2",
        "--param-json",
        "ms=60000",
        "--wait",
    ]
    .map(String::from)
    .to_vec();
    for args in [status_wait, submit_wait] {
        let mut child = std::process::Command::new(troupe_bin())
            .args(&args)
            .args(["--server", &server.url])
            .env("TROUPE_TOKEN_FILE", &server.token_file)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The first line ("action N: …") comes once the CLI follows the
        // action (and handles Ctrl-C); only then is the interrupt sent.
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut header = String::new();
        stdout.read_line(&mut header).unwrap();
        let id: i64 = header
            .strip_prefix("action ")
            .and_then(|r| r.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{args:?}: {header}"));
        let kill = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "stopped following action {id}; it is still running — `troupe status {id} --wait` to follow again, `troupe cancel {id}` to stop it"
            )),
            "{args:?}: {stderr}"
        );
        let (_, action) = server.get(&format!("/v1/actions/{id}")).await;
        assert_eq!(action["status"], "running", "{action}");
    }
}

/// A duration needs its unit: `--expires-in 90` is refused, saying how to
/// write it, rather than read as 90 seconds; nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duration_without_a_unit_is_refused() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let out = server.cli(&[
        "tokens",
        "create",
        "--name",
        "ci",
        "--scope",
        "read",
        "--expires-in",
        "90",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("\"90\" has no unit: write it as 90s, 90m, 90h or 90d"),
        "{}",
        text(&out)
    );
    let (_, tokens) = server.get("/v1/tokens").await;
    assert_eq!(
        crate::harness::strings(&tokens["tokens"], "name"),
        ["admin"],
        "{tokens}"
    );
    for (given, what) in [
        ("90s", 90),
        ("24h", 86_400),
        ("30d", 2_592_000),
        ("1h 30m", 5400),
    ] {
        let name = format!("t{what}");
        let out = server.cli(&[
            "tokens",
            "create",
            "--name",
            &name,
            "--scope",
            "read",
            "--expires-in",
            given,
            "--json",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let at: chrono::DateTime<chrono::Utc> = t["expires_at"].as_str().unwrap().parse().unwrap();
        let left = (at - chrono::Utc::now()).num_seconds();
        assert!((what - 60..=what).contains(&left), "{given}: {left} s left");
    }
}

/// `tokens create --out FILE` and `nodes token create --out FILE` write the
/// token to a new file only its owner can read (as `keys generate` does),
/// refuse to overwrite one (before any token is made), and the file works
/// as `--token-file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_go_to_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let dir = scratch_dir("token-out");
    let panel = dir.join("panel.token");
    let join = dir.join("node.token");
    for (args, file) in [
        (
            vec!["tokens", "create", "--name", "panel", "--scope", "read"],
            &panel,
        ),
        (vec!["nodes", "token", "create", "--ttl", "1h"], &join),
    ] {
        let mut with_out = args.clone();
        with_out.extend(["--out", file.to_str().unwrap()]);
        let out = server.cli(&with_out);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("troupe_"),
            "the token is not printed: {}",
            text(&out)
        );
        assert!(
            text(&out).contains(&format!("written to {} (mode 0600)", file.display())),
            "{}",
            text(&out)
        );
        let meta = std::fs::metadata(file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            std::fs::read_to_string(file)
                .unwrap()
                .starts_with("troupe_")
        );

        let (_, before) = server.get("/v1/tokens").await;
        let again = server.cli(&with_out);
        assert!(!again.status.success(), "never overwrites a token file");
        assert!(
            text(&again).contains("must not exist yet"),
            "{}",
            text(&again)
        );
        let (_, after) = server.get("/v1/tokens").await;
        assert_eq!(
            before, after,
            "no token made when the file cannot be written"
        );
    }
    let list = std::process::Command::new(troupe_bin())
        .args(["kinds", "--server", &server.url, "--token-file"])
        .arg(&panel)
        .output()
        .unwrap();
    assert!(list.status.success(), "{}", text(&list));
}

/// Pushing a version the server holds already says so (nothing was pushed)
/// and how to make it active; `bundle activate` says what it replaced, and
/// activating the active version says nothing changed (and is not audited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_and_activating_say_what_changed() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let dir = scratch_dir("repush");
    let (bytes, sig) = crate::harness::testkit_version("0.2.0", &crate::harness::test_key());
    let v2 = dir.join("testkit-0.2.0.bundle");
    std::fs::write(&v2, &bytes).unwrap();
    std::fs::write(dir.join("testkit-0.2.0.bundle.sig"), sig).unwrap();
    let hash = |version: &str| {
        let list = bundle_list(&server);
        list["bundles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "testkit" && b["version"] == version)
            .and_then(|b| b["hash"].as_str())
            .unwrap()
            .to_owned()
    };
    let push = server.cli(&["bundle", "push", v2.to_str().unwrap()]);
    let h2 = hash("0.2.0");
    let h1 = hash("0.1.0");
    assert_eq!(
        text(&push).trim(),
        format!("pushed testkit 0.2.0 ({}), now active", &h2[..8])
    );
    let back = server.cli(&["bundle", "activate", &h1[..8]]);
    assert!(back.status.success(), "{}", text(&back));
    assert_eq!(
        text(&back).trim(),
        format!("testkit 0.1.0 is now active, was 0.2.0 ({})", &h2[..8])
    );
    let again = server.cli(&["bundle", "push", v2.to_str().unwrap()]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(
        text(&again).trim(),
        format!(
            "testkit 0.2.0 ({}) is already held (drained); nothing was pushed — `troupe bundle activate {}` to make it active",
            &h2[..8],
            &h2[..8]
        )
    );
    let same = server.cli(&["bundle", "activate", &h1[..8]]);
    assert!(same.status.success(), "{}", text(&same));
    assert_eq!(
        text(&same).trim(),
        "testkit 0.1.0 is already active; nothing changed"
    );
    let (_, audit) = server.get("/v1/audit").await;
    let events = crate::harness::strings(&audit["entries"], "event");
    assert_eq!(
        events.iter().filter(|e| **e == "bundle.activated").count(),
        1,
        "{audit}"
    );
    let pushed = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "bundle.pushed" && e["subject"] == h2.as_str())
        .count();
    assert_eq!(pushed, 1, "pushed once: {audit}");
}

/// `troupe bundle list --json`.
fn bundle_list(server: &crate::harness::Server) -> serde_json::Value {
    let out = server.cli(&["bundle", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}
