//! `troupe node` (the agent on a remote host) and `troupe nodes` (the
//! operator's view of them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};

use crate::args::ServerArg;
use crate::client::Client;

#[derive(Args)]
pub(crate) struct NodeArgs {
    /// The app server's API: http://HOST:PORT on loopback, else https://HOST:PORT.
    #[arg(long, env = "TROUPE_SERVER")]
    server: String,
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
        let mut capabilities = BTreeMap::from([
            ("node".to_owned(), name.clone()),
            ("os".to_owned(), std::env::consts::OS.to_owned()),
            ("arch".to_owned(), std::env::consts::ARCH.to_owned()),
            (
                "cpus".to_owned(),
                std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .to_string(),
            ),
            (
                "troupe_version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            ),
        ]);
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
        let mut trust = signing::Trust::default();
        for key in &self.trust {
            trust.add(key.parse().with_context(|| format!("--trust {key:?}"))?);
        }
        let tls = match (&self.ca_cert, self.server.starts_with("https://")) {
            (Some(path), _) => Some(Arc::new(client_tls(path)?)),
            (None, true) => {
                bail!("an https:// server needs --ca-cert FILE: the CA that signed its certificate")
            }
            (None, false) => None,
        };
        crate::serve::create_private_dir(&self.data_dir)?;
        let key = node_key(&self.data_dir)?;
        tracing::info!(name = %name, key = %key.public(), "node identity");
        let exe = std::env::current_exe().context("finding the troupe executable")?;
        let config = node::Config {
            server: self.server.trim_end_matches('/').to_owned(),
            token,
            name,
            key,
            capabilities,
            data_dir: self.data_dir,
            trust,
            host_command: engine::HostCommand {
                program: exe.into(),
                args: vec![crate::STEP_HOST_ARG.into()],
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
    /// The nodes that joined or asked to: status, connected or not, capabilities, steps in flight.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Let a pending node in (admin).
    Accept {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove a node: its key is refused from now on and it is disconnected at once (admin).
    Remove {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Give a node no new steps; those in flight finish (--undo to give it steps again; admin).
    Drain {
        name: String,
        #[arg(long)]
        undo: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

impl NodesCommand {
    pub(crate) async fn run(self) -> Result<ExitCode> {
        match self {
            NodesCommand::Accept { name, server } => {
                let client = Client::connect(&server)?;
                client
                    .post(&format!("/v1/nodes/{name}/accept"), &serde_json::json!({}))
                    .await?;
                println!("node {name} accepted; it takes steps from its next connection");
                Ok(ExitCode::SUCCESS)
            }
            NodesCommand::Remove { name, server } => {
                let client = Client::connect(&server)?;
                client
                    .post(&format!("/v1/nodes/{name}/remove"), &serde_json::json!({}))
                    .await?;
                println!("node {name} removed; its key is refused from now on");
                Ok(ExitCode::SUCCESS)
            }
            NodesCommand::Drain { name, undo, server } => {
                let client = Client::connect(&server)?;
                let path = if undo {
                    format!("/v1/nodes/{name}/drain?undo=true")
                } else {
                    format!("/v1/nodes/{name}/drain")
                };
                client.post(&path, &serde_json::json!({})).await?;
                if undo {
                    println!("node {name} takes new steps again");
                } else {
                    println!("node {name} is draining: no new steps; those in flight finish");
                }
                Ok(ExitCode::SUCCESS)
            }
            NodesCommand::List { json, server } => {
                let client = Client::connect(&server)?;
                let list = client.get("/v1/nodes", &[]).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                    return Ok(ExitCode::SUCCESS);
                }
                let nodes = list["nodes"].as_array().cloned().unwrap_or_default();
                if nodes.is_empty() {
                    println!("no node has joined or asked to");
                }
                for n in nodes {
                    let caps: Vec<String> = n["capabilities"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect();
                    let state = match (
                        n["status"].as_str(),
                        n["connected"] == true,
                        n["draining"] == true,
                    ) {
                        (Some("accepted"), true, true) => "draining",
                        (Some("accepted"), true, false) => "connected",
                        (Some("accepted"), false, _) => "offline",
                        (Some(other), _, _) => other,
                        (None, _, _) => "?",
                    };
                    let seen = n["connected_at"]
                        .as_str()
                        .map(|t| format!("since {t}"))
                        .or_else(|| n["last_seen_at"].as_str().map(|t| format!("last seen {t}")))
                        .unwrap_or_default();
                    println!(
                        "{:<20} {:<9} in flight {:<4} pulled {:>6} KiB  {}  {}",
                        n["name"].as_str().unwrap_or("?"),
                        state,
                        n["in_flight"],
                        n["pulled_bytes"].as_u64().unwrap_or_default() / 1024,
                        seen,
                        caps.join(" ")
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}
