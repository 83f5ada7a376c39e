//! Publish rate limits per token subject (`limits.publish_rate`, `limits.publish_bytes_rate`)
//! and per device-protocol connection (`limits.connection_publish_rate`,
//! `limits.connection_publish_bytes_rate`), each with a burst: one subject or connection
//! flooding a node is refused with `rate_limited` while every other one's publishes go on
//! as before.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, QuantaInstant};
use governor::middleware::NoOpMiddleware;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, NotUntil, Quota, RateLimiter};
use warbler_config::LimitsConfig;

/// Why a publish was refused by the rate limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("{who} publishes faster than this node allows ({what}); retry in {} ms", retry.as_micros().div_ceil(1000).max(1))]
    Limited {
        /// The subject (quoted) or "this connection".
        who: String,
        what: String,
        retry: Duration,
    },
    #[error(
        "this request alone ({n} {unit}) exceeds the burst {burst} of limits.{field}; split it"
    )]
    TooLarge {
        n: u32,
        unit: &'static str,
        burst: u32,
        field: &'static str,
    },
}

impl RateError {
    /// How long the publisher should wait (none for a request that can never pass).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RateError::Limited { retry, .. } => Some(*retry),
            RateError::TooLarge { .. } => None,
        }
    }
}

/// One configured limit: its limiter (keyed per subject, or direct for one connection) and
/// what the error says about it.
struct Limit<L> {
    limiter: L,
    rate: u32,
    burst: u32,
    unit: &'static str,
    field: &'static str,
}

type Checked = Result<Result<(), NotUntil<QuantaInstant>>, governor::InsufficientCapacity>;

impl<L> Limit<L> {
    fn new(
        rate: u32,
        burst: u32,
        (unit, field): (&'static str, &'static str),
        make: impl FnOnce(Quota) -> L,
    ) -> Option<Limit<L>> {
        let rate_nz = NonZeroU32::new(rate)?;
        let burst_nz = NonZeroU32::new(burst.max(1)).expect("at least 1");
        Some(Limit {
            limiter: make(Quota::per_second(rate_nz).allow_burst(burst_nz)),
            rate,
            burst: burst.max(1),
            unit,
            field,
        })
    }

    /// The verdict on taking `n` from this limit (`checked`), for `who`.
    fn verdict(
        &self,
        checked: Checked,
        n: u32,
        who: impl FnOnce() -> String,
    ) -> Result<(), RateError> {
        match checked {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                metrics::counter!("warbler_publishes_rate_limited_total").increment(1);
                Err(RateError::Limited {
                    who: who(),
                    what: format!("{} {}/s, burst {}", self.rate, self.unit, self.burst),
                    retry: not_until.wait_time_from(DefaultClock::default().now()),
                })
            }
            Err(_) => Err(RateError::TooLarge {
                n,
                unit: self.unit,
                burst: self.burst,
                field: self.field,
            }),
        }
    }
}

/// The pair of limits (messages, body bytes) of one kind.
struct Pair<L> {
    messages: Option<Limit<L>>,
    bytes: Option<Limit<L>>,
}

impl<L> Pair<L> {
    fn new(
        (rate, burst, bytes_rate, bytes_burst): (u32, u32, u32, u32),
        fields: (&'static str, &'static str),
        make: impl Fn(Quota) -> L,
    ) -> Pair<L> {
        Pair {
            messages: Limit::new(rate, burst, ("messages", fields.0), &make),
            bytes: Limit::new(bytes_rate, bytes_burst, ("bytes", fields.1), &make),
        }
    }

    fn is_off(&self) -> bool {
        self.messages.is_none() && self.bytes.is_none()
    }

    /// Checks `messages` messages of `bytes` body bytes with `check` on each limit set.
    fn check(
        &self,
        messages: u32,
        bytes: usize,
        check: impl Fn(&L, NonZeroU32) -> Checked,
        who: impl Fn() -> String,
    ) -> Result<(), RateError> {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        for (limit, n) in [(&self.messages, messages), (&self.bytes, bytes)] {
            let (Some(limit), Some(n_nz)) = (limit, NonZeroU32::new(n)) else {
                continue;
            };
            limit.verdict(check(&limit.limiter, n_nz), n, &who)?;
        }
        Ok(())
    }
}

/// The node's publish limits per token subject, and what each connection's start from.
pub struct PublishLimits {
    subjects: Pair<DefaultKeyedRateLimiter<String>>,
    /// Rates and bursts of each connection's own limits.
    per_connection: (u32, u32, u32, u32),
}

