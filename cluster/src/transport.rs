//! Peer transport: request/response RPC between nodes over one multiplexed TCP connection
//! per peer, optionally with mutual TLS.
//!
//! Wire: the device protocol's framing (4-byte big-endian length, then MessagePack maps),
//! with its own frames: [`PeerFrame`]. The dialer's first frame is `hello{v, from}`; a
//! version other than [`PEER_PROTOCOL_VERSION`] is refused with `error` and the connection
//! is closed.
//!
//! Trust: with a cluster key ([`ClusterKey`]) the hello carries the dialer's nonce, the
//! acceptor answers `challenge{nonce, proof}` and the dialer `proof{proof}`; each proof is
//! checked before anything else is read or sent, and a wrong or missing one is refused
//! with `error` naming the fix. The whole handshake (TLS included) must finish within
//! [`PEER_HANDSHAKE_TIMEOUT`], and at most [`PEER_CONNECTIONS_MAX`] inbound connections
//! are served at once, counted from accept, before any handshake. Every request carries a correlation id, a partition and a kind, so many
//! partitions' traffic (consensus messages, snapshots) shares one connection and answers
//! may come back in any order.
//!
//! Bounds: each peer has a queue of [`PEER_QUEUE_MAX`] outgoing frames (a full queue
//! refuses the call at once: the caller backs off instead of piling up memory) and at most
//! [`PEER_CALLS_MAX`] unanswered calls. A dropped connection fails its unanswered calls and
//! is re-dialled with exponential backoff ([`BACKOFF_MIN`] to [`BACKOFF_MAX`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::error::{RpcCode, RpcError};
use crate::identity::{admit, ClusterId};
use crate::key::{ClusterKey, Side};
use crate::wire::{ManyAnswer, ManyCall, PeerKind};

/// The peer protocol version this build speaks.
pub const PEER_PROTOCOL_VERSION: u32 = 1;
/// Largest peer frame (snapshots are sent in chunks below this).
pub const PEER_FRAME_BYTES_MAX: usize = 16 << 20;
/// Outgoing frames queued per peer.
pub const PEER_QUEUE_MAX: usize = 4096;
/// Unanswered calls per peer.
pub const PEER_CALLS_MAX: usize = 4096;
/// First reconnect delay; doubles up to [`BACKOFF_MAX`]. The cap is short: a peer that
/// restarts must be reached again within a fraction of an election timeout, and a refused
/// dial to a dead peer costs next to nothing.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_millis(100);
/// The delay before dialling again a peer that refused this node (the refusal is logged
/// each time; a misconfiguration is not fixed in milliseconds).
pub const BACKOFF_REFUSED: Duration = Duration::from_secs(5);
/// Time an inbound or outbound connection has for TLS, hello and the key handshake.
pub const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound peer connections served at once; more are closed at accept.
pub const PEER_CONNECTIONS_MAX: usize = 1024;
/// A link with calls outstanding that has heard nothing for this long sends a probe.
pub const PROBE_AFTER: Duration = Duration::from_millis(1000);
/// A probe unanswered for this long means the peer is gone (killed without closing its
/// sockets, paused, or cut off): the link drops the connection, fails its calls and dials
/// again, rather than wait for TCP to give up (minutes).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(2000);

/// A frame between peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum PeerFrame {
    Hello {
        v: u32,
        from: String,
        /// The dialer's handshake nonce, when it holds a cluster key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<ByteBuf>,
        /// The dialer's cluster id, once it has one (see [`crate::identity`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster: Option<String>,
    },
    /// The acceptor's nonce and its proof of the cluster key.
    Challenge {
        nonce: ByteBuf,
        proof: ByteBuf,
    },
    /// The dialer's proof of the cluster key.
    Proof {
        proof: ByteBuf,
    },
    Request {
        id: u64,
        partition: u16,
        kind: u8,
        body: ByteBuf,
    },
    /// An answer. A refusal has `ok` false, the message in `body` and a [`RpcCode`] in
    /// `code` (absent from the previous release's frames, and ignored by it).
    Response {
        id: u64,
        ok: bool,
        body: ByteBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<RpcCode>,
    },
    Error {
        message: String,
    },
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("peer {0} is not reachable right now")]
    Unreachable(String),
    #[error("the queue to peer {0} is full; back off and retry")]
    Overloaded(String),
    #[error("peer {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("the connection to peer {0} dropped before it answered")]
    Disconnected(String),
    #[error("peer {peer} refused: {}", error.message)]
    Remote { peer: String, error: RpcError },
    #[error("peer request kind {0} is not known to this node")]
    UnknownKind(u8),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a node does with requests from its peers: `from` is the peer's name (from its
/// hello), `partition` the frame's partition field.
pub trait PeerHandler: Send + Sync + 'static {
    fn handle(
        &self,
        from: String,
        partition: u16,
        kind: PeerKind,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, RpcError>>;
}

