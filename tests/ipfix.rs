//! IPFIX export: byte-exact encoding, and real traffic exported by the agent to nfcapd, nfacctd
//! and tshark (UDP and TCP), whose per-flow counters must equal flowlens' own records.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::netns::NetPair;
use crossbeam_channel::Receiver;
use flowlens::record::flow::{
    DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, LocalProcess, TcpInfo, TcpState,
};
use flowlens::sinks::ipfix::encode::{self, Encoder};
use flowlens::sinks::ipfix::{Destination, DestinationError, Transport};

const BIN: &str = env!("CARGO_BIN_EXE_flowlens");

// ---------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------

fn tcp_record() -> FlowRecord {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    FlowRecord {
        flow_id: 0x0123_4567_89ab_cdef,
        observer: "host-a".into(),
        ip_version: 4,
        protocol: 6,
        client_addr: IpAddr::V4(Ipv4Addr::new(10, 200, 1, 1)),
        client_port: 40000,
        server_addr: IpAddr::V4(Ipv4Addr::new(10, 200, 1, 2)),
        server_port: 80,
        ifindex: 7,
        interface: "veth0".into(),
        first_hook: Hook::Egress,
        first_seen: t0,
        last_seen: t0 + Duration::from_millis(2500),
        window_start: t0,
        emitted: t0 + Duration::from_millis(3000),
        continuation: false,
        fragment: false,
        partial: false,
        client: DirStats {
            packets: 5,
            bytes: 700,
            ttl: 64,
        },
        server: DirStats {
            packets: 4,
            bytes: 3000,
            ttl: 63,
        },
        end_reason: EndReason::TcpFin,
        tcp: Some(TcpInfo {
            client_flags: 0x1b,
            server_flags: 0x13,
            state: TcpState::Closed,
            handshake_client_ns: Some(1000),
            handshake_server_ns: Some(2000),
            syn_retransmits: 0,
            late_start: false,
            client_latency: None,
            server_latency: None,
        }),
        icmp: None,
        client_process: None,
        server_process: None,
    }
}

fn echo_record_v6() -> FlowRecord {
    let mut r = tcp_record();
    r.ip_version = 6;
    r.protocol = 58;
    r.client_addr = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1));
    r.server_addr = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2));
    r.client_port = 0;
    r.server_port = 0;
    r.tcp = None;
    r.end_reason = EndReason::IdleTimeout;
    r.icmp = Some(IcmpInfo {
        client_type: Some(128),
        client_code: Some(0),
        server_type: Some(129),
        server_code: Some(0),
        echo_id: Some(9),
        echo_rtt: None,
    });
    r
}

/// Every message `records` encode to.
fn messages(enc: &mut Encoder, records: &[FlowRecord], templates: bool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    enc.encode(records, 1_700_000_100, templates, &mut |m| {
        out.push(m.bytes.to_vec())
    });
    out
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// (set id, set body) of each set of a message, checking every length on the way.
fn sets(msg: &[u8]) -> Vec<(u16, Vec<u8>)> {
    assert_eq!(be16(msg, 0), 10, "version");
    assert_eq!(usize::from(be16(msg, 2)), msg.len(), "message length");
    let mut at = 16;
    let mut out = Vec::new();
    while at < msg.len() {
        let (id, len) = (be16(msg, at), usize::from(be16(msg, at + 2)));
        assert!(
            len >= 4 && at + len <= msg.len(),
            "set length {len} at {at}"
        );
        out.push((id, msg[at + 4..at + len].to_vec()));
        at += len;
    }
    out
}

#[test]
fn template_set_is_byte_exact() {
    let mut enc = Encoder::new(42, 1372, None).expect("encoder");
    let msgs = messages(&mut enc, &[], true);
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(
        &m[4..16],
        &[
            0x65, 0x53, 0xf1, 0x64, // export time 1_700_000_100
            0, 0, 0, 0, // sequence: no data record before
            0, 0, 0, 42, // observation domain
        ]
    );
    let s = sets(m);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, 2, "template set");
    // The IPv4 TCP template: id 257, 16 fields (element id, length).
    let t = &enc.templates()[1];
    assert_eq!((t.id, t.v6, t.shape), (257, false, encode::Shape::Tcp));
    let mut want = vec![0x01, 0x01, 0x00, 0x10];
    for (id, len) in [
        (148u16, 8u16), // flowId
        (8, 4),         // sourceIPv4Address
        (12, 4),        // destinationIPv4Address
        (7, 2),         // sourceTransportPort
        (11, 2),        // destinationTransportPort
        (4, 1),         // protocolIdentifier
        (10, 4),        // ingressInterface
        (14, 4),        // egressInterface
        (61, 1),        // flowDirection
        (152, 8),       // flowStartMilliseconds
        (153, 8),       // flowEndMilliseconds
        (1, 8),         // octetDeltaCount
        (2, 8),         // packetDeltaCount
        (136, 1),       // flowEndReason
        (192, 1),       // ipTTL
        (6, 2),         // tcpControlBits
    ] {
        want.extend_from_slice(&id.to_be_bytes());
        want.extend_from_slice(&len.to_be_bytes());
    }
    let first_len = enc.templates()[0].wire_len();
    assert_eq!(&s[0].1[first_len..first_len + want.len()], &want[..]);
    let ids: Vec<u16> = enc.templates().iter().map(|t| t.id).collect();
    assert_eq!(ids, [256, 257, 258, 259, 260, 261]);
    let total: usize = enc.templates().iter().map(|t| t.wire_len()).sum();
    assert_eq!(s[0].1.len(), total);
}

