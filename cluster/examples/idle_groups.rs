//! Measures what idle Raft groups cost: 3 replicas x N partitions (one Raft group per
//! partition, all sharing one peer transport per node, as in a cluster) in one process,
//! leaders elected, nothing written; prints the process CPU over a quiet interval.
//!
//!   cargo run --release --example idle_groups -- [partitions=64] [heartbeat_ms=50] [seconds=10]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, Config, Raft};
use warbler_cluster::raft_net::{start_group, RaftService};
use warbler_cluster::raft_store::TypeConfig;
use warbler_cluster::PeerTransport;
use warbler_storage::Store;

#[path = "common/cpu.rs"]
mod cpu;
use cpu::cpu_secs;

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let partitions = *args.first().unwrap_or(&64) as u16;
    let heartbeat = *args.get(1).unwrap_or(&50);
    let seconds = *args.get(2).unwrap_or(&10);
    let config = Arc::new(
        Config {
            heartbeat_interval: heartbeat,
            election_timeout_min: heartbeat * 4,
            election_timeout_max: heartbeat * 8,
            ..Default::default()
        }
        .validate()
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let store = Store::open(&dir.path().join(id.to_string())).unwrap();
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
        nodes.push((id, store, service, transport));
    }
    let members: BTreeMap<u64, BasicNode> = nodes
        .iter()
        .map(|(id, _, _, t)| (*id, BasicNode::new(t.local_addr().to_string())))
        .collect();
    let mut rafts: Vec<Raft<TypeConfig>> = Vec::new();
    for p in 0..partitions {
        for (id, store, service, transport) in &nodes {
            let raft = start_group(*id, p, config.clone(), store, transport, service, None)
                .await
                .unwrap();
            if *id == 1 + u64::from(p) % 3 {
                raft.initialize(members.clone()).await.unwrap();
            }
            rafts.push(raft);
        }
    }
    let start = Instant::now();
    while rafts
        .iter()
        .any(|r| r.metrics().borrow().current_leader.is_none())
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "leaders not elected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, t0) = (cpu_secs("self"), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = (cpu_secs("self") - cpu0) / t0.elapsed().as_secs_f64();
    println!(
        "idle raft groups: {partitions} partitions x 3 replicas, heartbeat {heartbeat} ms: {:.1}% of one core for the whole 3-node cluster ({:.3}% per replica group)",
        cpu * 100.0,
        cpu * 100.0 / (f64::from(partitions) * 3.0)
    );
}
