//! [`EntryCache`]: the newest entries of one partition's Raft log, decoded.
//!
//! openraft reads every entry back from the log store after appending it: the leader once
//! per follower to replicate it and once to apply it, a follower once to apply it. Each of
//! those reads was a RocksDB iterator seek and a MessagePack decode of every publish in
//! the entry. Right after an append, those entries are the newest of the log, so the log
//! store keeps them here and clones them out instead (a clone shares the entry's ops: see
//! [`crate::raft_store::Batch`]). Older entries (a follower catching up, a restart) are read
//! from RocksDB as before.
//!
//! The cache holds a contiguous run of indexes that always ends at the log's last entry:
//! appends extend it, a truncation cuts it where the log is cut, a purge drops its front.
//! A range it does not hold whole from its first index is not served from it. TiKV keeps
//! the same (`EntryCache` in raftstore).

use std::collections::VecDeque;

use openraft::Entry;

use crate::raft_store::TypeConfig;

/// Most bytes (encoded) of entries one partition keeps decoded. Two entries in flight of
/// [`crate::raft_log::BATCH_BYTES_MAX`] each and the next fit; a node with 64 busy
/// partitions holds at most 32 MiB here.
pub const ENTRY_CACHE_BYTES_MAX: usize = 512 * 1024;

/// The newest entries of one partition's log (module docs).
#[derive(Default)]
pub struct EntryCache {
    /// Consecutive indexes, oldest first, each with its encoded size.
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl EntryCache {
    /// Records `entry` (of `bytes` encoded), just written at its index: entries from that
    /// index on are replaced, as the log's were.
    pub fn append(&mut self, entry: Entry<TypeConfig>, bytes: usize) {
        let index = entry.log_id.index;
        match self.next_index() {
            Some(next) if index < next => self.truncate(index),
            // A gap: what the cache holds no longer ends at the log's last entry.
            Some(next) if index > next => self.clear(),
            _ => {}
        }
        if bytes > ENTRY_CACHE_BYTES_MAX {
            // Read back from storage: keeping it would push out everything else.
            self.clear();
            return;
        }
        self.bytes += bytes;
        self.entries.push_back((entry, bytes));
        while self.bytes > ENTRY_CACHE_BYTES_MAX {
            self.pop_front();
        }
    }

    /// The log lost entries from `index` on.
    pub fn truncate(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= index)
        {
            let (_, bytes) = self.entries.pop_back().expect("looked at above");
            self.bytes -= bytes;
        }
    }

    /// The log lost entries up to and including `index`.
    pub fn purge(&mut self, index: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= index)
        {
            self.pop_front();
        }
    }

    /// Entries `start..end`, up to the log's end, stopping once they reach `bytes_max`
    /// encoded bytes (at least one if the range holds any), as the log store reads them; or
    /// `None` if the cache does not hold `start`.
    pub fn get(&self, start: u64, end: u64, bytes_max: usize) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.entries.front()?.0.log_id.index;
        let next = self.next_index()?;
        if start < first || start > next {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let from = usize::try_from(start - first).ok()?;
        for (entry, size) in self.entries.iter().skip(from) {
            if entry.log_id.index >= end || bytes >= bytes_max {
                break;
            }
            bytes = bytes.saturating_add(*size);
            out.push(entry.clone());
        }
        Some(out)
    }

    fn next_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index + 1)
    }

    fn pop_front(&mut self) {
        if let Some((_, bytes)) = self.entries.pop_front() {
            self.bytes -= bytes;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::*;

    fn entry(index: u64, term: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 0), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(got: Option<Vec<Entry<TypeConfig>>>) -> Option<Vec<(u64, u64)>> {
        got.map(|v| {
            v.iter()
                .map(|e| (e.log_id.index, e.log_id.leader_id.term))
                .collect()
        })
    }

    #[test]
    fn serves_ranges_it_holds_from_their_start_and_nothing_else() {
        let mut c = EntryCache::default();
        for i in 5..10 {
            c.append(entry(i, 1), 10);
        }
        assert_eq!(
            indexes(c.get(4, 10, usize::MAX)),
            None,
            "before its first entry"
        );
        assert_eq!(
            indexes(c.get(7, 100, usize::MAX)),
            Some(vec![(7, 1), (8, 1), (9, 1)]),
            "up to the log's end"
        );
        assert_eq!(indexes(c.get(6, 8, usize::MAX)), Some(vec![(6, 1), (7, 1)]));
        assert_eq!(
            indexes(c.get(10, 20, usize::MAX)),
            Some(vec![]),
            "past the end: none"
        );
        assert_eq!(indexes(c.get(11, 20, usize::MAX)), None);
        // The byte bound as the store applies it: stop once reached, at least one entry.
        assert_eq!(
            indexes(c.get(5, 10, 25)),
            Some(vec![(5, 1), (6, 1), (7, 1)])
        );
        assert_eq!(indexes(c.get(5, 10, 1)), Some(vec![(5, 1)]));
    }

    #[test]
    fn follows_truncation_purge_and_overwrite() {
        let mut c = EntryCache::default();
        for i in 1..=6 {
            c.append(entry(i, 1), 10);
        }
        c.truncate(5);
        assert_eq!(indexes(c.get(4, 10, usize::MAX)), Some(vec![(4, 1)]));
        // A new leader's entries replace the old ones from their index on.
        c.append(entry(3, 2), 10);
        assert_eq!(
            indexes(c.get(2, 10, usize::MAX)),
            Some(vec![(2, 1), (3, 2)])
        );
        c.purge(2);
        assert_eq!(indexes(c.get(2, 10, usize::MAX)), None);
        assert_eq!(indexes(c.get(3, 10, usize::MAX)), Some(vec![(3, 2)]));
        // An entry after a gap: the older ones no longer end at the log's end.
        c.append(entry(9, 2), 10);
        assert_eq!(indexes(c.get(3, 10, usize::MAX)), None);
        assert_eq!(indexes(c.get(9, 10, usize::MAX)), Some(vec![(9, 2)]));
        assert_eq!(c.bytes, 10);
    }

    #[test]
    fn stays_within_its_byte_bound() {
        let mut c = EntryCache::default();
        let each = ENTRY_CACHE_BYTES_MAX / 4;
        for i in 1..=10 {
            c.append(entry(i, 1), each);
        }
        assert_eq!(c.bytes, ENTRY_CACHE_BYTES_MAX);
        assert_eq!(
            indexes(c.get(6, 11, usize::MAX)),
            None,
            "older ones gave way"
        );
        assert_eq!(indexes(c.get(7, 11, usize::MAX)).map(|v| v.len()), Some(4));
        // One entry larger than the bound is read from storage, and nothing stays behind it.
        c.append(entry(11, 1), ENTRY_CACHE_BYTES_MAX + 1);
        assert_eq!(indexes(c.get(10, 12, usize::MAX)), None);
        assert_eq!(c.bytes, 0);
    }
}
