//! What a run records: every publish attempt with its outcome, every session a device
//! opened and every message it was delivered, and the faults the nemesis injected.
//!
//! Times are milliseconds since the run started. A history is written as JSON lines, one
//! [`Event`] per line, so it can be read back and checked again (`warbler-chaos check`).

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The outcome of one publish attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged with this seq.
    Ok { seq: u64 },
    /// Definitely not done: the server refused it for a reason that stores nothing
    /// (bad request, forbidden, body too large).
    Failed { code: String },
    /// May or may not have been stored: a timeout, a lost connection, `unavailable`.
    Unknown { why: String },
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum Event {
    /// One attempt to publish message `id` to `user`, sent at `t` through node `node`,
    /// answered (or given up on) at `end`.
    Publish {
        t: f64,
        end: f64,
        publisher: u32,
        node: usize,
        user: String,
        id: String,
        attempt: u32,
        #[serde(flatten)]
        outcome: Outcome,
    },
    /// A device's connection was accepted; the server said its durable cursor is `cursor`.
    Connect {
        t: f64,
        device: String,
        user: String,
        node: usize,
        cursor: u64,
    },
    /// The device's connection ended (on purpose or not).
    Disconnect { t: f64, device: String, why: String },
    /// A message reached a device.
    Deliver {
        t: f64,
        device: String,
        user: String,
        seq: u64,
        id: String,
        /// The body was the message id, as every publisher sends it.
        body_ok: bool,
    },
    /// At the end, after every fault was healed, the device read its stream up to `upto`
    /// (the highest seq acknowledged or delivered for its user), or gave up at `reached`.
    Drained {
        t: f64,
        device: String,
        user: String,
        upto: u64,
        reached: u64,
    },
    /// A fault from `t` to `end` (`end` = `t` for instant faults such as a kill that is
    /// healed by a later restart).
    Fault {
        t: f64,
        end: f64,
        action: String,
        targets: Vec<usize>,
        detail: String,
    },
}

impl Event {
    pub fn time(&self) -> f64 {
        match self {
            Event::Publish { t, .. }
            | Event::Connect { t, .. }
            | Event::Disconnect { t, .. }
            | Event::Deliver { t, .. }
            | Event::Drained { t, .. }
            | Event::Fault { t, .. } => *t,
        }
    }
}

/// A shared, append-only history with the run's clock.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    /// Milliseconds since the run started.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    pub fn record(&self, e: Event) {
        self.events.lock().expect("history lock").push(e);
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Vec<Event> {
        self.events.lock().expect("history lock").clone()
    }
}

/// Writes `events` as JSON lines.
pub fn write(path: &Path, events: &[Event]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for e in events {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads a history written by [`write`].
pub fn read(path: &Path) -> anyhow::Result<Vec<Event>> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open history {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: not a history event ({e}); histories are written by warbler-chaos run",
                path.display(),
                n + 1
            )
        })?);
    }
    Ok(out)
}
