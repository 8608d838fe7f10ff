//! troupe's built-in steps: generally useful building blocks that action
//! kinds configure through their per-step settings.

use troupe_sdk::{Context, StepError, StepInput};

mod command;
mod disk;
mod http;
mod tcp;

fn sleep(
    cx: &Context<'_>,
    input: StepInput<SleepSettings>,
) -> Result<serde_json::Value, StepError> {
    cx.sleep(std::time::Duration::from_millis(input.settings.ms))?;
    Ok(serde_json::json!({ "slept_ms": input.settings.ms }))
}

#[derive(serde::Deserialize)]
struct SleepSettings {
    ms: u64,
}

troupe_sdk::export_steps! {
    "check_disk" => disk::check_disk,
    "run_command" => command::run_command,
    "wait_tcp" => tcp::wait_tcp,
    "http_request" => http::http_request,
    "sleep" => sleep,
}
