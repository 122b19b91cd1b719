//! How a person and a script see records: the one table renderer and the one JSON encoder, used by `run` and `watch` alike, and the compact number formats `top` shares.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::record::encoding::Stamp;
use crate::record::flow::{
    proto_name, tcp_flags, DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, TcpInfo,
    TcpState,
};

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns under a header line.
    Table,
    /// One JSON object per line.
    Json,
}

/// Table options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStyle {
    /// Every column, unabbreviated (wider than 100 columns).
    pub wide: bool,
    /// Print the legend before the header.
    pub legend: bool,
}

/// The default table fits this many columns (IPv4 flows; the metrics column gives way).
pub const TABLE_WIDTH: usize = 100;

/// Writes records in one format; the table's header goes out before the first record,
/// and a date line whenever the UTC day changes.
#[derive(Debug)]
pub struct Renderer {
    format: Format,
    style: TableStyle,
    header_done: bool,
    /// Days since the epoch of the last row, to print the date when it changes.
    day: Option<u64>,
}

impl Renderer {
    pub fn new(format: Format) -> Renderer {
        Renderer::styled(format, TableStyle::default())
    }

    pub fn styled(format: Format, style: TableStyle) -> Renderer {
        Renderer {
            format,
            style,
            header_done: false,
            day: None,
        }
    }

    /// The legend (if asked for) and the table header now, so a person sees the columns
    /// before any flow ends.
    pub fn header(&mut self, out: &mut impl Write) -> io::Result<()> {
        if self.format == Format::Table && !self.header_done {
            self.header_done = true;
            if self.style.legend {
                writeln!(out, "{}", legend(self.style.wide))?;
            }
            writeln!(out, "{}", table_header(self.style.wide))?;
        }
        Ok(())
    }

    /// `r` with no stamp (JSON `seq` and `run` 0): a record that was never emitted.
    pub fn record(&mut self, out: &mut impl Write, r: &FlowRecord) -> io::Result<()> {
        self.record_at(out, Stamp::default(), r)
    }

