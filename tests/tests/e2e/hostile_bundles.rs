//! Hostile bundles, signed by a trusted key so that they reach the archive
//! and manifest checks: a second `manifest.toml` behind a zip64 end record,
//! a device file, a path that is both a file and a directory, manifests over
//! the limits. Each is refused with a 4xx and a code, and a refused bundle
//! leaves nothing behind: not in the listing, the `bundles` table, the data
//! directory, the audit log, nor as a running step host. Staging directories
//! a crash left are swept when the server or a node starts.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::bundles::triple;
use crate::harness::{Db, Env, Server, both_dbs, sign_with, target_dir, test_key, workspace};

const REGULAR: u32 = 0o100644;
const DIRECTORY: u32 = 0o040755;
const CHAR_DEVICE: u32 = 0o020644;

/// Writes a zip byte by byte (stored, no compression), so a test can say
/// what no zip library writes: duplicate names, any mode, and a zip64 end
/// record whose classic record counts 0xFFFF entries.
pub(crate) fn raw_zip(entries: &[(&str, &[u8], u32)], zip64: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data, mode) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let size = data.len() as u32;
        let name = name.as_bytes();
        // Local header.
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend(20u16.to_le_bytes()); // version needed
        out.extend(0u16.to_le_bytes()); // flags
        out.extend(0u16.to_le_bytes()); // stored
        out.extend(0u16.to_le_bytes()); // time
        out.extend(0x21u16.to_le_bytes()); // date: 1980-01-01
        out.extend(crc.to_le_bytes());
        out.extend(size.to_le_bytes());
        out.extend(size.to_le_bytes());
        out.extend((name.len() as u16).to_le_bytes());
        out.extend(0u16.to_le_bytes()); // extra
        out.extend(name);
        out.extend(*data);
        // Its central directory record, made by Unix (3) so the mode counts.
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(((3u16 << 8) | 20).to_le_bytes());
        central.extend(20u16.to_le_bytes());
        central.extend(0u16.to_le_bytes());
        central.extend(0u16.to_le_bytes());
        central.extend(0u16.to_le_bytes());
        central.extend(0x21u16.to_le_bytes());
        central.extend(crc.to_le_bytes());
        central.extend(size.to_le_bytes());
        central.extend(size.to_le_bytes());
        central.extend((name.len() as u16).to_le_bytes());
        central.extend(0u16.to_le_bytes()); // extra
        central.extend(0u16.to_le_bytes()); // comment
        central.extend(0u16.to_le_bytes()); // disk
        central.extend(0u16.to_le_bytes()); // internal attributes
        central.extend((mode << 16).to_le_bytes());
        central.extend(offset.to_le_bytes());
        central.extend(name);
    }
    let (cd_offset, cd_size, count) = (out.len(), central.len(), entries.len());
    out.extend(central);
    if zip64 {
        let record = out.len() as u64;
        out.extend(0x0606_4b50u32.to_le_bytes());
        out.extend(44u64.to_le_bytes()); // size of the rest of the record
        out.extend(((3u16 << 8) | 45).to_le_bytes());
        out.extend(45u16.to_le_bytes());
        out.extend(0u32.to_le_bytes()); // this disk
        out.extend(0u32.to_le_bytes()); // the directory's disk
        out.extend((count as u64).to_le_bytes());
        out.extend((count as u64).to_le_bytes());
        out.extend((cd_size as u64).to_le_bytes());
        out.extend((cd_offset as u64).to_le_bytes());
        // Locator.
        out.extend(0x0706_4b50u32.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(record.to_le_bytes());
        out.extend(1u32.to_le_bytes());
    }
    let classic = if zip64 { u16::MAX } else { count as u16 };
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out.extend(classic.to_le_bytes());
    out.extend(classic.to_le_bytes());
    out.extend((cd_size as u32).to_le_bytes());
    out.extend((cd_offset as u32).to_le_bytes());
    out.extend(0u16.to_le_bytes()); // comment
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// What a push may change, read from every place a bundle is kept.
#[derive(Debug, PartialEq)]
pub(crate) struct Kept {
    listed: Vec<String>,
    rows: Vec<String>,
    files: Vec<String>,
    audited: i64,
}

impl Kept {
    pub(crate) async fn now(env: &Env, server: &Server) -> Kept {
        let (status, list) = server.get("/v1/bundles").await;
        assert_eq!(status, 200, "{list}");
        let mut listed: Vec<String> = list["bundles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["hash"].as_str().unwrap().to_owned())
            .collect();
        listed.sort();
        let pool = env.sql().await;
        let mut rows: Vec<String> = sqlx::query_scalar("SELECT hash FROM bundles")
            .fetch_all(&pool)
            .await
            .unwrap();
        rows.sort();
        let audited: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        Kept {
            listed,
            rows,
            files: files_under(&env.dir.join("bundles")),
            audited,
        }
    }
}

/// Every path under `dir`, relative to it, sorted.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Processes whose command line names `hash` (a step host runs the
/// library unpacked under `bundles/<hash>/`).
fn processes_naming(hash: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(hash))
        .collect()
}

/// Pushes `bytes` and checks it was refused with `code` and a 4xx, and that
/// the push left nothing behind. Returns the code.
pub(crate) async fn refused(
    env: &Env,
    server: &Server,
    what: &str,
    bytes: Vec<u8>,
    signature: &str,
    code: &str,
) -> String {
    let before = Kept::now(env, server).await;
    let hash = signing::BundleHash::of(&bytes).to_string();
    let (status, body) = server.push(bytes, signature).await;
    assert!(status.is_client_error(), "{what}: {status} {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.is_empty(), "{what}: {body}");
    assert_eq!(
        Kept::now(env, server).await,
        before,
        "{what}: the refused push left something behind"
    );
    // A step host the check started stops with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hosts = processes_naming(&hash);
        if hosts.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: a step host was left running: {hosts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    code.to_owned()
}

fn testkit_manifest(edit: impl Fn(String) -> String) -> Vec<u8> {
    let text = std::fs::read_to_string(workspace().join("steps/testkit/bundle.toml")).unwrap();
    edit(text.replace("version = \"0.1.0\"", "version = \"0.5.0\"")).into_bytes()
}

/// `count` kinds (and with them as many steps) on top of the testkit's.
fn with_kinds(count: usize) -> impl Fn(String) -> String {
    move |mut m| {
        for i in 0..count {
            m.push_str(&format!(
                "[steps.extra{i}]\nfunction = \"noop\"\ntimeout_ms = 100\n[kinds.extra{i}]\nsteps = [{{ step = \"extra{i}\" }}]\n"
            ));
        }
        m
    }
}

async fn hostile_bundles_are_refused_and_leave_nothing_behind(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let key = test_key();
    let lib = std::fs::read(target_dir().join("libtestkit.so")).unwrap();
    let lib_path = format!("lib/{}/libtestkit.so", triple());
    // Each case has its own version, so that one wrongly accepted does
    // not hide the next behind `bundle_version_not_newer`.
    let bundle = |version: &str,
                  extra: &[(&str, &[u8], u32)],
                  edit: &dyn Fn(String) -> String,
                  zip64: bool| {
        let manifest = testkit_manifest(|m| edit(m.replace("0.5.0", version)));
        let mut entries = vec![
            ("manifest.toml", &manifest[..], REGULAR),
            (lib_path.as_str(), &lib[..], REGULAR),
        ];
        entries.extend_from_slice(extra);
        raw_zip(&entries, zip64)
    };
    let same = |m: String| m;
    // Adds a kind nobody reviewing the first manifest would see.
    let smuggled = |v: &str| testkit_manifest(|m| with_kinds(1)(m.replace("0.5.0", v)));
    let big = vec![7u8; 8 << 20];
    let long = format!("lib/{}", "a".repeat(300));
    type Case<'a> = (&'a str, Box<dyn Fn(&str) -> Vec<u8> + 'a>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "a second manifest behind a zip64 end record",
            Box::new(|v: &str| bundle(v, &[("manifest.toml", &smuggled(v), REGULAR)], &same, true)),
            "bundle_unsafe_entry",
        ),
        (
            "a second manifest",
            Box::new(|v: &str| {
                bundle(v, &[("manifest.toml", &smuggled(v), REGULAR)], &same, false)
            }),
            "bundle_unsafe_entry",
        ),
        (
            "a character device",
            Box::new(|v: &str| bundle(v, &[("dev", b"", CHAR_DEVICE)], &same, false)),
            "bundle_unsafe_entry",
        ),
        (
            "a character device behind a zip64 end record",
            Box::new(|v: &str| bundle(v, &[("dev", b"", CHAR_DEVICE)], &same, true)),
            "bundle_unsafe_entry",
        ),
        (
            "a file that is also a directory",
            Box::new(|v: &str| {
                bundle(
                    v,
                    &[("x", &big, REGULAR), ("x/y", b"y", REGULAR)],
                    &same,
                    false,
                )
            }),
            "bundle_unsafe_entry",
        ),
        (
            "a directory entry that is also a file",
            Box::new(|v: &str| {
                bundle(
                    v,
                    &[("x/", b"", DIRECTORY), ("x", b"x", REGULAR)],
                    &same,
                    false,
                )
            }),
            "bundle_unsafe_entry",
        ),
        (
            "the same path written twice",
            Box::new(|v: &str| {
                bundle(
                    v,
                    &[("lib//x", b"1", REGULAR), ("lib/x", b"2", REGULAR)],
                    &same,
                    false,
                )
            }),
            "bundle_unsafe_entry",
        ),
        (
            "a path component over 255 bytes",
            Box::new(|v: &str| bundle(v, &[(&long, b"x", REGULAR)], &same, false)),
            "bundle_unsafe_entry",
        ),
        (
            "257 kinds and steps beyond the testkit's",
            Box::new(|v: &str| bundle(v, &[], &with_kinds(257), false)),
            "bundle_over_limit",
        ),
        (
            "a manifest over 256 KiB",
            Box::new(|v: &str| {
                bundle(
                    v,
                    &[],
                    &|m| format!("{m}\n#{}\n", "x".repeat(256 << 10)),
                    false,
                )
            }),
            "bundle_over_limit",
        ),
    ];
    for (i, (what, bytes, code)) in cases.into_iter().enumerate() {
        let version = format!("0.5.{}", i + 1);
        let bytes = bytes(&version);
        let sig = sign_with(&key, &bytes, "testkit", &version);
        refused(&env, &server, what, bytes, &sig, code).await;
    }
    // The smuggled kind never went live, and the server still serves.
    let (_, kinds) = server.get("/v1/kinds").await;
    assert!(
        !kinds.to_string().contains("extra0"),
        "a smuggled kind went live: {kinds}"
    );
    let id = server.submit("noop3", "vps-1", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

/// A bundle as large as real use needs (many kinds, a plain directory
/// entry) is accepted: the limits are not in the way.
async fn a_bundle_at_the_limits_is_accepted(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let lib = std::fs::read(target_dir().join("libtestkit.so")).unwrap();
    let lib_path = format!("lib/{}/libtestkit.so", triple());
    let testkit = std::fs::read_to_string(workspace().join("steps/testkit/bundle.toml")).unwrap();
    let kinds = testkit.matches("\n[kinds.").count();
    let steps = testkit.matches("\n[steps.").count();
    let manifest = testkit_manifest(with_kinds(256 - kinds.max(steps)));
    let bytes = raw_zip(
        &[
            ("manifest.toml", &manifest, REGULAR),
            ("lib/", b"", DIRECTORY),
            (lib_path.as_str(), &lib, REGULAR),
        ],
        false,
    );
    let sig = sign_with(&test_key(), &bytes, "testkit", "0.5.0");
    let (status, body) = server.push(bytes, &sig).await;
    assert_eq!(status, 201, "{body}");
    let id = server.submit("extra0", "vps-1", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

/// A staging directory a crash left (files read-only, as unpacking makes
/// them) is gone once the server has started.
async fn staging_left_by_a_crash_is_swept_at_start(db: Db) {
    let env = Env::new(db).await;
    let staging = env
        .dir
        .join("bundles")
        .join(format!(".{}.999999999", "ab".repeat(32)));
    std::fs::create_dir_all(staging.join("lib")).unwrap();
    let file = staging.join("lib/big");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&file, perms).unwrap();
    let server = env.serve();
    assert!(
        !staging.exists(),
        "{:?}",
        files_under(&env.dir.join("bundles"))
    );
    // What the server unpacked itself stays.
    let (_, list) = server.get("/v1/bundles").await;
    for b in list["bundles"].as_array().unwrap() {
        assert!(
            env.dir
                .join("bundles")
                .join(b["hash"].as_str().unwrap())
                .is_dir()
        );
    }
}

/// A failure while unpacking (here a failure point on one entry's write,
/// standing in for a full disk) removes what was written so far.
async fn a_failure_while_unpacking_removes_the_staging_directory(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(&[], &[("FAILPOINTS", "bundle.unpack_entry=return(zz)")]);
    let lib = std::fs::read(target_dir().join("libtestkit.so")).unwrap();
    let lib_path = format!("lib/{}/libtestkit.so", triple());
    let manifest = testkit_manifest(|m| m);
    let bytes = raw_zip(
        &[
            ("manifest.toml", &manifest, REGULAR),
            (lib_path.as_str(), &lib, REGULAR),
            ("zz", b"the entry whose write fails", REGULAR),
        ],
        false,
    );
    let sig = sign_with(&test_key(), &bytes, "testkit", "0.5.0");
    let before = Kept::now(&env, &server).await;
    let (status, body) = server.push(bytes, &sig).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "internal", "{body}");
    assert_eq!(Kept::now(&env, &server).await, before);
}

both_dbs!(
    hostile_bundles_are_refused_and_leave_nothing_behind,
    a_bundle_at_the_limits_is_accepted,
    staging_left_by_a_crash_is_swept_at_start,
    a_failure_while_unpacking_removes_the_staging_directory,
);

/// A node sweeps the staging directories a crash left in its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sweeps_staging_left_by_a_crash() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let token = crate::nodes::join_token(&server, &env).await;
    let data = crate::harness::scratch_dir("node-sweep");
    let staging = data
        .join("bundles")
        .join(format!(".{}.999999999", "cd".repeat(32)));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("manifest.toml"), b"left by a crash").unwrap();
    let node = crate::nodes::Node::start_in(&server, Some(&token), "sweeper", &[], data);
    crate::nodes::connected(&server, &["sweeper"], &[&node]).await;
    assert!(!staging.exists(), "{}", node.log());
}
