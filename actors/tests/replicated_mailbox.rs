//! The mailbox actors, unchanged, over the replicated partition log: on the partition's
//! leader they assign seqs and answer after majority commit, every replica ends up with the
//! same messages, and a follower's mailbox refuses to write (single writer).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, Config, Raft};
use serde_bytes::ByteBuf;
use warbler_actors::{MailboxError, MailboxLimits, Mailboxes, RegistryArgs};
use warbler_cluster::raft_log::RaftLog;
use warbler_cluster::raft_net::{start_group, RaftService};
use warbler_cluster::raft_store::TypeConfig;
use warbler_cluster::{partition_of, PeerTransport};
use warbler_storage::{PartitionLog, Store};

const PARTITIONS: u16 = 64;
const USER: &str = "ann";

struct Replica {
    _dir: tempfile::TempDir,
    store: Store,
    raft: Raft<TypeConfig>,
    log: Arc<RaftLog>,
    addr: String,
}

async fn replica(id: u64, partition: u16) -> Replica {
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
        ..Default::default()
    };
    let raft = start_group(
        id,
        partition,
        Arc::new(config.validate().unwrap()),
        &store,
        &transport,
        &service,
        None,
    )
    .await
    .unwrap();
    let log = Arc::new(RaftLog::new(64 << 20));
    log.insert(partition, raft.clone());
    Replica {
        _dir: dir,
        store,
        raft,
        log,
        addr: transport.local_addr().to_string(),
    }
}

fn mailbox_limits() -> MailboxLimits {
    MailboxLimits {
        inflight_max: 16,
        tail_cache_max: 8,
        idle_timeout: Duration::from_secs(60),
        sleep_after: Duration::ZERO,
        cursor_flush: Duration::ZERO,
        unacked_max: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailboxes_write_through_the_leader_and_every_replica_agrees() {
    let partition = partition_of(USER, PARTITIONS);
    let nodes = [
        replica(1, partition).await,
        replica(2, partition).await,
        replica(3, partition).await,
    ];
    let members: BTreeMap<u64, BasicNode> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u64 + 1, BasicNode::new(&n.addr)))
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();
    let start = Instant::now();
    let leader = loop {
        if let Some(l) = nodes.iter().find(|n| n.log.writable(partition)) {
            break l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no leader elected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let (mailboxes, _) = Mailboxes::start(RegistryArgs {
        store: leader.store.clone(),
        log: leader.log.clone(),
        limits: mailbox_limits(),
        partitions: PARTITIONS,
    })
    .await
    .unwrap();
    for i in 1..=20u64 {
        let seq = mailboxes
            .publish(USER, &format!("m{i}"), ByteBuf::from(vec![i as u8]), None)
            .await
            .unwrap();
        assert_eq!(seq, i);
    }
    let again = mailboxes
        .publish(USER, "m7", ByteBuf::from(vec![0]), None)
        .await
        .unwrap();
    assert_eq!(again, 7, "dedup holds through the replicated log");

    for n in &nodes {
        let start = Instant::now();
        while n.store.verify_user(partition, USER).unwrap() != Some((1, 20)) {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "replica {} did not converge",
                n.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(n.store.dedup(partition, USER, "m7").unwrap(), Some(7));
    }

    // A follower's mailbox cannot assign a seq: it is not the partition's writer.
    let follower = nodes.iter().find(|n| !n.log.writable(partition)).unwrap();
    let (follower_mailboxes, _) = Mailboxes::start(RegistryArgs {
        store: follower.store.clone(),
        log: follower.log.clone(),
        limits: mailbox_limits(),
        partitions: PARTITIONS,
    })
    .await
    .unwrap();
    let refused = follower_mailboxes
        .publish(USER, "from-follower", ByteBuf::from(vec![1]), None)
        .await;
    assert!(
        matches!(refused, Err(MailboxError::NoLeader(_))),
        "{refused:?}"
    );
    assert_eq!(follower.store.last_seq(partition, USER).unwrap(), 20);
}
