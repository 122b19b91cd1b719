//! What the poller makes of probation (`src/bpf/probation.h`): flows the kernel evicted there, per protocol, derived from the datapath's counters and the scan's count of what waits; and the scan's tally of where unanswered flows come from and go to.

use crate::kernel::datapath::{probation_counter, PROBE_PROTOS};
use std::collections::BTreeMap;

/// Ports shown, most flows first.
pub const TOP_PORTS: usize = 5;

/// One protocol's flows through probation since the counters began (pinned maps: across
/// agent restarts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbationProto {
    pub protocol: &'static str,
    /// Flows that entered probation (their first packet).
    pub entered: u64,
    /// Moved to the base map once answered.
    pub admitted: u64,
    /// Ended there and reported (idle, reset, shutdown).
    pub ended: u64,
    /// Evicted by the kernel to make room: never reported. Derived: entered, less
    /// admitted, ended and waiting (a lower bound while flows come in during the count).
    pub evicted: u64,
    /// In probation at the last full scan.
    pub waiting: u64,
}

/// A port unanswered flows went to, with how many the scan tallied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbationPort {
    pub protocol: &'static str,
    pub port: u16,
    pub flows: u64,
}

/// Probation as operators see it (`flowlens status`, metrics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbationStatus {
    pub protocols: Vec<ProbationProto>,
    pub capacity: u64,
    /// Distinct client addresses among the unanswered flows the scan found waiting (a
    /// HyperLogLog estimate, ~6.5 % standard error). A sample: a flood faster than the
    /// scan's rounds evicts flows the scan never sees (compare `tallied` with the
    /// flows that entered).
    pub sources_estimate: u64,
    /// Flows the scan tallied (each once).
    pub tallied: u64,
    /// The answering side's ports most tallied flows went to (0 for ICMP and others).
    pub top_ports: Vec<ProbationPort>,
}

/// The raw tally the scan keeps in the kernel.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub tallied: u64,
    pub registers: Vec<u8>,
    /// (IP protocol, port) -> flows.
    pub ports: Vec<((u8, u16), u64)>,
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        6 => "tcp",
        17 => "udp",
        1 | 58 => "icmp",
        _ => "other",
    }
}

/// The HyperLogLog estimate of distinct values from its registers (with the small-range
/// correction).
pub fn hll_estimate(reg: &[u8]) -> u64 {
    let m = reg.len() as f64;
    if reg.is_empty() {
        return 0;
    }
    let alpha = 0.7213 / (1.0 + 1.079 / m);
    let sum: f64 = reg.iter().map(|r| (-f64::from(*r)).exp2()).sum();
    let e = alpha * m * m / sum;
    let zeros = reg.iter().filter(|r| **r == 0).count();
    if e <= 2.5 * m && zeros > 0 {
        (m * (m / zeros as f64).ln()).round() as u64
    } else {
        e.round() as u64
    }
}

/// Keeps the derived evictions monotonic across polls.
#[derive(Debug, Default)]
pub struct EvictionCount {
    evicted: [u64; 4],
}

impl EvictionCount {
    /// Per-protocol figures from the counters read before the scan (`entered`), those
    /// read after it (`admitted`, `ended`) and the scan's count of what waits: a count
    /// taken while flows come and go can only come out low, so it never goes down.
    pub fn update(
        &mut self,
        before: &BTreeMap<String, u64>,
        after: &BTreeMap<String, u64>,
        waiting: [u64; 4],
    ) -> Vec<ProbationProto> {
        let get = |m: &BTreeMap<String, u64>, what, p| {
            m.get(probation_counter(what, p)).copied().unwrap_or(0)
        };
        PROBE_PROTOS
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let entered = get(before, "new", p);
                let admitted = get(after, "admitted", p);
                let ended = get(after, "ended", p);
                let left = entered.saturating_sub(admitted + ended + waiting[i]);
                self.evicted[i] = self.evicted[i].max(left);
                ProbationProto {
                    protocol: p,
                    entered: get(after, "new", p),
                    admitted,
                    ended,
                    evicted: self.evicted[i],
                    waiting: waiting[i],
                }
            })
            .collect()
    }
}

impl Tally {
    /// The operator's view of the tally, with the per-protocol figures.
    pub fn status(&self, protocols: Vec<ProbationProto>, capacity: u64) -> ProbationStatus {
        let mut ports: Vec<ProbationPort> = self
            .ports
            .iter()
            .map(|((proto, port), flows)| ProbationPort {
                protocol: proto_name(*proto),
                port: *port,
                flows: *flows,
            })
            .collect();
        ports.sort_by(|a, b| b.flows.cmp(&a.flows).then(a.port.cmp(&b.port)));
        ports.truncate(TOP_PORTS);
        ProbationStatus {
            protocols,
            capacity,
            sources_estimate: hll_estimate(&self.registers),
            tallied: self.tallied,
            top_ports: ports,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sketch_estimates_distinct_sources_within_a_few_percent() {
        // The same register update as scan.h's probe_tally, over n distinct sources.
        for n in [1u32, 10, 200, 5_000, 100_000] {
            let mut reg = vec![0u8; 256];
            for i in 0..n {
                let mut h: u32 = 0;
                for w in [0u32, 0, 0xffff_0000u32.to_be(), (0x0a00_0000 + i).to_be()] {
                    h = (h ^ w).wrapping_mul(0xcc9e_2d51);
                }
                h ^= h >> 16;
                h = h.wrapping_mul(0x85eb_ca6b);
                h ^= h >> 13;
                h = h.wrapping_mul(0xc2b2_ae35);
                h ^= h >> 16;
                let mut x = h >> 8;
                let mut rank = 1u8;
                for _ in 0..24 {
                    if x & 1 != 0 {
                        break;
                    }
                    rank += 1;
                    x >>= 1;
                }
                let r = &mut reg[(h & 255) as usize];
                *r = (*r).max(rank);
            }
            let e = hll_estimate(&reg) as f64;
            let err = (e - f64::from(n)).abs() / f64::from(n);
            assert!(err < 0.2, "{n} sources estimated {e}");
        }
    }

    #[test]
    fn evictions_are_derived_and_never_go_down() {
        let mut c = EvictionCount::default();
        let m = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let before = m(&[("probation_new_tcp", 100)]);
        let after = m(&[
            ("probation_new_tcp", 120),
            ("probation_admitted_tcp", 10),
            ("probation_ended_tcp", 5),
        ]);
        let p = c.update(&before, &after, [20, 0, 0, 0]);
        assert_eq!(p[0].evicted, 65);
        assert_eq!(p[0].entered, 120);
        // A later count that comes out lower (flows counted waiting meanwhile) keeps it.
        let p = c.update(&before, &after, [40, 0, 0, 0]);
        assert_eq!(p[0].evicted, 65);
    }
}
