//! Who leads a partition, as this node knows it.
//!
//! A replica knows from consensus. A node without a replica guesses: first the preferred
//! leader (the ring's first replica); a replica that is not the leader names the one that
//! is ([`LeaderHints::redirected`] with a name), and one that cannot be reached makes way
//! for the next replica (with none).

use std::collections::HashMap;

use crate::control::GroupView;
use crate::PartitionId;

/// A partition's leader as this node knows it, before its address is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderView {
    /// This node leads it.
    Local,
    /// The node of this name leads it (or is the best guess).
    Node(String),
    /// No leader known: why.
    Unknown(String),
}

/// Guesses of the leaders of partitions this node holds no replica of.
#[derive(Debug, Default)]
pub struct LeaderHints {
    hints: HashMap<PartitionId, String>,
}

/// The leader of `partition`. `replica` is this node's replica when it has been added to
/// the group; `name_of` maps a consensus id to a member's name; `placed` is the ring's
/// replica list (needed when there is no replica, or a [stale](GroupView::stale) one).
pub fn leader(
    me: &str,
    my_id: u64,
    partition: PartitionId,
    replica: Option<&GroupView>,
    name_of: impl Fn(u64) -> Option<String>,
    hints: &LeaderHints,
    placed: &[String],
) -> LeaderView {
    let name = match replica {
        Some(g) => match g.leader {
            Some(id) if id == my_id => {
                if g.leading {
                    return LeaderView::Local;
                }
                // A leader that moved itself out of the group keeps naming itself and hears
                // from no one: guess like a node without a replica. (When that node is the
                // one that coordinates moves, waiting here would keep every move of the
                // partition waiting too.)
                match hints.guess(partition, placed, me) {
                    Some(n) => n,
                    None => {
                        return LeaderView::Unknown(format!(
                            "partition {partition} is changing leader"
                        ))
                    }
                }
            }
            Some(id) => match name_of(id) {
                Some(n) => n,
                None => return LeaderView::Unknown(format!("leader {id} is not a member")),
            },
            None => {
                return LeaderView::Unknown(format!("partition {partition} is electing a leader"))
            }
        },
        None => match hints.guess(partition, placed, me) {
            Some(n) => n,
            None => {
                return LeaderView::Unknown(format!(
                    "partition {partition} has no replicas on other nodes"
                ))
            }
        },
    };
    if name == me {
        // Consensus names this node while it is not leading yet (a removed leader, or one
        // whose replica is being added): never route to itself.
        return LeaderView::Unknown(format!(
            "partition {partition} is moving to this node; waiting for its leader"
        ));
    }
    LeaderView::Node(name)
}

impl LeaderHints {
    /// The guess for `partition`: the last node named by a redirect, else the first of its
    /// replicas that is not this node.
    pub fn guess(&self, partition: PartitionId, placed: &[String], me: &str) -> Option<String> {
        self.hints
            .get(&partition)
            .filter(|h| *h != me)
            .or_else(|| placed.iter().find(|n| *n != me))
            .cloned()
    }