/// Peers this node behaves as if it cannot reach: calls to them fail as unreachable and
/// gossip to them is dropped. Empty unless a test injects faults; blocking each other on
/// both sides isolates two nodes completely.
#[derive(Clone, Default)]
pub struct Faults(Arc<std::sync::RwLock<std::collections::HashSet<SocketAddr>>>);

impl Faults {
    pub fn set(&self, blocked: impl IntoIterator<Item = SocketAddr>) {
        *self.0.write().unwrap() = blocked.into_iter().collect();
    }

    pub fn blocks(&self, peer: &SocketAddr) -> bool {
        let blocked = self.0.read().unwrap();
        !blocked.is_empty() && blocked.contains(peer)
    }

    pub fn blocked(&self) -> Vec<SocketAddr> {
        self.0.read().unwrap().iter().copied().collect()
    }
}

/// TLS for peer connections: both sides present certificates of the cluster CA.
#[derive(Clone)]
pub struct PeerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
    /// The name every node's certificate carries (one cluster-wide name keeps setup simple).
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// Why the peer TLS files cannot be used; the text names the file and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PeerTlsError(pub String);

impl From<String> for PeerTlsError {
    fn from(message: String) -> PeerTlsError {
        PeerTlsError(message)
    }
}

/// The name every node's peer certificate must carry (a DNS subject alternative name).
pub const PEER_TLS_NAME: &str = "warbler-peer";

impl PeerTls {
    /// Mutual TLS from PEM files: the cluster CA, and this node's certificate (for the name
    /// [`PEER_TLS_NAME`], signed by that CA) and private key. Peers must present a
    /// certificate of the same CA.
    pub fn from_pem_files(
        ca_file: &std::path::Path,
        cert_file: &std::path::Path,
        key_file: &std::path::Path,
    ) -> Result<PeerTls, PeerTlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let certs = |f: &std::path::Path| {
            CertificateDer::pem_file_iter(f)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read PEM certificates from {}: {e}", f.display()))
                .and_then(|c| {
                    if c.is_empty() {
                        Err(format!("{} holds no certificate", f.display()))
                    } else {
                        Ok(c)
                    }
                })
        };
        let ca = certs(ca_file)?;
        let own = certs(cert_file)?;
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
            format!(
                "cannot read a private key from {} (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
                key_file.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| {
                format!("{} is not a usable CA certificate: {e}", ca_file.display())
            })?;
        }
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("cannot build the peer certificate verifier: {e}"))?;
        let mismatch = |e: rustls::Error| {
            format!(
                "the certificate {} and key {} do not match: {e}",
                cert_file.display(),
                key_file.display()
            )
        };
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(own.clone(), key.clone_key())
            .map_err(mismatch)?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(own, key)
            .map_err(mismatch)?;
        Ok(PeerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            server_name: ServerName::try_from(PEER_TLS_NAME).expect("a valid DNS name"),
        })
    }
}

/// What a node proves to its peers and demands of them: mutual TLS, the cluster key, both
/// or (on loopback only, as configuration enforces) neither.
#[derive(Clone, Default)]
pub struct PeerAuth {
    pub tls: Option<PeerTls>,
    pub key: Option<ClusterKey>,
    /// This node's cluster id: a peer of another cluster is refused.
    pub cluster: ClusterId,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The node's transport: serves peers' requests and makes calls to peers.
pub struct PeerTransport {
    me: String,
    addr: SocketAddr,
    auth: PeerAuth,
    links: Mutex<HashMap<SocketAddr, Arc<Link>>>,
    accept_task: tokio::task::JoinHandle<()>,
    faults: Faults,
}

/// The answer slot of one call.
type Reply = oneshot::Sender<Result<Vec<u8>, PeerError>>;

/// A queued frame, with where its answer goes (requests only).
struct Outgoing {
    frame: PeerFrame,
    reply: Option<Reply>,
    /// The call may travel in one [`PeerKind::Many`] request with the other such calls
    /// queued at the same time ([`PeerTransport::call_together`]).
    together: bool,
}

/// Most bytes of bodies one [`PeerKind::Many`] request carries; a larger call goes alone.
const MANY_BYTES_MAX: usize = 1 << 20;

/// Where the answers to one request go: one call's, or each call's of a
/// [`PeerKind::Many`].
enum Waiter {
    One(Reply),
    Many(Vec<Reply>),
}

impl Waiter {
    fn fail(self, e: PeerError) {
        match self {
            Waiter::One(r) => {
                let _ = r.send(Err(e));
            }
            Waiter::Many(all) => {
                for r in all {
                    let _ = r.send(Err(e.clone()));
                }
            }
        }
    }
}

struct Link {
    peer: SocketAddr,
    queue: mpsc::Sender<Outgoing>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PeerTransport {
    fn drop(&mut self) {
        self.accept_task.abort();
        for link in self.links.lock().unwrap().values() {
            link.task.abort();
        }
    }
}

impl PeerTransport {
    /// Listens on `bind` (port 0 allowed) and serves requests with `handler`; with `tls`,
    /// only peers with a certificate of the cluster CA.
    pub async fn start(
        me: &str,
        bind: SocketAddr,
        tls: Option<PeerTls>,
        handler: Arc<dyn PeerHandler>,
    ) -> std::io::Result<PeerTransport> {
        let auth = PeerAuth {
            tls,
            key: None,
            cluster: ClusterId::default(),
        };
        PeerTransport::start_with(me, bind, auth, handler).await
    }

