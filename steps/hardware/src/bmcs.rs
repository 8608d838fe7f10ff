//! The BMCs a deployment lets power steps reach (`troupe serve --var
//! bmcs=…`), and how each one's certificate is trusted.
//!
//! The list is whitespace- or comma-separated; each entry is a Redfish base
//! URL, optionally followed by `=sha256:HEX` (pin the BMC's certificate) or
//! `=insecure` (do not check it):
//!
//! ```text
//! https://10.0.0.5 https://10.0.0.6=sha256:AB:CD:… http://127.0.0.1:8000
//! ```
//!
//! A request names a BMC; a step refuses one that is not on the list before
//! it sends the credentials anywhere.

use crate::tls::Trust;

/// One allowed BMC.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Bmc {
    /// The base URL, without a trailing slash.
    pub(crate) url: String,
    pub(crate) trust: Trust,
}

/// `url` without trailing slashes, its scheme and host lowercased.
pub(crate) fn normalize(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    match url.split_once("://") {
        Some((scheme, rest)) => format!(
            "{}://{}",
            scheme.to_ascii_lowercase(),
            rest.to_ascii_lowercase()
        ),
        None => url.to_owned(),
    }
}

/// Finds `url` in the deployment's list.
pub(crate) fn find(list: &str, url: &str) -> Result<Bmc, String> {
    let wanted = normalize(url);
    if !(wanted.starts_with("https://") || wanted.starts_with("http://")) {
        return Err(format!("the BMC {url} is not an http:// or https:// URL"));
    }
    for entry in list.split(|c: char| c.is_whitespace() || c == ',') {
        if entry.is_empty() {
            continue;
        }
        let (base, trust) = match entry.split_once('=') {
            Some((base, trust)) => (base, Some(trust)),
            None => (entry, None),
        };
        if normalize(base) != wanted {
            continue;
        }
        let trust = match trust {
            None => Trust::Verified,
            Some(text) => Trust::parse(text)
                .map_err(|e| format!("the deployment's bmcs entry for {wanted}: {e}"))?,
        };
        return Ok(Bmc { url: wanted, trust });
    }
    Err(format!(
        "the BMC {wanted} is not one this deployment allows: add it to the server's --var bmcs"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_bmc_is_found_with_its_trust() {
        let pin = "ab".repeat(32);
        let list = format!(
            "https://10.0.0.5, https://BMC-6.example:8443/=sha256:{pin}\n http://127.0.0.1:8000=insecure"
        );
        assert_eq!(
            find(&list, "https://10.0.0.5/").unwrap(),
            Bmc {
                url: "https://10.0.0.5".into(),
                trust: Trust::Verified
            }
        );
        assert_eq!(
            find(&list, "https://bmc-6.example:8443").unwrap().trust,
            Trust::Pinned([0xAB; 32])
        );
        assert_eq!(
            find(&list, "http://127.0.0.1:8000").unwrap().trust,
            Trust::Insecure
        );
    }

    #[test]
    fn an_unlisted_bmc_is_refused() {
        let err = find("https://10.0.0.5", "https://10.0.0.50").unwrap_err();
        assert!(
            err.contains("https://10.0.0.50") && err.contains("--var bmcs"),
            "{err}"
        );
        // The same host over plain HTTP is another BMC.
        assert!(find("https://10.0.0.5", "http://10.0.0.5").is_err());
        assert!(find("https://10.0.0.5", "ftp://10.0.0.5").is_err());
    }
}
