//! An async client for the device protocol over TCP or TLS.
//!
//! ```no_run
//! # async fn demo() -> Result<(), warbler_client::ClientError> {
//! use warbler_client::{Connection, ConnectOptions};
//! let mut conn = Connection::connect(ConnectOptions::new("127.0.0.1:7400", "TOKEN", "phone")).await?;
//! while let Ok(m) = conn.recv_msg().await {
//!     println!("{} {:?}", m.seq, m.body);
//!     conn.ack(m.seq).await?;
//! }
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::{CodecError, FrameCodec};
use crate::error::ClientError;
use crate::frame::{Frame, PROTOCOL_VERSION};

/// Default wait for the server's `welcome`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream the client can speak over: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// TLS settings for the client side.
#[derive(Clone)]
pub struct TlsOptions {
    /// The name the server certificate must carry.
    pub server_name: String,
    /// PEM certificates of the CAs to trust.
    pub ca_pem: Vec<u8>,
}

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnectOptions {
    pub addr: String,
    pub token: String,
    pub device: String,
    pub tls: Option<TlsOptions>,
    pub max_frame_bytes: usize,
}

impl ConnectOptions {
    pub fn new(
        addr: impl Into<String>,
        token: impl Into<String>,
        device: impl Into<String>,
    ) -> Self {
        Self {
            addr: addr.into(),
            token: token.into(),
            device: device.into(),
            tls: None,
            max_frame_bytes: 1 << 20,
        }
    }

    pub fn with_tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// One received message.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub seq: u64,
    pub id: String,
    pub ts: u64,
    pub body: Vec<u8>,
    pub from: Option<String>,
}

/// The receiving half of a connection.
pub struct Receiver {
    read: FramedRead<ReadHalf<Box<dyn Io>>, FrameCodec>,
}

/// The sending half of a connection.
pub struct Sender {
    write: FramedWrite<WriteHalf<Box<dyn Io>>, FrameCodec>,
}

/// An authenticated device connection.
pub struct Connection {
    pub user: String,
    pub device: String,
    pub node: String,
    /// The device's durable cursor when the connection was accepted.
    pub acked: u64,
    tx: Sender,
    rx: Receiver,
}

impl Connection {
    /// Connects, sends `hello` and waits for `welcome`.
    pub async fn connect(opts: ConnectOptions) -> Result<Connection, ClientError> {
        let tcp = TcpStream::connect(&opts.addr).await?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match &opts.tls {
            None => Box::new(tcp),
            Some(tls) => Box::new(tls_connect(tcp, tls).await?),
        };
        Self::handshake(io, &opts).await
    }

    /// Runs the hello/welcome exchange over an already connected stream.
    pub async fn handshake(
        io: Box<dyn Io>,
        opts: &ConnectOptions,
    ) -> Result<Connection, ClientError> {
        let (r, w) = tokio::io::split(io);
        let codec = FrameCodec::new(opts.max_frame_bytes);
        let mut tx = Sender {
            write: FramedWrite::new(w, codec.clone()),
        };
        let mut rx = Receiver {
            read: FramedRead::new(r, codec),
        };
        tx.send(Frame::Hello {
            token: opts.token.clone(),
            device: opts.device.clone(),
            v: PROTOCOL_VERSION,
        })
        .await?;
        let first = tokio::time::timeout(WELCOME_TIMEOUT, rx.recv())
            .await
            .map_err(|_| ClientError::Timeout("welcome"))??;
        match first {
            Frame::Welcome {
                user,
                device,
                node,
                acked,
            } => Ok(Connection {
                user,
                device,
                node,
                acked,
                tx,
                rx,
            }),
            other => Err(unexpected("welcome", other)),
        }
    }

