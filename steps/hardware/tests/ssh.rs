//! The `ssh_run` kind against a real SSH server: a throwaway `sshd` each
//! test starts on a loopback port, as the current user, with a config,
//! host key and authorized client key of its own (no system sshd).
//! `tests/run` installs `openssh-server`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use troupe_test::{Bundle, Outcome, Run, Status};

fn bundle() -> Bundle {
    Bundle::of_crate(env!("CARGO_MANIFEST_DIR")).expect("the hardware bundle loads")
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

fn scratch(what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "troupe-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A new ed25519 key pair: (private key file, public key line).
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    output(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path),
    );
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (path, public.trim().to_owned())
}

/// A throwaway sshd on a loopback port, killed when dropped.
struct Sshd {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:PORT`, as the request and `--var ssh_hosts` name it.
    host: String,
    /// The known_hosts line that pins its host key.
    known_hosts: String,
    /// The private key it lets in.
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
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.is_file(),
            "sshd is missing: run the tests with `bash tests/run`, which installs openssh-server"
        );
        let dir = scratch("sshd");
        let (host_key, host_public) = keypair(&dir, "host_key");
        let (client, client_public) = keypair(&dir, "client_key");
        std::fs::write(dir.join("authorized_keys"), format!("{client_public}\n")).unwrap();
        let user = output(Command::new("id").arg("-un")).trim().to_owned();
        // As root, sshd wants its privilege separation directory.
        if output(Command::new("id").arg("-u")).trim() == "0" {
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
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowUsers {user}\n\
                 LogLevel VERBOSE\n",
                host_key.display(),
                dir.join("sshd.pid").display(),
                dir.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        let child = serve(&dir, port);
        let client_key = std::fs::read_to_string(&client).unwrap();
        Sshd {
            child,
            host: format!("127.0.0.1:{port}"),
            known_hosts: format!("[127.0.0.1]:{port} {host_public}"),
            client_key,
            user,
            dir,
        }
    }

    fn port(&self) -> u16 {
        self.host.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// Stops the server, as a host going down would.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again, on the same port with the same keys.
    fn start_again(&mut self) {
        self.child = serve(&self.dir, self.port());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

/// Runs sshd with the config in `dir`, once it listens on `port`; its log
/// goes on in `sshd.log`.
fn serve(dir: &Path, port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("sshd.log"))
        .unwrap();
    let mut child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("sshd starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "sshd ended ({status}): {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "sshd did not listen within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn ssh<'b>(bundle: &'b Bundle, sshd: &Sshd, command: &str) -> Run<'b> {
    bundle
        .kind("ssh_run")
        .target("srv-1")
        .param("host", sshd.host.as_str())
        .param("user", sshd.user.as_str())
        .param("command", command)
        .var("ssh_hosts", format!("10.0.0.9 {}", sshd.host))
        .secret("ssh_key", &sshd.client_key)
        .secret("ssh_known_hosts", &sshd.known_hosts)
}

/// The key's base64 body, without its armour lines.
fn key_body(key: &str) -> String {
    key.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[test]
fn a_commands_output_and_exit_status_come_back() {
    let bundle = bundle();
    let sshd = Sshd::start();
    let report = ssh(&bundle, &sshd, "echo out; echo \"it's\" err >&2; exit 0")
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}\n{}", sshd.log());
    let out = report.output("ssh").unwrap();
    assert_eq!(out["exit_status"], 0, "{out}");
    assert_eq!(out["stdout"], "out\n", "{out}");
    assert_eq!(out["stderr"], "it's err\n", "{out}");
    assert_eq!(out["host"], sshd.host);
    // It ran as the user asked for, over this server.
    assert!(
        sshd.log()
            .contains(&format!("Accepted publickey for {}", sshd.user)),
        "{}",
        sshd.log()
    );

    // A non-zero status fails the step, once, with the status and stderr.
    let report = ssh(&bundle, &sshd, "echo partial; echo broken >&2; exit 3")
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    assert_eq!(report.step("ssh").attempts.len(), 1, "{report}");
    let error = report.error.clone().unwrap();
    assert!(
        error.contains(&format!(
            "the command on {}@{} exited with status 3: broken",
            sshd.user, sshd.host
        )),
        "{error}"
    );

    let text = format!("{report:?}");
    assert!(!text.contains(&key_body(&sshd.client_key)), "{text}");
}

#[test]
fn a_changed_or_unknown_host_key_is_refused() {
    let bundle = bundle();
    let sshd = Sshd::start();
    let dir = scratch("other-key");
    let (_, other) = keypair(&dir, "other");
    let port = sshd.host.rsplit_once(':').unwrap().1;

    // Another key pinned for this host: it changed, refused.
    let report = ssh(&bundle, &sshd, "touch ran")
        .secret("ssh_known_hosts", &format!("[127.0.0.1]:{port} {other}"))
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    assert_eq!(report.step("ssh").attempts.len(), 1, "{report}");
    let error = report.error.clone().unwrap();
    assert!(
        error.contains("a host key other than the one pinned in the secret ssh_known_hosts"),
        "{error}"
    );

    // Keys pinned for other hosts only: unknown, refused, not learned.
    let report = ssh(&bundle, &sshd, "touch ran")
        .secret(
            "ssh_known_hosts",
            &format!("[127.0.0.1]:1 {other}\n10.0.0.9 {other}"),
        )
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    let error = report.error.clone().unwrap();
    assert!(
        error.contains("has no host key pinned") && error.contains("never trusted on first use"),
        "{error}"
    );

    // Nothing got as far as logging in.
    assert!(!sshd.log().contains("Accepted publickey"), "{}", sshd.log());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_timeout_stops_the_remote_command_and_the_key_stays_out_of_argv() {
    let bundle = bundle();
    let sshd = Sshd::start();
    let pidfile = sshd.dir.join("remote.pid");
    let command = format!(
        "echo $$ > {}; sleep 300 & sleep 300; echo never",
        pidfile.display()
    );
    let (report, argv) = std::thread::scope(|s| {
        let run = s.spawn(|| {
            ssh(&bundle, &sshd, &command)
                .param("timeout_ms", 3000)
                .run()
                .unwrap()
        });
        // While it runs: ssh's command line, which `ps` shows everyone.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut argv = None;
        while argv.is_none() && Instant::now() < deadline && !run.is_finished() {
            argv = cmdline_with(&format!("-p {}", sshd.host.rsplit_once(':').unwrap().1));
            std::thread::sleep(Duration::from_millis(20));
        }
        (run.join().unwrap(), argv)
    });
    assert_eq!(report.status, Status::Failed, "{report}");
    assert_eq!(report.step("ssh").attempts.len(), 1, "{report}");
    let error = report.error.clone().unwrap();
    assert!(
        error.contains("did not finish within 3000 ms and was stopped there"),
        "{error}"
    );

    let argv = argv.expect("ssh was seen running");
    assert!(argv.contains("StrictHostKeyChecking=yes"), "{argv}");
    assert!(!argv.contains(&key_body(&sshd.client_key)), "{argv}");
    assert!(!argv.contains("ssh-ed25519"), "{argv}");
    // The key file was in a private directory, gone now.
    let key_file = argv
        .split(' ')
        .find_map(|a| a.strip_prefix("IdentityFile="))
        .expect("an IdentityFile")
        .to_owned();
    assert!(!Path::new(&key_file).exists(), "{key_file} is left behind");

    // On the server: the command's shell and everything in its session are gone.
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("the remote command wrote its pid")
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = session_members(pid);
        if Path::new(&format!("/proc/{pid}")).exists() && !left.contains(&pid) {
            left.push(pid);
        }
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the remote command's processes {left:?} live on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_unreachable_host_is_retried_and_an_unlisted_one_refused() {
    let bundle = bundle();
    let sshd = Sshd::start();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("127.0.0.1:{port}");
    let report = ssh(&bundle, &sshd, "true")
        .param("host", nowhere.as_str())
        .var("ssh_hosts", nowhere.as_str())
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    let attempts = &report.step("ssh").attempts;
    assert_eq!(attempts.len(), 3, "{report}");
    assert!(
        matches!(attempts[0].outcome, Outcome::Retryable(_)),
        "{report}"
    );
    assert!(
        report.error.clone().unwrap().contains("cannot reach"),
        "{report}"
    );

    // Not in --var ssh_hosts: refused at submit.
    let refused = ssh(&bundle, &sshd, "true")
        .var("ssh_hosts", "10.0.0.9")
        .run()
        .unwrap_err()
        .to_string();
    assert!(refused.contains("ssh_hosts"), "{refused}");
    assert!(!sshd.log().contains("Accepted"), "{}", sshd.log());
}

/// The command line of a process whose argv holds `needle`, if one runs.
fn cmdline_with(needle: &str) -> Option<String> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.starts_with("/usr/bin/ssh ") && cmdline.contains(needle) {
            return Some(cmdline);
        }
    }
    None
}

/// The processes whose session is `sid`.
fn session_members(sid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command name in parentheses: state ppid pgrp session …
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(3).and_then(|s| s.parse::<u32>().ok()) == Some(sid) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_connection_that_ends_while_the_command_runs_is_not_retried() {
    let bundle = bundle();
    let sshd = Sshd::start();
    let marker = sshd.dir.join("runs");
    // The command ends its own session on the server, as a reboot would:
    // it kills the sshd process that serves it (its shell's parent).
    let command = format!(
        "echo ran >> {}; kill -9 $(ps -o ppid= -p $PPID)",
        marker.display()
    );
    let report = ssh(&bundle, &sshd, &command).run().unwrap();
    assert_eq!(report.status, Status::Failed, "{report}\n{}", sshd.log());
    assert_eq!(report.step("ssh").attempts.len(), 1, "{report}");
    let error = report.error.clone().unwrap();
    assert!(
        error.contains("ended while the command ran"),
        "{error}\n{}",
        sshd.log()
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ran\n");
}

/// An `ssh_reboot` of this server; its "boot id" is the file `boot_id`.
fn reboot<'b>(bundle: &'b Bundle, sshd: &Sshd, command: &str) -> Run<'b> {
    bundle
        .kind("ssh_reboot")
        .target("srv-1")
        .param("host", sshd.host.as_str())
        .param("user", sshd.user.as_str())
        .param("command", command)
        .param(
            "boot_time_command",
            format!("cat {}", sshd.dir.join("boot_id").display()),
        )
        .var("ssh_hosts", sshd.host.as_str())
        .secret("ssh_key", &sshd.client_key)
        .secret("ssh_known_hosts", &sshd.known_hosts)
}

#[test]
fn reboot_over_ssh_waits_for_the_host_to_come_back_with_a_new_boot() {
    let bundle = bundle();
    let mut sshd = Sshd::start();
    std::fs::write(sshd.dir.join("boot_id"), "boot-1\n").unwrap();
    let requested = sshd.dir.join("reboot-requested");
    // The "reboot" marks the request and ends its own connection, as a
    // reboot does; the test then takes the server down for a while and
    // brings it back with a new boot id.
    let command = format!(
        "touch {}; kill -9 $(ps -o ppid= -p $PPID)",
        requested.display()
    );
    let run = reboot(&bundle, &sshd, &command);
    let report = std::thread::scope(|s| {
        let step = s.spawn(|| run.run().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !requested.exists() {
            assert!(Instant::now() < deadline, "the reboot command never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        sshd.stop();
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::write(sshd.dir.join("boot_id"), "boot-2\n").unwrap();
        sshd.start_again();
        step.join().unwrap()
    });
    assert_eq!(report.status, Status::Succeeded, "{report}\n{}", sshd.log());
    let out = report.output("reboot").unwrap();
    assert_eq!(out["boot_before"], "boot-1", "{out}");
    assert_eq!(out["boot_after"], "boot-2", "{out}");
    assert!(out["waited_ms"].as_u64().unwrap() >= 1500, "{out}");
    // While it was down, the step said why it was still waiting.
    let log = report.step("reboot").attempts[0].log.join("\n");
    assert!(log.contains("ended under the reboot command"), "{log}");
    assert!(log.contains("cannot reach"), "{log}");
}

#[test]
fn a_host_that_does_not_reboot_fails_the_step_after_the_wait() {
    let bundle = bundle();
    let sshd = Sshd::start();
    std::fs::write(sshd.dir.join("boot_id"), "boot-1\n").unwrap();
    let report = reboot(&bundle, &sshd, "true")
        .param("wait_ms", 3000)
        .run()
        .unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    assert_eq!(report.step("reboot").attempts.len(), 1, "{report}");
    let error = report.error.clone().unwrap();
    assert!(
        error.contains("did not come back from its reboot within 3000 ms")
            && error.contains("it still runs the boot boot-1"),
        "{error}"
    );
}
