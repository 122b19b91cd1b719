//! The poller against maps filled from userspace: batch reads, joins, orphan sweep, pressure.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::bytes_of;
use flowlens::kernel::attach::IfNames;
use flowlens::kernel::bpf::types;
use flowlens::kernel::datapath::{Capacities, Datapath, FlowMaps};
use flowlens::poller::decode::{meta, monotonic_ns, LO_TO_HI};
use flowlens::poller::scan::ScanKind;
use flowlens::poller::table::{collect_scan, read_all};
use flowlens::poller::{KernelTable, Poller, PollerConfig, ReadMode, OUT_BATCH};
use flowlens::record::flow::{EndReason, FlowRecord};
use flowlens::record::snapshot::SnapshotSlot;
use flowlens::status::Status;
use libbpf_rs::{MapCore, MapFlags};

fn key(i: u32, proto: u8) -> types::flow_key {
    let mut k = types::flow_key::default();
    k.addr_lo[10] = 0xff;
    k.addr_lo[11] = 0xff;
    k.addr_lo[12..].copy_from_slice(&[10, 200, 1, 1]);
    k.addr_hi[10] = 0xff;
    k.addr_hi[11] = 0xff;
    k.addr_hi[12..].copy_from_slice(&[10, 200, 1, 2]);
    k.port_lo = (i % 60_000) as u16 + 1;
    k.port_hi = (i / 60_000) as u16 + 1;
    k.proto = proto;
    k.ip_version = 4;
    k.ifindex = 1;
    k
}

fn put(maps: &FlowMaps, i: u32, proto: u8, last_seen_ns: u64) {
    let k = key(i, proto);
    let b = types::flow_base {
        first_seen_ns: last_seen_ns,
        last_seen_ns,
        packets: [u64::from(i), 1],
        bytes: [u64::from(i) * 100, 60],
        meta: meta::created(
            LO_TO_HI,
            false,
            if proto == 6 {
                types::flow_ext::EXT_TCP.0
            } else {
                0
            },
        ),
        ext_id: if proto == 6 { u64::from(i) + 1 } else { 0 },
        ..Default::default()
    };
    maps.flows
        .update(bytes_of(&k), bytes_of(&b), MapFlags::ANY)
        .expect("put base");
    if proto == 6 {
        let mut t = types::flow_tcp::default();
        t.lat[0].count = i;
        maps.tcp
            .update(&b.ext_id.to_ne_bytes(), bytes_of(&t), MapFlags::ANY)
            .expect("put tcp");
    }
}

fn poller(
    dp: &Datapath,
    cfg: PollerConfig,
) -> (
    Poller,
    crossbeam_channel::Receiver<Vec<FlowRecord>>,
    Arc<Status>,
) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let status = Arc::new(Status::new());
    (
        Poller::new(
            KernelTable::new(dp.maps().expect("maps")),
            cfg,
            tx,
            status.clone(),
            IfNames::default(),
        ),
        rx,
        status,
    )
}

#[test]
fn batch_and_key_by_key_reads_agree_and_joins_are_right() {
    let dp = Datapath::load(Capacities::default()).expect("load");
    let maps = dp.maps().expect("maps");
    let now = monotonic_ns();
    for i in 0..5000 {
        put(&maps, i, if i % 2 == 0 { 6 } else { 17 }, now);
    }
    let batch: Vec<(types::flow_key, types::flow_base)> =
        read_all(&maps.flows, "flows", ReadMode::Batch, false).expect("batch");
    let single: Vec<(types::flow_key, types::flow_base)> =
        read_all(&maps.flows, "flows", ReadMode::KeyByKey, false).expect("single");
    assert_eq!(batch.len(), 5000);
    let mut a: Vec<Vec<u8>> = batch
        .iter()
        .map(|(k, v)| [bytes_of(k), bytes_of(v)].concat())
        .collect();
    let mut b: Vec<Vec<u8>> = single
        .iter()
        .map(|(k, v)| [bytes_of(k), bytes_of(v)].concat())
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let locked: Vec<(types::flow_key, types::flow_base)> =
        read_all(&maps.flows, "flows", ReadMode::Batch, true).expect("locked batch");
    assert_eq!(locked.len(), 5000);
    let tcp: Vec<(u64, types::flow_tcp)> =
        read_all(&maps.tcp, "flows_tcp", ReadMode::Batch, false).expect("batch");
    assert_eq!(tcp.len(), 2500);

    let (mut p, _, _) = poller(&dp, PollerConfig::default());
    let joined = p.read_flows().expect("read");
    let (flows, entries) = (joined.flows, joined.entries);
    assert!(joined.unjoined.is_empty());
    assert_eq!(entries, [5000, 2500, 0]);
    for f in flows {
        assert_eq!(f.tcp.is_some(), f.key.proto == 6);
        if let Some(t) = f.tcp {
            assert_eq!(
                u64::from(t.lat[0].count),
                f.base.packets[0],
                "joined with its own extension"
            );
        }
    }
}

