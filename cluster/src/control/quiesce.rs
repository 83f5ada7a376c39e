//! Quiescence: a partition with no traffic stops ticking, so it sends no heartbeats and
//! runs no election timers (CockroachDB's quiescence, TiKV's hibernate regions).
//!
//! - The **leader** watches its log. Once it has stayed the same for [`QUIET_AFTER_CHECKS`]
//!   checks with every replica caught up and everything applied, it asks each follower to
//!   go quiet at (term, last index). Only when all agree does it stop its own ticks.
//! - A **follower** agrees only if it follows that leader in that term and holds exactly
//!   that log, all of it applied: a write that raced the request makes it refuse, and so
//!   does a commit it has not heard of yet.
//! - Anything wakes the group: a new proposal or log entry on the leader, an AppendEntries
//!   or a vote request reaching a follower, and the node-level liveness signal (gossip)
//!   saying the leader's node is gone, which makes one follower ([`campaigner`]) elect at
//!   once and the others tick again. So a quiet partition fails over as fast as gossip sees
//!   the death, with no heartbeat per group.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::GroupView;

/// Checks (of the driver's period) a leader's log must stay unchanged, with every replica
/// caught up, before the group goes quiet. At 500 ms a check: two idle seconds, long enough
/// that a partition with steady traffic never pays for quiescing and waking.
pub const QUIET_AFTER_CHECKS: u32 = 4;

/// "Go quiet": the leader's request to each follower of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quiesce {
    pub leader: u64,
    pub term: u64,
    /// The leader's last log index: the follower must hold exactly this much.
    pub index: u64,
}

/// What a leader's metrics say, for the quiescence decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderSample {
    pub term: u64,
    pub last_log: u64,
    pub applied: u64,
    /// One configuration, committed.
    pub settled: bool,
    /// How far each other replica (voter or learner) holds the leader's log.
    pub matched: Vec<Option<u64>>,
}

impl LeaderSample {
    /// Every replica holds the whole log and the leader applied all of it.
    fn caught_up(&self) -> bool {
        self.settled
            && self.applied == self.last_log
            && self.matched.iter().all(|m| *m == Some(self.last_log))
    }
}

/// What the driver does for one group after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Ask the followers to go quiet; if all agree, stop this replica's ticks.
    Quiesce(Quiesce),
    /// Tick again (the group had gone quiet and something happened).
    Wake,
}

/// A leader's view of one group over time.
#[derive(Debug, Clone, Default)]
pub struct Idle {
    /// (term, last log index) at the last check.
    last: Option<(u64, u64)>,
    unchanged_checks: u32,
    quiet: bool,
}

impl Idle {
    /// One check: `sample` is `Some` while this replica leads the group.
    pub fn observe(&mut self, my_id: u64, sample: Option<&LeaderSample>) -> Step {
        let Some(s) = sample else {
            self.last = None;
            self.unchanged_checks = 0;
            return self.wake();
        };
        let now = (s.term, s.last_log);
        if self.last != Some(now) {
            self.last = Some(now);
            self.unchanged_checks = 0;
            return self.wake();
        }
        self.unchanged_checks = self.unchanged_checks.saturating_add(1);
        // Asked again every QUIET_AFTER_CHECKS while a follower keeps refusing.
        if !self.quiet
            && self.unchanged_checks >= QUIET_AFTER_CHECKS
            && self.unchanged_checks.is_multiple_of(QUIET_AFTER_CHECKS)
            && s.caught_up()
        {
            return Step::Quiesce(Quiesce {
                leader: my_id,
                term: s.term,
                index: s.last_log,
            });
        }
        Step::Nothing
    }

    /// Every follower agreed and the leader's ticks stopped.
    pub fn quieted(&mut self) {
        self.quiet = true;
    }

