//! The mailbox publish path without I/O: registry lookup, dedup check, seq assignment,
//! proposal, completion and reply, over a partition log that completes at once (no fsync,
//! no write). Storage is only read (dedup, head).
//!
//!   cargo bench --workspace --bench mailbox

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_bytes::ByteBuf;
use warbler_actors::{MailboxLimits, Mailboxes, RegistryArgs};
use warbler_storage::log::BoxFuture;
use warbler_storage::{Done, Op, PartitionId, PartitionLog, StorageError, Store};

/// Completes every entry at once, in order, without writing it.
struct InstantLog;

impl PartitionLog for InstantLog {
    fn propose(
        &self,
        _p: PartitionId,
        _ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        if let Some(done) = done {
            done(Ok(()));
        }
        Box::pin(async { Ok(()) })
    }
    fn barrier(&self, _p: PartitionId) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async { Ok(()) })
    }
    fn leader_term(&self, _p: PartitionId) -> Option<u64> {
        Some(0)
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mailboxes = rt.block_on(async {
        let limits = MailboxLimits {
            inflight_max: 256,
            tail_cache_max: 512,
            idle_timeout: Duration::from_secs(600),
            sleep_after: Duration::ZERO,
            cursor_flush: Duration::from_secs(1),
            unacked_max: 0,
        };
        Mailboxes::start(RegistryArgs {
            store,
            log: Arc::new(InstantLog),
            limits,
            partitions: 64,
        })
        .await
        .unwrap()
        .0
    });
    let body = ByteBuf::from(vec![1u8; 256]);
    let mut g = c.benchmark_group("mailbox");
    g.throughput(Throughput::Elements(1));
    let mut n = 0u64;
    g.bench_function("publish (no I/O)", |b| {
        b.iter(|| {
            n += 1;
            let user = format!("user-{}", n % 1000);
            rt.block_on(mailboxes.publish(&user, &format!("id-{n}"), body.clone(), None))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
