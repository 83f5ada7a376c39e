//! The threads that serve the client port's connections.
//!
//! Each runs a single-threaded runtime; a connection accepted on the client port is handed
//! to one of them (round robin) and lives there: its reads, its writes, its timers, its
//! publishes. An idle device's ping then wakes one thread and nothing else. On the node's
//! multi-threaded runtime a ping that arrived beside another woke a second worker to help,
//! which found nothing to do and parked again: at 3,000 pings a second, one node spent
//! about twice the CPU with two worker threads as with one (docs/benchmarks.md). Mailboxes,
//! storage, the cluster and HTTP stay on the multi-threaded runtime.
//!
//! A quiet connection's socket is watched by another thread, `warbler-io-quiet`, that looks
//! at its sockets every [`QUIET_POLL`] instead of at once (see [`Watched`]). Idle devices
//! ping at scattered moments; woken for each, an IO thread spent about 100 us of CPU per
//! ping on a machine of 2 cores, most of it the wake-up of a parked thread. Looked at
//! together, the pings of a poll share one wake-up of each thread.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How often the quiet connections' sockets are looked at: the longest a quiet device's
/// first frame (a ping, or a publish after a quiet spell) waits before it is read.
/// Deliveries to a quiet device are not delayed: they are written at once, and the socket
/// moves back to its IO thread.
pub const QUIET_POLL: Duration = Duration::from_millis(50);

/// See the module documentation.
pub struct IoThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// The runtime whose reactor watches quiet connections' sockets; it runs no task.
    quiet: Handle,
    stop: CancellationToken,
}

/// How many IO threads `configured` asks for: itself, or for 0 one per four cores, and at
/// least two on a machine of two cores or more.
///
/// One thread serves every socket of its connections, and a busy node's socket work (reads,
/// writes, the kernel's TCP) is about half its CPU: on two cores a single IO thread became
/// the queue that late deliveries waited in, running or waiting for a core nearly all the
/// time. One node on two cores at 13,500 msgs/s (half its maximum), four pairs of runs: p99
/// publish→deliver 21–29 ms with two IO threads against 28–50 ms with one, and a closed-loop
/// maximum 7% higher (docs/benchmarks.md, session 51).
pub fn io_thread_count(configured: u32) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    io_threads_for(configured, cores)
}

fn io_threads_for(configured: u32, cores: usize) -> usize {
    if configured > 0 {
        return configured as usize;
    }
    (cores / 4).max(2).min(cores.max(1))
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
        // Before each wait for its sockets, the quiet thread sleeps one poll: what became
        // ready meanwhile is taken in one go.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .on_thread_park(|| std::thread::sleep(QUIET_POLL))
            .build()?;
        let quiet = rt.handle().clone();
        let stop_quiet = stop.clone();
        std::thread::Builder::new()
            .name("warbler-io-quiet".into())
            .spawn(move || rt.block_on(stop_quiet.cancelled()))?;
        Ok(IoThreads {
            handles,
            next: AtomicUsize::new(0),
            quiet,
            stop,
        })
    }

    /// The reactor that watches quiet connections.
    pub fn quiet_handle(&self) -> Handle {
        self.quiet.clone()
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

/// A client socket watched by its IO thread while the connection is busy and by the quiet
/// thread while it is quiet (`quiet` set: only pings since the last sign of life, see
/// [`warbler_actors::OutSender::set_quiet`]). The connection's task stays on its IO thread
/// either way; only the registration moves, on the next read or write after `quiet`
/// changed (a delivery clears it and is written at once). A socket that is ready when it
/// moves is reported ready by its new watcher, so nothing waits for a second event.
pub struct Watched {
    stream: Option<TcpStream>,
    on_quiet: bool,
    quiet: Arc<AtomicBool>,
    quiet_watcher: Handle,
    /// The IO thread's runtime.
    own: Handle,
}

impl Watched {
    /// Wraps `stream`, registered with the current (the IO thread's) runtime.
    pub fn new(stream: TcpStream, quiet: Arc<AtomicBool>, quiet_watcher: Handle) -> Watched {
        Watched {
            stream: Some(stream),
            on_quiet: false,
            quiet,
            quiet_watcher,
            own: Handle::current(),
        }
    }

    /// The stream, registered where `quiet` says. A move drops what waited on the old
    /// registration (the other direction's waker), so the task is woken to poll both again.
    fn settled(&mut self, cx: &Context<'_>) -> io::Result<&mut TcpStream> {
        let want = self.quiet.load(Ordering::Relaxed);
        if want != self.on_quiet {
            let std = self
                .stream
                .take()
                .ok_or_else(lost_between_watchers)?
                .into_std()?;
            let _in = if want {
                self.quiet_watcher.enter()
            } else {
                self.own.enter()
            };
            self.stream = Some(TcpStream::from_std(std)?);
            self.on_quiet = want;
            cx.waker().wake_by_ref();
            metrics::counter!("warbler_connection_moves_total", "to" => if want { "quiet" } else { "busy" })
                .increment(1);
        }
        self.stream.as_mut().ok_or_else(lost_between_watchers)
    }
}

/// A move of the socket's registration failed half-way (`into_std` or `from_std`): the
/// connection is over.
fn lost_between_watchers() -> io::Error {
    io::Error::other("the socket was lost moving between watchers")
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().settled(cx) {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().settled(cx) {
            Ok(s) => Pin::new(s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().settled(cx) {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().settled(cx) {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::io_threads_for;

    #[test]
    fn two_io_threads_from_two_cores_then_one_per_four() {
        let by_cores: Vec<usize> = [1, 2, 3, 4, 8, 12, 16, 64]
            .iter()
            .map(|&cores| io_threads_for(0, cores))
            .collect();
        assert_eq!(by_cores, vec![1, 2, 2, 2, 2, 3, 4, 16]);
        // A configured count is taken as it is, whatever the machine.
        assert_eq!(io_threads_for(3, 2), 3);
        assert_eq!(io_threads_for(1, 64), 1);
    }
}
