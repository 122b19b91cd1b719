//! Busy flows: the agent's CPU and RSS with 1 M flows that each send a packet a minute, so
//! that with the default 1 m active timeout every flow gets an active-timeout record a
//! minute (~16.7 k records/s), while they go on and after they end.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use flowlens::agent::Agent;
use flowlens::config::Config;
use flowlens::kernel::bpf::types;
use flowlens::kernel::datapath::Capacities;
use flowlens::kernel::packet::{echo, tcp, udp, v4_frame, TCP_ACK, TCP_PSH};
use flowlens::poller::PollerConfig;

use crate::common::{cpu_secs, rss_mib_of, Table};

/// Flows, and how often each sends a packet.
const FLOWS: u32 = 1_000_000;
const EVERY: Duration = Duration::from_secs(60);
/// Idle timeouts above the packet interval: the flows stay, each minute's packet makes
/// them busy, and the active timeout (the default, 1 m) reports them.
const IDLE: Duration = Duration::from_secs(75);
/// How long "during" is measured, once every flow has had its first active record due.
const DURING: Duration = Duration::from_secs(60);

/// CPU time (s) this thread has used.
fn thread_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The packet flow `i` sends: 40 % TCP data, 50 % UDP, 10 % ICMP echo requests, from a
/// source address of its own.
fn frame(i: u32) -> Vec<u8> {
    let src = [10, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
    let dst = [10, 200, 0, 2];
    match i % 10 {
        0..=3 => v4_frame(
            src,
            dst,
            6,
            64,
            &tcp(40_000, 443, TCP_ACK | TCP_PSH, &[0; 64]),
        ),
        4..=8 => v4_frame(src, dst, 17, 64, &udp(40_000, 53, &[0; 64])),
        _ => v4_frame(src, dst, 1, 64, &echo(8, 7, 1, &[0; 56])),
    }
}

/// Runs one packet through the agent's ingress program, as a NIC's would.
fn send(prog: &OwnedFd, frame: &[u8]) -> Result<()> {
    // SAFETY: all-zero is a valid __sk_buff, padding included.
    let mut ctx: types::__sk_buff = unsafe { std::mem::zeroed() };
    let mut opts = libbpf_sys::bpf_test_run_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _,
        data_in: frame.as_ptr().cast(),
        data_size_in: frame.len() as _,
        ctx_in: (&mut ctx as *mut types::__sk_buff).cast(),
        ctx_size_in: std::mem::size_of::<types::__sk_buff>() as _,
        ..Default::default()
    };
    // SAFETY: the frame and the context are valid for the sizes given; the kernel only
    // reads them (no output buffers are set).
    let ret = unsafe { libbpf_sys::bpf_prog_test_run_opts(prog.as_raw_fd(), &mut opts) };
    if ret < 0 {
        bail!(
            "BPF_PROG_TEST_RUN: {}",
            std::io::Error::from_raw_os_error(-ret)
        );
    }
    Ok(())
}

/// When flow `i` sends its packet of round `r`: its first at phase `i / FLOWS` of `EVERY`,
/// the next half a minute later, then one every minute. So from the second round on each
/// packet falls in the middle of an active-timeout window of its flow (counted from its
/// first packet): a packet a window, whatever the generator's lag.
fn due(round: u64, i: u32) -> Duration {
    let phase = EVERY.mul_f64(f64::from(i) / f64::from(FLOWS));
    match round {
        0 => phase,
        r => phase + EVERY / 2 + EVERY * (r - 1) as u32,
    }
}

/// Sends each flow's packets (see `due`) until `stop`; its own CPU time goes to `cpu_us`
/// (it is not the agent's).
fn traffic(prog: OwnedFd, stop: Arc<AtomicBool>, cpu_us: Arc<AtomicU64>) -> Result<u64> {
    let t0 = Instant::now();
    // The first packets, and those of the later rounds: two sequences in time order,
    // merged.
    let (mut first, mut later): (u32, u64) = (0, u64::from(FLOWS));
    let mut sent: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        // The packet due next, and when.
        let next = |n: u64| (n / u64::from(FLOWS), (n % u64::from(FLOWS)) as u32);
        let (round, i) = next(later);
        let take_first = first < FLOWS && due(0, first) <= due(round, i);
        let (at, i) = if take_first {
            (due(0, first), first)
        } else {
            (due(round, i), i)
        };
        let now = t0.elapsed();
        if at > now {
            cpu_us.store((thread_cpu_secs() * 1e6) as u64, Ordering::Relaxed);
            std::thread::sleep((at - now).min(Duration::from_millis(5)));
            continue;
        }
        send(&prog, &frame(i))?;
        if take_first {
            first += 1;
        } else {
            later += 1;
        }
        sent += 1;
    }
    cpu_us.store((thread_cpu_secs() * 1e6) as u64, Ordering::Relaxed);
    Ok(sent)
}

/// The agent's CPU (the process's, less the traffic thread's) and the records it emitted
/// over a stretch, with its RSS at the end (and the highest seen, sampled every second),
/// and the walks of the map its scans took.
struct Stretch {
    cores: f64,
    records_per_s: f64,
    rss_max: f64,
    rss_end: f64,
    walks_per_scan: f64,
}

