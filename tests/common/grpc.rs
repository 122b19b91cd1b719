//! Shared harness of the gRPC tests: a real tonic server fed through `Hub::publish`, a record corpus, and stream readers.
#![allow(dead_code)]
// Re-exported for the gRPC test files, each of which uses a different part.
#![allow(unused_imports)]

pub use flowlens::cli::client::{AgentAddr, FlowQuery};
pub use flowlens::cli::watch::{self, WatchArgs};
pub use flowlens::hub::{Hub, HubConfig};
pub use flowlens::record::api::proto;
pub use flowlens::record::api::proto::flow_lens_client::FlowLensClient;
pub use flowlens::record::api::proto::subscribe_response::Event;
pub use flowlens::record::flow::{
    DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, LocalProcess, TcpInfo, TcpState,
};
pub use flowlens::record::snapshot::SnapshotSlot;
pub use flowlens::sinks::grpc::{self, ServiceHandle};
pub use flowlens::status::{MapUsage, Status};
pub use std::collections::BTreeMap;
pub use std::net::{IpAddr, SocketAddr};
pub use std::sync::Arc;
pub use std::time::{Duration, SystemTime, UNIX_EPOCH};
pub use tonic::transport::{Channel, Endpoint};
pub use tonic::{Code, Streaming};

/// Upper bound for anything that should happen "soon"; never the expected duration.
pub const WAIT: Duration = Duration::from_secs(15);

pub use flowlens::record::flow::tcp_flags::{ACK, FIN, PSH, RST, SYN};

