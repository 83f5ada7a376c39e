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
//!
//! Only a node announces its own metadata: each update is signed with the node's own key
//! ([`NodeSigner`], kept in its data directory) and carries the public half. The first key
//! seen for a name owns it while a member of that name is up; an update for that name
//! signed with another key is dropped (`warbler_gossip_metadata_refused_total`). The owner
//! is forgotten once no member of that name is up, or when the member restarts at the same
//! gossip address (a node given a new disk gets a new key).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{
    BroadcastHandler, Config, Foca, Identity, Invalidates, OwnedNotification, PostcardCodec, Timer,
};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::key::{ClusterKey, NodeSigner, GOSSIP_TAG_BYTES};
use crate::transport::Faults;

/// Inputs queued for the foca task. Bounded: a flood of datagrams waits rather than
/// growing memory.
const INPUT_QUEUE_MAX: usize = 1024;
/// How often a node that knows no member announces itself to its seeds again.
const SEED_RETRY: Duration = Duration::from_secs(1);
/// How often a node spreads its metadata again while its metadata or the members changed
/// in the last [`META_SETTLE`]: custom broadcasts are sent a bounded number of times, and a
/// datagram lost then (a member cut off for a moment) is made good within this.
const META_REFRESH: Duration = Duration::from_secs(3);
/// How long after the last change of its metadata or of the members a node spreads its
/// metadata every [`META_REFRESH`]; after that, every [`META_REFRESH_SETTLED`]. A settled
/// cluster's broadcasts only repeat what every member knows, and each one is gossip sent,
/// signed, checked and published to every watcher of the metadata.
const META_SETTLE: Duration = Duration::from_secs(30);
/// How often a settled node spreads its metadata again.
const META_REFRESH_SETTLED: Duration = Duration::from_secs(30);
/// The grid the steady gossip timers fire on (see [`on_grid`]): each on the multiples of
/// its own period when that is a multiple of this (the probe's and the periodic gossip's
/// 500 ms), else on the multiples of this.
const GOSSIP_GRID: Duration = Duration::from_millis(125);
/// How often foca gossips the updates it has (see [`Timing::foca_config`]).
const GOSSIP_PERIOD: Duration = Duration::from_millis(500);

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Started, not yet part of a formed cluster or not caught up.
    Joining,
    /// Serving its partitions.
    Serving,
    /// Shutting down: hands over and stops.
    Draining,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Joining => "joining",
            NodeState::Serving => "serving",
            NodeState::Draining => "draining",
        })
    }
}

/// What a node tells the others about itself, spread with foca's custom broadcasts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    pub name: String,
    /// Device protocol address.
    pub client: SocketAddr,
    /// HTTP API address.
    pub http: SocketAddr,
    /// Peer transport (TCP) address.
    pub cluster: SocketAddr,
    pub state: NodeState,
    /// True once the node belongs to a formed cluster (it knows the member list).
    pub formed: bool,
    /// Its disk is below the free-space watermark: the partitions it replicates take no
    /// new messages until space is freed.
    #[serde(default)]
    pub low_space: bool,
    /// The public half of the node's signing key (filled in by [`Membership`]).
    #[serde(default, with = "serde_bytes")]
    pub signing_key: Vec<u8>,
    /// The node's failure zone (`cluster.zone`).
    #[serde(default)]
    pub zone: Option<String>,
}

/// One metadata broadcast: newer (generation, version) replaces older.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetaUpdate {
    generation: u64,
    version: u64,
    meta: NodeMeta,
    /// The node's signature over the rest ([`MetaUpdate::signed`]).
    #[serde(default, with = "serde_bytes")]
    signature: Vec<u8>,
}

impl MetaUpdate {
    /// The bytes the signature covers.
    fn signed(&self) -> Vec<u8> {
        rmp_serde::to_vec(&(self.generation, self.version, &self.meta))
            .expect("metadata serializes")
    }
}

/// Which signing key owns each name: the first seen, while a member of that name is up.
type Owners = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// Dissemination key: one node's metadata at one version.
struct MetaKey {
    name: String,
    stamp: (u64, u64),
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.name == other.name && self.stamp >= other.stamp
    }
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable node metadata: {0}")]
struct MetaError(String);

/// Keeps the newest metadata of every node and publishes it.
struct MetaHandler {
    known: HashMap<String, MetaUpdate>,
    out: watch::Sender<HashMap<String, NodeMeta>>,
    owners: Owners,
    /// When a refusal was last logged (at most one line in 10 s).
    last_warned: Option<std::time::Instant>,
}

