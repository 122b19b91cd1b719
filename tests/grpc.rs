//! Service tests: a real tonic server on a real socket, driven by real tonic clients, fed through `Hub::publish`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowlens::api::proto;
use flowlens::api::proto::flow_lens_client::FlowLensClient;
use flowlens::api::proto::subscribe_response::Event;
use flowlens::client::FlowQuery;
use flowlens::flow::{DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, TcpInfo, TcpState};
use flowlens::hub::{Hub, HubConfig};
use flowlens::service::{self, ServiceHandle};
use flowlens::snapshot::SnapshotSlot;
use flowlens::status::{MapUsage, Status};
use flowlens::watch::{self, WatchArgs};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

/// Upper bound for anything that should happen "soon"; never the expected duration.
const WAIT: Duration = Duration::from_secs(15);

use flowlens::flow::tcp_flags::{ACK, FIN, PSH, RST, SYN};

struct Agent {
    hub: Hub,
    status: Arc<Status>,
    snapshots: SnapshotSlot,
    handle: Option<ServiceHandle>,
    addr: SocketAddr,
}

impl Agent {
    fn start() -> Agent {
        Agent::with_config(HubConfig::default())
    }

    fn with_config(cfg: HubConfig) -> Agent {
        Agent::on("127.0.0.1:0", cfg)
    }

