//! A step written with troupe-sdk, called the way a step host calls it:
//! through the C ABI that `export_steps!` generates, with JSON in and out.
//!
//! ```text
//! cargo run -p troupe-sdk --example touch -- /tmp/hello
//! ```
#![allow(unsafe_code)]

use serde::Deserialize;
use troupe_sdk::{Context, StepError, StepInput, ffi};

#[derive(Deserialize)]
struct Settings {
    path: String,
}

/// Creates an empty file at `settings.path` and says so in its log.
fn touch(cx: &Context, input: StepInput<Settings>) -> Result<serde_json::Value, StepError> {
    if input.settings.path.is_empty() {
        return Err(StepError::fatal("settings.path is empty"));
    }
    cx.log(format_args!("touching {}", input.settings.path));
    std::fs::write(&input.settings.path, b"").map_err(StepError::retryable)?;
    Ok(serde_json::json!({ "touched": input.settings.path }))
}

troupe_sdk::export_steps! { "touch" => touch }

// What the step host looks up in the library; here the symbols are in this
// very program.
unsafe extern "C" {
    fn troupe_call(call: *const ffi::Call, out: *mut ffi::Buf) -> i32;
    fn troupe_free(buf: ffi::Buf);
}

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("troupe-touch")
            .display()
            .to_string()
    });
    // The input a server sends: the action, the resolved settings, the
    // outputs of earlier steps and the attempt number.
    let input = serde_json::json!({
        "action": { "id": 1, "kind": "example", "target": "localhost", "params": {} },
        "settings": { "path": path },
        "attempt": 1,
    });
    let input = serde_json::to_vec(&input).expect("JSON serializes");
    let step = "touch";
    let cancel = std::sync::atomic::AtomicU32::new(0);
    let call = ffi::Call {
        step: step.as_ptr(),
        step_len: step.len(),
        input: input.as_ptr(),
        input_len: input.len(),
        cancel: &cancel,
        log: None,
        log_sink: std::ptr::null(),
    };
    let mut out = ffi::Buf {
        ptr: std::ptr::null_mut(),
        len: 0,
        cap: 0,
    };
    // SAFETY: `call` and `out` are valid for the call; `out` is freed once,
    // by the library that filled it.
    let (status, body) = unsafe {
        let status = troupe_call(&call, &mut out);
        let body =
            String::from_utf8_lossy(std::slice::from_raw_parts(out.ptr, out.len)).into_owned();
        troupe_free(out);
        (status, body)
    };
    match status {
        ffi::STATUS_OK => println!("ok: {body}"),
        _ => {
            eprintln!("failed (status {status}): {body}");
            std::process::exit(1);
        }
    }
}
