//! Frame encode/decode of the device protocol (a `msg` with a 256-byte body).
//!
//!   cargo bench --workspace --bench frame

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_bytes::ByteBuf;
use tokio_util::codec::{Decoder, Encoder};
use warbler_client::frame::MsgRef;
use warbler_client::{Frame, FrameCodec};

fn msg() -> Frame {
    Frame::Msg {
        seq: 123_456,
        id: "order-1234567".into(),
        ts: 1_795_000_000_000,
        body: ByteBuf::from(vec![7u8; 256]),
        from: Some("backend".into()),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    let mut codec = FrameCodec::new(1 << 20);
    let frame = msg();
    g.bench_function("encode msg 256B", |b| {
        let mut buf = BytesMut::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            codec.encode(&frame, &mut buf).unwrap();
        })
    });
    // What a node does per delivery: the frame written from the stored message it shares.
    let (id, body, from) = (
        "order-1234567".to_string(),
        vec![7u8; 256],
        "backend".to_string(),
    );
    g.bench_function("encode shared msg 256B", |b| {
        let mut buf = BytesMut::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            let msg = MsgRef::new(123_456, &id, 1_795_000_000_000, &body, Some(&from));
            codec.encode(msg, &mut buf).unwrap();
        })
    });
    let mut wire = BytesMut::new();
    codec.encode(&frame, &mut wire).unwrap();
    g.bench_function("decode msg 256B", |b| {
        b.iter(|| {
            let mut buf = wire.clone();
            codec.decode(&mut buf).unwrap().unwrap().unwrap()
        })
    });
    let mut ack = BytesMut::new();
    codec
        .encode(&Frame::Ack { seq: 123_456 }, &mut ack)
        .unwrap();
    g.bench_function("decode ack", |b| {
        b.iter(|| {
            let mut buf = ack.clone();
            codec.decode(&mut buf).unwrap().unwrap().unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
