//! Forming: the member list from disk, from a formed member, by joining a running cluster,
//! or for a new cluster; then this node's replicas of the member list and its partitions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, Raft};
use warbler_config::Config;
use warbler_storage::{PartitionId, Store};

use super::{ClusterNode, Formed};
use crate::control::members::{self, list_from_group, raft_id, Standing};
use crate::control::start::{self, Found, Peer};
use crate::control::{placement, MemberList};
use crate::error::ClusterError;
use crate::identity::ClusterId;
use crate::raft_net::{self, Resolver};
use crate::raft_store::TypeConfig;
use crate::wire::{self, PeerKind};
use crate::NodeState;

/// Where the member list is kept (the consensus metadata column family, outside the
/// partition range).
const CLUSTER_META_PARTITION: PartitionId = u16::MAX;
const MEMBERS_KEY: &str = "members";
/// The Raft group whose membership is the cluster's member list: every member is one of its
/// voters or learners, so every member holds the list and a change to it is a consensus
/// decision.
pub const META_GROUP: PartitionId = u16::MAX - 1;
/// How often a node that knows no member resolves its seeds again.
const SEED_REFRESH: Duration = Duration::from_secs(5);
/// How long a node waits for a peer's answer about the member list.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a node waiting to form looks at gossip again.
const DISCOVER_PERIOD: Duration = Duration::from_millis(200);
/// What the members said about the cluster id.
enum Asked {
    Found(String),
    /// Every other member answered, none with an id.
    NoneHasOne,
    /// Some member did not answer (or is not in gossip yet).
    SomeSilent,
}

/// How long a node restarting on a kept member list waits for a member to tell it whether
/// it is still one (a whole cluster starting at once waits this long).
const STANDING_WAIT: Duration = Duration::from_secs(5);
/// How long a removed node restarting with replicas on its disk keeps asking whether their
/// partitions still count it, while their leaderships move (the cluster has just rebuilt
/// them elsewhere and balances their leaders).
const COUNTED_WAIT: Duration = Duration::from_secs(20);

impl ClusterNode {
    /// Waits for the member list (from disk, from a formed member, by joining a running
    /// cluster, or by forming a new cluster once `bootstrap_expect` nodes are up), then
    /// starts this node's replica of the member list and of its partitions, and keeps them
    /// in step with the member list.
    pub async fn form(
        self: &Arc<Self>,
        config: &Config,
        store: &Store,
    ) -> Result<(), ClusterError> {
        let list = match load_members(store)? {
            Some(stored) => self.stored_unless_removed(config, store, stored).await?,
            None => self.discover_and_keep(config, store).await?,
        };
        if let Some(id) = &list.cluster {
            if self.cluster_id.adopt(store, id)? {
                tracing::info!(cluster_id = %id, "this node is now a member of cluster {id}");
            }
        }
        tracing::info!(members = ?list.names, rf = list.replication_factor, fresh = list.is_formation(), "cluster formed");
        self.learn_names(&list);
        let raft_config = Arc::new(raft_config(config)?);
        let resolver: Resolver = {
            let (metas, names) = (self.metas.clone(), self.names.clone());
            Arc::new(move |id| {
                let name = names.read().unwrap().get(&id)?.clone();
                metas.borrow().get(&name).map(|m| m.cluster)
            })
        };
        let meta = self
            .start_group(META_GROUP, &raft_config, store, &resolver)
            .await?;
        if start::creates_group(&self.me, &list, list.names.first().map(String::as_str)) {
            // The node that creates the member-list group names the new cluster (not on a
            // restart: a group that exists has a cluster, named or not).
            let exists = meta
                .is_initialized()
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?;
            let id = ClusterId::random();
            if !exists && self.cluster_id.adopt(store, &id)? {
                tracing::info!(cluster_id = %id, "a new cluster forms: it is {id}");
            }
            self.initialize(&meta, &list.names, &list.zones).await?;
        }
        let _ = self.formed.set(Formed {
            store: store.clone(),
            raft_config,
            resolver,
            meta,
            replication_factor: list.replication_factor,
        });
        self.routing_changed();
        // The member-list group's own record wins over the copy on disk when it is newer (a
        // joining node's replica may still be replaying older lists).
        let current = match self.list_from_meta() {
            Some(meta) if meta.supersedes(Some(&list)) => meta,
            _ => list.clone(),
        };
        self.apply_members(current);
        for p in 0..self.partitions {
            let reps = self.placed(p);
            if !reps.iter().any(|n| *n == self.me) {
                continue;
            }
            let raft = self.start_replica(p).await?;
            if start::creates_group(&self.me, &list, reps.first().map(String::as_str)) {
                self.initialize(&raft, &reps, &BTreeMap::new()).await?;
            }
        }
        self.set_state(NodeState::Serving, true).await;
        self.keep_in_step();
        self.watch_catch_up();
        self.quiesce_idle();
        self.learn_cluster_id();
        Ok(())
    }

