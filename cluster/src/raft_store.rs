//! Consensus storage for one partition: the openraft log store and state machine, both in
//! the node's RocksDB.
//!
//! - The **log** keeps entries under `raft_log` (partition, index) and the vote, the
//!   committed id and the purge point under `raft_meta`. Appends and votes are written
//!   without a sync and reported durable after the node's syncer's next fsync, which covers
//!   every partition's writes at once (`warbler_storage::sync`).
//! - The **state machine** applies each entry's [`Batch`] of ops (appends, cursor moves,
//!   with their dedup records) to the partition's mailboxes, together with the last applied
//!   log id and membership, in one atomic write. Applying is not fsynced: after a crash the
//!   log replays from the last applied id that did reach the disk.
//! - A **snapshot** is the partition's whole replicated state (its rows in the message,
//!   cursor, dedup and head column families) plus the applied id and membership, in a file
//!   (`warbler_storage::snapshot`): written, sent, received and installed a row or a chunk at
//!   a time, never held whole in memory. An install is restartable: a node that stops half
//!   way installs the same file again when it starts.
//! - Nothing is purged from the log before a sync: the purge point is applied, and the
//!   sync makes that apply durable, so a restart never needs an entry that is gone.

// openraft's storage traits return `StorageError` by value (224 bytes); the helpers here
// return what those traits return, so boxing would only add a conversion at every call.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use warbler_storage::snapshot::{self, Which};
use warbler_storage::{Op, PartitionId, Store};

use crate::entry_cache::EntryCache;

/// One log entry's worth of state changes. Shared, not copied, when an entry is cloned out
/// of the [`EntryCache`] (to replicate it to each follower and to apply it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub ops: Arc<[Op]>,
}

/// What applying a batch returns to the proposer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub ops: usize,
    /// Why the entry was refused (applied as a no-op on every replica): an append whose
    /// seq does not follow the user's head, i.e. a writer with a stale view.
    pub refused: Option<String>,
}

openraft::declare_raft_types!(
    /// Warbler's consensus types: node ids are u64, entries carry [`Batch`]es.
    pub TypeConfig:
        D = Batch,
        R = Applied,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = crate::grid::GridRuntime,
);

pub type NodeId = u64;
type Error = StorageError<NodeId>;
/// The last applied log id and the membership as of it.
type AppliedState = (
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, openraft::BasicNode>,
);

const META_VOTE: &str = "vote";
const META_COMMITTED: &str = "committed";
const META_PURGED: &str = "purged";
const META_APPLIED: &str = "applied";
/// The consensus metadata key of a partition's last applied log id (read by backups).
pub const APPLIED_KEY: &str = META_APPLIED;

/// The (term, index) of a value kept under [`APPLIED_KEY`].
pub fn applied_position(bytes: &[u8]) -> Option<(u64, u64)> {
    let id: Option<LogId<NodeId>> = decode(bytes).ok()?;
    id.map(|l| (l.leader_id.term, l.index))
}
const META_MEMBERSHIP: &str = "membership";
/// The previous release's snapshot: the whole file as one value. Read once, then replaced
/// by a file.
const META_SNAPSHOT_LEGACY: &str = "snapshot";
/// The current snapshot: a [`SnapshotRecord`].
const META_SNAPSHOT: &str = "snapshot_file";
/// The [`SnapshotRecord`] of an install under way: set in the install's first write,
/// removed in its last. Found at start, the install is done again from its file.
const META_INSTALLING: &str = "snapshot_installing";
/// The consensus metadata keys of the current snapshot, of an install under way and of the
/// previous release's snapshot value (read by tests that stop an install half way).
pub const SNAPSHOT_KEYS: [&str; 3] = [META_SNAPSHOT, META_INSTALLING, META_SNAPSHOT_LEGACY];

