//! TLS for the API (rustls, ring): a certificate chain and key from PEM
//! files, reloaded without a restart on SIGHUP or when either file changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How often the certificate files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Where the certificate chain and its private key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A loaded certificate that the server presents, swapped in place on reload.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Tls {
    /// Loads and checks the files: a bad certificate or key is reported
    /// before the server starts listening.
    pub async fn load(files: TlsFiles) -> std::io::Result<Tls> {
        let config = server_config(&files).map_err(|e| describe(&files, e))?;
        Ok(Tls {
            files,
            config: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Accepts connections with the certificate in use now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.read().unwrap().clone())
    }

    /// Reloads on SIGHUP and when a file's modification time changes. A
    /// failed reload keeps the certificate in use and says why.
    pub(crate) fn spawn_reloader(&self) {
        let tls = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch for SIGHUP; the certificate reloads when its files change");
                    None
                }
            };
            let mut seen = tls.stamps();
            loop {
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let why = tokio::select! {
                    _ = hangup => "SIGHUP",
                    _ = tokio::time::sleep(WATCH_EVERY) => {
                        let now = tls.stamps();
                        if now == seen {
                            continue;
                        }
                        seen = now;
                        "the certificate files changed"
                    }
                };
                match server_config(&tls.files) {
                    Ok(config) => {
                        *tls.config.write().unwrap() = Arc::new(config);
                        tracing::info!(cert = %tls.files.cert.display(), reason = why, "TLS certificate reloaded")
                    }
                    Err(e) => tracing::error!(
                        reason = why,
                        error = %describe(&tls.files, e),
                        "could not reload the TLS certificate; still serving the previous one"
                    ),
                }
            }
        });
    }

    fn stamps(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (modified(&self.files.cert), modified(&self.files.key))
    }
}

/// The server's TLS configuration from the files: HTTP/1.1 only (the
/// listener speaks nothing else).
fn server_config(files: &TlsFiles) -> std::io::Result<ServerConfig> {
    let invalid = |e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(&e))?;
    if certs.is_empty() {
        return Err(invalid(&"the certificate file holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| invalid(&e))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn describe(files: &TlsFiles, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(
        e.kind(),
        format!(
            "TLS certificate {} / key {}: {e} (both must be PEM: the certificate chain, then its private key)",
            files.cert.display(),
            files.key.display()
        ),
    )
}
