//! What `watch` and `top` share: the agent address and filter flags, the request filters they become, and the connection.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use tonic::transport::{Channel, Endpoint};

use crate::record::api::proto;
use crate::record::api::proto::flow_lens_client::FlowLensClient;
use crate::record::filter::Cidr;
use crate::record::flow::{proto_name, tcp_flags, EndReason, IPPROTO_ICMPV6};

/// Which agent to ask and which flows: the flags `watch` and `top` share. Include flags
/// are ANDed into one filter; each exclude flag value drops what it matches.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FlowQuery {
    /// Agent address: http://HOST:PORT, HOST:PORT, https://HOST:PORT (TLS) or unix:/path.
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
    let listen = crate::config::Config::default().grpc_listen;
    format!("http://{}", listen.unwrap_or_default())
}

/// The largest message a client accepts (a full ListFlows page or record batch).
const MAX_MESSAGE: usize = 64 << 20;

impl FlowQuery {
    /// Connects to the agent named by `--server`; errors name it.
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
            let hint = transport_hint(&uri, &text);
            anyhow!("connecting to flowlens at {}: {text}{hint}", self.server)
        })?;
        let client = FlowLensClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        Ok(match self.compression.encoding() {
            Some(c) => client.accept_compressed(c),
            None => client,
        })
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

impl FlowQuery {
    /// The include and exclude filters the flags describe, rejecting bad values by flag name.
    pub fn filters(&self) -> anyhow::Result<(Vec<proto::Filter>, Vec<proto::Filter>)> {
        let a = self;
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
        let include = if include == proto::Filter::default() {
            Vec::new()
        } else {
            vec![include]
        };
        Ok((include, exclude))
    }
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
