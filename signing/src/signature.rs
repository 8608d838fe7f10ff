//! Detached bundle signatures.
//!
//! A signature binds the bundle's name, version, SHA-256, size and plugin ABI,
//! when it was signed, and the signing key's id, under a domain-separation
//! prefix, so it cannot be replayed for another bundle or version. Its text
//! form (a `.sig` file beside the bundle) is:
//!
//! ```text
//! troupe-signature-v1
//! key-id: 3f5a0c9e12ab44d0
//! name: builtin
//! version: 0.2.0
//! sha256: 8b54…9333
//! size: 1234567
//! abi: 1
//! signed-at: 1763928000
//! signature: <128 hex digits>
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use ed25519_dalek::Signer;

use crate::{BundleHash, Error, KeyId, PublicKey, SecretKey};

/// The domain-separation prefix of every signed message.
pub const DOMAIN: &str = "troupe bundle signature v1";
const HEADER: &str = "troupe-signature-v1";

/// What a signature vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub name: String,
    pub version: String,
    pub sha256: BundleHash,
    pub size: u64,
    pub abi: u32,
    /// Unix seconds.
    pub signed_at: u64,
}

impl Claims {
    /// The exact bytes signed: the domain, the key id and every claim, one per line.
    fn message(&self, key: KeyId) -> Vec<u8> {
        format!(
            "{DOMAIN}\nkey-id: {key}\nname: {}\nversion: {}\nsha256: {}\nsize: {}\nabi: {}\nsigned-at: {}\n",
            self.name, self.version, self.sha256, self.size, self.abi, self.signed_at
        )
        .into_bytes()
    }

    fn check(&self) -> Result<(), Error> {
        for (what, v) in [("name", &self.name), ("version", &self.version)] {
            if v.is_empty() || v.chars().any(char::is_control) {
                return Err(Error::MalformedSignature(format!(
                    "{what} must be non-empty without control characters"
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub key_id: KeyId,
    pub claims: Claims,
    bytes: [u8; 64],
}

impl Signature {
    /// Signs `claims` with `key`.
    pub fn sign(key: &SecretKey, claims: Claims) -> Result<Signature, Error> {
        claims.check()?;
        let key_id = key.public().id();
        let bytes = key.inner().sign(&claims.message(key_id)).to_bytes();
        Ok(Signature {
            key_id,
            claims,
            bytes,
        })
    }

    pub fn to_text(&self) -> String {
        let c = &self.claims;
        format!(
            "{HEADER}\nkey-id: {}\nname: {}\nversion: {}\nsha256: {}\nsize: {}\nabi: {}\nsigned-at: {}\nsignature: {}\n",
            self.key_id,
            c.name,
            c.version,
            c.sha256,
            c.size,
            c.abi,
            c.signed_at,
            crate::hex::encode(&self.bytes)
        )
    }

    pub fn from_text(text: &str) -> Result<Signature, Error> {
        let bad = |m: &str| Error::MalformedSignature(m.to_owned());
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(HEADER) {
            return Err(bad(
                "it does not start with `troupe-signature-v1`; make one with `troupe bundle sign`",
            ));
        }
        let mut fields = BTreeMap::new();
        for line in lines {
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| bad("every line after the first is `field: value`"))?;
            if fields.insert(k.trim(), v.trim()).is_some() {
                return Err(Error::MalformedSignature(format!(
                    "field {k:?} appears twice"
                )));
            }
        }
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| Error::MalformedSignature(format!("missing field {k:?}")))
        };
        let num = |k: &str| {
            get(k)?
                .parse::<u64>()
                .map_err(|_| Error::MalformedSignature(format!("{k} must be a number")))
        };
        let claims = Claims {
            name: get("name")?.to_owned(),
            version: get("version")?.to_owned(),
            sha256: get("sha256")?
                .parse()
                .map_err(|_| bad("sha256 must be 64 hex digits"))?,
            size: num("size")?,
            abi: u32::try_from(num("abi")?).map_err(|_| bad("abi is out of range"))?,
            signed_at: num("signed-at")?,
        };
        claims.check()?;
        let key_id = get("key-id")?.parse()?;
        let bytes = crate::hex::decode(get("signature")?)
            .ok_or_else(|| bad("signature must be 128 hex digits"))?;
        if fields.len() != 8 {
            return Err(bad("unknown fields"));
        }
        Ok(Signature {
            key_id,
            claims,
            bytes,
        })
    }
}

/// The keys a server trusts, and which of them are revoked.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    keys: BTreeMap<KeyId, (PublicKey, bool)>,
}

impl Trust {
    pub fn add(&mut self, key: PublicKey) {
        self.keys.insert(key.id(), (key, false));
    }

    /// Revokes a key; returns false if it was not known.
    pub fn revoke(&mut self, id: KeyId) -> bool {
        self.keys.get_mut(&id).map(|k| k.1 = true).is_some()
    }

    pub fn is_revoked(&self, id: KeyId) -> bool {
        self.keys.get(&id).is_some_and(|k| k.1)
    }

    /// Every key with whether it is revoked.
    pub fn keys(&self) -> impl Iterator<Item = (&PublicKey, bool)> {
        self.keys.values().map(|(k, r)| (k, *r))
    }
}

/// Bundle bytes whose signature verified under a trusted, unrevoked key.
/// Only [`verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    bytes: Arc<[u8]>,
    signature: Signature,
}

impl VerifiedBundle {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn hash(&self) -> BundleHash {
        self.signature.claims.sha256
    }

