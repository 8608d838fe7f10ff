//! Identity and trust for bundles: a bundle is named by the SHA-256 of its
//! bytes ([`BundleHash`]) and vouched for by an ed25519 signature over what it
//! claims to be ([`Claims`]). [`verify`] is the only way to get a
//! [`VerifiedBundle`], which is the only thing the engine's loader accepts.
//!
//! This crate does no I/O: callers read and write key and signature files.

mod hash;
mod hex;
mod keys;
pub mod node;
mod signature;

pub use hash::{BundleHash, InvalidHash};
pub use keys::{KeyId, PublicKey, SecretKey};
pub use signature::{Claims, DOMAIN, Signature, Trust, VerifiedBundle, verify};

/// Why a key, a signature or a bundle was not accepted. Each variant has a
/// stable code for the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("malformed key: {0}")]
    MalformedKey(String),
    #[error("malformed signature: {0}")]
    MalformedSignature(String),
    #[error(
        "the bundle is signed by key {0}, which this server does not trust; add it with `troupe keys trust` or the server's --trust"
    )]
    UntrustedKey(KeyId),
    #[error("the bundle is signed by key {0}, which has been revoked")]
    RevokedKey(KeyId),
    #[error(
        "the signature does not verify: the signed claims were altered or it was not made by key {0}"
    )]
    BadSignature(KeyId),
    #[error(
        "the upload is incomplete: {got} of {expected} signed bytes arrived; send the whole bundle"
    )]
    Incomplete { got: u64, expected: u64 },
    #[error(
        "the bundle's bytes do not match its signature (SHA-256 {got}, signed {expected}): it was altered, or the signature is for another bundle"
    )]
    HashMismatch {
        got: BundleHash,
        expected: BundleHash,
    },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Error::MalformedKey(_) => "key_malformed",
            Error::MalformedSignature(_) => "signature_malformed",
            Error::UntrustedKey(_) => "signature_untrusted_key",
            Error::RevokedKey(_) => "signature_revoked_key",
            Error::BadSignature(_) => "signature_invalid",
            Error::Incomplete { .. } => "bundle_incomplete",
            Error::HashMismatch { .. } => "bundle_hash_mismatch",
        }
    }
}
