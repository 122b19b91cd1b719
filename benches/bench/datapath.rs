//! Datapath cost per packet under BPF_PROG_TEST_RUN: baselines (empty program, lookups,
//! clocks), the split maps per protocol, new-flow inserts, against the monolithic map, and
//! against a peer-like per-direction flow program on the same packets, interleaved.

use anyhow::{Context, Result};
use std::os::fd::{AsFd, AsRawFd};

use libbpf_rs::{MapCore, MapFlags, ProgramInput, ProgramMut};

use flowlens::kernel::bpf::bench_skel::BenchSkel;

use flowlens::kernel::datapath::{Admission, Capacities, Datapath};
use flowlens::kernel::packet::*;

use crate::common::{load_baselines, load_mono, load_peer, Table};

const REPEAT: u32 = 1_000_000;
const A: [u8; 4] = [10, 200, 0, 1];
const B: [u8; 4] = [10, 200, 0, 2];

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

/// Rounds of the flowlens / peer comparison: each a run of both, in turns.
const ROUNDS: usize = 21;

/// Makes `prog` the one `bench_turn` hands packets to.
fn turn_into(base: &BenchSkel<'static>, prog: &ProgramMut<'_>) -> Result<()> {
    let fd = prog.as_fd().as_raw_fd();
    base.maps
        .bench_next
        .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
        .context("bench_next")
}

/// What turning a frame around costs (`bench_turn` in front of the empty program, beyond
/// the empty program alone), in ns per packet.
fn turn_cost(base: &BenchSkel<'static>, frame: &[u8]) -> Result<f64> {
    turn_into(base, &base.progs.bench_empty)?;
    let turned = ns_per_run(&base.progs.bench_turn, frame, REPEAT / 10)?;
    Ok(turned - ns_per_run(&base.progs.bench_empty, frame, REPEAT / 10)?)
}

