//! Routing in a cluster: a user's mailbox lives on its partition's leader, and any node
//! accepts that user's publishes and devices.
//!
//! - A publish (or a devices query) on another node is sent to the leader over the peer
//!   transport and answered there; a transient refusal (no leader yet, leadership moved,
//!   mailbox restarted) is retried with the same id until [`ROUTE_RETRY_FOR`] runs out.
//! - A device connected to another node subscribes remotely: the leader runs a
//!   [`RemoteSubscriber`] (a stand-in session) that forwards deliveries to the device's node
//!   in order, one batch at a time, and acks come back the other way. When the leader's
//!   mailbox stops (leadership moved, crash) the stand-in says `closed` and the device's
//!   session subscribes again from its cursor, wherever the leader is now; the client's
//!   connection stays open.
//!
//! Which node leads a partition is the [`Router`]'s answer (the node's consensus state).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ractor::ActorRef;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use warbler_cluster::wire::{
    AckManyReq, DeliverManyReq, DeliverReq, DeviceCursor, KeyReq, PeerKind, PublishBatchReq,
    PublishReq, Resume, SubscribeReq, Subscribed,
};
use warbler_cluster::{Leader, PeerError, PeerTransport, Router, RpcCode};
use warbler_storage::PartitionId;

use crate::error::MailboxError;
use crate::msg::{DeviceInfo, SessionMsg, SubscribeInfo};
use crate::outbox::{SessionRef, Signal};

/// How long a routed request keeps retrying transient refusals (a leader election takes
/// one to three seconds).
pub const ROUTE_RETRY_FOR: Duration = Duration::from_secs(15);
/// Longest wait for one routed call (a publish waits for a majority's fsync).
pub(crate) const ROUTE_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait before a routed request tries again after a transient refusal.
const RETRY_FIRST: Duration = Duration::from_millis(20);
/// Longest wait between a routed request's tries (unless a leader change ends it sooner).
const RETRY_MAX: Duration = Duration::from_millis(500);

pub(crate) type Wire<T> = Result<T, MailboxError>;

/// Most acks one [`PeerKind::AckMany`] request carries (about 20 bytes each on the wire);
/// more wait for the next request.
const ACKS_PER_REQUEST_MAX: usize = 4096;

/// The acks waiting to go to one node. While a request to that node is out, the acks of
/// every session for it gather here and go together in the next one: one request per
/// round trip however many devices ack, and one per ack when they are few.
#[derive(Default)]
struct AckQueue {
    /// Subscription key → (seq, its session). Acks are cumulative: a session's later ack
    /// replaces its earlier one, so the queue holds at most one entry per remote session.
    pending: HashMap<u64, (u64, SessionRef)>,
    /// A task is sending this queue.
    sending: bool,
}

type AckQueues = Arc<Mutex<HashMap<SocketAddr, AckQueue>>>;

/// Longest wait for one [`PeerKind::DeliverMany`] request.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of messages one [`PeerKind::DeliverMany`] request carries (one stand-in's
/// batch larger than this goes alone; a stand-in cuts its batches at 2 MiB): far below
/// the peer frame limit.
const DELIVER_MANY_BYTES_MAX: usize = 4 << 20;

/// What a stand-in's delivery came to, with its batch back (to retry without a copy).
type Delivered = (DeliverReq, Result<(), MailboxError>);

/// One stand-in's delivery batch waiting to go, and where its answer goes.
struct PendingDelivery {
    req: DeliverReq,
    bytes: usize,
    answer: oneshot::Sender<Delivered>,
}

/// The delivery batches waiting to go to one node, as [`AckQueue`] for acks: while a
/// request to the node is out, the next batches of every stand-in for it gather and go
/// together. A stand-in sends its next batch only once this one is answered, so the queue
/// holds at most one batch per stand-in and each session's batches arrive in order.
#[derive(Default)]
struct DeliverQueue {
    pending: VecDeque<PendingDelivery>,
    sending: bool,
}

type DeliverQueues = Arc<Mutex<HashMap<SocketAddr, DeliverQueue>>>;

/// Most bytes of message bodies one [`PeerKind::PublishBatch`] request carries (a larger
/// publish goes alone): far below the peer frame limit, and small enough that a batch holds
/// the link (and the heartbeats behind it) for well under a millisecond.
const PUBLISH_BATCH_BYTES_MAX: usize = 1 << 20;
/// Most publishes one [`PeerKind::PublishBatch`] request carries.
const PUBLISHES_PER_REQUEST_MAX: usize = 1024;

