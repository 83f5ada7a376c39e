//! The demo chat and the operator console in a real browser (headless Chromium driven by
//! Selenium, `tests/browser/web_test.py`) against a real 3-node cluster: messages in order on
//! every tab, a reload that resumes, a node killed under the chat, and the console listing
//! every member and marking the killed one down. `scripts/test.sh` installs Chromium, its
//! driver and Selenium; where they cannot be installed the test prints why and skips.
//! `WARBLER_SCREENSHOTS=DIR` saves the two pages' screenshots there.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{token, Node};
use warbler_chaos::ports::free_port;

fn browser_missing() -> Option<String> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .any(|p| Path::new(p).exists());
    if !chromium {
        return Some("Chromium is not installed (apt-get install chromium chromium-driver)".into());
    }
    let selenium = Command::new("python3")
        .args(["-c", "import selenium"])
        .status()
        .is_ok_and(|s| s.success());
    if !selenium {
        return Some("the Python selenium package is not installed (pip install selenium)".into());
    }
    None
}

async fn wait_ready(node: &Node) {
    let start = Instant::now();
    while node.http("GET", "/readyz", None, "").await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "a node not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_and_the_console_work_in_a_browser_against_a_cluster() {
    if let Some(why) = browser_missing() {
        println!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    std::fs::write(&key, "the browser test cluster's key, long enough").unwrap();
    let key = key.display().to_string();
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut nodes = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let name = format!("n{i}");
        let env = [
            ("WARBLER_CLUSTER_KEY_FILE", key.as_str()),
            ("WARBLER_RAFT_HEARTBEAT_MS", "100"),
            ("WARBLER_RAFT_ELECTION_TIMEOUT_MS", "500"),
            ("WARBLER_DEMO", "true"),
        ];
        let args = [
            "--node-id",
            &name,
            "--cluster-addr",
            addr,
            "--seeds",
            &addrs[0],
            "--bootstrap-expect",
            "3",
        ];
        nodes.push(Node::start_with(&dir.path().join(&name), &env, &args));
    }
    for n in &nodes {
        wait_ready(n).await;
    }
    let shots = std::env::var("WARBLER_SCREENSHOTS").ok();
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/web_test.py"
    ))
    .args(["--http", &nodes[0].http])
    .args(["--ops-token", &token("console", "ops")])
    .args(["--kill-pid", &nodes[2].pid().to_string()])
    .args(["--killed-node", "n2"]);
    if let Some(dir) = &shots {
        cmd.args(["--screenshots", dir]);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "in amy's tab in order",
        "same messages in the same order",
        "after a reload",
        "after n2 was killed arrive in order",
        "console: members [('n0', 'serving'), ('n1', 'serving'), ('n2', 'down')]; 64 partitions",
    ] {
        assert!(stdout.contains(step), "missing step {step:?}:\n{stdout}");
    }
}
