//! Nodes joining and leaving a running cluster (see [`crate::control::members`] and
//! [`crate::control::rebalance`] for the rules).
//!
//! Every node keeps its replicas in step with the list (`keep_in_step`, every 500 ms): it
//! starts an empty replica of each partition the ring now places on it, and drops a replica
//! once the partition's leader confirms the node left the group. The node that leads the
//! member-list group coordinates the moves.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers, Raft};
use warbler_storage::PartitionId;

use super::{group_view, ClusterNode, META_GROUP};
use crate::control::dead::DeadWatch;
use crate::control::members::{self, Change, Standing};
use crate::control::rebalance::{self, OnReconfigure};
use crate::control::{placement, raft_id, Coordinator, MemberList, Moved, Reconfigure};
use crate::error::{ClusterError, ControlError, RpcCode, RpcError};
use crate::raft_store::TypeConfig;
use crate::router::{Leader, Router};
use crate::wire::{self, ListChange, NodeReq, PeerKind};
use crate::NodeState;

/// How often a node brings its replicas in step with the member list.
const STEP_PERIOD: Duration = Duration::from_millis(500);
/// How long a new replica may take to catch up before its move is tried again.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);
/// How long a change of a group's voters may take.
const CHANGE_WAIT: Duration = Duration::from_secs(30);
/// How long a node waits for a partition leader's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Leaders are balanced every this many steps (3 s), once no partition moves.
const BALANCE_ROUNDS: u64 = 6;

fn change_members(c: Change) -> ChangeMembers<u64, BasicNode> {
    match c {
        Change::ReplaceAllVoters(v) => ChangeMembers::ReplaceAllVoters(v),
        Change::RemoveNodes(n) => ChangeMembers::RemoveNodes(n),
    }
}

fn not_ready(message: impl Into<String>) -> RpcError {
    RpcError::new(RpcCode::NotReady, message)
}

impl ClusterNode {
    fn meta(&self) -> Result<&Raft<TypeConfig>, RpcError> {
        match self.formed.get() {
            Some(f) if !self.has_left() => Ok(&f.meta),
            Some(_) => Err(RpcError::new(
                RpcCode::WrongNode,
                "this node was decommissioned; ask another node",
            )),
            None => Err(not_ready("this node has not joined a formed cluster yet")),
        }
    }

    fn meta_view(&self) -> Result<crate::control::GroupView, RpcError> {
        Ok(group_view(self.meta()?, self.my_id))
    }

    /// `None` on the member list's leader; otherwise the leader's answer to the same request.
    async fn at_list_leader(
        &self,
        kind: PeerKind,
        name: &str,
        forwarded: bool,
    ) -> Result<Option<MemberList>, RpcError> {
        let view = self.meta_view()?;
        if view.leading {
            return Ok(None);
        }
        let no_leader = || {
            not_ready("the cluster's member list has no leader right now (an election is running, or most of its voters are down); retry in a few seconds")
        };
        if forwarded {
            return Err(no_leader());
        }
        let resolve = |id| (self.formed.get()?.resolver)(id);
        let Some(addr) = view.leader.and_then(resolve) else {
            return Err(no_leader());
        };
        let (scope, body) = ListChange {
            node: name.to_string(),
            forwarded: true,
        }
        .frame();
        let bytes = self
            .transport
            .call(addr, scope, kind, body, CHANGE_WAIT)
            .await
            .map_err(|e| match e {
                crate::PeerError::Remote { error, .. } => error,
                e => RpcError::new(
                    RpcCode::Failed,
                    format!("cannot reach the member list's leader at {addr}: {e}"),
                ),
            })?;
        wire::decode(&bytes)
            .map(Some)
            .map_err(|e| RpcError::bad_request("member list's leader's answer", e))
    }

    /// Asks a formed member at `addr` to add this node to the member list.
    pub(crate) async fn ask_to_join(&self, addr: SocketAddr) -> Result<MemberList, ClusterError> {
        let (scope, body) = ListChange {
            node: self.me.clone(),
            forwarded: false,
        }
        .frame();
        let bytes = self
            .transport
            .call(addr, scope, PeerKind::Join, body, CHANGE_WAIT)
            .await?;
        wire::decode(&bytes).map_err(|e| ClusterError::MemberListUnreadable(e.to_string()))
    }

