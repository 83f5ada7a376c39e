//! The driver of a node's cluster side: it runs the loops, RPCs and Raft groups, gathers
//! snapshots for the decisions in [`crate::control`] and carries them out.
//!
//! Layout:
//! - this file: [`ClusterNode`], its start, shutdown and the [`Router`] answer.
//! - [`form`]: forming, joining or rejoining, the member list on disk and in the member-list
//!   group, starting replicas.
//! - [`elastic`]: joins and decommissions, moving partitions, following the member list.
//! - [`service`]: answering peers (consensus, routing, control requests).
//! - [`status`]: `/v1/cluster`, readiness, and the watchers behind them.
//! - [`quiet`]: quiescence of idle partitions and waking them.
//! - [`balance`]: spreading partition leaders evenly, and handing one over.

mod balance;
mod elastic;
mod form;
mod quiet;
mod service;
mod status;

pub use self::status::LeaderChange;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use openraft::{Raft, ServerState};
use tokio::sync::watch;
use warbler_config::Config;
use warbler_storage::{PartitionId, Store};

use crate::control::leader::{self, LeaderHints, LeaderView};
use crate::control::{raft_id, GroupView, MemberList};
use crate::error::ClusterError;
use crate::identity::ClusterId;
use crate::key::{ClusterKey, NodeSigner};

/// The node's own gossip signing key, in its data directory.
const SIGNING_KEY_FILE: &str = "node-signing.key";
use crate::raft_log::RaftLog;
use crate::raft_net::{RaftService, Resolver};
use crate::raft_store::TypeConfig;
use crate::router::{Leader, Router};
use crate::transport::{Faults, PeerAuth, PeerHandler, PeerTls, PeerTransport};
use crate::{Membership, NodeId, NodeMeta, NodeState, Timing};

pub use self::form::META_GROUP;

/// How long a draining node goes on holding the writes of a group it still leads once the
/// handover budget ran out (the node stops within its drain budget anyway).
const HOLD_AFTER_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);

/// A group a draining node hands over: its writes held until its leadership moved.
struct Handing {
    partition: PartitionId,
    raft: Raft<TypeConfig>,
    _hold: Option<crate::raft_log::Hold>,
}

