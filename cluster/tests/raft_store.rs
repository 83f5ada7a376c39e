//! The consensus storage checked by openraft's own storage suite, plus what the suite
//! cannot build: entries carrying Warbler ops, and snapshots moving a partition between
//! nodes.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, StorageError,
};
use serde_bytes::ByteBuf;
use warbler_cluster::raft_store::{Batch, LogStore, StateMachine, TypeConfig};
use warbler_storage::{Op, Row, Store, StoredMessage};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = LogStore::new(store, 3);
        let sm = StateMachine::of(&log);
        Ok((dir, log, sm))
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
        payload: EntryPayload::Normal(Batch { ops: ops.into() }),
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

    let snapshot = build(&mut sm).await;
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

#[tokio::test]
async fn the_committed_id_reaches_the_disk_with_the_apply_that_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut log = LogStore::new(store.clone(), 3);
    let mut sm = StateMachine::of(&log);
    let id = |index| LogId::new(CommittedLeaderId::new(1, 0), index);
    log.save_committed(Some(id(2))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(id(2)));
    sm.apply(vec![entry(1, vec![append(1)]), entry(2, vec![append(2)])])
        .await
        .unwrap();
    // A log store opened now (as after a restart) reads what the apply wrote.
    let mut restarted = LogStore::new(store, 3);
    assert_eq!(restarted.read_committed().await.unwrap(), Some(id(2)));
}

/// The newest entries are served from memory: with their rows gone from RocksDB behind the
/// log store's back, the store still reads them; a truncated tail is gone from both.
#[tokio::test]
async fn replication_and_apply_read_the_newest_entries_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut log = LogStore::new(store.clone(), 3);
    let entries: Vec<_> = (1..=5).map(|i| entry(i, vec![append(i)])).collect();
    log.blocking_append(entries.clone()).await.unwrap();
    store.raft_log_delete(3, 0, u64::MAX, false).unwrap();
    let mut cold = LogStore::new(store.clone(), 3);
    assert!(
        cold.try_get_log_entries(1..=5).await.unwrap().is_empty(),
        "the rows are gone from RocksDB"
    );
    let mut reader = log.get_log_reader().await;
    assert_eq!(reader.try_get_log_entries(1..=5).await.unwrap(), entries);
    assert_eq!(
        reader.try_get_log_entries(2..4).await.unwrap(),
        entries[1..3]
    );
    log.truncate(entries[2].log_id).await.unwrap();
    assert!(reader.try_get_log_entries(3..=5).await.unwrap().is_empty());
    assert_eq!(
        reader.try_get_log_entries(1..3).await.unwrap(),
        entries[..2]
    );
}

/// The contiguity check reads the heads the state machine applied from memory, and forgets
/// them when a restore or a snapshot install writes heads of its own.
#[tokio::test]
async fn applied_heads_decide_the_next_check_until_a_restore_or_an_install_replaces_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&dir.path().join("a")).unwrap();
    let mut sm = StateMachine::new(a.clone(), 3);
    let refusals = |out: Vec<warbler_cluster::raft_store::Applied>| {
        out.iter().filter(|r| r.refused.is_some()).count()
    };
    let out = sm.apply(vec![entry(1, vec![append(1), append(2)])]).await;
    assert_eq!(refusals(out.unwrap()), 0);
    // The rows are gone behind the state machine's back: the head it applied still decides.
    a.drop_partition(3).unwrap();
    let out = sm.apply(vec![entry(2, vec![append(3)])]).await.unwrap();
    assert_eq!(refusals(out), 0, "checked against the applied head, 2");

    // A restore sets ann's head to 10: the next append follows it, in this call or the next.
    let head_row = |seq: u64| Row {
        cf: "heads".into(),
        key: ByteBuf::from(warbler_storage::keys::user_prefix(3, "ann")),
        value: ByteBuf::from(seq.to_be_bytes().to_vec()),
    };
    let restore = Op::Restore {
        partition: 3,
        rows: vec![head_row(10)],
    };
    let out = sm.apply(vec![entry(3, vec![restore])]).await.unwrap();
    assert_eq!(refusals(out), 0);
    let out = sm.apply(vec![entry(4, vec![append(4)])]).await.unwrap();
    assert_eq!(refusals(out), 1, "seq 4 after the restored head 10");
    let out = sm.apply(vec![entry(5, vec![append(11)])]).await.unwrap();
    assert_eq!(refusals(out), 0);

    // A snapshot whose head of ann is 1 replaces the state: seq 2 follows it again.
    let b = Store::open(&dir.path().join("b")).unwrap();
    let mut other = StateMachine::new(b, 3);
    other.apply(vec![entry(6, vec![append(1)])]).await.unwrap();
    let mut snapshot = build(&mut other).await;
    let mut to = sm.begin_receiving_snapshot().await.unwrap();
    stream(&mut snapshot.snapshot, &mut to, 1 << 20).await;
    sm.install_snapshot(&snapshot.meta, to).await.unwrap();
    let out = sm.apply(vec![entry(7, vec![append(2)])]).await.unwrap();
    assert_eq!(refusals(out), 0, "seq 2 after the installed head 1");
    assert_eq!(a.last_seq(3, "ann").unwrap(), 2);
}

