//! SWIM membership over real UDP sockets on loopback: join through a seed, detect a killed
//! node, let a restarted node back in, see a graceful leave, and keep every member while
//! both cores are busy. Times are printed (liveness bounds are generous; the figures are
//! what docs/benchmarks.md quotes).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use warbler_cluster::{Membership, NodeId, Timing};

fn id(name: &str, generation: u64) -> NodeId {
    NodeId {
        name: name.into(),
        gossip: "127.0.0.1:0".parse().unwrap(),
        generation,
    }
}

async fn start(name: &str, generation: u64, seeds: &[SocketAddr]) -> Membership {
    Membership::start(id(name, generation), seeds.to_vec(), Timing::lan())
        .await
        .unwrap()
}

/// Waits until `m` sees exactly `names` (other members), up to `limit`; returns the wait.
async fn until_view(m: &Membership, names: &[&str], limit: Duration) -> Duration {
    let start = Instant::now();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    loop {
        let mut got: Vec<String> = m.members().into_iter().map(|n| n.name).collect();
        got.sort();
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{} sees {got:?}, wanted {want:?} within {limit:?}",
            m.me().name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_detect_failures_rejoin_and_leave() {
    let limit = Duration::from_secs(15);
    let a = start("a", 1, &[]).await;
    let seed = [a.me().gossip];
    let b = start("b", 1, &seed).await;
    let c = start("c", 1, &seed).await;
    let joined = until_view(&a, &["b", "c"], limit).await;
    until_view(&b, &["a", "c"], limit).await;
    until_view(&c, &["a", "b"], limit).await;
    println!("membership: 3 nodes joined through one seed in {joined:?}");

    // Busy cores must not cause false downs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
        })
        .collect();
    let busy_until = Instant::now() + Duration::from_secs(5);
    let mut false_downs = 0;
    while Instant::now() < busy_until {
        for m in [&a, &b, &c] {
            if m.members().len() != 2 {
                false_downs += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in burners {
        t.join().unwrap();
    }
    println!("membership: {false_downs} samples with a missing member during 5 s of 2 busy cores");
    assert_eq!(
        false_downs, 0,
        "a live member was declared down while the cores were busy"
    );

    // kill: no goodbye.
    let c_addr = c.me().gossip;
    drop(c);
    let detect = until_view(&a, &["b"], limit).await;
    until_view(&b, &["a"], limit).await;
    println!("membership: a killed node was declared down after {detect:?}");

    // The same node restarts with a higher generation and is let back in.
    let c2 = Membership::start(
        NodeId {
            name: "c".into(),
            gossip: c_addr,
            generation: 2,
        },
        seed.to_vec(),
        Timing::lan(),
    )
    .await
    .unwrap();
    let rejoin = until_view(&a, &["b", "c"], limit).await;
    assert!(a
        .members()
        .iter()
        .any(|n| n.name == "c" && n.generation == 2));
    until_view(&c2, &["a", "b"], limit).await;
    println!("membership: the restarted node was back after {rejoin:?}");

    // A graceful leave.
    b.leave().await;
    let left = until_view(&a, &["c"], limit).await;
    println!("membership: a leaving node was gone after {left:?}");
}

/// A node whose seeds were wrong (a DNS name that resolved before the other pods existed)
/// joins once it is given new seed addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_alone_joins_through_seeds_given_later() {
    let a = start("a", 1, &[]).await;
    // Nobody listens here.
    let nowhere = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_seed = nowhere.local_addr().unwrap();
    drop(nowhere);
    let b = start("b", 1, &[dead_seed]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(b.members().is_empty(), "b cannot have joined yet");
    b.set_seeds(vec![a.me().gossip]).await;
    let joined = until_view(&b, &["a"], Duration::from_secs(10)).await;
    until_view(&a, &["b"], Duration::from_secs(10)).await;
    println!("membership: joined {joined:?} after new seeds were set");
}

fn meta(name: &str, cluster: &str) -> warbler_cluster::NodeMeta {
    let addr: SocketAddr = cluster.parse().unwrap();
    warbler_cluster::NodeMeta {
        name: name.into(),
        client: addr,
        http: addr,
        cluster: addr,
        state: warbler_cluster::NodeState::Serving,
        formed: true,
        low_space: false,
        signing_key: Vec::new(),
        zone: None,
    }
}

async fn start_keyed(
    name: &str,
    generation: u64,
    seeds: &[SocketAddr],
    cluster: &str,
    key: Option<&str>,
) -> Membership {
    let key = key.map(|k| warbler_cluster::ClusterKey::new(k.as_bytes()).unwrap());
    Membership::start_with_meta(
        id(name, generation),
        seeds.to_vec(),
        Timing::lan(),
        Some(meta(name, cluster)),
        Default::default(),
        key,
        None,
    )
    .await
    .unwrap()
}

/// The address `m` believes `name`'s cluster port is at.
fn cluster_addr_of(m: &Membership, name: &str) -> Option<SocketAddr> {
    m.metas().borrow().get(name).map(|n| n.cluster)
}

/// A stranger announces itself under a member's name with a newer generation and its own
/// address. Without a cluster key it is heard, but the metadata is not signed by the
/// member's own key and nothing moves (before metadata was signed, this moved the member
/// for good); with one, the stranger's datagrams are dropped altogether.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_gossip_update_moves_no_node_of_a_keyed_cluster() {
    const KEY: &str = "gossip test key, long enough to be accepted......";
    let limit = Duration::from_secs(15);
    let real = "127.0.0.1:7001";
    let forged = "10.9.9.9:7001";
    for key in [None, Some(KEY)] {
        let a = start_keyed("a", 1, &[], "127.0.0.1:7000", key).await;
        let b = start_keyed("b", 1, &[a.me().gossip], real, key).await;
        until_view(&a, &["b"], limit).await;
        let started = Instant::now();
        while cluster_addr_of(&a, "b") != Some(real.parse().unwrap()) {
            assert!(started.elapsed() < limit, "a never learnt b's address");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The stranger holds no key (or, in the control, needs none).
        let stranger = start_keyed("b", u64::MAX / 2, &[a.me().gossip], forged, None).await;
        let watch = Instant::now();
        let mut moved = false;
        while watch.elapsed() < Duration::from_secs(6) {
            if cluster_addr_of(&a, "b") == Some(forged.parse().unwrap()) {
                moved = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match key {
            // Without a key the stranger is heard, but its metadata is not signed by b's
            // own key, so b does not move either.
            None => {
                assert!(!moved, "a forged update moved b in an open cluster");
                assert!(
                    a.members().iter().any(|n| n.generation == u64::MAX / 2),
                    "control: the stranger was heard in an open cluster"
                );
            }
            Some(_) => {
                assert!(!moved, "a forged update moved b in a keyed cluster");
                assert!(stranger.members().is_empty(), "the stranger was let in");
                let gens: Vec<u64> = a.members().iter().map(|n| n.generation).collect();
                assert_eq!(gens, vec![1], "a's view of b changed");
            }
        }
        drop((a, b, stranger));
    }
}

/// A member holding the cluster key announces metadata under another member's name, with a
/// newer generation and its own address: it is not signed by that member's own key, so
/// nothing moves. Once the real member is gone for good, its name is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_announce_metadata_for_another() {
    const KEY: &str = "gossip test key, long enough to be accepted......";
    let limit = Duration::from_secs(15);
    let real = "127.0.0.1:7001";
    let forged = "10.9.9.9:7001";
    let a = start_keyed("a", 1, &[], "127.0.0.1:7000", Some(KEY)).await;
    let b = start_keyed("b", 1, &[a.me().gossip], real, Some(KEY)).await;
    until_view(&a, &["b"], limit).await;
    let started = Instant::now();
    while cluster_addr_of(&a, "b") != Some(real.parse().unwrap()) {
        assert!(started.elapsed() < limit, "a never learnt b's address");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An insider: it holds the key, so its gossip is heard.
    let insider = start_keyed("b", u64::MAX / 2, &[a.me().gossip], forged, Some(KEY)).await;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            cluster_addr_of(&a, "b"),
            Some(real.parse().unwrap()),
            "another member's metadata moved b"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        a.members().iter().any(|m| m.generation == u64::MAX / 2),
        "control: the insider's gossip was heard (it holds the key)"
    );
    drop((a, b, insider));
}
