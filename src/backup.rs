//! Backup and restore of a whole cluster (or a single node), online, over the HTTP API.
//!
//! A backup is a directory: `manifest.json` and one file per partition (`p00007.bin`), the
//! MessagePack of a [`PartitionBackup`]: every row of the partition's replicated state
//! (messages, dedup records, heads, cursors), read by the partition's leader from one
//! database snapshot, so each partition is consistent at one applied index (in the
//! manifest, with the file's SHA-256). Publishes go on meanwhile; what was acknowledged
//! before the backup began is in it.
//!
//! A restore checks every file against the manifest first, then writes each partition's
//! rows into a new, empty cluster (or node) through its leader, in chunks, as consensus
//! entries: every replica gets them, and a message keeps its `seq` and id (a publish
//! retried with the same id after the restore answers the original `seq`); device cursors
//! come back with them. The new cluster keeps its own cluster id. A partition that holds
//! data is refused unless the restore resumes an interrupted one (`--resume`: rows are
//! written again, which changes nothing).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use clap::Args;
use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use warbler_client::api::ClusterStatus;
use warbler_client::http::NodeHttp;
use warbler_storage::{Op, PartitionId, Row, Store};

use crate::auth::Scope;
use crate::cli::{Ops, OpsArgs};
use crate::http::{claims, ApiError, ApiResult, AppState};

/// The format of the files this build writes and reads.
pub const FORMAT: u32 = 1;
/// Rows of one restore request (and one consensus entry), in bytes; at least one row.
const CHUNK_BYTES: usize = 512 * 1024;
/// Largest restore request body (a chunk plus one row as large as a message may be).
pub const RESTORE_BODY_MAX: usize = 16 << 20;
/// How long the command keeps asking for a partition whose leader moves or is elected.
const LEADER_WAIT: Duration = Duration::from_secs(60);

/// One partition, as its file holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PartitionBackup {
    pub format: u32,
    pub partition: PartitionId,
    /// The consensus log position (term, index) the rows are the state at (none on a
    /// single node).
    pub applied: Option<(u64, u64)>,
    pub rows: Vec<Row>,
}

/// One restore request: rows of one partition.
#[derive(Debug, Serialize, Deserialize)]
pub struct RestoreChunk {
    /// The first chunk of a restore that does not resume: the partition must be empty.
    pub fresh: bool,
    pub rows: Vec<Row>,
}

/// `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// When the backup began (milliseconds since the epoch).
    pub started_ms: u64,
    pub finished_ms: u64,
    /// The id of the cluster backed up (none for a single node).
    pub cluster_id: Option<String>,
    pub partition_count: u16,
    pub partitions: Vec<ManifestEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub partition: PartitionId,
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    pub rows: u64,
    /// Users with a head (at least one message ever).
    pub users: u64,
    pub messages: u64,
    pub applied_term: Option<u64>,
    pub applied_index: Option<u64>,
}

/// `GET /v1/admin/partitions/{p}/backup` (admin): the partition's rows, from the leader.
pub async fn backup_partition(
    State(state): State<AppState>,
    UrlPath(partition): UrlPath<PartitionId>,
    headers: HeaderMap,
) -> ApiResult {
    claims(&state, &headers, Scope::Admin)?;
    leads(&state, partition)?;
    let store = state.store.clone();
    let (rows, applied) = tokio::task::spawn_blocking(move || {
        store.backup_partition(partition, Some(warbler_cluster::raft_store::APPLIED_KEY))
    })
    .await
    .map_err(|e| ApiError::internal(format!("backup task failed: {e}")))?
    .map_err(|e| ApiError::internal(format!("cannot read partition {partition}: {e}")))?;
    let mut rows = rows;
    if warbler_actors::bugs::on(warbler_actors::bugs::Bug::BackupWithoutCursors) {
        rows.retain(|r| r.cf != "cursors");
    }
    let backup = PartitionBackup {
        format: FORMAT,
        partition,
        applied: applied.and_then(|b| warbler_cluster::raft_store::applied_position(&b)),
        rows,
    };
    let body = rmp_serde::to_vec_named(&backup).expect("backup serialization is infallible");
    Ok(([("content-type", "application/msgpack")], body).into_response())
}

