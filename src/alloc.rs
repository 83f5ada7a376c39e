//! The process's memory allocator: mimalloc, or the C library's when the environment says
//! `WARBLER_ALLOCATOR=system`.
//!
//! A node allocates and frees several small buffers per message (frames, log ops, channel
//! nodes); with the C library's allocator that was 10-14% of a node's CPU in the profiles of
//! docs/benchmarks.md, much of it in its free-list upkeep (`malloc_consolidate`,
//! `unlink_chunk`). mimalloc's per-thread free lists do the same work for less.
//!
//! The C library's allocator stays one variable away because heap profilers that interpose
//! `malloc` (heaptrack, used by benches/idle_heap.sh) only see allocations made through it,
//! and so that a benchmark can compare both with the same binary. The choice is made once, at
//! the first allocation (before `main`), and never changes: every block is freed by the
//! allocator that made it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

/// The variable that picks the allocator, and the value that picks the C library's.
pub const VARIABLE: &str = "WARBLER_ALLOCATOR";
const SYSTEM_VALUE: &[u8] = b"system";

const UNDECIDED: u8 = 0;
const MIMALLOC: u8 = 1;
const SYSTEM: u8 = 2;

static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// The global allocator of the `warbler` binary.
pub struct Allocator;

/// Refuses a value of the variable that names neither allocator: a typo would otherwise
/// leave the process on mimalloc without a word.
pub fn check_variable() -> Result<(), String> {
    check_value(std::env::var_os(VARIABLE).as_deref())
}

fn check_value(value: Option<&std::ffi::OsStr>) -> Result<(), String> {
    match value {
        None => Ok(()),
        Some(v) if v.is_empty() || v == "mimalloc" || v.as_encoded_bytes() == SYSTEM_VALUE => {
            Ok(())
        }
        Some(v) => Err(format!(
            "{VARIABLE}={} names no allocator: set it to `system` (the C library's) or \
             `mimalloc` (the default), or unset it",
            v.to_string_lossy()
        )),
    }
}

/// The variable that leaves transparent huge pages as the system has them, and its value.
pub const THP_VARIABLE: &str = "WARBLER_THP";
const THP_SYSTEM_VALUE: &str = "system";

/// Whether this process keeps to small (4 KiB) pages: yes unless [`THP_VARIABLE`] says
/// `system`. Refuses any other value.
///
/// mimalloc asks the kernel for transparent huge pages for its arenas, and on a kernel that
/// grants them (`madvise` mode, the usual, or `always`) the first touch of each 2 MiB faults
/// in and zeroes a whole huge page while the thread that touched it waits: 0.1-0.2 ms each on
/// a virtual machine. A node that just started, or that grows its heap under a burst, took
/// such faults on its IO threads and mailbox workers: in the first 200 ms of a load at
/// 13,500 msgs/s, 22% of the node's CPU samples were `clear_page_erms` under
/// `do_huge_pmd_anonymous_page`, and those deliveries set the run's p99 (docs/benchmarks.md,
/// session 52). Small pages fault more often but each fault is short.
pub fn keep_small_pages() -> Result<bool, String> {
    keep_small_pages_for(std::env::var_os(THP_VARIABLE).as_deref())
}

