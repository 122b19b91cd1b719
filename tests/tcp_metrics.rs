//! BPF_PROG_TEST_RUN sequences for TCP handshake, direction-agnostic latency, late start, state, and ICMP echo RTT.

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::{Harness, Hook};
use flowlens::kernel::bpf::types::{flow_base, tcp_bits, tcp_hot, tcp_latency, tcp_state};
use flowlens::kernel::packet::*;
use flowlens::poller::decode::{client_dir, HI_TO_LO, LO_TO_HI};
use flowlens::poller::decode::{Clock, Counts, RecordMeta};
use flowlens::record::flow::EndReason;
use libbpf_rs::MapCore;

const CLIENT: [u8; 4] = [10, 200, 0, 1]; // lo side: sends LO_TO_HI
const SERVER: [u8; 4] = [10, 200, 0, 2];
const GAP: Duration = Duration::from_millis(3);
const GAP_NS: u32 = 3_000_000;

fn c2s(h: &Harness, flags: u8, payload: &[u8]) {
    h.run(
        Hook::Egress,
        &v4_frame(CLIENT, SERVER, 6, 64, &tcp(50000, 8080, flags, payload)),
    );
}

fn s2c(h: &Harness, flags: u8, payload: &[u8]) {
    h.run(
        Hook::Ingress,
        &v4_frame(SERVER, CLIENT, 6, 64, &tcp(8080, 50000, flags, payload)),
    );
}

/// One TCP flow's state (base entry) and latency (its flows_tcp entry, all
/// zero while it has none).
struct Tcp {
    h: tcp_hot,
    b: flow_base,
    lat: [tcp_latency; 2],
}

fn ext(h: &Harness) -> Tcp {
    let f = h.only_joined();
    Tcp {
        h: f.tcp_hot().expect("a TCP flow"),
        b: f.base,
        lat: f.tcp.map_or([tcp_latency::default(); 2], |t| t.lat),
    }
}

fn has(t: &Tcp, b: tcp_bits) -> bool {
    u32::from(t.h.bits) & b.0 != 0
}

fn handshake(h: &Harness) {
    c2s(h, TCP_SYN, &[]);
    sleep(GAP);
    s2c(h, TCP_SYN | TCP_ACK, &[]);
    sleep(GAP);
    c2s(h, TCP_ACK, &[]);
}

#[test]
fn handshake_times_are_measured_from_this_host() {
    let h = Harness::new();
    handshake(&h);
    let t = ext(&h);
    assert!(has(&t, tcp_bits::TCPB_CLIENT_HS) && has(&t, tcp_bits::TCPB_SERVER_HS));
    assert!(
        t.b.handshake_client_ns >= GAP_NS,
        "SYN -> SYN-ACK {}",
        t.b.handshake_client_ns
    );
    assert!(
        t.b.handshake_server_ns >= GAP_NS,
        "SYN-ACK -> ACK {}",
        t.b.handshake_server_ns
    );
    assert!(t.b.handshake_client_ns < 1_000_000_000 && t.b.handshake_server_ns < 1_000_000_000);
    assert_eq!(u32::from(t.h.state), tcp_state::TCP_ST_ESTABLISHED.0);
    assert!(!has(&t, tcp_bits::TCPB_LATE_START));
    assert_eq!(t.h.syn_retrans, 0);
    assert_eq!(
        t.lat[0].count + t.lat[1].count,
        0,
        "no payload, no latency sample"
    );
    assert!(h.tcp().is_empty(), "no sample, no flows_tcp entry");
}

#[test]
fn retransmitted_syns_are_counted_and_timing_starts_at_the_first() {
    let h = Harness::new();
    c2s(&h, TCP_SYN, &[]);
    sleep(GAP);
    c2s(&h, TCP_SYN, &[]);
    c2s(&h, TCP_SYN, &[]);
    s2c(&h, TCP_SYN | TCP_ACK, &[]);
    c2s(&h, TCP_ACK, &[]);
    let t = ext(&h);
    assert_eq!(t.h.syn_retrans, 2);
    assert!(
        t.b.handshake_client_ns >= GAP_NS,
        "from the first SYN: {}",
        t.b.handshake_client_ns
    );
}

