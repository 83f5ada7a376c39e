//! [`Store`]: the RocksDB database of one node.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, DB,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::error::StorageError;
use crate::keys::{self, msg_key, prefix_end, suffixed_key, u64_be, user_prefix};
use crate::sync::{Synced, Syncer};
use crate::PartitionId;

const CF_MSGS: &str = "msgs";
const CF_CURSORS: &str = "cursors";
const CF_DEDUP: &str = "dedup";
const CF_HEADS: &str = "heads";
/// Consensus log entries: partition:u16be index:u64be -> entry bytes.
const CF_RAFT_LOG: &str = "raft_log";
/// Consensus metadata (vote, purge point, applied point): partition:u16be key -> bytes.
const CF_RAFT_META: &str = "raft_meta";
const COLUMN_FAMILIES: [&str; 6] = [
    CF_MSGS,
    CF_CURSORS,
    CF_DEDUP,
    CF_HEADS,
    CF_RAFT_LOG,
    CF_RAFT_META,
];
/// The column families read by whole key (`get`), not by range. A publish looks up its
/// message id in `dedup`, and that lookup misses for every new message: without a filter a
/// miss searches the memtable and every file on the way down.
const POINT_READ_CFS: [&str; 4] = [CF_DEDUP, CF_HEADS, CF_CURSORS, CF_RAFT_META];
/// The column families holding a partition's replicated state (what a snapshot carries).
const PARTITION_STATE_CFS: [&str; 4] = [CF_MSGS, CF_CURSORS, CF_DEDUP, CF_HEADS];

/// Most records one range read returns, whatever the caller asks.
pub const RANGE_READ_MAX: usize = 10_000;
/// Most bytes of stored messages one range read returns (at least one message, however
/// large): a page of large messages stays a few MiB in memory.
pub const RANGE_READ_BYTES_MAX: usize = 4 << 20;

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub id: String,
    pub ts: u64,
    pub from: Option<String>,
    pub body: ByteBuf,
}

/// One state change. A log entry is a list of these, applied atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Store message `seq` of `user`, its dedup record, and advance the user's head.
    Append {
        partition: PartitionId,
        user: String,
        seq: u64,
        msg: StoredMessage,
    },
    /// Move a device's cursor to `acked`.
    Cursor {
        partition: PartitionId,
        user: String,
        device: String,
        acked: u64,
    },
    /// Write rows of a backup into `partition` (a restore; see [`Store::check_rows`]).
    Restore {
        partition: PartitionId,
        rows: Vec<Row>,
    },
}

/// One row of a partition's replicated state, as a backup carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The column family: `msgs`, `cursors`, `dedup` or `heads`.
    pub cf: String,
    pub key: ByteBuf,
    pub value: ByteBuf,
}

impl Op {
    /// Approximate bytes this op adds to a write batch (for batch limits).
    pub fn size_bytes(&self) -> usize {
        match self {
            Op::Append { user, msg, .. } => 64 + user.len() * 3 + msg.id.len() * 2 + msg.body.len(),
            Op::Cursor { user, device, .. } => 32 + user.len() + device.len(),
            Op::Restore { rows, .. } => rows
                .iter()
                .map(|r| 16 + r.cf.len() + r.key.len() + r.value.len())
                .sum(),
        }
    }
}

/// What retention keeps.
#[derive(Debug, Clone, Copy)]
pub struct RetentionPolicy {
    /// Messages kept per user (0 = no limit).
    pub max_messages: u64,
    /// Messages older than this are trimmed (0 = no limit).
    pub max_age_ms: u64,
    /// Dedup records older than this are dropped.
    pub dedup_window_ms: u64,
}

/// What a retention pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrimReport {
    pub users: u64,
    pub messages: u64,
    pub dedup_records: u64,
}

/// The node's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    /// The node's one durability point for replicated writes (see [`crate::sync`]).
    syncer: Arc<Syncer>,
    /// Why new messages are refused before the disk fills (set by the node's free-space
    /// watch; `None` while there is room).
    low_space: Arc<std::sync::RwLock<Option<String>>>,
}

impl Store {
    /// Marks the disk as (not) too full for new messages: `why` is what a refused
    /// publisher is told.
    pub fn set_low_space(&self, why: Option<String>) {
        *self.low_space.write().unwrap() = why;
    }

    /// Why new messages are refused for lack of disk space, if they are.
    pub fn low_space(&self) -> Option<String> {
        self.low_space.read().unwrap().clone()
    }

