//! Secrets steps need (a BMC password, an API key): set by an operator,
//! stored in the `secrets` table encrypted with XChaCha20-Poly1305 under a
//! key the database never sees (a file beside the server, see
//! [`SecretsKey`]), delivered only to the steps whose settings name them as
//! `{{secrets.NAME}}`, and masked as `***` in whatever troupe stores or shows
//! of a step's output and errors.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde_json::Value;

use crate::store::{SecretRow, Store};

/// What replaces a secret's value wherever troupe shows step output.
pub const MASK: &str = "***";

/// The longest secret value accepted.
pub const MAX_SECRET: usize = 64 << 10;

/// The key secrets are encrypted under. Its text form, as kept in the key
/// file: `troupe-secrets-key-v1 <64 hex>`.
#[derive(Clone)]
pub struct SecretsKey([u8; 32]);

const KEY_PREFIX: &str = "troupe-secrets-key-v1 ";

/// Shows the fingerprint only, never the key.
impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretsKey({})", self.fingerprint())
    }
}

impl SecretsKey {
    pub fn generate() -> std::io::Result<SecretsKey> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(std::io::Error::other)?;
        Ok(SecretsKey(key))
    }

    pub fn to_text(&self) -> String {
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        format!("{KEY_PREFIX}{hex}\n")
    }

    pub fn from_text(text: &str) -> Result<SecretsKey, String> {
        let hex = text
            .trim()
            .strip_prefix(KEY_PREFIX.trim_end())
            .map(str::trim)
            .ok_or("not a troupe secrets key (it starts with `troupe-secrets-key-v1`)")?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a secrets key is 64 hex digits".into());
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(SecretsKey(key))
    }

    /// A short fingerprint, to tell keys apart in messages (never the key).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.0)
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&Key::from(self.0))
    }

    /// Encrypts `value` for `name` (bound in as associated data, so a row
    /// copied to another name does not decrypt). Returns (nonce, ciphertext).
    pub(crate) fn seal(&self, name: &str, value: &str) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        let sealed = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| std::io::Error::other("encryption failed"))?;
        Ok((nonce.to_vec(), sealed))
    }

    pub(crate) fn open(&self, row: &SecretRow) -> Result<String, String> {
        let undecryptable = || {
            format!(
                "secret {:?} cannot be decrypted with this server's secrets key ({}): every server \
                 sharing the database needs the same --secrets-key file",
                row.name,
                self.fingerprint()
            )
        };
        let Ok(nonce) = <[u8; 24]>::try_from(row.nonce.as_slice()) else {
            return Err(undecryptable());
        };
        let plain = self
            .cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &row.ciphertext,
                    aad: row.name.as_bytes(),
                },
            )
            .map_err(|_| undecryptable())?;
        String::from_utf8(plain).map_err(|_| undecryptable())
    }
}

pub use troupe_bundle::names::is_secret_name as is_valid_name;

/// Reads and decrypts the named secrets for one step.
pub(crate) async fn load(
    store: &Store,
    key: &SecretsKey,
    names: &[String],
) -> Result<BTreeMap<String, String>, LoadError> {
    let rows = store
        .secrets(names)
        .await
        .map_err(|e| LoadError::Unavailable(format!("could not read secrets: {e}")))?;
    let mut out = BTreeMap::new();
    for name in names {
        let row = rows.iter().find(|r| &r.name == name).ok_or_else(|| {
            LoadError::Missing(format!(
                "secret {name:?} is not set; set it with `troupe secrets set {name}`"
            ))
        })?;
        out.insert(name.clone(), key.open(row).map_err(LoadError::Missing)?);
    }
    Ok(out)
}

pub(crate) enum LoadError {
    /// The database did not answer: worth another attempt.
    Unavailable(String),
    /// Not set, or not readable with this key: an operator must act.
    Missing(String),
}

/// Replaces every secret value in the strings of `v` with [`MASK`].
pub(crate) fn mask_value(v: &mut Value, values: &[String]) {
    match v {
        Value::String(s) => mask_in(s, values),
        Value::Array(items) => items.iter_mut().for_each(|i| mask_value(i, values)),
        Value::Object(map) => map.values_mut().for_each(|i| mask_value(i, values)),
        _ => {}
    }
}

/// Replaces every secret value in `s` with [`MASK`], longest first (so a
/// secret that contains another is masked whole).
pub(crate) fn mask_in(s: &mut String, values: &[String]) {
    for value in values {
        if !value.is_empty() && s.contains(value.as_str()) {
            *s = s.replace(value.as_str(), MASK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sealed_values_open_only_under_their_name_and_key() {
        let key = SecretsKey::generate().unwrap();
        let (nonce, ciphertext) = key.seal("bmc", "hunter2").unwrap();
        let row = |name: &str| SecretRow {
            name: name.into(),
            nonce: nonce.clone(),
            ciphertext: ciphertext.clone(),
            updated_at: crate::model::now(),
            updated_by: "t".into(),
        };
        assert_eq!(key.open(&row("bmc")).unwrap(), "hunter2");
        assert!(
            key.open(&row("other"))
                .unwrap_err()
                .contains("cannot be decrypted")
        );
        let other = SecretsKey::generate().unwrap();
        assert!(other.open(&row("bmc")).is_err());
        assert!(!String::from_utf8_lossy(&ciphertext).contains("hunter2"));
        let again = SecretsKey::from_text(&key.to_text()).unwrap();
        assert_eq!(again.open(&row("bmc")).unwrap(), "hunter2");
        assert!(SecretsKey::from_text("nope").is_err());
    }

    #[test]
    fn masking_reaches_nested_strings() {
        let values = vec!["s3cret-long".to_owned(), "s3cret".to_owned()];
        let mut v = json!({ "out": "x s3cret-long y s3cret", "list": ["s3cret"], "n": 1 });
        mask_value(&mut v, &values);
        assert_eq!(v, json!({ "out": "x *** y ***", "list": ["***"], "n": 1 }));
    }
}
