//! Go-back-N for a publisher that keeps many publishes in flight on one connection
//! (docs/protocol.md, "Order").
//!
//! The server takes a publish only after the one before it to the same recipient on the
//! same connection. When it refuses one (`overloaded`, `unavailable`), it refuses every later
//! one to that recipient on the connection too, until the first refused one is sent again.
//! So a publisher, after a refusal for recipient R, waits until all of R's outstanding
//! publishes are answered, then sends the refused ones again in their original order,
//! before anything new to R. [`GoBackN`] keeps that bookkeeping; the caller owns the
//! connection, the timers and the frames.
//!
//! Publishes are named by a key `k` that grows in the order the caller first sends them.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

/// Every publish of one connection that is not answered for good yet, per recipient `U`,
/// each with the caller's payload `P` (its body, its send time, ...).
pub struct GoBackN<U, P> {
    open: HashMap<u64, (U, P)>,
    recipients: HashMap<U, Run>,
}

#[derive(Default)]
struct Run {
    /// Sent and not answered yet.
    in_flight: usize,
    /// Refused, or new behind refused ones: sent again at the next flush, in key order.
    held: BTreeSet<u64>,
    /// A flush was handed to the caller and has not happened yet.
    flush_planned: bool,
}

impl<U, P> Default for GoBackN<U, P> {
    fn default() -> Self {
        GoBackN {
            open: HashMap::new(),
            recipients: HashMap::new(),
        }
    }
}

impl<U: Hash + Eq + Clone, P> GoBackN<U, P> {
    /// A new publish `k` to `to`: `true` when the caller sends it now, `false` when it
    /// waits behind refused ones (it goes out with the next flush of `to`).
    pub fn send(&mut self, k: u64, to: U, payload: P) -> bool {
        let run = self.recipients.entry(to.clone()).or_default();
        let now = run.held.is_empty();
        if now {
            run.in_flight += 1;
        } else {
            run.held.insert(k);
        }
        self.open.insert(k, (to, payload));
        now
    }

    /// `k` is answered for good (acknowledged, or refused for a reason that sending it
    /// again would not change). Returns its payload, and the recipient to flush when this
    /// was the last answer that recipient's held publishes waited for.
    pub fn done(&mut self, k: u64) -> (Option<P>, Option<U>) {
        let Some((to, payload)) = self.open.remove(&k) else {
            return (None, None);
        };
        let flush = self.answered(&to);
        (Some(payload), flush)
    }

    /// `k` was refused and must be sent again. Returns the recipient to flush when this was
    /// the last answer its held publishes waited for (the caller waits the pause the server
    /// asked for, then calls [`GoBackN::flush`]).
    pub fn refused(&mut self, k: u64) -> Option<U> {
        let to = self.open.get(&k)?.0.clone();
        self.recipients
            .entry(to.clone())
            .or_default()
            .held
            .insert(k);
        self.answered(&to)
    }

    fn answered(&mut self, to: &U) -> Option<U> {
        let run = self.recipients.get_mut(to)?;
        run.in_flight = run.in_flight.saturating_sub(1);
        let due = run.in_flight == 0 && !run.held.is_empty();
        (due && !std::mem::replace(&mut run.flush_planned, true)).then(|| to.clone())
    }

    /// The held publishes of `to`, to send now in this order; they count as in flight again.
    pub fn flush(&mut self, to: &U) -> Vec<u64> {
        let Some(run) = self.recipients.get_mut(to) else {
            return Vec::new();
        };
        run.flush_planned = false;
        let held = std::mem::take(&mut run.held);
        run.in_flight += held.len();
        held.into_iter().collect()
    }

    /// The connection was lost: every open publish goes again, in key order, on the next
    /// connection (a new connection starts every recipient's run afresh). Returns them.
    pub fn reconnected(&mut self) -> Vec<u64> {
        self.recipients.clear();
        let mut keys: Vec<u64> = self.open.keys().copied().collect();
        keys.sort_unstable();
        for k in &keys {
            let to = self.open[k].0.clone();
            self.recipients.entry(to).or_default().in_flight += 1;
        }
        keys
    }

    /// Whether nothing to `to` is open: none in flight, none held.
    pub fn idle(&self, to: &U) -> bool {
        self.recipients
            .get(to)
            .is_none_or(|run| run.in_flight == 0 && run.held.is_empty())
    }

    /// Publishes not answered for good.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub fn get(&self, k: u64) -> Option<&(U, P)> {
        self.open.get(&k)
    }

    pub fn get_mut(&mut self, k: u64) -> Option<&mut (U, P)> {
        self.open.get_mut(&k)
    }

    /// Every open publish, in no particular order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut (U, P))> {
        self.open.iter_mut().map(|(k, v)| (*k, v))
    }
}

