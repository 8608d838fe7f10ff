//! `troupe targets …`: target records, what the operator keeps about each
//! target (its BMC, the secret with its BMC's credentials, its hypervisor),
//! which step templates read as `{{target.KEY}}`.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::{Map, Value, json};

use crate::args::ServerArg;
use crate::client::Client;

#[derive(Subcommand)]
pub(crate) enum TargetsCommand {
    /// Set attributes of a target's record, making it: `troupe targets set vps-123 bmc=https://10.0.0.5 bmc_credentials=dc1-bmc`. Other attributes are kept (needs an admin token).
    Set {
        /// The target, as actions name it.
        name: String,
        /// KEY=VALUE to add or replace; a key is lowercase letters, digits and '_'. Values name things (an address, a secret's name), never hold a secret.
        #[arg(value_name = "KEY=VALUE")]
        attributes: Vec<String>,
        /// Remove this attribute; repeat for more.
        #[arg(long, value_name = "KEY")]
        unset: Vec<String>,
        /// Make the record exactly the attributes given, removing the others.
        #[arg(long, conflicts_with = "unset")]
        replace: bool,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Show a target's record.
    Show {
        name: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List target records, by name.
    List {
        /// Print the API's JSON (every page's records in one list) instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Delete a target's record (its actions are not touched; steps that read it fail from now on, naming what is missing).
    Delete {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

/// Targets as they go into a path: one segment, whatever they hold.
fn path(name: &str) -> String {
    let mut out = String::from("/v1/targets/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) async fn run(cmd: TargetsCommand) -> Result<ExitCode> {
    match cmd {
        TargetsCommand::Set {
            name,
            attributes,
            unset,
            replace,
            json,
            server,
        } => {
            let mut set = Map::new();
            for a in &attributes {
                let Some((k, v)) = a.split_once('=') else {
                    bail!("{a:?} is not KEY=VALUE; to remove an attribute, use --unset KEY");
                };
                set.insert(k.to_owned(), Value::String(v.to_owned()));
            }
            if set.is_empty() && unset.is_empty() && !replace {
                bail!("give KEY=VALUE to set, or --unset KEY to remove; nothing was changed");
            }
            let client = Client::connect(&server)?;
            let record = if replace {
                client
                    .put(&path(&name), &json!({ "attributes": set }))
                    .await?
            } else {
                client
                    .patch(&path(&name), &json!({ "set": set, "unset": unset }))
                    .await?
            };
            print_record(&record, json)?;
        }
        TargetsCommand::Show { name, json, server } => {
            let record = Client::connect(&server)?.get(&path(&name), &[]).await?;
            print_record(&record, json)?;
        }
        TargetsCommand::List { json, server } => {
            let client = Client::connect(&server)?;
            let mut records = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut query = vec![("limit", "1000".to_owned())];
                if let Some(a) = &after {
                    query.push(("after", a.clone()));
                }
                let page = client.get("/v1/targets", &query).await?;
                records.extend(page["targets"].as_array().cloned().unwrap_or_default());
                match page["next_after"].as_str() {
                    Some(next) => after = Some(next.to_owned()),
                    None => break,
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "targets": records }))?
                );
            } else if records.is_empty() {
                println!("no target has a record; `troupe targets set NAME KEY=VALUE` makes one");
            } else {
                let now = chrono::Utc::now();
                let rows: Vec<Vec<String>> = records
                    .iter()
                    .map(|r| {
                        vec![
                            s(&r["target"]).to_owned(),
                            attributes(r).join(" "),
                            ago(&r["updated_at"], now),
                            s(&r["updated_by"]).to_owned(),
                        ]
                    })
                    .collect();
                crate::table::print(&["TARGET", "ATTRIBUTES", "UPDATED", "BY"], &[], &rows);
            }
        }
        TargetsCommand::Delete { name, server } => {
            Client::connect(&server)?.delete(&path(&name)).await?;
            println!("target {name}'s record deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn ago(v: &Value, now: chrono::DateTime<chrono::Utc>) -> String {
    s(v).parse::<chrono::DateTime<chrono::Utc>>()
        .map_or("-".to_owned(), |t| crate::table::ago(t, now))
}

/// `KEY=VALUE`, by key.
fn attributes(record: &Value) -> Vec<String> {
    record["attributes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", s(v)))
        .collect()
}

/// One record: a line about it, then its attributes as a table.
fn print_record(record: &Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(record)?);
        return Ok(());
    }
    println!(
        "target {}: updated {} by {}",
        s(&record["target"]),
        ago(&record["updated_at"], chrono::Utc::now()),
        s(&record["updated_by"])
    );
    let rows: Vec<Vec<String>> = record["attributes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| vec![k.clone(), s(v).to_owned()])
        .collect();
    if rows.is_empty() {
        println!("no attributes");
    } else {
        crate::table::print(&["KEY", "VALUE"], &[], &rows);
    }
    Ok(())
}
