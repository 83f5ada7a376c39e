//! Moving partitions to where the ring places them.
//!
//! The node that leads the member-list group coordinates: every round it asks each
//! partition's leader to make the group's replicas those of the ring ([`Reconfigure`]), a
//! few partitions at a time ([`Coordinator`]). The leader answers from its group's state
//! ([`on_reconfigure`]) and, when the group differs, moves it ([`move_steps`]): it adds each
//! new replica as a learner and waits for it to catch up, then replaces the voters in one
//! joint-consensus change, then removes learners left behind. A partition never has fewer
//! than its replicas while it moves.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::control::members::Change;
use crate::control::{raft_id, GroupView};
use crate::error::ControlError;
use crate::PartitionId;

/// Partitions the coordinator moves at once: each move streams a snapshot to a new replica,
/// and a few at once keep the cluster serving while it rebalances.
pub const MOVES_AT_ONCE: usize = 4;

/// "Make this partition's replicas these", for member list `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconfigure {
    pub replicas: Vec<String>,
    pub epoch: u64,
}

/// A partition leader's answer to [`Reconfigure`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Moved {
    /// The group has exactly the wanted replicas.
    Settled,
    /// The leader is moving it.
    Moving,
    /// Asked a replica that does not lead: the leader it knows.
    LedBy(String),
}

/// Rounds in a row without an answer about a partition after which the coordinator asks
/// the partition's other nodes instead of the leader it knows ([`others_to_ask`]): an
/// election is over well within this.
pub const UNANSWERED_ROUNDS: u32 = 10;

/// The coordinator's progress through one epoch of the member list.
#[derive(Debug, Default)]
pub struct Coordinator {
    epoch: u64,
    settled: HashSet<PartitionId>,
    moving: HashSet<PartitionId>,
    /// Rounds in a row without an answer, per partition.
    unanswered: HashMap<PartitionId, u32>,
}

impl Coordinator {
    /// Starts a round for member list `epoch`: a new epoch forgets the last one's progress.
    pub fn begin_round(&mut self, epoch: u64) {
        if self.epoch != epoch {
            *self = Coordinator {
                epoch,
                ..Coordinator::default()
            };
        }
    }

    /// Whether to ask about `partition` now: not settled, and either moving already or a
    /// slot among [`MOVES_AT_ONCE`] is free.
    pub fn should_ask(&self, partition: PartitionId) -> bool {
        !self.settled.contains(&partition)
            && (self.moving.contains(&partition) || self.moving.len() < MOVES_AT_ONCE)
    }

    /// Records a leader's answer (`None`: no answer, asked again next round). A redirect
    /// that persists after the named leader was asked holds a slot like a move: the group
    /// is changing leader, and asking again soon is what it needs.
    pub fn on_answer(&mut self, partition: PartitionId, answer: Option<&Moved>) {
        match answer {
            None => *self.unanswered.entry(partition).or_default() += 1,
            Some(_) => {
                self.unanswered.remove(&partition);
            }
        }
        match answer {
            Some(Moved::Settled) => {
                self.moving.remove(&partition);
                self.settled.insert(partition);
            }
            Some(Moved::Moving | Moved::LedBy(_)) => {
                self.moving.insert(partition);
            }
            None => {}
        }
    }

    /// Whether to ask `partition`'s other nodes ([`others_to_ask`]) rather than the leader
    /// this node knows: none answered for [`UNANSWERED_ROUNDS`] rounds in a row.
    pub fn ask_others(&self, partition: PartitionId) -> bool {
        self.unanswered.get(&partition).copied().unwrap_or(0) >= UNANSWERED_ROUNDS
    }

