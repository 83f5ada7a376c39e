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

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::sync::oneshot;
use warbler_cluster::transport::BoxFuture;
use warbler_cluster::{PeerHandler, PeerTransport};
use warbler_storage::{PartitionId, StoredMessage};

use crate::error::MailboxError;
use crate::mailbox::{DeviceInfo, MailboxMsg, SubscribeInfo};
use crate::registry::Mailboxes;
use crate::session::SessionMsg;

/// How long a routed request keeps retrying transient refusals (a leader election takes
/// one to three seconds).
pub const ROUTE_RETRY_FOR: Duration = Duration::from_secs(15);
/// Longest wait for one routed call (a publish waits for a majority's fsync).
const ROUTE_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a forwarded delivery may take before the stand-in gives up on the session.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stand-in keeps trying to reach its session's node (a link being dialled again)
/// before it gives the subscription up.
const DELIVER_RETRY_FOR: Duration = Duration::from_secs(10);

/// Peer RPC kinds of the routing layer (consensus uses 1-3).
pub const KIND_PUBLISH: u8 = 10;
pub const KIND_SUBSCRIBE: u8 = 11;
pub const KIND_ACK: u8 = 12;
pub const KIND_UNSUBSCRIBE: u8 = 13;
pub const KIND_DELIVER: u8 = 14;
pub const KIND_CLOSED: u8 = 15;
pub const KIND_DEVICES: u8 = 16;

pub fn is_route_kind(kind: u8) -> bool {
    (KIND_PUBLISH..=KIND_DEVICES).contains(&kind)
}

/// Where a partition's leader is, as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leader {
    Local,
    Remote {
        node: String,
        addr: SocketAddr,
    },
    /// No leader known (an election is running, or the leader's address is unknown).
    Unknown(String),
}

/// Answers which node leads a partition.
pub trait Router: Send + Sync + 'static {
    fn leader(&self, partition: PartitionId) -> Leader;

    /// A node this router named as `partition`'s leader was not: it answered that `leader`
    /// is (a redirect), or, with `None`, it could not be reached or did not know. A router
    /// that only guesses (this node holds no replica of the partition) corrects its guess.
    fn redirected(&self, _partition: PartitionId, _leader: Option<&str>) {}

    /// Whether this node holds a replica of `partition` (so its idea of the leader comes
    /// from consensus, and it may redirect others to it).
    fn is_replica(&self, _partition: PartitionId) -> bool {
        true
    }
}

