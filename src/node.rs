//! Starting and stopping one node: storage, the committer, the mailbox registry, the
//! client and HTTP listeners, the retention sweeper.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ractor::concurrency::JoinHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use warbler_actors::{MailboxLimits, Mailboxes, RegistryArgs, RouteService, Routing};
use warbler_cluster::{ClusterNode, LeaderChange};
use warbler_config::Config;
use warbler_storage::{
    now_ms, Committer, CommitterLimits, LocalLog, PartitionId, PartitionLog, RetentionPolicy, Store,
};

use crate::auth::Auth;
use crate::gateway::{tcp, Gateway};
use crate::http::{self, AppState, NodeAddrs, NodeView, SingleNode};
use crate::listener::{serve_http, HttpBounds};

/// Partitions of a cluster created by this version (fixed when the cluster is created).
pub const PARTITIONS: u16 = 64;
/// How often `auth.keys_dir` is re-read.
const KEYS_RELOAD: Duration = Duration::from_secs(2);
/// How long a draining node waits for connections to say bye and writes to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Runs a node until `shutdown` is cancelled (SIGTERM / Ctrl-C in `main`).
pub async fn run(
    config: Config,
    auth: Auth,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    arm_chaos_bug(&config)?;
    let store = Store::open(&config.data_dir.join("db"))?;
    let disk = crate::disk::DiskSpace::new(
        &config.data_dir,
        config.storage.min_free_bytes,
        Some(store.clone()),
    );
    tokio::spawn(disk.clone().watch(shutdown.clone()));
    crate::capacity::report(config.limits.connections_max);
    if !config.storage.sync {
        tracing::warn!("storage.sync = false: acknowledged messages can be lost on power failure");
    }
    let client = TcpListener::bind(config.client_addr).await.with_context(|| format!("cannot listen on client_addr {}; is another process using it? pick another with --client-addr", config.client_addr))?;
    let http_listener = TcpListener::bind(config.http_addr).await.with_context(|| format!("cannot listen on http_addr {}; is another process using it? pick another with --http-addr", config.http_addr))?;
    let mut addrs = NodeAddrs {
        client: client.local_addr()?,
        http: http_listener.local_addr()?,
        cluster: config.cluster_addr,
    };
    // A cluster of one is the single-node mode: no consensus, the group committer writes.
    let clustered = config.clustered();
    let parts = if clustered {
        start_clustered(&config, &store, &mut addrs).await?
    } else {
        start_single(&config, &store, addrs).await?
    };
    let gw = Arc::new(Gateway {
        node_id: config.node_id.clone(),
        auth: Arc::new(auth),
        mailboxes: parts.mailboxes.clone(),
        limits: config.limits.clone(),
        rates: crate::rate::PublishLimits::new(&config.limits),
        disk: disk.clone(),
        slots: Arc::new(Semaphore::new(config.limits.connections_max as usize)),
        shutdown: shutdown.clone(),
        bye: CancellationToken::new(),
    });
    let tls = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(c), Some(k)) => Some(tcp::tls_acceptor(c, k)?),
        _ => None,
    };
    let io_threads = crate::gateway::io::io_thread_count(config.limits.io_threads);
    let io = Arc::new(
        crate::gateway::io::IoThreads::start(io_threads)
            .context("cannot start the threads that serve the client port")?,
    );
    let client_task = tokio::spawn(tcp::serve(client, gw.clone(), tls.clone(), io.clone()));
    let app = http::router(AppState {
        gw: gw.clone(),
        store: store.clone(),
        view: parts.view.clone(),
        log: parts.log.clone(),
        metrics,
        metrics_need_token: config.auth.metrics_require_token,
        demo: config.demo,
    });
    let http_shutdown = shutdown.clone();
    let bounds = HttpBounds {
        connections_max: config.limits.http_connections_max as usize,
        header_timeout: Duration::from_millis(config.limits.http_header_timeout_ms),
        tls_handshake_timeout: Duration::from_millis(config.limits.tls_handshake_timeout_ms),
        keepalive_idle: crate::listener::keepalive_idle(config.limits.ping_interval_ms),
    };
    let http_tls = tls.clone().filter(|_| config.tls.http);
    let http_task = tokio::spawn(async move {
        serve_http(http_listener, app, bounds, http_tls, http_shutdown).await
    });
    let sweeper = tokio::spawn(sweep_retention(store.clone(), config.clone()));
    tokio::spawn(
        gw.auth
            .clone()
            .keep_keys_fresh(KEYS_RELOAD, shutdown.clone()),
    );
    let (limits_gw, limits_stop) = (gw.clone(), shutdown.clone());
    tokio::spawn(async move {
        let mut tick = warbler_cluster::grid::interval(Duration::from_secs(60));
        while limits_stop.run_until_cancelled(tick.tick()).await.is_some() {
            limits_gw.rates.forget_idle();
        }
    });

    tracing::info!(node = %config.node_id, client = %addrs.client, http = %addrs.http, tls = tls.is_some(), http_tls = config.tls.http, clustered, io_threads, allocator = crate::alloc::name(), huge_pages = crate::alloc::huge_pages(), drain_budget_ms = drain_budget(&config).as_millis() as u64, data_dir = %config.data_dir.display(), "warbler node ready");
    // A machine-readable line for scripts and tests that start the node on port 0.
    println!(
        "warbler ready node={} client={} http={} cluster={}",
        config.node_id, addrs.client, addrs.http, addrs.cluster
    );
    let form_failed = form(&config, &store, &parts, &shutdown).await;
    // Draining: `/readyz` fails and no connection is accepted from here on.
    if let Some((node, _)) = &parts.cluster {
        let budget = handover_budget(&config);
        tracing::info!(
            budget_ms = budget.as_millis() as u64,
            "draining: not ready; handing leaderships over"
        );
        let (led, kept) = node.hand_over(budget).await;
        tracing::info!(
            led,
            handed_over = led - kept,
            "draining: leaderships handed over"
        );
    }
    let lame_duck = Duration::from_millis(config.limits.lame_duck_ms);
    tracing::info!(
        lame_duck_ms = config.limits.lame_duck_ms,
        "draining: saying bye to connections over the lame-duck window"
    );
    gw.bye.cancel();
    let _ = client_task.await;
    // Every connection holds a slot until it closes: all slots back means all said bye.
    let all = config.limits.connections_max;
    let _ = tokio::time::timeout(lame_duck + DRAIN_GRACE, gw.slots.acquire_many(all)).await;
    let _ = tokio::time::timeout(DRAIN_GRACE, http_task).await;
    sweeper.abort();
    parts.mailboxes.stop();
    let _ = tokio::time::timeout(DRAIN_GRACE, parts.registry).await;
    if let Some((node, _)) = &parts.cluster {
        let _ = tokio::time::timeout(DRAIN_GRACE, node.shutdown()).await;
    }
    io.stop();
    tracing::info!("stopped");
    form_failed.map_or(Ok(()), Err)
}

