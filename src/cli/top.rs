//! `flowlens top`: a live full-screen view of an agent's flows in progress, with per-flow rates from consecutive `ListFlows` snapshots, laid out for the terminal's width.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Row, Table};
use ratatui::Frame;
use tonic::transport::Channel;

use crate::cli::client::{describe, list_flows, FlowQuery};
use crate::cli::terminal::{Input, Terminal};
use crate::config::HumanDuration;
use crate::record::api::proto;
use crate::record::api::proto::flow_lens_client::FlowLensClient;
use crate::record::flow::{FlowRecord, LocalProcess};
use crate::record::render::{self, client_endpoint, count, handshake_rtt, server_endpoint, size};

/// The keys, for `--help` and the `?` screen.
pub const KEYS_HELP: &str = "Keys:
  q, Ctrl-C      quit (Esc: close help, clear the filter, else quit)
  ?, h           this help
  space, p       pause / resume
  j, Down        scroll down      k, Up       scroll up
  PageDown, f    page down        PageUp      page up      Home / End   first / last
  /              filter: rows whose text contains what you type (Enter keeps it, Esc drops it)
  g              group by host pair (client address > server address, every port)
  u              group by unit: the service owning the flow's local socket(s)
  b              bits/s instead of bytes/s
  s / S          next / previous sort     r  reverse the order
  1 rate  2 packets/s  3 total bytes  4 latency  5 age   (also t total, l latency, a age)
Columns: RATE = both ways, C>S / S>C = each way (B/s, KB/s = 1024 B/s..., or b/s, kb/s = 1000 b/s...),
  PKT/s = packets/s both ways, BYTES = total both ways, AGE = since the first packet,
  RTT = TCP handshake or ICMP echo round trip, SRV = server response time (mean),
  UNIT = the systemd unit of the flow's local socket (else its cgroup, else its command;
  client>server when both ends are local and differ; - none: remote or forwarded),
  FLOWS = flows of a host pair (g) or unit (u). Narrow terminals drop columns (IFACE,
  SRV, PKT/s, RTT, UNIT, S>C, C>S first) and shorten long addresses in the middle (...).";

/// The longest wait between attempts to reach an agent that is down.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Flows asked for per ListFlows page.
const PAGE: u32 = 5000;

#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub query: FlowQuery,
    /// How often to refresh (the agent's snapshot changes once per poll interval).
    #[arg(long, value_name = "DURATION", env = "FLOWLENS_TOP_INTERVAL", default_value_t = HumanDuration(Duration::from_secs(1)))]
    pub interval: HumanDuration,
    /// Sort order to start with.
    #[arg(long, value_enum, env = "FLOWLENS_TOP_SORT", default_value_t = SortKey::Rate)]
    pub sort: SortKey,
    /// Show rates in bits per second (the `b` key toggles it).
    #[arg(long, env = "FLOWLENS_TOP_BITS")]
    pub bits: bool,
}

/// What the rows are sorted by, largest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Bytes per second, both directions.
    Rate,
    /// Packets per second, both directions.
    Packets,
    /// Total bytes since the flow began.
    Bytes,
    /// Server response time, else round trip.
    Latency,
    /// Time since the first packet.
    Age,
}

impl SortKey {
    const ORDER: [SortKey; 5] = [
        SortKey::Rate,
        SortKey::Packets,
        SortKey::Bytes,
        SortKey::Latency,
        SortKey::Age,
    ];

    fn label(self) -> &'static str {
        match self {
            SortKey::Rate => "rate",
            SortKey::Packets => "packets/s",
            SortKey::Bytes => "total bytes",
            SortKey::Latency => "latency",
            SortKey::Age => "age",
        }
    }

    fn step(self, by: isize) -> SortKey {
        let n = Self::ORDER.len() as isize;
        let i = Self::ORDER.iter().position(|&k| k == self).unwrap_or(0) as isize;
        Self::ORDER[(i + by).rem_euclid(n) as usize]
    }

    /// The column the sort reads, marked in the header.
    fn column(self) -> Col {
        match self {
            SortKey::Rate => Col::Rate,
            SortKey::Packets => Col::Pps,
            SortKey::Bytes => Col::Bytes,
            SortKey::Latency => Col::Srv,
            SortKey::Age => Col::Age,
        }
    }
}

// ---------------------------------------------------------------------------
// Rates from consecutive snapshots
// ---------------------------------------------------------------------------

/// What tells one flow from another across snapshots; `first_seen` tells a new flow on
/// the same five-tuple from the one before.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlowId {
    ifindex: u32,
    protocol: u8,
    client: (IpAddr, u16),
    server: (IpAddr, u16),
    echo_id: Option<u16>,
    first_seen: SystemTime,
}

impl FlowId {
    fn of(r: &FlowRecord) -> FlowId {
        FlowId {
            ifindex: r.ifindex,
            protocol: r.protocol,
            client: (r.client_addr, r.client_port),
            server: (r.server_addr, r.server_port),
            echo_id: r.icmp.as_ref().and_then(|i| i.echo_id),
            first_seen: r.first_seen,
        }
    }
}

/// One flow on screen.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowRow {
    pub rec: FlowRecord,
    /// Bytes/s each way (client>server, server>client) over the last snapshot interval;
    /// None until two snapshots have seen the flow's interval.
    pub rate: Option<[f64; 2]>,
    pub pps: Option<f64>,
    /// Time since the first packet, as of the snapshot.
    pub age: Duration,
}

impl FlowRow {
    pub fn bytes_per_sec(&self) -> Option<f64> {
        self.rate.map(|[c, s]| c + s)
    }

    /// The TCP handshake or ICMP echo round trip.
    fn rtt_ns(&self) -> Option<u64> {
        let tcp = self.rec.tcp.as_ref();
        tcp.and_then(handshake_rtt)
            .or_else(|| self.rec.icmp.and_then(|i| i.echo_rtt).map(|l| l.mean_ns()))
    }

    /// The server's mean response time.
    fn srv_ns(&self) -> Option<u64> {
        self.rec
            .tcp
            .and_then(|t| t.server_latency)
            .map(|l| l.mean_ns())
    }
}

/// Turns snapshots into rows with rates. A snapshot counts each flow since its window
/// start (its last record, or its first packet): between two snapshots of the same window
/// the rate is the difference over the time between them; when a record started a new
/// window in between, it is what the new window counts over the time since it started.
#[derive(Debug, Default)]
pub struct Rates {
    prev: HashMap<FlowId, ([u64; 3], SystemTime)>,
    prev_taken: Option<SystemTime>,
}

