//! `DeviceSession`: one connected device. The connection's reader task feeds it acks; it
//! writes `welcome` and `msg` frames to the connection's writer queue. It monitors its
//! mailbox and re-subscribes from its cursor when that mailbox stops.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus, SupervisionEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warbler_client::{ErrorCode, Frame};

use crate::mailbox::{Committed, MailboxMsg, SubscribeInfo};
use crate::registry::Mailboxes;

/// How long a session waits before retrying a failed re-subscribe.
const RESUBSCRIBE_RETRY: Duration = Duration::from_secs(1);
/// How long subscribing may take before the connection is refused.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

pub enum SessionMsg {
    /// Committed messages, in seq order.
    Deliver(Vec<Committed>),
    /// The client acknowledged every seq up to this one.
    ClientAck(u64),
    /// Another connection of the same device took over.
    Replaced,
    /// Subscribe again (the mailbox stopped, or an earlier attempt failed).
    Resubscribe,
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
}

pub struct SessionState {
    args: SessionArgs,
    mailbox: ActorRef<MailboxMsg>,
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
        let (mailbox, info) = subscribe(&args, &myself, None).await?;
        args.out
            .send(Frame::Welcome {
                user: args.user.clone(),
                device: args.device.clone(),
                node: args.node.clone(),
                acked: info.acked,
            })
            .await?;
        watch(&myself, &mailbox);
        metrics::gauge!("warbler_sessions_alive").increment(1.0);
        Ok(SessionState {
            args,
            mailbox,
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
        let _ = state.mailbox.cast(MailboxMsg::Unsubscribe {
            device: state.args.device.clone(),
            session: myself.get_id(),
        });
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
                    let frame = Frame::Msg {
                        seq,
                        id: m.id.clone(),
                        ts: m.ts,
                        body: m.body.clone(),
                        from: m.from.clone(),
                    };
                    if state.args.out.send(frame).await.is_err() {
                        myself.stop(Some("connection closed".into()));
                        return Ok(());
                    }
                    state.sent = seq;
                }
            }
            SessionMsg::ClientAck(seq) => {
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
                } else if seq > state.acked {
                    state.acked = seq;
                    let ack = MailboxMsg::Ack {
                        device: state.args.device.clone(),
                        session: myself.get_id(),
                        seq,
                    };
                    if state.mailbox.cast(ack).is_err() {
                        resubscribe(&myself, state).await;
                    }
                }
            }
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
            SessionMsg::Resubscribe => {
                if state.mailbox.get_status() > ActorStatus::Running {
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
        if stopped == state.mailbox.get_id() {
            resubscribe(&myself, state).await;
        }
        Ok(())
    }
}

/// Watches `mailbox` for termination; if it already stopped, asks for a re-subscribe.
fn watch(myself: &ActorRef<SessionMsg>, mailbox: &ActorRef<MailboxMsg>) {
    myself.get_cell().monitor(mailbox.get_cell());
    if mailbox.get_status() > ActorStatus::Running {
        let _ = myself.cast(SessionMsg::Resubscribe);
    }
}

async fn subscribe(
    args: &SessionArgs,
    myself: &ActorRef<SessionMsg>,
    resume: Option<(u64, u64)>,
) -> Result<(ActorRef<MailboxMsg>, SubscribeInfo), ActorProcessingErr> {
    let mailbox = args.mailboxes.get(&args.user).await?;
    let device = args.device.clone();
    let session = myself.clone();
    let info = mailbox
        .call(
            move |reply| MailboxMsg::Subscribe {
                device,
                session,
                resume,
                reply,
            },
            Some(SUBSCRIBE_TIMEOUT),
        )
        .await?;
    match info {
        ractor::rpc::CallResult::Success(info) => Ok((mailbox, info)),
        _ => Err(format!(
            "the mailbox of {} did not accept the subscription",
            args.user
        )
        .into()),
    }
}

/// Subscribes again after the mailbox stopped, resuming after what was already written.
async fn resubscribe(myself: &ActorRef<SessionMsg>, state: &mut SessionState) {
    match subscribe(&state.args, myself, Some((state.acked, state.sent))).await {
        Ok((mailbox, _)) => {
            tracing::debug!(user = %state.args.user, device = %state.args.device, "re-subscribed");
            myself.get_cell().unmonitor(state.mailbox.get_cell());
            state.mailbox = mailbox;
            watch(myself, &state.mailbox);
        }
        Err(e) => {
            tracing::warn!(user = %state.args.user, error = %e, "re-subscribe failed; retrying");
            myself.send_after(RESUBSCRIBE_RETRY, || SessionMsg::Resubscribe);
        }
    }
}
