//! The record pipeline's isolation: a blocked stdout or a costly subscriber slows no other sink, and shutdown stays prompt.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::netns::NetPair;
use flowlens::config::GrpcConfig;
use flowlens::hub::{Hub, HubConfig};
use flowlens::record::api::proto::flow_lens_client::FlowLensClient;
use flowlens::record::api::proto::subscribe_response::Event;
use flowlens::record::api::{proto, RequestLimits};
use flowlens::record::flow::{DirStats, EndReason, FlowRecord, Hook};
use flowlens::sinks::grpc;
use flowlens::status::Status;

const BIN: &str = env!("CARGO_BIN_EXE_flowlens");

/// Killed however the test ends, so a failed assertion leaves no agent behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `flowlens run --output json` with 30,000 live flows, SIGTERM, stdout read through a
/// pipe at a few MB/s (the shutdown flush takes seconds to read): every line is a whole
/// JSON record, each record once, as many as the agent says it emitted and wrote.
#[test]
fn every_record_flushed_at_shutdown_reaches_a_slow_stdout_pipe_whole() {
    const FLOWS: u16 = 30_000;
    let net = NetPair::new();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &net.a, BIN, "run", "--output", "json"])
        .args(["--interface", &net.if_a, "--pin-dir", "off"])
        .args(["--grpc-listen", "off", "--metrics-listen", "off"])
        // Nothing ends before the SIGTERM: the flush at shutdown emits every flow.
        .args(["--poll-interval", "200ms", "--idle-timeout-udp", "10m"])
        .args(["--idle-timeout-icmp", "10m"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowlens");
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let mut agent = KillOnDrop(child);
    let log = common::bin::lines(stderr.expect("stderr"));
    // A slow reader: 8 KiB at a time, a millisecond apart (about 5 MB/s at most).
    let reader = std::thread::spawn(move || {
        let mut out = stdout.expect("stdout");
        let (mut all, mut buf) = (Vec::new(), [0u8; 8192]);
        loop {
            match std::io::Read::read(&mut out, &mut buf) {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log
        .recv_deadline(deadline)
        .expect("the agent attaches")
        .contains("monitoring")
    {}

    // One datagram from each of FLOWS source ports to an echo server, which answers it:
    // FLOWS UDP flows, live until the SIGTERM.
    let (a, b) = (net.v4_a, net.v4_b);
    let echo = net.in_ns(&net.b, move || {
        let s = UdpSocket::bind(SocketAddr::new(b, 0)).expect("bind the echo server");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let port = s.local_addr().expect("addr").port();
        (s, port)
    });
    let (echo, port) = echo.join().expect("echo server");
    let echoing = std::thread::spawn(move || {
        let (mut n, mut buf) = (0u32, [0u8; 64]);
        while let Ok((len, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..len], from);
            n += 1;
        }
        n
    });
    net.in_ns(&net.a, move || {
        for p in 20_000..20_000 + FLOWS {
            let s = UdpSocket::bind(SocketAddr::new(a, p)).expect("bind a source port");
            s.send_to(&[7u8; 16], SocketAddr::new(b, port))
                .expect("send");
        }
    })
    .join()
    .expect("traffic");
    // The echo server stops 2 s after the last datagram. One its socket dropped leaves
    // its flow unanswered (in probation), flushed at shutdown all the same.
    let echoed = echoing.join().expect("echo thread");

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) }, 0);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = agent.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(45),
            "the agent did not stop within 45 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    let took = t0.elapsed();
    let out = reader.join().expect("stdout reader");
    let text = String::from_utf8(out).expect("UTF-8 on stdout");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "stdout ends in a cut line"
    );
    let mut seqs = std::collections::BTreeSet::new();
    let mut udp = 0;
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("line {} of stdout is not a record ({e}): {l:?}", i + 1));
        assert!(
            seqs.insert(v["seq"].as_u64().expect("seq")),
            "seq twice: {l}"
        );
        udp += usize::from(v["protocol"] == 17 && v["server_port"] == port);
    }
    // "N records emitted; stdout: M written", the agent's last words about its output.
    let log: Vec<String> = log.try_iter().collect();
    let last = log
        .iter()
        .find(|l| l.contains("records emitted"))
        .unwrap_or_else(|| panic!("no count of records emitted in the log: {log:#?}"));
    let number = |before: &str| -> usize {
        last.split(before)
            .next()
            .and_then(|h| h.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number before {before:?} in {last:?}"))
    };
    let (emitted, written) = (number(" records emitted"), number(" written"));
    eprintln!(
        "{echoed} of {FLOWS} datagrams echoed; {} lines read in {took:?} after SIGTERM; \
         the agent: {last}",
        seqs.len()
    );
    assert_eq!(udp, usize::from(FLOWS), "one record per UDP flow");
    assert_eq!(written, emitted, "{last}");
    assert_eq!(seqs.len(), emitted, "records on stdout against {last}");
    assert_eq!(
        seqs.last().copied(),
        Some(emitted as u64),
        "seqs run from 1 to {emitted}"
    );
}

