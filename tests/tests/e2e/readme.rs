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
