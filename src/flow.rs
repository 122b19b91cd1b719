//! Flow records: the join of a base entry with its TCP or ICMP extension, in user terms.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::bpf::types;

/// Direction slot of a per-direction array in the maps (`enum flow_dir`).
pub const LO_TO_HI: usize = types::flow_dir::DIR_LO_TO_HI.0 as usize;
pub const HI_TO_LO: usize = types::flow_dir::DIR_HI_TO_LO.0 as usize;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Why a record was emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// No packet for the protocol's idle timeout.
    IdleTimeout,
    /// Still active after the active timeout: counters are deltas, the flow goes on.
    ActiveTimeout,
    /// FIN seen in both directions (after the grace period).
    TcpFin,
    /// RST seen (after the grace period).
    TcpRst,
    /// The agent is stopping and flushed the flow.
    Shutdown,
}

impl EndReason {
    pub const ALL: [EndReason; 5] = [
        EndReason::IdleTimeout,
        EndReason::ActiveTimeout,
        EndReason::TcpFin,
        EndReason::TcpRst,
        EndReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::ActiveTimeout => "active_timeout",
            EndReason::TcpFin => "tcp_fin",
            EndReason::TcpRst => "tcp_rst",
            EndReason::Shutdown => "shutdown",
        }
    }
}

/// Hook that saw a flow's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Ingress,
    Egress,
}

/// TCP connection state as inferred by the datapath (`enum tcp_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpState {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    Closed,
    Reset,
}

impl TcpState {
    fn from_raw(v: u8) -> TcpState {
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

    pub fn as_str(self) -> &'static str {
        match self {
            TcpState::None => "none",
            TcpState::SynSent => "syn_sent",
            TcpState::SynRecv => "syn_recv",
            TcpState::Established => "established",
            TcpState::FinWait => "fin_wait",
            TcpState::Closed => "closed",
            TcpState::Reset => "reset",
        }
    }
}

/// One side's traffic: everything it sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirStats {
    pub packets: u64,
    /// IP bytes (IP header and payload), Ethernet framing excluded.
    pub bytes: u64,
    /// Last TTL / hop limit seen on this side's packets (0: none sent).
    pub ttl: u8,
}

/// Transaction latency of one side: how long it took to answer the other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub count: u32,
    pub sum_ns: u64,
    pub min_ns: u32,
    pub max_ns: u32,
    /// Mean absolute difference of consecutive samples; absent below two samples.
    pub jitter_ns: Option<u64>,
}

impl Latency {
    fn from_raw(l: &types::tcp_latency) -> Option<Latency> {
        (l.count > 0).then(|| Latency {
            count: l.count,
            sum_ns: l.sum_ns,
            min_ns: l.min_ns,
            max_ns: l.max_ns,
            jitter_ns: (l.count > 1).then(|| l.jitter_sum_ns / u64::from(l.count - 1)),
        })
    }

