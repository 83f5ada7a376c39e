//! Crash test of the consensus log: a child process runs one partition on three replicas
//! (each its own RocksDB, real peer transports on loopback), writes through the leader from
//! many tasks at once, and prints each acknowledged entry and how far each follower has
//! acknowledged the leader's log. The parent kills it (SIGKILL) at a random moment, many
//! times, and checks after each kill, before the next run can change anything:
//!
//! - every acknowledged entry is in the log (or the applied state) of a majority of the
//!   replicas, with its content. Not necessarily of the leader that acknowledged it: a
//!   leader replicates without waiting for its own flush and commits on any majority, two
//!   followers' flushes included (`vendor/openraft/PATCHED.md`);
//! - every follower holds the leader's log up to where it said it did;
//! - two replicas that hold an entry under the same log id hold the same entry (a leader
//!   that came back in its old term after losing its log's unflushed tail broke this).
//!
//! The leader's disk is made slower than its followers' (`slow_leader_disk`), so a kill
//! often takes from the leader a tail of its log that its followers hold.
//!
//! The appends reach the disk through the node's syncer (one fsync for every group that
//! waits), so this is what proves it completes nothing before its write is there.
//!
//! Replay a run with `WARBLER_TEST_SEED=<seed> cargo test --release --workspace --test raft_crash`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, Config, Entry, EntryPayload, LogId, Raft};
use rand::{Rng, SeedableRng};
use warbler_cluster::raft_net::{start_group, RaftService};
use warbler_cluster::raft_store::{Batch, TypeConfig};
use warbler_cluster::PeerTransport;
use warbler_storage::{Op, Store};

const CHILD_DIR_ENV: &str = "WARBLER_RAFT_CRASH_DIR";
const CHILD_PORTS_ENV: &str = "WARBLER_RAFT_CRASH_PORTS";
const CHILD_RUN_ENV: &str = "WARBLER_RAFT_CRASH_RUN";
const PARTITION: u16 = 0;
const REPLICAS: u64 = 3;
const KILLS: usize = 8;
/// Writers in flight at once in the child (so entries hold many ops and syncs many groups'
/// appends).
const WRITERS: u64 = 48;
/// How long the leader's syncer stalls in every stall-and-run cycle (`slow_leader_disk`).
const LEADER_SYNC_STALL: Duration = Duration::from_millis(20);

fn main() {
    match std::env::var(CHILD_DIR_ENV) {
        Ok(dir) => child(&dir),
        Err(_) => {
            if std::env::args().any(|a| a == "--list") {
                println!("raft_crash: test");
                return;
            }
            parent();
            println!("test result: ok. 1 passed; 0 failed; 0 ignored");
        }
    }
}