pub struct Agent {
    pub hub: Hub,
    pub status: Arc<Status>,
    pub snapshots: SnapshotSlot,
    pub handle: Option<ServiceHandle>,
    pub addr: SocketAddr,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::with_config(HubConfig::default())
    }

    pub fn with_config(cfg: HubConfig) -> Agent {
        Agent::on("127.0.0.1:0", cfg)
    }

    pub fn on(listen: &str, cfg: HubConfig) -> Agent {
        let hub = Hub::new(cfg);
        let status = Arc::new(Status::new());
        let snapshots = SnapshotSlot::new(Duration::from_millis(100));
        let handle = grpc::spawn_with_snapshots(
            listen,
            &flowlens::config::GrpcConfig::default(),
            hub.clone(),
            status.clone(),
            snapshots.clone(),
        )
        .unwrap();
        let addr = handle.local_addr().expect("tcp listener has an address");
        Agent {
            hub,
            status,
            snapshots,
            handle: Some(handle),
            addr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> FlowLensClient<Channel> {
        FlowLensClient::new(self.channel().await)
    }

    /// GetStatus, answered.
    pub async fn status(&self) -> proto::GetStatusResponse {
        self.client()
            .await
            .get_status(proto::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Publishes `recs` and reads a subscription until every one of them came back.
    pub async fn publish_and_read(
        &self,
        s: &mut Streaming<proto::SubscribeResponse>,
        recs: &[FlowRecord],
    ) -> Received {
        for r in recs {
            self.hub.publish(r.clone());
        }
        let mut got = Received::default();
        read_until(s, &mut got, |r| r.ids.len() >= recs.len()).await;
        got
    }

    pub async fn subscribe(
        &self,
        req: proto::SubscribeRequest,
    ) -> Streaming<proto::SubscribeResponse> {
        self.client()
            .await
            .subscribe(req)
            .await
            .expect("subscribe")
            .into_inner()
    }

    pub fn shutdown(mut self) {
        self.handle.take().unwrap().shutdown().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.shutdown();
        }
    }
}

pub fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

/// A TCP record; `id` goes into ifindex so tests can tell records apart.
pub fn rec(id: u32) -> FlowRecord {
    FlowRecord {
        flow_id: 0x1234_5678_9abc_def0 + u64::from(id),
        observer: "host-a".into(),
        ip_version: 4,
        protocol: 6,
        client_addr: "10.9.0.1".parse().unwrap(),
        client_port: 40000,
        server_addr: "10.9.0.2".parse().unwrap(),
        server_port: 8080,
        ifindex: id,
        interface: "test0".into(),
        first_hook: Hook::Egress,
        first_seen: t(u64::from(id)),
        last_seen: t(u64::from(id) + 1),
        window_start: t(u64::from(id)),
        emitted: t(u64::from(id) + 2),
        continuation: false,
        fragment: false,
        partial: false,
        client: DirStats {
            packets: 3,
            bytes: 180,
            ttl: 64,
        },
        server: DirStats {
            packets: 2,
            bytes: 120,
            ttl: 63,
        },
        end_reason: EndReason::TcpFin,
        tcp: Some(TcpInfo {
            client_flags: SYN | ACK | FIN,
            server_flags: SYN | ACK | FIN,
            state: TcpState::Closed,
            handshake_client_ns: Some(120_000),
            handshake_server_ns: None,
            syn_retransmits: 0,
            late_start: false,
            client_latency: None,
            server_latency: Some(Latency {
                count: 1,
                sum_ns: 50_000,
                min_ns: 50_000,
                max_ns: 50_000,
                jitter_ns: None,
            }),
        }),
        icmp: None,
        client_process: None,
        server_process: None,
    }
}

pub fn tcp_flags(r: &mut FlowRecord, c: u8, s: u8) {
    let t = r.tcp.as_mut().unwrap();
    t.client_flags = c;
    t.server_flags = s;
}

/// Six records differing in every filterable field.
pub fn corpus() -> Vec<FlowRecord> {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let mut r1 = rec(1);
    r1.client_addr = ip("10.0.0.1");
    r1.client_port = 40001;
    r1.server_addr = ip("192.168.1.10");
    r1.server_port = 443;
    r1.interface = "eth0".into();
    tcp_flags(&mut r1, SYN | ACK | PSH | FIN, SYN | ACK | FIN);
    r1.client.bytes = 1000;
    r1.server.bytes = 5000;
    r1.end_reason = EndReason::TcpFin;

    let mut r2 = rec(2);
    r2.protocol = 17;
    r2.tcp = None;
    r2.client_addr = ip("10.0.0.2");
    r2.client_port = 5353;
    r2.server_addr = ip("224.0.0.251");
    r2.server_port = 5353;
    r2.interface = "eth0".into();
    r2.client.bytes = 100;
    r2.server = DirStats::default();
    r2.end_reason = EndReason::IdleTimeout;

    let mut r3 = rec(3);
    r3.ip_version = 6;
    r3.client_addr = ip("2001:db8::1");
    r3.client_port = 50000;
    r3.server_addr = ip("2001:db8:1::80");
    r3.server_port = 80;
    r3.interface = "eth1".into();
    tcp_flags(&mut r3, SYN | ACK | RST, SYN | ACK);
    r3.client.bytes = 300;
    r3.server.bytes = 200;
    r3.end_reason = EndReason::TcpRst;

    let mut r4 = rec(4);
    r4.protocol = 1;
    r4.tcp = None;
    r4.icmp = Some(IcmpInfo {
        client_type: Some(8),
        client_code: Some(0),
        server_type: Some(0),
        server_code: Some(0),
        echo_id: Some(77),
        echo_rtt: Some(Latency {
            count: 3,
            sum_ns: 150_000,
            min_ns: 40_000,
            max_ns: 60_000,
            jitter_ns: None,
        }),
    });
    r4.client_addr = ip("192.168.1.10");
    r4.client_port = 0;
    r4.server_addr = ip("10.0.0.1");
    r4.server_port = 0;
    r4.interface = "eth1".into();
    r4.client.bytes = 84;
    r4.server.bytes = 84;
    r4.end_reason = EndReason::IdleTimeout;

    let mut r5 = rec(5);
    r5.ip_version = 6;
    r5.protocol = 58;
    r5.tcp = None;
    r5.icmp = Some(IcmpInfo {
        client_type: Some(135),
        client_code: Some(0),
        server_type: None,
        server_code: None,
        echo_id: None,
        echo_rtt: None,
    });
    r5.client_addr = ip("fe80::1");
    r5.client_port = 0;
    r5.server_addr = ip("fe80::2");
    r5.server_port = 0;
    r5.interface = "lo".into();
    r5.client.bytes = 64;
    r5.server = DirStats::default();
    r5.end_reason = EndReason::Shutdown;

    let mut r6 = rec(6);
    r6.client_addr = ip("192.168.1.20");
    r6.client_port = 33000;
    r6.server_addr = ip("10.0.0.2");
    r6.server_port = 22;
    r6.interface = "eth0".into();
    tcp_flags(&mut r6, ACK | PSH, ACK | PSH);
    r6.tcp.as_mut().unwrap().late_start = true;
    r6.client.bytes = 10_000;
    r6.server.bytes = 20_000;
    r6.end_reason = EndReason::ActiveTimeout;

    vec![r1, r2, r3, r4, r5, r6]
}

pub fn cidr(s: &str) -> Option<String> {
    Some(s.to_owned())
}

pub fn ports(lo: u32, hi: Option<u32>) -> Option<proto::PortRange> {
    Some(proto::PortRange { lo, hi })
}

pub fn replay_all(
    include: Vec<proto::Filter>,
    exclude: Vec<proto::Filter>,
) -> proto::SubscribeRequest {
    proto::SubscribeRequest {
        include,
        exclude,
        replay: 1_000_000,
        since: None,
        follow: Some(false),
        after_seq: None,
        run: None,
    }
}

#[derive(Debug, Default)]
pub struct Received {
    pub ids: Vec<u32>,
    pub batches: Vec<usize>,
    /// Each `Lost` event's count; `losses` has the events.
    pub lost: Vec<u64>,
    pub losses: Vec<proto::Lost>,
    pub restarts: Vec<proto::Restarted>,
    pub records: Vec<proto::FlowRecord>,
}

impl Received {
    /// The records received, converted back from the wire.
    pub fn flow_records(&self) -> Vec<FlowRecord> {
        self.records
            .iter()
            .map(|p| FlowRecord::try_from(p).unwrap())
            .collect()
    }

    pub fn absorb(&mut self, msg: proto::SubscribeResponse) {
        match msg.event.expect("event set") {
            Event::Flows(b) => {
                self.batches.push(b.records.len());
                self.ids.extend(b.records.iter().map(|r| r.ifindex));
                self.records.extend(b.records);
            }
            Event::Lost(l) => {
                self.lost.push(l.count);
                self.losses.push(l);
            }
            Event::Restarted(r) => self.restarts.push(r),
        }
    }

    pub fn total_lost(&self) -> u64 {
        self.lost.iter().sum()
    }
}

/// Next message, failing the test instead of hanging.
pub async fn next(s: &mut Streaming<proto::SubscribeResponse>) -> Option<proto::SubscribeResponse> {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("timed out waiting for a stream message")
        .expect("stream error")
}

/// Everything until end of stream.
pub async fn drain(mut s: Streaming<proto::SubscribeResponse>) -> Received {
    let mut r = Received::default();
    while let Some(m) = next(&mut s).await {
        r.absorb(m);
    }
    r
}

/// Reads until `done` holds for what was received.
pub async fn read_until(
    s: &mut Streaming<proto::SubscribeResponse>,
    r: &mut Received,
    done: impl Fn(&Received) -> bool,
) {
    while !done(r) {
        match next(s).await {
            Some(m) => r.absorb(m),
            None => panic!("stream ended early; got {:?} / lost {:?}", r.ids, r.lost),
        }
    }
}

pub async fn ids_for(
    agent: &Agent,
    include: Vec<proto::Filter>,
    exclude: Vec<proto::Filter>,
) -> Vec<u32> {
    let s = agent.subscribe(replay_all(include, exclude)).await;
    drain(s).await.ids
}

/// Name, include filters, exclude filters, expected record ids.
pub type SelectorCase = (
    &'static str,
    Vec<proto::Filter>,
    Vec<proto::Filter>,
    Vec<u32>,
);

/// Runs `cmd`, failing the test with its output unless it succeeds; its stdout.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A stock Python grpcio client: grpcio and grpcio-tools from PyPI in a venv kept under the
/// target dir, and the proto's Python modules generated for this test.
pub struct Grpcio {
    py: std::path::PathBuf,
    gen: tempfile::TempDir,
}

impl Grpcio {
    /// Installs grpcio when missing (once, under a lock: tests in parallel share the venv)
    /// and generates the modules. Blocking.
    pub fn ready() -> Grpcio {
        use std::os::fd::AsRawFd;
        use std::process::Command;
        let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        let venv = tmp.join("pyvenv-grpcio");
        let py = venv.join("bin/python");
        let lock = std::fs::File::create(tmp.join("pyvenv-grpcio.lock")).unwrap();
        // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let ready = py.exists()
            && Command::new(&py)
                .args(["-c", "import grpc, grpc_tools"])
                .status()
                .is_ok_and(|s| s.success());
        if !ready {
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
            run(Command::new(&py).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "grpcio>=1.60",
                "grpcio-tools>=1.60",
            ]));
        }
        drop(lock);
        let gen = tempfile::tempdir().unwrap();
        let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
        run(Command::new(&py)
            .args(["-m", "grpc_tools.protoc", "-I", proto_dir])
            .arg(format!("--python_out={}", gen.path().display()))
            .arg(format!("--grpc_python_out={}", gen.path().display()))
            .arg(format!("{proto_dir}/flowlens/v1/flowlens.proto")));
        Grpcio { py, gen }
    }

    /// The venv's python.
    pub fn command(&self) -> std::process::Command {
        std::process::Command::new(&self.py)
    }

    /// Where the generated modules are (a script puts it on `sys.path`).
    pub fn gen(&self) -> &std::path::Path {
        self.gen.path()
    }
}

