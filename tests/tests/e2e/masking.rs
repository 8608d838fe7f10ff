//! Secrets never leave troupe in the clear: a step that gives its secret
//! away in every form (in object keys, base64, URL-safe base64, percent-
//! encoded, inside HTTP Basic auth, cut in half at a string's edge, across
//! the cut of a long error), on every ending (success, retryable errors,
//! retries exhausted, timeouts), leaves no form of it in any column of any
//! table, the SQLite file and its WAL, any API answer or the server log.

use serde_json::json;

use crate::harness::{Db, Env, Server, both_dbs};

/// Distinct enough that no form of it turns up by chance; it has bytes that
/// percent-encoding and base64's two alphabets write differently.
const SECRET: &str = "tok/Q9+xZ=e7 K~mW4?vJ2";

/// The user name the `leak` kind sends the secret with as Basic auth.
const USER: &str = "root";

/// Every form of [`SECRET`] the `leak` step gives away, by name.
fn forms() -> Vec<(&'static str, String)> {
    let b = SECRET.as_bytes();
    let basic = base64(format!("{USER}:{SECRET}").as_bytes(), false);
    // The characters of the Basic value that depend on the secret alone.
    let offset = USER.len() + 1;
    let core = &basic[(8 * offset).div_ceil(6)..8 * (offset + b.len()) / 6];
    let half = SECRET.len() / 2;
    vec![
        ("the secret", SECRET.to_owned()),
        ("base64", base64(b, false)),
        ("URL-safe base64", base64(b, true)),
        ("percent-encoded", percent(SECRET)),
        ("in Basic auth", core.to_owned()),
        ("its first half", SECRET[..half].to_owned()),
        ("its second half", SECRET[half..].to_owned()),
    ]
}

