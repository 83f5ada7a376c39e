//! How a mailbox starts on a replicated log: the registry starts mailboxes one at a time,
//! so a barrier (about one commit under load) in every start would hold up every other start
//! on the node. Once a barrier has settled the partition under this leadership, a mailbox
//! whose predecessor stopped cleanly starts without one; after a failed write it waits for
//! one, as after a crash, and so it does after any stop with writes in flight. A late
//! notice that the node stopped leading the partition stops only the mailboxes of an
//! earlier leadership.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_bytes::ByteBuf;
use warbler_actors::{MailboxLimits, Mailboxes, RegistryArgs};
use warbler_storage::log::BoxFuture;
use warbler_storage::{Done, LocalLog, Op, PartitionId, PartitionLog, StorageError, Store};

/// How long the log's barrier takes: as one commit does on a loaded cluster.
const BARRIER_TAKES: Duration = Duration::from_millis(200);

/// A write the log holds back (proposed, not yet durable).
type Held = (PartitionId, Vec<Op>, Option<Done>);

/// The single-node log dressed as a replicated one: its barrier takes [`BARRIER_TAKES`] and
/// settles its partition, its writes can be made to fail or be held in flight (a barrier
/// lets them through first, as the proposals queued before it), and its leadership term can
/// change.
struct Replicated {
    inner: LocalLog,
    barriers: AtomicUsize,
    settled: Mutex<HashSet<PartitionId>>,
    failing: AtomicBool,
    holding: AtomicBool,
    held: Mutex<Vec<Held>>,
    term: AtomicU64,
}

impl Replicated {
    async fn release_held(&self) -> Result<(), StorageError> {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for (partition, ops, done) in held {
            self.inner.propose(partition, ops, done).await?;
        }
        Ok(())
    }
}

impl PartitionLog for Replicated {
    fn propose(
        &self,
        partition: PartitionId,
        ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        if self.failing.load(Ordering::Relaxed) {
            if let Some(done) = done {
                done(Err(StorageError::NotWritable {
                    partition,
                    reason: "the test fails this write".into(),
                }));
            }
            return Box::pin(async { Ok(()) });
        }
        if self.holding.load(Ordering::Relaxed) {
            self.held.lock().unwrap().push((partition, ops, done));
            return Box::pin(async { Ok(()) });
        }
        self.inner.propose(partition, ops, done)
    }

    fn barrier(&self, partition: PartitionId) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            self.barriers.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(BARRIER_TAKES).await;
            self.release_held().await?;
            self.inner.barrier(partition).await?;
            self.settled.lock().unwrap().insert(partition);
            Ok(())
        })
    }

    fn leader_term(&self, partition: PartitionId) -> Option<u64> {
        self.inner
            .leader_term(partition)
            .map(|_| self.term.load(Ordering::Relaxed))
    }

    fn replicated(&self) -> bool {
        true
    }

    fn settled(&self, partition: PartitionId) -> bool {
        self.settled.lock().unwrap().contains(&partition)
    }
}

async fn mailboxes(
    idle_timeout: Duration,
) -> (Mailboxes, Arc<Replicated>, Store, tempfile::TempDir) {
    let (inner, store, dir) = common::local_log();
    let log = Arc::new(Replicated {
        inner,
        barriers: AtomicUsize::new(0),
        settled: Mutex::default(),
        failing: AtomicBool::new(false),
        holding: AtomicBool::new(false),
        held: Mutex::default(),
        term: AtomicU64::new(1),
    });
    let (mailboxes, _) = Mailboxes::start(RegistryArgs {
        store: store.clone(),
        log: log.clone(),
        limits: MailboxLimits {
            inflight_max: 16,
            tail_cache_max: 8,
            idle_timeout,
            sleep_after: Duration::ZERO,
            cursor_flush: Duration::ZERO,
            unacked_max: 0,
        },
        partitions: 64,
    })
    .await
    .unwrap();
    (mailboxes, log, store, dir)
}

/// `n` users of one partition.
fn users_of_one_partition(mb: &Mailboxes, n: usize) -> Vec<String> {
    let partition = mb.partition_of("u0");
    (0..)
        .map(|i| format!("u{i}"))
        .filter(|u| mb.partition_of(u) == partition)
        .take(n)
        .collect()
}

fn body() -> ByteBuf {
    ByteBuf::from(b"hi".to_vec())
}

