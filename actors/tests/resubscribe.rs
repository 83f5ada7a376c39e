//! A session survives its mailbox stopping: it re-subscribes to the restarted mailbox from
//! where it was, and the connection (here: its writer queue) never notices. A mailbox whose
//! devices acknowledged everything sleeps, and the next publish wakes it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorStatus;
use serde_bytes::ByteBuf;
use warbler_actors::outbox::{Out, SessionRef};
use warbler_actors::{MailboxLimits, Mailboxes, OutReceiver, OutSender, Outbox, RegistryArgs};
use warbler_actors::{MailboxMsg, Session};
use warbler_client::Frame;
use warbler_storage::Store;

async fn next(rx: &mut OutReceiver) -> Frame {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a frame within 5 s")
        .expect("queue open")
        .into_frame()
}

/// A connection's queue, as a mailbox sees it.
fn port() -> (OutSender, OutReceiver, SessionRef) {
    let (tx, rx) = Outbox::channel(64);
    let session = tx.session();
    (tx, rx, session)
}

/// The seqs delivered to `rx` until nothing comes for `quiet`.
async fn delivered(rx: &mut OutReceiver, quiet: Duration) -> Vec<u64> {
    let mut seqs = Vec::new();
    while let Ok(Some(out)) = tokio::time::timeout(quiet, rx.recv()).await {
        if let Out::Msg(seq, _) = out {
            seqs.push(seq);
        }
    }
    seqs
}

/// Device "d" of user "u" connects; its welcome must carry `acked`.
async fn connect(mailboxes: &Mailboxes, acked: u64) -> (OutSender, OutReceiver, Session) {
    let (tx, mut rx) = Outbox::channel(64);
    let session = Session::start("u".into(), "d".into(), "n", mailboxes.clone(), &tx)
        .await
        .unwrap();
    match next(&mut rx).await {
        Frame::Welcome { acked: a, .. } => assert_eq!(a, acked, "the welcome's cursor"),
        other => panic!("expected a welcome, got {other:?}"),
    }
    (tx, rx, session)
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
        common::close(self.mailboxes, (), self.store).await;
    }
}

async fn single_node_mailboxes() -> Fixture {
    mailboxes_sleeping_after(Duration::ZERO).await
}

async fn mailboxes_sleeping_after(sleep_after: Duration) -> Fixture {
    mailboxes_with(sleep_after, Duration::ZERO).await
}

