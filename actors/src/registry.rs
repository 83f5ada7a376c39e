//! `MailboxRegistry`: the node's map of active mailboxes, and their supervisor.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SupervisionEvent,
};
use serde_bytes::ByteBuf;
use warbler_storage::{PartitionId, PartitionLog, Store};

use crate::error::MailboxError;
use crate::mailbox::{MailboxArgs, MailboxLimits, MailboxState, UserMailbox, WRITE_FAILED};
use crate::msg::{DeviceInfo, MailboxMsg, RegistryMsg, Sleeper, SubscribeInfo, Subscribed};
use crate::outbox::SessionRef;
use crate::routing::Routing;
use warbler_cluster::wire::{DeviceCursor, PeerKind, PublishManyReq, PublishReq, UserReq};
use warbler_cluster::Leader;

/// How often a request is retried when the mailbox it reached stopped under it (idle stop
/// or crash); each retry gets a fresh mailbox from the registry.
const MAILBOX_RETRIES_MAX: u32 = 5;
/// Longest wait for a mailbox's answer: publishes wait for an fsync, which takes
/// milliseconds; seconds mean the disk is stuck.
const MAILBOX_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long subscribing may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RegistryArgs {
    pub store: Store,
    pub log: Arc<dyn PartitionLog>,
    pub limits: MailboxLimits,
    pub partitions: u16,
}

pub struct RegistryState {
    args: RegistryArgs,
    active: HashMap<String, ActorRef<MailboxMsg>>,
    /// Users whose mailbox crashed and has not been started again yet.
    crashed: HashSet<String>,
    /// Users whose mailbox sleeps, with the devices subscribed to it.
    asleep: HashMap<String, Vec<Sleeper>>,
}

pub struct MailboxRegistry;

impl Actor for MailboxRegistry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RegistryMsg>,
        args: RegistryArgs,
    ) -> Result<RegistryState, ActorProcessingErr> {
        Ok(RegistryState {
            args,
            active: HashMap::new(),
            crashed: HashSet::new(),
            asleep: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RegistryMsg>,
        msg: RegistryMsg,
        state: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Get {
                user,
                partition,
                reply,
            } => {
                let _ = reply.send(state.get(&myself, user, partition).await);
            }
            RegistryMsg::Count { reply } => {
                let _ = reply.send(state.active.len());
            }
            RegistryMsg::Subscribe {
                user,
                partition,
                device,
                session,
                reply,
            } => {
                let answer = state
                    .subscribe(&myself, user, partition, device, session)
                    .await;
                let _ = reply.send(answer);
            }
            RegistryMsg::StopPartition { partition } => {
                // Each mailbox decides against its own term: this message may come late,
                // after the node led the partition again and started mailboxes under the
                // new leadership.
                let parts = state.args.partitions;
                for (user, r) in &state.active {
                    if warbler_cluster::partition_of(user, parts) == partition {
                        let _ = r.cast(MailboxMsg::LeaderMoved);
                    }
                }
                // Sleeping ones too: their devices subscribe where the partition is led now.
                state.asleep.retain(|user, subs| {
                    if warbler_cluster::partition_of(user, parts) != partition {
                        return true;
                    }
                    subs.iter().for_each(|s| s.session.mailbox_stopped());
                    false
                });
                state.count_asleep();
            }
            RegistryMsg::Tell { user, msg } => state.tell(user, msg),
            RegistryMsg::Asleep {
                user,
                mailbox,
                subs,
            } => state.asleep(user, mailbox, subs),
        }
        Ok(())
    }

    /// A mailbox that stops or crashes leaves the map; the next request spawns a fresh one
    /// from storage. Never stops the registry itself.
    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<RegistryMsg>,
        evt: SupervisionEvent,
        state: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure, unclean): (ActorCell, Option<String>, bool) = match evt {
            // A mailbox that stopped with writes in flight (a failed write, or leadership
            // moved as it wrote) may see them land after it is gone, so its successor
            // reads its state after a barrier, as after a crash. One stopped idle or asleep
            // had nothing in flight.
            SupervisionEvent::ActorTerminated(cell, last, reason) => {
                let failed_write = reason.is_some_and(|r| r.starts_with(WRITE_FAILED));
                let in_flight = last.is_none_or(|mut s| {
                    s.take::<MailboxState>()
                        .map_or(true, |s| s.stopped_in_flight)
                });
                (cell, None, failed_write || in_flight)
            }
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string()), true),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        let Some(user) = state
            .active
            .iter()
            .find(|(_, r)| r.get_id() == id)
            .map(|(u, _)| u.clone())
        else {
            return Ok(());
        };
        state.active.remove(&user);
        if let Some(err) = failure {
            tracing::error!(%user, error = %err, "mailbox failed; it restarts from storage on next use");
            metrics::counter!("warbler_mailbox_failures_total").increment(1);
        }
        if unclean {
            state.crashed.insert(user);
        }
        Ok(())
    }
}

