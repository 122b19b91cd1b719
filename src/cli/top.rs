//! `flowlens top`: a live full-screen view of an agent's flows in progress, with per-flow rates from consecutive `ListFlows` snapshots.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use ratatui::crossterm::event::{Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Row, Table};
use ratatui::{DefaultTerminal, Frame};
use tonic::transport::Channel;

use crate::cli::client::{describe, FlowQuery};
use crate::cli::terminal::{Input, Terminal};
use crate::config::HumanDuration;
use crate::record::api::proto;
use crate::record::api::proto::flow_lens_client::FlowLensClient;
use crate::record::flow::FlowRecord;
use crate::record::render::{self, client_endpoint, count, handshake_rtt, server_endpoint, size};

/// The keys, for `--help` and the screen's last line.
pub const KEYS_HELP: &str = "Keys: q (or Esc, Ctrl-C) quit; space (or p) pause/resume; s next sort; \
b sort by bytes/s, k by packets/s, t by total bytes, l by latency, a by age; r reverse the order.\n\
Columns: RATE = bytes/s both ways, C>S/S>C = bytes/s each way, PKT/s = packets/s both ways, \
BYTES = total both ways, AGE = since the first packet, RTT = TCP handshake or ICMP echo round trip, \
SRV = server response time (mean). Sizes: K, M, G = 1024^1..3 bytes.";

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
            SortKey::Rate => "bytes/s",
            SortKey::Packets => "packets/s",
            SortKey::Bytes => "total bytes",
            SortKey::Latency => "latency",
            SortKey::Age => "age",
        }
    }

    fn next(self) -> SortKey {
        let i = Self::ORDER.iter().position(|&k| k == self).unwrap_or(0);
        Self::ORDER[(i + 1) % Self::ORDER.len()]
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

    /// Server response time, else the handshake or echo round trip.
    pub fn latency_ns(&self) -> Option<u64> {
        let tcp = self.rec.tcp.as_ref();
        tcp.and_then(|t| t.server_latency.map(|l| l.mean_ns()))
            .or_else(|| tcp.and_then(handshake_rtt))
            .or_else(|| self.rec.icmp.and_then(|i| i.echo_rtt).map(|l| l.mean_ns()))
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

/// Sorts largest first (oldest first for age); unknown values go last.
pub fn sort_rows(rows: &mut [FlowRow], key: SortKey, reverse: bool) {
    let value = |r: &FlowRow| -> f64 {
        match key {
            SortKey::Rate => r.bytes_per_sec().unwrap_or(-1.0),
            SortKey::Packets => r.pps.unwrap_or(-1.0),
            SortKey::Bytes => r.rec.total_bytes() as f64,
            SortKey::Latency => r.latency_ns().map_or(-1.0, |v| v as f64),
            SortKey::Age => r.age.as_secs_f64(),
        }
    };
    rows.sort_by(|a, b| {
        let o = value(b).total_cmp(&value(a));
        if reverse {
            o.reverse()
        } else {
            o
        }
    });
}

/// Per-interface totals for the header.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IfaceTotals {
    pub name: String,
    pub flows: usize,
    pub bytes_per_sec: f64,
    pub packets_per_sec: f64,
}

pub fn totals(rows: &[FlowRow]) -> Vec<IfaceTotals> {
    let mut by: Vec<IfaceTotals> = Vec::new();
    for r in rows {
        let name = if r.rec.interface.is_empty() {
            format!("if{}", r.rec.ifindex)
        } else {
            r.rec.interface.clone()
        };
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
// Fetching
// ---------------------------------------------------------------------------

/// Every page of one listing; a snapshot that expires between pages starts it again.
async fn list_all(
    client: &mut FlowLensClient<Channel>,
    base: &proto::ListFlowsRequest,
) -> Result<(SystemTime, Vec<FlowRecord>), tonic::Status> {
    'listing: for _ in 0..3 {
        let mut req = base.clone();
        let mut flows = Vec::new();
        loop {
            let resp = match client.list_flows(req.clone()).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::Aborted => continue 'listing,
                Err(s) => return Err(s),
            };
            flows.extend(
                resp.flows
                    .iter()
                    .filter_map(|p| FlowRecord::try_from(p).ok()),
            );
            if resp.next_page_token.is_empty() {
                let taken = resp
                    .snapshot_time
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .unwrap_or_else(SystemTime::now);
                return Ok((taken, flows));
            }
            req.page_token = resp.next_page_token;
        }
    }
    Err(tonic::Status::aborted(
        "the agent's snapshots kept expiring while paging",
    ))
}

/// The ListFlows request the flags describe.
pub fn list_request(q: &FlowQuery) -> anyhow::Result<proto::ListFlowsRequest> {
    if q.end_reason.is_some() {
        bail!("--end-reason: top shows flows in progress, which have not ended; use `flowlens watch --end-reason`");
    }
    let (include, exclude) = q.filters()?;
    Ok(proto::ListFlowsRequest {
        include,
        exclude,
        page_size: PAGE,
        page_token: String::new(),
    })
}

// ---------------------------------------------------------------------------
// Screen
// ---------------------------------------------------------------------------

/// Everything the screen shows.
struct View {
    server: String,
    rows: Vec<FlowRow>,
    taken: Option<SystemTime>,
    sort: SortKey,
    reverse: bool,
    paused: bool,
    /// The last fetch's failure, shown until one succeeds.
    error: Option<String>,
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
    let req = list_request(&args.query)?;
    if !std::io::stdout().is_terminal() {
        bail!("flowlens top needs a terminal; for scripts use `flowlens watch --json` or the ListFlows RPC");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the top runtime")?;
    let tty = Terminal::open().context("opening the terminal")?;
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let _restore = Restore;
    let mut view = View {
        server: args.query.server.clone(),
        rows: Vec::new(),
        taken: None,
        sort: args.sort,
        reverse: false,
        paused: false,
        error: None,
    };
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
                        view.rows = rates.update(taken, flows);
                        view.taken = Some(taken);
                        sort_rows(&mut view.rows, view.sort, view.reverse);
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
            draw(&mut terminal, &view)?;
        }
        // A signal may be taken on another thread and not wake the wait: it is bounded.
        let wait = next_fetch
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(250));
        let k = match tty.next(wait) {
            Input::Event(Event::Key(k)) => {
                dirty = true;
                k
            }
            Input::Event(Event::Resize(..)) => {
                dirty = true;
                continue;
            }
            Input::Event(_) | Input::Idle => continue,
            // Nobody is left to see the screen or an error.
            Input::Gone(_) => break,
        };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        let sort = |v: &mut View, key| {
            v.sort = key;
            sort_rows(&mut v.rows, v.sort, v.reverse);
        };
        match k.code {
            KeyCode::Char('q') | KeyCode::Esc => break,
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => break,
            KeyCode::Char(' ') | KeyCode::Char('p') => view.paused = !view.paused,
            KeyCode::Char('s') => {
                let next = view.sort.next();
                sort(&mut view, next);
            }
            KeyCode::Char('b') => sort(&mut view, SortKey::Rate),
            KeyCode::Char('k') => sort(&mut view, SortKey::Packets),
            KeyCode::Char('t') => sort(&mut view, SortKey::Bytes),
            KeyCode::Char('l') => sort(&mut view, SortKey::Latency),
            KeyCode::Char('a') => sort(&mut view, SortKey::Age),
            KeyCode::Char('r') => {
                view.reverse = !view.reverse;
                sort_rows(&mut view.rows, view.sort, view.reverse);
            }
            _ => {}
        }
    }
    Ok(())
}

