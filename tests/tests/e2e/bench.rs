//! `troupe bench` runs end to end on each database and reports every figure.
//! It asserts completeness, never speed.

use crate::harness::{Db, Env, both_dbs, troupe};

/// Runs `troupe ARGS` (a bench with `--json`) and reads its report.
fn report(args: &[&str]) -> serde_json::Value {
    let out = troupe(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

async fn bench_smoke(db: Db) {
    let env = Env::new(db).await;
    let db_arg = match db {
        Db::Sqlite => "sqlite".to_owned(),
        Db::MySql => env.db_url.clone(),
    };
    let r = report(&[
        "bench",
        "-n",
        "20",
        "-c",
        "4",
        "--light",
        "5",
        "--db",
        &db_arg,
        "--json",
        "--timeout",
        "120s",
    ]);
    assert_eq!(
        (r["failed"].as_u64(), r["missing"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    for path in [
        "/throughput_per_s",
        "/latency/p50_ms",
        "/latency/p90_ms",
        "/latency/p99_ms",
        "/latency/max_ms",
        "/light_latency/p50_ms",
        "/light_latency/p99_ms",
        "/cpu/total_ms_per_1000",
        "/cpu/server_ms_per_1000",
        "/cpu/step_hosts_ms_per_1000",
        "/peak_rss/total_mb",
        "/peak_rss/server_mb",
        "/db/transactions_per_action",
        "/db/rows_per_action",
    ] {
        // Every figure was measured: 20 actions and 5 light requests ran,
        // so none can be zero, except CPU time, which the kernel counts in
        // 10 ms ticks (the step hosts of 20 no-op actions may use none).
        let v = r.pointer(path).and_then(|v| v.as_f64());
        let least = if path.starts_with("/cpu/") {
            0.0
        } else {
            f64::MIN_POSITIVE
        };
        assert!(
            v.is_some_and(|v| v.is_finite() && v >= least),
            "{path} missing or zero in {r}"
        );
    }
    let cpu = &r["cpu"];
    let (total, server, hosts) = (
        cpu["total_ms_per_1000"].as_f64().unwrap(),
        cpu["server_ms_per_1000"].as_f64().unwrap(),
        cpu["step_hosts_ms_per_1000"].as_f64().unwrap(),
    );
    assert!(
        (total - server - hosts).abs() < 1e-6,
        "CPU parts do not add up: {r}"
    );
    let (p50, p99) = (
        r["latency"]["p50_ms"].as_f64().unwrap(),
        r["latency"]["p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 <= p99, "percentiles out of order: {r}");

    let table = troupe(&[
        "bench", "-n", "10", "-c", "2", "--light", "0", "--db", &db_arg,
    ]);
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{t}");
    for label in [
        "throughput",
        "latency",
        "CPU per 1000 actions",
        "peak RSS",
        "DB per action",
        "failed or missing",
    ] {
        assert!(t.contains(label), "{label} missing:\n{t}");
    }
}

/// `--nodes`: the same workload with its steps on real `troupe node`
/// processes, reported next to the local run.
#[test]
fn bench_with_nodes_reports_the_remote_run() {
    let r = report(&[
        "bench",
        "-n",
        "20",
        "-c",
        "4",
        "--light",
        "5",
        "--nodes",
        "2",
        "--json",
        "--timeout",
        "120s",
    ]);
    let remote = &r["remote"];
    assert_eq!(remote["nodes"], 2, "{r}");
    assert_eq!(remote["kind"], "noop3_remote", "{r}");
    assert_eq!(
        (remote["failed"].as_u64(), remote["missing"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    for path in [
        "/throughput_per_s",
        "/latency/p50_ms",
        "/light_latency/p50_ms",
        "/light_step/p50_ms",
        "/server_cpu_ms_per_1000",
    ] {
        let v = remote.pointer(path).and_then(|v| v.as_f64());
        assert!(v.is_some_and(|v| v > 0.0), "{path}: {r}");
    }
}

/// `bench fleet`: simulated nodes join, one is lost and detected, steps
/// run on the fleet, and a new bundle is fetched by some of them.
#[test]
fn bench_fleet_reports_every_figure() {
    let r = report(&[
        "bench",
        "fleet",
        "--nodes",
        "30",
        "--for",
        "8s",
        "--lose-every",
        "2s",
        "--rate",
        "5",
        "--pull",
        "4",
        "--bundle-mb",
        "1",
        "--json",
    ]);
    assert_eq!(r["server_lists_connected"], 30, "{r}");
    let steady = &r["steady"];
    assert!(steady["nodes_lost"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(steady["undetected"], 0, "{r}");
    assert_eq!(steady["false_drops"], 0, "{r}");
    assert_eq!(steady["failed"], 0, "{r}");
    assert!(steady["detected_p99_s"].as_f64().is_some(), "{r}");
    let pull = &r["pull"];
    assert_eq!(pull["failed"], 0, "{r}");
    let bundle = pull["bundle_bytes"].as_u64().unwrap();
    assert!(bundle >= 1_000_000, "{r}");
    assert!(
        pull["bytes_sent"].as_u64().unwrap() > 4 * bundle,
        "each node fetched the bundle and its signature: {r}"
    );
    for path in [
        "/idle/server_cpu_share_of_one_core",
        "/idle/server_rss_mb",
        "/server_peak_rss_mb",
    ] {
        let v = r.pointer(path).and_then(|v| v.as_f64());
        assert!(v.is_some_and(|v| v > 0.0), "{path}: {r}");
    }
}

both_dbs!(bench_smoke);
