//! The gRPC endpoint against hostile or careless clients, on loopback: TLS and client certificates, request and stream limits, vanished and idle peers, descriptor exhaustion, and the memory of subscribers that never read.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

mod common;

use common::pki::Pki;
use flowlens::cli::client::AgentAddr;
use flowlens::cli::watch::{self, WatchArgs};
use flowlens::config::{FileMode, GrpcConfig};
use flowlens::hub::{Hub, HubConfig};
use flowlens::record::api::proto;
use flowlens::record::api::proto::flow_lens_client::FlowLensClient;
use flowlens::record::flow::{DirStats, EndReason, FlowRecord, Hook};
use flowlens::sinks::grpc::{self, ServiceHandle};
use flowlens::status::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// Upper bound for anything that should happen "soon"; never the expected duration.
const WAIT: Duration = Duration::from_secs(15);

struct Server {
    hub: Hub,
    handle: Option<ServiceHandle>,
    addr: SocketAddr,
}

impl Server {
    fn start(grpc: &GrpcConfig) -> Server {
        Server::with_hub(grpc, HubConfig::default())
    }

    fn with_hub(grpc: &GrpcConfig, hub: HubConfig) -> Server {
        let hub = Hub::new(hub);
        let handle = grpc::spawn_with("127.0.0.1:0", grpc, hub.clone(), Arc::new(Status::new()))
            .expect("spawn gRPC server");
        let addr = handle.local_addr().expect("a TCP address");
        Server {
            hub,
            handle: Some(handle),
            addr,
        }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    fn subscribers(&self) -> usize {
        self.hub.stats().subscribers().count()
    }

    async fn wait_subscribers(&self, n: usize, within: Duration) -> Duration {
        let start = Instant::now();
        while self.subscribers() != n {
            assert!(
                start.elapsed() < within,
                "{} subscribers, expected {n}",
                self.subscribers()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        start.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.shutdown();
        }
    }
}

fn follow() -> proto::SubscribeRequest {
    proto::SubscribeRequest {
        follow: Some(true),
        ..Default::default()
    }
}

fn record(n: u32) -> FlowRecord {
    let now = SystemTime::now();
    FlowRecord {
        ip_version: 4,
        protocol: 17,
        client_addr: [10, 200, (n >> 8) as u8, n as u8].into(),
        client_port: 5000,
        server_addr: [10, 200, 255, 1].into(),
        server_port: 53,
        ifindex: n,
        interface: "veth-test".into(),
        first_hook: Hook::Egress,
        first_seen: now,
        last_seen: now,
        window_start: now,
        emitted: now,
        flow_id: u64::from(n),
        observer: "exposure-test".into(),
        continuation: false,
        fragment: false,
        partial: false,
        client: DirStats {
            packets: 1,
            bytes: 80,
            ttl: 64,
        },
        server: DirStats::default(),
        end_reason: EndReason::IdleTimeout,
        tcp: None,
        icmp: None,
        client_process: None,
        server_process: None,
    }
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

fn mutual_tls(pki: &Pki) -> GrpcConfig {
    GrpcConfig {
        tls_cert: Some(pki.server.0.clone()),
        tls_key: Some(pki.server.1.clone()),
        client_ca: Some(pki.ca.clone()),
        ..GrpcConfig::default()
    }
}

/// GetStatus over TLS with `identity` as the client certificate.
async fn status_over_tls(
    url: &str,
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<String, String> {
    let tls = flowlens::tls::client_config(
        url,
        Some(ca),
        identity.map(|i| i.0.as_path()),
        identity.map(|i| i.1.as_path()),
    )
    .map_err(|e| e.to_string())?
    .expect("https means TLS");
    let channel = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| flowlens::fatal::chain(&e))?;
    FlowLensClient::new(channel)
        .get_status(proto::GetStatusRequest {})
        .await
        .map(|r| r.into_inner().version)
        .map_err(|s| flowlens::fatal::status(&s))
}

fn watch_args(server: &str) -> WatchArgs {
    WatchArgs {
        query: flowlens::cli::client::FlowQuery {
            agent: AgentAddr {
                server: server.to_owned(),
                ..Default::default()
            },
            ..Default::default()
        },
        no_follow: true,
        ..WatchArgs::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_of_its_ca() {
    let pki = Pki::generate();
    let server = Server::start(&mutual_tls(&pki));
    let url = format!("https://127.0.0.1:{}", server.addr.port());

    let version = status_over_tls(&url, &pki.ca, Some(&pki.client)).await;
    assert_eq!(version.as_deref(), Ok(env!("CARGO_PKG_VERSION")));
    let anonymous = status_over_tls(&url, &pki.ca, None).await;
    eprintln!("no client certificate: {anonymous:?}");
    assert!(anonymous.is_err(), "a client without a certificate got in");
    let stranger = status_over_tls(&url, &pki.ca, Some(&pki.stranger)).await;
    eprintln!("another CA's certificate: {stranger:?}");
    assert!(stranger.is_err(), "a certificate of another CA got in");

    // `watch` with the same files, and refusing to drop TLS or ignore the flags.
    let mut args = watch_args(&url);
    args.query.agent.ca = Some(pki.ca.clone());
    args.query.agent.cert = Some(pki.client.0.clone());
    args.query.agent.key = Some(pki.client.1.clone());
    let mut out = Vec::new();
    watch::watch_to(&args, &mut out, std::future::pending())
        .await
        .expect("watch over mutual TLS");
    assert!(
        String::from_utf8_lossy(&out).contains("CLIENT"),
        "the table header"
    );

    args.query.agent.cert = None;
    args.query.agent.key = None;
    let err = watch::watch_to(&args, &mut Vec::new(), std::future::pending())
        .await
        .expect_err("watch without a client certificate");
    let err = flowlens::fatal::describe(&err);
    assert!(err.contains("give --cert and --key"), "{err}");

    let plain = format!("http://{}", server.addr);
    let err = watch::watch_to(&watch_args(&plain), &mut Vec::new(), std::future::pending())
        .await
        .expect_err("cleartext to a TLS port");
    let err = flowlens::fatal::describe(&err);
    eprintln!("cleartext to TLS: {err}");
    assert!(
        err.contains("use an https:// --server"),
        "the error says what is wrong: {err}"
    );
    let mut args = watch_args(&plain);
    args.query.agent.ca = Some(pki.ca.clone());
    let err = watch::watch_to(&args, &mut Vec::new(), std::future::pending())
        .await
        .expect_err("--ca with an http:// server");
    assert!(
        err.to_string().contains("need an https:// --server"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_a_restart() {
    let (first, second) = (Pki::generate(), Pki::generate());
    let dir = tempfile::tempdir().unwrap();
    let live = |name: &str| dir.path().join(name);
    let install = |pki: &Pki| {
        std::fs::copy(&pki.server.0, live("server.pem")).unwrap();
        std::fs::copy(&pki.server.1, live("server.key")).unwrap();
        std::fs::copy(&pki.ca, live("ca.pem")).unwrap();
    };
    install(&first);
    let grpc = GrpcConfig {
        tls_cert: Some(live("server.pem")),
        tls_key: Some(live("server.key")),
        client_ca: Some(live("ca.pem")),
        ..GrpcConfig::default()
    };
    let server = Server::start(&grpc);
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let tls = server.handle.as_ref().unwrap().tls().expect("TLS");
    assert!(status_over_tls(&url, &first.ca, Some(&first.client))
        .await
        .is_ok());

    install(&second);
    tls.reload().expect("reload");
    assert!(
        status_over_tls(&url, &second.ca, Some(&second.client))
            .await
            .is_ok(),
        "the new CA's client, after the reload"
    );
    assert!(
        status_over_tls(&url, &first.ca, Some(&first.client))
            .await
            .is_err(),
        "the old CA's client, after the reload"
    );

    // A broken file is reported and the settings in use stay.
    std::fs::write(live("server.key"), "not a key").unwrap();
    let err = tls.reload().expect_err("a broken key");
    assert!(err.to_string().starts_with("--grpc-tls-key "), "{err:#}");
    assert!(status_over_tls(&url, &second.ca, Some(&second.client))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_cleartext_port_fails_clearly() {
    let pki = Pki::generate();
    let server = Server::start(&GrpcConfig::default());
    let mut args = watch_args(&format!("https://127.0.0.1:{}", server.addr.port()));
    args.query.agent.ca = Some(pki.ca.clone());
    let err = watch::watch_to(&args, &mut Vec::new(), std::future::pending())
        .await
        .expect_err("TLS to a cleartext port");
    let err = flowlens::fatal::describe(&err);
    eprintln!("TLS to cleartext: {err}");
    assert!(err.contains("use an http:// --server"), "{err}");
}

#[test]
fn cleartext_beyond_loopback_needs_the_insecure_flag() {
    let hub = Hub::new(HubConfig::default());
    let status = Arc::new(Status::new());
    let err = grpc::spawn_with("0.0.0.0:0", &GrpcConfig::default(), hub, status)
        .expect_err("cleartext on every address");
    let err = err.to_string();
    assert!(
        err.contains("refusing to serve flows in cleartext"),
        "{err}"
    );
    assert!(err.contains("--grpc-allow-insecure"), "{err}");
    let allowed = GrpcConfig {
        allow_insecure: true,
        ..GrpcConfig::default()
    };
    grpc::GrpcEndpoint::new("0.0.0.0:0".parse().unwrap(), &allowed).expect("allowed");

    let pki = Pki::generate();
    let half = GrpcConfig {
        tls_cert: Some(pki.server.0.clone()),
        ..GrpcConfig::default()
    };
    let err = grpc::GrpcEndpoint::new("127.0.0.1:0".parse().unwrap(), &half).unwrap_err();
    assert_eq!(err.to_string(), "--grpc-tls-cert needs --grpc-tls-key");
    let swapped = GrpcConfig {
        tls_cert: Some(pki.server.0.clone()),
        tls_key: Some(pki.client.1.clone()),
        ..GrpcConfig::default()
    };
    let err = grpc::GrpcEndpoint::new("127.0.0.1:0".parse().unwrap(), &swapped).unwrap_err();
    assert!(
        flowlens::fatal::describe(&err).starts_with("--grpc-tls-cert "),
        "a key that does not match is reported by flag: {err:#}"
    );
}

// ---------------------------------------------------------------------------
// Unix socket
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_gets_the_configured_mode_and_group() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("flowlens.sock");
    let grpc = GrpcConfig {
        socket_mode: FileMode(0o640),
        socket_group: Some("65534".into()),
        ..GrpcConfig::default()
    };
    let hub = Hub::new(HubConfig::default());
    let listen = format!("unix:{}", sock.display());
    let handle =
        grpc::spawn_with(&listen, &grpc, hub, Arc::new(Status::new())).expect("unix listener");
    let meta = std::fs::metadata(&sock).expect("socket exists");
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(meta.gid(), 65534);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["flowlens.sock"], "no staging directory left");
    handle.shutdown().unwrap();

    let tcp_group = GrpcConfig {
        socket_group: Some("0".into()),
        ..GrpcConfig::default()
    };
    let err = grpc::GrpcEndpoint::new("127.0.0.1:0".parse().unwrap(), &tcp_group).unwrap_err();
    assert!(err.to_string().contains("--grpc-socket-group"), "{err}");
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

async fn subscribe_err(
    client: &mut FlowLensClient<Channel>,
    req: proto::SubscribeRequest,
) -> tonic::Status {
    match client.subscribe(req).await {
        Ok(mut s) => s.get_mut().message().await.expect_err("refused"),
        Err(s) => s,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_naming_the_limit() {
    let server = Server::start(&GrpcConfig::default());
    let mut client = FlowLensClient::new(server.channel().await);

    for list in ["include", "exclude"] {
        let many = vec![proto::Filter::default(); 65];
        let req = match list {
            "include" => proto::SubscribeRequest {
                include: many,
                ..follow()
            },
            _ => proto::SubscribeRequest {
                exclude: many,
                ..follow()
            },
        };
        let s = subscribe_err(&mut client, req).await;
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            format!("{list}: 65 filters exceed the limit of 64 (--grpc-max-filters)")
        );
    }

    let long = proto::Filter {
        interface: Some("x".repeat(100_000)),
        ..Default::default()
    };
    let s = subscribe_err(
        &mut client,
        proto::SubscribeRequest {
            include: vec![proto::Filter::default(), long],
            ..follow()
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "include[1].interface: 100000 bytes exceed the limit of 256 (--grpc-max-string-length)"
    );

    // 900,000 filters: refused by size before anything is decoded into filters.
    let s = subscribe_err(
        &mut client,
        proto::SubscribeRequest {
            include: vec![proto::Filter::default(); 900_000],
            ..follow()
        },
    )
    .await;
    assert!(
        matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{s:?}"
    );
    assert_eq!(server.subscribers(), 0);
    // The connection is still good for a proper request.
    client.subscribe(follow()).await.expect("a small request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_are_capped_and_a_slot_comes_back() {
    let grpc = GrpcConfig {
        max_subscribers: 3,
        ..GrpcConfig::default()
    };
    let server = Server::start(&grpc);
    let mut client = FlowLensClient::new(server.channel().await);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(client.subscribe(follow()).await.expect("within the cap"));
    }
    let s = subscribe_err(&mut client, follow()).await;
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("--grpc-max-subscribers"), "{s:?}");
    drop(open.pop());
    server.wait_subscribers(2, WAIT).await;
    let start = Instant::now();
    loop {
        match client.subscribe(follow()).await {
            Ok(s) => break open.push(s),
            Err(e) => assert!(start.elapsed() < WAIT, "slot never came back: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.subscribers(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_capped() {
    let grpc = GrpcConfig {
        max_streams_per_connection: 4,
        ..GrpcConfig::default()
    };
    let server = Server::start(&grpc);
    let channel = server.channel().await;
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let mut c = FlowLensClient::new(channel.clone());
            tokio::spawn(async move {
                let s = c.subscribe(follow()).await;
                tokio::time::sleep(WAIT).await;
                drop(s);
            })
        })
        .collect();
    server.wait_subscribers(4, WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(server.subscribers(), 4, "one connection, four streams");
    for t in tasks {
        t.abort();
    }
}

// ---------------------------------------------------------------------------
// Vanished and idle peers
// ---------------------------------------------------------------------------

/// A loopback TCP relay to `upstream` for one connection that, once frozen, stops
/// passing bytes either way but keeps both sockets open: a peer that vanished without a
/// FIN or RST.
async fn freezable_relay(upstream: SocketAddr) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                    mut to: tokio::net::tcp::OwnedWriteHalf,
                    mut frozen: tokio::sync::watch::Receiver<bool>| async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if *frozen.borrow() {
                    // Hold both halves open and silent until the test ends.
                    let _ = frozen.wait_for(|f| !*f).await;
                    std::future::pending::<()>().await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        tokio::join!(pump(cr, sw, frozen.clone()), pump(sr, cw, frozen));
    });
    (addr, freeze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_is_dropped_by_keepalive() {
    let grpc = GrpcConfig {
        keepalive_interval: Duration::from_millis(500),
        keepalive_timeout: Duration::from_secs(1),
        ..GrpcConfig::default()
    };
    let server = Server::start(&grpc);
    let (relay, freeze) = freezable_relay(server.addr).await;
    let channel = Endpoint::from_shared(format!("http://{relay}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let _stream = FlowLensClient::new(channel)
        .subscribe(follow())
        .await
        .expect("subscribe through the relay");
    server.wait_subscribers(1, WAIT).await;
    // Healthy while pings are answered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.subscribers(), 1, "dropped while answering pings");
    freeze.send(true).unwrap();
    let took = server.wait_subscribers(0, WAIT).await;
    assert!(
        took < Duration::from_secs(5),
        "keepalive took {took:?} to drop the vanished subscriber"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_busy_ones_are_not() {
    let idle = Duration::from_secs(1);
    let grpc = GrpcConfig {
        idle_timeout: idle,
        ..GrpcConfig::default()
    };
    let server = Server::start(&grpc);
    let mut client = FlowLensClient::new(server.channel().await);
    let mut stream = client.subscribe(follow()).await.unwrap().into_inner();

    let start = Instant::now();
    let silent: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let s = std::net::TcpStream::connect(server.addr).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s
        })
        .collect();
    let closed = tokio::task::spawn_blocking(move || {
        silent
            .into_iter()
            .map(|mut s| {
                let mut buf = [0u8; 256];
                // h2 may say GOAWAY first; the connection then ends.
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break start.elapsed(),
                        Ok(_) => continue,
                    }
                }
            })
            .max()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        closed >= idle && closed < idle * 4,
        "20 silent connections closed after {closed:?}"
    );
    // The subscriber's connection stayed: it still gets records.
    server.hub.publish(record(1));
    let msg = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a record in time")
        .expect("stream alive")
        .expect("a message");
    assert!(msg.event.is_some());
}

// ---------------------------------------------------------------------------
// Servers in a child process: only it has the low descriptor limit, and its memory is
// measured without the clients'
// ---------------------------------------------------------------------------

const CHILD_ENV: &str = "FLOWLENS_TEST_SERVER_CHILD";
/// Records the memory child publishes at start, and again for each "publish" line.
const CHILD_BATCH: u32 = 10_000;

/// Not a test of its own: the server half of the tests below, in the role `CHILD_ENV`
/// names, serving until its stdin closes.
#[test]
fn server_child() {
    let Some(role) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    env_logger::Builder::new()
        .parse_filters("flowlens=info")
        .target(env_logger::Target::Stderr)
        .init();
    let (grpc, low_fd_limit) = match role.to_str() {
        Some("accept") => (
            GrpcConfig {
                idle_timeout: Duration::from_secs(4),
                ..GrpcConfig::default()
            },
            true,
        ),
        _ => (
            GrpcConfig {
                max_subscribers: 1000,
                max_connections: 1000,
                max_connections_per_source: 1000,
                ..GrpcConfig::default()
            },
            false,
        ),
    };
    let server = Server::start(&grpc);
    server.hub.publish_all((0..CHILD_BATCH).map(record));
    if low_fd_limit {
        let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid rlimit to fill in.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        limit.rlim_cur = open + 8;
        // SAFETY: a valid rlimit; lowering the soft limit is always allowed.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    }
    println!("{}", server.addr.port());
    std::io::stdout().flush().unwrap();
    let mut next = CHILD_BATCH;
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if line == "publish" {
            server
                .hub
                .publish_all((next..next + CHILD_BATCH).map(record));
            next += CHILD_BATCH;
        }
    }
}

/// A `server_child` and its log; dropping it closes the child's stdin, which ends it.
struct ChildServer {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    port: u16,
    log: std::sync::mpsc::Receiver<String>,
}

impl ChildServer {
    fn start(role: &str) -> ChildServer {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "server_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, role)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the server child");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let port: u16 = loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "child gave no port");
            // The harness prints "test server_child ... " on the same line.
            if let Some(p) = line.split_whitespace().last().and_then(|w| w.parse().ok()) {
                break p;
            }
        };
        let (tx, log) = std::sync::mpsc::channel::<String>();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        ChildServer {
            child,
            stdin,
            port,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("child stdin");
        writeln!(stdin, "{line}").expect("write to the child");
    }

    fn rss_mb(&self) -> f64 {
        rss_mb(self.pid())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the command name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn accept_backs_off_when_descriptors_run_out() {
    let server = ChildServer::start("accept");
    let conns: Vec<_> = (0..60)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = cpu_seconds(server.pid());
    std::thread::sleep(Duration::from_secs(2));
    let busy = cpu_seconds(server.pid()) - cpu0;
    let mut lines: Vec<String> = server.log.try_iter().collect();
    let refused = lines
        .iter()
        .filter(|l| l.contains("cannot accept connections"))
        .count();
    assert_eq!(refused, 1, "one log line for the episode: {lines:#?}");
    assert!(busy < 0.3, "the accept loop used {busy:.2}s of CPU in 2s");

    // The idle timeout frees descriptors; accepting resumes and says so.
    let deadline = Instant::now() + WAIT;
    while !lines
        .iter()
        .any(|l| l.contains("accepting connections again"))
    {
        assert!(Instant::now() < deadline, "never recovered: {lines:#?}");
        if let Ok(l) = server.log.recv_timeout(Duration::from_millis(200)) {
            lines.push(l);
        }
    }
    drop(conns);
    eprintln!("accept back-off: {busy:.3}s CPU in 2s while out of descriptors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_disconnected_subscribers_is_returned() {
    const SUBSCRIBERS: usize = 200;
    let mut server = ChildServer::start("memory");
    let url = format!("http://127.0.0.1:{}", server.port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = server.rss_mb();

    let mut clients = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let channel = Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let mut c = FlowLensClient::new(channel);
        let req = proto::SubscribeRequest {
            replay: CHILD_BATCH,
            ..follow()
        };
        let stream = c.subscribe(req).await.expect("subscribe");
        clients.push((c, stream));
    }
    for _ in 0..5 {
        server.send("publish");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peak = server.rss_mb();

    drop(clients);
    let mut status = FlowLensClient::connect(url).await.expect("connect");
    let start = Instant::now();
    loop {
        let st = status
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if st.subscribers.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "{} subscribers left",
            st.subscribers.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Connections close after their streams; the agent trims once they have.
    let returned = |rss: f64| rss - baseline < (peak - baseline) * 0.25;
    let mut after = server.rss_mb();
    while !returned(after) && start.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = server.rss_mb();
    }
    eprintln!(
        "agent RSS: baseline {baseline:.1} MB, {SUBSCRIBERS} stalled subscribers {peak:.1} MB, \
         after they left {after:.1} MB ({:?} after the last left)",
        start.elapsed()
    );
    // They share the records they have not read (the hub's log): what each costs alone
    // is its connection and the messages in flight to it.
    assert!(
        peak - baseline > 8.0,
        "the stalled subscribers should have cost memory: {baseline:.1} -> {peak:.1} MB"
    );
    assert!(
        returned(after),
        "memory not returned: baseline {baseline:.1}, peak {peak:.1}, after {after:.1} MB"
    );
}

// ---------------------------------------------------------------------------
// Certificates' validity
// ---------------------------------------------------------------------------

const DAY: Duration = Duration::from_secs(86_400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_outside_their_validity_are_refused_and_expiry_is_warned_of() {
    let now = SystemTime::now();
    let listen = || "127.0.0.1:0".parse().unwrap();
    let expired = Pki::with_server_validity(Some((now - 30 * DAY, now - DAY)));
    let err = grpc::GrpcEndpoint::new(listen(), &mutual_tls(&expired)).unwrap_err();
    let err = flowlens::fatal::describe(&err);
    assert!(
        err.starts_with(&format!("--grpc-tls-cert {}: ", expired.server.0.display()))
            && err.contains("the certificate expired on "),
        "{err}"
    );
    let early = Pki::with_server_validity(Some((now + DAY, now + 30 * DAY)));
    let err = grpc::GrpcEndpoint::new(listen(), &mutual_tls(&early)).unwrap_err();
    let err = flowlens::fatal::describe(&err);
    assert!(
        err.contains("the certificate is not valid before "),
        "{err}"
    );

    // Ten days left: it serves, and says so once (and again once it has expired).
    let soon = Pki::with_server_validity(Some((now - DAY, now + 10 * DAY)));
    let server = Server::start(&mutual_tls(&soon));
    let tls = server.handle.as_ref().unwrap().tls().expect("TLS");
    let not_after = tls.not_after();
    let off = |a: SystemTime, b: SystemTime| a.duration_since(b).or(b.duration_since(a)).unwrap();
    assert!(off(not_after, now + 10 * DAY) < Duration::from_secs(2));
    let warning = tls.expiry_warning(SystemTime::now()).expect("a warning");
    assert!(
        warning.contains("expires on ") && warning.contains("(in 9 days)"),
        "{warning}"
    );
    assert_eq!(tls.expiry_warning(SystemTime::now()), None, "said once");
    let gone = tls.expiry_warning(now + 11 * DAY).expect("expired");
    assert!(gone.contains("expired on ") && gone.contains("clients cannot connect"));
    assert!(Pki::generate().ca.exists());

    // A SIGHUP that would load an expired certificate keeps the one in use.
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    std::fs::copy(&expired.server.0, &soon.server.0).unwrap();
    std::fs::copy(&expired.server.1, &soon.server.1).unwrap();
    let err = flowlens::fatal::describe(&tls.reload().unwrap_err());
    assert!(err.contains("expired on "), "{err}");
    assert_eq!(tls.not_after(), not_after);
    status_over_tls(&url, &soon.ca, Some(&soon.client))
        .await
        .expect("still served with the certificate in use");
}

// ---------------------------------------------------------------------------
// Connections that never authenticate
// ---------------------------------------------------------------------------

/// A TCP connection to `to` from loopback address `from` that sends nothing.
async fn silent_from(from: [u8; 4], to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    s.connect(to).await.expect("connect")
}

/// Whether the server closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_authenticate_are_shed_first_and_time_out() {
    let pki = Pki::generate();
    let handshake = Duration::from_secs(5);
    let grpc = GrpcConfig {
        handshake_timeout: handshake,
        max_connections: 12,
        max_connections_per_source: 4,
        ..mutual_tls(&pki)
    };
    let server = Server::start(&grpc);
    let url = format!("https://127.0.0.1:{}", server.addr.port());

    // One source's silent connections: past 4, its oldest are closed at once (long
    // before the handshake timeout), the newest 4 stay.
    let start = Instant::now();
    let mut one = Vec::new();
    for _ in 0..10 {
        one.push(silent_from([127, 0, 0, 2], server.addr).await);
    }
    for (i, s) in one.iter_mut().take(6).enumerate() {
        assert!(
            closed_within(s, WAIT).await,
            "connection {i} was never shed"
        );
    }
    let shed_after = start.elapsed();
    for (i, s) in one.iter_mut().enumerate().skip(6) {
        assert!(
            !closed_within(s, Duration::from_millis(100)).await,
            "connection {i} was closed with the others: shed {shed_after:?} after the first"
        );
    }
    assert!(shed_after < handshake, "shed after {shed_after:?}");

    // The handshake timeout closes the rest, and not before it.
    for s in one.iter_mut().skip(6) {
        assert!(closed_within(s, WAIT).await, "never timed out");
    }
    let took = start.elapsed();
    assert!(
        took >= handshake - Duration::from_millis(200),
        "closed after {took:?}, before the handshake timeout"
    );
    eprintln!("shed in {shed_after:?}; the newest closed {took:?} after the first opened");

    // Many sources past the cap in all: clients that authenticate still get in, each on a
    // new connection, since every connection that has not authenticated goes first.
    let mut flood = Vec::new();
    for n in 0..30u8 {
        flood.push(silent_from([127, 0, 1, 10 + n % 5], server.addr).await);
        let version = status_over_tls(&url, &pki.ca, Some(&pki.client)).await;
        assert_eq!(
            version.as_deref(),
            Ok(env!("CARGO_PKG_VERSION")),
            "call {n}"
        );
    }
    let mut shed = 0;
    for s in &mut flood {
        shed += usize::from(closed_within(s, Duration::from_millis(50)).await);
    }
    assert!(shed >= 30 - 12, "only {shed} of 30 shed at a cap of 12");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleartext_connection_must_send_the_http2_preface_in_time() {
    let grpc = GrpcConfig {
        handshake_timeout: Duration::from_secs(1),
        ..GrpcConfig::default()
    };
    let server = Server::start(&grpc);
    let mut silent = silent_from([127, 0, 0, 1], server.addr).await;
    let mut speaking = silent_from([127, 0, 0, 1], server.addr).await;
    speaking
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let start = Instant::now();
    assert!(closed_within(&mut silent, WAIT).await);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");
    // The one that spoke HTTP/2 is past its handshake: it waits for the idle timeout (2 min).
    assert!(!closed_within(&mut speaking, Duration::from_secs(1)).await);
}

// ---------------------------------------------------------------------------
// Long-lived streams: health Watch and reflection
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_streams_count_against_the_stream_limit() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let grpc = GrpcConfig {
        max_subscribers: 2,
        ..GrpcConfig::default()
    };
    let server = Server::start(&grpc);
    let channel = server.channel().await;
    let watch = || HealthCheckRequest {
        service: "flowlens.v1.FlowLens".into(),
    };
    let mut health = HealthClient::new(channel.clone());
    let mut watcher = health.watch(watch()).await.expect("a watch").into_inner();
    watcher.message().await.expect("status").expect("SERVING");

    // A reflection session kept open (its request stream not closed).
    let (req_tx, req_rx) = tokio::sync::mpsc::channel(1);
    req_tx
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .expect("reflection")
        .into_inner();
    reflection
        .message()
        .await
        .expect("listing")
        .expect("a response");

    // Both places are taken: Subscribe and another watch are refused, naming the flag.
    let mut client = FlowLensClient::new(channel.clone());
    let s = subscribe_err(&mut client, follow()).await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("--grpc-max-subscribers"), "{s:?}");
    let s = match health.watch(watch()).await {
        Ok(mut w) => w.get_mut().message().await.expect_err("refused"),
        Err(s) => s,
    };
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("health Watch"), "{s:?}");
    // Unary calls are not long-lived streams: still answered.
    client
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("GetStatus");

    drop(watcher);
    let start = Instant::now();
    loop {
        match client.subscribe(follow()).await {
            Ok(_) => break,
            Err(e) => assert!(
                start.elapsed() < WAIT,
                "the watch's place never came back: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(req_tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watcher_does_not_hold_up_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut server = Server::start(&GrpcConfig::default());
    let mut watcher = HealthClient::new(server.channel().await)
        .watch(HealthCheckRequest {
            service: "flowlens.v1.FlowLens".into(),
        })
        .await
        .expect("a watch")
        .into_inner();
    let first = watcher.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let handle = server.handle.take().unwrap();
    let start = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || handle.shutdown());
    let next = watcher
        .message()
        .await
        .expect("a status")
        .expect("a message");
    assert_eq!(next.status(), ServingStatus::NotServing, "told first");
    let end = watcher.message().await;
    match &end {
        Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        Ok(None) => {}
        Ok(Some(m)) => panic!("another status after NOT_SERVING: {m:?}"),
    }
    stopped.await.unwrap().expect("a clean stop");
    let took = start.elapsed();
    eprintln!("shutdown with a health watcher: {took:?} ({end:?})");
    // The drain used to wait out its 5 s grace for the watcher.
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
}

// ---------------------------------------------------------------------------
// A request trickled a byte at a time
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_is_cut_at_the_request_timeout() {
    let grpc = GrpcConfig {
        request_timeout: Duration::from_secs(1),
        ..GrpcConfig::default()
    };
    let server = Server::start(&grpc);
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // h2 answers the server's PINGs by itself, as a live but slow client would.
    let (mut h2, conn) = h2::client::handshake(tcp).await.expect("HTTP/2");
    tokio::spawn(conn);
    let req = http::Request::post(format!(
        "http://{}/flowlens.v1.FlowLens/GetStatus",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut body) = h2.send_request(req, false).expect("a stream");
    // A message of 100 bytes announced, then one byte every 300 ms.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 100]), false)
        .unwrap();
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if body
                .send_data(bytes::Bytes::from_static(&[0]), false)
                .is_err()
            {
                break;
            }
        }
    });
    let start = Instant::now();
    let response = tokio::time::timeout(WAIT, response)
        .await
        .expect("an answer in time")
        .expect("a response");
    let code = |h: &http::HeaderMap| h.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    let mut status = code(response.headers());
    if status.is_none() {
        let trailers = tokio::time::timeout(WAIT, response.into_body().trailers())
            .await
            .expect("trailers in time")
            .expect("trailers");
        status = trailers.as_ref().and_then(code);
    }
    let took = start.elapsed();
    trickle.abort();
    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    assert!(took >= Duration::from_millis(900), "cut after {took:?}");
    eprintln!("trickled request cut after {took:?}");
}

// ---------------------------------------------------------------------------
// A flood of connections that never authenticate, against the agent itself
// ---------------------------------------------------------------------------

/// The agent's descriptor limit in the flood test, as the report had it.
const FLOOD_NOFILE: u64 = 256;
/// Connections the flood opens (to both ports), and how fast.
const FLOOD_CONNECTIONS: usize = 600;
const FLOOD_PACE: Duration = Duration::from_millis(10);

/// `flowlens run` in namespace `ns` with its descriptor limit lowered to `nofile`.
fn start_agent_with_nofile(ns: &str, nofile: u64, args: &[&str]) -> common::bin::Running {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns, common::bin::BIN, "run"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn flowlens");
    common::bin::Running {
        stdout: common::bin::lines(child.stdout.take().unwrap()),
        stderr: common::bin::lines(child.stderr.take().unwrap()),
        child,
        err_seen: Vec::new(),
    }
}

/// Raises this test process's descriptor limit: the flood's sockets stay open here.
fn raise_own_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers; raising the soft limit to the hard one is allowed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    assert!(
        lim.rlim_cur >= 2 * FLOOD_CONNECTIONS as u64,
        "descriptor limit {}",
        lim.rlim_cur
    );
}

/// GET /metrics over a new connection; the status line, or what went wrong.
fn scrape_once(addr: SocketAddr) -> Result<String, String> {
    let mut c = std::net::TcpStream::connect_timeout(&addr, WAIT).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: flowlens\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    c.read_to_string(&mut body).map_err(|e| e.to_string())?;
    if !body.starts_with("HTTP/1.1 200") {
        return Err(format!("answered {:?}", body.lines().next()));
    }
    Ok(body)
}

#[test]
fn a_flood_of_silent_connections_locks_out_neither_mtls_clients_nor_scrapers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    raise_own_nofile();
    let net = common::netns::NetPair::new();
    let now = SystemTime::now();
    let pki = Pki::with_server_validity(Some((now - DAY, now + 10 * DAY)));
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (cert, key, ca) = (path(&pki.server.0), path(&pki.server.1), path(&pki.ca));
    let grpc_addr: SocketAddr = "127.0.0.1:50051".parse().unwrap();
    let metrics_addr: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let fresh_if = format!("fz{}", std::process::id() % 100_000);
    let fresh_pattern = format!("{fresh_if}*");
    let mut agent = start_agent_with_nofile(
        &net.a,
        FLOOD_NOFILE,
        &[
            "--interface",
            &net.if_a,
            "--interface",
            &fresh_pattern,
            "--output",
            "none",
            "--pin-dir",
            "off",
            "--grpc-listen",
            "127.0.0.1:50051",
            "--grpc-tls-cert",
            &cert,
            "--grpc-tls-key",
            &key,
            "--grpc-client-ca",
            &ca,
            "--metrics-listen",
            "127.0.0.1:9464",
        ],
    );
    agent.wait_log("metrics on http://127.0.0.1:9464", WAIT);
    agent.wait_log(&format!("attached to {}", net.if_a), WAIT);
    let lowered = agent
        .err_seen
        .iter()
        .find(|l| l.contains("--grpc-max-connections 1024 lowered to"))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no cap fitted to {FLOOD_NOFILE} descriptors: {:#?}",
                agent.err_seen
            )
        });
    assert!(
        agent
            .err_seen
            .iter()
            .any(|l| l.contains("expires on") && l.contains("(in 9 days)")),
        "the certificate's coming expiry is said at start: {:#?}",
        agent.err_seen
    );
    eprintln!("{lowered}");

    // The flood: silent connections from eight loopback sources to both ports, held open.
    let done = Arc::new(AtomicBool::new(false));
    let flood = {
        let done = done.clone();
        net.in_ns(&net.a, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let held = rt.block_on(async {
                let mut held = Vec::new();
                for i in 0..FLOOD_CONNECTIONS {
                    let from = [127, 0, 0, 2 + (i % 8) as u8];
                    let to = if i % 2 == 0 { grpc_addr } else { metrics_addr };
                    let s = tokio::net::TcpSocket::new_v4().unwrap();
                    s.bind(SocketAddr::from((from, 0))).unwrap();
                    if let Ok(Ok(c)) = tokio::time::timeout(WAIT, s.connect(to)).await {
                        held.push(c);
                    }
                    tokio::time::sleep(FLOOD_PACE).await;
                }
                held
            });
            done.store(true, Ordering::Release);
            (held.len(), rt, held)
        })
    };

    // Meanwhile: an mTLS client asks GetStatus every 100 ms, each time on a new
    // connection, and a scraper scrapes as often.
    let grpc_calls = {
        let (done, ca, client) = (done.clone(), pki.ca.clone(), pki.client.clone());
        net.in_ns(&net.a, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let url = format!("https://{grpc_addr}");
            let mut results = Vec::new();
            while !done.load(Ordering::Acquire) && results.len() < 200 {
                let t = Instant::now();
                let r = rt.block_on(async {
                    tokio::time::timeout(WAIT, status_over_tls(&url, &ca, Some(&client)))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {WAIT:?}")))
                });
                results.push((r, t.elapsed()));
                std::thread::sleep(Duration::from_millis(100));
            }
            results
        })
    };
    let scrapes = {
        let done = done.clone();
        net.in_ns(&net.a, move || {
            let mut results = Vec::new();
            while !done.load(Ordering::Acquire) && results.len() < 200 {
                let t = Instant::now();
                results.push((scrape_once(metrics_addr).map(drop), t.elapsed()));
                std::thread::sleep(Duration::from_millis(100));
            }
            results
        })
    };
    // An interface that appears mid-flood is attached: interface sync keeps descriptors.
    std::thread::sleep(Duration::from_secs(2));
    common::netns::sh(&[
        "ip",
        "-n",
        &net.a,
        "link",
        "add",
        &fresh_if,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{fresh_if}p"),
    ]);
    common::netns::sh(&["ip", "-n", &net.a, "link", "set", &fresh_if, "up"]);
    agent.wait_log(&format!("attached to {fresh_if}"), WAIT);

    let grpc_calls = grpc_calls.join().expect("gRPC client");
    let scrapes = scrapes.join().expect("scraper");
    let (opened, _rt, held) = flood.join().expect("flood");
    let failed: Vec<_> = grpc_calls.iter().filter(|(r, _)| r.is_err()).collect();
    let failed_scrapes: Vec<_> = scrapes.iter().filter(|(r, _)| r.is_err()).collect();
    fn slowest<T>(v: &[(Result<T, String>, Duration)]) -> Option<Duration> {
        v.iter().map(|(_, t)| *t).max()
    }
    eprintln!(
        "flood: {opened} silent connections; {} GetStatus calls over mTLS (slowest {:?}), {} scrapes (slowest {:?})",
        grpc_calls.len(),
        slowest(&grpc_calls),
        scrapes.len(),
        slowest(&scrapes)
    );
    assert_eq!(
        opened, FLOOD_CONNECTIONS,
        "every flood connection was accepted by the kernel"
    );
    assert!(failed.is_empty(), "GetStatus calls failed: {failed:#?}");
    assert!(
        failed_scrapes.is_empty(),
        "scrapes failed: {failed_scrapes:#?}"
    );
    assert!(
        grpc_calls.len() >= 20 && scrapes.len() >= 20,
        "too few calls to tell"
    );

    // The expiry is a metric; descriptors never ran out; shedding was said once a port.
    let body = net
        .in_ns(&net.a, move || scrape_once(metrics_addr))
        .join()
        .unwrap()
        .expect("a scrape after the flood");
    let expiry: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("flowlens_tls_cert_expiry_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no expiry metric in {body}"));
    let want = (now + 10 * DAY)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((expiry - want).abs() < 2.0, "expiry {expiry}, want {want}");
    drop(held);
    let mut log: Vec<String> = agent.err_seen.clone();
    log.extend(agent.stderr.try_iter());
    let (status, _) = agent.stop();
    assert!(status.success(), "{status:?}");
    let log = log.join("\n");
    assert!(
        !log.contains("cannot accept"),
        "descriptors ran out:\n{log}"
    );
    assert!(!log.contains("interface sync"), "{log}");
    // Both caps were reached (the flood exceeded them), and each said so once.
    for listener in [
        "gRPC: at a connection cap",
        "metrics endpoint: at a connection cap",
    ] {
        assert_eq!(
            log.matches(listener).count(),
            1,
            "{listener}: once for the episode:\n{log}"
        );
    }
}
