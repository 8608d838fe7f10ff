//! Target records through the API and the CLI: who may read and change
//! them, what a change does (a merge, or a whole replacement), bad input
//! refused with its code and nothing stored or audited, values that look
//! like secrets refused without being echoed, paging, and a change through
//! one server seen through another at once.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::cli::text;
use crate::harness::{Db, Env, Server, both_dbs, strings};

async fn send(server: &Server, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    server.request(method, path, Some(body.to_string())).await
}

/// How many audit entries record `event`.
async fn audited(server: &Server, event: &str) -> usize {
    let (status, audit) = server.get("/v1/audit?limit=1000").await;
    assert_eq!(status, 200, "{audit}");
    strings(&audit["entries"], "event")
        .iter()
        .filter(|e| **e == event)
        .count()
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

async fn records_are_set_merged_replaced_listed_and_deleted(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let reader = server.token_with("reader", &["read"], None).await;
    let operator = server.token_with("operator", &["operate"], None).await;

    // Nothing yet: a read token reads, and is told there is no record.
    let (status, body) = server
        .request_as(Some(&reader), Method::GET, "/v1/targets/vps-123", None)
        .await;
    assert_eq!(
        (status.as_u16(), code(&body)),
        (404, "target_not_found"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("troupe targets set vps-123"),
        "{body}"
    );
    // Changes need admin: read and operate tokens are refused before the body is read.
    for token in [&reader, &operator] {
        let (status, body) = server
            .request_as(
                Some(token),
                Method::PATCH,
                "/v1/targets/vps-123",
                Some(json!({ "set": { "bmc": "https://10.0.0.5" } }).to_string()),
            )
            .await;
        assert_eq!(
            (status.as_u16(), code(&body)),
            (403, "missing_scope_admin"),
            "{body}"
        );
    }
    assert_eq!(audited(&server, "target.set").await, 0);

    // A merge makes the record, another adds to it and removes from it.
    let (status, body) = send(
        &server,
        Method::PATCH,
        "/v1/targets/vps-123",
        json!({ "set": { "bmc": "https://10.0.0.5", "bmc_credentials": "dc1-bmc", "rack": "r1" } }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["target"], "vps-123");
    assert_eq!(body["updated_by"], "admin", "{body}");
    let (status, body) = send(
        &server,
        Method::PATCH,
        "/v1/targets/vps-123",
        json!({ "set": { "hypervisor": "hv-17", "bmc": "https://10.0.0.6" }, "unset": ["rack"] }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["attributes"],
        json!({ "bmc": "https://10.0.0.6", "bmc_credentials": "dc1-bmc", "hypervisor": "hv-17" })
    );
    let (status, shown) = server
        .request_as(Some(&reader), Method::GET, "/v1/targets/vps-123", None)
        .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["attributes"], body["attributes"]);
    // A replacement keeps only what it gives.
    let (status, body) = send(
        &server,
        Method::PUT,
        "/v1/targets/vps-123",
        json!({ "attributes": { "bmc": "https://10.0.0.5", "bmc_credentials": "dc1-bmc" } }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["attributes"],
        json!({ "bmc": "https://10.0.0.5", "bmc_credentials": "dc1-bmc" })
    );
    assert_eq!(audited(&server, "target.set").await, 3);
    let (_, audit) = server.get("/v1/audit?limit=1").await;
    assert_eq!(audit["entries"][0]["subject"], "vps-123", "{audit}");
    assert_eq!(audit["entries"][0]["actor"], "admin", "{audit}");
    assert_eq!(audit["entries"][0]["detail"]["replace"], true, "{audit}");

    // Bad input: each refused with its code, nothing changed or audited.
    let long = "x".repeat(1025);
    let cases: Vec<(Method, &str, String, u16, &str)> = vec![
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({ "set": { "Bad.Key": "x" } }).to_string(),
            400,
            "invalid_request",
        ),
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({ "set": { "note": long } }).to_string(),
            400,
            "invalid_request",
        ),
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({ "set": { "note": "" } }).to_string(),
            400,
            "invalid_request",
        ),
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({ "set": { "note": "a\nb" } }).to_string(),
            400,
            "invalid_request",
        ),
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({ "set": { "a": "1" }, "unset": ["a"] }).to_string(),
            400,
            "invalid_request",
        ),
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({}).to_string(),
            400,
            "invalid_request",
        ),
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({ "set": { "a": 5 } }).to_string(),
            400,
            "invalid_request",
        ),
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({ "attributes": {} }).to_string(),
            400,
            "invalid_request",
        ),
        (
            Method::PUT,
            "/v1/targets/vps-123",
            "{\"attributes\": ".to_owned(),
            400,
            "malformed_json",
        ),
        (
            Method::PUT,
            "/v1/targets/%20vps-123",
            json!({ "attributes": { "a": "1" } }).to_string(),
            400,
            "invalid_request",
        ),
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({ "set": { "bmc_password": "hunter2-sesame" } }).to_string(),
            422,
            "secret_in_record",
        ),
        (
            Method::PATCH,
            "/v1/targets/vps-123",
            json!({ "set": { "bmc": "https://root:hunter2-sesame@10.0.0.5" } }).to_string(),
            422,
            "secret_in_record",
        ),
    ];
    for (method, path, body, status, want) in cases {
        let what = format!("{method} {path} {body}");
        let (got, answer) = server.request(method, path, Some(body)).await;
        assert_eq!(
            (got.as_u16(), code(&answer)),
            (status, want),
            "{what}: {answer}"
        );
        assert!(
            !answer.to_string().contains("hunter2-sesame"),
            "{what} echoed the value: {answer}"
        );
    }
    // A record holds at most 64 attributes: a change past that is refused whole.
    let many: serde_json::Map<String, Value> =
        (0..62).map(|i| (format!("k{i}"), json!("v"))).collect();
    let (status, body) = send(
        &server,
        Method::PATCH,
        "/v1/targets/vps-123",
        json!({ "set": many }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(
        &server,
        Method::PATCH,
        "/v1/targets/vps-123",
        json!({ "set": { "one_more": "v" } }),
    )
    .await;
    assert_eq!(
        (status.as_u16(), code(&body)),
        (409, "target_record_full"),
        "{body}"
    );
    let (_, shown) = server.get("/v1/targets/vps-123").await;
    assert_eq!(
        shown["attributes"].as_object().unwrap().len(),
        64,
        "{shown}"
    );
    assert!(shown["attributes"].get("one_more").is_none());
    assert_eq!(audited(&server, "target.set").await, 4);
    assert!(
        !server.log().contains("hunter2-sesame"),
        "the server logged a refused value"
    );

    // Listing pages by name.
    for t in ["a-1", "b-2", "c-3"] {
        let (status, _) = send(
            &server,
            Method::PUT,
            &format!("/v1/targets/{t}"),
            json!({ "attributes": { "rack": "r1" } }),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, page) = server
        .request_as(Some(&reader), Method::GET, "/v1/targets?limit=2", None)
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(strings(&page["targets"], "target"), ["a-1", "b-2"]);
    assert_eq!(page["next_after"], "b-2");
    let (_, page) = server.get("/v1/targets?limit=2&after=b-2").await;
    assert_eq!(strings(&page["targets"], "target"), ["c-3", "vps-123"]);
    let (_, page) = server.get("/v1/targets?limit=2&after=vps-123").await;
    assert_eq!(page["targets"], json!([]));
    assert_eq!(page["next_after"], Value::Null);
    for bad in [
        "/v1/targets?limit=0",
        "/v1/targets?limit=x",
        "/v1/targets?page=2",
    ] {
        let (status, body) = server.get(bad).await;
        assert_eq!(
            (status.as_u16(), code(&body)),
            (400, "invalid_query"),
            "{bad}: {body}"
        );
    }

    // Deleting: once, audited once; then it is gone.
    let (status, _) = server
        .request(Method::DELETE, "/v1/targets/a-1", None)
        .await;
    assert_eq!(status, 204);
    let (status, body) = server
        .request(Method::DELETE, "/v1/targets/a-1", None)
        .await;
    assert_eq!(
        (status.as_u16(), code(&body)),
        (404, "target_not_found"),
        "{body}"
    );
    assert_eq!(audited(&server, "target.deleted").await, 1);
}

/// Several servers on one database: a record set through one is what the
/// other reads at once, and changes made through both at the same moment
/// all land (each merge reads and writes the row in one transaction).
async fn every_server_sees_a_change_at_once(db: Db) {
    if db == Db::Sqlite {
        return; // one server per SQLite database
    }
    let env = Env::new(db).await;
    let one = env.serve();
    let two = env.serve_another(&[]);
    let (status, _) = send(
        &one,
        Method::PATCH,
        "/v1/targets/vps-9",
        json!({ "set": { "bmc": "https://10.0.0.9" } }),
    )
    .await;
    assert_eq!(status, 200);
    let (status, seen) = two.get("/v1/targets/vps-9").await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["attributes"]["bmc"], "https://10.0.0.9");

    let mut changes = Vec::new();
    for i in 0..20 {
        let server = if i % 2 == 0 { &one } else { &two };
        changes.push(send(
            server,
            Method::PATCH,
            "/v1/targets/vps-9",
            json!({ "set": { format!("k{i}"): "v" } }),
        ));
    }
    for (status, body) in futures_util::future::join_all(changes).await {
        assert_eq!(status, 200, "{body}");
    }
    let (_, seen) = one.get("/v1/targets/vps-9").await;
    assert_eq!(seen["attributes"].as_object().unwrap().len(), 21, "{seen}");
}

async fn the_cli_sets_shows_lists_and_deletes(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let ok = |args: &[&str]| {
        let out = server.cli(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        text(&out)
    };
    let said = ok(&[
        "targets",
        "set",
        "vps-123",
        "bmc=https://10.0.0.5",
        "bmc_credentials=dc1-bmc",
        "rack=r1",
    ]);
    assert!(said.contains("bmc_credentials  dc1-bmc"), "{said}");
    let said = ok(&[
        "targets",
        "set",
        "vps-123",
        "--unset",
        "rack",
        "hypervisor=hv-17",
    ]);
    assert!(
        said.contains("hypervisor") && !said.contains("rack"),
        "{said}"
    );
    let shown: Value =
        serde_json::from_str(&ok(&["targets", "show", "vps-123", "--json"])).unwrap();
    assert_eq!(
        shown["attributes"],
        json!({ "bmc": "https://10.0.0.5", "bmc_credentials": "dc1-bmc", "hypervisor": "hv-17" })
    );
    let listed = ok(&["targets", "list"]);
    assert!(
        listed.contains("vps-123") && listed.contains("hypervisor=hv-17"),
        "{listed}"
    );

    let out = server.cli(&["targets", "set", "vps-123", "bmc"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("is not KEY=VALUE"), "{}", text(&out));
    let out = server.cli(&["targets", "set", "vps-123", "bmc_password=hunter2-sesame"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("secret_in_record"), "{}", text(&out));
    assert!(!text(&out).contains("hunter2-sesame"), "{}", text(&out));

    ok(&["targets", "delete", "vps-123"]);
    let out = server.cli(&["targets", "show", "vps-123"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("target_not_found"), "{}", text(&out));
}

/// The hardware bundle's `power` kind, given only `op`, against a real
/// Redfish BMC: the BMC comes from the target's record (checked against
/// `--var bmcs` as a request's would be), the credentials from the secret
/// the record names; a target without what the kind needs is refused at
/// submit, naming the target and the attribute; no password anywhere.
async fn power_takes_its_bmc_and_credentials_from_the_target_record(db: Db) {
    use crate::power::{Bmc, SYSTEM, hardware_bundle};
    let password = "pw-record-5d1e8a3b";
    let decoy = "pw-decoy-93c0f7e2";
    let bmc = Bmc::start(password);
    let env = Env::new(db).await;
    let bmcs = format!("bmcs={}", bmc.url);
    let trust = format!("bmc_trust={}", bmc.pinned);
    let server = env.serve_with(&[
        "--bundle",
        hardware_bundle().to_str().unwrap(),
        "--var",
        &bmcs,
        "--var",
        &trust,
    ]);
    let set_secret = async |name: &str, value: String| {
        let (status, body) = send(
            &server,
            Method::PUT,
            &format!("/v1/secrets/{name}"),
            json!({ "value": value }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    };
    // The kind's default secret holds a wrong password: only the record's
    // choice of secret opens the BMC.
    set_secret("bmc_credentials", format!("admin:{decoy}")).await;
    set_secret("dc1-bmc", format!("admin:{password}")).await;
    let (status, body) = send(
        &server,
        Method::PATCH,
        "/v1/targets/srv-1",
        json!({ "set": { "bmc": bmc.url, "bmc_credentials": "dc1-bmc" } }),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let off = server
        .submit("power", "srv-1", json!({ "op": "off" }))
        .await;
    let action = server.finished(off).await;
    assert_eq!(action["status"], "succeeded", "{action}\n{}", bmc.log());
    assert_eq!(
        action["params"]["bmc"],
        bmc.url.as_str(),
        "the record's BMC is the action's: {action}"
    );
    let out = &action["steps"][0]["output"];
    assert_eq!(out["reset_type"], "ForceOff", "{action}");
    assert_eq!(out["power_state"], "Off", "{action}");
    assert_eq!(out["system"], SYSTEM, "{action}");

    // A target with no record, and one whose record lacks `bmc`: refused
    // at submit, nothing stored, saying which attribute of which target.
    let (_, before) = server.get("/v1/actions").await;
    for (target, has_record) in [("srv-2", false), ("srv-3", true)] {
        if has_record {
            let (status, _) = send(
                &server,
                Method::PATCH,
                &format!("/v1/targets/{target}"),
                json!({ "set": { "rack": "r1" } }),
            )
            .await;
            assert_eq!(status, 200);
        }
        let (status, body) = server
            .post(
                "/v1/actions",
                &json!({ "kind": "power", "target": target, "params": { "op": "status" } }),
            )
            .await;
        assert_eq!(
            (status.as_u16(), code(&body)),
            (422, "target_attribute_missing"),
            "{body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("attribute \"bmc\" of target \"{target}\""))
                && message.contains(&format!("troupe targets set {target} bmc="))
                && message.contains("or give the param \"bmc\""),
            "{message}"
        );
    }
    let (_, after) = server.get("/v1/actions").await;
    assert_eq!(
        before["actions"], after["actions"],
        "a refused submit stored nothing"
    );
    // The record's BMC must be on the operator's list, as a param must.
    let (status, _) = send(
        &server,
        Method::PATCH,
        "/v1/targets/srv-4",
        json!({ "set": { "bmc": "https://10.9.9.9" } }),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = server
        .post(
            "/v1/actions",
            &json!({ "kind": "power", "target": "srv-4", "params": { "op": "status" } }),
        )
        .await;
    assert_eq!(
        (status.as_u16(), code(&body)),
        (403, "param_not_allowed"),
        "{body}"
    );
    // A param given still wins over the record.
    let given = server
        .submit("power", "srv-4", json!({ "op": "status", "bmc": bmc.url }))
        .await;
    let action = server.finished(given).await;
    assert_eq!(action["params"]["bmc"], bmc.url.as_str(), "{action}");
    assert_eq!(
        action["status"], "failed",
        "srv-4's record names no secret, so the decoy is sent: {action}"
    );
    // A record naming a secret that is not set fails the step, naming both.
    let (status, _) = send(
        &server,
        Method::PATCH,
        "/v1/targets/srv-1",
        json!({ "set": { "bmc_credentials": "dc9-bmc" } }),
    )
    .await;
    assert_eq!(status, 200);
    let missing = server
        .submit("power", "srv-1", json!({ "op": "status" }))
        .await;
    let action = server.finished(missing).await;
    assert_eq!(action["status"], "failed", "{action}");
    let error = action["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("\"dc9-bmc\" is not set")
            && error.contains("srv-1")
            && error.contains("bmc_credentials=dc9-bmc"),
        "{error}"
    );

    // Neither password anywhere but the BMC's own check.
    let mut seen = String::new();
    for id in [off, given, missing] {
        seen += &server.get(&format!("/v1/actions/{id}")).await.1.to_string();
        seen += &server
            .get(&format!("/v1/actions/{id}/logs"))
            .await
            .1
            .to_string();
    }
    seen += &server.get("/v1/audit?limit=1000").await.1.to_string();
    seen += &server.get("/v1/targets").await.1.to_string();
    assert!(
        seen.contains("ForceOff") && seen.contains("dc1-bmc"),
        "{seen}"
    );
    seen += &server.log();
    seen += &bmc.log();
    for secret in [password, decoy] {
        assert!(!seen.contains(secret), "{secret} leaked: {seen}");
    }
}

/// `{{target.KEY}}` in a kind's settings: a submit for a target that lacks
/// the attribute is refused; the record is read when the step starts, so a
/// change made (through another server, where there are several) while an
/// earlier step runs is what the later step gets, and an attribute removed
/// meanwhile fails that step, naming it and the target.
async fn templates_read_the_record_when_the_step_starts(db: Db) {
    use crate::harness::{build_testkit, sign_with, test_key, workspace};
    let base = std::fs::read_to_string(workspace().join("steps/testkit/bundle.toml"))
        .unwrap()
        .replace("version = \"0.1.0\"", "version = \"0.2.0\"");
    let kind = |hv: &str| {
        format!(
            "{base}\n[kinds.from_record]\nparams.ms = {{ type = \"integer\", default = 0 }}\nsteps = [\
             {{ step = \"sleep_ms\", with = {{ ms = \"{{{{params.ms}}}}\" }} }}, \
             {{ step = \"echo\", name = \"said\", with = {{ hv = \"{{{{target.{hv}}}}}\", at = \"{{{{target}}}} on {{{{target.{hv}}}}} in {{{{target.rack}}}}\" }} }}]\n"
        )
    };
    let err = build_testkit(&kind("Hyper.visor")).unwrap_err();
    assert!(
        err.contains("{{target.Hyper.visor}}") && err.contains("target.KEY"),
        "{err}"
    );
    let bytes = build_testkit(&kind("hypervisor")).unwrap();
    let sig = sign_with(&test_key(), &bytes, "testkit", "0.2.0");
    let env = Env::new(db).await;
    let server = env.serve();
    let (status, body) = server.push(bytes, &sig).await;
    assert_eq!(status, 201, "{body}");
    // Where several servers share the database, changes go through another.
    let other = (db == Db::MySql).then(|| env.serve_another(&[]));
    let changer = other.as_ref().unwrap_or(&server);

    let (status, body) = server
        .post(
            "/v1/actions",
            &json!({ "kind": "from_record", "target": "vps-7" }),
        )
        .await;
    assert_eq!(
        (status.as_u16(), code(&body)),
        (422, "target_attribute_missing"),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("attribute \"hypervisor\" of target \"vps-7\"")
            && message.contains("has no record"),
        "{message}"
    );
    let (status, _) = send(
        changer,
        Method::PUT,
        "/v1/targets/vps-7",
        json!({ "attributes": { "hypervisor": "hv-1", "rack": "r1" } }),
    )
    .await;
    assert_eq!(status, 200);
    let id = server.submit("from_record", "vps-7", json!({})).await;
    let action = server.finished(id).await;
    assert_eq!(action["status"], "succeeded", "{action}");
    assert_eq!(
        action["steps"][1]["output"]["settings"],
        json!({ "hv": "hv-1", "at": "vps-7 on hv-1 in r1" })
    );

    // Changed while the first step sleeps: the second step gets the change.
    let id = server
        .submit("from_record", "vps-7", json!({ "ms": 4000 }))
        .await;
    server
        .until(id, "its first step running", |a| {
            a["steps"][0]["status"] == "running"
        })
        .await;
    let (status, _) = send(
        changer,
        Method::PATCH,
        "/v1/targets/vps-7",
        json!({ "set": { "hypervisor": "hv-2" } }),
    )
    .await;
    assert_eq!(status, 200);
    let action = server.finished(id).await;
    assert_eq!(action["status"], "succeeded", "{action}");
    assert_eq!(
        action["steps"][1]["output"]["settings"]["hv"], "hv-2",
        "{action}"
    );

    // Removed while the first step sleeps: the second step fails, saying what.
    let id = server
        .submit("from_record", "vps-7", json!({ "ms": 4000 }))
        .await;
    server
        .until(id, "its first step running", |a| {
            a["steps"][0]["status"] == "running"
        })
        .await;
    let (status, _) = send(
        changer,
        Method::PATCH,
        "/v1/targets/vps-7",
        json!({ "unset": ["rack"] }),
    )
    .await;
    assert_eq!(status, 200);
    let action = server.finished(id).await;
    assert_eq!(action["status"], "failed", "{action}");
    let error = action["steps"][1]["error"].as_str().unwrap();
    assert!(
        error.contains("\"vps-7\"'s record has no attribute \"rack\"")
            && error.contains("troupe targets set vps-7 rack="),
        "{error}"
    );
}

both_dbs!(
    templates_read_the_record_when_the_step_starts,
    power_takes_its_bmc_and_credentials_from_the_target_record,
    records_are_set_merged_replaced_listed_and_deleted,
    every_server_sees_a_change_at_once,
    the_cli_sets_shows_lists_and_deletes,
);
