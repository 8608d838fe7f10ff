//! Write troupe steps in Rust.
//!
//! A step is an ordinary function from a typed [`StepInput`] to a
//! serializable output or a [`StepError`]. [`export_steps!`] exports a
//! crate's steps through the small C ABI in [`ffi`]; the crate is built as a
//! `cdylib`, packed with its `bundle.toml` by `troupe bundle build`, signed,
//! and pushed to a troupe server, which runs each call in a step host
//! process of its own (a panic or crash takes down only that host).
//!
//! ```
//! use serde::Deserialize;
//! use troupe_sdk::{Context, StepError, StepInput};
//!
//! #[derive(Deserialize)]
//! struct Settings {
//!     path: String,
//! }
//!
//! /// Creates an empty file at `settings.path`.
//! fn touch(cx: &Context, input: StepInput<Settings>) -> Result<serde_json::Value, StepError> {
//!     cx.log(format_args!("touching {}", input.settings.path));
//!     std::fs::write(&input.settings.path, b"").map_err(StepError::retryable)?;
//!     Ok(serde_json::json!({ "touched": input.settings.path }))
//! }
//!
//! troupe_sdk::export_steps! { "touch" => touch }
//!
//! // A step is a plain function, so a unit test calls it directly:
//! let path = std::env::temp_dir().join("troupe-sdk-doc-touch");
//! let input = StepInput::new(Settings { path: path.display().to_string() });
//! let output = touch(&Context::detached(), input).unwrap();
//! assert_eq!(output["touched"], path.display().to_string());
//! ```
//!
//! What the manifest says about each step (timeout, retries, idempotency,
//! where it runs), the step contract and the path from `troupe bundle new`
//! to a pushed bundle are in troupe's `docs/writing-steps.md`; the
//! `troupe-test` crate runs a bundle's kinds in `cargo test`, with faults
//! injected on purpose.

#![warn(missing_docs)]

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod ffi;

/// The version of the C ABI described in [`ffi`]. A bundle's manifest names
/// the ABI it was built for; the engine loads [`OLDEST_ABI_VERSION`] up to
/// this one and refuses any other.
///
/// - 1: calls with a cancel flag.
/// - 2: adds [`Context::log`], lines kept in the step's log.
pub const ABI_VERSION: u32 = 2;

/// The oldest ABI the engine still loads. ABI 2 only appended fields to
/// [`ffi::Call`], so a library built for ABI 1 reads the calls it gets.
pub const OLDEST_ABI_VERSION: u32 = 1;

/// What a step receives on every call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepInput<S = Value> {
    /// The action this step runs for.
    pub action: ActionInfo,
    /// The settings the action kind gives this use of the step, with templates
    /// already resolved against the params and earlier outputs.
    pub settings: S,
    /// Outputs of the steps that already succeeded, by step name.
    #[serde(default)]
    pub outputs: Map<String, Value>,
    /// 1 for the first attempt, 2 for the first retry, and so on.
    #[serde(default = "one")]
    pub attempt: u32,
    /// The bundle this step was loaded from.
    #[serde(default)]
    pub bundle: Option<BundleRef>,
}

impl<S> StepInput<S> {
    /// An input for calling a step directly in a unit test: action 1 of kind
    /// `test` on target `test`, no params, no earlier outputs, attempt 1.
    /// Change any field before the call (they are all public).
    pub fn new(settings: S) -> Self {
        StepInput {
            action: ActionInfo {
                id: 1,
                kind: "test".to_owned(),
                target: "test".to_owned(),
                params: Map::new(),
            },
            settings,
            outputs: Map::new(),
            attempt: 1,
            bundle: None,
        }
    }
}

/// Which bundle a step's code came from: with several versions loaded side
/// by side, each action runs on the one it was submitted with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleRef {
    /// The manifest's `name`.
    pub name: String,
    /// The manifest's `version` (semantic versioning).
    pub version: String,
    /// SHA-256 of the bundle file.
    pub hash: String,
}

fn one() -> u32 {
    1
}

/// The action a step runs for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionInfo {
    /// The action's id, as `troupe status ID` shows it.
    pub id: i64,
    /// The kind it was submitted as (a `[kinds.NAME]` of the manifest).
    pub kind: String,
    /// What it acts on, e.g. `vps-123`; one target's actions run one at a
    /// time, in arrival order.
    pub target: String,
    /// The params it was submitted with, defaults applied.
    #[serde(default)]
    pub params: Map<String, Value>,
}

/// Why a step failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// A transient failure: the engine retries it if the step's policy allows.
    Retryable(String),
    /// A permanent failure: the action fails at once.
    Fatal(String),
}

impl StepError {
    /// A failure worth retrying: a timeout talking to a service, a busy
    /// target. The step is run again as its manifest's `retry` allows.
    pub fn retryable(msg: impl fmt::Display) -> Self {
        StepError::Retryable(msg.to_string())
    }

