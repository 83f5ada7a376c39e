//! CPU time of a process, read from `/proc`, shared by the examples that measure cost.

/// User plus system CPU seconds of process `pid` ("self" for the calling one).
pub fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e} (these examples need Linux)"));
    // The command name may hold spaces: the fields counted here start after its ')'.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks_per_sec()
}

/// The kernel's USER_HZ, the unit of `/proc/*/stat` times, as `getconf CLK_TCK` prints it
/// (100 on every Linux build this project runs on, and the fallback).
fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
