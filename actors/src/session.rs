//! [`Session`]: one connected device, run by its connection's own task (no actor, no task of
//! its own: an idle device costs its connection and a few words here).
//!
//! It subscribes to its user's mailbox, which then queues deliveries straight onto the
//! connection's [`Outbox`](crate::outbox::Outbox); it forwards the client's cumulative acks;
//! when the mailbox stops (crash, failed write, leadership moved) or the leader moves, the
//! mailbox or the routing layer raises a [`Signal`] and the session subscribes again from
//! where its connection is. In a cluster the mailbox may run on another node (the
//! partition's leader): the session then subscribes through a stand-in there.

use std::net::SocketAddr;
use std::time::Duration;

use warbler_client::{ErrorCode, Frame};

use crate::error::MailboxError;
use crate::msg::{MailboxMsg, SubscribeInfo};
use crate::outbox::{OutSender, SessionRef, Signal};
use crate::registry::Mailboxes;
use warbler_cluster::Leader;

/// How long a session waits before retrying a failed re-subscribe: the first wait, which
/// doubles with each failure up to [`RESUBSCRIBE_RETRY_MAX`]. A new leader refuses until
/// it has applied its log, which takes milliseconds: a first wait of 250 ms held every
/// device of a failed-over partition that long.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(25);
/// Longest wait between a session's re-subscribe attempts.
const RESUBSCRIBE_RETRY_MAX: Duration = Duration::from_millis(250);
/// How long subscribing may take before the connection is refused.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the session's subscription is.
enum Upstream {
    /// This node's mailbox of the user (running, or asleep in the registry).
    Local,
    /// Through a stand-in on the leader at `addr`, known there by `key`.
    Remote { addr: SocketAddr, key: u64 },
}

/// One connected device; see the module documentation.
pub struct Session {
    user: String,
    device: String,
    mailboxes: Mailboxes,
    out: OutSender,
    upstream: Upstream,
    /// Highest seq the client acked.
    acked: u64,
    /// The wait before the next re-subscribe attempt if this one fails.
    retry: Duration,
}

impl Session {
    /// Subscribes the device (waiting up to 10 s for a leader elected meanwhile) and queues
    /// its `welcome`, then whatever the mailbox delivered meanwhile.
    pub async fn start(
        user: String,
        device: String,
        node: &str,
        mailboxes: Mailboxes,
        out: &OutSender,
    ) -> Result<Session, MailboxError> {
        out.hold();
        let port = out.session();
        let give_up = std::time::Instant::now() + SUBSCRIBE_TIMEOUT;
        let (upstream, info) = loop {
            match subscribe(&mailboxes, &user, &device, &port, None).await {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < give_up && e.is_transient() => {
                    tokio::time::sleep(RESUBSCRIBE_RETRY_MAX).await;
                }
                Err(e) => {
                    out.end_session();
                    return Err(e);
                }
            }
        };
        metrics::gauge!("warbler_sessions_alive").increment(1.0);
        // From here on, dropping it ends the subscription.
        let session = Session {
            user,
            device,
            mailboxes,
            out: out.clone(),
            upstream,
            acked: info.acked,
            retry: RESUBSCRIBE_RETRY,
        };
        let welcome = Frame::Welcome {
            user: session.user.clone(),
            device: session.device.clone(),
            node: node.to_string(),
            acked: info.acked,
        };
        out.welcome(welcome, info.acked)
            .map_err(|_| MailboxError::Restarted)?;
        Ok(session)
    }

    /// The client acknowledged every seq up to `seq` (at most what was queued to it):
    /// passed on to the mailbox, wherever it runs. A mailbox on this node reads it from the
    /// connection's outbox when it runs anyway, and gets a message only when it asked for
    /// one (it waits for this ack).
    pub fn ack(&mut self, seq: u64) {
        if seq <= self.acked {
            return;
        }
        self.acked = seq;
        let wanted = self.out.record_ack(seq);
        match &self.upstream {
            Upstream::Local => {
                if !wanted {
                    return;
                }
                let ack = MailboxMsg::Ack {
                    device: self.device.clone(),
                    session: self.out.session().id(),
                    seq,
                };
                self.mailboxes.tell(&self.user, ack);
            }
            Upstream::Remote { addr, key } => {
                if let Some(r) = self.mailboxes.routing() {
                    r.ack_remote(*addr, *key, seq);
                }
            }
        }
    }

