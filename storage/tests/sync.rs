//! The syncer: writers that write without a sync and wait for the node's next fsync are
//! all completed, in the order they queued, whichever threads they come from.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use warbler_storage::Store;

#[test]
fn every_waiting_writer_completes_in_queue_order_after_a_shared_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let completed = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    const WAITERS: u64 = 2_000;
    for i in 0..WAITERS {
        store
            .raft_meta_put(1, &format!("k{i}"), &i.to_be_bytes(), false)
            .unwrap();
        let (completed, tx) = (completed.clone(), tx.clone());
        store.after_sync(Box::new(move |r| {
            r.expect("the sync succeeds");
            completed.lock().unwrap().push(i);
            tx.send(()).unwrap();
        }));
    }
    for _ in 0..WAITERS {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("every waiter completes");
    }
    let completed = completed.lock().unwrap().clone();
    assert_eq!(completed, (0..WAITERS).collect::<Vec<_>>());
    for i in [0, WAITERS / 2, WAITERS - 1] {
        assert_eq!(
            store.raft_meta_get(1, &format!("k{i}")).unwrap(),
            Some(i.to_be_bytes().to_vec())
        );
    }
}

#[tokio::test]
async fn synced_waits_from_async_code() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.raft_meta_put(1, "vote", b"v", false).unwrap();
    store.synced().await.unwrap();
    assert_eq!(store.raft_meta_get(1, "vote").unwrap(), Some(b"v".to_vec()));
}