/// `POST /v1/admin/partitions/{p}/restore` (admin): writes a [`RestoreChunk`] through the
/// partition's log; answers once every replica it needs has it.
pub async fn restore_partition(
    State(state): State<AppState>,
    UrlPath(partition): UrlPath<PartitionId>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    claims(&state, &headers, Scope::Admin)?;
    leads(&state, partition)?;
    let chunk: RestoreChunk = rmp_serde::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not a restore chunk ({e}); use `warbler restore`"
        ))
    })?;
    Store::check_rows(partition, &chunk.rows).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if chunk.fresh {
        let empty = state
            .store
            .partition_is_empty(partition)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if !empty {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_empty",
                format!("partition {partition} of this cluster holds messages or cursors: restore into a new, empty cluster (or pass --resume to finish a restore that was interrupted)"),
            ));
        }
    }
    let rows = chunk.rows.len();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done = Box::new(move |r| {
        let _ = tx.send(r);
    });
    let op = Op::Restore {
        partition,
        rows: chunk.rows,
    };
    let refused = |e: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("partition {partition}: {e}; retry"),
        )
    };
    state
        .log
        .propose(partition, vec![op], Some(done))
        .await
        .map_err(|e| refused(e.to_string()))?;
    rx.await
        .map_err(|_| refused("the write was dropped".into()))?
        .map_err(|e| refused(e.to_string()))?;
    // A mailbox started before the restore read the old (empty) head: it starts again.
    state.gw.mailboxes.stop_partition(partition);
    Ok(axum::Json(serde_json::json!({ "partition": partition, "rows": rows })).into_response())
}

/// This node may write `partition` now (it leads it), or the refusal naming the fix.
fn leads(state: &AppState, partition: PartitionId) -> Result<(), ApiError> {
    if partition >= crate::node::PARTITIONS {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_partition",
            format!(
                "there is no partition {partition}; partitions are 0..{}",
                crate::node::PARTITIONS
            ),
        ));
    }
    match state.log.leader_term(partition) {
        Some(_) => Ok(()),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_leader",
            format!("this node does not lead partition {partition} now; ask its leader (GET /v1/cluster names it)"),
        )),
    }
}

#[derive(Args)]
pub struct BackupArgs {
    /// The directory to write (created; must be empty or absent). `{time}` in it is
    /// replaced by the start time, UTC (`20261201T031500Z`): one directory per run.
    #[arg(long)]
    out: String,
    /// With `{time}` in --out: keep this many finished backups beside the new one's
    /// directory (the newest) and delete older ones; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    keep: usize,
    #[command(flatten)]
    ops: OpsArgs,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The backup directory (`warbler backup --out`).
    #[arg(long)]
    from: PathBuf,
    /// Finish a restore that was interrupted: partitions that hold data are written again.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    ops: OpsArgs,
}

/// `warbler backup --out DIR`.
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let ops = args.ops.connect_as("admin")?;
    let started_ms = warbler_storage::now_ms();
    let out = PathBuf::from(args.out.replace("{time}", &utc_stamp(started_ms)));
    if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
        bail!(
            "{} is not empty: give a new directory for the backup",
            out.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let t0 = Instant::now();
    let status = ops.node.cluster_status().await?;
    let mut manifest = Manifest {
        format: FORMAT,
        started_ms,
        finished_ms: 0,
        cluster_id: status.cluster_id.clone(),
        partition_count: status.partition_count,
        partitions: Vec::new(),
    };
    let mut total = 0u64;
    for p in 0..status.partition_count {
        let bytes = at_leader(&ops, p, |node| async move {
            let answer = node
                .send_bytes(
                    "GET",
                    &format!("/v1/admin/partitions/{p}/backup"),
                    Vec::new(),
                )
                .await?;
            Ok(answer)
        })
        .await?;
        let backup: PartitionBackup = rmp_serde::from_slice(&bytes)
            .with_context(|| format!("partition {p}: the answer is not a partition backup"))?;
        let file = format!("p{p:05}.bin");
        std::fs::write(out.join(&file), &bytes).with_context(|| format!("cannot write {file}"))?;
        total += bytes.len() as u64;
        manifest.partitions.push(ManifestEntry {
            partition: p,
            file,
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
            rows: backup.rows.len() as u64,
            users: backup.rows.iter().filter(|r| r.cf == "heads").count() as u64,
            messages: backup.rows.iter().filter(|r| r.cf == "msgs").count() as u64,
            applied_term: backup.applied.map(|a| a.0),
            applied_index: backup.applied.map(|a| a.1),
        });
    }
    manifest.finished_ms = warbler_storage::now_ms();
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialization");
    // The manifest last: a directory without one is an unfinished backup.
    std::fs::write(out.join("manifest.json"), json)?;
    let secs = t0.elapsed().as_secs_f64();
    let users: u64 = manifest.partitions.iter().map(|e| e.users).sum();
    let messages: u64 = manifest.partitions.iter().map(|e| e.messages).sum();
    println!(
        "backed up {} partitions ({users} users, {messages} messages, {:.1} MB) to {} in {secs:.1} s ({:.1} MB/s)",
        manifest.partitions.len(),
        total as f64 / 1e6,
        out.display(),
        total as f64 / 1e6 / secs.max(1e-3)
    );
    if args.keep > 0 && args.out.contains("{time}") {
        if let Some(parent) = out.parent() {
            for old in older_backups(parent, args.keep)? {
                std::fs::remove_dir_all(&old)
                    .with_context(|| format!("cannot delete the old backup {}", old.display()))?;
                println!("deleted the old backup {}", old.display());
            }
        }
    }
    Ok(())
}