/// One listing, connecting first when there is no connection.
async fn fetch(
    q: &FlowQuery,
    client: &mut Option<FlowLensClient<Channel>>,
    req: &proto::ListFlowsRequest,
) -> anyhow::Result<(SystemTime, Vec<FlowRecord>)> {
    let c = match client {
        Some(c) => c,
        None => client.insert(q.connect().await?),
    };
    list_all(c, req)
        .await
        .map_err(|s| anyhow::anyhow!("listing flows at {}: {}", q.server, describe(&s)))
}

fn draw(terminal: &mut DefaultTerminal, view: &View) -> anyhow::Result<()> {
    terminal
        .draw(|f| render_view(f, view))
        .context("drawing the screen")?;
    Ok(())
}

fn rate(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{}/s", size(v.round() as u64)))
}

fn header_lines(view: &View) -> Vec<Line<'static>> {
    let when = view.taken.map_or_else(
        || "waiting for the first snapshot".into(),
        |t| {
            let s = humantime::format_rfc3339_seconds(t).to_string();
            format!("snapshot {} UTC", &s[11..19])
        },
    );
    let mut first = format!(
        "flowlens top - {} - {when} - {} flows - sorted by {}{}",
        view.server,
        view.rows.len(),
        view.sort.label(),
        if view.reverse { " (reversed)" } else { "" }
    );
    if view.paused {
        first.push_str(" - PAUSED");
    }
    let mut lines = vec![Line::styled(
        first,
        Style::default().add_modifier(Modifier::BOLD),
    )];
    let ifaces: Vec<String> = totals(&view.rows)
        .iter()
        .map(|t| {
            format!(
                "{}: {} flows {} {} pkt/s",
                t.name,
                t.flows,
                rate(Some(t.bytes_per_sec)),
                count(t.packets_per_sec.round() as u64)
            )
        })
        .collect();
    lines.push(Line::raw(if ifaces.is_empty() {
        "no flows in progress".to_owned()
    } else {
        ifaces.join("   ")
    }));
    if let Some(e) = &view.error {
        lines.push(Line::styled(
            e.clone(),
            Style::default().add_modifier(Modifier::REVERSED),
        ));
    }
    lines
}