    /// Adds `name` to the member list (as a learner of the member-list group).
    pub(crate) async fn join(&self, name: String, forwarded: bool) -> Result<MemberList, RpcError> {
        if let Some(list) = self
            .at_list_leader(PeerKind::Join, &name, forwarded)
            .await?
        {
            return Ok(list);
        }
        let meta = self.meta()?;
        let id = raft_id(&name);
        if !group_view(meta, self.my_id).nodes.contains(&id) {
            // Its zone comes from its gossip metadata: wait until this node has it.
            let zone = match self.metas.borrow().get(&name) {
                Some(m) => m.zone.clone(),
                None => {
                    return Err(not_ready(format!(
                        "{name} is not in this node's gossip view yet; the join is retried"
                    )))
                }
            };
            self.names.write().unwrap().insert(id, name.clone());
            self.routing_changed();
            let node = members::member_node(&name, zone.as_deref());
            meta.add_learner(id, BasicNode::new(node), false)
                .await
                .map_err(|e| {
                    RpcError::new(
                        RpcCode::Failed,
                        format!("cannot add {name} to the member list: {e}"),
                    )
                })?;
            tracing::info!(node = %name, "node joined the cluster; partitions move to it in the background");
        }
        let list = self
            .list_from_meta()
            .ok_or_else(|| not_ready("this node holds no member list yet"))?;
        Ok(members::with_joined(list, &name))
    }

    /// Removes `name` from the member list. Its partitions then move to the other nodes;
    /// it keeps serving them until they have.
    pub async fn decommission(
        &self,
        name: String,
        forwarded: bool,
    ) -> Result<MemberList, RpcError> {
        let kind = PeerKind::Decommission;
        if let Some(list) = self.at_list_leader(kind, &name, forwarded).await? {
            return Ok(list);
        }
        let meta = self.meta()?;
        let view = group_view(meta, self.my_id);
        let list = self
            .list_from_meta()
            .ok_or_else(|| not_ready("this node holds no member list yet"))?;
        let learners = self.live_learners(&view.voters, &view.nodes);
        let change = members::decommission(&name, &view, &list, &learners)?;
        tokio::time::timeout(CHANGE_WAIT, meta.change_membership(change_members(change), false))
            .await
            .map_err(|_| RpcError::new(RpcCode::Failed, format!("removing {name} from the member list did not finish within {CHANGE_WAIT:?}; check `warbler cluster status` and retry")))?
            .map_err(|e| RpcError::new(RpcCode::Failed, format!("cannot remove {name} from the member list: {e}")))?;
        tracing::info!(node = %name, "node decommissioned; its partitions move to the other nodes");
        let list = self
            .list_from_meta()
            .ok_or_else(|| not_ready("this node holds no member list"))?;
        Ok(members::without(list, &name))
    }

    /// The member list's leader, which coordinates the moves, as this node knows it. None
    /// on a decommissioned node: it stopped its copy of the member-list group, so the
    /// leader it last saw there may be long gone (itself, when it was the leader that
    /// committed its own removal).
    pub(crate) fn coordinator(&self) -> Option<String> {
        self.formed
            .get()
            .filter(|_| !self.has_left())
            .and_then(|f| group_view(&f.meta, self.my_id).leader)
            .and_then(|id| self.name_of(id))
    }

