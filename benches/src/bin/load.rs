//! `warbler-load`: end-to-end load against a running node.
//!
//! `warbler-load run`: U users with one device each; P publisher connections send at a
//! fixed total rate (open loop: message k of a publisher is due at start + k/rate, and
//! latency counts from that due time, so a stalled server cannot hide its queue) or, with
//! `--rate 0`, as fast as a window of unanswered publishes per publisher allows. Reports
//! delivered throughput, publish→ack and publish→deliver latency.
//!
//! `warbler-load idle`: opens N idle device connections and holds them (memory per
//! connection is the server's RSS growth divided by N).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use warbler_benches::tokens;
use warbler_client::{ConnectOptions, Connection, Frame};

#[derive(Parser)]
#[command(name = "warbler-load", about = "End-to-end load generator for Warbler")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Run(RunArgs),
    Idle(IdleArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    #[arg(long)]
    jwt_secret_file: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Total publishes per second (0 = as fast as the window allows).
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Unanswered publishes per publisher at most, in --rate 0 mode.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// Prefix of user names (distinct per run keeps runs independent).
    #[arg(long, default_value = "load")]
    user_prefix: String,
}

#[derive(clap::Args)]
struct IdleArgs {
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    #[arg(long)]
    jwt_secret_file: PathBuf,
    #[arg(long, default_value_t = 5_000)]
    connections: usize,
    #[arg(long, default_value = "idle")]
    user_prefix: String,
    /// Seconds to hold the connections once all are up.
    #[arg(long, default_value_t = 30)]
    hold_secs: u64,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).unwrap() // 1 µs .. 120 s
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a).await,
        Cmd::Idle(a) => idle(a).await,
    }
}

