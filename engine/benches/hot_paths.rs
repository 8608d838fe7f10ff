//! Micro-benchmarks of the engine's hot paths: an actor `tell` and `ask`, and
//! a step-host round trip for a no-op step. The round trip needs the troupe
//! binary and the testkit plugin built next to this benchmark
//! (`cargo build --release` first).

use std::path::PathBuf;
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
