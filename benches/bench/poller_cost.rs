//! The poller's cost: agent CPU with 1 M live flows, read + join against a bare batch walk,
//! a poll with nothing due, and ending 100 k flows at once against the kernel's floor.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use flowlens::agent::Agent;
use flowlens::config::Config;
use flowlens::kernel::attach::IfNames;
use flowlens::kernel::bpf::types;
use flowlens::kernel::datapath::{Capacities, Datapath, FlowMaps};
use flowlens::poller::decode::{meta, monotonic_ns, LO_TO_HI};
use flowlens::poller::{KernelTable, Poller, PollerConfig, ReadMode};
use flowlens::status::Status;

use crate::common::{bytes, cpu_secs, fill, key, rss_mib_of, Mix, Table};

/// Issue 11's poller figures: agent CPU with 1 M live flows at default settings, read +
/// join against a bare batch walk of the same maps, and ending 100 k flows at once.
pub fn run(t: &mut Table) -> Result<()> {
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
            owner: 2 * n,
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
            rss_mib_of(std::process::id()).unwrap_or(0.0)
        ),
    );
    drop(agent);

    // Read + join against the bare batch walk of the same three maps.
    let dp = Datapath::load(Capacities {
        flows: n,
        tcp: n,
        icmp: n,
        owner: n,
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
        owner: m,
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
    flowlens::poller::FlowTable::scan(&mut table, &args, 1, &mut |flows| {
        ended += flows.len();
        Ok(())
    })?;
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
            meta: meta::created(LO_TO_HI, false, mix.ext(i)),
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
