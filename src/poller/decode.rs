//! Decodes raw map entries (the skeleton's `types`) into flow records: the only place that knows both.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::kernel::bpf::types;
use crate::kernel::cgroup::CgroupNames;
use crate::record::flow::{
    DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, LocalProcess, TcpInfo, TcpState,
    IPPROTO_ICMP, IPPROTO_ICMPV6,
};

/// Direction slot of a per-direction array in the maps (`enum flow_dir`).
pub const LO_TO_HI: usize = types::flow_dir::DIR_LO_TO_HI.0 as usize;
pub const HI_TO_LO: usize = types::flow_dir::DIR_HI_TO_LO.0 as usize;

pub const KEY_SIZE: usize = std::mem::size_of::<types::flow_key>();
/// A flow key as the maps hash it (padding included, so it must come from a zeroed key).
pub type KeyBytes = [u8; KEY_SIZE];

pub fn key_bytes(k: &types::flow_key) -> KeyBytes {
    let mut b = [0u8; KEY_SIZE];
    // SAFETY: flow_key is Plain: its bytes, padding included, are plain data.
    b.copy_from_slice(unsafe { plain::as_bytes(k) });
    b
}

pub fn key_of(kb: &KeyBytes) -> types::flow_key {
    decode(kb)
}

/// Copies a map entry's bytes into its type; the map's value size is the type's size.
pub fn decode<T: plain::Plain + Default>(bytes: &[u8]) -> T {
    let mut v = T::default();
    plain::copy_from_bytes(&mut v, bytes).expect("map value size matches its type");
    v
}

/// Decodes a 16-byte key address (IPv4 is stored IPv4-mapped).
pub fn key_addr(raw: &[u8; 16], ip_version: u8) -> IpAddr {
    let v6 = Ipv6Addr::from(*raw);
    if ip_version == 4 {
        IpAddr::V4(Ipv4Addr::new(raw[12], raw[13], raw[14], raw[15]))
    } else {
        IpAddr::V6(v6)
    }
}

