//! BPF_PROG_TEST_RUN tests: hand-built packets through the loaded programs, maps read back.

mod common;

use common::{Harness, Hook};
use flowlens::kernel::bpf::types;
use flowlens::kernel::datapath::{Admission, Capacities};
use flowlens::kernel::packet::*;
use flowlens::poller::decode::{addr_key, client_dir, ext_kind, meta, HI_TO_LO, LO_TO_HI};

const A: [u8; 4] = [10, 200, 0, 1];
const B: [u8; 4] = [10, 200, 0, 2];
const TC_ACT_UNSPEC: u32 = u32::MAX; // TCX_NEXT / TC_ACT_UNSPEC (-1)

fn v4(a: [u8; 4]) -> [u8; 16] {
    addr_key(std::net::IpAddr::from(a))
}

#[test]
fn programs_are_passive() {
    let h = Harness::new();
    let f = v4_frame(A, B, 17, 64, &udp(1000, 53, b"q"));
    assert_eq!(h.run(Hook::Ingress, &f), TC_ACT_UNSPEC);
    assert_eq!(h.run(Hook::Egress, &f), TC_ACT_UNSPEC);
    let bad = eth(ETH_P_IP, &[(ETH_P_8021Q, 1)], &[0x45]);
    assert_eq!(h.run(Hook::Ingress, &bad), TC_ACT_UNSPEC);
}

#[test]
fn ipv4_udp_both_directions_share_one_entry_with_exact_counts() {
    let h = Harness::new();
    for _ in 0..3 {
        h.run(
            Hook::Egress,
            &v4_frame(B, A, 17, 64, &udp(40000, 53, &[0u8; 100])),
        );
    }
    h.run(
        Hook::Ingress,
        &v4_frame(A, B, 17, 120, &udp(53, 40000, &[0u8; 300])),
    );
    let (k, b) = h.only_flow();
    assert_eq!(k.ip_version, 4);
    assert_eq!(k.proto, 17);
    assert_eq!(k.addr_lo, v4(A));
    assert_eq!(k.addr_hi, v4(B));
    assert_eq!((k.port_lo, k.port_hi), (53, 40000));
    assert_eq!(k.ifindex, 1, "test_run packets arrive on loopback");
    // B (hi) sent 3 x (20 + 8 + 100), A (lo) sent 1 x (20 + 8 + 300)
    assert_eq!(b.packets[HI_TO_LO], 3);
    assert_eq!(b.bytes[HI_TO_LO], 3 * 128);
    assert_eq!(b.packets[LO_TO_HI], 1);
    assert_eq!(b.bytes[LO_TO_HI], 328);
    assert_eq!(b.ttl[HI_TO_LO], 64);
    assert_eq!(b.ttl[LO_TO_HI], 120);
    assert_eq!(client_dir(&b), HI_TO_LO, "B sent first");
    assert_eq!(b.meta & meta::EGRESS, meta::EGRESS, "first seen at egress");
    assert_eq!(ext_kind(&b), 0);
    // The tick's clock of the later packets may be up to a tick behind the fine clock of
    // the first (see the next test).
    assert!(b.first_seen_ns > 0 && b.last_seen_ns + 20_000_000 >= b.first_seen_ns);
    assert!(h.tcp().is_empty(), "UDP must create no TCP entry");
    assert!(h.icmp().is_empty(), "UDP must create no ICMP entry");
    assert_eq!(h.counter("packets_accounted"), 4);
}

/// A flow's first packet is timed on the fine clock (the tick's clock lagged it by up to
/// a tick, several ms), and the record of a flow never has a negative duration although
/// its later packets are timed on the tick's clock.
#[test]
fn first_seen_is_the_first_packets_fine_time_and_durations_are_never_negative() {
    use flowlens::poller::decode::{monotonic_ns, Clock, Counts, RecordMeta};
    use flowlens::record::flow::EndReason;
    let clock = Clock::new();
    let h = Harness::new();
    for port in 0..20 {
        let f = v4_frame(A, B, 17, 64, &udp(40000 + port, 53, b"q"));
        let before = monotonic_ns();
        h.run(Hook::Egress, &f);
        let after = monotonic_ns();
        let find = || {
            h.joined()
                .into_iter()
                .find(|f| f.key.port_lo == 40000 + port)
                .expect("the flow")
        };
        let first = find().base.first_seen_ns;
        assert!(
            (before..=after).contains(&first),
            "first seen {first} not within the send, {before}..{after}"
        );
        h.run(Hook::Egress, &f);
        let raw = find();
        let rec = raw.to_record(
            RecordMeta {
                counts: Counts::of(&raw.base),
                end_reason: EndReason::IdleTimeout,
                interface: "lo".into(),
                observer: "test".into(),
                window_start_ns: raw.base.first_seen_ns,
                emitted_ns: raw.base.last_seen_ns,
                flow_id: raw.flow_id(),
                continuation: false,
                local: [None, None],
            },
            &clock,
        );
        assert!(rec.last_seen >= rec.first_seen, "{rec:?}");
        assert!(rec.window_start <= rec.last_seen, "{rec:?}");
    }
}

#[test]
fn ipv4_tcp_handshake_state_lives_in_the_base_entry() {
    let h = Harness::new();
    h.run(
        Hook::Egress,
        &v4_frame(A, B, 6, 64, &tcp(50000, 80, TCP_SYN, &[])),
    );
    h.run(
        Hook::Ingress,
        &v4_frame(B, A, 6, 63, &tcp(80, 50000, TCP_SYN | TCP_ACK, &[])),
    );
    h.run(
        Hook::Egress,
        &v4_frame(A, B, 6, 64, &tcp(50000, 80, TCP_ACK, &[])),
    );
    let f = h.only_joined();
    let (k, b) = (f.key, f.base);
    assert_eq!((k.port_lo, k.port_hi), (50000, 80));
    assert_eq!(b.packets, [2, 1]);
    assert_eq!(b.bytes, [80, 40]);
    assert_eq!(ext_kind(&b), types::flow_ext::EXT_TCP.0);
    assert_ne!(b.ext_id, 0, "a TCP flow gets an extension id");
    assert_eq!(client_dir(&b), LO_TO_HI);
    assert!(
        h.tcp().is_empty(),
        "no latency sample yet: no flows_tcp entry"
    );
    assert!(h.icmp().is_empty());
    let t = f.tcp_hot().expect("TCP state");
    assert_eq!(t.flags[LO_TO_HI], TCP_SYN | TCP_ACK);
    assert_eq!(t.flags[HI_TO_LO], TCP_SYN | TCP_ACK);
    assert_eq!(u32::from(t.state), types::tcp_state::TCP_ST_ESTABLISHED.0);
    // The first answer to the other side's payload makes the entry, under the base's id.
    h.run(
        Hook::Egress,
        &v4_frame(A, B, 6, 64, &tcp(50000, 80, TCP_ACK | TCP_PSH, b"GET")),
    );
    assert!(h.tcp().is_empty(), "a first payload is no sample");
    h.run(
        Hook::Ingress,
        &v4_frame(B, A, 6, 64, &tcp(80, 50000, TCP_ACK | TCP_PSH, b"200")),
    );
    let t = h.tcp();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].0, b.ext_id);
    assert_eq!(t[0].1.lat[HI_TO_LO].count, 1);
}

