/// Storage failures. Callers match on them: `Poisoned` and `Io` mean the node must stop
/// accepting writes; `Corrupt` means an invariant check found damage.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("RocksDB error: {0}")]
    Rocks(String),
    #[error("cannot open the database in {path}: {message}; check that the directory is writable and not used by another warbler process")]
    Open { path: String, message: String },
    #[error("an earlier write failed ({0}); this node refuses writes until it is restarted")]
    Poisoned(String),
    #[error("the write queue is closed: the node is shutting down")]
    Closed,
    #[error("snapshot file {path}: {message}")]
    File { path: String, message: String },
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    #[error("this node cannot write partition {partition} now: {reason}")]
    NotWritable { partition: u16, reason: String },
}

impl From<rocksdb::Error> for StorageError {
    fn from(e: rocksdb::Error) -> Self {
        StorageError::Rocks(e.into_string())
    }
}
