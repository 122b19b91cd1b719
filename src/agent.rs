//! The agent: one owner for the datapath, the attacher, the poller, the hub and every sink, wired kernel -> poller -> hub -> sinks, with one shutdown order.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};

use crate::admission::{self, Episode};
use crate::config::Config;
use crate::hub::{Hub, SinkKind};
use crate::kernel::attach::{Attacher, IfNames, ProgramFds, Selector};
use crate::kernel::cgroup::{self, CgroupNames, Hierarchy};
use crate::kernel::datapath::{Datapath, DatapathError, FlowMaps};
use crate::kernel::preflight::{self, PinLock};
use crate::metrics::http::HttpLimits;
use crate::metrics::{self, MetricsHandle};
use crate::poller::{KernelTable, PollError, Poller};
use crate::record::flow::FlowRecord;
use crate::record::snapshot::SnapshotSlot;
use crate::sinks::grpc::{self, GrpcEndpoint, ListenAddr, ServiceHandle};
use crate::sinks::ipfix::{self, IpfixStats};
use crate::sinks::kafka::{self, KafkaStats, Producer};
use crate::sinks::stdout::{self, OutputHandle};
use crate::status::Status;

/// Batches of records (each at most a poll's, and at most 1,024 records: 64 Ki records
/// in all) the poller may hand the hub before it waits for the fanout; the fanout never
/// waits on a sink, so this only fills when the fanout itself falls behind.
const RECORD_CHANNEL: usize = 64;
/// How long shutdown waits for stdout to take another record before it leaves it behind
/// (nobody reads it); a slow reader is waited for as long as it keeps reading.
const OUTPUT_STALL: Duration = Duration::from_secs(2);

/// The poller thread and the channel whose disconnection stops it.
type PollerThread = (Sender<()>, JoinHandle<Result<(), PollError>>);

/// A running collector. Dropping it without `shutdown` still stops every thread, but
/// does not flush flows.
pub struct Agent {
    cfg: Config,
    selector: Selector,
    attacher: Attacher,
    hub: Hub,
    status: Arc<Status>,
    poller: Option<PollerThread>,
    fanout: Option<JoinHandle<()>>,
    output: Option<OutputHandle>,
    grpc: Option<ServiceHandle>,
    metrics: Option<MetricsHandle>,
    runtime: Option<tokio::runtime::Runtime>,
    exporters: Vec<JoinHandle<()>>,
    /// Interface syncs failing in a row: logged when it starts and when it ends.
    sync_failures: Episode,
    kafka: Option<JoinHandle<()>>,
    // Declared last: dropped after everything that uses the maps.
    dp: Datapath,
    _pin_lock: Option<PinLock>,
}

impl Agent {
    /// Validates the configuration, checks the host, loads the datapath, binds the
    /// listeners, attaches and starts every thread. Nothing is attached when a check or
    /// a listener fails, and a failed start leaves no pins behind.
    pub fn start(cfg: Config) -> Result<Agent> {
        let Checked {
            selector,
            grpc: grpc_addr,
        } = Self::check(&cfg)?;
        let observer = cfg
            .observer_id
            .clone()
            .unwrap_or_else(crate::poller::host_name);
        // librdkafka checks its settings (and TLS files) when the producer is made, before
        // anything is loaded; it connects in the background.
        let kafka = cfg
            .kafka
            .clone()
            .map(|k| {
                let stats = Arc::new(KafkaStats::default());
                Producer::new(k, &format!("flowlens-{observer}"), stats.clone()).map(|p| (p, stats))
            })
            .transpose()
            .context("--kafka")?;
        let pin_lock = match &cfg.pin_dir {
            Some(root) => {
                preflight::ensure_bpffs(root)?;
                Some(preflight::lock_pin_root(root)?)
            }
            None => None,
        };
        for w in cfg.capacities.shortfalls() {
            warn!("{w}");
        }
        let mut dp = match Datapath::load_pinned(cfg.capacities, cfg.pin_dir.as_deref()) {
            Ok(dp) => dp,
            Err(e) => {
                remove_empty_pin_dirs(&cfg.pin_dir);
                return Err(explain_load_error(e, &cfg));
            }
        };
        let cgroups = attribute_sockets(&mut dp);
        match Self::wire(cfg.clone(), selector, grpc_addr, kafka, &dp, cgroups) {
            Ok(parts) => Ok(parts.assemble(dp, pin_lock)),
            Err(e) => {
                // A start-up failure must not leave pins behind, unless they hold the
                // flows of an agent that crashed: those wait for a successful restart.
                if dp.reused_flows().is_none() {
                    let _ = dp.unpin();
                }
                remove_pin_root(&cfg.pin_dir);
                Err(e)
            }
        }
    }

