//! The data directory's free space: below `storage.min_free_bytes` the node refuses new
//! publishes with `storage_full` and is not ready, before RocksDB runs out of space and
//! fails. It serves again by itself once space is freed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often free space is measured.
pub const DISK_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// Free space of the filesystem holding the data directory, as last measured.
pub struct DiskSpace {
    dir: PathBuf,
    /// Told too, so that a partition's leader refuses publishes for its own disk.
    store: Option<warbler_storage::Store>,
    min_free: u64,
    free: AtomicU64,
    full: AtomicBool,
}

/// Bytes an unprivileged writer may still use on the filesystem of `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a writable statvfs.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

impl DiskSpace {
    /// Measures once; `min_free` 0 turns the check off. `store` learns the verdict.
    pub fn new(dir: &Path, min_free: u64, store: Option<warbler_storage::Store>) -> Arc<DiskSpace> {
        let disk = Arc::new(DiskSpace {
            dir: dir.to_path_buf(),
            store,
            min_free,
            free: AtomicU64::new(u64::MAX),
            full: AtomicBool::new(false),
        });
        disk.refresh();
        disk
    }

    /// Measures again, logging when the node starts or stops refusing publishes.
    pub fn refresh(&self) {
        let free = match free_bytes(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot measure the data directory's free space");
                return;
            }
        };
        self.free.store(free, Ordering::Relaxed);
        metrics::gauge!("warbler_storage_free_bytes").set(free as f64);
        let full = self.min_free > 0 && free < self.min_free;
        let was = self.full.swap(full, Ordering::Relaxed);
        metrics::gauge!("warbler_storage_full").set(if full { 1.0 } else { 0.0 });
        if let Some(store) = &self.store {
            store.set_low_space(self.check().err());
        }
        match (was, full) {
            (false, true) => tracing::error!(
                dir = %self.dir.display(), free, min_free = self.min_free,
                "the data directory's disk is almost full: refusing publishes with storage_full until space is freed"
            ),
            (true, false) => tracing::warn!(
                dir = %self.dir.display(), free,
                "space was freed on the data directory's disk: taking publishes again"
            ),
            _ => {}
        }
    }

    /// `Err(message)` while free space is below the watermark.
    pub fn check(&self) -> Result<(), String> {
        if !self.full.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(format!(
            "the node's disk is full: {} bytes free under {}, below storage.min_free_bytes ({}); nothing is lost, retry later or on another node (operators: free space or grow the volume)",
            self.free.load(Ordering::Relaxed),
            self.dir.display(),
            self.min_free
        ))
    }

    /// Measures every [`DISK_CHECK_PERIOD`] until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = warbler_cluster::grid::interval(DISK_CHECK_PERIOD);
        while stop.run_until_cancelled(tick.tick()).await.is_some() {
            let disk = self.clone();
            let _ = tokio::task::spawn_blocking(move || disk.refresh()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_the_watermark_publishes_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let fine = DiskSpace::new(dir.path(), 1, None);
        assert!(fine.check().is_ok());
        let off = DiskSpace::new(dir.path(), 0, None);
        assert!(off.check().is_ok(), "0 turns the check off");
        let full = DiskSpace::new(dir.path(), u64::MAX, None);
        let why = full.check().unwrap_err();
        assert!(why.contains("storage.min_free_bytes"), "{why}");
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
