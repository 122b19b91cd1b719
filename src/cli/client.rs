//! What the clients (`watch`, `top`, `flows`, `status`) share: the agent address and filter flags, the request filters they become, and the connection.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use tonic::transport::{Channel, Endpoint};

use crate::record::api::proto;
use crate::record::api::proto::flow_lens_client::FlowLensClient;
use crate::record::filter::Cidr;
use crate::record::flow::{proto_name, tcp_flags, EndReason, IPPROTO_ICMPV6};

/// Which agent to ask and which flows: the flags `watch`, `top` and `flows` share.
/// Values of one include flag are alternatives (`--port 80 --port 443`: either); different
/// include flags must all match. Each exclude flag value drops what it matches.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FlowQuery {
    #[command(flatten)]
    pub agent: AgentAddr,

    /// Client (initiator) address inside CIDR (repeatable, comma-separated).
    #[arg(
        long,
        value_name = "CIDR",
        env = "FLOWLENS_WATCH_SRC",
        value_delimiter = ','
    )]
    pub src: Vec<String>,
    /// Server address inside CIDR (repeatable).
    #[arg(
        long,
        value_name = "CIDR",
        env = "FLOWLENS_WATCH_DST",
        value_delimiter = ','
    )]
    pub dst: Vec<String>,
    /// Client or server address inside CIDR (repeatable).
    #[arg(
        long,
        value_name = "CIDR",
        env = "FLOWLENS_WATCH_ADDR",
        value_delimiter = ','
    )]
    pub addr: Vec<String>,
    /// Client or server port, N or LO-HI inclusive (repeatable).
    #[arg(
        long,
        value_name = "N|LO-HI",
        env = "FLOWLENS_WATCH_PORT",
        value_delimiter = ','
    )]
    pub port: Vec<String>,
    /// Client port, N or LO-HI (repeatable).
    #[arg(
        long,
        value_name = "N|LO-HI",
        env = "FLOWLENS_WATCH_SPORT",
        value_delimiter = ','
    )]
    pub sport: Vec<String>,
    /// Server port, N or LO-HI (repeatable).
    #[arg(
        long,
        value_name = "N|LO-HI",
        env = "FLOWLENS_WATCH_DPORT",
        value_delimiter = ','
    )]
    pub dport: Vec<String>,
    /// IP protocol: tcp, udp, icmp, icmpv6 or a number (repeatable).
    #[arg(
        long,
        value_name = "PROTO",
        env = "FLOWLENS_WATCH_PROTO",
        value_delimiter = ','
    )]
    pub proto: Vec<String>,
    /// IP version.
    #[arg(long, value_name = "4|6", env = "FLOWLENS_WATCH_IP_VERSION",
          value_parser = clap::builder::PossibleValuesParser::new(["4", "6"]))]
    pub ip_version: Option<String>,
    /// Interface: a name, a glob (veth*) or a /regex/, as `run --interface` (repeatable).
    #[arg(
        long,
        value_name = "NAME",
        env = "FLOWLENS_WATCH_INTERFACE",
        value_delimiter = ','
    )]
    pub interface: Vec<String>,
    /// TCP flags that must all have been seen: names (syn,ack; also fin, rst, psh, urg, ece,
    /// cwr) or a number. Repeatable: a flow with any of the sets matches.
    #[arg(long, value_name = "FLAGS", env = "FLOWLENS_WATCH_TCP_FLAGS")]
    pub tcp_flags: Vec<String>,
    /// Minimum bytes, both directions together.
    #[arg(long, value_name = "N", env = "FLOWLENS_WATCH_MIN_BYTES")]
    pub min_bytes: Option<u64>,
    /// Flows whose local socket (either side) belongs to this systemd unit: a name
    /// (nginx.service), a glob (nginx*) or a /regex/ (repeatable).
    #[arg(
        long,
        value_name = "UNIT",
        env = "FLOWLENS_WATCH_UNIT",
        value_delimiter = ','
    )]
    pub unit: Vec<String>,
    /// Flows whose local socket (either side) is in this cgroup or below it, a path from
    /// the cgroup v2 root: /system.slice/nginx.service, /system.slice (repeatable).
    #[arg(long, value_name = "PATH", env = "FLOWLENS_WATCH_CGROUP")]
    pub cgroup: Vec<String>,
    /// Flows whose local socket (either side) this process opened (repeatable).
    #[arg(
        long,
        value_name = "PID",
        env = "FLOWLENS_WATCH_PID",
        value_delimiter = ','
    )]
    pub pid: Vec<u32>,

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
    /// Drop flows seen on an interface this name, glob or /regex/ matches (repeatable).
    #[arg(
        long,
        value_name = "NAME",
        env = "FLOWLENS_WATCH_EXCLUDE_INTERFACE",
        value_delimiter = ','
    )]
    pub exclude_interface: Vec<String>,
}