#[test]
fn idle_flows_end_and_leave_every_map() {
    let dp = Datapath::load(Capacities::default()).expect("load");
    let maps = dp.maps().expect("maps");
    let now = monotonic_ns();
    let old = now - 40_000_000_000;
    for i in 0..300 {
        put(
            &maps,
            i,
            if i % 3 == 0 { 6 } else { 17 },
            if i < 200 { old } else { now },
        );
    }
    let (mut p, rx, status) = poller(&dp, PollerConfig::default());
    let s = p.poll_once(now).expect("poll");
    assert_eq!((s.flows, s.ended), (300, 200));
    let recs: Vec<FlowRecord> = rx.try_iter().flatten().collect();
    assert_eq!(recs.len(), 200);
    assert!(recs.iter().all(|r| r.end_reason == EndReason::IdleTimeout));
    let left = [maps.flows.keys().count(), maps.tcp.keys().count()];
    assert_eq!(
        left,
        [100, 33],
        "only the 100 live flows (33 of them TCP) remain"
    );
    assert_eq!(status.snapshot().active_flows, 100);
    assert_eq!(p.flush().expect("flush"), 100);
    assert_eq!([maps.flows.keys().count(), maps.tcp.keys().count()], [0, 0]);
    assert!(rx
        .try_iter()
        .flatten()
        .all(|r| r.end_reason == EndReason::Shutdown));
}

#[test]
fn orphan_extension_entries_are_swept_and_counted() {
    let dp = Datapath::load(Capacities::default()).expect("load");
    let maps = dp.maps().expect("maps");
    let now = monotonic_ns();
    put(&maps, 1, 6, now);
    // extension entries with no base: what a crash between two deletes leaves
    // (ids no base entry holds)
    for i in 100..110u64 {
        maps.tcp
            .update(
                &(1_000_000 + i).to_ne_bytes(),
                bytes_of(&types::flow_tcp::default()),
                MapFlags::ANY,
            )
            .expect("orphan");
    }
    for i in 200..203u64 {
        maps.icmp
            .update(
                &(1_000_000 + i).to_ne_bytes(),
                bytes_of(&types::flow_icmp::default()),
                MapFlags::ANY,
            )
            .expect("orphan");
    }
    let (mut p, _rx, status) = poller(
        &dp,
        PollerConfig {
            orphan_sweep_every: 1,
            ..PollerConfig::default()
        },
    );
    let s = p.poll_once(now).expect("poll");
    assert_eq!(s.orphans_removed, 13);
    assert_eq!(status.snapshot().orphans_removed, 13);
    assert_eq!(
        maps.tcp.keys().count(),
        1,
        "the live flow keeps its extension"
    );
    assert_eq!(maps.icmp.keys().count(), 0);
}

#[test]
fn map_pressure_is_counted_once_per_crossing() {
    let dp = Datapath::load(Capacities {
        flows: 10,
        tcp: 10,
        icmp: 10,
        owner: 10,
    })
    .expect("load");
    let maps = dp.maps().expect("maps");
    let now = monotonic_ns();
    for i in 0..9 {
        put(&maps, i, 17, now);
    }
    let (mut p, _rx, status) = poller(&dp, PollerConfig::default());
    p.poll_once(now).expect("poll");
    p.poll_once(now).expect("poll");
    let snap = status.snapshot();
    assert_eq!(snap.map_pressure_events, 1);
    let flows = snap
        .maps
        .iter()
        .find(|m| m.name == "flows")
        .expect("flows usage");
    assert_eq!((flows.entries, flows.capacity), (9, 10));
    p.poll_once(now + Duration::from_secs(40).as_nanos() as u64)
        .expect("poll");
    for i in 0..9 {
        put(&maps, i, 17, now + 40_000_000_000);
    }
    p.poll_once(now + 40_000_000_000).expect("poll");
    assert_eq!(
        status.snapshot().map_pressure_events,
        2,
        "counted again after dropping below"
    );
}