    /// Like [`PeerTransport::start`], with everything `auth` demands of peers.
    pub async fn start_with(
        me: &str,
        bind: SocketAddr,
        auth: PeerAuth,
        handler: Arc<dyn PeerHandler>,
    ) -> std::io::Result<PeerTransport> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let accept_task = tokio::spawn(accept(listener, auth.clone(), handler));
        Ok(PeerTransport {
            me: me.to_string(),
            addr,
            auth,
            links: Mutex::new(HashMap::new()),
            accept_task,
            faults: Faults::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The fault switch of this transport (see [`Faults`]).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Calls `peer` and waits for its answer up to `timeout`.
    pub async fn call(
        &self,
        peer: SocketAddr,
        partition: u16,
        kind: PeerKind,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, PeerError> {
        self.call_as(peer, partition, kind, body, timeout, false)
            .await
    }

    /// [`PeerTransport::call`], for a call that may share one [`PeerKind::Many`] request
    /// with the others of its kind queued for `peer` at the same time (the calls of many
    /// partitions' groups that a single log sync released together). Each call is still
    /// answered on its own, and a peer of a release without `Many` gets single requests
    /// again after refusing one.
    pub async fn call_together(
        &self,
        peer: SocketAddr,
        partition: u16,
        kind: PeerKind,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, PeerError> {
        self.call_as(peer, partition, kind, body, timeout, true)
            .await
    }

    async fn call_as(
        &self,
        peer: SocketAddr,
        partition: u16,
        kind: PeerKind,
        body: Vec<u8>,
        timeout: Duration,
        together: bool,
    ) -> Result<Vec<u8>, PeerError> {
        if self.faults.blocks(&peer) {
            return Err(PeerError::Unreachable(format!("{peer} (fault injected)")));
        }
        let link = self.link(peer);
        let (tx, rx) = oneshot::channel();
        let frame = PeerFrame::Request {
            id: 0,
            partition,
            kind: kind as u8,
            body: ByteBuf::from(body),
        };
        let out = Outgoing {
            frame,
            reply: Some(tx),
            together,
        };
        link.queue.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PeerError::Overloaded(peer.to_string()),
            mpsc::error::TrySendError::Closed(_) => PeerError::Unreachable(peer.to_string()),
        })?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(PeerError::Disconnected(peer.to_string())),
            Err(_) => Err(PeerError::Timeout(peer.to_string(), timeout)),
        }
    }

    fn link(&self, peer: SocketAddr) -> Arc<Link> {
        let mut links = self.links.lock().unwrap();
        links
            .entry(peer)
            .or_insert_with(|| {
                let (queue, rx) = mpsc::channel(PEER_QUEUE_MAX);
                let task = tokio::spawn(run_link(self.me.clone(), peer, self.auth.clone(), rx));
                Arc::new(Link { peer, queue, task })
            })
            .clone()
    }

    /// The peers this node has links to.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.links
            .lock()
            .unwrap()
            .values()
            .map(|l| l.peer)
            .collect()
    }
}

/// Frames queued together are written with one syscall, up to this many bytes.
const WRITE_COALESCE_BYTES: usize = 64 * 1024;

/// Appends `frame`, length-prefixed, to `buf`.
fn encode_frame(buf: &mut Vec<u8>, frame: &PeerFrame) -> std::io::Result<()> {
    let bytes = rmp_serde::to_vec_named(frame).expect("peer frame serialization is infallible");
    if bytes.len() > PEER_FRAME_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "peer frame over the limit",
        ));
    }
    buf.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    buf.extend_from_slice(&bytes);
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &PeerFrame) -> std::io::Result<()> {
    let mut buf = Vec::new();
    encode_frame(&mut buf, frame)?;
    w.write_all(&buf).await
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<PeerFrame> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > PEER_FRAME_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes over the limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    rmp_serde::from_slice(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

async fn accept(listener: TcpListener, auth: PeerAuth, handler: Arc<dyn PeerHandler>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(PEER_CONNECTIONS_MAX));
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused(
                from,
                &format!("{PEER_CONNECTIONS_MAX} peer connections are open already"),
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (auth, handler) = (auth.clone(), handler.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let handshake = tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, greet(tcp, &auth)).await;
            match handshake {
                Ok(Ok((halves, from))) => serve_peer(halves, from, handler).await,
                Ok(Err(reason)) => refused(from, &reason),
                Err(_) => refused(
                    from,
                    &format!("no handshake within {PEER_HANDSHAKE_TIMEOUT:?}"),
                ),
            }
        });
    }
}

