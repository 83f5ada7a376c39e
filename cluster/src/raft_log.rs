//! The replicated [`PartitionLog`]: entries go through each partition's Raft group, so an
//! entry is durable once a majority of the partition's replicas have it, and only the
//! partition's leader can write.
//!
//! Ordering, as the trait promises: `propose` queues the entry on the partition's proposer
//! before it returns, so entries proposed one after another enter the log in that order.
//! The proposer hands Raft whatever has queued up as one log entry (up to
//! [`BATCH_OPS_MAX`] ops and [`BATCH_BYTES_MAX`] bytes). At most [`ENTRIES_IN_FLIGHT`]
//! entries of a partition are in Raft at once: while they are, new proposals queue, and
//! the next entry takes all of them. So under load many publishes and acks share one entry,
//! one append and one fsync per replica, and the batch grows with the load; an idle
//! partition still sends its first proposal at once. One completion task per partition
//! awaits the answers first in, first out, so `done` callbacks run in log order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use warbler_storage::log::BoxFuture;
use warbler_storage::{Done, Op, PartitionId, PartitionLog, StorageError};

use crate::raft_store::{Batch, TypeConfig};

/// Most ops merged into one log entry.
pub const BATCH_OPS_MAX: usize = 512;
/// Most bytes of ops merged into one log entry. One proposal larger than this still goes,
/// alone. With [`APPEND_BYTES_MAX`] it keeps an AppendEntries well inside the peer frame
/// limit; small enough that a leader's append does not hold up the next one for long.
pub const BATCH_BYTES_MAX: usize = 256 * 1024;

/// Entries of one partition handed to Raft and not yet answered. Every entry costs each
/// replica an append, an AppendEntries round and an apply, whatever it holds, so a queue of
/// small entries in openraft costs a round each; queued here instead, they become one
/// entry. Two keep the leader appending the next entry while the last one replicates.
pub const ENTRIES_IN_FLIGHT: usize = 2;

/// How long cursor moves with nothing else to propose wait for a publish to share their
/// entry. A crash may lose this much of a device's acks: they come again (at least once).
pub const CURSOR_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Most bytes of entries one AppendEntries carries: replication's log reader stops once it
/// has read this much (an entry larger than this still goes, alone). An entry holds at most
/// `max(BATCH_BYTES_MAX, one proposal)`, so a request stays well inside the peer frame
/// limit, and a follower catching up in every partition at once writes and syncs at most
/// this much per partition per round trip.
pub const APPEND_BYTES_MAX: usize = 1 << 20;

// The largest body a cluster member accepts, in an entry read after a full request's worth
// of others, still fits one peer frame (with room for the request's other fields).
const _: () = assert!(
    APPEND_BYTES_MAX + warbler_config::CLUSTER_BODY_BYTES_MAX + (1 << 20)
        <= crate::transport::PEER_FRAME_BYTES_MAX
);

/// Most entries one AppendEntries carries. A follower that comes back behind gets its
/// missed entries this many at a time per round trip (while they stay under
/// [`APPEND_BYTES_MAX`]): under load an entry holds a few publishes, and the count, not the
/// bytes, would bound catch-up.
pub const APPEND_ENTRIES_MAX: u64 = 1024;

type Answer = openraft::raft::responder::OneshotResponder<TypeConfig>;
type Receiver = <Answer as openraft::raft::responder::Responder<TypeConfig>>::Receiver;
/// One entry handed to Raft (or refused before it got there), with its proposers' callbacks,
/// its bytes and its place among the entries in flight.
type Pending = (
    Result<Receiver, StorageError>,
    Vec<Option<Done>>,
    usize,
    OwnedSemaphorePermit,
);

/// How long a writer waits for its leader's log to be applied before it gives up.
const BARRIER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct Group {
    raft: Raft<TypeConfig>,
    /// Proposals waiting to become an entry. Unbounded on purpose: bounded by the
    /// mailboxes' own limits upstream.
    proposals: mpsc::UnboundedSender<Proposal>,
    /// A proposal arrived since the quiescence driver last looked (it woke the group).
    poked: AtomicBool,
    /// Bytes of ops proposed and not yet durable (or failed).
    backlog_bytes: Arc<AtomicUsize>,
    /// The term in which this replica last confirmed its leadership with a quorum (0:
    /// never): later barriers in that term only wait for the local apply.
    confirmed_term: AtomicU64,
    /// The term in which a barrier last completed on this replica as the leader (0: none):
    /// see [`PartitionLog::settled`].
    settled_term: AtomicU64,
    /// While any [`Hold`] lives, proposals queue instead of becoming entries (a leadership
    /// transfer, a drain): how many live.
    held: Arc<watch::Sender<usize>>,
}

