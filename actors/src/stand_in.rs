//! `StandIn`: the stand-in, on a partition's leader, for a device session connected to
//! another node. It subscribes to the user's mailbox like a local session and forwards each
//! delivery batch to the session's node, one at a time (so batches arrive in order); acks
//! come back the other way. When the mailbox stops it tells the session, which subscribes
//! again wherever the leader is now.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use warbler_cluster::wire::{DeliverReq, Delivery, KeyReq, PeerKind, SubscribeReq, Subscribed};
use warbler_storage::{PartitionId, StoredMessage};

use crate::error::MailboxError;
use crate::msg::{Committed, MailboxMsg, SessionMsg, SubscribeInfo};
use crate::outbox::{next_session_id, SessionRef};
use crate::registry::Mailboxes;
use crate::routing::{Routing, ROUTE_CALL_TIMEOUT};

/// How long a stand-in keeps trying to reach its session's node (a link being dialled again)
/// before it gives the subscription up.
const DELIVER_RETRY_FOR: Duration = Duration::from_secs(10);

/// Most bytes of message bodies in one forwarded delivery (one message larger than this
/// still goes, alone): far below the peer frame limit.
const DELIVER_BYTES_MAX: usize = 2 << 20;

/// About how many bytes `m` takes in a forwarded delivery: body, id, and the seq, time,
/// sender and framing around them. Sizes a stand-in's chunks and a node's `DeliverMany`.
pub(crate) fn delivery_bytes(m: &StoredMessage) -> usize {
    m.body.len() + m.id.len() + 64
}

