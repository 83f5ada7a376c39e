//! Every peer message in one place: [`PeerKind`] numbers each request, and the types below
//! are each kind's request and answer.
//!
//! A request travels as a transport `request` frame whose `kind` is the [`PeerKind`]'s
//! number and whose `body` is the request in MessagePack; the answer comes back as the
//! body of a `response`, or as a refusal with an [`RpcError`](crate::error::RpcError). The
//! numbers and encodings are those of the first release: a request that travelled as a
//! positional tuple still does (the types convert to and from it), so nodes of the previous
//! release and of this one talk. `tests` below pin the encodings.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use warbler_storage::StoredMessage;

use crate::PartitionId;

/// The kind of a peer request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PeerKind {
    /// Consensus: openraft's AppendEntries for the request's partition.
    AppendEntries = 1,
    /// Consensus: openraft's Vote.
    Vote = 2,
    /// Consensus: openraft's InstallSnapshot (one chunk).
    InstallSnapshot = 3,
    /// Consensus: "go quiet at this log" from an idle partition's leader
    /// ([`crate::control::quiesce::Quiesce`]).
    Quiesce = 4,
    /// Consensus: "tick again", from a quiet partition's leader that is stopping: its last
    /// heartbeat leaves a quiet follower quiet, so without this the partition would elect
    /// no one until the leader's node left gossip.
    Wake = 5,
    /// Routing: publish to a user whose partition the receiver leads ([`PublishReq`]).
    Publish = 10,
    /// Routing: subscribe a session elsewhere through a stand-in ([`SubscribeReq`]).
    Subscribe = 11,
    /// Routing: a device's cumulative ack, to its stand-in ([`KeyReq`]).
    Ack = 12,
    /// Routing: end a remote subscription ([`KeyReq`]).
    Unsubscribe = 13,
    /// Routing: a delivery batch from a stand-in to its session's node ([`DeliverReq`]).
    Deliver = 14,
    /// Routing: a stand-in's subscription ended ([`KeyReq`]).
    Closed = 15,
    /// Routing: a user's devices ([`UserReq`]).
    Devices = 16,
    /// Routing: one message to many users of the receiver's partition, a fan-out's share
    /// ([`PublishManyReq`]).
    PublishMany = 17,
    /// Routing: devices' cumulative acks, for their stand-ins on the receiver, carried
    /// together ([`AckManyReq`]); answered with the keys whose stand-in is gone.
    AckMany = 18,
    /// Routing: delivery batches of several stand-ins for sessions on the receiver, carried
    /// together ([`DeliverManyReq`]); answered with the keys whose session is gone.
    DeliverMany = 19,
    /// Routing: publishes to users of partitions the receiver leads, forwarded together
    /// ([`PublishBatchReq`]); answered per publish, in order.
    PublishBatch = 30,
    /// Control: "which nodes form this cluster?" (answered by formed nodes).
    Members = 20,
    /// Control: "add this node to the member list" ([`ListChange`]).
    Join = 21,
    /// Control: "make this partition's replicas these" ([`Reconfigure`]).
    Reconfigure = 22,
    /// Control: "is this node still in this partition's group?" ([`NodeReq`]).
    MemberOf = 23,
    /// Control: "remove this node from the member list" ([`ListChange`]).
    Decommission = 24,
    /// Control: "how far have you applied the partitions you lead?" ([`AppliedReq`]).
    Applied = 25,
    /// Control: "which partitions do you lead?" ([`crate::control::balance::Leading`]).
    Leading = 26,
    /// Control: "hand this partition's leadership to that node"
    /// ([`crate::control::balance::HandLead`]).
    HandLead = 27,
    /// Control: "campaign now", from the partition's leader ([`crate::control::balance::TakeLead`]).
    TakeLead = 28,
    /// Control: "how far have you applied this partition you lead? Tell my replica your
    /// commit index now" ([`AppliedReq`], answered like [`PeerKind::Applied`]): a follower
    /// serving a read waits until it applied that much.
    ReadIndex = 29,
    /// Transport: calls queued for one peer at the same time, carried in one request
    /// ([`ManyCall`] each, answered with a [`ManyAnswer`] each, in order).
    Many = 254,
    /// Transport: a sign of life, answered by the transport itself.
    Probe = 255,
}

/// Which part of a node serves a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Consensus,
    Route,
    Control,
    Transport,
}

