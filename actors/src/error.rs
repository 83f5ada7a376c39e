use serde::{Deserialize, Serialize};

/// Why a mailbox request failed. The gateway maps these to protocol errors. Serializable:
/// a request routed to another node gets its answer back as this type.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum MailboxError {
    #[error("storage is not accepting writes: {0}; retry later or check the node's disk")]
    Unavailable(String),
    #[error(
        "the user's mailbox restarted while the request was in flight; retry with the same id"
    )]
    Restarted,
    #[error("the node is shutting down; retry on another node")]
    ShuttingDown,
    /// This node does not lead the user's partition (leadership moved, or no leader yet).
    #[error(
        "the user's partition has no reachable leader right now ({0}); retry with the same id"
    )]
    NoLeader(String),
    /// This node does not lead the user's partition, and node `0` does (as far as it knows):
    /// a router that guessed sends the request there next.
    #[error("the user's partition is led by node {0}; retry there with the same id")]
    Redirect(String),
    /// The partition's leader has as much in flight as it may queue: sent back at once.
    #[error("the user's partition is overloaded ({0}); retry after {OVERLOAD_RETRY_MS} ms with the same id")]
    Overloaded(String),
    /// The publish before this one to the same user on the same connection (`0`, its id)
    /// was not taken, so this one is not either: publishes keep their order.
    #[error("the publish before this one to the same user (id {0}) was not taken; resend from that one, in order")]
    OutOfOrder(String),
    /// The partition's leader runs a release that does not serve this request (a rolling
    /// upgrade): the caller falls back to requests it serves.
    #[error("the partition's leader does not serve this request yet ({0})")]
    Unsupported(String),
    /// The user holds as many messages a device has not acknowledged as retention keeps:
    /// taking more would trim unread ones.
    #[error("the user's mailbox is full: {0}; retry once the user's devices have caught up")]
    Full(String),
    /// The disk of the node that holds the user's mailbox is below its free-space mark.
    #[error("{0}")]
    StorageFull(String),
}

/// How long a publisher refused as overloaded is told to wait (HTTP `Retry-After` rounds it
/// up to a second).
pub const OVERLOAD_RETRY_MS: u64 = 50;

impl MailboxError {
    /// Worth retrying elsewhere or a moment later: the partition's leader moved or is being
    /// elected, or the mailbox restarted.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            MailboxError::NoLeader(_)
                | MailboxError::Redirect(_)
                | MailboxError::Restarted
                | MailboxError::Unavailable(_)
        )
    }
}