    /// `r`, emitted as record `at.seq` of run `at.run` (JSON shows both; the table neither).
    pub fn record_at(&mut self, out: &mut impl Write, at: Stamp, r: &FlowRecord) -> io::Result<()> {
        match self.format {
            Format::Table => {
                self.header(out)?;
                let day = days(r.last_seen);
                if self.day != Some(day) {
                    self.day = Some(day);
                    writeln!(out, "--- {} (UTC) ---", date_utc(r.last_seen))?;
                }
                writeln!(out, "{}", table_row(r, self.style.wide))
            }
            Format::Json => {
                serde_json::to_writer(&mut *out, &JsonRecord::of(at, r))?;
                writeln!(out)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Table
// ---------------------------------------------------------------------------

/// Column widths of the default table; a longer value pushes the rest right and the
/// metrics column gives way, so an IPv4 row never passes `TABLE_WIDTH`.
const W_TIME: usize = 8;
const W_PROTO: usize = 4;
const W_CLIENT: usize = 19;
const W_SERVER: usize = 16;
const W_DIR: usize = 8;
const W_DUR: usize = 5;
const W_END: usize = 4;

/// Wide table widths (IPv6 endpoints fit).
const WW_TIME: usize = 12;
const WW_IFACE: usize = 10;
const WW_PROTO: usize = 6;
const WW_ENDPOINT: usize = 21;
const WW_DIR: usize = 18;
const WW_TTL: usize = 7;
const WW_DUR: usize = 10;
const WW_END: usize = 14;

/// The header line.
pub fn table_header(wide: bool) -> String {
    if wide {
        format!(
            "{:<WW_TIME$} {:<WW_IFACE$} {:<WW_PROTO$} {:>WW_ENDPOINT$}   {:<WW_ENDPOINT$} {:>WW_DIR$} {:>WW_DIR$} {:>WW_TTL$} {:>WW_DUR$} {:<WW_END$} DETAIL",
            "TIME", "IFACE", "PROTO", "CLIENT", "SERVER", "C>S PKTS/BYTES", "S>C PKTS/BYTES", "TTL C/S", "DURATION", "END"
        )
    } else {
        format!(
            "{:<W_TIME$} {:<W_PROTO$} {:>W_CLIENT$}   {:<W_SERVER$} {:>W_DIR$} {:>W_DIR$} {:>W_DUR$} {:<W_END$} METRICS",
            "TIME", "PROT", "CLIENT", "SERVER", "C>S", "S>C", "DUR", "END"
        )
    }
}

const LEGEND_COMMON: &str = "TIME: UTC time of the flow's last packet (a date line comes first and when the day changes).\n\
CLIENT > SERVER: the side that sent the first packet (the SYN for TCP) > the other side.\n\
C>S, S>C: packets/bytes the client sent, and the server (IP bytes: headers, no framing);\n\
\x20 K, M, G, T = 1024^1..4 bytes; packet counts k, M, G = 1000^1..3. DUR: first to last packet.\n";

const LEGEND_SHORT: &str = "END: idle = no packet for the idle timeout, actv = active timeout (long flow, counters since\n\
\x20 its previous record), fin = TCP FIN both ways, rst = TCP reset, stop = agent stopped.\n\
METRICS: rtt = TCP handshake round trip (SYN>SYN-ACK>ACK) or ICMP echo round trip;\n\
\x20 srv = server response time (mean); rtx = SYNs retransmitted; late = connection began\n\
\x20 before flowlens; type = ICMP type/code the client sent; + = more (see --wide).";

const LEGEND_WIDE: &str =
    "END: idle_timeout, active_timeout (long flow, counters since its previous record), tcp_fin,\n\
\x20 tcp_rst, shutdown (agent stopped), in_progress. TTL C/S: last TTL/hop limit of each side.\n\
DETAIL: TCP state; flags C|S = TCP flags each side sent (S SYN, A ACK, P PSH, F FIN, R RST,\n\
\x20 U URG, E ECE, C CWR); hs C+S = handshake SYN>SYN-ACK + SYN-ACK>ACK; srv-lat/cli-lat =\n\
\x20 server/client response time mean (min-max, jit = jitter, n = samples); syn-rtx = SYNs\n\
\x20 retransmitted; late-start = connection began before flowlens; icmp c=TYPE/CODE s=...;\n\
\x20 id = echo id; rtt = echo round trip.";

/// The legend: every column and abbreviation the table uses.
pub fn legend(wide: bool) -> String {
    [LEGEND_COMMON, if wide { LEGEND_WIDE } else { LEGEND_SHORT }].concat()
}

/// The legend of both tables, for `--help`.
pub fn help_legend() -> String {
    format!("Table legend:\n{LEGEND_COMMON}{LEGEND_SHORT}\nWith --wide:\n{LEGEND_WIDE}")
}

/// One table line.
pub fn table_row(r: &FlowRecord, wide: bool) -> String {
    if wide {
        return wide_row(r);
    }
    let mut s = format!(
        "{:<W_TIME$} {:<W_PROTO$} {:>W_CLIENT$} > {:<W_SERVER$} {:>W_DIR$} {:>W_DIR$} {:>W_DUR$} {:<W_END$} ",
        clock_utc(r.last_seen, false),
        proto_label(r.protocol),
        client_endpoint(r),
        server_endpoint(r),
        dir_compact(&r.client),
        dir_compact(&r.server),
        duration(flow_duration(r)),
        end_short(r.end_reason),
    );
    let room = TABLE_WIDTH.saturating_sub(s.chars().count());
    s.push_str(&fit(&metrics(r), room));
    s.trim_end().to_owned()
}

fn wide_row(r: &FlowRecord) -> String {
    let iface = if r.interface.is_empty() {
        format!("if{}", r.ifindex)
    } else {
        r.interface.clone()
    };
    let dir = |d: &DirStats| format!("{}/{}", d.packets, d.bytes);
    format!(
        "{:<WW_TIME$} {:<WW_IFACE$} {:<WW_PROTO$} {:>WW_ENDPOINT$} > {:<WW_ENDPOINT$} {:>WW_DIR$} {:>WW_DIR$} {:>WW_TTL$} {:>WW_DUR$} {:<WW_END$} {}",
        clock_utc(r.last_seen, true),
        iface,
        proto_label(r.protocol),
        client_endpoint(r),
        server_endpoint(r),
        dir(&r.client),
        dir(&r.server),
        format!("{}/{}", r.client.ttl, r.server.ttl),
        format!("{:.3}s", flow_duration(r).as_secs_f64()),
        r.end_reason.as_str(),
        detail(r),
    )
    .trim_end()
    .to_owned()
}

/// Metrics parts in order of importance, each whole or not at all; "+" marks the
/// parts that did not fit.
fn fit(parts: &[String], room: usize) -> String {
    let mut s = String::new();
    for (i, p) in parts.iter().enumerate() {
        let sep = usize::from(!s.is_empty());
        let more = if i + 1 < parts.len() { 2 } else { 0 };
        if s.chars().count() + sep + p.chars().count() + more > room {
            if room > s.chars().count() + sep {
                s.push_str(if s.is_empty() { "+" } else { " +" });
            }
            return s;
        }
        if sep == 1 {
            s.push(' ');
        }
        s.push_str(p);
    }
    s
}

/// The compact metrics of a record, most important first.
pub fn metrics(r: &FlowRecord) -> Vec<String> {
    let mut parts = Vec::new();
    if r.fragment {
        parts.push("fragments".to_owned());
    }
    if let Some(t) = &r.tcp {
        if let Some(rtt) = handshake_rtt(t) {
            parts.push(format!("rtt {}", latency(rtt)));
        }
        if let Some(l) = &t.server_latency {
            parts.push(format!("srv {}", latency(l.mean_ns())));
        }
        if t.syn_retransmits > 0 {
            parts.push(format!("rtx {}", t.syn_retransmits));
        }
        if t.late_start {
            parts.push("late".into());
        }
    }
    if let Some(i) = &r.icmp {
        if let Some(l) = &i.echo_rtt {
            parts.push(format!("rtt {}", latency(l.mean_ns())));
        } else if let Some(t) = i.client_type {
            parts.push(format!("type {t}/{}", i.client_code.unwrap_or(0)));
        }
    }
    parts
}

/// SYN -> SYN-ACK -> ACK as seen here, when both halves were.
pub fn handshake_rtt(t: &TcpInfo) -> Option<u64> {
    Some(u64::from(t.handshake_client_ns?) + u64::from(t.handshake_server_ns?))
}

fn detail(r: &FlowRecord) -> String {
    let mut s = String::new();
    if let Some(t) = &r.tcp {
        tcp_detail(&mut s, t);
    }
    if let Some(i) = &r.icmp {
        icmp_detail(&mut s, i);
    }
    s.trim_start().to_owned()
}

fn tcp_detail(s: &mut String, t: &TcpInfo) {
    let _ = write!(
        s,
        " {} flags {}|{}",
        t.state.as_str(),
        tcp_flags::letters(t.client_flags),
        tcp_flags::letters(t.server_flags)
    );
    let half = |v: Option<u32>| v.map_or_else(|| "?".into(), |v| latency(v.into()));
    if t.handshake_client_ns.is_some() || t.handshake_server_ns.is_some() {
        let _ = write!(
            s,
            " hs {}+{}",
            half(t.handshake_client_ns),
            half(t.handshake_server_ns)
        );
    }
    for (name, l) in [
        ("srv-lat", &t.server_latency),
        ("cli-lat", &t.client_latency),
    ] {
        if let Some(l) = l {
            let _ = write!(s, " {name} {}", latency_detail(l));
        }
    }
    if t.syn_retransmits > 0 {
        let _ = write!(s, " syn-rtx {}", t.syn_retransmits);
    }
    if t.late_start {
        s.push_str(" late-start");
    }
}

fn icmp_detail(s: &mut String, i: &IcmpInfo) {
    let tc = |t: Option<u8>, c: Option<u8>| match (t, c) {
        (Some(t), Some(c)) => format!("{t}/{c}"),
        (Some(t), None) => t.to_string(),
        _ => "-".into(),
    };
    let _ = write!(
        s,
        " icmp c={} s={}",
        tc(i.client_type, i.client_code),
        tc(i.server_type, i.server_code)
    );
    if let Some(id) = i.echo_id {
        let _ = write!(s, " id {id}");
    }
    if let Some(l) = &i.echo_rtt {
        let _ = write!(s, " rtt {}", latency_detail(l));
    }
}

fn latency_detail(l: &Latency) -> String {
    let mut s = format!(
        "{} ({}-{}",
        latency(l.mean_ns()),
        latency(l.min_ns.into()),
        latency(l.max_ns.into())
    );
    if let Some(j) = l.jitter_ns {
        let _ = write!(s, " jit {}", latency(j));
    }
    let _ = write!(s, " n={})", l.count);
    s
}

fn end_short(e: EndReason) -> &'static str {
    match e {
        EndReason::IdleTimeout => "idle",
        EndReason::ActiveTimeout => "actv",
        EndReason::TcpFin => "fin",
        EndReason::TcpRst => "rst",
        EndReason::Shutdown => "stop",
        EndReason::Evicted => "evict",
        EndReason::InProgress => "live",
    }
}

/// A short TCP state name for narrow columns.
pub fn state_short(s: TcpState) -> &'static str {
    match s {
        TcpState::None => "-",
        TcpState::SynSent => "syn",
        TcpState::SynRecv => "synrcv",
        TcpState::Established => "estab",
        TcpState::FinWait => "finwait",
        TcpState::Closed => "closed",
        TcpState::Reset => "reset",
    }
}

pub fn proto_label(p: u8) -> String {
    proto_name(p).map_or_else(|| p.to_string(), str::to_owned)
}

fn endpoint(r: &FlowRecord, a: IpAddr, p: u16) -> String {
    match (a, r.has_ports()) {
        (_, false) => a.to_string(),
        (IpAddr::V4(_), true) => format!("{a}:{p}"),
        (IpAddr::V6(_), true) => format!("[{a}]:{p}"),
    }
}

pub fn client_endpoint(r: &FlowRecord) -> String {
    endpoint(r, r.client_addr, r.client_port)
}

pub fn server_endpoint(r: &FlowRecord) -> String {
    endpoint(r, r.server_addr, r.server_port)
}

pub fn flow_duration(r: &FlowRecord) -> Duration {
    r.last_seen.duration_since(r.first_seen).unwrap_or_default()
}

fn dir_compact(d: &DirStats) -> String {
    format!("{}/{}", count(d.packets), size(d.bytes))
}

fn days(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400
}

/// "2026-11-25": the date part of RFC 3339.
fn date_utc(t: SystemTime) -> String {
    let mut s = humantime::format_rfc3339_seconds(t).to_string();
    s.truncate(10);
    s
}

/// "HH:MM:SS", with milliseconds when `millis`.
fn clock_utc(t: SystemTime, millis: bool) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs() % 86_400;
    let hms = format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
    if millis {
        format!("{hms}.{:03}", d.subsec_millis())
    } else {
        hms
    }
}

// ---------------------------------------------------------------------------
// Compact numbers: at most four characters, shared with `top`
// ---------------------------------------------------------------------------

/// Scales `v` by `step` through `units` into at most three digits and the unit.
fn scaled(v: u64, step: f64, units: &[&str]) -> String {
    let mut x = v as f64;
    let mut u = 0;
    // Rounded as printed, so 1023.9 K becomes 1.0 M instead of "1024K".
    while u + 1 < units.len() && (if x < 9.95 { x } else { x.round() }) >= 1000.0 {
        x /= step;
        u += 1;
    }
    if u > 0 && x < 9.95 {
        format!("{x:.1}{}", units[u])
    } else {
        format!("{:.0}{}", x, units[u])
    }
}

/// Bytes: "840B", "9.5K", "590K", "1.2M" (K = 1024, M = 1024^2, ...).
pub fn size(b: u64) -> String {
    scaled(b, 1024.0, &["B", "K", "M", "G", "T", "P", "E"])
}

/// A count: exact below 10000, else "12k", "1.2M" (k = 1000, M = 1000^2, ...).
pub fn count(n: u64) -> String {
    if n < 10_000 {
        n.to_string()
    } else {
        scaled(n, 1000.0, &["", "k", "M", "G", "T", "P", "E"])
    }
}

/// A duration in at most five characters: "850ms", "9.9s", "42s", "9m59s", "59m", "9h59m", "99h", "12d".
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.subsec_millis()),
        1..=9 => format!("{:.1}s", d.as_secs_f64().min(9.9)),
        10..=59 => format!("{s}s"),
        60..=599 => format!("{}m{}s", s / 60, s % 60),
        600..=3599 => format!("{}m", s / 60),
        3600..=35_999 => format!("{}h{}m", s / 3600, s / 60 % 60),
        36_000..=359_999 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A latency: "850ns", "245µs", "1.2ms", "35ms", "2.1s".
