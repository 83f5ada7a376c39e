/// Why bytes could not be turned into a frame. A plain enum: it sits on the hot path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame is not a map with a string \"t\": {0}")]
    Malformed(String),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("frame of type {t:?} has missing or invalid fields: {message}")]
    BadFields { t: String, message: String },
}

impl DecodeError {
    /// The protocol error code sent back for this decode failure.
    pub fn code(&self) -> crate::frame::ErrorCode {
        use crate::frame::ErrorCode;
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::Malformed(_) => ErrorCode::MalformedFrame,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
            DecodeError::BadFields { .. } => ErrorCode::BadRequest,
        }
    }
}

/// Errors of the client SDK.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o error talking to the server: {0}")]
    Io(#[from] std::io::Error),
    #[error("could not decode a frame from the server: {0}")]
    Decode(#[from] DecodeError),
    #[error("the server refused: {code}: {message}")]
    Server {
        code: String,
        message: String,
        id: Option<String>,
    },
    #[error("the server closed the connection")]
    Closed,
    #[error("the server is draining: {reason}; reconnect in {retry_ms} ms")]
    Bye { reason: String, retry_ms: u64 },
    #[error("unexpected frame from the server: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}
