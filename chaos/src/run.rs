//! One run of a scenario: start the cluster, run the workload and the nemesis, heal, read
//! every device's stream to its end, check the history and write the results.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::checker::{check, Check};
use crate::driver::{Cluster, ClusterOpts, Net};
use crate::history::{self, Event, Outcome, Recorder};
use crate::restore::{self, RestoreCheck};
use crate::scenario::{Action, Planned, Scenario, Target};
use crate::workload::{self, HOT_USER};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOpts {
    pub scenario: Scenario,
    pub seed: u64,
    pub warbler: PathBuf,
    pub out: PathBuf,
    pub net: Net,
    /// `WARBLER_CHAOS_BUG` for every node: a deliberately broken build.
    pub bug: Option<String>,
}

/// What `result.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub scenario: String,
    pub about: String,
    pub seed: u64,
    pub net: Net,
    pub nodes: usize,
    pub bug: Option<String>,
    pub duration_s: f64,
    pub plan: Vec<Planned>,
    /// Faults that could not be injected (no leader known, and so on).
    pub skipped: Vec<String>,
    pub check: Check,
    pub history: String,
    /// Scenarios with a backup: the restored cluster's check (its verdict is part of
    /// `check.valid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreCheck>,
}

/// Runs one scenario with one seed; writes `history.jsonl` and `result.json` to `out`.
pub async fn run(opts: RunOpts) -> anyhow::Result<RunResult> {
    let s = &opts.scenario;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let plan = s.plan(&mut rng);
    println!(
        "chaos: scenario {} seed {} ({} nodes, {:?} network, {} s{}); replay with --seed {}",
        s.name,
        opts.seed,
        s.cluster.nodes,
        opts.net,
        s.duration_s,
        opts.bug
            .as_deref()
            .map(|b| format!(", deliberate bug {b}"))
            .unwrap_or_default(),
        opts.seed
    );
    for p in &plan {
        println!(
            "  at {:6.1} s  {:?} {} for {} s",
            p.at_s, p.action, p.target, p.hold_s
        );
    }
    let mut env = vec![
        (
            "WARBLER_RAFT_HEARTBEAT_MS".to_string(),
            s.cluster.raft_heartbeat_ms.to_string(),
        ),
        (
            "WARBLER_RAFT_ELECTION_TIMEOUT_MS".to_string(),
            s.cluster.raft_election_timeout_ms.to_string(),
        ),
    ];
    if let Some(b) = &opts.bug {
        env.push(("WARBLER_CHAOS_BUG".into(), b.clone()));
    }
    env.extend(s.cluster.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    // A fresh cluster every run: data left from an earlier run with this seed would be
    // history the workload never recorded.
    for old in ["cluster", "backup", "restored"] {
        let dir = opts.out.join(old);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {} from an earlier run", dir.display()))?;
        }
    }
    let cluster_opts = ClusterOpts {
        nodes: s.cluster.nodes,
        spare: s.cluster.spare_nodes,
        warbler: opts.warbler.clone(),
        dir: opts.out.join("cluster"),
        net: opts.net,
        env,
        statefulset: s.cluster.statefulset,
        zones: s.cluster.zones.clone(),
    };
    let mut cluster = Cluster::start(cluster_opts.clone()).await?;
    let result = drive(&opts, &mut cluster, plan).await;
    cluster.shutdown().await;
    let (mut result, events) = result?;
    if result.plan.iter().any(|p| p.action == Action::Backup) {
        let r = restore_phase(&opts, cluster_opts, &events, &result.skipped).await;
        result.check.valid &= r.valid;
        result.restore = Some(r);
    }
    let path = opts.out.join("result.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&result)?)?;
    Ok(result)
}

/// After a run with a backup: a new, empty cluster of the same shape (its own volumes, key
/// and cluster id), the backup restored into it, and the restore check.
async fn restore_phase(
    opts: &RunOpts,
    mut cluster_opts: ClusterOpts,
    events: &[Event],
    skipped: &[String],
) -> RestoreCheck {
    let Some((t, end, said)) = events.iter().find_map(|e| match e {
        Event::Fault {
            t,
            end,
            action,
            detail,
            ..
        } if action == "backup" => Some((*t, *end, detail.clone())),
        _ => None,
    }) else {
        return RestoreCheck {
            examples: vec![format!("the backup did not run: {}", skipped.join("; "))],
            ..RestoreCheck::default()
        };
    };
    println!("  restoring the backup into a new cluster");
    cluster_opts.dir = opts.out.join("restored");
    let rec = Recorder::new();
    let checked = async {
        let mut fresh = Cluster::start(cluster_opts).await?;
        let r = restore::restore_and_check(
            &fresh,
            &opts.out.join("backup"),
            said,
            (t, end),
            events,
            &opts.scenario.workload,
            opts.seed,
            &rec,
        )
        .await;
        fresh.shutdown().await;
        r
    }
    .await;
    let path = opts.out.join("restored-history.jsonl");
    if let Err(e) = history::write(&path, &rec.snapshot()) {
        println!("  cannot write {}: {e}", path.display());
    }
    checked.unwrap_or_else(|e| RestoreCheck {
        examples: vec![format!("the restore could not be checked: {e:#}")],
        ..RestoreCheck::default()
    })
}

async fn drive(
    opts: &RunOpts,
    cluster: &mut Cluster,
    plan: Vec<Planned>,
) -> anyhow::Result<(RunResult, Vec<Event>)> {
    let s = &opts.scenario;
    let w = &s.workload;
    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = Arc::new(cluster.clients());
    let mut tasks = Vec::new();
    let publishers = (w.publishers_per_node * s.cluster.nodes) as u32;
    for k in 0..publishers {
        tasks.push(tokio::spawn(workload::publisher(
            (k, publishers),
            clients.clone(),
            w.clone(),
            opts.seed,
            rec.clone(),
            stop.clone(),
        )));
    }
    let devices: Vec<(String, String)> = (0..w.users)
        .flat_map(|u| (0..w.devices_per_user).map(move |d| (format!("u{u}"), format!("d{d}"))))
        .collect();
    for (n, (user, dev)) in devices.iter().enumerate() {
        tasks.push(tokio::spawn(workload::device(
            user.clone(),
            dev.clone(),
            clients.clone(),
            w.clone(),
            opts.seed.wrapping_add(1000 + n as u64),
            rec.clone(),
            stop.clone(),
        )));
    }

    // The nemesis: one fault at a time, in plan order.
    let mut skipped = Vec::new();
    let mut backup = None;
    for p in &plan {
        let wait = p.at_s * 1e3 - rec.now();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait / 1e3)).await;
        }
        if p.action == Action::Backup {
            backup = Some((p.at_s, background_backup(cluster, rec.clone())));
            continue;
        }
        if let Err(e) = inject(cluster, p, &rec).await {
            skipped.push(format!(
                "{:?} {} at {:.1} s: {e}",
                p.action, p.target, p.at_s
            ));
            println!("  skipped: {}", skipped.last().unwrap());
        }
    }
    let left = s.duration_s * 1e3 - rec.now();
    if left > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(left / 1e3)).await;
    }
    if let Some((at, task)) = backup {
        let failed = match task.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = failed {
            skipped.push(format!("Backup at {at:.1} s: {e}"));
            println!("  skipped: {}", skipped.last().unwrap());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }

    // Heal, then read every stream to its end.
    cluster
        .heal_all(Duration::from_secs(90))
        .await
        .context("the cluster did not come back after the faults were healed")?;
    let upto = stream_ends(&rec.snapshot());
    let mut drains = Vec::new();
    for (user, dev) in devices {
        let end = upto.get(&user).copied().unwrap_or(0);
        drains.push(tokio::spawn(workload::drain(
            user,
            dev,
            clients.clone(),
            end,
            Duration::from_secs(60),
            rec.clone(),
        )));
    }
    for d in drains {
        let _ = d.await;
    }
    let events = rec.snapshot();
    let history = opts.out.join("history.jsonl");
    history::write(&history, &events)?;
    let result = RunResult {
        scenario: s.name.clone(),
        about: s.about.clone(),
        seed: opts.seed,
        net: opts.net,
        nodes: cluster.len(),
        bug: opts.bug.clone(),
        duration_s: s.duration_s,
        plan,
        skipped,
        check: check(&events),
        history: history.display().to_string(),
        restore: None,
    };
    Ok((result, events))
}

