//! Logs (tracing) and metrics (Prometheus text at `/metrics`).

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use warbler_config::LogFormat;

/// How often the Prometheus recorder drains its histograms.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Open file descriptors are counted every this many upkeeps (a minute): counting lists
/// /proc/self/fd, one entry per connection, which costs a node holding 17,000 devices
/// more than everything else it does while they are idle.
const FDS_EVERY: u64 = 12;

/// Installs the log subscriber (stderr). `RUST_LOG`, when set, wins over `level`.
/// The consensus library's own logs are off unless `level` names them (e.g.
/// `info,openraft=warn`): it logs every unanswered RPC to a down peer as an error, which a
/// cluster reports better through membership events and `/v1/cluster`.
pub fn init_logs(format: LogFormat, level: &str) {
    let level = if level.contains("openraft") {
        level.to_string()
    } else {
        format!("{level},openraft=off")
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: container and file logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the metrics recorder and describes the metrics; returns the render handle.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    describe();
    let upkeep = handle.clone();
    // At once, then on the node's grid: the first scrape has them too.
    process_gauges(true);
    tokio::spawn(async move {
        let mut tick = warbler_cluster::grid::interval(METRICS_UPKEEP_INTERVAL);
        for round in 1u64.. {
            tick.tick().await;
            upkeep.run_upkeep();
            process_gauges(round % FDS_EVERY == 0);
        }
    });
    Ok(handle)
}

/// The standard `process_*` figures (as other Prometheus exporters name them), read from
/// /proc/self on Linux: CPU, memory, file descriptors against their limit.
fn process_gauges(count_fds: bool) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name (which may hold spaces), counted from field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
    metrics::gauge!("process_cpu_seconds_total").set((num(14) + num(15)) / ticks);
    metrics::gauge!("process_virtual_memory_bytes").set(num(23));
    metrics::gauge!("process_resident_memory_bytes").set(num(24) * page);
    if count_fds {
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            metrics::gauge!("process_open_fds").set(dir.count() as f64);
        }
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        metrics::gauge!("process_max_fds").set(limit.rlim_cur as f64);
    }
}

/// Counters that count rare events, exported at 0 from the start: an alert or a dashboard
/// query on them then sees 0 rather than no series until the first event.
const COUNTED_FROM_START: &[&str] = &[
    "warbler_publishes_total",
    "warbler_deliveries_total",
    "warbler_acks_total",
    "warbler_cursor_writes_total",
    "warbler_publish_errors_total",
    "warbler_publishes_rate_limited_total",
    "warbler_publish_storage_full_total",
    "warbler_publish_mailbox_full_total",
    "warbler_slow_consumers_closed_total",
    "warbler_connections_total",
    "warbler_connections_refused_total",
    "warbler_leaderships_gained_total",
    "warbler_replicas_failed_total",
    "warbler_stale_disk_wipes_total",
    "warbler_dead_members_removed_total",
    "warbler_peer_connections_refused_total",
    "warbler_peer_calls_abandoned_total",
];

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    for name in COUNTED_FROM_START {
        metrics::counter!(*name).absolute(0);
    }
    describe_gauge!(
        "warbler_cluster_members",
        "Members of the member list alive (state=up) or not (state=down) in this node's gossip view"
    );
    describe_gauge!(
        "warbler_partitions_leaderless",
        "Replicas on this node whose partition has no leader"
    );
    describe_gauge!(
        "warbler_partitions_under_replicated",
        "Partitions this node leads with fewer live voters than the replication factor"
    );
    describe_gauge!(
        "warbler_replication_lag_entries",
        "Entries the furthest-behind follower of a partition this node leads lacks"
    );
    describe_gauge!(
        "warbler_replicas_held",
        "Replicas on this node added to their groups"
    );
    describe_gauge!(
        "warbler_decommissioning",
        "1 while this node is decommissioned and still holds replicas"
    );
    describe_counter!(
        "warbler_leaderships_gained_total",
        "Partitions whose leadership came to this node"
    );
    describe_histogram!(
        "warbler_publish_seconds",
        Unit::Seconds,
        "Publish accepted by its mailbox to durable (replicated to a majority in a cluster)"
    );
    describe_histogram!(
        "warbler_delivery_seconds",
        Unit::Seconds,
        "Publish to handed to a device session, for messages under 10 s old"
    );
    describe_histogram!(
        "warbler_delivery_written_seconds",
        Unit::Seconds,
        "Publish to written to a device's socket (the oldest message of each write), for messages under 10 s old"
    );
    describe_gauge!(
        "warbler_connections",
        "Open device connections, by transport"
    );
    describe_counter!("warbler_connections_total", "Device connections accepted");
    describe_counter!("warbler_publishes_total", "Messages made durable");
    describe_counter!(
        "warbler_publish_duplicates_total",
        "Publishes answered from the dedup index"
    );
    describe_counter!(
        "warbler_publish_errors_total",
        "Publishes refused or failed"
    );
    describe_counter!(
        "warbler_deliveries_total",
        "Messages handed to device sessions"
    );
    describe_counter!("warbler_acks_total", "Cursor advances from device acks");
    describe_counter!(
        "warbler_cursor_writes_total",
        "Device cursors written to storage (at most one per device per mailbox.cursor_flush_ms)"
    );
    describe_counter!(
        "warbler_dead_members_removed_total",
        "Members removed after being unreachable for cluster.dead_node_timeout_ms"
    );
    describe_counter!(
        "warbler_stale_disk_wipes_total",
        "Data directories wiped at start because the cluster had removed their node"
    );
    describe_counter!(
        "warbler_peer_connections_refused_total",
        "Inbound cluster-port connections refused (wrong key, certificate, cluster id, version)"
    );
    describe_counter!(
        "warbler_peer_calls_abandoned_total",
        "Calls to peers not sent because their caller had stopped waiting (timed out while queued)"
    );
    describe_counter!(
        "warbler_peer_requests_total",
        "Requests served for peers, by kind (append_entries, publish, deliver, ack, ...)"
    );
    describe_counter!(
        "warbler_raft_appends_received_total",
        "AppendEntries received as a follower, carrying entries or nothing (a heartbeat or a commit index)"
    );
    describe_counter!("warbler_fsync_batches_total", "Synced write batches");
    describe_histogram!(
        "warbler_fsync_batch_records",
        "Records per synced write batch"
    );
    describe_histogram!(
        "warbler_fsync_seconds",
        Unit::Seconds,
        "Time to write and fsync one batch"
    );
    describe_gauge!("warbler_mailboxes_alive", "UserMailbox actors running");
    describe_gauge!(
        "warbler_mailboxes_asleep",
        "mailboxes asleep with devices subscribed (woken by the next request)"
    );
    describe_counter!(
        "warbler_mailbox_sleeps_total",
        "times a mailbox went to sleep, every delivery acknowledged"
    );
    describe_gauge!("warbler_sessions_alive", "device sessions connected");
    describe_counter!(
        "warbler_protocol_errors_total",
        "Error frames sent to devices, by code"
    );
    describe_counter!(
        "warbler_mailbox_failures_total",
        "Mailbox actors that crashed"
    );
}
