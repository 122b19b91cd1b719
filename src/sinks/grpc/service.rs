//! The gRPC server: the FlowLens service (Subscribe, ListFlows, GetStatus) with health and reflection, and its listener's lifecycle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use tokio::sync::{oneshot, watch, Semaphore};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response};

use crate::admission::Caps;
use crate::config::GrpcConfig;
use crate::hub::Hub;
use crate::record::api::{self, proto, RequestLimits};
use crate::record::snapshot::{page_token, parse_page_token, PagedSnapshots, SnapshotSlot};
pub use crate::sinks::grpc::listener::ListenAddr;
use crate::sinks::grpc::listener::{self, Bound, ConnPolicy, SocketAccess, TrackStreams};
use crate::sinks::grpc::subscribe::{Routes, SubscribeRoute};
use crate::status::Status as AgentStatus;
use crate::tls::ServerTls;

/// The server side of the FlowLens service's unary methods, generated in build.rs from a
/// hand-declared service; Subscribe has a route of its own (`subscribe`).
#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/flowlens.v1.FlowLens.rs"));
}

use generated::flow_lens_server::{FlowLens, FlowLensServer};

/// How long shutdown waits for connections to drain before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Request header bytes a client may send on one stream (gRPC requests carry a few hundred).
const MAX_HEADER_LIST: u32 = 16 << 10;
/// ListFlows page size when the request leaves it 0, and its upper bound.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

// ---------------------------------------------------------------------------
// Service
// ---------------------------------------------------------------------------

/// The `flowlens.v1.FlowLens` unary methods (Subscribe: `subscribe::SubscribeRoute`).
#[derive(Debug, Clone)]
pub struct FlowLensService {
    hub: Hub,
    status: Arc<AgentStatus>,
    snapshots: SnapshotSlot,
    paged: Arc<PagedSnapshots>,
    limits: RequestLimits,
}

impl FlowLensService {
    pub fn new(
        hub: Hub,
        status: Arc<AgentStatus>,
        snapshots: SnapshotSlot,
        grpc: &GrpcConfig,
    ) -> Self {
        FlowLensService {
            hub,
            status,
            snapshots,
            paged: Arc::default(),
            limits: grpc.request_limits,
        }
    }
}

#[tonic::async_trait]
impl FlowLens for FlowLensService {
    async fn list_flows(
        &self,
        req: Request<proto::ListFlowsRequest>,
    ) -> Result<Response<proto::ListFlowsResponse>, tonic::Status> {
        let req = req.into_inner();
        let selector = api::parse_selector(&req.include, &req.exclude, &self.limits)?;
        let size = match req.page_size {
            0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let (snap, offset) = if req.page_token.is_empty() {
            (self.snapshots.fresh().await, 0)
        } else {
            let (generation, offset) = parse_page_token(&req.page_token).ok_or_else(|| {
                tonic::Status::invalid_argument(format!(
                    "page_token: {:?} is not a token this agent gave",
                    req.page_token
                ))
            })?;
            let snap = self.paged.get(generation).ok_or_else(|| {
                tonic::Status::aborted("page_token: that snapshot has expired; list again")
            })?;
            (snap, offset)
        };
        let matching: Vec<&crate::record::flow::FlowRecord> =
            snap.flows.iter().filter(|r| selector.matches(r)).collect();
        let end = offset.saturating_add(size).min(matching.len());
        let next_page_token = if end < matching.len() {
            self.paged.keep(&snap);
            page_token(snap.generation, end)
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListFlowsResponse {
            flows: matching
                .get(offset.min(end)..end)
                .unwrap_or_default()
                .iter()
                .map(|r| proto::FlowRecord::from(*r))
                .collect(),
            next_page_token,
            snapshot_time: (snap.generation > 0).then(|| snap.taken.into()),
            total_size: matching.len() as u64,
        }))
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
        run: hub.run,
        buffer_bytes: hub.buffer_bytes as u64,
        buffer_capacity_bytes: hub.buffer_capacity as u64,
        oldest_seq: hub.oldest_seq,
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
        flows_evicted: snap.flows_evicted,
        probation: Some(probation_to_proto(&snap.probation)),
        subscribers: hub
            .subscribers()
            .map(|s| proto::SubscriberInfo {
                id: s.id,
                peer: s.name.clone(),
                connected: Some(s.connected.into()),
                records_queued: s.queued,
                lost: s.lost,
            })
            .collect(),
        lost_total: hub.lost_total,
        records_published: hub.published,
        interfaces: snap
            .interfaces
            .iter()
            .map(|i| proto::InterfaceInfo {
                name: i.name.clone(),
                ifindex: i.ifindex,
                hook: i.hook.to_owned(),
            })
            .collect(),
        sinks: hub
            .sinks
            .iter()
            .filter(|s| s.kind != crate::hub::SinkKind::Subscriber)
            .map(|s| proto::SinkInfo {
                kind: s.kind.as_str().to_owned(),
                name: s.name.clone(),
                delivered: s.delivered,
                queued: s.queued,
                lost: s.lost,
            })
            .collect(),
        observer: snap.observer,
        poll_interval: (snap.poll_interval_ns > 0)
            .then(|| Duration::from_nanos(snap.poll_interval_ns))
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
    }
}

