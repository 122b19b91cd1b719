//! The flowlens command line: `run` the collector, `watch` a running one.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use flowlens::attach::{Attacher, IfNames, Mode, ProgramFds, Selector};
use flowlens::datapath::{Capacities, Datapath};
use flowlens::flow::FlowRecord;
use flowlens::ipfix::{self, Destination, IpfixConfig, IpfixStats};
use flowlens::metrics;
use flowlens::poller::{Poller, PollerConfig};
use flowlens::preflight;
use flowlens::service;
use flowlens::status::Status;
use flowlens::stream::{Hub, HubConfig};
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
        default_value = "info"
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath, attach to interfaces, and report flows.
    Run(Box<RunArgs>),
    /// Subscribe to a running collector and print its flows.
    Watch(Box<WatchArgs>),
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

fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

fn capacity(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
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
    #[arg(long, env = "FLOWLENS_ATTACH_MODE", value_enum, default_value_t = AttachMode::Auto)]
    attach_mode: AttachMode,
    /// How often the flow maps are read.
    #[arg(long, env = "FLOWLENS_POLL_INTERVAL", value_parser = duration, default_value = "1s")]
    poll_interval: Duration,
    /// A TCP flow with no packet for this long ends.
    #[arg(long, env = "FLOWLENS_IDLE_TIMEOUT_TCP", value_parser = duration, default_value = "30s")]
    idle_timeout_tcp: Duration,
    /// A UDP flow with no packet for this long ends.
    #[arg(long, env = "FLOWLENS_IDLE_TIMEOUT_UDP", value_parser = duration, default_value = "30s")]
    idle_timeout_udp: Duration,
    /// An ICMP/ICMPv6 flow with no packet for this long ends.
    #[arg(long, env = "FLOWLENS_IDLE_TIMEOUT_ICMP", value_parser = duration, default_value = "10s")]
    idle_timeout_icmp: Duration,
    /// Any other IP protocol's flow with no packet for this long ends.
    #[arg(long, env = "FLOWLENS_IDLE_TIMEOUT_OTHER", value_parser = duration, default_value = "30s")]
    idle_timeout_other: Duration,
    /// After FIN in both directions or RST, a TCP flow ends once quiet this long.
    #[arg(long, env = "FLOWLENS_TCP_CLOSE_GRACE", value_parser = duration, default_value = "2s")]
    tcp_close_grace: Duration,
    /// A long flow is reported (with counter deltas) every this long and keeps going.
    #[arg(long, env = "FLOWLENS_ACTIVE_TIMEOUT", value_parser = duration, default_value = "60s")]
    active_timeout: Duration,
    /// Capacity of the base flow map (every flow).
    #[arg(long, env = "FLOWLENS_MAX_FLOWS", value_parser = capacity, default_value = "65536")]
    max_flows: u32,
    /// Capacity of the TCP extension map.
    #[arg(long, env = "FLOWLENS_MAX_TCP_FLOWS", value_parser = capacity, default_value = "32768")]
    max_tcp_flows: u32,
    /// Capacity of the ICMP extension map.
    #[arg(long, env = "FLOWLENS_MAX_ICMP_FLOWS", value_parser = capacity, default_value = "8192")]
    max_icmp_flows: u32,
    /// What to print on stdout for each flow record.
    #[arg(long, env = "FLOWLENS_OUTPUT", value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Where maps and TCX links are pinned (bpffs), so a restarted agent after
    /// a crash continues the flows in progress; "off" pins nothing.
    #[arg(long, env = "FLOWLENS_PIN_DIR", default_value = "/sys/fs/bpf/flowlens")]
    pin_dir: String,
    /// gRPC listen address: HOST:PORT, unix:/path, or "off".
    #[arg(long, env = "FLOWLENS_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    grpc_listen: String,
    /// Prometheus self-metrics listen address (HOST:PORT), or "off".
    #[arg(
        long,
        env = "FLOWLENS_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    metrics_listen: String,
    /// Records kept in memory for subscribers' replay.
    #[arg(long, env = "FLOWLENS_REPLAY_RING", value_parser = capacity, default_value = "10000")]
    replay_ring: u32,
    /// Records queued per subscriber before it starts losing them (and is told so).
    #[arg(long, env = "FLOWLENS_SUBSCRIBER_QUEUE", value_parser = capacity, default_value = "4096")]
    subscriber_queue: u32,
    /// IPFIX collector to export every flow record to: udp://HOST:PORT or tcp://HOST:PORT
    /// (port 4739 when omitted). Repeatable.
    #[arg(long = "ipfix", env = "FLOWLENS_IPFIX", value_delimiter = ',')]
    ipfix: Vec<Destination>,
    /// IPFIX observation domain id of this host's messages.
    #[arg(long, env = "FLOWLENS_IPFIX_OBSERVATION_DOMAIN", default_value_t = 0)]
    ipfix_observation_domain: u32,
    /// Path MTU to the IPFIX collectors: each message fits one IP packet.
    #[arg(long, env = "FLOWLENS_IPFIX_MTU", value_parser = ipfix::parse_mtu, default_value_t = ipfix::DEFAULT_MTU)]
    ipfix_mtu: u16,
    /// UDP: how often IPFIX templates are sent again (a restarted collector waits this long).
    #[arg(long, env = "FLOWLENS_IPFIX_TEMPLATE_REFRESH", value_parser = duration, default_value = "60s")]
    ipfix_template_refresh: Duration,
    /// Private enterprise number under which the timing metrics (handshake, latency, jitter,
    /// echo RTT) are exported; unset: they are not.
    #[arg(long, env = "FLOWLENS_IPFIX_ENTERPRISE")]
    ipfix_enterprise: Option<u32>,
}

