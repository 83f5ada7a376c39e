//! A node in a cluster: SWIM membership with node metadata, the member list (formed once
//! `bootstrap_expect` nodes are up, then kept by the cluster's member-list Raft group), one
//! Raft group per partition this node replicates, and the router that tells which node
//! leads each partition. Nodes joining and leaving a running cluster: `crate::elastic`.

use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::{BasicNode, Raft, ServerState};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use warbler_actors::{Leader, Mailboxes, RouteService, Router, Routing};
use warbler_cluster::raft_log::RaftLog;
use warbler_cluster::raft_net::{self, RaftService, Resolver};
use warbler_cluster::raft_store::TypeConfig;
use warbler_cluster::transport::BoxFuture;
use warbler_cluster::{
    fnv1a64, Faults, Membership, NodeId, NodeMeta, NodeState, PeerHandler, PeerTls, PeerTransport,
    Ring, Timing, VNODES_DEFAULT,
};
use warbler_config::Config;
use warbler_storage::{PartitionId, Store};

/// Peer RPC kind: "which nodes form this cluster?" (answered by formed nodes).
pub(crate) const KIND_MEMBERS: u8 = 20;
/// Where the member list is kept (the consensus metadata column family, outside the
/// partition range).
const CLUSTER_META_PARTITION: PartitionId = u16::MAX;
const MEMBERS_KEY: &str = "members";
/// The Raft group whose membership is the cluster's member list: every member is one of its
/// voters or learners, so every member holds the list and a change to it is a consensus
/// decision.
pub(crate) const META_GROUP: PartitionId = u16::MAX - 1;
/// How often the leader of every partition is checked for changes.
const LEADER_WATCH_PERIOD: Duration = Duration::from_millis(100);
/// Peer RPC kind: "how far have you applied the partitions you lead?" (for `/readyz`).
const KIND_APPLIED: u8 = 25;
/// How often a follower asks its leaders how far they have applied.
const APPLIED_PERIOD: Duration = Duration::from_secs(1);
/// How often a node that knows no member resolves its seeds again.
const SEED_REFRESH: Duration = Duration::from_secs(5);

/// The nodes that form the cluster, fixed when it forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberList {
    pub names: Vec<String>,
    pub replication_factor: usize,
    /// The members' cluster addresses when the list was made: a restarting node gossips
    /// to them to rejoin (they may have moved since; the gossip metadata has the current).
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// The member-list group's log index of this list (0: the list the cluster formed with).
    #[serde(default)]
    pub epoch: u64,
}

/// A node's consensus id: a hash of its stable name, so it survives restarts and moves.
pub fn raft_id(name: &str) -> u64 {
    fnv1a64(name.as_bytes())
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
    pub(crate) me: String,
    pub(crate) my_id: u64,
    pub(crate) partitions: u16,
    pub(crate) membership: Membership,
    pub(crate) metas: watch::Receiver<HashMap<String, NodeMeta>>,
    my_meta: RwLock<NodeMeta>,
    pub(crate) placement: RwLock<Placement>,
    pub(crate) members: RwLock<Option<MemberList>>,
    pub(crate) formed: OnceLock<Formed>,
    /// Consensus ids to node names (every member's, learned from the member list).
    pub(crate) names: Arc<RwLock<HashMap<u64, String>>>,
    pub transport: Arc<PeerTransport>,
    pub raft_service: Arc<RaftService>,
    pub raft_log: Arc<RaftLog>,
    route_service: OnceLock<RouteService>,
    faults: Faults,
    fault_injection: bool,
    /// Partitions this node holds no replica of: the node last named as their leader.
    leader_hints: Mutex<HashMap<PartitionId, String>>,
    /// Partitions whose replicas this node (their leader) is moving now.
    pub(crate) moving: Mutex<HashSet<PartitionId>>,
    /// This node was decommissioned: it is no longer a member.
    pub(crate) left: AtomicBool,
    /// Partitions this node follows: their leader's applied index at the last two asks
    /// (older, newer), one second apart.
    leaders_applied: Mutex<HashMap<PartitionId, (u64, u64)>>,
}

/// Dispatches peers' requests: consensus to the Raft groups, the rest to routing.
struct NodeService {
    node: OnceLock<Arc<ClusterNode>>,
    raft: Arc<RaftService>,
}

