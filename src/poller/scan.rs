//! The poller's side of the in-kernel scan (`src/bpf/scan.h`): its arguments, what it returns, and the same rules in Rust for the in-memory table.

use super::decode::{decode, meta, tcp_hot, RawFlow};
use super::PollerConfig;
use crate::kernel::bpf::types;
use crate::record::flow::{EndReason, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

/// What one scan did, once every pass it took was over (its flows went to the sink as
/// they came).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanSummary {
    /// Entries in flows, flows_tcp and flows_icmp after the scan.
    pub entries: [u64; 3],
    /// Entries each map still had to give up by eviction when the scan ended.
    pub evict_left: [u64; 3],
    /// Walks of the map it took: more than one when the poller fell a whole ring behind.
    pub passes: u32,
    /// Whether it was split among concurrent scans (a bulk end).
    pub split: bool,
    /// Flows left waiting in probation, by `enum scan_proto`, when the scan walked all
    /// of it.
    pub probation: Option<[u64; 4]>,
}

/// What the scan did with a flow (`enum scan_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanKind {
    /// Due an active-timeout record; still in the maps, less the counts the record
    /// carries.
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
/// once past the close grace; nothing else is judged (a closed flow never gets an
/// active-timeout record).
pub fn closing_args(cfg: &PollerConfig, now_ns: u64) -> types::scan_args {
    types::scan_args {
        closing_only: 1,
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

/// `window_of` of scan.h: the active-timeout window time `t` falls in (0: the first).
pub fn window_of(b: &types::flow_base, t: u64, active_ns: u64) -> u64 {
    if t > b.first_seen_ns && active_ns > 0 {
        (t - b.first_seen_ns) / active_ns
    } else {
        0
    }
}

/// `reported_window` of scan.h: the window the flow's last record was emitted in.
pub fn reported_window(b: &types::flow_base, now_ns: u64, active_ns: u64) -> u64 {
    super::decode::report_time(b, now_ns).map_or(0, |t| {
        window_of(b, t, active_ns) + u64::from(b.meta & meta::REPORT_CARRY != 0)
    })
}

/// `mark_reported` of scan.h: notes that a record carried the flow's counts up to `t`.
pub fn mark_reported(b: &mut types::flow_base, t: u64, active_ns: u64) {
    let units = t >> meta::REPORT_UNIT_SHIFT;
    let mut m = b.meta & (meta::IDENTITY | meta::CONTINUATION | meta::IDENTIFIED | meta::LOSSY);
    m |= meta::REPORTED | ((units & meta::REPORT_MASK) as u32) << meta::REPORT_SHIFT;
    if active_ns > 0
        && window_of(b, units << meta::REPORT_UNIT_SHIFT, active_ns) < window_of(b, t, active_ns)
    {
        m |= meta::REPORT_CARRY;
    }
    b.meta = m;
}

/// `tcp_flow` of scan.h: a TCP flow with its TCP state in the base entry.
pub fn is_tcp_flow(key: &types::flow_key, b: &types::flow_base) -> bool {
    key.proto == IPPROTO_TCP && tcp_hot(b).is_some()
}

/// `scan_due` of scan.h, for the in-memory table: what the scan does with a flow.
pub fn due(key: &types::flow_key, b: &types::flow_base, a: &types::scan_args) -> Option<ScanKind> {
    let now = a.now_ns;
    let idle = now.saturating_sub(b.last_seen_ns);
    if a.flush != 0 {
        return Some(ScanKind::Ended(EndReason::Shutdown));
    }
    let closed = close_reason(b).filter(|_| is_tcp_flow(key, b));
    if idle >= a.close_grace_ns {
        if let Some(reason) = closed {
            return Some(ScanKind::Ended(reason));
        }
    }
    if idle >= a.idle_ns[proto_slot(key.proto)] {
        return Some(ScanKind::Ended(EndReason::IdleTimeout));
    }
    if a.active_ns == 0 || b.last_seen_ns < a.prev_ns || b.packets == [0, 0] {
        return None;
    }
    let w = window_of(b, now, a.active_ns);
    if w == 0 || w <= reported_window(b, now, a.active_ns) || closed.is_some() {
        return None;
    }
    Some(ScanKind::Active)
}

/// `scan_may_evict` of scan.h: a flow no other rule ends that sent one packet, was never
/// reported and has been quiet for the eviction age.
pub fn may_evict(b: &types::flow_base, a: &types::scan_args) -> bool {
    a.evict_age_ns != 0
        && a.now_ns.saturating_sub(b.last_seen_ns) >= a.evict_age_ns
        && b.packets[0] + b.packets[1] == 1
        && b.meta & meta::REPORTED == 0
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

/// Whether the scan looks a TCP flow about to get a record up in the memory of ended
/// connections (`scan_identify`): once, and only when its first packet was not its SYN.
pub fn wants_identity(b: &types::flow_base) -> bool {
    b.meta & meta::IDENTIFIED == 0
        && tcp_hot(b).is_some_and(|h| u32::from(h.bits) & types::tcp_bits::TCPB_SYN.0 == 0)
}

/// `scan_identify` of scan.h, once the memory gave `e`: the flow takes the connection's
/// identity and history back.
pub fn take_identity(b: &mut types::flow_base, e: &types::flow_ended, active_ns: u64) {
    use types::tcp_bits as B;
    let hs = (B::TCPB_SYN.0
        | B::TCPB_SYNACK.0
        | B::TCPB_HS_DONE.0
        | B::TCPB_CLIENT_HS.0
        | B::TCPB_SERVER_HS.0) as u8;
    // SAFETY: both union arms are plain integers; the caller checked it is a TCP flow.
    let mut h = unsafe { b.l4.tcp };
    h.flags[0] |= e.hot.flags[0];
    h.flags[1] |= e.hot.flags[1];
    h.bits |= e.hot.bits & hs;
    if u32::from(e.hot.bits) & B::TCPB_LATE_START.0 == 0 {
        h.bits &= !(B::TCPB_LATE_START.0 as u8);
    }
    h.syn_retrans = h.syn_retrans.saturating_add(e.hot.syn_retrans);
    if u32::from(e.hot.bits) & B::TCPB_CLIENT_HS.0 != 0 {
        b.handshake_client_ns = e.handshake_client_ns;
    }
    if u32::from(e.hot.bits) & B::TCPB_SERVER_HS.0 != 0 {
        b.handshake_server_ns = e.handshake_server_ns;
    }
    b.l4.tcp = h;
    b.first_seen_ns = e.first_seen_ns;
    b.meta =
        (b.meta & !meta::CLIENT_HI) | (u32::from(e.meta) & meta::CLIENT_HI) | meta::CONTINUATION;
    mark_reported(b, e.ended_ns, active_ns);
}

/// `scan_remember` of scan.h: what the memory of ended connections keeps of a TCP flow
/// ending idle at `now_ns`, when it is a connection that may resume (established, and
/// answered or already reported); None for anything else.
pub fn ended_of(b: &types::flow_base, now_ns: u64) -> Option<types::flow_ended> {
    use types::tcp_state as S;
    let h = tcp_hot(b)?;
    let st = u32::from(h.state);
    if st != S::TCP_ST_ESTABLISHED.0 && st != S::TCP_ST_FIN_WAIT.0 {
        return None;
    }
    if b.meta & meta::REPORTED == 0 && !(b.packets[0] > 0 && b.packets[1] > 0) {
        return None;
    }
    Some(types::flow_ended {
        first_seen_ns: b.first_seen_ns,
        ended_ns: now_ns,
        handshake_client_ns: b.handshake_client_ns,
        handshake_server_ns: b.handshake_server_ns,
        hot: h,
        meta: (b.meta & meta::CLIENT_HI) as u8,
        ..Default::default()
    })
}

/// Decodes one record of `scan_ring`.
pub fn decode_rec(r: &types::scan_rec) -> Option<(ScanKind, RawFlow)> {
    let kind = ScanKind::from_raw(r.kind)?;
    Some((
        kind,
        RawFlow {
            key: r.key,
            base: decode(&r.base),
            tcp: (r.has_tcp != 0).then_some(r.tcp),
            icmp: (r.has_icmp != 0).then_some(r.icmp),
            owner: [0, 1].map(|end| (r.has_owner >> end & 1 != 0).then_some(r.owner[end])),
        },
    ))
}
