//! Checks a history against Warbler's delivery invariants (../shared/DESIGN.md): nothing
//! acknowledged is lost, every device gets its user's stream in seq order without gaps, one
//! id keeps one seq and one seq one id, and nothing arrives that nobody published.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{Event, Outcome};

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// The highest per-device p99: the device that had it worst.
    pub worst_device_p99: f64,
}

/// One second of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the second, in seconds since the run started.
    pub t: f64,
    pub acked: u64,
    /// Attempts that ended failed or unknown.
    pub errors: u64,
    pub delivered: u64,
    /// Publish → delivery latency of the deliveries in this second (ms).
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// What one fault did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultEffect {
    pub action: String,
    pub targets: Vec<usize>,
    pub detail: String,
    pub t: f64,
    pub end: f64,
    /// From the fault to the first second-long window whose acknowledgements reach half the
    /// rate of the 5 s before it (ms); 0 when the rate never fell that low, None when it
    /// never came back before the run ended.
    pub recover_ms: Option<f64>,
    /// The longest any user active just before the fault waited for its next acknowledged
    /// publish (ms).
    pub worst_user_stall_ms: Option<f64>,
}

/// The checker's verdict.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Distinct message ids publishers tried.
    pub attempted: u64,
    /// Ids acknowledged with a seq (at least once).
    pub acknowledged: u64,
    /// Ids whose every attempt was refused for good.
    pub failed: u64,
    /// Ids never acknowledged and not refused for good: their fate was unknown to the client.
    pub unknown: u64,
    /// Attempts the server refused as `overloaded` (stored nothing; the publisher retries
    /// the same id after a pause). Counted, not an anomaly.
    #[serde(default)]
    pub overloaded: u64,
    /// Unknown ids that were delivered anyway.
    pub recovered: u64,
    /// Distinct ids delivered to at least one device.
    pub delivered: u64,
    /// Deliveries in all (redeliveries after a reconnect included).
    pub deliveries: u64,
    pub devices: u64,
    /// Acknowledged ids some device of the user never received.
    pub lost: u64,
    /// Deliveries of ids nobody published to that user, with a wrong body, or refused for
    /// good.
    pub unexpected: u64,
    /// Ids that appear with two or more seqs (acknowledgements and deliveries together).
    pub duplicate_assignments: u64,
    /// Seqs of one user that appear with two or more ids.
    pub seq_reuse: u64,
    /// Within one connection, a seq at or below one delivered before it.
    pub order_violations: u64,
    /// Within one connection, a seq skipped; or a cursor beyond anything delivered.
    pub gaps: u64,
    /// Pairs where a publish acknowledged before another was first sent got the higher seq.
    pub real_time_violations: u64,
    /// Publishes one publisher sent to one user (ids `p<publisher>-<n>`, n in send order)
    /// whose seqs do not rise with n: the order a connection sent them in was not kept.
    #[serde(default)]
    pub send_order_violations: u64,
    /// Devices whose final read did not reach the end of their user's stream.
    pub undrained_devices: u64,
    pub latency: Latency,
    /// The first anomalies found, described for a person.
    pub examples: Vec<String>,
    pub timeline: Vec<Bucket>,
    pub faults: Vec<FaultEffect>,
    pub valid: bool,
}

const MAX_EXAMPLES: usize = 20;

/// The error code of a publish refused because the leader cannot keep up.
pub const OVERLOADED: &str = "overloaded";

#[derive(Default)]
struct IdInfo {
    user: String,
    first_start: f64,
    first_ack: Option<f64>,
    acked_seqs: Vec<u64>,
    any_unknown: bool,
    any_failed: bool,
}

#[derive(Default)]
struct DeviceState {
    user: String,
    /// Next seq due in the current connection.
    next: Option<u64>,
    max_delivered: u64,
    ids: HashSet<String>,
    seqs_seen: HashSet<u64>,
    latencies: Vec<f64>,
}