/// ListFlows snapshots are built only while someone asks, show each flow with what no
/// record has carried yet (since its window start), and leave the records alone.
#[test]
fn snapshots_show_flows_since_their_last_record_only_while_wanted() {
    let dp = Datapath::load(Capacities::default()).expect("load");
    let maps = dp.maps().expect("maps");
    let now = monotonic_ns();
    for i in 1..=3 {
        put(&maps, i, if i == 1 { 6 } else { 17 }, now);
    }
    let cfg = PollerConfig {
        active_timeout: Duration::from_nanos(1),
        ..PollerConfig::default()
    };
    let slot = SnapshotSlot::new(cfg.poll_interval);
    let (p, rx, _) = poller(&dp, cfg);
    let mut p = p.with_snapshots(slot.clone());

    p.poll_once(now + 1).expect("poll");
    assert_eq!(slot.latest().generation, 0, "nobody asked: no snapshot");
    assert_eq!(
        rx.try_iter().flatten().count(),
        3,
        "active records as before"
    );

    slot.want();
    // Flow 2 had 2 + 1 packets, carried by its record; since then, 5 + 3 more.
    let mut b = types::flow_base::default();
    let k = key(2, 17);
    let v = maps
        .flows
        .lookup(bytes_of(&k), MapFlags::ANY)
        .expect("lookup")
        .expect("flow 2");
    plain::copy_from_bytes(&mut b, &v).expect("base");
    assert_eq!(
        (b.packets, b.bytes),
        ([0, 0], [0, 0]),
        "the record took them"
    );
    b.packets = [5, 3];
    b.bytes = [500, 180];
    b.last_seen_ns = now + 2;
    maps.flows
        .update(bytes_of(&k), bytes_of(&b), MapFlags::ANY)
        .expect("update");
    // The snapshot is read before the poll's scan: it shows the window the record closes.
    p.poll_once(now + 2).expect("poll");
    let snap = slot.latest();
    assert_eq!((snap.generation, snap.flows.len()), (1, 3));
    assert!(snap
        .flows
        .iter()
        .all(|r| r.end_reason == EndReason::InProgress));
    let two = snap
        .flows
        .iter()
        .find(|r| r.client.packets + r.server.packets == 8)
        .expect("flow 2 with what came since its record");
    assert_eq!(two.total_bytes(), 680);
    assert!(two.window_start >= two.first_seen, "since its record");
    // The other two show nothing new.
    assert_eq!(
        snap.flows.iter().filter(|r| r.total_packets() == 0).count(),
        2
    );
    // The active record of flow 2 holds the same: what is new since the first one.
    let active: Vec<FlowRecord> = rx.try_iter().flatten().collect();
    assert_eq!(active.len(), 1, "only flow 2 changed: {active:?}");
    assert_eq!(active[0].total_packets(), 8);
    assert_eq!(active[0].end_reason, EndReason::ActiveTimeout);
}

/// One case for the scan: a flow's protocol, times and TCP state, and whether it has an
/// extension entry.
struct Case {
    proto: u8,
    fragment: bool,
    first_s: u64,
    last_s: u64,
    /// When its last active-timeout record went out, if it had one.
    reported_s: Option<u64>,
    state: Option<types::tcp_state>,
    ext: bool,
    /// One packet, no answer (else a few each way).
    single: bool,
    /// Every packet already carried by a record: the entry counts nothing.
    nothing_new: bool,
}

