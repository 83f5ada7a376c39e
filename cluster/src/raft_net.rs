//! openraft's network over the peer transport: every partition's consensus RPCs share the
//! one connection per peer, tagged with the partition and an RPC kind.
//!
//! The serving side ([`RaftService`]) hands each request to the partition's `Raft` and sends
//! back the serialized `Result`, so a refusal by the remote Raft (a higher vote, a missing
//! log) reaches the caller as that error, and transport failures as network errors.

#![allow(clippy::result_large_err)] // openraft's RPC errors are returned by value.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::control::quiesce::{self, Quiesce};
use crate::error::{RpcCode, RpcError};
use crate::raft_store::{NodeId, TypeConfig};
use crate::transport::{BoxFuture, PeerError, PeerHandler, PeerTransport};
use crate::wire::PeerKind;

/// Finds a node's current peer address by its consensus id (nodes may restart elsewhere,
/// e.g. a pod with a new IP); `None` falls back to the address in the Raft membership.
pub type Resolver = Arc<dyn Fn(NodeId) -> Option<SocketAddr> + Send + Sync>;

/// Creates clients for one partition's Raft.
#[derive(Clone)]
pub struct Network {
    pub transport: Arc<PeerTransport>,
    pub partition: u16,
    pub resolve: Option<Resolver>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Client;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Client {
        Client {
            transport: self.transport.clone(),
            partition: self.partition,
            target,
            addr: node.addr.parse().ok(),
            resolve: self.resolve.clone(),
        }
    }
}

