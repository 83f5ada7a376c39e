//! Scenarios are data: a TOML file naming the cluster, the workload and a schedule of
//! faults. `chaos/scenarios/` holds the shipped ones; `docs/chaos.md` documents the format.
//!
//! ```toml
//! name = "kill-random"
//! about = "kill -9 a random node every 10 s, restart it 3 s later"
//! duration_s = 60
//! [cluster]
//! nodes = 3
//! [workload]
//! users = 24
//! [[fault]]
//! action = "kill"      # kill | pause | isolate | partition | restart | … | backup
//! target = "random"    # random | hot-leader | minority | all | each | node:N
//! start_s = 5
//! every_s = 10
//! hold_s = 3
//! ```

use std::path::Path;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// A whole scenario file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub about: String,
    /// Seconds of load with faults; the final read and the check come after.
    pub duration_s: f64,
    #[serde(default)]
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSpec {
    pub nodes: usize,
    /// Node slots beyond `nodes`, started by `add` faults (scaling out).
    pub spare_nodes: usize,
    pub raft_heartbeat_ms: u64,
    pub raft_election_timeout_ms: u64,
    /// Behave as a Kubernetes StatefulSet: nodes are `warbler-0..N-1`, each ordinal keeps
    /// its data directory for good (its volume claim), `add` starts the lowest stopped
    /// ordinal on the data it left with, and `scale` faults run `warbler cluster scale`
    /// whose command sets the set's size, as `kubectl scale` would.
    pub statefulset: bool,
    /// Zones by ordinal (ordinal i is in `zones[i % len]`); none when empty.
    pub zones: Vec<String>,
    /// Extra `WARBLER_*` settings for every node.
    pub env: std::collections::BTreeMap<String, String>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 3,
            spare_nodes: 0,
            raft_heartbeat_ms: 100,
            raft_election_timeout_ms: 500,
            statefulset: false,
            zones: Vec::new(),
            env: Default::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    pub users: usize,
    pub devices_per_user: usize,
    /// Publishers per node (each starts on its node and moves on when it fails).
    pub publishers_per_node: usize,
    /// Share of publishes that go to the hot user `u0`.
    pub hot_share: f64,
    /// Each publisher's pause between publishes (ms); 0 publishes back to back.
    pub think_ms: u64,
    /// Mean seconds a device stays connected before it disconnects on purpose.
    pub reconnect_mean_s: f64,
    /// A publish not answered in this long has an unknown outcome and is retried.
    pub publish_timeout_ms: u64,
    pub body_bytes: usize,
    /// Publishes offered per second by all publishers together, whatever the cluster
    /// answers (open loop: each publisher keeps up to `window` unanswered and resends
    /// refused ones go-back-N, docs/protocol.md "Order"). 0: closed loop, one publish at a
    /// time per publisher with `think_ms` between them.
    pub offered_per_s: f64,
    /// Open loop: unanswered publishes one publisher keeps at most; while it is full, the
    /// publishes the rate would offer are not made (not carried over).
    pub window: usize,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            users: 24,
            devices_per_user: 2,
            publishers_per_node: 2,
            hot_share: 0.3,
            think_ms: 5,
            reconnect_mean_s: 8.0,
            publish_timeout_ms: 3000,
            body_bytes: 64,
            offered_per_s: 0.0,
            window: 256,
        }
    }
}

/// What a fault does to its targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// `kill -9`; restarted on its data after `hold_s`.
    Kill,
    /// SIGSTOP; SIGCONT after `hold_s`.
    Pause,
    /// Cut the targets off from every other node (both ways) for `hold_s`.
    Isolate,
    /// Split the cluster in two: the targets on one side, the rest on the other.
    Partition,
    /// Graceful restart (SIGTERM, wait for exit, start again), one target after another,
    /// each waiting until the restarted node is ready.
    Restart,
    /// Scale out: start a spare node on an empty data directory; it joins the running
    /// cluster and partitions move to it (the target is ignored).
    Add,
    /// Scale in: remove the targets from the cluster, wait until their partitions moved
    /// away, and stop them.
    Decommission,
    /// StatefulSet: `warbler cluster scale --to <to>`, its command resizing the set (the
    /// target is ignored).
    Scale,
    /// StatefulSet: resize the set to `to` directly, as a plain `kubectl scale` does: the
    /// highest ordinals get SIGTERM with no decommission first.
    ScaleRaw,
    /// `warbler backup` of the whole cluster while the load runs, beside the faults planned
    /// after it (the target and `hold_s` are ignored). After the run the backup is restored into a new, empty cluster and checked there:
    /// everything acknowledged before the backup began is in it at its seq with its id,
    /// retried publishes answer their original seq, and devices resume from their cursors.
    /// Once per scenario.
    Backup,
}

