//! The flowlens command line: `run` the collector, `watch` a running one's flows as they end, or see its flows in progress with `top`. Flags become a `Config`; the `Agent` does the rest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use flowlens::agent::Agent;
use flowlens::attach::Mode;
use flowlens::config::{capacity, Config, HumanDuration, IpfixSettings, OrOff};
use flowlens::datapath::Capacities;
use flowlens::hub::HubConfig;
use flowlens::ipfix::{self, Destination};
use flowlens::poller::PollerConfig;
use flowlens::render::{self, Format, TableStyle};
use flowlens::top::{self, TopArgs};
use flowlens::watch::{self, WatchArgs};

#[derive(Parser)]
#[command(
    name = "flowlens",
    version,
    about = "Host network flow collector (BPF TCX/TC datapath, gRPC flow streaming)"
)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (RUST_LOG takes precedence when set).
    #[arg(
        long,
        global = true,
        env = "FLOWLENS_LOG_LEVEL",
        default_value = "info",
        value_parser = ["error", "warn", "info", "debug", "trace", "off"]
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath, attach to interfaces, and report flows as they end.
    #[command(after_long_help = render::help_legend())]
    Run(Box<RunArgs>),
    /// Subscribe to a running collector and print its flows as they end.
    #[command(after_long_help = render::help_legend())]
    Watch(Box<WatchArgs>),
    /// Live full-screen view of a running collector's flows in progress.
    #[command(after_long_help = top::KEYS_HELP)]
    Top(Box<TopArgs>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// One aligned line per flow record.
    Table,
    /// One JSON object per flow record.
    Json,
    /// Print nothing (records still go to gRPC subscribers).
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AttachMode {
    /// TCX where the kernel has it (>= 6.6), else TC clsact.
    Auto,
    Tcx,
    Tc,
}

fn defaults() -> Config {
    Config::default()
}

impl From<Option<Format>> for Output {
    fn from(f: Option<Format>) -> Output {
        match f {
            Some(Format::Table) => Output::Table,
            Some(Format::Json) => Output::Json,
            None => Output::None,
        }
    }
}

impl From<Mode> for AttachMode {
    fn from(m: Mode) -> AttachMode {
        match m {
            Mode::Auto => AttachMode::Auto,
            Mode::Tcx => AttachMode::Tcx,
            Mode::Tc => AttachMode::Tc,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// Interfaces to attach to: a name, a glob (veth*) or a /regex/. Repeatable.
    /// Default: every interface that is up, except loopback.
    #[arg(
        long = "interface",
        short = 'i',
        env = "FLOWLENS_INTERFACES",
        value_delimiter = ','
    )]
    interfaces: Vec<String>,
    /// Interfaces never to attach to (same pattern forms). Repeatable.
    #[arg(
        long = "exclude-interface",
        short = 'x',
        env = "FLOWLENS_EXCLUDE_INTERFACES",
        value_delimiter = ','
    )]
    exclude_interfaces: Vec<String>,
    /// How to attach.
    #[arg(long, env = "FLOWLENS_ATTACH_MODE", value_enum, default_value_t = AttachMode::from(defaults().attach_mode))]
    attach_mode: AttachMode,
    /// How often the flow maps are read.
    #[arg(long, env = "FLOWLENS_POLL_INTERVAL", default_value_t = HumanDuration(defaults().poller.poll_interval))]
    poll_interval: HumanDuration,
    /// A TCP flow with no packet for this long ends.
    #[arg(long, env = "FLOWLENS_IDLE_TIMEOUT_TCP", default_value_t = HumanDuration(defaults().poller.idle_tcp))]
    idle_timeout_tcp: HumanDuration,
    /// A UDP flow with no packet for this long ends.
    #[arg(long, env = "FLOWLENS_IDLE_TIMEOUT_UDP", default_value_t = HumanDuration(defaults().poller.idle_udp))]
    idle_timeout_udp: HumanDuration,
    /// An ICMP/ICMPv6 flow with no packet for this long ends.
    #[arg(long, env = "FLOWLENS_IDLE_TIMEOUT_ICMP", default_value_t = HumanDuration(defaults().poller.idle_icmp))]
    idle_timeout_icmp: HumanDuration,
    /// Any other IP protocol's flow with no packet for this long ends.
    #[arg(long, env = "FLOWLENS_IDLE_TIMEOUT_OTHER", default_value_t = HumanDuration(defaults().poller.idle_other))]
    idle_timeout_other: HumanDuration,
    /// After FIN in both directions or RST, a TCP flow ends once quiet this long.
    #[arg(long, env = "FLOWLENS_TCP_CLOSE_GRACE", default_value_t = HumanDuration(defaults().poller.tcp_close_grace))]
    tcp_close_grace: HumanDuration,
    /// A long flow is reported (with counter deltas) every this long and keeps going.
    #[arg(long, env = "FLOWLENS_ACTIVE_TIMEOUT", default_value_t = HumanDuration(defaults().poller.active_timeout))]
    active_timeout: HumanDuration,
    /// Capacity of the base flow map (every flow).
    #[arg(long, env = "FLOWLENS_MAX_FLOWS", value_parser = capacity, default_value_t = defaults().capacities.flows)]
    max_flows: u32,
    /// Capacity of the TCP extension map.
    #[arg(long, env = "FLOWLENS_MAX_TCP_FLOWS", value_parser = capacity, default_value_t = defaults().capacities.tcp)]
    max_tcp_flows: u32,
    /// Capacity of the ICMP extension map.
    #[arg(long, env = "FLOWLENS_MAX_ICMP_FLOWS", value_parser = capacity, default_value_t = defaults().capacities.icmp)]
    max_icmp_flows: u32,
    /// What to print on stdout for each flow record.
    #[arg(long, env = "FLOWLENS_OUTPUT", value_enum, default_value_t = Output::from(defaults().output))]
    output: Output,
    /// Table: every column, unabbreviated (wider than 100 columns).
    #[arg(long, env = "FLOWLENS_WIDE")]
    wide: bool,
    /// Table: print a legend of the columns and abbreviations before the header.
    #[arg(long, env = "FLOWLENS_LEGEND")]
    legend: bool,
    /// Where maps and TCX links are pinned (bpffs), so a restarted agent after
    /// a crash continues the flows in progress; "off" pins nothing.
    #[arg(long, env = "FLOWLENS_PIN_DIR", default_value_t = OrOff::of(defaults().pin_dir.map(|p| p.display().to_string())))]
    pin_dir: OrOff,
    /// gRPC listen address: HOST:PORT, unix:/path, or "off".
    #[arg(long, env = "FLOWLENS_GRPC_LISTEN", default_value_t = OrOff::of(defaults().grpc_listen))]
    grpc_listen: OrOff,
    /// Prometheus self-metrics listen address (HOST:PORT), or "off".
    #[arg(long, env = "FLOWLENS_METRICS_LISTEN", default_value_t = OrOff::of(defaults().metrics_listen))]
    metrics_listen: OrOff,
    /// Records kept in memory for subscribers' replay.
    #[arg(long, env = "FLOWLENS_REPLAY_RING", value_parser = capacity, default_value_t = defaults().hub.ring_capacity as u32)]
    replay_ring: u32,
    /// Records queued per subscriber before it starts losing them (and is told so).
    #[arg(long, env = "FLOWLENS_SUBSCRIBER_QUEUE", value_parser = capacity, default_value_t = defaults().hub.subscriber_queue as u32)]
    subscriber_queue: u32,
    /// Records queued for stdout (and each exporter) before it starts losing them; losses
    /// are counted in flowlens_sink_lost_records_total and logged.
    #[arg(long, env = "FLOWLENS_OUTPUT_QUEUE", value_parser = capacity, default_value_t = defaults().hub.sink_queue as u32)]
    output_queue: u32,
    /// Names this agent in every record (`observer`), so records of many hosts can be
    /// merged. Default: the host name.
    #[arg(
        long,
        env = "FLOWLENS_OBSERVER_ID",
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    observer_id: Option<String>,
    /// IPFIX collector to export every flow record to: udp://HOST:PORT or tcp://HOST:PORT
    /// (port 4739 when omitted). Repeatable.
    #[arg(long = "ipfix", env = "FLOWLENS_IPFIX", value_delimiter = ',')]
    ipfix: Vec<Destination>,
    /// IPFIX observation domain id of this host's messages.
    #[arg(long, env = "FLOWLENS_IPFIX_OBSERVATION_DOMAIN", default_value_t = defaults().ipfix.observation_domain)]
    ipfix_observation_domain: u32,
    /// Path MTU to the IPFIX collectors: each message fits one IP packet.
    #[arg(long, env = "FLOWLENS_IPFIX_MTU", value_parser = ipfix::parse_mtu, default_value_t = defaults().ipfix.mtu)]
    ipfix_mtu: u16,
    /// UDP: how often IPFIX templates are sent again (a restarted collector waits this long).
    #[arg(long, env = "FLOWLENS_IPFIX_TEMPLATE_REFRESH", default_value_t = HumanDuration(defaults().ipfix.template_refresh))]
    ipfix_template_refresh: HumanDuration,
    /// Private enterprise number under which the timing metrics (handshake, latency, jitter,
    /// echo RTT) are exported; unset: they are not.
    #[arg(long, env = "FLOWLENS_IPFIX_ENTERPRISE")]
    ipfix_enterprise: Option<u32>,
}

