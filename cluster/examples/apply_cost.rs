//! What applying consensus entries costs a replica's storage in the steady state: entries of
//! two publishes each (about what a 3-node cluster makes at half its maximum), to 1,000
//! users over 64 partitions, 256 B bodies, with the entry's applied point, unsynced (the
//! node's syncer pays the fsync). Prints, per 200,000 messages, the applying thread's time
//! per message and the whole process's CPU per message (RocksDB's flushes and compactions
//! included), long enough for every memtable to fill and flush.
//!
//!   cargo run --release --workspace --example apply_cost [-- MESSAGES]   # default 1,200,000

use std::time::Instant;

#[path = "common/cpu.rs"]
mod cpu;
use cpu::cpu_secs;

use serde_bytes::ByteBuf;
use warbler_storage::{Op, Store, StoredMessage};

const USERS: u64 = 1000;
const EVERY: u64 = 200_000;

fn main() {
    let messages: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MESSAGES is a number"))
        .unwrap_or(1_200_000);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(dir.path()).expect("the store opens");
    let mut seqs = vec![0u64; USERS as usize];
    // xorshift: the same users in the same order every run.
    let mut state = 12345u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut started, mut cpu) = (Instant::now(), cpu_secs("self"));
    let mut n = 0u64;
    let mut entry = 0u64;
    while n < messages {
        entry += 1;
        let mut ops = Vec::with_capacity(2);
        let mut partition = 0;
        for _ in 0..2 {
            let u = next() % USERS;
            seqs[u as usize] += 1;
            partition = (u % 64) as u16;
            ops.push(Op::Append {
                partition,
                user: format!("r1-123456-u{u}"),
                seq: seqs[u as usize],
                msg: StoredMessage {
                    id: format!("r1-123456-s0-p0-{n}"),
                    ts: entry,
                    from: None,
                    body: ByteBuf::from(vec![7u8; 256]),
                },
            });
            n += 1;
        }
        let applied = [("applied", entry.to_be_bytes().to_vec())];
        store
            .apply_with_meta(partition, &ops, &applied, false)
            .expect("the apply is written");
        if n.is_multiple_of(EVERY) {
            let now = cpu_secs("self");
            println!(
                "{n} messages: applying {:.2} us per message, process CPU {:.2} us per message",
                started.elapsed().as_secs_f64() * 1e6 / EVERY as f64,
                (now - cpu) * 1e6 / EVERY as f64
            );
            (started, cpu) = (Instant::now(), now);
        }
    }
}