impl RegistryState {
    fn count_asleep(&self) {
        metrics::gauge!("warbler_mailboxes_asleep").set(self.asleep.len() as f64);
    }

    /// A message for `user`'s mailbox that was not running when it was sent.
    fn tell(&mut self, user: String, msg: MailboxMsg) {
        if let Some(r) = self.active.get(&user) {
            if r.get_status() <= ActorStatus::Running {
                let _ = r.cast(msg);
                return;
            }
        }
        if let MailboxMsg::Unsubscribe { device, session } = msg {
            if let Some(subs) = self.asleep.get_mut(&user) {
                subs.retain(|s| !(s.device == device && s.session.id() == session));
                if subs.is_empty() {
                    self.asleep.remove(&user);
                    self.count_asleep();
                }
            }
        }
    }

    /// `user`'s mailbox went to sleep with `subs` subscribed.
    fn asleep(&mut self, user: String, mailbox: ractor::ActorId, subs: Vec<Sleeper>) {
        match self.active.get(&user) {
            Some(r) if r.get_id() == mailbox => {
                self.active.remove(&user);
            }
            Some(r) if r.get_status() <= ActorStatus::Running => {
                // A request started a new mailbox meanwhile: subscribe to that one.
                subs.iter().for_each(|s| s.session.mailbox_stopped());
                return;
            }
            _ => {}
        }
        for sub in subs {
            // One already there for the device subscribed while the mailbox was going to
            // sleep: it is the newer connection.
            self.add_sleeper(&user, sub, false);
        }
        self.count_asleep();
    }

    /// Adds a device to `user`'s sleeping subscribers. Of two connections of one device,
    /// the newer stays and the other is told it was replaced.
    fn add_sleeper(&mut self, user: &str, sub: Sleeper, newer: bool) {
        let subs = self.asleep.entry(user.to_string()).or_default();
        match subs.iter_mut().find(|s| s.device == sub.device) {
            Some(s) if s.session.id() == sub.session.id() => *s = sub,
            Some(s) if newer => std::mem::replace(s, sub).session.replaced(),
            Some(_) => sub.session.replaced(),
            None => subs.push(sub),
        }
    }

    /// A device subscribes while `user`'s mailbox is not running: see
    /// [`RegistryMsg::Subscribe`].
    async fn subscribe(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        user: String,
        partition: PartitionId,
        device: String,
        session: SessionRef,
    ) -> Result<Subscribed, MailboxError> {
        // Running, or stopping (perhaps failing, with writes in flight): the mailbox path.
        let quiet = !self.active.contains_key(&user)
            && !self.crashed.contains(&user)
            && !self.args.limits.sleep_after.is_zero();
        if quiet {
            if let Some(info) = self
                .join_sleepers(&user, partition, &device, &session)
                .await?
            {
                let sub = Sleeper {
                    device,
                    session,
                    acked: info.acked,
                };
                self.add_sleeper(&user, sub, true);
                self.count_asleep();
                return Ok(Subscribed::Asleep(info));
            }
        }
        self.get(myself, user, partition)
            .await
            .map(Subscribed::Mailbox)
    }