/// Which of a publisher's connections each recipient's publishes go on, for a publisher
/// that holds a connection to every node and sends each publish to its recipient's leader
/// (docs/protocol.md, "Routing by leader"). The server orders the publishes of one
/// connection to one recipient; two connections are not ordered against each other. So a
/// recipient stays on the connection its open publishes went on, and moves to the one its
/// latest route names only once every publish to it there is answered for good: a leader
/// that moved costs a forward until then, never an overtaking publish.
pub struct Sticky<U> {
    on: HashMap<U, usize>,
}

impl<U> Default for Sticky<U> {
    fn default() -> Self {
        Sticky { on: HashMap::new() }
    }
}

impl<U: Hash + Eq + Clone> Sticky<U> {
    /// The connection for the next publish to `to`, asked before it enters `open`:
    /// `wanted` (its leader's by the latest routes) when nothing to `to` is open, else the
    /// connection its open publishes went on.
    pub fn pick<P>(&mut self, open: &GoBackN<U, P>, to: &U, wanted: usize) -> usize {
        if open.idle(to) {
            self.on.insert(to.clone(), wanted);
            return wanted;
        }
        *self.on.entry(to.clone()).or_insert(wanted)
    }

    /// The connection `to`'s open publishes went on (held ones go again there).
    pub fn on(&self, to: &U) -> Option<usize> {
        self.on.get(to).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_holds_the_recipient_until_its_run_is_answered_then_resends_in_order() {
        let mut g: GoBackN<&str, ()> = GoBackN::default();
        assert!(g.send(1, "a", ()));
        assert!(g.send(2, "a", ()));
        assert!(g.send(3, "b", ()));
        assert!(g.send(4, "a", ()));
        // 2 refused; 4 (behind it) still in flight: no flush yet.
        assert_eq!(g.refused(2), None);
        // New publishes to a wait behind the refused one; b is not affected.
        assert!(!g.send(5, "a", ()));
        assert!(g.send(6, "b", ()));
        assert_eq!(g.done(1), (Some(()), None));
        // The last one in flight to a is refused too: now a's run is due.
        assert_eq!(g.refused(4), Some("a"));
        // A second answer does not plan a second flush.
        assert_eq!(g.flush(&"a"), vec![2, 4, 5]);
        assert!(g.flush(&"a").is_empty());
        assert_eq!(g.done(2).1, None);
        assert_eq!(g.done(4).1, None);
        assert_eq!(g.done(5).1, None);
        assert!(
            g.send(7, "a", ()),
            "a is no longer held once its resends are out"
        );
        assert_eq!(g.len(), 3); // 3, 6, 7
    }

    #[test]
    fn a_new_connection_resends_everything_open_in_key_order() {
        let mut g: GoBackN<&str, u32> = GoBackN::default();
        for k in [10, 11, 12, 13] {
            g.send(k, if k % 2 == 0 { "a" } else { "b" }, 0);
        }
        g.refused(11);
        assert_eq!(g.done(10).0, Some(0));
        assert_eq!(g.reconnected(), vec![11, 12, 13]);
        // Every one of them is in flight now: a refusal of 13 waits for 11's answer.
        assert_eq!(g.refused(13), None);
        assert_eq!(g.done(11).1, Some("b"));
        assert_eq!(g.flush(&"b"), vec![13]);
    }

    #[test]
    fn a_recipient_moves_to_its_new_leader_only_once_nothing_to_it_is_open() {
        let mut g: GoBackN<&str, ()> = GoBackN::default();
        let mut on: Sticky<&str> = Sticky::default();
        assert_eq!(on.pick(&g, &"a", 0), 0);
        g.send(1, "a", ());
        // The route moved to connection 1 while 1 is in flight on connection 0: a's next
        // publishes stay on 0, or they could overtake it; b, with nothing open, goes to 1.
        assert_eq!(on.pick(&g, &"a", 1), 0);
        g.send(2, "a", ());
        assert_eq!(on.pick(&g, &"b", 1), 1);
        g.done(1);
        assert_eq!(on.pick(&g, &"a", 1), 0, "2 is still open on connection 0");
        // 2 is refused: held, and sent again on connection 0, where the refusal was.
        assert_eq!(g.refused(2), Some("a"));
        assert_eq!(on.pick(&g, &"a", 1), 0, "2 is held");
        assert_eq!(g.flush(&"a"), vec![2]);
        assert_eq!(on.on(&"a"), Some(0));
        g.done(2);
        assert!(g.idle(&"a"));
        assert_eq!(on.pick(&g, &"a", 1), 1, "nothing open: a follows its route");
        assert_eq!(on.on(&"a"), Some(1));
    }
}
