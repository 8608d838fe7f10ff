//! `troupe bench fleet`: one process plays K nodes against a server the
//! bench starts, each with its own node key and its own authenticated
//! connection, to measure what a large fleet costs the app server: memory
//! and idle CPU with K nodes connected, how fast a node that stops
//! answering is noticed (and that no live one is dropped) while steps run
//! on the fleet, and what the server sends when many nodes need a new
//! bundle version. A simulated node answers each call at once, so the
//! figures are the server's and the connection's, not a step's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use node_protocol::{FromNode, PROTOCOL, ToNode};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::args::parse_duration;
use crate::bench::{OwnServer, pct, start_server, usage};
use crate::client::Client;

#[derive(Args)]
pub(crate) struct FleetArgs {
    /// Simulated nodes.
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    /// How long the steady phase lasts: one node at a time stops answering
    /// and is timed until the server drops it, while steps run on the fleet.
    #[arg(long = "for", default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// How often a node stops answering during the steady phase.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    lose_every: Duration,
    /// Actions per second submitted during the steady phase (noop3_remote, placed on the fleet).
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// How many nodes download a new bundle version at the end; 0 skips it.
    #[arg(long, default_value_t = 1000)]
    pull: usize,
    /// That bundle's size, in MB.
    #[arg(long, default_value_t = 10)]
    bundle_mb: usize,
    /// Database for the server the bench starts: `sqlite` or a mysql:// URL (an empty database).
    #[arg(long, default_value = "sqlite")]
    db: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// What a simulated node is told to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Connected, answering pings and calls.
    Live,
    /// Stops reading its connection, as a stopped process or a cut cable.
    Frozen,
    /// The run is over.
    Stop,
}

/// One simulated node, as the orchestrator sees it.
struct Sim {
    name: String,
    mode: watch::Sender<Mode>,
    /// The session credential of its current connection.
    session: Arc<std::sync::Mutex<Option<String>>>,
}

/// Counters shared by every simulated node.
#[derive(Default)]
struct Tally {
    connected: AtomicUsize,
    /// Connections that ended while their node was live and the run was on.
    false_drops: AtomicUsize,
    calls: AtomicU64,
}