fn io_err(e: impl ToString) -> Error {
    StorageIOError::write(&std::io::Error::other(e.to_string())).into()
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("consensus types serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(io_err)
}

/// The log of one partition. Its clones (the readers openraft replicates and applies with,
/// and the group's [`StateMachine`]) share one [`EntryCache`] and the committed id.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
    partition: PartitionId,
    cache: Arc<Mutex<EntryCache>>,
    /// The last committed id openraft reported: written with the next apply, which follows
    /// every commit, instead of in a write of its own.
    committed: Arc<Mutex<Option<LogId<NodeId>>>>,
}

impl LogStore {
    pub fn new(store: Store, partition: PartitionId) -> Self {
        Self {
            store,
            partition,
            cache: Arc::default(),
            committed: Arc::default(),
        }
    }

    fn committed(&self) -> Option<LogId<NodeId>> {
        *self.committed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, Error> {
        match self
            .store
            .raft_meta_get(self.partition, key)
            .map_err(io_err)?
        {
            Some(b) => decode(&b).map(Some),
            None => Ok(None),
        }
    }

    /// Writes `key` without a sync: callers that need it durable wait for the syncer.
    fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), Error> {
        self.store
            .raft_meta_put(self.partition, key, &encode(v), false)
            .map_err(io_err)
    }

    /// Waits for the node's next sync, which covers every write made before this call.
    async fn synced(&self) -> Result<(), Error> {
        self.store.synced().await.map_err(io_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        self.entries(start, end, usize::MAX)
    }

    /// What replication sends in one AppendEntries: up to `end`, or until the entries read
    /// reach [`crate::raft_log::APPEND_BYTES_MAX`] bytes (openraft sends the rest next).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        self.entries(start, end, crate::raft_log::APPEND_BYTES_MAX)
    }
}

