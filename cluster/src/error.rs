//! Errors of the cluster crate that callers can match.

use serde::{Deserialize, Serialize};

use crate::PartitionId;

/// Why a control-plane decision refuses a request; each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("{name} is not a member of the cluster (members: {}); check the name with `warbler cluster status`", members.join(", "))]
    NotAMember { name: String, members: Vec<String> },
    #[error("another change of the member list is in progress; retry in a few seconds")]
    ChangeInProgress,
    #[error("decommissioning {name} would leave {remaining} nodes, fewer than the replication factor {replication_factor}; add a node first")]
    BelowReplicationFactor {
        name: String,
        remaining: usize,
        replication_factor: usize,
    },
    #[error("the request is for member list {asked} and this node has {have}")]
    StaleEpoch { asked: u64, have: u64 },
    #[error("partition {partition}: the replicas asked for ({asked}, member list {epoch}) are not its placement here ({placed}) or fewer; only the ring's placement is taken")]
    NotThePlacement {
        partition: PartitionId,
        epoch: u64,
        asked: String,
        placed: String,
    },
    #[error("a reconfigure for member list {epoch} is taken only from its coordinator ({coordinator}), not from {from}")]
    NotTheCoordinator {
        from: String,
        epoch: u64,
        coordinator: String,
    },
    #[error("partition {partition} has no leader right now")]
    NoLeader { partition: PartitionId },
    #[error("this node does not lead partition {partition}")]
    NotLeader { partition: PartitionId },
    #[error("partition {partition} is changing its replicas")]
    Reconfiguring { partition: PartitionId },
    #[error("this node holds no replica of partition {partition}")]
    NoReplica { partition: PartitionId },
}

/// The class of a refused peer request, carried across the wire beside its message so that
/// the caller can act on it without reading text. A code this build does not know decodes
/// as [`RpcCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcCode {
    /// The request could not be decoded.
    BadRequest,
    /// The request kind is not served by this node.
    UnknownKind,
    /// This node is starting, has not formed, or holds no member list yet: retry later.
    NotReady,
    /// This node is not the one to ask (not the leader, holds no replica): ask another.
    WrongNode,
    /// The request conflicts with the cluster's state (not a member, below the replication
    /// factor, a stale epoch); retrying the same request will not help.
    Refused,
    /// The node tried and failed (a consensus or storage error, a timeout): retry later.
    Failed,
    /// A code from a newer node, or an answer from a node that sent none.
    #[serde(other)]
    Other,
}

/// A refused peer request: a code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: RpcCode,
    pub message: String,
}

impl RpcError {
    pub fn new(code: RpcCode, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(what: &str, e: impl std::fmt::Display) -> RpcError {
        RpcError::new(
            RpcCode::BadRequest,
            format!("cannot decode the {what}: {e}"),
        )
    }
}

impl From<ControlError> for RpcError {
    fn from(e: ControlError) -> RpcError {
        let code = match &e {
            ControlError::NotAMember { .. }
            | ControlError::BelowReplicationFactor { .. }
            | ControlError::StaleEpoch { .. }
            | ControlError::NotThePlacement { .. } => RpcCode::Refused,
            ControlError::ChangeInProgress
            | ControlError::NotTheCoordinator { .. }
            | ControlError::NoLeader { .. }
            | ControlError::Reconfiguring { .. } => RpcCode::NotReady,
            ControlError::NotLeader { .. } | ControlError::NoReplica { .. } => RpcCode::WrongNode,
        };
        RpcError::new(code, e.to_string())
    }
}

/// Why a node's cluster side failed to start or act.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot listen on cluster_addr {addr} (TCP): {source}; is another process using it? pick another with --cluster-addr")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind the gossip socket on {addr} (UDP): {source}")]
    Gossip {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cluster TLS: {0}")]
    Tls(String),
    #[error("cluster key: {0}")]
    Key(String),
    #[error("the advertise host {host} does not resolve: {message}; set --advertise-host (WARBLER_ADVERTISE_HOST) to a name or IP the other members reach this node at")]
    Advertise { host: String, message: String },
    #[error(transparent)]
    Storage(#[from] warbler_storage::StorageError),
    #[error(
        "the stored cluster member list is unreadable ({0}); the data directory may be damaged"
    )]
    MemberListUnreadable(String),
    #[error("invalid consensus settings: {0}")]
    RaftConfig(String),
    #[error("cannot start the replica of {what}: {message}")]
    StartReplica { what: String, message: String },
    #[error("consensus: {0}")]
    Raft(String),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Peer(#[from] crate::transport::PeerError),
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl From<ClusterError> for RpcError {
    fn from(e: ClusterError) -> RpcError {
        match e {
            ClusterError::Rpc(r) => r,
            ClusterError::Control(c) => c.into(),
            other => RpcError::new(RpcCode::Failed, other.to_string()),
        }
    }
}
