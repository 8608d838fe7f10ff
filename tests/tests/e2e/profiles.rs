//! Client profiles (`~/.config/troupe/client.toml`): a named server with
//! its CA and token file, chosen by `--profile`, `TROUPE_PROFILE` or the
//! file's default; flags and variables win over it.

use std::process::Command;

use crate::harness::{Db, Env, both_dbs, troupe_bin};

async fn profiles_name_a_server_and_its_token_file(db: Db) {
    let env = Env::new(db).await;
    let server = env.serve();
    let dir = env.dir.join("config");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ops.token"), &server.token).unwrap();
    let config = dir.join("client.toml");
    std::fs::write(
        &config,
        format!(
            "default = \"nowhere\"\n\n[profiles.ops]\nserver = \"{}\"\ntoken_file = \"ops.token\"\n\n[profiles.nowhere]\nserver = \"http://127.0.0.1:9\"\n",
            server.url
        ),
    )
    .unwrap();
    // Nothing from the harness's environment may choose for it.
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        Command::new(troupe_bin())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", &env.dir)
            .env("TROUPE_CLIENT_CONFIG", &config)
            .envs(envs.iter().copied())
            .output()
            .unwrap()
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // The named profile: its server and the token file beside the config.
    let out = run(&["kinds", "--json", "--profile", "ops"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("reboot"), "{}", text(&out));
    let out = run(&["kinds", "--json"], &[("TROUPE_PROFILE", "ops")]);
    assert!(out.status.success(), "{}", text(&out));

    // The default profile, when none is named: a server that is not there.
    let out = run(&["kinds"], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("127.0.0.1:9"), "{}", text(&out));

    // A flag wins over the profile's server.
    let out = run(
        &[
            "kinds",
            "--profile",
            "nowhere",
            "--server",
            &server.url,
            "--token-file",
            dir.join("ops.token").to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));

    // A profile that is not there says which there are.
    let out = run(&["kinds", "--profile", "prod"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no profile \"prod\"") && text(&out).contains("nowhere, ops"),
        "{}",
        text(&out)
    );

    // A file that is not a client config says what is expected.
    std::fs::write(&config, "[profiles.ops]\nserver = 1\n").unwrap();
    let out = run(&["kinds", "--profile", "ops"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is not a troupe client config"),
        "{}",
        text(&out)
    );
}

both_dbs!(profiles_name_a_server_and_its_token_file);