impl LogStore {
    /// Entries `start..end`, decoded, stopping once they reach `bytes_max` bytes: from the
    /// cache when it holds `start`, else from RocksDB.
    fn entries(
        &self,
        start: u64,
        end: u64,
        bytes_max: usize,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        if let Some(hit) = self.cache().get(start, end, bytes_max) {
            metrics::counter!("warbler_raft_entry_reads_total", "from" => "cache").increment(1);
            return Ok(hit);
        }
        metrics::counter!("warbler_raft_entry_reads_total", "from" => "storage").increment(1);
        let rows = self
            .store
            .raft_log_range_bytes(self.partition, start, end, bytes_max)
            .map_err(io_err)?;
        rows.iter().map(|(_, b)| decode(b)).collect()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.meta(META_PURGED)?;
        let last = match self.store.raft_log_last(self.partition).map_err(io_err)? {
            Some((_, b)) => Some(decode::<Entry<TypeConfig>>(&b)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), Error> {
        // A vote is a promise: it is on disk before it is answered.
        self.put_meta(META_VOTE, vote)?;
        self.synced().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, Error> {
        self.meta(META_VOTE)
    }

    /// Kept for the apply that follows every commit, which writes it (unsynced) with the
    /// applied id: a restarted replica applies up to it at once, and state rebuilt from the
    /// log at start (the member list) needs that. What reaches the disk is never behind the
    /// applied id, and never ahead of what was committed.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), Error> {
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, Error> {
        if let Some(committed) = self.committed() {
            return Ok(Some(committed));
        }
        Ok(self
            .meta::<Option<LogId<NodeId>>>(META_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let rows: Vec<(u64, Vec<u8>)> = entries
            .iter()
            .map(|e| (e.log_id.index, encode(e)))
            .collect();
        // Written now, readable at once, durable after the node's next sync: one fsync
        // completes the appends of every group waiting on it. The cache is held meanwhile,
        // so a reader sees the log and the cache change together.
        let mut cache = self.cache();
        self.store
            .raft_log_put(self.partition, &rows, false)
            .map_err(io_err)?;
        for (entry, (_, bytes)) in entries.into_iter().zip(&rows) {
            cache.append(entry, bytes.len());
        }
        drop(cache);
        self.store.after_sync(Box::new(move |r| {
            callback.log_io_completed(r.map_err(|e| std::io::Error::other(e.to_string())));
        }));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), Error> {
        // No sync: the append that follows a truncation waits for one, and the log replays
        // in write order, so the truncation is durable before anything appended after it.
        let mut cache = self.cache();
        cache.truncate(log_id.index);
        self.store
            .raft_log_delete(self.partition, log_id.index, u64::MAX, false)
            .map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), Error> {
        // The purge point first: a crash between the two leaves extra entries, never a hole.
        self.put_meta(META_PURGED, &log_id)?;
        // Entries up to the purge point are applied; the sync makes those applies (written
        // without one) durable before the entries that could replay them are gone.
        self.synced().await?;
        let mut cache = self.cache();
        cache.purge(log_id.index);
        self.store
            .raft_log_delete(self.partition, 0, log_id.index + 1, false)
            .map_err(io_err)
    }
}

/// Most user heads one partition's state machine keeps for the contiguity check (a few
/// hundred KiB); past it the map starts again empty.
const HEADS_CACHED_MAX: usize = 4096;

/// The state machine of one partition.
#[derive(Clone)]
pub struct StateMachine {
    log: LogStore,
    /// Users' heads as the applies wrote them, so the contiguity check of the next entries
    /// reads no RocksDB. Only an apply moves a head (forward); a restore and a snapshot
    /// install write heads of their own, and clear it.
    heads: Arc<Mutex<HashMap<String, u64>>>,
    /// The file the snapshot being received goes to (one stream at a time per group).
    receiving: Arc<Mutex<Option<PathBuf>>>,
    /// Held while a snapshot is recorded as current, so an older one never replaces it.
    recording: Arc<Mutex<()>>,
}

/// A snapshot file and its meta, as recorded under [`META_SNAPSHOT`].
#[derive(Clone, Serialize, Deserialize)]
struct SnapshotRecord {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    /// The file's name in the node's snapshot directory.
    file: String,
}

/// Runs blocking storage work (files, iterators over a whole partition) off the runtime's
/// workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

impl StateMachine {
    /// Every append must follow its user's head (the mailbox's no-gap, no-reuse rule). The
    /// check reads the replicated state, so every replica reaches the same verdict: `heads`
    /// holds what this call's earlier entries advanced, `cached` what earlier calls wrote,
    /// and a user in neither is read from RocksDB.
    fn check_contiguous(
        &self,
        ops: &[Op],
        heads: &mut HashMap<String, u64>,
        cached: &HashMap<String, u64>,
    ) -> Result<Option<String>, Error> {
        let mut next: HashMap<&str, u64> = HashMap::new();
        for op in ops {
            let Op::Append { user, seq, .. } = op else {
                continue;
            };
            let head = match next
                .get(user.as_str())
                .or_else(|| heads.get(user))
                .or_else(|| cached.get(user))
            {
                Some(h) => *h,
                None => self
                    .log
                    .store
                    .last_seq(self.log.partition, user)
                    .map_err(io_err)?,
            };
            if *seq != head + 1 {
                return Ok(Some(format!(
                    "append of seq {seq} for user {user} refused: the stored head is {head} (a writer with a stale view; it restarts from storage)"
                )));
            }
            next.insert(user, *seq);
        }
        for (user, seq) in next {
            heads.insert(user.to_string(), seq);
        }
        Ok(None)
    }

    pub fn new(store: Store, partition: PartitionId) -> Self {
        Self::of(&LogStore::new(store, partition))
    }

    /// The state machine of `log`'s partition, sharing its committed id (so an apply
    /// writes it).
    pub fn of(log: &LogStore) -> Self {
        Self {
            log: log.clone(),
            heads: Arc::default(),
            receiving: Arc::default(),
            recording: Arc::default(),
        }
    }

    fn store(&self) -> &Store {
        &self.log.store
    }

    fn cached_heads(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.heads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn partition(&self) -> PartitionId {
        self.log.partition
    }

    fn file_path(&self, record: &SnapshotRecord) -> PathBuf {
        self.store().snapshot_dir().join(&record.file)
    }

    /// Writes the partition's state to a new snapshot file and records it as current.
    fn build_file(&self) -> Result<(SnapshotMeta<NodeId, openraft::BasicNode>, PathBuf), Error> {
        let mut built = None;
        let written = snapshot::write_partition(
            self.store(),
            self.partition(),
            &[META_APPLIED, META_MEMBERSHIP],
            |values| {
                let bad = |e: Error| warbler_storage::StorageError::Corrupt(e.to_string());
                // The rows and the applied id they hold come from one database snapshot
                // (applies go on meanwhile): an installing replica replays from there.
                let last_applied: Option<LogId<NodeId>> = match &values[0] {
                    Some(b) => decode::<Option<LogId<NodeId>>>(b).map_err(bad)?,
                    None => None,
                };
                let membership = match &values[1] {
                    Some(b) => decode(b).map_err(bad)?,
                    None => StoredMembership::default(),
                };
                let snapshot_id = match last_applied {
                    Some(id) => format!("{}-{}-{}", id.leader_id, id.index, snapshot::unique()),
                    None => format!("empty-{}", snapshot::unique()),
                };
                let meta = SnapshotMeta {
                    last_log_id: last_applied,
                    last_membership: membership,
                    snapshot_id: snapshot_id.clone(),
                };
                let encoded = encode(&meta);
                built = Some(meta);
                Ok((encoded, snapshot_id))
            },
        )
        .map_err(io_err)?;
        let meta = built.expect("the meta is written before the rows");
        let record = SnapshotRecord {
            meta: meta.clone(),
            file: file_name(&written.path),
        };
        tracing::debug!(
            partition = self.partition(),
            rows = written.rows,
            bytes = written.bytes,
            "snapshot written"
        );
        match self.record(&record, &written.path)? {
            None => Ok((meta, written.path)),
            Some(newer) => {
                let path = self.file_path(&newer);
                Ok((newer.meta, path))
            }
        }
    }

    /// Records `record` (its file at `path`) as the current snapshot and removes the
    /// snapshot files it replaces; unless a newer one is current (an install finished while
    /// this one was written), which is returned.
    fn record(
        &self,
        record: &SnapshotRecord,
        path: &Path,
    ) -> Result<Option<SnapshotRecord>, Error> {
        let _recording = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = self.log.meta::<SnapshotRecord>(META_SNAPSHOT)? {
            if current.meta.last_log_id > record.meta.last_log_id {
                let _ = std::fs::remove_file(path);
                return Ok(Some(current));
            }
        }
        self.store()
            .raft_meta_update(
                self.partition(),
                &[(META_SNAPSHOT, encode(record))],
                &[META_SNAPSHOT_LEGACY],
                true,
            )
            .map_err(io_err)?;
        self.remove_replaced(path)?;
        Ok(None)
    }

    /// Removes the partition's snapshot files other than the current one, at `path`.
    fn remove_replaced(&self, path: &Path) -> Result<(), Error> {
        snapshot::remove_files(
            &self.store().snapshot_dir(),
            Some(self.partition()),
            Which::Finished,
            &[path],
        )
        .map_err(io_err)
    }

    /// Replaces the partition's state with the snapshot file at `path` (already checked)
    /// and records it as current. Restartable: see [`META_INSTALLING`].
    fn install_file(&self, record: &SnapshotRecord, path: &Path) -> Result<u64, Error> {
        let rows = snapshot::Reader::open(path).map_err(io_err)?;
        let _recording = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        let encoded = encode(record);
        let count = self
            .store()
            .import_partition_streamed(
                self.partition(),
                rows,
                (META_INSTALLING, encoded.clone()),
                &[
                    (META_APPLIED, encode(&record.meta.last_log_id)),
                    (META_MEMBERSHIP, encode(&record.meta.last_membership)),
                    (META_SNAPSHOT, encoded),
                ],
            )
            .map_err(io_err)?;
        self.store()
            .raft_meta_update(self.partition(), &[], &[META_SNAPSHOT_LEGACY], false)
            .map_err(io_err)?;
        self.remove_replaced(path)?;
        Ok(count)
    }

    /// Finishes an install the node stopped in the middle of, from the same file.
    fn finish_install(&self) -> Result<(), Error> {
        let Some(record) = self.log.meta::<SnapshotRecord>(META_INSTALLING)? else {
            return Ok(());
        };
        let path = self.file_path(&record);
        tracing::warn!(
            partition = self.partition(),
            file = %path.display(),
            "the node stopped while installing this snapshot; installing it again"
        );
        self.install_file(&record, &path).map(|_| ())
    }

    fn applied(&self) -> Result<AppliedState, Error> {
        Ok((
            self.log
                .meta::<Option<LogId<NodeId>>>(META_APPLIED)?
                .flatten(),
            self.log.meta(META_MEMBERSHIP)?.unwrap_or_default(),
        ))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let sm = self.clone();
        let (meta, path) = blocking(move || sm.build_file()).await?;
        let file = tokio::fs::File::open(&path).await.map_err(io_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<AppliedState, Error> {
        // Called when the group starts: an install cut short by a stop is finished first.
        let sm = self.clone();
        blocking(move || sm.finish_install()).await?;
        self.cached_heads().clear();
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // All entries of one call in one write: one batch instead of one per entry. The
        // membership is written only with an entry that changes it (it names its own log id).
        let mut membership = None;
        let mut out = Vec::new();
        let mut heads = HashMap::new();
        let mut cached = self.cached_heads();
        // Each entry's ops, shared with the entry (and the cache): staged by reference.
        let mut ops_all: Vec<Arc<[Op]>> = Vec::new();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id);
            let ops = match entry.payload {
                EntryPayload::Normal(batch) => batch.ops,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    Arc::default()
                }
                EntryPayload::Blank => Arc::default(),
            };
            let refused = self.check_contiguous(&ops, &mut heads, &cached)?;
            out.push(Applied {
                ops: if refused.is_some() { 0 } else { ops.len() },
                refused: refused.clone(),
            });
            if refused.is_none() {
                let restores = ops.iter().any(|op| matches!(op, Op::Restore { .. }));
                ops_all.push(ops);
                if restores {
                    // A restore writes heads: what follows is checked against them. (After
                    // a crash here the log replays from the last applied id: restoring the
                    // same rows again changes nothing.)
                    self.log
                        .store
                        .apply(ops_all.iter().flat_map(|o| o.iter()), false)
                        .map_err(io_err)?;
                    ops_all.clear();
                    heads.clear();
                    cached.clear();
                }
            }
        }
        if let Some(last) = last {
            let mut meta = vec![(META_APPLIED, encode(&Some(last)))];
            if let Some(committed) = self.log.committed() {
                meta.push((META_COMMITTED, encode(&Some(committed))));
            }
            if let Some(membership) = membership {
                meta.push((META_MEMBERSHIP, encode(&membership)));
            }
            self.log
                .store
                .apply_with_meta(
                    self.log.partition,
                    ops_all.iter().flat_map(|o| o.iter()),
                    &meta,
                    false,
                )
                .map_err(io_err)?;
        }
        // Written: what this call advanced is the state now.
        if cached.len() + heads.len() > HEADS_CACHED_MAX {
            cached.clear();
        }
        cached.extend(heads);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, Error> {
        let sm = self.clone();
        let (path, file) = blocking(move || {
            let dir = sm.store().snapshot_dir();
            // A stream given up for another one leaves its file behind.
            snapshot::remove_files(&dir, Some(sm.partition()), Which::Receiving, &[])
                .map_err(io_err)?;
            snapshot::receiving_file(&dir, sm.partition()).map_err(io_err)
        })
        .await?;
        *self.receiving.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), Error> {
        let file = snapshot.into_std().await;
        let received = self
            .receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let sm = self.clone();
        let meta = meta.clone();
        let installed = blocking(move || sm.install_received(meta, received, file)).await;
        // The install wrote the snapshot's heads (also when it failed half way).
        self.cached_heads().clear();
        installed
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        if let Some(record) = self.log.meta::<SnapshotRecord>(META_SNAPSHOT)? {
            let path = self.file_path(&record);
            return match tokio::fs::File::open(&path).await {
                Ok(file) => Ok(Some(Snapshot {
                    meta: record.meta,
                    snapshot: Box::new(file),
                })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(
                        partition = self.partition(),
                        file = %path.display(),
                        "the current snapshot's file is gone; a new one is built when needed"
                    );
                    Ok(None)
                }
                Err(e) => Err(io_err(format!("{}: {e}", path.display()))),
            };
        }
        let legacy = self
            .store()
            .raft_meta_get(self.partition(), META_SNAPSHOT_LEGACY)
            .map_err(io_err)?;
        if legacy.is_none() {
            return Ok(None);
        }
        // The previous release kept the snapshot as one value: a file of the state as it
        // is now replaces it (newer, so just as good to send).
        let sm = self.clone();
        let (meta, path) = blocking(move || sm.build_file()).await?;
        let file = tokio::fs::File::open(&path).await.map_err(io_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}

impl StateMachine {
    /// Checks a received snapshot file through to its end, makes it durable under its
    /// final name, then installs it. Nothing of the partition changes if the file is bad.
    /// `file` is normally the one begun at `received`; any other (openraft's storage suite
    /// hands over another store's snapshot) is copied to a file of this node's first.
    fn install_received(
        &self,
        meta: SnapshotMeta<NodeId, openraft::BasicNode>,
        received: Option<PathBuf>,
        file: std::fs::File,
    ) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt;
        let handed = file.metadata().map_err(io_err)?;
        let same = |path: &PathBuf| {
            std::fs::metadata(path)
                .map(|m| (m.dev(), m.ino()) == (handed.dev(), handed.ino()))
                .unwrap_or(false)
        };
        let (received, file) = match received {
            Some(path) if same(&path) => (path, file),
            other => {
                if let Some(path) = other {
                    let _ = std::fs::remove_file(path);
                }
                self.copy_in(file)?
            }
        };
        let result = self.check_and_install(meta, &received, file);
        if result.is_err() {
            // A bad file goes; the leader sends the snapshot again.
            let _ = std::fs::remove_file(&received);
        }
        result
    }

    fn check_and_install(
        &self,
        meta: SnapshotMeta<NodeId, openraft::BasicNode>,
        received: &Path,
        file: std::fs::File,
    ) -> Result<(), Error> {
        file.sync_all().map_err(io_err)?;
        let mut rows = 0u64;
        for row in snapshot::Reader::new(received, file).map_err(io_err)? {
            let (cf, key, _) = row.map_err(io_err)?;
            self.store()
                .check_snapshot_row(self.partition(), &cf, &key)
                .map_err(io_err)?;
            rows += 1;
        }
        let dir = self.store().snapshot_dir();
        let path = snapshot::snapshot_path(
            &dir,
            self.partition(),
            &meta.snapshot_id,
            snapshot::SNAPSHOT_EXT,
        );
        std::fs::rename(received, &path).map_err(io_err)?;
        snapshot::sync_dir(&dir).map_err(io_err)?;
        let record = SnapshotRecord {
            meta,
            file: file_name(&path),
        };
        let installed = self.install_file(&record, &path)?;
        debug_assert_eq!(rows, installed);
        tracing::debug!(
            partition = self.partition(),
            rows,
            installed,
            "snapshot installed"
        );
        Ok(())
    }

    /// Copies a snapshot handed over as an open file into a new file of this node's.
    fn copy_in(&self, mut from: std::fs::File) -> Result<(PathBuf, std::fs::File), Error> {
        use std::io::{Seek, SeekFrom};
        let (path, mut to) =
            snapshot::receiving_file(&self.store().snapshot_dir(), self.partition())
                .map_err(io_err)?;
        from.seek(SeekFrom::Start(0)).map_err(io_err)?;
        std::io::copy(&mut from, &mut to).map_err(io_err)?;
        Ok((path, to))
    }
}
