/// Why a mailbox request failed. The gateway maps these to protocol errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MailboxError {
    #[error("storage is not accepting writes: {0}; retry later or check the node's disk")]
    Unavailable(String),
    #[error(
        "the user's mailbox restarted while the request was in flight; retry with the same id"
    )]
    Restarted,
    #[error("the node is shutting down; retry on another node")]
    ShuttingDown,
}