pub(crate) async fn fleet(args: FleetArgs) -> Result<std::process::ExitCode> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let own = start_server(&args.db)?;
    let token = std::fs::read_to_string(own.dir.join(crate::args::ADMIN_TOKEN_FILE))
        .context("reading the benchmark server's admin token")?
        .trim()
        .to_owned();
    let client = Arc::new(Client::new(&own.url, Some(token))?);
    let join = client
        .post(
            "/v1/tokens",
            &json!({ "name": "fleet", "scopes": ["join"], "join": { "max_uses": u32::MAX } }),
        )
        .await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let pid = own.child.id();
    let tally = Arc::new(Tally::default());
    let addr = own.url.trim_start_matches("http://").to_owned();

    // Join: K connections, at most 256 handshakes at a time.
    let started = Instant::now();
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut sims = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let mut node_seed = seed;
        node_seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let name = format!("sim-{i}");
        let (mode, rx) = watch::channel(Mode::Live);
        let session = Arc::new(std::sync::Mutex::new(None));
        let node = SimNode {
            name: name.clone(),
            key: signing::SecretKey::from_seed(node_seed),
            addr: addr.clone(),
            join: join.clone(),
            session: session.clone(),
            tally: tally.clone(),
            gate: gate.clone(),
        };
        tokio::spawn(node.run(rx));
        sims.push(Sim {
            name,
            mode,
            session,
        });
    }
    let deadline = Instant::now() + Duration::from_secs(120) + args.duration;
    while tally.connected.load(Ordering::Relaxed) < args.nodes {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} simulated nodes connected",
                tally.connected.load(Ordering::Relaxed),
                args.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let joined_in = started.elapsed();
    let listed = client.get("/v1/nodes", &[]).await?;
    let server_sees = listed["nodes"]
        .as_array()
        .map_or(0, |n| n.iter().filter(|n| n["connected"] == true).count());

    // Idle: K nodes connected, nothing to do but heartbeats.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_window = Duration::from_secs(10);
    let before = usage(pid);
    tokio::time::sleep(idle_window).await;
    let after = usage(pid);
    let idle_cpu = (after.server_cpu - before.server_cpu) / idle_window.as_secs_f64();
    let idle_rss = current_rss(pid);

    // Steady: steps on the fleet; one node at a time stops answering.
    let submitted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let steady_until = Instant::now() + args.duration;
    let load = {
        let (client, submitted) = (client.clone(), submitted.clone());
        let rate = args.rate.max(1);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            let mut i = 0u64;
            while Instant::now() < steady_until {
                tick.tick().await;
                let body = json!({ "kind": "noop3_remote", "target": format!("fleet-{}", i % 64), "params": {} });
                if let Ok(a) = client.submit(&body, Duration::ZERO).await
                    && let Some(id) = a["id"].as_i64()
                {
                    submitted.lock().unwrap().push(id);
                }
                i += 1;
            }
        })
    };
    let mut detections = Vec::new();
    let mut undetected = 0;
    let mut pick = u64::from_le_bytes(seed[8..16].try_into().unwrap());
    while Instant::now() + args.lose_every < steady_until {
        tokio::time::sleep(args.lose_every).await;
        pick = pick
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let sim = &sims[(pick >> 33) as usize % sims.len()];
        sim.mode.send_replace(Mode::Frozen);
        let frozen_at = Instant::now();
        let within = Duration::from_secs(30);
        let mut dropped = false;
        while frozen_at.elapsed() < within {
            let n = client.get(&format!("/v1/nodes/{}", sim.name), &[]).await?;
            if n["connected"] == false {
                dropped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if dropped {
            detections.push(frozen_at.elapsed().as_secs_f64());
        } else {
            undetected += 1;
        }
        sim.mode.send_replace(Mode::Live);
    }
    load.await?;
    let steady_rss = current_rss(pid);
    let ids = submitted.lock().unwrap().clone();
    let (mut succeeded, mut failed) = (0, 0);
    for id in &ids {
        let a = client
            .get(&format!("/v1/actions/{id}"), &[("wait", "30s".into())])
            .await?;
        match a["status"].as_str() {
            Some("succeeded") => succeeded += 1,
            _ => failed += 1,
        }
    }

    // A new bundle version, needed by `pull` nodes at once.
    let pull = if args.pull > 0 {
        Some(pull(&own, &client, &sims, &args).await?)
    } else {
        None
    };
    let peak_rss = usage(pid).server_rss;
    for sim in &sims {
        sim.mode.send_replace(Mode::Stop);
    }

    detections.sort_by(|a, b| a.total_cmp(b));
    let report = json!({
        "nodes": args.nodes,
        "joined_s": joined_in.as_secs_f64(),
        "server_lists_connected": server_sees,
        "idle": {
            "server_cpu_share_of_one_core": idle_cpu,
            "server_rss_mb": idle_rss as f64 / 1e6,
        },
        "steady": {
            "seconds": args.duration.as_secs_f64(),
            "actions": ids.len(),
            "succeeded": succeeded,
            "failed": failed,
            "calls_answered": tally.calls.load(Ordering::Relaxed),
            "nodes_lost": detections.len() + undetected,
            "detected_p50_s": pct(&detections, 0.50),
            "detected_p99_s": pct(&detections, 0.99),
            "detected_max_s": detections.last().copied().unwrap_or(f64::NAN),
            "undetected": undetected,
            "false_drops": tally.false_drops.load(Ordering::Relaxed),
            "server_rss_mb": steady_rss as f64 / 1e6,
        },
        "pull": pull,
        "server_peak_rss_mb": peak_rss as f64 / 1e6,
    });
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    let bad = failed > 0 || undetected > 0 || tally.false_drops.load(Ordering::Relaxed) > 0;
    drop(own);
    Ok(if bad {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

/// Pushes a new version of the bench bundle padded to `bundle_mb`, and has
/// `pull` simulated nodes download it (bytes and signature) at once, as
/// they would on their first call for it.
async fn pull(own: &OwnServer, client: &Client, sims: &[Sim], args: &FleetArgs) -> Result<Value> {
    let mut library = own.library()?;
    let manifest = include_str!("../../steps/testkit/bundle.toml").replacen(
        "version = \"0.1.0\"",
        "version = \"0.1.1\"",
        1,
    );
    let plain = engine::bundle::build(&manifest, &[(engine::bundle::TARGET, &library)])?;
    // Padded with noise (incompressible) to the size asked for.
    let mut noise = vec![0u8; (args.bundle_mb * 1_000_000).saturating_sub(plain.len())];
    getrandom::fill(&mut noise).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    library.extend_from_slice(&noise);
    let bytes = engine::bundle::build(&manifest, &[(engine::bundle::TARGET, &library)])?;
    let size = bytes.len();
    let signature = crate::bundle_cmd::sign(&bytes, &own.key()?)?.to_text();
    let (_, pushed) = client.push(bytes, signature).await?;
    let hash = pushed["hash"].as_str().unwrap_or_default().to_owned();
    let before = usage(own.child.id());
    let http = reqwest::Client::new();
    let base = own.url.clone();
    let started = Instant::now();
    let mut downloads = Vec::new();
    for sim in sims.iter().take(args.pull) {
        let session = sim.session.lock().unwrap().clone().unwrap_or_default();
        let (http, base, hash) = (http.clone(), base.clone(), hash.clone());
        downloads.push(tokio::spawn(async move {
            let mut got = 0u64;
            for path in [
                format!("/v1/nodes/bundles/{hash}"),
                format!("/v1/nodes/bundles/{hash}/signature"),
            ] {
                let resp = http
                    .get(format!("{base}{path}"))
                    .bearer_auth(&session)
                    .send()
                    .await?
                    .error_for_status()?;
                got += resp.bytes().await?.len() as u64;
            }
            Ok::<_, reqwest::Error>(got)
        }));
    }
    let mut received = 0u64;
    let mut failed = 0;
    for d in downloads {
        match d.await? {
            Ok(n) => received += n,
            Err(_) => failed += 1,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = usage(own.child.id());
    Ok(json!({
        "nodes": args.pull,
        "bundle_bytes": size,
        "bytes_sent": received,
        "failed": failed,
        "seconds": seconds,
        "server_cpu_s": after.server_cpu - before.server_cpu,
    }))
}

/// A simulated node: its own key and connection; answers every call at once.
struct SimNode {
    name: String,
    key: signing::SecretKey,
    addr: String,
    join: String,
    session: Arc<std::sync::Mutex<Option<String>>>,
    tally: Arc<Tally>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl SimNode {
    async fn run(self, mut mode: watch::Receiver<Mode>) {
        loop {
            if *mode.borrow() == Mode::Stop {
                return;
            }
            let permit = self.gate.acquire().await;
            let ws = self.join().await;
            drop(permit);
            let mut ws = match ws {
                Ok(ws) => ws,
                Err(e) => {
                    tracing::debug!(node = %self.name, error = %e, "could not connect; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            self.tally.connected.fetch_add(1, Ordering::Relaxed);
            let ended = self.serve(&mut ws, &mut mode).await;
            self.tally.connected.fetch_sub(1, Ordering::Relaxed);
            match ended {
                Mode::Stop => return,
                Mode::Live => {
                    self.tally.false_drops.fetch_add(1, Ordering::Relaxed);
                }
                Mode::Frozen => {
                    // Thawed: its old connection is gone; connect again.
                    let _ = mode.wait_for(|m| *m != Mode::Frozen).await;
                }
            }
        }
    }

    async fn join(&self) -> Result<Ws> {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{}/v1/nodes/connect", self.addr),
            )?;
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {}", self.join).parse()?);
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
        let nonce = match next(&mut ws).await? {
            ToNode::Challenge { nonce, .. } => nonce,
            other => bail!("expected a challenge, got {other:?}"),
        };
        let hello = FromNode::Hello {
            name: self.name.clone(),
            public_key: self.key.public().to_string(),
            answer: signing::node::answer(&self.key, &nonce, &self.name),
            capabilities: [("bench".to_owned(), "sim".to_owned())].into(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: PROTOCOL,
            uptime_ms: 0,
        };
        ws.send(Message::text(serde_json::to_string(&hello)?))
            .await?;
        match next(&mut ws).await? {
            ToNode::Welcome { session, .. } => *self.session.lock().unwrap() = Some(session),
            other => bail!("expected a welcome, got {other:?}"),
        }
        let holding = FromNode::Holding {
            keys: Vec::new(),
            acked: Vec::new(),
        };
        ws.send(Message::text(serde_json::to_string(&holding)?))
            .await?;
        Ok(ws)
    }

    /// Serves one connection until it ends; returns what the node was told
    /// to be when it did.
    async fn serve(&self, ws: &mut Ws, mode: &mut watch::Receiver<Mode>) -> Mode {
        let mut heartbeat = tokio::time::interval(node_protocol::HEARTBEAT);
        loop {
            let now = *mode.borrow_and_update();
            match now {
                Mode::Stop => return Mode::Stop,
                // Reads nothing, answers nothing, until told otherwise.
                Mode::Frozen => {
                    heartbeat.reset();
                    let _ = mode.changed().await;
                    if *mode.borrow() == Mode::Live {
                        // The server has dropped it by now (or will): the
                        // connection is not trusted again.
                        return Mode::Frozen;
                    }
                    continue;
                }
                Mode::Live => {}
            }
            tokio::select! {
                message = ws.next() => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(_)) => continue,
                        _ => return *mode.borrow(),
                    };
                    if let Ok(ToNode::Call { key, .. }) = serde_json::from_str::<ToNode>(&text) {
                        self.tally.calls.fetch_add(1, Ordering::Relaxed);
                        let done = FromNode::Done { key, status: 0, body: "{}".into(), log: String::new() };
                        let text = serde_json::to_string(&done).expect("serializes");
                        if ws.send(Message::text(text)).await.is_err() {
                            return *mode.borrow();
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if ws.send(Message::Pong(Default::default())).await.is_err() {
                        return *mode.borrow();
                    }
                }
                _ = mode.changed() => {}
            }
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next(ws: &mut Ws) -> Result<ToNode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Ok(serde_json::from_str(&text)?),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => bail!("the server closed the connection"),
            Err(_) => bail!("the server said nothing for 30 s"),
        }
    }
}

/// A process's resident memory now, from /proc.
fn current_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .map_or(0, |kb: u64| kb * 1024)
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("n/a".to_owned(), |x| format!("{x:.2}"));
    let s = &r["steady"];
    println!("troupe bench fleet: {} simulated nodes", r["nodes"]);
    println!(
        "  joined                   {} s ({} listed connected)",
        f(&r["joined_s"]),
        r["server_lists_connected"]
    );
    println!(
        "  idle                     server CPU {} % of a core, RSS {} MB",
        f(&json!(
            r["idle"]["server_cpu_share_of_one_core"]
                .as_f64()
                .unwrap_or(f64::NAN)
                * 100.0
        )),
        f(&r["idle"]["server_rss_mb"])
    );
    println!(
        "  steady ({} s)            {} actions ({} failed), {} calls answered, server RSS {} MB",
        f(&s["seconds"]),
        s["actions"],
        s["failed"],
        s["calls_answered"],
        f(&s["server_rss_mb"])
    );
    println!(
        "  lost nodes detected      {} of {}: p50 {} s  p99 {} s  max {} s; {} live nodes dropped",
        s["nodes_lost"].as_u64().unwrap_or(0) - s["undetected"].as_u64().unwrap_or(0),
        s["nodes_lost"],
        f(&s["detected_p50_s"]),
        f(&s["detected_p99_s"]),
        f(&s["detected_max_s"]),
        s["false_drops"]
    );
    let p = &r["pull"];
    if !p.is_null() {
        println!(
            "  new bundle ({} bytes) to {} nodes: {} bytes sent in {} s ({} failed), server CPU {} s",
            p["bundle_bytes"],
            p["nodes"],
            p["bytes_sent"],
            f(&p["seconds"]),
            p["failed"],
            f(&p["server_cpu_s"])
        );
    }
    println!(
        "  server peak RSS          {} MB",
        f(&r["server_peak_rss_mb"])
    );
}