    /// How many handles keep the database open (it closes when the last one drops). A
    /// process that ends while another thread still holds one races RocksDB's teardown.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.db)
    }

    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Store, StorageError> {
        let open_err = |message: String| StorageError::Open {
            path: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        // Bound the WAL so a node with many idle column families still recycles it.
        opts.set_max_total_wal_size(256 << 20);
        // An unsynced write stays in the WAL's buffer in this process until the next sync
        // (the node's syncer, or a synced write) writes the buffer out with it: one `write`
        // call per sync instead of one per write. See [`Store::write`].
        opts.set_manual_wal_flush(true);
        let cfs = COLUMN_FAMILIES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name)));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| open_err(e.into_string()))?;
        let db = Arc::new(db);
        // A snapshot written or received when the node stopped is of no use now.
        crate::snapshot::remove_files(
            &dir.join(SNAPSHOT_DIR),
            None,
            crate::snapshot::Which::Unfinished,
            &[],
        )?;
        let syncer = Syncer::start(Arc::downgrade(&db));
        Ok(Store {
            db,
            syncer,
            low_space: Arc::default(),
        })
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// Adds `ops` to `batch` (the committer writes the batch). A user's head is written once,
    /// with its last value, however many of the user's appends the batch holds: one row fewer
    /// per repeated user in the memtable's skip list. A restore writes heads of its own, so
    /// the heads staged before it are written before its rows (the later write wins, as if
    /// each op were written on its own).
    pub fn stage_all<'a>(&self, batch: &mut WriteBatch, ops: impl IntoIterator<Item = &'a Op>) {
        let mut heads: HashMap<(PartitionId, &'a str), u64> = HashMap::new();
        for op in ops {
            match op {
                Op::Append {
                    partition,
                    user,
                    seq,
                    msg,
                } => {
                    self.stage_message(batch, *partition, user, *seq, msg);
                    heads.insert((*partition, user.as_str()), *seq);
                }
                Op::Cursor {
                    partition,
                    user,
                    device,
                    acked,
                } => {
                    batch.put_cf(
                        self.cf(CF_CURSORS),
                        suffixed_key(*partition, user, device),
                        acked.to_be_bytes(),
                    );
                }
                Op::Restore { partition, rows } => {
                    self.stage_heads(batch, &mut heads);
                    // Checked before they were proposed; a row outside the partition is skipped.
                    for r in rows.iter().filter(|r| row_belongs(*partition, r)) {
                        batch.put_cf(self.cf(&r.cf), &r.key, &r.value);
                    }
                }
            }
        }
        self.stage_heads(batch, &mut heads);
    }

    /// An append's message and dedup record (its head is staged by [`Store::stage_all`]).
    fn stage_message(
        &self,
        batch: &mut WriteBatch,
        partition: PartitionId,
        user: &str,
        seq: u64,
        msg: &StoredMessage,
    ) {
        let value = rmp_serde::to_vec_named(msg).expect("message serialization is infallible");
        batch.put_cf(self.cf(CF_MSGS), msg_key(partition, user, seq), value);
        let mut dedup = Vec::with_capacity(16);
        dedup.extend_from_slice(&seq.to_be_bytes());
        dedup.extend_from_slice(&msg.ts.to_be_bytes());
        batch.put_cf(
            self.cf(CF_DEDUP),
            suffixed_key(partition, user, &msg.id),
            dedup,
        );
    }

    fn stage_heads(&self, batch: &mut WriteBatch, heads: &mut HashMap<(PartitionId, &str), u64>) {
        for ((partition, user), seq) in heads.drain() {
            batch.put_cf(
                self.cf(CF_HEADS),
                user_prefix(partition, user),
                seq.to_be_bytes(),
            );
        }
    }

    /// Whether `rows` all belong to `partition`'s replicated state (a restore's input).
    pub fn check_rows(partition: PartitionId, rows: &[Row]) -> Result<(), StorageError> {
        match rows.iter().find(|r| !row_belongs(partition, r)) {
            None => Ok(()),
            Some(r) => Err(StorageError::Corrupt(format!(
                "a row of column family {:?} is not partition {partition}'s state",
                r.cf
            ))),
        }
    }

    /// Whether `partition` holds no user's state: no head, no cursor (what a restore
    /// writes into).
    pub fn partition_is_empty(&self, partition: PartitionId) -> Result<bool, StorageError> {
        let prefix = partition.to_be_bytes().to_vec();
        for cf in PARTITION_STATE_CFS {
            let mut ro = ReadOptions::default();
            ro.set_iterate_range(prefix.clone()..prefix_end(&prefix));
            if let Some(item) = self
                .db
                .iterator_cf_opt(self.cf(cf), ro, IteratorMode::Start)
                .next()
            {
                item?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Every row of `partition`'s replicated state and its consensus applied value (raw)
    /// under `applied_key`, from one database snapshot: a backup of the partition.
    pub fn backup_partition(
        &self,
        partition: PartitionId,
        applied_key: Option<&str>,
    ) -> Result<(Vec<Row>, Option<Vec<u8>>), StorageError> {
        let keys: Vec<&str> = applied_key.into_iter().collect();
        let (rows, meta) = self.export_partition_with_meta(partition, &keys)?;
        let rows = rows
            .into_iter()
            .map(|(cf, k, v)| Row {
                cf,
                key: ByteBuf::from(k),
                value: ByteBuf::from(v),
            })
            .collect();
        Ok((rows, meta.into_iter().next().flatten()))
    }

    /// Writes a batch; `sync` fsyncs the WAL before returning. Without it the write is
    /// readable at once and reaches the WAL file with the next sync (or
    /// [`Store::flush_wal`]): until then a crash of the process loses it, as a power loss
    /// could without a sync anyway. Nothing acknowledged is written so: its writer waits for
    /// a sync, or flushes.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Hands every write so far to the operating system without an fsync: it survives a
    /// crash of this process, not a power loss.
    pub fn flush_wal(&self) -> Result<(), StorageError> {
        self.db.flush_wal(false)?;
        Ok(())
    }

    /// Writes every memtable out to files now (benchmarks and tests that need data on disk
    /// rather than in memory; the database flushes on its own otherwise).
    pub fn flush(&self) -> Result<(), StorageError> {
        for name in COLUMN_FAMILIES {
            self.db.flush_cf(self.cf(name))?;
        }
        Ok(())
    }

    /// Runs `done` once every write made before this call is durable: one fsync, shared by
    /// every writer waiting at the time (the node's syncer).
    pub fn after_sync(&self, done: Synced) {
        self.syncer.after_sync(done);
    }

    /// Waits until every write made before this call is durable (see [`Store::after_sync`]).
    pub async fn synced(&self) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_sync(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await.unwrap_or(Err(StorageError::Closed))
    }

    /// Applies ops at once (tests and tools; the hot path goes through the committer).
    pub fn apply<'a>(
        &self,
        ops: impl IntoIterator<Item = &'a Op>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        self.stage_all(&mut batch, ops);
        self.write(batch, sync)
    }

    /// The highest `seq` ever assigned to `user` (0 if none). Never decreases, even after
    /// trimming: sequence numbers are not reused.
    pub fn last_seq(&self, partition: PartitionId, user: &str) -> Result<u64, StorageError> {
        let v = self
            .db
            .get_cf(self.cf(CF_HEADS), user_prefix(partition, user))?;
        match v {
            None => Ok(0),
            Some(v) => u64_be(&v).ok_or_else(|| {
                StorageError::Corrupt(format!("head of {user} is {} bytes", v.len()))
            }),
        }
    }

    /// The lowest retained `seq` of `user`, if any message is retained.
    pub fn first_seq(
        &self,
        partition: PartitionId,
        user: &str,
    ) -> Result<Option<u64>, StorageError> {
        Ok(self
            .read_range(partition, user, 0, 1)?
            .first()
            .map(|(s, _)| *s))
    }

    /// Messages of `user` with `seq > after`, in `seq` order, at most `limit` (capped at
    /// [`RANGE_READ_MAX`]) and about [`RANGE_READ_BYTES_MAX`]: fewer than asked does not
    /// mean there are no more.
    pub fn read_range(
        &self,
        partition: PartitionId,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredMessage)>, StorageError> {
        let limit = limit.min(RANGE_READ_MAX);
        let mut out = Vec::with_capacity(limit.min(256));
        if limit == 0 || after == u64::MAX {
            return Ok(out);
        }
        let start = msg_key(partition, user, after + 1);
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(start.clone()..prefix_end(&user_prefix(partition, user)));
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_MSGS),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut bytes = 0;
        for item in iter.take(limit) {
            let (k, v) = item?;
            if bytes + v.len() > RANGE_READ_BYTES_MAX && !out.is_empty() {
                break;
            }
            bytes += v.len();
            let seq = keys::split_user_key(&k)
                .and_then(|(_, _, rest)| u64_be(rest))
                .ok_or_else(|| StorageError::Corrupt(format!("bad message key {k:?}")))?;
            let msg = rmp_serde::from_slice(&v)
                .map_err(|e| StorageError::Corrupt(format!("message {user}/{seq}: {e}")))?;
            out.push((seq, msg));
        }
        Ok(out)
    }

    /// The durable cursor of one device (0 if it never acked).
    pub fn cursor(
        &self,
        partition: PartitionId,
        user: &str,
        device: &str,
    ) -> Result<u64, StorageError> {
        let v = self
            .db
            .get_cf(self.cf(CF_CURSORS), suffixed_key(partition, user, device))?;
        Ok(v.and_then(|v| u64_be(&v)).unwrap_or(0))
    }

    /// Every device of `user` with its cursor, by device id.
    pub fn cursors(
        &self,
        partition: PartitionId,
        user: &str,
    ) -> Result<Vec<(String, u64)>, StorageError> {
        let prefix = user_prefix(partition, user);
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(prefix.clone()..prefix_end(&prefix));
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_CURSORS), ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            let device = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((device, u64_be(&v).unwrap_or(0)));
        }
        Ok(out)
    }

    /// The `seq` a message id was given, if it is within the dedup window.
    pub fn dedup(
        &self,
        partition: PartitionId,
        user: &str,
        id: &str,
    ) -> Result<Option<u64>, StorageError> {
        let v = self
            .db
            .get_cf(self.cf(CF_DEDUP), suffixed_key(partition, user, id))?;
        Ok(v.and_then(|v| u64_be(&v)))
    }

    /// Checks that `user`'s retained messages are one contiguous run ending at the head.
    /// Returns the (first, last) retained seqs, or `None` when nothing is retained. Reads
    /// from one database snapshot, so concurrent writes cannot produce a false verdict.
    pub fn verify_user(
        &self,
        partition: PartitionId,
        user: &str,
    ) -> Result<Option<(u64, u64)>, StorageError> {
        let snap = self.db.snapshot();
        let head = match snap.get_cf(self.cf(CF_HEADS), user_prefix(partition, user))? {
            None => 0,
            Some(v) => u64_be(&v).ok_or_else(|| {
                StorageError::Corrupt(format!("head of {user} is {} bytes", v.len()))
            })?,
        };
        let prefix = user_prefix(partition, user);
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(prefix.clone()..prefix_end(&prefix));
        let mut first = None;
        let mut last: Option<u64> = None;
        for item in snap.iterator_cf_opt(self.cf(CF_MSGS), ro, IteratorMode::Start) {
            let (k, _) = item?;
            let seq = keys::split_user_key(&k)
                .and_then(|(_, _, rest)| u64_be(rest))
                .ok_or_else(|| StorageError::Corrupt(format!("bad message key {k:?}")))?;
            if let Some(prev) = last {
                if seq != prev + 1 {
                    return Err(StorageError::Corrupt(format!(
                        "{user}: expected seq {}, found {seq}",
                        prev + 1
                    )));
                }
            }
            first.get_or_insert(seq);
            last = Some(seq);
        }
        match (first, last) {
            (Some(f), Some(l)) if l == head => Ok(Some((f, head))),
            (Some(_), Some(l)) => Err(StorageError::Corrupt(format!(
                "{user}: last message {l} but head {head}"
            ))),
            _ => Ok(None),
        }
    }

    /// Every user with a head, as (partition, user, last_seq).
    pub fn users(&self) -> Result<Vec<(PartitionId, String, u64)>, StorageError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_HEADS), IteratorMode::Start) {
            let (k, v) = item?;
            if let Some((p, user, _)) = keys::split_user_key(&k) {
                out.push((p, user.to_string(), u64_be(&v).unwrap_or(0)));
            }
        }
        Ok(out)
    }

    /// Applies retention to one user: count, then age, then the dedup window.
    pub fn trim_user(
        &self,
        partition: PartitionId,
        user: &str,
        policy: &RetentionPolicy,
        now_ms: u64,
    ) -> Result<TrimReport, StorageError> {
        let mut report = TrimReport::default();
        let last = self.last_seq(partition, user)?;
        let Some(first) = self.first_seq(partition, user)? else {
            report.dedup_records = self.trim_dedup(partition, user, policy, now_ms)?;
            return Ok(report);
        };
        let mut keep_from = first;
        if policy.max_messages > 0 && last - first + 1 > policy.max_messages {
            // Never what a device has not acknowledged: the mailbox refuses publishes
            // (`mailbox_full`) before that many wait.
            let oldest_unacked = self
                .cursors(partition, user)?
                .into_iter()
                .map(|(_, acked)| acked + 1)
                .min()
                .unwrap_or(u64::MAX);
            keep_from = (last - policy.max_messages + 1)
                .min(oldest_unacked)
                .max(first);
        }
        if policy.max_age_ms > 0 {
            let cutoff = now_ms.saturating_sub(policy.max_age_ms);
            // Timestamps grow with seq, so the old messages are a prefix; stop at the first
            // young one (bounded by the range read cap per pass).
            for (seq, msg) in self.read_range(partition, user, keep_from - 1, RANGE_READ_MAX)? {
                if msg.ts >= cutoff {
                    break;
                }
                keep_from = seq + 1;
            }
        }
        if keep_from > first {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(
                self.cf(CF_MSGS),
                msg_key(partition, user, 0),
                msg_key(partition, user, keep_from),
            );
            self.write(batch, false)?;
            report.messages = keep_from - first;
        }
        report.dedup_records = self.trim_dedup(partition, user, policy, now_ms)?;
        Ok(report)
    }

    fn trim_dedup(
        &self,
        partition: PartitionId,
        user: &str,
        policy: &RetentionPolicy,
        now_ms: u64,
    ) -> Result<u64, StorageError> {
        let prefix = user_prefix(partition, user);
        let cutoff = now_ms.saturating_sub(policy.dedup_window_ms);
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(prefix.clone()..prefix_end(&prefix));
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_DEDUP), ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            let ts = v.get(8..16).and_then(u64_be).unwrap_or(0);
            if ts < cutoff {
                batch.delete_cf(self.cf(CF_DEDUP), k);
                n += 1;
            }
        }
        if n > 0 {
            self.write(batch, false)?;
        }
        Ok(n)
    }

    /// One retention pass over every user.
    pub fn sweep(&self, policy: &RetentionPolicy, now_ms: u64) -> Result<TrimReport, StorageError> {
        let mut total = TrimReport::default();
        for (p, user, _) in self.users()? {
            let r = self.trim_user(p, &user, policy, now_ms)?;
            if r.messages > 0 || r.dedup_records > 0 {
                total.users += 1;
            }
            total.messages += r.messages;
            total.dedup_records += r.dedup_records;
        }
        // The deletes were written without a sync and wait in the WAL's buffer: handed to
        // the operating system now, so a crash of the process does not bring removed
        // messages back (a device told they expired would then be sent them).
        if total.users > 0 {
            self.flush_wal()?;
        }
        Ok(total)
    }
}