/// A publish waiting to be forwarded, and where its answer goes.
struct PendingForward {
    req: PublishReq,
    answer: oneshot::Sender<Wire<u64>>,
}

/// The publishes waiting to go to one leader. The first publish for it starts a sender
/// task; whatever else is queued by the time that task runs (the rest of a connection's
/// pipelined frames, other connections' publishes) goes in the same request. The sender does
/// not wait for answers: a request is queued on the link, in order, as soon as it is taken,
/// so batching adds no round trip, and a leader takes a connection's publishes in the order
/// they were sent.
#[derive(Default)]
struct ForwardQueue {
    pending: VecDeque<PendingForward>,
}

type ForwardQueues = Arc<Mutex<HashMap<SocketAddr, ForwardQueue>>>;

/// A local session subscribed to a mailbox on another node.
struct RemoteSub {
    partition: PartitionId,
    session: SessionRef,
}

/// The node's routing state. One per node, shared by the gateway's [`Mailboxes`] handle.
pub struct Routing {
    pub router: Arc<dyn Router>,
    /// This node's name, as peers know it (the transport's hello).
    me: String,
    /// This node's peer transport address, where leaders send deliveries.
    reply_to: SocketAddr,
    transport: OnceLock<Arc<PeerTransport>>,
    next_key: AtomicU64,
    remote_subs: Mutex<HashMap<u64, RemoteSub>>,
    /// Stand-ins on this node for sessions elsewhere: (peer name, key) → stand-in.
    pub(crate) stand_ins: Mutex<HashMap<(String, u64), ActorRef<SessionMsg>>>,
    /// Devices' acks on their way to the stand-ins on other nodes, per node.
    acks: AckQueues,
    /// Stand-ins' delivery batches on their way to sessions on other nodes, per node.
    deliveries: DeliverQueues,
    /// Publishes on their way to their partitions' leaders, per node.
    forwards: ForwardQueues,
    /// Counts the leader changes this node has seen: a routed request waiting out a
    /// transient refusal tries again as soon as one comes ([`Routing::leader_changed`]).
    leader_moves: watch::Sender<u64>,
}

