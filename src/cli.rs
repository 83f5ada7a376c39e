//! Client-side commands (`token`, `send`, `listen`) and the development node (`dev`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use rand::RngCore;
use warbler_client::{ConnectOptions, Connection};
use warbler_config::Config;

use crate::auth::{now_ms_id, now_secs, Auth, Claims};

/// Where `dev` keeps its generated secret, inside the data directory.
const DEV_SECRET_FILE: &str = "dev-secret";

#[derive(Args)]
pub struct DevArgs {
    /// Nodes to start. This build runs single nodes; clustering comes with replication.
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
    #[arg(long, value_name = "FILE", default_value = "./data/dev-secret")]
    jwt_secret_file: PathBuf,
    /// The user (the token's subject).
    #[arg(long)]
    user: String,
    /// What the token allows: device, publish or admin (several: "device,publish").
    #[arg(long, default_value = "device")]
    scope: String,
    /// Restrict the token to one device id.
    #[arg(long)]
    device: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl_secs: u64,
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
    #[arg(long, value_name = "FILE", default_value = "./data/dev-secret")]
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
        if !matches!(s, "device" | "publish" | "admin") {
            bail!(
                "unknown scope {s:?}: use device, publish or admin (comma-separated for several)"
            );
        }
    }
    crate::gateway::conn::check_id("--user", &args.user).map_err(anyhow::Error::msg)?;
    let claims = Claims {
        sub: args.user,
        scope: args.scope.replace(',', " "),
        exp: now_secs() + args.ttl_secs,
        iat: Some(now_secs()),
        device: args.device,
    };
    println!("{}", auth.mint(&claims));
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
            auth.mint(&Claims {
                sub: user.into(),
                scope: scope.into(),
                exp: now_secs() + 3600,
                iat: Some(now_secs()),
                device: None,
            })
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
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let path = dir.join(DEV_SECRET_FILE);
    if !path.exists() {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, hex).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(path)
}

pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes != 1 {
        bail!("--nodes {}: this build runs single nodes only; use --nodes 1 (multi-node clusters come with replication)", args.nodes);
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
    config.validate()?;
    let auth = Auth::from_file(&secret).map_err(anyhow::Error::msg)?;
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
         \n  curl -s -H \"Authorization: Bearer $TOKEN\" -d '{{\"id\":\"m1\",\"body\":\"hi\"}}' http://{http}/v1/users/alice/messages\n",
        node = config.node_id,
        secret = secret.display(),
        client = config.client_addr,
        http = config.http_addr,
    );
    crate::serve(config, auth).await
}
