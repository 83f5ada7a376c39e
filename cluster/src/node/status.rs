//! What a node tells about itself: `/v1/cluster`, readiness, and the watchers that feed
//! them (leaders' applied indexes, leadership changes).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use warbler_client::api::{ClusterStatus, MemberState, MemberStatus, PartitionStatus};
use warbler_storage::PartitionId;

use super::{group_view, ClusterNode};
use crate::control::ready::{self, NotReady, ReadyInput};
use crate::control::{raft_id, GroupView};
use crate::router::{Leader, Router};
use crate::wire::{self, Applied, AppliedReq, PeerKind};
use crate::NodeState;

/// How often a follower asks its leaders how far they have applied.
const APPLIED_PERIOD: Duration = Duration::from_secs(1);
/// How long after start a replica still catching up keeps the node unready. Past it the
/// node is ready with the lag (`warbler_replication_lag_entries` shows it): a replica that
/// cannot catch up under load must not hold a rolling update, or the client Service, forever.
pub const READY_CATCH_UP_BOUND: Duration = Duration::from_secs(300);
/// The leader watch is woken at once by the changes it is told of, and also looks this
/// often, on the shared grid ([`crate::grid`]): a bound on how long a change it was not
/// told of could go unseen.
const LEADER_WATCH_SWEEP: Duration = Duration::from_secs(1);

/// A group's state as the leader watch follows it.
type ServerMetricsRx =
    tokio::sync::watch::Receiver<openraft::metrics::RaftServerMetrics<u64, openraft::BasicNode>>;

/// A partition's leader changed as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderChange {
    pub partition: PartitionId,
    /// This node led it until now (its mailboxes must stop: no stale writer survives).
    pub was_local: bool,
    /// This node leads it from now on.
    pub now_local: bool,
}

impl ClusterNode {
    fn views(&self) -> BTreeMap<PartitionId, GroupView> {
        let pl = self.placement.read().unwrap();
        pl.rafts
            .iter()
            .map(|(p, r)| (*p, group_view(r, self.my_id)))
            .collect()
    }

    /// Whether the node is ready to serve (`/readyz`); past [`READY_CATCH_UP_BOUND`] after
    /// start, a replica still catching up no longer counts against it (see
    /// [`crate::control::ready`]).
    pub fn ready(&self) -> Result<(), NotReady> {
        let replicas = self.views();
        let placed = self.placement.read().unwrap().replicas.clone();
        let leaders_applied = self.leaders_applied.lock().unwrap().clone();
        let logged = self.logged.lock().unwrap().clone();
        let unaddressed = self.unaddressed(&replicas);
        ready::ready(&ReadyInput {
            me: &self.me,
            my_id: self.my_id,
            formed: self.formed.get().is_some(),
            left: self.has_left(),
            placed: &placed,
            replicas: &replicas,
            leaders_applied: &leaders_applied,
            logged: &logged,
            catch_up_waived: self.started.elapsed() >= READY_CATCH_UP_BOUND,
            unaddressed: &unaddressed,
        })
    }

    /// The members gossip shows up, and the leaders of `replicas`, whose cluster address
    /// this node does not know yet (see [`ReadyInput::unaddressed`]).
    fn unaddressed(&self, replicas: &BTreeMap<PartitionId, GroupView>) -> BTreeMap<u64, String> {
        let listed: Vec<String> = self.member_names();
        let up = self.live_names();
        let metas = self.metas.borrow();
        let mut missing: BTreeMap<u64, String> = listed
            .into_iter()
            .filter(|n| *n != self.me && up.contains(n) && !metas.contains_key(n))
            .map(|n| (raft_id(&n), n))
            .collect();
        drop(metas);
        let Some(resolve) = self.formed.get().map(|f| &f.resolver) else {
            return missing;
        };
        for l in replicas.values().filter_map(|g| g.leader) {
            if l != self.my_id && resolve(l).is_none() {
                let name = self
                    .name_of(l)
                    .unwrap_or_else(|| format!("with Raft id {l}"));
                missing.insert(l, name);
            }
        }
        missing
    }