    /// Where `device` stands if it has acknowledged everything stored for `user` (then it
    /// can join the sleeping subscribers); `None` if it has messages to receive. Read as a
    /// starting mailbox reads: on the partition's leader, after its read barrier.
    async fn join_sleepers(
        &self,
        user: &str,
        partition: PartitionId,
        device: &str,
        session: &SessionRef,
    ) -> Result<Option<SubscribeInfo>, MailboxError> {
        let log = &self.args.log;
        if log.leader_term(partition).is_none() {
            return Err(MailboxError::NoLeader(format!(
                "this node does not lead partition {partition}"
            )));
        }
        if log.replicated() && !log.settled(partition) {
            log.barrier(partition)
                .await
                .map_err(|e| MailboxError::NoLeader(e.to_string()))?;
        }
        let unavailable =
            |e: warbler_storage::StorageError| MailboxError::Unavailable(e.to_string());
        let last = self
            .args
            .store
            .last_seq(partition, user)
            .map_err(unavailable)?;
        let acked = self
            .args
            .store
            .cursor(partition, user, device)
            .map_err(unavailable)?;
        if acked < last || session.is_closed() {
            return Ok(None);
        }
        Ok(Some(SubscribeInfo {
            acked,
            last_seq: last,
        }))
    }

    async fn get(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        user: String,
        partition: PartitionId,
    ) -> Result<ActorRef<MailboxMsg>, MailboxError> {
        if let Some(r) = self.active.get(&user) {
            // A mailbox that is starting or running is the user's one writer; never start a
            // second one beside it.
            if r.get_status() <= ActorStatus::Running {
                return Ok(r.clone());
            }
            // Stopping but not yet reported: if it is failing, its writes may be in flight.
            self.active.remove(&user);
            self.crashed.insert(user.clone());
        }
        if self.args.log.leader_term(partition).is_none() {
            return Err(MailboxError::NoLeader(format!(
                "this node does not lead partition {partition}"
            )));
        }
        let sleepers = self.asleep.remove(&user).unwrap_or_default();
        if !sleepers.is_empty() {
            self.count_asleep();
        }
        let woken: Vec<SessionRef> = sleepers.iter().map(|s| s.session.clone()).collect();
        let args = MailboxArgs {
            user: user.clone(),
            partition,
            store: self.args.store.clone(),
            log: self.args.log.clone(),
            limits: self.args.limits,
            after_crash: self.crashed.remove(&user),
            sleepers,
            registry: myself.clone(),
        };
        let (r, _) = Actor::spawn_linked(None, UserMailbox, args, myself.get_cell())
            .await
            .map_err(|e| {
                // Its sleeping devices try again (and wake it) on their own.
                woken.iter().for_each(SessionRef::mailbox_stopped);
                let e = e.to_string();
                if e.contains("partition has no reachable leader") {
                    MailboxError::NoLeader(e)
                } else {
                    MailboxError::Unavailable(format!("cannot start the mailbox of {user}: {e}"))
                }
            })?;
        self.active.insert(user, r.clone());
        Ok(r)
    }
}

/// Mailbox references the gateway keeps to skip the registry round trip; cleared whole
/// when it grows past this (a miss only costs that round trip).
const REF_CACHE_MAX: usize = 100_000;

/// The gateway's handle on the node's mailboxes. Cheap to clone.
///
/// It caches references to running mailboxes. Only the registry spawns mailboxes, so a
/// cached reference is always the user's one writer or a stopped actor; a stopped one is
/// skipped here, and a call that reaches a mailbox as it stops is retried via the registry.
/// A publish handed over by [`Mailboxes::publish_submit`], waiting for its seq.
pub type PendingPublish = std::pin::Pin<Box<dyn Future<Output = Result<u64, MailboxError>> + Send>>;

