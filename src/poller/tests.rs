//! The lifecycle rules on an in-memory table: no kernel, no root.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::decode::{meta, KeyBytes, LO_TO_HI};
use super::memory::{flow_key, MemTable};
use super::{Poller, PollerConfig};
use crate::kernel::attach::IfNames;
use crate::kernel::bpf::types;
use crate::record::flow::{EndReason, FlowRecord, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use crate::status::Status;

const S: u64 = 1_000_000_000;
/// Every flow in these tests starts here on the BPF clock.
const T0: u64 = 1_000 * S;

fn cfg() -> PollerConfig {
    PollerConfig {
        poll_interval: Duration::from_secs(1),
        idle_tcp: Duration::from_secs(30),
        idle_udp: Duration::from_secs(20),
        idle_icmp: Duration::from_secs(10),
        idle_other: Duration::from_secs(40),
        tcp_close_grace: Duration::from_secs(2),
        active_timeout: Duration::from_secs(60),
        orphan_sweep_every: 3,
        pressure_threshold: 0.8,
        pressure_poll_interval: Duration::from_millis(100),
        evict_min_age: Duration::from_secs(1),
        evict_target: 0.5,
        scan_threads: 1,
    }
}

struct Rig {
    poller: Poller<MemTable>,
    rx: Receiver<Vec<FlowRecord>>,
    status: Arc<Status>,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(cfg(), [1000, 1000, 1000])
    }

    fn with(cfg: PollerConfig, capacity: [u64; 3]) -> Rig {
        let (tx, rx) = crossbeam_channel::unbounded();
        let status = Arc::new(Status::new());
        Rig {
            poller: Poller::new(
                MemTable::new(capacity),
                cfg,
                tx,
                status.clone(),
                IfNames::default(),
            ),
            rx,
            status,
        }
    }

    fn table(&mut self) -> &mut MemTable {
        self.poller.table_mut()
    }

    /// A flow from 10.0.0.1:port (the client, its packets go lo -> hi) to 10.0.0.2.
    fn flow(&mut self, proto: u8, port: u16, packets: [u64; 2], last_seen_ns: u64) -> KeyBytes {
        let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
        let (key, client_is_lo) = flow_key(proto, (ip(1), port), (ip(2), 80), 7);
        assert!(client_is_lo);
        let base = types::flow_base {
            first_seen_ns: T0,
            last_seen_ns,
            packets,
            bytes: packets.map(|p| p * 100),
            meta: meta::created(LO_TO_HI, false, 0),
            ..Default::default()
        };
        let tcp = (proto == IPPROTO_TCP).then(types::flow_tcp::default);
        let icmp = (proto == IPPROTO_ICMP).then(types::flow_icmp::default);
        self.table().put(key, base, tcp, icmp)
    }

    fn tcp_state(&mut self, kb: &KeyBytes, state: types::tcp_state) {
        self.table().set_tcp_hot(kb, |h| h.state = state.0 as u8);
    }

    /// Packets each way (100 bytes each) at `at_ns`, as the datapath adds them.
    fn add(&mut self, kb: &KeyBytes, packets: [u64; 2], at_ns: u64) {
        let b = self.table().base_mut(kb).expect("base");
        for (d, n) in packets.into_iter().enumerate() {
            b.packets[d] += n;
            b.bytes[d] += n * 100;
        }
        b.last_seen_ns = at_ns;
    }

    /// The agent dies and another takes its maps over (pinned): nothing is flushed.
    fn restart(self) -> Rig {
        let cfg = self.poller.cfg;
        let table = self.poller.into_table();
        let (tx, rx) = crossbeam_channel::unbounded();
        let status = Arc::new(Status::new());
        Rig {
            poller: Poller::new(table, cfg, tx, status.clone(), IfNames::default()),
            rx,
            status,
        }
    }

    fn poll(&mut self, now_ns: u64) -> Vec<FlowRecord> {
        self.poller.poll_once(now_ns).expect("poll");
        self.rx.try_iter().flatten().collect()
    }
}

#[test]
fn idle_flows_end_after_their_protocols_timeout_and_leave_every_map() {
    let mut rig = Rig::new();
    rig.flow(IPPROTO_UDP, 1000, [3, 2], T0 + S);
    rig.flow(IPPROTO_ICMP, 0, [1, 1], T0 + S);
    rig.flow(IPPROTO_TCP, 1001, [5, 4], T0 + S);
    rig.flow(47, 0, [1, 0], T0 + S);

    assert!(rig.poll(T0 + 10 * S).is_empty(), "nothing is idle yet");
    let icmp = rig.poll(T0 + 11 * S);
    assert_eq!(icmp.len(), 1);
    assert_eq!(icmp[0].protocol, IPPROTO_ICMP);
    assert_eq!(icmp[0].end_reason, EndReason::IdleTimeout);
    let udp = rig.poll(T0 + 21 * S);
    assert_eq!(udp.len(), 1);
    assert_eq!(udp[0].protocol, IPPROTO_UDP);
    assert_eq!((udp[0].client.packets, udp[0].server.packets), (3, 2));
    assert_eq!((udp[0].client.bytes, udp[0].server.bytes), (300, 200));
    assert_eq!(udp[0].client_port, 1000);
    assert_eq!(udp[0].server_port, 80);
    let tcp = rig.poll(T0 + 31 * S);
    assert_eq!(tcp.len(), 1);
    assert_eq!(tcp[0].protocol, IPPROTO_TCP);
    assert!(tcp[0].tcp.is_some());
    let other = rig.poll(T0 + 41 * S);
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].protocol, 47);
    assert_eq!(rig.table().entries(), [0, 0, 0], "every map is empty");
    assert_eq!(rig.status.flows_ended.load(Ordering::Relaxed), 4);
}

