//! Which node leads a partition: the question the routing layer asks of a node.

use std::net::SocketAddr;

use crate::PartitionId;

/// Where a partition's leader is, as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leader {
    Local,
    Remote {
        node: String,
        addr: SocketAddr,
    },
    /// No leader known (an election is running, or the leader's address is unknown): why.
    Unknown(String),
}

/// Answers which node leads a partition.
pub trait Router: Send + Sync + 'static {
    fn leader(&self, partition: PartitionId) -> Leader;

    /// A node this router named as `partition`'s leader was not: it answered that `leader`
    /// is (a redirect), or, with `None`, it could not be reached or did not know. A router
    /// that only guesses (this node holds no replica of the partition) corrects its guess.
    fn redirected(&self, _partition: PartitionId, _leader: Option<&str>) {}

    /// Whether this node holds a replica of `partition` whose idea of the leader comes from
    /// consensus (so it may redirect others to it); a stale one does not count.
    fn is_replica(&self, _partition: PartitionId) -> bool {
        true
    }
}
