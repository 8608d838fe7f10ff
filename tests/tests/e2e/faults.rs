//! Faults found by reading the code, each held by a test: work left
//! running after a cancel, a timeout or a killed host; a frame too large for
//! the pipe; a modified bundle cache; versions compared out of semver order;
//! two bundles claiming one kind; submission order within one group commit.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{
    Db, Env, Server, both_dbs, build_testkit, sign_with, test_key, testkit_version, workspace,
};

/// Processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Waits (at most 5 s) until no process holds `marker`.
fn assert_gone(marker: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for (pid, _) in &left {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
            panic!("{what} left processes running: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `run` params for a shell that starts two `sleep`s of `m` seconds, one
/// in the background.
fn two_sleeps(m: &str) -> serde_json::Value {
    json!({ "argv": ["sh", "-c", format!("sleep {m} & sleep {m}; wait")] })
}

/// A number no other test or process will pass to `sleep`.
fn marker(n: u32) -> String {
    format!("{}.{:03}{n}", 300 + std::process::id() % 500, n)
}

async fn cancel_timeout_host_kill_and_server_kill_leave_no_process_behind(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();

    // Cancel: the command and everything it started go.
    let m = marker(1);
    let id = server.submit("run", "vps-cancel", two_sleeps(&m)).await;
    server
        .until(id, "its command running", |_| processes_with(&m).len() >= 2)
        .await;
    let (status, _) = server
        .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    assert_eq!(server.finished(id).await["status"], "cancelled");
    assert_gone(&m, "a cancelled command");

    // A step host killed for ignoring its timeout takes its children along.
    let m = marker(2);
    let id = server
        .submit("spawn_and_hang", "vps-kill", json!({ "seconds": m }))
        .await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "failed", "{a}");
    assert_gone(&m, "a killed step host");

    // The server itself SIGKILLed: its step hosts see their pipe close and
    // take what their calls started with them.
    let m = marker(4);
    let id = server.submit("run", "vps-crash", two_sleeps(&m)).await;
    server
        .until(id, "its command running", |_| processes_with(&m).len() >= 2)
        .await;
    server.kill9();
    assert_gone(&m, "a SIGKILLed server");
}

async fn a_command_that_times_out_leaves_no_process_behind(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let m = marker(3);
    // The built-in run_command's timeout kills the command it ran.
    let id = server
        .submit("run", "vps-timeout", {
            let mut params = two_sleeps(&m);
            params["timeout_ms"] = json!(500);
            params
        })
        .await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "failed", "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("did not finish within 500 ms"),
        "{a}"
    );
    assert_gone(&m, "a command that timed out");
}

/// Asserts that `id` is still running on its first attempt: a bystander
/// that had already finished would make its check say nothing.
pub(crate) async fn still_running(server: &Server, id: i64) {
    let (_, b) = server.get(&format!("/v1/actions/{id}")).await;
    assert_eq!(
        b["status"], "running",
        "the bystander was not in flight throughout: {b}"
    );
    assert_eq!(b["steps"][0]["attempt"], 1, "{b}");
}

/// A `sleep` action long enough to be in flight whatever the machine's
/// load; [`bystander_unharmed`] ends it.
async fn bystander(server: &Server) -> i64 {
    let id = server
        .submit("sleep", "vps-b", json!({ "ms": 120_000 }))
        .await;
    server
        .until(id, "running", |a| a["current_step"] == "sleep_ms")
        .await;
    id
}

/// The bystander is still in flight on its first attempt, and its call
/// still answers: cancelled, its step ends `cancelled` (a call lost with
/// its host would end `failed`).
async fn bystander_unharmed(server: &Server, id: i64) {
    still_running(server, id).await;
    let (status, _) = server
        .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    let b = server.finished(id).await;
    assert_eq!(
        b["status"], "cancelled",
        "the bystander on the same host: {b}"
    );
    assert_eq!(b["steps"][0]["status"], "cancelled", "{b}");
    assert_eq!(b["steps"][0]["attempt"], 1, "{b}");
}

async fn an_oversized_output_fails_only_its_own_call(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    // Shares the testkit host with the blob step below.
    let bystander = bystander(&server).await;
    let big = server
        .submit("blob", "vps-a", json!({ "bytes": 70 << 20 }))
        .await;
    let a = server.finished(big).await;
    assert_eq!(
        a["status"],
        "failed",
        "{}",
        &a.to_string()[..300.min(a.to_string().len())]
    );
    let err = a["error"].as_str().unwrap();
    assert!(err.contains("output") && err.contains("limit"), "{err}");
    bystander_unharmed(&server, bystander).await;
}

async fn a_printing_plugin_breaks_nothing(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    // A call in flight on the same host while the plugin prints.
    let bystander = bystander(&server).await;
    let chatty = server.submit("chatty", "vps-a", json!({})).await;
    let a = server.finished(chatty).await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(a["steps"][0]["output"]["said"], "hello", "{a}");
    bystander_unharmed(&server, bystander).await;
    // What it printed is in the server's log, line by line.
    let log = server.log();
    for line in [
        "chatty plugin says hello on stdout (199)",
        "chatty plugin says hello on stderr (199)",
        "no newline at the end",
    ] {
        assert!(log.contains(line), "{line:?} is not in the log:\n{log}");
    }
    // The host still serves calls.
    let again = server.submit("chatty", "vps-a", json!({})).await;
    assert_eq!(server.finished(again).await["status"], "succeeded");
}

async fn a_modified_bundle_cache_is_never_loaded(db: Db) {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(db).await;
    let server = env.serve();
    let id = server.submit("noop1", "t", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
    drop(server);

    // Tamper with every unpacked copy of the testkit library.
    let mut tampered = 0;
    for dir in std::fs::read_dir(env.dir.join("bundles"))
        .unwrap()
        .flatten()
    {
        let lib_dir = dir.path().join("lib");
        for triple in std::fs::read_dir(&lib_dir).into_iter().flatten().flatten() {
            let lib = triple.path().join("libtestkit.so");
            if lib.is_file() {
                let mut perms = std::fs::metadata(&lib).unwrap().permissions();
                perms.set_mode(0o644);
                std::fs::set_permissions(&lib, perms).unwrap();
                std::fs::write(&lib, b"not a library any more").unwrap();
                tampered += 1;
            }
        }
    }
    assert!(tampered > 0, "found no unpacked testkit library");

    let server = env.serve();
    let id = server.submit("noop1", "t", json!({})).await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "succeeded", "{a}\n{}", server.log());
    assert!(
        server.log().contains("modified"),
        "the tampering is reported: {}",
        server.log()
    );
}

async fn one_targets_actions_start_in_submission_order(db: Db) {
    let env = Env::new(db).await;
    let server = std::sync::Arc::new(env.serve());
    // Many clients at once, so several submits share a group commit.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..10 {
                ids.push(server.submit("noop1", "one-target", json!({})).await);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids.sort_unstable();
    // In id order, each one started after the one before it finished.
    let mut runs = Vec::new();
    for id in &ids {
        let a = server.finished(*id).await;
        assert_eq!(a["status"], "succeeded");
        let time = |k: &str| a[k].as_str().unwrap().to_owned();
        runs.push((*id, time("started_at"), time("finished_at")));
    }
    for pair in runs.windows(2) {
        let ((a, _, a_end), (b, b_start, _)) = (&pair[0], &pair[1]);
        assert!(
            a_end <= b_start,
            "action {b} started at {b_start}, before action {a} finished at {a_end}"
        );
    }
}

/// An insert committed, but the server saw an error (armed at the third
/// action insert): the client is told the outcome is unknown, and the
/// stored action must still run, whether or not the retry comes.
async fn an_insert_whose_answer_was_lost_still_runs(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(
        &[],
        &[(
            "FAILPOINTS",
            "store.after_insert_commit=2*off->1*return->1*off->1*return->off",
        )],
    );
    assert!(
        server.log().contains("failure points armed"),
        "{}",
        server.log()
    );
    for n in 1..=2 {
        let id = server.submit("noop1", &format!("vps-{n}"), json!({})).await;
        assert_eq!(server.finished(id).await["status"], "succeeded");
    }
    // Third: the target is idle, so the insert also starts it.
    let body =
        json!({ "kind": "noop1", "target": "vps-3", "params": {}, "idempotency_key": "lost-3" });
    let (status, resp) = server.post("/v1/actions", &body).await;
    assert_eq!(status, 503, "{resp}");
    assert_eq!(resp["error"]["code"], "outcome_unknown", "{resp}");
    // Fourth: the target is busy, so it is inserted queued.
    let first = server.submit("sleep", "vps-4", json!({ "ms": 300 })).await;
    let body =
        json!({ "kind": "noop1", "target": "vps-4", "params": {}, "idempotency_key": "lost-4" });
    let (status, resp) = server.post("/v1/actions", &body).await;
    assert_eq!(status, 503, "{resp}");
    assert_eq!(resp["error"]["code"], "outcome_unknown", "{resp}");
    assert_eq!(server.finished(first).await["status"], "succeeded");
    // The retries find the stored actions, and they run.
    for key in ["lost-3", "lost-4"] {
        let target = format!("vps-{}", &key[5..]);
        let body =
            json!({ "kind": "noop1", "target": target, "params": {}, "idempotency_key": key });
        let (status, resp) = server.post("/v1/actions", &body).await;
        assert_eq!(status, 200, "{key}: {resp}");
        let id = resp["id"].as_i64().unwrap();
        let a = server.finished(id).await;
        assert_eq!(a["status"], "succeeded", "{key}: {a}");
    }
}

/// A group commit whose COMMIT failed may have gone through all the same:
/// its writes are not applied again one by one (which stored inserts
/// twice), and the actions it stored still run. The first failure point
/// holds each batch open for 300 ms, so the eight submits share one.
async fn a_commit_that_may_have_happened_is_not_written_twice(db: Db) {
    let env = Env::new(db).await;
    let server = std::sync::Arc::new(env.serve_with_env(
        &[],
        &[(
            "FAILPOINTS",
            "store.before_batch=sleep(300);store.after_insert_commit=1*return->off",
        )],
    ));
    let mut posts = Vec::new();
    for n in 0..8 {
        let server = server.clone();
        posts.push(tokio::spawn(async move {
            let body = json!({ "kind": "noop1", "target": format!("vps-{n}"), "params": {} });
            server.post("/v1/actions", &body).await.0
        }));
    }
    let mut refused = 0;
    for p in posts {
        if p.await.unwrap() == 503 {
            refused += 1;
        }
    }
    assert!(refused >= 2, "the failed batch held {refused} submits");
    // Every submit stored once, and every one runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, list) = server.get("/v1/actions?limit=100").await;
        let actions = list["actions"].as_array().unwrap().clone();
        assert_eq!(actions.len(), 8, "{list}");
        if actions.iter().all(|a| a["status"] == "succeeded") {
            break;
        }
        assert!(Instant::now() < deadline, "not all finished: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A write the database refuses (armed: every step result) is not retried
/// forever: the action ends `failed`, saying what was refused.
async fn a_refused_write_ends_its_action(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(&[], &[("FAILPOINTS", "store.refuse_step_success=return")]);
    let id = server.submit("noop1", "vps-1", json!({})).await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "failed", "{a}");
    let error = a["error"].as_str().unwrap();
    assert!(
        error.contains("database refused") && error.contains("(injected)"),
        "{error}"
    );
    assert_eq!(a["steps"][0]["status"], "failed", "{a}");
}

/// A runner that panics ends its action instead of leaving it running.
async fn a_runner_that_panics_ends_its_action(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(
        &[],
        &[("FAILPOINTS", "runner.before_step=1*panic(boom)->off")],
    );
    let id = server.submit("noop1", "vps-1", json!({})).await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "failed", "{a}");
    let error = a["error"].as_str().unwrap();
    assert!(
        error.contains("panicked") && error.contains("boom"),
        "{error}"
    );
    // The target is free again and the server still runs actions.
    let id = server.submit("noop1", "vps-1", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

/// What troupe stores is bounded: a long error is cut (and says so), an
/// output over the limit fails its step; neither can wedge the action.
async fn long_errors_are_cut_and_large_outputs_refused(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    // 100 KB of two-byte characters: over a MariaDB TEXT column.
    let message = "é".repeat(50_000);
    let id = server
        .submit("fail", "vps-1", json!({ "message": message }))
        .await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "failed");
    let error = a["error"].as_str().unwrap();
    assert!(error.len() < 20_000, "{} bytes", error.len());
    assert!(
        error.contains("ééé") && error.contains("more bytes cut]"),
        "{error}"
    );
    let step = &a["steps"][1];
    assert!(
        step["error"].as_str().unwrap().contains("more bytes cut]"),
        "{step}"
    );

    let id = server
        .submit("blob", "vps-2", json!({ "bytes": 2 << 20 }))
        .await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "failed");
    let error = a["error"].as_str().unwrap();
    assert!(
        error.contains("output") && error.contains("1 MiB"),
        "{error}"
    );
}

both_dbs!(
    long_errors_are_cut_and_large_outputs_refused,
    an_insert_whose_answer_was_lost_still_runs,
    a_runner_that_panics_ends_its_action,
    a_refused_write_ends_its_action,
    a_commit_that_may_have_happened_is_not_written_twice,
    cancel_timeout_host_kill_and_server_kill_leave_no_process_behind,
    a_command_that_times_out_leaves_no_process_behind,
    an_oversized_output_fails_only_its_own_call,
    a_printing_plugin_breaks_nothing,
    a_modified_bundle_cache_is_never_loaded,
    one_targets_actions_start_in_submission_order,
    two_bundles_may_not_provide_one_kind,
    an_activation_may_not_give_a_kind_a_second_provider,
);

async fn two_bundles_may_not_provide_one_kind(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let base = std::fs::read_to_string(workspace().join("steps/testkit/bundle.toml")).unwrap();
    let other = base.replace("name = \"testkit\"", "name = \"testkit-copy\"");
    let bytes = build_testkit(&other).unwrap();
    let sig = sign_with(&test_key(), &bytes, "testkit-copy", "0.1.0");
    let (status, resp) = server.push(bytes, &sig).await;
    assert_eq!(status, 409, "{resp}");
    assert_eq!(resp["error"]["code"], "kind_conflict");
    let message = resp["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("testkit") && message.contains("noop3"),
        "{message}"
    );
    // Nothing changed: the kind still runs on testkit.
    let id = server.submit("noop3", "t", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
    let (_, bundles) = server.get("/v1/bundles").await;
    assert!(
        !bundles.to_string().contains("testkit-copy"),
        "the refused bundle was stored: {bundles}"
    );
}

/// A small bundle on the testkit library: `name` at `version`, with one
/// kind `kind` of one no-op step.
pub(crate) fn side_bundle(name: &str, version: &str, kind: &str) -> (Vec<u8>, String) {
    let manifest = format!(
        "format = 1\nname = \"{name}\"\nversion = \"{version}\"\nabi = 2\nlibrary = \"testkit\"\n\n\
         [steps.noop]\ntimeout_ms = 10000\nidempotent = true\n\n\
         [kinds.{kind}]\nsteps = [{{ step = \"noop\" }}]\n"
    );
    let bytes = build_testkit(&manifest).unwrap();
    let sig = sign_with(&test_key(), &bytes, name, version);
    (bytes, sig)
}

/// Going back to an older version that provides a kind another bundle has
/// since taken is refused too, and changes nothing.
async fn an_activation_may_not_give_a_kind_a_second_provider(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let push = async |(bytes, sig): (Vec<u8>, String)| {
        let (status, resp) = server.push(bytes, &sig).await;
        assert_eq!(status, 201, "{resp}");
        resp["hash"].as_str().unwrap().to_owned()
    };
    // side 1.0 provides `shared`, side 2.0 no longer does, so other may.
    let side1 = push(side_bundle("side", "1.0.0", "shared")).await;
    push(side_bundle("side", "2.0.0", "side_only")).await;
    let other = push(side_bundle("other", "1.0.0", "shared")).await;

    let (status, resp) = server
        .post(&format!("/v1/bundles/{side1}/activate"), &json!({}))
        .await;
    assert_eq!(status, 409, "{resp}");
    assert_eq!(resp["error"]["code"], "kind_conflict", "{resp}");
    let message = resp["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("other") && message.contains("shared"),
        "{message}"
    );
    // Nothing changed: side 2.0 and other stay the active ones, and
    // `shared` runs on other.
    let (_, bundles) = server.get("/v1/bundles").await;
    let mut active: Vec<(&str, &str)> = bundles["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["status"] == "active" && b["name"] != "testkit" && b["name"] != "builtin")
        .map(|b| (b["name"].as_str().unwrap(), b["version"].as_str().unwrap()))
        .collect();
    active.sort();
    assert_eq!(active, [("other", "1.0.0"), ("side", "2.0.0")], "{bundles}");
    let id = server.submit("shared", "t", json!({})).await;
    let a = server.finished(id).await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(a["bundle"], other.as_str(), "{a}");
    let pool = env.sql().await;
    let activated: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE event = 'bundle.activated' AND subject = ?",
    )
    .bind(&side1)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(activated, 0, "a refused activation is not audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_follows_its_release_candidate() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let key = test_key();
    for version in ["1.0.0-rc.1", "1.0.0+build.7"] {
        let (bytes, sig) = testkit_version(version, &key);
        let (status, resp) = server.push(bytes, &sig).await;
        assert_eq!(status, 201, "{version}: {resp}");
    }
    // Build metadata does not make a newer version; a pre-release of the
    // release is older.
    for version in ["1.0.0+build.8", "1.0.0-rc.2"] {
        let (bytes, sig) = testkit_version(version, &key);
        let (status, resp) = server.push(bytes, &sig).await;
        assert_eq!(status, 409, "{version}: {resp}");
        assert_eq!(resp["error"]["code"], "bundle_version_not_newer");
    }
    // And `bundle build` wants a semver version.
    let base = std::fs::read_to_string(workspace().join("steps/testkit/bundle.toml")).unwrap();
    let err = build_testkit(&base.replace("version = \"0.1.0\"", "version = \"7\"")).unwrap_err();
    assert!(err.contains("semantic versioning"), "{err}");
}
