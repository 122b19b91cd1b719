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
        client: DirStats {
            packets: 1,
            bytes: 80,
            ttl: 64,
        },
        server: DirStats::default(),
        end_reason: EndReason::IdleTimeout,
        tcp: None,
        icmp: None,
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
