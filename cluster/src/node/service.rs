//! Answers peers: consensus to the Raft groups, routing to the routing layer's handler,
//! control requests to the node.

use std::sync::{Arc, OnceLock, Weak};

use super::ClusterNode;
use crate::error::{RpcCode, RpcError};
use crate::raft_net::RaftService;
use crate::transport::{BoxFuture, PeerError, PeerHandler};
use crate::wire::{self, Applied, AppliedReq, Layer, ListChange, NodeReq, PeerKind};
use warbler_storage::PartitionId;

/// Dispatches peers' requests by the layer their kind belongs to.
pub(super) struct NodeService {
    node: OnceLock<Weak<ClusterNode>>,
    raft: Arc<RaftService>,
}

type Answer = BoxFuture<'static, Result<Vec<u8>, RpcError>>;

/// How long a read waits for its leader's answer, and then for its replica to apply.
const READ_FENCE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a read waits before it asks its leader again.
const READ_FENCE_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

fn refuse(code: RpcCode, message: impl Into<String>) -> Answer {
    let e = RpcError::new(code, message);
    Box::pin(async move { Err(e) })
}

fn decoded<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, RpcError> {
    wire::decode(body).map_err(|e| RpcError::bad_request(what, e))
}

impl NodeService {
    pub(super) fn new(raft: Arc<RaftService>) -> NodeService {
        NodeService {
            node: OnceLock::new(),
            raft,
        }
    }

    pub(super) fn set_node(&self, node: &Arc<ClusterNode>) {
        let _ = self.node.set(Arc::downgrade(node));
    }
}

impl PeerHandler for NodeService {
    fn handle(&self, from: String, partition: u16, kind: PeerKind, body: Vec<u8>) -> Answer {
        if kind.layer() == Layer::Consensus {
            return self.raft.handle(from, partition, kind, body);
        }
        let Some(node) = self.node.get().and_then(Weak::upgrade) else {
            return refuse(RpcCode::NotReady, "this node is still starting");
        };
        match kind.layer() {
            Layer::Route => match node.route_service.get() {
                Some(s) => s.handle(from, partition, kind, body),
                None => refuse(RpcCode::NotReady, "this node is still starting"),
            },
            Layer::Control => {
                Box::pin(async move { node.answer(&from, partition, kind, body).await })
            }
            Layer::Consensus | Layer::Transport => {
                refuse(RpcCode::UnknownKind, format!("{kind:?} is not served here"))
            }
        }
    }
}

