//! `check_disk`: fail when a filesystem is fuller than a threshold, before a
//! step (a reboot, say) that a full disk would break.

use serde::{Deserialize, Serialize};
use troupe_sdk::{Context, StepError, StepInput};

#[derive(Deserialize)]
pub(crate) struct Settings {
    #[serde(default = "root")]
    path: String,
    #[serde(default = "ninety")]
    max_used_percent: f64,
}

fn root() -> String {
    "/".to_owned()
}

fn ninety() -> f64 {
    90.0
}

#[derive(Serialize)]
pub(crate) struct Output {
    path: String,
    used_percent: f64,
    available_bytes: u64,
    total_bytes: u64,
}

pub(crate) fn check_disk(
    _cx: &Context<'_>,
    input: StepInput<Settings>,
) -> Result<Output, StepError> {
    let s = input.settings;
    let st = rustix::fs::statvfs(s.path.as_str())
        .map_err(|e| StepError::fatal(format!("cannot stat filesystem of {}: {e}", s.path)))?;
    let total = st.f_blocks * st.f_frsize;
    let free = st.f_bfree * st.f_frsize;
    let available = st.f_bavail * st.f_frsize;
    // Like df: used / (used + available to unprivileged users).
    let used = total.saturating_sub(free);
    let used_percent = if used + available == 0 {
        0.0
    } else {
        (used as f64 * 100.0 / (used + available) as f64 * 10.0).round() / 10.0
    };
    if used_percent > s.max_used_percent {
        return Err(StepError::fatal(format!(
            "filesystem of {} is {used_percent}% full, above the limit of {}%; free some space and submit again",
            s.path, s.max_used_percent
        )));
    }
    Ok(Output {
        path: s.path,
        used_percent,
        available_bytes: available,
        total_bytes: total,
    })
}