/// Encodes an address the way the datapath keys it.
pub fn addr_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Converts the BPF clock (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`) to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock time at monotonic zero.
    boot: SystemTime,
}

impl Clock {
    pub fn new() -> Clock {
        // Sample around the wall-clock read and keep the tighter bound.
        let m0 = monotonic_ns();
        let wall = SystemTime::now();
        let m1 = monotonic_ns();
        let mono = m0 + (m1 - m0) / 2;
        Clock {
            boot: wall - Duration::from_nanos(mono),
        }
    }

    pub fn to_wall(&self, mono_ns: u64) -> SystemTime {
        self.boot + Duration::from_nanos(mono_ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// The clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Per-direction counters of a base entry, indexed by map direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

impl Counts {
    pub fn of(base: &types::flow_base) -> Counts {
        Counts {
            packets: base.packets,
            bytes: base.bytes,
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Counts::default()
    }
}

/// The bits of `flow_base.meta` (`enum flow_meta`).
pub mod meta {
    use crate::kernel::bpf::types::flow_meta as M;

    pub const CLIENT_HI: u32 = M::META_CLIENT_HI.0;
    pub const EGRESS: u32 = M::META_EGRESS.0;
    pub const EXT: u32 = M::META_EXT.0;
    pub const EXT_SHIFT: u32 = M::META_EXT_SHIFT.0;
    pub const REPORTED: u32 = M::META_REPORTED.0;
    pub const CONTINUATION: u32 = M::META_CONTINUATION.0;
    pub const IDENTIFIED: u32 = M::META_IDENTIFIED.0;
    pub const REPORT_CARRY: u32 = M::META_REPORT_CARRY.0;
    pub const LOSSY: u32 = M::META_LOSSY.0;
    pub const REPORT_SHIFT: u32 = M::META_REPORT_SHIFT.0;
    /// The bits of the time of a flow's last record.
    pub const REPORT_MASK: u64 = (1 << (32 - REPORT_SHIFT)) - 1;
    /// The unit of the time of a flow's last record: 2^23 ns.
    pub const REPORT_UNIT_SHIFT: u32 = M::REPORT_UNIT_SHIFT.0;
    /// The bits the datapath sets at creation; the scan owns the others.
    pub const IDENTITY: u32 = CLIENT_HI | EGRESS | EXT;

    /// The meta bits of a flow created by the datapath: the client's direction slot,
    /// whether the first packet was seen at egress, and the extension kind
    /// (`enum flow_ext`, 0 for none).
    pub fn created(client: usize, egress: bool, ext: u32) -> u32 {
        (if client == super::HI_TO_LO {
            CLIENT_HI
        } else {
            0
        }) | (if egress { EGRESS } else { 0 })
            | (ext << EXT_SHIFT)
    }
}

/// The extension kind of a flow (`enum flow_ext`), 0 for none.
pub fn ext_kind(b: &types::flow_base) -> u32 {
    (b.meta & meta::EXT) >> meta::EXT_SHIFT
}

/// Direction slot of the client's packets.
pub fn client_dir(b: &types::flow_base) -> usize {
    if b.meta & meta::CLIENT_HI != 0 {
        HI_TO_LO
    } else {
        LO_TO_HI
    }
}

/// The time of the flow's last record (rounded down to 2^23 ns), when it had one: the
/// latest time not after `now_ns` that the 23 bits kept in its meta name (`report_time`
/// of scan.h).
pub fn report_time(b: &types::flow_base, now_ns: u64) -> Option<u64> {
    if b.meta & meta::REPORTED == 0 {
        return None;
    }
    let cur = now_ns >> meta::REPORT_UNIT_SHIFT;
    let ago = cur.wrapping_sub(u64::from(b.meta >> meta::REPORT_SHIFT)) & meta::REPORT_MASK;
    Some(cur.wrapping_sub(ago) << meta::REPORT_UNIT_SHIFT)
}

/// Where the window of the flow's counts starts: the time of its last record, or its
/// first packet.
pub fn window_start_ns(b: &types::flow_base, now_ns: u64) -> u64 {
    report_time(b, now_ns).map_or(b.first_seen_ns, |t| t.max(b.first_seen_ns))
}

/// Everything read from the maps for one flow: its base entry, the extension entry its
/// `ext_id` keys, when it has one, and the owners of its local ends.
#[derive(Debug, Clone, Copy)]
pub struct RawFlow {
    pub key: types::flow_key,
    pub base: types::flow_base,
    pub tcp: Option<types::flow_tcp>,
    pub icmp: Option<types::flow_icmp>,
    /// The local socket at each key endpoint (addr_lo, addr_hi) and its owner, as the
    /// datapath took them (`src/bpf/owner.h`), each once.
    pub owner: [Option<types::flow_owner>; 2],
}

/// The key of a flow's local end in `flows_owner`: its ext_id and the key endpoint.
pub fn owner_key(ext_id: u64, end: usize) -> u64 {
    ext_id << 1 | (end as u64 & 1)
}

/// The ext_id and key endpoint a `flows_owner` key names.
pub fn owner_of_key(k: u64) -> (u64, usize) {
    (k >> 1, (k & 1) as usize)
}

/// The owner of a local end in user terms, its cgroup named from `names`. The cgroup id
/// is only given where a cgroup v2 hierarchy is (on a v1 host every socket is in its
/// root).
pub fn local_process(o: &types::flow_owner, names: &mut CgroupNames) -> LocalProcess {
    let cgroup = (o.cgroup_id != 0 && names.has_hierarchy())
        .then(|| names.name(o.cgroup_id))
        .flatten();
    let known = o.pid != 0;
    let comm_len = o.comm.iter().position(|&c| c == 0).unwrap_or(o.comm.len());
    LocalProcess {
        cgroup_id: (o.cgroup_id != 0 && names.has_hierarchy()).then_some(o.cgroup_id),
        cgroup: cgroup.as_ref().map(|c| c.path.clone()),
        unit: cgroup.and_then(|c| c.unit.clone()),
        pid: known.then_some(o.pid),
        comm: (known && comm_len > 0)
            .then(|| String::from_utf8_lossy(&o.comm[..comm_len]).into_owned()),
        uid: known.then_some(o.uid),
    }
}

/// What a record says besides the map entries: set by the poller.
#[derive(Debug, Clone)]
pub struct RecordMeta {
    /// The (delta) counters to report.
    pub counts: Counts,
    pub end_reason: EndReason,
    pub interface: String,
    pub observer: Arc<str>,
    /// BPF clock time this record's window starts at.
    pub window_start_ns: u64,
    /// BPF clock time of the poll that emits the record.
    pub emitted_ns: u64,
    pub flow_id: u64,
    pub continuation: bool,
    /// The owners of the local ends, by key endpoint (see `RawFlow::owner`).
    pub local: [Option<Box<LocalProcess>>; 2],
}

impl RawFlow {
    /// The TCP state kept in the base entry, for a TCP flow.
    pub fn tcp_hot(&self) -> Option<types::tcp_hot> {
        tcp_hot(&self.base)
    }

    /// The id keying this flow's entry in extension map `m`, if it has one there.
    pub fn ext_id(&self, m: ExtKind) -> Option<u64> {
        ext_id(&self.base, m)
    }

    /// Direction slot of the client's packets: as the datapath judged it, or, for a
    /// connection that resumed, as its earlier records said.
    pub fn client_dir(&self) -> usize {
        client_dir(&self.base)
    }

    /// Whether this is a connection that ended idle and resumed (the scan gave it its
    /// identity back).
    pub fn is_continuation(&self) -> bool {
        self.base.meta & meta::CONTINUATION != 0
    }

    /// A flow's id: its key and first packet's time, hashed (FNV-1a, stable across
    /// builds), so every record of the flow has it, before and after an agent restart
    /// (a resumed connection gets its first packet's time back, so its id too).
    pub fn flow_id(&self) -> u64 {
        const PRIME: u64 = 0x0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key_bytes(&self.key)
            .iter()
            .chain(&self.base.first_seen_ns.to_le_bytes())
        {
            h = (h ^ u64::from(*b)).wrapping_mul(PRIME);
        }
        h
    }

    /// Builds the user-facing record.
    pub fn to_record(&self, meta: RecordMeta, clock: &Clock) -> FlowRecord {
        let RecordMeta {
            counts,
            end_reason,
            interface,
            observer,
            window_start_ns,
            emitted_ns,
            flow_id,
            continuation,
            local: [lo_process, hi_process],
        } = meta;
        let k = &self.key;
        let b = &self.base;
        let c = self.client_dir();
        // The tick's clock of a later packet may be a tick behind the fine clock of the
        // first: a duration is never negative.
        let last_seen_ns = b.last_seen_ns.max(b.first_seen_ns);
        let s = c ^ 1;
        let addrs = [
            key_addr(&k.addr_lo, k.ip_version),
            key_addr(&k.addr_hi, k.ip_version),
        ];
        let ports = [k.port_lo, k.port_hi];
        let icmp_proto = k.proto == IPPROTO_ICMP || k.proto == IPPROTO_ICMPV6;
        // Sender of LO_TO_HI packets is the lo endpoint.
        let (client_port, server_port) = if icmp_proto {
            (0, 0)
        } else {
            (ports[c], ports[s])
        };
        // The lo endpoint sends LO_TO_HI packets: it is the client when c is LO_TO_HI.
        let (client_process, server_process) = if c == LO_TO_HI {
            (lo_process, hi_process)
        } else {
            (hi_process, lo_process)
        };
        let dir = |d: usize| DirStats {
            packets: counts.packets[d],
            bytes: counts.bytes[d],
            ttl: b.ttl[d],
        };
        FlowRecord {
            flow_id,
            observer,
            ip_version: k.ip_version,
            protocol: k.proto,
            client_addr: addrs[c],
            client_port,
            server_addr: addrs[s],
            server_port,
            ifindex: k.ifindex,
            interface,
            first_hook: if b.meta & meta::EGRESS != 0 {
                Hook::Egress
            } else {
                Hook::Ingress
            },
            first_seen: clock.to_wall(b.first_seen_ns),
            last_seen: clock.to_wall(last_seen_ns),
            window_start: clock.to_wall(window_start_ns.min(last_seen_ns)),
            emitted: clock.to_wall(emitted_ns),
            client: dir(c),
            server: dir(s),
            end_reason,
            continuation,
            fragment: k.flags & types::flow_key_flags::KEY_FRAGMENT.0 as u8 != 0,
            partial: b.meta & meta::LOSSY != 0,
            tcp: self.tcp_hot().map(|h| tcp_info(h, b, self.tcp.as_ref(), c)),
            icmp: (ext_kind(b) == types::flow_ext::EXT_ICMP.0)
                .then(|| icmp_info(b, self.icmp.as_ref(), k, c)),
            client_process,
            server_process,
        }
    }
}

/// TCP state from the base entry; latency from the flow's flows_tcp entry, if it has one.
fn tcp_info(
    h: types::tcp_hot,
    b: &types::flow_base,
    t: Option<&types::flow_tcp>,
    c: usize,
) -> TcpInfo {
    use types::tcp_bits as B;
    let s = c ^ 1;
    let bit = |b: B| u32::from(h.bits) & b.0 != 0;
    TcpInfo {
        client_flags: h.flags[c],
        server_flags: h.flags[s],
        state: tcp_state(h.state),
        handshake_client_ns: bit(B::TCPB_CLIENT_HS).then_some(b.handshake_client_ns),
        handshake_server_ns: bit(B::TCPB_SERVER_HS).then_some(b.handshake_server_ns),
        syn_retransmits: u16::from(h.syn_retrans),
        late_start: bit(B::TCPB_LATE_START),
        client_latency: t.and_then(|t| latency(&t.lat[c])),
        server_latency: t.and_then(|t| latency(&t.lat[s])),
    }
}

/// Type/code from the base entry; echo RTT from the flow's flows_icmp entry, if it has one.
fn icmp_info(
    b: &types::flow_base,
    i: Option<&types::flow_icmp>,
    k: &types::flow_key,
    c: usize,
) -> IcmpInfo {
    // SAFETY: both union arms are plain integers, every bit pattern is valid;
    // the caller checked ext == EXT_ICMP, the arm the datapath writes.
    let h = unsafe { b.l4.icmp };
    let s = c ^ 1;
    let sent = |d: usize| b.packets[d] > 0;
    // echo flows are keyed by identifier in both slots; others never have lo == hi
    let echo = k.port_lo == k.port_hi;
    IcmpInfo {
        client_type: sent(c).then_some(h.r#type[c]),
        client_code: sent(c).then_some(h.code[c]),
        server_type: sent(s).then_some(h.r#type[s]),
        server_code: sent(s).then_some(h.code[s]),
        echo_id: echo.then_some(k.port_lo),
        echo_rtt: i.filter(|i| i.rtt_count > 0).map(|i| Latency {
            count: i.rtt_count,
            sum_ns: i.rtt_sum_ns,
            min_ns: i.rtt_min_ns,
            max_ns: i.rtt_max_ns,
            jitter_ns: None,
        }),
    }
}

/// An extension map, by what it extends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtKind {
    Tcp,
    Icmp,
}

/// The TCP state a base entry keeps, for a TCP flow.
pub fn tcp_hot(base: &types::flow_base) -> Option<types::tcp_hot> {
    if ext_kind(base) != types::flow_ext::EXT_TCP.0 {
        return None;
    }
    // SAFETY: both union arms are plain integers, every bit pattern is
    // valid; ext == EXT_TCP says it is the arm the datapath writes.
    Some(unsafe { base.l4.tcp })
}

/// Which of a flow's local ends the datapath sent an owner for (`enum flow_owner_state`):
/// bit 0 for addr_lo, bit 1 for addr_hi. None for ICMP flows, which keep no such state.
pub fn owners_sent(base: &types::flow_base) -> u8 {
    if ext_kind(base) == types::flow_ext::EXT_ICMP.0 {
        return 0;
    }
    use types::flow_owner_state as S;
    // SAFETY: every union arm is plain integers, every bit pattern is valid; the byte is
    // the owner state in every arm but ICMP's, ruled out above.
    let own = u32::from(unsafe { base.l4.port.own });
    u8::from(own & S::OWN_SENT_LO.0 != 0) | u8::from(own & S::OWN_SENT_HI.0 != 0) << 1
}

/// The id keying a flow's entry in extension map `m`, if the flow can have one there and
/// has one.
pub fn ext_id(base: &types::flow_base, m: ExtKind) -> Option<u64> {
    let want = match m {
        ExtKind::Tcp => types::flow_ext::EXT_TCP.0,
        ExtKind::Icmp => types::flow_ext::EXT_ICMP.0,
    };
    (ext_kind(base) == want && base.ext_id != 0).then_some(base.ext_id)
}

fn tcp_state(v: u8) -> TcpState {
    use types::tcp_state as S;
    match u32::from(v) {
        x if x == S::TCP_ST_SYN_SENT.0 => TcpState::SynSent,
        x if x == S::TCP_ST_SYN_RECV.0 => TcpState::SynRecv,
        x if x == S::TCP_ST_ESTABLISHED.0 => TcpState::Established,
        x if x == S::TCP_ST_FIN_WAIT.0 => TcpState::FinWait,
        x if x == S::TCP_ST_CLOSED.0 => TcpState::Closed,
        x if x == S::TCP_ST_RESET.0 => TcpState::Reset,
        _ => TcpState::None,
    }
}

fn latency(l: &types::tcp_latency) -> Option<Latency> {
    (l.count > 0).then(|| Latency {
        count: l.count,
        sum_ns: l.sum_ns,
        min_ns: l.min_ns,
        max_ns: l.max_ns,
        jitter_ns: (l.count > 1).then(|| l.jitter_sum_ns / u64::from(l.count - 1)),
    })
}
