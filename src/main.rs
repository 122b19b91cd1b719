//! The flowlens command line: `run` the collector, `watch` a running one's flows as they end, see its flows in progress with `top` or `flows`, its state with `status`. Flags become a `Config`; the `Agent` does the rest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::builder::TypedValueParser as _;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use log::{info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use flowlens::agent::Agent;
use flowlens::cli::flows::{self, FlowsArgs};
use flowlens::cli::status::{self, StatusArgs};
use flowlens::cli::top::{self, TopArgs};
use flowlens::cli::watch::{self, WatchArgs};
use flowlens::config::{
    ByteSize, Config, FileMode, GrpcConfig, HumanDuration, IpfixSettings, OrOff,
};
use flowlens::hub::HubConfig;
use flowlens::kernel::attach::Mode;
use flowlens::kernel::datapath::Capacities;
use flowlens::poller::PollerConfig;
use flowlens::record::api::RequestLimits;
use flowlens::record::render::{self, Format, TableStyle};
use flowlens::sinks::ipfix::Destination;
use flowlens::sinks::kafka::config::{
    Brokers, Compression, KafkaOption, SaslMechanism, DEFAULT_TOPIC, PASSWORD_ENV,
};
use flowlens::sinks::kafka::KafkaFlags;

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
    /// Print a running collector's flows in progress once (a table, or --json).
    Flows(Box<FlowsArgs>),
    /// Print a running collector's state: interfaces, maps, counters, sinks, losses.
    Status(Box<StatusArgs>),
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
    /// How often the poller scans the flow maps (spaced out when a scan of very many flows is long; closed TCP flows are still ended this often).
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
    /// Concurrent scans a bulk end (thousands of flows ending in one poll) is split among; above 1 they outrun the one thread that emits the records, and walk the map again.
    #[arg(long, env = "FLOWLENS_SCAN_THREADS", default_value_t = defaults().poller.scan_threads)]
    scan_threads: u32,
    /// Capacity of the base flow map (every flow).
    #[arg(long, env = "FLOWLENS_MAX_FLOWS", default_value_t = defaults().capacities.flows)]
    max_flows: u32,
    /// Capacity of the TCP extension map (TCP flows with latency samples). Default: a
    /// quarter of --max-flows.
    #[arg(long, env = "FLOWLENS_MAX_TCP_FLOWS")]
    max_tcp_flows: Option<u32>,
    /// Capacity of the ICMP extension map (ICMP flows with echo RTT samples). Default: a
    /// sixteenth of --max-flows.
    #[arg(long, env = "FLOWLENS_MAX_ICMP_FLOWS")]
    max_icmp_flows: Option<u32>,
    /// Capacity of the map of flows' local sockets and their owners (one entry per local
    /// end; a loopback flow takes two). Full: new flows are kept without their process.
    /// Default: half of --max-flows.
    #[arg(long, env = "FLOWLENS_MAX_LOCAL_FLOWS")]
    max_local_flows: Option<u32>,
    /// What to print on stdout for each flow record.
    #[arg(long, env = "FLOWLENS_OUTPUT", value_enum, default_value_t = Output::from(defaults().output))]
    output: Output,
    /// Table: every column, unabbreviated.
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
    /// gRPC server certificate chain (PEM): serve TLS only. Needs --grpc-tls-key.
    #[arg(long, value_name = "PEM", env = "FLOWLENS_GRPC_TLS_CERT")]
    grpc_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --grpc-tls-cert.
    #[arg(long, value_name = "PEM", env = "FLOWLENS_GRPC_TLS_KEY")]
    grpc_tls_key: Option<PathBuf>,
    /// CA bundle (PEM): gRPC clients must present a certificate it issued (mutual TLS).
    #[arg(long, value_name = "PEM", env = "FLOWLENS_GRPC_CLIENT_CA")]
    grpc_client_ca: Option<PathBuf>,
    /// Serve gRPC in cleartext on a non-loopback address: anyone who reaches the port
    /// reads every flow. Without it that is refused.
    #[arg(long, env = "FLOWLENS_GRPC_ALLOW_INSECURE")]
    grpc_allow_insecure: bool,
    /// Permission bits of the gRPC unix socket (octal).
    #[arg(long, value_name = "MODE", env = "FLOWLENS_GRPC_SOCKET_MODE", default_value_t = defaults().grpc.socket_mode)]
    grpc_socket_mode: FileMode,
    /// Group (name or number) given the gRPC unix socket; default: the agent's.
    #[arg(long, value_name = "GROUP", env = "FLOWLENS_GRPC_SOCKET_GROUP")]
    grpc_socket_group: Option<String>,
    /// Long-lived streams (Subscribe, health Watch, reflection) open at once, all clients together.
    #[arg(long, env = "FLOWLENS_GRPC_MAX_SUBSCRIBERS", default_value_t = defaults().grpc.max_subscribers as u32)]
    grpc_max_subscribers: u32,
    /// gRPC connections open at once, all clients together; at the cap a new one closes the
    /// oldest that has not authenticated (lowered to fit the descriptor limit).
    #[arg(long, env = "FLOWLENS_GRPC_MAX_CONNECTIONS", default_value_t = defaults().grpc.max_connections as u32)]
    grpc_max_connections: u32,
    /// gRPC connections open at once from one source address (an IPv6 /64).
    #[arg(long, env = "FLOWLENS_GRPC_MAX_CONNECTIONS_PER_SOURCE", default_value_t = defaults().grpc.max_connections_per_source as u32)]
    grpc_max_connections_per_source: u32,
    /// A gRPC connection must finish its TLS handshake (in cleartext: send the HTTP/2
    /// preface) this soon after it is accepted, or it is closed.
    #[arg(long, env = "FLOWLENS_GRPC_HANDSHAKE_TIMEOUT", default_value_t = HumanDuration(defaults().grpc.handshake_timeout))]
    grpc_handshake_timeout: HumanDuration,
    /// HTTP/2 streams one gRPC connection may have open at once.
    #[arg(long, env = "FLOWLENS_GRPC_MAX_STREAMS_PER_CONNECTION", default_value_t = defaults().grpc.max_streams_per_connection)]
    grpc_max_streams_per_connection: u32,
    /// Filters a Subscribe request may carry in include, and in exclude.
    #[arg(long, env = "FLOWLENS_GRPC_MAX_FILTERS", default_value_t = defaults().grpc.request_limits.max_filters as u32)]
    grpc_max_filters: u32,
    /// Bytes in any string of a Subscribe filter (CIDR, interface name).
    #[arg(long, env = "FLOWLENS_GRPC_MAX_STRING_LENGTH", default_value_t = defaults().grpc.request_limits.max_string_len as u32)]
    grpc_max_string_length: u32,
    /// Largest gRPC request message, in bytes.
    #[arg(long, env = "FLOWLENS_GRPC_MAX_REQUEST_SIZE", default_value_t = defaults().grpc.max_request_size as u32)]
    grpc_max_request_size: u32,
    /// How often a quiet gRPC peer is pinged (HTTP/2 PING).
    #[arg(long, env = "FLOWLENS_GRPC_KEEPALIVE_INTERVAL", default_value_t = HumanDuration(defaults().grpc.keepalive_interval))]
    grpc_keepalive_interval: HumanDuration,
    /// A ping unanswered this long closes the connection (and ends its subscribers).
    #[arg(long, env = "FLOWLENS_GRPC_KEEPALIVE_TIMEOUT", default_value_t = HumanDuration(defaults().grpc.keepalive_timeout))]
    grpc_keepalive_timeout: HumanDuration,
    /// TCP keepalive idle time on gRPC connections.
    #[arg(long, env = "FLOWLENS_GRPC_TCP_KEEPALIVE", default_value_t = HumanDuration(defaults().grpc.tcp_keepalive))]
    grpc_tcp_keepalive: HumanDuration,
    /// A gRPC connection with no open stream for this long is closed.
    #[arg(long, env = "FLOWLENS_GRPC_IDLE_TIMEOUT", default_value_t = HumanDuration(defaults().grpc.idle_timeout))]
    grpc_idle_timeout: HumanDuration,
    /// Prometheus self-metrics listen address (HOST:PORT), or "off".
    #[arg(long, env = "FLOWLENS_METRICS_LISTEN", default_value_t = OrOff::of(defaults().metrics_listen))]
    metrics_listen: OrOff,
    /// Serve the metrics on an address other hosts can reach (in cleartext); without it a
    /// non-loopback --metrics-listen is refused.
    #[arg(long, env = "FLOWLENS_METRICS_ALLOW_REMOTE")]
    metrics_allow_remote: bool,
    /// Memory for records not yet read by every reader (stdout, subscribers, exporters),
    /// shared by all of them: a reader loses records only when it falls this far behind.
    /// About 200 bytes per record (256MiB: a burst of over 1 M records).
    #[arg(long, env = "FLOWLENS_BUFFER_MEMORY", default_value_t = ByteSize(defaults().hub.buffer_memory))]
    buffer_memory: ByteSize,
    /// Records kept in memory for subscribers' replay and resume after every reader has
    /// read them.
    #[arg(long, env = "FLOWLENS_REPLAY_RING", default_value_t = defaults().hub.ring_capacity as u32)]
    replay_ring: u32,
    /// No effect any more (accepted, whatever its value, with a warning): readers share
    /// --buffer-memory.
    #[arg(long, env = "FLOWLENS_SUBSCRIBER_QUEUE", hide = true)]
    subscriber_queue: Option<String>,
    /// No effect any more (accepted, whatever its value, with a warning): readers share
    /// --buffer-memory.
    #[arg(long, env = "FLOWLENS_OUTPUT_QUEUE", hide = true)]
    output_queue: Option<String>,
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
    #[arg(long, env = "FLOWLENS_IPFIX_MTU", default_value_t = defaults().ipfix.mtu)]
    ipfix_mtu: u16,
    /// UDP: how often IPFIX templates are sent again (a restarted collector waits this long).
    #[arg(long, env = "FLOWLENS_IPFIX_TEMPLATE_REFRESH", default_value_t = HumanDuration(defaults().ipfix.template_refresh))]
    ipfix_template_refresh: HumanDuration,
    /// Private enterprise number under which the timing metrics (handshake, latency, jitter,
    /// echo RTT) are exported; unset: they are not.
    #[arg(long, env = "FLOWLENS_IPFIX_ENTERPRISE")]
    ipfix_enterprise: Option<u32>,
    /// Kafka brokers to export every flow record to: HOST:PORT, comma-separated (the bootstrap
    /// list). One message per record, protobuf `flowlens.v1.FlowRecord`.
    #[arg(long = "kafka", value_name = "BROKERS", env = "FLOWLENS_KAFKA")]
    kafka: Option<Brokers>,
    /// Kafka topic the records go to (it must exist; flowlens does not create it).
    #[arg(long, value_name = "TOPIC", env = "FLOWLENS_KAFKA_TOPIC", default_value = DEFAULT_TOPIC)]
    kafka_topic: String,
    /// Compression of the Kafka record batches.
    #[arg(
        long,
        env = "FLOWLENS_KAFKA_COMPRESSION",
        default_value_t = Compression::default(),
        value_parser = clap::builder::PossibleValuesParser::new(Compression::ALL.map(|c| c.as_str()))
            .map(|s| s.parse::<Compression>().expect("a listed value"))
    )]
    kafka_compression: Compression,
    /// Speak TLS to the Kafka brokers, trusting the system's CAs (implied by --kafka-tls-ca,
    /// --kafka-tls-cert).
    #[arg(long, env = "FLOWLENS_KAFKA_TLS")]
    kafka_tls: bool,
    /// CA bundle (PEM) the Kafka brokers' certificates must chain to, instead of the system's.
    #[arg(long, value_name = "PEM", env = "FLOWLENS_KAFKA_TLS_CA")]
    kafka_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that require one. Needs --kafka-tls-key.
    #[arg(long, value_name = "PEM", env = "FLOWLENS_KAFKA_TLS_CERT")]
    kafka_tls_cert: Option<PathBuf>,
    /// Private key (PEM, unencrypted) of --kafka-tls-cert.
    #[arg(long, value_name = "PEM", env = "FLOWLENS_KAFKA_TLS_KEY")]
    kafka_tls_key: Option<PathBuf>,
    /// SASL mechanism for the Kafka brokers. The password comes from
    /// --kafka-sasl-password-file or the environment variable FLOWLENS_KAFKA_SASL_PASSWORD,
    /// never from a flag.
    #[arg(
        long,
        value_name = "MECHANISM",
        env = "FLOWLENS_KAFKA_SASL_MECHANISM",
        value_parser = clap::builder::PossibleValuesParser::new(["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
            .map(|s| s.parse::<SaslMechanism>().expect("a listed value")),
        ignore_case = true
    )]
    kafka_sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    #[arg(long, value_name = "USER", env = "FLOWLENS_KAFKA_SASL_USERNAME")]
    kafka_sasl_username: Option<String>,
    /// File holding the SASL password (one line; keep it readable by root only).
    #[arg(long, value_name = "FILE", env = "FLOWLENS_KAFKA_SASL_PASSWORD_FILE")]
    kafka_sasl_password_file: Option<PathBuf>,
    /// Any other librdkafka producer setting, KEY=VALUE (e.g. message.timeout.ms=600000).
    /// Repeatable, or several separated by ';' (librdkafka values may hold commas); applied
    /// last, so it overrides flowlens' own settings. Passwords are refused here.
    #[arg(
        long = "kafka-option",
        value_name = "KEY=VALUE",
        env = "FLOWLENS_KAFKA_OPTIONS",
        value_delimiter = ';'
    )]
    kafka_options: Vec<KafkaOption>,
    /// Check the flags and FLOWLENS_* variables (and the interfaces, addresses, TLS files,
    /// kernel, capabilities and pin directory they name) without loading anything; print
    /// the settings and exit 0, or the problem and exit 1.
    #[arg(long)]
    check_config: bool,
}

