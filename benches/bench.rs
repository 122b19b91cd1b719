//! `make bench`: datapath cost per packet, split vs monolithic maps (time and kernel memory),
//! poller drain rate, gRPC stream rate, IPFIX export rate, and real-traffic overhead, as ratios
//! measured in one run.

use std::io::Write;
use std::mem::MaybeUninit;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject, ProgramInput, ProgramMut};

use flowlens::agent::Agent;
use flowlens::attach::IfNames;
use flowlens::bpf::bench_skel::{BenchSkel, BenchSkelBuilder};
use flowlens::bpf::flow_mono_skel::{types as mono_types, FlowMonoSkel, FlowMonoSkelBuilder};
use flowlens::bpf::types;
use flowlens::config::Config;
use flowlens::datapath::{Capacities, Datapath, FlowMaps};
use flowlens::flow::{DirStats, EndReason, FlowRecord, Hook};
use flowlens::hub::{Hub, HubConfig, SinkKind};
use flowlens::packet::*;
use flowlens::poller::decode::{monotonic_ns, Clock, Counts, RawFlow, RecordMeta};
use flowlens::poller::{KernelTable, Poller, PollerConfig, ReadMode, OUT_BATCH, OUT_FIRST};
use flowlens::snapshot::SnapshotSlot;
use flowlens::status::Status;

const REPEAT: u32 = 1_000_000;
const A: [u8; 4] = [10, 200, 0, 1];
const B: [u8; 4] = [10, 200, 0, 2];

/// Rows of the final table: (section, measurement, value, unit, note).
struct Table(Vec<(String, String, f64, &'static str, String)>);

impl Table {
    fn add(&mut self, section: &str, what: &str, value: f64, unit: &'static str, note: String) {
        println!("  {section:<10} {what:<46} {value:>14.2} {unit:<10} {note}");
        self.0
            .push((section.into(), what.into(), value, unit, note));
    }
}

fn leak_storage() -> &'static mut MaybeUninit<OpenObject> {
    // Each skeleton borrows its storage for the life of the process.
    Box::leak(Box::new(MaybeUninit::uninit()))
}

fn load_mono(capacity: u32) -> Result<FlowMonoSkel<'static>> {
    let mut open = FlowMonoSkelBuilder::default()
        .open(leak_storage())
        .context("open mono")?;
    open.maps.flows.set_max_entries(capacity)?;
    open.maps.flows_naive.set_max_entries(capacity)?;
    open.load().context("load mono")
}

fn load_baselines() -> Result<BenchSkel<'static>> {
    let skel = BenchSkelBuilder::default()
        .open(leak_storage())?
        .load()
        .context("load baselines")?;
    skel.maps
        .bench_counts
        .update(&0u32.to_ne_bytes(), &0u64.to_ne_bytes(), MapFlags::ANY)?;
    skel.maps
        .bench_locked
        .update(&0u32.to_ne_bytes(), &[0u8; 24], MapFlags::ANY)?;
    skel.maps
        .bench_key44
        .update(&[0u8; 44], &0u64.to_ne_bytes(), MapFlags::ANY)?;
    Ok(skel)
}

/// Average ns per run of `prog` over `repeat` kernel-side repetitions.
fn ns_per_run(prog: &ProgramMut<'_>, frame: &[u8], repeat: u32) -> Result<f64> {
    let input = ProgramInput {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    };
    let out = prog.test_run(input).context("BPF_PROG_TEST_RUN")?;
    Ok(out.duration.as_nanos() as f64)
}

/// ns per packet for an existing flow: one run creates it, the rest update it.
fn existing(prog: &ProgramMut<'_>, frame: &[u8]) -> Result<f64> {
    ns_per_run(prog, frame, 1)?;
    ns_per_run(prog, frame, REPEAT)
}

/// ns per new-flow insert: `n` distinct flows, one kernel-timed run each.
fn inserts(prog: &ProgramMut<'_>, n: u32, is_tcp: bool) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..n {
        let src = [10, 201, (i >> 8) as u8, i as u8];
        let l4 = if is_tcp {
            tcp(40_000 + (i >> 16) as u16, 443, TCP_SYN, &[])
        } else {
            udp(40_000 + (i >> 16) as u16, 53, &[0u8; 32])
        };
        total += ns_per_run(
            prog,
            &v4_frame(src, B, if is_tcp { 6 } else { 17 }, 64, &l4),
            1,
        )?;
    }
    Ok(total / f64::from(n))
}

fn datapath(t: &mut Table) -> Result<()> {
    println!("datapath: BPF_PROG_TEST_RUN, {REPEAT} repetitions per case");
    let base = load_baselines()?;
    let split = Datapath::load(Capacities::default())?;
    let mono = load_mono(65_536)?;
    let udp4 = v4_frame(A, B, 17, 64, &udp(40_000, 53, &[0u8; 64]));
    let empty = existing(&base.progs.bench_empty, &udp4)?;
    let lookup = existing(&base.progs.bench_lookup_add, &udp4)?;
    t.add(
        "datapath",
        "baseline: empty passive program",
        empty,
        "ns/pkt",
        String::new(),
    );
    t.add(
        "datapath",
        "baseline: one hash lookup + atomic add",
        lookup,
        "ns/pkt",
        String::new(),
    );
    // How the base entry's two counters are kept exact across CPUs.
    let atomic2 = existing(&base.progs.bench_lookup_atomic2, &udp4)?;
    let locked = existing(&base.progs.bench_lookup_lock, &udp4)?;
    t.add(
        "datapath",
        "lookup + 2 atomic adds (chosen for the base)",
        atomic2,
        "ns/pkt",
        String::new(),
    );
    t.add(
        "datapath",
        "lookup + spin lock around 2 adds",
        locked,
        "ns/pkt",
        format!("x{:.2} the atomics", locked / atomic2),
    );
    // What the flow programs pay beyond it: a 44-byte key, and each clock.
    let mut timed_floor = f64::NAN;
    for (what, prog) in [
        (
            "lookup + add with a 44-byte key",
            &base.progs.bench_lookup_key44,
        ),
        ("empty + bpf_ktime_get_ns", &base.progs.bench_clock),
        (
            "key44 lookup + add + ktime_get_ns",
            &base.progs.bench_key44_clock,
        ),
        (
            "empty + bpf_ktime_get_coarse_ns",
            &base.progs.bench_clock_coarse,
        ),
    ] {
        let ns = existing(prog, &udp4)?;
        if std::ptr::eq(prog, &base.progs.bench_key44_clock) {
            timed_floor = ns;
        }
        t.add(
            "datapath",
            &format!("baseline: {what}"),
            ns,
            "ns/pkt",
            format!("x{:.2} empty, x{:.2} lookup", ns / empty, ns / lookup),
        );
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "TCP data, existing flow",
            v4_frame(
                A,
                B,
                6,
                64,
                &tcp(40_001, 80, TCP_ACK | TCP_PSH, &[0u8; 100]),
            ),
        ),
        ("UDP, existing flow", udp4.clone()),
        (
            "ICMP echo, existing flow",
            v4_frame(A, B, 1, 64, &echo(8, 7, 1, &[0u8; 56])),
        ),
        (
            "IPv6 UDP, existing flow",
            v6_frame(ula(1), ula(2), 17, 64, &udp(40_002, 53, &[0u8; 64])),
        ),
        (
            "IPv6 TCP data, existing flow",
            v6_frame(
                ula(1),
                ula(2),
                6,
                64,
                &tcp(40_003, 80, TCP_ACK, &[0u8; 100]),
            ),
        ),
    ];
    for (name, frame) in &cases {
        let ns = existing(split.ingress(), frame)?;
        // A TCP payload or echo packet starts or ends a latency/RTT sample: its floor
        // is the timed one.
        let timed = !name.contains("UDP");
        t.add(
            "datapath",
            &format!("split: {name}"),
            ns,
            "ns/pkt",
            format!(
                "x{:.2} empty, x{:.2} lookup{}",
                ns / empty,
                ns / lookup,
                if timed {
                    format!(", x{:.2} the timed floor", ns / timed_floor)
                } else {
                    String::new()
                }
            ),
        );
    }
    for (name, frame) in cases.iter().take(2) {
        let s = existing(split.ingress(), frame)?;
        let m = existing(&mono.progs.flowlens_ingress, frame)?;
        t.add(
            "datapath",
            &format!("monolithic: {name}"),
            m,
            "ns/pkt",
            format!("split/mono x{:.2}", s / m),
        );
    }
    let n = 100_000;
    let empty1 = {
        let mut s = 0.0;
        for _ in 0..10_000 {
            s += ns_per_run(&base.progs.bench_empty, &udp4, 1)?;
        }
        s / 10_000.0
    };
    t.add(
        "datapath",
        "baseline: empty program, single run",
        empty1,
        "ns/run",
        "timer floor of one-run timing".into(),
    );
    let split_new = Datapath::load(Capacities {
        flows: 2 * n,
        tcp: 2 * n,
        icmp: 1024,
    })?;
    let mono_new = load_mono(2 * n)?;
    for tcp_flow in [false, true] {
        let proto = if tcp_flow { "TCP SYN" } else { "UDP" };
        let s = inserts(split_new.ingress(), n, tcp_flow)?;
        let m = inserts(&mono_new.progs.flowlens_ingress, n, tcp_flow)?;
        t.add(
            "datapath",
            &format!("split: new-flow insert, {proto}"),
            s,
            "ns/pkt",
            format!("{n} unique keys, x{:.2} empty", s / empty1),
        );
        t.add(
            "datapath",
            &format!("monolithic: new-flow insert, {proto}"),
            m,
            "ns/pkt",
            format!("split/mono x{:.2}", s / m),
        );
    }
    Ok(())
}