/// `flowlens run --output table | sleep 60`, as a test: stdout is a pipe nobody reads.
/// Every flow still reaches a gRPC subscriber, stdout's losses are counted once it is a
/// whole buffer behind, and SIGTERM ends the agent within 5 s.
#[test]
fn a_blocked_stdout_holds_up_neither_subscribers_nor_shutdown() {
    // In rounds that each end together well within the buffer (256 KiB, about 1,800 of
    // these records), while all of them are twice what it holds.
    const FLOWS: usize = 4000;
    const ROUND: usize = 500;
    let net = NetPair::new();
    let sock = format!("/tmp/flowlens-pipeline-{}.sock", std::process::id());
    let listen = format!("unix:{sock}");
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &net.a, BIN, "run", "--output", "table"])
        .args(["--interface", &net.if_a, "--pin-dir", "off"])
        .args(["--poll-interval", "100ms", "--idle-timeout-udp", "1s"])
        .args(["--buffer-memory", "256KiB"])
        .args([
            "--grpc-listen",
            &listen,
            "--metrics-listen",
            "127.0.0.1:9464",
        ])
        // Piped and never read: after ~64 KiB the agent's stdout blocks for good.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowlens");
    let stderr = agent.stderr.take().expect("stderr");
    let mut agent = KillOnDrop(agent);
    let (log_tx, log) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = log_tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !log
        .recv_deadline(deadline)
        .expect("the agent attaches")
        .contains("monitoring")
    {}

    let port = 41_000 + (std::process::id() % 10_000) as u16;
    let mut watch = Command::new(BIN)
        .args(["watch", "--server", &listen, "--json", "--proto", "udp"])
        .args(["--dport", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch");
    let out = watch.stdout.take().expect("stdout");
    let _watch = KillOnDrop(watch);
    let (rec_tx, records) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = rec_tx.send(l);
        }
    });
    std::thread::sleep(Duration::from_millis(500));

    // One datagram from each of FLOWS sockets: FLOWS flows, each ending after 1 s idle.
    let (a, b) = (net.v4_a, net.v4_b);
    net.in_ns(&net.a, move || {
        for round in 0..FLOWS / ROUND {
            if round > 0 {
                std::thread::sleep(Duration::from_millis(250));
            }
            for _ in 0..ROUND {
                let s = UdpSocket::bind(SocketAddr::new(a, 0)).expect("bind");
                s.send_to(&[7u8; 32], SocketAddr::new(b, port))
                    .expect("send");
            }
        }
    })
    .join()
    .expect("traffic");

    // An ephemeral port can come round again within the idle timeout, making one flow
    // of two datagrams: count datagrams.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = 0;
    while got < FLOWS as u64 {
        let line = records.recv_deadline(deadline).unwrap_or_else(|_| {
            panic!("the subscriber got {got} of {FLOWS} datagrams while stdout was blocked")
        });
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        got += v["client"]["packets"].as_u64().expect("packets");
    }
    assert_eq!(got, FLOWS as u64);

    let body = net.scrape(&net.a, "127.0.0.1:9464");
    let lost: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("flowlens_sink_lost_records_total{sink=\"stdout\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stdout loss counter in {body}"));
    assert!(
        lost > 0.0,
        "a blocked stdout must lose records, and count them"
    );

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) }, 0);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = agent.0.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            panic!("the agent did not stop within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    eprintln!("SIGTERM to exit with stdout blocked: {took:?}; stdout lost {lost} records");
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    let _ = std::fs::remove_file(&sock);
}

