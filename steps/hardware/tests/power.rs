//! The `power` kind against a real Redfish BMC: sushy-tools' emulator with
//! its fake driver, on loopback, with TLS and HTTP basic auth (bcrypt).
//! `tests/run` installs it and sets `TROUPE_TEST_SUSHY`.

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use troupe_test::{Bundle, Outcome, Run, Status};

const PASSWORD: &str = "s3cret-bmc-pw";
const SRV1: &str = "11111111-2222-3333-4444-555555555555";
const SRV2: &str = "66666666-7777-8888-9999-000000000000";

fn bundle() -> Bundle {
    Bundle::of_crate(env!("CARGO_MANIFEST_DIR")).expect("the hardware bundle loads")
}

/// A sushy-emulator on a loopback port, killed when dropped.
struct Bmc {
    child: Child,
    dir: PathBuf,
    url: String,
    /// The SHA-256 of its certificate, as openssl prints it.
    fingerprint: String,
}

impl Drop for Bmc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Bmc {
    /// Starts an emulator with these systems (uuid, power state).
    fn start(systems: &[(&str, &str)]) -> Bmc {
        let emulator = PathBuf::from(std::env::var("TROUPE_TEST_SUSHY").expect(
            "TROUPE_TEST_SUSHY is not set: run the tests with `bash tests/run`, which installs sushy-tools and points it at sushy-emulator",
        ));
        let python = emulator.with_file_name("python3");
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "troupe-bmc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let fingerprint = run(Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&cert));
        let fingerprint = fingerprint.trim().split_once('=').unwrap().1.to_owned();
        // The emulator takes bcrypt digests only.
        let htpasswd = run(Command::new(&python).args([
            "-c",
            "import bcrypt, sys; print('admin:' + bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(4)).decode())",
            PASSWORD,
        ]));
        std::fs::write(dir.join("htpasswd"), htpasswd).unwrap();
        let systems: Vec<String> = systems
            .iter()
            .enumerate()
            .map(|(i, (uuid, state))| {
                format!(
                    "{{'uuid': '{uuid}', 'name': 'srv-{i}', 'power_state': '{state}', 'nics': []}}"
                )
            })
            .collect();
        std::fs::write(
            dir.join("emulator.conf"),
            format!(
                "SUSHY_EMULATOR_FAKE_DRIVER = True\nSUSHY_EMULATOR_FAKE_SYSTEMS = [{}]\nSUSHY_EMULATOR_AUTH_FILE = {:?}\n",
                systems.join(", "),
                dir.join("htpasswd").to_str().unwrap()
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("emulator.log")).unwrap();
        let mut child = Command::new(&emulator)
            .env("SUSHY_EMULATOR_CONFIG", dir.join("emulator.conf"))
            // Its systems' state is a file in the temporary directory: one each.
            .env("TMPDIR", &dir)
            .args([
                "--fake",
                "--interface",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .arg("--ssl-certificate")
            .arg(&cert)
            .arg("--ssl-key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", emulator.display()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("sushy-emulator ended ({status}): {}", log_of(&dir));
            }
            assert!(
                Instant::now() < deadline,
                "sushy-emulator did not listen within 30 s: {}",
                log_of(&dir)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Bmc {
            child,
            dir,
            url: format!("https://127.0.0.1:{port}"),
            fingerprint,
        }
    }

    /// The deployment's `--var bmcs`, pinning this BMC's certificate.
    fn pinned(&self) -> String {
        format!("{}=sha256:{}", self.url, self.fingerprint)
    }

    fn log(&self) -> String {
        log_of(&self.dir)
    }
}

/// A loopback port nothing listens on, never the same twice in this
/// process (the tests run at once, each its own emulator).
fn free_port() -> u16 {
    static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut taken = TAKEN.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if taken.insert(port) {
            return port;
        }
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("emulator.log")).unwrap_or_default()
}

/// The BMC URLs of a list of `URL[=TRUST]` entries, for `--var bmcs`.
fn allowed(entries: &str) -> String {
    entries
        .split_whitespace()
        .map(|e| e.split_once('=').map_or(e, |(url, _)| url))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A power action on `bmc`, allowed by `bmcs`, with the right credentials.
fn power<'b>(bundle: &'b Bundle, bmc: &str, bmcs: &str, op: &str) -> Run<'b> {
    bundle
        .kind("power")
        .target("srv-1")
        .param("op", op)
        .param("bmc", bmc)
        .param("wait_ms", 60_000)
        .var("bmcs", allowed(bmcs))
        .var("bmc_trust", bmcs)
        .secret("bmc_credentials", &format!("admin:{PASSWORD}"))
}

/// Nothing the run reports holds the password.
fn assert_no_password(report: &troupe_test::Report) {
    let text = format!("{report:?}");
    assert!(!text.contains(PASSWORD), "the password leaked: {text}");
}

#[test]
fn status_off_on_and_cycle_through_a_real_bmc() {
    let bundle = bundle();
    let bmc = Bmc::start(&[(SRV1, "On")]);
    let step = |op: &str| {
        let report = power(&bundle, &bmc.url, &bmc.pinned(), op).run().unwrap();
        assert_eq!(
            report.status,
            Status::Succeeded,
            "{op}: {report}\n{}",
            bmc.log()
        );
        assert_no_password(&report);
        report.output("power").unwrap().clone()
    };

    let status = step("status");
    assert_eq!(status["power_state"], "On");
    assert_eq!(status["system"], SRV1);
    assert!(status["reset_type"].is_null());

    let off = step("off");
    assert_eq!(off["reset_type"], "ForceOff");
    assert_eq!(off["power_state"], "Off");
    assert_eq!(step("status")["power_state"], "Off");
    // Off already: a graceful shutdown has nothing to do.
    assert!(step("soft_off")["reset_type"].is_null());

    let on = step("on");
    assert_eq!(on["reset_type"], "On");
    assert_eq!(on["power_state"], "On");
    // On again: nothing is sent, and the step says so.
    let again = step("on");
    assert!(again["reset_type"].is_null(), "{again}");
    assert_eq!(
        again["summary"],
        format!("{SRV1} is already On: no reset sent")
    );

    // The emulator offers no PowerCycle: a forced restart instead.
    let cycle = step("cycle");
    assert_eq!(cycle["reset_type"], "ForceRestart");
    assert_eq!(cycle["power_state"], "On");

    // The emulator saw the resets, each one posted once.
    let log = bmc.log();
    assert_eq!(log.matches("POST /redfish/v1/Systems/").count(), 3, "{log}");
}

#[test]
fn soft_off_then_cycle_and_reset_power_the_server_back_on() {
    let bundle = bundle();
    let bmc = Bmc::start(&[(SRV1, "On")]);
    let step = |op: &str| {
        let report = power(&bundle, &bmc.url, &bmc.pinned(), op).run().unwrap();
        assert_eq!(
            report.status,
            Status::Succeeded,
            "{op}: {report}\n{}",
            bmc.log()
        );
        report.output("power").unwrap().clone()
    };
    let soft = step("soft_off");
    assert_eq!(soft["reset_type"], "GracefulShutdown");
    assert_eq!(soft["power_state"], "Off");
    // Cycling a server that is off powers it on.
    let cycle = step("cycle");
    assert_eq!(cycle["reset_type"], "On");
    assert_eq!(cycle["power_state"], "On");
    let reset = step("reset");
    assert_eq!(reset["reset_type"], "ForceRestart");
    assert_eq!(reset["power_state"], "On");
}

#[test]
fn a_wrong_password_is_fatal_names_the_bmc_and_never_the_password() {
    let bundle = bundle();
    let bmc = Bmc::start(&[(SRV1, "On")]);
    let wrong = "not-the-password-42";
    let report = power(&bundle, &bmc.url, &bmc.pinned(), "status")
        .secret("bmc_credentials", &format!("admin:{wrong}"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    // Fatal: no retry can mend a wrong password.
    assert_eq!(report.step("power").attempts.len(), 1);
    let error = report.error.clone().unwrap();
    assert!(error.contains(&bmc.url) && error.contains("401"), "{error}");
    assert!(error.contains("bmc_credentials"), "{error}");
    // The BMC's own Redfish error message is carried along.
    assert!(error.contains("Incorrect username or password"), "{error}");
    let text = format!("{report:?}");
    assert!(!text.contains(wrong), "the password leaked: {text}");
    assert!(
        !bmc.log().contains(wrong),
        "the password is in the BMC's log"
    );
}

#[test]
fn an_unknown_certificate_is_refused_and_a_pinned_one_accepted() {
    let bundle = bundle();
    let bmc = Bmc::start(&[(SRV1, "On")]);

    // Listed without a pin: its self-signed certificate chains to no root.
    let report = power(&bundle, &bmc.url, &bmc.url, "status").run().unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    assert_eq!(
        report.step("power").attempts.len(),
        1,
        "a TLS failure is not retried"
    );
    let error = report.error.clone().unwrap();
    assert!(
        error.contains("TLS to the BMC") && error.contains(&bmc.url),
        "{error}"
    );
    assert!(error.contains("invalid peer certificate"), "{error}");

    // Pinned to another certificate.
    let other = format!("{}=sha256:{}", bmc.url, "00".repeat(32));
    let report = power(&bundle, &bmc.url, &other, "status").run().unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    let error = report.error.clone().unwrap();
    assert!(error.contains("not the pinned one"), "{error}");

    // Pinned to its own: accepted.
    let report = power(&bundle, &bmc.url, &bmc.pinned(), "status")
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    assert_eq!(report.output("power").unwrap()["power_state"], "On");
}

#[test]
fn a_bmc_the_deployment_does_not_list_is_refused_before_anything_is_sent() {
    let bundle = bundle();
    let bmc = Bmc::start(&[(SRV1, "On")]);
    // Refused at submit: the param is checked against `--var bmcs`.
    let refused = power(
        &bundle,
        &bmc.url,
        "https://10.0.0.5 https://127.0.0.1:1",
        "off",
    )
    .run()
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("not in this server's list") && refused.contains("bmcs"),
        "{refused}"
    );
    // (The step checks again before it sends the credentials: see
    // `bmcs::tests::an_unlisted_bmc_is_refused`.)
    assert!(
        !bmc.log().contains("/redfish"),
        "the BMC was called: {}",
        bmc.log()
    );
}

#[test]
fn a_bmc_with_several_systems_needs_one_named() {
    let bundle = bundle();
    let bmc = Bmc::start(&[(SRV1, "On"), (SRV2, "Off")]);
    let report = power(&bundle, &bmc.url, &bmc.pinned(), "status")
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    let error = report.error.clone().unwrap();
    assert!(
        error.contains("2 systems") && error.contains(SRV1) && error.contains(SRV2),
        "{error}"
    );

    let report = power(&bundle, &bmc.url, &bmc.pinned(), "status")
        .param("system", SRV2)
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    assert_eq!(report.output("power").unwrap()["power_state"], "Off");

    let report = power(&bundle, &bmc.url, &bmc.pinned(), "status")
        .param("system", "nope")
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    assert!(
        report.error.clone().unwrap().contains("has no system nope"),
        "{report}"
    );
}

#[test]
fn an_unreachable_bmc_is_retried_then_fails() {
    let bundle = bundle();
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let report = power(&bundle, &url, &url, "on").run().unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    let attempts = &report.step("power").attempts;
    assert_eq!(attempts.len(), 4, "{report}");
    assert!(
        matches!(attempts[0].outcome, Outcome::Retryable(_)),
        "{report}"
    );
    assert!(
        report
            .error
            .clone()
            .unwrap()
            .contains("cannot reach the BMC"),
        "{report}"
    );
}

#[test]
fn an_unknown_op_is_refused_at_submit() {
    let bundle = bundle();
    let err = power(
        &bundle,
        "https://127.0.0.1:1",
        "https://127.0.0.1:1",
        "explode",
    )
    .run()
    .unwrap_err();
    assert!(err.to_string().contains("op"), "{err}");
}

#[test]
fn reboot_shuts_down_gracefully_then_powers_on() {
    let bundle = bundle();
    let bmc = Bmc::start(&[(SRV1, "On")]);
    let report = power(&bundle, &bmc.url, &bmc.pinned(), "reboot")
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}\n{}", bmc.log());
    let out = report.output("power").unwrap();
    assert_eq!(out["reset_type"], "GracefulShutdown, On", "{out}");
    assert_eq!(out["power_state"], "On", "{out}");
    assert!(
        out["summary"]
            .as_str()
            .unwrap()
            .contains("shut down gracefully"),
        "{out}"
    );
    // The emulator saw both resets, in order.
    let log = bmc.log();
    assert_eq!(log.matches("POST /redfish/v1/Systems/").count(), 2, "{log}");
}
