//! Leader balancing's driver (the decisions are [`crate::control::balance`]): the member-list
//! leader's balancing round, a partition leader handing its partition over, and the
//! receiving replica's campaign.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warbler_storage::PartitionId;

use super::{group_view, ClusterNode};
use crate::control::balance::{self, HandLead, Led, TakeLead, TRANSFERS_AT_ONCE};
use crate::control::raft_id;
use crate::error::{RpcCode, RpcError};
use crate::wire::{self, PeerKind};
use crate::NodeState;

/// How long a handing leader waits for its target to hold its whole log (the partition's
/// writes are held meanwhile, so its log no longer grows: a round trip and a sync).
const CATCH_UP_WAIT: Duration = Duration::from_millis(500);
/// How long a transfer may take from the campaign to the old leader stepping down (one vote
/// round trip when it works). Past it the writes are let go: a transfer that fails costs
/// the partition at most the two waits.
const ELECTION_WAIT: Duration = Duration::from_millis(500);
/// How long the balancer waits for a member's answer (a transfer answers when it is done).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

fn refused(message: impl Into<String>) -> RpcError {
    RpcError::new(RpcCode::Refused, message)
}

impl ClusterNode {
    /// The partitions this node leads, with their voters by name.
    pub(crate) fn leading(&self) -> Vec<Led> {
        let rafts = self.placement.read().unwrap().rafts.clone();
        rafts
            .iter()
            .filter_map(|(p, raft)| {
                let view = group_view(raft, self.my_id);
                view.leading.then(|| Led {
                    partition: *p,
                    voters: view
                        .voters
                        .iter()
                        .filter_map(|v| self.name_of(*v))
                        .collect(),
                    settled: view.settled,
                })
            })
            .collect()
    }

    /// Notes since when this node leads each partition (a handover waits for the vote
    /// lease that starts at the election; noted late by up to a step, which only waits
    /// longer).
    pub(super) fn note_leaderships(&self) {
        let rafts = self.placement.read().unwrap().rafts.clone();
        let mut since = self.led_since.lock().unwrap();
        for (p, raft) in &rafts {
            let view = group_view(raft, self.my_id);
            if !view.leading {
                since.remove(p);
            } else if since.get(p).is_none_or(|(term, _)| *term != view.term) {
                since.insert(*p, (view.term, Instant::now()));
            }
        }
        since.retain(|p, _| rafts.contains_key(p));
    }

    /// On the member-list leader, every few seconds while no partition moves: asks every
    /// live member what it leads and asks for a few transfers toward the even share.
    pub(super) async fn balance_leaders(self: &Arc<Self>) {
        let Some(list) = self.members.read().unwrap().clone() else {
            return;
        };
        let live = self.live_names();
        let eligible: Vec<String> = {
            let metas = self.metas.borrow();
            list.names
                .iter()
                .filter(|n| live.contains(*n))
                .filter(|n| {
                    **n == self.me && !self.is_draining()
                        || metas.get(*n).is_some_and(|m| m.state == NodeState::Serving)
                })
                .cloned()
                .collect()
        };
        // Every member must answer: a plan from part of the picture moves leaders back and
        // forth.
        let mut led: BTreeMap<String, Vec<Led>> = BTreeMap::new();
        for name in &list.names {
            let answer = if *name == self.me {
                Some(self.leading())
            } else {
                self.ask_leading(name).await
            };
            match answer {
                Some(groups) => {
                    led.insert(name.clone(), groups);
                }
                None if live.contains(name) => return,
                None => {}
            }
        }
        let transfers = balance::plan(&led, &eligible, TRANSFERS_AT_ONCE);
        if transfers.is_empty() {
            return;
        }
        let counts: BTreeMap<&String, usize> = led.iter().map(|(n, g)| (n, g.len())).collect();
        tracing::info!(leaders = ?counts, transfers = transfers.len(), "spreading partition leaders");
        let mut asks = tokio::task::JoinSet::new();
        for t in transfers {
            let node = self.clone();
            asks.spawn(async move {
                let result = if t.from == node.me {
                    node.hand_lead(t.partition, HandLead { to: t.to.clone() }).await
                } else {
                    node.ask_hand_lead(&t.from, t.partition, &t.to).await
                };
                if let Err(e) = result {
                    tracing::info!(partition = t.partition, from = %t.from, to = %t.to, error = %e, "leader transfer not done");
                }
            });
        }
        while asks.join_next().await.is_some() {}
    }

    fn peer_addr(&self, name: &str) -> Option<std::net::SocketAddr> {
        let f = self.formed.get()?;
        (f.resolver)(raft_id(name))
    }

    async fn ask_leading(&self, name: &str) -> Option<Vec<Led>> {
        let addr = self.peer_addr(name)?;
        let body = wire::encode(&balance::Leading);
        let bytes = self
            .transport
            .call(addr, 0, PeerKind::Leading, body, ASK_TIMEOUT)
            .await
            .ok()?;
        wire::decode(&bytes).ok()
    }

