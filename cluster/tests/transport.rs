//! Peer transport over real sockets on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warbler_cluster::identity::ClusterId;
use warbler_cluster::transport::{BoxFuture, PeerFrame, PEER_PROTOCOL_VERSION};
use warbler_cluster::{
    ClusterKey, PeerAuth, PeerError, PeerHandler, PeerKind, PeerTls, PeerTransport, RpcCode,
    RpcError,
};

/// Answers `<from>/<partition>/<kind number>:<body>` after `body[0]` milliseconds;
/// `Members` is refused.
struct Echo;

impl PeerHandler for Echo {
    fn handle(
        &self,
        from: String,
        partition: u16,
        kind: PeerKind,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(
                body.first().copied().unwrap_or(0),
            )))
            .await;
            if kind == PeerKind::Members {
                return Err(RpcError::new(RpcCode::Refused, "members is refused"));
            }
            Ok(format!("{from}/{partition}/{}:{}", kind as u8, body.len()).into_bytes())
        })
    }
}

fn kind(i: u32) -> PeerKind {
    PeerKind::ALL[(i % 5) as usize]
}

const T: Duration = Duration::from_secs(5);
const ANY: &str = "127.0.0.1:0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_link_and_answers_match_out_of_order() {
    let server = PeerTransport::start("server", ANY.parse().unwrap(), None, Arc::new(Echo))
        .await
        .unwrap();
    let client = Arc::new(
        PeerTransport::start("client", ANY.parse().unwrap(), None, Arc::new(Echo))
            .await
            .unwrap(),
    );
    let to = server.local_addr();
    let calls: Vec<_> = (0..500u32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                // Varying delays: later calls often finish first.
                let body = vec![(20 - i % 20) as u8; (i % 7) as usize + 1];
                let got = client
                    .call(to, (i % 64) as u16, kind(i), body.clone(), T)
                    .await
                    .unwrap();
                assert_eq!(
                    String::from_utf8(got).unwrap(),
                    format!("client/{}/{}:{}", i % 64, kind(i) as u8, body.len())
                );
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    assert_eq!(client.peers(), vec![to], "one link to the one peer");
    let err = client
        .call(to, 0, PeerKind::Members, vec![0], T)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PeerError::Remote { error, .. }
            if error.code == RpcCode::Refused && error.message.contains("members is refused")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_fails_fast_and_is_redialled_when_it_comes_up() {
    // Reserve a port, then free it so nothing listens there.
    let port_holder = std::net::TcpListener::bind(ANY).unwrap();
    let to: SocketAddr = port_holder.local_addr().unwrap();
    drop(port_holder);
    let client = PeerTransport::start("client", ANY.parse().unwrap(), None, Arc::new(Echo))
        .await
        .unwrap();
    let started = Instant::now();
    let err = client
        .call(to, 1, PeerKind::AppendEntries, vec![0], T)
        .await
        .unwrap_err();
    assert!(
        matches!(err, PeerError::Unreachable(_) | PeerError::Disconnected(_)),
        "{err}"
    );
    assert!(started.elapsed() < T, "failed fast, not by timeout");
    let _server = PeerTransport::start("server", to, None, Arc::new(Echo))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .call(to, 1, PeerKind::AppendEntries, vec![0], T)
            .await
        {
            Ok(b) => {
                assert_eq!(b, b"client/1/1:1");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never reconnected: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dropped_connection_fails_the_calls_waiting_on_it() {
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let to = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).await; // hello and the request
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s); // never answers
    });
    let client = PeerTransport::start("client", ANY.parse().unwrap(), None, Arc::new(Echo))
        .await
        .unwrap();
    let started = Instant::now();
    let err = client
        .call(to, 0, PeerKind::Vote, vec![0], T)
        .await
        .unwrap_err();
    assert_eq!(err, PeerError::Disconnected(to.to_string()));
    assert!(started.elapsed() < T);
}

