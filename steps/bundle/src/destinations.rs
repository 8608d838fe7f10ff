//! Secrets go only where the operator said: a kind that gives a step a
//! secret may not let a request choose where that step sends it.
//!
//! A step definition names its destination settings (`destinations`: the
//! settings that decide where it sends what it is given — `http_request`'s
//! `url`, `run_command`'s `argv`, `shell`, `cwd` and `env`; unset, every
//! setting). In a step use whose settings name a `{{secrets.…}}`, a
//! destination setting may hold only literal text, `{{vars.…}}`,
//! `{{kind}}`, `{{action.id}}`, and params checked against an operator's
//! list (`allowed_in = "vars.NAME"` on the param, enforced at submit). The
//! target and earlier steps' outputs are request data too, and have no
//! list, so they are refused there. In a URL, only the part up to the first
//! `/`, `?` or `#` after `scheme://` decides where it goes: templates in the
//! path and query are not destinations.

use serde_json::Value;

use crate::manifest::{KindDef, StepDef, StepUse, secrets_used};

/// Checks one step use of `kind` (new bundles only: a rule bundles stored
/// before it must still load without).
pub(crate) fn check(kind: &KindDef, u: &StepUse, def: &StepDef) -> Result<(), String> {
    let secrets = secrets_used(u);
    let Some(secret) = secrets.first() else {
        return Ok(());
    };
    let Value::Object(settings) = &u.settings else {
        return Ok(());
    };
    let specs = kind.params.specs();
    for (name, value) in settings {
        if def
            .destinations
            .as_ref()
            .is_some_and(|d| !d.iter().any(|d| d == name))
        {
            continue;
        }
        for path in deciding_paths(value)? {
            let mut parts = path.split('.');
            let chosen_by_request = match (parts.next(), parts.next()) {
                (Some("params"), Some(p)) => specs.get(p).is_none_or(|s| s.allowed_in.is_none()),
                (Some("target"), None) | (Some("action"), Some("target")) => true,
                (Some("steps"), _) => true,
                _ => false,
            };
            if chosen_by_request {
                return Err(format!(
                    "the step is given {{{{secrets.{secret}}}}}, and its setting `{name}` (where it sends what it \
                     is given) takes {{{{{path}}}}} from the request: whoever submits could send the secret \
                     anywhere. Fix the destination in the manifest or a deployment variable ({{{{vars.NAME}}}}), \
                     or check the param against the operator's list: `params.P = {{ type = \"string\", \
                     allowed_in = \"vars.NAME\" }}`"
                ));
            }
        }
    }
    Ok(())
}

/// The template paths in a destination setting that decide where it
/// points: all of them, except in a string that starts `scheme://`, those
/// past the end of the URL's authority.
fn deciding_paths(value: &Value) -> Result<Vec<String>, String> {
    let Value::String(text) = value else {
        return crate::template::paths(value);
    };
    let Some(scheme_end) = text.find("://").filter(|&i| !text[..i].contains("{{")) else {
        return crate::template::paths(value);
    };
    let rest = &text[scheme_end + 3..];
    let mut end = rest.len();
    let mut i = 0;
    while i < rest.len() {
        if rest[i..].starts_with("{{") {
            match rest[i..].find("}}") {
                Some(close) => i += close + 2,
                None => break,
            }
            continue;
        }
        if matches!(rest.as_bytes()[i], b'/' | b'?' | b'#') {
            end = i;
            break;
        }
        i += 1;
    }
    crate::template::paths(&Value::from(&rest[..end]))
}

#[cfg(test)]
mod tests {
    use crate::Invalid;
    use crate::manifest::Manifest;

    fn manifest(step: &str, params: &str, with: &str) -> String {
        format!(
            r#"
            format = 1
            name = "t"
            version = "1.0.0"
            abi = 2
            library = "t"
            [steps.http]
            timeout_ms = 10
            destinations = ["url"]
            [steps.any]
            timeout_ms = 10
            [kinds.k]
            {params}
            steps = [{{ step = "{step}", with = {with} }}]
            "#
        )
    }