#[test]
fn request_response_gives_k_server_samples_and_k_minus_1_client_samples() {
    let h = Harness::new();
    handshake(&h);
    let k = 4;
    for i in 0..k {
        c2s(&h, TCP_ACK | TCP_PSH, b"GET / HTTP/1.1\r\n\r\n");
        sleep(GAP * (i + 1)); // server think time grows: 3, 6, 9, 12 ms
        s2c(&h, TCP_ACK | TCP_PSH, &[b'x'; 200]);
        s2c(&h, TCP_ACK | TCP_PSH, &[b'y'; 200]); // same direction: no sample
        c2s(&h, TCP_ACK, &[]); // pure ACK: no sample
        sleep(GAP);
    }
    let t = ext(&h);
    let server = t.lat[HI_TO_LO];
    let client = t.lat[LO_TO_HI];
    assert_eq!(server.count, k);
    assert_eq!(client.count, k - 1);
    assert!(server.min_ns >= GAP_NS);
    assert!(server.max_ns >= 4 * GAP_NS);
    assert!(server.min_ns <= server.max_ns);
    assert!(server.sum_ns >= u64::from(GAP_NS) * 10);
    // Consecutive samples grow by >= 3 ms each: mean |diff| >= ~3 ms (minus scheduling noise).
    assert!(
        server.jitter_sum_ns >= u64::from(GAP_NS) * u64::from(k - 1) / 2,
        "{server:?}"
    );
}

#[test]
fn server_first_protocol_samples_both_sides() {
    let h = Harness::new();
    handshake(&h);
    s2c(&h, TCP_ACK | TCP_PSH, b"220 banner\r\n"); // first payload: no sample
    sleep(GAP);
    c2s(&h, TCP_ACK | TCP_PSH, b"HELO x\r\n"); // client answered the banner
    sleep(GAP);
    s2c(&h, TCP_ACK | TCP_PSH, b"250 ok\r\n"); // server answered
    let t = ext(&h);
    assert_eq!(t.lat[LO_TO_HI].count, 1);
    assert_eq!(t.lat[HI_TO_LO].count, 1);
    assert!(t.lat[LO_TO_HI].min_ns >= GAP_NS);
}

#[test]
fn late_start_has_no_handshake_and_samples_after_the_first_direction_change() {
    let h = Harness::new();
    c2s(&h, TCP_ACK | TCP_PSH, b"mid-stream request");
    let t = ext(&h);
    assert!(has(&t, tcp_bits::TCPB_LATE_START));
    assert!(!has(&t, tcp_bits::TCPB_CLIENT_HS) && !has(&t, tcp_bits::TCPB_SERVER_HS));
    assert_eq!(u32::from(t.h.state), tcp_state::TCP_ST_ESTABLISHED.0);
    sleep(GAP);
    s2c(&h, TCP_ACK | TCP_PSH, b"response");
    let t = ext(&h);
    assert_eq!(t.lat[HI_TO_LO].count, 1);
    assert_eq!(t.lat[LO_TO_HI].count, 0);
    assert!(t.lat[HI_TO_LO].min_ns >= GAP_NS);
    // the initiator is guessed from ports: 50000 is the ephemeral side
    let (_, b) = h.only_flow();
    assert_eq!(client_dir(&b), LO_TO_HI);
}

#[test]
fn fin_in_both_directions_closes_and_rst_resets() {
    let h = Harness::new();
    handshake(&h);
    c2s(&h, TCP_FIN | TCP_ACK, &[]);
    assert_eq!(u32::from(ext(&h).h.state), tcp_state::TCP_ST_FIN_WAIT.0);
    s2c(&h, TCP_FIN | TCP_ACK, &[]);
    let t = ext(&h);
    assert_eq!(u32::from(t.h.state), tcp_state::TCP_ST_CLOSED.0);
    assert_eq!(t.h.flags[LO_TO_HI] & TCP_FIN, TCP_FIN);
    assert_eq!(t.h.flags[HI_TO_LO] & TCP_FIN, TCP_FIN);

    let r = Harness::new();
    handshake(&r);
    s2c(&r, TCP_RST, &[]);
    assert_eq!(u32::from(ext(&r).h.state), tcp_state::TCP_ST_RESET.0);
}

