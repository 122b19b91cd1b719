//! The JSON form of a record against the proto's `FlowRecord` and README "JSON records": every proto field is a JSON key, every other key is a documented addition, and the README's table lists exactly the keys the output has.

use std::collections::BTreeSet;
use std::time::{Duration, UNIX_EPOCH};

use flowlens::record::api::proto;
use flowlens::record::encoding::Stamp;
use flowlens::record::flow::{
    DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, LocalProcess, TcpInfo, TcpState,
};
use flowlens::record::render::{Format, Renderer};
use prost::Message;

/// Keys the JSON adds to the proto's fields: readable forms beside the proto's values.
const ADDED: [&str; 8] = [
    "protocol_name",
    "first_seen_ns",
    "last_seen_ns",
    "window_start_ns",
    "emitted_ns",
    "duration_ns",
    "tcp.client_flag_names",
    "tcp.server_flag_names",
];

/// The nested messages whose fields the JSON paths name (`tcp.state`); the others
/// (timestamps, latency summaries) are values of their own.
const NESTED: [&str; 6] = [
    "client",
    "server",
    "tcp",
    "icmp",
    "client_process",
    "server_process",
];

/// A record with every optional field present.
fn full() -> FlowRecord {
    let lat = Latency {
        count: 2,
        sum_ns: 300,
        min_ns: 100,
        max_ns: 200,
        jitter_ns: Some(100),
    };
    FlowRecord {
        flow_id: 42,
        observer: "host-a".into(),
        ip_version: 4,
        protocol: 6,
        client_addr: "10.0.0.1".parse().unwrap(),
        client_port: 40000,
        server_addr: "10.0.0.2".parse().unwrap(),
        server_port: 443,
        ifindex: 3,
        interface: "eth0".into(),
        first_hook: Hook::Egress,
        first_seen: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        last_seen: UNIX_EPOCH + Duration::from_secs(1_700_000_003),
        window_start: UNIX_EPOCH + Duration::from_secs(1_700_000_001),
        emitted: UNIX_EPOCH + Duration::from_secs(1_700_000_004),
        client: DirStats {
            packets: 3,
            bytes: 300,
            ttl: 64,
        },
        server: DirStats {
            packets: 2,
            bytes: 200,
            ttl: 63,
        },
        end_reason: EndReason::TcpFin,
        continuation: true,
        fragment: false,
        partial: false,
        tcp: Some(TcpInfo {
            client_flags: 0x13,
            server_flags: 0x12,
            state: TcpState::Closed,
            handshake_client_ns: Some(1),
            handshake_server_ns: Some(2),
            syn_retransmits: 1,
            late_start: false,
            client_latency: Some(lat),
            server_latency: Some(lat),
        }),
        icmp: Some(IcmpInfo {
            client_type: Some(8),
            client_code: Some(0),
            server_type: Some(0),
            server_code: Some(0),
            echo_id: Some(7),
            echo_rtt: Some(lat),
        }),
        client_process: Some(Box::new(LocalProcess {
            cgroup_id: Some(4242),
            cgroup: Some("/system.slice/curl-job.service".into()),
            unit: Some("curl-job.service".into()),
            pid: Some(31337),
            comm: Some("curl".into()),
            uid: Some(1000),
        })),
        server_process: Some(Box::new(LocalProcess {
            cgroup_id: Some(77),
            cgroup: Some("/system.slice/nginx.service".into()),
            unit: Some("nginx.service".into()),
            pid: Some(880),
            comm: Some("nginx".into()),
            uid: Some(0),
        })),
    }
}

/// The JSON key paths of `v`: top-level keys, and `parent.key` inside the nested messages.
fn json_paths(v: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (k, inner) in v.as_object().unwrap() {
        out.insert(k.clone());
        if NESTED.contains(&k.as_str()) {
            for sub in inner.as_object().unwrap().keys() {
                out.insert(format!("{k}.{sub}"));
            }
        }
    }
    out
}

/// The same paths from the proto: `FlowRecord`'s fields and its nested messages' fields.
fn proto_paths() -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let file = set
        .file
        .iter()
        .find(|f| f.package() == "flowlens.v1")
        .unwrap();
    let message = |name: &str| {
        file.message_type
            .iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no message {name}"))
    };
    let mut out = BTreeSet::new();
    for f in &message("FlowRecord").field {
        out.insert(f.name().to_owned());
        if NESTED.contains(&f.name()) {
            let type_name = f.type_name().rsplit('.').next().unwrap();
            for sub in &message(type_name).field {
                out.insert(format!("{}.{}", f.name(), sub.name()));
            }
        }
    }
    out
}

fn json_of(r: &FlowRecord) -> serde_json::Value {
    let mut out = Vec::new();
    let at = Stamp { run: 9, seq: 1234 };
    Renderer::new(Format::Json)
        .record_at(&mut out, at, r)
        .unwrap();
    serde_json::from_slice(&out).unwrap()
}

#[test]
fn every_proto_field_is_a_json_key_and_every_other_key_is_documented() {
    let v = json_of(&full());
    let json = json_paths(&v);
    let proto = proto_paths();
    let missing: Vec<&String> = proto.difference(&json).collect();
    assert!(
        missing.is_empty(),
        "proto fields without a JSON key: {missing:?}"
    );
    let extra: BTreeSet<String> = json.difference(&proto).cloned().collect();
    let added: BTreeSet<String> = ADDED.iter().map(|s| s.to_string()).collect();
    assert_eq!(extra, added, "JSON keys that are not proto fields");
    assert_eq!(
        (v["seq"].as_u64(), v["run"].as_u64()),
        (Some(1234), Some(9))
    );
    assert_eq!(v["fragment"], false);
    assert_eq!(v["observer"], "host-a");
    assert_eq!(v["tcp"]["client_flags"], 0x13);
    assert_eq!(
        v["tcp"]["client_flag_names"],
        serde_json::json!(["SYN", "ACK", "FIN"])
    );
    assert_eq!(
        v["tcp"]["server_flag_names"],
        serde_json::json!(["SYN", "ACK"])
    );
    assert_eq!(v["server_process"]["unit"], "nginx.service");
    assert_eq!(v["client_process"]["pid"], 31337);
    assert_eq!(
        v["client_process"]["cgroup"],
        "/system.slice/curl-job.service"
    );
    // A side that is no local socket (a remote host, forwarded traffic) is null.
    let mut remote = full();
    remote.client_process = None;
    assert_eq!(json_of(&remote)["client_process"], serde_json::Value::Null);
}

/// The README's "JSON records" table: the backticked names in its first column.
fn readme_paths() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n### JSON records\n")
        .nth(1)
        .expect("a JSON records section");
    let table = section
        .lines()
        .skip_while(|l| !l.starts_with("| field |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    let mut out = BTreeSet::new();
    for row in table {
        let first = row.split('|').nth(1).unwrap();
        for name in first.split('`').skip(1).step_by(2) {
            out.insert(name.to_owned());
        }
    }
    out
}

#[test]
fn the_readme_lists_exactly_the_json_keys() {
    let json = json_paths(&json_of(&full()));
    let readme = readme_paths();
    let undocumented: Vec<&String> = json.difference(&readme).collect();
    let stale: Vec<&String> = readme.difference(&json).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "README JSON table: missing {undocumented:?}, not in the output {stale:?}"
    );
}
