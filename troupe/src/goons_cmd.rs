//! `troupe goons …`: inject faults into a test deployment's steps (a server
//! started with `--goons`), list and remove them.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::args::{ServerArg, parse_duration};
use crate::client::Client;

#[derive(Subcommand)]
pub(crate) enum GoonsCommand {
    /// Arm a goon: make a step misbehave on purpose, to rehearse a failure.
    ///
    /// It acts on attempt 1 of the step in every action (of --kind, if
    /// given) until it is removed or has acted --times times.
    Add(Add),
    /// List the goons, with how often each acted.
    List {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove one goon by id, or all of them with --all.
    Remove {
        /// The goon's id, as `troupe goons list` shows.
        #[arg(required_unless_present = "all")]
        id: Option<u64>,
        /// Remove every goon.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("act").required(true).args(
    ["fail", "fatal", "delay", "timeout", "crash", "cancel", "lose_node", "output"]
)))]
pub(crate) struct Add {
    /// The step it acts on: its name in the kind, as `troupe status` shows it.
    step: String,
    /// Act only on actions of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// The attempt it acts on (1 is the first).
    #[arg(long, default_value_t = 1, conflicts_with = "every")]
    attempt: u32,
    /// Act on every attempt.
    #[arg(long)]
    every: bool,
    /// Act this many times in all, then stop [default: until removed]
    #[arg(long)]
    times: Option<u32>,
    /// The step fails with a retryable error (this message), without running.
    #[arg(long, value_name = "MESSAGE", num_args = 0..=1, default_missing_value = "failed by a goon")]
    fail: Option<String>,
    /// The step fails with a fatal error (this message), without running.
    #[arg(long, value_name = "MESSAGE")]
    fatal: Option<String>,
    /// The attempt waits this long, then the step runs (or times out, if this is past its timeout_ms).
    #[arg(long, value_parser = parse_duration)]
    delay: Option<Duration>,
    /// The attempt overruns the step's timeout_ms.
    #[arg(long)]
    timeout: bool,
    /// The step's host crashes while it runs (the attempt fails for good).
    #[arg(long)]
    crash: bool,
    /// The action is cancelled as the step starts.
    #[arg(long)]
    cancel: bool,
    /// The node running the step goes away mid-call (named NODE in the error).
    #[arg(long, value_name = "NODE", num_args = 0..=1, default_missing_value = "")]
    lose_node: Option<String>,
    /// The step succeeds with this output (JSON), without running.
    #[arg(long, value_name = "JSON")]
    output: Option<String>,
    /// Print the API's JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

impl Add {
    /// The goon as the API takes it.
    fn body(&self) -> Result<Value> {
        let act = if let Some(message) = &self.fail {
            json!({ "fail": { "retryable": true, "message": message } })
        } else if let Some(message) = &self.fatal {
            json!({ "fail": { "retryable": false, "message": message } })
        } else if let Some(d) = self.delay {
            json!({ "delay": { "ms": d.as_millis() as u64 } })
        } else if self.timeout {
            json!({ "delay": {} })
        } else if self.crash {
            json!("crash")
        } else if self.cancel {
            json!("cancel")
        } else if let Some(node) = &self.lose_node {
            match node.as_str() {
                "" => json!({ "lose_node": {} }),
                node => json!({ "lose_node": { "node": node } }),
            }
        } else if let Some(output) = &self.output {
            let output: Value = serde_json::from_str(output).map_err(|e| {
                anyhow::anyhow!(
                    "--output is not JSON ({e}); e.g. --output '{{\"rebooted\": true}}'"
                )
            })?;
            json!({ "output": { "output": output } })
        } else {
            bail!(
                "say what the goon does: --fail, --fatal, --delay, --timeout, --crash, --cancel, --lose-node or --output"
            );
        };
        let mut goon = json!({
            "step": self.step,
            "attempt": if self.every { None } else { Some(self.attempt) },
            "act": act,
        });
        if let Some(kind) = &self.kind {
            goon["kind"] = json!(kind);
        }
        if let Some(times) = self.times {
            goon["times"] = json!(times);
        }
        Ok(goon)
    }
}

impl GoonsCommand {
    pub(crate) async fn run(self) -> Result<ExitCode> {
        match self {
            GoonsCommand::Add(add) => {
                let body = add.body()?;
                let goon = Client::connect(&add.server)?
                    .post("/v1/goons", &body)
                    .await?;
                if add.json {
                    println!("{}", serde_json::to_string_pretty(&goon)?);
                } else {
                    println!("goon {} armed: {}", goon["id"], describe(&goon));
                }
            }
            GoonsCommand::List { json, server } => {
                let v = Client::connect(&server)?.get("/v1/goons", &[]).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    let goons = v["goons"].as_array().cloned().unwrap_or_default();
                    if goons.is_empty() {
                        println!("no goons");
                    }
                    for goon in goons {
                        println!(
                            "{:>4}  {}  (acted {}; added by {})",
                            goon["id"].as_u64().unwrap_or_default(),
                            describe(&goon),
                            crate::args::count(
                                goon["acted"].as_u64().unwrap_or(0) as usize,
                                "time"
                            ),
                            goon["added_by"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            GoonsCommand::Remove { id, all: _, server } => {
                let client = Client::connect(&server)?;
                match id {
                    Some(id) => {
                        client.delete(&format!("/v1/goons/{id}")).await?;
                        println!("goon {id} removed");
                    }
                    None => {
                        let v = client.delete("/v1/goons").await?;
                        let removed = v["removed"].as_u64().unwrap_or(0);
                        println!("{} removed", crate::args::count(removed as usize, "goon"));
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// One line: what it does to which attempts.
fn describe(goon: &Value) -> String {
    let act = &goon["act"];
    let what = match act {
        Value::String(s) if s == "crash" => "crash its host".to_owned(),
        Value::String(s) if s == "cancel" => "cancel the action".to_owned(),
        _ if act.get("fail").is_some() => {
            let f = &act["fail"];
            let how = if f["retryable"] == false {
                "fatal"
            } else {
                "retryable"
            };
            format!("fail ({how}): {}", f["message"].as_str().unwrap_or(""))
        }
        _ if act.get("delay").is_some() => match act["delay"]["ms"].as_u64() {
            Some(ms) => format!("delay {ms} ms"),
            None => "overrun its timeout".to_owned(),
        },
        _ if act.get("lose_node").is_some() => "lose its node".to_owned(),
        _ if act.get("output").is_some() => format!("succeed with {}", act["output"]["output"]),
        other => other.to_string(),
    };
    let attempt = match goon["attempt"].as_u64() {
        Some(n) => format!("attempt {n}"),
        None => "every attempt".to_owned(),
    };
    let kind = goon["kind"]
        .as_str()
        .map(|k| format!(" of {k}"))
        .unwrap_or_default();
    let times = goon["times"]
        .as_u64()
        .map(|n| format!(", {}", crate::args::count(n as usize, "time")))
        .unwrap_or_default();
    format!(
        "{} {attempt}{kind}: {what}{times}",
        goon["step"].as_str().unwrap_or("")
    )
}
