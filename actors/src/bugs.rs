//! Deliberate bugs, for showing that the chaos harness catches a broken build.
//!
//! A node turns one on only when started with `cluster.fault_injection = true` and
//! `WARBLER_CHAOS_BUG` set (see `docs/chaos.md`). Production nodes never read it.

use std::sync::atomic::{AtomicU8, Ordering};

/// Which invariant the node breaks on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// Behave correctly.
    None = 0,
    /// Answer `published` as soon as the append is proposed, before it is committed on a
    /// majority: a leader killed at the wrong moment loses acknowledged messages, and its
    /// successor hands their seqs to other ids.
    AckBeforeCommit = 1,
    /// Sessions never receive seqs that are multiples of 50: every device sees gaps.
    SkipSeq = 2,
    /// A partition's backup leaves out the devices' cursors: after a restore, devices are
    /// sent again everything they had acknowledged.
    BackupWithoutCursors = 3,
    /// A connection hands every publish on at once, neither after the one before it to the
    /// same user nor refused behind a refused one: under overload, a publish sent after a
    /// refused one is stored before the refused one comes again.
    UnchainedPublishes = 4,
}

static ACTIVE: AtomicU8 = AtomicU8::new(Bug::None as u8);

impl Bug {
    /// Parses the value of `WARBLER_CHAOS_BUG`.
    pub fn parse(name: &str) -> Result<Bug, UnknownBug> {
        match name {
            "" | "none" => Ok(Bug::None),
            "ack-before-commit" => Ok(Bug::AckBeforeCommit),
            "skip-seq" => Ok(Bug::SkipSeq),
            "backup-without-cursors" => Ok(Bug::BackupWithoutCursors),
            "unchained-publishes" => Ok(Bug::UnchainedPublishes),
            other => Err(UnknownBug(other.to_string())),
        }
    }
}

/// `WARBLER_CHAOS_BUG` names no known bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("WARBLER_CHAOS_BUG={0:?}: unknown bug; use ack-before-commit, skip-seq, backup-without-cursors, unchained-publishes or none")]
pub struct UnknownBug(pub String);

/// Turns a deliberate bug on for this process.
pub fn set(bug: Bug) {
    ACTIVE.store(bug as u8, Ordering::Relaxed);
}

/// Whether `bug` is on.
pub fn on(bug: Bug) -> bool {
    ACTIVE.load(Ordering::Relaxed) == bug as u8
}

/// How often [`Bug::SkipSeq`] drops a seq.
pub const SKIP_EVERY: u64 = 50;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_say_what_exists() {
        assert_eq!(Bug::parse("skip-seq"), Ok(Bug::SkipSeq));
        assert_eq!(Bug::parse("ack-before-commit"), Ok(Bug::AckBeforeCommit));
        assert_eq!(
            Bug::parse("backup-without-cursors"),
            Ok(Bug::BackupWithoutCursors)
        );
        assert_eq!(
            Bug::parse("unchained-publishes"),
            Ok(Bug::UnchainedPublishes)
        );
        assert_eq!(Bug::parse(""), Ok(Bug::None));
        let e = Bug::parse("lose-everything").unwrap_err().to_string();
        assert!(
            e.contains("lose-everything") && e.contains("skip-seq"),
            "{e}"
        );
    }
}
