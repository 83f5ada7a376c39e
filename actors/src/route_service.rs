//! Serving peers' routed requests on this node: publishes and device queries for users
//! whose partition this node leads, subscriptions through stand-ins, and deliveries to
//! sessions here that subscribed elsewhere.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::ActorRef;
use serde::de::DeserializeOwned;
use serde::Serialize;
use warbler_cluster::transport::BoxFuture;
use warbler_cluster::wire::{
    AckManyReq, DeliverManyReq, DeliverReq, DeviceCursor, KeyReq, PeerKind, PublishBatchReq,
    PublishManyReq, PublishReq, SubscribeReq, UserReq,
};
use warbler_cluster::{Leader, PeerHandler, RpcCode, RpcError};
use warbler_storage::PartitionId;

use crate::error::MailboxError;
use crate::msg::SessionMsg;
use crate::outbox::Signal;
use crate::registry::Mailboxes;
use crate::routing::{Routing, Wire};
use crate::stand_in::start_stand_in;

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

fn reply<T: Serialize>(v: &Wire<T>) -> Result<Vec<u8>, RpcError> {
    Ok(rmp_serde::to_vec_named(v).expect("routing answers serialize"))
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    rmp_serde::from_slice(body).map_err(|e| RpcError::bad_request("routed request", e))
}

impl PeerHandler for RouteService {
    fn handle(
        &self,
        from: String,
        partition: u16,
        kind: PeerKind,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        let (mailboxes, routing) = (self.mailboxes.clone(), self.routing.clone());
        Box::pin(async move {
            match kind {
                PeerKind::Publish
                | PeerKind::PublishBatch
                | PeerKind::PublishMany
                | PeerKind::Devices
                | PeerKind::Subscribe => {
                    as_leader(mailboxes, routing, from, partition, kind, &body).await
                }
                PeerKind::Ack | PeerKind::Unsubscribe => {
                    to_stand_in(&routing, from, kind, decode(&body)?)
                }
                PeerKind::AckMany => acks_to_stand_ins(&routing, from, decode(&body)?),
                PeerKind::Deliver => to_session(&routing, decode(&body)?),
                PeerKind::DeliverMany => to_sessions(&routing, decode(&body)?),
                PeerKind::Closed => closed(&routing, decode(&body)?),
                other => Err(RpcError::new(
                    RpcCode::UnknownKind,
                    format!("{other:?} is not a routing request"),
                )),
            }
        })
    }
}

/// Requests for a user's mailbox, sent here as the partition's leader.
async fn as_leader(
    mailboxes: Mailboxes,
    routing: Arc<Routing>,
    from: String,
    partition: PartitionId,
    kind: PeerKind,
    body: &[u8],
) -> Result<Vec<u8>, RpcError> {
    match kind {
        PeerKind::Publish => {
            let r: PublishReq = decode(body)?;
            let answer = mailboxes
                .publish_local(&r.user, &r.id, r.body, r.from, r.after)
                .await;
            reply(&redirect(&routing, partition, answer))
        }
        PeerKind::PublishBatch => {
            let r: PublishBatchReq = decode(body)?;
            let partitions: Vec<PartitionId> = r
                .publishes
                .iter()
                .map(|p| mailboxes.partition_of(&p.user))
                .collect();
            let answers: Vec<Wire<u64>> = mailboxes
                .publish_batch_local(r.publishes)
                .await
                .into_iter()
                .zip(partitions)
                .map(|(answer, partition)| redirect(&routing, partition, answer))
                .collect();
            reply(&Ok::<_, MailboxError>(answers))
        }
        PeerKind::PublishMany => {
            let r: PublishManyReq = decode(body)?;
            let answer = mailboxes
                .publish_many_local(partition, &r.users, &r.id, r.body, r.from)
                .await;
            reply(&redirect(&routing, partition, answer))
        }
        PeerKind::Devices => {
            let r: UserReq = decode(body)?;
            let devices = mailboxes.devices_local(&r.user).await.map(|d| {
                d.into_iter()
                    .map(|d| DeviceCursor {
                        device: d.device,
                        acked: d.acked,
                        online: d.online,
                    })
                    .collect::<Vec<_>>()
            });
            reply(&redirect(&routing, partition, devices))
        }
        _ => {
            let r: SubscribeReq = decode(body)?;
            let answer = start_stand_in(mailboxes, routing.clone(), from, partition, r).await;
            reply(&redirect(&routing, partition, answer))
        }
    }
}