impl Rates {
    /// The rows of a snapshot taken at `taken`. A flow new since the previous snapshot
    /// counts from zero; the first snapshot has no rates.
    pub fn update(&mut self, taken: SystemTime, flows: Vec<FlowRecord>) -> Vec<FlowRow> {
        let since = |t: SystemTime| {
            taken
                .duration_since(t)
                .ok()
                .filter(|d| !d.is_zero())
                .map(|d| d.as_secs_f64())
        };
        let dt = self.prev_taken.and_then(since);
        let mut next = HashMap::with_capacity(flows.len());
        let rows = flows
            .into_iter()
            .map(|rec| {
                let id = FlowId::of(&rec);
                let now = [rec.client.bytes, rec.server.bytes, rec.total_packets()];
                let (before, dt) = match self.prev.get(&id) {
                    Some((before, window)) if *window == rec.window_start => (*before, dt),
                    Some(_) => ([0; 3], since(rec.window_start)),
                    None => ([0; 3], dt),
                };
                let per_s = |i: usize| dt.map(|dt| now[i].saturating_sub(before[i]) as f64 / dt);
                next.insert(id, (now, rec.window_start));
                FlowRow {
                    rate: per_s(0).zip(per_s(1)).map(|(c, s)| [c, s]),
                    pps: per_s(2),
                    age: taken.duration_since(rec.first_seen).unwrap_or_default(),
                    rec,
                }
            })
            .collect();
        self.prev = next;
        self.prev_taken = Some(taken);
        rows
    }
}

/// Per-interface totals for the header.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IfaceTotals {
    pub name: String,
    pub flows: usize,
    pub bytes_per_sec: f64,
    pub packets_per_sec: f64,
}

fn iface_name(r: &FlowRecord) -> String {
    if r.interface.is_empty() {
        format!("if{}", r.ifindex)
    } else {
        r.interface.clone()
    }
}

pub fn totals(rows: &[FlowRow]) -> Vec<IfaceTotals> {
    let mut by: Vec<IfaceTotals> = Vec::new();
    for r in rows {
        let name = iface_name(&r.rec);
        let i = match by.iter().position(|t| t.name == name) {
            Some(i) => i,
            None => {
                by.push(IfaceTotals {
                    name,
                    ..Default::default()
                });
                by.len() - 1
            }
        };
        by[i].flows += 1;
        by[i].bytes_per_sec += r.bytes_per_sec().unwrap_or(0.0);
        by[i].packets_per_sec += r.pps.unwrap_or(0.0);
    }
    by.sort_by(|a, b| b.bytes_per_sec.total_cmp(&a.bytes_per_sec));
    by
}

// ---------------------------------------------------------------------------
// Lines: a flow, or the flows of a host pair
// ---------------------------------------------------------------------------

/// What a local socket's owner is called in one word: its unit, else its cgroup, else
/// its command, else its pid.
fn owner_name(p: &LocalProcess) -> String {
    p.unit
        .as_deref()
        .or(p.cgroup.as_deref())
        .map(str::to_owned)
        .or_else(|| p.comm.clone())
        .or_else(|| p.pid.map(|p| format!("[{p}]")))
        .unwrap_or_else(|| "?".into())
}

/// Who owns a flow's local socket(s): `client>server` when both ends are local sockets
/// of different owners, `-` when neither is (a remote peer, forwarded traffic).
pub fn owner_label(r: &FlowRecord) -> String {
    match (r.client_process.as_deref(), r.server_process.as_deref()) {
        (None, None) => "-".into(),
        (Some(p), None) | (None, Some(p)) => owner_name(p),
        (Some(c), Some(s)) => {
            let (c, s) = (owner_name(c), owner_name(s));
            if c == s {
                c
            } else {
                format!("{c}>{s}")
            }
        }
    }
}

/// How lines gather flows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Grouping {
    /// A line per flow.
    #[default]
    Flows,
    /// Per client address > server address.
    Hosts,
    /// Per owner of the local socket(s) (`owner_label`).
    Unit,
}

/// One line of the table: a flow, or (grouped) every flow between two hosts or of one
/// unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub proto: String,
    pub client: String,
    pub server: String,
    pub iface: String,
    /// Who owns the local socket(s): `owner_label`.
    pub unit: String,
    pub state: String,
    pub flows: usize,
    /// Bytes/s each way; None before the second snapshot.
    pub rate: Option<[f64; 2]>,
    pub pps: Option<f64>,
    pub bytes: u64,
    pub age: Duration,
    pub rtt: Option<u64>,
    pub srv: Option<u64>,
}

impl Entry {
    fn of(r: &FlowRow) -> Entry {
        Entry {
            proto: render::proto_label(r.rec.protocol),
            client: client_endpoint(&r.rec),
            server: server_endpoint(&r.rec),
            iface: iface_name(&r.rec),
            unit: owner_label(&r.rec),
            state: r
                .rec
                .tcp
                .map_or("-", |t| render::state_short(t.state))
                .to_owned(),
            flows: 1,
            rate: r.rate,
            pps: r.pps,
            bytes: r.rec.total_bytes(),
            age: r.age,
            rtt: r.rtt_ns(),
            srv: r.srv_ns(),
        }
    }

    fn bytes_per_sec(&self) -> Option<f64> {
        self.rate.map(|[c, s]| c + s)
    }

    /// What `/` searches.
    fn text(&self) -> String {
        format!(
            "{} {} {} {} {} {}",
            self.proto, self.client, self.server, self.iface, self.unit, self.state
        )
        .to_lowercase()
    }
}

/// The flows of each client address > server address pair, summed; a column whose flows
/// differ says `*`.
pub fn group_by_hosts(rows: &[FlowRow]) -> Vec<Entry> {
    group_by(rows, |r| (r.rec.client_addr, r.rec.server_addr))
}

/// The flows of each owner of their local sockets (`owner_label`: a unit, `a>b` between
/// two local ones, `-` for flows with none), summed as `group_by_hosts` does.
pub fn group_by_unit(rows: &[FlowRow]) -> Vec<Entry> {
    group_by(rows, |r| owner_label(&r.rec))
}

/// The flows of each `key`, summed, addresses without ports; a column whose flows differ
/// says `*`.
fn group_by<K: std::hash::Hash + Eq>(rows: &[FlowRow], key: impl Fn(&FlowRow) -> K) -> Vec<Entry> {
    let mut at: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<Entry> = Vec::new();
    let mix = |a: &mut String, b: &str| {
        if a != b {
            *a = "*".into();
        }
    };
    for r in rows {
        let key = key(r);
        let one = Entry {
            client: r.rec.client_addr.to_string(),
            server: r.rec.server_addr.to_string(),
            state: "1".into(),
            ..Entry::of(r)
        };
        match at.get(&key) {
            None => {
                at.insert(key, out.len());
                out.push(one);
            }
            Some(&i) => {
                let g = &mut out[i];
                mix(&mut g.proto, &one.proto);
                mix(&mut g.iface, &one.iface);
                mix(&mut g.client, &one.client);
                mix(&mut g.server, &one.server);
                mix(&mut g.unit, &one.unit);
                g.flows += 1;
                g.state = g.flows.to_string();
                g.rate = match (g.rate, one.rate) {
                    (Some([a, b]), Some([c, d])) => Some([a + c, b + d]),
                    (x, y) => x.or(y),
                };
                g.pps = match (g.pps, one.pps) {
                    (Some(a), Some(b)) => Some(a + b),
                    (x, y) => x.or(y),
                };
                g.bytes += one.bytes;
                g.age = g.age.max(one.age);
                g.rtt = g.rtt.min(one.rtt).or(g.rtt.or(one.rtt));
                g.srv = g.srv.max(one.srv);
            }
        }
    }
    out
}

