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
        // As the node sets it for its largest body (512 KiB by default).
        max_payload_entries: warbler_cluster::raft_log::max_payload_entries(512 * 1024),
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
    Replica {
        _dir: dir,
        store,
        service,
        raft,
        addr: transport.local_addr().to_string(),
    }
}

/// One partition's group on three fresh replicas, initialized.
async fn three_replicas() -> [Replica; 3] {
    let nodes = [replica(1).await, replica(2).await, replica(3).await];
    let members: BTreeMap<u64, BasicNode> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u64 + 1, BasicNode::new(&n.addr)))
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();
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
        }],
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_survives_losing_its_leader() {
    let nodes = three_replicas().await;
    let all: Vec<&Replica> = nodes.iter().collect();
    let first_leader = leader_of(&all).await;
    write(&all, 1..=20).await;
    converged(&all, 20).await;

    // The leader stops; the other two elect a new leader and go on from the same log.
    let (gone, survivors): (Vec<&Replica>, Vec<&Replica>) = nodes
        .iter()
        .partition(|r| r.raft.metrics().borrow().id == first_leader);
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

/// Proposals of the largest allowed body (512 KiB) queued faster than the leader appends
/// them: the proposer splits them into entries by bytes, so every AppendEntries stays
/// inside the peer frame limit and all of them replicate. Merged by count alone, the first
/// entry would be ~20 MiB, more than a peer frame carries, and nothing would commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_proposed_at_once_replicate_in_entries_that_fit_a_frame() {
    use warbler_cluster::raft_log::{max_payload_entries, RaftLog, BATCH_BYTES_MAX};
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
    // The replicas run with the bound the node configures: a full AppendEntries of such
    // entries fits the frame.
    let frame = warbler_cluster::transport::PEER_FRAME_BYTES_MAX as u64;
    assert!(max_payload_entries(BODY) * ((BODY.max(BATCH_BYTES_MAX) + 16 * 1024) as u64) < frame);
    let log = RaftLog::new(64 << 20);
    log.insert(PARTITION, leader.raft.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for seq in 1..=PROPOSALS {
        let msg = StoredMessage {
            id: format!("m{seq}"),
            ts: seq,
            from: None,
            body: ByteBuf::from(vec![seq as u8; BODY]),
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
        "raft: {PROPOSALS} bodies of {BODY} B committed in log entries up to index {last_index}"
    );
}
