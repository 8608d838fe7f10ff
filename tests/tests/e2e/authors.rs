//! A step author's path, from nothing to a pushed bundle: `troupe bundle
//! new`, the scaffold's own tests (offline), `bundle build`, `keys
//! generate`, `bundle sign`, a demo that trusts the key, `bundle push`,
//! `submit`.

use crate::cli::{Demo, text};
use crate::harness::{scratch_dir, troupe_bin};

fn troupe(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(troupe_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn cargo(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(args)
        .arg("--offline")
        .current_dir(dir)
        // Step crates are crates of their own; the ones a test makes share
        // a target directory, so their dependencies build once.
        .env("CARGO_TARGET_DIR", dir.parent().unwrap().join("target"))
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap()
}

#[test]
fn a_new_step_crate_builds_tests_and_runs_on_a_server() {
    let work = scratch_dir("author");
    let new = troupe(&work, &["bundle", "new", "vps-steps"]);
    assert!(new.status.success(), "{}", text(&new));
    assert!(
        text(&new).contains("cargo test"),
        "says what to do next: {}",
        text(&new)
    );
    let krate = work.join("vps-steps");

    // Its unit test and its harness test pass, with no network.
    let test = cargo(&krate, &["test"]);
    assert!(test.status.success(), "{}", text(&test));
    let out = text(&test);
    assert!(out.contains("greet_says_hello ... ok"), "{out}");
    assert!(
        out.contains("hello_survives_two_failures_but_not_three ... ok"),
        "{out}"
    );

    // Built, signed and pushed to a demo that trusts the author's key.
    let built = cargo(&krate, &["build"]);
    assert!(built.status.success(), "{}", text(&built));
    let library = work.join("target/debug/libvps_steps.so");
    let build = troupe(
        &krate,
        &[
            "bundle",
            "build",
            "bundle.toml",
            "--library",
            library.to_str().unwrap(),
        ],
    );
    assert!(build.status.success(), "{}", text(&build));
    let key = troupe(&krate, &["keys", "generate", "--out", "author.key"]);
    assert!(key.status.success(), "{}", text(&key));
    let public = troupe(&krate, &["keys", "public", "author.key"]);
    let public = String::from_utf8(public.stdout).unwrap().trim().to_owned();
    let sign = troupe(
        &krate,
        &[
            "bundle",
            "sign",
            "vps-steps-0.1.0.bundle",
            "--key",
            "author.key",
        ],
    );
    assert!(sign.status.success(), "{}", text(&sign));

    let demo = Demo::start(&work, &[&public]);
    let bundle = krate.join("vps-steps-0.1.0.bundle");
    let push = demo.cli(&work, &["bundle", "push", bundle.to_str().unwrap()]);
    assert!(push.status.success(), "{}", text(&push));
    let run = demo.cli(
        &work,
        &[
            "submit",
            "hello",
            "--target",
            "vps-123",
            "--param",
            "greeting=hi",
            "--wait",
            "--json",
        ],
    );
    assert!(run.status.success(), "{}", text(&run));
    let action: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(action["status"], "succeeded", "{action}");
    assert_eq!(
        action["steps"][0]["output"]["message"], "hi, vps-123",
        "{action}"
    );
}

#[test]
fn bundle_new_refuses_a_bad_name_and_an_existing_directory() {
    let work = scratch_dir("author-bad");
    let bad = troupe(&work, &["bundle", "new", "9 lives"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("cannot name a crate"), "{}", text(&bad));
    std::fs::create_dir_all(work.join("taken")).unwrap();
    std::fs::write(work.join("taken/keep.txt"), "mine").unwrap();
    let taken = troupe(&work, &["bundle", "new", "taken"]);
    assert!(!taken.status.success());
    assert!(text(&taken).contains("already exists"), "{}", text(&taken));
    assert_eq!(
        std::fs::read_to_string(work.join("taken/keep.txt")).unwrap(),
        "mine"
    );
}

/// The manifest the guide's reference shows is one a build accepts.
#[test]
fn the_guides_manifest_reference_is_valid() {
    let guide =
        std::fs::read_to_string(crate::harness::workspace().join("docs/writing-steps.md")).unwrap();
    let section = &guide[guide.find("## The manifest").unwrap()..];
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap();
    let manifest = engine::bundle::Manifest::parse(toml).unwrap();
    manifest.check_new().unwrap();
    assert!(manifest.kinds.contains_key("resize"));
}
