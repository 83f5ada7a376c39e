//! Warbler's actors (ractor): per-user mailboxes and per-connection device sessions.
//!
//! Layout:
//! - [`mailbox`]: `UserMailbox`, one per active user: assigns gap-free `seq`, honours
//!   idempotent ids, proposes appends to the partition log, answers publishers after commit,
//!   pushes committed messages to subscribed sessions within a credit window, tracks device
//!   cursors. Stops when idle; restarts from storage.
//! - [`registry`]: `MailboxRegistry`, the per-node map user → mailbox; it spawns mailboxes
//!   on demand and supervises them. [`Mailboxes`] is the handle the gateway calls.
//!   A mailbox whose devices acknowledged everything goes to sleep: its actor stops and
//!   the registry keeps only who is subscribed, until the next request wakes it.
//! - [`session`]: [`Session`], one per connected device, run by its connection's task:
//!   subscribes to its user's mailbox, forwards cumulative acks, re-subscribes from its
//!   cursor when the mailbox stops or the leader moves.
//! - [`outbox`]: a connection's outgoing queue, which mailboxes deliver onto directly.
//! - [`msg`]: every actor message ([`MailboxMsg`], [`SessionMsg`], `RegistryMsg`), apart
//!   from the actors, so that actor files import messages and not each other.
//! - [`routing`]: in a cluster, requests for users whose partition another node leads go
//!   there: publishes are forwarded, sessions subscribe through a stand-in on the leader.
//! - [`route_service`]: serves peers' routed requests on this node.
//! - [`stand_in`]: `StandIn`, the leader-side stand-in for a session on another node.
//! - [`error`]: the [`MailboxError`] type.
//! - [`bugs`]: deliberate bugs the chaos harness must catch (testing only).

pub mod bugs;
pub mod error;
pub mod mailbox;
pub mod msg;
pub mod outbox;
pub mod registry;
pub mod route_service;
pub mod routing;
pub mod session;
pub mod stand_in;

pub use crate::error::{MailboxError, OVERLOAD_RETRY_MS};
pub use crate::mailbox::{MailboxLimits, LIVE_DELIVERY_MS};
pub use crate::msg::{DeviceInfo, MailboxMsg, SessionMsg, SubscribeInfo};
pub use crate::outbox::{Closed, Out, OutReceiver, OutSender, Outbox, Signal, WakeDeferral};
pub use crate::registry::{Mailboxes, PendingPublish, RegistryArgs};
pub use crate::route_service::RouteService;
pub use crate::routing::Routing;
pub use crate::session::Session;
pub use warbler_cluster::{Leader, Router};