impl PeerKind {
    pub const ALL: [PeerKind; 28] = [
        PeerKind::AppendEntries,
        PeerKind::Vote,
        PeerKind::InstallSnapshot,
        PeerKind::Quiesce,
        PeerKind::Wake,
        PeerKind::Publish,
        PeerKind::Subscribe,
        PeerKind::Ack,
        PeerKind::Unsubscribe,
        PeerKind::Deliver,
        PeerKind::Closed,
        PeerKind::Devices,
        PeerKind::PublishMany,
        PeerKind::AckMany,
        PeerKind::DeliverMany,
        PeerKind::Members,
        PeerKind::Join,
        PeerKind::Reconfigure,
        PeerKind::MemberOf,
        PeerKind::Decommission,
        PeerKind::Applied,
        PeerKind::Leading,
        PeerKind::HandLead,
        PeerKind::TakeLead,
        PeerKind::ReadIndex,
        PeerKind::PublishBatch,
        PeerKind::Many,
        PeerKind::Probe,
    ];

    /// The kind numbered `n` on the wire.
    pub fn from_wire(n: u8) -> Option<PeerKind> {
        PeerKind::ALL.into_iter().find(|k| *k as u8 == n)
    }

    /// The kind's name in metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::AppendEntries => "append_entries",
            PeerKind::Vote => "vote",
            PeerKind::InstallSnapshot => "install_snapshot",
            PeerKind::Quiesce => "quiesce",
            PeerKind::Wake => "wake",
            PeerKind::Publish => "publish",
            PeerKind::Subscribe => "subscribe",
            PeerKind::Ack => "ack",
            PeerKind::Unsubscribe => "unsubscribe",
            PeerKind::Deliver => "deliver",
            PeerKind::Closed => "closed",
            PeerKind::Devices => "devices",
            PeerKind::PublishMany => "publish_many",
            PeerKind::AckMany => "ack_many",
            PeerKind::DeliverMany => "deliver_many",
            PeerKind::Members => "members",
            PeerKind::Join => "join",
            PeerKind::Reconfigure => "reconfigure",
            PeerKind::MemberOf => "member_of",
            PeerKind::Decommission => "decommission",
            PeerKind::Applied => "applied",
            PeerKind::Leading => "leading",
            PeerKind::HandLead => "hand_lead",
            PeerKind::TakeLead => "take_lead",
            PeerKind::ReadIndex => "read_index",
            PeerKind::PublishBatch => "publish_batch",
            PeerKind::Many => "many",
            PeerKind::Probe => "probe",
        }
    }

    pub fn layer(self) -> Layer {
        match self as u8 {
            1..=5 => Layer::Consensus,
            10..=19 | 30..=39 => Layer::Route,
            20..=29 => Layer::Control,
            _ => Layer::Transport,
        }
    }
}

/// [`PeerKind::Publish`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishReq {
    pub user: String,
    pub id: String,
    pub body: ByteBuf,
    pub from: Option<String>,
    /// The publish this one follows on its connection, while that one is unanswered: the
    /// leader takes this one only after it. Absent from older nodes (no order kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// [`PeerKind::PublishMany`]: the same message (one id, one body) to every user listed, all
/// of one partition. Answered per user, in this order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishManyReq {
    pub users: Vec<String>,
    pub id: String,
    pub body: ByteBuf,
    pub from: Option<String>,
}

/// [`PeerKind::PublishBatch`]: publishes to users whose partitions the receiver leads, in
/// the order the sender took them; the receiver hands them to their mailboxes in this order.
/// Answered with one `Result<seq, _>` per publish, in the same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishBatchReq {
    pub publishes: Vec<PublishReq>,
}

/// One call inside a [`PeerKind::Many`] request: what a request frame of its own would
/// carry, without the id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManyCall {
    pub partition: u16,
    pub kind: u8,
    pub body: ByteBuf,
}

/// The answer to one [`ManyCall`], as a response frame of its own would carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManyAnswer {
    pub ok: bool,
    pub body: ByteBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<crate::error::RpcCode>,
}

/// [`PeerKind::Devices`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserReq {
    pub user: String,
}

/// A device's cursor to resume from: where its connection's last delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u64, u64)", into = "(u64, u64)")]
pub struct Resume {
    /// The seq the device acked.
    pub acked: u64,
    /// The last seq its connection was sent.
    pub sent: u64,
}

