//! Client profiles: named servers with their CA and token file, in
//! `~/.config/troupe/client.toml` (`$XDG_CONFIG_HOME/troupe/client.toml`,
//! or the file `TROUPE_CLIENT_CONFIG` names), as kubectl contexts and
//! `temporal env` keep them:
//!
//! ```toml
//! default = "dc1"
//!
//! [profiles.dc1]
//! server = "https://troupe.dc1.example:7878"
//! ca_cert = "/etc/troupe/ca.pem"
//! token_file = "~/.config/troupe/dc1.token"
//!
//! [profiles.local]
//! server = "http://127.0.0.1:7878"
//! ```
//!
//! A flag or environment variable (`--server`, `TROUPE_TOKEN_FILE`, …)
//! wins over the profile. The file holds no token, only where one is:
//! a token in a config file is one more copy to leak.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The profile used when none is named.
    default: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

/// One named server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Profile {
    pub(crate) server: Option<String>,
    pub(crate) ca_cert: Option<PathBuf>,
    pub(crate) token_file: Option<PathBuf>,
}

/// Where the client config file is, whether or not it exists.
pub(crate) fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TROUPE_CLIENT_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("troupe").join("client.toml"))
}

/// The profile `name` names, or the file's default; `None` without a file
/// or a default. A named profile that is not there is an error.
pub(crate) fn chosen(name: Option<&str>) -> Result<Option<Profile>> {
    let Some(path) = path() else {
        if let Some(name) = name {
            bail!(
                "profile {name:?}: there is no client config file (set HOME, or TROUPE_CLIENT_CONFIG)"
            );
        }
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(name) = name {
                bail!(
                    "profile {name:?}: {} does not exist (see `troupe --help` for its format)",
                    path.display()
                );
            }
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file: File = toml::from_str(&text).with_context(|| {
        format!(
            "{} is not a troupe client config: expected `default = \"NAME\"` and [profiles.NAME] tables with server, ca_cert and token_file",
            path.display()
        )
    })?;
    let Some(name) = name.map(str::to_owned).or(file.default) else {
        return Ok(None);
    };
    let Some(profile) = file.profiles.get(&name) else {
        let known: Vec<&str> = file.profiles.keys().map(String::as_str).collect();
        bail!(
            "no profile {name:?} in {}; it has: {}",
            path.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(Some(Profile {
        server: profile.server.clone(),
        ca_cert: profile.ca_cert.as_deref().map(|p| resolve(base, p)),
        token_file: profile.token_file.as_deref().map(|p| resolve(base, p)),
    }))
}

/// `~/…` from the home directory, a relative path from the config file's
/// directory.
fn resolve(base: &Path, path: &Path) -> PathBuf {
    if let Ok(rest) = path.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    base.join(path)
}