    /// Everything that can be checked without loading or attaching anything: the flags
    /// against each other, the interfaces named, listen addresses and TLS files, the
    /// kernel's BTF, the capabilities held and the pin directory. `start` runs it first;
    /// `run --check-config` runs only it.
    pub fn check(cfg: &Config) -> Result<Checked> {
        let selector = Selector::new(&cfg.interfaces, &cfg.exclude_interfaces)
            .context("--interface/--exclude-interface")?;
        if let Some(both) = cfg
            .interfaces
            .iter()
            .find(|i| cfg.exclude_interfaces.contains(i))
        {
            bail!(
                "--interface {both} and --exclude-interface {both} cancel each other: \
                 nothing would be attached to {both}; drop one of them"
            );
        }
        let grpc = cfg
            .grpc_listen
            .as_deref()
            .map(|l| -> Result<GrpcEndpoint> {
                let addr = l.parse::<ListenAddr>().context("--grpc-listen")?;
                GrpcEndpoint::new(addr, &cfg.grpc)
            })
            .transpose()?;
        if cfg.grpc_listen.is_none() {
            let g = &cfg.grpc;
            let given = [
                ("--grpc-tls-cert", g.tls_cert.is_some()),
                ("--grpc-tls-key", g.tls_key.is_some()),
                ("--grpc-client-ca", g.client_ca.is_some()),
                ("--grpc-socket-group", g.socket_group.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                bail!(
                    "{flag} is set but --grpc-listen is off: nothing would use it; give \
                     --grpc-listen, or drop {flag}"
                );
            }
        }
        if let Some(m) = &cfg.metrics_listen {
            let addr = m
                .parse::<std::net::SocketAddr>()
                .with_context(|| format!("--metrics-listen {m:?}: expected HOST:PORT or off"))?;
            if !addr.ip().is_loopback() && !cfg.metrics_allow_remote {
                bail!(
                    "--metrics-listen {m}: refusing to serve the metrics in cleartext to other \
                     hosts; listen on 127.0.0.1 (and let a local agent or a reverse proxy with \
                     TLS forward them), or give --metrics-allow-remote"
                );
            }
        }
        preflight::check_btf()?;
        preflight::check_capabilities()?;
        if let Some(root) = &cfg.pin_dir {
            preflight::check_bpffs(root)?;
            preflight::check_pin_dir(root)?;
        }
        check_interfaces_exist(cfg, &selector)?;
        Ok(Checked { selector, grpc })
    }

    fn wire(
        cfg: Config,
        selector: Selector,
        grpc_addr: Option<GrpcEndpoint>,
        kafka: Option<(Producer, Arc<KafkaStats>)>,
        dp: &Datapath,
        cgroups: CgroupNames,
    ) -> Result<Parts> {
        let status = Arc::new(Status::new());
        let hub = Hub::new(cfg.hub);
        // One runtime serves gRPC (and its subscribers' tasks) and the metrics endpoint.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("flowlens-rt")
            .enable_all()
            .build()
            .context("building the tokio runtime")?;
        let snapshots = SnapshotSlot::new(cfg.poller.poll_interval);
        let (grpc_addr, metrics_limits) = fit_connections(&cfg, grpc_addr)?;
        // Listeners first: a port in use fails before anything is attached.
        let grpc_tls = grpc_addr.as_ref().map(GrpcEndpoint::is_tls);
        let grpc = grpc_addr
            .map(|a| {
                grpc::spawn_in(
                    a,
                    hub.clone(),
                    status.clone(),
                    snapshots.clone(),
                    runtime.handle(),
                )
            })
            .transpose()
            .context("--grpc-listen")?;
        let metrics = cfg
            .metrics_listen
            .as_deref()
            .map(|m| {
                metrics::http::spawn(
                    m,
                    runtime.handle(),
                    metrics::renderer(status.clone(), hub.clone()),
                    metrics_limits,
                )
            })
            .transpose()
            .context("--metrics-listen")?;
        if let (Some(g), Some(tls)) = (&cfg.grpc_listen, grpc_tls) {
            let how = match (tls, cfg.grpc.client_ca.is_some()) {
                (false, _) => "",
                (true, false) => " (TLS)",
                (true, true) => " (TLS, client certificates required)",
            };
            info!("gRPC on {g}{how}");
        }
        if let Some(m) = &metrics {
            info!("metrics on http://{}/metrics", m.local_addr());
            if !m.local_addr().ip().is_loopback() {
                warn!("metrics served in cleartext to other hosts (--metrics-allow-remote)");
            }
        }
        if let Some(tls) = grpc.as_ref().and_then(ServiceHandle::tls) {
            status.set_tls_cert_expiry(Some(tls.not_after()));
            if let Some(w) = tls.expiry_warning(std::time::SystemTime::now()) {
                warn!("{w}");
            }
        }

        let ifnames = IfNames::default();
        let mut attacher = Attacher::new(
            ProgramFds::of(dp).context("preparing attachment")?,
            cfg.attach_mode,
            ifnames.clone(),
        );
        if let Some(dir) = dp.pin_dir() {
            attacher.pin_links(dir.join("links")).context("--pin-dir")?;
        }
        let first = attacher
            .sync(&selector)
            .context("attaching to interfaces")?;
        let names: Vec<String> = attacher.attached().into_iter().map(|(_, n, _)| n).collect();
        if !first.failed.is_empty() && names.is_empty() {
            bail!(
                "could not attach to any selected interface: {:?}",
                first.failed
            );
        }
        if names.is_empty() {
            warn!("no interface matches yet; waiting for one to appear");
        } else {
            info!("monitoring {}", names.join(", "));
        }

        publish_interfaces(&attacher, &status);
        // Sinks register before the poller starts, so they see every record.
        let mut exporters = Vec::new();
        for exp in cfg.ipfix.exporters() {
            let dest = exp.destination.to_string();
            let stats = Arc::new(IpfixStats::default());
            let rx = hub.add_sink(SinkKind::Export, &dest);
            let thread = ipfix::spawn(exp, rx, stats.clone()).context("--ipfix")?;
            status.add_exporter(dest.clone(), stats);
            info!("exporting IPFIX to {dest}");
            exporters.push(thread);
        }
        let kafka = kafka
            .map(|(producer, stats)| -> Result<JoinHandle<()>> {
                let name = cfg.kafka.as_ref().map(|k| k.name()).unwrap_or_default();
                if let Some(w) = cfg.kafka.as_ref().and_then(|k| k.warning()) {
                    warn!("{w}");
                }
                let rx = hub.add_sink(SinkKind::Export, &name);
                let thread = kafka::spawn(producer, rx).context("--kafka")?;
                status.set_kafka(name.clone(), stats);
                info!("exporting to Kafka {name}");
                Ok(thread)
            })
            .transpose()?;
        let output = cfg
            .output
            .map(|format| {
                stdout::spawn(hub.add_sink(SinkKind::Output, "stdout"), format, cfg.table)
            })
            .transpose()
            .context("spawning the output thread")?;
        let (tx, rx) = crossbeam_channel::bounded::<Vec<FlowRecord>>(RECORD_CHANNEL);
        let fanout = hub.spawn_fanout(rx).context("spawning the fanout thread")?;
        let table = KernelTable::new(dp.maps().context("opening map handles")?);
        let observer = cfg
            .observer_id
            .clone()
            .unwrap_or_else(crate::poller::host_name);
        status.set_observer(&observer);
        let poller = Poller::new(table, cfg.poller, tx, status.clone(), ifnames)
            .with_observer(&observer)
            .with_snapshots(snapshots)
            .with_cgroups(cgroups);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let poll_thread = std::thread::Builder::new()
            .name("flowlens-poller".into())
            .spawn(move || poller.run(stop_rx))
            .context("spawning the poller thread")?;
        Ok(Parts {
            cfg,
            selector,
            attacher,
            hub,
            status,
            poller: (stop_tx, poll_thread),
            fanout,
            output,
            grpc,
            metrics,
            runtime,
            exporters,
            kafka,
        })
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// New handles on the flow maps, to look at them from outside.
    pub fn maps(&self) -> Result<FlowMaps> {
        self.dp.maps().context("opening map handles")
    }

    /// The gRPC server's TLS, to re-read its certificate files (on SIGHUP).
    pub fn grpc_tls(&self) -> Option<Arc<crate::tls::ServerTls>> {
        self.grpc.as_ref().and_then(ServiceHandle::tls)
    }

    /// The gRPC listener's TCP address, if it listens on TCP.
    pub fn grpc_addr(&self) -> Option<std::net::SocketAddr> {
        self.grpc.as_ref().and_then(ServiceHandle::local_addr)
    }

    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsHandle::local_addr)
    }

