//! A snapshot of one Raft group as this node's replica sees it.

use std::collections::BTreeSet;

/// What a replica's metrics say about its group; the driver fills it from openraft's
/// metrics so that decisions never hold a Raft handle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupView {
    /// Consensus ids of the voters of the current configuration (both halves of a joint one).
    pub voters: BTreeSet<u64>,
    /// Voters and learners.
    pub nodes: BTreeSet<u64>,
    /// One configuration (not joint), and committed (applied on this replica).
    pub settled: bool,
    /// The leader this replica knows.
    pub leader: Option<u64>,
    /// This replica is the leader (not merely named as one).
    pub leading: bool,
    pub term: u64,
    /// Highest log index applied to the state machine (0: none).
    pub applied: u64,
    /// Highest log index held (0: none).
    pub last_log: u64,
    /// The log index of the configuration (`None`: the group has none yet).
    pub membership_index: Option<u64>,
    /// The replica stopped for good (its storage failed): why.
    pub failed: Option<String>,
}

impl GroupView {
    /// The replica has been added to its group (an empty replica waits for its leader).
    pub fn added(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// The replica names itself (`my_id`) as leader but does not lead: it led and moved
    /// itself out of the group (consensus keeps its own vote, and no one writes to it any
    /// more). What it knows of the leader is of no use.
    pub fn stale(&self, my_id: u64) -> bool {
        self.leader == Some(my_id) && !self.leading
    }
}
