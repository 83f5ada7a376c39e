//! Spreading partition leaders evenly over the members.
//!
//! Raft elects whichever replica times out first, so leaders pile up: a cluster formed with
//! 13 / 23 / 28 leaders on three nodes, a restarted node leads nothing, and a node added by
//! a scale-out only gets leaders when others fail. A leader does every partition's writes,
//! fsync waits and deliveries, so the most loaded node sets the cluster's speed.
//!
//! The node that leads the member-list group balances, like a placement driver: every few
//! seconds, when no partition is moving, it asks each member which partitions it leads
//! ([`Leading`]), plans a few transfers from the node with the most leaders to a replica with
//! the fewest ([`plan`]), and asks each transfer's leader to hand the partition over
//! ([`HandLead`]).
//!
//! A transfer (openraft 0.9 has no transfer call): the leader holds new proposals for the
//! partition, waits until the target holds its whole log, and tells the target to campaign
//! ([`TakeLead`]). The target's vote request carries a log as long as the leader's, and the
//! leader grants it (a leader's own vote lease runs from its election, long past); the
//! target's own vote makes a majority of three. The other replicas refuse (their lease from
//! the last heartbeat is fresh) and follow the new leader at its first append. Proposals held
//! meanwhile fail with "not the leader" and are retried at the new leader by the routing
//! layer. A transfer takes a few round trips, not an election timeout.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::PartitionId;

/// Transfers the balancer asks for at once (each holds its partition's writes for a few
/// round trips).
pub const TRANSFERS_AT_ONCE: usize = 8;

/// One partition a node leads, in its answer to [`Leading`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Led {
    pub partition: PartitionId,
    /// Its voters by name (the leader among them).
    pub voters: Vec<String>,
    /// Its configuration is settled (not joint, applied): a group being moved is left alone.
    pub settled: bool,
}

/// "Which partitions do you lead?" The answer is a `Vec<Led>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leading;

/// "Hand the leadership of this partition to `to`" (to the partition's leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandLead {
    pub to: String,
}

/// "Campaign now": the leader to the replica it hands the partition to, in the leader's
/// `term`, once the replica holds the leader's log up to `last_log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeLead {
    pub term: u64,
    pub last_log: u64,
}

/// One planned transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub partition: PartitionId,
    pub from: String,
    pub to: String,
}

/// The even share of `groups` leaders over `nodes` nodes: (fewest, most) a node should lead.
pub fn even_share(groups: usize, nodes: usize) -> (usize, usize) {
    if nodes == 0 {
        return (0, 0);
    }
    (groups / nodes, groups.div_ceil(nodes))
}

/// Up to `max` transfers that even out the leaders per node. `led` is each node's answer
/// (node name → the partitions it leads); `eligible` are the nodes that may take leaders
/// (members, alive, serving). Each step moves one leader from the node with the most to the
/// voter of that partition with the fewest, and only when that narrows the gap by two or
/// more (so a balanced cluster plans nothing, and nothing moves back and forth).
pub fn plan(led: &BTreeMap<String, Vec<Led>>, eligible: &[String], max: usize) -> Vec<Transfer> {
    let mut count: BTreeMap<&str, usize> = eligible.iter().map(|n| (n.as_str(), 0)).collect();
    for (node, groups) in led {
        *count.entry(node.as_str()).or_default() += groups.len();
    }
    let eligible: BTreeSet<&str> = eligible.iter().map(String::as_str).collect();
    let mut planned: BTreeSet<PartitionId> = BTreeSet::new();
    let mut stuck: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::new();
    while out.len() < max {
        // The most loaded node that still has a partition to give (ties: by name).
        let Some((from, most)) = count
            .iter()
            .filter(|(n, _)| !stuck.contains(*n))
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(n, c)| (*n, *c))
        else {
            break;
        };
        let best = led.get(from).into_iter().flatten().filter_map(|g| {
            if !g.settled || planned.contains(&g.partition) {
                return None;
            }
            g.voters
                .iter()
                .map(String::as_str)
                .filter(|v| *v != from && eligible.contains(v))
                .map(|v| (count.get(v).copied().unwrap_or(0), v, g.partition))
                .filter(|(c, _, _)| c + 2 <= most)
                .min()
        });
        match best.min() {
            Some((_, to, partition)) => {
                planned.insert(partition);
                *count.get_mut(from).unwrap() -= 1;
                *count.entry(to).or_default() += 1;
                out.push(Transfer {
                    partition,
                    from: from.to_string(),
                    to: to.to_string(),
                });
            }
            None => {
                stuck.insert(from);
            }
        }
    }
    out
}

/// Whether the leaders per node are within `tolerance` (0.25: 25%) of the even share;
/// `counts` holds every node that may lead, zeros included.
pub fn within(counts: &[usize], tolerance: f64) -> bool {
    let total: usize = counts.iter().sum();
    if counts.is_empty() || total == 0 {
        return true;
    }
    let even = total as f64 / counts.len() as f64;
    counts
        .iter()
        .all(|c| (*c as f64 - even).abs() <= even * tolerance + 1e-9)
}