async fn every_form_of_a_secret_is_masked_everywhere(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let (status, body) = server
        .request(
            reqwest::Method::PUT,
            "/v1/secrets/test_token",
            Some(json!({ "value": SECRET }).to_string()),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Succeeds on its third attempt, after two retryable errors.
    let retried = server
        .submit("leak", "a", json!({ "retryable_times": 2 }))
        .await;
    // Fails all three.
    let exhausted = server
        .submit("leak", "b", json!({ "retryable_times": 5 }))
        .await;
    // Times out on both attempts.
    let timed_out = server.submit("leak_slow", "c", json!({})).await;
    let ids = [retried, exhausted, timed_out];

    let action = server.finished(retried).await;
    assert_eq!(action["status"], "succeeded", "{action}");
    let output = &action["steps"][0]["output"];
    assert_eq!(output["Basic ***"], 1, "{action}");
    for field in ["base64", "base64_url", "percent"] {
        assert_eq!(output[field], "***", "{field}: {action}");
    }
    let basic = output["basic"].as_str().unwrap();
    assert!(
        basic.starts_with("Basic ") && basic.contains("***"),
        "{basic}"
    );
    let tail = output["tail"].as_str().unwrap();
    assert!(tail.starts_with("***x"), "{tail}");
    let head = output["head"].as_str().unwrap();
    assert!(head.ends_with("token=***"), "{head}");
    let action = server.finished(exhausted).await;
    assert_eq!(action["status"], "failed", "{action}");
    let error = action["steps"][0]["error"].as_str().unwrap();
    let end = &error[error.len() - 300..];
    assert!(error.starts_with("{\"Basic ***\""), "{end}");
    assert!(
        error.contains("x***yyy") && end.contains("more bytes cut]"),
        "cut: {end}"
    );
    let action = server.finished(timed_out).await;
    assert_eq!(action["status"], "failed", "{action}");
    let error = action["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("timed out"), "{error}");

    // Each attempt's error and log is kept, masked.
    let pool = env.sql().await;
    let attempts: Vec<(i64, String)> = sqlx::query_as(
        "SELECT action_id, error FROM action_step_attempts ORDER BY action_id, attempt",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let per = |id| attempts.iter().filter(|(a, _)| *a == id).count();
    assert_eq!(
        (per(retried), per(exhausted), per(timed_out)),
        (2, 2, 1),
        "{attempts:?}"
    );
    assert!(
        attempts
            .iter()
            .all(|(_, e)| e.contains("***") || e.contains("timed out")),
        "{attempts:?}"
    );
    let logs: Vec<String> = sqlx::query_scalar("SELECT log FROM step_logs")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(logs.len(), 3 + 3 + 2, "one per attempt: {logs:?}");
    assert!(logs.iter().all(|l| l.contains("\"Basic ***\"")), "{logs:?}");

    // The sweep: every place a secret could be left.
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    for id in ids {
        for path in [
            format!("/v1/actions/{id}"),
            format!("/v1/actions/{id}?wait=1s"),
            format!("/v1/actions/{id}/logs"),
        ] {
            places.push(api(&server, &path).await);
        }
    }
    for path in [
        "/v1/actions",
        "/v1/actions?limit=1000",
        "/v1/audit",
        "/v1/secrets",
        "/v1/kinds",
        "/v1/tokens",
        "/v1/bundles",
        "/v1/nodes",
    ] {
        places.push(api(&server, path).await);
    }
    places.extend(every_column(&pool, db).await);
    if db == Db::Sqlite {
        let file = env.dir.join("troupe.db");
        places.push(("troupe.db".into(), std::fs::read(&file).unwrap()));
        for extra in ["troupe.db-wal", "troupe.db-shm"] {
            if let Ok(bytes) = std::fs::read(env.dir.join(extra)) {
                places.push((extra.into(), bytes));
            }
        }
        assert!(
            places
                .iter()
                .any(|(p, b)| p == "troupe.db-wal" && !b.is_empty())
        );
    }
    // What the step printed reached the server's log, masked.
    let log = server.log();
    assert!(
        log.contains("printed {") && log.contains("Basic ***"),
        "{log}"
    );
    places.push(("the server log".into(), log.into_bytes()));

    let forms = forms();
    for (place, bytes) in &places {
        // Forms are ASCII: a lossy reading keeps every one of them.
        let text = String::from_utf8_lossy(bytes);
        for (name, form) in &forms {
            if let Some(at) = text.find(form.as_str()) {
                let from = text.floor_char_boundary(at.saturating_sub(80));
                let to = text.ceil_char_boundary((at + form.len() + 80).min(text.len()));
                panic!("{place} holds {name} ({form:?}): …{}…", &text[from..to]);
            }
        }
    }
}

async fn api(server: &Server, path: &str) -> (String, Vec<u8>) {
    let (status, body) = server.get(path).await;
    assert_eq!(status, 200, "{path}: {body}");
    (format!("GET {path}"), body.to_string().into_bytes())
}

/// The bytes of every column of every table.
async fn every_column(pool: &sqlx::AnyPool, db: Db) -> Vec<(String, Vec<u8>)> {
    let columns: Vec<(String, String)> = match db {
        Db::Sqlite => sqlx::query_as(
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p \
             WHERE m.type = 'table'",
        ),
        Db::MySql => sqlx::query_as(
            "SELECT CAST(table_name AS CHAR), CAST(column_name AS CHAR) \
             FROM information_schema.columns WHERE table_schema = DATABASE()",
        ),
    }
    .fetch_all(pool)
    .await
    .unwrap();
    let tables: std::collections::BTreeSet<&str> =
        columns.iter().map(|(t, _)| t.as_str()).collect();
    for needed in [
        "action_steps",
        "action_step_attempts",
        "step_logs",
        "audit_log",
        "actions",
    ] {
        assert!(tables.contains(needed), "no table {needed}: {tables:?}");
    }
    let mut out = Vec::new();
    for (table, column) in &columns {
        let cast = match db {
            Db::Sqlite => format!("SELECT CAST(\"{column}\" AS BLOB) FROM \"{table}\""),
            Db::MySql => format!("SELECT CAST(`{column}` AS BINARY) FROM `{table}`"),
        };
        let values: Vec<Option<Vec<u8>>> = sqlx::query_scalar(sqlx::AssertSqlSafe(cast))
            .fetch_all(pool)
            .await
            .unwrap();
        let bytes = values.into_iter().flatten().flatten().collect();
        out.push((format!("{table}.{column}"), bytes));
    }
    out
}

fn base64(bytes: &[u8], url_safe: bool) -> String {
    let alphabet: &[u8] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

both_dbs!(every_form_of_a_secret_is_masked_everywhere);
