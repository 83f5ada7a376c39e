//! Measures what one peer request costs in CPU, both sides together: a caller process and a
//! server process (this example started again as its child) talk over one peer transport
//! link on loopback, as two nodes do. `callers` tasks each send one request at a time and
//! wait for its answer (like a stand-in forwarding deliveries, or an ack), together at
//! `rate` requests a second (0: as fast as they can). Each request carries `batch` items of
//! `item_bytes` bytes, so comparing `batch=1` with `batch=8` at the same item rate shows
//! what coalescing requests would save. Prints the CPU of both processes per request and
//! per item, and the answer times.
//!
//!   cargo run --release --example rpc_cost -- [rate=3000] [callers=64] [batch=1] [item_bytes=300] [seconds=10]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warbler_cluster::transport::BoxFuture;
use warbler_cluster::{PeerHandler, PeerKind, PeerTransport, RpcError};

#[path = "common/cpu.rs"]
mod cpu;
use cpu::cpu_secs;

/// Answers every request at once with an empty body.
struct Echo;

impl PeerHandler for Echo {
    fn handle(
        &self,
        _from: String,
        _partition: u16,
        _kind: PeerKind,
        _body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

async fn serve() {
    let t = PeerTransport::start(
        "server",
        "127.0.0.1:0".parse().unwrap(),
        None,
        Arc::new(Echo),
    )
    .await
    .unwrap();
    println!("{}", t.local_addr());
    // Until the parent closes our stdin.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("serve") {
        return serve().await;
    }
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let rate = *args.first().unwrap_or(&3000);
    let callers = *args.get(1).unwrap_or(&64);
    let batch = *args.get(2).unwrap_or(&1) as usize;
    let item_bytes = *args.get(3).unwrap_or(&300) as usize;
    let seconds = *args.get(4).unwrap_or(&10);

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("serve")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut addr = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut addr,
    )
    .unwrap();
    let server: std::net::SocketAddr = addr.trim().parse().unwrap();
    let pid = child.id().to_string();

    let me = Arc::new(
        PeerTransport::start(
            "caller",
            "127.0.0.1:0".parse().unwrap(),
            None,
            Arc::new(Echo),
        )
        .await
        .unwrap(),
    );
    // Warm the link up: the first call dials.
    me.call(
        server,
        0,
        PeerKind::Deliver,
        vec![0; 8],
        Duration::from_secs(5),
    )
    .await
    .unwrap();

    let done = Arc::new(AtomicU64::new(0));
    let times = Arc::new(Mutex::new(Vec::<u32>::new()));
    let until = Instant::now() + Duration::from_secs(seconds);
    let (cpu0, child0, t0) = (cpu_secs("self"), cpu_secs(&pid), Instant::now());
    let mut tasks = Vec::new();
    for c in 0..callers {
        let (me, done, times) = (me.clone(), done.clone(), times.clone());
        tasks.push(tokio::spawn(async move {
            let period = (rate > 0).then(|| Duration::from_secs_f64(callers as f64 / rate as f64));
            let mut next = Instant::now()
                + period
                    .unwrap_or_default()
                    .mul_f64(c as f64 / callers as f64);
            let mut mine = Vec::new();
            while Instant::now() < until {
                if let Some(p) = period {
                    tokio::time::sleep_until(next.into()).await;
                    next += p;
                }
                let start = Instant::now();
                let body = vec![7u8; batch * item_bytes];
                me.call(
                    server,
                    c as u16,
                    PeerKind::Deliver,
                    body,
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
                mine.push(start.elapsed().as_micros() as u32);
                done.fetch_add(1, Ordering::Relaxed);
            }
            times.lock().unwrap().extend(mine);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_secs("self") - cpu0) + (cpu_secs(&pid) - child0);
    drop(child.stdin.take());
    let _ = child.wait();

    let calls = done.load(Ordering::Relaxed) as f64;
    let mut times = times.lock().unwrap().clone();
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "rate={rate} callers={callers} batch={batch} item_bytes={item_bytes}: {:.0} requests/s, \
         {:.0} items/s; CPU of both processes {:.0}% of one core, {:.1} us per request, \
         {:.1} us per item; answer p50 {:.2} ms, p99 {:.2} ms",
        calls / wall,
        calls * batch as f64 / wall,
        100.0 * cpu / wall,
        1e6 * cpu / calls,
        1e6 * cpu / (calls * batch as f64),
        at(0.5),
        at(0.99),
    );
}