/// The finished backups (directories with a manifest) in `dir` beyond the newest `keep`,
/// by name (the `{time}` stamps sort by time).
fn older_backups(dir: &Path, keep: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    found.sort();
    let old = found.len().saturating_sub(keep);
    found.truncate(old);
    Ok(found)
}

/// `ms` since the epoch as `YYYYMMDDTHHMMSSZ`, UTC.
fn utc_stamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// `warbler restore --from DIR`.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let ops = args.ops.connect_as("admin")?;
    let manifest = check_backup(&args.from)?;
    let status = ops.node.cluster_status().await?;
    if status.partition_count != manifest.partition_count {
        bail!(
            "the backup has {} partitions and this cluster {}: it restores only into a cluster of the same partition count",
            manifest.partition_count,
            status.partition_count
        );
    }
    if status.cluster_id.is_some() && status.cluster_id == manifest.cluster_id {
        bail!("this is the cluster the backup was taken from: restore into a new, empty cluster");
    }
    let t0 = Instant::now();
    let mut total = 0u64;
    for entry in &manifest.partitions {
        let bytes = std::fs::read(args.from.join(&entry.file))?;
        total += bytes.len() as u64;
        let backup: PartitionBackup = rmp_serde::from_slice(&bytes)
            .with_context(|| format!("{} is not a partition backup", entry.file))?;
        let p = backup.partition;
        for (i, rows) in chunks(backup.rows).into_iter().enumerate() {
            let chunk = RestoreChunk {
                fresh: i == 0 && !args.resume,
                rows,
            };
            let body = rmp_serde::to_vec_named(&chunk).expect("chunk serialization");
            at_leader(&ops, p, |node| {
                let body = body.clone();
                async move {
                    let answer = node
                        .send_bytes("POST", &format!("/v1/admin/partitions/{p}/restore"), body)
                        .await?;
                    Ok(answer)
                }
            })
            .await?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let messages: u64 = manifest.partitions.iter().map(|e| e.messages).sum();
    println!(
        "restored {} partitions ({messages} messages, {:.1} MB) from {} in {secs:.1} s ({:.1} MB/s)",
        manifest.partitions.len(),
        total as f64 / 1e6,
        args.from.display(),
        total as f64 / 1e6 / secs.max(1e-3)
    );
    Ok(())
}

/// Reads the manifest and checks every file it names against its size and SHA-256.
pub fn check_backup(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}: not a backup directory, or the backup did not finish",
            path.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a backup manifest", path.display()))?;
    if manifest.format != FORMAT {
        bail!(
            "the backup is in format {} and this build reads format {FORMAT}",
            manifest.format
        );
    }
    for e in &manifest.partitions {
        let bytes = std::fs::read(dir.join(&e.file))
            .with_context(|| format!("cannot read {} (named in the manifest)", e.file))?;
        if bytes.len() as u64 != e.bytes || sha256_hex(&bytes) != e.sha256 {
            bail!(
                "{} does not match the manifest (size or SHA-256): the backup is damaged; nothing was restored",
                e.file
            );
        }
    }
    Ok(manifest)
}