/// Logs refused inbound connections, at most one line a second (a stranger's flood must
/// not flood the log), and counts every one.
struct Refusals {
    last: Option<std::time::Instant>,
    quiet: u64,
}

impl Refusals {
    fn note(&mut self, from: SocketAddr, reason: &str) {
        metrics::counter!("warbler_peer_connections_refused_total").increment(1);
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now - t < Duration::from_secs(1)) {
            self.quiet += 1;
            return;
        }
        tracing::warn!(%from, reason, also_refused = self.quiet, "peer connection refused");
        self.last = Some(now);
        self.quiet = 0;
    }
}

static REFUSALS: Mutex<Refusals> = Mutex::new(Refusals {
    last: None,
    quiet: 0,
});

fn refused(from: SocketAddr, reason: &str) {
    REFUSALS.lock().unwrap().note(from, reason);
}

type Halves = (
    tokio::io::ReadHalf<Box<dyn Io>>,
    tokio::io::WriteHalf<Box<dyn Io>>,
);

/// The acceptor's side of the handshake: TLS, hello, and the key's challenge and response.
/// Returns the connection and the peer's name, or why it was refused (the peer has been
/// told).
async fn greet(tcp: TcpStream, auth: &PeerAuth) -> Result<(Halves, String), String> {
    let io: Box<dyn Io> = match &auth.tls {
        None => Box::new(tcp),
        Some(t) => Box::new(
            t.acceptor
                .accept(tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?,
        ),
    };
    let (mut r, mut w) = tokio::io::split(io);
    let (v, from, nd) = match read_frame(&mut r).await {
        Ok(PeerFrame::Hello {
            v,
            from,
            nonce,
            cluster,
        }) => {
            if let Err(why) = admit(auth.cluster.get().as_deref(), cluster.as_deref(), &from) {
                return Err(refuse(&mut r, &mut w, why).await);
            }
            (v, from, nonce)
        }
        Ok(other) => {
            return Err(refuse(
                &mut r,
                &mut w,
                format!("expected hello, got {}", frame_name(&other)),
            )
            .await)
        }
        Err(e) => return Err(format!("no hello: {e}")),
    };
    if v != PEER_PROTOCOL_VERSION {
        return Err(refuse(&mut r, &mut w, format!("peer protocol version {v} is not supported; this node speaks {PEER_PROTOCOL_VERSION}: upgrade the older node")).await);
    }
    match (&auth.key, nd) {
        (None, None) => {}
        (None, Some(_)) => {
            return Err(refuse(&mut r, &mut w, format!("{from} uses a cluster key and this node has none: give every node the same --cluster-key-file")).await)
        }
        (Some(_), None) => {
            return Err(refuse(&mut r, &mut w, format!("this cluster requires the cluster key and {from} did not offer one: start it with the cluster's --cluster-key-file")).await)
        }
        (Some(key), Some(nd)) => {
            let na = ClusterKey::nonce();
            let challenge = PeerFrame::Challenge {
                nonce: ByteBuf::from(na.to_vec()),
                proof: ByteBuf::from(key.prove(Side::Acceptor, &from, &nd, &na)),
            };
            write_frame(&mut w, &challenge)
                .await
                .map_err(|e| format!("cannot send the challenge: {e}"))?;
            match read_frame(&mut r).await {
                Ok(PeerFrame::Proof { proof })
                    if key.verify(Side::Dialer, &from, &nd, &na, &proof) => {}
                Ok(PeerFrame::Proof { .. }) => {
                    return Err(refuse(&mut r, &mut w, format!("{from} does not hold this cluster's key: give every node the same --cluster-key-file")).await)
                }
                Ok(other) => {
                    return Err(refuse(&mut r, &mut w, format!("expected the key proof, got {}", frame_name(&other))).await)
                }
                Err(e) => return Err(format!("no key proof: {e}")),
            }
        }
    }
    Ok(((r, w), from))
}

/// Tells the peer why it is refused and closes the connection; returns the reason. What
/// the peer sent meanwhile is read and dropped (up to a second) so that the refusal arrives
/// rather than be cut off by a reset.
async fn refuse<R, W>(r: &mut R, w: &mut W, message: String) -> String
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let error = PeerFrame::Error {
        message: message.clone(),
    };
    let _ = write_frame(w, &error).await;
    let _ = w.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    message
}

/// A frame's name, for refusals.
fn frame_name(f: &PeerFrame) -> &'static str {
    match f {
        PeerFrame::Hello { .. } => "hello",
        PeerFrame::Challenge { .. } => "challenge",
        PeerFrame::Proof { .. } => "proof",
        PeerFrame::Request { .. } => "a request",
        PeerFrame::Response { .. } => "a response",
        PeerFrame::Error { .. } => "error",
    }
}