    /// Attaches to interfaces that appeared and drops those that went away. A sync that
    /// keeps failing is logged when it starts failing and when it works again.
    pub fn sync_interfaces(&mut self) {
        match self.attacher.sync(&self.selector) {
            Err(e) if self.sync_failures.event() => {
                warn!(
                    "interface sync: {e} (retried every {:?}; said again when it works)",
                    self.cfg.resync_interval
                );
            }
            Err(e) => log::debug!("interface sync: {e}"),
            Ok(_) => {
                if let Some((n, over)) = self.sync_failures.end() {
                    info!("interface sync works again after {n} failures over {over:?}");
                }
            }
        }
        publish_interfaces(&self.attacher, &self.status);
    }

    /// Keeps the certificate's expiry in the metrics current (SIGHUP may change it) and
    /// warns when it comes near.
    fn watch_certificate(&self) {
        if let Some(tls) = self.grpc_tls() {
            self.status.set_tls_cert_expiry(Some(tls.not_after()));
            if let Some(w) = tls.expiry_warning(std::time::SystemTime::now()) {
                warn!("{w}");
            }
        }
    }

    /// Follows interfaces until `stop` fires or disconnects, then shuts down in order.
    pub fn run(mut self, stop: &Receiver<()>) -> Result<()> {
        let tick = crossbeam_channel::tick(self.cfg.resync_interval);
        loop {
            crossbeam_channel::select! {
                recv(stop) -> _ => break,
                recv(tick) -> _ => {
                    self.sync_interfaces();
                    self.watch_certificate();
                }
            }
        }
        self.shutdown()
    }