#[test]
fn initiator_is_the_syn_sender_even_when_the_syn_ack_is_seen_first() {
    let h = Harness::new();
    // Mid-handshake start: the SYN-ACK from B's port 80 is the first packet.
    h.run(
        Hook::Ingress,
        &v4_frame(B, A, 6, 64, &tcp(80, 50000, TCP_SYN | TCP_ACK, &[])),
    );
    let (_, b) = h.only_flow();
    assert_eq!(client_dir(&b), LO_TO_HI, "A (lo) is the client");
    assert_eq!(b.meta & meta::EGRESS, 0, "first seen at ingress");
}

#[test]
fn ipv6_tcp_udp_and_icmpv6() {
    let h = Harness::new();
    let (a, b) = (ula(1), ula(2));
    h.run(
        Hook::Egress,
        &v6_frame(a, b, 6, 64, &tcp(40000, 443, TCP_SYN, &[])),
    );
    h.run(
        Hook::Egress,
        &v6_frame(a, b, 17, 64, &udp(40001, 53, &[1u8; 12])),
    );
    h.run(
        Hook::Egress,
        &v6_frame(a, b, 58, 64, &echo(128, 7, 1, &[0u8; 56])),
    );
    h.run(
        Hook::Ingress,
        &v6_frame(b, a, 58, 61, &echo(129, 7, 1, &[0u8; 56])),
    );
    let flows = h.flows();
    assert_eq!(flows.len(), 3, "{flows:?}");
    for (k, base) in &flows {
        assert_eq!(k.ip_version, 6);
        assert_eq!(k.addr_lo, a);
        assert_eq!(k.addr_hi, b);
        match k.proto {
            6 => assert_eq!(base.bytes[LO_TO_HI], 60),
            17 => assert_eq!(base.bytes[LO_TO_HI], 60),
            58 => {
                assert_eq!((k.port_lo, k.port_hi), (7, 7), "echo id keys the flow");
                assert_eq!(base.packets, [1, 1], "request and reply share one entry");
                assert_eq!(base.bytes, [104, 104]);
                assert_eq!(base.ttl, [64, 61]);
            }
            p => panic!("unexpected proto {p}"),
        }
    }
    assert!(h.tcp().is_empty(), "a SYN alone gives no latency sample");
    let echo = h
        .joined()
        .into_iter()
        .find(|f| f.key.proto == 58)
        .expect("ICMPv6 flow");
    assert_eq!(echo.icmp.map(|c| c.rtt_count), Some(1), "one RTT sample");
    assert_eq!(h.icmp().len(), 1);
    // SAFETY: an ICMP flow's base holds the ICMP arm; both arms are plain integers.
    let hot = unsafe { echo.base.l4.icmp };
    assert_eq!(hot.r#type, [128, 129]);
    assert_eq!(hot.code, [0, 0]);
}

#[test]
fn ipv4_icmp_echo_pairs_and_other_types_key_by_type_code() {
    let h = Harness::new();
    h.run(
        Hook::Egress,
        &v4_frame(A, B, 1, 64, &echo(8, 0x1234, 1, &[0u8; 56])),
    );
    h.run(
        Hook::Ingress,
        &v4_frame(B, A, 1, 64, &echo(0, 0x1234, 1, &[0u8; 56])),
    );
    // A different echo identifier is a different conversation.
    h.run(
        Hook::Egress,
        &v4_frame(A, B, 1, 64, &echo(8, 0x9999, 1, &[])),
    );
    // Destination unreachable, port unreachable (3/3).
    h.run(
        Hook::Ingress,
        &v4_frame(B, A, 1, 64, &icmp(3, 3, [0; 4], &[0u8; 28])),
    );
    let flows = h.flows();
    assert_eq!(flows.len(), 3, "{flows:?}");
    let echo_flow = flows
        .iter()
        .find(|(k, _)| k.port_lo == 0x1234)
        .expect("echo flow");
    assert_eq!(echo_flow.0.port_hi, 0x1234);
    assert_eq!(echo_flow.1.packets, [1, 1]);
    assert_eq!(echo_flow.1.bytes, [84, 84]);
    let unreach = flows
        .iter()
        .find(|(k, _)| k.port_lo == 0x0303)
        .expect("unreachable flow");
    assert_eq!(unreach.0.port_hi, !0x0303u16);
    assert_eq!(unreach.1.bytes[HI_TO_LO], 20 + 8 + 28);
    assert_eq!(client_dir(&echo_flow.1), LO_TO_HI);
    // Only the answered echo has an RTT sample, so only it has an entry.
    let icmp = h.icmp();
    assert_eq!(icmp.len(), 1);
    assert_eq!(icmp[0].0, echo_flow.1.ext_id);
    assert_eq!(icmp[0].1.rtt_count, 1);
    assert!(h.tcp().is_empty());
}

#[test]
fn vlan_and_qinq_tagged_packets_are_parsed() {
    let h = Harness::new();
    let l3 = ipv4(A, B, 17, 64, &udp(1000, 2000, &[0u8; 10]));
    h.run(Hook::Ingress, &eth(ETH_P_IP, &[(ETH_P_8021Q, 100)], &l3));
    h.run(
        Hook::Ingress,
        &eth(ETH_P_IP, &[(ETH_P_8021AD, 200), (ETH_P_8021Q, 100)], &l3),
    );
    let (_, b) = h.only_flow();
    assert_eq!(b.packets[LO_TO_HI], 2);
    assert_eq!(b.bytes[LO_TO_HI], 2 * 38, "VLAN tags are not IP bytes");
}

#[test]
fn ethernet_padding_is_not_counted_and_gso_segments_are() {
    let h = Harness::new();
    let mut f = v4_frame(A, B, 6, 64, &tcp(1000, 2000, TCP_ACK, &[]));
    f.resize(60, 0); // minimum Ethernet frame: 6 bytes of padding
    h.run(Hook::Ingress, &f);
    let (_, b) = h.only_flow();
    assert_eq!(b.bytes[LO_TO_HI], 40);
    // A 3-segment GSO packet of 3 x 1000 payload bytes: each segment
    // carries its own 40 bytes of IP + TCP header on the wire.
    let g = v4_frame(A, B, 6, 64, &tcp(1000, 2000, TCP_ACK, &[0u8; 3000]));
    h.run_gso(Hook::Egress, &g, 3);
    let (_, b) = h.only_flow();
    assert_eq!(b.packets[LO_TO_HI], 1 + 3);
    assert_eq!(b.bytes[LO_TO_HI], 40 + 3040 + 2 * 40);
}

#[test]
fn ipv6_extension_headers_are_skipped_and_non_first_fragments_have_no_ports() {
    let h = Harness::new();
    let (a, b) = (ula(1), ula(2));
    // hop-by-hop (8 bytes) -> destination options (16 bytes) -> UDP
    let mut ext = vec![60, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&[17, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ext.extend_from_slice(&udp(5000, 6000, &[0u8; 4]));
    h.run(Hook::Ingress, &v6_frame(a, b, 0, 64, &ext));
    let (k, base) = h.only_flow();
    assert_eq!((k.proto, k.port_lo, k.port_hi), (17, 5000, 6000));
    assert_eq!(base.bytes[LO_TO_HI], 40 + 24 + 12);

    // A non-first IPv4 fragment: offset 185 (1480 bytes), no UDP header.
    let mut frag = ipv4(A, B, 17, 64, &[0u8; 100]);
    frag[6..8].copy_from_slice(&185u16.to_be_bytes());
    h.run(Hook::Ingress, &eth(ETH_P_IP, &[], &frag));
    let flows = h.flows();
    let f = flows
        .iter()
        .find(|(k, _)| k.ip_version == 4)
        .expect("fragment flow");
    assert_eq!((f.0.port_lo, f.0.port_hi), (0, 0));
    assert_eq!(f.1.bytes[LO_TO_HI], 120);
    assert_eq!(h.counter("ip_fragments_non_first"), 1);
}

#[test]
fn other_ip_protocols_are_port_less_flows() {
    let h = Harness::new();
    // GRE (47)
    h.run(Hook::Ingress, &v4_frame(A, B, 47, 64, &[0u8; 24]));
    let (k, b) = h.only_flow();
    assert_eq!((k.proto, k.port_lo, k.port_hi), (47, 0, 0));
    assert_eq!(b.bytes[LO_TO_HI], 44);
    assert_eq!(ext_kind(&b), 0);
}

/// Every malformed packet leaves all maps unchanged and bumps exactly its counter.
#[test]
fn malformed_packets_are_counted_and_change_nothing() {
    let h = Harness::new();
    // A valid flow first, so "unchanged" is checked against real state.
    h.run(
        Hook::Ingress,
        &v4_frame(A, B, 6, 64, &tcp(1, 2, TCP_SYN, &[])),
    );
    let (a6, b6) = (ula(1), ula(2));

    let mut ihl4 = ipv4(A, B, 6, 64, &tcp(1, 2, TCP_ACK, &[]));
    ihl4[0] = 0x44;
    let mut ihl15 = ipv4(A, B, 6, 64, &tcp(1, 2, TCP_ACK, &[]));
    ihl15[0] = 0x4f;
    let mut short_total = ipv4(A, B, 6, 64, &tcp(1, 2, TCP_ACK, &[]));
    short_total[2..4].copy_from_slice(&12u16.to_be_bytes());
    let mut doff3 = tcp(1, 2, TCP_ACK, &[]);
    doff3[12] = 0x30;
    let mut doff15 = tcp(1, 2, TCP_ACK, &[]);
    doff15[12] = 0xf0;
    // hop-by-hop header claiming 2 KiB of options in a tiny packet
    let hbh_overrun = [17u8, 255, 0, 0, 0, 0, 0, 0];
    // seven chained destination-options headers: longer than the walk allows
    let mut long_chain = Vec::new();
    for i in 0..7 {
        long_chain.extend_from_slice(&[if i == 6 { 17 } else { 60 }, 0, 0, 0, 0, 0, 0, 0]);
    }
    long_chain.extend_from_slice(&udp(1, 2, &[]));
    // truncated inside the fragment header
    let frag_cut = [17u8, 0, 0];

    // BPF_PROG_TEST_RUN itself rejects an untagged IPv4/IPv6 frame shorter
    // than its IP header (EINVAL), so cut IP headers ride behind a VLAN tag:
    // the kernel then passes them and the same parser path sees them.
    let vlan = [(ETH_P_8021Q, 7)];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "zero-length IPv4 packet",
            eth(ETH_P_IP, &vlan, &[]),
            "ipv4_truncated",
        ),
        (
            "IPv4 header cut at 10 bytes",
            eth(ETH_P_IP, &vlan, &ipv4(A, B, 6, 64, &[])[..10]),
            "ipv4_truncated",
        ),
        ("IPv4 IHL 4", eth(ETH_P_IP, &[], &ihl4), "ipv4_bad_ihl"),
        (
            "IPv4 IHL 15 beyond the packet",
            eth(ETH_P_IP, &[], &ihl15),
            "ipv4_truncated",
        ),
        (
            "IPv4 total length < header",
            eth(ETH_P_IP, &[], &short_total),
            "ipv4_bad_total_length",
        ),
        (
            "IPv6 header cut at 20 bytes",
            eth(ETH_P_IPV6, &vlan, &ipv6(a6, b6, 17, 64, &[])[..20]),
            "ipv6_truncated",
        ),
        (
            "zero-length IPv6 packet",
            eth(ETH_P_IPV6, &vlan, &[]),
            "ipv6_truncated",
        ),
        (
            "IPv6 hop-by-hop overrunning the packet",
            v6_frame(a6, b6, 0, 64, &hbh_overrun),
            "ipv6_bad_extension_chain",
        ),
        (
            "IPv6 extension chain too long",
            v6_frame(a6, b6, 60, 64, &long_chain),
            "ipv6_bad_extension_chain",
        ),
        (
            "IPv6 fragment header cut short",
            v6_frame(a6, b6, 44, 64, &frag_cut),
            "ipv6_bad_extension_chain",
        ),
        (
            "TCP header cut at 10 bytes",
            v4_frame(A, B, 6, 64, &tcp(1, 2, 0, &[])[..10]),
            "tcp_truncated",
        ),
        (
            "TCP data offset 3",
            v4_frame(A, B, 6, 64, &doff3),
            "tcp_bad_data_offset",
        ),
        (
            "TCP data offset beyond the packet",
            v4_frame(A, B, 6, 64, &doff15),
            "tcp_bad_data_offset",
        ),
        (
            "UDP header cut at 4 bytes",
            v4_frame(A, B, 17, 64, &udp(1, 2, &[])[..4]),
            "udp_truncated",
        ),
        (
            "ICMP header cut at 2 bytes",
            v4_frame(A, B, 1, 64, &[8, 0]),
            "icmp_truncated",
        ),
        (
            "ICMP echo without identifier",
            v4_frame(A, B, 1, 64, &[8, 0, 0, 0, 0]),
            "icmp_truncated",
        ),
        (
            "ICMPv6 echo without identifier",
            v6_frame(a6, b6, 58, 64, &[128, 0, 0, 0]),
            "icmp_truncated",
        ),
        (
            "VLAN tag cut short",
            eth(ETH_P_8021Q, &[], &[0]),
            "vlan_truncated",
        ),
        (
            "three VLAN tags",
            eth(
                ETH_P_IP,
                &[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)],
                &ipv4(A, B, 17, 64, &udp(1, 2, &[])),
            ),
            "vlan_truncated",
        ),
        (
            "ARP is not IP",
            eth(ETH_P_ARP, &[], &[0u8; 28]),
            "non_ip_skipped",
        ),
    ];
    assert!(cases.len() >= 10);

    for (what, frame, counter) in cases {
        let flows_before = h.flows();
        let tcp_before = h.tcp();
        let counters_before = h.counters();
        assert_eq!(
            h.run(Hook::Ingress, &frame),
            TC_ACT_UNSPEC,
            "{what}: verdict"
        );
        let after = h.counters();
        for ((name, before), (_, now)) in counters_before.iter().zip(after.iter()) {
            let expect = before + u64::from(name == counter);
            assert_eq!(*now, expect, "{what}: counter {name}");
        }
        let flows_after = h.flows();
        assert_eq!(flows_after.len(), flows_before.len(), "{what}: flow count");
        for ((k0, v0), (k1, v1)) in flows_before.iter().zip(flows_after.iter()) {
            assert_eq!(common::bytes_of(k0), common::bytes_of(k1), "{what}: key");
            assert_eq!(
                common::bytes_of(v0),
                common::bytes_of(v1),
                "{what}: base value"
            );
        }
        let tcp_after = h.tcp();
        assert_eq!(tcp_after.len(), tcp_before.len(), "{what}: tcp entries");
        assert!(h.icmp().is_empty(), "{what}: icmp entries");
    }
}

