//! A plugin library for tests. The moment a process loads it (before any
//! step is called, before even its exports are looked up), a constructor
//! writes that process's id, its parent's id and its environment to
//! `$TMPDIR/troupe-loadmark/<pid>`, if that directory exists. A test makes
//! the directory, points the server's and the nodes' `TMPDIR` at its
//! parent, and then knows every process that ever loaded plugin code.
//! Its one step, `whoami`, reports the same from inside a call.

// The constructor is a function pointer in `.init_array`: the one way to
// run code at load time, which is what this library exists to observe.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use troupe_sdk::{Context, StepError, StepInput};

/// What this process is: its id, its parent's and its environment.
fn this_process() -> Value {
    let env: serde_json::Map<String, Value> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                Value::String(v.to_string_lossy().into_owned()),
            )
        })
        .collect();
    json!({
        "pid": std::process::id(),
        "ppid": std::os::unix::process::parent_id(),
        "env": env,
    })
}

extern "C" fn loaded() {
    let dir = std::env::temp_dir().join("troupe-loadmark");
    if dir.is_dir() {
        let record = this_process().to_string();
        let _ = std::fs::write(dir.join(std::process::id().to_string()), record);
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static LOADED: extern "C" fn() = loaded;

fn whoami(_cx: &Context<'_>, _input: StepInput) -> Result<Value, StepError> {
    Ok(this_process())
}

troupe_sdk::export_steps! {
    "whoami" => whoami,
}
