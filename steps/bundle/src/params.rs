//! Typed action params: the subset of JSON Schema a kind declares in its
//! manifest (`type`, `enum`, `pattern`, `minimum`/`maximum`,
//! `min_length`/`max_length`, `items`, `required`, `default`), checked when
//! an action is submitted so a bad request is refused before anything is
//! stored; and `allowed_in`, a list the operator sets on the server that
//! the value must be in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The JSON types a param can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// A JSON string.
    String,
    /// A whole number.
    Integer,
    /// Any number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A list.
    Array,
    /// A JSON object.
    Object,
}

impl ParamType {
    fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "a string",
            ParamType::Integer => "an integer",
            ParamType::Number => "a number",
            ParamType::Boolean => "true or false",
            ParamType::Array => "a list",
            ParamType::Object => "an object",
        }
    }

    fn matches(self, v: &Value) -> bool {
        match self {
            ParamType::String => v.is_string(),
            ParamType::Integer => v.is_i64() || v.is_u64(),
            ParamType::Number => v.is_number(),
            ParamType::Boolean => v.is_boolean(),
            ParamType::Array => v.is_array(),
            ParamType::Object => v.is_object(),
        }
    }
}

/// One param's schema.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// `type`: the JSON type it must have; any when absent.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<ParamType>,
    /// Shown by `troupe kinds` and `/v1/kinds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether a request must carry it; defaults to true unless a default is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    /// The value when a request leaves it out; it must fit the schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// `enum`: the values allowed.
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
    /// A regular expression a string must match (anchor it with `^…$`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// The smallest number allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    /// The largest number allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    /// The fewest characters of a string, or items of a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_length: Option<usize>,
    /// The most characters of a string, or items of a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// The schema of a list's items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Box<ParamSpec>>,
    /// `"vars.NAME"`: the value must be one of the deployment variable
    /// NAME's items (separated by commas or white space), which the
    /// operator sets on the server. What lets a request choose among the
    /// hosts a secret may be sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_in: Option<String>,
    /// `"KEY"`: when a request leaves the param out, the value of the
    /// attribute KEY of the target's record (`troupe targets set`), read at
    /// submit and checked like a value the request gave (schema,
    /// `allowed_in`); a target whose record lacks it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_target: Option<String>,
    /// `pattern`, compiled on first use.
    #[serde(skip)]
    compiled: std::sync::OnceLock<regex::Regex>,
}

impl ParamSpec {
    /// Whether a request must carry it: `required`, or, unset, when there is no default.
    pub fn is_required(&self) -> bool {
        self.required.unwrap_or(self.default.is_none())
    }

    /// Checks the schema itself (at manifest load): a pattern compiles, a
    /// default satisfies the rest.
    pub(crate) fn check(&self, name: &str) -> Result<(), String> {
        if let Some(p) = &self.pattern {
            regex::Regex::new(p).map_err(|e| format!("param {name:?}: bad pattern: {e}"))?;
        }
        if let Some(items) = &self.items {
            if self.kind.is_some_and(|k| k != ParamType::Array) {
                return Err(format!("param {name:?}: `items` needs type = \"array\""));
            }
            items.check(&format!("{name}[]"))?;
        }
        if let Some(list) = &self.allowed_in {
            if !list
                .strip_prefix("vars.")
                .is_some_and(crate::names::is_secret_name)
            {
                return Err(format!(
                    "param {name:?}: allowed_in = {list:?} must name a deployment variable, `vars.NAME`"
                ));
            }
            if !matches!(self.kind, Some(ParamType::String | ParamType::Integer)) {
                return Err(format!(
                    "param {name:?}: allowed_in needs type = \"string\" or \"integer\""
                ));
            }
        }
        if let Some(key) = &self.from_target {
            if !crate::names::is_attribute_key(key) {
                return Err(format!(
                    "param {name:?}: from_target = {key:?} must name an attribute (a lowercase letter, then lowercase letters, digits or '_')"
                ));
            }
            if self.kind != Some(ParamType::String) {
                return Err(format!(
                    "param {name:?}: from_target needs type = \"string\" (attributes are strings)"
                ));
            }
            if self.default.is_some() {
                return Err(format!(
                    "param {name:?}: from_target and default both say what it is when a request leaves it out; keep one"
                ));
            }
        }
        if let Some(d) = &self.default {
            self.validate(name, d)
                .map_err(|e| format!("the default does not fit its own schema: {e}"))?;
        }
        Ok(())
    }

