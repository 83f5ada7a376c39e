//! Placement of partitions on nodes: consistent hashing with virtual nodes.
//!
//! Each node owns `vnodes` points on a 64-bit ring, at `mix64(fnv1a64("<node>#<i>"))`. The
//! replicas of partition `p` are the first `min(R, N)` *distinct* nodes met walking
//! clockwise from `mix64(fnv1a64("partition-<p>"))`; the first is the preferred leader.
//! Adding a node only inserts its points: a partition's replica list changes only where the
//! new node's points land in front of it, so about `R/(N+1)` of the replica slots move, all
//! to the new node, and nothing else moves.
//!
//! Pure functions, no I/O: membership feeds it the serving members; tests drive it directly.

use crate::partition::fnv1a64;
use crate::PartitionId;

/// Virtual nodes per node: enough points that 64 partitions x 3 replicas spread evenly over
/// a handful of nodes, few enough that rebuilding the ring on a membership change is cheap.
pub const VNODES_DEFAULT: u32 = 256;

/// The 64-bit finalizer of MurmurHash3: spreads FNV's output over the whole ring (FNV alone
/// clusters similar strings such as `node-1#0`, `node-1#1`).
pub fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A ring over a set of nodes.
#[derive(Debug, Clone)]
pub struct Ring {
    nodes: Vec<String>,
    /// (point, index into `nodes`), sorted by point.
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Builds the ring. Duplicate node names count once.
    pub fn new<I, S>(nodes: I, vnodes: u32) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        nodes.sort();
        nodes.dedup();
        let mut points = Vec::with_capacity(nodes.len() * vnodes as usize);
        for (i, node) in nodes.iter().enumerate() {
            for v in 0..vnodes {
                points.push((mix64(fnv1a64(format!("{node}#{v}").as_bytes())), i));
            }
        }
        points.sort_unstable();
        Ring { nodes, points }
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The ordered replicas of `partition`: `min(r, N)` distinct nodes, preferred leader
    /// first.
    pub fn replicas(&self, partition: PartitionId, r: usize) -> Vec<&str> {
        let want = r.min(self.nodes.len());
        let mut out: Vec<&str> = Vec::with_capacity(want);
        if want == 0 {
            return out;
        }
        let start = mix64(fnv1a64(format!("partition-{partition}").as_bytes()));
        let first = self.points.partition_point(|(p, _)| *p < start);
        for k in 0..self.points.len() {
            let (_, i) = self.points[(first + k) % self.points.len()];
            let node = self.nodes[i].as_str();
            if !out.contains(&node) {
                out.push(node);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }

    /// Like [`Ring::replicas`], over zones: walking the same way, a node whose zone is
    /// already used is passed over while unused zones remain, so the replicas sit in
    /// `min(r, zones)` distinct zones; the rest are filled in ring order. Nodes without a
    /// zone share one. With every node in one zone (or none), this is [`Ring::replicas`].
    pub fn replicas_in_zones<'z>(
        &self,
        partition: PartitionId,
        r: usize,
        zone_of: &dyn Fn(&str) -> Option<&'z str>,
    ) -> Vec<&str> {
        let walk = self.replicas(partition, self.nodes.len());
        let want = r.min(walk.len());
        let zones: std::collections::HashSet<Option<&'z str>> =
            walk.iter().map(|n| zone_of(n)).collect();
        let spread = want.min(zones.len());
        let mut out: Vec<&str> = Vec::with_capacity(want);
        let mut used: Vec<Option<&'z str>> = Vec::new();
        for n in &walk {
            if out.len() == spread {
                break;
            }
            let z = zone_of(n);
            if !used.contains(&z) {
                used.push(z);
                out.push(n);
            }
        }
        for n in &walk {
            if out.len() == want {
                break;
            }
            if !out.contains(n) {
                out.push(n);
            }
        }
        out
    }

    /// Replicas of every partition `0..partitions`.
    pub fn assignment(&self, partitions: u16, r: usize) -> Vec<Vec<&str>> {
        (0..partitions).map(|p| self.replicas(p, r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("warbler-{i}")).collect()
    }

    #[test]
    fn replicas_spread_over_zones_when_there_are_enough_and_match_the_plain_ring_without() {
        let nodes = names(6);
        let ring = Ring::new(nodes.clone(), VNODES_DEFAULT);
        let zone = |n: &str| -> Option<&'static str> {
            let i: usize = n.trim_start_matches("warbler-").parse().unwrap();
            Some(["a", "b", "c"][i / 2])
        };
        let mut first = HashMap::new();
        for p in 0..64 {
            let r = ring.replicas_in_zones(p, 3, &zone);
            assert_eq!(r.len(), 3);
            let zones: HashSet<_> = r.iter().map(|n| zone(n)).collect();
            assert_eq!(zones.len(), 3, "p={p}: {r:?} in distinct zones");
            *first.entry(r[0].to_string()).or_insert(0) += 1;
            // No zones (or one): the plain ring.
            assert_eq!(ring.replicas_in_zones(p, 3, &|_| None), ring.replicas(p, 3));
            assert_eq!(
                ring.replicas_in_zones(p, 3, &|_| Some("z")),
                ring.replicas(p, 3)
            );
            // Two zones for three replicas: both used, the third from the ring.
            let two = |n: &str| -> Option<&'static str> {
                Some(if n.ends_with('0') { "a" } else { "b" })
            };
            let r2 = ring.replicas_in_zones(p, 3, &two);
            assert_eq!(r2.iter().map(|n| two(n)).collect::<HashSet<_>>().len(), 2);
            assert_eq!(r2.iter().collect::<HashSet<_>>().len(), 3);
        }
        // Preferred leaders still spread over every node.
        assert_eq!(first.len(), 6, "{first:?}");
    }