#[test]
fn a_packet_before_the_timeout_keeps_a_flow_alive() {
    let mut rig = Rig::new();
    let k = rig.flow(IPPROTO_UDP, 1000, [1, 0], T0 + S);
    assert!(rig.poll(T0 + 15 * S).is_empty());
    let b = rig.table().base_mut(&k).expect("base");
    b.last_seen_ns = T0 + 15 * S;
    b.packets[LO_TO_HI] += 1;
    assert!(rig.poll(T0 + 30 * S).is_empty(), "idle only 15 s");
    let r = rig.poll(T0 + 35 * S);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].client.packets, 2);
}

#[test]
fn closed_and_reset_tcp_flows_end_after_the_grace_period() {
    let mut rig = Rig::new();
    let fin = rig.flow(IPPROTO_TCP, 1000, [4, 4], T0 + S);
    let rst = rig.flow(IPPROTO_TCP, 1001, [2, 1], T0 + S);
    let open = rig.flow(IPPROTO_TCP, 1002, [2, 2], T0 + S);
    rig.tcp_state(&fin, types::tcp_state::TCP_ST_CLOSED);
    rig.tcp_state(&rst, types::tcp_state::TCP_ST_RESET);
    rig.tcp_state(&open, types::tcp_state::TCP_ST_ESTABLISHED);

    assert!(rig.poll(T0 + 2 * S).is_empty(), "within the grace period");
    let mut ended = rig.poll(T0 + 3 * S);
    ended.sort_by_key(|r| r.client_port);
    let reasons: Vec<_> = ended.iter().map(|r| r.end_reason).collect();
    assert_eq!(reasons, [EndReason::TcpFin, EndReason::TcpRst]);
    assert_eq!(
        rig.table().entries(),
        [1, 1, 0],
        "only the open flow is left"
    );
    let last = rig.poll(T0 + 31 * S);
    assert_eq!(last[0].end_reason, EndReason::IdleTimeout);
}

#[test]
fn active_timeout_records_carry_deltas_that_add_up_to_the_total() {
    let mut rig = Rig::new();
    let k = rig.flow(IPPROTO_UDP, 1000, [10, 5], T0 + 59 * S);
    let a1 = rig.poll(T0 + 60 * S);
    assert_eq!(a1.len(), 1);
    assert_eq!(a1[0].end_reason, EndReason::ActiveTimeout);
    assert_eq!((a1[0].client.packets, a1[0].server.packets), (10, 5));
    assert_eq!(
        rig.table().entries(),
        [1, 0, 0],
        "the flow goes on in the map"
    );
    // What the record carried is gone from the entry: a successor never reports it again.
    let b = rig.table().base_mut(&k).expect("base");
    assert_eq!((b.packets, b.bytes), ([0, 0], [0, 0]));

    rig.add(&k, [7, 4], T0 + 119 * S);
    assert!(
        rig.poll(T0 + 100 * S).is_empty(),
        "next record one timeout later"
    );
    let a2 = rig.poll(T0 + 120 * S);
    assert_eq!((a2[0].client.packets, a2[0].server.packets), (7, 4));
    assert_eq!((a2[0].client.bytes, a2[0].server.bytes), (700, 400));

    rig.add(&k, [1, 0], T0 + 119 * S);
    let end = rig.poll(T0 + 139 * S + 1);
    assert_eq!(end[0].end_reason, EndReason::IdleTimeout);
    assert_eq!((end[0].client.packets, end[0].server.packets), (1, 0));
    let total: u64 = [&a1[0], &a2[0], &end[0]]
        .iter()
        .map(|r| r.total_packets())
        .sum();
    assert_eq!(total, 18 + 9);
}

#[test]
fn an_active_flow_with_nothing_new_gets_no_record() {
    let mut rig = Rig::with(
        PollerConfig {
            idle_udp: Duration::from_secs(300),
            ..cfg()
        },
        [1000; 3],
    );
    rig.flow(IPPROTO_UDP, 1000, [1, 1], T0 + 50 * S);
    assert_eq!(rig.poll(T0 + 60 * S).len(), 1);
    assert!(rig.poll(T0 + 120 * S).is_empty(), "no packet since");
}

#[test]
fn flush_ends_every_flow_as_shutdown() {
    let mut rig = Rig::new();
    for port in 0..5 {
        rig.flow(IPPROTO_TCP, 2000 + port, [1, 1], T0);
    }
    rig.flow(IPPROTO_ICMP, 0, [1, 0], T0);
    assert_eq!(rig.poller.flush().expect("flush"), 6);
    let recs: Vec<_> = rig.rx.try_iter().flatten().collect();
    assert_eq!(recs.len(), 6);
    assert!(recs.iter().all(|r| r.end_reason == EndReason::Shutdown));
    assert_eq!(rig.table().entries(), [0, 0, 0]);
}

#[test]
fn orphan_extensions_are_swept_but_a_flows_own_are_not() {
    let mut rig = Rig::new();
    let orphan = rig.flow(IPPROTO_TCP, 1000, [1, 0], T0);
    let kept = rig.flow(IPPROTO_TCP, 1001, [1, 0], T0);
    rig.table().base.remove(&orphan);
    rig.poll(T0 + S);
    rig.poll(T0 + 2 * S);
    assert_eq!(
        rig.table().entries(),
        [1, 2, 0],
        "sweep runs every 3rd poll"
    );
    rig.poll(T0 + 3 * S);
    assert_eq!(rig.table().entries(), [1, 1, 0]);
    let kept_id = rig.table().base[&kept].1.ext_id;
    assert!(rig.table().tcp.contains_key(&kept_id));
    assert_eq!(rig.status.orphans_removed.load(Ordering::Relaxed), 1);
}

