//! The second half of a scenario with a `backup` fault: the backup taken under load is
//! restored into a new, empty cluster (a new cluster id, its own volumes), and the restored
//! cluster is checked against the history of the first:
//!
//! - every message acknowledged before the backup began is there at its seq with its id;
//! - every message there is the original's message at that seq (same id, same body), and
//!   each user's stream runs from seq 1 without a gap: the backup holds each partition at
//!   one applied index, so a user's restored stream is a prefix of the original one;
//! - each device's restored cursor lies between what the server had confirmed to it before
//!   the backup began (the cursor of its last connect) and the last seq it had been
//!   delivered when the backup ended, and the device resumes right after that cursor, in
//!   order, to the end of its stream;
//! - a publish retried with its original id answers the original seq, and a new publish
//!   gets the seq after the restored end.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use warbler_client::Connection;

use crate::driver::Cluster;
use crate::history::{Event, Outcome, Recorder};
use crate::scenario::Workload;
use crate::workload;

/// Publishes retried against the restored cluster, drawn from the seed.
const RETRIES: usize = 100;

/// How long the restored cluster gets to show every expected row on the node read.
const SETTLE: Duration = Duration::from_secs(20);

const MAX_EXAMPLES: usize = 20;

/// The restore check's verdict (in `result.json` as `restore`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreCheck {
    /// When the backup ran, ms since the run started.
    pub backup_t: f64,
    pub backup_end: f64,
    /// What `warbler backup` and `warbler restore` printed (sizes and speeds).
    pub backup_said: String,
    pub restore_said: String,
    pub restore_s: f64,
    pub users: u64,
    /// Messages acknowledged before the backup began: each must be restored.
    pub required: u64,
    /// Messages the restored cluster holds.
    pub restored: u64,
    /// Required messages not at their seq with their id.
    pub missing: u64,
    /// Restored messages whose id or body is not the original's at that seq.
    pub mismatched: u64,
    /// Seqs missing below a user's restored end.
    pub gaps: u64,
    pub devices: u64,
    /// Devices whose cursor had been confirmed above 0 before the backup began (the lower
    /// bound means something for them).
    pub cursors_bounded_below: u64,
    /// Restored cursors below the confirmed one or above anything delivered.
    pub cursors_out_of_range: u64,
    /// Devices that did not resume right after their cursor, in order, to the end.
    pub resume_wrong: u64,
    pub retries: u64,
    /// Retried publishes answered with a seq other than the original one.
    pub retry_wrong: u64,
    /// New publishes (one per user) not given the seq after the restored end.
    pub new_seq_wrong: u64,
    pub examples: Vec<String>,
    pub valid: bool,
}

impl RestoreCheck {
    fn note(&mut self, text: String) {
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(text);
        }
    }
}

/// What the first cluster's history says the restored one must hold.
#[derive(Default)]
struct Expected {
    /// Per user, seq → id, from acknowledgements and deliveries.
    streams: HashMap<String, BTreeMap<u64, String>>,
    /// Per user, the (seq, id) acknowledged before the backup began.
    required: HashMap<String, BTreeMap<u64, String>>,
    /// Per device: (cursor confirmed before the backup began, highest seq delivered before
    /// it ended).
    cursors: HashMap<String, (u64, u64)>,
}

fn expected(events: &[Event], backup_t: f64, backup_end: f64) -> Expected {
    let mut x = Expected::default();
    for e in events {
        match e {
            Event::Publish {
                end,
                user,
                id,
                outcome: Outcome::Ok { seq },
                ..
            } => {
                x.streams
                    .entry(user.clone())
                    .or_default()
                    .insert(*seq, id.clone());
                if *end < backup_t {
                    x.required
                        .entry(user.clone())
                        .or_default()
                        .insert(*seq, id.clone());
                }
            }
            Event::Deliver {
                t,
                device,
                user,
                seq,
                id,
                ..
            } => {
                x.streams
                    .entry(user.clone())
                    .or_default()
                    .insert(*seq, id.clone());
                if *t <= backup_end {
                    let c = x.cursors.entry(device.clone()).or_default();
                    c.1 = c.1.max(*seq);
                }
            }
            Event::Connect {
                t, device, cursor, ..
            } if *t < backup_t => {
                let c = x.cursors.entry(device.clone()).or_default();
                c.0 = c.0.max(*cursor);
            }
            _ => {}
        }
    }
    x
}

