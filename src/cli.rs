//! Client-side commands (`token`, `send`, `listen`) and the development node (`dev`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use rand::RngCore;
use warbler_client::{ConnectOptions, Connection};
use warbler_config::Config;

use crate::auth::{now_ms_id, Auth, Claims};
use warbler_client::api::Decommissioned;
use warbler_client::http::NodeHttp;

/// Where `dev` keeps its generated secret, inside the data directory.
const DEV_SECRET_FILE: &str = "dev-secret";

#[derive(Args)]
pub struct DevArgs {
    /// Nodes to start (1-9). Above 1, each node is a separate `warbler serve` process with
    /// its own data directory (DIR/node-N), ports counting up from the given ones.
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Data directory (the secret is generated into it on first start).
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Device protocol address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    client_addr: String,
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:7480")]
    http_addr: String,
}

#[derive(Args)]
pub struct TokenArgs {
    /// File holding the HS256 secret.
    #[arg(
        long,
        value_name = "FILE",
        env = "WARBLER_JWT_SECRET_FILE",
        default_value = "./data/dev-secret"
    )]
    jwt_secret_file: PathBuf,
    /// The user (the token's subject).
    #[arg(long)]
    user: String,
    /// What the token allows: device, publish, ops or admin (several: "device,publish").
    #[arg(long, default_value = "device")]
    scope: String,
    /// Restrict the token to one device id.
    #[arg(long)]
    device: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl_secs: u64,
    /// Name this key id in the token's header: the name of the secret's file in the nodes'
    /// --jwt-keys-dir.
    #[arg(long)]
    kid: Option<String>,
}

/// How a client command reaches and authenticates to a node.
#[derive(Args, Clone)]
pub struct ConnArgs {
    /// The node's client (device protocol) address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    /// A ready token; without it one is minted from --jwt-secret-file.
    #[arg(long, env = "WARBLER_TOKEN")]
    token: Option<String>,
    /// The secret to mint a token from (the dev node's by default).
    #[arg(
        long,
        value_name = "FILE",
        env = "WARBLER_JWT_SECRET_FILE",
        default_value = "./data/dev-secret"
    )]
    jwt_secret_file: PathBuf,
    /// Trust this CA (PEM) and connect with TLS.
    #[arg(long, value_name = "FILE")]
    tls_ca_file: Option<PathBuf>,
    /// The server name to check in its certificate (with --tls-ca-file).
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The recipient user.
    #[arg(long)]
    to: String,
    /// Message id for idempotent retries (generated when omitted).
    #[arg(long)]
    id: Option<String>,
    /// Who publishes (the minted token's subject).
    #[arg(long, default_value = "cli")]
    from: String,
    /// The message text.
    body: String,
}

#[derive(Args)]
pub struct ListenArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The user to receive for.
    #[arg(long)]
    user: String,
    /// This device's id (each device has its own cursor).
    #[arg(long, default_value = "cli")]
    device: String,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let auth = Auth::from_file(&args.jwt_secret_file).map_err(anyhow::Error::msg)?;
    for s in args.scope.split([',', ' ']).filter(|s| !s.is_empty()) {
        if !matches!(s, "device" | "publish" | "ops" | "admin") {
            bail!(
                "unknown scope {s:?}: use device, publish, ops or admin (comma-separated for several)"
            );
        }
    }
    crate::gateway::conn::check_id("--user", &args.user).map_err(anyhow::Error::msg)?;
    let claims = Claims {
        device: args.device,
        ..Claims::new(&args.user, &args.scope.replace(',', " "), args.ttl_secs)
    };
    println!("{}", auth.mint_with_kid(&claims, args.kid.as_deref()));
    Ok(())
}

fn options(
    conn: &ConnArgs,
    user: &str,
    scope: &str,
    device: &str,
) -> anyhow::Result<ConnectOptions> {
    let token = match &conn.token {
        Some(t) => t.clone(),
        None => {
            let auth = Auth::from_file(&conn.jwt_secret_file).map_err(|e| {
                anyhow::anyhow!(
                    "{e}\n(pass --token, or --jwt-secret-file of the node you connect to)"
                )
            })?;
            auth.mint(&Claims::new(user, scope, 3600))
        }
    };
    let mut opts = ConnectOptions::new(conn.addr.clone(), token, device);
    if let Some(ca) = &conn.tls_ca_file {
        let ca_pem = std::fs::read(ca)
            .with_context(|| format!("cannot read --tls-ca-file {}", ca.display()))?;
        opts = opts.with_tls(warbler_client::TlsOptions {
            server_name: conn.tls_server_name.clone(),
            ca_pem,
        });
    }
    Ok(opts)
}

pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    let opts = options(&args.conn, &args.from, "publish", "cli-send")?;
    let mut conn = Connection::connect(opts)
        .await
        .with_context(|| format!("cannot connect to {}", args.conn.addr))?;
    let id = args.id.unwrap_or_else(now_ms_id);
    let seq = conn
        .publish_wait(&id, &args.to, args.body.as_bytes())
        .await?;
    println!("published id={id} to={} seq={seq}", args.to);
    Ok(())
}

pub async fn listen(args: ListenArgs) -> anyhow::Result<()> {
    let opts = options(&args.conn, &args.user, "device", &args.device)?;
    let mut conn = Connection::connect(opts)
        .await
        .with_context(|| format!("cannot connect to {}", args.conn.addr))?;
    eprintln!(
        "listening as user={} device={} on node {} (acked up to {})",
        conn.user, conn.device, conn.node, conn.acked
    );
    let mut received = 0;
    let mut stdout = std::io::stdout();
    while args.count.is_none_or(|c| received < c) {
        let m = conn.recv_msg().await?;
        let body = String::from_utf8_lossy(&m.body);
        writeln!(
            stdout,
            "seq={} id={} from={} {}",
            m.seq,
            m.id,
            m.from.as_deref().unwrap_or("-"),
            body
        )?;
        stdout.flush()?;
        conn.ack(m.seq).await?;
        received += 1;
    }
    Ok(())
}

/// Creates the dev secret on first start (kept, so minted tokens stay valid).
fn dev_secret(dir: &Path) -> anyhow::Result<PathBuf> {
    dev_random_file(dir, DEV_SECRET_FILE)
}

/// Creates `dir/name` holding 32 random bytes in hex, readable by its owner only, unless
/// it exists.
fn dev_random_file(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let path = dir.join(name);
    if !path.exists() {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, hex.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(path)
}

pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    if !(1..=9).contains(&args.nodes) {
        bail!(
            "--nodes {}: choose 1 to 9 local nodes (ports count up from --client-addr and --http-addr)",
            args.nodes
        );
    }
    if args.nodes > 1 {
        return dev_cluster(args).await;
    }
    let mut config = Config {
        data_dir: args.data_dir.clone(),
        ..Config::default()
    };
    config
        .set("client_addr", &args.client_addr)
        .map_err(|e| anyhow::anyhow!("--client-addr: {e}"))?;
    config
        .set("http_addr", &args.http_addr)
        .map_err(|e| anyhow::anyhow!("--http-addr: {e}"))?;
    config.apply_env(std::env::vars())?;
    let secret = dev_secret(&config.data_dir)?;
    config.jwt_secret_file = Some(secret.clone());
    config.demo = true;
    config.validate()?;
    let auth = Auth::from_file(&secret).map_err(anyhow::Error::msg)?;
    let web = web_lines(&auth, &config.http_addr.to_string());
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "warbler".into());
    let d = config.data_dir.display();
    eprintln!(
        "\nWarbler dev node \"{node}\": data in {d}, secret in {secret}\n\
         \n  device protocol  tcp://{client}\n  HTTP API         http://{http}   (WebSocket: ws://{http}/v1/ws)\n\
         \nTry it from another terminal in this directory:\n\
         \n  {exe} listen --user alice\
         \n  {exe} send --to alice \"hello\"\
         \n  TOKEN=$({exe} token --user backend --scope publish)\
         \n  curl -s -H \"Authorization: Bearer $TOKEN\" -d '{{\"id\":\"m1\",\"body\":\"hi\"}}' http://{http}/v1/users/alice/messages\n\n{web}",
        node = config.node_id,
        secret = secret.display(),
        client = config.client_addr,
        http = config.http_addr,
    );
    crate::serve(config, auth).await
}

fn port_plus(addr: &str, flag: &str, n: u32) -> anyhow::Result<std::net::SocketAddr> {
    let a: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag} {addr:?}: expected IP:PORT, e.g. 127.0.0.1:7400"))?;
    Ok(std::net::SocketAddr::new(a.ip(), a.port() + n as u16))
}

/// Where a dev node's pages are: the demo chat, and the console with an ops token in the
/// URL's fragment (which browsers do not send to the server).
fn web_lines(auth: &Auth, http: &str) -> String {
    let ops = auth.mint(&Claims::new("dev-console", "ops", 7 * 24 * 3600));
    format!(
        "In a browser:\n\n  demo chat   http://{http}/demo/   (two tabs, two names; a reload resumes)\n  console     http://{http}/console/#token={ops}\n"
    )
}

