//! `UserMailbox`: the single writer of one user's sequence on this node.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_bytes::ByteBuf;
use warbler_storage::{now_ms, Op, PartitionId, PartitionLog, StorageError, Store, StoredMessage};

use crate::error::MailboxError;

/// Deliveries of messages younger than this count towards `warbler_delivery_seconds` (and
/// the gateway's `warbler_delivery_written_seconds`): older ones are a reconnecting device's
/// backlog, not latency.
pub const LIVE_DELIVERY_MS: u64 = 10_000;

/// Body bytes sent to one device and not acknowledged yet, at most (besides
/// `limits.inflight_max` messages): a device that stops reading pins this much, not the
/// window's 256 messages of up to 512 KiB each.
const INFLIGHT_BYTES_MAX: usize = 8 << 20;
/// How many of the newest committed messages a publish's `after` is looked for among
/// before its dedup record is read (a tail cache holds up to 512 by default).
const AFTER_IN_TAIL: usize = 32;

/// Body bytes a mailbox's tail cache holds at most (besides `tail_cache_max` messages):
/// 512 messages at the body limit would otherwise pin 256 MiB per active user.
const TAIL_CACHE_BYTES_MAX: usize = 4 << 20;
/// How a mailbox's stop reason begins when a write of it failed: other writes of it may
/// still be in flight, so the registry starts its successor as after a crash.
pub(crate) const WRITE_FAILED: &str = "write failed";
use crate::msg::{Committed, DeviceInfo, MailboxMsg, RegistryMsg, Sleeper, SubscribeInfo};
use crate::outbox::SessionRef;

/// Bounds of one mailbox.
#[derive(Debug, Clone, Copy)]
pub struct MailboxLimits {
    /// Messages sent to one device and not yet acked.
    pub inflight_max: u32,
    /// Recent committed messages kept in memory for online delivery.
    pub tail_cache_max: usize,
    /// Stop after this long with no subscriber and nothing pending.
    pub idle_timeout: Duration,
    /// Go to sleep after this long with every delivery acknowledged and nothing pending
    /// (the registry keeps the subscribers until the next request wakes the mailbox).
    /// Zero: never.
    pub sleep_after: Duration,
    /// Messages a user may hold that one of its devices has not acknowledged; beyond it
    /// publishes are refused as [`MailboxError::Full`] (retention by count never trims
    /// them). 0 = no limit. The count retention's `max_messages_per_user`.
    pub unacked_max: u64,
    /// How long a device's acknowledged cursor may wait in memory before it is written:
    /// the acks of that time go to storage as one write per device, not one per ack. A
    /// crash loses at most this much of the cursors, which means redelivery (at least
    /// once), never a gap. Zero: every ack is written at once.
    pub cursor_flush: Duration,
}

/// A publish as the mailbox takes it (see [`MailboxMsg::Publish`]).
struct Publish {
    id: String,
    body: ByteBuf,
    from: Option<String>,
    after: Option<String>,
}

pub struct MailboxArgs {
    pub user: String,
    pub partition: PartitionId,
    pub store: Store,
    pub log: Arc<dyn PartitionLog>,
    pub limits: MailboxLimits,
    /// The previous mailbox of this user crashed: wait until its in-flight writes are
    /// settled before reading the head.
    pub after_crash: bool,
    /// The devices subscribed when the user's mailbox went to sleep.
    pub sleepers: Vec<Sleeper>,
    /// Where it goes to sleep.
    pub registry: ActorRef<RegistryMsg>,
}

struct Pending {
    msg: Arc<StoredMessage>,
    waiters: Vec<RpcReplyPort<Result<u64, MailboxError>>>,
}

struct Subscriber {
    session: SessionRef,
    acked: u64,
    sent: u64,
    /// Messages sent and not acked yet, with their body bytes (those a resumed session's
    /// earlier connection was sent are not known here and count as none).
    inflight: VecDeque<(u64, usize)>,
    inflight_bytes: usize,
}

