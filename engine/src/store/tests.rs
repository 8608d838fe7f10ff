//! The store against real databases: SQLite in a temporary file, and
//! MariaDB when `TROUPE_TEST_MYSQL` names a server (as `tests/run` does).

use chrono::{TimeZone, Utc};
use serde_json::Map;

use super::{Outcome, Store, Write};
use crate::model::{ActionId, ActionStatus, NewAction, StepStatus, Timestamp};

#[test]
fn redacts_passwords() {
    assert_eq!(
        super::redact("mysql://u:secret@h:1/db"),
        "mysql://u:***@h:1/db"
    );
    assert_eq!(super::redact("sqlite://x.db"), "sqlite://x.db");
}

#[test]
fn knows_which_servers_have_insert_returning() {
    assert!(super::mariadb_has_returning("10.11.19-MariaDB-0+deb12u1"));
    assert!(super::mariadb_has_returning("11.4.2-MariaDB"));
    assert!(!super::mariadb_has_returning("10.4.34-MariaDB"));
    assert!(!super::mariadb_has_returning("8.0.36"));
}

fn at(ms: i64) -> Timestamp {
    Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
}

/// An insert; with `start`, one that begins as it is inserted.
fn insert(target: &str, key: Option<&str>, start: bool) -> Write {
    Write::Insert {
        new: NewAction {
            kind: "noop3".into(),
            target: target.into(),
            params: Map::new(),
            idempotency_key: key.map(str::to_owned),
            bundle: None,
        },
        bundle: "b".repeat(64),
        request_hash: "h".repeat(64),
        owner: "test".into(),
        steps: (0..3)
            .map(|i| (format!("s{i}"), "noop".to_owned()))
            .collect(),
        at: at(0),
        start: start.then(|| at(60_000)),
    }
}

/// One commit's worth of writes as runners and Control send them: starts
/// with first steps, a success riding with the next step's start, a finish,
/// a cancel that wins the race against a start, a success and a start of the
/// same step in one batch (which must not be reordered), and an insert with
/// an idempotency key between the others.
fn batch(a: ActionId, b: ActionId, c: ActionId, d: ActionId) -> Vec<Write> {
    let start = |id, ms| Write::Start {
        id,
        owner: "test".into(),
        lease_until: at(60_000),
        at: at(ms),
    };
    let step_started = |id, seq, ms| Write::StepStarted {
        id,
        seq,
        name: format!("s{seq}"),
        attempt: 1,
        at: at(ms),
    };
    let step_succeeded = |id, seq, ms| Write::StepSucceeded {
        id,
        seq,
        output: format!("{{\"seq\":{seq}}}"),
        at: at(ms),
    };
    vec![
        start(a, 1),
        step_started(a, 0, 1),
        Write::CancelQueued { id: b, at: at(2) },
        start(b, 3),
        step_started(b, 0, 3),
        insert("t-keyed", Some("key-1"), false),
        start(c, 4),
        step_started(c, 0, 4),
        step_succeeded(c, 0, 5),
        step_started(c, 1, 5),
        step_succeeded(a, 0, 6),
        step_started(a, 1, 6),
        insert("t-plain", None, false),
        start(d, 7),
        step_started(d, 0, 7),
        Write::StepEnded {
            id: d,
            seq: 0,
            status: StepStatus::Failed,
            error: "boom".into(),
            at: at(8),
        },
        Write::Finish {
            id: d,
            status: ActionStatus::Failed,
            error: Some("step \"s0\" failed: boom".into()),
            at: at(8),
            last: None,
        },
        step_succeeded(c, 1, 9),
        Write::Finish {
            id: c,
            status: ActionStatus::Cancelled,
            error: Some("cancelled on request".into()),
            at: at(9),
            last: None,
        },
        step_succeeded(a, 1, 10),
        step_started(a, 2, 10),
        step_succeeded(a, 2, 11),
        Write::Finish {
            id: a,
            status: ActionStatus::Succeeded,
            error: None,
            at: at(11),
            last: None,
        },
        insert("t-begun", None, true),
        insert("t-begun-keyed", Some("key-2"), true),
    ]
}

async fn inserted(store: &Store, target: &str) -> ActionId {
    match store
        .write(vec![insert(target, None, false)])
        .await
        .unwrap()[0]
    {
        Outcome::Inserted(id) => id,
        other => panic!("insert answered {other:?}"),
    }
}

/// Everything the store holds about actions, in a comparable form.
async fn dump(store: &Store) -> Vec<String> {
    let mut out = Vec::new();
    for id in 1..=8 {
        out.push(format!("{:?}", store.action(id).await.unwrap()));
    }
    out
}

