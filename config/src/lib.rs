//! Warbler's typed configuration: one tree, built in layers.
//!
//! Layout:
//! - [`Config`] and its sections, with defaults in code (`Default`).
//! - [`Config::from_toml_str`] / [`Config::load_file`]: the TOML file layer.
//! - [`Config::apply_env`]: `WARBLER_*` overrides (see [`ENV_KEYS`]).
//! - [`Config::validate`]: every bound checked, errors name the field and the allowed range.
//! - [`Config::for_test`]: a small, fast configuration for tests.
//!
//! The CLI (in `src/`) applies its flags last, then calls `validate()`.

mod error;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::error::{BadValue, ConfigError};

/// Default client (device protocol over TCP) port.
pub const DEFAULT_CLIENT_PORT: u16 = 7400;
/// Default HTTP / WebSocket / metrics port.
pub const DEFAULT_HTTP_PORT: u16 = 7480;
/// Default peer RPC and gossip port.
pub const DEFAULT_CLUSTER_PORT: u16 = 7410;
/// Largest `limits.max_body_bytes` of a cluster member. A replicated log entry holding a
/// body goes to the followers in one peer frame (16 MiB), after up to 1 MiB of the entries
/// before it; a larger body could be accepted but never replicate, and would stall its
/// partition. The cluster crate checks that this bound fits its frame.
pub const CLUSTER_BODY_BYTES_MAX: usize = 8 << 20;

/// The whole configuration of one node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's stable name (the pod name in a StatefulSet).
    pub node_id: String,
    /// Where RocksDB and node state live.
    pub data_dir: PathBuf,
    /// Device protocol over TCP (TLS when `tls` is set).
    pub client_addr: SocketAddr,
    /// HTTP API, WebSocket, metrics.
    pub http_addr: SocketAddr,
    /// Peer RPC (TCP) and gossip (UDP).
    pub cluster_addr: SocketAddr,
    /// Cluster addresses (or DNS names) to join through.
    pub seeds: Vec<String>,
    /// Form a new cluster once this many members are up (1 = single node).
    pub bootstrap_expect: u32,
    /// File holding the HS256 secret for JWTs.
    pub jwt_secret_file: Option<PathBuf>,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub storage: StorageConfig,
    pub retention: RetentionConfig,
    pub mailbox: MailboxConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
    /// Serve the demo chat at `/demo/`, with an endpoint that mints a token for any user
    /// who asks: for `warbler dev` only, never in production.
    pub demo: bool,
}

/// What a token must carry besides a good signature.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// A directory of HS256 secrets, one per file, the file name being the key id (`kid`)
    /// a token names in its header. Re-read every few seconds: add a key, move clients
    /// over, remove the old key, with no restart.
    pub keys_dir: Option<PathBuf>,
    /// When set, a token's `iss` must equal it.
    pub issuer: Option<String>,
    /// When set, a token's `aud` must include it.
    pub audience: Option<String>,
    /// Longest accepted lifetime, `exp` minus `iat` (or minus now without `iat`), in
    /// seconds; 0 = no limit.
    pub max_lifetime_secs: u64,
    /// `/metrics` needs a token with the `ops` scope (Prometheus sends it with
    /// `authorization` in its scrape config).
    pub metrics_require_token: bool,
}

/// TLS on the client port. Both files set = TLS on; both unset = plain TCP.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain served on the client port.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Serve the HTTP API and the WebSocket endpoint over TLS too, with the same
    /// certificate (`https://`, `wss://`).
    pub http: bool,
}

/// Bounds on what clients may send and hold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame accepted or sent on the device protocol (bytes, after the length prefix).
    pub max_frame_bytes: usize,
    /// Largest message body accepted by publish (bytes). Must leave room for the `msg`
    /// frame's other fields inside `max_frame_bytes`.
    pub max_body_bytes: usize,
    /// Messages sent to one device but not yet acknowledged by it.
    pub inflight_max: u32,
    /// Publishes one connection may have waiting for durability at once.
    pub publish_inflight_max: u32,
    /// Open device connections per node (TCP and WebSocket together).
    pub connections_max: u32,
    /// Seconds a new connection has to send its `hello`.
    pub hello_timeout_ms: u64,
    /// Recipients in one fan-out request.
    pub fanout_max: usize,
    /// The TLS handshake on the client and HTTP ports must finish within this (ms).
    pub tls_handshake_timeout_ms: u64,
    /// A device connection silent this long (and an eighth more, so a client pinging at
    /// this interval itself is never pinged) is sent a `ping` (ms).
    pub ping_interval_ms: u64,
    /// A device connection silent this long is closed (ms); at least twice
    /// `ping_interval_ms`, so a live client has a ping to answer first.
    pub idle_timeout_ms: u64,
    /// A device connection that takes nothing the node writes for this long (ms), while
    /// frames wait for it, is cut off as a slow consumer.
    pub slow_consumer_timeout_ms: u64,
    /// While draining, how long the node spreads its connections' `bye` over (each one at
    /// a random moment of the window), so devices do not all reconnect at once.
    pub lame_duck_ms: u64,
    /// Threads that serve the client port's connections (each a single-threaded runtime;
    /// a connection stays on one); 0 = one per four cores, at least two on a machine of
    /// two cores or more.
    pub io_threads: u32,
    /// Open HTTP connections per node (WebSocket devices count under `connections_max`
    /// once upgraded), counted at accept.
    pub http_connections_max: u32,
    /// An HTTP request's headers must arrive within this (ms); it also closes a kept-alive
    /// connection idle this long.
    pub http_header_timeout_ms: u64,
    /// Messages one token subject may publish per second on this node (a fan-out counts
    /// each recipient); 0 = no limit.
    pub publish_rate: u32,
    /// Messages a subject may publish at once above `publish_rate`.
    pub publish_burst: u32,
    /// Body bytes one token subject may publish per second on this node; 0 = no limit.
    pub publish_bytes_rate: u32,
    /// Body bytes a subject may publish at once above `publish_bytes_rate` (at least
    /// `max_body_bytes`, so that one largest message always fits).
    pub publish_bytes_burst: u32,
    /// Messages one device-protocol connection (TCP or WebSocket) may publish per second;
    /// 0 = no limit. Several connections of one subject each have their own.
    pub connection_publish_rate: u32,
    /// Messages a connection may publish at once above `connection_publish_rate`.
    pub connection_publish_burst: u32,
    /// Body bytes one connection may publish per second; 0 = no limit.
    pub connection_publish_bytes_rate: u32,
    /// Body bytes a connection may publish at once above `connection_publish_bytes_rate`
    /// (at least `max_body_bytes`).
    pub connection_publish_bytes_burst: u32,
}

