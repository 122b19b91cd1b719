//! gRPC front end: the FlowLens service (Subscribe, GetStatus) with health and reflection, request validation, proto conversions, and the server's lifecycle.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response};

use crate::flow::{DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, TcpInfo, TcpState};
use crate::status::Status as AgentStatus;
use crate::stream::{Cidr, CidrError, Event, Filter, Hub, PortRange, Selector, SubscribeOptions};

/// Generated protocol types and the file descriptor set served by reflection.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("flowlens.v1");

    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/flowlens_descriptor.bin"));
}

use proto::flow_lens_server::{FlowLens, FlowLensServer};

/// How long shutdown waits for connections to drain before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Responses buffered per subscriber between its hub queue and the transport; small so a
/// stalled client backs up into the hub queue, where losses are counted.
const RESPONSE_BUFFER: usize = 2;

// ---------------------------------------------------------------------------
// Request validation
// ---------------------------------------------------------------------------

/// A request field that cannot be honoured; the message starts with the field's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{field}: invalid CIDR {value:?}: {source}")]
    Cidr {
        field: String,
        value: String,
        source: CidrError,
    },
    #[error("{field}: port {value} out of range 0..=65535")]
    PortOutOfRange { field: String, value: u32 },
    #[error("{field}: reversed port range: lo {lo} > hi {hi}")]
    PortRangeReversed { field: String, lo: u32, hi: u32 },
    #[error("{field}: IP protocol {value} out of range 0..=255")]
    Protocol { field: String, value: u32 },
    #[error("{field}: unknown {kind} value {value}")]
    UnknownEnum {
        field: String,
        kind: &'static str,
        value: i32,
    },
    #[error("{field}: TCP flags {value:#x} out of range 0x01..=0xff")]
    TcpFlags { field: String, value: u32 },
    #[error("{field}: must not be empty")]
    Empty { field: String },
    #[error("{field}: invalid timestamp: {reason}")]
    Timestamp { field: String, reason: String },
}

