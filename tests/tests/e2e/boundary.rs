//! What reaches plugins: a clean environment, request data as literal
//! arguments never parsed by a shell, and params checked against the kind's
//! schema before anything is stored.

use serde_json::json;

use crate::bundles::{triple, zip_of};
use crate::harness::{
    Db, Env, both_dbs, build_bundle, build_testkit, sign_with, target_dir, test_key, workspace,
};

/// The `env` exploit from the issue tracker, as a test: a step sees none of
/// the server's environment.
async fn steps_see_none_of_the_servers_environment(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with_env(
        &["--admin-token", "legacy-token-in-the-env"],
        &[
            ("TROUPE_ADMIN_TOKEN", "legacy-token-in-the-env"),
            ("AWS_SECRET_ACCESS_KEY", "inherited-by-accident"),
        ],
    );
    let (status, action) = server
        .post(
            "/v1/actions?wait=20s",
            &json!({ "kind": "run", "target": "x", "params": { "argv": ["env"] } }),
        )
        .await;
    assert_eq!(status, 202, "{action}");
    assert_eq!(action["status"], "succeeded", "{action}");
    let stdout = action["steps"][0]["output"]["stdout"].as_str().unwrap();
    assert!(
        stdout.contains("PATH="),
        "the allow-list passes PATH: {stdout}"
    );
    for leaked in [
        "TROUPE_",
        "legacy-token-in-the-env",
        "inherited-by-accident",
        &env.db_url,
        "RUST_LOG",
    ] {
        assert!(
            !stdout.contains(leaked),
            "{leaked:?} reached the step:\n{stdout}"
        );
    }
}

async fn params_reach_argv_as_single_literal_arguments(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let marker = env.dir.join("pwned");
    let nasty = format!(
        "a; touch {0} $(touch {0}) `touch {0}` 'quoted' \"double\"\nsecond line | cat > {0}",
        marker.display()
    );
    let (status, action) = server
        .post(
            "/v1/actions?wait=20s",
            &json!({ "kind": "run", "target": "x", "params": { "argv": ["printf", "[%s]", nasty] } }),
        )
        .await;
    assert_eq!(status, 202, "{action}");
    assert_eq!(action["status"], "succeeded", "{action}");
    assert_eq!(
        action["steps"][0]["output"]["stdout"].as_str().unwrap(),
        format!("[{nasty}]"),
        "printf got the param as one argument, unchanged"
    );
    assert!(!marker.exists(), "something interpreted the param");
}

