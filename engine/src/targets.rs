//! Target records: what an operator keeps about a target (`bmc`, the name of
//! the secret holding its BMC's credentials, its hypervisor), string keys to
//! string values. Step templates read them as `{{target.KEY}}`, a param may
//! default from one (`from_target`), and an attribute named like a secret a
//! step uses says which secret that step gets for this target. A record
//! names secrets, it never holds one: its values are shown to every token
//! with the read scope and written to the audit log.
//!
//! Read from the database whenever they are used (at submit, at each step's
//! start), never kept in a server's memory, so a change made through one
//! server holds on every other at once.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use troupe_bundle::manifest::{self, KindDef, StepUse};
use troupe_bundle::template;

use crate::model::Timestamp;
use crate::secrets::{self, LoadError, SecretsKey};
use crate::store::Store;
use crate::{Error, Result};

/// The most attributes one record holds.
pub const MAX_ATTRIBUTES: usize = 64;
/// The longest key, in bytes.
pub const MAX_KEY: usize = 64;
/// The longest value, in bytes.
pub const MAX_VALUE: usize = 1024;

/// A target's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRecord {
    pub target: String,
    pub attributes: BTreeMap<String, String>,
    pub updated_at: Timestamp,
    pub updated_by: String,
}

/// A change to a record: keys to set (added or replaced) and keys to
/// remove; every other attribute stays as it is, unless `replace`, when
/// the record becomes `set` alone.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub set: BTreeMap<String, String>,
    pub unset: Vec<String>,
    pub replace: bool,
}

/// Whether `key` can be an attribute's key: a lowercase letter, then
/// lowercase letters, digits and `_`, at most [`MAX_KEY`] bytes (a template
/// path's part, and the name of a secret's role).
pub fn is_key(key: &str) -> bool {
    troupe_bundle::names::is_attribute_key(key)
}

/// Checks a target's name as a submit does.
pub(crate) fn check_target(target: &str) -> Result<()> {
    if target.is_empty()
        || target.trim() != target
        || target.len() > crate::actions::MAX_TARGET_LEN
        || target.chars().any(char::is_control)
    {
        return Err(Error::InvalidRequest(format!(
            "target {target:?}: a target is 1 to {} bytes with no control characters and no space at either end",
            crate::actions::MAX_TARGET_LEN
        )));
    }
    Ok(())
}

/// Checks a change before anything is written: keys, values, sizes, and
/// that no value looks like a secret.
pub(crate) fn check(change: &Change) -> Result<()> {
    if !change.replace && change.set.is_empty() && change.unset.is_empty() {
        return Err(Error::InvalidRequest(
            "the change sets and unsets nothing; give KEY=VALUE to set or --unset KEY".into(),
        ));
    }
    for key in change.set.keys().chain(&change.unset) {
        if !is_key(key) {
            return Err(Error::InvalidRequest(format!(
                "attribute {key:?}: a key is a lowercase letter, then lowercase letters, digits or '_', \
                 at most {MAX_KEY} bytes"
            )));
        }
    }
    if let Some(key) = change.unset.iter().find(|k| change.set.contains_key(*k)) {
        return Err(Error::InvalidRequest(format!(
            "attribute {key:?} is both set and unset; do one"
        )));
    }
    if change.set.len() > MAX_ATTRIBUTES {
        return Err(Error::InvalidRequest(format!(
            "a record holds at most {MAX_ATTRIBUTES} attributes"
        )));
    }
    for (key, value) in &change.set {
        if value.is_empty() || value.len() > MAX_VALUE || value.chars().any(char::is_control) {
            return Err(Error::InvalidRequest(format!(
                "attribute {key:?}: a value is 1 to {MAX_VALUE} bytes with no control characters \
                 (to remove an attribute, unset it)"
            )));
        }
        if let Some(why) = looks_secret(key, value) {
            return Err(Error::SecretInRecord {
                key: key.clone(),
                why,
            });
        }
    }
    Ok(())
}