pub struct MailboxState {
    user: String,
    partition: PartitionId,
    store: Store,
    log: Arc<dyn PartitionLog>,
    limits: MailboxLimits,
    /// The log term this mailbox started under; it stops when the term changes.
    term: u64,
    /// Highest seq handed out (committed or pending).
    assigned: u64,
    /// Highest durable seq.
    committed: u64,
    pending: BTreeMap<u64, Pending>,
    pending_ids: HashMap<String, u64>,
    tail: VecDeque<Committed>,
    /// Body bytes held in `tail`.
    tail_bytes: usize,
    subs: HashMap<String, Subscriber>,
    cursors: HashMap<String, u64>,
    /// Devices whose cursor in `cursors` is ahead of what was last written.
    unwritten: HashSet<String>,
    /// A `FlushCursors` is scheduled.
    flush_armed: bool,
    /// This mailbox, for the timers it arms.
    me: ActorRef<MailboxMsg>,
    last_active: Instant,
    /// When the earliest scheduled `IdleCheck` is due.
    idle_timer: Option<Instant>,
    registry: ActorRef<RegistryMsg>,
    /// Stopped to sleep: its subscribers went to the registry and stay subscribed.
    asleep: bool,
    /// Stopped with writes proposed and not yet committed or failed: they may still land,
    /// so its successor reads its head only after a barrier (see the registry).
    pub(crate) stopped_in_flight: bool,
}

pub struct UserMailbox;

impl Actor for UserMailbox {
    type Msg = MailboxMsg;
    type State = MailboxState;
    type Arguments = MailboxArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MailboxMsg>,
        args: MailboxArgs,
    ) -> Result<MailboxState, ActorProcessingErr> {
        // When replicated, leadership may have moved since this node last wrote the
        // partition: only after the barrier does local storage hold every committed entry.
        let term = args.log.leader_term(args.partition).ok_or_else(|| {
            MailboxError::NoLeader(format!(
                "this node does not lead partition {}",
                args.partition
            ))
        })?;
        // A barrier waits for the partition's entries in flight: about one commit under
        // load. Once one has completed in this leadership, a start that follows a clean stop
        // skips it (see `PartitionLog::settled`); the registry starts mailboxes one at a
        // time, and a barrier each would hold up every other start on the node.
        if args.after_crash || (args.log.replicated() && !args.log.settled(args.partition)) {
            args.log.barrier(args.partition).await?;
        }
        if args.log.leader_term(args.partition) != Some(term) {
            return Err(MailboxError::NoLeader("leadership moved while starting".into()).into());
        }
        let last = args.store.last_seq(args.partition, &args.user)?;
        tracing::debug!(user = %args.user, partition = args.partition, term, last, after_crash = args.after_crash, "mailbox starts");
        // Every device's cursor, so that the oldest unacknowledged message is known.
        let cursors: HashMap<String, u64> = args
            .store
            .cursors(args.partition, &args.user)?
            .into_iter()
            .collect();
        metrics::gauge!("warbler_mailboxes_alive").increment(1.0);
        let mut state = MailboxState {
            user: args.user,
            partition: args.partition,
            store: args.store,
            log: args.log,
            limits: args.limits,
            term,
            assigned: last,
            committed: last,
            pending: BTreeMap::new(),
            pending_ids: HashMap::new(),
            tail: VecDeque::new(),
            tail_bytes: 0,
            subs: HashMap::new(),
            cursors,
            unwritten: HashSet::new(),
            flush_armed: false,
            me: myself.clone(),
            last_active: Instant::now(),
            idle_timer: None,
            registry: args.registry,
            asleep: false,
            stopped_in_flight: false,
        };
        // Woken: the devices that were subscribed continue where they were.
        for s in args.sleepers {
            state.subscribe(s.device, s.session, Some((s.acked, s.acked)))?;
        }
        state.arm_idle_timer(&myself);
        Ok(state)
    }

    async fn post_start(
        &self,
        _myself: ActorRef<MailboxMsg>,
        state: &mut MailboxState,
    ) -> Result<(), ActorProcessingErr> {
        // Messages published while it slept.
        let devices: Vec<String> = state.subs.keys().cloned().collect();
        for d in devices {
            state.pump(&d)?;
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<MailboxMsg>,
        state: &mut MailboxState,
    ) -> Result<(), ActorProcessingErr> {
        metrics::gauge!("warbler_mailboxes_alive").decrement(1.0);
        tracing::debug!(user = %state.user, pending = state.pending.len(), assigned = state.assigned, committed = state.committed, "mailbox stops");
        state.stopped_in_flight = !state.pending.is_empty();
        // Stopped by the registry (shutdown, leadership moved): the cursors still in memory
        // are written if the log takes them; if not, their acks are delivered again.
        if let Err(e) = state.write_cursors().await {
            tracing::debug!(user = %state.user, error = %e, "cursors not written at stop");
        }
        for (_, p) in std::mem::take(&mut state.pending) {
            for w in p.waiters {
                let _ = w.send(Err(MailboxError::Restarted));
            }
        }
        state.release_subscribers();
        Ok(())
    }

    /// A mailbox that fails (an error or a panic) tells its subscribers first: `post_stop`
    /// does not run then, and they must subscribe again to its successor.
    async fn handle(
        &self,
        myself: ActorRef<MailboxMsg>,
        msg: MailboxMsg,
        state: &mut MailboxState,
    ) -> Result<(), ActorProcessingErr> {
        let outcome = std::panic::AssertUnwindSafe(state.handle(&myself, msg))
            .catch_unwind()
            .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                state.release_subscribers();
                Err(e)
            }
            Err(panic) => {
                state.release_subscribers();
                std::panic::resume_unwind(panic)
            }
        }
    }
}