#[test]
fn icmp_echo_rtt_pairs_replies_by_sequence_number() {
    let h = Harness::new();
    let req = |seq| v4_frame(CLIENT, SERVER, 1, 64, &echo(8, 77, seq, &[0u8; 56]));
    let rep = |seq| v4_frame(SERVER, CLIENT, 1, 64, &echo(0, 77, seq, &[0u8; 56]));
    for seq in 1..=3 {
        h.run(Hook::Egress, &req(seq));
        sleep(GAP);
        h.run(Hook::Ingress, &rep(seq));
    }
    // a reply to an unknown sequence, and a lost request's successor
    h.run(Hook::Ingress, &rep(99));
    h.run(Hook::Egress, &req(4));
    h.run(Hook::Egress, &req(5));
    h.run(Hook::Ingress, &rep(4));
    let f = h.only_joined();
    let c = f.icmp.expect("an RTT entry");
    assert_eq!(c.rtt_count, 3, "only matched request/reply pairs count");
    assert!(c.rtt_min_ns >= GAP_NS && c.rtt_max_ns >= c.rtt_min_ns);
    assert!(c.rtt_sum_ns >= 3 * u64::from(GAP_NS));
    let rec = f.to_record(
        RecordMeta {
            counts: Counts::of(&f.base),
            end_reason: EndReason::IdleTimeout,
            interface: "lo".into(),
            observer: "test".into(),
            window_start_ns: f.base.first_seen_ns,
            emitted_ns: f.base.last_seen_ns,
            flow_id: f.flow_id(),
            continuation: false,
            local: [None, None],
        },
        &Clock::new(),
    );
    let i = rec.icmp.expect("ICMP info");
    assert_eq!((i.client_type, i.server_type), (Some(8), Some(0)));
    assert_eq!(i.echo_rtt.map(|r| r.count), Some(3));
}

/// Same-direction payload and pure ACKs take the lock-free path: the sample must still
/// start at the *last* payload of the other side's burst, as the locked update measures it.
#[test]
fn fast_path_keeps_the_last_payload_time_of_a_burst() {
    let h = Harness::new();
    handshake(&h);
    c2s(&h, TCP_ACK | TCP_PSH, b"request");
    sleep(GAP);
    s2c(&h, TCP_ACK | TCP_PSH, &[b'x'; 100]); // server sample: ~GAP
    sleep(GAP * 4);
    s2c(&h, TCP_ACK | TCP_PSH, &[b'y'; 100]); // same direction: payload time only
    c2s(&h, TCP_ACK, &[]); // pure ACK: nothing but counters
    sleep(GAP);
    c2s(&h, TCP_ACK | TCP_PSH, b"next"); // client sample: from 'y', not 'x'
    let t = ext(&h);
    assert_eq!((t.lat[HI_TO_LO].count, t.lat[LO_TO_HI].count), (1, 1));
    let client = t.lat[LO_TO_HI].min_ns;
    assert!(
        (GAP_NS..4 * GAP_NS).contains(&client),
        "client sample {client} ns must start at the burst's last payload"
    );
    assert_eq!(u32::from(t.h.state), tcp_state::TCP_ST_ESTABLISHED.0);
    assert!(has(&t, tcp_bits::TCPB_PAYLOAD) && !has(&t, tcp_bits::TCPB_LAST_DIR_HI));
    assert_eq!(t.h.flags[LO_TO_HI], TCP_SYN | TCP_ACK | TCP_PSH);
}

