//! `troupe serve`: the engine behind the REST API, until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use engine::{Config, Engine, HostCommand};

use crate::args::{data_dir_arg, default_db, parse_duration};

#[derive(Args, Clone)]
pub(crate) struct ServeArgs {
    /// Database URL: sqlite://PATH or mysql://USER:PASSWORD@HOST:PORT/DATABASE; a cluster's nodes as HOST1:PORT1,HOST2:PORT2,… (writes go through the first healthy one) [default: sqlite in the data directory]
    #[arg(long, env = "TROUPE_DB")]
    pub(crate) db: Option<String>,
    /// Where unpacked bundles (and the default SQLite database) live [default: ./troupe-data]
    #[arg(long, env = "TROUPE_DATA")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Address for the REST API. Use port 0 for any free port.
    #[arg(long, env = "TROUPE_LISTEN", default_value = "127.0.0.1:7878")]
    pub(crate) listen: SocketAddr,
    /// PEM certificate chain for HTTPS on the API (with --tls-key); reloaded on SIGHUP or when the file changes.
    #[arg(long, env = "TROUPE_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "TROUPE_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Serve plain HTTP on an address other than loopback (only behind a proxy that terminates TLS).
    #[arg(long, env = "TROUPE_ALLOW_PLAIN_HTTP")]
    pub(crate) allow_plain_http: bool,
    /// A signed bundle file to load at start (its signature is FILE.sig). Repeat for more.
    #[arg(long = "bundle", env = "TROUPE_BUNDLES", value_delimiter = ',')]
    pub(crate) bundles: Vec<PathBuf>,
    /// A public key (ed25519:…) trusted to sign bundles, for as long as this process runs (`troupe keys trust` keeps one for good). Repeat for more.
    #[arg(long = "trust", env = "TROUPE_TRUST", value_delimiter = ',')]
    pub(crate) trust: Vec<String>,
    /// A deployment variable NAME=VALUE for manifests' {{vars.NAME}}, e.g. reboot_command='virsh reboot "$TROUPE_TARGET"'. Repeat for more; TROUPE_VAR_NAME=VALUE in the environment works too.
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_var)]
    pub(crate) vars: Vec<(String, String)>,
    /// The max of a concurrency limit a bundle declares, over its default: NAME=MAX for every key (bmc=4: four calls at once to one BMC), NAME:KEY=MAX for one (power:dc1=10). Repeat for more; give every server sharing the database the same.
    #[arg(long = "limit", value_name = "NAME[:KEY]=MAX", env = "TROUPE_LIMITS", value_delimiter = ',', value_parser = parse_limit)]
    pub(crate) limits: Vec<engine::limits::LimitSetting>,
    /// The key secrets are encrypted under [default: DATA_DIR/secrets.key, created on first start]. Every server sharing a database needs the same one.
    #[arg(long, env = "TROUPE_SECRETS_KEY_FILE")]
    pub(crate) secrets_key: Option<PathBuf>,
    /// Deprecated: an admin token of your choosing, imported once as an API token with the admin scope. Create tokens with `troupe tokens create` instead.
    #[arg(long, env = "TROUPE_ADMIN_TOKEN", hide_env_values = true)]
    pub(crate) admin_token: Option<String>,
    /// How many actions may run at once across all targets.
    #[arg(long, env = "TROUPE_MAX_RUNNING", default_value_t = 256)]
    pub(crate) max_running: usize,
    /// This server's id, unique among the servers sharing the database (its name in the actions' `owner` column) [default: generated at first start and kept in DATA_DIR/server.id]
    #[arg(long = "server-id", alias = "node-id", env = "TROUPE_SERVER_ID")]
    pub(crate) server_id: Option<String>,
    /// The address other servers' operators and nodes reach this server's API at, as `troupe servers list` shows it [default: the --listen address]
    #[arg(long, env = "TROUPE_ADVERTISE")]
    pub(crate) advertise: Option<String>,
    /// On SIGTERM, how long running steps may take to finish.
    #[arg(long, env = "TROUPE_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub(crate) shutdown_grace: Duration,
    /// After a step is cancelled or times out, how long it may take to stop before its host is killed.
    #[arg(long, env = "TROUPE_CANCEL_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub(crate) cancel_grace: Duration,
    /// How long a remote node may stay silent (it sends a heartbeat every 2 s) before it counts as gone; at least 3s.
    #[arg(long, env = "TROUPE_NODE_TIMEOUT", default_value = "4s", value_parser = parse_duration)]
    pub(crate) node_timeout: Duration,
    /// How long a step on a node that went away (or that ran while this server was down) waits for the node to come back and report it before it fails.
    #[arg(long, env = "TROUPE_NODE_GRACE", default_value = "60s", value_parser = parse_duration)]
    pub(crate) node_grace: Duration,
    /// Write a fresh admin token to DATA_DIR/admin.token whenever the file there is missing or stale, even if other admin tokens exist: for tools that own their data directory (troupe bench).
    #[arg(long, hide = true)]
    pub(crate) ensure_admin_token: bool,
    /// Take goons over the API (`troupe goons add`): faults injected into steps on purpose, to rehearse failures. For test deployments only: never in production.
    #[arg(long, env = "TROUPE_GOONS")]
    pub(crate) goons: bool,
    /// How long this server's lease lasts unrenewed (renewed every sixth of it): once it has run out, other servers sharing the database take this one's actions over. At least 1s.
    #[arg(long, env = "TROUPE_LEASE", default_value = "6s", value_parser = parse_duration)]
    pub(crate) lease: Duration,
    /// Connections served at once (each remote node holds one); beyond it new ones wait until one closes. Lowered, with a warning, to what the open-file limit allows.
    #[arg(long, env = "TROUPE_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub(crate) max_connections: usize,
    /// How long a peer has to send a request's head, on a new connection or between requests on a kept-alive one; a connection that sends none in time is closed.
    #[arg(long, env = "TROUPE_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) header_timeout: Duration,
    /// How long a submit may take to be stored before the server answers 503 `outcome_unknown`: the action may still be stored, so submit again with the same idempotency key. At least 100ms.
    #[arg(long, env = "TROUPE_SUBMIT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) submit_timeout: Duration,
}