/// Serves one inbound peer connection: hello, then requests answered concurrently.
/// Runs `fut` here up to its first wait, then on a task of its own: requests start in the
/// order they arrived (a publish reaches a running mailbox in that order), and still run
/// concurrently.
fn start_in_order(fut: impl Future<Output = ()> + Send + 'static) {
    let mut fut = Box::pin(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if fut.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(fut);
    }
}

/// Writes a connection's answers as they are ready; answers ready together go out in one
/// write.
async fn write_answers(
    mut w: tokio::io::WriteHalf<Box<dyn Io>>,
    mut rx: mpsc::Receiver<PeerFrame>,
) {
    let mut buf = Vec::new();
    while let Some(f) = rx.recv().await {
        buf.clear();
        let _ = encode_frame(&mut buf, &f);
        while buf.len() < WRITE_COALESCE_BYTES {
            match rx.try_recv() {
                Ok(f) => {
                    let _ = encode_frame(&mut buf, &f);
                }
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
}

async fn serve_peer((mut r, w): Halves, from: String, handler: Arc<dyn PeerHandler>) {
    let (tx, rx) = mpsc::channel::<PeerFrame>(PEER_QUEUE_MAX);
    let writer = tokio::spawn(write_answers(w, rx));
    while let Ok(frame) = read_frame(&mut r).await {
        let PeerFrame::Request {
            id,
            partition,
            kind,
            body,
        } = frame
        else {
            continue;
        };
        let Some(kind) = PeerKind::from_wire(kind) else {
            let error = RpcError::new(
                RpcCode::UnknownKind,
                format!(
                    "peer request kind {kind} is not known to this node; is it an older release?"
                ),
            );
            if tx.send(refusal(id, error)).await.is_err() {
                break;
            }
            continue;
        };
        metrics::counter!("warbler_peer_requests_total", "kind" => kind.name()).increment(1);
        if kind == PeerKind::Probe {
            let pong = PeerFrame::Response {
                id,
                ok: true,
                body: ByteBuf::new(),
                code: None,
            };
            if tx.send(pong).await.is_err() {
                break;
            }
            continue;
        }
        if kind == PeerKind::Many {
            serve_many(&handler, &from, &tx, id, &body);
            continue;
        }
        let (handler, tx, from) = (handler.clone(), tx.clone(), from.clone());
        start_in_order(async move {
            let reply = match handler.handle(from, partition, kind, body.into_vec()).await {
                Ok(b) => PeerFrame::Response {
                    id,
                    ok: true,
                    body: ByteBuf::from(b),
                    code: None,
                },
                Err(e) => refusal(id, e),
            };
            let _ = tx.send(reply).await;
        });
    }
    drop(tx);
    let _ = writer.await;
}

/// Serves a [`PeerKind::Many`] request: each call is started in order, as if it had come
/// in a request of its own, and the answers go back together once all are ready.
fn serve_many(
    handler: &Arc<dyn PeerHandler>,
    from: &str,
    tx: &mpsc::Sender<PeerFrame>,
    id: u64,
    body: &[u8],
) {
    let calls: Vec<ManyCall> = match crate::wire::decode(body) {
        Ok(calls) => calls,
        Err(e) => {
            let e = RpcError::bad_request("batched calls", e);
            let _ = tx.try_send(refusal(id, e));
            return;
        }
    };
    let mut answers: Vec<BoxFuture<'static, Result<Vec<u8>, RpcError>>> =
        Vec::with_capacity(calls.len());
    for c in calls {
        let mut answer = match PeerKind::from_wire(c.kind) {
            Some(k) if k != PeerKind::Many && k != PeerKind::Probe => {
                metrics::counter!("warbler_peer_requests_total", "kind" => k.name()).increment(1);
                handler.handle(from.to_string(), c.partition, k, c.body.into_vec())
            }
            _ => Box::pin(std::future::ready(Err(RpcError::new(
                RpcCode::UnknownKind,
                format!("peer request kind {} cannot travel in a batch", c.kind),
            )))),
        };
        // Up to its first wait now, as `start_in_order` runs a single request.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(r) = answer.as_mut().poll(&mut cx) {
            answer = Box::pin(std::future::ready(r));
        }
        answers.push(answer);
    }
    let tx = tx.clone();
    tokio::spawn(async move {
        let each: Vec<ManyAnswer> = futures::future::join_all(answers)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(body) => ManyAnswer {
                    ok: true,
                    body: ByteBuf::from(body),
                    code: None,
                },
                Err(e) => ManyAnswer {
                    ok: false,
                    body: ByteBuf::from(e.message.into_bytes()),
                    code: Some(e.code),
                },
            })
            .collect();
        let reply = PeerFrame::Response {
            id,
            ok: true,
            body: ByteBuf::from(crate::wire::encode(&each)),
            code: None,
        };
        let _ = tx.send(reply).await;
    });
}