impl Routing {
    pub fn new(router: Arc<dyn Router>, me: String, reply_to: SocketAddr) -> Routing {
        // Keys start at a per-start random point so a restarted node's keys never match
        // stand-ins its previous run left on a leader.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Routing {
            router,
            me,
            reply_to,
            transport: OnceLock::new(),
            next_key: AtomicU64::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            remote_subs: Mutex::default(),
            stand_ins: Mutex::default(),
            acks: AckQueues::default(),
            deliveries: DeliverQueues::default(),
            forwards: ForwardQueues::default(),
            leader_moves: watch::Sender::new(0),
        }
    }

    /// Connects the routing layer to the node's transport (set once, after it started).
    pub fn set_transport(&self, transport: Arc<PeerTransport>) {
        let _ = self.transport.set(transport);
    }

    pub fn name(&self) -> &str {
        &self.me
    }

    pub(crate) async fn call<R: Serialize, T: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        partition: PartitionId,
        kind: PeerKind,
        req: &R,
        timeout: Duration,
    ) -> Result<T, MailboxError> {
        self.clone_handle()
            .call(addr, partition, kind, req, timeout)
            .await
    }

    /// Runs `local` on this node or sends `req` to the partition's leader, retrying
    /// transient refusals until [`ROUTE_RETRY_FOR`] runs out. Between tries it waits
    /// [`RETRY_FIRST`], doubling up to [`RETRY_MAX`], or until a partition's leader changes:
    /// after a failover the request goes to the new leader as soon as this node learns of
    /// it, not at the end of a wait that began during the election.
    pub(crate) async fn on_leader<R, T, F, Fut>(
        &self,
        partition: PartitionId,
        kind: PeerKind,
        req: &R,
        local: F,
    ) -> Result<T, MailboxError>
    where
        R: Serialize,
        T: DeserializeOwned,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, MailboxError>>,
    {
        let give_up = Instant::now() + ROUTE_RETRY_FOR;
        let mut delay = RETRY_FIRST;
        let mut moves = self.leader_moves.subscribe();
        loop {
            let result = match self.router.leader(partition) {
                Leader::Local => local().await,
                Leader::Remote { addr, .. } => {
                    let r = self
                        .call(addr, partition, kind, req, ROUTE_CALL_TIMEOUT)
                        .await;
                    self.correct_route(partition, &r);
                    r
                }
                Leader::Unknown(why) => Err(MailboxError::NoLeader(why)),
            };
            match result {
                Err(e) if e.is_transient() && Instant::now() < give_up => {
                    metrics::counter!("warbler_route_retries_total").increment(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => delay = (delay * 2).min(RETRY_MAX),
                        // A new leader may not take writes at once: retry quickly again.
                        _ = moves.changed() => delay = RETRY_FIRST,
                    }
                }
                r => return r,
            }
        }
    }

    /// Tells the router what a call to the node it named as leader answered.
    pub(crate) fn correct_route<T>(&self, partition: PartitionId, r: &Result<T, MailboxError>) {
        match r {
            Err(MailboxError::Redirect(leader)) => self.router.redirected(partition, Some(leader)),
            Err(MailboxError::NoLeader(_)) => self.router.redirected(partition, None),
            _ => {}
        }
    }

    /// Subscribes a local session to `user`'s mailbox on the node at `addr`.
    pub(crate) async fn subscribe_remote(
        &self,
        addr: SocketAddr,
        partition: PartitionId,
        user: &str,
        device: &str,
        session: SessionRef,
        resume: Option<(u64, u64)>,
    ) -> Result<(u64, SubscribeInfo), MailboxError> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        // Registered before the call: the first delivery may overtake the answer.
        self.remote_subs
            .lock()
            .unwrap()
            .insert(key, RemoteSub { partition, session });
        let req = SubscribeReq {
            user: user.to_string(),
            device: device.to_string(),
            key,
            resume: resume.map(Resume::from),
            reply_to: self.reply_to,
        };
        let answer = self
            .call::<_, Subscribed>(
                addr,
                partition,
                PeerKind::Subscribe,
                &req,
                ROUTE_CALL_TIMEOUT,
            )
            .await;
        self.correct_route(partition, &answer);
        match answer {
            Ok(s) => Ok((
                key,
                SubscribeInfo {
                    acked: s.acked,
                    last_seq: s.last_seq,
                },
            )),
            Err(e) => {
                self.remote_subs.lock().unwrap().remove(&key);
                Err(e)
            }
        }
    }

    /// Forwards a device's cumulative ack to its stand-in on the node at `addr`, together
    /// with the other acks for that node ([`AckQueue`]); a failure asks the session to
    /// subscribe again.
    pub(crate) fn ack_remote(&self, addr: SocketAddr, key: u64, seq: u64) {
        let Some((_, session)) = self.remote_sub(key) else {
            return;
        };
        let mut queues = self.acks.lock().unwrap();
        let queue = queues.entry(addr).or_default();
        let entry = queue.pending.entry(key).or_insert((seq, session));
        entry.0 = entry.0.max(seq);
        if !queue.sending {
            queue.sending = true;
            tokio::spawn(send_acks(self.clone_handle(), self.acks.clone(), addr));
        }
    }

    /// Forwards a publish to the leader at `addr`, together with the other publishes waiting
    /// for that node ([`ForwardQueue`]). The publish is queued when this is called, not when
    /// the answer is awaited: publishes queued one after another reach the leader in that
    /// order. `Unsupported` when the leader runs a release without [`PeerKind::PublishBatch`].
    pub(crate) fn publish_batched(
        &self,
        addr: SocketAddr,
        req: PublishReq,
    ) -> impl Future<Output = Wire<u64>> + Send + 'static {
        let (answer, answered) = oneshot::channel();
        {
            let mut queues = self.forwards.lock().unwrap();
            let start = !queues.contains_key(&addr);
            queues
                .entry(addr)
                .or_default()
                .pending
                .push_back(PendingForward { req, answer });
            if start {
                tokio::spawn(send_forwards(
                    self.clone_handle(),
                    self.forwards.clone(),
                    addr,
                ));
            }
        }
        async move {
            answered.await.unwrap_or_else(|_| {
                Err(MailboxError::NoLeader(
                    "the publish sender stopped before the leader answered".into(),
                ))
            })
        }
    }

    /// Sends a stand-in's delivery batch to its session on the node at `addr`, together
    /// with the other stand-ins' batches waiting for that node ([`DeliverQueue`]). Answers
    /// once the session took it; `Restarted` when the session is gone, `NoLeader` when the
    /// link failed (worth retrying, with the batch given back).
    pub(crate) async fn deliver(
        &self,
        addr: SocketAddr,
        req: DeliverReq,
    ) -> Result<(), (MailboxError, Option<DeliverReq>)> {
        let bytes = req
            .batch
            .iter()
            .map(|d| crate::stand_in::delivery_bytes(&d.message))
            .sum();
        let (answer, answered) = oneshot::channel();
        {
            let mut queues = self.deliveries.lock().unwrap();
            let queue = queues.entry(addr).or_default();
            queue
                .pending
                .push_back(PendingDelivery { req, bytes, answer });
            if !queue.sending {
                queue.sending = true;
                tokio::spawn(send_deliveries(
                    self.clone_handle(),
                    self.deliveries.clone(),
                    addr,
                ));
            }
        }
        match answered.await {
            Ok((_, Ok(()))) => Ok(()),
            Ok((req, Err(e))) => Err((e, Some(req))),
            Err(_) => Err((
                MailboxError::Unavailable("the delivery sender stopped".into()),
                None,
            )),
        }
    }

    /// Ends a remote subscription (the session stops or subscribes elsewhere). It carries
    /// the session's last ack, `acked`: the ack's own call may arrive after it.
    pub(crate) fn unsubscribe_remote(&self, addr: SocketAddr, key: u64, acked: u64) {
        let Some(sub) = self.remote_subs.lock().unwrap().remove(&key) else {
            return;
        };
        let routing = self.clone_handle();
        let body = KeyReq {
            key,
            seq: acked,
            replaced: false,
        };
        tokio::spawn(async move {
            let _: Result<(), MailboxError> = routing
                .call(
                    addr,
                    sub.partition,
                    PeerKind::Unsubscribe,
                    &body,
                    ROUTE_CALL_TIMEOUT,
                )
                .await;
        });
    }

    pub(crate) fn remote_sub(&self, key: u64) -> Option<(PartitionId, SessionRef)> {
        self.remote_subs
            .lock()
            .unwrap()
            .get(&key)
            .map(|s| (s.partition, s.session.clone()))
    }

    /// The leader of `partition` may have changed: sessions subscribed remotely check
    /// whether they follow the current one, and routed requests waiting to try again
    /// ([`Routing::on_leader`]) try now.
    pub fn leader_changed(&self, partition: PartitionId) {
        self.leader_moves.send_modify(|n| *n += 1);
        for s in self.remote_subs.lock().unwrap().values() {
            if s.partition == partition {
                s.session.signal(Signal::CheckRoute);
            }
        }
    }

    /// Sessions on this node subscribed to a mailbox elsewhere, and stand-ins on this node
    /// for sessions elsewhere.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.remote_subs.lock().unwrap().len(),
            self.stand_ins.lock().unwrap().len(),
        )
    }

    /// What a spawned task needs to make a call.
    pub(crate) fn clone_handle(&self) -> RoutingRef {
        RoutingRef {
            transport: self.transport.get().cloned(),
        }
    }
}