/// The op a write carries: device `d{key}` of user `ann` acked at `key`. Unique per write,
/// so each acknowledged write can be found again.
fn op(key: u64) -> Op {
    Op::Cursor {
        partition: PARTITION,
        user: "ann".into(),
        device: format!("d{key}"),
        acked: key,
    }
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

fn child(dir: &str) {
    let ports: Vec<u16> = std::env::var(CHILD_PORTS_ENV)
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    let run: u64 = std::env::var(CHILD_RUN_ENV).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut rafts = Vec::new();
        let mut stores = Vec::new();
        for id in 1..=REPLICAS {
            let store = Store::open(&std::path::Path::new(dir).join(format!("n{id}"))).unwrap();
            stores.push(store.clone());
            rafts.push(replica(id, ports[id as usize - 1], store).await);
        }
        if rafts[0].is_initialized().await.unwrap() {
            // A restart: the stored membership and log carry on.
        } else {
            let members: BTreeMap<u64, BasicNode> = (1..=REPLICAS)
                .map(|id| {
                    (
                        id,
                        BasicNode::new(format!("127.0.0.1:{}", ports[id as usize - 1])),
                    )
                })
                .collect();
            rafts[0].initialize(members).await.unwrap();
        }
        let rafts = Arc::new(rafts);
        for w in 0..WRITERS {
            tokio::spawn(writer(rafts.clone(), run, w));
        }
        tokio::spawn(slow_leader_disk(rafts.clone(), stores));
        loop {
            // How far each follower acknowledged the leader's log (durable there).
            for r in rafts.iter() {
                let m = r.metrics().borrow().clone();
                if m.current_leader != Some(m.id) {
                    continue;
                }
                for (node, matched) in m.replication.iter().flatten() {
                    if let Some(l) = matched {
                        say(format!("MATCH {node} {} {}", l.leader_id.term, l.index));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

async fn replica(id: u64, port: u16, store: Store) -> Raft<TypeConfig> {
    let service = Arc::new(RaftService::default());
    let transport = Arc::new(
        PeerTransport::start(
            &format!("n{id}"),
            format!("127.0.0.1:{port}").parse().unwrap(),
            None,
            service.clone(),
        )
        .await
        .unwrap(),
    );
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        ..Default::default()
    };
    let raft = start_group(
        id,
        PARTITION,
        Arc::new(config.validate().unwrap()),
        &store,
        &transport,
        &service,
        None,
    )
    .await
    .unwrap();
    // The transport lives as long as the process.
    std::mem::forget(transport);
    raft
}

/// Whether `r` is its group's leader now.
fn leads(r: &Raft<TypeConfig>) -> bool {
    let m = r.metrics();
    let m = m.borrow();
    m.current_leader == Some(m.id)
}

/// Gives the leader a disk slower than its followers': its syncer stalls for most of the
/// time. Its followers then hold, flushed, a tail of its log that it has not flushed, which
/// a kill takes from it: the case where a restarted leader must not lead again in its old
/// term (`vendor/openraft/PATCHED.md`, change 3), and where writes are acknowledged on the
/// two followers' flushes alone (change 2).
async fn slow_leader_disk(rafts: Arc<Vec<Raft<TypeConfig>>>, stores: Vec<Store>) {
    loop {
        let leader = rafts.iter().position(leads);
        if let Some(i) = leader {
            stores[i].after_sync(Box::new(|_| std::thread::sleep(LEADER_SYNC_STALL)));
        }
        tokio::time::sleep(LEADER_SYNC_STALL + Duration::from_millis(5)).await;
    }
}

/// Writes unique keys through whichever replica leads, printing each acknowledged one.
async fn writer(rafts: Arc<Vec<Raft<TypeConfig>>>, run: u64, w: u64) {
    for n in 0u64.. {
        let key = (run << 40) | (w << 24) | n;
        loop {
            let leader = rafts.iter().find(|r| leads(r));
            let Some(leader) = leader else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let id = leader.metrics().borrow().id;
            match leader
                .client_write(Batch {
                    ops: vec![op(key)].into(),
                })
                .await
            {
                Ok(r) => {
                    say(format!(
                        "ACK {key} {id} {} {}",
                        r.log_id.leader_id.term, r.log_id.index
                    ));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

#[derive(Default)]
struct Seen {
    /// key → (leader id, term, index)
    acks: Vec<(u64, u64, u64, u64)>,
    /// follower → highest (term, index) the leader saw it hold
    matched: BTreeMap<u64, (u64, u64)>,
    /// How long after the child started its first write was acknowledged.
    first_ack: Option<Duration>,
}

fn read_child(out: std::process::ChildStdout, started: std::time::Instant) -> Seen {
    let mut seen = Seen::default();
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f[i].parse::<u64>().unwrap();
        match f.first() {
            // A line cut short by the kill is not a statement.
            Some(&"ACK") if f.len() == 5 => {
                seen.first_ack.get_or_insert_with(|| started.elapsed());
                seen.acks.push((num(1), num(2), num(3), num(4)))
            }
            Some(&"MATCH") if f.len() == 4 => {
                let m = seen.matched.entry(num(1)).or_default();
                *m = (*m).max((num(2), num(3)));
            }
            _ => {}
        }
    }
    seen
}

/// One replica's log after the kill: index → (term, keys in the entry), the purge point,
/// and the keys its applied state holds.
struct Recovered {
    log: BTreeMap<u64, (u64, Vec<u64>)>,
    purged: u64,
    applied: std::collections::HashSet<u64>,
}

fn recover(dir: &std::path::Path) -> Recovered {
    let store = Store::open(dir).unwrap();
    let mut log = BTreeMap::new();
    for (index, bytes) in store.raft_log_range(PARTITION, 0, u64::MAX).unwrap() {
        let entry: Entry<TypeConfig> = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            entry.log_id.index, index,
            "an entry stored under another index"
        );
        let keys = match entry.payload {
            EntryPayload::Normal(b) => b
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::Cursor { acked, .. } => Some(*acked),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        log.insert(index, (entry.log_id.leader_id.term, keys));
    }
    let purged = store
        .raft_meta_get(PARTITION, "purged")
        .unwrap()
        .map(|b| rmp_serde::from_slice::<LogId<u64>>(&b).unwrap().index)
        .unwrap_or(0);
    let applied = store
        .cursors(PARTITION, "ann")
        .unwrap()
        .into_iter()
        .map(|(_, acked)| acked)
        .collect();
    Recovered {
        log,
        purged,
        applied,
    }
}

/// Whether `r` holds `key` at (term, index), or has applied it.
fn holds(r: &Recovered, key: u64, term: u64, index: u64) -> bool {
    match r.log.get(&index) {
        Some((t, keys)) => *t == term && keys.contains(&key),
        None => index <= r.purged && r.applied.contains(&key),
    }
}

/// Raft's log matching: two replicas that hold an entry under the same index and term hold
/// the same entry. A leader that led again in its old term after a crash took from the tail of
/// its log broke it: it wrote new entries under log ids its followers already held with other
/// content, and a follower that "matched" such an id counted towards a commit it did not hold.
/// Returns how many entries were compared.
fn assert_logs_match(kill: usize, replicas: &BTreeMap<u64, Recovered>) -> usize {
    let mut compared = 0;
    for (&a, ra) in replicas {
        for (&b, rb) in replicas.range(a + 1..) {
            for (index, (term, keys)) in &ra.log {
                let Some((t, k)) = rb.log.get(index) else {
                    continue;
                };
                if t == term {
                    assert_eq!(
                        keys, k,
                        "kill {kill}: n{a} and n{b} hold different entries under log id {term}-{index}"
                    );
                    compared += 1;
                }
            }
        }
    }
    compared
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
    println!("raft_crash: seed {seed} (replay with WARBLER_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // Outside the ephemeral range: the children restart on these ports after every kill.
    let ports: Vec<u16> = (0..REPLICAS)
        .map(|_| warbler_chaos::ports::free_port())
        .collect();
    let ports_env = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe().unwrap();
    let (mut total_acks, mut total_matches) = (0usize, 0usize);
    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_PORTS_ENV, &ports_env)
            .env(CHILD_RUN_ENV, (kill + 1).to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let started = std::time::Instant::now();
        let reader = std::thread::spawn(move || read_child(stdout, started));
        // Long enough to elect a leader after a restart (about 1–2 s here: a restarted leader does
        // not lead again in its old term, the replicas elect one, and each follower's vote
        // holds its leader's lease for the first 0.8 s), then a random moment under load.
        std::thread::sleep(Duration::from_millis(rng.gen_range(2500..4000)));
        child.kill().unwrap();
        child.wait().unwrap();
        let seen = reader.join().unwrap();
        let replicas: BTreeMap<u64, Recovered> = (1..=REPLICAS)
            .map(|id| (id, recover(&dir.path().join(format!("n{id}")))))
            .collect();
        let compared = assert_logs_match(kill, &replicas);
        let mut not_on_leader = 0;
        for &(key, leader, term, index) in &seen.acks {
            if !holds(&replicas[&leader], key, term, index) {
                not_on_leader += 1;
            }
            let copies = replicas
                .values()
                .filter(|r| holds(r, key, term, index))
                .count();
            assert!(
                copies >= 2,
                "kill {kill}: key {key} acknowledged at {term}-{index} is on {copies} replica(s), not a majority"
            );
        }
        for (&node, &(term, index)) in &seen.matched {
            let r = &replicas[&node];
            let held = match r.log.get(&index) {
                Some((t, _)) => *t == term,
                None => index <= r.purged,
            };
            assert!(
                held,
                "kill {kill}: n{node} acknowledged the leader's log up to {term}-{index} but does not hold it"
            );
        }
        println!(
            "raft_crash: kill {kill}: {} acknowledged writes ({not_on_leader} of them not on their \
             leader, which answered before its own flush), {} replicas' acknowledgements checked, \
             {compared} entries held by two replicas under one log id compared; the first write \
             was acknowledged {:?} after the start",
            seen.acks.len(),
            seen.matched.len(),
            seen.first_ack
        );
        total_acks += seen.acks.len();
        total_matches += seen.matched.len();
    }
    println!("raft_crash: {KILLS} kills, {total_acks} acknowledged writes, all on a majority of the replicas");
    assert!(total_acks > 0, "the child must have acknowledged writes");
    assert!(
        total_matches > 0,
        "the leader must have reported its followers"
    );
}