    fn on(listen: &str, cfg: HubConfig) -> Agent {
        let hub = Hub::new(cfg);
        let status = Arc::new(Status::new());
        let snapshots = SnapshotSlot::new(Duration::from_millis(100));
        let handle = service::spawn_with_snapshots(
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

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self) -> FlowLensClient<Channel> {
        FlowLensClient::new(self.channel().await)
    }

    async fn subscribe(&self, req: proto::SubscribeRequest) -> Streaming<proto::SubscribeResponse> {
        self.client()
            .await
            .subscribe(req)
            .await
            .expect("subscribe")
            .into_inner()
    }

    fn shutdown(mut self) {
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

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

/// A TCP record; `id` goes into ifindex so tests can tell records apart.
fn rec(id: u32) -> FlowRecord {
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
        continuation: false,
        fragment: false,
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
    }
}

fn tcp_flags(r: &mut FlowRecord, c: u8, s: u8) {
    let t = r.tcp.as_mut().unwrap();
    t.client_flags = c;
    t.server_flags = s;
}

/// Six records differing in every filterable field.
fn corpus() -> Vec<FlowRecord> {
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

fn cidr(s: &str) -> Option<String> {
    Some(s.to_owned())
}

fn ports(lo: u32, hi: Option<u32>) -> Option<proto::PortRange> {
    Some(proto::PortRange { lo, hi })
}

fn replay_all(include: Vec<proto::Filter>, exclude: Vec<proto::Filter>) -> proto::SubscribeRequest {
    proto::SubscribeRequest {
        include,
        exclude,
        replay: 1_000_000,
        since: None,
        follow: Some(false),
        after_seq: None,
    }
}

#[derive(Debug, Default)]
struct Received {
    ids: Vec<u32>,
    batches: Vec<usize>,
    lost: Vec<u64>,
    records: Vec<proto::FlowRecord>,
}

impl Received {
    fn absorb(&mut self, msg: proto::SubscribeResponse) {
        match msg.event.expect("event set") {
            Event::Flows(b) => {
                self.batches.push(b.records.len());
                self.ids.extend(b.records.iter().map(|r| r.ifindex));
                self.records.extend(b.records);
            }
            Event::Lost(l) => {
                assert_eq!(l.reason(), proto::LostReason::QueueFull);
                self.lost.push(l.count);
            }
        }
    }

    fn total_lost(&self) -> u64 {
        self.lost.iter().sum()
    }
}

/// Next message, failing the test instead of hanging.
async fn next(s: &mut Streaming<proto::SubscribeResponse>) -> Option<proto::SubscribeResponse> {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("timed out waiting for a stream message")
        .expect("stream error")
}

/// Everything until end of stream.
async fn drain(mut s: Streaming<proto::SubscribeResponse>) -> Received {
    let mut r = Received::default();
    while let Some(m) = next(&mut s).await {
        r.absorb(m);
    }
    r
}

/// Reads until `done` holds for what was received.
async fn read_until(
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

async fn ids_for(
    agent: &Agent,
    include: Vec<proto::Filter>,
    exclude: Vec<proto::Filter>,
) -> Vec<u32> {
    let s = agent.subscribe(replay_all(include, exclude)).await;
    drain(s).await.ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_round_trip_with_optional_fields() {
    let agent = Agent::start();
    let mut s = agent.subscribe(proto::SubscribeRequest::default()).await;
    let recs = corpus();
    for r in &recs {
        agent.hub.publish(r.clone());
    }
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| r.ids.len() >= recs.len()).await;
    let back: Vec<FlowRecord> = got
        .records
        .iter()
        .map(|p| FlowRecord::try_from(p).unwrap())
        .collect();
    assert_eq!(back, recs);

    // Absent optionals stay absent on the wire, zero values stay present.
    let p = &got.records[0];
    assert_eq!(p.client_addr, "10.0.0.1");
    assert_eq!(p.ip_version(), proto::IpVersion::IpVersion4);
    assert_eq!(p.end_reason(), proto::EndReason::TcpFin);
    assert_eq!(p.first_hook(), proto::Hook::Egress);
    let tcp = p.tcp.as_ref().unwrap();
    assert_eq!(tcp.handshake_client_ns, Some(120_000));
    assert_eq!(tcp.handshake_server_ns, None);
    assert!(tcp.client_latency.is_none());
    assert_eq!(tcp.server_latency.as_ref().unwrap().jitter_ns, None);
    assert!(p.icmp.is_none());
    let icmp = got.records[4].icmp.as_ref().unwrap();
    assert_eq!(icmp.client_code, Some(0));
    assert_eq!(icmp.server_type, None);
    assert_eq!(
        got.records[0].first_seen,
        Some(prost_types::Timestamp::from(t(1)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_streams_carry_the_same_records_and_seq_numbers() {
    use tonic::codec::CompressionEncoding;
    let agent = Agent::start();
    let recs = corpus();
    for (enc, name) in [
        (CompressionEncoding::Zstd, "zstd"),
        (CompressionEncoding::Gzip, "gzip"),
    ] {
        let s = agent
            .client()
            .await
            .accept_compressed(enc)
            .subscribe(proto::SubscribeRequest::default())
            .await
            .unwrap();
        assert_eq!(
            s.metadata()
                .get("grpc-encoding")
                .map(|v| v.to_str().unwrap()),
            Some(name),
            "the server compresses what the client accepts"
        );
        let mut s = s.into_inner();
        for r in &recs {
            agent.hub.publish(r.clone());
        }
        let mut got = Received::default();
        read_until(&mut s, &mut got, |r| r.ids.len() >= recs.len()).await;
        let back: Vec<FlowRecord> = got
            .records
            .iter()
            .map(|p| FlowRecord::try_from(p).unwrap())
            .collect();
        assert_eq!(back, recs);
        let seqs: Vec<u64> = got.records.iter().map(|p| p.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_each_field() {
    let agent = Agent::start();
    for r in corpus() {
        agent.hub.publish(r);
    }
    let f = proto::Filter::default;
    let pf = |p: u32| proto::Filter {
        protocol: Some(p),
        ..f()
    };
    let cases: Vec<(&str, proto::Filter, Vec<u32>)> = vec![
        ("empty", f(), vec![1, 2, 3, 4, 5, 6]),
        (
            "src_cidr v4",
            proto::Filter {
                src_cidr: cidr("10.0.0.0/24"),
                ..f()
            },
            vec![1, 2],
        ),
        (
            "src_cidr host bits",
            proto::Filter {
                src_cidr: cidr("10.0.0.77/24"),
                ..f()
            },
            vec![1, 2],
        ),
        (
            "dst_cidr v4",
            proto::Filter {
                dst_cidr: cidr("10.0.0.0/24"),
                ..f()
            },
            vec![4, 6],
        ),
        (
            "cidr either",
            proto::Filter {
                cidr: cidr("10.0.0.1"),
                ..f()
            },
            vec![1, 4],
        ),
        (
            "cidr v6",
            proto::Filter {
                cidr: cidr("2001:db8::/32"),
                ..f()
            },
            vec![3],
        ),
        (
            "dst_cidr v6 /128",
            proto::Filter {
                dst_cidr: cidr("2001:db8:1::80/128"),
                ..f()
            },
            vec![3],
        ),
        (
            "v4 cidr never matches v6",
            proto::Filter {
                cidr: cidr("0.0.0.0/0"),
                ..f()
            },
            vec![1, 2, 4, 6],
        ),
        (
            "src_port range inclusive",
            proto::Filter {
                src_port: ports(40000, Some(50000)),
                ..f()
            },
            vec![1, 3],
        ),
        (
            "dst_port single",
            proto::Filter {
                dst_port: ports(22, None),
                ..f()
            },
            vec![6],
        ),
        (
            "port either",
            proto::Filter {
                port: ports(5353, Some(5353)),
                ..f()
            },
            vec![2],
        ),
        (
            "port 0 is icmp",
            proto::Filter {
                port: ports(0, None),
                ..f()
            },
            vec![4, 5],
        ),
        (
            "port either side",
            proto::Filter {
                port: ports(443, None),
                ..f()
            },
            vec![1],
        ),
        ("protocol tcp", pf(6), vec![1, 3, 6]),
        ("protocol udp", pf(17), vec![2]),
        ("protocol icmpv6", pf(58), vec![5]),
        (
            "ip_version 6",
            proto::Filter {
                ip_version: proto::IpVersion::IpVersion6.into(),
                ..f()
            },
            vec![3, 5],
        ),
        (
            "ip_version 4",
            proto::Filter {
                ip_version: proto::IpVersion::IpVersion4.into(),
                ..f()
            },
            vec![1, 2, 4, 6],
        ),
        (
            "interface",
            proto::Filter {
                interface: Some("eth1".into()),
                ..f()
            },
            vec![3, 4],
        ),
        (
            "tcp_flags syn+ack",
            proto::Filter {
                tcp_flags: Some(u32::from(SYN | ACK)),
                ..f()
            },
            vec![1, 3],
        ),
        (
            "tcp_flags rst",
            proto::Filter {
                tcp_flags: Some(u32::from(RST)),
                ..f()
            },
            vec![3],
        ),
        (
            "tcp_flags psh either side",
            proto::Filter {
                tcp_flags: Some(u32::from(PSH)),
                ..f()
            },
            vec![1, 6],
        ),
        (
            "end_reason rst",
            proto::Filter {
                end_reason: proto::EndReason::TcpRst.into(),
                ..f()
            },
            vec![3],
        ),
        (
            "end_reason idle",
            proto::Filter {
                end_reason: proto::EndReason::IdleTimeout.into(),
                ..f()
            },
            vec![2, 4],
        ),
        (
            "min_bytes inclusive",
            proto::Filter {
                min_bytes: Some(500),
                ..f()
            },
            vec![1, 3, 6],
        ),
        (
            "min_bytes 0",
            proto::Filter {
                min_bytes: Some(0),
                ..f()
            },
            vec![1, 2, 3, 4, 5, 6],
        ),
        (
            "all set fields must match",
            proto::Filter {
                protocol: Some(6),
                interface: Some("eth0".into()),
                ..f()
            },
            vec![1, 6],
        ),
        (
            "cidr and port",
            proto::Filter {
                src_cidr: cidr("10.0.0.0/8"),
                dst_port: ports(443, None),
                ..f()
            },
            vec![1],
        ),
    ];
    for (name, filter, want) in cases {
        let got = ids_for(&agent, vec![filter], vec![]).await;
        assert_eq!(got, want, "filter case {name:?}");
    }
}

/// Name, include filters, exclude filters, expected record ids.
type SelectorCase = (
    &'static str,
    Vec<proto::Filter>,
    Vec<proto::Filter>,
    Vec<u32>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_exclude_logic() {
    let agent = Agent::start();
    for r in corpus() {
        agent.hub.publish(r);
    }
    let f = proto::Filter::default;
    let proto_is = |p: u32| proto::Filter {
        protocol: Some(p),
        ..f()
    };
    let iface = |i: &str| proto::Filter {
        interface: Some(i.into()),
        ..f()
    };
    let cases: Vec<SelectorCase> = vec![
        ("no filters", vec![], vec![], vec![1, 2, 3, 4, 5, 6]),
        (
            "includes are ORed",
            vec![proto_is(6), proto_is(17)],
            vec![],
            vec![1, 2, 3, 6],
        ),
        (
            "exclude removes from include",
            vec![proto_is(6)],
            vec![proto::Filter {
                ip_version: proto::IpVersion::IpVersion6.into(),
                ..f()
            }],
            vec![1, 6],
        ),
        ("exclude alone", vec![], vec![iface("eth0")], vec![3, 4, 5]),
        (
            "any exclude wins",
            vec![iface("eth0"), iface("eth1")],
            vec![
                proto_is(1),
                proto::Filter {
                    tcp_flags: Some(u32::from(RST)),
                    ..f()
                },
            ],
            vec![1, 2, 6],
        ),
        ("empty exclude filter drops all", vec![], vec![f()], vec![]),
        (
            "include matching nothing",
            vec![iface("nope")],
            vec![],
            vec![],
        ),
    ];
    for (name, include, exclude, want) in cases {
        let got = ids_for(&agent, include, exclude).await;
        assert_eq!(got, want, "case {name:?}");
    }

    // The live path applies the same selector as replay.
    let mut s = agent
        .subscribe(proto::SubscribeRequest {
            include: vec![iface("eth0"), iface("eth1")],
            exclude: vec![proto_is(1)],
            ..Default::default()
        })
        .await;
    for r in corpus() {
        agent.hub.publish(r);
    }
    let mut sentinel = rec(99);
    sentinel.interface = "eth1".into();
    agent.hub.publish(sentinel);
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| r.ids.last() == Some(&99)).await;
    assert_eq!(got.ids, vec![1, 2, 3, 6, 99]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_follow() {
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 20,
        subscriber_queue: 4096,
        ..HubConfig::default()
    });
    for i in 1..=30 {
        agent.hub.publish(rec(i));
    }

    // The ring keeps the newest 20.
    let all = ids_for(&agent, vec![], vec![]).await;
    assert_eq!(all, (11..=30).collect::<Vec<_>>());

    // Last N, then live records with neither gap nor overlap.
    let mut s = agent
        .subscribe(proto::SubscribeRequest {
            replay: 5,
            ..Default::default()
        })
        .await;
    for i in 31..=35 {
        agent.hub.publish(rec(i));
    }
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| r.ids.len() >= 10).await;
    assert_eq!(got.ids, (26..=35).collect::<Vec<_>>());

    // No replay unless asked.
    let mut s = agent.subscribe(proto::SubscribeRequest::default()).await;
    agent.hub.publish(rec(36));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| !r.ids.is_empty()).await;
    assert_eq!(got.ids, vec![36]);

    // Replay counts only matching records.
    let even: Vec<u32> = {
        let agent2 = Agent::start();
        for i in 1..=10 {
            let mut r = rec(i);
            r.interface = if i % 2 == 0 { "even" } else { "odd" }.into();
            agent2.hub.publish(r);
        }
        let req = proto::SubscribeRequest {
            include: vec![proto::Filter {
                interface: Some("even".into()),
                ..Default::default()
            }],
            replay: 3,
            follow: Some(false),
            ..Default::default()
        };
        drain(agent2.subscribe(req).await).await.ids
    };
    assert_eq!(even, vec![6, 8, 10]);

    // `since` selects by last_seen (rec(i) has last_seen t(i + 1)), alone or with a count.
    let since = |replay| proto::SubscribeRequest {
        since: Some(t(33).into()),
        replay,
        follow: Some(false),
        ..Default::default()
    };
    assert_eq!(
        drain(agent.subscribe(since(0)).await).await.ids,
        vec![32, 33, 34, 35, 36]
    );
    assert_eq!(
        drain(agent.subscribe(since(2)).await).await.ids,
        vec![35, 36]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_bounded() {
    let agent = Agent::start();
    let mut s = agent.subscribe(proto::SubscribeRequest::default()).await;
    for i in 1..=2500 {
        agent.hub.publish(rec(i));
    }
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| r.ids.len() >= 2500).await;
    assert_eq!(got.ids, (1..=2500).collect::<Vec<_>>());
    assert!(
        got.batches.iter().all(|&n| (1..=1000).contains(&n)),
        "{:?}",
        got.batches
    );
    assert!(got.batches.len() >= 3, "{:?}", got.batches);
    assert!(got.lost.is_empty());

    // A lone record is not held back waiting for a full batch.
    agent.hub.publish(rec(2501));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| !r.ids.is_empty()).await;
    assert_eq!(got.batches, vec![1]);

    // Replay is batched the same way.
    let replayed = drain(
        agent
            .subscribe(proto::SubscribeRequest {
                replay: 2501,
                follow: Some(false),
                ..Default::default()
            })
            .await,
    )
    .await;
    assert_eq!(replayed.batches, vec![1000, 1000, 501]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_loses_records_others_get_all() {
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 100,
        subscriber_queue: 64,
        ..HubConfig::default()
    });
    // A small HTTP/2 window makes the stalled client's transport fill up quickly.
    let slow_channel = Endpoint::from_shared(agent.url())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .unwrap();
    let mut slow = FlowLensClient::new(slow_channel)
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut fast = agent.subscribe(proto::SubscribeRequest::default()).await;
    let slow_id = agent.hub.stats().subscribers().next().unwrap().id;

    let slow_lost = |hub: &Hub| {
        hub.stats()
            .subscribers()
            .find(|s| s.id == slow_id)
            .map(|s| s.lost)
            .unwrap()
    };
    let mut fast_got = Received::default();
    let mut published = 0u32;
    let mut extra_chunks = 2;
    while extra_chunks > 0 {
        // Paced so the fast subscriber (queue of 64) can keep up; the slow one never reads.
        for _ in 0..50 {
            published += 1;
            agent.hub.publish(rec(published));
        }
        let want = published as usize;
        read_until(&mut fast, &mut fast_got, |r| r.ids.len() >= want).await;
        if slow_lost(&agent.hub) > 0 {
            extra_chunks -= 1;
        }
        assert!(
            published < 400_000,
            "the stalled subscriber never lost anything"
        );
    }
    assert_eq!(fast_got.ids, (1..=published).collect::<Vec<_>>());
    assert!(
        fast_got.lost.is_empty(),
        "fast subscriber lost {:?}",
        fast_got.lost
    );

    let lost = slow_lost(&agent.hub);
    let status = agent
        .client()
        .await
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.subscribers.len(), 2);
    assert_eq!(status.lost_total, lost);
    assert!(status.subscribers.iter().any(|s| s.lost == lost));

    // Once it reads again it gets what was queued, then a Lost event covering the gap.
    let mut slow_got = Received::default();
    let total = u64::from(published);
    read_until(&mut slow, &mut slow_got, |r| {
        r.ids.len() as u64 + r.total_lost() >= total
    })
    .await;
    assert_eq!(slow_got.total_lost(), lost);
    assert!(!slow_got.lost.is_empty());
    assert!(
        slow_got.ids.windows(2).all(|w| w[0] < w[1]),
        "out of order or duplicated"
    );
    assert_eq!(slow_got.ids[0], 1);

    // Records after the gap flow normally again.
    agent.hub.publish(rec(published + 1));
    read_until(&mut slow, &mut slow_got, |r| {
        r.ids.last() == Some(&(published + 1))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_the_field() {
    let agent = Agent::start();
    let f = proto::Filter::default;
    let inc = |filter| proto::SubscribeRequest {
        include: vec![filter],
        ..Default::default()
    };
    let cases: Vec<(proto::SubscribeRequest, &str)> = vec![
        (
            inc(proto::Filter {
                src_cidr: cidr("10.0.0.0/33"),
                ..f()
            }),
            "include[0].src_cidr",
        ),
        (
            inc(proto::Filter {
                dst_cidr: cidr("10.0.0.300"),
                ..f()
            }),
            "include[0].dst_cidr",
        ),
        (
            proto::SubscribeRequest {
                include: vec![
                    f(),
                    proto::Filter {
                        cidr: cidr("fe80::/129"),
                        ..f()
                    },
                ],
                ..Default::default()
            },
            "include[1].cidr",
        ),
        (
            proto::SubscribeRequest {
                exclude: vec![proto::Filter {
                    port: ports(100, Some(10)),
                    ..f()
                }],
                ..Default::default()
            },
            "exclude[0].port: reversed",
        ),
        (
            inc(proto::Filter {
                dst_port: ports(70000, None),
                ..f()
            }),
            "include[0].dst_port",
        ),
        (
            inc(proto::Filter {
                src_port: ports(1, Some(65536)),
                ..f()
            }),
            "include[0].src_port",
        ),
        (
            inc(proto::Filter {
                end_reason: 99,
                ..f()
            }),
            "include[0].end_reason: unknown EndReason",
        ),
        (
            inc(proto::Filter {
                ip_version: 5,
                ..f()
            }),
            "include[0].ip_version: unknown IpVersion",
        ),
        (
            inc(proto::Filter {
                protocol: Some(256),
                ..f()
            }),
            "include[0].protocol",
        ),
        (
            inc(proto::Filter {
                tcp_flags: Some(0),
                ..f()
            }),
            "include[0].tcp_flags",
        ),
        (
            inc(proto::Filter {
                tcp_flags: Some(0x100),
                ..f()
            }),
            "include[0].tcp_flags",
        ),
        (
            inc(proto::Filter {
                interface: Some(String::new()),
                ..f()
            }),
            "include[0].interface",
        ),
        (
            proto::SubscribeRequest {
                since: Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "since",
        ),
        (
            proto::SubscribeRequest {
                since: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..Default::default()
            },
            "since",
        ),
    ];
    let mut client = agent.client().await;
    for (req, field) in cases {
        let err = client
            .subscribe(req.clone())
            .await
            .expect_err(&format!("{req:?} should be rejected"));
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "message {:?} should name {field:?}",
            err.message()
        );
    }
    // Rejected requests leave no subscriber behind.
    assert_eq!(agent.hub.stats().subscribers().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_status_reports_agent_and_hub() {
    let agent = Agent::start();
    agent
        .status
        .flows_ended
        .store(7, std::sync::atomic::Ordering::Relaxed);
    agent
        .status
        .records_emitted
        .store(9, std::sync::atomic::Ordering::Relaxed);
    agent
        .status
        .active_flows
        .store(3, std::sync::atomic::Ordering::Relaxed);
    agent
        .status
        .map_pressure_events
        .store(2, std::sync::atomic::Ordering::Relaxed);
    agent.status.set_detail(
        vec![MapUsage {
            name: "flow_base".into(),
            entries: 512,
            capacity: 1024,
        }],
        BTreeMap::from([("map_full".to_string(), 4), ("parse_error".to_string(), 0)]),
    );
    for i in 1..=5 {
        agent.hub.publish(rec(i));
    }
    let _sub = agent.subscribe(proto::SubscribeRequest::default()).await;

    let st = agent
        .client()
        .await
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert!(st.started.is_some());
    assert!(st.uptime.is_some());
    assert_eq!(st.flows_seen, 7);
    assert_eq!(st.records_emitted, 9);
    assert_eq!(st.active_flows, 3);
    assert_eq!(st.map_pressure_events, 2);
    assert_eq!(st.ring_records, 5);
    assert_eq!(st.ring_capacity, 10_000);
    assert_eq!(st.records_published, 5);
    assert_eq!(st.maps.len(), 1);
    assert_eq!(st.maps[0].name, "flow_base");
    assert_eq!(st.maps[0].entries, 512);
    assert!((st.maps[0].utilisation - 0.5).abs() < 1e-9);
    assert_eq!(st.kernel_counters.get("map_full"), Some(&4));
    assert_eq!(st.kernel_counters.get("parse_error"), Some(&0));
    assert_eq!(st.subscribers.len(), 1);
    assert_eq!(st.subscribers[0].lost, 0);
    assert!(st.subscribers[0].peer.starts_with("127.0.0.1:"));
    assert_eq!(st.lost_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let agent = Agent::start();
    let mut health = HealthClient::new(agent.channel().await);
    for service in ["", "flowlens.v1.FlowLens"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "service {service:?}");
    }
    let err = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_the_service() {
    use prost::Message;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let agent = Agent::start();
    let mut client = ServerReflectionClient::new(agent.channel().await);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let reqs = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "flowlens.v1.FlowLens".into(),
        )),
        ask(MessageRequest::FileByFilename(
            "google/protobuf/timestamp.proto".into(),
        )),
    ];
    let mut resp = client
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();

    let list = next_reflection(&mut resp).await;
    let MessageResponse::ListServicesResponse(list) = list else {
        panic!("unexpected {list:?}")
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["flowlens.v1.FlowLens", "grpc.health.v1.Health"] {
        assert!(names.contains(&want), "{names:?} lacks {want}");
    }

    let file = next_reflection(&mut resp).await;
    let MessageResponse::FileDescriptorResponse(file) = file else {
        panic!("unexpected {file:?}")
    };
    let fds: Vec<prost_types::FileDescriptorProto> = file
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
        .collect();
    let ours = fds
        .iter()
        .find(|f| f.package() == "flowlens.v1")
        .expect("flowlens.v1 file");
    let svc = &ours.service[0];
    assert_eq!(svc.name(), "FlowLens");
    let methods: Vec<&str> = svc.method.iter().map(|m| m.name()).collect();
    assert_eq!(methods, vec!["Subscribe", "ListFlows", "GetStatus"]);
    assert!(svc.method[0].server_streaming());
    // Imports are resolvable too (generic clients fetch them by name), so they can decode
    // timestamps.
    assert!(ours
        .dependency
        .iter()
        .any(|d| d == "google/protobuf/timestamp.proto"));
    let dep = next_reflection(&mut resp).await;
    let MessageResponse::FileDescriptorResponse(dep) = dep else {
        panic!("unexpected {dep:?}")
    };
    let dep =
        prost_types::FileDescriptorProto::decode(dep.file_descriptor_proto[0].as_slice()).unwrap();
    assert_eq!(dep.name(), "google/protobuf/timestamp.proto");
}

async fn next_reflection(
    s: &mut Streaming<tonic_reflection::pb::v1::ServerReflectionResponse>,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    tokio::time::timeout(WAIT, s.message())
        .await
        .unwrap()
        .unwrap()
        .expect("reflection response")
        .message_response
        .expect("message_response set")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flowlens.sock");
    let listen = format!("unix:{}", path.display());
    let hub = Hub::new(HubConfig::default());
    let handle = service::spawn(&listen, hub.clone(), Arc::new(Status::new())).unwrap();
    assert!(handle.local_addr().is_none());

    // A second server must not steal a live socket.
    let err = service::spawn(&listen, hub.clone(), Arc::new(Status::new())).unwrap_err();
    assert!(format!("{err:#}").contains(&listen), "{err:#}");

    let channel = Endpoint::from_shared(listen.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FlowLensClient::new(channel);
    let mut s = client
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    hub.publish(rec(1));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| !r.ids.is_empty()).await;
    assert_eq!(got.ids, vec![1]);

    tokio::task::spawn_blocking(move || handle.shutdown())
        .await
        .unwrap()
        .unwrap();
    assert!(!path.exists(), "socket file left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_is_a_clear_error() {
    let agent = Agent::start();
    let listen = agent.addr.to_string();
    let err = service::spawn(
        &listen,
        Hub::new(HubConfig::default()),
        Arc::new(Status::new()),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&listen), "{msg}");
    assert!(msg.to_lowercase().contains("in use"), "{msg}");

    let err = service::spawn(
        "nonsense",
        Hub::new(HubConfig::default()),
        Arc::new(Status::new()),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("nonsense"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_thread_ends_streams_when_the_poller_goes() {
    let agent = Agent::start();
    let (tx, rx) = crossbeam_channel::bounded(16);
    let fanout = agent.hub.spawn_fanout(rx).unwrap();
    let s = agent.subscribe(proto::SubscribeRequest::default()).await;
    for i in 1..=3 {
        tx.send(rec(i)).unwrap();
    }
    drop(tx);
    let got = drain(s).await;
    assert_eq!(got.ids, vec![1, 2, 3]);
    tokio::task::spawn_blocking(move || fanout.join())
        .await
        .unwrap()
        .unwrap();

    // Later subscribers still get the replay, then end-of-stream.
    let late = agent
        .subscribe(proto::SubscribeRequest {
            replay: 10,
            ..Default::default()
        })
        .await;
    assert_eq!(drain(late).await.ids, vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_following_streams() {
    let agent = Agent::start();
    let mut s = agent.subscribe(proto::SubscribeRequest::default()).await;
    agent.hub.publish(rec(1));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| !r.ids.is_empty()).await;
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || agent.shutdown())
        .await
        .unwrap();
    // Well under the forced-drop grace period: streams ended instead of being cut off.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let end = tokio::time::timeout(WAIT, s.message()).await.unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_table_and_json() {
    let agent = Agent::start();
    for r in corpus() {
        agent.hub.publish(r);
    }
    let args = WatchArgs {
        query: FlowQuery {
            server: agent.addr.to_string(),
            proto: Some("tcp".into()),
            exclude_interface: vec!["eth1".into()],
            ..Default::default()
        },
        replay: 100,
        no_follow: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    watch::watch_to(&args, &mut out, std::future::pending())
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Header, the date line, two flows.
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("TIME "), "{text}");
    assert_eq!(lines[1], "--- 2023-11-14 (UTC) ---");
    assert!(
        lines[2].contains("10.0.0.1:40001 > 192.168.1.10:443"),
        "{text}"
    );
    assert!(lines[2].contains(" fin "), "{text}");
    assert!(lines[2].contains("srv 50µs"), "{text}");
    assert!(
        lines[3].contains("192.168.1.20:33000 > 10.0.0.2:22"),
        "{text}"
    );
    // Columns line up: the arrow sits at the same offset in every row, and every line
    // fits 100 columns.
    assert_eq!(lines[2].find(" > "), lines[3].find(" > "));
    assert!(lines.iter().all(|l| l.chars().count() <= 100), "{text}");

    let args = WatchArgs {
        json: true,
        query: FlowQuery {
            proto: None,
            exclude_interface: vec![],
            ..args.query.clone()
        },
        ..args
    };
    let mut out = Vec::new();
    watch::watch_to(&args, &mut out, std::future::pending())
        .await
        .unwrap();
    let objs: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), 6);
    assert_eq!(objs[0]["client_addr"], "10.0.0.1");
    assert_eq!(objs[0]["end_reason"], "tcp_fin");
    assert_eq!(objs[3]["icmp"]["echo_id"], 77);
    assert!(objs[3]["tcp"].is_null());

    // Bad flags are reported by flag name before connecting.
    for (args, flag) in [
        (
            WatchArgs {
                query: FlowQuery {
                    port: Some("90-80".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--port",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    src: Some("10.0.0.0/40".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--src",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    proto: Some("sctp".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--proto",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    end_reason: Some("timeout".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--end-reason",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    tcp_flags: Some("syn,bogus".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--tcp-flags",
        ),
    ] {
        let err = watch::subscribe_request(&args).unwrap_err();
        assert!(format!("{err:#}").contains(flag), "{err:#}");
    }

    // A server that is gone is an error, not a silent exit.
    let url = agent.url();
    agent.shutdown();
    let args = WatchArgs {
        query: FlowQuery {
            server: url,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = watch::watch_to(&args, &mut Vec::new(), std::future::pending())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("connecting"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_flags_build_the_request() {
    let args = WatchArgs {
        query: FlowQuery {
            src: Some("10.0.0.0/8".into()),
            dport: Some("8000-8100".into()),
            proto: Some("udp".into()),
            ip_version: Some("6".into()),
            tcp_flags: Some("syn,ack".into()),
            end_reason: Some("tcp-rst".into()),
            min_bytes: Some(10),
            exclude_port: vec!["22".into(), "53".into()],
            ..Default::default()
        },
        replay: 7,
        since: Some("5m".into()),
        no_follow: true,
        ..Default::default()
    };
    let req = watch::subscribe_request(&args).unwrap();
    assert_eq!(req.include.len(), 1);
    let f = &req.include[0];
    assert_eq!(f.src_cidr.as_deref(), Some("10.0.0.0/8"));
    assert_eq!(f.dst_port, ports(8000, Some(8100)));
    assert_eq!(f.protocol, Some(17));
    assert_eq!(f.ip_version(), proto::IpVersion::IpVersion6);
    assert_eq!(f.tcp_flags, Some(u32::from(SYN | ACK)));
    assert_eq!(f.end_reason(), proto::EndReason::TcpRst);
    assert_eq!(f.min_bytes, Some(10));
    assert_eq!(req.exclude.len(), 2);
    assert_eq!(req.exclude[1].port, ports(53, Some(53)));
    assert_eq!(req.replay, 7);
    assert_eq!(req.follow, Some(false));
    let since = SystemTime::try_from(req.since.unwrap()).unwrap();
    let ago = SystemTime::now().duration_since(since).unwrap();
    assert!(
        ago >= Duration::from_secs(299) && ago < Duration::from_secs(400),
        "{ago:?}"
    );

    // No flags: no include filter at all (everything), follow on.
    let req = watch::subscribe_request(&WatchArgs::default()).unwrap();
    assert!(req.include.is_empty() && req.exclude.is_empty());
    assert_eq!(req.follow, Some(true));
}

/// The README's grpcio invocation for the unix socket.
const PY_UNIX_SOCKET: &str = r#"
import sys
sys.path.insert(0, sys.argv[2])
import grpc
from flowlens.v1 import flowlens_pb2 as pb, flowlens_pb2_grpc as rpc

channel = grpc.insecure_channel("unix:" + sys.argv[1],
                                options=[("grpc.default_authority", "localhost")])
print(rpc.FlowLensStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10).version)
"#;

const PY_CLIENT: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[2])
import grpc
from flowlens.v1 import flowlens_pb2 as pb, flowlens_pb2_grpc as rpc

stub = rpc.FlowLensStub(grpc.insecure_channel(sys.argv[1]))
out = {"version": stub.GetStatus(pb.GetStatusRequest(), timeout=10).version}
req = pb.SubscribeRequest(
    include=[pb.Filter(protocol=6)],
    exclude=[pb.Filter(ip_version=pb.IP_VERSION_6)],
    replay=100,
    follow=False,
)
out["ids"] = []
for resp in stub.Subscribe(req, timeout=10):
    assert resp.WhichOneof("event") == "flows", resp
    for r in resp.flows.records:
        out["ids"].append(r.ifindex)
        if r.ifindex == 1:
            out["client"] = "%s:%d" % (r.client_addr, r.client_port)
            out["hs_client_ns"] = r.tcp.handshake_client_ns
            out["hs_server_present"] = r.tcp.HasField("handshake_server_ns")
            out["end_reason"] = pb.EndReason.Name(r.end_reason)
            out["first_seen"] = r.first_seen.seconds
try:
    list(stub.Subscribe(pb.SubscribeRequest(include=[pb.Filter(src_cidr="1.2.3.4/99")]), timeout=10))
    out["invalid"] = None
except grpc.RpcError as e:
    out["invalid"] = [e.code().name, e.details()]
print(json.dumps(out))
"#;

fn run(cmd: &mut std::process::Command) -> String {
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

/// A Python grpcio client generated from the proto: the API works outside Rust/tonic.
/// Installs grpcio and grpcio-tools from PyPI into a venv kept under the target dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client() {
    use std::process::Command;
    let agent = Agent::start();
    for r in corpus() {
        agent.hub.publish(r);
    }
    let addr = agent.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("flowlens.sock");
    let unix = service::spawn(
        &format!("unix:{}", sock.display()),
        agent.hub.clone(),
        Arc::new(Status::new()),
    )
    .unwrap();
    let (out, unix_out) = tokio::task::spawn_blocking(move || {
        let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyvenv-grpcio");
        let py = venv.join("bin/python");
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
        let gen = tempfile::tempdir().unwrap();
        let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
        run(Command::new(&py)
            .args(["-m", "grpc_tools.protoc", "-I", proto_dir])
            .arg(format!("--python_out={}", gen.path().display()))
            .arg(format!("--grpc_python_out={}", gen.path().display()))
            .arg(format!("{proto_dir}/flowlens/v1/flowlens.proto")));
        let out = run(Command::new(&py)
            .args(["-c", PY_CLIENT, &addr])
            .arg(gen.path()));
        let unix_out = run(Command::new(&py)
            .args(["-c", PY_UNIX_SOCKET])
            .arg(&sock)
            .arg(gen.path()));
        (out, unix_out)
    })
    .await
    .unwrap();
    unix.shutdown().unwrap();
    assert_eq!(
        unix_out.trim(),
        env!("CARGO_PKG_VERSION"),
        "grpcio on the unix socket"
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["ids"], serde_json::json!([1, 6]));
    assert_eq!(v["client"], "10.0.0.1:40001");
    assert_eq!(v["hs_client_ns"], 120_000);
    assert_eq!(v["hs_server_present"], false);
    assert_eq!(v["end_reason"], "END_REASON_TCP_FIN");
    assert_eq!(v["first_seen"], 1_700_000_001);
    assert_eq!(v["invalid"][0], "INVALID_ARGUMENT");
    assert!(
        v["invalid"][1]
            .as_str()
            .unwrap()
            .starts_with("include[0].src_cidr"),
        "{}",
        v["invalid"]
    );
}

#[derive(Debug, clap::Parser)]
struct WatchCli {
    #[command(flatten)]
    watch: WatchArgs,
}

#[test]
fn watch_flags_parse_from_command_line_and_env() {
    use clap::Parser;
    // Only this test reads these variables.
    std::env::set_var("FLOWLENS_WATCH_NO_FOLLOW", "true");
    std::env::set_var("FLOWLENS_WATCH_EXCLUDE_PORT", "22,53");
    std::env::set_var("FLOWLENS_WATCH_SERVER", "unix:/run/flowlens.sock");
    let cli =
        WatchCli::try_parse_from(["watch", "--json", "--dport", "80-90", "--replay", "5"]).unwrap();
    let w = cli.watch;
    assert!(w.json && w.no_follow);
    assert_eq!(w.query.dport.as_deref(), Some("80-90"));
    assert_eq!(w.replay, 5);
    assert_eq!(w.query.exclude_port, vec!["22", "53"]);
    assert_eq!(w.query.server, "unix:/run/flowlens.sock");
    assert!(WatchCli::try_parse_from(["watch", "--ip-version", "5"]).is_err());
    std::env::remove_var("FLOWLENS_WATCH_SERVER");
    let w = WatchCli::try_parse_from(["watch"]).unwrap().watch;
    assert_eq!(w.query.server, "http://127.0.0.1:50051");
}

/// `n` flows in progress: odd ones UDP, the rest TCP; client port 10000 + i.
fn in_progress(n: u16) -> Vec<FlowRecord> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_flows_pages_one_snapshot_filtered_on_the_server() {
    let agent = Agent::start();
    assert!(!agent.snapshots.wanted(), "nobody asked yet");
    let taken = t(50);
    agent.snapshots.publish(taken, in_progress(2501));
    let mut client = agent.client().await;
    let udp = proto::ListFlowsRequest {
        include: vec![proto::Filter {
            protocol: Some(17),
            ..Default::default()
        }],
        page_size: 600,
        ..Default::default()
    };
    let first = client.list_flows(udp.clone()).await.unwrap().into_inner();
    assert!(agent.snapshots.wanted(), "a request turns snapshots on");
    assert_eq!(first.total_size, 1250);
    assert_eq!(first.flows.len(), 600);
    assert_eq!(
        SystemTime::try_from(first.snapshot_time.unwrap()).unwrap(),
        taken
    );
    // A newer snapshot does not change the pages of a listing under way.
    agent.snapshots.publish(t(51), in_progress(10));
    let mut ports: Vec<u32> = first.flows.iter().map(|f| f.client_port).collect();
    let mut token = first.next_page_token;
    let mut pages = 1;
    while !token.is_empty() {
        let page = client
            .list_flows(proto::ListFlowsRequest {
                page_token: token,
                ..udp.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_size, 1250);
        ports.extend(page.flows.iter().map(|f| f.client_port));
        token = page.next_page_token;
        pages += 1;
    }
    assert_eq!(pages, 3);
    let want: Vec<u32> = (0..2501)
        .filter(|i| i % 2 == 1)
        .map(|i| 10_000 + i)
        .collect();
    assert_eq!(ports, want, "every UDP flow once, in order");

    // The records are in progress, with cumulative counters.
    let now = client
        .list_flows(proto::ListFlowsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.total_size, 10);
    assert_eq!(now.flows[0].end_reason(), proto::EndReason::InProgress);
    assert!(now.next_page_token.is_empty());

    // Bad requests name the field.
    for (req, code, needle) in [
        (
            proto::ListFlowsRequest {
                page_token: "x".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "page_token",
        ),
        (
            proto::ListFlowsRequest {
                page_token: "999.0".into(),
                ..Default::default()
            },
            Code::Aborted,
            "list again",
        ),
        (
            proto::ListFlowsRequest {
                exclude: vec![proto::Filter {
                    dst_cidr: Some("10.0.0.0/33".into()),
                    ..Default::default()
                }],
                ..Default::default()
            },
            Code::InvalidArgument,
            "exclude[0].dst_cidr",
        ),
    ] {
        let err = client.list_flows(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(needle), "{err:?}");
    }
}

/// A `Write` the test reads while `watch` writes to it.
#[derive(Clone, Default)]
struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

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
    fn ports(&self) -> Vec<u64> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| v["client_port"].as_u64().unwrap())
            .collect()
    }

    async fn wait_for(&self, n: usize) -> Vec<u64> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnect_follows_a_restarted_agent_without_gaps_or_repeats() {
    let first = Agent::start();
    let listen = first.addr.to_string();
    let args = WatchArgs {
        query: FlowQuery {
            server: listen.clone(),
            ..Default::default()
        },
        json: true,
        reconnect: true,
        ..Default::default()
    };
    let out = Shared::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watch = tokio::spawn({
        let mut out = out.clone();
        async move {
            watch::watch_to(&args, &mut out, async {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    let publish = |a: &Agent, port: u16| {
        let mut r = rec(1);
        r.client_port = port;
        a.hub.publish(r);
    };
    // Subscribed once GetStatus shows the subscriber.
    let deadline = std::time::Instant::now() + WAIT;
    while first.hub.stats().subscribers().count() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "watch never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish(&first, 1);
    assert_eq!(out.wait_for(1).await, [1]);

    // The agent restarts on the same address; what it emits before watch is back is
    // replayed, what it emits after is followed.
    first.shutdown();
    let second = Agent::on(&listen, HubConfig::default());
    publish(&second, 2);
    assert_eq!(out.wait_for(2).await, [1, 2]);
    publish(&second, 3);
    assert_eq!(out.wait_for(3).await, [1, 2, 3]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(out.ports(), [1, 2, 3], "nothing twice");
    stop_tx.send(()).unwrap();
    watch.await.unwrap().unwrap();
}