impl PeerHandler for NodeService {
    fn handle(
        &self,
        from: String,
        partition: u16,
        kind: u8,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        match (kind, self.node.get()) {
            (1..=3, _) => self.raft.handle(from, partition, kind, body),
            (KIND_MEMBERS, Some(node)) => {
                let list = node.members.read().unwrap().clone();
                Box::pin(async move {
                    list.map(|l| rmp_serde::to_vec_named(&l).expect("member list serializes"))
                        .ok_or_else(|| "this node has not joined a formed cluster yet".to_string())
                })
            }
            (KIND_APPLIED, Some(node)) => {
                let answer = rmp_serde::from_slice::<Vec<PartitionId>>(&body)
                    .map(|ps| {
                        rmp_serde::to_vec_named(&node.applied_as_leader(&ps)).expect("serializes")
                    })
                    .map_err(|e| format!("cannot decode the request: {e}"));
                Box::pin(async move { answer })
            }
            (k, Some(node)) if crate::elastic::is_elastic_kind(k) => {
                let node = node.clone();
                Box::pin(async move { node.handle_elastic(partition, kind, body).await })
            }
            (k, Some(node)) if warbler_actors::route::is_route_kind(k) => {
                match node.route_service.get() {
                    Some(s) => s.handle(from, partition, kind, body),
                    None => Box::pin(async { Err("this node is still starting".to_string()) }),
                }
            }
            _ => Box::pin(async move { Err(format!("unknown peer RPC kind {kind}")) }),
        }
    }
}

