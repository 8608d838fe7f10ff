//! The loading gate refuses bad bundles with a message that says what is
//! wrong, and the server does not start on them.

use std::io::Write;

use crate::harness::{Db, Env, both_dbs, bundles, scratch_dir, target_dir, troupe, workspace};

/// Builds a zip from (name, bytes) entries.
fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let dir = scratch_dir("zip");
    for (name, bytes) in entries {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }
    let out = dir.join("out.zip");
    let names: Vec<&str> = entries.iter().map(|(n, _)| *n).collect();
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg("import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w') as z:\n    for n in sys.argv[2:]: z.write(n, n)")
        .arg(&out)
        .args(&names)
        .current_dir(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(out).unwrap()
}

fn manifest(abi: u32, extra_step: bool) -> String {
    let mut m = std::fs::read_to_string(workspace().join("steps/testkit/bundle.toml")).unwrap();
    m = m.replace("abi = 1", &format!("abi = {abi}"));
    if extra_step {
        m.push_str("\n[steps.teleport]\ntimeout_ms = 100\n");
    }
    m
}

/// Starts a server with `bundle` and returns what it said when it refused.
async fn refused(env: &Env, bundle: &[u8]) -> String {
    let path = env.dir.join("bad.bundle");
    std::fs::write(&path, bundle).unwrap();
    let out = troupe(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        env.dir.to_str().unwrap(),
        "--db",
        &env.db_url,
        "--bundle",
        path.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "the server must refuse the bundle");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn bad_bundles_are_refused_with_clear_errors(db: Db) {
    let env = Env::new(db).await;
    let lib = std::fs::read(target_dir().join("libtestkit.so")).unwrap();
    let triple = {
        // The triple the good bundle was built for is the only lib/ folder in it.
        let good = std::fs::read(&bundles().testkit).unwrap();
        let text = String::from_utf8_lossy(&good).into_owned();
        let start = text.find("lib/").unwrap() + 4;
        text[start..].split('/').next().unwrap().to_owned()
    };
    let lib_path = format!("lib/{triple}/libtestkit.so");

    let err = refused(&env, b"this is not a zip").await;
    assert!(err.contains("not a zip archive"), "{err}");

    let err = refused(&env, &zip_of(&[(lib_path.as_str(), &lib)])).await;
    assert!(err.contains("no manifest.toml"), "{err}");

    let err = refused(
        &env,
        &zip_of(&[
            ("manifest.toml", manifest(99, false).as_bytes()),
            (lib_path.as_str(), &lib),
        ]),
    )
    .await;
    assert!(
        err.contains("plugin ABI 99") && err.contains("supports ABI 1"),
        "{err}"
    );

    let other = "lib/sparc64-unknown-linux-gnu/libtestkit.so";
    let err = refused(
        &env,
        &zip_of(&[
            ("manifest.toml", manifest(1, false).as_bytes()),
            (other, &lib),
        ]),
    )
    .await;
    assert!(
        err.contains("no library for this platform") && err.contains("sparc64-unknown-linux-gnu"),
        "{err}"
    );

    let err = refused(
        &env,
        &zip_of(&[
            ("manifest.toml", manifest(1, true).as_bytes()),
            (lib_path.as_str(), &lib),
        ]),
    )
    .await;
    assert!(err.contains("does not export: teleport"), "{err}");

    let err = refused(
        &env,
        &zip_of(&[
            ("manifest.toml", b"format = 1\nname = "),
            (lib_path.as_str(), &lib),
        ]),
    )
    .await;
    assert!(err.contains("invalid manifest"), "{err}");

    let err = refused(
        &env,
        &zip_of(&[
            ("manifest.toml", manifest(1, false).as_bytes()),
            (lib_path.as_str(), b"\x7fELF garbage"),
        ]),
    )
    .await;
    assert!(err.contains("library could not be loaded"), "{err}");

    // A good bundle still loads after all that.
    let server = env.serve();
    let (status, kinds) = server.get("/v1/kinds").await;
    assert_eq!(status, 200);
    assert!(
        kinds["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "noop3")
    );
}

both_dbs!(bad_bundles_are_refused_with_clear_errors);
