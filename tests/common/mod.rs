//! Test harness: starts real `warbler serve` processes on port 0 and talks to them over
//! their documented interfaces only (device protocol, HTTP).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use warbler_client::api::ClusterStatus;
use warbler_client::http::NodeHttp;
use warbler_client::{ConnectOptions, Connection};

pub const SECRET: &str = "test-secret-0123456789abcdef";

pub struct Node {
    child: Child,
    pub dir: PathBuf,
    pub client: String,
    pub http: String,
    extra_env: Vec<(String, String)>,
    extra_args: Vec<String>,
}

impl Node {
    /// Starts a node with its data in `dir`.
    pub fn start(dir: &Path) -> Node {
        Self::start_with(dir, &[], &[])
    }

    pub fn start_with(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("secret"), SECRET).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::spawn(dir, env, args)
    }

    fn spawn(dir: &Path, extra_env: Vec<(String, String)>, extra_args: Vec<String>) -> Node {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_warbler"));
        cmd.arg("serve");
        if !extra_args.iter().any(|a| a == "--node-id") {
            cmd.args(["--node-id", "test-node"]);
        }
        cmd.args(["--client-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .arg("--jwt-secret-file")
            .arg(dir.join("secret"))
            .args(&extra_args)
            .env("WARBLER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in &extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning warbler");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("warbler ready") => break line,
                Some(Ok(_)) => continue,
                _ => panic!("warbler exited before it was ready"),
            }
        };
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let field = |name: &str| {
            ready
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap()
                .to_string()
        };
        Node {
            child,
            dir: dir.to_path_buf(),
            client: field("client"),
            http: field("http"),
            extra_env,
            extra_args,
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the same data directory (new ports).
    pub fn restart(&mut self) {
        self.kill9();
        let fresh = Self::spawn(
            &self.dir.clone(),
            self.extra_env.clone(),
            self.extra_args.clone(),
        );
        *self = fresh;
    }

    /// SIGSTOP / SIGCONT: the process freezes, its sockets stay open.
    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process ended, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub async fn device(&self, user: &str, device: &str) -> Connection {
        Connection::connect(ConnectOptions::new(
            &self.client,
            token(user, "device"),
            device,
        ))
        .await
        .unwrap_or_else(|e| panic!("device {user}/{device} could not connect: {e}"))
    }

    pub async fn publisher(&self) -> Connection {
        Connection::connect(ConnectOptions::new(
            &self.client,
            token("backend", "publish"),
            "pub",
        ))
        .await
        .expect("publisher connects")
    }

    /// POST /v1/users/{user}/messages; returns the seq.
    pub async fn publish(&self, user: &str, id: &str, body: &str) -> u64 {
        let body = serde_json::json!({"id": id, "body": body}).to_string();
        let (status, v) = self
            .http(
                "POST",
                &format!("/v1/users/{user}/messages"),
                Some(&token("backend", "publish")),
                &body,
            )
            .await;
        assert_eq!(status, 200, "publish failed: {v}");
        v["seq"].as_u64().unwrap()
    }

    /// The whole retained history of `user` (admin token), as (seq, id, body).
    pub async fn history(&self, user: &str) -> Vec<(u64, String, String)> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let path = format!("/v1/users/{user}/messages?after={after}&limit=1000");
            let (status, v) = self
                .http("GET", &path, Some(&token("ops", "admin")), "")
                .await;
            assert_eq!(status, 200, "history failed: {v}");
            let page = v["messages"].as_array().unwrap();
            if page.is_empty() {
                return out;
            }
            for m in page {
                let seq = m["seq"].as_u64().unwrap();
                out.push((
                    seq,
                    m["id"].as_str().unwrap().to_string(),
                    m["body"].as_str().unwrap_or("").to_string(),
                ));
                after = seq;
            }
        }
    }

    /// `GET /v1/cluster`, typed; `None` when the node does not answer 200.
    pub async fn status(&self) -> Option<ClusterStatus> {
        NodeHttp::new(&self.http)
            .with_token(token("ops", "ops"))
            .cluster_status()
            .await
            .ok()
    }

    /// A request to the node's HTTP API; returns status and JSON body.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, Value) {
        let (status, text) = http_raw(&self.http, method, path, token, body.as_bytes()).await;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        self.kill9();
    }
}

/// A request to the node whose HTTP API is at `addr`; returns status and body text.
pub async fn http_raw(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let answer = NodeHttp::new(addr)
        .send(method, path, token, body.to_vec())
        .await
        .expect("HTTP request");
    (answer.status, answer.body)
}

/// Like [`http_raw`] with no token and no body, but `None` when the node does not answer
/// (a stopping node may have closed its port).
pub async fn http_raw_opt(addr: &str, method: &str, path: &str) -> (Option<u16>, String) {
    match NodeHttp::new(addr)
        .send(method, path, None, Vec::new())
        .await
    {
        Ok(answer) => (Some(answer.status), answer.body),
        Err(e) => (None, e.to_string()),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with the test secret.
pub fn token(user: &str, scope: &str) -> String {
    token_exp(user, scope, now_secs() + 3600)
}

pub fn token_exp(user: &str, scope: &str, exp: u64) -> String {
    let claims = warbler_client::auth::Claims {
        exp,
        ..warbler_client::auth::Claims::new(user, scope, 0)
    };
    warbler_client::auth::mint(SECRET.as_bytes(), &claims)
}

pub fn expired_token(user: &str) -> String {
    token_exp(user, "device", now_secs() - 3600)
}

/// Receives exactly `n` messages, acking none.
pub async fn recv_n(conn: &mut Connection, n: usize) -> Vec<warbler_client::Delivery> {
    receive(conn, n, false).await
}

/// A seed from WARBLER_TEST_SEED or the clock; printed so a run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("WARBLER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{test}: seed {seed} (replay with WARBLER_TEST_SEED={seed})");
    seed
}

/// Receives exactly `n` messages, acking each (a device that never acks stops receiving
/// after the in-flight window).
pub async fn recv_n_acking(conn: &mut Connection, n: usize) -> Vec<warbler_client::Delivery> {
    receive(conn, n, true).await
}

async fn receive(conn: &mut Connection, n: usize, ack: bool) -> Vec<warbler_client::Delivery> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(20), conn.recv_msg())
            .await
            .expect("message within 20 s")
            .expect("a message");
        if ack {
            conn.ack(m.seq).await.expect("ack");
        }
        out.push(m);
    }
    out
}

/// Mounts a tmpfs of `mib` MiB at `dir` (root only); `None` with the reason otherwise.
pub fn mount_tmpfs(dir: &Path, mib: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(())
}

pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Free bytes of the file system holding `dir`.
pub fn warbler_free_bytes(dir: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df prints the free bytes")
}