/// The frame that refuses request `id`.
fn refusal(id: u64, e: RpcError) -> PeerFrame {
    PeerFrame::Response {
        id,
        ok: false,
        body: ByteBuf::from(e.message.into_bytes()),
        code: Some(e.code),
    }
}

type Waiters = Arc<Mutex<HashMap<u64, Waiter>>>;

/// When a link last heard from its peer, and the probe it has in flight.
struct Liveness {
    epoch: tokio::time::Instant,
    /// Milliseconds since `epoch` when the peer was last heard from (set by the reader).
    heard: Arc<AtomicU64>,
    /// When the probe in flight was sent.
    probe_sent: Option<u64>,
}

/// What a link does at a liveness tick.
enum Tick {
    Quiet,
    /// Send a probe (now, in milliseconds since the epoch).
    Probe(u64),
    /// The probe went unanswered: drop the connection.
    Dead,
}

impl Liveness {
    fn new() -> Liveness {
        Liveness {
            epoch: tokio::time::Instant::now(),
            heard: Arc::new(AtomicU64::new(0)),
            probe_sent: None,
        }
    }

    /// A link with calls outstanding that has heard nothing for [`PROBE_AFTER`] probes;
    /// a probe unanswered for [`PROBE_TIMEOUT`] means the peer is gone.
    fn tick(&mut self, calls_waiting: bool) -> Tick {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.heard.load(Ordering::Relaxed);
        if self.probe_sent.is_some_and(|sent| last >= sent) {
            self.probe_sent = None;
        }
        match self.probe_sent {
            Some(sent) if now - sent > PROBE_TIMEOUT.as_millis() as u64 => Tick::Dead,
            None if now - last > PROBE_AFTER.as_millis() as u64 && calls_waiting => {
                Tick::Probe(now)
            }
            _ => Tick::Quiet,
        }
    }
}