impl Handing {
    /// Drops the holds of the groups whose leadership has moved (their queued writes then
    /// fail over), looking every 50 ms until none is left or `until`.
    async fn release_moved(led: &mut Vec<Handing>, my_id: u64, until: tokio::time::Instant) {
        loop {
            led.retain(|h| group_view(&h.raft, my_id).leading);
            if led.is_empty() || tokio::time::Instant::now() >= until {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Where partitions live, as this node sees it.
#[derive(Default)]
pub(crate) struct Placement {
    /// The member-list epoch `replicas` was computed from.
    pub epoch: u64,
    /// Each partition's replicas by the ring over the current members (where they should
    /// be; a partition being moved still has its old replicas until its leader moved it).
    pub replicas: Vec<Vec<String>>,
    /// The Raft groups of the partitions this node holds a replica of.
    pub rafts: BTreeMap<PartitionId, Raft<TypeConfig>>,
}

/// What a formed node keeps to start and stop replicas later.
pub(crate) struct Formed {
    pub store: Store,
    pub raft_config: Arc<openraft::Config>,
    pub resolver: Resolver,
    /// This node's replica of the member-list group.
    pub meta: Raft<TypeConfig>,
    pub replication_factor: usize,
}

/// The cluster side of a node; also its [`Router`].
pub struct ClusterNode {
    /// The node's database (its free-space state is spread to the other members).
    store: Store,
    me: String,
    my_id: u64,
    partitions: u16,
    membership: Membership,
    metas: watch::Receiver<HashMap<String, NodeMeta>>,
    my_meta: RwLock<NodeMeta>,
    placement: RwLock<Placement>,
    members: RwLock<Option<MemberList>>,
    formed: OnceLock<Formed>,
    /// Consensus ids to node names (every member's, learned from the member list).
    names: Arc<RwLock<HashMap<u64, String>>>,
    transport: Arc<PeerTransport>,
    raft_service: Arc<RaftService>,
    raft_log: Arc<RaftLog>,
    /// Serves the routing layer's peer requests (set by the node's wiring).
    route_service: OnceLock<Arc<dyn PeerHandler>>,
    faults: Faults,
    fault_injection: bool,
    /// Partitions this node holds no replica of: the node last named as their leader.
    leader_hints: Mutex<LeaderHints>,
    /// Bumped whenever what [`Router::leader`] reads besides the groups' own state
    /// changes (forming, placement, names, hints): the leader watch then looks at every
    /// partition, and otherwise only at those whose group changed.
    routing_epoch: AtomicU64,
    /// Wakes the leader watch: a group's state, or what `routing_epoch` counts, changed.
    leaders_moved: Arc<tokio::sync::Notify>,
    /// Partitions whose replicas this node (their leader) is moving now.
    moving: Mutex<std::collections::HashSet<PartitionId>>,
    /// This node was decommissioned: it is no longer a member.
    left: AtomicBool,
    /// Partitions whose leadership [`ClusterNode::transfer_all`] is handing over now.
    handing: Mutex<std::collections::HashSet<PartitionId>>,
    /// This node is stopping: it hands its leaderships over and quiets no group.
    draining: AtomicBool,
    /// When the node started (the catch-up bound of `/readyz` counts from it).
    started: std::time::Instant,
    /// Partitions this node follows: their leader's applied index at the last two asks
    /// (older, newer), one second apart.
    leaders_applied: Mutex<HashMap<PartitionId, (u64, u64)>>,
    /// Groups this node leads that are quiet now (every replica agreed to stop ticking).
    quiet_led: Mutex<std::collections::BTreeSet<PartitionId>>,
    /// Each replica's last log index at the last two samples, one second apart (readiness).
    logged: Mutex<HashMap<PartitionId, (u64, u64)>>,
    /// Set once a replica stopped for good (its storage failed): why.
    fatal: watch::Sender<Option<String>>,
    /// The cluster's id, once this node knows it (the transport checks peers against it).
    cluster_id: ClusterId,
    /// A member down this long is replaced (zero: never).
    dead_node_timeout: std::time::Duration,
    /// Since when (in which term) this node leads each partition it leads.
    led_since: Mutex<HashMap<PartitionId, (u64, std::time::Instant)>>,
    /// A leader-balancing round is running (on the member-list leader).
    balancing: Arc<AtomicBool>,
}

/// What a replica's metrics say, as a decision input.
pub(crate) fn group_view(raft: &Raft<TypeConfig>, my_id: u64) -> GroupView {
    let m = raft.metrics();
    let m = m.borrow();
    let membership = m.membership_config.membership();
    // A settled group has one voter set: read it as it is (`voter_ids` merges the joint
    // configurations through a new set, a cost paid by every periodic check of every group).
    let joint = membership.get_joint_config();
    let voters = match joint.as_slice() {
        [one] => one.iter().copied().collect(),
        _ => membership.voter_ids().collect(),
    };
    GroupView {
        voters,
        nodes: membership.nodes().map(|(id, _)| *id).collect(),
        settled: membership.get_joint_config().len() == 1
            && m.membership_config.log_id().as_ref() <= m.last_applied.as_ref(),
        leader: m.current_leader,
        leading: m.state == ServerState::Leader && m.current_leader == Some(my_id),
        term: m.current_term,
        applied: m.last_applied.map(|l| l.index).unwrap_or(0),
        last_log: m.last_log_index.unwrap_or(0),
        membership_index: m.membership_config.log_id().as_ref().map(|l| l.index),
        // Stopped on purpose (moved away, shutting down) is not a failure.
        failed: match &m.running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
            Err(e) => Some(e.to_string()),
        },
    }
}

/// Mutual TLS between nodes, when the three files are configured.
fn peer_tls(config: &Config) -> Result<Option<PeerTls>, ClusterError> {
    let c = &config.cluster;
    match (&c.tls_ca_file, &c.tls_cert_file, &c.tls_key_file) {
        (Some(ca), Some(cert), Some(key)) => PeerTls::from_pem_files(ca, cert, key)
            .map(Some)
            .map_err(|e| ClusterError::Tls(e.to_string())),
        _ => Ok(None),
    }
}

/// The cluster key, when one is configured.
fn cluster_key(config: &Config) -> Result<Option<ClusterKey>, ClusterError> {
    config
        .cluster
        .key_file
        .as_deref()
        .map(ClusterKey::from_file)
        .transpose()
        .map_err(|e| ClusterError::Key(e.to_string()))
}

/// Starts SWIM gossip with this node's metadata, seeded by `--seeds` and the members of
/// the stored member list.
async fn gossip(
    config: &Config,
    store: &Store,
    transport: &PeerTransport,
    meta: &NodeMeta,
    key: Option<ClusterKey>,
) -> Result<Membership, ClusterError> {
    let mut seeds = form::resolve_seeds(&config.seeds).await;
    seeds.extend(form::load_members(store)?.into_iter().flat_map(|l| l.addrs));
    let own = transport.local_addr();
    // Bound to every interface, the node is known by its advertised address (`meta.cluster`):
    // that is where the others' gossip must go, and a seed list naming it names this node.
    seeds.retain(|s| *s != own && *s != meta.cluster);
    seeds.sort();
    seeds.dedup();
    // A per-start generation: a restarted node wins over its old self in gossip.
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let id = NodeId {
        name: config.node_id.clone(),
        gossip: meta.cluster,
        generation,
    };
    let faults = transport.faults().clone();
    // Kept with the data: a node restarted on its disk speaks for its name again at once.
    let signer = NodeSigner::load_or_create(&config.data_dir.join(SIGNING_KEY_FILE))
        .map_err(|e| ClusterError::Key(e.to_string()))?;
    let meta = Some(meta.clone());
    let signer = Some(Arc::new(signer));
    Membership::start_with_meta(id, seeds, Timing::lan(), meta, faults, key, signer)
        .await
        .map_err(|source| ClusterError::Gossip {
            addr: config.cluster_addr,
            source,
        })
}

/// How long a node waits for `cluster.advertise_host` to resolve: in Kubernetes the pod's
/// own DNS name appears shortly after the pod starts.
const ADVERTISE_RESOLVE_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// The IP other members reach this node at: the bound one, or for a wildcard bind (0.0.0.0
/// in a container) `cluster.advertise_host` resolved, waiting for it to appear in DNS.
async fn advertised_ip(config: &Config) -> Result<std::net::IpAddr, ClusterError> {
    let bound = config.cluster_addr.ip();
    if !bound.is_unspecified() {
        return Ok(bound);
    }
    let Some(host) = config.cluster.advertise_host.as_deref() else {
        tracing::warn!(cluster_addr = %config.cluster_addr, "cluster_addr binds every interface and no cluster.advertise_host is set: other members are told 127.0.0.1; set --advertise-host (WARBLER_ADVERTISE_HOST) to this node's name or IP");
        return Ok(std::net::IpAddr::from([127, 0, 0, 1]));
    };
    let deadline = tokio::time::Instant::now() + ADVERTISE_RESOLVE_FOR;
    loop {
        match tokio::net::lookup_host((host, 0)).await {
            Ok(mut addrs) => {
                if let Some(a) = addrs.next() {
                    return Ok(a.ip());
                }
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(ClusterError::Advertise {
                    host: host.to_string(),
                    message: e.to_string(),
                })
            }
            Err(e) => {
                tracing::info!(%host, error = %e, "advertise host does not resolve yet; retrying")
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::Advertise {
                host: host.to_string(),
                message: "it resolves to no address".into(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// `bound` as others reach it: its own IP, or for a wildcard bind the advertised IP.
fn advertised(ip: std::net::IpAddr, bound: SocketAddr, port_of: SocketAddr) -> SocketAddr {
    let ip = if bound.ip().is_unspecified() {
        ip
    } else {
        bound.ip()
    };
    SocketAddr::new(ip, port_of.port())
}

impl ClusterNode {
    /// Starts membership and the peer transport; the cluster forms in [`ClusterNode::form`].
    pub async fn start(
        config: &Config,
        store: &Store,
        client: SocketAddr,
        http: SocketAddr,
        partitions: u16,
    ) -> Result<Arc<ClusterNode>, ClusterError> {
        let raft_service = Arc::new(RaftService::default());
        let service = Arc::new(service::NodeService::new(raft_service.clone()));
        let key = cluster_key(config)?;
        let cluster_id = ClusterId::load(store)?;
        if let Some(id) = cluster_id.get() {
            tracing::info!(cluster_id = %id, "this data directory belongs to cluster {id}");
        }
        let auth = PeerAuth {
            tls: peer_tls(config)?,
            key: key.clone(),
            cluster: cluster_id.clone(),
        };
        let transport =
            PeerTransport::start_with(&config.node_id, config.cluster_addr, auth, service.clone())
                .await
                .map_err(|source| ClusterError::Listen {
                    addr: config.cluster_addr,
                    source,
                })?;
        let transport = Arc::new(transport);
        let ip = advertised_ip(config).await?;
        let meta = NodeMeta {
            name: config.node_id.clone(),
            client: advertised(ip, client, client),
            http: advertised(ip, http, http),
            cluster: advertised(ip, config.cluster_addr, transport.local_addr()),
            state: NodeState::Joining,
            formed: form::load_members(store)?.is_some(),
            low_space: store.low_space().is_some(),
            signing_key: Vec::new(),
            zone: config.cluster.zone.clone(),
        };
        let faults = transport.faults().clone();
        let membership = gossip(config, store, &transport, &meta, key).await?;
        let node = Arc::new(ClusterNode {
            store: store.clone(),
            me: config.node_id.clone(),
            my_id: raft_id(&config.node_id),
            partitions,
            metas: membership.metas(),
            membership,
            my_meta: RwLock::new(meta),
            placement: RwLock::default(),
            members: RwLock::new(None),
            formed: OnceLock::new(),
            names: Arc::default(),
            transport,
            raft_service,
            raft_log: Arc::new(RaftLog::new(config.cluster.backlog_bytes_max)),
            route_service: OnceLock::new(),
            faults,
            fault_injection: config.cluster.fault_injection,
            leader_hints: Mutex::default(),
            routing_epoch: AtomicU64::new(0),
            leaders_moved: Arc::default(),
            moving: Mutex::default(),
            left: AtomicBool::new(false),
            handing: Mutex::default(),
            draining: AtomicBool::new(false),
            started: std::time::Instant::now(),
            leaders_applied: Mutex::default(),
            quiet_led: Mutex::default(),
            logged: Mutex::default(),
            fatal: watch::Sender::new(None),
            cluster_id,
            dead_node_timeout: std::time::Duration::from_millis(
                config.cluster.dead_node_timeout_ms,
            ),
            led_since: Mutex::default(),
            balancing: Arc::default(),
        });
        service.set_node(&node);
        Ok(node)
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.me
    }

    /// The id of this node's cluster, once known.
    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id.get()
    }

    /// `list` as this node answers it to peers: with the cluster id.
    pub(crate) fn stamped(&self, mut list: MemberList) -> MemberList {
        list.cluster = self.cluster_id.get();
        list
    }

    /// Whether a member list answered from `from` is this cluster's: a node of another
    /// cluster (one that took over an address a member used, say) can say nothing about
    /// this node's standing. A list or a node without an id counts as this cluster's.
    pub(crate) fn of_this_cluster(&self, list: &MemberList, from: SocketAddr) -> bool {
        let ours = self.cluster_id.get();
        match crate::identity::admit(ours.as_deref(), list.cluster.as_deref(), &from.to_string()) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(%from, "ignoring a member list from another cluster: {why}");
                false
            }
        }
    }

    /// The cluster address peers reach this node at (where leaders send deliveries).
    pub fn cluster_addr(&self) -> SocketAddr {
        self.my_meta.read().unwrap().cluster
    }

    pub fn transport(&self) -> &Arc<PeerTransport> {
        &self.transport
    }

    /// The replicated log the node's mailboxes append to.
    pub fn raft_log(&self) -> &Arc<RaftLog> {
        &self.raft_log
    }

    /// Serves the routing layer's peer requests with `handler`.
    pub fn serve_routes(&self, handler: Arc<dyn PeerHandler>) {
        let _ = self.route_service.set(handler);
    }

    /// Testing only: behave as if the nodes at these cluster addresses were unreachable.
    /// `None` when fault injection is off.
    pub fn set_faults(&self, blocked: Vec<SocketAddr>) -> Option<()> {
        if !self.fault_injection {
            return None;
        }
        tracing::warn!(?blocked, "fault injection: peers blocked");
        self.faults.set(blocked);
        Some(())
    }

    /// Before the node stops: gives up the leadership of every group it leads, so the other
    /// replicas elect a leader while this node still serves (and forwards for) its
    /// connections. This node campaigns no more; each group it leads gets a last heartbeat
    /// and then none, and its followers are told to tick again (a quiet follower stays
    /// quiet through its leader's empty heartbeat), so a follower's election timer fires and
    /// it takes over. Returns how many groups it led and how many it still leads when
    /// `budget` ran out (those change leader when the node stops).
    ///
    /// A led partition's writes are held from the start (they queue, and fail over to the
    /// new leader once it is elected): a leader that went on replicating new publishes
    /// would reset its followers' election timers with every entry, and a busy partition
    /// would change leader only when this node exits, its devices waiting for that election.
    /// A hold ends when its partition's leadership has moved, or when the node stops.
    ///
    /// Each group is also handed at once to its most caught-up follower by the directed
    /// transfer of [`crate::control::balance`] (a few milliseconds); the silence is the
    /// fallback for a group whose transfer is refused (a leader elected less than two
    /// leases ago, a follower that does not catch up). Directed transfers alone, without
    /// the hold and the silence, once made rolling restarts stall up to 5 s.
    pub async fn hand_over(self: &Arc<Self>, budget: std::time::Duration) -> (usize, usize) {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + budget;
        let mut led = Vec::new();
        let mut groups = self.announce_draining().await;
        // The member-list group too: quiet, its followers would wait for gossip to see
        // this node leave before they elect.
        if let Some(f) = self.formed.get() {
            groups.push((META_GROUP, f.meta.clone()));
        }
        for (partition, raft) in groups {
            let rc = raft.runtime_config();
            rc.elect(false);
            rc.tick(true);
            let view = group_view(&raft, self.my_id);
            if view.leading && view.voters.len() > 1 {
                // The member list's group has no hold: its writes are rare and few.
                let hold = (partition != META_GROUP)
                    .then(|| self.raft_log.hold(partition))
                    .flatten();
                let _ = raft.trigger().heartbeat().await;
                raft.runtime_config().heartbeat(false);
                led.push(Handing {
                    partition,
                    raft,
                    _hold: hold,
                });
            }
        }
        let pairs: Vec<_> = led.iter().map(|h| (h.partition, h.raft.clone())).collect();
        self.wake_followers(&pairs).await;
        self.transfer_all(&pairs, false);
        let total = led.len();
        let my_id = self.my_id;
        Handing::release_moved(&mut led, my_id, deadline).await;
        let still = led.len();
        metrics::counter!("warbler_leaderships_handed_over_total")
            .increment((total - still) as u64);
        if still > 0 {
            // The rest stay held until they move (their followers time out on the silence)
            // or the node stops.
            tokio::spawn(async move {
                let until = tokio::time::Instant::now() + HOLD_AFTER_BUDGET;
                Handing::release_moved(&mut led, my_id, until).await;
            });
        }
        (total, still)
    }

    /// Hands each of `led` to its most caught-up follower on a serving member at once, as
    /// the balancer does (the writes are held already, so a follower holds the whole log
    /// within a round trip): a few milliseconds instead of an election timeout. A group
    /// whose transfer fails changes leader when its followers time out (draining), or moves
    /// from here (decommissioned). `counted`: each transfer done counts in
    /// `warbler_leaderships_handed_over_total` (a drain counts the leaderships that moved
    /// away by any means, itself).
    fn transfer_all(self: &Arc<Self>, led: &[(PartitionId, Raft<TypeConfig>)], counted: bool) {
        let serving: std::collections::HashSet<String> = {
            let metas = self.metas.borrow();
            self.live_names()
                .into_iter()
                .filter(|n| {
                    *n != self.me && metas.get(n).is_none_or(|m| m.state != NodeState::Draining)
                })
                .collect()
        };
        for (partition, raft) in led {
            if *partition == META_GROUP {
                continue;
            }
            let m = raft.metrics().borrow().clone();
            let target = m
                .replication
                .iter()
                .flatten()
                .filter(|(id, _)| **id != self.my_id)
                .filter_map(|(id, matched)| {
                    Some((self.name_of(*id)?, matched.as_ref().map(|l| l.index)))
                })
                .filter(|(name, _)| serving.contains(name))
                .max_by_key(|(_, matched)| *matched)
                .map(|(name, _)| name);
            let Some(target) = target else { continue };
            // One transfer of a partition at a time: another would only start a second
            // election behind the first.
            if !self.handing.lock().unwrap().insert(*partition) {
                continue;
            }
            let (node, partition) = (self.clone(), *partition);
            tokio::spawn(async move {
                let handed = node.transfer(partition, &target).await;
                node.handing.lock().unwrap().remove(&partition);
                match handed {
                    Ok(()) if counted => {
                        metrics::counter!("warbler_leaderships_handed_over_total").increment(1)
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(partition, to = %target, "no transfer ({e}); the followers elect on the silence, or the partition moves from here");
                    }
                }
            });
        }
    }

    /// Tells the other members this node is draining; returns its replicas' groups.
    async fn announce_draining(&self) -> Vec<(PartitionId, Raft<TypeConfig>)> {
        let formed = self.formed.get().is_some();
        self.set_state(NodeState::Draining, formed).await;
        let placement = self.placement.read().unwrap();
        placement
            .rafts
            .iter()
            .map(|(p, r)| (*p, r.clone()))
            .collect()
    }

    /// Whether the node is stopping (see [`ClusterNode::hand_over`]).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Says it is draining, stops every Raft group (followers elect new leaders), and
    /// leaves the gossip cluster.
    pub async fn shutdown(&self) {
        for (_, raft) in self.announce_draining().await {
            let _ = raft.shutdown().await;
        }
        if let Some(f) = self.formed.get() {
            let _ = f.meta.shutdown().await;
        }
        self.membership.leave().await;
    }

    pub(crate) async fn set_state(&self, state: NodeState, formed: bool) {
        let meta = {
            let mut m = self.my_meta.write().unwrap();
            m.state = state;
            m.formed = formed;
            m.clone()
        };
        self.membership.set_meta(meta).await;
    }

    /// Spreads this node's disk state when it changed, and tells the replicated log which
    /// members are too full for new messages.
    pub(crate) async fn share_disk_state(&self) {
        let low = self.store.low_space().is_some();
        let changed = {
            let mut m = self.my_meta.write().unwrap();
            let changed = m.low_space != low;
            m.low_space = low;
            changed.then(|| m.clone())
        };
        if let Some(meta) = changed {
            tracing::warn!(
                low_space = low,
                "this node's disk state changed; telling the other members"
            );
            self.membership.set_meta(meta).await;
        }
        // Only members up now: one that went down full must not hold its partitions for
        // good (it takes no writes while down, and says again when it is back).
        let up: std::collections::HashSet<String> = self
            .membership
            .members()
            .into_iter()
            .map(|id| id.name)
            .collect();
        let full = self
            .metas
            .borrow()
            .values()
            .filter(|m| m.low_space && m.name != self.me && up.contains(&m.name))
            .map(|m| (raft_id(&m.name), m.name.clone()))
            .collect();
        self.raft_log.set_low_space(full);
    }

    /// Resolves once one of this node's replicas stopped for good (a consensus group stops
    /// when its storage fails, say a full disk): why. The node should then exit, so that
    /// its supervisor restarts it, rather than serve with a dead replica.
    pub async fn failed(&self) -> String {
        let mut rx = self.fatal.subscribe();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Notes a replica that stopped for good (see [`ClusterNode::failed`]).
    pub(crate) fn check_stopped(&self) {
        if self.fatal.borrow().is_some() {
            return;
        }
        let mut stopped: Vec<(String, String)> = self
            .placement
            .read()
            .unwrap()
            .rafts
            .iter()
            .filter_map(|(p, r)| {
                Some((format!("partition {p}"), group_view(r, self.my_id).failed?))
            })
            .collect();
        if let Some(f) = self.formed.get() {
            if let Some(why) = group_view(&f.meta, self.my_id).failed {
                stopped.push(("the member list".into(), why));
            }
        }
        if let Some((what, why)) = stopped.into_iter().next() {
            let why = format!("the replica of {what} stopped: {why}");
            tracing::error!(reason = %why, "a replica stopped for good; the node exits so that it restarts (free disk space first if the disk is full)");
            metrics::counter!("warbler_replicas_failed_total").increment(1);
            self.fatal.send_replace(Some(why));
        }
    }

    pub(crate) fn has_left(&self) -> bool {
        self.left.load(Ordering::Relaxed)
    }

    /// Something [`Router::leader`] reads besides the groups' state changed.
    pub(crate) fn routing_changed(&self) {
        self.routing_epoch.fetch_add(1, Ordering::Release);
        self.leaders_moved.notify_one();
    }

    /// This node's replica of `partition`, added to the group or not.
    pub(crate) fn local_raft(&self, partition: PartitionId) -> Option<Raft<TypeConfig>> {
        self.placement
            .read()
            .unwrap()
            .rafts
            .get(&partition)
            .cloned()
    }

    /// Who leads `partition` as this node's replica knows it, when the replica has been
    /// added to its group. Only the leadership fields are filled: this is on the path of
    /// every routed request, so it reads the metrics without collecting the membership.
    fn replica(&self, partition: PartitionId) -> Option<GroupView> {
        let raft = self.local_raft(partition)?;
        let m = raft.metrics();
        let m = m.borrow();
        let added = m.membership_config.membership().nodes().next().is_some();
        added.then(|| GroupView {
            leader: m.current_leader,
            leading: m.state == ServerState::Leader && m.current_leader == Some(self.my_id),
            ..GroupView::default()
        })
    }

    /// The members gossip shows alive, and this node.
    fn live_names(&self) -> std::collections::HashSet<String> {
        self.membership
            .members()
            .into_iter()
            .map(|m| m.name)
            .chain([self.me.clone()])
            .collect()
    }

    /// The names in this node's member list (none before it has one).
    fn member_names(&self) -> Vec<String> {
        let members = self.members.read().unwrap();
        members
            .as_ref()
            .map(|l| l.names.clone())
            .unwrap_or_default()
    }

    fn name_of(&self, id: u64) -> Option<String> {
        self.names.read().unwrap().get(&id).cloned()
    }

    fn placed(&self, partition: PartitionId) -> Vec<String> {
        let pl = self.placement.read().unwrap();
        pl.replicas
            .get(partition as usize)
            .cloned()
            .unwrap_or_default()
    }
}

impl Router for ClusterNode {
    fn leader(&self, partition: PartitionId) -> Leader {
        if self.formed.get().is_none() {
            return Leader::Unknown("the cluster has not formed yet".into());
        }
        let replica = self.replica(partition);
        let view = {
            let hints = self.leader_hints.lock().unwrap();
            // Only a node without a replica, or with a stale one, guesses from the
            // placement (this runs for every partition ten times a second: no copies when
            // not needed).
            let placed = match &replica {
                Some(g) if !g.stale(self.my_id) => Vec::new(),
                _ => self.placed(partition),
            };
            let name_of = |id| self.name_of(id);
            leader::leader(
                &self.me,
                self.my_id,
                partition,
                replica.as_ref(),
                name_of,
                &hints,
                &placed,
            )
        };
        match view {
            LeaderView::Local => Leader::Local,
            LeaderView::Unknown(why) => Leader::Unknown(why),
            LeaderView::Node(name) => match self.metas.borrow().get(&name) {
                Some(meta) => Leader::Remote {
                    node: name,
                    addr: meta.cluster,
                },
                None => Leader::Unknown(format!("no address known for node {name}")),
            },
        }
    }

    fn redirected(&self, partition: PartitionId, leader: Option<&str>) {
        if self.formed.get().is_none() || self.is_replica(partition) {
            return; // a replica here knows the leader from consensus, not from guesses
        }
        let placed = self.placed(partition);
        let mut hints = self.leader_hints.lock().unwrap();
        hints.redirected(partition, &placed, &self.me, leader);
        self.routing_changed();
    }

    fn is_replica(&self, partition: PartitionId) -> bool {
        self.replica(partition)
            .is_some_and(|g| !g.stale(self.my_id))
    }
}
