//! Logs (tracing) and metrics (Prometheus text at `/metrics`).

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use warbler_config::LogFormat;

/// How often the Prometheus recorder drains its histograms.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

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
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
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
    describe_gauge!("warbler_sessions_alive", "DeviceSession actors running");
    describe_counter!(
        "warbler_protocol_errors_total",
        "Error frames sent to devices, by code"
    );
    describe_counter!(
        "warbler_mailbox_failures_total",
        "Mailbox actors that crashed"
    );
}