/// What a spawned task needs to make a call.
#[derive(Clone)]
pub(crate) struct RoutingRef {
    transport: Option<Arc<PeerTransport>>,
}

impl RoutingRef {
    pub(crate) async fn call<R: Serialize, T: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        partition: PartitionId,
        kind: PeerKind,
        req: &R,
        timeout: Duration,
    ) -> Result<T, MailboxError> {
        let transport = self
            .transport
            .as_ref()
            .ok_or_else(|| MailboxError::NoLeader("the peer transport is not up yet".into()))?;
        let body = rmp_serde::to_vec_named(req).expect("routing requests serialize");
        let bytes = transport
            .call(addr, partition, kind, body, timeout)
            .await
            .map_err(|e| match e {
                PeerError::UnknownKind(_) => MailboxError::Unsupported(e.to_string()),
                PeerError::Remote { ref error, .. } if error.code == RpcCode::UnknownKind => {
                    MailboxError::Unsupported(e.to_string())
                }
                e => MailboxError::NoLeader(e.to_string()),
            })?;
        let answer: Wire<T> = rmp_serde::from_slice(&bytes).map_err(|e| {
            MailboxError::Unavailable(format!("undecodable answer from {addr}: {e}"))
        })?;
        answer
    }
}

/// Takes the next request's worth from the queue for `addr` with `take`. `None` once it is
/// empty: the queue is removed then, under the same lock, so the next item for `addr`
/// starts a new sender.
fn next_batch<Q, T>(
    queues: &Mutex<HashMap<SocketAddr, Q>>,
    addr: SocketAddr,
    take: impl FnOnce(&mut Q) -> Vec<T>,
) -> Option<Vec<T>> {
    let mut all = queues.lock().unwrap();
    let batch = take(all.get_mut(&addr)?);
    if batch.is_empty() {
        all.remove(&addr);
        return None;
    }
    Some(batch)
}