async fn mailboxes_with(sleep_after: Duration, cursor_flush: Duration) -> Fixture {
    let (log, store, dir) = common::local_log();
    let log = Arc::new(log);
    let (mailboxes, _) = Mailboxes::start(RegistryArgs {
        store: store.clone(),
        log,
        limits: MailboxLimits {
            inflight_max: 16,
            tail_cache_max: 8,
            idle_timeout: Duration::from_secs(60),
            sleep_after,
            cursor_flush,
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
async fn a_session_resubscribes_when_its_mailbox_stops() {
    let fixture = single_node_mailboxes().await;
    let mailboxes = fixture.mailboxes.clone();

    let (tx, mut rx, mut session) = connect(&mailboxes, 0).await;
    assert_eq!(
        mailboxes
            .publish("u", "a", ByteBuf::from(b"1".to_vec()), None)
            .await
            .unwrap(),
        1
    );
    assert!(matches!(next(&mut rx).await, Frame::Msg { seq: 1, .. }));

    session.ack(1);
    let old = mailboxes.get("u").await.unwrap();
    old.stop(Some("a test stops it".into()));
    while old.get_status() != ActorStatus::Stopped {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The connection's task acts on the mailbox's signal.
    let signals = tokio::time::timeout(Duration::from_secs(5), tx.signals())
        .await
        .expect("the stopped mailbox told its session");
    assert!(session.on_signals(signals).await.is_none());
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
    assert_ne!(mailboxes.get("u").await.unwrap().get_id(), old.get_id());
    drop(session);
    fixture.close().await;
}

/// Once its device acknowledged everything, a mailbox sleeps: its actor stops while the
/// device stays subscribed. The next publish wakes it and the device gets exactly the next
/// message; a device that leaves while its mailbox sleeps is forgotten.
#[tokio::test]
async fn a_quiet_mailbox_sleeps_and_the_next_publish_wakes_it_without_a_gap() {
    let fixture = mailboxes_sleeping_after(Duration::from_millis(100)).await;
    let mailboxes = fixture.mailboxes.clone();
    let publish = |id: &'static str| {
        let mailboxes = mailboxes.clone();
        async move {
            mailboxes
                .publish("u", id, ByteBuf::from(id.as_bytes().to_vec()), None)
                .await
                .unwrap()
        }
    };
    assert_eq!(publish("a").await, 1);
    let (tx, mut rx, mut session) = connect(&mailboxes, 0).await;
    assert!(matches!(next(&mut rx).await, Frame::Msg { seq: 1, .. }));
    // Not acknowledged yet: it stays awake however long that takes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        mailboxes.active_count().await,
        1,
        "awake while 1 is unacked"
    );
    session.ack(1);
    let start = std::time::Instant::now();
    while mailboxes.active_count().await != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the mailbox went to sleep once seq 1 was acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, id) in ["b", "c"].into_iter().enumerate() {
        assert_eq!(publish(id).await, i as u64 + 2);
    }
    assert_eq!(delivered(&mut rx, Duration::from_millis(300)).await, [2, 3]);
    session.ack(3);
    let devices = mailboxes.devices_local("u").await.unwrap();
    assert!(devices[0].online, "still subscribed after sleeping");

    // Asleep again, the device leaves: the sleeping mailbox forgets it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mailboxes.active_count().await, 0, "asleep again");
    drop(session);
    drop(tx);
    let start = std::time::Instant::now();
    loop {
        let devices = mailboxes.devices_local("u").await.unwrap();
        if !devices[0].online {
            assert_eq!(devices[0].acked, 3, "its last ack is kept");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the device went offline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fixture.close().await;
}

/// A device that has acknowledged everything stored subscribes without starting its user's
/// mailbox: it joins the sleeping subscribers, and the first publish wakes the mailbox and
/// reaches it. A second connection of the same device replaces the first there too.
#[tokio::test]
async fn a_device_with_nothing_to_receive_subscribes_without_starting_a_mailbox() {
    let fixture = mailboxes_sleeping_after(Duration::from_millis(100)).await;
    let mailboxes = fixture.mailboxes.clone();
    let (tx1, mut rx1) = Outbox::channel(64);
    let _first = Session::start("q".into(), "d".into(), "n", mailboxes.clone(), &tx1)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut rx1).await,
        Frame::Welcome { acked: 0, .. }
    ));
    let (tx, mut rx) = Outbox::channel(64);
    let _session = Session::start("q".into(), "d".into(), "n", mailboxes.clone(), &tx)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut rx).await,
        Frame::Welcome { acked: 0, .. }
    ));
    assert_eq!(mailboxes.active_count().await, 0, "no mailbox started");
    let signals = tokio::time::timeout(Duration::from_secs(5), tx1.signals())
        .await
        .expect("the first connection was told");
    assert_eq!(signals, [warbler_actors::Signal::Replaced]);
    let seq = mailboxes
        .publish("q", "m1", ByteBuf::from(b"1".to_vec()), None)
        .await
        .unwrap();
    assert_eq!(seq, 1);
    assert!(matches!(next(&mut rx).await, Frame::Msg { seq: 1, .. }));
    assert_eq!(mailboxes.active_count().await, 1, "the publish woke it");
    fixture.close().await;
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
    let (_tx1, mut rx1, p1) = port();
    let info = mailboxes
        .subscribe_local("u", "d", p1.clone(), None)
        .await
        .unwrap();
    assert_eq!(info.acked, 0);
    assert_eq!(
        delivered(&mut rx1, Duration::from_millis(300)).await,
        vec![1, 2, 3, 4, 5]
    );
    let ack = MailboxMsg::Ack {
        device: "d".into(),
        session: p1.id(),
        seq: 3,
    };
    mailboxes.tell("u", ack);
    let start = std::time::Instant::now();
    while mailboxes.devices_local("u").await.unwrap()[0].acked != 3 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the ack of 3 became durable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A connection that was told cursor 0 and has been sent nothing re-subscribes.
    let (_tx2, mut rx2, p2) = port();
    mailboxes
        .subscribe_local("u", "d", p2, Some((0, 0)))
        .await
        .unwrap();
    let first = delivered(&mut rx2, Duration::from_millis(300)).await;
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
    let (_tx, mut rx, probe) = port();
    mailboxes
        .subscribe_local("u", "d", probe, Some((u64::MAX, u64::MAX)))
        .await
        .unwrap();
    let seq = mailboxes
        .publish("u", "m2", ByteBuf::from(b"2".to_vec()), None)
        .await
        .unwrap();
    assert_eq!(seq, 2);
    let got = delivered(&mut rx, Duration::from_millis(300)).await;
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
    let (_tx, mut rx, probe) = port();
    mailboxes
        .subscribe_local("big", "d", probe.clone(), None)
        .await
        .unwrap();
    let sent = delivered(&mut rx, Duration::from_millis(500)).await;
    assert_eq!(
        sent,
        (1..=8).collect::<Vec<u64>>(),
        "8 MiB of 1 MiB messages"
    );
    let ack = MailboxMsg::Ack {
        device: "d".into(),
        session: probe.id(),
        seq: 3,
    };
    mailboxes.tell("big", ack);
    let more = delivered(&mut rx, Duration::from_millis(500)).await;
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

