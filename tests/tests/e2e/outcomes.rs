//! Every submit's answer is true to what was stored: `outcome_unknown` when
//! the insert may have been committed (its COMMIT's answer lost, or the
//! submit timeout passed first), `database_unavailable` only when nothing
//! was; and `troupe submit` sends an idempotency key every time and retries
//! with it, so a retry never makes a second action.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cli::text;
use crate::harness::{Db, Env, Server, both_dbs, troupe_bin};

both_dbs!(
    a_commit_whose_answer_was_lost_is_outcome_unknown,
    a_write_that_failed_before_commit_is_database_unavailable,
    a_submit_past_the_timeout_is_outcome_unknown_and_still_runs,
    the_cli_retries_a_lost_commit_with_one_key,
    the_cli_retries_through_a_timed_out_submit,
    the_cli_retries_until_the_server_is_back,
);

/// Every action the server holds, oldest first.
async fn actions(server: &Server) -> Vec<Value> {
    let (status, list) = server.get("/v1/actions?limit=100").await;
    assert_eq!(status, 200, "{list}");
    let mut actions = list["actions"].as_array().unwrap().clone();
    actions.reverse();
    actions
}

fn armed(server: &Server) {
    assert!(
        server.log().contains("failure points armed"),
        "{}",
        server.log()
    );
}

/// The insert was committed but the server lost COMMIT's answer: the client
/// hears the outcome is unknown (not that nothing changed), and the same
/// request with the same key answers with the one stored action.
async fn a_commit_whose_answer_was_lost_is_outcome_unknown(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(
        &[],
        &[("FAILPOINTS", "store.after_insert_commit=1*return->off")],
    );
    armed(&server);
    let body =
        json!({ "kind": "noop1", "target": "vps-1", "params": {}, "idempotency_key": "k-lost" });
    let (status, resp) = server.post("/v1/actions", &body).await;
    assert_eq!(status, 503, "{resp}");
    assert_eq!(resp["error"]["code"], "outcome_unknown", "{resp}");
    let message = resp["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("may or may not") && message.contains("same idempotency key"),
        "{message}"
    );
    assert!(!message.contains("nothing"), "{message}");
    let (status, again) = server.post("/v1/actions", &body).await;
    assert_eq!(status, 200, "{again}");
    let stored = actions(&server).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["id"], again["id"]);
    let id = again["id"].as_i64().unwrap();
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

/// The insert failed before COMMIT: `database_unavailable` is true, nothing
/// was stored, and the retry creates the action (202, not a replay).
async fn a_write_that_failed_before_commit_is_database_unavailable(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(
        &[],
        &[("FAILPOINTS", "store.before_insert_commit=1*return->off")],
    );
    armed(&server);
    let body =
        json!({ "kind": "noop1", "target": "vps-1", "params": {}, "idempotency_key": "k-before" });
    let (status, resp) = server.post("/v1/actions", &body).await;
    assert_eq!(status, 503, "{resp}");
    assert_eq!(resp["error"]["code"], "database_unavailable", "{resp}");
    assert!(actions(&server).await.is_empty());
    let (status, again) = server.post("/v1/actions", &body).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(actions(&server).await.len(), 1);
    let id = again["id"].as_i64().unwrap();
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

/// A commit that takes longer than `--submit-timeout` (held 3 s before its
/// COMMIT is sent): the submit answers `outcome_unknown` at the timeout,
/// the insert commits afterwards and the action runs, and the retry with
/// the key finds it.
async fn a_submit_past_the_timeout_is_outcome_unknown_and_still_runs(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(
        &["--submit-timeout", "1s"],
        &[(
            "FAILPOINTS",
            "store.before_insert_commit=1*sleep(3000)->off",
        )],
    );
    armed(&server);
    let body =
        json!({ "kind": "noop1", "target": "vps-1", "params": {}, "idempotency_key": "k-slow" });
    let began = Instant::now();
    let (status, resp) = server.post("/v1/actions", &body).await;
    let took = began.elapsed();
    assert_eq!(status, 503, "{resp}");
    assert_eq!(resp["error"]["code"], "outcome_unknown", "{resp}");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("submit timeout (1s)"),
        "{resp}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "answered after {took:?}"
    );
    // Stored after the answer, all the same: it shows up and runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        if let Some(a) = actions(&server).await.first() {
            break a["id"].as_i64().unwrap();
        }
        assert!(Instant::now() < deadline, "the insert never committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(server.finished(id).await["status"], "succeeded");
    let (status, again) = server.post("/v1/actions", &body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], id);
    assert_eq!(actions(&server).await.len(), 1);
}

