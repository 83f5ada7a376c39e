//! The load driver against each real system it compares: a short open-loop run over two
//! worker processes must acknowledge what it offered, deliver every message to both devices
//! of its user in order, and merge the workers' figures. `scripts/test.sh` installs
//! nats-server and mosquitto from Debian's packages.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use warbler_chaos::ports::free_port;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(addr: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < until, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn program(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run `apt-get install {name}` (scripts/test.sh does)");
}

/// The `warbler` binary, built beside this test by `cargo test --workspace`.
fn warbler_bin() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    deps.parent().unwrap().parent().unwrap().join("warbler")
}

/// Runs `warbler-load run` with `args` and returns its JSON result.
fn load(dir: &Path, system: &str, addr: &str, args: &[&str]) -> Value {
    let out = dir.join(format!("{system}.jsonl"));
    let status = Command::new(env!("CARGO_BIN_EXE_warbler-load"))
        .args(["run", "--system", system, "--addr", addr])
        .args([
            "--users",
            "20",
            "--devices",
            "2",
            "--publishers",
            "2",
            "--procs",
            "2",
        ])
        .args(["--rate", "400", "--duration-secs", "2", "--label", system])
        .arg("--json-out")
        .arg(&out)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "warbler-load failed against {system}");
    let text = std::fs::read_to_string(&out).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

fn check(r: &Value) {
    let n = |k: &str| r[k].as_u64().unwrap();
    // 400/s for 2 s: 800 due, the last few may fall past the deadline.
    assert!((780..=800).contains(&n("published")), "{r}");
    assert_eq!(n("errors"), 0, "{r}");
    assert_eq!(n("order_violations"), 0, "{r}");
    assert_eq!(n("gaps"), 0, "{r}");
    assert_eq!(
        n("delivered"),
        2 * n("published"),
        "every message reaches both devices: {r}"
    );
    let p50 = r["deliver_ms"]["p50"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 < 2_000.0, "{r}");
    assert!(r["ack_ms"]["max"].as_f64().unwrap() >= r["ack_ms"]["p50"].as_f64().unwrap());
}

#[test]
fn drives_warbler() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "load-test-secret-0123456789").unwrap();
    let mut child = Command::new(warbler_bin())
        .args([
            "serve",
            "--node-id",
            "load-test",
            "--client-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--jwt-secret-file")
        .arg(dir.path().join("secret"))
        .env("WARBLER_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the warbler binary is built by cargo test --workspace");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .find_map(|l| l.ok().filter(|l| l.starts_with("warbler ready")))
        .expect("warbler started");
    std::thread::spawn(move || for _ in lines {});
    let _server = Server(child);
    let addr = ready
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("client="))
        .unwrap()
        .to_string();
    let secret = dir.path().join("secret");
    let r = load(
        dir.path(),
        "warbler",
        &addr,
        &["--jwt-secret-file", secret.to_str().unwrap()],
    );
    check(&r);
}

/// Starts a peer server listening on `port`, drives it with `system` and checks the run.
fn drive_peer(dir: &Path, system: &str, mut server: Command, port: u16) {
    let _server = Server(
        server
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_listening(&addr);
    check(&load(dir, system, &addr, &[]));
}

#[test]
fn drives_nats_jetstream() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = Command::new(program("nats-server"));
    server
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path().join("js"));
    drive_peer(dir.path(), "nats", server, port);
}

#[test]
fn drives_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\npersistence_location {}/\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut server = Command::new(program("mosquitto"));
    server.arg("-c").arg(&conf);
    drive_peer(dir.path(), "mqtt", server, port);
}
