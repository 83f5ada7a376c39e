//! The member list: the nodes that form the cluster.
//!
//! The list is the membership of one Raft group (the member-list group) that every member
//! replicates, as a voter (up to five) or a learner. Joining adds a learner; decommissioning
//! removes a node. Each change is a consensus decision with a log index: the list's epoch is
//! that index + 1, and epoch 0 is reserved for the list a new cluster forms with.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::control::GroupView;
use crate::error::ControlError;
use crate::fnv1a64;

/// The nodes that form the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberList {
    pub names: Vec<String>,
    pub replication_factor: usize,
    /// The members' cluster addresses when the list was made: a restarting node gossips
    /// to them to rejoin (they may have moved since; the gossip metadata has the current).
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// See the module header: 0 for the list a new cluster forms with, otherwise the
    /// member-list group's log index of this list + 1.
    #[serde(default)]
    pub epoch: u64,
    /// The cluster's id, in the answers members give (see [`crate::identity`]); absent
    /// from a previous release's answers and from the copy kept on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The zone of each member that has one (`--zone`): replicas spread over zones.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub zones: BTreeMap<String, String>,
}

impl MemberList {
    /// A new cluster forms with this list (not a later change of it).
    pub fn is_formation(&self) -> bool {
        self.epoch == 0
    }

    /// This list is newer than `current` (none yet counts as older). Only newer lists are
    /// followed: a node that joins replays the member-list group's log from its start and
    /// passes through the lists from before its join (the list its join was answered with
    /// may carry the epoch before the join, with its name added).
    pub fn supersedes(&self, current: Option<&MemberList>) -> bool {
        current.is_none_or(|c| self.epoch > c.epoch)
    }
}

/// A node's consensus id: a hash of its stable name, so it survives restarts and moves.
pub fn raft_id(name: &str) -> u64 {
    fnv1a64(name.as_bytes())
}

/// The epoch of the list whose configuration sits at `membership_index` in the member-list
/// group's log (+ 1: epoch 0 is kept for the list a new cluster forms with).
pub fn epoch_of(membership_index: Option<u64>) -> u64 {
    membership_index.map(|i| i + 1).unwrap_or(1)
}

/// How the member-list group records a member: its name, and `@zone` when it has one
/// (names and zones never hold an `@`).
pub fn member_node(name: &str, zone: Option<&str>) -> String {
    match zone {
        Some(z) => format!("{name}@{z}"),
        None => name.to_string(),
    }
}

/// A member's name and zone from [`member_node`]'s form.
pub fn parse_member_node(node: &str) -> (String, Option<String>) {
    match node.split_once('@') {
        Some((name, zone)) => (name.to_string(), Some(zone.to_string())),
        None => (node.to_string(), None),
    }
}

/// The member list that the member-list group's configuration holds: `nodes` are its nodes
/// (voters and learners, in [`member_node`]'s form); `None` while the group has none.
pub fn list_from_group(
    nodes: Vec<String>,
    replication_factor: usize,
    addrs: Vec<SocketAddr>,
    membership_index: Option<u64>,
) -> Option<MemberList> {
    if nodes.is_empty() {
        return None;
    }
    let mut names = Vec::with_capacity(nodes.len());
    let mut zones = BTreeMap::new();
    for node in &nodes {
        let (name, zone) = parse_member_node(node);
        if let Some(z) = zone {
            zones.insert(name.clone(), z);
        }
        names.push(name);
    }
    names.sort();
    Some(MemberList {
        zones,
        names,
        replication_factor,
        addrs,
        epoch: epoch_of(membership_index),
        cluster: None,
    })
}

/// Voters the member-list group keeps (the others are learners): enough that it survives
/// as many failures as the partitions do.
pub fn meta_voters(members: usize) -> usize {
    match members {
        0..=2 => members.max(1),
        3 | 4 => 3,
        _ => 5,
    }
}

/// A change of a group's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The voters become exactly these (learners stay).
    ReplaceAllVoters(BTreeSet<u64>),
    /// These nodes leave (learners only).
    RemoveNodes(BTreeSet<u64>),
}

