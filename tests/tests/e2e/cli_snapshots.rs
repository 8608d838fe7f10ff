//! What the CLI prints, held to reviewed snapshots (`insta`): help, lists,
//! an action's status, and the errors people meet first. A change to any of
//! them shows up in review as a snapshot diff (`cargo insta review`).
//! Times, ids and hashes are masked so the snapshots hold across runs.

use serde_json::json;

use crate::cli::text;
use crate::harness::{Db, Env, troupe};

/// Runs `body` with the filters that mask what differs between runs.
fn masked(body: impl FnOnce()) {
    insta::with_settings!({
        filters => vec![
            (r"\b[0-9a-f]{64}\b", "[hash]"),
            (r"\b[0-9a-f]{16}\b", "[key id]"),
            (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", "[time]"),
            (r"\b\d+(\.\d+)? (ms|s)\b", "[duration]"),
            (r"\b(\d+m\d\ds|\d+h\d\dm)\b", "[duration]"),
            (r"\b\d+[smhd] ago\b", "[ago]"),
            (r"127\.0\.0\.1:\d+", "[address]"),
            (r#""available_bytes":\d+"#, r#""available_bytes":[n]"#),
            (r#""total_bytes":\d+"#, r#""total_bytes":[n]"#),
            (r#""used_percent":[\d.]+"#, r#""used_percent":[n]"#),
        ],
        prepend_module_to_snapshot => false,
    }, {
        body()
    });
}

#[test]
fn help() {
    masked(|| {
        for (name, args) in [
            ("help", &["--help"][..]),
            ("help_submit", &["submit", "--help"]),
            ("help_bundle", &["bundle", "--help"]),
            ("help_bundle_new", &["bundle", "new", "--help"]),
            ("help_goons_add", &["goons", "add", "--help"]),
            ("help_nodes", &["nodes", "--help"]),
            ("help_list", &["list", "--help"]),
            ("help_targets", &["targets", "--help"]),
        ] {
            let out = troupe(args);
            assert!(out.status.success(), "{}", text(&out));
            insta::assert_snapshot!(name, text(&out));
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_user_sees() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve_with(&["--goons"]);
    let cli = |args: &[&str]| text(&server.cli(args));

    let kinds = cli(&["kinds"]);
    let failed = server
        .submit("fail", "vps-1", json!({ "message": "disk full" }))
        .await;
    server.finished(failed).await;
    let flaky = server.submit("flaky", "vps-2", json!({})).await;
    server.finished(flaky).await;
    let (_, shown) = server.get(&format!("/v1/actions/{flaky}")).await;
    let bundle: String = shown["bundle"].as_str().unwrap().chars().take(8).collect();
    let failed = failed.to_string();
    let flaky = flaky.to_string();
    cli(&[
        "goons",
        "add",
        "two",
        "--kind",
        "noop3",
        "--every",
        "--times",
        "2",
        "--timeout",
    ]);
    cli(&["goons", "add", "one", "--output", r#"{"ok": true}"#]);
    masked(|| {
        insta::assert_snapshot!("kinds", kinds);
        insta::assert_snapshot!("status_failed", cli(&["status", &failed]));
        insta::assert_snapshot!("status_retried", cli(&["status", &flaky]));
        insta::assert_snapshot!("status_retried_full", cli(&["status", &flaky, "--full"]));
        // Columns are as wide as their widest cell, and times and
        // durations differ between runs: their gaps are made one width.
        let gaps = |text: String| {
            let mut out = String::with_capacity(text.len());
            for (i, piece) in text.split("  ").enumerate() {
                let piece = piece.trim_start_matches(' ');
                if i > 0 && !piece.is_empty() && !out.ends_with("  ") {
                    out.push_str("  ");
                }
                out.push_str(piece);
            }
            out
        };
        insta::assert_snapshot!("list", gaps(cli(&["list", "--limit", "2"])));
        insta::assert_snapshot!(
            "list_wide",
            gaps(cli(&["list", "--limit", "2", "--output", "wide"]).replace(&bundle, "[bundle]"))
        );
        insta::assert_snapshot!(
            "list_failed_or_cancelled",
            gaps(cli(&[
                "list",
                "--status",
                "failed,cancelled",
                "--since",
                "1h"
            ]))
        );
        insta::assert_snapshot!("goons_list", cli(&["goons", "list"]));
        insta::assert_snapshot!("nodes_list_empty", cli(&["nodes", "list"]));
        insta::assert_snapshot!(
            "error_missing_param",
            cli(&["submit", "sleep", "--target", "vps-3"])
        );
        insta::assert_snapshot!(
            "error_string_for_integer",
            cli(&["submit", "sleep", "--target", "vps-3", "--param", "ms=5"])
        );
        insta::assert_snapshot!(
            "error_unknown_kind",
            cli(&["submit", "reboot-all", "--target", "vps-3"])
        );
        insta::assert_snapshot!("error_unknown_action", cli(&["status", "999999"]));
    });
}

/// `troupe targets`: a record as set and shown, the list, and the errors
/// an operator meets first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_records() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let cli = |args: &[&str]| text(&server.cli(args));
    masked(|| {
        insta::assert_snapshot!(
            "targets_set",
            cli(&[
                "targets",
                "set",
                "vps-123",
                "bmc=https://10.0.0.5",
                "bmc_credentials=dc1-bmc",
                "hypervisor=hv-17"
            ])
        );
        cli(&["targets", "set", "vps-124", "bmc=ipmi://10.0.0.6"]);
        insta::assert_snapshot!("targets_show", cli(&["targets", "show", "vps-123"]));
        insta::assert_snapshot!("targets_list", cli(&["targets", "list"]));
        insta::assert_snapshot!("targets_show_missing", cli(&["targets", "show", "vps-999"]));
        insta::assert_snapshot!(
            "targets_set_secret",
            cli(&[
                "targets",
                "set",
                "vps-123",
                "bmc=https://root:calvin@10.0.0.5"
            ])
        );
    });
}
