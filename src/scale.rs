//! `warbler cluster scale --to N`: the next step towards N members, decided from one
//! `GET /v1/cluster` (no I/O here), and the loop that carries the steps out.
//!
//! Scaling in is decommission-first, one node at a time from the highest ordinal (the pod a
//! StatefulSet removes first): decommission it, wait until it holds no replica and the
//! cluster is healthy, then run the operator's command with `{n}` = the new size. Scaling
//! out runs the command once with the target and waits for the new members. Every step is
//! decided again from the cluster's state, so the command can be run again after an
//! interruption and carries on where it stopped.

use std::time::{Duration, Instant};

use crate::cli::Ops;
use anyhow::{bail, Context};
use warbler_client::api::{ClusterStatus, Decommissioned};

/// What to do next to reach `target` members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing: the cluster has `target` members, all healthy.
    Done,
    /// Decommission this member (the highest ordinal).
    Decommission(String),
    /// Wait for this decommissioned node to hand its replicas over.
    Drain(String),
    /// Run the operator's command with `{n}` = this size (a decommissioned node may go).
    Resize(usize),
    /// Wait for the cluster to settle: why.
    Wait(String),
}

/// Why a target cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    #[error("cannot scale to {target}: the replication factor is {rf}, and every partition needs that many nodes")]
    BelowReplicationFactor { target: usize, rf: usize },
    #[error("member {0:?} has no ordinal (a name ending in a number, as a StatefulSet's pods have): cannot tell which node goes first")]
    NoOrdinal(String),
}

/// The number a StatefulSet pod's name ends in (`warbler-3` → 3).
pub fn ordinal(name: &str) -> Option<usize> {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    name[name.len() - digits..].parse().ok()
}

/// The next step from `status` (any member's view) towards `target` members.
/// `drained(name)` says whether that node reports holding no replica.
pub fn next_step(
    status: &ClusterStatus,
    target: usize,
    drained: &dyn Fn(&str) -> bool,
) -> Result<Step, ScaleError> {
    let rf = status.replication_factor.unwrap_or(1);
    if target < rf {
        return Err(ScaleError::BelowReplicationFactor { target, rf });
    }
    let mut members: Vec<(usize, &str)> = Vec::new();
    for m in status.members.iter().filter(|m| m.member) {
        let o = ordinal(&m.node).ok_or_else(|| ScaleError::NoOrdinal(m.node.clone()))?;
        members.push((o, &m.node));
    }
    members.sort();
    // A node decommissioned by an earlier run (or step) that is still up: its replicas go
    // first, then the operator's command removes it.
    let leaving: Vec<&str> = status
        .members
        .iter()
        .filter(|m| !m.member && m.alive && ordinal(&m.node).is_some_and(|o| o >= target))
        .map(|m| m.node.as_str())
        .collect();
    if let Some(node) = leaving.first() {
        if !drained(node) {
            return Ok(Step::Drain(node.to_string()));
        }
        if let Some(why) = unsettled(status, rf) {
            return Ok(Step::Wait(why));
        }
        return Ok(Step::Resize(members.len()));
    }
    if let Some(why) = unsettled(status, rf) {
        return Ok(Step::Wait(why));
    }
    match members.len() {
        n if n > target => Ok(Step::Decommission(members[n - 1].1.to_string())),
        n if n < target => Ok(Step::Resize(target)),
        _ => Ok(Step::Done),
    }
}

/// One node's view of the partitions, completed by the others': a node knows the leader
/// and voters only of the partitions it holds a replica of, so each partition is taken from
/// a member that holds one (its `term` is known).
pub fn merge<'a>(
    mut status: ClusterStatus,
    views: impl Iterator<Item = &'a ClusterStatus>,
) -> ClusterStatus {
    for v in views {
        for p in &v.partitions {
            let Some(mine) = status.partitions.get_mut(p.partition as usize) else {
                continue;
            };
            let better = p.term.is_some() && (mine.term.is_none() || mine.leader.is_none());
            if better && (p.leader.is_some() || mine.term.is_none()) {
                *mine = p.clone();
            }
        }
    }
    status
}

/// Why the cluster is not settled (a member down, a partition without a leader or with
/// another number of replicas than the factor), or `None`.
fn unsettled(status: &ClusterStatus, rf: usize) -> Option<String> {
    if let Some(m) = status.members.iter().find(|m| m.member && !m.alive) {
        return Some(format!("member {} is down", m.node));
    }
    if let Some(p) = status.partitions.iter().find(|p| p.leader.is_none()) {
        return Some(format!("partition {} has no leader", p.partition));
    }
    if let Some(p) = status.partitions.iter().find(|p| p.replicas.len() != rf) {
        return Some(format!(
            "partition {} has {} replicas ({}), not {rf}: replicas are moving",
            p.partition,
            p.replicas.len(),
            p.replicas.join(",")
        ));
    }
    None
}