/// A column family's options. Those read by whole key get Bloom filters, in their files and
/// in their memtable, so that a key that is not there costs a few hashes instead of a
/// search of the memtable's skip list and of each level's index and data blocks.
/// Every column family's keys start with the partition (2 bytes). Writes reach a memtable
/// in partition order (a partition's log indexes, its metadata keys, a user's messages in
/// turn), so RocksDB keeps one insert position per partition and starts each insert from
/// it instead of from the top of the memtable's skip list (the largest item of a cluster
/// node's profile). rust-rocksdb has no setter for it: it is passed as an options string.
const INSERT_HINT_OPTIONS: &str =
    "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.2";

/// Messages and dedup records: one insert position per user instead of per partition.
/// A partition's users take turns in a batch, so a partition's position is another user's
/// and each insert searched several levels of the skip list; a user's next message (next
/// seq) lands right after its last one. The transform is ours (`src/user_prefix.cc`): the
/// key's user prefix, as [`user_prefix`] lays it out. Each user seen by a memtable costs
/// it one position (about 200 bytes), so rewritten rows (heads, cursors) keep the
/// partition's.
const USER_INSERT_HINT_OPTIONS: &str =
    "memtable_insert_with_hint_prefix_extractor=warbler.UserPrefix";

extern "C" {
    /// Registers `warbler.UserPrefix` with RocksDB's object registry (once per process).
    fn warbler_register_user_prefix();
}

