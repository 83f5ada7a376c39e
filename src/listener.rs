//! What every client-facing listener does at accept: a connection cap counted before any
//! handshake, TCP keepalive, TLS within a time limit, and the HTTP server's own timers
//! (axum's `serve` runs hyper without a timer, so a client that sends half a header would
//! keep its connection for good). Every HTTP connection carries a [`ReadBudget`] in its
//! requests' extensions: the WebSocket endpoint arms it so that a socket cannot make the
//! node buffer more than a `hello`'s worth before it says who it is.

use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// TCP keepalive on client connections: a peer that vanished without a FIN is found within
/// about [`keepalive_idle`] + `3 * KEEPALIVE_INTERVAL`.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
/// The answer to an HTTP connection over the cap (no handshake is read first).
const HTTP_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 75\r\n\r\nthis node holds its maximum of HTTP connections; retry or use another node\n";
/// How long the refusal may take to write before the socket is dropped.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// How long a connection is silent before TCP keepalive probes it: past the point where
/// the server pings a silent device (`limits.ping_interval_ms`, an eighth and 50 ms), so a
/// connection that pings, or answers the server's pings, never costs a probe as well (with
/// both at 60 s they raced, and half of the idle devices cost two exchanges a minute).
pub fn keepalive_idle(ping_interval_ms: u64) -> Duration {
    crate::gateway::conn::server_ping_after(ping_interval_ms) + Duration::from_secs(10)
}

/// Turns on TCP keepalive (after `idle`, see [`keepalive_idle`]) and no-delay on an
/// accepted connection.
pub fn tune(stream: &TcpStream, idle: Duration) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Counts and logs (at most once a second per listener) connections refused at accept.
pub struct Refusals {
    port: &'static str,
    last_log_ms: AtomicU64,
}

impl Refusals {
    pub const fn new(port: &'static str) -> Refusals {
        Refusals {
            port,
            last_log_ms: AtomicU64::new(0),
        }
    }

    pub fn refused(&self, why: &'static str) {
        metrics::counter!("warbler_connections_refused_total", "port" => self.port, "reason" => why)
            .increment(1);
        let now = warbler_storage::now_ms();
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(port = self.port, reason = why, "refusing connections (counted in warbler_connections_refused_total; logged at most once a second)");
        }
    }
}

static HTTP_REFUSALS: Refusals = Refusals::new("http");

/// The HTTP listener's bounds.
#[derive(Debug, Clone, Copy)]
pub struct HttpBounds {
    pub connections_max: usize,
    /// Request headers must arrive within this; a kept-alive connection idle this long is
    /// closed too.
    pub header_timeout: Duration,
    /// With TLS, the handshake must finish within this.
    pub tls_handshake_timeout: Duration,
    /// TCP keepalive starts after this much silence ([`keepalive_idle`]).
    pub keepalive_idle: Duration,
}

const UNLIMITED: i64 = i64::MAX;

/// How many more bytes a connection may read; unlimited until [`ReadBudget::limit`]. Past
/// it, reads fail and [`ReadBudget::exceeded`] says why.
#[derive(Clone)]
pub struct ReadBudget(Arc<AtomicI64>);

impl Default for ReadBudget {
    fn default() -> ReadBudget {
        ReadBudget(Arc::new(AtomicI64::new(UNLIMITED)))
    }
}

impl ReadBudget {
    /// From now on at most `bytes` more may be read.
    pub fn limit(&self, bytes: usize) {
        self.0.store(bytes as i64, Ordering::Relaxed);
    }

    /// No limit any more.
    pub fn lift(&self) {
        self.0.store(UNLIMITED, Ordering::Relaxed);
    }

    /// Whether a read went past the limit.
    pub fn exceeded(&self) -> bool {
        self.0.load(Ordering::Relaxed) < 0
    }

    /// Takes `n` read bytes from the budget; false once it is overdrawn.
    fn spend(&self, n: usize) -> bool {
        if self.0.load(Ordering::Relaxed) == UNLIMITED {
            return true;
        }
        self.0.fetch_sub(n as i64, Ordering::Relaxed) - n as i64 >= 0
    }
}

/// A stream whose reads are charged to a [`ReadBudget`].
pub struct Budgeted<S> {
    inner: S,
    budget: ReadBudget,
}

impl<S: AsyncRead + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if self.budget.spend(buf.filled().len() - before) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the connection sent more than it may before identifying itself",
            )))
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `app` (over TLS with `tls`) until `shutdown`, then lets the open requests finish.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    bounds: HttpBounds,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(bounds.connections_max));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(bounds.header_timeout)
        .keep_alive_timeout(bounds.header_timeout);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            HTTP_REFUSALS.refused("connections_max");
            if tls.is_some() {
                // A plain answer would not parse inside a TLS handshake: close instead.
                continue;
            }
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(REFUSAL_WRITE, stream.write_all(HTTP_FULL)).await;
            });
            continue;
        };
        tune(&stream, bounds.keepalive_idle);
        let budget = ReadBudget::default();
        let request_budget = budget.clone();
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(request_budget.clone());
                req
            },
        ));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let stream = Budgeted {
                inner: stream,
                budget,
            };
            match tls {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(bounds.tls_handshake_timeout, handshake).await {
                        Ok(Ok(stream)) => {
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service);
                            let _ = watcher.watch(conn.into_owned()).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "HTTP TLS handshake failed"),
                        Err(_) => HTTP_REFUSALS.refused("tls_handshake_timeout"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::conn::server_ping_after;

    /// Keepalive probes only connections that neither pinged nor were pinged: it starts
    /// after the server's own ping, whatever the ping interval.
    #[test]
    fn keepalive_starts_after_the_servers_ping() {
        for ping_ms in [1_000, 60_000, 300_000] {
            assert!(
                keepalive_idle(ping_ms) > server_ping_after(ping_ms),
                "{ping_ms}"
            );
            assert!(server_ping_after(ping_ms) > Duration::from_millis(ping_ms));
        }
        assert_eq!(keepalive_idle(60_000), Duration::from_millis(77_550));
    }
}
