//! The systems a load run can drive, on one workload: users with M devices each, and
//! publishers that each own some users and send to them in turn.
//!
//! - **warbler**: the device protocol through `warbler-client`. A device is a connection
//!   with a device id; it acks every message. A publish is acknowledged once durable.
//! - **nats**: NATS JetStream. One stream `WARBLER` holds the subjects `u.<user>`; a device
//!   is its own connection with a durable pull consumer filtered on its user's subject, acking
//!   every message explicitly. Publishes are async with a bounded window of pending acks.
//! - **mqtt** (Mosquitto): a device is a persistent session (clean session off, its own
//!   client id) subscribed at QoS 1 to `u/<user>`; a publish is QoS 1, acknowledged by PUBACK.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use warbler_client::api::Routes;
use warbler_client::http::NodeHttp;
use warbler_client::resend::{GoBackN, Sticky};
use warbler_client::{ConnectOptions, Connection, Delivery, Frame, TlsOptions};

/// How often an MQTT device connects again after a refused or failed connect.
const MQTT_CONNECT_TRIES: u32 = 10;

use crate::stats::{now_ns, read_body, stamp_body, DeviceTrack, Stats, HEADER_BYTES};
use crate::tokens;

/// Connection attempts to a NATS server before a run gives up (250 ms apart).
const NATS_CONNECT_ATTEMPTS: u32 = 20;

/// The JetStream stream every NATS run uses.
pub const NATS_STREAM: &str = "WARBLER";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Warbler,
    Nats,
    Mqtt,
}

/// Warbler's partition count (its default `cluster.partitions`).
pub const PARTITIONS: u16 = 64;

/// The partition Warbler places `user` in.
pub fn partition_of(user: &str) -> u16 {
    warbler_client::api::partition_of(user, PARTITIONS)
}

/// How to reach the system under test.
#[derive(Clone, Serialize, Deserialize)]
pub struct Target {
    pub system: System,
    /// Addresses (host:port); devices and publishers are spread over them in turn.
    pub addrs: Vec<String>,
    /// Warbler: the node's JWT secret file.
    pub jwt_secret_file: Option<PathBuf>,
    /// A CA (PEM) to trust: TLS on when set (Warbler and NATS).
    pub tls_ca_file: Option<PathBuf>,
    /// Warbler cluster, routed by leader: for each partition, the index in `addrs` of the
    /// node that led it when the run started. Empty: connections are spread in turn.
    #[serde(default)]
    pub leaders: Vec<usize>,
    /// Devices connect to their user's leader too (else only publishes are routed).
    #[serde(default)]
    pub route_devices: bool,
    /// Routed by leader: the HTTP address the routes are read from again during the run
    /// (every [`ROUTES_EVERY`]), so that publishes follow leaders that move.
    #[serde(default)]
    pub routes_from: Option<String>,
}

/// How often a publisher routed by leader reads the routes again.
pub const ROUTES_EVERY: Duration = Duration::from_secs(1);

/// By partition, the index in `addrs` of its leader's client address as `routes` has it:
/// `None` where no leader is known (an election) or its address is not among `addrs`.
pub fn leader_indices(routes: &Routes, addrs: &[String]) -> Vec<Option<usize>> {
    routes
        .leaders
        .iter()
        .map(|leader| {
            addrs
                .iter()
                .position(|a| Some(a.as_str()) == leader.as_deref())
        })
        .collect()
}

impl Target {
    pub fn addr(&self, i: usize) -> &str {
        &self.addrs[i % self.addrs.len()]
    }

    /// Where `user`'s devices connect: its partition's leader when devices are routed by
    /// leader, else the `i`-th address in turn.
    pub fn device_addr(&self, user: &str, i: usize) -> &str {
        match self.leader_of(user).filter(|_| self.route_devices) {
            Some(n) => &self.addrs[n],
            None => self.addr(i),
        }
    }

    /// The index in `addrs` of `user`'s partition's leader, when routed by leader.
    pub fn leader_of(&self, user: &str) -> Option<usize> {
        (!self.leaders.is_empty()).then(|| self.leaders[usize::from(partition_of(user))])
    }