/// RocksDB and group commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Records (appends, cursor updates) in one synced write batch at most.
    pub batch_records_max: usize,
    /// Bytes in one synced write batch at most.
    pub batch_bytes_max: usize,
    /// Write requests waiting for the committer; publishers wait when it is full.
    pub queue_max: usize,
    /// fsync every batch. Turning this off loses acknowledged messages on power loss.
    pub sync: bool,
    /// Below this many free bytes on the data directory's disk, publishes are refused with
    /// `storage_full` and the node is not ready (0 = no check).
    pub min_free_bytes: u64,
}

/// What is kept, and for how long.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Messages kept per user; older ones are trimmed (0 = no count limit).
    pub max_messages_per_user: u64,
    /// Age after which messages are trimmed, in seconds (0 = no age limit).
    pub max_age_secs: u64,
    /// How long a publish id is remembered for idempotent retries, in seconds.
    pub dedup_window_secs: u64,
    /// How often the retention sweep runs, in seconds.
    pub sweep_interval_secs: u64,
}

/// Per-user mailbox actors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MailboxConfig {
    /// A mailbox with no subscriber and no pending write stops after this long.
    pub idle_timeout_ms: u64,
    /// A mailbox whose devices acknowledged everything it sent, with no pending write,
    /// goes to sleep after this long: its actor stops and the node keeps only who is
    /// subscribed, until the next publish wakes it. 0 = never.
    pub sleep_after_ms: u64,
    /// How long a device's acknowledged position may stay in memory before it is written:
    /// the acks of that time are one write. A crash redelivers what was acknowledged in
    /// the last this-long (at least once); nothing is lost. 0 = write every ack.
    pub cursor_flush_ms: u64,
    /// Recent messages kept in memory per mailbox for online delivery.
    pub tail_cache_max: usize,
}

