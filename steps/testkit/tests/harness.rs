//! The testkit bundle run by troupe-test's harness, as a step author runs
//! theirs: each rule of the runner and each goon, in milliseconds.

use std::time::{Duration, Instant};

use serde_json::json;
use troupe_test::{Bundle, Goon, Outcome, Status, StepStatus};

fn bundle() -> Bundle {
    Bundle::of_crate(env!("CARGO_MANIFEST_DIR")).expect("the testkit bundle loads")
}

#[test]
fn templates_see_params_target_and_earlier_outputs() {
    let report = bundle()
        .kind("echo")
        .target("vps-123")
        .id(42)
        .param("size", 3)
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    let first = report.output("first").unwrap();
    assert_eq!(
        first["settings"],
        json!({ "greeting": "hello vps-123", "size": 3 })
    );
    assert_eq!(first["action"]["target"], "vps-123");
    assert_eq!(first["action"]["params"], json!({ "size": 3 }));
    assert_eq!(first["attempt"], 1);
    let second = report.output("second").unwrap();
    assert_eq!(second["settings"]["previous"], "hello vps-123");
    assert_eq!(second["settings"]["action"], 42);
    assert_eq!(second["outputs"]["first"], *first);
}

#[test]
fn params_are_checked_before_anything_runs() {
    let missing = bundle().kind("sleep").run().unwrap_err();
    assert_eq!(
        missing.to_string(),
        "action kind \"sleep\" needs the params ms"
    );
    let wrong = bundle()
        .kind("sleep")
        .param("ms", "soon")
        .run()
        .unwrap_err();
    assert!(wrong.to_string().contains("\"ms\""), "{wrong}");
    let unknown = bundle()
        .kind("noop3")
        .param("colour", "red")
        .run()
        .unwrap_err();
    assert!(
        unknown.to_string().contains("unknown param \"colour\""),
        "{unknown}"
    );
    let kind = bundle().kind("reboot").run().unwrap_err();
    assert!(
        kind.to_string()
            .starts_with("unknown action kind \"reboot\""),
        "{kind}"
    );
}

#[test]
fn a_fatal_error_fails_the_action_and_later_steps_never_run() {
    let report = bundle()
        .kind("fail")
        .param("message", "disk full")
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        report.error.as_deref(),
        Some("step \"fail\" failed: disk full")
    );
    assert_eq!(report.step("noop").status, StepStatus::Succeeded);
    assert_eq!(report.step("never").status, StepStatus::NotRun);
    assert!(report.step("never").attempts.is_empty());
}

/// A report prints as `troupe status` shows an action: the end, then one
/// line per step with its attempts.
#[test]
fn a_report_prints_the_end_and_one_line_per_step() {
    let report = bundle()
        .kind("fail")
        .param("message", "disk full")
        .run()
        .unwrap();
    let text = report.to_string();
    let mut lines = text.lines();
    let head = lines.next().unwrap();
    assert!(
        head.starts_with("failed in ") && head.ends_with(" ms: step \"fail\" failed: disk full"),
        "{text}"
    );
    assert_eq!(
        lines.collect::<Vec<_>>(),
        [
            "  noop                 Succeeded (1 attempt)",
            "  fail                 Failed (1 attempt)",
            "  never                NotRun (0 attempts)",
        ],
        "{text}"
    );
    let flaky = bundle().kind("flaky").run().unwrap().to_string();
    assert!(flaky.starts_with("succeeded in "), "{flaky}");
    assert!(flaky.ends_with("Succeeded (3 attempts)"), "{flaky}");
    assert_eq!(Status::Cancelled.to_string(), "cancelled");
}

#[test]
fn retries_wait_their_backoff_on_the_virtual_clock() {
    // `flaky` fails twice, then succeeds; backoff 20 ms, doubling.
    let report = bundle().kind("flaky").run().unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    let attempts = &report.step("flaky").attempts;
    assert_eq!(attempts.len(), 3);
    assert!(matches!(&attempts[0].outcome, Outcome::Retryable(m) if m.contains("attempt 1 of 2")));
    assert!(attempts[1].started_at >= Duration::from_millis(20));
    assert!(attempts[2].started_at >= Duration::from_millis(60));
    assert_eq!(report.output("flaky").unwrap()["succeeded_on_attempt"], 3);

    let report = bundle().kind("flaky_exhausted").run().unwrap();
    assert_eq!(report.status, Status::Failed);
    assert!(report.error.unwrap().contains("(after 3 attempts)"));
}