    async fn discover_and_keep(
        &self,
        config: &Config,
        store: &Store,
    ) -> Result<MemberList, ClusterError> {
        let list = self.discover(config).await?;
        save_members(store, &list)?;
        Ok(list)
    }

    /// The member list kept on disk, unless the cluster removed this node since (the disk
    /// is stale: the node was decommissioned or replaced while it was down). A removed node
    /// that holds no replica has its data directory wiped and joins as a new node; one
    /// that still holds replicas starts with them, hands them over, and serves nothing (it
    /// is wiped at its next start).
    async fn stored_unless_removed(
        &self,
        config: &Config,
        store: &Store,
        stored: MemberList,
    ) -> Result<MemberList, ClusterError> {
        let Some(current) = self.removed_since(&stored).await else {
            return Ok(stored);
        };
        let held: Vec<PartitionId> = store
            .consensus_groups()?
            .into_iter()
            .filter(|p| *p < self.partitions)
            .collect();
        if let Some(why) = self.counted_in_any(&current, &held).await {
            tracing::warn!(epoch = current.epoch, members = ?current.names, replicas = held.len(), why, "this node was removed from the cluster while partitions still counted its replicas: it hands them over and then serves nothing; restart it afterwards and it joins again as a new node (its data directory is wiped then)");
            return Ok(stored);
        }
        tracing::warn!(epoch = current.epoch, members = ?current.names, stale_replicas = held.len(), "this data directory belongs to a node the cluster removed (its member list no longer names it) and no partition counts its replicas: wiping it and joining as a new node");
        store.wipe()?;
        self.cluster_id.keep(store)?;
        metrics::counter!("warbler_stale_disk_wipes_total").increment(1);
        self.discover_and_keep(config, store).await
    }

    /// The current member list when it no longer names this node, asked of the members in
    /// `stored` and the formed nodes gossip shows, for up to [`STANDING_WAIT`]; `None`
    /// when it still names it, or no member answered (the whole cluster is starting).
    async fn removed_since(&self, stored: &MemberList) -> Option<MemberList> {
        if stored.names.iter().all(|n| *n == self.me) {
            return None;
        }
        let own = [self.transport.local_addr(), self.cluster_addr()];
        let deadline = Instant::now() + STANDING_WAIT;
        loop {
            let mut addrs: Vec<SocketAddr> = stored.addrs.clone();
            addrs.extend(start::formed_peers(&self.peers()).map(|p| p.cluster));
            addrs.retain(|a| !own.contains(a));
            addrs.sort();
            addrs.dedup();
            let mut asks = tokio::task::JoinSet::new();
            for addr in addrs {
                let transport = self.transport.clone();
                asks.spawn(async move {
                    let asked = transport.call(addr, 0, PeerKind::Members, Vec::new(), ASK_TIMEOUT);
                    Some((addr, wire::decode::<MemberList>(&asked.await.ok()?).ok()?))
                });
            }
            while let Some(answer) = asks.join_next().await {
                let Ok(Some((from, theirs))) = answer else {
                    continue;
                };
                if !self.of_this_cluster(&theirs, from) {
                    continue;
                }
                return match members::standing(&self.me, stored, Some(&theirs)) {
                    Standing::Left(current) => Some(current),
                    Standing::Member | Standing::AskOthers => None,
                };
            }
            if Instant::now() >= deadline {
                tracing::info!(
                    wait_ms = STANDING_WAIT.as_millis() as u64,
                    "no member answered; starting from the member list kept on disk"
                );
                return None;
            }
            tokio::time::sleep(DISCOVER_PERIOD).await;
        }
    }