/// Sorts largest first (oldest first for age); unknown values go last.
pub fn sort_lines(lines: &mut [Entry], key: SortKey, reverse: bool) {
    let value = |l: &Entry| -> f64 {
        match key {
            SortKey::Rate => l.bytes_per_sec().unwrap_or(-1.0),
            SortKey::Packets => l.pps.unwrap_or(-1.0),
            SortKey::Bytes => l.bytes as f64,
            SortKey::Latency => l.srv.or(l.rtt).map_or(-1.0, |v| v as f64),
            SortKey::Age => l.age.as_secs_f64(),
        }
    };
    lines.sort_by(|a, b| {
        let o = value(b).total_cmp(&value(a));
        if reverse {
            o.reverse()
        } else {
            o
        }
    });
}

// ---------------------------------------------------------------------------
// Units: every number says what it is
// ---------------------------------------------------------------------------

/// A byte count with its unit: "840B", "1.4KB", "590KB", "1.0MB" (K = 1024).
pub fn bytes_unit(v: u64) -> String {
    let s = size(v);
    if s.ends_with('B') {
        s
    } else {
        s + "B"
    }
}

/// A rate in bytes/s ("590KB/s") or bits/s ("4.8Mb/s", k = 1000).
pub fn rate_unit(v: Option<f64>, bits: bool) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    if bits {
        let b = (v * 8.0).round() as u64;
        let s = count(b);
        // `count` is exact below 10000: scale those too, so the unit is always there.
        let s = if b >= 1000 && !s.ends_with(['k', 'M', 'G', 'T', 'P', 'E']) {
            format!("{:.1}k", b as f64 / 1000.0)
        } else {
            s
        };
        format!("{s}b/s")
    } else {
        format!("{}/s", bytes_unit(v.round() as u64))
    }
}

/// Packets per second: "120/s", "12k/s".
fn pps_unit(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |p| format!("{}/s", count(p.round() as u64)))
}

fn latency_unit(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), render::latency)
}

/// `s` cut to `width` characters in the middle, with "…" where the middle was: both ends
/// of an address (its network, its host and port) stay readable.
pub fn shorten_middle(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        return s.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let keep = width - 1;
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let chars: Vec<char> = s.chars().collect();
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[n - tail..]);
    out
}

// ---------------------------------------------------------------------------
// Columns laid out for the width
// ---------------------------------------------------------------------------

/// A table column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Proto,
    Client,
    Server,
    Iface,
    Unit,
    State,
    Rate,
    CtoS,
    StoC,
    Pps,
    Bytes,
    Age,
    Rtt,
    Srv,
}

/// Screen order.
const COLUMNS: [Col; 14] = [
    Col::Proto,
    Col::Client,
    Col::Server,
    Col::Iface,
    Col::Unit,
    Col::State,
    Col::Rate,
    Col::CtoS,
    Col::StoC,
    Col::Pps,
    Col::Bytes,
    Col::Age,
    Col::Rtt,
    Col::Srv,
];

/// The order columns give way in when the terminal is narrow: last goes first.
const PRIORITY: [Col; 14] = [
    Col::Client,
    Col::Server,
    Col::Rate,
    Col::Proto,
    Col::State,
    Col::Bytes,
    Col::Age,
    Col::CtoS,
    Col::StoC,
    Col::Unit,
    Col::Rtt,
    Col::Pps,
    Col::Srv,
    Col::Iface,
];

/// Address columns are not shortened below this (a whole IPv4 address and port) while
/// other columns can give way.
const ADDR_MIN: usize = 21;
/// Nor below this at all.
const ADDR_FLOOR: usize = 9;
/// A longer unit (a container's scope) is shortened in the middle.
const UNIT_MAX: usize = 28;

impl Col {
    fn title(self, grouped: bool) -> &'static str {
        match self {
            Col::Proto => "PROTO",
            Col::Client => "CLIENT",
            Col::Server => "SERVER",
            Col::Iface => "IFACE",
            Col::Unit => "UNIT",
            Col::State if grouped => "FLOWS",
            Col::State => "STATE",
            Col::Rate => "RATE",
            Col::CtoS => "C>S",
            Col::StoC => "S>C",
            Col::Pps => "PKT/s",
            Col::Bytes => "BYTES",
            Col::Age => "AGE",
            Col::Rtt => "RTT",
            Col::Srv => "SRV",
        }
    }

    /// The width values usually take, so columns do not jump as values change.
    fn usual(self) -> usize {
        match self {
            Col::Proto => 5,
            Col::State => 7,
            Col::Rate | Col::CtoS | Col::StoC => 7,
            Col::Pps => 6,
            Col::Bytes | Col::Age | Col::Rtt | Col::Srv => 5,
            Col::Iface => 6,
            Col::Unit => 4,
            Col::Client | Col::Server => 0,
        }
    }

    fn cell(self, l: &Entry, bits: bool) -> String {
        match self {
            Col::Proto => l.proto.clone(),
            Col::Client => l.client.clone(),
            Col::Server => l.server.clone(),
            Col::Iface => l.iface.clone(),
            Col::Unit => l.unit.clone(),
            Col::State => l.state.clone(),
            Col::Rate => rate_unit(l.bytes_per_sec(), bits),
            Col::CtoS => rate_unit(l.rate.map(|[c, _]| c), bits),
            Col::StoC => rate_unit(l.rate.map(|[_, s]| s), bits),
            Col::Pps => pps_unit(l.pps),
            Col::Bytes => bytes_unit(l.bytes),
            Col::Age => render::duration(l.age),
            Col::Rtt => latency_unit(l.rtt),
            Col::Srv => latency_unit(l.srv),
        }
    }

    fn right_aligned(self) -> bool {
        !matches!(
            self,
            Col::Proto | Col::Client | Col::Server | Col::Iface | Col::Unit | Col::State
        )
    }
}

