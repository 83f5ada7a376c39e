//! Whether a node is ready to serve (`/readyz`): the cluster formed, the node is a member,
//! and every replica placed here has started, been added to its group, has a leader and
//! has applied what it holds; a follower has also applied what its leader had applied a
//! second earlier.

use std::collections::{BTreeMap, HashMap};

use crate::control::placement::first_not_started;
use crate::control::GroupView;
use crate::PartitionId;

/// Why a node is not ready; the text says what it waits for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("the cluster has not formed yet (waiting for bootstrap_expect members)")]
    NotFormed,
    #[error(
        "the cluster formed and this node is placing its partitions (reading the member list)"
    )]
    Placing,
    #[error("this node was decommissioned and is no longer a member; stop it (started again once it holds no replica, it wipes its data directory and joins as a new node)")]
    Decommissioned,
    #[error("partition {0} is placed here and its replica has not started yet")]
    NotStarted(PartitionId),
    #[error("partition {0} is moving here and this replica has not been added to it yet")]
    NotAdded(PartitionId),
    #[error("partition {0} has no leader yet")]
    NoLeader(PartitionId),
    #[error("member {0} is up but its address has not reached this node yet (gossip brings it within seconds; if it never does, check that the members share one --cluster-key-file)")]
    NoAddress(String),
    #[error("partition {partition} is catching up (applied {applied} of {last})")]
    Applying {
        partition: PartitionId,
        applied: u64,
        last: u64,
    },
    #[error("partition {0}: comparing this replica with its leader")]
    Comparing(PartitionId),
    #[error("partition {partition} is catching up with its leader (applied {applied}, the leader {leader})")]
    BehindLeader {
        partition: PartitionId,
        applied: u64,
        leader: u64,
    },
    #[error("shutting down")]
    ShuttingDown,
    #[error("storage failed; see the node's logs")]
    StorageFailed,
    #[error("the replica of partition {partition} stopped: {why}; the node exits so that it restarts (free disk space if that is the cause)")]
    GroupFailed { partition: PartitionId, why: String },
}

/// What readiness is decided from.
pub struct ReadyInput<'a> {
    pub me: &'a str,
    pub my_id: u64,
    pub formed: bool,
    pub left: bool,
    /// The ring's placement (each partition's replicas).
    pub placed: &'a [Vec<String>],
    /// This node's replicas.
    pub replicas: &'a BTreeMap<PartitionId, GroupView>,
    /// Partitions this node follows: their leader's applied index at the last two asks
    /// (older, newer), one second apart.
    pub leaders_applied: &'a HashMap<PartitionId, (u64, u64)>,
    /// This node's replicas: their last log index at the last two samples (older, newer),
    /// one second apart. A replica has replayed its log once it applied what it held a
    /// second ago: under steady writes the newest entries always wait for their commit, so
    /// "applied all it holds" would never hold.
    pub logged: &'a HashMap<PartitionId, (u64, u64)>,
    /// The node has run longer than the catch-up bound: a replica still catching up no
    /// longer keeps it unready (a slow replica must not hold a rollout forever); every
    /// other condition still holds.
    pub catch_up_waived: bool,
    /// Nodes this one may have to call and cannot yet (by Raft id: their names): members
    /// gossip shows up, and the leaders of its replicas, whose addresses have not reached
    /// it. A node restarted a moment ago learns the others' addresses from gossip; until
    /// then a request it takes for a partition led there would fail.
    pub unaddressed: &'a BTreeMap<u64, String>,
}

