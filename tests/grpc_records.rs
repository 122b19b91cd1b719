//! gRPC records and filters: round trips of every field, compression, each filter field, include/exclude logic.

mod common;

use common::grpc::*;

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