impl From<RequestError> for tonic::Status {
    fn from(e: RequestError) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Validates a request into hub subscription options.
pub fn parse_request(
    req: &proto::SubscribeRequest,
    peer: String,
) -> Result<SubscribeOptions, RequestError> {
    let parse_all = |list: &[proto::Filter], name: &str| {
        list.iter()
            .enumerate()
            .map(|(i, f)| parse_filter(f, &format!("{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let since = req.since.map(|t| timestamp_arg(t, "since")).transpose()?;
    Ok(SubscribeOptions {
        selector: Selector {
            include: parse_all(&req.include, "include")?,
            exclude: parse_all(&req.exclude, "exclude")?,
        },
        replay: usize::try_from(req.replay).unwrap_or(usize::MAX),
        since,
        follow: req.follow.unwrap_or(true),
        peer,
    })
}

/// The range google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

fn timestamp_arg(t: prost_types::Timestamp, field: &str) -> Result<SystemTime, RequestError> {
    let err = |reason: String| RequestError::Timestamp {
        field: field.into(),
        reason,
    };
    if !TIMESTAMP_SECONDS.contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(err(format!(
            "{}s {}ns is outside 0001-01-01..9999-12-31 or has nanos outside 0..1e9",
            t.seconds, t.nanos
        )));
    }
    SystemTime::try_from(t).map_err(|e| err(e.to_string()))
}

/// Validates one filter; `path` names it in errors (e.g. "include[2]").
pub fn parse_filter(f: &proto::Filter, path: &str) -> Result<Filter, RequestError> {
    let field = |name: &str| format!("{path}.{name}");
    let cidr = |v: &Option<String>, name: &str| -> Result<Option<Cidr>, RequestError> {
        v.as_deref()
            .map(|s| {
                s.parse().map_err(|source| RequestError::Cidr {
                    field: field(name),
                    value: s.to_owned(),
                    source,
                })
            })
            .transpose()
    };
    let ports = |v: &Option<proto::PortRange>, name: &str| {
        v.as_ref()
            .map(|p| parse_port_range(p, &field(name)))
            .transpose()
    };
    let protocol = f
        .protocol
        .map(|p| {
            u8::try_from(p).map_err(|_| RequestError::Protocol {
                field: field("protocol"),
                value: p,
            })
        })
        .transpose()?;
    let ip_version = match proto::IpVersion::try_from(f.ip_version) {
        Ok(proto::IpVersion::Unspecified) => None,
        Ok(proto::IpVersion::IpVersion4) => Some(4),
        Ok(proto::IpVersion::IpVersion6) => Some(6),
        Err(_) => {
            return Err(RequestError::UnknownEnum {
                field: field("ip_version"),
                kind: "IpVersion",
                value: f.ip_version,
            });
        }
    };
    let end_reason = match proto::EndReason::try_from(f.end_reason) {
        Ok(e) => end_reason_from_proto(e),
        Err(_) => {
            return Err(RequestError::UnknownEnum {
                field: field("end_reason"),
                kind: "EndReason",
                value: f.end_reason,
            });
        }
    };
    let tcp_flags = f
        .tcp_flags
        .map(|v| {
            u8::try_from(v)
                .ok()
                .filter(|&b| b != 0)
                .ok_or(RequestError::TcpFlags {
                    field: field("tcp_flags"),
                    value: v,
                })
        })
        .transpose()?;
    let interface = match &f.interface {
        Some(i) if i.is_empty() => {
            return Err(RequestError::Empty {
                field: field("interface"),
            });
        }
        i => i.clone(),
    };
    Ok(Filter {
        src: cidr(&f.src_cidr, "src_cidr")?,
        dst: cidr(&f.dst_cidr, "dst_cidr")?,
        addr: cidr(&f.cidr, "cidr")?,
        src_port: ports(&f.src_port, "src_port")?,
        dst_port: ports(&f.dst_port, "dst_port")?,
        port: ports(&f.port, "port")?,
        protocol,
        ip_version,
        interface,
        tcp_flags,
        end_reason,
        min_bytes: f.min_bytes,
    })
}

fn parse_port_range(p: &proto::PortRange, field: &str) -> Result<PortRange, RequestError> {
    let port = |v: u32| {
        u16::try_from(v).map_err(|_| RequestError::PortOutOfRange {
            field: field.to_owned(),
            value: v,
        })
    };
    let hi = p.hi.unwrap_or(p.lo);
    if p.lo > hi {
        return Err(RequestError::PortRangeReversed {
            field: field.to_owned(),
            lo: p.lo,
            hi,
        });
    }
    Ok(PortRange {
        lo: port(p.lo)?,
        hi: port(hi)?,
    })
}

// ---------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------

fn end_reason_from_proto(e: proto::EndReason) -> Option<EndReason> {
    match e {
        proto::EndReason::Unspecified => None,
        proto::EndReason::IdleTimeout => Some(EndReason::IdleTimeout),
        proto::EndReason::ActiveTimeout => Some(EndReason::ActiveTimeout),
        proto::EndReason::TcpFin => Some(EndReason::TcpFin),
        proto::EndReason::TcpRst => Some(EndReason::TcpRst),
        proto::EndReason::Shutdown => Some(EndReason::Shutdown),
    }
}

impl From<EndReason> for proto::EndReason {
    fn from(e: EndReason) -> proto::EndReason {
        match e {
            EndReason::IdleTimeout => proto::EndReason::IdleTimeout,
            EndReason::ActiveTimeout => proto::EndReason::ActiveTimeout,
            EndReason::TcpFin => proto::EndReason::TcpFin,
            EndReason::TcpRst => proto::EndReason::TcpRst,
            EndReason::Shutdown => proto::EndReason::Shutdown,
        }
    }
}

impl From<TcpState> for proto::TcpState {
    fn from(s: TcpState) -> proto::TcpState {
        match s {
            TcpState::None => proto::TcpState::None,
            TcpState::SynSent => proto::TcpState::SynSent,
            TcpState::SynRecv => proto::TcpState::SynRecv,
            TcpState::Established => proto::TcpState::Established,
            TcpState::FinWait => proto::TcpState::FinWait,
            TcpState::Closed => proto::TcpState::Closed,
            TcpState::Reset => proto::TcpState::Reset,
        }
    }
}

fn tcp_state_from_proto(s: proto::TcpState) -> TcpState {
    match s {
        proto::TcpState::Unspecified | proto::TcpState::None => TcpState::None,
        proto::TcpState::SynSent => TcpState::SynSent,
        proto::TcpState::SynRecv => TcpState::SynRecv,
        proto::TcpState::Established => TcpState::Established,
        proto::TcpState::FinWait => TcpState::FinWait,
        proto::TcpState::Closed => TcpState::Closed,
        proto::TcpState::Reset => TcpState::Reset,
    }
}

fn dir_to_proto(d: &DirStats) -> proto::DirStats {
    proto::DirStats {
        packets: d.packets,
        bytes: d.bytes,
        ttl: u32::from(d.ttl),
    }
}

fn latency_to_proto(l: &Latency) -> proto::Latency {
    proto::Latency {
        count: l.count,
        sum_ns: l.sum_ns,
        min_ns: l.min_ns,
        max_ns: l.max_ns,
        jitter_ns: l.jitter_ns,
    }
}

impl From<&FlowRecord> for proto::FlowRecord {
    fn from(r: &FlowRecord) -> proto::FlowRecord {
        let ip_version = match r.ip_version {
            4 => proto::IpVersion::IpVersion4,
            6 => proto::IpVersion::IpVersion6,
            _ => proto::IpVersion::Unspecified,
        };
        proto::FlowRecord {
            ip_version: ip_version.into(),
            protocol: u32::from(r.protocol),
            client_addr: r.client_addr.to_string(),
            client_port: u32::from(r.client_port),
            server_addr: r.server_addr.to_string(),
            server_port: u32::from(r.server_port),
            ifindex: r.ifindex,
            interface: r.interface.clone(),
            first_hook: match r.first_hook {
                Hook::Ingress => proto::Hook::Ingress,
                Hook::Egress => proto::Hook::Egress,
            }
            .into(),
            first_seen: Some(r.first_seen.into()),
            last_seen: Some(r.last_seen.into()),
            client: Some(dir_to_proto(&r.client)),
            server: Some(dir_to_proto(&r.server)),
            end_reason: proto::EndReason::from(r.end_reason).into(),
            tcp: r.tcp.as_ref().map(|t| proto::TcpInfo {
                client_flags: u32::from(t.client_flags),
                server_flags: u32::from(t.server_flags),
                state: proto::TcpState::from(t.state).into(),
                handshake_client_ns: t.handshake_client_ns,
                handshake_server_ns: t.handshake_server_ns,
                syn_retransmits: u32::from(t.syn_retransmits),
                late_start: t.late_start,
                client_latency: t.client_latency.as_ref().map(latency_to_proto),
                server_latency: t.server_latency.as_ref().map(latency_to_proto),
            }),
            icmp: r.icmp.as_ref().map(|i| proto::IcmpInfo {
                client_type: i.client_type.map(u32::from),
                client_code: i.client_code.map(u32::from),
                server_type: i.server_type.map(u32::from),
                server_code: i.server_code.map(u32::from),
                echo_id: i.echo_id.map(u32::from),
                echo_rtt: i.echo_rtt.as_ref().map(latency_to_proto),
            }),
        }
    }
}

/// A proto record that does not fit the Rust type (clients only see this with a buggy or
/// newer server).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RecordError {
    pub field: &'static str,
    pub reason: String,
}

fn narrow<T: TryFrom<u32>>(v: u32, field: &'static str) -> Result<T, RecordError> {
    T::try_from(v).map_err(|_| RecordError {
        field,
        reason: format!("{v} out of range"),
    })
}

fn time_from_proto(
    t: Option<prost_types::Timestamp>,
    field: &'static str,
) -> Result<SystemTime, RecordError> {
    let t = t.ok_or(RecordError {
        field,
        reason: "missing".into(),
    })?;
    SystemTime::try_from(t).map_err(|e| RecordError {
        field,
        reason: e.to_string(),
    })
}

fn dir_from_proto(
    d: Option<proto::DirStats>,
    field: &'static str,
) -> Result<DirStats, RecordError> {
    let d = d.unwrap_or_default();
    Ok(DirStats {
        packets: d.packets,
        bytes: d.bytes,
        ttl: narrow(d.ttl, field)?,
    })
}

fn latency_from_proto(l: &proto::Latency) -> Latency {
    Latency {
        count: l.count,
        sum_ns: l.sum_ns,
        min_ns: l.min_ns,
        max_ns: l.max_ns,
        jitter_ns: l.jitter_ns,
    }
}

/// The inverse of `From<&FlowRecord>`; `watch` uses it to print records as the agent's type.
impl TryFrom<&proto::FlowRecord> for FlowRecord {
    type Error = RecordError;

    fn try_from(p: &proto::FlowRecord) -> Result<FlowRecord, RecordError> {
        let addr = |s: &str, field: &'static str| {
            s.parse::<IpAddr>().map_err(|e| RecordError {
                field,
                reason: format!("{s:?}: {e}"),
            })
        };
        let opt8 = |v: Option<u32>, field| v.map(|v| narrow::<u8>(v, field)).transpose();
        let tcp = p
            .tcp
            .as_ref()
            .map(|t| -> Result<TcpInfo, RecordError> {
                Ok(TcpInfo {
                    client_flags: narrow(t.client_flags, "tcp.client_flags")?,
                    server_flags: narrow(t.server_flags, "tcp.server_flags")?,
                    state: tcp_state_from_proto(t.state()),
                    handshake_client_ns: t.handshake_client_ns,
                    handshake_server_ns: t.handshake_server_ns,
                    syn_retransmits: narrow(t.syn_retransmits, "tcp.syn_retransmits")?,
                    late_start: t.late_start,
                    client_latency: t.client_latency.as_ref().map(latency_from_proto),
                    server_latency: t.server_latency.as_ref().map(latency_from_proto),
                })
            })
            .transpose()?;
        let icmp = p
            .icmp
            .as_ref()
            .map(|i| -> Result<IcmpInfo, RecordError> {
                Ok(IcmpInfo {
                    client_type: opt8(i.client_type, "icmp.client_type")?,
                    client_code: opt8(i.client_code, "icmp.client_code")?,
                    server_type: opt8(i.server_type, "icmp.server_type")?,
                    server_code: opt8(i.server_code, "icmp.server_code")?,
                    echo_id: i
                        .echo_id
                        .map(|v| narrow::<u16>(v, "icmp.echo_id"))
                        .transpose()?,
                    echo_rtt: i.echo_rtt.as_ref().map(latency_from_proto),
                })
            })
            .transpose()?;
        Ok(FlowRecord {
            ip_version: match p.ip_version() {
                proto::IpVersion::IpVersion6 => 6,
                _ => 4,
            },
            protocol: narrow(p.protocol, "protocol")?,
            client_addr: addr(&p.client_addr, "client_addr")?,
            client_port: narrow(p.client_port, "client_port")?,
            server_addr: addr(&p.server_addr, "server_addr")?,
            server_port: narrow(p.server_port, "server_port")?,
            ifindex: p.ifindex,
            interface: p.interface.clone(),
            first_hook: match p.first_hook() {
                proto::Hook::Egress => Hook::Egress,
                _ => Hook::Ingress,
            },
            first_seen: time_from_proto(p.first_seen, "first_seen")?,
            last_seen: time_from_proto(p.last_seen, "last_seen")?,
            client: dir_from_proto(p.client, "client.ttl")?,
            server: dir_from_proto(p.server, "server.ttl")?,
            end_reason: end_reason_from_proto(p.end_reason()).unwrap_or(EndReason::IdleTimeout),
            tcp,
            icmp,
        })
    }
}

fn event_to_proto(ev: Event) -> proto::SubscribeResponse {
    use proto::subscribe_response::Event as E;
    let event = match ev {
        Event::Records(recs) => E::Flows(proto::FlowBatch {
            records: recs.iter().map(|r| proto::FlowRecord::from(&**r)).collect(),
        }),
        Event::Lost(count) => E::Lost(proto::Lost {
            count,
            reason: proto::LostReason::QueueFull.into(),
        }),
    };
    proto::SubscribeResponse { event: Some(event) }
}

// ---------------------------------------------------------------------------
// Service
// ---------------------------------------------------------------------------

/// The `flowlens.v1.FlowLens` implementation.
#[derive(Debug, Clone)]
pub struct FlowLensService {
    hub: Hub,
    status: Arc<AgentStatus>,
    /// Becomes true when the server stops, so following streams end and connections drain.
    stopping: watch::Receiver<bool>,
}

impl FlowLensService {
    pub fn new(hub: Hub, status: Arc<AgentStatus>, stopping: watch::Receiver<bool>) -> Self {
        FlowLensService {
            hub,
            status,
            stopping,
        }
    }
}

type ResponseStream = ReceiverStream<Result<proto::SubscribeResponse, tonic::Status>>;

#[tonic::async_trait]
impl FlowLens for FlowLensService {
    type SubscribeStream = ResponseStream;

    async fn subscribe(
        &self,
        req: Request<proto::SubscribeRequest>,
    ) -> Result<Response<ResponseStream>, tonic::Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let opts = parse_request(req.get_ref(), peer)?;
        // Registered before the response head goes out, so a client that has its response
        // sees every record published afterwards.
        let mut sub = self.hub.subscribe(opts);
        let mut stopping = self.stopping.clone();
        let hub = self.hub.clone();
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stopping.wait_for(|s| *s) => None,
                    _ = tx.closed() => break,
                    ev = sub.next_event() => match ev {
                        Some(ev) => Some(ev),
                        None => break,
                    },
                };
                let Some(ev) = ev else {
                    // Stopping. A closed hub has handed every record it will
                    // ever have (the agent's final flush included) to this
                    // subscriber's queue: deliver them, then end. The
                    // server's shutdown grace bounds a stalled client.
                    if hub.is_closed() {
                        while let Some(ev) = sub.next_event().await {
                            if tx.send(Ok(event_to_proto(ev))).await.is_err() {
                                break;
                            }
                        }
                    }
                    break;
                };
                if tx.send(Ok(event_to_proto(ev))).await.is_err() {
                    break;
                }
            }
            log::debug!("subscriber {} done", sub.id());
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_status(
        &self,
        _req: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, tonic::Status> {
        Ok(Response::new(status_response(&self.status, &self.hub)))
    }
}

fn status_response(status: &AgentStatus, hub: &Hub) -> proto::GetStatusResponse {
    let snap = status.snapshot();
    let hub = hub.stats();
    let uptime = snap
        .started
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .and_then(|d| prost_types::Duration::try_from(d).ok());
    proto::GetStatusResponse {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started: snap.started.map(Into::into),
        uptime,
        flows_seen: snap.flows_ended,
        records_emitted: snap.records_emitted,
        ring_records: hub.ring_len as u64,
        ring_capacity: hub.ring_capacity as u64,
        active_flows: snap.active_flows,
        maps: snap
            .maps
            .iter()
            .map(|m| proto::MapUsage {
                name: m.name.clone(),
                entries: m.entries,
                capacity: m.capacity,
                utilisation: if m.capacity == 0 {
                    0.0
                } else {
                    m.entries as f64 / m.capacity as f64
                },
            })
            .collect(),
        kernel_counters: snap.kernel_counters.into_iter().collect(),
        orphans_removed: snap.orphans_removed,
        last_poll_ns: snap.last_poll_ns,
        map_pressure_events: snap.map_pressure_events,
        subscribers: hub
            .subscribers
            .iter()
            .map(|s| proto::SubscriberInfo {
                id: s.id,
                peer: s.peer.clone(),
                connected: Some(s.connected.into()),
                records_queued: s.queued,
                lost: s.lost,
            })
            .collect(),
        lost_total: hub.lost_total,
        records_published: hub.published,
    }
}

// ---------------------------------------------------------------------------
// Server lifecycle
// ---------------------------------------------------------------------------

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<ListenAddr> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            anyhow::ensure!(
                !path.is_empty(),
                "listen address {s:?}: empty unix socket path"
            );
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .with_context(|| format!("listen address {s:?}: expected HOST:PORT or unix:/path"))
    }
}

enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

fn bind(addr: &ListenAddr) -> anyhow::Result<Bound> {
    match addr {
        ListenAddr::Tcp(a) => {
            let l = std::net::TcpListener::bind(a)
                .with_context(|| format!("binding gRPC listener on {a}"))?;
            l.set_nonblocking(true)
                .with_context(|| format!("gRPC listener on {a}"))?;
            Ok(Bound::Tcp(l))
        }
        ListenAddr::Unix(path) => {
            remove_stale_socket(path)?;
            let l = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("binding gRPC listener on unix:{}", path.display()))?;
            l.set_nonblocking(true)
                .with_context(|| format!("gRPC listener on unix:{}", path.display()))?;
            Ok(Bound::Unix(l, path.clone()))
        }
    }
}

/// A socket file left by a previous run would make bind fail; one that still accepts
/// connections belongs to a live server and must not be stolen.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    anyhow::ensure!(
        meta.file_type().is_socket(),
        "gRPC listener on unix:{}: path exists and is not a socket",
        path.display()
    );
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(anyhow!(
            "gRPC listener on unix:{}: address in use by a running server",
            path.display()
        ));
    }
    std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))
}

/// A running gRPC server.
#[derive(Debug)]
pub struct ServiceHandle {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    local_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
}

impl ServiceHandle {
    /// Stops accepting, ends every subscriber stream, waits (bounded) for connections to
    /// drain, and joins the server thread.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("gRPC server thread panicked"))?,
            None => Ok(()),
        };
        self.remove_socket();
        result
    }

    /// The bound TCP address (useful with port 0); None for a unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    fn remove_socket(&mut self) {
        if let Some(p) = self.unix_path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        // Dropping the stop sender also stops the server; only the join is skipped.
        self.remove_socket();
    }
}