fn rec(i: u32) -> FlowRecord {
    FlowRecord {
        flow_id: u64::from(i),
        observer: "test".into(),
        ip_version: 4,
        protocol: 17,
        client_addr: IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1)),
        client_port: 1,
        server_addr: IpAddr::V4(Ipv4Addr::new(10, 9, 0, 2)),
        server_port: 53,
        ifindex: i,
        interface: "test0".into(),
        first_hook: Hook::Egress,
        first_seen: SystemTime::now(),
        last_seen: SystemTime::now(),
        window_start: SystemTime::now(),
        emitted: SystemTime::now(),
        continuation: false,
        fragment: false,
        partial: false,
        client: DirStats {
            packets: 1,
            bytes: 60,
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

/// Publishes `n` records `gap` apart and returns subscriber A's mean latency (publish to
/// receipt), with a second subscriber holding `filters` filters that never match.
async fn mean_latency(n: u32, gap: Duration, filters: usize) -> Duration {
    let hub = Hub::new(HubConfig::default());
    // An operator who raised the request limits this far, so the heavy subscriber gets in.
    let grpc = GrpcConfig {
        max_request_size: 64 << 20,
        request_limits: RequestLimits {
            max_filters: filters.max(1),
            ..RequestLimits::default()
        },
        ..GrpcConfig::default()
    };
    let svc = grpc::spawn_with("127.0.0.1:0", &grpc, hub.clone(), Arc::new(Status::new())).unwrap();
    let url = format!("http://{}", svc.local_addr().unwrap());
    let mut heavy_stream = None;
    if filters > 0 {
        let include = (0..filters)
            .map(|i| proto::Filter {
                src_cidr: Some(format!(
                    "198.{}.{}.{}/32",
                    18 + i / 65536,
                    i / 256 % 256,
                    i % 256
                )),
                ..Default::default()
            })
            .collect();
        let mut c = FlowLensClient::connect(url.clone())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20);
        let s = c
            .subscribe(proto::SubscribeRequest {
                include,
                ..Default::default()
            })
            .await
            .expect("a subscriber with many filters is accepted")
            .into_inner();
        heavy_stream = Some(s);
    }
    // The heavy subscriber reads what it gets (nothing matches: loss reports at most).
    let heavy = heavy_stream.map(|mut s| {
        tokio::spawn(async move {
            let mut events = 0u64;
            while let Ok(Some(_)) = s.message().await {
                events += 1;
            }
            events
        })
    });
    let mut a = FlowLensClient::connect(url)
        .await
        .unwrap()
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let published: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let publisher = {
        let (hub, published) = (hub.clone(), published.clone());
        std::thread::spawn(move || {
            for i in 0..n {
                published.lock().unwrap().push(Instant::now());
                hub.publish(rec(i));
                std::thread::sleep(gap);
            }
        })
    };
    let mut total = Duration::ZERO;
    let mut got = 0;
    while got < n {
        let msg = tokio::time::timeout(Duration::from_secs(30), a.message())
            .await
            .expect("subscriber A keeps receiving")
            .expect("stream")
            .expect("message");
        let now = Instant::now();
        if let Some(Event::Flows(b)) = msg.event {
            let sent = published.lock().unwrap();
            for r in &b.records {
                total += now - sent[r.ifindex as usize];
                got += 1;
            }
        }
    }
    publisher.join().unwrap();
    drop(a);
    svc.shutdown().unwrap();
    if let Some(h) = heavy {
        let _ = h.await;
    }
    total / n
}

/// Issue 10's bound: a subscriber with 100,000 filters changes another subscriber's
/// latency by at most 20 %. Filters run on each subscriber's own task, in slices, so the
/// heavy one burns its own time, not the others'. Records now go out as soon as they are
/// published (no batching delay), so the latency is well under a millisecond and the heavy
/// subscriber's filtering (2-4 ms of CPU per record here, most of a vCPU of the two) adds
/// OS scheduling delay of that order: the bound allows 1.5 ms on top, less than one
/// record's filtering, which a subscriber waiting on another's filters would pay each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_with_100k_filters_does_not_slow_another() {
    const N: u32 = 300;
    const GAP: Duration = Duration::from_millis(4);
    // Interleaved, best of two each, so a burst of noise on this shared machine does not
    // decide the outcome.
    let mut base = Duration::MAX;
    let mut heavy = Duration::MAX;
    for _ in 0..2 {
        base = base.min(mean_latency(N, GAP, 0).await);
        heavy = heavy.min(mean_latency(N, GAP, 100_000).await);
    }
    eprintln!("mean latency: alone {base:?}, beside 100k filters {heavy:?}");
    assert!(
        heavy.as_secs_f64() <= base.as_secs_f64() * 1.2 + 0.0015,
        "latency alone {base:?}, beside a 100k-filter subscriber {heavy:?}"
    );
}
