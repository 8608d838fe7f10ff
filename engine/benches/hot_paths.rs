//! Micro-benchmarks of the engine's hot paths: an actor `tell` and `ask`, and
//! a step-host round trip for a no-op step. The round trip needs the troupe
//! binary and the testkit plugin built next to this benchmark
//! (`cargo build --release` first).

use std::path::PathBuf;

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

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agency = rt.block_on(async { AgencyProbe::spawn(host_command()) });
    let mut g = c.benchmark_group("actor");
    g.bench_function("tell", |b| b.iter(|| agency.tell()));
    g.bench_function("ask", |b| b.to_async(&rt).iter(|| agency.ask()));
    g.finish();

    let library = target_dir().join("libtestkit.so");
    if !library.is_file() || !target_dir().join("troupe").is_file() {
        eprintln!(
            "skipping the step-host round trip: build the workspace first (cargo build --release)"
        );
        return;
    }
    let host = rt
        .block_on(HostProbe::spawn(&host_command(), &library))
        .unwrap();
    let input = br#"{"action":{"id":1,"kind":"noop3","target":"t","params":{}},"settings":{},"outputs":{},"attempt":1}"#;
    let mut g = c.benchmark_group("step_host");
    g.bench_function("noop_round_trip", |b| {
        b.to_async(&rt).iter(|| async {
            assert!(host.call("noop", input).await);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
