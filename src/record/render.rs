//! How a person and a script see records: the one table renderer and the one JSON encoder, used by `run`, `watch` and `flows` alike, and the compact number formats `top` shares.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::record::encoding::Stamp;
use crate::record::flow::{
    proto_name, tcp_flags, DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, LocalProcess,
    TcpInfo, TcpState, IPPROTO_TCP,
};

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns under a header line.
    Table,
    /// One JSON object per line.
    Json,
}

/// How the table writes times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeFormat {
    /// HH:MM:SS in UTC, a date line when the UTC day changes.
    #[default]
    Utc,
    /// HH:MM:SS in the local time zone (TZ, else /etc/localtime), a date line when the
    /// local day changes.
    Local,
    /// Seconds since the Unix epoch with milliseconds; no date lines.
    Unix,
}

/// Which records a table holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TableKind {
    /// Records as they are emitted: TIME (the emission) first, END says why.
    #[default]
    Emitted,
    /// Flows in progress (ListFlows): no TIME column (one snapshot time for all), STATE
    /// instead of END.
    InProgress,
}

/// Table options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStyle {
    /// Every column, unabbreviated.
    pub wide: bool,
    /// Print the legend before the header.
    pub legend: bool,
    /// No header line and no date lines: rows only, for scripts.
    pub no_header: bool,
    pub time: TimeFormat,
    /// Columns a row may take (the terminal's width); None: `TABLE_WIDTH`.
    pub width: Option<usize>,
    pub kind: TableKind,
}

/// The width the default table is laid out for when it does not know a terminal's: an
/// IPv4 row fits with its metrics (a longer endpoint pushes the row right; METRICS gives
/// way first).
pub const TABLE_WIDTH: usize = 120;

/// Narrower than this, the default table leaves out FIRST to keep room for METRICS.
const FIRST_COLUMN_FROM: usize = 120;

