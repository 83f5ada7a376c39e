//! [`PartitionLog`]: where state changes are proposed. The single-node implementation
//! commits them through the group committer; the replicated one (one consensus group per
//! partition) implements the same trait, so the actors above do not change.

use std::future::Future;
use std::pin::Pin;

use crate::commit::{Committer, Done};
use crate::error::StorageError;
use crate::store::Op;
use crate::PartitionId;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A per-partition log of entries, each a list of [`Op`]s applied atomically.
pub trait PartitionLog: Send + Sync + 'static {
    /// Proposes an entry. `done` runs once the entry is durable (on one node: fsynced; when
    /// replicated: committed by a majority) or has failed. Entries of one partition become
    /// durable in the order they were proposed. The future resolves once the entry is
    /// queued; it waits while the log is full (backpressure).
    fn propose(
        &self,
        partition: PartitionId,
        ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>>;

    /// [`PartitionLog::propose`] by a writer that read its state under `term` (what
    /// [`PartitionLog::leader_term`] said when it started): if the partition's term is
    /// another one by the time the entry is made, the entry fails instead of entering the
    /// log, since another leader may have written the partition in between. One node has
    /// one term, so by default this is `propose`.
    fn propose_in(
        &self,
        partition: PartitionId,
        _term: u64,
        ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        self.propose(partition, ops, done)
    }
    /// Resolves once every entry proposed before it is durable (or failed). A mailbox that
    /// restarts after a crash waits on this before reading its head, so it cannot reuse a
    /// seq its crashed predecessor still had in flight.
    fn barrier(&self, partition: PartitionId) -> BoxFuture<'_, Result<(), StorageError>>;

    /// The term under which this node may write `partition` now, or `None` when it cannot
    /// (a write failed, it does not lead the partition, or the partition has no quorum). A
    /// writer that started under one term must not write under another: in between,
    /// another node may have written the partition.
    fn leader_term(&self, partition: PartitionId) -> Option<u64>;

    /// Whether `partition` takes a new publish now. `false` while its backlog of proposed
    /// but not yet durable entries is at its bound: the writer refuses the publish at once
    /// (`overloaded`) rather than queue it for seconds.
    fn admits(&self, _partition: PartitionId) -> bool {
        true
    }

    /// Why `partition` takes no new message for lack of disk space on another of its
    /// replicas (the local disk is the store's own check), if it does not.
    fn replica_low_on_space(&self, _partition: PartitionId) -> Option<String> {
        None
    }

    fn writable(&self, partition: PartitionId) -> bool {
        self.leader_term(partition).is_some()
    }

    /// True when entries are replicated to other nodes, so leadership can move: writers
    /// then read their state only after a barrier.
    fn replicated(&self) -> bool {
        false
    }

    /// Whether a barrier on `partition` has completed under this node's current leadership
    /// of it. Then every entry of earlier leaderships is applied here, and a writer whose
    /// predecessor in this leadership stopped with nothing in flight (asleep or idle, not
    /// crashed) reads its state without a barrier of its own: what that predecessor wrote
    /// was applied before it stopped. `false` when unknown.
    fn settled(&self, _partition: PartitionId) -> bool {
        false
    }
}

/// The single-node log: every partition commits straight to the local database.
#[derive(Clone)]
pub struct LocalLog {
    committer: Committer,
}

impl LocalLog {
    pub fn new(committer: Committer) -> Self {
        Self { committer }
    }
}

impl PartitionLog for LocalLog {
    fn propose(
        &self,
        _partition: PartitionId,
        ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(self.committer.submit(ops, done))
    }

    fn barrier(&self, _partition: PartitionId) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(self.committer.commit(Vec::new()))
    }

    fn leader_term(&self, _partition: PartitionId) -> Option<u64> {
        (!self.committer.is_poisoned()).then_some(0)
    }
}