/// Checks `events` (in the order they were recorded).
pub fn check(events: &[Event]) -> Check {
    let mut c = Check::default();

    // Publishes.
    let mut ids: HashMap<&str, IdInfo> = HashMap::new();
    for e in events {
        if let Event::Publish {
            t,
            end,
            user,
            id,
            outcome,
            ..
        } = e
        {
            let info = ids.entry(id).or_insert_with(|| IdInfo {
                user: user.clone(),
                first_start: *t,
                ..IdInfo::default()
            });
            info.first_start = info.first_start.min(*t);
            match outcome {
                Outcome::Ok { seq } => {
                    info.acked_seqs.push(*seq);
                    info.first_ack = Some(info.first_ack.map_or(*end, |a: f64| a.min(*end)));
                }
                Outcome::Failed { .. } => info.any_failed = true,
                Outcome::Unknown { why } => {
                    info.any_unknown = true;
                    c.overloaded += u64::from(why == OVERLOADED);
                }
            }
        }
    }
    c.attempted = ids.len() as u64;

    // Deliveries, per device, connection by connection.
    let mut devices: BTreeMap<&str, DeviceState> = BTreeMap::new();
    let mut delivered_ids: HashSet<&str> = HashSet::new();
    let mut id_seqs: HashMap<&str, HashSet<u64>> = HashMap::new();
    let mut seq_ids: HashMap<(&str, u64), HashSet<&str>> = HashMap::new();
    for info in ids.iter() {
        for s in &info.1.acked_seqs {
            id_seqs.entry(info.0).or_default().insert(*s);
            seq_ids
                .entry((info.1.user.as_str(), *s))
                .or_default()
                .insert(info.0);
        }
    }
    for e in events {
        match e {
            Event::Connect {
                device,
                user,
                cursor,
                ..
            } => {
                let d = devices.entry(device).or_default();
                d.user = user.clone();
                if *cursor > d.max_delivered {
                    c.gaps += 1;
                    note(
                        &mut c,
                        format!(
                            "{device}: connected with cursor {cursor}, beyond the last seq it was delivered ({})",
                            d.max_delivered
                        ),
                    );
                }
                d.next = Some(cursor + 1);
            }
            Event::Disconnect { device, .. } => {
                if let Some(d) = devices.get_mut(device.as_str()) {
                    d.next = None;
                }
            }
            Event::Deliver {
                t,
                device,
                user,
                seq,
                id,
                body_ok,
            } => {
                c.deliveries += 1;
                let d = devices.entry(device).or_default();
                if d.user.is_empty() {
                    d.user = user.clone();
                }
                match d.next {
                    Some(next) if *seq == next => {}
                    Some(next) if *seq < next => {
                        c.order_violations += 1;
                        note(
                            &mut c,
                            format!("{device}: seq {seq} arrived where {next} was due"),
                        );
                    }
                    Some(next) => {
                        c.gaps += 1;
                        note(
                            &mut c,
                            format!(
                                "{device}: seq {seq} arrived where {next} was due ({} skipped)",
                                seq - next
                            ),
                        );
                    }
                    None => {}
                }
                d.next = Some(seq + 1);
                d.max_delivered = d.max_delivered.max(*seq);
                delivered_ids.insert(id);
                id_seqs.entry(id).or_default().insert(*seq);
                seq_ids.entry((user.as_str(), *seq)).or_default().insert(id);
                let first_here = d.seqs_seen.insert(*seq);
                d.ids.insert(id.clone());
                match ids.get(id.as_str()) {
                    Some(info) if info.user == *user && *body_ok && !is_failed(info) => {
                        if first_here {
                            d.latencies.push(t - info.first_start);
                        }
                    }
                    Some(info) if is_failed(info) => {
                        c.unexpected += 1;
                        note(
                            &mut c,
                            format!(
                                "{device}: got {id} (seq {seq}), which the server refused for good"
                            ),
                        );
                    }
                    _ => {
                        c.unexpected += 1;
                        note(
                            &mut c,
                            format!("{device}: got {id} (seq {seq}), which nobody published to {user} with that body"),
                        );
                    }
                }
            }
            Event::Drained {
                device,
                upto,
                reached,
                ..
            } if reached < upto => {
                c.undrained_devices += 1;
                note(
                    &mut c,
                    format!("{device}: its final read stopped at seq {reached} of {upto}"),
                );
            }
            _ => {}
        }
    }
    c.devices = devices.len() as u64;
    c.delivered = delivered_ids.len() as u64;

    for (id, seqs) in &id_seqs {
        if seqs.len() > 1 {
            c.duplicate_assignments += 1;
            let mut v: Vec<_> = seqs.iter().collect();
            v.sort();
            note(&mut c, format!("{id} holds several seqs: {v:?}"));
        }
    }
    for ((user, seq), holders) in &seq_ids {
        if holders.len() > 1 {
            c.seq_reuse += 1;
            let mut v: Vec<_> = holders.iter().collect();
            v.sort();
            note(&mut c, format!("{user} seq {seq} holds several ids: {v:?}"));
        }
    }

    // Outcomes, losses, real-time order.
    let mut by_user_devices: HashMap<&str, Vec<&DeviceState>> = HashMap::new();
    for d in devices.values() {
        by_user_devices.entry(d.user.as_str()).or_default().push(d);
    }
    let mut acked_by_user: HashMap<&str, Vec<(u64, f64, f64)>> = HashMap::new();
    let mut sorted_ids: Vec<(&&str, &IdInfo)> = ids.iter().collect();
    sorted_ids.sort_by(|a, b| a.0.cmp(b.0));
    for (id, info) in sorted_ids {
        if let (Some(&seq), Some(ack)) = (info.acked_seqs.first(), info.first_ack) {
            c.acknowledged += 1;
            acked_by_user
                .entry(info.user.as_str())
                .or_default()
                .push((seq, info.first_start, ack));
            let missing = by_user_devices.get(info.user.as_str()).map_or(0, |ds| {
                ds.iter().filter(|d| !d.ids.contains(*id as &str)).count()
            });
            if missing > 0 {
                c.lost += 1;
                note(
                    &mut c,
                    format!(
                        "{id} was acknowledged as seq {seq} of {} but {} of its devices never got it",
                        info.user, missing
                    ),
                );
            }
        } else if info.any_unknown {
            c.unknown += 1;
            if delivered_ids.contains(*id) {
                c.recovered += 1;
            }
        } else if info.any_failed {
            c.failed += 1;
        }
    }
    for (user, mut acked) in acked_by_user {
        // Descending seq; the earliest acknowledgement among higher seqs must not precede
        // this id's first send.
        acked.sort_by_key(|a| std::cmp::Reverse(a.0));
        let mut min_ack_above = f64::INFINITY;
        for (seq, start, ack) in acked {
            if min_ack_above < start {
                c.real_time_violations += 1;
                note(
                    &mut c,
                    format!("{user}: seq {seq} was first sent at {start:.0} ms, after a higher seq was acknowledged at {min_ack_above:.0} ms"),
                );
            }
            min_ack_above = min_ack_above.min(ack);
        }
    }

    send_order(events, &mut c);

    c.latency = latency(devices.values().map(|d| d.latencies.as_slice()));
    c.timeline = timeline(events, &ids);
    c.faults = fault_effects(events, &ids);
    c.valid = c.lost == 0
        && c.unexpected == 0
        && c.duplicate_assignments == 0
        && c.seq_reuse == 0
        && c.order_violations == 0
        && c.gaps == 0
        && c.real_time_violations == 0
        && c.send_order_violations == 0
        && c.undrained_devices == 0;
    c
}

