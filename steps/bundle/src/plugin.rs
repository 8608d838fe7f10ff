//! Loading a step library and calling its steps through the C ABI in
//! [`troupe_sdk::ffi`].
//!
//! Loading a library runs its code: only libraries that passed the Source
//! Authority's checks are loaded by a server, each in a step host process of
//! its own; the test harness loads the one its own crate built.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::path::Path;
use std::sync::atomic::AtomicU32;

use troupe_sdk::ffi::{Buf, Call};

type AbiFn = unsafe extern "C" fn() -> u32;
type StepsFn = unsafe extern "C" fn() -> Buf;
type CallFn = unsafe extern "C" fn(*const Call, *mut Buf) -> i32;
type FreeFn = unsafe extern "C" fn(Buf);

/// Where a call's log lines go (`troupe_sdk::Context::log`), one line per
/// call without its newline. Called from the step's threads.
pub type Log<'a> = &'a (dyn Fn(&[u8]) + Sync);

/// A loaded step library.
pub struct Plugin {
    call: CallFn,
    free: FreeFn,
    abi: u32,
    steps: Vec<String>,
    // Keeps the code mapped for as long as the function pointers are used.
    _lib: libloading::Library,
}

impl Plugin {
    /// Loads the library at `path` and asks it for its ABI and steps. The
    /// error says what is wrong in words a bundle author can act on.
    pub fn load(path: &Path) -> Result<Plugin, String> {
        // SAFETY: loading runs the library's initialisers; see the module
        // documentation for which libraries get here.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        let sym = |name: &str| {
            format!(
                "the library does not export `{name}`; was it built with troupe_sdk::export_steps!?"
            )
        };
        // SAFETY: the symbol types are the ABI documented in troupe_sdk::ffi.
        unsafe {
            let abi = *lib
                .get::<AbiFn>(b"troupe_abi_version")
                .map_err(|_| sym("troupe_abi_version"))?;
            let steps = *lib
                .get::<StepsFn>(b"troupe_steps")
                .map_err(|_| sym("troupe_steps"))?;
            let call = *lib
                .get::<CallFn>(b"troupe_call")
                .map_err(|_| sym("troupe_call"))?;
            let free = *lib
                .get::<FreeFn>(b"troupe_free")
                .map_err(|_| sym("troupe_free"))?;
            let abi = abi();
            let buf = steps();
            let names = serde_json::from_slice(std::slice::from_raw_parts(buf.ptr, buf.len))
                .map_err(|e| format!("troupe_steps returned invalid JSON: {e}"));
            free(buf);
            Ok(Plugin {
                call,
                free,
                abi,
                steps: names?,
                _lib: lib,
            })
        }
    }

    /// The plugin ABI the library was built for.
    pub fn abi(&self) -> u32 {
        self.abi
    }

    /// The step functions the library exports.
    pub fn steps(&self) -> &[String] {
        &self.steps
    }

    /// Calls `function` with `input` (JSON). Returns one of the
    /// `troupe_sdk::ffi::STATUS_*` codes and the output JSON or error
    /// message. `cancel` turns non-zero when the step should stop.
    pub fn call(
        &self,
        function: &str,
        input: &[u8],
        cancel: &AtomicU32,
        log: Log<'_>,
    ) -> (i32, Vec<u8>) {
        let call = Call {
            step: function.as_ptr(),
            step_len: function.len(),
            input: input.as_ptr(),
            input_len: input.len(),
            cancel,
            log: Some(log_line),
            log_sink: &log as *const Log<'_> as *const c_void,
        };
        let mut out = Buf {
            ptr: std::ptr::null_mut(),
            len: 0,
            cap: 0,
        };
        // SAFETY: `call` and everything it points to outlive the call; the
        // library fills `out`, which we copy and hand back to it to free.
        unsafe {
            let status = (self.call)(&call, &mut out);
            let bytes = if out.ptr.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(out.ptr, out.len).to_vec()
            };
            (self.free)(out);
            (status, bytes)
        }
    }
}

/// The `troupe_sdk::ffi::LogFn` every call gets.
unsafe extern "C" fn log_line(sink: *const c_void, line: *const u8, len: usize) {
    // SAFETY: `sink` is the `Log` that `Plugin::call` passed, alive until the
    // call returns; the library passes a valid line.
    let (log, line) = unsafe {
        (
            &*(sink as *const Log<'_>),
            std::slice::from_raw_parts(line, len),
        )
    };
    log(line);
}

/// What a call's status and body say, in words a person reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The step succeeded with this output.
    Output(serde_json::Value),
    /// The step failed, and trying again may help.
    Retryable(String),
    /// The step failed for good (or panicked, or is not exported).
    Fatal(String),
}

/// Reads a call's `troupe_sdk::ffi::STATUS_*` and body.
pub fn answer(status: i32, body: &[u8]) -> Answer {
    use troupe_sdk::ffi::*;
    let text = || String::from_utf8_lossy(body).into_owned();
    match status {
        STATUS_OK => match serde_json::from_slice(body) {
            Ok(v) => Answer::Output(v),
            Err(e) => Answer::Fatal(format!("step returned invalid JSON: {e}")),
        },
        STATUS_RETRYABLE => Answer::Retryable(text()),
        STATUS_FATAL | STATUS_UNKNOWN_STEP => Answer::Fatal(text()),
        STATUS_PANIC => Answer::Fatal(format!("step panicked: {}", text())),
        other => Answer::Fatal(format!("step returned unknown status {other}: {}", text())),
    }
}