fn cf_options(name: &str) -> Options {
    let hint = if USER_HINT_CFS.contains(&name) {
        // SAFETY: registers a factory once (std::call_once); no arguments, no state shared
        // with Rust.
        unsafe { warbler_register_user_prefix() };
        USER_INSERT_HINT_OPTIONS
    } else {
        INSERT_HINT_OPTIONS
    };
    let mut cf = Options::default()
        .get_options_from_string(hint)
        .expect("the insert hint's slice transform is registered");
    cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
    if let Some(bytes) = write_buffer_bytes(name) {
        cf.set_write_buffer_size(bytes);
    }
    if POINT_READ_CFS.contains(&name) {
        let mut table = BlockBasedOptions::default();
        // About 1% false positives at 10 bits a key.
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
        cf.set_block_based_table_factory(&table);
        cf.set_memtable_prefix_bloom_ratio(0.02);
        cf.set_memtable_whole_key_filtering(true);
    }
    cf
}

/// A column family's memtable size, where it differs from RocksDB's 64 MiB. Every insert
/// searches the memtable's skip list from the top, a cache miss or more per level, so a
/// skip list that fits in the processor's cache costs much less per insert. Heads, cursors
/// and consensus metadata are rewritten over and over (one row per user, per device, per
/// partition): a large memtable fills with old versions of a few thousand rows, and a
/// flush keeps only the newest. Dedup records are small and many.
fn write_buffer_bytes(name: &str) -> Option<usize> {
    match name {
        CF_HEADS | CF_CURSORS | CF_RAFT_META => Some(4 << 20),
        CF_DEDUP => Some(16 << 20),
        _ => None,
    }
}

/// Column families whose memtable inserts start from the user's position.
const USER_HINT_CFS: [&str; 2] = [CF_MSGS, CF_DEDUP];

fn raft_log_key(partition: PartitionId, index: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(&partition.to_be_bytes());
    k[2..].copy_from_slice(&index.to_be_bytes());
    k
}