    /// Every one of `partitions` is where the ring places it.
    pub fn done(&self, partitions: u16) -> bool {
        (0..partitions).all(|p| self.settled.contains(&p))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// What a partition's replica does with a [`Reconfigure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnReconfigure {
    /// Answer this at once.
    Answer(Moved),
    /// Start moving the group to the wanted replicas, and answer [`Moved::Moving`].
    StartMove,
}

/// Whether `from` may ask for a reconfigure for member list `epoch`. For this node's own
/// list (`my_epoch`) only its coordinator, the member-list leader this node knows
/// (`coordinator`), is taken; while it knows none, any member of `members`. A newer list
/// may have been made by a node this one has not heard of yet, so its sender is not checked
/// here ([`on_reconfigure`] still refuses one that shrinks a partition).
pub fn may_reconfigure(
    from: &str,
    epoch: u64,
    my_epoch: u64,
    coordinator: Option<&str>,
    members: &[String],
) -> Result<(), ControlError> {
    if epoch != my_epoch {
        return Ok(());
    }
    let allowed = match coordinator {
        Some(c) => c == from,
        None => members.iter().any(|m| m == from),
    };
    if allowed {
        return Ok(());
    }
    Err(ControlError::NotTheCoordinator {
        from: from.to_string(),
        epoch,
        coordinator: coordinator.unwrap_or("unknown; any member").to_string(),
    })
}

/// A partition replica's answer to `req`: `my_epoch` is the member list it has, `group` its
/// group, `leader_name` the name of the leader it knows, `moving` whether it is moving the
/// partition already.
pub fn on_reconfigure(
    partition: PartitionId,
    req: &Reconfigure,
    (my_epoch, placed): (u64, &[String]),
    group: &GroupView,
    leader_name: Option<String>,
    moving: bool,
) -> Result<OnReconfigure, ControlError> {
    if req.epoch < my_epoch {
        return Err(ControlError::StaleEpoch {
            asked: req.epoch,
            have: my_epoch,
        });
    }
    // For this node's member list only its placement is taken. A newer list this node has
    // not seen (it may never: a decommissioned node stops following the list, and must
    // still move its partitions away) is taken if it keeps as many replicas: a request
    // from a member that means harm (or a bug) cannot shrink a partition.
    let set = |names: &[String]| names.iter().cloned().collect::<BTreeSet<String>>();
    let wanted = set(&req.replicas);
    let refused = if req.epoch == my_epoch {
        wanted != set(placed)
    } else {
        wanted.len() < placed.len() || wanted.len() != req.replicas.len()
    };
    if refused {
        return Err(ControlError::NotThePlacement {
            partition,
            epoch: req.epoch,
            asked: req.replicas.join(", "),
            placed: placed.join(", "),
        });
    }
    if !group.leading {
        return match leader_name {
            Some(name) => Ok(OnReconfigure::Answer(Moved::LedBy(name))),
            None => Err(ControlError::NoLeader { partition }),
        };
    }
    let want: BTreeSet<u64> = req.replicas.iter().map(|n| raft_id(n)).collect();
    if group.voters == want && group.nodes == want {
        // Not settled yet: the leader has not committed its membership in this term.
        let answer = if group.settled {
            Moved::Settled
        } else {
            Moved::Moving
        };
        return Ok(OnReconfigure::Answer(answer));
    }
    if moving {
        return Ok(OnReconfigure::Answer(Moved::Moving));
    }
    Ok(OnReconfigure::StartMove)
}

/// Whom a coordinator asks about a partition when the leader it knows has not answered for
/// [`UNANSWERED_ROUNDS`], in order: the live nodes `placed` for it, then the live rest of
/// its own replica's `group`, never itself. Its replica may be one the group left behind (an
/// earlier move took it out, a later placement put it back before it was dropped): no one
/// writes to it any more, so it campaigns alone, never names a leader, and waiting for it
/// would keep the partition from moving for good.
pub fn others_to_ask(
    me: &str,
    placed: &[String],
    group: &[String],
    live: &HashSet<String>,
) -> Vec<String> {
    let mut ask: Vec<String> = Vec::new();
    for n in placed.iter().chain(group) {
        if n != me && live.contains(n) && !ask.contains(n) {
            ask.push(n.clone());
        }
    }
    ask
}

/// The new replicas to add as learners (and wait for) before the voters change.
pub fn learners_to_add<'a>(group: &GroupView, to: &'a [String]) -> Vec<&'a String> {
    to.iter()
        .filter(|n| !group.nodes.contains(&raft_id(n)))
        .collect()
}

/// The next configuration change of a move to `to`, once every new replica is a learner:
/// replace the voters, then remove the nodes that are not wanted (learners left behind by
/// an earlier move that did not finish). `None` when the group is where it should be.
pub fn next_change(group: &GroupView, to: &[String]) -> Option<Change> {
    let want: BTreeSet<u64> = to.iter().map(|n| raft_id(n)).collect();
    if group.voters != want {
        return Some(Change::ReplaceAllVoters(want));
    }
    let extra: BTreeSet<u64> = group.nodes.difference(&want).copied().collect();
    (!extra.is_empty()).then_some(Change::RemoveNodes(extra))
}