#[test]
fn map_pressure_is_reported_once_per_episode() {
    let mut rig = Rig::with(cfg(), [10, 10, 10]);
    // Answered flows: pressure alone, no eviction candidates.
    let keys: Vec<_> = (0..9)
        .map(|i| rig.flow(IPPROTO_UDP, 1000 + i, [1, 1], T0))
        .collect();
    rig.poll(T0 + S);
    rig.poll(T0 + 2 * S);
    assert_eq!(rig.status.map_pressure_events.load(Ordering::Relaxed), 1);
    for k in &keys[..5] {
        rig.table().base.remove(k);
    }
    rig.poll(T0 + 3 * S);
    for i in 0..5 {
        rig.flow(IPPROTO_UDP, 3000 + i, [1, 1], T0);
    }
    rig.poll(T0 + 4 * S);
    assert_eq!(rig.status.map_pressure_events.load(Ordering::Relaxed), 2);
    let usage = rig.status.snapshot().maps;
    assert_eq!(usage[0].name, "flows");
    assert_eq!((usage[0].entries, usage[0].capacity), (9, 10));
}

#[test]
fn the_initiator_decides_client_and_server() {
    let mut rig = Rig::new();
    let k = rig.flow(IPPROTO_UDP, 1000, [2, 7], T0);
    // The hi endpoint (10.0.0.2:80) sent first.
    rig.table().base_mut(&k).expect("base").meta |= meta::CLIENT_HI;
    rig.poller.flush().expect("flush");
    let [r] = rig
        .rx
        .try_recv()
        .expect("record")
        .try_into()
        .expect("one record");
    assert_eq!(r.client_addr, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
    assert_eq!((r.client_port, r.server_port), (80, 1000));
    assert_eq!((r.client.packets, r.server.packets), (7, 2));
}

#[test]
fn a_flow_quiet_since_the_last_poll_gets_its_idle_end_not_an_active_record() {
    let mut rig = Rig::with(
        PollerConfig {
            idle_udp: Duration::from_secs(30),
            active_timeout: Duration::from_secs(20),
            ..cfg()
        },
        [1000; 3],
    );
    rig.flow(IPPROTO_UDP, 1000, [4, 4], T0 + 7 * S);
    for t in 1..=36 {
        assert!(rig.poll(T0 + t * S).is_empty(), "no record at +{t} s");
    }
    let end = rig.poll(T0 + 37 * S);
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].end_reason, EndReason::IdleTimeout);
    assert_eq!(end[0].total_packets(), 8);
    assert_eq!(end[0].window_start, end[0].first_seen);
}

#[test]
fn a_flow_whose_last_active_record_carried_everything_still_ends_once_with_its_reason() {
    let mut rig = Rig::new();
    rig.flow(IPPROTO_UDP, 1000, [3, 3], T0 + 59 * S);
    let active = rig.poll(T0 + 60 * S);
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].end_reason, EndReason::ActiveTimeout);
    // Nothing since: the flow still gets its final record, with nothing in it.
    let end = rig.poll(T0 + 80 * S);
    assert_eq!(end.len(), 1, "{end:?}");
    assert_eq!(end[0].end_reason, EndReason::IdleTimeout);
    assert_eq!((end[0].total_packets(), end[0].total_bytes()), (0, 0));
    assert_eq!(end[0].flow_id, active[0].flow_id);
    assert_eq!(rig.table().entries(), [0, 0, 0]);
    assert_eq!(rig.status.flows_ended.load(Ordering::Relaxed), 1);
}

/// A TCP connection that closed just before its active-timeout tick: the tick leaves it
/// to its close, whose record carries everything with the true reason.
#[test]
fn a_connection_closed_at_its_active_tick_ends_with_its_close_not_an_active_record() {
    let mut rig = Rig::with(
        PollerConfig {
            active_timeout: Duration::from_secs(5),
            ..cfg()
        },
        [1000; 3],
    );
    let fin = rig.flow(IPPROTO_TCP, 1000, [12, 9], T0 + 4 * S + 6 * S / 10);
    rig.tcp_state(&fin, types::tcp_state::TCP_ST_CLOSED);
    let rst = rig.flow(IPPROTO_TCP, 1001, [3, 1], T0 + 4 * S + 6 * S / 10);
    rig.tcp_state(&rst, types::tcp_state::TCP_ST_RESET);
    assert!(rig.poll(T0 + 4 * S).is_empty());
    assert!(rig.poll(T0 + 5 * S).is_empty(), "inside the close grace");
    let mut ends = rig.poll(T0 + 7 * S);
    ends.sort_by_key(|r| r.client_port);
    let got: Vec<_> = ends
        .iter()
        .map(|r| (r.end_reason, r.client.packets, r.server.packets))
        .collect();
    assert_eq!(got, [(EndReason::TcpFin, 12, 9), (EndReason::TcpRst, 3, 1)]);
}

/// A flow that went quiet shortly before its tick: the tick's record carries its packets,
/// and the idle end still follows, once, with nothing new.
#[test]
fn a_flow_quiet_just_before_its_tick_gets_its_idle_end_after_the_active_record() {
    let mut rig = Rig::with(
        PollerConfig {
            active_timeout: Duration::from_secs(5),
            idle_udp: Duration::from_secs(1),
            ..cfg()
        },
        [1000; 3],
    );
    rig.flow(IPPROTO_UDP, 1000, [40, 40], T0 + 4 * S + 6 * S / 10);
    assert!(rig.poll(T0 + 4 * S + S / 2).is_empty());
    let mut recs = rig.poll(T0 + 5 * S);
    recs.extend(rig.poll(T0 + 6 * S));
    let got: Vec<_> = recs
        .iter()
        .map(|r| (r.end_reason, r.total_packets()))
        .collect();
    assert_eq!(
        got,
        [(EndReason::ActiveTimeout, 80), (EndReason::IdleTimeout, 0)]
    );
}

