//! `{{path}}` templates in step settings, resolved against the action and the
//! outputs of earlier steps just before a step runs.
//!
//! A string that is exactly one template takes the value's JSON type
//! (`"{{params.port}}"` can become the number 22); a template inside a longer
//! string is interpolated as text. Paths: `target`, `kind`, `action.id`,
//! `params.NAME`, `steps.NAME.FIELD…` (an earlier step's output),
//! `target.KEY` (an attribute of the target's record, which the runner
//! reads when the step starts and adds with [`with_record`]).

use serde_json::{Map, Value, json};

/// The action a step runs for, as templates and the step see it.
#[derive(Debug, Clone, Copy)]
pub struct Action<'a> {
    /// The action's id.
    pub id: i64,
    /// Its kind.
    pub kind: &'a str,
    /// What it acts on.
    pub target: &'a str,
    /// Its params, defaults filled in.
    pub params: &'a Map<String, Value>,
}

/// What templates resolve against: the action, the outputs of the steps
/// that succeeded so far (`steps`) and the deployment variables (`vars`).
/// The runner adds `secrets` for a step's settings.
pub fn scope(action: Action<'_>, outputs: &Map<String, Value>, vars: &Map<String, Value>) -> Value {
    json!({
        "action": { "id": action.id, "kind": action.kind, "target": action.target, "params": action.params },
        "target": action.target,
        "kind": action.kind,
        "params": action.params,
        "steps": outputs,
        "vars": vars,
    })
}

/// Adds the target's record to `scope`, for `{{target.KEY}}`: its
/// attributes, or `None` when the target has none.
pub fn with_record(scope: &mut Value, record: Option<&Map<String, Value>>) {
    scope["record"] = match record {
        Some(r) => Value::Object(r.clone()),
        None => Value::Null,
    };
}

/// The input a step is called with (`troupe_sdk::StepInput`): the action
/// from `scope`, the resolved settings, earlier outputs, the attempt, and
/// the bundle's name, version and hash.
pub fn input(
    scope: &Value,
    settings: Value,
    outputs: &Map<String, Value>,
    attempt: u32,
    bundle: [&str; 3],
) -> Value {
    let [name, version, hash] = bundle;
    json!({
        "action": scope["action"],
        "settings": settings,
        "outputs": outputs,
        "attempt": attempt,
        "bundle": { "name": name, "version": version, "hash": hash },
    })
}