/// Why an attribute looks like it holds a secret, if it does: a record's
/// values are shown to every reader and kept in the audit log. Not proof
/// of anything, only the usual shapes: a key named for a password, a URL
/// carrying a password, a private key, an API token.
fn looks_secret(key: &str, value: &str) -> Option<&'static str> {
    let last = key.rsplit('_').next().unwrap_or(key);
    if matches!(last, "password" | "passwd" | "pass" | "pw" | "pin") {
        return Some("its key says it holds a password");
    }
    if let Some((_, rest)) = value.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
        if authority
            .rsplit_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
        {
            return Some("it is a URL with a password in it");
        }
    }
    if value.contains("PRIVATE KEY") {
        return Some("it holds a private key");
    }
    if value.starts_with("troupe_") && value.matches('_').count() >= 2 {
        return Some("it looks like an API token");
    }
    None
}

/// The change applied to `attributes`: `None` when the result would hold
/// more than [`MAX_ATTRIBUTES`].
pub(crate) fn merged(
    mut attributes: BTreeMap<String, String>,
    change: &Change,
) -> Option<BTreeMap<String, String>> {
    if change.replace {
        attributes.clear();
    }
    for key in &change.unset {
        attributes.remove(key);
    }
    attributes.extend(change.set.iter().map(|(k, v)| (k.clone(), v.clone())));
    (attributes.len() <= MAX_ATTRIBUTES).then_some(attributes)
}

/// Fills the params of `kind` that default from the target's record
/// (`from_target`) and the request left out, and checks that the record
/// has every attribute the kind's step settings read (`{{target.KEY}}`),
/// so a request that cannot run is refused before anything is stored.
/// Reads the record from the database (nothing is cached): a change made
/// through any server holds for the next submit.
pub(crate) async fn fill(
    store: &Store,
    kind: &str,
    def: &KindDef,
    target: &str,
    params: &mut Map<String, Value>,
) -> Result<()> {
    if manifest::target_keys_used(def).is_empty() {
        return Ok(());
    }
    let record = store.target_record(target).await?;
    let attributes = record.as_ref().map(|r| &r.attributes);
    let missing =
        |key: &str, used_by: String, param: Option<String>| Error::TargetAttributeMissing {
            target: target.to_owned(),
            key: key.to_owned(),
            used_by,
            has_record: record.is_some(),
            param,
        };
    for (param, spec) in def.params.specs() {
        let Some(key) = spec.from_target else {
            continue;
        };
        if params.contains_key(&param) {
            continue;
        }
        match attributes.and_then(|a| a.get(&key)) {
            Some(v) => {
                params.insert(param, Value::String(v.clone()));
            }
            None => {
                return Err(missing(
                    &key,
                    format!("kind {kind:?} (its param {param:?} defaults from the record)"),
                    Some(param),
                ));
            }
        }
    }
    for u in &def.steps {
        for path in template::paths(&u.settings).unwrap_or_default() {
            if let Some(key) = path.strip_prefix("target.")
                && !attributes.is_some_and(|a| a.contains_key(key))
            {
                return Err(missing(
                    key,
                    format!("kind {kind:?} (step {:?} reads {{{{{path}}}}})", u.name()),
                    None,
                ));
            }
        }
    }
    Ok(())
}

/// The target's record as a step's templates see it, read when the step
/// starts if it reads the record (`reads`); an unreadable database is worth
/// another attempt.
pub(crate) async fn for_step(
    store: &Store,
    target: &str,
    reads: bool,
) -> std::result::Result<Option<Map<String, Value>>, String> {
    if !reads {
        return Ok(None);
    }
    let record = store
        .target_record(target)
        .await
        .map_err(|e| format!("could not read target {target:?}'s record: {e}"))?;
    Ok(record.map(|r| {
        r.attributes
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect()
    }))
}

/// Whether a step use's settings read the target's record: a
/// `{{target.KEY}}`, or a secret, whose name the record may give.
pub(crate) fn read_by(u: &StepUse) -> bool {
    template::paths(&u.settings)
        .unwrap_or_default()
        .iter()
        .any(|p| p.starts_with("target.") || p.starts_with("secrets."))
}

