//! `/openapi.json`: it describes every route the server serves (and the
//! scope table the access tests use holds the same routes), and what the
//! server really answers, errors included, validates against it.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Db, Env, Server};

/// The spec's schema for `op`'s answer with `status`, made self-contained.
fn response_schema(spec: &Value, method: &Method, path: &str, status: u16) -> Value {
    let op = &spec["paths"][path][method.as_str().to_lowercase()];
    assert!(op.is_object(), "{method} {path} is not in /openapi.json");
    let response = &op["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which /openapi.json does not list"
    );
    let mut schema = response["content"]["application/json"]["schema"].clone();
    assert!(
        schema.is_object(),
        "{method} {path} {status} has no JSON schema"
    );
    schema["components"] = spec["components"].clone();
    schema
}

fn validate(schema: &Value, instance: &Value, what: &str) {
    let validator = jsonschema::validator_for(schema)
        .unwrap_or_else(|e| panic!("{what}: the spec's schema does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not match /openapi.json: {errors:?}\n{instance}"
    );
}

/// Sends a request (as the admin, or with `token`) and checks the answer
/// against the spec; returns it.
async fn checked(
    server: &Server,
    spec: &Value,
    token: Option<&str>,
    method: Method,
    template: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (status, answer) = server
        .request_as(
            Some(token.unwrap_or(&server.token)),
            method.clone(),
            path,
            body.map(|b| b.to_string()),
        )
        .await;
    let status = status.as_u16();
    if status != 204 {
        let schema = response_schema(spec, &method, template, status);
        validate(&schema, &answer, &format!("{method} {path} → {status}"));
    }
    (status, answer)
}

/// The routes that answer without a token, besides `/openapi.json`
/// itself: every other route is in `access::routes()` with its scope.
const OPEN: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/v1/health/live"),
    ("GET", "/v1/health/ready"),
    // A node proves itself inside the connection (nodes.rs).
    ("GET", "/v1/nodes/connect"),
];

/// ARCHITECTURE.md's invariant on what answers without a token names each
/// open route, so the doc and the router cannot drift apart unnoticed.
#[test]
fn the_architecture_names_every_open_route() {
    let doc = std::fs::read_to_string(crate::harness::workspace().join("ARCHITECTURE.md")).unwrap();
    let start = doc
        .find("- Nothing but ")
        .expect("the invariant on what answers without a token");
    let end = start + doc[start..].find("\n- ").unwrap_or(doc.len() - start);
    let invariant = doc[start..end]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for (method, path) in OPEN.iter().copied().chain([("", "/openapi.json")]) {
        let named = format!("{method} {path}");
        assert!(
            invariant.contains(named.trim()),
            "ARCHITECTURE.md does not name {named:?} as open: {invariant}"
        );
    }
}