/// How to remove `name` from the member list, given the member-list group's state and its
/// live learners (sorted by name, this node included when it is one). A voter is replaced
/// by live learners so that the group keeps [`meta_voters`] voters.
pub fn decommission(
    name: &str,
    group: &GroupView,
    list: &MemberList,
    live_learners: &[u64],
) -> Result<Change, ControlError> {
    let id = raft_id(name);
    if !group.nodes.contains(&id) {
        return Err(ControlError::NotAMember {
            name: name.to_string(),
            members: list.names.clone(),
        });
    }
    if !group.settled {
        return Err(ControlError::ChangeInProgress);
    }
    let remaining = group.nodes.len() - 1;
    if remaining < list.replication_factor {
        return Err(ControlError::BelowReplicationFactor {
            name: name.to_string(),
            remaining,
            replication_factor: list.replication_factor,
        });
    }
    if !group.voters.contains(&id) {
        return Ok(Change::RemoveNodes(BTreeSet::from([id])));
    }
    let mut keep: BTreeSet<u64> = group.voters.iter().copied().filter(|v| *v != id).collect();
    for l in live_learners.iter().filter(|l| **l != id) {
        if keep.len() >= meta_voters(remaining) {
            break;
        }
        keep.insert(*l);
    }
    Ok(Change::ReplaceAllVoters(keep))
}

/// The voters the member-list group should have when it has too few (after a join, or a
/// voter's removal with no live learner then): its voters plus live learners. `None` when
/// nothing is to change.
pub fn top_up_voters(group: &GroupView, live_learners: &[u64]) -> Option<BTreeSet<u64>> {
    let want = meta_voters(group.nodes.len());
    if !group.settled || group.voters.len() >= want {
        return None;
    }
    let mut keep = group.voters.clone();
    let add: Vec<u64> = live_learners
        .iter()
        .filter(|l| !group.voters.contains(l))
        .take(want - group.voters.len())
        .copied()
        .collect();
    if add.is_empty() {
        return None;
    }
    keep.extend(add);
    Some(keep)
}

/// What a node learns about its own membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Still a member, as far as it can tell.
    Member,
    /// It was decommissioned: the list that says so.
    Left(MemberList),
    /// Its own copy names it; ask another member for theirs.
    AskOthers,
}

/// Whether `me` was decommissioned: from its own copy of the list (it led the member-list
/// group when it was removed, so its copy already says so), or from a newer list another
/// member answered with (a removed node no longer receives the list).
pub fn standing(me: &str, mine: &MemberList, theirs: Option<&MemberList>) -> Standing {
    if !mine.names.iter().any(|n| n == me) {
        return Standing::Left(mine.clone());
    }
    match theirs {
        None => Standing::AskOthers,
        Some(t) if t.epoch > mine.epoch && !t.names.iter().any(|n| n == me) => {
            Standing::Left(t.clone())
        }
        Some(_) => Standing::Member,
    }
}

/// The list a join answers: the group's list with the joining node in it (its addition
/// may not have reached this replica's metrics yet).
pub fn with_joined(mut list: MemberList, name: &str) -> MemberList {
    if !list.names.iter().any(|n| n == name) {
        list.names.push(name.to_string());
        list.names.sort();
    }
    list
}