/// The secrets a step names (`{{secrets.ROLE}}`), by role. The target's
/// record chooses which secret fills a role by having an attribute of that
/// name (`bmc_credentials=dc1-bmc`: the secret `dc1-bmc`); a role the record
/// does not name is filled by the secret of the same name.
pub(crate) async fn load_secrets(
    store: &Store,
    key: &SecretsKey,
    target: &str,
    roles: &[String],
    record: Option<&Map<String, Value>>,
) -> std::result::Result<BTreeMap<String, String>, LoadError> {
    if roles.is_empty() {
        return Ok(BTreeMap::new());
    }
    let named = |role: &String| -> Option<String> {
        record?
            .get(role)?
            .as_str()
            .filter(|n| secrets::is_valid_name(n))
            .map(str::to_owned)
    };
    let names: Vec<(String, String)> = roles
        .iter()
        .map(|role| (role.clone(), named(role).unwrap_or_else(|| role.clone())))
        .collect();
    let wanted: Vec<String> = names.iter().map(|(_, n)| n.clone()).collect();
    let values = secrets::load(store, key, &wanted)
        .await
        .map_err(|e| match e {
            LoadError::Missing(m) => {
                let by_record: Vec<String> = names
                    .iter()
                    .filter(|(role, name)| role != name)
                    .map(|(role, name)| format!("{role}={name}"))
                    .collect();
                if by_record.is_empty() {
                    LoadError::Missing(m)
                } else {
                    LoadError::Missing(format!(
                        "{m} (target {target:?}'s record names {})",
                        by_record.join(", ")
                    ))
                }
            }
            other => other,
        })?;
    Ok(names
        .into_iter()
        .filter_map(|(role, name)| values.get(&name).map(|v| (role, v.clone())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(set: &[(&str, &str)], unset: &[&str]) -> Change {
        Change {
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            unset: unset.iter().map(|k| k.to_string()).collect(),
            replace: false,
        }
    }

    #[test]
    fn keys_are_template_safe_names() {
        for good in ["bmc", "bmc_credentials", "hv2"] {
            assert!(is_key(good), "{good}");
        }
        for bad in [
            "",
            "Bmc",
            "2bmc",
            "bmc.url",
            "bmc-url",
            &"k".repeat(MAX_KEY + 1),
        ] {
            assert!(!is_key(bad), "{bad}");
        }
    }

    #[test]
    fn values_shaped_like_secrets_are_refused() {
        for (k, v) in [
            ("bmc_password", "hunter2"),
            ("bmc", "https://admin:hunter2@10.0.0.5"),
            ("key", "-----BEGIN OPENSSH PRIVATE KEY-----"),
            ("token", "troupe_0123456789abcdef_secret"),
        ] {
            assert!(
                matches!(
                    check(&change(&[(k, v)], &[])),
                    Err(Error::SecretInRecord { .. })
                ),
                "{k}={v}"
            );
        }
        for (k, v) in [
            ("bmc", "https://10.0.0.5:8443"),
            ("bmc", "redfish+https://user@10.0.0.5"),
            ("bmc_credentials", "dc1-bmc"),
            ("hypervisor", "hv-17"),
        ] {
            assert!(check(&change(&[(k, v)], &[])).is_ok(), "{k}={v}");
        }
    }

    #[test]
    fn a_merge_keeps_what_it_does_not_name_and_bounds_the_count() {
        let old: BTreeMap<String, String> = [("a", "1"), ("b", "2")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let new = merged(old.clone(), &change(&[("c", "3")], &["a"])).unwrap();
        assert_eq!(new.keys().collect::<Vec<_>>(), ["b", "c"]);
        let many: Vec<(String, String)> = (0..MAX_ATTRIBUTES)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        let mut many = Change {
            set: many.into_iter().collect(),
            ..Change::default()
        };
        assert!(merged(old.clone(), &many).is_none());
        many.replace = true;
        assert_eq!(merged(old, &many).unwrap().len(), MAX_ATTRIBUTES);
        assert!(check(&change(&[("a", "1")], &["a"])).is_err());
        assert!(check(&change(&[("a", "")], &[])).is_err());
        assert!(check(&change(&[], &[])).is_err());
    }
}