/// The width of the terminal on stdout, if stdout is one.
pub fn stdout_width() -> Option<usize> {
    // SAFETY: winsize is plain data; the ioctl writes it or fails.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ on fd 1 with a valid winsize pointer.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

/// Writes records in one format; the table's header goes out before the first record,
/// and a date line whenever the day changes.
#[derive(Debug)]
pub struct Renderer {
    format: Format,
    style: TableStyle,
    layout: Vec<Col>,
    header_done: bool,
    /// The day of the last row (in the table's time zone), to print the date when it
    /// changes.
    day: Option<i64>,
}

impl Renderer {
    pub fn new(format: Format) -> Renderer {
        Renderer::styled(format, TableStyle::default())
    }

    pub fn styled(format: Format, style: TableStyle) -> Renderer {
        Renderer {
            format,
            style,
            layout: layout(&style),
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
                writeln!(out, "{}", legend(&self.style))?;
            }
            if !self.style.no_header {
                writeln!(out, "{}", header_line(&self.layout, &self.style))?;
            }
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
                // Flows in progress were all "emitted" at their snapshot's time: one line.
                if let Some((day, line)) = date_line(r.emitted, self.style.time) {
                    if self.day != Some(day) && !self.style.no_header {
                        writeln!(out, "{line}")?;
                    }
                    self.day = Some(day);
                }
                writeln!(out, "{}", row(&self.layout, &self.style, r))
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

/// A table column; the last one (METRICS or DETAIL) takes what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    /// When the record was emitted.
    Time,
    /// The flow's first packet.
    First,
    Observer,
    Iface,
    Proto,
    Client,
    Server,
    ClientSent,
    ServerSent,
    Ttl,
    Duration,
    End,
    /// The local process of the client side, and of the server side (`--wide`).
    ClientProcess,
    ServerProcess,
    Tail,
}

/// The columns `style` shows, in order.
fn layout(style: &TableStyle) -> Vec<Col> {
    let mut cols = Vec::new();
    if style.kind == TableKind::Emitted {
        cols.push(Col::Time);
    }
    let room = style.width.unwrap_or(TABLE_WIDTH);
    if style.wide || style.kind == TableKind::InProgress || room >= FIRST_COLUMN_FROM {
        cols.push(Col::First);
    }
    if style.wide {
        cols.extend([Col::Observer, Col::Iface]);
    }
    cols.extend([
        Col::Proto,
        Col::Client,
        Col::Server,
        Col::ClientSent,
        Col::ServerSent,
    ]);
    if style.wide {
        cols.push(Col::Ttl);
    }
    cols.extend([Col::Duration, Col::End]);
    if style.wide {
        cols.extend([Col::ClientProcess, Col::ServerProcess]);
    }
    cols.push(Col::Tail);
    cols
}

/// A column's width (a longer value pushes the rest of the row right) and whether its
/// values are right-aligned.
fn width(col: Col, style: &TableStyle) -> (usize, bool) {
    let time = match (style.time, style.wide) {
        (TimeFormat::Unix, _) => 14,
        (_, true) => 12,
        (_, false) => 8,
    };
    match (col, style.wide) {
        (Col::Time | Col::First, _) => (time, false),
        (Col::Observer, _) => (12, false),
        (Col::Iface, _) => (10, false),
        (Col::Proto, false) => (4, false),
        (Col::Proto, true) => (6, false),
        (Col::Client, false) => (19, true),
        (Col::Server, false) => (16, false),
        (Col::Client, true) => (21, true),
        (Col::Server, true) => (21, false),
        (Col::ClientSent | Col::ServerSent, false) => (8, true),
        (Col::ClientSent | Col::ServerSent, true) => (18, true),
        (Col::Ttl, _) => (7, true),
        (Col::Duration, false) => (5, true),
        (Col::Duration, true) => (10, true),
        (Col::End, false) => (4, false),
        (Col::End, true) => (14, false),
        (Col::ClientProcess | Col::ServerProcess, _) => (24, false),
        (Col::Tail, _) => (0, false),
    }
}

fn title(col: Col, style: &TableStyle) -> &'static str {
    match (col, style.wide) {
        (Col::Time, _) => "TIME",
        (Col::First, _) => "FIRST",
        (Col::Observer, _) => "OBSERVER",
        (Col::Iface, _) => "IFACE",
        (Col::Proto, false) => "PROT",
        (Col::Proto, true) => "PROTO",
        (Col::Client, _) => "CLIENT",
        (Col::Server, _) => "SERVER",
        (Col::ClientSent, false) => "C>S",
        (Col::ServerSent, false) => "S>C",
        (Col::ClientSent, true) => "C>S PKTS/BYTES",
        (Col::ServerSent, true) => "S>C PKTS/BYTES",
        (Col::Ttl, _) => "TTL C/S",
        (Col::Duration, false) => "DUR",
        (Col::Duration, true) => "DURATION",
        (Col::End, _) if style.kind == TableKind::InProgress => "STATE",
        (Col::End, _) => "END",
        (Col::ClientProcess, _) => "CLIENT PROCESS",
        (Col::ServerProcess, _) => "SERVER PROCESS",
        (Col::Tail, false) => "METRICS",
        (Col::Tail, true) => "DETAIL",
    }
}

/// Joins cells padded to their widths: CLIENT and SERVER with " > " (three spaces in the
/// header), the others with one space.
fn join(layout: &[Col], style: &TableStyle, cell: impl Fn(Col) -> String) -> String {
    let mut s = String::new();
    for (i, &col) in layout.iter().enumerate() {
        if i > 0 {
            s.push_str(if col == Col::Server { " > " } else { " " });
        }
        let (w, right) = width(col, style);
        let v = cell(col);
        if right {
            let _ = write!(s, "{v:>w$}");
        } else {
            let _ = write!(s, "{v:<w$}");
        }
    }
    s.trim_end().to_owned()
}

/// The header line.
fn header_line(layout: &[Col], style: &TableStyle) -> String {
    join(layout, style, |c| title(c, style).to_owned()).replace(" > ", "   ")
}

/// The header line of a table in `style`.
pub fn table_header(style: &TableStyle) -> String {
    header_line(&layout(style), style)
}

/// One table line.
fn row(layout: &[Col], style: &TableStyle, r: &FlowRecord) -> String {
    let wide = style.wide;
    let cell = |col: Col| -> String {
        match col {
            Col::Time => clock(r.emitted, style.time, wide),
            Col::First => clock(r.first_seen, style.time, wide),
            Col::Observer => r.observer.to_string(),
            Col::Iface if r.interface.is_empty() => format!("if{}", r.ifindex),
            Col::Iface => r.interface.clone(),
            Col::Proto => proto_label(r.protocol),
            Col::Client => client_endpoint(r),
            Col::Server => server_endpoint(r),
            Col::ClientSent if wide => format!("{}/{}", r.client.packets, r.client.bytes),
            Col::ServerSent if wide => format!("{}/{}", r.server.packets, r.server.bytes),
            Col::ClientSent => dir_compact(&r.client),
            Col::ServerSent => dir_compact(&r.server),
            Col::Ttl => format!("{}/{}", r.client.ttl, r.server.ttl),
            Col::Duration if wide => format!("{:.3}s", flow_duration(r).as_secs_f64()),
            Col::Duration => duration(flow_duration(r)),
            Col::End if style.kind == TableKind::InProgress => state_label(r).to_owned(),
            Col::End if wide => match end_label(r) {
                l @ ("refused" | "rst-c" | "rst-s" | "rst-cs") => format!("tcp_rst ({l})"),
                _ => r.end_reason.as_str().to_owned(),
            },
            Col::End => end_label(r).to_owned(),
            Col::ClientProcess => process_label(r.client_process.as_deref()),
            Col::ServerProcess => process_label(r.server_process.as_deref()),
            Col::Tail => String::new(),
        }
    };
    let mut s = join(layout, style, cell);
    if wide {
        let d = detail(r);
        if !d.is_empty() {
            s.push(' ');
            s.push_str(&d);
        }
        return s;
    }
    // The tail starts where the header says METRICS, whatever the row pushed right.
    let start = header_line(layout, style).chars().count() - "METRICS".len();
    let used = s.chars().count();
    let pad = start.saturating_sub(used);
    let room = style
        .width
        .unwrap_or(TABLE_WIDTH)
        .saturating_sub(used + pad.max(1));
    let tail = fit(&metrics(r), room);
    if !tail.is_empty() {
        s.push_str(&" ".repeat(pad.max(1)));
        s.push_str(&tail);
    }
    s
}

/// A local process as the wide table shows it: `comm[pid] uid=N /cgroup/path` (the path
/// names the unit), what of it is known; `-` for a side that is not a local socket.
pub fn process_label(p: Option<&LocalProcess>) -> String {
    let Some(p) = p else {
        return "-".into();
    };
    let mut parts = Vec::new();
    match (&p.comm, p.pid) {
        (Some(c), Some(pid)) => parts.push(format!("{c}[{pid}]")),
        (None, Some(pid)) => parts.push(format!("[{pid}]")),
        _ => {}
    }
    if let Some(uid) = p.uid {
        parts.push(format!("uid={uid}"));
    }
    match (&p.cgroup, p.cgroup_id) {
        (Some(c), _) => parts.push(c.to_string()),
        (None, Some(id)) => parts.push(format!("cgroup#{id}")),
        _ => {}
    }
    if parts.is_empty() {
        "?".into()
    } else {
        parts.join(" ")
    }
}

/// One table line in `style` (header and date lines aside).
pub fn table_row(r: &FlowRecord, style: &TableStyle) -> String {
    row(&layout(style), style, r)
}

const LEGEND_COMMON: &str = "TIME: when the agent emitted the record (the poll that ended the flow); rows come in this order.\n\
FIRST: the flow's first packet. CLIENT > SERVER: the side that sent the first packet (the SYN\n\
\x20 for TCP) > the other. C>S, S>C: packets/bytes the client sent, and the server (IP bytes:\n\
\x20 headers, no framing); K, M, G, T = 1024^1..4 bytes; packet counts k, M, G = 1000^1..3.\n\
DUR: first to last packet. ";

const LEGEND_SHORT: &str =
    "END: idle = no packet for the idle timeout, actv = active timeout (long flow,\n\
\x20 counters since its previous record), fin = TCP FIN both ways, rst-c / rst-s / rst-cs = TCP\n\
\x20 reset by the client / the server / both, refused = the server answered the SYN with a reset,\n\
\x20 stop = agent stopped, evict = ended early to make room in a full flow map (a flood).\n\
METRICS: rtt = TCP handshake round trip (SYN>SYN-ACK>ACK) or ICMP echo round trip;\n\
\x20 srv = server response time (mean); rtx = SYNs retransmitted; late = connection began\n\
\x20 before flowlens; type = ICMP type/code the client sent; + = more (see --wide).";

const LEGEND_WIDE: &str = "OBSERVER: the agent that saw the flow. IFACE: the interface.\n\
END: idle_timeout, active_timeout (long flow, counters since its previous record), tcp_fin,\n\
\x20 tcp_rst (who reset, or refused), shutdown (agent stopped), evicted (room made in a full\n\
\x20 flow map), in_progress. TTL C/S: last TTL/hop limit of each side.\n\
CLIENT PROCESS, SERVER PROCESS: the local socket's owner, COMMAND[PID] uid=UID /cgroup/path\n\
\x20 (the path names the systemd unit); - = not a local socket (a remote host, forwarding).\n\
DETAIL: TCP state; flags C|S = TCP flags each side sent (S SYN, A ACK, P PSH, F FIN, R RST,\n\
\x20 U URG, E ECE, C CWR); hs C+S = handshake SYN>SYN-ACK + SYN-ACK>ACK; srv-lat/cli-lat =\n\
\x20 server/client response time mean (min-max, jit = jitter, n = samples); syn-rtx = SYNs\n\
\x20 retransmitted; late-start = connection began before flowlens; icmp c=TYPE/CODE s=...;\n\
\x20 id = echo id; rtt = echo round trip.";

/// What the times are in.
fn time_legend(t: TimeFormat) -> &'static str {
    match t {
        TimeFormat::Utc => "Times are UTC (--time-format local|unix).\n",
        TimeFormat::Local => "Times are local (--time-format utc|unix).\n",
        TimeFormat::Unix => "Times are seconds since the Unix epoch (--time-format utc|local).\n",
    }
}

