//! Every actor message in one place, apart from the actors' behaviour, so that the actor
//! files import these and not each other.
//!
//! - [`MailboxMsg`]: to a `UserMailbox` (publish, subscribe, ack, devices).
//! - [`SessionMsg`]: to a session, a local `DeviceSession` or a `StandIn` for a session on
//!   another node (deliveries, acks, re-subscribe).
//! - [`RegistryMsg`]: to the node's `MailboxRegistry`.

use std::sync::Arc;

use ractor::{ActorId, ActorRef, RpcReplyPort};

use crate::outbox::SessionRef;
use serde_bytes::ByteBuf;
use warbler_storage::{PartitionId, StorageError, StoredMessage};

use crate::error::MailboxError;

/// A committed message as handed to sessions (shared, not copied per device).
pub type Committed = (u64, Arc<StoredMessage>);

/// What a subscriber learns when it subscribes.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeInfo {
    /// The device's cursor: every message up to here was acked.
    pub acked: u64,
    /// The highest committed seq.
    pub last_seq: u64,
}

/// One device of the user, as `GET /v1/users/{user}/devices` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device: String,
    pub acked: u64,
    pub online: bool,
}

pub enum MailboxMsg {
    /// Store a message; replies with its seq once durable.
    Publish {
        id: String,
        body: ByteBuf,
        from: Option<String>,
        /// The id of the publish before this one to the same user on the same connection,
        /// while that one was not answered yet: this one is taken only after it.
        after: Option<String>,
        reply: RpcReplyPort<Result<u64, MailboxError>>,
    },
    /// The partition log finished entry `seq` (sent by the commit callback, in order).
    Committed {
        seq: u64,
        result: Result<(), StorageError>,
    },
    /// Subscribe a session for `device`. `resume` = (acked, sent) of a session that
    /// re-subscribes after the mailbox restarted; `None` for a new connection.
    Subscribe {
        device: String,
        session: SessionRef,
        resume: Option<(u64, u64)>,
        reply: RpcReplyPort<SubscribeInfo>,
    },
    /// `session` is [`SessionRef::id`].
    Unsubscribe {
        device: String,
        session: u64,
    },
    /// Cumulative ack from a device's session.
    Ack {
        device: String,
        session: u64,
        seq: u64,
    },
    Devices {
        reply: RpcReplyPort<Vec<DeviceInfo>>,
    },
    IdleCheck,
    /// Write the cursors that moved since the last write (see
    /// [`crate::MailboxLimits::cursor_flush`]).
    FlushCursors,
    /// The partition's leader changed since this node led it: stop unless this node leads
    /// it in the mailbox's term.
    LeaderMoved,
}

/// A device subscribed to a mailbox that went to sleep, as the registry keeps it: every
/// message up to `acked` was sent and acknowledged.
pub struct Sleeper {
    pub device: String,
    pub session: SessionRef,
    pub acked: u64,
}

/// To a `StandIn`, the leader's stand-in for a session on another node.
pub enum SessionMsg {
    /// Committed messages, in seq order.
    Deliver(Vec<Committed>),
    /// The client acknowledged every seq up to this one.
    ClientAck(u64),
    /// Another connection of the same device took over.
    Replaced,
    /// The mailbox stopped (not to sleep): the subscription is over.
    Resubscribe,
}

/// How the registry took a subscription ([`RegistryMsg::Subscribe`]).
pub enum Subscribed {
    /// The device joined the sleeping mailbox's subscribers.
    Asleep(SubscribeInfo),
    /// Subscribe to this mailbox.
    Mailbox(ActorRef<MailboxMsg>),
}

/// To the node's `MailboxRegistry`.
pub enum RegistryMsg {
    /// The running mailbox of `user`, spawned if needed.
    Get {
        user: String,
        partition: PartitionId,
        reply: RpcReplyPort<Result<ActorRef<MailboxMsg>, MailboxError>>,
    },
    /// Number of active mailboxes.
    Count { reply: RpcReplyPort<usize> },
    /// A device subscribes to `user`'s mailbox, which is not running: if the device has
    /// acknowledged everything stored, it joins the sleeping subscribers and no mailbox
    /// starts; else the answer is the mailbox to subscribe to, started for it.
    Subscribe {
        user: String,
        partition: PartitionId,
        device: String,
        session: SessionRef,
        reply: RpcReplyPort<Result<Subscribed, MailboxError>>,
    },
    /// This node stopped leading `partition`: stop its mailboxes (their sessions subscribe
    /// again where the partition is led now), each unless it was started under a
    /// leadership this node holds again ([`MailboxMsg::LeaderMoved`]).
    StopPartition { partition: PartitionId },
    /// For `user`'s mailbox, which was not running when sent: given to it if it runs now,
    /// else applied to its sleeping subscribers (an unsubscribe) or dropped (an ack: a
    /// mailbox sleeps only once everything it sent was acked).
    Tell { user: String, msg: MailboxMsg },
    /// The mailbox `mailbox` of `user` went to sleep: it keeps its subscribers here until the
    /// next request for the user wakes it.
    Asleep {
        user: String,
        mailbox: ActorId,
        subs: Vec<Sleeper>,
    },
}