    /// Receives the next frame, answering pings on the way.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        loop {
            match self.rx.recv().await? {
                Frame::Ping { n } => self.tx.send(Frame::Pong { n }).await?,
                other => return Ok(other),
            }
        }
    }

    /// Receives the next message; an `error` or `bye` frame becomes an error.
    pub async fn recv_msg(&mut self) -> Result<Delivery, ClientError> {
        delivery(self.recv().await?)
    }

    /// The next message if it has already arrived, without waiting on the network: `None`
    /// when nothing is buffered or readable now. Acks are cumulative, so a device drains
    /// what arrived together and acknowledges the last one:
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut warbler_client::Connection) -> Result<(), warbler_client::ClientError> {
    /// let mut last = conn.recv_msg().await?;
    /// while let Some(m) = conn.recv_msg_ready().await {
    ///     last = m?;
    /// }
    /// conn.ack(last.seq).await?;
    /// # Ok(()) }
    /// ```
    pub async fn recv_msg_ready(&mut self) -> Option<Result<Delivery, ClientError>> {
        loop {
            // A stream's `next` keeps what it read when dropped unfinished.
            let read = self.rx.read.next().now_or_never()?;
            match Receiver::interpret(read) {
                Ok(Frame::Ping { n }) => {
                    if let Err(e) = self.tx.send(Frame::Pong { n }).await {
                        return Some(Err(e));
                    }
                }
                Ok(frame) => return Some(delivery(frame)),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Acknowledges every message with `seq` ≤ `seq`.
    pub async fn ack(&mut self, seq: u64) -> Result<(), ClientError> {
        self.tx.send(Frame::Ack { seq }).await
    }

    /// Sends a publish; the answer (`published` or `error` with this id) comes via `recv`.
    pub async fn publish(&mut self, id: &str, to: &str, body: &[u8]) -> Result<(), ClientError> {
        self.tx
            .send(Frame::Publish {
                id: id.to_string(),
                to: to.to_string(),
                body: ByteBuf::from(body.to_vec()),
            })
            .await
    }

    /// Publishes and waits for the durable answer; returns the assigned `seq`.
    pub async fn publish_wait(
        &mut self,
        id: &str,
        to: &str,
        body: &[u8],
    ) -> Result<u64, ClientError> {
        self.publish(id, to, body).await?;
        loop {
            match self.recv().await? {
                Frame::Published { id: got, seq, .. } if got == id => return Ok(seq),
                Frame::Msg { .. } | Frame::Published { .. } | Frame::Pong { .. } => continue,
                other => return Err(unexpected("published", other)),
            }
        }
    }

    /// Sends any frame (tests use this to send what a normal client would not).
    pub async fn send(&mut self, frame: Frame) -> Result<(), ClientError> {
        self.tx.send(frame).await
    }

    /// Splits into halves that can be used from two tasks.
    pub fn split(self) -> (Sender, Receiver) {
        (self.tx, self.rx)
    }
}

impl Sender {
    pub async fn send(&mut self, frame: Frame) -> Result<(), ClientError> {
        self.write.send(frame).await.map_err(codec_err)
    }

    /// Queues a frame without flushing; call [`Sender::flush`] after a burst.
    pub async fn feed(&mut self, frame: Frame) -> Result<(), ClientError> {
        self.write.feed(frame).await.map_err(codec_err)
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        SinkExt::<Frame>::flush(&mut self.write)
            .await
            .map_err(codec_err)
    }
}

impl Receiver {
    /// The next frame exactly as received (pings included).
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        Self::interpret(self.read.next().await)
    }

    /// What the stream gave: a frame, or the error it means (`error` and `bye` included).
    fn interpret(
        read: Option<Result<Result<Frame, crate::error::DecodeError>, CodecError>>,
    ) -> Result<Frame, ClientError> {
        match read {
            None => Err(ClientError::Closed),
            Some(Err(e)) => Err(codec_err(e)),
            Some(Ok(Err(e))) => Err(ClientError::Decode(e)),
            Some(Ok(Ok(Frame::Error { code, message, id }))) => {
                Err(ClientError::Server { code, message, id })
            }
            Some(Ok(Ok(Frame::Bye { reason, retry_ms }))) => {
                Err(ClientError::Bye { reason, retry_ms })
            }
            Some(Ok(Ok(frame))) => Ok(frame),
        }
    }
}

/// A `msg` frame as a [`Delivery`]; any other frame is unexpected.
fn delivery(frame: Frame) -> Result<Delivery, ClientError> {
    match frame {
        Frame::Msg {
            seq,
            id,
            ts,
            body,
            from,
        } => Ok(Delivery {
            seq,
            id,
            ts,
            body: body.into_vec(),
            from,
        }),
        other => Err(unexpected("msg", other)),
    }
}

fn codec_err(e: CodecError) -> ClientError {
    match e {
        CodecError::Io(e) => ClientError::Io(e),
        CodecError::Decode(e) => ClientError::Decode(e),
    }
}

fn unexpected(expected: &'static str, got: Frame) -> ClientError {
    match got {
        Frame::Error { code, message, id } => ClientError::Server { code, message, id },
        Frame::Bye { reason, retry_ms } => ClientError::Bye { reason, retry_ms },
        other => ClientError::Unexpected {
            expected,
            got: other.type_name().to_string(),
        },
    }
}

async fn tls_connect(
    tcp: TcpStream,
    tls: &TlsOptions,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        let cert = cert.map_err(|e| ClientError::Tls(format!("bad CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("bad CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| ClientError::Tls(format!("bad server name {:?}: {e}", tls.server_name)))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Ok(connector.connect(name, tcp).await?)
}