impl ClusterNode {
    /// Answers a control-plane request.
    async fn answer(
        self: Arc<Self>,
        from: &str,
        partition: u16,
        kind: PeerKind,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, RpcError> {
        match kind {
            PeerKind::Members => match self.members.read().unwrap().clone() {
                Some(list) => Ok(wire::encode(&self.stamped(list))),
                None => Err(RpcError::new(
                    RpcCode::NotReady,
                    "this node has not joined a formed cluster yet",
                )),
            },
            PeerKind::Applied => {
                let req: AppliedReq = decoded(&body, "applied request")?;
                Ok(wire::encode(&self.applied_as_leader(&req.0)))
            }
            PeerKind::Join => {
                let r = ListChange::from_frame(partition, &body)
                    .map_err(|e| RpcError::bad_request("join request", e))?;
                let list = self.join(r.node, r.forwarded).await?;
                Ok(wire::encode(&self.stamped(list)))
            }
            PeerKind::Decommission => {
                let r = ListChange::from_frame(partition, &body)
                    .map_err(|e| RpcError::bad_request("decommission request", e))?;
                Ok(wire::encode(&self.decommission(r.node, r.forwarded).await?))
            }
            PeerKind::Reconfigure => {
                let req = decoded(&body, "reconfigure request")?;
                Ok(wire::encode(&self.reconfigure(from, partition, req)?))
            }
            PeerKind::ReadIndex => {
                let req: AppliedReq = decoded(&body, "read-index request")?;
                Ok(wire::encode(&self.read_index(&req.0).await))
            }
            PeerKind::Leading => Ok(wire::encode(&self.leading())),
            PeerKind::HandLead => {
                let req = decoded(&body, "hand-lead request")?;
                Ok(wire::encode(&self.hand_lead(partition, req).await?))
            }
            PeerKind::TakeLead => {
                let req = decoded(&body, "take-lead request")?;
                Ok(wire::encode(&self.take_lead(partition, req).await?))
            }
            PeerKind::MemberOf => {
                let NodeReq(name) = decoded(&body, "member-of request")?;
                Ok(wire::encode(&self.member_of(partition, &name)?))
            }
            other => Err(RpcError::new(
                RpcCode::UnknownKind,
                format!("{other:?} is not a control request"),
            )),
        }
    }

    /// The applied index of each of `partitions` this node leads.
    fn applied_as_leader(&self, partitions: &[u16]) -> Vec<Applied> {
        self.wake_asked(partitions);
        let pl = self.placement.read().unwrap();
        partitions
            .iter()
            .filter_map(|p| {
                let g = super::group_view(pl.rafts.get(p)?, self.my_id);
                g.leading.then_some(Applied {
                    partition: *p,
                    applied: g.applied,
                })
            })
            .collect()
    }

    /// As [`Self::applied_as_leader`], after sending each group's followers a heartbeat: a
    /// follower learns a commit from the next AppendEntries (the vendored openraft sends
    /// none of its own for it), so the one that asked learns this commit index now.
    async fn read_index(&self, partitions: &[u16]) -> Vec<Applied> {
        // First a quiet group ticks again (a heartbeat wakes its followers, which would time
        // out on a leader that stayed quiet); the heartbeat after it carries a commit index
        // at least the applied index answered.
        let applied = self.applied_as_leader(partitions);
        for a in &applied {
            if let Some(raft) = self.local_raft(a.partition) {
                let _ = raft.trigger().heartbeat().await;
            }
        }
        applied
    }

    /// Waits until this node's replica of `partition` has applied what its leader had
    /// applied when asked: a read served from the local replica then sees every write
    /// acknowledged before it began (a follower learns commits with the leader's next
    /// AppendEntries, up to a heartbeat later). Nothing to wait for on the leader, or on a
    /// node that holds no replica of it.
    pub async fn read_fence(&self, partition: PartitionId) -> Result<(), RpcError> {
        let Some(raft) = self.local_raft(partition) else {
            return Ok(());
        };
        // A leader being elected, an address gossip has not brought yet, a leadership on
        // the move: asked again until the deadline.
        let deadline = tokio::time::Instant::now() + READ_FENCE_WAIT;
        let target = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let why = match self.leader_applied(&raft, partition, left).await {
                Ok(Some(target)) => break target,
                Ok(None) => return Ok(()),
                Err(why) => why,
            };
            if tokio::time::Instant::now() + READ_FENCE_RETRY >= deadline {
                return Err(RpcError::new(
                    RpcCode::NotReady,
                    format!("{why} (for {READ_FENCE_WAIT:?}); retry in a second"),
                ));
            }
            tokio::time::sleep(READ_FENCE_RETRY).await;
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        raft.wait(Some(left.max(READ_FENCE_RETRY)))
            .metrics(
                |m| m.last_applied.map_or(0, |l| l.index) >= target,
                "applied what the leader had",
            )
            .await
            .map(|_| ())
            .map_err(|_| {
                RpcError::new(
                    RpcCode::Failed,
                    format!(
                        "this node's replica of partition {partition} did not apply its leader's entries within {READ_FENCE_WAIT:?}; retry, or read through the leader"
                    ),
                )
            })
    }

    /// How far `partition`'s leader applied, asked once; `None` when there is nothing to
    /// wait for (this replica leads, or the leader runs a release without
    /// [`PeerKind::ReadIndex`]: the read is served as that release served it). `Err` says
    /// why it could not be asked now.
    async fn leader_applied(
        &self,
        raft: &openraft::Raft<crate::raft_store::TypeConfig>,
        partition: PartitionId,
        wait: std::time::Duration,
    ) -> Result<Option<u64>, String> {
        let leader = match raft.metrics().borrow().current_leader {
            Some(l) if l == self.my_id => return Ok(None),
            Some(l) => l,
            None => return Err(format!("partition {partition} has no leader")),
        };
        let addr = self
            .formed
            .get()
            .and_then(|f| (f.resolver)(leader))
            .ok_or_else(|| format!("partition {partition}'s leader has no known address"))?;
        let body = wire::encode(&AppliedReq(vec![partition]));
        let answer = match self
            .transport
            .call(
                addr,
                0,
                PeerKind::ReadIndex,
                body,
                wait.max(READ_FENCE_RETRY),
            )
            .await
        {
            Err(PeerError::UnknownKind(_)) => return Ok(None),
            Err(PeerError::Remote { error, .. }) if error.code == RpcCode::UnknownKind => {
                return Ok(None)
            }
            Err(e) => {
                return Err(format!(
                    "cannot ask partition {partition}'s leader how far it applied: {e}"
                ))
            }
            Ok(answer) => answer,
        };
        wire::decode::<Vec<Applied>>(&answer)
            .ok()
            .and_then(|a| a.into_iter().find(|a| a.partition == partition))
            .map(|a| Some(a.applied))
            .ok_or_else(|| format!("partition {partition}'s leadership is moving"))
    }

    /// A follower that asks how far its leader applied is not quiet (a quiet one asks
    /// nothing): it restarted, or has not agreed yet. If the group is quiet here, it wakes:
    /// a restarted follower may have lost the apply of the last entries, and with them the
    /// commit index, which only the leader's heartbeats tell it again; then the group goes
    /// quiet again with every replica agreeing.
    pub(super) fn wake_asked(&self, partitions: &[u16]) {
        let woken: Vec<u16> = {
            let quiet = self.quiet_led.lock().unwrap();
            partitions
                .iter()
                .copied()
                .filter(|p| quiet.contains(p))
                .collect()
        };
        for p in &woken {
            self.raft_log.poke(*p);
        }
        if !woken.is_empty() {
            tracing::debug!(partitions = ?woken, "a follower of quiet partitions asked how far they are applied; waking them");
        }
    }
}
