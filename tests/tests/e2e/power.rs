//! The hardware bundle's `power` kind on a real server, against a real
//! Redfish BMC (sushy-tools' emulator, fake driver, TLS, bcrypt basic auth)
//! on loopback: the BMC's credentials reach the step and nothing else.
//! `tests/run` installs the emulator and sets `TROUPE_TEST_SUSHY`.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Db, Env, both_dbs, bundles, scratch_dir, target_dir, troupe, workspace};

pub(crate) const SYSTEM: &str = "11111111-2222-3333-4444-555555555555";

/// A sushy-emulator with one server, on, killed when dropped.
pub(crate) struct Bmc {
    child: Child,
    dir: PathBuf,
    pub(crate) url: String,
    /// `URL=sha256:FINGERPRINT`, for `--var bmcs`.
    pub(crate) pinned: String,
}

impl Drop for Bmc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The id of the emulator's server `n`: [`SYSTEM`] for the first.
pub(crate) fn system(n: usize) -> String {
    match n {
        0 => SYSTEM.to_owned(),
        n => format!("11111111-2222-3333-4444-{n:012}"),
    }
}

impl Bmc {
    pub(crate) fn start(password: &str) -> Bmc {
        Bmc::with_systems(password, 1)
    }

    /// An emulator with `count` servers ([`system`]`(n)`, named srv-N), on.
    pub(crate) fn with_systems(password: &str, count: usize) -> Bmc {
        let emulator = PathBuf::from(std::env::var("TROUPE_TEST_SUSHY").expect(
            "TROUPE_TEST_SUSHY is not set: run the tests with `bash tests/run`, which installs sushy-tools and points it at sushy-emulator",
        ));
        let dir = scratch_dir("bmc");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        output(
            Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=127.0.0.1"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        );
        let fingerprint = output(
            Command::new("openssl")
                .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
                .arg(&cert),
        );
        let fingerprint = fingerprint.trim().split_once('=').unwrap().1.to_owned();
        let htpasswd = output(Command::new(emulator.with_file_name("python3")).args([
            "-c",
            "import bcrypt, sys; print('admin:' + bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(4)).decode())",
            password,
        ]));
        std::fs::write(dir.join("htpasswd"), htpasswd).unwrap();
        std::fs::write(
            dir.join("emulator.conf"),
            format!(
                "SUSHY_EMULATOR_FAKE_SYSTEMS = [{}]\nSUSHY_EMULATOR_AUTH_FILE = {:?}\n",
                (0..count)
                    .map(|n| format!(
                        "{{'uuid': '{}', 'name': 'srv-{}', 'power_state': 'On', 'nics': []}}",
                        system(n),
                        n + 1
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                dir.join("htpasswd").to_str().unwrap()
            ),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("emulator.log")).unwrap();
        let mut child = Command::new(&emulator)
            .env("SUSHY_EMULATOR_CONFIG", dir.join("emulator.conf"))
            // Its systems' state is a file in the temporary directory: its own.
            .env("TMPDIR", &dir)
            .args(["--fake", "--interface", "127.0.0.1", "--port"])
            .arg(port.to_string())
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
            assert!(
                child.try_wait().unwrap().is_none(),
                "sushy-emulator ended: {}",
                std::fs::read_to_string(dir.join("emulator.log")).unwrap_or_default()
            );
            assert!(
                Instant::now() < deadline,
                "sushy-emulator did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let url = format!("https://127.0.0.1:{port}");
        Bmc {
            child,
            pinned: format!("{url}=sha256:{fingerprint}"),
            dir,
            url,
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("emulator.log")).unwrap_or_default()
    }
}

/// The hardware bundle, built and signed with the test key once per run.
pub(crate) fn hardware_bundle() -> &'static PathBuf {
    static BUNDLE: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let out = scratch_dir("hardware-bundle").join("hardware.bundle");
        let manifest = workspace().join("steps/hardware/bundle.toml");
        let library = target_dir().join("libhardware.so");
        let o = troupe(&[
            "bundle",
            "build",
            manifest.to_str().unwrap(),
            "--library",
            library.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let key = bundles().key.to_str().unwrap();
        let o = troupe(&["bundle", "sign", out.to_str().unwrap(), "--key", key]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    })
}

async fn power_through_a_real_bmc_keeps_its_password_to_the_step(db: Db) {
    let password = "pw-e2e-7f3a9c1d";
    let wrong = "pw-wrong-2b8e4f60";
    let bmc = Bmc::start(password);
    let env = Env::new(db).await;
    let bmcs = format!("bmcs={}", bmc.url);
    let trust = format!("bmc_trust={}", bmc.pinned);
    let server = env.serve_with(&[
        "--bundle",
        hardware_bundle().to_str().unwrap(),
        "--var",
        &bmcs,
        "--var",
        &trust,
    ]);
    let set_secret = async |value: String| {
        let (status, body) = server
            .request(
                reqwest::Method::PUT,
                "/v1/secrets/bmc_credentials",
                Some(json!({ "value": value }).to_string()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    };
    set_secret(format!("admin:{password}")).await;

    let off = server
        .submit("power", "srv-1", json!({ "op": "off", "bmc": bmc.url }))
        .await;
    let action = server.finished(off).await;
    assert_eq!(action["status"], "succeeded", "{action}\n{}", bmc.log());
    let out = &action["steps"][0]["output"];
    assert_eq!(out["reset_type"], "ForceOff", "{action}");
    assert_eq!(out["power_state"], "Off", "{action}");
    assert_eq!(out["system"], SYSTEM, "{action}");

    // A wrong password: fatal, naming the BMC.
    set_secret(format!("admin:{wrong}")).await;
    let denied = server
        .submit("power", "srv-1", json!({ "op": "status", "bmc": bmc.url }))
        .await;
    let action = server.finished(denied).await;
    assert_eq!(action["status"], "failed", "{action}");
    let error = action["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("401") && error.contains(&bmc.url), "{error}");

    // Neither password anywhere: the actions, their logs, the audit log,
    // the server's log, the BMC's log.
    let mut seen = String::new();
    for id in [off, denied] {
        seen += &server.get(&format!("/v1/actions/{id}")).await.1.to_string();
        seen += &server
            .get(&format!("/v1/actions/{id}/logs"))
            .await
            .1
            .to_string();
    }
    seen += &server.get("/v1/audit").await.1.to_string();
    assert!(seen.contains("ForceOff") && seen.contains("401"), "{seen}");
    seen += &server.log();
    seen += &bmc.log();
    for secret in [password, wrong] {
        assert!(!seen.contains(secret), "{secret} leaked: {seen}");
    }
}

/// A throwaway sshd on a loopback port (as this user, a config of its own),
/// with a host key and one authorized client key; killed when dropped.
struct Sshd {
    child: Child,
    dir: PathBuf,
    host: String,
    known_hosts: String,
    client_key: String,
    user: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Sshd {
    fn start() -> Sshd {
        let dir = scratch_dir("sshd");
        for name in ["host_key", "client_key"] {
            output(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                    .arg(dir.join(name)),
            );
        }
        let public = |name: &str| {
            std::fs::read_to_string(dir.join(format!("{name}.pub")))
                .unwrap()
                .trim()
                .to_owned()
        };
        std::fs::write(dir.join("authorized_keys"), public("client_key") + "\n").unwrap();
        let user = output(Command::new("id").arg("-un")).trim().to_owned();
        if output(Command::new("id").arg("-u")).trim() == "0" {
            // As root, sshd wants its privilege separation directory.
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nPermitRootLogin prohibit-password\nAllowUsers {user}\nLogLevel VERBOSE\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
        let mut child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("sshd starts (tests/run installs openssh-server)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "sshd ended: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            assert!(Instant::now() < deadline, "sshd did not listen within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd {
            child,
            host: format!("127.0.0.1:{port}"),
            known_hosts: format!("[127.0.0.1]:{port} {}", public("host_key")),
            client_key: std::fs::read_to_string(dir.join("client_key")).unwrap(),
            user,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

/// Whether a process with this id is alive (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, s)| !s.trim_start().starts_with('Z'))
    })
}

async fn ssh_run_on_a_real_server_masks_and_keeps_its_keys_to_the_step(db: Db) {
    let sshd = Sshd::start();
    let env = Env::new(db).await;
    let hosts = format!("ssh_hosts={}", sshd.host);
    // A temporary directory of its own, where its steps' private
    // directories go (other tests' steps sweep theirs).
    let tmp = scratch_dir("ssh-tmp");
    let server = env.serve_with_env(
        &[
            "--bundle",
            hardware_bundle().to_str().unwrap(),
            "--var",
            &hosts,
        ],
        &[("TMPDIR", tmp.to_str().unwrap())],
    );
    for (name, value) in [
        ("ssh_key", sshd.client_key.as_str()),
        ("ssh_known_hosts", sshd.known_hosts.as_str()),
    ] {
        let (status, body) = server
            .request(
                reqwest::Method::PUT,
                &format!("/v1/secrets/{name}"),
                Some(json!({ "value": value.trim_end() }).to_string()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let run = async |command: String| {
        server
            .submit(
                "ssh_run",
                "srv-1",
                json!({ "host": sshd.host, "user": sshd.user, "command": command }),
            )
            .await
    };

    // The command prints the client key: the output holds it masked.
    let key_file = sshd.dir.join("client_key");
    let printed = run(format!("echo start; cat {}; exit 0", key_file.display())).await;
    let action = server.finished(printed).await;
    assert_eq!(action["status"], "succeeded", "{action}\n{}", sshd.log());
    let out = &action["steps"][0]["output"];
    assert_eq!(out["exit_status"], 0, "{action}");
    assert_eq!(out["stdout"], "start\n***\n", "{action}");

    // A cancel stops the command on the host, and everything it started.
    let pidfile = sshd.dir.join("remote.pid");
    let long = run(format!(
        "echo $$ > {}; sleep 300 & sleep 300",
        pidfile.display()
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the command never started\n{}",
            sshd.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(alive(pid));
    let (status, body) = server
        .post(&format!("/v1/actions/{long}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let action = server.finished(long).await;
    assert_eq!(action["status"], "cancelled", "{action}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the remote command {pid} lives on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The key nowhere: actions, their logs, the audit log, the server's
    // log, sshd's log.
    let mut seen = String::new();
    for id in [printed, long] {
        seen += &server.get(&format!("/v1/actions/{id}")).await.1.to_string();
        seen += &server
            .get(&format!("/v1/actions/{id}/logs"))
            .await
            .1
            .to_string();
    }
    seen += &server.get("/v1/audit").await.1.to_string();
    assert!(seen.contains("exited with status 0"), "{seen}");
    seen += &server.log();
    seen += &sshd.log();
    for line in sshd.client_key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!seen.contains(line), "the client key leaked: {seen}");
    }

    // Its step host killed outright: the server takes every process with
    // the host's mark along, ssh too, whose closed connection stops the
    // command on the host.
    let pidfile = sshd.dir.join("remote-2.pid");
    run(format!(
        "echo $$ > {}; sleep 300 & sleep 300",
        pidfile.display()
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let port = sshd.host.rsplit_once(':').unwrap().1;
    let ssh_running = || ssh_client_pids(&format!("-p {port} "));
    let clients = ssh_running();
    assert!(!clients.is_empty(), "no ssh client runs");
    // It carries its step host's mark (and nothing secret in its
    // environment), so the host's end takes it along whatever else happens.
    for client in &clients {
        let environ = std::fs::read(format!("/proc/{client}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ).replace('\0', "\n");
        assert!(environ.contains("STEP_HOST_MARK="), "{environ}");
        assert!(!environ.contains("PRIVATE KEY"), "{environ}");
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", clients[0])).unwrap();
    let host = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let cmdline = std::fs::read(format!("/proc/{host}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("__step-host"),
        "ssh's parent {host} is not a step host"
    );
    output(Command::new("kill").args(["-9", &host]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) || !ssh_running().is_empty() {
        assert!(
            Instant::now() < deadline,
            "after the step host was killed: ssh {:?}, the remote command {pid} alive: {}",
            ssh_running(),
            alive(pid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The killed host could not remove its private directory (the key in
    // it); the next ssh step sweeps it away.
    assert!(!dead_private_dirs(&tmp).is_empty(), "no directory was left");
    let again = server
        .submit(
            "ssh_run",
            "srv-2",
            json!({ "host": sshd.host, "user": sshd.user, "command": "true" }),
        )
        .await;
    let action = server.finished(again).await;
    assert_eq!(action["status"], "succeeded", "{action}");
    assert_eq!(dead_private_dirs(&tmp), Vec::<PathBuf>::new());
}

/// The steps' private ssh directories whose step host is gone.
fn dead_private_dirs(tmp: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(tmp).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("troupe-ssh-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            found.push(entry.path());
        }
    }
    found
}

/// The `ssh` clients whose command line holds `needle`.
fn ssh_client_pids(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains("/ssh ") && cmdline.contains(needle) && alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// An OpenIPMI `ipmi_sim` on a loopback UDP port, its server on, its
/// chassis power kept in a file by a control script; killed when dropped.
struct IpmiSim {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl IpmiSim {
    fn start(password: &str) -> IpmiSim {
        let dir = scratch_dir("ipmi");
        let state = dir.join("power");
        std::fs::write(&state, "1\n").unwrap();
        let control = dir.join("chassis");
        std::fs::write(
            &control,
            format!(
                "#!/bin/sh\nshift; op=$1; shift\ncase $op in\n\
                 get) for p in \"$@\"; do case $p in power) echo \"power:$(cat {state:?})\";; boot) echo boot:default;; esac; done;;\n\
                 set) while [ $# -gt 1 ]; do case $1 in power) echo \"$2\" > {state:?};; shutdown) echo 0 > {state:?};; esac; shift 2; done;;\n\
                 esac\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &control,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            dir.join("lan.conf"),
            format!(
                "name \"bmc\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n    priv_limit admin\n\
                 \x20   allowed_auths_admin none md2 md5 straight\n    guid a123456789abcdefa123456789abcdef\n  endlan\n\
                 \x20 chassis_control \"{} 0x20\"\n  user 2 true \"admin\" \"{password}\" admin 10 none md2 md5 straight\n",
                control.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("bmc.emu"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let log = std::fs::File::create(dir.join("sim.log")).unwrap();
        let child = Command::new("ipmi_sim")
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
            .expect("ipmi_sim starts (tests/run installs openipmi)");
        // UDP: ready once it answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answered = Command::new("ipmitool")
                .env("IPMI_PASSWORD", password)
                .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["-U", "admin", "-E", "-N", "1", "-R", "1", "mc", "info"])
                .stdin(Stdio::null())
                .output()
                .is_ok_and(|o| o.status.success());
            if answered {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim did not answer within 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        IpmiSim {
            child,
            dir,
            url: format!("ipmi://127.0.0.1:{port}"),
        }
    }

    fn power(&self) -> String {
        std::fs::read_to_string(self.dir.join("power"))
            .unwrap()
            .trim()
            .to_owned()
    }
}

async fn power_over_ipmi_on_a_real_server_keeps_its_password_to_the_step(db: Db) {
    let password = "ipmi-e2e-5c1b7d";
    let wrong = "ipmi-wrong-93ae";
    let bmc = IpmiSim::start(password);
    let env = Env::new(db).await;
    let bmcs = format!("bmcs={}", bmc.url);
    let server = env.serve_with(&[
        "--bundle",
        hardware_bundle().to_str().unwrap(),
        "--var",
        &bmcs,
        "--var",
        "bmc_trust=",
    ]);
    let set_secret = async |value: String| {
        let (status, body) = server
            .request(
                reqwest::Method::PUT,
                "/v1/secrets/bmc_credentials",
                Some(json!({ "value": value }).to_string()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    };
    set_secret(format!("admin:{password}")).await;
    let off = server
        .submit("power", "srv-2", json!({ "op": "off", "bmc": bmc.url }))
        .await;
    let action = server.finished(off).await;
    assert_eq!(action["status"], "succeeded", "{action}");
    let out = &action["steps"][0]["output"];
    assert_eq!(out["reset_type"], "chassis power off", "{action}");
    assert_eq!(out["power_state"], "Off", "{action}");
    assert_eq!(bmc.power(), "0");

    set_secret(format!("admin:{wrong}")).await;
    let denied = server
        .submit("power", "srv-2", json!({ "op": "on", "bmc": bmc.url }))
        .await;
    let action = server.finished(denied).await;
    assert_eq!(action["status"], "failed", "{action}");
    let error = action["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("the BMC {} refused the password", bmc.url)),
        "{error}"
    );
    assert_eq!(bmc.power(), "0");

    let mut seen = String::new();
    for id in [off, denied] {
        seen += &server.get(&format!("/v1/actions/{id}")).await.1.to_string();
        seen += &server
            .get(&format!("/v1/actions/{id}/logs"))
            .await
            .1
            .to_string();
    }
    seen += &server.get("/v1/audit").await.1.to_string();
    assert!(seen.contains("chassis power off"), "{seen}");
    seen += &server.log();
    seen += &std::fs::read_to_string(bmc.dir.join("sim.log")).unwrap_or_default();
    for secret in [password, wrong] {
        assert!(!seen.contains(secret), "{secret} leaked: {seen}");
    }
}

both_dbs!(
    power_through_a_real_bmc_keeps_its_password_to_the_step,
    ssh_run_on_a_real_server_masks_and_keeps_its_keys_to_the_step,
    power_over_ipmi_on_a_real_server_keeps_its_password_to_the_step,
);