/// The columns that fit `width` and their widths: every number whole, the addresses
/// given what is left (at most what their longest value needs).
fn fit_columns(width: usize, lines: &[Entry], bits: bool, grouped: bool) -> Vec<(Col, usize)> {
    let natural = |c: Col| {
        lines
            .iter()
            .map(|l| c.cell(l, bits).chars().count())
            .max()
            .unwrap_or(0)
            .max(c.title(grouped).len())
            .max(c.usual())
            .min(if c == Col::Unit { UNIT_MAX } else { usize::MAX })
    };
    let addr = [natural(Col::Client), natural(Col::Server)];
    // A host whose flows have no local socket (a router) needs no UNIT column.
    let no_unit = lines.iter().all(|l| l.unit == "-");
    let mut kept: Vec<(Col, usize)> = COLUMNS
        .iter()
        .filter(|c| !matches!(c, Col::Client | Col::Server))
        .filter(|c| !(no_unit && **c == Col::Unit))
        .map(|&c| (c, natural(c)))
        .collect();
    let need = |kept: &[(Col, usize)], a: usize| -> usize {
        // Every column plus one space between each.
        kept.iter().map(|(_, w)| w + 1).sum::<usize>() + a + 1
    };
    let addr_min = addr[0].min(ADDR_MIN) + addr[1].min(ADDR_MIN);
    for drop in PRIORITY.iter().rev() {
        if need(&kept, addr_min) <= width {
            break;
        }
        if !matches!(drop, Col::Client | Col::Server | Col::Rate) {
            kept.retain(|(c, _)| c != drop);
        }
    }
    let room = width.saturating_sub(need(&kept, 0));
    // Each address column gets its natural width when both fit, else half the room (an
    // address shorter than its half gives the rest to the other).
    let (c, s) = if addr[0] + addr[1] <= room {
        (addr[0], addr[1])
    } else {
        let half = room / 2;
        let c = addr[0].min(half.max(room.saturating_sub(addr[1])));
        (c.max(ADDR_FLOOR), room.saturating_sub(c).max(ADDR_FLOOR))
    };
    COLUMNS
        .iter()
        .filter_map(|&col| match col {
            Col::Client => Some((col, c)),
            Col::Server => Some((col, s)),
            _ => kept.iter().find(|(k, _)| *k == col).copied(),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------

/// One listing, connecting first when there is no connection.
async fn fetch(
    q: &FlowQuery,
    client: &mut Option<FlowLensClient<Channel>>,
    req: &proto::ListFlowsRequest,
) -> anyhow::Result<(SystemTime, Vec<FlowRecord>)> {
    let c = match client {
        Some(c) => c,
        None => client.insert(q.agent.connect().await?),
    };
    list_flows(c, req)
        .await
        .map_err(|s| anyhow::anyhow!("listing flows at {}: {}", q.agent.server, describe(&s)))
}

// ---------------------------------------------------------------------------
// Screen
// ---------------------------------------------------------------------------

/// What `/` is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Typing {
    #[default]
    No,
    /// Editing a filter: the text so far.
    Filter(String),
}

/// Everything the screen shows.
#[derive(Debug, Default)]
pub struct View {
    server: String,
    rows: Vec<FlowRow>,
    taken: Option<SystemTime>,
    sort: Option<SortKey>,
    reverse: bool,
    paused: bool,
    /// The last fetch's failure, shown in full until one succeeds.
    error: Option<String>,
    /// First line shown.
    scroll: usize,
    /// Lines the table showed last time it was drawn (for paging).
    page: usize,
    filter: String,
    typing: Typing,
    help: bool,
    group: Grouping,
    bits: bool,
}

/// What a key asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Redraw,
    Quit,
}

impl View {
    fn new(server: &str, sort: SortKey, bits: bool) -> View {
        View {
            server: server.to_owned(),
            sort: Some(sort),
            bits,
            page: 10,
            ..View::default()
        }
    }

    fn sort(&self) -> SortKey {
        self.sort.unwrap_or(SortKey::Rate)
    }

    /// The lines on screen, before scrolling: filtered, grouped, sorted.
    fn lines(&self) -> Vec<Entry> {
        let mut lines = match self.group {
            Grouping::Hosts => group_by_hosts(&self.rows),
            Grouping::Unit => group_by_unit(&self.rows),
            Grouping::Flows => self.rows.iter().map(Entry::of).collect(),
        };
        let needle = self.filter.to_lowercase();
        if !needle.is_empty() {
            lines.retain(|l| l.text().contains(&needle));
        }
        sort_lines(&mut lines, self.sort(), self.reverse);
        lines
    }

    /// Handles one key press.
    pub fn key(&mut self, k: KeyEvent) -> Action {
        if k.kind != KeyEventKind::Press {
            return Action::Nothing;
        }
        if let Typing::Filter(text) = &mut self.typing {
            match k.code {
                KeyCode::Enter => {
                    self.filter = std::mem::take(text);
                    self.typing = Typing::No;
                }
                KeyCode::Esc => self.typing = Typing::No,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                    return Action::Quit
                }
                KeyCode::Char(c) => text.push(c),
                _ => return Action::Nothing,
            }
            self.scroll = 0;
            return Action::Redraw;
        }
        let lines = self.lines().len();
        let last = lines.saturating_sub(self.page.max(1));
        let sort = |v: &mut View, key| {
            v.sort = Some(key);
            v.scroll = 0;
        };
        match k.code {
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                return Action::Quit
            }
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Esc if self.help => self.help = false,
            KeyCode::Esc if !self.filter.is_empty() => self.filter.clear(),
            KeyCode::Esc => return Action::Quit,
            KeyCode::Char('?') | KeyCode::Char('h') => self.help = !self.help,
            KeyCode::Char(' ') | KeyCode::Char('p') => self.paused = !self.paused,
            KeyCode::Char('/') => self.typing = Typing::Filter(self.filter.clone()),
            KeyCode::Char('g') => self.toggle(Grouping::Hosts),
            KeyCode::Char('u') => self.toggle(Grouping::Unit),
            KeyCode::Char('b') => self.bits = !self.bits,
            KeyCode::Char('s') => {
                let next = self.sort().step(1);
                sort(self, next);
            }
            KeyCode::Char('S') => {
                let prev = self.sort().step(-1);
                sort(self, prev);
            }
            KeyCode::Char('r') => self.reverse = !self.reverse,
            KeyCode::Char('1') => sort(self, SortKey::Rate),
            KeyCode::Char('2') => sort(self, SortKey::Packets),
            KeyCode::Char('3') | KeyCode::Char('t') => sort(self, SortKey::Bytes),
            KeyCode::Char('4') | KeyCode::Char('l') => sort(self, SortKey::Latency),
            KeyCode::Char('5') | KeyCode::Char('a') => sort(self, SortKey::Age),
            KeyCode::Char('j') | KeyCode::Down => self.scroll = (self.scroll + 1).min(last),
            KeyCode::Char('k') | KeyCode::Up => self.scroll = self.scroll.saturating_sub(1),
            KeyCode::PageDown | KeyCode::Char('f') => {
                self.scroll = (self.scroll + self.page.max(1)).min(last)
            }
            KeyCode::PageUp => self.scroll = self.scroll.saturating_sub(self.page.max(1)),
            KeyCode::Home => self.scroll = 0,
            KeyCode::End | KeyCode::Char('G') => self.scroll = last,
            _ => return Action::Nothing,
        }
        Action::Redraw
    }

    /// Groups lines by `g`, or back to a line per flow when they are.
    fn toggle(&mut self, g: Grouping) {
        self.group = if self.group == g { Grouping::Flows } else { g };
        self.scroll = 0;
    }

    fn grouped(&self) -> bool {
        self.group != Grouping::Flows
    }

    /// A new snapshot's rows.
    fn show(&mut self, taken: SystemTime, rows: Vec<FlowRow>) {
        self.rows = rows;
        self.taken = Some(taken);
    }
}