pub fn latency(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns}ns"),
        1_000..=999_499 => format!("{:.0}µs", ns as f64 / 1e3),
        999_500..=9_949_999 => format!("{:.1}ms", ns as f64 / 1e6),
        9_950_000..=999_499_999 => format!("{:.0}ms", ns as f64 / 1e6),
        _ => format!("{:.1}s", ns as f64 / 1e9),
    }
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

/// The JSON form of a record: every field of the proto's `FlowRecord` under its name,
/// RFC 3339 timestamps with nanoseconds and their integer `*_ns` twins, the protocol's
/// name beside its number, and the TCP flags' names beside their bits. README "JSON
/// records" documents every field; renaming one breaks users.
#[derive(Debug, Serialize)]
pub struct JsonRecord<'a> {
    flow_id: u64,
    observer: &'a str,
    ip_version: u8,
    protocol: u8,
    protocol_name: Option<&'static str>,
    client_addr: IpAddr,
    client_port: u16,
    server_addr: IpAddr,
    server_port: u16,
    ifindex: u32,
    interface: &'a str,
    first_hook: Hook,
    first_seen: String,
    first_seen_ns: u64,
    last_seen: String,
    last_seen_ns: u64,
    window_start: String,
    window_start_ns: u64,
    duration_ns: u64,
    client: &'a DirStats,
    server: &'a DirStats,
    end_reason: EndReason,
    continuation: bool,
    fragment: bool,
    tcp: Option<JsonTcp<'a>>,
    icmp: Option<&'a IcmpInfo>,
    seq: u64,
    run: u64,
}

