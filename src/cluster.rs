//! A node in a cluster: SWIM membership with node metadata, the member list (formed once
//! `bootstrap_expect` nodes are up, then kept in the node's database), one Raft group per
//! partition this node replicates, and the router that tells which node leads each
//! partition.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
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
const KIND_MEMBERS: u8 = 20;
/// Where the member list is kept (the consensus metadata column family, outside the
/// partition range).
const CLUSTER_META_PARTITION: PartitionId = u16::MAX;
const MEMBERS_KEY: &str = "members";
/// How often the leader of every partition is checked for changes.
const LEADER_WATCH_PERIOD: Duration = Duration::from_millis(100);
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
}

/// A node's consensus id: a hash of its stable name, so it survives restarts and moves.
pub fn raft_id(name: &str) -> u64 {
    fnv1a64(name.as_bytes())
}

/// What the router needs once the cluster formed.
struct Placement {
    replicas: Vec<Vec<String>>,
    rafts: BTreeMap<PartitionId, Raft<TypeConfig>>,
    names: HashMap<u64, String>,
}

/// The cluster side of a node; also its [`Router`].
pub struct ClusterNode {
    me: String,
    my_id: u64,
    partitions: u16,
    membership: Membership,
    metas: watch::Receiver<HashMap<String, NodeMeta>>,
    my_meta: RwLock<NodeMeta>,
    placement: OnceLock<Placement>,
    members: OnceLock<MemberList>,
    pub transport: Arc<PeerTransport>,
    pub raft_service: Arc<RaftService>,
    pub raft_log: Arc<RaftLog>,
    route_service: OnceLock<RouteService>,
    faults: Faults,
    fault_injection: bool,
    /// Partitions this node holds no replica of: the node last named as their leader.
    leader_hints: Mutex<HashMap<PartitionId, String>>,
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
                let list = node.members.get().cloned();
                Box::pin(async move {
                    list.map(|l| rmp_serde::to_vec_named(&l).expect("member list serializes"))
                        .ok_or_else(|| "this node has not joined a formed cluster yet".to_string())
                })
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
            placement: OnceLock::new(),
            members: OnceLock::new(),
            transport,
            raft_service,
            raft_log: Arc::new(RaftLog::default()),
            route_service: OnceLock::new(),
            faults,
            fault_injection: config.cluster.fault_injection,
            leader_hints: Mutex::default(),
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