/// How long a draining node waits for the groups it leads to elect another leader: a few
/// election timeouts (a follower refuses votes for one after the last heartbeat).
pub fn handover_budget(config: &Config) -> Duration {
    Duration::from_millis(config.cluster.raft_election_timeout_ms * 3)
}

/// The longest a node takes to stop after SIGTERM, when nothing hangs: the handover, the
/// lame-duck window, and the grace periods of the steps after it. A supervisor's grace
/// period (Kubernetes' `terminationGracePeriodSeconds`, Compose's `stop_grace_period`) must
/// be longer.
pub fn drain_budget(config: &Config) -> Duration {
    handover_budget(config) + Duration::from_millis(config.limits.lame_duck_ms) + DRAIN_GRACE * 4
}

/// What a node runs on: its mailboxes, the view `/v1/cluster` and `/readyz` read, and in a
/// cluster the cluster side and the routing through it.
struct Parts {
    mailboxes: Mailboxes,
    registry: JoinHandle<()>,
    view: Arc<dyn NodeView>,
    log: Arc<dyn PartitionLog>,
    cluster: Option<(Arc<ClusterNode>, Arc<Routing>)>,
}

/// `WARBLER_CHAOS_BUG`: a deliberate bug for the chaos harness, on fault-injection nodes only.
fn arm_chaos_bug(config: &Config) -> anyhow::Result<()> {
    let Ok(name) = std::env::var("WARBLER_CHAOS_BUG") else {
        return Ok(());
    };
    let bug = warbler_actors::bugs::Bug::parse(&name)?;
    if bug != warbler_actors::bugs::Bug::None {
        anyhow::ensure!(
            config.cluster.fault_injection,
            "WARBLER_CHAOS_BUG={name} breaks this node on purpose and is for the chaos harness only; it needs cluster.fault_injection = true (WARBLER_FAULT_INJECTION=true), or unset WARBLER_CHAOS_BUG"
        );
        tracing::error!(
            ?bug,
            "WARBLER_CHAOS_BUG: this node breaks an invariant on purpose"
        );
        warbler_actors::bugs::set(bug);
    }
    Ok(())
}

fn mailbox_limits(config: &Config) -> MailboxLimits {
    MailboxLimits {
        inflight_max: config.limits.inflight_max,
        tail_cache_max: config.mailbox.tail_cache_max,
        idle_timeout: Duration::from_millis(config.mailbox.idle_timeout_ms),
        sleep_after: Duration::from_millis(config.mailbox.sleep_after_ms),
        cursor_flush: Duration::from_millis(config.mailbox.cursor_flush_ms),
        unacked_max: config.retention.max_messages_per_user,
    }
}

