//! The HTTP API's JSON bodies that operators' tools read: `/v1/cluster`, decommission, the
//! error body. The server writes them with these types and the CLI, the chaos harness and
//! the tests read them with the same types, so a renamed field breaks the build, not a
//! script.

use serde::{Deserialize, Serialize};

/// `GET /v1/cluster`: what one node sees of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    pub members: Vec<MemberStatus>,
    /// The member list's epoch (absent on a single node and before the cluster forms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_list_epoch: Option<u64>,
    /// The node that leads the member list and coordinates partition moves, as the
    /// answering node knows it (absent on a single node, before the cluster forms, and on
    /// a decommissioned node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_list_leader: Option<String>,
    /// The answering node was decommissioned.
    #[serde(default)]
    pub decommissioned: bool,
    /// Replicas the answering node holds that have been added to their groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_held: Option<usize>,
    pub replication_factor: Option<usize>,
    pub partition_count: u16,
    /// Empty until the cluster forms.
    pub partitions: Vec<PartitionStatus>,
    /// Testing only: the cluster addresses this node behaves as if it cannot reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults_blocked: Vec<String>,
    /// User mailboxes running on the answering node.
    #[serde(default)]
    pub mailboxes_active: usize,
    /// With `?user=`: where that user lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserPlacement>,
    /// The cluster's id, once the answering node knows it (absent on a single node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

/// One node in [`ClusterStatus::members`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub node: String,
    /// Gossip reaches it (the answering node is always alive).
    pub alive: bool,
    /// It is in the member list (a joining node, or a decommissioned one still running, is
    /// not).
    #[serde(default = "yes")]
    pub member: bool,
    pub state: MemberState,
    pub client_addr: Option<String>,
    pub http_addr: Option<String>,
    pub cluster_addr: Option<String>,
    /// Its failure zone, as the member list records it (or its gossip says, for a node
    /// outside the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

fn yes() -> bool {
    true
}

/// A member's state as the answering node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    #[serde(rename = "joining")]
    Joining,
    #[serde(rename = "serving")]
    Serving,
    #[serde(rename = "draining")]
    Draining,
    #[serde(rename = "down")]
    Down,
    #[serde(rename = "not a member")]
    NotAMember,
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberState::Joining => "joining",
            MemberState::Serving => "serving",
            MemberState::Draining => "draining",
            MemberState::Down => "down",
            MemberState::NotAMember => "not a member",
        })
    }
}

/// One partition in [`ClusterStatus::partitions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub partition: u16,
    /// Its group's voters as the answering node's replica knows them (sorted), else its
    /// placement.
    pub replicas: Vec<String>,
    /// Where the ring places it (a partition being moved differs from `replicas`).
    #[serde(default)]
    pub placement: Vec<String>,
    pub leader: Option<String>,
    /// Known where the answering node holds a replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
}

/// [`ClusterStatus::user`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPlacement {
    pub user: String,
    pub partition: u16,
    pub leader: Option<String>,
    pub replicas: Vec<String>,
}

impl ClusterStatus {
    /// The member called `node`.
    pub fn member(&self, node: &str) -> Option<&MemberStatus> {
        self.members.iter().find(|m| m.node == node)
    }

    /// Partitions the answering node knows no leader of.
    pub fn leaderless(&self) -> usize {
        self.partitions
            .iter()
            .filter(|p| p.leader.is_none())
            .count()
    }
}

/// `GET /v1/routes`: where each user's publishes take the shortest path, for publishers
/// that send straight to a user's leader instead of through whichever node they reach
/// (any node still accepts any publish and forwards it). A publish token may read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    /// The node that answered.
    pub node: String,
    pub partition_count: u16,
    /// By partition: the client address its leader advertises, as the answering node
    /// knows it; `None` while that is unknown (an election is running). Empty until the
    /// cluster forms.
    pub leaders: Vec<Option<String>>,
}

impl Routes {
    /// The routes a [`ClusterStatus`] implies.
    pub fn from_status(status: &ClusterStatus) -> Routes {
        let leaders = status
            .partitions
            .iter()
            .map(|p| {
                let leader = status.member(p.leader.as_deref()?)?;
                leader.client_addr.clone()
            })
            .collect();
        Routes {
            node: status.node.clone(),
            partition_count: status.partition_count,
            leaders,
        }
    }

