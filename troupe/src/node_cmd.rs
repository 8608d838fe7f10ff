//! `troupe node` (the agent on a remote host) and `troupe nodes` (the
//! operator's view of them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};

use crate::args::{ServerArg, parse_duration, parse_size};
use crate::client::Client;

#[derive(Args)]
pub(crate) struct NodeArgs {
    /// The app server's API: http://HOST:PORT on loopback, else https://HOST:PORT. Where several servers share one database, repeat it (or separate with commas) for each: the node keeps a connection to every one, so whichever server runs an action reaches it.
    #[arg(
        long = "server",
        env = "TROUPE_SERVER",
        value_delimiter = ',',
        required = true
    )]
    servers: Vec<String>,
    /// A file holding an API token with the join scope (`troupe tokens create --scope join`), to join without an admin's `troupe nodes accept`; a node that has joined needs none.
    #[arg(long, env = "TROUPE_NODE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// This node's name (letters, digits, '-', '_', '.') [default: the host name].
    #[arg(long, env = "TROUPE_NODE_NAME")]
    name: Option<String>,
    /// What this node can do, as KEY=VALUE; steps' `requires` match against these. Repeat for more.
    #[arg(
        long = "capability",
        value_name = "KEY=VALUE",
        env = "TROUPE_NODE_CAPABILITIES",
        value_delimiter = ','
    )]
    capabilities: Vec<String>,
    /// A capability found by a command, as KEY=COMMAND (run by /bin/sh -c): present while the command exits 0, its value the first line it prints (`true` if none). Run at start and every --probe-every; a failing probe drops the capability, so steps that need it go elsewhere. Repeat for more.
    #[arg(long = "probe", value_name = "KEY=COMMAND")]
    probes: Vec<String>,
    /// How often probes run again.
    #[arg(long, env = "TROUPE_NODE_PROBE_EVERY", default_value = "30s", value_parser = parse_duration)]
    probe_every: std::time::Duration,
    /// A loaded bundle no step used for this long is unloaded (a version a newer one replaced goes after 5 s idle).
    #[arg(long, env = "TROUPE_NODE_UNLOAD_AFTER", default_value = "10m", value_parser = parse_duration)]
    unload_after: std::time::Duration,
    /// The bundle cache's size limit (e.g. 500MiB, 2GiB): bundles no step uses are evicted, least recently used first, to stay under it.
    #[arg(long, env = "TROUPE_NODE_CACHE_SIZE", default_value = "2GiB", value_parser = parse_size)]
    cache_size: u64,
    /// A public key (ed25519:…) this node accepts bundles from. Repeat for more; the server's trust does not count here.
    #[arg(
        long = "trust",
        env = "TROUPE_NODE_TRUST",
        value_delimiter = ',',
        required = true
    )]
    trust: Vec<String>,
    /// Where fetched bundles are kept.
    #[arg(long, env = "TROUPE_NODE_DATA", default_value = "troupe-node-data")]
    data_dir: PathBuf,
    /// For an https:// server: a PEM file with the CA certificate(s) its certificate must chain to.
    #[arg(long, env = "TROUPE_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