/// A peer that stops answering without closing its socket (killed with its network
/// namespace, paused, cut off): the link probes it, gives up on the connection within
/// PROBE_AFTER + PROBE_TIMEOUT, fails the calls waiting on it and dials again, long before
/// the calls' own timeouts or TCP's.
#[tokio::test]
async fn a_silent_peer_is_probed_and_its_connection_replaced() {
    use warbler_cluster::transport::{PROBE_AFTER, PROBE_TIMEOUT};
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let to = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = accepted_tx.send(Instant::now());
            // Reads what comes (the hello, the call, probes) and never answers or closes.
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                std::future::pending::<()>().await;
            });
            held.push(());
        }
    });
    let client = PeerTransport::start("client", ANY.parse().unwrap(), None, Arc::new(Echo))
        .await
        .unwrap();
    let started = Instant::now();
    let long = Duration::from_secs(30);
    let err = client
        .call(to, 0, PeerKind::Vote, vec![0], long)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err, PeerError::Disconnected(to.to_string()));
    assert!(
        took >= PROBE_AFTER && took < PROBE_AFTER + PROBE_TIMEOUT + Duration::from_secs(2),
        "the silent connection was given up after {took:?}"
    );
    // It dialled again: a second connection arrives.
    accepted.recv().await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), accepted.recv())
        .await
        .expect("the link dials the peer again")
        .unwrap();
    assert!(again.duration_since(started) >= PROBE_AFTER);
}

/// Answers after 4 s: longer than PROBE_AFTER + PROBE_TIMEOUT.
struct Slow;

impl PeerHandler for Slow {
    fn handle(
        &self,
        _from: String,
        _partition: u16,
        _kind: PeerKind,
        _body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            Ok(b"late".to_vec())
        })
    }
}

/// A live peer that takes longer than PROBE_AFTER + PROBE_TIMEOUT to answer a call keeps
/// its connection: it answers the probes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_from_a_live_peer_is_not_mistaken_for_a_dead_peer() {
    let server = PeerTransport::start("server", ANY.parse().unwrap(), None, Arc::new(Slow))
        .await
        .unwrap();
    let client = PeerTransport::start("client", ANY.parse().unwrap(), None, Arc::new(Echo))
        .await
        .unwrap();
    let started = Instant::now();
    let answer = client
        .call(
            server.local_addr(),
            1,
            PeerKind::Vote,
            vec![],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        answer,
        Ok(b"late".to_vec()),
        "after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() >= Duration::from_secs(4));
}

#[tokio::test]
async fn another_protocol_version_is_refused_with_a_reason() {
    let server = PeerTransport::start("server", ANY.parse().unwrap(), None, Arc::new(Echo))
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let hello = PeerFrame::Hello {
        v: PEER_PROTOCOL_VERSION + 1,
        from: "future".into(),
        nonce: None,
        cluster: None,
    };
    write_raw(&mut s, &hello).await;
    match read_raw::<PeerFrame>(&mut s).await {
        PeerFrame::Error { message } => assert!(message.contains("version 2"), "{message}"),
        other => panic!("expected error, got {other:?}"),
    }
}