async fn params_are_checked_against_the_kinds_schema(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve_with(&["--var", "reboot_command=true"]);
    let cases = [
        (
            json!({ "kind": "sleep", "target": "t", "params": { "ms": "2500" } }),
            "invalid_param",
            "\"ms\" must be an integer",
        ),
        (
            json!({ "kind": "sleep", "target": "t", "params": { "ms": -1 } }),
            "invalid_param",
            "at least 0",
        ),
        (
            json!({ "kind": "sleep", "target": "t", "params": { "ms": 1, "extra": 1 } }),
            "invalid_param",
            "unknown param \"extra\"",
        ),
        (
            json!({ "kind": "sleep", "target": "t" }),
            "missing_param",
            "ms",
        ),
        (
            json!({ "kind": "reboot", "target": "t", "params": { "host": "10.0.0.5", "port": "22" } }),
            "invalid_param",
            "--param-json",
        ),
        (
            json!({ "kind": "reboot", "target": "t", "params": { "host": "x; reboot", "port": 22 } }),
            "invalid_param",
            "must match",
        ),
        (
            json!({ "kind": "reboot", "target": "t", "params": { "host": "h", "port": 70000 } }),
            "invalid_param",
            "at most 65535",
        ),
        (
            json!({ "kind": "run", "target": "t", "params": { "argv": [] } }),
            "invalid_param",
            "at least 1",
        ),
        (
            json!({ "kind": "run", "target": "t", "params": { "argv": "ls -l" } }),
            "invalid_param",
            "a list",
        ),
        (
            json!({ "kind": "run", "target": "t", "params": { "argv": ["ls", 1] } }),
            "invalid_param",
            "\"argv[1]\" must be a string",
        ),
        (
            json!({ "kind": "run", "target": "t", "params": { "command": "id" } }),
            "invalid_param",
            "unknown param \"command\"",
        ),
    ];
    for (body, code, says) in cases {
        let (status, resp) = server.post("/v1/actions", &body).await;
        assert_eq!(status, 400, "{body}: {resp}");
        assert_eq!(resp["error"]["code"], code, "{body}: {resp}");
        let message = resp["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    let (_, list) = server.get("/v1/actions").await;
    assert_eq!(
        list["actions"].as_array().unwrap().len(),
        0,
        "nothing stored"
    );

    // A default fills in, and /v1/kinds shows the schema.
    let (status, a) = server
        .post(
            "/v1/actions",
            &json!({ "kind": "reboot", "target": "t", "params": { "host": "127.0.0.1" } }),
        )
        .await;
    assert_eq!(status, 202, "{a}");
    assert_eq!(a["params"]["port"], 22);
    let (_, kinds) = server.get("/v1/kinds").await;
    let reboot = kinds["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "reboot")
        .unwrap();
    assert_eq!(reboot["params"]["port"]["type"], "integer", "{reboot}");
    assert_eq!(reboot["params"]["port"]["maximum"], 65535.0, "{reboot}");
}

/// The README's BMC example, made the way the review found it: the URL's
/// host from a param, a secret in a header. Refused at build and at push;
/// with the param checked against the operator's list, accepted, and a
/// request for a host off the list is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_goes_only_where_the_operator_points() {
    let base = std::fs::read_to_string(workspace().join("steps/builtin/bundle.toml")).unwrap();
    let kind = |bmc: &str| {
        format!(
            "{base}\n[kinds.bmc_reset]\nparams.bmc = {{ {bmc} }}\nsteps = [{{ step = \"http_request\", with = {{ \
             method = \"POST\", url = \"http://{{{{params.bmc}}}}/redfish/v1/Systems/1/Actions/ComputerSystem.Reset\", \
             headers = {{ Authorization = \"Basic {{{{secrets.bmc_basic_auth}}}}\" }} }} }}]\n"
        )
    };
    let unsafe_kind = kind("type = \"string\", pattern = \"^[A-Za-z0-9.:-]+$\"");
    let safe_kind =
        kind("type = \"string\", pattern = \"^[A-Za-z0-9.:-]+$\", allowed_in = \"vars.bmc_hosts\"");

    // The build refuses the unsafe kind…
    let err = build_bundle("builtin", &unsafe_kind).unwrap_err();
    assert!(
        err.contains("bmc_reset")
            && err.contains("`url`")
            && err.contains("{{params.bmc}}")
            && err.contains("allowed_in"),
        "{err}"
    );
    // …and so does the server, for a bundle zipped by hand.
    let env = Env::new(Db::Sqlite).await;
    let good = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let evil = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    evil.set_nonblocking(true).unwrap();
    let good_host = good.local_addr().unwrap().to_string();
    let evil_host = evil.local_addr().unwrap().to_string();
    let hosts = format!("bmc_hosts=bmc-1.example,{good_host}");
    let server = env.serve_with(&["--var", &hosts]);
    let lib = std::fs::read(target_dir().join("libbuiltin.so")).unwrap();
    let manifest = unsafe_kind.replace("version = \"0.2.0\"", "version = \"0.9.0\"");
    let bytes = zip_of(&[
        ("manifest.toml", manifest.as_bytes(), false),
        (&format!("lib/{}/libbuiltin.so", triple()), &lib, false),
    ]);
    let sig = sign_with(&test_key(), &bytes, "builtin", "0.9.0");
    let (status, resp) = server.push(bytes, &sig).await;
    assert_eq!(status, 422, "{resp}");
    assert_eq!(resp["error"]["code"], "bundle_manifest_invalid");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("{{params.bmc}}"),
        "{resp}"
    );

    // With the param on the operator's list, it builds and is pushed.
    let safe = safe_kind.replace("version = \"0.2.0\"", "version = \"0.3.0\"");
    let bytes = build_bundle("builtin", &safe).unwrap();
    let sig = sign_with(&test_key(), &bytes, "builtin", "0.3.0");
    let (status, resp) = server.push(bytes, &sig).await;
    assert_eq!(status, 201, "{resp}");
    let secret = "cm9vdDpodW50ZXIy";
    let (status, body) = server
        .request(
            reqwest::Method::PUT,
            "/v1/secrets/bmc_basic_auth",
            Some(json!({ "value": secret }).to_string()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let submit_only = server.token_with("submit", &["submit"], None).await;

    // A host off the list is refused before anything is stored or sent.
    let (status, resp) = server
        .request_as(
            Some(&submit_only),
            reqwest::Method::POST,
            "/v1/actions",
            Some(
                json!({ "kind": "bmc_reset", "target": "srv-1", "params": { "bmc": evil_host } })
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(status, 403, "{resp}");
    assert_eq!(resp["error"]["code"], "param_not_allowed", "{resp}");
    let (_, list) = server.get("/v1/actions").await;
    assert_eq!(list["actions"].as_array().map(Vec::len), Some(0), "{list}");

    // A host on it is sent the secret.
    let got = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (conn, _) = good.accept().unwrap();
        let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut conn = conn;
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            .unwrap();
        head
    });
    let (status, action) = server
        .request_as(
            Some(&submit_only),
            reqwest::Method::POST,
            "/v1/actions?wait=30s",
            Some(
                json!({ "kind": "bmc_reset", "target": "srv-1", "params": { "bmc": good_host } })
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(status, 202, "{action}");
    assert_eq!(action["status"], "succeeded", "{action}");
    let head = got.join().unwrap();
    assert!(
        head.starts_with("POST /redfish/v1/Systems/1/Actions/ComputerSystem.Reset ")
            && head.contains(&format!("Basic {secret}")),
        "{head}"
    );
    // Nothing ever knocked at the host off the list.
    assert_eq!(
        evil.accept().map(drop).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
}

both_dbs!(
    steps_see_none_of_the_servers_environment,
    params_reach_argv_as_single_literal_arguments,
    params_are_checked_against_the_kinds_schema,
    secrets_reach_only_their_step_and_are_masked,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_needing_an_unset_variable_is_refused() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let (status, resp) = server
        .post(
            "/v1/actions",
            &json!({ "kind": "reboot", "target": "t", "params": { "host": "h" } }),
        )
        .await;
    assert_eq!(status, 409, "{resp}");
    assert_eq!(resp["error"]["code"], "kind_not_configured");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--var reboot_command="),
        "{resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_built_from_request_data_is_refused() {
    let base = std::fs::read_to_string(workspace().join("steps/testkit/bundle.toml")).unwrap();
    let bad = format!(
        "{base}\n[kinds.bad]\nparams = [\"x\"]\nsteps = [{{ step = \"echo\", with = {{ shell = \"echo {{{{params.x}}}}\" }} }}]\n"
    );
    // The build refuses it before anything is signed…
    let err = build_testkit(&bad).unwrap_err();
    assert!(
        err.contains("`shell` may not contain {{params.x}}") && err.contains("argv"),
        "{err}"
    );
    // …and so does the server, for a bundle someone zipped by hand.
    let lib = std::fs::read(target_dir().join("libtestkit.so")).unwrap();
    let manifest = bad.replace("version = \"0.1.0\"", "version = \"0.9.0\"");
    let bytes = zip_of(&[
        ("manifest.toml", manifest.as_bytes(), false),
        (&format!("lib/{}/libtestkit.so", triple()), &lib, false),
    ]);
    let sig = sign_with(&test_key(), &bytes, "testkit", "0.9.0");
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let (status, resp) = server.push(bytes, &sig).await;
    assert_eq!(status, 422, "{resp}");
    assert_eq!(resp["error"]["code"], "bundle_manifest_invalid");

    // A step the library does not export: refused at build time, after
    // loading the library in a step host as a server would.
    let m = format!("{base}\n[steps.ghost]\nfunction = \"no_such_function\"\ntimeout_ms = 1000\n");
    let err = build_testkit(&m).unwrap_err();
    assert!(
        err.contains("does not export") && err.contains("no_such_function"),
        "{err}"
    );

    // Templates must name something the kind has.
    for (with, says) in [
        ("{ x = \"{{params.undeclared}}\" }", "does not declare"),
        ("{ x = \"{{steps.later.out}}\" }", "does not run before"),
        ("{ x = \"{{secret_sauce}}\" }", "names nothing"),
        (
            "{ shell = \"curl -u {{secrets.api}} x\" }",
            "`shell` may not contain {{secrets.api}}",
        ),
    ] {
        let m = format!("{base}\n[kinds.bad]\nsteps = [{{ step = \"echo\", with = {with} }}]\n");
        let err = build_testkit(&m).unwrap_err();
        assert!(err.contains(says), "{with}: {err}");
    }
}

async fn secrets_reach_only_their_step_and_are_masked(db: Db) {
    let env = Env::new(db).await;
    // The step writes what it is given where params.dir says: only into
    // a directory the operator listed.
    let dir = env.dir.join("secret-run");
    std::fs::create_dir_all(&dir).unwrap();
    let listed = format!("record_dirs={}", dir.display());
    let server = env.serve_with(&["--var", &listed]);
    let secret = "tok-9f8e7d6c5b4a3921";
    let set = {
        use std::io::Write;
        let mut child = std::process::Command::new(crate::harness::troupe_bin())
            .args(["secrets", "set", "test_token", "--server", &server.url])
            .env("TROUPE_TOKEN_FILE", &server.token_file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{secret}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(set.status.success(), "{set:?}");
    // A value is 1 byte to 64 KiB; one out of bounds is refused, saying so.
    for (len, status) in [(64 << 10, 200), ((64 << 10) + 1, 400), (0, 400)] {
        let (got, body) = server
            .request(
                reqwest::Method::PUT,
                "/v1/secrets/sized",
                Some(json!({ "value": "v".repeat(len) }).to_string()),
            )
            .await;
        assert_eq!(got, status, "{len} bytes: {body}");
        if status == 400 {
            assert_eq!(
                body["error"]["message"], "a secret's value is 1 to 65536 bytes",
                "{body}"
            );
        }
    }
    let list = server.cli(&["secrets", "list"]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("test_token") && !listed.contains(secret),
        "{listed}"
    );

    let elsewhere = env.dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let (status, refused) = server
        .post(
            "/v1/actions?wait=20s",
            &json!({ "kind": "secret", "target": "x", "params": { "dir": elsewhere.to_str().unwrap() } }),
        )
        .await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "param_not_allowed", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("record_dirs"),
        "{refused}"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    let (status, action) = server
        .post(
            "/v1/actions?wait=20s",
            &json!({ "kind": "secret", "target": "x", "params": { "dir": dir.to_str().unwrap() } }),
        )
        .await;
    assert_eq!(status, 202, "{action}");
    assert_eq!(action["status"], "failed", "{action}");

    // Delivered to the step that names it, and to no other.
    let given = std::fs::read_to_string(dir.join("given.json")).unwrap();
    assert!(given.contains(secret), "{given}");
    let not_given = std::fs::read_to_string(dir.join("not_given.json")).unwrap();
    assert!(!not_given.contains(secret), "{not_given}");

    // Masked wherever troupe shows or stores output and errors.
    let text = action.to_string();
    assert!(
        !text.contains(secret),
        "the API answer holds the secret: {text}"
    );
    let steps = action["steps"].as_array().unwrap();
    assert_eq!(steps[0]["output"]["settings"]["token"], "***", "{action}");
    assert_eq!(steps[0]["output"]["settings"]["header"], "Bearer ***");
    assert_eq!(steps[2]["error"], "login refused for ***", "{action}");
    assert!(action["error"].as_str().unwrap().contains("***"));
    let pool = env.sql().await;
    let stored: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT output, error FROM action_steps")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (output, error) in stored {
        for t in [output, error].into_iter().flatten() {
            assert!(!t.contains(secret), "stored: {t}");
        }
    }
    let raw: Vec<u8> = sqlx::query_scalar("SELECT ciphertext FROM secrets")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&raw).contains(secret),
        "stored encrypted"
    );
    assert!(!server.log().contains(secret), "{}", server.log());

    // Without the secret, the step that needs it fails and says what to do.
    let del = server.cli(&["secrets", "delete", "test_token"]);
    assert!(del.status.success(), "{del:?}");
    let (_, action) = server
        .post(
            "/v1/actions?wait=20s",
            &json!({ "kind": "secret", "target": "x", "params": { "dir": dir.to_str().unwrap() } }),
        )
        .await;
    assert_eq!(action["status"], "failed");
    assert_eq!(
        action["steps"][0]["error"],
        "secret \"test_token\" is not set; set it with `troupe secrets set test_token`",
        "{action}"
    );
    let (_, audit) = server.get("/v1/audit").await;
    let events: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        events.contains(&"secret.set") && events.contains(&"secret.deleted"),
        "{events:?}"
    );
    assert!(!audit.to_string().contains(secret));
}
