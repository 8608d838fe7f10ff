//! Steps for tests and benchmarks. Each one exercises one behaviour of the
//! engine: success, failure, retries, timeouts, panics and crashes.

use std::time::Duration;

use sdk::{Context, StepError, StepInput};
use serde::Deserialize;
use serde_json::{Value, json};

/// The version this library reports; bundles built for version tests set it
/// with `TROUPE_TESTKIT_VERSION` at compile time.
const VERSION: &str = match option_env!("TROUPE_TESTKIT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

fn noop(_cx: &Context<'_>, _input: StepInput) -> Result<Value, StepError> {
    Ok(Value::Null)
}

/// Returns everything it was given, so tests can see what a step receives.
fn echo(_cx: &Context<'_>, input: StepInput) -> Result<Value, StepError> {
    Ok(json!({
        "action": input.action,
        "settings": input.settings,
        "outputs": input.outputs,
        "attempt": input.attempt,
    }))
}

#[derive(Deserialize)]
struct FailSettings {
    /// Fail with a retryable error on the first `retryable_times` attempts,
    /// then succeed. Without it, fail fatally every time.
    #[serde(default)]
    retryable_times: Option<u32>,
    #[serde(default = "default_fail_message")]
    message: String,
}

fn default_fail_message() -> String {
    "failed on purpose".to_owned()
}

fn fail(_cx: &Context<'_>, input: StepInput<FailSettings>) -> Result<Value, StepError> {
    match input.settings.retryable_times {
        Some(n) if input.attempt <= n => Err(StepError::retryable(format!(
            "{} (attempt {} of {n} failing)",
            input.settings.message, input.attempt
        ))),
        Some(_) => Ok(json!({ "succeeded_on_attempt": input.attempt })),
        None => Err(StepError::fatal(input.settings.message)),
    }
}

#[derive(Deserialize)]
struct SleepSettings {
    ms: u64,
}

/// Sleeps, honouring cancellation.
fn sleep_ms(cx: &Context<'_>, input: StepInput<SleepSettings>) -> Result<Value, StepError> {
    cx.sleep(Duration::from_millis(input.settings.ms))?;
    Ok(json!({ "slept_ms": input.settings.ms }))
}

fn panic(_cx: &Context<'_>, _input: StepInput) -> Result<Value, StepError> {
    panic!("testkit panic step was asked to panic");
}

fn abort(_cx: &Context<'_>, _input: StepInput) -> Result<Value, StepError> {
    std::process::abort();
}

/// Never returns and ignores cancellation: only killing its host ends it.
fn hang(_cx: &Context<'_>, _input: StepInput) -> Result<Value, StepError> {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Reports which bundle version ran it, the library's own version, and the
/// step host's process id.
fn version(_cx: &Context<'_>, input: StepInput) -> Result<Value, StepError> {
    let bundle = input
        .bundle
        .ok_or_else(|| StepError::fatal("the engine sent no bundle reference"))?;
    Ok(json!({
        "version": bundle.version,
        "bundle": bundle.hash,
        "library_version": VERSION,
        "pid": std::process::id(),
    }))
}

sdk::export_steps! {
    "noop" => noop,
    "echo" => echo,
    "fail" => fail,
    "sleep_ms" => sleep_ms,
    "panic" => panic,
    "abort" => abort,
    "hang" => hang,
    "version" => version,
}
