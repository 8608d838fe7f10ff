//! `troupe tokens …`, `troupe secrets …` and `troupe audit`: API
//! credentials, secrets for steps, and the record of administrative changes.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::args::{ServerArg, parse_duration};
use crate::client::Client;

#[derive(Subcommand)]
pub(crate) enum TokensCommand {
    /// Create an API token; prints it once (only its hash is stored).
    Create {
        /// A unique name, recorded as `submitted_by` on actions and in the audit log.
        #[arg(long)]
        name: String,
        /// read, submit, operate or admin; repeat for more. Every scope includes read; admin includes all.
        #[arg(
            long = "scope",
            required_unless_present = "admin",
            value_name = "SCOPE"
        )]
        scopes: Vec<String>,
        /// Limit a submit token to these kinds (comma-separated).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Make the token expire after this long, e.g. 24h or 90d [default: never]
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        /// On the server's host, with no API token: create an admin token directly in the database (when every admin token is lost). Audited as host:<unix user>; run it as the server's user. Needs --data-dir or --db.
        #[arg(long, conflicts_with_all = ["scopes", "kinds"], requires = "host_db")]
        admin: bool,
        /// With --admin: the server's data directory (its SQLite database).
        #[arg(long, group = "host_db", requires = "admin")]
        data_dir: Option<std::path::PathBuf>,
        /// With --admin: the server's database URL.
        #[arg(long, group = "host_db", requires = "admin")]
        db: Option<String>,
        /// With --admin: write the token to this file (mode 0600; an existing file is never overwritten) instead of printing it.
        #[arg(long, requires = "admin")]
        out: Option<std::path::PathBuf>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List API tokens (never their secrets).
    List {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Revoke a token: refused from its next request.
    Revoke {
        /// The token's id (the part after troupe_, as `tokens list` shows it).
        id: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Subcommand)]
