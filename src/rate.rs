//! Publish rate limits per token subject (`limits.publish_rate`, `limits.publish_bytes_rate`,
//! each with a burst): one subject flooding a node is refused with `rate_limited` while
//! every other subject's publishes go on as before.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use warbler_config::LimitsConfig;

/// Why a publish was refused by the rate limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("{subject:?} publishes faster than this node allows ({what}); retry in {} ms", retry.as_micros().div_ceil(1000).max(1))]
    Limited {
        subject: String,
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

struct Limit {
    limiter: DefaultKeyedRateLimiter<String>,
    rate: u32,
    burst: u32,
    unit: &'static str,
    field: &'static str,
}

/// The node's publish limits.
pub struct PublishLimits {
    messages: Option<Limit>,
    bytes: Option<Limit>,
    clock: DefaultClock,
}

impl PublishLimits {
    pub fn new(l: &LimitsConfig) -> PublishLimits {
        let limit = |rate: u32, burst: u32, unit, field| {
            let rate_nz = NonZeroU32::new(rate)?;
            let burst_nz = NonZeroU32::new(burst.max(1)).expect("at least 1");
            Some(Limit {
                limiter: RateLimiter::keyed(Quota::per_second(rate_nz).allow_burst(burst_nz)),
                rate,
                burst: burst.max(1),
                unit,
                field,
            })
        };
        PublishLimits {
            messages: limit(l.publish_rate, l.publish_burst, "messages", "publish_burst"),
            bytes: limit(
                l.publish_bytes_rate,
                l.publish_bytes_burst,
                "bytes",
                "publish_bytes_burst",
            ),
            clock: DefaultClock::default(),
        }
    }

    /// Takes `messages` messages of `bytes` body bytes from `subject`'s allowance, or says
    /// how long to wait.
    pub fn check(&self, subject: &str, messages: u32, bytes: usize) -> Result<(), RateError> {
        if self.messages.is_none() && self.bytes.is_none() {
            return Ok(()); // the default: no copy of the subject per publish
        }
        let key = subject.to_string();
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        for (limit, n) in [(&self.messages, messages), (&self.bytes, bytes)] {
            let (Some(limit), Some(n)) = (limit, NonZeroU32::new(n)) else {
                continue;
            };
            match limit.limiter.check_key_n(&key, n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    metrics::counter!("warbler_publishes_rate_limited_total").increment(1);
                    return Err(RateError::Limited {
                        subject: subject.to_string(),
                        what: format!("{} {}/s, burst {}", limit.rate, limit.unit, limit.burst),
                        retry: not_until.wait_time_from(self.clock.now()),
                    });
                }
                Err(_) => {
                    return Err(RateError::TooLarge {
                        n: n.get(),
                        unit: limit.unit,
                        burst: limit.burst,
                        field: limit.field,
                    })
                }
            }
        }
        Ok(())
    }

    /// Forgets subjects whose allowance is full again (call now and then: one entry per
    /// subject seen otherwise stays).
    pub fn forget_idle(&self) {
        for limit in [&self.messages, &self.bytes].into_iter().flatten() {
            limit.limiter.retain_recent();
            limit.limiter.shrink_to_fit();
        }
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
    fn no_limits_by_default() {
        let l = PublishLimits::new(&LimitsConfig::default());
        for _ in 0..100_000 {
            l.check("x", 1, 512 * 1024).unwrap();
        }
    }
}
