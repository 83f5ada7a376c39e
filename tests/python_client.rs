//! Acceptance: a client written only from docs/protocol.md (examples/python, in Python with
//! the msgpack package over TCP, or with nothing but the standard library in JSON over a
//! WebSocket) publishes, receives in order, acks, and resumes after a reconnect.

mod common;

use std::process::Command;

use common::{token, Node};

fn python(args: &[&str]) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/warbler_client.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs (scripts/test.sh installs the msgpack package it needs)");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn a_client_written_from_the_protocol_doc_interoperates() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    interoperates(&node, &node.client, &[]).await;
}

#[tokio::test]
async fn a_json_websocket_client_written_from_the_protocol_doc_interoperates() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    interoperates(&node, &node.http, &["--ws"]).await;
}

/// Publishes through the Python client at `addr`, then listens twice: in order, and after
/// the reconnect exactly the unacknowledged rest.
async fn interoperates(node: &Node, addr: &str, flags: &[&str]) {
    let publisher = token("backend", "publish");
    let with = |args: &[&str]| -> Vec<String> {
        args.iter().chain(flags).map(|a| a.to_string()).collect()
    };
    let args = with(&[
        "publish",
        "--addr",
        addr,
        "--token",
        &publisher,
        "--to",
        "pia",
        "--id",
        "py-1",
        "--body",
        "from python",
    ]);
    let out = python(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.trim(), "published seq=1");
    for i in 2..=5 {
        node.publish("pia", &format!("m{i}"), &format!("body {i}"))
            .await;
    }
    let device = token("pia", "device");
    let listen = |count: &str| {
        let args = with(&[
            "listen", "--addr", addr, "--token", &device, "--device", "py", "--count", count,
        ]);
        let out = python(&args.iter().map(String::as_str).collect::<Vec<_>>());
        out.lines().map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(
        listen("3"),
        vec![
            "welcome user=pia acked=0",
            "seq=1 id=py-1 body=from python",
            "seq=2 id=m2 body=body 2",
            "seq=3 id=m3 body=body 3",
        ]
    );
    // Reconnect: exactly the unacked rest.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        listen("2"),
        vec![
            "welcome user=pia acked=3",
            "seq=4 id=m4 body=body 4",
            "seq=5 id=m5 body=body 5"
        ]
    );
}