impl RunArgs {
    fn into_config(self) -> Config {
        let d = defaults();
        Config {
            interfaces: self.interfaces,
            exclude_interfaces: self.exclude_interfaces,
            attach_mode: match self.attach_mode {
                AttachMode::Auto => Mode::Auto,
                AttachMode::Tcx => Mode::Tcx,
                AttachMode::Tc => Mode::Tc,
            },
            poller: PollerConfig {
                poll_interval: self.poll_interval.0,
                idle_tcp: self.idle_timeout_tcp.0,
                idle_udp: self.idle_timeout_udp.0,
                idle_icmp: self.idle_timeout_icmp.0,
                idle_other: self.idle_timeout_other.0,
                tcp_close_grace: self.tcp_close_grace.0,
                active_timeout: self.active_timeout.0,
                ..d.poller
            },
            capacities: Capacities {
                flows: self.max_flows,
                tcp: self.max_tcp_flows,
                icmp: self.max_icmp_flows,
            },
            hub: HubConfig {
                ring_capacity: self.replay_ring as usize,
                subscriber_queue: self.subscriber_queue as usize,
                sink_queue: self.output_queue as usize,
            },
            output: match self.output {
                Output::Table => Some(Format::Table),
                Output::Json => Some(Format::Json),
                Output::None => None,
            },
            table: TableStyle {
                wide: self.wide,
                legend: self.legend,
            },
            pin_dir: self.pin_dir.0.map(PathBuf::from),
            grpc_listen: self.grpc_listen.0,
            metrics_listen: self.metrics_listen.0,
            observer_id: self.observer_id.or(d.observer_id),
            ipfix: IpfixSettings {
                destinations: self.ipfix,
                observation_domain: self.ipfix_observation_domain,
                mtu: self.ipfix_mtu,
                template_refresh: self.ipfix_template_refresh.0,
                enterprise: self.ipfix_enterprise,
            },
            ..d
        }
    }
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log_level.clone()))
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
    let res = match cli.command {
        Command::Run(args) => run(args.into_config()),
        Command::Watch(args) => watch::run(*args),
        Command::Top(args) => top::run(*args),
    };
    if let Err(e) = res {
        error!("{e:#}");
        eprintln!("flowlens: {e:#}");
        std::process::exit(1);
    }
}

