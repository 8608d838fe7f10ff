//! The `power` kind over IPMI v2.0 (lanplus) against a real BMC: OpenIPMI's
//! `ipmi_sim` LAN simulator on a loopback UDP port, its chassis power kept
//! in a file by a control script, driven by `ipmitool`. `tests/run`
//! installs both (Debian packages `openipmi` and `ipmitool`).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use troupe_test::{Bundle, Outcome, Run, Status};

const PASSWORD: &str = "s3cret-ipmi-pw";

fn bundle() -> Bundle {
    Bundle::of_crate(env!("CARGO_MANIFEST_DIR")).expect("the hardware bundle loads")
}

/// An `ipmi_sim` on a loopback port, killed when dropped.
struct Bmc {
    child: Child,
    dir: PathBuf,
    url: String,
    port: u16,
}

impl Drop for Bmc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn installed(program: &str) -> PathBuf {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{program} is missing: run the tests with `bash tests/run`, which installs openipmi and ipmitool"
            )
        })
}

impl Bmc {
    /// Starts a simulated BMC whose server is `power` ("on" or "off").
    fn start(power: &str) -> Bmc {
        let sim = installed("ipmi_sim");
        installed("ipmitool");
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "troupe-ipmi-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::write(dir.join("power"), if power == "on" { "1\n" } else { "0\n" }).unwrap();
        // ipmi_sim asks this for the chassis power (`get power`) and to
        // change it (`set power 0|1`, `set shutdown 1`, `set reset 1`); a
        // cycle is `set power 0`, then `set power 1` a moment later. While
        // the file `stubborn` exists, the server ignores a graceful shutdown.
        let control = dir.join("chassis");
        std::fs::write(
            &control,
            format!(
                r#"#!/bin/sh
state={state:?}
echo "$*" >> {calls:?}
shift
op=$1; shift
case $op in
get) for p in "$@"; do
       case $p in
         power) echo "power:$(cat "$state")";;
         boot) echo "boot:default";;
       esac
     done;;
set) while [ $# -gt 1 ]; do
       case $1 in
         power) echo "$2" > "$state";;
         shutdown) [ -e {stubborn:?} ] || echo 0 > "$state";;
       esac
       shift 2
     done;;