/// Starts node `i` of a dev cluster and waits until it is ready; returns the process and a
/// line saying where it listens.
async fn dev_node(
    args: &DevArgs,
    exe: &Path,
    secret: &Path,
    cluster_key: &Path,
    seed: std::net::SocketAddr,
    i: u32,
) -> anyhow::Result<(tokio::process::Child, String)> {
    use tokio::io::AsyncBufReadExt;
    let name = format!("node-{i}");
    let client = port_plus(&args.client_addr, "--client-addr", i)?;
    let http = port_plus(&args.http_addr, "--http-addr", i)?;
    let cluster = port_plus(&args.client_addr, "--client-addr", 10 + i)?;
    let mut child = tokio::process::Command::new(exe)
        .arg("serve")
        .args(["--node-id", &name])
        .arg("--data-dir")
        .arg(args.data_dir.join(&name))
        .args(["--client-addr", &client.to_string()])
        .args(["--http-addr", &http.to_string()])
        .args(["--cluster-addr", &cluster.to_string()])
        .args(["--seeds", &seed.to_string()])
        .args(["--bootstrap-expect", &args.nodes.to_string()])
        .arg("--jwt-secret-file")
        .arg(secret)
        .arg("--cluster-key-file")
        .arg(cluster_key)
        .env("WARBLER_DEMO", "true")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    loop {
        match out.next_line().await? {
            Some(l) if l.starts_with("warbler ready") => break,
            Some(_) => continue,
            None => bail!("{name} exited before it was ready; see its log above"),
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    let line = format!("  {name}  device tcp://{client}  HTTP http://{http}  cluster {cluster}");
    Ok((child, line))
}

/// `dev --nodes N`: N `warbler serve` processes on this machine forming one cluster.
async fn dev_cluster(args: DevArgs) -> anyhow::Result<()> {
    let secret = dev_secret(&args.data_dir)?;
    let cluster_key = dev_random_file(&args.data_dir, "cluster.key")?;
    let exe = std::env::current_exe().context("cannot find the warbler executable")?;
    let seed = port_plus(&args.client_addr, "--client-addr", 10)?;
    let mut children = Vec::new();
    let mut lines = Vec::new();
    for i in 0..args.nodes {
        let (child, line) = dev_node(&args, &exe, &secret, &cluster_key, seed, i).await?;
        children.push(child);
        lines.push(line);
    }
    let http0 = port_plus(&args.http_addr, "--http-addr", 0)?;
    let e = exe.display();
    eprintln!(
        "\nWarbler dev cluster of {n} nodes (separate processes), data in {d}/node-*, secret in {s}\n\n{nodes}\n\
         \nAny node takes devices and publishes. Try it from another terminal in this directory:\n\
         \n  {e} cluster status --http {http0}\
         \n  {e} listen --user alice --addr {c1}\
         \n  {e} send --to alice \"hello\" --addr {c0}\n\
         \n{web}\nCtrl-C stops all nodes.\n",
        web = web_lines(&Auth::from_file(&secret).map_err(anyhow::Error::msg)?, &http0.to_string()),
        n = args.nodes,
        d = args.data_dir.display(),
        s = secret.display(),
        nodes = lines.join("\n"),
        c0 = port_plus(&args.client_addr, "--client-addr", 0)?,
        c1 = port_plus(&args.client_addr, "--client-addr", 1)?,
    );
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut exited = Box::pin(futures::future::select_all(
        children.iter_mut().map(|c| Box::pin(c.wait())),
    ));
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        (status, i, _) = &mut exited => {
            eprintln!("node-{i} exited ({status:?}); stopping the others");
        }
    }
    drop(exited);
    for c in &children {
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for c in &mut children {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), c.wait()).await;
    }
    Ok(())
}

#[derive(Args)]
pub struct ClusterStatusArgs {
    #[command(flatten)]
    ops: OpsArgs,
    /// Print the raw JSON of GET /v1/cluster.
    #[arg(long)]
    json: bool,
}

/// How the operator commands reach the cluster.
#[derive(Args)]
pub struct OpsArgs {
    /// A node's HTTP address (`https://HOST:PORT` when the nodes serve HTTP over TLS).
    #[arg(long, default_value = "127.0.0.1:7480")]
    http: String,
    /// Trust this CA (PEM) for an `https://` address.
    #[arg(long, value_name = "FILE")]
    tls_ca_file: Option<PathBuf>,
    /// A token of the scope the command needs (ops; admin for backup and restore);
    /// without it one is minted from --jwt-secret-file.
    #[arg(long, env = "WARBLER_TOKEN")]
    token: Option<String>,
    /// The secret to mint an ops token from (the dev cluster's by default).
    #[arg(
        long,
        value_name = "FILE",
        env = "WARBLER_JWT_SECRET_FILE",
        default_value = "./data/dev-secret"
    )]
    jwt_secret_file: PathBuf,
}