async fn write_raw(s: &mut tokio::net::TcpStream, frame: &impl serde::Serialize) {
    let bytes = rmp_serde::to_vec_named(frame).unwrap();
    s.write_all(&(bytes.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&bytes).await.unwrap();
}

async fn read_raw<T: serde::de::DeserializeOwned>(s: &mut tokio::net::TcpStream) -> T {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    rmp_serde::from_slice(&buf).unwrap()
}

/// The previous release's `response` frame: no `code`.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
#[serde(tag = "t", rename_all = "lowercase")]
enum OldFrame {
    Hello {
        v: u32,
        from: String,
    },
    Request {
        id: u64,
        partition: u16,
        kind: u8,
        body: serde_bytes::ByteBuf,
    },
    Response {
        id: u64,
        ok: bool,
        body: serde_bytes::ByteBuf,
    },
}

/// A node of the previous release talks to this one: it sends its frames, reads the
/// answers (the added `code` is ignored), and a request kind this node does not know is
/// refused with a code instead of a silent drop.
#[tokio::test]
async fn a_previous_release_peer_is_understood_and_unknown_kinds_are_refused_with_a_code() {
    let server = PeerTransport::start("server", ANY.parse().unwrap(), None, Arc::new(Echo))
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let hello = OldFrame::Hello {
        v: PEER_PROTOCOL_VERSION,
        from: "old".into(),
    };
    write_raw(&mut s, &hello).await;
    let body = serde_bytes::ByteBuf::from(vec![0]);
    let request = |id, kind| OldFrame::Request {
        id,
        partition: 7,
        kind,
        body: body.clone(),
    };
    write_raw(&mut s, &request(1, 10)).await;
    match read_raw::<OldFrame>(&mut s).await {
        OldFrame::Response {
            id: 1,
            ok: true,
            body,
        } => assert_eq!(&body[..], b"old/7/10:1"),
        other => panic!("expected an answer, got {other:?}"),
    }
    write_raw(&mut s, &request(2, 20)).await;
    match read_raw::<OldFrame>(&mut s).await {
        OldFrame::Response {
            id: 2,
            ok: false,
            body,
        } => {
            assert_eq!(&body[..], b"members is refused")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    write_raw(&mut s, &request(3, 99)).await;
    match read_raw::<PeerFrame>(&mut s).await {
        PeerFrame::Response {
            id: 3,
            ok: false,
            code,
            body,
        } => {
            assert_eq!(code, Some(RpcCode::UnknownKind));
            assert!(String::from_utf8_lossy(&body).contains("99"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // And an old node's refusal (no code) reads as `Other` here.
    let old = rmp_serde::to_vec_named(&OldFrame::Response {
        id: 4,
        ok: false,
        body: serde_bytes::ByteBuf::from(b"no".to_vec()),
    })
    .unwrap();
    match rmp_serde::from_slice::<PeerFrame>(&old).unwrap() {
        PeerFrame::Response { code: None, .. } => {}
        other => panic!("expected a response without a code, got {other:?}"),
    }
}

/// A cluster CA and one certificate for the cluster-wide peer name.
fn cluster_pki() -> (
    CertificateDer<'static>,
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let node_key = KeyPair::generate().unwrap();
    let node_cert = CertificateParams::new(vec!["warbler-peer".to_string()])
        .unwrap()
        .signed_by(&node_key, &issuer)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(node_key.serialize_der()));
    (ca_cert.der().clone(), node_cert.der().clone(), key)
}

fn peer_tls(
    ca: &CertificateDer<'static>,
    cert: Option<(&CertificateDer<'static>, &PrivateKeyDer<'static>)>,
) -> PeerTls {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    let (own_cert, own_key) = cert
        .map(|(c, k)| (c.clone(), k.clone_key()))
        .unwrap_or_else(|| {
            // A server still needs some certificate; a client without one gets refused.
            let (_, c, k) = cluster_pki();
            (c, k)
        });
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![own_cert.clone()], own_key.clone_key())
        .unwrap();
    let client_builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let client = match cert {
        Some(_) => client_builder
            .with_client_auth_cert(vec![own_cert], own_key)
            .unwrap(),
        None => client_builder.with_no_client_auth(),
    };
    PeerTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        server_name: ServerName::try_from("warbler-peer").unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_cluster_members_only() {
    let (ca, cert, key) = cluster_pki();
    let tls = peer_tls(&ca, Some((&cert, &key)));
    let server = PeerTransport::start(
        "server",
        ANY.parse().unwrap(),
        Some(tls.clone()),
        Arc::new(Echo),
    )
    .await
    .unwrap();
    let member = PeerTransport::start("member", ANY.parse().unwrap(), Some(tls), Arc::new(Echo))
        .await
        .unwrap();
    assert_eq!(
        member
            .call(server.local_addr(), 3, PeerKind::Publish, vec![0], T)
            .await
            .unwrap(),
        b"member/3/10:1"
    );

    let stranger = PeerTransport::start(
        "stranger",
        ANY.parse().unwrap(),
        Some(peer_tls(&ca, None)),
        Arc::new(Echo),
    )
    .await
    .unwrap();
    let err = stranger
        .call(
            server.local_addr(),
            3,
            PeerKind::Publish,
            vec![0],
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(
        !matches!(err, PeerError::Remote { .. }),
        "a peer without a cluster certificate got an answer"
    );
}

/// Counts the requests it is handed (a refused peer must never reach the handler).
#[derive(Default)]
struct Counting(std::sync::atomic::AtomicUsize);

impl PeerHandler for Counting {
    fn handle(
        &self,
        _from: String,
        _partition: u16,
        _kind: PeerKind,
        _body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(b"served".to_vec()) })
    }
}

fn keyed(secret: &str) -> PeerAuth {
    PeerAuth {
        tls: None,
        key: Some(ClusterKey::new(secret.as_bytes()).unwrap()),
        ..PeerAuth::default()
    }
}

const KEY: &str = "the cluster key of this test, 48 bytes long....";

async fn start(name: &str, auth: PeerAuth, handler: Arc<dyn PeerHandler>) -> PeerTransport {
    PeerTransport::start_with(name, ANY.parse().unwrap(), auth, handler)
        .await
        .unwrap()
}

/// Reads frames until the connection ends (or 3 s pass); what came back.
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> Vec<PeerFrame> {
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut len = [0u8; 4];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return frames,
            Err(_) => panic!("the connection stayed open after {frames:?}"),
        }
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).await.unwrap();
        let frame: PeerFrame = rmp_serde::from_slice(&buf).unwrap();
        if matches!(frame, PeerFrame::Error { .. }) {
            // Told: hang up, as a well-behaved peer would.
            let _ = s.shutdown().await;
        }
        frames.push(frame);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_key_admits_holders_and_refuses_everyone_else() {
    let counting = Arc::new(Counting::default());
    let server = start("server", keyed(KEY), counting.clone()).await;
    let to = server.local_addr();

    let member = start("member", keyed(KEY), Arc::new(Echo)).await;
    let answer = member.call(to, 1, PeerKind::Publish, vec![], T).await;
    assert_eq!(answer.unwrap(), b"served");
    assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 1);

    let short = Duration::from_secs(2);
    let wrong = start(
        "wrong",
        keyed("another cluster's key, also long enough......"),
        Arc::new(Echo),
    )
    .await;
    let keyless = start("keyless", PeerAuth::default(), Arc::new(Echo)).await;
    for (name, t) in [("wrong key", &wrong), ("no key", &keyless)] {
        let err = t
            .call(to, 1, PeerKind::Publish, vec![], short)
            .await
            .unwrap_err();
        assert!(
            !matches!(err, PeerError::Remote { .. }),
            "a peer with {name} got an answer: {err:?}"
        );
    }
    // A keyed node does not talk to a keyless one either (no half-secured cluster).
    let open = start("open", PeerAuth::default(), Arc::new(Echo)).await;
    let err = member
        .call(open.local_addr(), 1, PeerKind::Publish, vec![], short)
        .await
        .unwrap_err();
    assert!(!matches!(err, PeerError::Remote { .. }), "{err:?}");

    // A stranger speaking the protocol by hand: every request kind, after a hello with no
    // nonce or with a forged proof, is refused with a reason and never handled.
    for kind in PeerKind::ALL {
        for forge in [false, true] {
            let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
            let hello = PeerFrame::Hello {
                v: PEER_PROTOCOL_VERSION,
                from: "n1".into(),
                nonce: forge.then(|| serde_bytes::ByteBuf::from(vec![7u8; 32])),
                cluster: None,
            };
            write_raw(&mut s, &hello).await;
            if forge {
                let proof = serde_bytes::ByteBuf::from(vec![0u8; 32]);
                write_raw(&mut s, &PeerFrame::Proof { proof }).await;
            }
            let request = PeerFrame::Request {
                id: 1,
                partition: 0,
                kind: kind as u8,
                body: Default::default(),
            };
            let _ = s
                .write_all(&{
                    let b = rmp_serde::to_vec_named(&request).unwrap();
                    [(b.len() as u32).to_be_bytes().to_vec(), b].concat()
                })
                .await;
            let frames = read_until_closed(&mut s).await;
            let refusal = frames.iter().find_map(|f| match f {
                PeerFrame::Error { message } => Some(message.clone()),
                _ => None,
            });
            let refusal = refusal.unwrap_or_else(|| panic!("{kind:?}: no refusal in {frames:?}"));
            assert!(refusal.contains("cluster"), "{kind:?}: {refusal}");
            assert!(
                !frames
                    .iter()
                    .any(|f| matches!(f, PeerFrame::Response { .. })),
                "{kind:?} (forged proof: {forge}) was answered: {frames:?}"
            );
        }
    }
    assert_eq!(
        counting.0.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a refused peer's request reached the handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_its_handshake_is_closed() {
    let server = start("server", keyed(KEY), Arc::new(Echo)).await;
    let mut silent = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf))
        .await
        .expect("the node closes a silent connection");
    assert!(matches!(n, Ok(0) | Err(_)), "got bytes: {n:?}");
    assert!(
        started.elapsed()
            >= warbler_cluster::transport::PEER_HANDSHAKE_TIMEOUT - Duration::from_millis(100),
        "closed after {:?}",
        started.elapsed()
    );
}

fn of_cluster(id: Option<&str>) -> PeerAuth {
    PeerAuth {
        cluster: id.map(ClusterId::known).unwrap_or_default(),
        ..PeerAuth::default()
    }
}

/// A node of another cluster (a disk from elsewhere, or a cluster formed apart) is refused
/// on every connection, whichever side dials, and is told why; a node that has not learned
/// its cluster's id yet is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_is_refused_and_told_why() {
    let counting = Arc::new(Counting::default());
    let server = start("server", of_cluster(Some("c-one")), counting.clone()).await;
    let to = server.local_addr();

    let same = start("same", of_cluster(Some("c-one")), Arc::new(Echo)).await;
    let answer = same.call(to, 1, PeerKind::Publish, vec![], T).await;
    assert_eq!(answer.unwrap(), b"served");
    let fresh = start("fresh", of_cluster(None), Arc::new(Echo)).await;
    let answer = fresh.call(to, 1, PeerKind::Publish, vec![], T).await;
    assert_eq!(answer.unwrap(), b"served");
    assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 2);

    let other = start("other", of_cluster(Some("c-two")), Arc::new(Echo)).await;
    let err = other
        .call(to, 1, PeerKind::Publish, vec![], Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        !matches!(err, PeerError::Remote { .. }),
        "a node of another cluster got an answer: {err:?}"
    );
    assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 2);
    // And the other way round: the server dialling the stranger is refused by it.
    let err = server
        .call(
            other.local_addr(),
            1,
            PeerKind::Publish,
            vec![],
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(!matches!(err, PeerError::Remote { .. }), "{err:?}");

    // By hand: the refusal names both clusters and the fix.
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    let hello = PeerFrame::Hello {
        v: PEER_PROTOCOL_VERSION,
        from: "stray".into(),
        nonce: None,
        cluster: Some("c-two".into()),
    };
    write_raw(&mut s, &hello).await;
    match read_until_closed(&mut s).await.as_slice() {
        [PeerFrame::Error { message }] => {
            assert!(
                message.contains("stray belongs to cluster c-two")
                    && message.contains("this node to cluster c-one")
                    && message.contains("empty data directory"),
                "{message}"
            );
        }
        other => panic!("expected one refusal, got {other:?}"),
    }
}