impl MailboxState {
    /// Tells every subscriber this mailbox is gone (unless it went to sleep).
    fn release_subscribers(&mut self) {
        if self.asleep {
            return;
        }
        for (_, sub) in self.subs.drain() {
            sub.session.mailbox_stopped();
        }
    }

    async fn handle(
        &mut self,
        myself: &ActorRef<MailboxMsg>,
        msg: MailboxMsg,
    ) -> Result<(), ActorProcessingErr> {
        let state = self;
        let myself = myself.clone();
        match msg {
            MailboxMsg::Publish {
                id,
                body,
                from,
                after,
                reply,
            } => {
                state.last_active = Instant::now();
                let publish = Publish {
                    id,
                    body,
                    from,
                    after,
                };
                state.publish(&myself, publish, reply).await?;
            }
            MailboxMsg::Committed { seq, result } => state.on_committed(&myself, seq, result)?,
            MailboxMsg::Subscribe {
                device,
                session,
                resume,
                reply,
            } => {
                state.last_active = Instant::now();
                let info = state.subscribe(device.clone(), session, resume)?;
                if state.unwritten.contains(&device) {
                    // The welcome confirms this cursor to the device: it goes to storage
                    // now, as a backup taken from here on must hold it.
                    state.write_cursors().await?;
                }
                let _ = reply.send(info);
                state.pump(&device)?;
                state.arm_idle_timer(&myself);
            }
            MailboxMsg::Unsubscribe { device, session } => {
                if state
                    .subs
                    .get(&device)
                    .is_some_and(|s| s.session.id() == session)
                {
                    state.take_acks(&device);
                    state.subs.remove(&device);
                    // Where it reconnects next may be another leader's mailbox.
                    state.write_cursors().await?;
                }
                state.last_active = Instant::now();
                state.arm_idle_timer(&myself);
            }
            MailboxMsg::Ack {
                device,
                session,
                seq,
            } => {
                state.ack(&device, session, seq).await?;
                state.arm_idle_timer(&myself);
            }
            MailboxMsg::FlushCursors => {
                state.flush_armed = false;
                state.write_cursors().await?;
                state.want_outstanding_acks();
                state.arm_idle_timer(&myself);
            }
            MailboxMsg::LeaderMoved => {
                // Sent for every change of the partition's leader seen on this node, and
                // possibly late: a mailbox started under a leadership this node holds now
                // is its user's writer, and stays.
                if state.log.leader_term(state.partition) != Some(state.term) {
                    myself.stop(Some("leadership moved".into()));
                }
            }
            MailboxMsg::Devices { reply } => {
                state.take_all_acks();
                let _ = reply.send(state.devices()?);
            }
            MailboxMsg::IdleCheck => {
                state.take_all_acks();
                if state.idle_timer.is_some_and(|at| at <= Instant::now()) {
                    state.idle_timer = None;
                }
                let idle_for = state.last_active.elapsed();
                if state.subs.is_empty()
                    && state.pending.is_empty()
                    && idle_for >= state.limits.idle_timeout
                {
                    state.write_cursors().await?;
                    myself.stop(Some("idle".into()));
                } else if state.may_sleep() && idle_for >= state.limits.sleep_after {
                    // Asleep, its devices' cursors are read from storage.
                    state.write_cursors().await?;
                    state.sleep(&myself);
                } else {
                    state.arm_idle_timer(&myself);
                }
            }
        }
        Ok(())
    }

