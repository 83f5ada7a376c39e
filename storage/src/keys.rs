//! The on-disk key layout. Every key of a user starts with the same prefix, and every
//! prefix starts with the partition, so one partition's data is one contiguous key range
//! (snapshots and migration copy ranges).
//!
//! ```text
//! user prefix  = partition:u16be  len:u8  user:len bytes (UTF-8)
//! msgs         = user prefix  seq:u64be            -> StoredMessage (MessagePack map)
//! cursors      = user prefix  device bytes         -> acked:u64be
//! dedup        = user prefix  message id bytes     -> seq:u64be ts_ms:u64be
//! heads        = user prefix                       -> last_seq:u64be
//! ```

use crate::PartitionId;

/// Longest user id, device id or message id, in bytes. The length sits in one byte.
pub const ID_BYTES_MAX: usize = 255;

/// `partition ++ len ++ user`.
pub fn user_prefix(partition: PartitionId, user: &str) -> Vec<u8> {
    let u = user.as_bytes();
    assert!(
        !u.is_empty() && u.len() <= ID_BYTES_MAX,
        "user id length {} out of range",
        u.len()
    );
    let mut k = Vec::with_capacity(3 + u.len() + 8);
    k.extend_from_slice(&partition.to_be_bytes());
    k.push(u.len() as u8);
    k.extend_from_slice(u);
    k
}

/// The key of message `seq` of `user`.
pub fn msg_key(partition: PartitionId, user: &str, seq: u64) -> Vec<u8> {
    let mut k = user_prefix(partition, user);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `user prefix ++ suffix` (cursors: device id; dedup: message id).
pub fn suffixed_key(partition: PartitionId, user: &str, suffix: &str) -> Vec<u8> {
    let mut k = user_prefix(partition, user);
    k.extend_from_slice(suffix.as_bytes());
    k
}

/// The smallest key greater than every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// Splits a user-prefixed key into (partition, user, rest).
pub fn split_user_key(key: &[u8]) -> Option<(PartitionId, &str, &[u8])> {
    if key.len() < 3 {
        return None;
    }
    let p = u16::from_be_bytes([key[0], key[1]]);
    let len = key[2] as usize;
    let user = std::str::from_utf8(key.get(3..3 + len)?).ok()?;
    Some((p, user, &key[3 + len..]))
}

pub fn u64_be(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        assert_eq!(
            msg_key(2, "ab", 258),
            vec![0, 2, 2, b'a', b'b', 0, 0, 0, 0, 0, 0, 1, 2]
        );
        let key = msg_key(7, "bob", 1);
        let (p, u, rest) = split_user_key(&key).unwrap();
        assert_eq!((p, u, rest), (7, "bob", &[0, 0, 0, 0, 0, 0, 0, 1][..]));
    }

    #[test]
    fn a_users_keys_sort_by_seq_and_stay_inside_its_prefix() {
        let p = user_prefix(1, "al");
        let end = prefix_end(&p);
        for seq in [0, 1, 255, 256, u64::MAX] {
            let k = msg_key(1, "al", seq);
            assert!(k >= p && k < end);
        }
        assert!(msg_key(1, "al", 255) < msg_key(1, "al", 256));
        // "al" and "alice" share bytes but not a prefix, thanks to the length byte.
        let other = msg_key(1, "alice", 1);
        assert!(other < p || other >= end);
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
        assert_eq!(prefix_end(&[0xff]), vec![0xff, 0xff]);
    }
}
