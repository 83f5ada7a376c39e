//! Nodes joining and leaving a running cluster.
//!
//! The member list is the membership of one Raft group (`META_GROUP`) that every member
//! replicates, as a voter (up to five) or a learner. Joining adds a learner to it, and
//! decommissioning removes a node from it. Each change is a consensus decision with a log
//! index, which is the list's epoch.
//!
//! Every node keeps its replicas in step with the list (`keep_in_step`, every 500 ms):
//! - it starts an empty replica of each partition the ring now places on it;
//! - it drops a replica once the partition's leader confirms the node left the group.
//!
//! The node that leads the member-list group coordinates the moves. It asks each partition's
//! leader to make the group's replicas those of the ring (`KIND_RECONFIGURE`), a few
//! partitions at a time. The leader adds each new replica as a learner and waits for it to
//! catch up, then replaces the voters in one joint-consensus change. A partition never has
//! fewer than its replicas while it moves.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use serde::{Deserialize, Serialize};
use warbler_actors::{Leader, Router};
use warbler_cluster::raft_store::TypeConfig;
use warbler_cluster::NodeState;
use warbler_storage::PartitionId;

use crate::cluster::{raft_id, ClusterNode, MemberList, META_GROUP};

/// Peer RPC kind: "add this node to the member list" (answered by the list's leader).
pub const KIND_JOIN: u8 = 21;
/// Peer RPC kind: "make this partition's replicas these" (answered by its leader).
pub const KIND_RECONFIGURE: u8 = 22;
/// Peer RPC kind: "is this node still in this partition's group?" (answered by its leader).
pub const KIND_MEMBER_OF: u8 = 23;
/// Peer RPC kind: "remove this node from the member list" (answered by the list's leader).
pub const KIND_DECOMMISSION: u8 = 24;

pub fn is_elastic_kind(kind: u8) -> bool {
    (KIND_JOIN..=KIND_DECOMMISSION).contains(&kind)
}

/// How often a node brings its replicas in step with the member list.
const STEP_PERIOD: Duration = Duration::from_millis(500);
/// Partitions the coordinator moves at once.
const MOVES_AT_ONCE: usize = 4;
/// How long a new replica may take to catch up before its move is tried again.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);
/// How long a change of a group's voters may take.
const CHANGE_WAIT: Duration = Duration::from_secs(30);
/// The `partition` field of a request forwarded to the member list's leader (never
/// forwarded twice).
const FORWARDED: u16 = 1;

/// Voters the member-list group keeps (the others are learners): enough that it survives
/// as many failures as the partitions do.
pub fn meta_voters(members: usize) -> usize {
    match members {
        0..=2 => members.max(1),
        3 | 4 => 3,
        _ => 5,
    }
}

/// A partition leader's answer to `KIND_RECONFIGURE`.
#[derive(Serialize, Deserialize)]
enum Moved {
    /// The group has exactly the wanted replicas.
    Settled,
    /// The leader is moving it.
    Moving,
    /// Asked a replica that does not lead: the leader it knows.
    LedBy(String),
}

#[derive(Serialize, Deserialize, Clone)]
struct Reconfigure {
    replicas: Vec<String>,
    epoch: u64,
}

/// The coordinator's progress through one epoch of the member list.
#[derive(Default)]
struct Coordinator {
    epoch: u64,
    settled: HashSet<PartitionId>,
    moving: HashSet<PartitionId>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("cluster requests serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(body).map_err(|e| format!("cannot decode the cluster request: {e}"))
}

fn membership_of(raft: &Raft<TypeConfig>) -> (BTreeSet<u64>, BTreeSet<u64>, bool) {
    let m = raft.metrics();
    let m = m.borrow();
    let membership = m.membership_config.membership();
    let voters = membership.voter_ids().collect();
    let nodes = membership.nodes().map(|(id, _)| *id).collect();
    // Settled: one configuration (not joint), and applied, hence committed.
    let settled = membership.get_joint_config().len() == 1
        && m.membership_config.log_id().as_ref() <= m.last_applied.as_ref();
    (voters, nodes, settled)
}

fn is_leading(raft: &Raft<TypeConfig>) -> bool {
    raft.metrics().borrow().state == ServerState::Leader
}

impl ClusterNode {
    pub(crate) async fn handle_elastic(
        self: Arc<Self>,
        partition: u16,
        kind: u8,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        match kind {
            KIND_JOIN => {
                let name: String = decode(&body)?;
                Ok(encode(&self.join(name, partition == FORWARDED).await?))
            }
            KIND_DECOMMISSION => {
                let name: String = decode(&body)?;
                Ok(encode(
                    &self.decommission(name, partition == FORWARDED).await?,
                ))
            }
            KIND_RECONFIGURE => Ok(encode(&self.reconfigure(partition, decode(&body)?)?)),
            KIND_MEMBER_OF => {
                let name: String = decode(&body)?;
                Ok(encode(&self.member_of(partition, &name)?))
            }
            other => Err(format!("unknown cluster RPC kind {other}")),
        }
    }

