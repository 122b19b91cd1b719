//! Datapath cost per packet under BPF_PROG_TEST_RUN: baselines (empty program, lookups,
//! clocks), the split maps per protocol, new-flow inserts, against the monolithic map.

use anyhow::{Context, Result};
use libbpf_rs::{ProgramInput, ProgramMut};

use flowlens::kernel::datapath::{Capacities, Datapath};
use flowlens::kernel::packet::*;

use crate::common::{load_baselines, load_mono, Table};

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
    // What an answered flow costs in all (admission: its first packet into probation,
    // the reply moves it), against the monolithic map's insert and update.
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
    Ok(())
}
