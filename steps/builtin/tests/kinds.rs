//! The built-in kinds, run by troupe-test's harness: the real steps (a real
//! shell command, a real TCP wait on loopback), the manifest's rules, goons
//! for the faults.

use std::net::TcpListener;

use serde_json::json;
use troupe_test::{Bundle, Goon, Outcome, Run, Status, StepStatus};

fn bundle() -> Bundle {
    Bundle::of_crate(env!("CARGO_MANIFEST_DIR")).expect("the builtin bundle loads")
}

/// A reboot of `vps-123` whose server "answers" on a loopback port.
fn reboot<'b>(bundle: &'b Bundle, listener: &TcpListener, command: &str) -> Run<'b> {
    bundle
        .kind("reboot")
        .target("vps-123")
        .param("host", "127.0.0.1")
        .param("port", listener.local_addr().unwrap().port())
        .var("reboot_command", command)
}

#[test]
fn reboot_runs_the_deployments_command_then_waits_for_the_server() {
    let bundle = bundle();
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let report = reboot(
        &bundle,
        &up,
        r#"echo "rebooting $TROUPE_TARGET at $TROUPE_HOST""#,
    )
    .goon(Goon::output("check_disk", json!({ "used_percent": 40.0 })))
    .run()
    .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    let rebooted = report.output("reboot").unwrap();
    assert_eq!(rebooted["exit_code"], 0);
    assert_eq!(rebooted["stdout"], "rebooting vps-123 at 127.0.0.1\n");
    assert_eq!(report.output("wait_network").unwrap()["tries"], 1);
}

#[test]
fn a_failing_reboot_command_is_not_run_twice() {
    // run_command is not idempotent and has no retry: one attempt, then the
    // action fails, and the wait never starts.
    let bundle = bundle();
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let report = reboot(&bundle, &up, "echo no BMC >&2; exit 3")
        .goon(Goon::output("check_disk", json!({ "used_percent": 40.0 })))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.step("reboot").attempts.len(), 1);
    assert!(
        report.error.as_deref().unwrap().contains("exit"),
        "{report}"
    );
    assert_eq!(report.step("wait_network").status, StepStatus::NotRun);
}

#[test]
fn a_full_disk_check_is_retried_once_then_fails_the_reboot() {
    let bundle = bundle();
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let report = reboot(&bundle, &up, "true")
        .goon(
            Goon::fail("check_disk")
                .every_attempt()
                .message("/ is 99% full"),
        )
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed);
    // Two attempts, one second apart on the virtual clock.
    let attempts = &report.step("check_disk").attempts;
    assert_eq!(attempts.len(), 2);
    assert!(attempts[1].started_at >= std::time::Duration::from_secs(1));
    assert_eq!(
        report.step("reboot").status,
        StepStatus::NotRun,
        "never rebooted"
    );
}

#[test]
fn a_server_that_never_answers_times_the_wait_out() {
    let bundle = bundle();
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let report = reboot(&bundle, &up, "true")
        .goon(Goon::output("check_disk", json!({ "used_percent": 40.0 })))
        .goon(Goon::past_timeout("wait_network"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed);
    assert!(matches!(
        report.step("wait_network").attempts[0].outcome,
        Outcome::TimedOut(_)
    ));
    // Its 15-minute timeout passed on the virtual clock only.
    assert!(report.elapsed >= std::time::Duration::from_secs(900));
}

#[test]
fn run_passes_each_argument_as_it_is() {
    let report = bundle()
        .kind("run")
        .param(
            "argv",
            json!(["printf", "%s|", "a b", "$HOME", "; rm -rf /"]),
        )
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    assert_eq!(
        report.output("run_command").unwrap()["stdout"],
        "a b|$HOME|; rm -rf /|"
    );
}

#[test]
fn reboot_needs_its_command_configured() {
    let err = bundle()
        .kind("reboot")
        .param("host", "127.0.0.1")
        .run()
        .expect_err("refused");
    assert!(err.to_string().contains("reboot_command"), "{err}");
}
