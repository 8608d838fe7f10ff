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

#[test]
fn refuses_databases_older_than_the_oldest_maintained() {
    for ok in [
        "10.11.6-MariaDB-0+deb12u1",
        "10.6.0-MariaDB",
        "11.4.2-MariaDB-log",
        "8.0.36",
        "8.4.0",
        "9.1.0",
    ] {
        assert_eq!(super::supported(ok), Ok(()), "{ok}");
    }
    let old = super::supported("10.5.23-MariaDB-0+deb11u1").unwrap_err();
    assert!(
        old.starts_with("MariaDB 10.5 is too old: troupe needs MariaDB 10.6 or later"),
        "{old}"
    );
    assert!(old.contains("upgrade the database server"), "{old}");
    let old = super::supported("5.7.44-log").unwrap_err();
    assert!(old.starts_with("MySQL 5.7 is too old"), "{old}");
    assert!(
        super::supported("garbage")
            .unwrap_err()
            .contains("\"garbage\"")
    );
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
            submitted_by: Some("panel".into()),
        },
        bundle: "b".repeat(64),
        request_hash: "h".repeat(64),
        owner: Some("test".into()),
        steps: (0..3)
            .map(|i| (format!("s{i}"), "noop".to_owned()))
            .collect(),
        at: at(0),
        start: start.then(|| at(60_000)),
        node: start.then(|| "hv-1".to_owned()),
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
        turn: None,
    };
    let step_started = |id, seq, ms| Write::StepStarted {
        id,
        seq,
        name: format!("s{seq}"),
        attempt: 1,
        at: at(ms),
        node: None,
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
        Write::RequestCancel { id: b, at: at(2) },
        Write::CancelQueued { id: b, at: at(2) },
        Write::RequestCancel { id: b, at: at(3) },
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
        Write::StepWaiting {
            id: d,
            seq: 0,
            name: "s0".into(),
            waiting_for: "gpu=*".into(),
        },
        Write::StepWaiting {
            id: c,
            seq: 2,
            name: "s2".into(),
            waiting_for: "node=hv-1".into(),
        },
        Write::StepStarted {
            id: d,
            seq: 0,
            name: "s0".into(),
            attempt: 1,
            at: at(7),
            node: Some("hv-1".into()),
        },
        Write::StepLog {
            id: d,
            seq: 0,
            attempt: 1,
            log: "one\n".into(),
            at: at(7),
        },
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
        outcomes[5],
        Outcome::Done { rows: 0 },
        "the cancelled action's start"
    );
    assert_eq!(outcomes[0], Outcome::Done { rows: 1 }, "a start");
    assert_eq!(outcomes[2], Outcome::Done { rows: 1 }, "a cancel request");
    assert_eq!(
        outcomes[4],
        Outcome::Done { rows: 0 },
        "a cancel request too late"
    );
    assert!(
        matches!(outcomes[7], Outcome::Inserted(5)),
        "{:?}",
        outcomes[7]
    );
    assert!(
        matches!(outcomes[14], Outcome::Inserted(6)),
        "{:?}",
        outcomes[14]
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

/// A new SQLite database for the test `name`, in a directory of its own.
pub(crate) fn sqlite_url(name: &str) -> String {
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
        turn: None,
    };
    store.write(vec![start]).await.unwrap();
    let outcome = store
        .write(vec![Write::CancelQueued { id, at: at(3) }])
        .await
        .unwrap();
    assert_eq!(outcome[0], Outcome::Done { rows: 0 });
    assert!(store.watch(id).1, "an action a cancel missed stays live");
}

