//! Micro-benchmarks of the engine's hot paths: an actor `tell` and `ask`, a
//! step-host round trip for a no-op step, and the cost of one more step in
//! an action. The last two need the troupe binary and the testkit plugin
//! built next to this benchmark (`cargo build --release` first).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use engine::HostCommand;
use engine::bench::{AgencyProbe, HostProbe};

fn target_dir() -> PathBuf {
    // target/release/deps/hot_paths-HASH → target/release
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|p| p.parent()).unwrap().to_path_buf()
}

fn host_command() -> HostCommand {
    HostCommand {
        program: target_dir().join("troupe").into(),
        args: vec!["__step-host".into()],
        watch: None,
    }
}

/// Times `iters` runs of `f` from a task on the runtime, as the engine's own
/// tasks make these calls (timing from the benchmark's thread would add a
/// hand-off between threads to every iteration).
fn on_runtime<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, f: F) -> Duration
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    rt.block_on(async move {
        tokio::spawn(async move {
            let start = Instant::now();
            for _ in 0..iters {
                f().await;
            }
            start.elapsed()
        })
        .await
        .unwrap()
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agency = Arc::new(rt.block_on(async { AgencyProbe::spawn(host_command()) }));
    let mut g = c.benchmark_group("actor");
    g.bench_function("tell", |b| b.iter(|| agency.tell()));
    g.bench_function("ask", |b| {
        b.iter_custom(|iters| {
            let agency = agency.clone();
            on_runtime(&rt, iters, move || {
                let agency = agency.clone();
                async move { assert!(agency.ask().await) }
            })
        })
    });
    g.finish();

    let library = target_dir().join("libtestkit.so");
    if !library.is_file() || !target_dir().join("troupe").is_file() {
        eprintln!(
            "skipping the step-host round trip: build the workspace first (cargo build --release)"
        );
        return;
    }
    let host = Arc::new(
        rt.block_on(HostProbe::spawn(&host_command(), &library))
            .unwrap(),
    );
    let input = br#"{"action":{"id":1,"kind":"noop3","target":"t","params":{}},"settings":{},"outputs":{},"attempt":1}"#;
    let mut g = c.benchmark_group("step_host");
    g.bench_function("noop_round_trip", |b| {
        b.iter_custom(|iters| {
            let host = host.clone();
            on_runtime(&rt, iters, move || {
                let host = host.clone();
                async move { assert!(host.call("noop", input).await) }
            })
        })
    });
    g.finish();

    // The cost of a step: an action of three no-op steps against one of one
    // step, divided by the two extra steps. `step` takes out the time the
    // store spent committing (it counts its own); `step_with_commits` keeps
    // it (SQLite on a RAM-backed directory, so no disk flush either way).
    let probe = Arc::new(
        rt.block_on(EngineProbe::start(
            host_command(),
            include_str!("../../steps/testkit/bundle.toml"),
            &library,
        ))
        .unwrap(),
    );
    let mut g = c.benchmark_group("control");
    for (name, without_db) in [("step", true), ("step_with_commits", false)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut cost = [Duration::ZERO; 2];
                for (i, kind) in ["noop1", "noop3"].into_iter().enumerate() {
                    let committing = probe.commit_time();
                    let p = probe.clone();
                    let elapsed = on_runtime(&rt, iters, move || {
                        let p = p.clone();
                        async move { assert!(p.run(kind).await) }
                    });
                    let db = probe.commit_time() - committing;
                    cost[i] = if without_db {
                        elapsed.saturating_sub(db)
                    } else {
                        elapsed
                    };
                }
                cost[1].saturating_sub(cost[0]) / 2
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

/// A whole engine in this process: real Control, Agency, step host and
/// store (SQLite on a RAM-backed directory where there is one, so no disk
/// flush), with a bundle signed by a throwaway key.
struct EngineProbe {
    engine: engine::Engine,
    dir: std::path::PathBuf,
}

impl EngineProbe {
    /// `manifest` and `library` make the bundle (the testkit's, in the benchmarks).
    async fn start(
        host_command: HostCommand,
        manifest: &str,
        library: &Path,
    ) -> engine::Result<EngineProbe> {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("troupe-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the probe");
        let lib = std::fs::read(library).expect("the testkit plugin, built");
        let bytes = engine::bundle::build(manifest, &[(engine::bundle::TARGET, &lib)])?;
        let key = signing::SecretKey::from_seed([7; 32]);
        let signature = engine::bundle::sign(&bytes, &key, 0)?;
        let engine = engine::Engine::start(engine::Config {
            database_url: format!("sqlite://{}", dir.join("probe.db").display()),
            data_dir: dir.clone(),
            server_id: "probe".into(),
            address: None,
            max_running: 64,
            lease: Duration::from_secs(60),
            cancel_grace: Duration::from_secs(1),
            node_timeout: Duration::from_secs(4),
            node_grace: Duration::from_secs(60),
            host_command,
            trusted_keys: vec![key.public()],
            vars: Default::default(),
            limits: Vec::new(),
            secrets_key: engine::secrets::SecretsKey::generate().expect("randomness"),
            goons: false,
            submit_timeout: Duration::from_secs(10),
        })
        .await?;
        engine
            .admin()
            .admit_bundle(bytes, signature.to_text(), "bench")
            .await?;
        Ok(EngineProbe { engine, dir })
    }

    /// Submits an action of `kind` and waits for it; true if it succeeded.
    async fn run(&self, kind: &str) -> bool {
        let new = engine::model::NewAction {
            kind: kind.into(),
            target: "probe".into(),
            params: Default::default(),
            idempotency_key: None,
            bundle: None,
            submitted_by: None,
        };
        let Ok(submitted) = self
            .engine
            .actions()
            .submit(new, engine::model::MayPin::Active)
            .await
        else {
            return false;
        };
        let id = submitted.action.id;
        matches!(
            self.engine.actions().wait(id, None, Duration::from_secs(30)).await,
            Ok(a) if a.status == engine::model::ActionStatus::Succeeded
        )
    }

    /// Time the store has spent committing so far.
    fn commit_time(&self) -> Duration {
        let micros = self
            .engine
            .store()
            .stats()
            .commit_micros
            .load(std::sync::atomic::Ordering::Relaxed);
        Duration::from_micros(micros)
    }
}

impl Drop for EngineProbe {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