impl RunArgs {
    /// Flags given that no longer do anything, and what replaced them.
    fn deprecated(&self) -> Vec<String> {
        [
            ("--subscriber-queue", &self.subscriber_queue),
            ("--output-queue", &self.output_queue),
        ]
        .into_iter()
        .filter_map(|(flag, v)| v.as_ref().map(|_| flag))
        .map(|flag| {
            format!(
                "{flag} has no effect any more: every reader (stdout, each subscriber, each \
                 exporter) reads one shared buffer of records, bounded by --buffer-memory \
                 (now {}); remove {flag} (or its FLOWLENS_ variable)",
                self.buffer_memory
            )
        })
        .collect()
    }

    fn into_config(self) -> Result<Config> {
        let d = defaults();
        let kafka = KafkaFlags {
            brokers: self.kafka,
            topic: self.kafka_topic,
            compression: self.kafka_compression,
            tls: self.kafka_tls,
            tls_ca: self.kafka_tls_ca,
            tls_cert: self.kafka_tls_cert,
            tls_key: self.kafka_tls_key,
            sasl_mechanism: self.kafka_sasl_mechanism,
            sasl_username: self.kafka_sasl_username,
            sasl_password_file: self.kafka_sasl_password_file,
            sasl_password_env: std::env::var(PASSWORD_ENV).ok(),
            options: self.kafka_options,
        }
        .resolve()?;
        Ok(Config {
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
                scan_threads: self.scan_threads,
                ..d.poller
            },
            capacities: Capacities {
                flows: self.max_flows,
                tcp: self
                    .max_tcp_flows
                    .unwrap_or_else(|| Capacities::tcp_for(self.max_flows)),
                icmp: self
                    .max_icmp_flows
                    .unwrap_or_else(|| Capacities::icmp_for(self.max_flows)),
                owner: self
                    .max_local_flows
                    .unwrap_or_else(|| Capacities::owner_for(self.max_flows)),
            },
            hub: HubConfig {
                buffer_memory: self.buffer_memory.0,
                ring_capacity: self.replay_ring as usize,
            },
            output: match self.output {
                Output::Table => Some(Format::Table),
                Output::Json => Some(Format::Json),
                Output::None => None,
            },
            table: TableStyle {
                wide: self.wide,
                legend: self.legend,
                width: render::stdout_width(),
                ..TableStyle::default()
            },
            pin_dir: self.pin_dir.0.map(PathBuf::from),
            grpc_listen: self.grpc_listen.0,
            grpc: GrpcConfig {
                tls_cert: self.grpc_tls_cert,
                tls_key: self.grpc_tls_key,
                client_ca: self.grpc_client_ca,
                allow_insecure: self.grpc_allow_insecure,
                socket_mode: self.grpc_socket_mode,
                socket_group: self.grpc_socket_group,
                max_subscribers: self.grpc_max_subscribers as usize,
                max_connections: self.grpc_max_connections as usize,
                max_connections_per_source: self.grpc_max_connections_per_source as usize,
                handshake_timeout: self.grpc_handshake_timeout.0,
                request_timeout: d.grpc.request_timeout,
                max_streams_per_connection: self.grpc_max_streams_per_connection,
                max_request_size: self.grpc_max_request_size as usize,
                request_limits: RequestLimits {
                    max_filters: self.grpc_max_filters as usize,
                    max_string_len: self.grpc_max_string_length as usize,
                },
                keepalive_interval: self.grpc_keepalive_interval.0,
                keepalive_timeout: self.grpc_keepalive_timeout.0,
                tcp_keepalive: self.grpc_tcp_keepalive.0,
                idle_timeout: self.grpc_idle_timeout.0,
            },
            metrics_listen: self.metrics_listen.0,
            metrics_allow_remote: self.metrics_allow_remote,
            observer_id: self.observer_id.or(d.observer_id),
            ipfix: IpfixSettings {
                destinations: self.ipfix,
                observation_domain: self.ipfix_observation_domain,
                mtu: self.ipfix_mtu,
                template_refresh: self.ipfix_template_refresh.0,
                enterprise: self.ipfix_enterprise,
            },
            kafka,
            ..d
        })
    }
}