/// A flow mix: percent of TCP, UDP and ICMP flows.
#[derive(Clone, Copy)]
struct Mix(u32, u32, u32);

impl Mix {
    const DEFAULT: Mix = Mix(40, 50, 10);

    fn proto(self, i: u32) -> u8 {
        match i % 100 {
            x if x < self.0 => 6,
            x if x < self.0 + self.1 => 17,
            _ => 1,
        }
    }

    fn ext(self, i: u32) -> u32 {
        match self.proto(i) {
            6 => types::flow_ext::EXT_TCP.0,
            1 => types::flow_ext::EXT_ICMP.0,
            _ => 0,
        }
    }

    fn label(self) -> String {
        format!("{}/{}/{}", self.0, self.1, self.2)
    }
}

fn key(i: u32, mix: Mix) -> types::flow_key {
    let mut k = types::flow_key::default();
    k.addr_lo[10] = 0xff;
    k.addr_lo[11] = 0xff;
    k.addr_lo[12..].copy_from_slice(&[10, 201, (i >> 8) as u8, i as u8]);
    k.addr_hi[10] = 0xff;
    k.addr_hi[11] = 0xff;
    k.addr_hi[12..].copy_from_slice(&[10, 200, 0, 2]);
    k.port_lo = (i >> 16) as u16;
    k.port_hi = 443;
    k.proto = mix.proto(i);
    k.ip_version = 4;
    k.ifindex = 1;
    k
}

fn bytes<T: plain::Plain>(v: &T) -> &[u8] {
    // SAFETY: Plain types have no invalid bit patterns or hidden invariants.
    unsafe { plain::as_bytes(v) }
}

/// Fills `map` with `n` entries in batches of 10,000.
fn fill(map: &MapHandle, n: u32, kv: impl Fn(u32) -> Option<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    let mut keys = Vec::new();
    let mut vals = Vec::new();
    let mut count = 0;
    for i in 0..n {
        if let Some((k, v)) = kv(i) {
            keys.extend_from_slice(&k);
            vals.extend_from_slice(&v);
            count += 1;
        }
        if count == 10_000 || (i == n - 1 && count > 0) {
            map.update_batch(&keys, &vals, count, MapFlags::ANY, MapFlags::ANY)?;
            keys.clear();
            vals.clear();
            count = 0;
        }
    }
    Ok(())
}

/// Fills the split maps as the datapath would: every flow a base entry, and
/// `sampled` percent of the TCP and ICMP flows (those with a latency or RTT
/// sample; 100 is the worst case) an extension entry under its id.
fn fill_split(maps: &FlowMaps, n: u32, mix: Mix, sampled: u32) -> Result<()> {
    fill(&maps.flows, n, |i| {
        let base = types::flow_base {
            packets: [10, 10],
            ext: mix.ext(i) as u8,
            ext_id: if mix.ext(i) == 0 { 0 } else { u64::from(i) + 1 },
            ..Default::default()
        };
        Some((bytes(&key(i, mix)).to_vec(), bytes(&base).to_vec()))
    })?;
    let ext_fill = |map: &MapHandle, want: u32, value: &[u8]| {
        fill(map, n, |i| {
            (mix.ext(i) == want && (i / 100) % 100 < sampled)
                .then(|| ((u64::from(i) + 1).to_ne_bytes().to_vec(), value.to_vec()))
        })
    };
    ext_fill(
        &maps.tcp,
        types::flow_ext::EXT_TCP.0,
        bytes(&types::flow_tcp::default()),
    )?;
    ext_fill(
        &maps.icmp,
        types::flow_ext::EXT_ICMP.0,
        bytes(&types::flow_icmp::default()),
    )
}

fn memlock(m: &MapHandle) -> Result<u64> {
    Ok(FlowMaps::memlock(m)?)
}

/// Unreclaimable slab memory (bytes, /proc/meminfo) and the objects in use
/// in each memory-cgroup-accounted kmalloc cache (/proc/slabinfo).
struct Slab {
    unreclaim: u64,
    objects: std::collections::BTreeMap<u32, u64>,
}

fn slab() -> Result<Slab> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("SUnreclaim:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("SUnreclaim in /proc/meminfo")?;
    let mut objects = std::collections::BTreeMap::new();
    for l in std::fs::read_to_string("/proc/slabinfo")?.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let Some(class) = f.first().and_then(|n| n.strip_prefix("kmalloc-cg-")) {
            if let (Ok(class), Some(Ok(active))) =
                (class.parse::<u32>(), f.get(1).map(|a| a.parse::<u64>()))
            {
                objects.insert(class, active);
            }
        }
    }
    Ok(Slab {
        unreclaim: kb * 1024,
        objects,
    })
}