/// The legend: every column and abbreviation the table uses.
pub fn legend(style: &TableStyle) -> String {
    [
        LEGEND_COMMON,
        time_legend(style.time),
        if style.wide {
            LEGEND_WIDE
        } else {
            LEGEND_SHORT
        },
    ]
    .concat()
}

/// The legend of both tables, for `--help`.
pub fn help_legend() -> String {
    format!(
        "Table legend:\n{LEGEND_COMMON}{}{LEGEND_SHORT}\nWith --wide:\n{LEGEND_WIDE}",
        time_legend(TimeFormat::Utc)
    )
}

/// What the END column says: the end reason, and for a TCP reset who sent it, or
/// `refused` when the server answered the client's SYN with one.
pub fn end_label(r: &FlowRecord) -> &'static str {
    match r.end_reason {
        EndReason::IdleTimeout => "idle",
        EndReason::ActiveTimeout => "actv",
        EndReason::TcpFin => "fin",
        EndReason::TcpRst => rst_label(r),
        EndReason::Shutdown => "stop",
        EndReason::Evicted => "evict",
        EndReason::InProgress => "live",
    }
}

fn rst_label(r: &FlowRecord) -> &'static str {
    let Some(t) = r.tcp.filter(|_| r.protocol == IPPROTO_TCP) else {
        return "rst";
    };
    let (c, s) = (t.client_flags, t.server_flags);
    let rst = tcp_flags::RST;
    let syn = tcp_flags::SYN;
    if c & syn != 0 && s & rst != 0 && s & syn == 0 {
        return "refused";
    }
    match (c & rst != 0, s & rst != 0) {
        (true, false) => "rst-c",
        (false, true) => "rst-s",
        (true, true) => "rst-cs",
        (false, false) => "rst",
    }
}

