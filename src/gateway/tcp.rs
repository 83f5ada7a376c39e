//! The client port: the device protocol over TCP, or TLS when configured.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{Decoder, Encoder, FramedRead};
use warbler_actors::{Out, OutReceiver, Outbox, WakeDeferral, LIVE_DELIVERY_MS};
use warbler_client::codec::CodecError;
use warbler_client::frame::MsgRef;
use warbler_client::FrameCodec;

use super::io::{IoThreads, Watched};
use super::Gateway;
use crate::listener::{tune, Refusals};

/// Initial read buffer of a connection. Small, so idle connections stay cheap; it grows
/// to the size of the largest frame received.
const READ_BUFFER_BYTES: usize = 256;
/// Largest first frame (the `hello`, a token inside): a connection that has not said who
/// it is cannot make the node buffer a full-sized frame.
pub const HELLO_FRAME_BYTES_MAX: usize = 16 * 1024;
/// A writer buffer grown past this by a large burst is released once drained.
const WRITE_BUFFER_KEEP_BYTES: usize = 64 * 1024;

/// Builds the TLS acceptor from PEM files.
pub fn tls_acceptor(cert_file: &Path, key_file: &Path) -> anyhow::Result<TlsAcceptor> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("cannot read TLS certificate file {}", cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "TLS certificate file {} is not valid PEM",
                cert_file.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "TLS certificate file {} holds no certificate",
        cert_file.display()
    );
    let key = PrivateKeyDer::from_pem_file(key_file).with_context(|| {
        format!(
            "cannot read a private key from {} (PKCS#8, PKCS#1 or SEC1 PEM)",
            key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

static REFUSALS: Refusals = Refusals::new("client");

/// Accepts connections until the gateway shuts down. A connection takes its slot of
/// `limits.connections_max` at accept, before any handshake, and must finish TLS within
/// `limits.tls_handshake_timeout_ms`.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
    io: Arc<IoThreads>,
) {
    let handshake = Duration::from_millis(gw.limits.tls_handshake_timeout_ms);
    let keepalive = crate::listener::keepalive_idle(gw.limits.ping_interval_ms);
    loop {
        let (stream, peer) = tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = gw.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            REFUSALS.refused("connections_max");
            if tls.is_some() {
                // No handshake is spent on a connection that cannot be served.
                continue;
            }
        }
        tune(&stream, keepalive);
        // The connection lives on an IO thread: its socket leaves this runtime's reactor
        // and joins that thread's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand a connection to an IO thread");
                continue;
            }
        };
        let gw = gw.clone();
        let quiet_watcher = io.quiet_handle();
        let Some(acceptor) = tls.clone() else {
            io.spawn(async move {
                if let Some((stream, quiet)) = on_this_thread(stream, quiet_watcher) {
                    handle(stream, gw, "tcp", slot, quiet).await
                }
            });
            continue;
        };
        // Each kind of connection is its own task, sized for what it holds: a plain one
        // does not carry room for a TLS session.
        io.spawn(async move {
            let Some((stream, quiet)) = on_this_thread(stream, quiet_watcher) else {
                return;
            };
            match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                Ok(Ok(s)) => handle(s, gw, "tls", slot, quiet).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => {
                    REFUSALS.refused("tls_handshake_timeout");
                    tracing::debug!(%peer, "TLS handshake not finished in time");
                }
            }
        });
    }
}

/// `stream` registered with the reactor of the thread this runs on, and moved to
/// `quiet_watcher`'s while the connection is quiet (the flag returned).
fn on_this_thread(
    stream: std::net::TcpStream,
    quiet_watcher: tokio::runtime::Handle,
) -> Option<(Watched, Arc<AtomicBool>)> {
    let stream = tokio::net::TcpStream::from_std(stream)
        .inspect_err(
            |e| tracing::warn!(error = %e, "cannot register a connection on its IO thread"),
        )
        .ok()?;
    let quiet = Arc::new(AtomicBool::new(false));
    Some((Watched::new(stream, quiet.clone(), quiet_watcher), quiet))
}

async fn handle<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    gw: Arc<Gateway>,
    transport: &'static str,
    slot: Option<OwnedSemaphorePermit>,
    quiet: Arc<AtomicBool>,
) {
    let (r, w) = tokio::io::split(stream);
    let codec = FrameCodec::new(gw.limits.max_frame_bytes);
    let decoder = HelloFirst {
        hello: FrameCodec::new(HELLO_FRAME_BYTES_MAX.min(gw.limits.max_frame_bytes)),
        rest: codec.clone(),
        said_hello: false,
    };
    // Per-frame decode errors arrive as items; flatten them into the gateway's stream.
    let frames = FramedRead::with_capacity(r, decoder, READ_BUFFER_BYTES)
        .map(|item| item.and_then(|frame| frame.map_err(CodecError::Decode)));
    let (tx, rx) = Outbox::channel_with_quiet(gw.writer_queue(), Some(quiet));
    let stall = Duration::from_millis(gw.limits.slow_consumer_timeout_ms);
    let deferral = rx.wake_deferral();
    one_task(
        gw.run(frames, tx, transport, slot),
        write_frames(rx, w, codec, stall),
        deferral,
    )
    .await;
}

