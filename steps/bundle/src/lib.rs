//! The bundle contract as a host reads it: the manifest that describes a
//! bundle's steps and kinds ([`manifest`], [`params`], [`template`]) and
//! loading and calling its step library ([`plugin`]).
//!
//! The engine's step hosts and `troupe-test`'s harness both use this crate,
//! so a bundle means the same thing on a server and in `cargo test`.

#![warn(missing_docs)]

pub mod destinations;
pub mod goon;
pub mod manifest;
pub mod names;
pub mod params;
pub mod plugin;
pub mod rules;
pub mod template;

pub use manifest::Manifest;

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The manifest does not parse, or breaks a rule; the message says which.
    #[error("invalid manifest: {0}")]
    Manifest(String),
    /// The library was built for a plugin ABI this troupe does not load.
    #[error(
        "the bundle was built for plugin ABI {found}, but this troupe supports ABI {} to {}; rebuild it against the current troupe-sdk",
        troupe_sdk::OLDEST_ABI_VERSION,
        troupe_sdk::ABI_VERSION
    )]
    Abi {
        /// The ABI the manifest names.
        found: u32,
    },
    /// The manifest is over a limit ([`manifest::MAX_MANIFEST_BYTES`],
    /// [`manifest::MAX_KINDS`], [`manifest::MAX_STEPS`]); the message says which.
    #[error("the manifest is over a limit: {0}")]
    OverLimit(String),
}
