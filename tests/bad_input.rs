//! Acceptance: bad input gets a clear error, the server stays up, other connections are
//! unaffected and nothing stored is lost.

mod common;

use std::time::Duration;

use common::{expired_token, http_raw, recv_n, token, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warbler_client::Frame;

/// Reads one frame; `None` on EOF.
async fn read_frame(s: &mut TcpStream) -> Option<Frame> {
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut len))
        .await
        .expect("frame within 10 s")
        .ok()?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.ok()?;
    Some(Frame::decode(&buf).expect("the server sends valid frames"))
}

async fn write_raw(s: &mut TcpStream, payload: &[u8]) {
    s.write_all(&(payload.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(payload).await.unwrap();
}

async fn send(s: &mut TcpStream, f: &Frame) {
    write_raw(s, &f.encode()).await;
}

fn error_code(f: Option<Frame>) -> (String, String, Option<String>) {
    match f {
        Some(Frame::Error { code, message, id }) => (code, message, id),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn bad_frames_tokens_and_bodies_are_refused_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    // A healthy device, connected throughout, and stored data that must survive.
    let mut bystander = node.device("zoe", "phone").await;
    for i in 1..=3 {
        node.publish("zoe", &format!("z{i}"), "before").await;
    }

    // Garbage inside a well-formed length prefix.
    let mut s = TcpStream::connect(&node.client).await.unwrap();
    write_raw(&mut s, b"\xc1\xc1garbage").await;
    let (code, message, _) = error_code(read_frame(&mut s).await);
    assert_eq!(code, "malformed_frame", "{message}");
    assert!(
        closed(&mut s).await,
        "the connection is closed after a malformed frame"
    );

    // A first frame over the 16 KiB hello limit: refused from its length alone, before the
    // node buffers any of it.
    let mut s = TcpStream::connect(&node.client).await.unwrap();
    s.write_all(&(20u32 << 10).to_be_bytes()).await.unwrap();
    let (code, message, _) = error_code(read_frame(&mut s).await);
    assert_eq!(code, "frame_too_large");
    assert!(
        message.contains("20480") && message.contains("16384"),
        "{message}"
    );
    assert!(closed(&mut s).await);

    // After hello, a frame over the 1 MiB limit: refused from its length alone.
    let mut s = TcpStream::connect(&node.client).await.unwrap();
    let hello = Frame::Hello {
        token: token("big", "device"),
        device: "d".into(),
        v: 1,
    };
    send(&mut s, &hello).await;
    assert!(matches!(
        read_frame(&mut s).await,
        Some(Frame::Welcome { .. })
    ));
    s.write_all(&(2u32 << 20).to_be_bytes()).await.unwrap();
    let (code, message, _) = error_code(read_frame(&mut s).await);
    assert_eq!(code, "frame_too_large");
    assert!(
        message.contains("2097152") && message.contains("1048576"),
        "{message}"
    );
    assert!(closed(&mut s).await);

    // The first frame must be hello.
    let mut s = TcpStream::connect(&node.client).await.unwrap();
    send(&mut s, &Frame::Ping { n: 1 }).await;
    assert_eq!(error_code(read_frame(&mut s).await).0, "hello_required");

    // A bad token, and an expired one.
    for (tok, expect) in [
        ("not-a-jwt".to_string(), "not valid"),
        (expired_token("zoe"), "expired"),
    ] {
        let mut s = TcpStream::connect(&node.client).await.unwrap();
        send(
            &mut s,
            &Frame::Hello {
                token: tok,
                device: "d".into(),
                v: 1,
            },
        )
        .await;
        let (code, message, _) = error_code(read_frame(&mut s).await);
        assert_eq!(code, "unauthorized");
        assert!(message.contains(expect), "{message}");
        assert!(closed(&mut s).await);
    }

    // A device token may not publish; the connection stays usable.
    let mut s = TcpStream::connect(&node.client).await.unwrap();
    send(
        &mut s,
        &Frame::Hello {
            token: token("mallory", "device"),
            device: "d".into(),
            v: 1,
        },
    )
    .await;
    assert!(matches!(
        read_frame(&mut s).await,
        Some(Frame::Welcome { .. })
    ));
    let publish = Frame::Publish {
        id: "evil".into(),
        to: "zoe".into(),
        body: serde_bytes::ByteBuf::from(b"x".to_vec()),
    };
    send(&mut s, &publish).await;
    let (code, message, id) = error_code(read_frame(&mut s).await);
    assert_eq!((code.as_str(), id.as_deref()), ("forbidden", Some("evil")));
    assert!(message.contains("publish"), "{message}");
    // An unknown frame type is an error but not fatal.
    let mut unknown = std::collections::BTreeMap::new();
    unknown.insert("t", "launch");
    write_raw(&mut s, &rmp_serde::to_vec_named(&unknown).unwrap()).await;
    assert_eq!(error_code(read_frame(&mut s).await).0, "unknown_type");
    send(&mut s, &Frame::Ping { n: 42 }).await;
    assert_eq!(read_frame(&mut s).await, Some(Frame::Pong { n: 42 }));

    // HTTP: not JSON, no token, wrong scope, too large, unknown route.
    let publish_tok = token("backend", "publish");
    let (status, body) = http_raw(
        &node.http,
        "POST",
        "/v1/users/zoe/messages",
        Some(&publish_tok),
        b"{not json",
    )
    .await;
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "bad_request");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("JSON"),
        "{v}"
    );
    let (status, body) = http_raw(
        &node.http,
        "POST",
        "/v1/users/zoe/messages",
        None,
        br#"{"id":"a","body":"b"}"#,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = http_raw(
        &node.http,
        "POST",
        "/v1/users/zoe/messages",
        Some(&token("zoe", "device")),
        br#"{"id":"a","body":"b"}"#,
    )
    .await;
    assert_eq!(status, 403);
    let big = format!(r#"{{"id":"big","body":"{}"}}"#, "x".repeat(600 * 1024));
    let (status, body) = http_raw(
        &node.http,
        "POST",
        "/v1/users/zoe/messages",
        Some(&publish_tok),
        big.as_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");
    let (status, body) = http_raw(&node.http, "GET", "/v1/nope", None, b"").await;
    assert_eq!(status, 404);
    assert!(body.contains("not_found"));
    let (status, _) = http_raw(
        &node.http,
        "GET",
        "/v1/users/zoe/messages",
        Some(&token("eve", "device")),
        b"",
    )
    .await;
    assert_eq!(
        status, 403,
        "a device token cannot read another user's history"
    );

    // Nothing stored was lost, the bystander was not disturbed, the node still serves.
    node.publish("zoe", "z4", "after").await;
    let got = recv_n(&mut bystander, 4).await;
    assert_eq!(
        got.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let history = node.history("zoe").await;
    assert_eq!(
        history
            .iter()
            .map(|(_, id, _)| id.as_str())
            .collect::<Vec<_>>(),
        vec!["z1", "z2", "z3", "z4"]
    );
    let (status, _) = http_raw(&node.http, "GET", "/healthz", None, b"").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn bad_configuration_is_refused_with_the_field_named() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warbler"))
        .args([
            "serve",
            "--client-addr",
            "localhost:99999",
            "--jwt-secret-file",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--client-addr") && err.contains("HOST:PORT"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warbler"))
        .args(["serve"])
        .env("WARBLER_INFLIGHT_MAX", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.inflight_max") && err.contains("1..=65536"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warbler"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jwt-secret-file"));
}

/// A node runs on small pages unless `WARBLER_THP=system` says otherwise, and refuses any
/// other value at start. The kernel's view of the process (`THP_enabled` in
/// /proc/PID/status) tells whether the node turned huge pages off for itself.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_node_turns_huge_pages_off_unless_told_to_keep_the_systems() {
    let thp_enabled = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(|v| v.trim().to_string())
    };
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("default"));
    let Some(default) = thp_enabled(node.pid()) else {
        eprintln!("this kernel does not report THP_enabled in /proc/PID/status; skipping");
        return;
    };
    node.kill9();
    assert_eq!(
        default, "0",
        "huge pages still allowed for a node on its defaults"
    );
    let mut node = Node::start_with(
        &dir.path().join("system"),
        &[("WARBLER_THP", "system")],
        &[],
    );
    let kept = thp_enabled(node.pid());
    node.kill9();
    assert_eq!(
        kept.as_deref(),
        Some("1"),
        "WARBLER_THP=system turned huge pages off"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warbler"))
        .args(["serve"])
        .env("WARBLER_THP", "on")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WARBLER_THP=on") && err.contains("`system`"),
        "{err}"
    );
}

/// `warbler health`: exit 0 when the probe answers 200; 1 with the node's reason when it
/// does not (a node waiting for a second member is alive but not ready), or when nothing
/// answers.
#[tokio::test]
async fn the_health_command_says_whether_a_node_is_alive_and_ready() {
    let health = |http: &str, ready: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_warbler"));
        cmd.args(["health", "--http", http, "--timeout-secs", "2"]);
        if ready {
            cmd.arg("--ready");
        }
        let out = cmd.env_remove("WARBLER_HTTP_ADDR").output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let dir = tempfile::tempdir().unwrap();
    let port = warbler_chaos::ports::free_port();
    let mut node = Node::start_with(
        &dir.path().join("n"),
        &[],
        &[
            "--cluster-addr",
            &format!("127.0.0.1:{port}"),
            "--bootstrap-expect",
            "2",
        ],
    );
    // The image sets WARBLER_HTTP_ADDR=0.0.0.0:PORT: that means this machine.
    let any = node.http.replace("127.0.0.1", "0.0.0.0");
    let (code, text) = health(&any, false);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = health(&node.http, true);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("/readyz answered 503") && text.contains("formed"),
        "{text}"
    );
    node.kill9();
    let (code, text) = health(&node.http, false);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cannot reach"), "{text}");
}
