//! The threads that serve the client port's connections.
//!
//! Each runs a single-threaded runtime; a connection accepted on the client port is handed
//! to one of them (round robin) and lives there: its reads, its writes, its timers, its
//! publishes. An idle device's ping then wakes one thread and nothing else. On the node's
//! multi-threaded runtime a ping that arrived beside another woke a second worker to help,
//! which found nothing to do and parked again: at 3,000 pings a second, one node spent
//! about twice the CPU with two worker threads as with one (docs/benchmarks.md). Mailboxes,
//! storage, the cluster and HTTP stay on the multi-threaded runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// See the module documentation.
pub struct IoThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
}

/// How many IO threads `configured` asks for: itself, or for 0 one per four cores (at
/// least one).
pub fn io_thread_count(configured: u32) -> usize {
    if configured > 0 {
        return configured as usize;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 4).max(1)
}

impl IoThreads {
    /// Starts `n` threads (at least one).
    pub fn start(n: usize) -> std::io::Result<IoThreads> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("warbler-io-{i}"))
                .spawn(move || rt.block_on(stop.cancelled()))?;
        }
        Ok(IoThreads {
            handles,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// Runs `task` on the next thread. A socket it takes must be registered there: pass a
    /// `std` socket and make the tokio one inside `task`.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(task);
    }

    /// Stops the threads; connections still on them are dropped.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}
