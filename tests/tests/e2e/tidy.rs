//! Checks on the workspace itself: dependencies point one way.

use crate::harness::workspace;

/// Which dependency tables count: what a crate links in normal use, and
/// everything, tests and build scripts too.
#[derive(Clone, Copy, PartialEq)]
enum Tables {
    Normal,
    All,
}

/// The crates `krate` depends on (by package name, renames undone), from
/// `[dependencies]`, and with `Tables::All` also `[dev-dependencies]` and
/// `[build-dependencies]`, each also under `[target.'cfg(…)']`; sorted.
fn deps(krate: &str, tables: Tables) -> Vec<String> {
    let read = |path: std::path::PathBuf| -> toml::Table {
        std::fs::read_to_string(path).unwrap().parse().unwrap()
    };
    let manifest = read(workspace().join(krate).join("Cargo.toml"));
    let root = read(workspace().join("Cargo.toml"));
    let shared = &root["workspace"]["dependencies"];
    let names: &[&str] = match tables {
        Tables::Normal => &["dependencies"],
        Tables::All => &["dependencies", "dev-dependencies", "build-dependencies"],
    };
    let mut sections: Vec<&toml::Table> = Vec::new();
    let targets = manifest.get("target").and_then(|t| t.as_table());
    for within in std::iter::once(&manifest).chain(
        targets
            .into_iter()
            .flat_map(|t| t.values().filter_map(|v| v.as_table())),
    ) {
        for name in names {
            if let Some(t) = within.get(*name).and_then(|d| d.as_table()) {
                sections.push(t);
            }
        }
    }
    let mut out: Vec<String> = sections
        .into_iter()
        .flat_map(|t| t.iter())
        .map(|(key, spec)| {
            // `package = "…"` renames, here or in the workspace's table.
            let inherited = spec.get("workspace").and_then(|w| w.as_bool()) == Some(true);
            let package = spec.get("package").or_else(|| {
                inherited
                    .then(|| shared.get(key).and_then(|s| s.get("package")))
                    .flatten()
            });
            package.and_then(|p| p.as_str()).unwrap_or(key).to_owned()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

const OURS: &[&str] = &[
    "api",
    "engine",
    "signing",
    "troupe-sdk",
    "troupe-bundle",
    "troupe-test",
    "node",
    "node-protocol",
    "builtin",
    "testkit",
    "troupe",
];

/// Crates that speak HTTP or WebSocket, as a server or a client.
const HTTP: &[&str] = &[
    "axum",
    "axum-server",
    "hyper",
    "hyper-util",
    "reqwest",
    "tokio-tungstenite",
    "tungstenite",
    "tower-http",
    "ureq",
    "utoipa-axum",
];

#[test]
fn dependencies_point_one_way() {
    let ours = |krate: &str, tables: Tables| {
        deps(krate, tables)
            .into_iter()
            .filter(|d| OURS.contains(&d.as_str()))
            .collect::<Vec<_>>()
    };
    let signing = ours("signing", Tables::All);
    assert!(
        signing.is_empty(),
        "signing depends on no troupe crate: {signing:?}"
    );
    let sdk = ours("steps/sdk", Tables::All);
    assert!(
        sdk.is_empty(),
        "the SDK depends on no troupe crate: {sdk:?}"
    );
    assert_eq!(
        ours("steps/bundle", Tables::All),
        ["troupe-sdk"],
        "what a bundle means depends only on the SDK"
    );
    assert_eq!(
        ours("steps/test", Tables::All),
        ["troupe-bundle", "troupe-sdk"],
        "the harness runs steps without the engine"
    );
    for plugins in ["steps/builtin", "steps/testkit"] {
        assert_eq!(ours(plugins, Tables::Normal), ["troupe-sdk"], "{plugins}");
        assert_eq!(
            ours(plugins, Tables::All),
            ["troupe-sdk", "troupe-test"],
            "{plugins} is tested with the harness, not the engine"
        );
    }
    let engine = deps("engine", Tables::All);
    let http: Vec<&String> = engine
        .iter()
        .filter(|d| d.as_str() == "api" || HTTP.contains(&d.as_str()))
        .collect();
    assert!(
        http.is_empty(),
        "the engine knows nothing of HTTP: {http:?}"
    );
    assert!(!ours("api", Tables::All).contains(&"troupe".to_owned()));
}

#[test]
fn dependency_tables_are_all_read() {
    // The plugins' test harness is a dev-dependency; ureq, which builtin's
    // `http_request` uses, is a normal one: both are seen.
    assert!(deps("steps/builtin", Tables::All).contains(&"troupe-test".to_owned()));
    assert!(!deps("steps/builtin", Tables::Normal).contains(&"troupe-test".to_owned()));
    assert!(deps("steps/builtin", Tables::Normal).contains(&"ureq".to_owned()));
}
