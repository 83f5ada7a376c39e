//! Acceptance: hostile or careless clients cannot exhaust a node. Each test drives a real
//! `warbler serve` process from outside and measures the process (RSS, open files) while
//! it is under attack.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{mount_tmpfs, token, warbler_free_bytes, Node, Unmount};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warbler_client::auth::{mint_with_kid, Claims};
use warbler_client::{ClientError, ConnectOptions, Connection, Frame};

/// A config file with `limits` set as given (one `key = value` per entry).
fn limits_file(dir: &Path, limits: &[(&str, u64)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::from("[limits]\n");
    for (k, v) in limits {
        text.push_str(&format!("{k} = {v}\n"));
    }
    let path = dir.join("limits.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

async fn healthz(node: &Node) -> u16 {
    let get = common::http_raw(&node.http, "GET", "/healthz", None, b"");
    match tokio::time::timeout(Duration::from_secs(5), get).await {
        Ok((status, _)) => status,
        Err(_) => panic!("/healthz did not answer within 5 s"),
    }
}

/// Waits until `conn` is closed by the server (EOF or reset); the time it took.
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((t0 + limit).into(), conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

async fn read_frame(s: &mut TcpStream) -> Option<Frame> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.ok()?;
    Some(Frame::decode(&buf).expect("the server sends valid frames"))
}

fn framed(f: &Frame) -> Vec<u8> {
    let body = f.encode();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

async fn raw_device(node: &Node, user: &str) -> TcpStream {
    let mut s = TcpStream::connect(&node.client).await.unwrap();
    let hello = Frame::Hello {
        token: token(user, "device"),
        device: "d".into(),
        v: 1,
    };
    s.write_all(&framed(&hello)).await.unwrap();
    match read_frame(&mut s).await {
        Some(Frame::Welcome { .. }) => s,
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// Half-sent HTTP headers are cut after `limits.http_header_timeout_ms`, connections over
/// `limits.http_connections_max` get 503 at once, and `/healthz` keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_headers_are_cut_and_http_connections_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let config = limits_file(
        dir.path(),
        &[
            ("http_header_timeout_ms", 1000),
            ("http_connections_max", 40),
        ],
    );
    let node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &["--config", config.to_str().unwrap()],
    );
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(&node.http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The cap is reached: the next connection is told so without sending anything.
    let mut over = TcpStream::connect(&node.http).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), over.read_to_string(&mut answer))
        .await
        .expect("the refusal arrives")
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("retry-after: 1"),
        "over the cap: {answer:?}"
    );
    // Every slow connection is closed once its header time is up.
    for (i, s) in slow.iter_mut().enumerate() {
        let took = closed_within(s, Duration::from_secs(10)).await;
        assert!(
            took.is_some(),
            "slow connection {i} is still open after 10 s"
        );
    }
    // Their slots are free again.
    let t0 = Instant::now();
    while healthz(&node).await != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "/healthz never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 2,000 connections that never finish their TLS handshake are closed after
/// `limits.tls_handshake_timeout_ms`; the node's open files come back down and its memory
/// stays bounded, and `/healthz` answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_tls_handshakes_are_closed_and_cost_little() {
    const HALF_OPEN: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::create_dir_all(dir.path()).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let config = limits_file(dir.path(), &[("tls_handshake_timeout_ms", 2000)]);
    let node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &[
            "--config",
            config.to_str().unwrap(),
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
        ],
    );
    let pid = node.pid();
    let (files_before, rss_before) = (open_files(pid), rss_kib(pid));
    let mut conns = Vec::with_capacity(HALF_OPEN);
    for _ in 0..HALF_OPEN {
        let mut s = TcpStream::connect(&node.client).await.unwrap();
        // The start of a TLS record header: the handshake never completes.
        s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        conns.push(s);
    }
    assert_eq!(
        healthz(&node).await,
        200,
        "/healthz under 2,000 half-open handshakes"
    );
    let (files_peak, rss_peak) = (open_files(pid), rss_kib(pid));
    println!(
        "half-open TLS: open files {files_before} -> {files_peak}, RSS {rss_before} -> {rss_peak} KiB"
    );
    for (i, s) in conns.iter_mut().enumerate() {
        let took = closed_within(s, Duration::from_secs(15)).await;
        assert!(
            took.is_some(),
            "half-open connection {i} still open after 15 s"
        );
    }
    let t0 = Instant::now();
    while open_files(pid) > files_before + 50 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the node still holds {} files (it held {files_before} before)",
            open_files(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_after = rss_kib(pid);
    println!(
        "after the timeout: open files {}, RSS {rss_after} KiB",
        open_files(pid)
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert_eq!(healthz(&node).await, 200);
}

/// A device that floods acks past the end and never reads is not read either once its
/// answers fill its queue: the node's memory stays bounded (it grew by 1.6 GB in 15 s
/// before), and other devices are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_flooding_acks_without_reading_cannot_grow_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"));
    let pid = node.pid();
    node.publish("flood", "m1", "one").await;
    let mut s = raw_device(&node, "flood").await;
    let rss_before = rss_kib(pid);
    // Acks 1 (delivered) and then far past the end, as fast as the socket takes them.
    let mut batch = Vec::new();
    for seq in 0..10_000u64 {
        batch.extend(framed(&Frame::Ack { seq: 1 + seq * 7 }));
    }
    let t0 = Instant::now();
    let mut sent_frames = 0u64;
    while t0.elapsed() < Duration::from_secs(8) {
        match tokio::time::timeout(Duration::from_millis(500), s.write_all(&batch)).await {
            Ok(Ok(())) => sent_frames += 10_000,
            Ok(Err(e)) => panic!("the node closed the flooding connection: {e}"),
            Err(_) => {} // the node stopped reading: the point of the test
        }
    }
    let rss_after = rss_kib(pid);
    println!("ack flood: {sent_frames} frames written in 8 s; RSS {rss_before} -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB under an ack flood"
    );
    assert_eq!(healthz(&node).await, 200);
    // Another device of another user is still served.
    let mut other = node.device("calm", "d").await;
    node.publish("calm", "c1", "hello").await;
    let got = tokio::time::timeout(Duration::from_secs(10), other.recv_msg())
        .await
        .expect("the other device gets its message")
        .unwrap();
    assert_eq!(got.seq, 1);
}

/// A silent device is pinged after `limits.ping_interval_ms` and closed with
/// `idle_timeout` after `limits.idle_timeout_ms`; one that pings on its own or answers
/// pings stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_devices_are_pinged_then_closed_and_answering_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let config = limits_file(
        dir.path(),
        &[("ping_interval_ms", 400), ("idle_timeout_ms", 1200)],
    );
    let node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &["--config", config.to_str().unwrap()],
    );
    let mut silent = raw_device(&node, "quiet").await;
    let t0 = Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut silent))
        .await
        .expect("a frame within 5 s");
    assert!(
        matches!(first, Some(Frame::Ping { .. })),
        "expected ping, got {first:?}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "pinged too early"
    );
    let second = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut silent))
        .await
        .expect("a frame within 5 s");
    match second {
        Some(Frame::Error { code, message, .. }) => {
            assert_eq!(code, "idle_timeout");
            assert!(message.contains("ping"), "says what to do: {message}");
        }
        other => panic!("expected idle_timeout, got {other:?}"),
    }
    assert!(closed_within(&mut silent, Duration::from_secs(5))
        .await
        .is_some());
    assert!(
        t0.elapsed() >= Duration::from_millis(1100),
        "closed too early"
    );

    // A device that pings at the ping interval itself is heard before the server's timer
    // runs out: it only ever gets pongs, never the server's ping (the two timers racing
    // cost an extra ping and pong per interval). Its timer ticks every interval from its
    // start, as a client's would, whenever the pongs arrive.
    let mut pinging = raw_device(&node, "pinging").await;
    let every = Duration::from_millis(400);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    for n in 0..8 {
        ticks.tick().await;
        pinging
            .write_all(&framed(&Frame::Ping { n }))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut pinging))
            .await
            .expect("a frame within 5 s");
        assert_eq!(
            got,
            Some(Frame::Pong { n }),
            "ping {n} of a self-pinging device"
        );
    }

    // The SDK answers pings while receiving: it outlives several idle timeouts.
    let mut live = node.device("chatty", "d").await;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let _ = tokio::time::timeout_at(until.into(), live.recv()).await;
    }
    node.publish("chatty", "c1", "still here").await;
    let got = tokio::time::timeout(Duration::from_secs(5), live.recv_msg())
        .await
        .expect("the answering device is still connected")
        .unwrap();
    assert_eq!(got.seq, 1);
}