/// Talks to one peer's replica of one partition.
pub struct Client {
    transport: Arc<PeerTransport>,
    partition: u16,
    target: NodeId,
    addr: Option<SocketAddr>,
    resolve: Option<Resolver>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Client {
    async fn call<Req, Resp, E>(
        &self,
        kind: PeerKind,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let resolved = self.resolve.as_ref().and_then(|r| r(self.target));
        let Some(addr) = resolved.or(self.addr) else {
            let e = PeerError::Unreachable(format!("node {} has no valid address", self.target));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let body = rmp_serde::to_vec_named(req).expect("consensus requests serialize");
        let (t, p, ttl) = (&self.transport, self.partition, option.hard_ttl());
        // The appends of every group a log sync released go to each peer together.
        let sent = if kind == PeerKind::AppendEntries {
            t.call_together(addr, p, kind, body, ttl).await
        } else {
            t.call(addr, p, kind, body, ttl).await
        };
        match sent {
            Ok(bytes) => {
                let answer: Result<Resp, RaftError<NodeId, E>> = rmp_serde::from_slice(&bytes)
                    .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Err(
                e @ (PeerError::Unreachable(_)
                | PeerError::Disconnected(_)
                | PeerError::Overloaded(_)),
            ) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Client {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(PeerKind::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(PeerKind::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(PeerKind::Vote, &rpc, &option).await
    }

    /// How long a group waits before it replicates again to a peer a call found unreachable.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(UNREACHABLE_RETRY))
    }
}

/// A group's wait before it calls an unreachable peer again (openraft's default is 500 ms).
/// The peer's link paces its dials ([`crate::transport::BACKOFF_MAX`]) and fails the calls
/// queued meanwhile at its next failed dial, so a dead peer costs few calls even so. A
/// restarted peer hears from the leaders of its groups within this of its link coming up,
/// and starts catching up then: with 500 ms, a catch-up of a few hundred milliseconds of
/// work took a second.
const UNREACHABLE_RETRY: Duration = Duration::from_millis(100);

/// Serves peers' consensus RPCs for every partition this node replicates.
#[derive(Default)]
pub struct RaftService {
    rafts: RwLock<HashMap<u16, Raft<TypeConfig>>>,
    /// Partitions whose replica here went quiet as a follower, with the request it went
    /// quiet under (see [`crate::control::quiesce`]).
    quiet: Arc<Mutex<BTreeMap<u16, Quiesce>>>,
    /// When each partition's replica here last received an AppendEntries (its leader's
    /// heartbeats and entries).
    heard: Mutex<HashMap<u16, Instant>>,
    /// The term each partition's replica here was in when this node last made it campaign
    /// (see [`RaftService::campaign`]).
    campaigned: Mutex<HashMap<u16, u64>>,
}

impl RaftService {
    /// Starts serving `partition` with `raft`.
    pub fn insert(&self, partition: u16, raft: Raft<TypeConfig>) {
        self.rafts.write().unwrap().insert(partition, raft);
    }

    pub fn remove(&self, partition: u16) -> Option<Raft<TypeConfig>> {
        self.quiet.lock().unwrap().remove(&partition);
        self.heard.lock().unwrap().remove(&partition);
        self.campaigned.lock().unwrap().remove(&partition);
        self.rafts.write().unwrap().remove(&partition)
    }

    /// A leader asks this follower replica to stop ticking; it agrees only while it holds
    /// exactly the leader's log in the leader's term.
    fn quiesce(&self, partition: u16, raft: &Raft<TypeConfig>, req: Quiesce) -> Result<(), String> {
        let mut quiet = self.quiet.lock().unwrap();
        let my_id = raft.metrics().borrow().id;
        quiesce::accept(&req, &crate::node::group_view(raft, my_id))?;
        raft.runtime_config().tick(false);
        quiet.insert(partition, req);
        Ok(())
    }

    /// Wakes the quiet follower replicas whose leader's node is not in `alive` (the
    /// node-level liveness signal stands in for the heartbeats a quiet group does not
    /// send), and makes those this node is the chosen campaigner of
    /// ([`quiesce::campaigner`]) start an election now; the others' timers run again.
    /// Returns the partitions woken.
    pub fn wake_orphans(&self, alive: &BTreeSet<u64>) -> Vec<u16> {
        let orphans: Vec<(u16, u64)> = {
            let mut quiet = self.quiet.lock().unwrap();
            quiesce::orphaned(&quiet, alive)
                .into_iter()
                .filter_map(|p| quiet.remove(&p).map(|q| (p, q.leader)))
                .collect()
        };
        for (p, leader) in &orphans {
            if let Some(raft) = self.rafts.read().unwrap().get(p).cloned() {
                raft.runtime_config().tick(true);
                if campaigns_here(&raft, *leader, alive) {
                    self.campaign(*p, raft);
                }
            }
        }
        orphans.into_iter().map(|(p, _)| p).collect()
    }

    /// Makes every follower replica here whose leader is on a node in `gone` (seen alive,
    /// then declared down by gossip), that has heard nothing from it for `silent_for`, and
    /// of whose group this node is the chosen campaigner ([`quiesce::campaigner`] over
    /// `alive`) start an election now, instead of when its own timer runs out. openraft 0.9
    /// lets a follower campaign only a leader lease (the longest election timeout) plus an
    /// election timeout after it last heard from its leader, and a vote request reaching a
    /// replica within its lease is refused; so a round lost to a split vote or to a lease
    /// costs a whole timeout more. The silence guards a live leader: one that still reaches
    /// this replica keeps it. Quiet replicas are left to [`RaftService::wake_orphans`], and
    /// a replica already made to campaign in its current term (by either call) is not made
    /// to again. Returns the partitions that campaign.
    pub fn elect_without(
        &self,
        alive: &BTreeSet<u64>,
        gone: &BTreeSet<u64>,
        silent_for: Duration,
    ) -> Vec<u16> {
        if gone.is_empty() {
            return Vec::new();
        }
        let rafts: Vec<(u16, Raft<TypeConfig>)> = self
            .rafts
            .read()
            .unwrap()
            .iter()
            .map(|(p, r)| (*p, r.clone()))
            .collect();
        let mut orphans = Vec::new();
        for (p, raft) in rafts {
            let (state, leader, term) = {
                let m = raft.metrics();
                let m = m.borrow();
                (m.state, m.current_leader, m.current_term)
            };
            // Most replicas follow a live leader: they are passed over before any lock.
            let Some(leader) = leader.filter(|l| gone.contains(l)) else {
                continue;
            };
            if state != openraft::ServerState::Follower
                || self.campaigned.lock().unwrap().get(&p) == Some(&term)
            {
                continue;
            }
            let silent = self
                .heard
                .lock()
                .unwrap()
                .get(&p)
                .is_none_or(|t| t.elapsed() >= silent_for);
            if silent
                && !self.quiet.lock().unwrap().contains_key(&p)
                && campaigns_here(&raft, leader, alive)
            {
                orphans.push(p);
                self.campaign(p, raft);
            }
        }
        orphans
    }

    /// Makes `partition`'s replica here start an election, once per term: until the
    /// election has begun (openraft takes the request in its own time) the replica still
    /// looks like a follower of its gone leader, and the driver's next pass (a moment later,
    /// when gossip's view changes twice) started another. The second election, in the next
    /// term, threw away the votes of the first, which was about to win.
    fn campaign(&self, partition: u16, raft: Raft<TypeConfig>) {
        let term = raft.metrics().borrow().current_term;
        self.campaigned.lock().unwrap().insert(partition, term);
        tokio::spawn(async move {
            let _ = raft.trigger().elect().await;
        });
    }

    /// Makes `partition`'s replica here tick again if it was quiet (it is about to campaign).
    pub fn wake(&self, partition: u16) {
        if let Some(raft) = self.rafts.read().unwrap().get(&partition) {
            wake(&self.quiet, partition, raft);
            raft.runtime_config().tick(true);
        }
    }

    /// Groups whose follower replica here is quiet, `except` one (not a partition).
    pub fn quiet_followers(&self, except: u16) -> usize {
        let quiet = self.quiet.lock().unwrap();
        quiet.len() - usize::from(quiet.contains_key(&except))
    }

    /// The quiet follower replicas here, with the request each went quiet under: each
    /// holds exactly its leader's log, which the leader had applied.
    pub fn quiet_at(&self) -> BTreeMap<u16, Quiesce> {
        self.quiet.lock().unwrap().clone()
    }
}

fn reply<T: Serialize>(v: &T) -> Result<Vec<u8>, RpcError> {
    Ok(rmp_serde::to_vec_named(v).expect("consensus responses serialize"))
}

fn request<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    rmp_serde::from_slice(body).map_err(|e| RpcError::bad_request("consensus request", e))
}

/// Whether this replica is the one of its group to campaign at once now that `leader`'s
/// node is gone (see [`quiesce::campaigner`]).
fn campaigns_here(raft: &Raft<TypeConfig>, leader: u64, alive: &BTreeSet<u64>) -> bool {
    let m = raft.metrics();
    let m = m.borrow();
    let voters = m.membership_config.membership().voter_ids();
    quiesce::campaigner(voters, leader, alive, m.id) == Some(m.id)
}

/// Something reached `partition`'s replica: if it was quiet, it ticks again. Called after
/// the replica handled the request, so its leader lease is fresh and waking starts no
/// election.
fn wake(quiet: &Mutex<BTreeMap<u16, Quiesce>>, partition: u16, raft: &Raft<TypeConfig>) {
    let mut quiet = quiet.lock().unwrap();
    if quiet.remove(&partition).is_some() {
        raft.runtime_config().tick(true);
    }
}

/// An AppendEntries with `entries` entries reached `partition`'s replica: it wakes, unless
/// it was an empty heartbeat of the leader it went quiet under
/// ([`quiesce::heartbeat_keeps_quiet`]).
fn wake_on_append(
    quiet: &Mutex<BTreeMap<u16, Quiesce>>,
    partition: u16,
    raft: &Raft<TypeConfig>,
    entries: usize,
) {
    // A replica that is not quiet (every AppendEntries of a busy group) has nothing to wake.
    let Some(at) = quiet.lock().unwrap().get(&partition).copied() else {
        return;
    };
    let my_id = raft.metrics().borrow().id;
    if !quiesce::heartbeat_keeps_quiet(&at, entries, &crate::node::group_view(raft, my_id)) {
        wake(quiet, partition, raft);
    }
}

impl PeerHandler for RaftService {
    fn handle(
        &self,
        _from: String,
        partition: u16,
        kind: PeerKind,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        let raft = self.rafts.read().unwrap().get(&partition).cloned();
        let Some(raft) = raft else {
            let e = RpcError::new(
                RpcCode::WrongNode,
                format!("this node does not replicate partition {partition}"),
            );
            return Box::pin(std::future::ready(Err(e)));
        };
        if kind == PeerKind::Wake {
            // Its leader is stopping: tick, so the election timer runs out and one of the
            // replicas takes over while the leader still serves.
            wake(&self.quiet, partition, &raft);
            return Box::pin(std::future::ready(reply(&())));
        }
        if kind == PeerKind::Quiesce {
            let answer = request(&body).and_then(|req| {
                self.quiesce(partition, &raft, req)
                    .map_err(|why| RpcError::new(RpcCode::Refused, why))
            });
            return Box::pin(std::future::ready(answer.and_then(|()| reply(&()))));
        }
        let quiet = self.quiet.clone();
        if kind == PeerKind::AppendEntries {
            self.heard.lock().unwrap().insert(partition, Instant::now());
        }
        Box::pin(async move {
            let answer = match kind {
                PeerKind::AppendEntries => {
                    let req: AppendEntriesRequest<TypeConfig> = request(&body)?;
                    let entries = req.entries.len();
                    let carrying = if entries == 0 { "nothing" } else { "entries" };
                    metrics::counter!("warbler_raft_appends_received_total", "carrying" => carrying)
                        .increment(1);
                    let answer = reply(&raft.append_entries(req).await);
                    wake_on_append(&quiet, partition, &raft, entries);
                    return answer;
                }
                PeerKind::Vote => reply(&raft.vote(request(&body)?).await),
                PeerKind::InstallSnapshot => reply(&raft.install_snapshot(request(&body)?).await),
                other => Err(RpcError::new(
                    RpcCode::UnknownKind,
                    format!("{other:?} is not a consensus request"),
                )),
            };
            wake(&quiet, partition, &raft);
            answer
        })
    }
}

/// Starts this node's replica of `partition`: a Raft group over `store`, reached through
/// `transport`, registered with `service` so peers' RPCs find it.
pub async fn start_group(
    id: NodeId,
    partition: u16,
    config: Arc<openraft::Config>,
    store: &warbler_storage::Store,
    transport: &Arc<PeerTransport>,
    service: &RaftService,
    resolve: Option<Resolver>,
) -> Result<Raft<TypeConfig>, openraft::error::Fatal<NodeId>> {
    let network = Network {
        transport: transport.clone(),
        partition,
        resolve,
    };
    let log = crate::raft_store::LogStore::new(store.clone(), partition);
    let state_machine = crate::raft_store::StateMachine::of(&log);
    let raft = Raft::new(id, config, network, log, state_machine).await?;
    service.insert(partition, raft.clone());
    Ok(raft)
}