/// A connection to the cluster's HTTP API with an ops token.
pub struct Ops {
    /// The node given with --http.
    pub node: NodeHttp,
    pub token: String,
    /// `https://` when the nodes serve HTTP over TLS.
    pub scheme: &'static str,
    ca_pem: Option<Vec<u8>>,
}

impl OpsArgs {
    /// With an `ops` token (given, or minted from the secret).
    pub fn connect(&self) -> anyhow::Result<Ops> {
        self.connect_as("ops")
    }

    /// With a token of `scope` (given, or minted from the secret).
    pub fn connect_as(&self, scope: &str) -> anyhow::Result<Ops> {
        let token = scoped_token(&self.token, &self.jwt_secret_file, scope)?;
        let ca_pem = match &self.tls_ca_file {
            Some(f) => Some(
                std::fs::read(f)
                    .with_context(|| format!("cannot read --tls-ca-file {}", f.display()))?,
            ),
            None => None,
        };
        let scheme = if self.http.starts_with("https://") {
            "https://"
        } else {
            ""
        };
        let mut ops = Ops {
            node: NodeHttp::new(&self.http),
            token,
            scheme,
            ca_pem,
        };
        ops.node = ops.client(&self.http)?;
        Ok(ops)
    }
}

impl Ops {
    /// A client for the node at `http` (`HOST:PORT`, or with its scheme) with the token.
    pub fn client(&self, http: &str) -> anyhow::Result<NodeHttp> {
        let http = if http.contains("://") {
            http.to_string()
        } else {
            format!("{}{http}", self.scheme)
        };
        // Long enough for a partition's backup.
        let node = NodeHttp::with_timeout(http, std::time::Duration::from_secs(60))
            .with_token(&self.token);
        Ok(match &self.ca_pem {
            Some(pem) => node.with_ca_pem(pem)?,
            None => node,
        })
    }
}

/// The given token, or a token of `scope` minted from `secret`.
fn scoped_token(token: &Option<String>, secret: &Path, scope: &str) -> anyhow::Result<String> {
    if let Some(t) = token {
        return Ok(t.clone());
    }
    let auth = Auth::from_file(secret).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n(pass --token with an {scope} token, or --jwt-secret-file of the cluster)"
        )
    })?;
    Ok(auth.mint(&Claims::new("operator", scope, 3600)))
}

