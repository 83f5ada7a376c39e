//! Quiescence's driver (the decisions are [`crate::control::quiesce`]): every
//! [`QUIET_CHECK_PERIOD`] it samples the groups this node leads (the partitions' and the
//! member list's) and quiets or wakes them,
//! and whenever gossip's view of live nodes changes (and at every check) it makes one
//! survivor of each group whose leader is gone elect at once: of quiet groups, and of busy
//! ones that have heard nothing from their leader for a leader lease.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openraft::{Raft, ServerState};
use tokio::task::JoinSet;
use warbler_storage::PartitionId;

use super::{group_view, ClusterNode, META_GROUP};
use crate::control::quiesce::{Idle, LeaderSample, Quiesce, Step};
use crate::control::raft_id;
use crate::raft_store::TypeConfig;
use crate::wire::{self, AppliedReq, PeerKind};

/// How often the groups this node leads are checked for idleness.
const QUIET_CHECK_PERIOD: Duration = Duration::from_millis(500);
/// How long a leader waits for a follower to agree to go quiet (a follower that does not
/// answer in time keeps the group awake).
const QUIESCE_CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a replica that just started waits to know its leader, and then tries to greet it.
const GREET_WAIT: Duration = Duration::from_secs(2);
/// The pause between two tries of a replica's greeting to its leader.
const GREET_RETRY: Duration = Duration::from_millis(100);

/// What a leader's check needs of its group, read from one look at its metrics (the check
/// runs every 500 ms for every group: a follower's costs one comparison, and nothing is
/// cloned).
fn sample(raft: &Raft<TypeConfig>, my_id: u64) -> Option<LeaderSample> {
    let m = raft.metrics();
    let m = m.borrow();
    if m.state != ServerState::Leader || m.current_leader != Some(my_id) {
        return None;
    }
    let membership = m.membership_config.membership();
    let matched = membership
        .nodes()
        .map(|(id, _)| *id)
        .filter(|id| *id != my_id)
        .map(|id| {
            let at = m.replication.as_ref().and_then(|r| r.get(&id));
            at.copied().flatten().map(|l| l.index)
        })
        .collect();
    Some(LeaderSample {
        term: m.current_term,
        last_log: m.last_log_index.unwrap_or(0),
        applied: m.last_applied.map(|l| l.index).unwrap_or(0),
        settled: membership.get_joint_config().len() == 1
            && m.membership_config.log_id().as_ref() <= m.last_applied.as_ref(),
        matched,
    })
}