/// Which nodes a fault hits.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Target {
    #[default]
    Random,
    /// The leader of the hot user's partition at the moment of the fault.
    HotLeader,
    /// A random minority: (nodes - 1) / 2 nodes.
    Minority,
    All,
    /// Every node in turn (for rolling restarts).
    Each,
    Node(usize),
    /// Every member in this zone (`cluster.zones`).
    Zone(String),
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Target::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, ScenarioError> {
        Ok(match s {
            "random" => Target::Random,
            "hot-leader" => Target::HotLeader,
            "minority" => Target::Minority,
            "all" => Target::All,
            "each" => Target::Each,
            other if other.starts_with("zone:") => Target::Zone(other[5..].to_string()),
            other => match other.strip_prefix("node:").map(str::parse) {
                Some(Ok(n)) => Target::Node(n),
                _ => {
                    return Err(ScenarioError::from(format!(
                        "target {other:?}: use random, hot-leader, minority, all, each, node:N or zone:Z"
                    )))
                }
            },
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Random => f.write_str("random"),
            Target::HotLeader => f.write_str("hot-leader"),
            Target::Minority => f.write_str("minority"),
            Target::All => f.write_str("all"),
            Target::Each => f.write_str("each"),
            Target::Node(n) => write!(f, "node:{n}"),
            Target::Zone(z) => write!(f, "zone:{z}"),
        }
    }
}

/// One line of the fault schedule.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub action: Action,
    #[serde(default)]
    pub target: Target,
    /// First occurrence, seconds into the run.
    pub start_s: f64,
    /// Repeat every this many seconds (until the run's end); once when absent.
    #[serde(default)]
    pub every_s: Option<f64>,
    /// How long the fault lasts before it is healed.
    #[serde(default = "default_hold")]
    pub hold_s: f64,
    /// Each occurrence starts up to this many seconds late, drawn from the seed.
    #[serde(default)]
    pub jitter_s: f64,
    /// `scale` and `scale-raw`: the set's new size.
    #[serde(default)]
    pub to: Option<usize>,
}

fn default_hold() -> f64 {
    3.0
}