/// A device's ack, or the end of its subscription, for the stand-in of a session on `from`.
fn to_stand_in(
    routing: &Routing,
    from: String,
    kind: PeerKind,
    r: KeyReq,
) -> Result<Vec<u8>, RpcError> {
    let key = (from, r.key);
    if kind == PeerKind::Unsubscribe {
        let stand_in = routing.stand_ins.lock().unwrap().remove(&key);
        if let Some(p) = stand_in {
            // The session's last ack rides along (its own call may come later): applied
            // before the stand-in stops. `seq` 0 (a previous release) acks nothing.
            if r.seq > 0 {
                let _ = p.cast(SessionMsg::ClientAck(r.seq));
            }
            let _ = p.drain();
        }
        return reply(&Ok(()));
    }
    let stand_ins = routing.stand_ins.lock().unwrap();
    reply(&ack_stand_in(&stand_ins, &key, r.seq))
}

/// Hands a device's ack to the stand-in of its session; `Restarted` when the stand-in is
/// gone (the session subscribes again).
fn ack_stand_in(
    stand_ins: &HashMap<(String, u64), ActorRef<SessionMsg>>,
    key: &(String, u64),
    seq: u64,
) -> Result<(), MailboxError> {
    match stand_ins.get(key) {
        Some(p) => p
            .cast(SessionMsg::ClientAck(seq))
            .map_err(|_| MailboxError::Restarted),
        None => Err(MailboxError::Restarted),
    }
}

/// Devices' acks for the stand-ins of their sessions on `from`; answers the keys whose
/// stand-in is gone (those sessions subscribe again).
fn acks_to_stand_ins(routing: &Routing, from: String, r: AckManyReq) -> Result<Vec<u8>, RpcError> {
    let stand_ins = routing.stand_ins.lock().unwrap();
    let mut at = (from, 0);
    let gone: Vec<u64> = r
        .acks
        .into_iter()
        .filter(|&(key, seq)| {
            at.1 = key;
            ack_stand_in(&stand_ins, &at, seq).is_err()
        })
        .map(|(key, _)| key)
        .collect();
    reply(&Ok::<_, MailboxError>(gone))
}

/// A delivery batch from a stand-in, for a session on this node.
fn to_session(routing: &Routing, r: DeliverReq) -> Result<Vec<u8>, RpcError> {
    reply(&hand_to_session(routing, r))
}

/// Delivery batches of several stand-ins, for sessions on this node; answers the keys whose
/// session is gone.
fn to_sessions(routing: &Routing, r: DeliverManyReq) -> Result<Vec<u8>, RpcError> {
    let gone: Vec<u64> = r
        .batches
        .into_iter()
        .filter_map(|b| {
            let key = b.key;
            hand_to_session(routing, b).is_err().then_some(key)
        })
        .collect();
    reply(&Ok::<_, MailboxError>(gone))
}

fn hand_to_session(routing: &Routing, r: DeliverReq) -> Result<(), MailboxError> {
    let batch = r
        .batch
        .into_iter()
        .map(|d| (d.seq, Arc::new(d.message)))
        .collect();
    match routing.remote_sub(r.key) {
        Some((_, s)) => s.deliver(batch).map_err(|_| MailboxError::Restarted),
        None => Err(MailboxError::Restarted),
    }
}

/// A stand-in's subscription ended: its session here subscribes again (or closes, when
/// another connection of the device took over).
fn closed(routing: &Routing, r: KeyReq) -> Result<Vec<u8>, RpcError> {
    if let Some((_, s)) = routing.remote_sub(r.key) {
        s.signal(if r.replaced {
            Signal::Replaced
        } else {
            Signal::Resubscribe
        });
    }
    reply(&Ok(()))
}