/// Writing an attempt again (after a commit whose answer was lost) is
/// harmless; a write the database refuses for its content is reported as
/// refused, not as the database being away, and writes sent with it are not
/// failed with it.
async fn repeats_are_harmless_and_refusals_told_apart(store: Store, refuses_long_text: bool) {
    let id = inserted(&store, "t-refused").await;
    let attempt = |n: u32, error: String| Write::StepAttemptFailed {
        id,
        seq: 0,
        attempt: n,
        started_at: at(0),
        node: Some("hv-1".into()),
        error,
        at: at(n as i64),
    };
    store.write(vec![attempt(1, "one".into())]).await.unwrap();
    store.write(vec![attempt(1, "one".into())]).await.unwrap();
    let log = || Write::StepLog {
        id,
        seq: 0,
        attempt: 1,
        log: "a line\n".into(),
        at: at(1),
    };
    store.write(vec![log()]).await.unwrap();
    store.write(vec![log()]).await.unwrap();
    assert_eq!(store.logs(id).await.unwrap().len(), 1);
    if !refuses_long_text {
        return;
    }
    // Over a MariaDB TEXT column; the good writes go at the same moment
    // (likely into the same group commit).
    let good: Vec<_> = (2..12)
        .map(|n| {
            let (store, write) = (store.clone(), attempt(n, format!("attempt {n}")));
            tokio::spawn(async move { store.write(vec![write]).await })
        })
        .collect();
    let bad = store.write(vec![attempt(1, "x".repeat(70_000))]).await;
    assert!(matches!(bad, Err(crate::Error::WriteRefused(_))), "{bad:?}");
    for g in good {
        g.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn sqlite_repeats_are_harmless() {
    let store = Store::connect(&sqlite_url("repeats")).await.unwrap();
    repeats_are_harmless_and_refusals_told_apart(store, false).await;
}

#[tokio::test]
async fn mariadb_repeats_are_harmless_and_refusals_told_apart() {
    let store = Store::connect(&mysql_url("refused").await).await.unwrap();
    repeats_are_harmless_and_refusals_told_apart(store, true).await;
}

/// The gathering rule: while a group commit is under way, the next writer
/// collects what arrives instead of committing each write on its own. A
/// row lock held from another connection keeps the first commit waiting;
/// ten writes arriving one by one meanwhile go in one more commit.
#[tokio::test]
async fn mariadb_writers_gather_while_a_commit_is_under_way() {
    use sqlx::Connection;
    use std::sync::atomic::Ordering;
    let url = mysql_url("gather").await;
    let store = Store::connect(&url).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..11 {
        ids.push(inserted(&store, &format!("t-gather-{n}")).await);
    }
    let claim = |id| Write::Claim {
        id,
        owner: "test".into(),
        epoch: 1,
        lease_until: at(60_000),
    };
    let mut locker = sqlx::MySqlConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("SELECT id FROM actions WHERE id = ? FOR UPDATE")
        .bind(ids[0])
        .fetch_all(&mut locker)
        .await
        .unwrap();

    let before = store.stats().transactions.load(Ordering::SeqCst);
    let blocked = {
        let (store, write) = (store.clone(), claim(ids[0]));
        tokio::spawn(async move { store.write(vec![write]).await })
    };
    // Until the first commit waits for the lock (its UPDATE is in the
    // process list), not for a guessed time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE() AND ID <> CONNECTION_ID() AND INFO LIKE 'UPDATE actions%'",
        )
        .fetch_one(&mut locker)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first commit never reached the database"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut rest = Vec::new();
    for &id in &ids[1..] {
        let (store, write) = (store.clone(), claim(id));
        rest.push(tokio::spawn(async move { store.write(vec![write]).await }));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.stats().transactions.load(Ordering::SeqCst),
        before,
        "nothing committed while the first commit waits"
    );
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();
    blocked.await.unwrap().unwrap();
    for w in rest {
        w.await.unwrap().unwrap();
    }
    assert_eq!(
        store.stats().transactions.load(Ordering::SeqCst) - before,
        2,
        "the blocked commit, and one for the ten writes gathered meanwhile"
    );
}

/// A fenced request lands only while its action is still owned by its
/// owner at its epoch: after another claim (a takeover bumps the epoch),
/// each of its writes answers `Fenced` and nothing of it is written, while
/// the requests beside it in the same commit land.
#[tokio::test]
async fn mariadb_fences_keep_a_lost_runner_from_writing() {
    use super::Fence;
    use std::sync::Arc;
    let store = Store::connect(&mysql_url("fences").await).await.unwrap();
    let (a, b) = (inserted(&store, "t-a").await, inserted(&store, "t-b").await);
    let fence = |id, owner: &str, epoch| Fence {
        id,
        owner: Arc::from(owner),
        epoch,
    };
    let step = |id| Write::StepWaiting {
        id,
        seq: 0,
        name: "s0".into(),
        waiting_for: "a node".into(),
    };
    let finish = |id| Write::Finish {
        id,
        status: ActionStatus::Failed,
        error: Some("x".into()),
        at: at(1),
        last: None,
    };
    // Another server takes `a` over: the epoch the runner holds (1) is stale.
    let taken = store
        .write(vec![Write::Claim {
            id: a,
            owner: "test".into(),
            epoch: 1,
            lease_until: at(60_000),
        }])
        .await
        .unwrap();
    assert_eq!(taken, vec![Outcome::Done { rows: 1 }]);
    // A claim on an epoch already passed takes nothing.
    let again = store
        .write(vec![Write::Claim {
            id: a,
            owner: "other".into(),
            epoch: 1,
            lease_until: at(60_000),
        }])
        .await
        .unwrap();
    assert_eq!(again, vec![Outcome::Done { rows: 0 }]);
    let before = store.action(a).await.unwrap().unwrap();
    assert_eq!((before.epoch, before.owner.as_deref()), (2, Some("test")));
    // Both requests in one commit: the stale one is skipped whole.
    let stale = store.write_fenced(fence(a, "test", 1), vec![step(a), finish(a)]);
    let other_owner = store.write_fenced(fence(b, "elsewhere", 1), vec![finish(b)]);
    let current = store.write_fenced(fence(b, "test", 1), vec![step(b)]);
    let (stale, other_owner, current) = tokio::join!(stale, other_owner, current);
    assert_eq!(stale.unwrap(), vec![Outcome::Fenced, Outcome::Fenced]);
    assert_eq!(other_owner.unwrap(), vec![Outcome::Fenced]);
    // (The step row; the action is not running, so its row is left.)
    assert_eq!(current.unwrap(), vec![Outcome::Done { rows: 1 }]);
    let after = store.action(a).await.unwrap().unwrap();
    assert_eq!(after.status, ActionStatus::Queued);
    assert_eq!(after.revision, before.revision, "nothing of it was written");
    assert_eq!(after.steps[0].status, StepStatus::Pending);
    assert_eq!(
        store.action(b).await.unwrap().unwrap().steps[0].status,
        StepStatus::Waiting
    );
}

/// The list's filters mean the same on both databases: several statuses,
/// the submitter, a time window with both ends included (at the databases'
/// microseconds), and what a running action's step waits for.
async fn list_filters_mean_the_same(store: Store) {
    use crate::model::ActionFilter;
    // Four actions a minute apart (the last 1 µs after its minute), by
    // panel and ops in turn.
    let mut ids = Vec::new();
    for i in 0..4_i64 {
        let mut w = insert(&format!("t-{i}"), None, i >= 2);
        if let Write::Insert { new, at: when, .. } = &mut w {
            new.submitted_by = Some(if i % 2 == 0 { "panel" } else { "ops" }.into());
            *when = at(i * 60_000) + chrono::Duration::microseconds(i / 3);
        }
        match store.write(vec![w]).await.unwrap()[0] {
            Outcome::Inserted(id) => ids.push(id),
            ref other => panic!("insert answered {other:?}"),
        }
    }
    // The first fails; the third's first step waits for a gpu.
    store
        .write(vec![
            Write::Finish {
                id: ids[0],
                status: ActionStatus::Failed,
                error: Some("no".into()),
                at: at(1),
                last: None,
            },
            Write::StepWaiting {
                id: ids[2],
                seq: 0,
                name: "s0".into(),
                waiting_for: "gpu=*".into(),
            },
        ])
        .await
        .unwrap();
    let list = |f: ActionFilter| {
        let store = &store;
        async move {
            let f = ActionFilter { limit: 50, ..f };
            let found = store.list(&f).await.unwrap();
            found.iter().map(|a| a.id).collect::<Vec<_>>()
        }
    };
    let [a, b, c, d] = ids[..] else {
        unreachable!()
    };
    assert_eq!(list(ActionFilter::default()).await, [d, c, b, a]);
    let statuses = vec![ActionStatus::Failed, ActionStatus::Queued];
    assert_eq!(
        list(ActionFilter {
            statuses,
            ..Default::default()
        })
        .await,
        [b, a]
    );
    assert_eq!(
        list(ActionFilter {
            submitted_by: Some("ops".into()),
            ..Default::default()
        })
        .await,
        [d, b]
    );
    assert_eq!(
        list(ActionFilter {
            since: Some(at(60_000)),
            until: Some(at(120_000)),
            ..Default::default()
        })
        .await,
        [c, b]
    );
    // To the microsecond: the fourth is 1 µs after 3 min.
    let three = at(180_000);
    assert_eq!(
        list(ActionFilter {
            until: Some(three),
            ..Default::default()
        })
        .await,
        [c, b, a]
    );
    assert_eq!(
        list(ActionFilter {
            since: Some(three + chrono::Duration::microseconds(1)),
            ..Default::default()
        })
        .await,
        [d]
    );
    let found = store
        .list(&ActionFilter {
            limit: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    let waits: Vec<_> = found.iter().map(|a| a.waiting_for.as_deref()).collect();
    assert_eq!(waits, [None, Some("gpu=*"), None, None]);
}

#[tokio::test]
async fn sqlite_list_filters() {
    let store = Store::connect(&sqlite_url("list")).await.unwrap();
    list_filters_mean_the_same(store).await;
}

#[tokio::test]
async fn mariadb_list_filters() {
    let store = Store::connect(&mysql_url("list").await).await.unwrap();
    list_filters_mean_the_same(store).await;
}

/// A write the database rolls back for a deadlock (on Galera, also for a
/// certification conflict) is retried whole, not failed: another
/// connection locks action `a`, the writer's transaction updates `b` and
/// waits for `a`, then the other connection asks for `b`. InnoDB rolls back
/// the lighter transaction, the writer's (the other has changed many rows);
/// the write still lands, once the other connection commits.
#[tokio::test]
async fn mariadb_a_deadlocked_write_is_retried_whole() {
    use sqlx::Connection;
    use std::sync::atomic::Ordering;
    let url = mysql_url("deadlock").await;
    let store = Store::connect(&url).await.unwrap();
    let (a, b) = (inserted(&store, "t-a").await, inserted(&store, "t-b").await);
    let mut locker = sqlx::MySqlConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE heavy (id INT PRIMARY KEY, n INT NOT NULL); \
         INSERT INTO heavy SELECT seq, 0 FROM seq_1_to_200",
    )
    .execute(&mut locker)
    .await
    .unwrap();
    sqlx::raw_sql("BEGIN; UPDATE heavy SET n = n + 1")
        .execute(&mut locker)
        .await
        .unwrap();
    sqlx::query("SELECT id FROM actions WHERE id = ? FOR UPDATE")
        .bind(a)
        .fetch_all(&mut locker)
        .await
        .unwrap();

    let before = store.stats().rolled_back.load(Ordering::SeqCst);
    let claim = |id| Write::Claim {
        id,
        owner: "test".into(),
        epoch: 1,
        lease_until: at(60_000),
    };
    let write = {
        let (store, writes) = (store.clone(), vec![claim(b), claim(a)]);
        tokio::spawn(async move { store.write(writes).await })
    };
    // Until the writer holds `b` and waits for `a` (its statement has run
    // for a while: the one on `b` takes a millisecond).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE() AND ID <> CONNECTION_ID() AND INFO LIKE 'UPDATE actions%' \
             AND TIME_MS > 100",
        )
        .fetch_one(&mut locker)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never waited for the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The deadlock: the writer is rolled back, which lets this through.
    sqlx::query("SELECT id FROM actions WHERE id = ? FOR UPDATE")
        .bind(b)
        .fetch_all(&mut locker)
        .await
        .expect("the heavier transaction is not the one rolled back");
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();

    let outcomes = write
        .await
        .unwrap()
        .expect("a deadlock is retried, not failed");
    assert_eq!(outcomes, vec![Outcome::Done { rows: 1 }; 2]);
    for id in [a, b] {
        let action = store.action(id).await.unwrap().unwrap();
        assert_eq!(action.epoch, 2, "claimed once, by the retry");
    }
    assert!(
        store.stats().rolled_back.load(Ordering::SeqCst) > before,
        "the writer saw the rollback"
    );
}

/// Where several servers share the database, an insert that asks to start
/// starts only if its target has no unfinished action (the busy check rides
/// with the read of the target's row): the first of a batch on an idle
/// target starts, those behind it and any while one is queued or running
/// are queued, owned by nobody; once the target's actions have ended, the
/// next starts again.
#[tokio::test]
async fn mariadb_an_insert_starts_only_on_an_idle_target() {
    use super::Fence;
    use std::sync::Arc;
    let store = Store::connect(&mysql_url("idle").await).await.unwrap();
    let batch = store
        .write(vec![
            insert("t-a", None, true),
            insert("t-a", None, true),
            insert("t-b", None, false),
            insert("t-b", None, true),
        ])
        .await
        .unwrap();
    let a1 = match batch[0] {
        Outcome::Inserted(id) => id,
        other => panic!("the first insert of an idle target starts: {other:?}"),
    };
    assert!(matches!(batch[1], Outcome::Behind(_)), "{batch:?}");
    assert!(matches!(batch[2], Outcome::Inserted(_)), "{batch:?}");
    assert!(
        matches!(batch[3], Outcome::Behind(_)),
        "queued before it: {batch:?}"
    );
    let a2 = match batch[1] {
        Outcome::Behind(id) => id,
        _ => unreachable!(),
    };
    let stored = store.action(a2).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.owner), (ActionStatus::Queued, None));
    // Running elsewhere in the database: busy.
    let again = store.write(vec![insert("t-a", None, true)]).await.unwrap();
    assert!(matches!(again[0], Outcome::Behind(_)), "{again:?}");
    let a3 = match again[0] {
        Outcome::Behind(id) | Outcome::Inserted(id) => id,
        _ => unreachable!(),
    };
    // Every action of t-a ends: the next one starts with its insert.
    let fence = Fence {
        id: a1,
        owner: Arc::from("test"),
        epoch: 1,
    };
    let finish = Write::Finish {
        id: a1,
        status: ActionStatus::Succeeded,
        error: None,
        at: at(1),
        last: None,
    };
    let done = store.write_fenced(fence, vec![finish]).await.unwrap();
    assert!(!done.contains(&Outcome::Fenced), "{done:?}");
    let cancels = vec![
        Write::CancelQueued { id: a2, at: at(2) },
        Write::CancelQueued { id: a3, at: at(2) },
    ];
    store.write(cancels).await.unwrap();
    let idle = store.write(vec![insert("t-a", None, true)]).await.unwrap();
    assert!(matches!(idle[0], Outcome::Inserted(_)), "{idle:?}");
    let begun = match idle[0] {
        Outcome::Inserted(id) => store.action(id).await.unwrap().unwrap(),
        _ => unreachable!(),
    };
    assert_eq!(begun.status, ActionStatus::Running);
}