/// Commits the batch as one write and, on a second database, write by
/// write; both must end the same, and the start that lost to the cancel
/// must say so. The same writes applied in memory (as runners keep their
/// action) must give what the database holds.
async fn batch_equals_one_by_one(together: Store, alone: Store) {
    for store in [&together, &alone] {
        for target in ["t-a", "t-b", "t-c", "t-d"] {
            inserted(store, target).await;
        }
    }
    let mut mirrors = Vec::new();
    for id in 1..=4 {
        mirrors.push(together.action(id).await.unwrap().unwrap());
    }
    let writes = batch(1, 2, 3, 4);
    for w in &writes {
        for m in &mut mirrors {
            w.apply_to(m);
        }
    }
    let outcomes = together.write(writes.clone()).await.unwrap();
    assert_eq!(
        outcomes[3],
        Outcome::Done { rows: 0 },
        "the cancelled action's start"
    );
    assert_eq!(outcomes[0], Outcome::Done { rows: 1 }, "a start");
    assert!(
        matches!(outcomes[5], Outcome::Inserted(5)),
        "{:?}",
        outcomes[5]
    );
    assert!(
        matches!(outcomes[12], Outcome::Inserted(6)),
        "{:?}",
        outcomes[12]
    );
    // What an insert stores, as the engine builds it without reading it back.
    for (i, w) in writes.iter().enumerate() {
        if let Outcome::Inserted(id) = outcomes[i] {
            let stored = together.action(id).await.unwrap().unwrap();
            let built = w.inserted(id).unwrap();
            assert_eq!(format!("{built:?}"), format!("{stored:?}"), "insert {i}");
        }
    }
    for (i, id) in [(writes.len() - 2, 7), (writes.len() - 1, 8)] {
        assert_eq!(outcomes[i], Outcome::Inserted(id));
        let begun = together.action(id).await.unwrap().unwrap();
        assert_eq!(begun.status, ActionStatus::Running);
        assert_eq!(begun.current_step.as_deref(), Some("s0"));
        assert_eq!(begun.steps[0].status, StepStatus::Running);
        assert_eq!(begun.steps[0].attempt, 1);
        assert_eq!(begun.steps[1].status, StepStatus::Pending);
    }
    let mut singly = Vec::new();
    for w in writes {
        singly.extend(alone.write(vec![w]).await.unwrap());
    }
    assert_eq!(outcomes, singly);
    let (x, y) = (dump(&together).await, dump(&alone).await);
    for (x, y) in x.iter().zip(&y) {
        assert_eq!(x, y);
    }
    for m in mirrors {
        let stored = together.action(m.id).await.unwrap().unwrap();
        assert_eq!(
            format!("{m:?}"),
            format!("{stored:?}"),
            "action {} in memory",
            m.id
        );
    }
    let c = together.action(3).await.unwrap().unwrap();
    let statuses: Vec<StepStatus> = c.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Succeeded,
            StepStatus::Succeeded,
            StepStatus::Skipped
        ]
    );
    assert_eq!(c.steps[1].output, Some(serde_json::json!({ "seq": 1 })));
    let a = together.action(1).await.unwrap().unwrap();
    assert_eq!(a.status, ActionStatus::Succeeded);
    assert!(a.steps.iter().all(|s| s.status == StepStatus::Succeeded));
    let b = together.action(2).await.unwrap().unwrap();
    assert_eq!(b.status, ActionStatus::Cancelled);
    assert!(b.steps.iter().all(|s| s.status == StepStatus::Skipped));
}

fn sqlite_url(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("troupe-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}", dir.join("t.db").display())
}

async fn mysql_url(name: &str) -> String {
    let base = std::env::var("TROUPE_TEST_MYSQL").expect(
        "TROUPE_TEST_MYSQL is not set: run the tests with `bash tests/run`, which starts a throwaway MariaDB",
    );
    let db = format!("troupe_store_{}_{name}", std::process::id());
    let pool = sqlx::MySqlPool::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db}")))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    format!("{}/{db}", base.trim_end_matches('/'))
}

#[tokio::test]
async fn sqlite_batch_commits_like_single_writes() {
    let together = Store::connect(&sqlite_url("together")).await.unwrap();
    let alone = Store::connect(&sqlite_url("alone")).await.unwrap();
    batch_equals_one_by_one(together, alone).await;
}

#[tokio::test]
async fn mariadb_batch_commits_like_single_writes() {
    let together = Store::connect(&mysql_url("together").await).await.unwrap();
    let alone = Store::connect(&mysql_url("alone").await).await.unwrap();
    batch_equals_one_by_one(together, alone).await;
}

/// An action is live from its insert to its end; a waiter that subscribed
/// while it was live sees the end, and one that comes later finds it not live.
#[tokio::test]
async fn live_actions_publish_their_end() {
    let store = Store::connect(&sqlite_url("live")).await.unwrap();
    let id = inserted(&store, "t-live").await;
    let (mut rx, live) = store.watch(id);
    assert!(live, "a freshly inserted action is live");
    let (_, other) = store.watch(id + 1);
    assert!(!other, "an action never inserted is not live");
    let finish = Write::Finish {
        id,
        status: ActionStatus::Failed,
        error: Some("x".into()),
        at: at(1),
        last: None,
    };
    store.write(vec![finish]).await.unwrap();
    rx.changed().await.unwrap();
    assert!(rx.borrow().terminal);
    let (_, live) = store.watch(id);
    assert!(!live, "an ended action is no longer live");

    // A cancel that did not apply (the action had started) does not end it.
    let id = inserted(&store, "t-live").await;
    let start = Write::Start {
        id,
        owner: "test".into(),
        lease_until: at(60_000),
        at: at(2),
    };
    store.write(vec![start]).await.unwrap();
    let outcome = store
        .write(vec![Write::CancelQueued { id, at: at(3) }])
        .await
        .unwrap();
    assert_eq!(outcome[0], Outcome::Done { rows: 0 });
    assert!(store.watch(id).1, "an action a cancel missed stays live");
}