impl ClusterNode {
    /// Starts the quiescence loop (once, when the node has formed).
    pub(crate) fn quiesce_idle(self: &Arc<Self>) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut idle: HashMap<PartitionId, Idle> = HashMap::new();
            let mut alive = node.membership.watch();
            let mut tick = crate::grid::interval(QUIET_CHECK_PERIOD);
            let mut seen = BTreeSet::new();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = alive.changed() => if changed.is_err() { return },
                }
                node.wake_orphans(&mut seen);
                node.quiet_check(&mut idle).await;
            }
        });
    }

    /// Makes the replicas here whose leader's node is gone elect now, where this node is
    /// the group's chosen campaigner: the quiet ones, and the others that have heard
    /// nothing from their leader for a leader lease. `seen`
    /// gathers the nodes gossip has shown alive: only a node seen alive and now gone counts
    /// as gone (a node that starts before it has heard of the others must not depose them).
    fn wake_orphans(&self, seen: &mut BTreeSet<u64>) {
        let alive: BTreeSet<u64> = self
            .membership
            .members()
            .iter()
            .map(|m| raft_id(&m.name))
            .collect();
        let woken = self.raft_service.wake_orphans(&alive);
        if !woken.is_empty() {
            tracing::info!(partitions = ?woken, "quiet partitions lost their leader's node; waking");
        }
        seen.extend(alive.iter().copied());
        let gone: BTreeSet<u64> = seen.difference(&alive).copied().collect();
        let Some(lease) = self
            .formed
            .get()
            .map(|f| Duration::from_millis(f.raft_config.election_timeout_max))
        else {
            return;
        };
        let electing = self.raft_service.elect_without(&alive, &gone, lease);
        if !electing.is_empty() {
            tracing::info!(partitions = ?electing, "partitions lost their leader's node and hear nothing from it; electing");
        }
    }

    async fn quiet_check(self: &Arc<Self>, idle: &mut HashMap<PartitionId, Idle>) {
        // A stopping node hands its groups over: a quiet group would elect no one.
        if self.is_draining() {
            return;
        }
        let mut rafts = self.placement.read().unwrap().rafts.clone();
        // The member-list group goes quiet as the partitions do: it is written only when
        // members or placement change.
        if let Some(f) = self.formed.get() {
            if !self.has_left() {
                rafts.insert(META_GROUP, f.meta.clone());
            }
        }
        idle.retain(|p, _| rafts.contains_key(p));
        let mut asking = JoinSet::new();
        for (p, raft) in rafts {
            let state = idle.entry(p).or_default();
            let mut step = state.observe(self.my_id, sample(&raft, self.my_id).as_ref());
            if self.raft_log.take_poked(p) && step == Step::Nothing {
                step = state.woken();
            }
            match step {
                Step::Nothing => {}
                Step::Wake => raft.runtime_config().tick(true),
                Step::Quiesce(req) => {
                    let node = self.clone();
                    asking.spawn(async move { (p, node.quiesce(p, &raft, req).await) });
                }
            }
        }
        while let Some(Ok((p, quieted))) = asking.join_next().await {
            if quieted {
                idle.entry(p).or_default().quieted();
            }
        }
        let quiet_led: BTreeSet<PartitionId> = idle
            .iter()
            .filter(|(_, i)| i.is_quiet())
            .map(|(p, _)| *p)
            .collect();
        let leaders_quiet = quiet_led.iter().filter(|p| **p != META_GROUP).count();
        *self.quiet_led.lock().unwrap() = quiet_led;
        metrics::gauge!("warbler_partitions_quiet", "role" => "leader").set(leaders_quiet as f64);
        metrics::gauge!("warbler_partitions_quiet", "role" => "follower")
            .set(self.raft_service.quiet_followers(META_GROUP) as f64);
    }

    /// Stops this leader's ticks and asks every other replica of the group to go quiet; if
    /// one does not agree, or something was written meanwhile, the leader ticks again.
    /// The ticks stop first: a heartbeat sent while the followers agree would wake them
    /// under a leader about to fall silent.
    async fn quiesce(&self, partition: PartitionId, raft: &Raft<TypeConfig>, req: Quiesce) -> bool {
        raft.runtime_config().tick(false);
        let quiet = self.ask_quiesce(partition, raft, req).await;
        if !quiet {
            raft.runtime_config().tick(true);
        }
        quiet
    }

    /// Tells the other replicas of each group in `led` to tick again (peer kind `Wake`):
    /// this node is stopping and sends them no more heartbeats, and a follower that went
    /// quiet would otherwise elect no one until this node left gossip. Unanswered calls are
    /// given up after [`QUIESCE_CALL_TIMEOUT`]: a replica that is down elects when it is back.
    pub(super) async fn wake_followers(&self, led: &[(PartitionId, Raft<TypeConfig>)]) {
        let Some(formed) = self.formed.get() else {
            return;
        };
        let mut calls = JoinSet::new();
        for (partition, raft) in led {
            let partition = *partition;
            let others = group_view(raft, self.my_id).nodes.into_iter();
            for id in others.filter(|id| *id != self.my_id) {
                let Some(addr) = (formed.resolver)(id) else {
                    continue;
                };
                let transport = self.transport.clone();
                calls.spawn(async move {
                    let body = wire::encode(&());
                    let kind = PeerKind::Wake;
                    transport
                        .call(addr, partition, kind, body, QUIESCE_CALL_TIMEOUT)
                        .await
                        .is_ok()
                });
            }
        }
        let (mut woken, mut failed) = (0, 0);
        while let Some(answer) = calls.join_next().await {
            if matches!(answer, Ok(true)) {
                woken += 1;
            } else {
                failed += 1;
            }
        }
        tracing::info!(
            woken,
            failed,
            "draining: told the followers of the groups led here to tick again"
        );
    }

    /// A replica that starts as a follower tells its leader it is back (an `Applied` call,
    /// the answer unused), and a leader whose group went quiet meanwhile wakes it
    /// ([`ClusterNode::wake_asked`]): a quiet leader sends no heartbeat, so the replica
    /// would otherwise time out and elect itself, and one that lost the apply of its last
    /// entries (unsynced writes die with the process) would not learn the commit index
    /// again until then. Waits up to [`GREET_WAIT`] for the replica to name a leader.
    pub(super) fn greet_leader(&self, partition: PartitionId, raft: &Raft<TypeConfig>) {
        let Some(resolver) = self.formed.get().map(|f| f.resolver.clone()) else {
            return;
        };
        let (transport, my_id) = (self.transport.clone(), self.my_id);
        let mut metrics = raft.metrics();
        tokio::spawn(async move {
            let named = async {
                let m = metrics.wait_for(|m| m.current_leader.is_some()).await;
                m.ok().and_then(|m| m.current_leader)
            };
            let Ok(Some(leader)) = tokio::time::timeout(GREET_WAIT, named).await else {
                return;
            };
            if leader == my_id {
                return;
            }
            // Tried again until the leader answers: a node that has just started may not
            // know the leader's address yet, or its link may still be dialling, and a call
            // given up in the queue is not sent at all.
            let body = wire::encode(&AppliedReq(vec![partition]));
            let until = tokio::time::Instant::now() + GREET_WAIT;
            let mut ok = false;
            while !ok && tokio::time::Instant::now() < until {
                if let Some(addr) = resolver(leader) {
                    let call = transport.call(
                        addr,
                        0,
                        PeerKind::Applied,
                        body.clone(),
                        QUIESCE_CALL_TIMEOUT,
                    );
                    ok = call.await.is_ok();
                }
                if !ok {
                    tokio::time::sleep(GREET_RETRY).await;
                }
            }
            tracing::debug!(
                partition,
                leader,
                ok,
                "told the leader this replica is back"
            );
        });
    }

    async fn ask_quiesce(
        &self,
        partition: PartitionId,
        raft: &Raft<TypeConfig>,
        req: Quiesce,
    ) -> bool {
        let Some(formed) = self.formed.get() else {
            return false;
        };
        let others: Vec<u64> = group_view(raft, self.my_id)
            .nodes
            .into_iter()
            .filter(|id| *id != self.my_id)
            .collect();
        for id in others {
            let Some(addr) = (formed.resolver)(id) else {
                return false;
            };
            let body = wire::encode(&req);
            let answer = self
                .transport
                .call(
                    addr,
                    partition,
                    PeerKind::Quiesce,
                    body,
                    QUIESCE_CALL_TIMEOUT,
                )
                .await;
            if answer.is_err() {
                return false;
            }
        }
        // A write that raced the followers' answers keeps the group awake.
        let still = sample(raft, self.my_id);
        still.map(|s| (s.term, s.last_log)) == Some((req.term, req.index))
    }
}
