//! `troupe bench`: measures a deployment. Starts its own server (or targets
//! `--server`), submits N actions over the REST API with C in flight, waits
//! for each with a long-poll, and reports throughput, latency, CPU, memory
//! and database work per action. Bounded in count and time; loopback only
//! when it starts the server.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::args::parse_duration;
use crate::client::Client;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    mode: Option<BenchMode>,
    /// Actions in the loaded run.
    #[arg(short = 'n', long, default_value_t = 5000)]
    actions: usize,
    /// Actions in flight during the loaded run.
    #[arg(short = 'c', long, default_value_t = 64)]
    concurrency: usize,
    /// Actions in the light-load latency run (one in flight); 0 skips it.
    #[arg(long, default_value_t = 200)]
    light: usize,
    /// The action kind to run.
    #[arg(long, default_value = "noop3")]
    kind: String,
    /// Database for the server bench starts: `sqlite` (a fresh file) or a mysql:// URL (use an empty database).
    #[arg(long, default_value = "sqlite")]
    db: String,
    /// Measure a running server instead of starting one (CPU, memory and per-action database figures need a server bench started).
    #[arg(long)]
    server: Option<String>,
    /// With --server: a file holding an API token with the submit scope (or set TROUPE_TOKEN).
    #[arg(long, env = "TROUPE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Give up on the whole benchmark after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    /// Also start this many `troupe node` processes on loopback and run the
    /// same workload with its steps placed on them (`--remote-kind`), next to
    /// the local run.
    #[arg(long, default_value_t = 0)]
    nodes: usize,
    /// The kind for the remote run: its steps require the `bench` capability the bench nodes have.
    #[arg(long, default_value = "noop3_remote")]
    remote_kind: String,
}

#[derive(clap::Subcommand)]
enum BenchMode {
    /// Simulate a fleet of nodes (one process, K authenticated connections): server memory and idle CPU, time to detect a lost node under load, bytes sent when many nodes need a new bundle.
    Fleet(crate::fleet::FleetArgs),
}