    pub fn mean_ns(&self) -> u64 {
        self.sum_ns / u64::from(self.count.max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TcpInfo {
    pub client_flags: u8,
    pub server_flags: u8,
    pub state: TcpState,
    /// SYN -> SYN-ACK as seen here; absent when the SYN was not seen.
    pub handshake_client_ns: Option<u32>,
    /// SYN-ACK -> client's final ACK; absent when not seen.
    pub handshake_server_ns: Option<u32>,
    pub syn_retransmits: u16,
    /// flowlens started after this connection was established.
    pub late_start: bool,
    /// Samples taken when the client answered the server.
    pub client_latency: Option<Latency>,
    /// Samples taken when the server answered the client.
    pub server_latency: Option<Latency>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IcmpInfo {
    /// Last type/code the client sent; absent when it sent nothing.
    pub client_type: Option<u8>,
    pub client_code: Option<u8>,
    pub server_type: Option<u8>,
    pub server_code: Option<u8>,
    /// Echo identifier, for echo request/reply flows.
    pub echo_id: Option<u16>,
    /// Echo request -> reply round-trip times (replies matched by sequence number); no jitter.
    pub echo_rtt: Option<Latency>,
}

/// A finished (or active-timeout) flow, as streamed to users.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowRecord {
    pub ip_version: u8,
    pub protocol: u8,
    pub client_addr: IpAddr,
    pub client_port: u16,
    pub server_addr: IpAddr,
    pub server_port: u16,
    pub ifindex: u32,
    pub interface: String,
    pub first_hook: Hook,
    #[serde(serialize_with = "ser_time")]
    pub first_seen: SystemTime,
    #[serde(serialize_with = "ser_time")]
    pub last_seen: SystemTime,
    /// What the client sent (deltas since the previous record of this flow).
    pub client: DirStats,
    /// What the server sent.
    pub server: DirStats,
    pub end_reason: EndReason,
    pub tcp: Option<TcpInfo>,
    pub icmp: Option<IcmpInfo>,
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    s.serialize_f64(d.as_secs_f64())
}

impl FlowRecord {
    pub fn total_bytes(&self) -> u64 {
        self.client.bytes + self.server.bytes
    }

    pub fn total_packets(&self) -> u64 {
        self.client.packets + self.server.packets
    }
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

    pub fn saturating_sub(&self, earlier: &Counts) -> Counts {
        let sub = |a: [u64; 2], b: [u64; 2]| [a[0].saturating_sub(b[0]), a[1].saturating_sub(b[1])];
        Counts {
            packets: sub(self.packets, earlier.packets),
            bytes: sub(self.bytes, earlier.bytes),
        }
    }
}

/// Everything read from the maps for one flow.
#[derive(Debug, Clone, Copy)]
pub struct RawFlow {
    pub key: types::flow_key,
    pub base: types::flow_base,
    pub tcp: Option<types::flow_tcp>,
    pub icmp: Option<types::flow_icmp>,
}

impl RawFlow {
    /// Builds the user-facing record. `counts` are the (delta) counters to report.
    pub fn to_record(
        &self,
        counts: Counts,
        end_reason: EndReason,
        clock: &Clock,
        interface: String,
    ) -> FlowRecord {
        let k = &self.key;
        let b = &self.base;
        let c = usize::from(b.initiator & 1);
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
        let dir = |d: usize| DirStats {
            packets: counts.packets[d],
            bytes: counts.bytes[d],
            ttl: b.ttl[d],
        };
        FlowRecord {
            ip_version: k.ip_version,
            protocol: k.proto,
            client_addr: addrs[c],
            client_port,
            server_addr: addrs[s],
            server_port,
            ifindex: k.ifindex,
            interface,
            first_hook: if u32::from(b.first_hook) == types::flow_hook::HOOK_EGRESS.0 {
                Hook::Egress
            } else {
                Hook::Ingress
            },
            first_seen: clock.to_wall(b.first_seen_ns),
            last_seen: clock.to_wall(b.last_seen_ns),
            client: dir(c),
            server: dir(s),
            end_reason,
            tcp: self.tcp.as_ref().map(|t| tcp_info(t, c)),
            icmp: self
                .icmp
                .as_ref()
                .map(|i| icmp_info(i, k, c, self.base.packets)),
        }
    }
}

fn tcp_info(t: &types::flow_tcp, c: usize) -> TcpInfo {
    use types::tcp_bits as B;
    let s = c ^ 1;
    let bit = |b: B| u32::from(t.bits) & b.0 != 0;
    TcpInfo {
        client_flags: t.flags[c],
        server_flags: t.flags[s],
        state: TcpState::from_raw(t.state),
        handshake_client_ns: bit(B::TCPB_CLIENT_HS).then_some(t.handshake_client_ns),
        handshake_server_ns: bit(B::TCPB_SERVER_HS).then_some(t.handshake_server_ns),
        syn_retransmits: t.syn_retrans,
        late_start: bit(B::TCPB_LATE_START),
        client_latency: Latency::from_raw(&t.lat[c]),
        server_latency: Latency::from_raw(&t.lat[s]),
    }
}

fn icmp_info(
    i: &types::flow_icmp,
    k: &types::flow_key,
    c: usize,
    total_packets: [u64; 2],
) -> IcmpInfo {
    let s = c ^ 1;
    let sent = |d: usize| total_packets[d] > 0;
    // echo flows are keyed by identifier in both slots; others never have lo == hi
    let echo = k.port_lo == k.port_hi;
    IcmpInfo {
        client_type: sent(c).then_some(i.r#type[c]),
        client_code: sent(c).then_some(i.code[c]),
        server_type: sent(s).then_some(i.r#type[s]),
        server_code: sent(s).then_some(i.code[s]),
        echo_id: echo.then_some(k.port_lo),
        echo_rtt: (i.rtt_count > 0).then_some(Latency {
            count: i.rtt_count,
            sum_ns: i.rtt_sum_ns,
            min_ns: i.rtt_min_ns,
            max_ns: i.rtt_max_ns,
            jitter_ns: None,
        }),
    }
}

fn endpoint(addr: IpAddr, port: u16, proto: u8) -> String {
    let portless = !matches!(proto, IPPROTO_TCP | IPPROTO_UDP);
    match (addr, portless) {
        (a, true) => a.to_string(),
        (IpAddr::V6(a), false) => format!("[{a}]:{port}"),
        (a, false) => format!("{a}:{port}"),
    }
}

/// Protocol name for display.
pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmpv6".into(),
        p => format!("ip/{p}"),
    }
}

impl std::fmt::Display for FlowRecord {
    /// One line: interface, protocol, client -> server, what each side sent, why it was emitted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<10} {:<6} {:>40} -> {:<40} c>s {:>7}p {:>10}B  s>c {:>7}p {:>10}B  {}",
            self.interface,
            proto_name(self.protocol),
            endpoint(self.client_addr, self.client_port, self.protocol),
            endpoint(self.server_addr, self.server_port, self.protocol),
            self.client.packets,
            self.client.bytes,
            self.server.packets,
            self.server.bytes,
            self.end_reason.as_str(),
        )?;
        if let Some(t) = &self.tcp {
            if let (Some(c), Some(s)) = (t.handshake_client_ns, t.handshake_server_ns) {
                write!(
                    f,
                    "  hs {:.3}/{:.3}ms",
                    f64::from(c) / 1e6,
                    f64::from(s) / 1e6
                )?;
            }
            if let Some(l) = &t.server_latency {
                write!(f, "  srv {:.3}ms x{}", l.mean_ns() as f64 / 1e6, l.count)?;
            }
        }
        if let Some(i) = &self.icmp {
            if let (Some(t), Some(c)) = (i.client_type, i.client_code) {
                write!(f, "  icmp {t}/{c}")?;
            }
            if let Some(r) = &i.echo_rtt {
                write!(f, "  rtt {:.3}ms x{}", r.mean_ns() as f64 / 1e6, r.count)?;
            }
        }
        Ok(())
    }
}
