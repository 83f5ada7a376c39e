//! Consensus snapshot files: a partition's replicated state streamed to and from disk, a
//! row at a time, never held whole in memory.
//!
//! A file is the MessagePack of `{meta: <snapshot meta>, rows: [[cf, key, value], …]}`: the
//! same bytes as the single value the previous release kept (and sent) as a snapshot, so
//! each release reads the other's. The writer streams the rows and fills in their count
//! (a fixed five-byte array header) when it knows it.
//!
//! Files live in [`Store::snapshot_dir`], named `p<partition>-<name>`: `.snap` for a
//! finished snapshot, `.tmp` while one is written, `.part` while one is received. Leftover
//! `.tmp` and `.part` files are removed when the database opens.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;

use crate::error::StorageError;
use crate::store::{MetaValues, PartitionItem, Store};
use crate::PartitionId;

/// A finished snapshot file.
pub const SNAPSHOT_EXT: &str = "snap";
const WRITING_EXT: &str = "tmp";
const RECEIVING_EXT: &str = "part";

fn file_err(path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn prefix(partition: PartitionId) -> String {
    format!("p{partition:05}-")
}

/// The path of `partition`'s snapshot file called `name` (any character other than a
/// letter, digit, `-` or `.` becomes `_`) with extension `ext`.
pub fn snapshot_path(dir: &Path, partition: PartitionId, name: &str, ext: &str) -> PathBuf {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{}{name}.{ext}", prefix(partition)))
}

/// A name no other snapshot file of this node has had: the time in nanoseconds.
pub fn unique() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_string()
}

/// A new, empty file to receive a snapshot of `partition` into.
pub fn receiving_file(dir: &Path, partition: PartitionId) -> Result<(PathBuf, File), StorageError> {
    fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let path = snapshot_path(dir, partition, &unique(), RECEIVING_EXT);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| file_err(&path, e))?;
    Ok((path, file))
}

/// Which snapshot files [`remove_files`] removes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Which {
    /// Finished snapshots (`.snap`).
    Finished,
    /// Snapshots being received (`.part`).
    Receiving,
    /// Snapshots being received or written (`.part`, `.tmp`).
    Unfinished,
    /// Every snapshot file.
    All,
}

/// Removes the snapshot files in `dir` of `partition` (of every partition if `None`) that
/// are `which`, except `keep`.
pub fn remove_files(
    dir: &Path,
    partition: Option<PartitionId>,
    which: Which,
    keep: &[&Path],
) -> Result<(), StorageError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_err(dir, e)),
    };
    let wanted = partition.map(prefix);
    for entry in entries {
        let path = entry.map_err(|e| file_err(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ours = match &wanted {
            Some(p) => name.starts_with(p.as_str()),
            None => name.starts_with('p'),
        };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let matches = match which {
            Which::Finished => ext == SNAPSHOT_EXT,
            Which::Receiving => ext == RECEIVING_EXT,
            Which::Unfinished => ext == RECEIVING_EXT || ext == WRITING_EXT,
            Which::All => [SNAPSHOT_EXT, RECEIVING_EXT, WRITING_EXT].contains(&ext),
        };
        if !ours || !matches || keep.contains(&path.as_path()) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(&path, e)),
        }
    }
    Ok(())
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| file_err(dir, e))
}

/// What [`write_partition`] wrote.
pub struct Written {
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
}

/// Writes `partition`'s state, as of one database snapshot, to a new snapshot file and
/// makes it durable under its final name. `meta` gets the values of consensus metadata
/// `keys` as of that same snapshot and returns the encoded snapshot meta for the file and
/// the file's name.
pub fn write_partition(
    store: &Store,
    partition: PartitionId,
    keys: &[&str],
    meta: impl FnOnce(&MetaValues) -> Result<(Vec<u8>, String), StorageError>,
) -> Result<Written, StorageError> {
    let dir = store.snapshot_dir();
    fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
    let tmp = snapshot_path(&dir, partition, &unique(), WRITING_EXT);
    let file = File::create(&tmp).map_err(|e| file_err(&tmp, e))?;
    let result = write_rows(store, partition, keys, meta, &tmp, file);
    let (name, rows) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let path = snapshot_path(&dir, partition, &name, SNAPSHOT_EXT);
    fs::rename(&tmp, &path).map_err(|e| file_err(&path, e))?;
    sync_dir(&dir)?;
    let bytes = fs::metadata(&path).map_err(|e| file_err(&path, e))?.len();
    Ok(Written { path, rows, bytes })
}