/// Key rotation without a restart: tokens of the old and the new key both work during the
/// overlap, and the old one stops once its file is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let (old, new) = (
        "old-key-0123456789abcdef0123",
        "new-key-0123456789abcdef0123",
    );
    std::fs::write(keys.join("2026-11"), old).unwrap();
    let node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &["--jwt-keys-dir", keys.to_str().unwrap()],
    );
    let claims = Claims::new("rot", "device", 600);
    let by_old = mint_with_kid(old.as_bytes(), &claims, Some("2026-11"));
    let by_new = mint_with_kid(new.as_bytes(), &claims, Some("2026-12"));
    let connects = |t: String| {
        let addr = node.client.clone();
        async move {
            match Connection::connect(ConnectOptions::new(&addr, t, "d")).await {
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    assert_eq!(connects(by_old.clone()).await, Ok(()));
    let e = connects(by_new.clone()).await.unwrap_err();
    assert!(e.contains("2026-12"), "names the unknown key id: {e}");
    // The node's own secret still works for tokens without a kid.
    assert_eq!(connects(common::token("rot", "device")).await, Ok(()));

    std::fs::write(keys.join("2026-12"), new).unwrap();
    let t0 = Instant::now();
    while connects(by_new.clone()).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the new key was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        connects(by_old.clone()).await,
        Ok(()),
        "overlap: the old key still works"
    );

    std::fs::remove_file(keys.join("2026-11")).unwrap();
    let t0 = Instant::now();
    while connects(by_old.clone()).await.is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the removed key still works"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = connects(by_old).await.unwrap_err();
    assert!(e.contains("unauthorized") || e.contains("2026-11"), "{e}");
    assert_eq!(connects(by_new).await, Ok(()));
}

/// One token's flood is refused with `rate_limited` (HTTP 429 with `Retry-After`, or the
/// protocol's error with the publish's id) while another token's publishes all go through
/// promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_token_is_rate_limited_and_another_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = limits_file(dir.path(), &[("publish_rate", 50), ("publish_burst", 50)]);
    let node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &["--config", config.to_str().unwrap()],
    );
    let flood_token = token("flood-svc", "publish");
    let http = node.http.clone();
    let flood = tokio::spawn(async move {
        let (mut ok, mut limited, mut retry_after_seen) = (0u32, 0u32, true);
        let t0 = Instant::now();
        let mut i = 0u32;
        while t0.elapsed() < Duration::from_secs(3) {
            let body = format!(r#"{{"id":"f{i}","body":"x"}}"#);
            let answer = warbler_client::http::NodeHttp::new(&http)
                .send(
                    "POST",
                    &format!("/v1/users/victim{}/messages", i % 50),
                    Some(&flood_token),
                    body.into_bytes(),
                )
                .await
                .unwrap();
            match answer.status {
                200 => ok += 1,
                429 => {
                    limited += 1;
                    retry_after_seen &= answer.body.contains("rate_limited");
                }
                s => panic!("unexpected status {s}: {}", answer.body),
            }
            i += 1;
        }
        (ok, limited, retry_after_seen)
    });
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let body = format!(r#"{{"id":"c{i}","body":"hello"}}"#);
        let (status, answer) = node
            .http(
                "POST",
                "/v1/users/calm/messages",
                Some(&token("calm-svc", "publish")),
                &body,
            )
            .await;
        assert_eq!(status, 200, "the calm token is never limited: {answer}");
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, limited, coded) = flood.await.unwrap();
    println!("flood: {ok} accepted, {limited} refused; calm: worst publish {worst:?}");
    assert!(limited > 0, "the flood was never limited");
    assert!(coded, "every refusal says rate_limited");
    // 50 burst + 50/s for about 3 s, with slack for timing.
    assert!(ok <= 50 + 50 * 4, "{ok} flood publishes accepted");
    assert!(
        worst < Duration::from_secs(2),
        "the calm token waited {worst:?}"
    );

    // Over the device protocol: the error names the publish.
    let mut publisher = Connection::connect(ConnectOptions::new(
        &node.client,
        token("flood-svc", "publish"),
        "p",
    ))
    .await
    .unwrap();
    let mut refused = None;
    for i in 0..200 {
        publisher
            .publish(&format!("d{i}"), "victim", b"x")
            .await
            .unwrap();
    }
    for _ in 0..200 {
        match tokio::time::timeout(Duration::from_secs(10), publisher.recv())
            .await
            .unwrap()
        {
            Err(ClientError::Server { code, id, message }) if code == "rate_limited" => {
                assert!(message.contains("retry in"), "{message}");
                assert!(!message.contains("retry in 0 ms"), "{message}");
                refused = id;
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert!(
        refused.is_some(),
        "the device protocol flood was never limited"
    );
}

/// A retry-after header for a rate-limited HTTP publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_http_publish_says_when_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let config = limits_file(dir.path(), &[("publish_rate", 1), ("publish_burst", 1)]);
    let node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &["--config", config.to_str().unwrap()],
    );
    let t = token("svc", "publish");
    let mut s = TcpStream::connect(&node.http).await.unwrap();
    let mut statuses = Vec::new();
    for i in 0..2 {
        let body = format!(r#"{{"id":"r{i}","body":"x"}}"#);
        let req = format!(
            "POST /v1/users/u/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        statuses.push(String::from_utf8_lossy(&buf[..n]).to_lowercase());
    }
    assert!(statuses[0].starts_with("http/1.1 200"), "{}", statuses[0]);
    assert!(statuses[1].starts_with("http/1.1 429"), "{}", statuses[1]);
    assert!(statuses[1].contains("retry-after: 1"), "{}", statuses[1]);
    assert!(statuses[1].contains("rate_limited"), "{}", statuses[1]);
}

/// A node whose data directory's disk fills up refuses publishes with `storage_full` and
/// is not ready, keeps every acknowledged message, and serves again once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_loses_nothing_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    if let Err(why) = mount_tmpfs(&data, 160) {
        println!("SKIPPED: a small tmpfs is needed for the data directory and cannot be mounted here: {why}");
        return;
    }
    let _unmount = Unmount(data.clone());
    let node = Node::start_with(
        &data,
        &[("WARBLER_STORAGE_MIN_FREE_BYTES", &(32u64 << 20).to_string())],
        &[],
    );
    for i in 0..20 {
        node.publish("keep", &format!("k{i}"), &format!("kept {i}"))
            .await;
    }
    // Fill the disk to 16 MiB free, below the 32 MiB watermark.
    let free = warbler_free_bytes(&data);
    let ballast = data.join("ballast");
    std::fs::write(&ballast, vec![0u8; (free - (16 << 20)) as usize]).unwrap();
    let t0 = Instant::now();
    let refused = loop {
        let (status, v) = node
            .http(
                "POST",
                "/v1/users/keep/messages",
                Some(&token("svc", "publish")),
                r#"{"id":"full-1","body":"x"}"#,
            )
            .await;
        if status == 503 {
            break v;
        }
        assert_eq!(status, 200, "{v}");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still taking publishes with 16 MiB free"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused["error"]["code"], "storage_full", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("min_free_bytes"),
        "{refused}"
    );
    let (status, ready) = node.http("GET", "/readyz", None, "").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["error"]["code"], "storage_full", "{ready}");
    // The device protocol says the same, with the publish's id.
    let mut publisher = node.publisher().await;
    publisher.publish("full-2", "keep", b"x").await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), publisher.recv())
        .await
        .unwrap()
    {
        Err(ClientError::Server { code, id, .. }) => {
            assert_eq!(code, "storage_full");
            assert_eq!(id.as_deref(), Some("full-2"));
        }
        other => panic!("expected storage_full, got {other:?}"),
    }
    // Reading still works, and nothing acknowledged is lost.
    let history = node.history("keep").await;
    assert!(history.len() >= 20, "{} kept", history.len());
    for (i, (seq, id, _)) in history.iter().take(20).enumerate() {
        assert_eq!(
            (*seq, id.as_str()),
            (i as u64 + 1, format!("k{i}").as_str())
        );
    }

    std::fs::remove_file(&ballast).unwrap();
    let t0 = Instant::now();
    loop {
        let (status, v) = node
            .http(
                "POST",
                "/v1/users/keep/messages",
                Some(&token("svc", "publish")),
                r#"{"id":"after","body":"x"}"#,
            )
            .await;
        if status == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "not serving 5 s after space was freed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(node.http("GET", "/readyz", None, "").await.0, 200);
    let history = node.history("keep").await;
    assert_eq!(history.last().unwrap().1, "after");
}