fn render_view(f: &mut Frame, view: &View) {
    let head = header_lines(view);
    let [top, body, foot] = Layout::vertical([
        Constraint::Length(head.len() as u16),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(head), top);
    let widths = [
        Constraint::Length(6),
        Constraint::Min(21),
        Constraint::Min(21),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(6),
    ];
    let header = Row::new([
        "PROTO", "CLIENT", "SERVER", "IFACE", "STATE", "RATE", "C>S", "S>C", "PKT/s", "BYTES",
        "AGE", "RTT", "SRV",
    ])
    .style(Style::default().add_modifier(Modifier::REVERSED));
    let rows = view.rows.iter().map(|r| {
        let t = r.rec.tcp.as_ref();
        let lat = |v: Option<u64>| v.map_or_else(|| "-".into(), render::latency);
        Row::new(vec![
            render::proto_label(r.rec.protocol),
            client_endpoint(&r.rec),
            server_endpoint(&r.rec),
            r.rec.interface.clone(),
            t.map_or("-", |t| render::state_short(t.state)).to_owned(),
            rate(r.bytes_per_sec()),
            rate(r.rate.map(|[c, _]| c)),
            rate(r.rate.map(|[_, s]| s)),
            r.pps
                .map_or_else(|| "-".into(), |p| count(p.round() as u64)),
            size(r.rec.total_bytes()),
            render::duration(r.age),
            lat(t
                .and_then(handshake_rtt)
                .or_else(|| r.rec.icmp.and_then(|i| i.echo_rtt).map(|l| l.mean_ns()))),
            lat(t.and_then(|t| t.server_latency).map(|l| l.mean_ns())),
        ])
    });
    f.render_widget(Table::new(rows, widths).header(header), body);
    f.render_widget(
        Paragraph::new(
            "q quit  space pause  s sort  b bytes/s  k pkt/s  t total  l latency  a age  r reverse",
        )
        .style(Style::default().add_modifier(Modifier::DIM)),
        foot,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::flow::{DirStats, EndReason, Hook, IPPROTO_TCP, IPPROTO_UDP};
    use std::time::UNIX_EPOCH;

    fn rec(port: u16, proto: u8, bytes: u64, packets: u64) -> FlowRecord {
        FlowRecord {
            flow_id: u64::from(port),
            observer: "host1".into(),
            window_start: UNIX_EPOCH + Duration::from_secs(1000),
            continuation: false,
            fragment: false,
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
        }
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

        let mut rows = rates.update(
            t0 + Duration::from_secs(2),
            vec![
                rec(2, IPPROTO_UDP, 1000, 1),
                rec(3, IPPROTO_TCP, 9000, 2),
                rec(4, IPPROTO_TCP, 5000, 90),
            ],
        );
        sort_rows(&mut rows, SortKey::Rate, false);
        let ports: Vec<u16> = rows.iter().map(|r| r.rec.client_port).collect();
        assert_eq!(ports, [3, 4, 2]);
        sort_rows(&mut rows, SortKey::Packets, false);
        assert_eq!(rows[0].rec.client_port, 4);
        sort_rows(&mut rows, SortKey::Rate, true);
        assert_eq!(rows[0].rec.client_port, 2);
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
    fn end_reason_is_refused_for_flows_in_progress() {
        let q = FlowQuery {
            end_reason: Some("tcp_fin".into()),
            ..Default::default()
        };
        let err = list_request(&q).unwrap_err();
        assert!(format!("{err:#}").contains("--end-reason"), "{err:#}");
        let q = FlowQuery {
            proto: Some("udp".into()),
            ..Default::default()
        };
        assert_eq!(list_request(&q).unwrap().include[0].protocol, Some(17));
    }
}