#[test]
fn full_base_map_keeps_answered_flows_in_probation_flagged_lossy() {
    let h = Harness::with_admission(
        Capacities {
            flows: 4,
            tcp: 4,
            icmp: 4,
            owner: 4,
        },
        Admission::Always,
    );
    for port in 0..6u16 {
        h.run(
            Hook::Ingress,
            &v4_frame(A, B, 6, 64, &tcp(1000 + port, 80, TCP_SYN, &[])),
        );
        h.run(
            Hook::Ingress,
            &v4_frame(A, B, 6, 64, &tcp(1000 + port, 80, TCP_ACK, &[])),
        );
    }
    assert_eq!(h.base_flows().len(), 4);
    let waiting = h.probation();
    assert_eq!(waiting.len(), 2, "answered, no room: still in probation");
    for (_, b) in &waiting {
        assert_eq!(b.packets[LO_TO_HI], 2, "no packet lost while it waits");
        assert_ne!(b.meta & meta::LOSSY, 0, "flagged: LRU may evict it");
    }
    for (_, b) in h.base_flows() {
        assert_eq!(b.meta & meta::LOSSY, 0);
    }
    assert!(h.tcp().is_empty(), "no sample: no extension");
    assert_eq!(h.counter("admission_deferred_base_full"), 2);
    assert_eq!(h.counter("base_map_full"), 0, "nothing lost");
    assert_eq!(h.counter("packets_accounted"), 12);
    assert_eq!(h.counter("probation_new_tcp"), 6);
    assert_eq!(h.counter("probation_admitted_tcp"), 4);
}

