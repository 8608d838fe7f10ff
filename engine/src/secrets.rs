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
        self.unseal(&row.name, &row.nonce, &row.ciphertext)
            .ok_or_else(|| {
                format!(
                    "secret {:?} cannot be decrypted with this server's secrets key ({}): every server \
                     sharing the database needs the same --secrets-key file",
                    row.name,
                    self.fingerprint()
                )
            })
    }

    /// Decrypts what [`SecretsKey::seal`] sealed for `name`; `None` if it
    /// was sealed under another key or for another name.
    pub(crate) fn unseal(&self, name: &str, nonce: &[u8], sealed: &[u8]) -> Option<String> {
        let nonce = <[u8; 24]>::try_from(nonce).ok()?;
        let plain = self
            .cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: name.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(plain).ok()
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

/// What masks the secrets delivered to an action's steps, wherever their
/// output, errors and logs are stored or shown: each value and the forms a
/// step or a peer is likely to print it in — base64 (standard and URL-safe,
/// with or without padding, at any alignment inside a longer base64 text,
/// so `user:SECRET` as HTTP Basic auth sends it is caught whatever the user)
/// and percent-encoding. A string that begins with the end of one of these
/// forms, or ends with its beginning ([`MIN_FRAGMENT`] bytes or more), has
/// that fragment masked too: that is what a cut leaves (a step keeping the
/// tail of a command's output). Object keys are masked like values.
#[derive(Debug, Default, Clone)]
pub(crate) struct Masker {
    /// Every form of every secret, longest first, so a form that contains
    /// another is masked whole.
    forms: Vec<String>,
}

/// Every secret value given to a step on this server (the most recent
/// [`MAX_PRINTED`]), for what step hosts print: that goes to the server's
/// log a line at a time, with nothing to tell which call printed it.
static PRINTED: std::sync::RwLock<(Vec<String>, Option<Masker>)> =
    std::sync::RwLock::new((Vec::new(), None));

/// How many secret values [`mask_printed`] keeps masking.
const MAX_PRINTED: usize = 1024;

/// Adds secret values given to a step to those masked in what step hosts
/// print.
pub(crate) fn given(values: &BTreeMap<String, String>) {
    let mut printed = PRINTED.write().unwrap_or_else(|e| e.into_inner());
    let (known, masker) = &mut *printed;
    let mut added = false;
    for v in values.values() {
        if !known.contains(v) {
            known.push(v.clone());
            added = true;
        }
    }
    if added {
        let excess = known.len().saturating_sub(MAX_PRINTED);
        known.drain(..excess);
        *masker = Some(Masker::new(known.iter()));
    }
}

/// Masks every secret given to a step on this server in `line`, a line a
/// step host printed.
pub(crate) fn mask_printed(line: &mut String) {
    let printed = PRINTED.read().unwrap_or_else(|e| e.into_inner());
    if let Some(masker) = &printed.1 {
        masker.text(line);
    }
}

/// The shortest piece of a secret's form masked at the edge of a string.
pub(crate) const MIN_FRAGMENT: usize = 4;

/// The shortest base64 text masked for a secret seen at an unknown
/// alignment (a shorter one would match unrelated text).
const MIN_CORE: usize = 6;

impl Masker {
    /// A masker for `values` (empty ones are ignored).
    pub(crate) fn new<'a>(values: impl IntoIterator<Item = &'a String>) -> Masker {
        let mut forms = Vec::new();
        for value in values.into_iter().filter(|v| !v.is_empty()) {
            forms.extend(encodings(value.as_bytes()));
            forms.push(value.clone());
        }
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
        Masker { forms }
    }

    /// Whether there is nothing to mask.
    pub(crate) fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    /// Masks the keys and strings of `v`.
    pub(crate) fn value(&self, v: &mut Value) {
        if self.is_empty() {
            return;
        }
        match v {
            Value::String(s) => self.text(s),
            Value::Array(items) => items.iter_mut().for_each(|i| self.value(i)),
            Value::Object(map) => {
                if map.keys().any(|k| self.finds(k)) {
                    let old = std::mem::take(map);
                    for (mut k, mut item) in old {
                        self.text(&mut k);
                        self.value(&mut item);
                        // Two keys masked alike: keep both values.
                        while map.contains_key(&k) {
                            k.push('*');
                        }
                        map.insert(k, item);
                    }
                } else {
                    map.values_mut().for_each(|i| self.value(i));
                }
            }
            _ => {}
        }
    }

    /// Masks `s` in place.
    pub(crate) fn text(&self, s: &mut String) {
        if !self.is_empty() && self.finds(s) {
            *s = self.masked(s);
        }
    }

    fn finds(&self, s: &str) -> bool {
        self.forms.iter().any(|f| s.contains(f.as_str())) || self.edges(s) != (0, 0)
    }

    fn masked(&self, s: &str) -> String {
        let mut out = s.to_owned();
        for form in &self.forms {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), MASK);
            }
        }
        let (head, tail) = self.edges(&out);
        if head + tail >= out.len() {
            return MASK.to_owned();
        }
        let mut cut = String::with_capacity(out.len());
        if head > 0 {
            cut.push_str(MASK);
        }
        cut.push_str(&out[head..out.len() - tail]);
        if tail > 0 {
            cut.push_str(MASK);
        }
        cut
    }

    /// How many bytes at the start of `s` are the end of a form, and at its
    /// end the beginning of one (the longest such, at least
    /// [`MIN_FRAGMENT`]); a whole form is left to the replacing.
    fn edges(&self, s: &str) -> (usize, usize) {
        let bytes = s.as_bytes();
        if bytes.len() < MIN_FRAGMENT {
            return (0, 0);
        }
        let first = &bytes[..MIN_FRAGMENT];
        let last = &bytes[bytes.len() - MIN_FRAGMENT..];
        let (mut head, mut tail) = (0, 0);
        for form in &self.forms {
            let form = form.as_bytes();
            // The form's end at the start of `s`: the longest is the one
            // that starts earliest in the form (but not at its start: a
            // whole form is replaced, not trimmed).
            for p in 1..form.len().saturating_sub(MIN_FRAGMENT - 1) {
                let n = form.len() - p;
                if n <= head {
                    break;
                }
                if &form[p..p + MIN_FRAGMENT] == first
                    && n <= bytes.len()
                    && s.is_char_boundary(n)
                    && bytes[..n] == form[p..]
                {
                    head = n;
                    break;
                }
            }
            // The form's beginning at the end of `s`.
            for end in (MIN_FRAGMENT..form.len()).rev() {
                if end <= tail {
                    break;
                }
                if &form[end - MIN_FRAGMENT..end] == last
                    && end <= bytes.len()
                    && s.is_char_boundary(bytes.len() - end)
                    && bytes[bytes.len() - end..] == form[..end]
                {
                    tail = end;
                    break;
                }
            }
        }
        (head, tail)
    }
}