/// Hands `r` to `mailbox`, running on this node, and returns the wait for its seq; gives
/// `r` back when the mailbox is gone. If the mailbox stops with the publish queued, the wait
/// publishes it anew under the same id with `again`.
fn hand_over(
    mailbox: &ActorRef<MailboxMsg>,
    r: PublishReq,
    again: impl FnOnce(PublishReq) -> PendingPublish + Send + 'static,
) -> Result<PendingPublish, PublishReq> {
    let (tx, rx) = ractor::concurrency::oneshot();
    let msg = MailboxMsg::Publish {
        id: r.id.clone(),
        body: r.body.clone(),
        from: r.from.clone(),
        after: r.after.clone(),
        reply: tx.into(),
    };
    if mailbox.cast(msg).is_err() {
        return Err(r);
    }
    Ok(Box::pin(async move {
        match tokio::time::timeout(MAILBOX_CALL_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => again(r).await,
            Err(_) => Err(MailboxError::Unavailable(
                "the mailbox did not answer in 30 s".into(),
            )),
        }
    }))
}

#[derive(Clone)]
pub struct Mailboxes {
    registry: ActorRef<RegistryMsg>,
    partitions: u16,
    refs: Arc<std::sync::RwLock<HashMap<String, ActorRef<MailboxMsg>>>>,
    /// Set in a cluster: requests for partitions led elsewhere go to their leader.
    route: Option<Arc<Routing>>,
}

impl Mailboxes {
    /// Starts the registry actor.
    pub async fn start(
        args: RegistryArgs,
    ) -> Result<(Mailboxes, JoinHandle<()>), ractor::SpawnErr> {
        let partitions = args.partitions;
        let (registry, handle) = Actor::spawn(None, MailboxRegistry, args).await?;
        Ok((
            Mailboxes {
                registry,
                partitions,
                refs: Arc::default(),
                route: None,
            },
            handle,
        ))
    }

    /// Routes requests for partitions this node does not lead through `routing`.
    pub fn with_routing(mut self, routing: Arc<Routing>) -> Mailboxes {
        self.route = Some(routing);
        self
    }

    pub fn routing(&self) -> Option<&Arc<Routing>> {
        self.route.as_ref()
    }

    /// Where `user`'s mailbox runs: here, unless this node is in a cluster and another
    /// node leads the user's partition.
    pub fn leader_of(&self, user: &str) -> Leader {
        match &self.route {
            None => Leader::Local,
            Some(r) => r.router.leader(self.partition_of(user)),
        }
    }

    /// Gives `msg` to `user`'s mailbox if it runs; if it does not, the registry gives it to
    /// the one running by then, or applies it to the sleeping one's subscribers.
    pub fn tell(&self, user: &str, msg: MailboxMsg) {
        let cached = self.refs.read().unwrap().get(user).cloned();
        let msg = match cached {
            Some(r) if r.get_status() <= ActorStatus::Running => match r.cast(msg) {
                Ok(()) => return,
                Err(ractor::MessagingErr::SendErr(msg)) => msg,
                Err(_) => return,
            },
            _ => msg,
        };
        let _ = self.registry.cast(RegistryMsg::Tell {
            user: user.to_string(),
            msg,
        });
    }

    /// This node stopped leading `partition`: its mailboxes stop, except those started under
    /// a leadership the node holds again by the time they hear of it.
    pub fn stop_partition(&self, partition: PartitionId) {
        let _ = self.registry.cast(RegistryMsg::StopPartition { partition });
    }

    pub fn partition_of(&self, user: &str) -> PartitionId {
        warbler_cluster::partition_of(user, self.partitions)
    }

    /// The running mailbox of `user`.
    pub async fn get(&self, user: &str) -> Result<ActorRef<MailboxMsg>, MailboxError> {
        if let Some(r) = self.refs.read().unwrap().get(user) {
            if r.get_status() <= ActorStatus::Running {
                return Ok(r.clone());
            }
        }
        let r = self.get_from_registry(user).await?;
        self.remember(user, &r);
        Ok(r)
    }

    /// Caches `r` as `user`'s mailbox.
    fn remember(&self, user: &str, r: &ActorRef<MailboxMsg>) {
        let mut refs = self.refs.write().unwrap();
        if refs.len() >= REF_CACHE_MAX {
            refs.clear();
        }
        refs.insert(user.to_string(), r.clone());
    }

