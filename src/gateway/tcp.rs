//! The client port: the device protocol over TCP, or TLS when configured.

use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{Encoder, FramedRead};
use warbler_client::codec::CodecError;
use warbler_client::{Frame, FrameCodec};

use super::Gateway;

/// Initial read buffer of a connection. Small, so idle connections stay cheap; it grows
/// to the size of the largest frame received.
const READ_BUFFER_BYTES: usize = 256;
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

/// Accepts connections until the gateway shuts down.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, tls: Option<TlsAcceptor>) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (gw, tls) = (gw.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => handle(stream, gw, "tcp").await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => handle(s, gw, "tls").await,
                    Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                },
            }
        });
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    gw: Arc<Gateway>,
    transport: &'static str,
) {
    let (r, w) = tokio::io::split(stream);
    let codec = FrameCodec::new(gw.limits.max_frame_bytes);
    // Per-frame decode errors arrive as items; flatten them into the gateway's stream.
    let frames = FramedRead::with_capacity(r, codec.clone(), READ_BUFFER_BYTES)
        .map(|item| item.and_then(|frame| frame.map_err(CodecError::Decode)));
    let (tx, rx) = mpsc::channel(gw.writer_queue());
    let writer = tokio::spawn(write_frames(rx, w, codec));
    gw.run(frames, tx, transport).await;
    let _ = writer.await;
}

/// Drains the queue to the socket, flushing when the queue is empty; shuts the socket down
/// once every sender is gone.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Frame>,
    mut w: W,
    mut codec: FrameCodec,
) {
    let mut buf = BytesMut::new();
    while let Some(frame) = rx.recv().await {
        let mut next = Some(frame);
        while let Some(frame) = next {
            if codec.encode(&frame, &mut buf).is_err() {
                // Skipping a msg would open a gap: close instead, so the client resumes
                // from its cursor once the limit is raised again.
                tracing::error!(t = frame.type_name(), "a frame exceeds limits.max_frame_bytes; closing the connection (raise the limit to deliver it)");
                return;
            }
            next = if buf.len() < WRITE_BUFFER_KEEP_BYTES {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            return;
        }
        buf.clear();
        if buf.capacity() > WRITE_BUFFER_KEEP_BYTES {
            buf = BytesMut::new();
        }
    }
    let _ = w.shutdown().await;
}
