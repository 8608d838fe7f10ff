//! The bundle manifest (`manifest.toml` inside a bundle): the steps a
//! library exports with their policies, and the action kinds built on them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Invalid;
use crate::params::Params;

/// The only manifest format this engine reads.
pub const FORMAT: u32 = 1;

/// The largest manifest read, in bytes (256 KiB).
pub const MAX_MANIFEST_BYTES: usize = 256 << 10;
/// The most kinds one manifest defines.
pub const MAX_KINDS: usize = 256;
/// The most steps one manifest defines, and the most one kind runs.
pub const MAX_STEPS: usize = 256;

/// A bundle's manifest: `bundle.toml` in a step crate, `manifest.toml` in a bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The manifest format; this troupe reads [`FORMAT`].
    pub format: u32,
    /// The bundle's name: letters, digits, `-` and `_`.
    pub name: String,
    /// Its version: semver for a new bundle, newer than every one of the name before.
    pub version: String,
    /// The plugin ABI the library was built for (see `troupe_sdk::ABI_VERSION`).
    pub abi: u32,
    /// The library's base name: `libNAME.so` on Linux.
    pub library: String,
    /// The steps the library exports, by name, with the rules they run under.
    pub steps: BTreeMap<String, StepDef>,
    /// The kinds of action built from the steps, by name.
    #[serde(default)]
    pub kinds: BTreeMap<String, KindDef>,
    /// Concurrency limits its step uses name (`limits = { bmc = "{{params.bmc}}" }`):
    /// at most `max` attempts at once hold one key of a limit, across every
    /// server sharing the database.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, LimitDef>,
}

/// The most attempts at once one limit may let through.
pub const MAX_LIMIT: u32 = 10_000;

/// A concurrency limit: `[limits.bmc] max = 1`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitDef {
    /// What it protects, for operators (`troupe kinds`, the docs).
    #[serde(default)]
    pub description: String,
    /// How many attempts may hold one key at once, unless the operator
    /// says otherwise (`troupe serve --limit NAME=N`); 1 to [`MAX_LIMIT`].
    pub max: u32,
}

/// A step definition: an exported function plus the policy it runs under.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// The exported function; defaults to the step's own name.
    #[serde(default)]
    pub function: Option<String>,
    /// Each attempt is stopped after this long (required, above 0).
    pub timeout_ms: u64,
    /// Whether running the step twice is harmless. An interrupted step is
    /// re-run after a crash only if it is.
    #[serde(default)]
    pub idempotent: bool,
    /// How often, and how far apart, a failed attempt is tried again.
    #[serde(default)]
    pub retry: Retry,
    /// Capabilities a node must have to run this step: `name = "value"`
    /// (exactly that value) or `name = "*"` (any value). Empty: the step
    /// runs on the app server's own step hosts. A kind's use of the step
    /// can add to these (and take values from the action).
    #[serde(default)]
    pub requires: BTreeMap<String, String>,
    /// How long a step that requires capabilities waits for a matching node
    /// before it fails.
    #[serde(default = "default_placement_timeout")]
    pub placement_timeout_ms: u64,
    /// The settings that decide where the step sends what it is given: a
    /// URL, a host, a program to run. A kind that gives the step a secret
    /// may not let a request choose these (see [`Manifest::check_new`]).
    /// Unset, every setting counts; `[]` says the step sends nothing
    /// anywhere its settings choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destinations: Option<Vec<String>>,
}

fn default_placement_timeout() -> u64 {
    300_000
}

/// A step's retry policy: `retry = { attempts = 3, backoff_ms = 1000 }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Attempts in all, counting the first.
    #[serde(default = "one")]
    pub attempts: u32,
    /// The wait before the second attempt; it doubles after each retry.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// The longest wait between attempts.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
}

fn one() -> u32 {
    1
}

fn default_backoff() -> u64 {
    1000
}

fn default_max_backoff() -> u64 {
    60_000
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 1,
            backoff_ms: default_backoff(),
            max_backoff_ms: default_max_backoff(),
        }
    }
}

impl Retry {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        Duration::from_millis(
            self.backoff_ms
                .saturating_mul(factor)
                .min(self.max_backoff_ms),
        )
    }
}

/// An action kind: an ordered list of step uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindDef {
    /// One line for `troupe kinds`.
    #[serde(default)]
    pub description: String,
    /// The params a request for this kind carries: a list of required
    /// names, or a table of typed schemas (see `params.rs`).
    #[serde(default)]
    pub params: Params,
    /// The steps, in the order they run.
    pub steps: Vec<StepUse>,
}