/// The agent a client talks to, and how.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentAddr {
    /// Agent address: unix:/path, http://HOST:PORT, HOST:PORT or https://HOST:PORT (TLS).
    #[arg(
        long,
        value_name = "ADDR",
        env = "FLOWLENS_WATCH_SERVER",
        default_value_t = default_server()
    )]
    pub server: String,
    /// CA bundle (PEM) that signed the agent's certificate; default: the system's roots.
    /// Needs an https:// --server.
    #[arg(long, value_name = "PEM", env = "FLOWLENS_WATCH_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for an agent that requires one (--grpc-client-ca).
    #[arg(long, value_name = "PEM", env = "FLOWLENS_WATCH_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "PEM", env = "FLOWLENS_WATCH_KEY")]
    pub key: Option<PathBuf>,
    /// Ask the agent to compress what it sends: zstd, gzip or none.
    #[arg(long, value_enum, env = "FLOWLENS_WATCH_COMPRESSION", default_value_t = Compression::Zstd)]
    pub compression: Compression,
}

/// Compression a client asks the agent for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// Several times smaller batches for a little CPU on both ends.
    #[default]
    Zstd,
    Gzip,
    None,
}

impl Compression {
    pub fn encoding(self) -> Option<tonic::codec::CompressionEncoding> {
        match self {
            Compression::Zstd => Some(tonic::codec::CompressionEncoding::Zstd),
            Compression::Gzip => Some(tonic::codec::CompressionEncoding::Gzip),
            Compression::None => None,
        }
    }
}

/// Where `run` listens by default.
fn default_server() -> String {
    let listen = crate::config::Config::default()
        .grpc_listen
        .unwrap_or_default();
    server_uri(&listen)
}

/// The largest message a client accepts (a full ListFlows page or record batch).
const MAX_MESSAGE: usize = 64 << 20;

impl AgentAddr {
    /// Connects to the agent named by `--server`; errors name it and say what to do.
    pub async fn connect(&self) -> anyhow::Result<FlowLensClient<Channel>> {
        let uri = server_uri(&self.server);
        // Never a quiet fall-back to cleartext: TLS flags with an http:// server are an error.
        let tls = crate::tls::client_config(
            &uri,
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .with_context(|| format!("--server {:?}", self.server))?
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .with_context(|| format!("--server {:?}: TLS settings", self.server))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let text = crate::fatal::chain(&e);
            match unreachable_hint(&self.server, &text) {
                Some(why) => anyhow!("{why}"),
                None => {
                    let hint = transport_hint(&uri, &text);
                    anyhow!("connecting to flowlens at {}: {text}{hint}", self.server)
                }
            }
        })?;
        let client = FlowLensClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        Ok(match self.compression.encoding() {
            Some(c) => client.accept_compressed(c),
            None => client,
        })
    }
}