/// `warbler backup --out RUN/backup` against node 0, as an operator runs it, beside the load
/// and the other faults; its fault event is recorded when it ends, with what it printed.
fn background_backup(
    cluster: &Cluster,
    rec: Recorder,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let out = cluster.dir().with_file_name("backup").display().to_string();
    let cmd = restore::operator_command(cluster, &["backup", "--out", &out]);
    let t = rec.now();
    tokio::spawn(async move {
        let said = restore::run_operator(cmd, "backup").await;
        let end = rec.now();
        rec.record(Event::Fault {
            t,
            end,
            action: "backup".into(),
            targets: Vec::new(),
            detail: said?.replace(&format!(" to {out}"), ""),
        });
        Ok(())
    })
}

/// Per user, the highest seq acknowledged or delivered: where the final read must reach.
fn stream_ends(events: &[Event]) -> HashMap<String, u64> {
    let mut out: HashMap<String, u64> = HashMap::new();
    for e in events {
        let (user, seq) = match e {
            Event::Publish {
                user,
                outcome: Outcome::Ok { seq },
                ..
            } => (user, *seq),
            Event::Deliver { user, seq, .. } => (user, *seq),
            _ => continue,
        };
        let v = out.entry(user.clone()).or_default();
        *v = (*v).max(seq);
    }
    out
}

