//! The Source Authority refuses bad bundles with a distinct code, stores
//! nothing, and the server keeps serving. Also the same checks at start-up.

use std::collections::BTreeSet;

use serde_json::json;

use crate::harness::{
    Db, Env, both_dbs, bundles, scratch_dir, sign_with, target_dir, test_key, testkit_version,
    troupe, workspace,
};
use crate::hostile_bundles::refused;

/// Builds a zip with Python's zipfile, which happily writes what we refuse:
/// entries are (name, bytes, is_symlink).
pub(crate) fn zip_of(entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let dir = scratch_dir("zip");
    let mut script = String::from(
        "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED)\n",
    );
    for (i, (name, bytes, link)) in entries.iter().enumerate() {
        let data = dir.join(format!("data{i}"));
        std::fs::write(&data, bytes).unwrap();
        script.push_str(&format!(
            "info = zipfile.ZipInfo({name:?})\ninfo.compress_type = zipfile.ZIP_DEFLATED\n{}z.writestr(info, open({:?}, 'rb').read())\n",
            if *link { "info.external_attr = (0o120777 << 16)\n" } else { "info.external_attr = (0o100644 << 16)\n" },
            data.to_str().unwrap()
        ));
    }
    script.push_str("z.close()\n");
    let out = dir.join("out.zip");
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

fn testkit_manifest(edit: impl Fn(String) -> String) -> Vec<u8> {
    edit(std::fs::read_to_string(workspace().join("steps/testkit/bundle.toml")).unwrap())
        .into_bytes()
}

pub(crate) fn triple() -> String {
    let good = std::fs::read(&bundles().testkit).unwrap();
    let text = String::from_utf8_lossy(&good).into_owned();
    let start = text.find("lib/").unwrap() + 4;
    text[start..].split('/').next().unwrap().to_owned()
}

fn stored(env: &Env) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(env.dir.join("bundles"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

async fn every_bad_bundle_is_refused_and_nothing_is_stored(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let key = test_key();
    let lib = std::fs::read(target_dir().join("libtestkit.so")).unwrap();
    let lib_path = format!("lib/{}/libtestkit.so", triple());
    let good_manifest =
        testkit_manifest(|m| m.replace("version = \"0.1.0\"", "version = \"0.5.0\""));
    let (v2, v2_sig) = testkit_version("0.2.0", &key);
    let (v3, _) = testkit_version("0.3.0", &key);
    let stranger = signing::SecretKey::from_seed([42; 32]);
    let (_, list_before) = server.get("/v1/bundles").await;
    let before = (
        list_before["bundles"].as_array().unwrap().len(),
        stored(&env),
    );

    // A key the server trusted, then revoked.
    let revoked = signing::SecretKey::from_seed([43; 32]);
    let (s, _) = server
        .post(
            "/v1/keys",
            &json!({ "public_key": revoked.public().to_string() }),
        )
        .await;
    assert_eq!(s, 201);
    let (s, _) = server
        .post(
            &format!("/v1/keys/{}/revoke", revoked.public().id()),
            &json!({}),
        )
        .await;
    assert_eq!(s, 200);

    let mut flipped = v3.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    let v3_sig = sign_with(&key, &v3, "testkit", "0.3.0");
    let zip_ok = |extra: Vec<(&str, &[u8], bool)>, manifest: &[u8]| {
        let mut entries = vec![
            ("manifest.toml", manifest, false),
            (lib_path.as_str(), &lib[..], false),
        ];
        entries.extend(extra);
        zip_of(&entries)
    };
    let zero = vec![0u8; (256 << 20) + 1];
    let missing_step = testkit_manifest(|m| {
        m.replace("version = \"0.1.0\"", "version = \"0.5.0\"")
            + "\n[steps.teleport]\ntimeout_ms = 100\n"
    });
    let bad_abi = testkit_manifest(|m| {
        m.replace("version = \"0.1.0\"", "version = \"0.5.0\"")
            .replace("abi = 2", "abi = 99")
    });

    let too_many_kinds = testkit_manifest(|mut m| {
        m = m.replace("version = \"0.1.0\"", "version = \"0.5.0\"");
        for i in 0..257 {
            m.push_str(&format!(
                "[kinds.many{i}]\nsteps = [{{ step = \"noop\" }}]\n"
            ));
        }
        m
    });

    let mut cases: Vec<(&str, Vec<u8>, String, &str)> = vec![
        (
            "one flipped byte",
            flipped,
            v3_sig.clone(),
            "bundle_hash_mismatch",
        ),
        (
            "untrusted key",
            v3.clone(),
            sign_with(&stranger, &v3, "testkit", "0.3.0"),
            "signature_untrusted_key",
        ),
        (
            "revoked key",
            v3.clone(),
            sign_with(&revoked, &v3, "testkit", "0.3.0"),
            "signature_revoked_key",
        ),
        (
            // Another bundle of the same size, so only the hash tells them apart.
            "signature for another bundle",
            v3.clone(),
            {
                let mut other = v3.clone();
                *other.last_mut().unwrap() ^= 1;
                sign_with(&key, &other, "testkit", "0.3.0")
            },
            "bundle_hash_mismatch",
        ),
        (
            "truncated upload",
            v3[..v3.len() - 1000].to_vec(),
            v3_sig.clone(),
            "bundle_incomplete",
        ),
        (
            "garbage signature",
            v3.clone(),
            "hello".into(),
            "signature_malformed",
        ),
    ];
    let signed = |bytes: Vec<u8>| {
        let sig = sign_with(&key, &bytes, "testkit", "0.5.0");
        (bytes, sig)
    };
    for (what, bytes, code) in [
        ("not a zip", b"this is not a zip".to_vec(), "bundle_not_zip"),
        (
            "no manifest",
            zip_of(&[(lib_path.as_str(), &lib, false)]),
            "bundle_no_manifest",
        ),
        (
            "unknown ABI",
            zip_ok(vec![], &bad_abi),
            "bundle_abi_unsupported",
        ),
        (
            "path with ..",
            zip_ok(vec![("../evil", b"x", false)], &good_manifest),
            "bundle_unsafe_entry",
        ),
        (
            "absolute path",
            zip_ok(vec![("/etc/evil", b"x", false)], &good_manifest),
            "bundle_unsafe_entry",
        ),
        (
            "symlink entry",
            zip_ok(vec![("lib/link", b"/etc/passwd", true)], &good_manifest),
            "bundle_unsafe_entry",
        ),
        (
            "entry inflating past the limit",
            zip_ok(vec![("big", &zero, false)], &good_manifest),
            "bundle_entry_too_large",
        ),
        (
            "duplicate entry names",
            zip_ok(
                vec![("manifest.toml", &good_manifest, false)],
                &good_manifest,
            ),
            "bundle_unsafe_entry",
        ),
        (
            "a manifest that is not TOML",
            zip_ok(vec![], b"format = [1"),
            "bundle_manifest_invalid",
        ),
        (
            "over the limit of 256 kinds",
            zip_ok(vec![], &too_many_kinds),
            "bundle_over_limit",
        ),
        (
            "step missing from the library",
            zip_ok(vec![], &missing_step),
            "bundle_missing_steps",
        ),
        (
            "library for another target only",
            zip_of(&[
                ("manifest.toml", &good_manifest, false),
                ("lib/sparc64-unknown-linux-gnu/libtestkit.so", &lib, false),
            ]),
            "bundle_no_library_for_platform",
        ),
        (
            "a library that is not one",
            zip_of(&[
                ("manifest.toml", &good_manifest, false),
                (lib_path.as_str(), b"\x7fELF junk", false),
            ]),
            "bundle_library_invalid",
        ),
    ] {
        let (bytes, sig) = signed(bytes);
        cases.push((what, bytes, sig, code));
    }
    // A kind that another bundle's active version provides.
    let other = testkit_manifest(|m| {
        m.replace("name = \"testkit\"", "name = \"other\"")
            .replace("version = \"0.1.0\"", "version = \"1.0.0\"")
    });
    let bytes = zip_ok(vec![], &other);
    let sig = sign_with(&key, &bytes, "other", "1.0.0");
    cases.push((
        "a kind another bundle provides",
        bytes,
        sig,
        "kind_conflict",
    ));
    // The claims must match the manifest.
    let (bytes, _) = signed(zip_ok(vec![], &good_manifest));
    let wrong_claims = sign_with(&key, &bytes, "testkit", "0.6.0");
    cases.push((
        "claims that do not match the manifest",
        bytes,
        wrong_claims,
        "signature_claims_mismatch",
    ));

    // A signature whose claims were changed after signing.
    let mut altered = signing::Signature::from_text(&v3_sig).unwrap();
    altered.claims.signed_at += 1;
    cases.push((
        "claims changed after signing",
        v3.clone(),
        altered.to_text(),
        "signature_invalid",
    ));

    // Each refusal leaves nothing behind (see `hostile_bundles::refused`).
    let mut seen = BTreeSet::new();
    for (what, bytes, sig, code) in cases {
        seen.insert(refused(&env, &server, what, bytes, &sig, code).await);
    }

    // Older versions are refused once a newer one is accepted.
    let (status, body) = server.push(v2, &v2_sig).await;
    assert_eq!(status, 201, "{body}");
    let (old, old_sig) = testkit_version("0.1.5", &key);
    let code = "bundle_version_not_newer";
    seen.insert(refused(&env, &server, "an older version", old, &old_sig, code).await);

    // Oversized uploads are cut off.
    let huge = vec![7u8; (64 << 20) + 10];
    let code = "bundle_too_large";
    seen.insert(refused(&env, &server, "over 64 MiB", huge, &v3_sig, code).await);

    // Every code a push can be refused with was tried above: a new one
    // needs a case here.
    let (_, spec) = server.get("/openapi.json").await;
    let push_codes: BTreeSet<String> = spec["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .filter(|c| {
            (c.starts_with("bundle_") || c.starts_with("signature_") || c == "kind_conflict")
                // Answers to activating a held version or pinning one
                // at submit, not to a push.
                && !["bundle_not_found", "bundle_revoked", "bundle_pin_needs_admin"]
                    .contains(&c.as_str())
        })
        .collect();
    assert_eq!(seen, push_codes, "refusal codes without a case");

    // Nothing but v2 was stored, and the server still serves.
    let (_, list) = server.get("/v1/bundles").await;
    assert_eq!(
        list["bundles"].as_array().unwrap().len(),
        before.0 + 1,
        "{list}"
    );
    assert_eq!(stored(&env).len(), before.1.len() + 1, "{:?}", stored(&env));
    let id = server.submit("noop3", "vps-1", json!({})).await;
    assert_eq!(server.finished(id).await["status"], "succeeded");
}

/// `serve --bundle` goes through the same gate: a bad or unsigned bundle
/// stops the server from starting, with the reason.
async fn serve_refuses_bad_bundles_at_start(db: Db) {
    let env = Env::new(db).await;
    let b = bundles();
    let start = |bundle: &std::path::Path| {
        troupe(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            env.dir.to_str().unwrap(),
            "--db",
            &env.db_url,
            "--trust",
            &b.public_key,
            "--bundle",
            bundle.to_str().unwrap(),
        ])
    };
    let unsigned = env.dir.join("unsigned.bundle");
    std::fs::copy(&b.testkit, &unsigned).unwrap();
    let out = start(&unsigned);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("troupe bundle sign"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = env.dir.join("bad.bundle");
    std::fs::write(&bad, b"not a zip").unwrap();
    std::fs::write(
        env.dir.join("bad.bundle.sig"),
        sign_with(&test_key(), b"not a zip", "testkit", "9.0.0"),
    )
    .unwrap();
    let out = start(&bad);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a zip archive"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Keys given with `--trust` hold only while that process runs: a start
/// without them loads none of what they signed, and says so instead of
/// claiming the database holds no bundle.
async fn a_start_without_its_trust_says_why_nothing_loaded(db: Db) {
    let env = Env::new(db).await;
    let first = env.serve();
    assert!(first.sigterm().success());
    let args: Vec<String> = [
        "serve",
        "--data-dir",
        env.dir.to_str().unwrap(),
        "--db",
        &env.db_url,
        "--listen",
        "127.0.0.1:0",
        "--server-id",
        "test-node",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let again = crate::harness::Server::start(&args, &env.dir, &[]);
    let log = again
        .log_until("the database holds bundles, but none is loaded")
        .await;
    assert!(log.contains("pass the same --trust again"), "{log}");
    assert!(!log.contains("no bundle loaded yet"), "{log}");
}

both_dbs!(
    every_bad_bundle_is_refused_and_nothing_is_stored,
    serve_refuses_bad_bundles_at_start,
    a_start_without_its_trust_says_why_nothing_loaded
);
