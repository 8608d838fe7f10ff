//! The `vm` kind against libvirt's own test driver, through the real
//! `virsh` (`tests/run` installs it: Debian package `libvirt-clients`).
//!
//! The test driver keeps no state between connections: every `virsh` run
//! starts again from `test:///default` (one running domain, `test`) or from
//! the node file a `test:///PATH` URI names. So a command the step sends
//! takes effect within its own run only: a start or a destroy returns done,
//! which the step trusts as libvirt defines it, while a graceful shutdown is
//! never seen to finish, which is what a guest that ignores the request
//! looks like, and what these tests use to force one off.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use troupe_test::{Bundle, Outcome, Run, Status};

fn bundle() -> Bundle {
    Bundle::of_crate(env!("CARGO_MANIFEST_DIR")).expect("the hardware bundle loads")
}

fn virsh_installed() {
    assert!(
        ["/usr/bin/virsh", "/usr/local/bin/virsh"]
            .iter()
            .any(|p| Path::new(p).is_file()),
        "virsh is missing: run the tests with `bash tests/run`, which installs libvirt-clients"
    );
}

/// A test-driver node with three domains: `web` running, `db` shut off and
/// `frozen` paused; removed when dropped.
struct Node {
    dir: PathBuf,
    uri: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    fn new() -> Node {
        virsh_installed();
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "troupe-vm-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // test:runstate: 1 running, 3 paused, 5 shut off.
        let domain = |name: &str, runstate: u8| {
            format!(
                "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os><test:runstate>{runstate}</test:runstate></domain>"
            )
        };
        let file = dir.join("node.xml");
        std::fs::write(
            &file,
            format!(
                "<node>{}{}{}</node>",
                domain("web", 1),
                domain("db", 5),
                domain("frozen", 3)
            ),
        )
        .unwrap();
        Node {
            uri: format!("test://{}", file.display()),
            dir,
        }
    }
}

fn vm<'b>(bundle: &'b Bundle, uri: &str, domain: &str, op: &str) -> Run<'b> {
    bundle
        .kind("vm")
        .target(domain)
        .param("op", op)
        .param("hypervisor", uri)
        .param("domain", domain)
        .var("hypervisors", format!("qemu:///system {uri}"))
}

fn succeeded(run: Run<'_>) -> Value {
    let report = run.run().unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    report.output("vm").unwrap().clone()
}

fn failed(run: Run<'_>) -> (String, usize) {
    let report = run.run().unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    let error = report.error.clone().unwrap();
    let error = error
        .strip_prefix("step \"vm\" failed: ")
        .unwrap_or_else(|| panic!("{error}"))
        .to_owned();
    (error, report.step("vm").attempts.len())
}

#[test]
fn status_reads_each_domains_state() {
    let bundle = bundle();
    let node = Node::new();
    for (domain, state) in [("web", "running"), ("db", "shut off"), ("frozen", "paused")] {
        let out = succeeded(vm(&bundle, &node.uri, domain, "status"));
        assert_eq!(out["state"], state, "{out}");
        assert_eq!(out["sent"], serde_json::json!([]), "{out}");
        assert_eq!(out["hypervisor"], node.uri);
        assert_eq!(
            out["summary"],
            format!("{domain} on {} is {state}", node.uri)
        );
    }
    // The default test driver: its one domain, running.
    let out = succeeded(vm(&bundle, "test:///default", "test", "status"));
    assert_eq!(out["state"], "running");
}

