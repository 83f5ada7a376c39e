//! Periodic work on one grid per process: the node's loops and every Raft group's tick fire
//! on shared instants, multiples of their period since the process started, so an idle node
//! wakes a few times a second instead of once per loop and group at scattered moments.
//!
//! On a machine of 2 cores running three nodes, each wake-up of a parked worker costs tens
//! of microseconds of context switching, far more than the check it runs. Before this grid
//! an idle node woke about 136 times a second: each of its 64 groups' tick (every 375 ms,
//! each at its own phase) and each loop at its own.
//!
//! - [`interval`]: a `tokio` interval whose ticks are the grid's multiples of its period.
//! - [`GridRuntime`]: openraft's runtime with one change: its tick loop, the only caller of
//!   `sleep_until`, sleeps until the grid point nearest to the deadline it asks for. The
//!   nearest, not the next: a tick that wakes a millisecond late must not slip a whole
//!   period. Each tick is at most half a period early or late, and every later one is on
//!   time. Processes have their own origin, so the nodes of a cluster do not tick in step
//!   (which would synchronise the followers' election timeouts).

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioInstant, TokioRuntime};
use tokio::time::{Instant, Interval, MissedTickBehavior};

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds from the grid's origin to `at`, negative before it (a test with a paused
/// clock may see instants on either side).
fn since_origin(at: Instant) -> i128 {
    let o = origin();
    if at >= o {
        (at - o).as_nanos() as i128
    } else {
        -((o - at).as_nanos() as i128)
    }
}

fn at_offset(nanos: i128) -> Instant {
    let o = origin();
    if nanos >= 0 {
        o + Duration::from_nanos(nanos as u64)
    } else {
        o - Duration::from_nanos((-nanos) as u64)
    }
}

/// The first grid point of `period` at or after `at`.
pub fn next(at: Instant, period: Duration) -> Instant {
    let p = period.as_nanos().max(1) as i128;
    let n = since_origin(at);
    let up = if n.rem_euclid(p) == 0 { 0 } else { p };
    at_offset(n.div_euclid(p) * p + up)
}

/// The grid point of `period` nearest to `at`.
pub fn nearest(at: Instant, period: Duration) -> Instant {
    let p = period.as_nanos().max(1) as i128;
    at_offset((since_origin(at) + p / 2).div_euclid(p) * p)
}

/// An interval ticking on the grid's multiples of `period`; the first tick is the next grid
/// point (not at once, as `tokio::time::interval`'s). Missed ticks are skipped, so the
/// ticks stay on the grid after a busy spell.
pub fn interval(period: Duration) -> Interval {
    let mut tick = tokio::time::interval_at(next(Instant::now(), period), period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    tick
}

/// When a tick asked for at `deadline` at `now` fires: at the grid point nearest to
/// `deadline` of the period `deadline - now`, rounded to whole milliseconds.
fn tick_at(now: Instant, deadline: Instant) -> Instant {
    let ahead = deadline.saturating_duration_since(now);
    let period = Duration::from_millis(((ahead.as_nanos() + 500_000) / 1_000_000) as u64);
    if period.is_zero() {
        return deadline;
    }
    nearest(deadline, period)
}

/// openraft's tokio runtime, with its tick on the grid (see the module's header).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GridRuntime;

impl AsyncRuntime for GridRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> =
        <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = <TokioRuntime as AsyncRuntime>::ThreadLocalRng;
    type OneshotSender<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <TokioRuntime as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    /// The tick loop's sleep: `deadline` is one tick interval from now, rounded to whole
    /// milliseconds (the loop adds its interval to a slightly earlier `now`), and the
    /// sleep ends at the grid point of that interval nearest to `deadline`.
    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(tick_at(Instant::now(), deadline))
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        TokioRuntime::thread_rng()
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_started_apart_end_on_the_same_grid_point() {
        let period = Duration::from_millis(375);
        let now = Instant::now();
        let first = next(now, period);
        assert!(first >= now && first - now <= period);
        for later in [1, 100, 200] {
            let at = now + later * MS;
            if at <= first {
                assert_eq!(next(at, period), first, "started {later} ms later");
            } else {
                assert_eq!(next(at, period), first + period, "started {later} ms later");
            }
        }
        assert_eq!(next(first, period), first, "a grid point is its own next");
    }

    #[test]
    fn raft_tick_loops_keep_their_period_and_share_instants() {
        // openraft's tick loop asks for now + interval after each tick, and the tick's
        // work makes `now` a little later than the instant it woke at.
        let interval = Duration::from_millis(375);
        let start = Instant::now();
        let mut fired = Vec::new();
        for (offset, work) in [(10, 1), (260, 3), (300, 0)] {
            let mut now = start + offset * MS;
            let mut ticks = Vec::new();
            for _ in 0..6 {
                let at = tick_at(now, now + interval);
                assert!(at > now, "never in the past");
                assert!(
                    at - now <= interval + interval / 2,
                    "at most half a period late"
                );
                ticks.push(at);
                now = at + work * MS;
            }
            for w in ticks[1..].windows(2) {
                assert_eq!(
                    w[1] - w[0],
                    interval,
                    "after the first, every tick is on time"
                );
            }
            fired.push(ticks[1..].to_vec());
        }
        // Loops started at any moment tick at instants of one grid.
        for ticks in &fired {
            for t in ticks {
                assert_eq!(nearest(*t, interval), *t);
            }
        }
    }

    #[test]
    fn before_the_origin_the_grid_still_rounds() {
        let o = origin();
        let p = Duration::from_millis(100);
        if let Some(before) = o.checked_sub(Duration::from_millis(250)) {
            assert_eq!(next(before, p), o - Duration::from_millis(200));
            assert_eq!(nearest(before, p), o - Duration::from_millis(200));
        }
        assert_eq!(nearest(o + Duration::from_millis(149), p), o + p);
        assert_eq!(next(o + p, p), o + p);
    }
}
