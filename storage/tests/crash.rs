//! Crash test: a child process appends through the group committer and prints each
//! acknowledged append; the parent kills it (SIGKILL) at a random moment, many times, and
//! checks after each kill that the recovered log of every user is a contiguous prefix
//! 1..=n that contains every acknowledged append with the right content. Every other child
//! runs without fsync (`storage.sync = false`): a crash of the process must not lose what
//! it acknowledged either (only a power loss may), though unsynced writes wait in the
//! WAL's buffer inside the process.
//!
//! Replay a run with `WARBLER_TEST_SEED=<seed> cargo test --release -p warbler-storage --test crash`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_bytes::ByteBuf;
use warbler_storage::{Committer, CommitterLimits, Op, Store, StoredMessage};

const CHILD_ENV: &str = "WARBLER_CRASH_CHILD_DIR";
/// Set to `0` for a child whose committer does not fsync.
const CHILD_SYNC_ENV: &str = "WARBLER_CRASH_CHILD_SYNC";
const USERS: u64 = 6;
const KILLS: usize = 25;
/// Appends in flight at once in the child (so batches hold many records).
const INFLIGHT: usize = 128;

fn main() {
    match std::env::var(CHILD_ENV) {
        Ok(dir) => child(&dir),
        Err(_) => {
            // cargo passes harness flags (e.g. --list); only run on a real invocation.
            if std::env::args().any(|a| a == "--list") {
                println!("crash: test");
                return;
            }
            parent();
            println!("test result: ok. 1 passed; 0 failed; 0 ignored");
        }
    }
}

fn body(user: u64, seq: u64) -> Vec<u8> {
    format!("u{user}-{seq}-{}", "x".repeat((seq % 200) as usize)).into_bytes()
}

fn child(dir: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Store::open(std::path::Path::new(dir)).unwrap();
        let sync = std::env::var(CHILD_SYNC_ENV).map_or(true, |v| v != "0");
        let committer = Committer::start(
            store.clone(),
            CommitterLimits {
                batch_records_max: 512,
                batch_bytes_max: 4 << 20,
                queue_max: 4096,
                sync,
            },
        );
        let mut next: Vec<u64> = (0..USERS)
            .map(|u| store.last_seq(0, &format!("u{u}")).unwrap() + 1)
            .collect();
        let window = std::sync::Arc::new(tokio::sync::Semaphore::new(INFLIGHT));
        for i in 0u64.. {
            let user = i % USERS;
            let seq = next[user as usize];
            next[user as usize] += 1;
            let name = format!("u{user}");
            let msg = StoredMessage {
                id: format!("{name}-{seq}"),
                ts: i,
                from: None,
                body: ByteBuf::from(body(user, seq)),
            };
            let permit = window.clone().acquire_owned().await.unwrap();
            let done = Box::new(move |r: Result<(), warbler_storage::StorageError>| {
                r.expect("append failed");
                let mut out = std::io::stdout().lock();
                writeln!(out, "ACK {user} {seq}").unwrap();
                out.flush().unwrap();
                drop(permit);
            });
            committer
                .submit(
                    vec![Op::Append {
                        partition: 0,
                        user: name,
                        seq,
                        msg,
                    }],
                    Some(done),
                )
                .await
                .unwrap();
        }
    });
}

fn parent() {
    let seed = std::env::var("WARBLER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("crash: seed {seed} (replay with WARBLER_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: HashMap<u64, u64> = HashMap::new(); // user → highest acked seq
                                                       // Acknowledged appends of the children with fsync and of those without.
    let mut total_acked = [0u64; 2];
    for kill in 0..KILLS {
        let sync = kill % 2 == 0;
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, dir.path())
            .env(CHILD_SYNC_ENV, if sync { "1" } else { "0" })
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line
                    .split_whitespace()
                    .skip(1)
                    .map(|p| p.parse::<u64>().unwrap());
                if let (Some(u), Some(s)) = (parts.next(), parts.next()) {
                    acks.push((u, s));
                }
            }
            acks
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
        child.kill().unwrap();
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        total_acked[usize::from(sync)] += acks.len() as u64;
        for (u, s) in acks {
            let e = acked.entry(u).or_default();
            *e = (*e).max(s);
        }
        let store = Store::open(dir.path()).unwrap();
        for u in 0..USERS {
            let user = format!("u{u}");
            let range = store
                .verify_user(0, &user)
                .unwrap_or_else(|e| panic!("kill {kill}: {e}"));
            let last = range
                .map(|(first, last)| {
                    assert_eq!(first, 1, "kill {kill}: {user} does not start at 1");
                    last
                })
                .unwrap_or(0);
            let want = acked.get(&u).copied().unwrap_or(0);
            assert!(
                last >= want,
                "kill {kill} (fsync {sync}): {user} acked up to {want} but recovered only {last}"
            );
            for (seq, m) in store.read_range(0, &user, 0, usize::MAX).unwrap() {
                assert_eq!(
                    m.body.as_ref(),
                    body(u, seq).as_slice(),
                    "kill {kill}: {user}/{seq} content"
                );
            }
        }
        drop(store);
    }
    let [unsynced, synced] = total_acked;
    println!("crash: {KILLS} kills, {synced} acknowledged appends with fsync and {unsynced} without, every recovery a contiguous prefix holding all of them");
    assert!(
        synced > 0 && unsynced > 0,
        "the children must have acknowledged appends with fsync and without"
    );
}
