//! `warbler-load`: end-to-end load against a running Warbler, NATS JetStream or Mosquitto.
//!
//! `warbler-load run`: U users with M devices each; P publishers each own some users and
//! send to them in turn, at a fixed total rate (open loop: message k of a publisher is due
//! at start + k/rate, and latency counts from that due time, so a stalled server cannot
//! hide its queue) or, with `--rate 0`, as fast as a window of unanswered publishes per
//! publisher allows. Users, devices and publishers are split over `--procs` worker
//! processes (the open-file limit is per process) that start sending at one agreed instant;
//! the parent merges their HDR histograms. Reports publish→ack and publish→deliver latency,
//! delivered throughput, errors and order violations.
//!
//! `warbler-load idle`: opens N idle device connections and holds them (memory per
//! connection is the server's RSS growth divided by N).
//!
//! `warbler-load storm`: connects N devices to the first of the addresses, waits for the
//! node to die, and times until every device is connected to one of the others again.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use warbler_benches::stats::{decode_histogram, histogram, now_ns, Quantiles, Stats, WorkerResult};
use warbler_benches::systems::{self, partition_of, Plan, System, Target, PARTITIONS};
use warbler_benches::tokens;
use warbler_client::http::NodeHttp;
use warbler_client::{ConnectOptions, Connection};

#[derive(Parser)]
#[command(
    name = "warbler-load",
    about = "End-to-end load generator for Warbler and its peers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Run(RunArgs),
    /// One worker process of `run` (started by it; speaks JSON lines on stdin/stdout).
    #[command(hide = true)]
    Worker {
        spec: String,
    },
    Idle(IdleArgs),
    Storm(StormArgs),
}

#[derive(clap::Args, Clone)]
struct TargetArgs {
    #[arg(long, value_enum, default_value = "warbler")]
    system: System,
    /// Comma-separated host:port list; connections are spread over it.
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    /// Warbler: the node's JWT secret file, to mint tokens.
    #[arg(long)]
    jwt_secret_file: Option<PathBuf>,
    /// Trust this CA (PEM) and connect over TLS (warbler, nats).
    #[arg(long)]
    tls_ca_file: Option<PathBuf>,
    /// Warbler cluster: read where each partition's leader is (`GET /v1/routes`) from this
    /// node's HTTP address (host:port) before the run, and send each publish to its user's
    /// leader (each publisher then holds a connection to every node). The leaders' client
    /// addresses must be among --addr. Publishers read the routes again every second and
    /// follow leaders that move (a user's publishes change connection once none to it is
    /// unanswered, so they stay in order); devices stay where they connected.
    #[arg(long, value_name = "HTTP_ADDR")]
    route_by_leader: Option<String>,
    /// With --route-by-leader: connect each device to its user's leader too.
    #[arg(long, requires = "route_by_leader")]
    devices_to_leader: bool,
}

impl TargetArgs {
    fn target(&self) -> anyhow::Result<Target> {
        if self.system == System::Warbler && self.jwt_secret_file.is_none() {
            bail!("--jwt-secret-file is required for --system warbler (the node's secret, to mint tokens)");
        }
        Ok(Target {
            system: self.system,
            addrs: self.addr.split(',').map(str::to_string).collect(),
            jwt_secret_file: self.jwt_secret_file.clone(),
            tls_ca_file: self.tls_ca_file.clone(),
            leaders: Vec::new(),
            route_devices: self.devices_to_leader,
            routes_from: None,
        })
    }