esac
"#,
                state = dir.join("power"),
                calls = dir.join("calls.log"),
                stubborn = dir.join("stubborn"),
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &control,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            dir.join("lan.conf"),
            format!(
                r#"name "troupe"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "{control} 0x20"
  user 2 true "admin" "{PASSWORD}" admin 10 none md2 md5 straight
"#,
                control = control.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("bmc.emu"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("sim.log")).unwrap();
        let child = Command::new(sim)
            .arg("-c")
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("bmc.emu"))
            .arg("-s")
            .arg(dir.join("state"))
            .args(["-n", "-p"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ipmi_sim starts");
        let mut bmc = Bmc {
            child,
            dir,
            url: format!("ipmi://127.0.0.1:{port}"),
            port,
        };
        // UDP: ready once it answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !bmc.answers() {
            if let Some(status) = bmc.child.try_wait().unwrap() {
                panic!("ipmi_sim ended ({status}): {}", bmc.log());
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim did not answer within 20 s: {}",
                bmc.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        bmc
    }

    fn answers(&self) -> bool {
        Command::new("ipmitool")
            .env("IPMI_PASSWORD", PASSWORD)
            .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", "admin", "-E", "-N", "1", "-R", "1", "mc", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The chassis power the simulator holds: "1" or "0".
    fn power(&self) -> String {
        std::fs::read_to_string(self.dir.join("power"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// What ipmi_sim asked its control script to change.
    fn changes(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" set "))
            .map(str::to_owned)
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sim.log")).unwrap_or_default()
    }

    /// From now on the server ignores graceful shutdowns.
    fn make_stubborn(&self) {
        std::fs::write(self.dir.join("stubborn"), "").unwrap();
    }
}

fn power<'b>(bundle: &'b Bundle, bmc: &str, op: &str) -> Run<'b> {
    bundle
        .kind("power")
        .target("srv-1")
        .param("op", op)
        .param("bmc", bmc)
        .param("wait_ms", 30_000)
        .var("bmcs", bmc)
        .var("bmc_trust", "")
        .secret("bmc_credentials", &format!("admin:{PASSWORD}"))
}

#[test]
fn status_off_on_cycle_and_reset_over_ipmi() {
    let bundle = bundle();
    let bmc = Bmc::start("on");
    let step = |op: &str| {
        let report = power(&bundle, &bmc.url, op).run().unwrap();
        assert_eq!(
            report.status,
            Status::Succeeded,
            "{op}: {report}\n{}",
            bmc.log()
        );
        let text = format!("{report:?}");
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
        report.output("power").unwrap().clone()
    };

    let status = step("status");
    assert_eq!(status["power_state"], "On");
    assert_eq!(status["bmc"], bmc.url);
    assert!(status["reset_type"].is_null());
    assert!(bmc.changes().is_empty(), "{:?}", bmc.changes());

    let off = step("off");
    assert_eq!(off["reset_type"], "chassis power off");
    assert_eq!(off["power_state"], "Off");
    assert_eq!(bmc.power(), "0");
    assert_eq!(step("status")["power_state"], "Off");

    let on = step("on");
    assert_eq!(on["reset_type"], "chassis power on");
    assert_eq!(on["power_state"], "On");
    assert_eq!(bmc.power(), "1");

    // On again: nothing is sent, and the step says so.
    let sent = bmc.changes().len();
    let again = step("on");
    assert!(again["reset_type"].is_null(), "{again}");
    assert_eq!(
        again["summary"],
        format!("{} is already On: no command sent", bmc.url)
    );
    assert_eq!(bmc.changes().len(), sent, "{:?}", bmc.changes());

    // A cycle: the simulator powers off, then on again.
    let cycle = step("cycle");
    assert_eq!(cycle["reset_type"], "chassis power cycle");
    assert_eq!(cycle["power_state"], "On");
    let reset = step("reset");
    assert_eq!(reset["reset_type"], "chassis power reset");
    assert_eq!(reset["power_state"], "On");
    let soft = step("soft_off");
    assert_eq!(soft["reset_type"], "chassis power soft");
    assert_eq!(soft["power_state"], "Off");
    // Cycling a server that is off powers it on.
    let cycle = step("cycle");
    assert_eq!(cycle["reset_type"], "chassis power on");
    assert_eq!(cycle["power_state"], "On");

    assert_eq!(
        bmc.changes(),
        [
            "0x20 set power 0",
            "0x20 set power 1",
            "0x20 set power 0",
            "0x20 set power 1",
            "0x20 set reset 1",
            "0x20 set shutdown 1",
            "0x20 set power 1",
        ]
    );
}

#[test]
fn a_wrong_ipmi_password_is_named_as_such_with_the_bmc_and_never_shown() {
    let bundle = bundle();
    let bmc = Bmc::start("on");
    let wrong = "not-the-pw-42";
    let report = power(&bundle, &bmc.url, "off")
        .secret("bmc_credentials", &format!("admin:{wrong}"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    // Fatal: no retry can mend a wrong password.
    assert_eq!(report.step("power").attempts.len(), 1, "{report}");
    let error = report.error.clone().unwrap();
    assert!(
        error.contains(&format!(
            "the BMC {} refused the password for user admin",
            bmc.url
        )) && error.contains("bmc_credentials"),
        "{error}"
    );
    let text = format!("{report:?}");
    assert!(!text.contains(wrong), "the password leaked: {text}");
    assert!(
        !bmc.log().contains(wrong),
        "the password is in the BMC's log"
    );
    // Nothing was changed.
    assert_eq!(bmc.power(), "1");
    assert!(bmc.changes().is_empty(), "{:?}", bmc.changes());

    // An unknown user is named as such too.
    let report = power(&bundle, &bmc.url, "status")
        .secret("bmc_credentials", &format!("nobody:{PASSWORD}"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    let error = report.error.clone().unwrap();
    assert!(error.contains("does not know the user nobody"), "{error}");
}

#[test]
fn an_unreachable_ipmi_bmc_is_retried_then_fails() {
    let bundle = bundle();
    // A UDP port nothing answers on.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ipmi://127.0.0.1:{port}");
    let report = power(&bundle, &url, "status").run().unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    let attempts = &report.step("power").attempts;
    assert_eq!(attempts.len(), 4, "{report}");
    assert!(
        matches!(attempts[0].outcome, Outcome::Retryable(_)),
        "{report}"
    );
    let error = report.error.clone().unwrap();
    assert!(
        error.contains(&format!("cannot reach the BMC {url} over IPMI")),
        "{error}"
    );
}

#[test]
fn the_ipmi_password_is_not_in_ipmitools_argv() {
    // While ipmitool waits on a BMC that does not answer, its command line
    // is what `ps` shows every user of the machine.
    let bundle = bundle();
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ipmi://127.0.0.1:{port}");
    let seen = std::thread::scope(|s| {
        let run = s.spawn(|| power(&bundle, &url, "status").run().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = None;
        while seen.is_none() && Instant::now() < deadline && !run.is_finished() {
            seen = ipmitool_cmdline(port);
            std::thread::sleep(Duration::from_millis(20));
        }
        run.join().unwrap();
        seen
    });
    let cmdline = seen.expect("ipmitool was seen running");
    assert!(cmdline.contains("-E"), "{cmdline}");
    assert!(
        !cmdline.contains(PASSWORD),
        "the password is in argv: {cmdline}"
    );
}

/// The command line of an `ipmitool` talking to `port`, if one runs.
fn ipmitool_cmdline(port: u16) -> Option<String> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains("ipmitool") && cmdline.contains(&format!(" {port} ")) {
            return Some(cmdline);
        }
    }
    None
}

#[test]
fn reboot_shuts_down_gracefully_or_forces_it_after_the_grace_then_powers_on() {
    let bundle = bundle();
    let bmc = Bmc::start("on");
    let reboot = || {
        let report = power(&bundle, &bmc.url, "reboot")
            .param("grace_ms", 2000)
            .run()
            .unwrap();
        assert_eq!(report.status, Status::Succeeded, "{report}\n{}", bmc.log());
        report.output("power").unwrap().clone()
    };

    let polite = reboot();
    assert_eq!(polite["reset_type"], "chassis power soft, chassis power on");
    assert_eq!(polite["power_state"], "On");
    assert!(
        polite["summary"]
            .as_str()
            .unwrap()
            .contains("shut down gracefully"),
        "{polite}"
    );
    assert_eq!(bmc.changes(), ["0x20 set shutdown 1", "0x20 set power 1"]);

    bmc.make_stubborn();
    let started = Instant::now();
    let forced = reboot();
    assert_eq!(
        forced["reset_type"],
        "chassis power soft, chassis power off, chassis power on"
    );
    assert_eq!(forced["power_state"], "On");
    assert!(
        forced["summary"]
            .as_str()
            .unwrap()
            .contains("did not shut down within the grace of 2000 ms and was forced off"),
        "{forced}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the grace was given"
    );
    assert_eq!(
        bmc.changes()[2..],
        [
            "0x20 set shutdown 1",
            "0x20 set power 0",
            "0x20 set power 1"
        ]
    );

    // A server that is off is just powered on.
    let report = power(&bundle, &bmc.url, "off").run().unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    let from_off = reboot();
    assert_eq!(from_off["reset_type"], "chassis power on");
    assert_eq!(bmc.power(), "1");
}