/// Waits until `device`'s stored cursor of user `u` is `want`, for at most `within`.
async fn stored_cursor_reaches(store: &Store, device: &str, want: u64, within: Duration) {
    let start = std::time::Instant::now();
    loop {
        let now = store
            .cursor(warbler_cluster::partition_of("u", 64), "u", device)
            .unwrap();
        if now == want {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{device}'s stored cursor is {now}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publishes `seqs` (ids `m<seq>`) to user `u` and checks its device got exactly them.
async fn publish_and_receive(
    mailboxes: &Mailboxes,
    rx: &mut OutReceiver,
    seqs: std::ops::RangeInclusive<u64>,
) {
    for i in seqs.clone() {
        let id = format!("m{i}");
        let body = ByteBuf::from(id.clone().into_bytes());
        assert_eq!(mailboxes.publish("u", &id, body, None).await.unwrap(), i);
    }
    let got = delivered(rx, Duration::from_millis(200)).await;
    assert_eq!(got, seqs.collect::<Vec<_>>());
}

/// Waits until user `u`'s mailbox reports its device's cursor at `acked`.
async fn mailbox_has(mailboxes: &Mailboxes, acked: u64) {
    let start = std::time::Instant::now();
    while mailboxes.devices_local("u").await.unwrap()[0].acked != acked {
        let waited = start.elapsed();
        assert!(
            waited < Duration::from_secs(5),
            "ack {acked} reached the mailbox"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With `cursor_flush` set, a device's acks stay in memory and reach storage together, as
/// the last one, when the flush is due; the mailbox answers with the newest cursor
/// meanwhile. A mailbox stopped before the flush writes them as it stops, so the next
/// mailbox's welcome carries them.
#[tokio::test]
async fn acks_are_written_together_after_the_flush_interval_and_at_stop() {
    const FLUSH: Duration = Duration::from_secs(3);
    let fixture = mailboxes_with(Duration::ZERO, FLUSH).await;
    let (mailboxes, store) = (fixture.mailboxes.clone(), fixture.store.clone());
    let (_tx, mut rx, mut session) = connect(&mailboxes, 0).await;
    publish_and_receive(&mailboxes, &mut rx, 1..=10).await;
    let acked_at = std::time::Instant::now();
    for seq in 1..=10 {
        session.ack(seq);
    }
    // The mailbox knows at once; storage not before the flush.
    mailbox_has(&mailboxes, 10).await;
    // Long enough for a write of each ack to be durable, well before the flush is due.
    tokio::time::sleep(FLUSH / 3).await;
    let early = store
        .cursor(warbler_cluster::partition_of("u", 64), "u", "d")
        .unwrap();
    if acked_at.elapsed() < FLUSH * 2 / 3 {
        assert_eq!(early, 0, "no ack was written before the flush was due");
    }
    stored_cursor_reaches(&store, "d", 10, FLUSH * 3).await;

    // Acks, then the mailbox stops before their flush: they are written at stop.
    publish_and_receive(&mailboxes, &mut rx, 11..=15).await;
    let acked_at = std::time::Instant::now();
    session.ack(15);
    mailbox_has(&mailboxes, 15).await;
    let old = mailboxes.get("u").await.unwrap();
    old.stop(Some("a test stops it".into()));
    while old.get_status() != ActorStatus::Stopped {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stored_cursor_reaches(&store, "d", 15, Duration::from_secs(5)).await;
    assert!(
        acked_at.elapsed() < FLUSH,
        "written as the mailbox stopped, not by the flush {:?} later",
        FLUSH
    );
    drop(session);
    let _again = connect(&mailboxes, 15).await;
    drop(store);
    fixture.close().await;
}

/// A local device's acks are recorded on its connection and read by the mailbox when it
/// runs anyway. When the window is full, the ack that opens it still reaches the mailbox at
/// once (the cursor flush, the other time the mailbox looks, is a minute away here).
#[tokio::test]
async fn a_full_window_opens_on_acks_the_mailbox_only_reads() {
    let fixture = mailboxes_with(Duration::ZERO, Duration::from_secs(60)).await;
    let mailboxes = fixture.mailboxes.clone();
    let (_tx, mut rx, mut session) = connect(&mailboxes, 0).await;
    for i in 1..=40u64 {
        let id = format!("m{i}");
        let body = ByteBuf::from(id.clone().into_bytes());
        assert_eq!(mailboxes.publish("u", &id, body, None).await.unwrap(), i);
    }
    // The window is 16 messages: the first 16, then each ack makes room.
    let first = delivered(&mut rx, Duration::from_millis(200)).await;
    assert_eq!(first, (1..=16).collect::<Vec<u64>>(), "a window of 16");
    let mut got = first;
    while got.len() < 40 {
        // Acked one at a time, as a client that acks each message it reads.
        let last = *got.last().unwrap();
        session.ack(last);
        let more = delivered(&mut rx, Duration::from_millis(300)).await;
        assert!(
            !more.is_empty(),
            "ack {last} did not open the window; delivered so far: {got:?}"
        );
        got.extend(more);
    }
    assert_eq!(got, (1..=40).collect::<Vec<u64>>());
    fixture.close().await;
}

/// A mailbox learns of its device's acks without a message for each, and still sleeps once
/// everything is acknowledged: whether the last ack came before its cursor flush looked
/// (the flush reads it) or after (the flush asked for it as a message).
#[tokio::test]
async fn a_mailbox_sleeps_on_acks_it_only_reads() {
    // Longer than `publish_and_receive` waits for quiet (200 ms), so that an ack right
    // after it comes before the flush.
    const FLUSH: Duration = Duration::from_millis(500);
    let fixture = mailboxes_with(Duration::from_millis(100), FLUSH).await;
    let (mailboxes, store) = (fixture.mailboxes.clone(), fixture.store.clone());
    let asleep_within = |limit: Duration, what: &'static str| {
        let mailboxes = mailboxes.clone();
        async move {
            let start = std::time::Instant::now();
            while mailboxes.active_count().await != 0 {
                assert!(start.elapsed() < limit, "{what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (_tx, mut rx, mut session) = connect(&mailboxes, 0).await;
    // Acked after the flush looked: the flush asked for the next ack as a message.
    publish_and_receive(&mailboxes, &mut rx, 1..=1).await;
    tokio::time::sleep(FLUSH * 2).await;
    assert_eq!(
        mailboxes.active_count().await,
        1,
        "awake while 1 is unacked"
    );
    session.ack(1);
    asleep_within(Duration::from_secs(5), "asleep once 1 was acknowledged").await;
    stored_cursor_reaches(&store, "d", 1, Duration::from_secs(5)).await;
    // Woken by a publish, acked at once: the flush reads it.
    publish_and_receive(&mailboxes, &mut rx, 2..=3).await;
    session.ack(3);
    asleep_within(
        Duration::from_secs(5),
        "asleep again once 3 was acknowledged",
    )
    .await;
    stored_cursor_reaches(&store, "d", 3, Duration::from_secs(5)).await;
    drop(store);
    fixture.close().await;
}

/// A session that subscribes again brings the position its device acknowledged with an
/// earlier mailbox (the user's leader moved, and that mailbox's cursor write was lost). The
/// new mailbox takes it, clamped to what is committed, and writes it at once: the device's
/// cursor does not fall back to the stored one.
#[tokio::test]
async fn a_resumed_subscription_writes_the_cursor_its_session_acknowledged() {
    let fixture = mailboxes_with(Duration::ZERO, Duration::from_secs(60)).await;
    let (mailboxes, store) = (fixture.mailboxes.clone(), fixture.store.clone());
    for i in 1..=5u64 {
        let id = format!("m{i}");
        let body = ByteBuf::from(id.clone().into_bytes());
        assert_eq!(mailboxes.publish("u", &id, body, None).await.unwrap(), i);
    }
    // Nothing of device "d" is stored; its session says it acked 4 and was sent 5.
    let (_tx, _rx, session) = port();
    mailboxes
        .subscribe_local("u", "d", session, Some((4, 5)))
        .await
        .unwrap();
    mailbox_has(&mailboxes, 4).await;
    // Written now, not a minute later by the flush.
    stored_cursor_reaches(&store, "d", 4, Duration::from_secs(5)).await;

    // A resume past what is committed is written as what is committed.
    let (_tx, _rx, session) = port();
    mailboxes
        .subscribe_local("u", "e", session, Some((50, 50)))
        .await
        .unwrap();
    stored_cursor_reaches(&store, "e", 5, Duration::from_secs(5)).await;
    drop(store);
    fixture.close().await;
}
