//! Durable state of a Warbler node, in RocksDB.
//!
//! Layout:
//! - [`keys`]: the on-disk key layout (documented in `docs/storage.md`); stable across
//!   versions.
//! - [`store`]: [`Store`], the database: column families for messages, device cursors, the
//!   dedup index and per-user heads; reads, verification, retention trimming.
//! - [`commit`]: the group committer: one thread that gathers write requests into one
//!   `WriteBatch` and one fsync, and completes each request after its batch is durable.
//! - [`log`]: [`PartitionLog`], the seam replication plugs into. On one node,
//!   [`LocalLog`] commits entries straight through the committer.
//! - [`sync`]: the syncer: one thread per node that makes the consensus log's unsynced
//!   writes durable with one fsync and then completes every writer waiting for it.
//! - [`snapshot`]: consensus snapshot files, streamed a row at a time.
//! - [`error`]: the [`StorageError`] type.

pub mod commit;
pub mod error;
pub mod keys;
pub mod log;
pub mod snapshot;
pub mod store;
pub mod sync;

pub use crate::commit::{Committer, CommitterLimits, Done};
pub use crate::error::StorageError;
pub use crate::log::{LocalLog, PartitionLog};
pub use crate::store::{Op, PartitionRows, RetentionPolicy, Row, Store, StoredMessage, TrimReport};
pub use crate::sync::Synced;

/// A partition number, `0..partitions`.
pub type PartitionId = u16;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