/// One IPFIX exporter's queue: batches of records, lost (and counted) when it is full.
struct IpfixSink {
    tx: crossbeam_channel::Sender<Vec<Arc<FlowRecord>>>,
    stats: Arc<IpfixStats>,
}

/// Starts one exporter thread per `--ipfix` destination.
fn start_ipfix(args: &RunArgs) -> Result<(Vec<IpfixSink>, Vec<thread::JoinHandle<()>>)> {
    let (mut sinks, mut threads) = (Vec::new(), Vec::new());
    for dest in &args.ipfix {
        let cfg = IpfixConfig {
            destination: dest.clone(),
            observation_domain: args.ipfix_observation_domain,
            mtu: args.ipfix_mtu,
            template_refresh: args.ipfix_template_refresh,
            enterprise: args.ipfix_enterprise,
        };
        let (tx, rx) = crossbeam_channel::bounded(4096);
        let stats = Arc::new(IpfixStats::default());
        threads.push(ipfix::spawn(cfg, rx, stats.clone()).context("--ipfix")?);
        info!("exporting IPFIX to {dest}");
        sinks.push(IpfixSink { tx, stats });
    }
    Ok((sinks, threads))
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log_level.clone()))
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
    let res = match cli.command {
        Command::Run(args) => run(*args),
        Command::Watch(args) => watch::run(*args),
    };
    if let Err(e) = res {
        error!("{e:#}");
        eprintln!("flowlens: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: RunArgs) -> Result<()> {
    let selector = Selector::new(&args.interfaces, &args.exclude_interfaces)
        .context("--interface/--exclude-interface")?;
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).context("installing SIGINT/SIGTERM handlers")?;

    preflight::check_btf()?;
    preflight::check_capabilities()?;
    let pin_root = (args.pin_dir != "off").then(|| PathBuf::from(&args.pin_dir));
    let _pin_lock = match &pin_root {
        Some(root) => {
            preflight::ensure_bpffs(root)?;
            Some(preflight::lock_pin_root(root)?)
        }
        None => None,
    };

    let mut dp = Datapath::load_pinned(
        Capacities {
            flows: args.max_flows,
            tcp: args.max_tcp_flows,
            icmp: args.max_icmp_flows,
        },
        pin_root.as_deref(),
    )
    .context("loading the flow datapath")?;
    let res = collect(&args, &selector, &mut signals, &mut dp);
    // A start-up failure must not leave pins behind, unless they hold the
    // flows of an agent that crashed: those wait for a successful restart.
    if res.is_err() && dp.reused_flows().is_none() {
        let _ = dp.unpin();
    }
    if let Some(root) = &pin_root {
        // Gone only when empty: pins kept for a restart stay.
        let _ = std::fs::remove_dir(root);
    }
    res
}