#[derive(Serialize, Deserialize)]
struct PublishReq {
    user: String,
    id: String,
    body: ByteBuf,
    from: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct UserReq {
    user: String,
}

#[derive(Serialize, Deserialize)]
struct SubscribeReq {
    user: String,
    device: String,
    key: u64,
    resume: Option<(u64, u64)>,
    reply_to: SocketAddr,
}

#[derive(Serialize, Deserialize)]
struct KeyReq {
    key: u64,
    seq: u64,
    replaced: bool,
}

#[derive(Serialize, Deserialize)]
struct DeliverReq {
    key: u64,
    batch: Vec<(u64, StoredMessage)>,
}

type Wire<T> = Result<T, MailboxError>;

/// A local session subscribed to a mailbox on another node.
struct RemoteSub {
    partition: PartitionId,
    session: ActorRef<SessionMsg>,
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
    proxies: Mutex<HashMap<(String, u64), ActorRef<SessionMsg>>>,
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
            proxies: Mutex::default(),
        }
    }

    /// Connects the routing layer to the node's transport (set once, after it started).
    pub fn set_transport(&self, transport: Arc<PeerTransport>) {
        let _ = self.transport.set(transport);
    }

    pub fn name(&self) -> &str {
        &self.me
    }

    async fn call<R: Serialize, T: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        partition: PartitionId,
        kind: u8,
        req: &R,
        timeout: Duration,
    ) -> Result<T, MailboxError> {
        self.clone_handle()
            .call(addr, partition, kind, req, timeout)
            .await
    }

    /// Runs `local` on this node or sends `req` to the partition's leader, retrying
    /// transient refusals until [`ROUTE_RETRY_FOR`] runs out.
    pub(crate) async fn on_leader<R, T, F, Fut>(
        &self,
        partition: PartitionId,
        kind: u8,
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
        let mut delay = Duration::from_millis(20);
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
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                r => return r,
            }
        }
    }

    /// Tells the router what a call to the node it named as leader answered.
    fn correct_route<T>(&self, partition: PartitionId, r: &Result<T, MailboxError>) {
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
        session: ActorRef<SessionMsg>,
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
            resume,
            reply_to: self.reply_to,
        };
        let answer = self
            .call::<_, (u64, u64)>(addr, partition, KIND_SUBSCRIBE, &req, ROUTE_CALL_TIMEOUT)
            .await;
        self.correct_route(partition, &answer);
        match answer {
            Ok((acked, last_seq)) => Ok((key, SubscribeInfo { acked, last_seq })),
            Err(e) => {
                self.remote_subs.lock().unwrap().remove(&key);
                Err(e)
            }
        }
    }

    /// Forwards a device's cumulative ack to its stand-in; a failure asks the session to
    /// subscribe again.
    pub(crate) fn ack_remote(&self, addr: SocketAddr, key: u64, seq: u64) {
        let Some((partition, session)) = self.remote_sub(key) else {
            return;
        };
        let body = KeyReq {
            key,
            seq,
            replaced: false,
        };
        let routing = self.clone_handle();
        tokio::spawn(async move {
            let r: Result<(), MailboxError> = routing
                .call(addr, partition, KIND_ACK, &body, ROUTE_CALL_TIMEOUT)
                .await;
            if r.is_err() {
                let _ = session.cast(SessionMsg::Resubscribe);
            }
        });
    }

    /// Ends a remote subscription (the session stops or subscribes elsewhere).
    pub(crate) fn unsubscribe_remote(&self, addr: SocketAddr, key: u64) {
        let Some(sub) = self.remote_subs.lock().unwrap().remove(&key) else {
            return;
        };
        let routing = self.clone_handle();
        let body = KeyReq {
            key,
            seq: 0,
            replaced: false,
        };
        tokio::spawn(async move {
            let _: Result<(), MailboxError> = routing
                .call(
                    addr,
                    sub.partition,
                    KIND_UNSUBSCRIBE,
                    &body,
                    ROUTE_CALL_TIMEOUT,
                )
                .await;
        });
    }

    fn remote_sub(&self, key: u64) -> Option<(PartitionId, ActorRef<SessionMsg>)> {
        self.remote_subs
            .lock()
            .unwrap()
            .get(&key)
            .map(|s| (s.partition, s.session.clone()))
    }

    /// The leader of `partition` may have changed: sessions subscribed remotely check
    /// whether they follow the current one.
    pub fn leader_changed(&self, partition: PartitionId) {
        for s in self.remote_subs.lock().unwrap().values() {
            if s.partition == partition {
                let _ = s.session.cast(SessionMsg::CheckRoute);
            }
        }
    }

    /// Sessions on this node subscribed to a mailbox elsewhere, and stand-ins on this node
    /// for sessions elsewhere.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.remote_subs.lock().unwrap().len(),
            self.proxies.lock().unwrap().len(),
        )
    }

    /// What a spawned task needs to make a call.
    fn clone_handle(&self) -> RoutingRef {
        RoutingRef {
            transport: self.transport.get().cloned(),
        }
    }
}

/// What a spawned task needs to make a call.
struct RoutingRef {
    transport: Option<Arc<PeerTransport>>,
}

impl RoutingRef {
    async fn call<R: Serialize, T: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        partition: PartitionId,
        kind: u8,
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
            .map_err(|e| MailboxError::NoLeader(e.to_string()))?;
        let answer: Wire<T> = rmp_serde::from_slice(&bytes).map_err(|e| {
            MailboxError::Unavailable(format!("undecodable answer from {addr}: {e}"))
        })?;
        answer
    }
}

/// Serves peers' routed requests on this node.
pub struct RouteService {
    pub mailboxes: Mailboxes,
    pub routing: Arc<Routing>,
}

/// A request sent here because the sender took this node for the leader: when this node
/// does not lead the partition but knows which node does, say so.
fn redirect<T>(routing: &Routing, partition: PartitionId, answer: Wire<T>) -> Wire<T> {
    match answer {
        Err(MailboxError::NoLeader(why)) if routing.router.is_replica(partition) => {
            match routing.router.leader(partition) {
                Leader::Remote { node, .. } => Err(MailboxError::Redirect(node)),
                _ => Err(MailboxError::NoLeader(why)),
            }
        }
        other => other,
    }
}

fn reply<T: Serialize>(v: &Wire<T>) -> Result<Vec<u8>, String> {
    Ok(rmp_serde::to_vec_named(v).expect("routing answers serialize"))
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(body).map_err(|e| format!("cannot decode the routed request: {e}"))
}

