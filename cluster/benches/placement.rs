//! Placement: user -> partition, partition -> replicas, and rebuilding the ring.
//!
//!   cargo bench --workspace --bench placement

use criterion::{criterion_group, criterion_main, Criterion};
use warbler_cluster::{partition_of, Ring, VNODES_DEFAULT};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("placement");
    g.bench_function("partition_of", |b| {
        b.iter(|| partition_of("user-123456789", 64))
    });
    let ring = Ring::new((0..5).map(|i| format!("warbler-{i}")), VNODES_DEFAULT);
    g.bench_function("replicas (5 nodes, RF 3)", |b| {
        b.iter(|| ring.replicas(37, 3))
    });
    g.bench_function("build ring (5 nodes x 256 vnodes)", |b| {
        b.iter(|| Ring::new((0..5).map(|i| format!("warbler-{i}")), VNODES_DEFAULT))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