    /// Why a partition of `held` (partitions this node has data of) still counts this node
    /// in its group, asked of the leaders the `current` list places them on; `None` when
    /// none does. A partition that no placed node answers for (its leadership is moving, a
    /// node is not in gossip yet) is asked again until [`COUNTED_WAIT`]; one still
    /// unanswered then counts as counting it.
    async fn counted_in_any(&self, current: &MemberList, held: &[PartitionId]) -> Option<String> {
        let placed = placement::place(current, self.partitions);
        let body = wire::encode(&wire::NodeReq(self.me.clone()));
        let deadline = Instant::now() + COUNTED_WAIT;
        // Gossip may not have every member's address yet, a moment after start.
        let gossip_deadline = Instant::now() + STANDING_WAIT;
        let mut unanswered = held.to_vec();
        loop {
            let mut silent = Vec::new();
            for &p in &unanswered {
                let names = placed
                    .get(p as usize)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                match self.ask_counted(p, names, &body, gossip_deadline).await {
                    Some((true, leader)) => {
                        return Some(format!("partition {p}'s leader {leader} counts it"));
                    }
                    Some((false, _)) => {}
                    None => silent.push(p),
                }
            }
            if silent.is_empty() {
                return None;
            }
            if Instant::now() >= deadline {
                return Some(format!(
                    "no leader of partitions {silent:?} answered within {} s",
                    COUNTED_WAIT.as_secs()
                ));
            }
            tracing::debug!(partitions = ?silent, "no leader answered yet whether these partitions still count this removed node; asking again");
            unanswered = silent;
            tokio::time::sleep(DISCOVER_PERIOD).await;
        }
    }

