//! `troupe bundle …`: build bundles from a manifest and a compiled plugin.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum BundleCommand {
    /// Build a bundle (format v1) from a manifest and a plugin library.
    Build {
        /// The manifest, e.g. steps/builtin/bundle.toml.
        manifest: PathBuf,
        /// The compiled plugin (cdylib), e.g. target/release/libbuiltin.so.
        #[arg(long)]
        library: PathBuf,
        /// The target triple the library was built for [default: this troupe's]
        #[arg(long)]
        target: Option<String>,
        /// Where to write the bundle [default: NAME-VERSION.bundle]
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Check a bundle file and print its manifest summary and hash.
    Inspect { bundle: PathBuf },
}

pub(crate) fn run(cmd: BundleCommand) -> Result<ExitCode> {
    match cmd {
        BundleCommand::Build {
            manifest,
            library,
            target,
            out,
        } => {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            let lib = std::fs::read(&library)
                .with_context(|| format!("reading {}", library.display()))?;
            let target = target.unwrap_or_else(|| engine::bundle::TARGET.to_owned());
            let bytes = engine::bundle::build(&text, &[(&target, &lib)])
                .with_context(|| format!("in {}", manifest.display()))?;
            let m = engine::bundle::Manifest::parse(&text)?;
            let out =
                out.unwrap_or_else(|| PathBuf::from(format!("{}-{}.bundle", m.name, m.version)));
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}  {} ({} {}, {} kinds, {} bytes)",
                engine::BundleHash::of(&bytes),
                out.display(),
                m.name,
                m.version,
                m.kinds.len(),
                bytes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Inspect { bundle } => {
            let bytes =
                std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let dir = std::env::temp_dir().join(format!("troupe-inspect-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let result = engine::bundle::open(&bytes, &dir);
            let _ = std::fs::remove_dir_all(&dir);
            let u = result?;
            println!("hash     {}", u.hash);
            println!(
                "bundle   {} {} (ABI {})",
                u.manifest.name, u.manifest.version, u.manifest.abi
            );
            for (name, k) in &u.manifest.kinds {
                let steps: Vec<&str> = k.steps.iter().map(|s| s.name()).collect();
                println!("kind     {name}: {}", steps.join(" → "));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