fn main() {
    // An empty variable is an unset one: `FLOWLENS_X=` in /etc/default/flowlens (a line
    // uncommented as shipped) means "the default", as it reads, not an empty value.
    for (k, v) in std::env::vars_os() {
        if v.is_empty() && k.to_string_lossy().starts_with("FLOWLENS_") {
            // Nothing else runs yet: no other thread reads the environment.
            std::env::remove_var(k);
        }
    }
    let cli = parse().unwrap_or_else(|e| match env_source(&e) {
        Some(var) => {
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            eprint!("error: environment variable {var}: {text}");
            std::process::exit(2);
        }
        None => e.exit(),
    });
    env_logger::Builder::new()
        .parse_filters(&std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log_level.clone()))
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
    let res = match cli.command {
        Command::Run(args) => {
            for note in args.deprecated() {
                warn!("{note}");
            }
            let check = args.check_config;
            args.into_config()
                .and_then(|cfg| if check { check_config(&cfg) } else { run(cfg) })
        }
        Command::Watch(args) => watch::run(*args),
        Command::Top(args) => top::run(*args),
        Command::Flows(args) => flows::run(*args),
        Command::Status(args) => status::run(*args),
    };
    if let Err(e) = res {
        // Once, on stderr (the journal under systemd): not also through the logger.
        eprintln!("flowlens: {}", flowlens::fatal::describe(&e));
        std::process::exit(1);
    }
}