#[test]
fn enterprise_fields_carry_the_pen() {
    let enc = Encoder::new(0, 1372, Some(32473)).expect("encoder");
    let t = &enc.templates()[1];
    // The timing metrics, then the local socket's owner, its strings of variable length.
    let f = t.fields[t.fields.len() - 7];
    assert_eq!((f.id, f.len, f.enterprise), (7, 8, Some(32473)));
    let f = t.fields.last().expect("fields");
    assert_eq!((f.id, f.len, f.enterprise), (17, 65535, Some(32473)));
    let mut enc = Encoder::new(0, 1372, Some(32473)).expect("encoder");
    let m = &messages(&mut enc, &[], true)[0];
    let body = &sets(m)[0].1;
    let tcp = &body[enc.templates()[0].wire_len()..];
    // 16 standard fields of 4 bytes, then the first enterprise field with bit 15 set.
    let at = 4 + 16 * 4;
    assert_eq!(&tcp[at..at + 8], &[0x80, 0x01, 0, 4, 0, 0, 0x7e, 0xd9]);
    // Plain and ICMP templates of IPv4 and IPv6 alike: nothing without a PEN.
    let plain = Encoder::new(0, 1372, None).expect("encoder");
    assert!(plain
        .templates()
        .iter()
        .all(|t| t.fields.iter().all(|f| f.enterprise.is_none())));
}

#[test]
fn data_records_are_byte_exact_one_per_direction() {
    let mut enc = Encoder::new(1, 1372, None).expect("encoder");
    let rec = tcp_record();
    let msgs = messages(&mut enc, std::slice::from_ref(&rec), false);
    assert_eq!(msgs.len(), 1);
    let s = sets(&msgs[0]);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, 257);
    let fid = rec.flow_id.to_be_bytes();
    let start = 1_700_000_000_123u64.to_be_bytes();
    let end = 1_700_000_002_623u64.to_be_bytes();
    let mut want = Vec::new();
    // Client -> server: first seen at egress, so the client's packets left through ifindex 7.
    want.extend_from_slice(&fid);
    want.extend_from_slice(&[10, 200, 1, 1, 10, 200, 1, 2]);
    want.extend_from_slice(&[0x9c, 0x40, 0, 80, 6]);
    want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 7, 1]);
    want.extend_from_slice(&start);
    want.extend_from_slice(&end);
    want.extend_from_slice(&700u64.to_be_bytes());
    want.extend_from_slice(&5u64.to_be_bytes());
    want.extend_from_slice(&[3, 64, 0, 0x1b]);
    // Server -> client: came in through ifindex 7.
    want.extend_from_slice(&fid);
    want.extend_from_slice(&[10, 200, 1, 2, 10, 200, 1, 1]);
    want.extend_from_slice(&[0, 80, 0x9c, 0x40, 6]);
    want.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0, 0]);
    want.extend_from_slice(&start);
    want.extend_from_slice(&end);
    want.extend_from_slice(&3000u64.to_be_bytes());
    want.extend_from_slice(&4u64.to_be_bytes());
    want.extend_from_slice(&[3, 63, 0, 0x13]);
    assert_eq!(s[0].1, want);
    assert_eq!(enc.sequence(), 2);

    // ICMPv6 echo: type/code in icmpTypeCodeIPv6, no ports; a silent side has no record.
    let mut echo = echo_record_v6();
    echo.server.packets = 0;
    let m = &messages(&mut enc, &[echo], false)[0];
    assert_eq!(
        be32(m, 8),
        2,
        "sequence counts the earlier message's records"
    );
    let s = sets(m);
    assert_eq!(s[0].0, 261);
    assert_eq!(s[0].1.len(), 8 + 32 + 1 + 9 + 16 + 16 + 1 + 1 + 2);
    assert_eq!(&s[0].1[s[0].1.len() - 2..], &[128, 0]);
    assert_eq!(enc.sequence(), 3);
}

#[test]
fn timing_metrics_go_to_the_side_they_describe() {
    let mut rec = tcp_record();
    let tcp = rec.tcp.as_mut().expect("tcp");
    tcp.server_latency = Some(Latency {
        count: 3,
        sum_ns: 900,
        min_ns: 200,
        max_ns: 400,
        jitter_ns: Some(150),
    });
    let mut enc = Encoder::new(0, 1372, Some(32473)).expect("encoder");
    let body = sets(&messages(&mut enc, &[rec], false)[0]).remove(0).1;
    let t = &enc.templates()[1];
    // No local socket: two empty strings after the fixed fields.
    let len = t.record_len + 2;
    assert_eq!(body.len(), 2 * len);
    let timing = |rec: &[u8]| rec[66..66 + 36].to_vec();
    // Client -> server: the handshake; the client answered nothing.
    let mut want = vec![0, 0, 0x03, 0xe8, 0, 0, 0x07, 0xd0];
    want.extend_from_slice(&[0; 4 + 8 + 4 + 4 + 8]);
    assert_eq!(timing(&body[..len]), want);
    // Server -> client: no handshake; how the server answered the client.
    let mut want = vec![0; 8];
    want.extend_from_slice(&3u32.to_be_bytes());
    want.extend_from_slice(&900u64.to_be_bytes());
    want.extend_from_slice(&200u32.to_be_bytes());
    want.extend_from_slice(&400u32.to_be_bytes());
    want.extend_from_slice(&150u64.to_be_bytes());
    assert_eq!(timing(&body[len..]), want);
}

/// The owner fields of one record: role, cgroup id, pid, uid, then comm and unit with
/// their one-byte lengths.
fn owner_fields(role: u8, cgroup: u64, pid: u32, uid: u32, comm: &str, unit: &str) -> Vec<u8> {
    let mut v = vec![role];
    v.extend_from_slice(&cgroup.to_be_bytes());
    v.extend_from_slice(&pid.to_be_bytes());
    v.extend_from_slice(&uid.to_be_bytes());
    v.push(comm.len() as u8);
    v.extend_from_slice(comm.as_bytes());
    v.push(unit.len() as u8);
    v.extend_from_slice(unit.as_bytes());
    v
}