    /// Waits for the member list (from disk, from a formed member, or by forming a new
    /// cluster once `bootstrap_expect` nodes are up), then starts this node's Raft groups.
    pub async fn form(self: &Arc<Self>, config: &Config, store: &Store) -> anyhow::Result<()> {
        let list = match load_members(store)? {
            Some(l) => l,
            None => {
                let l = self.discover(config).await?;
                store.raft_meta_put(
                    CLUSTER_META_PARTITION,
                    MEMBERS_KEY,
                    &rmp_serde::to_vec_named(&l)?,
                    true,
                )?;
                l
            }
        };
        tracing::info!(members = ?list.names, rf = list.replication_factor, "cluster formed");
        let ring = Ring::new(list.names.iter(), VNODES_DEFAULT);
        let names: HashMap<u64, String> =
            list.names.iter().map(|n| (raft_id(n), n.clone())).collect();
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
            let (metas, names) = (self.metas.clone(), names.clone());
            Arc::new(move |id| {
                let name = names.get(&id)?;
                metas.borrow().get(name).map(|m| m.cluster)
            })
        };
        let mut replicas = Vec::with_capacity(self.partitions as usize);
        let mut rafts = BTreeMap::new();
        for p in 0..self.partitions {
            let reps: Vec<String> = ring
                .replicas(p, list.replication_factor)
                .into_iter()
                .map(String::from)
                .collect();
            if reps.contains(&self.me) {
                let raft = raft_net::start_group(
                    self.my_id,
                    p,
                    raft_config.clone(),
                    store,
                    &self.transport,
                    &self.raft_service,
                    Some(resolver.clone()),
                )
                .await
                .map_err(|e| anyhow::anyhow!("cannot start the replica of partition {p}: {e}"))?;
                if reps[0] == self.me && !raft.is_initialized().await? {
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
                self.raft_log.insert(p, raft.clone());
                rafts.insert(p, raft);
            }
            replicas.push(reps);
        }
        let _ = self.members.set(list);
        let _ = self.placement.set(Placement {
            replicas,
            rafts,
            names,
        });
        self.set_state(NodeState::Serving, true).await;
        Ok(())
    }

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
            // A running cluster: learn its member list from one of its nodes.
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
                    tracing::info!(from = %name, "rejoining the cluster with an empty data directory; replicas catch up from their leaders");
                    return Ok(list);
                }
                bail!(
                    "node {} is not a member of the running cluster (members: {}); adding nodes to a running cluster is not supported by this version: restart the node with its old data directory, or start it with a name from the member list",
                    self.me,
                    list.names.join(", ")
                );
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
                let own = self.my_meta.read().unwrap().cluster;
                let addrs = candidates
                    .iter()
                    .filter_map(|n| {
                        if *n == self.me {
                            Some(own)
                        } else {
                            metas.get(n).map(|m| m.cluster)
                        }
                    })
                    .collect();
                return Ok(MemberList {
                    names: candidates,
                    replication_factor: rf,
                    addrs,
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

    async fn set_state(&self, state: NodeState, formed: bool) {
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

    /// Ready: the cluster formed and every local replica has a leader and has applied the
    /// entries it holds.
    pub fn ready(&self) -> Result<(), String> {
        let Some(placement) = self.placement.get() else {
            return Err(
                "the cluster has not formed yet (waiting for bootstrap_expect members)".into(),
            );
        };
        for (p, raft) in &placement.rafts {
            let m = raft.metrics().borrow().clone();
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
        }
        Ok(())
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
        let names: Vec<String> = match self.members.get() {
            Some(l) => l.names.clone(),
            None => {
                let mut n: Vec<String> = live.iter().cloned().chain([self.me.clone()]).collect();
                n.sort();
                n.dedup();
                n
            }
        };
        let members: Vec<Value> = names
            .iter()
            .map(|n| {
                let alive = *n == self.me || live.contains(n);
                let meta = if *n == self.me {
                    Some(self.my_meta.read().unwrap().clone())
                } else {
                    metas.get(n).cloned()
                };
                json!({
                    "node": n,
                    "alive": alive,
                    "state": if alive { meta.as_ref().map(|m| m.state.to_string()).unwrap_or("joining".into()) } else { "down".to_string() },
                    "client_addr": meta.as_ref().map(|m| m.client.to_string()),
                    "http_addr": meta.as_ref().map(|m| m.http.to_string()),
                    "cluster_addr": meta.as_ref().map(|m| m.cluster.to_string()),
                })
            })
            .collect();
        let partitions: Vec<Value> = match self.placement.get() {
            None => Vec::new(),
            Some(pl) => (0..self.partitions)
                .map(|p| {
                    let leader = self.leader_name(pl, p);
                    let m = pl.rafts.get(&p).map(|r| r.metrics().borrow().clone());
                    let term = m.as_ref().map(|m| m.current_term);
                    let applied = m.as_ref().map(|m| m.last_applied.map(|l| l.index).unwrap_or(0));
                    json!({"partition": p, "replicas": pl.replicas[p as usize], "leader": leader, "term": term, "applied": applied})
                })
                .collect(),
        };
        json!({
            "node": self.me,
            "members": members,
            "replication_factor": self.members.get().map(|l| l.replication_factor),
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
        self.set_state(NodeState::Draining, self.members.get().is_some())
            .await;
        if let Some(pl) = self.placement.get() {
            for raft in pl.rafts.values() {
                let _ = raft.shutdown().await;
            }
        }
        self.membership.leave().await;
    }
}

impl ClusterNode {
    /// The leader of `partition` by name, as this node's replica knows it.
    fn leader_name(&self, pl: &Placement, partition: PartitionId) -> Option<String> {
        let raft = pl.rafts.get(&partition)?;
        let id = raft.metrics().borrow().current_leader?;
        pl.names.get(&id).cloned()
    }
}

impl Router for ClusterNode {
    fn leader(&self, partition: PartitionId) -> Leader {
        let Some(pl) = self.placement.get() else {
            return Leader::Unknown("the cluster has not formed yet".into());
        };
        let name = match pl.rafts.get(&partition) {
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
                    Some(id) => match pl.names.get(&id) {
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
            // Not a replica here: a guess, corrected by redirects. First the preferred
            // leader; a replica that is not the leader names the one that is, and one that
            // cannot be reached makes way for the next replica.
            None => match self.leader_hints.lock().unwrap().get(&partition) {
                Some(n) => n.clone(),
                None => match pl.replicas.get(partition as usize).and_then(|r| r.first()) {
                    Some(n) => n.clone(),
                    None => {
                        return Leader::Unknown(format!("partition {partition} has no replicas"))
                    }
                },
            },
        };
        match self.metas.borrow().get(&name) {
            Some(meta) => Leader::Remote {
                node: name,
                addr: meta.cluster,
            },
            None => Leader::Unknown(format!("no address known for node {name}")),
        }
    }

    fn redirected(&self, partition: PartitionId, leader: Option<&str>) {
        let Some(pl) = self.placement.get() else {
            return;
        };
        if pl.rafts.contains_key(&partition) {
            return; // a replica here knows the leader from consensus, not from guesses
        }
        let replicas = match pl.replicas.get(partition as usize) {
            Some(r) if !r.is_empty() => r,
            _ => return,
        };
        let mut hints = self.leader_hints.lock().unwrap();
        let next = match leader {
            Some(l) => l.to_string(),
            None => {
                // The guess failed: try the replica after it.
                let current = hints.get(&partition).unwrap_or(&replicas[0]);
                let at = replicas.iter().position(|r| r == current).unwrap_or(0);
                replicas[(at + 1) % replicas.len()].clone()
            }
        };
        hints.insert(partition, next);
    }
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