impl MetaHandler {
    /// Whether `update` is signed by the key that owns its name (the first one seen owns
    /// a name nobody owns).
    fn owned(&self, update: &MetaUpdate) -> bool {
        let key = &update.meta.signing_key;
        if !NodeSigner::verify(key, &update.signed(), &update.signature) {
            return false;
        }
        let mut owners = self.owners.lock().unwrap();
        match owners.get(&update.meta.name) {
            Some(owner) => owner == key,
            None => {
                owners.insert(update.meta.name.clone(), key.clone());
                true
            }
        }
    }
}

impl BroadcastHandler<NodeId> for MetaHandler {
    type Key = MetaKey;
    type Error = MetaError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeId>,
    ) -> Result<Option<MetaKey>, MetaError> {
        let update: MetaUpdate =
            rmp_serde::from_slice(data).map_err(|e| MetaError(e.to_string()))?;
        // Nothing newer (most datagrams repeat what is known): no signature to check.
        let stamp = (update.generation, update.version);
        if let Some(old) = self.known.get(&update.meta.name) {
            if (old.generation, old.version) >= stamp {
                return Ok(None);
            }
        }
        if !self.owned(&update) {
            metrics::counter!("warbler_gossip_metadata_refused_total").increment(1);
            let now = std::time::Instant::now();
            if self
                .last_warned
                .is_none_or(|t| now - t > Duration::from_secs(10))
            {
                tracing::warn!(node = %update.meta.name, "gossip metadata dropped: not signed by the key that owns this name (another member speaking for it, or a node given a new disk while its old self is still up)");
                self.last_warned = Some(now);
            }
            return Ok(None);
        }
        let name = update.meta.name.clone();
        let same = self
            .known
            .get(&name)
            .is_some_and(|old| old.meta == update.meta);
        self.known.insert(name.clone(), update);
        if same {
            // A refresh: newer, but what it says is known. Spread it on, wake no watcher.
            return Ok(Some(MetaKey { name, stamp }));
        }
        let metas = self
            .known
            .iter()
            .map(|(n, u)| (n.clone(), u.meta.clone()))
            .collect();
        let _ = self.out.send(metas);
        Ok(Some(MetaKey { name, stamp }))
    }
}

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
        // foca's 200 ms, on the probes' and the node's checks' grid points (500 ms) so that
        // it adds no instants of its own to an idle node's (an idle node's Raft groups are
        // quiet: their 375 ms ticks do not run): gossip of an update waits 500 ms at most
        // (updates also ride on every probe and its answer).
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: GOSSIP_PERIOD,
            num_members: NonZeroUsize::new(3).expect("non-zero"),
        });
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
    /// Seeds resolved again (a DNS name whose pods changed).
    Seeds(Vec<SocketAddr>),
    /// Spread this node's metadata again (changed, or periodic refresh).
    Meta(Option<NodeMeta>),
    Leave,
}