/// Where every leader and member is, and removing members, are for operators: without an
/// `ops` (or `admin`) token they are refused; `/metrics` too when the node is told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_state_and_decommission_need_an_ops_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        &dir.path().join("n"),
        &[("WARBLER_METRICS_REQUIRE_TOKEN", "true")],
        &[],
    );
    let (status, v) = node.http("GET", "/v1/cluster", None, "").await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = node
        .http(
            "GET",
            "/v1/cluster",
            Some(&token("dev", "device publish")),
            "",
        )
        .await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("ops"),
        "{v}"
    );
    let (status, v) = node
        .http("GET", "/v1/cluster", Some(&token("op", "ops")), "")
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["partitions"].is_array());
    let body = r#"{"node":"other"}"#;
    let (status, _) = node
        .http(
            "POST",
            "/v1/cluster/decommission",
            Some(&token("dev", "publish")),
            body,
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = node.http("GET", "/metrics", None, "").await;
    assert_eq!(status, 401);
    let (status, text) = node
        .http("GET", "/metrics", Some(&token("prometheus", "ops")), "")
        .await;
    assert_eq!(status, 200);
    assert!(text.as_str().unwrap_or("").contains("warbler_"), "{text}");
    // Probes stay open.
    assert_eq!(node.http("GET", "/healthz", None, "").await.0, 200);
    assert_eq!(node.http("GET", "/readyz", None, "").await.0, 200);
}