#[test]
fn each_record_names_the_local_socket_its_packets_left_or_reached() {
    let proc_of = |cgroup: u64, pid: u32, comm: &str, unit: Option<&str>| {
        Some(Box::new(LocalProcess {
            cgroup_id: Some(cgroup),
            cgroup: Some("/system.slice/x".into()),
            unit: unit.map(Into::into),
            pid: Some(pid),
            comm: Some(comm.into()),
            uid: Some(1000),
        }))
    };
    let owners = |rec: &FlowRecord| -> Vec<Vec<u8>> {
        let mut enc = Encoder::new(0, 1372, Some(32473)).expect("encoder");
        let body = sets(&messages(&mut enc, std::slice::from_ref(rec), false)[0])
            .remove(0)
            .1;
        let t = &enc.templates()[1];
        // Fixed fields up to the owner's: the standard ones and the timing metrics.
        let at = t.record_len - (1 + 8 + 4 + 4);
        let mut out = Vec::new();
        let mut rest = &body[..];
        while !rest.is_empty() {
            let strings = |r: &[u8]| {
                let comm = usize::from(r[t.record_len]);
                let unit = usize::from(r[t.record_len + 1 + comm]);
                2 + comm + unit
            };
            let len = t.record_len + strings(rest);
            out.push(rest[at..len].to_vec());
            rest = &rest[len..];
        }
        out
    };
    // Over loopback both ends are local: each record names its own sender.
    let mut rec = tcp_record();
    rec.client_process = proc_of(11, 100, "curl", None);
    rec.server_process = proc_of(22, 200, "nginx", Some("nginx.service"));
    assert_eq!(
        owners(&rec),
        [
            owner_fields(1, 11, 100, 1000, "curl", ""),
            owner_fields(1, 22, 200, 1000, "nginx", "nginx.service"),
        ]
    );
    // A remote client: the server's socket is where the client's packets arrived.
    rec.client_process = None;
    assert_eq!(
        owners(&rec),
        [
            owner_fields(2, 22, 200, 1000, "nginx", "nginx.service"),
            owner_fields(1, 22, 200, 1000, "nginx", "nginx.service"),
        ]
    );
    // Forwarded: no local socket; an unknown uid is all ones.
    rec.server_process = None;
    assert_eq!(
        owners(&rec),
        vec![owner_fields(0, 0, 0, u32::MAX, "", ""); 2]
    );
    // A long unit is cut to fit: two records of the largest kind fit a 576-byte MTU.
    let long = format!("docker-{}.scope", "0123456789abcdef".repeat(6));
    rec.server_process = proc_of(22, 200, "app", Some(&long));
    let got = owners(&rec);
    assert_eq!(got[0], owner_fields(2, 22, 200, 1000, "app", &long[..80]));
    assert!(Encoder::new(0, 576 - 48, Some(32473)).is_ok());
}

#[test]
fn messages_split_at_the_size_limit_with_whole_flows_and_running_sequence_numbers() {
    let max = 576 - 28;
    let mut enc = Encoder::new(5, max, None).expect("encoder");
    let mut recs = Vec::new();
    for i in 0..300u16 {
        let mut r = if i % 3 == 0 {
            echo_record_v6()
        } else {
            tcp_record()
        };
        r.client_port = i;
        r.server.packets = u64::from(i % 2); // every other flow: client side only
        recs.push(r);
    }
    let want_records: u32 = recs.iter().map(|r| 1 + r.server.packets as u32).sum();
    let mut seen = Vec::new();
    enc.encode(&recs, 1, true, &mut |m| {
        seen.push((m.bytes.to_vec(), m.flows, m.data_records, m.has_templates))
    });
    assert!(seen.len() > 10, "{} messages", seen.len());
    let (mut seq, mut flows) = (0u32, 0usize);
    for (i, (bytes, f, n, tpl)) in seen.iter().enumerate() {
        assert!(bytes.len() <= max, "message {i}: {} bytes", bytes.len());
        assert_eq!(be32(bytes, 8), seq, "message {i} sequence");
        assert_eq!(be32(bytes, 12), 5);
        let mut records = 0;
        for (id, body) in sets(bytes) {
            if id == 2 {
                assert!(*tpl && i == 0, "templates only in the first message");
                continue;
            }
            let t = enc
                .templates()
                .iter()
                .find(|t| t.id == id)
                .expect("known set id");
            assert_eq!(body.len() % t.record_len, 0, "whole records in set {id}");
            records += body.len() / t.record_len;
        }
        assert_eq!(records as u32, *n);
        seq += n;
        flows += f;
        // A message is only cut when the next flow would not fit.
        if i + 1 < seen.len() && i > 0 {
            assert!(bytes.len() + 2 * 86 + 4 > max, "message {i} cut early");
        }
    }
    assert_eq!(flows, recs.len());
    assert_eq!(seq, want_records);
    assert_eq!(enc.sequence(), want_records);
    assert!(
        Encoder::new(0, 150, None).is_err(),
        "150 bytes cannot hold a template"
    );
}

/// A flow's final record with nothing new in it (its last active-timeout record carried
/// every packet) still reaches the collector, as one client -> server record with zero
/// counts and the flow's end reason; a record with nothing that is not final has none.
#[test]
fn a_final_record_with_nothing_new_still_says_how_the_flow_ended() {
    let mut enc = Encoder::new(1, 1372, None).expect("encoder");
    let mut rec = tcp_record();
    rec.client.packets = 0;
    rec.client.bytes = 0;
    rec.server.packets = 0;
    rec.server.bytes = 0;
    rec.end_reason = EndReason::TcpFin;
    let s = sets(&messages(&mut enc, std::slice::from_ref(&rec), false)[0]);
    assert_eq!(s.len(), 1);
    let data = &s[0].1;
    assert_eq!(
        data.len(),
        8 + 8 + 5 + 9 + 16 + 16 + 1 + 1 + 2,
        "one record"
    );
    assert_eq!(
        &data[8..16],
        &[10, 200, 1, 1, 10, 200, 1, 2],
        "client -> server"
    );
    // octets and packets zero, then flowEndReason 3 (end of flow detected)
    assert_eq!(&data[46..62], &[0; 16]);
    assert_eq!(data[62], 3);
    assert_eq!(enc.sequence(), 1);

    rec.end_reason = EndReason::ActiveTimeout;
    let msgs = messages(&mut enc, &[rec], false);
    assert!(msgs.is_empty(), "nothing to say: {msgs:?}");
}

#[test]
fn end_reasons_map_to_iana_codes() {
    let codes: Vec<u8> = EndReason::ALL
        .iter()
        .map(|r| encode::end_reason_code(*r))
        .collect();
    assert_eq!(codes, [1, 2, 3, 3, 4, 5]);
}

