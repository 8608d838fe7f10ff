//! ed25519 keys and their text forms.
//!
//! - public key: `ed25519:<64 hex digits>`, one line, pasteable into config;
//! - secret key file: `troupe-secret-key-v1 ed25519:<64 hex digits of the seed>`;
//! - key id: the first 8 bytes of SHA-256 of the public key, as 16 hex digits.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::Error;

const PUBLIC_PREFIX: &str = "ed25519:";
const SECRET_PREFIX: &str = "troupe-secret-key-v1 ed25519:";

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        crate::hex::decode(s.trim())
            .map(KeyId)
            .ok_or_else(|| Error::MalformedKey(format!("{s:?} is not a 16-hex-digit key id")))
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn id(&self) -> KeyId {
        let digest = Sha256::digest(self.0.as_bytes());
        KeyId(digest[..8].try_into().expect("8 bytes"))
    }

    /// `SHA256:<64 hex digits>` of the key's bytes: what an operator
    /// compares and accepts (`troupe nodes accept NAME --key …`).
    pub fn fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            crate::hex::encode(&Sha256::digest(self.0.as_bytes()))
        )
    }

    pub(crate) fn inner(&self) -> &VerifyingKey {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PUBLIC_PREFIX}{}",
            crate::hex::encode(self.0.as_bytes())
        )
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}, id {})", self, self.id())
    }
}

impl FromStr for PublicKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::MalformedKey(format!(
                "a public key looks like {PUBLIC_PREFIX}<64 hex digits>, not {s:?}"
            ))
        };
        let hex = s.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(bad)?;
        let bytes: [u8; 32] = crate::hex::decode(hex).ok_or_else(bad)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| Error::MalformedKey("not a valid ed25519 public key".into()))
    }
}

/// A signing key. Its text form is secret: store it with mode 0600.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A key from 32 random bytes (the caller supplies the randomness).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn to_text(&self) -> String {
        format!(
            "{SECRET_PREFIX}{}\n",
            crate::hex::encode(&self.0.to_bytes())
        )
    }

    pub fn from_text(s: &str) -> Result<SecretKey, Error> {
        let bad = || {
            Error::MalformedKey(
                "not a troupe secret key file (made by `troupe keys generate`)".into(),
            )
        };
        let hex = s.trim().strip_prefix(SECRET_PREFIX).ok_or_else(bad)?;
        crate::hex::decode(hex)
            .map(SecretKey::from_seed)
            .ok_or_else(bad)
    }

    pub(crate) fn inner(&self) -> &SigningKey {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(id {})", self.public().id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip() {
        let sk = SecretKey::from_seed([7; 32]);
        let back = SecretKey::from_text(&sk.to_text()).unwrap();
        assert_eq!(back.public(), sk.public());
        let pk: PublicKey = sk.public().to_string().parse().unwrap();
        assert_eq!(pk, sk.public());
        assert_eq!(pk.id().to_string().len(), 16);
        assert_eq!(pk.id().to_string().parse::<KeyId>().unwrap(), pk.id());
        assert!("ed25519:zz".parse::<PublicKey>().is_err());
        assert!(SecretKey::from_text("hello").is_err());
    }

    #[test]
    fn fingerprint_is_the_sha256_of_the_key_bytes() {
        let pk = SecretKey::from_seed([7; 32]).public();
        let text = pk.to_string();
        let key_bytes: [u8; 32] =
            crate::hex::decode(text.strip_prefix(PUBLIC_PREFIX).unwrap()).unwrap();
        assert_eq!(
            pk.fingerprint(),
            format!("SHA256:{}", crate::BundleHash::of(&key_bytes))
        );
        let other = SecretKey::from_seed([8; 32]).public();
        assert_ne!(pk.fingerprint(), other.fingerprint());
    }

    /// Debug forms go into logs: a secret key shows only its id.
    #[test]
    fn debug_forms_name_keys_and_never_show_a_seed() {
        let sk = SecretKey::from_seed([7; 32]);
        let pk = sk.public();
        let id = pk.id();
        assert_eq!(format!("{id:?}"), format!("KeyId({id})"));
        assert_eq!(format!("{pk:?}"), format!("PublicKey({pk}, id {id})"));
        let debug = format!("{sk:?}");
        assert_eq!(debug, format!("SecretKey(id {id})"));
        assert!(!debug.contains(&"07".repeat(32)), "{debug}");
    }
}
