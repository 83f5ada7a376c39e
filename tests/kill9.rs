//! Acceptance: `kill -9` while publishers run, then restart: every acknowledged publish is
//! delivered, in order, with no gaps, under the seq it was acknowledged with; retried ids
//! keep one seq each.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{recv_n_acking, seed, Node};
use rand::{Rng, SeedableRng};

const USERS: usize = 8;
const PUBLISHERS: usize = 16;
const ROUNDS: usize = 3;

/// id → (user, seq if acknowledged)
type Outcomes = Arc<Mutex<HashMap<String, (String, Option<u64>)>>>;

async fn publish_until_killed(node_client: String, k: usize, round: usize, outcomes: Outcomes) {
    let opts = warbler_client::ConnectOptions::new(
        node_client,
        common::token("backend", "publish"),
        format!("pub{k}"),
    );
    let Ok(mut conn) = warbler_client::Connection::connect(opts).await else {
        return;
    };
    for i in 0.. {
        let id = format!("r{round}-p{k}-{i}");
        let user = format!("u{}", (k + i) % USERS);
        outcomes
            .lock()
            .unwrap()
            .insert(id.clone(), (user.clone(), None));
        match conn.publish_wait(&id, &user, id.as_bytes()).await {
            Ok(seq) => outcomes.lock().unwrap().get_mut(&id).unwrap().1 = Some(seq),
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_publishes_loses_nothing_acknowledged() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("kill9"));
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path());
    let outcomes: Outcomes = Arc::default();
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|k| {
                tokio::spawn(publish_until_killed(
                    node.client.clone(),
                    k,
                    round,
                    outcomes.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1500))).await;
        node.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        node.restart();
        check(&node, &outcomes).await;
    }
    let acked = outcomes
        .lock()
        .unwrap()
        .values()
        .filter(|(_, s)| s.is_some())
        .count();
    let attempted = outcomes.lock().unwrap().len();
    println!("kill9: {attempted} attempted, {acked} acknowledged over {ROUNDS} kills");
    assert!(
        acked > 100,
        "the test must actually publish under load (acked {acked})"
    );

    // Retry every publish that was not acknowledged: each id ends up with exactly one seq.
    let pending: Vec<(String, String)> = outcomes
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, (_, s))| s.is_none())
        .map(|(id, (u, _))| (id.clone(), u.clone()))
        .collect();
    for (id, user) in &pending {
        let seq = node.publish(user, id, id).await;
        outcomes.lock().unwrap().get_mut(id).unwrap().1 = Some(seq);
    }
    let histories = check(&node, &outcomes).await;
    for (user, history) in &histories {
        let ids: HashSet<&str> = history.iter().map(|(_, id)| id.as_str()).collect();
        assert_eq!(ids.len(), history.len(), "{user}: an id was stored twice");
    }
    // Every device gets every message, in order, from seq 1.
    for (user, history) in histories {
        let mut device = node.device(&user, "phone").await;
        let got = recv_n_acking(&mut device, history.len()).await;
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=history.len() as u64).collect::<Vec<_>>()
        );
    }
}

/// Checks each user's history is 1..=n with no gaps and holds every acknowledged publish at
/// its acknowledged seq. Returns the histories as seq → id.
async fn check(node: &Node, outcomes: &Outcomes) -> BTreeMap<String, Vec<(u64, String)>> {
    let mut histories = BTreeMap::new();
    for u in 0..USERS {
        let user = format!("u{u}");
        let h: Vec<(u64, String)> = node
            .history(&user)
            .await
            .into_iter()
            .map(|(s, id, _)| (s, id))
            .collect();
        let seqs: Vec<u64> = h.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=h.len() as u64).collect::<Vec<_>>(),
            "{user}: history has a gap"
        );
        histories.insert(user, h);
    }
    for (id, (user, seq)) in outcomes.lock().unwrap().iter() {
        if let Some(seq) = seq {
            let h = &histories[user];
            let stored = h.get(*seq as usize - 1).map(|(_, id)| id.as_str());
            assert_eq!(
                stored,
                Some(id.as_str()),
                "{user}: acknowledged {id} at seq {seq}, stored {stored:?}"
            );
        }
    }
    histories
}