impl ServeArgs {
    /// What the listener lets peers hold.
    pub(crate) fn limits(&self) -> api::Limits {
        api::Limits {
            max_connections: api::fit_connections(self.max_connections),
            header_timeout: self.header_timeout,
            ..api::Limits::default()
        }
    }
}

impl ServeArgs {
    pub(crate) fn config(&self) -> Result<Config> {
        let data_dir = data_dir_arg(self.data_dir.clone());
        create_private_dir(&data_dir)?;
        let exe =
            std::env::current_exe().context("finding the troupe executable for step hosts")?;
        let secrets_key = load_secrets_key(self.secrets_key.as_deref(), &data_dir)?;
        // TROUPE_NODE_ID: the variable's name before servers had ids.
        let legacy = std::env::var("TROUPE_NODE_ID")
            .ok()
            .filter(|v| !v.is_empty());
        let server_id = match (&self.server_id, legacy) {
            (Some(id), _) => check_server_id(id)?,
            (None, Some(id)) => {
                tracing::warn!(
                    "TROUPE_NODE_ID is deprecated: name the server with TROUPE_SERVER_ID (or --server-id)"
                );
                check_server_id(&id)?
            }
            (None, None) => server_id_in(&data_dir)?,
        };
        Ok(Config {
            database_url: self.db.clone().unwrap_or_else(|| default_db(&data_dir)),
            data_dir,
            server_id,
            address: Some(
                self.advertise
                    .clone()
                    .unwrap_or_else(|| self.listen.to_string()),
            ),
            max_running: self.max_running,
            lease: check_lease(self.lease)?,
            cancel_grace: self.cancel_grace,
            node_timeout: self.node_timeout,
            node_grace: self.node_grace,
            trusted_keys: self
                .trust
                .iter()
                .map(|k| k.parse().with_context(|| format!("--trust {k:?}")))
                .collect::<Result<_>>()?,
            secrets_key,
            vars: vars_from_env()
                .into_iter()
                .chain(self.vars.iter().cloned())
                .collect(),
            limits: self.limits.clone(),
            goons: self.goons,
            submit_timeout: check_submit_timeout(self.submit_timeout)?,
            host_command: HostCommand {
                program: exe.into(),
                args: vec![crate::STEP_HOST_ARG.into()],
                watch: None,
            },
        })
    }
}

