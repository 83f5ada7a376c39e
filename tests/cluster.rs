//! Acceptance of the cluster: three real `warbler serve` processes, RF = 3.
//!
//! - `kill -9` of the leader of a hot user's partition, repeatedly, while publishers run
//!   against every node: nothing acknowledged is lost, every device sees 1..n in order,
//!   every id keeps one seq, the restarted node catches up.
//! - A leader paused (SIGSTOP) past the election timeout acknowledges nothing under its old
//!   term: no id gets two seqs, no seq two ids.
//! - A node cut off from the other two acknowledges nothing for the partitions it led; the
//!   majority keeps serving.
//! - A follower that comes back behind is not ready until it has applied what its leaders
//!   had applied.
//! - Nodes join and leave under load, and nothing is lost.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{seed, token, Node};
use rand::{Rng, SeedableRng};
use warbler_chaos::ports::free_port;
use warbler_client::api::{ClusterStatus, Decommissioned, ErrorBody, UserPlacement};
use warbler_client::http::{HttpError, NodeHttp};

const USERS: usize = 12;
/// The user whose partition's leader the faults target.
const HOT: &str = "u0";

struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
    cluster_addrs: Vec<String>,
    env: Vec<(String, String)>,
    /// Node i's `--zone` (none when shorter).
    zones: Vec<String>,
}