/// One use of a step in a kind, with its settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepUse {
    /// The step it uses: a `[steps.NAME]` of the same manifest.
    pub step: String,
    /// The name this use goes by in the action (and in `{{steps.NAME…}}`);
    /// defaults to the step's name. Unique within the kind.
    #[serde(default)]
    pub name: Option<String>,
    /// Settings handed to the step, with `{{…}}` templates.
    #[serde(default = "empty_object", rename = "with")]
    pub settings: Value,
    /// Capabilities a node must have to run this use of the step, over the
    /// step's own `requires`; values may be templates
    /// (`node = "{{params.hypervisor}}"`).
    #[serde(default)]
    pub requires: BTreeMap<String, String>,
    /// The limits each attempt of this use holds while it runs: a limit of
    /// the manifest's `[limits]` to the key it holds, a template
    /// (`power = "{{target.site}}"`). A key that names a target attribute
    /// the record lacks, or resolves to nothing, holds no slot of that limit.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl StepDef {
    /// The exported function step `name` calls: its `function`, or its name.
    pub fn function<'a>(&'a self, name: &'a str) -> &'a str {
        self.function.as_deref().unwrap_or(name)
    }

    /// `timeout_ms` as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// `placement_timeout_ms` as a duration.
    pub fn placement_timeout(&self) -> Duration {
        Duration::from_millis(self.placement_timeout_ms)
    }
}

impl StepUse {
    /// The name this use goes by: its `name`, or the step's.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.step)
    }

    /// What a node must have to run this use of `def`: the step's
    /// requirements with this use's over them (templates unresolved).
    pub fn requires(&self, def: &StepDef) -> BTreeMap<String, String> {
        let mut all = def.requires.clone();
        all.extend(self.requires.clone());
        all
    }
}

