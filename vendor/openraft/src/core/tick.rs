//! tick emitter emits a `RaftMsg::Tick` event at a certain interval.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::Either;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tracing::Instrument;
use tracing::Level;
use tracing::Span;

use crate::core::notify::Notify;
use crate::type_config::alias::JoinHandleOf;
use crate::type_config::TypeConfigExt;
use crate::RaftTypeConfig;

/// Emit RaftMsg::Tick event at regular `interval`.
pub(crate) struct Tick<C>
where C: RaftTypeConfig
{
    interval: Duration,

    tx: mpsc::UnboundedSender<Notify<C>>,

    /// Emit event or not
    enabled: Arc<AtomicBool>,

    /// Wakes a disabled ticker when it is enabled again (Warbler's patch 5).
    wake: Arc<tokio::sync::Notify>,

    /// How many times the loop woke (tests).
    #[cfg(test)]
    wakes: Arc<std::sync::atomic::AtomicU64>,
}

pub(crate) struct TickHandle<C>
where C: RaftTypeConfig
{
    enabled: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    #[cfg(test)]
    wakes: Arc<std::sync::atomic::AtomicU64>,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    join_handle: Mutex<Option<JoinHandleOf<C, ()>>>,
}

impl<C> Drop for TickHandle<C>
where C: RaftTypeConfig
{
    /// Signal the tick loop to stop, without waiting for it to stop.
    fn drop(&mut self) {
        if self.shutdown.lock().unwrap().is_none() {
            return;
        }
        let _ = self.shutdown();
    }
}

impl<C> Tick<C>
where C: RaftTypeConfig
{
    pub(crate) fn spawn(interval: Duration, tx: mpsc::UnboundedSender<Notify<C>>, enabled: bool) -> TickHandle<C> {
        let enabled = Arc::new(AtomicBool::from(enabled));
        let wake = Arc::new(tokio::sync::Notify::new());
        #[cfg(test)]
        let wakes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let this = Self {
            interval,
            enabled: enabled.clone(),
            tx,
            wake: wake.clone(),
            #[cfg(test)]
            wakes: wakes.clone(),
        };

        let (shutdown, shutdown_rx) = oneshot::channel();

        let shutdown = Mutex::new(Some(shutdown));

        let join_handle = C::spawn(this.tick_loop(shutdown_rx).instrument(tracing::span!(
            parent: &Span::current(),
            Level::DEBUG,
            "tick"
        )));

        TickHandle {
            enabled,
            wake,
            #[cfg(test)]
            wakes,
            shutdown,
            join_handle: Mutex::new(Some(join_handle)),
        }
    }

    pub(crate) async fn tick_loop(self, cancel_rx: oneshot::Receiver<()>) {
        let mut i = 0;

        let mut cancel = std::pin::pin!(cancel_rx);

        loop {
            #[cfg(test)]
            self.wakes.fetch_add(1, Ordering::Relaxed);
            // A disabled ticker sleeps until it is enabled again instead of waking every
            // interval to find nothing to do: in Warbler every quiet group's ticker is
            // disabled, and an idle node has dozens of them (Warbler's patch 5). The first
            // tick after it is enabled comes one interval later.
            if !self.enabled.load(Ordering::Relaxed) {
                let enabled = self.wake.notified();
                let mut enabled = std::pin::pin!(enabled);
                enabled.as_mut().enable();
                if !self.enabled.load(Ordering::Relaxed) {
                    if let Either::Left(_) = futures::future::select(cancel.as_mut(), enabled).await {
                        tracing::info!("TickLoop received cancel signal, quit");
                        return;
                    }
                    continue;
                }
            }

            let at = C::now() + self.interval;
            let sleep_fut = C::sleep_until(at);
            let sleep_fut = std::pin::pin!(sleep_fut);
            let cancel_fut = cancel.as_mut();

            match futures::future::select(cancel_fut, sleep_fut).await {
                Either::Left((_canceled, _)) => {
                    tracing::info!("TickLoop received cancel signal, quit");
                    return;
                }
                Either::Right((_, _)) => {
                    // sleep done
                }
            }

            if !self.enabled.load(Ordering::Relaxed) {
                continue;
            }

            i += 1;

            let now = C::now();
            let late = if now > at { now - at } else { Duration::ZERO };
            let send_res = self.tx.send(Notify::Tick { i, late });
            if let Err(_e) = send_res {
                tracing::info!("Stopping tick_loop(), main loop terminated");
                break;
            } else {
                tracing::debug!("Tick sent: {}", i)
            }
        }
    }
}

