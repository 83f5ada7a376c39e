//! A device connection's outgoing queue, and the handle a mailbox delivers through.
//!
//! One [`Outbox`] per connection is shared by three parties: the connection's task queues
//! its own frames (`welcome`, `published`, `pong`, errors) through [`OutSender`]s; the
//! user's mailbox (or, in a cluster, the routing layer) queues delivered messages through a
//! [`SessionRef`]; the connection's writer drains it to the socket through the
//! [`OutReceiver`]. It also carries the session's signals (replaced, subscribe again), so
//! a device session needs no task or actor of its own.
//!
//! An idle connection holds one small allocation here: the queue is empty and grows only
//! while a burst is written; a drained queue that grew large is released.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::Notify;
use warbler_client::{ErrorCode, Frame};
use warbler_storage::StoredMessage;

use crate::msg::{Committed, SessionMsg};

/// A queue that grew past this many entries is released once drained.
const QUEUE_KEEP: usize = 16;

/// One entry of the queue: a frame, or a delivered message (shared with the mailbox's
/// tail: it becomes a `msg` frame only when written).
pub enum Out {
    Frame(Frame),
    Msg(u64, Arc<StoredMessage>),
}

impl Out {
    /// The frame to write.
    pub fn into_frame(self) -> Frame {
        match self {
            Out::Frame(f) => f,
            Out::Msg(seq, m) => Frame::Msg {
                seq,
                id: m.id.clone(),
                ts: m.ts,
                body: m.body.clone(),
                from: m.from.clone(),
            },
        }
    }
}

/// The connection (or its writer) is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection is closed")]
pub struct Closed;

/// What a session is asked to do, set by whoever delivers to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Another connection of the same device took over: close this one.
    Replaced,
    /// The mailbox this session was subscribed to stopped: subscribe again.
    Resubscribe,
    /// The partition's leader may have moved: subscribe again if it is not followed.
    CheckRoute,
}

const REPLACED: u8 = 1;
const RESUBSCRIBE: u8 = 2;
const CHECK_ROUTE: u8 = 4;

#[derive(Default)]
struct State {
    queue: VecDeque<Out>,
    /// [`OutSender`]s alive: the writer finishes once they are all gone and the queue is
    /// drained.
    senders: usize,
    /// The writer stopped (socket failed, slow consumer): nothing more is taken.
    writer_gone: bool,
    /// The session ended: deliveries are refused (the mailbox then drops the subscriber).
    session_over: bool,
    /// Deliveries that came before the session's `welcome` was queued (a mailbox may
    /// deliver before its answer to the subscribe arrives): replayed after it.
    early: Option<Vec<Committed>>,
    /// Highest seq queued as a message; an ack beyond it is refused.
    sent: u64,
    signals: u8,
    /// The writer, when it waits for something to write.
    writer: Option<Waker>,
}

/// See the module documentation.
pub struct Outbox {
    id: u64,
    /// Most queued frames of the connection's own (deliveries are bounded by the mailbox's
    /// window instead).
    cap: usize,
    state: Mutex<State>,
    /// The writer is polled right after the current poll of the connection's reading side
    /// (they share one task): a frame queued meanwhile needs no wake, which would only make
    /// the task yield and call in another worker thread. Read under the state's lock; set
    /// outside it, so the two calls per poll take no lock. A sender that saw it set pushed
    /// under the lock before the writer's next look at the queue, which locks too.
    wake_deferred: AtomicBool,
    /// Set while the connection is quiet (see [`OutSender::set_quiet`]); cleared by every
    /// delivery. Whoever watches the socket reads it.
    quiet: Option<Arc<AtomicBool>>,
    /// Senders wait here for room, or for the writer to stop.
    changed: Notify,
    /// The session waits here for a signal.
    signaled: Notify,
    /// The client's cumulative ack, as its session recorded it ([`OutSender::record_ack`]).
    /// The mailbox reads it whenever it runs anyway (each commit, its cursor flush), so an
    /// ack costs it no message of its own.
    client_acked: AtomicU64,
    /// The mailbox waits for the next ack (its window is full, or it wants to know when
    /// the device has caught up): the session then sends it as a message too.
    ack_wanted: AtomicBool,
}