pub(crate) enum SecretsCommand {
    /// Set a secret from standard input (one trailing newline is dropped): `troupe secrets set bmc_password < file`; at a terminal it asks without echoing.
    Set {
        /// Letters, digits, '_' or '-'; manifests name it as {{secrets.NAME}}.
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the secrets that are set (names only; values never leave the server).
    List {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Delete a secret.
    Delete {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

pub(crate) async fn run_secrets(cmd: SecretsCommand) -> Result<ExitCode> {
    match cmd {
        SecretsCommand::Set { name, server } => {
            use std::io::{IsTerminal, Read};
            let client = Client::connect(&server)?;
            let mut value = String::new();
            if std::io::stdin().is_terminal() {
                // Typed at a terminal: one line, not echoed.
                value = rpassword::prompt_password(format!("value of {name} (not shown): "))
                    .map_err(|e| anyhow::anyhow!("reading the secret from the terminal: {e}"))?;
            } else {
                std::io::stdin()
                    .read_to_string(&mut value)
                    .map_err(|e| anyhow::anyhow!("reading the secret from standard input: {e}"))?;
            }
            let value = value
                .strip_suffix('\n')
                .map(|v| v.strip_suffix('\r').unwrap_or(v))
                .unwrap_or(&value);
            if value.is_empty() {
                anyhow::bail!("the value on standard input is empty; nothing was stored");
            }
            let s = client
                .put(&format!("/v1/secrets/{name}"), &json!({ "value": value }))
                .await?;
            println!("secret {} set", self::s(&s["name"]));
        }
        SecretsCommand::List { json, server } => {
            let v = Client::connect(&server)?.get("/v1/secrets", &[]).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for sec in v["secrets"].as_array().into_iter().flatten() {
                    println!(
                        "{:<32} set {} by {}",
                        s(&sec["name"]),
                        s(&sec["updated_at"]),
                        s(&sec["updated_by"])
                    );
                }
            }
        }
        SecretsCommand::Delete { name, server } => {
            Client::connect(&server)?
                .delete(&format!("/v1/secrets/{name}"))
                .await?;
            println!("secret {name} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn scopes(t: &Value) -> String {
    let scopes: Vec<&str> = t["scopes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut text = scopes.join(",");
    if let Some(kinds) = t["kinds"].as_array() {
        let kinds: Vec<&str> = kinds.iter().filter_map(Value::as_str).collect();
        text.push_str(&format!(" (kinds: {})", kinds.join(",")));
    }
    text
}

/// Creates a token and prints it (once: only its hash is stored).
pub(crate) async fn create_token(
    server: &ServerArg,
    name: &str,
    wanted: &[String],
    kinds: &[String],
    expires_in: Option<Duration>,
    json: bool,
) -> Result<Value> {
    let mut body = json!({ "name": name, "scopes": wanted });
    if !kinds.is_empty() {
        body["kinds"] = json!(kinds);
    }
    if let Some(ttl) = expires_in {
        let at = chrono::Utc::now() + ttl;
        body["expires_at"] = json!(at.to_rfc3339());
    }
    let t = Client::connect(server)?.post("/v1/tokens", &body).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        eprintln!(
            "created token {} ({}) with scopes {}{}; it is shown only now:",
            s(&t["id"]),
            s(&t["name"]),
            scopes(&t),
            match t["expires_at"].as_str() {
                Some(at) => format!(", expiring {at}"),
                None => String::new(),
            }
        );
        println!("{}", s(&t["token"]));
    }
    Ok(t)
}

pub(crate) async fn run(cmd: TokensCommand) -> Result<ExitCode> {
    match cmd {
        TokensCommand::Create {
            name,
            scopes: wanted,
            kinds,
            expires_in,
            json,
            admin,
            data_dir,
            db,
            out,
            server,
        } => {
            if admin {
                let at = crate::host_token::HostDb { data_dir, db };
                return crate::host_token::create_admin(
                    &name,
                    expires_in,
                    at,
                    out.as_deref(),
                    json,
                )
                .await;
            }
            create_token(&server, &name, &wanted, &kinds, expires_in, json).await?;
        }
        TokensCommand::List { json, server } => {
            let v = Client::connect(&server)?.get("/v1/tokens", &[]).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for t in v["tokens"].as_array().into_iter().flatten() {
                    let state = if t["revoked_at"].is_string() {
                        "revoked"
                    } else if t["active"] == true {
                        "active"
                    } else {
                        "expired"
                    };
                    println!(
                        "{}  {:<7}  {:<20}  {}  created {} by {}{}",
                        s(&t["id"]),
                        state,
                        s(&t["name"]),
                        scopes(t),
                        s(&t["created_at"]),
                        s(&t["created_by"]),
                        match t["expires_at"].as_str() {
                            Some(at) => format!(", expires {at}"),
                            None => String::new(),
                        }
                    );
                }
            }
        }
        TokensCommand::Revoke { id, json, server } => {
            let t = Client::connect(&server)?
                .post(&format!("/v1/tokens/{id}/revoke"), &json!({}))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("revoked token {} ({})", s(&t["id"]), s(&t["name"]));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `troupe audit`: administrative changes, newest first.
pub(crate) async fn audit(
    limit: Option<u32>,
    before: Option<i64>,
    json: bool,
    server: ServerArg,
) -> Result<ExitCode> {
    let mut query: Vec<(&str, String)> = limit
        .map(|l| ("limit", l.to_string()))
        .into_iter()
        .collect();
    query.extend(before.map(|b| ("before", b.to_string())));
    let v = Client::connect(&server)?.get("/v1/audit", &query).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for e in v["entries"].as_array().into_iter().flatten() {
        let detail = match &e["detail"] {
            Value::Null => String::new(),
            d => d.to_string(),
        };
        println!(
            "{:>5}  {}  {:<20}  {:<17} {}  {}",
            e["id"].as_i64().unwrap_or_default(),
            s(&e["at"]),
            s(&e["actor"]),
            s(&e["event"]),
            s(&e["subject"]),
            detail
        );
    }
    if let Some(next) = v["next_before"].as_i64() {
        let limit = limit.map(|l| format!(" --limit {l}")).unwrap_or_default();
        println!("more: troupe audit{limit} --before {next}");
    }
    Ok(ExitCode::SUCCESS)
}