impl<C> TickHandle<C>
where C: RaftTypeConfig
{
    pub(crate) fn enable(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
        if enabled {
            self.wake.notify_one();
        }
    }

    /// Signal the tick loop to stop. And return a JoinHandle to wait for the loop to stop.
    ///
    /// If it is called twice, the second call will return None.
    pub(crate) fn shutdown(&self) -> Option<JoinHandleOf<C, ()>> {
        {
            let shutdown = {
                let mut x = self.shutdown.lock().unwrap();
                x.take()
            };

            if let Some(shutdown) = shutdown {
                let send_res = shutdown.send(());
                tracing::info!("Timer shutdown signal sent: {send_res:?}");
            } else {
                tracing::warn!("Double call to Raft::shutdown()");
            }
        }

        let jh = {
            let mut x = self.join_handle.lock().unwrap();
            x.take()
        };
        jh
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use tokio::time::Duration;

    use crate::core::Tick;
    use crate::type_config::TypeConfigExt;
    use crate::RaftTypeConfig;
    use crate::TokioRuntime;

    #[derive(Debug, Clone, Copy, Default, Eq, PartialEq, Ord, PartialOrd)]
    #[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
    pub(crate) struct TickUTConfig {}
    impl RaftTypeConfig for TickUTConfig {
        type D = ();
        type R = ();
        type NodeId = u64;
        type Node = ();
        type Entry = crate::Entry<TickUTConfig>;
        type SnapshotData = Cursor<Vec<u8>>;
        type AsyncRuntime = TokioRuntime;
        type Responder = crate::impls::OneshotResponder<Self>;
    }

    // AsyncRuntime::spawn is `spawn_local` with singlethreaded enabled.
    // It will result in a panic:
    // `spawn_local` called from outside of a `task::LocalSet`.
    #[cfg(not(feature = "singlethreaded"))]
    #[tokio::test]
    async fn test_shutdown() -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let th = Tick::<TickUTConfig>::spawn(Duration::from_millis(100), tx, true);

        TickUTConfig::sleep(Duration::from_millis(500)).await;
        let _ = th.shutdown().unwrap().await;
        TickUTConfig::sleep(Duration::from_millis(500)).await;

        let mut received = vec![];
        while let Some(x) = rx.recv().await {
            received.push(x);
        }

        assert!(
            received.len() < 10,
            "no more tick will be received after shutdown: {}",
            received.len()
        );

        Ok(())
    }

    /// A disabled ticker sends nothing and does not wake; it ticks again once enabled, and
    /// can be shut down while disabled (Warbler's patch 5).
    #[cfg(not(feature = "singlethreaded"))]
    #[tokio::test]
    async fn test_disabled_ticker_waits_for_enable() -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let th = Tick::<TickUTConfig>::spawn(Duration::from_millis(20), tx, true);
        TickUTConfig::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_ok(), "an enabled ticker ticks");

        th.enable(false);
        TickUTConfig::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        let woke = th.wakes.load(std::sync::atomic::Ordering::Relaxed);
        TickUTConfig::sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "a disabled ticker sends nothing");
        let idle_wakes = th.wakes.load(std::sync::atomic::Ordering::Relaxed) - woke;
        assert_eq!(idle_wakes, 0, "a disabled ticker does not wake (every 20 ms before)");

        th.enable(true);
        TickUTConfig::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_ok(), "an enabled-again ticker ticks");

        th.enable(false);
        TickUTConfig::sleep(Duration::from_millis(50)).await;
        let _ = th.shutdown().unwrap().await;
        Ok(())
    }

    /// A tick tells how late it fired: a runtime that stalled (here its one thread blocked,
    /// as a paused or starved process is) sends its next tick with the stall's length, and
    /// a running one with next to nothing (Warbler's patch 6).
    #[cfg(not(feature = "singlethreaded"))]
    #[tokio::test]
    async fn test_a_tick_after_a_stall_says_how_late_it_is() -> anyhow::Result<()> {
        use crate::core::notify::Notify;

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let th = Tick::<TickUTConfig>::spawn(Duration::from_millis(50), tx, true);
        let late_of = |n: Notify<TickUTConfig>| match n {
            Notify::Tick { late, .. } => late,
            _ => panic!("only ticks are sent"),
        };

        let on_time = late_of(rx.recv().await.unwrap());
        assert!(on_time < Duration::from_millis(40), "{on_time:?}");

        std::thread::sleep(Duration::from_millis(600));
        let after_stall = late_of(rx.recv().await.unwrap());
        assert!(after_stall >= Duration::from_millis(400), "{after_stall:?}");

        let _ = th.shutdown().unwrap().await;
        Ok(())
    }
}
