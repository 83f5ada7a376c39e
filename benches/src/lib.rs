//! Warbler's benchmarks. They treat Warbler as a black box: they start the real binary (or
//! reach a running one) and speak the documented protocol through `warbler-client`.
//!
//! Layout:
//! - `src/bin/load.rs` (`warbler-load`): the end-to-end load generator: open loop at a
//!   target rate, latency timed from the intended send time (no coordinated omission),
//!   HDR histograms; and the idle-connection holder used to measure memory per connection.
//! - [`stats`]: what a run measures (latency from the intended send time, per-device order
//!   checks), and how worker processes hand their histograms to the parent.
//! - [`systems`]: the systems a run drives on one workload: Warbler, NATS JetStream and
//!   Mosquitto (MQTT).
//! - [`tokens`]: HS256 tokens minted from the node's secret file.

pub mod stats;
pub mod systems;

pub mod tokens {
    /// Mints a token for `user` with `scope`, valid for a day.
    pub fn mint(secret: &[u8], user: &str, scope: &str) -> String {
        warbler_client::auth::token(secret, user, scope, 86_400)
    }

    /// Reads a secret file the way the server does (surrounding whitespace trimmed).
    pub fn read_secret(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
        Ok(warbler_client::auth::read_secret(path)?)
    }
}
