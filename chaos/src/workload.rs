//! The workload: publishers on every node that retry each message with the same id until it
//! is acknowledged, and devices that connect to random nodes, ack what they get, and
//! disconnect at random. Everything goes into the [`Recorder`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use warbler_client::resend::GoBackN;
use warbler_client::{ClientError, ConnectOptions, Connection, Frame, Sender};

use crate::auth::token;
use crate::history::{Event, Outcome, Recorder};
use crate::scenario::Workload;

/// The user most publishes go to; `hot-leader` faults target its partition's leader.
pub const HOT_USER: &str = "u0";

/// Error codes after which the server has certainly stored nothing.
const DEFINITE: [&str; 5] = [
    "bad_request",
    "forbidden",
    "body_too_large",
    "unauthorized",
    "frame_too_large",
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A device that hears nothing for this long pings; no answer in as long again, it
/// reconnects elsewhere.
const KEEPALIVE: Duration = Duration::from_secs(2);

/// The body every publisher sends: the id, padded to `len` bytes with dots.
pub fn body_for(id: &str, len: usize) -> Vec<u8> {
    let mut b = id.as_bytes().to_vec();
    if b.len() < len {
        b.resize(len, b'.');
    }
    b
}

fn body_matches(id: &str, body: &[u8]) -> bool {
    body.starts_with(id.as_bytes()) && body[id.len()..].iter().all(|&c| c == b'.')
}

pub(crate) async fn connect(
    addr: &str,
    user: &str,
    scope: &str,
    device: &str,
) -> Option<Connection> {
    let opts = ConnectOptions::new(addr, token(user, scope), device);
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(opts)).await {
        Ok(Ok(c)) => Some(c),
        _ => None,
    }
}

/// The user publisher `rng`'s next publish goes to.
fn pick_user(rng: &mut StdRng, w: &Workload) -> String {
    if w.users == 1 || rng.gen_bool(w.hot_share) {
        HOT_USER.to_string()
    } else {
        format!("u{}", rng.gen_range(1..w.users))
    }
}

/// Publisher `k` of `publishers`: starts on node `k % nodes`, moves to the next node when
/// its node fails. Closed loop, or open loop when `workload.offered_per_s` is set.
pub async fn publisher(
    (k, publishers): (u32, u32),
    clients: Arc<Vec<String>>,
    w: Workload,
    seed: u64,
    rec: Recorder,
    stop: Arc<AtomicBool>,
) {
    let rng = StdRng::seed_from_u64(seed ^ (0x9e37_79b9 * u64::from(k + 1)));
    if w.offered_per_s > 0.0 {
        let rate = w.offered_per_s / f64::from(publishers.max(1));
        open_loop_publisher(k, rate, rng, clients, &w, &rec, &stop).await
    } else {
        closed_loop_publisher(k, rng, clients, &w, &rec, &stop).await
    }
}