/// Calls queued for one peer at the same time with `call_together` go in one `many`
/// request, in order, and each caller gets its own answer (a refusal included). A peer that
/// refuses `many` (a release without it) gets the next calls one per request.
#[tokio::test]
async fn calls_queued_together_share_one_request_and_a_peer_without_it_gets_singles() {
    use warbler_cluster::wire::{ManyAnswer, ManyCall};
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let to = listener.local_addr().unwrap();
    let client = Arc::new(
        PeerTransport::start("client", ANY.parse().unwrap(), None, Arc::new(Echo))
            .await
            .unwrap(),
    );
    // Queued before the link runs (one thread): they go in one write.
    let together = |partitions: std::ops::Range<u16>| {
        let client = client.clone();
        tokio::spawn(async move {
            let calls = partitions
                .map(|p| client.call_together(to, p, PeerKind::AppendEntries, vec![p as u8], T));
            futures::future::join_all(calls).await
        })
    };
    let first = together(0..5);
    let (mut s, _) = listener.accept().await.unwrap();
    assert!(matches!(
        read_raw::<PeerFrame>(&mut s).await,
        PeerFrame::Hello { .. }
    ));
    let PeerFrame::Request { id, kind, body, .. } = read_raw::<PeerFrame>(&mut s).await else {
        panic!("expected a request");
    };
    assert_eq!(kind, PeerKind::Many as u8);
    let calls: Vec<ManyCall> = rmp_serde::from_slice(&body).unwrap();
    let partitions: Vec<u16> = calls.iter().map(|c| c.partition).collect();
    assert_eq!(
        partitions,
        [0, 1, 2, 3, 4],
        "one request, in the order queued"
    );
    assert!(calls
        .iter()
        .all(|c| c.kind == PeerKind::AppendEntries as u8 && c.body[..] == [c.partition as u8]));
    let answers: Vec<ManyAnswer> = calls
        .iter()
        .map(|c| ManyAnswer {
            ok: c.partition != 3,
            body: serde_bytes::ByteBuf::from(format!("p{}", c.partition).into_bytes()),
            code: (c.partition == 3).then_some(RpcCode::Refused),
        })
        .collect();
    let response = PeerFrame::Response {
        id,
        ok: true,
        body: serde_bytes::ByteBuf::from(rmp_serde::to_vec_named(&answers).unwrap()),
        code: None,
    };
    write_raw(&mut s, &response).await;
    for (p, got) in first.await.unwrap().into_iter().enumerate() {
        match got {
            Ok(body) => assert_eq!(body, format!("p{p}").into_bytes()),
            Err(PeerError::Remote { error, .. }) if p == 3 => {
                assert_eq!(error.code, RpcCode::Refused);
                assert_eq!(error.message, "p3");
            }
            other => panic!("call {p}: {other:?}"),
        }
    }

    // A peer that does not know `many` refuses it, as a previous release does (no code).
    let second = together(0..2);
    let PeerFrame::Request { id, kind, .. } = read_raw::<PeerFrame>(&mut s).await else {
        panic!("expected a request");
    };
    assert_eq!(kind, PeerKind::Many as u8);
    let refusal = OldFrame::Response {
        id,
        ok: false,
        body: serde_bytes::ByteBuf::from(b"unknown kind 254".to_vec()),
    };
    write_raw(&mut s, &refusal).await;
    for got in second.await.unwrap() {
        assert!(matches!(got, Err(PeerError::Remote { .. })), "{got:?}");
    }
    // From then on: one request per call.
    let third = together(5..7);
    for p in 5..7u16 {
        let PeerFrame::Request {
            id,
            kind,
            partition,
            ..
        } = read_raw::<PeerFrame>(&mut s).await
        else {
            panic!("expected a request");
        };
        assert_eq!((kind, partition), (PeerKind::AppendEntries as u8, p));
        let answer = PeerFrame::Response {
            id,
            ok: true,
            body: serde_bytes::ByteBuf::from(vec![p as u8]),
            code: None,
        };
        write_raw(&mut s, &answer).await;
    }
    let got: Vec<Vec<u8>> = third
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, [vec![5], vec![6]]);
}