/// A flood to one user cannot make retention trim what a device has not acknowledged: once
/// `retention.max_messages_per_user` messages wait for the device, publishes to that user
/// are refused with `mailbox_full` (HTTP 507) and nothing the device has not read goes;
/// once it acks, publishes are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_cannot_trim_what_a_device_has_not_read() {
    const KEEP: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path()).unwrap();
    let config = dir.path().join("retention.toml");
    let text = format!("[retention]\nmax_messages_per_user = {KEEP}\nsweep_interval_secs = 1\n");
    std::fs::write(&config, text).unwrap();
    let node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &["--config", config.to_str().unwrap()],
    );
    // The device reads the first message and goes away.
    node.publish("reader", "m0", "first").await;
    let mut device = node.device("reader", "phone").await;
    let m = device.recv_msg().await.unwrap();
    device.ack(m.seq).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(device);
    // The flood: KEEP more are taken, then the mailbox is full.
    let publisher = token("flooder", "publish");
    let mut taken = 0u64;
    let mut full = None;
    for i in 0..(KEEP * 3) {
        let body = format!(r#"{{"id":"f{i}","body":"flood {i}"}}"#);
        let (status, v) = node
            .http("POST", "/v1/users/reader/messages", Some(&publisher), &body)
            .await;
        match status {
            200 => taken += 1,
            507 => {
                full = Some(v);
                break;
            }
            s => panic!("unexpected {s}: {v}"),
        }
    }
    let full = full.expect("the flood was never refused");
    assert_eq!(full["error"]["code"], "mailbox_full", "{full}");
    assert_eq!(taken, KEEP, "exactly what retention keeps is taken");
    // Sweeps run; every message the device has not read is still there.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut device = node.device("reader", "phone").await;
    let got = common::recv_n_acking(&mut device, KEEP as usize).await;
    assert_eq!(
        got.first().map(|m| m.seq),
        Some(2),
        "nothing unread was trimmed"
    );
    assert_eq!(got.last().map(|m| m.seq), Some(KEEP + 1));
    // Caught up: publishes are taken again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, v) = node
        .http(
            "POST",
            "/v1/users/reader/messages",
            Some(&publisher),
            r#"{"id":"after","body":"x"}"#,
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

/// A WebSocket cannot make the node buffer more than a hello's worth (16 KiB) before it
/// says who it is: a large first message is cut off, where it used to be read whole (up to
/// twice `limits.max_frame_bytes`) before it was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_cannot_send_a_large_first_message() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"));
    let url = format!("ws://{}/v1/ws", node.http);
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    // Well within the message limit (2 MiB), far over a hello.
    let sender = tokio::spawn(async move {
        let _ = sink.send(Message::Binary(vec![0xc1; 1 << 20].into())).await;
        sink
    });
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = stream.next().await {
            match m {
                Ok(Message::Binary(b)) => return Some(Frame::decode(&b).unwrap()),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("the node answers or closes within 10 s");
    match answer {
        // Closed mid-message (the error frame may be lost to the reset): it was not read.
        None => {}
        Some(Frame::Error { code, message, .. }) => {
            assert_eq!(code, "frame_too_large", "{message}");
            assert!(message.contains("16384"), "{message}");
        }
        Some(other) => panic!("expected frame_too_large, got {other:?}"),
    }
    sender.abort();
    // A real hello on a new socket is served as before.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let hello = Frame::Hello {
        token: token("wsuser", "device"),
        device: "browser".into(),
        v: 1,
    };
    ws.send(Message::Binary(hello.encode().into()))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(Frame::decode(&first.into_data()), Ok(Frame::Welcome { .. })),
        "hello is still welcome"
    );
    assert_eq!(healthz(&node).await, 200);
}

/// `tls.http`: the HTTP API is served over TLS with the client port's certificate, the
/// CLI reaches it with `https://` and `--tls-ca-file`, and plain HTTP gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_is_served_over_tls_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key, ca) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &[
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-http",
        ],
    );
    let port = node.http.rsplit(':').next().unwrap();
    let base = format!("https://localhost:{port}");
    let https = warbler_client::http::NodeHttp::new(&base)
        .with_ca_pem(ck.cert.pem().as_bytes())
        .unwrap();
    let health = https
        .send("GET", "/healthz", None, Vec::new())
        .await
        .unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    let published = https
        .send(
            "POST",
            "/v1/users/tina/messages",
            Some(&token("svc", "publish")),
            br#"{"id":"t1","body":"over tls"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(published.status, 200, "{}", published.body);
    assert_eq!(published.json()["seq"], 1, "{}", published.body);
    // Without the CA the certificate is not trusted; plain HTTP is not served.
    assert!(warbler_client::http::NodeHttp::new(&base)
        .send("GET", "/healthz", None, Vec::new())
        .await
        .is_err());
    let plain = warbler_client::http::NodeHttp::with_timeout(&node.http, Duration::from_secs(3))
        .send("GET", "/healthz", None, Vec::new())
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP answered: {:?}",
        plain.map(|a| a.status)
    );
    // The operator's CLI.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warbler"))
        .args([
            "cluster",
            "status",
            "--json",
            "--http",
            &base,
            "--tls-ca-file",
        ])
        .arg(&ca)
        .arg("--jwt-secret-file")
        .arg(node.dir.join("secret"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("partitions"), "{stdout}");
}