/// Publishes one message at a time, each retried with its id until it is answered.
async fn closed_loop_publisher(
    k: u32,
    mut rng: StdRng,
    clients: Arc<Vec<String>>,
    w: &Workload,
    rec: &Recorder,
    stop: &AtomicBool,
) {
    let mut node = k as usize % clients.len();
    let mut conn: Option<Connection> = None;
    let mut n = 0u64;
    'ids: while !stop.load(Ordering::Relaxed) {
        let user = pick_user(&mut rng, w);
        let id = format!("p{k}-{n}");
        n += 1;
        let body = body_for(&id, w.body_bytes);
        let mut attempt = 0;
        loop {
            if stop.load(Ordering::Relaxed) {
                break 'ids;
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match connect(
                    &clients[node],
                    "chaos-backend",
                    "publish",
                    &format!("pub{k}"),
                )
                .await
                {
                    Some(c) => conn.insert(c),
                    None => {
                        node = (node + 1) % clients.len();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            attempt += 1;
            let t = rec.now();
            let answer = tokio::time::timeout(
                Duration::from_millis(w.publish_timeout_ms),
                c.publish_wait(&id, &user, &body),
            )
            .await;
            let (outcome, retry, drop_conn) = match answer {
                Ok(Ok(seq)) => (Outcome::Ok { seq }, false, false),
                Ok(Err(ClientError::Server { code, .. })) if DEFINITE.contains(&code.as_str()) => {
                    (Outcome::Failed { code }, false, false)
                }
                Ok(Err(ClientError::Server { code, .. })) => {
                    (Outcome::Unknown { why: code }, true, false)
                }
                Ok(Err(e)) => (Outcome::Unknown { why: e.to_string() }, true, true),
                Err(_) => (
                    Outcome::Unknown {
                        why: "timeout".into(),
                    },
                    true,
                    true,
                ),
            };
            rec.record(Event::Publish {
                t,
                end: rec.now(),
                publisher: k,
                node,
                user: user.clone(),
                id: id.clone(),
                attempt,
                outcome,
            });
            if drop_conn {
                conn = None;
                node = (node + 1) % clients.len();
            }
            if !retry {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if w.think_ms > 0 {
            tokio::time::sleep(Duration::from_millis(w.think_ms)).await;
        }
    }
}

/// The pause the server's `overloaded` asks for before a refused publish goes again.
const RESEND_AFTER_MS: f64 = 50.0;

/// How often an open-loop publisher offers its next publishes and looks at its timers.
const OPEN_LOOP_TICK: Duration = Duration::from_millis(10);

/// One publish an open-loop publisher has not had answered for good.
struct Pending {
    id: String,
    body: Vec<u8>,
    attempt: u32,
    /// When the current attempt was sent (ms into the run); `None` while it waits to be
    /// sent again.
    sent: Option<f64>,
}

/// An open-loop publisher's state that outlives its connections.
struct OpenLoop {
    k: u32,
    rec: Recorder,
    node: usize,
    open: GoBackN<String, Pending>,
}

impl OpenLoop {
    /// Records the end of `key`'s current attempt.
    fn answered(&mut self, key: u64, outcome: Outcome) {
        let now = self.rec.now();
        let Some((user, p)) = self.open.get_mut(key) else {
            return;
        };
        let Some(t) = p.sent.take() else { return };
        self.rec.record(Event::Publish {
            t,
            end: now,
            publisher: self.k,
            node: self.node,
            user: user.clone(),
            id: p.id.clone(),
            attempt: p.attempt,
            outcome,
        });
    }

    /// Every attempt in flight ends with an unknown outcome (`why`).
    fn lost(&mut self, why: &str) {
        let keys: Vec<u64> = self
            .open
            .iter_mut()
            .filter(|(_, (_, p))| p.sent.is_some())
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.answered(key, Outcome::Unknown { why: why.into() });
        }
    }

    /// Sends `keys` in this order as new attempts.
    async fn send(&mut self, tx: &mut Sender, keys: &[u64]) -> Result<(), ClientError> {
        if keys.is_empty() {
            return Ok(());
        }
        for &key in keys {
            let Some((user, p)) = self.open.get_mut(key) else {
                continue;
            };
            p.attempt += 1;
            p.sent = Some(self.rec.now());
            tx.feed(Frame::Publish {
                id: p.id.clone(),
                to: user.clone(),
                body: p.body.clone().into(),
            })
            .await?;
        }
        tx.flush().await
    }
}

/// Publisher `k` in open loop (`workload.offered_per_s` > 0): offers `rate` publishes a
/// second whatever the cluster answers, keeps up to `window` unanswered on its connection,
/// and sends refused ones again go-back-N (docs/protocol.md, "Order"). A lost connection or
/// an answer overdue by `publish_timeout_ms` ends every attempt in flight as unknown; every
/// open publish then goes again, in order, through the next node. After `stop` it offers
/// nothing new and waits up to `publish_timeout_ms` for the answers still due.
async fn open_loop_publisher(
    k: u32,
    rate: f64,
    mut rng: StdRng,
    clients: Arc<Vec<String>>,
    w: &Workload,
    rec: &Recorder,
    stop: &AtomicBool,
) {
    let timeout = w.publish_timeout_ms as f64;
    let mut me = OpenLoop {
        k,
        rec: rec.clone(),
        node: k as usize % clients.len(),
        open: GoBackN::default(),
    };
    let mut n = 0u64;
    let mut stopped_at: Option<f64> = None;
    // Stopped, and nothing is left to wait for: every answer came, or the time is up.
    let finished = |stopped_at: &mut Option<f64>, open: &GoBackN<String, Pending>, now: f64| {
        let since = *stopped_at.get_or_insert(now);
        open.is_empty() || now - since > timeout
    };
    loop {
        if stop.load(Ordering::Relaxed) && finished(&mut stopped_at, &me.open, rec.now()) {
            return;
        }
        let Some(conn) = connect(
            &clients[me.node],
            "chaos-backend",
            "publish",
            &format!("pub{k}"),
        )
        .await
        else {
            me.node = (me.node + 1) % clients.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (mut tx, mut rx) = conn.split();
        let again = me.open.reconnected();
        let mut why = me.send(&mut tx, &again).await.err().map(|e| e.to_string());
        let mut tick = tokio::time::interval(OPEN_LOOP_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = rec.now();
        let mut credit = 0.0f64;
        let mut ticks = 0u64;
        // Recipients whose refused publishes go again at the given time.
        let mut flushes: Vec<(f64, String)> = Vec::new();
        while why.is_none() {
            tokio::select! {
                _ = tick.tick() => {
                    let now = rec.now();
                    let mut keys = Vec::new();
                    flushes.retain(|(at, user)| {
                        let due = *at <= now;
                        if due {
                            keys.extend(me.open.flush(user));
                        }
                        !due
                    });
                    if stop.load(Ordering::Relaxed) {
                        if finished(&mut stopped_at, &me.open, now) {
                            why = Some("stopped".into());
                            break;
                        }
                    } else {
                        credit = (credit + rate * (now - last) / 1e3).min(w.window as f64);
                        while credit >= 1.0 && me.open.len() < w.window {
                            credit -= 1.0;
                            let user = pick_user(&mut rng, w);
                            let id = format!("p{k}-{n}");
                            let body = body_for(&id, w.body_bytes);
                            let pending = Pending { id, body, attempt: 0, sent: None };
                            if me.open.send(n, user, pending) {
                                keys.push(n);
                            }
                            n += 1;
                        }
                        if me.open.len() >= w.window {
                            credit = credit.min(1.0);
                        }
                    }
                    last = now;
                    // Overdue answers are looked for every tenth tick: a whole window to scan.
                    ticks += 1;
                    let overdue = ticks.is_multiple_of(10)
                        && me
                            .open
                            .iter_mut()
                            .any(|(_, (_, p))| p.sent.is_some_and(|t| now - t > timeout));
                    if overdue {
                        why = Some("timeout".into());
                    } else if let Err(e) = me.send(&mut tx, &keys).await {
                        why = Some(e.to_string());
                    }
                }
                got = rx.recv() => {
                    let (id, refused) = match got {
                        Ok(Frame::Published { id, seq, .. }) => (id, Ok(seq)),
                        Err(ClientError::Server { code, id: Some(id), .. }) => (id, Err(code)),
                        Ok(_) | Err(ClientError::Server { id: None, .. }) => continue,
                        Err(e) => {
                            why = Some(e.to_string());
                            continue;
                        }
                    };
                    let Some(key) = id.rsplit('-').next().and_then(|n| n.parse().ok()) else {
                        continue;
                    };
                    let flush = match refused {
                        Ok(seq) => {
                            me.answered(key, Outcome::Ok { seq });
                            me.open.done(key).1
                        }
                        Err(code) if DEFINITE.contains(&code.as_str()) => {
                            me.answered(key, Outcome::Failed { code });
                            me.open.done(key).1
                        }
                        Err(code) => {
                            me.answered(key, Outcome::Unknown { why: code });
                            me.open.refused(key)
                        }
                    };
                    if let Some(user) = flush {
                        flushes.push((rec.now() + RESEND_AFTER_MS, user));
                    }
                }
            }
        }
        let why = why.unwrap_or_default();
        me.lost(&why);
        if why == "stopped" {
            return;
        }
        me.node = (me.node + 1) % clients.len();
    }
}

/// What a device session ended with.
enum SessionEnd {
    Stop,
    Reached,
    Lost(String),
    Planned,
}

/// Reads from `conn` (recording every delivery and acking it) until `stop`, until the
/// session's `lifetime` ends, until it reached `upto`, or until the connection fails.
/// Who reads, and where deliveries are recorded.
struct Reader<'a> {
    device: &'a str,
    user: &'a str,
    rec: &'a Recorder,
}

async fn session(
    conn: &mut Connection,
    r: &Reader<'_>,
    stop: &AtomicBool,
    lifetime: Duration,
    upto: Option<u64>,
    reached: &mut u64,
) -> SessionEnd {
    let until = tokio::time::Instant::now() + lifetime;
    let mut heard = tokio::time::Instant::now();
    let mut ping_sent: Option<tokio::time::Instant> = None;
    loop {
        if upto.is_some_and(|u| *reached >= u) {
            return SessionEnd::Reached;
        }
        if stop.load(Ordering::Relaxed) {
            return SessionEnd::Stop;
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return SessionEnd::Planned;
        }
        // Keepalive, as a real client does: a server that answers nothing for a while
        // (dead, paused, cut off) is given up on.
        match ping_sent {
            Some(at) if now - at > KEEPALIVE => {
                return SessionEnd::Lost(format!("no answer to a ping within {KEEPALIVE:?}"))
            }
            None if now - heard > KEEPALIVE => {
                if let Err(e) = conn.send(Frame::Ping { n: 1 }).await {
                    return SessionEnd::Lost(e.to_string());
                }
                ping_sent = Some(now);
            }
            _ => {}
        }
        let frame = match tokio::time::timeout(Duration::from_millis(250), conn.recv()).await {
            Err(_) => continue,
            // A notice before a jump in seq (age retention, which the workload never sets
            // up): read on as a client would, and let the checker judge the jump.
            Ok(Err(ClientError::Server { code, .. })) if code == "messages_expired" => continue,
            Ok(Err(e)) => return SessionEnd::Lost(e.to_string()),
            Ok(Ok(f)) => f,
        };
        heard = tokio::time::Instant::now();
        ping_sent = None;
        let Frame::Msg { seq, id, body, .. } = frame else {
            continue;
        };
        r.rec.record(Event::Deliver {
            t: r.rec.now(),
            device: r.device.to_string(),
            user: r.user.to_string(),
            seq,
            body_ok: body_matches(&id, &body),
            id,
        });
        *reached = (*reached).max(seq);
        if let Err(e) = conn.ack(seq).await {
            return SessionEnd::Lost(e.to_string());
        }
    }
}

/// A device of `user` during the run: connects to a random node, stays for a random time
/// (exponential, mean `reconnect_mean_s`), disconnects and connects again.
pub async fn device(
    user: String,
    device: String,
    clients: Arc<Vec<String>>,
    w: Workload,
    seed: u64,
    rec: Recorder,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let name = format!("{user}/{device}");
    let mut reached = 0;
    while !stop.load(Ordering::Relaxed) {
        let node = rng.gen_range(0..clients.len());
        let Some(mut conn) = connect(&clients[node], &user, "device", &device).await else {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(50..300))).await;
            continue;
        };
        rec.record(Event::Connect {
            t: rec.now(),
            device: name.clone(),
            user: user.clone(),
            node,
            cursor: conn.acked,
        });
        let u: f64 = rng.gen_range(1e-6..1.0);
        let lifetime = Duration::from_secs_f64(-u.ln() * w.reconnect_mean_s);
        let reader = Reader {
            device: &name,
            user: &user,
            rec: &rec,
        };
        let why = match session(&mut conn, &reader, &stop, lifetime, None, &mut reached).await {
            SessionEnd::Lost(e) => e,
            SessionEnd::Planned => "planned".into(),
            SessionEnd::Stop | SessionEnd::Reached => "stop".into(),
        };
        drop(conn);
        rec.record(Event::Disconnect {
            t: rec.now(),
            device: name.clone(),
            why,
        });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..500))).await;
    }
}

