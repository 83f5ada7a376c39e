//! Cluster drivers: real `warbler serve` processes on this machine.
//!
//! Three ways to run them:
//! - [`Net::Netns`] (root, iproute2): every node in its own network namespace with a veth
//!   link to one bridge, at its own address (10.77.T.10+i). Cuts are blackhole routes in
//!   both namespaces, so a cut drops packets the way a broken network does: peer TCP and
//!   gossip UDP alike, while the harness (on the bridge) still reaches every node.
//! - [`Net::Loopback`] (anywhere): nodes on 127.0.0.1 with their own ports; cuts go through
//!   the nodes' fault-injecting transport (`POST /v1/debug/faults`), which drops peer and
//!   gossip traffic to the blocked addresses.
//! - [`Net::Docker`] (a Docker engine and the `warbler:latest` image): one container per
//!   node on a network of its own; kill is `docker kill`, pause `docker pause`, restart
//!   `docker start` (same data volume, same address); cuts are blackhole routes entered into
//!   the container's network namespace (`nsenter`), so they can be partial, which
//!   `docker network disconnect` cannot.
//!
//! Each node can be killed (`kill -9`), paused (SIGSTOP/SIGCONT), stopped gracefully
//! (SIGTERM), restarted on its data, and cut off from any set of the others.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::process::{Child, Command};
use warbler_client::api::ClusterStatus;
use warbler_client::http::NodeHttp;

use crate::auth;
use crate::ports::free_port;

/// How the nodes are networked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Net {
    Loopback,
    Netns,
    /// Containers of the project's image (`warbler:latest`, scripts/docker-image.sh) on a
    /// Docker network of their own.
    Docker,
}