/// An agent that dies and is replaced (pinned maps) reports nothing twice, and its first
/// poll gives no active-timeout record to a flow quiet since its predecessor's last poll.
#[test]
fn a_successor_reports_nothing_twice_and_leaves_quiet_flows_alone_at_its_first_poll() {
    let mut rig = Rig::with(
        PollerConfig {
            idle_udp: Duration::from_secs(300),
            ..cfg()
        },
        [1000; 3],
    );
    let busy = rig.flow(IPPROTO_UDP, 1000, [10, 10], T0 + 59 * S);
    let quiet = rig.flow(IPPROTO_UDP, 1001, [5, 5], T0 + 59 * S);
    let first = rig.poll(T0 + 60 * S);
    assert_eq!(first.len(), 2);
    rig.add(&busy, [3, 1], T0 + 70 * S);
    rig.add(&quiet, [2, 0], T0 + 61 * S);
    assert!(
        rig.poll(T0 + 62 * S).is_empty(),
        "both in their reported window"
    );
    // The agent dies; the next one takes over.
    let mut rig = rig.restart();
    let second = rig.poll(T0 + 121 * S);
    assert_eq!(second.len(), 1, "the quiet flow waits: {second:?}");
    assert_eq!(second[0].client_port, 1000);
    assert_eq!(second[0].total_packets(), 4, "only what came since");
    let flushed = {
        rig.poller.flush().expect("flush");
        rig.rx.try_iter().flatten().collect::<Vec<_>>()
    };
    let total: u64 = first
        .iter()
        .chain(&second)
        .chain(&flushed)
        .map(FlowRecord::total_packets)
        .sum();
    assert_eq!(total, 20 + 10 + 4 + 2);
}

#[test]
fn every_record_of_a_flow_has_its_id_observer_and_window() {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut poller = Poller::new(
        MemTable::new([100; 3]),
        cfg(),
        tx,
        Arc::new(Status::new()),
        IfNames::default(),
    )
    .with_observer("edge-7");
    let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
    let (key, _) = flow_key(IPPROTO_UDP, (ip(1), 5000), (ip(2), 53), 3);
    let base = types::flow_base {
        first_seen_ns: T0,
        last_seen_ns: T0 + 59 * S,
        packets: [1, 1],
        ..Default::default()
    };
    let kb = poller.table_mut().put(key, base, None, None);
    poller.poll_once(T0 + 60 * S).expect("poll");
    let b = poller.table_mut().base_mut(&kb).expect("base");
    b.packets = [1, 1];
    b.last_seen_ns = T0 + 70 * S;
    poller.poll_once(T0 + 91 * S).expect("poll");
    let recs: Vec<FlowRecord> = rx.try_iter().flatten().collect();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].flow_id, recs[1].flow_id);
    assert_ne!(recs[0].flow_id, 0);
    assert!(recs.iter().all(|r| &*r.observer == "edge-7"));
    assert_eq!(recs[0].window_start, recs[0].first_seen);
    // The second window starts when the first record went out (the entry keeps that
    // time to 2^23 ns, rounded down).
    let gap = recs[1]
        .window_start
        .duration_since(recs[0].first_seen)
        .expect("later");
    assert!(
        gap <= Duration::from_secs(60)
            && gap > Duration::from_secs(60) - Duration::from_nanos(1 << 23),
        "{gap:?}"
    );
    // Each record says when it was emitted (its poll); the first one's is the second's
    // window start, to the entry's rounding.
    let lag = recs[0]
        .emitted
        .duration_since(recs[1].window_start)
        .expect("rounded down");
    assert!(lag < Duration::from_nanos(1 << 23), "{lag:?}");
    let at = |r: &FlowRecord| r.emitted.duration_since(recs[0].first_seen).expect("later");
    assert_eq!(at(&recs[1]), Duration::from_secs(91));
}

/// A TCP connection with its handshake seen, established, that sent both ways.
fn connection(rig: &mut Rig, port: u16, last_seen_ns: u64) -> KeyBytes {
    use types::tcp_bits as B;
    let k = rig.flow(IPPROTO_TCP, port, [5, 5], last_seen_ns);
    let t = rig.table();
    let b = t.base_mut(&k).expect("base");
    b.handshake_client_ns = 120_000;
    b.handshake_server_ns = 40_000;
    t.set_tcp_hot(&k, |h| {
        h.state = types::tcp_state::TCP_ST_ESTABLISHED.0 as u8;
        h.bits = (B::TCPB_SYN.0
            | B::TCPB_SYNACK.0
            | B::TCPB_HS_DONE.0
            | B::TCPB_CLIENT_HS.0
            | B::TCPB_SERVER_HS.0) as u8;
        h.flags = [0x12, 0x12];
    });
    k
}

/// The same connection seen again by the datapath after its entry ended: a late start
/// (its first packet is not its SYN) that, by the port heuristic, takes the side with the
/// higher port (1000 > 80) as the client, here wrongly.
fn resumed(
    rig: &mut Rig,
    port: u16,
    packets: [u64; 2],
    at_ns: u64,
    state: types::tcp_state,
    flags: u8,
) -> KeyBytes {
    let k = rig.flow(IPPROTO_TCP, port, packets, at_ns);
    let t = rig.table();
    let b = t.base_mut(&k).expect("base");
    b.first_seen_ns = at_ns;
    b.meta |= meta::CLIENT_HI;
    t.set_tcp_hot(&k, |h| {
        h.bits = types::tcp_bits::TCPB_LATE_START.0 as u8;
        h.state = state.0 as u8;
        h.flags = [flags, 0];
    });
    k
}