    pub fn claims(&self) -> &Claims {
        &self.signature.claims
    }

    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    pub fn key_id(&self) -> KeyId {
        self.signature.key_id
    }
}

/// Checks `bytes` against `signature` under `trust`: the key is trusted and
/// not revoked, the signature verifies strictly over the claims, and the bytes
/// have the signed size and SHA-256.
pub fn verify(
    bytes: impl Into<Arc<[u8]>>,
    signature: &Signature,
    trust: &Trust,
) -> Result<VerifiedBundle, Error> {
    let bytes = bytes.into();
    let id = signature.key_id;
    let (key, revoked) = trust.keys.get(&id).ok_or(Error::UntrustedKey(id))?;
    if *revoked {
        return Err(Error::RevokedKey(id));
    }
    let sig = ed25519_dalek::Signature::from_bytes(&signature.bytes);
    key.inner()
        .verify_strict(&signature.claims.message(id), &sig)
        .map_err(|_| Error::BadSignature(id))?;
    let size = bytes.len() as u64;
    if size < signature.claims.size {
        return Err(Error::Incomplete {
            got: size,
            expected: signature.claims.size,
        });
    }
    let got = BundleHash::of(&bytes);
    if size != signature.claims.size || got != signature.claims.sha256 {
        return Err(Error::HashMismatch {
            got,
            expected: signature.claims.sha256,
        });
    }
    Ok(VerifiedBundle {
        bytes,
        signature: signature.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(bytes: &[u8]) -> Claims {
        Claims {
            name: "b".into(),
            version: "1.0.0".into(),
            sha256: BundleHash::of(bytes),
            size: bytes.len() as u64,
            abi: 1,
            signed_at: 1_700_000_000,
        }
    }

    fn setup() -> (SecretKey, Trust) {
        let key = SecretKey::from_seed([1; 32]);
        let mut trust = Trust::default();
        trust.add(key.public());
        (key, trust)
    }

    #[test]
    fn signs_and_verifies() {
        let (key, trust) = setup();
        let sig = Signature::sign(&key, claims(b"bundle")).unwrap();
        let parsed = Signature::from_text(&sig.to_text()).unwrap();
        assert_eq!(parsed, sig);
        let v = verify(b"bundle".to_vec(), &parsed, &trust).unwrap();
        assert_eq!(v.hash(), BundleHash::of(b"bundle"));
        assert_eq!(v.key_id(), key.public().id());
    }

    #[test]
    fn refuses_everything_else() {
        let (key, mut trust) = setup();
        let sig = Signature::sign(&key, claims(b"bundle")).unwrap();
        let code = |r: Result<VerifiedBundle, Error>| r.unwrap_err().code();
        assert_eq!(
            code(verify(b"bundlE".to_vec(), &sig, &trust)),
            "bundle_hash_mismatch"
        );
        assert_eq!(
            code(verify(b"bund".to_vec(), &sig, &trust)),
            "bundle_incomplete"
        );
        let mut forged = sig.clone();
        forged.claims.version = "9.9.9".into();
        assert_eq!(
            code(verify(b"bundle".to_vec(), &forged, &trust)),
            "signature_invalid"
        );
        let stranger = Signature::sign(&SecretKey::from_seed([2; 32]), claims(b"bundle")).unwrap();
        assert_eq!(
            code(verify(b"bundle".to_vec(), &stranger, &trust)),
            "signature_untrusted_key"
        );
        trust.revoke(key.public().id());
        assert_eq!(
            code(verify(b"bundle".to_vec(), &sig, &trust)),
            "signature_revoked_key"
        );
        assert!(Signature::from_text("troupe-signature-v1\nname: x\n").is_err());
        assert!(
            Signature::from_text(&sig.to_text().replace("abi: 1", "abi: 1\nextra: 2")).is_err()
        );
    }

    /// A name or version with a line break would forge a field of the text
    /// form; an empty one names nothing.
    #[test]
    fn claims_must_be_one_non_empty_line() {
        let (key, _) = setup();
        for (name, version) in [
            ("", "1.0.0"),
            ("b", ""),
            ("b\nsize: 1", "1.0.0"),
            ("b", "1\t0"),
        ] {
            let mut c = claims(b"bundle");
            c.name = name.into();
            c.version = version.into();
            let err = Signature::sign(&key, c).unwrap_err();
            assert_eq!(err.code(), "signature_malformed", "{name:?} {version:?}");
        }
        let text = Signature::sign(&key, claims(b"bundle")).unwrap().to_text();
        let err = Signature::from_text(&text.replace("name: b", "name: b\u{7}")).unwrap_err();
        assert_eq!(err.code(), "signature_malformed");
    }

    #[test]
    fn a_verified_bundle_holds_the_bytes_that_verified() {
        let (key, trust) = setup();
        let sig = Signature::sign(&key, claims(b"bundle")).unwrap();
        let v = verify(b"bundle".to_vec(), &sig, &trust).unwrap();
        assert_eq!(v.bytes(), b"bundle");
        assert_eq!(v.claims(), &sig.claims);
        assert_eq!(v.signature(), &sig);
    }

    #[test]
    fn trust_lists_its_keys_and_which_are_revoked() {
        let (key, mut trust) = setup();
        let other = SecretKey::from_seed([2; 32]).public();
        trust.add(other.clone());
        let id = key.public().id();
        assert!(!trust.is_revoked(id));
        assert!(trust.revoke(id));
        assert!(trust.is_revoked(id));
        assert!(!trust.is_revoked(other.id()));
        assert!(!trust.revoke(SecretKey::from_seed([3; 32]).public().id()));
        let mut listed: Vec<(String, bool)> =
            trust.keys().map(|(k, r)| (k.to_string(), r)).collect();
        listed.sort();
        let mut want = vec![(key.public().to_string(), true), (other.to_string(), false)];
        want.sort();
        assert_eq!(listed, want);
    }
}