/// Packets the fast path handles change no TCP field; the next state change still lands.
#[test]
fn fast_path_changes_only_counters_until_a_state_change() {
    let h = Harness::new();
    handshake(&h);
    c2s(&h, TCP_ACK | TCP_PSH, b"q");
    s2c(&h, TCP_ACK | TCP_PSH, b"r");
    let before = h.only_joined();
    for _ in 0..5 {
        c2s(&h, TCP_ACK, &[]);
        s2c(&h, TCP_ACK, &[]);
    }
    let after = h.only_joined();
    assert_eq!(
        after.base.packets[LO_TO_HI] + after.base.packets[HI_TO_LO],
        before.base.packets[LO_TO_HI] + before.base.packets[HI_TO_LO] + 10
    );
    let (b0, b1) = (before.base, after.base);
    assert_eq!(b0.l4_ts_ns, b1.l4_ts_ns, "no payload, no payload time");
    assert_eq!(
        (b0.handshake_client_ns, b0.handshake_server_ns),
        (b1.handshake_client_ns, b1.handshake_server_ns)
    );
    let (h0, h1) = (
        before.tcp_hot().expect("tcp"),
        after.tcp_hot().expect("tcp"),
    );
    assert_eq!(
        (h0.flags, h0.state, h0.bits, h0.syn_retrans),
        (h1.flags, h1.state, h1.bits, h1.syn_retrans)
    );
    assert_eq!(
        before.tcp.map(|t| t.lat[0].count + t.lat[1].count),
        after.tcp.map(|t| t.lat[0].count + t.lat[1].count)
    );
    // A flag the side never sent leaves the fast path and is recorded; FIN/RST still close.
    c2s(&h, TCP_ACK | 0x40, &[]); // ECE
    assert_eq!(ext(&h).h.flags[LO_TO_HI] & 0x40, 0x40);
    c2s(&h, TCP_FIN | TCP_ACK, &[]);
    s2c(&h, TCP_FIN | TCP_ACK, &[]);
    assert_eq!(u32::from(ext(&h).h.state), tcp_state::TCP_ST_CLOSED.0);
}

/// The datapath notes a TCP close (FIN both ways, or RST, even as a flow's first packet
/// while the base map has room: admission holds only under pressure), and a pass over
/// those notes alone ends such flows once past the grace, leaving every other flow to the
/// full scans; the note goes with the flow.
#[test]
fn closes_are_noted_and_a_pass_over_the_notes_ends_them() {
    use flowlens::poller::decode::monotonic_ns;
    use flowlens::poller::scan::{closing_args, ScanKind};
    use flowlens::poller::table::collect_scan;
    use flowlens::poller::{KernelTable, PollerConfig};
    let h = Harness::new();
    handshake(&h);
    c2s(&h, TCP_FIN | TCP_ACK, &[]);
    assert_eq!(h.maps.closing.keys().count(), 0, "one FIN is no close");
    s2c(&h, TCP_FIN | TCP_ACK, &[]);
    assert_eq!(h.maps.closing.keys().count(), 1);
    h.run(
        Hook::Egress,
        &v4_frame(CLIENT, SERVER, 6, 64, &tcp(50001, 8080, TCP_RST, &[])),
    );
    assert_eq!(h.maps.closing.keys().count(), 2, "a lone RST too");
    assert_eq!(
        h.maps.probation.keys().count(),
        0,
        "no pressure, no probation"
    );
    h.run(
        Hook::Egress,
        &v4_frame(CLIENT, SERVER, 17, 64, &udp(5000, 53, b"q")),
    );
    let cfg = PollerConfig::default();
    let mut table = KernelTable::new(h.dp.maps().expect("maps"));
    let now = monotonic_ns();
    let (flows, _) = collect_scan(&mut table, &closing_args(&cfg, now), 1).expect("scan");
    assert!(flows.is_empty(), "within the grace");
    // Long enough for the UDP flow to be idle too: not this pass's business.
    let later = now + 2 * cfg.idle_udp.as_nanos() as u64;
    let mut kinds: Vec<ScanKind> = collect_scan(&mut table, &closing_args(&cfg, later), 1)
        .expect("scan")
        .0
        .iter()
        .map(|f| f.0)
        .collect();
    kinds.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(
        kinds,
        [
            ScanKind::Ended(EndReason::TcpFin),
            ScanKind::Ended(EndReason::TcpRst)
        ]
    );
    assert_eq!(
        h.maps.closing.keys().count(),
        0,
        "the notes go with the flows"
    );
    assert_eq!(h.maps.flows.keys().count(), 1, "the UDP flow is left");
}
