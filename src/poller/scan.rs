//! The poller's side of the in-kernel scan (`src/bpf/scan.h`): its arguments, what it returns, and the same rules in Rust for the in-memory table.

use super::decode::{decode, tcp_hot, RawFlow};
use super::PollerConfig;
use crate::kernel::bpf::types;
use crate::record::flow::{EndReason, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

/// What one scan pass found: flows it ended (already gone from every map) and flows due
/// an active-timeout record (left in place), in map order.
#[derive(Debug, Default)]
pub struct Scanned {
    pub flows: Vec<(ScanKind, RawFlow)>,
    /// Entries in flows, flows_tcp and flows_icmp after the pass.
    pub entries: [u64; 3],
    /// The pass stopped with its output full: scan again for the rest.
    pub truncated: bool,
    /// Entries each map still had to give up by eviction when the pass ended.
    pub evict_left: [u64; 3],
}

impl Scanned {
    /// Whether another pass would find more: this one filled its output, and made
    /// progress (each flow it copied is ended or marked, so the next finds what it left).
    pub fn more_due(&self) -> bool {
        self.truncated && !self.flows.is_empty()
    }
}

/// What the scan did with a flow (`enum scan_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanKind {
    /// Due an active-timeout record; still in the maps.
    Active,
    /// Ended and deleted from every map.
    Ended(EndReason),
}

impl ScanKind {
    pub fn from_raw(kind: u8) -> Option<ScanKind> {
        use types::scan_kind as K;
        Some(match u32::from(kind) {
            k if k == K::SCAN_ACTIVE.0 => ScanKind::Active,
            k if k == K::SCAN_END_IDLE.0 => ScanKind::Ended(EndReason::IdleTimeout),
            k if k == K::SCAN_END_FIN.0 => ScanKind::Ended(EndReason::TcpFin),
            k if k == K::SCAN_END_RST.0 => ScanKind::Ended(EndReason::TcpRst),
            k if k == K::SCAN_END_FLUSH.0 => ScanKind::Ended(EndReason::Shutdown),
            k if k == K::SCAN_END_EVICT.0 => ScanKind::Ended(EndReason::Evicted),
            _ => return None,
        })
    }
}

/// The scan's arguments for a poll at `now_ns` whose previous poll ran at `prev_ns`.
pub fn args(cfg: &PollerConfig, now_ns: u64, prev_ns: u64, flush: bool) -> types::scan_args {
    let ns = |d: std::time::Duration| d.as_nanos().min(u128::from(u64::MAX)) as u64;
    let mut idle_ns = [0u64; types::scan_proto::SCAN_PROTOS.0 as usize];
    idle_ns[types::scan_proto::SCAN_TCP.0 as usize] = ns(cfg.idle_tcp);
    idle_ns[types::scan_proto::SCAN_UDP.0 as usize] = ns(cfg.idle_udp);
    idle_ns[types::scan_proto::SCAN_ICMP.0 as usize] = ns(cfg.idle_icmp);
    idle_ns[types::scan_proto::SCAN_OTHER.0 as usize] = ns(cfg.idle_other);
    types::scan_args {
        now_ns,
        prev_ns,
        idle_ns,
        close_grace_ns: ns(cfg.tcp_close_grace),
        active_ns: ns(cfg.active_timeout),
        flush: u32::from(flush),
        ..Default::default()
    }
}

/// The arguments of a pass over the flows the datapath noted as closed, alone: they end
/// once past the close grace; nothing else is judged.
pub fn closing_args(cfg: &PollerConfig, now_ns: u64) -> types::scan_args {
    types::scan_args {
        closing_only: 1,
        active_ns: 0,
        ..args(cfg, now_ns, 0, false)
    }
}

/// Whether the datapath notes a flow as closed (`tcp_note_close`).
pub fn is_closed(b: &types::flow_base) -> bool {
    close_reason(b).is_some()
}

/// The end a closed TCP flow gets: RST or FIN both ways (`enum tcp_state`).
fn close_reason(b: &types::flow_base) -> Option<EndReason> {
    match u32::from(tcp_hot(b)?.state) {
        s if s == types::tcp_state::TCP_ST_RESET.0 => Some(EndReason::TcpRst),
        s if s == types::tcp_state::TCP_ST_CLOSED.0 => Some(EndReason::TcpFin),
        _ => None,
    }
}

fn proto_slot(proto: u8) -> usize {
    use types::scan_proto as P;
    (match proto {
        IPPROTO_TCP => P::SCAN_TCP,
        IPPROTO_UDP => P::SCAN_UDP,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => P::SCAN_ICMP,
        _ => P::SCAN_OTHER,
    })
    .0 as usize
}

/// `scan_due` of scan.h, for the in-memory table: what the scan does with a flow, and
/// the active-timeout window it is in.
pub fn due(
    key: &types::flow_key,
    b: &types::flow_base,
    a: &types::scan_args,
) -> Option<(ScanKind, u64)> {
    let now = a.now_ns;
    let idle = now.saturating_sub(b.last_seen_ns);
    if a.flush != 0 {
        return Some((ScanKind::Ended(EndReason::Shutdown), 0));
    }
    if idle >= a.close_grace_ns {
        if let Some(reason) = close_reason(b) {
            return Some((ScanKind::Ended(reason), 0));
        }
    }
    if idle >= a.idle_ns[proto_slot(key.proto)] {
        return Some((ScanKind::Ended(EndReason::IdleTimeout), 0));
    }
    if a.active_ns == 0 || now <= b.first_seen_ns || b.last_seen_ns < a.prev_ns {
        return None;
    }
    let window = (now - b.first_seen_ns) / a.active_ns;
    (window != 0 && window as u8 != b.windows).then_some((ScanKind::Active, window))
}

/// `scan_may_evict` of scan.h: a flow no other rule ends that sent one packet, was never
/// reported and has been quiet for the eviction age.
pub fn may_evict(b: &types::flow_base, a: &types::scan_args) -> bool {
    a.evict_age_ns != 0
        && a.now_ns.saturating_sub(b.last_seen_ns) >= a.evict_age_ns
        && b.windows == 0
        && b.packets[0] + b.packets[1] == 1
}

/// `scan_take_need` of scan.h: whether evicting a flow that holds the given extension
/// entries frees one some map must give up; takes it off the need.
pub fn take_need(a: &mut types::scan_args, tcp: bool, icmp: bool) -> bool {
    let need = &mut a.evict_need;
    if need[0] == 0 && !(tcp && need[1] > 0) && !(icmp && need[2] > 0) {
        return false;
    }
    need[0] = need[0].saturating_sub(1);
    if tcp {
        need[1] = need[1].saturating_sub(1);
    }
    if icmp {
        need[2] = need[2].saturating_sub(1);
    }
    true
}

/// Decodes one record of `scan_out`, with its flow's owners from the same slot of
/// `scan_owner_out`.
pub fn decode_rec(r: &types::scan_rec, o: &types::scan_owner) -> Option<(ScanKind, RawFlow)> {
    let kind = ScanKind::from_raw(r.kind)?;
    Some((
        kind,
        RawFlow {
            key: r.key,
            base: decode(&r.base),
            tcp: (r.has_tcp != 0).then_some(r.tcp),
            icmp: (r.has_icmp != 0).then_some(r.icmp),
            owner: [0, 1].map(|end| (o.has[end] != 0).then_some(o.side[end])),
        },
    ))
}