impl Manifest {
    /// Reads and checks a manifest: every rule a loaded bundle must meet ([`Manifest::check_new`] adds those for new ones).
    pub fn parse(text: &str) -> Result<Manifest, Invalid> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(Invalid::OverLimit(format!(
                "the manifest is {} bytes; the limit is {} KiB",
                text.len(),
                MAX_MANIFEST_BYTES >> 10
            )));
        }
        let m: Manifest = toml::from_str(text).map_err(|e| Invalid::Manifest(e.to_string()))?;
        m.check_limits()?;
        m.validate()?;
        Ok(m)
    }

    /// Bounds what one bundle may add to every server's memory and to
    /// every action of its kinds.
    fn check_limits(&self) -> Result<(), Invalid> {
        let over = |what: String, limit: usize| {
            Err(Invalid::OverLimit(format!("{what}; the limit is {limit}")))
        };
        if self.kinds.len() > MAX_KINDS {
            return over(
                format!("the manifest defines {} kinds", self.kinds.len()),
                MAX_KINDS,
            );
        }
        if self.steps.len() > MAX_STEPS {
            return over(
                format!("the manifest defines {} steps", self.steps.len()),
                MAX_STEPS,
            );
        }
        for (name, kind) in &self.kinds {
            if kind.steps.len() > MAX_STEPS {
                return over(
                    format!("kind {name:?} runs {} steps", kind.steps.len()),
                    MAX_STEPS,
                );
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), Invalid> {
        let bad = |msg: String| Err(Invalid::Manifest(msg));
        if self.format != FORMAT {
            return bad(format!(
                "format {} is not supported; this troupe reads format {FORMAT}",
                self.format
            ));
        }
        if !(troupe_sdk::OLDEST_ABI_VERSION..=troupe_sdk::ABI_VERSION).contains(&self.abi) {
            return Err(Invalid::Abi { found: self.abi });
        }
        if !is_name(&self.name) {
            return bad(format!(
                "bundle name {:?} must be letters, digits, '-' or '_'",
                self.name
            ));
        }
        if self.version.trim().is_empty() {
            return bad("version must not be empty".into());
        }
        if !is_name(&self.library) {
            return bad(format!(
                "library {:?} must be letters, digits, '-' or '_'",
                self.library
            ));
        }
        for (name, def) in &self.steps {
            if def.timeout_ms == 0 {
                return bad(format!("step {name:?}: timeout_ms must be above 0"));
            }
            if def.retry.attempts == 0 {
                return bad(format!(
                    "step {name:?}: retry.attempts counts the first attempt and must be at least 1"
                ));
            }
            for (capability, value) in &def.requires {
                check_requirement(capability, value, false)
                    .map_err(|e| Invalid::Manifest(format!("step {name:?}: {e}")))?;
            }
            if def.placement_timeout_ms == 0 {
                return bad(format!(
                    "step {name:?}: placement_timeout_ms must be above 0"
                ));
            }
        }
        for (name, limit) in &self.limits {
            if !crate::names::is_capability_name(name) {
                return bad(format!(
                    "limit name {name:?} must be letters, digits, '_', '-' or '.' (at most 64)"
                ));
            }
            if !(1..=MAX_LIMIT).contains(&limit.max) {
                return bad(format!(
                    "limit {name:?}: max must be 1 to {MAX_LIMIT}, not {}",
                    limit.max
                ));
            }
        }
        for (kind, def) in &self.kinds {
            if !is_name(kind) {
                return bad(format!(
                    "kind name {kind:?} must be letters, digits, '-' or '_'"
                ));
            }
            if def.steps.is_empty() {
                return bad(format!("kind {kind:?} has no steps"));
            }
            for (name, spec) in def.params.specs() {
                spec.check(&name)
                    .map_err(|e| Invalid::Manifest(format!("kind {kind:?}: {e}")))?;
            }
            let mut seen = BTreeSet::new();
            for u in &def.steps {
                if !self.steps.contains_key(&u.step) {
                    return bad(format!(
                        "kind {kind:?} uses step {:?}, which [steps] does not define",
                        u.step
                    ));
                }
                if !seen.insert(u.name()) {
                    return bad(format!(
                        "kind {kind:?} uses the name {:?} twice; give each use a distinct `name`",
                        u.name()
                    ));
                }
                if !u.settings.is_object() {
                    return bad(format!(
                        "kind {kind:?}, step {:?}: `with` must be a table",
                        u.name()
                    ));
                }
                check_templates(kind, def, u, &seen).map_err(|e| {
                    Invalid::Manifest(format!("kind {kind:?}, step {:?}: {e}", u.name()))
                })?;
                for (limit, key) in &u.limits {
                    self.check_limit_use(limit, key)
                        .and_then(|()| check_paths(kind, def, u, &seen, &Value::from(key.as_str())))
                        .map_err(|e| {
                            Invalid::Manifest(format!("kind {kind:?}, step {:?}: {e}", u.name()))
                        })?;
                }
                for (capability, value) in &u.requires {
                    check_requirement(capability, value, true)
                        .and_then(|()| {
                            check_paths(kind, def, u, &seen, &Value::from(value.as_str()))
                        })
                        .map_err(|e| {
                            Invalid::Manifest(format!("kind {kind:?}, step {:?}: {e}", u.name()))
                        })?;
                }
            }
        }
        Ok(())
    }

    /// A step use's `limits` entry: a declared limit, and a key that names
    /// no secret (keys are shown to operators while a step waits) nor an
    /// earlier step's output (a key is known before the step starts).
    fn check_limit_use(&self, limit: &str, key: &str) -> Result<(), String> {
        if !self.limits.contains_key(limit) {
            return Err(format!(
                "limits: {limit:?} is not a limit of this manifest; declare it in [limits.{limit}] with its max"
            ));
        }
        if key.trim().is_empty() {
            return Err(format!(
                "limits: {limit} = \"\" holds no key; give a template such as \"{{{{params.bmc}}}}\""
            ));
        }
        let paths = crate::template::paths(&Value::from(key))?;
        if let Some(path) = paths
            .iter()
            .find(|p| p.starts_with("secrets.") || p.starts_with("steps."))
        {
            return Err(format!(
                "limits: {limit} = {key:?}: a limit's key may not use {{{{{path}}}}}; keys are shown to operators \
                 and known before the step starts"
            ));
        }
        Ok(())
    }

    /// The exported functions the library must provide.
    pub fn functions(&self) -> BTreeSet<&str> {
        self.steps
            .iter()
            .map(|(name, def)| def.function(name))
            .collect()
    }

    /// The rules a new bundle must meet beyond what loading checks (bundles
    /// stored before a rule existed still load): a semver version; no
    /// template naming an optional param that has no default — it would
    /// have no value when a request leaves the param out; and no secret
    /// sent where a request points (see `crate::destinations`).
    pub fn check_new(&self) -> Result<(), Invalid> {
        require_semver(&self.version)?;
        for (kind, def) in &self.kinds {
            let specs = def.params.specs();
            for u in &def.steps {
                crate::destinations::check(def, u, &self.steps[&u.step]).map_err(|e| {
                    Invalid::Manifest(format!("kind {kind:?}, step {:?}: {e}", u.name()))
                })?;
                let mut paths = crate::template::paths(&u.settings).unwrap_or_default();
                for value in u.requires.values().chain(u.limits.values()) {
                    paths.extend(
                        crate::template::paths(&Value::from(value.as_str())).unwrap_or_default(),
                    );
                }
                for path in paths {
                    let Some(p) = path
                        .strip_prefix("params.")
                        .map(|p| p.split('.').next().unwrap_or(p))
                    else {
                        continue;
                    };
                    if specs
                        .get(p)
                        .is_some_and(|s| !s.is_required() && s.default.is_none())
                    {
                        return Err(Invalid::Manifest(format!(
                            "kind {kind:?}, step {:?}: the template {{{{{path}}}}} names param {p:?}, which is optional \
                             with no default, so it has no value when a request leaves it out; give it a `default` \
                             (or make it required)",
                            u.name()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The library's file name on this platform.
    pub fn library_file(&self) -> String {
        format!(
            "{}{}{}",
            std::env::consts::DLL_PREFIX,
            self.library,
            std::env::consts::DLL_SUFFIX
        )
    }
}

/// A requirement `capability = value`: a capability name, and a value that
/// is a literal, `*` (any value), or — in a kind, where there is an action
/// to take it from — a template.
fn check_requirement(capability: &str, value: &str, templates: bool) -> Result<(), String> {
    if !crate::names::is_capability_name(capability) {
        return Err(format!(
            "requires: {capability:?} is not a capability name (letters, digits, '_', '-', '.'; at most 64)"
        ));
    }
    if value.is_empty() {
        return Err(format!(
            "requires: {capability} = \"\" matches nothing; give a value, or \"*\" for any"
        ));
    }
    if value.contains("{{") && !templates {
        return Err(format!(
            "requires: {capability} = {value:?}: a step's own requirements are fixed; take values from the action in the kind that uses it (`requires` on the step use)"
        ));
    }
    let paths = crate::template::paths(&Value::from(value))?;
    if let Some(path) = paths.iter().find(|p| p.starts_with("secrets.")) {
        return Err(format!(
            "requires: {capability} = {value:?}: placement may not use {{{{{path}}}}}; requirements are shown to operators"
        ));
    }
    if let Some(path) = paths.iter().find(|p| p.starts_with("target.")) {
        return Err(format!(
            "requires: {capability} = {value:?}: placement may not use {{{{{path}}}}}; target records are read for a step's settings only"
        ));
    }
    Ok(())
}

/// What a step use's templates may name: the action's target, kind and id,
/// declared params, outputs of earlier steps, and deployment variables. A
/// `shell` setting is run by `sh -c`, so it may hold no request data at all:
/// only literal text and `{{vars.NAME}}`, which the operator configures.
fn check_templates(
    kind: &str,
    def: &KindDef,
    u: &StepUse,
    earlier: &BTreeSet<&str>,
) -> Result<(), String> {
    check_paths(kind, def, u, earlier, &u.settings)?;
    if let Some(shell) = u.settings.get("shell") {
        let Some(text) = shell.as_str() else {
            return Err("`shell` must be a string".into());
        };
        if let Some(path) = crate::template::paths(shell)?
            .into_iter()
            .find(|p| !p.starts_with("vars."))
        {
            return Err(format!(
                "`shell` may not contain {{{{{path}}}}}: a shell command line must not be built from request data \
                 ({text:?}). Pass the value as its own `argv` element or as an `env` variable the script reads (\"$NAME\")"
            ));
        }
    }
    Ok(())
}

/// Checks that every template in `value` names something the step use can see.
fn check_paths(
    kind: &str,
    def: &KindDef,
    u: &StepUse,
    earlier: &BTreeSet<&str>,
    value: &Value,
) -> Result<(), String> {
    for path in crate::template::paths(value)? {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let next = parts.next();
        match (root, next) {
            ("target" | "kind", None) | ("action", Some("id" | "kind" | "target")) => {}
            ("params", Some(p)) if def.params.declares(p) => {}
            ("params", Some(p)) => {
                return Err(format!(
                    "the template {{{{{path}}}}} names param {p:?}, which kind {kind:?} does not declare in `params`"
                ));
            }
            ("steps", Some(s)) if earlier.contains(s) && s != u.name() => {}
            ("steps", Some(s)) => {
                return Err(format!(
                    "the template {{{{{path}}}}} names step {s:?}, which does not run before this one"
                ));
            }
            ("vars", Some(_)) => {}
            ("target", Some(key))
                if crate::names::is_attribute_key(key) && parts.next().is_none() => {}
            // A secret is one string: nothing follows its name.
            ("secrets", Some(name))
                if crate::names::is_secret_name(name) && parts.next().is_none() => {}
            _ => {
                return Err(format!(
                    "the template {{{{{path}}}}} names nothing; use target, target.KEY, kind, action.id, params.NAME, steps.NAME…, vars.NAME or secrets.NAME"
                ));
            }
        }
    }
    Ok(())
}

/// The secrets (`{{secrets.NAME}}`) a step use's settings name.
pub fn secrets_used(u: &StepUse) -> Vec<String> {
    crate::template::paths(&u.settings)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.strip_prefix("secrets.").map(str::to_owned))
        .collect()
}

/// The attributes of its target's record a kind reads: in its steps'
/// settings (`{{target.KEY}}`) and as its params' defaults (`from_target`).
pub fn target_keys_used(def: &KindDef) -> BTreeSet<String> {
    def.steps
        .iter()
        .flat_map(|u| crate::template::paths(&u.settings).unwrap_or_default())
        .filter_map(|p| p.strip_prefix("target.").map(str::to_owned))
        .chain(
            def.params
                .specs()
                .into_values()
                .filter_map(|s| s.from_target),
        )
        .collect()
}

/// The deployment variables a kind uses: in its steps' templates
/// (`{{vars.NAME}}`) and as its params' allowlists (`allowed_in`).
pub fn vars_used(def: &KindDef) -> BTreeSet<String> {
    def.steps
        .iter()
        .flat_map(|u| crate::template::paths(&u.settings).unwrap_or_default())
        .chain(
            def.params
                .specs()
                .into_values()
                .filter_map(|s| s.allowed_in),
        )
        .filter_map(|p| p.strip_prefix("vars.").map(str::to_owned))
        .collect()
}

/// New bundles need a semver version (`troupe bundle build` and push check
/// this; bundles stored before it was required still load).
pub fn require_semver(version: &str) -> Result<(), Invalid> {
    semver::Version::parse(version).map(drop).map_err(|e| {
        Invalid::Manifest(format!(
            "version {version:?} is not semantic versioning (MAJOR.MINOR.PATCH, e.g. 1.4.0 or 2.0.0-rc.1): {e}"
        ))
    })
}

/// Orders versions by semver precedence: `1.0.0-rc.1` < `1.0.0` <
/// `1.0.1`, build metadata ignored (`1.0.0+a` and `1.0.0+b` are the same
/// version). A version stored before versions had to be semver is compared
/// by its dot-separated parts.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp_precedence(&b),
        _ => compare_dotted(a, b),
    }
}

/// Dot-separated parts, numerically where both parts are numbers
/// (`1.10.0` > `1.9.3`), as text otherwise.
fn compare_dotted(a: &str, b: &str) -> std::cmp::Ordering {
    let mut left = a.split(['.', '-', '+']);
    let mut right = b.split(['.', '-', '+']);
    loop {
        match (left.next(), right.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(x), Some(y)) => {
                let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => x.cmp(y),
                };
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        format = 1
        name = "t"
        version = "1.0.0"
        abi = 1
        library = "t"
        [steps.a]
        timeout_ms = 10
        [kinds.k]
        steps = [{ step = "a" }, { step = "a", name = "again", with = { x = 1 } }]
    "#;

    #[test]
    fn parses_and_defaults() {
        let m = Manifest::parse(GOOD).unwrap();
        let k = &m.kinds["k"];
        assert_eq!(k.steps[0].name(), "a");
        assert_eq!(k.steps[1].name(), "again");
        assert_eq!(m.steps["a"].retry.attempts, 1);
        assert_eq!(m.functions().into_iter().collect::<Vec<_>>(), ["a"]);
    }

    fn refused(text: &str) -> String {
        match Manifest::parse(text) {
            Err(Invalid::Manifest(m)) => m,
            other => panic!("accepted: {other:?}"),
        }
    }

    /// A template names only what the step can see when it runs.
    #[test]
    fn templates_name_only_what_runs_before() {
        let with = |w: &str| GOOD.replace("with = { x = 1 }", &format!("with = {w}"));
        Manifest::parse(&with(
            "{ x = \"{{steps.a.out}}\", p = \"{{secrets.bmc_pw}}\" }",
        ))
        .unwrap();
        assert!(refused(&with("{ x = \"{{steps.again.out}}\" }")).contains("does not run before"));
        assert!(refused(&with("{ x = \"{{steps.later.out}}\" }")).contains("does not run before"));
        assert!(refused(&with("{ x = \"{{secrets.a/b}}\" }")).contains("names nothing"));
        assert!(refused(&with("{ x = \"{{secrets.a.b}}\" }")).contains("names nothing"));
        // A shell command line is built from vars only.
        Manifest::parse(&with("{ shell = \"ping {{vars.gw}}\" }")).unwrap();
        let err = refused(&with("{ shell = \"ping {{target}}\" }"));
        assert!(err.contains("`shell` may not contain {{target}}"), "{err}");
        assert!(refused(&with("{ shell = [\"ls\"] }")).contains("must be a string"));
    }

    #[test]
    fn names_are_letters_digits_dashes_and_underscores() {
        for ok in ["a", "b-2_c", &"n".repeat(128)] {
            Manifest::parse(&GOOD.replace("name = \"t\"", &format!("name = \"{ok}\""))).unwrap();
        }
        for bad in ["", "a.b", "a b", &"n".repeat(129)] {
            let err = refused(&GOOD.replace("name = \"t\"", &format!("name = \"{bad}\"")));
            assert!(err.contains("bundle name"), "{bad:?}: {err}");
        }
        let m =
            Manifest::parse(&GOOD.replace("library = \"t\"", "library = \"my_steps\"")).unwrap();
        assert_eq!(
            m.library_file(),
            format!(
                "{}my_steps{}",
                std::env::consts::DLL_PREFIX,
                std::env::consts::DLL_SUFFIX
            )
        );
    }

    #[test]
    fn vars_used_lists_templates_and_allowlists() {
        let m = Manifest::parse(&GOOD.replace(
            "[kinds.k]",
            "[kinds.k]\n        params.bmc = { type = \"string\", allowed_in = \"vars.bmc_hosts\" }",
        ).replace("with = { x = 1 }", "with = { x = \"{{vars.gw}}/{{params.bmc}}\" }"))
        .unwrap();
        assert_eq!(
            vars_used(&m.kinds["k"]).into_iter().collect::<Vec<_>>(),
            ["bmc_hosts", "gw"]
        );
    }

    /// The defaults the manifest format documents.
    #[test]
    fn retry_and_timeout_defaults() {
        let m = Manifest::parse(&GOOD.replace(
            "timeout_ms = 10\n",
            "timeout_ms = 10\n        retry = { backoff_ms = 5 }\n",
        ))
        .unwrap();
        let a = &m.steps["a"];
        assert_eq!(a.retry.attempts, 1);
        assert_eq!(a.timeout(), Duration::from_millis(10));
        assert_eq!(a.placement_timeout(), Duration::from_secs(300));
        let m = Manifest::parse(&GOOD.replace(
            "timeout_ms = 10\n",
            "timeout_ms = 10\n        retry = { attempts = 3 }\n",
        ))
        .unwrap();
        let retry = &m.steps["a"].retry;
        assert_eq!((retry.backoff_ms, retry.max_backoff_ms), (1000, 60_000));
    }

    /// Each limit takes its own value and refuses one more.
    #[test]
    fn limits_are_inclusive() {
        let over = |text: &str| matches!(Manifest::parse(text), Err(Invalid::OverLimit(_)));
        let kinds = |n: usize| {
            let mut t = GOOD.to_owned();
            for i in 0..n - 1 {
                t.push_str(&format!("\n[kinds.k{i}]\nsteps = [{{ step = \"a\" }}]\n"));
            }
            t
        };
        Manifest::parse(&kinds(MAX_KINDS)).unwrap();
        assert!(over(&kinds(MAX_KINDS + 1)));
        let steps = |n: usize| {
            let mut t = GOOD.to_owned();
            for i in 0..n - 1 {
                t.push_str(&format!("\n[steps.s{i}]\ntimeout_ms = 10\n"));
            }
            t
        };
        Manifest::parse(&steps(MAX_STEPS)).unwrap();
        assert!(over(&steps(MAX_STEPS + 1)));
        let uses = |n: usize| {
            let list: Vec<String> = (0..n)
                .map(|i| format!("{{ step = \"a\", name = \"u{i}\" }}"))
                .collect();
            format!("{}\n[kinds.long]\nsteps = [{}]\n", GOOD, list.join(", "))
        };
        Manifest::parse(&uses(MAX_STEPS)).unwrap();
        assert!(over(&uses(MAX_STEPS + 1)));
        let padded = |n: usize| {
            let mut t = GOOD.to_owned();
            t.push('#');
            t.push_str(&"x".repeat(n - t.len()));
            t
        };
        Manifest::parse(&padded(MAX_MANIFEST_BYTES)).unwrap();
        assert!(over(&padded(MAX_MANIFEST_BYTES + 1)));
    }

    /// A template needs a value whenever the step runs: an optional param
    /// with no default has none when a request leaves it out, so naming it
    /// is refused at build time, not found at run time.
    #[test]
    fn a_template_of_an_optional_param_needs_its_default() {
        let optional = GOOD
            .replace(
                "[kinds.k]",
                "[kinds.k]\n        params.delay_ms = { type = \"integer\", required = false }",
            )
            .replace("with = { x = 1 }", "with = { x = \"{{params.delay_ms}}\" }");
        // Loading still takes it (a bundle stored before the rule loads);
        // building or pushing a new one does not.
        let m = Manifest::parse(&optional).unwrap();
        match m.check_new() {
            Err(Invalid::Manifest(m)) => {
                assert!(m.contains("delay_ms") && m.contains("default"), "{m}")
            }
            other => panic!("accepted: {other:?}"),
        }
        let defaulted = optional.replace("required = false", "default = 0");
        Manifest::parse(&defaulted).unwrap().check_new().unwrap();
    }

    /// A step use names declared limits by key templates; a key is shown to
    /// operators and known before the step starts, so it names no secret
    /// and no step output; a max is 1 to MAX_LIMIT.
    #[test]
    fn limits_are_declared_and_their_keys_checked() {
        let limited = format!(
            "{}\n[limits.bmc]\nmax = 1\n[limits.site]\ndescription = \"power at once in a site\"\nmax = {MAX_LIMIT}\n",
            GOOD.replace(
                "[kinds.k]",
                "[kinds.k]\n        params.bmc = { type = \"string\" }",
            )
            .replace(
                "{ step = \"a\" }",
                "{ step = \"a\", limits = { bmc = \"{{params.bmc}}\", site = \"{{target.site}}\" } }",
            )
        );
        let m = Manifest::parse(&limited).unwrap();
        m.check_new().unwrap();
        assert_eq!(m.limits["bmc"].max, 1);
        assert_eq!(m.limits["site"].max, MAX_LIMIT);
        assert_eq!(
            format!("{:?}", m.kinds["k"].steps[0].limits),
            r#"{"bmc": "{{params.bmc}}", "site": "{{target.site}}"}"#
        );
        assert!(m.kinds["k"].steps[1].limits.is_empty());
        // A target attribute a limit's key reads is not required at submit:
        // a target without it is not limited by it.
        assert!(target_keys_used(&m.kinds["k"]).is_empty());

        let refused = |from: &str, to: &str, why: &str| {
            let text = limited.replace(from, to);
            match Manifest::parse(&text) {
                Err(Invalid::Manifest(m)) => assert!(m.contains(why), "{to}: {m}"),
                other => panic!("{to}: {other:?}"),
            }
        };
        refused(
            "bmc = \"{{params.bmc}}\"",
            "rack = \"{{params.bmc}}\"",
            "declare it in [limits.rack]",
        );
        refused("bmc = \"{{params.bmc}}\"", "bmc = \" \"", "holds no key");
        refused(
            "bmc = \"{{params.bmc}}\"",
            "bmc = \"{{secrets.pw}}\"",
            "may not use {{secrets.pw}}",
        );
        refused(
            "bmc = \"{{params.bmc}}\"",
            "bmc = \"{{steps.a.x}}\"",
            "may not use {{steps.a.x}}",
        );
        refused(
            "bmc = \"{{params.bmc}}\"",
            "bmc = \"{{params.nope}}\"",
            "does not declare",
        );
        refused("max = 1\n", "max = 0\n", "max must be 1 to");
        refused(
            &format!("max = {MAX_LIMIT}"),
            &format!("max = {}", MAX_LIMIT + 1),
            "max must be 1 to",
        );
        refused("[limits.bmc]", "[limits.\"b c\"]", "limit name");
    }

    #[test]
    fn requirements_merge_and_are_checked() {
        let placed = GOOD
            .replace(
                "timeout_ms = 10\n",
                "timeout_ms = 10\n        requires = { hypervisor = \"kvm\", gpu = \"*\" }\n",
            )
            .replace(
                "[kinds.k]",
                "[kinds.k]\n        params.hv = { type = \"string\" }",
            )
            .replace(
                "{ step = \"a\" }",
                "{ step = \"a\", requires = { node = \"{{params.hv}}\", gpu = \"a100\" } }",
            );
        let m = Manifest::parse(&placed).unwrap();
        let def = &m.steps["a"];
        assert_eq!(def.placement_timeout_ms, 300_000);
        let merged = m.kinds["k"].steps[0].requires(def);
        assert_eq!(
            format!("{merged:?}"),
            r#"{"gpu": "a100", "hypervisor": "kvm", "node": "{{params.hv}}"}"#
        );
        assert_eq!(m.kinds["k"].steps[1].requires(def).len(), 2);

        let refused = |from: &str, to: &str, why: &str| {
            let text = placed.replace(from, to);
            match Manifest::parse(&text) {
                Err(Invalid::Manifest(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("{to}: {other:?}"),
            }
        };
        refused(
            "hypervisor = \"kvm\"",
            "hypervisor = \"{{params.hv}}\"",
            "are fixed",
        );
        refused(
            "hypervisor = \"kvm\"",
            "\"has space\" = \"kvm\"",
            "not a capability name",
        );
        refused("gpu = \"*\"", "gpu = \"\"", "matches nothing");
        refused("{{params.hv}}", "{{params.nope}}", "does not declare");
        refused(
            "{{params.hv}}",
            "{{secrets.bmc}}",
            "may not use {{secrets.bmc}}",
        );
        refused(
            "requires = { hypervisor",
            "placement_timeout_ms = 0\n        requires = { hypervisor",
            "placement_timeout_ms",
        );
    }

    #[test]
    fn rejects_duplicate_use_names_and_unknown_steps() {
        let dup = GOOD.replace("name = \"again\", ", "");
        assert!(matches!(Manifest::parse(&dup), Err(Invalid::Manifest(m)) if m.contains("twice")));
        let unknown = GOOD.replace("{ step = \"a\" }", "{ step = \"b\" }");
        assert!(
            matches!(Manifest::parse(&unknown), Err(Invalid::Manifest(m)) if m.contains("does not define"))
        );
        let abi = GOOD.replace("abi = 1", "abi = 99");
        assert!(matches!(
            Manifest::parse(&abi),
            Err(Invalid::Abi { found: 99 })
        ));
    }

    #[test]
    fn versions_compare_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("1.10.0", "1.9.3"), Greater);
        assert_eq!(compare_versions("0.1.0", "0.1.0"), Equal);
        assert_eq!(compare_versions("0.1", "0.1.1"), Less);
        assert_eq!(compare_versions("2", "10"), Less);
    }

    #[test]
    fn versions_follow_semver_precedence() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("1.0.0", "1.0.0-rc1"), Greater);
        assert_eq!(compare_versions("1.0.0-rc.2", "1.0.0-rc.1"), Greater);
        assert_eq!(compare_versions("1.0.0-alpha", "1.0.0-alpha.1"), Less);
        assert_eq!(compare_versions("1.0.0-rc.10", "1.0.0-rc.9"), Greater);
        assert_eq!(compare_versions("1.0.0+build.5", "1.0.0+build.4"), Equal);
        assert_eq!(compare_versions("2.0.0", "10.0.0"), Less);
    }

    #[test]
    fn versions_must_be_semver() {
        assert!(
            matches!(require_semver("v1"), Err(Invalid::Manifest(m)) if m.contains("semantic"))
        );
        assert!(matches!(require_semver("1"), Err(Invalid::Manifest(_))));
        require_semver("2.0.0-rc.1+b7").unwrap();
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = Retry {
            attempts: 5,
            backoff_ms: 100,
            max_backoff_ms: 350,
        };
        assert_eq!(r.backoff(1), Duration::from_millis(100));
        assert_eq!(r.backoff(2), Duration::from_millis(200));
        assert_eq!(r.backoff(3), Duration::from_millis(350));
    }
}