    fn checked(step: &str, params: &str, with: &str) -> Result<(), String> {
        let m = Manifest::parse(&manifest(step, params, with)).map_err(|e| e.to_string())?;
        m.check_new().map_err(|e| match e {
            Invalid::Manifest(m) => m,
            other => other.to_string(),
        })
    }

    const BMC: &str = r#"params.bmc = { type = "string" }"#;
    const LISTED: &str = r#"params.bmc = { type = "string", allowed_in = "vars.bmc_hosts" }"#;
    const AUTH: &str = r#"headers = { Authorization = "Basic {{secrets.bmc}}" }"#;

    #[test]
    fn a_secret_may_not_go_where_the_request_points() {
        for (params, with) in [
            (
                BMC,
                format!("{{ url = \"https://{{{{params.bmc}}}}/reset\", {AUTH} }}"),
            ),
            (BMC, format!("{{ url = \"{{{{params.bmc}}}}\", {AUTH} }}")),
            (
                BMC,
                format!("{{ url = \"https://x@{{{{params.bmc}}}}\", {AUTH} }}"),
            ),
            (
                "",
                format!("{{ url = \"https://{{{{target}}}}/\", {AUTH} }}"),
            ),
            (
                "",
                format!("{{ url = \"https://{{{{action.target}}}}/\", {AUTH} }}"),
            ),
        ] {
            let err = checked("http", params, &with).unwrap_err();
            assert!(
                err.contains("takes {{") && err.contains("`url`") && err.contains("allowed_in"),
                "{with}: {err}"
            );
        }
        // A step that declares no destinations: every setting is one.
        let err = checked(
            "any",
            BMC,
            "{ host = \"{{params.bmc}}\", password = \"{{secrets.pw}}\" }",
        )
        .unwrap_err();
        assert!(err.contains("`host`"), "{err}");
    }

    /// An earlier step's output is request data too: a lookup step could
    /// return any host.
    #[test]
    fn an_earlier_output_may_not_point_a_secret() {
        let text = r#"
            format = 1
            name = "t"
            version = "1.0.0"
            abi = 2
            library = "t"
            [steps.http]
            timeout_ms = 10
            destinations = ["url"]
            [steps.any]
            timeout_ms = 10
            [kinds.k]
            steps = [
                { step = "any" },
                { step = "http", with = { url = "https://{{steps.any.host}}/", headers = { A = "{{secrets.bmc}}" } } },
            ]
            "#;
        let m = Manifest::parse(text).unwrap();
        let err = m.check_new().unwrap_err().to_string();
        assert!(
            err.contains("takes {{steps.any.host}} from the request"),
            "{err}"
        );
        Manifest::parse(&text.replace("{{secrets.bmc}}", "x"))
            .unwrap()
            .check_new()
            .unwrap();
    }

    #[test]
    fn fixed_or_listed_destinations_take_secrets() {
        for (params, with) in [
            (
                LISTED,
                format!("{{ url = \"https://{{{{params.bmc}}}}/reset\", {AUTH} }}"),
            ),
            (
                BMC,
                format!(
                    "{{ url = \"https://{{{{vars.bmc}}}}/r/{{{{params.bmc}}}}?x={{{{params.bmc}}}}\", {AUTH} }}"
                ),
            ),
            (
                BMC,
                format!(
                    "{{ url = \"https://bmc.example/{{{{params.bmc}}}}\", {AUTH}, body = \"{{{{params.bmc}}}}\" }}"
                ),
            ),
            // Without a secret, the request may point anywhere.
            (BMC, "{ url = \"https://{{params.bmc}}/\" }".to_owned()),
        ] {
            checked("http", params, &with).unwrap_or_else(|e| panic!("{with}: {e}"));
        }
        checked("any", BMC, "{ password = \"{{secrets.pw}}\" }").unwrap();
    }

    #[test]
    fn stored_bundles_still_load() {
        let text = manifest(
            "http",
            BMC,
            "{ url = \"https://{{params.bmc}}/\", headers = { A = \"{{secrets.bmc}}\" } }",
        );
        let m = Manifest::parse(&text).unwrap();
        assert!(m.check_new().is_err());
    }
}