#[test]
fn destinations_parse_with_precise_errors() {
    let d: Destination = "udp://collector.example:2055".parse().expect("udp");
    assert_eq!(
        (d.transport, d.host.as_str(), d.port),
        (Transport::Udp, "collector.example", 2055)
    );
    let d: Destination = "TCP://[fd00::1]:4740".parse().expect("tcp v6");
    assert_eq!(
        (d.transport, d.host.as_str(), d.port),
        (Transport::Tcp, "fd00::1", 4740)
    );
    assert_eq!(d.to_string(), "tcp://[fd00::1]:4740");
    let d: Destination = "udp://10.0.0.1".parse().expect("default port");
    assert_eq!(d.port, 4739);
    let err = |s: &str| s.parse::<Destination>().unwrap_err();
    assert_eq!(
        err("10.0.0.1:4739"),
        DestinationError::NoScheme("10.0.0.1:4739".into())
    );
    assert_eq!(
        err("sctp://h:1"),
        DestinationError::Scheme("sctp://h:1".into(), "sctp".into())
    );
    assert_eq!(
        err("udp://:4739"),
        DestinationError::NoHost("udp://:4739".into())
    );
    assert_eq!(
        err("udp://h:0"),
        DestinationError::Port("udp://h:0".into(), "0".into())
    );
    assert_eq!(
        err("udp://h:70000"),
        DestinationError::Port("udp://h:70000".into(), "70000".into())
    );
    assert_eq!(
        err("udp://[::1:4739"),
        DestinationError::Bracket("udp://[::1:4739".into())
    );
    assert_eq!(
        err("udp://h:1/x"),
        DestinationError::Trailing("udp://h:1/x".into(), "/x".into())
    );
    assert!(
        err("udp://h:x").to_string().contains("\"udp://h:x\""),
        "errors name the value"
    );
}

#[test]
fn bad_ipfix_flags_are_rejected_naming_the_flag() {
    for (args, needle) in [
        (&["--ipfix", "http://x:1"][..], "--ipfix"),
        (&["--ipfix", "udp://x:99999"][..], "99999"),
        (&["--ipfix-mtu", "500"][..], "--ipfix-mtu"),
        (
            &["--ipfix-template-refresh", "0s"][..],
            "--ipfix-template-refresh",
        ),
    ] {
        let out = Command::new(BIN)
            .arg("run")
            .args(args)
            .output()
            .expect("flowlens");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

// ---------------------------------------------------------------------------
// Real collectors
// ---------------------------------------------------------------------------

/// Installs nfdump, pmacct and tshark from the distribution when missing, once per run.
fn collectors_installed() {
    static ONCE: Mutex<bool> = Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let found = |bin: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut missing: Vec<&str> = [
        ("nfcapd", "nfdump"),
        ("nfacctd", "pmacct"),
        ("tshark", "tshark"),
    ]
    .into_iter()
    .filter(|(bin, _)| !found(bin))
    .map(|(_, pkg)| pkg)
    .collect();
    if !missing.is_empty() {
        missing.dedup();
        let ok = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "echo 'wireshark-common wireshark-common/install-setuid boolean false' \
                     | debconf-set-selections; apt-get update -qq && apt-get install -y -qq {}",
                    missing.join(" ")
                ),
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .expect("apt-get");
        assert!(ok.success(), "installing {missing:?}");
    }
    *done = true;
}

/// A collector or capture started in a namespace, stopped by signal, killed on drop.
struct Daemon {
    what: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(what: &'static str, ns: &str, args: &[&str], log: PathBuf, ready: &str) -> Daemon {
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let d = Daemon { what, child, log };
        d.wait_log(ready, Duration::from_secs(20));
        d
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{}: no {needle:?} in its log:\n{}",
                self.what,
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Signals, waits (at most 10 s) and returns the log.
    fn stop(mut self, sig: i32) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "{} ignored signal {sig}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.text()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nfcapd(ns: &str, port: u16, dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir).expect("nfcapd dir");
    let (port, d) = (port.to_string(), dir.to_str().expect("utf-8"));
    let args = [
        "nfcapd",
        "-b",
        "127.0.0.1",
        "-p",
        &port,
        "-w",
        d,
        "-t",
        "3600",
    ];
    Daemon::start(
        "nfcapd",
        ns,
        &args,
        dir.with_extension("log"),
        "Startup nfcapd",
    )
}

/// nfacctd listening on `ip` (127.0.0.1 or ::1) and `port`.
fn nfacctd(ns: &str, ip: &str, port: u16, out: &Path) -> Daemon {
    let conf = out.with_extension("conf");
    std::fs::write(
        &conf,
        format!(
            "daemonize: false\nnfacctd_ip: {ip}\nnfacctd_port: {port}\nplugins: print\n\
             aggregate: src_host, dst_host, src_port, dst_port, proto\nprint_output: json\n\
             print_output_file: {}\nprint_output_file_append: true\nprint_refresh_time: 1\n",
            out.display()
        ),
    )
    .expect("nfacctd.conf");
    let args = ["nfacctd", "-f", conf.to_str().expect("utf-8")];
    Daemon::start(
        "nfacctd",
        ns,
        &args,
        out.with_extension("log"),
        "waiting for",
    )
}

fn tshark_capture(ns: &str, filter: &str, pcap: &Path) -> Daemon {
    let args = [
        "tshark",
        "-i",
        "lo",
        "-f",
        filter,
        "-w",
        pcap.to_str().expect("utf-8"),
    ];
    Daemon::start(
        "tshark",
        ns,
        &args,
        pcap.with_extension("log"),
        "Capturing on",
    )
}

/// (source, destination, source port, destination port, protocol); ports 0 for ICMP.
type Key = (IpAddr, IpAddr, u16, u16, u8);
/// Packets and bytes per direction of a flow.
type Counts = BTreeMap<Key, (u64, u64)>;

fn key(src: IpAddr, dst: IpAddr, sp: u16, dp: u16, proto: u8) -> Key {
    if matches!(proto, 1 | 58) {
        (src, dst, 0, 0, proto)
    } else {
        (src, dst, sp, dp, proto)
    }
}

fn add(c: &mut Counts, k: Key, packets: u64, bytes: u64) {
    if packets > 0 {
        let e = c.entry(k).or_default();
        e.0 += packets;
        e.1 += bytes;
    }
}

/// flowlens' own records (`--output json`), one entry per direction.
fn flowlens_counts(records: &[serde_json::Value]) -> Counts {
    let mut c = Counts::new();
    for r in records {
        let addr = |f: &str| r[f].as_str().expect(f).parse::<IpAddr>().expect(f);
        let num = |v: &serde_json::Value| v.as_u64().expect("number");
        let (ca, sa) = (addr("client_addr"), addr("server_addr"));
        let (cp, sp) = (num(&r["client_port"]) as u16, num(&r["server_port"]) as u16);
        let proto = num(&r["protocol"]) as u8;
        let side = |s: &str| (num(&r[s]["packets"]), num(&r[s]["bytes"]));
        let (p, b) = side("client");
        add(&mut c, key(ca, sa, cp, sp, proto), p, b);
        let (p, b) = side("server");
        add(&mut c, key(sa, ca, sp, cp, proto), p, b);
    }
    c
}

fn proto_number(s: &str) -> u8 {
    match s {
        "TCP" => 6,
        "UDP" => 17,
        "ICMP" => 1,
        "ICMP6" => 58,
        n => n.parse().unwrap_or_else(|_| panic!("protocol {n:?}")),
    }
}

/// What nfdump reads back from nfcapd's files.
fn nfdump_counts(dir: &Path) -> Counts {
    let out = Command::new("nfdump")
        .args(["-R", dir.to_str().expect("utf-8"), "-q", "-o", "csv"])
        .output()
        .expect("nfdump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = Counts::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // ts,te,td,sa,da,sp,dp,pr,flg,fwd,stos,ipkt,ibyt,...
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 13 {
            continue;
        }
        let proto = proto_number(f[7].trim());
        let port = |s: &str| s.trim().parse::<u16>().unwrap_or(0);
        let k = key(
            f[3].trim().parse().expect("sa"),
            f[4].trim().parse().expect("da"),
            port(f[5]),
            port(f[6]),
            proto,
        );
        add(
            &mut c,
            k,
            f[11].trim().parse().expect("ipkt"),
            f[12].trim().parse().expect("ibyt"),
        );
    }
    c
}

/// What nfacctd's print plugin wrote (JSON lines, one per aggregate and interval).
fn pmacct_counts(file: &Path) -> Counts {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut c = Counts::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).expect("pmacct JSON");
        let proto = match &v["ip_proto"] {
            serde_json::Value::String(s) => {
                proto_number(&s.to_uppercase().replace("IPV6-ICMP", "ICMP6"))
            }
            n => n.as_u64().expect("ip_proto") as u8,
        };
        let addr = |f: &str| v[f].as_str().expect(f).parse::<IpAddr>().expect(f);
        let num = |f: &str| v[f].as_u64().unwrap_or(0);
        let k = key(
            addr("ip_src"),
            addr("ip_dst"),
            num("port_src") as u16,
            num("port_dst") as u16,
            proto,
        );
        add(&mut c, k, num("packets"), num("bytes"));
    }
    c
}