impl Group {
    /// Ticks again if quiet, and tells the quiescence driver something happened.
    fn poke(&self) {
        self.raft.runtime_config().tick(true);
        self.poked.store(true, Ordering::Relaxed);
    }
}

/// Holds a partition's proposals while it lives (see [`RaftLog::hold`]).
pub struct Hold(Arc<watch::Sender<usize>>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// The Raft groups of the partitions this node replicates.
pub struct RaftLog {
    groups: RwLock<HashMap<PartitionId, Arc<Group>>>,
    /// Bytes of ops a partition may have proposed and not yet durable before it refuses new
    /// publishes (`cluster.backlog_bytes_max`).
    backlog_bytes_max: usize,
    /// Members whose disk is below its free-space watermark, by consensus id (their name).
    low_space: RwLock<HashMap<u64, String>>,
}

impl RaftLog {
    pub fn new(backlog_bytes_max: usize) -> RaftLog {
        RaftLog {
            groups: RwLock::default(),
            backlog_bytes_max,
            low_space: RwLock::default(),
        }
    }

    /// The members whose disk is too full for new messages now (consensus id, name).
    pub fn set_low_space(&self, members: HashMap<u64, String>) {
        let mut low = self.low_space.write().unwrap();
        if *low != members {
            *low = members;
        }
    }

    /// Routes `partition`'s entries to `raft`.
    pub fn insert(&self, partition: PartitionId, raft: Raft<TypeConfig>) {
        let (completions, rx) = mpsc::unbounded_channel();
        let backlog_bytes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(complete_in_order(partition, rx, backlog_bytes.clone()));
        let (proposals, queued) = mpsc::unbounded_channel();
        let (held, hold) = watch::channel(0);
        tokio::spawn(propose_batches(
            partition,
            raft.clone(),
            queued,
            hold,
            completions,
        ));
        self.groups.write().unwrap().insert(
            partition,
            Arc::new(Group {
                raft,
                proposals,
                poked: AtomicBool::new(false),
                backlog_bytes,
                confirmed_term: AtomicU64::new(0),
                settled_term: AtomicU64::new(0),
                held: Arc::new(held),
            }),
        );
    }

    /// Stops routing `partition`'s entries (its replica moved to another node). Proposals
    /// already queued still complete.
    pub fn remove(&self, partition: PartitionId) {
        self.groups.write().unwrap().remove(&partition);
    }

    /// Holds `partition`'s proposals until every guard returned drops: they queue, and the
    /// log stops growing (a leader hands its partition over only to a replica holding its
    /// whole log, and a draining leader's followers only time out once it sends nothing).
    /// `None` when this node does not replicate it.
    pub fn hold(&self, partition: PartitionId) -> Option<Hold> {
        let group = self.group(partition).ok()?;
        group.held.send_modify(|n| *n += 1);
        Some(Hold(group.held.clone()))
    }

    /// Marks `partition` as touched, as a proposal does: a quiet group ticks again now, and
    /// the quiescence driver starts its quiet period over.
    pub fn poke(&self, partition: PartitionId) {
        if let Ok(group) = self.group(partition) {
            group.poke();
        }
    }

    /// Whether a proposal reached `partition` since the last call.
    pub fn take_poked(&self, partition: PartitionId) -> bool {
        self.groups
            .read()
            .unwrap()
            .get(&partition)
            .is_some_and(|g| g.poked.swap(false, Ordering::Relaxed))
    }

    fn group(&self, partition: PartitionId) -> Result<Arc<Group>, StorageError> {
        self.groups
            .read()
            .unwrap()
            .get(&partition)
            .cloned()
            .ok_or_else(|| StorageError::NotWritable {
                partition,
                reason: "this node does not replicate it".into(),
            })
    }
}

fn not_writable(partition: PartitionId, reason: impl ToString) -> StorageError {
    StorageError::NotWritable {
        partition,
        reason: reason.to_string(),
    }
}

/// A proposal: its ops, what runs once they are durable (or failed), and the Raft term it
/// was made in.
type Proposal = (Vec<Op>, Option<Done>, u64);

/// Whether `p` only moves cursors and nobody waits for it: a cursor may lag on a crash
/// (delivery is at least once), so it can wait for company.
fn lazy(p: &Proposal) -> bool {
    p.1.is_none() && p.0.iter().all(|op| matches!(op, Op::Cursor { .. }))
}

/// Merges queued proposals into entries, in order.
async fn propose_batches(
    partition: PartitionId,
    raft: Raft<TypeConfig>,
    mut queued: mpsc::UnboundedReceiver<Proposal>,
    mut hold: watch::Receiver<usize>,
    completions: mpsc::UnboundedSender<Pending>,
) {
    let in_flight = Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT));
    // Proposals taken from the queue and not yet in an entry, in order.
    let mut waiting: VecDeque<Proposal> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            let Some(first) = queued.recv().await else {
                return;
            };
            let alone = lazy(&first);
            waiting.push_back(first);
            if alone {
                // Cursor moves wait a little for a publish to share its entry: a device
                // acks every message, and each ack alone would be an entry, an fsync on
                // every replica and a round of replication.
                let deadline = tokio::time::Instant::now() + CURSOR_DELAY;
                while let Ok(Some(p)) = tokio::time::timeout_at(deadline, queued.recv()).await {
                    let company = !lazy(&p);
                    waiting.push_back(p);
                    if company {
                        break;
                    }
                }
            }
        }
        // Proposals queue while the entries before them are in Raft, and all join this one.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // Held during a leadership transfer: the entry waits for it to end (and then fails
        // with "not the leader" if it moved, to be retried at the new leader).
        let _ = hold.wait_for(|held| *held == 0).await;
        while let Ok(p) = queued.try_recv() {
            waiting.push_back(p);
        }
        // A proposal made in another term fails: its writer (a mailbox) read its state
        // under a leadership that ended while it waited, and this node may lead again now.
        // Usually the stale ones are the first in line, but a writer that checked its term
        // just before the term moved may queue behind one of the new term: all are looked at.
        let term = raft.metrics().borrow().current_term;
        let stale = waiting.iter().filter(|p| p.2 != term).count();
        if stale > 0 {
            let (failed, current): (VecDeque<Proposal>, VecDeque<Proposal>) =
                waiting.drain(..).partition(|p| p.2 != term);
            waiting = current;
            let bytes = failed.iter().flat_map(|p| &p.0).map(Op::size_bytes).sum();
            let dones = failed.into_iter().map(|p| p.1).collect();
            tracing::debug!(partition, stale, term, "stale proposals fail");
            let why = not_writable(
                partition,
                "its leader's term ended while it waited to be proposed; it goes again through the current leader",
            );
            if completions.send((Err(why), dones, bytes, permit)).is_err() {
                return;
            }
            continue;
        }
        let (mut ops, done, _) = waiting.pop_front().expect("a proposal waits");
        let mut dones = vec![done];
        let mut bytes: usize = ops.iter().map(Op::size_bytes).sum();
        // What does not fit opens the next entry.
        while let Some((more, _, _)) = waiting.front() {
            let more_bytes: usize = more.iter().map(Op::size_bytes).sum();
            if ops.len() + more.len() > BATCH_OPS_MAX || bytes + more_bytes > BATCH_BYTES_MAX {
                break;
            }
            let (more, done, _) = waiting.pop_front().expect("looked at above");
            bytes += more_bytes;
            ops.extend(more);
            dones.push(done);
        }
        coalesce_cursors(&mut ops);
        metrics::histogram!("warbler_raft_entry_ops").record(ops.len() as f64);
        let answer = raft
            .client_write_ff(Batch { ops: ops.into() })
            .await
            .map_err(|e| not_writable(partition, e));
        if completions.send((answer, dones, bytes, permit)).is_err() {
            return;
        }
    }
}