    /// Every second: asks the leaders of the partitions this node follows how far they
    /// have applied (one call per leader), for `/readyz`. A quiet follower is not asked
    /// about: it went quiet holding exactly its leader's log, all of it applied there, so an
    /// idle cluster makes no calls.
    pub(crate) fn watch_catch_up(self: &Arc<Self>) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut tick = crate::grid::interval(APPLIED_PERIOD);
            loop {
                tick.tick().await;
                node.health_gauges();
                let quiet = node.raft_service.quiet_at();
                ready::record_sample(
                    &mut node.leaders_applied.lock().unwrap(),
                    quiet.iter().map(|(p, q)| (*p, q.index)),
                );
                let views = node.views();
                ready::record_sample(
                    &mut node.logged.lock().unwrap(),
                    views.iter().map(|(p, g)| (*p, g.last_log)),
                );
                let mut by_leader: HashMap<u64, Vec<PartitionId>> = HashMap::new();
                for (p, g) in views {
                    match g.leader {
                        Some(l) if l != node.my_id && !quiet.contains_key(&p) => {
                            by_leader.entry(l).or_default().push(p)
                        }
                        _ => {}
                    }
                }
                for (leader, partitions) in by_leader {
                    node.ask_applied(leader, partitions).await;
                }
            }
        });
    }

    /// The cluster-health gauges the dashboard and the alerts read (docs/operations.md),
    /// from this node's view: members up and down, its replicas without a leader, the groups
    /// it leads that lack a live voter, their worst follower lag, replicas held.
    fn health_gauges(&self) {
        let Some(list) = self.members.read().unwrap().clone() else {
            return;
        };
        let alive = self.live_names();
        let up = list.names.iter().filter(|n| alive.contains(*n)).count();
        metrics::gauge!("warbler_cluster_members", "state" => "up").set(up as f64);
        metrics::gauge!("warbler_cluster_members", "state" => "down")
            .set((list.names.len() - up) as f64);
        let names = self.names.read().unwrap().clone();
        let rafts = self.placement.read().unwrap().rafts.clone();
        let (mut leaderless, mut under, mut held, mut lag) = (0u64, 0u64, 0u64, 0u64);
        for raft in rafts.values() {
            let view = group_view(raft, self.my_id);
            held += view.added() as u64;
            if view.leader.is_none() {
                leaderless += 1;
            }
            if !view.leading {
                continue;
            }
            let live = view
                .voters
                .iter()
                .filter(|id| names.get(id).is_some_and(|n| alive.contains(n)))
                .count();
            if live < list.replication_factor.min(list.names.len()) {
                under += 1;
            }
            let watch = raft.metrics();
            let m = watch.borrow();
            if let Some(replication) = &m.replication {
                for id in view.voters.iter().filter(|id| **id != self.my_id) {
                    let matched = replication
                        .get(id)
                        .copied()
                        .flatten()
                        .map_or(0, |l| l.index);
                    lag = lag.max(view.last_log.saturating_sub(matched));
                }
            }
        }
        metrics::gauge!("warbler_partitions_leaderless").set(leaderless as f64);
        metrics::gauge!("warbler_partitions_under_replicated").set(under as f64);
        metrics::gauge!("warbler_replication_lag_entries").set(lag as f64);
        metrics::gauge!("warbler_replicas_held").set(held as f64);
        let decommissioning = self.has_left() && held > 0;
        metrics::gauge!("warbler_decommissioning").set(decommissioning as u8 as f64);
    }

    async fn ask_applied(&self, leader: u64, partitions: Vec<PartitionId>) {
        let Some(addr) = self.formed.get().and_then(|f| (f.resolver)(leader)) else {
            return;
        };
        let body = wire::encode(&AppliedReq(partitions));
        let asked = self
            .transport
            .call(addr, 0, PeerKind::Applied, body, Duration::from_secs(2))
            .await;
        let Ok(Ok(answers)) = asked.map(|b| wire::decode::<Vec<Applied>>(&b)) else {
            return;
        };
        let mut seen = self.leaders_applied.lock().unwrap();
        ready::record_sample(
            &mut seen,
            answers.into_iter().map(|a| (a.partition, a.applied)),
        );
    }

    /// Watches every partition's leader and calls `on_change` when it changes; keeps the
    /// `warbler_partitions_led` gauge. The watch sleeps until a group changes state (leader,
    /// role, members), something else the answer depends on changes (`routing_epoch`, the
    /// members' addresses), or its once-a-second sweep comes; then it looks only at the
    /// groups whose state changed, or at every partition for the rest. An idle node's watch
    /// wakes once a second and reads 64 version numbers.
    pub fn watch_leaders(self: &Arc<Self>, on_change: impl Fn(LeaderChange) + Send + 'static) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut prev: Vec<Leader> = (0..node.partitions)
                .map(|_| Leader::Unknown(String::new()))
                .collect();
            let mut sweep = crate::grid::interval(LEADER_WATCH_SWEEP);
            let mut epoch = None;
            let mut metas = node.metas.clone();
            let mut groups: Vec<Option<ServerMetricsRx>> = Vec::new();
            let (mut first, mut metas_open) = (true, true);
            loop {
                let mut addresses_moved = first;
                if !first {
                    tokio::select! {
                        _ = node.leaders_moved.notified() => {}
                        changed = metas.changed(), if metas_open => {
                            metas_open = changed.is_ok();
                            addresses_moved = metas_open;
                        }
                        _ = sweep.tick() => {}
                    }
                }
                first = false;
                let now_epoch = node.routing_epoch.load(Ordering::Acquire);
                let all = addresses_moved
                    || epoch != Some(now_epoch)
                    || metas.has_changed().unwrap_or(false);
                if all {
                    epoch = Some(now_epoch);
                    metas.borrow_and_update();
                    let pl = node.placement.read().unwrap();
                    let fresh: Vec<Option<ServerMetricsRx>> = (0..node.partitions)
                        .map(|p| pl.rafts.get(&p).map(|r| r.server_metrics()))
                        .collect();
                    drop(pl);
                    for (p, rx) in fresh.into_iter().enumerate() {
                        let known = groups.get(p).and_then(Option::as_ref);
                        match rx {
                            Some(rx) if !known.is_some_and(|k| k.same_channel(&rx)) => {
                                wake_on_change(rx.clone(), node.leaders_moved.clone());
                                if p < groups.len() {
                                    groups[p] = Some(rx);
                                } else {
                                    groups.push(Some(rx));
                                }
                            }
                            Some(_) => {}
                            None if p < groups.len() => groups[p] = None,
                            None => groups.push(None),
                        }
                    }
                }
                for p in 0..node.partitions {
                    let group = groups.get_mut(p as usize).and_then(Option::as_mut);
                    let changed = group.is_some_and(|rx| {
                        let changed = rx.has_changed().unwrap_or(true);
                        rx.borrow_and_update();
                        changed
                    });
                    if !all && !changed {
                        continue;
                    }
                    let now = node.leader(p);
                    if now == Leader::Local && prev[p as usize] != Leader::Local {
                        metrics::counter!("warbler_leaderships_gained_total").increment(1);
                    }
                    if now != prev[p as usize] {
                        let was_local = prev[p as usize] == Leader::Local;
                        if was_local {
                            tracing::info!(
                                partition = p,
                                "no longer leading the partition; stopping its mailboxes"
                            );
                        }
                        on_change(LeaderChange {
                            partition: p,
                            was_local,
                            now_local: now == Leader::Local,
                        });
                        prev[p as usize] = now;
                    }
                }
                let led = prev.iter().filter(|l| **l == Leader::Local).count();
                metrics::gauge!("warbler_partitions_led").set(led as f64);
            }
        });
    }

    /// Members, their state, partitions with replicas and leaders.
    pub fn status(&self) -> ClusterStatus {
        let list = self.members.read().unwrap().clone();
        let views = self.views();
        let partitions = if self.formed.get().is_none() {
            Vec::new()
        } else {
            self.partition_status(&views)
        };
        let held = views.values().filter(|g| g.added()).count();
        ClusterStatus {
            node: self.me.clone(),
            members: self.member_status(list.as_ref()),
            member_list_epoch: list.as_ref().map(|l| l.epoch),
            member_list_leader: self.coordinator(),
            decommissioned: self.has_left(),
            replicas_held: Some(held),
            replication_factor: list.as_ref().map(|l| l.replication_factor),
            partition_count: self.partitions,
            partitions,
            faults_blocked: self
                .faults
                .blocked()
                .iter()
                .map(|a| a.to_string())
                .collect(),
            mailboxes_active: 0,
            user: None,
            cluster_id: self.cluster_id.get(),
        }
    }

    fn member_status(&self, list: Option<&crate::control::MemberList>) -> Vec<MemberStatus> {
        let live: Vec<String> = self
            .membership
            .members()
            .into_iter()
            .map(|m| m.name)
            .collect();
        let metas = self.metas.borrow().clone();
        let mut names: Vec<String> = match list {
            Some(l) => l.names.clone(),
            None => Vec::new(),
        };
        // Live nodes outside the list: joining, or decommissioned and not stopped yet.
        names.extend(live.iter().cloned());
        names.push(self.me.clone());
        names.sort();
        names.dedup();
        let is_member = |n: &String| list.is_none_or(|l| l.names.contains(n));
        names
            .into_iter()
            .map(|n| {
                let me = n == self.me;
                let alive = me || live.contains(&n);
                let meta = if me {
                    Some(self.my_meta.read().unwrap().clone())
                } else {
                    metas.get(&n).cloned()
                };
                let state = if !is_member(&n) || (me && self.has_left()) {
                    MemberState::NotAMember
                } else if !alive {
                    MemberState::Down
                } else {
                    match meta.as_ref().map(|m| m.state) {
                        Some(NodeState::Serving) => MemberState::Serving,
                        Some(NodeState::Draining) => MemberState::Draining,
                        Some(NodeState::Joining) | None => MemberState::Joining,
                    }
                };
                let zone = list
                    .and_then(|l| l.zones.get(&n).cloned())
                    .or_else(|| meta.as_ref().and_then(|m| m.zone.clone()));
                MemberStatus {
                    zone,
                    member: is_member(&n),
                    node: n,
                    alive,
                    state,
                    client_addr: meta.as_ref().map(|m| m.client.to_string()),
                    http_addr: meta.as_ref().map(|m| m.http.to_string()),
                    cluster_addr: meta.as_ref().map(|m| m.cluster.to_string()),
                }
            })
            .collect()
    }

    fn partition_status(&self, views: &BTreeMap<PartitionId, GroupView>) -> Vec<PartitionStatus> {
        let placed = self.placement.read().unwrap().replicas.clone();
        (0..self.partitions)
            .map(|p| {
                // Empty for the moment between forming and reading the member list.
                let placement = placed.get(p as usize).cloned().unwrap_or_default();
                let Some(g) = views.get(&p) else {
                    return PartitionStatus {
                        partition: p,
                        replicas: placement.clone(),
                        placement,
                        leader: None,
                        term: None,
                        applied: None,
                    };
                };
                let mut voters: Vec<String> =
                    g.voters.iter().filter_map(|id| self.name_of(*id)).collect();
                voters.sort();
                PartitionStatus {
                    partition: p,
                    replicas: if voters.is_empty() {
                        placement.clone()
                    } else {
                        voters
                    },
                    placement,
                    leader: g.leader.and_then(|id| self.name_of(id)),
                    term: Some(g.term),
                    applied: Some(g.applied),
                }
            })
            .collect()
    }
}

/// Wakes `watch` whenever the group behind `rx` changes state, until the group stops.
fn wake_on_change(mut rx: ServerMetricsRx, watch: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            watch.notify_one();
        }
    });
}