/// A node serves a `many` request call by call: every caller gets its own answer or
/// refusal, as from single requests.
#[tokio::test]
async fn a_node_answers_each_call_of_a_many_request() {
    let server = PeerTransport::start("server", ANY.parse().unwrap(), None, Arc::new(Echo))
        .await
        .unwrap();
    let client = PeerTransport::start("client", ANY.parse().unwrap(), None, Arc::new(Echo))
        .await
        .unwrap();
    let to = server.local_addr();
    let kinds = [PeerKind::AppendEntries, PeerKind::Members, PeerKind::Vote];
    let calls = (0..30u16).map(|p| {
        let kind = kinds[p as usize % 3];
        let body = vec![(30 - p) as u8; p as usize % 4 + 1];
        client.call_together(to, p, kind, body, T)
    });
    let got = futures::future::join_all(calls).await;
    for (p, got) in got.into_iter().enumerate() {
        let kind = kinds[p % 3];
        match got {
            Err(PeerError::Remote { error, .. }) if kind == PeerKind::Members => {
                assert_eq!(error.code, RpcCode::Refused)
            }
            Ok(body) if kind != PeerKind::Members => assert_eq!(
                String::from_utf8(body).unwrap(),
                format!("client/{p}/{}:{}", kind as u8, p % 4 + 1)
            ),
            other => panic!("call {p}: {other:?}"),
        }
    }
}

