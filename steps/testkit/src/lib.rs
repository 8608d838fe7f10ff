//! Steps for tests and benchmarks. Each one exercises one behaviour of the
//! engine: success, failure, retries, timeouts, panics and crashes.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use troupe_sdk::{Context, StepError, StepInput};

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
struct RecordSettings {
    /// Where to write the input, as JSON.
    path: String,
}

/// Writes its whole input to a file: how tests see what a step was given,
/// beyond what troupe stores (which masks secrets).
fn record(_cx: &Context<'_>, input: StepInput<Value>) -> Result<Value, StepError> {
    let settings: RecordSettings =
        serde_json::from_value(input.settings.clone()).map_err(StepError::fatal)?;
    let text = json!({ "settings": input.settings, "outputs": input.outputs }).to_string();
    std::fs::write(&settings.path, text).map_err(StepError::fatal)?;
    Ok(json!({ "recorded": settings.path, "settings": input.settings }))
}

#[derive(Deserialize)]
struct MarkSettings {
    /// The side-effect log: a file lines are appended to.
    path: String,
    ms: u64,
}

/// A side effect tests can count: appends a `start` line, sleeps `ms`
/// (honouring cancellation), appends an `end` line. Each line is one JSON
/// object (event, action, target, attempt, the step host's pid and its
/// parent's, the time in
/// µs since the epoch), written with one `write` to a file opened for
/// appending, so lines from concurrent step hosts never interleave. The
/// host's parent is the server or node that runs it.
fn mark(cx: &Context<'_>, input: StepInput<MarkSettings>) -> Result<Value, StepError> {
    use std::io::Write;
    let line = |event: &str| {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut text = json!({
            "event": event,
            "action": input.action.id,
            "target": input.action.target,
            "attempt": input.attempt,
            "pid": std::process::id(),
            "ppid": std::os::unix::process::parent_id(),
            "at_us": at,
        })
        .to_string();
        text.push('\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&input.settings.path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(StepError::fatal)
    };
    line("start")?;
    cx.sleep(Duration::from_millis(input.settings.ms))?;
    line("end")?;
    Ok(json!({ "marked": input.settings.path }))
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

/// Sleeps, ignoring cancellation (but within its timeout).
fn stubborn(_cx: &Context<'_>, input: StepInput<SleepSettings>) -> Result<Value, StepError> {
    std::thread::sleep(Duration::from_millis(input.settings.ms));
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

#[derive(Deserialize)]
struct SpawnSettings {
    /// Arguments for `sleep`: a unique number lets tests find the process.
    seconds: String,
}

/// Starts `sleep SECONDS` and then ignores cancellation: only killing its
/// host ends the step, and the child must not outlive the host.
fn spawn_and_hang(_cx: &Context<'_>, input: StepInput<SpawnSettings>) -> Result<Value, StepError> {
    let _child = std::process::Command::new("sleep")
        .arg(&input.settings.seconds)
        .spawn()
        .map_err(StepError::fatal)?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[derive(Deserialize)]
struct BlobSettings {
    bytes: usize,
}

/// Returns a string of `bytes` bytes: for output size limits.
fn blob(_cx: &Context<'_>, input: StepInput<BlobSettings>) -> Result<Value, StepError> {
    Ok(json!({ "blob": "x".repeat(input.settings.bytes) }))
}

/// Prints to stdout and stderr the way careless plugins do, then succeeds.
fn chatty(_cx: &Context<'_>, _input: StepInput) -> Result<Value, StepError> {
    for i in 0..200 {
        println!("chatty plugin says hello on stdout ({i})");
        eprintln!("chatty plugin says hello on stderr ({i})");
    }
    // A partial line and raw bytes, too.
    print!("no newline at the end");
    use std::io::Write;
    let _ = std::io::stdout().write_all(&[0xff, 0xfe, b'\n']);
    let _ = std::io::stdout().flush();
    Ok(json!({ "said": "hello" }))
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

#[derive(Deserialize)]
struct LoggerSettings {
    lines: usize,
    #[serde(default)]
    text: String,
    /// Fail this many first attempts with a retryable error.
    #[serde(default)]
    retryable_times: u32,
    /// Then sleep this long, ignoring cancellation.
    #[serde(default)]
    hang_ms: u64,
}

/// Logs `lines` lines naming its target and attempt (and one from a helper
/// thread), then fails, hangs or succeeds as its settings say.
fn logger(cx: &Context<'_>, input: StepInput<LoggerSettings>) -> Result<Value, StepError> {
    let s = &input.settings;
    for i in 0..s.lines {
        cx.log(format_args!(
            "{} line {i} (attempt {}){}",
            input.action.target, input.attempt, s.text
        ));
    }
    std::thread::scope(|scope| {
        scope.spawn(|| cx.log(format_args!("{} from a helper thread", input.action.target)));
    });
    if input.attempt <= s.retryable_times {
        return Err(StepError::retryable("not yet"));
    }
    std::thread::sleep(Duration::from_millis(s.hang_ms));
    Ok(json!({ "logged": s.lines }))
}

#[derive(Deserialize)]
struct LeakSettings {
    /// The secret to give away.
    secret: String,
    /// The user name it is sent with as HTTP Basic auth.
    user: String,
    /// Fail this many first attempts with a retryable error that gives the
    /// secret away too.
    #[serde(default)]
    retryable_times: u32,
    /// Then wait this long (cancellably): past the step's timeout, it times
    /// out.
    #[serde(default)]
    wait_ms: u64,
}

/// Gives `secret` away in every way a careless step or peer might: in an
/// object key, encoded (base64, URL-safe base64, percent-encoded, as HTTP
/// Basic auth), and cut in half at either end of a string (what keeping the
/// tail or head of a command's output leaves) in its output; whole in its
/// log, on its stdout and stderr and in its error messages, the raw secret sitting across the cut of an
/// error that is too long to keep whole.
fn leak(cx: &Context<'_>, input: StepInput<LeakSettings>) -> Result<Value, StepError> {
    let s = &input.settings;
    let secret = s.secret.as_str();
    let half = secret.len() / 2;
    let given = json!({
        format!("Basic {secret}"): 1,
        "base64": base64(secret.as_bytes(), false, true),
        "base64_url": base64(secret.as_bytes(), true, false),
        "percent": percent(secret),
        "basic": format!("Basic {}", base64(format!("{}:{secret}", s.user).as_bytes(), false, true)),
    });
    cx.log(format_args!("gave away {given}"));
    // And prints it, which ends up in the server's log.
    println!("printed {given}");
    eprintln!("printed {given}");
    if input.attempt <= s.retryable_times {
        let text = given.to_string();
        // The raw secret across the 16 KiB an error is cut to.
        let pad = (16 << 10) - 3 - text.len();
        return Err(StepError::retryable(format!(
            "{text} {}{secret}{}",
            "x".repeat(pad),
            "y".repeat(200)
        )));
    }
    cx.sleep(Duration::from_millis(s.wait_ms))?;
    // Cut, as a step keeping the tail or the head of a command's output
    // leaves it.
    let mut output = given;
    output["tail"] = json!(format!("{}{}", &secret[half..], "x".repeat(100)));
    output["head"] = json!(format!("{}token={}", "x".repeat(100), &secret[..half]));
    Ok(output)
}

fn base64(bytes: &[u8], url_safe: bool, padded: bool) -> String {
    let alphabet: &[u8] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else if padded {
                out.push('=');
            }
        }
    }
    out
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

troupe_sdk::export_steps! {
    "leak" => leak,
    "logger" => logger,
    "noop" => noop,
    "echo" => echo,
    "record" => record,
    "mark" => mark,
    "fail" => fail,
    "sleep_ms" => sleep_ms,
    "panic" => panic,
    "abort" => abort,
    "hang" => hang,
    "version" => version,
    "spawn_and_hang" => spawn_and_hang,
    "blob" => blob,
    "chatty" => chatty,
    "stubborn" => stubborn,
}