/// `limits.connection_publish_rate`: one connection that floods is refused with
/// `rate_limited` (naming the connection), while another connection of the same token
/// subject publishes from its own allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_has_its_own_publish_rate() {
    let dir = tempfile::tempdir().unwrap();
    let config = limits_file(
        dir.path(),
        &[
            ("connection_publish_rate", 20),
            ("connection_publish_burst", 20),
        ],
    );
    let node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &["--config", config.to_str().unwrap()],
    );
    let connect = |device: &'static str| {
        Connection::connect(ConnectOptions::new(
            &node.client,
            token("shared-svc", "publish"),
            device,
        ))
    };
    let mut flood = connect("a").await.unwrap();
    for i in 0..200 {
        // A user each: a refusal holds back later publishes to the same user only.
        flood
            .publish(&format!("a{i}"), &format!("r{i}"), b"x")
            .await
            .unwrap();
    }
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..200 {
        match tokio::time::timeout(Duration::from_secs(10), flood.recv())
            .await
            .unwrap()
        {
            Err(ClientError::Server { code, message, .. }) if code == "rate_limited" => {
                assert!(message.contains("this connection"), "{message}");
                limited += 1;
            }
            Ok(_) => ok += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    println!("flooding connection: {ok} accepted, {limited} refused");
    assert!(limited > 0, "the flooding connection was never limited");
    assert!(ok <= 20 + 20 * 3, "{ok} accepted");
    let mut calm = connect("b").await.unwrap();
    for i in 0..10 {
        let seq = calm
            .publish_wait(&format!("b{i}"), "calm", b"y")
            .await
            .expect("another connection of the same subject is not limited");
        assert_eq!(seq, i + 1);
    }
}

/// Age retention may remove messages a device has not acknowledged (count retention never
/// does); the device is told which, with `messages_expired`, before delivery goes on, rather
/// than seeing the `seq` jump silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_told_when_age_retention_removed_what_it_had_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("retention.toml");
    std::fs::write(
        &config,
        "[retention]\nmax_age_secs = 1\nsweep_interval_secs = 1\n",
    )
    .unwrap();
    let mut node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &["--config", config.to_str().unwrap()],
    );
    let mut phone = node.device("ada", "phone").await;
    for i in 1..=3 {
        node.publish("ada", &format!("a{i}"), "read").await;
    }
    let got = common::recv_n_acking(&mut phone, 3).await;
    assert_eq!(got.last().unwrap().seq, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(phone);
    for i in 4..=8 {
        node.publish("ada", &format!("a{i}"), "never read").await;
    }
    // Wait until the sweep removed 4..8 (older than a second).
    let t0 = Instant::now();
    while node
        .history("ada")
        .await
        .iter()
        .any(|(seq, _, _)| *seq == 8)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "age retention never ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A live mailbox may still deliver what it holds in its cache of recent messages; a
    // restarted node has only what retention kept.
    node.restart();
    node.publish("ada", "a9", "fresh").await;
    let mut phone = node.device("ada", "phone").await;
    match tokio::time::timeout(Duration::from_secs(10), phone.recv())
        .await
        .unwrap()
    {
        Err(ClientError::Server { code, message, .. }) => {
            assert_eq!(code, "messages_expired", "{message}");
            assert!(message.contains("4..8"), "{message}");
        }
        other => panic!("expected messages_expired, got {other:?}"),
    }
    let next = tokio::time::timeout(Duration::from_secs(10), phone.recv_msg())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((next.seq, next.id.as_str()), (9, "a9"));
}