    /// The client address of `user`'s leader, if known.
    pub fn leader_of(&self, user: &str) -> Option<&str> {
        if self.partition_count == 0 {
            return None;
        }
        let p = partition_of(user, self.partition_count);
        self.leaders.get(usize::from(p))?.as_deref()
    }
}

/// The partition a cluster of `partitions` partitions places `user` in: FNV-1a 64 of the
/// name, modulo the partition count. The server places users with this function: changing
/// it moves every user (it is part of the on-disk format, `docs/storage.md`).
pub fn partition_of(user: &str, partitions: u16) -> u16 {
    (fnv1a64(user.as_bytes()) % u64::from(partitions.max(1))) as u16
}

/// 64-bit FNV-1a of `bytes` (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// `POST /v1/cluster/decommission`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decommissioned {
    pub decommissioned: String,
    /// The member list after the change.
    pub members: Vec<String>,
    pub member_list_epoch: u64,
    /// What happens next and how to tell when the node can be stopped.
    pub next: String,
}

/// The body of every HTTP error: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_states_keep_their_wire_names() {
        for (s, text) in [
            (MemberState::Joining, "\"joining\""),
            (MemberState::NotAMember, "\"not a member\""),
            (MemberState::Down, "\"down\""),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), text);
            assert_eq!(format!("\"{s}\""), text);
        }
    }

    #[test]
    fn a_single_node_status_reads_without_cluster_fields() {
        let json = r#"{"node":"n","members":[{"node":"n","alive":true,"state":"serving",
            "client_addr":"127.0.0.1:1","http_addr":null,"cluster_addr":null}],
            "replication_factor":1,"partition_count":2,
            "partitions":[{"partition":0,"replicas":["n"],"leader":"n"},
                          {"partition":1,"replicas":["n"],"leader":null}]}"#;
        let s: ClusterStatus = serde_json::from_str(json).unwrap();
        assert!(s.member("n").unwrap().member);
        assert_eq!(s.leaderless(), 1);
        assert_eq!(s.member_list_epoch, None);
    }

    #[test]
    fn routes_name_each_partitions_leaders_client_address() {
        let json = r#"{"node":"a","members":[
            {"node":"a","alive":true,"state":"serving","client_addr":"10.0.0.1:7400","http_addr":null,"cluster_addr":null},
            {"node":"b","alive":true,"state":"serving","client_addr":"10.0.0.2:7400","http_addr":null,"cluster_addr":null}],
            "replication_factor":2,"partition_count":3,
            "partitions":[{"partition":0,"replicas":["a","b"],"leader":"b"},
                          {"partition":1,"replicas":["a","b"],"leader":null},
                          {"partition":2,"replicas":["a","b"],"leader":"a"}]}"#;
        let routes = Routes::from_status(&serde_json::from_str(json).unwrap());
        assert_eq!(
            routes.leaders,
            [
                Some("10.0.0.2:7400".into()),
                None,
                Some("10.0.0.1:7400".into())
            ]
        );
        let user_in = |p: u16| {
            (0..)
                .map(|k| format!("u{k}"))
                .find(|u| partition_of(u, 3) == p)
                .unwrap()
        };
        assert_eq!(routes.leader_of(&user_in(0)), Some("10.0.0.2:7400"));
        assert_eq!(routes.leader_of(&user_in(1)), None);
        assert_eq!(routes.leader_of(&user_in(2)), Some("10.0.0.1:7400"));
        // Before the cluster forms there is nowhere to route to.
        let empty = Routes {
            node: "a".into(),
            partition_count: 0,
            leaders: Vec::new(),
        };
        assert_eq!(empty.leader_of("u0"), None);
    }

    #[test]
    fn users_land_in_the_partition_fnv1a_names() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the FNV reference's test vector).
        assert_eq!(partition_of("a", 64), (0xaf63dc4c8601ec8c_u64 % 64) as u16);
        assert_eq!(partition_of("", 7), (0xcbf29ce484222325_u64 % 7) as u16);
    }

    #[test]
    fn the_error_body_has_the_documented_shape() {
        let v = serde_json::to_value(ErrorBody::new("bad_request", "why")).unwrap();
        assert_eq!(v["error"]["code"], "bad_request");
        assert_eq!(v["error"]["message"], "why");
    }
}
