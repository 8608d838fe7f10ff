//! Command-line arguments and dispatch.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Map, Value, json};

use crate::args::ServerArg;
use crate::client::Client;

#[derive(Parser)]
#[command(
    name = "troupe",
    version,
    about = "A provisioning workflow engine: actions made of ordered steps, run by plugins from signed-by-hash bundles"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How a list is shown as text.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    /// The usual columns, times relative (3m ago).
    Table,
    /// More columns, times absolute (UTC).
    Wide,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: REST API, Control, Agency and step hosts.
    Serve(crate::serve::ServeArgs),
    /// Run a demo: a server on embedded SQLite, the built-in bundle, and a reboot action shown live.
    Demo(crate::demo::DemoArgs),
    /// Run a remote node: connect out to an app server and run the steps placed here.
    Node(crate::node_cmd::NodeArgs),
    /// The remote nodes connected to a server.
    #[command(subcommand)]
    Nodes(crate::node_cmd::NodesCommand),
    /// Submit an action.
    Submit {
        /// The action kind, e.g. `reboot` (see `troupe kinds`).
        kind: String,
        /// What the action is for, e.g. a customer server id. Actions for one target run one at a time.
        #[arg(long)]
        target: String,
        /// A parameter as KEY=VALUE (VALUE is a string). Repeat for more.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// A parameter as KEY=JSON, for numbers, booleans, lists and objects.
        #[arg(long = "param-json", value_name = "KEY=JSON")]
        params_json: Vec<String>,
        /// Makes resubmitting safe: the same key and request return the first action. Without it, a random key is sent, so the retries are safe too.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// How long to keep trying a submit that did not go through, with the same idempotency key: the server unreachable or unavailable, the answer lost or the outcome unknown, a write conflict. 0s tries once. A request the server refuses as it is (400, 403, …) is never retried.
        #[arg(long, env = "TROUPE_RETRY_FOR", default_value = "30s", value_parser = crate::args::parse_duration)]
        retry_for: std::time::Duration,
        /// Show the steps live and exit non-zero unless the action succeeds.
        #[arg(long)]
        wait: bool,
        /// With --wait: show step outputs and errors whole (by default each is cut to one line).
        #[arg(long)]
        full: bool,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Show one action and its steps.
    Status {
        id: i64,
        /// Follow it live until it finishes.
        #[arg(long, conflicts_with = "watch")]
        wait: bool,
        /// Draw it again each time it changes, until it finishes or Ctrl-C.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// Also show what its steps logged, by step and attempt.
        #[arg(long)]
        logs: bool,
        /// Show step outputs and errors whole (by default each is cut to one line).
        #[arg(long)]
        full: bool,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List actions, newest first.
    List {
        /// Only those on this target.
        #[arg(long)]
        target: Option<String>,
        /// queued, running, succeeded, failed or cancelled; several by comma or repeated.
        #[arg(long, value_name = "STATUS[,STATUS…]")]
        status: Vec<String>,
        /// Only those of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only those submitted by this token (its name).
        #[arg(long, value_name = "NAME")]
        submitted_by: Option<String>,
        /// Only those submitted since: a duration ago (2h, 30m, 1d) or an RFC 3339 time.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// Only those submitted until: a duration ago (2h, 30m, 1d) or an RFC 3339 time.
        #[arg(long, value_name = "WHEN")]
        until: Option<String>,
        /// How many (1 to 1000) [default: the server's, 50]
        #[arg(long)]
        limit: Option<u32>,
        /// Only actions with an id below this (for paging).
        #[arg(long)]
        before: Option<i64>,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        /// table (relative times) or wide (absolute times, start, end, bundle).
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Ask again every 2 s and draw the list again when it changes, until Ctrl-C.
        #[arg(long, short = 'w', conflicts_with = "json")]
        watch: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Cancel an action: a queued one at once, a running one at its current step.
    Cancel {
        id: i64,
        /// Wait until the action has stopped.
        #[arg(long)]
        wait: bool,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the action kinds the server can run.
    Kinds {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Build, sign, verify, push, list and activate bundles.
    #[command(subcommand)]
    Bundle(crate::bundle_cmd::BundleCommand),
    /// Generate signing keys; list, trust and revoke the server's keys.
    #[command(subcommand)]
    Keys(crate::bundle_cmd::KeysCommand),
    /// Create, list and revoke API tokens (needs an admin token).
    #[command(subcommand)]
    Tokens(crate::admin_cmd::TokensCommand),
    /// Set, list and delete secrets for steps (needs an admin token).
    #[command(subcommand)]
    Secrets(crate::admin_cmd::SecretsCommand),
    /// Set, show, list and delete target records: what templates read as {{target.KEY}} (changes need an admin token).
    #[command(subcommand)]
    Targets(crate::targets_cmd::TargetsCommand),
    /// List the servers sharing the database, and how each is.
    #[command(subcommand)]
    Servers(crate::admin_cmd::ServersCommand),
    /// Make steps misbehave on purpose in a test deployment (a server started with --goons), to rehearse failures (needs an admin token).
    #[command(subcommand)]
    Goons(crate::goons_cmd::GoonsCommand),
    /// Show the audit log: who pushed, activated, trusted, revoked or created what (needs an admin token).
    Audit {
        /// How many (1 to 1000) [default: the server's, 50]
        #[arg(long)]
        limit: Option<u32>,
        /// Only entries with an id below this (for paging).
        #[arg(long)]
        before: Option<i64>,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Measure throughput, latency, CPU, memory and database work per action.
    Bench(crate::bench::BenchArgs),
    /// Print a shell completion script: `troupe completions bash > /etc/bash_completion.d/troupe` (zsh: into a directory on $fpath as _troupe; fish: ~/.config/fish/completions/troupe.fish).
    Completions { shell: clap_complete::Shell },
    /// Print the troupe(1) man page, or write a page for every command into a directory.
    Man {
        /// Write troupe.1, troupe-submit.1, … into this directory instead.
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Create or upgrade the database schema, then exit.
    Migrate {
        /// sqlite://PATH or mysql://USER:PASSWORD@HOST:PORT/DATABASE
        #[arg(long, env = "TROUPE_DB")]
        db: String,
    },
}

impl Cli {
    /// Whether the command only prints: then a closed stdout (`| head`)
    /// should end it quietly, as it does any Unix tool. The server, the
    /// demo and the node keep running when what they print to is gone.
    pub(crate) fn prints_only(&self) -> bool {
        !matches!(
            self.command,
            Command::Serve(_) | Command::Demo(_) | Command::Node(_)
        )
    }

    /// Whether the command runs on one thread. A node's work is a few
    /// sockets and pipes, and every call crosses several tasks (the
    /// connection, the call, its step host's reader): on one thread those
    /// hand-offs are no cross-thread wake-ups. What is heavy (unpacking a
    /// bundle) runs on the blocking pool.
    pub(crate) fn single_threaded(&self) -> bool {
        matches!(self.command, Command::Node(_))
    }

    pub(crate) fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Serve(_) | Command::Node(_) | Command::Migrate { .. } => "info,sqlx=warn",
            _ => "warn",
        }
    }
}

pub(crate) async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => crate::serve::run(args).await,
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Node(args) => args.run().await,
        Command::Nodes(command) => command.run().await,
        Command::Submit {
            kind,
            target,
            params,
            params_json,
            idempotency_key,
            retry_for,
            wait,
            full,
            json,
            server,
        } => {
            let params = parse_params(&params, &params_json)?;
            let client = Client::connect(&server)?;
            let key = match idempotency_key {
                Some(key) => key,
                None => random_key()?,
            };
            let body =
                json!({ "kind": kind, "target": target, "params": params, "idempotency_key": key });
            let action = match client.submit(&body, retry_for).await {
                Ok(action) => action,
                Err(e) if crate::client::retryable(&e) => {
                    return Err(e.context(format!(
                        "the submit did not go through, and the action may or may not have been stored; \
                         to try again safely, run the same command with --idempotency-key {key}"
                    )));
                }
                Err(e) => return Err(e),
            };
            if wait {
                let show = crate::watch::Show {
                    json,
                    logs: false,
                    full,
                };
                return crate::watch::follow(&client, action, show, "succeeded").await;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&action)?);
            } else {
                println!(
                    "action {} ({} on {}) is {}",
                    action["id"],
                    kind,
                    target,
                    action["status"].as_str().unwrap_or("?")
                );
                println!("follow it with: troupe status {} --wait", action["id"]);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            id,
            wait,
            watch,
            logs,
            full,
            json,
            server,
        } => {
            let client = Client::connect(&server)?;
            let mut action = client.action(id).await?;
            if wait {
                let show = crate::watch::Show { json, logs, full };
                return crate::watch::follow(&client, action, show, "succeeded").await;
            }
            if watch {
                let show = crate::watch::Show { json, logs, full };
                return crate::watch::watch_action(&client, action, show).await;
            }
            if logs {
                action["logs"] = client.logs(id).await?["logs"].take();
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&action)?);
            } else {
                crate::watch::print_action(&action, full, full || logs);
                if logs {
                    crate::watch::print_logs(&action);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List {
            target,
            status,
            kind,
            submitted_by,
            since,
            until,
            limit,
            before,
            json,
            output,
            watch,
            server,
        } => {
            let client = Client::connect(&server)?;
            let mut query: Vec<(&str, String)> = limit
                .map(|l| ("limit", l.to_string()))
                .into_iter()
                .collect();
            query.extend(target.map(|v| ("target", v)));
            if !status.is_empty() {
                query.push(("status", status.join(",")));
            }
            query.extend(kind.map(|v| ("kind", v)));
            query.extend(submitted_by.map(|v| ("submitted_by", v)));
            query.extend(since.map(|v| ("since", v)));
            query.extend(until.map(|v| ("until", v)));
            query.extend(before.map(|v| ("before", v.to_string())));
            let wide = output == Output::Wide;
            if watch {
                return crate::watch::watch_list(&client, &query, wide).await;
            }
            let list = client.list(&query).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!(
                    "{}",
                    crate::watch::render_list(&list, &query, wide, chrono::Utc::now())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel {
            id,
            wait,
            json,
            server,
        } => {
            let client = Client::connect(&server)?;
            let action = match client.cancel(id).await {
                Ok(action) => action,
                // Cancelled already (by an earlier cancel): what was asked.
                Err(e) if e.to_string().ends_with("[not_cancellable]") => {
                    let action = client.action(id).await?;
                    if action["status"] != "cancelled" {
                        return Err(e);
                    }
                    action
                }
                Err(e) => return Err(e),
            };
            let show = crate::watch::Show {
                json,
                ..Default::default()
            };
            if wait {
                return crate::watch::follow(&client, action, show, "cancelled").await;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&action)?);
                return Ok(ExitCode::SUCCESS);
            }
            match action["status"].as_str() {
                Some("running") => {
                    println!("cancel requested; action {id} is stopping (--wait to see it end)")
                }
                Some(status) => println!("action {id} is {status}"),
                None => println!("cancel requested for action {id}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Kinds { json, server } => {
            let client = Client::connect(&server)?;
            let kinds = client.get("/v1/kinds", &[]).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&kinds)?);
            } else {
                for k in kinds["kinds"].as_array().into_iter().flatten() {
                    let steps = strs(&k["steps"]);
                    println!(
                        "{:<16} {}",
                        k["name"].as_str().unwrap_or("?"),
                        k["description"].as_str().unwrap_or("")
                    );
                    println!("{:<16} steps: {}", "", steps.join(" → "));
                    for l in k["limits"].as_array().into_iter().flatten() {
                        let keys = strs(&l["keys"]);
                        let own = if keys.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", keys.join(", "))
                        };
                        println!(
                            "{:<16} limit {}: {} at once per {} (step {}){own}",
                            "",
                            l["name"].as_str().unwrap_or("?"),
                            l["max"],
                            l["key"].as_str().unwrap_or("?"),
                            l["step"].as_str().unwrap_or("?"),
                        );
                    }
                    for (name, spec) in k["params"].as_object().into_iter().flatten() {
                        println!("{:<16} param {name}: {}", "", describe_param(spec));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundle(cmd) => crate::bundle_cmd::run(cmd).await,
        Command::Keys(cmd) => crate::bundle_cmd::run_keys(cmd).await,
        Command::Tokens(cmd) => crate::admin_cmd::run(cmd).await,
        Command::Secrets(cmd) => crate::admin_cmd::run_secrets(cmd).await,
        Command::Servers(cmd) => crate::admin_cmd::run_servers(cmd).await,
        Command::Targets(cmd) => crate::targets_cmd::run(cmd).await,
        Command::Goons(cmd) => cmd.run().await,
        Command::Audit {
            limit,
            before,
            json,
            server,
        } => crate::admin_cmd::audit(limit, before, json, server).await,
        Command::Bench(args) => crate::bench::bench(args).await,
        Command::Completions { shell } => crate::manual::completions(shell),
        Command::Man { out } => crate::manual::man(out.as_deref()),
        Command::Migrate { db } => {
            let store = engine::store::Store::connect(&db)
                .await
                .with_context(|| format!("migrating {}", engine::store::redact(&db)))?;
            let applied = store.migrated();
            if applied.is_empty() {
                println!("database {} is up to date", engine::store::redact(&db));
            } else {
                println!(
                    "database {}: applied {}: {}",
                    engine::store::redact(&db),
                    crate::args::count(applied.len(), "migration"),
                    applied.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One param's schema as a line: `an integer, 1 to 65535, default 22`.
fn describe_param(spec: &Value) -> String {
    let mut parts = vec![spec["type"].as_str().unwrap_or("any").to_owned()];
    if let Some(one_of) = spec["enum"].as_array() {
        let values: Vec<String> = one_of.iter().map(Value::to_string).collect();
        parts.push(format!("one of {}", values.join(", ")));
    }
    match (spec["minimum"].as_f64(), spec["maximum"].as_f64()) {
        (Some(a), Some(b)) => parts.push(format!("{a} to {b}")),
        (Some(a), None) => parts.push(format!("at least {a}")),
        (None, Some(b)) => parts.push(format!("at most {b}")),
        (None, None) => {}
    }
    if let Some(p) = spec["pattern"].as_str() {
        parts.push(format!("matching {p}"));
    }
    if let Some(list) = spec["allowed_in"].as_str() {
        parts.push(format!("on the server's list {list}"));
    }
    let required = spec["required"]
        .as_bool()
        .unwrap_or(spec["default"].is_null());
    match (&spec["default"], required) {
        (Value::Null, true) if spec["from_target"].is_string() => parts.push(format!(
            "required unless the target's record has {}",
            spec["from_target"].as_str().unwrap_or_default()
        )),
        (Value::Null, true) => parts.push("required".into()),
        (Value::Null, false) => parts.push("optional".into()),
        (d, _) => parts.push(format!("default {d}")),
    }
    let mut line = parts.join(", ");
    if let Some(d) = spec["description"].as_str() {
        line.push_str(&format!(" — {d}"));
    }
    line
}

fn parse_params(strings: &[String], jsons: &[String]) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for p in strings {
        let Some((k, v)) = p.split_once('=') else {
            bail!("--param {p:?}: expected KEY=VALUE")
        };
        out.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    for p in jsons {
        let Some((k, v)) = p.split_once('=') else {
            bail!("--param-json {p:?}: expected KEY=JSON")
        };
        let v = serde_json::from_str(v)
            .with_context(|| format!("--param-json {k}: {v:?} is not JSON"))?;
        out.insert(k.to_owned(), v);
    }
    Ok(out)
}

/// A fresh idempotency key: 128 random bits in hex.
fn random_key() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The strings of a JSON array (none if it is not one).
fn strs(list: &Value) -> Vec<&str> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}