fn measure(
    agent: &Agent,
    traffic_us: &AtomicU64,
    len: Duration,
    until: impl Fn(&Agent) -> bool,
) -> Stretch {
    let pid = std::process::id();
    let (t0, c0, g0) = (
        Instant::now(),
        cpu_secs(),
        traffic_us.load(Ordering::Relaxed),
    );
    let r0 = agent.status().records_emitted.load(Ordering::Relaxed);
    let scans = || {
        let s = agent.status();
        (
            s.scans.load(Ordering::Relaxed),
            s.scan_walks.load(Ordering::Relaxed),
        )
    };
    let (s0, w0) = scans();
    let mut rss_max: f64 = 0.0;
    while t0.elapsed() < len && !until(agent) {
        std::thread::sleep(Duration::from_secs(1));
        rss_max = rss_max.max(rss_mib_of(pid).unwrap_or(0.0));
    }
    let secs = t0.elapsed().as_secs_f64();
    let traffic = (traffic_us.load(Ordering::Relaxed) - g0) as f64 / 1e6;
    let records = agent.status().records_emitted.load(Ordering::Relaxed) - r0;
    let rss_end = rss_mib_of(pid).unwrap_or(0.0);
    let (s1, w1) = scans();
    Stretch {
        cores: (cpu_secs() - c0 - traffic) / secs,
        records_per_s: records as f64 / secs,
        rss_max: rss_max.max(rss_end),
        rss_end,
        walks_per_scan: (w1 - w0) as f64 / (s1 - s0).max(1) as f64,
    }
}

pub fn run(t: &mut Table) -> Result<()> {
    println!(
        "busy flows: {FLOWS} flows, a packet each every {EVERY:?} (default 1 m active timeout, idle timeouts {IDLE:?}); about 5 min"
    );
    // Attached nowhere: the packets come through BPF_PROG_TEST_RUN of its own ingress
    // program. The base map is sized as an operator would for 1 M flows (below the
    // pressure threshold).
    let agent = Agent::start(Config {
        interfaces: vec!["/^flowlens-bench-none$/".into()],
        capacities: Capacities {
            flows: 2 * FLOWS,
            tcp: FLOWS,
            icmp: FLOWS,
            owner: 2 * FLOWS,
        },
        poller: PollerConfig {
            idle_tcp: IDLE,
            idle_udp: IDLE,
            idle_icmp: IDLE,
            idle_other: IDLE,
            ..PollerConfig::default()
        },
        ..Config::embedded(&[])
    })?;
    let prog = agent
        .datapath()
        .ingress()
        .as_fd()
        .try_clone_to_owned()
        .context("the ingress program")?;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic_us = Arc::new(AtomicU64::new(0));
    let gen = {
        let (stop, cpu) = (stop.clone(), traffic_us.clone());
        std::thread::Builder::new()
            .name("bench-traffic".into())
            .spawn(move || traffic(prog, stop, cpu))?
    };
    // The first minute creates the flows, the second sends their second packets; from
    // then on each is due a record a minute.
    let settle = 2 * EVERY + Duration::from_secs(15);
    println!("  creating the flows ({settle:?})");
    std::thread::sleep(settle);
    let during = measure(&agent, &traffic_us, DURING, |_| false);
    stop.store(true, Ordering::Relaxed);
    let sent = gen.join().expect("traffic thread")?;
    // Every flow ends idle within IDLE of its last packet, plus a poll (polls of 1 M
    // flows are up to half the shortest idle timeout apart).
    let ending = measure(
        &agent,
        &traffic_us,
        IDLE + IDLE / 2 + Duration::from_secs(15),
        |a| a.status().active_flows.load(Ordering::Relaxed) == 0,
    );
    let left = agent.status().active_flows.load(Ordering::Relaxed);
    let after = measure(&agent, &traffic_us, Duration::from_secs(10), |_| false);
    let poll_ms = agent.status().last_poll_ns.load(Ordering::Relaxed) as f64 / 1e6;
    drop(agent);
    if left > 0 {
        bail!("{left} flows had not ended {IDLE:?} after the traffic stopped");
    }
    let note = |s: &Stretch, target: &str| {
        format!(
            "{target}; {:.1} k records/s; {:.2} walks/scan; RSS max {:.0} MiB",
            s.records_per_s / 1e3,
            s.walks_per_scan,
            s.rss_max
        )
    };
    t.add(
        "busy",
        "agent CPU, 1 M busy flows (a packet/min each)",
        during.cores * 100.0,
        "% core",
        note(&during, "target <= 5 %"),
    );
    t.add(
        "busy",
        "agent RSS, 1 M busy flows",
        during.rss_end,
        "MiB",
        format!("target <= 64 MiB; {sent} packets sent"),
    );
    t.add(
        "busy",
        "agent CPU while the 1 M flows end (idle)",
        ending.cores * 100.0,
        "% core",
        note(&ending, "target <= 5 %"),
    );
    t.add(
        "busy",
        "agent RSS after they all ended",
        after.rss_end,
        "MiB",
        format!(
            "target <= 64 MiB; CPU then {:.2} % core; last poll {poll_ms:.0} ms",
            after.cores * 100.0
        ),
    );
    Ok(())
}
