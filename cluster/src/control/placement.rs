//! Where partitions live by the ring, and which replicas a node starts and drops to follow
//! it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::control::{raft_id, GroupView, MemberList};
use crate::ring::{Ring, VNODES_DEFAULT};
use crate::PartitionId;

/// Each partition's replicas by the ring over `list`'s members, preferred leader first.
/// Over zones when members have them (see [`Ring::replicas_in_zones`]).
pub fn place(list: &MemberList, partitions: u16) -> Vec<Vec<String>> {
    let ring = Ring::new(list.names.iter(), VNODES_DEFAULT);
    let zone_of = |n: &str| list.zones.get(n).map(String::as_str);
    (0..partitions)
        .map(|p| {
            ring.replicas_in_zones(p, list.replication_factor, &zone_of)
                .into_iter()
                .map(String::from)
                .collect()
        })
        .collect()
}

/// Whether `placed` (from [`place`]) puts a replica of `partition` on `me`.
pub fn placed_here(placed: &[Vec<String>], partition: PartitionId, me: &str) -> bool {
    placed
        .get(partition as usize)
        .is_some_and(|r| r.iter().any(|n| n == me))
}

/// The first partition placed on `me` whose replica has not started.
pub fn first_not_started(
    placed: &[Vec<String>],
    running: &BTreeSet<PartitionId>,
    me: &str,
) -> Option<PartitionId> {
    (0..placed.len() as PartitionId).find(|p| placed_here(placed, *p, me) && !running.contains(p))
}

/// The partitions placed on `me` whose replica has not started: start them, empty, for
/// their leaders to fill.
pub fn to_start(
    placed: &[Vec<String>],
    running: &BTreeSet<PartitionId>,
    me: &str,
) -> Vec<PartitionId> {
    (0..placed.len() as PartitionId)
        .filter(|p| placed_here(placed, *p, me) && !running.contains(p))
        .collect()
}

/// The running replicas that may be dropped once their group no longer holds `me`: those
/// the ring no longer places here, or all of them on a decommissioned node.
pub fn drop_candidates(
    placed: &[Vec<String>],
    running: &BTreeSet<PartitionId>,
    me: &str,
    left: bool,
) -> Vec<PartitionId> {
    running
        .iter()
        .copied()
        .filter(|p| left || !placed_here(placed, *p, me))
        .collect()
}

/// Whom a replica that may have been moved away asks whether it is still in its group:
/// the leader it knows, then every node of the group as it last heard of it (a leader that
/// removed itself names itself until the others elect one, and no longer answers for the
/// group), then the ring's placement. Never itself, each once.
pub fn ask_left_group(me: u64, group: &GroupView, placed: &[String]) -> Vec<u64> {
    let mut seen = HashSet::new();
    group
        .leader
        .into_iter()
        .chain(group.nodes.iter().copied())
        .chain(placed.iter().map(|n| raft_id(n)))
        .filter(|id| *id != me && seen.insert(*id))
        .collect()
}

/// Whether a replica may be dropped: it has left its group when it was never added, or
/// when a node that leads the group answered that it is no longer in it. A leader never
/// drops itself (it moves itself out and steps down when that commits).
pub fn may_drop(group: &GroupView, leader_says_member: Option<bool>) -> bool {
    if group.leading {
        return false;
    }
    !group.added() || leader_says_member == Some(false)
}

/// The replicas a node holds, as a set (for [`to_start`] and [`drop_candidates`]).
pub fn running<T>(rafts: &BTreeMap<PartitionId, T>) -> BTreeSet<PartitionId> {
    rafts.keys().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn placement_follows_the_ring_and_the_replication_factor() {
        let list = MemberList {
            names: names(&["a", "b", "c", "d"]),
            replication_factor: 3,
            addrs: Vec::new(),
            epoch: 0,
            cluster: None,
            zones: Default::default(),
        };
        let placed = place(&list, 64);
        assert_eq!(placed.len(), 64);
        let ring = Ring::new(list.names.iter(), VNODES_DEFAULT);
        for (p, reps) in placed.iter().enumerate() {
            assert_eq!(reps.len(), 3);
            assert_eq!(reps, &ring.replicas(p as PartitionId, 3));
        }
    }

    #[test]
    fn a_node_starts_what_is_placed_on_it_and_not_running() {
        let placed = vec![names(&["a", "b"]), names(&["b", "c"]), names(&["c", "a"])];
        let running = BTreeSet::from([0]);
        assert_eq!(to_start(&placed, &running, "a"), [2]);
        assert_eq!(first_not_started(&placed, &running, "a"), Some(2));
        assert_eq!(
            first_not_started(&placed, &BTreeSet::from([0, 2]), "a"),
            None
        );
        assert_eq!(to_start(&placed, &running, "d"), Vec::<PartitionId>::new());
    }

    #[test]
    fn a_node_drops_what_moved_away_or_everything_once_it_left() {
        let placed = vec![names(&["a", "b"]), names(&["b", "c"]), names(&["c", "a"])];
        let running = BTreeSet::from([0, 1, 2]);
        assert_eq!(drop_candidates(&placed, &running, "a", false), [1]);
        assert_eq!(drop_candidates(&placed, &running, "a", true), [0, 1, 2]);
    }

    /// Regression: a leader that removed itself from a partition's group still named itself
    /// as leader to its old followers until they elected another, and no longer answered for
    /// the group; a replica that asked only it never learned it had been moved away.
    #[test]
    fn a_replica_asks_past_a_leader_that_removed_itself() {
        let (me, old_leader, other) = (raft_id("a"), raft_id("b"), raft_id("e"));
        // The group as this replica last heard of it: itself, the old leader, and `e`,
        // which the ring no longer places (the placement is `c`, `d`).
        let group = GroupView {
            leader: Some(old_leader),
            nodes: [me, old_leader, other].into(),
            ..GroupView::default()
        };
        let asked = ask_left_group(me, &group, &names(&["c", "d"]));
        assert_eq!(asked[0], old_leader, "the known leader first");
        assert_eq!(asked[1], other, "then the rest of the group");
        assert_eq!(
            asked[2..],
            [raft_id("c"), raft_id("d")],
            "then the placement"
        );
    }

    #[test]
    fn only_a_follower_told_by_its_leader_drops_its_replica() {
        let added = GroupView {
            nodes: [1, 2].into(),
            ..GroupView::default()
        };
        assert!(!may_drop(&added, None));
        assert!(!may_drop(&added, Some(true)));
        assert!(may_drop(&added, Some(false)));
        assert!(may_drop(&GroupView::default(), None), "never added");
        let leading = GroupView {
            leading: true,
            ..added
        };
        assert!(!may_drop(&leading, Some(false)));
    }
}
