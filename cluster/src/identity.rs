//! The cluster id: a random name a cluster gets when it forms, kept on every member's disk
//! and offered in every peer handshake. Two nodes with different ids never talk: a node
//! restarted on a disk from another cluster, or a node that formed a cluster of its own
//! while its peers were down, is refused by every member instead of mixing two clusters'
//! consensus groups (which share partition numbers and node names).
//!
//! A node learns the id once and keeps it: the node that creates the member-list group
//! makes it up; every other node takes it from a member's answer (the member list it asks
//! for when it joins, rejoins or forms as a founder). A node that has none yet (it has not
//! learned it) is not refused: it cannot be told apart from a founder a moment old.

use std::sync::{Arc, RwLock};

use ring::rand::{SecureRandom, SystemRandom};
use warbler_storage::Store;

use crate::error::ClusterError;

/// Where the id is kept (the consensus metadata column family, outside the partitions).
const CLUSTER_META_PARTITION: warbler_storage::PartitionId = u16::MAX;
const CLUSTER_ID_KEY: &str = "cluster_id";

/// This node's cluster id, once known; shared by the transport (which checks it on every
/// inbound connection) and the node (which learns it).
#[derive(Clone, Default)]
pub struct ClusterId(Arc<RwLock<Option<String>>>);

impl ClusterId {
    /// The id kept in `store`, if any.
    pub fn load(store: &Store) -> Result<ClusterId, ClusterError> {
        let id = store
            .raft_meta_get(CLUSTER_META_PARTITION, CLUSTER_ID_KEY)?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        Ok(ClusterId(Arc::new(RwLock::new(id))))
    }

    /// A fixed id (tests, tools).
    pub fn known(id: &str) -> ClusterId {
        ClusterId(Arc::new(RwLock::new(Some(id.to_string()))))
    }

    pub fn get(&self) -> Option<String> {
        self.0.read().unwrap().clone()
    }

    /// A new random id: 16 bytes, hex.
    pub fn random() -> String {
        let mut b = [0u8; 16];
        SystemRandom::new()
            .fill(&mut b)
            .expect("the system random source works");
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Writes the id this node has (if any) to `store` again, after the store was wiped.
    pub fn keep(&self, store: &Store) -> Result<(), ClusterError> {
        if let Some(id) = self.get() {
            store.raft_meta_put(CLUSTER_META_PARTITION, CLUSTER_ID_KEY, id.as_bytes(), true)?;
        }
        Ok(())
    }

    /// Takes `id` as this node's and keeps it on disk (synced), unless the node has one:
    /// a node never changes its cluster. True when `id` was taken.
    pub fn adopt(&self, store: &Store, id: &str) -> Result<bool, ClusterError> {
        let mut mine = self.0.write().unwrap();
        if mine.is_some() {
            return Ok(false);
        }
        store.raft_meta_put(CLUSTER_META_PARTITION, CLUSTER_ID_KEY, id.as_bytes(), true)?;
        *mine = Some(id.to_string());
        Ok(true)
    }
}

/// Whether a peer offering `theirs` may talk to a node of cluster `ours`: the refusal,
/// worded for both operators, when both are known and differ.
pub fn admit(ours: Option<&str>, theirs: Option<&str>, peer: &str) -> Result<(), String> {
    match (ours, theirs) {
        (Some(o), Some(t)) if o != t => Err(format!(
            "{peer} belongs to cluster {t} and this node to cluster {o}: its data directory is \
             from another cluster (or it formed one of its own while this one was out of \
             reach). To make it a member of this cluster, stop it and start it on an empty \
             data directory; if it is in the right cluster, point its --seeds at its own \
             members"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_of_different_clusters_are_refused_and_a_node_without_an_id_is_not() {
        assert!(admit(Some("a"), Some("a"), "n2").is_ok());
        let e = admit(Some("a"), Some("b"), "n2").unwrap_err();
        assert!(e.contains("n2 belongs to cluster b") && e.contains("empty data directory"));
        assert!(admit(None, Some("b"), "n2").is_ok());
        assert!(admit(Some("a"), None, "n2").is_ok());
    }

    #[test]
    fn an_id_is_kept_on_disk_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = ClusterId::load(&store).unwrap();
        assert_eq!(id.get(), None);
        let first = ClusterId::random();
        assert_eq!(first.len(), 32);
        assert_ne!(first, ClusterId::random());
        assert!(id.adopt(&store, &first).unwrap());
        assert!(!id.adopt(&store, "other").unwrap());
        assert_eq!(id.get().as_deref(), Some(first.as_str()));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(ClusterId::load(&store).unwrap().get(), Some(first));
    }
}
