//! One partition replicated on three nodes: real peer transports on loopback, each node's
//! own RocksDB, openraft deciding who may write. Writes commit on a majority and reach
//! every replica; when the leader stops, the survivors elect a new one and carry on with
//! the same log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, Config, Raft};
use serde_bytes::ByteBuf;
use warbler_cluster::raft_net::{start_group, RaftService};
use warbler_cluster::raft_store::{Batch, TypeConfig};
use warbler_cluster::PeerTransport;
use warbler_storage::{Op, Store, StoredMessage};

const PARTITION: u16 = 0;

struct Replica {
    _dir: tempfile::TempDir,
    store: Store,
    service: Arc<RaftService>,
    raft: Raft<TypeConfig>,
    addr: String,
}

async fn replica(id: u64) -> Replica {
    replica_with(id, |_| {}).await
}

async fn replica_with(id: u64, tune: impl FnOnce(&mut Config)) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let service = Arc::new(RaftService::default());
    let transport = Arc::new(
        PeerTransport::start(
            &format!("n{id}"),
            "127.0.0.1:0".parse().unwrap(),
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
        // As the node sets it: the bytes of a request are bounded by the log reader.
        max_payload_entries: warbler_cluster::raft_log::APPEND_ENTRIES_MAX,
        ..Default::default()
    };
    let mut config = config;
    tune(&mut config);
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
    Replica {
        _dir: dir,
        store,
        service,
        raft,
        addr: transport.local_addr().to_string(),
    }
}

/// Initializes the group with `nodes` as its voters (ids 1, 2, …).
async fn initialize(nodes: &[Replica]) {
    let members: BTreeMap<u64, BasicNode> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u64 + 1, BasicNode::new(&n.addr)))
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();
}

/// One partition's group on three fresh replicas, initialized.
async fn three_replicas() -> [Replica; 3] {
    let nodes = [replica(1).await, replica(2).await, replica(3).await];
    initialize(&nodes).await;
    nodes
}

fn batch(seq: u64) -> Batch {
    let msg = StoredMessage {
        id: format!("m{seq}"),
        ts: seq,
        from: None,
        body: ByteBuf::from(seq.to_be_bytes().to_vec()),
    };
    Batch {
        ops: vec![Op::Append {
            partition: PARTITION,
            user: "ann".into(),
            seq,
            msg,
        }]
        .into(),
    }
}

