//! The BMCs a deployment lets power steps reach (`troupe serve --var
//! bmcs=…`), and how each one's certificate is trusted.
//!
//! The list is whitespace- or comma-separated; each entry is a Redfish base
//! URL, optionally followed by `=sha256:HEX` (pin the BMC's certificate) or
//! `=insecure` (do not check it), or an IPMI address `ipmi://HOST[:PORT]`
//! (port 623 by default), optionally followed by `=cipher:N` (the RMCP+
//! cipher suite, 3 by default):
//!
//! ```text
//! https://10.0.0.5 https://10.0.0.6=sha256:AB:CD:… http://127.0.0.1:8000
//! ipmi://10.0.0.7 ipmi://10.0.0.8:6230=cipher:17
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
    pub(crate) protocol: Protocol,
}

/// How a BMC is spoken to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// Redfish over HTTPS (or HTTP), its certificate trusted so.
    Redfish(Trust),
    /// IPMI v2.0 over LAN (RMCP+, `lanplus`) with this cipher suite.
    Ipmi { cipher: u8 },
}

/// The cipher suite used when the list names none: RAKP-HMAC-SHA1,
/// HMAC-SHA1-96 and AES-CBC-128, which every IPMI v2.0 BMC offers.
pub(crate) const DEFAULT_CIPHER: u8 = 3;

fn cipher(text: &str) -> Result<u8, String> {
    text.strip_prefix("cipher:")
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|n| *n <= 17)
        .ok_or_else(|| format!("`{text}` is not cipher:N (an RMCP+ cipher suite, 0 to 17)"))
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
    let ipmi = wanted.starts_with("ipmi://");
    if !(ipmi || wanted.starts_with("https://") || wanted.starts_with("http://")) {
        return Err(format!(
            "the BMC {url} is not an https://, http:// (Redfish) or ipmi:// address"
        ));
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
        let protocol = match (ipmi, trust) {
            (true, None) => Protocol::Ipmi {
                cipher: DEFAULT_CIPHER,
            },
            (true, Some(text)) => Protocol::Ipmi {
                cipher: cipher(text)
                    .map_err(|e| format!("the deployment's bmcs entry for {wanted}: {e}"))?,
            },
            (false, None) => Protocol::Redfish(Trust::Verified),
            (false, Some(text)) => Protocol::Redfish(
                Trust::parse(text)
                    .map_err(|e| format!("the deployment's bmcs entry for {wanted}: {e}"))?,
            ),
        };
        return Ok(Bmc {
            url: wanted,
            protocol,
        });
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
                protocol: Protocol::Redfish(Trust::Verified)
            }
        );
        assert_eq!(
            find(&list, "https://bmc-6.example:8443").unwrap().protocol,
            Protocol::Redfish(Trust::Pinned([0xAB; 32]))
        );
        assert_eq!(
            find(&list, "http://127.0.0.1:8000").unwrap().protocol,
            Protocol::Redfish(Trust::Insecure)
        );
    }

    #[test]
    fn ipmi_bmcs_take_a_cipher_suite() {
        let list = "ipmi://10.0.0.7 ipmi://10.0.0.8:6230=cipher:17";
        assert_eq!(
            find(list, "ipmi://10.0.0.7").unwrap().protocol,
            Protocol::Ipmi { cipher: 3 }
        );
        assert_eq!(
            find(list, "IPMI://10.0.0.8:6230/").unwrap().protocol,
            Protocol::Ipmi { cipher: 17 }
        );
        // The same host over Redfish is another BMC.
        assert!(find(list, "https://10.0.0.7").is_err());
        let err = find("ipmi://10.0.0.7=sha256:00", "ipmi://10.0.0.7").unwrap_err();
        assert!(err.contains("cipher:N"), "{err}");
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