impl Net {
    /// Network namespaces when this process can make them (root and iproute2), else
    /// loopback.
    pub fn auto() -> Net {
        let probe = format!("wchaos-probe-{}", std::process::id());
        let ok = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if ok(&["netns", "add", &probe]) {
            ok(&["netns", "del", &probe]);
            Net::Netns
        } else {
            Net::Loopback
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Net> {
        match s {
            "auto" => Ok(Net::auto()),
            "loopback" => Ok(Net::Loopback),
            "netns" => Ok(Net::Netns),
            "docker" => Ok(Net::Docker),
            other => bail!("--net {other:?}: use auto, loopback, netns or docker"),
        }
    }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub nodes: usize,
    /// Node slots not started at first: `add` starts them (scaling out).
    pub spare: usize,
    pub warbler: PathBuf,
    pub dir: PathBuf,
    pub net: Net,
    /// Extra `WARBLER_*` variables for every node.
    pub env: Vec<(String, String)>,
    /// A StatefulSet: nodes `warbler-<ordinal>`, data kept by ordinal for good.
    pub statefulset: bool,
    /// Zones by ordinal (`zones[i % len]`).
    pub zones: Vec<String>,
}

struct NodeProc {
    name: String,
    data: PathBuf,
    log: PathBuf,
    client: SocketAddr,
    http: SocketAddr,
    cluster: SocketAddr,
    child: Option<Child>,
    paused: bool,
    /// Docker: the container exists (started once).
    created: bool,
    /// A member of the cluster: started, not decommissioned.
    active: bool,
}

/// A running cluster and the faults currently applied to it.
pub struct Cluster {
    opts: ClusterOpts,
    secret: PathBuf,
    /// The cluster key file every node is started with.
    cluster_key: PathBuf,
    tag: u32,
    nodes: Vec<NodeProc>,
    /// Pairs of nodes that cannot reach each other (a < b).
    cuts: BTreeSet<(usize, usize)>,
    network_ready: bool,
}

static NEXT_TAG: AtomicU32 = AtomicU32::new(0);

/// Runs a command to completion; an error names the command and what it printed.
fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Cluster {
    /// Starts every node and waits until all are ready.
    pub async fn start(opts: ClusterOpts) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&opts.dir)
            .with_context(|| format!("cannot create {}", opts.dir.display()))?;
        let secret = opts.dir.join("secret");
        std::fs::write(&secret, auth::SECRET)?;
        // Every run's cluster has a key of its own, as a production cluster would.
        let cluster_key = opts.dir.join("cluster.key");
        let key: String = {
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..48)
                .map(|_| char::from(b"0123456789abcdef"[rng.gen_range(0..16)]))
                .collect()
        };
        std::fs::write(&cluster_key, key)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cluster_key, std::fs::Permissions::from_mode(0o600))?;
        }
        let tag = (std::process::id() * 7 + NEXT_TAG.fetch_add(1, Ordering::Relaxed)) % 200 + 20;
        let nodes = (0..opts.nodes + opts.spare)
            .map(|i| {
                let (client, http, cluster) = match opts.net {
                    Net::Loopback => {
                        let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
                        (a(free_port()), a(free_port()), a(free_port()))
                    }
                    Net::Netns | Net::Docker => {
                        let net = if opts.net == Net::Netns { 77 } else { 78 };
                        let ip = std::net::Ipv4Addr::new(10, net, tag as u8, 10 + i as u8);
                        (
                            SocketAddr::from((ip, 7400)),
                            SocketAddr::from((ip, 7480)),
                            SocketAddr::from((ip, 7410)),
                        )
                    }
                };
                let name = if opts.statefulset {
                    format!("warbler-{i}")
                } else {
                    format!("n{i}")
                };
                let home = opts.dir.join(&name);
                NodeProc {
                    name,
                    data: home.join("data"),
                    log: home.join("node.log"),
                    client,
                    http,
                    cluster,
                    child: None,
                    paused: false,
                    created: false,
                    active: i < opts.nodes,
                }
            })
            .collect();
        let mut c = Cluster {
            opts,
            secret,
            cluster_key,
            tag,
            nodes,
            cuts: BTreeSet::new(),
            network_ready: false,
        };
        match c.opts.net {
            Net::Netns => c.netns_up().context(
                "cannot set up network namespaces (needs root and iproute2); run with --net loopback",
            )?,
            Net::Docker => c.docker_up().context(
                "cannot set up the Docker network (needs a Docker engine and the warbler:latest image from scripts/docker-image.sh); run with --net netns or loopback",
            )?,
            Net::Loopback => {}
        }
        for i in c.active() {
            c.spawn(i)?;
        }
        for i in c.active() {
            c.wait_ready(i, Duration::from_secs(90)).await?;
        }
        Ok(c)
    }

    /// Node slots, members or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The members: started and not decommissioned.
    pub fn active(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].active)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn net(&self) -> Net {
        self.opts.net
    }

    /// The device-protocol address of every node.
    pub fn clients(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.to_string()).collect()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s zone, when the scenario has zones.
    pub fn zone_of(&self, i: usize) -> Option<&str> {
        let z = &self.opts.zones;
        (!z.is_empty()).then(|| z[i % z.len()].as_str())
    }

    /// The run's directory (every node's data is under it).
    pub fn dir(&self) -> &std::path::Path {
        &self.opts.dir
    }

    /// The warbler binary the nodes run.
    pub fn warbler_bin(&self) -> &std::path::Path {
        &self.opts.warbler
    }

    /// The shared JWT secret file (to mint tokens for operator commands).
    pub fn secret(&self) -> &std::path::Path {
        &self.secret
    }

    /// Node `i`'s HTTP address.
    pub fn http_addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].http
    }

    /// StatefulSet: makes ordinals `0..n` run and the rest stopped, as the controller does
    /// for `replicas: n`: a missing ordinal starts on the data it has (none when new), an
    /// ordinal past `n` gets SIGTERM (then `kill -9` after 30 s). Returns the ordinals
    /// started and stopped; does not wait for ready.
    pub async fn set_replicas(&mut self, n: usize) -> anyhow::Result<(Vec<usize>, Vec<usize>)> {
        let (mut started, mut stopped) = (Vec::new(), Vec::new());
        for i in 0..self.nodes.len().min(n) {
            if !self.nodes[i].active || !self.is_up(i) {
                self.spawn(i)?;
                self.nodes[i].active = true;
                started.push(i);
            }
        }
        for i in (n..self.nodes.len()).rev() {
            if self.nodes[i].active {
                self.nodes[i].active = false;
                self.stop(i).await;
                stopped.push(i);
            }
        }
        Ok((started, stopped))
    }

    fn ns(&self, i: usize) -> String {
        format!("wchaos{}-{i}", self.tag)
    }

    fn container(&self, i: usize) -> String {
        format!("wchaos{}-n{i}", self.tag)
    }

    fn docker_net(&self) -> String {
        format!("wchaos{}", self.tag)
    }

    fn docker_up(&mut self) -> anyhow::Result<()> {
        self.docker_down();
        sh(&["docker", "image", "inspect", DOCKER_IMAGE])?;
        sh(&[
            "docker",
            "network",
            "create",
            "--subnet",
            &format!("10.78.{}.0/24", self.tag),
            &self.docker_net(),
        ])?;
        self.network_ready = true;
        Ok(())
    }

    fn docker_down(&mut self) {
        for i in 0..self.nodes.len() {
            let name = self.container(i);
            // Keep the node's log beside its data.
            if let Ok(out) = std::process::Command::new("docker")
                .args(["logs", &name])
                .output()
            {
                let mut log = out.stdout;
                log.extend_from_slice(&out.stderr);
                if !log.is_empty() {
                    let _ = std::fs::write(&self.nodes[i].log, log);
                }
            }
            quiet(&["docker", "rm", "-f", &name]);
        }
        quiet(&["docker", "network", "rm", &self.docker_net()]);
        self.network_ready = false;
    }

    /// The pid of node `i`'s container (its network namespace is /proc/PID/ns/net).
    fn container_pid(&self, i: usize) -> anyhow::Result<String> {
        let out = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{.State.Pid}}", &self.container(i)])
            .output()?;
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        anyhow::ensure!(
            out.status.success() && pid != "0" && !pid.is_empty(),
            "container {} is not running",
            self.container(i)
        );
        Ok(pid)
    }

    /// `ip ARGS` inside node `i`'s network namespace.
    fn ip_in(&self, i: usize, args: &[&str]) -> anyhow::Result<()> {
        match self.opts.net {
            Net::Docker => {
                let pid = self.container_pid(i)?;
                let mut v = vec!["nsenter", "-t", &pid, "-n", "ip"];
                v.extend_from_slice(args);
                sh(&v)
            }
            _ => {
                let ns = self.ns(i);
                let mut v = vec!["ip", "-n", &ns];
                v.extend_from_slice(args);
                sh(&v)
            }
        }
    }

    fn bridge(&self) -> String {
        format!("wchbr{}", self.tag)
    }

    fn netns_up(&mut self) -> anyhow::Result<()> {
        self.netns_down();
        let br = self.bridge();
        let gw = format!("10.77.{}.1", self.tag);
        sh(&["ip", "link", "add", &br, "type", "bridge"])?;
        self.network_ready = true;
        sh(&["ip", "addr", "add", &format!("{gw}/24"), "dev", &br])?;
        sh(&["ip", "link", "set", &br, "up"])?;
        // Where bridged traffic passes iptables (br_netfilter, as with Docker's FORWARD
        // DROP policy), let this bridge's own traffic through.
        if Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
            let _ = sh(&[
                "iptables", "-I", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT",
            ]);
        }
        for i in 0..self.nodes.len() {
            let ns = self.ns(i);
            let veth = format!("wch{}v{i}", self.tag);
            let ip = self.nodes[i].client.ip().to_string();
            sh(&["ip", "netns", "add", &ns])?;
            sh(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            sh(&["ip", "link", "set", &veth, "master", &br, "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn netns_down(&mut self) {
        let br = self.bridge();
        for i in 0..self.nodes.len() {
            quiet(&["ip", "netns", "del", &self.ns(i)]);
        }
        quiet(&[
            "iptables", "-D", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT",
        ]);
        quiet(&["ip", "link", "del", &br]);
        self.network_ready = false;
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        if self.opts.net == Net::Docker {
            return self.docker_spawn(i);
        }
        let seeds: Vec<String> = self.nodes.iter().map(|n| n.cluster.to_string()).collect();
        let n = &self.nodes[i];
        std::fs::create_dir_all(&n.data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .with_context(|| format!("cannot open {}", n.log.display()))?;
        let mut cmd = match self.opts.net {
            Net::Netns => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &self.ns(i)])
                    .arg(&self.opts.warbler);
                c
            }
            _ => Command::new(&self.opts.warbler),
        };
        cmd.arg("serve")
            .args(["--node-id", &n.name])
            .arg("--data-dir")
            .arg(&n.data)
            .args(["--client-addr", &n.client.to_string()])
            .args(["--http-addr", &n.http.to_string()])
            .args(["--cluster-addr", &n.cluster.to_string()])
            .args(["--seeds", &seeds.join(",")])
            .args(["--bootstrap-expect", &self.opts.nodes.to_string()])
            .args(self.zone_of(i).map(|z| ["--zone", z]).into_iter().flatten())
            .arg("--jwt-secret-file")
            .arg(&self.secret)
            .arg("--cluster-key-file")
            .arg(&self.cluster_key)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in self.node_env() {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.opts.warbler.display()))?;
        let n = &mut self.nodes[i];
        n.child = Some(child);
        n.paused = false;
        Ok(())
    }

    fn node_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("WARBLER_FAULT_INJECTION".to_string(), "true".to_string()),
            ("WARBLER_LOG".to_string(), "warn".to_string()),
        ];
        env.extend(self.opts.env.iter().cloned());
        // The harness's own WARBLER_LOG (e.g. info, to see why a run failed) reaches the nodes.
        if let Ok(level) = std::env::var("WARBLER_LOG") {
            env.push(("WARBLER_LOG".to_string(), level));
        }
        env
    }

    /// `docker run` the first time, `docker start` (same volume, same address) after.
    fn docker_spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let name = self.container(i);
        if self.nodes[i].created {
            sh(&["docker", "start", &name])?;
        } else {
            let seeds: Vec<String> = self.nodes.iter().map(|n| n.cluster.to_string()).collect();
            let n = &self.nodes[i];
            std::fs::create_dir_all(&n.data)?;
            let mut args: Vec<String> = [
                "docker",
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                &self.docker_net(),
                "--ip",
                &n.client.ip().to_string(),
                "--user",
                "0",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.push("-v".into());
            args.push(format!("{}:/data", n.data.display()));
            args.push("-v".into());
            args.push(format!("{}:/secret:ro", self.secret.display()));
            args.push("-v".into());
            args.push(format!("{}:/cluster.key:ro", self.cluster_key.display()));
            for (k, v) in self.node_env() {
                args.push("-e".into());
                args.push(format!("{k}={v}"));
            }
            args.push(DOCKER_IMAGE.into());
            for a in [
                "serve",
                "--node-id",
                &n.name,
                "--data-dir",
                "/data",
                "--client-addr",
                &n.client.to_string(),
                "--http-addr",
                &n.http.to_string(),
                "--cluster-addr",
                &n.cluster.to_string(),
                "--seeds",
                &seeds.join(","),
                "--bootstrap-expect",
                &self.opts.nodes.to_string(),
                "--jwt-secret-file",
                "/secret",
                "--cluster-key-file",
                "/cluster.key",
            ] {
                args.push(a.to_string());
            }
            if let Some(z) = self.zone_of(i) {
                args.extend(["--zone".to_string(), z.to_string()]);
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            sh(&refs)?;
            self.nodes[i].created = true;
        }
        self.nodes[i].paused = false;
        Ok(())
    }

    /// Whether node `i`'s process runs (paused counts as running).
    pub fn is_up(&mut self, i: usize) -> bool {
        if self.opts.net == Net::Docker {
            if !self.nodes[i].created {
                return false;
            }
            return std::process::Command::new("docker")
                .args(["inspect", "-f", "{{.State.Running}}", &self.container(i)])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true");
        }
        match self.nodes[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// How node `i`'s process ended ("exit code 1", "killed by signal 9"), or why that is
    /// not known.
    pub fn exit_status(&mut self, i: usize) -> String {
        if self.opts.net == Net::Docker {
            return std::process::Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    "exit code {{.State.ExitCode}}, out of memory: {{.State.OOMKilled}}",
                    &self.container(i),
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|e| format!("unknown (docker inspect: {e})"));
        }
        match self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => describe_exit(status),
            Some(Ok(None)) => "still running".to_string(),
            Some(Err(e)) => format!("unknown ({e})"),
            None => "not started by the harness".to_string(),
        }
    }

    pub fn is_paused(&self, i: usize) -> bool {
        self.nodes[i].paused
    }

    /// `kill -9`.
    pub async fn kill(&mut self, i: usize) {
        if self.opts.net == Net::Docker {
            if self.is_paused(i) {
                quiet(&["docker", "unpause", &self.container(i)]);
            }
            quiet(&["docker", "kill", &self.container(i)]);
        } else if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        self.nodes[i].paused = false;
    }

    /// SIGTERM, then waits up to 30 s for the node to leave (then `kill -9`).
    pub async fn stop(&mut self, i: usize) {
        if self.opts.net == Net::Docker {
            quiet(&["docker", "stop", "-t", "30", &self.container(i)]);
            return;
        }
        if let Some(mut c) = self.nodes[i].child.take() {
            if let Some(pid) = c.id() {
                signal(pid, "-TERM");
            }
            if tokio::time::timeout(Duration::from_secs(30), c.wait())
                .await
                .is_err()
            {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }

    /// Starts node `i` again on its data (after a kill or stop); does not wait for ready.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.is_up(i) {
            return Ok(());
        }
        self.spawn(i)
    }

    pub fn pause(&mut self, i: usize) {
        if self.opts.net == Net::Docker {
            quiet(&["docker", "pause", &self.container(i)]);
            self.nodes[i].paused = true;
        } else if let Some(pid) = self.nodes[i].child.as_ref().and_then(Child::id) {
            signal(pid, "-STOP");
            self.nodes[i].paused = true;
        }
    }

    pub fn resume(&mut self, i: usize) {
        if self.opts.net == Net::Docker {
            if self.nodes[i].paused {
                quiet(&["docker", "unpause", &self.container(i)]);
            }
        } else if let Some(pid) = self.nodes[i].child.as_ref().and_then(Child::id) {
            signal(pid, "-CONT");
        }
        self.nodes[i].paused = false;
    }

    /// Waits until node `i` answers `/readyz` with 200.
    pub async fn wait_ready(&mut self, i: usize, within: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if !self.is_up(i) {
                let how = self.exit_status(i);
                bail!(
                    "node {} exited ({how}); its log is {}",
                    self.nodes[i].name,
                    self.nodes[i].log.display()
                );
            }
            let last = match self.http(i, "GET", "/readyz", "").await {
                Ok((200, _)) => return Ok(()),
                Ok((_, v)) => v.to_string(),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > within {
                bail!(
                    "node {} not ready after {within:?}: {last}; its log is {}",
                    self.nodes[i].name,
                    self.nodes[i].log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Severs every link between a node of `a` and a node of `b`.
    pub async fn cut(&mut self, a: &[usize], b: &[usize]) -> anyhow::Result<()> {
        for &x in a {
            for &y in b {
                if x != y {
                    self.cuts.insert((x.min(y), x.max(y)));
                }
            }
        }
        self.apply_cuts().await
    }

    /// Removes every cut.
    pub async fn heal(&mut self) -> anyhow::Result<()> {
        if self.cuts.is_empty() {
            return Ok(());
        }
        self.cuts.clear();
        self.apply_cuts().await
    }

    async fn apply_cuts(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            let peers: Vec<usize> = self
                .cuts
                .iter()
                .filter_map(|&(a, b)| {
                    if a == i {
                        Some(b)
                    } else if b == i {
                        Some(a)
                    } else {
                        None
                    }
                })
                .collect();
            match self.opts.net {
                Net::Netns | Net::Docker => {
                    if !self.is_up(i) {
                        continue;
                    }
                    // Rebuild this namespace's blackholes from the cut set.
                    let _ = self.ip_in(i, &["route", "flush", "type", "blackhole"]);
                    for p in peers {
                        let ip = format!("{}/32", self.nodes[p].cluster.ip());
                        self.ip_in(i, &["route", "add", "blackhole", &ip])?;
                    }
                }
                Net::Loopback => {
                    let addrs: Vec<String> = peers
                        .iter()
                        .map(|p| self.nodes[*p].cluster.to_string())
                        .collect();
                    let body = serde_json::json!({ "block": addrs }).to_string();
                    if self.is_up(i) && !self.is_paused(i) {
                        let (s, v) = self.http(i, "POST", "/v1/debug/faults", &body).await?;
                        if s != 200 {
                            bail!("node {} refused the fault switch: {v}", self.nodes[i].name);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `GET /v1/cluster?user=` from the first node that answers: the index of the node that
    /// leads `user`'s partition, if one does.
    pub async fn leader_of(&mut self, user: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if !self.is_up(i) || self.is_paused(i) {
                continue;
            }
            let path = format!("/v1/cluster?user={user}");
            if let Ok(v) = self.api(i).get::<ClusterStatus>(&path).await {
                let leader = v.user?.leader?;
                return self.nodes.iter().position(|n| n.name == leader);
            }
        }
        None
    }

    /// A request to node `i`'s HTTP API with an admin token; 2 s timeout.
    pub async fn http(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(u16, Value)> {
        let token = auth::token("chaos", "admin");
        let answer = self.api(i).send(method, path, Some(&token), body).await?;
        Ok((answer.status, answer.json()))
    }

    /// Node `i`'s HTTP API (2 s timeout).
    pub fn api(&self, i: usize) -> NodeHttp {
        NodeHttp::with_timeout(self.nodes[i].http.to_string(), Duration::from_secs(2))
            .with_token(auth::token("chaos", "ops"))
    }

    /// Heals everything: resumes paused nodes, starts stopped members, removes cuts, and
    /// waits until every member is ready.
    pub async fn heal_all(&mut self, within: Duration) -> anyhow::Result<()> {
        for i in self.active() {
            if self.is_paused(i) {
                self.resume(i);
            }
            self.restart(i)?;
        }
        self.heal().await?;
        for i in self.active() {
            self.wait_ready(i, within).await?;
        }
        Ok(())
    }

    /// Scales out: starts a node slot that is not a member, on an empty data directory (it
    /// joins the running cluster), and waits until it is ready (its partitions moved in).
    pub async fn add(&mut self, within: Duration) -> anyhow::Result<usize> {
        let Some(i) = (0..self.nodes.len()).find(|&i| !self.nodes[i].active) else {
            bail!("no spare node slot to add: raise cluster.spare_nodes in the scenario");
        };
        self.kill(i).await;
        // A StatefulSet's ordinal comes back on the volume it left with.
        if !self.opts.statefulset {
            if self.opts.net == Net::Docker && self.nodes[i].created {
                quiet(&["docker", "rm", "-f", &self.container(i)]);
                self.nodes[i].created = false;
            }
            let data = self.nodes[i].data.clone();
            if data.exists() {
                std::fs::remove_dir_all(&data)
                    .with_context(|| format!("cannot empty {}", data.display()))?;
            }
        }
        self.spawn(i)?;
        self.nodes[i].active = true;
        self.wait_ready(i, within).await?;
        Ok(i)
    }

    /// Scales in: asks another member to decommission node `i`, waits until `i` holds no
    /// replica, then stops it.
    pub async fn decommission(&mut self, i: usize, within: Duration) -> anyhow::Result<()> {
        let name = self.nodes[i].name.clone();
        let body = serde_json::json!({ "node": name }).to_string();
        let start = Instant::now();
        loop {
            let via = self
                .active()
                .into_iter()
                .find(|&j| j != i && self.is_up(j) && !self.is_paused(j))
                .ok_or_else(|| anyhow::anyhow!("no other member to decommission {name} through"))?;
            let last = match self
                .http(via, "POST", "/v1/cluster/decommission", &body)
                .await
            {
                Ok((200, _)) => break,
                Ok((_, v)) => v.to_string(),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > within {
                bail!("cannot decommission {name}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        loop {
            let last = match self.api(i).cluster_status().await {
                Ok(v) if v.replicas_held == Some(0) && v.decommissioned => break,
                Ok(v) => format!("replicas_held {:?}", v.replicas_held),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > within {
                bail!("{name} still holds replicas {within:?} after its decommission: {last}; its log is {}", self.nodes[i].log.display());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.nodes[i].active = false;
        self.stop(i).await;
        Ok(())
    }

    /// Kills every node and removes the network namespaces.
    pub async fn shutdown(&mut self) {
        for i in 0..self.nodes.len() {
            self.resume(i);
            self.kill(i).await;
        }
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.network_ready {
            match self.opts.net {
                Net::Docker => self.docker_down(),
                _ => self.netns_down(),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                if let Some(pid) = c.id() {
                    signal(pid, "-CONT");
                }
                let _ = c.start_kill();
            }
        }
        self.teardown();
    }
}

/// The image the Docker driver runs (scripts/docker-image.sh builds it).
pub const DOCKER_IMAGE: &str = "warbler:latest";

/// Runs a command, ignoring how it ends.
fn quiet(args: &[&str]) {
    let _ = std::process::Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// "exit code N" or "killed by signal N (SIGKILL: the kernel's OOM killer, or a kill -9)".
fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(9)) => {
            "killed by signal 9 (SIGKILL: a kill -9, or the kernel's OOM killer; see dmesg)"
                .to_string()
        }
        (None, Some(sig)) => format!(
            "killed by signal {sig}{}",
            if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            }
        ),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::describe_exit;

    fn ended(script: &str) -> String {
        let status = std::process::Command::new("sh")
            .args(["-c", script])
            .status()
            .expect("sh runs");
        describe_exit(status)
    }

    #[test]
    fn a_nodes_end_is_told_by_its_exit_code_or_signal() {
        assert_eq!(ended("exit 3"), "exit code 3");
        assert!(ended("kill -9 $$").starts_with("killed by signal 9 (SIGKILL"));
        assert_eq!(ended("kill -TERM $$"), "killed by signal 15");
    }
}