/// The same flows in the kernel maps and in the in-memory table, under the same ids; the
/// datapath must outlive the kernel table's scans. Reported times are marked with 40 s
/// windows.
fn both(cases: &[Case], t0: u64) -> (Datapath, KernelTable, flowlens::poller::memory::MemTable) {
    use flowlens::poller::memory::MemTable;
    use flowlens::poller::scan::mark_reported;
    let dp = Datapath::load(Capacities::default()).expect("load");
    let maps = dp.maps().expect("maps");
    let mut mem = MemTable::new([65_536, 32_768, 8_192]);
    let s = 1_000_000_000u64;
    for (i, c) in cases.iter().enumerate() {
        let mut k = key(i as u32, c.proto);
        if c.fragment {
            k.flags = types::flow_key_flags::KEY_FRAGMENT.0 as u8;
        }
        let mut b = types::flow_base {
            first_seen_ns: t0 + c.first_s * s,
            last_seen_ns: t0 + c.last_s * s,
            packets: if c.nothing_new {
                [0, 0]
            } else if c.single {
                [1, 0]
            } else {
                [3, i as u64]
            },
            bytes: if c.nothing_new {
                [0, 0]
            } else if c.single {
                [60, 0]
            } else {
                [300, 100 * i as u64]
            },
            ..Default::default()
        };
        if let Some(r) = c.reported_s {
            mark_reported(&mut b, t0 + r * s, 40 * s);
        }
        if let Some(st) = c.state {
            b.l4.tcp.state = st.0 as u8;
        }
        let tcp = (c.ext && c.proto == 6).then(|| {
            let mut t = types::flow_tcp::default();
            t.lat[1].count = i as u32 + 7;
            t
        });
        let icmp = (c.ext && c.proto == 1).then(|| types::flow_icmp {
            rtt_count: i as u32 + 9,
            ..Default::default()
        });
        let kb = mem.put(k, b, tcp, icmp);
        let (_, b) = mem.base[&kb];
        maps.flows
            .update(&kb, bytes_of(&b), MapFlags::ANY)
            .expect("put base");
        if let Some(t) = tcp {
            maps.tcp
                .update(&b.ext_id.to_ne_bytes(), bytes_of(&t), MapFlags::ANY)
                .expect("put tcp");
        }
        if let Some(c) = icmp {
            maps.icmp
                .update(&b.ext_id.to_ne_bytes(), bytes_of(&c), MapFlags::ANY)
                .expect("put icmp");
        }
    }
    let kernel = KernelTable::new(dp.maps().expect("maps"));
    (dp, kernel, mem)
}

type Seen = Vec<(Vec<u8>, ScanKind, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>)>;

