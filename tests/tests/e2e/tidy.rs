//! Checks on the workspace itself: dependencies point one way.

use crate::harness::workspace;

fn deps(krate: &str) -> Vec<String> {
    let text = std::fs::read_to_string(workspace().join(krate).join("Cargo.toml")).unwrap();
    let manifest: toml::Table = text.parse().unwrap();
    manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
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

#[test]
fn dependencies_point_one_way() {
    let ours = |krate: &str| {
        deps(krate)
            .into_iter()
            .filter(|d| OURS.contains(&d.as_str()))
            .collect::<Vec<_>>()
    };
    assert!(
        ours("signing").is_empty(),
        "signing depends on no troupe crate"
    );
    assert!(
        ours("steps/sdk").is_empty(),
        "the SDK depends on no troupe crate"
    );
    assert_eq!(
        ours("steps/bundle"),
        ["troupe-sdk"],
        "what a bundle means depends only on the SDK"
    );
    assert_eq!(
        ours("steps/test"),
        ["troupe-bundle", "troupe-sdk"],
        "the harness runs steps without the engine"
    );
    assert_eq!(ours("steps/builtin"), ["troupe-sdk"]);
    assert_eq!(ours("steps/testkit"), ["troupe-sdk"]);
    assert_eq!(ours("steps/hardware"), ["troupe-sdk"]);
    let engine = deps("engine");
    assert!(
        !engine
            .iter()
            .any(|d| ["axum", "api", "reqwest", "hyper"].contains(&d.as_str())),
        "the engine knows nothing of HTTP"
    );
    assert!(!ours("api").contains(&"troupe".to_owned()));
}