/// Resolves every `{{…}}` in `settings` against `scope`.
pub fn resolve(settings: &Value, scope: &Value) -> Result<Value, String> {
    Ok(match settings {
        Value::String(s) => resolve_str(s, scope)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve(v, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), resolve(v, scope)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn resolve_str(s: &str, scope: &Value) -> Result<Value, String> {
    if !s.contains("{{") {
        return Ok(Value::String(s.to_owned()));
    }
    let trimmed = s.trim();
    if let Some(inner) = trimmed
        .strip_prefix("{{")
        .and_then(|r| r.strip_suffix("}}"))
        && !inner.contains("{{")
    {
        return lookup(inner.trim(), scope).cloned();
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed template in {s:?}"))?;
        match lookup(after[..end].trim(), scope)? {
            Value::String(v) => out.push_str(v),
            v => out.push_str(&v.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

/// The path of every `{{…}}` in `settings` (unclosed ones are errors).
pub fn paths(settings: &Value) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    collect(settings, &mut out)?;
    Ok(out)
}

fn collect(v: &Value, out: &mut Vec<String>) -> Result<(), String> {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(start) = rest.find("{{") {
                let after = &rest[start + 2..];
                let end = after
                    .find("}}")
                    .ok_or_else(|| format!("unclosed template in {s:?}"))?;
                out.push(after[..end].trim().to_owned());
                rest = &after[end + 2..];
            }
        }
        Value::Array(items) => items.iter().try_for_each(|i| collect(i, out))?,
        Value::Object(map) => map.values().try_for_each(|i| collect(i, out))?,
        _ => {}
    }
    Ok(())
}

fn lookup<'a>(path: &str, scope: &'a Value) -> Result<&'a Value, String> {
    if let Some(key) = path.strip_prefix("target.") {
        let target = scope["target"].as_str().unwrap_or_default();
        return match &scope["record"] {
            Value::Object(record) => record.get(key).ok_or_else(|| {
                format!(
                    "template {{{{{path}}}}}: target {target:?}'s record has no attribute {key:?}; \
                     set it with `troupe targets set {target} {key}=…`"
                )
            }),
            _ => Err(format!(
                "template {{{{{path}}}}}: target {target:?} has no record; \
                 make one with `troupe targets set {target} {key}=…`"
            )),
        };
    }
    let mut cur = scope;
    for part in path.split('.') {
        let next = match cur {
            Value::Object(m) => m.get(part),
            Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        cur = next.ok_or_else(|| format!("template {{{{{path}}}}} has no value (no {part:?})"))?;
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_templates_keep_types_and_inner_ones_interpolate() {
        let scope = json!({ "target": "vps-1", "params": { "port": 22, "h": "10.0.0.5" }, "steps": { "a": { "out": [1, 2] } } });
        let got = resolve(
            &json!({ "port": "{{params.port}}", "addr": "{{ params.h }}:{{params.port}}", "n": "{{steps.a.out.1}}", "plain": 3 }),
            &scope,
        )
        .unwrap();
        assert_eq!(
            got,
            json!({ "port": 22, "addr": "10.0.0.5:22", "n": 2, "plain": 3 })
        );
    }

    #[test]
    fn target_attributes_come_from_the_record() {
        let mut scope = json!({ "target": "vps-1" });
        let err = resolve(&json!("{{target.bmc}}"), &scope).unwrap_err();
        assert!(err.contains("\"vps-1\" has no record"), "{err}");
        let record = json!({ "bmc": "https://10.0.0.5" });
        with_record(&mut scope, record.as_object());
        let got = resolve(
            &json!({ "t": "{{target}}", "b": "{{target.bmc}}/redfish" }),
            &scope,
        )
        .unwrap();
        assert_eq!(
            got,
            json!({ "t": "vps-1", "b": "https://10.0.0.5/redfish" })
        );
        let err = resolve(&json!("{{target.hypervisor}}"), &scope).unwrap_err();
        assert!(
            err.contains("record has no attribute \"hypervisor\"")
                && err.contains("troupe targets set vps-1 hypervisor="),
            "{err}"
        );
    }

    #[test]
    fn paths_lists_every_template_in_strings_arrays_and_objects() {
        let settings = json!({ "argv": ["{{a}}", "x-{{ params.p }}-{{vars.v}}"], "n": 1, "o": { "k": "{{steps.s.f}}" } });
        assert_eq!(
            paths(&settings).unwrap(),
            ["a", "params.p", "vars.v", "steps.s.f"]
        );
        assert!(paths(&json!(["{{a"])).is_err());
    }

    /// What a step is called with, as `troupe_sdk::StepInput` reads it.
    #[test]
    fn scope_and_input_carry_the_action() {
        let params = json!({ "port": 22 });
        let params = params.as_object().unwrap();
        let outputs = json!({ "a": { "ip": "10.0.0.5" } });
        let outputs = outputs.as_object().unwrap();
        let vars = json!({ "dc": "fra" });
        let action = Action {
            id: 7,
            kind: "reboot",
            target: "vps-1",
            params,
        };
        let scope = scope(action, outputs, vars.as_object().unwrap());
        let resolved = resolve(
            &json!("{{action.id}} {{kind}} {{target}} {{action.target}} {{params.port}} {{steps.a.ip}} {{vars.dc}} {{action.params.port}}"),
            &scope,
        )
        .unwrap();
        assert_eq!(resolved, json!("7 reboot vps-1 vps-1 22 10.0.0.5 fra 22"));
        let input = input(&scope, json!({ "s": 1 }), outputs, 2, ["b", "1.0.0", "abc"]);
        assert_eq!(
            input,
            json!({
                "action": { "id": 7, "kind": "reboot", "target": "vps-1", "params": { "port": 22 } },
                "settings": { "s": 1 },
                "outputs": { "a": { "ip": "10.0.0.5" } },
                "attempt": 2,
                "bundle": { "name": "b", "version": "1.0.0", "hash": "abc" },
            })
        );
    }

    #[test]
    fn missing_values_are_errors() {
        let err = resolve(&json!("{{params.nope}}"), &json!({ "params": {} })).unwrap_err();
        assert!(err.contains("params.nope"), "{err}");
        assert!(resolve(&json!("x {{params"), &json!({})).is_err());
    }
}