// ---------------------------------------------------------------------------
// Server lifecycle
// ---------------------------------------------------------------------------

/// A running gRPC server.
#[derive(Debug)]
pub struct ServiceHandle {
    stop: Option<oneshot::Sender<()>>,
    /// The server task's result, once it ended.
    done: std::sync::mpsc::Receiver<anyhow::Result<()>>,
    /// The runtime it runs on, when it has one of its own (`spawn`).
    runtime: Option<tokio::runtime::Runtime>,
    local_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    tls: Option<Arc<ServerTls>>,
}

impl ServiceHandle {
    /// The server's TLS, to re-read its files (None: cleartext).
    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.clone()
    }

    /// Stops accepting, ends every subscriber stream, waits (bounded by the shutdown
    /// grace) for connections to drain. Blocks: call it from outside the runtime's tasks.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = match self
            .done
            .recv_timeout(SHUTDOWN_GRACE + Duration::from_secs(1))
        {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(anyhow!("the gRPC server task ended without a result"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                log::warn!("gRPC server still stopping after {SHUTDOWN_GRACE:?}; leaving it");
                Ok(())
            }
        };
        self.release_runtime();
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

    /// Without waiting: the handle may be dropped inside another runtime's task, where
    /// blocking on a runtime's shutdown is not allowed.
    fn release_runtime(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        // Dropping the stop sender also stops the server; only the wait is skipped.
        self.release_runtime();
        self.remove_socket();
    }
}

/// A gRPC endpoint checked and ready to bind: where, with which TLS, within which limits.
#[derive(Debug, Clone)]
pub struct GrpcEndpoint {
    addr: ListenAddr,
    tls: Option<Arc<ServerTls>>,
    access: SocketAccess,
    grpc: GrpcConfig,
}

impl GrpcEndpoint {
    /// Reads the TLS files and resolves the socket group, and refuses cleartext on an
    /// address other hosts can reach unless `allow_insecure` says so.
    pub fn new(addr: ListenAddr, grpc: &GrpcConfig) -> anyhow::Result<GrpcEndpoint> {
        let tls = ServerTls::from_config(grpc)?;
        if tls.is_none() && !addr.is_local() {
            let ListenAddr::Tcp(a) = &addr else {
                unreachable!("unix sockets are local")
            };
            if !grpc.allow_insecure {
                bail!(
                    "--grpc-listen {a}: refusing to serve flows in cleartext on a non-loopback \
                     address; give --grpc-tls-cert and --grpc-tls-key (and --grpc-client-ca to \
                     require client certificates), or --grpc-allow-insecure to let anyone who \
                     reaches the port read every flow"
                );
            }
            log::warn!("gRPC on {a} in cleartext (--grpc-allow-insecure): anyone who reaches it reads every flow");
        }
        if tls.is_some() && grpc.client_ca.is_none() && !addr.is_local() {
            log::warn!(
                "gRPC TLS without --grpc-client-ca: any client that reaches the port may subscribe"
            );
        }
        let gid = match (&addr, &grpc.socket_group) {
            (ListenAddr::Unix(_), Some(g)) => {
                Some(listener::group_id(g).with_context(|| format!("--grpc-socket-group {g:?}"))?)
            }
            (ListenAddr::Tcp(_), Some(_)) => {
                bail!("--grpc-socket-group applies to a unix:/path --grpc-listen only")
            }
            _ => None,
        };
        Ok(GrpcEndpoint {
            addr,
            tls,
            access: SocketAccess {
                mode: grpc.socket_mode,
                gid,
            },
            grpc: grpc.clone(),
        })
    }

    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The same endpoint holding at most `n` connections (and as many per source).
    pub fn with_max_connections(mut self, n: usize) -> GrpcEndpoint {
        self.grpc.max_connections = n.max(1);
        self.grpc.max_connections_per_source = self
            .grpc
            .max_connections_per_source
            .min(self.grpc.max_connections);
        self
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// Starts the gRPC server with default settings on a tokio runtime of its own; `listen`
/// is "HOST:PORT" or "unix:/path". Fails (naming the address) if it cannot bind. The
/// agent, which owns a runtime, uses [`spawn_in`].
///
/// Its ListFlows answers from a slot nobody publishes to (an empty list).
pub fn spawn(listen: &str, hub: Hub, status: Arc<AgentStatus>) -> anyhow::Result<ServiceHandle> {
    spawn_with(listen, &GrpcConfig::default(), hub, status)
}

/// `spawn` with the endpoint's security and limits.
pub fn spawn_with(
    listen: &str,
    grpc: &GrpcConfig,
    hub: Hub,
    status: Arc<AgentStatus>,
) -> anyhow::Result<ServiceHandle> {
    let idle = SnapshotSlot::new(Duration::from_millis(100));
    spawn_with_snapshots(listen, grpc, hub, status, idle)
}

/// `spawn_with`, ListFlows answering from `snapshots`.
pub fn spawn_with_snapshots(
    listen: &str,
    grpc: &GrpcConfig,
    hub: Hub,
    status: Arc<AgentStatus>,
    snapshots: SnapshotSlot,
) -> anyhow::Result<ServiceHandle> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flowlens-grpc")
        .enable_all()
        .build()
        .context("building the gRPC runtime")?;
    let started = listen
        .parse()
        .and_then(|addr| GrpcEndpoint::new(addr, grpc))
        .and_then(|endpoint| spawn_in(endpoint, hub, status, snapshots, rt.handle()));
    match started {
        Ok(mut h) => {
            h.runtime = Some(rt);
            Ok(h)
        }
        Err(e) => {
            rt.shutdown_background();
            Err(e)
        }
    }
}

/// Binds the endpoint and serves on `rt`, ListFlows answering from `snapshots`.
pub fn spawn_in(
    endpoint: GrpcEndpoint,
    hub: Hub,
    status: Arc<AgentStatus>,
    snapshots: SnapshotSlot,
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<ServiceHandle> {
    let bound = listener::bind(&endpoint.addr, &endpoint.access)?;
    let (local_addr, unix_path) = match &bound {
        Bound::Tcp(l) => (Some(l.local_addr().context("gRPC listener address")?), None),
        Bound::Unix(_, p) => (None, Some(p.clone())),
    };
    let tls = endpoint.tls.clone();
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = done_tx.send(serve(bound, endpoint, hub, status, snapshots, stop_rx).await);
    });
    Ok(ServiceHandle {
        stop: Some(stop_tx),
        done,
        runtime: None,
        local_addr,
        unix_path,
        tls,
    })
}

