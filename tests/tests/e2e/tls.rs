//! HTTPS on the API: the CLI trusts only the CA it is given, a certificate
//! swapped on disk is served after SIGHUP, and plain HTTP beyond loopback is
//! refused.

use std::path::Path;

use crate::harness::{Db, Env, Server, scratch_dir, troupe_bin};

/// A CA, and a certificate for 127.0.0.1 it signed: (CA PEM, cert PEM, key PEM).
fn ca_and_cert() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = params
        .signed_by(&key, &Issuer::new(ca_params, ca_key))
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn list(server: &Server, ca: Option<&Path>) -> std::process::Output {
    let mut cmd = std::process::Command::new(troupe_bin());
    cmd.args(["list", "--server", &server.url])
        .env("TROUPE_TOKEN_FILE", &server.token_file);
    if let Some(ca) = ca {
        cmd.arg("--ca-cert").arg(ca);
    }
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_trusts_only_the_ca_it_is_given() {
    let dir = scratch_dir("tls");
    let (ca, cert, key) = ca_and_cert();
    let (other_ca, other_cert, other_key) = ca_and_cert();
    for (name, text) in [
        ("ca.pem", &ca),
        ("other-ca.pem", &other_ca),
        ("cert.pem", &cert),
        ("key.pem", &key),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve_with(&[
        "--tls-cert",
        dir.join("cert.pem").to_str().unwrap(),
        "--tls-key",
        dir.join("key.pem").to_str().unwrap(),
    ]);
    assert!(server.url.starts_with("https://"), "{}", server.url);

    let ok = list(&server, Some(&dir.join("ca.pem")));
    assert!(ok.status.success(), "{ok:?}");

    for (ca, why) in [
        (Some(dir.join("other-ca.pem")), "a CA that did not sign it"),
        (None, "the system's roots"),
    ] {
        let refused = list(&server, ca.as_deref());
        assert!(!refused.status.success(), "trusted with {why}");
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            err.contains("cannot verify the TLS certificate") && err.contains("--ca-cert"),
            "with {why}: {err}"
        );
    }

    // A certificate swapped on disk is served after SIGHUP.
    std::fs::write(dir.join("cert.pem"), &other_cert).unwrap();
    std::fs::write(dir.join("key.pem"), &other_key).unwrap();
    server.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !list(&server, Some(&dir.join("other-ca.pem")))
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was never served:\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!list(&server, Some(&dir.join("ca.pem"))).status.success());
    assert!(
        server.log().contains("TLS certificate reloaded"),
        "{}",
        server.log()
    );

    // A broken certificate file keeps the old one in service.
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    server.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server
        .log()
        .contains("could not reload the TLS certificate")
    {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        list(&server, Some(&dir.join("other-ca.pem")))
            .status
            .success()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_beyond_loopback_and_bad_certificates_are_refused() {
    let env = Env::new(Db::Sqlite).await;
    let serve = |extra: &[&str]| {
        std::process::Command::new(troupe_bin())
            .args(["serve", "--data-dir", env.dir.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = serve(&["--listen", "0.0.0.0:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-cert") && err.contains("--allow-plain-http"),
        "{err}"
    );

    let junk = env.dir.join("junk.pem");
    std::fs::write(&junk, "junk").unwrap();
    let out = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        junk.to_str().unwrap(),
        "--tls-key",
        junk.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TLS certificate") && err.contains("PEM"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_use_and_verify_tls() {
    let (Ok(tls_base), Ok(ca)) = (
        std::env::var("TROUPE_TEST_MYSQL_TLS"),
        std::env::var("TROUPE_TEST_MYSQL_CA"),
    ) else {
        panic!(
            "TROUPE_TEST_MYSQL_TLS and TROUPE_TEST_MYSQL_CA are not set: run the tests with `bash tests/run`, \
             which starts a MariaDB with TLS and a user that must use it"
        );
    };
    // A fresh database, reached as a user created with REQUIRE SSL.
    let env = Env::new(Db::MySql).await;
    let name = env.db_url.rsplit('/').next().unwrap().to_owned();
    let url = |query: &str| format!("{}/{name}?{query}", tls_base.trim_end_matches('/'));
    let migrate = |url: String| {
        std::process::Command::new(troupe_bin())
            .args(["migrate", "--db", &url])
            .output()
            .unwrap()
    };
    let ok = migrate(url(&format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}")));
    assert!(ok.status.success(), "{ok:?}");

    let plain = migrate(url("ssl-mode=DISABLED"));
    assert!(
        !plain.status.success(),
        "a REQUIRE SSL user got in without TLS"
    );

    let dir = scratch_dir("db-tls");
    let (other_ca, _, _) = ca_and_cert();
    let wrong = dir.join("other-ca.pem");
    std::fs::write(&wrong, other_ca).unwrap();
    let out = migrate(url(&format!(
        "ssl-mode=VERIFY_CA&ssl-ca={}",
        wrong.display()
    )));
    assert!(
        !out.status.success(),
        "a server certificate from an untrusted CA was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("troupe-tls"),
        "the password leaked into the error: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--server https://…` against a server that speaks plain HTTP: every
/// client command says the handshake failed and asks whether the server is
/// plain http, rather than dying on a write to the closed socket (SIGPIPE,
/// exit 141, nothing said).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_to_a_plain_http_server_says_the_handshake_failed() {
    let env = Env::new(Db::Sqlite).await;
    let server = env.serve();
    let https = server.url.replace("http://", "https://");
    // The failure is a race (the server answers and closes while the CLI
    // writes): several tries of several commands.
    for args in [
        &["list"][..],
        &["status", "1"],
        &["bundle", "list"],
        &["kinds"],
    ] {
        for _ in 0..3 {
            let out = std::process::Command::new(troupe_bin())
                .args(args)
                .args(["--server", &https])
                .env("TROUPE_TOKEN_FILE", &server.token_file)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(
                err.contains(&format!(
                    "TLS handshake failed with {https}; is the server plain http? (try {})",
                    server.url
                )),
                "{args:?}: {err}"
            );
        }
    }
}