fn write_rows(
    store: &Store,
    partition: PartitionId,
    keys: &[&str],
    meta: impl FnOnce(&MetaValues) -> Result<(Vec<u8>, String), StorageError>,
    tmp: &Path,
    file: File,
) -> Result<(String, u64), StorageError> {
    let io = |e: std::io::Error| file_err(tmp, e);
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut meta = Some(meta);
    let mut name = String::new();
    let mut count_at = 0u64;
    let mut rows = 0u64;
    let mut scratch = Vec::new();
    store.each_partition_item(partition, keys, |item| match item {
        PartitionItem::Meta(values) => {
            let meta = meta.take().expect("the meta comes once, first");
            let (encoded, file_name) = meta(values)?;
            name = file_name;
            // {meta: …, rows: [ (count filled in at the end) …
            rmp::encode::write_map_len(&mut out, 2).map_err(|e| file_err(tmp, e))?;
            rmp::encode::write_str(&mut out, "meta").map_err(|e| file_err(tmp, e))?;
            out.write_all(&encoded).map_err(io)?;
            rmp::encode::write_str(&mut out, "rows").map_err(|e| file_err(tmp, e))?;
            // The count's offset: map marker, "meta" (marker and 4 bytes), the meta,
            // "rows", the array32 marker.
            count_at = (1 + 5 + encoded.len() + 5 + 1) as u64;
            out.write_all(&[0xdd, 0, 0, 0, 0]).map_err(io)?;
            Ok(())
        }
        PartitionItem::Row(cf, k, v) => {
            write_row(&mut out, &mut scratch, cf, k, v).map_err(|e| file_err(tmp, e))?;
            rows += 1;
            Ok(())
        }
    })?;
    let count = u32::try_from(rows)
        .map_err(|_| file_err(tmp, format!("{rows} rows do not fit one snapshot file")))?;
    let mut file = out.into_inner().map_err(|e| file_err(tmp, e.error()))?;
    file.seek(SeekFrom::Start(count_at)).map_err(io)?;
    file.write_all(&count.to_be_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok((name, rows))
}

/// Reads a snapshot file a row at a time.
pub struct Reader {
    path: PathBuf,
    input: BufReader<File>,
    left: u64,
    ended: bool,
}

impl Reader {
    /// Opens `path` and reads up to its first row (the meta is skipped: the caller has it).
    pub fn open(path: &Path) -> Result<Reader, StorageError> {
        let file = File::open(path).map_err(|e| file_err(path, e))?;
        Reader::new(path, file)
    }

    /// Reads `file` (at `path`) from its start.
    pub fn new(path: &Path, mut file: File) -> Result<Reader, StorageError> {
        file.seek(SeekFrom::Start(0))
            .map_err(|e| file_err(path, e))?;
        let mut input = BufReader::with_capacity(1 << 20, file);
        let bad = |what: String| {
            file_err(
                path,
                format!("not a snapshot file ({what}); it is removed and the snapshot sent again"),
            )
        };
        let fields = rmp::decode::read_map_len(&mut input).map_err(|e| bad(e.to_string()))?;
        if fields != 2 {
            return Err(bad(format!("{fields} fields, not 2")));
        }
        let key = read_key(&mut input).map_err(bad)?;
        if key != "meta" {
            return Err(bad(format!("first field {key:?}, not \"meta\"")));
        }
        let _: IgnoredAny =
            rmp_serde::decode::from_read(&mut input).map_err(|e| bad(format!("meta: {e}")))?;
        let key = read_key(&mut input).map_err(bad)?;
        if key != "rows" {
            return Err(bad(format!("second field {key:?}, not \"rows\"")));
        }
        let left =
            rmp::decode::read_array_len(&mut input).map_err(|e| bad(format!("rows: {e}")))?;
        Ok(Reader {
            path: path.to_path_buf(),
            input,
            left: u64::from(left),
            ended: false,
        })
    }
}

fn read_key(input: &mut impl Read) -> Result<String, String> {
    let len = rmp::decode::read_str_len(input).map_err(|e| e.to_string())?;
    if len > 64 {
        return Err(format!("a field name of {len} bytes"));
    }
    let mut buf = vec![0u8; len as usize];
    input.read_exact(&mut buf).map_err(|e| e.to_string())?;
    String::from_utf8(buf).map_err(|e| e.to_string())
}

// A row is `[cf, key, value]` with the key and value as arrays of integers: the way
// MessagePack's serde encoder wrote a `Vec<u8>` in the previous release's snapshot value.
// Encoded and decoded here by hand: through serde every byte was a call of its own, and a
// snapshot took seconds per hundred megabytes to write and to read.

/// Writes one row as `rmp_serde` writes the tuple `(cf, key, value)`.
fn write_row(
    out: &mut impl Write,
    scratch: &mut Vec<u8>,
    cf: &str,
    key: &[u8],
    value: &[u8],
) -> std::io::Result<()> {
    rmp::encode::write_array_len(out, 3).map_err(std::io::Error::other)?;
    rmp::encode::write_str(out, cf).map_err(std::io::Error::other)?;
    for bytes in [key, value] {
        let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
        rmp::encode::write_array_len(out, len).map_err(std::io::Error::other)?;
        scratch.clear();
        for &b in bytes {
            // A positive fixint below 0x80, a `uint 8` from there.
            if b < 0x80 {
                scratch.push(b);
            } else {
                scratch.extend_from_slice(&[0xcc, b]);
            }
        }
        out.write_all(scratch)?;
    }
    Ok(())
}

fn read_row(input: &mut BufReader<File>) -> Result<(String, Vec<u8>, Vec<u8>), String> {
    let fields = rmp::decode::read_array_len(input).map_err(|e| e.to_string())?;
    if fields != 3 {
        return Err(format!("a row of {fields} fields, not 3"));
    }
    let len = rmp::decode::read_str_len(input).map_err(|e| e.to_string())?;
    if len > 64 {
        return Err(format!("a column family name of {len} bytes"));
    }
    let mut cf = vec![0u8; len as usize];
    input.read_exact(&mut cf).map_err(|e| e.to_string())?;
    let cf = String::from_utf8(cf).map_err(|e| e.to_string())?;
    Ok((cf, read_bytes(input)?, read_bytes(input)?))
}

/// Reads an array of integers 0–255 (or a `bin`) into bytes.
fn read_bytes(input: &mut BufReader<File>) -> Result<Vec<u8>, String> {
    use std::io::BufRead;
    let marker = rmp::decode::read_marker(input).map_err(|e| format!("{e:?}"))?;
    let n = match marker {
        rmp::Marker::FixArray(n) => u32::from(n),
        rmp::Marker::Array16 => read_be::<2>(input)?,
        rmp::Marker::Array32 => read_be::<4>(input)?,
        rmp::Marker::Bin8 | rmp::Marker::Bin16 | rmp::Marker::Bin32 => {
            let n = match marker {
                rmp::Marker::Bin8 => read_be::<1>(input)?,
                rmp::Marker::Bin16 => read_be::<2>(input)?,
                _ => read_be::<4>(input)?,
            };
            let mut out = vec![0u8; n as usize];
            input.read_exact(&mut out).map_err(|e| e.to_string())?;
            return Ok(out);
        }
        other => return Err(format!("bytes expected, found {other:?}")),
    } as usize;
    // The length comes from the file: grow as bytes arrive rather than trust it.
    let mut out = Vec::with_capacity(n.min(1 << 20));
    while out.len() < n {
        let buf = input.fill_buf().map_err(|e| e.to_string())?;
        if buf.is_empty() {
            return Err("the file ends inside a row".into());
        }
        let mut i = 0;
        while i < buf.len() && out.len() < n {
            match buf[i] {
                b @ 0..=0x7f => {
                    out.push(b);
                    i += 1;
                }
                0xcc if i + 1 < buf.len() => {
                    out.push(buf[i + 1]);
                    i += 2;
                }
                0xcc => break,
                other => return Err(format!("a byte encoded as marker {other:#04x}")),
            }
        }
        input.consume(i);
        if i == 0 {
            // A `uint 8` split across the buffer's end.
            let mut two = [0u8; 2];
            input.read_exact(&mut two).map_err(|e| e.to_string())?;
            out.push(two[1]);
        }
    }
    Ok(out)
}

fn read_be<const N: usize>(input: &mut impl Read) -> Result<u32, String> {
    let mut buf = [0u8; N];
    input.read_exact(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)))
}