    /// [`Target`] with its leaders read from the cluster when routed by leader.
    async fn routed_target(&self) -> anyhow::Result<Target> {
        let mut target = self.target()?;
        let Some(http) = &self.route_by_leader else {
            return Ok(target);
        };
        let secret =
            tokens::read_secret(self.jwt_secret_file.as_ref().context("--jwt-secret-file")?)?;
        let routes = NodeHttp::new(http.clone())
            .with_token(tokens::mint(&secret, "load", "publish"))
            .routes()
            .await
            .with_context(|| format!("reading the cluster's routes from {http}"))?;
        if routes.partition_count != PARTITIONS || routes.leaders.len() != usize::from(PARTITIONS) {
            bail!(
                "{http} routes {} of {} partitions, not {PARTITIONS}: wait until the cluster has formed",
                routes.leaders.len(),
                routes.partition_count
            );
        }
        let indices = systems::leader_indices(&routes, &target.addrs);
        for (p, (leader, n)) in routes.leaders.iter().zip(indices).enumerate() {
            let leader = leader.as_ref().with_context(|| {
                format!("partition {p} has no leader at {http}: wait until the cluster is ready")
            })?;
            let n = n.with_context(|| {
                format!("partition {p}'s leader's client address {leader} is not in --addr")
            })?;
            target.leaders.push(n);
        }
        target.routes_from = Some(http.clone());
        Ok(target)
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Devices per user; every device gets every message of its user.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Total publishes per second (0 = as fast as the window allows).
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Unanswered publishes per publisher at most.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// Worker processes to spread users, devices and publishers over.
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Prefix of user names (a time suffix keeps runs independent).
    #[arg(long, default_value = "load")]
    user_prefix: String,
    /// Warbler: only users of this partition (of 64), to fill or load one partition.
    #[arg(long)]
    partition: Option<u16>,
    /// NATS: create the stream with this many replicas before the run.
    #[arg(long, default_value_t = 1)]
    nats_replicas: usize,
    /// NATS: place the stream on the server with this tag.
    #[arg(long)]
    nats_tag: Option<String>,
    /// Append the run's result as one JSON line to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// A name for the run in the JSON line (e.g. "warbler-1").
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(clap::Args)]
struct IdleArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 5_000)]
    connections: usize,
    #[arg(long, default_value = "idle")]
    user_prefix: String,
    /// Seconds to hold the connections once all are up.
    #[arg(long, default_value_t = 30)]
    hold_secs: u64,
    /// Warbler devices send a ping this often, in milliseconds, spread over the interval
    /// (0: never); they always answer the server's pings.
    #[arg(long, default_value_t = 0)]
    ping_ms: u64,
}

#[derive(clap::Args)]
struct StormArgs {
    /// Comma-separated node addresses: devices connect to the first, then move to the rest.
    #[arg(long)]
    addr: String,
    #[arg(long)]
    jwt_secret_file: PathBuf,
    #[arg(long, default_value_t = 2_000)]
    connections: usize,
    #[arg(long, default_value = "storm")]
    user_prefix: String,
    /// Give up waiting for the devices to come back after this long.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// What a worker process is asked to do.
#[derive(Serialize, Deserialize)]
struct WorkerSpec {
    target: Target,
    shard: usize,
    users: usize,
    devices: usize,
    publishers: usize,
    /// Publishes per second of this worker (0 = windowed maximum).
    rate: u64,
    window: usize,
    duration_secs: u64,
    body_bytes: usize,
    prefix: String,
    /// Only user names that hash to this partition (of [`PARTITIONS`]).
    #[serde(default)]
    partition: Option<u16>,
}

/// `n` user names of a worker, all in `partition` when one is given.
fn user_names(prefix: &str, shard: usize, n: usize, partition: Option<u16>) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-s{shard}-{i}"))
        .filter(|u| partition.is_none_or(|p| partition_of(u) == p))
        .take(n)
        .collect()
}

/// The merged result of a run, as written to `--json-out`.
#[derive(Serialize)]
struct RunResult {
    label: String,
    system: System,
    users: usize,
    devices_per_user: usize,
    publishers: usize,
    procs: usize,
    /// Offered publishes per second; 0 = as fast as the window allows.
    offered_rate: u64,
    body_bytes: usize,
    published: u64,
    delivered: u64,
    errors: u64,
    /// Publishes refused by the server and sent again in order (not failures).
    #[serde(default)]
    refused: u64,
    order_violations: u64,
    /// Numbers a device never saw (each failed publish leaves one per device).
    gaps: u64,
    /// Acknowledged publishes per second over the sending phase.
    publish_rate: f64,
    /// Deliveries to devices per second, from the start to the last delivery.
    deliver_rate: f64,
    ack_ms: Quantiles,
    deliver_ms: Quantiles,
    date: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a).await,
        Cmd::Worker { spec } => {
            worker(serde_json::from_str(&spec).context("bad worker spec")?).await
        }
        Cmd::Idle(a) => idle(a).await,
        Cmd::Storm(a) => storm(a).await,
    }
}