fn record_change(target: &str, set: &[(&str, &str)], unset: &[&str]) -> Write {
    Write::PutTargetRecord {
        target: target.to_owned(),
        change: crate::targets::Change {
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            unset: unset.iter().map(|k| k.to_string()).collect(),
            replace: false,
        },
        at: at(0),
        by: "t".to_owned(),
        audit: Box::new(super::AuditEntry::new(
            "t",
            "target.set",
            target,
            serde_json::json!({}),
        )),
    }
}

/// Changes to one record merge in the transaction that commits them: two
/// in one group commit both land, in order; one that would overfill the
/// record answers `rows: 0` and writes nothing, not even its audit entry.
async fn record_changes_merge_where_they_commit(store: Store) {
    let outcomes = store
        .write(vec![
            record_change("vps-1", &[("bmc", "https://a"), ("rack", "r1")], &[]),
            record_change("vps-1", &[("bmc", "https://b")], &["rack"]),
            record_change("vps-2", &[("rack", "r2")], &[]),
        ])
        .await
        .unwrap();
    assert!(
        outcomes.iter().all(|o| *o != Outcome::Done { rows: 0 }),
        "{outcomes:?}"
    );
    let one = store.target_record("vps-1").await.unwrap().unwrap();
    assert_eq!(
        one.attributes.into_iter().collect::<Vec<_>>(),
        [("bmc".to_owned(), "https://b".to_owned())]
    );
    let many: Vec<(String, String)> = (0..crate::targets::MAX_ATTRIBUTES)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let audited = store.audit(1000, None).await.unwrap().len();
    let outcomes = store
        .write(vec![record_change("vps-1", &many, &[])])
        .await
        .unwrap();
    assert_eq!(outcomes, [Outcome::Done { rows: 0 }]);
    assert_eq!(
        store
            .target_record("vps-1")
            .await
            .unwrap()
            .unwrap()
            .attributes
            .len(),
        1
    );
    assert_eq!(store.audit(1000, None).await.unwrap().len(), audited);
    let page = store.target_records(Some("vps-1"), 10).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.target.as_str()).collect::<Vec<_>>(),
        ["vps-2"]
    );
}

#[tokio::test]
async fn sqlite_record_changes_merge_where_they_commit() {
    let store = Store::connect(&sqlite_url("records")).await.unwrap();
    record_changes_merge_where_they_commit(store).await;
}

#[tokio::test]
async fn mariadb_record_changes_merge_where_they_commit() {
    let store = Store::connect(&mysql_url("records").await).await.unwrap();
    record_changes_merge_where_they_commit(store).await;
}