/// A peer that stops reading (paused, say) holds up the link's writes. Calls queued behind
/// them whose callers gave up meanwhile are not sent when it reads again: it gets the calls
/// still wanted, not a backlog of expired ones ahead of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_whose_callers_gave_up_while_queued_are_not_sent() {
    const FRESH: u16 = 999;
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let to = listener.local_addr().unwrap();
    let (resume, resumed) = tokio::sync::oneshot::channel::<()>();
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _hello: PeerFrame = read_raw(&mut s).await;
        // Paused: nothing is read until the test says so.
        resumed.await.unwrap();
        let mut got = Vec::new();
        loop {
            if let PeerFrame::Request {
                partition, kind, ..
            } = read_raw::<PeerFrame>(&mut s).await
            {
                if kind == PeerKind::Probe as u8 {
                    continue;
                }
                got.push(partition);
                if partition == FRESH {
                    return got;
                }
            }
        }
    });
    let client = Arc::new(
        PeerTransport::start("client", ANY.parse().unwrap(), None, Arc::new(Echo))
            .await
            .unwrap(),
    );
    // 32 MiB of calls fill the socket's buffers: the link's writer waits on the peer.
    let bulky: Vec<_> = (1..=32)
        .map(|p| {
            let client = client.clone();
            tokio::spawn(async move {
                let body = vec![0u8; 1 << 20];
                let _ = client.call(to, p, PeerKind::Vote, body, T).await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Queued behind them, and given up by their callers.
    let short = Duration::from_millis(100);
    let expired = (100..200).map(|p| client.call(to, p, PeerKind::Vote, vec![0], short));
    for answer in futures::future::join_all(expired).await {
        assert_eq!(answer, Err(PeerError::Timeout(to.to_string(), short)));
    }
    let fresh = {
        let client = client.clone();
        tokio::spawn(async move { client.call(to, FRESH, PeerKind::Vote, vec![0], T).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    resume.send(()).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), peer)
        .await
        .expect("the peer got the call still wanted")
        .unwrap();
    let sent_expired: Vec<u16> = got
        .iter()
        .copied()
        .filter(|p| (100..200).contains(p))
        .collect();
    assert!(
        sent_expired.is_empty(),
        "calls given up while queued were sent: {sent_expired:?}"
    );
    assert!(got.iter().any(|p| (1..=32).contains(p)), "{got:?}");
    fresh.abort();
    bulky.into_iter().for_each(|t| t.abort());
}