    /// The shutdown order: detach (no packet lands after the final flush), stop the
    /// poller (it ends every flow), let the fanout publish the last records and close the
    /// hub, wait for stdout while it takes them, end the subscribers' streams, stop the
    /// endpoints, and remove the pins (every flow was flushed).
    pub fn shutdown(mut self) -> Result<()> {
        self.attacher.detach_all();
        let mut result = Ok(());
        if let Some((stop, thread)) = self.poller.take() {
            drop(stop);
            result = match thread.join() {
                Ok(r) => r.context("poller"),
                Err(_) => Err(anyhow::anyhow!("the poller thread panicked")),
            };
        }
        if let Some(f) = self.fanout.take() {
            if f.join().is_err() {
                result = result.and(Err(anyhow::anyhow!("the fanout thread panicked")));
            }
        }
        // Normally closed by the fanout already; a no-op then.
        self.hub.close();
        let emitted = self.hub.stats().published;
        match self.output.take().map(|o| o.finish(OUTPUT_STALL)) {
            Some(o) if o.written == emitted => {
                info!("{emitted} records emitted; stdout: {} written", o.written)
            }
            Some(o) => warn!(
                "{emitted} records emitted; stdout: {} written, {} lost (it fell behind), \
                 {} not written (stdout stopped taking them or was closed)",
                o.written,
                o.lost,
                emitted.saturating_sub(o.written + o.lost)
            ),
            None => info!("{emitted} records emitted"),
        }
        // The hub is closed: each exporter sends what it holds and ends its session.
        // Its sends time out on their own, so a stalled collector cannot hold this up long.
        for t in self.exporters.drain(..) {
            if t.join().is_err() {
                result = result.and(Err(anyhow::anyhow!("an IPFIX exporter thread panicked")));
            }
        }
        // Waits up to kafka::STOP_GRACE for the brokers to acknowledge what is buffered.
        if let Some(t) = self.kafka.take() {
            if t.join().is_err() {
                result = result.and(Err(anyhow::anyhow!("the Kafka producer thread panicked")));
            }
        }
        if let Some(g) = self.grpc.take() {
            result = result.and(g.shutdown().context("stopping the gRPC service"));
        }
        if let Some(m) = self.metrics.take() {
            m.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_millis(500));
        }
        result?;
        self.dp.unpin().context("removing map pins")?;
        remove_pin_root(&self.cfg.pin_dir);
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Without `shutdown`: stop the threads, flush nothing more than the poller does.
        self.attacher.detach_all();
        if let Some((stop, thread)) = self.poller.take() {
            drop(stop);
            let _ = thread.join();
        }
        if let Some(f) = self.fanout.take() {
            let _ = f.join();
        }
        self.hub.close();
    }
}