/// tshark's decode of a capture: every frame IPFIX, no warning of any kind (malformed,
/// unknown template, sequence gap), and the packets of all data records it decoded.
fn tshark_decode(pcap: &Path, decode_as: &[String]) -> (usize, u64) {
    let mut args = vec!["-r".to_string(), pcap.to_str().expect("utf-8").to_string()];
    for d in decode_as {
        args.extend(["-d".to_string(), d.clone()]);
    }
    let run = |extra: &[&str]| {
        let out = Command::new("tshark")
            .args(&args)
            .args(extra)
            .output()
            .expect("tshark");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let verbose = run(&["-V"]);
    for bad in [
        "Malformed",
        "no template",
        "Expert Info (Warn",
        "Expert Info (Error",
    ] {
        assert!(!verbose.contains(bad), "tshark: {bad:?} in\n{verbose}");
    }
    // Every frame with a payload (TCP handshakes and ACKs carry none).
    let fields = run(&[
        "-Y",
        "udp or tcp.len > 0",
        "-T",
        "fields",
        "-e",
        "cflow.version",
        "-e",
        "cflow.packets",
    ]);
    let mut frames = 0;
    let mut packets = 0;
    for line in fields.lines() {
        let mut cols = line.split('\t');
        assert_eq!(cols.next(), Some("10"), "not decoded as IPFIX: {line:?}");
        frames += 1;
        for p in cols
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
        {
            packets += p.parse::<u64>().expect("cflow.packets");
        }
    }
    (frames, packets)
}

/// `flowlens run` in namespace a, on the pair's veth, printing JSON records.
struct Agent {
    child: Child,
    stdout: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    lines: Vec<String>,
}

impl Agent {
    fn start(net: &NetPair, extra: &[&str]) -> Agent {
        let ns_run = ["netns", "exec", &net.a, BIN, "run"];
        let mut child = Command::new("ip")
            .args(ns_run)
            .args(["--interface", &net.if_a, "--output", "json"])
            .args(["--poll-interval", "100ms", "--pin-dir", "off"])
            .args(["--grpc-listen", "off", "--metrics-listen", "off"])
            .args(["--idle-timeout-tcp", "1s", "--idle-timeout-udp", "1s"])
            .args(["--idle-timeout-icmp", "1s", "--tcp-close-grace", "200ms"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("flowlens run");
        let (tx, stdout) = crossbeam_channel::unbounded();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut err, log) = (child.stderr.take().expect("stderr"), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let a = Agent {
            child,
            stdout,
            stderr,
            lines: Vec::new(),
        };
        a.wait_log("monitoring");
        a
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.stderr.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "agent: no {needle:?} in\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until a record between `src` and `dst` of `proto` was printed.
    fn wait_record(&mut self, proto: u8, src: IpAddr, dst: IpAddr) {
        self.wait_record_after(0, proto, src, dst);
    }

    /// Waits until a record between `src` and `dst` of `proto` was printed after the
    /// first `seen` records.
    fn wait_record_after(&mut self, seen: usize, proto: u8, src: IpAddr, dst: IpAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let hit = |l: &String| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON record");
            v["protocol"] == proto
                && v["client_addr"] == src.to_string()
                && v["server_addr"] == dst.to_string()
        };
        while !self.lines.iter().skip(seen).any(hit) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(l) => self.lines.push(l),
                Err(_) => panic!(
                    "no {proto} record {src} -> {dst}; agent log:\n{}",
                    self.log()
                ),
            }
        }
    }

    /// SIGTERM (every flow is flushed and exported), then every record printed.
    fn stop(mut self) -> Vec<serde_json::Value> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "agent did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "agent: {status:?}\n{}", self.log());
        self.lines.extend(self.stdout.iter());
        self.lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("JSON record"))
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection from a to b: `up` bytes sent, `down` bytes answered.
fn tcp_exchange(net: &NetPair, v6: bool, up: usize, down: usize) {
    let listener = net.listen_b(v6, 0);
    let to = listener.local_addr().expect("listener address");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        s.write_all(&vec![7u8; down]).expect("answer");
        got.len()
    });
    net.in_ns(&net.a, move || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        c.write_all(&vec![1u8; up]).expect("send");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut back = Vec::new();
        c.read_to_end(&mut back).expect("read answer");
        assert_eq!(back.len(), down);
    })
    .join()
    .expect("client");
    assert_eq!(server.join().expect("server"), up);
}