/// Restores the terminal however `run` ends (ratatui's panic hook covers panics).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the live view until `q`, Ctrl-C or SIGTERM.
pub fn run(args: TopArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let req = proto::ListFlowsRequest {
        page_size: PAGE,
        ..crate::cli::flows::list_request(&args.query)?
    };
    if !std::io::stdout().is_terminal() {
        bail!(
            "flowlens top needs a terminal; on a pipe use `flowlens flows` (the flows in \
             progress, --json for scripts) or `flowlens watch --json` (flows as they end)"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the top runtime")?;
    let tty = Terminal::open().context("opening the terminal")?;
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let _restore = Restore;
    let mut view = View::new(&args.query.agent.server, args.sort, args.bits);
    let mut client = None;
    let mut rates = Rates::default();
    let mut next_fetch = Instant::now();
    // Drawn when something changed: a redraw of an unchanged screen is most of an idle
    // top's CPU.
    let mut dirty = true;
    let mut retry = args.interval.0;
    while !tty.stopped() {
        if !view.paused && Instant::now() >= next_fetch {
            next_fetch = Instant::now() + args.interval.0;
            match rt.block_on(fetch(&args.query, &mut client, &req)) {
                Ok((taken, flows)) => {
                    if view.taken != Some(taken) {
                        let rows = rates.update(taken, flows);
                        view.show(taken, rows);
                        dirty = true;
                    }
                    dirty |= view.error.take().is_some();
                    retry = args.interval.0;
                }
                Err(e) => {
                    client = None;
                    let error = Some(format!("{e:#}; retrying"));
                    dirty |= view.error != error;
                    view.error = error;
                    // An agent that is down is asked less and less often.
                    next_fetch = Instant::now() + retry;
                    retry = (retry * 2).min(RETRY_MAX.max(args.interval.0));
                }
            }
        }
        if std::mem::take(&mut dirty) {
            terminal
                .draw(|f| render_view(f, &mut view))
                .context("drawing the screen")?;
        }
        // A signal may be taken on another thread and not wake the wait: it is bounded.
        let wait = next_fetch
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(250));
        match tty.next(wait) {
            Input::Event(Event::Key(k)) => match view.key(k) {
                Action::Quit => break,
                Action::Redraw => dirty = true,
                Action::Nothing => {}
            },
            Input::Event(Event::Resize(..)) => dirty = true,
            Input::Event(_) | Input::Idle => {}
            // Nobody is left to see the screen or an error.
            Input::Gone(_) => break,
        }
    }
    Ok(())
}

/// `text` in lines of at most `width` characters, broken at spaces where it can be.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut out = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let mut word = word.to_owned();
        loop {
            let len = line.chars().count();
            let sep = usize::from(len > 0);
            if len + sep + word.chars().count() <= width {
                if sep == 1 {
                    line.push(' ');
                }
                line.push_str(&word);
                break;
            }
            if len > 0 {
                out.push(std::mem::take(&mut line));
                continue;
            }
            // A word longer than a line is cut where the line ends.
            let rest: String = word.chars().skip(width).collect();
            out.push(word.chars().take(width).collect());
            word = rest;
            if word.is_empty() {
                break;
            }
        }
    }
    if !line.is_empty() || out.is_empty() {
        out.push(line);
    }
    out
}

/// The header: what is shown and from where, per-interface totals, then the state of the
/// view (sort, pause, filter, grouping, position) and any error, in full.
fn header_lines(view: &View, shown: (usize, usize, usize), width: usize) -> Vec<Line<'static>> {
    let when = view.taken.map_or_else(
        || "waiting for the first snapshot".into(),
        |t| {
            let s = humantime::format_rfc3339_seconds(t).to_string();
            format!("{} UTC", &s[11..19])
        },
    );
    let flows = format!("{} flows", view.rows.len());
    let first = format!("flowlens top  {}  {when}  {flows}", view.server);
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut lines: Vec<Line> = wrap(&first, width)
        .into_iter()
        .map(|l| Line::styled(l, bold))
        .collect();
    let ifaces: Vec<String> = totals(&view.rows)
        .iter()
        .map(|t| {
            format!(
                "{}: {} flows {} {}",
                t.name,
                t.flows,
                rate_unit(Some(t.bytes_per_sec), view.bits),
                pps_unit(Some(t.packets_per_sec)).replace("/s", " pkt/s")
            )
        })
        .collect();
    let second = match (&view.error, view.taken) {
        (Some(_), _) => "not connected".to_owned(),
        (None, None) => String::new(),
        (None, Some(_)) if ifaces.is_empty() => "no flows in progress".to_owned(),
        (None, Some(_)) => ifaces.join("   "),
    };
    lines.extend(wrap(&second, width).into_iter().map(Line::raw));
    let (from, to, of) = shown;
    let mut state = vec![format!(
        "sort: {} {}",
        view.sort().label(),
        if view.reverse {
            "(reversed)"
        } else {
            "(largest first)"
        }
    )];
    if view.paused {
        state.push("PAUSED".into());
    }
    match view.group {
        Grouping::Hosts => state.push("grouped by host pair".into()),
        Grouping::Unit => state.push("grouped by unit".into()),
        Grouping::Flows => {}
    }
    if !view.filter.is_empty() {
        state.push(format!("filter: {}", view.filter));
    }
    if view.bits {
        state.push("bits/s".into());
    }
    if of > 0 {
        state.push(format!("rows {from}-{to} of {of}"));
    }
    let rev = Style::default().add_modifier(Modifier::REVERSED);
    for l in wrap(&state.join("  |  "), width) {
        let style = if view.paused { rev } else { Style::default() };
        lines.push(Line::styled(l, style));
    }
    if let Some(e) = &view.error {
        lines.extend(wrap(e, width).into_iter().map(|l| Line::styled(l, rev)));
    }
    lines
}

/// The key line: as many keys as fit, the filter being typed instead while typing.
fn footer(view: &View, width: usize) -> String {
    if let Typing::Filter(text) = &view.typing {
        return format!("filter: {text}_   (Enter keep, Esc cancel)");
    }
    let keys = [
        "? help",
        "q quit",
        "/ filter",
        "g group",
        "u by unit",
        "b bits",
        "s sort",
        "r reverse",
        "p pause",
        "j/k scroll",
        "1-5 sort by",
    ];
    let mut s = String::new();
    for k in keys {
        if s.chars().count() + 2 + k.len() > width {
            break;
        }
        if !s.is_empty() {
            s.push_str("  ");
        }
        s.push_str(k);
    }
    s
}

