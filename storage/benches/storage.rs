//! Storage: staging and writing a batch of 256 appends (unsynced: the CPU path; the fsync
//! cost is the disk's), a 100-message range read, and the dedup lookup every new publish
//! makes (a miss), with the records in the memtable and in files.
//!
//!   cargo bench --workspace --bench storage

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_bytes::ByteBuf;
use warbler_storage::{Op, Store, StoredMessage};

const BATCH: u64 = 256;

fn op(user: u64, seq: u64) -> Op {
    let msg = StoredMessage {
        id: format!("m-{user}-{seq}"),
        ts: seq,
        from: None,
        body: ByteBuf::from(vec![1u8; 256]),
    };
    Op::Append {
        partition: (user % 64) as u16,
        user: format!("user-{user}"),
        seq,
        msg,
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut g = c.benchmark_group("storage");
    g.throughput(Throughput::Elements(BATCH));
    let mut round = 0u64;
    g.bench_function("append batch of 256 (unsynced)", |b| {
        b.iter(|| {
            round += 1;
            let ops: Vec<Op> = (0..BATCH).map(|u| op(u, round)).collect();
            store.apply(&ops, false).unwrap();
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("range read 100", |b| {
        b.iter(|| store.read_range(7, "user-7", 0, 100).unwrap())
    });
    // Every new publish asks whether its id was seen: the answer is almost always no.
    g.throughput(Throughput::Elements(1));
    let mut n = 0u64;
    let mut miss = |b: &mut criterion::Bencher| {
        b.iter(|| {
            n += 1;
            let (partition, user) = ((n % 64) as u16, format!("user-{}", n % 64));
            store.dedup(partition, &user, &format!("new-{n}")).unwrap()
        })
    };
    g.bench_function("dedup miss (ids in the memtable)", &mut miss);
    store.flush().unwrap();
    g.bench_function("dedup miss (ids in files)", &mut miss);
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