/// Runs a connection's reading side and its writer in one task: no second task to keep per
/// idle connection. Each poll polls the reading side, then the writer, so what the reading
/// side queues (a pong, an error) is written in the same poll without a wake: a wake of
/// the running task would make it yield and call in another worker thread.
pub fn one_task(
    run: impl Future<Output = ()>,
    write: impl Future<Output = ()>,
    deferral: WakeDeferral,
) -> impl Future<Output = ()> {
    // Boxed, not pinned in an async fn: an async fn would keep its arguments and their
    // pinned copies side by side, doubling what an idle connection's task holds.
    let (mut run, mut write) = (Box::pin(run), Box::pin(write));
    let (mut run_done, mut write_done) = (false, false);
    std::future::poll_fn(move |cx| {
        if !run_done {
            deferral.defer(true);
            run_done = run.as_mut().poll(cx).is_ready();
            deferral.defer(false);
        }
        if !write_done {
            write_done = write.as_mut().poll(cx).is_ready();
        }
        if run_done && write_done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}

/// The device protocol's decoder with a small limit on the first frame.
struct HelloFirst {
    hello: FrameCodec,
    rest: FrameCodec,
    said_hello: bool,
}

impl Decoder for HelloFirst {
    type Item = <FrameCodec as Decoder>::Item;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        if self.said_hello {
            return self.rest.decode(src);
        }
        let first = self.hello.decode(src)?;
        self.said_hello = first.is_some();
        Ok(first)
    }
}

/// Notes a connection cut off because it took nothing written to it for `stall`; dropping
/// the writer then closes the connection (its session stops at its next send).
pub fn slow_consumer(stall: Duration) {
    metrics::counter!("warbler_slow_consumers_closed_total").increment(1);
    tracing::info!(
        ?stall,
        "closing a slow consumer: it took nothing the node wrote for limits.slow_consumer_timeout_ms"
    );
}

/// Records how long ago the oldest message of a write that just went to the socket was
/// accepted (live traffic only, as `warbler_delivery_seconds`). Set beside that figure
/// (accepted → handed to the connection), it tells whether late deliveries waited before the
/// hand-off or in the connection's queue and IO thread.
fn written_age(oldest_ts: Option<u64>) {
    if let Some(ts) = oldest_ts {
        let age = warbler_storage::now_ms().saturating_sub(ts);
        if age <= LIVE_DELIVERY_MS {
            metrics::histogram!("warbler_delivery_written_seconds").record(age as f64 / 1000.0);
        }
    }
}

/// Drains the queue to the socket, flushing when the queue is empty; shuts the socket down
/// once every sender is gone.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut rx: OutReceiver,
    mut w: W,
    mut codec: FrameCodec,
    stall: Duration,
) {
    let mut buf = BytesMut::new();
    while let Some(out) = rx.recv().await {
        // When the oldest message of this write was accepted by its mailbox.
        let mut oldest_ts = None;
        let mut next = Some(out);
        while let Some(out) = next {
            let encoded = match &out {
                // Written from the message the mailbox shares with the user's other devices.
                Out::Msg(seq, m) => {
                    oldest_ts.get_or_insert(m.ts);
                    let from = m.from.as_deref();
                    codec.encode(MsgRef::new(*seq, &m.id, m.ts, &m.body, from), &mut buf)
                }
                Out::Frame(frame) => codec.encode(frame, &mut buf),
            };
            if encoded.is_err() {
                // Skipping a msg would open a gap: close instead, so the client resumes
                // from its cursor once the limit is raised again.
                let t = match &out {
                    Out::Msg(..) => "msg",
                    Out::Frame(frame) => frame.type_name(),
                };
                tracing::error!(t, "a frame exceeds limits.max_frame_bytes; closing the connection (raise the limit to deliver it)");
                return;
            }
            next = if buf.len() < WRITE_BUFFER_KEEP_BYTES {
                rx.try_recv()
            } else {
                None
            };
        }
        let written = tokio::time::timeout(stall, async {
            w.write_all(&buf).await?;
            w.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => written_age(oldest_ts),
            Ok(Err(_)) => return,
            Err(_) => return slow_consumer(stall),
        }
        buf.clear();
        if buf.capacity() > WRITE_BUFFER_KEEP_BYTES {
            buf = BytesMut::new();
        }
    }
    let _ = w.shutdown().await;
}
