//! How a person and a script see records: the one table renderer and the one JSON encoder, used by `run` and `watch` alike.

use std::io::{self, Write};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::flow::{proto_name, tcp_flags, DirStats, FlowRecord, Latency};

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns under a header line.
    Table,
    /// One JSON object per line.
    Json,
}

/// Writes records in one format; the table's header goes out before the first record.
#[derive(Debug)]
pub struct Renderer {
    format: Format,
    header_done: bool,
}

impl Renderer {
    pub fn new(format: Format) -> Renderer {
        Renderer {
            format,
            header_done: false,
        }
    }

    /// The table header now (so a person sees the columns before any flow ends).
    pub fn header(&mut self, out: &mut impl Write) -> io::Result<()> {
        if self.format == Format::Table && !self.header_done {
            self.header_done = true;
            writeln!(out, "{}", table_header())?;
        }
        Ok(())
    }

    pub fn record(&mut self, out: &mut impl Write, r: &FlowRecord) -> io::Result<()> {
        match self.format {
            Format::Table => {
                self.header(out)?;
                writeln!(out, "{}", table_row(r))
            }
            Format::Json => {
                serde_json::to_writer(&mut *out, r)?;
                writeln!(out)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Table output
// ---------------------------------------------------------------------------

const W_TIME: usize = 12;
const W_IFACE: usize = 10;
const W_PROTO: usize = 6;
const W_ENDPOINT: usize = 21;
const W_DIR: usize = 13;
const W_END: usize = 14;

pub fn table_header() -> String {
    format!(
        "{:<W_TIME$} {:<W_IFACE$} {:<W_PROTO$} {:>W_ENDPOINT$}    {:<W_ENDPOINT$} {:>W_DIR$} {:>W_DIR$} {:<W_END$} DETAIL",
        "TIME(UTC)", "IFACE", "PROTO", "CLIENT", "SERVER", "C>S PKT/B", "S>C PKT/B", "END"
    )
}

/// One aligned table line (long IPv6 endpoints push later columns right).
pub fn table_row(r: &FlowRecord) -> String {
    let ep = |a: IpAddr, p: u16| match (a, r.has_ports()) {
        (_, false) => a.to_string(),
        (IpAddr::V4(_), true) => format!("{a}:{p}"),
        (IpAddr::V6(_), true) => format!("[{a}]:{p}"),
    };
    let dir = |d: &DirStats| format!("{}/{}", d.packets, human_bytes(d.bytes));
    let iface = if r.interface.is_empty() {
        format!("if{}", r.ifindex)
    } else {
        r.interface.clone()
    };
    format!(
        "{:<W_TIME$} {:<W_IFACE$} {:<W_PROTO$} {:>W_ENDPOINT$} -> {:<W_ENDPOINT$} {:>W_DIR$} {:>W_DIR$} {:<W_END$} {}",
        clock_utc(r.last_seen),
        iface,
        proto_label(r.protocol),
        ep(r.client_addr, r.client_port),
        ep(r.server_addr, r.server_port),
        dir(&r.client),
        dir(&r.server),
        r.end_reason.as_str(),
        detail(r),
    )
    .trim_end()
    .to_owned()
}

fn proto_label(p: u8) -> String {
    proto_name(p).map_or_else(|| p.to_string(), str::to_owned)
}

fn clock_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        b.to_string()
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn ms(ns: u64) -> String {
    format!("{:.2}ms", ns as f64 / 1e6)
}

fn detail(r: &FlowRecord) -> String {
    let mut parts = Vec::new();
    if r.fragment {
        parts.push("fragments".to_owned());
    }
    if let Some(t) = &r.tcp {
        parts.push(format!(
            "{} flags {}|{}",
            t.state.as_str(),
            tcp_flags::letters(t.client_flags),
            tcp_flags::letters(t.server_flags)
        ));
        match (t.handshake_client_ns, t.handshake_server_ns) {
            (Some(c), Some(s)) => parts.push(format!("hs {}+{}", ms(c.into()), ms(s.into()))),
            (Some(c), None) => parts.push(format!("hs {}+?", ms(c.into()))),
            (None, Some(s)) => parts.push(format!("hs ?+{}", ms(s.into()))),
            (None, None) => {}
        }
        let lat = |name: &str, l: &Latency| match l.jitter_ns {
            Some(j) => format!("{name} {} jit {} n={}", ms(l.mean_ns()), ms(j), l.count),
            None => format!("{name} {} n={}", ms(l.mean_ns()), l.count),
        };
        if let Some(l) = &t.server_latency {
            parts.push(lat("srv-lat", l));
        }
        if let Some(l) = &t.client_latency {
            parts.push(lat("cli-lat", l));
        }
        if t.syn_retransmits > 0 {
            parts.push(format!("syn-rtx {}", t.syn_retransmits));
        }
        if t.late_start {
            parts.push("late-start".into());
        }
    }
    if let Some(i) = &r.icmp {
        let tc = |t: Option<u8>, c: Option<u8>| match (t, c) {
            (Some(t), Some(c)) => format!("{t}/{c}"),
            (Some(t), None) => t.to_string(),
            _ => "-".into(),
        };
        parts.push(format!(
            "icmp c={} s={}",
            tc(i.client_type, i.client_code),
            tc(i.server_type, i.server_code)
        ));
        if let Some(id) = i.echo_id {
            parts.push(format!("id {id}"));
        }
        if let Some(r) = &i.echo_rtt {
            parts.push(format!("rtt {} n={}", ms(r.mean_ns()), r.count));
        }
    }
    parts.join(" ")
}