/// A device that reads nothing while messages wait for it is cut off after
/// `limits.slow_consumer_timeout_ms`, like NATS's slow consumers, instead of holding its
/// session and delivery window until the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_reads_nothing_is_cut_off_as_a_slow_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        &dir.path().join("n"),
        &[("WARBLER_SLOW_CONSUMER_TIMEOUT_MS", "1000")],
        &[],
    );
    // A small receive buffer, so the node's writes back up quickly.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(node.client.parse().unwrap()).await.unwrap();
    let hello = Frame::Hello {
        token: token("slowpoke", "device"),
        device: "d".into(),
        v: 1,
    };
    s.write_all(&framed(&hello)).await.unwrap();
    assert!(matches!(
        read_frame(&mut s).await,
        Some(Frame::Welcome { .. })
    ));
    let body = "x".repeat(256 << 10);
    for i in 0..48 {
        node.publish("slowpoke", &format!("s{i}"), &body).await;
    }
    // Read nothing for a while, then drain: the node must have closed the connection.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let took = closed_within(&mut s, Duration::from_secs(20)).await;
    assert!(took.is_some(), "the slow consumer was never cut off");
    let (_, metrics) = node.http("GET", "/metrics", None, "").await;
    let text = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with("warbler_slow_consumers_closed_total") && !l.ends_with(" 0")),
        "{text}"
    );
    assert_eq!(healthz(&node).await, 200);
}
