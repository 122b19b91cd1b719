//! `flowlens watch`: subscribes to a flowlens agent over gRPC and prints flows as a table or JSON lines.

use std::future::Future;
use std::io::{self, Write};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use tonic::transport::Endpoint;

use crate::flow::{EndReason, FlowRecord, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use crate::service::proto;
use crate::service::proto::flow_lens_client::FlowLensClient;
use crate::stream::Cidr;

/// Include flags are ANDed into one filter; each exclude flag value drops what it matches.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WatchArgs {
    /// Agent address: http://HOST:PORT, HOST:PORT or unix:/path.
    #[arg(
        long,
        value_name = "ADDR",
        env = "FLOWLENS_WATCH_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Print one JSON object per line instead of a table.
    #[arg(long, env = "FLOWLENS_WATCH_JSON")]
    pub json: bool,

    /// Client (initiator) address inside CIDR.
    #[arg(long, value_name = "CIDR", env = "FLOWLENS_WATCH_SRC")]
    pub src: Option<String>,
    /// Server address inside CIDR.
    #[arg(long, value_name = "CIDR", env = "FLOWLENS_WATCH_DST")]
    pub dst: Option<String>,
    /// Client or server address inside CIDR.
    #[arg(long, value_name = "CIDR", env = "FLOWLENS_WATCH_ADDR")]
    pub addr: Option<String>,
    /// Client or server port (N or LO-HI, inclusive).
    #[arg(long, value_name = "N|LO-HI", env = "FLOWLENS_WATCH_PORT")]
    pub port: Option<String>,
    /// Client port (N or LO-HI).
    #[arg(long, value_name = "N|LO-HI", env = "FLOWLENS_WATCH_SPORT")]
    pub sport: Option<String>,
    /// Server port (N or LO-HI).
    #[arg(long, value_name = "N|LO-HI", env = "FLOWLENS_WATCH_DPORT")]
    pub dport: Option<String>,
    /// IP protocol: tcp, udp, icmp, icmpv6 or a number.
    #[arg(long, value_name = "PROTO", env = "FLOWLENS_WATCH_PROTO")]
    pub proto: Option<String>,
    /// IP version.
    #[arg(long, value_name = "4|6", env = "FLOWLENS_WATCH_IP_VERSION",
          value_parser = clap::builder::PossibleValuesParser::new(["4", "6"]))]
    pub ip_version: Option<String>,
    /// Interface name.
    #[arg(long, value_name = "NAME", env = "FLOWLENS_WATCH_INTERFACE")]
    pub interface: Option<String>,
    /// TCP flags that must all have been seen: names (syn,ack,fin,rst,psh,urg,ece,cwr) or a number.
    #[arg(long, value_name = "FLAGS", env = "FLOWLENS_WATCH_TCP_FLAGS")]
    pub tcp_flags: Option<String>,
    /// End reason: idle_timeout, active_timeout, tcp_fin, tcp_rst, shutdown.
    #[arg(long, value_name = "REASON", env = "FLOWLENS_WATCH_END_REASON")]
    pub end_reason: Option<String>,
    /// Minimum bytes, both directions together.
    #[arg(long, value_name = "N", env = "FLOWLENS_WATCH_MIN_BYTES")]
    pub min_bytes: Option<u64>,

    /// Drop flows whose client address is inside CIDR (repeatable).
    #[arg(
        long,
        value_name = "CIDR",
        env = "FLOWLENS_WATCH_EXCLUDE_SRC",
        value_delimiter = ','
    )]
    pub exclude_src: Vec<String>,
    /// Drop flows whose server address is inside CIDR (repeatable).
    #[arg(
        long,
        value_name = "CIDR",
        env = "FLOWLENS_WATCH_EXCLUDE_DST",
        value_delimiter = ','
    )]
    pub exclude_dst: Vec<String>,
    /// Drop flows with either address inside CIDR (repeatable).
    #[arg(
        long,
        value_name = "CIDR",
        env = "FLOWLENS_WATCH_EXCLUDE_ADDR",
        value_delimiter = ','
    )]
    pub exclude_addr: Vec<String>,
    /// Drop flows with either port in N or LO-HI (repeatable).
    #[arg(
        long,
        value_name = "N|LO-HI",
        env = "FLOWLENS_WATCH_EXCLUDE_PORT",
        value_delimiter = ','
    )]
    pub exclude_port: Vec<String>,
    /// Drop flows of this IP protocol (repeatable).
    #[arg(
        long,
        value_name = "PROTO",
        env = "FLOWLENS_WATCH_EXCLUDE_PROTO",
        value_delimiter = ','
    )]
    pub exclude_proto: Vec<String>,
    /// Drop flows seen on this interface (repeatable).
    #[arg(
        long,
        value_name = "NAME",
        env = "FLOWLENS_WATCH_EXCLUDE_INTERFACE",
        value_delimiter = ','
    )]
    pub exclude_interface: Vec<String>,

    /// First print up to N recent matching flows kept by the agent.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        env = "FLOWLENS_WATCH_REPLAY"
    )]
    pub replay: u32,
    /// First print the kept flows last seen within this long ago (e.g. 30s, 5m, 1h).
    #[arg(long, value_name = "DURATION", env = "FLOWLENS_WATCH_SINCE")]
    pub since: Option<String>,
    /// Exit after the replay instead of following new flows.
    #[arg(long, env = "FLOWLENS_WATCH_NO_FOLLOW")]
    pub no_follow: bool,
}