/// A connection that idles past its timeout and resumes comes back with its id, its
/// roles, its handshake and the flags it sent before, as a continuation; so does its FIN
/// after another idle gap.
#[test]
fn a_resumed_connection_keeps_its_id_roles_and_handshake_through_to_its_fin() {
    use crate::record::flow::TcpState;
    use types::tcp_state as St;
    let mut rig = Rig::new();
    let k = connection(&mut rig, 1000, T0 + S);
    let first = rig.poll(T0 + 31 * S);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].client_port, 1000);
    assert!(!first[0].continuation);
    assert_eq!(rig.table().ended.len(), 1, "remembered");

    let k2 = resumed(
        &mut rig,
        1000,
        [2, 3],
        T0 + 40 * S,
        St::TCP_ST_ESTABLISHED,
        0x18,
    );
    assert_eq!(k, k2);
    let second = rig.poll(T0 + 71 * S);
    assert_eq!(second.len(), 1);
    let r = &second[0];
    assert!(r.continuation);
    assert_eq!(r.end_reason, EndReason::IdleTimeout);
    assert_eq!(r.flow_id, first[0].flow_id);
    assert_eq!(
        r.first_seen, first[0].first_seen,
        "the connection's first packet"
    );
    assert_eq!((r.client_port, r.server_port), (1000, 80));
    assert_eq!((r.client.packets, r.server.packets), (2, 3));
    let t = r.tcp.expect("tcp");
    assert_eq!(
        (t.handshake_client_ns, t.handshake_server_ns, t.late_start),
        (Some(120_000), Some(40_000), false),
        "the handshake of the connection"
    );
    assert_eq!(
        t.client_flags,
        0x12 | 0x18,
        "flags over the whole connection"
    );
    // Its window starts where the earlier record left off.
    let ws = r
        .window_start
        .duration_since(first[0].last_seen)
        .expect("later");
    assert!(ws <= Duration::from_secs(30), "{ws:?}");

    // Another idle gap, then its FIN alone: the same connection again.
    resumed(
        &mut rig,
        1000,
        [1, 0],
        T0 + 80 * S,
        St::TCP_ST_FIN_WAIT,
        0x11,
    );
    let third = rig.poll(T0 + 111 * S);
    assert_eq!(third.len(), 1);
    let f = &third[0];
    assert!(f.continuation);
    assert_eq!(f.flow_id, first[0].flow_id);
    assert_eq!((f.client_port, f.client.packets), (1000, 1));
    let t = f.tcp.expect("tcp");
    assert_eq!(t.state, TcpState::FinWait);
    assert_eq!(t.handshake_client_ns, Some(120_000));
}

/// What a connection's continuation needs is in the kernel's memory of ended
/// connections, so it survives the agent.
#[test]
fn a_connection_that_resumes_after_an_agent_restart_is_still_a_continuation() {
    use types::tcp_state as St;
    let mut rig = Rig::new();
    connection(&mut rig, 1000, T0 + S);
    let first = rig.poll(T0 + 31 * S);
    let mut rig = rig.restart();
    resumed(
        &mut rig,
        1000,
        [2, 3],
        T0 + 40 * S,
        St::TCP_ST_ESTABLISHED,
        0x18,
    );
    let second = rig.poll(T0 + 71 * S);
    assert_eq!(second.len(), 1);
    assert!(second[0].continuation);
    assert_eq!(second[0].flow_id, first[0].flow_id);
    assert_eq!(second[0].client_port, 1000);
}

/// Flows that could never resume (a SYN without answer, one-way traffic, a closed or
/// reset connection, an evicted flow) never enter the memory of ended connections, so a
/// flood cannot flush it; and it is bounded, the least recently used going first.
#[test]
fn the_memory_of_ended_connections_takes_no_junk_and_is_bounded() {
    use super::memory::ENDED_CAPACITY;
    use types::tcp_state as St;
    let mut rig = small([10_000, 10_000, 10_000]);
    // A SYN flood: one packet each, ended idle or evicted.
    for port in 0..2000 {
        let k = rig.flow(IPPROTO_TCP, 2000 + port, [1, 0], T0);
        rig.tcp_state(&k, St::TCP_ST_SYN_SENT);
    }
    // One-way data, a mid-connection ACK probe, a closed and a reset connection.
    let one_way = rig.flow(IPPROTO_TCP, 1001, [9, 0], T0);
    rig.tcp_state(&one_way, St::TCP_ST_ESTABLISHED);
    let closed = connection(&mut rig, 1002, T0);
    rig.tcp_state(&closed, St::TCP_ST_CLOSED);
    let reset = connection(&mut rig, 1003, T0);
    rig.tcp_state(&reset, St::TCP_ST_RESET);
    rig.poll(T0 + 301 * S);
    assert_eq!(rig.table().entries(), [0, 0, 0]);
    assert!(rig.table().ended.is_empty(), "no junk remembered");

    // Established connections that ended idle, more than the memory holds.
    let n = ENDED_CAPACITY as u16 + 10;
    let mut rig = Rig::new();
    for port in 0..n {
        connection(&mut rig, 10_000 + port, T0 + S);
    }
    rig.poll(T0 + 31 * S);
    assert_eq!(rig.table().ended.len(), ENDED_CAPACITY);
}

/// A rig with small maps, for the eviction rules.
fn small(capacity: [u64; 3]) -> Rig {
    Rig::with(
        PollerConfig {
            idle_udp: Duration::from_secs(300),
            idle_tcp: Duration::from_secs(300),
            ..cfg()
        },
        capacity,
    )
}

