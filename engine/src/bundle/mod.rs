//! Bundle format v1: a zip holding `manifest.toml` and one plugin library per
//! target triple under `lib/<triple>/`. A bundle is named by the SHA-256 of
//! its bytes. [`open`] checks everything that can be checked without running
//! code; the step host then probes the library's exports (see `crate::host`).

use std::collections::BTreeSet;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use signing::{BundleHash, VerifiedBundle};

pub use troupe_bundle::{manifest, params, template};

mod archive;
use archive::read_entries;

pub use manifest::Manifest;

/// The triple this engine was built for; bundles must carry a library for it.
pub const TARGET: &str = env!("TROUPE_TARGET");

pub const MANIFEST_PATH: &str = "manifest.toml";

/// Limits enforced while inflating, so a zip bomb is stopped, not measured.
pub const MAX_ENTRY_BYTES: u64 = 256 << 20;
pub const MAX_TOTAL_BYTES: u64 = 512 << 20;
/// The most entries (files and directories) one archive holds.
pub const MAX_ENTRIES: usize = 1024;
/// The longest entry name, and the longest part of one between slashes.
pub const MAX_NAME_BYTES: usize = 1024;
pub const MAX_NAME_PART_BYTES: usize = 255;

pub use manifest::{MAX_KINDS, MAX_MANIFEST_BYTES, MAX_STEPS};

/// Why a bundle was refused. Each variant has a stable code (see [`Invalid::code`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Invalid {
    #[error("the bundle is not a zip archive: {0}")]
    NotZip(String),
    #[error("the bundle has no {MANIFEST_PATH} at its root")]
    NoManifest,
    #[error("invalid manifest: {0}")]
    Manifest(String),
    #[error(
        "the bundle was built for plugin ABI {found}, but this troupe supports ABI {} to {}; rebuild it against the current sdk",
        troupe_sdk::OLDEST_ABI_VERSION,
        troupe_sdk::ABI_VERSION
    )]
    Abi { found: u32 },
    #[error(
        "the bundle has no library for this platform ({TARGET}); it has: {found}. Build the plugin for {TARGET} and add it with `troupe bundle build`"
    )]
    NoLibrary { found: String },
    #[error("the manifest names steps the library does not export: {}", .0.join(", "))]
    MissingSteps(Vec<String>),
    #[error("unsafe zip entry {name:?}: {why}")]
    UnsafeEntry { name: String, why: &'static str },
    #[error("zip entry {name:?} inflates past the limit of {limit} bytes")]
    TooLarge { name: String, limit: u64 },
    #[error("the library could not be loaded: {0}")]
    Library(String),
    #[error("the bundle is over a limit: {0}")]
    OverLimit(String),
}

impl From<troupe_bundle::Invalid> for Invalid {
    fn from(e: troupe_bundle::Invalid) -> Invalid {
        match e {
            troupe_bundle::Invalid::Manifest(m) => Invalid::Manifest(m),
            troupe_bundle::Invalid::Abi { found } => Invalid::Abi { found },
            troupe_bundle::Invalid::OverLimit(m) => Invalid::OverLimit(m),
        }
    }
}

impl Invalid {
    /// The stable code the API reports for this rejection.
    pub fn code(&self) -> &'static str {
        match self {
            Invalid::NotZip(_) => "bundle_not_zip",
            Invalid::NoManifest => "bundle_no_manifest",
            Invalid::Manifest(_) => "bundle_manifest_invalid",
            Invalid::Abi { .. } => "bundle_abi_unsupported",
            Invalid::NoLibrary { .. } => "bundle_no_library_for_platform",
            Invalid::MissingSteps(_) => "bundle_missing_steps",
            Invalid::UnsafeEntry { .. } => "bundle_unsafe_entry",
            Invalid::TooLarge { .. } => "bundle_entry_too_large",
            Invalid::Library(_) => "bundle_library_invalid",
            Invalid::OverLimit(_) => "bundle_over_limit",
        }
    }
}

/// A bundle whose archive and manifest passed every static check, with its
/// files extracted to a directory named by its hash.
#[derive(Debug)]
pub struct Unpacked {
    pub hash: BundleHash,
    pub manifest: Manifest,
    pub dir: PathBuf,
    pub library: PathBuf,
}

/// Builds a bundle from a manifest and libraries, keyed by target triple.
/// The output is deterministic: the same inputs give the same hash.
pub fn build(manifest_text: &str, libraries: &[(&str, &[u8])]) -> Result<Vec<u8>, Invalid> {
    let manifest = Manifest::parse(manifest_text)?;
    manifest.check_new()?;
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default())
        .unix_permissions(0o644);
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let io = |e: std::io::Error| Invalid::NotZip(e.to_string());
    let z = |e: zip::result::ZipError| Invalid::NotZip(e.to_string());
    zip.start_file(MANIFEST_PATH, options).map_err(z)?;
    zip.write_all(manifest_text.as_bytes()).map_err(io)?;
    for (triple, bytes) in libraries {
        zip.start_file(format!("lib/{triple}/{}", manifest.library_file()), options)
            .map_err(z)?;
        zip.write_all(bytes).map_err(io)?;
    }
    Ok(zip.finish().map_err(z)?.into_inner())
}