#[test]
fn a_step_that_overruns_its_timeout_is_stopped() {
    // `slow` sleeps 30 s, honouring cancel, under a 300 ms timeout.
    let report = bundle().kind("slow").run().unwrap();
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        report.error.as_deref(),
        Some("step \"slow\" failed: step \"slow\" timed out after 300 ms")
    );
}

#[test]
fn a_panic_is_a_fatal_error() {
    let report = bundle().kind("panic").run().unwrap();
    assert_eq!(report.status, Status::Failed);
    assert!(
        report
            .error
            .unwrap()
            .contains("step panicked: testkit panic step was asked to panic")
    );
}

#[test]
fn goon_fail_on_one_attempt_then_the_retry_succeeds() {
    let report = bundle()
        .kind("flaky")
        .goon(Goon::fail("flaky").on_attempt(3).message("busy"))
        .run()
        .unwrap();
    // Attempts 1 and 2 fail as the step does, 3 by the goon: all three spent.
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        report.error.as_deref(),
        Some("step \"flaky\" failed (after 3 attempts): busy")
    );
    assert!(report.step("flaky").attempts[2].goon);
}

#[test]
fn goon_fail_fatal_is_not_retried() {
    let report = bundle()
        .kind("flaky")
        .goon(Goon::fail("flaky").fatal().message("wrong state"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.step("flaky").attempts.len(), 1);
}

#[test]
fn goon_past_timeout_costs_virtual_time_only() {
    let wall = Instant::now();
    // `one` is a noop with a 10 s timeout, idempotent, one attempt.
    let report = bundle()
        .kind("noop3")
        .goon(Goon::past_timeout("two"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        report.error.as_deref(),
        Some("step \"two\" failed: step \"two\" timed out after 10000 ms")
    );
    assert!(
        report.elapsed >= Duration::from_secs(10),
        "{:?}",
        report.elapsed
    );
    assert!(wall.elapsed() < Duration::from_secs(5), "no real waiting");
    assert_eq!(report.step("three").status, StepStatus::NotRun);
}

#[test]
fn goon_delay_within_the_timeout_then_the_step_runs() {
    let report = bundle()
        .kind("noop3")
        .goon(Goon::delay("one", Duration::from_secs(9)))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    assert!(report.step("two").attempts[0].started_at >= Duration::from_secs(9));
}

#[test]
fn a_timeout_is_retried_only_when_the_step_is_idempotent() {
    // `flaky` is idempotent with 3 attempts: timed out twice, then it runs.
    let report = bundle()
        .kind("flaky")
        .goon(Goon::past_timeout("flaky"))
        .goon(Goon::past_timeout("flaky").on_attempt(2))
        .run()
        .unwrap();
    let attempts = &report.step("flaky").attempts;
    assert!(matches!(attempts[0].outcome, Outcome::TimedOut(_)));
    assert!(matches!(attempts[1].outcome, Outcome::TimedOut(_)));
    // The third attempt is the step's own third: fails (it fails twice, by
    // attempt number), so the action fails after three attempts.
    assert_eq!(attempts.len(), 3);
    assert!(report.elapsed >= Duration::from_secs(20));

    // `sleep_once` is not idempotent: a timeout fails the action at once.
    let report = bundle()
        .kind("sleep_once")
        .param("ms", 1)
        .goon(Goon::past_timeout("sleep_once"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed);
    assert_eq!(report.step("sleep_once").attempts.len(), 1);
}

#[test]
fn goon_crash_fails_the_step_for_good() {
    let report = bundle()
        .kind("flaky")
        .goon(Goon::crash("flaky"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        report.step("flaky").attempts.len(),
        1,
        "a crash is not retried"
    );
    assert!(report.error.unwrap().contains("step host crashed"));
}

#[test]
fn goon_cancel_at_a_step_stops_the_action() {
    // `slow` honours its cancel flag: it returns at once, cancelled.
    let report = bundle()
        .kind("slow")
        .goon(Goon::cancel_at("slow"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Cancelled);
    assert_eq!(report.error.as_deref(), Some("cancelled on request"));
    assert_eq!(report.step("slow").status, StepStatus::Cancelled);

    // A step that finishes despite the cancel keeps its success; the next
    // one never starts.
    let report = bundle()
        .kind("noop3")
        .goon(Goon::cancel_at("two"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Cancelled);
    assert_eq!(report.step("two").status, StepStatus::Succeeded);
    assert_eq!(report.step("three").status, StepStatus::NotRun);
}

#[test]
fn goon_lose_node_retries_only_idempotent_steps() {
    let report = bundle()
        .kind("flaky")
        .goon(Goon::lose_node("flaky").message("hv-17"))
        .run()
        .unwrap();
    let first = &report.step("flaky").attempts[0];
    assert!(matches!(&first.outcome, Outcome::Lost(m) if m.starts_with("node hv-17 went away")));
    assert!(report.step("flaky").attempts.len() > 1, "retried elsewhere");

    let report = bundle()
        .kind("sleep_once")
        .param("ms", 1)
        .goon(Goon::lose_node("sleep_once").message("hv-17"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed);
    assert!(report.error.unwrap().contains("node hv-17 went away"));
}

#[test]
fn a_manifest_naming_a_step_the_library_lacks_is_refused() {
    let dir = std::env::temp_dir().join(format!("troupe-harness-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("bundle.toml");
    std::fs::write(
        &manifest,
        "format = 1\nname = \"x\"\nversion = \"1.0.0\"\nabi = 2\nlibrary = \"testkit\"\n\
         [steps.reboot]\ntimeout_ms = 1000\n",
    )
    .unwrap();
    let library = bundle_library();
    let err = Bundle::open(&manifest, &library).err().expect("refused");
    assert!(err.to_string().contains("does not export: reboot"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Where `Bundle::of_crate` finds the library.
fn bundle_library() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| {
            d.join(format!(
                "{}testkit{}",
                std::env::consts::DLL_PREFIX,
                std::env::consts::DLL_SUFFIX
            ))
        })
        .find(|p| p.is_file())
        .expect("cargo built the testkit library")
}

#[test]
fn goon_output_stands_in_for_a_step() {
    // `fail` would fail the action; the goon answers for it.
    let report = bundle()
        .kind("fail")
        .goon(Goon::output("fail", json!({ "rebooted": true })))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    assert_eq!(report.output("fail").unwrap()["rebooted"], true);
    assert_eq!(report.step("never").status, StepStatus::Succeeded);
}

#[test]
fn goons_can_be_limited_to_a_kind_and_a_number_of_times() {
    // `flaky` fails its first two attempts and has three: a goon on every
    // attempt but spent after one leaves attempts 2 and 3 to the step, which
    // succeeds on the third.
    let report = bundle()
        .kind("flaky")
        .goon(Goon::fail("flaky").every_attempt().times(1))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    let goons: Vec<bool> = report
        .step("flaky")
        .attempts
        .iter()
        .map(|a| a.goon)
        .collect();
    assert_eq!(goons, [true, false, false], "{report}");
    // Twice: the goon takes attempts 1 and 2, the step's own third succeeds.
    let report = bundle()
        .kind("flaky")
        .goon(Goon::fail("flaky").every_attempt().times(2))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    let goons: Vec<bool> = report
        .step("flaky")
        .attempts
        .iter()
        .map(|a| a.goon)
        .collect();
    assert_eq!(goons, [true, true, false], "{report}");
    // Not limited, it takes every attempt and the action fails.
    let report = bundle()
        .kind("flaky")
        .goon(Goon::fail("flaky").every_attempt())
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    assert!(report.step("flaky").attempts.iter().all(|a| a.goon));
    let report = bundle()
        .kind("noop3")
        .goon(Goon::fail("one").fatal().for_kind("echo"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "a goon for another kind");
}

/// A param with an `allowed_in` list is held to the list the run's
/// deployment variable gives, as a server holds it.
#[test]
fn a_listed_param_must_be_on_the_list() {
    let dir = std::env::temp_dir().join(format!("testkit-listed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_text = dir.to_str().unwrap().to_owned();
    let off_list = bundle()
        .kind("secret")
        .param("dir", "/elsewhere")
        .var("record_dirs", dir_text.as_str())
        .secret("test_token", "s3cret-token")
        .run()
        .unwrap_err();
    assert!(off_list.to_string().contains("record_dirs"), "{off_list}");
    let report = bundle()
        .kind("secret")
        .param("dir", dir_text.as_str())
        .var("record_dirs", dir_text.as_str())
        .secret("test_token", "s3cret-token")
        .run()
        .unwrap();
    assert!(dir.join("given.json").exists(), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}