/// How many of `pending`, from the front, go in one request: at most `count`, and at most
/// `bytes` by `size`, but always the first one.
fn fitting<T>(
    pending: &VecDeque<T>,
    count: usize,
    bytes: usize,
    size: impl Fn(&T) -> usize,
) -> usize {
    let (mut n, mut taken) = (0, 0);
    for p in pending {
        if n == count || (n > 0 && taken + size(p) > bytes) {
            break;
        }
        taken += size(p);
        n += 1;
    }
    n
}

/// Sends the acks gathered for the node at `addr`, one request at a time, until none are
/// left. A session whose ack did not arrive (its stand-in is gone, or the request failed)
/// subscribes again from its cursor.
async fn send_acks(routing: RoutingRef, queues: AckQueues, addr: SocketAddr) {
    loop {
        let Some(batch) = next_batch(&queues, addr, |queue: &mut AckQueue| {
            let keys: Vec<u64> = queue
                .pending
                .keys()
                .take(ACKS_PER_REQUEST_MAX)
                .copied()
                .collect();
            keys.into_iter()
                .filter_map(|k| queue.pending.remove(&k).map(|(seq, s)| (k, seq, s)))
                .collect()
        }) else {
            return;
        };
        let req = AckManyReq {
            acks: batch.iter().map(|(key, seq, _)| (*key, *seq)).collect(),
        };
        let answer: Result<Vec<u64>, MailboxError> = routing
            .call(addr, 0, PeerKind::AckMany, &req, ROUTE_CALL_TIMEOUT)
            .await;
        match answer {
            Ok(gone) => {
                let gone: HashSet<u64> = gone.into_iter().collect();
                for (_, _, session) in batch.iter().filter(|(k, _, _)| gone.contains(k)) {
                    session.signal(Signal::Resubscribe);
                }
            }
            // A node of the previous release knows one ack per request.
            Err(MailboxError::Unsupported(_)) => {
                for (key, seq, session) in batch {
                    let routing = routing.clone();
                    tokio::spawn(async move {
                        let body = KeyReq {
                            key,
                            seq,
                            replaced: false,
                        };
                        let r: Result<(), MailboxError> = routing
                            .call(addr, 0, PeerKind::Ack, &body, ROUTE_CALL_TIMEOUT)
                            .await;
                        if r.is_err() {
                            session.signal(Signal::Resubscribe);
                        }
                    });
                }
            }
            Err(_) => {
                for (_, _, session) in batch {
                    session.signal(Signal::Resubscribe);
                }
            }
        }
    }
}

/// Sends the delivery batches gathered for the node at `addr`, one request at a time,
/// until none are left, and answers each stand-in.
async fn send_deliveries(routing: RoutingRef, queues: DeliverQueues, addr: SocketAddr) {
    loop {
        let Some(batch) = next_batch(&queues, addr, |queue: &mut DeliverQueue| {
            let n = fitting(&queue.pending, usize::MAX, DELIVER_MANY_BYTES_MAX, |p| {
                p.bytes
            });
            queue.pending.drain(..n).collect()
        }) else {
            return;
        };
        let (batches, answers): (Vec<DeliverReq>, Vec<_>) =
            batch.into_iter().map(|p| (p.req, p.answer)).unzip();
        let req = DeliverManyReq { batches };
        let answer: Result<Vec<u64>, MailboxError> = routing
            .call(addr, 0, PeerKind::DeliverMany, &req, DELIVER_TIMEOUT)
            .await;
        match answer {
            Ok(gone) => {
                for (r, answer) in req.batches.into_iter().zip(answers) {
                    let taken = if gone.contains(&r.key) {
                        Err(MailboxError::Restarted)
                    } else {
                        Ok(())
                    };
                    let _ = answer.send((r, taken));
                }
            }
            // A node of the previous release takes one batch per request.
            Err(MailboxError::Unsupported(_)) => {
                for (r, answer) in req.batches.into_iter().zip(answers) {
                    let routing = routing.clone();
                    tokio::spawn(async move {
                        let taken = routing
                            .call(addr, 0, PeerKind::Deliver, &r, DELIVER_TIMEOUT)
                            .await;
                        let _ = answer.send((r, taken));
                    });
                }
            }
            Err(e) => {
                for (r, answer) in req.batches.into_iter().zip(answers) {
                    let _ = answer.send((r, Err(e.clone())));
                }
            }
        }
    }
}