/// Checks a verified bundle's archive and extracts it under `root/<hash>/`.
///
/// Only a [`VerifiedBundle`] (bytes whose signature checked out) gets here.
/// This is the static half of the gate every bundle passes before it loads;
/// it runs no code from the bundle.
pub fn open(verified: &VerifiedBundle, root: &Path) -> Result<Unpacked, crate::Error> {
    let (bytes, hash) = (verified.bytes(), verified.hash());
    let entries = read_entries(bytes)?;
    let manifest_bytes = entries
        .iter()
        .find(|(name, _)| name == MANIFEST_PATH)
        .map(|(_, b)| b)
        .ok_or(Invalid::NoManifest)?;
    let text =
        std::str::from_utf8(manifest_bytes).map_err(|_| Invalid::Manifest("not UTF-8".into()))?;
    let manifest = Manifest::parse(text)?;
    let lib_path = format!("lib/{TARGET}/{}", manifest.library_file());
    if !entries.iter().any(|(name, _)| *name == lib_path) {
        let found: BTreeSet<&str> = entries
            .iter()
            .filter_map(|(name, _)| name.strip_prefix("lib/")?.split('/').next())
            .collect();
        let found = if found.is_empty() {
            "none".to_owned()
        } else {
            found.into_iter().collect::<Vec<_>>().join(", ")
        };
        return Err(Invalid::NoLibrary { found }.into());
    }

    let dir = root.join(hash.to_string());
    // An unpacked copy is used only if it holds exactly the verified bytes:
    // a cache changed on disk is never loaded.
    let fresh = match unpacked_matches(&dir, &entries) {
        CacheState::Same => false,
        CacheState::Missing => true,
        CacheState::Modified(what) => {
            tracing::warn!(
                bundle = %hash,
                "the unpacked copy at {} was modified ({what}); unpacking it again from the verified archive",
                dir.display()
            );
            true
        }
    };
    if fresh {
        // Removed when this returns, on every path: after the rename
        // there is nothing left to remove.
        let staging = Staging(root.join(format!(".{hash}.{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&staging.0);
        unpack(&staging.0, &entries)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&staging.0, &dir).map_err(crate::Error::io(format!(
            "moving bundle into {}",
            dir.display()
        )))?;
    }
    let library = dir.join(&lib_path);
    Ok(Unpacked {
        hash,
        manifest,
        dir,
        library,
    })
}

/// Writes checked entries under `staging`, read-only.
fn unpack(staging: &Path, entries: &[(String, Vec<u8>)]) -> Result<(), crate::Error> {
    for (name, data) in entries {
        let path = staging.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(crate::Error::io(format!("creating {}", parent.display())))?;
        }
        #[cfg(feature = "failpoints")]
        (|| {
            fail::fail_point!("bundle.unpack_entry", |only: Option<String>| {
                if only.is_none_or(|only| only == *name) {
                    Err(crate::Error::Io {
                        context: format!("writing {}", path.display()),
                        source: std::io::Error::other("failure point bundle.unpack_entry"),
                    })
                } else {
                    Ok(())
                }
            });
            Ok(())
        })()?;
        std::fs::write(&path, data)
            .map_err(crate::Error::io(format!("writing {}", path.display())))?;
        // The cache is read-only: nothing may change a bundle's files after checking.
        let mut perms = std::fs::metadata(&path)
            .map_err(crate::Error::io("reading permissions"))?
            .permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&path, perms)
            .map_err(crate::Error::io("making the bundle cache read-only"))?;
    }
    Ok(())
}

/// A directory a bundle is unpacked into before it is renamed into
/// place; removed when dropped, so a failure leaves nothing behind.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.0)
        {
            tracing::warn!(path = %self.0.display(), error = %e, "could not remove a bundle's staging directory");
        }
    }
}

/// Removes the staging directories (`.<hash>.<pid>`) under `root` that a
/// process which is no longer running left (a crash while unpacking).
/// Returns how many it removed.
pub fn sweep_staging(root: &Path) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((hash, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once('.')) else {
            continue;
        };
        if hash.parse::<BundleHash>().is_err() || pid.parse::<u32>().is_err() {
            continue;
        }
        // Another process on this data directory may be unpacking now.
        if pid != std::process::id().to_string() && Path::new("/proc").join(pid).exists() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not remove a bundle's staging directory")
            }
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            dir = %root.display(),
            "removed staging directories left by an interrupted unpack"
        );
    }
    removed
}