/// `warbler cluster scale --to <to>` as an operator runs it, with `--run` writing the size
/// it asks for to a file, as `kubectl scale statefulset` sets `replicas`; meanwhile this
/// harness plays the StatefulSet controller and makes the set that size. Returns the
/// ordinals started and stopped.
async fn scale(cluster: &mut Cluster, to: usize) -> anyhow::Result<Vec<usize>> {
    let replicas = cluster.dir().join("replicas");
    let _ = std::fs::remove_file(&replicas);
    let mut child = tokio::process::Command::new(cluster.warbler_bin())
        .args([
            "cluster",
            "scale",
            "--to",
            &to.to_string(),
            "--stall-secs",
            "150",
        ])
        .args(["--http", &cluster.http_addr(0).to_string()])
        .arg("--jwt-secret-file")
        .arg(cluster.secret())
        .arg("--run")
        .arg(format!("echo {{n}} > {}", replicas.display()))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run warbler cluster scale")?;
    let mut touched = Vec::new();
    let mut asked = None;
    loop {
        let exited = tokio::select! {
            s = child.wait() => Some(s?),
            _ = tokio::time::sleep(Duration::from_millis(200)) => None,
        };
        let wanted = std::fs::read_to_string(&replicas)
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok());
        if wanted.is_some() && wanted != asked {
            asked = wanted;
            let (started, stopped) = cluster.set_replicas(wanted.unwrap_or(to)).await?;
            touched.extend(started.into_iter().chain(stopped));
        }
        if let Some(status) = exited {
            anyhow::ensure!(
                status.success(),
                "warbler cluster scale --to {to} failed ({status})"
            );
            return Ok(touched);
        }
    }
}

