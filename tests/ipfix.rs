//! IPFIX export: byte-exact encoding, and real traffic exported by the agent to nfcapd, nfacctd
//! and tshark (UDP and TCP), whose per-flow counters must equal flowlens' own records.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::netns::NetPair;
use crossbeam_channel::Receiver;
use flowlens::flow::{DirStats, EndReason, FlowRecord, Hook, IcmpInfo, TcpInfo, TcpState};
use flowlens::ipfix::encode::{self, Encoder};
use flowlens::ipfix::{Destination, DestinationError, Transport};

const BIN: &str = env!("CARGO_BIN_EXE_flowlens");

// ---------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------

fn tcp_record() -> FlowRecord {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    FlowRecord {
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
        assert!(len >= 4 && at + len <= msg.len(), "set length {len} at {at}");
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
    assert_eq!(&m[4..16], &[
        0x65, 0x53, 0xf1, 0x64, // export time 1_700_000_100
        0, 0, 0, 0, // sequence: no data record before
        0, 0, 0, 42, // observation domain
    ]);
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
    let f = t.fields.last().expect("fields");
    assert_eq!((f.id, f.len, f.enterprise), (7, 8, Some(32473)));
    let mut enc = Encoder::new(0, 1372, Some(32473)).expect("encoder");
    let m = &messages(&mut enc, &[], true)[0];
    let body = &sets(m)[0].1;
    let tcp = &body[enc.templates()[0].wire_len()..];
    // 16 standard fields of 4 bytes, then the first enterprise field with bit 15 set.
    let at = 4 + 16 * 4;
    assert_eq!(&tcp[at..at + 8], &[0x80, 0x01, 0, 4, 0, 0, 0x7e, 0xd9]);
    // Plain and ICMP templates of IPv4 and IPv6 alike: nothing without a PEN.
    let plain = Encoder::new(0, 1372, None).expect("encoder");
    assert!(plain.templates().iter().all(|t| t.fields.iter().all(|f| f.enterprise.is_none())));
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
    let fid = encode::flow_id(&rec).to_be_bytes();
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
    assert_eq!(be32(m, 8), 2, "sequence counts the earlier message's records");
    let s = sets(m);
    assert_eq!(s[0].0, 261);
    assert_eq!(s[0].1.len(), 8 + 32 + 1 + 9 + 16 + 16 + 1 + 1 + 2);
    assert_eq!(&s[0].1[s[0].1.len() - 2..], &[128, 0]);
    assert_eq!(enc.sequence(), 3);
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
            let t = enc.templates().iter().find(|t| t.id == id).expect("known set id");
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
    assert!(Encoder::new(0, 150, None).is_err(), "150 bytes cannot hold a template");
}

#[test]
fn flow_id_is_stable_and_keyed_on_the_flow() {
    let a = tcp_record();
    let mut b = tcp_record();
    b.client.packets = 99;
    b.end_reason = EndReason::ActiveTimeout;
    assert_eq!(encode::flow_id(&a), encode::flow_id(&b));
    b.ifindex = 8;
    assert_ne!(encode::flow_id(&a), encode::flow_id(&b));
    // Pinned: the hash must not change between versions or hosts.
    assert_eq!(encode::flow_id(&a), FLOW_ID_OF_TCP_RECORD);
}

const FLOW_ID_OF_TCP_RECORD: u64 = 8_674_123_132_804_027_203;

#[test]
fn end_reasons_map_to_iana_codes() {
    let codes: Vec<u8> = EndReason::ALL.iter().map(|r| encode::end_reason_code(*r)).collect();
    assert_eq!(codes, [1, 2, 3, 3, 4]);
}

#[test]
fn destinations_parse_with_precise_errors() {
    let d: Destination = "udp://collector.example:2055".parse().expect("udp");
    assert_eq!(
        (d.transport, d.host.as_str(), d.port),
        (Transport::Udp, "collector.example", 2055)
    );
    let d: Destination = "TCP://[fd00::1]:4740".parse().expect("tcp v6");
    assert_eq!((d.transport, d.host.as_str(), d.port), (Transport::Tcp, "fd00::1", 4740));
    assert_eq!(d.to_string(), "tcp://[fd00::1]:4740");
    let d: Destination = "udp://10.0.0.1".parse().expect("default port");
    assert_eq!(d.port, 4739);
    let err = |s: &str| s.parse::<Destination>().unwrap_err();
    assert_eq!(err("10.0.0.1:4739"), DestinationError::NoScheme("10.0.0.1:4739".into()));
    assert_eq!(
        err("sctp://h:1"),
        DestinationError::Scheme("sctp://h:1".into(), "sctp".into())
    );
    assert_eq!(err("udp://:4739"), DestinationError::NoHost("udp://:4739".into()));
    assert_eq!(
        err("udp://h:0"),
        DestinationError::Port("udp://h:0".into(), "0".into())
    );
    assert_eq!(
        err("udp://h:70000"),
        DestinationError::Port("udp://h:70000".into(), "70000".into())
    );
    assert_eq!(err("udp://[::1:4739"), DestinationError::Bracket("udp://[::1:4739".into()));
    assert_eq!(
        err("udp://h:1/x"),
        DestinationError::Trailing("udp://h:1/x".into(), "/x".into())
    );
    assert!(err("udp://h:x").to_string().contains("\"udp://h:x\""), "errors name the value");
}

#[test]
fn bad_ipfix_flags_are_rejected_naming_the_flag() {
    for (args, needle) in [
        (&["--ipfix", "http://x:1"][..], "--ipfix"),
        (&["--ipfix", "udp://x:99999"][..], "99999"),
        (&["--ipfix-mtu", "500"][..], "--ipfix-mtu"),
        (&["--ipfix-template-refresh", "0s"][..], "--ipfix-template-refresh"),
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
