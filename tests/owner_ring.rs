//! A flow's local owners go from the datapath through its ring (`owner_ring`) into
//! `flows_owner`, each end once, and a scan's records carry them whether the poller read
//! the ring before the scan or not (src/poller/owners.rs). The packets are hand-built
//! and run through the programs on loopback, to a UDP socket of this test on 127.0.0.1.

mod common;

use std::net::UdpSocket;
use std::os::fd::AsFd;

use common::{entries, flush_scan, Harness, Hook};
use flowlens::kernel::bpf::types;
use flowlens::kernel::cgroup::{open_root, Hierarchy};
use flowlens::kernel::datapath::Capacities;
use flowlens::kernel::packet::*;
use flowlens::poller::decode::{owner_key, owners_sent, RawFlow};
use flowlens::poller::owners::OwnerSync;
use flowlens::poller::scan::ScanKind;
use flowlens::poller::KernelTable;
use flowlens::record::flow::EndReason;

const LO: [u8; 4] = [127, 0, 0, 1];

/// Whether this process is in the cgroup v2 root (CI's machines boot cgroup v1, so every
/// process is): the socket a test run gives a packet then has no owner, and the counts
/// below are exact.
fn in_v2_root() -> bool {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .any(|l| l == "0::/")
}

/// A datapath of capacities `cap` noting the owners of sockets opened from now on, and a
/// UDP socket of this process on 127.0.0.1 opened after it.
fn setup(cap: Capacities) -> (Harness, UdpSocket, u16) {
    assert!(
        in_v2_root(),
        "these tests count owners exactly only from the cgroup v2 root, as on CI"
    );
    let mut h = Harness::with(cap);
    let root = open_root(Hierarchy::detect().mount()).expect("the cgroup v2 root");
    h.dp.attach_owner_hook(root.as_fd())
        .expect("the socket hook");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = sock.local_addr().expect("addr").port();
    (h, sock, port)
}

/// `n` datagrams from 127.0.0.1:`from` to the socket, as loopback carries them (egress
/// only). The socket BPF_PROG_TEST_RUN gives a packet is the kernel's, in the root
/// cgroup: the sender is nobody's.
fn send(h: &Harness, from: u16, port: u16, n: usize) {
    let d = v4_frame(LO, LO, 17, 64, &udp(from, port, b"x"));
    for _ in 0..n {
        h.run(Hook::Egress, &d);
    }
}

fn the_flow(h: &Harness, from: u16) -> RawFlow {
    h.joined()
        .into_iter()
        .find(|f| f.key.port_lo == from || f.key.port_hi == from)
        .expect("the flow")
}

/// Key endpoint of the socket's port: the key orders the ends by port (same address).
fn end_of(f: &RawFlow, port: u16) -> usize {
    usize::from(f.key.port_hi == port)
}

fn owners_in_map(h: &Harness) -> Vec<(u64, types::flow_owner)> {
    entries(&h.maps.owner)
}

fn assert_ours(o: &types::flow_owner) {
    assert_eq!(o.pid, std::process::id());
    let comm = std::fs::read_to_string("/proc/self/comm").expect("comm");
    let len = o.comm.iter().position(|&c| c == 0).unwrap_or(16);
    assert_eq!(std::str::from_utf8(&o.comm[..len]).unwrap(), comm.trim());
}

#[test]
fn a_receiver_is_looked_up_at_the_second_packet_once_and_reaches_records_either_way() {
    let (h, _sock, port) = setup(Capacities::default());
    let sync = OwnerSync::new(&h.maps).expect("owner ring");
    // One datagram: the receiver is not looked up yet.
    send(&h, 40_001, port, 1);
    let f = the_flow(&h, 40_001);
    assert_eq!(owners_sent(&f.base), 0);
    assert_eq!(f.base.ext_id, 0, "no extension, no owner yet: no id");
    // The second: looked up, sent; later ones send nothing more.
    send(&h, 40_001, port, 4);
    let f = the_flow(&h, 40_001);
    let end = end_of(&f, port);
    assert_eq!(owners_sent(&f.base), 1 << end, "the receiver's end only");
    assert_ne!(f.base.ext_id, 0, "given an id for its owner");
    assert!(
        owners_in_map(&h).is_empty(),
        "nothing is inserted on the packet path"
    );

    // A record that went out before the poller read the ring takes its owner from the
    // ring; an ended flow leaves nothing in the map.
    let mut batch = vec![(ScanKind::Ended(EndReason::IdleTimeout), f)];
    sync.complete(&mut batch).expect("complete");
    assert_ours(&batch[0].1.owner[end].expect("the owner, from the ring"));
    assert!(batch[0].1.owner[end ^ 1].is_none());
    sync.after_scan().expect("after scan");
    assert!(owners_in_map(&h).is_empty(), "{:?}", owners_in_map(&h));

    // The same for a flow in progress: its owner goes into the map for later records.
    send(&h, 40_002, port, 2);
    let f = the_flow(&h, 40_002);
    let mut batch = vec![(ScanKind::Active, f)];
    sync.complete(&mut batch).expect("complete");
    assert_ours(&batch[0].1.owner[end_of(&f, port)].expect("from the ring"));
    sync.after_scan().expect("after scan");
    let in_map = owners_in_map(&h);
    assert_eq!(in_map.len(), 1);
    assert_eq!(in_map[0].0, owner_key(f.base.ext_id, end_of(&f, port)));
    assert_ours(&in_map[0].1);

    // Read before the scan (the poller's usual order): the scan's own join carries it,
    // and ending the flows empties the map.
    send(&h, 40_003, port, 2);
    drop(sync);
    let mut table = KernelTable::new(h.dp.maps().expect("maps"));
    let ended = flush_scan(&mut table);
    assert_eq!(ended.len(), 3);
    for (_, f) in &ended {
        let from = if f.key.port_lo == port {
            f.key.port_hi
        } else {
            f.key.port_lo
        };
        if from == 40_001 {
            // its owner was handed to a record already: not kept anywhere
            continue;
        }
        assert_ours(&f.owner[end_of(f, port)].expect("joined by the scan"));
    }
    assert!(owners_in_map(&h).is_empty());
    let counters = h.maps.counters().expect("counters");
    assert_eq!(counters["owner_ring_full"], 0);
    assert_eq!(counters["owner_map_full"], 0);
}

#[test]
fn a_full_owner_map_is_counted_by_the_poller() {
    let (h, _sock, port) = setup(Capacities {
        owner: 1,
        ..Capacities::default()
    });
    for from in 41_000..41_003 {
        send(&h, from, port, 2);
    }
    let sync = OwnerSync::new(&h.maps).expect("owner ring");
    sync.sync().expect("sync");
    assert_eq!(owners_in_map(&h).len(), 1);
    assert_eq!(h.maps.counters().expect("counters")["owner_map_full"], 2);
}