/// The nodes a fault hits.
async fn targets(cluster: &mut Cluster, p: &Planned) -> anyhow::Result<Vec<usize>> {
    let members = cluster.active();
    let n = members.len();
    let mut rng = StdRng::seed_from_u64(p.pick);
    Ok(match &p.target {
        Target::Random => vec![members[rng.gen_range(0..n)]],
        Target::HotLeader => {
            let mut found = None;
            for _ in 0..50 {
                found = cluster.leader_of(HOT_USER).await;
                if found.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            vec![found.ok_or_else(|| {
                anyhow::anyhow!("no node knows a leader for {HOT_USER}'s partition")
            })?]
        }
        Target::Minority => {
            let mut all = members;
            all.shuffle(&mut rng);
            all.truncate(((n - 1) / 2).max(1));
            all.sort();
            all
        }
        Target::All | Target::Each => members,
        Target::Node(i) => vec![*i],
        Target::Zone(z) => members
            .into_iter()
            .filter(|&i| cluster.zone_of(i) == Some(z.as_str()))
            .collect(),
    })
}

async fn inject(cluster: &mut Cluster, p: &Planned, rec: &Recorder) -> anyhow::Result<()> {
    let mut ts = targets(cluster, p).await?;
    if matches!(p.action, Action::Add | Action::Scale | Action::ScaleRaw) {
        ts = Vec::new(); // known once the nodes are picked
    }
    let hold = Duration::from_secs_f64(p.hold_s);
    let ready_within = Duration::from_secs(60);
    let t = rec.now();
    match p.action {
        Action::Kill => {
            for &i in &ts {
                cluster.kill(i).await;
            }
            tokio::time::sleep(hold).await;
            for &i in &ts {
                cluster.restart(i)?;
            }
        }
        Action::Pause => {
            for &i in &ts {
                cluster.pause(i);
            }
            tokio::time::sleep(hold).await;
            for &i in &ts {
                cluster.resume(i);
            }
        }
        Action::Isolate | Action::Partition => {
            let rest: Vec<usize> = cluster
                .active()
                .into_iter()
                .filter(|i| !ts.contains(i))
                .collect();
            if p.action == Action::Isolate {
                for &i in &ts {
                    let others: Vec<usize> =
                        cluster.active().into_iter().filter(|&j| j != i).collect();
                    cluster.cut(&[i], &others).await?;
                }
            } else {
                cluster.cut(&ts, &rest).await?;
            }
            tokio::time::sleep(hold).await;
            cluster.heal().await?;
        }
        Action::Restart => {
            for &i in &ts {
                cluster.stop(i).await;
                cluster.restart(i)?;
                cluster.wait_ready(i, ready_within).await?;
                tokio::time::sleep(hold).await;
            }
        }
        Action::Add => {
            ts.push(cluster.add(Duration::from_secs(180)).await?);
            tokio::time::sleep(hold).await;
        }
        Action::Decommission => {
            for &i in &ts {
                cluster.decommission(i, Duration::from_secs(180)).await?;
            }
            tokio::time::sleep(hold).await;
        }
        Action::Scale => {
            ts = scale(cluster, p.to.unwrap_or(1)).await?;
            tokio::time::sleep(hold).await;
        }
        Action::ScaleRaw => {
            let (started, stopped) = cluster.set_replicas(p.to.unwrap_or(1)).await?;
            ts = started.into_iter().chain(stopped).collect();
            tokio::time::sleep(hold).await;
        }
        Action::Backup => anyhow::bail!("a backup runs beside the other faults (drive)"),
    }
    let end = rec.now();
    let names: Vec<&str> = ts.iter().map(|&i| cluster.name(i)).collect();
    let detail = match p.to {
        Some(to) => format!("{:?} to {to} ({})", p.action, names.join(",")),
        None => format!("{:?} {} ({})", p.action, p.target, names.join(",")),
    };
    rec.record(Event::Fault {
        t,
        end,
        action: format!("{:?}", p.action).to_lowercase(),
        targets: ts.clone(),
        detail,
    });
    // The next fault starts on a whole cluster.
    let members = cluster.active();
    for i in ts.into_iter().filter(|i| members.contains(i)) {
        cluster.wait_ready(i, ready_within).await?;
    }
    Ok(())
}