    /// A node guessed as `partition`'s leader was not: it named `leader`, or (with `None`)
    /// could not be reached or did not know; then the replica after it is tried.
    pub fn redirected(
        &mut self,
        partition: PartitionId,
        placed: &[String],
        me: &str,
        leader: Option<&str>,
    ) {
        if placed.is_empty() {
            return;
        }
        let next = match leader {
            Some(l) => l.to_string(),
            None => {
                let current = self.hints.get(&partition).unwrap_or(&placed[0]);
                let at = placed.iter().position(|r| r == current).unwrap_or(0);
                let n = placed.len();
                match (1..=n).map(|i| &placed[(at + i) % n]).find(|r| *r != me) {
                    Some(r) => r.clone(),
                    None => return,
                }
            }
        };
        self.hints.insert(partition, next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn name_of(id: u64) -> Option<String> {
        match id {
            1 => Some("a".into()),
            2 => Some("b".into()),
            _ => None,
        }
    }

    fn group(leader: Option<u64>, leading: bool) -> GroupView {
        GroupView {
            leader,
            leading,
            nodes: [1, 2].into(),
            ..GroupView::default()
        }
    }

    #[test]
    fn a_replica_knows_its_leader_from_consensus() {
        let hints = LeaderHints::default();
        let placed = names(&["b", "a"]);
        let at = |g: &GroupView| leader("a", 1, 5, Some(g), name_of, &hints, &placed);
        assert_eq!(at(&group(Some(1), true)), LeaderView::Local);
        assert_eq!(at(&group(Some(1), false)), LeaderView::Node("b".into()));
        assert_eq!(at(&group(Some(2), false)), LeaderView::Node("b".into()));
        assert!(
            matches!(at(&group(Some(9), false)), LeaderView::Unknown(w) if w.contains("not a member"))
        );
        assert!(
            matches!(at(&group(None, false)), LeaderView::Unknown(w) if w.contains("electing"))
        );
    }

    /// Regression: a leader that moved itself out of a group named itself forever. On the
    /// node that coordinates moves, that left the partition's next move (a decommission)
    /// waiting for good.
    #[test]
    fn a_replica_that_names_itself_without_leading_guesses_from_the_placement() {
        let mut hints = LeaderHints::default();
        let placed = names(&["a", "b", "c"]);
        let stale = group(Some(1), false);
        let at = |h: &LeaderHints| leader("a", 1, 5, Some(&stale), name_of, h, &placed);
        assert_eq!(at(&hints), LeaderView::Node("b".into()));
        hints.redirected(5, &placed, "a", Some("c"));
        assert_eq!(at(&hints), LeaderView::Node("c".into()));
        let alone = leader("a", 1, 5, Some(&stale), name_of, &hints, &names(&["a"]));
        assert!(
            matches!(alone, LeaderView::Node(n) if n == "c"),
            "the hint still holds"
        );
        let fresh = LeaderHints::default();
        let alone = leader("a", 1, 5, Some(&stale), name_of, &fresh, &names(&["a"]));
        assert!(matches!(alone, LeaderView::Unknown(w) if w.contains("changing")));
    }

    /// Regression: a leader that removed itself from a group still named itself as leader;
    /// a node routing by that name sent requests to itself in a loop.
    #[test]
    fn a_node_named_leader_while_not_leading_never_routes_to_itself() {
        let hints = LeaderHints::default();
        let named_me = |id| (id == 7).then(|| "a".to_string());
        let g = group(Some(7), false);
        let v = leader("a", 1, 5, Some(&g), named_me, &hints, &names(&["a", "b"]));
        assert!(matches!(v, LeaderView::Unknown(w) if w.contains("moving to this node")));
    }

    #[test]
    fn a_node_without_a_replica_guesses_the_first_other_replica() {
        let mut hints = LeaderHints::default();
        let placed = names(&["a", "b", "c"]);
        let at = |h: &LeaderHints| leader("a", 1, 5, None, name_of, h, &placed);
        assert_eq!(at(&hints), LeaderView::Node("b".into()));
        hints.redirected(5, &placed, "a", Some("c"));
        assert_eq!(at(&hints), LeaderView::Node("c".into()));
        let fresh = LeaderHints::default();
        let alone = leader("a", 1, 5, None, name_of, &fresh, &names(&["a"]));
        assert!(matches!(alone, LeaderView::Unknown(_)));
    }

    #[test]
    fn an_unreachable_guess_makes_way_for_the_next_replica_skipping_this_node() {
        let mut hints = LeaderHints::default();
        let placed = names(&["b", "a", "c"]);
        hints.redirected(5, &placed, "a", None);
        assert_eq!(
            hints.guess(5, &placed, "a").as_deref(),
            Some("c"),
            "b failed; a is me"
        );
        hints.redirected(5, &placed, "a", None);
        assert_eq!(
            hints.guess(5, &placed, "a").as_deref(),
            Some("b"),
            "wraps around"
        );
        let mut alone = LeaderHints::default();
        alone.redirected(5, &names(&["a"]), "a", None);
        assert_eq!(alone.guess(5, &names(&["a"]), "a"), None);
        alone.redirected(5, &[], "a", Some("x"));
        assert_eq!(alone.guess(5, &[], "a"), None, "no placement, no hint");
    }
}
