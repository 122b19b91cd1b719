//! The agent's configuration: one struct whose `Default` is the single source of every default (the command line reads its defaults from it).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::hub::HubConfig;
use crate::kernel::attach::Mode;
use crate::kernel::datapath::Capacities;
use crate::poller::PollerConfig;
use crate::record::api::RequestLimits;
use crate::record::render::{Format, TableStyle};
use crate::sinks::ipfix::{self, Destination, IpfixConfig};
use crate::sinks::kafka::KafkaConfig;

/// Everything `Agent::start` needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Interface patterns to attach to (name, glob, /regex/); empty: every interface that is up, except loopback.
    pub interfaces: Vec<String>,
    /// Interface patterns never to attach to.
    pub exclude_interfaces: Vec<String>,
    pub attach_mode: Mode,
    /// How often the attached interfaces are compared with the selection.
    pub resync_interval: Duration,
    pub poller: PollerConfig,
    pub capacities: Capacities,
    pub hub: HubConfig,
    /// What stdout gets; None prints nothing.
    pub output: Option<Format>,
    /// How the stdout table looks.
    pub table: TableStyle,
    /// Where maps and links are pinned (bpffs); None pins nothing.
    pub pin_dir: Option<PathBuf>,
    /// gRPC listen address (HOST:PORT or unix:/path); None serves no gRPC.
    pub grpc_listen: Option<String>,
    /// Security and resource limits of the gRPC endpoint.
    pub grpc: GrpcConfig,
    /// Prometheus listen address (HOST:PORT); None serves no metrics.
    pub metrics_listen: Option<String>,
    /// Serve the metrics (in cleartext) on an address other hosts can reach.
    pub metrics_allow_remote: bool,
    /// Names this agent in every record, so records of many hosts can be merged; None:
    /// the host name.
    pub observer_id: Option<String>,
    pub ipfix: IpfixSettings,
    /// Kafka export; None: none.
    pub kafka: Option<KafkaConfig>,
}

/// IPFIX export: one exporter per destination, all with the same settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpfixSettings {
    pub destinations: Vec<Destination>,
    pub observation_domain: u32,
    /// Path MTU to the collectors.
    pub mtu: u16,
    /// UDP: how often templates are sent again.
    pub template_refresh: Duration,
    /// Private enterprise number for the timing metrics; None: they are not exported.
    pub enterprise: Option<u32>,
}

impl Default for IpfixSettings {
    fn default() -> Self {
        IpfixSettings {
            destinations: Vec::new(),
            observation_domain: 0,
            mtu: ipfix::DEFAULT_MTU,
            template_refresh: Duration::from_secs(60),
            enterprise: None,
        }
    }
}

impl IpfixSettings {
    /// One exporter's configuration per destination.
    pub fn exporters(&self) -> impl Iterator<Item = IpfixConfig> + '_ {
        self.destinations.iter().map(|d| IpfixConfig {
            destination: d.clone(),
            observation_domain: self.observation_domain,
            mtu: self.mtu,
            template_refresh: self.template_refresh,
            enterprise: self.enterprise,
        })
    }
}