/// What `open` found where a bundle unpacks.
enum CacheState {
    Same,
    Missing,
    Modified(String),
}

/// Compares the files under `dir` with the archive's entries, byte for byte.
fn unpacked_matches(dir: &Path, entries: &[(String, Vec<u8>)]) -> CacheState {
    if !dir.is_dir() {
        return CacheState::Missing;
    }
    for (name, data) in entries {
        match std::fs::read(dir.join(name)) {
            Ok(on_disk) if on_disk == *data => {}
            Ok(_) => return CacheState::Modified(format!("{name} differs")),
            Err(e) => return CacheState::Modified(format!("{name}: {e}")),
        }
    }
    CacheState::Same
}

/// Checks an archive and its manifest without unpacking or trusting it
/// (for `troupe bundle inspect` and signing tools).
pub fn inspect(bytes: &[u8]) -> Result<Manifest, Invalid> {
    let entries = read_entries(bytes)?;
    let text = entries
        .iter()
        .find(|(name, _)| name == MANIFEST_PATH)
        .map(|(_, b)| b)
        .ok_or(Invalid::NoManifest)?;
    Ok(Manifest::parse(
        std::str::from_utf8(text).map_err(|_| Invalid::Manifest("not UTF-8".into()))?,
    )?)
}

/// Signs bundle bytes with `key`, claiming what the bundle's manifest says
/// (name, version, ABI) and its hash and size, at `signed_at` (Unix seconds).
pub fn sign(
    bytes: &[u8],
    key: &signing::SecretKey,
    signed_at: u64,
) -> Result<signing::Signature, crate::Error> {
    let manifest = inspect(bytes)?;
    let claims = signing::Claims {
        name: manifest.name,
        version: manifest.version,
        sha256: BundleHash::of(bytes),
        size: bytes.len() as u64,
        abi: manifest.abi,
        signed_at,
    };
    Ok(signing::Signature::sign(key, claims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = "format = 1\nname = \"t\"\nversion = \"1.0.0\"\nabi = 1\nlibrary = \"t\"\n[steps.a]\ntimeout_ms = 10\n";

    /// Signs `bytes` with a throwaway key, as the Source Authority would have checked.
    fn verified(bytes: &[u8]) -> VerifiedBundle {
        let key = signing::SecretKey::from_seed([3; 32]);
        let mut trust = signing::Trust::default();
        trust.add(key.public());
        let claims = signing::Claims {
            name: "t".into(),
            version: "1".into(),
            sha256: BundleHash::of(bytes),
            size: bytes.len() as u64,
            abi: 1,
            signed_at: 0,
        };
        let sig = signing::Signature::sign(&key, claims).unwrap();
        signing::verify(bytes.to_vec(), &sig, &trust).unwrap()
    }

    #[test]
    fn build_is_deterministic_and_opens() {
        let lib: &[u8] = b"not really a library";
        let a = build(MANIFEST, &[(TARGET, lib)]).unwrap();
        let b = build(MANIFEST, &[(TARGET, lib)]).unwrap();
        assert_eq!(a, b);
        let dir = std::env::temp_dir().join(format!("troupe-bundle-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let u = open(&verified(&a), &dir).unwrap();
        assert_eq!(u.hash, BundleHash::of(&a));
        assert_eq!(std::fs::read(&u.library).unwrap(), lib);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_bad_archives() {
        let dir = std::env::temp_dir();
        let err = |bytes: &[u8]| match open(&verified(bytes), &dir) {
            Err(crate::Error::Bundle(e)) => e.code(),
            other => panic!("expected a bundle error, got {other:?}"),
        };
        assert_eq!(err(b"hello"), "bundle_not_zip");
        let other_target = build(MANIFEST, &[("sparc-sun-solaris", b"x")]).unwrap();
        assert_eq!(err(&other_target), "bundle_no_library_for_platform");
    }

    #[test]
    fn sweeping_removes_only_the_staging_of_processes_gone() {
        let root = std::env::temp_dir().join(format!("troupe-sweep-test-{}", std::process::id()));
        let hash = "ab".repeat(32);
        let gone = root.join(format!(".{hash}.999999999"));
        let running = root.join(format!(".{hash}.1"));
        let unpacked = root.join(&hash);
        let other = root.join(".not-a-staging-dir");
        for dir in [&gone, &running, &unpacked, &other] {
            std::fs::create_dir_all(dir.join("lib")).unwrap();
        }
        assert_eq!(sweep_staging(&root), 1);
        assert!(!gone.exists());
        assert!(running.exists() && unpacked.exists() && other.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
