//! `DeviceSession`: one connected device. The connection's reader task feeds it acks; it
//! writes `welcome` and `msg` frames to the connection's writer queue. It monitors its
//! mailbox and re-subscribes from its cursor when that mailbox stops. In a cluster the
//! mailbox may run on another node (the partition's leader): the session then subscribes
//! through a stand-in there, and follows the leader when it moves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus, SupervisionEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warbler_client::{ErrorCode, Frame};

use crate::error::MailboxError;
use crate::msg::{MailboxMsg, SessionMsg, SubscribeInfo};
use crate::registry::Mailboxes;
use warbler_cluster::Leader;

/// How long a session waits before retrying a failed re-subscribe.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(250);
/// How long subscribing may take before the connection is refused.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the session's subscription is.
enum Upstream {
    Local(ActorRef<MailboxMsg>),
    /// Through a stand-in on the leader at `addr`, known there by `key`.
    Remote {
        addr: SocketAddr,
        key: u64,
    },
}

pub struct SessionArgs {
    pub user: String,
    pub device: String,
    pub node: String,
    pub mailboxes: Mailboxes,
    /// The connection's writer queue.
    pub out: mpsc::Sender<Frame>,
    /// Cancelled when the session ends, so the connection closes.
    pub closed: CancellationToken,
    /// The highest seq handed to the connection's writer, set before the frame is queued:
    /// the connection drops acks beyond it without queueing anything for this session.
    pub delivered: Arc<AtomicU64>,
}

pub struct SessionState {
    args: SessionArgs,
    upstream: Upstream,
    /// Highest seq the client acked.
    acked: u64,
    /// Highest seq written to the connection.
    sent: u64,
}

pub struct DeviceSession;

