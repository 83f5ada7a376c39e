//! What a load run measures, the same way for every system it drives.
//!
//! Every body starts with a 16-byte header: the message's intended send time (ns since the
//! Unix epoch, so latency counts from when it *should* have been sent) and its number in its
//! user's stream (1, 2, 3, … from the one publisher that owns the user). A device that sees a
//! number at or below the last one counts an order violation (a repeat or a reordering); the
//! numbers it never sees count as gaps (each failed publish leaves one, so gaps are read
//! against `errors`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Bytes of the header at the start of every body.
pub const HEADER_BYTES: usize = 16;

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos() as u64
}

/// A histogram of microseconds, 1 µs .. 120 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

/// Writes the header into `body` (which is at least [`HEADER_BYTES`] long).
pub fn stamp_body(body: &mut [u8], due_ns: u64, number: u64) {
    body[..8].copy_from_slice(&due_ns.to_be_bytes());
    body[8..16].copy_from_slice(&number.to_be_bytes());
}

/// Reads the header back; `None` for a body too short to hold one.
pub fn read_body(body: &[u8]) -> Option<(u64, u64)> {
    let due = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    let number = u64::from_be_bytes(body.get(8..16)?.try_into().ok()?);
    Some((due, number))
}

/// Counters and histograms of one worker process, shared by its tasks.
pub struct Stats {
    deliver: Mutex<Histogram<u64>>,
    ack: Mutex<Histogram<u64>>,
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub errors: AtomicU64,
    /// Publishes the server refused (`overloaded`, or behind a refused one) and the
    /// publisher sent again, in order: not failures, and no gap.
    pub refused: AtomicU64,
    pub order_violations: AtomicU64,
    pub gaps: AtomicU64,
    pub last_delivery_ns: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            deliver: Mutex::new(histogram()),
            ack: Mutex::new(histogram()),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            order_violations: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
        }
    }
}

fn record(h: &Mutex<Histogram<u64>>, since_ns: u64) -> u64 {
    let now = now_ns();
    let us = (now.saturating_sub(since_ns) / 1000).max(1);
    h.lock()
        .expect("no panics while held")
        .saturating_record(us);
    now
}

impl Stats {
    /// A publish was acknowledged; `due_ns` is its intended send time.
    pub fn on_ack(&self, due_ns: u64) {
        record(&self.ack, due_ns);
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// A publish was refused or failed.
    pub fn on_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A publish was refused and will be sent again.
    pub fn on_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The worker's figures, with its histograms serialized.
    pub fn summary(&self) -> anyhow::Result<WorkerResult> {
        Ok(WorkerResult {
            published: self.published.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            order_violations: self.order_violations.load(Ordering::Relaxed),
            gaps: self.gaps.load(Ordering::Relaxed),
            last_delivery_ns: self.last_delivery_ns.load(Ordering::Relaxed),
            ack: encode_histogram(&self.ack.lock().expect("not poisoned"))?,
            deliver: encode_histogram(&self.deliver.lock().expect("not poisoned"))?,
        })
    }
}

/// What one device has seen: the number of the last message of its user.
#[derive(Default)]
pub struct DeviceTrack {
    last: u64,
}

impl DeviceTrack {
    /// Records one delivery of `body` to this device.
    pub fn on_delivery(&mut self, stats: &Stats, body: &[u8]) {
        let Some((due, number)) = read_body(body) else {
            stats.order_violations.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if number <= self.last {
            stats.order_violations.fetch_add(1, Ordering::Relaxed);
        } else {
            // Numbers skipped: publishes that failed (counted in `errors`) or were lost.
            stats
                .gaps
                .fetch_add(number - self.last - 1, Ordering::Relaxed);
            self.last = number;
        }
        let now = record(&stats.deliver, due);
        stats.delivered.fetch_add(1, Ordering::Relaxed);
        stats.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
    }
}

/// One worker's figures, sent to the parent as a JSON line.
#[derive(Serialize, Deserialize)]
pub struct WorkerResult {
    pub published: u64,
    pub delivered: u64,
    pub errors: u64,
    #[serde(default)]
    pub refused: u64,
    pub order_violations: u64,
    pub gaps: u64,
    pub last_delivery_ns: u64,
    /// Base64 of the V2 serialization of the histogram.
    pub ack: String,
    pub deliver: String,
}

pub fn encode_histogram(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

pub fn decode_histogram(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("histogram is not base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("reading a histogram: {e:?}"))
}

/// p50 / p99 / p99.9 / max of a histogram of microseconds, in milliseconds.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Quantiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_counts_gaps_repeats_and_reorders() {
        let stats = Stats::default();
        let mut d = DeviceTrack::default();
        let mut body = vec![0u8; 32];
        for n in [1, 2, 3, 5, 5, 4, 6, 9] {
            stamp_body(&mut body, now_ns(), n);
            d.on_delivery(&stats, &body);
        }
        // 5 -> 5 (repeat) and 5 -> 4 (reorder) are out of order; 4 and 7, 8 were skipped.
        assert_eq!(stats.order_violations.load(Ordering::Relaxed), 2);
        assert_eq!(stats.gaps.load(Ordering::Relaxed), 3);
        assert_eq!(stats.delivered.load(Ordering::Relaxed), 8);
        d.on_delivery(&stats, b"short");
        assert_eq!(stats.order_violations.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn histograms_survive_the_trip_between_processes() {
        let stats = Stats::default();
        for _ in 0..100 {
            stats.on_ack(now_ns() - 5_000_000);
        }
        let r = stats.summary().unwrap();
        let h = decode_histogram(&r.ack).unwrap();
        assert_eq!(h.len(), 100);
        let q = Quantiles::of(&h);
        assert!(q.p50 >= 5.0 && q.p50 < 50.0, "{q:?}");
        assert_eq!(r.published, 100);
    }
}
