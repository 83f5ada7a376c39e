//! Placement: which partition a user lives in.
//!
//! Layout:
//! - [`partition`]: the fixed, documented user → partition hash (FNV-1a 64 over the user id's
//!   UTF-8 bytes, modulo the partition count). Platform-independent: a client in any
//!   language computes the same partition.
//! - [`ring`]: partitions → ordered replica lists by consistent hashing with virtual nodes
//!   over the serving members (pure functions; membership feeds them).
//!
//! - [`membership`]: SWIM membership and failure detection (foca) over UDP: the live view
//!   of the cluster, published on a watch channel.
//!
//! - [`transport`]: request/response RPC to peers over one multiplexed TCP connection per
//!   peer, versioned frames, optional mutual TLS, bounded queues, reconnect with backoff.
//!
//! - [`raft_store`]: one partition's consensus log and state machine (openraft) in the
//!   node's RocksDB, checked by openraft's own storage test suite.
//!
//! - [`raft_net`]: openraft's network over the peer transport, and the service that hands
//!   peers' consensus RPCs to each partition's `Raft`.
//!
//! - [`raft_log`]: the replicated `PartitionLog`: entries through each partition's Raft
//!   group, completions in log order.
//!
//! Node wiring (groups per partition from the ring, routing to leaders) builds on these.

pub mod membership;
pub mod partition;
pub mod raft_log;
pub mod raft_net;
pub mod raft_store;
pub mod ring;
pub mod transport;

pub use crate::membership::{Membership, NodeId, NodeMeta, NodeState, Timing};
pub use crate::partition::{fnv1a64, partition_of};
pub use crate::ring::{Ring, VNODES_DEFAULT};
pub use crate::transport::{Faults, PeerError, PeerHandler, PeerTls, PeerTransport};
pub use warbler_storage::PartitionId;