fn raft_meta_key(partition: PartitionId, key: &str) -> Vec<u8> {
    let mut k = partition.to_be_bytes().to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

/// Values of consensus metadata keys, in the order asked (`None`: not set).
pub type MetaValues = Vec<Option<Vec<u8>>>;

/// One partition's replicated state, as a snapshot carries it: (column family, key, value).
pub type PartitionRows = Vec<(String, Vec<u8>, Vec<u8>)>;

/// What [`Store::each_partition_item`] visits: the metadata values first, then each row.
pub enum PartitionItem<'a> {
    Meta(&'a MetaValues),
    Row(&'a str, &'a [u8], &'a [u8]),
}

fn row_belongs(partition: PartitionId, r: &Row) -> bool {
    in_partition(partition, &r.cf, &r.key)
}

fn in_partition(partition: PartitionId, cf: &str, key: &[u8]) -> bool {
    PARTITION_STATE_CFS.contains(&cf) && key.starts_with(&partition.to_be_bytes())
}

/// Storage for the per-partition consensus log and its metadata, and partition snapshots.
/// Generic bytes: the consensus library's types stay out of this crate.
impl Store {
    /// Appends (or overwrites) log entries of `partition`; `sync` fsyncs before returning.
    pub fn raft_log_put(
        &self,
        partition: PartitionId,
        entries: &[(u64, Vec<u8>)],
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        for (index, bytes) in entries {
            batch.put_cf(self.cf(CF_RAFT_LOG), raft_log_key(partition, *index), bytes);
        }
        self.write(batch, sync)
    }

    /// Entries of `partition` with `start <= index < end`, in order.
    pub fn raft_log_range(
        &self,
        partition: PartitionId,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.raft_log_range_bytes(partition, start, end, usize::MAX)
    }

    /// Like [`Store::raft_log_range`], but stops once the entries read reach `bytes_max`
    /// bytes (it returns at least one entry if the range holds any).
    pub fn raft_log_range_bytes(
        &self,
        partition: PartitionId,
        start: u64,
        end: u64,
        bytes_max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let mut bytes = 0usize;
        let (from, to) = (raft_log_key(partition, start), raft_log_key(partition, end));
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(from.to_vec()..to.to_vec());
        for item in self.db.iterator_cf_opt(
            self.cf(CF_RAFT_LOG),
            ro,
            IteratorMode::From(&from, Direction::Forward),
        ) {
            if bytes >= bytes_max {
                break;
            }
            let (k, v) = item?;
            bytes = bytes.saturating_add(v.len());
            out.push((u64_be(&k[2..]).unwrap_or(0), v.to_vec()));
        }
        Ok(out)
    }

    /// The last entry of `partition`'s log, if any.
    pub fn raft_log_last(
        &self,
        partition: PartitionId,
    ) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let (from, to) = (
            raft_log_key(partition, 0),
            raft_log_key(partition, u64::MAX),
        );
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(from.to_vec()..to.to_vec());
        let mut iter = self
            .db
            .iterator_cf_opt(self.cf(CF_RAFT_LOG), ro, IteratorMode::End);
        match iter.next() {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some((u64_be(&k[2..]).unwrap_or(0), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    /// Deletes entries of `partition` with `start <= index < end`.
    pub fn raft_log_delete(
        &self,
        partition: PartitionId,
        start: u64,
        end: u64,
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_RAFT_LOG),
            raft_log_key(partition, start),
            raft_log_key(partition, end),
        );
        self.write(batch, sync)
    }

    pub fn raft_meta_put(
        &self,
        partition: PartitionId,
        key: &str,
        value: &[u8],
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_RAFT_META), raft_meta_key(partition, key), value);
        self.write(batch, sync)
    }

    /// Sets and deletes consensus metadata keys of `partition` in one write.
    pub fn raft_meta_update(
        &self,
        partition: PartitionId,
        puts: &[(&str, Vec<u8>)],
        deletes: &[&str],
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        for (key, value) in puts {
            batch.put_cf(self.cf(CF_RAFT_META), raft_meta_key(partition, key), value);
        }
        for key in deletes {
            batch.delete_cf(self.cf(CF_RAFT_META), raft_meta_key(partition, key));
        }
        self.write(batch, sync)
    }

    pub fn raft_meta_get(
        &self,
        partition: PartitionId,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_RAFT_META), raft_meta_key(partition, key))?)
    }

    /// Applies state-machine ops and metadata in one atomic batch.
    pub fn apply_with_meta<'a>(
        &self,
        partition: PartitionId,
        ops: impl IntoIterator<Item = &'a Op>,
        meta: &[(&str, Vec<u8>)],
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        self.stage_all(&mut batch, ops);
        for (key, value) in meta {
            batch.put_cf(self.cf(CF_RAFT_META), raft_meta_key(partition, key), value);
        }
        self.write(batch, sync)
    }

    /// Deletes everything this node holds of `partition`: its replicated state, its consensus
    /// log and its consensus metadata (a replica that moved to another node).
    pub fn drop_partition(&self, partition: PartitionId) -> Result<(), StorageError> {
        let prefix = partition.to_be_bytes().to_vec();
        let mut batch = WriteBatch::default();
        for cf in PARTITION_STATE_CFS
            .into_iter()
            .chain([CF_RAFT_LOG, CF_RAFT_META])
        {
            batch.delete_range_cf(self.cf(cf), prefix.clone(), prefix_end(&prefix));
        }
        self.write(batch, true)?;
        crate::snapshot::remove_files(
            &self.snapshot_dir(),
            Some(partition),
            crate::snapshot::Which::All,
            &[],
        )
    }

    /// The partitions (and groups) this node keeps consensus state of: a replica it holds,
    /// or one it held and has not dropped.
    pub fn consensus_groups(&self) -> Result<Vec<PartitionId>, StorageError> {
        let mut groups = Vec::new();
        let mut from = Vec::new();
        loop {
            let mut it = self.db.iterator_cf(
                self.cf(CF_RAFT_META),
                IteratorMode::From(&from, Direction::Forward),
            );
            let Some(item) = it.next() else {
                return Ok(groups);
            };
            let (k, _) = item?;
            if k.len() < 2 {
                from = k.to_vec();
                from.push(0);
                continue;
            }
            let p = PartitionId::from_be_bytes([k[0], k[1]]);
            groups.push(p);
            if p == PartitionId::MAX {
                return Ok(groups);
            }
            from = (p + 1).to_be_bytes().to_vec();
        }
    }

    /// Deletes everything in the database: every partition's state, the consensus logs and
    /// metadata (a data directory whose node was removed from its cluster).
    pub fn wipe(&self) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        for cf in COLUMN_FAMILIES {
            // Every key starts with a partition number; no key reaches past this one.
            batch.delete_range_cf(self.cf(cf), Vec::new(), vec![0xff; 64]);
        }
        self.write(batch, true)?;
        crate::snapshot::remove_files(&self.snapshot_dir(), None, crate::snapshot::Which::All, &[])
    }

    /// Every row of `partition`'s replicated state.
    pub fn export_partition(&self, partition: PartitionId) -> Result<PartitionRows, StorageError> {
        Ok(self.export_partition_with_meta(partition, &[])?.0)
    }

    /// Every row of `partition`'s replicated state and the values of its consensus
    /// metadata `keys`, all read from one database snapshot. Applies go on while a
    /// consensus snapshot is built: read one after the other, the rows of one column
    /// family could be older than another's (a user's head past its messages) and the
    /// applied id older than both.
    pub fn export_partition_with_meta(
        &self,
        partition: PartitionId,
        keys: &[&str],
    ) -> Result<(PartitionRows, MetaValues), StorageError> {
        let mut rows = Vec::new();
        let mut meta = Vec::new();
        self.each_partition_item(partition, keys, |item| {
            match item {
                PartitionItem::Meta(values) => meta = values.clone(),
                PartitionItem::Row(cf, k, v) => rows.push((cf.to_string(), k.to_vec(), v.to_vec())),
            }
            Ok(())
        })?;
        Ok((rows, meta))
    }

    /// Like [`Store::export_partition_with_meta`], an item at a time: `visit` first sees the
    /// values of `keys`, then each (column family, key, value) of `partition`'s state, all
    /// as of one database snapshot. Nothing is held but the row at hand, so a partition of
    /// any size streams (a consensus snapshot file).
    pub fn each_partition_item(
        &self,
        partition: PartitionId,
        keys: &[&str],
        mut visit: impl FnMut(PartitionItem<'_>) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let snap = self.db.snapshot();
        let meta = keys
            .iter()
            .map(|k| snap.get_cf(self.cf(CF_RAFT_META), raft_meta_key(partition, k)))
            .collect::<Result<Vec<_>, _>>()?;
        visit(PartitionItem::Meta(&meta))?;
        let prefix = partition.to_be_bytes().to_vec();
        for cf in PARTITION_STATE_CFS {
            let mut ro = ReadOptions::default();
            ro.set_iterate_range(prefix.clone()..prefix_end(&prefix));
            for item in snap.iterator_cf_opt(self.cf(cf), ro, IteratorMode::Start) {
                let (k, v) = item?;
                visit(PartitionItem::Row(cf, &k, &v))?;
            }
        }
        Ok(())
    }

    /// Whether a row of column family `cf` with `key` belongs to `partition`'s replicated
    /// state (a snapshot's row).
    pub fn check_snapshot_row(
        &self,
        partition: PartitionId,
        cf: &str,
        key: &[u8],
    ) -> Result<(), StorageError> {
        if in_partition(partition, cf, key) {
            Ok(())
        } else {
            Err(StorageError::Corrupt(format!(
                "snapshot row for {cf} is outside partition {partition}"
            )))
        }
    }

    /// Replaces `partition`'s replicated state with `rows`, streamed: the rows go in writes
    /// of about [`IMPORT_BATCH_BYTES`], so a partition of any size is never held whole.
    ///
    /// Not atomic as a whole, so it is made restartable. The first write deletes the
    /// partition's rows and sets consensus metadata `marker` (what to install again, should
    /// the node stop half way); the last one, synced, writes `meta` and removes the marker.
    /// RocksDB's log keeps the writes in order, so after a crash either the marker is set
    /// (the caller installs the same rows again) or none of this happened.
    pub fn import_partition_streamed(
        &self,
        partition: PartitionId,
        rows: impl IntoIterator<Item = Result<(String, Vec<u8>, Vec<u8>), StorageError>>,
        marker: (&str, Vec<u8>),
        meta: &[(&str, Vec<u8>)],
    ) -> Result<u64, StorageError> {
        let prefix = partition.to_be_bytes().to_vec();
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_RAFT_META),
            raft_meta_key(partition, marker.0),
            &marker.1,
        );
        for cf in PARTITION_STATE_CFS {
            batch.delete_range_cf(self.cf(cf), prefix.clone(), prefix_end(&prefix));
        }
        let mut count = 0u64;
        for row in rows {
            let (cf, k, v) = row?;
            self.check_snapshot_row(partition, &cf, &k)?;
            batch.put_cf(self.cf(&cf), &k, &v);
            count += 1;
            if batch.size_in_bytes() >= IMPORT_BATCH_BYTES {
                self.write(std::mem::take(&mut batch), false)?;
            }
        }
        for (key, value) in meta {
            batch.put_cf(self.cf(CF_RAFT_META), raft_meta_key(partition, key), value);
        }
        batch.delete_cf(self.cf(CF_RAFT_META), raft_meta_key(partition, marker.0));
        self.write(batch, true)?;
        Ok(count)
    }

    /// Where this node keeps its consensus snapshot files (inside the database directory,
    /// which RocksDB leaves alone but for its own files).
    pub fn snapshot_dir(&self) -> std::path::PathBuf {
        self.db.path().join(SNAPSHOT_DIR)
    }
}