    fn meta(&self) -> Result<&Raft<TypeConfig>, String> {
        match self.formed.get() {
            Some(f) if !self.left.load(Ordering::Relaxed) => Ok(&f.meta),
            Some(_) => Err("this node was decommissioned; ask another node".into()),
            None => Err("this node has not joined a formed cluster yet".into()),
        }
    }

    /// `None` on the member list's leader; otherwise the leader's answer to the same request.
    async fn at_list_leader(
        &self,
        kind: u8,
        name: &str,
        forwarded: bool,
    ) -> Result<Option<MemberList>, String> {
        let meta = self.meta()?;
        if is_leading(meta) {
            return Ok(None);
        }
        let no_leader = "the cluster's member list has no leader right now (an election is running, or most of its voters are down); retry in a few seconds";
        if forwarded {
            return Err(no_leader.into());
        }
        let leader = meta.metrics().borrow().current_leader;
        let Some(addr) = leader.and_then(|id| (self.formed.get()?.resolver)(id)) else {
            return Err(no_leader.into());
        };
        let bytes = self
            .transport
            .call(
                addr,
                FORWARDED,
                kind,
                encode(&name.to_string()),
                CHANGE_WAIT,
            )
            .await
            .map_err(|e| format!("cannot reach the member list's leader at {addr}: {e}"))?;
        decode::<MemberList>(&bytes).map(Some)
    }

    /// Asks a formed member at `addr` to add this node to the member list.
    pub(crate) async fn ask_to_join(
        &self,
        addr: std::net::SocketAddr,
    ) -> Result<MemberList, String> {
        let bytes = self
            .transport
            .call(addr, 0, KIND_JOIN, encode(&self.me), CHANGE_WAIT)
            .await
            .map_err(|e| e.to_string())?;
        decode(&bytes)
    }

    /// Adds `name` to the member list (as a learner of the member-list group).
    async fn join(&self, name: String, forwarded: bool) -> Result<MemberList, String> {
        if let Some(list) = self.at_list_leader(KIND_JOIN, &name, forwarded).await? {
            return Ok(list);
        }
        let meta = self.meta()?;
        let id = raft_id(&name);
        let (_, nodes, _) = membership_of(meta);
        if !nodes.contains(&id) {
            self.names.write().unwrap().insert(id, name.clone());
            meta.add_learner(id, BasicNode::new(name.clone()), false)
                .await
                .map_err(|e| format!("cannot add {name} to the member list: {e}"))?;
            tracing::info!(node = %name, "node joined the cluster; partitions move to it in the background");
        }
        let mut list = self
            .list_from_meta()
            .ok_or("this node holds no member list yet")?;
        if !list.names.contains(&name) {
            list.names.push(name);
            list.names.sort();
        }
        Ok(list)
    }