/// Subscribes and prints until Ctrl-C (exit 0) or the stream ends; a broken stream is an error.
pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the watch runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered now, before the first output: a Ctrl-C at any point
        // from here on ends the watch cleanly instead of killing it.
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let stop = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        let mut out = io::BufWriter::new(io::stdout().lock());
        watch_to(&args, &mut out, stop).await
    })
}

/// The body of `run`, with the output and the stop signal supplied by the caller.
pub async fn watch_to(
    args: &WatchArgs,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let req = subscribe_request(args)?;
    let uri = server_uri(&args.server);
    let channel = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("--server {:?}", args.server))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to flowlens at {}", args.server))?;
    let mut client = FlowLensClient::new(channel).max_decoding_message_size(64 << 20);
    let mut stream = client
        .subscribe(req)
        .await
        .map_err(|s| anyhow!("subscribing at {}: {}", args.server, s.message()))?
        .into_inner();
    if !args.json {
        if let Err(e) = writeln!(out, "{}", table_header()).and_then(|()| out.flush()) {
            return quiet_pipe(e);
        }
    }
    tokio::pin!(stop);
    loop {
        let msg = tokio::select! {
            _ = &mut stop => return Ok(()),
            msg = stream.message() => msg,
        };
        let event = match msg {
            Ok(Some(m)) => m.event,
            Ok(None) => {
                if !args.no_follow {
                    eprintln!("flowlens watch: the server ended the stream");
                }
                return Ok(());
            }
            Err(s) => bail!("stream from {} lost: {}", args.server, describe(&s)),
        };
        match event {
            Some(proto::subscribe_response::Event::Flows(batch)) => {
                if let Err(e) = print_batch(&batch, args.json, out) {
                    return quiet_pipe(e);
                }
            }
            Some(proto::subscribe_response::Event::Lost(lost)) => {
                eprintln!(
                    "flowlens watch: LOST {} flow records ({})",
                    lost.count,
                    match lost.reason() {
                        proto::LostReason::QueueFull =>
                            "queue full: this client did not read fast enough",
                        proto::LostReason::Unspecified => "unspecified reason",
                    }
                );
            }
            None => {}
        }
    }
}

fn describe(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

/// Output going away (e.g. piped into `head`) is a normal way to stop.
fn quiet_pipe(e: io::Error) -> anyhow::Result<()> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e).context("writing to stdout")
    }
}

fn print_batch(batch: &proto::FlowBatch, json: bool, out: &mut impl Write) -> io::Result<()> {
    for p in &batch.records {
        let rec = match FlowRecord::try_from(p) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("flowlens watch: skipping malformed record: {e}");
                continue;
            }
        };
        if json {
            serde_json::to_writer(&mut *out, &rec)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", table_row(&rec))?;
        }
    }
    out.flush()
}

fn server_uri(server: &str) -> String {
    if server.starts_with("unix:") || server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    }
}

// ---------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------

