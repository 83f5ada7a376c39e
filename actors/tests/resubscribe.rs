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

#[tokio::test]
async fn a_session_resubscribes_when_its_mailbox_dies() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let limits = CommitterLimits {
        batch_records_max: 64,
        batch_bytes_max: 1 << 20,
        queue_max: 64,
        sync: true,
    };
    let log = Arc::new(LocalLog::new(Committer::start(store.clone(), limits)));
    let mailbox_limits = MailboxLimits {
        inflight_max: 16,
        tail_cache_max: 8,
        idle_timeout: Duration::from_secs(60),
    };
    let (mailboxes, _) = Mailboxes::start(RegistryArgs {
        store,
        log,
        limits: mailbox_limits,
        partitions: 64,
    })
    .await
    .unwrap();

    let (tx, mut rx) = mpsc::channel(64);
    let closed = CancellationToken::new();
    let args = SessionArgs {
        user: "u".into(),
        device: "d".into(),
        node: "n".into(),
        mailboxes: mailboxes.clone(),
        out: tx,
        closed: closed.clone(),
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
}
