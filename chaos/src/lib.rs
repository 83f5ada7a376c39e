//! Warbler's chaos harness: a real cluster under a realistic workload and a schedule of
//! faults, with every operation recorded and the history checked against the delivery
//! invariants afterwards. See `docs/chaos.md`.
//!
//! - [`scenario`]: scenarios as data (TOML), expanded into a seeded schedule.
//! - [`driver`]: the cluster of real processes, in network namespaces or on loopback.
//! - [`workload`]: publishers that retry with the same id, devices that come and go.
//! - [`history`]: what is recorded, as JSON lines.
//! - [`checker`]: the verdict: losses, duplicates, order violations, gaps, latency.
//! - [`run`]: one run of one scenario with one seed.
//! - [`report`]: the terminal summary.
//! - [`restore`]: a backup taken under load, restored into a new cluster and checked.
//! - [`ports`]: ports that stay free while a node is restarted on them.

pub mod auth;
pub mod checker;
pub mod driver;
pub mod history;
pub mod ports;
pub mod report;
pub mod restore;
pub mod run;
pub mod scenario;
pub mod workload;
