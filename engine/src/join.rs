//! What a join token lets a new node claim: which names, which
//! capabilities, how many times. A leaked join token is worth only what its
//! rules allow: names nobody holds yet that match its pattern, capabilities
//! its patterns list (so only the steps placed on those), and the uses it
//! has left.
//!
//! A capability pattern is `KEY` (any value) or `KEY=VALUE`, where `*` in
//! the name or the value matches any run of characters: `hypervisor=kvm`,
//! `oob=dc1`, `rack=r1-*`, `mem_free_mb`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The most capability patterns one token or node may carry.
pub const MAX_PATTERNS: usize = 64;

/// How many new nodes a join token admits when its creator does not say.
pub const DEFAULT_USES: u32 = 1;

/// A join token's rules, stored as JSON in `api_tokens.join_rules`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRules {
    /// Names a node may take with this token (`*` matches any run); `None`:
    /// any name not held by another key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<String>,
    /// Capabilities a node admitted with this token may be placed on;
    /// `None`: any it reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// New nodes it admits in all; `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
}

impl JoinRules {
    /// Checks the patterns; `Err` says what is wrong with which.
    pub fn check(&self) -> Result<(), String> {
        if let Some(names) = &self.names
            && (names.is_empty()
                || names.len() > 64
                || !names
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.*".contains(c)))
        {
            return Err(format!(
                "{names:?} is not a name pattern: letters, digits, '-', '_', '.' and '*', at most 64"
            ));
        }
        if let Some(caps) = &self.capabilities {
            if caps.len() > MAX_PATTERNS {
                return Err(format!(
                    "{} capability patterns; at most {MAX_PATTERNS}",
                    caps.len()
                ));
            }
            for pattern in caps {
                check_pattern(pattern)?;
            }
        }
        if self.max_uses == Some(0) {
            return Err(
                "a join token that admits no node is of no use: give 1 or more uses".into(),
            );
        }
        Ok(())
    }

    /// Whether a node may take `name` with this token.
    pub fn allows_name(&self, name: &str) -> bool {
        self.names.as_deref().is_none_or(|p| glob(p, name))
    }
}

fn check_pattern(pattern: &str) -> Result<(), String> {
    let (key, value) = pattern.split_once('=').unwrap_or((pattern, "*"));
    let ok = |s: &str, extra: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.*".contains(c) || extra.contains(c))
    };
    if !ok(key, "") || !ok(value, ":/,+@") {
        return Err(format!(
            "{pattern:?} is not a capability pattern: KEY or KEY=VALUE, where '*' matches anything"
        ));
    }
    Ok(())
}

/// Keeps the capabilities that some pattern in `allowed` matches (all when
/// `None`); returns them and the names of those dropped.
pub fn admitted(
    allowed: Option<&[String]>,
    capabilities: BTreeMap<String, String>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let Some(allowed) = allowed else {
        return (capabilities, Vec::new());
    };
    let mut dropped = Vec::new();
    let kept = capabilities
        .into_iter()
        .filter(|(key, value)| {
            let ok = allowed.iter().any(|pattern| {
                let (k, v) = pattern.split_once('=').unwrap_or((pattern, "*"));
                glob(k, key) && glob(v, value)
            });
            if !ok {
                dropped.push(key.clone());
            }
            ok
        })
        .collect();
    (kept, dropped)
}

/// `*`-only glob matching.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No '*': the whole text must have matched.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs() {
        assert!(glob("hv-*", "hv-17"));
        assert!(glob("hv-*", "hv-"));
        assert!(!glob("hv-*", "db-1"));
        assert!(glob("*", "anything"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(!glob("ab*ba", "aba"), "the ends may not overlap");
    }

    #[test]
    fn capabilities_outside_the_patterns_are_dropped() {
        let caps: BTreeMap<String, String> = [
            ("hypervisor", "kvm"),
            ("oob", "dc2"),
            ("mem_free_mb", "2048"),
            ("rack", "r1-04"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let allowed = vec![
            "hypervisor=kvm".to_owned(),
            "oob=dc1".to_owned(),
            "mem_free_mb".to_owned(),
            "rack=r1-*".to_owned(),
        ];
        let (kept, dropped) = admitted(Some(&allowed), caps.clone());
        assert_eq!(
            kept.keys().collect::<Vec<_>>(),
            ["hypervisor", "mem_free_mb", "rack"]
        );
        assert_eq!(dropped, ["oob"]);
        assert_eq!(admitted(None, caps.clone()).0, caps);
    }

    #[test]
    fn rules_are_checked() {
        let ok = JoinRules {
            names: Some("hv-*".into()),
            capabilities: Some(vec!["hypervisor=kvm".into(), "oob".into()]),
            max_uses: Some(3),
        };
        assert_eq!(ok.check(), Ok(()));
        assert!(ok.allows_name("hv-3"));
        assert!(!ok.allows_name("db-3"));
        let bad = |rules: JoinRules| rules.check().unwrap_err();
        assert!(
            bad(JoinRules {
                names: Some("a b".into()),
                ..ok.clone()
            })
            .contains("name pattern")
        );
        assert!(
            bad(JoinRules {
                capabilities: Some(vec!["=x".into()]),
                ..ok.clone()
            })
            .contains("capability pattern")
        );
        assert!(
            bad(JoinRules {
                max_uses: Some(0),
                ..ok
            })
            .contains("no node")
        );
    }
}