/// Bytes of rows per write of a streamed snapshot install.
pub const IMPORT_BATCH_BYTES: usize = 4 << 20;

/// The subdirectory of the database directory that holds consensus snapshot files.
const SNAPSHOT_DIR: &str = "snapshots";

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, ts: u64) -> StoredMessage {
        StoredMessage {
            id: id.into(),
            ts,
            from: None,
            body: ByteBuf::from(id.as_bytes().to_vec()),
        }
    }

    fn append(store: &Store, user: &str, seqs: std::ops::RangeInclusive<u64>, ts: u64) {
        let ops: Vec<Op> = seqs
            .map(|seq| Op::Append {
                partition: 3,
                user: user.into(),
                seq,
                msg: msg(&format!("{user}-{seq}"), ts + seq),
            })
            .collect();
        store.apply(&ops, true).unwrap();
    }

    #[test]
    fn every_column_family_inserts_from_its_users_or_its_partitions_hint() {
        for (name, section) in cf_options_written() {
            let hint = if USER_HINT_CFS.contains(&name) {
                "warbler.UserPrefix"
            } else {
                "rocksdb.FixedPrefix.2"
            };
            assert!(
                section.contains(&format!(
                    "memtable_insert_with_hint_prefix_extractor={hint}"
                )),
                "column family {name} inserts without the hint {hint}"
            );
        }
    }

    #[test]
    fn rewritten_rows_have_memtables_that_fit_in_cache() {
        for (name, section) in cf_options_written() {
            let want = match name {
                CF_HEADS | CF_CURSORS | CF_RAFT_META => 4 << 20,
                CF_DEDUP => 16 << 20,
                _ => 64 << 20,
            };
            assert!(
                section.contains(&format!("write_buffer_size={want}\n")),
                "column family {name}'s memtable is not {want} bytes"
            );
        }
    }

    /// Each column family's options as RocksDB wrote them down when a store opened.
    fn cf_options_written() -> Vec<(&'static str, String)> {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("OPTIONS-")
            })
            .max()
            .expect("RocksDB writes an OPTIONS file");
        let text = std::fs::read_to_string(options).unwrap();
        COLUMN_FAMILIES
            .into_iter()
            .map(|name| {
                let section = text
                    .split("[CFOptions \"")
                    .find(|s| s.starts_with(&format!("{name}\"")))
                    .unwrap_or_else(|| panic!("no options for column family {name}"));
                let section = section.split("[TableOptions").next().unwrap();
                (name, section.to_string())
            })
            .collect()
    }

    #[test]
    fn a_batch_writes_each_users_head_once_and_a_restore_keeps_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let heads_written = |s: &Store| {
            s.db.property_int_value_cf(s.cf(CF_HEADS), "rocksdb.num-entries-active-mem-table")
                .unwrap()
                .unwrap()
        };
        // 20 appends of two users in one batch: two head rows, each the user's last seq.
        append(&store, "al", 1..=10, 1);
        let ops: Vec<Op> = (1..=10)
            .flat_map(|seq| {
                ["bo", "cy"].map(|user| Op::Append {
                    partition: 3,
                    user: user.into(),
                    seq,
                    msg: msg(&format!("{user}-{seq}"), seq),
                })
            })
            .collect();
        let before = heads_written(&store);
        store.apply(&ops, false).unwrap();
        assert_eq!(heads_written(&store) - before, 2);
        assert_eq!(store.last_seq(3, "al").unwrap(), 10);
        assert_eq!(store.last_seq(3, "bo").unwrap(), 10);
        assert_eq!(store.last_seq(3, "cy").unwrap(), 10);
        assert_eq!(store.read_range(3, "bo", 0, 100).unwrap().len(), 10);
        // A restore between appends: each write lands in op order, as if written alone.
        let head_row = |user: &str, seq: u64| Row {
            cf: CF_HEADS.into(),
            key: ByteBuf::from(user_prefix(3, user)),
            value: ByteBuf::from(seq.to_be_bytes().to_vec()),
        };
        let append_one = |user: &str, seq: u64| Op::Append {
            partition: 3,
            user: user.into(),
            seq,
            msg: msg(&format!("{user}-{seq}"), seq),
        };
        store
            .apply(
                &[
                    append_one("bo", 11),
                    Op::Restore {
                        partition: 3,
                        rows: vec![head_row("bo", 40), head_row("cy", 40)],
                    },
                    append_one("cy", 41),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            store.last_seq(3, "bo").unwrap(),
            40,
            "the restore came last"
        );
        assert_eq!(store.last_seq(3, "cy").unwrap(), 41, "the append came last");
    }

    #[test]
    fn a_range_of_large_messages_is_cut_by_bytes_but_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let big = |seq: u64, len: usize| Op::Append {
            partition: 3,
            user: "big".into(),
            seq,
            msg: StoredMessage {
                body: ByteBuf::from(vec![7u8; len]),
                ..msg(&format!("b{seq}"), seq)
            },
        };
        let mut ops: Vec<Op> = (1..=20).map(|s| big(s, 512 * 1024)).collect();
        ops.push(big(21, RANGE_READ_BYTES_MAX + 1));
        store.apply(&ops, true).unwrap();
        let page = store.read_range(3, "big", 0, 100).unwrap();
        let bytes: usize = page.iter().map(|(_, m)| m.body.len()).sum();
        assert!(
            !page.is_empty() && page.len() < 20,
            "{} messages",
            page.len()
        );
        assert!(bytes <= RANGE_READ_BYTES_MAX, "{bytes} bytes");
        assert_eq!(
            page.last().unwrap().0,
            page.len() as u64,
            "a prefix, in order"
        );
        let huge = store.read_range(3, "big", 20, 100).unwrap();
        assert_eq!(huge.len(), 1, "one message over the cap still comes, alone");
    }

    #[test]
    fn a_partition_backed_up_and_restored_elsewhere_reads_the_same() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (
            Store::open(da.path()).unwrap(),
            Store::open(db.path()).unwrap(),
        );
        append(&a, "al", 1..=30, 1000);
        append(&a, "bo", 1..=3, 1000);
        a.apply(
            &[Op::Cursor {
                partition: 3,
                user: "al".into(),
                device: "phone".into(),
                acked: 17,
            }],
            true,
        )
        .unwrap();
        a.raft_meta_put(3, "applied", b"x", false).unwrap();
        // Another partition's user stays out of partition 3's backup.
        a.apply(
            &[Op::Append {
                partition: 4,
                user: "cy".into(),
                seq: 1,
                msg: msg("cy-1", 1),
            }],
            true,
        )
        .unwrap();
        let (rows, applied) = a.backup_partition(3, Some("applied")).unwrap();
        assert_eq!(applied.as_deref(), Some(&b"x"[..]));
        assert!(b.partition_is_empty(3).unwrap());
        Store::check_rows(3, &rows).unwrap();
        assert!(Store::check_rows(4, &rows).is_err());
        // In two chunks, as a restore sends them.
        let (first, rest) = rows.split_at(rows.len() / 2);
        for chunk in [first, rest] {
            b.apply(
                &[Op::Restore {
                    partition: 3,
                    rows: chunk.to_vec(),
                }],
                true,
            )
            .unwrap();
        }
        assert!(!b.partition_is_empty(3).unwrap());
        assert!(b.partition_is_empty(4).unwrap());
        assert_eq!(b.last_seq(3, "al").unwrap(), 30);
        assert_eq!(
            b.read_range(3, "al", 0, 100).unwrap(),
            a.read_range(3, "al", 0, 100).unwrap()
        );
        assert_eq!(b.read_range(3, "bo", 0, 100).unwrap().len(), 3);
        assert_eq!(b.dedup(3, "al", "al-7").unwrap(), Some(7));
        assert_eq!(
            b.cursor(3, "al", "phone").unwrap(),
            a.cursor(3, "al", "phone").unwrap()
        );
        assert_eq!(b.last_seq(4, "cy").unwrap(), 0);
    }

    #[test]
    fn consensus_groups_are_listed_and_a_wipe_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.consensus_groups().unwrap().is_empty());
        append(&store, "al", 1..=5, 1000);
        for p in [0u16, 7, 300, u16::MAX - 1, u16::MAX] {
            store.raft_meta_put(p, "vote", b"v", false).unwrap();
            store.raft_meta_put(p, "applied", b"a", false).unwrap();
            store
                .raft_log_put(p, &[(u64::MAX >> 8, b"entry".to_vec())], false)
                .unwrap();
        }
        assert_eq!(
            store.consensus_groups().unwrap(),
            vec![0, 7, 300, u16::MAX - 1, u16::MAX]
        );
        store.drop_partition(7).unwrap();
        assert_eq!(
            store.consensus_groups().unwrap(),
            vec![0, 300, u16::MAX - 1, u16::MAX]
        );
        store.wipe().unwrap();
        assert!(store.consensus_groups().unwrap().is_empty());
        assert_eq!(store.last_seq(3, "al").unwrap(), 0);
        assert!(store.read_range(3, "al", 0, 10).unwrap().is_empty());
        for p in [0u16, u16::MAX] {
            assert!(store.raft_log_last(p).unwrap().is_none(), "log of {p}");
            assert!(store.raft_meta_get(p, "vote").unwrap().is_none());
        }
    }

    #[test]
    fn appends_read_back_in_order_with_heads_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.last_seq(3, "al").unwrap(), 0);
        append(&store, "al", 1..=50, 1000);
        append(&store, "alice", 1..=5, 1000);
        assert_eq!(store.last_seq(3, "al").unwrap(), 50);
        let r = store.read_range(3, "al", 10, 5).unwrap();
        assert_eq!(
            r.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![11, 12, 13, 14, 15]
        );
        assert_eq!(r[0].1.id, "al-11");
        // The neighbour "alice" does not leak into "al"'s range.
        assert_eq!(store.read_range(3, "al", 45, 100).unwrap().len(), 5);
        assert_eq!(store.dedup(3, "al", "al-7").unwrap(), Some(7));
        assert_eq!(store.dedup(3, "al", "nope").unwrap(), None);
        assert_eq!(store.verify_user(3, "al").unwrap(), Some((1, 50)));
    }

    #[test]
    fn cursors_are_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cursor = |device: &str, acked| Op::Cursor {
            partition: 1,
            user: "u".into(),
            device: device.into(),
            acked,
        };
        store
            .apply(
                &[cursor("phone", 4), cursor("desk", 9), cursor("phone", 6)],
                true,
            )
            .unwrap();
        assert_eq!(store.cursor(1, "u", "phone").unwrap(), 6);
        assert_eq!(store.cursor(1, "u", "desk").unwrap(), 9);
        assert_eq!(store.cursor(1, "u", "web").unwrap(), 0);
        assert_eq!(
            store.cursors(1, "u").unwrap(),
            vec![("desk".into(), 9), ("phone".into(), 6)]
        );
    }

    #[test]
    fn verify_detects_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        append(&store, "g", 1..=3, 0);
        append(&store, "g", 5..=6, 0);
        let err = store.verify_user(3, "g").unwrap_err().to_string();
        assert!(err.contains("expected seq 4, found 5"), "{err}");
    }

    #[test]
    fn retention_trims_by_count_and_age_but_never_reuses_seq() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        append(&store, "c", 1..=100, 10_000);
        let policy = RetentionPolicy {
            max_messages: 30,
            max_age_ms: 0,
            dedup_window_ms: u64::MAX,
        };
        let r = store.trim_user(3, "c", &policy, 20_000).unwrap();
        assert_eq!(r.messages, 70);
        assert_eq!(store.verify_user(3, "c").unwrap(), Some((71, 100)));
        // Age: messages have ts 10_000 + seq; cutoff 10_090 keeps seq >= 90.
        let policy = RetentionPolicy {
            max_messages: 0,
            max_age_ms: 1_000,
            dedup_window_ms: u64::MAX,
        };
        store.trim_user(3, "c", &policy, 11_090).unwrap();
        assert_eq!(store.verify_user(3, "c").unwrap(), Some((90, 100)));
        // Everything aged out: the head stays, so the next seq is still 101.
        store.trim_user(3, "c", &policy, 1_000_000).unwrap();
        assert_eq!(store.verify_user(3, "c").unwrap(), None);
        assert_eq!(store.last_seq(3, "c").unwrap(), 100);
    }

    /// Retention by count never trims what a device has not acknowledged (the mailbox
    /// refuses publishes with `mailbox_full` first); by age it does.
    #[test]
    fn retention_by_count_keeps_what_a_device_has_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        append(&store, "k", 1..=100, 10_000);
        let cursor = |device: &str, acked| Op::Cursor {
            partition: 3,
            user: "k".into(),
            device: device.into(),
            acked,
        };
        store
            .apply(&[cursor("phone", 95), cursor("desk", 40)], true)
            .unwrap();
        let policy = RetentionPolicy {
            max_messages: 30,
            max_age_ms: 0,
            dedup_window_ms: u64::MAX,
        };
        store.trim_user(3, "k", &policy, 20_000).unwrap();
        assert_eq!(
            store.verify_user(3, "k").unwrap(),
            Some((41, 100)),
            "desk's 41.. stay"
        );
        store.apply(&[cursor("desk", 90)], true).unwrap();
        store.trim_user(3, "k", &policy, 20_000).unwrap();
        assert_eq!(
            store.verify_user(3, "k").unwrap(),
            Some((71, 100)),
            "then the count rules"
        );
    }

    #[test]
    fn dedup_records_expire_after_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        append(&store, "d", 1..=10, 1_000); // ts 1001..=1010
        let policy = RetentionPolicy {
            max_messages: 0,
            max_age_ms: 0,
            dedup_window_ms: 100,
        };
        // Cutoff 1_005: records with ts 1001..=1004 (seqs 1..=4) go.
        let report = store.sweep(&policy, 1_105).unwrap();
        assert_eq!(report.dedup_records, 4);
        assert_eq!(store.dedup(3, "d", "d-4").unwrap(), None);
        assert_eq!(store.dedup(3, "d", "d-5").unwrap(), Some(5));
        assert_eq!(
            store.read_range(3, "d", 0, 100).unwrap().len(),
            10,
            "messages stay"
        );
    }

    #[test]
    fn raft_log_ranges_stay_inside_their_partition() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entries: Vec<(u64, Vec<u8>)> = (1..=10).map(|i| (i, vec![i as u8])).collect();
        store.raft_log_put(4, &entries, true).unwrap();
        store.raft_log_put(5, &[(1, vec![99])], true).unwrap();
        assert_eq!(
            store
                .raft_log_range(4, 3, 6)
                .unwrap()
                .iter()
                .map(|(i, _)| *i)
                .collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(store.raft_log_last(4).unwrap(), Some((10, vec![10])));
        store.raft_log_delete(4, 8, u64::MAX, true).unwrap();
        assert_eq!(store.raft_log_last(4).unwrap().unwrap().0, 7);
        assert_eq!(
            store.raft_log_last(5).unwrap(),
            Some((1, vec![99])),
            "partition 5 untouched"
        );
        assert_eq!(store.raft_log_last(6).unwrap(), None);
    }

    #[test]
    fn a_raft_log_read_bounded_by_bytes_stops_past_the_bound_but_never_reads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entries: Vec<(u64, Vec<u8>)> = (1..=10).map(|i| (i, vec![i as u8; 100])).collect();
        store.raft_log_put(4, &entries, true).unwrap();
        let read = |start, bytes| -> Vec<u64> {
            let rows = store.raft_log_range_bytes(4, start, 11, bytes).unwrap();
            rows.iter().map(|(i, _)| *i).collect()
        };
        // The entry that reaches the bound is the last one read.
        assert_eq!(read(1, 250), vec![1, 2, 3]);
        assert_eq!(read(1, 300), vec![1, 2, 3]);
        // One entry larger than the bound still comes, alone.
        assert_eq!(read(5, 1), vec![5]);
        assert_eq!(read(1, usize::MAX), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_partition_exports_and_imports_whole() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        append(&a, "x", 1..=5, 0); // partition 3
        a.apply(
            &[Op::Cursor {
                partition: 3,
                user: "x".into(),
                device: "d".into(),
                acked: 2,
            }],
            true,
        )
        .unwrap();
        a.apply(
            &[Op::Cursor {
                partition: 7,
                user: "y".into(),
                device: "d".into(),
                acked: 9,
            }],
            true,
        )
        .unwrap();
        let rows = a.export_partition(3).unwrap();
        let b = Store::open(&dir.path().join("b")).unwrap();
        append(&b, "stale", 1..=2, 0);
        b.import_partition_streamed(3, rows.into_iter().map(Ok), ("installing", vec![]), &[])
            .unwrap();
        assert_eq!(b.verify_user(3, "x").unwrap(), Some((1, 5)));
        assert_eq!(b.cursor(3, "x", "d").unwrap(), 2);
        assert_eq!(
            b.last_seq(3, "stale").unwrap(),
            0,
            "the import replaced the partition"
        );
        assert_eq!(
            b.cursor(7, "y", "d").unwrap(),
            0,
            "other partitions are not exported"
        );
    }

    /// Regression: a consensus snapshot is built while applies go on. Read column family
    /// by column family, with the applied id read first, an export could hold a user's head
    /// past its messages and an applied id older than both; a replica installing it then
    /// had a head without the messages below it. Every export taken while a writer appends
    /// must be one consistent state: head = newest message = applied.
    #[test]
    fn an_export_taken_while_applies_go_on_is_one_consistent_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for seq in 1..=3_000u64 {
                    let op = Op::Append {
                        partition: 3,
                        user: "x".into(),
                        seq,
                        msg: msg(&format!("x-{seq}"), seq),
                    };
                    store
                        .apply_with_meta(
                            3,
                            &[op],
                            &[("applied", seq.to_be_bytes().to_vec())],
                            false,
                        )
                        .unwrap();
                }
            })
        };
        let mut exports = 0;
        while !writer.is_finished() || exports == 0 {
            let (rows, meta) = store.export_partition_with_meta(3, &["applied"]).unwrap();
            let applied = meta[0].as_deref().and_then(u64_be).unwrap_or(0);
            let msgs = rows.iter().filter(|(cf, _, _)| cf == CF_MSGS).count() as u64;
            let head = rows
                .iter()
                .find(|(cf, _, _)| cf == CF_HEADS)
                .and_then(|(_, _, v)| u64_be(v))
                .unwrap_or(0);
            assert_eq!(
                (msgs, head),
                (applied, applied),
                "export {exports}: {msgs} messages and head {head} at applied {applied}"
            );
            exports += 1;
        }
        writer.join().unwrap();
        assert!(exports > 1, "exports ran beside the writer");
    }

    #[test]
    fn a_dropped_partition_leaves_nothing_and_touches_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        append(&s, "x", 1..=5, 0); // partition 3
        append(&s, "stale", 1..=2, 0); // partition 3 too
        s.apply(
            &[Op::Cursor {
                partition: 4,
                user: "y".into(),
                device: "d".into(),
                acked: 9,
            }],
            true,
        )
        .unwrap();
        for p in [3, 4] {
            s.raft_log_put(p, &[(1, vec![1]), (2, vec![2])], true)
                .unwrap();
            s.raft_meta_put(p, "vote", b"v", true).unwrap();
        }
        s.drop_partition(3).unwrap();
        assert_eq!(s.export_partition(3).unwrap(), Vec::new());
        assert_eq!(s.raft_log_last(3).unwrap(), None);
        assert_eq!(s.raft_meta_get(3, "vote").unwrap(), None);
        assert_eq!(s.cursor(4, "y", "d").unwrap(), 9);
        assert_eq!(s.raft_log_last(4).unwrap().map(|e| e.0), Some(2));
        assert_eq!(s.raft_meta_get(4, "vote").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            append(&store, "r", 1..=7, 0);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.verify_user(3, "r").unwrap(), Some((1, 7)));
    }
}
