//! What a server keeps on its host (the database with params, outputs and
//! node keys, the secrets key, the first admin token) is for its own user
//! only: the data directory 0700, the database files 0600, from the first
//! start, and an older install is tightened when it starts.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::json;

use crate::harness::{Db, Env, Server, both_dbs, bundles};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `troupe serve` on `data_dir`, with the database in it for SQLite.
fn serve(env: &Env, db: Db, data_dir: &Path) -> Server {
    let b = bundles();
    let mut args: Vec<String> = [
        "serve",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--bundle",
        b.testkit.to_str().unwrap(),
        "--trust",
        &b.public_key,
    ]
    .map(str::to_owned)
    .into();
    if db == Db::MySql {
        args.extend(["--db".to_owned(), env.db_url.clone()]);
    }
    Server::start(&args, data_dir, &[])
}

const DB_FILES: [&str; 3] = ["troupe.db", "troupe.db-wal", "troupe.db-shm"];

async fn the_data_directory_and_database_are_private(db: Db) {
    let env = Env::new(db).await;
    // A data directory that does not exist yet (the tests run under the
    // usual umask, 022).
    let dir = env.dir.join("data");
    let server = serve(&env, db, &dir);
    assert_eq!(mode(&dir), 0o700, "a new data directory");
    for file in ["secrets.key", "admin.token"] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    let id = server.submit("noop1", "vps-1", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
    if db == Db::Sqlite {
        for file in DB_FILES {
            assert_eq!(
                mode(&dir.join(file)),
                0o600,
                "{file} after the first writes"
            );
        }
    }
    server.kill9();

    // An install from before: everything readable by all. A start tightens it, and says so.
    set_mode(&dir, 0o755);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            set_mode(&path, 0o644);
        }
    }
    let server = serve(&env, db, &dir);
    assert_eq!(mode(&dir), 0o700);
    let log = server.log();
    assert!(
        log.contains("tightened") && log.contains(dir.to_str().unwrap()),
        "{log}"
    );
    let id = server.submit("noop1", "vps-2", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
    if db == Db::Sqlite {
        for file in DB_FILES {
            assert_eq!(mode(&dir.join(file)), 0o600, "{file} of an older install");
        }
    }
}

both_dbs!(the_data_directory_and_database_are_private);
