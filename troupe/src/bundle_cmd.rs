//! `troupe bundle …` and `troupe keys …`: build, sign, verify and push
//! bundles; generate, trust and revoke signing keys.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use engine::signing::{PublicKey, SecretKey, Signature, Trust};
use serde_json::{Value, json};

use crate::args::ServerArg;
use crate::client::Client;

#[derive(Subcommand)]
pub(crate) enum BundleCommand {
    /// Start a step crate: a typed example step, a kind in bundle.toml, a
    /// unit test and a harness test (troupe-test), ready to `cargo test`.
    New {
        /// The crate's and the bundle's name, e.g. vps-steps.
        name: String,
        /// Where to create it [default: ./NAME]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A troupe checkout, for the troupe-sdk and troupe-test crates the
        /// step crate depends on [default: the one this troupe was built from]
        #[arg(long, value_name = "DIR")]
        troupe_src: Option<PathBuf>,
    },
    /// Build a bundle (format v1) from a manifest and a plugin library.
    Build {
        /// The manifest, e.g. steps/builtin/bundle.toml.
        manifest: PathBuf,
        /// The compiled plugin (cdylib), e.g. target/release/libbuiltin.so.
        #[arg(long)]
        library: PathBuf,
        /// The target triple the library was built for [default: this troupe's]
        #[arg(long)]
        target: Option<String>,
        /// Where to write the bundle [default: NAME-VERSION.bundle]
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Sign a bundle; writes the detached signature to BUNDLE.sig.
    Sign {
        bundle: PathBuf,
        /// The secret key file from `troupe keys generate`.
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signature [default: BUNDLE.sig]
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Check a bundle's signature against a public key, and its archive.
    Verify {
        bundle: PathBuf,
        /// The public key (ed25519:…) to trust.
        #[arg(long)]
        trust: String,
        /// The signature file [default: BUNDLE.sig]
        #[arg(long)]
        signature: Option<PathBuf>,
    },
    /// Check a bundle file and print its hash and kinds (no signature needed).
    Inspect {
        bundle: PathBuf,
        /// Print JSON (hash, name, version, abi, kinds and their steps) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send a signed bundle to the server; it becomes active for new actions.
    Push {
        bundle: PathBuf,
        /// The signature file [default: BUNDLE.sig]
        #[arg(long)]
        signature: Option<PathBuf>,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the bundles the server holds, with their status and actions in flight.
    List {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Make a version the server holds active again (the rollback path).
    Activate {
        /// Its hash, or enough of its start to name one bundle.
        hash: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Make a new signing key; prints its public key.
    Generate {
        /// Where to write the secret key (created with mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key (ed25519:…) of a secret key file, to give to servers and nodes (--trust).
    Public {
        /// The secret key file from `troupe keys generate`.
        key: PathBuf,
    },
    /// List the keys the server trusts.
    List {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Trust a public key (ed25519:…) for signing bundles (needs an admin token).
    Trust {
        public_key: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Revoke a key: its bundles take no new actions, and actions in flight on them fail.
    Revoke {
        key_id: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

fn sig_path(bundle: &Path, given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let mut p = bundle.as_os_str().to_owned();
        p.push(".sig");
        PathBuf::from(p)
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Loads `library` in a step host, as a server would, and checks that it
/// exports every function the manifest names: a mismatch is found before
/// anything is signed, not at push time.
async fn check_exports(m: &engine::bundle::Manifest, library: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("finding the troupe executable")?;
    let cmd = engine::HostCommand {
        program: exe.into(),
        args: vec![crate::STEP_HOST_ARG.into()],
        watch: None,
    };
    let library =
        std::fs::canonicalize(library).with_context(|| format!("finding {}", library.display()))?;
    let host = engine::host::StepHost::spawn(&cmd, &library, &m.name)
        .await
        .with_context(|| format!("loading {} in a step host", library.display()))?;
    let missing: Vec<&str> = m
        .functions()
        .into_iter()
        .filter(|f| !host.exports().iter().any(|e| e == f))
        .collect();
    let exported = host.exports().join(", ");
    host.shutdown("export check done").await;
    if !missing.is_empty() {
        bail!(
            "the manifest names functions {} does not export: {} (it exports: {exported}); fix the manifest's `function =` or export them with troupe_sdk::export_steps!",
            library.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

/// Reads a bundle and its signature file.
pub(crate) fn read_signed(bundle: &Path, signature: Option<PathBuf>) -> Result<(Vec<u8>, String)> {
    let bytes = read(bundle)?;
    let sig = sig_path(bundle, signature);
    let text = std::fs::read_to_string(&sig).with_context(|| {
        format!(
            "reading the signature {} (sign the bundle with `troupe bundle sign`)",
            sig.display()
        )
    })?;
    Ok((bytes, text))
}

/// Signs bundle bytes with a secret key, now.
pub(crate) fn sign(bytes: &[u8], key: &SecretKey) -> Result<Signature> {
    let signed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    Ok(engine::bundle::sign(bytes, key, signed_at)?)
}

/// Writes a new secret key file with mode 0600, refusing to overwrite.
pub(crate) fn generate_key(out: &Path) -> Result<SecretKey> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key = SecretKey::from_seed(seed);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    file.write_all(key.to_text().as_bytes())?;
    Ok(key)
}

pub(crate) fn load_key(path: &Path) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the key {}", path.display()))?;
    Ok(SecretKey::from_text(&text)?)
}

fn print_json_or(json: bool, v: &Value, text: impl FnOnce(&Value)) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        text(v);
    }
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// The bundles as a table, newest first (as the other lists), with short
/// hashes (enough for `bundle activate`) and when each was pushed.
fn print_bundles(list: &Value) {
    let mut bundles = list["bundles"].as_array().cloned().unwrap_or_default();
    if bundles.is_empty() {
        println!("no bundles; push one with `troupe bundle push BUNDLE`");
        return;
    }
    bundles.sort_by(|a, b| s(&b["created_at"]).cmp(s(&a["created_at"])));
    let names: Vec<String> = bundles
        .iter()
        .map(|b| format!("{} {}", s(&b["name"]), s(&b["version"])))
        .collect();
    let width = names.iter().map(String::len).max().unwrap_or(0).max(6);
    println!(
        "{:<8}  {:<width$}  {:<8}  {:>9}  {:<20}  SIGNER",
        "HASH", "BUNDLE", "STATUS", "IN FLIGHT", "PUSHED"
    );
    for (b, name) in bundles.iter().zip(&names) {
        println!(
            "{:<8}  {:<width$}  {:<8}  {:>9}  {:<20}  {}",
            short(s(&b["hash"])),
            name,
            s(&b["status"]),
            b["in_flight"].as_u64().unwrap_or_default(),
            date(s(&b["created_at"])),
            s(&b["signer"])
        );
    }
}

/// An RFC 3339 time to the second, in UTC: `2026-12-06 04:10:18Z`.
fn date(t: &str) -> String {
    t.parse::<chrono::DateTime<chrono::Utc>>()
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|_| t.to_owned())
}

pub(crate) async fn run(cmd: BundleCommand) -> Result<ExitCode> {
    match cmd {
        BundleCommand::New {
            name,
            dir,
            troupe_src,
        } => {
            let dir = crate::scaffold::new(&name, dir, troupe_src)?;
            let d = dir.display();
            println!("created step crate {name} in {d}");
            println!();
            println!("next:");
            println!(
                "  cd {d} && cargo test                 # unit test and the kinds, in the harness"
            );
            println!("  cargo build --release");
            println!(
                "  troupe bundle build bundle.toml --library target/release/lib{}.so",
                name.replace('-', "_")
            );
            println!(
                "  troupe bundle sign {name}-0.1.0.bundle --key KEYFILE   # troupe keys generate --out KEYFILE"
            );
            println!("  troupe bundle push {name}-0.1.0.bundle");
            println!("  troupe submit hello --target vps-123 --wait");
        }
        BundleCommand::Build {
            manifest,
            library,
            target,
            out,
        } => {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            let lib = read(&library)?;
            let target = target.unwrap_or_else(|| engine::bundle::TARGET.to_owned());
            let bytes = engine::bundle::build(&text, &[(&target, &lib)])
                .with_context(|| format!("in {}", manifest.display()))?;
            let m = engine::bundle::Manifest::parse(&text)?;
            if target == engine::bundle::TARGET {
                check_exports(&m, &library).await?;
            } else {
                eprintln!(
                    "note: the library is for {target}, not this machine ({}): its exports are checked when a server for {target} loads it",
                    engine::bundle::TARGET
                );
            }
            let out =
                out.unwrap_or_else(|| PathBuf::from(format!("{}-{}.bundle", m.name, m.version)));
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}  {} ({} {}, {}, {} bytes)",
                engine::BundleHash::of(&bytes),
                out.display(),
                m.name,
                m.version,
                crate::args::count(m.kinds.len(), "kind"),
                bytes.len()
            );
        }
        BundleCommand::Sign { bundle, key, out } => {
            let bytes = read(&bundle)?;
            let sig = sign(&bytes, &load_key(&key)?)
                .with_context(|| format!("signing {}", bundle.display()))?;
            let out = sig_path(&bundle, out);
            std::fs::write(&out, sig.to_text())
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "signed {} {} ({}) with key {} → {}",
                sig.claims.name,
                sig.claims.version,
                sig.claims.sha256,
                sig.key_id,
                out.display()
            );
        }
        BundleCommand::Verify {
            bundle,
            trust,
            signature,
        } => {
            let (bytes, text) = read_signed(&bundle, signature)?;
            let key: PublicKey = trust.parse()?;
            let mut t = Trust::default();
            t.add(key);
            let sig = Signature::from_text(&text)?;
            let verified = engine::signing::verify(bytes, &sig, &t)?;
            let manifest = engine::bundle::inspect(verified.bytes())?;
            let c = verified.claims();
            if (manifest.name.as_str(), manifest.version.as_str())
                != (c.name.as_str(), c.version.as_str())
            {
                bail!(
                    "the signature is for {} {}, but the manifest says {} {}",
                    c.name,
                    c.version,
                    manifest.name,
                    manifest.version
                );
            }
            println!(
                "ok: {} {} ({}) signed by {}",
                c.name,
                c.version,
                c.sha256,
                verified.key_id()
            );
        }
        BundleCommand::Inspect { bundle, json } => {
            let bytes = read(&bundle)?;
            let m = engine::bundle::inspect(&bytes)?;
            if json {
                let kinds: serde_json::Map<String, Value> = m
                    .kinds
                    .iter()
                    .map(|(name, k)| {
                        let steps: Vec<&str> = k.steps.iter().map(|s| s.name()).collect();
                        (
                            name.clone(),
                            json!({ "steps": steps, "description": k.description }),
                        )
                    })
                    .collect();
                let v = json!({
                    "hash": engine::BundleHash::of(&bytes).to_string(),
                    "name": m.name,
                    "version": m.version,
                    "abi": m.abi,
                    "kinds": kinds,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("hash     {}", engine::BundleHash::of(&bytes));
            println!("bundle   {} {} (ABI {})", m.name, m.version, m.abi);
            for (name, k) in &m.kinds {
                let steps: Vec<&str> = k.steps.iter().map(|s| s.name()).collect();
                println!("kind     {name}: {}", steps.join(" → "));
            }
        }
        BundleCommand::Push {
            bundle,
            signature,
            json,
            server,
        } => {
            let (bytes, sig) = read_signed(&bundle, signature)?;
            let (stored, b) = Client::connect(&server)?.push(bytes, sig).await?;
            return print_json_or(json, &b, |b| {
                let what = format!(
                    "{} {} ({})",
                    s(&b["name"]),
                    s(&b["version"]),
                    short(s(&b["hash"]))
                );
                match s(&b["status"]) {
                    status if stored => println!("pushed {what}, now {status}"),
                    "active" => println!("{what} is already held and active; nothing was pushed"),
                    status => println!(
                        "{what} is already held ({status}); nothing was pushed — `troupe bundle activate {}` to make it active",
                        short(s(&b["hash"]))
                    ),
                }
            });
        }
        BundleCommand::List { json, server } => {
            let v = Client::connect(&server)?.get("/v1/bundles", &[]).await?;
            return print_json_or(json, &v, print_bundles);
        }
        BundleCommand::Activate { hash, json, server } => {
            let client = Client::connect(&server)?;
            let list = client.get("/v1/bundles", &[]).await?;
            let hash = full_hash(&list, &hash)?;
            let bundles = list["bundles"].as_array().cloned().unwrap_or_default();
            let name = bundles
                .iter()
                .find(|b| b["hash"] == hash.as_str())
                .map(|b| s(&b["name"]).to_owned())
                .unwrap_or_default();
            // Its name's active version before: what the change replaces.
            let was = bundles
                .iter()
                .find(|b| b["name"] == name.as_str() && b["status"] == "active")
                .cloned();
            let b = client
                .post(&format!("/v1/bundles/{hash}/activate"), &json!({}))
                .await?;
            return print_json_or(json, &b, |b| {
                let what = format!("{} {}", s(&b["name"]), s(&b["version"]));
                match &was {
                    Some(w) if w["hash"] == b["hash"] => {
                        println!("{what} is already active; nothing changed")
                    }
                    Some(w) => println!(
                        "{what} is now active, was {} ({})",
                        s(&w["version"]),
                        short(s(&w["hash"]))
                    ),
                    None => println!("{what} is now active"),
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The first 8 characters of a hash: enough to name a bundle to
/// `bundle activate`.
pub(crate) fn short(hash: &str) -> &str {
    hash.get(..8).unwrap_or(hash)
}

/// The one bundle in `list` (`GET /v1/bundles`) whose hash starts with
/// `given` (a whole hash passes as is).
fn full_hash(list: &Value, given: &str) -> Result<String> {
    let given = given.to_ascii_lowercase();
    if given.len() == 64 {
        return Ok(given);
    }
    let matching: Vec<String> = list["bundles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["hash"].as_str())
        .filter(|h| h.starts_with(&given))
        .map(str::to_owned)
        .collect();
    match matching.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no bundle on the server has a hash starting with {given:?} (see `troupe bundle list`)"
        ),
        many => bail!(
            "{} bundles have hashes starting with {given:?}; give more of it",
            many.len()
        ),
    }
}

pub(crate) async fn run_keys(cmd: KeysCommand) -> Result<ExitCode> {
    match cmd {
        KeysCommand::Public { key } => {
            println!("{}", load_key(&key)?.public());
        }
        KeysCommand::Generate { out } => {
            let key = generate_key(&out)?;
            eprintln!(
                "secret key written to {} (mode 0600); keep it secret",
                out.display()
            );
            eprintln!(
                "key id {}; trust it with: troupe serve --trust {}",
                key.public().id(),
                key.public()
            );
            println!("{}", key.public());
        }
        KeysCommand::List { json, server } => {
            let v = Client::connect(&server)?.get("/v1/keys", &[]).await?;
            return print_json_or(json, &v, |v| {
                for k in v["keys"].as_array().into_iter().flatten() {
                    let state = if k["revoked"] == true {
                        "revoked"
                    } else {
                        "trusted"
                    };
                    println!(
                        "{}  {:<8} {:<6} {}",
                        s(&k["key_id"]),
                        state,
                        s(&k["source"]),
                        s(&k["public_key"])
                    );
                }
            });
        }
        KeysCommand::Trust {
            public_key,
            json,
            server,
        } => {
            let k = Client::connect(&server)?
                .post("/v1/keys", &json!({ "public_key": public_key }))
                .await?;
            return print_json_or(json, &k, |k| println!("trusted key {}", s(&k["key_id"])));
        }
        KeysCommand::Revoke {
            key_id,
            json,
            server,
        } => {
            let client = Client::connect(&server)?;
            let keys = client.get("/v1/keys", &[]).await?;
            let already = keys["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["key_id"] == key_id.as_str() && k["revoked"] == true);
            let k = client
                .post(&format!("/v1/keys/{key_id}/revoke"), &json!({}))
                .await?;
            return print_json_or(json, &k, |k| {
                if already {
                    println!(
                        "key {} was already revoked; nothing changed",
                        s(&k["key_id"])
                    )
                } else {
                    println!("revoked key {}", s(&k["key_id"]))
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
