//! Datapath cost per packet under BPF_PROG_TEST_RUN: baselines (empty program, lookups,
//! clocks), the split maps per protocol, new-flow inserts, against the monolithic map.

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, ProgramInput, ProgramMut};

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
    let to = Dest {
        addr: B,
        port: if is_tcp { 443 } else { 53 },
        mac: None,
        ifindex: 0,
    };
    inserts_to(prog, n, is_tcp, &to, 0)
}

/// Where `inserts_to` sends its first packets, and through which device.
struct Dest {
    addr: [u8; 4],
    port: u16,
    /// The device's own MAC as the destination (a packet for this host, not another
    /// station), or the frames' usual one.
    mac: Option<[u8; 6]>,
    /// The device the packets arrive on (0: loopback, BPF_PROG_TEST_RUN's default).
    ifindex: u32,
}

/// `inserts` to `to`, the clients' ports from `40_000 + 2 * salt` so runs with different
/// salts make different flows.
fn inserts_to(prog: &ProgramMut<'_>, n: u32, is_tcp: bool, to: &Dest, salt: u16) -> Result<f64> {
    // struct __sk_buff up to ifindex (offset 40), the rest zero.
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&to.ifindex.to_ne_bytes());
    let mut total = 0.0;
    for i in 0..n {
        let src = [10, 201, (i >> 8) as u8, i as u8];
        let sport = 40_000 + 2 * salt + (i >> 16) as u16;
        let l4 = if is_tcp {
            tcp(sport, to.port, TCP_SYN, &[])
        } else {
            udp(sport, to.port, &[0u8; 32])
        };
        let mut frame = v4_frame(src, to.addr, if is_tcp { 6 } else { 17 }, 64, &l4);
        if let Some(mac) = to.mac {
            frame[..6].copy_from_slice(&mac);
        }
        let input = ProgramInput {
            data_in: Some(&frame),
            context_in: (to.ifindex != 0).then_some(&mut ctx[..]),
            repeat: 1,
            ..Default::default()
        };
        let out = prog.test_run(input).context("BPF_PROG_TEST_RUN")?;
        total += out.duration.as_nanos() as f64;
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
    attribution(t)
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
/// it, in a namespace of the bench's own that forwards (so the route check does the whole
/// lookup a router does): first packets arriving on a veth for a wildcard-bound UDP socket
/// and TCP listener of this host, for a port nothing listens on, and for another host
/// through this one to a port a local socket listens on. Rounds alternate the cases; each
/// figure is the median of its rounds.
fn attribution(t: &mut Table) -> Result<()> {
    use flowlens::kernel::cgroup::{open_root, Hierarchy};
    use std::os::fd::AsFd;
    const NS: &str = "flbown";
    const ROUNDS: u16 = 7;
    let n = 20_000;
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
        let caps = Capacities {
            flows: 1 << 20,
            tcp: 1 << 20,
            icmp: 1024,
            owner: 1 << 20,
        };
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
        let cases: [(&str, bool, [u8; 4], bool); 4] = [
            ("without attribution", false, local, true),
            ("attributed: a local socket", true, local, true),
            ("attributed: no socket on the port", true, local, false),
            (
                "attributed: forwarded, to a listening port",
                true,
                [10, 202, 0, 9],
                true,
            ),
        ];
        let mut rows = Vec::new();
        for is_tcp in [false, true] {
            let proto = if is_tcp { "TCP SYN" } else { "UDP" };
            let port = if is_tcp { tcp_port } else { udp_port };
            let mut runs = vec![Vec::new(); cases.len()];
            for round in 0..ROUNDS {
                for (i, &(_, with, addr, listening)) in cases.iter().enumerate() {
                    let dp = if with { &after } else { &before };
                    let to = Dest {
                        addr,
                        port: if listening { port } else { port ^ 1 },
                        mac: Some(mac),
                        ifindex,
                    };
                    let salt = round * cases.len() as u16 + i as u16;
                    runs[i].push(inserts_to(dp.ingress(), n, is_tcp, &to, salt)?);
                }
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let runs: Vec<f64> = runs.into_iter().map(median).collect();
            for (i, (what, ..)) in cases.iter().enumerate() {
                rows.push((
                    format!("new flow, {proto}, {what}"),
                    runs[i],
                    if i == 0 {
                        format!("median of {ROUNDS} x {n}, on a veth")
                    } else {
                        format!("x{:.2} without", runs[i] / runs[0])
                    },
                ));
            }
        }
        let attributed = after.maps()?.owner.keys().count();
        rows.push((
            "local ends attributed (flows_owner entries)".into(),
            attributed as f64,
            format!("of {} flows to a local socket", 2 * u32::from(ROUNDS) * n),
        ));
        Ok(rows)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the attribution bench panicked"))??;
    for (what, v, note) in rows {
        let unit = if what.starts_with("local ends") {
            "entries"
        } else {
            "ns/pkt"
        };
        t.add("datapath", &what, v, unit, note);
    }
    Ok(())
}