/// [`PeerKind::Subscribe`]: `key` names the subscription on the session's node; deliveries
/// go to `reply_to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscribeReq {
    pub user: String,
    pub device: String,
    pub key: u64,
    pub resume: Option<Resume>,
    pub reply_to: SocketAddr,
}

/// The answer to [`PeerKind::Subscribe`] (on the wire: `(acked, last_seq)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u64, u64)", into = "(u64, u64)")]
pub struct Subscribed {
    pub acked: u64,
    pub last_seq: u64,
}

/// [`PeerKind::Ack`] (`seq`), [`PeerKind::Unsubscribe`] and [`PeerKind::Closed`]
/// (`replaced`: another connection of the same device took over).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyReq {
    pub key: u64,
    pub seq: u64,
    pub replaced: bool,
}

/// [`PeerKind::AckMany`]: the acks of sessions on the sender for their stand-ins on the
/// receiver, each `(key, seq)` as in [`KeyReq`]; one per session (acks are cumulative).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AckManyReq {
    pub acks: Vec<(u64, u64)>,
}

/// One delivered message (on the wire: `(seq, message)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "(u64, StoredMessage)", into = "(u64, StoredMessage)")]
pub struct Delivery {
    pub seq: u64,
    pub message: StoredMessage,
}

/// [`PeerKind::Deliver`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliverReq {
    pub key: u64,
    pub batch: Vec<Delivery>,
}

/// [`PeerKind::DeliverMany`]: one delivery batch from each of several stand-ins, for their
/// sessions on the receiver (a stand-in has at most one batch in flight, so each session's
/// batches still arrive in order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliverManyReq {
    pub batches: Vec<DeliverReq>,
}

/// One device in the answer to [`PeerKind::Devices`] (on the wire: `(device, acked,
/// online)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(String, u64, bool)", into = "(String, u64, bool)")]
pub struct DeviceCursor {
    pub device: String,
    pub acked: u64,
    pub online: bool,
}

/// [`PeerKind::MemberOf`]: a node's name (on the wire: the bare string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeReq(pub String);

/// [`PeerKind::Join`] and [`PeerKind::Decommission`]: the node to add or remove, and whether
/// the request was forwarded to the member list's leader already (it is never forwarded
/// twice).
///
/// On the wire, as the previous release sends it, the body is the bare name and the flag
/// rides in the frame's `partition` field (1: forwarded). [`ListChange::frame`] and
/// [`ListChange::from_frame`] are the only code that knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListChange {
    pub node: String,
    pub forwarded: bool,
}

impl ListChange {
    /// The frame's `partition` field and body.
    pub fn frame(&self) -> (u16, Vec<u8>) {
        (u16::from(self.forwarded), encode(&self.node))
    }

    pub fn from_frame(partition: u16, body: &[u8]) -> Result<ListChange, rmp_serde::decode::Error> {
        Ok(ListChange {
            node: decode(body)?,
            forwarded: partition == 1,
        })
    }
}

/// [`PeerKind::Applied`]: the partitions to report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AppliedReq(pub Vec<PartitionId>);

/// One partition in the answer to [`PeerKind::Applied`] (on the wire: `(partition,
/// applied)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(PartitionId, u64)", into = "(PartitionId, u64)")]
pub struct Applied {
    pub partition: PartitionId,
    pub applied: u64,
}

/// `From` both ways between a struct and the tuple of its fields, in order: with
/// `#[serde(from, into)]` the struct travels as that tuple, as the previous release sent it.
macro_rules! tuple_on_wire {
    ($t:ident { $($f:ident: $ty:ty),+ }) => {
        impl From<($($ty,)+)> for $t {
            fn from(($($f,)+): ($($ty,)+)) -> $t {
                $t { $($f),+ }
            }
        }

        impl From<$t> for ($($ty,)+) {
            fn from(v: $t) -> ($($ty,)+) {
                ($(v.$f,)+)
            }
        }
    };
}

tuple_on_wire!(Resume {
    acked: u64,
    sent: u64
});
tuple_on_wire!(Subscribed {
    acked: u64,
    last_seq: u64
});
tuple_on_wire!(Delivery {
    seq: u64,
    message: StoredMessage
});
tuple_on_wire!(DeviceCursor {
    device: String,
    acked: u64,
    online: bool
});
tuple_on_wire!(Applied {
    partition: PartitionId,
    applied: u64
});