/// Runs the agent until SIGINT or SIGTERM.
fn run(cfg: Config) -> Result<()> {
    // Installed first: a signal during start-up is not lost, and ends the run once started.
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).context("installing SIGINT/SIGTERM handlers")?;
    let note = (cfg.output.is_some() && std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .then(|| start_note(&cfg));
    let agent = Agent::start(cfg)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::Builder::new()
        .name("flowlens-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("received signal {sig}, shutting down");
            }
            drop(stop_tx);
        })
        .context("spawning the signal thread")?;
    agent.run(&stop_rx)
}

/// What a person at a terminal needs to know before the first flow ends.
fn start_note(cfg: &Config) -> String {
    let p = &cfg.poller;
    let d = |d| humantime::format_duration(d);
    let top = match cfg.grpc_listen.as_deref() {
        Some(a) if Some(a) == defaults().grpc_listen.as_deref() => "run `flowlens top`".to_owned(),
        Some(a) => format!("run `flowlens top --server {a}`"),
        None => "run with --grpc-listen and use `flowlens top`".to_owned(),
    };
    format!(
        "flowlens: a flow is printed when it ends: after {} (TCP) / {} (UDP) / {} (ICMP)\n\
         \x20 without a packet, on TCP FIN or RST, and every {} while it lasts.\n\
         flowlens: to see flows in progress {top};\n\
         \x20 to see ended flows sooner, lower --idle-timeout-tcp/-udp/-icmp and --active-timeout.",
        d(p.idle_tcp),
        d(p.idle_udp),
        d(p.idle_icmp),
        d(p.active_timeout)
    )
}