    /// Something reached the group from outside the checks (a proposal): tick again.
    pub fn woken(&mut self) -> Step {
        self.unchanged_checks = 0;
        self.wake()
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    fn wake(&mut self) -> Step {
        if std::mem::take(&mut self.quiet) {
            Step::Wake
        } else {
            Step::Nothing
        }
    }
}

/// A follower's answer to [`Quiesce`]: `Err` says why it does not go quiet.
pub fn accept(req: &Quiesce, mine: &GroupView) -> Result<(), String> {
    if mine.leading {
        return Err("this replica leads the partition".into());
    }
    if mine.leader != Some(req.leader) || mine.term != req.term {
        return Err(format!(
            "this replica follows {:?} in term {}, not {} in term {}",
            mine.leader, mine.term, req.leader, req.term
        ));
    }
    if mine.last_log != req.index {
        return Err(format!(
            "this replica holds the log up to {}, not {}",
            mine.last_log, req.index
        ));
    }
    // A follower learns a commit from the leader's next AppendEntries: one that went quiet
    // before it would not learn it until the group woke (a replica restarted just after it
    // acknowledged its last entry, then asked to go quiet, stayed "catching up"). Refused,
    // the leader keeps ticking, its heartbeats carry the commit index, and it asks again.
    if mine.applied != req.index {
        return Err(format!(
            "this replica applied up to {}, not {}: it waits for the commit index",
            mine.applied, req.index
        ));
    }
    Ok(())
}

/// Quiet follower groups whose leader's node is no longer alive: they wake and elect.
/// `quiet` maps each quiet group to the request it went quiet under.
pub fn orphaned(quiet: &BTreeMap<u16, Quiesce>, alive: &BTreeSet<u64>) -> Vec<u16> {
    quiet
        .iter()
        .filter(|(_, q)| !alive.contains(&q.leader))
        .map(|(p, _)| *p)
        .collect()
}

/// Which survivor of a group whose leader's node is gone campaigns at once on the liveness
/// signal: the lowest voter id, other than the leader's, that gossip shows alive (`me`
/// counts as alive). When every survivor campaigned on the signal, those that heard of the
/// death within a round trip of each other each voted for themselves in the same term, the
/// vote split, and the group waited a whole election timeout more. The other survivors keep
/// their election timers, so a chosen replica that cannot win (dead since, or behind in its
/// log) still leaves the group to them.
pub fn campaigner(
    voters: impl IntoIterator<Item = u64>,
    leader: u64,
    alive: &BTreeSet<u64>,
    me: u64,
) -> Option<u64> {
    voters
        .into_iter()
        .filter(|v| *v != leader && (*v == me || alive.contains(v)))
        .min()
}

/// Whether an AppendEntries a quiet follower has just handled leaves it quiet: a heartbeat
/// (no entries) from the leader it went quiet under, in that term, after which it still
/// holds exactly the log it went quiet at. A leader's last heartbeat may cross its own
/// "go quiet" request; waking on it would leave the follower ticking under a leader that
/// no longer sends heartbeats, and it would elect itself a moment later. Entries, another
/// leader or another term wake it.
pub fn heartbeat_keeps_quiet(quiet_at: &Quiesce, entries: usize, mine: &GroupView) -> bool {
    entries == 0
        && !mine.leading
        && mine.leader == Some(quiet_at.leader)
        && mine.term == quiet_at.term
        && mine.last_log == quiet_at.index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(last_log: u64, matched: &[Option<u64>]) -> LeaderSample {
        LeaderSample {
            term: 3,
            last_log,
            applied: last_log,
            settled: true,
            matched: matched.to_vec(),
        }
    }

    /// Runs `checks` unchanged checks after the first and returns the last step.
    fn idle_for(idle: &mut Idle, s: &LeaderSample, checks: u32) -> Step {
        let mut step = idle.observe(1, Some(s));
        for _ in 0..checks {
            step = idle.observe(1, Some(s));
        }
        step
    }

    #[test]
    fn a_caught_up_idle_leader_asks_to_go_quiet_after_the_quiet_period() {
        let s = sample(10, &[Some(10), Some(10)]);
        let mut idle = Idle::default();
        assert_eq!(
            idle_for(&mut idle, &s, QUIET_AFTER_CHECKS - 1),
            Step::Nothing
        );
        assert_eq!(
            idle.observe(1, Some(&s)),
            Step::Quiesce(Quiesce {
                leader: 1,
                term: 3,
                index: 10
            })
        );
    }

    #[test]
    fn a_lagging_replica_or_unapplied_entry_keeps_the_group_awake() {
        for s in [
            sample(10, &[Some(10), Some(9)]),
            sample(10, &[Some(10), None]),
            LeaderSample {
                applied: 9,
                ..sample(10, &[Some(10), Some(10)])
            },
            LeaderSample {
                settled: false,
                ..sample(10, &[Some(10), Some(10)])
            },
        ] {
            let mut idle = Idle::default();
            assert_eq!(
                idle_for(&mut idle, &s, 3 * QUIET_AFTER_CHECKS),
                Step::Nothing,
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_new_entry_or_lost_leadership_wakes_a_quiet_group() {
        let s = sample(10, &[Some(10), Some(10)]);
        let mut idle = Idle::default();
        idle_for(&mut idle, &s, QUIET_AFTER_CHECKS);
        idle.quieted();
        assert_eq!(
            idle.observe(1, Some(&s)),
            Step::Nothing,
            "still idle: stays quiet"
        );
        assert_eq!(
            idle.observe(1, Some(&sample(11, &[Some(10), Some(10)]))),
            Step::Wake
        );
        assert!(!idle.is_quiet());

        idle_for(&mut idle, &s, QUIET_AFTER_CHECKS);
        idle.quieted();
        assert_eq!(
            idle.observe(1, None),
            Step::Wake,
            "another replica leads now"
        );
        assert_eq!(idle.observe(1, None), Step::Nothing, "woken once");
    }

    #[test]
    fn a_proposal_wakes_at_once_and_restarts_the_quiet_period() {
        let s = sample(10, &[Some(10), Some(10)]);
        let mut idle = Idle::default();
        idle_for(&mut idle, &s, QUIET_AFTER_CHECKS);
        idle.quieted();
        assert_eq!(idle.woken(), Step::Wake);
        assert_eq!(idle.woken(), Step::Nothing);
        assert_eq!(
            idle_for(&mut idle, &s, QUIET_AFTER_CHECKS - 2),
            Step::Nothing
        );
    }

    #[test]
    fn a_refused_request_is_asked_again_a_quiet_period_later() {
        let s = sample(10, &[Some(10), Some(10)]);
        let mut idle = Idle::default();
        assert!(matches!(
            idle_for(&mut idle, &s, QUIET_AFTER_CHECKS),
            Step::Quiesce(_)
        ));
        for _ in 1..QUIET_AFTER_CHECKS {
            assert_eq!(idle.observe(1, Some(&s)), Step::Nothing);
        }
        assert!(matches!(idle.observe(1, Some(&s)), Step::Quiesce(_)));
    }

    fn follower(leader: u64, term: u64, last_log: u64) -> GroupView {
        GroupView {
            leader: Some(leader),
            term,
            last_log,
            applied: last_log,
            ..GroupView::default()
        }
    }

    #[test]
    fn a_follower_goes_quiet_only_holding_and_applying_exactly_the_leaders_log_in_its_term() {
        let req = Quiesce {
            leader: 1,
            term: 3,
            index: 10,
        };
        assert_eq!(accept(&req, &follower(1, 3, 10)), Ok(()));
        for (view, why) in [
            (follower(1, 3, 11), "a write raced the request"),
            (follower(1, 3, 9), "behind"),
            (follower(2, 3, 10), "another leader"),
            (follower(1, 4, 10), "a newer term"),
            (
                GroupView {
                    applied: 9,
                    ..follower(1, 3, 10)
                },
                "holding the log, not told it is committed",
            ),
            (
                GroupView {
                    leading: true,
                    ..follower(1, 3, 10)
                },
                "leading itself",
            ),
        ] {
            assert!(accept(&req, &view).is_err(), "{why}");
        }
    }

    #[test]
    fn quiet_groups_of_a_dead_leader_wake_and_others_stay_quiet() {
        let under = |leader| Quiesce {
            leader,
            term: 3,
            index: 10,
        };
        let quiet = BTreeMap::from([(0, under(1)), (1, under(2)), (2, under(1)), (3, under(3))]);
        let alive = BTreeSet::from([2, 3, 4]);
        assert_eq!(orphaned(&quiet, &alive), vec![0, 2]);
        assert!(orphaned(&quiet, &BTreeSet::from([1, 2, 3])).is_empty());
    }

    #[test]
    fn one_survivor_campaigns_on_the_liveness_signal() {
        let alive = BTreeSet::from([2, 3, 9]);
        // The lowest live voter other than the gone leader.
        assert_eq!(campaigner([1, 2, 3], 1, &alive, 3), Some(2));
        assert_eq!(campaigner([1, 2, 3], 1, &alive, 2), Some(2));
        // A voter gossip does not show alive is passed over; the caller counts itself.
        assert_eq!(campaigner([1, 2, 3], 1, &BTreeSet::from([3]), 3), Some(3));
        assert_eq!(campaigner([1, 2, 3], 1, &BTreeSet::new(), 3), Some(3));
        // A node not among the voters is never chosen.
        assert_eq!(campaigner([1, 4, 5], 1, &alive, 2), None);
        assert_eq!(campaigner([1], 1, &alive, 1), None);
    }

    #[test]
    fn only_the_quiet_leaders_empty_heartbeat_keeps_a_follower_quiet() {
        let at = Quiesce {
            leader: 1,
            term: 3,
            index: 10,
        };
        assert!(heartbeat_keeps_quiet(&at, 0, &follower(1, 3, 10)));
        for (entries, view, why) in [
            (1, follower(1, 3, 11), "entries"),
            (0, follower(1, 3, 11), "the log moved"),
            (0, follower(2, 4, 10), "a new leader"),
            (0, follower(1, 4, 10), "a newer term"),
        ] {
            assert!(!heartbeat_keeps_quiet(&at, entries, &view), "{why}");
        }
    }
}