#[test]
fn under_pressure_single_packet_flows_old_enough_are_evicted_with_their_counts() {
    let mut rig = small([10, 10, 10]);
    // Seven one-packet flows, the oldest first, and two that got an answer.
    let singles: Vec<_> = (0..7)
        .map(|i| rig.flow(IPPROTO_UDP, 1000 + i, [1, 0], T0 + u64::from(i) * S / 10))
        .collect();
    let answered = [
        rig.flow(IPPROTO_UDP, 2000, [1, 1], T0),
        rig.flow(IPPROTO_UDP, 2001, [5, 0], T0),
    ];
    // 9 of 10 entries: over the 0.8 threshold, evict down to 5.
    let recs = rig.poll(T0 + 2 * S);
    assert!(rig.poller.under_pressure());
    assert_eq!(recs.len(), 4);
    assert!(recs.iter().all(|r| r.end_reason == EndReason::Evicted));
    assert!(recs
        .iter()
        .all(|r| r.total_packets() == 1 && r.total_bytes() == 100));
    // Which of the seven go is the map's order (here the ports'), not their age.
    let mut ports: Vec<u16> = recs.iter().map(|r| r.client_port).collect();
    ports.sort_unstable();
    assert_eq!(ports, [1000, 1001, 1002, 1003]);
    for k in &singles[..4] {
        assert!(!rig.table().base.contains_key(k));
    }
    for k in singles[4..].iter().chain(&answered) {
        assert!(rig.table().base.contains_key(k), "answered flows stay");
    }
    assert_eq!(rig.status.flows_evicted.load(Ordering::Relaxed), 4);
    assert_eq!(rig.status.snapshot().flows_evicted, 4);
    // 5 entries left: below the threshold; the episode ends after 2 s of calm.
    assert!(rig.poll(T0 + 3 * S).is_empty());
    assert!(rig.poller.under_pressure());
    assert!(rig.poll(T0 + 4 * S).is_empty());
    assert!(!rig.poller.under_pressure());
}

#[test]
fn single_packet_flows_younger_than_the_minimum_age_are_not_evicted() {
    let mut rig = small([10, 10, 10]);
    for i in 0..9 {
        rig.flow(IPPROTO_UDP, 1000 + i, [1, 0], T0 + S);
    }
    assert!(
        rig.poll(T0 + S + S / 2).is_empty(),
        "0.5 s old: an answer may come"
    );
    assert!(rig.poller.under_pressure());
    assert_eq!(rig.poll(T0 + 2 * S).len(), 4);
}

#[test]
fn without_pressure_nothing_is_evicted() {
    let mut rig = small([10, 10, 10]);
    for i in 0..8 {
        rig.flow(IPPROTO_UDP, 1000 + i, [1, 0], T0);
    }
    assert!(rig.poll(T0 + 10 * S).is_empty(), "8 of 10 is not over 0.8");
    assert!(!rig.poller.under_pressure());
}

#[test]
fn a_full_extension_map_evicts_flows_that_hold_an_entry_in_it() {
    let mut rig = small([100, 4, 100]);
    let syns: Vec<_> = (0..4)
        .map(|i| rig.flow(IPPROTO_TCP, 1000 + i, [1, 0], T0 + u64::from(i)))
        .collect();
    let udp = rig.flow(IPPROTO_UDP, 3000, [1, 0], T0 - S);
    rig.poll(T0 + 2 * S);
    assert_eq!(rig.table().entries(), [3, 2, 0], "TCP map down to half");
    assert!(
        rig.table().base.contains_key(&udp),
        "evicting it frees nothing in flows_tcp"
    );
    assert!(!rig.table().base.contains_key(&syns[0]));
}

#[test]
fn datapath_drops_start_an_episode_below_the_threshold_and_its_end_is_seen() {
    let mut rig = small([100, 100, 100]);
    rig.flow(IPPROTO_UDP, 1000, [1, 0], T0);
    rig.poll(T0 + S);
    assert!(!rig.poller.under_pressure());
    rig.table().counters.insert("base_map_full".into(), 40);
    rig.poll(T0 + 2 * S);
    assert!(rig.poller.under_pressure(), "new flows were dropped");
    // Nothing above the target to evict: the one flow stays.
    assert_eq!(rig.table().entries(), [1, 0, 0]);
    rig.poll(T0 + 3 * S);
    assert!(rig.poller.under_pressure(), "calm for 1 s only");
    rig.poll(T0 + 4 * S);
    assert!(!rig.poller.under_pressure(), "no drop for 2 s");
}

#[test]
fn fragment_flows_are_marked_in_their_records() {
    let mut rig = Rig::new();
    let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
    let (mut key, _) = flow_key(IPPROTO_ICMP, (ip(1), 0), (ip(2), 0), 7);
    key.flags = types::flow_key_flags::KEY_FRAGMENT.0 as u8;
    let base = types::flow_base {
        first_seen_ns: T0,
        last_seen_ns: T0,
        packets: [2, 0],
        ..Default::default()
    };
    rig.table().put(key, base, None, None);
    rig.flow(IPPROTO_ICMP, 0, [1, 1], T0);
    rig.poller.flush().expect("flush");
    let recs: Vec<FlowRecord> = rig.rx.try_iter().flatten().collect();
    assert_eq!(recs.len(), 2, "separate keys");
    let frag = recs.iter().find(|r| r.fragment).expect("fragment record");
    assert_eq!(frag.client.packets, 2);
    assert!(frag.icmp.is_none());
    assert!(recs.iter().any(|r| !r.fragment));
}

#[test]
fn while_the_datapath_still_drops_new_flows_younger_ones_are_evicted() {
    let mut rig = small([10, 10, 10]);
    for i in 0..9 {
        rig.flow(IPPROTO_UDP, 1000 + i, [1, 0], T0);
    }
    rig.poll(T0 + S / 10);
    assert!(rig.poller.under_pressure());
    assert!(rig.poll(T0 + S / 5).is_empty(), "0.2 s old, no drops");
    rig.table().counters.insert("base_map_full".into(), 100);
    // Drops: the age halves to 0.5 s, still above 0.3 s.
    assert!(rig.poll(T0 + 3 * S / 10).is_empty());
    rig.table().counters.insert("base_map_full".into(), 200);
    // Drops again: 0.25 s, and the flows are 0.4 s old.
    assert_eq!(rig.poll(T0 + 4 * S / 10).len(), 4);
}

