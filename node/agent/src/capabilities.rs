//! What a node says it can do: built-in facts, fixed pairs from its
//! configuration, and command probes run again every so often. A probe
//! whose command fails drops its capability, so the node stops being
//! chosen for steps that need it; the server hears of every change.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A capability whose value comes from a command: `NAME` is present while
/// the command exits 0, with the first line it prints as its value
/// (`true` if it prints nothing).
#[derive(Debug, Clone)]
pub struct Probe {
    pub name: String,
    /// Run by `/bin/sh -c`, as written in the node's own configuration.
    pub command: String,
}

/// How long a probe may run before it is killed and counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A probe's value is cut to this many characters.
const VALUE_MAX: usize = 256;

/// What every node says of itself: `node` (its name), `os`, `arch`,
/// `cpus`, `memory_mb`, `hostname` and `troupe_version`.
pub fn built_in(name: &str) -> BTreeMap<String, String> {
    let mut caps = BTreeMap::from([
        ("node".to_owned(), name.to_owned()),
        ("os".to_owned(), std::env::consts::OS.to_owned()),
        ("arch".to_owned(), std::env::consts::ARCH.to_owned()),
        (
            "cpus".to_owned(),
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .to_string(),
        ),
        (
            "troupe_version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ]);
    if let Some(mb) = memory_mb() {
        caps.insert("memory_mb".to_owned(), mb.to_string());
    }
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        caps.insert("hostname".to_owned(), host.trim().to_owned());
    }
    caps
}

/// Total memory, from `/proc/meminfo`.
fn memory_mb() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// The node's current capabilities, kept up to date by [`Capabilities::run`].
pub(crate) struct Capabilities {
    fixed: BTreeMap<String, String>,
    probes: Vec<Probe>,
    every: Duration,
    current: watch::Sender<BTreeMap<String, String>>,
}

impl Capabilities {
    /// Runs the probes once, so the first hello says what they found.
    pub(crate) async fn new(
        fixed: BTreeMap<String, String>,
        probes: Vec<Probe>,
        every: Duration,
    ) -> Capabilities {
        let current = watch::channel(BTreeMap::new()).0;
        let caps = Capabilities {
            fixed,
            probes,
            every,
            current,
        };
        let first = caps.evaluate().await;
        caps.current.send_replace(first);
        caps
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<BTreeMap<String, String>> {
        self.current.subscribe()
    }

    /// Runs the probes every `every` until `stop`, publishing changes.
    pub(crate) async fn run(&self, stop: CancellationToken) {
        if self.probes.is_empty() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = stop.cancelled() => return,
            }
            let now = self.evaluate().await;
            self.current.send_if_modified(|caps| {
                if *caps == now {
                    return false;
                }
                tracing::info!(before = ?caps, after = ?now, "capabilities changed");
                *caps = now;
                true
            });
        }
    }

    async fn evaluate(&self) -> BTreeMap<String, String> {
        let mut caps = self.fixed.clone();
        let results = futures_util::future::join_all(self.probes.iter().map(run_probe)).await;
        for (probe, value) in self.probes.iter().zip(results) {
            match value {
                Some(value) => {
                    caps.insert(probe.name.clone(), value);
                }
                None => {
                    caps.remove(&probe.name);
                }
            }
        }
        caps
    }
}

/// Runs one probe: its value, or `None` if it failed (saying why in the log).
async fn run_probe(probe: &Probe) -> Option<String> {
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&probe.command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(probe = %probe.name, error = %e, "cannot run a probe");
            return None;
        }
    };
    let pid = child.id();
    match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let value: String = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .chars()
                .take(VALUE_MAX)
                .collect();
            Some(if value.is_empty() {
                "true".to_owned()
            } else {
                value
            })
        }
        Ok(Ok(out)) => {
            tracing::debug!(probe = %probe.name, status = %out.status, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "probe failed");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(probe = %probe.name, error = %e, "probe failed");
            None
        }
        Err(_) => {
            // Whatever it started goes with it.
            if let Some(group) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            tracing::warn!(probe = %probe.name, timeout_s = PROBE_TIMEOUT.as_secs(), "probe took too long; killed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(name: &str, command: &str) -> Probe {
        Probe {
            name: name.to_owned(),
            command: command.to_owned(),
        }
    }

    #[tokio::test]
    async fn a_probe_gives_its_first_line_or_true_and_a_failed_one_nothing() {
        let fixed = BTreeMap::from([("dc".to_owned(), "ams3".to_owned())]);
        let caps = Capabilities::new(
            fixed,
            vec![
                probe("gpu", "echo a100; echo more"),
                probe("db", "true"),
                probe("lost", "echo maybe; exit 3"),
            ],
            Duration::from_secs(60),
        )
        .await;
        let now = caps.subscribe().borrow().clone();
        assert_eq!(now["dc"], "ams3");
        assert_eq!(now["gpu"], "a100");
        assert_eq!(now["db"], "true");
        assert!(!now.contains_key("lost"));
    }

    #[test]
    fn built_ins_name_the_node() {
        let caps = built_in("hv-1");
        assert_eq!(caps["node"], "hv-1");
        assert!(caps["cpus"].parse::<u32>().unwrap() >= 1);
        assert!(caps.contains_key("memory_mb"));
    }
}