/// Under pressure, one-packet flows wait in probation; the packet that answers one (for
/// TCP the handshake's final ACK, for anything else its second packet) moves it to the
/// base map with everything it had, samples included.
#[test]
fn unanswered_flows_wait_in_probation_until_answered() {
    let h = Harness::with_admission(Capacities::default(), Admission::Always);
    h.run(
        Hook::Egress,
        &v4_frame(A, B, 6, 64, &tcp(50000, 80, TCP_SYN, &[])),
    );
    h.run(
        Hook::Ingress,
        &v4_frame(B, A, 6, 63, &tcp(80, 50000, TCP_SYN | TCP_ACK, &[])),
    );
    // A random-source SYN answered by RST never leaves probation either.
    h.run(
        Hook::Ingress,
        &v4_frame([10, 200, 9, 9], B, 6, 64, &tcp(7, 80, TCP_SYN, &[])),
    );
    h.run(
        Hook::Egress,
        &v4_frame(
            B,
            [10, 200, 9, 9],
            6,
            64,
            &tcp(80, 7, TCP_RST | TCP_ACK, &[]),
        ),
    );
    h.run(Hook::Egress, &v4_frame(A, B, 17, 64, &udp(5000, 53, b"q")));
    h.run(Hook::Egress, &v4_frame(A, B, 1, 64, &echo(8, 9, 1, &[])));
    assert!(h.base_flows().is_empty(), "{:?}", h.base_flows());
    assert_eq!(h.probation().len(), 4);
    assert_eq!(h.counter("packets_accounted"), 6);

    h.run(
        Hook::Egress,
        &v4_frame(A, B, 6, 64, &tcp(50000, 80, TCP_ACK, &[])),
    );
    h.run(
        Hook::Ingress,
        &v4_frame(B, A, 17, 64, &udp(53, 5000, b"rr")),
    );
    h.run(Hook::Ingress, &v4_frame(B, A, 1, 64, &echo(0, 9, 1, &[])));
    assert_eq!(h.probation().len(), 1, "the reset probe stays");
    assert_eq!(h.base_flows().len(), 3);
    let base = h.joined();
    let find = |proto: u8| {
        *base
            .iter()
            .find(|f| f.key.proto == proto && f.key.port_lo != 7)
            .expect("flow")
    };
    let t = find(6);
    assert_eq!(t.base.packets, [2, 1]);
    assert_eq!(t.base.bytes, [80, 40]);
    assert_ne!(t.base.ext_id, 0, "an extension id once admitted");
    let hot = t.tcp_hot().expect("TCP state");
    assert_eq!(u32::from(hot.state), types::tcp_state::TCP_ST_ESTABLISHED.0);
    let hs = (types::tcp_bits::TCPB_CLIENT_HS.0 | types::tcp_bits::TCPB_SERVER_HS.0) as u8;
    assert_eq!(hot.bits & hs, hs, "both handshake times, across the move");
    assert_eq!(client_dir(&t.base), LO_TO_HI);
    let u = find(17);
    assert_eq!(u.base.packets[LO_TO_HI] + u.base.packets[HI_TO_LO], 2);
    assert_eq!(client_dir(&u.base), LO_TO_HI);
    let i = find(1);
    assert_eq!(i.icmp.expect("the reply's RTT sample").rtt_count, 1);
    assert_eq!(h.counter("probation_new_tcp"), 2);
    assert_eq!(h.counter("probation_admitted_tcp"), 1);
    assert_eq!(h.counter("probation_admitted_udp"), 1);
    assert_eq!(h.counter("probation_admitted_icmp"), 1);
    assert_eq!(h.counter("packets_accounted"), 9);
}

#[test]
fn full_extension_map_costs_samples_never_flows() {
    let h = Harness::with(Capacities {
        flows: 16,
        tcp: 2,
        icmp: 1,
        owner: 16,
    });
    // Four request/response exchanges: each wants a latency sample.
    for port in 0..4u16 {
        h.run(
            Hook::Egress,
            &v4_frame(A, B, 6, 64, &tcp(1000 + port, 80, TCP_ACK, b"req")),
        );
        h.run(
            Hook::Ingress,
            &v4_frame(B, A, 6, 64, &tcp(80, 1000 + port, TCP_ACK, b"resp")),
        );
    }
    // Two answered pings: each wants an RTT sample.
    for id in 1..=2 {
        h.run(Hook::Egress, &v4_frame(A, B, 1, 64, &echo(8, id, 1, &[])));
        h.run(Hook::Ingress, &v4_frame(B, A, 1, 64, &echo(0, id, 1, &[])));
    }
    h.run(Hook::Ingress, &v4_frame(A, B, 17, 64, &udp(1, 2, &[])));
    assert_eq!(h.tcp().len(), 2);
    assert_eq!(h.icmp().len(), 1);
    assert_eq!(h.counter("tcp_map_full"), 2);
    assert_eq!(h.counter("icmp_map_full"), 1);
    assert_eq!(
        h.counter("packets_accounted"),
        8 + 4 + 1,
        "every packet counted"
    );
    // Every flow is there with its counts; every extension belongs to one base of its kind.
    let flows = h.joined();
    assert_eq!(flows.len(), 4 + 2 + 1);
    assert!(flows
        .iter()
        .all(|f| f.base.packets == [1, 1] || f.key.proto == 17));
    let joined = flows.iter().filter(|f| f.tcp.is_some()).count()
        + flows.iter().filter(|f| f.icmp.is_some()).count();
    assert_eq!(joined, 3, "no extension without its base");
    let mut ids: Vec<u64> = flows.iter().map(|f| f.base.ext_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 7, "ids are unique; UDP has 0: {ids:?}");
    assert!(flows
        .iter()
        .all(|f| (f.base.ext_id == 0) == (f.key.proto == 17)));
}

#[test]
fn keys_are_zero_padded() {
    let h = Harness::new();
    h.run(Hook::Ingress, &v4_frame(A, B, 17, 64, &udp(1, 2, &[])));
    let (k, _) = h.only_flow();
    assert_eq!((k.flags, k.__pad), (0, 0));
    assert_eq!(&k.addr_lo[..10], &[0u8; 10]);
}