    /// Removes `name` from the member list. Its partitions then move to the other nodes;
    /// it keeps serving them until they have.
    pub(crate) async fn decommission(
        &self,
        name: String,
        forwarded: bool,
    ) -> Result<MemberList, String> {
        if let Some(list) = self
            .at_list_leader(KIND_DECOMMISSION, &name, forwarded)
            .await?
        {
            return Ok(list);
        }
        let meta = self.meta()?;
        let id = raft_id(&name);
        let (voters, nodes, settled) = membership_of(meta);
        let list = self
            .list_from_meta()
            .ok_or("this node holds no member list yet")?;
        if !nodes.contains(&id) {
            return Err(format!(
                "{name} is not a member of the cluster (members: {}); check the name with `warbler cluster status`",
                list.names.join(", ")
            ));
        }
        if !settled {
            return Err(
                "another change of the member list is in progress; retry in a few seconds".into(),
            );
        }
        let remaining = nodes.len() - 1;
        if remaining < list.replication_factor {
            return Err(format!(
                "decommissioning {name} would leave {remaining} nodes, fewer than the replication factor {}; add a node first",
                list.replication_factor
            ));
        }
        let change = if voters.contains(&id) {
            let mut keep: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != id).collect();
            for l in self.live_learners(&voters, &nodes) {
                if keep.len() >= meta_voters(remaining) {
                    break;
                }
                keep.insert(l);
            }
            ChangeMembers::ReplaceAllVoters(keep)
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        tokio::time::timeout(CHANGE_WAIT, meta.change_membership(change, false))
            .await
            .map_err(|_| format!("removing {name} from the member list did not finish within {CHANGE_WAIT:?}; check `warbler cluster status` and retry"))?
            .map_err(|e| format!("cannot remove {name} from the member list: {e}"))?;
        tracing::info!(node = %name, "node decommissioned; its partitions move to the other nodes");
        let mut list = self
            .list_from_meta()
            .ok_or("this node holds no member list")?;
        list.names.retain(|n| *n != name);
        Ok(list)
    }

    /// On the leader of `partition`: `Settled` when its group already has exactly the
    /// wanted replicas; otherwise starts moving it (if not already) and answers `Moving`.
    fn reconfigure(
        self: &Arc<Self>,
        partition: PartitionId,
        req: Reconfigure,
    ) -> Result<Moved, String> {
        let epoch = self.placement.read().unwrap().epoch;
        if req.epoch < epoch {
            return Err(format!(
                "the request is for member list {} and this node has {epoch}",
                req.epoch
            ));
        }
        let replica = self
            .placement
            .read()
            .unwrap()
            .rafts
            .get(&partition)
            .cloned();
        let raft = match replica {
            Some(r) if is_leading(&r) => r,
            Some(r) => {
                let leader = r.metrics().borrow().current_leader;
                return match leader.and_then(|id| self.names.read().unwrap().get(&id).cloned()) {
                    Some(name) => Ok(Moved::LedBy(name)),
                    None => Err(format!("partition {partition} has no leader right now")),
                };
            }
            None => {
                return Err(format!(
                    "this node holds no replica of partition {partition}"
                ))
            }
        };
        let want: BTreeSet<u64> = req.replicas.iter().map(|n| raft_id(n)).collect();
        let (voters, nodes, settled) = membership_of(&raft);
        if voters == want && nodes == want {
            // Not settled yet: the leader has not committed its membership in this term.
            return Ok(if settled {
                Moved::Settled
            } else {
                Moved::Moving
            });
        }
        if !self.moving.lock().unwrap().insert(partition) {
            return Ok(Moved::Moving);
        }
        {
            let mut names = self.names.write().unwrap();
            for n in &req.replicas {
                names.insert(raft_id(n), n.clone());
            }
        }
        let node = self.clone();
        tokio::spawn(async move {
            node.move_partition(partition, raft, req.replicas).await;
            node.moving.lock().unwrap().remove(&partition);
        });
        Ok(Moved::Moving)
    }