/// One line for the usual reasons nothing answers at `server`: no agent there, or a
/// socket this user may not open.
pub fn unreachable_hint(server: &str, text: &str) -> Option<String> {
    let fix = if server == default_server() {
        "start it (`flowlens run`, or `systemctl start flowlens`), or pass --server where it listens"
    } else {
        "start it, or pass the --server it listens on (its --grpc-listen)"
    };
    if text.contains("os error 2") || text.contains("No such file") {
        Some(format!(
            "no flowlens agent at {server} (the socket does not exist): {fix}"
        ))
    } else if text.contains("os error 111") || text.contains("Connection refused") {
        Some(format!(
            "no flowlens agent at {server} (connection refused): {fix}"
        ))
    } else if text.contains("os error 13") || text.contains("Permission denied") {
        Some(format!(
            "not allowed to connect to {server} (permission denied): run as root, or as a \
             member of the socket's group (the agent's --grpc-socket-group)"
        ))
    } else {
        None
    }
}

/// Whether a call failed in the transport (where a TLS mismatch shows) rather than in the
/// service.
pub fn is_transport_failure(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    )
}

/// A likely cause when the connection fails after the peer answered: TLS on one side
/// only, or a client certificate the agent does not accept.
pub fn transport_hint(uri: &str, text: &str) -> &'static str {
    if text.contains("tcp connect error") {
        ""
    } else if uri.starts_with("https://") {
        if text.contains("InvalidContentType") || text.contains("corrupt message") {
            " (the agent does not speak TLS: use an http:// --server)"
        } else {
            " (the agent ended the TLS session: if it requires client certificates \
             (--grpc-client-ca), give --cert and --key issued by that CA)"
        }
    } else if uri.starts_with("http://") {
        " (if the agent serves TLS (--grpc-tls-cert), use an https:// --server with --ca)"
    } else {
        ""
    }
}

pub fn server_uri(server: &str) -> String {
    if server.starts_with("unix:") || server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    }
}