    async fn get_from_registry(&self, user: &str) -> Result<ActorRef<MailboxMsg>, MailboxError> {
        let partition = self.partition_of(user);
        match self
            .registry
            .call(
                |reply| RegistryMsg::Get {
                    user: user.to_string(),
                    partition,
                    reply,
                },
                Some(MAILBOX_CALL_TIMEOUT),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(MailboxError::ShuttingDown),
        }
    }

    /// Calls `user`'s mailbox, retrying on a fresh mailbox if the one reached stopped.
    async fn call<T: Send + 'static>(
        &self,
        user: &str,
        make: impl Fn(RpcReplyPort<T>) -> MailboxMsg,
    ) -> Result<T, MailboxError> {
        for attempt in 0..MAILBOX_RETRIES_MAX {
            let mailbox = self.get(user).await?;
            match mailbox.call(&make, Some(MAILBOX_CALL_TIMEOUT)).await {
                Ok(ractor::rpc::CallResult::Success(v)) => return Ok(v),
                Ok(ractor::rpc::CallResult::Timeout) => {
                    return Err(MailboxError::Unavailable(
                        "the mailbox did not answer in 30 s".into(),
                    ))
                }
                // The mailbox stopped (idle) or crashed with our request queued.
                _ => tokio::time::sleep(Duration::from_millis(1 << attempt)).await,
            }
        }
        Err(MailboxError::Restarted)
    }

    /// Publishes one message on whichever node leads the user's partition; returns its seq
    /// once durable. Retrying the same id returns the same seq.
    pub async fn publish(
        &self,
        user: &str,
        id: &str,
        body: ByteBuf,
        from: Option<String>,
    ) -> Result<u64, MailboxError> {
        self.publish_after(user, id, body, from, None).await
    }

    /// [`Mailboxes::publish`] of a publish that follows `after` (the previous publish to
    /// the same user on the same connection, still unanswered): it is taken only after that
    /// one, or refused with [`MailboxError::OutOfOrder`].
    pub async fn publish_after(
        &self,
        user: &str,
        id: &str,
        body: ByteBuf,
        from: Option<String>,
        after: Option<String>,
    ) -> Result<u64, MailboxError> {
        let Some(route) = &self.route else {
            return self.publish_local(user, id, body, from, after).await;
        };
        let req = PublishReq {
            user: user.to_string(),
            id: id.to_string(),
            body: body.clone(),
            from: from.clone(),
            after: after.clone(),
        };
        let partition = self.partition_of(user);
        // First, together with the other publishes for the same leader. A transient refusal
        // (leadership moved, no leader yet), and a leader of a release that takes no batches,
        // go on below: one publish per request, retried until the leader is found.
        if let Leader::Remote { addr, .. } = route.router.leader(partition) {
            let r = route.publish_batched(addr, req.clone()).await;
            route.correct_route(partition, &r);
            match r {
                Err(e) if e.is_transient() => {
                    metrics::counter!("warbler_route_retries_total").increment(1);
                }
                Err(MailboxError::Unsupported(_)) => {}
                r => return r,
            }
        }
        route
            .on_leader(partition, PeerKind::Publish, &req, || {
                self.publish_local(user, id, body.clone(), from.clone(), after.clone())
            })
            .await
    }

    /// Publishes one message to many users of `partition` (a fan-out's share): one request
    /// to the partition's leader for all of them, so their appends share log entries.
    /// Answered per user, in the order given; a user refused with a transient error is
    /// worth publishing again on its own ([`Mailboxes::publish`]).
    pub async fn publish_many(
        &self,
        partition: PartitionId,
        users: Vec<String>,
        id: &str,
        body: ByteBuf,
        from: Option<String>,
    ) -> Vec<Result<u64, MailboxError>> {
        let answer = match &self.route {
            None => {
                self.publish_many_local(partition, &users, id, body, from)
                    .await
            }
            Some(route) => {
                let req = PublishManyReq {
                    users: users.clone(),
                    id: id.to_string(),
                    body: body.clone(),
                    from: from.clone(),
                };
                route
                    .on_leader(partition, PeerKind::PublishMany, &req, || {
                        self.publish_many_local(partition, &users, id, body.clone(), from.clone())
                    })
                    .await
            }
        };
        match answer {
            Ok(each) => each,
            Err(e) => users.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// [`Mailboxes::publish_many`] on this node, its leader: all users' publishes are handed
    /// to their mailboxes at once. Refused as a whole when this node does not lead the
    /// partition (the sender finds the leader and asks again).
    pub async fn publish_many_local(
        &self,
        partition: PartitionId,
        users: &[String],
        id: &str,
        body: ByteBuf,
        from: Option<String>,
    ) -> Result<Vec<Result<u64, MailboxError>>, MailboxError> {
        if let Some(route) = &self.route {
            if !matches!(route.router.leader(partition), Leader::Local) {
                return Err(MailboxError::NoLeader(format!(
                    "this node does not lead partition {partition}"
                )));
            }
        }
        if let Some(user) = users.iter().find(|u| self.partition_of(u) != partition) {
            return Err(MailboxError::Unavailable(format!(
                "user {user} is not in partition {partition}; send each partition's users apart"
            )));
        }
        let each = users
            .iter()
            .map(|u| self.publish_local(u, id, body.clone(), from.clone(), None));
        Ok(futures::future::join_all(each).await)
    }

    /// Hands one publish over and returns the wait for its seq. A caller that awaits this
    /// for each of its publishes to one user in turn gets their seqs in that order: on this
    /// node the message is in the mailbox's queue when this returns; for a leader elsewhere
    /// the request is queued on the link to it, and the leader keeps the order as long as the
    /// user's mailbox is running there (the first publishes to a mailbox that is starting, and
    /// retries across a leader change, may be reordered).
    pub async fn publish_submit(
        &self,
        user: String,
        id: String,
        body: ByteBuf,
        from: Option<String>,
        after: Option<String>,
    ) -> PendingPublish {
        let here = match &self.route {
            None => true,
            Some(route) => matches!(route.router.leader(self.partition_of(&user)), Leader::Local),
        };
        let mut r = PublishReq {
            user,
            id,
            body,
            from,
            after,
        };
        let this = self.clone();
        let again = move |r: PublishReq| -> PendingPublish {
            Box::pin(async move {
                this.publish_after(&r.user, &r.id, r.body, r.from, r.after)
                    .await
            })
        };
        if here {
            if let Ok(mailbox) = self.get(&r.user).await {
                match hand_over(&mailbox, r, again.clone()) {
                    Ok(pending) => return pending,
                    Err(back) => r = back,
                }
            }
        }
        let mut pending = again(r);
        // Run it up to its first wait now: that queues the request to the leader.
        if let std::task::Poll::Ready(r) = pending
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
            return Box::pin(std::future::ready(r));
        }
        pending
    }

    /// Publishes forwarded together ([`PeerKind::PublishBatch`]) through this node's
    /// mailboxes, as their partitions' leader. Each is handed to its mailbox before the next
    /// one is looked at, so a connection's publishes to one user are taken in the order they
    /// were sent; then their answers are awaited together. Answered per publish, in order.
    pub async fn publish_batch_local(
        &self,
        publishes: Vec<PublishReq>,
    ) -> Vec<Result<u64, MailboxError>> {
        let mut waits: Vec<PendingPublish> = Vec::with_capacity(publishes.len());
        for r in publishes {
            let mailbox = match self.get(&r.user).await {
                Ok(mailbox) => mailbox,
                Err(e) => {
                    waits.push(Box::pin(std::future::ready(Err(e))));
                    continue;
                }
            };
            let this = self.clone();
            let again = move |r: PublishReq| -> PendingPublish {
                Box::pin(async move {
                    this.publish_local(&r.user, &r.id, r.body, r.from, r.after)
                        .await
                })
            };
            waits.push(match hand_over(&mailbox, r, again.clone()) {
                Ok(pending) => pending,
                // It stopped since: the retrying call starts it again.
                Err(r) => again(r),
            });
        }
        futures::future::join_all(waits).await
    }

    /// Publishes through this node's own mailbox of `user`.
    pub async fn publish_local(
        &self,
        user: &str,
        id: &str,
        body: ByteBuf,
        from: Option<String>,
        after: Option<String>,
    ) -> Result<u64, MailboxError> {
        self.call(user, |reply| MailboxMsg::Publish {
            id: id.to_string(),
            body: body.clone(),
            from: from.clone(),
            after: after.clone(),
            reply,
        })
        .await?
    }

    /// Subscribes `session` as `device` to this node's mailbox of `user`; returns where
    /// the device stands. A device of a quiet user that has acknowledged everything joins
    /// the sleeping mailbox's subscribers without starting it.
    pub async fn subscribe_local(
        &self,
        user: &str,
        device: &str,
        session: SessionRef,
        resume: Option<(u64, u64)>,
    ) -> Result<SubscribeInfo, MailboxError> {
        let cached = self.refs.read().unwrap().get(user).cloned();
        let mailbox = match cached {
            Some(r) if r.get_status() <= ActorStatus::Running => r,
            // A resume carries what the connection was sent: the mailbox settles it.
            _ if resume.is_some() => self.get(user).await?,
            _ => {
                let partition = self.partition_of(user);
                let asked = self
                    .registry
                    .call(
                        |reply| RegistryMsg::Subscribe {
                            user: user.to_string(),
                            partition,
                            device: device.to_string(),
                            session: session.clone(),
                            reply,
                        },
                        Some(MAILBOX_CALL_TIMEOUT),
                    )
                    .await;
                match asked {
                    Ok(ractor::rpc::CallResult::Success(Ok(Subscribed::Asleep(info)))) => {
                        return Ok(info)
                    }
                    Ok(ractor::rpc::CallResult::Success(Ok(Subscribed::Mailbox(r)))) => {
                        self.remember(user, &r);
                        r
                    }
                    Ok(ractor::rpc::CallResult::Success(Err(e))) => return Err(e),
                    _ => return Err(MailboxError::ShuttingDown),
                }
            }
        };
        let device = device.to_string();
        match mailbox
            .call(
                move |reply| MailboxMsg::Subscribe {
                    device,
                    session,
                    resume,
                    reply,
                },
                Some(SUBSCRIBE_TIMEOUT),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(info)) => Ok(info),
            // The mailbox stopped (idle, crash, leadership moved) before it answered.
            _ => Err(MailboxError::Restarted),
        }
    }

    /// The devices of `user`, from whichever node leads the user's partition.
    pub async fn devices(&self, user: &str) -> Result<Vec<DeviceInfo>, MailboxError> {
        let Some(route) = &self.route else {
            return self.devices_local(user).await;
        };
        let local = || async {
            self.devices_local(user).await.map(|d| {
                d.into_iter()
                    .map(|d| DeviceCursor {
                        device: d.device,
                        acked: d.acked,
                        online: d.online,
                    })
                    .collect()
            })
        };
        let req = UserReq {
            user: user.to_string(),
        };
        let wire: Vec<DeviceCursor> = route
            .on_leader(self.partition_of(user), PeerKind::Devices, &req, local)
            .await?;
        Ok(crate::routing::devices_from_wire(wire))
    }

    pub async fn devices_local(&self, user: &str) -> Result<Vec<DeviceInfo>, MailboxError> {
        self.call(user, |reply| MailboxMsg::Devices { reply }).await
    }

    pub async fn active_count(&self) -> usize {
        match self
            .registry
            .call(
                |reply| RegistryMsg::Count { reply },
                Some(MAILBOX_CALL_TIMEOUT),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(n)) => n,
            _ => 0,
        }
    }

    /// Stops the registry and with it every mailbox.
    pub fn stop(&self) {
        self.registry.stop(Some("shutdown".into()));
    }
}
