//! `troupe tokens create --admin --data-dir DIR` (or `--db URL`): on a
//! server's host, an admin token made straight in the database, with no
//! API token: the way back in when every admin token is lost. Whoever can
//! write the database can do this anyway; the command makes it audited
//! (`host:<unix user>`) instead of an `INSERT` by hand.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Where the server's database is: `--db`, or the SQLite file in `--data-dir`.
pub(crate) struct HostDb {
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) db: Option<String>,
}

pub(crate) async fn create_admin(
    name: &str,
    expires_in: Option<Duration>,
    at: HostDb,
    out: Option<&Path>,
    json: bool,
) -> Result<ExitCode> {
    let url = match (&at.db, &at.data_dir) {
        (Some(url), _) => url.clone(),
        (None, Some(dir)) => crate::args::default_db(dir),
        (None, None) => bail!("--admin needs the server's --data-dir or --db"),
    };
    if let Some(path) = sqlite_path(&url) {
        check_sqlite(&path)?;
    }
    // Claimed before the token exists, so an existing file stops everything.
    let mut file = out.map(crate::admin_cmd::private_file).transpose()?;
    let spec = engine::access::TokenSpec {
        name: name.to_owned(),
        scopes: vec![engine::access::Scope::Admin],
        kinds: None,
        expires_at: expires_in.map(|ttl| engine::model::now() + ttl),
        join: None,
    };
    let by = format!("host:{}", unix_user());
    let made = engine::Admin::create_token_in(&url, spec, &by).await;
    let (info, token) = match made {
        Ok(made) => made,
        Err(e) => {
            if let Some(out) = out {
                let _ = std::fs::remove_file(out);
            }
            return Err(e).with_context(|| {
                format!("creating an admin token in {}", engine::store::redact(&url))
            });
        }
    };
    let said = format!(
        "created admin token {} ({name}) directly in the database, recorded in the audit log as {by}; running servers accept it within 2 s",
        info.id
    );
    match (&mut file, out) {
        (Some(file), Some(out)) => {
            file.write_all(format!("{token}\n").as_bytes())?;
            file.sync_all()?;
            eprintln!("{said}; the token is in {} (mode 0600)", out.display());
        }
        _ if json => {
            let body = serde_json::json!({ "id": info.id, "name": info.name, "token": token, "created_by": by });
            println!("{}", serde_json::to_string_pretty(&body)?);
        }
        _ => {
            eprintln!("{said}; it is shown only now:");
            println!("{token}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The file of a `sqlite:` URL.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or(rest);
    Some(PathBuf::from(path))
}

/// The database must exist (a wrong directory must not get a new, empty
/// one), and belong to this user: files SQLite creates as another user
/// (root, say) would lock the server out of its own database.
fn check_sqlite(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|_| {
        anyhow::anyhow!(
            "no troupe database at {}: give the server's --data-dir (the directory that holds troupe.db) or its --db URL",
            path.display()
        )
    })?;
    let me = std::fs::metadata("/proc/self")
        .context("finding this process's user")?
        .uid();
    if meta.uid() != me {
        bail!(
            "{} belongs to uid {}, not to this user (uid {me}): run this as the user the server runs as \
             (e.g. sudo -u troupe troupe tokens create --admin …), so files SQLite makes stay the server's",
            path.display(),
            meta.uid()
        );
    }
    Ok(())
}

/// This process's user, by name where `/etc/passwd` has it, and who ran
/// `sudo` if someone did.
fn unix_user() -> String {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let name = uid.and_then(|uid| {
        std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    let mut fields = line.split(':');
                    let name = fields.next()?;
                    (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
                })
            })
    });
    let user = name.unwrap_or_else(|| match uid {
        Some(uid) => format!("uid-{uid}"),
        None => "unknown".to_owned(),
    });
    match std::env::var("SUDO_USER") {
        Ok(by) if !by.is_empty() && by != user => format!("{user} (sudo by {by})"),
        _ => user,
    }
}
