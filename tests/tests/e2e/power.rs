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

const SYSTEM: &str = "11111111-2222-3333-4444-555555555555";

/// A sushy-emulator with one server, on, killed when dropped.
struct Bmc {
    child: Child,
    dir: PathBuf,
    url: String,
    /// `URL=sha256:FINGERPRINT`, for `--var bmcs`.
    pinned: String,
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

impl Bmc {
    fn start(password: &str) -> Bmc {
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
                "SUSHY_EMULATOR_FAKE_SYSTEMS = [{{'uuid': '{SYSTEM}', 'name': 'srv-1', 'power_state': 'On', 'nics': []}}]\nSUSHY_EMULATOR_AUTH_FILE = {:?}\n",
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("emulator.log")).unwrap_or_default()
    }
}

/// The hardware bundle, built and signed with the test key once per run.
fn hardware_bundle() -> &'static PathBuf {
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

both_dbs!(power_through_a_real_bmc_keeps_its_password_to_the_step);