    /// Whether the mailbox could sleep: devices subscribed, every message it sent them
    /// acknowledged, nothing pending.
    fn may_sleep(&self) -> bool {
        !self.limits.sleep_after.is_zero()
            && !self.subs.is_empty()
            && self.pending.is_empty()
            && self
                .subs
                .values()
                .all(|s| s.acked >= s.sent && s.sent >= self.committed)
    }

    /// Hands the subscribers to the registry and stops.
    fn sleep(&mut self, myself: &ActorRef<MailboxMsg>) {
        let subs = self
            .subs
            .drain()
            .filter(|(_, s)| !s.session.is_closed())
            .map(|(device, s)| Sleeper {
                device,
                session: s.session,
                acked: s.acked,
            })
            .collect();
        let asleep = RegistryMsg::Asleep {
            user: self.user.clone(),
            mailbox: myself.get_id(),
            subs,
        };
        match self.registry.cast(asleep) {
            Ok(()) => {
                self.asleep = true;
                metrics::counter!("warbler_mailbox_sleeps_total").increment(1);
                myself.stop(Some("asleep".into()));
            }
            Err(ractor::MessagingErr::SendErr(RegistryMsg::Asleep { subs, .. })) => {
                // The registry is gone (shutdown): stay awake with them.
                for s in subs {
                    let _ = self.subscribe(s.device, s.session, Some((s.acked, s.acked)));
                }
            }
            Err(_) => {}
        }
    }

    /// Schedules the next idle check, unless one is due by then. With devices subscribed
    /// it is needed only once they are quiet (it may put the mailbox to sleep).
    fn arm_idle_timer(&mut self, myself: &ActorRef<MailboxMsg>) {
        if !self.subs.is_empty() && !self.may_sleep() {
            return;
        }
        let after = if self.subs.is_empty() {
            self.limits.idle_timeout
        } else {
            self.limits.sleep_after
        };
        let at = self.last_active + after;
        if self.idle_timer.is_some_and(|due| due <= at) {
            return;
        }
        let remaining = at.saturating_duration_since(Instant::now());
        myself.send_after(remaining.max(Duration::from_millis(10)), || {
            MailboxMsg::IdleCheck
        });
        self.idle_timer = Some(at);
    }

    /// Whether a new publish may be taken: the one it follows (if any) was taken, and the
    /// partition's log is not at its backlog bound. Asked after the dedup check: a retry of
    /// a publish already taken gets its seq whatever this would say.
    fn admit(&self, after: Option<&str>) -> Result<(), MailboxError> {
        if let Some(prev) = after {
            // Usually the publish just before it: pending, or among the newest committed in
            // the tail cache. Only an older one costs a read (a hit searches the memtable's
            // skip list; no Bloom filter spares it).
            let taken = self.pending_ids.contains_key(prev)
                || self
                    .tail
                    .iter()
                    .rev()
                    .take(AFTER_IN_TAIL)
                    .any(|(_, m)| m.id == prev)
                || self
                    .store
                    .dedup(self.partition, &self.user, prev)
                    .map_err(|e| MailboxError::Unavailable(e.to_string()))?
                    .is_some();
            if !taken {
                metrics::counter!("warbler_publish_out_of_order_total").increment(1);
                return Err(MailboxError::OutOfOrder(prev.to_string()));
            }
        }
        if let Some(why) = self
            .store
            .low_space()
            .or_else(|| self.log.replica_low_on_space(self.partition))
        {
            metrics::counter!("warbler_publish_storage_full_total").increment(1);
            return Err(MailboxError::StorageFull(why));
        }
        if let Some(&oldest) = self.cursors.values().min() {
            let mut unacked = self.assigned.saturating_sub(oldest);
            if self.limits.unacked_max > 0 && unacked >= self.limits.unacked_max {
                // Only what is still kept counts: age retention trims messages a device
                // that never comes back did not read (rare path: one read).
                let first = self
                    .store
                    .first_seq(self.partition, &self.user)
                    .map_err(|e| MailboxError::Unavailable(e.to_string()))?
                    .unwrap_or(self.assigned + 1);
                unacked = (self.assigned + 1).saturating_sub(first.max(oldest + 1));
            }
            if self.limits.unacked_max > 0 && unacked >= self.limits.unacked_max {
                metrics::counter!("warbler_publish_mailbox_full_total").increment(1);
                return Err(MailboxError::Full(format!(
                    "{unacked} messages wait for a device's ack, the most retention keeps (retention.max_messages_per_user = {})",
                    self.limits.unacked_max
                )));
            }
        }
        if !self.log.admits(self.partition) {
            metrics::counter!("warbler_publish_overloaded_total").increment(1);
            return Err(MailboxError::Overloaded(format!(
                "partition {} has its most writes in flight",
                self.partition
            )));
        }
        Ok(())
    }

