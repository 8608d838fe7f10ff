//! `troupe tokens …`, `troupe secrets …` and `troupe audit`: API
//! credentials, secrets for steps, and the record of administrative changes.

use std::path::{Path, PathBuf};
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
        /// Write the token to this new file (mode 0600) instead of printing it; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
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
        /// The token's name, or its id (as `tokens list` shows them).
        #[arg(value_name = "NAME|ID")]
        which: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Subcommand)]
pub(crate) enum ServersCommand {
    /// List the servers sharing the database: live (or silent: its lease
    /// ran out), and those stopped or declared lost in the last hour.
    List {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

pub(crate) async fn run_servers(cmd: ServersCommand) -> Result<ExitCode> {
    let ServersCommand::List { json, server } = cmd;
    let v = Client::connect(&server)?.get("/v1/servers", &[]).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let servers = v["servers"].as_array().cloned().unwrap_or_default();
    let id_width = column_width(&servers, "id", 2) + 1;
    let address_width = column_width(&servers, "address", 7);
    let host_width = column_width(&servers, "host", 4);
    let db_width = column_width(&servers, "writes_through", 8);
    println!(
        "{:<id_width$}  {:<7}  {:<address_width$}  {:<host_width$}  {:<db_width$}  {:<10}  {:>7}  {:>5}  {:<20}  LAST SEEN",
        "ID", "STATE", "ADDRESS", "HOST", "DATABASE", "VERSION", "RUNNING", "NODES", "STARTED"
    );
    for r in &servers {
        // `*`: the server that answered.
        let id = format!(
            "{}{}",
            s(&r["id"]),
            if r["this_server"] == true { "*" } else { "" }
        );
        println!(
            "{:<id_width$}  {:<7}  {:<address_width$}  {:<host_width$}  {:<db_width$}  {:<10}  {:>7}  {:>5}  {:<20}  {}",
            id,
            s(&r["state"]),
            s(&r["address"]),
            s(&r["host"]),
            s(&r["writes_through"]),
            s(&r["version"]),
            r["running"].as_i64().unwrap_or(0),
            r["nodes_connected"].as_i64().unwrap_or(0),
            date(s(&r["started_at"])),
            date(s(&r["last_seen_at"])),
        );
    }
    Ok(ExitCode::SUCCESS)
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

/// The widest `field` of `rows` (at least `min`, a header's width).
fn column_width(rows: &[Value], field: &str, min: usize) -> usize {
    rows.iter()
        .map(|r| s(&r[field]).chars().count())
        .max()
        .unwrap_or(0)
        .max(min)
}

/// An RFC 3339 time to the second, in UTC: `2026-12-06 04:10:18Z`.
fn date(t: &str) -> String {
    t.parse::<chrono::DateTime<chrono::Utc>>()
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|_| t.to_owned())
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

/// What to create a token as, and where it goes.
pub(crate) struct NewToken<'a> {
    pub(crate) name: &'a str,
    pub(crate) scopes: &'a [String],
    pub(crate) kinds: &'a [String],
    pub(crate) expires_in: Option<Duration>,
    /// A join token's rules (`engine::join`), as the API takes them.
    pub(crate) join: Option<Value>,
    /// A new file to write it to (mode 0600), instead of printing it.
    pub(crate) out: Option<&'a Path>,
    pub(crate) json: bool,
}

/// Creates a token and prints it, or writes it to a new private file (once:
/// only its hash is stored). The file is made first, so a name that exists
/// costs no token.
pub(crate) async fn create_token(server: &ServerArg, new: NewToken<'_>) -> Result<Value> {
    let NewToken {
        name,
        scopes: wanted,
        kinds,
        expires_in,
        join,
        out,
        json,
    } = new;
    let mut file = match out {
        Some(path) => Some(private_file(path)?),
        None => None,
    };
    let mut body = json!({ "name": name, "scopes": wanted });
    if let Some(join) = join {
        body["join"] = join;
    }
    if !kinds.is_empty() {
        body["kinds"] = json!(kinds);
    }
    if let Some(ttl) = expires_in {
        let at = chrono::Utc::now() + ttl;
        body["expires_at"] = json!(at.to_rfc3339());
    }
    let created = match Client::connect(server) {
        Ok(client) => client.post("/v1/tokens", &body).await,
        Err(e) => Err(e),
    };
    let mut t = match created {
        Ok(t) => t,
        Err(e) => {
            if let Some(path) = out {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
    };
    if let (Some(file), Some(path)) = (file.as_mut(), out) {
        use std::io::Write;
        file.write_all(format!("{}\n", s(&t["token"])).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| {
                anyhow::anyhow!(
                    "writing the token to {}: {e}; revoke token {} and create another",
                    path.display(),
                    s(&t["id"])
                )
            })?;
        t["token"] = Value::Null;
        if json {
            t["token_file"] = json!(path.display().to_string());
            println!("{}", serde_json::to_string_pretty(&t)?);
        } else {
            println!(
                "{}; written to {} (mode 0600)",
                described(&t),
                path.display()
            );
        }
        return Ok(t);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        eprintln!("{}; it is shown only now:", described(&t));
        println!("{}", s(&t["token"]));
    }
    Ok(t)
}

/// A new file only its owner can read or write, for a token; an existing
/// one is refused, never overwritten.
pub(crate) fn private_file(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                "{} exists, and a token file is never overwritten (it must not exist yet): choose another --out, or move that one away",
                path.display()
            ),
            _ => anyhow::anyhow!("creating {} (it must not exist yet): {e}", path.display()),
        })
}

/// "created token ID (NAME) with scopes S, expiring T".
fn described(t: &Value) -> String {
    format!(
        "created token {} ({}) with scopes {}{}",
        s(&t["id"]),
        s(&t["name"]),
        scopes(t),
        match t["expires_at"].as_str() {
            Some(at) => format!(", expiring {at}"),
            None => String::new(),
        }
    )
}

pub(crate) async fn run(cmd: TokensCommand) -> Result<ExitCode> {
    match cmd {
        TokensCommand::Create {
            name,
            scopes: wanted,
            kinds,
            expires_in,
            out,
            json,
            admin,
            data_dir,
            db,
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
            let new = NewToken {
                name: &name,
                scopes: &wanted,
                kinds: &kinds,
                expires_in,
                join: None,
                out: out.as_deref(),
                json,
            };
            create_token(&server, new).await?;
        }
        TokensCommand::List { json, server } => {
            let v = Client::connect(&server)?.get("/v1/tokens", &[]).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let tokens = v["tokens"].as_array().cloned().unwrap_or_default();
                let name_width = column_width(&tokens, "name", 4);
                let scope_texts: Vec<String> = tokens.iter().map(scopes).collect();
                let scope_width = scope_texts
                    .iter()
                    .map(|t| t.len())
                    .max()
                    .unwrap_or(0)
                    .max(6);
                println!(
                    "{:<16}  {:<7}  {:<name_width$}  {:<scope_width$}  {:<20}  {:<20}  CREATED BY",
                    "ID", "STATE", "NAME", "SCOPES", "CREATED", "EXPIRES"
                );
                for (t, scope_text) in tokens.iter().zip(&scope_texts) {
                    let state = if t["revoked_at"].is_string() {
                        "revoked"
                    } else if t["active"] == true {
                        "active"
                    } else {
                        "expired"
                    };
                    println!(
                        "{:<16}  {:<7}  {:<name_width$}  {:<scope_width$}  {:<20}  {:<20}  {}",
                        s(&t["id"]),
                        state,
                        s(&t["name"]),
                        scope_text,
                        date(s(&t["created_at"])),
                        t["expires_at"]
                            .as_str()
                            .map_or_else(|| "never".to_owned(), date),
                        s(&t["created_by"]),
                    );
                }
            }
        }
        TokensCommand::Revoke {
            which: token,
            json,
            server,
        } => {
            let client = Client::connect(&server)?;
            let list = client.get("/v1/tokens", &[]).await?;
            let tokens = list["tokens"].as_array().cloned().unwrap_or_default();
            // An id first (ids are what the API takes), then a name.
            let found = tokens
                .iter()
                .find(|t| t["id"] == token.as_str())
                .or_else(|| tokens.iter().find(|t| t["name"] == token.as_str()));
            let Some(found) = found else {
                anyhow::bail!(
                    "no token has the id or name {token:?} (see `troupe tokens list`) [token_not_found]"
                );
            };
            let already = found["revoked_at"].is_string();
            let t = client
                .post(
                    &format!("/v1/tokens/{}/revoke", s(&found["id"])),
                    &json!({}),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else if already {
                println!(
                    "token {} ({}) was already revoked at {}; nothing changed",
                    s(&t["id"]),
                    s(&t["name"]),
                    s(&t["revoked_at"])
                );
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
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    let actor_width = column_width(&entries, "actor", 5);
    let subject_width = column_width(&entries, "subject", 7);
    println!(
        "{:>5}  {:<20}  {:<actor_width$}  {:<17}  {:<subject_width$}  DETAIL",
        "ID", "AT", "ACTOR", "EVENT", "SUBJECT"
    );
    for e in &entries {
        let detail = match &e["detail"] {
            Value::Null => String::new(),
            d => d.to_string(),
        };
        println!(
            "{:>5}  {:<20}  {:<actor_width$}  {:<17}  {:<subject_width$}  {}",
            e["id"].as_i64().unwrap_or_default(),
            date(s(&e["at"])),
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