/// Connects `n` things in parallel batches: fast, without a thundering herd of handshakes.
async fn in_batches<F, Fut, T>(n: usize, batch: usize, f: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(batch.max(1)) {
        let tasks: Vec<_> = (start..(start + batch).min(n))
            .map(|i| tokio::spawn(f(i)))
            .collect();
        for t in tasks {
            out.push(t.await??);
        }
    }
    Ok(out)
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let target = a.target.routed_target().await?;
    if a.procs == 0 || a.users < a.procs || a.publishers < a.procs {
        bail!("--procs must be at least 1 and at most --users and --publishers");
    }
    if target.system == System::Nats {
        systems::reset_nats_stream(&target, a.nats_replicas, a.nats_tag.clone()).await?;
    }
    let prefix = format!("{}-{}", a.user_prefix, now_ns() % 1_000_000_000);
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for shard in 0..a.procs {
        let share = |total: usize| total / a.procs + usize::from(shard < total % a.procs);
        let spec = WorkerSpec {
            target: target.clone(),
            shard,
            users: share(a.users),
            devices: a.devices,
            publishers: share(a.publishers),
            rate: a.rate * share(a.publishers) as u64 / a.publishers as u64,
            window: a.window,
            duration_secs: a.duration_secs,
            body_bytes: a.body_bytes,
            prefix: prefix.clone(),
            partition: a.partition,
        };
        let child = tokio::process::Command::new(&exe)
            .arg("worker")
            .arg(serde_json::to_string(&spec)?)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        children.push(child);
    }
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut lines = Vec::new();
    for c in &mut children {
        let mut out = tokio::io::BufReader::new(c.stdout.take().unwrap()).lines();
        match out.next_line().await? {
            Some(l) if l == "ready" => {}
            other => bail!("a worker failed before it was ready ({other:?}); its error is above"),
        }
        lines.push(out);
    }
    let (connections, users) = (a.users * a.devices, a.users);
    eprintln!(
        "{connections} devices of {users} users connected over {} processes",
        a.procs
    );
    let start_ns = now_ns() + 300_000_000;
    for c in &mut children {
        let stdin = c.stdin.as_mut().unwrap();
        stdin.write_all(format!("{start_ns}\n").as_bytes()).await?;
        stdin.flush().await?;
    }
    let (mut ack, mut deliver) = (histogram(), histogram());
    let mut total = WorkerResult {
        published: 0,
        delivered: 0,
        errors: 0,
        refused: 0,
        order_violations: 0,
        gaps: 0,
        last_delivery_ns: 0,
        ack: String::new(),
        deliver: String::new(),
    };
    for out in &mut lines {
        let line = out
            .next_line()
            .await?
            .context("a worker died during the run")?;
        let r: WorkerResult = serde_json::from_str(&line).context("bad worker result")?;
        ack.add(decode_histogram(&r.ack)?)?;
        deliver.add(decode_histogram(&r.deliver)?)?;
        total.published += r.published;
        total.delivered += r.delivered;
        total.errors += r.errors;
        total.refused += r.refused;
        total.order_violations += r.order_violations;
        total.gaps += r.gaps;
        total.last_delivery_ns = total.last_delivery_ns.max(r.last_delivery_ns);
    }
    let send_secs = a.duration_secs as f64;
    let span_secs = (total.last_delivery_ns.saturating_sub(start_ns) as f64 / 1e9).max(send_secs);
    let result = RunResult {
        label: a.label.clone(),
        system: target.system,
        users: a.users,
        devices_per_user: a.devices,
        publishers: a.publishers,
        procs: a.procs,
        offered_rate: a.rate,
        body_bytes: a.body_bytes,
        published: total.published,
        delivered: total.delivered,
        errors: total.errors,
        refused: total.refused,
        order_violations: total.order_violations,
        gaps: total.gaps,
        publish_rate: total.published as f64 / send_secs,
        deliver_rate: total.delivered as f64 / span_secs,
        ack_ms: Quantiles::of(&ack),
        deliver_ms: Quantiles::of(&deliver),
        date: String::from_utf8_lossy(
            &std::process::Command::new("date")
                .args(["-u", "+%F"])
                .output()?
                .stdout,
        )
        .trim()
        .to_string(),
    };
    print_result(&result);
    if let Some(path) = &a.json_out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{}", serde_json::to_string(&result)?)?;
    }
    Ok(())
}