async fn the_description_matches_what_the_server_does(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--var", "reboot_command=true"]);
    let (status, spec) = server
        .request_as(None, Method::GET, "/openapi.json", None)
        .await;
    assert_eq!(status, 200, "/openapi.json is open");
    assert_eq!(spec["openapi"], "3.1.0");
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    // The same routes as the scope table, both ways; each one served.
    let described: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let table: BTreeSet<(String, String)> = crate::access::routes()
        .into_iter()
        .map(|(m, p, _, _)| (m.to_string(), template_of(p)))
        .chain(OPEN.iter().map(|(m, p)| (m.to_string(), p.to_string())))
        .collect();
    assert_eq!(described, table, "/openapi.json and the routes differ");
    for (method, path) in &described {
        let concrete = path
            .replace("{id}", "1")
            .replace("{hash}", &"0".repeat(64))
            .replace("{name}", "x");
        let (_, answer) = server
            .request_as(None, method.parse().unwrap(), &concrete, None)
            .await;
        assert_ne!(
            answer["error"]["code"], "no_route",
            "{method} {path} is described but not served"
        );
    }

    // Every code the server can answer with is in the ErrorCode schema.
    let codes: BTreeSet<&str> = spec["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for code in [
        "unauthorized",
        "missing_scope_admin",
        "invalid_param",
        "bundle_manifest_invalid",
        "database_unavailable",
        "token_name_taken",
    ] {
        assert!(codes.contains(code), "{code} missing from ErrorCode");
    }

    // The request examples fit their own schemas.
    for name in ["SubmitRequest", "CreateToken", "AddKey", "SetSecret"] {
        let mut schema = json!({ "$ref": format!("#/components/schemas/{name}") });
        schema["components"] = spec["components"].clone();
        let example = &spec["components"]["schemas"][name]["example"];
        assert!(example.is_object(), "{name} has no example");
        validate(&schema, example, &format!("the {name} example"));
    }

    // Real answers, success and error alike, fit the description.
    let s = &spec;
    let read = server.token_with("reader", &["read"], None).await;
    let port: u16 = server.url.rsplit(':').next().unwrap().parse().unwrap();
    let (st, action) = checked(&server, s, None, Method::POST, "/v1/actions", "/v1/actions?wait=20s",
        Some(json!({ "kind": "reboot", "target": "vps-1", "params": { "host": "127.0.0.1", "port": port } }))).await;
    assert_eq!(st, 202);
    let id = action["id"].as_i64().unwrap();
    for (path, template) in [
        (format!("/v1/actions/{id}"), "/v1/actions/{id}"),
        ("/v1/actions?limit=5".to_owned(), "/v1/actions"),
        ("/v1/kinds".to_owned(), "/v1/kinds"),
        ("/v1/health".to_owned(), "/v1/health"),
        ("/v1/health/live".to_owned(), "/v1/health/live"),
        ("/v1/health/ready".to_owned(), "/v1/health/ready"),
        ("/v1/bundles".to_owned(), "/v1/bundles"),
        ("/v1/keys".to_owned(), "/v1/keys"),
        ("/v1/tokens".to_owned(), "/v1/tokens"),
        ("/v1/audit".to_owned(), "/v1/audit"),
        ("/v1/secrets".to_owned(), "/v1/secrets"),
        ("/v1/actions/999999".to_owned(), "/v1/actions/{id}"),
        ("/v1/actions?limit=0".to_owned(), "/v1/actions"),
        ("/v1/nodes".to_owned(), "/v1/nodes"),
    ] {
        checked(&server, s, None, Method::GET, template, &path, None).await;
    }
    let (_, bundles) = server.get("/v1/bundles").await;
    let hash = bundles["bundles"][0]["hash"].as_str().unwrap().to_owned();
    checked(
        &server,
        s,
        None,
        Method::GET,
        "/v1/bundles/{hash}",
        &format!("/v1/bundles/{hash}"),
        None,
    )
    .await;
    checked(
        &server,
        s,
        None,
        Method::POST,
        "/v1/bundles/{hash}/activate",
        &format!("/v1/bundles/{hash}/activate"),
        None,
    )
    .await;
    let (st, _) = checked(
        &server,
        s,
        Some(&read),
        Method::GET,
        "/v1/tokens",
        "/v1/tokens",
        None,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _) = checked(
        &server,
        s,
        Some("troupe_0123456789abcdef_x"),
        Method::GET,
        "/v1/kinds",
        "/v1/kinds",
        None,
    )
    .await;
    assert_eq!(st, 401);
    checked(
        &server,
        s,
        Some(&read),
        Method::GET,
        "/v1/health",
        "/v1/health",
        None,
    )
    .await;
    let (st, _) = checked(
        &server,
        s,
        None,
        Method::POST,
        "/v1/actions",
        "/v1/actions",
        Some(json!({ "kind": "sleep", "target": "t", "params": { "ms": "x" } })),
    )
    .await;
    assert_eq!(st, 400);
    let (st, created) = checked(
        &server,
        s,
        None,
        Method::POST,
        "/v1/tokens",
        "/v1/tokens",
        Some(json!({ "name": "panel", "scopes": ["submit"], "kinds": ["noop1"] })),
    )
    .await;
    assert_eq!(st, 201);
    let token_id = created["id"].as_str().unwrap().to_owned();
    let (st, _) = checked(
        &server,
        s,
        None,
        Method::POST,
        "/v1/tokens",
        "/v1/tokens",
        Some(json!({ "name": "panel", "scopes": ["submit"] })),
    )
    .await;
    assert_eq!(st, 409);
    checked(
        &server,
        s,
        None,
        Method::POST,
        "/v1/tokens/{id}/revoke",
        &format!("/v1/tokens/{token_id}/revoke"),
        None,
    )
    .await;
    checked(
        &server,
        s,
        None,
        Method::PUT,
        "/v1/secrets/{name}",
        "/v1/secrets/api_key",
        Some(json!({ "value": "v" })),
    )
    .await;
    let (st, _) = checked(
        &server,
        s,
        None,
        Method::DELETE,
        "/v1/secrets/{name}",
        "/v1/secrets/api_key",
        None,
    )
    .await;
    assert_eq!(st, 204);
    let key = signing::SecretKey::from_seed([5; 32]);
    let (st, _) = checked(
        &server,
        s,
        None,
        Method::POST,
        "/v1/keys",
        "/v1/keys",
        Some(json!({ "public_key": key.public().to_string() })),
    )
    .await;
    assert_eq!(st, 201);
    checked(
        &server,
        s,
        None,
        Method::POST,
        "/v1/keys/{id}/revoke",
        &format!("/v1/keys/{}/revoke", key.public().id()),
        None,
    )
    .await;
    let (st, _) = checked(
        &server,
        s,
        None,
        Method::POST,
        "/v1/actions/{id}/cancel",
        &format!("/v1/actions/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(st, 409, "the action had finished");
}

/// `/v1/bundles/{hash}` from the scope table's concrete path.
fn template_of(path: &str) -> String {
    path.split('/')
        .enumerate()
        .map(|(i, part)| match (i, part) {
            (3 | 4, p) if p.len() == 64 => "{hash}".to_owned(),
            (3, p) if p.chars().all(|c| c.is_ascii_digit()) => "{id}".to_owned(),
            (3, p) if p.len() == 16 => "{id}".to_owned(),
            (3, "scope_test" | "hv-x") => "{name}".to_owned(),
            (_, p) => p.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

crate::harness::both_dbs!(the_description_matches_what_the_server_does);
