//! The device-protocol gateway: what happens on one connection, whatever carries it.
//!
//! - [`conn`]: the connection state machine: hello, authentication, the session actor,
//!   acks, publishes, errors. Transport-independent.
//! - [`tcp`]: the client port: TCP, with TLS when configured.
//! - [`io`]: the threads its connections run on.
//! - WebSocket lives with the HTTP API (`crate::http`), and feeds the same [`conn`].

pub mod conn;
pub mod io;
pub mod tcp;

pub use conn::Gateway;