/// `count` entries from index `first`, each with `per` appends of `body` bytes for user
/// `u<index>`.
fn big_entries(first: u64, count: u64, per: u64, body: usize) -> Vec<Entry<TypeConfig>> {
    (first..first + count)
        .map(|index| {
            let ops = (1..=per)
                .map(|seq| Op::Append {
                    partition: 3,
                    user: format!("u{index}"),
                    seq,
                    msg: StoredMessage {
                        id: format!("m{index}-{seq}"),
                        ts: seq,
                        from: None,
                        body: ByteBuf::from(vec![index as u8; body]),
                    },
                })
                .collect();
            entry(index, ops)
        })
        .collect()
}

async fn build(sm: &mut StateMachine) -> openraft::storage::Snapshot<TypeConfig> {
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap()
}

fn snapshot_files(store: &Store) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.snapshot_dir())
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// What openraft does with a snapshot between two replicas: read the leader's file in
/// chunks and write each at its offset into the file the follower began.
async fn stream(from: &mut tokio::fs::File, to: &mut tokio::fs::File, chunk: usize) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; chunk];
        from.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
        let n = from.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        to.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
        to.write_all(&buf[..n]).await.unwrap();
        offset += n as u64;
    }
    to.shutdown().await.unwrap();
    offset
}

/// A partition larger than a chunk and than one install write goes over as a file in
/// chunks; a node stopped half way through installing it finishes the install when its
/// group starts again, from the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_file_streams_in_chunks_and_an_install_cut_short_finishes_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&dir.path().join("a")).unwrap();
    let mut leader = StateMachine::new(a.clone(), 3);
    // 12 MiB of bodies in 48 entries.
    leader.apply(big_entries(1, 48, 8, 32 << 10)).await.unwrap();
    let built = build(&mut leader).await;
    assert_eq!(built.meta.last_log_id.unwrap().index, 48);
    assert_eq!(snapshot_files(&a).len(), 1, "{:?}", snapshot_files(&a));

    let b_dir = dir.path().join("b");
    let b = Store::open(&b_dir).unwrap();
    let mut follower = StateMachine::new(b.clone(), 3);
    let mut from = leader.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(from.meta, built.meta);
    let mut to = follower.begin_receiving_snapshot().await.unwrap();
    let sent = stream(&mut from.snapshot, &mut to, 1 << 20).await;
    assert!(sent > 12 << 20, "{sent} bytes sent");
    follower.install_snapshot(&from.meta, to).await.unwrap();
    let expected = a.export_partition(3).unwrap();
    assert_eq!(b.export_partition(3).unwrap(), expected);
    assert_eq!(follower.applied_state().await.unwrap().0.unwrap().index, 48);
    let files = snapshot_files(&b);
    assert_eq!(
        files.len(),
        1,
        "only the installed snapshot's file: {files:?}"
    );
    let served = follower.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(
        served.meta, built.meta,
        "the installed snapshot is served on"
    );

    // Stop half way through a second install of the same file: the first write (rows and
    // the marker) reached the database, the last did not.
    let [current_key, installing_key, _] = warbler_cluster::raft_store::SNAPSHOT_KEYS;
    let record = b.raft_meta_get(3, current_key).unwrap().unwrap();
    let file = b.snapshot_dir().join(&files[0]);
    let cut = warbler_storage::snapshot::Reader::open(&file)
        .unwrap()
        .take(200)
        .chain([Err(warbler_storage::StorageError::Closed)]);
    assert!(b
        .import_partition_streamed(3, cut, (installing_key, record), &[])
        .is_err());
    let half = b.export_partition(3).unwrap().len();
    assert!(
        half > 0 && half < expected.len(),
        "{half} rows after the cut"
    );
    drop((follower, served, b));

    let b = Store::open(&b_dir).unwrap();
    let mut follower = StateMachine::new(b.clone(), 3);
    let (applied, _) = follower.applied_state().await.unwrap();
    assert_eq!(applied.unwrap().index, 48);
    assert_eq!(
        b.export_partition(3).unwrap(),
        expected,
        "the install finished when the group started"
    );
    assert_eq!(b.raft_meta_get(3, installing_key).unwrap(), None);

    // A snapshot built later replaces the file it supersedes.
    follower.apply(big_entries(49, 2, 2, 100)).await.unwrap();
    let rebuilt = build(&mut follower).await;
    assert_eq!(rebuilt.meta.last_log_id.unwrap().index, 50);
    let now = snapshot_files(&b);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, files);
}

