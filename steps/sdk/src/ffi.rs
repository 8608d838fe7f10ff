//! The C ABI between the step host and a plugin library.
//!
//! A plugin exports four symbols (written for it by [`crate::export_steps!`]):
//!
//! | symbol | C signature | meaning |
//! | --- | --- | --- |
//! | `troupe_abi_version` | `uint32_t (void)` | must equal [`crate::ABI_VERSION`] |
//! | `troupe_steps` | `Buf (void)` | JSON array of the exported step names |
//! | `troupe_call` | `int32_t (const Call*, Buf*)` | runs a step; see the `STATUS_*` codes |
//! | `troupe_free` | `void (Buf)` | frees a buffer the library returned |
//!
//! Input and output are UTF-8 JSON. On success `out` holds the output JSON;
//! on failure it holds the error message. Panics never cross the boundary:
//! they are caught and reported as [`STATUS_PANIC`] with the panic message.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::AtomicU32;

use crate::{Context, StepError};

/// The step succeeded; the buffer holds its output JSON.
pub const STATUS_OK: i32 = 0;
/// The step failed and may be retried; the buffer holds the message.
pub const STATUS_RETRYABLE: i32 = 1;
/// The step failed for good; the buffer holds the message.
pub const STATUS_FATAL: i32 = 2;
/// The step panicked; the buffer holds the panic message.
pub const STATUS_PANIC: i32 = 3;
/// The library exports no step by that name.
pub const STATUS_UNKNOWN_STEP: i32 = 4;

/// A byte buffer owned by the plugin library until passed to `troupe_free`.
#[repr(C)]
pub struct Buf {
    /// Start of the bytes.
    pub ptr: *mut u8,
    /// How many bytes are in use.
    pub len: usize,
    /// How many bytes were allocated (what `troupe_free` gives back).
    pub cap: usize,
}

impl Buf {
    fn from_vec(v: Vec<u8>) -> Buf {
        let mut v = std::mem::ManuallyDrop::new(v);
        Buf {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            cap: v.capacity(),
        }
    }
}

/// Receives one line of a call's log: `sink` is [`Call::log_sink`], the line
/// is UTF-8 without its newline. Safe to call from any thread while the call
/// runs, never after it returned.
pub type LogFn = unsafe extern "C" fn(sink: *const c_void, line: *const u8, len: usize);

/// One call of a step. The host owns every pointer for the duration of the call.
///
/// Fields are only ever appended, in a new ABI version: a library built for
/// an older one reads the prefix it knows.
#[repr(C)]
pub struct Call {
    /// The step's name as the library exports it (UTF-8, not NUL-terminated).
    pub step: *const u8,
    /// Length of `step` in bytes.
    pub step_len: usize,
    /// The [`StepInput`](crate::StepInput) as UTF-8 JSON.
    pub input: *const u8,
    /// Length of `input` in bytes.
    pub input_len: usize,
    /// Set to non-zero by the host when the call should stop (C: `_Atomic uint32_t`).
    pub cancel: *const AtomicU32,
    /// ABI 2: where [`Context::log`] lines go, or null to print them on stderr.
    pub log: Option<LogFn>,
    /// ABI 2: passed back to `log` with every line.
    pub log_sink: *const c_void,
}

/// The host's log callback for one call.
struct Sink(LogFn, *const c_void);

// SAFETY: the host accepts lines from any thread while the call runs (see
// `LogFn`), and `Context` does not outlive the call.
unsafe impl Sync for Sink {}

impl Sink {
    fn line(&self, line: &str) {
        // SAFETY: the host keeps the sink valid until the call returns.
        unsafe { (self.0)(self.1, line.as_ptr(), line.len()) }
    }
}

#[doc(hidden)]
pub fn step_names(names: &[&str]) -> Buf {
    Buf::from_vec(serde_json::to_vec(names).unwrap_or_default())
}

#[doc(hidden)]
pub type Dispatch = fn(&str, &Context<'_>, &[u8]) -> Option<Result<Vec<u8>, StepError>>;

/// # Safety
/// `call` must point to a valid [`Call`] and `out` to writable memory.
#[doc(hidden)]
pub unsafe fn call(call: *const Call, out: *mut Buf, dispatch: Dispatch) -> i32 {
    let call = unsafe { &*call };
    let step = unsafe { std::slice::from_raw_parts(call.step, call.step_len) };
    let input = unsafe { std::slice::from_raw_parts(call.input, call.input_len) };
    let cancel = unsafe { &*call.cancel };
    let (status, bytes) = match std::str::from_utf8(step) {
        Err(_) => (STATUS_UNKNOWN_STEP, b"step name is not UTF-8".to_vec()),
        Ok(name) => {
            let sink = call.log.map(|log| Sink(log, call.log_sink));
            let log = sink.as_ref().map(|sink| move |line: &str| sink.line(line));
            let log = log.as_ref().map(|f| f as &(dyn Fn(&str) + Sync));
            let cx = match log {
                Some(log) => Context::with_log(cancel, log),
                None => Context::new(cancel),
            };
            match catch_unwind(AssertUnwindSafe(|| dispatch(name, &cx, input))) {
                Ok(None) => (
                    STATUS_UNKNOWN_STEP,
                    format!("no step named {name:?}").into_bytes(),
                ),
                Ok(Some(Ok(output))) => (STATUS_OK, output),
                Ok(Some(Err(StepError::Retryable(m)))) => (STATUS_RETRYABLE, m.into_bytes()),
                Ok(Some(Err(StepError::Fatal(m)))) => (STATUS_FATAL, m.into_bytes()),
                Err(payload) => (STATUS_PANIC, panic_message(&*payload).into_bytes()),
            }
        }
    };
    unsafe { out.write(Buf::from_vec(bytes)) };
    status
}

/// # Safety
/// `buf` must come from [`Buf::from_vec`] in this library and not be freed twice.
#[doc(hidden)]
pub unsafe fn free(buf: Buf) {
    if !buf.ptr.is_null() {
        drop(unsafe { Vec::from_raw_parts(buf.ptr, buf.len, buf.cap) });
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}