/// `TcpInfo` with the flags' names (`["SYN", "ACK"]`) beside each side's bits, for tools
/// without bitwise operators (jq).
#[derive(Debug, Serialize)]
struct JsonTcp<'a> {
    #[serde(flatten)]
    info: &'a TcpInfo,
    client_flag_names: Vec<&'static str>,
    server_flag_names: Vec<&'static str>,
}

impl<'a> JsonTcp<'a> {
    fn of(info: &'a TcpInfo) -> JsonTcp<'a> {
        JsonTcp {
            info,
            client_flag_names: tcp_flags::upper_names(info.client_flags),
            server_flag_names: tcp_flags::upper_names(info.server_flags),
        }
    }
}

impl<'a> JsonRecord<'a> {
    pub fn of(at: Stamp, r: &'a FlowRecord) -> JsonRecord<'a> {
        let ns = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .try_into()
                .unwrap_or(u64::MAX)
        };
        let rfc3339 = |t: SystemTime| humantime::format_rfc3339_nanos(t).to_string();
        JsonRecord {
            flow_id: r.flow_id,
            observer: &r.observer,
            ip_version: r.ip_version,
            protocol: r.protocol,
            protocol_name: proto_name(r.protocol),
            client_addr: r.client_addr,
            client_port: r.client_port,
            server_addr: r.server_addr,
            server_port: r.server_port,
            ifindex: r.ifindex,
            interface: &r.interface,
            first_hook: r.first_hook,
            first_seen: rfc3339(r.first_seen),
            first_seen_ns: ns(r.first_seen),
            last_seen: rfc3339(r.last_seen),
            last_seen_ns: ns(r.last_seen),
            window_start: rfc3339(r.window_start),
            window_start_ns: ns(r.window_start),
            duration_ns: flow_duration(r).as_nanos().try_into().unwrap_or(u64::MAX),
            client: &r.client,
            server: &r.server,
            end_reason: r.end_reason,
            continuation: r.continuation,
            fragment: r.fragment,
            tcp: r.tcp.as_ref().map(JsonTcp::of),
            icmp: r.icmp.as_ref(),
            seq: at.seq,
            run: at.run,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::flow::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn rec(client: &str, cport: u16, server: &str, sport: u16, proto: u8) -> FlowRecord {
        FlowRecord {
            flow_id: 42,
            observer: "host1".into(),
            window_start: at(1_795_637_000),
            continuation: false,
            fragment: false,
            ip_version: 4,
            protocol: proto,
            client_addr: client.parse().unwrap(),
            client_port: cport,
            server_addr: server.parse().unwrap(),
            server_port: sport,
            ifindex: 7,
            interface: "eth0".into(),
            first_hook: Hook::Egress,
            first_seen: at(1_795_637_000),
            last_seen: at(1_795_637_000) + Duration::from_nanos(3_250_000_123),
            client: DirStats {
                packets: 12,
                bytes: 1_400,
                ttl: 64,
            },
            server: DirStats {
                packets: 10,
                bytes: 14_000,
                ttl: 63,
            },
            end_reason: EndReason::TcpFin,
            tcp: None,
            icmp: None,
        }
    }

    /// The widest IPv4 TCP record there is: every field at its longest.
    fn worst_tcp() -> FlowRecord {
        let mut r = rec(
            "255.255.255.255",
            65535,
            "255.255.255.254",
            65534,
            IPPROTO_TCP,
        );
        r.client = DirStats {
            packets: 987_654_321_012,
            bytes: 1023 << 40,
            ttl: 255,
        };
        r.server = r.client;
        r.last_seen = r.first_seen + Duration::from_secs(3599 * 24);
        r.end_reason = EndReason::ActiveTimeout;
        r.tcp = Some(TcpInfo {
            client_flags: 0xff,
            server_flags: 0xff,
            state: TcpState::FinWait,
            handshake_client_ns: Some(u32::MAX),
            handshake_server_ns: Some(u32::MAX),
            syn_retransmits: u16::MAX,
            late_start: true,
            client_latency: Some(Latency {
                count: u32::MAX,
                sum_ns: u64::MAX,
                min_ns: 1,
                max_ns: u32::MAX,
                jitter_ns: Some(u64::MAX),
            }),
            server_latency: Some(Latency {
                count: 3,
                sum_ns: 3_000_000,
                min_ns: 900_000,
                max_ns: 1_100_000,
                jitter_ns: Some(100_000),
            }),
        });
        r
    }

    #[test]
    fn ipv4_rows_fit_100_columns() {
        let mut icmp = rec("203.120.111.222", 0, "198.151.100.200", 0, IPPROTO_ICMP);
        icmp.icmp = Some(IcmpInfo {
            client_type: Some(8),
            client_code: Some(0),
            server_type: Some(0),
            server_code: Some(0),
            echo_id: Some(65535),
            echo_rtt: Some(Latency {
                count: 4,
                sum_ns: 400_000,
                min_ns: 90_000,
                max_ns: 110_000,
                jitter_ns: None,
            }),
        });
        let typical = {
            let mut r = rec("10.200.12.1", 45678, "10.200.12.2", 5201, IPPROTO_TCP);
            r.tcp = worst_tcp().tcp.map(|t| TcpInfo {
                syn_retransmits: 0,
                late_start: false,
                ..t
            });
            r
        };
        for r in [
            worst_tcp(),
            typical.clone(),
            icmp,
            rec("1.1.1.1", 1, "2.2.2.2", 2, IPPROTO_UDP),
        ] {
            let row = table_row(&r, false);
            assert!(
                row.chars().count() <= TABLE_WIDTH,
                "{} > 100: {row}",
                row.len()
            );
        }
        assert!(table_header(false).chars().count() <= TABLE_WIDTH);
        for line in legend(false).lines().chain(legend(true).lines()) {
            assert!(line.chars().count() <= TABLE_WIDTH, "{line}");
        }
        // A typical row keeps its handshake and server latency, and the arrow lines up
        // with the header's gap.
        let row = table_row(&typical, false);
        assert!(row.contains("rtt 8.6s srv 1.0ms"), "{row}");
        assert!(
            row.contains("10.200.12.1:45678 > 10.200.12.2:5201"),
            "{row}"
        );
        assert_eq!(row.find(" > "), table_header(false).find("   SERVER"));
        // The worst one says that it left metrics out.
        assert!(table_row(&worst_tcp(), false).ends_with('+'));
    }

    #[test]
    fn wide_rows_show_everything() {
        let row = table_row(&worst_tcp(), true);
        for part in [
            "eth0",
            "active_timeout",
            "fin_wait flags SAPFRUEC|SAPFRUEC",
            "hs 4.3s+4.3s",
            "srv-lat 1.0ms (900µs-1.1ms jit 100µs n=3)",
            "syn-rtx 65535",
            "late-start",
            "255/255",
        ] {
            assert!(row.contains(part), "{part:?} in {row}");
        }
    }

    #[test]
    fn legend_explains_every_abbreviation() {
        let short = legend(false);
        for abbr in [
            "idle", "actv", "fin", "rst", "stop", "rtt", "srv", "rtx", "late", "type", "C>S",
            "DUR", "+",
        ] {
            assert!(short.contains(abbr), "{abbr}");
        }
        let wide = legend(true);
        for abbr in [
            "hs C+S",
            "srv-lat",
            "cli-lat",
            "jit",
            "syn-rtx",
            "late-start",
            "TTL",
            "S SYN",
            "id",
        ] {
            assert!(wide.contains(abbr), "{abbr}");
        }
        let mut out = Vec::new();
        let mut r = Renderer::styled(
            Format::Table,
            TableStyle {
                wide: false,
                legend: true,
            },
        );
        r.header(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("TIME: UTC"), "{text}");
        assert!(text.lines().last().unwrap().starts_with("TIME     PROT"));
    }

    #[test]
    fn a_date_line_comes_first_and_when_the_day_changes() {
        let mut out = Vec::new();
        let mut rd = Renderer::new(Format::Table);
        let mut r = rec("10.0.0.1", 40000, "10.0.0.2", 443, IPPROTO_TCP);
        r.last_seen = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 86_399);
        rd.record(&mut out, &r).unwrap();
        rd.record(&mut out, &r).unwrap();
        r.last_seen += Duration::from_secs(2);
        rd.record(&mut out, &r).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!(lines[1], "--- 2024-10-04 (UTC) ---");
        assert!(lines[2].starts_with("23:59:59 tcp "), "{text}");
        assert!(lines[3].starts_with("23:59:59 "));
        assert_eq!(lines[4], "--- 2024-10-05 (UTC) ---");
        assert!(lines[5].starts_with("00:00:01 "));
    }

    #[test]
    fn compact_numbers_stay_within_four_or_five_characters() {
        assert_eq!(size(840), "840B");
        assert_eq!(size(1_400), "1.4K");
        assert_eq!(size(604_160), "590K");
        assert_eq!(size(1_048_000), "1.0M");
        assert_eq!(size(1023 << 40), "1.0P");
        assert_eq!(count(9_999), "9999");
        assert_eq!(count(12_345), "12k");
        assert_eq!(count(999_999), "1.0M");
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_millis(3_250)), "3.2s");
        assert_eq!(duration(Duration::from_secs(599)), "9m59s");
        assert_eq!(duration(Duration::from_secs(3 * 3600 + 7 * 60)), "3h7m");
        assert_eq!(latency(245_000), "245µs");
        assert_eq!(latency(1_234_000), "1.2ms");
        assert_eq!(latency(35_000_000), "35ms");
        for v in [
            0,
            999,
            1000,
            1023,
            1024,
            10_239,
            10_240,
            1_048_575,
            u64::MAX,
        ] {
            assert!(size(v).chars().count() <= 5, "{v}: {}", size(v));
            assert!(count(v).chars().count() <= 5, "{v}: {}", count(v));
        }
    }

    #[test]
    fn json_has_rfc3339_nanosecond_times_and_the_protocol_name() {
        let r = rec("10.0.0.1", 40000, "10.0.0.2", 443, IPPROTO_TCP);
        let mut out = Vec::new();
        Renderer::new(Format::Json).record(&mut out, &r).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["first_seen"], "2026-11-25T20:03:20.000000000Z");
        assert_eq!(v["last_seen"], "2026-11-25T20:03:23.250000123Z");
        assert_eq!(v["last_seen_ns"], 1_795_637_003_250_000_123u64);
        assert_eq!(v["duration_ns"], 3_250_000_123u64);
        assert_eq!(v["protocol"], 6);
        assert_eq!(v["protocol_name"], "tcp");
        assert_eq!(v["ip_version"], 4);
        assert_eq!(v["end_reason"], "tcp_fin");
        assert_eq!(v["first_hook"], "egress");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(v["window_start"], "2026-11-25T20:03:20.000000000Z");
        assert_eq!(
            (v["flow_id"].as_u64(), v["observer"].as_str()),
            (Some(42), Some("host1"))
        );
        assert_eq!(keys.len(), 28, "{keys:?}");
    }
}
