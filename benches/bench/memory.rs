//! Kernel memory per flow: slab growth, kmalloc objects and memlock of the split maps
//! against a best-packed and a naive single map, for several flow mixes.

use std::time::Duration;

use anyhow::{Context, Result};
use libbpf_rs::MapHandle;

use flowlens::kernel::bpf::flow_mono_skel::types as mono_types;
use flowlens::kernel::datapath::{Capacities, Datapath, FlowMaps};

use crate::common::{bytes, fill, fill_split, key, load_mono, Mix, Table};

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
            owner: n,
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

pub fn run(t: &mut Table) -> Result<()> {
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
