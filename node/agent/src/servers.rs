//! The servers a node connects to, by number: those it was given
//! (`--server`) and those a server's `Welcome` named. A number, once
//! given, always means one address: a call's result names the server
//! that sent it by its number.
//!
//! One connection per server: each server names itself (its id) in its
//! `Challenge`, and a second address of a server already connected (a
//! load balancer's, or a name and an IP of one host) is closed before
//! the hello.

use std::sync::Mutex;

use tokio::sync::mpsc;

pub(crate) struct Servers {
    known: Mutex<Vec<Known>>,
    /// Numbers to start a connection task for.
    start: mpsc::UnboundedSender<usize>,
}

struct Known {
    /// `http://HOST:PORT` or `https://HOST:PORT`, without a trailing `/`.
    url: String,
    /// Named by a server rather than given: given up when it cannot be
    /// reached for a while, or when it is another address of a server
    /// connected already.
    learned: bool,
    /// Its connection task runs.
    active: bool,
    /// The server's id while connected.
    id: Option<String>,
    /// The session credential its `Welcome` carried, while connected.
    session: Option<String>,
}

/// How a second address of a server already connected ends.
#[derive(Debug)]
pub(crate) struct Duplicate(pub(crate) String);

impl std::fmt::Display for Duplicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "already connected to server {} at another address",
            self.0
        )
    }
}

impl std::error::Error for Duplicate {}

impl Servers {
    /// The servers given; each number to connect to comes out of the
    /// receiver (these first).
    pub(crate) fn new(given: &[String]) -> (Servers, mpsc::UnboundedReceiver<usize>) {
        let (start, numbers) = mpsc::unbounded_channel();
        let mut known = Vec::new();
        for url in given {
            let url = url.trim_end_matches('/').to_owned();
            if known.iter().any(|k: &Known| k.url == url) {
                continue;
            }
            let _ = start.send(known.len());
            known.push(Known {
                url,
                learned: false,
                active: true,
                id: None,
                session: None,
            });
        }
        let servers = Servers {
            known: Mutex::new(known),
            start,
        };
        (servers, numbers)
    }

    pub(crate) fn url(&self, n: usize) -> String {
        self.known.lock().unwrap()[n].url.clone()
    }

    pub(crate) fn learned(&self, n: usize) -> bool {
        self.known.lock().unwrap()[n].learned
    }

    /// Connection `n` reached server `id`: false if another connection
    /// holds it already.
    pub(crate) fn claim(&self, n: usize, id: &str) -> bool {
        let mut known = self.known.lock().unwrap();
        if known
            .iter()
            .enumerate()
            .any(|(i, k)| i != n && k.id.as_deref() == Some(id))
        {
            return false;
        }
        known[n].id = Some(id.to_owned());
        true
    }

    /// Connection `n` is in, with this session credential.
    pub(crate) fn welcomed(&self, n: usize, session: String) {
        self.known.lock().unwrap()[n].session = Some(session);
    }

    /// Connection `n` ended.
    pub(crate) fn ended(&self, n: usize) {
        let mut known = self.known.lock().unwrap();
        known[n].id = None;
        known[n].session = None;
    }

    /// Connection `n`'s task stopped for good (a learned address given
    /// up); a later `Welcome` naming it starts it again.
    pub(crate) fn retire(&self, n: usize) {
        let mut known = self.known.lock().unwrap();
        known[n].active = false;
        known[n].id = None;
        known[n].session = None;
    }

    /// Server `from` named these addresses of the other servers: each not
    /// known (or retired) gets a connection. `HOST:PORT` means `from`'s
    /// scheme.
    pub(crate) fn learn(&self, from: usize, addresses: &[String]) {
        let mut known = self.known.lock().unwrap();
        let scheme = known[from]
            .url
            .split_once("://")
            .map_or("http", |(s, _)| s)
            .to_owned();
        for address in addresses {
            let url = if address.contains("://") {
                address.trim_end_matches('/').to_owned()
            } else {
                format!("{scheme}://{}", address.trim_end_matches('/'))
            };
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                tracing::warn!(address = %address, "a server named another at an address this node cannot use");
                continue;
            }
            match known.iter().position(|k| k.url == url) {
                Some(n) if known[n].active => {}
                Some(n) => {
                    known[n].active = true;
                    let _ = self.start.send(n);
                }
                None => {
                    tracing::info!(server = %url, "learned of another server; connecting to it too");
                    let _ = self.start.send(known.len());
                    known.push(Known {
                        url,
                        learned: true,
                        active: true,
                        id: None,
                        session: None,
                    });
                }
            }
        }
    }

    /// Where to download a bundle from: server `preferred` while it is
    /// connected, else any that is; its URL and session credential.
    pub(crate) fn source(&self, preferred: usize) -> (String, Option<String>) {
        let known = self.known.lock().unwrap();
        let chosen = if known[preferred].session.is_some() {
            preferred
        } else {
            (0..known.len())
                .find(|&i| known[i].session.is_some())
                .unwrap_or(preferred)
        };
        (known[chosen].url.clone(), known[chosen].session.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_connection_per_server_and_named_addresses_learned_once() {
        let (servers, mut numbers) = Servers::new(&[
            "https://lb.example:8443/".to_owned(),
            "https://lb.example:8443".to_owned(),
        ]);
        assert_eq!(numbers.try_recv().unwrap(), 0);
        assert!(numbers.try_recv().is_err(), "the same address once");
        assert!(servers.claim(0, "s-a"));
        servers.learn(
            0,
            &[
                "10.0.0.2:8443".to_owned(),
                "https://10.0.0.1:8443".to_owned(),
            ],
        );
        assert_eq!(numbers.try_recv().unwrap(), 1);
        assert_eq!(
            servers.url(1),
            "https://10.0.0.2:8443",
            "the scheme it was reached by"
        );
        assert_eq!(numbers.try_recv().unwrap(), 2);
        assert!(servers.learned(2));
        // 10.0.0.1 is s-a, reached through the balancer already.
        assert!(!servers.claim(2, "s-a"));
        servers.retire(2);
        servers.learn(0, &["https://10.0.0.1:8443".to_owned()]);
        assert_eq!(numbers.try_recv().unwrap(), 2, "named again: tried again");
        servers.ended(0);
        assert!(servers.claim(2, "s-a"), "its other connection ended");
    }
}