    /// A failure no retry can mend: bad settings, a target in the wrong
    /// state. The action fails at once.
    pub fn fatal(msg: impl fmt::Display) -> Self {
        StepError::Fatal(msg.to_string())
    }

    /// The error a step returns when it noticed [`Context::is_cancelled`].
    pub fn cancelled() -> Self {
        StepError::Fatal("cancelled".to_owned())
    }

    /// The message, whichever kind of failure it is.
    pub fn message(&self) -> &str {
        match self {
            StepError::Retryable(m) | StepError::Fatal(m) => m,
        }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for StepError {}

/// Per-call context handed to a step by the host.
pub struct Context<'a> {
    cancel: &'a AtomicU32,
    log: Option<&'a (dyn Fn(&str) + Sync + 'a)>,
}

impl Context<'static> {
    /// A context that is never cancelled, whose [`log`](Context::log) lines
    /// go to stderr: for calling a step directly in a unit test.
    pub fn detached() -> Self {
        static NEVER: AtomicU32 = AtomicU32::new(0);
        Context::new(&NEVER)
    }
}

impl<'a> Context<'a> {
    /// A context whose cancel flag is `flag`; useful to call steps directly
    /// in tests. Its [`log`](Context::log) lines go to stderr.
    pub fn new(flag: &'a AtomicU32) -> Self {
        Context {
            cancel: flag,
            log: None,
        }
    }

    /// A context whose [`log`](Context::log) lines go to `log`, one call
    /// per line.
    pub fn with_log(flag: &'a AtomicU32, log: &'a (dyn Fn(&str) + Sync + 'a)) -> Self {
        Context {
            cancel: flag,
            log: Some(log),
        }
    }

    /// Adds a line to this call's log, which troupe keeps with the step's
    /// attempt (`troupe status ID --logs`, `GET /v1/actions/{id}/logs`).
    ///
    /// Use this rather than `println!`: a step host runs many calls at once,
    /// so what a plugin prints cannot be told apart by call and goes to the
    /// server's log only. A step's log is bounded (64 KiB per attempt; the
    /// cut is marked) and secrets delivered to the action are masked in it.
    pub fn log(&self, line: impl fmt::Display) {
        let line = line.to_string();
        match self.log {
            Some(log) => log(&line),
            None => eprintln!("{line}"),
        }
    }

    /// True once the engine asked this call to stop (timeout or cancel).
    /// Long-running steps should poll it and return [`StepError::cancelled`].
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) != 0
    }

    /// Sleeps for `d`, waking early with an error if the call is cancelled.
    pub fn sleep(&self, d: Duration) -> Result<(), StepError> {
        let deadline = Instant::now() + d;
        loop {
            if self.is_cancelled() {
                return Err(StepError::cancelled());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
        }
    }
}

/// Turns a typed step function into the untyped form the ABI dispatches to.
/// Used by [`export_steps!`]; not normally called directly.
pub fn run_typed<S, O, F>(cx: &Context<'_>, input: &[u8], f: F) -> Result<Vec<u8>, StepError>
where
    S: serde::de::DeserializeOwned,
    O: Serialize,
    F: FnOnce(&Context<'_>, StepInput<S>) -> Result<O, StepError>,
{
    let input: StepInput<S> = serde_json::from_slice(input)
        .map_err(|e| StepError::fatal(format!("invalid step input: {e}")))?;
    let output = f(cx, input)?;
    serde_json::to_vec(&output).map_err(|e| StepError::fatal(format!("unserializable output: {e}")))
}

/// Exports the listed steps from a `cdylib` through troupe's C ABI.
///
/// ```ignore
/// troupe_sdk::export_steps! {
///     "noop" => noop,
///     "echo" => echo,
/// }
/// ```
#[macro_export]
macro_rules! export_steps {
    ($($name:literal => $func:path),+ $(,)?) => {
        const _: () = {
            const STEP_NAMES: &[&str] = &[$($name),+];

            fn dispatch(
                name: &str,
                cx: &$crate::Context<'_>,
                input: &[u8],
            ) -> ::core::option::Option<::core::result::Result<::std::vec::Vec<u8>, $crate::StepError>> {
                match name {
                    $($name => ::core::option::Option::Some($crate::run_typed(cx, input, $func)),)+
                    _ => ::core::option::Option::None,
                }
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn troupe_abi_version() -> u32 {
                $crate::ABI_VERSION
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn troupe_steps() -> $crate::ffi::Buf {
                $crate::ffi::step_names(STEP_NAMES)
            }

            /// # Safety
            /// `call` must point to a valid [`$crate::ffi::Call`] for the duration of the call.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn troupe_call(
                call: *const $crate::ffi::Call,
                out: *mut $crate::ffi::Buf,
            ) -> i32 {
                unsafe { $crate::ffi::call(call, out, dispatch) }
            }

            /// # Safety
            /// `buf` must have been returned by this library and not freed before.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn troupe_free(buf: $crate::ffi::Buf) {
                unsafe { $crate::ffi::free(buf) }
            }
        };
    };
}