    async fn publish(
        &mut self,
        myself: &ActorRef<MailboxMsg>,
        publish: Publish,
        reply: RpcReplyPort<Result<u64, MailboxError>>,
    ) -> Result<(), ActorProcessingErr> {
        let Publish {
            id,
            body,
            from,
            after,
        } = publish;
        if let Some(seq) = self.pending_ids.get(&id) {
            self.pending
                .get_mut(seq)
                .expect("pending id has an entry")
                .waiters
                .push(reply);
            return Ok(());
        }
        if let Some(seq) = self.store.dedup(self.partition, &self.user, &id)? {
            metrics::counter!("warbler_publish_duplicates_total").increment(1);
            let _ = reply.send(Ok(seq));
            return Ok(());
        }
        if self.limits.unacked_max > 0 {
            // The oldest cursor counts: the acks recorded since the last look too.
            self.take_all_acks();
        }
        if let Err(e) = self.admit(after.as_deref()) {
            tracing::debug!(user = %self.user, %id, after = after.as_deref(), error = %e, "publish refused");
            let _ = reply.send(Err(e));
            return Ok(());
        }
        if self.log.leader_term(self.partition) != Some(self.term) {
            // Leadership moved (or the log failed): this mailbox's view may be stale. Stop;
            // the next request starts a fresh one where the partition is led now.
            let _ = reply.send(Err(MailboxError::NoLeader(
                "leadership moved away from this node".into(),
            )));
            myself.stop(Some("leadership moved".into()));
            return Ok(());
        }
        let seq = self.assigned + 1;
        let msg = Arc::new(StoredMessage {
            id: id.clone(),
            ts: now_ms(),
            from,
            body,
        });
        let op = Op::Append {
            partition: self.partition,
            user: self.user.clone(),
            seq,
            msg: (*msg).clone(),
        };
        let me = myself.clone();
        let done = Box::new(move |result| {
            let _ = me.cast(MailboxMsg::Committed { seq, result });
        });
        if let Err(e) = self
            .log
            .propose_in(self.partition, self.term, vec![op], Some(done))
            .await
        {
            let _ = reply.send(Err(MailboxError::Unavailable(e.to_string())));
            return Ok(());
        }
        self.assigned = seq;
        // Whether the publish it follows is pending here (looked up only when traced).
        tracing::debug!(user = %self.user, %id, seq, after = after.as_deref(),
            after_pending = after.as_ref().is_some_and(|a| self.pending_ids.contains_key(a)),
            term = self.term, "publish taken");
        self.pending_ids.insert(id, seq);
        let waiters = if crate::bugs::on(crate::bugs::Bug::AckBeforeCommit) {
            let _ = reply.send(Ok(seq));
            Vec::new()
        } else {
            vec![reply]
        };
        self.pending.insert(seq, Pending { msg, waiters });
        Ok(())
    }