#[test]
fn during_an_episode_eviction_goes_on_below_the_threshold_down_to_the_target() {
    let mut rig = small([10, 10, 10]);
    for i in 0..9 {
        rig.flow(IPPROTO_UDP, 1000 + i, [1, 0], T0 + S);
    }
    rig.poll(T0 + S + S / 10);
    assert!(rig.poller.under_pressure());
    // Below the threshold (7 of 10) but over the target (5): the episode evicts.
    for k in rig.table().base.keys().copied().take(2).collect::<Vec<_>>() {
        rig.table().base.remove(&k);
    }
    assert_eq!(rig.poll(T0 + 2 * S + S / 10).len(), 2);
    assert_eq!(rig.table().entries(), [5, 0, 0]);
}
#[test]
fn flow_ids_are_pinned_so_they_survive_upgrades() {
    let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
    let (key, _) = flow_key(IPPROTO_TCP, (ip(1), 40000), (ip(2), 80), 7);
    let raw = |first_seen_ns| super::decode::RawFlow {
        key,
        base: types::flow_base {
            first_seen_ns,
            ..Default::default()
        },
        tcp: None,
        icmp: None,
        owner: [None, None],
    };
    assert_eq!(raw(T0).flow_id(), raw(T0).flow_id());
    assert_ne!(
        raw(T0).flow_id(),
        raw(T0 + 1).flow_id(),
        "a new flow on the same key"
    );
    // The hash (FNV-1a of key and first-seen time) must not change between versions.
    assert_eq!(raw(T0).flow_id(), PINNED);
}

const PINNED: u64 = 3_818_329_988_990_198_824;

/// Polls keep the interval while they are short; when many flows make them long they
/// are spaced to cost 1/40 of a core, at most half the shortest idle timeout apart; under
/// pressure they come every 100 ms, but at most half a core.
#[test]
fn polls_are_spaced_by_what_they_cost() {
    let mut rig = Rig::new();
    let at = |rig: &Rig, last_ms: u64| {
        rig.status
            .last_poll_ns
            .store(last_ms * 1_000_000, Ordering::Relaxed);
        rig.poller.next_interval()
    };
    assert_eq!(at(&rig, 10), Duration::from_secs(1));
    assert_eq!(at(&rig, 50), Duration::from_secs(2));
    assert_eq!(
        at(&rig, 1000),
        Duration::from_secs(5),
        "half of ICMP's 10 s"
    );
    for i in 0..900 {
        rig.flow(IPPROTO_UDP, i, [1, 0], T0);
    }
    rig.poll(T0 + S / 10);
    assert!(rig.poller.under_pressure());
    assert_eq!(at(&rig, 10), Duration::from_millis(100));
    assert_eq!(at(&rig, 300), Duration::from_millis(600));
}

/// Between spaced-out polls, the closed TCP flows are ended from the datapath's notes:
/// past the grace, and nothing else.
#[test]
fn a_pass_over_the_closing_notes_ends_closed_flows_only() {
    let mut rig = Rig::new();
    let fin = rig.flow(IPPROTO_TCP, 1000, [5, 5], T0 + 10 * S);
    rig.tcp_state(&fin, types::tcp_state::TCP_ST_CLOSED);
    let rst = rig.flow(IPPROTO_TCP, 1001, [5, 1], T0 + 11 * S);
    rig.tcp_state(&rst, types::tcp_state::TCP_ST_RESET);
    rig.flow(IPPROTO_UDP, 2000, [1, 1], T0);
    rig.poller.poll_closing(T0 + 12 * S).expect("pass");
    let recs: Vec<FlowRecord> = rig.rx.try_iter().flatten().collect();
    assert_eq!(recs.len(), 1, "the reset is inside its grace");
    assert_eq!(recs[0].end_reason, EndReason::TcpFin);
    rig.poller.poll_closing(T0 + 14 * S).expect("pass");
    let recs: Vec<FlowRecord> = rig.rx.try_iter().flatten().collect();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].end_reason, EndReason::TcpRst);
    assert_eq!(
        rig.table().entries(),
        [1, 0, 0],
        "the idle UDP flow waits for a poll"
    );
}

#[test]
fn a_poll_hands_its_records_over_in_batches_without_spare_room() {
    let mut rig = Rig::new();
    let n = super::OUT_BATCH + 100;
    for i in 0..n {
        rig.flow(IPPROTO_UDP, 1000 + i as u16, [1, 0], T0);
    }
    rig.poller.poll_once(T0 + 1000 * S).expect("poll");
    let batches: Vec<Vec<FlowRecord>> = rig.rx.try_iter().collect();
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert_eq!(sizes, [super::OUT_BATCH, 100]);
    // The hub keeps a batch whole while the replay ring wants any of its records.
    assert!(batches.iter().all(|b| b.capacity() == b.len()));
    // A poll that ends nothing hands nothing over.
    rig.poller.poll_once(T0 + 1001 * S).expect("poll");
    assert!(rig.rx.try_recv().is_err());
}

/// The entry keeps the time of a flow's last record to 2^23 ns (rounded down) in 23 bits,
/// and the window it fell in exactly, also when rounding moved it into the window before;
/// the time reads back the same for ~19.5 h.
#[test]
fn the_time_of_a_flows_last_record_is_kept_to_8_ms_and_its_window_exactly() {
    use super::decode::report_time;
    use super::scan::{mark_reported, reported_window, window_of};
    let active = 60 * S;
    let mut b = types::flow_base {
        first_seen_ns: T0 + 12_345,
        ..Default::default()
    };
    assert_eq!(report_time(&b, T0 + S), None, "no record yet");
    // A record 1 ms into window 3: its rounded-down time may fall in window 2.
    for into in [0, 1_000, 1_000_000, 4_000_000, 30 * S] {
        let t = b.first_seen_ns + 3 * active + into;
        mark_reported(&mut b, t, active);
        assert_eq!(window_of(&b, t, active), 3);
        assert_eq!(
            reported_window(&b, t, active),
            3,
            "{into} ns into the window"
        );
        let rt = report_time(&b, t + 10 * S).expect("reported");
        assert!(rt <= t && t - rt < 1 << 23, "{rt} for {t}");
        for later in [0, 3600 * S, 19 * 3600 * S] {
            assert_eq!(report_time(&b, t + later), Some(rt));
            assert_eq!(reported_window(&b, t + later, active), 3);
        }
    }
}