/// A node of the previous release kept its snapshot as one value; the first time it is
/// asked for, a file of the state replaces it.
#[tokio::test]
async fn a_snapshot_kept_as_one_value_by_the_previous_release_becomes_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(dir.path()).unwrap();
    let mut sm = StateMachine::new(a.clone(), 3);
    sm.apply(big_entries(1, 3, 2, 10)).await.unwrap();
    let [current_key, _, legacy_key] = warbler_cluster::raft_store::SNAPSHOT_KEYS;
    let built = build(&mut sm).await;
    // What the previous release stored: the meta and every row, as one value.
    #[derive(serde::Serialize)]
    struct Old {
        meta: openraft::SnapshotMeta<u64, openraft::BasicNode>,
        rows: warbler_storage::PartitionRows,
    }
    let old = rmp_serde::to_vec_named(&Old {
        meta: built.meta.clone(),
        rows: a.export_partition(3).unwrap(),
    })
    .unwrap();
    a.raft_meta_update(3, &[(legacy_key, old)], &[current_key], true)
        .unwrap();
    for f in snapshot_files(&a) {
        std::fs::remove_file(a.snapshot_dir().join(f)).unwrap();
    }

    let served = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(served.meta.last_log_id, built.meta.last_log_id);
    assert_eq!(a.raft_meta_get(3, legacy_key).unwrap(), None);
    assert!(a.raft_meta_get(3, current_key).unwrap().is_some());
    assert_eq!(snapshot_files(&a).len(), 1);
}

/// The process's peak resident memory so far, in bytes (Linux).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Snapshot figures for docs/benchmarks.md: a partition of WARBLER_SNAPSHOT_MIB (default
/// 256) MiB of bodies is built into a file, streamed in openraft's default 3 MiB chunks
/// to another store and installed; prints the time of each step and how far the process's
/// peak memory rose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --workspace --test raft_store snapshot_figures -- --ignored --nocapture"]
async fn snapshot_figures() {
    let mib: u64 = std::env::var("WARBLER_SNAPSHOT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&dir.path().join("a")).unwrap();
    let mut leader = StateMachine::new(a.clone(), 3);
    // 4 KiB bodies, 64 per entry: 256 KiB an entry.
    let entries = mib * 4;
    for first in (1..=entries).step_by(64) {
        let count = 64.min(entries + 1 - first);
        leader
            .apply(big_entries(first, count, 64, 4 << 10))
            .await
            .unwrap();
    }
    let before = peak_rss();
    let t = std::time::Instant::now();
    let built = build(&mut leader).await;
    let build = t.elapsed();
    let b = Store::open(&dir.path().join("b")).unwrap();
    let mut follower = StateMachine::new(b.clone(), 3);
    let mut from = leader.get_current_snapshot().await.unwrap().unwrap();
    let t = std::time::Instant::now();
    let mut to = follower.begin_receiving_snapshot().await.unwrap();
    let bytes = stream(&mut from.snapshot, &mut to, 3 << 20).await;
    let sent = t.elapsed();
    let t = std::time::Instant::now();
    follower.install_snapshot(&built.meta, to).await.unwrap();
    let install = t.elapsed();
    let after = peak_rss();
    let rows = b
        .export_partition_with_meta(3, &[])
        .map(|(r, _)| r.len())
        .unwrap();
    println!(
        "snapshot of {mib} MiB of bodies ({rows} rows, file {:.0} MiB): build {build:?}, chunks written {sent:?}, install (check + import) {install:?}; peak RSS {:.0} MiB before, {:.0} MiB after (+{:.0} MiB)",
        bytes as f64 / 1048576.0,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        after.saturating_sub(before) as f64 / 1048576.0,
    );
}