fn sha256_hex(bytes: &[u8]) -> String {
    digest(&SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `rows` in chunks of about [`CHUNK_BYTES`], at least one row each; none for no rows.
fn chunks(rows: Vec<Row>) -> Vec<Vec<Row>> {
    let mut out = Vec::new();
    let (mut cur, mut size) = (Vec::new(), 0);
    for r in rows {
        let n = r.cf.len() + r.key.len() + r.value.len() + 16;
        if !cur.is_empty() && size + n > CHUNK_BYTES {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += n;
        cur.push(r);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Runs `call` at the node that leads `partition`, asking `GET /v1/cluster` again when the
/// leader moved or is being elected, for up to [`LEADER_WAIT`].
async fn at_leader<F, Fut>(ops: &Ops, partition: PartitionId, call: F) -> anyhow::Result<Vec<u8>>
where
    F: Fn(NodeHttp) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(u16, Vec<u8>)>>,
{
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        let why = match leader_http(ops, partition).await {
            Ok(node) => match call(node).await {
                Ok((200, body)) => return Ok(body),
                Ok((status, body)) => {
                    let text = String::from_utf8_lossy(&body).into_owned();
                    // A moved leader, or one being elected, is asked again; the rest is final.
                    let again = (status == 409 && text.contains("not_leader")) || status == 503;
                    if !again {
                        bail!("partition {partition}: {status} {text}");
                    }
                    text
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("partition {partition}: no leader answered within {LEADER_WAIT:?} ({why}); check `warbler cluster status` and run the command again");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A client for the node that leads `partition`, as the cluster says now.
async fn leader_http(ops: &Ops, partition: PartitionId) -> anyhow::Result<NodeHttp> {
    let status: ClusterStatus = ops.node.cluster_status().await?;
    let leader = status
        .partitions
        .iter()
        .find(|p| p.partition == partition)
        .and_then(|p| p.leader.clone())
        .with_context(|| format!("partition {partition} has no leader now"))?;
    let addr = status
        .member(&leader)
        .and_then(|m| m.http_addr.clone())
        .with_context(|| {
            format!("the leader of partition {partition}, {leader}, has no known HTTP address")
        })?;
    ops.client(&addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    fn row(len: usize) -> Row {
        Row {
            cf: "msgs".into(),
            key: ByteBuf::from(vec![0, 1]),
            value: ByteBuf::from(vec![7; len]),
        }
    }

    #[test]
    fn stamps_are_utc_and_old_backups_beyond_keep_are_found_oldest_first() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400_000), "20000229T000000Z");
        assert_eq!(utc_stamp(1_796_094_645_000), "20261201T031045Z");
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "20261128T0300Z",
            "20261129T0300Z",
            "20261130T0300Z",
            "unfinished",
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            if name != "unfinished" {
                std::fs::write(dir.path().join(name).join("manifest.json"), "{}").unwrap();
            }
        }
        let old = older_backups(dir.path(), 2).unwrap();
        assert_eq!(old, [dir.path().join("20261128T0300Z")]);
        assert!(older_backups(dir.path(), 5).unwrap().is_empty());
    }

    #[test]
    fn rows_are_cut_into_chunks_by_bytes_and_a_large_row_goes_alone() {
        assert!(chunks(Vec::new()).is_empty());
        let small: Vec<Row> = (0..1000).map(|_| row(2000)).collect();
        let cut = chunks(small);
        assert_eq!(cut.iter().map(Vec::len).sum::<usize>(), 1000);
        assert!(cut.len() >= 4, "{} chunks", cut.len());
        for c in &cut {
            let bytes: usize = c.iter().map(|r| r.value.len() + 20).sum();
            assert!(bytes <= CHUNK_BYTES, "{bytes}");
        }
        let big = chunks(vec![row(10), row(CHUNK_BYTES * 2), row(10)]);
        assert_eq!(big.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
    }

    #[test]
    fn a_damaged_or_unfinished_backup_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_backup(dir.path()).unwrap_err().to_string();
        assert!(e.contains("did not finish"), "{e}");
        let bytes = b"partition bytes".to_vec();
        let manifest = Manifest {
            format: FORMAT,
            started_ms: 1,
            finished_ms: 2,
            cluster_id: None,
            partition_count: 1,
            partitions: vec![ManifestEntry {
                partition: 0,
                file: "p00000.bin".into(),
                sha256: sha256_hex(&bytes),
                bytes: bytes.len() as u64,
                rows: 0,
                users: 0,
                messages: 0,
                applied_term: None,
                applied_index: None,
            }],
        };
        std::fs::write(
            dir.path().join("manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("p00000.bin"), &bytes).unwrap();
        check_backup(dir.path()).unwrap();
        std::fs::write(dir.path().join("p00000.bin"), b"partition bytez").unwrap();
        let e = check_backup(dir.path()).unwrap_err().to_string();
        assert!(e.contains("p00000.bin") && e.contains("damaged"), "{e}");
    }
}
