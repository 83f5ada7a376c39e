//! Warbler's wire protocol and the Rust client SDK.
//!
//! Layout:
//! - [`frame`]: the device-protocol frames (`hello`, `msg`, `ack`, ...) and their
//!   MessagePack encoding. The field names are the protocol (see `docs/protocol.md`).
//! - [`codec`]: length-prefixed framing (4-byte big-endian length, then MessagePack) as a
//!   `tokio_util` codec with a bounded frame size. Pure, no I/O: fuzzed by proptest.
//! - [`sdk`]: an async client over TCP or TLS: connect, hello, receive, ack, publish.
//! - [`api`]: the HTTP API's JSON bodies (`/v1/cluster`, decommission, errors), shared
//!   by the server that writes them and the tools that read them.
//! - [`auth`]: the JWT claims and the one minter of tokens.
//! - [`http`]: the one HTTP client of the tools (CLI, chaos harness, tests).
//! - [`resend`]: go-back-N bookkeeping for a publisher with many publishes in flight.
//! - [`error`]: decode and client errors.

pub mod api;
pub mod auth;
pub mod codec;
pub mod error;
pub mod frame;
pub mod http;
pub mod resend;
pub mod sdk;

pub use crate::codec::FrameCodec;
pub use crate::error::{ClientError, DecodeError};
pub use crate::frame::{ErrorCode, Frame, PROTOCOL_VERSION};
pub use crate::sdk::{ConnectOptions, Connection, Delivery, Receiver, Sender, TlsOptions};
