//! `troupe serve`: the engine behind the REST API, until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use engine::{Config, Engine, HostCommand};

use crate::cli::{data_dir_arg, default_db, parse_duration};

#[derive(Args, Clone)]
pub(crate) struct ServeArgs {
    /// Database URL: sqlite://PATH or mysql://USER:PASSWORD@HOST:PORT/DATABASE [default: sqlite in the data directory]
    #[arg(long, env = "TROUPE_DB")]
    pub(crate) db: Option<String>,
    /// Where unpacked bundles (and the default SQLite database) live [default: ./troupe-data]
    #[arg(long, env = "TROUPE_DATA")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Address for the REST API. Use port 0 for any free port.
    #[arg(long, env = "TROUPE_LISTEN", default_value = "127.0.0.1:7878")]
    pub(crate) listen: SocketAddr,
    /// A signed bundle file to load at start (its signature is FILE.sig). Repeat for more.
    #[arg(long = "bundle", env = "TROUPE_BUNDLES", value_delimiter = ',')]
    pub(crate) bundles: Vec<PathBuf>,
    /// A public key (ed25519:…) trusted to sign bundles. Repeat for more.
    #[arg(long = "trust", env = "TROUPE_TRUST", value_delimiter = ',')]
    pub(crate) trust: Vec<String>,
    /// Bearer token that allows adding and revoking signing keys over the API [default: key management off]
    #[arg(long, env = "TROUPE_ADMIN_TOKEN", hide_env_values = true)]
    pub(crate) admin_token: Option<String>,
    /// How many actions may run at once across all targets.
    #[arg(long, env = "TROUPE_MAX_RUNNING", default_value_t = 256)]
    pub(crate) max_running: usize,
    /// This server's name in the actions table's `owner` column [default: the host name]
    #[arg(long, env = "TROUPE_NODE_ID")]
    pub(crate) node_id: Option<String>,
    /// On SIGTERM, how long running steps may take to finish.
    #[arg(long, env = "TROUPE_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub(crate) shutdown_grace: Duration,
    /// After a step is cancelled or times out, how long it may take to stop before its host is killed.
    #[arg(long, env = "TROUPE_CANCEL_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub(crate) cancel_grace: Duration,
    /// How long this server's claim on a running action lasts without renewal.
    #[arg(long, env = "TROUPE_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub(crate) lease: Duration,
}

impl ServeArgs {
    pub(crate) fn config(&self) -> Result<Config> {
        let data_dir = data_dir_arg(self.data_dir.clone());
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        let exe =
            std::env::current_exe().context("finding the troupe executable for step hosts")?;
        Ok(Config {
            database_url: self.db.clone().unwrap_or_else(|| default_db(&data_dir)),
            data_dir,
            node_id: self.node_id.clone().unwrap_or_else(hostname),
            max_running: self.max_running,
            lease: self.lease,
            cancel_grace: self.cancel_grace,
            trusted_keys: self
                .trust
                .iter()
                .map(|k| k.parse().with_context(|| format!("--trust {k:?}")))
                .collect::<Result<_>>()?,
            host_command: HostCommand {
                program: exe.into(),
                args: vec![crate::STEP_HOST_ARG.into()],
            },
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "troupe".to_owned())
}

/// Starts the engine, loads bundles and resumes unfinished actions.
pub(crate) async fn start_engine(args: &ServeArgs) -> Result<Engine> {
    let config = args.config()?;
    let db = engine::store::redact(&config.database_url);
    let engine = Engine::start(config)
        .await
        .with_context(|| format!("starting the engine on {db}"))?;
    for path in &args.bundles {
        let (bytes, signature) = crate::bundle_cmd::read_signed(path, None)?;
        match engine.admit_bundle(bytes, signature).await {
            Ok(a) => {
                let b = &a.bundle;
                let kinds: Vec<&str> = b.manifest.kinds.keys().map(String::as_str).collect();
                tracing::info!(bundle = %b.manifest.name, version = %b.manifest.version, hash = %b.hash, kinds = %kinds.join(","), "bundle ready");
            }
            // The database already holds a newer version (pushed since): keep it.
            Err(e @ engine::Error::VersionNotNewer { .. }) => {
                tracing::warn!(bundle = %path.display(), "{e}; keeping the newer version");
            }
            Err(e) => return Err(e).with_context(|| format!("loading bundle {}", path.display())),
        }
    }
    if args.bundles.is_empty() && engine.kinds().await?.is_empty() {
        tracing::info!(
            "no bundle loaded yet: push a signed one with `troupe bundle push`, or pass --bundle FILE"
        );
    }
    let resumed = engine
        .resume()
        .await
        .context("resuming unfinished actions")?;
    if resumed > 0 {
        tracing::info!(actions = resumed, "resuming unfinished actions");
    }
    tracing::info!(database = %db, "engine started");
    Ok(engine)
}

pub(crate) async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("listening on {addr} (is another troupe running? choose another with --listen)")
    })
}

/// Serves the API until `stop` resolves, then shuts the engine down gracefully.
pub(crate) async fn serve_until(
    engine: Engine,
    admin_token: Option<String>,
    listener: tokio::net::TcpListener,
    grace: Duration,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let for_signal = engine.clone();
    let state = api::AppState {
        engine: engine.clone(),
        admin_token,
    };
    api::serve(listener, state, async move {
        stop.await;
        tracing::info!("shutting down: no new requests; letting running steps finish");
        for_signal.begin_shutdown();
    })
    .await
    .context("serving HTTP")?;
    engine.shutdown(grace).await;
    tracing::info!("stopped");
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub(crate) async fn run(args: ServeArgs) -> Result<ExitCode> {
    let engine = start_engine(&args).await?;
    let listener = bind(args.listen).await?;
    let addr = listener.local_addr()?;
    // Scripts and tests read this line to find the port.
    println!("troupe listening on http://{addr}");
    tracing::info!(%addr, "REST API ready");
    serve_until(
        engine,
        args.admin_token.clone(),
        listener,
        args.shutdown_grace,
        shutdown_signal(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
