//! What bounds the number of connections a node holds, said at startup: the connection cap,
//! the open-file limit and the memory there is. An open-file limit too low for the cap is a
//! warning naming both numbers, so an operator learns it before devices are refused.

/// File descriptors a node needs besides its device connections: storage files, peers,
/// listeners, HTTP requests.
pub const FD_RESERVE: u64 = 1024;

/// Memory a connection may take beyond its idle footprint (a burst in its buffers), for the
/// memory estimate said at startup.
const BYTES_PER_CONNECTION_PLANNED: u64 = 16 * 1024;

/// Raises the soft open-file limit to the hard one; answers the soft limit then in force
/// (`None` if it cannot be read).
pub fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// Memory this process may use, in bytes: the cgroup's limit if it has one, else what the
/// machine has available.
fn memory_available() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (cgroup, meminfo) {
        (Some(c), Some(m)) => Some(c.min(m)),
        (c, m) => c.or(m),
    }
}

/// What limits a node's connections, checked against `connections_max`: `Err` says what
/// is too low and what to do.
pub fn check(connections_max: u64, open_files: u64) -> Result<(), String> {
    let needed = connections_max + FD_RESERVE;
    if open_files < needed {
        return Err(format!(
            "the open-file limit is {open_files}, below the {needed} that limits.connections_max = {connections_max} needs (one per connection plus {FD_RESERVE} for storage, peers and HTTP): connections beyond about {} will fail; raise the limit (ulimit -n, LimitNOFILE= in systemd, or the container runtime's nofile) or lower limits.connections_max",
            open_files.saturating_sub(FD_RESERVE)
        ));
    }
    Ok(())
}

/// Logs the connection cap, the open-file limit and the memory, with a warning for the
/// limit that would be hit first.
pub fn report(connections_max: u32) {
    let cap = u64::from(connections_max);
    let open_files = raise_open_file_limit();
    let memory = memory_available();
    tracing::info!(
        connections_max = cap,
        open_file_limit = open_files,
        memory_available_mib = memory.map(|m| m >> 20),
        "connection capacity"
    );
    if let Some(open_files) = open_files {
        if let Err(why) = check(cap, open_files) {
            tracing::warn!("{why}");
        }
    }
    if let Some(memory) = memory {
        let planned = cap * BYTES_PER_CONNECTION_PLANNED;
        if memory < planned {
            tracing::warn!(
                "{} MiB of memory is available, less than the {} MiB that limits.connections_max = {cap} connections may take at {} KiB each: lower the cap or give the node more memory",
                memory >> 20,
                planned >> 20,
                BYTES_PER_CONNECTION_PLANNED >> 10
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_below_the_cap_is_named_with_both_numbers() {
        assert!(check(18_000, 20_000).is_ok());
        let why = check(18_000, 4096).unwrap_err();
        assert!(why.contains("4096") && why.contains("18000"), "{why}");
        assert!(why.contains("ulimit -n"), "{why}");
    }
}
