//! What may name a capability, a secret or a target record's attribute.

/// Capability names, and node names (a node's name is its `node`
/// capability): letters, digits, `_`, `-` and `.`, at most 64 bytes.
pub fn is_capability_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Whether `name` can name a secret: letters, digits, `_`, `-`, up to 128.
pub fn is_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
}

/// Whether `key` can be a target record's attribute (`{{target.KEY}}`): a
/// lowercase letter, then lowercase letters, digits and `_`, at most 64.
pub fn is_attribute_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    key.len() <= 64
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        for ok in ["hv-17", "oob.net_2", "A", &"a".repeat(64)] {
            assert!(is_capability_name(ok), "{ok:?}");
        }
        for bad in ["", &"a".repeat(65), "a b", "a/b", "a:b", "é"] {
            assert!(!is_capability_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn secret_names() {
        for ok in ["bmc_password", "api-token-2", "X", &"a".repeat(128)] {
            assert!(is_secret_name(ok), "{ok:?}");
        }
        for bad in ["", &"a".repeat(129), "a.b", "a b", "a/b", "é"] {
            assert!(!is_secret_name(bad), "{bad:?}");
        }
    }
}
