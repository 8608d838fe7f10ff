//! The listener: accepts connections under a cap, gives each a deadline for
//! its TLS handshake and for every request head, and serves HTTP/1.1 (with
//! upgrades, for node WebSockets) until told to stop.
//!
//! A peer that opens a connection and sends nothing, or half a request,
//! holds a slot for at most [`Limits::header_timeout`]; past
//! [`Limits::max_connections`] the server stops accepting until a slot is
//! free, so new connections wait in the kernel's backlog instead of taking
//! file descriptors the server needs for its database and step hosts.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::tls::Tls;

/// What one server lets its peers hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once (nodes hold one each).
    pub max_connections: usize,
    /// Time for a request's head to arrive once the server waits for one:
    /// a new connection's first request, or the next on a kept-alive one
    /// (so it is also how long an idle connection stays open).
    pub header_timeout: Duration,
    /// Time for a TLS handshake.
    pub tls_handshake: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 16_384,
            header_timeout: Duration::from_secs(10),
            tls_handshake: Duration::from_secs(10),
        }
    }
}

/// Descriptors kept back from connections for everything else the server
/// opens: database connections, step hosts' pipes, bundle files, logs.
pub(crate) const RESERVED_FDS: u64 = 512;

/// Raises this process's open-file limit to its hard limit and returns the
/// connection cap that fits in it: `wanted`, or fewer (with a warning) when
/// the limit leaves no room for [`RESERVED_FDS`] besides.
pub fn fit_connections(wanted: usize) -> usize {
    let (soft, hard) = match rustix::process::getrlimit(rustix::process::Resource::Nofile) {
        rustix::process::Rlimit {
            current: Some(soft),
            maximum,
        } => (soft, maximum),
        // Unlimited.
        _ => return wanted,
    };
    let mut limit = soft;
    if let Some(hard) = hard
        && hard > soft
    {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        match rustix::process::setrlimit(rustix::process::Resource::Nofile, raised) {
            Ok(()) => limit = hard,
            Err(e) => tracing::debug!(error = %e, "cannot raise the open-file limit"),
        }
    } else if hard.is_none() {
        let raised = rustix::process::Rlimit {
            current: None,
            maximum: None,
        };
        if rustix::process::setrlimit(rustix::process::Resource::Nofile, raised).is_ok() {
            return wanted;
        }
    }
    let room = limit.saturating_sub(RESERVED_FDS) as usize;
    if room < wanted {
        let room = room.max(64);
        tracing::warn!(
            open_files = limit,
            wanted,
            serving = room,
            "the open-file limit leaves room for fewer connections than --max-connections; \
             raise it (LimitNOFILE= in the systemd unit, ulimit -n) to serve more"
        );
        return room;
    }
    wanted
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Tls>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(tls) = &tls {
        tls.spawn_reloader();
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Told to stop: each connection finishes the request it serves and
    // closes; `tasks` waits for them.
    let stopping = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 << 10);
    tokio::pin!(shutdown);
    let mut full_since: Option<tokio::time::Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_since.is_none() {
                    full_since = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "the connection limit is reached: new connections wait until one closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                    _ = &mut shutdown => break,
                }
            }
        };
        if let Some(since) = full_since.take() {
            tracing::info!(waited = ?since.elapsed(), "below the connection limit again");
        }
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or memory for a moment: wait rather
                    // than spin; anything else is per-connection.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // A node's call and its answer are small frames: with Nagle's
        // algorithm each would wait for a delayed ACK (40 ms here).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
        let service =
            hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                app.clone(),
                move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                },
            ));
        let http = http.clone();
        let stopping = stopping.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            let _slot = slot;
            let result = match tls {
                None => {
                    let connection = http
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades();
                    until_stopped(connection, &stopping).await
                }
                Some(tls) => {
                    let accepted =
                        tokio::time::timeout(limits.tls_handshake, tls.acceptor().accept(tcp))
                            .await;
                    let stream = match accepted {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let connection = http
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    until_stopped(connection, &stopping).await
                }
            };
            if let Err(e) = result {
                log_connection_end(peer, &e);
            }
        });
    }
    drop(listener);
    stopping.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Serves one connection; once `stopping`, it ends after the request in
/// flight (an upgraded connection, a node's WebSocket, is its own task by
/// then and ends with the engine).
async fn until_stopped<I, S>(
    connection: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    stopping: &tokio_util::sync::CancellationToken,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        _ = stopping.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

/// A connection that ended in error: worth a debug line, since a header
/// timeout or a peer that went away is a peer's doing, not the server's.
fn log_connection_end(peer: SocketAddr, e: &hyper::Error) {
    if e.is_timeout() {
        tracing::debug!(%peer, "closed a connection that sent no complete request in time");
    } else {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
