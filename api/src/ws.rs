//! The node WebSocket's upgrade, done here rather than by axum so the bytes
//! a peer may send before its hello is accepted are capped: an anonymous
//! peer gets at most [`BEFORE_HELLO`] bytes read from it (a hello is well
//! under 1 KiB; capabilities add a little), then its connection is cut,
//! whatever size its first message claims. Once the hello is accepted the
//! cap is lifted ([`Budget::lift`]) and messages up to [`MAX_MESSAGE`]
//! flow (a step's output is at most 1 MiB, its log a little more).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::ApiError;

/// Bytes read from a peer before its hello is accepted.
pub(crate) const BEFORE_HELLO: usize = 16 << 10;

/// The largest message a node may send once it is in.
pub(crate) const MAX_MESSAGE: usize = 4 << 20;

/// Each connection's read and write buffer (the default is 128 KiB each,
/// which at 5,000 nodes is over a gigabyte).
const BUFFER: usize = 4 << 10;

/// A node's socket once upgraded.
pub(crate) type NodeSocket = WebSocketStream<Capped<TokioIo<hyper::upgrade::Upgraded>>>;

/// A request to switch to a WebSocket, checked.
pub(crate) struct Upgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    accept: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let not = |why: &str| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "not_a_websocket",
                format!("this endpoint is a node's WebSocket (`troupe node`): {why}"),
            )
        };
        let headers = &parts.headers;
        if !has_token(headers, header::CONNECTION, "upgrade")
            || !has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(not("the request does not ask to upgrade to a WebSocket"));
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v != "13")
        {
            return Err(not("only WebSocket version 13 is spoken"));
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or_else(|| not("Sec-WebSocket-Key is missing"))?;
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or_else(|| not("this connection cannot be upgraded"))?;
        Ok(Upgrade { on_upgrade, accept })
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

impl Upgrade {
    /// Answers `101` and runs `session` on the socket once the switch is
    /// made, reading at most `budget` bytes until it is lifted.
    pub(crate) fn on_upgrade<F, Fut>(self, budget: Budget, session: F) -> Response
    where
        F: FnOnce(NodeSocket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(async move {
            let upgraded = match self.on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "a node connection's upgrade failed");
                    return;
                }
            };
            let config = WebSocketConfig::default()
                .read_buffer_size(BUFFER)
                .write_buffer_size(BUFFER)
                .max_message_size(Some(MAX_MESSAGE))
                .max_frame_size(Some(MAX_MESSAGE));
            let io = Capped {
                inner: TokioIo::new(upgraded),
                left: budget.0,
            };
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            session(socket).await;
        });
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (
                    header::SEC_WEBSOCKET_ACCEPT,
                    HeaderValue::from_str(&self.accept).expect("base64 is a header value"),
                ),
            ],
        )
            .into_response()
    }
}

/// Bytes a connection may still read; `usize::MAX` once lifted.
#[derive(Clone)]
pub(crate) struct Budget(Arc<AtomicUsize>);

impl Budget {
    pub(crate) fn new(bytes: usize) -> Budget {
        Budget(Arc::new(AtomicUsize::new(bytes)))
    }

    /// No more cap: the peer proved who it is and was let in.
    pub(crate) fn lift(&self) {
        self.0.store(usize::MAX, Ordering::Relaxed);
    }
}

/// An I/O stream that fails a read once its budget is spent.
pub(crate) struct Capped<S> {
    inner: S,
    left: Arc<AtomicUsize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        let left = self.left.load(Ordering::Relaxed);
        if left != usize::MAX {
            if read > left {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the peer sent more than {BEFORE_HELLO} bytes before its hello was accepted"
                    ),
                )));
            }
            self.left.store(left - read, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