/// A `troupe serve` child process started for the benchmark.
pub(crate) struct OwnServer {
    pub(crate) child: Child,
    pub(crate) url: String,
    pub(crate) dir: PathBuf,
    /// The throwaway key its bundle is signed with (`ed25519:…`).
    trust: String,
    /// `troupe node` processes started for the remote run.
    nodes: Vec<Child>,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn start_server(db: &str) -> Result<OwnServer> {
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("troupe-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let lib_path = crate::args::shipped_library("testkit")?;
    let bytes = engine::bundle::build(
        include_str!("../../steps/testkit/bundle.toml"),
        &[(engine::bundle::TARGET, &std::fs::read(&lib_path)?)],
    )?;
    // A throwaway key, trusted by this server only.
    let key_path = dir.join("bench.key");
    let key = crate::bundle_cmd::generate_key(&key_path)?;
    let bundle = dir.join("testkit.bundle");
    std::fs::write(&bundle, &bytes)?;
    std::fs::write(
        dir.join("testkit.bundle.sig"),
        crate::bundle_cmd::sign(&bytes, &key)?.to_text(),
    )?;
    let db_url = if db == "sqlite" {
        format!("sqlite://{}", dir.join("bench.db").display())
    } else {
        db.to_owned()
    };
    let mut child = Command::new(&exe)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-running",
            "1024",
            "--node-id",
            "bench",
            "--ensure-admin-token",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--db", &db_url, "--trust", &key.public().to_string()])
        .arg("--bundle")
        .arg(&bundle)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting troupe serve")?;
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(url) = line.trim().strip_prefix("troupe listening on ") else {
        let _ = child.kill();
        bail!("the benchmark server did not start (see its errors above)");
    };
    Ok(OwnServer {
        url: url.to_owned(),
        child,
        dir,
        trust: key.public().to_string(),
        nodes: Vec::new(),
    })
}

impl OwnServer {
    /// The testkit library its bundle was built from.
    pub(crate) fn library(&self) -> Result<Vec<u8>> {
        let path = crate::args::shipped_library("testkit")?;
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// The throwaway key its bundles are signed with.
    pub(crate) fn key(&self) -> Result<signing::SecretKey> {
        crate::bundle_cmd::load_key(&self.dir.join("bench.key"))
    }

    /// Starts `count` nodes with the `bench` capability and waits (up to
    /// 30 s) until they are connected.
    async fn start_nodes(&mut self, client: &Client, count: usize) -> Result<()> {
        let token = client
            .post(
                "/v1/tokens",
                &json!({ "name": "bench-nodes", "scopes": ["join"], "join": { "max_uses": u32::MAX } }),
            )
            .await?;
        let token_file = self.dir.join("join.token");
        std::fs::write(&token_file, token["token"].as_str().unwrap_or_default())?;
        let exe = std::env::current_exe()?;
        for i in 0..count {
            let child = Command::new(&exe)
                .args(["node", "--server", &self.url, "--trust", &self.trust])
                .args([
                    "--name",
                    &format!("bench-node-{i}"),
                    "--capability",
                    "bench=yes",
                ])
                .arg("--token-file")
                .arg(&token_file)
                .arg("--data-dir")
                .arg(self.dir.join(format!("node-{i}")))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting troupe node")?;
            self.nodes.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list = client.get("/v1/nodes", &[]).await?;
            let up = list["nodes"]
                .as_array()
                .map_or(0, |n| n.iter().filter(|n| n["connected"] == true).count());
            if up >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {up} of {count} bench nodes connected within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// CPU seconds and peak RSS of a process and its children, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub(crate) server_cpu: f64,
    hosts_cpu: f64,
    pub(crate) server_rss: u64,
    hosts_rss: u64,
}

// Linux reports /proc times in USER_HZ, which is 100 on every architecture's ABI.
const TICKS: f64 = 100.0;

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields start after its ')'.
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .map_or(0, |kb: u64| kb * 1024)
}

pub(crate) fn usage(pid: u32) -> Usage {
    let cpu = |f: &[String], from: usize| -> f64 {
        f[from..from + 2]
            .iter()
            .filter_map(|v| v.parse::<f64>().ok())
            .sum::<f64>()
            / TICKS
    };
    let mut u = Usage::default();
    if let Some(f) = stat_fields(pid) {
        // utime, stime at 11, 12; cutime, cstime (reaped children: exited hosts) at 13, 14.
        u.server_cpu = cpu(&f, 11);
        u.hosts_cpu = cpu(&f, 13);
        u.server_rss = peak_rss(pid);
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat_fields(child)
            && f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid)
        {
            u.hosts_cpu += cpu(&f, 11);
            u.hosts_rss += peak_rss(child);
        }
    }
    u
}

struct Run {
    seconds: f64,
    latencies: Vec<f64>,
    /// Each succeeded step's time from its start to its result, as the
    /// server recorded them (ms): the start's commit and the call.
    steps: Vec<f64>,
    failed: usize,
    missing: usize,
}

/// Runs `n` actions with `c` in flight; each worker submits with `wait`,
/// which answers when the action is finished (long-polling on if it is not).
async fn run(
    client: Arc<Client>,
    kind: &str,
    n: usize,
    c: usize,
    deadline: Instant,
    label: &str,
) -> Result<Run> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..c.max(1) {
        let (client, next, kind, label) = (
            client.clone(),
            next.clone(),
            kind.to_owned(),
            label.to_owned(),
        );
        workers.push(tokio::spawn(async move {
            let (mut lat, mut steps) = (Vec::new(), Vec::new());
            let (mut failed, mut missing) = (0, 0);
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n || Instant::now() > deadline {
                    break;
                }
                let t0 = Instant::now();
                let body =
                    json!({ "kind": kind, "target": format!("bench-{label}-{w}"), "params": {} });
                let Ok(mut a) = client.submit_and_wait(&body).await else {
                    missing += 1;
                    continue;
                };
                let id = a["id"].as_i64().unwrap_or_default();
                while !matches!(
                    a["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                ) && Instant::now() < deadline
                {
                    match client
                        .get(&format!("/v1/actions/{id}"), &[("wait", "30s".into())])
                        .await
                    {
                        Ok(v) => a = v,
                        Err(_) => break,
                    }
                }
                match a["status"].as_str() {
                    Some("succeeded") => {
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                        steps.extend(step_times(&a));
                    }
                    Some("failed" | "cancelled") => failed += 1,
                    _ => missing += 1,
                }
            }
            (lat, steps, failed, missing)
        }));
    }
    let mut out = Run {
        seconds: 0.0,
        latencies: Vec::new(),
        steps: Vec::new(),
        failed: 0,
        missing: 0,
    };
    for w in workers {
        let (lat, steps, failed, missing) = w.await?;
        out.latencies.extend(lat);
        out.steps.extend(steps);
        out.failed += failed;
        out.missing += missing;
    }
    out.seconds = started.elapsed().as_secs_f64();
    out.missing += n.saturating_sub(out.latencies.len() + out.failed + out.missing);
    out.latencies.sort_by(|a, b| a.total_cmp(b));
    out.steps.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
}

/// Each step's `finished_at - started_at`, in ms.
fn step_times(action: &Value) -> Vec<f64> {
    let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str()?).ok();
    action["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let took = at(&s["finished_at"])? - at(&s["started_at"])?;
            Some(took.num_microseconds()? as f64 / 1000.0)
        })
        .collect()
}

fn step_json(r: &Run) -> Value {
    json!({ "p50_ms": pct(&r.steps, 0.50), "p99_ms": pct(&r.steps, 0.99) })
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn latency_json(r: &Run) -> Value {
    let l = &r.latencies;
    json!({ "p50_ms": pct(l, 0.50), "p90_ms": pct(l, 0.90), "p99_ms": pct(l, 0.99), "max_ms": l.last().copied().unwrap_or(f64::NAN) })
}

/// Write transactions and rows per action between two `store_stats`.
fn db_per_action(before: Option<(f64, f64)>, after: Option<(f64, f64)>, done: f64) -> Value {
    match (before, after) {
        (Some(b), Some(a)) if done > 0.0 => json!({
            "transactions_per_action": (a.0 - b.0) / done,
            "rows_per_action": (a.1 - b.1) / done,
        }),
        _ => Value::Null,
    }
}

async fn store_stats(client: &Client) -> Option<(f64, f64)> {
    let h = client.get("/v1/health", &[]).await.ok()?;
    Some((
        h["store"]["transactions"].as_f64()?,
        h["store"]["rows_written"].as_f64()?,
    ))
}

pub(crate) async fn bench(args: BenchArgs) -> Result<std::process::ExitCode> {
    if let Some(BenchMode::Fleet(fleet)) = args.mode {
        return crate::fleet::fleet(fleet).await;
    }
    if args.actions == 0 || args.concurrency == 0 {
        bail!("-n and -c must be at least 1");
    }
    if args.nodes > 0 && args.server.is_some() {
        bail!("--nodes starts nodes for the server bench starts; it does not go with --server");
    }
    let mut own = match &args.server {
        Some(_) => None,
        None => Some(start_server(&args.db)?),
    };
    let (url, token) = match (&own, &args.server) {
        // The server it started wrote its first admin token to its data directory.
        (Some(own), _) => (
            own.url.clone(),
            Some(
                std::fs::read_to_string(own.dir.join(crate::args::ADMIN_TOKEN_FILE))
                    .context("reading the benchmark server's admin token")?
                    .trim()
                    .to_owned(),
            ),
        ),
        (None, Some(server)) => {
            let arg = crate::args::ServerArg {
                server: Some(server.clone()),
                profile: None,
                token: std::env::var("TROUPE_TOKEN").ok(),
                token_file: args.token_file.clone(),
                ca_cert: std::env::var_os("TROUPE_CA_CERT").map(PathBuf::from),
            };
            (server.clone(), arg.token()?)
        }
        (None, None) => unreachable!("bench starts a server unless --server is given"),
    };
    let client = Arc::new(Client::new(&url, token)?);
    let deadline = Instant::now() + args.timeout;
    if let Some(own) = own.as_mut()
        && args.nodes > 0
    {
        own.start_nodes(&client, args.nodes).await?;
    }
    let pid = own.as_ref().map(|s| s.child.id());

    // Warm up: start the step host and the connection pool.
    run(
        client.clone(),
        &args.kind,
        args.concurrency.min(16),
        args.concurrency.min(16),
        deadline,
        "warmup",
    )
    .await?;

    let before_db = store_stats(&client).await;
    let before = pid.map(usage);
    let loaded = run(
        client.clone(),
        &args.kind,
        args.actions,
        args.concurrency,
        deadline,
        "load",
    )
    .await?;
    let after = pid.map(usage);
    let after_db = store_stats(&client).await;
    let light = if args.light > 0 {
        Some(run(client.clone(), &args.kind, args.light, 1, deadline, "light").await?)
    } else {
        None
    };

    let done = loaded.latencies.len() as f64;
    let per_k = |secs: f64| {
        if done > 0.0 {
            secs * 1000.0 / done * 1000.0
        } else {
            f64::NAN
        }
    };
    let cpu = match (before, after) {
        (Some(b), Some(a)) => json!({
            "total_ms_per_1000": per_k((a.server_cpu - b.server_cpu) + (a.hosts_cpu - b.hosts_cpu)),
            "server_ms_per_1000": per_k(a.server_cpu - b.server_cpu),
            "step_hosts_ms_per_1000": per_k(a.hosts_cpu - b.hosts_cpu),
        }),
        _ => Value::Null,
    };
    let rss = after.map_or(Value::Null, |a| {
        json!({ "total_mb": (a.server_rss + a.hosts_rss) as f64 / 1e6, "server_mb": a.server_rss as f64 / 1e6, "step_hosts_mb": a.hosts_rss as f64 / 1e6 })
    });
    let db = if own.is_some() {
        db_per_action(before_db, after_db, done)
    } else {
        Value::Null
    };
    let report = json!({
        "kind": args.kind,
        "actions": args.actions,
        "concurrency": args.concurrency,
        "database": if args.server.is_some() { "(remote server)".to_owned() } else { args.db.split('@').next_back().unwrap_or("").to_owned() },
        "throughput_per_s": done / loaded.seconds,
        "seconds": loaded.seconds,
        "latency": latency_json(&loaded),
        "light_latency": light.as_ref().map(latency_json),
        "light_step": light.as_ref().map(step_json),
        "cpu": cpu,
        "peak_rss": rss,
        "db": db,
        "failed": loaded.failed + light.as_ref().map_or(0, |l| l.failed),
        "missing": loaded.missing + light.as_ref().map_or(0, |l| l.missing),
    });
    let mut report = report;
    if args.nodes > 0 {
        // The same workload, its steps on the nodes.
        let kind = &args.remote_kind;
        let c = args.concurrency.min(16);
        run(client.clone(), kind, c, c, deadline, "remote-warmup").await?;
        let before = pid.map(usage);
        let before_db = store_stats(&client).await;
        let loaded = run(
            client.clone(),
            kind,
            args.actions,
            args.concurrency,
            deadline,
            "remote",
        )
        .await?;
        let after = pid.map(usage);
        let after_db = store_stats(&client).await;
        let light = if args.light > 0 {
            Some(
                run(
                    client.clone(),
                    kind,
                    args.light,
                    1,
                    deadline,
                    "remote-light",
                )
                .await?,
            )
        } else {
            None
        };
        let done = loaded.latencies.len() as f64;
        // The server's own work per remote action: on a real fleet the
        // nodes and their step hosts run elsewhere.
        let server_cpu = match (before, after) {
            (Some(b), Some(a)) if done > 0.0 => {
                json!((a.server_cpu - b.server_cpu) * 1000.0 / done * 1000.0)
            }
            _ => Value::Null,
        };
        let failed = loaded.failed + light.as_ref().map_or(0, |l| l.failed);
        let missing = loaded.missing + light.as_ref().map_or(0, |l| l.missing);
        report["remote"] = json!({
            "kind": kind,
            "nodes": args.nodes,
            "throughput_per_s": done / loaded.seconds,
            "seconds": loaded.seconds,
            "latency": latency_json(&loaded),
            "light_latency": light.as_ref().map(latency_json),
            "light_step": light.as_ref().map(step_json),
            "server_cpu_ms_per_1000": server_cpu,
            "db": db_per_action(before_db, after_db, done),
            "failed": failed,
            "missing": missing,
        });
        report["failed"] = json!(report["failed"].as_u64().unwrap_or(0) + failed as u64);
        report["missing"] = json!(report["missing"].as_u64().unwrap_or(0) + missing as u64);
    }
    let bad = report["failed"].as_u64().unwrap_or(0) + report["missing"].as_u64().unwrap_or(0);
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    drop(own);
    Ok(if bad == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("n/a".to_owned(), |x| format!("{x:.2}"));
    println!(
        "troupe bench: {} × {}, {} in flight, database {}",
        r["actions"],
        r["kind"].as_str().unwrap_or(""),
        r["concurrency"],
        r["database"].as_str().unwrap_or("")
    );
    println!(
        "  throughput               {} actions/s ({} s)",
        f(&r["throughput_per_s"]),
        f(&r["seconds"])
    );
    let step = |l: &Value| {
        format!(
            "p50 {} ms  p99 {} ms  (start committed to result, as the server recorded it)",
            f(&l["p50_ms"]),
            f(&l["p99_ms"])
        )
    };
    let lat = |l: &Value| {
        format!(
            "p50 {} ms  p90 {} ms  p99 {} ms  max {} ms",
            f(&l["p50_ms"]),
            f(&l["p90_ms"]),
            f(&l["p99_ms"]),
            f(&l["max_ms"])
        )
    };
    println!(
        "  latency (C={:<3})          {}",
        r["concurrency"],
        lat(&r["latency"])
    );
    if !r["light_latency"].is_null() {
        println!("  latency (C=1)            {}", lat(&r["light_latency"]));
        println!("  step (C=1)               {}", step(&r["light_step"]));
    }
    let c = &r["cpu"];
    println!(
        "  CPU per 1000 actions     {} ms (server {} ms, step hosts {} ms)",
        f(&c["total_ms_per_1000"]),
        f(&c["server_ms_per_1000"]),
        f(&c["step_hosts_ms_per_1000"])
    );
    let m = &r["peak_rss"];
    println!(
        "  peak RSS                 {} MB (server {} MB, step hosts {} MB)",
        f(&m["total_mb"]),
        f(&m["server_mb"]),
        f(&m["step_hosts_mb"])
    );
    let d = &r["db"];
    println!(
        "  DB per action            {} write transactions, {} rows",
        f(&d["transactions_per_action"]),
        f(&d["rows_per_action"])
    );
    let remote = &r["remote"];
    if !remote.is_null() {
        println!(
            "  remote ({} on {} nodes)  {} actions/s; C={}: {}",
            remote["kind"].as_str().unwrap_or(""),
            remote["nodes"],
            f(&remote["throughput_per_s"]),
            r["concurrency"],
            lat(&remote["latency"])
        );
        if !remote["light_latency"].is_null() {
            println!(
                "  remote latency (C=1)     {}",
                lat(&remote["light_latency"])
            );
            println!("  remote step (C=1)        {}", step(&remote["light_step"]));
            let extra = remote["light_step"]["p50_ms"].as_f64().unwrap_or(f64::NAN)
                - r["light_step"]["p50_ms"].as_f64().unwrap_or(f64::NAN);
            println!("  remote step round trip   +{extra:.3} ms over a local step (p50)");
            println!(
                "  remote server CPU        {} ms per 1000 actions (the server alone; nodes and their step hosts run elsewhere on a real fleet)",
                f(&remote["server_cpu_ms_per_1000"])
            );
            println!(
                "  remote DB per action     {} write transactions, {} rows",
                f(&remote["db"]["transactions_per_action"]),
                f(&remote["db"]["rows_per_action"])
            );
        }
    }
    println!(
        "  failed or missing        {} failed, {} missing",
        r["failed"], r["missing"]
    );
}
