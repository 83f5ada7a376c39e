//! A session survives its mailbox dying: it re-subscribes to the restarted mailbox from
//! where it was, and the connection (here: its writer queue) never notices.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorStatus};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warbler_actors::{DeviceSession, MailboxLimits, Mailboxes, RegistryArgs, SessionArgs};
use warbler_client::Frame;
use warbler_storage::{Committer, CommitterLimits, LocalLog, Store};

async fn next(rx: &mut mpsc::Receiver<Frame>) -> Frame {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a frame within 5 s")
        .expect("queue open")
}

/// Mailboxes over a single-node log in a fresh directory, with their store and directory.
struct Fixture {
    mailboxes: Mailboxes,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Stops every mailbox and closes the database here, before the test ends: the
    /// committer thread must not hold it while the process exits.
    async fn close(self) {
        self.mailboxes.stop();
        let start = std::time::Instant::now();
        while self.store.handles() > 1 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the database still has {} handles 5 s after the mailboxes stopped",
                self.store.handles()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn single_node_mailboxes() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let limits = CommitterLimits {
        batch_records_max: 64,
        batch_bytes_max: 1 << 20,
        queue_max: 64,
        sync: true,
    };
    let log = Arc::new(LocalLog::new(Committer::start(store.clone(), limits)));
    let (mailboxes, _) = Mailboxes::start(RegistryArgs {
        store: store.clone(),
        log,
        limits: MailboxLimits {
            inflight_max: 16,
            tail_cache_max: 8,
            idle_timeout: Duration::from_secs(60),
            unacked_max: 0,
        },
        partitions: 64,
    })
    .await
    .unwrap();
    Fixture {
        mailboxes,
        store,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_session_resubscribes_when_its_mailbox_dies() {
    let fixture = single_node_mailboxes().await;
    let mailboxes = fixture.mailboxes.clone();

    let (tx, mut rx) = mpsc::channel(64);
    let closed = CancellationToken::new();
    let args = SessionArgs {
        user: "u".into(),
        device: "d".into(),
        node: "n".into(),
        mailboxes: mailboxes.clone(),
        out: tx,
        closed: closed.clone(),
        delivered: Default::default(),
    };
    let (_session, _) = Actor::spawn(None, DeviceSession, args).await.unwrap();
    assert!(matches!(
        next(&mut rx).await,
        Frame::Welcome { acked: 0, .. }
    ));
    assert_eq!(
        mailboxes
            .publish("u", "a", ByteBuf::from(b"1".to_vec()), None)
            .await
            .unwrap(),
        1
    );
    assert!(matches!(next(&mut rx).await, Frame::Msg { seq: 1, .. }));

    let old = mailboxes.get("u").await.unwrap();
    old.kill();
    while old.get_status() != ActorStatus::Stopped {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The restarted mailbox continues the sequence from storage, and the session gets the
    // next message without redelivery of seq 1.
    assert_eq!(
        mailboxes
            .publish("u", "b", ByteBuf::from(b"2".to_vec()), None)
            .await
            .unwrap(),
        2
    );
    assert!(matches!(next(&mut rx).await, Frame::Msg { seq: 2, .. }));
    assert!(!closed.is_cancelled(), "the connection stayed up");
    assert_ne!(mailboxes.get("u").await.unwrap().get_id(), old.get_id());
    fixture.close().await;
}

/// Stands in for a session: forwards the seqs of each delivered batch.
struct Probe;

impl Actor for Probe {
    type Msg = warbler_actors::SessionMsg;
    type State = mpsc::UnboundedSender<Vec<u64>>;
    type Arguments = mpsc::UnboundedSender<Vec<u64>>;

    async fn pre_start(
        &self,
        _me: ractor::ActorRef<Self::Msg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ractor::ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle(
        &self,
        _me: ractor::ActorRef<Self::Msg>,
        msg: Self::Msg,
        tx: &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        if let warbler_actors::SessionMsg::Deliver(batch) = msg {
            let _ = tx.send(batch.iter().map(|(s, _)| *s).collect());
        }
        Ok(())
    }
}

/// A session that re-subscribes continues from what it wrote to its connection, even when
/// the device's stored cursor is further along (acked through another connection, seen by
/// this one only as a stale cursor from a node that had lost touch). It gets the messages
/// in between again rather than a gap in its own stream.
#[tokio::test]
async fn a_resumed_subscription_continues_from_what_its_connection_was_sent() {
    let fixture = single_node_mailboxes().await;
    let mailboxes = fixture.mailboxes.clone();
    for i in 1..=5u64 {
        let id = format!("m{i}");
        let seq = mailboxes
            .publish("u", &id, ByteBuf::from(id.clone().into_bytes()), None)
            .await
            .unwrap();
        assert_eq!(seq, i);
    }
    // The first connection gets 1..5 and acks 3, durably.
    let (tx1, mut rx1) = mpsc::unbounded_channel();
    let (p1, _) = Actor::spawn(None, Probe, tx1).await.unwrap();
    let (mailbox, info) = mailboxes
        .subscribe_local("u", "d", p1.clone(), None)
        .await
        .unwrap();
    assert_eq!(info.acked, 0);
    assert_eq!(rx1.recv().await.unwrap(), vec![1, 2, 3, 4, 5]);
    mailbox
        .cast(warbler_actors::MailboxMsg::Ack {
            device: "d".into(),
            session: p1.get_id(),
            seq: 3,
        })
        .unwrap();
    let start = std::time::Instant::now();
    while mailboxes.devices_local("u").await.unwrap()[0].acked != 3 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the ack of 3 became durable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A connection that was told cursor 0 and has been sent nothing re-subscribes.
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    let (p2, _) = Actor::spawn(None, Probe, tx2).await.unwrap();
    mailboxes
        .subscribe_local("u", "d", p2, Some((0, 0)))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), rx2.recv())
        .await
        .expect("a delivery")
        .unwrap();
    assert_eq!(
        first,
        vec![1, 2, 3, 4, 5],
        "the resumed connection continues after what it was sent (0), not after the stored cursor (3)"
    );
    fixture.close().await;
}

/// A resume past what was committed (a member that means harm, or a bug) is clamped: the
/// device still gets what is published next instead of silently nothing.
#[tokio::test]
async fn a_resume_past_the_end_is_clamped_and_skips_nothing() {
    let fixture = single_node_mailboxes().await;
    let mailboxes = fixture.mailboxes.clone();
    mailboxes
        .publish("u", "m1", ByteBuf::from(b"1".to_vec()), None)
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (probe, _) = Actor::spawn(None, Probe, tx).await.unwrap();
    mailboxes
        .subscribe_local("u", "d", probe, Some((u64::MAX, u64::MAX)))
        .await
        .unwrap();
    let seq = mailboxes
        .publish("u", "m2", ByteBuf::from(b"2".to_vec()), None)
        .await
        .unwrap();
    assert_eq!(seq, 2);
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the next message is delivered")
        .unwrap();
    assert_eq!(
        got,
        vec![2],
        "resumed at the end of what was committed, then 2"
    );
    fixture.close().await;
}

/// The delivery window is bytes as well as messages: a device that does not ack is sent at
/// most 8 MiB of bodies (at least one message), not 256 messages of up to 512 KiB each.
#[tokio::test]
async fn a_device_that_does_not_ack_is_sent_at_most_8_mib() {
    let fixture = single_node_mailboxes().await;
    let mailboxes = fixture.mailboxes.clone();
    for i in 1..=20u64 {
        let body = ByteBuf::from(vec![b'x'; 1 << 20]);
        mailboxes
            .publish("big", &format!("m{i}"), body, None)
            .await
            .unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (probe, _) = Actor::spawn(None, Probe, tx).await.unwrap();
    let (mailbox, _) = mailboxes
        .subscribe_local("big", "d", probe.clone(), None)
        .await
        .unwrap();
    let mut sent = Vec::new();
    while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        sent.extend(batch);
    }
    assert_eq!(
        sent,
        (1..=8).collect::<Vec<u64>>(),
        "8 MiB of 1 MiB messages"
    );
    mailbox
        .cast(warbler_actors::MailboxMsg::Ack {
            device: "d".into(),
            session: probe.get_id(),
            seq: 3,
        })
        .unwrap();
    let mut more = Vec::new();
    while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        more.extend(batch);
    }
    assert_eq!(more, vec![9, 10, 11], "an ack of 3 makes room for 3 more");
    fixture.close().await;
}

/// The disk of the node that holds a mailbox is too full: its publishes are refused as
/// `StorageFull` (in a cluster, the partition leader's own disk), and taken again once the
/// space is back.
#[tokio::test]
async fn a_mailbox_refuses_publishes_while_its_disk_is_too_full() {
    let fixture = single_node_mailboxes().await;
    let mailboxes = fixture.mailboxes.clone();
    mailboxes
        .publish("u", "a", ByteBuf::from(b"1".to_vec()), None)
        .await
        .unwrap();
    fixture.store.set_low_space(Some("the disk is full".into()));
    let e = mailboxes
        .publish("u", "b", ByteBuf::from(b"2".to_vec()), None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, warbler_actors::MailboxError::StorageFull(ref w) if w == "the disk is full"),
        "{e}"
    );
    fixture.store.set_low_space(None);
    let seq = mailboxes
        .publish("u", "b", ByteBuf::from(b"2".to_vec()), None)
        .await
        .unwrap();
    assert_eq!(seq, 2, "nothing was taken while refused");
    fixture.close().await;
}