    /// Checks a value; the error names the field and what was expected.
    pub fn validate(&self, name: &str, v: &Value) -> Result<(), String> {
        if let Some(t) = self.kind
            && !t.matches(v)
        {
            let hint = if v.is_string() && t != ParamType::String {
                " (from the CLI, pass it with --param-json)"
            } else {
                ""
            };
            return Err(format!(
                "param {name:?} must be {}, not {}{hint}",
                t.as_str(),
                describe(v)
            ));
        }
        if let Some(allowed) = &self.one_of
            && !allowed.contains(v)
        {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            return Err(format!(
                "param {name:?} must be one of {}, not {v}",
                list.join(", ")
            ));
        }
        if let Some(n) = v.as_f64() {
            if let Some(min) = self.minimum
                && n < min
            {
                return Err(format!("param {name:?} must be at least {min}, not {v}"));
            }
            if let Some(max) = self.maximum
                && n > max
            {
                return Err(format!("param {name:?} must be at most {max}, not {v}"));
            }
        }
        let len = match v {
            Value::String(s) => Some(s.chars().count()),
            Value::Array(a) => Some(a.len()),
            _ => None,
        };
        if let Some(len) = len {
            if let Some(min) = self.min_length
                && len < min
            {
                return Err(format!(
                    "param {name:?} must have at least {min} characters or items, not {len}"
                ));
            }
            if let Some(max) = self.max_length
                && len > max
            {
                return Err(format!(
                    "param {name:?} must have at most {max} characters or items, not {len}"
                ));
            }
        }
        if let (Some(p), Value::String(s)) = (&self.pattern, v) {
            let re = match self.compiled.get() {
                Some(re) => re,
                None => {
                    let re = regex::Regex::new(p).map_err(|e| e.to_string())?;
                    self.compiled.get_or_init(|| re)
                }
            };
            if !re.is_match(s) {
                return Err(format!("param {name:?} must match {p}, not {s:?}"));
            }
        }
        if let (Some(items), Value::Array(a)) = (&self.items, v) {
            for (i, item) in a.iter().enumerate() {
                items.validate(&format!("{name}[{i}]"), item)?;
            }
        }
        Ok(())
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// What a kind says about its params: the old list of required names (any
/// type), or a table of schemas.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Params {
    /// `params = ["host"]`: required params of any type.
    Names(Vec<String>),
    /// `params.NAME = { … }`: a schema per param.
    Schema(BTreeMap<String, ParamSpec>),
}

impl Default for Params {
    fn default() -> Self {
        Params::Names(Vec::new())
    }
}

impl Params {
    /// Every declared param with its schema (a listed name: required, any type).
    pub fn specs(&self) -> BTreeMap<String, ParamSpec> {
        match self {
            Params::Names(names) => names
                .iter()
                .map(|n| (n.clone(), ParamSpec::default()))
                .collect(),
            Params::Schema(map) => map.clone(),
        }
    }

    /// Whether the kind declares param `name`.
    pub fn declares(&self, name: &str) -> bool {
        match self {
            Params::Names(names) => names.iter().any(|n| n == name),
            Params::Schema(map) => map.contains_key(name),
        }
    }

