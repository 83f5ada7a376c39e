//! Cluster membership and failure detection: SWIM (foca) over UDP.
//!
//! foca is sans-IO; this module is its driver. One task owns the `Foca` instance and takes
//! inputs from one channel (datagrams, due timers, announces, leave); one scheduler task
//! holds every pending timer in a min-heap and delivers each, in deadline order (foca
//! requires every timer, in order); one task reads the UDP socket. The live view of the
//! cluster is published on a `watch` channel.
//!
//! A node's identity is its gossip address, its stable name and a per-start generation: a
//! restarted node (same address, higher generation) replaces its old self at once, and
//! `renew` lets a node that was wrongly declared down rejoin under a new generation.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use foca::{Config, Foca, Identity, OwnedNotification, PostcardCodec, Timer};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Inputs queued for the foca task. Bounded: a flood of datagrams waits rather than
/// growing memory.
const INPUT_QUEUE_MAX: usize = 1024;
/// How often a node that knows no member announces itself to its seeds again.
const SEED_RETRY: Duration = Duration::from_secs(1);

/// A member's identity on the gossip layer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeId {
    /// The node's stable name (the pod name in a StatefulSet).
    pub name: String,
    /// Where its gossip (UDP) is reached.
    pub gossip: SocketAddr,
    /// Bumped on every start (and on `renew`): the higher one wins.
    pub generation: u64,
}

/// The gossip address is the identity's address: a joining node knows its seeds only by
/// address, and foca accepts an announce addressed to any identity with its address. The
/// generation settles which identity at one address is current.
impl Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// Failure-detection timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often a random member is probed.
    pub probe_period: Duration,
    /// How long a probe may take before indirect probes start.
    pub probe_rtt: Duration,
    /// How long a member stays suspect before it is declared down.
    pub suspect_to_down_after: Duration,
}

impl Timing {
    /// Declares a dead node down in about 2 s on a LAN: it is probed within one or two
    /// periods, then suspected for one second.
    pub fn lan() -> Timing {
        Timing {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(250),
            suspect_to_down_after: Duration::from_secs(1),
        }
    }

    fn foca_config(&self, cluster_size: u32) -> Config {
        let mut c = Config::new_lan(NonZeroU32::new(cluster_size.max(1)).expect("non-zero"));
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.suspect_to_down_after = self.suspect_to_down_after;
        c
    }
}

enum Input {
    Data(bytes::Bytes),
    Timer(Timer<NodeId>),
    AnnounceSeeds,
    Leave,
}

/// A running membership agent.
pub struct Membership {
    me: NodeId,
    view: watch::Receiver<Vec<NodeId>>,
    inputs: mpsc::Sender<Input>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Membership {
    /// Binds `me.gossip` (port 0 is allowed: the bound port replaces it) and starts gossiping;
    /// `seeds` are gossip addresses of nodes to join through.
    pub async fn start(
        mut me: NodeId,
        seeds: Vec<SocketAddr>,
        timing: Timing,
    ) -> std::io::Result<Membership> {
        let socket = Arc::new(UdpSocket::bind(me.gossip).await?);
        me.gossip = socket.local_addr()?;
        let rng: rand010::rngs::StdRng = rand010::make_rng();
        let config = timing.foca_config(seeds.len() as u32 + 1);
        let max_packet = config.max_packet_size.get();
        let foca = Foca::new(me.clone(), config, rng, PostcardCodec);
        let (inputs, rx) = mpsc::channel(INPUT_QUEUE_MAX);
        let (view_tx, view) = watch::channel(Vec::new());
        let (timers_tx, timers_rx) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(drive(
                foca,
                rx,
                socket.clone(),
                timers_tx,
                view_tx,
                seeds,
                timing,
            )),
            tokio::spawn(schedule(timers_rx, inputs.clone())),
            tokio::spawn(receive(socket, inputs.clone(), max_packet)),
            tokio::spawn(retry_seeds(inputs.clone())),
        ];
        let _ = inputs.send(Input::AnnounceSeeds).await;
        Ok(Membership {
            me,
            view,
            inputs,
            tasks,
        })
    }

    /// This node's identity (with the bound gossip address).
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// The other members foca currently considers alive.
    pub fn members(&self) -> Vec<NodeId> {
        self.view.borrow().clone()
    }

    /// A receiver that changes whenever the live view does.
    pub fn watch(&self) -> watch::Receiver<Vec<NodeId>> {
        self.view.clone()
    }

