//! What the mailbox tests share: the single-node log over a store in a fresh directory, and
//! closing the database before a test ends.

use std::time::Duration;

use warbler_actors::Mailboxes;
use warbler_storage::{Committer, CommitterLimits, LocalLog, Store};

/// A store in a fresh directory and the single-node log writing it.
pub fn local_log() -> (LocalLog, Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let limits = CommitterLimits {
        batch_records_max: 64,
        batch_bytes_max: 1 << 20,
        queue_max: 64,
        sync: true,
    };
    let log = LocalLog::new(Committer::start(store.clone(), limits));
    (log, store, dir)
}

/// Stops the mailboxes, drops the test's handle on their log and waits until the database
/// is closed: the committer thread must not hold it while the test process exits.
pub async fn close<L>(mailboxes: Mailboxes, log: L, store: Store) {
    mailboxes.stop();
    drop(log);
    let start = std::time::Instant::now();
    while store.handles() > 1 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the database still has {} handles 5 s after the mailboxes stopped",
            store.handles()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