fn print_result(r: &RunResult) {
    let rate = if r.offered_rate == 0 {
        "max".to_string()
    } else {
        r.offered_rate.to_string()
    };
    println!(
        "system={:?} users={} devices_per_user={} publishers={} offered_rate={rate} body={}B",
        r.system, r.users, r.devices_per_user, r.publishers, r.body_bytes
    );
    println!(
        "published={} delivered={} errors={} refused={} order_violations={} gaps={} publish_rate={:.0}/s deliver_rate={:.0}/s",
        r.published, r.delivered, r.errors, r.refused, r.order_violations, r.gaps, r.publish_rate, r.deliver_rate
    );
    for (name, q) in [
        ("publish->ack", r.ack_ms),
        ("publish->deliver", r.deliver_ms),
    ] {
        println!(
            "{name} ms: p50={:.2} p99={:.2} p99.9={:.2} max={:.2}",
            q.p50, q.p99, q.p999, q.max
        );
    }
}

async fn worker(spec: WorkerSpec) -> anyhow::Result<()> {
    let target = Arc::new(spec.target);
    let stats = Arc::new(Stats::default());
    let users = user_names(&spec.prefix, spec.shard, spec.users, spec.partition);
    // JetStream consumer creation is a replicated API call: fewer at a time.
    let batch = if target.system == System::Nats {
        50
    } else {
        250
    };
    let (t, s, u, m) = (target.clone(), stats.clone(), users.clone(), spec.devices);
    in_batches(spec.users * m, batch, move |i| {
        systems::spawn_device(t.clone(), s.clone(), u[i / m].clone(), i % m, i)
    })
    .await?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let start_ns: u64 = line.trim().parse().context("expected the start time")?;
    let start = Instant::now() + Duration::from_nanos(start_ns.saturating_sub(now_ns()));
    let interval_ns = (spec.publishers as u64 * 1_000_000_000)
        .checked_div(spec.rate)
        .unwrap_or(0);
    let mut pubs = Vec::new();
    for p in 0..spec.publishers {
        // Publisher p owns every publishers-th user, so each user has one publisher and
        // its messages one order.
        let owned: Vec<String> = users
            .iter()
            .skip(p)
            .step_by(spec.publishers)
            .cloned()
            .collect();
        let plan = Plan::new(
            owned,
            spec.body_bytes,
            start,
            start_ns,
            interval_ns,
            Duration::from_secs(spec.duration_secs),
            spec.window,
        );
        let name = format!("{}-s{}-p{p}", spec.prefix, spec.shard);
        let index = spec.shard * spec.publishers + p;
        pubs.push(tokio::spawn(systems::run_publisher(
            target.clone(),
            stats.clone(),
            name,
            index,
            plan,
        )));
    }
    for p in pubs {
        p.await??;
    }
    // Let the tail drain: every acknowledged publish reaches every device of its user.
    let drain_until = Instant::now() + Duration::from_secs(10);
    loop {
        let want = stats.published.load(Ordering::Relaxed) * spec.devices as u64;
        if stats.delivered.load(Ordering::Relaxed) >= want || Instant::now() > drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{}", serde_json::to_string(&stats.summary()?)?);
    std::io::stdout().flush()?;
    Ok(())
}

async fn idle(a: IdleArgs) -> anyhow::Result<()> {
    let target = Arc::new(a.target.target()?);
    let prefix = a.user_prefix.clone();
    let t = target.clone();
    let conns = in_batches(a.connections, 250, move |i| {
        let t = t.clone();
        let user = format!("{prefix}-{i}");
        async move { systems::idle_device(&t, user, i).await }
    })
    .await?;
    println!("connected {}", conns.len());
    std::io::stdout().flush()?;
    let opened = conns.len();
    let (mut devices, mut others) = (Vec::new(), Vec::new());
    for (i, c) in conns.into_iter().enumerate() {
        match c.downcast::<Connection>() {
            Ok(conn) => devices.push(tokio::spawn(keep_alive(*conn, a.ping_ms, i))),
            Err(other) => others.push(other),
        }
    }
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    let held = others.len() + devices.iter().filter(|t| !t.is_finished()).count();
    println!("held {held} of {opened}");
    devices.iter().for_each(|t| t.abort());
    Ok(())
}

/// Keeps an idle Warbler device alive: answers the server's pings and, every `ping_ms`
/// (0: never), sends one of its own, the first at a point of the interval set by `i`.
async fn keep_alive(mut conn: Connection, ping_ms: u64, i: usize) {
    let every = Duration::from_millis(ping_ms.max(1));
    let mut next = tokio::time::Instant::now() + every.mul_f64((i as f64 * 0.618_034).fract());
    loop {
        tokio::select! {
            r = conn.recv() => if r.is_err() { return },
            _ = tokio::time::sleep_until(next), if ping_ms > 0 => {
                if conn.send(warbler_client::Frame::Ping { n: 0 }).await.is_err() {
                    return;
                }
                next += every;
            }
        }
    }
}

async fn storm(a: StormArgs) -> anyhow::Result<()> {
    let addrs: Vec<String> = a.addr.split(',').map(str::to_string).collect();
    if addrs.len() < 2 {
        bail!("--addr needs the node to kill first and at least one other node");
    }
    let secret = tokens::read_secret(&a.jwt_secret_file)?;
    let prefix = a.user_prefix.clone();
    let (first, s) = (addrs[0].clone(), secret.clone());
    let conns = in_batches(a.connections, 250, move |i| {
        let opts = ConnectOptions::new(
            first.clone(),
            tokens::mint(&s, &format!("{prefix}-{i}"), "device"),
            "d0",
        );
        async move { Ok(Connection::connect(opts).await?) }
    })
    .await?;
    println!("connected {}", conns.len());
    std::io::stdout().flush()?;
    let first_down = Arc::new(AtomicU64::new(u64::MAX));
    let back = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let others = addrs[1..].to_vec();
        let (first_down, back, secret) = (first_down.clone(), back.clone(), secret.clone());
        let user = format!("{}-{i}", a.user_prefix);
        tasks.push(tokio::spawn(async move {
            // Wait for the node to go away.
            while conn.recv().await.is_ok() {}
            let down = now_ns();
            first_down.fetch_min(down, Ordering::Relaxed);
            let mut attempt = 0usize;
            loop {
                let opts = ConnectOptions::new(
                    others[(i + attempt) % others.len()].clone(),
                    tokens::mint(&secret, &user, "device"),
                    "d0",
                );
                if let Ok(c) = Connection::connect(opts).await {
                    back.fetch_add(1, Ordering::Relaxed);
                    let at = now_ns();
                    return Some((c, at - down, at));
                }
                attempt += 1;
                // Spread retries so the survivors are not hit in lockstep.
                let jitter = (i as u64 * 7919 + attempt as u64 * 104_729) % 200;
                tokio::time::sleep(Duration::from_millis(50 + jitter)).await;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    let mut per_device: Histogram<u64> = histogram();
    let mut last_back = 0u64;
    let mut kept = Vec::new();
    for t in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(Some((c, took, at)))) = tokio::time::timeout(left, t).await {
            per_device.saturating_record((took / 1000).max(1));
            last_back = last_back.max(at);
            kept.push(c);
        }
    }
    let n = back.load(Ordering::Relaxed);
    let down = first_down.load(Ordering::Relaxed);
    let all = last_back.saturating_sub(down) as f64 / 1e9;
    let q = Quantiles::of(&per_device);
    println!(
        "storm: reconnected={n} of {} all_back_secs={all:.2} per_device_ms p50={:.0} p99={:.0} max={:.0}",
        a.connections, q.p50, q.p99, q.max
    );
    if n < a.connections {
        bail!(
            "{} devices did not come back within {} s",
            a.connections - n,
            a.timeout_secs
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_of_one_partition_hash_there() {
        // FNV-1a 64 reference vector, as the cluster's placement uses it.
        assert_eq!(
            partition_of("a"),
            (0xaf63dc4c8601ec8c_u64 % u64::from(PARTITIONS)) as u16
        );
        let users = user_names("fill", 1, 20, Some(7));
        assert_eq!(users.len(), 20);
        assert!(users.iter().all(|u| partition_of(u) == 7));
        assert_eq!(user_names("x", 0, 3, None), ["x-s0-0", "x-s0-1", "x-s0-2"]);
    }
}