/// How `scale` reaches the cluster and what it runs.
pub struct Scaler {
    pub ops: Ops,
    /// The operator's command; `{n}` is replaced by the new number of nodes.
    pub run: String,
    /// A step that makes no progress for this long fails, saying what blocks it.
    pub stall: Duration,
}

impl Scaler {
    /// Steps towards `target` until done.
    pub async fn scale_to(&self, target: usize) -> anyhow::Result<()> {
        let mut waiting: Option<(String, Instant)> = None;
        // The size the operator's command was last run with: the same step again waits
        // for it to take effect instead of running it twice.
        let mut ran: Option<usize> = None;
        loop {
            let status = self.ops.node.cluster_status().await?;
            let views = self.member_views(&status).await;
            let held: std::collections::HashMap<String, Option<usize>> = views
                .iter()
                .map(|(n, v)| (n.clone(), v.as_ref().and_then(|v| v.replicas_held)))
                .collect();
            let status = merge(status, views.values().flatten());
            let step = next_step(&status, target, &|n| held.get(n) == Some(&Some(0)))?;
            // A step repeated without change is a wait; it must end within `stall`.
            let key = format!("{step:?}");
            match &waiting {
                Some((k, since)) if *k == key && since.elapsed() > self.stall => {
                    bail!("no progress for {} s: {}; fix that and run the same command again (it carries on)", self.stall.as_secs(), describe(&step, &held))
                }
                Some((k, _)) if *k == key => {}
                _ if step == Step::Done => {}
                _ => {
                    println!("{}", describe(&step, &held));
                    waiting = Some((key, Instant::now()));
                }
            }
            match step {
                Step::Done => {
                    println!("the cluster has {target} members, every partition led and fully replicated");
                    return Ok(());
                }
                Step::Decommission(node) => {
                    let body = serde_json::json!({ "node": node });
                    let _: Decommissioned = self
                        .ops
                        .node
                        .post("/v1/cluster/decommission", &self.ops.token, &body)
                        .await
                        .with_context(|| format!("decommissioning {node} failed"))?;
                }
                Step::Resize(n) if ran != Some(n) => {
                    self.run_command(n)?;
                    ran = Some(n);
                    waiting = None;
                }
                Step::Resize(_) | Step::Drain(_) | Step::Wait(_) => {}
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Each live member's own `GET /v1/cluster`, by name (`None`: it did not answer).
    async fn member_views(
        &self,
        status: &ClusterStatus,
    ) -> std::collections::HashMap<String, Option<ClusterStatus>> {
        let mut views = std::collections::HashMap::new();
        for m in status.members.iter().filter(|m| m.alive) {
            let Some(addr) = &m.http_addr else { continue };
            let Ok(node) = self.ops.client(addr) else {
                continue;
            };
            let answer = tokio::time::timeout(Duration::from_secs(5), node.cluster_status()).await;
            views.insert(m.node.clone(), answer.ok().and_then(|a| a.ok()));
        }
        views
    }

    fn run_command(&self, n: usize) -> anyhow::Result<()> {
        let command = self.run.replace("{n}", &n.to_string());
        println!("running: {command}");
        let status = std::process::Command::new("sh")
            .args(["-c", &command])
            .status()
            .with_context(|| format!("cannot run {command:?}"))?;
        if !status.success() {
            bail!("{command:?} failed ({status}); fix it and run the same scale command again");
        }
        Ok(())
    }
}

fn describe(step: &Step, held: &std::collections::HashMap<String, Option<usize>>) -> String {
    match step {
        Step::Done => "nothing left to do".into(),
        Step::Decommission(n) => format!("decommissioning {n} (the highest ordinal)"),
        Step::Drain(n) => match held.get(n).copied().flatten() {
            Some(k) => format!("waiting for {n} to hand over its replicas ({k} left)"),
            None => format!("waiting for {n} to hand over its replicas (it does not answer)"),
        },
        Step::Resize(n) => format!("resizing to {n} nodes"),
        Step::Wait(why) => format!("waiting for the cluster to settle: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warbler_client::api::{MemberState, MemberStatus, PartitionStatus};

    fn status(members: &[(&str, bool, bool)], parts: &[(&[&str], Option<&str>)]) -> ClusterStatus {
        let members = members
            .iter()
            .map(|(n, member, alive)| MemberStatus {
                node: n.to_string(),
                alive: *alive,
                member: *member,
                state: MemberState::Serving,
                client_addr: None,
                http_addr: None,
                cluster_addr: None,
                zone: None,
            })
            .collect();
        let partitions = parts
            .iter()
            .enumerate()
            .map(|(i, (r, l))| PartitionStatus {
                partition: i as u16,
                replicas: r.iter().map(|s| s.to_string()).collect(),
                placement: Vec::new(),
                leader: l.map(str::to_string),
                term: None,
                applied: None,
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "node": "w-0", "members": [], "partition_count": 1, "partitions": [],
            "replication_factor": 3,
        }))
        .map(|mut s: ClusterStatus| {
            s.members = members;
            s.partitions = partitions;
            s
        })
        .unwrap()
    }

    const FOUR: &[(&str, bool, bool)] = &[
        ("w-0", true, true),
        ("w-1", true, true),
        ("w-2", true, true),
        ("w-10", true, true),
    ];
    const SETTLED: &[(&[&str], Option<&str>)] = &[(&["w-0", "w-1", "w-2"], Some("w-0"))];

    /// Regression: a node that holds no replica of a partition knows no leader of it; the
    /// scale command waited for a leader it would never see from one node's view.
    #[test]
    fn partitions_are_taken_from_a_member_that_holds_them() {
        let from_n0 = status(FOUR, &[(&["w-1", "w-2", "w-10"], None)]);
        let mut from_w1 = status(FOUR, &[(&["w-1", "w-2", "w-10"], Some("w-2"))]);
        from_w1.partitions[0].term = Some(4);
        assert!(matches!(
            next_step(&from_n0, 3, &|_| false),
            Ok(Step::Wait(_))
        ));
        let merged = merge(from_n0, [&from_w1].into_iter());
        assert_eq!(merged.partitions[0].leader.as_deref(), Some("w-2"));
        assert_eq!(
            next_step(&merged, 3, &|_| false),
            Ok(Step::Decommission("w-10".into()))
        );
    }

    #[test]
    fn ordinals_come_from_the_trailing_number() {
        assert_eq!(ordinal("warbler-12"), Some(12));
        assert_eq!(ordinal("n3"), Some(3));
        assert_eq!(ordinal("alpha"), None);
    }

    #[test]
    fn scaling_in_decommissions_the_highest_ordinal_first() {
        // w-10 is above w-2 numerically, not by name.
        let s = status(FOUR, SETTLED);
        assert_eq!(
            next_step(&s, 3, &|_| false),
            Ok(Step::Decommission("w-10".into()))
        );
    }

    #[test]
    fn a_decommissioned_node_is_drained_then_resized_away() {
        let mut m = FOUR.to_vec();
        m[3].1 = false; // decommissioned, still up
        let s = status(&m, SETTLED);
        assert_eq!(next_step(&s, 3, &|_| false), Ok(Step::Drain("w-10".into())));
        assert_eq!(next_step(&s, 3, &|n| n == "w-10"), Ok(Step::Resize(3)));
        // Replicas still moving: wait before the pod goes.
        let moving = status(&m, &[(&["w-0", "w-1", "w-2", "w-10"], Some("w-0"))]);
        assert!(matches!(
            next_step(&moving, 3, &|n| n == "w-10"),
            Ok(Step::Wait(_))
        ));
    }

    #[test]
    fn nothing_is_decommissioned_while_the_cluster_is_unsettled() {
        let mut m = FOUR.to_vec();
        m[1].2 = false;
        let s = status(&m, SETTLED);
        assert_eq!(
            next_step(&s, 3, &|_| false),
            Ok(Step::Wait("member w-1 is down".into()))
        );
        let leaderless = status(FOUR, &[(&["w-0", "w-1", "w-2"], None)]);
        assert!(matches!(
            next_step(&leaderless, 3, &|_| false),
            Ok(Step::Wait(_))
        ));
    }

    #[test]
    fn targets_below_the_replication_factor_are_refused_and_growth_resizes_once() {
        let s = status(&FOUR[..3], SETTLED);
        assert_eq!(
            next_step(&s, 2, &|_| false),
            Err(ScaleError::BelowReplicationFactor { target: 2, rf: 3 })
        );
        assert_eq!(next_step(&s, 5, &|_| false), Ok(Step::Resize(5)));
        assert_eq!(next_step(&s, 3, &|_| false), Ok(Step::Done));
        let unnamed = status(&[("alpha", true, true)], SETTLED);
        assert!(matches!(
            next_step(&unnamed, 3, &|_| false),
            Err(ScaleError::NoOrdinal(_))
        ));
    }
}