/// Splits `batch` into runs whose bodies add up to at most `max` bytes (a message larger
/// than that forms a run of its own).
fn chunks_by_bytes(batch: &[Committed], max: usize) -> Vec<&[Committed]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, m)) in batch.iter().enumerate() {
        let size = delivery_bytes(m);
        if i > start && bytes + size > max {
            chunks.push(&batch[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < batch.len() {
        chunks.push(&batch[start..]);
    }
    chunks
}

/// Forwards one delivery to the session's node (with other stand-ins' deliveries for that
/// node, [`Routing::deliver`]). A transport failure (the link dropped and is being dialled
/// again) is retried: the session is likely still there, and what it already took is
/// skipped by its seq. `false`: any other answer, the session is gone.
async fn deliver(a: &StandInArgs, mut req: DeliverReq) -> bool {
    let give_up = Instant::now() + DELIVER_RETRY_FOR;
    loop {
        match a.routing.deliver(a.reply_to, req).await {
            Ok(()) => return true,
            Err((MailboxError::NoLeader(_), Some(back))) if Instant::now() < give_up => {
                req = back;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => return false,
        }
    }
}

/// Starts the stand-in of a remote session; answers (acked, last_seq).
pub(crate) async fn start_stand_in(
    mailboxes: Mailboxes,
    routing: Arc<Routing>,
    peer: String,
    partition: PartitionId,
    r: SubscribeReq,
) -> Result<Subscribed, MailboxError> {
    let (tx, rx) = oneshot::channel();
    let args = StandInArgs {
        mailboxes,
        routing,
        peer,
        partition,
        user: r.user,
        device: r.device,
        key: r.key,
        reply_to: r.reply_to,
        resume: r.resume.map(Into::into),
        info: Some(tx),
    };
    let spawned = Actor::spawn(None, StandIn, args).await;
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
    info.map(|i| Subscribed {
        acked: i.acked,
        last_seq: i.last_seq,
    })
}

pub struct StandInArgs {
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

pub struct StandInState {
    args: StandInArgs,
    /// Its [`SessionRef::id`].
    id: u64,
}

/// The stand-in, on the leader, of a session on another node: subscribed to the mailbox
/// like a local session, it forwards each delivery batch and waits for it to be taken
/// before the next (so batches arrive in order).
pub struct StandIn;

impl Actor for StandIn {
    type Msg = SessionMsg;
    type State = StandInState;
    type Arguments = StandInArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        mut args: StandInArgs,
    ) -> Result<StandInState, ActorProcessingErr> {
        let info = args.info.take().expect("set by start_stand_in");
        let id = next_session_id();
        let me = SessionRef::StandIn {
            id,
            actor: myself.clone(),
        };
        let subscribed = args
            .mailboxes
            .subscribe_local(&args.user, &args.device, me, args.resume)
            .await;
        match subscribed {
            Ok(i) => {
                args.routing
                    .stand_ins
                    .lock()
                    .unwrap()
                    .insert((args.peer.clone(), args.key), myself.clone());
                let _ = info.send(Ok(i));
                Ok(StandInState { args, id })
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
        state: &mut StandInState,
    ) -> Result<(), ActorProcessingErr> {
        let unsubscribe = MailboxMsg::Unsubscribe {
            device: state.args.device.clone(),
            session: state.id,
        };
        state.args.mailboxes.tell(&state.args.user, unsubscribe);
        let key = (state.args.peer.clone(), state.args.key);
        let mut stand_ins = state.args.routing.stand_ins.lock().unwrap();
        if stand_ins
            .get(&key)
            .is_some_and(|p| p.get_id() == myself.get_id())
        {
            stand_ins.remove(&key);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut StandInState,
    ) -> Result<(), ActorProcessingErr> {
        let a = &state.args;
        match msg {
            SessionMsg::Deliver(batch) => {
                // In order, each request well inside the peer frame limit however large
                // the messages are.
                for chunk in chunks_by_bytes(&batch, DELIVER_BYTES_MAX) {
                    let req = DeliverReq {
                        key: a.key,
                        batch: chunk
                            .iter()
                            .map(|(s, m)| Delivery {
                                seq: *s,
                                message: (**m).clone(),
                            })
                            .collect(),
                    };
                    if !deliver(a, req).await {
                        closed(a, false);
                        myself.stop(Some("the remote session is gone".into()));
                        break;
                    }
                }
            }
            SessionMsg::ClientAck(seq) => {
                let ack = MailboxMsg::Ack {
                    device: a.device.clone(),
                    session: state.id,
                    seq,
                };
                a.mailboxes.tell(&a.user, ack);
            }
            SessionMsg::Replaced => {
                closed(a, true);
                myself.stop(Some("replaced".into()));
            }
            // The mailbox stopped (leadership moved, crash, shutdown; not to sleep): the
            // session subscribes again wherever the user's mailbox runs now.
            SessionMsg::Resubscribe => {
                closed(a, false);
                myself.stop(Some("mailbox stopped".into()));
            }
        }
        Ok(())
    }
}

/// Tells the remote session its subscription ended.
fn closed(a: &StandInArgs, replaced: bool) {
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
                .call(addr, partition, PeerKind::Closed, &req, ROUTE_CALL_TIMEOUT)
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

#[cfg(test)]
mod tests {
    use serde_bytes::ByteBuf;
    use warbler_storage::StoredMessage;

    use super::*;

    fn msg(seq: u64, body: usize) -> Committed {
        let m = StoredMessage {
            id: format!("m{seq}"),
            ts: 0,
            from: None,
            body: ByteBuf::from(vec![0u8; body]),
        };
        (seq, Arc::new(m))
    }

    #[test]
    fn deliveries_are_split_by_bytes_in_order_and_a_large_message_goes_alone() {
        let batch: Vec<Committed> = [10, 600, 600, 10, 2000, 10]
            .iter()
            .enumerate()
            .map(|(i, b)| msg(i as u64 + 1, *b))
            .collect();
        let chunks = chunks_by_bytes(&batch, 1000);
        let seqs: Vec<Vec<u64>> = chunks
            .iter()
            .map(|c| c.iter().map(|(s, _)| *s).collect())
            .collect();
        assert_eq!(seqs, vec![vec![1, 2], vec![3, 4], vec![5], vec![6]]);
        assert!(chunks_by_bytes(&[], 1000).is_empty());
        let small: Vec<Committed> = (1..=256).map(|s| msg(s, 10)).collect();
        assert_eq!(
            chunks_by_bytes(&small, 1 << 20).len(),
            1,
            "small ones stay one request"
        );
    }
}
