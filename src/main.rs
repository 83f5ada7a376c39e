//! `warbler`: the Warbler binary. It parses flags, builds the configuration and wires the
//! crates together; the behaviour lives in the crates.
//!
//! Layout:
//! - [`node`]: start and stop one node: storage, mailboxes, listeners, and in a cluster the
//!   wiring of `warbler_cluster::ClusterNode` to the actors' routing.
//! - [`gateway`]: the device protocol on a connection (TCP, TLS, WebSocket).
//! - [`http`]: the HTTP API, `/v1/ws`, health and metrics.
//! - [`auth`]: JWT checking (the claims and the minter are `warbler_client::auth`).
//! - [`cli`]: the client-side commands (`token`, `send`, `listen`, `cluster status`,
//!   `cluster decommission`) and `dev`.
//! - [`telemetry`]: logs and metrics.

mod alloc;
mod auth;
mod backup;
mod capacity;
mod cli;
mod disk;
mod gateway;
mod http;
mod listener;
mod node;
mod rate;
mod scale;
mod telemetry;
mod web;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use warbler_config::Config;

#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;

#[derive(Parser)]
#[command(name = "warbler", version, about = "Durable, ordered push and IM delivery", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node from a config file, WARBLER_* variables and flags.
    Serve(ServeArgs),
    /// Run a local development node on the defaults, with a generated secret.
    Dev(cli::DevArgs),
    /// Mint a JWT for development and scripts; prints it on stdout.
    Token(cli::TokenArgs),
    /// Publish one message over the device protocol and print its seq.
    Send(cli::SendArgs),
    /// Connect as a device, print messages as they arrive and acknowledge them.
    Listen(cli::ListenArgs),
    /// Operator commands for a cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Probe a node's /healthz (or /readyz with --ready): exit 0 when it answers 200, 1 with
    /// the reason otherwise (container health checks; the image has no curl).
    Health(cli::HealthArgs),
    /// Back up every partition of a running cluster (or node) to a directory, online:
    /// each partition consistent at one applied index, with a manifest and checksums.
    Backup(backup::BackupArgs),
    /// Restore a backup into a new, empty cluster (or node): messages keep their seq and
    /// id, devices their cursors.
    Restore(backup::RestoreArgs),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Members and their state, partitions with replicas and leaders.
    Status(cli::ClusterStatusArgs),
    /// Remove a member: its partitions move to the other nodes, then it can be stopped.
    Decommission(cli::DecommissionArgs),
    /// Grow or shrink the cluster to N nodes: decommission-first, one node at a time from
    /// the highest ordinal, running a command (e.g. kubectl scale) for each step.
    Scale(cli::ScaleArgs),
}

/// Flags of `serve`. Each overrides the config file and the WARBLER_* variables.
#[derive(Args, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file (see config/warbler.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's stable name (the pod name in a StatefulSet).
    #[arg(long)]
    node_id: Option<String>,
    /// Where RocksDB and node state live.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Device protocol over TCP (TLS when a certificate is configured), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    client_addr: Option<String>,
    /// HTTP API, WebSocket and metrics, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    http_addr: Option<String>,
    /// Peer RPC and gossip, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    cluster_addr: Option<String>,
    /// Cluster addresses (or DNS names) to join through, comma-separated.
    #[arg(long, value_name = "ADDR,...")]
    seeds: Option<String>,
    /// Form a new cluster once N members are up (1 = single node).
    #[arg(long, value_name = "N")]
    bootstrap_expect: Option<String>,
    /// File holding the HS256 JWT secret.
    #[arg(long, value_name = "FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// Directory of HS256 JWT keys, one file per key id (`kid`), re-read every 2 s.
    #[arg(long, value_name = "DIR")]
    jwt_keys_dir: Option<PathBuf>,
    /// PEM certificate chain: serves TLS on the client port (with --tls-key-file).
    #[arg(long, value_name = "FILE")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key for --tls-cert-file.
    #[arg(long, value_name = "FILE")]
    tls_key_file: Option<PathBuf>,
    /// Serve the HTTP API and WebSocket over TLS too, with the same certificate.
    #[arg(long)]
    tls_http: bool,
    /// File holding the cluster key every member shares (required off loopback).
    #[arg(long, value_name = "FILE")]
    cluster_key_file: Option<PathBuf>,
    /// Log format: human or json.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// This node's failure zone (a rack, a data centre's zone): replicas spread over zones.
    #[arg(long, value_name = "ZONE")]
    zone: Option<String>,
}

