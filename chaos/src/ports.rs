//! Ports for nodes that are restarted on the address they had.
//!
//! A port the kernel hands out for `bind(…:0)` lies in its ephemeral range, the same range
//! it draws the source ports of outgoing connections from. While a node is down between a
//! kill and its restart, any outgoing connection on the machine (another test's client, a
//! peer reconnecting elsewhere) may take its port, and the restart then fails with "address
//! already in use". So the ports handed out here lie below the ephemeral range, where the
//! kernel never picks one on its own.

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out; below it are ports that well-known services tend to use.
const LOWEST: u32 = 10_000;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A port on 127.0.0.1 free for both TCP and UDP (a cluster address uses both), outside
/// the kernel's ephemeral range where it can be found there, so that it stays free while
/// its node is restarted.
pub fn free_port() -> u16 {
    let (low, _) = ephemeral_range();
    if low <= LOWEST + 1_000 {
        return any_free_port();
    }
    let span = low - LOWEST;
    // Processes running side by side start at different places.
    let start = std::process::id().wrapping_mul(7_919) % span;
    NEXT.compare_exchange(0, start + 1, Ordering::Relaxed, Ordering::Relaxed)
        .ok();
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = (LOWEST + n) as u16;
        if both_free(port) {
            return port;
        }
    }
    any_free_port()
}

fn both_free(port: u16) -> bool {
    let Ok(_tcp) = TcpListener::bind(("127.0.0.1", port)) else {
        return false;
    };
    UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// A port from the kernel's own choice (the fallback where the ephemeral range starts low).
fn any_free_port() -> u16 {
    loop {
        let Ok(tcp) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
        if port != 0 && UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The kernel's ephemeral port range (Linux's default where it cannot be read).
fn ephemeral_range() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_lie_below_the_ephemeral_range_and_differ() {
        let (low, _) = ephemeral_range();
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b, "two calls handed out the same port");
        if low > LOWEST + 1_000 {
            for p in [a, b] {
                assert!(
                    (LOWEST..low).contains(&(p as u32)),
                    "port {p} is not in {LOWEST}..{low}"
                );
            }
        }
    }
}
