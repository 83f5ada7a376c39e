//! The cluster's control plane as decisions: plain functions and types that take snapshots
//! of what a node sees (gossip, its Raft groups' metrics, peers' answers) and return what it
//! should do. No tokio, no sockets, no Raft handles: the driver in [`crate::node`] gathers
//! the snapshots, calls these and carries the decisions out; tests drive them in
//! milliseconds.
//!
//! Layout:
//! - [`group`]: [`GroupView`], what a Raft group's metrics say (voters, leader, applied).
//! - [`members`]: the member list, its epoch rule, joins and decommissions of the
//!   member-list group, and how a node learns it was decommissioned.
//! - [`start`]: what a starting node does: use its stored list, form a new cluster once
//!   `bootstrap_expect` nodes are up, join, rejoin, or form as a late founder.
//! - [`placement`]: the ring's placement for a member list; which replicas a node starts or
//!   drops, and whom it asks whether it left a group.
//! - [`rebalance`]: the coordinator that asks partition leaders to move replicas (a state
//!   machine over their answers, a few moves at once) and a partition leader's side of it.
//! - [`leader`]: who leads a partition as this node knows it, and guesses corrected by
//!   redirects.
//! - [`ready`]: whether a node is ready to serve (`/readyz`).
//! - [`quiesce`]: when an idle partition stops ticking, and what wakes it.
//! - [`balance`]: spreading partition leaders evenly, and how a leader hands one over.
//! - [`dead`]: which member has been down long enough to be replaced.

pub mod balance;
pub mod dead;
pub mod group;
pub mod leader;
pub mod members;
pub mod placement;
pub mod quiesce;
pub mod ready;
pub mod rebalance;
pub mod start;

pub use group::GroupView;
pub use leader::{LeaderHints, LeaderView};
pub use members::{raft_id, MemberList};
pub use ready::NotReady;
pub use rebalance::{Coordinator, Moved, Reconfigure};