/// Builds the Subscribe request the flags describe, rejecting bad values by flag name.
pub fn subscribe_request(a: &WatchArgs) -> anyhow::Result<proto::SubscribeRequest> {
    let include = proto::Filter {
        src_cidr: cidr_arg(&a.src, "--src")?,
        dst_cidr: cidr_arg(&a.dst, "--dst")?,
        cidr: cidr_arg(&a.addr, "--addr")?,
        src_port: a
            .sport
            .as_deref()
            .map(|s| port_arg(s, "--sport"))
            .transpose()?,
        dst_port: a
            .dport
            .as_deref()
            .map(|s| port_arg(s, "--dport"))
            .transpose()?,
        port: a
            .port
            .as_deref()
            .map(|s| port_arg(s, "--port"))
            .transpose()?,
        protocol: a
            .proto
            .as_deref()
            .map(|s| proto_arg(s, "--proto"))
            .transpose()?,
        ip_version: match a.ip_version.as_deref() {
            None => proto::IpVersion::Unspecified,
            Some("4") => proto::IpVersion::IpVersion4,
            Some("6") => proto::IpVersion::IpVersion6,
            Some(v) => bail!("--ip-version {v:?}: expected 4 or 6"),
        }
        .into(),
        interface: a.interface.clone(),
        tcp_flags: a.tcp_flags.as_deref().map(tcp_flags_arg).transpose()?,
        end_reason: a
            .end_reason
            .as_deref()
            .map(end_reason_arg)
            .transpose()?
            .map(|e| proto::EndReason::from(e).into())
            .unwrap_or_default(),
        min_bytes: a.min_bytes,
    };
    let mut exclude = Vec::new();
    for s in &a.exclude_src {
        exclude.push(proto::Filter {
            src_cidr: cidr_arg(&Some(s.clone()), "--exclude-src")?,
            ..Default::default()
        });
    }
    for s in &a.exclude_dst {
        exclude.push(proto::Filter {
            dst_cidr: cidr_arg(&Some(s.clone()), "--exclude-dst")?,
            ..Default::default()
        });
    }
    for s in &a.exclude_addr {
        exclude.push(proto::Filter {
            cidr: cidr_arg(&Some(s.clone()), "--exclude-addr")?,
            ..Default::default()
        });
    }
    for s in &a.exclude_port {
        exclude.push(proto::Filter {
            port: Some(port_arg(s, "--exclude-port")?),
            ..Default::default()
        });
    }
    for s in &a.exclude_proto {
        exclude.push(proto::Filter {
            protocol: Some(proto_arg(s, "--exclude-proto")?),
            ..Default::default()
        });
    }
    for s in &a.exclude_interface {
        exclude.push(proto::Filter {
            interface: Some(s.clone()),
            ..Default::default()
        });
    }
    let since = a
        .since
        .as_deref()
        .map(|s| -> anyhow::Result<prost_types::Timestamp> {
            let ago = parse_duration(s).with_context(|| format!("--since {s:?}"))?;
            let t = SystemTime::now()
                .checked_sub(ago)
                .unwrap_or(UNIX_EPOCH)
                .max(UNIX_EPOCH);
            Ok(t.into())
        })
        .transpose()?;
    let include = if include == proto::Filter::default() {
        Vec::new()
    } else {
        vec![include]
    };
    Ok(proto::SubscribeRequest {
        include,
        exclude,
        replay: a.replay,
        since,
        follow: Some(!a.no_follow),
    })
}

fn cidr_arg(v: &Option<String>, flag: &str) -> anyhow::Result<Option<String>> {
    if let Some(s) = v {
        s.parse::<Cidr>()
            .with_context(|| format!("{flag} {s:?}: expected ADDR or ADDR/LEN"))?;
    }
    Ok(v.clone())
}

/// "N" or "LO-HI".
pub fn port_arg(s: &str, flag: &str) -> anyhow::Result<proto::PortRange> {
    let num = |p: &str| -> anyhow::Result<u32> {
        let n: u16 = p
            .trim()
            .parse()
            .with_context(|| format!("{flag} {s:?}: expected a port 0-65535 or LO-HI"))?;
        Ok(u32::from(n))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (num(lo)?, num(hi)?),
        None => {
            let n = num(s)?;
            (n, n)
        }
    };
    if lo > hi {
        bail!("{flag} {s:?}: range reversed ({lo} > {hi})");
    }
    Ok(proto::PortRange { lo, hi: Some(hi) })
}

