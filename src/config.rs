//! The agent's configuration: one struct whose `Default` is the single source of every default (the command line reads its defaults from it).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::attach::Mode;
use crate::datapath::Capacities;
use crate::hub::HubConfig;
use crate::ipfix::{self, Destination, IpfixConfig};
use crate::poller::PollerConfig;
use crate::render::{Format, TableStyle};

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
    /// Prometheus listen address (HOST:PORT); None serves no metrics.
    pub metrics_listen: Option<String>,
    /// Names this agent in every record, so records of many hosts can be merged; None:
    /// the host name.
    pub observer_id: Option<String>,
    pub ipfix: IpfixSettings,
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
            grpc_listen: Some("127.0.0.1:50051".into()),
            metrics_listen: Some("127.0.0.1:9464".into()),
            observer_id: None,
            ipfix: IpfixSettings::default(),
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

/// A map capacity: at least 1.
pub fn capacity(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}