    fn on_committed(
        &mut self,
        myself: &ActorRef<MailboxMsg>,
        seq: u64,
        result: Result<(), StorageError>,
    ) -> Result<(), ActorProcessingErr> {
        if let Err(e) = result {
            tracing::debug!(user = %self.user, seq, pending = self.pending.len(), error = %e, "write failed; the mailbox stops");
            // Later pending entries fail too (the log is poisoned): answer them all, then
            // restart from storage, which holds exactly what became durable.
            for (_, p) in std::mem::take(&mut self.pending) {
                for w in p.waiters {
                    let _ = w.send(Err(MailboxError::Unavailable(e.to_string())));
                }
            }
            myself.stop(Some(format!("{WRITE_FAILED}: {e}")));
            return Ok(());
        }
        // Paired with the assignment in `publish`: commits arrive in seq order, no gaps.
        assert_eq!(
            seq,
            self.committed + 1,
            "user {} committed seq out of order",
            self.user
        );
        let p = self
            .pending
            .remove(&seq)
            .expect("a committed seq was pending");
        self.committed = seq;
        self.pending_ids.remove(&p.msg.id);
        metrics::counter!("warbler_publishes_total").increment(1);
        // Accepted by this mailbox → durable (on a cluster: replicated to a majority).
        metrics::histogram!("warbler_publish_seconds")
            .record(now_ms().saturating_sub(p.msg.ts) as f64 / 1000.0);
        for w in p.waiters {
            let _ = w.send(Ok(seq));
        }
        if self.limits.tail_cache_max > 0 {
            self.tail_bytes += p.msg.body.len();
            self.tail.push_back((seq, p.msg));
            // Bounded by count and by bytes; the newest message always stays.
            while self.tail.len() > 1
                && (self.tail.len() > self.limits.tail_cache_max
                    || self.tail_bytes > TAIL_CACHE_BYTES_MAX)
            {
                if let Some((_, old)) = self.tail.pop_front() {
                    self.tail_bytes -= old.body.len();
                }
            }
        }
        let devices: Vec<String> = self.subs.keys().cloned().collect();
        for d in devices {
            self.pump(&d)?;
        }
        Ok(())
    }

    fn cursor(&mut self, device: &str) -> Result<u64, StorageError> {
        if let Some(c) = self.cursors.get(device) {
            return Ok(*c);
        }
        let c = self.store.cursor(self.partition, &self.user, device)?;
        self.cursors.insert(device.to_string(), c);
        Ok(c)
    }

    fn subscribe(
        &mut self,
        device: String,
        session: SessionRef,
        resume: Option<(u64, u64)>,
    ) -> Result<SubscribeInfo, StorageError> {
        // A connection this one replaces may have acked more since the last look.
        self.take_acks(&device);
        let stored = self.cursor(&device)?;
        // A resumed session continues after what it wrote to its connection, even when the
        // stored cursor is further along (the device acked through another connection): it
        // gets those messages again (at least once) rather than a gap in its own stream.
        // A resume names only messages that were delivered, so committed ones: anything
        // past that (a peer that means harm, or a bug) is clamped, never a cursor that
        // skips what is published next.
        let committed = self.committed;
        let (acked, sent) = match resume {
            Some((acked, sent)) => {
                let (acked, sent) = (acked.min(committed), sent.min(committed));
                (acked.max(stored), sent.max(acked))
            }
            None => (stored, stored),
        };
        if acked > stored {
            // The session's device acknowledged these with an earlier mailbox (this user's
            // leader moved, or the mailbox restarted) whose cursor write did not land: this
            // one writes it.
            self.cursors.insert(device.clone(), acked);
            self.unwritten.insert(device.clone());
        }
        if let Some(old) = self.subs.remove(&device) {
            if old.session.id() != session.id() {
                old.session.replaced();
            }
        }
        if self.limits.cursor_flush.is_zero() {
            // Every ack is written at once, so every ack comes as a message.
            let _ = session.want_ack();
        }
        self.subs.insert(
            device,
            Subscriber {
                session,
                acked,
                sent,
                inflight: VecDeque::new(),
                inflight_bytes: 0,
            },
        );
        Ok(SubscribeInfo {
            acked: stored,
            last_seq: self.committed,
        })
    }