    /// Whether `partition`'s group counts this node, and the name of the node that said
    /// so: the first of `names` (the nodes it is placed on) that answers as its settled
    /// leader; `None` when none does. Waits for a node's address from gossip until
    /// `gossip_deadline`.
    async fn ask_counted<'a>(
        &self,
        partition: PartitionId,
        names: &'a [String],
        body: &[u8],
        gossip_deadline: Instant,
    ) -> Option<(bool, &'a str)> {
        for name in names {
            let Some(addr) = self.gossip_addr(name, gossip_deadline).await else {
                continue;
            };
            if let Some(counted) = self.call_member_of(addr, partition, body).await {
                return Some((counted, name));
            }
        }
        None
    }

    /// `name`'s cluster address from gossip, waiting for it until `deadline`.
    async fn gossip_addr(&self, name: &str, deadline: Instant) -> Option<SocketAddr> {
        loop {
            if let Some(addr) = self.metas.borrow().get(name).map(|m| m.cluster) {
                return Some(addr);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(DISCOVER_PERIOD).await;
        }
    }

    /// Until this node knows its cluster's id: asks the members for it every second; the
    /// member-list group's leader makes one up only when every member answered and none has
    /// one (a cluster a previous release formed). A member that cannot answer may hold the
    /// id its creator made: two ids would split the cluster for good.
    fn learn_cluster_id(self: &Arc<Self>) {
        if self.cluster_id.get().is_some() {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if node.cluster_id.get().is_some() || node.has_left() {
                    return;
                }
                let (id, made) = match node.members_cluster_id().await {
                    Asked::Found(id) => (id, false),
                    Asked::NoneHasOne if node.leads_member_list() => (ClusterId::random(), true),
                    Asked::NoneHasOne | Asked::SomeSilent => continue,
                };
                let store = &node.formed.get().expect("formed before learning").store;
                match node.cluster_id.adopt(store, &id) {
                    Ok(true) if made => {
                        tracing::info!(cluster_id = %id, "this cluster had no id (it just formed, or a previous release formed it): it is {id}")
                    }
                    Ok(_) => {
                        tracing::info!(cluster_id = %id, "learned the cluster's id from a member")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot keep the cluster id; retrying"),
                }
            }
        });
    }

    /// The cluster id the first member that has one answers with, or why there is none.
    async fn members_cluster_id(&self) -> Asked {
        let Some(list) = self.members.read().unwrap().clone() else {
            return Asked::SomeSilent;
        };
        let others: Vec<String> = list.names.into_iter().filter(|n| *n != self.me).collect();
        let addrs = self.cluster_addrs(&others);
        let mut silent = addrs.len() < others.len();
        for addr in addrs {
            let asked = self
                .transport
                .call(addr, 0, PeerKind::Members, Vec::new(), ASK_TIMEOUT)
                .await;
            match asked.map(|b| wire::decode::<MemberList>(&b)) {
                Ok(Ok(MemberList {
                    cluster: Some(id), ..
                })) => return Asked::Found(id),
                Ok(Ok(_)) => {}
                _ => silent = true,
            }
        }
        if silent {
            Asked::SomeSilent
        } else {
            Asked::NoneHasOne
        }
    }

    fn leads_member_list(&self) -> bool {
        self.formed
            .get()
            .is_some_and(|f| super::group_view(&f.meta, self.my_id).leading)
    }

    /// Creates a group with `names` as its voters, unless it exists (a restart). Every group
    /// names its nodes by node name (the member-list group with their `zones`); addresses
    /// come from gossip.
    async fn initialize(
        &self,
        raft: &Raft<TypeConfig>,
        names: &[String],
        zones: &BTreeMap<String, String>,
    ) -> Result<(), ClusterError> {
        if raft
            .is_initialized()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?
        {
            return Ok(());
        }
        let voters: BTreeMap<u64, BasicNode> = names
            .iter()
            .map(|n| {
                let node = members::member_node(n, zones.get(n).map(String::as_str));
                (raft_id(n), BasicNode::new(node))
            })
            .collect();
        if let Err(e) = raft.initialize(voters).await {
            tracing::debug!(error = %e, "group already initialized");
        }
        Ok(())
    }

    async fn start_group(
        &self,
        group: PartitionId,
        config: &Arc<openraft::Config>,
        store: &Store,
        resolver: &Resolver,
    ) -> Result<Raft<TypeConfig>, ClusterError> {
        raft_net::start_group(
            self.my_id,
            group,
            config.clone(),
            store,
            &self.transport,
            &self.raft_service,
            Some(resolver.clone()),
        )
        .await
        .map_err(|e| ClusterError::StartReplica {
            what: if group == META_GROUP {
                "the member list".into()
            } else {
                format!("partition {group}")
            },
            message: e.to_string(),
        })
    }

    /// Starts this node's replica of `partition` (empty if it holds nothing of it yet: the
    /// partition's leader fills it).
    pub(crate) async fn start_replica(
        &self,
        partition: PartitionId,
    ) -> Result<Raft<TypeConfig>, ClusterError> {
        let f = self.formed.get().expect("replicas start after forming");
        let raft = self
            .start_group(partition, &f.raft_config, &f.store, &f.resolver)
            .await?;
        self.raft_log.insert(partition, raft.clone());
        self.greet_leader(partition, &raft);
        self.placement
            .write()
            .unwrap()
            .rafts
            .insert(partition, raft.clone());
        self.routing_changed();
        Ok(raft)
    }

    fn learn_names(&self, list: &MemberList) {
        let mut names = self.names.write().unwrap();
        for n in &list.names {
            names.insert(raft_id(n), n.clone());
        }
        self.routing_changed();
    }

    /// Makes `list` this node's member list: names, the ring's placement, the copy on disk.
    pub(crate) fn apply_members(&self, list: MemberList) {
        self.learn_names(&list);
        let replicas = placement::place(&list, self.partitions);
        {
            let mut pl = self.placement.write().unwrap();
            pl.epoch = list.epoch;
            pl.replicas = replicas;
        }
        self.routing_changed();
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
        let (nodes, index) = {
            let m = m.borrow();
            let nodes: Vec<String> = m
                .membership_config
                .membership()
                .nodes()
                .map(|(_, n)| n.addr.clone())
                .collect();
            (
                nodes,
                m.membership_config.log_id().as_ref().map(|l| l.index),
            )
        };
        let mut list = list_from_group(nodes, f.replication_factor, Vec::new(), index)?;
        list.addrs = self.cluster_addrs(&list.names);
        Some(list)
    }

    /// The cluster addresses of `names` (this node's own, the others' from gossip).
    fn cluster_addrs(&self, names: &[String]) -> Vec<SocketAddr> {
        let own = self.cluster_addr();
        let metas = self.metas.borrow();
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        sorted
            .into_iter()
            .filter_map(|n| {
                if *n == self.me {
                    Some(own)
                } else {
                    metas.get(n).map(|m| m.cluster)
                }
            })
            .collect()
    }

    /// The nodes gossip shows, with their metadata.
    fn peers(&self) -> Vec<Peer> {
        let metas = self.metas.borrow().clone();
        self.membership
            .members()
            .into_iter()
            .filter_map(|m| {
                let meta = metas.get(&m.name)?;
                Some(Peer {
                    name: m.name,
                    cluster: meta.cluster,
                    formed: meta.formed,
                    zone: meta.zone.clone(),
                })
            })
            .collect()
    }

    /// The member list from a formed member, by joining a running cluster, or for a new
    /// cluster (epoch 0).
    async fn discover(&self, config: &Config) -> Result<MemberList, ClusterError> {
        let expect = config.bootstrap_expect.max(1) as usize;
        let rf = config.cluster.replication_factor as usize;
        let mut last_log = Instant::now();
        loop {
            let peers = self.peers();
            for peer in start::formed_peers(&peers) {
                if let Some(list) = self.ask_formed(peer).await? {
                    return Ok(list);
                }
            }
            let zone = self.my_meta.read().unwrap().zone.clone();
            let me = (self.cluster_addr(), zone.as_deref());
            match start::form_new(&self.me, me, &peers, expect, rf) {
                Ok(list) => return Ok(list),
                Err(w) if last_log.elapsed() > Duration::from_secs(5) => {
                    if w.formed.is_empty() {
                        tracing::info!(have = w.have.len(), expect, members = ?w.have, "waiting for bootstrap_expect members before forming the cluster");
                    } else {
                        tracing::info!(formed = ?w.formed, "a formed cluster is in view: joining it (retrying until it accepts; check that its members can reach this node's cluster address)");
                    }
                    last_log = Instant::now();
                }
                Err(_) => {}
            }
            tokio::time::sleep(DISCOVER_PERIOD).await;
        }
    }

    /// Learns the member list from a formed `peer`: rejoins, forms as a late founder, or
    /// joins. `None` when it did not answer or refused the join (tried again later).
    async fn ask_formed(&self, peer: &Peer) -> Result<Option<MemberList>, ClusterError> {
        let Ok(bytes) = self
            .transport
            .call(peer.cluster, 0, PeerKind::Members, Vec::new(), ASK_TIMEOUT)
            .await
        else {
            return Ok(None);
        };
        let list: MemberList = wire::decode(&bytes)
            .map_err(|e| ClusterError::MemberListUnreadable(format!("from {}: {e}", peer.name)))?;
        match start::on_members_answer(&self.me, list) {
            Found::FormAsFounder(list) => {
                tracing::info!(from = %peer.name, "the cluster formed with this node in it; forming as a founder");
                Ok(Some(list))
            }
            Found::Rejoin(list) => {
                tracing::info!(from = %peer.name, "rejoining the cluster with an empty data directory; replicas catch up from their leaders");
                Ok(Some(list))
            }
            Found::AskToJoin => match self.ask_to_join(peer.cluster).await {
                Ok(list) => {
                    tracing::info!(through = %peer.name, members = ?list.names, "joined the running cluster; partitions move here in the background");
                    Ok(Some(list))
                }
                Err(e) => {
                    tracing::warn!(through = %peer.name, error = %e, "cannot join the running cluster yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok(None)
                }
            },
        }
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
        let own = [self.transport.local_addr(), self.cluster_addr()];
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SEED_REFRESH);
            loop {
                tick.tick().await;
                if !node.membership.members().is_empty() {
                    continue;
                }
                let mut seeds = resolve_seeds(&names).await;
                seeds.extend(stored.iter().copied());
                seeds.retain(|s| !own.contains(s));
                seeds.sort();
                seeds.dedup();
                tracing::debug!(?seeds, "alone: seeds resolved again");
                node.membership.set_seeds(seeds).await;
            }
        });
    }
}