/// Writes a secret file readable by its owner only, as an operator would.
fn write_private(path: &std::path::Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The start of every test cluster's key; each cluster's own directory ends it. Tests run
/// side by side and reuse each other's freed ports: a node that a stopped cluster's members
/// still knew by its address must not be able to talk to them.
const CLUSTER_KEY: &str = "the test cluster's key, long enough to be accepted";

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, tempfile::tempdir().unwrap(), &[]).await
    }

    async fn start_with(n: usize, dir: tempfile::TempDir, env: &[(&str, &str)]) -> Cluster {
        Cluster::start_zoned(n, dir, env, &[]).await
    }

    async fn start_zoned(
        n: usize,
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
        zones: &[&str],
    ) -> Cluster {
        let mut c = Cluster {
            _dir: dir,
            nodes: Vec::new(),
            cluster_addrs: Vec::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            zones: zones.iter().map(|z| z.to_string()).collect(),
        };
        for _ in 0..n {
            c.spawn(n);
        }
        for i in 0..n {
            c.wait_ready(i, Duration::from_secs(60)).await;
        }
        c
    }

    /// Starts node `n<len>`, joining through `n0`; `expect` is its --bootstrap-expect.
    fn spawn(&mut self, expect: usize) -> usize {
        let i = self.nodes.len();
        let addr = format!("127.0.0.1:{}", free_port());
        self.cluster_addrs.push(addr.clone());
        let name = format!("n{i}");
        let key = self._dir.path().join("cluster.key");
        if !key.exists() {
            write_private(
                &key,
                &format!("{CLUSTER_KEY} {}", self._dir.path().display()),
            );
        }
        let key = key.display().to_string();
        let mut vars = vec![
            ("WARBLER_CLUSTER_KEY_FILE", key.as_str()),
            ("WARBLER_RAFT_HEARTBEAT_MS", "100"),
            ("WARBLER_RAFT_ELECTION_TIMEOUT_MS", "500"),
            ("WARBLER_FAULT_INJECTION", "true"),
        ];
        vars.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // WARBLER_TEST_LOG=info (or a filter) shows the nodes' logs when a test fails.
        let level = std::env::var("WARBLER_TEST_LOG").ok();
        if let Some(level) = &level {
            vars.push(("WARBLER_LOG", level));
        }
        let expect = expect.to_string();
        let mut args = vec![
            "--node-id",
            &name,
            "--cluster-addr",
            &addr,
            "--seeds",
            &self.cluster_addrs[0],
            "--bootstrap-expect",
            &expect,
        ];
        if let Some(zone) = self.zones.get(i) {
            args.extend(["--zone", zone.as_str()]);
        }
        let node = Node::start_with(&self._dir.path().join(&name), &vars, &args);
        self.nodes.push(node);
        i
    }

    async fn wait_ready(&self, i: usize, within: Duration) {
        let start = Instant::now();
        loop {
            let (status, v) = self.nodes[i].http("GET", "/readyz", None, "").await;
            if status == 200 {
                return;
            }
            assert!(
                start.elapsed() < within,
                "node n{i} not ready after {within:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET /v1/cluster from the first node that answers, skipping `except`.
    async fn status(&self, except: Option<usize>) -> ClusterStatus {
        for (i, n) in self.nodes.iter().enumerate() {
            if Some(i) == except {
                continue;
            }
            if let Some(v) = n.status().await {
                return v;
            }
        }
        panic!("no node answers /v1/cluster");
    }

    /// The index of the node leading `user`'s partition (waits for one to be elected).
    async fn leader_of(&self, user: &str, except: Option<usize>) -> usize {
        let partition = warbler_cluster::partition_of(user, 64);
        let start = Instant::now();
        loop {
            let v = self.status(except).await;
            if let Some(l) = &v.partitions[partition as usize].leader {
                return l.trim_start_matches('n').parse().unwrap();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no leader for {user}: {:?}",
                v.partitions[partition as usize]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn clients(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }
}

/// id → (user, seqs it was acknowledged with).
type Outcomes = Arc<Mutex<HashMap<String, (String, Vec<u64>)>>>;

/// Publishes to every user through the node `clients[k % n]`, moving to the next node when
/// a connection fails, retrying each id with the same id until it is acknowledged.
async fn publisher(
    clients: Arc<Mutex<Vec<String>>>,
    k: usize,
    outcomes: Outcomes,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut node = k;
    let mut conn: Option<warbler_client::Connection> = None;
    let mut i = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let id = format!("p{k}-{i}");
        let user = if i.is_multiple_of(2) {
            HOT.to_string()
        } else {
            format!("u{}", (k + i) % USERS)
        };
        outcomes
            .lock()
            .unwrap()
            .entry(id.clone())
            .or_insert((user.clone(), Vec::new()));
        if conn.is_none() {
            let addr = {
                let c = clients.lock().unwrap();
                c[node % c.len()].clone()
            };
            let opts = warbler_client::ConnectOptions::new(
                addr,
                token("backend", "publish"),
                format!("pub{k}"),
            );
            match tokio::time::timeout(
                Duration::from_secs(2),
                warbler_client::Connection::connect(opts),
            )
            .await
            {
                Ok(Ok(c)) => conn = Some(c),
                _ => {
                    node += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        match tokio::time::timeout(
            Duration::from_secs(20),
            c.publish_wait(&id, &user, id.as_bytes()),
        )
        .await
        {
            Ok(Ok(seq)) => {
                outcomes.lock().unwrap().get_mut(&id).unwrap().1.push(seq);
                i += 1;
            }
            Ok(Err(warbler_client::ClientError::Server { .. })) => {
                // A refusal (no leader yet): retry the same id after a moment.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => {
                // Connection lost or stuck: retry the same id on another node.
                conn = None;
                node += 1;
            }
        }
    }
}

/// Every user's full stream from a device on node `via`: 1..=n in order, every
/// acknowledged (id, seq) at its place, no id at two seqs.
async fn check_streams(cluster: &Cluster, via: usize, outcomes: &Outcomes) -> usize {
    let outcomes = outcomes.lock().unwrap().clone();
    let mut by_user: HashMap<String, BTreeMap<u64, String>> = HashMap::new();
    for (id, (user, seqs)) in &outcomes {
        if let Some(first) = seqs.first() {
            assert!(
                seqs.iter().all(|s| s == first),
                "id {id} acknowledged with different seqs {seqs:?}"
            );
            let prev = by_user
                .entry(user.clone())
                .or_default()
                .insert(*first, id.clone());
            assert!(
                prev.is_none(),
                "seq {first} of {user} acknowledged for two ids ({id}, {prev:?})"
            );
        }
    }
    let mut delivered_total = 0;
    for (user, acked) in &by_user {
        let last = *acked.keys().last().unwrap();
        let mut dev = cluster.nodes[via].device(user, "checker").await;
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut expect = 1;
        while expect <= last {
            let m = tokio::time::timeout(Duration::from_secs(20), dev.recv_msg())
                .await
                .unwrap_or_else(|_| panic!("{user}: stuck waiting for seq {expect} of {last}"))
                .unwrap();
            assert_eq!(
                m.seq, expect,
                "{user}: got seq {} where {expect} was due",
                m.seq
            );
            if let Some(id) = acked.get(&m.seq) {
                assert_eq!(
                    &m.id, id,
                    "{user}: seq {} holds {} but {id} was acknowledged with it",
                    m.seq, m.id
                );
            }
            if let Some(other) = seen.insert(m.id.clone(), m.seq) {
                panic!("{user}: id {} delivered at seq {other} and {}", m.id, m.seq);
            }
            if !outcomes.contains_key(&m.id) {
                panic!("{user}: delivered id {} that nobody published", m.id);
            }
            dev.ack(m.seq).await.unwrap();
            expect += 1;
        }
        delivered_total += last as usize;
    }
    delivered_total
}

fn acked_count(outcomes: &Outcomes) -> usize {
    outcomes
        .lock()
        .unwrap()
        .values()
        .filter(|(_, s)| !s.is_empty())
        .count()
}

fn acked_for(outcomes: &Outcomes, user: &str) -> usize {
    outcomes
        .lock()
        .unwrap()
        .values()
        .filter(|(u, s)| u == user && !s.is_empty())
        .count()
}

/// The stop flag, the node list the publishers pick from, and their tasks.
type Publishers = (
    Arc<std::sync::atomic::AtomicBool>,
    Arc<Mutex<Vec<String>>>,
    Vec<tokio::task::JoinHandle<()>>,
);

fn start_publishers(cluster: &Cluster, outcomes: &Outcomes, n: usize) -> Publishers {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = Arc::new(Mutex::new(cluster.clients()));
    let tasks = (0..n)
        .map(|k| {
            tokio::spawn(publisher(
                clients.clone(),
                k,
                outcomes.clone(),
                stop.clone(),
            ))
        })
        .collect();
    (stop, clients, tasks)
}

async fn stop_publishers(
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_leader_loses_nothing_acknowledged() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("cluster-kill9"));
    let mut cluster = Cluster::start(3).await;
    let outcomes: Outcomes = Arc::default();
    let (stop, clients, tasks) = start_publishers(&cluster, &outcomes, 6);
    let mut downtimes = Vec::new();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(800..2000))).await;
        let victim = cluster.leader_of(HOT, None).await;
        let before = acked_for(&outcomes, HOT);
        let t0 = Instant::now();
        cluster.nodes[victim].kill9();
        // Publishing to the hot user resumes on the survivors.
        while acked_for(&outcomes, HOT) <= before + 5 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no publish acknowledged 30 s after killing n{victim}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        downtimes.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.nodes[victim].restart();
        clients.lock().unwrap()[victim] = cluster.nodes[victim].client.clone();
        cluster.wait_ready(victim, Duration::from_secs(60)).await;
        println!(
            "round {round}: killed leader n{victim}; publishing resumed after {:?}",
            downtimes[round]
        );
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_publishers(stop, tasks).await;
    let acked = acked_count(&outcomes);
    assert!(
        acked > 100,
        "the test must publish under load (acked {acked})"
    );
    // Read every stream through each node in turn (sessions on followers subscribe remotely).
    let delivered = check_streams(&cluster, 1, &outcomes).await;
    // The last restarted node caught up: its copy of the hot user's history is complete.
    let hot_last = outcomes
        .lock()
        .unwrap()
        .values()
        .filter(|(u, _)| u == HOT)
        .filter_map(|(_, s)| s.first().copied())
        .max()
        .unwrap();
    for (i, n) in cluster.nodes.iter().enumerate() {
        let start = Instant::now();
        loop {
            let h = n.history(HOT).await;
            if h.len() as u64 >= hot_last
                && h.iter()
                    .enumerate()
                    .all(|(k, (s, _, _))| *s == k as u64 + 1)
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "n{i} holds {} of {hot_last} messages of {HOT}",
                h.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!("cluster kill9: {acked} acknowledged, {delivered} delivered in order; downtimes {downtimes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_acknowledges_nothing_under_its_old_term() {
    let cluster = Cluster::start(3).await;
    let outcomes: Outcomes = Arc::default();
    let (stop, _clients, tasks) = start_publishers(&cluster, &outcomes, 6);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim = cluster.leader_of(HOT, None).await;
    let before = cluster.status(None).await;
    let partition = warbler_cluster::partition_of(HOT, 64) as usize;
    let term_before = before.partitions[partition].term;
    cluster.nodes[victim].pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let new_leader = cluster.leader_of(HOT, Some(victim)).await;
    assert_ne!(
        new_leader, victim,
        "a new leader is elected while n{victim} is paused"
    );
    cluster.nodes[victim].resume();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_publishers(stop, tasks).await;
    let after = cluster.status(None).await;
    assert!(
        after.partitions[partition].term > term_before,
        "the hot partition moved to a new term"
    );
    let acked = acked_count(&outcomes);
    assert!(
        acked > 50,
        "publishes went on around the pause (acked {acked})"
    );
    let delivered = check_streams(&cluster, victim, &outcomes).await;
    println!("pause: leader n{victim} paused 3 s, n{new_leader} took over; {acked} acknowledged, {delivered} delivered in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_node_acknowledges_nothing_and_the_majority_serves() {
    let cluster = Cluster::start(3).await;
    let isolated = cluster.leader_of(HOT, None).await;
    let others: Vec<usize> = (0..3).filter(|i| *i != isolated).collect();
    let admin = token("ops", "admin");
    let block = |addrs: Vec<&String>| serde_json::json!({ "block": addrs }).to_string();
    let (s, v) = cluster.nodes[isolated]
        .http(
            "POST",
            "/v1/debug/faults",
            Some(&admin),
            &block(others.iter().map(|i| &cluster.cluster_addrs[*i]).collect()),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    for &o in &others {
        let (s, v) = cluster.nodes[o]
            .http(
                "POST",
                "/v1/debug/faults",
                Some(&admin),
                &block(vec![&cluster.cluster_addrs[isolated]]),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }
    // The isolated node cannot get a majority: a publish through it is not acknowledged.
    let mut conn = cluster.nodes[isolated].publisher().await;
    let isolated_try = tokio::time::timeout(
        Duration::from_secs(5),
        conn.publish_wait("iso-1", HOT, b"x"),
    )
    .await;
    assert!(
        !matches!(isolated_try, Ok(Ok(_))),
        "the isolated node acknowledged a publish: {isolated_try:?}"
    );
    // The majority elects a leader and serves.
    let majority = &cluster.nodes[others[0]];
    let mut conn2 = majority.publisher().await;
    let t0 = Instant::now();
    let seq = loop {
        match tokio::time::timeout(
            Duration::from_secs(10),
            conn2.publish_wait("maj-1", HOT, b"y"),
        )
        .await
        {
            Ok(Ok(seq)) => break seq,
            other => {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "the majority did not serve: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    println!(
        "isolation: majority acknowledged maj-1 at seq {seq} after {:?}",
        t0.elapsed()
    );
    // Heal; the history has maj-1 exactly once and iso-1 at most once, gap-free.
    for n in &cluster.nodes {
        let (s, _) = n
            .http("POST", "/v1/debug/faults", Some(&admin), r#"{"block":[]}"#)
            .await;
        assert_eq!(s, 200);
    }
    cluster.wait_ready(isolated, Duration::from_secs(30)).await;
    let h = majority.history(HOT).await;
    for (k, (s, _, _)) in h.iter().enumerate() {
        assert_eq!(*s, k as u64 + 1, "gap-free history");
    }
    assert_eq!(h.iter().filter(|(_, id, _)| id == "maj-1").count(), 1);
    assert!(h.iter().filter(|(_, id, _)| id == "iso-1").count() <= 1);
    assert_eq!(h.iter().find(|(_, id, _)| id == "maj-1").unwrap().0, seq);
}

/// Failover figures for docs/benchmarks.md: kill -9 the leader of a fresh user's partition
/// (WARBLER_KILLS times, default 20) while that user gets a publish every 10 ms through a
/// surviving node, and time from the kill until its device (on a surviving node) receives
/// the first message published after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --workspace --test cluster failover_figures -- --ignored --nocapture"]
async fn failover_figures() {
    let kills: usize = std::env::var("WARBLER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    // WARBLER_FAILOVER_DEFAULTS=1: the shipped heartbeat and election timeout (250 ms and
    // 1,000-1,500 ms) instead of the tests' 100 ms and 500-750 ms.
    let defaults = std::env::var("WARBLER_FAILOVER_DEFAULTS").is_ok_and(|v| v == "1");
    let timing: &[(&str, &str)] = if defaults {
        &[
            ("WARBLER_RAFT_HEARTBEAT_MS", "250"),
            ("WARBLER_RAFT_ELECTION_TIMEOUT_MS", "1000"),
        ]
    } else {
        &[]
    };
    let mut cluster = Cluster::start_with(3, tempfile::tempdir().unwrap(), timing).await;
    let mut resumed = Vec::new();
    for k in 0..kills {
        let user = format!("f{k}");
        let victim = cluster.leader_of(&user, None).await;
        let observer = (victim + 1) % 3;
        let mut dev = cluster.nodes[observer].device(&user, "d").await;
        let mut publisher = cluster.nodes[observer].publisher().await;
        let started: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s2, st2, u2) = (stop.clone(), started.clone(), user.clone());
        let pubtask = tokio::spawn(async move {
            let mut i = 0;
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                st2.lock().unwrap().push(Instant::now());
                let id = format!("m{i}");
                loop {
                    match tokio::time::timeout(
                        Duration::from_secs(20),
                        publisher.publish_wait(&id, &u2, b"x"),
                    )
                    .await
                    {
                        Ok(Ok(_)) => break,
                        _ => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        // Warm up: deliveries flow.
        for _ in 0..5 {
            let m = dev.recv_msg().await.unwrap();
            dev.ack(m.seq).await.unwrap();
        }
        let t0 = Instant::now();
        cluster.nodes[victim].kill9();
        let first_after = started.lock().unwrap().len();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), dev.recv_msg())
                .await
                .expect("delivery resumes")
                .unwrap();
            dev.ack(m.seq).await.unwrap();
            let idx: usize = m.id.trim_start_matches('m').parse().unwrap();
            if idx >= first_after {
                resumed.push(t0.elapsed());
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = pubtask.await;
        cluster.nodes[victim].restart();
        cluster.wait_ready(victim, Duration::from_secs(60)).await;
        println!(
            "kill {k}: n{victim}, delivery resumed after {:?}",
            resumed[k]
        );
    }
    resumed.sort();
    let pct =
        |p: f64| resumed[((resumed.len() as f64 * p).ceil() as usize).clamp(1, resumed.len()) - 1];
    println!(
        "failover over {kills} kills ({}): p50 {:?}, p99 {:?}, max {:?}",
        if defaults {
            "heartbeat 250 ms, election timeout 1000-1500 ms"
        } else {
            "heartbeat 100 ms, election timeout 500-750 ms"
        },
        pct(0.5),
        pct(0.99),
        resumed.last().unwrap()
    );
}

/// Stops `victim` with `kill -9`, publishes through the other nodes for `down` (half of it
/// to the hot user, so one partition falls behind by many append batches), and returns how
/// many messages were acknowledged and what the live nodes had applied, per partition.
async fn publish_while_down(
    cluster: &mut Cluster,
    victim: usize,
    down: Duration,
) -> (usize, Vec<u64>) {
    cluster.nodes[victim].kill9();
    let outcomes: Outcomes = Arc::default();
    let (stop, clients, tasks) = start_publishers(cluster, &outcomes, 8);
    clients.lock().unwrap().remove(victim);
    tokio::time::sleep(down).await;
    stop_publishers(stop, tasks).await;
    let mut target = vec![0u64; 64];
    for (i, node) in cluster.nodes.iter().enumerate() {
        if i == victim {
            continue;
        }
        let v = answered_status(node, i).await;
        for (p, t) in target.iter_mut().enumerate() {
            *t = (*t).max(v.partitions[p].applied.unwrap_or(0));
        }
    }
    (acked_count(&outcomes), target)
}

/// Node `i`'s `/v1/cluster`, asked again for up to 10 s: right after a load stops, one
/// request may time out on a busy machine. A formed node lists every partition.
async fn answered_status(node: &Node, i: usize) -> ClusterStatus {
    let start = Instant::now();
    loop {
        if let Some(v) = node.status().await {
            assert_eq!(
                v.partitions.len(),
                64,
                "n{i} is formed but /v1/cluster lists {} partitions",
                v.partitions.len()
            );
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "n{i} is alive but did not answer /v1/cluster for 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Partitions where node `i` has applied less than `target`, as (partition, applied, target).
/// A node that answers but lists no partitions yet (a restarted process that has not
/// joined its groups again) has applied none.
async fn behind(cluster: &Cluster, i: usize, target: &[u64]) -> Vec<(usize, u64, u64)> {
    let listed = cluster.nodes[i].status().await.map(|v| v.partitions);
    let listed = listed.as_deref().unwrap_or_default();
    (0..target.len())
        .map(|p| {
            let applied = listed.get(p).and_then(|x| x.applied).unwrap_or(0);
            (p, applied, target[p])
        })
        .filter(|(_, applied, t)| applied < t)
        .collect()
}

/// Catch-up figure for docs/benchmarks.md: stop one node with `kill -9`, publish through the
/// other two for WARBLER_DOWN_SECS (default 10), restart it and time until every one of its
/// replicas has applied what the others had applied when it came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --workspace --test cluster catchup_figures -- --ignored --nocapture"]
async fn catchup_figures() {
    let down_secs: u64 = std::env::var("WARBLER_DOWN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut cluster = Cluster::start(3).await;
    let victim = 2;
    let (missed, target) =
        publish_while_down(&mut cluster, victim, Duration::from_secs(down_secs)).await;
    let t0 = Instant::now();
    cluster.nodes[victim].restart();
    // When the restarted process first answered: what it held then came from its own disk.
    let mut answered: Option<(Duration, u64)> = None;
    loop {
        let late = behind(&cluster, victim, &target).await;
        if late.is_empty() {
            break;
        }
        let lists_partitions = cluster.nodes[victim]
            .status()
            .await
            .is_some_and(|v| !v.partitions.is_empty());
        if answered.is_none() && lists_partitions {
            let missing: u64 = late.iter().map(|(_, applied, t)| t - applied).sum();
            answered = Some((t0.elapsed(), missing));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "n{victim} did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    println!(
        "catch-up: {missed} messages published while n{victim} was down {down_secs} s; caught up {:?} after restart (process start included): {:.0} msgs/s",
        took,
        missed as f64 / took.as_secs_f64()
    );
    if let Some((at, missing)) = answered {
        // Entries, not messages: an entry carries a batch of publishes.
        let rest = took.saturating_sub(at).as_secs_f64().max(1e-3);
        println!(
            "catch-up: the process answered {at:?} after restart, {missing} entries behind; from then on {:.0} msgs/s ({missed} messages in {rest:.3} s)",
            missed as f64 / rest
        );
    }
}

/// A follower that comes back behind is not ready until it has applied what its leaders had
/// applied: its own log says nothing of the entries it missed, so `/readyz` must compare it
/// with its leaders. The hot partition misses thousands of entries, many append batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_is_not_ready_until_it_has_caught_up() {
    let mut cluster = Cluster::start(3).await;
    let victim = 2;
    let (missed, target) = publish_while_down(&mut cluster, victim, Duration::from_secs(4)).await;
    assert!(
        missed > 500,
        "only {missed} messages published while n{victim} was down"
    );
    cluster.nodes[victim].restart();
    let t0 = Instant::now();
    loop {
        let (status, _) = cluster.nodes[victim].http("GET", "/readyz", None, "").await;
        if status == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "n{victim} not ready 60 s after its restart"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let late = behind(&cluster, victim, &target).await;
    assert!(
        late.is_empty(),
        "n{victim} said ready {:?} after its restart while behind its leaders (partition, applied, leader's): {late:?}",
        t0.elapsed()
    );
    println!(
        "n{victim}: {missed} messages missed, ready and caught up {:?} after its restart",
        t0.elapsed()
    );
}

/// A founding node that finds the others already formed (here `n2`, which waits for a
/// fourth node that never comes, while `n0` and `n1` form with the three of them) still
/// creates the partition groups it is the first replica of: otherwise those groups never
/// get a member and the cluster never becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_late_to_form_still_creates_its_groups() {
    let mut cluster = Cluster {
        _dir: tempfile::tempdir().unwrap(),
        nodes: Vec::new(),
        cluster_addrs: Vec::new(),
        env: Vec::new(),
        zones: Vec::new(),
    };
    cluster.spawn(3);
    cluster.spawn(3);
    cluster.spawn(4);
    for i in 0..3 {
        cluster.wait_ready(i, Duration::from_secs(60)).await;
    }
    let v = cluster.status(None).await;
    let founders: Vec<&str> = v
        .members
        .iter()
        .filter(|m| m.member)
        .map(|m| m.node.as_str())
        .collect();
    assert_eq!(founders, ["n0", "n1", "n2"], "{v:?}");
    let leaderless: Vec<usize> = (0..64)
        .filter(|&p| v.partitions[p].leader.is_none())
        .collect();
    assert!(
        leaderless.is_empty(),
        "partitions without a leader: {leaderless:?}"
    );
}

/// Peer traffic under mutual TLS: a two-node cluster whose nodes hold certificates of one
/// cluster CA forms, forwards a publish to the other node's partition and delivers it to a
/// device through a remote subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_over_mutual_tls() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let node_key = KeyPair::generate().unwrap();
    let node_cert = CertificateParams::new(vec!["warbler-peer".to_string()])
        .unwrap()
        .signed_by(&node_key, &issuer)
        .unwrap();
    let pem = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca = pem("ca.pem", ca_cert.pem());
    let cert = pem("node.pem", node_cert.pem());
    let key = pem("node.key", node_key.serialize_pem());
    let cluster = Cluster::start_with(
        2,
        dir,
        &[
            ("WARBLER_CLUSTER_TLS_CA_FILE", &ca),
            ("WARBLER_CLUSTER_TLS_CERT_FILE", &cert),
            ("WARBLER_CLUSTER_TLS_KEY_FILE", &key),
        ],
    )
    .await;
    // A user whose partition n1 leads, reached through n0.
    let mut user = None;
    for k in 0..200 {
        let u = format!("tls{k}");
        if cluster.leader_of(&u, None).await == 1 {
            user = Some(u);
            break;
        }
    }
    let user = user.expect("n1 leads some partition");
    let seq = cluster.nodes[0].publish(&user, "t1", "over tls").await;
    assert_eq!(seq, 1);
    let mut dev = cluster.nodes[0].device(&user, "d").await;
    let m = tokio::time::timeout(Duration::from_secs(10), dev.recv_msg())
        .await
        .expect("delivered through the remote subscription")
        .unwrap();
    assert_eq!((m.seq, m.id.as_str()), (1, "t1"));

    // The cluster port does not speak plain TCP: a peer without TLS gets no answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warbler_cluster::transport::{PeerFrame, PEER_PROTOCOL_VERSION};
    let mut plain = tokio::net::TcpStream::connect(&cluster.cluster_addrs[0])
        .await
        .unwrap();
    for frame in [
        PeerFrame::Hello {
            v: PEER_PROTOCOL_VERSION,
            from: "intruder".into(),
            nonce: None,
            cluster: None,
        },
        PeerFrame::Request {
            id: 1,
            partition: 0,
            kind: 20,
            body: Default::default(),
        },
    ] {
        let bytes = rmp_serde::to_vec_named(&frame).unwrap();
        let _ = plain.write_all(&(bytes.len() as u32).to_be_bytes()).await;
        let _ = plain.write_all(&bytes).await;
    }
    // All that comes back is, at most, a TLS alert record (content type 21), then EOF.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), plain.read_to_end(&mut got)).await;
    assert!(
        got.is_empty() || got[0] == 21,
        "a plain-TCP peer got an answer from a TLS cluster port: {got:?}"
    );
}

/// With more nodes than replicas, a node that holds no replica of a user's partition only
/// guesses its leader (the preferred replica). When that guess is wrong (here: the preferred
/// replica is dead), the node tries the next replica, which leads or names the leader, and
/// the publish lands within seconds rather than failing after the 15 s of retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_replica_finds_the_leader_by_redirects() {
    let mut cluster = Cluster::start(4).await;
    let index = |name: &str| -> usize { name.trim_start_matches('n').parse().unwrap() };
    // A user whose replicas leave out one node.
    let mut found = None;
    for k in 0..200 {
        let user = format!("r{k}");
        let v = user_status(&cluster.nodes[0], &user).await;
        let replicas: Vec<usize> = v.replicas.iter().map(|n| index(n)).collect();
        if let Some(outsider) = (0..4).find(|i| !replicas.contains(i)) {
            found = Some((user, replicas, outsider));
            break;
        }
    }
    let (user, replicas, outsider) =
        found.expect("with 4 nodes and RF 3 a partition leaves one out");
    assert_eq!(replicas.len(), 3);
    let preferred = replicas[0];
    cluster.nodes[preferred].kill9();
    // The surviving replicas elect a leader.
    let start = Instant::now();
    loop {
        let r = user_status(&cluster.nodes[replicas[1]], &user).await;
        if r.leader.is_some_and(|l| index(&l) != preferred) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no new leader for {user}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = cluster.nodes[outsider].publisher().await;
    let t0 = Instant::now();
    let seq = tokio::time::timeout(
        Duration::from_secs(10),
        conn.publish_wait("via-outsider", &user, b"x"),
    )
    .await
    .expect("the publish through a node without a replica is answered within 10 s")
    .expect("and acknowledged");
    let took = t0.elapsed();
    assert_eq!(seq, 1);
    // The publish corrected the outsider's guess of the leader: its routes, for publishers
    // that send straight to a leader, name the new one. A device token may not read them.
    let leader = user_status(&cluster.nodes[replicas[1]], &user)
        .await
        .leader
        .unwrap();
    let leader_client = cluster.nodes[index(&leader)].client.clone();
    let outsider_http = NodeHttp::new(&cluster.nodes[outsider].http);
    let start = Instant::now();
    loop {
        let routes = outsider_http
            .clone()
            .with_token(token("backend", "publish"))
            .routes()
            .await
            .expect("a publish token reads /v1/routes");
        assert_eq!(routes.leaders.len(), usize::from(routes.partition_count));
        if routes.leader_of(&user) == Some(leader_client.as_str()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "n{outsider}'s routes send {user} to {:?}, not its leader {leader} at {leader_client}",
            routes.leader_of(&user)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = outsider_http
        .clone()
        .with_token(token(&user, "device"))
        .routes()
        .await;
    assert!(
        matches!(refused, Err(HttpError::Status { status: 403, .. })),
        "a device token must not read the routes: {refused:?}"
    );
    // A device on the outsider gets it too (its session subscribes through the redirect).
    let mut dev = cluster.nodes[outsider].device(&user, "d").await;
    let m = tokio::time::timeout(Duration::from_secs(10), dev.recv_msg())
        .await
        .expect("delivered through the node without a replica")
        .unwrap();
    assert_eq!((m.seq, m.id.as_str()), (1, "via-outsider"));
    println!(
        "redirect: {user} (replicas {replicas:?}, n{preferred} dead) published through n{outsider} in {took:?}"
    );
}

/// Where `user` lives, as `node` sees it.
async fn user_status(node: &Node, user: &str) -> UserPlacement {
    NodeHttp::new(&node.http)
        .with_token(token("ops", "ops"))
        .get::<ClusterStatus>(&format!("/v1/cluster?user={user}"))
        .await
        .expect("/v1/cluster?user= answers")
        .user
        .expect("the answer says where the user lives")
}

/// Whether every partition's group, as each of `nodes` holds it, has exactly the replicas the
/// ring places it on (a node's view of a partition it holds no replica of is the placement).
async fn placement_settled(cluster: &Cluster, nodes: &[usize]) -> Result<(), String> {
    for &i in nodes {
        let Some(v) = cluster.nodes[i].status().await else {
            return Err(format!("n{i} does not answer /v1/cluster"));
        };
        for p in &v.partitions {
            let sorted = |n: &[String]| -> Vec<String> {
                let mut n = n.to_vec();
                n.sort();
                n
            };
            if sorted(&p.replicas) != sorted(&p.placement) {
                return Err(format!(
                    "n{i}: partition {} has replicas {:?}, placed on {:?}",
                    p.partition, p.replicas, p.placement
                ));
            }
        }
    }
    Ok(())
}

async fn wait_settled(cluster: &Cluster, nodes: &[usize], within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match placement_settled(cluster, nodes).await {
            Ok(()) => return start.elapsed(),
            Err(e) if start.elapsed() > within => panic!("not settled after {within:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Scaling out and in under load: a fourth node joins the running cluster and partitions
/// move to it; then one of the original nodes, the member list's leader when it is one, is
/// decommissioned, its partitions move away, and it is stopped. Publishers run on every
/// node throughout. Afterwards every acknowledged message is delivered in order with no
/// gap, every id has one seq, and no partition's group still counts the removed node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_and_leave_under_load_and_lose_nothing() {
    let mut cluster = Cluster::start(3).await;
    let outcomes: Outcomes = Arc::default();
    let (stop, clients, tasks) = start_publishers(&cluster, &outcomes, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Scale out: n3 joins through n0 (it is started like the others, with
    // --bootstrap-expect 3, and finds a formed cluster).
    let t0 = Instant::now();
    let new = cluster.spawn(3);
    cluster.wait_ready(new, Duration::from_secs(120)).await;
    let out = wait_settled(&cluster, &[0, 1, 2, 3], Duration::from_secs(180)).await;
    // The groups count n3 once a majority has its membership change; n3 itself holds the
    // replica once the change reaches it, a moment later.
    let start = Instant::now();
    let placed = loop {
        let v = cluster.nodes[new].status().await.expect("n3 answers");
        let held = v.replicas_held.unwrap();
        let placed = v
            .partitions
            .iter()
            .filter(|p| p.placement.iter().any(|n| n == "n3"))
            .count();
        assert!(
            placed > 0,
            "the ring places some partitions on the new node"
        );
        if held == placed {
            break placed;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "n3 holds {held} of the {placed} replicas placed on it: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    clients
        .lock()
        .unwrap()
        .push(cluster.nodes[new].client.clone());
    println!(
        "scale out: n3 ready and {placed} partitions moved in {:?} ({:?} after ready)",
        t0.elapsed(),
        out
    );
    let acked_before = acked_count(&outcomes);

    // Scale in: decommission the member list's leader (the node that coordinates the
    // moves, and commits its own removal), through another node's API. Its partitions
    // must still move away. n3 stays: its replicas are read at the end.
    let leader = cluster.nodes[0]
        .status()
        .await
        .expect("n0 answers")
        .member_list_leader
        .expect("a formed cluster knows its member list's leader");
    let gone = match leader.as_str() {
        "n0" => 0,
        "n2" => 2,
        _ => 1,
    };
    let name = format!("n{gone}");
    let via = if gone == 2 { 0 } else { 2 };
    let rest: Vec<usize> = (0..4).filter(|i| *i != gone).collect();
    println!("scale in: the member list's leader is {leader}; decommissioning {name}");
    let t1 = Instant::now();
    let body = serde_json::json!({ "node": name });
    let v: Decommissioned = NodeHttp::new(&cluster.nodes[via].http)
        .post("/v1/cluster/decommission", &token("ops", "admin"), &body)
        .await
        .expect("decommission answers 200");
    assert!(!v.members.contains(&name), "{v:?}");
    // Bad requests are refused with a reason, and change nothing.
    let (status, v) = cluster.nodes[via]
        .http(
            "POST",
            "/v1/cluster/decommission",
            Some(&token("ops", "admin")),
            r#"{"node": "nobody"}"#,
        )
        .await;
    assert_eq!(status, 409);
    let e: ErrorBody = serde_json::from_value(v).expect("an error body");
    assert!(e.error.message.contains("not a member"), "{e:?}");
    let start = Instant::now();
    loop {
        let v = cluster.nodes[gone].status().await.expect("it answers");
        if v.replicas_held == Some(0) && v.decommissioned {
            break;
        }
        if start.elapsed() >= Duration::from_secs(180) {
            let held: Vec<_> = v.partitions.iter().filter(|p| p.term.is_some()).collect();
            // How the other members see the partitions still held: who leads, in which
            // term, with which voters (a move that never starts shows here).
            let mut others = Vec::new();
            for &i in &rest {
                let theirs = cluster.nodes[i].status().await.map(|s| {
                    s.partitions
                        .into_iter()
                        .filter(|p| held.iter().any(|h| h.partition == p.partition))
                        .collect::<Vec<_>>()
                });
                others.push((format!("n{i}"), theirs));
            }
            panic!(
                "{name} still holds replicas after 180 s: {:?}; partitions it holds: {held:?}; \
                 the other members' view of them: {others:?}",
                v.replicas_held
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, _) = cluster.nodes[gone].http("GET", "/readyz", None, "").await;
    assert_eq!(status, 503, "a decommissioned node is not ready");
    // It handed the partitions it led to members that stay, which moved them (it did not
    // drain: nothing else counts here).
    let handed = counter(
        &cluster.nodes[gone],
        "warbler_leaderships_handed_over_total",
    )
    .await;
    assert!(
        handed > 0,
        "{name} handed none of the partitions it led to a member that stays"
    );
    println!("scale in: {name} handed {handed} leaderships over");
    clients
        .lock()
        .unwrap()
        .retain(|c| *c != cluster.nodes[gone].client);
    cluster.nodes[gone].kill9();
    wait_settled(&cluster, &rest, Duration::from_secs(60)).await;
    for &i in &rest {
        let v = cluster.nodes[i].status().await.expect("a member answers");
        for p in &v.partitions {
            assert!(
                !p.replicas.contains(&name),
                "n{i}: partition {} still counts {name}: {p:?}",
                p.partition
            );
        }
    }
    println!("scale in: {name} emptied and stopped in {:?}", t1.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_publishers(stop, tasks).await;
    assert!(
        acked_count(&outcomes) > acked_before,
        "publishes went on after the scale-out"
    );
    let delivered = check_streams(&cluster, new, &outcomes).await;
    println!(
        "scale out/in: {} acknowledged, {delivered} delivered in order",
        acked_count(&outcomes)
    );
}

/// Overload: a publisher pipelines publishes to one user through a node that holds no
/// replica of the user's partition while the leader cannot commit (both followers paused),
/// so the leader's backlog fills. The publisher gets `overloaded` refusals at once and,
/// resending from the first refusal in order as the protocol asks, every message lands
/// exactly once, in the order it was first sent: a refusal never lets a later publish
/// overtake an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_publishes_are_refused_and_a_publisher_resending_in_order_keeps_its_order() {
    const N: usize = 60;
    const BODY_BYTES: usize = 100 * 1024;
    let backlog = (256 * 1024).to_string();
    let dir = tempfile::tempdir().unwrap();
    let cluster =
        Cluster::start_with(4, dir, &[("WARBLER_BACKLOG_BYTES_MAX", backlog.as_str())]).await;
    wait_settled(&cluster, &[0, 1, 2, 3], Duration::from_secs(60)).await;
    let placed = user_status(&cluster.nodes[0], HOT).await;
    let index_of = |name: &str| name.trim_start_matches('n').parse::<usize>().unwrap();
    let replicas: Vec<usize> = placed.replicas.iter().map(|r| index_of(r)).collect();
    let via = (0..4)
        .find(|i| !replicas.contains(i))
        .expect("RF 3 of 4 leaves one node out");
    // Asked of the replicas: the node with none of the partition only knows hints.
    let leader = cluster.leader_of(HOT, Some(via)).await;
    let followers: Vec<usize> = replicas.into_iter().filter(|r| *r != leader).collect();
    // The user's mailbox runs on the leader before its followers stop: it needs no quorum
    // to start, so what follows is refused for its backlog alone.
    assert_eq!(cluster.nodes[via].publish(HOT, "warm", "warm").await, 1);
    let (mut tx, mut rx) = cluster.nodes[via].publisher().await.split();
    let index = |id: &str| id.trim_start_matches("o-").parse::<usize>().unwrap();
    let mut todo: Vec<usize> = (0..N).collect();
    let mut seqs: BTreeMap<usize, u64> = BTreeMap::new();
    let (mut overloaded, mut refused_total, mut rounds) = (0, 0, 0);
    // Every answer, to show when the order breaks.
    let mut transcript: Vec<String> = Vec::new();
    while !todo.is_empty() {
        rounds += 1;
        assert!(
            rounds <= 500,
            "still refused after {rounds} rounds: {todo:?}"
        );
        if rounds == 1 {
            // The leader cannot commit for a second: what it proposes stays in its backlog.
            followers.iter().for_each(|f| cluster.nodes[*f].pause());
            let pids: Vec<u32> = followers.iter().map(|f| cluster.nodes[*f].pid()).collect();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                for pid in pids {
                    let _ = std::process::Command::new("kill")
                        .args(["-CONT", &pid.to_string()])
                        .status();
                }
            });
        }
        for &i in &todo {
            let body = format!("o-{i}-{}", "x".repeat(BODY_BYTES));
            let frame = warbler_client::Frame::Publish {
                id: format!("o-{i}"),
                to: HOT.into(),
                body: serde_bytes::ByteBuf::from(body.into_bytes()),
            };
            tx.send(frame).await.expect("publisher connection");
        }
        let mut refused = Vec::new();
        for _ in 0..todo.len() {
            let answer = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("every publish is answered");
            match answer {
                Ok(warbler_client::Frame::Published { id, seq, .. }) => {
                    transcript.push(format!("round {rounds}: {id} seq {seq}"));
                    seqs.insert(index(&id), seq);
                }
                Err(warbler_client::ClientError::Server {
                    code,
                    id: Some(id),
                    message,
                }) => {
                    transcript.push(format!("round {rounds}: {id} {code}: {message}"));
                    overloaded += usize::from(code == "overloaded");
                    refused.push(index(&id));
                }
                other => panic!("unexpected answer: {other:?}"),
            }
        }
        refused.sort();
        refused_total += refused.len();
        todo = refused;
        if !todo.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!("overload: {N} publishes of {BODY_BYTES} B via n{via}, leader n{leader}: {refused_total} refusals ({overloaded} overloaded) over {rounds} rounds");
    assert!(
        overloaded > 0,
        "the backlog bound was never reached: nothing was tested"
    );
    let by_index: Vec<u64> = seqs.values().copied().collect();
    assert!(
        by_index.windows(2).all(|w| w[0] < w[1]),
        "seqs out of send order: {by_index:?}\nanswers:\n{}",
        transcript.join("\n")
    );
    let now_leader = cluster.leader_of(HOT, Some(via)).await;
    let stream: Vec<String> = cluster.nodes[now_leader]
        .history(HOT)
        .await
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    let sent: Vec<String> = std::iter::once("warm".to_string())
        .chain((0..N).map(|i| format!("o-{i}")))
        .collect();
    assert_eq!(
        stream, sent,
        "the user's stream holds each publish once, in order"
    );
}

/// The number of partitions whose replica on `node` is quiet in `role` (leader or
/// follower), from its `/metrics`.
async fn quiet_partitions(node: &Node, role: &str) -> u64 {
    let (_, text) = common::http_raw(&node.http, "GET", "/metrics", None, b"").await;
    let prefix = format!("warbler_partitions_quiet{{role=\"{role}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

const GAINED: &str = "warbler_leaderships_gained_total";
const HANDED: &str = "warbler_leader_transfers_total{result=\"done\"}";

/// Waits until no leadership has moved for 4 s (the balancer's last transfers settle: a
/// transfer counts as done on its old leader before the new leader's watch counts the
/// gain, so a window that starts in between would count a hand-over as an election);
/// returns the cluster's (gained, handed over) counters then.
async fn settle_leaders(cluster: &Cluster) -> (u64, u64) {
    let settle = Instant::now();
    let (mut gained, mut handed) = (0, 0);
    let mut same_for = 0;
    while same_for < 4 {
        let now = (
            metric_sum(cluster, GAINED, None).await,
            metric_sum(cluster, HANDED, None).await,
        );
        same_for = if now == (gained, handed) {
            same_for + 1
        } else {
            0
        };
        (gained, handed) = now;
        assert!(
            settle.elapsed() < Duration::from_secs(40),
            "leaderships kept moving in an idle cluster for 40 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    (gained, handed)
}

/// Waits until every partition's leader has gone quiet (and nearly every follower), or
/// fails after `within`.
async fn wait_all_quiet(cluster: &Cluster, within: Duration) {
    let start = Instant::now();
    loop {
        let (mut leaders, mut followers) = (0, 0);
        for n in &cluster.nodes {
            leaders += quiet_partitions(n, "leader").await;
            followers += quiet_partitions(n, "follower").await;
        }
        if leaders == 64 && followers >= 126 {
            return;
        }
        assert!(
            start.elapsed() < within,
            "only {leaders} of 64 leaders and {followers} of 128 followers quiet after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A follower of a quiet partition restarted with the apply of the last entry lost (unsynced
/// writes wait in the WAL's buffer inside the process, so `kill -9` loses them as a power
/// loss would; the entry itself was synced): the commit index went with the apply, and a
/// quiet leader sends no heartbeat to tell it again. Without help the follower either waits
/// (unready) or times out and elects itself. The restarted replica greets its leader, the
/// leader wakes the group, its heartbeats carry the commit index: the follower applies,
/// the node becomes ready, and the partition keeps its leader and term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_of_a_quiet_partition_applies_what_it_holds() {
    let mut cluster = Cluster::start(3).await;
    for i in 0..3 {
        cluster.wait_ready(i, Duration::from_secs(30)).await;
    }
    settle_leaders(&cluster).await;
    let leader = cluster.leader_of(HOT, None).await;
    // One publish after another: each entry reaches the followers with the commit index of
    // the one before, so the last write on a follower's node is the apply of the last
    // entry, after its append's sync, and nothing syncs after it.
    for seq in 1..=3 {
        let id = format!("r-{seq}");
        assert_eq!(cluster.nodes[leader].publish(HOT, &id, "body").await, seq);
    }
    wait_all_quiet(&cluster, Duration::from_secs(30)).await;
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let part = warbler_cluster::partition_of(HOT, 64) as usize;
    let before = cluster.status(Some(victim)).await.partitions[part].clone();
    // Killed at once, the follower's last apply was on disk in 5 runs of 5 here (it is not
    // known what wrote the buffer out); 3 s later it was lost in 7 runs of 7.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.nodes[victim].kill9();
    cluster.nodes[victim].restart();
    let t0 = Instant::now();
    cluster.wait_ready(victim, Duration::from_secs(30)).await;
    let ready_after = t0.elapsed();
    // No election: the follower neither waited for traffic nor elected itself to learn
    // what it had lost, and the group went quiet again under the same leader.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = cluster.status(Some(victim)).await.partitions[part].clone();
    println!(
        "quiet restart: follower n{victim} of leader n{leader} ready after {ready_after:?}; before {before:?}, after {after:?}"
    );
    assert_eq!(
        (&after.leader, after.term),
        (&before.leader, before.term),
        "the partition changed leader or term around the follower's restart"
    );
    // Its copy is whole: the next publish lands after it on every replica.
    assert_eq!(cluster.nodes[victim].publish(HOT, "r-4", "next").await, 4);
    let history: Vec<String> = cluster.nodes[victim]
        .history(HOT)
        .await
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(history, ["r-1", "r-2", "r-3", "r-4"]);
}

/// A follower learns a commit from its leader's next AppendEntries, up to a heartbeat after
/// the publish was acknowledged; a history read served from its replica first asks the
/// leader how far it applied and waits for that. So a publish acknowledged through the
/// leader is in the next page read through either follower, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_read_on_a_follower_sees_every_acknowledged_publish() {
    let cluster = Cluster::start(3).await;
    for i in 0..3 {
        cluster.wait_ready(i, Duration::from_secs(30)).await;
    }
    settle_leaders(&cluster).await;
    let leader = cluster.leader_of(HOT, None).await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for seq in 1..=20u64 {
        let id = format!("ryw-{seq}");
        assert_eq!(cluster.nodes[leader].publish(HOT, &id, "body").await, seq);
        for f in &followers {
            let last = cluster.nodes[*f].history(HOT).await.last().map(|m| m.0);
            assert_eq!(
                last,
                Some(seq),
                "n{f}, a follower, served a history page without the publish acknowledged just before it (seq {seq})"
            );
        }
        // Some reads find the group quiet (its commit index not sent to anyone yet).
        if seq % 5 == 0 {
            wait_all_quiet(&cluster, Duration::from_secs(30)).await;
        }
    }
}

/// An idle cluster stops heartbeating: its partitions go quiet. When the node leading a
/// quiet partition dies, gossip wakes the followers and they elect at once, so a publish to
/// that partition lands within seconds, and the partition's stream carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_partitions_go_quiet_and_fail_over_when_their_leader_dies() {
    let mut cluster = Cluster::start(3).await;
    let via = 0;
    assert_eq!(cluster.nodes[via].publish(HOT, "q-1", "before").await, 1);
    // Quiet after ~2 s of no writes; followers report theirs.
    let start = Instant::now();
    loop {
        let mut quiet = 0;
        for n in &cluster.nodes {
            quiet += quiet_partitions(n, "leader").await;
        }
        if quiet >= 60 {
            println!(
                "quiesce: {quiet} of 64 partitions quiet after {:?}",
                start.elapsed()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {quiet} of 64 partitions went quiet in an idle cluster"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Each follower replica reports going quiet on its node's next check.
    loop {
        let mut followers_quiet = 0;
        for n in &cluster.nodes {
            followers_quiet += quiet_partitions(n, "follower").await;
        }
        if followers_quiet >= 120 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {followers_quiet} of 128 follower replicas went quiet"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Quiet means stable: no follower wakes on its own and elects itself (a leader's last
    // heartbeat crossing its "go quiet" made one do so every few seconds).
    // Leaders the balancer hands over are the only changes allowed.
    let (gained, handed) = settle_leaders(&cluster).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        metric_sum(&cluster, GAINED, None).await - gained,
        metric_sum(&cluster, HANDED, None).await - handed,
        "a quiet, idle cluster changed leaders by elections"
    );
    let victim = cluster.leader_of(HOT, None).await;
    let survivor = (0..3).find(|i| *i != victim).unwrap();
    let t0 = Instant::now();
    cluster.nodes[victim].kill9();
    // The publish waits out the election (the node retries for up to 15 s).
    let seq = cluster.nodes[survivor].publish(HOT, "q-2", "after").await;
    let failover = t0.elapsed();
    println!("quiesce: quiet leader n{victim} killed; publish landed after {failover:?}");
    assert_eq!(seq, 2, "the stream carries on from the quiet leader's log");
    assert!(
        failover < Duration::from_secs(10),
        "a quiet partition took {failover:?} to fail over"
    );
}

/// A fan-out on a cluster: each partition's share goes to its leader as one request
/// (`PublishMany`), from a node that leads some partitions and follows others. Every
/// recipient gets the message once at seq 1, in the order of `to`, and the same request
/// again answers the same seqs (dedup on every leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_reaches_every_recipient_through_their_partitions_leaders() {
    let cluster = Cluster::start(3).await;
    // Each node settles the partitions it comes to lead as it gets them, so the mailboxes a
    // fan-out starts run no read barrier (each would hold up the node's other starts).
    settle_leaders(&cluster).await;
    let barriers = "warbler_read_barriers_total";
    let barriers_before = metric_sum(&cluster, barriers, None).await;
    assert!(
        barriers_before >= 64,
        "every partition's leadership settled as it was gained: {barriers_before} barriers"
    );
    let to: Vec<String> = (0..300).map(|i| format!("fan{i}")).collect();
    let body = serde_json::json!({"to": to, "id": "fan-1", "body": "hello"}).to_string();
    let tok = token("backend", "publish");
    let shares = r#"warbler_peer_requests_total{kind="publish_many"}"#;
    let singles = r#"warbler_peer_requests_total{kind="publish"}"#;
    let shares_before = metric_sum(&cluster, shares, None).await;
    let singles_before = metric_sum(&cluster, singles, None).await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        let (status, v) = cluster.nodes[0]
            .http("POST", "/v1/messages", Some(&tok), &body)
            .await;
        assert_eq!(status, 200, "{v}");
        let results = v["results"].as_array().expect("results").clone();
        let users: Vec<&str> = results
            .iter()
            .map(|r| r["user"].as_str().unwrap())
            .collect();
        assert_eq!(users, to.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            results.iter().all(|r| r["seq"].as_u64() == Some(1)),
            "every recipient stores it once, at seq 1: {results:?}"
        );
        answers.push(results);
    }
    assert_eq!(
        answers[0], answers[1],
        "the same request again answers the same seqs"
    );
    let barriers = metric_sum(&cluster, barriers, None).await - barriers_before;
    assert_eq!(
        barriers, 0,
        "starting 300 mailboxes ran {barriers} read barriers"
    );
    // Each partition's share went to its leader as one request: 600 recipients in all, at
    // most 64 partitions a request (a share re-sent after a leader change may add a few).
    let shares = metric_sum(&cluster, shares, None).await - shares_before;
    let singles = metric_sum(&cluster, singles, None).await - singles_before;
    assert!(
        (1..300).contains(&shares) && singles == 0,
        "600 recipients took {shares} share requests and {singles} single publishes"
    );
    // History is read from node 1's own replicas, which may apply a moment after commit.
    for user in ["fan0", "fan150", "fan299"] {
        let start = Instant::now();
        loop {
            let history = cluster.nodes[1].history(user).await;
            let ids: Vec<&str> = history.iter().map(|(_, id, _)| id.as_str()).collect();
            if ids == ["fan-1"] {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{user}: {ids:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Devices connected to a node that leads none of their users get their messages from, and
/// ack through, stand-ins on the leaders. The deliveries and the acks of many devices travel
/// together (fewer `deliver_many` and `ack_many` requests than messages, none one by one),
/// and each device's cursor on its leader reaches what it acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_and_acks_of_devices_on_other_nodes_travel_together() {
    let cluster = Cluster::start(3).await;
    let mut users = Vec::new();
    for i in 0.. {
        let user = format!("acker{i}");
        if user_status(&cluster.nodes[0], &user)
            .await
            .leader
            .as_deref()
            != Some("n0")
        {
            users.push(user);
        }
        if users.len() == 40 {
            break;
        }
    }
    let mut devices = Vec::new();
    for user in &users {
        devices.push(cluster.nodes[0].device(user, "phone").await);
    }
    let kinds = ["ack_many", "ack", "deliver_many", "deliver"]
        .map(|k| format!("warbler_peer_requests_total{{kind=\"{k}\"}}"));
    let mut before = Vec::new();
    for k in &kinds {
        before.push(metric_sum(&cluster, k, None).await);
    }
    // Every user's publishes at once, so that the leaders' stand-ins have batches for n0
    // at the same time.
    const EACH: usize = 5;
    let via = &cluster.nodes[1];
    futures::future::join_all(users.iter().map(|user| async move {
        for round in 0..EACH {
            via.publish(user, &format!("{user}-{round}"), "hi").await;
        }
    }))
    .await;
    let receivers: Vec<_> = devices
        .into_iter()
        .map(|mut d| {
            tokio::spawn(async move {
                common::recv_n_acking(&mut d, EACH).await;
                d
            })
        })
        .collect();
    let mut devices = Vec::new();
    for r in receivers {
        devices.push(r.await.expect("a device receives and acks"));
    }
    for user in &users {
        let start = Instant::now();
        loop {
            let (_, v) = cluster.nodes[2]
                .http(
                    "GET",
                    &format!("/v1/users/{user}/devices"),
                    Some(&token("ops", "admin")),
                    "",
                )
                .await;
            if v["devices"][0]["acked"] == EACH {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{user}: the ack of {EACH} never reached the leader: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut took = Vec::new();
    for (k, b) in kinds.iter().zip(before) {
        took.push(metric_sum(&cluster, k, None).await - b);
    }
    let [ack_many, ack, deliver_many, deliver] = took[..] else {
        unreachable!()
    };
    let n = (users.len() * EACH) as u64;
    println!(
        "{n} messages to devices on n0: {deliver_many} deliver_many requests, {ack_many} ack_many"
    );
    assert!(
        (1..n).contains(&ack_many) && ack == 0,
        "{n} acks took {ack_many} ack_many and {ack} single ack requests"
    );
    assert!(
        (1..n).contains(&deliver_many) && deliver == 0,
        "{n} messages took {deliver_many} deliver_many and {deliver} single deliver requests"
    );
    drop(devices);
}

/// A counter's value from a node's `/metrics` (0 when it has not been counted yet).
async fn counter(node: &Node, name: &str) -> u64 {
    let (_, text) = common::http_raw(&node.http, "GET", "/metrics", None, b"").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// The cluster port of a keyed cluster: a stranger who speaks the peer protocol perfectly
/// but holds no key is refused before any request is read, whatever it asks (here, to
/// publish a forged message); garbage on the gossip port is dropped and counted; a node
/// started with another cluster's key never becomes a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_cluster_port_are_refused_and_another_key_never_joins() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warbler_cluster::transport::{PeerFrame, PEER_PROTOCOL_VERSION};
    use warbler_cluster::wire::PublishReq;
    let mut cluster = Cluster::start(3).await;
    let user = "victim";
    let leader = cluster.leader_of(user, None).await;
    let partition = warbler_cluster::partition_of(user, 64);
    let forged = PublishReq {
        user: user.into(),
        id: "forged".into(),
        body: serde_bytes::ByteBuf::from(b"send your password".to_vec()),
        from: Some("bank".into()),
        after: None,
    };
    let mut s = tokio::net::TcpStream::connect(&cluster.cluster_addrs[leader])
        .await
        .unwrap();
    let frames = [
        PeerFrame::Hello {
            v: PEER_PROTOCOL_VERSION,
            from: format!("n{}", (leader + 1) % 3),
            nonce: None,
            cluster: None,
        },
        PeerFrame::Request {
            id: 1,
            partition,
            kind: warbler_cluster::PeerKind::Publish as u8,
            body: serde_bytes::ByteBuf::from(rmp_serde::to_vec_named(&forged).unwrap()),
        },
    ];
    for frame in &frames {
        let bytes = rmp_serde::to_vec_named(frame).unwrap();
        s.write_all(&(bytes.len() as u32).to_be_bytes())
            .await
            .unwrap();
        s.write_all(&bytes).await.unwrap();
    }
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
        .await
        .expect("the node answers the stranger")
        .unwrap();
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    match rmp_serde::from_slice::<PeerFrame>(&buf).unwrap() {
        PeerFrame::Error { message } => assert!(
            message.contains("cluster key") && message.contains("--cluster-key-file"),
            "{message}"
        ),
        other => panic!("a stranger got {other:?}"),
    }
    let _ = s.shutdown().await;

    // A forged datagram on the gossip port is dropped, and counted.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let refused_before = counter(&cluster.nodes[0], "warbler_gossip_datagrams_refused_total").await;
    for _ in 0..3 {
        udp.send_to(b"not a member's datagram", &cluster.cluster_addrs[0])
            .unwrap();
    }
    let start = Instant::now();
    while counter(&cluster.nodes[0], "warbler_gossip_datagrams_refused_total").await
        < refused_before + 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "datagrams not refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A node holding another cluster's key knocks and stays out.
    let other_key = cluster._dir.path().join("other.key");
    write_private(&other_key, "another cluster's key, quite long enough too");
    cluster.env.push((
        "WARBLER_CLUSTER_KEY_FILE".into(),
        other_key.display().to_string(),
    ));
    let outsider = cluster.spawn(4);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let v = cluster.status(Some(outsider)).await;
    let names: Vec<&str> = v.members.iter().map(|m| m.node.as_str()).collect();
    assert!(
        !names.contains(&"n3"),
        "a node with another key became a member: {names:?}"
    );
    let (ready, body) = cluster.nodes[outsider]
        .http("GET", "/readyz", None, "")
        .await;
    assert_ne!(ready, 200, "the outsider is ready: {body}");
    assert!(counter(&cluster.nodes[0], "warbler_peer_connections_refused_total").await >= 1);

    // Nothing the stranger sent was stored: the victim's stream is empty until a real
    // publish, which gets seq 1.
    assert_eq!(cluster.nodes[0].publish(user, "real", "hello").await, 1);
    let mut dev = cluster.nodes[leader].device(user, "d").await;
    let m = tokio::time::timeout(Duration::from_secs(10), dev.recv_msg())
        .await
        .expect("the real message arrives")
        .unwrap();
    assert_eq!((m.seq, m.id.as_str()), (1, "real"));
}

/// Publishes `msgs` to `user` at once, in order, as the protocol asks of a publisher:
/// refused as `overloaded` (or after a refused one), it resends from the first refusal, in
/// order, after a moment. The seq of every id.
async fn publish_resending(
    publisher: &mut warbler_client::Connection,
    user: &str,
    msgs: &[(String, Vec<u8>)],
) -> BTreeMap<String, u64> {
    let mut seqs = BTreeMap::new();
    let mut from = 0;
    for round in 0.. {
        assert!(round < 600, "still refused after 600 rounds");
        for (id, body) in &msgs[from..] {
            publisher.publish(id, user, body).await.unwrap();
        }
        let mut refused: Option<usize> = None;
        for _ in from..msgs.len() {
            let answer = tokio::time::timeout(Duration::from_secs(60), publisher.recv())
                .await
                .expect("an answer within 60 s");
            match answer {
                Ok(warbler_client::Frame::Published { id, seq, .. }) => {
                    seqs.insert(id, seq);
                }
                Err(warbler_client::ClientError::Server {
                    code, id: Some(id), ..
                }) if code == "overloaded" || code == "unavailable" => {
                    let at = msgs
                        .iter()
                        .position(|(m, _)| *m == id)
                        .expect("one of ours");
                    refused = Some(refused.map_or(at, |r| r.min(at)));
                }
                other => panic!("a publish of a large message failed: {other:?}"),
            }
        }
        match refused {
            None => break,
            Some(at) => {
                from = at;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    seqs
}

/// A body of `len` bytes that names its message, so a mix-up is seen.
fn large_body(tag: &str, len: usize) -> Vec<u8> {
    let mut body = tag.as_bytes().to_vec();
    body.resize(len, b'.');
    body
}

/// Messages at the body limit (512 KiB) go through a cluster: 40 published at once through
/// a node that does not lead the user are all acknowledged (the publisher resends what the
/// leader's 4 MiB backlog refuses as `overloaded`, as the protocol asks) and delivered to a
/// device on that node; then a backlog of 256 such messages reaches a device reconnecting
/// there.
/// Before, a forwarded delivery of many of them exceeded the peer frame limit and was
/// retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_are_acknowledged_and_delivered_through_a_non_leader() {
    const BODY: usize = 512 * 1024;
    let cluster = Cluster::start(3).await;
    let user = "large";
    let leader = cluster.leader_of(user, None).await;
    let via = (leader + 1) % 3;
    let mut device = cluster.nodes[via].device(user, "d").await;
    let mut publisher = cluster.nodes[via].publisher().await;
    let t0 = Instant::now();
    let first: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("a{i}"), large_body(&format!("a{i}"), BODY)))
        .collect();
    let seqs = publish_resending(&mut publisher, user, &first).await;
    let acked = t0.elapsed();
    let got = common::recv_n_acking(&mut device, 40).await;
    for (k, m) in got.iter().enumerate() {
        assert_eq!(m.seq, k as u64 + 1, "in order, no gaps");
        assert_eq!(m.body.len(), BODY);
        assert!(
            m.body.starts_with(m.id.as_bytes()),
            "body of {} is its own",
            m.id
        );
        assert_eq!(seqs.get(&m.id), Some(&m.seq));
    }
    println!("40 x 512 KiB through n{via} (leader n{leader}): acknowledged in {acked:?}, delivered in {:?}", t0.elapsed());
    drop(device);

    // A backlog of 256 for a device that is away.
    let t1 = Instant::now();
    for window in 0..8 {
        let msgs: Vec<(String, Vec<u8>)> = (window * 32..window * 32 + 32)
            .map(|i| (format!("b{i}"), large_body(&format!("b{i}"), BODY)))
            .collect();
        publish_resending(&mut publisher, user, &msgs).await;
    }
    let mut device = cluster.nodes[via].device(user, "d").await;
    let mut got = Vec::new();
    while got.len() < 256 {
        let m = tokio::time::timeout(Duration::from_secs(30), device.recv_msg())
            .await
            .expect("a backlog message within 30 s")
            .unwrap();
        device.ack(m.seq).await.unwrap();
        // Acks are stored with the next write: a few of the first 40 may come again.
        if m.seq > 40 {
            got.push(m);
        }
    }
    for (k, m) in got.iter().enumerate() {
        assert_eq!(m.seq, 41 + k as u64, "the backlog in order, no gaps");
        assert_eq!(m.id, format!("b{k}"));
        assert_eq!(m.body.len(), BODY);
    }
    println!(
        "backlog of 256 x 512 KiB delivered through n{via} in {:?}",
        t1.elapsed()
    );
}

/// A cluster directory whose `n2` (the third node's data) is a 256 MiB tmpfs; `None`, with
/// the reason printed, where one cannot be mounted.
fn small_disk_under_n2() -> Option<(tempfile::TempDir, std::path::PathBuf, common::Unmount)> {
    let dir = tempfile::tempdir().unwrap();
    let n2_data = dir.path().join("n2");
    if let Err(why) = common::mount_tmpfs(&n2_data, 256) {
        println!(
            "SKIPPED: a small tmpfs is needed under one node and cannot be mounted here: {why}"
        );
        return None;
    }
    let unmount = common::Unmount(n2_data.clone());
    Some((dir, n2_data, unmount))
}

/// One node's disk fills up (a small tmpfs under n2 of three, RF 3): it tells the others,
/// and every partition it replicates refuses publishes with `storage_full` on whichever node
/// they arrive, before its storage fails; n2 is not ready, nothing acknowledged is lost, and
/// once space is freed publishes are taken again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_one_replica_refuses_publishes_and_recovers() {
    let Some((dir, n2_data, _unmount)) = small_disk_under_n2() else {
        return;
    };
    let watermark = 64u64 << 20;
    let c = Cluster::start_with(
        3,
        dir,
        &[("WARBLER_STORAGE_MIN_FREE_BYTES", &watermark.to_string())],
    )
    .await;
    let users: Vec<String> = (0..6).map(|u| format!("u{u}")).collect();
    let publish = |node: usize, user: &str, id: &str| {
        let (node, path) = (&c.nodes[node], format!("/v1/users/{user}/messages"));
        let body = format!(r#"{{"id":"{id}","body":"b-{id}"}}"#);
        async move {
            node.http("POST", &path, Some(&token("svc", "publish")), &body)
                .await
        }
    };
    let mut acked: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..30 {
        let user = &users[i % users.len()];
        let id = format!("k{i}");
        let (status, v) = publish(0, user, &id).await;
        assert_eq!(status, 200, "{v}");
        acked.entry(user.clone()).or_default().push(id);
    }

    let free = common::warbler_free_bytes(&n2_data);
    let ballast = n2_data.join("ballast");
    std::fs::write(&ballast, vec![0u8; (free - (32 << 20)) as usize]).unwrap();
    let t0 = Instant::now();
    let refused = loop {
        let id = format!("probe{}", t0.elapsed().as_millis());
        let (status, v) = publish(0, &users[0], &id).await;
        match status {
            503 => break v,
            200 => acked.entry(users[0].clone()).or_default().push(id),
            _ => panic!("unexpected answer: {v}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "publishes still taken 15 s after n2's disk filled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "refused {:?} after n2's disk filled: {refused}",
        t0.elapsed()
    );
    assert_eq!(refused["error"]["code"], "storage_full", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("n2") && message.contains("min_free_bytes"),
        "{message}"
    );
    // Every partition has a replica on n2: refused through every node.
    for (k, user) in users.iter().enumerate() {
        let (status, v) = publish(k % 3, user, &format!("full-{k}")).await;
        assert_eq!(status, 503, "{user} through n{}: {v}", k % 3);
        assert_eq!(v["error"]["code"], "storage_full", "{v}");
    }
    let (status, ready) = c.nodes[2].http("GET", "/readyz", None, "").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["error"]["code"], "storage_full", "{ready}");
    assert_eq!(c.nodes[0].http("GET", "/readyz", None, "").await.0, 200);

    std::fs::remove_file(&ballast).unwrap();
    let t0 = Instant::now();
    loop {
        let id = format!("after{}", t0.elapsed().as_millis());
        let (status, v) = publish(1, &users[0], &id).await;
        if status == 200 {
            acked.entry(users[0].clone()).or_default().push(id);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still refused 15 s after space was freed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("taken again {:?} after space was freed", t0.elapsed());
    c.wait_ready(2, Duration::from_secs(30)).await;
    for (user, ids) in &acked {
        let kept: Vec<String> = c.nodes[1]
            .history(user)
            .await
            .into_iter()
            .map(|(_, id, _)| id)
            .collect();
        assert_eq!(&kept, ids, "{user}: every acknowledged message, in order");
    }
}

/// With no watermark (`storage.min_free_bytes = 0`) a replica's disk fills up for real: its
/// consensus groups stop when a write fails, and the node exits non-zero (fail fast) instead
/// of serving with dead replicas, while the other two keep acknowledging. Restarted once
/// space is freed, it catches up and holds every acknowledged message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_storage_fails_exits_and_catches_up_after_a_restart() {
    let Some((dir, n2_data, _unmount)) = small_disk_under_n2() else {
        return;
    };
    let mut c = Cluster::start_with(3, dir, &[("WARBLER_STORAGE_MIN_FREE_BYTES", "0")]).await;
    // Fill n2's disk to the last byte.
    let ballast = n2_data.join("ballast");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
    }
    let token = token("svc", "publish");
    let mut acked: Vec<(String, String)> = Vec::new();
    let t0 = Instant::now();
    let mut i = 0;
    while c.nodes[2].is_running() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "n2 still runs 120 s after its disk filled up"
        );
        let user = format!("u{}", i % 6);
        let id = format!("m{i}");
        let body = format!(r#"{{"id":"{id}","body":"{}"}}"#, "x".repeat(60_000));
        let (status, _) = c.nodes[i % 2]
            .http(
                "POST",
                &format!("/v1/users/{user}/messages"),
                Some(&token),
                &body,
            )
            .await;
        if status == 200 {
            acked.push((user, id));
        }
        i += 1;
    }
    let status = c.nodes[2].exit_status().expect("n2 exited");
    println!(
        "n2 exited with {status} {:?} after its disk filled; {} publishes acknowledged meanwhile",
        t0.elapsed(),
        acked.len()
    );
    assert!(!status.success(), "n2 must exit non-zero: {status}");
    // The majority keeps taking publishes.
    for k in 0..6 {
        let (user, id) = (format!("u{k}"), format!("after-{k}"));
        let (status, v) = c.nodes[0]
            .http(
                "POST",
                &format!("/v1/users/{user}/messages"),
                Some(&token),
                r#"{"id":"ID","body":"y"}"#.replace("ID", &id).as_str(),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        acked.push((user, id));
    }
    std::fs::remove_file(&ballast).unwrap();
    c.nodes[2].restart();
    c.wait_ready(2, Duration::from_secs(60)).await;
    let mut by_user: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (user, id) in acked {
        by_user.entry(user).or_default().push(id);
    }
    for (user, ids) in &by_user {
        let kept: Vec<String> = c.nodes[2]
            .history(user)
            .await
            .into_iter()
            .map(|(_, id, _)| id)
            .collect();
        for id in ids {
            assert!(
                kept.contains(id),
                "{user}: acknowledged {id} missing on n2 after it caught up"
            );
        }
    }
}

/// The lame-duck window of the drain tests' clusters.
const LAME_DUCK_MS: u64 = 4_000;

/// Three nodes whose connections say `bye` over [`LAME_DUCK_MS`] when they drain.
async fn start_lame_duck_cluster() -> Cluster {
    let lame_duck = LAME_DUCK_MS.to_string();
    Cluster::start_with(
        3,
        tempfile::tempdir().unwrap(),
        &[("WARBLER_LAME_DUCK_MS", lame_duck.as_str())],
    )
    .await
}
/// SIGTERM on a node that leads partitions and holds devices: it stops being ready at once,
/// the other replicas take over every partition it led while it is still running (and a
/// publish to one of them goes through a survivor), its devices are told `bye` spread over
/// the lame-duck window rather than all at once, and it exits cleanly within its drain
/// budget — what Kubernetes' `terminationGracePeriodSeconds` is sized from (docs/deploy.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_leaderships_over_then_says_bye_over_the_lame_duck_window() {
    let mut cluster = start_lame_duck_cluster().await;
    let led_by = |v: &ClusterStatus, name: &str| -> Vec<usize> {
        v.partitions
            .iter()
            .enumerate()
            .filter(|(_, p)| p.leader.as_deref() == Some(name))
            .map(|(i, _)| i)
            .collect()
    };
    // Every partition has a leader; the victim is the node leading the most.
    let start = Instant::now();
    let status = loop {
        let v = cluster.status(None).await;
        if v.partitions.iter().all(|p| p.leader.is_some()) {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "partitions without a leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let victim = (0..3)
        .max_by_key(|i| led_by(&status, &format!("n{i}")).len())
        .unwrap();
    let victim_name = format!("n{victim}");
    let led = led_by(&status, &victim_name);
    assert!(!led.is_empty());
    let survivor = (victim + 1) % 3;
    // A user whose partition the victim leads.
    let user = (0..10_000)
        .map(|k| format!("handover-{k}"))
        .find(|u| led.contains(&(warbler_cluster::partition_of(u, 64) as usize)))
        .unwrap();
    let mut devices = Vec::new();
    for d in 0..12 {
        devices.push(
            cluster.nodes[victim]
                .device(&format!("ld-{d}"), "phone")
                .await,
        );
    }
    // Most of what the victim leads goes quiet first: a quiet follower stays quiet through
    // its leader's last heartbeat, so the drain must wake it to hand the partition over.
    let quiet_since = Instant::now();
    loop {
        let quiet = quiet_partitions(&cluster.nodes[victim], "leader").await as usize;
        if quiet * 2 >= led.len() {
            println!(
                "drain: {quiet} of the {} partitions {victim_name} leads quiet after {:?}",
                led.len(),
                quiet_since.elapsed()
            );
            break;
        }
        assert!(
            quiet_since.elapsed() < Duration::from_secs(30),
            "only {quiet} of the {} partitions {victim_name} leads went quiet",
            led.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    let byes: Vec<_> = devices
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let got = tokio::time::timeout(Duration::from_secs(30), c.recv()).await;
                (t0.elapsed(), got)
            })
        })
        .collect();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &cluster.nodes[victim].pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Not ready from the moment it drains.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ready, _) = common::http_raw_opt(&cluster.nodes[victim].http, "GET", "/readyz").await;
    assert_ne!(ready, Some(200), "a draining node still says it is ready");
    // The others elect leaders for everything it led while it still runs.
    let handed_over = loop {
        let v = cluster.status(Some(victim)).await;
        let still: Vec<usize> = led_by(&v, &victim_name);
        let leaderless = v.partitions.iter().filter(|p| p.leader.is_none()).count();
        if still.is_empty() && leaderless == 0 {
            break t0.elapsed();
        }
        // Well inside the lame-duck window: a partition left quiet under the victim would
        // change leader only once the victim leaves gossip, after that window.
        assert!(
            t0.elapsed() < Duration::from_millis(LAME_DUCK_MS - 500),
            "after {:?} {victim_name} still leads {still:?} ({leaderless} leaderless)",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        cluster.nodes[victim].is_running(),
        "{victim_name} exited before the handover was seen ({handed_over:?})"
    );
    let seq = cluster.nodes[survivor]
        .publish(&user, "after-handover", "hi")
        .await;
    assert_eq!(seq, 1);
    // Every device hears bye, spread over the window.
    let mut at = Vec::new();
    for b in byes {
        let (when, got) = b.await.unwrap();
        match got {
            Ok(Err(warbler_client::ClientError::Bye { retry_ms, .. })) => assert!(retry_ms > 0),
            other => panic!("expected bye, got {other:?}"),
        }
        at.push(when);
    }
    at.sort();
    let spread = *at.last().unwrap() - at[0];
    println!(
        "drain: {} partitions handed over in {handed_over:?}; 12 byes from {:?} to {:?}",
        led.len(),
        at[0],
        at.last().unwrap()
    );
    assert!(
        spread >= Duration::from_millis(LAME_DUCK_MS / 4),
        "byes came within {spread:?} of each other: not spread over the {LAME_DUCK_MS} ms window"
    );
    // Drain budget: 3 election timeouts (500 ms here) + lame duck + 4 × 2 s of grace.
    let budget = Duration::from_millis(3 * 500 + LAME_DUCK_MS + 8_000);
    loop {
        if let Some(status) = cluster.nodes[victim].exit_status() {
            assert!(status.success(), "{victim_name} exited with {status}");
            break;
        }
        assert!(
            t0.elapsed() < budget,
            "{victim_name} still running after its drain budget {budget:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "drain: {victim_name} exited {:?} after SIGTERM (budget {budget:?})",
        t0.elapsed()
    );
}

/// Under load a draining node's busy partition changes leader while the node still runs:
/// its writes are held and it is handed to a caught-up follower (or its followers, hearing
/// nothing more, elect one). (A draining leader
/// that went on replicating publishes kept resetting its followers' election timers and
/// led until it exited; its devices then waited for that election.) Nothing acknowledged
/// is lost, and the publishes go on at the new leader before the node exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_leader_hands_its_busy_partition_over_before_it_exits() {
    let mut cluster = start_lame_duck_cluster().await;
    let outcomes: Outcomes = Arc::default();
    let (stop, clients, tasks) = start_publishers(&cluster, &outcomes, 6);
    let hot_partition = warbler_cluster::partition_of(HOT, 64) as usize;
    let start = Instant::now();
    while acked_for(&outcomes, HOT) < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the publishers got only {} acknowledgements for {HOT}",
            acked_for(&outcomes, HOT)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The node leading the busy partition drains.
    let victim = cluster.leader_of(HOT, None).await;
    let victim_name = format!("n{victim}");
    let survivor = (victim + 1) % 3;
    clients
        .lock()
        .unwrap()
        .retain(|c| *c != cluster.nodes[victim].client);
    let t0 = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &cluster.nodes[victim].pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (handed_over, new_leader) = loop {
        let v = cluster.status(Some(victim)).await;
        match v.partitions[hot_partition].leader.clone() {
            Some(l) if l != victim_name => break (t0.elapsed(), l),
            _ => {}
        }
        assert!(
            t0.elapsed() < Duration::from_millis(LAME_DUCK_MS - 500),
            "after {:?} {victim_name} still leads the busy partition {hot_partition} (or it has no leader)",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let acked_then = acked_for(&outcomes, HOT);
    // The publishes go on at the new leader while the old one is still in its lame duck.
    let moved_on = Instant::now();
    while acked_for(&outcomes, HOT) < acked_then + 20 {
        assert!(
            moved_on.elapsed() < Duration::from_secs(2),
            "publishes to {HOT} stalled after {new_leader} took over: {} acknowledged",
            acked_for(&outcomes, HOT) - acked_then
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cluster.nodes[victim].is_running(),
        "{victim_name} exited before its busy partition moved on ({:?})",
        t0.elapsed()
    );
    println!(
        "drain under load: partition {hot_partition} moved from {victim_name} to {new_leader} in {handed_over:?}; 20 more acknowledged {:?} later",
        moved_on.elapsed()
    );
    let budget = Duration::from_millis(3 * 500 + LAME_DUCK_MS + 8_000);
    while cluster.nodes[victim].exit_status().is_none() {
        assert!(
            t0.elapsed() < budget,
            "{victim_name} still running after its drain budget"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_publishers(stop, tasks).await;
    let delivered = check_streams(&cluster, survivor, &outcomes).await;
    assert!(delivered >= acked_count(&outcomes));
}

/// The metric names a deploy file refers to (`warbler_*`, `process_*`), with the suffixes
/// Prometheus adds to a summary's series taken off.
fn metric_names_in(path: &str) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let mut names = std::collections::BTreeSet::new();
    for prefix in ["warbler_", "process_"] {
        let mut rest = text.as_str();
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            // Part of a longer word (e.g. a label value) is not a metric name.
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    // Names of the adapter's output and the chart's own objects are not node metrics.
    names.remove("warbler_connections_per_pod");
    names
}

/// Every metric the Grafana dashboard, the alert rules and the autoscaler's adapter rules
/// name is exported by a live node: a cluster member for the cluster's figures, a single
/// node for the group committer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_alerts_and_autoscaler_name_is_exported() {
    let mut wanted = metric_names_in("deploy/grafana/warbler.json");
    wanted.extend(metric_names_in("deploy/prometheus/alerts.yml"));
    wanted.extend(metric_names_in("deploy/prometheus/adapter-rules.yaml"));
    assert!(wanted.len() > 20, "too few names found: {wanted:?}");
    let cluster = Cluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let single = Node::start(dir.path());
    let mut scraped = String::new();
    for node in cluster.nodes.iter().chain(std::iter::once(&single)) {
        let mut phone = node.device("metrics-user", "phone").await;
        node.publish("metrics-user", &format!("m-{}", node.http), "hello")
            .await;
        let m = tokio::time::timeout(Duration::from_secs(10), phone.recv_msg())
            .await
            .expect("delivery within 10 s")
            .unwrap();
        phone.ack(m.seq).await.unwrap();
    }
    // The cluster's health gauges are refreshed every second.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for node in cluster.nodes.iter().chain(std::iter::once(&single)) {
        let (status, text) = common::http_raw(&node.http, "GET", "/metrics", None, b"").await;
        assert_eq!(status, 200);
        scraped.push_str(&text);
    }
    let exported: std::collections::BTreeSet<&str> = scraped
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .flat_map(|n| [n, n.trim_end_matches("_sum"), n.trim_end_matches("_count")])
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "named in deploy/ but not exported: {missing:?}"
    );
    println!(
        "metrics: all {} names in deploy/ are exported",
        wanted.len()
    );
}

/// `warbler cluster scale --to 3` on four nodes: it decommissions the highest ordinal (n3),
/// waits until n3 holds nothing and every partition has its three replicas on n0..n2, then
/// runs the operator's command with `{n}` = 3 (here: stop the process of ordinal 3), and
/// ends when the cluster is settled; every acknowledged message is still there. A target
/// below the replication factor is refused before anything moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_scale_decommissions_the_highest_ordinal_then_runs_the_operator_command() {
    let mut cluster = Cluster::start(4).await;
    let dir = cluster._dir.path().to_path_buf();
    for (i, n) in cluster.nodes.iter().enumerate() {
        std::fs::write(dir.join(format!("pid-{i}")), n.pid().to_string()).unwrap();
    }
    for k in 0..20 {
        cluster.nodes[k % 4]
            .publish(&format!("scale-{}", k % 5), &format!("s{k}"), "before")
            .await;
    }
    let secret = cluster.nodes[0].dir.join("secret");
    let http = cluster.nodes[0].http.clone();
    let scale = |to: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_warbler"))
            .args(["cluster", "scale", "--to", to, "--stall-secs", "120"])
            .args(["--http", &http])
            .arg("--jwt-secret-file")
            .arg(&secret)
            .arg("--run")
            .arg(format!("kill -TERM $(cat {}/pid-{{n}})", dir.display()))
            .output()
            .unwrap()
    };
    let refused = scale("2");
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(text.contains("replication factor is 3"), "{text}");
    let t0 = Instant::now();
    let out = scale("3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("scale 4→3 took {:?}:\n{stdout}", t0.elapsed());
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("decommissioning n3"), "{stdout}");
    assert!(
        stdout.contains(&format!("kill -TERM $(cat {}/pid-3)", dir.display())),
        "{stdout}"
    );
    // The command stopped n3 (and only after it held nothing).
    let start = Instant::now();
    while cluster.nodes[3].exit_status().is_none() {
        assert!(start.elapsed() < Duration::from_secs(30), "n3 still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = cluster.status(Some(3)).await;
    let members: Vec<&str> = v
        .members
        .iter()
        .filter(|m| m.member)
        .map(|m| m.node.as_str())
        .collect();
    assert_eq!(members, ["n0", "n1", "n2"]);
    for p in &v.partitions {
        assert_eq!(p.replicas, ["n0", "n1", "n2"], "partition {}", p.partition);
        assert!(p.leader.is_some(), "partition {} leaderless", p.partition);
    }
    for u in 0..5 {
        let seqs = seqs_of(&cluster.nodes[0], &format!("scale-{u}")).await;
        assert_eq!(seqs, [1, 2, 3, 4], "scale-{u}");
    }
    // Run again: nothing left to do.
    let again = scale("3");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("the cluster has 3 members"));

    // Scaled out again, n3 comes back on the disk it left with (a StatefulSet keeps the
    // claim): its member list names it, the cluster's does not. It wipes the stale disk
    // and joins as a new node instead of starting replicas from it.
    cluster.nodes[3].restart();
    cluster.wait_ready(3, Duration::from_secs(120)).await;
    assert_eq!(
        counter(&cluster.nodes[3], "warbler_stale_disk_wipes_total").await,
        1
    );
    // Settled alone is not enough: right after the rejoin the placement may not name n3
    // yet, and a placement without n3 is trivially settled.
    let start = Instant::now();
    loop {
        wait_settled(&cluster, &[0, 1, 2, 3], Duration::from_secs(180)).await;
        let v = cluster.nodes[3].status().await.expect("n3 answers");
        let member = v.members.iter().any(|m| m.node == "n3" && m.member);
        if member && v.replicas_held.unwrap_or(0) > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the ring gives n3 no replicas again (member: {member}): {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for u in 0..5 {
        let seqs = seqs_of(&cluster.nodes[3], &format!("scale-{u}")).await;
        assert_eq!(seqs, [1, 2, 3, 4], "scale-{u} read through the rejoined n3");
    }
}

/// The disk of a node is lost while the whole cluster is down, and it comes back first,
/// on an empty disk and told to form alone: it forms a cluster of its own, with its own
/// id. When the others come back, the two clusters refuse each other on every connection
/// (they share node names and partition numbers, so a single RPC between them would mix
/// their consensus groups): the old members serve their data with the majority they
/// have, and the new node counts the refusals of their calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_formed_apart_on_an_empty_disk_never_mixes_with_its_old_cluster() {
    let mut cluster = Cluster::start(3).await;
    for k in 0..6 {
        cluster.nodes[k % 3]
            .publish(&format!("apart-{}", k % 2), &format!("a{k}"), "before")
            .await;
    }
    for n in &mut cluster.nodes {
        n.kill9();
    }
    let n0 = cluster.nodes[0].dir.clone();
    std::fs::remove_dir_all(&n0).unwrap();
    let alone = Node::start_with(
        &n0,
        &[(
            "WARBLER_CLUSTER_KEY_FILE",
            cluster._dir.path().join("cluster.key").to_str().unwrap(),
        )],
        &[
            "--node-id",
            "n0",
            "--cluster-addr",
            &cluster.cluster_addrs[0],
            "--seeds",
            &cluster.cluster_addrs[0],
            "--bootstrap-expect",
            "1",
        ],
    );
    cluster.nodes[0] = alone;
    cluster.wait_ready(0, Duration::from_secs(60)).await;
    for i in [1, 2] {
        cluster.nodes[i].restart();
    }
    for i in [1, 2] {
        cluster.wait_ready(i, Duration::from_secs(120)).await;
    }
    // Every partition of the old cluster is led by n1 or n2, and its data is whole.
    let start = Instant::now();
    loop {
        let v = cluster.nodes[1].status().await.expect("n1 answers");
        let led_by_survivors = v
            .partitions
            .iter()
            .all(|p| p.leader.as_deref().is_some_and(|l| l == "n1" || l == "n2"));
        if led_by_survivors {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{v:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for u in 0..2 {
        let seqs = seqs_of(&cluster.nodes[2], &format!("apart-{u}")).await;
        assert_eq!(seqs, [1, 2, 3], "apart-{u}");
        assert_eq!(
            cluster.nodes[1]
                .publish(&format!("apart-{u}"), "after", "after")
                .await,
            4,
            "the old cluster's sequence goes on"
        );
    }
    // The new cluster of one knows nothing of the old one's messages.
    assert!(cluster.nodes[0].history("apart-0").await.is_empty());
    let v = cluster.nodes[0].status().await.expect("n0 answers");
    let members: Vec<&str> = v
        .members
        .iter()
        .filter(|m| m.member)
        .map(|m| m.node.as_str())
        .collect();
    assert_eq!(members, ["n0"]);
    // The old members keep dialling their n0 for their groups; the new n0 refuses them.
    let refused = counter(&cluster.nodes[0], "warbler_peer_connections_refused_total").await;
    assert!(
        refused > 0,
        "n0 refused no connection from the other cluster"
    );
}

/// The seqs of `user`'s retained history, read through `node`.
async fn seqs_of(node: &Node, user: &str) -> Vec<u64> {
    node.history(user).await.iter().map(|m| m.0).collect()
}

/// Sum of a metric over the nodes that answer.
async fn metric_sum(cluster: &Cluster, name: &str, except: Option<usize>) -> u64 {
    let mut sum = 0;
    for (i, n) in cluster.nodes.iter().enumerate() {
        if Some(i) != except {
            sum += counter(n, name).await;
        }
    }
    sum
}

/// A member that dies for good is replaced: while it is down its partitions count as
/// under-replicated; after `cluster.dead_node_timeout_ms` the member list's leader removes
/// it and the replicas are rebuilt on the others, losing nothing. When it comes back on
/// its old disk, it learns it was removed, and as no partition counts its replicas any
/// more it wipes the disk and joins as a new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_is_replaced_and_told_it_was_removed_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster =
        Cluster::start_with(4, dir, &[("WARBLER_DEAD_NODE_TIMEOUT_MS", "5000")]).await;
    for k in 0..20 {
        cluster.nodes[k % 4]
            .publish(&format!("dead-{}", k % 5), &format!("d{k}"), "before")
            .await;
    }
    cluster.nodes[3].kill9();
    let t0 = Instant::now();
    let mut under_seen = 0;
    loop {
        under_seen = under_seen
            .max(metric_sum(&cluster, "warbler_partitions_under_replicated", Some(3)).await);
        let v = cluster.status(Some(3)).await;
        let members: Vec<&str> = v
            .members
            .iter()
            .filter(|m| m.member)
            .map(|m| m.node.as_str())
            .collect();
        let rebuilt = v.partitions.iter().all(|p| {
            p.replicas.len() == 3 && !p.replicas.iter().any(|n| n == "n3") && p.leader.is_some()
        });
        if members == ["n0", "n1", "n2"] && rebuilt {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "n3 not replaced after {:?}: members {members:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("n3 replaced {:?} after it died (timeout 5 s)", t0.elapsed());
    assert!(
        t0.elapsed() >= Duration::from_secs(5),
        "removed before the timeout"
    );
    assert!(
        under_seen > 0,
        "no partition counted as under-replicated meanwhile"
    );
    assert_eq!(
        metric_sum(&cluster, "warbler_dead_members_removed_total", Some(3)).await,
        1
    );
    wait_settled(&cluster, &[0, 1, 2], Duration::from_secs(60)).await;
    // The gauge is refreshed every few seconds.
    let start = Instant::now();
    loop {
        let under = metric_sum(&cluster, "warbler_partitions_under_replicated", Some(3)).await;
        if under == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{under} partitions still under-replicated after the replacement"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for u in 0..5 {
        let seqs = seqs_of(&cluster.nodes[1], &format!("dead-{u}")).await;
        assert_eq!(seqs, [1, 2, 3, 4], "dead-{u}");
    }

    cluster.nodes[3].restart();
    cluster.wait_ready(3, Duration::from_secs(120)).await;
    assert_eq!(
        counter(&cluster.nodes[3], "warbler_stale_disk_wipes_total").await,
        1,
        "n3 came back on the disk of a removed member and was not wiped"
    );
    wait_settled(&cluster, &[0, 1, 2, 3], Duration::from_secs(180)).await;
    for u in 0..5 {
        assert_eq!(
            cluster.nodes[3]
                .publish(&format!("dead-{u}"), &format!("after-{u}"), "after")
                .await,
            5,
            "dead-{u}: the sequence goes on through the rejoined n3"
        );
    }
}

/// `warbler backup` of a cluster under load, `warbler restore` into a new, empty cluster:
/// every message acknowledged before the backup began is there at its seq with its id, a
/// publish retried with its id answers the original seq, and a device resumes from its
/// restored cursor. A damaged backup, or a restore into a cluster that holds data, is
/// refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_new_cluster_with_seqs_ids_and_cursors() {
    let a = Cluster::start(3).await;
    let mut sent: Vec<(String, String, u64)> = Vec::new();
    for k in 0..40 {
        let (user, id) = (format!("bk-{}", k % 8), format!("bk{k}"));
        let seq = a.nodes[k % 3].publish(&user, &id, "kept").await;
        sent.push((user, id, seq));
    }
    let mut phone = a.nodes[1].device("bk-0", "phone").await;
    common::recv_n_acking(&mut phone, 3).await;
    // Gone at once after its acks (regression: the acks of a device on a node without the
    // leader could arrive after its unsubscribe, and were lost).
    drop(phone);
    let start = Instant::now();
    loop {
        let (_, v) = a.nodes[0]
            .http(
                "GET",
                "/v1/users/bk-0/devices",
                Some(&token("ops", "admin")),
                "",
            )
            .await;
        if v["devices"][0]["acked"] == 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the ack of 3 never landed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let outcomes: Outcomes = Arc::default();
    let (stop, _, tasks) = start_publishers(&a, &outcomes, 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_backup = outcomes.lock().unwrap().clone();
    let out_dir = a._dir.path().join("backup");
    let secret = a.nodes[0].dir.join("secret");
    let warbler = |args: &[&str], http: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_warbler"))
            .args(args)
            .args(["--http", http])
            .arg("--jwt-secret-file")
            .arg(&secret)
            .output()
            .unwrap()
    };
    let succeeds = |args: &[&str], http: &str| {
        let out = warbler(args, http);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "warbler {args:?}: {text}{err}");
    };
    succeeds(
        &["backup", "--out", out_dir.to_str().unwrap()],
        &a.nodes[0].http,
    );
    stop_publishers(stop, tasks).await;
    assert!(out_dir.join("manifest.json").exists());

    let b = Cluster::start_with(3, tempfile::tempdir().unwrap(), &[]).await;
    let (ia, ib) = (
        a.status(None).await.cluster_id,
        b.status(None).await.cluster_id,
    );
    assert!(ia.is_some() && ib.is_some() && ia != ib, "{ia:?} {ib:?}");
    succeeds(
        &["restore", "--from", out_dir.to_str().unwrap()],
        &b.nodes[2].http,
    );

    // Everything acknowledged before the backup began, at its seq, with its id.
    let mut expected: HashMap<String, BTreeMap<u64, String>> = HashMap::new();
    for (user, id, seq) in &sent {
        expected
            .entry(user.clone())
            .or_default()
            .insert(*seq, id.clone());
    }
    for (id, (user, seqs)) in &before_backup {
        if let Some(seq) = seqs.first() {
            expected
                .entry(user.clone())
                .or_default()
                .insert(*seq, id.clone());
        }
    }
    for (user, acked) in &expected {
        // History is read from the node's own replica, which may trail by a moment.
        let start = Instant::now();
        loop {
            let history: BTreeMap<u64, String> = b.nodes[0]
                .history(user)
                .await
                .into_iter()
                .map(|(seq, id, _)| (seq, id))
                .collect();
            let missing: Vec<_> = acked
                .iter()
                .filter(|(seq, id)| history.get(seq) != Some(id))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{user}: after the restore, missing or different: {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // A publish retried after the restore answers the original seq; a new one follows.
    let (user, id, seq) = &sent[13];
    assert_eq!(b.nodes[1].publish(user, id, "again").await, *seq);
    let last = *expected[user.as_str()].keys().last().unwrap();
    assert!(b.nodes[1].publish(user, "bk-new", "new").await > last);
    // The device resumes after its restored cursor.
    let mut phone = b.nodes[2].device("bk-0", "phone").await;
    let first = common::recv_n(&mut phone, 1).await;
    assert_eq!(first[0].seq, 4, "bk-0/phone resumes after its cursor of 3");

    // Into a cluster that holds data: refused, unless resuming.
    let again = warbler(
        &["restore", "--from", out_dir.to_str().unwrap()],
        &b.nodes[0].http,
    );
    assert!(!again.status.success());
    let text = String::from_utf8_lossy(&again.stderr);
    assert!(
        text.contains("holds messages or cursors") && text.contains("--resume"),
        "{text}"
    );
    // A damaged file: refused before anything is written.
    let file = out_dir.join("p00005.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    let last_byte = bytes.len() - 1;
    bytes[last_byte] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let damaged = warbler(
        &["restore", "--resume", "--from", out_dir.to_str().unwrap()],
        &b.nodes[0].http,
    );
    assert!(!damaged.status.success());
    let text = String::from_utf8_lossy(&damaged.stderr);
    assert!(
        text.contains("p00005.bin") && text.contains("damaged"),
        "{text}"
    );
}

/// Six nodes in three zones, RF 3: every partition has one replica in each zone, and with
/// a whole zone down (both its nodes killed) every partition still elects a leader and
/// takes writes. `/v1/cluster` reports each member's zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_spread_over_zones_and_losing_a_zone_keeps_every_partition_writable() {
    let zones = ["a", "a", "b", "b", "c", "c"];
    let mut cluster = Cluster::start_zoned(6, tempfile::tempdir().unwrap(), &[], &zones).await;
    let zone_of = |n: &str| zones[n.trim_start_matches('n').parse::<usize>().unwrap()];
    let v = cluster.status(None).await;
    for m in &v.members {
        assert_eq!(m.zone.as_deref(), Some(zone_of(&m.node)), "{m:?}");
    }
    wait_settled(&cluster, &[0, 1, 2, 3, 4, 5], Duration::from_secs(120)).await;
    let v = cluster.status(None).await;
    for p in &v.partitions {
        let spread: std::collections::HashSet<&str> =
            p.replicas.iter().map(|n| zone_of(n)).collect();
        assert_eq!(
            spread.len(),
            3,
            "partition {}: {:?}",
            p.partition,
            p.replicas
        );
    }
    // One user per partition, to write to all of them.
    let mut users: BTreeMap<u16, String> = BTreeMap::new();
    for i in 0.. {
        let u = format!("z{i}");
        users
            .entry(warbler_cluster::partition_of(&u, 64))
            .or_insert(u);
        if users.len() == 64 {
            break;
        }
    }
    for u in users.values() {
        cluster.nodes[0]
            .publish(u, &format!("{u}-1"), "before")
            .await;
    }
    // Zone c goes down.
    cluster.nodes[4].kill9();
    cluster.nodes[5].kill9();
    let t0 = Instant::now();
    for (p, u) in &users {
        let seq = loop {
            let (status, v) = cluster.nodes[(*p as usize) % 4]
                .http(
                    "POST",
                    &format!("/v1/users/{u}/messages"),
                    Some(&token("backend", "publish")),
                    &serde_json::json!({"id": format!("{u}-2"), "body": "after"}).to_string(),
                )
                .await;
            if status == 200 {
                break v["seq"].as_u64().unwrap();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "partition {p} takes no write with zone c down: {status} {v}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(seq, 2, "partition {p}");
    }
    println!(
        "every partition writable {:?} after zone c went down",
        t0.elapsed()
    );
}

/// Leaders per node (`warbler_partitions_led`) of `nodes`, once they add up to every
/// partition and are within 25% of the even share; panics after `within`.
async fn wait_leaders_even(
    cluster: &Cluster,
    nodes: &[usize],
    within: Duration,
) -> (Vec<usize>, Duration) {
    let start = Instant::now();
    loop {
        let mut counts = Vec::new();
        for &i in nodes {
            counts.push(counter(&cluster.nodes[i], "warbler_partitions_led").await as usize);
        }
        let even = counts.iter().sum::<usize>() == 64
            && warbler_cluster::control::balance::within(&counts, 0.25);
        if even {
            return (counts, start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "leaders per node {counts:?} not within 25% of even after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Raft elects whoever times out first, so leaders pile up on some nodes; the member list's
/// leader spreads them: after formation, after a node restarts (it comes back leading
/// nothing) and after a scale-out (the new node leads nothing), leaders per node end within
/// 25% of even, as do replicas per node after the scale-out. Leaders are handed over under
/// load, and every acknowledged message is delivered in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_spread_evenly_after_formation_a_restart_and_a_scale_out() {
    let mut cluster = Cluster::start(3).await;
    let outcomes: Outcomes = Arc::default();
    let (stop, clients, tasks) = start_publishers(&cluster, &outcomes, 2);
    let (counts, took) = wait_leaders_even(&cluster, &[0, 1, 2], Duration::from_secs(120)).await;
    println!("formed: leaders per node {counts:?}, even {took:?} after ready");

    cluster.nodes[2].restart();
    cluster.wait_ready(2, Duration::from_secs(120)).await;
    let (counts, took) = wait_leaders_even(&cluster, &[0, 1, 2], Duration::from_secs(120)).await;
    println!("n2 restarted: leaders per node {counts:?}, even {took:?} after ready");

    let new = cluster.spawn(3);
    cluster.wait_ready(new, Duration::from_secs(120)).await;
    clients
        .lock()
        .unwrap()
        .push(cluster.nodes[new].client.clone());
    wait_settled(&cluster, &[0, 1, 2, 3], Duration::from_secs(180)).await;
    let (counts, took) = wait_leaders_even(&cluster, &[0, 1, 2, 3], Duration::from_secs(120)).await;
    println!("n3 joined: leaders per node {counts:?}, even {took:?} after the moves");
    // Settled groups no longer count the replicas that moved; each node drops its copy of
    // them on its next check (every 2 s), so the count is read until those are gone.
    let start = Instant::now();
    let held = loop {
        let mut held = Vec::new();
        for n in &cluster.nodes {
            held.push(
                n.status()
                    .await
                    .expect("a member answers")
                    .replicas_held
                    .unwrap(),
            );
        }
        if held.iter().sum::<usize>() == 64 * 3 {
            break held;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "moved replicas not dropped after 30 s: replicas per node {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        warbler_cluster::control::balance::within(&held, 0.25),
        "replicas per node {held:?} not within 25% of even"
    );
    println!("n3 joined: replicas per node {held:?}");

    stop_publishers(stop, tasks).await;
    let done = metric_sum(
        &cluster,
        "warbler_leader_transfers_total{result=\"done\"}",
        None,
    )
    .await;
    assert!(done > 0, "no leadership was handed over");
    let delivered = check_streams(&cluster, 0, &outcomes).await;
    println!(
        "{done} leaderships handed over; {} acknowledged, {delivered} delivered in order",
        acked_count(&outcomes)
    );
}