/// Per publisher and user, the acknowledged seqs must rise in the order the publisher
/// numbered its ids (the order it first sent them), however many were in flight.
fn send_order(events: &[Event], c: &mut Check) {
    let mut sent: HashMap<(u32, &str), BTreeMap<u64, u64>> = HashMap::new();
    for e in events {
        if let Event::Publish {
            publisher,
            user,
            id,
            outcome: Outcome::Ok { seq },
            ..
        } = e
        {
            let n = id
                .strip_prefix(&format!("p{publisher}-"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(n) = n {
                sent.entry((*publisher, user)).or_default().insert(n, *seq);
            }
        }
    }
    let mut runs: Vec<_> = sent.into_iter().collect();
    runs.sort_by_key(|((p, u), _)| (*p, *u));
    for ((publisher, user), seqs) in runs {
        let mut before: Option<(u64, u64)> = None;
        for (n, seq) in seqs {
            if let Some((m, s)) = before.filter(|&(_, s)| seq <= s) {
                c.send_order_violations += 1;
                note(
                    c,
                    format!("{user}: p{publisher}-{n} got seq {seq}, yet p{publisher}-{m}, sent before it, got {s}"),
                );
            }
            before = Some((n, seq));
        }
    }
}

fn note(c: &mut Check, s: String) {
    if c.examples.len() < MAX_EXAMPLES {
        c.examples.push(s);
    }
}

fn is_failed(info: &IdInfo) -> bool {
    info.any_failed && !info.any_unknown && info.acked_seqs.is_empty()
}

/// The `q` quantile of sorted `v` (nearest rank).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn latency<'a>(per_device: impl Iterator<Item = &'a [f64]>) -> Latency {
    let mut all = Vec::new();
    let mut worst: f64 = 0.0;
    for d in per_device {
        let s = sorted(d.to_vec());
        worst = worst.max(quantile(&s, 0.99));
        all.extend_from_slice(&s);
    }
    let all = sorted(all);
    Latency {
        p50: quantile(&all, 0.5),
        p99: quantile(&all, 0.99),
        p999: quantile(&all, 0.999),
        max: all.last().copied().unwrap_or(0.0),
        worst_device_p99: worst,
    }
}

fn timeline(events: &[Event], ids: &HashMap<&str, IdInfo>) -> Vec<Bucket> {
    let end = events.iter().map(Event::time).fold(0.0, f64::max);
    let n = (end / 1000.0).ceil() as usize + 1;
    let mut buckets: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            t: i as f64,
            ..Bucket::default()
        })
        .collect();
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    let slot = |t: f64| ((t / 1000.0) as usize).min(n - 1);
    for e in events {
        match e {
            Event::Publish { end, outcome, .. } => match outcome {
                Outcome::Ok { .. } => buckets[slot(*end)].acked += 1,
                _ => buckets[slot(*end)].errors += 1,
            },
            Event::Deliver { t, id, .. } => {
                buckets[slot(*t)].delivered += 1;
                if let Some(info) = ids.get(id.as_str()) {
                    lat[slot(*t)].push(t - info.first_start);
                }
            }
            _ => {}
        }
    }
    for (b, l) in buckets.iter_mut().zip(lat) {
        let l = sorted(l);
        b.p50_ms = quantile(&l, 0.5);
        b.p99_ms = quantile(&l, 0.99);
    }
    buckets
}