fn keep_small_pages_for(value: Option<&std::ffi::OsStr>) -> Result<bool, String> {
    match value {
        None => Ok(true),
        Some(v) if v.is_empty() || v == "off" => Ok(true),
        Some(v) if v == THP_SYSTEM_VALUE => Ok(false),
        Some(v) => Err(format!(
            "{THP_VARIABLE}={} is not a setting: set it to `system` (transparent huge pages as \
             the kernel's settings give them) or `off` (the default: small pages), or unset it",
            v.to_string_lossy()
        )),
    }
}

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`): every
/// later page fault, of mimalloc's arenas and RocksDB's memory alike, maps a small page. On a
/// system without the call it says why; the node runs on either way.
#[cfg(target_os = "linux")]
pub fn disable_huge_pages() -> Result<(), String> {
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// Elsewhere there are no transparent huge pages to turn off.
#[cfg(not(target_os = "linux"))]
pub fn disable_huge_pages() -> Result<(), String> {
    Ok(())
}

/// Whether this process may get transparent huge pages, for the startup log: `off`, or
/// `system` (as the kernel's settings say).
pub fn huge_pages() -> &'static str {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: reads the process's flag; no memory is passed.
        if unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) } == 1 {
            return "off";
        }
    }
    "system"
}

/// Which allocator this process uses, for the startup log.
pub fn name() -> &'static str {
    if uses_system() {
        "system"
    } else {
        "mimalloc"
    }
}

#[inline]
fn uses_system() -> bool {
    match CHOICE.load(Ordering::Relaxed) {
        MIMALLOC => false,
        SYSTEM => true,
        _ => decide(),
    }
}

/// Reads the variable once. `getenv` allocates nothing, so it is safe to call from inside the
/// allocator; two threads racing here read the same environment and store the same answer.
#[cold]
fn decide() -> bool {
    let mut name = [0u8; 32];
    name[..VARIABLE.len()].copy_from_slice(VARIABLE.as_bytes());
    // SAFETY: `name` is NUL-terminated; getenv returns NULL or a NUL-terminated string that
    // stays valid while nothing changes the environment (nothing does before `main`, and the
    // binary never sets variables).
    let system = unsafe {
        let value = libc::getenv(name.as_ptr().cast());
        !value.is_null() && std::ffi::CStr::from_ptr(value).to_bytes() == SYSTEM_VALUE
    };
    CHOICE.store(if system { SYSTEM } else { MIMALLOC }, Ordering::Relaxed);
    system
}

// SAFETY: every call goes to one of two sound allocators, the same one for the life of the
// process (see `decide`), so a block is always freed or resized by the allocator that made it.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if uses_system() {
            System.alloc(layout)
        } else {
            MiMalloc.alloc(layout)
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if uses_system() {
            System.alloc_zeroed(layout)
        } else {
            MiMalloc.alloc_zeroed(layout)
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if uses_system() {
            System.dealloc(ptr, layout)
        } else {
            MiMalloc.dealloc(ptr, layout)
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if uses_system() {
            System.realloc(ptr, layout, new_size)
        } else {
            MiMalloc.realloc(ptr, layout, new_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_made_once_and_kept() {
        // The test binary allocates before any test runs, so the choice is already made.
        let first = name();
        let v: Vec<u64> = (0..10_000).collect();
        assert_eq!(v.iter().sum::<u64>(), 49_995_000);
        assert_eq!(name(), first);
        let expected = match std::env::var(VARIABLE) {
            Ok(value) if value.as_bytes() == SYSTEM_VALUE => "system",
            _ => "mimalloc",
        };
        assert_eq!(first, expected);
    }

    #[test]
    fn huge_pages_are_off_unless_the_variable_says_system() {
        assert_eq!(keep_small_pages_for(None), Ok(true));
        assert_eq!(keep_small_pages_for(Some("off".as_ref())), Ok(true));
        assert_eq!(keep_small_pages_for(Some("system".as_ref())), Ok(false));
        let message = keep_small_pages_for(Some("on".as_ref())).expect_err("not a setting");
        assert!(message.contains("WARBLER_THP=on"), "{message}");
        assert!(message.contains("`system`"), "{message}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn disabling_huge_pages_sets_the_process_flag() {
        disable_huge_pages().expect("prctl is available on Linux");
        // SAFETY: reads the flag back; no memory is passed.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(flag, 1, "transparent huge pages are still allowed");
        assert_eq!(huge_pages(), "off");
    }

    #[test]
    fn a_value_that_names_no_allocator_is_refused() {
        let message = check_value(Some("jemalloc".as_ref())).expect_err("not an allocator here");
        assert!(message.contains("WARBLER_ALLOCATOR=jemalloc"), "{message}");
        assert!(message.contains("`system`"), "{message}");
        for fine in [None, Some(""), Some("system"), Some("mimalloc")] {
            assert_eq!(check_value(fine.map(AsRef::as_ref)), Ok(()), "{fine:?}");
        }
    }
}