pub use crate::control::{MemberList, Moved, Reconfigure};

/// A request or answer in MessagePack with field names (the encoding of every peer body).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("peer messages serialize")
}

/// Decodes a peer body.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_change_keeps_the_previous_frame() {
        let fwd = ListChange {
            node: "n4".into(),
            forwarded: true,
        };
        assert_eq!(fwd.frame(), (1, encode(&"n4".to_string())));
        let (p, body) = fwd.frame();
        assert_eq!(ListChange::from_frame(p, &body).unwrap(), fwd);
        let first = ListChange::from_frame(0, &body).unwrap();
        assert!(!first.forwarded);
    }

    #[test]
    fn kinds_keep_their_numbers() {
        let numbers: Vec<u8> = PeerKind::ALL.iter().map(|k| *k as u8).collect();
        assert_eq!(
            numbers,
            [
                1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
                27, 28, 29, 30, 254, 255
            ]
        );
        for k in PeerKind::ALL {
            assert_eq!(PeerKind::from_wire(k as u8), Some(k));
        }
        assert_eq!(PeerKind::from_wire(6), None);
        assert_eq!(PeerKind::Wake.layer(), Layer::Consensus);
        assert_eq!(PeerKind::Quiesce.layer(), Layer::Consensus);
        assert_eq!(PeerKind::PublishMany.layer(), Layer::Route);
        assert_eq!(PeerKind::AckMany.layer(), Layer::Route);
        assert_eq!(PeerKind::DeliverMany.layer(), Layer::Route);
        assert_eq!(PeerKind::Publish.layer(), Layer::Route);
        assert_eq!(PeerKind::PublishBatch.layer(), Layer::Route);
        assert_eq!(PeerKind::Many.layer(), Layer::Transport);
        assert_eq!(PeerKind::Applied.layer(), Layer::Control);
        assert_eq!(PeerKind::ReadIndex.layer(), Layer::Control);
        assert_eq!(PeerKind::TakeLead.layer(), Layer::Control);
        assert_eq!(PeerKind::Vote.layer(), Layer::Consensus);
    }

    /// The previous release sent these as tuples and bare values: the typed messages must
    /// encode byte for byte the same.
    #[test]
    fn typed_messages_encode_as_the_previous_release_did() {
        let same = |typed: Vec<u8>, old: Vec<u8>| assert_eq!(typed, old);
        same(
            encode(&Subscribed {
                acked: 3,
                last_seq: 9,
            }),
            encode(&(3u64, 9u64)),
        );
        same(
            encode(&Applied {
                partition: 4,
                applied: 7,
            }),
            encode(&(4u16, 7u64)),
        );
        same(encode(&NodeReq("n1".into())), encode(&"n1".to_string()));
        same(encode(&AppliedReq(vec![1, 2])), encode(&vec![1u16, 2]));
        let d = DeviceCursor {
            device: "phone".into(),
            acked: 5,
            online: true,
        };
        same(
            encode(&vec![d]),
            encode(&vec![("phone".to_string(), 5u64, true)]),
        );
        let m = StoredMessage {
            id: "m".into(),
            ts: 1,
            from: None,
            body: ByteBuf::from(vec![1, 2]),
        };
        #[derive(Serialize)]
        struct OldDeliver {
            key: u64,
            batch: Vec<(u64, StoredMessage)>,
        }
        let old = OldDeliver {
            key: 8,
            batch: vec![(2, m.clone())],
        };
        let new = DeliverReq {
            key: 8,
            batch: vec![Delivery { seq: 2, message: m }],
        };
        same(encode(&new), encode(&old));
        #[derive(Serialize)]
        struct OldSubscribe {
            user: String,
            device: String,
            key: u64,
            resume: Option<(u64, u64)>,
            reply_to: SocketAddr,
        }
        let addr = SocketAddr::from(([10, 0, 0, 1], 7410));
        let old = OldSubscribe {
            user: "u".into(),
            device: "d".into(),
            key: 1,
            resume: Some((2, 3)),
            reply_to: addr,
        };
        let new = SubscribeReq {
            user: "u".into(),
            device: "d".into(),
            key: 1,
            resume: Some(Resume { acked: 2, sent: 3 }),
            reply_to: addr,
        };
        same(encode(&new), encode(&old));
        let back: SubscribeReq = decode(&encode(&old)).unwrap();
        assert_eq!(back, new);
    }
}
