//! Arguments and helpers that several commands share: how a client finds
//! and authenticates to its server, durations, the data directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

/// The file in the data directory that holds the server's first admin token.
pub(crate) const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Where a client goes when neither a flag, the environment nor a profile
/// says.
pub(crate) const DEFAULT_SERVER: &str = "http://127.0.0.1:7878";

#[derive(Args, Clone)]
pub(crate) struct ServerArg {
    /// The troupe server to talk to [default: the profile's, else http://127.0.0.1:7878]
    #[arg(long, env = "TROUPE_SERVER", global = true)]
    pub(crate) server: Option<String>,
    /// A profile from the client config file (~/.config/troupe/client.toml, or TROUPE_CLIENT_CONFIG): its server, CA and token file, under any flag or variable given [default: the file's `default`]
    #[arg(long, env = "TROUPE_PROFILE", global = true)]
    pub(crate) profile: Option<String>,
    /// An API token (troupe_…). Prefer --token-file or TROUPE_TOKEN: a command line is visible to other users.
    #[arg(long, env = "TROUPE_TOKEN", hide_env_values = true, global = true)]
    pub(crate) token: Option<String>,
    /// A file holding the API token [default: admin.token in TROUPE_DATA or ./troupe-data, if present]
    #[arg(long, env = "TROUPE_TOKEN_FILE", global = true)]
    pub(crate) token_file: Option<PathBuf>,
    /// For an https:// server: a PEM file with the CA certificate(s) that signed its certificate (only these are trusted).
    #[arg(long, env = "TROUPE_CA_CERT", global = true)]
    pub(crate) ca_cert: Option<PathBuf>,
}

/// What a client talks to, once flags, variables and the profile are
/// weighed.
pub(crate) struct Target {
    pub(crate) server: String,
    pub(crate) token: Option<String>,
    pub(crate) ca_cert: Option<PathBuf>,
}

impl ServerArg {
    /// The server, token and CA to use: a flag or variable, else the
    /// profile's, else the defaults.
    pub(crate) fn target(&self) -> Result<Target> {
        let profile = crate::profiles::chosen(self.profile.as_deref())?;
        let profile = profile.as_ref();
        let server = self
            .server
            .clone()
            .or_else(|| profile.and_then(|p| p.server.clone()))
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let token = match (&self.token, &self.token_file) {
            (Some(_), _) | (None, Some(_)) => self.token()?,
            (None, None) => match profile.and_then(|p| p.token_file.as_deref()) {
                Some(path) => Some(read_token(path)?),
                None => self.token()?,
            },
        };
        let ca_cert = self
            .ca_cert
            .clone()
            .or_else(|| profile.and_then(|p| p.ca_cert.clone()));
        Ok(Target {
            server,
            token,
            ca_cert,
        })
    }

    /// The token to send: `--token`, else `--token-file`, else the admin
    /// token a local server wrote to its data directory.
    pub(crate) fn token(&self) -> Result<Option<String>> {
        if let Some(token) = &self.token {
            return Ok(Some(token.trim().to_owned()));
        }
        if let Some(path) = &self.token_file {
            return read_token(path).map(Some);
        }
        let local =
            data_dir_arg(std::env::var_os("TROUPE_DATA").map(PathBuf::from)).join(ADMIN_TOKEN_FILE);
        if local.is_file() {
            return read_token(&local).map(Some);
        }
        Ok(None)
    }
}

fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the API token from {}", path.display()))?;
    Ok(text.trim().to_owned())
}

/// The default database: SQLite in the data directory.
pub(crate) fn default_db(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("troupe.db").display())
}

/// The data directory: the one given, or `./troupe-data`.
pub(crate) fn data_dir_arg(dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(|| PathBuf::from("troupe-data"))
}

/// A duration with its unit, as `humantime` reads it: `500ms`, `30s`,
/// `2m`, `24h`, `30d`, `1h 30m`. A bare number is refused: `90` could mean
/// seconds or days, and a token that expires 90 seconds after it was made
/// for three months is a surprise found too late.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "{s:?} has no unit: write it as {s}s, {s}m, {s}h or {s}d"
        ));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e}; expected a duration such as 30s, 500ms, 2m, 24h or 30d"))
}

/// A size such as `500MiB`, `2GiB`, `1GB` or `4096` (bytes).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let bad = || format!("{s:?}: expected a size such as 500MiB, 2GiB or 1GB");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let unit: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).ok_or_else(bad)
}

/// Finds a plugin library troupe ships (`builtin`, or `testkit` for the
/// benchmark): in `$TROUPE_LIB_DIR`, next to the executable (a cargo
/// build), or in `lib/troupe` beside its `bin` directory (where
/// `deploy/install.sh` puts it).
pub(crate) fn shipped_library(stem: &str) -> anyhow::Result<PathBuf> {
    let name = format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let exe = std::env::current_exe()?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let mut places: Vec<PathBuf> = Vec::new();
    if let Some(lib_dir) = std::env::var_os("TROUPE_LIB_DIR") {
        places.push(PathBuf::from(lib_dir));
    }
    places.extend([dir.to_path_buf(), dir.join(".."), dir.join("../lib/troupe")]);
    for place in &places {
        let candidate = place.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let looked: Vec<String> = places.iter().map(|p| p.display().to_string()).collect();
    anyhow::bail!(
        "the step library {name} was not found (looked in {}); install troupe with deploy/install.sh, \
         or set TROUPE_LIB_DIR to the directory that holds it (a cargo build puts it next to the troupe binary)",
        looked.join(", ")
    )
}

/// `1 kind`, `2 kinds`: a count and its noun, in the right number.
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_their_units() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2 parsecs").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        let bare = parse_duration("90").unwrap_err();
        assert!(bare.contains("has no unit"), "{bare}");
        assert_eq!(count(1, "kind"), "1 kind");
        assert_eq!(count(3, "kind"), "3 kinds");
    }
}