/// A member of a cluster: the cluster side, mailboxes over its replicated log, and routing
/// to other nodes' partitions.
async fn start_clustered(
    config: &Config,
    store: &Store,
    addrs: &mut NodeAddrs,
) -> anyhow::Result<Parts> {
    let node = ClusterNode::start(config, store, addrs.client, addrs.http, PARTITIONS).await?;
    addrs.cluster = node.transport().local_addr();
    let (mailboxes, registry) = Mailboxes::start(RegistryArgs {
        store: store.clone(),
        log: node.raft_log().clone(),
        limits: mailbox_limits(config),
        partitions: PARTITIONS,
    })
    .await?;
    let routing = Arc::new(Routing::new(
        node.clone(),
        node.name().to_string(),
        node.cluster_addr(),
    ));
    routing.set_transport(node.transport().clone());
    let mailboxes = mailboxes.with_routing(routing.clone());
    node.serve_routes(Arc::new(RouteService {
        mailboxes: mailboxes.clone(),
        routing: routing.clone(),
    }));
    Ok(Parts {
        mailboxes,
        registry,
        view: node.clone(),
        log: node.raft_log().clone(),
        cluster: Some((node, routing)),
    })
}

/// A node on its own: the group committer writes every partition.
async fn start_single(config: &Config, store: &Store, addrs: NodeAddrs) -> anyhow::Result<Parts> {
    let s = &config.storage;
    let committer = Committer::start(
        store.clone(),
        CommitterLimits {
            batch_records_max: s.batch_records_max,
            batch_bytes_max: s.batch_bytes_max,
            queue_max: s.queue_max,
            sync: s.sync,
        },
    );
    let log = LocalLog::new(committer);
    let (mailboxes, registry) = Mailboxes::start(RegistryArgs {
        store: store.clone(),
        log: Arc::new(log.clone()),
        limits: mailbox_limits(config),
        partitions: PARTITIONS,
    })
    .await?;
    let view = Arc::new(SingleNode {
        log: log.clone(),
        node_id: config.node_id.clone(),
        addrs,
        partitions: PARTITIONS,
    });
    Ok(Parts {
        mailboxes,
        registry,
        view,
        log: Arc::new(log),
        cluster: None,
    })
}

/// In a cluster the node serves at once (requests wait for leaders) and forms or rejoins
/// the cluster meanwhile; `/readyz` says when it is done. Returns when `shutdown` is
/// cancelled, or at once with the error when forming failed (after cancelling it).
async fn form(
    config: &Config,
    store: &Store,
    parts: &Parts,
    shutdown: &CancellationToken,
) -> Option<anyhow::Error> {
    if let Some((node, routing)) = &parts.cluster {
        node.refresh_seeds(config.seeds.clone(), store);
        tokio::select! {
            formed = node.form(config, store) => match formed {
                Ok(()) => {
                    let (mailboxes, routing) = (parts.mailboxes.clone(), routing.clone());
                    let log = parts.log.clone();
                    node.watch_leaders(move |c: LeaderChange| {
                        if c.was_local {
                            mailboxes.stop_partition(c.partition);
                        }
                        if c.now_local {
                            settle(log.clone(), c.partition);
                        }
                        routing.leader_changed(c.partition);
                    });
                    // Fail fast: a replica whose storage failed stays stopped, so the node
                    // exits (non-zero) for its supervisor to restart it.
                    tokio::select! {
                        why = node.failed() => {
                            shutdown.cancel();
                            return Some(anyhow::anyhow!("{why}; exiting so that the node restarts (free disk space first if the disk is full)"));
                        }
                        _ = shutdown.cancelled() => return None,
                    }
                }
                Err(e) => {
                    shutdown.cancel();
                    return Some(e.into());
                }
            },
            _ = shutdown.cancelled() => {}
        }
    }
    shutdown.cancelled().await;
    None
}

/// Settles a partition this node just came to lead, in the background: its read barrier
/// runs now rather than in the first mailbox start of the new leadership, which would hold
/// up every other start on the node meanwhile (a fan-out to a partition's users, or the
/// first publishes after a failover, would wait for one barrier per partition in turn).
/// A barrier that fails (the leadership moved on) leaves the partition to the next start.
fn settle(log: Arc<dyn PartitionLog>, partition: PartitionId) {
    tokio::spawn(async move {
        if log.settled(partition) {
            return;
        }
        if let Err(e) = log.barrier(partition).await {
            tracing::debug!(partition, error = %e, "a new leadership not settled in advance; the first mailbox start settles it");
        }
    });
}

/// Applies retention to every user, every `retention.sweep_interval_secs`.
async fn sweep_retention(store: Store, config: Config) {
    let r = &config.retention;
    let policy = RetentionPolicy {
        max_messages: r.max_messages_per_user,
        max_age_ms: r.max_age_secs.saturating_mul(1000),
        dedup_window_ms: r.dedup_window_secs.saturating_mul(1000),
    };
    let mut tick = warbler_cluster::grid::interval(Duration::from_secs(r.sweep_interval_secs));
    loop {
        tick.tick().await;
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.sweep(&policy, now_ms())).await {
            Ok(Ok(report)) if report.messages + report.dedup_records > 0 => {
                tracing::info!(
                    users = report.users,
                    messages = report.messages,
                    dedup = report.dedup_records,
                    "retention sweep"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "retention sweep failed"),
            Err(e) => tracing::warn!(error = %e, "retention sweep panicked"),
        }
    }
}