/// Waits (up to 30 s) until freed maps have given their memory back to
/// within `slack` bytes of `level`: the kernel frees map elements after an
/// RCU grace period, and a free during the next fill would net against it.
fn settle(level: u64, slack: u64) -> Result<()> {
    for _ in 0..300 {
        if slab()?.unreclaim <= level + slack {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Real kernel memory one layout takes for `n` flows: slab growth per flow,
/// the kmalloc classes its objects landed in, and memlock per flow.
struct Cost {
    slab_per_flow: f64,
    classes: String,
    memlock_per_flow: f64,
}

/// Measures `fill_maps` (which creates, fills and returns its maps' memlock
/// before and after filling), keeping the maps alive until measured.
fn measure<T>(n: u32, fill_maps: impl FnOnce() -> Result<(T, u64, u64)>) -> Result<Cost> {
    // Maps freed earlier (another section's) may still be giving memory
    // back: wait for three quiet readings in a row (at most 30 s).
    let mut last = slab()?.unreclaim;
    let mut quiet = 0;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(300));
        let now = slab()?.unreclaim;
        quiet = if now.abs_diff(last) < (256 << 10) {
            quiet + 1
        } else {
            0
        };
        last = now;
        if quiet == 3 {
            break;
        }
    }
    let before = slab()?;
    let (keep, empty, full) = fill_maps()?;
    let after = slab()?;
    drop(keep);
    let grown = after.unreclaim.saturating_sub(before.unreclaim);
    settle(before.unreclaim, grown / 20)?;
    let classes = after
        .objects
        .iter()
        .filter_map(|(class, now)| {
            let grew = now.saturating_sub(*before.objects.get(class).unwrap_or(&0));
            (grew * 20 > u64::from(n))
                .then(|| format!("{class}: {:.2}/flow", grew as f64 / f64::from(n)))
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Cost {
        slab_per_flow: after.unreclaim.saturating_sub(before.unreclaim) as f64 / f64::from(n),
        classes,
        memlock_per_flow: full.saturating_sub(empty) as f64 / f64::from(n),
    })
}

fn split_cost(n: u32, mix: Mix, sampled: u32) -> Result<Cost> {
    measure(n, || {
        let dp = Datapath::load(Capacities {
            flows: n,
            tcp: (n / 100 * mix.0).max(1),
            icmp: (n / 100 * mix.2).max(1),
        })?;
        let maps = dp.maps()?;
        let total = |m: &FlowMaps| -> Result<u64> {
            Ok(memlock(&m.flows)? + memlock(&m.tcp)? + memlock(&m.icmp)?)
        };
        let empty = total(&maps)?;
        fill_split(&maps, n, mix, sampled)?;
        let full = total(&maps)?;
        Ok(((dp, maps), empty, full))
    })
}

/// One single map holding every flow: `naive` (base, TCP and ICMP fields in
/// every value) or best-packed (base plus the union of the extensions).
fn single_cost(n: u32, mix: Mix, naive: bool) -> Result<Cost> {
    measure(n, || {
        let mono = load_mono(n)?;
        let (map, value) = if naive {
            (
                MapHandle::try_from(&mono.maps.flows_naive)?,
                bytes(&mono_types::flow_naive::default()).to_vec(),
            )
        } else {
            (
                MapHandle::try_from(&mono.maps.flows)?,
                bytes(&mono_types::flow_packed::default()).to_vec(),
            )
        };
        let empty = memlock(&map)?;
        fill(&map, n, |i| {
            Some((bytes(&key(i, mix)).to_vec(), value.clone()))
        })?;
        let full = memlock(&map)?;
        Ok(((mono, map), empty, full))
    })
}

fn memory(t: &mut Table) -> Result<()> {
    println!(
        "kernel memory: slab growth (/proc/meminfo SUnreclaim) per flow while creating and filling the maps, \
         kmalloc-cg-* objects per flow (/proc/slabinfo), fdinfo memlock per flow"
    );
    for mix in [Mix::DEFAULT, Mix(20, 75, 5), Mix(70, 25, 5)] {
        for n in [100_000u32, 1_000_000] {
            let split = split_cost(n, mix, 100)?;
            let packed = single_cost(n, mix, false)?;
            let naive = single_cost(n, mix, true)?;
            let what = |layout: &str| format!("{layout}, {} mix, {n} flows", mix.label());
            for (layout, c) in [
                ("split, every TCP/ICMP flow sampled", &split),
                ("best-packed single", &packed),
                ("naive single", &naive),
            ] {
                t.add(
                    "memory",
                    &what(layout),
                    c.slab_per_flow,
                    "B/flow",
                    format!(
                        "memlock {:.1} B/flow; kmalloc-cg objects {}",
                        c.memlock_per_flow, c.classes
                    ),
                );
            }
            t.add(
                "memory",
                &what("split / best-packed single"),
                split.slab_per_flow / packed.slab_per_flow,
                "ratio",
                format!(
                    "split / naive x{:.2}; memlock split / best-packed x{:.2}",
                    split.slab_per_flow / naive.slab_per_flow,
                    split.memlock_per_flow / packed.memlock_per_flow
                ),
            );
            if mix.0 == Mix::DEFAULT.0 {
                let half = split_cost(n, mix, 50)?;
                t.add(
                    "memory",
                    &what("split, half the TCP/ICMP flows sampled"),
                    half.slab_per_flow,
                    "B/flow",
                    format!(
                        "x{:.2} best-packed single; kmalloc-cg objects {}",
                        half.slab_per_flow / packed.slab_per_flow,
                        half.classes
                    ),
                );
            }
        }
    }
    Ok(())
}

fn poller(t: &mut Table) -> Result<()> {
    println!("poller: read + join every flow (filled from userspace)");
    for n in [100_000u32, 1_000_000] {
        let dp = Datapath::load(Capacities {
            flows: n,
            tcp: n,
            icmp: n,
        })?;
        fill_split(&dp.maps()?, n, Mix::DEFAULT, 100)?;
        let mut rates = Vec::new();
        for mode in [ReadMode::Batch, ReadMode::KeyByKey] {
            let (tx, _rx) = crossbeam_channel::unbounded();
            let mut table = KernelTable::new(dp.maps()?);
            table.set_read_mode(mode);
            let mut p = Poller::new(
                table,
                PollerConfig::default(),
                tx,
                Arc::new(Status::new()),
                IfNames::default(),
            );
            let t0 = Instant::now();
            let flows = p.read_flows()?.flows;
            let secs = t0.elapsed().as_secs_f64();
            if flows.len() != n as usize {
                bail!("read {} of {n} flows", flows.len());
            }
            rates.push(f64::from(n) / secs);
        }
        t.add(
            "poller",
            &format!("batch read + join, {n} flows"),
            rates[0],
            "flows/s",
            format!("x{:.2} key-by-key", rates[0] / rates[1]),
        );
        t.add(
            "poller",
            &format!("key-by-key read + join, {n} flows"),
            rates[1],
            "flows/s",
            String::new(),
        );
        snapshot_cost(t, &dp, n)?;
    }
    Ok(())
}

/// What a poll costs while `top` or a ListFlows client asks for the flows in progress:
/// the same poll (nothing ends, nothing is emitted) without and with the snapshot.
fn snapshot_cost(t: &mut Table, dp: &Datapath, n: u32) -> Result<()> {
    let never = Duration::from_secs(1 << 30);
    let cfg = PollerConfig {
        idle_tcp: never,
        idle_udp: never,
        idle_icmp: never,
        idle_other: never,
        active_timeout: never,
        orphan_sweep_every: 0,
        ..PollerConfig::default()
    };
    let mut secs = Vec::new();
    for wanted in [false, true] {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let slot = SnapshotSlot::new(cfg.poll_interval);
        let mut p = Poller::new(
            KernelTable::new(dp.maps()?),
            cfg,
            tx,
            Arc::new(Status::new()),
            IfNames::default(),
        )
        .with_snapshots(slot.clone());
        const POLLS: u32 = 3;
        let t0 = Instant::now();
        for _ in 0..POLLS {
            if wanted {
                slot.want();
            }
            p.poll_once(monotonic_ns())?;
        }
        secs.push(t0.elapsed().as_secs_f64() / f64::from(POLLS));
        if wanted && slot.latest().flows.len() != n as usize {
            bail!(
                "the snapshot holds {} of {n} flows",
                slot.latest().flows.len()
            );
        }
    }
    t.add(
        "poller",
        &format!("poll with a ListFlows snapshot, {n} flows"),
        secs[1] * 1e3,
        "ms",
        format!("x{:.2} the same poll without", secs[1] / secs[0]),
    );
    Ok(())
}

/// Fills the split maps with `n` flows of the default mix last seen at `seen_ns`, every
/// TCP and ICMP flow with its extension entry (the poller's worst case).
fn fill_flows(maps: &FlowMaps, n: u32, seen_ns: u64) -> Result<()> {
    fill_flows_seen(maps, n, seen_ns, seen_ns)
}

/// Like `fill_flows`, first seen at `first_ns` and last seen at `last_ns`.
fn fill_flows_seen(maps: &FlowMaps, n: u32, first_ns: u64, last_ns: u64) -> Result<()> {
    let mix = Mix::DEFAULT;
    let id = |i: u32| u64::from(i) + 1;
    fill(&maps.flows, n, |i| {
        let base = types::flow_base {
            first_seen_ns: first_ns,
            last_seen_ns: last_ns,
            packets: [10, 10],
            ext: mix.ext(i) as u8,
            ext_id: if mix.ext(i) == 0 { 0 } else { id(i) },
            ..Default::default()
        };
        Some((bytes(&key(i, mix)).to_vec(), bytes(&base).to_vec()))
    })?;
    fill(&maps.tcp, n, |i| {
        (mix.ext(i) == types::flow_ext::EXT_TCP.0).then(|| {
            (
                id(i).to_ne_bytes().to_vec(),
                bytes(&types::flow_tcp::default()).to_vec(),
            )
        })
    })?;
    fill(&maps.icmp, n, |i| {
        (mix.ext(i) == types::flow_ext::EXT_ICMP.0).then(|| {
            (
                id(i).to_ne_bytes().to_vec(),
                bytes(&types::flow_icmp::default()).to_vec(),
            )
        })
    })
}

/// CPU seconds this process has used.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Issue 11's poller figures: agent CPU with 1 M live flows at default settings, read +
/// join against a bare batch walk of the same maps, and ending 100 k flows at once.
fn poller_cost(t: &mut Table) -> Result<()> {
    use flowlens::poller::table::read_all;
    println!("poller cost: 1 M live flows at default settings; ending 100 k flows at once");
    let n = 1_000_000u32;
    // Attached nowhere: the flows come from userspace, the cost is the poller's. The base
    // map is sized as an operator would for 1 M flows: below the pressure threshold (a
    // full map is a flood, with its own faster cadence).
    let agent = Agent::start(Config {
        interfaces: vec!["/^flowlens-bench-none$/".into()],
        capacities: Capacities {
            flows: 2 * n,
            tcp: n,
            icmp: n,
        },
        ..Config::embedded(&[])
    })?;
    let maps = agent.maps()?;
    // Live, not ending: last seen 40 s ahead, so no flow idles out during the window and
    // each poll finds every flow busy (the scan then checks its active-timeout window).
    let now = monotonic_ns();
    fill_flows_seen(&maps, n, now, now + 40_000_000_000)?;
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu_secs(), Instant::now());
    std::thread::sleep(Duration::from_secs(30));
    let cores = (cpu_secs() - c0) / t0.elapsed().as_secs_f64();
    t.add(
        "poller",
        "agent CPU, 1 M live flows, default 1 s poll",
        cores * 100.0,
        "% core",
        format!(
            "target <= 10 %; last poll {:.0} ms; agent RSS {:.0} MiB",
            agent.status().last_poll_ns.load(Ordering::Relaxed) as f64 / 1e6,
            rss_mib()
        ),
    );
    drop(agent);

    // Read + join against the bare batch walk of the same three maps.
    let dp = Datapath::load(Capacities {
        flows: n,
        tcp: n,
        icmp: n,
    })?;
    fill_flows(&dp.maps()?, n, monotonic_ns())?;
    let maps = dp.maps()?;
    let mut table = KernelTable::new(dp.maps()?);
    // Three rounds, each a bare walk then a read + join, as the poller reads again and
    // again: the median of the three ratios.
    let (mut ratios, mut rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t0 = Instant::now();
        // The same reads the poller makes: the base map under its entries' locks.
        let b: Vec<(types::flow_key, types::flow_base)> =
            read_all(&maps.flows, "flows", ReadMode::Batch, true)?;
        let tc: Vec<(u64, types::flow_tcp)> =
            read_all(&maps.tcp, "flows_tcp", ReadMode::Batch, false)?;
        let ic: Vec<(u64, types::flow_icmp)> =
            read_all(&maps.icmp, "flows_icmp", ReadMode::Batch, false)?;
        let bare = t0.elapsed().as_secs_f64();
        if tc.is_empty() || ic.is_empty() || b.len() != n as usize {
            bail!(
                "the bare walk read {} flows, {} TCP and {} ICMP extensions",
                b.len(),
                tc.len(),
                ic.len()
            );
        }
        drop((b, tc, ic));
        let t0 = Instant::now();
        let joined = flowlens::poller::FlowTable::read(&mut table)?;
        let full = t0.elapsed().as_secs_f64();
        ratios.push(full / bare);
        rates.push(joined.flows.len() as f64 / full / 1e6);
    }
    ratios.sort_by(f64::total_cmp);
    rates.sort_by(f64::total_cmp);
    t.add(
        "poller",
        "read + join vs bare batch walk, 1 M flows",
        ratios[1],
        "x",
        format!(
            "median of 3 ({:.2}-{:.2}); {:.2} M flows/s joined; target <= 1.3x",
            ratios[0], ratios[2], rates[1]
        ),
    );

    // One poll when nothing is due: the in-kernel scan alone.
    let (tx, _rx) = crossbeam_channel::unbounded();
    let mut p = Poller::new(
        KernelTable::new(dp.maps()?),
        PollerConfig {
            orphan_sweep_every: 0,
            // this map is full: no pressure episode (with its full reads) here
            pressure_threshold: 2.0,
            ..PollerConfig::default()
        },
        tx,
        Arc::new(Status::new()),
        IfNames::default(),
    );
    p.poll_once(monotonic_ns())?;
    let mut polls = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        p.poll_once(monotonic_ns())?;
        polls.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    polls.sort_by(f64::total_cmp);
    t.add(
        "poller",
        "one poll with nothing due (the scan), 1 M flows",
        polls[2],
        "ms",
        format!("median of 5; {:.0}-{:.0} ms", polls[0], polls[4]),
    );
    drop(p);
    drop(dp);

    // Ending 100 k flows at once: all idle, one poll.
    let m = 100_000u32;
    let dp = Datapath::load(Capacities {
        flows: m,
        tcp: m,
        icmp: m,
    })?;
    fill_flows(&dp.maps()?, m, 1)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut p = Poller::new(
        KernelTable::new(dp.maps()?),
        PollerConfig::default(),
        tx,
        Arc::new(Status::new()),
        IfNames::default(),
    );
    let (t0, c0) = (Instant::now(), cpu_secs());
    let st = p.poll_once(monotonic_ns())?;
    let secs = t0.elapsed().as_secs_f64();
    let cores = (cpu_secs() - c0) / secs;
    let emitted: usize = rx.try_iter().map(|b| b.len()).sum();
    if st.ended != m as usize || emitted != m as usize {
        bail!("ended {} of {m} flows, {emitted} records", st.ended);
    }
    t.add(
        "poller",
        "ending 100 k flows in one poll",
        f64::from(m) / secs,
        "flows/s",
        format!(
            "target >= 1 M flows/s; {} scan threads, {cores:.2} cores busy",
            PollerConfig::default().scan_threads
        ),
    );
    // The same without the records: one thread's scan passes alone (kernel ends + copy
    // out).
    fill_flows(&dp.maps()?, m, 1)?;
    let mut table = KernelTable::new(dp.maps()?);
    let args = flowlens::poller::scan::args(&PollerConfig::default(), monotonic_ns(), 0, false);
    let (t0, mut ended) = (Instant::now(), 0);
    loop {
        let pass = flowlens::poller::FlowTable::scan(&mut table, &args)?;
        ended += pass.flows.len();
        if !pass.truncated {
            break;
        }
    }
    let scan_secs = t0.elapsed().as_secs_f64();
    if ended != m as usize {
        bail!("the scan ended {ended} of {m} flows");
    }
    t.add(
        "poller",
        "ending 100 k flows: one thread's scan passes",
        f64::from(m) / scan_secs,
        "flows/s",
        format!("{:.0} % of the poll's time", scan_secs / secs * 100.0),
    );
    // The kernel's floor: its own batch delete of the same entries (100 k base keys, then
    // the TCP and ICMP extensions' ids), with nothing read, judged or copied.
    let floor = delete_floor(&dp.maps()?, m)?;
    t.add(
        "poller",
        "kernel floor: BPF_MAP_DELETE_BATCH of the same",
        f64::from(m) / floor,
        "flows/s",
        format!(
            "ending in one poll at x{:.2} of it, the scan alone x{:.2}",
            floor / secs,
            floor / scan_secs
        ),
    );
    Ok(())
}

/// Seconds the kernel takes to delete `m` flows of the default mix, filled afresh, with
/// its own batch delete.
fn delete_floor(maps: &FlowMaps, m: u32) -> Result<f64> {
    let mix = Mix::DEFAULT;
    let (mut keys, mut ids) = (Vec::new(), [Vec::new(), Vec::new()]);
    for i in 0..m {
        keys.extend_from_slice(bytes(&key(i, mix)));
        match mix.ext(i) {
            0 => {}
            e => ids[usize::from(e == types::flow_ext::EXT_ICMP.0)]
                .extend_from_slice(&(u64::from(i) + 1).to_ne_bytes()),
        }
    }
    fill_flows(maps, m, 1)?;
    let del = |map: &MapHandle, k: &[u8], size: usize| -> Result<()> {
        if !k.is_empty() {
            let n = (k.len() / size) as u32;
            map.delete_batch(k, n, MapFlags::ANY, MapFlags::ANY)
                .with_context(|| format!("deleting {n} entries"))?;
        }
        Ok(())
    };
    let t0 = Instant::now();
    del(&maps.flows, &keys, std::mem::size_of::<types::flow_key>())?;
    del(&maps.tcp, &ids[0], 8)?;
    del(&maps.icmp, &ids[1], 8)?;
    Ok(t0.elapsed().as_secs_f64())
}

fn record(i: u64) -> FlowRecord {
    let key = key(i as u32, Mix::DEFAULT);
    let raw = RawFlow {
        key,
        base: types::flow_base::default(),
        tcp: None,
        icmp: None,
    };
    let mut r = raw.to_record(
        RecordMeta {
            counts: Counts::default(),
            end_reason: EndReason::IdleTimeout,
            interface: "bench0".into(),
            observer: "bench".into(),
            window_start_ns: 0,
            flow_id: raw.flow_id(),
            continuation: false,
        },
        &Clock::new(),
    );
    r.client = DirStats {
        packets: i,
        bytes: i * 100,
        ttl: 64,
    };
    r.first_hook = Hook::Ingress;
    r
}

/// The bench's Subscribe client: it counts the records the server delivered without
/// decoding them, so on 2 vCPUs it is not the bottleneck of what it measures. It walks every
/// FlowBatch entry (one varint key and length per record), reads `seq` from the first and
/// last record of each batch, and fails unless every batch holds exactly the records
/// `first..=last` and follows the previous one without a gap.
mod counting {
    use bytes::Buf;
    use prost::encoding::decode_varint;
    use tonic::codec::{Codec, DecodeBuf, Decoder};
    use tonic::Status;

    use flowlens::api::proto::SubscribeRequest;

    /// One response: a batch's record count and its first and last seq, or a loss.
    #[derive(Debug, Default)]
    pub struct Counted {
        pub records: u64,
        pub first_seq: u64,
        pub last_seq: u64,
        pub lost: u64,
    }

    pub struct Counting;

    impl Codec for Counting {
        type Encode = SubscribeRequest;
        type Decode = Counted;
        type Encoder = tonic_prost::ProstEncoder<SubscribeRequest>;
        type Decoder = CountingDecoder;

        fn encoder(&mut self) -> Self::Encoder {
            tonic_prost::ProstEncoder::new(Default::default())
        }

        fn decoder(&mut self) -> Self::Decoder {
            CountingDecoder
        }
    }

    pub struct CountingDecoder;

    fn bad(what: &str) -> Status {
        Status::internal(format!("bench client: {what}"))
    }

    /// Splits one field off `buf`: its number, and its bytes (length-delimited) or value.
    fn field<'a>(buf: &mut &'a [u8]) -> Result<(u32, Option<&'a [u8]>, u64), Status> {
        let key = decode_varint(buf).map_err(|_| bad("key"))?;
        let tag = (key >> 3) as u32;
        let skip = |buf: &mut &'a [u8], n: usize| {
            if n > buf.len() {
                return Err(bad("truncated field"));
            }
            let (v, rest) = buf.split_at(n);
            *buf = rest;
            Ok(v)
        };
        match key & 7 {
            0 => Ok((tag, None, decode_varint(buf).map_err(|_| bad("varint"))?)),
            2 => {
                let len = decode_varint(buf).map_err(|_| bad("length"))? as usize;
                Ok((tag, Some(skip(buf, len)?), 0))
            }
            1 => skip(buf, 8).map(|_| (tag, None, 0)),
            5 => skip(buf, 4).map(|_| (tag, None, 0)),
            _ => Err(bad("wire type")),
        }
    }

    fn seq_of(mut rec: &[u8]) -> Result<u64, Status> {
        while !rec.is_empty() {
            if let (21, None, v) = field(&mut rec)? {
                return Ok(v);
            }
        }
        Err(bad("record without seq"))
    }

    fn count(mut msg: &[u8]) -> Result<Counted, Status> {
        let mut out = Counted::default();
        while !msg.is_empty() {
            match field(&mut msg)? {
                (1, Some(mut batch), _) => {
                    let (mut first, mut last) = (None, None);
                    while !batch.is_empty() {
                        let (_, rec, _) = field(&mut batch)?;
                        let rec = rec.ok_or_else(|| bad("record not a message"))?;
                        first.get_or_insert(rec);
                        last = Some(rec);
                        out.records += 1;
                    }
                    if let (Some(f), Some(l)) = (first, last) {
                        out.first_seq = seq_of(f)?;
                        out.last_seq = seq_of(l)?;
                    }
                }
                (2, Some(mut lost), _) => {
                    while !lost.is_empty() {
                        if let (1, None, v) = field(&mut lost)? {
                            out.lost += v;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    impl Decoder for CountingDecoder {
        type Item = Counted;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Counted>, Status> {
            let n = src.remaining();
            let chunk = src.chunk();
            if chunk.len() < n {
                return Err(bad("message not contiguous"));
            }
            let out = count(&chunk[..n])?;
            src.advance(n);
            Ok(Some(out))
        }
    }
}

/// Subscribes over its own connection and counts `want` records (see [`counting`]).
async fn count_stream(addr: String, want: u64) -> Result<u64> {
    use flowlens::api::proto::SubscribeRequest;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/flowlens.v1.FlowLens/Subscribe");
    let mut s = grpc
        .server_streaming(
            tonic::Request::new(SubscribeRequest::default()),
            path,
            counting::Counting,
        )
        .await?
        .into_inner();
    let (mut got, mut next_seq) = (0, 1);
    while got < want {
        let Some(m) = s.message().await? else { break };
        if m.lost > 0 {
            bail!("the subscriber lost {} records", m.lost);
        }
        if m.records == 0 {
            continue;
        }
        if m.first_seq != next_seq || m.last_seq + 1 - m.first_seq != m.records {
            bail!(
                "batch of {} records has seq {}..={}, expected to start at {next_seq}",
                m.records,
                m.first_seq,
                m.last_seq
            );
        }
        next_seq = m.last_seq + 1;
        got += m.records;
    }
    Ok(got)
}

/// A realistic record mix: 40 % TCP (flags, handshake, latency), 50 % UDP, 10 % ICMP echo.
fn mixed_record(i: u64) -> FlowRecord {
    use flowlens::flow::{IcmpInfo, Latency, TcpInfo, TcpState};
    let mut r = record(i);
    r.client_addr = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32 % 5000));
    r.server = DirStats {
        packets: i % 97,
        bytes: (i % 97) * 1400,
        ttl: 63,
    };
    let lat = Latency {
        count: 1 + (i % 50) as u32,
        sum_ns: 250_000 * (1 + i % 50),
        min_ns: 90_000,
        max_ns: 900_000,
        jitter_ns: Some(40_000),
    };
    match i % 10 {
        0..=3 => {
            r.protocol = 6;
            r.server_port = [443, 80, 22, 5432][(i % 4) as usize];
            r.tcp = Some(TcpInfo {
                client_flags: 0x1b,
                server_flags: 0x1b,
                state: TcpState::Closed,
                handshake_client_ns: Some(120_000 + (i % 1000) as u32),
                handshake_server_ns: Some(40_000),
                syn_retransmits: 0,
                late_start: false,
                client_latency: Some(lat),
                server_latency: Some(lat),
            });
        }
        4..=8 => {
            r.protocol = 17;
            r.server_port = 53;
        }
        _ => {
            r.protocol = 1;
            r.client_port = 0;
            r.server_port = 0;
            r.icmp = Some(IcmpInfo {
                client_type: Some(8),
                client_code: Some(0),
                server_type: Some(0),
                server_code: Some(0),
                echo_id: Some(i as u16),
                echo_rtt: Some(Latency {
                    jitter_ns: None,
                    ..lat
                }),
            });
        }
    }
    r
}

/// What gRPC compression saves on a batch of 1000 records of the realistic mix.
fn compression(t: &mut Table) -> Result<()> {
    use prost::Message;
    let batch = flowlens::api::proto::FlowBatch {
        records: (0..1000u64)
            .map(|i| flowlens::api::proto::FlowRecord::from(&mixed_record(i)))
            .collect(),
    }
    .encode_to_vec();
    let zstd = zstd::bulk::compress(&batch, 0)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&batch)?;
    let gzip = gz.finish()?;
    let per = |b: &[u8]| b.len() as f64 / 1000.0;
    t.add(
        "stream",
        "bytes/record, uncompressed",
        per(&batch),
        "B",
        "1000-record batch, 40/50/10 TCP/UDP/ICMP".into(),
    );
    t.add(
        "stream",
        "bytes/record, zstd (watch default)",
        per(&zstd),
        "B",
        format!("{:.2}x smaller", batch.len() as f64 / zstd.len() as f64),
    );
    t.add(
        "stream",
        "bytes/record, gzip",
        per(&gzip),
        "B",
        format!("{:.2}x smaller", batch.len() as f64 / gzip.len() as f64),
    );
    Ok(())
}

/// Issue 11 goal 2: records/s through the agent's own path (the fanout thread publishing
/// in chunks as it drains the poller's channel) and gRPC over loopback to 1 and 8
/// subscribers, each on its own connection, server and clients in this process.
fn stream(t: &mut Table) -> Result<()> {
    println!("stream: records through the hub's fanout thread and gRPC over loopback");
    let records: u64 = 500_000;
    let recs: Vec<FlowRecord> = (0..records).map(mixed_record).collect();
    let rt = tokio::runtime::Runtime::new()?;
    for subs in STREAM_SUBSCRIBERS {
        let hub = Hub::new(HubConfig {
            ring_capacity: 1000,
            subscriber_queue: records as usize,
            ..HubConfig::default()
        });
        let svc = flowlens::service::spawn("127.0.0.1:0", hub.clone(), Arc::new(Status::new()))?;
        let addr = svc.local_addr().context("listen address")?.to_string();
        let clients: Vec<_> = (0..subs)
            .map(|_| rt.spawn(count_stream(addr.clone(), records)))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let (tx, rx) = crossbeam_channel::unbounded();
        let (t0, c0) = (Instant::now(), cpu_secs());
        let fanout = hub.spawn_fanout(rx)?;
        // In the poller's batches, each made as the poller makes it, record by record.
        for chunk in recs.chunks(OUT_BATCH) {
            let mut batch = Vec::with_capacity(OUT_FIRST);
            batch.extend(chunk.iter().cloned());
            tx.send(batch)?;
        }
        // The poller goes, as when the agent stops: the hub closes after the last record
        // and every stream ends with it, so the last batch is sent at once instead of
        // after up to 100 ms of batching delay, which would be timed as if it were work.
        drop(tx);
        let mut total = 0;
        for c in clients {
            total += rt.block_on(c)??;
        }
        let secs = t0.elapsed().as_secs_f64();
        let cores = (cpu_secs() - c0) / secs;
        let _ = fanout.join();
        if total != records * subs as u64 {
            bail!(
                "{subs} subscribers got {total} of {}",
                records * subs as u64
            );
        }
        let each = records as f64 / secs;
        t.add(
            "stream",
            &format!("records/s per subscriber, {subs} subscriber(s)"),
            each,
            "rec/s",
            format!(
                "{records} records each; {:.0} rec/s delivered in all; {cores:.2} cores busy",
                each * subs as f64
            ),
        );
        svc.shutdown()?;
    }
    // The poller's side: publishing with and without a subscriber that never reads.
    let mut rates = Vec::new();
    for stalled in [false, true] {
        let hub = Hub::new(HubConfig {
            ring_capacity: 10_000,
            subscriber_queue: 4096,
            ..HubConfig::default()
        });
        let _enter = rt.enter();
        let _sub = stalled.then(|| hub.subscribe(Default::default()));
        let t0 = Instant::now();
        for r in &recs {
            hub.publish(r.clone());
        }
        rates.push(records as f64 / t0.elapsed().as_secs_f64());
    }
    t.add(
        "stream",
        "publish rate, no subscriber",
        rates[0],
        "rec/s",
        String::new(),
    );
    t.add(
        "stream",
        "publish rate, one stalled subscriber",
        rates[1],
        "rec/s",
        format!("x{:.2} of unstalled", rates[1] / rates[0]),
    );
    stream_encode(t, &recs)?;
    stream_idle_rss(t)
}

/// What encoding one record costs: through the prost message (Strings, `core::fmt` for the
/// addresses), as the server did before, and written straight from the record.
fn stream_encode(t: &mut Table, recs: &[FlowRecord]) -> Result<()> {
    use prost::Message;
    let (mut bytes_prost, mut bytes_direct) = (0usize, 0usize);
    let t0 = Instant::now();
    for (i, r) in recs.iter().enumerate() {
        let mut p = flowlens::api::proto::FlowRecord::from(r);
        p.seq = i as u64 + 1;
        bytes_prost += std::hint::black_box(p.encode_to_vec()).len();
    }
    let prost_ns = t0.elapsed().as_secs_f64() * 1e9 / recs.len() as f64;
    let mut buf = Vec::with_capacity(256);
    let t0 = Instant::now();
    for (i, r) in recs.iter().enumerate() {
        buf.clear();
        flowlens::record_encoding::encode_record(i as u64 + 1, r, &mut buf);
        bytes_direct += std::hint::black_box(&buf).len();
    }
    let direct_ns = t0.elapsed().as_secs_f64() * 1e9 / recs.len() as f64;
    if bytes_prost != bytes_direct {
        bail!("encodings differ in length: {bytes_prost} vs {bytes_direct} bytes");
    }
    t.add(
        "stream",
        "encode one record, via the prost message",
        prost_ns,
        "ns",
        String::new(),
    );
    t.add(
        "stream",
        "encode one record, straight from FlowRecord",
        direct_ns,
        "ns",
        format!("x{:.2} faster; same bytes", prost_ns / direct_ns),
    );
    Ok(())
}

/// Subscriber counts of the stream throughput figures.
const STREAM_SUBSCRIBERS: [usize; 2] = [1, 8];

/// Subscribers the idle-memory figure connects.
const IDLE_SUBSCRIBERS: usize = 1000;

/// `flowlens-bench stream-server`: the hub and gRPC service of an agent alone in a
/// process, so its RSS is the service's own. Prints its port, runs until stdin closes.
fn stream_server() -> Result<()> {
    let hub = Hub::new(HubConfig::default());
    let grpc = flowlens::config::GrpcConfig {
        max_subscribers: IDLE_SUBSCRIBERS,
        ..Default::default()
    };
    let svc = flowlens::service::spawn_with("127.0.0.1:0", &grpc, hub, Arc::new(Status::new()))?;
    println!("{}", svc.local_addr().context("listen address")?.port());
    std::io::stdout().flush()?;
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    svc.shutdown()
}

fn rss_mib_of(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .context("VmRSS of the stream server")
}

/// Issue 11 goal 3: the service's RSS with 1,000 connected idle subscribers (each on its
/// own connection, as 1,000 `watch` processes would be) against none, measured in a
/// child process that hosts only the hub and the gRPC service.
fn stream_idle_rss(t: &mut Table) -> Result<()> {
    use flowlens::api::proto::{flow_lens_client::FlowLensClient, GetStatusRequest};
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("stream-server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the stream server")?;
    let pid = child.id();
    let mut port = String::new();
    std::io::BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut port)?;
    let addr = format!("http://127.0.0.1:{}", port.trim());
    let rt = tokio::runtime::Runtime::new()?;
    let measured = rt.block_on(async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let none = rss_mib_of(pid)?;
        let mut streams = Vec::with_capacity(IDLE_SUBSCRIBERS);
        for _ in 0..IDLE_SUBSCRIBERS {
            let mut c = FlowLensClient::connect(addr.clone()).await?;
            streams.push(
                c.subscribe(flowlens::api::proto::SubscribeRequest::default())
                    .await?
                    .into_inner(),
            );
        }
        let status = FlowLensClient::connect(addr.clone())
            .await?
            .get_status(GetStatusRequest {})
            .await?
            .into_inner();
        if status.subscribers.len() != IDLE_SUBSCRIBERS {
            bail!(
                "{} of {IDLE_SUBSCRIBERS} subscribers connected",
                status.subscribers.len()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with = rss_mib_of(pid)?;
        drop(streams);
        anyhow::Ok((none, with))
    });
    drop(child.stdin.take());
    let _ = child.wait();
    let (none, with) = measured?;
    t.add(
        "stream",
        "service RSS, no subscriber",
        none,
        "MiB",
        "hub + gRPC service alone in a process".into(),
    );
    t.add(
        "stream",
        &format!("service RSS, {IDLE_SUBSCRIBERS} idle subscribers"),
        with,
        "MiB",
        format!(
            "{:.1} KiB per subscriber, each on its own connection",
            (with - none) * 1024.0 / IDLE_SUBSCRIBERS as f64
        ),
    );
    Ok(())
}

/// IPFIX: records encoded, and encoded + sent by the exporter thread to a local UDP sink;
/// what handing records to it costs the output thread at 100 k flows ended per second.
fn ipfix(t: &mut Table) -> Result<()> {
    use flowlens::ipfix::{self, encode::Encoder, Destination, IpfixConfig, IpfixStats};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    println!("ipfix: RFC 7011 encoding and UDP export (two data records per flow)");
    let n: u64 = 1_000_000;
    let recs: Vec<Arc<FlowRecord>> = (1..=n)
        .map(|i| {
            let mut r = record(i);
            r.server = r.client;
            Arc::new(r)
        })
        .collect();

    let mut enc = Encoder::new(0, 1400 - 28, None)?;
    let (mut bytes, mut msgs) = (0usize, 0u64);
    let t0 = Instant::now();
    for chunk in recs.chunks(4096) {
        enc.encode(chunk.iter().map(|r| &**r), 0, false, &mut |m| {
            bytes += m.bytes.len();
            msgs += 1;
        });
    }
    let encode_rate = n as f64 / t0.elapsed().as_secs_f64();
    t.add(
        "ipfix",
        "flow records encoded (no I/O)",
        encode_rate,
        "rec/s",
        format!(
            "{:.1} B/flow, {msgs} messages of <= 1372 B",
            bytes as f64 / n as f64
        ),
    );

    let sink = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sink.set_read_timeout(Some(Duration::from_millis(200)))?;
    let port = sink.local_addr()?.port();
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (got, stop) = (received.clone(), done.clone());
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(len) = sink.recv(&mut buf) {
                got.fetch_add(len as u64, Ordering::Relaxed);
            }
        }
    });
    let cfg = IpfixConfig {
        destination: format!("udp://127.0.0.1:{port}").parse::<Destination>()?,
        observation_domain: 0,
        mtu: ipfix::DEFAULT_MTU,
        template_refresh: Duration::from_secs(60),
        enterprise: None,
    };
    let stats = Arc::new(IpfixStats::default());
    let hub = Hub::new(HubConfig {
        sink_queue: n as usize,
        ..HubConfig::default()
    });
    let t0 = Instant::now();
    let exporter = ipfix::spawn(cfg, hub.add_sink(SinkKind::Export, "bench"), stats.clone())?;
    for chunk in recs.chunks(256) {
        hub.publish_all(chunk.iter().map(|r| (**r).clone()));
    }
    hub.close();
    exporter
        .join()
        .map_err(|_| anyhow::anyhow!("the exporter panicked"))?;
    let secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the sink reader panicked"))?;
    let s = stats.snapshot();
    if s.records_sent + s.records_lost != n {
        bail!(
            "exporter accounted for {} of {n} records",
            s.records_sent + s.records_lost
        );
    }
    let send_rate = s.records_sent as f64 / secs;
    t.add(
        "ipfix",
        "flow records published, encoded + sent over UDP (loopback)",
        send_rate,
        "rec/s",
        format!(
            "x{:.2} of encoding alone; {} messages, {:.1}% of bytes read by the sink",
            send_rate / encode_rate,
            s.messages_sent,
            100.0 * received.load(Ordering::Relaxed) as f64 / s.bytes_sent.max(1) as f64
        ),
    );

    // The fanout's share: publishing with an exporter's sink registered vs none.
    let plain: Vec<FlowRecord> = recs.iter().take(200_000).map(|r| (**r).clone()).collect();
    // Rounds alternate without and with, and each side keeps its fastest: the hand-off is
    // a few ns per record, under the noise of one round.
    let mut per_rec = [f64::MAX; 2];
    for _ in 0..5 {
        for (side, with_sink) in [false, true].into_iter().enumerate() {
            // The ring keeps every record on both sides, so neither frees any while timed.
            let hub = Hub::new(HubConfig {
                ring_capacity: plain.len(),
                sink_queue: plain.len(),
                ..HubConfig::default()
            });
            let _rx = with_sink.then(|| hub.add_sink(SinkKind::Export, "bench"));
            let t0 = Instant::now();
            for chunk in plain.chunks(256) {
                hub.publish_all(chunk.iter().cloned());
            }
            let ns = t0.elapsed().as_nanos() as f64 / plain.len() as f64;
            per_rec[side] = per_rec[side].min(ns);
        }
    }
    let handoff_ns = per_rec[1] - per_rec[0];
    t.add(
        "ipfix",
        "hand-off cost in the fanout per exporter",
        handoff_ns,
        "ns/rec",
        format!(
            "{:.2}% of a core at 100k flows/s; exporter thread {:.1}% of a core",
            handoff_ns * 100_000.0 / 1e7,
            100.0 * 100_000.0 / send_rate
        ),
    );
    Ok(())
}

fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("{args:?} failed");
    }
    Ok(())
}

fn iperf(ns: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iperf3", "-J"])
        .args(args)
        .output()
        .context("iperf3")?;
    serde_json::from_slice(&out.stdout).context("iperf3 JSON")
}

/// Two namespaces and a veth pair, deleted on drop.
struct Net(&'static str, &'static str);

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", self.0]);
        let _ = sh(&["ip", "netns", "del", self.1]);
    }
}

fn traffic(t: &mut Table) -> Result<()> {
    println!("real traffic: iperf3 between two namespaces, without and with flowlens on the veth");
    let net = Net("flbench-a", "flbench-b");
    sh(&["ip", "netns", "add", net.0])?;
    sh(&["ip", "netns", "add", net.1])?;
    sh(&[
        "ip", "link", "add", "flbA", "netns", net.0, "type", "veth", "peer", "name", "flbB",
        "netns", net.1,
    ])?;
    sh(&[
        "ip",
        "-n",
        net.0,
        "addr",
        "add",
        "10.200.250.1/24",
        "dev",
        "flbA",
    ])?;
    sh(&[
        "ip",
        "-n",
        net.1,
        "addr",
        "add",
        "10.200.250.2/24",
        "dev",
        "flbB",
    ])?;
    for (ns, i) in [(net.0, "flbA"), (net.1, "flbB")] {
        sh(&["ip", "-n", ns, "link", "set", i, "up"])?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    let mut server = Command::new("ip")
        .args(["netns", "exec", net.1, "iperf3", "-s", "-B", "10.200.250.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let run = || -> Result<(f64, f64)> {
        // Client and server each on a CPU of their own (`-A 0,1`): on 2 vCPUs, where the
        // scheduler puts them moves a run by more than the hook costs.
        let tcp = iperf(net.0, &["-c", "10.200.250.2", "-t", "3", "-A", "0,1"])?;
        let gbps = tcp["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9;
        let udp = iperf(
            net.0,
            &[
                "-c",
                "10.200.250.2",
                "-u",
                "-l",
                "64",
                "-b",
                "0",
                "-t",
                "3",
                "-A",
                "0,1",
            ],
        )?;
        let pps = udp["end"]["sum"]["packets"].as_f64().unwrap_or(0.0)
            / udp["end"]["sum"]["seconds"].as_f64().unwrap_or(1.0);
        Ok((gbps, pps))
    };
    // Rounds alternate without, with the hook alone (an empty program attached the same
    // way) and with flowlens, so a drift of the machine over the section (other jobs,
    // frequency) weighs on every side alike; each round gives its ratios.
    let mut rounds = Vec::new();
    let mut flows = 0;
    for _ in 0..TRAFFIC_ROUNDS {
        let without = run()?;
        let (stop, hook) = attach_empty(net.0, "flbA")?;
        let empty = run();
        drop(stop);
        hook.join()
            .map_err(|_| anyhow::anyhow!("hook thread panicked"))??;
        // The whole agent (datapath, attacher, poller, hub), as `flowlens run` wires it.
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let agent = in_netns(net.0, move || {
            let agent = Agent::start(Config::embedded(&["flbA"]))?;
            ready_tx.send(agent.maps()?)?;
            agent.run(&stop_rx)
        });
        let with = match ready_rx.recv() {
            Ok(maps) => {
                // Past its start (loading, attaching, the first poll): its steady state.
                std::thread::sleep(Duration::from_secs(1));
                let with = run();
                flows = flows.max(maps.flows.keys().count());
                with
            }
            Err(_) => Err(anyhow::anyhow!("the agent did not start")),
        };
        drop(stop_tx);
        agent
            .join()
            .map_err(|_| anyhow::anyhow!("agent thread panicked"))??;
        rounds.push([without, empty?, with?]);
    }
    let _ = server.kill();
    let _ = server.wait();
    let median_ratio = |pick: fn(&(f64, f64)) -> f64, of: usize, to: usize| {
        let mut ratios: Vec<f64> = rounds.iter().map(|r| pick(&r[of]) / pick(&r[to])).collect();
        let each = ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        ratios.sort_by(f64::total_cmp);
        (ratios[ratios.len() / 2], each)
    };
    let tcp: fn(&(f64, f64)) -> f64 = |r| r.0;
    let udp: fn(&(f64, f64)) -> f64 = |r| r.1;
    for (what, unit, pick) in [
        ("iperf3 TCP", "Gbit/s", tcp),
        ("iperf3 UDP 64 B", "pkt/s", udp),
    ] {
        for (i, side) in ["without flowlens", "an empty TC program", "with flowlens"]
            .iter()
            .enumerate()
        {
            let mean = rounds.iter().map(|r| pick(&r[i])).sum::<f64>() / rounds.len() as f64;
            t.add(
                "traffic",
                &format!("{what}, {side}"),
                mean,
                unit,
                format!("mean of {TRAFFIC_ROUNDS} rounds"),
            );
        }
        for (label, of, to) in [
            ("with / without flowlens", 2, 0),
            ("the hook alone: empty program / without", 1, 0),
            ("flowlens / empty program", 2, 1),
        ] {
            let (median, each) = median_ratio(pick, of, to);
            t.add(
                "traffic",
                &format!("{what}, {label}"),
                median,
                "ratio",
                format!("median of the rounds ({each}); {flows} flows in the map"),
            );
        }
    }
    Ok(())
}

/// Runs `f` on a thread of its own inside network namespace `ns`.
fn in_netns(
    ns: &str,
    f: impl FnOnce() -> Result<()> + Send + 'static,
) -> std::thread::JoinHandle<Result<()>> {
    let ns_path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<()> {
        let netns = std::fs::File::open(&ns_path)?;
        // SAFETY: valid netns fd; affects this thread only.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) } != 0
        {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        f()
    })
}

/// The hook's own cost: the bench's empty passive program attached by TCX to `iface`'s
/// ingress and egress in namespace `ns`, as flowlens attaches, until the sender is dropped.
fn attach_empty(
    ns: &str,
    iface: &str,
) -> Result<(
    crossbeam_channel::Sender<()>,
    std::thread::JoinHandle<Result<()>>,
)> {
    use flowlens::attach::{Attacher, Mode, ProgramFds, Selector};
    use std::os::fd::AsFd;
    let only = Selector::new(&[iface.to_owned()], &[])?;
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let hook = in_netns(ns, move || {
        let skel = load_baselines()?;
        let prog = skel.progs.bench_empty.as_fd();
        let progs = ProgramFds {
            ingress: prog.try_clone_to_owned()?,
            egress: prog.try_clone_to_owned()?,
        };
        // Detached when dropped, at the end of this thread.
        let mut attacher = Attacher::new(progs, Mode::Tcx, IfNames::default());
        let report = attacher.sync(&only)?;
        if report.attached.is_empty() {
            bail!("the empty program attached nowhere: {:?}", report.failed);
        }
        ready_tx.send(())?;
        let _ = stop_rx.recv();
        Ok(())
    });
    if ready_rx.recv().is_err() {
        return Err(hook
            .join()
            .map_err(|_| anyhow::anyhow!("hook thread panicked"))?
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("the empty program did not attach")));
    }
    Ok((stop_tx, hook))
}

/// Rounds of the traffic section, each 3 s of TCP and 3 s of UDP without, with the hook
/// alone, and with flowlens.
const TRAFFIC_ROUNDS: usize = 5;

type Section = fn(&mut Table) -> Result<()>;

fn main() -> Result<()> {
    let mut t = Table(Vec::new());
    let only: Vec<String> = std::env::args().skip(1).collect();
    if only.first().is_some_and(|a| a == "stream-server") {
        return stream_server();
    }
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let sections: [(&str, Section); 8] = [
        ("datapath", datapath),
        ("memory", memory),
        ("poller", poller),
        ("poller_cost", poller_cost),
        ("stream", stream),
        ("compression", compression),
        ("ipfix", ipfix),
        ("traffic", traffic),
    ];
    let wanted: Vec<(&str, Section)> = sections.into_iter().filter(|s| want(s.0)).collect();
    let mut rows = Vec::new();
    if let [(name, f)] = wanted[..] {
        f(&mut t).with_context(|| format!("benchmark section {name}"))?;
    } else {
        // Each section in a process of its own: one section's leftovers (a heap grown to
        // hundreds of MiB, kernel objects) moved the next one's figures by up to 2x.
        for (name, _) in wanted {
            wait_quiet();
            rows.extend(section_in_child(name)?);
        }
    }
    println!();
    println!("{TABLE_HEADER}");
    let mut out = std::io::stdout().lock();
    for (s, w, v, u, n) in &t.0 {
        writeln!(out, "{s:<10} {w:<46} {v:>14.2} {u:<10} {n}")?;
    }
    for row in rows {
        writeln!(out, "{row}")?;
    }
    Ok(())
}

const TABLE_HEADER: &str =
    "section    measurement                                             value unit       note";

/// Waits (at most 30 s) until the machine's CPUs are 90 % idle over half a second: the
/// kernel frees a section's maps (millions of entries) on its own threads after the section
/// ended, and the next section would be timed against that.
fn wait_quiet() {
    let busy_idle = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let idle = cpu.get(3)? + cpu.get(4)?;
        Some((cpu.iter().sum::<u64>() - idle, idle))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some((b0, i0)) = busy_idle() else { return };
        std::thread::sleep(Duration::from_millis(500));
        let Some((b1, i1)) = busy_idle() else { return };
        let (busy, idle) = (b1 - b0, i1 - i0);
        if busy * 9 <= idle {
            return;
        }
    }
}

/// Runs one section in a child process, passing its progress through; returns its table's
/// rows.
fn section_in_child(name: &str) -> Result<Vec<String>> {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe()?)
        .arg(name)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting benchmark section {name}"))?;
    let out = child.stdout.take().context("child stdout")?;
    let (mut rows, mut in_table) = (Vec::new(), false);
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        if in_table {
            rows.push(line);
        } else if line == TABLE_HEADER {
            in_table = true;
        } else {
            println!("{line}");
        }
    }
    if !child.wait()?.success() {
        bail!("benchmark section {name} failed");
    }
    Ok(rows)
}