/// Sends the publishes gathered for the leader at `addr`, one request per look at the
/// queue, until none are left. Each request is queued on the link before the next is
/// taken; its answers are awaited on a task of their own.
async fn send_forwards(routing: RoutingRef, queues: ForwardQueues, addr: SocketAddr) {
    loop {
        let Some(batch) = next_batch(&queues, addr, |queue: &mut ForwardQueue| {
            let n = fitting(
                &queue.pending,
                PUBLISHES_PER_REQUEST_MAX,
                PUBLISH_BATCH_BYTES_MAX,
                |p| p.req.body.len(),
            );
            queue.pending.drain(..n).collect()
        }) else {
            return;
        };
        let (publishes, answers): (Vec<PublishReq>, Vec<_>) =
            batch.into_iter().map(|p| (p.req, p.answer)).unzip();
        let req = PublishBatchReq { publishes };
        let routing = routing.clone();
        let mut answered = Box::pin(async move {
            let answer: Wire<Vec<Wire<u64>>> = routing
                .call(addr, 0, PeerKind::PublishBatch, &req, ROUTE_CALL_TIMEOUT)
                .await;
            match answer {
                Ok(each) if each.len() == answers.len() => {
                    for (r, answer) in each.into_iter().zip(answers) {
                        let _ = answer.send(r);
                    }
                }
                Ok(each) => {
                    let e = MailboxError::Unavailable(format!(
                        "{addr} answered {} of {} forwarded publishes",
                        each.len(),
                        answers.len()
                    ));
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            }
        });
        // Run it up to its first wait now: that queues the request on the link, ahead of
        // the next batch's.
        let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
        if answered.as_mut().poll(noop).is_pending() {
            tokio::spawn(answered);
        }
    }
}

/// A `devices` answer from the user's leader.
pub(crate) fn devices_from_wire(v: Vec<DeviceCursor>) -> Vec<DeviceInfo> {
    v.into_iter()
        .map(|d| DeviceInfo {
            device: d.device,
            acked: d.acked,
            online: d.online,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;
    use warbler_cluster::transport::BoxFuture;
    use warbler_cluster::wire::Delivery;
    use warbler_cluster::{PeerHandler, RpcError};
    use warbler_storage::StoredMessage;

    struct NoLeaders;

    impl Router for NoLeaders {
        fn leader(&self, _: PartitionId) -> Leader {
            Leader::Unknown("no partitions in this test".into())
        }
    }

    /// A router whose partitions have no leader until `elected` is set, then lead here.
    #[derive(Default)]
    struct Election {
        elected: std::sync::atomic::AtomicBool,
    }

    impl Router for Election {
        fn leader(&self, _: PartitionId) -> Leader {
            if self.elected.load(Ordering::Relaxed) {
                Leader::Local
            } else {
                Leader::Unknown("an election is running".into())
            }
        }
    }

    /// A routed request that waits out an election tries again as soon as the node learns
    /// of the new leader. Its waits had grown to 320 ms by then: without the wake-up it
    /// would go 420 ms later (at 1,120 ms), when the next wait ends. Tokio's clock is
    /// paused, so the times are exact.
    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_for_a_leader_goes_when_one_is_elected() {
        let router = Arc::new(Election::default());
        let addr = "127.0.0.1:1".parse().unwrap();
        let routing = Arc::new(Routing::new(router.clone(), "here".into(), addr));
        let start = tokio::time::Instant::now();
        let request = {
            let routing = routing.clone();
            tokio::spawn(async move {
                let answer: Result<u64, MailboxError> = routing
                    .on_leader(3, PeerKind::Publish, &(), || async { Ok(7) })
                    .await;
                (answer, tokio::time::Instant::now())
            })
        };
        // Tries at 0, 20, 60, 140, 300 and 620 ms were refused; the next would be at 1,120.
        tokio::time::sleep(Duration::from_millis(700)).await;
        router.elected.store(true, Ordering::Relaxed);
        routing.leader_changed(3);
        let (answer, at) = request.await.unwrap();
        assert_eq!(answer.unwrap(), 7);
        let waited = at - start;
        assert!(
            waited < Duration::from_millis(710),
            "the request went {waited:?} after it started; the leader was known at 700 ms"
        );
    }

    /// What a node was sent: (kind, the keys it carried).
    type Seen = Arc<Mutex<Vec<(PeerKind, Vec<u64>)>>>;

    /// A session's node. Its only session has key 1; `previous_release` refuses the
    /// batched kinds as unknown, as a node of the previous release does. Records what it
    /// was sent: (kind, keys).
    struct SessionNode {
        previous_release: bool,
        seen: Seen,
    }

    impl PeerHandler for SessionNode {
        fn handle(
            &self,
            _from: String,
            _partition: u16,
            kind: PeerKind,
            body: Vec<u8>,
        ) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
            let (seen, previous_release) = (self.seen.clone(), self.previous_release);
            Box::pin(async move {
                let answer = match kind {
                    PeerKind::Deliver => {
                        let r: DeliverReq = rmp_serde::from_slice(&body).unwrap();
                        seen.lock().unwrap().push((kind, vec![r.key]));
                        let taken: Wire<()> = if r.key == 1 {
                            Ok(())
                        } else {
                            Err(MailboxError::Restarted)
                        };
                        rmp_serde::to_vec_named(&taken)
                    }
                    PeerKind::DeliverMany if !previous_release => {
                        let r: DeliverManyReq = rmp_serde::from_slice(&body).unwrap();
                        let keys: Vec<u64> = r.batches.iter().map(|b| b.key).collect();
                        seen.lock().unwrap().push((kind, keys.clone()));
                        let gone: Wire<Vec<u64>> =
                            Ok(keys.into_iter().filter(|k| *k != 1).collect());
                        rmp_serde::to_vec_named(&gone)
                    }
                    other => {
                        return Err(RpcError::new(
                            RpcCode::UnknownKind,
                            format!("{other:?} is unknown here"),
                        ))
                    }
                };
                Ok(answer.unwrap())
            })
        }
    }

    /// A node served by `there`, and this node's routing (served by `here`) with a
    /// transport to it; the other node's transport is returned to keep it running.
    async fn routing_to(
        there: impl PeerHandler,
        here: impl PeerHandler,
    ) -> (Routing, PeerTransport, SocketAddr) {
        let local = "127.0.0.1:0".parse().unwrap();
        let there = PeerTransport::start("there", local, None, Arc::new(there))
            .await
            .unwrap();
        let here = PeerTransport::start("here", local, None, Arc::new(here))
            .await
            .unwrap();
        let routing = Routing::new(Arc::new(NoLeaders), "here".into(), here.local_addr());
        routing.set_transport(Arc::new(here));
        let addr = there.local_addr();
        (routing, there, addr)
    }

    fn batch(key: u64, seq: u64) -> DeliverReq {
        DeliverReq {
            key,
            batch: vec![Delivery {
                seq,
                message: StoredMessage {
                    id: format!("m{seq}"),
                    ts: 1,
                    from: None,
                    body: ByteBuf::from(vec![7; 100]),
                },
            }],
        }
    }

    /// Delivery batches of two stand-ins to one node: the session that is there takes its
    /// batch, the one that is gone is answered `Restarted` with its batch given back. A node
    /// of the previous release gets one `Deliver` per batch instead, with the same answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_deliveries_are_answered_per_session_and_fall_back_for_a_previous_release() {
        for previous_release in [false, true] {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let node = SessionNode {
                previous_release,
                seen: seen.clone(),
            };
            let refuse_all = SessionNode {
                previous_release: true,
                seen: Arc::default(),
            };
            let (routing, _there, addr) = routing_to(node, refuse_all).await;
            let (kept, gone) = tokio::join!(
                routing.deliver(addr, batch(1, 5)),
                routing.deliver(addr, batch(2, 9))
            );
            assert!(kept.is_ok(), "{kept:?}");
            match gone {
                Err((MailboxError::Restarted, Some(back))) => assert_eq!(back, batch(2, 9)),
                other => panic!("the gone session's batch: {other:?}"),
            }
            let seen = seen.lock().unwrap().clone();
            let mut keys: Vec<u64> = seen.iter().flat_map(|(_, k)| k.clone()).collect();
            keys.sort_unstable();
            assert_eq!(keys, [1, 2], "each batch sent once: {seen:?}");
            let wanted = if previous_release {
                PeerKind::Deliver
            } else {
                PeerKind::DeliverMany
            };
            assert!(seen.iter().all(|(k, _)| *k == wanted), "{seen:?}");
        }
    }

    /// What a leader was sent: the ids of each [`PeerKind::PublishBatch`] request, in order.
    type Batches = Arc<Mutex<Vec<Vec<String>>>>;

    /// A partitions' leader: answers publish `m<n>` with seq `n + 1`, and refuses users
    /// named `moved` with a redirect. `previous_release` knows no batches.
    struct LeaderNode {
        previous_release: bool,
        seen: Batches,
    }

    impl PeerHandler for LeaderNode {
        fn handle(
            &self,
            _from: String,
            _partition: u16,
            kind: PeerKind,
            body: Vec<u8>,
        ) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
            let (seen, previous_release) = (self.seen.clone(), self.previous_release);
            Box::pin(async move {
                if kind != PeerKind::PublishBatch || previous_release {
                    return Err(RpcError::new(
                        RpcCode::UnknownKind,
                        format!("{kind:?} is unknown here"),
                    ));
                }
                let r: PublishBatchReq = rmp_serde::from_slice(&body).unwrap();
                seen.lock()
                    .unwrap()
                    .push(r.publishes.iter().map(|p| p.id.clone()).collect());
                let each: Vec<Wire<u64>> = r
                    .publishes
                    .iter()
                    .map(|p| match p.user.as_str() {
                        "moved" => Err(MailboxError::Redirect("n9".into())),
                        _ => Ok(p.id[1..].parse::<u64>().unwrap() + 1),
                    })
                    .collect();
                Ok(rmp_serde::to_vec_named(&Ok::<_, MailboxError>(each)).unwrap())
            })
        }
    }

    fn publish(n: usize, user: &str, bytes: usize) -> PublishReq {
        PublishReq {
            user: user.into(),
            id: format!("m{n}"),
            body: ByteBuf::from(vec![7; bytes]),
            from: None,
            after: None,
        }
    }

    /// Publishes queued for one leader before its sender runs go in one request, in the
    /// order they were queued, and each caller gets its own answer; bodies past the byte cap
    /// split the requests, still in order; a leader of the previous release answers
    /// `Unsupported` (the caller then sends single publishes). On one thread, so that the
    /// sender runs only once everything is queued.
    #[tokio::test]
    async fn forwarded_publishes_go_together_in_order_and_are_answered_each() {
        for previous_release in [false, true] {
            let seen: Batches = Arc::default();
            let node = LeaderNode {
                previous_release,
                seen: seen.clone(),
            };
            let refuse_all = LeaderNode {
                previous_release: true,
                seen: Arc::default(),
            };
            let (routing, _there, addr) = routing_to(node, refuse_all).await;

            let small: Vec<_> = (0..50)
                .map(|n| {
                    let user = if n == 7 { "moved" } else { "u" };
                    routing.publish_batched(addr, publish(n, user, 100))
                })
                .collect();
            let answers = futures::future::join_all(small).await;
            if previous_release {
                assert!(
                    answers
                        .iter()
                        .all(|a| matches!(a, Err(MailboxError::Unsupported(_)))),
                    "{answers:?}"
                );
                assert!(seen.lock().unwrap().is_empty());
                continue;
            }
            for (n, a) in answers.iter().enumerate() {
                match a {
                    Err(MailboxError::Redirect(to)) if n == 7 => assert_eq!(to, "n9"),
                    Ok(seq) if n != 7 => assert_eq!(*seq, n as u64 + 1),
                    other => panic!("publish {n}: {other:?}"),
                }
            }
            let ids: Vec<String> = (0..50).map(|n| format!("m{n}")).collect();
            assert_eq!(*seen.lock().unwrap(), [ids], "one request, in order");

            seen.lock().unwrap().clear();
            let large: Vec<_> = (0..3)
                .map(|n| routing.publish_batched(addr, publish(n, "u", 600 << 10)))
                .chain((3..5).map(|n| routing.publish_batched(addr, publish(n, "u", 100))))
                .collect();
            let answers = futures::future::join_all(large).await;
            let seqs: Vec<u64> = answers.into_iter().map(Result::unwrap).collect();
            assert_eq!(seqs, [1, 2, 3, 4, 5]);
            assert_eq!(
                *seen.lock().unwrap(),
                [vec!["m0"], vec!["m1"], vec!["m2", "m3", "m4"]],
                "a request holds at most 1 MiB of bodies, or one larger publish"
            );
        }
    }
}