/// One planned fault.
#[derive(Clone, Debug, Serialize)]
pub struct Planned {
    pub at_s: f64,
    pub action: Action,
    pub target: Target,
    pub hold_s: f64,
    /// The seeded draw that picks random targets.
    pub pick: u64,
    /// `scale` and `scale-raw`: the set's new size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<usize>,
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read scenario {}: {e}", path.display()))?;
        let s: Scenario = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "scenario {} is not valid: {e}; see docs/chaos.md for the format",
                path.display()
            )
        })?;
        s.validate()
            .map_err(|e| anyhow::anyhow!("scenario {}: {e}", path.display()))?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.duration_s <= 0.0 {
            return Err(ScenarioError::from("duration_s must be positive"));
        }
        if !(1..=9).contains(&self.cluster.nodes) {
            return Err(ScenarioError::from(format!(
                "cluster.nodes = {}: choose 1 to 9",
                self.cluster.nodes
            )));
        }
        if self.cluster.nodes + self.cluster.spare_nodes > 9 {
            return Err(ScenarioError::from(
                "cluster.nodes + cluster.spare_nodes: at most 9 node slots",
            ));
        }
        let w = &self.workload;
        if w.users == 0 || w.devices_per_user == 0 || w.publishers_per_node == 0 {
            return Err(ScenarioError::from(
                "workload.users, devices_per_user and publishers_per_node must be at least 1",
            ));
        }
        if !(w.offered_per_s >= 0.0 && w.offered_per_s.is_finite()) || w.window == 0 {
            return Err(ScenarioError::from(format!(
                "workload.offered_per_s = {} and window = {}: a rate of 0 (closed loop) or more, and a window of at least 1",
                w.offered_per_s, w.window
            )));
        }
        if !(0.0..=1.0).contains(&w.hot_share) {
            return Err(ScenarioError::from(format!(
                "workload.hot_share = {}: a share between 0 and 1",
                w.hot_share
            )));
        }
        for f in &self.faults {
            if let Target::Node(n) = f.target {
                if n >= self.cluster.nodes {
                    return Err(ScenarioError::from(format!(
                        "fault target node:{n}: the cluster has nodes 0 to {}",
                        self.cluster.nodes - 1
                    )));
                }
            }
            if f.every_s.is_some_and(|e| e <= 0.0) || f.hold_s < 0.0 || f.start_s < 0.0 {
                return Err(ScenarioError::from(
                    "fault start_s, every_s and hold_s must not be negative (every_s positive)",
                ));
            }
            if f.action == Action::Add && self.cluster.spare_nodes == 0 {
                return Err(ScenarioError::from(
                    "an add fault needs a node slot to start: set cluster.spare_nodes",
                ));
            }
            if f.action == Action::Decommission && matches!(f.target, Target::All | Target::Each) {
                return Err(ScenarioError::from("decommission a proper subset of the nodes (random, hot-leader, minority or node:N)"));
            }
            if matches!(f.action, Action::Scale | Action::ScaleRaw) {
                if !self.cluster.statefulset {
                    return Err(ScenarioError::from(
                        "scale and scale-raw faults need cluster.statefulset = true",
                    ));
                }
                match f.to {
                    Some(n) if (1..=self.cluster.nodes + self.cluster.spare_nodes).contains(&n) => {
                    }
                    _ => {
                        return Err(ScenarioError::from(format!(
                        "a {:?} fault needs `to` between 1 and cluster.nodes + cluster.spare_nodes",
                        f.action
                    )))
                    }
                }
            }
            if f.action == Action::Backup && f.every_s.is_some() {
                return Err(ScenarioError::from(
                    "a backup fault runs once: remove its every_s",
                ));
            }
            if let Target::Zone(z) = &f.target {
                if !self.cluster.zones.contains(z) {
                    return Err(ScenarioError::from(format!(
                        "fault target zone:{z}: cluster.zones is {:?}",
                        self.cluster.zones
                    )));
                }
            }
            if f.action == Action::Partition && matches!(f.target, Target::All | Target::Each) {
                return Err(ScenarioError::from(
                    "a partition needs a proper subset of the nodes as its target",
                ));
            }
        }
        if self
            .faults
            .iter()
            .filter(|f| f.action == Action::Backup)
            .count()
            > 1
        {
            return Err(ScenarioError::from(
                "one backup fault per scenario: the run restores and checks one backup",
            ));
        }
        Ok(())
    }

    /// The concrete schedule for one seed, sorted by time. Faults whose heal would fall
    /// after the run's end are left out.
    pub fn plan(&self, rng: &mut impl Rng) -> Vec<Planned> {
        let mut out = Vec::new();
        for f in &self.faults {
            let mut at = f.start_s;
            loop {
                let start = at + rng.gen_range(0.0..=f.jitter_s.max(0.0));
                if start + f.hold_s > self.duration_s {
                    break;
                }
                out.push(Planned {
                    at_s: start,
                    action: f.action,
                    target: f.target.clone(),
                    hold_s: f.hold_s,
                    pick: rng.gen(),
                    to: f.to,
                });
                match f.every_s {
                    Some(e) => at += e,
                    None => break,
                }
            }
        }
        out.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        out
    }
}

/// Why a scenario cannot run; the text names the field and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScenarioError(pub String);

impl From<String> for ScenarioError {
    fn from(s: String) -> ScenarioError {
        ScenarioError(s)
    }
}

impl From<&str> for ScenarioError {
    fn from(s: &str) -> ScenarioError {
        ScenarioError(s.to_string())
    }
}
