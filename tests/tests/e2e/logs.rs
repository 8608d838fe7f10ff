//! Step logs: what a step logs through `Context::log` is kept per attempt,
//! never mixed between calls that share a host, bounded, masked, and kept
//! when the host is killed.

use serde_json::{Value, json};

use crate::harness::{Db, Env, Server, both_dbs};

async fn logs_of(server: &Server, id: i64) -> Vec<Value> {
    let (status, body) = server.get(&format!("/v1/actions/{id}/logs")).await;
    assert_eq!(status, 200, "{body}");
    body["logs"].as_array().unwrap().clone()
}

async fn each_attempt_keeps_its_own_lines(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    // Two actions on one host at once, one of them retried: every line
    // lands in the log of the call that wrote it.
    let a = server
        .submit(
            "logs",
            "vps-a",
            json!({ "lines": 200, "retryable_times": 1 }),
        )
        .await;
    let b = server
        .submit("logs", "vps-b", json!({ "lines": 200 }))
        .await;
    for id in [a, b] {
        assert_eq!(server.finished(id).await["status"], "succeeded");
    }

    let logs = logs_of(&server, a).await;
    assert_eq!(logs.len(), 2, "one log per attempt: {logs:?}");
    for (i, log) in logs.iter().enumerate() {
        let attempt = i + 1;
        assert_eq!(log["seq"], 0);
        assert_eq!(log["step"], "logger");
        assert_eq!(log["attempt"], attempt);
        let text = log["log"].as_str().unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 201, "{text}");
        for (n, line) in lines[..200].iter().enumerate() {
            assert_eq!(*line, format!("vps-a line {n} (attempt {attempt})"));
        }
        assert_eq!(lines[200], "vps-a from a helper thread");
        assert!(text.ends_with('\n'));
    }
    let logs = logs_of(&server, b).await;
    assert_eq!(logs.len(), 1, "{logs:?}");
    let text = logs[0]["log"].as_str().unwrap();
    assert!(
        text.lines().all(|l| l.starts_with("vps-b ")),
        "another call's lines: {text}"
    );
    assert_eq!(text.lines().count(), 201);

    // The noop step logged nothing: no row.
    let pool = env.sql().await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM step_logs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3);

    // The CLI shows them.
    let out = server.cli(&["status", &a.to_string(), "--logs"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("--- logger (step 0), attempt 2 ---\nvps-a line 0 (attempt 2)\n"),
        "{stdout}"
    );
    let out = server.cli(&["status", &a.to_string(), "--logs", "--json"]);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["logs"].as_array().unwrap().len(), 2, "{shown}");
    assert_eq!(shown["status"], "succeeded");

    // An unknown action is a 404, not an empty list.
    let (status, body) = server.get("/v1/actions/999999/logs").await;
    assert_eq!(status, 404, "{body}");
}

async fn a_long_log_is_cut_saying_so(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    // Lines of several lengths, so the cut falls at different places
    // against the limit; every log must end with the note.
    for pad in [1, 23, 100, 311] {
        let padding = "x".repeat(pad);
        let id = server
            .submit("logs", "t", json!({ "lines": 5000, "text": padding }))
            .await;
        assert_eq!(server.finished(id).await["status"], "succeeded");
        let logs = logs_of(&server, id).await;
        let text = logs[0]["log"].as_str().unwrap();
        assert!(text.len() <= (64 << 10) + 64, "{} bytes kept", text.len());
        assert!(text.len() > 60 << 10, "{} bytes kept", text.len());
        assert!(text.starts_with("t line 0 (attempt 1)x"), "{}", &text[..80]);
        assert!(
            text.ends_with("[log cut: the step logged more than 64 KiB]\n"),
            "padding {pad}: {}",
            &text[text.len() - 200..]
        );
    }
}

async fn secrets_are_masked_in_logs(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let secret = "tok-logged-5e4d3c2b1a";
    let (status, body) = server
        .request(
            reqwest::Method::PUT,
            "/v1/secrets/test_token",
            Some(json!({ "value": secret }).to_string()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = server.submit("logs_secret", "t", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
    let logs = logs_of(&server, id).await;
    let text = logs[0]["log"].as_str().unwrap();
    assert!(text.contains("t line 0 (attempt 1) token=***\n"), "{text}");
    let pool = env.sql().await;
    let stored: String = sqlx::query_scalar("SELECT log FROM step_logs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!stored.contains(secret), "{stored}");
}

async fn a_killed_host_keeps_what_the_step_logged(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let id = server.submit("logs_hang", "t", json!({})).await;
    let action = server.finished(id).await;
    assert_eq!(action["status"], "failed", "{action}");
    let error = action["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("timed out"), "{error}");
    let logs = logs_of(&server, id).await;
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(
        logs[0]["log"],
        "t line 0 (attempt 1)\nt line 1 (attempt 1)\nt from a helper thread\n"
    );
}

both_dbs!(
    each_attempt_keeps_its_own_lines,
    a_long_log_is_cut_saying_so,
    secrets_are_masked_in_logs,
    a_killed_host_keeps_what_the_step_logged,
);