async fn leader_of(replicas: &[&Replica]) -> u64 {
    let start = Instant::now();
    loop {
        // Copy values out of the metrics: holding a borrow while borrowing the same watch
        // again can deadlock or panic.
        let ids: Vec<u64> = replicas
            .iter()
            .map(|x| x.raft.metrics().borrow().id)
            .collect();
        for r in replicas {
            let leader = r.raft.metrics().borrow().current_leader;
            if let Some(l) = leader.filter(|l| ids.contains(l)) {
                return l;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no leader elected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn write(replicas: &[&Replica], seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        loop {
            let leader = leader_of(replicas).await;
            let r = replicas
                .iter()
                .find(|r| r.raft.metrics().borrow().id == leader)
                .unwrap();
            match r.raft.client_write(batch(seq)).await {
                Ok(_) => break,
                Err(e) => {
                    println!("write of seq {seq} retried: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Waits until every replica applied up to the leader's last log, then checks its data.
async fn converged(replicas: &[&Replica], last_seq: u64) {
    let start = Instant::now();
    for r in replicas {
        loop {
            if r.store.verify_user(PARTITION, "ann").unwrap() == Some((1, last_seq)) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "replica {} did not converge",
                r.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Writes seqs 1..=`last` through the leader of `nodes` until every replica has them;
/// returns the leader's id, the leader, and the others.
async fn written_then_split(nodes: &[Replica], last: u64) -> (u64, Vec<&Replica>, Vec<&Replica>) {
    let all: Vec<&Replica> = nodes.iter().collect();
    let leader = leader_of(&all).await;
    write(&all, 1..=last).await;
    converged(&all, last).await;
    let (led, others) = nodes
        .iter()
        .partition(|r| r.raft.metrics().borrow().id == leader);
    (leader, led, others)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_survives_losing_its_leader() {
    let nodes = three_replicas().await;
    let (first_leader, gone, survivors) = written_then_split(&nodes, 20).await;

    // The leader stops; the other two elect a new leader and go on from the same log.
    let started = Instant::now();
    gone[0].raft.shutdown().await.unwrap();
    gone[0].service.remove(PARTITION);
    let new_leader = leader_of(&survivors).await;
    println!(
        "raft: leader {first_leader} stopped; {new_leader} leads after {:?}",
        started.elapsed()
    );
    assert_ne!(new_leader, first_leader);
    write(&survivors, 21..=30).await;
    converged(&survivors, 30).await;
    // The stopped replica has exactly what was committed while it led, nothing later.
    assert_eq!(
        gone[0].store.verify_user(PARTITION, "ann").unwrap(),
        Some((1, 20))
    );
    for r in &survivors {
        let bodies: Vec<u64> = r
            .store
            .read_range(PARTITION, "ann", 0, 100)
            .unwrap()
            .iter()
            .map(|(_, m)| u64::from_be_bytes(m.body[..8].try_into().unwrap()))
            .collect();
        assert_eq!(
            bodies,
            (1..=30).collect::<Vec<_>>(),
            "every replica holds the same log"
        );
    }
}

/// Holds `store`'s syncer until the returned sender is dropped or sent to: the first sync
/// after this call completes, and every later one waits behind it.
fn hold_syncs(store: &Store) -> std::sync::mpsc::Sender<()> {
    let (release, held) = std::sync::mpsc::channel::<()>();
    store.after_sync(Box::new(move |_| {
        let _ = held.recv();
    }));
    release
}

/// A leader hands its entries to its followers without waiting for its own flush
/// (`vendor/openraft/PATCHED.md`): with the leader's syncs held, a write still commits on
/// the two followers' flushes and is applied and answered on the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_replicates_its_entries_before_its_own_flush() {
    let nodes = three_replicas().await;
    let (_, led, others) = written_then_split(&nodes, 3).await;
    let release = hold_syncs(&led[0].store);
    let answered =
        tokio::time::timeout(Duration::from_secs(10), led[0].raft.client_write(batch(4))).await;
    assert!(
        matches!(answered, Ok(Ok(_))),
        "a write waited for its leader's own flush: {answered:?}"
    );
    assert_eq!(
        led[0].store.verify_user(PARTITION, "ann").unwrap(),
        Some((1, 4))
    );
    drop(release);
    let all: Vec<&Replica> = led.iter().chain(others.iter()).copied().collect();
    converged(&all, 4).await;
}

/// A leader counts its own copy of an entry towards the majority only once it is flushed:
/// with one follower stopped and the leader's syncs held, the one follower left is not a
/// majority, so the write waits; released, it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_counts_itself_only_once_its_append_is_flushed() {
    let nodes = three_replicas().await;
    let (_, led, others) = written_then_split(&nodes, 3).await;
    others[0].raft.shutdown().await.unwrap();
    others[0].service.remove(PARTITION);
    let release = hold_syncs(&led[0].store);
    let raft = led[0].raft.clone();
    let mut write = tokio::spawn(async move { raft.client_write(batch(4)).await });
    let early = tokio::time::timeout(Duration::from_secs(1), &mut write).await;
    assert!(
        early.is_err(),
        "a write committed on one follower and an unflushed leader: {early:?}"
    );
    assert_eq!(
        led[0].store.verify_user(PARTITION, "ann").unwrap(),
        Some((1, 3)),
        "nothing is applied before it is committed"
    );
    drop(release);
    let answered = tokio::time::timeout(Duration::from_secs(10), write).await;
    assert!(
        matches!(answered, Ok(Ok(Ok(_)))),
        "the write did not commit once the leader's flush came: {answered:?}"
    );
    converged(&[led[0], others[1]], 4).await;
}

/// A group reports its metrics only when something in them changed (openraft patch 4,
/// `vendor/openraft/PATCHED.md`): requests that pass through every replica's core but
/// change nothing wake no watcher of the metrics, and a write still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_reported_only_when_they_change() {
    let nodes = three_replicas().await;
    let (_, led, _) = written_then_split(&nodes, 3).await;
    // No ticks: nothing moves in the group unless asked.
    for n in &nodes {
        n.raft.runtime_config().tick(false);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut watches: Vec<_> = nodes.iter().map(|n| n.raft.metrics()).collect();
    for w in &mut watches {
        w.borrow_and_update();
    }
    for round in 0..5 {
        for n in &nodes {
            // Handled by the core's loop, which then flushes its metrics.
            n.raft.with_raft_state(|_| ()).await.unwrap();
        }
        for (n, w) in nodes.iter().zip(&watches) {
            assert!(
                !w.has_changed().unwrap(),
                "round {round}: replica {} reported unchanged metrics",
                n.addr
            );
        }
    }
    for n in &nodes {
        n.raft.runtime_config().tick(true);
    }
    led[0].raft.client_write(batch(4)).await.unwrap();
    let leader = nodes.iter().position(|n| std::ptr::eq(n, led[0])).unwrap();
    assert!(
        watches[leader].has_changed().unwrap(),
        "a write changed the leader's log, and its metrics said nothing"
    );
}

/// A follower whose leader's node gossip has declared gone, and that has heard nothing
/// from the leader for a leader lease, campaigns at once (`RaftService::elect_without`):
/// one survivor only, the lowest live id, so that two survivors told at the same moment do
/// not split the vote. The followers' election timers are stopped here, so only that call
/// can elect anyone. A leader that still heartbeats keeps its followers even when named
/// gone (gossip can be wrong), and a silent leader not named gone is left to the timers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_leader_is_gone_and_silent_campaigns_at_once() {
    use std::collections::BTreeSet;

    let nodes = three_replicas().await;
    let (leader, old, followers) = written_then_split(&nodes, 5).await;
    for f in &followers {
        f.raft.runtime_config().tick(false);
    }
    // The harness's longest election timeout, which is openraft's leader lease.
    let lease = Duration::from_millis(800);
    let gone = BTreeSet::from([leader]);
    let ids: Vec<u64> = followers
        .iter()
        .map(|f| f.raft.metrics().borrow().id)
        .collect();
    let alive: BTreeSet<u64> = ids.iter().copied().collect();
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert!(
        followers[0]
            .service
            .elect_without(&alive, &gone, lease)
            .is_empty(),
        "a leader that heartbeats keeps its followers, whatever gossip says"
    );

    old[0].raft.shutdown().await.unwrap();
    let stopped = Instant::now();
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    assert!(
        followers[0]
            .service
            .elect_without(&alive, &BTreeSet::new(), lease)
            .is_empty(),
        "a leader gossip has not declared gone is left to the election timers"
    );
    // Both survivors hear of the death at the same moment: only the lowest id campaigns.
    let (first, second) = tokio::join!(
        async { followers[0].service.elect_without(&alive, &gone, lease) },
        async { followers[1].service.elect_without(&alive, &gone, lease) },
    );
    assert_eq!(
        (first, second),
        (vec![PARTITION], vec![]),
        "replica {} campaigns, replica {} waits for its timer",
        ids[0],
        ids[1]
    );
    let new_leader = leader_of(&followers).await;
    assert_eq!(new_leader, ids[0], "the chosen survivor won the election");
    println!(
        "raft: leader {leader} stopped; {new_leader} leads after {:?}, elected without timers",
        stopped.elapsed()
    );
    // Writes through the partition log tick the group again (`RaftLog::queue` pokes it):
    // a follower learns a commit from the leader's next AppendEntries, a heartbeat here.
    for f in &followers {
        f.raft.runtime_config().tick(true);
    }
    write(&followers, 6..=8).await;
    converged(&followers, 8).await;
}

/// A replica made to campaign on the liveness signal is not made to campaign again before
/// its election has begun: the driver runs twice in a moment when gossip's view changes
/// twice, and a second election in the next term would throw away the first one's votes.
/// On one thread, nothing runs between the two calls, so the first election has not begun.
#[tokio::test(flavor = "current_thread")]
async fn a_survivor_campaigns_once_per_term_on_the_liveness_signal() {
    use std::collections::BTreeSet;

    let nodes = three_replicas().await;
    let (leader, old, followers) = written_then_split(&nodes, 3).await;
    for f in &followers {
        f.raft.runtime_config().tick(false);
    }
    let term = followers[0].raft.metrics().borrow().current_term;
    let lease = Duration::from_millis(800);
    old[0].raft.shutdown().await.unwrap();
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let gone = BTreeSet::from([leader]);
    let alive: BTreeSet<u64> = followers
        .iter()
        .map(|f| f.raft.metrics().borrow().id)
        .collect();
    let service = &followers[0].service;
    assert_eq!(service.elect_without(&alive, &gone, lease), vec![PARTITION]);
    assert!(
        service.elect_without(&alive, &gone, lease).is_empty(),
        "a replica whose election has not begun is not made to start another"
    );
    let new_leader = leader_of(&followers).await;
    let elected = followers
        .iter()
        .find(|f| f.raft.metrics().borrow().id == new_leader)
        .unwrap();
    assert_eq!(
        elected.raft.metrics().borrow().current_term,
        term + 1,
        "one election, in the next term"
    );
    // As above: writes through the partition log tick the group again.
    for f in &followers {
        f.raft.runtime_config().tick(true);
    }
    write(&followers, 4..=5).await;
    converged(&followers, 5).await;
}

/// A replica added after the log it needs was purged gets the partition as a snapshot
/// file, sent over the peer transport in many chunks, and installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_after_the_log_was_purged_installs_a_snapshot_sent_in_chunks() {
    const CHUNK: u64 = 1024;
    let tune = |c: &mut Config| {
        c.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(40);
        c.max_in_snapshot_log_to_keep = 0;
        c.snapshot_max_chunk_size = CHUNK;
    };
    let nodes = [replica_with(1, tune).await, replica_with(2, tune).await];
    initialize(&nodes).await;
    let two: Vec<&Replica> = nodes.iter().collect();
    write(&two, 1..=150).await;
    converged(&two, 150).await;
    let leader = leader_of(&two).await;
    let leader = two
        .iter()
        .find(|r| r.raft.metrics().borrow().id == leader)
        .unwrap();
    let start = Instant::now();
    loop {
        let purged = leader.raft.metrics().borrow().purged.map(|l| l.index);
        if purged.unwrap_or(0) > 100 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the leader did not purge its log: {purged:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let third = replica_with(3, tune).await;
    leader
        .raft
        .add_learner(3, BasicNode::new(&third.addr), true)
        .await
        .unwrap();
    converged(&[&third], 150).await;
    let snapshot = third.raft.metrics().borrow().snapshot;
    assert!(
        snapshot.is_some_and(|s| s.index > 100),
        "the learner caught up from a snapshot: {snapshot:?}"
    );
    assert_eq!(
        third.store.export_partition(PARTITION).unwrap(),
        leader.store.export_partition(PARTITION).unwrap(),
        "the learner holds the leader's partition"
    );
    let files: Vec<_> = std::fs::read_dir(third.store.snapshot_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.len() == 1 && files[0].ends_with(".snap"),
        "the installed snapshot's file and nothing else: {files:?}"
    );
    let bytes = std::fs::metadata(third.store.snapshot_dir().join(&files[0]))
        .unwrap()
        .len();
    assert!(
        bytes > 8 * CHUNK,
        "a snapshot of {bytes} bytes is many chunks"
    );
}

/// Proposals of the default largest body (512 KiB), and last one of the largest a cluster
/// member allows, queued faster than the leader appends them: the proposer splits them into
/// entries by bytes, and replication reads entries for one AppendEntries up to a byte bound,
/// so every request stays inside the peer frame limit and all of them replicate. Merged by count alone, the first entry would be ~20 MiB, more
/// than a peer frame carries, and nothing would commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_proposed_at_once_replicate_in_entries_that_fit_a_frame() {
    use warbler_cluster::raft_log::{
        RaftLog, APPEND_BYTES_MAX, APPEND_ENTRIES_MAX, BATCH_BYTES_MAX,
    };
    use warbler_storage::PartitionLog;

    const BODY: usize = 512 * 1024;
    const PROPOSALS: u64 = 40;
    let nodes = three_replicas().await;
    let all: Vec<&Replica> = nodes.iter().collect();
    let leader = leader_of(&all).await;
    let leader = all
        .iter()
        .find(|r| r.raft.metrics().borrow().id == leader)
        .unwrap();
    // The replicas run with the bounds the node configures. By count alone, one
    // AppendEntries could carry every entry (about 21 MiB, more than a frame); the log
    // reader stops at APPEND_BYTES_MAX, one entry past it at most, which fits.
    let frame = warbler_cluster::transport::PEER_FRAME_BYTES_MAX;
    let entry = BODY.max(BATCH_BYTES_MAX) + 16 * 1024;
    assert!(APPEND_ENTRIES_MAX as usize * entry > frame);
    assert!(APPEND_BYTES_MAX + entry < frame);
    let log = RaftLog::new(64 << 20);
    log.insert(PARTITION, leader.raft.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The last body is the largest a cluster member accepts: it ends up in a request after
    // a full request's worth of the others, and that must still fit a frame.
    let largest = warbler_config::CLUSTER_BODY_BYTES_MAX;
    assert!(APPEND_BYTES_MAX + largest + 16 * 1024 < frame);
    for seq in 1..=PROPOSALS {
        let len = if seq == PROPOSALS { largest } else { BODY };
        let msg = StoredMessage {
            id: format!("m{seq}"),
            ts: seq,
            from: None,
            body: ByteBuf::from(vec![seq as u8; len]),
        };
        let op = Op::Append {
            partition: PARTITION,
            user: "ann".into(),
            seq,
            msg,
        };
        let tx = tx.clone();
        let done: warbler_storage::Done = Box::new(move |r| {
            let _ = tx.send((seq, r));
        });
        log.propose(PARTITION, vec![op], Some(done)).await.unwrap();
    }
    for _ in 0..PROPOSALS {
        let (seq, r) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("every proposal completes")
            .unwrap();
        r.unwrap_or_else(|e| panic!("proposal {seq}: {e}"));
    }
    converged(&all, PROPOSALS).await;
    let last_index = leader.raft.metrics().borrow().last_log_index.unwrap();
    println!(
        "raft: {} bodies of {BODY} B and one of {largest} B committed in log entries up to index {last_index}",
        PROPOSALS - 1
    );

    // A replica added now is every entry (about 29 MiB) behind. Without the reader's byte
    // bound its first AppendEntries would be all of them, more than a frame, and it would
    // never catch up; it does, from the log.
    let late = replica(4).await;
    leader
        .raft
        .add_learner(4, BasicNode::new(&late.addr), true)
        .await
        .unwrap();
    converged(&[&late], PROPOSALS).await;
    let snapshot = late.raft.metrics().borrow().snapshot;
    assert!(
        snapshot.is_none(),
        "the late replica caught up from the log, not a snapshot: {snapshot:?}"
    );
}

/// The proposer of one partition, on the node a test writes through.
mod proposer {
    use super::*;
    use warbler_cluster::raft_log::{RaftLog, CURSOR_DELAY, ENTRIES_IN_FLIGHT};
    use warbler_storage::{Done, PartitionLog, StorageError};

    type Answers = tokio::sync::mpsc::UnboundedReceiver<(u64, Result<(), StorageError>)>;

    /// One replica leading a group of one: commits as soon as its own append is durable.
    async fn alone() -> Replica {
        let r = replica(1).await;
        r.raft
            .initialize(BTreeMap::from([(1, BasicNode::new(&r.addr))]))
            .await
            .unwrap();
        leader_of(&[&r]).await;
        applied_all(&r).await;
        r
    }

    /// Waits until `r` applied its whole log (the entries of its election included).
    async fn applied_all(r: &Replica) {
        let last = r.raft.metrics().borrow().last_log_index;
        r.raft
            .wait(Some(Duration::from_secs(15)))
            .metrics(|m| m.last_applied.map(|l| l.index) >= last, "log applied")
            .await
            .unwrap();
    }

    fn last_index(r: &Replica) -> u64 {
        r.raft.metrics().borrow().last_log_index.unwrap_or(0)
    }

    fn append(seq: u64) -> Op {
        batch(seq).ops[0].clone()
    }

    fn cursor(acked: u64) -> Op {
        Op::Cursor {
            partition: PARTITION,
            user: "ann".into(),
            device: "phone".into(),
            acked,
        }
    }

    /// A `done` that reports `seq`'s answer on the returned channel.
    fn answers() -> (impl Fn(u64) -> Done, Answers) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let done = move |seq: u64| -> Done {
            let tx = tx.clone();
            Box::new(move |r| {
                let _ = tx.send((seq, r));
            })
        };
        (done, rx)
    }

    async fn answer(rx: &mut Answers) -> (u64, Result<(), StorageError>) {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a proposal is answered")
            .expect("answers still come")
    }

    /// Publishes proposed one by one, faster than the leader replicates entries: at most
    /// ENTRIES_IN_FLIGHT entries are ever appended and not yet applied, the rest wait in
    /// the proposer and share the next entry, and every publish lands, in order. Handed to
    /// Raft one entry each, they would queue inside it, a replication round each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proposals_wait_for_the_entries_in_flight_and_share_the_next_one() {
        use std::sync::atomic::{AtomicU64, Ordering};
        const PROPOSALS: u64 = 2000;
        let nodes = three_replicas().await;
        let all: Vec<&Replica> = nodes.iter().collect();
        let id = leader_of(&all).await;
        let leader = *all
            .iter()
            .find(|r| r.raft.metrics().borrow().id == id)
            .unwrap();
        applied_all(leader).await;
        let log = RaftLog::new(1 << 30);
        log.insert(PARTITION, leader.raft.clone());
        let before = last_index(leader);

        // At every change of the leader's metrics: the most entries appended, not applied.
        let most = Arc::new(AtomicU64::new(0));
        let mut metrics = leader.raft.metrics();
        let seen = most.clone();
        let watcher = tokio::spawn(async move {
            while metrics.changed().await.is_ok() {
                let m = metrics.borrow().clone();
                let applied = m.last_applied.map_or(0, |l| l.index);
                let gap = m.last_log_index.unwrap_or(0).saturating_sub(applied);
                seen.fetch_max(gap, Ordering::Relaxed);
            }
        });

        let (done, mut rx) = answers();
        for seq in 1..=PROPOSALS {
            log.propose(PARTITION, vec![append(seq)], Some(done(seq)))
                .await
                .unwrap();
            // The proposer runs between publishes, which come in bursts.
            tokio::task::yield_now().await;
            if seq % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        for n in 1..=PROPOSALS {
            let (seq, result) = answer(&mut rx).await;
            result.unwrap_or_else(|e| panic!("publish {seq}: {e}"));
            assert_eq!(seq, n, "answers come in the order proposed");
        }
        watcher.abort();
        let entries = last_index(leader) - before;
        let most_in_flight = most.load(Ordering::Relaxed);
        println!(
            "proposer: {PROPOSALS} publishes in {entries} entries, at most {most_in_flight} in flight"
        );
        assert!(
            most_in_flight >= 1,
            "the leader's metrics never showed an entry in flight: nothing was measured"
        );
        assert!(
            most_in_flight as usize <= ENTRIES_IN_FLIGHT,
            "{most_in_flight} entries were in Raft at once"
        );
        assert!(
            entries < PROPOSALS / 4,
            "{PROPOSALS} publishes took {entries} entries: they did not share them"
        );
        converged(&all, PROPOSALS).await;
    }

    /// A device's ack nobody waits for waits for a publish to share its entry; with none
    /// coming, it goes alone after CURSOR_DELAY, and still lands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_waits_for_a_publish_to_share_its_entry() {
        let r = alone().await;
        let log = RaftLog::new(1 << 30);
        log.insert(PARTITION, r.raft.clone());
        let (done, mut rx) = answers();
        log.propose(PARTITION, vec![append(1)], Some(done(1)))
            .await
            .unwrap();
        answer(&mut rx).await.1.unwrap();

        let before = last_index(&r);
        log.propose(PARTITION, vec![cursor(1)], None).await.unwrap();
        tokio::time::sleep(CURSOR_DELAY / 5).await;
        log.propose(PARTITION, vec![append(2)], Some(done(2)))
            .await
            .unwrap();
        answer(&mut rx).await.1.unwrap();
        assert_eq!(
            last_index(&r),
            before + 1,
            "the ack and the publish after it share one entry"
        );
        assert_eq!(r.store.cursor(PARTITION, "ann", "phone").unwrap(), 1);

        // Alone, the ack goes once its wait is over.
        let proposed = Instant::now();
        log.propose(PARTITION, vec![cursor(2)], None).await.unwrap();
        while r.store.cursor(PARTITION, "ann", "phone").unwrap() != 2 {
            assert!(
                proposed.elapsed() < Duration::from_secs(10),
                "a lone ack never lands"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            proposed.elapsed() >= CURSOR_DELAY,
            "a lone ack went after {:?}, without waiting for company",
            proposed.elapsed()
        );
        assert_eq!(last_index(&r), before + 2);
    }

    /// The group's leader among `all`, one of its followers, and the replicated log over the
    /// leader's group.
    async fn leader_with_log<'a>(all: &[&'a Replica]) -> (&'a Replica, &'a Replica, RaftLog) {
        let first = leader_of(all).await;
        let leader = *all
            .iter()
            .find(|r| r.raft.metrics().borrow().id == first)
            .unwrap();
        let other = *all
            .iter()
            .find(|r| r.raft.metrics().borrow().id != first)
            .unwrap();
        let log = RaftLog::new(1 << 30);
        log.insert(PARTITION, leader.raft.clone());
        (leader, other, log)
    }

    /// Moves the leadership from `leader` to `other` and back, into terms after `term`. A
    /// voter refuses a campaign while its leader's lease (renewed by every heartbeat) runs,
    /// so the sitting leader stops heartbeating first, as a quiet group would; the third
    /// replica never campaigns on its own.
    async fn there_and_back(all: &[&Replica], leader: &Replica, other: &Replica, term: u64) {
        let ids = [
            leader.raft.metrics().borrow().id,
            other.raft.metrics().borrow().id,
        ];
        let third = *all
            .iter()
            .find(|r| !ids.contains(&r.raft.metrics().borrow().id))
            .unwrap();
        third.raft.runtime_config().elect(false);
        for (from, to) in [(leader, other), (other, leader)] {
            let id = to.raft.metrics().borrow().id;
            from.raft.runtime_config().heartbeat(false);
            let mut tries = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                to.raft.trigger().elect().await.unwrap();
                let moved = leader
                    .raft
                    .wait(Some(Duration::from_secs(2)))
                    .metrics(
                        |m| m.current_leader == Some(id) && m.current_term > term,
                        "leadership moved",
                    )
                    .await;
                if moved.is_ok() {
                    break;
                }
                tries += 1;
                assert!(tries < 5, "replica {id} never won its campaign");
            }
            from.raft.runtime_config().heartbeat(true);
        }
        leader
            .raft
            .wait(Some(Duration::from_secs(15)))
            .metrics(|m| m.state.is_leader(), "leads again")
            .await
            .unwrap();
    }

    /// A publish queued in the proposer while its leader's term ends (here, held by a
    /// leadership transfer that went there and back) fails rather than entering the log
    /// under the leader's next term: its writer read its state in a term that ended, and a
    /// leader elected in between may have written to the same user. What comes after it,
    /// proposed in the new term, goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_proposal_made_in_an_ended_term_fails() {
        let nodes = three_replicas().await;
        let all: Vec<&Replica> = nodes.iter().collect();
        let (leader, other, log) = leader_with_log(&all).await;
        let (done, mut rx) = answers();

        let hold = log
            .hold(PARTITION)
            .expect("the leader replicates the partition");
        let term = leader.raft.metrics().borrow().current_term;
        log.propose(PARTITION, vec![append(1)], Some(done(1)))
            .await
            .unwrap();
        there_and_back(&all, leader, other, term).await;
        applied_all(leader).await;
        log.propose(PARTITION, vec![append(1)], Some(done(2)))
            .await
            .unwrap();
        drop(hold);

        let (seq, stale) = answer(&mut rx).await;
        assert_eq!(seq, 1);
        let why = stale
            .expect_err("a proposal of an ended term fails")
            .to_string();
        assert!(why.contains("term ended"), "{why}");
        let (seq, fresh) = answer(&mut rx).await;
        assert_eq!(seq, 2);
        fresh.unwrap();
        converged(&all, 1).await;
    }
    /// A writer that checked its term just before the term moved proposes under the ended
    /// term, and its proposal may queue behind one made in the new term: it fails all the
    /// same (it read its state in the ended term), and the one of the new term goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_proposal_of_an_ended_term_fails_behind_one_of_the_current_term() {
        let nodes = three_replicas().await;
        let all: Vec<&Replica> = nodes.iter().collect();
        let (leader, other, log) = leader_with_log(&all).await;
        let (done, mut rx) = answers();
        let ended = leader.raft.metrics().borrow().current_term;
        there_and_back(&all, leader, other, ended).await;
        applied_all(leader).await;
        let now = log.leader_term(PARTITION).expect("leads again");
        assert!(now > ended);

        let hold = log
            .hold(PARTITION)
            .expect("the leader replicates the partition");
        log.propose_in(PARTITION, now, vec![append(1)], Some(done(1)))
            .await
            .unwrap();
        log.propose_in(PARTITION, ended, vec![append(2)], Some(done(2)))
            .await
            .unwrap();
        drop(hold);

        let mut answered = std::collections::BTreeMap::new();
        for _ in 0..2 {
            let (seq, result) = answer(&mut rx).await;
            answered.insert(seq, result);
        }
        answered[&1]
            .clone()
            .expect("the proposal of the current term lands");
        let why = answered[&2]
            .clone()
            .expect_err("the proposal of the ended term fails")
            .to_string();
        assert!(why.contains("term ended"), "{why}");
        converged(&all, 1).await;
        assert_eq!(leader.store.last_seq(PARTITION, "ann").unwrap(), 1);
    }

    /// A barrier settles the partition for its leader's term: a mailbox started later in
    /// that term, after a clean stop of its predecessor, reads its state without a barrier
    /// of its own. A leadership that went elsewhere and came back has a new term, and the
    /// partition is not settled until a barrier in it; a follower never is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_barrier_settles_the_partition_for_its_leaders_term_only() {
        let nodes = three_replicas().await;
        let all: Vec<&Replica> = nodes.iter().collect();
        let (leader, other, log) = leader_with_log(&all).await;
        assert!(!log.settled(PARTITION), "no barrier yet");
        log.barrier(PARTITION).await.unwrap();
        assert!(log.settled(PARTITION), "settled by the barrier");

        let term = leader.raft.metrics().borrow().current_term;
        there_and_back(&all, leader, other, term).await;
        assert!(log.leader_term(PARTITION).is_some_and(|t| t > term));
        assert!(
            !log.settled(PARTITION),
            "a barrier of an earlier term settles nothing now"
        );
        log.barrier(PARTITION).await.unwrap();
        assert!(log.settled(PARTITION), "settled in the new term");

        let follower = RaftLog::new(1 << 30);
        follower.insert(PARTITION, other.raft.clone());
        assert!(follower.barrier(PARTITION).await.is_err(), "not the leader");
        assert!(!follower.settled(PARTITION));
    }

    /// A barrier answers only once every proposal queued before it is: a crashed writer's
    /// proposals may still wait in the proposer (here, held by a leadership transfer), and
    /// they enter the log ahead of anything its successor proposes, so the successor reads
    /// its state after them. A barrier that looked only at the log would answer at once,
    /// and the successor would hand out the seq still queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_barrier_waits_for_the_proposals_queued_before_it() {
        let nodes = three_replicas().await;
        let all: Vec<&Replica> = nodes.iter().collect();
        let (leader, _, log) = leader_with_log(&all).await;
        // Settled and confirmed: nothing but the queued proposal can hold the next one up.
        log.barrier(PARTITION).await.unwrap();
        let log = Arc::new(log);
        let (done, mut rx) = answers();

        let hold = log
            .hold(PARTITION)
            .expect("the leader replicates the partition");
        log.propose(PARTITION, vec![append(1)], Some(done(1)))
            .await
            .unwrap();
        let barrier = tokio::spawn({
            let log = log.clone();
            async move { log.barrier(PARTITION).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !barrier.is_finished(),
            "the barrier answered while a proposal made before it still waited"
        );
        assert_eq!(leader.store.last_seq(PARTITION, "ann").unwrap(), 0);
        drop(hold);

        barrier.await.unwrap().unwrap();
        assert_eq!(
            leader.store.last_seq(PARTITION, "ann").unwrap(),
            1,
            "the proposal queued before the barrier is applied when it answers"
        );
        let (seq, result) = answer(&mut rx).await;
        assert_eq!(seq, 1);
        result.unwrap();
    }
}