    #[test]
    fn every_partition_gets_min_r_n_distinct_replicas() {
        for n in 0..=7 {
            let ring = Ring::new(names(n), VNODES_DEFAULT);
            for p in 0..64 {
                let r = ring.replicas(p, 3);
                assert_eq!(r.len(), 3.min(n), "n={n} p={p}");
                assert_eq!(r.iter().collect::<HashSet<_>>().len(), r.len(), "distinct");
            }
        }
    }

    #[test]
    fn placement_is_deterministic_and_independent_of_member_order() {
        let a = Ring::new(["c", "a", "b"], 64);
        let b = Ring::new(["b", "c", "a", "a"], 64);
        assert_eq!(a.assignment(64, 3), b.assignment(64, 3));
    }

    /// max/mean of replica slots per node, for the default 64 partitions x RF 3.
    fn imbalance(ring: &Ring, partitions: u16) -> f64 {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for reps in ring.assignment(partitions, 3) {
            for n in reps {
                *counts.entry(n).or_default() += 1;
            }
        }
        let max = *counts.values().max().unwrap() as f64;
        let mean = (partitions as usize * 3) as f64 / ring.nodes().len() as f64;
        max / mean
    }

    #[test]
    fn load_is_even() {
        for n in 3..=10 {
            let ring = Ring::new(names(n), VNODES_DEFAULT);
            let small = imbalance(&ring, 64);
            let large = imbalance(&ring, 4096);
            println!("n={n}: max/mean replica slots per node: {small:.2} (64 partitions), {large:.2} (4096)");
            // 64 partitions are few slots per node, so some unevenness is inherent; with
            // many partitions the virtual nodes alone decide, and they must be even.
            assert!(small <= 1.5, "n={n}: {small:.2}");
            assert!(large <= 1.15, "n={n}: {large:.2}");
        }
    }

    #[test]
    fn adding_a_node_moves_about_one_in_n_plus_one_slots_and_only_to_it() {
        const P: u16 = 4096;
        for n in 3..=9 {
            let before = Ring::new(names(n), VNODES_DEFAULT);
            let after = Ring::new(names(n + 1), VNODES_DEFAULT);
            let newcomer = format!("warbler-{n}");
            let mut moved = 0usize;
            for p in 0..P {
                let (old, new) = (before.replicas(p, 3), after.replicas(p, 3));
                let old_set: HashSet<&str> = old.iter().copied().collect();
                let gained: Vec<&&str> = new.iter().filter(|x| !old_set.contains(**x)).collect();
                assert!(
                    gained.iter().all(|x| **x == newcomer),
                    "p={p}: {old:?} -> {new:?}"
                );
                assert!(gained.len() <= 1, "p={p}: {old:?} -> {new:?}");
                moved += gained.len();
            }
            let fraction = moved as f64 / (P as usize * 3) as f64;
            let ideal = 1.0 / (n + 1) as f64;
            println!(
                "n={n} -> {}: {:.3} of replica slots moved (ideal {ideal:.3})",
                n + 1,
                fraction
            );
            assert!(
                (fraction - ideal).abs() < ideal * 0.25,
                "n={n}: moved {fraction:.3}, ideal {ideal:.3}"
            );
        }
    }

    #[test]
    fn removing_a_node_only_moves_its_own_slots() {
        let before = Ring::new(names(6), VNODES_DEFAULT);
        let after = Ring::new(
            names(6).into_iter().filter(|n| n != "warbler-2"),
            VNODES_DEFAULT,
        );
        for p in 0..1024 {
            let (old, new) = (before.replicas(p, 3), after.replicas(p, 3));
            if !old.contains(&"warbler-2") {
                assert_eq!(
                    old, new,
                    "p={p}: a partition without the leaver must not change"
                );
            }
        }
    }
}