    /// Checks a request's params and fills in defaults. Errors name the
    /// field: an unknown one, a missing one, or one that breaks its schema.
    pub fn apply(&self, params: &mut Map<String, Value>) -> Result<(), ParamError> {
        let specs = self.specs();
        if let Some(unknown) = params.keys().find(|k| !specs.contains_key(*k)) {
            let known: Vec<&str> = specs.keys().map(String::as_str).collect();
            return Err(ParamError::Invalid(format!(
                "unknown param {unknown:?}; this kind takes {}",
                if known.is_empty() {
                    "no params".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        }
        let missing: Vec<&str> = specs
            .iter()
            .filter(|(name, spec)| spec.is_required() && !params.contains_key(*name))
            .map(|(name, _)| name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(ParamError::Missing(
                missing.iter().map(|m| m.to_string()).collect(),
            ));
        }
        for (name, spec) in &specs {
            match params.get(name) {
                Some(v) => spec.validate(name, v).map_err(ParamError::Invalid)?,
                None => {
                    if let Some(d) = &spec.default {
                        params.insert(name.clone(), d.clone());
                    }
                }
            }
        }
        Ok(())
    }
}

impl Params {
    /// Checks the params that have an `allowed_in` list against it, in
    /// `vars` (the server's deployment variables). The error names the
    /// param and the variable, not the list.
    pub fn check_allowed(
        &self,
        params: &Map<String, Value>,
        vars: &Map<String, Value>,
    ) -> Result<(), String> {
        let Params::Schema(specs) = self else {
            return Ok(());
        };
        for (name, spec) in specs {
            let (Some(list), Some(value)) = (&spec.allowed_in, params.get(name)) else {
                continue;
            };
            let var = list.strip_prefix("vars.").unwrap_or(list);
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let allowed = match vars.get(var) {
                Some(Value::String(items)) => items
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .any(|item| !item.is_empty() && item == value),
                _ => false,
            };
            if !allowed {
                return Err(format!(
                    "param {name:?} = {value:?} is not in this server's list for it (the deployment variable \
                     {var}); ask the operator to add it"
                ));
            }
        }
        Ok(())
    }
}

/// Why a request's params were refused.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamError {
    /// Required params the request lacks (all of them).
    Missing(Vec<String>),
    /// A param is unknown or breaks its schema; the message names it.
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Params {
        let toml = r#"
            host = { type = "string", pattern = "^[a-z0-9.-]+$", max_length = 20 }
            port = { type = "integer", minimum = 1, maximum = 65535, default = 22 }
            mode = { type = "string", enum = ["soft", "hard"], required = false }
            ratio = { type = "number", minimum = 0.5 }
            argv = { type = "array", min_length = 1, items = { type = "string" }, required = false }
        "#;
        let map: BTreeMap<String, ParamSpec> = toml::from_str(toml).unwrap();
        for (n, s) in &map {
            s.check(n).unwrap();
        }
        Params::Schema(map)
    }

    fn apply(v: Value) -> Result<Map<String, Value>, ParamError> {
        let mut m = v.as_object().unwrap().clone();
        schema().apply(&mut m).map(|()| m)
    }

    fn invalid(v: Value) -> String {
        match apply(v) {
            Err(ParamError::Invalid(m)) => m,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn valid_params_pass_and_get_defaults() {
        let m = apply(json!({ "host": "vps-1.example", "ratio": 1 })).unwrap();
        assert_eq!(m["port"], 22);
        assert!(!m.contains_key("mode"));
    }

    #[test]
    fn every_rule_names_the_field() {
        let base = json!({ "host": "h", "ratio": 1 });
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            b
        };
        let m = invalid(with("port", json!("22")));
        assert!(
            m.contains("\"port\" must be an integer") && m.contains("--param-json"),
            "{m}"
        );
        assert!(invalid(with("port", json!(0))).contains("at least 1"));
        assert!(invalid(with("port", json!(70000))).contains("at most 65535"));
        assert!(invalid(with("port", json!(2.5))).contains("an integer"));
        assert!(invalid(with("mode", json!("gentle"))).contains("one of \"soft\", \"hard\""));
        assert!(invalid(with("host", json!("a; rm -rf /"))).contains("must match"));
        assert!(invalid(with("host", json!("a".repeat(21)))).contains("at most 20"));
        assert!(invalid(with("ratio", json!(0.1))).contains("at least 0.5"));
        assert!(invalid(with("ratio", json!(true))).contains("a number"));
        assert!(invalid(with("argv", json!([]))).contains("at least 1"));
        assert!(invalid(with("argv", json!(["ls", 3]))).contains("\"argv[1]\" must be a string"));
        assert!(invalid(with("colour", json!("red"))).contains("unknown param \"colour\""));
        assert_eq!(
            apply(json!({})).unwrap_err(),
            ParamError::Missing(vec!["host".into(), "ratio".into()])
        );
    }

    #[test]
    fn a_param_from_the_target_record_is_a_string_with_no_default() {
        let spec = |text: &str| toml::from_str::<ParamSpec>(text).unwrap();
        spec("type = \"string\"\nfrom_target = \"bmc\"")
            .check("bmc")
            .unwrap();
        for (text, says) in [
            (
                "type = \"string\"\nfrom_target = \"Bmc.url\"",
                "must name an attribute",
            ),
            (
                "type = \"integer\"\nfrom_target = \"port\"",
                "needs type = \"string\"",
            ),
            (
                "type = \"string\"\nfrom_target = \"bmc\"\ndefault = \"x\"",
                "keep one",
            ),
        ] {
            let err = spec(text).check("bmc").unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn listed_params_must_be_in_the_operators_list() {
        let spec: BTreeMap<String, ParamSpec> = toml::from_str(
            "bmc = { type = \"string\", allowed_in = \"vars.bmc_hosts\" }\nport = { type = \"integer\", default = 1 }",
        )
        .unwrap();
        spec["bmc"].check("bmc").unwrap();
        let params = Params::Schema(spec);
        let vars = |v: Value| json!({ "bmc_hosts": v }).as_object().unwrap().clone();
        let list = vars(json!("bmc-1.example, bmc-2.example\nbmc-3.example"));
        for host in ["bmc-1.example", "bmc-2.example", "bmc-3.example"] {
            let p = json!({ "bmc": host }).as_object().unwrap().clone();
            params.check_allowed(&p, &list).unwrap();
        }
        for host in [
            "127.0.0.1:18790",
            "bmc-1",
            "bmc-1.example,",
            "",
            "BMC-1.EXAMPLE",
        ] {
            let p = json!({ "bmc": host }).as_object().unwrap().clone();
            let err = params.check_allowed(&p, &list).unwrap_err();
            assert!(
                err.contains("bmc_hosts") && err.contains("\"bmc\""),
                "{err}"
            );
        }
        let p = json!({ "bmc": "bmc-1.example" })
            .as_object()
            .unwrap()
            .clone();
        assert!(params.check_allowed(&p, &Map::new()).is_err());

        let bad: ParamSpec =
            toml::from_str("type = \"string\"\nallowed_in = \"bmc_hosts\"").unwrap();
        assert!(bad.check("x").unwrap_err().contains("vars.NAME"));
        let bad: ParamSpec = toml::from_str("type = \"array\"\nallowed_in = \"vars.x\"").unwrap();
        assert!(bad.check("x").unwrap_err().contains("type"));
    }

    /// `minimum`, `maximum`, `min_length` and `max_length` are inclusive.
    #[test]
    fn bounds_take_their_own_value() {
        let base = json!({ "host": "h", "ratio": 1 });
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            b
        };
        apply(with("port", json!(1))).unwrap();
        apply(with("port", json!(65535))).unwrap();
        apply(with("ratio", json!(0.5))).unwrap();
        apply(with("argv", json!(["ls"]))).unwrap();
        apply(with("host", json!("a".repeat(20)))).unwrap();
        let spec: ParamSpec = toml::from_str("type = \"integer\"").unwrap();
        spec.validate("n", &json!(-3)).unwrap();
        spec.validate("n", &json!(u64::MAX)).unwrap();
    }

    /// The error says what came, and hints at --param-json only for a string
    /// that should have been JSON.
    #[test]
    fn errors_describe_the_value_that_came() {
        let spec: ParamSpec = toml::from_str("type = \"integer\"").unwrap();
        assert_eq!(
            spec.validate("n", &json!("7")).unwrap_err(),
            "param \"n\" must be an integer, not the string \"7\" (from the CLI, pass it with --param-json)"
        );
        assert_eq!(
            spec.validate("n", &json!(true)).unwrap_err(),
            "param \"n\" must be an integer, not true"
        );
        assert_eq!(
            spec.validate("n", &Value::Null).unwrap_err(),
            "param \"n\" must be an integer, not null"
        );
    }

    #[test]
    fn declares_names_what_the_kind_takes() {
        let names = Params::Names(vec!["host".into()]);
        assert!(names.declares("host") && !names.declares("port"));
        let schema = schema();
        assert!(schema.declares("port") && !schema.declares("colour"));
    }

    #[test]
    fn bad_schemas_are_refused() {
        let bad: ParamSpec = toml::from_str("pattern = \"(\"").unwrap();
        assert!(bad.check("x").unwrap_err().contains("bad pattern"));
        let bad: ParamSpec = toml::from_str("type = \"integer\"\ndefault = \"x\"").unwrap();
        assert!(bad.check("x").unwrap_err().contains("default"));
    }
}