/// The command line, its values checked against their documented ranges
/// (`flowlens::ranges`): a value out of range ends the process with one sentence.
fn parse() -> Result<Cli, clap::Error> {
    let mut cmd = flowlens::ranges::prepare(Cli::command());
    let mut matches = cmd.try_get_matches_from_mut(std::env::args_os())?;
    if let Some((name, sub)) = matches.subcommand() {
        let sub_cmd = cmd
            .find_subcommand(name)
            .expect("a parsed subcommand exists");
        if let Err(why) = flowlens::ranges::check(sub_cmd, sub) {
            eprintln!("flowlens: {why}");
            std::process::exit(2);
        }
    }
    Cli::from_arg_matches_mut(&mut matches)
}

/// The variable a rejected value came from, when the flag was not on the command line
/// but its environment variable is set: clap's message names only the flag.
fn env_source(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    use clap::CommandFactory;
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let cmd = Cli::command();
    let found = std::iter::once(&cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long))?;
    let short = found.get_short().map(|c| format!("-{c}"));
    let given = std::env::args().skip(1).any(|a| {
        a == format!("--{long}")
            || a.starts_with(&format!("--{long}="))
            || short.as_deref().is_some_and(|s| a.starts_with(s))
    });
    let var = found.get_env()?.to_str()?;
    (!given && std::env::var_os(var).is_some()).then(|| var.to_owned())
}