/// The encoded forms of a secret a step or a peer may print: base64
/// (standard and URL-safe; unpadded, which padded text contains), the
/// base64 that the secret becomes inside a longer base64 text at each of
/// the three alignments (the characters that depend on it alone), and
/// percent-encoding (upper and lower case hex).
fn encodings(secret: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for alphabet in [STANDARD, URL_SAFE] {
        let whole = base64(secret, alphabet);
        if !whole.len().is_multiple_of(4) {
            out.push(format!("{whole}{}", "=".repeat(4 - whole.len() % 4)));
        }
        out.push(whole);
        for offset in 0..3usize {
            let mut bytes = vec![0u8; offset];
            bytes.extend_from_slice(secret);
            let text = base64(&bytes, alphabet);
            // Character i holds bits 6i..6i+6: keep those that lie wholly
            // within the secret's bits.
            let (from, to) = (8 * offset, 8 * (offset + secret.len()));
            let first = from.div_ceil(6);
            let last = to / 6;
            if last > first && last - first >= MIN_CORE {
                out.push(text[first..last].to_owned());
            }
        }
    }
    let upper = percent(secret, b"0123456789ABCDEF");
    if upper.as_bytes() != secret {
        out.push(percent(secret, b"0123456789abcdef"));
        out.push(upper);
    }
    out.retain(|f| !f.is_empty());
    out
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Unpadded base64.
fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Every byte but the unreserved ones (RFC 3986) as `%XX`.
fn percent(bytes: &[u8], hex: &[u8; 16]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(hex[usize::from(b >> 4)] as char);
            out.push(hex[usize::from(b & 15)] as char);
        }
    }
    out
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
        // 64 digits, all hex: one short, or one not hex, is refused.
        let hex = key.to_text().trim().rsplit(' ').next().unwrap().to_owned();
        for bad in [&hex[1..], &format!("g{}", &hex[1..])] {
            let text = format!("troupe-secrets-key-v1 {bad}");
            assert!(SecretsKey::from_text(&text).is_err(), "{text}");
        }
    }

    /// What tells keys apart in messages and logs: 4 bytes of the key's
    /// SHA-256, and never the key.
    #[test]
    fn a_key_shows_its_fingerprint_only() {
        use sha2::{Digest, Sha256};
        let key = SecretsKey::generate().unwrap();
        let digest = Sha256::digest(key.0);
        let expected: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(key.fingerprint(), expected);
        assert_ne!(
            key.fingerprint(),
            SecretsKey::generate().unwrap().fingerprint()
        );
        assert_eq!(format!("{key:?}"), format!("SecretsKey({expected})"));
        let hex = key.to_text().trim().rsplit(' ').next().unwrap().to_owned();
        assert!(!format!("{key:?}").contains(&hex[..8]));
    }

    /// A step's secrets come from the database, each under its own name;
    /// one not set, or sealed under another key, stops the step with what
    /// the operator must do.
    #[tokio::test]
    async fn a_step_gets_the_secrets_it_names_from_the_store() {
        use crate::store::Write;
        let store = Store::connect(&crate::store::tests::sqlite_url("secrets"))
            .await
            .unwrap();
        let key = SecretsKey::generate().unwrap();
        let mut writes = Vec::new();
        for (name, value) in [("bmc", "hunter2"), ("api", "tok-1"), ("other", "x")] {
            let (nonce, ciphertext) = key.seal(name, value).unwrap();
            writes.push(Write::SetSecret(Box::new(SecretRow {
                name: name.into(),
                nonce,
                ciphertext,
                updated_at: crate::model::now(),
                updated_by: "t".into(),
            })));
        }
        store.write(writes).await.unwrap();
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let Ok(got) = load(&store, &key, &names(&["bmc", "api"])).await else {
            panic!("not loaded");
        };
        assert_eq!(
            got,
            BTreeMap::from([
                ("api".into(), "tok-1".into()),
                ("bmc".into(), "hunter2".into())
            ])
        );
        match load(&store, &key, &names(&["bmc", "unset"])).await {
            Err(LoadError::Missing(e)) => assert_eq!(
                e,
                "secret \"unset\" is not set; set it with `troupe secrets set unset`"
            ),
            _ => panic!("an unset secret was not named"),
        }
        let other = SecretsKey::generate().unwrap();
        match load(&store, &other, &names(&["bmc"])).await {
            Err(LoadError::Missing(e)) => assert!(e.contains("same --secrets-key"), "{e}"),
            _ => panic!("a secret sealed under another key was not refused"),
        }
    }

    fn masker(values: &[&str]) -> Masker {
        let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        Masker::new(&values)
    }

    fn masked(m: &Masker, s: &str) -> String {
        let mut s = s.to_owned();
        m.text(&mut s);
        s
    }

    #[test]
    fn masking_reaches_nested_strings_and_keys() {
        let m = masker(&["s3cret-long", "s3cret"]);
        let mut v = json!({ "out": "x s3cret-long y s3cret", "list": ["s3cret"], "n": 1,
                            "Basic s3cret": { "s3cret": 1, "***": 2 } });
        m.value(&mut v);
        assert_eq!(
            v,
            json!({ "out": "x *** y ***", "list": ["***"], "n": 1, "Basic ***": { "***": 2, "****": 1 } })
        );
    }

    #[test]
    fn encoded_forms_are_masked() {
        let secret = "pa ss/w+rd=42";
        let m = masker(&[secret]);
        let b64 = |s: &str, a| base64(s.as_bytes(), a);
        for (form, seen) in [
            (b64(secret, STANDARD), "plain base64"),
            (format!("{}==", b64(secret, STANDARD)), "padded base64"),
            (b64(secret, URL_SAFE), "URL-safe base64"),
            ("pa%20ss%2Fw%2Brd%3D42".to_owned(), "percent-encoded"),
            (
                "pa%20ss%2fw%2brd%3d42".to_owned(),
                "percent-encoded, lower case",
            ),
        ] {
            let out = masked(&m, &format!("got {form} back"));
            assert_eq!(out, "got *** back", "{seen}: {form}");
        }
        // As HTTP Basic auth sends it, whatever the user name's length.
        for user in ["a", "ad", "admin", "operator"] {
            let basic = b64(&format!("{user}:{secret}"), STANDARD);
            let out = masked(&m, &format!("Authorization: Basic {basic}"));
            // Left: what the user name alone decides, and a character or
            // two (and padding) at each end that the secret shares.
            let shown = out.strip_prefix("Authorization: Basic ").unwrap();
            let (before, after) = shown.split_once("***").expect("masked");
            let user_part = b64(&format!("{user}:"), STANDARD);
            assert!(before.len() <= user_part.len() + 1, "{user}: {out}");
            assert!(after.len() <= 3, "{user}: {out}");
        }
    }

    /// A cut (a step keeping the tail of a command's output, an error cut
    /// at its limit) leaves a piece of a secret at an edge of a string.
    #[test]
    fn pieces_of_a_secret_at_an_edge_are_masked() {
        let secret = "tok-9f8e7d6c5b4a";
        let m = masker(&[secret]);
        assert_eq!(masked(&m, "7d6c5b4a and more"), "*** and more");
        assert_eq!(masked(&m, "token=tok-9f8e7d"), "token=***");
        assert_eq!(masked(&m, "5b4a"), "***");
        // Shorter than a fragment, or not at an edge: left alone.
        assert_eq!(masked(&m, "4a and 9f8e7d6c x"), "4a and 9f8e7d6c x");
        assert_eq!(masked(&m, "nothing here"), "nothing here");
        // Begins or ends like a piece of it, then goes another way: left
        // alone, as is an empty string.
        assert_eq!(masked(&m, "7d6c5b4X and more"), "7d6c5b4X and more");
        assert_eq!(masked(&m, "more and Xok-9f8e"), "more and Xok-9f8e");
        assert_eq!(masked(&m, ""), "");
        // A piece at each edge, with something else between them.
        assert_eq!(masked(&m, "5b4a mid tok-"), "*** mid ***");
        // Before a piece, text of several bytes a character.
        assert_eq!(masked(&m, "ééé tok-9f8e"), "ééé ***");
        let no_secrets = Masker::new(&Vec::new());
        assert!(no_secrets.is_empty());
        assert_eq!(masked(&no_secrets, "tok-9f8e7d6c5b4a"), "tok-9f8e7d6c5b4a");
    }

    /// What step hosts print reaches the server's log a line at a time:
    /// every secret given to a step here is masked in it, the most recent
    /// [`MAX_PRINTED`] of them.
    #[test]
    fn what_step_hosts_print_is_masked_for_the_secrets_given() {
        let printed = |s: &str| {
            let mut line = format!("host said {s}");
            mask_printed(&mut line);
            line
        };
        let first = "printed-secret-first".to_owned();
        given(&[("a".to_owned(), first.clone())].into());
        assert_eq!(printed(&first), "host said ***");
        let later: BTreeMap<String, String> = (0..MAX_PRINTED)
            .map(|i| (format!("s{i}"), format!("printed-secret-{i:05}")))
            .collect();
        given(&later);
        assert_eq!(printed("printed-secret-01023"), "host said ***");
        assert_eq!(
            printed(&first),
            format!("host said {first}"),
            "the oldest went"
        );
    }

    /// Inside a longer base64 text a secret leaves a core of characters
    /// that depend on it alone; one shorter than [`MIN_CORE`] is no form
    /// (it would mask unrelated text).
    #[test]
    fn base64_cores_shorter_than_the_minimum_are_not_forms() {
        // 32 bits: cores of 5, 4 and 5 characters at the three alignments.
        assert_eq!(
            encodings(b"abcd"),
            ["YWJjZA==", "YWJjZA", "YWJjZA==", "YWJjZA"]
        );
        // 40 bits: aligned, a core of 6.
        assert!(encodings(b"abcde").contains(&"YWJjZG".to_owned()));
    }

    #[test]
    fn base64_matches_the_standard_encoding() {
        assert_eq!(base64(b"", STANDARD), "");
        assert_eq!(base64(b"f", STANDARD), "Zg");
        assert_eq!(base64(b"fo", STANDARD), "Zm8");
        assert_eq!(base64(b"foo", STANDARD), "Zm9v");
        assert_eq!(base64(b"foob", STANDARD), "Zm9vYg");
        assert_eq!(base64(&[0xfb, 0xff], URL_SAFE), "-_8");
        assert_eq!(base64(&[0xfb, 0xff], STANDARD), "+/8");
    }
}