    fn secret(&self) -> anyhow::Result<Vec<u8>> {
        let path = self
            .jwt_secret_file
            .as_ref()
            .context("--jwt-secret-file is required for --system warbler")?;
        tokens::read_secret(path)
    }

    fn warbler_options(
        &self,
        addr: &str,
        token: String,
        device: String,
    ) -> anyhow::Result<ConnectOptions> {
        let opts = ConnectOptions::new(addr, token, device);
        Ok(match &self.tls_ca_file {
            None => opts,
            Some(ca) => opts.with_tls(TlsOptions {
                server_name: "localhost".into(),
                ca_pem: std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            }),
        })
    }

    async fn nats_client(&self, i: usize) -> anyhow::Result<async_nats::Client> {
        let mut opts =
            async_nats::ConnectOptions::new().request_timeout(Some(Duration::from_secs(30)));
        if let Some(ca) = &self.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        let addr = self.addr(i);
        // A server that has only just started may not take connections yet (or may restart
        // its listener while JetStream starts): try again for a few seconds before failing.
        let mut attempt = 0;
        loop {
            match opts.clone().connect(addr).await {
                Ok(client) => return Ok(client),
                Err(e) if attempt < NATS_CONNECT_ATTEMPTS => {
                    attempt += 1;
                    eprintln!("connecting to NATS at {addr}: {e}; trying again ({attempt})");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to NATS at {addr}"));
                }
            }
        }
    }

    fn mqtt_options(&self, i: usize, client_id: String) -> anyhow::Result<rumqttc::MqttOptions> {
        let addr = self.addr(i);
        let (host, port) = addr
            .rsplit_once(':')
            .with_context(|| format!("MQTT address {addr:?} is not host:port"))?;
        let port = port
            .parse()
            .with_context(|| format!("bad port in {addr:?}"))?;
        let mut o = rumqttc::MqttOptions::new(client_id, host, port);
        o.set_keep_alive(Duration::from_secs(60));
        Ok(o)
    }
}

/// What one publisher sends: its users in turn, at a fixed rate (open loop) or as fast as
/// its window of unanswered publishes allows (`interval_ns == 0`). The window also bounds
/// the open loop, whose latency still counts from each message's intended send time.
pub struct Plan {
    pub users: Vec<String>,
    pub body_bytes: usize,
    pub start: Instant,
    pub start_ns: u64,
    pub interval_ns: u64,
    pub deadline: Instant,
    pub window: Arc<Semaphore>,
    numbers: Vec<u64>,
    k: u64,
}

/// One publish the plan wants sent now.
pub struct Publish {
    pub k: u64,
    pub user: usize,
    pub due_ns: u64,
    pub body: Vec<u8>,
}

impl Plan {
    pub fn new(
        users: Vec<String>,
        body_bytes: usize,
        start: Instant,
        start_ns: u64,
        interval_ns: u64,
        duration: Duration,
        window: usize,
    ) -> Self {
        let n = users.len();
        Self {
            users,
            body_bytes: body_bytes.max(HEADER_BYTES),
            start,
            start_ns,
            interval_ns,
            deadline: start + duration,
            window: Arc::new(Semaphore::new(window)),
            numbers: vec![0; n],
            k: 0,
        }
    }

    /// Waits until the next publish is due and a window slot is free; `None` at the end.
    pub async fn next(&mut self) -> Option<Publish> {
        if self.users.is_empty() {
            return None;
        }
        if self.interval_ns > 0 {
            let at = self.start + Duration::from_nanos(self.k * self.interval_ns);
            tokio::time::sleep_until(at.into()).await;
        }
        if Instant::now() >= self.deadline {
            return None;
        }
        let permit = self.window.acquire().await.expect("never closed");
        if Instant::now() >= self.deadline {
            return None; // the permit goes back: nothing was sent
        }
        permit.forget();
        let due_ns = if self.interval_ns > 0 {
            self.start_ns + self.k * self.interval_ns
        } else {
            now_ns()
        };
        let user = (self.k % self.users.len() as u64) as usize;
        self.numbers[user] += 1;
        let mut body = vec![b'x'; self.body_bytes];
        stamp_body(&mut body, due_ns, self.numbers[user]);
        let send = Publish {
            k: self.k,
            user,
            due_ns,
            body,
        };
        self.k += 1;
        Some(send)
    }