impl PeerHandler for RouteService {
    fn handle(
        &self,
        from: String,
        partition: u16,
        kind: u8,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let mailboxes = self.mailboxes.clone();
        let routing = self.routing.clone();
        Box::pin(async move {
            match kind {
                KIND_PUBLISH => {
                    let r: PublishReq = decode(&body)?;
                    let answer = mailboxes
                        .publish_local(&r.user, &r.id, r.body, r.from)
                        .await;
                    reply(&redirect(&routing, partition, answer))
                }
                KIND_DEVICES => {
                    let r: UserReq = decode(&body)?;
                    let devices = mailboxes.devices_local(&r.user).await.map(|d| {
                        d.into_iter()
                            .map(|d| (d.device, d.acked, d.online))
                            .collect::<Vec<_>>()
                    });
                    reply(&redirect(&routing, partition, devices))
                }
                KIND_SUBSCRIBE => {
                    let r: SubscribeReq = decode(&body)?;
                    let answer = start_proxy(mailboxes, routing.clone(), from, partition, r).await;
                    reply(&redirect(&routing, partition, answer))
                }
                KIND_ACK => {
                    let r: KeyReq = decode(&body)?;
                    let proxy = routing.proxies.lock().unwrap().get(&(from, r.key)).cloned();
                    let result = match proxy {
                        Some(p) => p
                            .cast(SessionMsg::ClientAck(r.seq))
                            .map_err(|_| MailboxError::Restarted),
                        None => Err(MailboxError::Restarted),
                    };
                    reply(&result)
                }
                KIND_UNSUBSCRIBE => {
                    let r: KeyReq = decode(&body)?;
                    let proxy = routing.proxies.lock().unwrap().remove(&(from, r.key));
                    if let Some(p) = proxy {
                        p.stop(Some("unsubscribed".into()));
                    }
                    reply(&Ok(()))
                }
                KIND_DELIVER => {
                    let r: DeliverReq = decode(&body)?;
                    let batch = r
                        .batch
                        .into_iter()
                        .map(|(seq, m)| (seq, Arc::new(m)))
                        .collect();
                    let result = match routing.remote_sub(r.key) {
                        Some((_, s)) => s
                            .cast(SessionMsg::Deliver(batch))
                            .map_err(|_| MailboxError::Restarted),
                        None => Err(MailboxError::Restarted),
                    };
                    reply(&result)
                }
                KIND_CLOSED => {
                    let r: KeyReq = decode(&body)?;
                    if let Some((_, s)) = routing.remote_sub(r.key) {
                        let msg = if r.replaced {
                            SessionMsg::Replaced
                        } else {
                            SessionMsg::Resubscribe
                        };
                        let _ = s.cast(msg);
                    }
                    reply(&Ok(()))
                }
                other => Err(format!("unknown routing RPC kind {other}")),
            }
        })
    }
}

/// Starts the stand-in of a remote session; answers (acked, last_seq).
async fn start_proxy(
    mailboxes: Mailboxes,
    routing: Arc<Routing>,
    peer: String,
    partition: PartitionId,
    r: SubscribeReq,
) -> Result<(u64, u64), MailboxError> {
    let (tx, rx) = oneshot::channel();
    let args = ProxyArgs {
        mailboxes,
        routing,
        peer,
        partition,
        user: r.user,
        device: r.device,
        key: r.key,
        reply_to: r.reply_to,
        resume: r.resume,
        info: Some(tx),
    };
    let spawned = Actor::spawn(None, RemoteSubscriber, args).await;
    let info = rx.await.unwrap_or_else(|_| {
        Err(MailboxError::Unavailable(
            "the stand-in did not start".into(),
        ))
    });
    if let Err(e) = spawned {
        return Err(info
            .err()
            .unwrap_or(MailboxError::Unavailable(e.to_string())));
    }
    info.map(|i| (i.acked, i.last_seq))
}

pub struct ProxyArgs {
    mailboxes: Mailboxes,
    routing: Arc<Routing>,
    peer: String,
    partition: PartitionId,
    user: String,
    device: String,
    key: u64,
    reply_to: SocketAddr,
    resume: Option<(u64, u64)>,
    info: Option<oneshot::Sender<Result<SubscribeInfo, MailboxError>>>,
}

pub struct ProxyState {
    args: ProxyArgs,
    mailbox: ActorRef<MailboxMsg>,
}

/// The stand-in, on the leader, of a session on another node: subscribed to the mailbox
/// like a local session, it forwards each delivery batch and waits for it to be taken
/// before the next (so batches arrive in order).
pub struct RemoteSubscriber;

