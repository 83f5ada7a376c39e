//! Placement: which partition a user lives in.
//!
//! Layout:
//! - [`partition`]: the fixed, documented user → partition hash (FNV-1a 64 over the user id's
//!   UTF-8 bytes, modulo the partition count). Platform-independent: a client in any
//!   language computes the same partition.
//!
//! Membership, the ring and replicated partitions build on this crate later.

pub mod partition;

pub use crate::partition::{fnv1a64, partition_of};
pub use warbler_storage::PartitionId;
