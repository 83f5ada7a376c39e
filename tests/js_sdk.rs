//! The browser SDK (`sdk/js/warbler.js`, no dependencies) under Node: against a fake server
//! (duplicates after a reconnect, `bye`, backoff, a refused token) and against a real node
//! (in-order delivery, idempotent publish, resume from the cursor after a "reload"). Skipped
//! with a printed reason where Node is not installed.

mod common;

use std::process::Command;

use common::{token, Node};

/// Node's binary, when it is installed and has a WebSocket (Node 22, or 20 with the flag).
fn node_js() -> Option<(String, Vec<&'static str>)> {
    for flags in [vec![], vec!["--experimental-websocket"]] {
        let probe = Command::new("node")
            .args(&flags)
            .args([
                "-e",
                "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
            ])
            .status();
        if probe.is_ok_and(|s| s.success()) {
            return Some(("node".into(), flags));
        }
    }
    None
}

#[tokio::test]
async fn the_js_sdk_delivers_in_order_drops_duplicates_and_resumes_after_a_reload() {
    let Some((node_bin, flags)) = node_js() else {
        println!("SKIPPED: Node.js with a WebSocket (22+, or 20 with --experimental-websocket) is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/js/test/sdk.test.mjs");
    let out = Command::new(node_bin)
        .args(flags)
        .arg(script)
        .env("WARBLER_WS", format!("ws://{}/v1/ws", node.http))
        .env("WARBLER_TOKEN", token("jsu", "device,publish"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "fake server: order, duplicates, acks, publish, bye, failure ok",
            "welcome user=jsu last=0",
            "welcome user=jsu last=3",
            "seq=1 id=js-1 text=hello 1",
            "seq=2 id=js-2 text=hello 2",
            "seq=3 id=js-3 text=hello 3",
            "seq=4 id=js-4 text=after reload",
        ]
    );
    // The server holds the cursor the SDK acknowledged.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(node.device("jsu", "js-tab").await.acked, 4);
}

/// The pages' scripts parse, and the console flags leaderless and under-replicated
/// partitions.
#[test]
fn the_console_flags_partitions_and_the_page_scripts_parse() {
    let Some((node_bin, flags)) = node_js() else {
        println!("SKIPPED: Node.js is not installed");
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    for script in ["web/demo/demo.js", "web/console/console.js"] {
        let out = Command::new(&node_bin)
            .args(["--check", &format!("{root}/{script}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(node_bin)
        .args(flags)
        .arg(format!("{root}/web/console/console.test.mjs"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "console flags ok"
    );
}