/// `n` UDP requests of `req` bytes from a to b, each answered with `resp` bytes.
fn udp_exchange(net: &NetPair, v6: bool, n: usize, req: usize, resp: usize) {
    let (a, b) = net.addrs(v6);
    let server = net
        .in_ns(&net.b, move || UdpSocket::bind((b, 0)).expect("bind b"))
        .join()
        .expect("bind");
    let to = server.local_addr().expect("server address");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        for _ in 0..n {
            let (_, from) = server.recv_from(&mut buf).expect("request");
            server.send_to(&vec![2u8; resp], from).expect("response");
        }
    });
    net.in_ns(&net.a, move || {
        let c = UdpSocket::bind((a, 0)).expect("bind a");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = vec![0u8; 65536];
        for _ in 0..n {
            c.send_to(&vec![1u8; req], to).expect("request");
            assert_eq!(c.recv(&mut buf).expect("response"), resp);
        }
    })
    .join()
    .expect("client");
    echo.join().expect("server");
}

/// flowlens' counts of the TCP/UDP flows between a and b.
fn test_flows(c: &Counts, net: &NetPair, proto: u8) -> Counts {
    let ours = [net.v4_a, net.v4_b, net.v6_a, net.v6_b];
    c.iter()
        .filter(|((s, d, _, _, p), _)| *p == proto && ours.contains(s) && ours.contains(d))
        .map(|(k, v)| (*k, *v))
        .collect()
}

#[test]
fn udp_export_decodes_in_nfcapd_nfacctd_and_tshark_with_flowlens_counts() {
    collectors_installed();
    let net = NetPair::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pcap = tmp.path().join("udp.pcap");
    let cap = tshark_capture(&net.a, "udp port 4739 or udp port 4740", &pcap);
    let nf = nfcapd(&net.a, 4739, &tmp.path().join("nfcapd"));
    let pm_out = tmp.path().join("pmacct.json");
    // nfacctd over IPv6. A small MTU: the records travel in many messages. Timing metrics
    // under a PEN: the collectors skip what they do not know and still decode the rest.
    let pm = nfacctd(&net.a, "::1", 4740, &pm_out);
    let agent = Agent::start(
        &net,
        &[
            "--ipfix",
            "udp://127.0.0.1:4739",
            "--ipfix",
            "udp://[::1]:4740",
            "--ipfix-mtu",
            "576",
            "--ipfix-observation-domain",
            "7",
            "--ipfix-enterprise",
            "32473",
        ],
    );
    tcp_exchange(&net, false, 30_000, 5_000);
    tcp_exchange(&net, true, 2_000, 40_000);
    udp_exchange(&net, false, 5, 300, 100);
    udp_exchange(&net, true, 4, 1200, 50);
    for _ in 0..8 {
        udp_exchange(&net, false, 1, 64, 64);
    }
    net.ping_from_a(net.v4_b, 3);
    net.ping_from_a(net.v6_b, 3);
    let records = agent.stop();
    let want = flowlens_counts(&records);
    assert_eq!(test_flows(&want, &net, 6).len(), 4, "{want:#?}");
    assert_eq!(test_flows(&want, &net, 17).len(), 2 * 10, "{want:#?}");
    let data_records = want.len();
    std::thread::sleep(Duration::from_millis(500));

    let nf_log = nf.stop(libc::SIGTERM);
    assert!(nf_log.contains("Sequence Errors: 0"), "{nf_log}");
    assert_eq!(nfdump_counts(&tmp.path().join("nfcapd")), want, "nfcapd");
    // pmacct writes its cache every second and on exit.
    std::thread::sleep(Duration::from_millis(1500));
    pm.stop(libc::SIGINT);
    assert_eq!(pmacct_counts(&pm_out), want, "nfacctd");

    cap.stop(libc::SIGINT);
    let (frames, packets) = tshark_decode(
        &pcap,
        &["udp.port==4739,cflow".into(), "udp.port==4740,cflow".into()],
    );
    let total: u64 = want.values().map(|(p, _)| p).sum();
    assert_eq!(
        packets,
        2 * total,
        "tshark's packet counts of both collectors' messages"
    );
    assert!(
        frames >= 4,
        "{frames} messages for {data_records} data records"
    );
}

#[test]
fn udp_templates_are_resent_on_refresh_after_a_collector_restart() {
    collectors_installed();
    let net = NetPair::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir1, dir2) = (tmp.path().join("nf1"), tmp.path().join("nf2"));
    let nf = nfcapd(&net.a, 4739, &dir1);
    let mut agent = Agent::start(
        &net,
        &[
            "--ipfix",
            "udp://127.0.0.1:4739",
            "--ipfix-template-refresh",
            "1s",
        ],
    );
    tcp_exchange(&net, false, 10_000, 1_000);
    agent.wait_record(6, net.v4_a, net.v4_b);
    std::thread::sleep(Duration::from_millis(300));
    nf.stop(libc::SIGTERM);

    // A new collector knows no template: it decodes again after the next refresh.
    let nf = nfcapd(&net.a, 4739, &dir2);
    std::thread::sleep(Duration::from_millis(1500));
    udp_exchange(&net, true, 3, 500, 70);
    agent.wait_record(17, net.v6_a, net.v6_b);
    std::thread::sleep(Duration::from_millis(300));
    nf.stop(libc::SIGTERM);
    let want = flowlens_counts(&agent.stop());

    let (tcp, udp) = (test_flows(&want, &net, 6), test_flows(&want, &net, 17));
    assert_eq!((tcp.len(), udp.len()), (2, 2), "{want:#?}");
    assert_eq!(
        test_flows(&nfdump_counts(&dir1), &net, 6),
        tcp,
        "before the restart"
    );
    assert_eq!(
        test_flows(&nfdump_counts(&dir2), &net, 17),
        udp,
        "after the restart"
    );
}