/// Reads the peer's answers and hands each to its waiting call.
fn spawn_reader(
    mut r: tokio::io::ReadHalf<Box<dyn Io>>,
    waiters: Waiters,
    name: String,
    live: &Liveness,
    singles_only: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<bool> {
    let (epoch, heard) = (live.epoch, live.heard.clone());
    tokio::spawn(async move {
        while let Ok(frame) = read_frame(&mut r).await {
            heard.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            match frame {
                PeerFrame::Response { id, ok, body, code } => {
                    let Some(w) = waiters.lock().unwrap().remove(&id) else {
                        continue;
                    };
                    let answer = |ok: bool, body: ByteBuf, code: Option<RpcCode>| {
                        if ok {
                            return Ok(body.into_vec());
                        }
                        let message = String::from_utf8_lossy(&body).into_owned();
                        Err(PeerError::Remote {
                            peer: name.clone(),
                            error: RpcError::new(code.unwrap_or(RpcCode::Other), message),
                        })
                    };
                    match w {
                        Waiter::One(w) => {
                            let _ = w.send(answer(ok, body, code));
                        }
                        Waiter::Many(all) => {
                            let each = ok
                                .then(|| crate::wire::decode::<Vec<ManyAnswer>>(&body).ok())
                                .flatten()
                                .filter(|each| each.len() == all.len());
                            let Some(each) = each else {
                                // A release without `Many` refuses it: one call per
                                // request to this peer from now on (its calls retry).
                                if !singles_only.swap(true, Ordering::Relaxed) {
                                    tracing::info!(peer = %name, "peer does not take batched calls (an older release?): sending one call per request");
                                }
                                let e = answer(false, body, code.or(Some(RpcCode::UnknownKind)))
                                    .unwrap_err();
                                Waiter::Many(all).fail(e);
                                continue;
                            };
                            for (w, a) in all.into_iter().zip(each) {
                                let _ = w.send(answer(a.ok, a.body, a.code));
                            }
                        }
                    }
                }
                PeerFrame::Error { message } => {
                    tracing::error!(peer = %name, %message, "peer refused the connection");
                    return true;
                }
                _ => {}
            }
        }
        false
    })
}

/// Encodes `first` and the calls queued behind it (up to [`WRITE_COALESCE_BYTES`]) into
/// `buf`, numbering requests and registering their waiters. Calls that may go together go
/// in one [`PeerKind::Many`] request (unless the peer takes none), after the others.
#[allow(clippy::too_many_arguments)]
fn encode_batch(
    first: Outgoing,
    queue: &mut mpsc::Receiver<Outgoing>,
    waiters: &Waiters,
    next_id: &mut u64,
    buf: &mut Vec<u8>,
    name: &str,
    singles_only: &AtomicBool,
) {
    buf.clear();
    let many_ok = !singles_only.load(Ordering::Relaxed);
    let mut group: Vec<(ManyCall, Reply)> = Vec::new();
    let mut group_bytes = 0;
    let mut item = Some(first);
    while let Some(out) = item.take() {
        // A call whose caller stopped waiting (it timed out while the frame sat in the
        // queue: the peer was paused, slow or unreachable) is not sent. A peer coming back
        // gets the calls that are still wanted at once, not a backlog of expired ones
        // ahead of them.
        if out.reply.as_ref().is_some_and(Reply::is_closed) {
            metrics::counter!("warbler_peer_calls_abandoned_total").increment(1);
            if buf.len() + group_bytes < WRITE_COALESCE_BYTES {
                item = queue.try_recv().ok();
            }
            continue;
        }
        match out {
            Outgoing {
                frame:
                    PeerFrame::Request {
                        partition,
                        kind,
                        body,
                        ..
                    },
                reply: Some(reply),
                together: true,
            } if many_ok => {
                if !group.is_empty() && group_bytes + body.len() > MANY_BYTES_MAX {
                    encode_many(std::mem::take(&mut group), waiters, next_id, buf, name);
                    group_bytes = 0;
                }
                group_bytes += body.len();
                let call = ManyCall {
                    partition,
                    kind,
                    body,
                };
                group.push((call, reply));
            }
            out => encode_one(
                out.frame,
                out.reply.map(Waiter::One),
                waiters,
                next_id,
                buf,
                name,
            ),
        }
        if buf.len() + group_bytes < WRITE_COALESCE_BYTES {
            item = queue.try_recv().ok();
        }
    }
    encode_many(group, waiters, next_id, buf, name);
}

/// Encodes calls that go together: one alone as the request it is, more as one
/// [`PeerKind::Many`] request.
fn encode_many(
    mut group: Vec<(ManyCall, Reply)>,
    waiters: &Waiters,
    next_id: &mut u64,
    buf: &mut Vec<u8>,
    name: &str,
) {
    if group.len() <= 1 {
        if let Some((c, reply)) = group.pop() {
            let frame = PeerFrame::Request {
                id: 0,
                partition: c.partition,
                kind: c.kind,
                body: c.body,
            };
            encode_one(frame, Some(Waiter::One(reply)), waiters, next_id, buf, name);
        }
        return;
    }
    let (calls, replies): (Vec<ManyCall>, Vec<Reply>) = group.into_iter().unzip();
    let frame = PeerFrame::Request {
        id: 0,
        partition: 0,
        kind: PeerKind::Many as u8,
        body: ByteBuf::from(crate::wire::encode(&calls)),
    };
    encode_one(
        frame,
        Some(Waiter::Many(replies)),
        waiters,
        next_id,
        buf,
        name,
    );
}

/// Numbers `frame` (a request), registers its waiter and encodes it into `buf`.
fn encode_one(
    mut frame: PeerFrame,
    waiter: Option<Waiter>,
    waiters: &Waiters,
    next_id: &mut u64,
    buf: &mut Vec<u8>,
    name: &str,
) {
    if let PeerFrame::Request { id, .. } = &mut frame {
        *id = *next_id;
        *next_id += 1;
        if let Some(w) = waiter {
            let mut waiting = waiters.lock().unwrap();
            if waiting.len() >= PEER_CALLS_MAX {
                w.fail(PeerError::Overloaded(name.to_string()));
                return;
            }
            waiting.insert(*id, w);
        }
    }
    if let Err(e) = encode_frame(buf, &frame) {
        // Too large to send: fail this call only.
        if let PeerFrame::Request { id, .. } = &frame {
            if let Some(w) = waiters.lock().unwrap().remove(id) {
                w.fail(PeerError::Remote {
                    peer: name.to_string(),
                    error: RpcError::new(RpcCode::BadRequest, format!("not sent: {e}")),
                });
            }
        }
    }
}

/// Dials `peer` until it answers, with backoff; calls queued meanwhile fail fast rather
/// than wait out their timeouts.
async fn connect(
    me: &str,
    peer: SocketAddr,
    auth: &PeerAuth,
    queue: &mut mpsc::Receiver<Outgoing>,
    backoff: &mut Duration,
) -> Box<dyn Io> {
    let mut warned = false;
    loop {
        match dial(me, peer, auth).await {
            Ok(io) => {
                *backoff = BACKOFF_MIN;
                return io;
            }
            Err(e) => {
                // A refused handshake is a misconfiguration an operator must see (once per
                // streak); a dial that fails is a peer that is down.
                if e.kind() == std::io::ErrorKind::PermissionDenied && !warned {
                    tracing::warn!(%peer, error = %e, "peer refused this node's handshake");
                    warned = true;
                } else {
                    tracing::debug!(%peer, error = %e, ?backoff, "peer dial failed");
                }
                while let Ok(out) = queue.try_recv() {
                    if let Some(w) = out.reply {
                        let _ = w.send(Err(PeerError::Unreachable(peer.to_string())));
                    }
                }
                tokio::time::sleep(*backoff).await;
                *backoff = (*backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Keeps a connection to `peer`: dials with backoff, sends queued requests, routes answers.
async fn run_link(
    me: String,
    peer: SocketAddr,
    auth: PeerAuth,
    mut queue: mpsc::Receiver<Outgoing>,
) {
    let name = peer.to_string();
    let mut backoff = BACKOFF_MIN;
    let mut next_id = 1u64;
    let mut buf = Vec::new();
    loop {
        let io = connect(&me, peer, &auth, &mut queue, &mut backoff).await;
        let (r, mut w) = tokio::io::split(io);
        let waiters: Waiters = Arc::default();
        let mut live = Liveness::new();
        // A peer that refused a batch may have been upgraded when it comes back.
        let singles_only = Arc::new(AtomicBool::new(false));
        let mut reader = spawn_reader(
            r,
            waiters.clone(),
            name.clone(),
            &live,
            singles_only.clone(),
        );
        let mut tick = crate::grid::interval(PROBE_AFTER / 2);
        loop {
            let next = tokio::select! {
                refused = &mut reader => {
                    // A peer that refuses this node will again: ask less often.
                    if matches!(refused, Ok(true)) {
                        backoff = BACKOFF_REFUSED;
                    }
                    break;
                }
                _ = tick.tick() => {
                    let calls_waiting = !waiters.lock().unwrap().is_empty();
                    match live.tick(calls_waiting) {
                        Tick::Dead => {
                            tracing::warn!(%peer, "peer silent with calls outstanding; reconnecting");
                            reader.abort();
                            break;
                        }
                        Tick::Probe(now) => {
                            buf.clear();
                            let probe = PeerFrame::Request {
                                id: next_id,
                                partition: 0,
                                kind: PeerKind::Probe as u8,
                                body: ByteBuf::new(),
                            };
                            next_id += 1;
                            let _ = encode_frame(&mut buf, &probe);
                            if !write_within(&mut w, &buf).await {
                                reader.abort();
                                break;
                            }
                            live.probe_sent = Some(now);
                        }
                        Tick::Quiet => {}
                    }
                    continue;
                }
                n = queue.recv() => n,
            };
            let Some(first) = next else {
                reader.abort();
                return;
            };
            // Let the tasks that are ready to run now (the other groups a log sync released)
            // queue their calls first: they go in the same write, and together.
            tokio::task::yield_now().await;
            // Calls queued at the same time go out in one write.
            encode_batch(
                first,
                &mut queue,
                &waiters,
                &mut next_id,
                &mut buf,
                &name,
                &singles_only,
            );
            if !buf.is_empty() && !write_within(&mut w, &buf).await {
                reader.abort();
                break;
            }
        }
        for (_, w) in waiters.lock().unwrap().drain() {
            w.fail(PeerError::Disconnected(name.clone()));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
    }
}

/// Writes `buf`; false when the connection failed or the peer has not taken the bytes
/// within [`PROBE_AFTER`] + [`PROBE_TIMEOUT`] (it stopped reading: dead, paused or cut off).
async fn write_within<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(PROBE_AFTER + PROBE_TIMEOUT, w.write_all(buf)).await,
        Ok(Ok(()))
    )
}

async fn dial(me: &str, peer: SocketAddr, auth: &PeerAuth) -> std::io::Result<Box<dyn Io>> {
    let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(peer))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, introduce(me, tcp, auth))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no handshake within {PEER_HANDSHAKE_TIMEOUT:?}"),
            )
        })?
}

