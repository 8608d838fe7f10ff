//! A node's proof of identity: it signs the server's challenge, bound to
//! its name, with its node key. Domain-separated from bundle signatures, so
//! neither can stand for the other.

use crate::{PublicKey, SecretKey};

const DOMAIN: &[u8] = b"troupe node hello v1\n";

fn message(challenge: &str, name: &str) -> Vec<u8> {
    [DOMAIN, challenge.as_bytes(), b"\n", name.as_bytes()].concat()
}

/// The node's answer to `challenge`: a hex ed25519 signature.
pub fn answer(key: &SecretKey, challenge: &str, name: &str) -> String {
    use ed25519_dalek::Signer;
    let sig = key.inner().sign(&message(challenge, name));
    crate::hex::encode(&sig.to_bytes())
}

/// Whether `answer` is `key`'s signature of `challenge` for `name`.
pub fn check(key: &PublicKey, challenge: &str, name: &str, answer: &str) -> bool {
    let Some(bytes) = crate::hex::decode::<64>(answer) else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(&bytes);
    key.inner()
        .verify_strict(&message(challenge, name), &sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_bind_key_challenge_and_name() {
        let key = SecretKey::from_seed([1; 32]);
        let other = SecretKey::from_seed([2; 32]);
        let a = answer(&key, "c1", "hv-17");
        assert!(check(&key.public(), "c1", "hv-17", &a));
        assert!(!check(&other.public(), "c1", "hv-17", &a), "another key");
        assert!(
            !check(&key.public(), "c2", "hv-17", &a),
            "another challenge"
        );
        assert!(!check(&key.public(), "c1", "hv-18", &a), "another name");
        assert!(!check(&key.public(), "c1", "hv-17", "00"), "garbage");
    }
}