/// What `Agent::check` found good, for `start` to go on with.
pub struct Checked {
    selector: Selector,
    grpc: Option<GrpcEndpoint>,
}

/// A literal `--interface` that names no interface here is a typo until proven otherwise
/// (a glob or regex waits for interfaces to appear): one line that lists what exists.
fn check_interfaces_exist(cfg: &Config, selector: &Selector) -> Result<()> {
    let literals: Vec<&String> = cfg
        .interfaces
        .iter()
        .zip(&selector.include)
        .filter(|(_, p)| p.is_literal())
        .map(|(s, _)| s)
        .collect();
    if literals.is_empty() {
        return Ok(());
    }
    let here: Vec<String> = crate::kernel::attach::list_interfaces()
        .context("listing network interfaces")?
        .into_values()
        .map(|i| i.name)
        .collect();
    let missing: Vec<&str> = literals
        .iter()
        .filter(|l| !here.contains(l))
        .map(|l| l.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 20;
    let mut list = here
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if here.len() > SHOWN {
        let _ =
            std::fmt::Write::write_fmt(&mut list, format_args!(" and {} more", here.len() - SHOWN));
    }
    bail!(
        "--interface {}: no such interface here (there are: {list}); check the name \
         (`ip link`), or give a pattern such as {}* to attach when it appears",
        missing.join(", "),
        missing[0]
    )
}

/// What GetStatus says the agent is attached to.
fn publish_interfaces(attacher: &Attacher, status: &Status) {
    status.set_interfaces(
        attacher
            .attached()
            .into_iter()
            .map(|(ifindex, name, hook)| crate::status::AttachedInterface {
                name,
                ifindex,
                hook,
            })
            .collect(),
    );
}

/// Everything `wire` started, waiting for the datapath to join it.
struct Parts {
    cfg: Config,
    selector: Selector,
    attacher: Attacher,
    hub: Hub,
    status: Arc<Status>,
    poller: PollerThread,
    fanout: JoinHandle<()>,
    output: Option<OutputHandle>,
    grpc: Option<ServiceHandle>,
    metrics: Option<MetricsHandle>,
    runtime: tokio::runtime::Runtime,
    exporters: Vec<JoinHandle<()>>,
    kafka: Option<JoinHandle<()>>,
}

impl Parts {
    fn assemble(self, dp: Datapath, pin_lock: Option<PinLock>) -> Agent {
        Agent {
            cfg: self.cfg,
            selector: self.selector,
            attacher: self.attacher,
            hub: self.hub,
            status: self.status,
            poller: Some(self.poller),
            fanout: Some(self.fanout),
            output: self.output,
            grpc: self.grpc,
            metrics: self.metrics,
            runtime: Some(self.runtime),
            exporters: self.exporters,
            sync_failures: Episode::default(),
            kafka: self.kafka,
            dp,
            _pin_lock: pin_lock,
        }
    }
}

/// The listeners' connection caps, lowered where the descriptor limit could not hold them
/// beside what is open already and [`admission::RESERVE`] (kept for interfaces that
/// appear, exporters and the poller), so a flood of connections cannot take the
/// descriptors the rest of the agent needs.
fn fit_connections(
    cfg: &Config,
    grpc: Option<GrpcEndpoint>,
) -> Result<(Option<GrpcEndpoint>, HttpLimits)> {
    let mut metrics = HttpLimits::default();
    let limit = admission::raise_descriptor_limit();
    let open = admission::open_descriptors();
    let wanted = [
        grpc.as_ref().map_or(0, |_| cfg.grpc.max_connections),
        cfg.metrics_listen
            .as_ref()
            .map_or(0, |_| metrics.max_connections),
    ];
    let Some(caps) = admission::fit_descriptors(limit, open, &wanted) else {
        bail!(
            "the descriptor limit ({limit}, LimitNOFILE= under systemd) leaves no room for \
             connections beside the {open} descriptors open and the {} kept in reserve; raise it",
            admission::RESERVE
        );
    };
    if caps[0] < wanted[0] {
        warn!(
            "--grpc-max-connections {} lowered to {}: the descriptor limit ({limit}) holds no \
             more beside the {open} open and the {} kept in reserve; raise LimitNOFILE",
            wanted[0],
            caps[0],
            admission::RESERVE
        );
    }
    metrics.max_connections = caps[1].max(1);
    metrics.max_connections_per_source = metrics
        .max_connections_per_source
        .min(metrics.max_connections);
    Ok((grpc.map(|g| g.with_max_connections(caps[0])), metrics))
}

/// A capacity the kernel refuses is named by its flag, not left as a bare errno.
fn explain_load_error(e: DatapathError, cfg: &Config) -> anyhow::Error {
    let too_big = match &e {
        DatapathError::Load(l) => l.kind() == libbpf_rs::ErrorKind::TooBig,
        _ => false,
    };
    if too_big {
        let c = cfg.capacities;
        return anyhow::anyhow!(
            "the kernel refused a flow map this large (E2BIG): --max-flows {}, \
             --max-tcp-flows {}, --max-icmp-flows {}, --max-local-flows {}; lower them",
            c.flows,
            c.tcp,
            c.icmp,
            c.owner
        );
    }
    anyhow::Error::new(e).context("loading the flow datapath")
}

/// Starts noting which process owns each socket (the hook on the cgroup v2 root, and the
/// sockets already open), says once how flows will be attributed on this host (cgroup
/// v2, hybrid or v1), and returns the names of its cgroups.
fn attribute_sockets(dp: &mut Datapath) -> CgroupNames {
    let hierarchy = Hierarchy::detect();
    if let Err(why) = dp.attribution() {
        warn!("flows carry no cgroup or process of their local sockets: {why}");
        return CgroupNames::new(None);
    }
    let root = cgroup::open_root(hierarchy.mount())
        .map_err(|e| format!("opening the cgroup v2 root: {e}"));
    let hook = root.as_ref().map_err(Clone::clone).and_then(|root| {
        use std::os::fd::AsFd;
        dp.attach_owner_hook(root.as_fd())
            .map_err(|e| format!("attaching to the cgroup v2 root: {e}"))
    });
    // Names only where a cgroup v2 hierarchy is in use: on a v1 host every socket is in
    // its root.
    let mut names = CgroupNames::new(root.ok().filter(|_| hierarchy.mount().is_some()));
    let open = match dp.seed_owners() {
        Ok(n) => n,
        Err(e) => {
            warn!("the sockets open at start have no process: {e}");
            0
        }
    };
    if let Err(why) = hook {
        warn!(
            "sockets opened from now on will not carry their process ({why}); the {open} \
             open at start do"
        );
    }
    names.walk();
    match &hierarchy {
        Hierarchy::Unified(p) => info!(
            "flows at local sockets carry their cgroup (cgroup v2 at {}) and process; {open} sockets were open at start",
            p.display()
        ),
        Hierarchy::Hybrid(p) => info!(
            "flows at local sockets carry their process, and their cgroup in the cgroup v2 hierarchy at {} (a hybrid host: cgroup v1 controllers beside it, so cgroups and units are those systemd keeps there); {open} sockets were open at start",
            p.display()
        ),
        Hierarchy::V1Only => warn!(
            "no cgroup v2 hierarchy is mounted (a cgroup v1 host): flows at local sockets carry their process (pid, command, user) but no cgroup or unit; {open} sockets were open at start"
        ),
    }
    names
}

/// After a failed load: the layout directories it created, then the root, each only if
/// empty (pins of a crashed agent's flows stay for the next start).
fn remove_empty_pin_dirs(root: &Option<PathBuf>) {
    if let Some(dir) = root {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    remove_pin_root(root);
}

/// The pin root goes only when empty: pins kept for a restart stay.
fn remove_pin_root(root: &Option<PathBuf>) {
    if let Some(root) = root {
        let _ = std::fs::remove_dir(root);
    }
}
