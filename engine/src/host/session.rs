//! A step host's process tree. Each host marks its environment with its
//! pid (`STEP_HOST_MARK`), which everything its plugins start inherits,
//! and when the host ends, however it ends, every process still carrying
//! the mark is killed: by the host itself when the engine goes away, by the
//! engine when the host dies. A process that clears its environment on
//! purpose, as a daemon may, leaves the tree.
//!
//! (Not a session: `setsid` would do, but with scheduler autogroups a new
//! session is also a new scheduling group, which cost 13 % of throughput on
//! two cores; see BENCHMARKS.md.)

use rustix::process::{Pid, Signal};

/// The variable that marks a host's processes.
pub(crate) const MARK: &str = "STEP_HOST_MARK";

/// The mark's value for the host `pid`.
pub(crate) fn mark(pid: u32) -> String {
    pid.to_string()
}

/// Kills every process marked as host `pid`'s, except the caller. Loops a
/// few times, so a process forked during a sweep is caught by the next one.
/// Returns how many processes it signalled.
pub(crate) fn kill_marked(pid: u32) -> usize {
    let me = std::process::id();
    let entry = format!("{MARK}={}", mark(pid));
    let mut killed = 0;
    for _ in 0..10 {
        let members: Vec<u32> = marked(&entry).into_iter().filter(|&p| p != me).collect();
        if members.is_empty() {
            break;
        }
        for member in members {
            if let Some(member) = Pid::from_raw(member as i32)
                && rustix::process::kill_process(member, Signal::KILL).is_ok()
            {
                killed += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    killed
}

/// Live processes whose environment holds `entry` (`NAME=value`), from
/// `/proc` (the environment a process was started with).
fn marked(entry: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            let found = environ
                .split(|&b| b == 0)
                .any(|var| var == entry.as_bytes());
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            (found && !is_zombie(&stat)).then_some(pid)
        })
        .collect()
}

/// Whether `/proc/PID/stat` (`pid (comm) state …`, where `comm` may hold
/// spaces and parentheses) says the process is a zombie.
fn is_zombie(stat: &str) -> bool {
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .is_some_and(|state| state == "Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_state_past_an_awkward_command_name() {
        assert!(!is_zombie("4242 (a (b) c) S 1 4242 4240 0 -1"));
        assert!(is_zombie("7 (x) Z 1 7 7 0"));
    }

    #[test]
    fn kills_every_marked_process() {
        // A made-up host pid, so only these processes carry the mark.
        let host = 4_000_000 + std::process::id() % 100_000;
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & exec sleep 30"])
            .env(MARK, mark(host))
            .spawn()
            .unwrap();
        let entry = format!("{MARK}={}", mark(host));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while marked(&entry).len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the processes never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(kill_marked(host) >= 2);
        let _ = shell.wait();
        assert_eq!(marked(&entry), Vec::<u32>::new());
    }
}
