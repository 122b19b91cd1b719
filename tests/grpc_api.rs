//! The gRPC service surface: ListFlows, request validation, GetStatus, health, reflection, listeners, and a stock Python grpcio client.

mod common;

use common::grpc::*;

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

    let st = agent.status().await;
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert!(st.started.is_some());
    assert!(st.uptime.is_some());
    assert_eq!(st.flows_seen, 7);
    assert_eq!(st.records_emitted, 9);
    assert_eq!(st.active_flows, 3);
    assert_eq!(st.map_pressure_events, 2);
    assert_eq!(st.ring_records, 5);
    assert_eq!(st.ring_capacity, 10_000);
    assert_eq!(st.run, agent.hub.run());
    assert!(st.run > 0 && st.run < 1 << 53, "{}", st.run);
    assert_eq!(st.oldest_seq, 1);
    assert!(st.buffer_bytes > 5 * 100, "{}", st.buffer_bytes);
    assert_eq!(st.buffer_capacity_bytes, 256 << 20);
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
    let handle = grpc::spawn(&listen, hub.clone(), Arc::new(Status::new())).unwrap();
    assert!(handle.local_addr().is_none());

    // A second server must not steal a live socket.
    let err = grpc::spawn(&listen, hub.clone(), Arc::new(Status::new())).unwrap_err();
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
    let err = grpc::spawn(
        &listen,
        Hub::new(HubConfig::default()),
        Arc::new(Status::new()),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&listen), "{msg}");
    assert!(msg.to_lowercase().contains("in use"), "{msg}");

    let err = grpc::spawn(
        "nonsense",
        Hub::new(HubConfig::default()),
        Arc::new(Status::new()),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("nonsense"));
}

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

/// A Python grpcio client generated from the proto: the API works outside Rust/tonic.
/// Installs grpcio and grpcio-tools from PyPI into a venv kept under the target dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client() {
    let agent = Agent::start();
    for r in corpus() {
        agent.hub.publish(r);
    }
    let addr = agent.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("flowlens.sock");
    let unix = grpc::spawn(
        &format!("unix:{}", sock.display()),
        agent.hub.clone(),
        Arc::new(Status::new()),
    )
    .unwrap();
    let (out, unix_out) = tokio::task::spawn_blocking(move || {
        let py = Grpcio::ready();
        let out = run(py.command().args(["-c", PY_CLIENT, &addr]).arg(py.gen()));
        let unix_out = run(py
            .command()
            .args(["-c", PY_UNIX_SOCKET])
            .arg(&sock)
            .arg(py.gen()));
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

    // The records are in progress.
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