impl NodeArgs {
    pub(crate) async fn run(self) -> Result<ExitCode> {
        let token = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the join token from {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let name = match self.name {
            Some(name) => name,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .context("reading the host name; pass --name")?,
        };
        if !engine::placement::is_capability_name(&name) {
            bail!("--name {name:?}: use letters, digits, '-', '_' or '.' (at most 64)");
        }
        // Built in: what every node can say of itself; flags add to them.
        let mut capabilities: BTreeMap<String, String> = node::built_in(&name);
        for pair in &self.capabilities {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("--capability {pair:?}: expected KEY=VALUE"))?;
            if !engine::placement::is_capability_name(k) || v.is_empty() {
                bail!(
                    "--capability {pair:?}: KEY is letters, digits, '_', '-', '.'; VALUE is not empty"
                );
            }
            if k == "node" {
                bail!("--capability node=…: `node` is the node's name; set it with --name");
            }
            capabilities.insert(k.to_owned(), v.to_owned());
        }
        let mut probes = Vec::new();
        for pair in &self.probes {
            let (k, command) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("--probe {pair:?}: expected KEY=COMMAND"))?;
            if !engine::placement::is_capability_name(k) || command.trim().is_empty() {
                bail!(
                    "--probe {pair:?}: KEY is letters, digits, '_', '-', '.'; COMMAND is not empty"
                );
            }
            if k == "node" {
                bail!("--probe node=…: `node` is the node's name; set it with --name");
            }
            probes.push(node::Probe {
                name: k.to_owned(),
                command: command.to_owned(),
            });
        }
        let mut trust = signing::Trust::default();
        for key in &self.trust {
            trust.add(key.parse().with_context(|| format!("--trust {key:?}"))?);
        }
        let secure = self.servers.iter().any(|s| s.starts_with("https://"));
        let tls = match (&self.ca_cert, secure) {
            (Some(path), _) => Some(Arc::new(client_tls(path)?)),
            (None, true) => {
                bail!("an https:// server needs --ca-cert FILE: the CA that signed its certificate")
            }
            (None, false) => None,
        };
        crate::serve::create_private_dir(&self.data_dir)?;
        let key = node_key(&self.data_dir)?;
        tracing::info!(
            name = %name,
            key = %key.public(),
            fingerprint = %key.public().fingerprint(),
            "node identity (an admin lets it in without a join token with `troupe nodes accept NAME --key FINGERPRINT`)"
        );
        let exe = std::env::current_exe().context("finding the troupe executable")?;
        let config = node::Config {
            servers: self
                .servers
                .iter()
                .map(|s| s.trim_end_matches('/').to_owned())
                .collect(),
            token,
            name,
            key,
            capabilities,
            probes,
            probe_every: self.probe_every,
            unload_after: self.unload_after,
            cache_size: self.cache_size,
            data_dir: self.data_dir,
            trust,
            host_command: engine::HostCommand {
                program: exe.into(),
                args: vec![crate::STEP_HOST_ARG.into()],
                watch: None,
            },
            tls,
        };
        let stop = tokio_util::sync::CancellationToken::new();
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                stop.cancel();
            });
        }
        node::run(config, stop).await?;
        Ok(ExitCode::SUCCESS)
    }
}

