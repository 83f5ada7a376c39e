//! [`Syncer`]: the node's one durability point for replicated writes.
//!
//! Every partition's consensus log appends, votes and applies are written without a sync.
//! A writer that needs its write durable hands a callback to the syncer; one thread makes
//! everything written so far durable with one WAL fsync and then runs every callback that
//! was waiting. All column families share one write-ahead log, so one sync covers every
//! partition's writes made before it, and a write that reached the disk implies every write
//! before it did too (the log replays as a prefix).
//!
//! This is TiKV's StoreWriter and CockroachDB's sync-waiter loop in small: under load one
//! fsync completes the appends of many Raft groups at once, instead of one fsync each.

use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::Instant;

use rocksdb::DB;

use crate::error::StorageError;

/// What runs once a sync covering its write finished (or failed).
pub type Synced = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// Hands callbacks to the syncer thread. Unbounded on purpose: each waiter is a write that
/// already happened, and a Raft group has at most one append (or vote) waiting at a time,
/// so the queue holds at most a few per partition of the node.
pub(crate) struct Syncer {
    waiting: mpsc::Sender<Synced>,
}

impl Syncer {
    /// Starts the syncer thread of `db`. It ends when the last handle to this syncer drops.
    pub(crate) fn start(db: Weak<DB>) -> Arc<Syncer> {
        let (waiting, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("warbler-syncer".into())
            .spawn(move || run(db, rx))
            .expect("the syncer thread starts");
        Arc::new(Syncer { waiting })
    }

    /// Runs `done` after the next sync: every write made before this call is durable then.
    pub(crate) fn after_sync(&self, done: Synced) {
        if let Err(mpsc::SendError(done)) = self.waiting.send(done) {
            done(Err(StorageError::Closed));
        }
    }
}

fn run(db: Weak<DB>, rx: mpsc::Receiver<Synced>) {
    let mut poisoned: Option<StorageError> = None;
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        // Everything queued now was written before it queued: one sync covers it all.
        batch.extend(rx.try_iter());
        let result = match (&poisoned, db.upgrade()) {
            (Some(e), _) => Err(e.clone()),
            (None, None) => Err(StorageError::Closed),
            (None, Some(db)) => {
                let started = Instant::now();
                let r = db.flush_wal(true).map_err(StorageError::from);
                metrics::histogram!("warbler_raft_sync_seconds")
                    .record(started.elapsed().as_secs_f64());
                r
            }
        };
        if let Err(e) = &result {
            // After a failed fsync the kernel may have dropped the dirty pages: nothing
            // written before can be called durable again (the node must restart).
            poisoned.get_or_insert_with(|| StorageError::Poisoned(format!("WAL sync: {e}")));
        }
        metrics::counter!("warbler_raft_syncs_total").increment(1);
        metrics::histogram!("warbler_raft_sync_waiters").record(batch.len() as f64);
        for done in batch.drain(..) {
            done(result.clone());
        }
    }
}