fn fault_effects(events: &[Event], ids: &HashMap<&str, IdInfo>) -> Vec<FaultEffect> {
    let mut acks: Vec<f64> = ids.values().filter_map(|i| i.first_ack).collect();
    acks.sort_by(|a, b| a.total_cmp(b));
    let count = |from: f64, to: f64| {
        let lo = acks.partition_point(|&a| a < from);
        let hi = acks.partition_point(|&a| a < to);
        (hi - lo) as f64
    };
    let run_end = acks.last().copied().unwrap_or(0.0);
    // Per user, acknowledgement times in order.
    let mut user_acks: HashMap<&str, Vec<f64>> = HashMap::new();
    for i in ids.values() {
        if let Some(a) = i.first_ack {
            user_acks.entry(i.user.as_str()).or_default().push(a);
        }
    }
    for v in user_acks.values_mut() {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let mut out = Vec::new();
    for e in events {
        let Event::Fault {
            t,
            end,
            action,
            targets,
            detail,
        } = e
        else {
            continue;
        };
        let before = count(t - 5000.0, *t) / 5.0;
        let recover_ms = if before <= 0.0 {
            None
        } else {
            let mut tau = *t;
            loop {
                if tau + 1000.0 > run_end {
                    break None;
                }
                if count(tau, tau + 1000.0) >= 0.5 * before {
                    break Some(tau - t);
                }
                tau += 100.0;
            }
        };
        let mut worst: Option<f64> = None;
        for v in user_acks.values() {
            let i = v.partition_point(|&a| a < *t);
            if i == 0 || i == v.len() || t - v[i - 1] > 1000.0 {
                continue;
            }
            let stall = v[i] - t;
            worst = Some(worst.map_or(stall, |w| w.max(stall)));
        }
        out.push(FaultEffect {
            action: action.clone(),
            targets: targets.clone(),
            detail: detail.clone(),
            t: *t,
            end: *end,
            recover_ms,
            worst_user_stall_ms: worst,
        });
    }
    out
}