fn raft_config(config: &Config) -> Result<openraft::Config, ClusterError> {
    openraft::Config {
        cluster_name: "warbler".into(),
        heartbeat_interval: config.cluster.raft_heartbeat_ms,
        election_timeout_min: config.cluster.raft_election_timeout_ms,
        // openraft's leader lease is the maximum: a follower refuses votes for that long
        // after the last heartbeat, so a wide range slows every failover.
        election_timeout_max: config.cluster.raft_election_timeout_ms * 3 / 2,
        // A snapshot's last chunk is answered once the follower has installed it: a
        // partition of 1 GiB of bodies took 9 s here (`snapshot_figures`, docs/benchmarks.md).
        // Only that follower's stream waits this long for a peer that went away.
        install_snapshot_timeout: 60_000,
        max_payload_entries: crate::raft_log::APPEND_ENTRIES_MAX,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ClusterError::RaftConfig(e.to_string()))
}

fn save_members(store: &Store, list: &MemberList) -> Result<(), ClusterError> {
    store.raft_meta_put(
        CLUSTER_META_PARTITION,
        MEMBERS_KEY,
        &wire::encode(list),
        true,
    )?;
    Ok(())
}

pub(crate) fn load_members(store: &Store) -> Result<Option<MemberList>, ClusterError> {
    match store.raft_meta_get(CLUSTER_META_PARTITION, MEMBERS_KEY)? {
        Some(bytes) => {
            Ok(Some(wire::decode(&bytes).map_err(|e| {
                ClusterError::MemberListUnreadable(e.to_string())
            })?))
        }
        None => Ok(None),
    }
}

/// Seeds are HOST:PORT; a host name may resolve to several nodes (a StatefulSet's headless
/// service). Unresolvable seeds are skipped with a warning (they may come up later; the
/// gossip layer retries those it has).
pub(crate) async fn resolve_seeds(seeds: &[String]) -> Vec<SocketAddr> {
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