/// ns per packet of `frame` through `prog`, repeated in the kernel; with `turn`, turned
/// around before each run (a request, its answer, the next request...: `bench_turn` in
/// src/bpf/bench.bpf.c), less what turning costs.
fn per_packet(
    base: &BenchSkel<'static>,
    prog: &ProgramMut<'_>,
    frame: &[u8],
    turn: Option<f64>,
) -> Result<f64> {
    let Some(cost) = turn else {
        return ns_per_run(prog, frame, REPEAT / 10);
    };
    turn_into(base, prog)?;
    Ok(ns_per_run(&base.progs.bench_turn, frame, REPEAT / 10)? - cost)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A comparison case: the frames that open the flow, the measured frame, and whether it is
/// turned around each run.
type Case = (Vec<Vec<u8>>, Vec<u8>, bool);

/// A TCP conversation between A:port and B:80 (IPv4, or IPv6 between ula(1) and ula(2)),
/// established and answered once, so both programs see what they see mid-conversation.
struct Conversation {
    v6: bool,
    port: u16,
}

impl Conversation {
    fn frame(&self, from_a: bool, flags: u8, payload: &[u8]) -> Vec<u8> {
        let l4 = if from_a {
            tcp(self.port, 80, flags, payload)
        } else {
            tcp(80, self.port, flags, payload)
        };
        match (self.v6, from_a) {
            (false, true) => v4_frame(A, B, 6, 64, &l4),
            (false, false) => v4_frame(B, A, 6, 64, &l4),
            (true, true) => v6_frame(ula(1), ula(2), 6, 64, &l4),
            (true, false) => v6_frame(ula(2), ula(1), 6, 64, &l4),
        }
    }

    fn opening(&self) -> Vec<Vec<u8>> {
        vec![
            self.frame(true, TCP_SYN, &[]),
            self.frame(false, TCP_SYN | TCP_ACK, &[]),
            self.frame(true, TCP_ACK, &[]),
            self.frame(true, TCP_ACK | TCP_PSH, &[0u8; 100]),
            self.frame(false, TCP_ACK | TCP_PSH, &[0u8; 100]),
        ]
    }
}

/// The same packets through flowlens and the peer-like program (src/bpf/peer.bpf.c: per
/// packet, a fine clock read, one lookup of a per-direction key, counters, flags and
/// timestamps under the entry's lock, or an insert), in interleaved rounds.
fn against_peer(t: &mut Table, base: &BenchSkel<'static>) -> Result<()> {
    let flowlens = Datapath::load(Capacities::for_flows(1 << 18))?;
    let peer = load_peer(1 << 18)?;
    let conv = |v6, port| Conversation { v6, port };
    // (opening frames, the measured frame, turned around each run)
    let rr = |c: Conversation| {
        (
            c.opening(),
            c.frame(true, TCP_ACK | TCP_PSH, &[0u8; 100]),
            true,
        )
    };
    let one_way = |c: Conversation, payload: usize| {
        (
            c.opening(),
            c.frame(true, TCP_ACK, &vec![0u8; payload]),
            false,
        )
    };
    let icmp = (
        vec![v4_frame(A, B, 1, 64, &echo(8, 9, 1, &[0u8; 56]))],
        v4_frame(A, B, 1, 64, &echo(8, 9, 1, &[0u8; 56])),
        true,
    );
    let cases: Vec<(&str, Case)> = vec![
        (
            "TCP data 1400 B, one direction",
            one_way(conv(false, 41_000), 1400),
        ),
        ("TCP request/response 100 B", rr(conv(false, 41_001))),
        ("TCP6 request/response 100 B", rr(conv(true, 41_002))),
        ("TCP pure ACK", one_way(conv(false, 41_003), 0)),
        (
            "UDP 64 B",
            (
                vec![],
                v4_frame(A, B, 17, 64, &udp(41_004, 53, &[0u8; 64])),
                false,
            ),
        ),
        ("ICMP echo + reply", icmp),
    ];
    for (name, (opening, frame, turned)) in &cases {
        for f in opening.iter().chain([frame]) {
            ns_per_run(flowlens.ingress(), f, 1)?;
            ns_per_run(&peer.progs.peer_tc, f, 1)?;
        }
        let (mut ours, mut theirs, mut ratios, mut costs) = (vec![], vec![], vec![], vec![]);
        for round in 0..ROUNDS {
            let turn = if *turned {
                let c = turn_cost(base, frame)?;
                costs.push(c);
                Some(c)
            } else {
                None
            };
            let (a, b) = if round.is_multiple_of(2) {
                let a = per_packet(base, flowlens.ingress(), frame, turn)?;
                (a, per_packet(base, &peer.progs.peer_tc, frame, turn)?)
            } else {
                let b = per_packet(base, &peer.progs.peer_tc, frame, turn)?;
                (per_packet(base, flowlens.ingress(), frame, turn)?, b)
            };
            ours.push(a);
            theirs.push(b);
            ratios.push(a / b);
        }
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        t.add(
            "datapath",
            &format!("vs peer: {name}"),
            median(ratios),
            "ratio",
            format!(
                "flowlens {:.1} ns, peer {:.1} ns (medians of {ROUNDS} interleaved rounds; \
                 per-round ratios {lo:.2}-{hi:.2}){}",
                median(ours),
                median(theirs),
                if *turned {
                    format!(
                        ", turned around each run, less the {:.1} ns that costs",
                        median(costs)
                    )
                } else {
                    String::new()
                }
            ),
        );
    }
    // New flows: distinct keys for each round and program, one-run timings.
    let frame_udp = &v4_frame(A, B, 17, 64, &udp(41_005, 53, &[0u8; 64]));
    for tcp_flow in [true, false] {
        let (mut ours, mut theirs, mut ratios) = (vec![], vec![], vec![]);
        let n = 2_000u32;
        // one-run timings: less the one-run timer floor (the empty program's, run by run)
        let floor = || -> Result<f64> {
            let mut runs = Vec::with_capacity(2_000);
            for _ in 0..2_000 {
                runs.push(ns_per_run(&base.progs.bench_empty, frame_udp, 1)?);
            }
            Ok(median(runs))
        };
        let new_flows = |prog: &ProgramMut<'_>, first: u32, floor: f64| -> Result<f64> {
            let mut total = 0.0;
            for i in first..first + n {
                let src = [10, 202 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
                let l4 = if tcp_flow {
                    tcp(40_000, 443, TCP_SYN, &[])
                } else {
                    udp(40_000, 53, &[0u8; 32])
                };
                let proto = if tcp_flow { 6 } else { 17 };
                total += ns_per_run(prog, &v4_frame(src, B, proto, 64, &l4), 1)? - floor;
            }
            Ok(total / f64::from(n))
        };
        for round in 0..ROUNDS as u32 {
            let first = round * n;
            let f = floor()?;
            let a = new_flows(flowlens.ingress(), first, f)?;
            let b = new_flows(&peer.progs.peer_tc, first, f)?;
            ours.push(a);
            theirs.push(b);
            ratios.push(a / b);
        }
        t.add(
            "datapath",
            &format!("vs peer: new {} flow", if tcp_flow { "TCP" } else { "UDP" }),
            median(ratios),
            "ratio",
            format!(
                "flowlens {:.1} ns, peer {:.1} ns ({n} new keys a round, less the timer floor)",
                median(ours),
                median(theirs)
            ),
        );
    }
    Ok(())
}

/// ns per answered new flow: a request and its reply, `n` distinct flows, each packet a
/// kernel-timed run of its own (with admission the reply moves the flow to the base map).
fn answered(prog: &ProgramMut<'_>, n: u32) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..n {
        let src = [10, 202, (i >> 8) as u8, i as u8];
        let port = 40_000 + (i >> 16) as u16;
        total += ns_per_run(
            prog,
            &v4_frame(src, B, 17, 64, &udp(port, 53, &[0u8; 32])),
            1,
        )?;
        total += ns_per_run(
            prog,
            &v4_frame(B, src, 17, 64, &udp(53, port, &[0u8; 64])),
            1,
        )?;
    }
    Ok(total / f64::from(n))
}

