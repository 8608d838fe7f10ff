//! Where a step runs. A step with no requirements runs on the app server's
//! own step hosts; one whose manifest `requires` capabilities runs on a
//! remote node that has them (`name = "value"` for that value, `name = "*"`
//! for any value), and waits, up to its `placement_timeout_ms`, while no
//! connected node matches.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::bundle::template;

/// What a node must have to run one attempt of a step, its templates
/// resolved against the action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement(BTreeMap<String, Want>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// The capability has exactly this value.
    Exact(String),
    /// The capability is there, with any value (`"*"`).
    Present,
}

impl Requirement {
    /// Resolves a step use's `requires` (see `StepUse::requires`) against
    /// the action. A template must come out as a non-empty string or
    /// number.
    pub fn resolve(
        requires: &BTreeMap<String, String>,
        scope: &Value,
    ) -> Result<Requirement, String> {
        let mut wants = BTreeMap::new();
        for (capability, value) in requires {
            let want = match template::resolve(&Value::from(value.as_str()), scope)? {
                Value::String(s) if s == "*" => Want::Present,
                Value::String(s) if !s.is_empty() => Want::Exact(s),
                Value::Number(n) => Want::Exact(n.to_string()),
                other => {
                    return Err(format!(
                        "requires {capability} = {value:?} came out as {other}; it must be a non-empty string"
                    ));
                }
            };
            wants.insert(capability.clone(), want);
        }
        Ok(Requirement(wants))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a node with these capabilities can run the step.
    pub fn matches(&self, capabilities: &BTreeMap<String, String>) -> bool {
        self.0
            .iter()
            .all(|(name, want)| match (want, capabilities.get(name)) {
                (Want::Present, Some(_)) => true,
                (Want::Exact(v), Some(have)) => v == have,
                (_, None) => false,
            })
    }
}

/// `dc=ams3, gpu=*, hypervisor=kvm`: what operators read in a waiting
/// step and in the error of one that found no node.
impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, want)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match want {
                Want::Exact(v) => write!(f, "{name}={v}")?,
                Want::Present => write!(f, "{name}=*")?,
            }
        }
        Ok(())
    }
}

pub use troupe_bundle::names::is_capability_name;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn requires(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn caps(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        requires(pairs)
    }

    #[test]
    fn exact_presence_and_action_values() {
        let scope = json!({ "params": { "hypervisor": "hv-17", "rack": 4 } });
        let r = Requirement::resolve(
            &requires(&[
                ("hypervisor", "kvm"),
                ("gpu", "*"),
                ("node", "{{params.hypervisor}}"),
                ("rack", "{{params.rack}}"),
            ]),
            &scope,
        )
        .unwrap();
        assert_eq!(r.to_string(), "gpu=*, hypervisor=kvm, node=hv-17, rack=4");
        assert!(!r.is_empty(), "a step with requirements goes to a node");
        let good = caps(&[
            ("hypervisor", "kvm"),
            ("gpu", "a100"),
            ("node", "hv-17"),
            ("rack", "4"),
            ("dc", "ams3"),
        ]);
        assert!(r.matches(&good));
        let mut other = good.clone();
        other.insert("node".into(), "hv-18".into());
        assert!(!r.matches(&other), "another node");
        let mut no_gpu = good.clone();
        no_gpu.remove("gpu");
        assert!(!r.matches(&no_gpu), "presence");
        let mut xen = good;
        xen.insert("hypervisor".into(), "xen".into());
        assert!(!r.matches(&xen), "exact value");
        assert!(
            Requirement::resolve(&BTreeMap::new(), &scope)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_value_that_resolves_to_nothing_is_an_error() {
        let scope = json!({ "params": { "empty": "", "list": [1] } });
        for value in ["{{params.empty}}", "{{params.list}}", "{{params.missing}}"] {
            let e = Requirement::resolve(&requires(&[("node", value)]), &scope);
            assert!(e.is_err(), "{value}: {e:?}");
        }
    }

    #[test]
    fn capability_names() {
        for good in ["hypervisor", "dc", "gpu.model", "os-family", "a_b1"] {
            assert!(is_capability_name(good), "{good}");
        }
        for bad in ["", "has space", "x=y", "ü", &"a".repeat(65)] {
            assert!(!is_capability_name(bad), "{bad}");
        }
    }
}
