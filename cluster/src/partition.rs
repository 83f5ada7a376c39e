//! The user → partition hash. Changing it moves every user: it is part of the on-disk
//! format and of the protocol documentation (`docs/storage.md`).

/// A partition number, `0..partitions`.
pub use warbler_storage::PartitionId;

/// 64-bit FNV-1a, shared with the client library so that clients place users as nodes do.
pub use warbler_client::api::fnv1a64;

/// The partition of `user` among `partitions` (which must be ≥ 1).
pub fn partition_of(user: &str, partitions: u16) -> PartitionId {
    assert!(partitions >= 1, "partition count must be at least 1");
    warbler_client::api::partition_of(user, partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_test_vectors() {
        // Vectors from the FNV reference (Fowler/Noll/Vo test suite).
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("alice", 64), (fnv1a64(b"alice") % 64) as u16);
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            counts[partition_of(&format!("user-{i}"), 64) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // 1000 expected per partition; a fair hash stays well within ±20%.
        assert!(
            *min > 800 && *max < 1200,
            "uneven spread: min {min} max {max}"
        );
    }
}
