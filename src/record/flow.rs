//! Flow records in user terms: what every sink (stdout, gRPC, export) receives. No kernel types here.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// TCP header flag bits, their names (as `--tcp-flags` accepts them) and their one-letter
/// abbreviations (as the table prints them). The one list every other place reads.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;

    /// (bit, name, letter), in the order letters are printed.
    pub const ALL: [(u8, &str, char); 8] = [
        (SYN, "syn", 'S'),
        (ACK, "ack", 'A'),
        (PSH, "psh", 'P'),
        (FIN, "fin", 'F'),
        (RST, "rst", 'R'),
        (URG, "urg", 'U'),
        (ECE, "ece", 'E'),
        (CWR, "cwr", 'C'),
    ];

    /// "SAPF" for SYN|ACK|PSH|FIN; "-" for none.
    pub fn letters(bits: u8) -> String {
        let s: String = ALL
            .iter()
            .filter(|(b, _, _)| bits & b != 0)
            .map(|(_, _, c)| *c)
            .collect();
        if s.is_empty() {
            "-".into()
        } else {
            s
        }
    }

    /// The names of the flags in `bits`, upper case, in the order letters are printed:
    /// `["SYN", "ACK"]`.
    pub fn upper_names(bits: u8) -> Vec<&'static str> {
        const UPPER: [&str; 8] = ["SYN", "ACK", "PSH", "FIN", "RST", "URG", "ECE", "CWR"];
        ALL.iter()
            .zip(UPPER)
            .filter(|((b, _, _), _)| bits & b != 0)
            .map(|(_, name)| name)
            .collect()
    }

    /// Parses "syn,ack" (also `|` or `+` separated) into bits.
    pub fn from_names(s: &str) -> Option<u8> {
        let mut bits = 0u8;
        for name in s.split([',', '|', '+']) {
            let name = name.trim().to_ascii_lowercase();
            bits |= ALL.iter().find(|(_, n, _)| *n == name)?.0;
        }
        Some(bits)
    }
}

/// Protocol name for display and for parsing (`tcp`, `udp`, `icmp`, `icmpv6`); None for
/// protocols without one.
pub fn proto_name(proto: u8) -> Option<&'static str> {
    match proto {
        IPPROTO_TCP => Some("tcp"),
        IPPROTO_UDP => Some("udp"),
        IPPROTO_ICMP => Some("icmp"),
        IPPROTO_ICMPV6 => Some("icmpv6"),
        _ => None,
    }
}

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
    /// Ended early to make room under map pressure (a flood): the flow had sent one
    /// packet and nothing since. Its counts are complete up to here; a later packet
    /// starts a new flow.
    Evicted,
    /// Not ended: a flow in progress as `ListFlows` reports it (counters since its
    /// window start).
    InProgress,
}