async fn wait_until_no_mailbox_runs(mb: &Mailboxes) {
    let start = std::time::Instant::now();
    while mb.active_count().await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the mailboxes never stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailboxes_of_a_settled_partition_start_without_a_barrier() {
    let (mb, log, store, _dir) = mailboxes(Duration::from_millis(100)).await;
    let users = users_of_one_partition(&mb, 40);
    let partition = mb.partition_of(&users[0]);

    assert_eq!(mb.publish(&users[0], "m1", body(), None).await.unwrap(), 1);
    assert_eq!(
        log.barriers.load(Ordering::Relaxed),
        1,
        "the first start settles"
    );

    let publishes = users
        .iter()
        .map(|u| mb.publish(u, "m2", body(), None))
        .collect::<Vec<_>>();
    for (user, seq) in users.iter().zip(futures::future::join_all(publishes).await) {
        let want = if user == &users[0] { 2 } else { 1 };
        assert_eq!(seq.unwrap(), want, "{user}");
    }
    assert_eq!(
        log.barriers.load(Ordering::Relaxed),
        1,
        "39 more mailboxes started in a settled partition without a barrier each"
    );

    // Idle mailboxes stop with nothing in flight; their successors read what they wrote.
    wait_until_no_mailbox_runs(&mb).await;
    assert_eq!(mb.publish(&users[0], "m3", body(), None).await.unwrap(), 3);
    assert_eq!(log.barriers.load(Ordering::Relaxed), 1);
    assert_eq!(store.last_seq(partition, &users[0]).unwrap(), 3);
    common::close(mb, log, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_that_stopped_on_a_failed_write_restarts_behind_a_barrier() {
    let (mb, log, store, _dir) = mailboxes(Duration::from_secs(60)).await;
    assert_eq!(mb.publish("ann", "m1", body(), None).await.unwrap(), 1);
    assert_eq!(log.barriers.load(Ordering::Relaxed), 1);

    log.failing.store(true, Ordering::Relaxed);
    let failed = mb.publish("ann", "m2", body(), None).await;
    assert!(failed.is_err(), "{failed:?}");
    log.failing.store(false, Ordering::Relaxed);
    // The failed write stopped the mailbox; the next publish starts a new one.
    wait_until_no_mailbox_runs(&mb).await;
    assert_eq!(mb.publish("ann", "m2", body(), None).await.unwrap(), 2);
    assert_eq!(
        log.barriers.load(Ordering::Relaxed),
        2,
        "its predecessor may have left writes in flight: the new mailbox waited for them"
    );
    common::close(mb, log, store).await;
}

/// The send order violation of `overload` (session 58): a mailbox stopped because
/// leadership moved while its entry was still in flight, and its successor, in a partition
/// settled under the new leadership, read the head without that entry and handed out its
/// seqs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_stopped_with_writes_in_flight_restarts_behind_a_barrier() {
    let (mb, log, store, _dir) = mailboxes(Duration::from_secs(60)).await;
    let partition = mb.partition_of("ann");
    assert_eq!(mb.publish("ann", "m1", body(), None).await.unwrap(), 1);
    assert_eq!(log.barriers.load(Ordering::Relaxed), 1);

    log.holding.store(true, Ordering::Relaxed);
    let in_flight = {
        let mb = mb.clone();
        tokio::spawn(async move { mb.publish("ann", "m2", body(), None).await })
    };
    let start = std::time::Instant::now();
    while log.held.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "m2 was never proposed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The node lost the partition and leads it again in a new term (settled in it: the
    // test log's settled set outlives terms); the notice of the loss stops the mailbox.
    log.term.store(2, Ordering::Relaxed);
    mb.stop_partition(partition);
    wait_until_no_mailbox_runs(&mb).await;
    let answer = in_flight.await.unwrap();
    assert!(
        answer.is_err(),
        "m2's outcome is unknown to its mailbox: {answer:?}"
    );
    log.holding.store(false, Ordering::Relaxed);

    assert_eq!(
        mb.publish("ann", "m3", body(), None).await.unwrap(),
        3,
        "the successor read the head after m2 landed"
    );
    assert_eq!(
        log.barriers.load(Ordering::Relaxed),
        2,
        "its predecessor stopped with a write in flight: the new mailbox waited for it"
    );
    assert_eq!(store.last_seq(partition, "ann").unwrap(), 3);
    common::close(mb, log, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_notice_of_lost_leadership_leaves_the_mailbox_of_the_new_one_running() {
    let (mb, log, store, _dir) = mailboxes(Duration::from_secs(60)).await;
    let partition = mb.partition_of("ann");
    assert_eq!(mb.publish("ann", "m1", body(), None).await.unwrap(), 1);
    let first = mb.get("ann").await.unwrap().get_id();

    // Term 2 is led here too: the mailbox of term 1 stops at its next publish...
    log.term.store(2, Ordering::Relaxed);
    assert!(mb.publish("ann", "m2", body(), None).await.is_err());
    wait_until_no_mailbox_runs(&mb).await;
    assert_eq!(mb.publish("ann", "m2", body(), None).await.unwrap(), 2);
    let second = mb.get("ann").await.unwrap().get_id();
    assert_ne!(first, second, "a mailbox of term 2 runs");

    // ... and the notice that term 1's leadership ended comes only now.
    mb.stop_partition(partition);
    assert_eq!(mb.publish("ann", "m3", body(), None).await.unwrap(), 3);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        mb.get("ann").await.unwrap().get_id(),
        second,
        "the writer of the leadership held now kept running"
    );

    // A notice while the node no longer leads in the mailbox's term stops it.
    log.term.store(3, Ordering::Relaxed);
    mb.stop_partition(partition);
    wait_until_no_mailbox_runs(&mb).await;
    common::close(mb, log, store).await;
}