/// Starts the gRPC server on its own tokio runtime in a background thread; `listen` is
/// "HOST:PORT" or "unix:/path". Fails (naming the address) if it cannot bind.
pub fn spawn(listen: &str, hub: Hub, status: Arc<AgentStatus>) -> anyhow::Result<ServiceHandle> {
    let addr: ListenAddr = listen.parse()?;
    let bound = bind(&addr)?;
    let (local_addr, unix_path) = match &bound {
        Bound::Tcp(l) => (Some(l.local_addr().context("gRPC listener address")?), None),
        Bound::Unix(_, p) => (None, Some(p.clone())),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flowlens-grpc")
        .enable_all()
        .build()
        .context("building the gRPC runtime")?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("flowlens-grpc-main".into())
        .spawn(move || rt.block_on(serve(bound, hub, status, stop_rx)))
        .context("spawning the gRPC server thread")?;
    log::info!("gRPC listening on {listen}");
    Ok(ServiceHandle {
        stop: Some(stop_tx),
        thread: Some(thread),
        local_addr,
        unix_path,
    })
}

async fn serve(
    bound: Bound,
    hub: Hub,
    status: Arc<AgentStatus>,
    stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<FlowLensServer<FlowLensService>>()
        .await;
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .context("building the reflection service")?;
    let router = tonic::transport::Server::builder()
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(FlowLensServer::new(FlowLensService::new(
            hub,
            status,
            stopping_rx.clone(),
        )));

    let mut drained = stopping_rx.clone();
    let signal = async move {
        let _ = drained.wait_for(|s| *s).await;
    };
    let mut server = match bound {
        Bound::Tcp(l) => {
            let l = tokio::net::TcpListener::from_std(l).context("registering gRPC listener")?;
            let incoming = TcpListenerStream::new(l);
            let incoming = tokio_stream::StreamExt::map(incoming, |s| {
                // Batches are small and latency-sensitive; Nagle would hold them back.
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            });
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
        }
        Bound::Unix(l, _) => {
            let l = tokio::net::UnixListener::from_std(l).context("registering gRPC listener")?;
            tokio::spawn(router.serve_with_incoming_shutdown(UnixListenerStream::new(l), signal))
        }
    };

    tokio::select! {
        r = &mut server => return r.context("gRPC server task")?.context("gRPC server"),
        _ = stop => {}
    }
    health
        .set_not_serving::<FlowLensServer<FlowLensService>>()
        .await;
    let _ = stopping_tx.send(true);
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(r) => r.context("gRPC server task")?.context("gRPC server"),
        Err(_) => {
            log::warn!("gRPC connections did not drain in {SHUTDOWN_GRACE:?}; dropping them");
            server.abort();
            Ok(())
        }
    }
}
