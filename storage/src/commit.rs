//! The group committer: many writers, one fsync per batch.
//!
//! Writers send requests into a bounded queue. One thread takes every request waiting (up
//! to `batch_records_max` records or `batch_bytes_max` bytes), stages them in one
//! `WriteBatch`, writes it with one fsync, then completes the requests in the order they
//! were queued. Batches are written in queue order, so a request completing means every
//! request queued before it is durable too.
//!
//! A failed write poisons the committer: every later request fails with
//! [`StorageError::Poisoned`], so no later write can land after a lost one (which would open
//! a gap in some user's sequence).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rocksdb::WriteBatch;
use tokio::sync::mpsc;

use crate::error::StorageError;
use crate::store::{Op, Store};

/// Runs once a request's batch is durable (or failed). Called on the committer thread, in
/// queue order: keep it short (send a message, complete a channel).
pub type Done = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

struct Request {
    ops: Vec<Op>,
    done: Option<Done>,
}

/// Limits of the committer.
#[derive(Debug, Clone, Copy)]
pub struct CommitterLimits {
    pub batch_records_max: usize,
    pub batch_bytes_max: usize,
    pub queue_max: usize,
    pub sync: bool,
}

/// The handle writers use. Cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Request>,
    poisoned: Arc<AtomicBool>,
}

impl Committer {
    /// Starts the committer thread over `store`.
    pub fn start(store: Store, limits: CommitterLimits) -> Committer {
        let (tx, rx) = mpsc::channel(limits.queue_max);
        let poisoned = Arc::new(AtomicBool::new(false));
        let flag = poisoned.clone();
        std::thread::Builder::new()
            .name("warbler-commit".into())
            .spawn(move || run(store, limits, rx, flag))
            .expect("spawning the committer thread");
        Committer { tx, poisoned }
    }

    /// Queues `ops`; `done` runs once they are durable. Waits while the queue is full.
    pub async fn submit(&self, ops: Vec<Op>, done: Option<Done>) -> Result<(), StorageError> {
        self.tx.send(Request { ops, done }).await.map_err(|_| StorageError::Closed)
    }

    /// Queues `ops` and waits until they are durable.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(ops, Some(Box::new(move |r| { let _ = tx.send(r); }))).await?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// True after a write failed: the node must not accept writes.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

fn run(store: Store, limits: CommitterLimits, mut rx: mpsc::Receiver<Request>, poisoned: Arc<AtomicBool>) {
    let mut poison: Option<String> = None;
    let mut pending: Vec<Request> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        pending.push(first);
        let mut records = pending[0].ops.len();
        let mut bytes: usize = pending[0].ops.iter().map(Op::size_bytes).sum();
        while records < limits.batch_records_max && bytes < limits.batch_bytes_max {
            match rx.try_recv() {
                Ok(req) => {
                    records += req.ops.len();
                    bytes += req.ops.iter().map(Op::size_bytes).sum::<usize>();
                    pending.push(req);
                }
                Err(_) => break,
            }
        }
        let result = match &poison {
            Some(why) => Err(StorageError::Poisoned(why.clone())),
            // Only barriers: nothing to write; completing them in order is the point.
            None if records == 0 => Ok(()),
            None => write_batch(&store, &pending, records, limits.sync),
        };
        if let Err(e) = &result {
            if poison.is_none() {
                tracing::error!(error = %e, "write batch failed; refusing all further writes");
                poison = Some(e.to_string());
                poisoned.store(true, Ordering::Release);
            }
        }
        for req in pending.drain(..) {
            if let Some(done) = req.done {
                done(result.clone());
            }
        }
    }
}

fn write_batch(store: &Store, pending: &[Request], records: usize, sync: bool) -> Result<(), StorageError> {
    let started = Instant::now();
    let mut batch = WriteBatch::default();
    for req in pending {
        for op in &req.ops {
            store.stage(&mut batch, op);
        }
    }
    let r = store.write(batch, sync);
    metrics::counter!("warbler_fsync_batches_total").increment(1);
    metrics::histogram!("warbler_fsync_batch_records").record(records as f64);
    metrics::histogram!("warbler_fsync_seconds").record(started.elapsed().as_secs_f64());
    r
}

#[cfg(test)]
mod tests {
    use serde_bytes::ByteBuf;

    use super::*;
    use crate::store::StoredMessage;

    fn limits() -> CommitterLimits {
        CommitterLimits { batch_records_max: 64, batch_bytes_max: 1 << 20, queue_max: 1024, sync: true }
    }

    #[tokio::test]
    async fn concurrent_writers_share_batches_and_complete_in_queue_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = Committer::start(store.clone(), limits());
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waits = Vec::new();
        for seq in 1..=500u64 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let order = order.clone();
            let op = Op::Append {
                partition: 0,
                user: "u".into(),
                seq,
                msg: StoredMessage { id: seq.to_string(), ts: 0, from: None, body: ByteBuf::new() },
            };
            c.submit(vec![op], Some(Box::new(move |r| {
                order.lock().unwrap().push(seq);
                let _ = tx.send(r);
            })))
            .await
            .unwrap();
            waits.push(rx);
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (1..=500).collect::<Vec<_>>());
        assert_eq!(store.verify_user(0, "u").unwrap(), Some((1, 500)));
    }

    #[tokio::test]
    async fn a_barrier_completes_after_everything_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = Committer::start(store.clone(), limits());
        for seq in 1..=300u64 {
            let op = Op::Append {
                partition: 0,
                user: "b".into(),
                seq,
                msg: StoredMessage { id: seq.to_string(), ts: 0, from: None, body: ByteBuf::new() },
            };
            c.submit(vec![op], None).await.unwrap();
        }
        c.commit(Vec::new()).await.unwrap();
        assert_eq!(store.last_seq(0, "b").unwrap(), 300, "the barrier waited for all 300");
    }
}