async fn connect_devices(
    addr: &str,
    secret: &[u8],
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<Connection>> {
    // Connect in parallel batches: fast, without a thundering herd of handshakes.
    let mut conns = Vec::with_capacity(n);
    for chunk_start in (0..n).step_by(500) {
        let batch: Vec<_> = (chunk_start..(chunk_start + 500).min(n))
            .map(|i| {
                // A comma-separated list spreads devices over a cluster's nodes.
                let addrs: Vec<&str> = addr.split(',').collect();
                let opts = ConnectOptions::new(
                    addrs[i % addrs.len()],
                    tokens::mint(secret, &format!("{prefix}-{i}"), "device"),
                    "d0",
                );
                tokio::spawn(Connection::connect(opts))
            })
            .collect();
        for t in batch {
            conns.push(t.await?.context("device connect")?);
        }
    }
    Ok(conns)
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let secret = tokens::read_secret(&a.jwt_secret_file)?;
    let prefix = format!("{}-{}", a.user_prefix, now_ns() % 1_000_000_000);
    let devices = connect_devices(&a.addr, &secret, &prefix, a.users).await?;
    eprintln!("{} devices connected", devices.len());
    let deliver = Arc::new(Mutex::new(hist()));
    let acked_hist = Arc::new(Mutex::new(hist()));
    let delivered = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Each device must see seq 1, 2, 3, ... exactly: anything else is counted.
    let order_violations = Arc::new(AtomicU64::new(0));
    for mut d in devices {
        let (deliver, delivered, bad) =
            (deliver.clone(), delivered.clone(), order_violations.clone());
        tokio::spawn(async move {
            let mut last = d.acked;
            while let Ok(m) = d.recv_msg().await {
                if m.seq != last + 1 {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                last = m.seq;
                let sent = u64::from_be_bytes(m.body[..8].try_into().unwrap());
                let us = now_ns().saturating_sub(sent) / 1000;
                deliver.lock().unwrap().saturating_record(us.max(1));
                delivered.fetch_add(1, Ordering::Relaxed);
                if d.ack(m.seq).await.is_err() {
                    return;
                }
            }
        });
    }
    let start_ns = now_ns() + 200_000_000;
    let start = Instant::now() + Duration::from_millis(200);
    let total = if a.rate == 0 {
        u64::MAX
    } else {
        a.rate * a.duration_secs
    };
    let per_pub = total / a.publishers as u64;
    let interval_ns = (a.publishers as u64 * 1_000_000_000)
        .checked_div(a.rate)
        .unwrap_or(0);
    let deadline = start + Duration::from_secs(a.duration_secs);
    let published = Arc::new(AtomicU64::new(0));
    let mut pubs = Vec::new();
    for p in 0..a.publishers {
        let addrs: Vec<&str> = a.addr.split(',').collect();
        let opts = ConnectOptions::new(
            addrs[p % addrs.len()],
            tokens::mint(&secret, "load-publisher", "publish"),
            format!("p{p}"),
        );
        let conn = Connection::connect(opts)
            .await
            .context("publisher connect")?;
        let (mut tx, mut rx) = conn.split();
        // The window only bounds the closed-loop (--rate 0) mode; open loop never waits.
        let windowed = a.rate == 0;
        let window = Arc::new(Semaphore::new(a.window));
        let sent_at: Arc<Mutex<std::collections::HashMap<u64, u64>>> = Arc::default();
        let (acked_hist, errors, published, w2, s2) = (
            acked_hist.clone(),
            errors.clone(),
            published.clone(),
            window.clone(),
            sent_at.clone(),
        );
        let reader = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(Frame::Published { id, .. }) => {
                        let k: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
                        if let Some(t) = s2.lock().unwrap().remove(&k) {
                            acked_hist
                                .lock()
                                .unwrap()
                                .saturating_record((now_ns().saturating_sub(t) / 1000).max(1));
                        }
                        published.fetch_add(1, Ordering::Relaxed);
                        if windowed {
                            w2.add_permits(1);
                        }
                    }
                    Ok(_) => {}
                    Err(warbler_client::ClientError::Server { .. }) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if windowed {
                            w2.add_permits(1);
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        let users = a.users;
        let prefix = prefix.clone();
        let body_bytes = a.body_bytes.max(8);
        let writer = tokio::spawn(async move {
            let mut body = vec![b'x'; body_bytes];
            for k in 0..per_pub {
                let due_ns = start_ns + k * interval_ns;
                if interval_ns > 0 {
                    tokio::time::sleep_until(
                        (start + Duration::from_nanos(k * interval_ns)).into(),
                    )
                    .await;
                } else {
                    window.acquire().await.unwrap().forget();
                }
                if Instant::now() >= deadline {
                    break;
                }
                let stamp = if interval_ns > 0 { due_ns } else { now_ns() };
                body[..8].copy_from_slice(&stamp.to_be_bytes());
                sent_at.lock().unwrap().insert(k, stamp);
                let user = format!("{prefix}-{}", (k as usize * a.publishers + p) % users);
                let frame = Frame::Publish {
                    id: format!("p{p}-{k}"),
                    to: user,
                    body: serde_bytes::ByteBuf::from(body.clone()),
                };
                if tx.send(frame).await.is_err() {
                    break;
                }
            }
        });
        pubs.push((writer, reader));
    }
    for (w, _) in &mut pubs {
        w.await?;
    }
    let elapsed_send = start.elapsed().as_secs_f64();
    // Let the tail drain.
    let drain_until = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < published.load(Ordering::Relaxed)
        && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (d, ack) = (
        deliver.lock().unwrap().clone(),
        acked_hist.lock().unwrap().clone(),
    );
    let pubd = published.load(Ordering::Relaxed);
    let deliv = delivered.load(Ordering::Relaxed);
    println!(
        "users={} publishers={} offered_rate={} body={}B duration={:.1}s",
        a.users,
        a.publishers,
        if a.rate == 0 {
            "max".into()
        } else {
            a.rate.to_string()
        },
        a.body_bytes,
        elapsed_send
    );
    println!(
        "published={pubd} delivered={deliv} errors={} order_violations={} publish_rate={:.0}/s deliver_rate={:.0}/s",
        errors.load(Ordering::Relaxed),
        order_violations.load(Ordering::Relaxed),
        pubd as f64 / elapsed_send,
        deliv as f64 / elapsed
    );
    print_latency("publish->ack", &ack);
    print_latency("publish->deliver", &d);
    Ok(())
}

/// Prints p50/p99/p99.9/max of a histogram of microseconds, in milliseconds.
fn print_latency(name: &str, h: &Histogram<u64>) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{name} ms: p50={:.2} p99={:.2} p99.9={:.2} max={:.2}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    );
}

async fn idle(a: IdleArgs) -> anyhow::Result<()> {
    let secret = tokens::read_secret(&a.jwt_secret_file)?;
    let conns = connect_devices(&a.addr, &secret, &a.user_prefix, a.connections).await?;
    println!("connected {}", conns.len());
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    drop(conns);
    Ok(())
}
