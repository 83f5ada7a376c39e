//! The device connection against a scripted server on loopback: what `recv_msg_ready`
//! gives without waiting, and the pings it answers on the way.

use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use serde_bytes::ByteBuf;
use tokio::net::TcpListener;
use tokio_util::codec::{Encoder, Framed};
use warbler_client::{ConnectOptions, Connection, Frame, FrameCodec};

fn msg(seq: u64) -> Frame {
    Frame::Msg {
        seq,
        id: format!("m{seq}"),
        ts: 1,
        body: ByteBuf::from(vec![seq as u8; 3]),
        from: None,
    }
}

/// The bytes of `frames` as one write, length prefixes included.
fn one_write(frames: &[Frame]) -> BytesMut {
    let mut codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::new();
    for f in frames {
        codec.encode(f, &mut buf).unwrap();
    }
    buf
}

#[tokio::test]
async fn messages_that_arrived_together_are_taken_without_waiting_and_acked_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (later_tx, later_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut framed = Framed::new(tcp, FrameCodec::new(1 << 20));
        assert!(matches!(
            framed.next().await,
            Some(Ok(Ok(Frame::Hello { .. })))
        ));
        let welcome = Frame::Welcome {
            user: "u".into(),
            device: "d".into(),
            node: "n".into(),
            acked: 0,
        };
        // Three messages and a ping between them, in one write.
        let mut burst = one_write(&[welcome, msg(1), msg(2), Frame::Ping { n: 7 }, msg(3)]);
        let tcp = framed.get_mut();
        tokio::io::AsyncWriteExt::write_all(tcp, &burst.split())
            .await
            .unwrap();
        // What the client sends back before the next message exists.
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(framed.next().await.unwrap().unwrap().unwrap());
        }
        later_rx.await.unwrap();
        framed.send(msg(4)).await.unwrap();
        got.push(framed.next().await.unwrap().unwrap().unwrap());
        got
    });

    let mut conn = Connection::connect(ConnectOptions::new(&addr, "t", "d"))
        .await
        .unwrap();
    let first = conn.recv_msg().await.unwrap();
    assert_eq!(first.seq, 1);
    let mut taken = vec![first.seq];
    // The rest of the burst is already here, or arrives within moments on loopback.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while taken.len() < 3 && tokio::time::Instant::now() < deadline {
        match conn.recv_msg_ready().await {
            Some(m) => taken.push(m.unwrap().seq),
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    assert_eq!(taken, vec![1, 2, 3]);
    // Nothing more has been sent: no waiting, no message.
    let now = tokio::time::timeout(Duration::from_secs(1), conn.recv_msg_ready())
        .await
        .expect("recv_msg_ready returns at once when nothing has arrived");
    assert!(now.is_none());
    conn.ack(3).await.unwrap();

    // A message sent later still comes through the waiting call.
    later_tx.send(()).unwrap();
    let fourth = conn.recv_msg().await.unwrap();
    assert_eq!((fourth.seq, fourth.body), (4, vec![4; 3]));
    conn.ack(4).await.unwrap();

    let got = server.await.unwrap();
    assert_eq!(
        got,
        vec![
            Frame::Pong { n: 7 },
            Frame::Ack { seq: 3 },
            Frame::Ack { seq: 4 }
        ]
    );
}
