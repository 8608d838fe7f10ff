//! `troupe demo`: the whole path in one command. A server on embedded SQLite,
//! the built-in bundle, a `reboot` action with harmless params shown live,
//! and the SQL to watch it in the database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::args::data_dir_arg;
use crate::client::Client;
use crate::serve::ServeArgs;

/// How the demo server "reboots" a server: harmlessly.
const DEMO_REBOOT: &str = "echo \"rebooting $TROUPE_TARGET (simulated)\"; sleep 1";

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Where the demo keeps its database and bundles [default: ./troupe-data]
    #[arg(long, env = "TROUPE_DATA")]
    data_dir: Option<PathBuf>,
    /// Address for the demo server's REST API.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Stop the server once the demo action has finished instead of serving on.
    #[arg(long)]
    exit: bool,
    /// Also trust this public key (ed25519:…, from `troupe keys generate` or `troupe keys public`), so bundles you sign can be pushed to the demo. Repeat for more.
    #[arg(long = "trust", value_name = "KEY")]
    trust: Vec<String>,
    /// Take goons (`troupe goons add`), to rehearse failures on the demo.
    #[arg(long)]
    goons: bool,
}

pub(crate) async fn run(args: DemoArgs) -> Result<ExitCode> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "the demo serves plain HTTP, so it listens on loopback only (not {}); use `troupe serve` with --tls-cert for more",
            args.listen
        );
    }
    let data_dir = data_dir_arg(args.data_dir);
    crate::serve::create_private_dir(&data_dir)?;
    let library = crate::args::shipped_library("builtin")?;
    let lib = std::fs::read(&library).with_context(|| format!("reading {}", library.display()))?;
    let manifest = include_str!("../../steps/builtin/bundle.toml");
    let bytes = engine::bundle::build(manifest, &[(engine::bundle::TARGET, &lib)])?;
    let bundle_path = data_dir.join("builtin.bundle");
    std::fs::write(&bundle_path, &bytes)
        .with_context(|| format!("writing {}", bundle_path.display()))?;

    // A local development key, made on first use and trusted by this server.
    let key_path = data_dir.join("dev-signing.key");
    let key = if key_path.exists() {
        crate::bundle_cmd::load_key(&key_path)?
    } else {
        let key = crate::bundle_cmd::generate_key(&key_path)?;
        println!(
            "generated a development signing key {} (key id {})",
            key_path.display(),
            key.public().id()
        );
        key
    };
    let signature = crate::bundle_cmd::sign(&bytes, &key)?.to_text();
    std::fs::write(data_dir.join("builtin.bundle.sig"), &signature)?;
    println!(
        "built and signed {} (sha256 {})",
        bundle_path.display(),
        engine::BundleHash::of(&bytes)
    );

    let serve = ServeArgs {
        db: None,
        data_dir: Some(data_dir.clone()),
        listen: args.listen,
        tls_cert: None,
        tls_key: None,
        allow_plain_http: false,
        bundles: Vec::new(),
        trust: std::iter::once(key.public().to_string())
            .chain(args.trust.iter().cloned())
            .collect(),
        admin_token: None,
        ensure_admin_token: true,
        secrets_key: None,
        vars: vec![("reboot_command".into(), DEMO_REBOOT.into())],
        limits: Vec::new(),
        max_running: 64,
        server_id: None,
        advertise: None,
        shutdown_grace: Duration::from_secs(10),
        cancel_grace: Duration::from_secs(2),
        node_timeout: Duration::from_secs(4),
        node_grace: Duration::from_secs(60),
        lease: Duration::from_secs(6),
        submit_timeout: Duration::from_secs(10),
        goons: args.goons,
        max_connections: api::Limits::default().max_connections,
        header_timeout: api::Limits::default().header_timeout,
    };
    let engine = crate::serve::start_engine(&serve).await?;
    let listener = crate::serve::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    engine.advertise(&addr.to_string()).await;
    let token_path = data_dir.join(crate::args::ADMIN_TOKEN_FILE);
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading {}", token_path.display()))?
        .trim()
        .to_owned();
    let db_path = data_dir.join("troupe.db");
    let signalled = crate::serve::shutdown_signal();
    println!(
        "troupe listening on http://{addr} (database: sqlite://{})",
        db_path.display()
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve::serve_until(
        engine,
        listener,
        None,
        serve.limits(),
        serve.shutdown_grace,
        async move {
            tokio::select! {
                _ = stop_rx => {}
                _ = signalled => {}
            }
        },
    ));

    let client = Client::new(&format!("http://{addr}"), Some(token))?;
    println!();
    println!("$ troupe bundle push {}", bundle_path.display());
    match client.push(bytes, signature).await {
        Ok((_, b)) => println!(
            "pushed {} {} ({}), signed by {}: {}",
            b["name"].as_str().unwrap_or("?"),
            b["version"].as_str().unwrap_or("?"),
            b["hash"].as_str().unwrap_or("?"),
            b["signer"].as_str().unwrap_or("?"),
            b["status"].as_str().unwrap_or("?")
        ),
        // A rebuilt library with the same version: the server keeps what it has.
        Err(e) if e.to_string().contains("bundle_version_not_newer") => {
            println!("kept the version the server already holds: {e}")
        }
        Err(e) => return Err(e),
    }
    let target = "vps-demo";
    println!();
    println!(
        "(this demo server reboots by running: {DEMO_REBOOT}; a real one sets --var reboot_command)"
    );
    println!(
        "$ troupe submit reboot --target {target} --param host=127.0.0.1 --param-json port={} --wait",
        addr.port()
    );
    let action = client
        .submit(
            &json!({
                "kind": "reboot",
                "target": target,
                "params": { "host": "127.0.0.1", "port": addr.port() },
            }),
            Duration::ZERO,
        )
        .await?;
    let id = action["id"].as_i64().unwrap_or_default();
    let code = crate::watch::follow(&client, action, Default::default(), "succeeded").await?;

    println!();
    println!("Watch actions in the database:");
    println!(
        "  sqlite3 {} \"SELECT id, kind, target, status, current_step, created_at, finished_at FROM actions ORDER BY id DESC LIMIT 10\"",
        db_path.display()
    );
    println!(
        "  sqlite3 {} \"SELECT seq, name, status, attempt, error FROM action_steps WHERE action_id = {id} ORDER BY seq\"",
        db_path.display()
    );
    println!(
        "or over HTTP:  curl -s -H \"Authorization: Bearer $(cat {})\" http://{addr}/v1/actions/{id}",
        token_path.display()
    );
    if args.exit {
        let _ = stop_tx.send(());
    } else {
        println!();
        println!("The server keeps running at http://{addr}; in another terminal try:");
        println!("  troupe list --server http://{addr}");
        println!(
            "  troupe submit run --target demo --param-json argv='[\"uptime\"]' --wait --server http://{addr}"
        );
        if args.trust.is_empty() {
            println!(
                "  (to push bundles you sign: restart the demo with --trust $(troupe keys public YOUR.key))"
            );
        } else {
            println!(
                "  troupe bundle push YOUR.bundle --server http://{addr}   (signed by a key given with --trust)"
            );
        }
        println!("Press Ctrl-C to stop it.");
    }
    server.await.context("the demo server task failed")??;
    Ok(code)
}