/// `warbler cluster status`: members, their state, partitions with replicas and leaders.
pub async fn cluster_status(args: ClusterStatusArgs) -> anyhow::Result<()> {
    let ops = args.ops.connect()?;
    let node = &ops.node;
    if args.json {
        let answer = node
            .send("GET", "/v1/cluster", Some(&ops.token), Vec::new())
            .await?;
        println!("{}", answer.body);
        return Ok(());
    }
    let v = node.cluster_status().await?;
    if let Some(id) = &v.cluster_id {
        println!("cluster {id}");
    }
    println!("MEMBER            STATE      ZONE         CLIENT                 HTTP                   CLUSTER");
    for m in &v.members {
        let s = |a: &Option<String>| a.clone().unwrap_or_else(|| "-".into());
        println!(
            "{:<17} {:<10} {:<12} {:<22} {:<22} {}",
            m.node,
            m.state.to_string(),
            s(&m.zone),
            s(&m.client_addr),
            s(&m.http_addr),
            s(&m.cluster_addr)
        );
    }
    let mut led: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut leaderless = Vec::new();
    for p in &v.partitions {
        match &p.leader {
            Some(l) => *led.entry(l.as_str()).or_default() += 1,
            None => leaderless.push(p.partition.to_string()),
        }
    }
    let rf = v
        .replication_factor
        .map(|r| r.to_string())
        .unwrap_or("-".into());
    println!(
        "\npartitions: {}  replication factor: {rf}",
        v.partition_count
    );
    for (node, n) in &led {
        println!("  {node} leads {n}");
    }
    if !leaderless.is_empty() {
        println!(
            "  without a leader (election running or no quorum): {}",
            leaderless.join(" ")
        );
    }
    println!("\nPARTITION  LEADER            REPLICAS");
    for p in &v.partitions {
        println!(
            "{:<10} {:<17} {}",
            p.partition,
            p.leader.as_deref().unwrap_or("-"),
            p.replicas.join(",")
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct DecommissionArgs {
    /// The member to remove (its node id).
    node: String,
    #[command(flatten)]
    ops: OpsArgs,
    /// Return once the member list changed, without waiting for the partitions to move.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting for the partitions to move after this many seconds.
    #[arg(long, default_value_t = 600)]
    wait_secs: u64,
}

/// `warbler cluster decommission NODE`: removes a member; waits until it holds no replica.
pub async fn cluster_decommission(args: DecommissionArgs) -> anyhow::Result<()> {
    let ops = args.ops.connect()?;
    let status = ops.node.cluster_status().await?;
    let target_http = status.member(&args.node).and_then(|m| m.http_addr.clone());
    let body = serde_json::json!({ "node": args.node });
    let _: Decommissioned = ops
        .node
        .post("/v1/cluster/decommission", &ops.token, &body)
        .await
        .with_context(|| format!("decommissioning {} failed", args.node))?;
    println!(
        "{} removed from the member list; its partitions move to the other nodes",
        args.node
    );
    if args.no_wait {
        return Ok(());
    }
    let Some(target) = target_http else {
        println!(
            "{} is not reachable from here: cannot watch its partitions move",
            args.node
        );
        return Ok(());
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.wait_secs);
    let mut last = None;
    loop {
        if let Ok(v) = ops.client(&target)?.cluster_status().await {
            let held = v.replicas_held;
            if held == Some(0) && v.decommissioned {
                println!("{} holds no replica and has left: stop it now", args.node);
                return Ok(());
            }
            if held != last {
                println!("{} still holds {} replicas", args.node, held.unwrap_or(0));
                last = held;
            }
        } else {
            println!(
                "{} stopped answering on {target}; check `warbler cluster status`",
                args.node
            );
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "{} still holds replicas after {} s; see `warbler cluster status` and the nodes' logs",
                args.node,
                args.wait_secs
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[derive(Args)]
pub struct ScaleArgs {
    /// The number of nodes to end with (at least the replication factor).
    #[arg(long)]
    to: usize,
    /// The command that resizes the node set, run with `sh -c` once per step; `{n}` is
    /// replaced by the new number of nodes (e.g. "kubectl scale statefulset warbler
    /// --replicas={n}").
    #[arg(long)]
    run: String,
    /// --http: a node that stays (the lowest ordinal's: it is never removed).
    #[command(flatten)]
    ops: OpsArgs,
    /// A step that makes no progress for this many seconds fails, saying what blocks it.
    #[arg(long, default_value_t = 600)]
    stall_secs: u64,
}

/// `warbler cluster scale --to N --run CMD`: decommission-first scaling (see `scale.rs`).
pub async fn cluster_scale(args: ScaleArgs) -> anyhow::Result<()> {
    let scaler = crate::scale::Scaler {
        ops: args.ops.connect()?,
        run: args.run,
        stall: std::time::Duration::from_secs(args.stall_secs),
    };
    scaler.scale_to(args.to).await
}

#[derive(Args)]
pub struct HealthArgs {
    /// The node's HTTP address (`https://HOST:PORT` with tls.http); an unspecified host
    /// (0.0.0.0, as in the image's WARBLER_HTTP_ADDR) means this machine.
    #[arg(long, env = "WARBLER_HTTP_ADDR", default_value = "127.0.0.1:7480")]
    http: String,
    /// Ask /readyz (serving writes) rather than /healthz (the process runs).
    #[arg(long)]
    ready: bool,
    /// Trust this CA (PEM) for an `https://` address.
    #[arg(long, value_name = "FILE")]
    tls_ca_file: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
}

/// `warbler health`: 200 from the probe, or an error naming what the node said.
pub async fn health(args: HealthArgs) -> anyhow::Result<()> {
    let http = args
        .http
        .replacen("0.0.0.0:", "127.0.0.1:", 1)
        .replacen("[::]:", "[::1]:", 1);
    let timeout = std::time::Duration::from_secs(args.timeout_secs.max(1));
    let mut node = NodeHttp::with_timeout(&http, timeout);
    if let Some(ca) = &args.tls_ca_file {
        let pem = std::fs::read(ca)
            .with_context(|| format!("cannot read --tls-ca-file {}", ca.display()))?;
        node = node.with_ca_pem(&pem)?;
    }
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let answer = node.send("GET", path, None, Vec::new()).await?;
    if answer.status != 200 {
        let why = answer.json()["error"]["message"]
            .as_str()
            .map(String::from)
            .unwrap_or(answer.body);
        bail!("{http}{path} answered {}: {why}", answer.status);
    }
    println!("{http}{path}: ok");
    Ok(())
}