/// Runs the agent until SIGINT or SIGTERM.
fn run(cfg: Config) -> Result<()> {
    // Installed first: a signal during start-up is not lost, and ends the run once started.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing SIGINT/SIGTERM/SIGHUP handlers")?;
    // Said once the flags are known to be good, and before the table's header: the output
    // thread writes that as soon as the agent starts.
    if cfg.output.is_some() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        Agent::check(&cfg)?;
        eprintln!("{}", start_note(&cfg));
    }
    let agent = Agent::start(cfg)?;
    let tls = agent.grpc_tls();
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::Builder::new()
        .name("flowlens-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig != SIGHUP {
                    info!("received signal {sig}, shutting down");
                    break;
                }
                // SIGHUP: new connections get the certificate files as they are now.
                match tls.as_ref().map(|t| t.reload()) {
                    None => info!("SIGHUP: no gRPC TLS to reload"),
                    Some(Ok(())) => info!("SIGHUP: reloaded the gRPC TLS certificate files"),
                    Some(Err(e)) => warn!(
                        "SIGHUP: keeping the gRPC TLS settings in use: {}",
                        flowlens::fatal::describe(&e)
                    ),
                }
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
        Some(a) if Some(a) == defaults().grpc_listen.as_deref() => {
            "run `flowlens top` or `flowlens flows`".to_owned()
        }
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