impl ServeArgs {
    /// Builds the configuration: defaults, file, WARBLER_* variables, these flags, validate.
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load_file(path)?,
            None => Config::default(),
        };
        config.apply_env(std::env::vars())?;
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let flags: [(&str, &str, Option<String>); 15] = [
            ("--zone", "cluster.zone", self.zone.clone()),
            ("--node-id", "node_id", self.node_id.clone()),
            ("--data-dir", "data_dir", path(&self.data_dir)),
            ("--client-addr", "client_addr", self.client_addr.clone()),
            ("--http-addr", "http_addr", self.http_addr.clone()),
            ("--cluster-addr", "cluster_addr", self.cluster_addr.clone()),
            ("--seeds", "seeds", self.seeds.clone()),
            (
                "--bootstrap-expect",
                "bootstrap_expect",
                self.bootstrap_expect.clone(),
            ),
            (
                "--jwt-secret-file",
                "jwt_secret_file",
                path(&self.jwt_secret_file),
            ),
            ("--jwt-keys-dir", "auth.keys_dir", path(&self.jwt_keys_dir)),
            (
                "--tls-cert-file",
                "tls.cert_file",
                path(&self.tls_cert_file),
            ),
            ("--tls-key-file", "tls.key_file", path(&self.tls_key_file)),
            (
                "--tls-http",
                "tls.http",
                self.tls_http.then(|| "true".into()),
            ),
            (
                "--cluster-key-file",
                "cluster.key_file",
                path(&self.cluster_key_file),
            ),
            ("--log-format", "log.format", self.log_format.clone()),
        ];
        for (flag, field, value) in flags {
            if let Some(v) = value {
                config
                    .set(field, &v)
                    .map_err(|e| anyhow::anyhow!("{flag} {v:?}: {e}"))?;
            }
        }
        config.validate()?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = alloc::check_variable() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match alloc::keep_small_pages() {
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        Ok(true) => {
            if let Err(e) = alloc::disable_huge_pages() {
                eprintln!("warning: cannot turn transparent huge pages off ({e}); the node runs with them, and a heap that grows may stall its threads for a fraction of a millisecond per 2 MiB");
            }
        }
        Ok(false) => {}
    }
    if !matches!(cli.command, Command::Serve(_) | Command::Dev(_)) {
        // Printing commands end quietly when their reader goes away (`... | head`), as
        // command-line tools do; sockets are written with MSG_NOSIGNAL either way.
        restore_default_sigpipe();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(unix)]
fn restore_default_sigpipe() {
    // SAFETY: called before any thread starts; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_default_sigpipe() {}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let config = args.config()?;
            let auth = auth::Auth::from_config(config.jwt_secret_file.as_deref(), &config.auth)
                .map_err(anyhow::Error::msg)?;
            serve(config, auth).await
        }
        Command::Dev(args) => cli::dev(args).await,
        Command::Token(args) => cli::token(args),
        Command::Send(args) => cli::send(args).await,
        Command::Listen(args) => cli::listen(args).await,
        Command::Health(args) => cli::health(args).await,
        Command::Backup(args) => backup::backup(args).await,
        Command::Restore(args) => backup::restore(args).await,
        Command::Cluster(ClusterCommand::Status(args)) => cli::cluster_status(args).await,
        Command::Cluster(ClusterCommand::Decommission(args)) => {
            cli::cluster_decommission(args).await
        }
        Command::Cluster(ClusterCommand::Scale(args)) => cli::cluster_scale(args).await,
    }
}

/// Runs a node until SIGTERM or Ctrl-C.
pub async fn serve(config: Config, auth: auth::Auth) -> anyhow::Result<()> {
    telemetry::init_logs(config.log.format, &config.log.level);
    let metrics = telemetry::init_metrics()?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.cancel();
    });
    node::run(config, auth, metrics, shutdown).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
