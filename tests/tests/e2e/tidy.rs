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
    "hardware",
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
    for plugins in ["steps/builtin", "steps/testkit", "steps/hardware"] {
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

/// Panics unless `test` (`module::test` for an end-to-end test, in
/// `tests/tests/e2e/module.rs`, or `path/to/file.rs::test`) exists.
fn assert_test_exists(test: &str, named_for: &str) {
    let (place, name) = test
        .rsplit_once("::")
        .unwrap_or_else(|| panic!("{test:?} is not module::test"));
    let file = if place.contains('/') {
        workspace().join(place)
    } else {
        workspace().join(format!("tests/tests/e2e/{place}.rs"))
    };
    let source = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{test} (for {named_for:?}): {}: {e}", file.display()));
    assert!(
        source.contains(&format!("fn {name}(")),
        "{test}, named for {named_for:?}, is not in {}",
        file.display()
    );
}

/// Each invariant in ARCHITECTURE.md names the tests that hold it
/// (`Held by:`), as each row of its table of README promises does, and
/// each named test exists.
#[test]
fn every_invariant_is_held_by_a_test() {
    let doc = std::fs::read_to_string(workspace().join("ARCHITECTURE.md")).unwrap();
    let start = doc
        .find("\n## Invariants\n")
        .expect("an Invariants section");
    let section = &doc[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    let list = &section[..section.find("\n### ").unwrap_or(section.len())];
    let bullets: Vec<&str> = list.split("\n- ").skip(1).collect();
    assert!(bullets.len() >= 15, "{} invariants found", bullets.len());
    for bullet in bullets {
        let first = bullet.lines().next().unwrap_or_default();
        let held = bullet
            .split_once("Held by:")
            .unwrap_or_else(|| panic!("no `Held by:` for the invariant {first:?}"))
            .1;
        let tests: Vec<&str> = held.split('`').skip(1).step_by(2).collect();
        assert!(!tests.is_empty(), "no test named for {first:?}");
        for test in tests {
            assert_test_exists(test, first);
        }
    }
    let rows: Vec<&str> = section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Promise |") && !l.starts_with("| ---"))
        .collect();
    assert!(rows.len() >= 5, "the table of README promises: {rows:?}");
    for row in rows {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").collect();
        let (promise, held) = (cells[0].trim(), cells[cells.len() - 1]);
        let tests: Vec<&str> = held.split('`').skip(1).step_by(2).collect();
        assert!(!tests.is_empty(), "no test named for {promise:?}");
        for test in tests {
            assert_test_exists(test, promise);
        }
    }
}

/// The engine spawns its long-lived tasks only through `engine/src/tasks.rs`,
/// where each kind declares what its failure means. The exceptions are
/// short-lived tasks whose failure is handled where they are spawned.
#[test]
fn the_engine_spawns_through_tasks() {
    // (file, spawns allowed, why)
    let allowed = [
        (
            "schedule/control.rs",
            2,
            "a runner and its watcher, which abandons the action if the runner dies",
        ),
        (
            "schedule/submit.rs",
            1,
            "the hand-over of one insert, awaited by the submit",
        ),
        (
            "store/nodes.rs",
            1,
            "a look at each database node at once, each awaited by the choice",
        ),
    ];
    let src = workspace().join("engine/src");
    let mut found = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == "tasks.rs" || rel.ends_with("tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests at the end of a file may spawn as they like.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let n = code.matches("tokio::spawn(").count();
            if n > 0 {
                found.push((rel, n));
            }
        }
    }
    found.sort();
    for (file, n) in &found {
        let ok = allowed.iter().any(|(f, m, _)| f == file && m == n);
        assert!(
            ok,
            "engine/src/{file} calls tokio::spawn {n} time(s): spawn through tasks::spawn with a TaskKind, or list it here with why"
        );
    }
}