    async fn move_partition(
        &self,
        partition: PartitionId,
        raft: Raft<TypeConfig>,
        to: Vec<String>,
    ) {
        let (voters, nodes, _) = membership_of(&raft);
        let names = self.names.read().unwrap().clone();
        let from: Vec<&String> = voters.iter().filter_map(|v| names.get(v)).collect();
        tracing::info!(partition, ?from, ?to, "moving the partition's replicas");
        let metas = self.metas.borrow().clone();
        for n in &to {
            let id = raft_id(n);
            if nodes.contains(&id) {
                continue;
            }
            let addr = metas
                .get(n)
                .map(|m| m.cluster.to_string())
                .unwrap_or_default();
            match tokio::time::timeout(
                CATCH_UP_WAIT,
                raft.add_learner(id, BasicNode::new(addr), true),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(partition, node = %n, error = %e, "cannot add the new replica; retrying later");
                    return;
                }
                Err(_) => {
                    tracing::warn!(partition, node = %n, "the new replica did not catch up within {CATCH_UP_WAIT:?}; retrying later");
                    return;
                }
            }
        }
        let want: BTreeSet<u64> = to.iter().map(|n| raft_id(n)).collect();
        let changes = [
            ChangeMembers::ReplaceAllVoters(want.clone()),
            // Learners left behind by an earlier move that did not finish.
            ChangeMembers::RemoveNodes(BTreeSet::new()),
        ];
        for change in changes {
            let change = match change {
                ChangeMembers::RemoveNodes(_) => {
                    let (_, nodes, _) = membership_of(&raft);
                    let extra: BTreeSet<u64> = nodes.difference(&want).copied().collect();
                    if extra.is_empty() {
                        continue;
                    }
                    ChangeMembers::RemoveNodes(extra)
                }
                c => c,
            };
            match tokio::time::timeout(CHANGE_WAIT, raft.change_membership(change, false)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(partition, error = %e, "cannot change the partition's replicas; retrying later");
                    return;
                }
                Err(_) => {
                    tracing::warn!(partition, "changing the partition's replicas did not finish within {CHANGE_WAIT:?}; retrying later");
                    return;
                }
            }
        }
        tracing::info!(partition, ?to, "partition moved");
    }

    /// On the leader of `partition`: whether `name` is in its group (a settled membership
    /// only, so a node that hears `false` may drop its replica).
    fn member_of(&self, partition: PartitionId, name: &str) -> Result<bool, String> {
        let raft = self
            .local_raft(partition)
            .filter(is_leading)
            .ok_or_else(|| format!("this node does not lead partition {partition}"))?;
        let (_, nodes, settled) = membership_of(&raft);
        if !settled {
            return Err(format!("partition {partition} is changing its replicas"));
        }
        Ok(nodes.contains(&raft_id(name)))
    }

    /// Every 500 ms: follow the member list, start the replicas placed here, drop the ones
    /// moved away, and, on the member list's leader, coordinate the moves.
    pub(crate) fn keep_in_step(self: &Arc<Self>) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STEP_PERIOD);
            let mut coordinator = Coordinator::default();
            for round in 0u64.. {
                tick.tick().await;
                let left = node.left.load(Ordering::Relaxed);
                if !left {
                    node.follow_member_list();
                    node.start_placed().await;
                }
                if round % 4 == 0 {
                    node.drop_moved(left).await;
                    if !left {
                        node.check_left().await;
                    }
                }
                match node.formed.get() {
                    Some(f) if !left && is_leading(&f.meta) => {
                        node.coordinate(&mut coordinator).await
                    }
                    _ => coordinator = Coordinator::default(),
                }
            }
        });
    }

    fn follow_member_list(&self) {
        let Some(list) = self.list_from_meta() else {
            return;
        };
        let changed = match &*self.members.read().unwrap() {
            Some(cur) => cur.epoch != list.epoch || cur.names != list.names,
            None => true,
        };
        if changed {
            tracing::info!(members = ?list.names, epoch = list.epoch, "member list changed");
            self.apply_members(list);
        }
    }

    async fn start_placed(&self) {
        let missing: Vec<PartitionId> = {
            let pl = self.placement.read().unwrap();
            (0..self.partitions)
                .filter(|p| {
                    pl.replicas[*p as usize].contains(&self.me) && !pl.rafts.contains_key(p)
                })
                .collect()
        };
        for p in missing {
            tracing::info!(
                partition = p,
                "partition placed here; starting an empty replica for its leader to fill"
            );
            if let Err(e) = self.start_replica(p).await {
                tracing::warn!(partition = p, error = %e, "cannot start the replica");
            }
        }
    }

    /// Drops the replicas not placed here once their partition's leader says this node left
    /// the group (all of them, on a decommissioned node).
    async fn drop_moved(&self, left: bool) {
        let candidates: Vec<(PartitionId, Raft<TypeConfig>)> = {
            let pl = self.placement.read().unwrap();
            pl.rafts
                .iter()
                .filter(|(p, _)| left || !pl.replicas[**p as usize].contains(&self.me))
                .map(|(p, r)| (*p, r.clone()))
                .collect()
        };
        for (p, raft) in candidates {
            let (_, nodes, _) = membership_of(&raft);
            if !nodes.is_empty() && !self.left_group(p, &raft).await {
                continue;
            }
            tracing::info!(
                partition = p,
                "the partition's replica moved away; dropping it here"
            );
            let _ = raft.shutdown().await;
            self.raft_service.remove(p);
            self.raft_log.remove(p);
            self.placement.write().unwrap().rafts.remove(&p);
            if let Some(f) = self.formed.get() {
                if let Err(e) = f.store.drop_partition(p) {
                    tracing::warn!(partition = p, error = %e, "cannot delete the moved replica's data");
                }
            }
        }
    }

    /// Whether `partition`'s leader says this node is no longer in its group.
    async fn left_group(&self, partition: PartitionId, raft: &Raft<TypeConfig>) -> bool {
        if is_leading(raft) {
            return false; // the leader moves itself out; it steps down when that commits
        }
        let f = self.formed.get().expect("formed");
        // The leader this replica knows, then every node of the group as it last heard of
        // it (a leader that removed itself names itself until the others elect one), then
        // the ring's placement.
        let leader = raft.metrics().borrow().current_leader;
        let (_, group, _) = membership_of(raft);
        let placed = self.placement.read().unwrap().replicas[partition as usize].clone();
        let mut ids: Vec<u64> = leader.into_iter().chain(group).collect();
        ids.extend(placed.iter().map(|n| raft_id(n)));
        let mut seen = HashSet::new();
        ids.retain(|id| *id != self.my_id && seen.insert(*id));
        let addrs = ids.into_iter().filter_map(|id| (f.resolver)(id));
        for addr in addrs {
            let asked = self
                .transport
                .call(
                    addr,
                    partition,
                    KIND_MEMBER_OF,
                    encode(&self.me),
                    Duration::from_secs(2),
                )
                .await;
            if let Ok(bytes) = asked {
                if let Ok(member) = decode::<bool>(&bytes) {
                    return !member;
                }
            }
        }
        false
    }

    /// A decommissioned node hears of it from the others (it no longer gets the member list).
    async fn check_left(&self) {
        let Some(mine) = self.members.read().unwrap().clone() else {
            return;
        };
        if !mine.names.contains(&self.me) {
            // It led the member list when it was removed, so its own copy says so.
            return self.leave(&mine).await;
        }
        let metas = self.metas.borrow().clone();
        let others = mine
            .names
            .iter()
            .filter(|n| **n != self.me)
            .filter_map(|n| metas.get(n).map(|m| m.cluster));
        for addr in others {
            let Ok(bytes) = self
                .transport
                .call(
                    addr,
                    0,
                    crate::cluster::KIND_MEMBERS,
                    Vec::new(),
                    Duration::from_secs(2),
                )
                .await
            else {
                continue;
            };
            let Ok(theirs) = rmp_serde::from_slice::<MemberList>(&bytes) else {
                continue;
            };
            if theirs.epoch > mine.epoch && !theirs.names.contains(&self.me) {
                self.leave(&theirs).await;
            }
            return;
        }
    }

    async fn leave(&self, list: &MemberList) {
        tracing::warn!(members = ?list.names, "this node was decommissioned: it hands its partitions over and then serves nothing; stop it (to join again, start it on an empty data directory)");
        self.left.store(true, Ordering::Relaxed);
        self.set_state(NodeState::Draining, true).await;
        if let Some(f) = self.formed.get() {
            let _ = f.meta.shutdown().await;
            self.raft_service.remove(META_GROUP);
        }
    }

    /// On the member list's leader: keeps enough voters in the member-list group, and asks
    /// each partition's leader to move it where the ring places it.
    async fn coordinate(self: &Arc<Self>, c: &mut Coordinator) {
        self.top_up_voters().await;
        let (epoch, replicas) = {
            let pl = self.placement.read().unwrap();
            (pl.epoch, pl.replicas.clone())
        };
        if c.epoch != epoch {
            *c = Coordinator {
                epoch,
                ..Default::default()
            };
        }
        for p in 0..self.partitions {
            if c.settled.contains(&p) || (!c.moving.contains(&p) && c.moving.len() >= MOVES_AT_ONCE)
            {
                continue;
            }
            let req = Reconfigure {
                replicas: replicas[p as usize].clone(),
                epoch,
            };
            let mut answer = self.ask_to_move(p, self.leader(p), &req).await;
            if let Ok(Moved::LedBy(name)) = &answer {
                // Asked a follower (this node only guessed the leader): ask the one it named.
                self.redirected(p, Some(name));
                answer = self.ask_to_move(p, self.leader(p), &req).await;
            }
            match answer {
                Ok(Moved::Settled) => {
                    c.moving.remove(&p);
                    c.settled.insert(p);
                }
                Ok(_) => {
                    c.moving.insert(p);
                }
                Err(e) => {
                    tracing::debug!(partition = p, error = %e, "cannot ask the partition's leader to move it yet")
                }
            }
        }
    }

    async fn ask_to_move(
        self: &Arc<Self>,
        partition: PartitionId,
        leader: Leader,
        req: &Reconfigure,
    ) -> Result<Moved, String> {
        match leader {
            Leader::Local => self.reconfigure(partition, req.clone()),
            Leader::Remote { addr, .. } => {
                let asked = self
                    .transport
                    .call(
                        addr,
                        partition,
                        KIND_RECONFIGURE,
                        encode(req),
                        Duration::from_secs(2),
                    )
                    .await;
                if asked.is_err() {
                    self.redirected(partition, None);
                }
                decode(&asked.map_err(|e| e.to_string())?)
            }
            Leader::Unknown(why) => Err(why),
        }
    }

    /// The learners of the member-list group that are alive (this node counts), by name.
    fn live_learners(&self, voters: &BTreeSet<u64>, nodes: &BTreeSet<u64>) -> Vec<u64> {
        let live: HashSet<String> = self
            .membership
            .members()
            .into_iter()
            .map(|m| m.name)
            .chain([self.me.clone()])
            .collect();
        let names = self.names.read().unwrap().clone();
        let mut learners: Vec<(String, u64)> = nodes
            .iter()
            .filter(|n| !voters.contains(n))
            .filter_map(|n| Some((names.get(n)?.clone(), *n)))
            .filter(|(n, _)| live.contains(n))
            .collect();
        learners.sort();
        learners.into_iter().map(|(_, id)| id).collect()
    }

    /// Promotes live learners while the member-list group has fewer voters than it should.
    async fn top_up_voters(&self) {
        let Some(f) = self.formed.get() else { return };
        let (voters, nodes, settled) = membership_of(&f.meta);
        let want = meta_voters(nodes.len());
        if !settled || voters.len() >= want {
            return;
        }
        let learners = self.live_learners(&voters, &nodes);
        if learners.is_empty() {
            return;
        }
        let mut keep = voters.clone();
        for l in learners.into_iter().take(want - voters.len()) {
            keep.insert(l);
        }
        tracing::info!(
            voters = keep.len(),
            "adding voters to the member list's group"
        );
        match tokio::time::timeout(
            CHANGE_WAIT,
            f.meta
                .change_membership(ChangeMembers::ReplaceAllVoters(keep), true),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot add voters to the member list's group")
            }
            Err(_) => tracing::warn!("adding voters to the member list's group timed out"),
        }
    }
}

/// What `POST /v1/cluster/decommission` answers.
pub fn decommissioned_json(name: &str, list: &MemberList) -> serde_json::Value {
    serde_json::json!({
        "decommissioned": name,
        "members": list.names,
        "member_list_epoch": list.epoch,
        "next": format!("partitions move off {name} in the background; `warbler cluster status --http <{name}'s HTTP address>` shows replicas_held 0 when it can be stopped"),
    })
}
