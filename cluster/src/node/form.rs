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
use crate::control::members::{list_from_group, raft_id};
use crate::control::start::{self, Found, Peer};
use crate::control::{placement, MemberList};
use crate::error::ClusterError;
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
            Some(l) => l,
            None => {
                let l = self.discover(config).await?;
                save_members(store, &l)?;
                l
            }
        };
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
            self.initialize(&meta, &list.names).await?;
        }
        let _ = self.formed.set(Formed {
            store: store.clone(),
            raft_config,
            resolver,
            meta,
            replication_factor: list.replication_factor,
        });
        // The member-list group's own record wins over the copy on disk (it may be newer).
        let current = self.list_from_meta().unwrap_or_else(|| list.clone());
        self.apply_members(current);
        for p in 0..self.partitions {
            let reps = self.placed(p);
            if !reps.iter().any(|n| *n == self.me) {
                continue;
            }
            let raft = self.start_replica(p).await?;
            if start::creates_group(&self.me, &list, reps.first().map(String::as_str)) {
                self.initialize(&raft, &reps).await?;
            }
        }
        self.set_state(NodeState::Serving, true).await;
        self.keep_in_step();
        self.watch_catch_up();
        self.quiesce_idle();
        Ok(())
    }

    /// Creates a group with `names` as its voters, unless it exists (a restart). Every group
    /// names its nodes by node name; addresses come from gossip.
    async fn initialize(
        &self,
        raft: &Raft<TypeConfig>,
        names: &[String],
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
            .map(|n| (raft_id(n), BasicNode::new(n.clone())))
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
        self.placement
            .write()
            .unwrap()
            .rafts
            .insert(partition, raft.clone());
        Ok(raft)
    }

    fn learn_names(&self, list: &MemberList) {
        let mut names = self.names.write().unwrap();
        for n in &list.names {
            names.insert(raft_id(n), n.clone());
        }
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
        let (names, index) = {
            let m = m.borrow();
            let names: Vec<String> = m
                .membership_config
                .membership()
                .nodes()
                .map(|(_, n)| n.addr.clone())
                .collect();
            (
                names,
                m.membership_config.log_id().as_ref().map(|l| l.index),
            )
        };
        let addrs = self.cluster_addrs(&names);
        list_from_group(names, f.replication_factor, addrs, index)
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
            match start::form_new(&self.me, self.cluster_addr(), &peers, expect, rf) {
                Ok(list) => return Ok(list),
                Err(w) if last_log.elapsed() > Duration::from_secs(5) => {
                    tracing::info!(have = w.have.len(), expect, members = ?w.have, "waiting for bootstrap_expect members before forming the cluster");
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
        install_snapshot_timeout: 10_000,
        max_payload_entries: crate::raft_log::max_payload_entries(config.limits.max_body_bytes),
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