/// Where a bench's flows go, and through which device.
struct Dest {
    addr: [u8; 4],
    port: u16,
    /// The device's own MAC as the destination (a packet for this host, not another
    /// station), or the frames' usual one.
    mac: Option<[u8; 6]>,
    /// The device the packets arrive on (0: loopback, BPF_PROG_TEST_RUN's default).
    ifindex: u32,
}

/// The packets of a new flow in the attribution bench, in order, each arriving (in) or
/// leaving (out) through the device.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// A local service answers a remote client: in, out (a SYN-ACK or a reply), and for
    /// TCP the client's final ACK, in.
    Served,
    /// A local client reaches a remote service: out, in, and for TCP its final ACK, out.
    Client,
    /// Received only (a one-way datagram stream, a forwarded flow): in, in.
    Received,
}

/// ns per new flow of shape `shape` between a remote client and `to`, the local end: each
/// packet a kernel-timed run of the ingress or egress program of `dp`, as it crosses the
/// device; clients' ports from `40_000 + 2 * salt`, so runs with different salts make
/// different flows. A packet that leaves carries the socket BPF_PROG_TEST_RUN gives every
/// packet: of this process's cgroup, with no owner noted on it.
fn exchange(
    dp: &Datapath,
    n: u32,
    is_tcp: bool,
    shape: Shape,
    to: &Dest,
    salt: u16,
) -> Result<f64> {
    // struct __sk_buff up to ifindex (offset 40), the rest zero.
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&to.ifindex.to_ne_bytes());
    let (syn, synack, ack) = (TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK);
    // (leaves, TCP flags) of each packet, the first one's sender the client
    let steps: &[(bool, u8)] = match (shape, is_tcp) {
        (Shape::Served, true) => &[(false, syn), (true, synack), (false, ack)],
        (Shape::Served, false) => &[(false, 0), (true, 0)],
        (Shape::Client, true) => &[(true, syn), (false, synack), (true, ack)],
        (Shape::Client, false) => &[(true, 0), (false, 0)],
        (Shape::Received, true) => &[(false, syn), (false, ack)],
        (Shape::Received, false) => &[(false, 0), (false, 0)],
    };
    let mut total = 0.0;
    for i in 0..n {
        let remote = [10, 201, (i >> 8) as u8, i as u8];
        let rport = 40_000 + 2 * salt + (i >> 16) as u16;
        for (k, &(out, flags)) in steps.iter().enumerate() {
            // The client's packets go client -> server; who the client is depends on the
            // shape: the remote end, or (Client) the local one.
            let from_client = match shape {
                Shape::Received => true,
                Shape::Served => k != 1,
                Shape::Client => k != 1,
            };
            let local_client = shape == Shape::Client;
            let from_local = from_client == local_client;
            let (src, sport, dst, dport) = if from_local {
                (to.addr, to.port, remote, rport)
            } else {
                (remote, rport, to.addr, to.port)
            };
            let l4 = if is_tcp {
                tcp(sport, dport, flags, &[])
            } else {
                udp(sport, dport, &[0u8; 32])
            };
            let mut frame = v4_frame(src, dst, if is_tcp { 6 } else { 17 }, 64, &l4);
            if let (Some(mac), false) = (to.mac, out) {
                frame[..6].copy_from_slice(&mac);
            }
            let input = ProgramInput {
                data_in: Some(&frame),
                context_in: (to.ifindex != 0).then_some(&mut ctx[..]),
                repeat: 1,
                ..Default::default()
            };
            let prog = if out { dp.egress() } else { dp.ingress() };
            let r = prog.test_run(input).context("BPF_PROG_TEST_RUN")?;
            total += r.duration.as_nanos() as f64;
        }
    }
    Ok(total / f64::from(n))
}