fn advertised(config: &Config, bound: SocketAddr, port_of: SocketAddr) -> SocketAddr {
    let ip = if bound.ip().is_unspecified() {
        config
            .cluster
            .advertise_host
            .as_deref()
            .and_then(|h| {
                std::net::ToSocketAddrs::to_socket_addrs(&(h, 0))
                    .ok()?
                    .next()
                    .map(|a| a.ip())
            })
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
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
    ) -> anyhow::Result<Arc<ClusterNode>> {
        let raft_service = Arc::new(RaftService::default());
        let service = Arc::new(NodeService {
            node: OnceLock::new(),
            raft: raft_service.clone(),
        });
        let c = &config.cluster;
        let tls = match (&c.tls_ca_file, &c.tls_cert_file, &c.tls_key_file) {
            (Some(ca), Some(cert), Some(key)) => Some(
                PeerTls::from_pem_files(ca, cert, key)
                    .map_err(|e| anyhow::anyhow!("cluster TLS: {e}"))?,
            ),
            _ => None,
        };
        let transport = Arc::new(
            PeerTransport::start(&config.node_id, config.cluster_addr, tls, service.clone())
                .await
                .with_context(|| format!("cannot listen on cluster_addr {} (TCP); is another process using it? pick another with --cluster-addr", config.cluster_addr))?,
        );
        let cluster = advertised(config, config.cluster_addr, transport.local_addr());
        let meta = NodeMeta {
            name: config.node_id.clone(),
            client: advertised(config, client, client),
            http: advertised(config, http, http),
            cluster,
            state: NodeState::Joining,
            formed: load_members(store)?.is_some(),
        };
        let mut seeds = resolve_seeds(&config.seeds).await;
        if let Some(list) = load_members(store)? {
            seeds.extend(list.addrs);
        }
        let own = transport.local_addr();
        seeds.retain(|s| *s != own);
        seeds.sort();
        seeds.dedup();
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let faults = transport.faults().clone();
        let me = NodeId {
            name: config.node_id.clone(),
            gossip: SocketAddr::new(config.cluster_addr.ip(), transport.local_addr().port()),
            generation,
        };
        let membership = Membership::start_with_meta(
            me,
            seeds,
            Timing::lan(),
            Some(meta.clone()),
            faults.clone(),
        )
        .await
        .with_context(|| {
            format!(
                "cannot bind the gossip socket on {} (UDP)",
                config.cluster_addr
            )
        })?;
        let node = Arc::new(ClusterNode {
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
            raft_log: Arc::new(RaftLog::default()),
            route_service: OnceLock::new(),
            faults,
            fault_injection: config.cluster.fault_injection,
            leader_hints: Mutex::default(),
            moving: Mutex::default(),
            left: AtomicBool::new(false),
            leaders_applied: Mutex::default(),
        });
        let _ = service.node.set(node.clone());
        Ok(node)
    }

    /// The routing state of this node (the gateway's mailboxes route through it).
    pub fn routing(self: &Arc<Self>) -> Arc<Routing> {
        let routing = Arc::new(Routing::new(
            self.clone(),
            self.me.clone(),
            self.my_meta.read().unwrap().cluster,
        ));
        routing.set_transport(self.transport.clone());
        routing
    }

    pub fn serve_routes(&self, mailboxes: Mailboxes, routing: Arc<Routing>) {
        let _ = self.route_service.set(RouteService { mailboxes, routing });
    }

    /// Waits for the member list (from disk, from a formed member, by joining a running
    /// cluster, or by forming a new cluster once `bootstrap_expect` nodes are up), then
    /// starts this node's replica of the member list and of its partitions, and keeps them
    /// in step with the member list (`crate::elastic`).
    pub async fn form(self: &Arc<Self>, config: &Config, store: &Store) -> anyhow::Result<()> {
        let list = match load_members(store)? {
            Some(l) => l,
            None => {
                let l = self.discover(config).await?;
                save_members(store, &l)?;
                l
            }
        };
        // Epoch 0 is the list a new cluster formed with (a joining or rejoining node gets a
        // later one): its nodes create the groups, unless they exist already (a restart).
        let fresh = list.epoch == 0;
        tracing::info!(members = ?list.names, rf = list.replication_factor, fresh, "cluster formed");
        {
            let mut names = self.names.write().unwrap();
            for n in &list.names {
                names.insert(raft_id(n), n.clone());
            }
        }
        let raft_config = Arc::new(
            openraft::Config {
                cluster_name: "warbler".into(),
                heartbeat_interval: config.cluster.raft_heartbeat_ms,
                election_timeout_min: config.cluster.raft_election_timeout_ms,
                // openraft's leader lease is the maximum: a follower refuses votes for that
                // long after the last heartbeat, so a wide range slows every failover.
                election_timeout_max: config.cluster.raft_election_timeout_ms * 3 / 2,
                install_snapshot_timeout: 10_000,
                ..Default::default()
            }
            .validate()?,
        );
        let resolver: Resolver = {
            let (metas, names) = (self.metas.clone(), self.names.clone());
            Arc::new(move |id| {
                let name = names.read().unwrap().get(&id)?.clone();
                metas.borrow().get(&name).map(|m| m.cluster)
            })
        };
        let meta = raft_net::start_group(
            self.my_id,
            META_GROUP,
            raft_config.clone(),
            store,
            &self.transport,
            &self.raft_service,
            Some(resolver.clone()),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the replica of the member list: {e}"))?;
        if fresh && list.names.first() == Some(&self.me) && !meta.is_initialized().await? {
            let voters: BTreeMap<u64, BasicNode> = list
                .names
                .iter()
                .map(|n| (raft_id(n), BasicNode::new(n.clone())))
                .collect();
            if let Err(e) = meta.initialize(voters).await {
                tracing::debug!(error = %e, "member list already initialized");
            }
        }
        let _ = self.formed.set(Formed {
            store: store.clone(),
            raft_config,
            resolver,
            meta,
            replication_factor: list.replication_factor,
        });
        // The member-list group's own record wins over the copy on disk (it may be newer).
        let list = self.list_from_meta().unwrap_or(list);
        self.apply_members(list.clone());
        for p in 0..self.partitions {
            let reps = self.placement.read().unwrap().replicas[p as usize].clone();
            if !reps.contains(&self.me) {
                continue;
            }
            let raft = self.start_replica(p).await?;
            // A new cluster: the preferred replica creates each partition's group. Never
            // later: a node given a partition in a running cluster waits to be added to it.
            if fresh && reps[0] == self.me && !raft.is_initialized().await? {
                let metas = self.metas.borrow().clone();
                let voters: BTreeMap<u64, BasicNode> = reps
                    .iter()
                    .map(|n| {
                        let addr = metas.get(n).map(|m| m.cluster.to_string());
                        (raft_id(n), BasicNode::new(addr.unwrap_or_default()))
                    })
                    .collect();
                if let Err(e) = raft.initialize(voters).await {
                    tracing::debug!(partition = p, error = %e, "partition already initialized");
                }
            }
        }
        self.set_state(NodeState::Serving, true).await;
        self.keep_in_step();
        self.watch_catch_up();
        Ok(())
    }

    /// Starts this node's replica of `partition` (empty if it holds nothing of it yet: the
    /// partition's leader fills it).
    pub(crate) async fn start_replica(
        &self,
        partition: PartitionId,
    ) -> anyhow::Result<Raft<TypeConfig>> {
        let f = self.formed.get().expect("replicas start after forming");
        let raft = raft_net::start_group(
            self.my_id,
            partition,
            f.raft_config.clone(),
            &f.store,
            &self.transport,
            &self.raft_service,
            Some(f.resolver.clone()),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the replica of partition {partition}: {e}"))?;
        self.raft_log.insert(partition, raft.clone());
        self.placement
            .write()
            .unwrap()
            .rafts
            .insert(partition, raft.clone());
        Ok(raft)
    }

    /// Makes `list` this node's member list: names, the ring's placement, the copy on disk.
    pub(crate) fn apply_members(&self, list: MemberList) {
        {
            let mut names = self.names.write().unwrap();
            for n in &list.names {
                names.insert(raft_id(n), n.clone());
            }
        }
        let ring = Ring::new(list.names.iter(), VNODES_DEFAULT);
        let replicas = (0..self.partitions)
            .map(|p| {
                ring.replicas(p, list.replication_factor)
                    .into_iter()
                    .map(String::from)
                    .collect()
            })
            .collect();
        {
            let mut pl = self.placement.write().unwrap();
            pl.epoch = list.epoch;
            pl.replicas = replicas;
        }
        if let Some(f) = self.formed.get() {
            if let Err(e) = save_members(&f.store, &list) {
                tracing::warn!(error = %e, "cannot keep the member list on disk");
            }
        }
        *self.members.write().unwrap() = Some(list);
    }

    /// The member list as this node's replica of the member-list group holds it.
    pub(crate) fn list_from_meta(&self) -> Option<MemberList> {
        let f = self.formed.get()?;
        let m = f.meta.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let mut names: Vec<String> = membership.nodes().map(|(_, n)| n.addr.clone()).collect();
        if names.is_empty() {
            return None;
        }
        names.sort();
        let metas = self.metas.borrow().clone();
        let addrs = self.cluster_addrs(&names, &metas);
        Some(MemberList {
            names,
            replication_factor: f.replication_factor,
            addrs,
            // + 1: epoch 0 is kept for the list a new cluster forms with.
            epoch: m
                .membership_config
                .log_id()
                .as_ref()
                .map(|l| l.index + 1)
                .unwrap_or(1),
        })
    }

    /// The cluster addresses of `names` (this node's own, the others' from gossip).
    fn cluster_addrs(
        &self,
        names: &[String],
        metas: &HashMap<String, NodeMeta>,
    ) -> Vec<SocketAddr> {
        let own = self.my_meta.read().unwrap().cluster;
        names
            .iter()
            .filter_map(|n| {
                if *n == self.me {
                    Some(own)
                } else {
                    metas.get(n).map(|m| m.cluster)
                }
            })
            .collect()
    }

    /// The member list from a formed member, by joining a running cluster, or for a new
    /// cluster (epoch 0).
    async fn discover(&self, config: &Config) -> anyhow::Result<MemberList> {
        let expect = config.bootstrap_expect.max(1) as usize;
        let mut last_log = Instant::now();
        loop {
            let live: Vec<String> = self
                .membership
                .members()
                .into_iter()
                .map(|m| m.name)
                .collect();
            let metas = self.metas.borrow().clone();
            // A running cluster: learn its member list from one of its nodes, and ask to
            // join it when this node is not in it.
            for name in &live {
                let Some(meta) = metas.get(name).filter(|m| m.formed) else {
                    continue;
                };
                let Ok(bytes) = self
                    .transport
                    .call(
                        meta.cluster,
                        0,
                        KIND_MEMBERS,
                        Vec::new(),
                        Duration::from_secs(2),
                    )
                    .await
                else {
                    continue;
                };
                let list: MemberList = rmp_serde::from_slice(&bytes)?;
                if list.names.contains(&self.me) {
                    // Epoch 1 is the formation list as the member-list group holds it: no
                    // node has joined or left since. This node is a founder that was late
                    // to form (or lost its data before any change), and forms as one: it
                    // creates the groups it is the first replica of, unless they exist.
                    // Otherwise nobody would create them.
                    if list.epoch <= 1 {
                        tracing::info!(from = %name, "the cluster formed with this node in it; forming as a founder");
                        return Ok(MemberList { epoch: 0, ..list });
                    }
                    tracing::info!(from = %name, "rejoining the cluster with an empty data directory; replicas catch up from their leaders");
                    return Ok(list);
                }
                match self.ask_to_join(meta.cluster).await {
                    Ok(list) => {
                        tracing::info!(through = %name, members = ?list.names, "joined the running cluster; partitions move here in the background");
                        return Ok(list);
                    }
                    Err(e) => {
                        tracing::warn!(through = %name, error = %e, "cannot join the running cluster yet; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            let mut candidates: Vec<String> = live
                .into_iter()
                .filter(|n| metas.contains_key(n))
                .chain([self.me.clone()])
                .collect();
            candidates.sort();
            candidates.dedup();
            if candidates.len() >= expect {
                let rf = (config.cluster.replication_factor as usize).min(candidates.len());
                let addrs = self.cluster_addrs(&candidates, &metas);
                return Ok(MemberList {
                    names: candidates,
                    replication_factor: rf,
                    addrs,
                    epoch: 0,
                });
            }
            if last_log.elapsed() > Duration::from_secs(5) {
                tracing::info!(
                    have = candidates.len(),
                    expect,
                    members = ?candidates,
                    "waiting for bootstrap_expect members before forming the cluster"
                );
                last_log = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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

    /// Seeds given as DNS names (a StatefulSet's headless service) are resolved again every
    /// 5 s while this node knows no other member: pods that were not up at the first lookup
    /// are found when they come.
    pub fn refresh_seeds(self: &Arc<Self>, names: Vec<String>, store: &Store) {
        if names.is_empty() {
            return;
        }
        let stored: Vec<SocketAddr> = load_members(store)
            .ok()
            .flatten()
            .map(|l| l.addrs)
            .unwrap_or_default();
        let node = self.clone();
        let own = self.transport.local_addr();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SEED_REFRESH);
            loop {
                tick.tick().await;
                if !node.membership.members().is_empty() {
                    continue;
                }
                let mut seeds = resolve_seeds(&names).await;
                seeds.extend(stored.iter().copied());
                seeds.retain(|s| *s != own);
                seeds.sort();
                seeds.dedup();
                tracing::debug!(?seeds, "alone: seeds resolved again");
                node.membership.set_seeds(seeds).await;
            }
        });
    }

    /// Watches every partition's leader: when this node stops leading one, its mailboxes
    /// stop (so no stale writer survives); sessions subscribed elsewhere re-check.
    pub fn watch_leaders(self: &Arc<Self>, mailboxes: Mailboxes, routing: Arc<Routing>) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut prev: Vec<Leader> = (0..node.partitions)
                .map(|_| Leader::Unknown(String::new()))
                .collect();
            let mut tick = tokio::time::interval(LEADER_WATCH_PERIOD);
            loop {
                tick.tick().await;
                let mut led = 0;
                for p in 0..node.partitions {
                    let now = node.leader(p);
                    if now == Leader::Local {
                        led += 1;
                    }
                    if now != prev[p as usize] {
                        if prev[p as usize] == Leader::Local {
                            tracing::info!(
                                partition = p,
                                "no longer leading the partition; stopping its mailboxes"
                            );
                            mailboxes.stop_partition(p);
                        }
                        routing.leader_changed(p);
                        prev[p as usize] = now;
                    }
                }
                metrics::gauge!("warbler_partitions_led").set(led as f64);
            }
        });
    }

    /// Ready: the cluster formed, this node is a member, and every local replica has been
    /// added to its group, has a leader and has applied the entries it holds.
    pub fn ready(&self) -> Result<(), String> {
        if self.formed.get().is_none() {
            return Err(
                "the cluster has not formed yet (waiting for bootstrap_expect members)".into(),
            );
        }
        if self.left.load(Ordering::Relaxed) {
            return Err("this node was decommissioned and is no longer a member; stop it (to join again, start it on an empty data directory)".into());
        }
        let rafts = {
            let pl = self.placement.read().unwrap();
            // Replicas start one by one after the cluster forms (or when partitions are
            // placed here): one not started yet has nothing to compare.
            if let Some(p) = (0..pl.replicas.len()).find(|&p| {
                pl.replicas[p].contains(&self.me) && !pl.rafts.contains_key(&(p as PartitionId))
            }) {
                return Err(format!(
                    "partition {p} is placed here and its replica has not started yet"
                ));
            }
            pl.rafts.clone()
        };
        for (p, raft) in &rafts {
            let m = raft.metrics().borrow().clone();
            if m.membership_config.membership().nodes().next().is_none() {
                return Err(format!(
                    "partition {p} is moving here and this replica has not been added to it yet"
                ));
            }
            if m.current_leader.is_none() {
                return Err(format!("partition {p} has no leader yet"));
            }
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            let last = m.last_log_index.unwrap_or(0);
            if applied < last {
                return Err(format!(
                    "partition {p} is catching up (applied {applied} of {last})"
                ));
            }
            if m.current_leader != Some(self.my_id) {
                // A follower has caught up when it has applied what its leader had applied
                // a second ago (a healthy one trails it by a heartbeat at most).
                match self.leaders_applied.lock().unwrap().get(p) {
                    None => {
                        return Err(format!(
                            "partition {p}: comparing this replica with its leader"
                        ))
                    }
                    Some((then, _)) if applied < *then => {
                        return Err(format!(
                            "partition {p} is catching up with its leader (applied {applied}, the leader {then})"
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// The applied index of each of `partitions` this node leads.
    fn applied_as_leader(&self, partitions: &[PartitionId]) -> Vec<(PartitionId, u64)> {
        let pl = self.placement.read().unwrap();
        partitions
            .iter()
            .filter_map(|p| {
                let m = pl.rafts.get(p)?.metrics().borrow().clone();
                (m.state == ServerState::Leader)
                    .then(|| (*p, m.last_applied.map(|l| l.index).unwrap_or(0)))
            })
            .collect()
    }

    /// Every second: asks the leaders of the partitions this node follows how far they
    /// have applied (one call per leader), for `/readyz`.
    pub fn watch_catch_up(self: &Arc<Self>) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(APPLIED_PERIOD);
            loop {
                tick.tick().await;
                let mut by_leader: HashMap<u64, Vec<PartitionId>> = HashMap::new();
                for (p, raft) in node.placement.read().unwrap().rafts.iter() {
                    match raft.metrics().borrow().current_leader {
                        Some(l) if l != node.my_id => by_leader.entry(l).or_default().push(*p),
                        _ => {}
                    }
                }
                let Some(f) = node.formed.get() else { continue };
                for (leader, partitions) in by_leader {
                    let Some(addr) = (f.resolver)(leader) else {
                        continue;
                    };
                    let body = rmp_serde::to_vec_named(&partitions).expect("serializes");
                    let Ok(bytes) = node
                        .transport
                        .call(addr, 0, KIND_APPLIED, body, Duration::from_secs(2))
                        .await
                    else {
                        continue;
                    };
                    let Ok(answers) = rmp_serde::from_slice::<Vec<(PartitionId, u64)>>(&bytes)
                    else {
                        continue;
                    };
                    let mut seen = node.leaders_applied.lock().unwrap();
                    for (p, applied) in answers {
                        let e = seen.entry(p).or_insert((applied, applied));
                        *e = (e.1, applied);
                    }
                }
            }
        });
    }

    /// Members, their state, partitions with replicas and leaders.
    pub fn status(&self) -> Value {
        let live: Vec<String> = self
            .membership
            .members()
            .into_iter()
            .map(|m| m.name)
            .collect();
        let metas = self.metas.borrow().clone();
        let list = self.members.read().unwrap().clone();
        let mut names: Vec<String> = match &list {
            Some(l) => l.names.clone(),
            None => live.iter().cloned().chain([self.me.clone()]).collect(),
        };
        let is_member = |n: &String| list.as_ref().is_none_or(|l| l.names.contains(n));
        // Live nodes outside the list: joining, or decommissioned and not stopped yet.
        names.extend(live.iter().cloned());
        names.push(self.me.clone());
        names.sort();
        names.dedup();
        let members: Vec<Value> = names
            .iter()
            .map(|n| {
                let alive = *n == self.me || live.contains(n);
                let meta = if *n == self.me {
                    Some(self.my_meta.read().unwrap().clone())
                } else {
                    metas.get(n).cloned()
                };
                let state = if !is_member(n) || (*n == self.me && self.left.load(Ordering::Relaxed))
                {
                    "not a member".to_string()
                } else if alive {
                    meta.as_ref()
                        .map(|m| m.state.to_string())
                        .unwrap_or("joining".into())
                } else {
                    "down".to_string()
                };
                json!({
                    "node": n,
                    "alive": alive,
                    "member": is_member(n),
                    "state": state,
                    "client_addr": meta.as_ref().map(|m| m.client.to_string()),
                    "http_addr": meta.as_ref().map(|m| m.http.to_string()),
                    "cluster_addr": meta.as_ref().map(|m| m.cluster.to_string()),
                })
            })
            .collect();
        let pl = self.placement.read().unwrap();
        let names_by_id = self.names.read().unwrap().clone();
        let partitions: Vec<Value> = if self.formed.get().is_none() {
            Vec::new()
        } else {
            (0..self.partitions)
                .map(|p| {
                    let placed = &pl.replicas[p as usize];
                    let Some(m) = pl.rafts.get(&p).map(|r| r.metrics().borrow().clone()) else {
                        return json!({"partition": p, "replicas": placed, "placement": placed, "leader": null});
                    };
                    let leader = m.current_leader.and_then(|id| names_by_id.get(&id).cloned());
                    let mut voters: Vec<String> = m
                        .membership_config
                        .membership()
                        .voter_ids()
                        .filter_map(|id| names_by_id.get(&id).cloned())
                        .collect();
                    voters.sort();
                    let replicas = if voters.is_empty() { placed.clone() } else { voters };
                    json!({
                        "partition": p,
                        "replicas": replicas,
                        "placement": placed,
                        "leader": leader,
                        "term": m.current_term,
                        "applied": m.last_applied.map(|l| l.index).unwrap_or(0),
                    })
                })
                .collect()
        };
        let held = pl
            .rafts
            .values()
            .filter(|r| {
                r.metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .nodes()
                    .next()
                    .is_some()
            })
            .count();
        json!({
            "node": self.me,
            "members": members,
            "member_list_epoch": list.as_ref().map(|l| l.epoch),
            "decommissioned": self.left.load(Ordering::Relaxed),
            "replicas_held": held,
            "replication_factor": list.as_ref().map(|l| l.replication_factor),
            "partition_count": self.partitions,
            "partitions": partitions,
            "faults_blocked": self.faults.blocked().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        })
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

    /// Says it is draining, stops every Raft group (followers elect new leaders), and
    /// leaves the gossip cluster.
    pub async fn shutdown(&self) {
        let formed = self.formed.get().is_some();
        self.set_state(NodeState::Draining, formed).await;
        let rafts: Vec<_> = self
            .placement
            .read()
            .unwrap()
            .rafts
            .values()
            .cloned()
            .collect();
        for raft in rafts {
            let _ = raft.shutdown().await;
        }
        if let Some(f) = self.formed.get() {
            let _ = f.meta.shutdown().await;
        }
        self.membership.leave().await;
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

    /// This node's replica of `partition`, when it has been added to the partition's group.
    fn replica(&self, partition: PartitionId) -> Option<Raft<TypeConfig>> {
        let raft = self.local_raft(partition)?;
        let added = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .next()
            .is_some();
        added.then_some(raft)
    }
}

impl Router for ClusterNode {
    fn leader(&self, partition: PartitionId) -> Leader {
        if self.formed.get().is_none() {
            return Leader::Unknown("the cluster has not formed yet".into());
        }
        let name = match self.replica(partition) {
            Some(raft) => {
                let m = raft.metrics();
                let m = m.borrow();
                match m.current_leader {
                    Some(id) if id == self.my_id => {
                        return if m.state == ServerState::Leader {
                            Leader::Local
                        } else {
                            Leader::Unknown(format!("partition {partition} is changing leader"))
                        };
                    }
                    Some(id) => match self.names.read().unwrap().get(&id) {
                        Some(n) => n.clone(),
                        None => return Leader::Unknown(format!("leader {id} is not a member")),
                    },
                    None => {
                        return Leader::Unknown(format!(
                            "partition {partition} is electing a leader"
                        ))
                    }
                }
            }
            // Not a replica here (or not added yet): a guess, corrected by redirects. First
            // the preferred leader; a replica that is not the leader names the one that is,
            // and one that cannot be reached makes way for the next replica.
            None => {
                let hint = self.leader_hints.lock().unwrap().get(&partition).cloned();
                let pl = self.placement.read().unwrap();
                let replicas = pl.replicas.get(partition as usize);
                let first_other = replicas.and_then(|r| r.iter().find(|n| **n != self.me));
                match hint
                    .filter(|h| *h != self.me)
                    .or_else(|| first_other.cloned())
                {
                    Some(n) => n,
                    None => {
                        return Leader::Unknown(format!(
                            "partition {partition} has no replicas on other nodes"
                        ))
                    }
                }
            }
        };
        if name == self.me {
            return Leader::Unknown(format!(
                "partition {partition} is moving to this node; waiting for its leader"
            ));
        }
        match self.metas.borrow().get(&name) {
            Some(meta) => Leader::Remote {
                node: name,
                addr: meta.cluster,
            },
            None => Leader::Unknown(format!("no address known for node {name}")),
        }
    }

    fn redirected(&self, partition: PartitionId, leader: Option<&str>) {
        if self.formed.get().is_none() || self.replica(partition).is_some() {
            return; // a replica here knows the leader from consensus, not from guesses
        }
        let replicas = match self
            .placement
            .read()
            .unwrap()
            .replicas
            .get(partition as usize)
        {
            Some(r) if !r.is_empty() => r.clone(),
            _ => return,
        };
        let mut hints = self.leader_hints.lock().unwrap();
        let next = match leader {
            Some(l) => l.to_string(),
            None => {
                // The guess failed: try the replica after it.
                let current = hints.get(&partition).unwrap_or(&replicas[0]);
                let at = replicas.iter().position(|r| r == current).unwrap_or(0);
                let n = replicas.len();
                match (1..=n)
                    .map(|i| &replicas[(at + i) % n])
                    .find(|r| **r != self.me)
                {
                    Some(r) => r.clone(),
                    None => return,
                }
            }
        };
        hints.insert(partition, next);
    }

    fn is_replica(&self, partition: PartitionId) -> bool {
        self.replica(partition).is_some()
    }
}

fn save_members(store: &Store, list: &MemberList) -> anyhow::Result<()> {
    store.raft_meta_put(
        CLUSTER_META_PARTITION,
        MEMBERS_KEY,
        &rmp_serde::to_vec_named(list)?,
        true,
    )?;
    Ok(())
}

fn load_members(store: &Store) -> anyhow::Result<Option<MemberList>> {
    match store.raft_meta_get(CLUSTER_META_PARTITION, MEMBERS_KEY)? {
        Some(bytes) => Ok(Some(rmp_serde::from_slice(&bytes).context(
            "the stored cluster member list is unreadable; the data directory may be damaged",
        )?)),
        None => Ok(None),
    }
}

/// Seeds are HOST:PORT; a host name may resolve to several nodes (a StatefulSet's headless
/// service). Unresolvable seeds are skipped with a warning (they may come up later; the
/// gossip layer retries those it has).
async fn resolve_seeds(seeds: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in seeds {
        match tokio::net::lookup_host(s.as_str()).await {
            Ok(addrs) => out.extend(addrs),
            Err(e) => {
                tracing::warn!(seed = %s, error = %e, "cannot resolve seed; check --seeds (HOST:PORT)")
            }
        }
    }
    out
}