impl EndReason {
    /// The reasons a flow ends with (every one but `InProgress`).
    pub const ALL: [EndReason; 6] = [
        EndReason::IdleTimeout,
        EndReason::ActiveTimeout,
        EndReason::TcpFin,
        EndReason::TcpRst,
        EndReason::Shutdown,
        EndReason::Evicted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::ActiveTimeout => "active_timeout",
            EndReason::TcpFin => "tcp_fin",
            EndReason::TcpRst => "tcp_rst",
            EndReason::Shutdown => "shutdown",
            EndReason::Evicted => "evicted",
            EndReason::InProgress => "in_progress",
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

/// TCP connection state as inferred by the datapath.
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

/// Who owns a local socket a flow ends at: its cgroup (v2) and the process that opened
/// it, as the datapath took them when the flow was admitted. Absent fields are unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LocalProcess {
    /// The socket's cgroup v2 id (its cgroup2 directory's inode number); none on a host
    /// without a cgroup v2 hierarchy.
    pub cgroup_id: Option<u64>,
    /// The cgroup's path below the cgroup v2 root (`/system.slice/nginx.service`).
    pub cgroup: Option<Arc<str>>,
    /// The systemd unit (service, scope, ...) the path names.
    pub unit: Option<Arc<str>>,
    /// The process that opened the socket (for an accepted connection, the listening
    /// socket's), by thread group id.
    pub pid: Option<u32>,
    /// Its command name (at most 15 bytes).
    pub comm: Option<String>,
    /// Its user id.
    pub uid: Option<u32>,
}

impl LocalProcess {
    /// Whether `self`'s cgroup is `path` or below it (`path` without a trailing `/`, the
    /// root being `/`).
    pub fn in_cgroup(&self, path: &str) -> bool {
        self.cgroup.as_deref().is_some_and(|c| {
            path == "/"
                || c.strip_prefix(path)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

/// A finished (or active-timeout, or in-progress) flow, as streamed to users; its JSON
/// form is `render::JsonRecord`.
///
/// Packets and bytes are deltas: what the flow sent in this record's window
/// (`window_start` .. `last_seen`); summing a flow's records gives its totals (an
/// `InProgress` record from ListFlows counts since its window start too, and is no total).
/// Everything in `tcp` and `icmp` (flags, state, handshake, latency and RTT statistics) is
/// cumulative over the whole flow: the last record of a flow carries the final values (a
/// continuation's latency statistics count since it resumed).
#[derive(Debug, Clone, PartialEq)]
pub struct FlowRecord {
    /// The same on every record of one flow (active-timeout records, the final record, a
    /// continuation after an idle gap, across an agent restart with pinned maps).
    pub flow_id: u64,
    /// Which agent saw the flow (`--observer-id`, the host name by default).
    pub observer: Arc<str>,
    pub ip_version: u8,
    pub protocol: u8,
    pub client_addr: IpAddr,
    pub client_port: u16,
    pub server_addr: IpAddr,
    pub server_port: u16,
    pub ifindex: u32,
    pub interface: String,
    pub first_hook: Hook,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Start of the window this record's deltas cover: `first_seen` on a flow's first
    /// record, the previous record's emission time after that.
    pub window_start: SystemTime,
    /// When the poller emitted the record (the poll that ended the flow or found its
    /// active timeout due); the flow's next record starts its window here (to the ~4 ms
    /// the kernel entry keeps it in, rounded down). In a ListFlows snapshot: when the
    /// maps were read.
    pub emitted: SystemTime,
    /// What the client sent (deltas since the previous record of this flow, also when
    /// `end_reason` is `InProgress`).
    pub client: DirStats,
    /// What the server sent.
    pub server: DirStats,
    pub end_reason: EndReason,
    /// The flow was seen before, ended after an idle gap and came back: client and server
    /// are those of the earlier part, `flow_id` and `first_seen` the same; set on every
    /// later record of it.
    pub continuation: bool,
    /// Non-first IP fragments of `protocol`: they carry no transport header, so the
    /// record has no ports (and no TCP/ICMP details), and they are kept apart from
    /// the flow they belong to.
    pub fragment: bool,
    /// Packets of this flow may be missing: it was answered while the base flow map was
    /// full and waited in probation, where the kernel evicts flows to make room (see
    /// `flowlens status`). Set on every later record of the flow.
    pub partial: bool,
    pub tcp: Option<TcpInfo>,
    pub icmp: Option<IcmpInfo>,
    /// The local socket the client side is, with its owner; none when the client is not
    /// a socket of this host (or no owner can be told).
    pub client_process: Option<Box<LocalProcess>>,
    /// The same for the server side.
    pub server_process: Option<Box<LocalProcess>>,
}

impl FlowRecord {
    pub fn total_bytes(&self) -> u64 {
        self.client.bytes + self.server.bytes
    }

    pub fn total_packets(&self) -> u64 {
        self.client.packets + self.server.packets
    }

    /// Swaps client and server: every per-side field changes place.
    pub fn swap_roles(&mut self) {
        std::mem::swap(&mut self.client_addr, &mut self.server_addr);
        std::mem::swap(&mut self.client_port, &mut self.server_port);
        std::mem::swap(&mut self.client, &mut self.server);
        std::mem::swap(&mut self.client_process, &mut self.server_process);
        if let Some(t) = &mut self.tcp {
            std::mem::swap(&mut t.client_flags, &mut t.server_flags);
            std::mem::swap(&mut t.client_latency, &mut t.server_latency);
        }
        if let Some(i) = &mut self.icmp {
            std::mem::swap(&mut i.client_type, &mut i.server_type);
            std::mem::swap(&mut i.client_code, &mut i.server_code);
        }
    }

    /// Whether the protocol has ports (TCP, UDP); others report port 0.
    pub fn has_ports(&self) -> bool {
        matches!(self.protocol, IPPROTO_TCP | IPPROTO_UDP)
    }

    /// A UDP record for unit tests, every field set.
    #[cfg(test)]
    pub(crate) fn example() -> FlowRecord {
        use std::time::{Duration, UNIX_EPOCH};
        FlowRecord {
            flow_id: 0xfeed_beef_0000_0001,
            observer: "host-a".into(),
            ip_version: 4,
            protocol: IPPROTO_UDP,
            client_addr: "10.200.0.1".parse().unwrap(),
            client_port: 40000,
            server_addr: "10.200.0.2".parse().unwrap(),
            server_port: 53,
            ifindex: 3,
            interface: "veth0".into(),
            first_hook: Hook::Egress,
            first_seen: UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            last_seen: UNIX_EPOCH + Duration::new(1_700_000_005, 0),
            window_start: UNIX_EPOCH + Duration::new(1_700_000_001, 1),
            emitted: UNIX_EPOCH + Duration::new(1_700_000_006, 500_000_000),
            client: DirStats {
                packets: 3,
                bytes: 300,
                ttl: 64,
            },
            server: DirStats::default(),
            end_reason: EndReason::IdleTimeout,
            continuation: false,
            fragment: false,
            partial: false,
            tcp: None,
            icmp: None,
            client_process: None,
            server_process: None,
        }
    }

    /// The local processes of either side, client first.
    pub fn processes(&self) -> impl Iterator<Item = &LocalProcess> {
        self.client_process
            .iter()
            .chain(self.server_process.iter())
            .map(|p| &**p)
    }
}