impl Actor for RemoteSubscriber {
    type Msg = SessionMsg;
    type State = ProxyState;
    type Arguments = ProxyArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        mut args: ProxyArgs,
    ) -> Result<ProxyState, ActorProcessingErr> {
        let info = args.info.take().expect("set by start_proxy");
        let subscribed = args
            .mailboxes
            .subscribe_local(&args.user, &args.device, myself.clone(), args.resume)
            .await;
        match subscribed {
            Ok((mailbox, i)) => {
                myself.get_cell().monitor(mailbox.get_cell());
                args.routing
                    .proxies
                    .lock()
                    .unwrap()
                    .insert((args.peer.clone(), args.key), myself.clone());
                let _ = info.send(Ok(i));
                Ok(ProxyState { args, mailbox })
            }
            Err(e) => {
                let _ = info.send(Err(e.clone()));
                Err(e.into())
            }
        }
    }

    async fn post_stop(
        &self,
        myself: ActorRef<SessionMsg>,
        state: &mut ProxyState,
    ) -> Result<(), ActorProcessingErr> {
        let _ = state.mailbox.cast(MailboxMsg::Unsubscribe {
            device: state.args.device.clone(),
            session: myself.get_id(),
        });
        let key = (state.args.peer.clone(), state.args.key);
        let mut proxies = state.args.routing.proxies.lock().unwrap();
        if proxies
            .get(&key)
            .is_some_and(|p| p.get_id() == myself.get_id())
        {
            proxies.remove(&key);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut ProxyState,
    ) -> Result<(), ActorProcessingErr> {
        let a = &state.args;
        match msg {
            SessionMsg::Deliver(batch) => {
                let req = DeliverReq {
                    key: a.key,
                    batch: batch.iter().map(|(s, m)| (*s, (**m).clone())).collect(),
                };
                // A transport failure (the link to the session's node dropped and is being
                // dialled again) is retried: the session is likely still there, and a batch
                // it already took is skipped by its seq. Any other answer means it is gone.
                let give_up = Instant::now() + DELIVER_RETRY_FOR;
                loop {
                    let r: Result<(), MailboxError> = a
                        .routing
                        .call(a.reply_to, a.partition, KIND_DELIVER, &req, DELIVER_TIMEOUT)
                        .await;
                    match r {
                        Ok(()) => break,
                        Err(MailboxError::NoLeader(_)) if Instant::now() < give_up => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(_) => {
                            closed(a, false);
                            myself.stop(Some("the remote session is gone".into()));
                            break;
                        }
                    }
                }
            }
            SessionMsg::ClientAck(seq) => {
                let _ = state.mailbox.cast(MailboxMsg::Ack {
                    device: a.device.clone(),
                    session: myself.get_id(),
                    seq,
                });
            }
            SessionMsg::Replaced => {
                closed(a, true);
                myself.stop(Some("replaced".into()));
            }
            SessionMsg::Resubscribe | SessionMsg::CheckRoute => {}
        }
        Ok(())
    }

    /// The mailbox stopped (leadership moved, crash, shutdown): the session subscribes
    /// again wherever the user's mailbox runs now.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SessionMsg>,
        evt: SupervisionEvent,
        state: &mut ProxyState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorTerminated(cell, _, _)
        | SupervisionEvent::ActorFailed(cell, _) = &evt
        {
            if cell.get_id() == state.mailbox.get_id() {
                closed(&state.args, false);
                myself.stop(Some("mailbox stopped".into()));
            }
        }
        Ok(())
    }
}

/// Tells the remote session its subscription ended.
fn closed(a: &ProxyArgs, replaced: bool) {
    let routing = a.routing.clone_handle();
    let (addr, partition) = (a.reply_to, a.partition);
    let req = KeyReq {
        key: a.key,
        seq: 0,
        replaced,
    };
    tokio::spawn(async move {
        // Retried while the link to the session's node reconnects: a session that never
        // hears of it would wait for deliveries that no longer come.
        let give_up = Instant::now() + DELIVER_RETRY_FOR;
        loop {
            let r: Result<(), MailboxError> = routing
                .call(addr, partition, KIND_CLOSED, &req, ROUTE_CALL_TIMEOUT)
                .await;
            match r {
                Err(MailboxError::NoLeader(_)) if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => return,
            }
        }
    });
}

/// `GET devices` answers travel as (device, acked, online).
pub(crate) fn devices_from_wire(v: Vec<(String, u64, bool)>) -> Vec<DeviceInfo> {
    v.into_iter()
        .map(|(device, acked, online)| DeviceInfo {
            device,
            acked,
            online,
        })
        .collect()
}

pub(crate) fn publish_req(
    user: &str,
    id: &str,
    body: &ByteBuf,
    from: &Option<String>,
) -> impl Serialize {
    PublishReq {
        user: user.to_string(),
        id: id.to_string(),
        body: body.clone(),
        from: from.clone(),
    }
}

pub(crate) fn user_req(user: &str) -> impl Serialize {
    UserReq {
        user: user.to_string(),
    }
}