/// A gRPC status in a line: its code, and its message when it has one.
pub fn describe(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

/// Include filters beyond this many are refused here, before the agent refuses them.
const MAX_INCLUDE: usize = 4096;

impl FlowQuery {
    /// The include and exclude filters the flags describe, rejecting bad values by flag
    /// name. Include flags combine into one filter per combination of their values; the
    /// end reasons (`watch --end-reason`, repeatable) are one more such flag.
    pub fn filters(
        &self,
        end_reasons: &[EndReason],
    ) -> anyhow::Result<(Vec<proto::Filter>, Vec<proto::Filter>)> {
        let a = self;
        let mut include = vec![proto::Filter {
            ip_version: match a.ip_version.as_deref() {
                None => proto::IpVersion::Unspecified,
                Some("4") => proto::IpVersion::IpVersion4,
                Some("6") => proto::IpVersion::IpVersion6,
                Some(v) => bail!("--ip-version {v:?}: expected 4 or 6"),
            }
            .into(),
            min_bytes: a.min_bytes,
            ..Default::default()
        }];
        let cidrs = |v: &[String], flag: &str| -> anyhow::Result<Vec<String>> {
            v.iter().map(|s| cidr_arg(s, flag)).collect()
        };
        let ports = |v: &[String], flag: &str| -> anyhow::Result<Vec<proto::PortRange>> {
            v.iter().map(|s| port_arg(s, flag)).collect()
        };
        let protos = |v: &[String], flag: &str| -> anyhow::Result<Vec<u32>> {
            v.iter().map(|s| proto_arg(s, flag)).collect()
        };
        let patterns = |v: &[String], flag: &str| -> anyhow::Result<Vec<String>> {
            v.iter().map(|s| interface_arg(s, flag)).collect()
        };
        include = alternatives(include, cidrs(&a.src, "--src")?, |f, v| {
            f.src_cidr = Some(v)
        });
        include = alternatives(include, cidrs(&a.dst, "--dst")?, |f, v| {
            f.dst_cidr = Some(v)
        });
        include = alternatives(include, cidrs(&a.addr, "--addr")?, |f, v| f.cidr = Some(v));
        include = alternatives(include, ports(&a.port, "--port")?, |f, v| f.port = Some(v));
        include = alternatives(include, ports(&a.sport, "--sport")?, |f, v| {
            f.src_port = Some(v)
        });
        include = alternatives(include, ports(&a.dport, "--dport")?, |f, v| {
            f.dst_port = Some(v)
        });
        include = alternatives(include, protos(&a.proto, "--proto")?, |f, v| {
            f.protocol = Some(v)
        });
        include = alternatives(include, patterns(&a.interface, "--interface")?, |f, v| {
            f.interface = Some(v)
        });
        include = alternatives(include, patterns(&a.unit, "--unit")?, |f, v| {
            f.unit = Some(v)
        });
        let cgroups = a
            .cgroup
            .iter()
            .map(|c| cgroup_arg(c))
            .collect::<anyhow::Result<Vec<_>>>()?;
        include = alternatives(include, cgroups, |f, v| f.cgroup = Some(v));
        include = alternatives(include, a.pid.clone(), |f, v| f.pid = Some(v));
        let flags = a
            .tcp_flags
            .iter()
            .map(|s| tcp_flags_arg(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        include = alternatives(include, flags, |f, v| f.tcp_flags = Some(v));
        let reasons: Vec<i32> = end_reasons
            .iter()
            .map(|&e| proto::EndReason::from(e).into())
            .collect();
        include = alternatives(include, reasons, |f, v| f.end_reason = v);
        if include.len() > MAX_INCLUDE {
            bail!(
                "the include flags combine into {} filters (one per combination of their values); \
                 give fewer values",
                include.len()
            );
        }
        let mut exclude = Vec::new();
        let mut drop = |f: proto::Filter| exclude.push(f);
        for v in cidrs(&a.exclude_src, "--exclude-src")? {
            drop(proto::Filter {
                src_cidr: Some(v),
                ..Default::default()
            });
        }
        for v in cidrs(&a.exclude_dst, "--exclude-dst")? {
            drop(proto::Filter {
                dst_cidr: Some(v),
                ..Default::default()
            });
        }
        for v in cidrs(&a.exclude_addr, "--exclude-addr")? {
            drop(proto::Filter {
                cidr: Some(v),
                ..Default::default()
            });
        }
        for v in ports(&a.exclude_port, "--exclude-port")? {
            drop(proto::Filter {
                port: Some(v),
                ..Default::default()
            });
        }
        for v in protos(&a.exclude_proto, "--exclude-proto")? {
            drop(proto::Filter {
                protocol: Some(v),
                ..Default::default()
            });
        }
        for v in patterns(&a.exclude_interface, "--exclude-interface")? {
            drop(proto::Filter {
                interface: Some(v),
                ..Default::default()
            });
        }
        include.retain(|f| *f != proto::Filter::default());
        Ok((include, exclude))
    }
}

/// Every filter of `filters` once per value of a flag (unchanged when it has none).
fn alternatives<T: Clone>(
    filters: Vec<proto::Filter>,
    values: Vec<T>,
    set: impl Fn(&mut proto::Filter, T),
) -> Vec<proto::Filter> {
    if values.is_empty() {
        return filters;
    }
    filters
        .iter()
        .flat_map(|f| {
            values.iter().map(|v| {
                let mut f = f.clone();
                set(&mut f, v.clone());
                f
            })
        })
        .collect()
}

fn interface_arg(s: &str, flag: &str) -> anyhow::Result<String> {
    crate::record::filter::NamePattern::parse(s).with_context(|| format!("{flag} {s:?}"))?;
    Ok(s.to_owned())
}

/// A `--cgroup` path, as the agent compares it.
fn cgroup_arg(s: &str) -> anyhow::Result<String> {
    crate::record::api::cgroup_path(s).ok_or_else(|| {
        anyhow!("--cgroup {s:?}: expected a path from the cgroup v2 root, starting with / (/system.slice/nginx.service)")
    })
}

fn cidr_arg(s: &str, flag: &str) -> anyhow::Result<String> {
    s.parse::<Cidr>()
        .with_context(|| format!("{flag} {s:?}: expected ADDR or ADDR/LEN"))?;
    Ok(s.to_owned())
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
    let lower = s.to_ascii_lowercase();
    let named = (0..=u8::MAX).find(|&p| proto_name(p) == Some(lower.as_str()));
    let p = match (named, lower.as_str()) {
        (Some(p), _) => p,
        (None, "icmp6" | "ipv6-icmp") => IPPROTO_ICMPV6,
        (None, other) => other.parse().with_context(|| {
            format!("{flag} {s:?}: expected tcp, udp, icmp, icmpv6 or a number 0-255")
        })?,
    };
    Ok(u32::from(p))
}

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
        tcp_flags::from_names(t).ok_or_else(|| anyhow!(err()))?
    };
    if bits == 0 {
        bail!(err());
    }
    Ok(u32::from(bits))
}

/// An `--end-reason` value: a reason's name (`idle_timeout`) or the table's label for it
/// (`idle`, `actv`, `fin`, `rst`, `stop`, `evict`); the table's finer reset labels
/// (`rst-c`, `rst-s`, `rst-cs`, `refused`) select resets the agent sends and the client
/// keeps those the label names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndMatch {
    pub reason: EndReason,
    /// The table label a record must also have (`render::end_label`).
    pub label: Option<&'static str>,
}