/// One restored row.
struct Row {
    id: String,
    body: Option<String>,
}

/// A user's whole stream as node `i` holds it.
async fn read_stream(
    cluster: &Cluster,
    i: usize,
    user: &str,
) -> anyhow::Result<BTreeMap<u64, Row>> {
    let mut out = BTreeMap::new();
    let mut after = 0;
    loop {
        let path = format!("/v1/users/{user}/messages?after={after}&limit=1000");
        let (status, v) = cluster.http(i, "GET", &path, "").await?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {v}");
        let page = v["messages"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return Ok(out);
        }
        for m in page {
            let seq = m["seq"].as_u64().context("a message without a seq")?;
            out.insert(
                seq,
                Row {
                    id: m["id"].as_str().unwrap_or_default().to_string(),
                    body: m["body"].as_str().map(str::to_string),
                },
            );
            after = seq;
        }
    }
}

/// `warbler <args> --http <node 0> --jwt-secret-file <secret>`, as an operator runs it.
pub fn operator_command(cluster: &Cluster, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(cluster.warbler_bin());
    cmd.args(args)
        .args(["--http", &cluster.http_addr(0).to_string()])
        .arg("--jwt-secret-file")
        .arg(cluster.secret())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs an operator command to its end; returns what it printed, or why it failed.
pub async fn run_operator(mut cmd: tokio::process::Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("cannot run warbler {what}"))?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    anyhow::ensure!(
        out.status.success(),
        "warbler {what} failed ({}): {said} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(said)
}

/// Restores `backup` into `fresh` (a new, empty cluster) and checks it against `events`,
/// the first cluster's history. The restored devices' reads go to `rec`.
#[allow(clippy::too_many_arguments)]
pub async fn restore_and_check(
    fresh: &Cluster,
    backup: &Path,
    backup_said: String,
    (backup_t, backup_end): (f64, f64),
    events: &[Event],
    w: &Workload,
    seed: u64,
    rec: &Recorder,
) -> anyhow::Result<RestoreCheck> {
    let mut c = RestoreCheck {
        backup_t,
        backup_end,
        backup_said,
        ..RestoreCheck::default()
    };
    let t0 = Instant::now();
    let cmd = operator_command(fresh, &["restore", "--from", &backup.display().to_string()]);
    c.restore_said = run_operator(cmd, "restore").await?;
    c.restore_s = t0.elapsed().as_secs_f64();
    println!("  {}", c.backup_said);
    println!("  {}", c.restore_said);

    let x = expected(events, backup_t, backup_end);
    let users: Vec<String> = (0..w.users).map(|u| format!("u{u}")).collect();
    c.users = users.len() as u64;
    c.required = x.required.values().map(|m| m.len() as u64).sum();

    // The streams, once every required row shows on the node read (its replica may trail).
    let mut ends: HashMap<String, u64> = HashMap::new();
    let mut restored: HashMap<String, BTreeMap<u64, Row>> = HashMap::new();
    for user in &users {
        let need = x.required.get(user).cloned().unwrap_or_default();
        let start = Instant::now();
        let stream = loop {
            let s = read_stream(fresh, 0, user).await?;
            let complete = need
                .iter()
                .all(|(seq, id)| s.get(seq).is_some_and(|r| &r.id == id));
            if complete || start.elapsed() > SETTLE {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        for (seq, id) in &need {
            if stream.get(seq).is_none_or(|r| &r.id != id) {
                c.missing += 1;
                c.note(format!(
                    "{user}: {id} was acknowledged with seq {seq} before the backup began; the restored cluster has {:?} there",
                    stream.get(seq).map(|r| &r.id)
                ));
            }
        }
        let original = x.streams.get(user);
        for (seq, row) in &stream {
            let same_id = original.and_then(|o| o.get(seq)) == Some(&row.id);
            let same_body = row.body.as_deref().is_some_and(|b| {
                b.as_bytes() == workload::body_for(&row.id, w.body_bytes).as_slice()
            });
            if !same_id || !same_body {
                c.mismatched += 1;
                c.note(format!(
                    "{user}: restored seq {seq} is {} (body {}), the original stream has {:?}",
                    row.id,
                    if same_body { "as published" } else { "altered" },
                    original.and_then(|o| o.get(seq))
                ));
            }
        }
        let end = stream.keys().last().copied().unwrap_or(0);
        let held = stream.len() as u64;
        if held < end {
            c.gaps += end - held;
            c.note(format!(
                "{user}: the restored stream ends at seq {end} but holds {held} messages"
            ));
        }
        c.restored += held;
        ends.insert(user.clone(), end);
        restored.insert(user.clone(), stream);
    }

    // Devices resume from their restored cursors.
    let clients = Arc::new(fresh.clients());
    let mut drains = Vec::new();
    for user in &users {
        for d in 0..w.devices_per_user {
            drains.push(tokio::spawn(workload::drain(
                user.clone(),
                format!("d{d}"),
                clients.clone(),
                ends[user],
                Duration::from_secs(60),
                rec.clone(),
            )));
        }
    }
    for d in drains {
        let _ = d.await;
    }
    check_devices(&mut c, &rec.snapshot(), &x, &restored, &ends);

    // Retried publishes answer their original seq; a new one follows the restored end.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_0b5c);
    let mut sample: Vec<(&String, u64, &String)> = x
        .required
        .iter()
        .flat_map(|(u, m)| m.iter().map(move |(s, id)| (u, *s, id)))
        .collect();
    sample.sort();
    sample.shuffle(&mut rng);
    sample.truncate(RETRIES);
    let mut conn = publisher(&clients).await?;
    for (user, seq, id) in sample {
        c.retries += 1;
        let body = workload::body_for(id, w.body_bytes);
        let got = conn.publish_wait(id, user, &body).await;
        if got.as_ref().ok() != Some(&seq) {
            c.retry_wrong += 1;
            c.note(format!(
                "{user}: {id} retried after the restore answered {got:?}, not its original seq {seq}"
            ));
        }
    }
    for user in &users {
        let id = format!("after-restore-{user}");
        let got = conn
            .publish_wait(&id, user, &workload::body_for(&id, w.body_bytes))
            .await;
        if got.as_ref().ok() != Some(&(ends[user] + 1)) {
            c.new_seq_wrong += 1;
            c.note(format!(
                "{user}: a new publish after the restore answered {got:?}, not seq {}",
                ends[user] + 1
            ));
        }
    }
    c.valid = c.required > 0
        && c.missing == 0
        && c.mismatched == 0
        && c.gaps == 0
        && c.cursors_out_of_range == 0
        && c.resume_wrong == 0
        && c.retry_wrong == 0
        && c.new_seq_wrong == 0;
    Ok(c)
}

async fn publisher(clients: &[String]) -> anyhow::Result<Connection> {
    for addr in clients.iter().cycle().take(clients.len() * 10) {
        if let Some(c) = workload::connect(addr, "chaos-backend", "publish", "restore-check").await
        {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("no node of the restored cluster took a publisher connection")
}

/// Per device: the cursor of its first connection to the restored cluster within bounds,
/// and every connection's deliveries running from its cursor + 1 with the restored ids,
/// up to the user's end.
fn check_devices(
    c: &mut RestoreCheck,
    events: &[Event],
    x: &Expected,
    restored: &HashMap<String, BTreeMap<u64, Row>>,
    ends: &HashMap<String, u64>,
) {
    // Per device, its connections in order: (cursor, seqs and ids delivered).
    type Conn = (u64, Vec<(u64, String)>);
    let mut conns: BTreeMap<String, (String, Vec<Conn>)> = BTreeMap::new();
    let mut drained: HashMap<String, u64> = HashMap::new();
    for e in events {
        match e {
            Event::Connect {
                device,
                user,
                cursor,
                ..
            } => conns
                .entry(device.clone())
                .or_insert_with(|| (user.clone(), Vec::new()))
                .1
                .push((*cursor, Vec::new())),
            Event::Deliver {
                device, seq, id, ..
            } => {
                if let Some(last) = conns.get_mut(device).and_then(|d| d.1.last_mut()) {
                    last.1.push((*seq, id.clone()));
                }
            }
            Event::Drained {
                device, reached, ..
            } => {
                drained.insert(device.clone(), *reached);
            }
            _ => {}
        }
    }
    c.devices = conns.len() as u64;
    for (device, (user, list)) in &conns {
        let end = ends.get(user).copied().unwrap_or(0);
        let (floor, ceil) = x.cursors.get(device).copied().unwrap_or((0, 0));
        let cursor = list.first().map_or(0, |f| f.0);
        if floor > 0 {
            c.cursors_bounded_below += 1;
        }
        if cursor < floor || cursor > ceil.max(floor) || cursor > end {
            c.cursors_out_of_range += 1;
            c.note(format!(
                "{device}: restored cursor {cursor}; confirmed {floor} before the backup, delivered up to {ceil} when it ended, stream end {end}"
            ));
        }
        let stream = &restored[user];
        let mut wrong = None;
        for (k, (from, got)) in list.iter().enumerate() {
            for (n, (seq, id)) in got.iter().enumerate() {
                let due = from + 1 + n as u64;
                if *seq != due || stream.get(seq).map(|r| &r.id) != Some(id) {
                    wrong.get_or_insert(format!(
                        "{device}: connection {k} (cursor {from}) delivered seq {seq} ({id}) where seq {due} ({:?}) was due",
                        stream.get(&due).map(|r| &r.id)
                    ));
                }
            }
        }
        if drained.get(device).copied().unwrap_or(0) < end {
            wrong.get_or_insert(format!(
                "{device}: the read from the restored cluster stopped at {:?}, before the end {end}",
                drained.get(device)
            ));
        }
        if let Some(w) = wrong {
            c.resume_wrong += 1;
            c.note(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(t: f64, device: &str, seq: u64) -> Event {
        Event::Deliver {
            t,
            device: device.into(),
            user: "u1".into(),
            seq,
            id: format!("m{seq}"),
            body_ok: true,
        }
    }

    fn connect(t: f64, device: &str, cursor: u64) -> Event {
        Event::Connect {
            t,
            device: device.into(),
            user: "u1".into(),
            node: 0,
            cursor,
        }
    }

    fn acked(end: f64, seq: u64) -> Event {
        Event::Publish {
            t: end - 1.0,
            end,
            publisher: 0,
            node: 0,
            user: "u1".into(),
            id: format!("m{seq}"),
            attempt: 1,
            outcome: Outcome::Ok { seq },
        }
    }

    /// The first cluster: seqs 1..=6 acknowledged (1..=4 before the backup began at 100 ms);
    /// u1/d0 connected with cursor 2 before the backup and was delivered up to 5 by its end
    /// (200 ms).
    /// A first run's expectations, the streams restored from its backup by user, and each
    /// user's last restored seq.
    type Run = (
        Expected,
        HashMap<String, BTreeMap<u64, Row>>,
        HashMap<String, u64>,
    );

    fn first_run() -> Run {
        let mut events: Vec<Event> = (1..=6).map(|s| acked(s as f64 * 20.0, s)).collect();
        events.push(connect(50.0, "u1/d0", 2));
        events.extend((3..=5).map(|s| deliver(60.0 + s as f64 * 20.0, "u1/d0", s)));
        events.push(deliver(250.0, "u1/d0", 6));
        let x = expected(&events, 100.0, 200.0);
        let stream: BTreeMap<u64, Row> = (1..=5)
            .map(|s| {
                let id = format!("m{s}");
                (s, Row { id, body: None })
            })
            .collect();
        let restored = HashMap::from([("u1".to_string(), stream)]);
        let ends = HashMap::from([("u1".to_string(), 5)]);
        (x, restored, ends)
    }

    fn drained(reached: u64) -> Event {
        Event::Drained {
            t: 0.0,
            device: "u1/d0".into(),
            user: "u1".into(),
            upto: 5,
            reached,
        }
    }

    #[test]
    fn required_messages_and_cursor_bounds_come_from_before_and_during_the_backup() {
        let (x, _, _) = first_run();
        let required: Vec<u64> = x.required["u1"].keys().copied().collect();
        assert_eq!(required, [1, 2, 3, 4], "acknowledged before 100 ms");
        assert_eq!(x.streams["u1"].len(), 6);
        assert_eq!(
            x.cursors["u1/d0"],
            (2, 5),
            "confirmed 2, delivered 5 by 200 ms"
        );
    }

    #[test]
    fn a_device_resuming_after_its_cursor_in_order_passes() {
        let (x, restored, ends) = first_run();
        let mut c = RestoreCheck::default();
        let events = vec![
            connect(0.0, "u1/d0", 3),
            deliver(1.0, "u1/d0", 4),
            deliver(2.0, "u1/d0", 5),
            drained(5),
        ];
        check_devices(&mut c, &events, &x, &restored, &ends);
        assert_eq!((c.devices, c.cursors_bounded_below), (1, 1));
        assert_eq!(
            (c.cursors_out_of_range, c.resume_wrong),
            (0, 0),
            "{:?}",
            c.examples
        );
    }

    #[test]
    fn a_lost_cursor_a_skipped_seq_or_a_short_read_is_caught() {
        let (x, restored, ends) = first_run();
        // Cursor 1: below the 2 the server had confirmed before the backup.
        let mut c = RestoreCheck::default();
        let events = vec![
            connect(0.0, "u1/d0", 1),
            deliver(1.0, "u1/d0", 2),
            deliver(1.0, "u1/d0", 3),
            deliver(1.0, "u1/d0", 4),
            deliver(2.0, "u1/d0", 5),
            drained(5),
        ];
        check_devices(&mut c, &events, &x, &restored, &ends);
        assert_eq!((c.cursors_out_of_range, c.resume_wrong), (1, 0));
        // Resumes at 5 after a cursor of 3: seq 4 skipped.
        let mut c = RestoreCheck::default();
        let events = vec![
            connect(0.0, "u1/d0", 3),
            deliver(2.0, "u1/d0", 5),
            drained(5),
        ];
        check_devices(&mut c, &events, &x, &restored, &ends);
        assert_eq!((c.cursors_out_of_range, c.resume_wrong), (0, 1));
        // Stops before the end.
        let mut c = RestoreCheck::default();
        let events = vec![
            connect(0.0, "u1/d0", 3),
            deliver(1.0, "u1/d0", 4),
            drained(4),
        ];
        check_devices(&mut c, &events, &x, &restored, &ends);
        assert_eq!(c.resume_wrong, 1);
        // Cursor 6: beyond what it had been delivered when the backup ended.
        let mut c = RestoreCheck::default();
        let events = vec![connect(0.0, "u1/d0", 6), drained(6)];
        check_devices(&mut c, &events, &x, &restored, &ends);
        assert_eq!(c.cursors_out_of_range, 1);
    }
}
