//! The SQL the README offers for watching actions runs, on both databases,
//! and means what it says.

use serde_json::json;

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

    let mut ran = 0;
    for (only, sql) in readme_queries() {
        if only.is_some_and(|d| d != db) {
            continue;
        }
        let sql = sql.replace("action_id = 17", &format!("action_id = {new}"));
        let inner = sql.trim().trim_end_matches(';');
        if sql.contains("status = 'failed'") {
            let ids: Vec<i64> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT q.id FROM ({inner}) q")))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            assert_eq!(ids, [new], "the last hour's failures only: {sql}");
        }
        if sql.contains("FROM action_steps") {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM ({inner}) q"
            )))
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(n, 3, "{sql}");
        }
        ran += 1;
    }
    assert!(ran >= 4, "ran {ran}");
}

both_dbs!(the_readmes_sql_runs_and_means_what_it_says);