pub fn ready(i: &ReadyInput) -> Result<(), NotReady> {
    if !i.formed {
        return Err(NotReady::NotFormed);
    }
    if i.left {
        return Err(NotReady::Decommissioned);
    }
    // Formed, but the member list not read into a placement yet: nothing says which
    // replicas must run here, and none may have started.
    if i.placed.is_empty() {
        return Err(NotReady::Placing);
    }
    if let Some((p, g)) = i.replicas.iter().find(|(_, g)| g.failed.is_some()) {
        return Err(NotReady::GroupFailed {
            partition: *p,
            why: g.failed.clone().unwrap_or_default(),
        });
    }
    // Replicas start one by one after the cluster forms (or when partitions are placed
    // here): one not started yet has nothing to compare.
    let running = i.replicas.keys().copied().collect();
    if let Some(p) = first_not_started(i.placed, &running, i.me) {
        return Err(NotReady::NotStarted(p));
    }
    for (p, g) in i.replicas {
        replica_ready(*p, g, i)?;
    }
    match i.unaddressed.values().next() {
        Some(name) => Err(NotReady::NoAddress(name.clone())),
        None => Ok(()),
    }
}

fn replica_ready(partition: PartitionId, g: &GroupView, i: &ReadyInput) -> Result<(), NotReady> {
    if !g.added() {
        return Err(NotReady::NotAdded(partition));
    }
    let Some(leader) = g.leader else {
        return Err(NotReady::NoLeader(partition));
    };
    if let Some(name) = i.unaddressed.get(&leader) {
        return Err(NotReady::NoAddress(name.clone()));
    }
    if i.catch_up_waived {
        return Ok(());
    }
    let held_then = i
        .logged
        .get(&partition)
        .map_or(g.last_log, |(then, _)| *then);
    if g.applied < held_then {
        return Err(NotReady::Applying {
            partition,
            applied: g.applied,
            last: held_then,
        });
    }
    if g.leader == Some(i.my_id) {
        return Ok(());
    }
    // A follower has caught up when it has applied what its leader had applied a second
    // ago (a healthy one trails it by a heartbeat at most).
    match i.leaders_applied.get(&partition) {
        None => Err(NotReady::Comparing(partition)),
        Some((then, _)) if g.applied < *then => Err(NotReady::BehindLeader {
            partition,
            applied: g.applied,
            leader: *then,
        }),
        Some(_) => Ok(()),
    }
}