/// Replication and failure detection in a cluster (ignored by a single node).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Copies of every partition (capped at the number of members).
    pub replication_factor: u32,
    /// How often a partition's leader tells its followers it is alive.
    pub raft_heartbeat_ms: u64,
    /// A follower that hears nothing for this long (randomised up to 1.5 times it) starts
    /// an election: the time a failover takes.
    pub raft_election_timeout_ms: u64,
    /// Bytes of publishes a partition's leader may have proposed and not yet committed;
    /// past it, new publishes to the partition are refused at once as `overloaded` (HTTP
    /// 429) instead of queueing for seconds.
    pub backlog_bytes_max: usize,
    /// A member unreachable for this long is removed from the member list by the list's
    /// leader and its replicas are rebuilt on the others, when at least
    /// `replication_factor` members remain; 0 never removes one (an operator
    /// decommissions it).
    pub dead_node_timeout_ms: u64,
    /// This node's failure zone: a partition's replicas go to distinct zones when there
    /// are as many zones as replicas. Fixed for the node's life in the cluster.
    pub zone: Option<String>,
    /// Host (name or IP) other nodes reach this node's `cluster_addr` port at, when
    /// `cluster_addr` binds a wildcard address (e.g. the pod IP or DNS name).
    pub advertise_host: Option<String>,
    /// Mutual TLS between nodes: the cluster CA (PEM). With `tls_cert_file` and
    /// `tls_key_file` (this node's certificate for the name `warbler-peer`, signed by the
    /// CA); all three set = peer traffic encrypted and only CA-signed nodes admitted.
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// The cluster key: a file holding a secret every node of the cluster shares (at least
    /// 32 characters; make one with `head -c 32 /dev/urandom | base64`). Every peer
    /// connection proves it by challenge and response and every gossip datagram carries a
    /// MAC made with it, so a host without it is refused. Required when the cluster address
    /// is not a loopback address.
    pub key_file: Option<PathBuf>,
    /// Testing only: serve `POST /v1/debug/faults`, which cuts this node off from chosen
    /// peers (isolation tests). Never enable in production.
    pub fault_injection: bool,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `warbler=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: "warbler-0".to_string(),
            data_dir: PathBuf::from("./data"),
            client_addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_CLIENT_PORT)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT)),
            cluster_addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_CLUSTER_PORT)),
            seeds: Vec::new(),
            bootstrap_expect: 1,
            jwt_secret_file: None,
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            storage: StorageConfig::default(),
            retention: RetentionConfig::default(),
            mailbox: MailboxConfig::default(),
            cluster: ClusterConfig::default(),
            log: LogConfig::default(),
            demo: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 20,
            max_body_bytes: 512 * 1024,
            // 256 unacked messages keep a phone on a slow link busy without letting one
            // device pin much memory (256 x 1 KiB typical).
            inflight_max: 256,
            publish_inflight_max: 1024,
            // Below the 20,000 open files of a default container, leaving room for RocksDB.
            connections_max: 18_000,
            hello_timeout_ms: 10_000,
            fanout_max: 10_000,
            tls_handshake_timeout_ms: 10_000,
            // NATS pings every 2 minutes; a phone's NAT mapping often lasts less, so once a
            // minute, and three silent minutes end the connection.
            ping_interval_ms: 60_000,
            idle_timeout_ms: 180_000,
            slow_consumer_timeout_ms: 30_000,
            lame_duck_ms: 5_000,
            io_threads: 0,
            http_connections_max: 4096,
            http_header_timeout_ms: 10_000,
            publish_rate: 0,
            publish_burst: 1000,
            publish_bytes_rate: 0,
            publish_bytes_burst: 16 << 20,
            connection_publish_rate: 0,
            connection_publish_burst: 1000,
            connection_publish_bytes_rate: 0,
            connection_publish_bytes_burst: 16 << 20,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            // One fsync costs milliseconds here; 4096 records a batch keeps the disk busy
            // without making a batch's tail wait long.
            batch_records_max: 4096,
            batch_bytes_max: 8 << 20,
            queue_max: 65_536,
            sync: true,
            // Room for RocksDB's compactions and the writes already accepted.
            min_free_bytes: 256 << 20,
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_messages_per_user: 100_000,
            max_age_secs: 30 * 24 * 3600,
            dedup_window_secs: 24 * 3600,
            sweep_interval_secs: 60,
        }
    }
}

impl Default for MailboxConfig {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 60_000,
            sleep_after_ms: 5_000,
            cursor_flush_ms: 1_000,
            tail_cache_max: 512,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            replication_factor: 3,
            raft_heartbeat_ms: 250,
            raft_election_timeout_ms: 1000,
            // About 16,000 publishes of 256 B: several hundred milliseconds of a leader's
            // work, beyond which a publisher waits longer in the queue than a retry costs.
            backlog_bytes_max: 4 << 20,
            // Longer than a node restart or a rescheduled pod takes (pulling an image,
            // attaching a volume), short enough that a second failure rarely comes first.
            dead_node_timeout_ms: 300_000,
            zone: None,
            advertise_host: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            key_file: None,
            fault_injection: false,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".to_string(),
        }
    }
}

/// The `WARBLER_*` variables [`Config::apply_env`] reads, and the field each one sets.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("WARBLER_NODE_ID", "node_id"),
    ("WARBLER_DATA_DIR", "data_dir"),
    ("WARBLER_CLIENT_ADDR", "client_addr"),
    ("WARBLER_HTTP_ADDR", "http_addr"),
    ("WARBLER_CLUSTER_ADDR", "cluster_addr"),
    ("WARBLER_SEEDS", "seeds"),
    ("WARBLER_BOOTSTRAP_EXPECT", "bootstrap_expect"),
    ("WARBLER_DEMO", "demo"),
    ("WARBLER_JWT_SECRET_FILE", "jwt_secret_file"),
    ("WARBLER_JWT_KEYS_DIR", "auth.keys_dir"),
    ("WARBLER_JWT_ISSUER", "auth.issuer"),
    ("WARBLER_JWT_AUDIENCE", "auth.audience"),
    ("WARBLER_JWT_MAX_LIFETIME_SECS", "auth.max_lifetime_secs"),
    (
        "WARBLER_METRICS_REQUIRE_TOKEN",
        "auth.metrics_require_token",
    ),
    ("WARBLER_TLS_CERT_FILE", "tls.cert_file"),
    ("WARBLER_TLS_KEY_FILE", "tls.key_file"),
    ("WARBLER_TLS_HTTP", "tls.http"),
    ("WARBLER_MAX_FRAME_BYTES", "limits.max_frame_bytes"),
    ("WARBLER_MAX_BODY_BYTES", "limits.max_body_bytes"),
    ("WARBLER_INFLIGHT_MAX", "limits.inflight_max"),
    ("WARBLER_CONNECTIONS_MAX", "limits.connections_max"),
    (
        "WARBLER_HTTP_CONNECTIONS_MAX",
        "limits.http_connections_max",
    ),
    ("WARBLER_IDLE_TIMEOUT_MS", "limits.idle_timeout_ms"),
    (
        "WARBLER_SLOW_CONSUMER_TIMEOUT_MS",
        "limits.slow_consumer_timeout_ms",
    ),
    ("WARBLER_LAME_DUCK_MS", "limits.lame_duck_ms"),
    ("WARBLER_IO_THREADS", "limits.io_threads"),
    ("WARBLER_PUBLISH_RATE", "limits.publish_rate"),
    ("WARBLER_PUBLISH_BURST", "limits.publish_burst"),
    ("WARBLER_PUBLISH_BYTES_RATE", "limits.publish_bytes_rate"),
    ("WARBLER_PUBLISH_BYTES_BURST", "limits.publish_bytes_burst"),
    (
        "WARBLER_CONNECTION_PUBLISH_RATE",
        "limits.connection_publish_rate",
    ),
    (
        "WARBLER_CONNECTION_PUBLISH_BURST",
        "limits.connection_publish_burst",
    ),
    (
        "WARBLER_CONNECTION_PUBLISH_BYTES_RATE",
        "limits.connection_publish_bytes_rate",
    ),
    (
        "WARBLER_CONNECTION_PUBLISH_BYTES_BURST",
        "limits.connection_publish_bytes_burst",
    ),
    ("WARBLER_STORAGE_SYNC", "storage.sync"),
    ("WARBLER_STORAGE_MIN_FREE_BYTES", "storage.min_free_bytes"),
    (
        "WARBLER_RETENTION_MAX_MESSAGES",
        "retention.max_messages_per_user",
    ),
    ("WARBLER_RETENTION_MAX_AGE_SECS", "retention.max_age_secs"),
    ("WARBLER_DEDUP_WINDOW_SECS", "retention.dedup_window_secs"),
    ("WARBLER_MAILBOX_IDLE_TIMEOUT_MS", "mailbox.idle_timeout_ms"),
    ("WARBLER_MAILBOX_SLEEP_AFTER_MS", "mailbox.sleep_after_ms"),
    ("WARBLER_MAILBOX_CURSOR_FLUSH_MS", "mailbox.cursor_flush_ms"),
    ("WARBLER_REPLICATION_FACTOR", "cluster.replication_factor"),
    ("WARBLER_RAFT_HEARTBEAT_MS", "cluster.raft_heartbeat_ms"),
    (
        "WARBLER_RAFT_ELECTION_TIMEOUT_MS",
        "cluster.raft_election_timeout_ms",
    ),
    ("WARBLER_BACKLOG_BYTES_MAX", "cluster.backlog_bytes_max"),
    (
        "WARBLER_DEAD_NODE_TIMEOUT_MS",
        "cluster.dead_node_timeout_ms",
    ),
    ("WARBLER_ZONE", "cluster.zone"),
    ("WARBLER_ADVERTISE_HOST", "cluster.advertise_host"),
    ("WARBLER_FAULT_INJECTION", "cluster.fault_injection"),
    ("WARBLER_CLUSTER_TLS_CA_FILE", "cluster.tls_ca_file"),
    ("WARBLER_CLUSTER_TLS_CERT_FILE", "cluster.tls_cert_file"),
    ("WARBLER_CLUSTER_TLS_KEY_FILE", "cluster.tls_key_file"),
    ("WARBLER_CLUSTER_KEY_FILE", "cluster.key_file"),
    ("WARBLER_LOG_FORMAT", "log.format"),
    ("WARBLER_LOG", "log.level"),
];

impl Config {
    /// A configuration for tests: ports 0 on loopback, data under `data_dir`.
    pub fn for_test(data_dir: &Path) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            data_dir: data_dir.to_path_buf(),
            client_addr: any,
            http_addr: any,
            cluster_addr: any,
            ..Self::default()
        }
    }

    /// Parses a TOML document; unknown keys are errors so typos do not pass silently.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: None,
            message: e.to_string(),
        })
    }

    /// Reads and parses a TOML file.
    pub fn load_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Toml {
            path: Some(path.to_path_buf()),
            message: e.to_string(),
        })
    }

    /// Applies `WARBLER_*` overrides from `vars` (pass `std::env::vars()`).
    pub fn apply_env<I: IntoIterator<Item = (String, String)>>(
        &mut self,
        vars: I,
    ) -> Result<(), ConfigError> {
        for (key, value) in vars {
            if let Some((_, field)) = ENV_KEYS.iter().find(|(k, _)| *k == key) {
                self.set(field, &value).map_err(|e| ConfigError::Env {
                    var: key.clone(),
                    value: value.clone(),
                    message: e.0,
                })?;
            }
        }
        Ok(())
    }

    /// Sets one field by its dotted name from a string (env variables and flags).
    pub fn set(&mut self, field: &str, value: &str) -> Result<(), BadValue> {
        fn parse<T: std::str::FromStr>(value: &str, what: &str) -> Result<T, BadValue> {
            value
                .trim()
                .parse()
                .map_err(|_| BadValue(format!("expected {what}, got {value:?}")))
        }
        fn path(value: &str) -> Option<PathBuf> {
            (!value.is_empty()).then(|| PathBuf::from(value))
        }
        let addr = "HOST:PORT with a numeric IP, e.g. 0.0.0.0:7400";
        match field {
            "node_id" => self.node_id = value.to_string(),
            "data_dir" => self.data_dir = PathBuf::from(value),
            "client_addr" => self.client_addr = parse(value, addr)?,
            "http_addr" => self.http_addr = parse(value, addr)?,
            "cluster_addr" => self.cluster_addr = parse(value, addr)?,
            "seeds" => {
                self.seeds = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "bootstrap_expect" => self.bootstrap_expect = parse(value, "a whole number")?,
            "demo" => self.demo = parse(value, "true or false")?,
            "jwt_secret_file" => self.jwt_secret_file = path(value),
            "auth.keys_dir" => self.auth.keys_dir = path(value),
            "auth.issuer" => self.auth.issuer = (!value.is_empty()).then(|| value.to_string()),
            "auth.audience" => self.auth.audience = (!value.is_empty()).then(|| value.to_string()),
            "auth.max_lifetime_secs" => self.auth.max_lifetime_secs = parse(value, "seconds")?,
            "auth.metrics_require_token" => {
                self.auth.metrics_require_token = parse(value, "true or false")?
            }
            "tls.cert_file" => self.tls.cert_file = path(value),
            "tls.key_file" => self.tls.key_file = path(value),
            "tls.http" => self.tls.http = parse(value, "true or false")?,
            "limits.max_frame_bytes" => self.limits.max_frame_bytes = parse(value, "bytes")?,
            "limits.max_body_bytes" => self.limits.max_body_bytes = parse(value, "bytes")?,
            "limits.inflight_max" => self.limits.inflight_max = parse(value, "a whole number")?,
            "limits.connections_max" => {
                self.limits.connections_max = parse(value, "a whole number")?
            }
            "limits.http_connections_max" => {
                self.limits.http_connections_max = parse(value, "a whole number")?
            }
            "limits.idle_timeout_ms" => self.limits.idle_timeout_ms = parse(value, "milliseconds")?,
            "limits.slow_consumer_timeout_ms" => {
                self.limits.slow_consumer_timeout_ms = parse(value, "milliseconds")?
            }
            "limits.lame_duck_ms" => self.limits.lame_duck_ms = parse(value, "milliseconds")?,
            "limits.io_threads" => self.limits.io_threads = parse(value, "a whole number")?,
            "limits.publish_rate" => self.limits.publish_rate = parse(value, "messages/s")?,
            "limits.publish_burst" => self.limits.publish_burst = parse(value, "messages")?,
            "limits.publish_bytes_rate" => {
                self.limits.publish_bytes_rate = parse(value, "bytes/s")?
            }
            "limits.publish_bytes_burst" => {
                self.limits.publish_bytes_burst = parse(value, "bytes")?
            }
            "limits.connection_publish_rate" => {
                self.limits.connection_publish_rate = parse(value, "messages/s")?
            }
            "limits.connection_publish_burst" => {
                self.limits.connection_publish_burst = parse(value, "messages")?
            }
            "limits.connection_publish_bytes_rate" => {
                self.limits.connection_publish_bytes_rate = parse(value, "bytes/s")?
            }
            "limits.connection_publish_bytes_burst" => {
                self.limits.connection_publish_bytes_burst = parse(value, "bytes")?
            }
            "storage.sync" => self.storage.sync = parse(value, "true or false")?,
            "storage.min_free_bytes" => self.storage.min_free_bytes = parse(value, "bytes")?,
            "retention.max_messages_per_user" => {
                self.retention.max_messages_per_user = parse(value, "a whole number")?
            }
            "retention.max_age_secs" => self.retention.max_age_secs = parse(value, "seconds")?,
            "retention.dedup_window_secs" => {
                self.retention.dedup_window_secs = parse(value, "seconds")?
            }
            "cluster.replication_factor" => {
                self.cluster.replication_factor = parse(value, "a whole number")?
            }
            "cluster.backlog_bytes_max" => self.cluster.backlog_bytes_max = parse(value, "bytes")?,
            "cluster.zone" => self.cluster.zone = (!value.is_empty()).then(|| value.to_string()),
            "cluster.dead_node_timeout_ms" => {
                self.cluster.dead_node_timeout_ms = parse(value, "milliseconds")?
            }
            "cluster.raft_heartbeat_ms" => {
                self.cluster.raft_heartbeat_ms = parse(value, "milliseconds")?
            }
            "cluster.raft_election_timeout_ms" => {
                self.cluster.raft_election_timeout_ms = parse(value, "milliseconds")?
            }
            "cluster.advertise_host" => {
                self.cluster.advertise_host = (!value.is_empty()).then(|| value.to_string())
            }
            "cluster.tls_ca_file" => self.cluster.tls_ca_file = path(value),
            "cluster.tls_cert_file" => self.cluster.tls_cert_file = path(value),
            "cluster.tls_key_file" => self.cluster.tls_key_file = path(value),
            "cluster.key_file" => self.cluster.key_file = path(value),
            "cluster.fault_injection" => {
                self.cluster.fault_injection = parse(value, "true or false")?
            }
            "mailbox.idle_timeout_ms" => {
                self.mailbox.idle_timeout_ms = parse(value, "milliseconds")?
            }
            "mailbox.sleep_after_ms" => self.mailbox.sleep_after_ms = parse(value, "milliseconds")?,
            "mailbox.cursor_flush_ms" => {
                self.mailbox.cursor_flush_ms = parse(value, "milliseconds")?
            }
            "log.format" => {
                self.log.format = match value.trim() {
                    "human" => LogFormat::Human,
                    "json" => LogFormat::Json,
                    _ => return Err(BadValue(format!("expected human or json, got {value:?}"))),
                }
            }
            "log.level" => self.log.level = value.to_string(),
            _ => return Err(BadValue(format!("unknown configuration field {field:?}"))),
        }
        Ok(())
    }

    /// Checks every bound. The error names the field, the value and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_node()?;
        self.validate_limits()?;
        self.validate_storage()?;
        self.validate_cluster()?;
        if self.demo && self.jwt_secret_file.is_none() {
            return Err(invalid(
                "demo",
                "the demo mints tokens with jwt_secret_file: set one, or turn the demo off",
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty; try \"info\""));
        }
        Ok(())
    }

    fn validate_node(&self) -> Result<(), ConfigError> {
        if let Some(zone) = &self.cluster.zone {
            if !is_name(zone) {
                return Err(invalid(
                    "cluster.zone",
                    format!(
                        "{zone:?} must be 1..=63 characters of letters, digits, '-', '_' or '.'"
                    ),
                ));
            }
        }
        if !is_name(&self.node_id) {
            return Err(invalid(
                "node_id",
                format!(
                    "{:?} must be 1..=63 characters of letters, digits, '-', '_' or '.'",
                    self.node_id
                ),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        range("bootstrap_expect", self.bootstrap_expect, 1, 99)?;
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(invalid(
                "tls",
                "set both tls.cert_file and tls.key_file to serve TLS, or neither for plain TCP",
            ));
        }
        if self.tls.http && self.tls.cert_file.is_none() {
            return Err(invalid(
                "tls.http",
                "HTTP over TLS uses the client port's certificate: set tls.cert_file and tls.key_file too, or turn tls.http off",
            ));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        range("limits.max_frame_bytes", l.max_frame_bytes, 1024, 64 << 20)?;
        range(
            "limits.max_body_bytes",
            l.max_body_bytes,
            1,
            l.max_frame_bytes.saturating_sub(1024),
        )
        .map_err(|e| match e {
            ConfigError::Invalid { field, message } => ConfigError::Invalid {
                field,
                message: format!(
                    "{message} (a body must fit in limits.max_frame_bytes minus 1024 bytes \
                         of frame overhead)"
                ),
            },
            other => other,
        })?;
        range("limits.inflight_max", l.inflight_max, 1, 65_536)?;
        range(
            "limits.publish_inflight_max",
            l.publish_inflight_max,
            1,
            65_536,
        )?;
        range("limits.connections_max", l.connections_max, 1, 10_000_000)?;
        range("limits.hello_timeout_ms", l.hello_timeout_ms, 100, 600_000)?;
        range("limits.fanout_max", l.fanout_max, 1, 1_000_000)?;
        range(
            "limits.tls_handshake_timeout_ms",
            l.tls_handshake_timeout_ms,
            100,
            600_000,
        )?;
        range(
            "limits.ping_interval_ms",
            l.ping_interval_ms,
            100,
            3_600_000,
        )?;
        range(
            "limits.slow_consumer_timeout_ms",
            l.slow_consumer_timeout_ms,
            100,
            3_600_000,
        )?;
        range("limits.lame_duck_ms", l.lame_duck_ms, 0, 600_000)?;
        range("limits.io_threads", u64::from(l.io_threads), 0, 256)?;
        range(
            "limits.idle_timeout_ms",
            l.idle_timeout_ms,
            2 * l.ping_interval_ms,
            24 * 3_600_000,
        )
        .map_err(|e| match e {
            ConfigError::Invalid { field, message } => ConfigError::Invalid {
                field,
                message: format!(
                    "{message} (at least twice limits.ping_interval_ms, so that a live \
                         client gets a ping to answer before it is closed)"
                ),
            },
            other => other,
        })?;
        range(
            "limits.http_connections_max",
            l.http_connections_max,
            1,
            10_000_000,
        )?;
        range(
            "limits.http_header_timeout_ms",
            l.http_header_timeout_ms,
            100,
            600_000,
        )?;
        for (field, burst, bytes_field, bytes_burst) in [
            (
                "limits.publish_burst",
                l.publish_burst,
                "limits.publish_bytes_burst",
                l.publish_bytes_burst,
            ),
            (
                "limits.connection_publish_burst",
                l.connection_publish_burst,
                "limits.connection_publish_bytes_burst",
                l.connection_publish_bytes_burst,
            ),
        ] {
            range(field, burst, 1, u32::MAX)?;
            if (bytes_burst as usize) < l.max_body_bytes {
                return Err(invalid(
                    bytes_field,
                    format!(
                        "{bytes_burst} is below limits.max_body_bytes ({}): the largest message could never be published",
                        l.max_body_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_storage(&self) -> Result<(), ConfigError> {
        let s = &self.storage;
        range(
            "storage.batch_records_max",
            s.batch_records_max,
            1,
            1_000_000,
        )?;
        range("storage.batch_bytes_max", s.batch_bytes_max, 4096, 1 << 30)?;
        range("storage.queue_max", s.queue_max, 1, 10_000_000)?;
        let r = &self.retention;
        range(
            "retention.dedup_window_secs",
            r.dedup_window_secs,
            1,
            365 * 24 * 3600,
        )?;
        range(
            "retention.sweep_interval_secs",
            r.sweep_interval_secs,
            1,
            24 * 3600,
        )?;
        range(
            "mailbox.idle_timeout_ms",
            self.mailbox.idle_timeout_ms,
            10,
            86_400_000,
        )?;
        range(
            "mailbox.sleep_after_ms",
            self.mailbox.sleep_after_ms,
            0,
            86_400_000,
        )?;
        range(
            "mailbox.cursor_flush_ms",
            self.mailbox.cursor_flush_ms,
            0,
            60_000,
        )?;
        range(
            "mailbox.tail_cache_max",
            self.mailbox.tail_cache_max,
            0,
            1_000_000,
        )
    }

    /// Whether this configuration starts a cluster member (seeds to join through, or more
    /// than one member expected) rather than a single node.
    pub fn clustered(&self) -> bool {
        self.bootstrap_expect > 1 || !self.seeds.is_empty()
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if self.clustered() && c.key_file.is_none() && !self.cluster_addr.ip().is_loopback() {
            return Err(invalid(
                "cluster.key_file",
                format!(
                    "a cluster member listening on {} (not a loopback address) needs a cluster key, or any host that reaches the port could join, publish and read: create one with `head -c 32 /dev/urandom | base64 > cluster.key`, give every node the same file with --cluster-key-file (or WARBLER_CLUSTER_KEY_FILE), and for encryption as well add mutual TLS (cluster.tls_ca_file, cluster.tls_cert_file, cluster.tls_key_file)",
                    self.cluster_addr
                ),
            ));
        }
        let set = [&c.tls_ca_file, &c.tls_cert_file, &c.tls_key_file]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if set != 0 && set != 3 {
            return Err(invalid(
                "cluster.tls_ca_file",
                "set all of cluster.tls_ca_file, cluster.tls_cert_file and cluster.tls_key_file for mutual TLS between nodes, or none of them",
            ));
        }
        if self.clustered() && self.limits.max_body_bytes > CLUSTER_BODY_BYTES_MAX {
            return Err(invalid(
                "limits.max_body_bytes",
                format!(
                    "{} is more than a cluster member allows ({CLUSTER_BODY_BYTES_MAX}): every message is replicated to the other nodes in one peer frame, and a larger body would never get there; lower limits.max_body_bytes (or WARBLER_MAX_BODY_BYTES) to at most {CLUSTER_BODY_BYTES_MAX}, or run a single node",
                    self.limits.max_body_bytes
                ),
            ));
        }
        range("cluster.replication_factor", c.replication_factor, 1, 7)?;
        range("cluster.raft_heartbeat_ms", c.raft_heartbeat_ms, 10, 10_000)?;
        range(
            "cluster.backlog_bytes_max",
            c.backlog_bytes_max,
            64 << 10,
            1 << 30,
        )?;
        if c.dead_node_timeout_ms != 0 && c.dead_node_timeout_ms < 10 * c.raft_election_timeout_ms {
            return Err(invalid(
                "cluster.dead_node_timeout_ms",
                format!(
                    "{} would remove members that are only restarting: use 0 (never) or at least 10 x cluster.raft_election_timeout_ms ({})",
                    c.dead_node_timeout_ms,
                    10 * c.raft_election_timeout_ms
                ),
            ));
        }
        if c.raft_election_timeout_ms < 3 * c.raft_heartbeat_ms
            || c.raft_election_timeout_ms > 60_000
        {
            return Err(invalid(
                "cluster.raft_election_timeout_ms",
                format!(
                    "{} must be at least 3 x cluster.raft_heartbeat_ms ({}) and at most 60000, or followers start elections while the leader is healthy",
                    c.raft_election_timeout_ms,
                    3 * c.raft_heartbeat_ms
                ),
            ));
        }
        Ok(())
    }
}

/// A node id or zone: 1..=63 letters, digits, '-', '_' or '.'.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::Invalid {
            field,
            message: format!("{value} is outside the allowed range {min}..={max}"),
        });
    }
    Ok(())
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a variable listed here whose field `set` did not know stopped the node
    /// at startup ("unknown configuration field").
    #[test]
    fn every_environment_variable_names_a_field_set_knows() {
        for (var, field) in ENV_KEYS {
            let mut c = Config::default();
            if let Err(BadValue(why)) = c.set(field, "") {
                assert!(
                    !why.contains("unknown configuration field"),
                    "{var} -> {field}: {why}"
                );
            }
        }
    }

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.client_addr.port(), 7400);
        assert_eq!(c.http_addr.port(), 7480);
        assert_eq!(c.cluster_addr.port(), 7410);
        assert_eq!(c.limits.max_frame_bytes, 1 << 20);
    }

    #[test]
    fn toml_layer_overrides_defaults_and_rejects_unknown_keys() {
        let c = Config::from_toml_str(
            "node_id = \"n1\"\n[limits]\ninflight_max = 8\n[retention]\nmax_age_secs = 5\n",
        )
        .unwrap();
        assert_eq!(c.node_id, "n1");
        assert_eq!(c.limits.inflight_max, 8);
        assert_eq!(c.retention.max_age_secs, 5);
        assert_eq!(
            c.limits.max_frame_bytes,
            1 << 20,
            "untouched fields keep defaults"
        );
        let err = Config::from_toml_str("[limits]\ninflight_maxx = 8\n").unwrap_err();
        assert!(err.to_string().contains("inflight_maxx"), "{err}");
    }

    #[test]
    fn env_layer_sets_fields_and_names_bad_values() {
        let mut c = Config::default();
        c.apply_env(vec![
            ("WARBLER_NODE_ID".into(), "pod-3".into()),
            ("WARBLER_SEEDS".into(), "a:7410, b:7410".into()),
            ("WARBLER_STORAGE_SYNC".into(), "false".into()),
            ("UNRELATED".into(), "x".into()),
        ])
        .unwrap();
        assert_eq!(c.node_id, "pod-3");
        assert_eq!(c.seeds, vec!["a:7410", "b:7410"]);
        assert!(!c.storage.sync);
        let err = c
            .apply_env(vec![("WARBLER_CLIENT_ADDR".into(), "localhost".into())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("WARBLER_CLIENT_ADDR") && err.contains("HOST:PORT"),
            "{err}"
        );
    }

    #[test]
    fn validate_names_the_field_and_the_range() {
        let mut c = Config::default();
        c.limits.inflight_max = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("limits.inflight_max") && err.contains("1..=65536"),
            "{err}"
        );

        let mut c = Config::default();
        c.limits.max_body_bytes = c.limits.max_frame_bytes;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.max_body_bytes"), "{err}");

        // A single node takes bodies up to its frame; a cluster member only what replicates.
        let mut c = Config::default();
        c.limits.max_frame_bytes = 64 << 20;
        c.limits.max_body_bytes = CLUSTER_BODY_BYTES_MAX + 1;
        c.validate().unwrap();
        c.seeds = vec!["127.0.0.1:7410".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("limits.max_body_bytes") && err.contains("peer frame"),
            "{err}"
        );
        c.limits.max_body_bytes = CLUSTER_BODY_BYTES_MAX;
        c.validate().unwrap();

        let mut c = Config::default();
        c.tls.cert_file = Some("cert.pem".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tls.key_file"));

        let c = Config {
            node_id: "bad name".into(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("node_id"));
    }

    #[test]
    fn cluster_settings_are_checked() {
        let mut c = Config::default();
        c.set("cluster.raft_heartbeat_ms", "400").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.raft_election_timeout_ms"), "{e}");
        c.set("cluster.raft_election_timeout_ms", "1200").unwrap();
        c.validate().unwrap();
        c.set("cluster.tls_ca_file", "/ca.pem").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.tls_cert_file"), "{e}");
        c.set("cluster.tls_cert_file", "/n.pem").unwrap();
        c.set("cluster.tls_key_file", "/n.key").unwrap();
        c.validate().unwrap();
        assert!(c.set("cluster.replication_factor", "three").is_err());
        c.set("cluster.dead_node_timeout_ms", "5000").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("cluster.dead_node_timeout_ms") && e.contains("12000"),
            "{e}"
        );
        c.set("cluster.dead_node_timeout_ms", "0").unwrap();
        c.validate().expect("0 never removes a member");
        c.set("cluster.zone", "eu-west-1a").unwrap();
        c.validate().unwrap();
        c.set("cluster.zone", "zone a").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.zone"), "{e}");
    }

    #[test]
    fn a_member_off_loopback_needs_a_cluster_key() {
        let mut c = Config::default();
        c.set("cluster_addr", "0.0.0.0:7410").unwrap();
        c.validate().expect("a single node needs no cluster key");
        c.set("seeds", "warbler-0.warbler:7410").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("cluster.key_file") && e.contains("--cluster-key-file"),
            "{e}"
        );
        c.set("cluster.key_file", "/etc/warbler/cluster.key")
            .unwrap();
        c.validate().unwrap();
        c.set("cluster.key_file", "").unwrap();
        c.set("cluster_addr", "127.0.0.1:7410").unwrap();
        c.validate().expect("loopback needs no cluster key");
    }

    #[test]
    fn example_file_in_the_repo_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("warbler.toml");
        let c = Config::load_file(&path).unwrap();
        c.validate().unwrap();
    }
}