/// ListFlows shows each flow with what no record has carried yet, over the window since
/// its last record: the counts of an active-timeout record are not shown again.
#[test]
fn a_snapshot_shows_each_flow_since_its_last_record() {
    use crate::record::snapshot::SnapshotSlot;
    let (tx, rx) = crossbeam_channel::unbounded();
    let slot = SnapshotSlot::new(Duration::from_secs(1));
    let mut p = Poller::new(
        MemTable::new([100; 3]),
        cfg(),
        tx,
        Arc::new(Status::new()),
        IfNames::default(),
    )
    .with_snapshots(slot.clone());
    let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
    let (key, _) = flow_key(IPPROTO_UDP, (ip(1), 5000), (ip(2), 53), 3);
    let base = types::flow_base {
        first_seen_ns: T0,
        last_seen_ns: T0 + 59 * S,
        packets: [10, 4],
        bytes: [1000, 400],
        ..Default::default()
    };
    let kb = p.table_mut().put(key, base, None, None);
    slot.want();
    p.poll_once(T0 + 30 * S).expect("poll");
    let before = slot.latest().flows[0].clone();
    assert_eq!(before.total_packets(), 14);
    assert_eq!(before.window_start, before.first_seen);
    p.poll_once(T0 + 60 * S).expect("poll");
    let active: Vec<FlowRecord> = rx.try_iter().flatten().collect();
    assert_eq!(active[0].total_packets(), 14);
    let b = p.table_mut().base_mut(&kb).expect("base");
    b.packets[0] += 2;
    b.last_seen_ns = T0 + 61 * S;
    p.poll_once(T0 + 62 * S).expect("poll");
    let after = slot.latest().flows[0].clone();
    assert_eq!(after.end_reason, EndReason::InProgress);
    assert_eq!(after.total_packets(), 2, "only what came since the record");
    assert_eq!(after.flow_id, active[0].flow_id);
    assert!(after.window_start > after.first_seen);
    assert!(
        after
            .window_start
            .duration_since(before.first_seen)
            .expect("later")
            > Duration::from_secs(59)
    );
}

/// A flow's local ends, taken at its first packet, ride on every record of it (active,
/// in progress, final), with the roles, and leave the owners' map with the flow; an
/// owner entry whose flow is gone is swept like an orphan extension.
#[test]
fn every_record_of_a_flow_carries_its_local_ends_and_they_leave_with_it() {
    use crate::record::snapshot::SnapshotSlot;
    let owner = |pid: u32, comm: &[u8]| {
        let mut o = types::flow_owner {
            cgroup_id: 0,
            pid,
            uid: 1000 + pid,
            ..Default::default()
        };
        o.comm[..comm.len()].copy_from_slice(comm);
        o
    };
    let slot = SnapshotSlot::new(Duration::from_secs(1));
    let mut rig = Rig::new();
    rig.poller = std::mem::replace(
        &mut rig.poller,
        Poller::new(
            MemTable::new([1; 3]),
            cfg(),
            crossbeam_channel::unbounded().0,
            Arc::new(Status::new()),
            IfNames::default(),
        ),
    )
    .with_snapshots(slot.clone());
    // Client (lo endpoint, 10.0.0.1) and server both local, as over loopback; a UDP flow
    // (no extension) gets an id for its owners.
    let k = rig.flow(IPPROTO_UDP, 1000, [10, 5], T0 + 59 * S);
    rig.table().put_owner(&k, 0, owner(11, b"curl"));
    rig.table().put_owner(&k, 1, owner(22, b"nginx"));
    let orphan = rig.flow(IPPROTO_UDP, 1001, [1, 0], T0 + 59 * S);
    rig.table().put_owner(&orphan, 1, owner(33, b"gone"));
    rig.table().base.remove(&orphan);
    let check = |r: &FlowRecord| {
        let c = r.client_process.as_deref().expect("client side");
        let s = r.server_process.as_deref().expect("server side");
        assert_eq!(
            (c.pid, c.comm.as_deref(), c.uid),
            (Some(11), Some("curl"), Some(1011))
        );
        assert_eq!((s.pid, s.comm.as_deref()), (Some(22), Some("nginx")));
        // No cgroup v2 hierarchy named here: no cgroup.
        assert_eq!(
            (c.cgroup_id, c.cgroup.as_deref(), c.unit.as_deref()),
            (None, None, None)
        );
    };
    slot.want();
    let active = rig.poll(T0 + 60 * S);
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].end_reason, EndReason::ActiveTimeout);
    check(&active[0]);
    rig.add(&k, [1, 0], T0 + 61 * S);
    rig.poll(T0 + 62 * S);
    let snap = slot.latest();
    assert_eq!(snap.flows.len(), 1);
    check(&snap.flows[0]);
    assert_eq!(
        rig.table().owner.len(),
        3,
        "the sweep runs every third poll"
    );
    let end = rig.poll(T0 + 90 * S);
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].end_reason, EndReason::IdleTimeout);
    check(&end[0]);
    // The flow's own left with it; the orphan was swept.
    assert!(rig.table().owner.is_empty(), "{:?}", rig.table().owner);
    assert_eq!(rig.status.orphans_removed.load(Ordering::Relaxed), 1);
}