#[test]
fn start_and_destroy_are_idempotent() {
    let bundle = bundle();
    let node = Node::new();
    let out = succeeded(vm(&bundle, &node.uri, "web", "start"));
    assert_eq!(out["sent"], serde_json::json!([]), "{out}");
    assert_eq!(
        out["summary"],
        format!("web on {} is already running: not started", node.uri)
    );

    let out = succeeded(vm(&bundle, &node.uri, "db", "start"));
    assert_eq!(out["sent"], serde_json::json!(["start"]), "{out}");
    assert_eq!(out["state"], "running");
    assert!(
        out["summary"].as_str().unwrap().starts_with(&format!(
            "db on {} was shut off and is started (start;",
            node.uri
        )),
        "{out}"
    );

    let out = succeeded(vm(&bundle, &node.uri, "db", "destroy"));
    assert_eq!(out["sent"], serde_json::json!([]), "{out}");
    assert!(
        out["summary"]
            .as_str()
            .unwrap()
            .contains("already shut off"),
        "{out}"
    );
    let out = succeeded(vm(&bundle, &node.uri, "web", "destroy"));
    assert_eq!(out["sent"], serde_json::json!(["destroy"]), "{out}");
    assert_eq!(out["state"], "shut off");

    // A paused domain is not started: that would be resume.
    let (error, attempts) = failed(vm(&bundle, &node.uri, "frozen", "start"));
    assert_eq!(attempts, 1);
    assert!(
        error.contains("is paused, not shut off: start does not resume"),
        "{error}"
    );
}

#[test]
fn shutdown_waits_for_shut_off_and_names_the_last_state_or_forces_it_after_the_grace() {
    let bundle = bundle();
    let node = Node::new();
    let out = succeeded(vm(&bundle, &node.uri, "db", "shutdown"));
    assert_eq!(out["sent"], serde_json::json!([]), "{out}");
    assert_eq!(
        out["summary"],
        format!("db on {} is already shut off: nothing sent", node.uri)
    );

    // The guest is never seen shut off (see the top of this file): after
    // wait_ms the step fails, saying the state it last saw.
    let started = Instant::now();
    let (error, attempts) =
        failed(vm(&bundle, &node.uri, "web", "shutdown").param("wait_ms", 2000));
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "it waited"
    );
    assert_eq!(attempts, 1, "not retried: {error}");
    assert!(
        error.starts_with(&format!("web on {} is still running ", node.uri))
            && error.contains("after virsh shutdown: the guest did not shut down"),
        "{error}"
    );

    // With force, it is destroyed after the grace.
    let started = Instant::now();
    let out = succeeded(
        vm(&bundle, &node.uri, "web", "shutdown")
            .param("force", true)
            .param("grace_ms", 1500),
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "the grace was given: {out}"
    );
    assert_eq!(
        out["sent"],
        serde_json::json!(["shutdown", "destroy"]),
        "{out}"
    );
    assert_eq!(out["state"], "shut off");
    assert!(
        out["summary"]
            .as_str()
            .unwrap()
            .contains("did not shut down within the grace of 1500 ms and was destroyed"),
        "{out}"
    );
}

#[test]
fn reboot_shuts_down_forces_after_the_grace_and_starts_again() {
    let bundle = bundle();
    let node = Node::new();
    let out = succeeded(vm(&bundle, &node.uri, "web", "reboot").param("grace_ms", 1000));
    assert_eq!(
        out["sent"],
        serde_json::json!(["shutdown", "destroy", "start"]),
        "{out}"
    );
    assert_eq!(out["state"], "running");
    assert!(
        out["summary"].as_str().unwrap().contains("started again"),
        "{out}"
    );

    // A domain that is shut off is just started.
    let out = succeeded(vm(&bundle, &node.uri, "db", "reboot"));
    assert_eq!(out["sent"], serde_json::json!(["start"]), "{out}");
}

