//! gRPC records and filters: round trips of every field, compression, each filter field, include/exclude logic.

mod common;

use common::grpc::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_round_trip_with_optional_fields() {
    let agent = Agent::start();
    let mut s = agent.subscribe(proto::SubscribeRequest::default()).await;
    let recs = corpus();
    let got = agent.publish_and_read(&mut s, &recs).await;
    assert_eq!(got.flow_records(), recs);

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
        let got = agent.publish_and_read(&mut s, &recs).await;
        assert_eq!(got.flow_records(), recs);
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

/// Records of every shape the server's encoder writes differently: the corpus (IPv4, IPv6,
/// TCP with latency, UDP, ICMP, ICMPv6), a fragment, a continuation with both latencies,
/// and IPv4-mapped and uncompressible IPv6 addresses with no interface name.
fn shapes() -> Vec<FlowRecord> {
    let mut frag = rec(7);
    frag.fragment = true;
    frag.protocol = 17;
    frag.tcp = None;
    frag.client_port = 0;
    frag.server_port = 0;
    let mut cont = rec(8);
    cont.continuation = true;
    cont.end_reason = EndReason::Evicted;
    cont.tcp.as_mut().unwrap().client_latency = Some(Latency {
        count: 4,
        sum_ns: 4_000,
        min_ns: 500,
        max_ns: 2_000,
        jitter_ns: Some(300),
    });
    let mut v6 = rec(9);
    v6.ip_version = 6;
    v6.client_addr = "::ffff:10.1.2.3".parse().unwrap();
    v6.server_addr = "2001:db8:0:1:1:1:1:1".parse().unwrap();
    v6.interface = String::new();
    v6.first_hook = Hook::Ingress;
    let mut out = corpus();
    out.extend([frag, cont, v6]);
    out
}

/// A Subscribe client that keeps each response's bytes as they came.
mod raw {
    use bytes::{Buf, Bytes};
    use tonic::codec::{Codec, DecodeBuf, Decoder};
    use tonic::Status;

    use super::proto;

    pub struct Raw;

    impl Codec for Raw {
        type Encode = proto::SubscribeRequest;
        type Decode = Bytes;
        type Encoder = tonic_prost::ProstEncoder<proto::SubscribeRequest>;
        type Decoder = RawDecoder;

        fn encoder(&mut self) -> Self::Encoder {
            tonic_prost::ProstEncoder::new(Default::default())
        }

        fn decoder(&mut self) -> Self::Decoder {
            RawDecoder
        }
    }

    pub struct RawDecoder;

    impl Decoder for RawDecoder {
        type Item = Bytes;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
            Ok(Some(src.copy_to_bytes(src.remaining())))
        }
    }
}

