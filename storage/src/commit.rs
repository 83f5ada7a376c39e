//! The group committer: many writers, one fsync per batch.
//!
//! Writers send requests into a bounded queue. One thread takes every request waiting (up
//! to `batch_records_max` records or `batch_bytes_max` bytes), stages them in one
//! `WriteBatch`, writes it with one fsync, then completes the requests in the order they
//! were queued. Batches are written in queue order, so a request completing means every
//! request queued before it is durable too.
//!
//! Before staging, every append is checked against its user's head: its seq must be exactly
//! head + 1 (counting appends earlier in the same batch). A request that breaks this is
//! refused with [`StorageError::Corrupt`] and not written: a second writer or a lost update
//! can never overwrite a message or leave a gap. This pairs with the mailbox's own check.
//!
//! A failed write poisons the committer: every later request fails with
//! [`StorageError::Poisoned`], so no later write can land after a lost one (which would open
//! a gap in some user's sequence).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rocksdb::WriteBatch;
use tokio::sync::mpsc;

use crate::error::StorageError;
use crate::store::{Op, Store};

/// Heads cached by the committer for the contiguity check; cleared when it grows past this
/// (a miss costs one point read).
const HEAD_CACHE_MAX: usize = 100_000;

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
        self.tx
            .send(Request { ops, done })
            .await
            .map_err(|_| StorageError::Closed)
    }

    /// Queues `ops` and waits until they are durable.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            ops,
            Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        )
        .await?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// True after a write failed: the node must not accept writes.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

fn run(
    store: Store,
    limits: CommitterLimits,
    mut rx: mpsc::Receiver<Request>,
    poisoned: Arc<AtomicBool>,
) {
    let mut poison: Option<String> = None;
    let mut pending: Vec<Request> = Vec::new();
    let mut heads = Heads {
        store: store.clone(),
        cached: HashMap::new(),
    };
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
        let mut refused: Vec<(usize, StorageError)> = Vec::new();
        if poison.is_none() {
            for (i, req) in pending.iter().enumerate() {
                if let Err(e) = heads.admit(&req.ops) {
                    tracing::error!(error = %e, "refusing a non-contiguous append");
                    refused.push((i, e));
                }
            }
        }
        let writable = pending.len() - refused.len();
        let result = match &poison {
            Some(why) => Err(StorageError::Poisoned(why.clone())),
            // Only barriers: nothing to write; completing them in order is the point.
            None if records == 0 || writable == 0 => Ok(()),
            None => write_batch(&store, &pending, &refused, records, limits.sync),
        };
        if let Err(e) = &result {
            if poison.is_none() {
                tracing::error!(error = %e, "write batch failed; refusing all further writes");
                poison = Some(e.to_string());
                poisoned.store(true, Ordering::Release);
            }
        }
        let mut refused = refused.into_iter().peekable();
        for (i, req) in pending.drain(..).enumerate() {
            let r = match refused.next_if(|(j, _)| *j == i) {
                Some((_, e)) => Err(e),
                None => result.clone(),
            };
            if let Some(done) = req.done {
                done(r);
            }
        }
    }
}

/// The head of every user the committer has written, for the contiguity check.
struct Heads {
    store: Store,
    cached: HashMap<(crate::PartitionId, String), u64>,
}

impl Heads {
    /// Admits a request if each of its appends is its user's head + 1, advancing the heads;
    /// otherwise refuses it whole and leaves the heads as they were.
    fn admit(&mut self, ops: &[Op]) -> Result<(), StorageError> {
        let mut advanced: Vec<((crate::PartitionId, String), u64)> = Vec::new();
        for op in ops {
            if let Op::Restore { partition, .. } = op {
                // Restored heads are read from the store once written.
                self.cached.retain(|(p, _), _| p != partition);
                continue;
            }
            let Op::Append {
                partition,
                user,
                seq,
                ..
            } = op
            else {
                continue;
            };
            let key = (*partition, user.clone());
            let head = match advanced.iter().rev().find(|(k, _)| *k == key) {
                Some((_, h)) => *h,
                None => match self.cached.get(&key) {
                    Some(h) => *h,
                    None => self.store.last_seq(*partition, user)?,
                },
            };
            if *seq != head + 1 {
                return Err(StorageError::Corrupt(format!(
                    "append of seq {seq} for user {user:?} whose head is {head}: refused (two writers, or a lost update)"
                )));
            }
            advanced.push((key, *seq));
        }
        if self.cached.len() + advanced.len() > HEAD_CACHE_MAX {
            self.cached.clear();
        }
        self.cached.extend(advanced);
        Ok(())
    }
}

fn write_batch(
    store: &Store,
    pending: &[Request],
    refused: &[(usize, StorageError)],
    records: usize,
    sync: bool,
) -> Result<(), StorageError> {
    let started = Instant::now();
    let mut batch = WriteBatch::default();
    let admitted = pending
        .iter()
        .enumerate()
        .filter(|(i, _)| !refused.iter().any(|(j, _)| j == i))
        .flat_map(|(_, req)| req.ops.iter());
    store.stage_all(&mut batch, admitted);
    // Without fsync a batch still reaches the operating system before it is acknowledged:
    // a crash of the process loses nothing acknowledged, only a power loss can.
    let r = store
        .write(batch, sync)
        .and_then(|()| if sync { Ok(()) } else { store.flush_wal() });
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
        CommitterLimits {
            batch_records_max: 64,
            batch_bytes_max: 1 << 20,
            queue_max: 1024,
            sync: true,
        }
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
                msg: StoredMessage {
                    id: seq.to_string(),
                    ts: 0,
                    from: None,
                    body: ByteBuf::new(),
                },
            };
            c.submit(
                vec![op],
                Some(Box::new(move |r| {
                    order.lock().unwrap().push(seq);
                    let _ = tx.send(r);
                })),
            )
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
                msg: StoredMessage {
                    id: seq.to_string(),
                    ts: 0,
                    from: None,
                    body: ByteBuf::new(),
                },
            };
            c.submit(vec![op], None).await.unwrap();
        }
        c.commit(Vec::new()).await.unwrap();
        assert_eq!(
            store.last_seq(0, "b").unwrap(),
            300,
            "the barrier waited for all 300"
        );
    }

    fn append(seq: u64, id: &str) -> Op {
        Op::Append {
            partition: 0,
            user: "w".into(),
            seq,
            msg: StoredMessage {
                id: id.into(),
                ts: 0,
                from: None,
                body: ByteBuf::new(),
            },
        }
    }

    #[tokio::test]
    async fn a_second_writer_cannot_overwrite_or_skip_a_seq() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = Committer::start(store.clone(), limits());
        c.commit(vec![append(1, "a"), append(2, "b")])
            .await
            .unwrap();
        let reuse = c.commit(vec![append(2, "other")]).await.unwrap_err();
        assert!(reuse.to_string().contains("head is 2"), "{reuse}");
        let gap = c.commit(vec![append(4, "c")]).await.unwrap_err();
        assert!(matches!(gap, StorageError::Corrupt(_)));
        // A refused request does not poison the committer; the right next seq still lands.
        c.commit(vec![append(3, "d")]).await.unwrap();
        let ids: Vec<String> = store
            .read_range(0, "w", 0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, m)| m.id)
            .collect();
        assert_eq!(ids, vec!["a", "b", "d"]);
    }
}
