//! TLS for the API (rustls, ring): a certificate chain and key from PEM
//! files, reloaded without a restart on SIGHUP or when either file changes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;

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
    pub(crate) config: RustlsConfig,
}

impl Tls {
    /// Loads and checks the files: a bad certificate or key is reported
    /// before the server starts listening.
    pub async fn load(files: TlsFiles) -> std::io::Result<Tls> {
        let config = RustlsConfig::from_pem_file(&files.cert, &files.key)
            .await
            .map_err(|e| describe(&files, e))?;
        Ok(Tls { files, config })
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
                match tls
                    .config
                    .reload_from_pem_file(&tls.files.cert, &tls.files.key)
                    .await
                {
                    Ok(()) => {
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