/// On a partition's leader: whether `name` is in its group. Only a settled configuration
/// answers, so that a node that hears `false` may drop its replica.
pub fn member_of(
    partition: PartitionId,
    group: &GroupView,
    name: &str,
) -> Result<bool, ControlError> {
    if !group.leading {
        return Err(ControlError::NotLeader { partition });
    }
    if !group.settled {
        return Err(ControlError::Reconfiguring { partition });
    }
    Ok(group.nodes.contains(&raft_id(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> BTreeSet<u64> {
        names.iter().map(|n| raft_id(n)).collect()
    }

    fn leading(voters: &[&str], learners: &[&str]) -> GroupView {
        GroupView {
            voters: ids(voters),
            nodes: ids(voters).union(&ids(learners)).copied().collect(),
            settled: true,
            leading: true,
            ..GroupView::default()
        }
    }

    fn req(replicas: &[&str], epoch: u64) -> Reconfigure {
        Reconfigure {
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
            epoch,
        }
    }

    #[test]
    fn the_coordinator_asks_the_others_only_after_rounds_without_an_answer() {
        let mut c = Coordinator::default();
        c.begin_round(1);
        for _ in 1..UNANSWERED_ROUNDS {
            c.on_answer(7, None);
        }
        assert!(!c.ask_others(7), "an election is not over yet");
        c.on_answer(7, None);
        assert!(c.ask_others(7));
        assert!(!c.ask_others(8));
        c.on_answer(7, Some(&Moved::Moving));
        assert!(!c.ask_others(7), "an answer resets the count");
    }

    #[test]
    fn a_coordinator_whose_replica_knows_no_leader_asks_the_live_placed_nodes_then_the_group() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        let live: HashSet<String> = names(&["n1", "n2", "n3", "n4"]).into_iter().collect();
        // n1 coordinates; its stale replica still counts n0, n1, n2 as the group.
        let ask = others_to_ask(
            "n1",
            &names(&["n2", "n3", "n1"]),
            &names(&["n0", "n1", "n2", "n4"]),
            &live,
        );
        assert_eq!(
            ask,
            names(&["n2", "n3", "n4"]),
            "n0 is down, n1 is itself, n2 once"
        );
        assert!(others_to_ask("n1", &names(&["n1"]), &names(&["n1"]), &live).is_empty());
    }

    #[test]
    fn the_coordinator_moves_a_few_partitions_at_once() {
        let mut c = Coordinator::default();
        c.begin_round(3);
        let mut asked = Vec::new();
        for p in 0..10 {
            if c.should_ask(p) {
                asked.push(p);
                c.on_answer(p, Some(&Moved::Moving));
            }
        }
        assert_eq!(asked, [0, 1, 2, 3], "MOVES_AT_ONCE moves");
        c.on_answer(1, Some(&Moved::Settled));
        assert!(!c.should_ask(1), "a settled partition is not asked again");
        assert!(c.should_ask(0), "a moving one is asked until it settles");
        assert!(c.should_ask(4), "a freed slot goes to the next");
        c.on_answer(5, None);
        assert!(c.should_ask(7), "an unanswered ask holds no slot");
        c.on_answer(6, Some(&Moved::LedBy("b".into())));
        assert!(!c.should_ask(7), "a persisting redirect holds one");
        assert!(!c.done(2));
    }

    #[test]
    fn only_the_coordinator_reconfigures_at_this_epoch() {
        let members = ["a".to_string(), "b".to_string(), "c".to_string()];
        assert!(may_reconfigure("a", 4, 4, Some("a"), &members).is_ok());
        let e = may_reconfigure("b", 4, 4, Some("a"), &members).unwrap_err();
        assert!(matches!(e, ControlError::NotTheCoordinator { .. }), "{e}");
        assert!(e.to_string().contains("(a), not from b"), "{e}");
        // No coordinator known: members only.
        assert!(may_reconfigure("c", 4, 4, None, &members).is_ok());
        assert!(may_reconfigure("stranger", 4, 4, None, &members).is_err());
        // A newer list is judged by what it asks for, not by who sends it.
        assert!(may_reconfigure("d", 5, 4, Some("a"), &members).is_ok());
    }

    #[test]
    fn a_new_epoch_starts_the_coordinator_over() {
        let mut c = Coordinator::default();
        c.begin_round(3);
        c.on_answer(0, Some(&Moved::Settled));
        c.on_answer(1, Some(&Moved::Settled));
        assert!(c.done(2));
        c.begin_round(3);
        assert!(c.done(2), "the same epoch keeps its progress");
        c.begin_round(4);
        assert!(!c.done(2));
        assert_eq!(c.epoch(), 4);
        assert!(c.should_ask(0));
    }

    #[test]
    fn a_leader_answers_from_its_group() {
        let g = leading(&["a", "b", "c"], &[]);
        let abc: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let abd: Vec<String> = ["a", "b", "d"].iter().map(|s| s.to_string()).collect();
        let answer = |r: &Reconfigure, g: &GroupView, moving| {
            let placed = if r.replicas.contains(&"d".to_string()) {
                &abd
            } else {
                &abc
            };
            on_reconfigure(7, r, (2, placed), g, Some("x".into()), moving)
        };
        let e = answer(&req(&["a", "b", "c"], 1), &g, false).unwrap_err();
        assert_eq!(e, ControlError::StaleEpoch { asked: 1, have: 2 });
        let shrink = on_reconfigure(7, &req(&["a"], 2), (2, &abc), &g, None, false).unwrap_err();
        assert!(
            matches!(shrink, ControlError::NotThePlacement { .. }),
            "{shrink}"
        );
        let elsewhere = answer(&req(&["a", "b", "e"], 2), &g, false);
        assert!(elsewhere.is_err(), "this epoch: only its placement");
        let to_one = on_reconfigure(7, &req(&["a"], u64::MAX), (2, &abc), &g, None, false);
        assert!(matches!(to_one, Err(ControlError::NotThePlacement { .. })));
        let doubled = on_reconfigure(7, &req(&["a", "a", "b"], 3), (2, &abc), &g, None, false);
        assert!(doubled.is_err(), "a name twice is not three replicas");
        let newer = on_reconfigure(7, &req(&["a", "b", "d"], 3), (2, &abc), &g, None, false);
        assert_eq!(
            newer.unwrap(),
            OnReconfigure::StartMove,
            "a newer list not seen yet"
        );
        let same = answer(&req(&["c", "a", "b"], 2), &g, false).unwrap();
        assert_eq!(same, OnReconfigure::Answer(Moved::Settled));
        let uncommitted = GroupView {
            settled: false,
            ..g.clone()
        };
        let same = answer(&req(&["a", "b", "c"], 2), &uncommitted, false).unwrap();
        assert_eq!(same, OnReconfigure::Answer(Moved::Moving));
        let other = answer(&req(&["a", "b", "d"], 2), &g, false).unwrap();
        assert_eq!(other, OnReconfigure::StartMove);
        let other = answer(&req(&["a", "b", "d"], 2), &g, true).unwrap();
        assert_eq!(
            other,
            OnReconfigure::Answer(Moved::Moving),
            "one move at a time"
        );
        let follower = GroupView {
            leading: false,
            ..g.clone()
        };
        let redirected = answer(&req(&["a", "b", "d"], 2), &follower, false).unwrap();
        assert_eq!(redirected, OnReconfigure::Answer(Moved::LedBy("x".into())));
        let e = on_reconfigure(
            7,
            &req(&["a", "b", "c"], 2),
            (2, &abc),
            &follower,
            None,
            false,
        )
        .unwrap_err();
        assert_eq!(e, ControlError::NoLeader { partition: 7 });
    }

    #[test]
    fn a_move_adds_learners_then_replaces_voters_then_removes_leftovers() {
        let to: Vec<String> = ["a", "b", "d"].iter().map(|s| s.to_string()).collect();
        let g = leading(&["a", "b", "c"], &[]);
        assert_eq!(learners_to_add(&g, &to), [&to[2]]);
        let g = leading(&["a", "b", "c"], &["d"]);
        assert!(learners_to_add(&g, &to).is_empty());
        assert_eq!(
            next_change(&g, &to),
            Some(Change::ReplaceAllVoters(ids(&["a", "b", "d"])))
        );
        let g = leading(&["a", "b", "d"], &["c", "e"]);
        assert_eq!(
            next_change(&g, &to),
            Some(Change::RemoveNodes(ids(&["c", "e"])))
        );
        assert_eq!(next_change(&leading(&["a", "b", "d"], &[]), &to), None);
    }

    #[test]
    fn membership_is_answered_by_a_settled_leader_only() {
        let g = leading(&["a", "b", "c"], &[]);
        assert_eq!(member_of(1, &g, "a"), Ok(true));
        assert_eq!(member_of(1, &g, "d"), Ok(false));
        let moving = GroupView {
            settled: false,
            ..g.clone()
        };
        assert_eq!(
            member_of(1, &moving, "d"),
            Err(ControlError::Reconfiguring { partition: 1 })
        );
        let follower = GroupView {
            leading: false,
            ..g
        };
        assert_eq!(
            member_of(1, &follower, "d"),
            Err(ControlError::NotLeader { partition: 1 })
        );
    }
}