/// Session ids: unique on this node, for local sessions and stand-ins alike.
static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh session id.
pub fn next_session_id() -> u64 {
    NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed)
}

impl Outbox {
    /// A new queue: its first sender, and the writer's end.
    pub fn channel(cap: usize) -> (OutSender, OutReceiver) {
        Outbox::channel_with_quiet(cap, None)
    }

    /// A new queue whose connection's quiet spells are told through `quiet`: set by the
    /// connection ([`OutSender::set_quiet`]), cleared by every delivery.
    pub fn channel_with_quiet(
        cap: usize,
        quiet: Option<Arc<AtomicBool>>,
    ) -> (OutSender, OutReceiver) {
        let outbox = Arc::new(Outbox {
            id: next_session_id(),
            cap,
            state: Mutex::new(State {
                senders: 1,
                ..State::default()
            }),
            wake_deferred: AtomicBool::new(false),
            quiet,
            changed: Notify::new(),
            signaled: Notify::new(),
            client_acked: AtomicU64::new(0),
            ack_wanted: AtomicBool::new(false),
        });
        (OutSender(outbox.clone()), OutReceiver(outbox))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready` holds for the state, or the writer stopped.
    async fn wait_until(&self, ready: impl Fn(&State) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                if s.writer_gone || ready(&s) {
                    return;
                }
            }
            notified.await;
        }
    }

    fn push(&self, s: &mut State, out: Out) {
        s.queue.push_back(out);
        if s.queue.len() == 1 {
            self.wake_writer(s);
        }
    }

    fn wake_writer(&self, s: &mut State) {
        if !self.wake_deferred.load(Ordering::SeqCst) {
            if let Some(w) = s.writer.take() {
                w.wake();
            }
        }
    }

    /// Queues one delivered message unless it was queued already (a session that
    /// subscribes again is sent from its cursor); a jump past the next seq is said first.
    fn queue_msg(&self, s: &mut State, seq: u64, m: Arc<StoredMessage>) {
        if seq <= s.sent {
            return;
        }
        if s.sent > 0 && seq > s.sent + 1 {
            // Seqs are gap-free: only age retention removes messages a device has not
            // acknowledged. Say so rather than skip them silently.
            let message = format!(
                "messages {}..{} to this user were removed by retention (retention.max_age_secs) before this device acknowledged them; delivery goes on from {seq}",
                s.sent + 1,
                seq - 1
            );
            metrics::counter!("warbler_messages_expired_notices_total").increment(1);
            let notice = Frame::error(ErrorCode::MessagesExpired, message, None);
            self.push(s, Out::Frame(notice));
        }
        s.sent = seq;
        self.push(s, Out::Msg(seq, m));
    }

    /// Committed messages for this connection, in seq order. `Err`: the session is over.
    pub fn deliver(&self, batch: Vec<Committed>) -> Result<(), Closed> {
        if let Some(quiet) = &self.quiet {
            quiet.store(false, Ordering::Relaxed);
        }
        let mut s = self.lock();
        if s.writer_gone || s.session_over {
            return Err(Closed);
        }
        if let Some(early) = &mut s.early {
            early.extend(batch);
            return Ok(());
        }
        for (seq, m) in batch {
            self.queue_msg(&mut s, seq, m);
        }
        Ok(())
    }

    /// Raises a signal for the session.
    pub fn signal(&self, signal: Signal) {
        let bit = match signal {
            Signal::Replaced => REPLACED,
            Signal::Resubscribe => RESUBSCRIBE,
            Signal::CheckRoute => CHECK_ROUTE,
        };
        self.lock().signals |= bit;
        self.signaled.notify_one();
    }

    /// Raises `signal` after `delay` (a retry).
    pub fn signal_after(self: &Arc<Self>, delay: Duration, signal: Signal) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(me) = me.upgrade() {
                me.signal(signal);
            }
        });
    }

    /// Whether the connection can still take deliveries.
    pub fn is_closed(&self) -> bool {
        let s = self.lock();
        s.writer_gone || s.session_over
    }
}

/// The connection's handle on its queue. The writer finishes when every sender is gone
/// (and the queue is drained), so publish answers still in flight are written first.
pub struct OutSender(Arc<Outbox>);

impl Clone for OutSender {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        OutSender(self.0.clone())
    }
}

impl Drop for OutSender {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.senders -= 1;
        if s.senders == 0 {
            self.0.wake_writer(&mut s);
        }
    }
}

impl OutSender {
    /// Queues a frame, waiting while the connection's own frames fill the queue.
    pub async fn send(&self, frame: Frame) -> Result<(), Closed> {
        let cap = self.0.cap;
        self.0.wait_until(|s| s.queue.len() < cap).await;
        let mut s = self.0.lock();
        if s.writer_gone {
            return Err(Closed);
        }
        self.0.push(&mut s, Out::Frame(frame));
        Ok(())
    }

    /// Queues a frame if there is room now.
    pub fn try_send(&self, frame: Frame) -> Result<(), Closed> {
        let mut s = self.0.lock();
        if s.writer_gone || s.queue.len() >= self.0.cap {
            return Err(Closed);
        }
        self.0.push(&mut s, Out::Frame(frame));
        Ok(())
    }

    /// Says whether the connection is quiet: only pings since the last sign of life. A
    /// delivery ends a quiet spell too.
    pub fn set_quiet(&self, on: bool) {
        if let Some(quiet) = &self.0.quiet {
            quiet.store(on, Ordering::Relaxed);
        }
    }

    /// Resolves once the writer stopped (the socket failed, or the client stopped reading).
    pub async fn closed(&self) {
        self.0.wait_until(|_| false).await;
    }

    /// The handle a mailbox delivers through, for a device session on this connection.
    pub fn session(&self) -> SessionRef {
        SessionRef::Local(self.0.clone())
    }

    /// Deliveries are held from now until [`OutSender::welcome`] (the session is
    /// subscribing).
    pub fn hold(&self) {
        self.0.lock().early.get_or_insert_with(Vec::new);
    }

    /// Queues the session's `welcome`, then what was delivered while it subscribed;
    /// `acked` is the device's cursor.
    pub fn welcome(&self, welcome: Frame, acked: u64) -> Result<(), Closed> {
        let mut s = self.0.lock();
        if s.writer_gone {
            return Err(Closed);
        }
        s.sent = acked;
        self.0.push(&mut s, Out::Frame(welcome));
        for (seq, m) in s.early.take().unwrap_or_default() {
            self.0.queue_msg(&mut s, seq, m);
        }
        Ok(())
    }

    /// Records the client's cumulative ack where the mailbox reads it. `true`: the mailbox
    /// asked to be told by a message ([`SessionRef::want_ack`]); the request is used up.
    pub fn record_ack(&self, seq: u64) -> bool {
        // SeqCst on both sides, against `want_ack`: either the mailbox's re-read sees this
        // ack, or this swap sees its request.
        self.0.client_acked.fetch_max(seq, Ordering::SeqCst);
        self.0.ack_wanted.swap(false, Ordering::SeqCst)
    }

    /// The highest seq queued to the client.
    pub fn sent(&self) -> u64 {
        self.0.lock().sent
    }

    /// Ends the session: later deliveries are refused.
    pub fn end_session(&self) {
        self.0.lock().session_over = true;
    }

    /// Waits for the next signal (several raised at once come together).
    pub async fn signals(&self) -> Vec<Signal> {
        loop {
            let raised = std::mem::take(&mut self.0.lock().signals);
            if raised != 0 {
                let mut out = Vec::new();
                if raised & REPLACED != 0 {
                    out.push(Signal::Replaced);
                }
                if raised & RESUBSCRIBE != 0 {
                    out.push(Signal::Resubscribe);
                }
                if raised & CHECK_ROUTE != 0 {
                    out.push(Signal::CheckRoute);
                }
                return out;
            }
            self.0.signaled.notified().await;
        }
    }

    /// Raises `signal` after `delay`.
    pub fn signal_after(&self, delay: Duration, signal: Signal) {
        self.0.signal_after(delay, signal);
    }
}

/// The writer's end. Dropping it tells every sender the connection is gone.
pub struct OutReceiver(Arc<Outbox>);

impl OutReceiver {
    /// The next entry; `None` once every sender is gone and the queue is drained.
    pub async fn recv(&mut self) -> Option<Out> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Looks at the queue on every poll (a frame queued while wakes were deferred has
    /// woken nobody).
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Out>> {
        let mut s = self.0.lock();
        if let Some(out) = self.pop(&mut s) {
            return Poll::Ready(Some(out));
        }
        if s.senders == 0 {
            return Poll::Ready(None);
        }
        match &s.writer {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.writer = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The handle that defers the writer's wakes while the connection's reading side is
    /// polled in the writer's own task (see [`WakeDeferral`]).
    pub fn wake_deferral(&self) -> WakeDeferral {
        WakeDeferral(self.0.clone())
    }

    /// The next entry if one is queued.
    pub fn try_recv(&mut self) -> Option<Out> {
        let mut s = self.0.lock();
        self.pop(&mut s)
    }

    fn pop(&self, s: &mut State) -> Option<Out> {
        let out = s.queue.pop_front()?;
        if s.queue.is_empty() && s.queue.capacity() > QUEUE_KEEP {
            s.queue = VecDeque::new();
        }
        // Room for a waiting sender: woken only when the queue falls below its cap (it
        // shrinks one entry at a time, so it passes there), not each time it drains, which
        // would wake the connection's task after every frame written.
        if s.queue.len() + 1 == self.0.cap {
            self.0.changed.notify_waiters();
        }
        Some(out)
    }
}

/// For a connection whose reading side and writer are polled by one task, the reading
/// side first: while it is polled, frames it (or anyone) queues do not wake the writer,
/// which is polled next anyway and looks at the queue each time.
pub struct WakeDeferral(Arc<Outbox>);

impl WakeDeferral {
    /// Defers wakes (`true`) until called with `false`; call `false` before polling the
    /// writer.
    pub fn defer(&self, on: bool) {
        self.0.wake_deferred.store(on, Ordering::SeqCst);
    }
}

impl Drop for OutReceiver {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.writer_gone = true;
        s.queue = VecDeque::new();
        s.early = None;
        drop(s);
        self.0.changed.notify_waiters();
        // A session waiting for signals learns of it through `closed`.
    }
}

/// Where a mailbox delivers a subscriber's messages: a device connected to this node, or
/// the stand-in of a device connected to another node.
#[derive(Clone)]
pub enum SessionRef {
    Local(Arc<Outbox>),
    StandIn {
        id: u64,
        actor: ActorRef<SessionMsg>,
    },
}

impl SessionRef {
    /// Unique among the sessions of this node.
    pub fn id(&self) -> u64 {
        match self {
            SessionRef::Local(o) => o.id,
            SessionRef::StandIn { id, .. } => *id,
        }
    }

    /// Committed messages, in seq order. `Err`: the session is gone.
    pub fn deliver(&self, batch: Vec<Committed>) -> Result<(), Closed> {
        match self {
            SessionRef::Local(o) => o.deliver(batch),
            SessionRef::StandIn { actor, .. } => {
                actor.cast(SessionMsg::Deliver(batch)).map_err(|_| Closed)
            }
        }
    }

    /// Raises `signal` (a stand-in takes `Replaced` and `Resubscribe`: it closes the
    /// remote subscription, and the session there acts on it).
    pub fn signal(&self, signal: Signal) {
        match self {
            SessionRef::Local(o) => o.signal(signal),
            SessionRef::StandIn { actor, .. } => {
                let msg = match signal {
                    Signal::Replaced => SessionMsg::Replaced,
                    Signal::Resubscribe => SessionMsg::Resubscribe,
                    Signal::CheckRoute => return,
                };
                let _ = actor.cast(msg);
            }
        }
    }

    /// The client's cumulative ack as its session recorded it (0 before the first). `None`
    /// for a stand-in, whose acks come as messages.
    pub fn client_acked(&self) -> Option<u64> {
        match self {
            SessionRef::Local(o) => Some(o.client_acked.load(Ordering::SeqCst)),
            SessionRef::StandIn { .. } => None,
        }
    }

    /// Asks the session to send the client's next ack as a message, and reads the ack
    /// recorded so far after asking: an ack recorded before the request is seen here, one
    /// recorded after it comes as a message. `None` for a stand-in (every ack comes).
    pub fn want_ack(&self) -> Option<u64> {
        match self {
            SessionRef::Local(o) => {
                o.ack_wanted.store(true, Ordering::SeqCst);
                Some(o.client_acked.load(Ordering::SeqCst))
            }
            SessionRef::StandIn { .. } => None,
        }
    }

    /// Another connection of the device took over.
    pub fn replaced(&self) {
        self.signal(Signal::Replaced);
    }

    /// The mailbox stopped (not to sleep): the session subscribes again.
    pub fn mailbox_stopped(&self) {
        self.signal(Signal::Resubscribe);
    }

    /// Whether deliveries would be refused.
    pub fn is_closed(&self) -> bool {
        match self {
            SessionRef::Local(o) => o.is_closed(),
            SessionRef::StandIn { actor, .. } => actor.get_status() > ractor::ActorStatus::Running,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_bytes::ByteBuf;

    use super::*;

    fn msg(seq: u64) -> Committed {
        let m = StoredMessage {
            id: format!("m{seq}"),
            ts: 0,
            from: None,
            body: ByteBuf::from(vec![1u8; 3]),
        };
        (seq, Arc::new(m))
    }

    fn welcome() -> Frame {
        Frame::Welcome {
            user: "u".into(),
            device: "d".into(),
            node: "n".into(),
            acked: 2,
        }
    }

    fn kinds(rx: &mut OutReceiver) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|o| match o {
                Out::Msg(seq, _) => format!("msg {seq}"),
                Out::Frame(f) => f.type_name().to_string(),
            })
            .collect()
    }

    /// A waker that counts its wakes.
    struct Counted(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_deferred_wake_is_skipped_and_the_writer_still_finds_the_frame() {
        let (tx, mut rx) = Outbox::channel(4);
        let count = Arc::new(Counted(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
        // Queued while the reading side is polled in the writer's task: no wake...
        let deferral = rx.wake_deferral();
        deferral.defer(true);
        tx.try_send(Frame::Pong { n: 1 }).unwrap();
        deferral.defer(false);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "a deferred frame woke the writer"
        );
        // ...and the writer's next poll finds it anyway.
        match rx.poll_recv(&mut cx) {
            Poll::Ready(Some(Out::Frame(Frame::Pong { n: 1 }))) => {}
            other => panic!(
                "expected the pong, got {:?}",
                other.map(|o| o.map(|o| o.into_frame()))
            ),
        }
        // A frame queued from elsewhere (a mailbox's delivery) wakes it.
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.try_send(Frame::Pong { n: 2 }).unwrap();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "an outside frame must wake the writer"
        );
        // The last sender gone wakes it too, and it ends once drained.
        drop(tx);
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(_))));
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn acks_are_recorded_quietly_and_a_message_goes_only_when_asked_for() {
        let (tx, _rx) = Outbox::channel(4);
        let port = tx.session();
        assert_eq!(port.client_acked(), Some(0));
        // Nobody asked: recorded where the mailbox reads them, no message.
        assert!(!tx.record_ack(3));
        assert!(!tx.record_ack(5));
        assert_eq!(port.client_acked(), Some(5));
        // The mailbox asks (its window is full) and reads what was recorded so far.
        assert_eq!(port.want_ack(), Some(5));
        // The next ack must come as a message, and only that one: the request is used up.
        assert!(tx.record_ack(7), "the ack the mailbox waits for is sent");
        assert!(!tx.record_ack(8));
        assert_eq!(port.client_acked(), Some(8));
        // A late, lower ack never moves the recorded one back.
        assert!(!tx.record_ack(6));
        assert_eq!(port.client_acked(), Some(8));
    }

    #[tokio::test]
    async fn deliveries_before_the_welcome_follow_it_and_repeats_are_dropped() {
        let (tx, mut rx) = Outbox::channel(4);
        tx.hold();
        let port = tx.session();
        port.deliver(vec![msg(3), msg(4)]).unwrap();
        assert!(kinds(&mut rx).is_empty(), "nothing goes before the welcome");
        tx.welcome(welcome(), 2).unwrap();
        port.deliver(vec![msg(4), msg(5)]).unwrap();
        assert_eq!(kinds(&mut rx), ["welcome", "msg 3", "msg 4", "msg 5"]);
        assert_eq!(tx.sent(), 5);
        port.deliver(vec![msg(8)]).unwrap();
        assert_eq!(kinds(&mut rx), ["error", "msg 8"], "a jump is said first");
    }

    #[tokio::test]
    async fn a_full_queue_makes_senders_wait_and_a_gone_writer_frees_them() {
        let (tx, mut rx) = Outbox::channel(2);
        tx.send(Frame::Ping { n: 1 }).await.unwrap();
        tx.send(Frame::Ping { n: 2 }).await.unwrap();
        assert!(tx.try_send(Frame::Ping { n: 3 }).is_err(), "full");
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.send(Frame::Ping { n: 3 }).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "waits for room");
        assert!(rx.recv().await.is_some());
        waiting.await.unwrap().unwrap();
        drop(rx);
        assert_eq!(tx.send(Frame::Ping { n: 4 }).await, Err(Closed));
        tx.closed().await;
        assert!(tx.session().deliver(vec![msg(1)]).is_err());
    }

    #[tokio::test]
    async fn the_writer_ends_when_the_last_sender_is_gone_after_draining() {
        let (tx, mut rx) = Outbox::channel(4);
        let tx2 = tx.clone();
        tx.send(Frame::Ping { n: 1 }).await.unwrap();
        drop(tx);
        assert!(rx.recv().await.is_some());
        tx2.send(Frame::Ping { n: 2 }).await.unwrap();
        drop(tx2);
        assert!(
            rx.recv().await.is_some(),
            "queued before the last sender went"
        );
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn signals_wake_the_session_once_and_an_ended_session_refuses_deliveries() {
        let (tx, _rx) = Outbox::channel(4);
        let port = tx.session();
        port.mailbox_stopped();
        port.replaced();
        assert_eq!(tx.signals().await, [Signal::Replaced, Signal::Resubscribe]);
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.signals().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        tx.signal_after(Duration::from_millis(10), Signal::CheckRoute);
        assert_eq!(waiting.await.unwrap(), [Signal::CheckRoute]);
        tx.end_session();
        assert!(port.is_closed());
        assert_eq!(port.deliver(vec![msg(1)]), Err(Closed));
    }
}