/// The dialer's side of the handshake (see [`greet`]).
async fn introduce(me: &str, tcp: TcpStream, auth: &PeerAuth) -> std::io::Result<Box<dyn Io>> {
    let denied = |m: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, m);
    let mut io: Box<dyn Io> = match &auth.tls {
        None => Box::new(tcp),
        Some(t) => Box::new(t.connector.connect(t.server_name.clone(), tcp).await?),
    };
    let nd = auth.key.as_ref().map(|_| ClusterKey::nonce());
    let hello = PeerFrame::Hello {
        v: PEER_PROTOCOL_VERSION,
        from: me.to_string(),
        nonce: nd.map(|n| ByteBuf::from(n.to_vec())),
        cluster: auth.cluster.get(),
    };
    write_frame(&mut io, &hello).await?;
    let (Some(key), Some(nd)) = (&auth.key, nd) else {
        return Ok(io);
    };
    match read_frame(&mut io).await? {
        PeerFrame::Challenge { nonce, proof }
            if key.verify(Side::Acceptor, me, &nd, &nonce, &proof) =>
        {
            let proof = ByteBuf::from(key.prove(Side::Dialer, me, &nd, &nonce));
            write_frame(&mut io, &PeerFrame::Proof { proof }).await?;
            Ok(io)
        }
        PeerFrame::Challenge { .. } => Err(denied(
            "the peer does not hold this cluster's key: give every node the same --cluster-key-file"
                .into(),
        )),
        PeerFrame::Error { message } => Err(denied(format!("refused: {message}"))),
        other => Err(denied(format!(
            "expected a key challenge, got {}",
            frame_name(&other)
        ))),
    }
}