/// The README's grpcio invocation for the unix socket.
pub const PY_UNIX_SOCKET: &str = r#"
import sys
sys.path.insert(0, sys.argv[2])
import grpc
from flowlens.v1 import flowlens_pb2 as pb, flowlens_pb2_grpc as rpc

channel = grpc.insecure_channel("unix:" + sys.argv[1],
                                options=[("grpc.default_authority", "localhost")])
print(rpc.FlowLensStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10).version)
"#;

/// `n` flows in progress: odd ones UDP, the rest TCP; client port 10000 + i.
pub fn in_progress(n: u16) -> Vec<FlowRecord> {
    (0..n)
        .map(|i| {
            let mut r = rec(1);
            r.client_port = 10_000 + i;
            r.end_reason = EndReason::InProgress;
            if i % 2 == 1 {
                r.protocol = 17;
                r.tcp = None;
            }
            r
        })
        .collect()
}

/// `watch` running in-process on the test's runtime, writing into `out`, until stopped.
pub struct WatchTask {
    pub out: Shared,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl WatchTask {
    pub fn spawn(args: WatchArgs) -> WatchTask {
        let out = Shared::default();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let mut out = out.clone();
            async move {
                watch::watch_to(&args, &mut out, async {
                    let _ = stop_rx.await;
                })
                .await
            }
        });
        WatchTask { out, stop, task }
    }

    /// Stops it as Ctrl-C would; it must end without an error.
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Waits until `hub` has `n` subscribers.
pub async fn wait_subscribers(hub: &Hub, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    while hub.stats().subscribers().count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} subscribers never came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `Write` the test reads while `watch` writes to it.
#[derive(Clone, Default)]
pub struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    /// Every complete JSON line written so far.
    pub fn json(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        complete
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect()
    }

    pub fn ports(&self) -> Vec<u64> {
        self.json()
            .iter()
            .map(|v| v["client_port"].as_u64().unwrap())
            .collect()
    }

    pub async fn wait_for(&self, n: usize) -> Vec<u64> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let p = self.ports();
            if p.len() >= n || std::time::Instant::now() > deadline {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