/// Runs `frame` through the program behind `fd` `repeat` times on this thread's CPU.
fn run_on_this_cpu(fd: &std::os::fd::OwnedFd, frame: &[u8], repeat: i32) {
    use std::os::fd::AsRawFd;
    let mut opts = libbpf_sys::bpf_test_run_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _,
        data_in: frame.as_ptr().cast(),
        data_size_in: frame.len() as u32,
        repeat,
        ..Default::default()
    };
    // SAFETY: opts points at `frame`, which outlives the call.
    let r = unsafe { libbpf_sys::bpf_prog_test_run_opts(fd.as_raw_fd(), &mut opts) };
    assert_eq!(r, 0, "test run: {}", std::io::Error::last_os_error());
}

#[test]
fn concurrent_updates_of_one_flow_lose_no_increment() {
    let h = Harness::new();
    let frame = v4_frame(
        A,
        B,
        6,
        64,
        &tcp(40_000, 443, TCP_ACK | TCP_PSH, &[0u8; 60]),
    );
    h.run(Hook::Ingress, &frame);
    const PER_THREAD: i32 = 200_000;
    // Both CPUs hammer the same flow at once, each from its own thread.
    let fds = flowlens::kernel::attach::ProgramFds::of(&h.dp).expect("fds");
    let threads: Vec<_> = [fds.ingress, fds.egress]
        .into_iter()
        .map(|fd| {
            let frame = frame.clone();
            std::thread::spawn(move || run_on_this_cpu(&fd, &frame, PER_THREAD))
        })
        .collect();
    for t in threads {
        t.join().expect("runner");
    }
    let (_, b) = h.only_flow();
    let want = 1 + 2 * PER_THREAD as u64;
    assert_eq!(b.packets[LO_TO_HI], want, "packets");
    assert_eq!(b.bytes[LO_TO_HI], want * 100, "bytes");
    assert_eq!(h.counter("packets_accounted"), want);
}