/// What the STATE column of flows in progress says: the TCP state, else `live`.
pub fn state_label(r: &FlowRecord) -> &'static str {
    r.tcp.map_or("live", |t| state_short(t.state))
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
    if r.partial {
        parts.push("partial".to_owned());
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

/// The day `t` falls on in the table's time zone, and the line that announces it; None
/// for Unix times, which need none.
fn date_line(t: SystemTime, f: TimeFormat) -> Option<(i64, String)> {
    match f {
        TimeFormat::Utc => {
            let mut date = humantime::format_rfc3339_seconds(t).to_string();
            date.truncate(10);
            let day = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400;
            Some((day as i64, format!("--- {date} (UTC) ---")))
        }
        TimeFormat::Local => {
            let local = chrono::DateTime::<chrono::Local>::from(t);
            let day = chrono::Datelike::num_days_from_ce(&local.date_naive());
            Some((
                i64::from(day),
                format!(
                    "--- {} (local, UTC{}) ---",
                    local.format("%Y-%m-%d"),
                    local.format("%:z")
                ),
            ))
        }
        TimeFormat::Unix => None,
    }
}

/// "HH:MM:SS" (with milliseconds when `millis`) in UTC or local time, or Unix seconds
/// with milliseconds.
pub fn clock(t: SystemTime, f: TimeFormat, millis: bool) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let hms = match f {
        TimeFormat::Unix => return format!("{}.{:03}", d.as_secs(), d.subsec_millis()),
        TimeFormat::Utc => {
            let s = d.as_secs() % 86_400;
            format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        }
        TimeFormat::Local => chrono::DateTime::<chrono::Local>::from(t)
            .format("%H:%M:%S")
            .to_string(),
    };
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
    emitted: String,
    emitted_ns: u64,
    client: &'a DirStats,
    server: &'a DirStats,
    end_reason: EndReason,
    continuation: bool,
    fragment: bool,
    partial: bool,
    tcp: Option<JsonTcp<'a>>,
    icmp: Option<&'a IcmpInfo>,
    client_process: Option<&'a LocalProcess>,
    server_process: Option<&'a LocalProcess>,
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
            emitted: rfc3339(r.emitted),
            emitted_ns: ns(r.emitted),
            client: &r.client,
            server: &r.server,
            end_reason: r.end_reason,
            continuation: r.continuation,
            fragment: r.fragment,
            partial: r.partial,
            tcp: r.tcp.as_ref().map(JsonTcp::of),
            icmp: r.icmp.as_ref(),
            client_process: r.client_process.as_deref(),
            server_process: r.server_process.as_deref(),
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
            emitted: at(1_795_637_004),
            continuation: false,
            fragment: false,
            partial: false,
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
            client_process: None,
            server_process: None,
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
    fn ipv4_rows_fit_the_table_width() {
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
        for width in [None, Some(100), Some(160)] {
            let style = TableStyle {
                width,
                ..TableStyle::default()
            };
            let limit = width.unwrap_or(TABLE_WIDTH);
            for r in [
                worst_tcp(),
                typical.clone(),
                icmp.clone(),
                rec("1.1.1.1", 1, "2.2.2.2", 2, IPPROTO_UDP),
            ] {
                let row = table_row(&r, &style);
                assert!(
                    row.chars().count() <= limit,
                    "{} > {limit}: {row}",
                    row.len()
                );
            }
            assert!(table_header(&style).chars().count() <= limit);
        }
        for line in legend(&TableStyle::default()).lines().chain(
            legend(&TableStyle {
                wide: true,
                ..TableStyle::default()
            })
            .lines(),
        ) {
            assert!(line.chars().count() <= 100, "{line}");
        }
        // A typical row keeps its handshake and server latency, and the arrow lines up
        // with the header's gap.
        let style = TableStyle::default();
        let row = table_row(&typical, &style);
        assert!(row.contains("rtt 8.6s srv 1.0ms"), "{row}");
        assert!(
            row.contains("10.200.12.1:45678 > 10.200.12.2:5201"),
            "{row}"
        );
        assert_eq!(row.find(" > "), table_header(&style).find("   SERVER"));
        assert_eq!(
            row.find("rtt"),
            table_header(&style).find("METRICS"),
            "{row}"
        );
        // TIME is the emission, FIRST the first packet.
        assert!(row.starts_with("20:03:24 20:03:20 tcp "), "{row}");
        // The worst one says that it left metrics out.
        assert!(table_row(&worst_tcp(), &style).ends_with('+'));
        // A 100-column terminal drops FIRST to keep room for the metrics.
        let narrow = TableStyle {
            width: Some(100),
            ..style
        };
        assert!(!table_header(&narrow).contains("FIRST"));
        assert!(table_row(&typical, &narrow).contains("rtt 8.6s srv 1.0ms"));
    }

    #[test]
    fn resets_say_who_and_a_refused_connection_says_so() {
        let mut r = rec("10.0.0.1", 40000, "10.0.0.2", 443, IPPROTO_TCP);
        r.end_reason = EndReason::TcpRst;
        let tcp = |c: u8, s: u8| {
            Some(TcpInfo {
                client_flags: c,
                server_flags: s,
                ..worst_tcp().tcp.unwrap()
            })
        };
        use tcp_flags::{ACK, RST, SYN};
        for (c, s, want) in [
            (SYN, RST | ACK, "refused"),
            (SYN | ACK | RST, SYN | ACK, "rst-c"),
            (SYN | ACK, SYN | ACK | RST, "rst-s"),
            (SYN | ACK | RST, SYN | ACK | RST, "rst-cs"),
            (ACK, ACK, "rst"),
        ] {
            r.tcp = tcp(c, s);
            assert_eq!(end_label(&r), want);
            let row = table_row(&r, &TableStyle::default());
            assert!(row.contains(&format!(" {want} ")), "{row}");
        }
        r.tcp = tcp(SYN, RST | ACK);
        let wide = table_row(
            &r,
            &TableStyle {
                wide: true,
                ..TableStyle::default()
            },
        );
        assert!(wide.contains("tcp_rst (refused)"), "{wide}");
    }

    #[test]
    fn wide_rows_show_everything() {
        let style = TableStyle {
            wide: true,
            ..TableStyle::default()
        };
        let row = table_row(&worst_tcp(), &style);
        for part in [
            "host1",
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
        assert!(
            table_header(&style).starts_with("TIME         FIRST        OBSERVER     IFACE"),
            "{}",
            table_header(&style)
        );
    }

    #[test]
    fn legend_explains_every_abbreviation() {
        let short = legend(&TableStyle::default());
        for abbr in [
            "idle", "actv", "fin", "rst-c", "rst-s", "refused", "stop", "evict", "rtt", "srv",
            "rtx", "late", "type", "C>S", "DUR", "FIRST", "+",
        ] {
            assert!(short.contains(abbr), "{abbr}");
        }
        let wide = legend(&TableStyle {
            wide: true,
            ..TableStyle::default()
        });
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
            "evicted",
            "OBSERVER",
        ] {
            assert!(wide.contains(abbr), "{abbr}");
        }
        let mut out = Vec::new();
        let mut r = Renderer::styled(
            Format::Table,
            TableStyle {
                legend: true,
                ..TableStyle::default()
            },
        );
        r.header(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("TIME: when the agent"), "{text}");
        assert!(text
            .lines()
            .last()
            .unwrap()
            .starts_with("TIME     FIRST    PROT"));
    }

    #[test]
    fn a_date_line_comes_first_and_when_the_day_changes() {
        let mut out = Vec::new();
        let mut rd = Renderer::new(Format::Table);
        let mut r = rec("10.0.0.1", 40000, "10.0.0.2", 443, IPPROTO_TCP);
        r.emitted = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 86_399);
        rd.record(&mut out, &r).unwrap();
        rd.record(&mut out, &r).unwrap();
        r.emitted += Duration::from_secs(2);
        rd.record(&mut out, &r).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!(lines[1], "--- 2024-10-04 (UTC) ---");
        assert!(lines[2].starts_with("23:59:59 "), "{text}");
        assert!(lines[3].starts_with("23:59:59 "));
        assert_eq!(lines[4], "--- 2024-10-05 (UTC) ---");
        assert!(lines[5].starts_with("00:00:01 "));
    }

    #[test]
    fn no_header_prints_rows_only_and_unix_times_have_no_date_line() {
        let r = rec("10.0.0.1", 40000, "10.0.0.2", 443, IPPROTO_TCP);
        let mut out = Vec::new();
        let mut rd = Renderer::styled(
            Format::Table,
            TableStyle {
                no_header: true,
                ..TableStyle::default()
            },
        );
        rd.header(&mut out).unwrap();
        rd.record(&mut out, &r).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("20:03:24 20:03:20 tcp"), "{text}");

        let mut out = Vec::new();
        let unix = TableStyle {
            time: TimeFormat::Unix,
            ..TableStyle::default()
        };
        Renderer::styled(Format::Table, unix)
            .record(&mut out, &r)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[1].starts_with("1795637004.000 1795637000.000 tcp"),
            "{text}"
        );
        assert_eq!(lines[0].find("FIRST"), lines[1].find("1795637000"));
    }

    #[test]
    fn local_times_follow_the_time_zone() {
        // TZ is read when a local time is first needed; this test owns it in this process.
        std::env::set_var("TZ", "Asia/Kolkata");
        let t = at(1_795_637_000);
        assert_eq!(clock(t, TimeFormat::Local, false), "01:33:20");
        assert_eq!(clock(t, TimeFormat::Utc, false), "20:03:20");
        let (_, line) = date_line(t, TimeFormat::Local).unwrap();
        assert_eq!(line, "--- 2026-11-26 (local, UTC+05:30) ---");
    }

    #[test]
    fn flows_in_progress_show_their_state_instead_of_an_end() {
        let mut r = rec("10.0.0.1", 40000, "10.0.0.2", 443, IPPROTO_TCP);
        r.end_reason = EndReason::InProgress;
        r.tcp = worst_tcp().tcp;
        let style = TableStyle {
            kind: TableKind::InProgress,
            ..TableStyle::default()
        };
        assert!(table_header(&style).starts_with("FIRST    PROT"));
        assert!(table_header(&style).contains(" STATE "));
        let row = table_row(&r, &style);
        assert!(row.starts_with("20:03:20 tcp "), "{row}");
        assert!(row.contains(" finwait "), "{row}");
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
        assert_eq!(v["emitted"], "2026-11-25T20:03:24.000000000Z");
        assert_eq!(v["emitted_ns"], 1_795_637_004_000_000_000u64);
        assert_eq!(keys.len(), 33, "{keys:?}");
    }
}
