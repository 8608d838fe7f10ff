//! `BundleHash`: a bundle is named by the SHA-256 of its bytes.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The SHA-256 of a bundle's bytes, shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleHash([u8; 32]);

impl BundleHash {
    pub fn of(bytes: &[u8]) -> BundleHash {
        BundleHash(Sha256::digest(bytes).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 12 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_owned()
    }
}

impl fmt::Display for BundleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for BundleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BundleHash({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidHash;

impl fmt::Display for InvalidHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a bundle hash is 64 hex digits (the SHA-256 of the bundle file)")
    }
}

impl std::error::Error for InvalidHash {}

impl FromStr for BundleHash {
    type Err = InvalidHash;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::hex::decode(s).map(BundleHash).ok_or(InvalidHash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trips_through_hex() {
        let h = BundleHash::of(b"troupe");
        let parsed: BundleHash = h.to_string().parse().unwrap();
        assert_eq!(h, parsed);
        assert_eq!(h.short().len(), 12);
        assert!("xyz".parse::<BundleHash>().is_err());
        assert!("zz".repeat(32).parse::<BundleHash>().is_err());
    }

    #[test]
    fn known_digest() {
        assert_eq!(
            BundleHash::of(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let empty = BundleHash::of(b"");
        let bytes = empty.as_bytes();
        assert_eq!(bytes[..4], [0xe3, 0xb0, 0xc4, 0x42]);
        assert_eq!(bytes[28..], [0x78, 0x52, 0xb8, 0x55]);
    }

    #[test]
    fn debug_and_error_forms() {
        let h = BundleHash::of(b"");
        assert_eq!(format!("{h:?}"), format!("BundleHash({h})"));
        let err = "xyz".parse::<BundleHash>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "a bundle hash is 64 hex digits (the SHA-256 of the bundle file)"
        );
    }
}