/// `run --check-config`: what would run, or why it would not.
fn check_config(cfg: &Config) -> Result<()> {
    Agent::check(cfg)?;
    let or = |v: &Option<String>, none: &str| v.clone().unwrap_or_else(|| none.to_owned());
    let list = |v: &[String], none: &str| {
        if v.is_empty() {
            none.to_owned()
        } else {
            v.join(", ")
        }
    };
    let p = &cfg.poller;
    let d = |d| humantime::format_duration(d).to_string();
    println!("flowlens: the configuration is good; `flowlens run` would use:");
    println!(
        "  interfaces     {} (excluding {})",
        list(
            &cfg.interfaces,
            "every interface that is up, except loopback"
        ),
        list(&cfg.exclude_interfaces, "none")
    );
    println!(
        "  timeouts       idle tcp {} udp {} icmp {} other {}, active {}, TCP close grace {}, poll every {}",
        d(p.idle_tcp),
        d(p.idle_udp),
        d(p.idle_icmp),
        d(p.idle_other),
        d(p.active_timeout),
        d(p.tcp_close_grace),
        d(p.poll_interval)
    );
    println!(
        "  maps           {} flows, {} TCP, {} ICMP, {} local ends",
        cfg.capacities.flows, cfg.capacities.tcp, cfg.capacities.icmp, cfg.capacities.owner
    );
    for w in cfg.capacities.shortfalls() {
        println!("  warning        {w}");
    }
    println!(
        "  stdout         {}",
        match cfg.output {
            Some(Format::Table) => "a table line per record",
            Some(Format::Json) => "a JSON object per record",
            None => "nothing",
        }
    );
    println!("  gRPC           {}", or(&cfg.grpc_listen, "off"));
    println!("  metrics        {}", or(&cfg.metrics_listen, "off"));
    println!(
        "  pins           {}",
        cfg.pin_dir
            .as_ref()
            .map_or_else(|| "off".to_owned(), |p| p.display().to_string())
    );
    let ipfix: Vec<String> = cfg
        .ipfix
        .destinations
        .iter()
        .map(|d| d.to_string())
        .collect();
    println!("  IPFIX          {}", list(&ipfix, "none"));
    println!(
        "  observer       {}",
        or(&cfg.observer_id, &flowlens::poller::host_name())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_and_duration_flag_has_a_documented_range() {
        let cmd = flowlens::ranges::prepare(Cli::command());
        assert_eq!(
            flowlens::ranges::unchecked(&cmd),
            Vec::<String>::new(),
            "add these flags to flowlens::ranges::TABLE"
        );
        // And every line of the table names a flag that exists.
        let mut longs = Vec::new();
        for sub in cmd.get_subcommands() {
            longs.extend(sub.get_arguments().filter_map(|a| a.get_long()));
        }
        for (long, _) in flowlens::ranges::TABLE {
            assert!(longs.contains(long), "ranges::TABLE names no flag --{long}");
        }
        // The defaults lie inside their ranges (given on the command line, as `check`
        // skips defaults).
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                let (Some(long), Some(default)) =
                    (arg.get_long(), arg.get_default_values().first())
                else {
                    continue;
                };
                if !arg.get_action().takes_values() {
                    continue;
                }
                let given: Vec<std::ffi::OsString> = vec![
                    "flowlens".into(),
                    sub.get_name().into(),
                    format!("--{long}").into(),
                    default.into(),
                ];
                let m = cmd.clone().try_get_matches_from(given).expect("parses");
                let (_, matches) = m.subcommand().unwrap();
                assert_eq!(
                    flowlens::ranges::check(sub, matches),
                    Ok(()),
                    "{} --{long}",
                    sub.get_name()
                );
            }
        }
    }
}