impl Actor for DeviceSession {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        // A new connection during a leader election waits for the new leader.
        let give_up = std::time::Instant::now() + SUBSCRIBE_TIMEOUT;
        let (upstream, info) = loop {
            match subscribe(&args, &myself, None).await {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < give_up && is_transient(&e) => {
                    tokio::time::sleep(RESUBSCRIBE_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        };
        args.out
            .send(Frame::Welcome {
                user: args.user.clone(),
                device: args.device.clone(),
                node: args.node.clone(),
                acked: info.acked,
            })
            .await?;
        args.delivered.store(info.acked, Ordering::Release);
        watch(&myself, &upstream);
        metrics::gauge!("warbler_sessions_alive").increment(1.0);
        Ok(SessionState {
            args,
            upstream,
            acked: info.acked,
            sent: info.acked,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        metrics::gauge!("warbler_sessions_alive").decrement(1.0);
        unsubscribe(&myself, state);
        state.args.closed.cancel();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Deliver(batch) => {
                for (seq, m) in batch {
                    if seq <= state.sent {
                        continue; // already written (a re-subscribe resends from the cursor)
                    }
                    if state.sent > 0 && seq > state.sent + 1 {
                        // Seqs are gap-free: only age retention removes messages a device
                        // has not acknowledged. Say so rather than skip them silently.
                        let message = format!(
                            "messages {}..{} to this user were removed by retention (retention.max_age_secs) before this device acknowledged them; delivery goes on from {seq}",
                            state.sent + 1,
                            seq - 1
                        );
                        metrics::counter!("warbler_messages_expired_notices_total").increment(1);
                        let notice = Frame::error(ErrorCode::MessagesExpired, message, None);
                        if state.args.out.send(notice).await.is_err() {
                            myself.stop(Some("connection closed".into()));
                            return Ok(());
                        }
                    }
                    let frame = Frame::Msg {
                        seq,
                        id: m.id.clone(),
                        ts: m.ts,
                        body: m.body.clone(),
                        from: m.from.clone(),
                    };
                    state.args.delivered.store(seq, Ordering::Release);
                    if state.args.out.send(frame).await.is_err() {
                        myself.stop(Some("connection closed".into()));
                        return Ok(());
                    }
                    state.sent = seq;
                }
            }
            SessionMsg::ClientAck(seq) => client_ack(&myself, state, seq).await,
            SessionMsg::Replaced => {
                let message = format!(
                    "device {:?} connected again elsewhere; this connection is closed",
                    state.args.device
                );
                let _ = state
                    .args
                    .out
                    .send(Frame::error(ErrorCode::Replaced, message, None))
                    .await;
                myself.stop(Some("replaced".into()));
            }
            SessionMsg::Resubscribe => resubscribe(&myself, state).await,
            SessionMsg::CheckRoute => {
                if !follows_leader(state) {
                    resubscribe(&myself, state).await;
                }
            }
        }
        Ok(())
    }

    /// The watched mailbox stopped (idle stop cannot happen while subscribed, so: crash,
    /// failed write, or shutdown). Subscribe to its successor from where this session is.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SessionMsg>,
        evt: SupervisionEvent,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        let stopped = match &evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => cell.get_id(),
            SupervisionEvent::ActorFailed(cell, _) => cell.get_id(),
            _ => return Ok(()),
        };
        if matches!(&state.upstream, Upstream::Local(m) if m.get_id() == stopped) {
            resubscribe(&myself, state).await;
        }
        Ok(())
    }
}

/// Watches a local mailbox for termination; if it already stopped, asks for a
/// re-subscribe. (A remote subscription is watched by the routing layer: the stand-in says
/// when it closes, and leadership changes trigger `CheckRoute`.)
fn watch(myself: &ActorRef<SessionMsg>, upstream: &Upstream) {
    if let Upstream::Local(mailbox) = upstream {
        myself.get_cell().monitor(mailbox.get_cell());
        if mailbox.get_status() > ActorStatus::Running {
            let _ = myself.cast(SessionMsg::Resubscribe);
        }
    }
}

fn is_transient(e: &ActorProcessingErr) -> bool {
    e.downcast_ref::<MailboxError>()
        .is_some_and(MailboxError::is_transient)
}

fn unsubscribe(myself: &ActorRef<SessionMsg>, state: &SessionState) {
    match &state.upstream {
        Upstream::Local(mailbox) => {
            myself.get_cell().unmonitor(mailbox.get_cell());
            let _ = mailbox.cast(MailboxMsg::Unsubscribe {
                device: state.args.device.clone(),
                session: myself.get_id(),
            });
        }
        Upstream::Remote { addr, key } => {
            if let Some(r) = state.args.mailboxes.routing() {
                r.unsubscribe_remote(*addr, *key, state.acked);
            }
        }
    }
}

async fn subscribe(
    args: &SessionArgs,
    myself: &ActorRef<SessionMsg>,
    resume: Option<(u64, u64)>,
) -> Result<(Upstream, SubscribeInfo), ActorProcessingErr> {
    match args.mailboxes.leader_of(&args.user) {
        Leader::Local => {}
        Leader::Remote { addr, .. } => {
            let routing = args
                .mailboxes
                .routing()
                .expect("a remote leader implies routing");
            let partition = args.mailboxes.partition_of(&args.user);
            let (key, info) = routing
                .subscribe_remote(
                    addr,
                    partition,
                    &args.user,
                    &args.device,
                    myself.clone(),
                    resume,
                )
                .await?;
            return Ok((Upstream::Remote { addr, key }, info));
        }
        Leader::Unknown(why) => return Err(MailboxError::NoLeader(why).into()),
    }
    let (mailbox, info) = args
        .mailboxes
        .subscribe_local(&args.user, &args.device, myself.clone(), resume)
        .await?;
    Ok((Upstream::Local(mailbox), info))
}

/// Subscribes again (the mailbox stopped or the leader moved), resuming after what was
/// already written to the connection.
async fn resubscribe(myself: &ActorRef<SessionMsg>, state: &mut SessionState) {
    unsubscribe(myself, state);
    match subscribe(&state.args, myself, Some((state.acked, state.sent))).await {
        Ok((upstream, _)) => {
            tracing::debug!(user = %state.args.user, device = %state.args.device, "re-subscribed");
            metrics::counter!("warbler_resubscribes_total").increment(1);
            state.upstream = upstream;
            watch(myself, &state.upstream);
        }
        Err(e) => {
            tracing::debug!(user = %state.args.user, error = %e, "re-subscribe failed; retrying");
            myself.send_after(RESUBSCRIBE_RETRY, || SessionMsg::Resubscribe);
        }
    }
}

/// The client acknowledged every seq up to `seq`: passed on to the mailbox, wherever it
/// runs; an ack beyond what was delivered is refused.
async fn client_ack(myself: &ActorRef<SessionMsg>, state: &mut SessionState, seq: u64) {
    if seq > state.sent {
        let message = format!(
            "ack {seq} is beyond the last delivered seq {}; ack only seqs you received",
            state.sent
        );
        let _ = state
            .args
            .out
            .send(Frame::error(ErrorCode::BadRequest, message, None))
            .await;
        return;
    }
    if seq <= state.acked {
        return;
    }
    state.acked = seq;
    match &state.upstream {
        Upstream::Local(mailbox) => {
            let ack = MailboxMsg::Ack {
                device: state.args.device.clone(),
                session: myself.get_id(),
                seq,
            };
            if mailbox.cast(ack).is_err() {
                resubscribe(myself, state).await;
            }
        }
        Upstream::Remote { addr, key } => {
            if let Some(r) = state.args.mailboxes.routing() {
                r.ack_remote(*addr, *key, seq);
            }
        }
    }
}

/// Whether the session's subscription is with the user's current leader (no leader known
/// counts as yes: keep what there is until one is elected).
fn follows_leader(state: &SessionState) -> bool {
    let leader = state.args.mailboxes.leader_of(&state.args.user);
    match (&state.upstream, &leader) {
        (Upstream::Local(m), Leader::Local) => m.get_status() <= ActorStatus::Running,
        (Upstream::Remote { addr, .. }, Leader::Remote { addr: a, .. }) => addr == a,
        (_, Leader::Unknown(_)) => true,
        _ => false,
    }
}