    /// Acts on raised signals. `Some(frame)`: the session is over; the frame says why.
    pub async fn on_signals(&mut self, signals: Vec<Signal>) -> Option<Frame> {
        for signal in signals {
            match signal {
                Signal::Replaced => {
                    let message = format!(
                        "device {:?} connected again elsewhere; this connection is closed",
                        self.device
                    );
                    return Some(Frame::error(ErrorCode::Replaced, message, None));
                }
                Signal::Resubscribe => self.resubscribe().await,
                Signal::CheckRoute => {
                    if !self.follows_leader() {
                        self.resubscribe().await;
                    }
                }
            }
        }
        None
    }

    fn unsubscribe(&mut self) {
        match &self.upstream {
            Upstream::Local => {
                let msg = MailboxMsg::Unsubscribe {
                    device: self.device.clone(),
                    session: self.out.session().id(),
                };
                self.mailboxes.tell(&self.user, msg);
            }
            Upstream::Remote { addr, key } => {
                if let Some(r) = self.mailboxes.routing() {
                    r.unsubscribe_remote(*addr, *key, self.acked);
                }
            }
        }
    }

    /// Subscribes again (the mailbox stopped or the leader moved), resuming after what was
    /// already queued to the connection.
    async fn resubscribe(&mut self) {
        self.unsubscribe();
        let resume = Some((self.acked, self.out.sent()));
        let port = self.out.session();
        match subscribe(&self.mailboxes, &self.user, &self.device, &port, resume).await {
            Ok((upstream, _)) => {
                tracing::debug!(user = %self.user, device = %self.device, "re-subscribed");
                metrics::counter!("warbler_resubscribes_total").increment(1);
                self.upstream = upstream;
                self.retry = RESUBSCRIBE_RETRY;
            }
            Err(e) => {
                tracing::debug!(user = %self.user, error = %e, retry = ?self.retry, "re-subscribe failed; retrying");
                self.out.signal_after(self.retry, Signal::Resubscribe);
                self.retry = (self.retry * 2).min(RESUBSCRIBE_RETRY_MAX);
            }
        }
    }

    /// Whether the subscription is with the user's current leader (no leader known counts
    /// as yes: keep what there is until one is elected).
    fn follows_leader(&self) -> bool {
        match (&self.upstream, self.mailboxes.leader_of(&self.user)) {
            (Upstream::Local, Leader::Local) => true,
            (Upstream::Remote { addr, .. }, Leader::Remote { addr: a, .. }) => *addr == a,
            (_, Leader::Unknown(_)) => true,
            _ => false,
        }
    }
}

/// Dropped with its connection: the subscription ends (acks forwarded before stay ahead of
/// the unsubscribe).
impl Drop for Session {
    fn drop(&mut self) {
        self.out.end_session();
        self.unsubscribe();
        metrics::gauge!("warbler_sessions_alive").decrement(1.0);
    }
}

async fn subscribe(
    mailboxes: &Mailboxes,
    user: &str,
    device: &str,
    port: &SessionRef,
    resume: Option<(u64, u64)>,
) -> Result<(Upstream, SubscribeInfo), MailboxError> {
    match mailboxes.leader_of(user) {
        Leader::Local => {}
        Leader::Remote { addr, .. } => {
            let routing = mailboxes
                .routing()
                .expect("a remote leader implies routing");
            let partition = mailboxes.partition_of(user);
            let (key, info) = routing
                .subscribe_remote(addr, partition, user, device, port.clone(), resume)
                .await?;
            return Ok((Upstream::Remote { addr, key }, info));
        }
        Leader::Unknown(why) => return Err(MailboxError::NoLeader(why)),
    }
    let info = mailboxes
        .subscribe_local(user, device, port.clone(), resume)
        .await?;
    Ok((Upstream::Local, info))
}