/// Keeps only the last cursor move of each device in one entry: a cursor op sets the
/// device's cursor, so the last one in the entry is the one that stands, and a device that
/// acks every message would otherwise write its cursor once per message on every replica.
fn coalesce_cursors(ops: &mut Vec<Op>) {
    if ops
        .iter()
        .filter(|op| matches!(op, Op::Cursor { .. }))
        .count()
        < 2
    {
        return;
    }
    let mut seen = HashSet::new();
    let keep: Vec<bool> = ops
        .iter()
        .rev()
        .map(|op| match op {
            Op::Cursor { user, device, .. } => seen.insert((user.as_str(), device.as_str())),
            _ => true,
        })
        .collect();
    let mut keep = keep.into_iter().rev();
    ops.retain(|_| keep.next().unwrap_or(true));
}

async fn complete_in_order(
    partition: PartitionId,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    backlog_bytes: Arc<AtomicUsize>,
) {
    // Each entry's permit drops with its answer, letting the proposer send the next one.
    while let Some((answer, dones, bytes, _permit)) = rx.recv().await {
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                backlog_bytes.fetch_sub(bytes, Ordering::Relaxed);
                for done in dones.into_iter().flatten() {
                    done(Err(e.clone()));
                }
                continue;
            }
        };
        let result = match answer.await {
            Ok(Ok(r)) if r.data.refused.is_some() => {
                Err(not_writable(partition, r.data.refused.unwrap_or_default()))
            }
            Ok(Ok(_)) => Ok(()),
            Ok(Err(ClientWriteError::ForwardToLeader(f))) => Err(not_writable(
                partition,
                format!("not the leader (the leader is {:?})", f.leader_id),
            )),
            Ok(Err(e)) => Err(not_writable(partition, e)),
            Err(_) => Err(not_writable(partition, "the Raft group stopped")),
        };
        backlog_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::debug!(partition, error = %e, "entry failed");
        }
        for done in dones.into_iter().flatten() {
            done(result.clone());
        }
    }
}