/// A running membership agent.
pub struct Membership {
    me: NodeId,
    view: watch::Receiver<Vec<NodeId>>,
    metas: watch::Receiver<HashMap<String, NodeMeta>>,
    inputs: mpsc::Sender<Input>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Membership {
    /// Binds `me.gossip` (port 0 is allowed: the bound port replaces it) and starts gossiping;
    /// `seeds` are gossip addresses of nodes to join through.
    pub async fn start(
        me: NodeId,
        seeds: Vec<SocketAddr>,
        timing: Timing,
    ) -> std::io::Result<Membership> {
        Membership::start_with_meta(me, seeds, timing, None, Faults::default(), None, None).await
    }

    /// Like [`Membership::start`], and spreads `meta` (this node's addresses and state),
    /// signed with `signer` (a new key when `None`); with `key`, every datagram sent carries
    /// its MAC and one received without a valid MAC is dropped.
    pub async fn start_with_meta(
        mut me: NodeId,
        seeds: Vec<SocketAddr>,
        timing: Timing,
        meta: Option<NodeMeta>,
        faults: Faults,
        key: Option<ClusterKey>,
        signer: Option<Arc<NodeSigner>>,
    ) -> std::io::Result<Membership> {
        let signer = signer.unwrap_or_else(|| Arc::new(NodeSigner::generate()));
        let socket = Arc::new(UdpSocket::bind(me.gossip).await?);
        me.gossip = socket.local_addr()?;
        let rng: rand010::rngs::StdRng = rand010::make_rng();
        let config = timing.foca_config(seeds.len() as u32 + 1);
        let max_packet = config.max_packet_size.get();
        let (metas_tx, metas) = watch::channel(HashMap::new());
        let owners = Owners::default();
        let handler = MetaHandler {
            known: HashMap::new(),
            out: metas_tx,
            owners: owners.clone(),
            last_warned: None,
        };
        let foca = Foca::with_custom_broadcast(me.clone(), config, rng, PostcardCodec, handler);
        let (inputs, rx) = mpsc::channel(INPUT_QUEUE_MAX);
        let (view_tx, view) = watch::channel(Vec::new());
        let (timers_tx, timers_rx) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(drive(
                foca,
                rx,
                Outbox {
                    socket: socket.clone(),
                    faults,
                    key: key.clone(),
                    owners: owners.clone(),
                    signer,
                },
                timers_tx,
                view_tx,
                seeds,
                timing,
            )),
            tokio::spawn(schedule(timers_rx, inputs.clone())),
            tokio::spawn(receive(socket, inputs.clone(), max_packet, key)),
            tokio::spawn(retry_seeds(inputs.clone())),
            tokio::spawn(refresh_meta(inputs.clone())),
        ];
        let _ = inputs.send(Input::AnnounceSeeds).await;
        if meta.is_some() {
            let _ = inputs.send(Input::Meta(meta)).await;
        }
        Ok(Membership {
            me,
            view,
            metas,
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

    /// The newest metadata of every node heard of (this one included), by name. Entries of
    /// nodes that are down stay: check [`Membership::members`] for liveness.
    pub fn metas(&self) -> watch::Receiver<HashMap<String, NodeMeta>> {
        self.metas.clone()
    }

    /// Changes this node's metadata (for example its state) and spreads it.
    pub async fn set_meta(&self, meta: NodeMeta) {
        let _ = self.inputs.send(Input::Meta(Some(meta))).await;
    }

    /// Replaces the seed addresses a node that knows no member announces itself to (seeds
    /// given as a DNS name, resolved again).
    pub async fn set_seeds(&self, seeds: Vec<SocketAddr>) {
        let _ = self.inputs.send(Input::Seeds(seeds)).await;
    }

    /// Tells the cluster this node leaves (so it is not merely suspected), then stops.
    pub async fn leave(&self) {
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

type Agent = Foca<NodeId, PostcardCodec, rand010::rngs::StdRng, MetaHandler>;

async fn drive(
    mut foca: Agent,
    mut rx: mpsc::Receiver<Input>,
    socket: Outbox,
    timers: mpsc::UnboundedSender<(Instant, Timer<NodeId>)>,
    view: watch::Sender<Vec<NodeId>>,
    mut seeds: Vec<SocketAddr>,
    timing: Timing,
) {
    let mut runtime = foca::AccumulatingRuntime::new();
    let mut cluster_size = 1;
    let mut own_meta: Option<NodeMeta> = None;
    let mut meta_version = 0u64;
    let mut refresh = Refresh::new(Instant::now());
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
            Input::Seeds(new) => {
                seeds = new;
                Ok(())
            }
            Input::Meta(None) if !refresh.due(Instant::now()) => Ok(()),
            Input::Meta(meta) => {
                if meta.is_some() {
                    own_meta = meta;
                    refresh.changed(Instant::now());
                }
                refresh.spread(Instant::now());
                spread_meta(
                    &mut foca,
                    own_meta.as_ref(),
                    &mut meta_version,
                    &socket.signer,
                )
            }
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
            // A name whose members are all gone is owned by no key any more.
            let up: HashSet<&str> = members.iter().map(|m| m.name.as_str()).collect();
            socket
                .owners
                .lock()
                .unwrap()
                .retain(|name, _| up.contains(name.as_str()));
            // Timeouts scale with the cluster (dissemination rounds); keep them in step.
            if members.len() + 1 != cluster_size {
                cluster_size = members.len() + 1;
                let _ = foca.set_config(timing.foca_config(cluster_size as u32));
            }
            let _ = view.send(members);
            // A member that just came up has heard none of our earlier broadcasts.
            refresh.changed(Instant::now());
            refresh.spread(Instant::now());
            if let Err(e) = spread_meta(
                &mut foca,
                own_meta.as_ref(),
                &mut meta_version,
                &socket.signer,
            ) {
                tracing::debug!(error = %e, "metadata broadcast failed");
            }
            flush(&mut runtime, &socket, &timers).await;
        }
    }
}

/// When a node spreads its metadata again (see [`META_REFRESH`]).
#[derive(Debug, Clone, Copy)]
struct Refresh {
    last_change: Instant,
    last_spread: Instant,
}

impl Refresh {
    fn new(now: Instant) -> Refresh {
        Refresh {
            last_change: now,
            last_spread: now,
        }
    }

    /// Its metadata or the members changed.
    fn changed(&mut self, now: Instant) {
        self.last_change = now;
    }

    fn spread(&mut self, now: Instant) {
        self.last_spread = now;
    }

    /// Whether a refresh tick (every [`META_REFRESH`]) spreads the metadata again.
    fn due(&self, now: Instant) -> bool {
        now.duration_since(self.last_change) < META_SETTLE
            || now.duration_since(self.last_spread) + META_REFRESH / 2 >= META_REFRESH_SETTLED
    }
}

fn spread_meta(
    foca: &mut Agent,
    meta: Option<&NodeMeta>,
    version: &mut u64,
    signer: &NodeSigner,
) -> Result<(), foca::Error> {
    let Some(m) = meta else {
        return Ok(());
    };
    *version += 1;
    let mut update = MetaUpdate {
        generation: foca.identity().generation,
        version: *version,
        meta: NodeMeta {
            signing_key: signer.public_key(),
            ..m.clone()
        },
        signature: Vec::new(),
    };
    update.signature = signer.sign(&update.signed());
    let bytes = rmp_serde::to_vec(&update).expect("metadata serializes");
    foca.add_broadcast(&bytes).map(|_| ())
}

/// Sends what foca queued, schedules its timers; true when membership changed.
/// The gossip socket, as foca's output sees it.
struct Outbox {
    socket: Arc<UdpSocket>,
    faults: Faults,
    key: Option<ClusterKey>,
    /// The owners of names (see the module header): a restarted member may own its name
    /// with a new key.
    owners: Owners,
    /// Signs this node's metadata.
    signer: Arc<NodeSigner>,
}

async fn flush(
    runtime: &mut foca::AccumulatingRuntime<NodeId>,
    socket: &Outbox,
    timers: &mpsc::UnboundedSender<(Instant, Timer<NodeId>)>,
) -> bool {
    while let Some((dst, data)) = runtime.to_send() {
        if socket.faults.blocks(&dst.gossip) {
            continue;
        }
        let _ = match &socket.key {
            Some(key) => socket.socket.send_to(&key.seal(&data), dst.gossip).await,
            None => socket.socket.send_to(&data, dst.gossip).await,
        };
    }
    let now = Instant::now();
    while let Some((delay, timer)) = runtime.to_schedule() {
        let _ = timers.send((on_grid(now, delay, &timer), timer));
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
                socket.owners.lock().unwrap().remove(&new.name);
                changed = true;
            }
            _ => {}
        }
    }
    changed
}

/// The steady timers (the next probe, the periodic gossip and announces) fire on the
/// node's shared grid ([`crate::grid`]), at the multiples of their own period (of
/// [`GOSSIP_GRID`] when the period is not a multiple of it), off by at most half of it: on
/// an idle node they add no wake-ups of their own. The timers of a probe under way and of a
/// suspicion keep their exact deadlines, and so does any timer due sooner than two grid
/// steps (a test's fast timing).
fn on_grid(now: Instant, delay: Duration, timer: &Timer<NodeId>) -> Instant {
    let steady = matches!(
        timer,
        Timer::ProbeRandomMember(_)
            | Timer::PeriodicGossip(_)
            | Timer::PeriodicAnnounce(_)
            | Timer::PeriodicAnnounceDown(_)
    );
    if steady && delay >= 2 * GOSSIP_GRID {
        let own = delay.as_nanos().is_multiple_of(GOSSIP_GRID.as_nanos());
        crate::grid::nearest(now + delay, if own { delay } else { GOSSIP_GRID })
    } else {
        now + delay
    }
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

async fn receive(
    socket: Arc<UdpSocket>,
    out: mpsc::Sender<Input>,
    max_packet: usize,
    key: Option<ClusterKey>,
) {
    let mut buf = vec![0u8; max_packet + GOSSIP_TAG_BYTES];
    let mut last_warned: Option<Instant> = None;
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, from)) => {
                let data = match &key {
                    None => &buf[..len],
                    Some(key) => match key.open(&buf[..len]) {
                        Some(data) => data,
                        None => {
                            metrics::counter!("warbler_gossip_datagrams_refused_total")
                                .increment(1);
                            if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                                tracing::warn!(%from, "gossip datagram without this cluster's key dropped (a stranger, or a node with another --cluster-key-file)");
                                last_warned = Some(Instant::now());
                            }
                            continue;
                        }
                    },
                };
                if out
                    .send(Input::Data(bytes::Bytes::copy_from_slice(data)))
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

async fn refresh_meta(out: mpsc::Sender<Input>) {
    let mut tick = crate::grid::interval(META_REFRESH);
    loop {
        tick.tick().await;
        if out.send(Input::Meta(None)).await.is_err() {
            return;
        }
    }
}

async fn retry_seeds(out: mpsc::Sender<Input>) {
    let mut tick = crate::grid::interval(SEED_RETRY);
    loop {
        tick.tick().await;
        if out.send(Input::AnnounceSeeds).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node spreads its metadata at every refresh tick for 30 s after a change, then every
    /// 30 s.
    #[test]
    fn metadata_refreshes_slow_down_once_settled() {
        let t0 = Instant::now();
        let mut r = Refresh::new(t0);
        let mut spread = Vec::new();
        for k in 1..=40u32 {
            let now = t0 + META_REFRESH * k;
            if r.due(now) {
                r.spread(now);
                spread.push(k);
            }
        }
        // 3 s ticks: every one of the first 9 (up to 27 s), then every tenth.
        let mut expected: Vec<u32> = (1..=9).collect();
        expected.extend([19, 29, 39]);
        assert_eq!(spread, expected);

        r.changed(t0 + META_REFRESH * 40);
        assert!(
            r.due(t0 + META_REFRESH * 41),
            "a change brings the fast refresh back"
        );
    }

    /// A newer broadcast that repeats a node's metadata is taken (and spread on) but wakes
    /// no watcher; one that changes it does.
    #[test]
    fn a_refresh_that_repeats_metadata_wakes_no_watcher() {
        let signer = NodeSigner::generate();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let meta = NodeMeta {
            name: "n1".into(),
            client: addr,
            http: addr,
            cluster: addr,
            state: NodeState::Serving,
            formed: true,
            low_space: false,
            signing_key: signer.public_key(),
            zone: None,
        };
        let signed = |version: u64, meta: &NodeMeta| {
            let mut u = MetaUpdate {
                generation: 1,
                version,
                meta: meta.clone(),
                signature: Vec::new(),
            };
            u.signature = signer.sign(&u.signed());
            rmp_serde::to_vec(&u).unwrap()
        };
        let (out, mut metas) = watch::channel(HashMap::new());
        let mut h = MetaHandler {
            known: HashMap::new(),
            out,
            owners: Owners::default(),
            last_warned: None,
        };
        assert!(h.receive_item(&signed(1, &meta), None).unwrap().is_some());
        assert!(metas.has_changed().unwrap(), "new metadata is published");
        metas.borrow_and_update();

        let key = h.receive_item(&signed(2, &meta), None).unwrap();
        assert!(key.is_some(), "a newer refresh is spread on");
        assert!(!metas.has_changed().unwrap(), "the same metadata wakes no watcher");

        let draining = NodeMeta {
            state: NodeState::Draining,
            ..meta
        };
        assert!(h.receive_item(&signed(3, &draining), None).unwrap().is_some());
        assert!(metas.has_changed().unwrap(), "changed metadata is published");
        assert_eq!(metas.borrow()["n1"].state, NodeState::Draining);
    }

    fn on(at: Instant, period: Duration) -> bool {
        crate::grid::nearest(at, period) == at
    }

    /// The steady timers land on the multiples of their own period (so an idle node's probe
    /// and gossip fall on the instants its 500 ms checks already wake it),
    /// within half a period of their deadline; fast timers keep their deadlines.
    #[test]
    fn steady_timers_fire_on_their_own_periods_grid() {
        let now = Instant::now();
        for (timer, period) in [
            (Timer::ProbeRandomMember(0), Duration::from_millis(500)),
            (Timer::PeriodicGossip(0), GOSSIP_PERIOD),
            (Timer::PeriodicGossip(0), 3 * GOSSIP_GRID),
        ] {
            for k in 0..20u64 {
                let from = now + Duration::from_millis(37 * k);
                let at = on_grid(from, period, &timer);
                assert!(on(at, period), "{timer:?} from +{} ms", 37 * k);
                let off = at.max(from + period) - at.min(from + period);
                assert!(off <= period / 2, "{timer:?}: {off:?} from its deadline");
            }
        }
        // A period that is no multiple of the grid: on the grid's own points.
        let at = on_grid(now, Duration::from_millis(700), &Timer::PeriodicGossip(0));
        assert!(on(at, GOSSIP_GRID));
        // A fast timer (a test's timing) keeps its deadline.
        let fast = Duration::from_millis(100);
        assert_eq!(on_grid(now, fast, &Timer::ProbeRandomMember(0)), now + fast);
    }
}