/// `troupe submit` with no key: the first two commits lose their answers
/// (`outcome_unknown`); it retries with the key it made up and ends with
/// the one action. A request the server refuses (4xx) is not retried.
async fn the_cli_retries_a_lost_commit_with_one_key(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(
        &[],
        &[("FAILPOINTS", "store.after_insert_commit=2*return->off")],
    );
    armed(&server);
    let out = server.cli(&["submit", "noop1", "--target", "vps-1", "--json"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert_eq!(
        said.matches("trying again").count(),
        2,
        "two retries: {said}"
    );
    assert!(said.contains("outcome_unknown"), "{said}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = printed["idempotency_key"].as_str().unwrap();
    assert!(
        key.len() == 32 && key.chars().all(|c| c.is_ascii_hexdigit()),
        "{key}"
    );
    let stored = actions(&server).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["idempotency_key"], key);
    let id = stored[0]["id"].as_i64().unwrap();
    assert_eq!(server.finished(id).await["status"], "succeeded");
    // A second submit gets a key of its own: a new action.
    let out = server.cli(&["submit", "noop1", "--target", "vps-1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(actions(&server).await.len(), 2);
    // Refused for itself: once, at once.
    let out = server.cli(&["submit", "no-such-kind", "--target", "vps-1"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("[unknown_kind]"), "{said}");
    assert!(!said.contains("trying again"), "{said}");
    assert!(!said.contains("--idempotency-key"), "{said}");
}

/// The insert is held 2.5 s against a 1 s submit timeout: the CLI's first
/// try hears `outcome_unknown`, its retries find the target's turn still
/// taken or the action stored, and it ends with the one action.
async fn the_cli_retries_through_a_timed_out_submit(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(
        &["--submit-timeout", "1s"],
        &[(
            "FAILPOINTS",
            "store.before_insert_commit=1*sleep(2500)->off",
        )],
    );
    armed(&server);
    let out = server.cli(&["submit", "noop1", "--target", "vps-1"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("outcome_unknown"), "{said}");
    assert!(said.contains("trying again"), "{said}");
    let stored = actions(&server).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(
        said.contains(&format!("action {} ", stored[0]["id"])),
        "{said}"
    );
}

/// The server is stopped when `troupe submit` starts: it keeps trying, and
/// once the server is back (at the same address) its submit goes through,
/// once.
async fn the_cli_retries_until_the_server_is_back(db: Db) {
    use std::io::BufRead;
    let env = Env::new(db).await;
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let server = env.serve_with(&["--listen", &listen]);
    let (url, token_file) = (server.url.clone(), server.token_file.clone());
    assert!(server.sigterm().success());
    let mut cli = std::process::Command::new(troupe_bin())
        .args(["submit", "noop1", "--target", "vps-1", "--retry-for", "60s"])
        .args(["--server", &url])
        .env("TROUPE_TOKEN_FILE", &token_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = cli.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the CLI says it retries");
    assert!(
        first.contains("cannot reach") && first.contains("trying again"),
        "{first}"
    );
    let server = env.serve_with(&["--listen", &listen]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = cli.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the CLI never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut cli.stdout.take().unwrap(), &mut out).unwrap();
    let said: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "{out}{said:?}");
    let stored = actions(&server).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(
        out.contains(&format!("action {} ", stored[0]["id"])),
        "{out}"
    );
}

/// A loopback port nothing listens on (just now).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Nothing answers: `troupe submit` keeps trying for `--retry-for`, then
/// fails saying the key to try again with.
#[test]
fn the_cli_gives_up_after_retry_for_and_names_its_key() {
    let port = free_port();
    let began = Instant::now();
    let out = std::process::Command::new(troupe_bin())
        .args(["submit", "noop1", "--target", "vps-1", "--retry-for", "2s"])
        .args(["--server", &format!("http://127.0.0.1:{port}")])
        .env("TROUPE_TOKEN", "troupe_unused")
        .output()
        .unwrap();
    let took = began.elapsed();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cannot reach"), "{said}");
    assert!(said.matches("trying again").count() >= 2, "{said}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(10),
        "gave up after {took:?}: {said}"
    );
    let key = said
        .split("--idempotency-key ")
        .nth(1)
        .and_then(|rest| rest.get(..32))
        .unwrap_or_else(|| panic!("no key in: {said}"));
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()), "{said}");
    // Told to try once, it does.
    let out = std::process::Command::new(troupe_bin())
        .args(["submit", "noop1", "--target", "vps-1", "--retry-for", "0s"])
        .args(["--server", &format!("http://127.0.0.1:{port}")])
        .env("TROUPE_TOKEN", "troupe_unused")
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(!said.contains("trying again"), "{said}");
}

/// Two servers on one MariaDB: a keyed submit sent through the second while
/// the first's insert of it is written but not yet committed (held 2 s)
/// waits for it and answers with that action, `200`, not an error; and the
/// first's answer is the same action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_through_another_server_meets_the_uncommitted_insert() {
    let env = Env::new(Db::MySql).await;
    let first = std::sync::Arc::new(env.serve_with_env(
        &[],
        &[("FAILPOINTS", "store.insert_uncommitted=1*sleep(2000)->off")],
    ));
    armed(&first);
    let second = env.serve_another(&[]);
    let body =
        json!({ "kind": "noop1", "target": "vps-1", "params": {}, "idempotency_key": "k-two" });
    let sent = {
        let (first, body) = (first.clone(), body.clone());
        tokio::spawn(async move { first.post("/v1/actions", &body).await })
    };
    // The first server's insert is written and its transaction open.
    let sql = env.sql().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.INNODB_TRX t \
             JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id \
             WHERE p.DB = DATABASE() AND t.trx_rows_modified > 0",
        )
        .fetch_one(&sql)
        .await
        .unwrap();
        if open > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the insert was never held open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, again) = second.post("/v1/actions", &body).await;
    assert_eq!(status, 200, "{again}");
    let (status, made) = sent.await.unwrap();
    assert_eq!(status, 202, "{made}");
    assert_eq!(again["id"], made["id"]);
    assert_eq!(actions(&second).await.len(), 1);
}

/// On a shared database a queued action's runner claims its turn in the
/// commit that records its first step started. That commit is made but its
/// answer lost (as when the node written through dies at `COMMIT`): the
/// runner, trying it again, finds nothing left to claim — its own first try
/// claimed it — and must see that the action is its own at the new epoch
/// and go on, not leave it `running` with nobody to finish it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_claimed_by_a_commit_whose_answer_was_lost_goes_on() {
    let env = Env::new(Db::MySql).await;
    let server = env.serve_with_env(
        &[],
        &[("FAILPOINTS", "store.after_turn_commit=1*return->off")],
    );
    armed(&server);
    // The second waits for the first (one target): its start claims its turn.
    let first = server.submit("noop3", "vps-1", json!({})).await;
    let second = server.submit("noop3", "vps-1", json!({})).await;
    for id in [first, second] {
        let done = server.finished(id).await;
        assert_eq!(done["status"], "succeeded", "{done}\n{}", server.log());
    }
    assert!(
        server.log().contains("cannot record action progress"),
        "the lost answer was not injected:\n{}",
        server.log()
    );
}
