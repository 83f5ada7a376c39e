//! The consensus storage checked by openraft's own storage suite, plus what the suite
//! cannot build: entries carrying Warbler ops, and snapshots moving a partition between
//! nodes.

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError};
use serde_bytes::ByteBuf;
use warbler_cluster::raft_store::{Batch, LogStore, StateMachine, TypeConfig};
use warbler_storage::{Op, Store, StoredMessage};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        Ok((
            dir,
            LogStore::new(store.clone(), 3),
            StateMachine::new(store, 3),
        ))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).unwrap();
}

fn append(seq: u64) -> Op {
    let msg = StoredMessage {
        id: format!("m{seq}"),
        ts: seq,
        from: None,
        body: ByteBuf::from(vec![seq as u8]),
    };
    Op::Append {
        partition: 3,
        user: "ann".into(),
        seq,
        msg,
    }
}

fn entry(index: u64, ops: Vec<Op>) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
        payload: EntryPayload::Normal(Batch { ops }),
    }
}

#[tokio::test]
async fn applied_batches_reach_the_mailboxes_and_snapshots_move_a_partition() {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&dir.path().join("a")).unwrap();
    let mut sm = StateMachine::new(a.clone(), 3);
    let out = sm
        .apply(vec![
            entry(1, vec![append(1), append(2)]),
            entry(2, vec![append(3)]),
        ])
        .await
        .unwrap();
    assert_eq!(out.iter().map(|r| r.ops).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!(a.verify_user(3, "ann").unwrap(), Some((1, 3)));
    assert_eq!(
        a.dedup(3, "ann", "m2").unwrap(),
        Some(2),
        "dedup records are replicated too"
    );
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.unwrap().index, 2);

    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let b = Store::open(&dir.path().join("b")).unwrap();
    let mut follower = StateMachine::new(b.clone(), 3);
    follower
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(b.verify_user(3, "ann").unwrap(), Some((1, 3)));
    assert_eq!(follower.applied_state().await.unwrap().0.unwrap().index, 2);
    let served = follower
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("the installed snapshot is kept");
    assert_eq!(served.meta.last_log_id.unwrap().index, 2);

    // The log store of another partition on the same database is independent.
    let mut other = LogStore::new(a, 4);
    assert_eq!(other.get_log_state().await.unwrap().last_log_id, None);
}