/// The list a decommission answers: without the removed node.
pub fn without(mut list: MemberList, name: &str) -> MemberList {
    list.names.retain(|n| n != name);
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str], rf: usize, epoch: u64) -> MemberList {
        MemberList {
            names: names.iter().map(|s| s.to_string()).collect(),
            replication_factor: rf,
            addrs: Vec::new(),
            epoch,
            cluster: None,
            zones: Default::default(),
        }
    }

    fn ids(names: &[&str]) -> BTreeSet<u64> {
        names.iter().map(|n| raft_id(n)).collect()
    }

    fn group(voters: &[&str], learners: &[&str]) -> GroupView {
        GroupView {
            voters: ids(voters),
            nodes: ids(voters).union(&ids(learners)).copied().collect(),
            settled: true,
            ..GroupView::default()
        }
    }

    #[test]
    fn epochs_start_after_the_formation_list() {
        assert_eq!(epoch_of(None), 1);
        assert_eq!(epoch_of(Some(0)), 1);
        assert_eq!(epoch_of(Some(7)), 8);
        let l = list_from_group(vec!["b@z2".into(), "a".into()], 3, vec![], Some(4)).unwrap();
        assert_eq!(l.names, ["a", "b"]);
        assert_eq!(
            l.zones,
            BTreeMap::from([("b".to_string(), "z2".to_string())])
        );
        assert_eq!(member_node("b", Some("z2")), "b@z2");
        assert_eq!(parse_member_node("a"), ("a".to_string(), None));
        assert_eq!(l.epoch, 5);
        assert!(!l.is_formation());
        assert_eq!(list_from_group(vec![], 3, vec![], Some(4)), None);
    }

    #[test]
    fn only_a_newer_list_supersedes() {
        let a = list(&["a", "b"], 2, 3);
        assert!(a.supersedes(None));
        assert!(!a.supersedes(Some(&a.clone())));
        assert!(a.supersedes(Some(&list(&["a", "b"], 2, 2))));
        // Regression (found by the StatefulSet simulator): a joining node replaying the
        // member list's log followed the lists from before its join, found its name
        // missing, and took itself for decommissioned.
        let joined = with_joined(list(&["a", "b"], 2, 3), "c");
        assert!(!list(&["a", "b"], 2, 3).supersedes(Some(&joined)));
        assert!(!list(&["a"], 2, 1).supersedes(Some(&joined)));
        assert!(list(&["a", "b", "c"], 2, 4).supersedes(Some(&joined)));
    }

    #[test]
    fn the_member_list_group_keeps_an_odd_number_of_voters() {
        let table = [(0, 1), (1, 1), (2, 2), (3, 3), (4, 3), (5, 5), (9, 5)];
        for (members, voters) in table {
            assert_eq!(meta_voters(members), voters, "{members} members");
        }
    }

    #[test]
    fn decommission_refuses_what_would_break_the_cluster() {
        let l = list(&["a", "b", "c"], 3, 2);
        let g = group(&["a", "b", "c"], &[]);
        let e = decommission("x", &g, &l, &[]).unwrap_err();
        assert!(matches!(e, ControlError::NotAMember { .. }), "{e}");
        assert!(e.to_string().contains("a, b, c"), "{e}");
        let e = decommission("c", &g, &l, &[]).unwrap_err();
        assert!(
            matches!(e, ControlError::BelowReplicationFactor { remaining: 2, .. }),
            "{e}"
        );
        let unsettled = GroupView {
            settled: false,
            ..group(&["a", "b", "c"], &["d"])
        };
        let e = decommission("d", &unsettled, &l, &[]).unwrap_err();
        assert_eq!(e, ControlError::ChangeInProgress);
    }

    #[test]
    fn decommissioning_a_voter_promotes_a_live_learner() {
        let l = list(&["a", "b", "c", "d"], 3, 2);
        let g = group(&["a", "b", "c"], &["d"]);
        let change = decommission("a", &g, &l, &[raft_id("d")]).unwrap();
        assert_eq!(change, Change::ReplaceAllVoters(ids(&["b", "c", "d"])));
        // With no live learner the group shrinks; top-up adds one later.
        let change = decommission("a", &g, &l, &[]).unwrap();
        assert_eq!(change, Change::ReplaceAllVoters(ids(&["b", "c"])));
        // A learner leaves without touching the voters.
        let change = decommission("d", &g, &l, &[raft_id("d")]).unwrap();
        assert_eq!(change, Change::RemoveNodes(ids(&["d"])));
    }

    #[test]
    fn top_up_adds_live_learners_until_the_group_has_enough_voters() {
        let g = group(&["a"], &["b", "c", "d"]);
        let live = [raft_id("b"), raft_id("c")];
        assert_eq!(top_up_voters(&g, &live), Some(ids(&["a", "b", "c"])));
        assert_eq!(top_up_voters(&g, &[]), None);
        let unsettled = GroupView {
            settled: false,
            ..g.clone()
        };
        assert_eq!(top_up_voters(&unsettled, &live), None);
        assert_eq!(top_up_voters(&group(&["a", "b", "c"], &["d"]), &live), None);
    }

    /// Regression: a decommissioned node that led the member list never heard of its removal
    /// from the others (they no longer answered it as a member), and kept serving. Its own
    /// copy already says it left.
    #[test]
    fn a_node_that_led_the_list_sees_its_removal_in_its_own_copy() {
        let mine = list(&["b", "c"], 2, 5);
        assert_eq!(standing("a", &mine, None), Standing::Left(mine.clone()));
    }

    #[test]
    fn a_node_learns_of_its_removal_from_a_newer_list_only() {
        let mine = list(&["a", "b", "c"], 2, 5);
        assert_eq!(standing("a", &mine, None), Standing::AskOthers);
        let newer = list(&["b", "c"], 2, 6);
        assert_eq!(standing("a", &mine, Some(&newer)), Standing::Left(newer));
        // An older list without this node is from before it joined.
        let older = list(&["b", "c"], 2, 4);
        assert_eq!(standing("a", &mine, Some(&older)), Standing::Member);
        assert_eq!(standing("a", &mine, Some(&mine)), Standing::Member);
    }

    #[test]
    fn join_and_decommission_answers_show_the_change() {
        let l = list(&["a", "c"], 2, 3);
        assert_eq!(with_joined(l.clone(), "b").names, ["a", "b", "c"]);
        assert_eq!(with_joined(l.clone(), "a").names, ["a", "c"]);
        assert_eq!(without(l, "a").names, ["c"]);
    }
}