/// The final read, after every fault is healed: the device connects (to any node that
/// takes it) and reads until it has seq `upto`, or gives up after `within`.
pub async fn drain(
    user: String,
    device: String,
    clients: Arc<Vec<String>>,
    upto: u64,
    within: Duration,
    rec: Recorder,
) {
    let name = format!("{user}/{device}");
    let deadline = tokio::time::Instant::now() + within;
    let never = AtomicBool::new(false);
    let mut reached = 0;
    let mut node = 0;
    while tokio::time::Instant::now() < deadline {
        let Some(mut conn) =
            connect(&clients[node % clients.len()], &user, "device", &device).await
        else {
            node += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        rec.record(Event::Connect {
            t: rec.now(),
            device: name.clone(),
            user: user.clone(),
            node: node % clients.len(),
            cursor: conn.acked,
        });
        reached = reached.max(conn.acked);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let reader = Reader {
            device: &name,
            user: &user,
            rec: &rec,
        };
        let end = session(&mut conn, &reader, &never, left, Some(upto), &mut reached).await;
        let why = match end {
            SessionEnd::Reached => {
                rec.record(Event::Disconnect {
                    t: rec.now(),
                    device: name.clone(),
                    why: "drained".into(),
                });
                break;
            }
            SessionEnd::Lost(e) => e,
            SessionEnd::Planned | SessionEnd::Stop => "final read timed out".into(),
        };
        rec.record(Event::Disconnect {
            t: rec.now(),
            device: name.clone(),
            why,
        });
        node += 1;
    }
    rec.record(Event::Drained {
        t: rec.now(),
        device: name,
        user,
        upto,
        reached,
    });
}