impl Iterator for Reader {
    type Item = Result<(String, Vec<u8>, Vec<u8>), StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            if self.ended {
                return None;
            }
            self.ended = true;
            // Nothing may follow the last row: a longer file is not what was sent.
            let mut rest = [0u8; 1];
            return match self.input.read(&mut rest) {
                Ok(0) => None,
                Ok(_) => Some(Err(file_err(
                    &self.path,
                    "bytes after the last row: the file is damaged",
                ))),
                Err(e) => Some(Err(file_err(&self.path, e))),
            };
        }
        self.left -= 1;
        match read_row(&mut self.input) {
            Ok(row) => Some(Ok(row)),
            Err(e) => {
                self.left = 0;
                self.ended = true;
                Some(Err(file_err(
                    &self.path,
                    format!("a row cannot be read ({e}); the file is incomplete or damaged"),
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Op, PartitionRows, StoredMessage};
    use serde::Deserialize;
    use serde_bytes::ByteBuf;

    /// `users` users of `partition` with `per_user` messages of `body` bytes and a cursor.
    fn fill(store: &Store, partition: PartitionId, users: usize, per_user: u64, body: usize) {
        for u in 0..users {
            let user = format!("u{u}");
            let mut ops: Vec<Op> = (1..=per_user)
                .map(|seq| Op::Append {
                    partition,
                    user: user.clone(),
                    seq,
                    msg: StoredMessage {
                        id: format!("{user}-{seq}"),
                        ts: seq,
                        from: None,
                        body: ByteBuf::from(vec![(seq % 251) as u8 | 0x80; body]),
                    },
                })
                .collect();
            ops.push(Op::Cursor {
                partition,
                user: user.clone(),
                device: "phone".into(),
                acked: per_user / 2,
            });
            store.apply(&ops, false).unwrap();
        }
    }

    fn write(store: &Store, partition: PartitionId) -> Written {
        write_partition(store, partition, &["applied"], |values| {
            assert_eq!(values.len(), 1);
            Ok((rmp_serde::to_vec_named("the meta").unwrap(), "s1".into()))
        })
        .unwrap()
    }

    /// The previous release's snapshot value.
    #[derive(Deserialize)]
    struct OneValue {
        meta: String,
        rows: PartitionRows,
    }

    #[test]
    fn a_snapshot_file_streams_a_partition_and_reads_as_the_previous_single_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fill(&store, 3, 20, 30, 100);
        fill(&store, 4, 5, 5, 10);
        let written = write(&store, 3);
        let expected = store.export_partition(3).unwrap();
        assert_eq!(written.rows, expected.len() as u64);
        assert_eq!(
            written.path,
            snapshot_path(&store.snapshot_dir(), 3, "s1", SNAPSHOT_EXT)
        );
        let read: Vec<_> = Reader::open(&written.path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            read, expected,
            "the file holds partition 3's rows, in order"
        );
        // A release that kept the snapshot as one value reads the same bytes, and this
        // one reads a value encoded as that release did.
        let bytes = fs::read(&written.path).unwrap();
        let one: OneValue = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(one.meta, "the meta");
        assert_eq!(one.rows, expected);
        #[derive(serde::Serialize)]
        struct Old<'a> {
            meta: &'a str,
            rows: &'a PartitionRows,
        }
        let old = snapshot_path(&store.snapshot_dir(), 3, "old", SNAPSHOT_EXT);
        fs::write(
            &old,
            rmp_serde::to_vec_named(&Old {
                meta: "m",
                rows: &expected,
            })
            .unwrap(),
        )
        .unwrap();
        let read: Vec<_> = Reader::open(&old)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(read, expected);
    }

    #[test]
    fn a_cut_or_lengthened_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fill(&store, 3, 4, 10, 50);
        let written = write(&store, 3);
        let bytes = fs::read(&written.path).unwrap();
        let rows = |path: &Path| -> Result<Vec<_>, StorageError> {
            Reader::open(path)?.collect::<Result<Vec<_>, _>>()
        };
        fs::write(&written.path, &bytes[..bytes.len() - 7]).unwrap();
        let err = rows(&written.path).unwrap_err().to_string();
        assert!(
            err.contains("incomplete or damaged") && err.contains("p00003-s1.snap"),
            "{err}"
        );
        let mut longer = bytes.clone();
        longer.push(0xc0);
        fs::write(&written.path, &longer).unwrap();
        let err = rows(&written.path).unwrap_err().to_string();
        assert!(err.contains("bytes after the last row"), "{err}");
        fs::write(&written.path, b"\x92\xa4junk").unwrap();
        let err = rows(&written.path).unwrap_err().to_string();
        assert!(err.contains("not a snapshot file"), "{err}");
        fs::write(&written.path, &bytes).unwrap();
        assert_eq!(rows(&written.path).unwrap().len() as u64, written.rows);
    }

    #[test]
    fn a_streamed_import_replaces_the_partition_and_keeps_its_marker_until_done() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        // More than one import write: 6 MiB of bodies.
        fill(&a, 3, 12, 8, 64 << 10);
        let written = write(&a, 3);
        let b = Store::open(&dir.path().join("b")).unwrap();
        fill(&b, 3, 3, 40, 10);
        fill(&b, 4, 2, 3, 10);
        let other = b.export_partition(4).unwrap();
        let marker = ("installing", b"file".to_vec());
        let meta = [("applied", b"42".to_vec())];

        // Cut short after the first write (about 4 MiB of rows): the marker stays, the
        // partition is half written.
        let cut = Reader::open(&written.path)
            .unwrap()
            .take(70)
            .chain([Err(StorageError::File {
                path: "x".into(),
                message: "stopped".into(),
            })]);
        assert!(b
            .import_partition_streamed(3, cut, marker.clone(), &meta)
            .is_err());
        assert_eq!(
            b.raft_meta_get(3, "installing").unwrap(),
            Some(b"file".to_vec())
        );
        let half = b.export_partition(3).unwrap().len() as u64;
        assert!(
            half > 0 && half < written.rows,
            "{half} of {} rows",
            written.rows
        );

        let count = b
            .import_partition_streamed(3, Reader::open(&written.path).unwrap(), marker, &meta)
            .unwrap();
        assert_eq!(count, written.rows);
        assert_eq!(
            b.export_partition(3).unwrap(),
            a.export_partition(3).unwrap()
        );
        assert_eq!(
            b.export_partition(4).unwrap(),
            other,
            "other partitions stay"
        );
        assert_eq!(b.raft_meta_get(3, "installing").unwrap(), None);
        assert_eq!(b.raft_meta_get(3, "applied").unwrap(), Some(b"42".to_vec()));

        // A row of another partition is refused.
        let stray = [Ok(("msgs".to_string(), vec![0, 4, 1], vec![1]))];
        let err = b
            .import_partition_streamed(3, stray, ("installing", vec![]), &[])
            .unwrap_err();
        assert!(err.to_string().contains("outside partition 3"), "{err}");
    }

    #[test]
    fn unfinished_files_go_when_the_database_opens_and_a_dropped_partition_takes_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fill(&store, 3, 2, 2, 10);
        fill(&store, 4, 2, 2, 10);
        let three = write(&store, 3).path;
        let four = write(&store, 4).path;
        let (part, _) = receiving_file(&store.snapshot_dir(), 3).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(
            !part.exists(),
            "a half-received snapshot is removed at open"
        );
        assert!(three.exists() && four.exists());
        store.drop_partition(3).unwrap();
        assert!(
            !three.exists(),
            "the dropped partition's snapshot goes with it"
        );
        assert!(four.exists());
        store.wipe().unwrap();
        assert!(!four.exists());
    }
}
