//! The replicated [`PartitionLog`]: entries go through each partition's Raft group, so an
//! entry is durable once a majority of the partition's replicas have it, and only the
//! partition's leader can write.
//!
//! Ordering, as the trait promises: `propose` queues the entry on the partition's proposer
//! before it returns, so entries proposed one after another enter the log in that order.
//! The proposer hands Raft whatever has queued up as one log entry (up to
//! [`BATCH_OPS_MAX`] ops): under load many publishes and acks share one entry, one append and
//! one fsync per replica. One completion task per partition awaits the answers first in,
//! first out, so `done` callbacks run in log order.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use tokio::sync::mpsc;
use warbler_storage::log::BoxFuture;
use warbler_storage::{Done, Op, PartitionId, PartitionLog, StorageError};

use crate::raft_store::{Batch, TypeConfig};

/// Most ops merged into one log entry.
pub const BATCH_OPS_MAX: usize = 512;

type Answer = openraft::raft::responder::OneshotResponder<TypeConfig>;
type Receiver = <Answer as openraft::raft::responder::Responder<TypeConfig>>::Receiver;
/// One entry handed to Raft (or refused before it got there), with its proposers' callbacks.
type Pending = (Result<Receiver, StorageError>, Vec<Option<Done>>);

/// How long a writer waits for its leader's log to be applied before it gives up.
const BARRIER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct Group {
    raft: Raft<TypeConfig>,
    /// Proposals waiting to become an entry. Unbounded on purpose: bounded by the
    /// mailboxes' own limits upstream.
    proposals: mpsc::UnboundedSender<(Vec<Op>, Option<Done>)>,
}

/// The Raft groups of the partitions this node replicates.
#[derive(Default)]
pub struct RaftLog {
    groups: RwLock<HashMap<PartitionId, Arc<Group>>>,
}

impl RaftLog {
    /// Routes `partition`'s entries to `raft`.
    pub fn insert(&self, partition: PartitionId, raft: Raft<TypeConfig>) {
        let (completions, rx) = mpsc::unbounded_channel();
        tokio::spawn(complete_in_order(partition, rx));
        let (proposals, queued) = mpsc::unbounded_channel();
        tokio::spawn(propose_batches(
            partition,
            raft.clone(),
            queued,
            completions,
        ));
        self.groups
            .write()
            .unwrap()
            .insert(partition, Arc::new(Group { raft, proposals }));
    }

    /// Stops routing `partition`'s entries (its replica moved to another node). Proposals
    /// already queued still complete.
    pub fn remove(&self, partition: PartitionId) {
        self.groups.write().unwrap().remove(&partition);
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

/// Merges queued proposals into entries, in order.
async fn propose_batches(
    partition: PartitionId,
    raft: Raft<TypeConfig>,
    mut queued: mpsc::UnboundedReceiver<(Vec<Op>, Option<Done>)>,
    completions: mpsc::UnboundedSender<Pending>,
) {
    while let Some((mut ops, done)) = queued.recv().await {
        let mut dones = vec![done];
        while ops.len() < BATCH_OPS_MAX {
            match queued.try_recv() {
                Ok((more, done)) => {
                    ops.extend(more);
                    dones.push(done);
                }
                Err(_) => break,
            }
        }
        let answer = raft
            .client_write_ff(Batch { ops })
            .await
            .map_err(|e| not_writable(partition, e));
        if completions.send((answer, dones)).is_err() {
            return;
        }
    }
}

async fn complete_in_order(partition: PartitionId, mut rx: mpsc::UnboundedReceiver<Pending>) {
    while let Some((answer, dones)) = rx.recv().await {
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
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
        for done in dones.into_iter().flatten() {
            done(result.clone());
        }
    }
}

impl PartitionLog for RaftLog {
    fn propose(
        &self,
        partition: PartitionId,
        ops: Vec<Op>,
        done: Option<Done>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let group = self.group(partition)?;
            group
                .proposals
                .send((ops, done))
                .map_err(|_| not_writable(partition, "the proposer stopped"))
        })
    }

    fn barrier(&self, partition: PartitionId) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let group = self.group(partition)?;
            group
                .raft
                .ensure_linearizable()
                .await
                .map_err(|e: RaftError<u64, _>| not_writable(partition, e))?;
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
                .map(|_| ())
                .map_err(|e| not_writable(partition, e))
        })
    }

    fn leader_term(&self, partition: PartitionId) -> Option<u64> {
        let group = self.group(partition).ok()?;
        let metrics = group.raft.metrics();
        let m = metrics.borrow();
        (m.current_leader == Some(m.id)).then_some(m.current_term)
    }

    fn replicated(&self) -> bool {
        true
    }
}
