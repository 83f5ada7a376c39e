//! Warbler's actors (ractor): per-user mailboxes and per-connection device sessions.
//!
//! Layout:
//! - [`mailbox`]: `UserMailbox`, one per active user: assigns gap-free `seq`, honours
//!   idempotent ids, proposes appends to the partition log, answers publishers after commit,
//!   pushes committed messages to subscribed sessions within a credit window, tracks device
//!   cursors. Stops when idle; restarts from storage.
//! - [`registry`]: `MailboxRegistry`, the per-node map user → mailbox; it spawns mailboxes
//!   on demand and supervises them. [`Mailboxes`] is the handle the gateway calls.
//! - [`session`]: `DeviceSession`, one per connected device: subscribes to its user's
//!   mailbox, writes deliveries to the connection, forwards cumulative acks, re-subscribes
//!   from its cursor when the mailbox restarts.
//! - [`route`]: in a cluster, requests for users whose partition another node leads go
//!   there: publishes are forwarded, sessions subscribe through a stand-in on the leader.
//! - [`error`]: the [`MailboxError`] type.
//! - [`bugs`]: deliberate bugs the chaos harness must catch (testing only).

pub mod bugs;
pub mod error;
pub mod mailbox;
pub mod registry;
pub mod route;
pub mod session;

pub use crate::error::MailboxError;
pub use crate::mailbox::{DeviceInfo, MailboxLimits, MailboxMsg, SubscribeInfo};
pub use crate::registry::{Mailboxes, PendingPublish, RegistryArgs};
pub use crate::route::{Leader, RouteService, Router, Routing};
pub use crate::session::{DeviceSession, SessionArgs, SessionMsg};