impl EndMatch {
    pub fn matches(&self, r: &crate::record::flow::FlowRecord) -> bool {
        r.end_reason == self.reason
            && self
                .label
                .is_none_or(|l| crate::record::render::end_label(r) == l)
    }
}

/// Table labels and the reasons they stand for.
const END_LABELS: [(&str, EndReason); 10] = [
    ("idle", EndReason::IdleTimeout),
    ("actv", EndReason::ActiveTimeout),
    ("active", EndReason::ActiveTimeout),
    ("fin", EndReason::TcpFin),
    ("rst", EndReason::TcpRst),
    ("reset", EndReason::TcpRst),
    ("stop", EndReason::Shutdown),
    ("evict", EndReason::Evicted),
    ("timeout", EndReason::IdleTimeout),
    ("shutdown", EndReason::Shutdown),
];

/// The finer reset labels of the table.
const RESET_LABELS: [&str; 4] = ["rst-c", "rst-s", "rst-cs", "refused"];

pub fn end_reason_arg(s: &str) -> anyhow::Result<EndMatch> {
    let norm = s.trim().to_ascii_lowercase();
    if let Some(&l) = RESET_LABELS.iter().find(|&&l| l == norm) {
        return Ok(EndMatch {
            reason: EndReason::TcpRst,
            label: Some(l),
        });
    }
    let name = norm.replace('-', "_");
    EndReason::ALL
        .into_iter()
        .find(|e| e.as_str() == name)
        .or_else(|| END_LABELS.iter().find(|(l, _)| *l == norm).map(|(_, e)| *e))
        .map(|reason| EndMatch {
            reason,
            label: None,
        })
        .ok_or_else(|| {
            let names: Vec<&str> = EndReason::ALL.iter().map(|e| e.as_str()).collect();
            anyhow!(
                "--end-reason {s:?}: expected one of {}, or the table's idle, actv, fin, rst, \
                 rst-c, rst-s, rst-cs, refused, stop, evict",
                names.join(", ")
            )
        })
}

/// Every page of one ListFlows listing (the snapshot's time and its flows); a snapshot
/// that expires between pages starts the listing again.
pub async fn list_flows(
    client: &mut FlowLensClient<Channel>,
    base: &proto::ListFlowsRequest,
) -> Result<(std::time::SystemTime, Vec<crate::record::flow::FlowRecord>), tonic::Status> {
    use crate::record::flow::FlowRecord;
    use std::time::SystemTime;
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