impl RaftLog {
    /// Queues a proposal on the partition's proposer, made in `term` (the writer's, or the
    /// group's current one).
    fn queue(
        &self,
        partition: PartitionId,
        term: Option<u64>,
        ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let group = self.group(partition)?;
            // A quiet group ticks again: its leader lease must be kept up while it writes.
            group.poke();
            let bytes: usize = ops.iter().map(Op::size_bytes).sum();
            group.backlog_bytes.fetch_add(bytes, Ordering::Relaxed);
            let term = term.unwrap_or_else(|| group.raft.metrics().borrow().current_term);
            group
                .proposals
                .send((ops, done, term))
                .map_err(|_| not_writable(partition, "the proposer stopped"))
        })
    }
}

impl PartitionLog for RaftLog {
    fn propose(
        &self,
        partition: PartitionId,
        ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        self.queue(partition, None, ops, done)
    }

    fn propose_in(
        &self,
        partition: PartitionId,
        term: u64,
        ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        self.queue(partition, Some(term), ops, done)
    }

    fn barrier(&self, partition: PartitionId) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let group = self.group(partition)?;
            metrics::counter!("warbler_read_barriers_total").increment(1);
            // First every proposal queued before this one is answered, as the trait
            // promises: a crashed writer's proposals may still wait in the proposer, and
            // they enter the log ahead of anything its successor proposes, so the successor
            // must read its state after them. This goes as an entry of no ops (merged into
            // the next entry when others wait), so it also waits for a hold to end.
            let (drained, drain) = tokio::sync::oneshot::channel();
            let done: Done = Box::new(move |r| {
                let _ = drained.send(r);
            });
            self.propose(partition, Vec::new(), Some(done)).await?;
            match tokio::time::timeout(BARRIER_WAIT, drain).await {
                Ok(Ok(r)) => r?,
                Ok(Err(_)) => return Err(not_writable(partition, "the proposer stopped")),
                Err(_) => {
                    return Err(not_writable(
                        partition,
                        format!("the proposals before the barrier were not answered within {BARRIER_WAIT:?}"),
                    ))
                }
            }
            // A quorum confirms this leadership once per term: a mailbox starting later in
            // the same term reads no state another leader could have written meanwhile
            // without this replica's proposals failing (a deposed leader commits nothing,
            // and the state machine refuses an append that does not follow its user's
            // head). So a fan-out that starts thousands of mailboxes asks the quorum once.
            let term = group.raft.metrics().borrow().current_term;
            if group.confirmed_term.load(Ordering::Relaxed) != term {
                group
                    .raft
                    .ensure_linearizable()
                    .await
                    .map_err(|e: RaftError<u64, _>| not_writable(partition, e))?;
                group.confirmed_term.store(term, Ordering::Relaxed);
            }
            // Every entry a leader holds will be committed before the ones it appends next,
            // whether it became leader by election or resumed its term after a restart with
            // a tail of entries it had not committed yet. A writer reading its state must see
            // them all applied: an entry that lands later could hold a seq or an id it hands
            // out again.
            let target = group.raft.metrics().borrow().last_log_index;
            group
                .raft
                .wait(Some(BARRIER_WAIT))
                .metrics(
                    |m| m.last_applied.map(|l| l.index) >= target,
                    "the leader's whole log applied",
                )
                .await
                .map_err(|e| not_writable(partition, e))?;
            // Settled only if the leadership the barrier began under still stands: a later
            // one may have a tail of its own to apply first.
            if self.leader_term(partition) == Some(term) {
                group.settled_term.store(term, Ordering::Relaxed);
            }
            Ok(())
        })
    }

    fn settled(&self, partition: PartitionId) -> bool {
        let Ok(group) = self.group(partition) else {
            return false;
        };
        let settled = group.settled_term.load(Ordering::Relaxed);
        settled != 0 && self.leader_term(partition) == Some(settled)
    }

    fn admits(&self, partition: PartitionId) -> bool {
        self.group(partition)
            .map(|g| g.backlog_bytes.load(Ordering::Relaxed) < self.backlog_bytes_max)
            .unwrap_or(true)
    }

    fn leader_term(&self, partition: PartitionId) -> Option<u64> {
        let group = self.group(partition).ok()?;
        let metrics = group.raft.metrics();
        let m = metrics.borrow();
        (m.current_leader == Some(m.id)).then_some(m.current_term)
    }

    fn replica_low_on_space(&self, partition: PartitionId) -> Option<String> {
        let low = self.low_space.read().unwrap();
        if low.is_empty() {
            return None;
        }
        let group = self.group(partition).ok()?;
        let metrics = group.raft.metrics();
        let m = metrics.borrow();
        let full: Vec<&str> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter_map(|id| low.get(&id).map(String::as_str))
            .collect();
        (!full.is_empty()).then(|| {
            format!(
                "the disk of {} (a replica of partition {partition}) is below its free-space watermark (storage.min_free_bytes); free space there, and publishes resume by themselves",
                full.join(", ")
            )
        })
    }

    fn replicated(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warbler_storage::StoredMessage;

    fn cursor(user: &str, device: &str, acked: u64) -> Op {
        Op::Cursor {
            partition: 1,
            user: user.into(),
            device: device.into(),
            acked,
        }
    }

    fn append(user: &str, seq: u64) -> Op {
        Op::Append {
            partition: 1,
            user: user.into(),
            seq,
            msg: StoredMessage {
                id: format!("m{seq}"),
                ts: 0,
                from: None,
                body: Default::default(),
            },
        }
    }

    #[test]
    fn an_entry_keeps_each_devices_last_cursor_and_every_other_op_in_order() {
        let mut ops = vec![
            cursor("al", "phone", 1),
            append("al", 3),
            cursor("al", "desk", 1),
            cursor("bo", "phone", 4),
            cursor("al", "phone", 2),
            append("al", 4),
            cursor("al", "phone", 3),
        ];
        coalesce_cursors(&mut ops);
        assert_eq!(
            ops,
            vec![
                append("al", 3),
                cursor("al", "desk", 1),
                cursor("bo", "phone", 4),
                append("al", 4),
                cursor("al", "phone", 3),
            ]
        );
    }

    #[test]
    fn an_entry_without_repeated_cursors_is_left_alone() {
        let ops = vec![
            cursor("al", "phone", 1),
            append("al", 3),
            cursor("al", "desk", 7),
        ];
        let mut coalesced = ops.clone();
        coalesce_cursors(&mut coalesced);
        assert_eq!(coalesced, ops);
    }
}
