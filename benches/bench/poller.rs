//! Poller read + join rate, batch against key-by-key, and what a ListFlows snapshot adds to
//! a poll.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use flowlens::kernel::attach::IfNames;
use flowlens::kernel::datapath::{Capacities, Datapath};
use flowlens::poller::decode::monotonic_ns;
use flowlens::poller::{KernelTable, Poller, PollerConfig, ReadMode};
use flowlens::record::snapshot::SnapshotSlot;
use flowlens::status::Status;

use crate::common::{fill_split, Mix, Table};

pub fn run(t: &mut Table) -> Result<()> {
    println!("poller: read + join every flow (filled from userspace)");
    for n in [100_000u32, 1_000_000] {
        let dp = Datapath::load(Capacities {
            flows: n,
            tcp: n,
            icmp: n,
            owner: n,
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