/// A random-source SYN flood through the smallest probation (16,384 flows): 5,000 flood
/// flows between each legitimate packet (7 ms at the 740 k new flows/s) evict
/// flood flows, never a legitimate handshake in progress, and the flood never reaches the
/// base map.
#[test]
fn a_flood_churns_probation_and_answered_flows_get_through() {
    // the flood past the gate: every new flow through probation
    let h = Harness::with_admission(
        Capacities {
            flows: 4_096,
            tcp: 2_048,
            icmp: 1_024,
            owner: 2_048,
        },
        Admission::Always,
    );
    let mut n = 0u32;
    let mut flood = |count: u32| {
        for _ in 0..count {
            n += 1;
            let src = [
                11 + (n >> 24) as u8,
                (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8,
            ];
            h.run(
                Hook::Ingress,
                &v4_frame(
                    src,
                    B,
                    6,
                    64,
                    &tcp(1024 + (n % 60_000) as u16, 80, TCP_SYN, &[]),
                ),
            );
        }
    };
    const LEGIT: u16 = 40;
    for i in 0..LEGIT {
        let port = 30_000 + i;
        h.run(
            Hook::Ingress,
            &v4_frame(A, B, 6, 64, &tcp(port, 443, TCP_SYN, &[])),
        );
        flood(5_000);
        h.run(
            Hook::Egress,
            &v4_frame(B, A, 6, 64, &tcp(443, port, TCP_SYN | TCP_ACK, &[])),
        );
        flood(5_000);
        h.run(
            Hook::Ingress,
            &v4_frame(A, B, 6, 64, &tcp(port, 443, TCP_ACK, &[])),
        );
    }
    let base = h.base_flows();
    assert_eq!(base.len(), usize::from(LEGIT), "only the answered flows");
    for (k, b) in &base {
        assert_eq!(k.port_hi, 443);
        assert_eq!(b.packets, [2, 1], "{k:?}");
    }
    let entered = h.counter("probation_new_tcp");
    assert_eq!(entered, u64::from(LEGIT) * 10_001);
    assert_eq!(h.counter("probation_admitted_tcp"), u64::from(LEGIT));
    assert!(h.probation().len() <= 16_384);
    assert_eq!(h.counter("base_map_full"), 0);
}

/// Both CPUs send the first packets of the same fresh flows at once, under pressure: the
/// flow is made in probation by one, moved to the base map by a second packet, while the
/// other CPU adds to it: every packet lands exactly once, in the base map, and nothing
/// stays behind.
#[test]
fn the_move_from_probation_loses_no_packet_under_two_cpus() {
    let h = Harness::with_admission(Capacities::default(), Admission::Always);
    let admitted = first_packets_on_two_cpus(&h);
    assert!(admitted >= u64::from(TWO_CPU_FLOWS));
}

/// The same below the gate: both CPUs make the same flows straight in the base map at
/// once, one insert wins and the other CPU's packet is accounted in its entry.
#[test]
fn first_packets_straight_in_lose_none_under_two_cpus() {
    let h = Harness::new();
    assert_eq!(first_packets_on_two_cpus(&h), 0, "room: no probation");
}

const TWO_CPU_FLOWS: u16 = 1500;

/// Runs the first packets of fresh flows on both CPUs at once (UDP: any second packet
/// admits; TCP: one CPU sends SYNs, which never admit, the other ACKs, which do) and
/// checks every packet landed once in the base map; returns the flows probation admitted.
fn first_packets_on_two_cpus(h: &Harness) -> u64 {
    const FLOWS: u16 = TWO_CPU_FLOWS;
    const REPEAT: i32 = 40;
    let fds = flowlens::kernel::attach::ProgramFds::of(&h.dp).expect("fds");
    // UDP: any second packet admits. TCP: one CPU sends SYNs (never admit), the other
    // ACKs (admit), so the move races adds to the image.
    let frames = |cpu: usize| -> Vec<Vec<u8>> {
        (0..FLOWS)
            .map(|i| {
                if i % 2 == 0 {
                    v4_frame(A, B, 17, 64, &udp(10_000 + i, 53, &[0u8; 20]))
                } else {
                    let f = if cpu == 0 { TCP_SYN } else { TCP_ACK };
                    v4_frame(A, B, 6, 64, &tcp(10_000 + i, 80, f, &[]))
                }
            })
            .collect()
    };
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = [fds.ingress, fds.egress]
        .into_iter()
        .enumerate()
        .map(|(cpu, fd)| {
            let frames = frames(cpu);
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is valid; the calls only read it.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu % 2, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                for f in &frames {
                    barrier.wait();
                    run_on_this_cpu(&fd, f, REPEAT);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("runner");
    }
    assert!(h.probation().is_empty(), "{:?}", h.probation().first());
    let flows = h.base_flows();
    assert_eq!(flows.len(), usize::from(FLOWS));
    for (k, b) in &flows {
        let want = 2 * REPEAT as u64;
        let len = if k.proto == 17 { 48 } else { 40 };
        assert_eq!(b.packets, [want, 0], "{k:?}");
        assert_eq!(b.bytes, [want * len, 0], "{k:?}");
    }
    assert_eq!(
        h.counter("packets_accounted"),
        u64::from(FLOWS) * 2 * REPEAT as u64
    );
    // A flow made twice (a CPU's insert racing the other's move) is admitted twice.
    let admitted = h.counter("probation_admitted_udp") + h.counter("probation_admitted_tcp");
    let entered = h.counter("probation_new_udp") + h.counter("probation_new_tcp");
    assert_eq!(admitted, entered, "none evicted");
    assert_eq!(h.counter("base_map_full"), 0);
    admitted
}

/// Admission holds only under pressure: below the gate (half the base map) a new flow's
/// first packet goes straight into the base map; past it new flows wait in probation and
/// move in once answered; when the scan has counted the map emptier, new flows go straight
/// in again.
#[test]
fn new_flows_go_straight_in_below_the_gate_and_through_probation_past_it() {
    use flowlens::poller::decode::monotonic_ns;
    use flowlens::poller::scan::args;
    use flowlens::poller::table::collect_scan;
    use flowlens::poller::{KernelTable, PollerConfig};
    let cap = Capacities {
        flows: 16,
        tcp: 16,
        icmp: 16,
        owner: 16,
    };
    assert_eq!(cap.admission_room(), 8);
    let h = Harness::with(cap);
    let req = |port: u16| v4_frame(A, B, 17, 64, &udp(port, 53, b"q"));
    let resp = |port: u16| v4_frame(B, A, 17, 64, &udp(53, port, b"rr"));
    let syn = v4_frame(A, B, 6, 64, &tcp(7000, 80, TCP_SYN, &[]));
    for port in 1..=8 {
        h.run(Hook::Egress, &req(port));
    }
    assert_eq!(h.base_flows().len(), 8, "room: straight in");
    assert!(h.probation().is_empty());
    for port in 9..=12 {
        h.run(Hook::Egress, &req(port));
    }
    h.run(Hook::Egress, &syn);
    assert_eq!(h.base_flows().len(), 8);
    assert_eq!(h.probation().len(), 5, "past the gate: probation");
    for port in 9..=12 {
        h.run(Hook::Ingress, &resp(port));
    }
    h.run(
        Hook::Ingress,
        &v4_frame(B, A, 6, 64, &tcp(80, 7000, TCP_SYN | TCP_ACK, &[])),
    );
    assert_eq!(h.probation().len(), 1, "a SYN-ACK does not admit");
    h.run(
        Hook::Egress,
        &v4_frame(A, B, 6, 64, &tcp(7000, 80, TCP_ACK, &[])),
    );
    assert!(h.probation().is_empty(), "answered: moved in");
    let base = h.base_flows();
    assert_eq!(base.len(), 13);
    for (k, b) in &base {
        let want = match (k.proto, k.port_lo) {
            (6, _) => [2, 1],
            (_, 9..=12) => [1, 1],
            _ => [1, 0],
        };
        assert_eq!(b.packets, want, "{k:?}");
    }
    assert_eq!(h.counter("probation_new_udp"), 4);
    assert_eq!(h.counter("probation_admitted_udp"), 4);
    assert_eq!(h.counter("probation_new_tcp"), 1);
    assert_eq!(h.counter("probation_admitted_tcp"), 1);
    assert_eq!(h.counter("packets_accounted"), 8 + 5 + 4 + 2);
    assert_eq!(h.counter("base_map_full"), 0);
    // A handshake that starts past the gate and is still waiting when the gate opens
    // again: its answer finds it in probation and moves it, identity and all.
    let syn2 = v4_frame(A, B, 6, 64, &tcp(7001, 80, TCP_SYN, &[]));
    h.run(Hook::Egress, &syn2);
    assert_eq!(h.probation().len(), 1);
    // The scan ends the idle UDP flows and counts the map again: the gate opens.
    let mut table = KernelTable::new(h.dp.maps().expect("maps"));
    let cfg = PollerConfig {
        idle_udp: std::time::Duration::from_secs(1),
        idle_tcp: std::time::Duration::from_secs(3600),
        ..PollerConfig::default()
    };
    let later = monotonic_ns() + 2_000_000_000;
    let (ended, _) = collect_scan(&mut table, &args(&cfg, later, later, false), 1).expect("scan");
    assert_eq!(ended.len(), 12, "the UDP flows");
    assert_eq!(h.probation().len(), 1, "the SYN still waits");
    h.run(
        Hook::Ingress,
        &v4_frame(B, A, 6, 64, &tcp(80, 7001, TCP_SYN | TCP_ACK, &[])),
    );
    h.run(Hook::Egress, &req(30));
    assert_eq!(h.probation().len(), 1, "a SYN-ACK does not admit");
    assert_eq!(h.base_flows().len(), 2, "room: a new flow goes straight in");
    h.run(
        Hook::Egress,
        &v4_frame(A, B, 6, 64, &tcp(7001, 80, TCP_ACK, &[])),
    );
    assert!(h.probation().is_empty(), "moved, not made twice");
    let moved = h
        .joined()
        .into_iter()
        .find(|f| f.key.port_lo == 7001)
        .expect("the handshake");
    assert_eq!(moved.base.packets, [2, 1]);
    assert_eq!(client_dir(&moved.base), LO_TO_HI);
    let hs = (types::tcp_bits::TCPB_CLIENT_HS.0 | types::tcp_bits::TCPB_SERVER_HS.0) as u8;
    assert_eq!(moved.tcp_hot().expect("TCP state").bits & hs, hs);
    // A flush ends everything: the count is zero again.
    let ended = common::flush_scan(&mut table);
    assert_eq!(ended.len(), 3);
    for port in 20..=27 {
        h.run(Hook::Egress, &req(port));
    }
    assert_eq!(h.base_flows().len(), 8, "straight in again");
    assert!(h.probation().is_empty());
    h.run(Hook::Egress, &req(28));
    assert_eq!(
        h.probation().len(),
        1,
        "and the gate closes at the same fill"
    );
}

#[test]
fn ipv4_options_are_skipped_by_ihl() {
    let h = Harness::new();
    // IHL 7: 8 bytes of options (NOPs) between the header and UDP.
    let l4 = udp(5353, 53, &[0u8; 10]);
    let mut ip = ipv4(A, B, 17, 64, &[[1u8; 8].as_slice(), &l4].concat());
    ip[0] = 0x47;
    h.run(Hook::Ingress, &eth(ETH_P_IP, &[], &ip));
    let (k, b) = h.only_flow();
    assert_eq!((k.port_lo, k.port_hi), (5353, 53));
    assert_eq!(b.bytes[LO_TO_HI], 20 + 8 + 8 + 10);
}

/// Issue 13 edges: each test here failed before its fix.
mod edges {
    use super::*;

    /// An IPv6 Fragment header (8 bytes) naming `next`, at `offset` 8-byte units, More set.
    fn frag6(next: u8, offset: u16, rest: &[u8]) -> Vec<u8> {
        let off = (offset << 3) | 1;
        let mut p = vec![next, 0];
        p.extend_from_slice(&off.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x12, 0x34]);
        p.extend_from_slice(rest);
        p
    }

    /// Key byte 42: flow_key's flag byte (the first byte after ip_version).
    fn key_flags(k: &types::flow_key) -> u8 {
        common::bytes_of(k)[42]
    }

    #[test]
    fn ipv6_non_first_fragments_stop_at_the_fragment_header() {
        let h = Harness::new();
        let (a, b) = (ula(1), ula(2));
        // Fragment header -> Destination Options; the fragment's payload starts with 0x06,
        // which a walk past the Fragment header reads as "next: TCP".
        let mut payload = vec![6u8, 0, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(&[0u8; 40]);
        h.run(
            Hook::Ingress,
            &v6_frame(a, b, 44, 64, &frag6(60, 100, &payload)),
        );
        // Fragment header -> AH, payload whose "length" byte overruns the packet.
        h.run(
            Hook::Ingress,
            &v6_frame(a, b, 44, 64, &frag6(51, 200, &[17, 255, 0, 0, 0, 0, 0, 0])),
        );
        let flows = h.flows();
        assert_eq!(flows.len(), 2, "{flows:?}");
        for (k, base) in &flows {
            assert!(
                matches!(k.proto, 60 | 51),
                "proto {} read from payload",
                k.proto
            );
            assert_eq!((k.port_lo, k.port_hi), (0, 0));
            assert_eq!(key_flags(k), 1, "a fragment flow");
            assert_eq!(base.packets[LO_TO_HI], 1);
        }
        let dst = flows.iter().find(|(k, _)| k.proto == 60).expect("dstopts");
        assert_eq!(dst.1.bytes[LO_TO_HI], 40 + 8 + 48);
        assert_eq!(h.counter("ipv6_bad_extension_chain"), 0);
        assert_eq!(h.counter("ip_fragments_non_first"), 2);
        assert_eq!(h.counter("packets_accounted"), 2);
    }

    #[test]
    fn ipv6_first_fragment_is_still_walked_to_its_transport_header() {
        let h = Harness::new();
        let (a, b) = (ula(1), ula(2));
        h.run(
            Hook::Ingress,
            &v6_frame(a, b, 44, 64, &frag6(17, 0, &udp(5000, 53, &[0u8; 8]))),
        );
        let (k, _) = h.only_flow();
        assert_eq!((k.proto, k.port_lo, k.port_hi), (17, 5000, 53));
        assert_eq!(key_flags(&k), 0);
    }

    /// A non-first IPv4 fragment of `proto` from `src` to `dst`.
    fn frag4(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> Vec<u8> {
        let mut ip = ipv4(src, dst, proto, 64, &vec![0u8; len]);
        ip[6..8].copy_from_slice(&185u16.to_be_bytes());
        eth(ETH_P_IP, &[], &ip)
    }

    #[test]
    fn ipv4_icmp_non_first_fragments_keep_their_sender_as_client() {
        let h = Harness::new();
        // B (hi) sends the fragment: it is the initiator of the fragment flow.
        h.run(Hook::Egress, &frag4(B, A, 1, 100));
        let (k, b) = h.only_flow();
        assert_eq!(k.proto, 1);
        assert_eq!(client_dir(&b), HI_TO_LO, "the sender, not its peer");
        let h = Harness::new();
        h.run(Hook::Egress, &frag4(A, B, 1, 100));
        let (_, b) = h.only_flow();
        assert_eq!(client_dir(&b), LO_TO_HI);
    }

    #[test]
    fn echo_identifier_zero_and_fragments_have_separate_keys() {
        let h = Harness::new();
        for seq in 0..5 {
            h.run(
                Hook::Egress,
                &v4_frame(A, B, 1, 64, &echo(8, 0, seq, &[0u8; 56])),
            );
            h.run(
                Hook::Ingress,
                &v4_frame(B, A, 1, 64, &echo(0, 0, seq, &[0u8; 56])),
            );
        }
        // The tail of a `ping -s 3000` reply from B, and one from A.
        h.run(Hook::Ingress, &frag4(B, A, 1, 1500));
        h.run(Hook::Egress, &frag4(A, B, 1, 1500));
        let flows = h.flows();
        assert_eq!(flows.len(), 2, "{flows:?}");
        let echo = flows.iter().find(|(k, _)| key_flags(k) == 0).expect("echo");
        let frag = flows
            .iter()
            .find(|(k, _)| key_flags(k) == 1)
            .expect("fragments");
        assert_eq!(echo.1.packets, [5, 5]);
        assert_eq!(client_dir(&echo.1), LO_TO_HI, "A sent the requests");
        assert_eq!(frag.1.packets, [1, 1]);
        assert_eq!(ext_kind(&frag.1), 0, "no ICMP extension for fragments");
        assert_eq!(h.icmp().len(), 1);
    }

    #[test]
    fn udp_port_zero_and_udp_fragments_have_separate_keys() {
        let h = Harness::new();
        h.run(Hook::Egress, &v4_frame(A, B, 17, 64, &udp(0, 0, &[0u8; 8])));
        h.run(Hook::Egress, &frag4(A, B, 17, 100));
        assert_eq!(h.flows().len(), 2);
    }

    #[test]
    fn gso_packets_count_every_segment_in_the_counters() {
        let h = Harness::new();
        let g = v4_frame(A, B, 6, 64, &tcp(1000, 2000, TCP_ACK, &[0u8; 3000]));
        h.run_gso(Hook::Egress, &g, 3);
        h.run_gso(Hook::Egress, &g, 2);
        let (_, b) = h.only_flow();
        assert_eq!(b.packets[LO_TO_HI], 5);
        assert_eq!(h.counter("packets_accounted"), 5, "agrees with the flow");
        // A GSO packet the datapath cannot account costs all its segments.
        let mut doff15 = tcp(1000, 2000, TCP_ACK, &[0u8; 3000]);
        doff15[12] = 0xf0;
        doff15.truncate(40);
        h.run_gso(Hook::Egress, &v4_frame(A, B, 6, 64, &doff15), 4);
        assert_eq!(h.counter("tcp_bad_data_offset"), 4);
    }

    #[test]
    fn gso_packets_of_a_flow_the_full_map_keeps_waiting_count_every_segment() {
        let h = Harness::with(Capacities {
            flows: 1,
            tcp: 4,
            icmp: 4,
            owner: 1,
        });
        h.run(Hook::Egress, &v4_frame(A, B, 17, 64, &udp(1, 2, &[])));
        h.run(Hook::Egress, &v4_frame(A, B, 17, 64, &udp(1, 2, &[])));
        let g = v4_frame(A, B, 6, 64, &tcp(1000, 2000, TCP_ACK, &[0u8; 3000]));
        h.run_gso(Hook::Egress, &g, 3);
        h.run_gso(Hook::Egress, &g, 3);
        assert_eq!(h.counter("admission_deferred_base_full"), 3);
        assert_eq!(h.counter("packets_accounted"), 8);
        let (_, b) = h.probation()[0];
        assert_eq!(b.packets[LO_TO_HI], 6, "kept in probation, every segment");
    }

    #[test]
    fn ipv4_frames_with_another_version_are_counted_not_accounted() {
        let h = Harness::new();
        for version in [0x65u8, 0x05, 0xf5] {
            let mut ip = ipv4(A, B, 17, 64, &udp(1, 2, &[0u8; 20]));
            ip[0] = version;
            h.run(Hook::Ingress, &eth(ETH_P_IP, &[], &ip));
        }
        // An IPv6 EtherType carrying an IPv4 header.
        let ip = ipv4(A, B, 17, 64, &udp(1, 2, &[0u8; 40]));
        h.run(Hook::Ingress, &eth(ETH_P_IPV6, &[], &ip));
        assert!(h.flows().is_empty(), "{:?}", h.flows());
        assert_eq!(h.counter("ip_bad_version"), 4);
        assert_eq!(h.counter("packets_accounted"), 0);
    }
}

/// Issue 29: `--max-flows 200000` alone (the extension capacities it implies, as the CLI
/// derives them) holds 100 k realistic flows at 40/50/10 TCP/UDP/ICMP, and every TCP flow
/// has its handshake and latency sample, every ICMP flow its RTT sample: none is lost.
#[test]
fn max_flows_alone_keeps_every_sample_of_100k_realistic_flows() {
    const N: u32 = 100_000;
    let cap = Capacities::for_flows(200_000);
    let h = Harness::with(cap);
    let server4 = [10, 200, 0, 2];
    let server6 = ula(2);
    // (client, server) frames for flow i: v4 for even i, v6 for odd.
    let frame = |i: u32, to_server: bool, proto: u8, l4: &[u8]| {
        let n = (i / 60_000) as u8 + 1;
        if i.is_multiple_of(2) {
            let c = [10, 200, n, 1];
            if to_server {
                v4_frame(c, server4, proto, 64, l4)
            } else {
                v4_frame(server4, c, proto, 64, l4)
            }
        } else {
            let c = ula(0x100 + u16::from(n));
            if to_server {
                v6_frame(c, server6, proto, 64, l4)
            } else {
                v6_frame(server6, c, proto, 64, l4)
            }
        }
    };
    let (mut tcp_flows, mut icmp_flows) = (0u64, 0u64);
    for i in 0..N {
        let port = 1024 + (i % 60_000) as u16;
        match i % 10 {
            0..=3 => {
                tcp_flows += 1;
                let req = [0u8; 100];
                let resp = [0u8; 300];
                for (to_server, flags, payload) in [
                    (true, TCP_SYN, &[][..]),
                    (false, TCP_SYN | TCP_ACK, &[][..]),
                    (true, TCP_ACK, &[][..]),
                    (true, TCP_ACK | TCP_PSH, &req[..]),
                    (false, TCP_ACK | TCP_PSH, &resp[..]),
                ] {
                    let l4 = if to_server {
                        tcp(port, 443, flags, payload)
                    } else {
                        tcp(443, port, flags, payload)
                    };
                    let hook = if to_server {
                        Hook::Egress
                    } else {
                        Hook::Ingress
                    };
                    h.run(hook, &frame(i, to_server, 6, &l4));
                }
            }
            4..=8 => {
                h.run(
                    Hook::Egress,
                    &frame(i, true, 17, &udp(port, 53, &[0u8; 40])),
                );
                h.run(
                    Hook::Ingress,
                    &frame(i, false, 17, &udp(53, port, &[0u8; 120])),
                );
            }
            _ => {
                icmp_flows += 1;
                let (req, reply, proto) = if i.is_multiple_of(2) {
                    (8, 0, 1)
                } else {
                    (128, 129, 58)
                };
                h.run(
                    Hook::Egress,
                    &frame(i, true, proto, &echo(req, port, 1, &[0u8; 56])),
                );
                h.run(
                    Hook::Ingress,
                    &frame(i, false, proto, &echo(reply, port, 1, &[0u8; 56])),
                );
            }
        }
    }
    assert_eq!(h.counter("base_map_full"), 0);
    assert_eq!(h.counter("tcp_map_full"), 0, "TCP latency samples lost");
    assert_eq!(h.counter("icmp_map_full"), 0, "ICMP RTT samples lost");

    let tcp: std::collections::HashMap<u64, types::flow_tcp> = h.tcp().into_iter().collect();
    let icmp: std::collections::HashMap<u64, types::flow_icmp> = h.icmp().into_iter().collect();
    let flows = h.flows();
    assert_eq!(flows.len(), N as usize);
    let (mut tcp_ok, mut icmp_ok) = (0u64, 0u64);
    let hs = (types::tcp_bits::TCPB_CLIENT_HS.0 | types::tcp_bits::TCPB_SERVER_HS.0) as u8;
    for (k, b) in &flows {
        match k.proto {
            6 => {
                // SAFETY: a TCP flow's l4 union holds its tcp_hot.
                let bits = unsafe { b.l4.tcp.bits };
                assert_eq!(bits & hs, hs, "{k:?}: handshake timings");
                let t = tcp
                    .get(&b.ext_id)
                    .unwrap_or_else(|| panic!("{k:?}: no latency"));
                assert_eq!(t.lat[0].count + t.lat[1].count, 1, "{k:?}: one sample");
                tcp_ok += 1;
            }
            1 | 58 => {
                let c = icmp
                    .get(&b.ext_id)
                    .unwrap_or_else(|| panic!("{k:?}: no RTT"));
                assert_eq!(c.rtt_count, 1, "{k:?}: one RTT sample");
                icmp_ok += 1;
            }
            _ => {}
        }
    }
    assert_eq!((tcp_ok, icmp_ok), (tcp_flows, icmp_flows));
    assert_eq!(tcp.len() as u64, tcp_flows);
    assert_eq!(icmp.len() as u64, icmp_flows);
}

/// Request/response turns past the first take the lock-free path (tcp_turn in tcp.h):
/// every turn is one sample for the side that answered, and a FIN after them still
/// closes the flow under the lock.
#[test]
fn request_response_turns_each_give_one_sample_without_the_lock() {
    let h = Harness::new();
    let c = |flags, payload: &[u8]| v4_frame(A, B, 6, 64, &tcp(50001, 80, flags, payload));
    let s = |flags, payload: &[u8]| v4_frame(B, A, 6, 64, &tcp(80, 50001, flags, payload));
    h.run(Hook::Egress, &c(TCP_SYN, &[]));
    h.run(Hook::Ingress, &s(TCP_SYN | TCP_ACK, &[]));
    h.run(Hook::Egress, &c(TCP_ACK, &[]));
    // 10 payloads, alternating from the client: 9 turns, 5 answered by the server
    // (HI_TO_LO: B is hi), 4 by the client; all but the first two take the lock-free path.
    for i in 0..10u32 {
        if i.is_multiple_of(2) {
            h.run(Hook::Egress, &c(TCP_ACK | TCP_PSH, b"request"));
        } else {
            h.run(Hook::Ingress, &s(TCP_ACK | TCP_PSH, b"response"));
        }
    }
    // The client answers the last response (its 5th sample), then continues its own
    // payload: no turn.
    h.run(Hook::Egress, &c(TCP_ACK | TCP_PSH, b"next"));
    h.run(Hook::Egress, &c(TCP_ACK | TCP_PSH, b"more"));
    let f = h.only_joined();
    let t = f.tcp.expect("latency entry");
    assert_eq!(t.lat[HI_TO_LO].count, 5);
    assert_eq!(t.lat[LO_TO_HI].count, 5);
    for l in t.lat {
        assert!(l.min_ns <= l.max_ns && l.min_ns > 0, "{l:?}");
        assert!(
            l.sum_ns >= u64::from(l.min_ns) * u64::from(l.count),
            "{l:?}"
        );
        assert!(
            l.sum_ns <= u64::from(l.max_ns) * u64::from(l.count),
            "{l:?}"
        );
        assert!(l.prev_ns >= l.min_ns && l.prev_ns <= l.max_ns, "{l:?}");
    }
    assert_eq!(f.base.packets, [9, 6], "exact counts");
    let hot = f.tcp_hot().expect("TCP state");
    assert_eq!(
        hot.bits & types::tcp_bits::TCPB_LAST_DIR_HI.0 as u8,
        0,
        "the client spoke last"
    );
    h.run(Hook::Egress, &c(TCP_FIN | TCP_ACK, &[]));
    h.run(Hook::Ingress, &s(TCP_FIN | TCP_ACK, &[]));
    let hot = h.only_joined().tcp_hot().expect("TCP state");
    assert_eq!(u32::from(hot.state), types::tcp_state::TCP_ST_CLOSED.0);
}