    /// A device's ack that came as a message: a stand-in's, or a local session's that this
    /// mailbox asked for ([`SessionRef::want_ack`]).
    async fn ack(
        &mut self,
        device: &str,
        session: u64,
        seq: u64,
    ) -> Result<(), ActorProcessingErr> {
        if self
            .subs
            .get(device)
            .is_none_or(|s| s.session.id() != session)
        {
            return Ok(());
        }
        self.last_active = Instant::now();
        let mut seq = seq;
        loop {
            self.advance(device, seq);
            self.take_acks(device);
            if self.limits.cursor_flush.is_zero() {
                self.write_cursors().await?;
            }
            // Whatever moved the cursor (this message, or a look at the outbox before it
            // came), the window may have opened.
            self.pump(device)?;
            if !self.limits.cursor_flush.is_zero() {
                return Ok(());
            }
            // Every ack is written at once: the next comes as a message too, and one
            // recorded before asking is taken here.
            let Some(sub) = self.subs.get(device) else {
                return Ok(());
            };
            match sub.session.want_ack() {
                Some(next) if next > sub.acked && sub.acked < sub.sent => seq = next,
                _ => return Ok(()),
            }
        }
    }

    /// Moves `device`'s cursor to `seq` (at most what it was sent). Whether it moved.
    fn advance(&mut self, device: &str, seq: u64) -> bool {
        let Some(sub) = self.subs.get_mut(device) else {
            return false;
        };
        let acked = seq.min(sub.sent);
        if acked <= sub.acked {
            return false;
        }
        sub.acked = acked;
        while let Some(&(s, bytes)) = sub.inflight.front() {
            if s > acked {
                break;
            }
            sub.inflight.pop_front();
            sub.inflight_bytes -= bytes;
        }
        match self.cursors.get_mut(device) {
            Some(cursor) => *cursor = acked,
            None => {
                self.cursors.insert(device.to_string(), acked);
            }
        }
        if !self.unwritten.contains(device) {
            self.unwritten.insert(device.to_string());
        }
        self.last_active = Instant::now();
        metrics::counter!("warbler_acks_total").increment(1);
        self.arm_flush();
        true
    }

    /// Takes the acks `device`'s client made since the last look: a session on this node
    /// records them in its connection's outbox, and this mailbox reads them whenever it
    /// runs (each commit, each cursor flush) instead of taking a message per ack. With
    /// `cursor_flush` zero every ack comes as a message. Whether the cursor moved.
    fn take_acks(&mut self, device: &str) -> bool {
        if self.limits.cursor_flush.is_zero() {
            return false;
        }
        match self.subs.get(device).and_then(|s| s.session.client_acked()) {
            Some(seq) => self.advance(device, seq),
            None => false,
        }
    }

    /// [`Self::take_acks`] for every subscriber.
    fn take_all_acks(&mut self) {
        if self.limits.cursor_flush.is_zero() {
            return;
        }
        let devices: Vec<String> = self.subs.keys().cloned().collect();
        for d in devices {
            self.take_acks(&d);
        }
    }

    /// Asks every device that has not acknowledged all it was sent to send its next ack as
    /// a message: it comes when the device catches up, after which the mailbox may sleep.
    /// A device that stopped acking then costs no timer.
    fn want_outstanding_acks(&mut self) {
        let waiting: Vec<(String, u64)> = self
            .subs
            .iter()
            .filter(|(_, s)| s.acked < s.sent)
            .filter_map(|(d, s)| Some((d.clone(), s.session.want_ack()?)))
            .collect();
        for (device, seq) in waiting {
            self.advance(&device, seq);
        }
    }

    /// Schedules the next cursor flush unless one is scheduled (it also takes the acks
    /// recorded by then).
    fn arm_flush(&mut self) {
        if self.limits.cursor_flush.is_zero() || self.flush_armed {
            return;
        }
        self.flush_armed = true;
        self.me
            .send_after(self.limits.cursor_flush, || MailboxMsg::FlushCursors);
    }

    /// Proposes the cursors that moved since they were last written, one op per device.
    /// Proposed, not waited for until durable: cursors may lag on a crash (delivery is at
    /// least once).
    async fn write_cursors(&mut self) -> Result<(), StorageError> {
        self.take_all_acks();
        if self.unwritten.is_empty() {
            return Ok(());
        }
        let ops: Vec<Op> = self
            .unwritten
            .drain()
            .filter_map(|device| {
                let acked = *self.cursors.get(&device)?;
                Some(Op::Cursor {
                    partition: self.partition,
                    user: self.user.clone(),
                    device,
                    acked,
                })
            })
            .collect();
        metrics::counter!("warbler_cursor_writes_total").increment(ops.len() as u64);
        self.log
            .propose_in(self.partition, self.term, ops, None)
            .await
    }