/// A protocol name or number.
pub fn proto_arg(s: &str, flag: &str) -> anyhow::Result<u32> {
    let p = match s.to_ascii_lowercase().as_str() {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        "icmp" => IPPROTO_ICMP,
        "icmpv6" | "icmp6" | "ipv6-icmp" => IPPROTO_ICMPV6,
        other => other.parse().with_context(|| {
            format!("{flag} {s:?}: expected tcp, udp, icmp, icmpv6 or a number 0-255")
        })?,
    };
    Ok(u32::from(p))
}

const TCP_FLAG_NAMES: [(&str, u8); 8] = [
    ("fin", 0x01),
    ("syn", 0x02),
    ("rst", 0x04),
    ("psh", 0x08),
    ("ack", 0x10),
    ("urg", 0x20),
    ("ece", 0x40),
    ("cwr", 0x80),
];

/// "syn,ack", "0x12" or "18".
pub fn tcp_flags_arg(s: &str) -> anyhow::Result<u32> {
    let err =
        || format!("--tcp-flags {s:?}: expected names (fin,syn,rst,psh,ack,urg,ece,cwr) or 1-255");
    let t = s.trim();
    let bits = if let Some(hex) = t.strip_prefix("0x") {
        u8::from_str_radix(hex, 16).with_context(err)?
    } else if let Ok(n) = t.parse::<u8>() {
        n
    } else {
        let mut bits = 0u8;
        for name in t.split([',', '|', '+']) {
            let name = name.trim().to_ascii_lowercase();
            let (_, b) = TCP_FLAG_NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| anyhow!(err()))?;
            bits |= b;
        }
        bits
    };
    if bits == 0 {
        bail!(err());
    }
    Ok(u32::from(bits))
}

pub fn end_reason_arg(s: &str) -> anyhow::Result<EndReason> {
    let norm = s.trim().to_ascii_lowercase().replace('-', "_");
    EndReason::ALL
        .into_iter()
        .find(|e| e.as_str() == norm)
        .ok_or_else(|| {
            let names: Vec<&str> = EndReason::ALL.iter().map(|e| e.as_str()).collect();
            anyhow!("--end-reason {s:?}: expected one of {}", names.join(", "))
        })
}

/// "90", "90s", "1500ms", "5m", "2h".
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("expected a number with an optional unit (ms, s, m, h)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        u => bail!("unknown unit {u:?} (ms, s, m, h)"),
    };
    Ok(d)
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
    let icmp = r.protocol == IPPROTO_ICMP || r.protocol == IPPROTO_ICMPV6;
    let ep = |a: IpAddr, p: u16| match (a, icmp) {
        (_, true) => a.to_string(),
        (IpAddr::V4(_), false) => format!("{a}:{p}"),
        (IpAddr::V6(_), false) => format!("[{a}]:{p}"),
    };
    let dir = |d: &crate::flow::DirStats| format!("{}/{}", d.packets, human_bytes(d.bytes));
    let iface = if r.interface.is_empty() {
        format!("if{}", r.ifindex)
    } else {
        r.interface.clone()
    };
    format!(
        "{:<W_TIME$} {:<W_IFACE$} {:<W_PROTO$} {:>W_ENDPOINT$} -> {:<W_ENDPOINT$} {:>W_DIR$} {:>W_DIR$} {:<W_END$} {}",
        clock_utc(r.last_seen),
        iface,
        proto_name(r.protocol),
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

fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmp6".into(),
        n => n.to_string(),
    }
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

fn flag_letters(bits: u8) -> String {
    const LETTERS: [(u8, char); 8] = [
        (0x02, 'S'),
        (0x10, 'A'),
        (0x08, 'P'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x20, 'U'),
        (0x40, 'E'),
        (0x80, 'C'),
    ];
    let s: String = LETTERS
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, c)| c)
        .collect();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

fn detail(r: &FlowRecord) -> String {
    let mut parts = Vec::new();
    if let Some(t) = &r.tcp {
        parts.push(format!(
            "{} flags {}|{}",
            t.state.as_str(),
            flag_letters(t.client_flags),
            flag_letters(t.server_flags)
        ));
        match (t.handshake_client_ns, t.handshake_server_ns) {
            (Some(c), Some(s)) => parts.push(format!("hs {}+{}", ms(c.into()), ms(s.into()))),
            (Some(c), None) => parts.push(format!("hs {}+?", ms(c.into()))),
            (None, Some(s)) => parts.push(format!("hs ?+{}", ms(s.into()))),
            (None, None) => {}
        }
        let lat = |name: &str, l: &crate::flow::Latency| match l.jitter_ns {
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