/// Whether a replica may campaign on a leader's [`TakeLead`]: it is a voter, in the leader's
/// term, and holds the leader's log.
pub fn may_take_lead(
    req: &TakeLead,
    mine: &crate::control::GroupView,
    my_id: u64,
) -> Result<(), String> {
    if !mine.voters.contains(&my_id) {
        return Err("this replica is not a voter of the partition".into());
    }
    if mine.leading {
        return Err("this replica leads the partition already".into());
    }
    if mine.term != req.term {
        return Err(format!(
            "this replica is in term {}, the handing leader in term {}",
            mine.term, req.term
        ));
    }
    if mine.last_log < req.last_log {
        return Err(format!(
            "this replica holds the log up to {}, the leader up to {}",
            mine.last_log, req.last_log
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::GroupView;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    /// `partitions` groups with replicas on consecutive nodes (RF 3), led as `leader(p)` says.
    fn cluster(
        nodes: usize,
        partitions: u16,
        leader: impl Fn(u16) -> usize,
    ) -> BTreeMap<String, Vec<Led>> {
        let all = names(nodes);
        let mut led: BTreeMap<String, Vec<Led>> = BTreeMap::new();
        for p in 0..partitions {
            let voters: Vec<String> = (0..3.min(nodes))
                .map(|k| all[(p as usize + k) % nodes].clone())
                .collect();
            let l = voters[leader(p) % voters.len()].clone();
            led.entry(l).or_default().push(Led {
                partition: p,
                voters,
                settled: true,
            });
        }
        led
    }

    /// Applies `plan` until it plans nothing; returns the leaders per node and the transfers.
    fn settle(mut led: BTreeMap<String, Vec<Led>>, eligible: &[String]) -> (Vec<usize>, usize) {
        let mut moved = 0;
        for _ in 0..100 {
            let steps = plan(&led, eligible, TRANSFERS_AT_ONCE);
            if steps.is_empty() {
                break;
            }
            for t in steps {
                let groups = led.get_mut(&t.from).unwrap();
                let i = groups
                    .iter()
                    .position(|g| g.partition == t.partition)
                    .unwrap();
                let g = groups.remove(i);
                led.entry(t.to).or_default().push(g);
                moved += 1;
            }
        }
        let counts = eligible
            .iter()
            .map(|n| led.get(n).map_or(0, Vec::len))
            .collect();
        (counts, moved)
    }

    #[test]
    fn a_lopsided_formation_ends_within_one_of_even() {
        // As seen on a real formation: most groups elected the first replica to time out.
        let led = cluster(3, 64, |p| if p % 5 == 0 { 1 } else { 0 });
        let (counts, moved) = settle(led, &names(3));
        assert_eq!(counts.iter().sum::<usize>(), 64);
        assert!(counts.iter().all(|c| (21..=22).contains(c)), "{counts:?}");
        assert!(within(&counts, 0.25));
        assert!(moved <= 64, "{moved}");
    }

    #[test]
    fn a_restarted_or_new_node_with_no_leaders_gets_its_share() {
        // Five nodes, 64 partitions, RF 3; n4 is new (or restarted) and leads nothing.
        let mut led = cluster(5, 64, |_| 0);
        for g in led.remove("n4").unwrap() {
            led.entry(g.voters[1].clone()).or_default().push(g);
        }
        let (counts, _) = settle(led, &names(5));
        assert!(counts.iter().all(|c| (12..=13).contains(c)), "{counts:?}");
    }

    #[test]
    fn a_balanced_cluster_plans_nothing() {
        let led = cluster(3, 64, |p| p as usize);
        let counts: Vec<usize> = led.values().map(Vec::len).collect();
        assert!(counts.iter().all(|c| (21..=22).contains(c)), "{counts:?}");
        assert!(plan(&led, &names(3), TRANSFERS_AT_ONCE).is_empty());
    }

    #[test]
    fn leaders_only_go_to_eligible_voters_of_settled_groups() {
        // n0 leads all twelve.
        let mut led = cluster(3, 12, |p| (3 - p as usize % 3) % 3);
        assert_eq!(led["n0"].len(), 12);
        // n2 is draining: it takes nothing; group 0 is being moved.
        for g in led.values_mut().flatten() {
            if g.partition == 0 {
                g.settled = false;
            }
        }
        let eligible = vec!["n0".to_string(), "n1".to_string()];
        let steps = plan(&led, &eligible, 100);
        assert!(!steps.is_empty());
        for t in &steps {
            assert_ne!(t.to, "n2");
            assert_ne!(t.partition, 0);
            let g = led[&t.from]
                .iter()
                .find(|g| g.partition == t.partition)
                .unwrap();
            assert!(g.voters.contains(&t.to), "{t:?} {g:?}");
        }
        // Each partition moves at most once per plan.
        let parts: BTreeSet<_> = steps.iter().map(|t| t.partition).collect();
        assert_eq!(parts.len(), steps.len());
    }

    #[test]
    fn within_tolerance_counts_zeros() {
        assert!(within(&[21, 21, 22], 0.25));
        assert!(!within(&[13, 23, 28], 0.25));
        assert!(!within(&[32, 32, 0], 0.25));
        assert!(within(&[], 0.25));
    }

    #[test]
    fn only_a_caught_up_voter_in_the_leaders_term_campaigns() {
        let me = 7;
        let view = GroupView {
            voters: [1, 7, 9].into(),
            nodes: [1, 7, 9].into(),
            term: 4,
            last_log: 100,
            leader: Some(1),
            ..GroupView::default()
        };
        let req = TakeLead {
            term: 4,
            last_log: 100,
        };
        assert_eq!(may_take_lead(&req, &view, me), Ok(()));
        assert!(may_take_lead(
            &TakeLead {
                last_log: 101,
                ..req
            },
            &view,
            me
        )
        .is_err());
        assert!(may_take_lead(&TakeLead { term: 5, ..req }, &view, me).is_err());
        assert!(may_take_lead(&req, &view, 3).is_err());
        let leading = GroupView {
            leading: true,
            ..view
        };
        assert!(may_take_lead(&req, &leading, me).is_err());
    }
}