async fn raw_subscribe(agent: &Agent, req: proto::SubscribeRequest) -> Streaming<bytes::Bytes> {
    let mut grpc = tonic::client::Grpc::new(agent.channel().await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/flowlens.v1.FlowLens/Subscribe");
    grpc.server_streaming(tonic::Request::new(req), path, raw::Raw)
        .await
        .unwrap()
        .into_inner()
}

/// Reads `n` records' worth of responses and checks each response is, byte for byte, what
/// prost writes for the same records (`recs[seq - 1]`) converted through
/// `proto::FlowRecord::from`, stamped with the hub's run.
async fn assert_prost_bytes(
    s: &mut Streaming<bytes::Bytes>,
    recs: &[FlowRecord],
    n: usize,
    run: u64,
) {
    use prost::Message;
    let mut seen = 0;
    while seen < n {
        let msg = tokio::time::timeout(WAIT, s.message())
            .await
            .expect("timed out waiting for a stream message")
            .expect("stream error")
            .expect("stream ended early");
        let decoded = proto::SubscribeResponse::decode(msg.clone()).unwrap();
        let Some(Event::Flows(batch)) = decoded.event else {
            panic!("not a batch: {decoded:?}");
        };
        let expected = proto::FlowBatch {
            records: batch
                .records
                .iter()
                .map(|got| {
                    let mut p = proto::FlowRecord::from(&recs[got.seq as usize - 1]);
                    p.seq = got.seq;
                    p.run = run;
                    p
                })
                .collect(),
        };
        assert_eq!(batch, expected);
        let expected = proto::SubscribeResponse {
            event: Some(Event::Flows(expected)),
        };
        assert_eq!(msg[..], expected.encode_to_vec()[..], "bytes of {batch:?}");
        seen += batch.records.len();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_records_are_the_prost_encoding_byte_for_byte() {
    // Live records published together travel as one block's shared message; replayed
    // ones too.
    let recs = shapes();
    let agent = Agent::start();
    let run = agent.hub.run();
    let mut live = raw_subscribe(&agent, proto::SubscribeRequest::default()).await;
    agent.hub.publish_all(recs.clone());
    assert_prost_bytes(&mut live, &recs, recs.len(), run).await;
    let mut replayed = raw_subscribe(&agent, replay_all(vec![], vec![])).await;
    assert_prost_bytes(&mut replayed, &recs, recs.len(), run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poller_batches_larger_than_a_response_and_replay_then_live_are_prost_bytes() {
    // The poller hands over up to 1,024 records at once, more than one block holds
    // (1,000), so its batches are cut across blocks. A replay that starts within a block,
    // followed by live records, mixes messages made for one subscriber with shared ones.
    let recs: Vec<FlowRecord> = shapes().into_iter().cycle().take(2_500).collect();
    let agent = Agent::start();
    let run = agent.hub.run();
    let mut live = raw_subscribe(&agent, proto::SubscribeRequest::default()).await;
    agent
        .hub
        .publish_batches([recs[..1_024].to_vec(), recs[1_024..1_030].to_vec()]);
    assert_prost_bytes(&mut live, &recs, 1_030, run).await;
    let replay_then_live = proto::SubscribeRequest {
        replay: 5,
        ..Default::default()
    };
    let mut both = raw_subscribe(&agent, replay_then_live).await;
    agent.hub.publish_batches([recs[1_030..].to_vec()]);
    assert_prost_bytes(&mut both, &recs, 5 + 1_470, run).await;
    assert_prost_bytes(&mut live, &recs, 1_470, run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_apply_to_records_published_together() {
    let agent = Agent::start();
    let tcp_not_ssh = proto::SubscribeRequest {
        include: vec![proto::Filter {
            protocol: Some(6),
            ..Default::default()
        }],
        exclude: vec![proto::Filter {
            port: ports(22, None),
            ..Default::default()
        }],
        ..Default::default()
    };
    let v6 = proto::SubscribeRequest {
        include: vec![proto::Filter {
            ip_version: proto::IpVersion::IpVersion6.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut a = agent.subscribe(tcp_not_ssh).await;
    let mut b = agent.subscribe(v6).await;
    let mut all = agent.subscribe(proto::SubscribeRequest::default()).await;
    let recs = shapes();
    agent.hub.publish_all(recs.clone());
    let mut got_all = Received::default();
    read_until(&mut all, &mut got_all, |r| r.ids.len() >= recs.len()).await;
    assert_eq!(got_all.ids, (1..=9).collect::<Vec<_>>());
    // One more record marks the end of what the filtered streams can hold.
    agent.hub.publish(rec(100));
    let mut got_a = Received::default();
    read_until(&mut a, &mut got_a, |r| r.ids.last() == Some(&100)).await;
    assert_eq!(got_a.ids, vec![1, 3, 8, 9, 100]);
    let mut last_v6 = rec(101);
    last_v6.ip_version = 6;
    agent.hub.publish(last_v6);
    let mut got_b = Received::default();
    read_until(&mut b, &mut got_b, |r| r.ids.last() == Some(&101)).await;
    assert_eq!(got_b.ids, vec![3, 5, 9, 101]);
}
