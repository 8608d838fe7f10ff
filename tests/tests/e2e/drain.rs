//! A graceful shutdown keeps answering: new work is refused with `503
//! shutting_down`, reads and long-polls are served until the engine stops,
//! and `--wait` rides over a restart.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Db, Env, both_dbs, http_client, troupe_bin};

async fn the_api_answers_through_a_drain(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--shutdown-grace", "20s"]);
    // One step, which the drain lets finish.
    let id = server
        .submit("run", "vps-1", json!({ "argv": ["sleep", "5"] }))
        .await;
    server
        .until(id, "running", |a| a["current_step"] == "run_command")
        .await;
    // A long-poll from before the signal.
    let poll = {
        let (url, token) = (server.url.clone(), server.token.clone());
        tokio::spawn(async move {
            http_client()
                .get(format!("{url}/v1/actions/{id}?wait=20s"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.signal("TERM");

    // Submits are accepted until the signal is handled, then refused.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (status, resp) = loop {
        let body = json!({ "kind": "noop1", "target": "vps-2", "params": {} });
        let (status, resp) = server.post("/v1/actions", &body).await;
        if status != 202 {
            break (status, resp);
        }
        assert!(Instant::now() < deadline, "submits still accepted: {resp}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "{resp}");
    assert_eq!(resp["error"]["code"], "shutting_down");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("submit again"),
        "{resp}"
    );
    let (status, a) = server.get(&format!("/v1/actions/{id}")).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["status"], "running", "{a}");

    let a = poll.await.unwrap();
    assert_eq!(a["status"], "succeeded", "the long-poll saw the end: {a}");
    let exit = server.sigterm();
    assert!(exit.success(), "{exit:?}");
}

async fn submit_wait_rides_over_a_restart(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--shutdown-grace", "200ms"]);
    let addr = server.url.trim_start_matches("http://").to_owned();
    let cli = Command::new(troupe_bin())
        .args([
            "submit",
            "stubborn",
            "--target",
            "vps-1",
            "--param-json",
            "ms=1500",
            "--wait",
        ])
        .args(["--server", &server.url])
        .env("TROUPE_TOKEN_FILE", &server.token_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    server
        .until(1, "running", |a| a["current_step"] == "stubborn")
        .await;
    // Stopped before the step ends: the action resumes on the next start.
    assert!(server.sigterm().success());
    let server = env.serve_with(&["--listen", &addr]);
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("action 1 succeeded"), "{stdout}");
    assert!(
        stderr.contains("reconnecting to keep following action 1"),
        "{stderr}"
    );
    assert!(stderr.contains("reconnected"), "{stderr}");
    assert_eq!(server.finished(1).await["status"], "succeeded");
}

both_dbs!(
    the_api_answers_through_a_drain,
    submit_wait_rides_over_a_restart
);