/// Attaches, polls and serves until SIGINT/SIGTERM, then shuts down in order.
fn collect(
    args: &RunArgs,
    selector: &Selector,
    signals: &mut Signals,
    dp: &mut Datapath,
) -> Result<()> {
    let maps = dp.maps().context("opening map handles")?;
    let mode = match args.attach_mode {
        AttachMode::Auto => Mode::Auto,
        AttachMode::Tcx => Mode::Tcx,
        AttachMode::Tc => Mode::Tc,
    };
    let ifnames = IfNames::default();
    let mut attacher = Attacher::new(
        ProgramFds::of(dp).context("preparing attachment")?,
        mode,
        ifnames.clone(),
    );
    if let Some(dir) = dp.pin_dir() {
        attacher.pin_links(dir.join("links")).context("--pin-dir")?;
    }
    let first = attacher.sync(selector).context("attaching to interfaces")?;
    let names: Vec<String> = attacher.attached().into_iter().map(|(_, n)| n).collect();
    if !first.failed.is_empty() && names.is_empty() {
        bail!(
            "could not attach to any selected interface: {:?}",
            first.failed
        );
    }
    let missing: Vec<&String> = args
        .interfaces
        .iter()
        .zip(&selector.include)
        .filter(|(_, p)| p.is_literal() && !names.iter().any(|n| p.matches(n)))
        .map(|(s, _)| s)
        .collect();
    if !missing.is_empty() {
        bail!("--interface: no such interface {missing:?} (see `ip link`)");
    }
    if names.is_empty() {
        warn!("no interface matches yet; waiting for one to appear");
    } else {
        info!("monitoring {}", names.join(", "));
    }

    let status = Arc::new(Status::new());
    let hub = Hub::new(HubConfig {
        ring_capacity: args.replay_ring as usize,
        subscriber_queue: args.subscriber_queue as usize,
    });
    let grpc = if args.grpc_listen == "off" {
        None
    } else {
        let h = service::spawn(&args.grpc_listen, hub.clone(), status.clone())
            .context("--grpc-listen")?;
        info!("gRPC on {}", args.grpc_listen);
        Some(h)
    };
    let metrics = if args.metrics_listen == "off" {
        None
    } else {
        let h = metrics::spawn(&args.metrics_listen, status.clone(), hub.clone())
            .context("--metrics-listen")?;
        info!("metrics on http://{}/metrics", h.local_addr());
        Some(h)
    };
    let (ipfix_sinks, ipfix_threads) = start_ipfix(args)?;
    let (tx, rx) = crossbeam_channel::bounded::<FlowRecord>(65_536);
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let poller = Poller::new(
        maps,
        PollerConfig {
            poll_interval: args.poll_interval,
            idle_tcp: args.idle_timeout_tcp,
            idle_udp: args.idle_timeout_udp,
            idle_icmp: args.idle_timeout_icmp,
            idle_other: args.idle_timeout_other,
            tcp_close_grace: args.tcp_close_grace,
            active_timeout: args.active_timeout,
            ..PollerConfig::default()
        },
        tx,
        status.clone(),
        ifnames,
    );
    let poll_thread = thread::Builder::new()
        .name("poller".into())
        .spawn(move || poller.run(stop_rx))
        .context("spawning the poller thread")?;
    let output = args.output;
    let out_hub = hub.clone();
    let out_thread = thread::Builder::new()
        .name("output".into())
        .spawn(move || print_records(rx, output, &out_hub, &ipfix_sinks))
        .context("spawning the output thread")?;

    // Interfaces come and go: re-check twice a second until told to stop.
    loop {
        if let Some(sig) = signals.pending().next() {
            info!("received signal {sig}, shutting down");
            break;
        }
        if let Err(e) = attacher.sync(selector) {
            warn!("interface sync: {e}");
        }
        thread::sleep(Duration::from_millis(500));
    }

    // Detach first so no packet lands after the final flush.
    attacher.detach_all();
    drop(stop_tx);
    match poll_thread.join() {
        Ok(r) => r.context("poller")?,
        Err(_) => bail!("the poller thread panicked"),
    }
    if out_thread.join().is_err() {
        bail!("the output thread panicked");
    }
    // The output thread held the exporters' senders: they send what is queued and stop.
    for t in ipfix_threads {
        if t.join().is_err() {
            bail!("an IPFIX exporter thread panicked");
        }
    }
    // Every flushed record is in the subscribers' queues: end their streams.
    hub.close();
    if let Some(g) = grpc {
        g.shutdown().context("stopping the gRPC service")?;
    }
    if let Some(m) = metrics {
        m.shutdown();
    }
    // Every flow was flushed: nothing in the pinned maps is worth keeping.
    dp.unpin().context("removing map pins")?;
    Ok(())
}

/// Prints each record and hands it to the IPFIX exporters and the subscriber hub.
fn print_records(
    rx: crossbeam_channel::Receiver<FlowRecord>,
    output: Output,
    hub: &Hub,
    ipfix: &[IpfixSink],
) {
    let stdout = std::io::stdout();
    for rec in rx {
        print_record(&stdout, &rec, output);
        if !ipfix.is_empty() {
            let shared = Arc::new(rec.clone());
            for s in ipfix {
                if s.tx.try_send(vec![shared.clone()]).is_err() {
                    s.stats.records_lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        hub.publish(rec);
    }
}

fn print_record(stdout: &std::io::Stdout, rec: &FlowRecord, output: Output) {
    let mut out = stdout.lock();
    let res = match output {
        Output::Table => writeln!(out, "{rec}"),
        Output::Json => match serde_json::to_string(rec) {
            Ok(s) => writeln!(out, "{s}"),
            Err(e) => {
                warn!("encoding a record: {e}");
                Ok(())
            }
        },
        Output::None => Ok(()),
    };
    // stdout closed (piped into `head`): keep going for subscribers.
    let _ = res.and_then(|()| out.flush());
}