pub fn render_view(f: &mut Frame, view: &mut View) {
    let area = f.area();
    let width = usize::from(area.width);
    let lines = view.lines();
    // The table's height is what the header and footer leave: known once the header is.
    let guess = header_lines(view, (0, 0, 0), width).len() as u16;
    let body = area.height.saturating_sub(guess + 1).saturating_sub(1);
    view.page = usize::from(body).max(1);
    view.scroll = view.scroll.min(lines.len().saturating_sub(view.page));
    let to = (view.scroll + view.page).min(lines.len());
    let shown = (
        view.scroll + usize::from(!lines.is_empty()),
        to,
        lines.len(),
    );
    let head = header_lines(view, shown, width);
    let [top, table, foot] = Layout::vertical([
        Constraint::Length(head.len() as u16),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(area);
    f.render_widget(Paragraph::new(head), top);
    let visible = &lines[view.scroll.min(lines.len())..to];
    let cols = fit_columns(width, visible, view.bits, view.grouped());
    let sorted = view.sort().column();
    let header = Row::new(cols.iter().map(|&(c, w)| {
        let mut t = c.title(view.grouped()).to_owned();
        if c == sorted {
            t.push(if view.reverse { '▲' } else { '▼' });
        }
        align(&t, w, c.right_aligned())
    }))
    .style(Style::default().add_modifier(Modifier::REVERSED));
    let rows = visible.iter().map(|l| {
        Row::new(cols.iter().map(|&(c, w)| {
            let v = c.cell(l, view.bits);
            let v = match c {
                Col::Client | Col::Server | Col::Iface | Col::Proto | Col::Unit => {
                    shorten_middle(&v, w)
                }
                _ => v,
            };
            align(&v, w, c.right_aligned())
        }))
    });
    let widths: Vec<Constraint> = cols
        .iter()
        .map(|&(_, w)| Constraint::Length(w as u16))
        .collect();
    f.render_widget(
        Table::new(rows, widths).header(header).column_spacing(1),
        table,
    );
    f.render_widget(
        Paragraph::new(footer(view, width)).style(Style::default().add_modifier(Modifier::DIM)),
        foot,
    );
    if view.help {
        help_box(f, area);
    }
}

fn align(s: &str, w: usize, right: bool) -> String {
    if right {
        format!("{s:>w$}")
    } else {
        format!("{s:<w$}")
    }
}

/// The `?` screen, over the table.
fn help_box(f: &mut Frame, area: Rect) {
    let text: Vec<Line> = KEYS_HELP.lines().map(|l| Line::raw(l.to_owned())).collect();
    let w = area.width.min(104);
    let h = area.height.min(text.len() as u16 + 2);
    let r = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(text)
            .wrap(ratatui::widgets::Wrap { trim: false })
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(" flowlens top: keys (? or Esc closes) "),
            ),
        r,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::flow::{
        DirStats, EndReason, Hook, Latency, LocalProcess, TcpInfo, TcpState, IPPROTO_TCP,
        IPPROTO_UDP,
    };
    use ratatui::backend::TestBackend;
    use std::time::UNIX_EPOCH;

    fn rec(port: u16, proto: u8, bytes: u64, packets: u64) -> FlowRecord {
        FlowRecord {
            flow_id: u64::from(port),
            observer: "host1".into(),
            window_start: UNIX_EPOCH + Duration::from_secs(1000),
            emitted: UNIX_EPOCH + Duration::from_secs(1002),
            continuation: false,
            fragment: false,
            partial: false,
            ip_version: 4,
            protocol: proto,
            client_addr: "10.0.0.1".parse().unwrap(),
            client_port: port,
            server_addr: "10.0.0.2".parse().unwrap(),
            server_port: 80,
            ifindex: 2,
            interface: if port.is_multiple_of(2) {
                "eth0"
            } else {
                "eth1"
            }
            .into(),
            first_hook: Hook::Egress,
            first_seen: UNIX_EPOCH + Duration::from_secs(1000),
            last_seen: UNIX_EPOCH + Duration::from_secs(1001),
            client: DirStats {
                packets,
                bytes,
                ttl: 64,
            },
            server: DirStats::default(),
            end_reason: EndReason::InProgress,
            tcp: None,
            icmp: None,
            client_process: None,
            server_process: None,
        }
    }

    fn entries(rows: &[FlowRow]) -> Vec<Entry> {
        rows.iter().map(Entry::of).collect()
    }

    #[test]
    fn rates_come_from_consecutive_snapshots() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1002);
        let mut rates = Rates::default();
        let rows = rates.update(t0, vec![rec(1, IPPROTO_TCP, 1000, 10)]);
        assert_eq!(rows[0].rate, None, "one snapshot has no rate");
        let rows = rates.update(
            t0 + Duration::from_millis(500),
            vec![rec(1, IPPROTO_TCP, 6000, 20), rec(2, IPPROTO_UDP, 100, 1)],
        );
        assert_eq!(rows[0].rate, Some([10_000.0, 0.0]));
        assert_eq!(rows[0].pps, Some(20.0));
        assert_eq!(
            rows[1].rate,
            Some([200.0, 0.0]),
            "a new flow counts from zero"
        );
        assert_eq!(rows[0].age, Duration::from_millis(2500));
        // A new flow on the same five-tuple (later first_seen) is not the old one.
        let mut again = rec(1, IPPROTO_TCP, 500, 5);
        again.first_seen += Duration::from_secs(2);
        let rows = rates.update(t0 + Duration::from_secs(1), vec![again]);
        assert_eq!(rows[0].rate, Some([1000.0, 0.0]));

        let rows = rates.update(
            t0 + Duration::from_secs(2),
            vec![
                rec(2, IPPROTO_UDP, 1000, 1),
                rec(3, IPPROTO_TCP, 9000, 2),
                rec(4, IPPROTO_TCP, 5000, 90),
            ],
        );
        let mut lines = entries(&rows);
        let ports = |l: &[Entry]| -> Vec<String> { l.iter().map(|e| e.client.clone()).collect() };
        sort_lines(&mut lines, SortKey::Rate, false);
        assert_eq!(ports(&lines), ["10.0.0.1:3", "10.0.0.1:4", "10.0.0.1:2"]);
        sort_lines(&mut lines, SortKey::Packets, false);
        assert_eq!(lines[0].client, "10.0.0.1:4");
        sort_lines(&mut lines, SortKey::Rate, true);
        assert_eq!(lines[0].client, "10.0.0.1:2");
        let t = totals(&rows);
        assert_eq!((t[0].name.as_str(), t[0].flows), ("eth1", 1));
        assert_eq!((t[1].name.as_str(), t[1].flows), ("eth0", 2));
        assert_eq!(t[1].bytes_per_sec, 6000.0);
    }

    /// A snapshot counts a flow since its last record: when an active-timeout record
    /// started a new window between two snapshots, the rate is what the new window
    /// counts, over the time since it started.
    #[test]
    fn rates_stay_right_across_an_active_timeout_record() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1002);
        let mut rates = Rates::default();
        let mut r = rec(1, IPPROTO_TCP, 1000, 10);
        rates.update(t0, vec![r.clone()]);
        r.client.bytes = 3000;
        let rows = rates.update(t0 + Duration::from_secs(1), vec![r.clone()]);
        assert_eq!(rows[0].rate, Some([2000.0, 0.0]));
        r.window_start = t0 + Duration::from_millis(1750);
        r.client.bytes = 500;
        r.client.packets = 1;
        let rows = rates.update(t0 + Duration::from_secs(2), vec![r]);
        assert_eq!(rows[0].rate, Some([2000.0, 0.0]));
        assert_eq!(rows[0].pps, Some(4.0));
    }

    #[test]
    fn numbers_carry_their_units() {
        assert_eq!(rate_unit(Some(1_048_576.0), false), "1.0MB/s");
        assert_eq!(rate_unit(Some(840.0), false), "840B/s");
        assert_eq!(rate_unit(Some(1_000_000.0), true), "8.0Mb/s");
        assert_eq!(rate_unit(Some(500.0), true), "4.0kb/s");
        assert_eq!(rate_unit(Some(100.0), true), "800b/s");
        assert_eq!(rate_unit(None, true), "-");
        assert_eq!(bytes_unit(1_400), "1.4KB");
        assert_eq!(bytes_unit(12), "12B");
        assert_eq!(pps_unit(Some(12_345.0)), "12k/s");
        for v in [0.0, 999.0, 1023.0, 1e6, 1e9, 1e12, 5e15] {
            assert!(rate_unit(Some(v), false).chars().count() <= 8);
            assert!(rate_unit(Some(v), true).chars().count() <= 8);
        }
    }

    #[test]
    fn long_addresses_are_shortened_in_the_middle() {
        let a = "[fd00:a:abcd:ef01:2345:6789:abcd:ef01]:5201";
        let s = shorten_middle(a, 21);
        assert_eq!(s, "[fd00:a:ab…ef01]:5201");
        assert_eq!(s.chars().count(), 21);
        assert_eq!(shorten_middle("10.0.0.1:80", 21), "10.0.0.1:80");
    }

    #[test]
    fn host_pairs_sum_their_flows() {
        let mut rates = Rates::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(1002);
        rates.update(
            t0,
            vec![rec(1, IPPROTO_TCP, 0, 0), rec(3, IPPROTO_UDP, 0, 0)],
        );
        let rows = rates.update(
            t0 + Duration::from_secs(1),
            vec![rec(1, IPPROTO_TCP, 1000, 10), rec(3, IPPROTO_UDP, 500, 5)],
        );
        let g = group_by_hosts(&rows);
        assert_eq!(g.len(), 1);
        assert_eq!(
            (g[0].client.as_str(), g[0].server.as_str()),
            ("10.0.0.1", "10.0.0.2")
        );
        assert_eq!((g[0].flows, g[0].proto.as_str()), (2, "*"));
        assert_eq!(g[0].rate, Some([1500.0, 0.0]));
        assert_eq!(g[0].bytes, 1500);
    }

    fn owned(unit: Option<&str>, comm: &str, pid: u32) -> Option<Box<LocalProcess>> {
        Some(Box::new(LocalProcess {
            cgroup_id: Some(7),
            cgroup: unit.map(|u| format!("/system.slice/{u}").into()),
            unit: unit.map(Into::into),
            pid: Some(pid),
            comm: Some(comm.into()),
            uid: Some(0),
        }))
    }

    #[test]
    fn flows_are_labelled_and_grouped_by_the_unit_owning_their_local_sockets() {
        let mut a = rec(1, IPPROTO_TCP, 1000, 1);
        a.server_process = owned(Some("nginx.service"), "nginx", 80);
        let mut b = rec(2, IPPROTO_TCP, 500, 1);
        b.server_process = owned(Some("nginx.service"), "nginx", 81);
        b.client_addr = "10.0.0.3".parse().unwrap();
        let mut c = rec(3, IPPROTO_UDP, 10, 1);
        c.client_process = owned(None, "curl", 99);
        let mut d = rec(4, IPPROTO_TCP, 10, 1);
        d.client_process = owned(Some("app.service"), "app", 5);
        d.server_process = owned(Some("db.service"), "db", 6);
        let e = rec(5, IPPROTO_UDP, 10, 1);
        let labels: Vec<String> = [&a, &b, &c, &d, &e].map(owner_label).to_vec();
        assert_eq!(
            labels,
            [
                "nginx.service",
                "nginx.service",
                "curl",
                "app.service>db.service",
                "-"
            ]
        );
        let rows =
            Rates::default().update(UNIX_EPOCH + Duration::from_secs(1002), vec![a, b, c, d, e]);
        let g = group_by_unit(&rows);
        assert_eq!(g.len(), 4, "{g:#?}");
        let nginx = g.iter().find(|l| l.unit == "nginx.service").unwrap();
        assert_eq!((nginx.flows, nginx.bytes), (2, 1500));
        assert_eq!(
            (nginx.client.as_str(), nginx.server.as_str()),
            ("*", "10.0.0.2")
        );

        // On screen: a UNIT column, and `u` groups by it (and back).
        let mut view = View::new("unix:/x", SortKey::Bytes, false);
        view.show(UNIX_EPOCH + Duration::from_secs(1002), rows);
        let (header, lines) = table(&screen(&mut view, 120, 20));
        assert!(header.contains("UNIT"), "{header}");
        assert!(lines[0].contains("nginx.service"), "{lines:#?}");
        press(&mut view, KeyCode::Char('u'));
        let s = screen(&mut view, 120, 20);
        assert!(s.iter().any(|l| l.contains("grouped by unit")), "{s:#?}");
        let (header, lines) = table(&s);
        assert!(header.contains("FLOWS"), "{header}");
        assert_eq!(lines.len(), 4, "{s:#?}");
        assert!(
            lines[0].contains("nginx.service") && lines[0].contains(" 2 "),
            "{s:#?}"
        );
        press(&mut view, KeyCode::Char('u'));
        assert_eq!(table(&screen(&mut view, 120, 20)).1.len(), 5);
        // A host whose flows end at no local socket shows no UNIT column.
        let mut view = View::new("unix:/x", SortKey::Bytes, false);
        let rows = Rates::default().update(
            UNIX_EPOCH + Duration::from_secs(1002),
            vec![rec(9, IPPROTO_UDP, 1, 1)],
        );
        view.show(UNIX_EPOCH + Duration::from_secs(1002), rows);
        assert!(!table(&screen(&mut view, 120, 20)).0.contains("UNIT"));
    }

    /// A view of `n` flows, IPv4 and IPv6 (long addresses), after two snapshots.
    fn busy_view(n: u16) -> View {
        let mut flows = Vec::new();
        for i in 0..n {
            let mut r = rec(40000 + i, IPPROTO_TCP, 0, 0);
            if i % 2 == 1 {
                r.ip_version = 6;
                r.client_addr = "fd00:a:abcd:ef01:2345:6789:abcd:1".parse().unwrap();
                r.server_addr = "fd00:a:abcd:ef01:2345:6789:abcd:2".parse().unwrap();
            }
            r.tcp = Some(TcpInfo {
                client_flags: 0x12,
                server_flags: 0x12,
                state: TcpState::Established,
                handshake_client_ns: Some(120_000),
                handshake_server_ns: Some(30_000),
                syn_retransmits: 0,
                late_start: false,
                client_latency: None,
                server_latency: Some(Latency {
                    count: 4,
                    sum_ns: 4_000_000,
                    min_ns: 900_000,
                    max_ns: 1_100_000,
                    jitter_ns: None,
                }),
            });
            flows.push(r);
        }
        let mut rates = Rates::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_795_637_000);
        rates.update(t0, flows.clone());
        for (i, f) in flows.iter_mut().enumerate() {
            f.client.bytes = 1_000_000 * (i as u64 + 1);
            f.server.bytes = 20_000;
            f.client.packets = 900;
        }
        let mut view = View::new("unix:/run/flowlens/flowlens.sock", SortKey::Rate, false);
        let rows = rates.update(t0 + Duration::from_secs(1), flows);
        view.show(t0 + Duration::from_secs(1), rows);
        view
    }

    fn screen(view: &mut View, w: u16, h: u16) -> Vec<String> {
        let mut t = ratatui::Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| render_view(f, view)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_owned())
                    .collect::<String>()
                    .trim_end()
                    .to_owned()
            })
            .collect()
    }

    /// The table's rows: the lines after the column header, up to the footer.
    fn table(lines: &[String]) -> (String, Vec<String>) {
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with("PROTO"))
            .expect("a column header");
        let rows = lines[at + 1..lines.len() - 1]
            .iter()
            .filter(|l| !l.is_empty())
            .cloned()
            .collect();
        (lines[at].clone(), rows)
    }

    /// Every cell of every row is whole: addresses whole or shortened around "…", numbers
    /// with their units.
    fn assert_readable(lines: &[String], w: usize) {
        let (header, rows) = table(lines);
        let v6 = [
            "[fd00:a:abcd:ef01:2345:6789:abcd:1]",
            "[fd00:a:abcd:ef01:2345:6789:abcd:2]",
        ];
        assert!(!rows.is_empty());
        for row in &rows {
            assert!(row.chars().count() <= w, "{row}");
            let cells: Vec<&str> = row.split_whitespace().collect();
            for (i, c) in cells.iter().enumerate() {
                let endpoint = i == 1 || i == 2;
                if endpoint {
                    let whole = c.starts_with("10.0.0.") || v6.iter().any(|a| c.starts_with(a));
                    let short =
                        c.contains('…') && (c.starts_with("[fd00:") || c.starts_with("10."));
                    assert!(whole || short, "address cut: {c:?} in {row}");
                    assert!(
                        c.ends_with(|ch: char| ch.is_ascii_digit()),
                        "port cut: {row}"
                    );
                } else if i > 2 && *c != "-" && *c != "estab" && !c.starts_with("eth") {
                    let unit = ["B/s", "b/s", "/s", "B", "s", "m", "h", "d"]
                        .iter()
                        .any(|u| c.ends_with(u));
                    assert!(unit, "{c:?} has no unit in {row}\n{header}");
                }
            }
        }
    }

    #[test]
    fn the_table_reads_at_80_100_and_200_columns() {
        for (w, cols) in [
            (
                80u16,
                &[
                    "PROTO", "CLIENT", "SERVER", "STATE", "RATE▼", "BYTES", "AGE",
                ][..],
            ),
            (100, &["C>S", "S>C", "RTT"][..]),
            (200, &["IFACE", "PKT/s", "SRV"][..]),
        ] {
            let mut view = busy_view(6);
            let lines = screen(&mut view, w, 24);
            eprintln!("{w} columns:\n{}", lines.join("\n"));
            let (header, _) = table(&lines);
            for c in cols {
                assert!(header.contains(c), "{w} columns: no {c} in {header}");
            }
            assert_readable(&lines, usize::from(w));
            let text = lines.join("\n");
            if w == 200 {
                assert!(
                    text.contains("[fd00:a:abcd:ef01:2345:6789:abcd:1]:40001"),
                    "{text}"
                );
                assert!(!text.contains('…'), "{text}");
            }
            if w == 80 {
                assert!(text.contains('…'), "{text}");
                assert!(text.contains("10.0.0.1:40000"), "{text}");
            }
        }
    }

    fn press(view: &mut View, c: KeyCode) -> Action {
        view.key(KeyEvent::new(c, KeyModifiers::NONE))
    }

    #[test]
    fn keys_scroll_filter_group_toggle_bits_and_help() {
        let mut view = busy_view(40);
        let lines = screen(&mut view, 100, 20);
        let (_, rows) = table(&lines);
        let first = rows[0].clone();
        assert!(lines.iter().any(|l| l.contains("rows 1-")), "{lines:#?}");
        press(&mut view, KeyCode::Char('j'));
        let (_, rows) = table(&screen(&mut view, 100, 20));
        assert_eq!(rows[0], table(&lines).1[1], "j scrolls one line");
        press(&mut view, KeyCode::PageDown);
        let s = screen(&mut view, 100, 20);
        assert!(!table(&s).1.contains(&first));
        press(&mut view, KeyCode::End);
        let s = screen(&mut view, 100, 20);
        assert!(s.iter().any(|l| l.contains("of 40")), "{s:#?}");
        assert!(table(&s).1.last().unwrap().contains(":40000"), "{s:#?}");
        press(&mut view, KeyCode::Home);

        // b: bits per second.
        press(&mut view, KeyCode::Char('b'));
        let s = screen(&mut view, 100, 20);
        assert!(table(&s).1[0].contains("Mb/s"), "{s:#?}");
        press(&mut view, KeyCode::Char('b'));

        // /: only the rows whose text holds the filter.
        press(&mut view, KeyCode::Char('/'));
        for c in ":40003".chars() {
            press(&mut view, KeyCode::Char(c));
        }
        assert!(screen(&mut view, 100, 20)
            .last()
            .unwrap()
            .contains("filter: :40003_"));
        press(&mut view, KeyCode::Enter);
        let s = screen(&mut view, 100, 20);
        let (_, rows) = table(&s);
        assert_eq!(rows.len(), 1, "{s:#?}");
        assert!(s.iter().any(|l| l.contains("filter: :40003")));
        assert_eq!(
            press(&mut view, KeyCode::Esc),
            Action::Redraw,
            "Esc clears the filter"
        );
        assert_eq!(table(&screen(&mut view, 100, 20)).1.len(), 15);

        // g: one line per host pair (IPv4 and IPv6 here), with its number of flows.
        press(&mut view, KeyCode::Char('g'));
        let s = screen(&mut view, 100, 20);
        let (header, rows) = table(&s);
        assert!(header.contains("FLOWS"), "{header}");
        assert_eq!(rows.len(), 2, "{s:#?}");
        assert!(rows.iter().all(|r| r.contains(" 20 ")), "{s:#?}");

        // ?: the keys, over the table; Esc closes it.
        press(&mut view, KeyCode::Char('?'));
        let s = screen(&mut view, 100, 30).join("\n");
        assert!(
            s.contains("group by host pair") && s.contains("PageDown"),
            "{s}"
        );
        press(&mut view, KeyCode::Esc);
        assert!(!screen(&mut view, 100, 30).join("\n").contains("PageDown"));
        assert_eq!(press(&mut view, KeyCode::Char('q')), Action::Quit);
    }

    #[test]
    fn an_error_is_shown_whole_and_not_as_an_empty_listing() {
        let mut view = View::new("unix:/run/flowlens/flowlens.sock", SortKey::Rate, false);
        view.paused = true;
        view.error = Some(
            "no flowlens agent at unix:/run/flowlens/flowlens.sock (connection refused): start \
             it (`flowlens run`, or `systemctl start flowlens`), or pass --server where it \
             listens; retrying"
                .into(),
        );
        let s = screen(&mut view, 80, 24).join("\n");
        assert!(s.contains("not connected"), "{s}");
        assert!(!s.contains("no flows in progress"), "{s}");
        assert!(s.contains("PAUSED"), "{s}");
        let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains("where it listens; retrying"), "{s}");
    }

    #[test]
    fn top_takes_the_filters_of_watch_but_no_end_reason() {
        let q = FlowQuery {
            proto: vec!["udp".into()],
            port: vec!["53".into(), "5353".into()],
            ..Default::default()
        };
        let req = crate::cli::flows::list_request(&q).unwrap();
        assert_eq!(req.include.len(), 2);
        assert!(req.include.iter().all(|f| f.protocol == Some(17)));
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            top: TopArgs,
        }
        let help = Cli::command().render_long_help().to_string();
        assert!(!help.contains("--end-reason"), "{help}");
    }
}