/// A scan's flows as comparable bytes, in key order.
fn seen(flows: Vec<(ScanKind, flowlens::poller::decode::RawFlow)>) -> Seen {
    let mut v: Seen = flows
        .into_iter()
        .map(|(kind, f)| {
            (
                bytes_of(&f.key).to_vec(),
                kind,
                bytes_of(&f.base).to_vec(),
                f.tcp.map(|t| bytes_of(&t).to_vec()),
                f.icmp.map(|c| bytes_of(&c).to_vec()),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The scan program and the in-memory table's scan (which the lifecycle unit tests pin
/// down) pick the same flows for the same reasons, hand out the same records and leave the
/// same entries behind (active flows less what their records carry, marked reported).
#[test]
fn the_kernel_scan_follows_the_same_rules_as_the_in_memory_one() {
    use flowlens::poller::scan::args;
    use types::tcp_state as St;
    let c = |proto, first_s, last_s, reported_s, state, ext| Case {
        proto,
        fragment: false,
        first_s,
        last_s,
        reported_s,
        state,
        ext,
        single: false,
        nothing_new: false,
    };
    // Polled at 50 s, the previous poll at 44 s; UDP idles out at 30 s, TCP at 60 s,
    // ICMP at 10 s, others at 40 s; windows of 40 s; TCP close grace 2 s.
    let cases = [
        c(17, 0, 10, None, None, false),  // UDP idle 40 s: ends
        c(17, 0, 45, None, None, false),  // busy, in window 1: active
        c(17, 0, 35, None, None, false),  // quiet since the last poll: left
        c(17, 0, 44, None, None, false),  // seen at the last poll: active
        c(17, 15, 49, None, None, false), // 35 s old, no window yet: left
        c(6, 0, 49, None, Some(St::TCP_ST_CLOSED), true), // closed 1 s ago: left for its FIN
        c(6, 0, 47, None, Some(St::TCP_ST_CLOSED), true), // closed 3 s ago: FIN
        c(6, 0, 47, None, Some(St::TCP_ST_RESET), false), // reset 3 s ago: RST
        c(6, 0, 43, None, Some(St::TCP_ST_ESTABLISHED), true), // quiet 7 s: left
        c(6, 0, 49, Some(41), Some(St::TCP_ST_ESTABLISHED), true), // window 1 reported: left
        c(6, 0, 49, Some(39), Some(St::TCP_ST_ESTABLISHED), true), // window 0 reported: active
        c(1, 0, 30, None, None, true),    // ICMP quiet 20 s: ends, RTT copied
        c(47, 0, 5, None, None, false),   // other protocol, idle 45 s: ends
        Case {
            fragment: true,
            ..c(17, 0, 12, None, None, false) // a fragment flow, idle 38 s: ends
        },
        Case {
            nothing_new: true,
            ..c(17, 0, 48, Some(10), None, false) // busy, but all reported already: left
        },
    ];
    let cfg = PollerConfig {
        idle_udp: Duration::from_secs(30),
        idle_tcp: Duration::from_secs(60),
        idle_other: Duration::from_secs(40),
        active_timeout: Duration::from_secs(40),
        ..PollerConfig::default()
    };
    let t0 = monotonic_ns();
    let s = 1_000_000_000u64;
    let (dp, mut kernel, mut mem) = both(&cases, t0);
    let a = args(&cfg, t0 + 50 * s, t0 + 44 * s, false);
    let ((k, ks), (m, ms)) = (
        collect_scan(&mut kernel, &a, 1).expect("kernel scan"),
        collect_scan(&mut mem, &a, 1).expect("memory scan"),
    );
    assert_eq!(ks.entries, ms.entries);
    let (k, m) = (seen(k), seen(m));
    assert_eq!(k, m);
    let kinds: Vec<ScanKind> = k.iter().map(|f| f.1).collect();
    let ended = |r| kinds.iter().filter(|k| **k == ScanKind::Ended(r)).count();
    assert_eq!(
        (
            ended(EndReason::IdleTimeout),
            ended(EndReason::TcpFin),
            ended(EndReason::TcpRst)
        ),
        (4, 1, 1)
    );
    assert_eq!(kinds.iter().filter(|k| **k == ScanKind::Active).count(), 3);
    assert_eq!(k.len(), 9, "the other six are left alone");
    // What is left, counts taken out and reports marked, is the same too.
    let maps = dp.maps().expect("maps");
    let mut left: Vec<(Vec<u8>, Vec<u8>)> =
        read_all::<types::flow_key, types::flow_base>(&maps.flows, "flows", ReadMode::Batch, true)
            .expect("read")
            .iter()
            .map(|(k, b)| (bytes_of(k).to_vec(), bytes_of(b).to_vec()))
            .collect();
    left.sort();
    let mut mem_left: Vec<(Vec<u8>, Vec<u8>)> = mem
        .base
        .values()
        .map(|(k, b)| (bytes_of(k).to_vec(), bytes_of(b).to_vec()))
        .collect();
    mem_left.sort();
    assert_eq!(left, mem_left);
    assert_eq!(
        [maps.tcp.keys().count(), maps.icmp.keys().count()],
        [mem.tcp.len(), mem.icmp.len()]
    );
    // A second scan at the same time finds nothing new; a flush ends the rest.
    assert!(collect_scan(&mut kernel, &a, 1)
        .expect("again")
        .0
        .is_empty());
    let flush = args(&cfg, t0 + 50 * s, t0 + 50 * s, true);
    let ((k, ks), (m, _)) = (
        collect_scan(&mut kernel, &flush, 1).expect("flush"),
        collect_scan(&mut mem, &flush, 1).expect("flush"),
    );
    assert_eq!(ks.entries, [0, 0, 0]);
    assert_eq!(seen(k), seen(m));
}

/// Records go to a ring the poller drains while the scan runs: a consumer slower than the
/// scan makes it stop at a full ring and go on once drained, and still every flow due ends
/// once, exactly.
#[test]
fn a_scan_whose_records_outrun_their_consumer_goes_on_and_ends_each_flow_once() {
    use flowlens::poller::scan::args;
    use flowlens::poller::FlowTable;
    let dp = Datapath::load(Capacities::default()).expect("load");
    let maps = dp.maps().expect("maps");
    // More than the ring holds (2 MiB of 232-byte records: ~9,000).
    let n = 20_000u32;
    for i in 0..n {
        put(&maps, i, if i % 3 == 0 { 6 } else { 17 }, 1);
    }
    let mut table = KernelTable::new(dp.maps().expect("maps"));
    let a = args(&PollerConfig::default(), monotonic_ns(), 0, false);
    let mut seen = std::collections::HashSet::new();
    let mut packets = 0;
    let done = table
        .scan(&a, 1, &mut |batch| {
            // A slow consumer: the scan fills the ring long before this drains it.
            std::thread::sleep(Duration::from_millis(5));
            for (kind, f) in batch {
                assert_eq!(kind, ScanKind::Ended(EndReason::IdleTimeout));
                assert!(
                    seen.insert(bytes_of(&f.key).to_vec()),
                    "one record per flow"
                );
                packets += f.base.packets[0] + f.base.packets[1];
            }
            Ok(())
        })
        .expect("scan");
    assert_eq!(seen.len(), n as usize);
    assert_eq!(packets, (0..u64::from(n)).map(|i| i + 1).sum::<u64>());
    assert_eq!(done.entries, [0, 0, 0]);
    assert!(done.passes > 1, "the ring filled: {done:?}");
}

/// A bulk end split among concurrent scans gives the same records as one scan does, each
/// flow once, and leaves the same flows in every map.
#[test]
fn a_bulk_end_split_among_threads_ends_what_one_thread_ends() {
    use flowlens::poller::scan::args;
    let now = monotonic_ns();
    let old = now - 40_000_000_000;
    // Three in four idle (well over the 4,096 ends that make a bulk end), a third TCP.
    let n = 20_000u32;
    let run = |threads: u32| {
        let dp = Datapath::load(Capacities::default()).expect("load");
        let maps = dp.maps().expect("maps");
        for i in 0..n {
            let proto = if i % 3 == 0 { 6 } else { 17 };
            put(&maps, i, proto, if i % 4 == 3 { now } else { old });
        }
        let mut table = KernelTable::new(dp.maps().expect("maps"));
        let a = args(&PollerConfig::default(), now, 0, false);
        let (flows, done) = collect_scan(&mut table, &a, threads).expect("scan");
        assert_eq!(done.split, threads > 1, "{done:?}");
        let mut recs: Vec<_> = flows
            .into_iter()
            .map(|(kind, f)| {
                (
                    f.key.proto,
                    f.key.port_lo,
                    f.key.port_hi,
                    f.base.packets[0] + f.base.packets[1],
                    f.base.bytes[0] + f.base.bytes[1],
                    kind == ScanKind::Ended(EndReason::IdleTimeout),
                )
            })
            .collect();
        recs.sort();
        let left = [maps.flows.keys().count(), maps.tcp.keys().count()];
        (done.entries, recs, left)
    };
    let (entries_one, recs_one, left_one) = run(1);
    let (entries_split, recs_split, left_split) = run(3);
    let idle = (0..n).filter(|i| i % 4 != 3).count();
    assert_eq!(recs_split.len(), idle);
    let mut keys: Vec<_> = recs_split.iter().map(|r| (r.0, r.1, r.2)).collect();
    keys.dedup();
    assert_eq!(keys.len(), idle, "each flow ends once");
    assert!(recs_split.iter().all(|r| r.5), "every end is an idle end");
    assert_eq!(recs_split, recs_one);
    let live = n as usize - idle;
    assert_eq!(left_split, left_one);
    let live_tcp = (0..n).filter(|i| i % 3 == 0 && i % 4 == 3).count();
    assert_eq!(left_split, [live, live_tcp]);
    assert_eq!(entries_one, entries_split);
    assert_eq!(entries_one[0], live as u64);
}

/// The poller hands a bulk end's records to the hub in batches of at most `OUT_BATCH`.
#[test]
fn a_poll_hands_a_bulk_end_over_in_batches() {
    let dp = Datapath::load(Capacities::default()).expect("load");
    let maps = dp.maps().expect("maps");
    for i in 0..5_000 {
        put(&maps, i, 17, 1);
    }
    let (mut p, rx, _) = poller(&dp, PollerConfig::default());
    let stats = p.poll_once(monotonic_ns()).expect("poll");
    assert_eq!(stats.ended, 5_000);
    let batches: Vec<Vec<FlowRecord>> = rx.try_iter().collect();
    assert!(
        batches
            .iter()
            .all(|b| !b.is_empty() && b.len() <= OUT_BATCH),
        "the poll hands its records over in batches of at most {OUT_BATCH}"
    );
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 5_000);
}

/// Eviction in the kernel scan follows the in-memory rules: only one-packet flows never
/// reported and quiet for the age, only while a map is over what it may keep, and only
/// flows that free an entry in a map that must give one up.
#[test]
fn the_kernel_scan_evicts_by_the_same_rules_as_the_in_memory_one() {
    use flowlens::poller::scan::args;
    let c = |proto, last_s, reported_s, ext| Case {
        proto,
        fragment: false,
        first_s: last_s,
        last_s,
        reported_s,
        state: None,
        ext,
        single: true,
        nothing_new: false,
    };
    let mut cases = vec![
        c(17, 8, Some(8), false), // reported once: kept
        c(17, 9, None, false),    // 1 s quiet: younger than the age, kept
        c(6, 5, None, true),      // holds a TCP extension entry
    ];
    cases.extend((0..6).map(|_| c(17, 5, None, false)));
    let t0 = monotonic_ns();
    let s = 1_000_000_000u64;
    let cfg = PollerConfig::default();
    let evicting = |keep: [u64; 3]| {
        let mut a = args(&cfg, t0 + 10 * s, t0 + 9 * s, false);
        a.evict_age_ns = 2 * s;
        a.evict_keep = keep;
        a
    };
    // Fresh maps each time, the kernel's and the memory table's results.
    let scan_both = |a: types::scan_args| {
        let (_dp, mut kernel, mut mem) = both(&cases, t0);
        (
            collect_scan(&mut kernel, &a, 1).expect("kernel scan"),
            collect_scan(&mut mem, &a, 1).expect("memory scan"),
        )
    };
    // Every candidate goes when the maps must give up more than there are.
    let ((k, ks), (m, ms)) = scan_both(evicting([0, 0, 0]));
    assert_eq!((ks.entries, ks.evict_left), (ms.entries, ms.evict_left));
    assert_eq!(
        ks.entries,
        [2, 0, 0],
        "only the reported and the young flow stay"
    );
    let (k, m) = (seen(k), seen(m));
    assert_eq!(k, m);
    assert!(k.iter().all(|f| f.1 == ScanKind::Ended(EndReason::Evicted)));
    // Only the TCP map over what it keeps: only the flow holding an entry there goes.
    let ((k, _), (m, _)) = scan_both(evicting([100, 0, 100]));
    assert_eq!(seen(k), seen(m));
    // The base map three over: three of the six plain candidates, whichever the map
    // order gives (kernel and memory orders differ), and no more.
    let (_dp, mut kernel, _) = both(&cases, t0);
    let (k, ks) = collect_scan(&mut kernel, &evicting([6, 100, 100]), 1).expect("scan");
    assert_eq!(k.len(), 3);
    assert_eq!((ks.entries[0], ks.evict_left), (6, [0, 0, 0]));
}

/// A TCP connection that idles past its timeout while a SYN flood of more than 100,000
/// one-packet flows comes and goes (ended idle and evicted, never remembered), and then
/// resumes (first with data from the server, whose higher port makes the datapath take
/// it for the client, then with its FIN), keeps its flow id, its roles and its handshake
/// on every record, across an agent restart too.
#[test]
fn a_connection_resumes_after_a_syn_flood_with_its_id_roles_and_handshake() {
    use common::{Harness, Hook};
    use flowlens::kernel::packet::{tcp, v4_frame, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN};
    use flowlens::record::flow::TcpState;
    const A: [u8; 4] = [10, 200, 0, 1];
    const B: [u8; 4] = [10, 200, 0, 2];
    // The server's port is the higher one: a mid-connection guess takes it for the client.
    let (cport, sport) = (3000, 50000);
    // Under pressure: every new flow waits in probation (below the gate the flood's first
    // 8,192 flows would go straight into the base map).
    let h = Harness::with_admission(
        Capacities {
            flows: 16_384,
            tcp: 8_192,
            icmp: 1_024,
            owner: 16_384,
        },
        flowlens::kernel::datapath::Admission::Always,
    );
    let c2s = |flags, payload: &[u8]| {
        h.run(
            Hook::Egress,
            &v4_frame(A, B, 6, 64, &tcp(cport, sport, flags, payload)),
        )
    };
    let s2c = |flags, payload: &[u8]| {
        h.run(
            Hook::Ingress,
            &v4_frame(B, A, 6, 64, &tcp(sport, cport, flags, payload)),
        )
    };
    c2s(TCP_SYN, &[]);
    std::thread::sleep(Duration::from_millis(2));
    s2c(TCP_SYN | TCP_ACK, &[]);
    c2s(TCP_ACK, &[]);
    c2s(TCP_ACK | TCP_PSH, b"request");
    s2c(TCP_ACK | TCP_PSH, b"response");
    let cfg = PollerConfig {
        idle_tcp: Duration::from_secs(2),
        ..PollerConfig::default()
    };
    let s = 1_000_000_000u64;
    // Polls at times of their own: the connection and each wave of the flood idle out.
    let mut at = monotonic_ns() + 3 * s;
    let (mut p, rx, _) = poller(&h.dp, cfg);
    p.poll_once(at).expect("poll");
    let first: Vec<FlowRecord> = rx.try_iter().flatten().collect();
    assert_eq!(first.len(), 1);
    let conn = first[0].clone();
    assert_eq!((conn.client_port, conn.server_port), (cport, sport));
    assert_eq!(
        h.maps.ended.keys().count(),
        1,
        "the connection is remembered"
    );

    // The flood: 126,000 SYNs from as many sources, in waves.
    let mut flood = Vec::new();
    for wave in 0..9u32 {
        for i in 0..14_000u32 {
            let n = wave * 14_000 + i;
            let src = [10, 201, (n >> 8) as u8, n as u8];
            h.run(
                Hook::Ingress,
                &v4_frame(
                    src,
                    B,
                    6,
                    64,
                    &tcp(1024 + (n >> 16) as u16, 80, TCP_SYN, &[]),
                ),
            );
        }
        let sent = monotonic_ns();
        for age in [3 * s / 2, 3 * s] {
            at = sent + age;
            p.poll_once(at).expect("poll");
            flood.extend(rx.try_iter().flatten().map(|r| r.end_reason));
        }
    }
    // The flood never reached the base map: each SYN waited in probation, where it
    // idled out (one record each) or the kernel evicted it (counted).
    assert_eq!(h.counter("base_map_full"), 0);
    assert!(flood.iter().all(|r| *r == EndReason::IdleTimeout));
    let evicted = h.counter("probation_new_tcp")
        - h.counter("probation_admitted_tcp")
        - h.counter("probation_ended_tcp");
    assert_eq!(
        h.counter("probation_admitted_tcp"),
        1,
        "the connection only"
    );
    assert_eq!(
        flood.len() as u64 + evicted,
        126_000,
        "every flood flow once"
    );
    assert_eq!(h.maps.ended.keys().count(), 1, "no flood flow remembered");

    // The agent restarts; then the connection resumes, the server first.
    drop(p);
    let (mut p, rx, _) = poller(&h.dp, cfg);
    s2c(TCP_ACK | TCP_PSH, b"late response");
    c2s(TCP_ACK, &[]);
    at += 2 * s;
    p.poll_once(at).expect("poll");
    let second: Vec<FlowRecord> = rx.try_iter().flatten().collect();
    assert_eq!(second.len(), 1, "{second:#?}");
    let r = &second[0];
    assert!(r.continuation);
    assert_eq!(r.flow_id, conn.flow_id);
    // The same first packet (another agent's clock may convert it a few ns apart).
    let apart = r
        .first_seen
        .duration_since(conn.first_seen)
        .unwrap_or_else(|e| e.duration());
    assert!(apart < Duration::from_millis(1), "{apart:?}");
    assert_eq!((r.client_addr, r.client_port), (conn.client_addr, cport));
    assert_eq!((r.client.packets, r.server.packets), (1, 1));
    let t = r.tcp.expect("tcp");
    let t0 = conn.tcp.expect("tcp");
    assert_eq!(
        (t.handshake_client_ns, t.handshake_server_ns),
        (t0.handshake_client_ns, t0.handshake_server_ns)
    );
    assert!(t.handshake_client_ns.is_some() && !t.late_start, "{t:?}");

    // Its FIN, after another idle gap, is the same connection still.
    c2s(TCP_FIN | TCP_ACK, &[]);
    at += 2 * s;
    p.poll_once(at).expect("poll");
    let third: Vec<FlowRecord> = rx.try_iter().flatten().collect();
    assert_eq!(third.len(), 1, "{third:#?}");
    let f = &third[0];
    assert!(f.continuation);
    assert_eq!(f.flow_id, conn.flow_id);
    assert_eq!((f.client_port, f.client.packets), (cport, 1));
    assert_eq!(f.tcp.expect("tcp").state, TcpState::FinWait);
    assert!(f.tcp.expect("tcp").handshake_server_ns.is_some());
}
