//! What every client-facing listener does at accept: a connection cap counted before any
//! handshake, TCP keepalive, and the HTTP server's own timers (axum's `serve` runs hyper
//! without a timer, so a client that sends half a header would keep its connection for
//! good).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// TCP keepalive on client connections: a peer that vanished without a FIN is found within
/// about `KEEPALIVE_IDLE + 3 * KEEPALIVE_INTERVAL`.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
/// The answer to an HTTP connection over the cap (no handshake is read first).
const HTTP_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 75\r\n\r\nthis node holds its maximum of HTTP connections; retry or use another node\n";
/// How long the refusal may take to write before the socket is dropped.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// Turns on TCP keepalive and no-delay on an accepted connection.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
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
}

/// Serves `app` until `shutdown`, then lets the open requests finish.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    bounds: HttpBounds,
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
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(REFUSAL_WRITE, stream.write_all(HTTP_FULL)).await;
            });
            continue;
        };
        tune(&stream);
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(conn.into_owned()).await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
