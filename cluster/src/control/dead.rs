//! Replacing dead members: the member list's leader watches which members gossip shows
//! down, and once one has been down for `cluster.dead_node_timeout_ms` it removes it from
//! the member list like a decommission; the ring then places its partitions on the others
//! and their leaders rebuild the replicas there. One member at a time, the longest down
//! first; the decommission rule refuses when fewer than `replication_factor` members would
//! remain. A new leader of the list starts the clocks again (it may have seen less).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// When each member was first seen down, as the member list's leader watches.
#[derive(Debug, Default)]
pub struct DeadWatch {
    down_since: HashMap<String, Instant>,
    /// When a refused removal was last reported (it is tried again every round).
    reported: Option<Instant>,
}

/// A removal that cannot be made (too few members would remain) is reported this often.
const REPORT_EVERY: Duration = Duration::from_secs(60);

impl DeadWatch {
    /// Notes which of `members` (other than `me`) are `live` at `now`; the member to
    /// remove, if one has been down for `timeout` or longer (never with a zero timeout).
    pub fn observe(
        &mut self,
        members: &[String],
        live: &HashSet<String>,
        me: &str,
        now: Instant,
        timeout: Duration,
    ) -> Option<String> {
        self.down_since
            .retain(|n, _| members.contains(n) && !live.contains(n));
        for m in members.iter().filter(|m| *m != me && !live.contains(*m)) {
            self.down_since.entry(m.clone()).or_insert(now);
        }
        if timeout.is_zero() {
            return None;
        }
        self.down_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= timeout)
            .min_by_key(|(name, since)| (**since, (*name).clone()))
            .map(|(name, _)| name.clone())
    }

    /// Whether to report a refused removal now: at most once per [`REPORT_EVERY`].
    pub fn report_refusal(&mut self, now: Instant) -> bool {
        if self
            .reported
            .is_some_and(|r| now.duration_since(r) < REPORT_EVERY)
        {
            return false;
        }
        self.reported = Some(now);
        true
    }

    /// How long `name` has been down, as far as this watch knows.
    pub fn down_for(&self, name: &str, now: Instant) -> Option<Duration> {
        self.down_since.get(name).map(|s| now.duration_since(*s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn live(n: &[&str]) -> HashSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_member_down_past_the_timeout_is_removed_and_one_that_came_back_is_not() {
        let t = Duration::from_secs(300);
        let members = names(&["a", "b", "c", "d"]);
        let t0 = Instant::now();
        let mut w = DeadWatch::default();
        assert_eq!(
            w.observe(&members, &live(&["a", "b", "c"]), "a", t0, t),
            None
        );
        let later = t0 + Duration::from_secs(200);
        assert_eq!(w.observe(&members, &live(&["a", "b"]), "a", later, t), None);
        // d down for 300 s, c for 100 s: d goes.
        let at = t0 + t;
        assert_eq!(
            w.observe(&members, &live(&["a", "b"]), "a", at, t),
            Some("d".into())
        );
        assert_eq!(w.down_for("c", at), Some(Duration::from_secs(100)));
        // d came back before it was removed: its clock starts again when it goes down.
        let back = at + Duration::from_secs(1);
        assert_eq!(
            w.observe(&members, &live(&["a", "b", "d"]), "a", back, t),
            None
        );
        assert_eq!(w.down_for("d", back), None);
        assert_eq!(
            w.observe(&members, &live(&["a", "b"]), "a", back + t, t),
            Some("c".into()),
            "c has been down longest now"
        );
    }

    #[test]
    fn this_node_and_former_members_are_never_candidates_and_zero_never_removes() {
        let t = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut w = DeadWatch::default();
        let members = names(&["a", "b", "c"]);
        w.observe(&members, &live(&[]), "a", t0, t);
        assert_eq!(
            w.down_for("a", t0),
            None,
            "this node is alive by definition"
        );
        // b left the list (decommissioned meanwhile): forgotten.
        let fewer = names(&["a", "c"]);
        assert_eq!(
            w.observe(&fewer, &live(&[]), "a", t0 + t, t),
            Some("c".into())
        );
        assert_eq!(w.down_for("b", t0 + t), None);
        let mut never = DeadWatch::default();
        never.observe(&members, &live(&[]), "a", t0, Duration::ZERO);
        assert_eq!(
            never.observe(&members, &live(&[]), "a", t0 + t * 1000, Duration::ZERO),
            None
        );
    }
}