/// Records a sample of an index per partition (a leader's answer to "how far have you
/// applied", or this replica's last log index): keeps the last two.
pub fn record_sample(
    seen: &mut HashMap<PartitionId, (u64, u64)>,
    answers: impl IntoIterator<Item = (PartitionId, u64)>,
) {
    for (p, applied) in answers {
        let e = seen.entry(p).or_insert((applied, applied));
        *e = (e.1, applied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u64 = 1;

    fn follower(applied: u64, last: u64) -> GroupView {
        GroupView {
            nodes: [1, 2].into(),
            leader: Some(2),
            applied,
            last_log: last,
            ..GroupView::default()
        }
    }

    fn check(
        placed: &[Vec<String>],
        replicas: &BTreeMap<PartitionId, GroupView>,
        leaders: &HashMap<PartitionId, (u64, u64)>,
    ) -> Result<(), NotReady> {
        ready(&ReadyInput {
            me: "a",
            my_id: ME,
            formed: true,
            left: false,
            placed,
            replicas,
            leaders_applied: leaders,
            logged: &HashMap::new(),
            catch_up_waived: false,
            unaddressed: &BTreeMap::new(),
        })
    }

    fn placed() -> Vec<Vec<String>> {
        vec![vec!["a".into(), "b".into()], vec!["b".into(), "c".into()]]
    }

    #[test]
    fn not_formed_or_decommissioned_is_not_ready() {
        let none = BTreeMap::new();
        let leaders = HashMap::new();
        let mut i = ReadyInput {
            me: "a",
            my_id: ME,
            formed: false,
            left: false,
            placed: &[],
            replicas: &none,
            leaders_applied: &leaders,
            logged: &HashMap::new(),
            catch_up_waived: false,
            unaddressed: &BTreeMap::new(),
        };
        assert_eq!(ready(&i), Err(NotReady::NotFormed));
        i.formed = true;
        i.left = true;
        assert_eq!(ready(&i), Err(NotReady::Decommissioned));
        i.left = false;
        assert_eq!(ready(&i), Err(NotReady::Placing));
        // Placed, and no partition on this node: nothing to wait for.
        let elsewhere = vec![vec!["b".to_string()]];
        i.placed = &elsewhere;
        assert_eq!(ready(&i), Ok(()));
    }

    /// Past the catch-up bound a lagging replica no longer keeps the node unready, but a
    /// replica without a leader or not yet added still does.
    #[test]
    fn the_catch_up_bound_waives_lag_only() {
        let placed = placed();
        let behind = BTreeMap::from([(0, follower(3, 9))]);
        let leaders = HashMap::from([(0, (9, 9))]);
        let mut i = ReadyInput {
            me: "a",
            my_id: ME,
            formed: true,
            left: false,
            placed: &placed,
            replicas: &behind,
            leaders_applied: &leaders,
            logged: &HashMap::new(),
            catch_up_waived: false,
            unaddressed: &BTreeMap::new(),
        };
        assert!(matches!(ready(&i), Err(NotReady::Applying { .. })));
        i.catch_up_waived = true;
        assert_eq!(ready(&i), Ok(()));
        let leaderless = BTreeMap::from([(
            0,
            GroupView {
                leader: None,
                ..follower(3, 9)
            },
        )]);
        i.replicas = &leaderless;
        assert_eq!(ready(&i), Err(NotReady::NoLeader(0)));
    }

    /// Regression: `/readyz` said ready while replicas placed here had not started yet
    /// (they start one by one after forming), so a rolling restart moved on too early.
    #[test]
    fn a_placed_replica_not_started_yet_keeps_the_node_unready() {
        let leaders = HashMap::from([(0, (5, 5))]);
        let e = check(&placed(), &BTreeMap::new(), &leaders).unwrap_err();
        assert_eq!(e, NotReady::NotStarted(0));
        let started = BTreeMap::from([(0, follower(5, 5))]);
        assert_eq!(check(&placed(), &started, &leaders), Ok(()));
    }

    /// The moment between forming and reading the member list: no placement and no
    /// replica yet. A restarted node once said ready there, 46 ms after it started.
    #[test]
    fn a_formed_node_without_a_placement_is_not_ready() {
        let e = check(&[], &BTreeMap::new(), &HashMap::new()).unwrap_err();
        assert_eq!(e, NotReady::Placing);
    }

    #[test]
    fn a_stopped_replica_keeps_the_node_unready() {
        let leaders = HashMap::from([(0, (5, 5))]);
        let failed = GroupView {
            failed: Some("storage error: no space left on device".into()),
            ..follower(5, 5)
        };
        let e = check(&placed(), &BTreeMap::from([(0, failed)]), &leaders).unwrap_err();
        assert!(
            matches!(e, NotReady::GroupFailed { partition: 0, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("no space left"), "{e}");
    }

    #[test]
    fn each_replica_must_be_added_led_and_applied() {
        let leaders = HashMap::from([(0, (5, 5))]);
        let cases = [
            (GroupView::default(), NotReady::NotAdded(0)),
            (
                GroupView {
                    leader: None,
                    ..follower(5, 5)
                },
                NotReady::NoLeader(0),
            ),
            (
                follower(3, 5),
                NotReady::Applying {
                    partition: 0,
                    applied: 3,
                    last: 5,
                },
            ),
        ];
        for (g, want) in cases {
            let replicas = BTreeMap::from([(0, g)]);
            assert_eq!(check(&placed(), &replicas, &leaders), Err(want));
        }
    }

    /// Regression: a restarted follower said ready before it had applied what its leaders
    /// had (it had applied all it held, but held little yet).
    #[test]
    fn a_follower_is_ready_once_it_has_applied_what_its_leader_had() {
        let replicas = BTreeMap::from([(0, follower(5, 5))]);
        let e = check(&placed(), &replicas, &HashMap::new()).unwrap_err();
        assert_eq!(e, NotReady::Comparing(0));
        let behind = HashMap::from([(0, (9, 12))]);
        assert!(matches!(
            check(&placed(), &replicas, &behind),
            Err(NotReady::BehindLeader { leader: 9, .. })
        ));
        let leader_here = BTreeMap::from([(
            0,
            GroupView {
                leader: Some(ME),
                ..follower(5, 5)
            },
        )]);
        assert_eq!(check(&placed(), &leader_here, &HashMap::new()), Ok(()));
    }

    /// Regression (the overload scenario): a follower restarted under steady writes never
    /// became ready, its newest entries always waiting for their commit ("applied 26275 of
    /// 26276" for a minute). It is ready once it applied what it held a second ago.
    #[test]
    fn a_replica_under_steady_writes_is_ready_once_it_applied_what_it_held_a_second_ago() {
        let leaders = HashMap::from([(0, (100, 104))]);
        let writing = BTreeMap::from([(0, follower(104, 106))]);
        let e = check(&placed(), &writing, &leaders).unwrap_err();
        assert!(matches!(e, NotReady::Applying { last: 106, .. }), "{e}");
        let logged = HashMap::from([(0, (104, 106))]);
        let mut i = ReadyInput {
            me: "a",
            my_id: ME,
            formed: true,
            left: false,
            placed: &placed(),
            replicas: &writing,
            leaders_applied: &leaders,
            logged: &logged,
            catch_up_waived: false,
            unaddressed: &BTreeMap::new(),
        };
        assert_eq!(ready(&i), Ok(()));
        // Still replaying: it has not applied what it held a second ago.
        let replaying = BTreeMap::from([(0, follower(90, 106))]);
        i.replicas = &replaying;
        assert_eq!(
            ready(&i),
            Err(NotReady::Applying {
                partition: 0,
                applied: 90,
                last: 104
            })
        );
    }

    /// Regression (CI): a node restarted a moment before said ready, and a history read
    /// through it failed for 2 s with "partition 51's leader has no known address": gossip
    /// had not brought it that member's address yet.
    #[test]
    fn a_leader_or_member_without_a_known_address_keeps_the_node_unready() {
        let leaders = HashMap::from([(0, (5, 5))]);
        let replicas = BTreeMap::from([(0, follower(5, 5))]);
        let leader_unknown = BTreeMap::from([(2, "b".to_string())]);
        let mut i = ReadyInput {
            me: "a",
            my_id: ME,
            formed: true,
            left: false,
            placed: &placed(),
            replicas: &replicas,
            leaders_applied: &leaders,
            logged: &HashMap::new(),
            catch_up_waived: true,
            unaddressed: &leader_unknown,
        };
        let e = ready(&i).unwrap_err();
        assert_eq!(
            e,
            NotReady::NoAddress("b".into()),
            "not waived by the catch-up bound"
        );
        assert!(e.to_string().contains("member b is up"), "{e}");
        // Another member, not this replica's leader: still not ready, after the replicas.
        let member_unknown = BTreeMap::from([(7, "c".to_string())]);
        i.unaddressed = &member_unknown;
        assert_eq!(ready(&i), Err(NotReady::NoAddress("c".into())));
        let none = BTreeMap::new();
        i.unaddressed = &none;
        assert_eq!(ready(&i), Ok(()));
    }

    #[test]
    fn a_sample_keeps_the_last_two_values() {
        let mut seen = HashMap::new();
        record_sample(&mut seen, [(3, 10)]);
        assert_eq!(seen[&3], (10, 10));
        record_sample(&mut seen, [(3, 14)]);
        assert_eq!(seen[&3], (10, 14));
        record_sample(&mut seen, [(3, 20)]);
        assert_eq!(seen[&3], (14, 20));
    }
}
