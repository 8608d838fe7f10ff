//! `troupe bundle new NAME`: a step crate to start from, with a typed step,
//! a kind, a unit test and a harness test, that builds as it is.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The files of a new step crate, with `@NAME@`, `@LIB@` and `@TROUPE@`
/// to fill in.
const FILES: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../scaffold/Cargo.toml.in")),
    ("bundle.toml", include_str!("../scaffold/bundle.toml.in")),
    ("src/lib.rs", include_str!("../scaffold/src/lib.rs.in")),
    (
        "tests/kinds.rs",
        include_str!("../scaffold/tests/kinds.rs.in"),
    ),
    (".gitignore", include_str!("../scaffold/gitignore.in")),
];

/// Where this troupe was built from: the crates a step crate depends on
/// (`steps/sdk`, `steps/test`) are there, until they are published.
fn built_from() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the troupe crate is inside the workspace")
        .to_path_buf()
}

/// Writes a new step crate `name` into `dir` (default `./NAME`).
pub(crate) fn new(name: &str, dir: Option<PathBuf>, troupe: Option<PathBuf>) -> Result<PathBuf> {
    if !is_crate_name(name) {
        bail!(
            "{name:?} cannot name a crate and a bundle: use letters, digits, '-' and '_', starting with a letter (at most 64)"
        );
    }
    let troupe = troupe.unwrap_or_else(built_from);
    for krate in ["steps/sdk", "steps/test"] {
        if !troupe.join(krate).join("Cargo.toml").is_file() {
            bail!(
                "troupe's source is not at {} (no {krate} there), and a step crate depends on its troupe-sdk and troupe-test; \
                 pass --troupe-src with the path of a troupe checkout",
                troupe.display()
            );
        }
    }
    let troupe = troupe
        .canonicalize()
        .with_context(|| format!("resolving {}", troupe.display()))?;
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    if dir.exists()
        && dir
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} already exists and is not empty; choose another name or --dir",
            dir.display()
        );
    }
    let lib = name.replace('-', "_");
    for (path, text) in FILES {
        let text = text
            .replace("@NAME@", name)
            .replace("@LIB@", &lib)
            .replace("@TROUPE@", &troupe.display().to_string());
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("files are in a directory"))
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

fn is_crate_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