/// A TCP IPFIX collector stand-in: nfcapd and nfacctd take IPFIX over UDP only, so this
/// accepts the agent's connection on 127.0.0.1:`port` and relays each message, as framed by
/// its length field, to a UDP collector. Stopping it closes the connection.
struct Relay {
    stop: Arc<std::sync::atomic::AtomicBool>,
    connected: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Relay {
    fn start(net: &NetPair, port: u16, to: u16) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (listener, udp) = net
            .in_ns(&net.a, move || {
                let l = TcpListener::bind(("127.0.0.1", port)).expect("relay listen");
                let u = UdpSocket::bind(("127.0.0.1", 0)).expect("relay socket");
                (l, u)
            })
            .join()
            .expect("relay sockets");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let (stop2, conn2) = (stop.clone(), connected.clone());
        let thread = std::thread::spawn(move || {
            let mut msgs = Vec::new();
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if stop2.load(Ordering::SeqCst) => return msgs,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            conn2.store(true, Ordering::SeqCst);
            stream.set_nonblocking(false).expect("blocking");
            stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            while !stop2.load(Ordering::SeqCst) {
                match stream.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(_) => continue,
                }
                while buf.len() >= 4 && buf.len() >= usize::from(be16(&buf, 2)) {
                    let msg: Vec<u8> = buf.drain(..usize::from(be16(&buf, 2))).collect();
                    udp.send_to(&msg, ("127.0.0.1", to)).expect("relay");
                    msgs.push(msg);
                }
            }
            msgs
        });
        Relay {
            stop,
            connected,
            thread: Some(thread),
        }
    }

    fn wait_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.connected.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the agent did not connect");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes the connection; every message relayed.
    fn stop(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().expect("thread").join().expect("relay")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A session's messages: templates first, sequence numbers from 0 counting data records.
fn assert_session(msgs: &[Vec<u8>]) {
    assert!(!msgs.is_empty(), "no message");
    assert_eq!(sets(&msgs[0])[0].0, 2, "the session starts with templates");
    let enc = Encoder::new(0, 1400, None).expect("encoder");
    let mut seq = 0u32;
    for m in msgs {
        assert_eq!(be32(m, 8), seq, "sequence number");
        for (id, body) in sets(m).into_iter().filter(|(id, _)| *id != 2) {
            let t = enc
                .templates()
                .iter()
                .find(|t| t.id == id)
                .expect("template");
            seq += (body.len() / t.record_len) as u32;
        }
    }
}

#[test]
fn tcp_export_reconnects_and_resends_templates_after_a_collector_restart() {
    collectors_installed();
    let net = NetPair::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pcap = tmp.path().join("tcp.pcap");
    let cap = tshark_capture(&net.a, "tcp port 4741", &pcap);
    let (dir1, dir2) = (tmp.path().join("nf1"), tmp.path().join("nf2"));
    let nf = nfcapd(&net.a, 4739, &dir1);
    let relay = Relay::start(&net, 4741, 4739);
    let mut agent = Agent::start(&net, &["--ipfix", "tcp://127.0.0.1:4741"]);
    relay.wait_connected();
    tcp_exchange(&net, true, 25_000, 2_000);
    agent.wait_record(6, net.v6_a, net.v6_b);
    std::thread::sleep(Duration::from_millis(300));
    let first = relay.stop();
    nf.stop(libc::SIGTERM);

    // A new collector behind a new listener: the agent reconnects and starts a new session.
    let nf = nfcapd(&net.a, 4739, &dir2);
    let relay = Relay::start(&net, 4741, 4739);
    relay.wait_connected();
    udp_exchange(&net, false, 4, 800, 90);
    let records = agent.stop();
    std::thread::sleep(Duration::from_millis(300));
    let second = relay.stop();
    nf.stop(libc::SIGTERM);
    cap.stop(libc::SIGINT);

    assert_session(&first);
    assert_session(&second);
    let want = flowlens_counts(&records);
    let (tcp, udp) = (test_flows(&want, &net, 6), test_flows(&want, &net, 17));
    assert_eq!((tcp.len(), udp.len()), (2, 2), "{want:#?}");
    assert_eq!(
        test_flows(&nfdump_counts(&dir1), &net, 6),
        tcp,
        "first session"
    );
    assert_eq!(
        test_flows(&nfdump_counts(&dir2), &net, 17),
        udp,
        "second session"
    );
    let (frames, _) = tshark_decode(&pcap, &["tcp.port==4741,cflow".into()]);
    assert!(frames >= 2, "{frames} TCP segments with IPFIX");
}

/// One RFC 5103 biflow message: the forward counters standard, the reverse ones under
/// PEN 29305, for a flow 10.9.0.1:40000 -> 10.9.0.2:80 of 11 packets / 1111 bytes forward
/// and 22 / 2222 back.
fn biflow_message() -> Vec<u8> {
    let fields: [(u16, u16, bool); 11] = [
        (8, 4, false),
        (12, 4, false),
        (7, 2, false),
        (11, 2, false),
        (4, 1, false),
        (152, 8, false),
        (153, 8, false),
        (1, 8, false),
        (2, 8, false),
        (1, 8, true),
        (2, 8, true),
    ];
    let mut tpl = vec![1, 0, 0, fields.len() as u8];
    for (id, len, reverse) in fields {
        tpl.extend_from_slice(&(id | if reverse { 0x8000 } else { 0 }).to_be_bytes());
        tpl.extend_from_slice(&len.to_be_bytes());
        if reverse {
            tpl.extend_from_slice(&29305u32.to_be_bytes());
        }
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock");
    let ms = now.as_millis() as u64;
    let mut data = vec![10, 9, 0, 1, 10, 9, 0, 2, 0x9c, 0x40, 0, 80, 6];
    for v in [ms - 2000, ms - 1000, 1111, 11, 2222, 22] {
        data.extend_from_slice(&v.to_be_bytes());
    }
    let mut msg = Vec::new();
    let len = 16 + 4 + tpl.len() + 4 + data.len();
    msg.extend_from_slice(&10u16.to_be_bytes());
    msg.extend_from_slice(&(len as u16).to_be_bytes());
    msg.extend_from_slice(&(now.as_secs() as u32).to_be_bytes());
    msg.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
    for (id, body) in [(2u16, &tpl), (256, &data)] {
        msg.extend_from_slice(&id.to_be_bytes());
        msg.extend_from_slice(&(4 + body.len() as u16).to_be_bytes());
        msg.extend_from_slice(body);
    }
    msg
}

/// Why flowlens exports two uniflow records: nfacctd drops RFC 5103 reverse counters.
#[test]
fn biflow_reverse_counters_are_lost_by_nfacctd() {
    collectors_installed();
    let net = NetPair::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let nf = nfcapd(&net.a, 4739, &tmp.path().join("nfcapd"));
    let pm_out = tmp.path().join("pmacct.json");
    let pm = nfacctd(&net.a, "127.0.0.1", 4740, &pm_out);
    let msg = biflow_message();
    net.in_ns(&net.a, move || {
        let s = UdpSocket::bind(("127.0.0.1", 0)).expect("bind");
        for port in [4739, 4740] {
            s.send_to(&msg, ("127.0.0.1", port)).expect("send");
        }
    })
    .join()
    .expect("sender");
    std::thread::sleep(Duration::from_millis(1500));
    nf.stop(libc::SIGTERM);
    pm.stop(libc::SIGINT);

    let (a, b) = (
        IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1)),
        IpAddr::V4(Ipv4Addr::new(10, 9, 0, 2)),
    );
    let out = Command::new("nfdump")
        .args([
            "-R",
            tmp.path().join("nfcapd").to_str().expect("utf-8"),
            "-q",
            "-o",
            "csv",
        ])
        .output()
        .expect("nfdump");
    let csv = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = csv.lines().next().expect("one flow").split(',').collect();
    // nfdump keeps the reverse counters as the flow's "out" packets and bytes...
    assert_eq!(
        (f[11], f[12], f[13], f[14]),
        ("11", "1111", "22", "2222"),
        "{csv}"
    );
    // ...pmacct only the forward ones.
    let pm = pmacct_counts(&pm_out);
    assert_eq!(pm, Counts::from([((a, b, 40000, 80, 6), (11, 1111))]));
}