/// This process in a cgroup v2 cgroup of its own while it lives (the socket a test run
/// gives a packet is of the running task's cgroup, and the root's is nobody's), back in
/// the root's after.
struct InCgroup(std::path::PathBuf);

impl InCgroup {
    fn enter(root: &std::os::fd::OwnedFd) -> Result<InCgroup> {
        let dir = std::path::PathBuf::from(format!(
            "/proc/self/fd/{}/flowlens-bench-{}",
            root.as_raw_fd(),
            std::process::id()
        ));
        std::fs::create_dir(&dir).with_context(|| format!("{}", dir.display()))?;
        let me = InCgroup(dir);
        std::fs::write(me.0.join("cgroup.procs"), std::process::id().to_string())
            .context("joining the bench's cgroup")?;
        Ok(me)
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        if let Some(root) = self.0.parent() {
            let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

pub fn run(t: &mut Table) -> Result<()> {
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
    against_peer(t, &base)?;
    // Room for every flow below the admission gate (half the capacity): each new flow
    // goes straight in, as on a host that is not flooded.
    let split_new = Datapath::load(Capacities {
        flows: 8 * n,
        tcp: 2 * n,
        icmp: 1024,
        owner: 2 * n,
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
    // What an answered flow costs in all (with room: its first packet straight into the
    // base map, the reply an update), against the monolithic map's insert and update.
    let s = answered(split_new.ingress(), n / 2)?;
    let m = answered(&mono_new.progs.flowlens_ingress, n / 2)?;
    t.add(
        "datapath",
        "split: answered new flow, UDP request + reply",
        s,
        "ns/flow",
        format!("{} unique flows, two runs each", n / 2),
    );
    t.add(
        "datapath",
        "monolithic: answered new flow, UDP request + reply",
        m,
        "ns/flow",
        format!("split/mono x{:.2}", s / m),
    );
    admission(t)
}

/// ns per answered new flow: `n` flows from distinct clients, each a first packet (a UDP
/// request, a TCP SYN) and the packet that answers it (the reply, the handshake's final
/// ACK), each a kernel-timed run of its own; `salt` makes each call's flows new.
fn answered_new(prog: &ProgramMut<'_>, n: u32, is_tcp: bool, salt: u16) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..n {
        let src = [10, 203, (i >> 8) as u8, i as u8];
        let port = 20_000 + salt;
        let frames = if is_tcp {
            [
                v4_frame(src, B, 6, 64, &tcp(port, 443, TCP_SYN, &[])),
                v4_frame(src, B, 6, 64, &tcp(port, 443, TCP_ACK, &[])),
            ]
        } else {
            [
                v4_frame(src, B, 17, 64, &udp(port, 53, &[0u8; 32])),
                v4_frame(B, src, 17, 64, &udp(53, port, &[0u8; 64])),
            ]
        };
        for f in &frames {
            total += ns_per_run(prog, f, 1)?;
        }
    }
    Ok(total / f64::from(n))
}

/// What admission (src/bpf/probation.h) costs an answered new flow: the same flows through
/// the datapath loaded without it (every new flow straight into the base map, as before
/// issue 26), with the gate as the agent runs it while the base map has room (below half
/// its capacity: straight in), and under pressure (every new flow through probation, moved
/// by its answer). Rounds alternate the three; each figure is the median of its rounds,
/// less the one-run timer floor of its two runs.
fn admission(t: &mut Table) -> Result<()> {
    const ROUNDS: u16 = 11;
    let n = 10_000;
    let base = load_baselines()?;
    let udp4 = v4_frame(A, B, 17, 64, &udp(40_000, 53, &[0u8; 64]));
    // Room below the gate for every flow of every round.
    let caps = Capacities::for_flows(1 << 19);
    let modes = [
        ("no admission (before)", Admission::Never),
        ("admission with room (gated)", Admission::UnderPressure),
        ("admission under pressure (probation)", Admission::Always),
    ];
    let dps = modes
        .iter()
        .map(|&(_, a)| Datapath::load_admission(caps, a).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    for is_tcp in [false, true] {
        let proto = if is_tcp {
            "TCP SYN + final ACK"
        } else {
            "UDP request + reply"
        };
        let mut runs = vec![Vec::new(); modes.len()];
        for round in 0..ROUNDS {
            let mut floor = Vec::with_capacity(2_000);
            for _ in 0..2_000 {
                floor.push(ns_per_run(&base.progs.bench_empty, &udp4, 1)?);
            }
            let floor = 2.0 * median(floor);
            // the order turns each round, so no mode always runs first
            for k in 0..modes.len() {
                let i = (k + usize::from(round)) % modes.len();
                runs[i].push(answered_new(dps[i].ingress(), n, is_tcp, round)? - floor);
            }
        }
        let lo_hi = |r: &[f64], b: &[f64]| {
            let ratios: Vec<f64> = r.iter().zip(b).map(|(x, y)| x / y).collect();
            let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ratios.iter().copied().fold(0.0, f64::max);
            (lo, hi)
        };
        let before = median(runs[0].clone());
        for (i, (what, _)) in modes.iter().enumerate() {
            let v = median(runs[i].clone());
            let note = if i == 0 {
                format!("median of {ROUNDS} x {n}, less the timer floor")
            } else {
                let (lo, hi) = lo_hi(&runs[i], &runs[0]);
                format!(
                    "x{:.2} no admission (per-round ratios {lo:.2}-{hi:.2})",
                    v / before
                )
            };
            t.add(
                "datapath",
                &format!("answered new flow, {proto}, {what}"),
                v,
                "ns/flow",
                note,
            );
        }
    }
    let probation = dps[1].maps()?.probation.keys().count();
    t.add(
        "datapath",
        "flows in probation after the gated runs",
        probation as f64,
        "entries",
        format!("of {} flows, all below the gate", 2 * u32::from(ROUNDS) * n),
    );
    Ok(())
}

/// The namespace `attribution` measures in, deleted on drop.
struct Netns(&'static str);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", self.0]);
    }
}

fn sh(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("{args:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// What a new flow costs with the owner attribution (src/bpf/owner.h) against without
/// it, in a namespace of the bench's own that forwards, the packets crossing a veth: a
/// local service answering (its reply carries the socket), a local client (its first
/// packet does), and flows only received: for a wildcard-bound UDP socket and TCP
/// listener of this host (asked for at the second packet, looked up by the poller), for a
/// port nothing listens on, and for another host through this one to a port a local
/// socket listens on (refused by the poller as not this host's). Each "with" is set against "without" for the
/// same packets. Rounds alternate the cases, every other round in reverse order; each figure
/// is the median of its rounds.
pub fn attribution(t: &mut Table) -> Result<()> {
    use flowlens::kernel::cgroup::{open_root, Hierarchy};
    use std::os::fd::AsFd;
    const NS: &str = "flbown";
    const ROUNDS: u16 = 201;
    // Every flow stays below the gate (half the base map, 4 Mi): 5 attributed cases x 201
    // rounds x 2 protocols x 500 = 1,005,000, so none waits in probation. A round's
    // records (1,000 owners of 48 B, 1,500 requests of 72 B: 156 KB) stay below the ring's
    // wake-up mark (a quarter of 1 MiB), so the poller's side never runs while the
    // programs are timed: it reads the ring between rounds.
    let n = 500;
    let _ = sh(&["ip", "netns", "del", NS]);
    sh(&["ip", "netns", "add", NS])?;
    let _ns = Netns(NS);
    for cmd in [
        "ip link add flbo0 type veth peer name flbo1",
        "ip addr add 10.200.251.1/24 dev flbo0",
        "ip link set flbo0 up",
        "ip link set flbo1 up",
        "ip route add 10.202.0.0/16 via 10.200.251.2",
        "sysctl -qw net.ipv4.ip_forward=1",
    ] {
        let mut args = vec!["ip", "netns", "exec", NS];
        args.extend(cmd.split(' '));
        sh(&args)?;
    }
    // "5: flbo0@flbo1: <...> ... link/ether 02:..:..:..:..:.. brd ...": this process's
    // /sys shows the host's devices, not the namespace's.
    let out = std::process::Command::new("ip")
        .args(["-n", NS, "-o", "link", "show", "flbo0"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ifindex: u32 = text.split(':').next().unwrap_or("").trim().parse()?;
    let mac_text = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .context("flbo0's MAC")?;
    let mut mac = [0u8; 6];
    for (m, h) in mac.iter_mut().zip(mac_text.split(':')) {
        *m = u8::from_str_radix(h, 16)?;
    }
    let rows = std::thread::spawn(move || -> Result<Vec<(String, f64, String)>> {
        let netns = std::fs::File::open(format!("/run/netns/{NS}"))?;
        // SAFETY: a valid netns fd; moves this thread only.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) } != 0
        {
            anyhow::bail!("setns: {}", std::io::Error::last_os_error());
        }
        let caps = Capacities::for_flows(1 << 22);
        let before = Datapath::load_without_attribution(caps)?;
        let mut after = Datapath::load(caps)?;
        after.attribution().map_err(|e| anyhow::anyhow!("{e}"))?;
        let root = open_root(Hierarchy::detect().mount())?;
        after.attach_owner_hook(root.as_fd())?;
        // Opened after the hook: they carry their owner, as a service's sockets do.
        let udp_sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let tcp_sock = std::net::TcpListener::bind("0.0.0.0:0")?;
        let (udp_port, tcp_port) = (udp_sock.local_addr()?.port(), tcp_sock.local_addr()?.port());
        let local = [10, 200, 251, 1];
        let far = [10, 202, 0, 9];
        // (what, attributed, shape, address, a socket listens on the port)
        let cases: [(&str, bool, Shape, [u8; 4], bool); 8] = [
            (
                "a local service answers, without",
                false,
                Shape::Served,
                local,
                true,
            ),
            (
                "a local service answers, attributed",
                true,
                Shape::Served,
                local,
                true,
            ),
            ("a local client, without", false, Shape::Client, local, true),
            (
                "a local client, attributed",
                true,
                Shape::Client,
                local,
                true,
            ),
            (
                "received only, without",
                false,
                Shape::Received,
                local,
                true,
            ),
            (
                "received only, to a local socket",
                true,
                Shape::Received,
                local,
                true,
            ),
            (
                "received only, to no socket",
                true,
                Shape::Received,
                local,
                false,
            ),
            (
                "received only, forwarded to a listening port",
                true,
                Shape::Received,
                far,
                true,
            ),
        ];
        // the "without" each case is set against
        let against = [0, 0, 2, 2, 4, 4, 4, 4];
        let _cg = InCgroup::enter(&root)?;
        // The poller's side of the owners' ring, draining it into flows_owner.
        let maps = after.maps()?;
        let owners = flowlens::poller::owners::OwnerSync::new(&maps)?;
        let mut rows = Vec::new();
        let mut synced = std::time::Duration::ZERO;
        for is_tcp in [false, true] {
            let proto = if is_tcp { "TCP" } else { "UDP" };
            let port = if is_tcp { tcp_port } else { udp_port };
            let mut runs = vec![Vec::new(); cases.len()];
            for round in 0..ROUNDS {
                // Every other round backwards: no case always runs after the same one.
                let order: Vec<usize> = if round % 2 == 0 {
                    (0..cases.len()).collect()
                } else {
                    (0..cases.len()).rev().collect()
                };
                for i in order {
                    let (_, with, shape, addr, listening) = cases[i];
                    let dp = if with { &after } else { &before };
                    let to = Dest {
                        addr,
                        port: if listening { port } else { port ^ 1 },
                        mac: Some(mac),
                        ifindex,
                    };
                    let salt = round * cases.len() as u16 + i as u16;
                    runs[i].push(exchange(dp, n, is_tcp, shape, &to, salt)?);
                }
                let t0 = std::time::Instant::now();
                owners.sync()?;
                synced += t0.elapsed();
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let runs: Vec<f64> = runs.into_iter().map(median).collect();
            for (i, (what, with, ..)) in cases.iter().enumerate() {
                rows.push((
                    format!("new flow, {proto}, {what}"),
                    runs[i],
                    if *with {
                        format!("x{:.2} without", runs[i] / runs[against[i]])
                    } else {
                        format!("median of {ROUNDS} x {n}, on a veth")
                    },
                ));
            }
        }
        owners.sync()?;
        let counters = maps.counters()?;
        let attributed =
            maps.owner.keys().count() as u64 + counters.get("owner_map_full").copied().unwrap_or(0);
        // Every owner taken (two thirds from a packet's socket, a third looked up by the
        // poller) and every request refused (a forwarded destination), in the poller.
        let taken = 3 * 2 * u32::from(ROUNDS) * n;
        let asked = 5 * 2 * u32::from(ROUNDS) * n;
        rows.push((
            "poller: reading the owners' ring into flows_owner".into(),
            synced.as_nanos() as f64 / f64::from(asked),
            format!(
                "ns per end sent ({asked}: {taken} owners, a third of them looked up here, and \
                 {} requests for no local socket or a forwarded flow)",
                asked - taken
            ),
        ));
        rows.push((
            "local ends attributed (flows_owner entries)".into(),
            attributed as f64,
            format!(
                "of {} flows with a local socket (in flows_owner or counted as lost to a \
                 full one; lost to a full ring: {})",
                3 * 2 * u32::from(ROUNDS) * n,
                counters.get("owner_ring_full").copied().unwrap_or(0)
            ),
        ));
        Ok(rows)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the attribution bench panicked"))??;
    for (what, v, note) in rows {
        let unit = if what.starts_with("local ends") {
            "entries"
        } else if what.starts_with("poller") {
            "ns/end"
        } else {
            "ns/flow"
        };
        t.add("datapath", &what, v, unit, note);
    }
    Ok(())
}