    async fn ask_hand_lead(
        &self,
        leader: &str,
        partition: PartitionId,
        to: &str,
    ) -> Result<(), RpcError> {
        let addr = self
            .peer_addr(leader)
            .ok_or_else(|| refused(format!("no address for {leader}")))?;
        let body = wire::encode(&HandLead { to: to.to_string() });
        self.transport
            .call(addr, partition, PeerKind::HandLead, body, ASK_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|e| refused(e.to_string()))
    }

    /// On `partition`'s leader: hands the leadership to the replica on `req.to` (see
    /// [`crate::control::balance`]). Answers once the transfer is done or given up.
    pub(crate) async fn hand_lead(
        &self,
        partition: PartitionId,
        req: HandLead,
    ) -> Result<(), RpcError> {
        if self.is_draining() || self.moving.lock().unwrap().contains(&partition) {
            return Err(refused("the partition is moving or this node is stopping"));
        }
        self.transfer(partition, &req.to).await
    }

    /// Hands `partition`'s leadership from this node to the replica on `to_name`.
    pub(crate) async fn transfer(
        &self,
        partition: PartitionId,
        to_name: &str,
    ) -> Result<(), RpcError> {
        let req = HandLead {
            to: to_name.to_string(),
        };
        let raft = self.local_raft(partition).ok_or_else(|| {
            refused(format!(
                "this node holds no replica of partition {partition}"
            ))
        })?;
        let view = group_view(&raft, self.my_id);
        let to = raft_id(&req.to);
        if view.voters.len() > 3 {
            // The campaign wins with the target's and this leader's votes only: the other
            // voters refuse within their lease. Three voters need no more.
            return Err(refused(
                "handing over needs a group of at most three voters (replication factor 3)",
            ));
        }
        if !view.leading || !view.settled || !view.voters.contains(&to) {
            return Err(refused(format!(
                "this node does not lead partition {partition} in a settled group with {} as a voter",
                req.to
            )));
        }
        // This leader's vote lease runs from its election: until it has passed, the leader
        // would refuse the target's vote request and the campaign would only disrupt.
        let lease = self
            .formed
            .get()
            .map(|f| Duration::from_millis(f.raft_config.election_timeout_max))
            .unwrap_or_default();
        let since = self.led_since.lock().unwrap().get(&partition).copied();
        if since.is_none_or(|(term, s)| term != view.term || s.elapsed() < lease * 2) {
            return Err(refused("leading the partition too briefly to hand it over"));
        }
        let addr = self
            .peer_addr(&req.to)
            .ok_or_else(|| refused(format!("no address for {}", req.to)))?;
        let started = Instant::now();
        let _hold = self
            .raft_log
            .hold(partition)
            .ok_or_else(|| refused("the partition's log is not served here"))?;
        // Wait until the target holds everything this leader appended.
        let caught_up = raft
            .wait(Some(CATCH_UP_WAIT))
            .metrics(
                |m| {
                    let matched = m
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&to).copied().flatten())
                        .map(|l| l.index);
                    m.last_log_index.is_some() && matched == m.last_log_index
                },
                "the target replica holds the whole log",
            )
            .await;
        if caught_up.is_err() {
            metrics::counter!("warbler_leader_transfers_total", "result" => "lagging").increment(1);
            return Err(refused(format!(
                "{} did not catch up within {CATCH_UP_WAIT:?}",
                req.to
            )));
        }
        let (term, last_log) = {
            let m = raft.metrics().borrow().clone();
            (m.current_term, m.last_log_index.unwrap_or(0))
        };
        let body = wire::encode(&TakeLead { term, last_log });
        let asked = self
            .transport
            .call(addr, partition, PeerKind::TakeLead, body, ELECTION_WAIT)
            .await;
        let stepped_down = asked.is_ok()
            && raft
                .wait(Some(ELECTION_WAIT))
                .metrics(|m| m.current_leader != Some(self.my_id), "stepped down")
                .await
                .is_ok();
        let result = if stepped_down { "done" } else { "refused" };
        metrics::counter!("warbler_leader_transfers_total", "result" => result).increment(1);
        if stepped_down {
            tracing::info!(partition, to = %req.to, ms = started.elapsed().as_millis() as u64, "partition leadership handed over");
            Ok(())
        } else {
            Err(refused(format!(
                "{} did not take the leadership: {}",
                req.to,
                asked
                    .err()
                    .map_or_else(|| "no election won".to_string(), |e| e.to_string())
            )))
        }
    }

    /// On the replica a leader hands `partition` to: campaigns now, if it holds the
    /// leader's log in the leader's term.
    pub(crate) async fn take_lead(
        &self,
        partition: PartitionId,
        req: TakeLead,
    ) -> Result<(), RpcError> {
        let raft = self.local_raft(partition).ok_or_else(|| {
            refused(format!(
                "this node holds no replica of partition {partition}"
            ))
        })?;
        if self.is_draining() {
            return Err(refused("this node is stopping"));
        }
        balance::may_take_lead(&req, &group_view(&raft, self.my_id), self.my_id)
            .map_err(refused)?;
        self.raft_service.wake(partition);
        raft.trigger()
            .elect()
            .await
            .map_err(|e| refused(format!("cannot campaign: {e}")))?;
        Ok(())
    }
}