/// Creates the data directory readable by this user only (it holds the
/// database, the first admin token and the secrets key); an existing one
/// open to others is tightened to 0700, saying so.
pub(crate) fn create_private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(
                || format!("making data directory {} private (0700)", dir.display()),
            )?;
            tracing::warn!(
                dir = %dir.display(),
                was = format!("{mode:o}"),
                "tightened the data directory to 0700: it holds the database, the secrets key and the first admin token"
            );
        }
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))
}

/// The secrets key from `--secrets-key`, or from the data directory, where
/// it is created (mode 0600) on first start.
fn load_secrets_key(
    given: Option<&std::path::Path>,
    data_dir: &std::path::Path,
) -> Result<engine::secrets::SecretsKey> {
    use engine::secrets::SecretsKey;
    let path = match given {
        Some(p) => p.to_owned(),
        None => {
            let path = data_dir.join("secrets.key");
            if !path.exists() {
                let key = SecretsKey::generate().context("generating a secrets key")?;
                write_secret(&path, key.to_text().trim_end())?;
                tracing::info!(file = %path.display(), "created the key secrets are encrypted under; back it up, and give every server sharing this database the same one (--secrets-key)");
            }
            path
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the secrets key {}", path.display()))?;
    SecretsKey::from_text(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=VALUE"))?;
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{name:?}: a variable name is letters, digits and '_'"
        ));
    }
    Ok((name.to_ascii_lowercase(), value.to_owned()))
}

/// `TROUPE_VAR_NAME=VALUE` from the environment, as `name`.
fn parse_limit(s: &str) -> std::result::Result<engine::limits::LimitSetting, String> {
    s.parse()
}

fn vars_from_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter_map(|(k, v)| {
            k.strip_prefix("TROUPE_VAR_")
                .map(|name| (name.to_ascii_lowercase(), v))
        })
        .collect()
}

/// A server id as given: letters, digits, '-', '_', '.'; 1 to 64.
fn check_server_id(id: &str) -> Result<String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    anyhow::ensure!(
        ok,
        "--server-id {id:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
    );
    Ok(id.to_owned())
}