#[test]
fn an_unknown_domain_an_unreachable_hypervisor_and_an_unlisted_one_are_told_apart() {
    let bundle = bundle();
    let node = Node::new();
    let (error, attempts) = failed(vm(&bundle, &node.uri, "nope", "status"));
    assert_eq!(attempts, 1, "no retry can mend it: {error}");
    assert_eq!(
        error,
        format!(
            "there is no domain nope on the hypervisor {0} (virsh -c {0} list --all lists them)",
            node.uri
        )
    );

    // A libvirt daemon that does not answer: a TCP port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("qemu+tcp://127.0.0.1:{port}/system");
    let report = vm(&bundle, &uri, "web", "status").run().unwrap();
    assert_eq!(report.status, Status::Failed, "{report}");
    let attempts = &report.step("vm").attempts;
    assert_eq!(attempts.len(), 3, "retried: {report}");
    assert!(
        matches!(attempts[0].outcome, Outcome::Retryable(_)),
        "{report}"
    );
    let error = report.error.clone().unwrap();
    assert!(
        error.starts_with(&format!("step \"vm\" failed (after 3 attempts): cannot reach the hypervisor {uri}: failed to connect to the hypervisor"))
            && error.contains("Connection refused"),
        "{error}"
    );

    // A hypervisor the operator did not list is refused before the step
    // runs, and the step refuses it too (checked in its unit tests).
    let refused = vm(&bundle, &node.uri, "web", "status")
        .var("hypervisors", "qemu:///system")
        .run()
        .expect_err("refused");
    assert!(
        refused.to_string().contains(&format!(
            "param \"hypervisor\" = \"{}\" is not in this server's list for it (the deployment variable hypervisors)",
            node.uri
        )),
        "{refused}"
    );
}

/// A hypervisor whose guest obeys a graceful shutdown: its node file is a
/// FIFO this serves to each `virsh` connection in turn, `web` running for
/// the first two (the step's state read and its shutdown request) and shut
/// off from then on. Returns the connections served.
fn obeying_guest(bundle: &Bundle, op: &str) -> (Value, usize) {
    let node = Node::new();
    let fifo = node.dir.join("fifo.xml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let (fifo, stop) = (fifo.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut served = 0;
            loop {
                // Blocks until a reader opens the FIFO.
                let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
                if stop.load(Ordering::SeqCst) {
                    return served;
                }
                served += 1;
                let runstate = if served <= 2 { 1 } else { 5 };
                let xml = format!(
                    "<node><domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>web</name><memory>65536</memory><os><type>hvm</type></os><test:runstate>{runstate}</test:runstate></domain></node>"
                );
                let _ = std::io::Write::write_all(&mut f, xml.as_bytes());
                drop(f);
                // Wait for this reader to close (no reader left: opening
                // without blocking fails), so that the next open is the
                // next connection's. Connections come one after another.
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                    .open(&fifo)
                    .is_ok()
                {
                    assert!(Instant::now() < deadline, "virsh kept the node file open");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let uri = format!("test://{}", fifo.display());
    let report = vm(bundle, &uri, "web", op)
        .param("grace_ms", 60_000)
        .run()
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    // Opening the FIFO to read lets the server's last open return.
    drop(std::fs::File::open(&fifo).unwrap());
    let served = server.join().unwrap();
    assert_eq!(report.status, Status::Succeeded, "{report}");
    (report.output("vm").unwrap().clone(), served)
}

#[test]
fn a_guest_that_shuts_down_is_seen_shut_off_without_being_forced() {
    virsh_installed();
    let bundle = bundle();
    let started = Instant::now();
    let (out, served) = obeying_guest(&bundle, "shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it did not wait out the grace"
    );
    assert_eq!(out["sent"], serde_json::json!(["shutdown"]), "{out}");
    assert_eq!(out["state"], "shut off");
    assert!(
        out["summary"]
            .as_str()
            .unwrap()
            .contains(" shut down gracefully in "),
        "{out}"
    );
    assert_eq!(served, 3, "the state read, the request and one more read");

    let (out, served) = obeying_guest(&bundle, "reboot");
    assert_eq!(
        out["sent"],
        serde_json::json!(["shutdown", "start"]),
        "{out}"
    );
    assert_eq!(out["state"], "running");
    assert!(
        out["summary"]
            .as_str()
            .unwrap()
            .contains(" shut down gracefully in ")
            && out["summary"].as_str().unwrap().contains("started again"),
        "{out}"
    );
    assert_eq!(served, 4);
}