    /// A publish was answered (acked or refused): its window slot is free again.
    pub fn releaser(&self) -> Arc<Semaphore> {
        self.window.clone()
    }
}

/// Connects one device of `user` and spawns the task that receives, checks and acks its
/// messages. Returns once the device is subscribed.
pub async fn spawn_device(
    target: Arc<Target>,
    stats: Arc<Stats>,
    user: String,
    device: usize,
    index: usize,
) -> anyhow::Result<()> {
    match target.system {
        System::Warbler => {
            let secret = target.secret()?;
            let opts = target.warbler_options(
                target.device_addr(&user, index),
                tokens::mint(&secret, &user, "device"),
                format!("d{device}"),
            )?;
            let mut conn = Connection::connect(opts).await.context("device connect")?;
            tokio::spawn(async move {
                let mut track = DeviceTrack::default();
                let slow_ms = slow_ms();
                let mut on_msg = |m: &Delivery| {
                    if let (Some(slow), Some((due, _))) = (slow_ms, read_body(&m.body)) {
                        let (due, now) = (due / 1_000_000, now_ns() / 1_000_000);
                        if now.saturating_sub(due) >= slow {
                            say_slow(format!(
                                "slow delivery due_ms={due} accepted_ms={} received_ms={now}",
                                m.ts
                            ));
                        }
                    }
                    track.on_delivery(&stats, &m.body);
                };
                while let Ok(m) = conn.recv_msg().await {
                    on_msg(&m);
                    // What arrived with it is taken too, and one ack covers them all (acks
                    // are cumulative), as the SDK's `recv_msg_ready` suggests.
                    let mut last = m.seq;
                    for _ in 1..ACK_AFTER_AT_MOST {
                        match conn.recv_msg_ready().await {
                            Some(Ok(m)) => {
                                on_msg(&m);
                                last = m.seq;
                            }
                            Some(Err(_)) => return,
                            None => break,
                        }
                    }
                    if conn.ack(last).await.is_err() {
                        return;
                    }
                }
            });
        }
        System::Nats => {
            use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
            let client = target.nats_client(index).await?;
            let js = async_nats::jetstream::new(client);
            let config = pull::Config {
                durable_name: Some(format!("{user}-d{device}")),
                filter_subject: format!("u.{user}"),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            };
            // A stream just created on a cluster takes a moment to be known on every server.
            let mut attempt = 0;
            let consumer = loop {
                let made = match js.get_stream(NATS_STREAM).await {
                    Ok(stream) => stream
                        .create_consumer(config.clone())
                        .await
                        .map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
                match made {
                    Ok(c) => break c,
                    Err(_) if attempt < 40 => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => {
                        return Err(e.context("creating a JetStream consumer on stream WARBLER"))
                    }
                }
            };
            let mut messages = consumer
                .messages()
                .await
                .context("starting a pull consumer")?;
            tokio::spawn(async move {
                let mut track = DeviceTrack::default();
                while let Some(Ok(m)) = messages.next().await {
                    track.on_delivery(&stats, &m.payload);
                    if m.ack().await.is_err() {
                        return;
                    }
                }
            });
        }
        System::Mqtt => {
            use rumqttc::{AsyncClient, Event, Packet, QoS};
            let mut o = target.mqtt_options(index, format!("{user}-d{device}"))?;
            o.set_clean_session(false);
            let (client, mut events) = AsyncClient::new(o, 64);
            client
                .subscribe(format!("u/{user}"), QoS::AtLeastOnce)
                .await?;
            // A broker just started may refuse the first connections: polling again
            // reconnects, as a real client would, a few times before giving up.
            let mut refused = 0;
            loop {
                let event = match events.poll().await {
                    Ok(e) => e,
                    Err(e) if refused < MQTT_CONNECT_TRIES => {
                        refused += 1;
                        eprintln!("MQTT device connect failed ({e}); retrying ({refused})");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(e) => return Err(e).context("MQTT device connect"),
                };
                match event {
                    Event::Incoming(Packet::SubAck(_)) => break,
                    Event::Incoming(Packet::ConnAck(_)) | Event::Outgoing(_) => {}
                    other => bail!("unexpected MQTT event before the subscription: {other:?}"),
                }
            }
            tokio::spawn(async move {
                let _client = client; // dropping it would end the event loop
                let mut track = DeviceTrack::default();
                while let Ok(ev) = events.poll().await {
                    if let Event::Incoming(Packet::Publish(p)) = ev {
                        track.on_delivery(&stats, &p.payload);
                    }
                }
            });
        }
    }
    Ok(())
}

/// A device acknowledges at least every this many messages (the server's delivery window
/// is 256).
const ACK_AFTER_AT_MOST: usize = 32;

/// A publisher's connection writes at most this many queued frames at once.
const FRAMES_PER_WRITE: usize = 64;

/// `WARBLER_LOAD_SLOW_MS`: each Warbler delivery at least this late is printed to stderr
/// with its due, accepted (the node's `ts`) and received times, and each publish sent at
/// least half as late (benches/tail.sh reads them).
fn slow_ms() -> Option<u64> {
    std::env::var("WARBLER_LOAD_SLOW_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|ms| *ms > 0)
}

/// Prints one `WARBLER_LOAD_SLOW_MS` line in one write: the load processes share stderr.
fn say_slow(mut line: String) {
    line.push('\n');
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

/// How long a publisher waits before sending refused publishes again (the server's
/// `overloaded` asks for 50 ms).
const RESEND_AFTER: Duration = Duration::from_millis(50);

/// A publish's plan key, from its id `<publisher>-<k>`.
fn key_of(id: &str) -> Option<u64> {
    id.rsplit('-').next().and_then(|k| k.parse().ok())
}

fn publish_frame(name: &str, to: &str, k: u64, body: Vec<u8>) -> Frame {
    Frame::Publish {
        id: format!("{name}-{k}"),
        to: to.to_string(),
        body: serde_bytes::ByteBuf::from(body),
    }
}

/// k → (user, (due time, body)) for every publish of a Warbler publisher not acknowledged
/// yet, and the connection each user's publishes go on.
type Unanswered = (GoBackN<usize, (u64, Vec<u8>)>, Sticky<usize>);

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the routes from `http` every [`ROUTES_EVERY`] into `leaders` (by partition, the
/// index in `addrs` of its leader) until dropped. A partition without a known leader keeps
/// its last one. Counts the partitions whose leader moved into `moves`.
fn follow_routes(
    http: String,
    secret: &[u8],
    addrs: Vec<String>,
    leaders: Arc<std::sync::RwLock<Vec<usize>>>,
    moves: Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let node = NodeHttp::new(http).with_token(tokens::mint(secret, "load-routes", "publish"));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(ROUTES_EVERY);
        every.tick().await;
        loop {
            every.tick().await;
            let Ok(routes) = node.routes().await else {
                continue;
            };
            let read = leader_indices(&routes, &addrs);
            let mut leaders = leaders.write().unwrap();
            for (p, n) in read.into_iter().enumerate() {
                if let (Some(n), Some(old)) = (n, leaders.get_mut(p)) {
                    if *old != n {
                        *old = n;
                        moves.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
    })
}

/// Connects publisher `index` and sends its plan; returns when the plan is done (answers
/// still in flight keep arriving afterwards).
pub async fn run_publisher(
    target: Arc<Target>,
    stats: Arc<Stats>,
    name: String,
    index: usize,
    mut plan: Plan,
) -> anyhow::Result<()> {
    let free = plan.releaser();
    let window = plan.window.available_permits();
    match target.system {
        System::Warbler => {
            let secret = target.secret()?;
            // Routed by leader: a connection to every node, and each publish goes on its
            // user's leader's. Else one connection.
            let addrs: Vec<&str> = if target.leaders.is_empty() {
                vec![target.addr(index)]
            } else {
                target.addrs.iter().map(String::as_str).collect()
            };
            let users = Arc::new(plan.users.clone());
            // By user: its partition, whose leader's connection its publishes want.
            let partition: Vec<usize> =
                users.iter().map(|u| usize::from(partition_of(u))).collect();
            let leaders = Arc::new(std::sync::RwLock::new(target.leaders.clone()));
            let moves = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let _follow = match (&target.routes_from, target.leaders.is_empty()) {
                (Some(http), false) => Some(AbortOnDrop(follow_routes(
                    http.clone(),
                    &secret,
                    target.addrs.clone(),
                    leaders.clone(),
                    moves.clone(),
                ))),
                _ => None,
            };
            let resend: Arc<Mutex<Unanswered>> = Arc::default();
            let mut senders = Vec::new();
            let mut receivers = Vec::new();
            for (j, addr) in addrs.iter().enumerate() {
                let device = if addrs.len() == 1 {
                    name.clone()
                } else {
                    format!("{name}-c{j}")
                };
                let opts = target.warbler_options(
                    addr,
                    tokens::mint(&secret, "load-publisher", "publish"),
                    device,
                )?;
                let (mut tx, rx) = Connection::connect(opts)
                    .await
                    .context("publisher connect")?
                    .split();
                let (frames, mut to_send) = tokio::sync::mpsc::unbounded_channel::<Frame>();
                tokio::spawn(async move {
                    // Frames queued meanwhile leave in the same write, as a pipelining
                    // client (and the MQTT client's event loop) sends them.
                    while let Some(frame) = to_send.recv().await {
                        if tx.feed(frame).await.is_err() {
                            return;
                        }
                        for _ in 1..FRAMES_PER_WRITE {
                            let Ok(frame) = to_send.try_recv() else { break };
                            if tx.feed(frame).await.is_err() {
                                return;
                            }
                        }
                        if tx.flush().await.is_err() {
                            return;
                        }
                    }
                });
                senders.push(frames);
                receivers.push(rx);
            }
            let senders = Arc::new(senders);
            for mut rx in receivers {
                let (resend2, stats2, senders2) = (resend.clone(), stats.clone(), senders.clone());
                let (users, name2, free) = (users.clone(), name.clone(), free.clone());
                tokio::spawn(async move {
                    loop {
                        let (k, refused) = match rx.recv().await {
                            Ok(Frame::Published { id, .. }) => (key_of(&id), false),
                            Err(warbler_client::ClientError::Server { id: Some(id), .. }) => {
                                (key_of(&id), true)
                            }
                            Ok(_) | Err(warbler_client::ClientError::Server { .. }) => continue,
                            Err(_) => return,
                        };
                        let Some(k) = k else { continue };
                        let flush = {
                            let r = &mut resend2.lock().unwrap().0;
                            if refused {
                                stats2.on_refused();
                                r.refused(k)
                            } else {
                                let (done, flush) = r.done(k);
                                if let Some((due, _)) = done {
                                    stats2.on_ack(due);
                                    free.add_permits(1);
                                }
                                flush
                            }
                        };
                        if let Some(user) = flush {
                            let (resend, senders, users, name) = (
                                resend2.clone(),
                                senders2.clone(),
                                users.clone(),
                                name2.clone(),
                            );
                            tokio::spawn(async move {
                                tokio::time::sleep(RESEND_AFTER).await;
                                // Held publishes go again where they were refused.
                                let (again, conn): (Vec<(u64, Vec<u8>)>, usize) = {
                                    let (r, on) = &mut *resend.lock().unwrap();
                                    let keys = r.flush(&user);
                                    let again = keys
                                        .into_iter()
                                        .filter_map(|k| r.get(k).map(|(_, (_, b))| (k, b.clone())))
                                        .collect();
                                    (again, on.on(&user).unwrap_or(0))
                                };
                                let frames = &senders[conn];
                                for (k, body) in again {
                                    let frame = publish_frame(&name, &users[user], k, body);
                                    let _ = frames.send(frame);
                                }
                            });
                        }
                    }
                });
            }
            let slow_ms = slow_ms();
            while let Some(s) = plan.next().await {
                if let Some(slow) = slow_ms {
                    // The load generator's own lateness, which the latency counts too.
                    let late = now_ns().saturating_sub(s.due_ns) / 1_000_000;
                    if late >= slow / 2 {
                        say_slow(format!(
                            "late send due_ms={} late_ms={late}",
                            s.due_ns / 1_000_000
                        ));
                    }
                }
                let (send, conn) = {
                    let (r, on) = &mut *resend.lock().unwrap();
                    let wanted = if senders.len() == 1 {
                        0
                    } else {
                        leaders.read().unwrap()[partition[s.user]]
                    };
                    let conn = on.pick(r, &s.user, wanted);
                    (r.send(s.k, s.user, (s.due_ns, s.body.clone())), conn)
                };
                if send {
                    let frame = publish_frame(&name, &plan.users[s.user], s.k, s.body);
                    senders[conn]
                        .send(frame)
                        .context("publisher connection lost")?;
                }
            }
            answered(&plan.window, window).await;
            let moved = moves.load(std::sync::atomic::Ordering::Relaxed);
            if moved > 0 {
                eprintln!(
                    "{name}: {moved} leader moves seen during the run; its publishes followed them"
                );
            }
        }
        System::Nats => {
            let client = target.nats_client(index).await?;
            let js = async_nats::jetstream::context::ContextBuilder::new()
                .max_ack_inflight(window)
                .timeout(Duration::from_secs(30))
                .build(client);
            while let Some(s) = plan.next().await {
                let subject = format!("u.{}", plan.users[s.user]);
                let (stats, free) = (stats.clone(), free.clone());
                match js.publish(subject, s.body.into()).await {
                    Ok(ack) => {
                        tokio::spawn(async move {
                            match ack.await {
                                Ok(_) => stats.on_ack(s.due_ns),
                                Err(_) => stats.on_error(),
                            }
                            free.add_permits(1);
                        });
                    }
                    Err(_) => {
                        stats.on_error();
                        free.add_permits(1);
                    }
                }
            }
            answered(&plan.window, window).await;
        }
        System::Mqtt => {
            use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
            let mut o = target.mqtt_options(index, name)?;
            o.set_inflight(window.min(u16::MAX as usize - 1) as u16);
            let (client, mut events) = AsyncClient::new(o, window);
            // Requests leave in order, so the event loop's n-th outgoing publish is the n-th
            // queued due time; its packet id then finds it again at the PUBACK.
            let queued: Arc<Mutex<VecDeque<u64>>> = Arc::default();
            let queued2 = queued.clone();
            let (up_tx, up_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let mut up = Some(up_tx);
                let mut in_flight: HashMap<u16, u64> = HashMap::new();
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if let Some(up) = up.take() {
                                let _ = up.send(());
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            if let Some(t) = queued2.lock().unwrap().pop_front() {
                                in_flight.insert(pkid, t);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(a))) => {
                            if let Some(t) = in_flight.remove(&a.pkid) {
                                stats.on_ack(t);
                                free.add_permits(1);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            stats.on_error();
                            return;
                        }
                    }
                }
            });
            up_rx.await.context("MQTT publisher could not connect")?;
            while let Some(s) = plan.next().await {
                queued.lock().unwrap().push_back(s.due_ns);
                let topic = format!("u/{}", plan.users[s.user]);
                client
                    .publish(topic, QoS::AtLeastOnce, false, s.body)
                    .await
                    .context("MQTT publisher stopped")?;
            }
            // Keep the client (and so the event loop) until the answers are in.
            answered(&plan.window, window).await;
            drop(client);
        }
    }
    Ok(())
}

/// Waits (10 s at most) until every publish sent has been answered: the window is whole.
async fn answered(window: &Semaphore, size: usize) {
    let until = Instant::now() + Duration::from_secs(10);
    while window.available_permits() < size && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deletes and creates the stream of a NATS run, with `replicas` copies and, when `tag` is
/// set, placed on the server carrying that tag.
pub async fn reset_nats_stream(
    target: &Target,
    replicas: usize,
    tag: Option<String>,
) -> anyhow::Result<()> {
    use async_nats::jetstream::stream::{Config, Placement, StorageType};
    let js = async_nats::jetstream::new(target.nats_client(0).await?);
    let config = Config {
        name: NATS_STREAM.into(),
        subjects: vec!["u.>".into()],
        storage: StorageType::File,
        num_replicas: replicas,
        placement: tag.map(|t| Placement {
            cluster: None,
            tags: vec![t],
        }),
        ..Default::default()
    };
    // A server just started may not serve JetStream yet (and a cluster may have no meta
    // leader yet): ask again for up to 10 s, as an application would.
    let mut attempt = 0;
    loop {
        let _ = js.delete_stream(NATS_STREAM).await;
        match js.create_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 40 => {
                attempt += 1;
                eprintln!("creating the JetStream stream failed ({e}); retrying ({attempt})");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).context("creating the JetStream stream"),
        }
    }
}

/// Opens one idle device connection (no traffic) and returns what keeps it open.
pub async fn idle_device(
    target: &Target,
    user: String,
    index: usize,
) -> anyhow::Result<Box<dyn std::any::Any + Send>> {
    Ok(match target.system {
        System::Warbler => {
            let secret = target.secret()?;
            let opts = target.warbler_options(
                target.device_addr(&user, index),
                tokens::mint(&secret, &user, "device"),
                "d0".into(),
            )?;
            Box::new(Connection::connect(opts).await.context("device connect")?)
        }
        System::Nats => {
            // A core-NATS subscription to the user's subject: the lightest device NATS has.
            let client = target.nats_client(index).await?;
            let sub = client.subscribe(format!("u.{user}")).await?;
            client.flush().await?;
            Box::new((client, sub))
        }
        System::Mqtt => bail!("idle connections are measured for warbler and nats"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(leaders: Vec<usize>, route_devices: bool) -> Target {
        Target {
            system: System::Warbler,
            addrs: vec!["a:1".into(), "b:1".into(), "c:1".into()],
            jwt_secret_file: None,
            tls_ca_file: None,
            leaders,
            route_devices,
            routes_from: None,
        }
    }

    #[test]
    fn leader_indices_name_each_partitions_leader_among_the_addresses() {
        let t = target(Vec::new(), true);
        let routes = Routes {
            node: "n0".into(),
            partition_count: 3,
            leaders: vec![Some("c:1".into()), None, Some("elsewhere:1".into())],
        };
        assert_eq!(leader_indices(&routes, &t.addrs), vec![Some(2), None, None]);
    }

    #[test]
    fn routed_devices_and_publishes_go_to_their_users_leader() {
        // Partition p is led by node p % 3.
        let leaders: Vec<usize> = (0..usize::from(PARTITIONS)).map(|p| p % 3).collect();
        let user = "route-me";
        let lead = usize::from(partition_of(user)) % 3;
        let routed = target(leaders.clone(), true);
        assert_eq!(routed.leader_of(user), Some(lead));
        for i in 0..3 {
            assert_eq!(routed.device_addr(user, i), routed.addrs[lead]);
        }
        // Publishes only: devices keep spreading in turn.
        let publishes = target(leaders, false);
        assert_eq!(publishes.leader_of(user), Some(lead));
        assert_eq!(
            publishes.device_addr(user, lead + 1),
            publishes.addr(lead + 1)
        );
        // Not routed at all.
        let spread = target(Vec::new(), false);
        assert_eq!(spread.leader_of(user), None);
        assert_eq!(spread.device_addr(user, 2), "c:1");
    }
}