/// The gRPC endpoint: who may connect, and how much any one client may take.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcConfig {
    /// Server certificate chain (PEM); with `tls_key`, the endpoint speaks only TLS.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) client certificates must chain to; set, a client without one is refused.
    pub client_ca: Option<PathBuf>,
    /// Serve cleartext on a non-loopback TCP address anyway.
    pub allow_insecure: bool,
    /// Permission bits of a unix socket.
    pub socket_mode: FileMode,
    /// Group (name or number) that owns a unix socket; None keeps the agent's.
    pub socket_group: Option<String>,
    /// Long-lived streams (Subscribe, health Watch, reflection) open at once, all
    /// connections together.
    pub max_subscribers: usize,
    /// Connections open at once, all peers together.
    pub max_connections: usize,
    /// Connections open at once from one source address (an IPv6 /64).
    pub max_connections_per_source: usize,
    /// A connection must finish its TLS handshake (cleartext: send the HTTP/2 preface)
    /// this soon after it is accepted.
    pub handshake_timeout: Duration,
    /// A request's message must arrive whole this soon after its stream starts (a client
    /// trickling it while answering pings would hold the stream for ever).
    pub request_timeout: Duration,
    /// HTTP/2 streams one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// Largest request message accepted, in bytes.
    pub max_request_size: usize,
    /// Filter counts and string lengths of a Subscribe request.
    pub request_limits: RequestLimits,
    /// How often an HTTP/2 PING checks that a quiet peer is still there.
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the connection.
    pub keepalive_timeout: Duration,
    /// TCP keepalive idle time on accepted connections.
    pub tcp_keepalive: Duration,
    /// A connection with no open stream for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            allow_insecure: false,
            socket_mode: FileMode(0o660),
            socket_group: None,
            max_subscribers: 64,
            max_connections: 1024,
            max_connections_per_source: 64,
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_streams_per_connection: 16,
            max_request_size: 256 << 10,
            request_limits: RequestLimits::default(),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Permission bits written and read in octal (`0660`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl FromStr for FileMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bits = u32::from_str_radix(s, 8)
            .map_err(|_| format!("{s:?} is not an octal mode such as 0660"))?;
        if bits > 0o777 {
            return Err(format!("{s:?}: only permission bits (at most 0777)"));
        }
        Ok(FileMode(bits))
    }
}

/// Where the agent serves gRPC unless told otherwise: a unix socket in its runtime
/// directory (systemd's RuntimeDirectory=flowlens), so only root and the socket's group
/// read the flows, and clients find it without flags.
pub const DEFAULT_SOCKET: &str = "unix:/run/flowlens/flowlens.sock";

impl Default for Config {
    fn default() -> Self {
        Config {
            interfaces: Vec::new(),
            exclude_interfaces: Vec::new(),
            attach_mode: Mode::Auto,
            resync_interval: Duration::from_millis(500),
            poller: PollerConfig::default(),
            capacities: Capacities::default(),
            hub: HubConfig::default(),
            output: Some(Format::Table),
            table: TableStyle::default(),
            pin_dir: Some(PathBuf::from("/sys/fs/bpf/flowlens")),
            grpc_listen: Some(DEFAULT_SOCKET.into()),
            grpc: GrpcConfig::default(),
            metrics_listen: Some("127.0.0.1:9464".into()),
            metrics_allow_remote: false,
            observer_id: None,
            ipfix: IpfixSettings::default(),
            kafka: None,
        }
    }
}

impl Config {
    /// The defaults without anything outside the process: nothing on stdout, no pins, no
    /// listeners. For embedding the agent (tests, benchmarks), attached to `interfaces`.
    pub fn embedded(interfaces: &[&str]) -> Config {
        Config {
            interfaces: interfaces.iter().map(|i| (*i).to_owned()).collect(),
            output: None,
            pin_dir: None,
            grpc_listen: None,
            metrics_listen: None,
            ..Config::default()
        }
    }
}

/// A duration in the one grammar every flag uses (humantime: `500ms`, `30s`, `1h30m`),
/// greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s)
            .map_err(|e| format!("{e} (examples: 500ms, 30s, 2m, 1h30m)"))?;
        if d.is_zero() {
            return Err("must be greater than zero".into());
        }
        Ok(HumanDuration(d))
    }
}

/// A value or the word `off`, as the listen and pin flags take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrOff(pub Option<String>);

impl OrOff {
    pub fn of(v: Option<impl fmt::Display>) -> OrOff {
        OrOff(v.map(|v| v.to_string()))
    }
}

impl fmt::Display for OrOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("off"))
    }
}

impl FromStr for OrOff {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("must not be empty (use \"off\" to disable)".into()),
            "off" => Ok(OrOff(None)),
            v => Ok(OrOff(Some(v.to_owned()))),
        }
    }
}

/// An amount of memory: a number of bytes, or one with a unit (`KiB`, `MiB`, `GiB`; `K`,
/// `M`, `G` mean the same; `KB`, `MB`, `GB` are powers of 1000), e.g. `256MiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}")
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: expected a size such as 256MiB, 1GiB or 65536"))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"
                ))
            }
        };
        n.checked_mul(scale)
            .and_then(|b| usize::try_from(b).ok())
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}