    /// Tells the cluster this node leaves (so it is not merely suspected), then stops.
    pub async fn leave(self) {
        let _ = self.inputs.send(Input::Leave).await;
        // Give the goodbye datagrams a moment to go out.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

type Agent = Foca<NodeId, PostcardCodec, rand010::rngs::StdRng, foca::NoCustomBroadcast>;

async fn drive(
    mut foca: Agent,
    mut rx: mpsc::Receiver<Input>,
    socket: Arc<UdpSocket>,
    timers: mpsc::UnboundedSender<(Instant, Timer<NodeId>)>,
    view: watch::Sender<Vec<NodeId>>,
    seeds: Vec<SocketAddr>,
    timing: Timing,
) {
    let mut runtime = foca::AccumulatingRuntime::new();
    let mut cluster_size = 1;
    while let Some(input) = rx.recv().await {
        let result = match input {
            Input::Data(data) => foca.handle_data(&data, &mut runtime),
            Input::Timer(timer) => foca.handle_timer(timer, &mut runtime),
            Input::AnnounceSeeds if foca.num_members() == 0 => {
                for seed in &seeds {
                    // Only the address matters to an announce; the seed answers as itself.
                    let dst = NodeId {
                        name: String::new(),
                        gossip: *seed,
                        generation: 0,
                    };
                    if let Err(e) = foca.announce(dst, &mut runtime) {
                        tracing::debug!(error = %e, %seed, "announce failed");
                    }
                }
                Ok(())
            }
            Input::AnnounceSeeds => Ok(()),
            Input::Leave => {
                let r = foca.leave_cluster(&mut runtime);
                flush(&mut runtime, &socket, &timers).await;
                let _ = r;
                return;
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "gossip input refused");
        }
        let changed = flush(&mut runtime, &socket, &timers).await;
        if changed {
            let members: Vec<NodeId> = foca.iter_members().map(|m| m.id().clone()).collect();
            // Timeouts scale with the cluster (dissemination rounds); keep them in step.
            if members.len() + 1 != cluster_size {
                cluster_size = members.len() + 1;
                let _ = foca.set_config(timing.foca_config(cluster_size as u32));
            }
            let _ = view.send(members);
        }
    }
}

/// Sends what foca queued, schedules its timers; true when membership changed.
async fn flush(
    runtime: &mut foca::AccumulatingRuntime<NodeId>,
    socket: &UdpSocket,
    timers: &mpsc::UnboundedSender<(Instant, Timer<NodeId>)>,
) -> bool {
    while let Some((dst, data)) = runtime.to_send() {
        let _ = socket.send_to(&data, dst.gossip).await;
    }
    let now = Instant::now();
    while let Some((delay, timer)) = runtime.to_schedule() {
        let _ = timers.send((now + delay, timer));
    }
    let mut changed = false;
    while let Some(n) = runtime.to_notify() {
        match n {
            OwnedNotification::MemberUp(id) => {
                tracing::info!(node = %id.name, generation = id.generation, "member up");
                changed = true;
            }
            OwnedNotification::MemberDown(id) => {
                tracing::info!(node = %id.name, generation = id.generation, "member down");
                changed = true;
            }
            OwnedNotification::Rename(old, new) => {
                tracing::info!(node = %new.name, old = old.generation, new = new.generation, "member restarted");
                changed = true;
            }
            _ => {}
        }
    }
    changed
}

/// One timer queue for the whole agent: every timer delivered, in deadline order (ties in
/// the order scheduled).
async fn schedule(
    mut rx: mpsc::UnboundedReceiver<(Instant, Timer<NodeId>)>,
    out: mpsc::Sender<Input>,
) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut pending: std::collections::HashMap<u64, Timer<NodeId>> =
        std::collections::HashMap::new();
    let mut next_id = 0u64;
    loop {
        let due = heap.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            got = rx.recv() => match got {
                Some((at, timer)) => {
                    heap.push(Reverse((at, next_id)));
                    pending.insert(next_id, timer);
                    next_id += 1;
                }
                None => return,
            },
            _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                while let Some(Reverse((at, id))) = heap.peek().copied() {
                    if at > Instant::now() {
                        break;
                    }
                    heap.pop();
                    let timer = pending.remove(&id).expect("every heap entry has a timer");
                    if out.send(Input::Timer(timer)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

async fn receive(socket: Arc<UdpSocket>, out: mpsc::Sender<Input>, max_packet: usize) {
    let mut buf = vec![0u8; max_packet];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, _)) => {
                if out
                    .send(Input::Data(bytes::Bytes::copy_from_slice(&buf[..len])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "gossip receive failed"),
        }
    }
}

async fn retry_seeds(out: mpsc::Sender<Input>) {
    let mut tick = tokio::time::interval(SEED_RETRY);
    loop {
        tick.tick().await;
        if out.send(Input::AnnounceSeeds).await.is_err() {
            return;
        }
    }
}
