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
//!   cursor, dedup and head column families) plus the applied id and membership.
//! - Nothing is purged from the log before a sync: the purge point is applied, and the
//!   sync makes that apply durable, so a restart never needs an entry that is gone.

// openraft's storage traits return `StorageError` by value (224 bytes); the helpers here
// return what those traits return, so boxing would only add a conversion at every call.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use warbler_storage::{Op, PartitionId, PartitionRows, Store};

/// One log entry's worth of state changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub ops: Vec<Op>,
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
const META_SNAPSHOT: &str = "snapshot";

fn io_err(e: impl ToString) -> Error {
    StorageIOError::write(&std::io::Error::other(e.to_string())).into()
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("consensus types serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(io_err)
}

/// The log of one partition.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
    partition: PartitionId,
}

impl LogStore {
    pub fn new(store: Store, partition: PartitionId) -> Self {
        Self { store, partition }
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
        let rows = self
            .store
            .raft_log_range(self.partition, start, end)
            .map_err(io_err)?;
        rows.iter().map(|(_, b)| decode(b)).collect()
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

    /// Written (unsynced) on every commit: a restarted replica applies up to it at once, and
    /// state rebuilt from the log at start (the member list) needs that.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), Error> {
        self.put_meta(META_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, Error> {
        Ok(self
            .meta::<Option<LogId<NodeId>>>(META_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, encode(&e)))
            .collect();
        // Written now, readable at once, durable after the node's next sync: one fsync
        // completes the appends of every group waiting on it.
        self.store
            .raft_log_put(self.partition, &rows, false)
            .map_err(io_err)?;
        self.store.after_sync(Box::new(move |r| {
            callback.log_io_completed(r.map_err(|e| std::io::Error::other(e.to_string())));
        }));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), Error> {
        // No sync: the append that follows a truncation waits for one, and the log replays
        // in write order, so the truncation is durable before anything appended after it.
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
        self.store
            .raft_log_delete(self.partition, 0, log_id.index + 1, false)
            .map_err(io_err)
    }
}

/// The state machine of one partition.
#[derive(Clone)]
pub struct StateMachine {
    log: LogStore,
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    rows: PartitionRows,
}

impl StateMachine {
    /// Every append must follow its user's head (the mailbox's no-gap, no-reuse rule). The
    /// check reads the replicated state, so every replica reaches the same verdict.
    fn check_contiguous(
        &self,
        ops: &[Op],
        heads: &mut HashMap<String, u64>,
    ) -> Result<Option<String>, Error> {
        let mut next: HashMap<&str, u64> = HashMap::new();
        for op in ops {
            let Op::Append { user, seq, .. } = op else {
                continue;
            };
            let head = match next.get(user.as_str()).or(heads.get(user)) {
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
        Self {
            log: LogStore::new(store, partition),
        }
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
        // The rows and the applied id they hold, from one database snapshot (applies go on
        // meanwhile): a replica installing it replays the log from exactly there.
        let (rows, meta) = self
            .log
            .store
            .export_partition_with_meta(self.log.partition, &[META_APPLIED, META_MEMBERSHIP])
            .map_err(io_err)?;
        let last_applied: Option<LogId<NodeId>> = match &meta[0] {
            Some(b) => decode::<Option<LogId<NodeId>>>(b)?,
            None => None,
        };
        let membership: StoredMembership<NodeId, openraft::BasicNode> = match &meta[1] {
            Some(b) => decode(b)?,
            None => StoredMembership::default(),
        };
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, rows.len()),
            None => format!("empty-{}", rows.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let bytes = encode(&SnapshotFile {
            meta: meta.clone(),
            rows,
        });
        self.log
            .store
            .raft_meta_put(self.log.partition, META_SNAPSHOT, &bytes, true)
            .map_err(io_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<AppliedState, Error> {
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
        let mut ops_all: Vec<Op> = Vec::new();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id);
            let ops = match entry.payload {
                EntryPayload::Normal(batch) => batch.ops,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    Vec::new()
                }
                EntryPayload::Blank => Vec::new(),
            };
            let refused = self.check_contiguous(&ops, &mut heads)?;
            out.push(Applied {
                ops: if refused.is_some() { 0 } else { ops.len() },
                refused: refused.clone(),
            });
            if refused.is_none() {
                let restores = ops.iter().any(|op| matches!(op, Op::Restore { .. }));
                ops_all.extend(ops);
                if restores {
                    // A restore writes heads: what follows is checked against them. (After
                    // a crash here the log replays from the last applied id: restoring the
                    // same rows again changes nothing.)
                    self.log.store.apply(&ops_all, false).map_err(io_err)?;
                    ops_all.clear();
                    heads.clear();
                }
            }
        }
        if let Some(last) = last {
            let mut meta = vec![(META_APPLIED, encode(&Some(last)))];
            if let Some(membership) = membership {
                meta.push((META_MEMBERSHIP, encode(&membership)));
            }
            self.log
                .store
                .apply_with_meta(self.log.partition, &ops_all, &meta, false)
                .map_err(io_err)?;
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let bytes = snapshot.into_inner();
        let file: SnapshotFile = decode(&bytes)?;
        let applied = [
            (META_APPLIED, encode(&meta.last_log_id)),
            (META_MEMBERSHIP, encode(&meta.last_membership)),
            (
                META_SNAPSHOT,
                encode(&SnapshotFile {
                    meta: meta.clone(),
                    rows: Vec::new(),
                }),
            ),
        ];
        self.log
            .store
            .import_partition(self.log.partition, &file.rows, &applied)
            .map_err(io_err)?;
        // Keep the received snapshot whole, so it can be served on to other replicas.
        self.log
            .store
            .raft_meta_put(self.log.partition, META_SNAPSHOT, &bytes, true)
            .map_err(io_err)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        match self
            .log
            .store
            .raft_meta_get(self.log.partition, META_SNAPSHOT)
            .map_err(io_err)?
        {
            None => Ok(None),
            Some(bytes) => {
                let file: SnapshotFile = decode(&bytes)?;
                Ok(Some(Snapshot {
                    meta: file.meta,
                    snapshot: Box::new(Cursor::new(bytes)),
                }))
            }
        }
    }
}
