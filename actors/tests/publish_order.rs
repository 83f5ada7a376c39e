//! A mailbox takes a publish that names the one before it (on its connection) only once
//! that one was taken, and refuses new publishes at once while its partition's log is at its
//! backlog bound.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_bytes::ByteBuf;
use warbler_actors::{MailboxError, MailboxLimits, Mailboxes, RegistryArgs};
use warbler_storage::log::BoxFuture;
use warbler_storage::{Done, LocalLog, Op, PartitionId, PartitionLog, StorageError, Store};

/// The single-node log, with a switch that says the partition is at its backlog bound.
struct Switched {
    inner: LocalLog,
    full: AtomicBool,
}

impl PartitionLog for Switched {
    fn propose(
        &self,
        partition: PartitionId,
        ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        self.inner.propose(partition, ops, done)
    }

    fn barrier(&self, partition: PartitionId) -> BoxFuture<'_, Result<(), StorageError>> {
        self.inner.barrier(partition)
    }

    fn leader_term(&self, partition: PartitionId) -> Option<u64> {
        self.inner.leader_term(partition)
    }

    fn admits(&self, _partition: PartitionId) -> bool {
        !self.full.load(Ordering::Relaxed)
    }
}

async fn mailboxes() -> (Mailboxes, Arc<Switched>, Store, tempfile::TempDir) {
    let (inner, store, dir) = common::local_log();
    let log = Arc::new(Switched {
        inner,
        full: AtomicBool::new(false),
    });
    let (mailboxes, _) = Mailboxes::start(RegistryArgs {
        store: store.clone(),
        log: log.clone(),
        limits: MailboxLimits {
            inflight_max: 16,
            tail_cache_max: 8,
            idle_timeout: Duration::from_secs(60),
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

fn body(s: &str) -> ByteBuf {
    ByteBuf::from(s.as_bytes().to_vec())
}

#[tokio::test]
async fn a_publish_after_one_not_taken_is_refused_and_taken_once_that_one_is() {
    let (mb, log, store, _dir) = mailboxes().await;
    let early = mb
        .publish_after("ann", "b", body("b"), None, Some("a".into()))
        .await;
    assert!(
        matches!(&early, Err(MailboxError::OutOfOrder(id)) if id == "a"),
        "{early:?}"
    );
    assert_eq!(mb.publish("ann", "a", body("a"), None).await.unwrap(), 1);
    let b = mb.publish_after("ann", "b", body("b"), None, Some("a".into()));
    assert_eq!(b.await.unwrap(), 2, "taken after the one it follows");
    // A retry of a publish already taken gets its seq whatever it names.
    let again = mb.publish_after("ann", "b", body("b"), None, Some("never-sent".into()));
    assert_eq!(again.await.unwrap(), 2);
    assert_eq!(store.last_seq(mb.partition_of("ann"), "ann").unwrap(), 2);
    common::close(mb, log, store).await;
}

#[tokio::test]
async fn a_full_backlog_refuses_new_publishes_at_once_but_answers_retries() {
    let (mb, log, store, _dir) = mailboxes().await;
    assert_eq!(mb.publish("ann", "a", body("a"), None).await.unwrap(), 1);
    log.full.store(true, Ordering::Relaxed);
    let refused = mb.publish("ann", "b", body("b"), None).await;
    assert!(
        matches!(refused, Err(MailboxError::Overloaded(_))),
        "{refused:?}"
    );
    assert!(
        !refused.unwrap_err().is_transient(),
        "refused back to the publisher, not retried"
    );
    assert_eq!(
        mb.publish("ann", "a", body("a"), None).await.unwrap(),
        1,
        "a retry still answers"
    );
    log.full.store(false, Ordering::Relaxed);
    assert_eq!(
        mb.publish("ann", "b", body("b"), None).await.unwrap(),
        2,
        "nothing was skipped"
    );
    assert_eq!(store.last_seq(mb.partition_of("ann"), "ann").unwrap(), 2);
    common::close(mb, log, store).await;
}

/// The publish an `after` names is looked for in the mailbox's memory (pending, or among
/// its newest committed messages) before its dedup record: shown here by removing that
/// record first, which only the in-memory lookup survives.
#[tokio::test]
async fn the_publish_named_by_after_is_found_among_the_newest_committed_without_a_read() {
    let (mb, log, store, _dir) = mailboxes().await;
    assert_eq!(mb.publish("ann", "a", body("a"), None).await.unwrap(), 1);
    let partition = mb.partition_of("ann");
    let policy = warbler_storage::RetentionPolicy {
        max_messages: 0,
        max_age_ms: 0,
        dedup_window_ms: 1,
    };
    let far = warbler_storage::now_ms() + 3_600_000;
    let trimmed = store.trim_user(partition, "ann", &policy, far).unwrap();
    assert_eq!(trimmed.dedup_records, 1, "{trimmed:?}");
    assert_eq!(store.dedup(partition, "ann", "a").unwrap(), None);
    let b = mb.publish_after("ann", "b", body("b"), None, Some("a".into()));
    assert_eq!(b.await.unwrap(), 2, "'a' was found in the mailbox's tail");
    common::close(mb, log, store).await;
}