/// This server's id, kept in `DATA_DIR/server.id`: made once, at the
/// first start, from the host name and random digits, so two servers on
/// one host (each with its own data directory) never share one.
fn server_id_in(data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join("server.id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return check_server_id(text.trim()).with_context(|| {
                format!(
                    "{} holds no valid server id; fix or remove it",
                    path.display()
                )
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut random = [0u8; 3];
    getrandom::fill(&mut random)
        .map_err(|e| anyhow::anyhow!("reading the OS's randomness: {e}"))?;
    let host: String = engine::host_name()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(48)
        .collect();
    let id = format!(
        "{host}-{}",
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    write_secret(&path, &id)?;
    Ok(id)
}

/// A submit timeout of at least 100 ms: less would refuse submits a
/// healthy database takes a moment to commit.
fn check_submit_timeout(timeout: Duration) -> Result<Duration> {
    anyhow::ensure!(
        timeout >= Duration::from_millis(100),
        "--submit-timeout {timeout:?} is too short: give at least 100ms (the default is 10s)"
    );
    Ok(timeout)
}

/// A lease of at least a second; below three, a slow commit on a busy host
/// may cost this server its actions.
fn check_lease(lease: Duration) -> Result<Duration> {
    anyhow::ensure!(
        lease >= Duration::from_secs(1),
        "--lease {lease:?} is too short: give at least 1s (the default is 6s)"
    );
    if lease < Duration::from_secs(3) {
        tracing::warn!(
            lease_ms = lease.as_millis() as u64,
            "a lease under 3 s leaves a busy host little room: a stall that long hands this server's actions to others"
        );
    }
    Ok(lease)
}

/// The lock on the data directory, held while the process lives.
static DATA_DIR_LOCK: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Takes the data directory for this process: `troupe.lock` in it, locked
/// (flock) and holding our pid. A second server on the same directory
/// (its bundles, its admin token, by default its database) is refused,
/// naming the process that holds it. The kernel lets go of the lock when
/// the process ends, however it ends.
fn lock_data_dir(dir: &std::path::Path) -> Result<()> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("troupe.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if let Err(e) = rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        if e != rustix::io::Errno::WOULDBLOCK {
            return Err(std::io::Error::from(e))
                .with_context(|| format!("locking {}", path.display()));
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = match holder.trim() {
            "" => "another troupe".to_owned(),
            pid => format!("another troupe (pid {pid})"),
        };
        anyhow::bail!(
            "{} is in use by {holder}; stop that one, or give this one a --data-dir of its own",
            dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    let _ = DATA_DIR_LOCK.set(file);
    Ok(())
}

/// Starts the engine, loads bundles and resumes unfinished actions.
pub(crate) async fn start_engine(args: &ServeArgs) -> Result<Engine> {
    let config = args.config()?;
    lock_data_dir(&config.data_dir)?;
    let db = engine::store::redact(&config.database_url);
    let engine = Engine::start(config)
        .await
        .with_context(|| format!("starting the engine on {db}"))?;
    if args.goons {
        tracing::warn!(
            "goons are on: an admin can make steps fail, stall, crash or cancel on purpose (troupe goons add); for test deployments only"
        );
    }
    for path in &args.bundles {
        let (bytes, signature) = crate::bundle_cmd::read_signed(path, None)?;
        match engine
            .admin()
            .admit_bundle(bytes, signature, "serve --bundle")
            .await
        {
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
    if args.bundles.is_empty() && engine.actions().kinds().await?.is_empty() {
        let stored = engine.store().bundles().await?.len();
        if stored == 0 {
            tracing::info!(
                "no bundle loaded yet: push a signed one with `troupe bundle push`, or pass --bundle FILE"
            );
        } else {
            // Keys given with --trust live only as long as the flag: a start
            // without it cannot verify what they signed.
            tracing::warn!(
                stored,
                "the database holds bundles, but none is loaded: their signing keys are not trusted by this server \
                 (--trust given at an earlier start is not kept); pass the same --trust again, or trust the key for \
                 good with `troupe keys trust`"
            );
        }
    }
    ensure_admin_token(
        &engine,
        &data_dir_arg(args.data_dir.clone()),
        args.ensure_admin_token,
    )
    .await?;
    if let Some(token) = &args.admin_token {
        engine
            .admin()
            .import_admin_token(token)
            .await
            .context("importing --admin-token")?;
        tracing::warn!(
            "--admin-token (TROUPE_ADMIN_TOKEN) is deprecated: it was stored as an admin API token; \
             create named tokens with `troupe tokens create`, then revoke it and drop the flag"
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

/// Makes sure someone can administer the server: when no active admin token
/// exists (a new database), creates one and writes it to
/// `DATA_DIR/admin.token` (mode 0600), which the CLI on this host reads by
/// default. With `always`, also when the file is missing or stale though
/// other admin tokens exist (the demo, which owns its data directory).
pub(crate) async fn ensure_admin_token(
    engine: &Engine,
    data_dir: &std::path::Path,
    always: bool,
) -> Result<()> {
    use engine::access::Scope;
    let path = data_dir.join(crate::args::ADMIN_TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&path)
        && engine
            .authenticate(text.trim())
            .await
            .is_ok_and(|p| p.allows(Scope::Admin))
    {
        return Ok(());
    }
    let now = engine::model::now();
    let tokens = engine.admin().tokens().await?;
    let has_admin = tokens
        .iter()
        .any(|t| t.is_active(now) && t.scopes.contains(&Scope::Admin));
    if has_admin && !always {
        return Ok(());
    }
    let name = (1..)
        .map(|n| {
            if n == 1 {
                "admin".to_owned()
            } else {
                format!("admin-{n}")
            }
        })
        .find(|n| tokens.iter().all(|t| &t.name != n))
        .expect("an unused name");
    let spec = engine::access::TokenSpec {
        name,
        scopes: vec![Scope::Admin],
        kinds: None,
        expires_at: None,
        join: None,
    };
    let (info, text) = engine
        .admin()
        .create_token(spec, "troupe serve (first start)")
        .await?;
    write_secret(&path, &text)?;
    tracing::info!(
        token_id = %info.id,
        file = %path.display(),
        "no admin token existed: created one and wrote it to the file (mode 0600); the CLI on this host reads it from there"
    );
    Ok(())
}

/// Writes `text` to `path` readable by this user only, replacing it whole.
fn write_secret(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub(crate) async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("listening on {addr} (is another troupe running? choose another with --listen)")
    })
}

/// Serves the API until `stop` resolves, then shuts the engine down
/// gracefully. The API keeps answering through the drain: new work gets
/// `503 shutting_down`, reads and long-polls are served until the engine has
/// stopped, so a client following an action sees it end if it ends by then.
pub(crate) async fn serve_until(
    engine: Engine,
    listener: tokio::net::TcpListener,
    tls: Option<api::tls::Tls>,
    limits: api::Limits,
    grace: Duration,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let state = api::AppState::new(engine.clone());
    let (close_http, http_closed) = tokio::sync::oneshot::channel::<()>();
    let mut http = tokio::spawn(api::serve(listener, state, tls, limits, async move {
        let _ = http_closed.await;
    }));
    tokio::select! {
        _ = stop => {}
        served = &mut http => {
            engine.shutdown(grace).await;
            return served.context("the HTTP server task")?.context("serving HTTP");
        }
    }
    tracing::info!(
        "shutting down: new work is refused (503 shutting_down) while running steps finish; reads are still served"
    );
    engine.begin_shutdown();
    engine.shutdown(grace).await;
    let _ = close_http.send(());
    http.await
        .context("the HTTP server task")?
        .context("serving HTTP")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves at SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when it is first awaited: a signal sent as soon as the
/// server says it listens must stop it gracefully, not kill it.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

pub(crate) async fn run(args: ServeArgs) -> Result<ExitCode> {
    // Nodes send a heartbeat every 2 s: a shorter timeout would drop live ones.
    if args.node_timeout < Duration::from_secs(3) {
        anyhow::bail!(
            "--node-timeout {:?} is too short: nodes send a heartbeat every 2 s; use 3s or more",
            args.node_timeout
        );
    }
    let tls = tls(&args).await?;
    let engine = start_engine(&args).await?;
    let listener = bind(args.listen).await?;
    let addr = listener.local_addr()?;
    if args.advertise.is_none() {
        // With --listen :0, the port the system chose.
        engine.advertise(&addr.to_string()).await;
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let stop = shutdown_signal();
    // Scripts and tests read this line to find the port.
    println!("troupe listening on {scheme}://{addr}");
    tracing::info!(%addr, scheme, "REST API ready");
    serve_until(
        engine,
        listener,
        tls,
        args.limits(),
        args.shutdown_grace,
        stop,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// The certificate to serve, checked before anything starts; refuses plain
/// HTTP beyond loopback unless the operator says a proxy handles TLS.
async fn tls(args: &ServeArgs) -> Result<Option<api::tls::Tls>> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = api::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            Ok(Some(api::tls::Tls::load(files).await?))
        }
        _ if args.listen.ip().is_loopback() || args.allow_plain_http => Ok(None),
        _ => anyhow::bail!(
            "--listen {} is not a loopback address, and plain HTTP would send API tokens in clear text: \
             give --tls-cert and --tls-key (see deploy/tls.md), or --allow-plain-http if a proxy in front terminates TLS",
            args.listen
        ),
    }
}