    /// Sends `device` the committed messages it has not been sent, within its window, in
    /// batches of at most a few MiB (a range read's byte cap).
    fn pump(&mut self, device: &str) -> Result<(), StorageError> {
        self.take_acks(device);
        loop {
            let Some(sub) = self.subs.get(device) else {
                return Ok(());
            };
            let window_end = sub.acked + u64::from(self.limits.inflight_max);
            let upto = self.committed.min(window_end);
            if sub.sent >= upto || sub.inflight_bytes >= INFLIGHT_BYTES_MAX {
                if sub.sent < self.committed && !self.limits.cursor_flush.is_zero() {
                    // The window is full: the ack that opens it must come as a message.
                    // One recorded before asking is read here.
                    if let Some(seq) = sub.session.want_ack() {
                        if self.advance(device, seq) {
                            continue;
                        }
                    }
                }
                return Ok(());
            }
            let (from, count) = (sub.sent, (upto - sub.sent) as usize);
            let mut batch = self.read_committed(from, count)?;
            let sub = self.subs.get_mut(device).expect("checked above");
            // The window is bytes as well as messages: at most INFLIGHT_BYTES_MAX of bodies
            // wait for one device's ack (at least one message, however large).
            let mut keep = 0;
            for (seq, m) in &batch {
                let bytes = m.body.len();
                if sub.inflight_bytes + bytes > INFLIGHT_BYTES_MAX && !sub.inflight.is_empty() {
                    break;
                }
                sub.inflight.push_back((*seq, bytes));
                sub.inflight_bytes += bytes;
                keep += 1;
            }
            batch.truncate(keep);
            let Some(&(last, _)) = batch.last() else {
                return Ok(());
            };
            sub.sent = last;
            if crate::bugs::on(crate::bugs::Bug::SkipSeq) {
                batch.retain(|(seq, _)| seq % crate::bugs::SKIP_EVERY != 0);
            }
            metrics::counter!("warbler_deliveries_total").increment(batch.len() as u64);
            // Publish → handed to the device's session, for live traffic: messages older
            // than LIVE_DELIVERY_MS are a reconnecting device's backlog, not latency.
            let now = now_ms();
            for (_, m) in &batch {
                let age = now.saturating_sub(m.ts);
                if age <= LIVE_DELIVERY_MS {
                    metrics::histogram!("warbler_delivery_seconds").record(age as f64 / 1000.0);
                }
            }
            if sub.session.deliver(batch).is_err() {
                self.subs.remove(device);
                return Ok(());
            }
            // Its ack is read by the next flush at the latest.
            self.arm_flush();
        }
    }

    /// Up to `count` committed messages after `after`: from the tail cache when it covers
    /// them, else from storage.
    fn read_committed(&self, after: u64, count: usize) -> Result<Vec<Committed>, StorageError> {
        if let Some(&(front, _)) = self.tail.front() {
            if after + 1 >= front {
                let start = (after + 1 - front) as usize;
                return Ok(self.tail.iter().skip(start).take(count).cloned().collect());
            }
        }
        Ok(self
            .store
            .read_range(self.partition, &self.user, after, count)?
            .into_iter()
            .map(|(seq, m)| (seq, Arc::new(m)))
            .collect())
    }

    fn devices(&mut self) -> Result<Vec<DeviceInfo>, StorageError> {
        let mut out: BTreeMap<String, DeviceInfo> = BTreeMap::new();
        for (device, acked) in self.store.cursors(self.partition, &self.user)? {
            out.insert(
                device.clone(),
                DeviceInfo {
                    device,
                    acked,
                    online: false,
                },
            );
        }
        for (device, acked) in &self.cursors {
            let e = out.entry(device.clone()).or_insert(DeviceInfo {
                device: device.clone(),
                acked: 0,
                online: false,
            });
            e.acked = e.acked.max(*acked);
        }
        for device in self.subs.keys() {
            out.entry(device.clone())
                .or_insert(DeviceInfo {
                    device: device.clone(),
                    acked: 0,
                    online: false,
                })
                .online = true;
        }
        Ok(out.into_values().collect())
    }
}
