//! Warbler's cluster: placement, membership, the peer transport, per-partition consensus,
//! and the control plane that forms the cluster and moves partitions.
//!
//! Layout:
//! - [`partition`]: the fixed, documented user → partition hash (FNV-1a 64 over the user id's
//!   UTF-8 bytes, modulo the partition count). Platform-independent: a client in any
//!   language computes the same partition.
//! - [`ring`]: partitions → ordered replica lists by consistent hashing with virtual nodes
//!   over the members (pure functions).
//! - [`membership`]: SWIM membership and failure detection (foca) over UDP: the live view
//!   of the cluster, published on a watch channel.
//! - [`transport`]: request/response RPC to peers over one multiplexed TCP connection per
//!   peer, versioned frames, optional mutual TLS, bounded queues, reconnect with backoff.
//! - [`grid`]: periodic work on shared instants: the node's loops and every Raft group's
//!   tick, so an idle node wakes a few times a second, not once per group.
//! - [`key`]: the cluster key: challenge and response on peer connections, MACs on gossip.
//! - [`identity`]: the cluster id kept on disk and checked on every peer connection.
//! - [`wire`]: every peer message: [`PeerKind`] and each kind's typed request and answer.
//! - [`error`]: [`ControlError`], [`RpcError`] (a refusal with a code that crosses the
//!   wire) and [`ClusterError`].
//! - [`raft_store`]: one partition's consensus log and state machine (openraft) in the
//!   node's RocksDB, checked by openraft's own storage test suite.
//! - [`entry_cache`]: the newest entries of a partition's log, kept decoded so replication
//!   and apply do not read back what was just appended.
//! - [`raft_net`]: openraft's network over the peer transport, and the service that hands
//!   peers' consensus RPCs to each partition's `Raft`.
//! - [`raft_log`]: the replicated `PartitionLog`: proposals batched into entries (by ops
//!   and bytes) through each partition's Raft group, completions in log order, a backlog
//!   bound past which publishes are refused.
//! - [`router`]: [`Leader`] and the [`Router`] trait: which node leads a partition.
//! - [`control`]: the control plane's decisions, with no I/O: the member list, starting,
//!   placement, rebalancing, leader hints, readiness, quiescence. Unit-tested in
//!   milliseconds.
//! - [`node`]: [`ClusterNode`], the driver that runs membership, the Raft groups and the
//!   control loops and carries the decisions out.

pub mod control;
pub mod entry_cache;
pub mod error;
pub mod grid;
pub mod identity;
pub mod key;
pub mod membership;
pub mod node;
pub mod partition;
pub mod raft_log;
pub mod raft_net;
pub mod raft_store;
pub mod ring;
pub mod router;
pub mod transport;
pub mod wire;

pub use crate::control::MemberList;
pub use crate::error::{ClusterError, ControlError, RpcCode, RpcError};
pub use crate::key::ClusterKey;
pub use crate::membership::{Membership, NodeId, NodeMeta, NodeState, Timing};
pub use crate::node::{ClusterNode, LeaderChange};
pub use crate::partition::{fnv1a64, partition_of};
pub use crate::ring::{Ring, VNODES_DEFAULT};
pub use crate::router::{Leader, Router};
pub use crate::transport::{Faults, PeerAuth, PeerError, PeerHandler, PeerTls, PeerTransport};
pub use crate::wire::PeerKind;
pub use warbler_storage::PartitionId;