#[test]
fn an_unreachable_collector_loses_records_with_one_warning_and_never_stalls_the_agent() {
    let net = NetPair::new();
    // Nothing listens on either port: TCP connects are refused, UDP sends bounce.
    let mut agent = Agent::start(
        &net,
        &[
            "--ipfix",
            "tcp://127.0.0.1:4742",
            "--ipfix",
            "udp://127.0.0.1:4743",
        ],
    );
    for _ in 0..3 {
        udp_exchange(&net, false, 2, 100, 100);
    }
    agent.wait_record(17, net.v4_a, net.v4_b);
    udp_exchange(&net, true, 2, 100, 100);
    agent.wait_record(17, net.v6_a, net.v6_b);
    let warned = |log: &str, d: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("IPFIX collector {d} unreachable")))
            .count()
    };
    // UDP learns of a refusal from the ICMP error a send provoked, on a later send: how
    // many sends that takes depends on when the kernel delivers the error (under load, after
    // the next batch went out), so records keep coming until one send has failed.
    for _ in 0..10 {
        if warned(&agent.log(), "udp://127.0.0.1:4743") > 0 {
            break;
        }
        let seen = agent.lines.len();
        udp_exchange(&net, false, 1, 100, 100);
        agent.wait_record_after(seen, 17, net.v4_a, net.v4_b);
    }
    let log = agent.log();
    let t0 = Instant::now();
    let records = agent.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stopping took {:?}",
        t0.elapsed()
    );
    assert!(records.len() >= 4);
    assert_eq!(warned(&log, "tcp://127.0.0.1:4742"), 1, "{log}");
    // However many sends failed, one warning for the episode.
    assert_eq!(warned(&log, "udp://127.0.0.1:4743"), 1, "{log}");
    assert!(!log.contains("reachable again"), "{log}");
}

#[test]
fn a_stalled_tcp_collector_costs_records_not_time() {
    let net = NetPair::new();
    // Tiny socket buffers in the agent's namespace, so a collector that stops reading
    // blocks the exporter's writes after a few messages.
    for (key, val) in [
        ("net.ipv4.tcp_wmem", "4096 4096 4096"),
        ("net.ipv4.tcp_rmem", "4096 4096 4096"),
    ] {
        common::netns::sh(&[
            "ip",
            "netns",
            "exec",
            &net.a,
            "sysctl",
            "-qw",
            &format!("{key}={val}"),
        ]);
    }
    let listener = net
        .in_ns(&net.a, || {
            TcpListener::bind(("127.0.0.1", 4744)).expect("listen")
        })
        .join()
        .expect("listener");
    // Accepts every connection and never reads from it, until the test is done.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let held = std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let mut conns = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            match listener.accept() {
                Ok((c, _)) => conns.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        conns.len()
    });
    let mut agent = Agent::start(&net, &["--ipfix", "tcp://127.0.0.1:4744"]);
    for _ in 0..150 {
        udp_exchange(&net, false, 1, 32, 32);
    }
    // Records keep coming on stdout on time while the exporter is stuck.
    let t0 = Instant::now();
    agent.wait_record(17, net.v4_a, net.v4_b);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "stdout waited {:?}",
        t0.elapsed()
    );
    agent.wait_log("IPFIX collector tcp://127.0.0.1:4744 unreachable");
    let log = agent.log();
    let t0 = Instant::now();
    let records = agent.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "stopping took {:?}",
        t0.elapsed()
    );
    assert!(records.len() >= 150, "{} records", records.len());
    assert!(
        log.contains("timed out") || log.contains("Resource temporarily unavailable"),
        "{log}"
    );
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(held.join().expect("listener thread") >= 1);
}