/// This node's key: `node.key` in its data directory, made on first start.
fn node_key(dir: &std::path::Path) -> Result<signing::SecretKey> {
    let path = dir.join("node.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => signing::SecretKey::from_text(&text)
            .with_context(|| format!("reading the node key {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::bundle_cmd::generate_key(&path)
        }
        Err(e) => Err(e).with_context(|| format!("reading the node key {}", path.display())),
    }
}

/// TLS that trusts only the CA certificate(s) in `path`.
fn client_tls(path: &std::path::Path) -> Result<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading the CA certificate {}", path.display()))?
    {
        let cert = cert.with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("using {} as a CA", path.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[derive(Subcommand)]
pub(crate) enum NodesCommand {
    /// The nodes that joined or asked to: status, address, last heartbeat, steps in flight, bundles cached and pulled, capabilities.
    List {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        /// table (relative times) or wide (absolute times, key fingerprint, who let it in).
        #[arg(long, short = 'o', value_enum, default_value_t = crate::cli::Output::Table)]
        output: crate::cli::Output,
        #[command(flatten)]
        server: ServerArg,
    },
    /// One node in full, with the bundles in its cache.
    Show {
        name: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Join tokens: let new hosts in without accepting each by hand (admin).
    #[command(subcommand)]
    Token(NodeTokenCommand),
    /// Let a node in by its key (admin).
    ///
    /// The key is the fingerprint (SHA256:…) `troupe node` logged when it started, as `troupe nodes list` shows it for a node that waits, or its whole public key (ed25519:…) to admit it before it connects.
    Accept {
        name: String,
        /// The key to let in: SHA256:… or ed25519:…
        #[arg(long)]
        key: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove a node: its key is refused from now on and it is disconnected at once (admin).
    Remove {
        name: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Give a node no new steps; those in flight finish (--undo to give it steps again; admin).
    Drain {
        name: String,
        #[arg(long)]
        undo: bool,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Subcommand)]
pub(crate) enum NodeTokenCommand {
    /// Create a join token (an API token with only the join scope); prints it once. Revoke it with `troupe tokens revoke ID`.
    Create {
        /// How long it can be used to join; nodes that joined stay in after it expires.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// Its name, recorded as who let each node in [default: join-<date and time>]
        #[arg(long)]
        name: Option<String>,
        /// How many new nodes it admits in all: one token per host is safest (a leaked token is worth nothing once its node joined).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Names a node may take with it, `*` matching any run (e.g. 'hv-dc1-*') [default: any name nobody holds]
        #[arg(long, value_name = "PATTERN")]
        names: Option<String>,
        /// A capability its nodes may be placed on: KEY or KEY=VALUE, `*` matching any run (e.g. hypervisor=kvm, oob=dc1, mem_free_mb). Repeat for more; others a node reports are not placed on [default: any]
        #[arg(long = "capability", value_name = "PATTERN")]
        capabilities: Vec<String>,
        /// Write the token to this new file (mode 0600) instead of printing it; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

impl NodesCommand {
    pub(crate) async fn run(self) -> Result<ExitCode> {
        match self {
            NodesCommand::Token(NodeTokenCommand::Create {
                ttl,
                name,
                uses,
                names,
                capabilities,
                out,
                json,
                server,
            }) => {
                let name = name.unwrap_or_else(|| {
                    format!("join-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"))
                });
                let mut join = serde_json::json!({ "max_uses": uses });
                if let Some(names) = names {
                    join["names"] = names.into();
                }
                if !capabilities.is_empty() {
                    join["capabilities"] = capabilities.into();
                }
                let new = crate::admin_cmd::NewToken {
                    name: &name,
                    scopes: &["join".to_owned()],
                    kinds: &[],
                    expires_in: Some(ttl),
                    join: Some(join),
                    out: out.as_deref(),
                    json,
                };
                crate::admin_cmd::create_token(&server, new).await?;
                if !json {
                    let file = out
                        .as_deref()
                        .map_or("FILE".into(), |p| p.display().to_string());
                    eprintln!(
                        "on each new host, copy it to a file only troupe can read and run: troupe node --server URL --token-file {file} --trust KEY …"
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            NodesCommand::Show { name, json, server } => {
                let client = Client::connect(&server)?;
                let n = client.get(&format!("/v1/nodes/{name}"), &[]).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&n)?);
                    return Ok(ExitCode::SUCCESS);
                }
                print_node(&n);
                Ok(ExitCode::SUCCESS)
            }
            NodesCommand::Accept {
                name,
                key,
                json,
                server,
            } => {
                let client = Client::connect(&server)?;
                let node = client
                    .post(
                        &format!("/v1/nodes/{name}/accept"),
                        &serde_json::json!({ "key": key }),
                    )
                    .await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&node)?);
                } else {
                    println!("node {name} accepted; it takes steps from its next connection");
                }
                Ok(ExitCode::SUCCESS)
            }
            NodesCommand::Remove { name, json, server } => {
                let client = Client::connect(&server)?;
                let before = client.get(&format!("/v1/nodes/{name}"), &[]).await?;
                let node = client
                    .post(&format!("/v1/nodes/{name}/remove"), &serde_json::json!({}))
                    .await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&node)?);
                } else if before["status"] == "removed" {
                    println!("node {name} was already removed; nothing changed");
                } else {
                    println!("node {name} removed; its key is refused from now on");
                }
                Ok(ExitCode::SUCCESS)
            }
            NodesCommand::Drain {
                name,
                undo,
                json,
                server,
            } => {
                let client = Client::connect(&server)?;
                let path = if undo {
                    format!("/v1/nodes/{name}/drain?undo=true")
                } else {
                    format!("/v1/nodes/{name}/drain")
                };
                let node = client.post(&path, &serde_json::json!({})).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&node)?);
                } else if undo {
                    println!("node {name} takes new steps again");
                } else {
                    println!("node {name} is draining: no new steps; those in flight finish");
                }
                Ok(ExitCode::SUCCESS)
            }
            NodesCommand::List {
                json,
                output,
                server,
            } => {
                let client = Client::connect(&server)?;
                let list = client.get("/v1/nodes", &[]).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                    return Ok(ExitCode::SUCCESS);
                }
                let nodes = list["nodes"].as_array().cloned().unwrap_or_default();
                if nodes.is_empty() {
                    println!("no node has joined or asked to");
                } else {
                    print_nodes(&nodes, output == crate::cli::Output::Wide);
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Nodes as a table, one row each (`wide`: absolute times, the key's
/// fingerprint, who let it in); under it, for each node that waits to be
/// let in, its key and the accept that lets it in.
fn print_nodes(nodes: &[serde_json::Value], wide: bool) {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let now = chrono::Utc::now();
    let at = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
            .map_or("-".to_owned(), |t| {
                if wide {
                    crate::table::absolute(t)
                } else {
                    crate::table::ago(t, now)
                }
            })
    };
    let mut rows = Vec::with_capacity(nodes.len());
    for n in nodes {
        let heard = if n["last_heard_at"].is_string() {
            &n["last_heard_at"]
        } else {
            &n["last_seen_at"]
        };
        let mut row = vec![
            text(&n["name"]),
            node_state(n).to_owned(),
            text(&n["address"]),
        ];
        if wide {
            row.push(at(&n["connected_at"]));
        }
        row.extend([
            at(heard),
            n["in_flight"].as_u64().unwrap_or_default().to_string(),
            n["bundles"].as_array().map_or(0, Vec::len).to_string(),
            format!(
                "{} KiB",
                n["pulled_bytes"].as_u64().unwrap_or_default() / 1024
            ),
        ]);
        if wide {
            row.push(text(&n["fingerprint"]));
            row.push(text(&n["accepted_by"]));
        }
        row.push(capabilities(n).join(" "));
        rows.push(row);
    }
    let header: &[&str] = if wide {
        &[
            "NAME",
            "STATE",
            "ADDRESS",
            "CONNECTED",
            "HEARD",
            "IN FLIGHT",
            "BUNDLES",
            "PULLED",
            "FINGERPRINT",
            "ACCEPTED BY",
            "CAPABILITIES",
        ]
    } else {
        &[
            "NAME",
            "STATE",
            "ADDRESS",
            "HEARD",
            "IN FLIGHT",
            "BUNDLES",
            "PULLED",
            "CAPABILITIES",
        ]
    };
    crate::table::print(header, &["IN FLIGHT", "BUNDLES", "PULLED"], &rows);
    for n in nodes.iter().filter(|n| node_state(n) == "pending") {
        println!(
            "{} waits to be let in with key {}: troupe nodes accept {} --key {}",
            text(&n["name"]),
            text(&n["fingerprint"]),
            text(&n["name"]),
            text(&n["fingerprint"]),
        );
    }
}

/// What a node's capabilities say, as `KEY=VALUE` words.
fn capabilities(n: &serde_json::Value) -> Vec<String> {
    n["capabilities"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect()
}

/// A node's state in a word: connected, draining, offline, pending or removed.
fn node_state(n: &serde_json::Value) -> &str {
    match (
        n["status"].as_str(),
        n["connected"] == true,
        n["draining"] == true,
    ) {
        (Some("accepted"), true, true) => "draining",
        (Some("accepted"), true, false) => "connected",
        (Some("accepted"), false, _) => "offline",
        (Some(other), _, _) => other,
        (None, _, _) => "?",
    }
}

/// A node's details and cached bundles.
fn print_node(n: &serde_json::Value) {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let caps = capabilities(n);
    let state = node_state(n);
    let bundles = n["bundles"].as_array().cloned().unwrap_or_default();
    let pulled_kib = n["pulled_bytes"].as_u64().unwrap_or_default() / 1024;
    println!("node          {}", text(&n["name"]));
    println!("state         {state}");
    println!("key           {}", text(&n["public_key"]));
    println!("fingerprint   {}", text(&n["fingerprint"]));
    if let Some(allowed) = n["allowed_capabilities"].as_array() {
        let allowed: Vec<&str> = allowed.iter().filter_map(|a| a.as_str()).collect();
        println!("placed on     {}", allowed.join(" "));
    }
    println!("accepted by   {}", text(&n["accepted_by"]));
    println!("address       {}", text(&n["address"]));
    println!("connected at  {}", text(&n["connected_at"]));
    println!("last heard    {}", text(&n["last_heard_at"]));
    println!("last seen     {}", text(&n["last_seen_at"]));
    println!("in flight     {}", n["in_flight"]);
    println!("pulled        {pulled_kib} KiB");
    println!("capabilities  {}", caps.join(" "));
    if bundles.is_empty() {
        println!("bundles       none cached");
    }
    for (i, b) in bundles.iter().enumerate() {
        println!(
            "{}{}  {:>6} KiB{}",
            if i == 0 {
                "bundles       "
            } else {
                "              "
            },
            text(&b["hash"]),
            b["bytes"].as_u64().unwrap_or_default() / 1024,
            if b["loaded"] == true { "  loaded" } else { "" }
        );
    }
}