async fn serve(
    bound: Bound,
    endpoint: GrpcEndpoint,
    hub: Hub,
    status: Arc<AgentStatus>,
    snapshots: SnapshotSlot,
    stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let grpc = &endpoint.grpc;
    let max_request = grpc.max_request_size;
    let (health, health_svc) = tonic_health::server::health_reporter();
    let health_svc = health_svc.max_decoding_message_size(max_request);
    health
        .set_serving::<FlowLensServer<FlowLensService>>()
        .await;
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .context("building the reflection service")?
        .max_decoding_message_size(max_request);
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .context("building the reflection service")?
        .max_decoding_message_size(max_request);
    let streams = Arc::new(Semaphore::new(grpc.max_subscribers));
    let builder = tonic::transport::Server::builder()
        .max_concurrent_streams(grpc.max_streams_per_connection)
        .http2_keepalive_interval(Some(grpc.keepalive_interval))
        .http2_keepalive_timeout(Some(grpc.keepalive_timeout))
        .http2_max_header_list_size(MAX_HEADER_LIST);
    // Compressed only for clients that ask (grpc-accept-encoding). Subscribe compresses a
    // block once per codec for every subscriber; the unary answers are tonic's.
    let unary = FlowLensServer::new(FlowLensService::new(hub.clone(), status, snapshots, grpc))
        .max_decoding_message_size(max_request)
        .send_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Gzip);
    let subscribe = Arc::new(SubscribeRoute {
        hub,
        limits: grpc.request_limits,
        max_request,
        // Subscribe streams take their places among the long-lived streams the layer
        // counts (health Watch, reflection).
        subscribers: streams.clone(),
        max_subscribers: grpc.max_subscribers,
        stopping: stopping_rx.clone(),
    });
    let router = builder
        .layer(TrackStreams {
            streams: streams.clone(),
            max_streams: grpc.max_subscribers,
            stopping: stopping_rx.clone(),
            request_timeout: grpc.request_timeout,
        })
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(Routes { unary, subscribe });

    let mut drained = stopping_rx.clone();
    let signal = async move {
        let _ = drained.wait_for(|s| *s).await;
    };
    let incoming = listener::incoming(
        bound,
        ConnPolicy {
            idle_timeout: grpc.idle_timeout,
            tcp_keepalive: grpc.tcp_keepalive,
            handshake_timeout: grpc.handshake_timeout,
            caps: Caps {
                total: grpc.max_connections,
                per_source: grpc.max_connections_per_source,
            },
        },
        endpoint.tls.clone(),
    )?;
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal));

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

/// Probation's figures as GetStatus reports them.
fn probation_to_proto(p: &crate::poller::probation::ProbationStatus) -> proto::Probation {
    proto::Probation {
        protocols: p
            .protocols
            .iter()
            .map(|x| proto::ProbationProtocol {
                protocol: x.protocol.to_owned(),
                entered: x.entered,
                admitted: x.admitted,
                ended: x.ended,
                waiting: x.waiting,
                evicted: x.evicted,
            })
            .collect(),
        capacity: p.capacity,
        sources_estimate: p.sources_estimate,
        tallied: p.tallied,
        top_ports: p
            .top_ports
            .iter()
            .map(|x| proto::ProbationPort {
                protocol: x.protocol.to_owned(),
                port: u32::from(x.port),
                flows: x.flows,
            })
            .collect(),
    }
}
