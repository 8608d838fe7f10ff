//! Bad requests get a clear JSON error with a stable code, never a 500, and
//! change nothing.

use reqwest::Method;
use serde_json::json;

use crate::harness::{Db, Env, both_dbs};

async fn bad_requests_get_stable_error_codes(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let post = |body: String| server.request(Method::POST, "/v1/actions", Some(body));

    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"kind\": \"noop3\", ".into(), 400, "malformed_json"),
        ("not json at all".into(), 400, "malformed_json"),
        ("".into(), 400, "malformed_json"),
        (
            json!({ "kind": 7, "target": "t" }).to_string(),
            400,
            "invalid_request",
        ),
        (
            json!({ "kind": "noop3", "target": "t", "params": [1] }).to_string(),
            400,
            "invalid_request",
        ),
        (
            json!({ "kind": "noop3", "target": "t", "colour": "red" }).to_string(),
            400,
            "invalid_request",
        ),
        (
            json!({ "kind": "noop3" }).to_string(),
            400,
            "missing_target",
        ),
        (
            json!({ "kind": "noop3", "target": "   " }).to_string(),
            400,
            "missing_target",
        ),
        (
            json!({ "kind": "noop3", "target": "x".repeat(300) }).to_string(),
            400,
            "invalid_request",
        ),
        (
            json!({ "kind": "reboot-the-moon", "target": "t" }).to_string(),
            400,
            "unknown_kind",
        ),
        (
            json!({ "kind": "sleep", "target": "t" }).to_string(),
            400,
            "missing_param",
        ),
        (
            json!({ "kind": "noop3", "target": "t", "params": { "blob": "x".repeat(2 << 20) } })
                .to_string(),
            413,
            "body_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let (got, resp) = post(body.clone()).await;
        let shown = &body[..body.len().min(80)];
        let resp_text = resp.to_string();
        let resp_shown = &resp_text[..resp_text.len().min(300)];
        assert_eq!(got.as_u16(), status, "{shown}: {resp_shown}");
        assert_eq!(resp["error"]["code"], code, "{shown}: {resp_shown}");
        assert!(!resp["error"]["message"].as_str().unwrap().is_empty());
    }

    let (_, unknown) = post(json!({ "kind": "reboot-the-moon", "target": "t" }).to_string()).await;
    let message = unknown["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("noop3") && message.contains("reboot"),
        "lists known kinds: {message}"
    );

    for path in [
        "/v1/actions/999999",
        "/v1/actions/abc",
        "/v1/actions/-1",
        "/v1/actions/999999/cancel",
    ] {
        let method = if path.ends_with("cancel") {
            Method::POST
        } else {
            Method::GET
        };
        let (status, resp) = server.request(method, path, None).await;
        assert_eq!(status, 404, "{path}: {resp}");
        assert_eq!(resp["error"]["code"], "action_not_found", "{path}");
    }
    for query in [
        "status=bogus",
        "limit=0",
        "limit=x",
        "before=x",
        "colour=red",
    ] {
        let (status, resp) = server.get(&format!("/v1/actions?{query}")).await;
        assert_eq!(status, 400, "{query}: {resp}");
        assert_eq!(resp["error"]["code"], "invalid_query", "{query}");
        // Said in the API's words, not the code's.
        let message = resp["error"]["message"].as_str().unwrap();
        assert!(!message.contains("ActionStatus"), "{message}");
    }
    let (_, resp) = server.get("/v1/actions?status=bogus").await;
    let message = resp["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"bogus\" is not a status") && message.contains("queued"),
        "{message}"
    );
    // A malformed query is refused before the action is looked up.
    let (status, resp) = server.get("/v1/actions/1?wait=soon").await;
    assert_eq!(status, 400, "{resp}");
    assert_eq!(resp["error"]["code"], "invalid_query", "{resp}");
    let (status, resp) = server.get("/v2/nothing").await;
    assert_eq!(status, 404);
    assert_eq!(resp["error"]["code"], "no_route");

    // Nothing was stored by any of it.
    let (_, list) = server.get("/v1/actions").await;
    assert_eq!(list["actions"].as_array().unwrap().len(), 0, "{list}");
}

both_dbs!(bad_requests_get_stable_error_codes);
