//! The summary a run prints on the terminal.

use std::fmt::Write;

use crate::checker::Check;
use crate::restore::RestoreCheck;

/// A table of the checker's counts, the latency and what each fault did.
pub fn summary(c: &Check) -> String {
    let mut s = String::new();
    let rows: [(&str, u64, bool); 18] = [
        ("attempted", c.attempted, false),
        ("acknowledged", c.acknowledged, false),
        ("attempts refused: overloaded", c.overloaded, false),
        ("unknown outcome", c.unknown, false),
        ("  of which delivered (recovered)", c.recovered, false),
        ("failed for good", c.failed, false),
        ("delivered (distinct ids)", c.delivered, false),
        ("deliveries (with redeliveries)", c.deliveries, false),
        ("devices", c.devices, false),
        ("lost", c.lost, true),
        ("unexpected", c.unexpected, true),
        ("duplicate seq assignments", c.duplicate_assignments, true),
        ("seq reused for another id", c.seq_reuse, true),
        ("order violations", c.order_violations, true),
        ("gaps", c.gaps, true),
        ("real-time order violations", c.real_time_violations, true),
        ("send order violations", c.send_order_violations, true),
        ("devices not drained", c.undrained_devices, true),
    ];
    counts(&mut s, 2, &rows);
    let l = &c.latency;
    let _ = writeln!(
        s,
        "  publish→deliver latency (ms)       p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  worst device p99 {:.1}",
        l.p50, l.p99, l.p999, l.max, l.worst_device_p99
    );
    if !c.faults.is_empty() {
        let _ = writeln!(s, "  faults:");
        for f in &c.faults {
            let ms = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.0} ms"));
            let _ = writeln!(
                s,
                "    {:>7.1} s  {:<40} {:>6.1} s long  throughput back in {:<9} worst user stall {}",
                f.t / 1e3,
                f.detail,
                (f.end - f.t) / 1e3,
                ms(f.recover_ms),
                ms(f.worst_user_stall_ms)
            );
        }
    }
    for e in &c.examples {
        let _ = writeln!(s, "  anomaly: {e}");
    }
    let _ = writeln!(
        s,
        "  verdict: {}",
        if c.valid {
            "VALID (no loss, no duplicate, no reordering, no gap)"
        } else {
            "INVALID"
        }
    );
    s
}

/// The restore check's counts (scenarios with a backup).
pub fn restore_summary(r: &RestoreCheck) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "  restored into a new cluster:");
    let rows: [(&str, u64, bool); 13] = [
        ("users", r.users, false),
        ("acknowledged before the backup", r.required, false),
        ("messages restored", r.restored, false),
        ("missing or at another seq", r.missing, true),
        ("not the original message", r.mismatched, true),
        ("gaps", r.gaps, true),
        ("devices", r.devices, false),
        (
            "  with a cursor confirmed before",
            r.cursors_bounded_below,
            false,
        ),
        ("cursors out of range", r.cursors_out_of_range, true),
        ("devices not resuming in order", r.resume_wrong, true),
        ("publishes retried", r.retries, false),
        ("  answered another seq", r.retry_wrong, true),
        ("new publishes not at end + 1", r.new_seq_wrong, true),
    ];
    counts(&mut s, 4, &rows);
    for e in &r.examples {
        let _ = writeln!(s, "    restore anomaly: {e}");
    }
    let _ = writeln!(
        s,
        "    restore verdict: {}",
        if r.valid { "VALID" } else { "INVALID" }
    );
    s
}

/// One line per count, indented by `indent`, its value in one column; a count that is an
/// anomaly is flagged when it is not 0.
fn counts(s: &mut String, indent: usize, rows: &[(&str, u64, bool)]) {
    for &(name, v, anomaly) in rows {
        let flag = if anomaly && v > 0 {
            "  <-- ANOMALY"
        } else {
            ""
        };
        let _ = writeln!(s, "{:indent$}{name:<w$} {v:>9}{flag}", "", w = 36 - indent);
    }
}