impl PublishLimits {
    pub fn new(l: &LimitsConfig) -> PublishLimits {
        PublishLimits {
            subjects: Pair::new(
                (
                    l.publish_rate,
                    l.publish_burst,
                    l.publish_bytes_rate,
                    l.publish_bytes_burst,
                ),
                ("publish_burst", "publish_bytes_burst"),
                RateLimiter::keyed,
            ),
            per_connection: (
                l.connection_publish_rate,
                l.connection_publish_burst,
                l.connection_publish_bytes_rate,
                l.connection_publish_bytes_burst,
            ),
        }
    }

    /// Takes `messages` messages of `bytes` body bytes from `subject`'s allowance, or says
    /// how long to wait.
    pub fn check(&self, subject: &str, messages: u32, bytes: usize) -> Result<(), RateError> {
        if self.subjects.is_off() {
            return Ok(()); // the default: no copy of the subject per publish
        }
        let key = subject.to_string();
        self.subjects.check(
            messages,
            bytes,
            |l, n| l.check_key_n(&key, n),
            || format!("{subject:?}"),
        )
    }

    /// A new connection's own limits; `None` when none is configured (the default, so an
    /// idle connection carries nothing for them).
    pub fn for_connection(&self) -> Option<ConnectionLimits> {
        let pair = Pair::new(
            self.per_connection,
            ("connection_publish_burst", "connection_publish_bytes_burst"),
            RateLimiter::direct,
        );
        (!pair.is_off()).then_some(ConnectionLimits(pair))
    }

    /// Forgets subjects whose allowance is full again (call now and then: one entry per
    /// subject seen otherwise stays).
    pub fn forget_idle(&self) {
        let s = &self.subjects;
        for limit in [&s.messages, &s.bytes].into_iter().flatten() {
            limit.limiter.retain_recent();
            limit.limiter.shrink_to_fit();
        }
    }
}

/// One connection's publish limits.
pub struct ConnectionLimits(Pair<DefaultDirectRateLimiter<NoOpMiddleware<QuantaInstant>>>);

impl ConnectionLimits {
    /// Takes `messages` messages of `bytes` body bytes from this connection's allowance.
    pub fn check(&self, messages: u32, bytes: usize) -> Result<(), RateError> {
        self.0.check(
            messages,
            bytes,
            |l, n| l.check_n(n),
            || "this connection".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u32, burst: u32, bytes_rate: u32, bytes_burst: u32) -> PublishLimits {
        PublishLimits::new(&LimitsConfig {
            publish_rate: rate,
            publish_burst: burst,
            publish_bytes_rate: bytes_rate,
            publish_bytes_burst: bytes_burst,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn one_subject_is_limited_and_the_others_are_not() {
        let l = limits(10, 5, 0, 1);
        for _ in 0..5 {
            l.check("flood", 1, 100).unwrap();
        }
        let e = l.check("flood", 1, 100).unwrap_err();
        let retry = e.retry_after().unwrap();
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_millis(100),
            "{retry:?}"
        );
        assert!(e.to_string().contains("10 messages/s, burst 5"), "{e}");
        for _ in 0..5 {
            l.check("calm", 1, 100).unwrap();
        }
        std::thread::sleep(Duration::from_millis(120));
        l.check("flood", 1, 100)
            .expect("one more allowed after 100 ms");
    }

    #[test]
    fn bytes_are_limited_and_a_request_over_the_burst_can_never_pass() {
        let l = limits(0, 1, 1000, 1500);
        l.check("b", 1, 1500).unwrap();
        assert!(matches!(
            l.check("b", 1, 10),
            Err(RateError::Limited { .. })
        ));
        let e = l.check("c", 1, 1501).unwrap_err();
        assert_eq!(e.retry_after(), None);
        assert!(e.to_string().contains("publish_bytes_burst"), "{e}");
        let fanout = limits(100, 50, 0, 1).check("f", 51, 0).unwrap_err();
        assert!(matches!(fanout, RateError::TooLarge { n: 51, .. }));
    }

    #[test]
    fn each_connection_has_its_own_allowance() {
        let l = PublishLimits::new(&LimitsConfig {
            connection_publish_rate: 10,
            connection_publish_burst: 3,
            ..LimitsConfig::default()
        });
        let (a, b) = (l.for_connection().unwrap(), l.for_connection().unwrap());
        for _ in 0..3 {
            a.check(1, 10).unwrap();
        }
        let e = a.check(1, 10).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("this connection publishes faster"),
            "{e}"
        );
        assert!(e.retry_after().unwrap() > Duration::ZERO);
        for _ in 0..3 {
            b.check(1, 10)
                .expect("another connection is not limited by the first");
        }
        assert!(
            l.check("any subject", 1, 10).is_ok(),
            "no subject limit is set"
        );
    }

    #[test]
    fn no_limits_by_default() {
        let l = PublishLimits::new(&LimitsConfig::default());
        assert!(l.for_connection().is_none());
        for _ in 0..100_000 {
            l.check("x", 1, 512 * 1024).unwrap();
        }
    }
}