    /// On the leader of `partition`: `Settled` when its group already has exactly the
    /// wanted replicas; otherwise starts moving it (if not already) and answers `Moving`.
    pub(crate) fn reconfigure(
        self: &Arc<Self>,
        from: &str,
        partition: PartitionId,
        req: Reconfigure,
    ) -> Result<Moved, RpcError> {
        let (epoch, placed) = {
            let pl = self.placement.read().unwrap();
            let placed = pl
                .replicas
                .get(partition as usize)
                .cloned()
                .unwrap_or_default();
            (pl.epoch, placed)
        };
        // A decommissioned node knows no coordinator (see `coordinator`): it takes the
        // request from any member of the list it kept. Its partitions must still move away.
        let coordinator = self.coordinator();
        let members = self.member_names();
        rebalance::may_reconfigure(from, req.epoch, epoch, coordinator.as_deref(), &members)?;
        let Some(raft) = self.local_raft(partition) else {
            return Err(ControlError::NoReplica { partition }.into());
        };
        let view = group_view(&raft, self.my_id);
        let leader_name = view.leader.and_then(|id| self.name_of(id));
        let moving = self.moving.lock().unwrap().contains(&partition);
        match rebalance::on_reconfigure(
            partition,
            &req,
            (epoch, &placed),
            &view,
            leader_name,
            moving,
        )? {
            OnReconfigure::Answer(m) => Ok(m),
            OnReconfigure::StartMove => {
                if !self.moving.lock().unwrap().insert(partition) {
                    return Ok(Moved::Moving);
                }
                {
                    let mut names = self.names.write().unwrap();
                    for n in &req.replicas {
                        names.insert(raft_id(n), n.clone());
                    }
                }
                self.routing_changed();
                let node = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = node.move_partition(partition, &raft, &req.replicas).await {
                        tracing::warn!(partition, error = %e, "cannot move the partition yet; retrying later");
                    }
                    node.moving.lock().unwrap().remove(&partition);
                });
                Ok(Moved::Moving)
            }
        }
    }

    async fn move_partition(
        &self,
        partition: PartitionId,
        raft: &Raft<TypeConfig>,
        to: &[String],
    ) -> Result<(), ClusterError> {
        let view = group_view(raft, self.my_id);
        let from: Vec<String> = view
            .voters
            .iter()
            .filter_map(|v| self.name_of(*v))
            .collect();
        tracing::info!(partition, ?from, ?to, "moving the partition's replicas");
        let started = std::time::Instant::now();
        for n in rebalance::learners_to_add(&view, to) {
            let added = tokio::time::timeout(
                CATCH_UP_WAIT,
                raft.add_learner(raft_id(n), BasicNode::new(n.clone()), true),
            )
            .await
            .map_err(|_| {
                ClusterError::Raft(format!(
                    "the new replica on {n} did not catch up within {CATCH_UP_WAIT:?}"
                ))
            })?;
            added.map_err(|e| {
                ClusterError::Raft(format!("cannot add the new replica on {n}: {e}"))
            })?;
        }
        // At most two changes: the voters, then the leftover learners.
        for _ in 0..2 {
            let Some(change) = rebalance::next_change(&group_view(raft, self.my_id), to) else {
                break;
            };
            tokio::time::timeout(
                CHANGE_WAIT,
                raft.change_membership(change_members(change), false),
            )
            .await
            .map_err(|_| {
                ClusterError::Raft(format!(
                    "changing the partition's replicas did not finish within {CHANGE_WAIT:?}"
                ))
            })?
            .map_err(|e| {
                ClusterError::Raft(format!("cannot change the partition's replicas: {e}"))
            })?;
        }
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(partition, ?to, ms, "partition moved");
        Ok(())
    }

    /// On the leader of `partition`: whether `name` is in its group.
    pub(crate) fn member_of(&self, partition: PartitionId, name: &str) -> Result<bool, RpcError> {
        let view = self
            .local_raft(partition)
            .map(|r| group_view(&r, self.my_id))
            .unwrap_or_default();
        Ok(rebalance::member_of(partition, &view, name)?)
    }

    /// Every 500 ms: follow the member list, start the replicas placed here, drop the ones
    /// moved away, and, on the member list's leader, coordinate the moves.
    pub(crate) fn keep_in_step(self: &Arc<Self>) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut tick = crate::grid::interval(STEP_PERIOD);
            let mut coordinator = Coordinator::default();
            let mut dead = DeadWatch::default();
            for round in 0u64.. {
                tick.tick().await;
                node.share_disk_state().await;
                node.note_leaderships();
                node.check_stopped();
                let left = node.has_left();
                if !left {
                    node.follow_member_list();
                    node.start_placed().await;
                }
                if round % 4 == 0 {
                    node.drop_moved(left).await;
                    if left {
                        node.hand_over_again();
                    } else {
                        node.check_left().await;
                    }
                }
                match node.formed.get() {
                    Some(f) if !left && group_view(&f.meta, node.my_id).leading => {
                        node.replace_dead(&mut dead).await;
                        node.coordinate(&mut coordinator).await;
                        if round % BALANCE_ROUNDS == 0 && coordinator.done(node.partitions) {
                            node.spawn_balance();
                        }
                    }
                    _ => {
                        coordinator = Coordinator::default();
                        dead = DeadWatch::default();
                    }
                }
            }
        });
    }

    /// Starts a leader-balancing round unless one is running.
    fn spawn_balance(self: &Arc<Self>) {
        if self.balancing.swap(true, Ordering::SeqCst) {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            node.balance_leaders().await;
            node.balancing.store(false, Ordering::SeqCst);
        });
    }

    fn follow_member_list(&self) {
        let Some(list) = self.list_from_meta() else {
            return;
        };
        if list.supersedes(self.members.read().unwrap().as_ref()) {
            tracing::info!(members = ?list.names, epoch = list.epoch, "member list changed");
            self.apply_members(list);
        }
    }

    async fn start_placed(&self) {
        let missing = {
            let pl = self.placement.read().unwrap();
            placement::to_start(&pl.replicas, &placement::running(&pl.rafts), &self.me)
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
            placement::drop_candidates(&pl.replicas, &placement::running(&pl.rafts), &self.me, left)
                .into_iter()
                .filter_map(|p| Some((p, pl.rafts.get(&p)?.clone())))
                .collect()
        };
        for (p, raft) in candidates {
            let view = group_view(&raft, self.my_id);
            let answer = if view.added() && !view.leading {
                self.ask_member_of(p, &view).await
            } else {
                None
            };
            if !placement::may_drop(&view, answer) {
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
            self.routing_changed();
            if let Some(f) = self.formed.get() {
                if let Err(e) = f.store.drop_partition(p) {
                    tracing::warn!(partition = p, error = %e, "cannot delete the moved replica's data");
                }
            }
        }
    }

    /// Asks the group's nodes, in [`placement::ask_left_group`]'s order, whether this node
    /// is still in `partition`'s group; the first that answers decides.
    async fn ask_member_of(
        &self,
        partition: PartitionId,
        view: &crate::control::GroupView,
    ) -> Option<bool> {
        let f = self.formed.get()?;
        let placed = self.placed(partition);
        let ids = placement::ask_left_group(self.my_id, view, &placed);
        let body = wire::encode(&NodeReq(self.me.clone()));
        for addr in ids.into_iter().filter_map(|id| (f.resolver)(id)) {
            if let Some(member) = self.call_member_of(addr, partition, &body).await {
                return Some(member);
            }
        }
        None
    }

    /// Asks the node at `addr` whether `partition`'s group counts the node named in `body`
    /// (an encoded [`NodeReq`]); `None` when it gives no answer: unreachable, not the
    /// group's settled leader, or a reply that does not decode.
    pub(super) async fn call_member_of(
        &self,
        addr: SocketAddr,
        partition: PartitionId,
        body: &[u8],
    ) -> Option<bool> {
        let asked = self
            .transport
            .call(
                addr,
                partition,
                PeerKind::MemberOf,
                body.to_vec(),
                ASK_TIMEOUT,
            )
            .await;
        wire::decode::<bool>(&asked.ok()?).ok()
    }

    /// A decommissioned node hears of it from the others (it no longer gets the member list).
    async fn check_left(self: &Arc<Self>) {
        let Some(mine) = self.members.read().unwrap().clone() else {
            return;
        };
        match members::standing(&self.me, &mine, None) {
            Standing::Left(list) => return self.leave(&list, "its own copy").await,
            Standing::Member => return,
            Standing::AskOthers => {}
        }
        let others: Vec<SocketAddr> = {
            let metas = self.metas.borrow();
            mine.names
                .iter()
                .filter(|n| **n != self.me)
                .filter_map(|n| metas.get(n).map(|m| m.cluster))
                .collect()
        };
        for addr in others {
            let asked = self
                .transport
                .call(addr, 0, PeerKind::Members, Vec::new(), ASK_TIMEOUT)
                .await;
            let Ok(Ok(theirs)) = asked.map(|b| wire::decode::<MemberList>(&b)) else {
                continue;
            };
            if !self.of_this_cluster(&theirs, addr) {
                continue;
            }
            if let Standing::Left(list) = members::standing(&self.me, &mine, Some(&theirs)) {
                let from = format!(
                    "the list {addr} answered (this node's own: epoch {}, {:?})",
                    mine.epoch, mine.names
                );
                self.leave(&list, &from).await;
            }
            return;
        }
    }

    async fn leave(self: &Arc<Self>, list: &MemberList, from: &str) {
        tracing::warn!(members = ?list.names, epoch = list.epoch, from, "this node was decommissioned: it hands its partitions over and then serves nothing; stop it (started again, it wipes its data directory and joins as a new node)");
        self.left.store(true, Ordering::Relaxed);
        self.set_state(NodeState::Draining, true).await;
        if let Some(f) = self.formed.get() {
            let _ = f.meta.shutdown().await;
            self.raft_service.remove(META_GROUP);
        }
        // The partitions it leads move away under a leader that stays: each is handed to a
        // caught-up replica on a serving member, which then runs its move. One already
        // moving finishes here; one whose transfer is refused moves from here too, or is
        // handed over at a later try (see `hand_over_again`).
        let led = self.led_not_moving();
        if !led.is_empty() {
            tracing::info!(
                partitions = led.len(),
                "decommissioned: handing the partitions led here to members that stay"
            );
            self.transfer_all(&led, true);
        }
    }

    /// The partitions this node leads and is not moving itself.
    fn led_not_moving(&self) -> Vec<(PartitionId, Raft<TypeConfig>)> {
        let moving = self.moving.lock().unwrap().clone();
        let pl = self.placement.read().unwrap();
        pl.rafts
            .iter()
            .filter(|(p, r)| !moving.contains(p) && group_view(r, self.my_id).leading)
            .map(|(p, r)| (*p, r.clone()))
            .collect()
    }

    /// On a decommissioned node, every few steps: hands over again the partitions it still
    /// leads and is not moving. The transfer at [`Self::leave`] may have been refused (the
    /// leadership was too young, the target lagged), or the node may have won a leadership
    /// back since; either way the partition must still leave under a member's leadership,
    /// and waiting for the coordinator to move it from here is the slower path.
    fn hand_over_again(self: &Arc<Self>) {
        let mut led = self.led_not_moving();
        led.retain(|(p, _)| !self.handing.lock().unwrap().contains(p));
        if led.is_empty() {
            return;
        }
        let partitions: Vec<PartitionId> = led.iter().map(|(p, _)| *p).collect();
        tracing::warn!(
            ?partitions,
            "decommissioned, and still leading these partitions: handing them over again"
        );
        self.transfer_all(&led, true);
    }

    /// On the member list's leader: removes a member that has been down for
    /// `cluster.dead_node_timeout_ms` (its replicas are then rebuilt on the others).
    async fn replace_dead(&self, dead: &mut DeadWatch) {
        let Some(list) = self.members.read().unwrap().clone() else {
            return;
        };
        let live: HashSet<String> = self
            .membership
            .members()
            .into_iter()
            .map(|m| m.name)
            .collect();
        let now = std::time::Instant::now();
        let Some(name) = dead.observe(&list.names, &live, &self.me, now, self.dead_node_timeout)
        else {
            return;
        };
        let down = dead.down_for(&name, now).unwrap_or_default().as_secs();
        match self.decommission(name.clone(), false).await {
            Ok(_) => {
                metrics::counter!("warbler_dead_members_removed_total").increment(1);
                tracing::warn!(node = %name, down_secs = down, "member unreachable past cluster.dead_node_timeout_ms: removed from the member list; its replicas are rebuilt on the others (if it comes back it is told it was removed)");
            }
            Err(e) => {
                if dead.report_refusal(now) {
                    tracing::warn!(node = %name, down_secs = down, error = %e, "member unreachable past cluster.dead_node_timeout_ms cannot be replaced yet");
                }
            }
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
        c.begin_round(epoch);
        for p in 0..self.partitions {
            if !c.should_ask(p) {
                continue;
            }
            let req = Reconfigure {
                replicas: replicas[p as usize].clone(),
                epoch,
            };
            let mut answer = if c.ask_others(p) {
                self.ask_others_to_move(p, &req).await
            } else {
                self.ask_to_move(p, &req).await
            };
            if let Ok(Moved::LedBy(name)) = &answer {
                // Asked a follower (this node only guessed the leader): ask the one it named.
                self.redirected(p, Some(name));
                answer = self.ask_to_move(p, &req).await;
            }
            if let Err(e) = &answer {
                tracing::debug!(partition = p, error = %e, "cannot ask the partition's leader to move it yet");
            }
            c.on_answer(p, answer.as_ref().ok());
        }
    }

    async fn ask_to_move(
        self: &Arc<Self>,
        partition: PartitionId,
        req: &Reconfigure,
    ) -> Result<Moved, RpcError> {
        match self.leader(partition) {
            Leader::Local => self.reconfigure(&self.me, partition, req.clone()),
            Leader::Remote { addr, .. } => {
                let answer = self.call_reconfigure(addr, partition, req).await;
                if answer.is_err() {
                    self.redirected(partition, None);
                }
                answer
            }
            Leader::Unknown(why) => Err(not_ready(why)),
        }
    }

    async fn call_reconfigure(
        &self,
        addr: SocketAddr,
        partition: PartitionId,
        req: &Reconfigure,
    ) -> Result<Moved, RpcError> {
        let bytes = self
            .transport
            .call(
                addr,
                partition,
                PeerKind::Reconfigure,
                wire::encode(req),
                ASK_TIMEOUT,
            )
            .await
            .map_err(|e| RpcError::new(RpcCode::Failed, e.to_string()))?;
        wire::decode(&bytes).map_err(|e| RpcError::bad_request("reconfigure answer", e))
    }

    /// The leader this node knows of `partition` has not answered for rounds (see
    /// [`rebalance::others_to_ask`] for why it may never): asks the others in turn. The
    /// first answer decides; a follower's names the leader, which is then asked.
    async fn ask_others_to_move(
        &self,
        partition: PartitionId,
        req: &Reconfigure,
    ) -> Result<Moved, RpcError> {
        let group: Vec<String> = self
            .local_raft(partition)
            .map(|r| group_view(&r, self.my_id).voters)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| self.name_of(id))
            .collect();
        let ask = rebalance::others_to_ask(
            &self.me,
            &self.placed(partition),
            &group,
            &self.live_names(),
        );
        let addr_of = |name: &str| self.metas.borrow().get(name).map(|m| m.cluster);
        for name in ask {
            let Some(addr) = addr_of(&name) else { continue };
            match self.call_reconfigure(addr, partition, req).await {
                Ok(Moved::LedBy(leader)) if leader != self.me && leader != name => {
                    if let Some(addr) = addr_of(&leader) {
                        return self.call_reconfigure(addr, partition, req).await;
                    }
                }
                Ok(Moved::LedBy(_)) | Err(_) => {}
                Ok(answer) => return Ok(answer),
            }
        }
        Err(not_ready(format!(
            "no other node placed for partition {partition} or in its group answered"
        )))
    }

    /// The learners of the member-list group that are alive (this node counts), sorted by
    /// name.
    fn live_learners(&self, voters: &BTreeSet<u64>, nodes: &BTreeSet<u64>) -> Vec<u64> {
        let live = self.live_names();
        let mut learners: Vec<(String, u64)> = nodes
            .iter()
            .filter(|n| !voters.contains(n))
            .filter_map(|n| Some((self.name_of(*n)?, *n)))
            .filter(|(n, _)| live.contains(n))
            .collect();
        learners.sort();
        learners.into_iter().map(|(_, id)| id).collect()
    }

    /// Promotes live learners while the member-list group has fewer voters than it should.
    async fn top_up_voters(&self) {
        let Some(f) = self.formed.get() else { return };
        let view = group_view(&f.meta, self.my_id);
        let learners = self.live_learners(&view.voters, &view.nodes);
        let Some(keep) = members::top_up_voters(&view, &learners) else {
            return;
        };
        tracing::info!(
            voters = keep.len(),
            "adding voters to the member list's group"
        );
        let change = f
            .meta
            .change_membership(ChangeMembers::ReplaceAllVoters(keep), true);
        match tokio::time::timeout(CHANGE_WAIT, change).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot add voters to the member list's group")
            }
            Err(_) => tracing::warn!("adding voters to the member list's group timed out"),
        }
    }
}
