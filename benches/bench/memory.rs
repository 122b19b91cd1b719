//! Kernel memory the maps take, read from the bench's own memory cgroup: held at zero flows
//! per unit of capacity (the hash maps' bucket arrays, the ring, the LRU), and per flow,
//! split maps against a best-packed and a naive single map, for several flow mixes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libbpf_rs::MapHandle;

use flowlens::kernel::bpf::flow_mono_skel::types as mono_types;
use flowlens::kernel::datapath::{Capacities, Datapath, FlowMaps};

use crate::common::{bytes, fill, fill_split, key, load_mono, Mix, Table};

fn memlock(m: &MapHandle) -> Result<u64> {
    Ok(FlowMaps::memlock(m)?)
}

/// A memory cgroup of the bench's own, a child of the one the process is in, that the
/// measuring thread joins while it creates and fills maps: the kernel charges a map's slab
/// and vmalloc memory to the cgroup that created it, so other processes on a shared host
/// never show in the reading (a global SUnreclaim reading varied 0.67-2.83x).
struct Cgroup {
    dir: PathBuf,
    home: PathBuf,
    v2: bool,
}

impl Cgroup {
    /// Creates the cgroup and moves the calling thread (v1) or process (v2) into it.
    fn enter(name: &str) -> Result<Cgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let v1 = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
            ctl.split(',')
                .any(|c| c == "memory")
                .then(|| PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')))
        });
        let (home, v2) = match v1 {
            Some(home) if home.join("memory.kmem.usage_in_bytes").exists() => (home, false),
            _ => {
                let path = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .context("no memory cgroup in /proc/self/cgroup")?;
                let home = PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/'));
                if !home.join("memory.stat").exists() {
                    bail!("no memory controller at {}", home.display());
                }
                (home, true)
            }
        };
        let dir = home.join(format!("flowlens-bench-{}-{name}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cg = Cgroup { dir, home, v2 };
        cg.join(&cg.dir)?;
        Ok(cg)
    }

    fn join(&self, dir: &std::path::Path) -> Result<()> {
        let (file, id) = if self.v2 {
            ("cgroup.procs", std::process::id().to_string())
        } else {
            // this thread only: /proc/thread-self is /proc/<pid>/task/<tid>
            let me = std::fs::read_link("/proc/thread-self")?;
            let tid = me
                .file_name()
                .context("thread id")?
                .to_string_lossy()
                .into_owned();
            ("tasks", tid)
        };
        std::fs::write(dir.join(file), id).with_context(|| format!("joining {}", dir.display()))
    }

    /// Kernel memory charged to the cgroup: v1 `memory.kmem.usage_in_bytes`, v2 the
    /// `kernel` line of `memory.stat` (slab, vmalloc, percpu, stacks, page tables).
    fn kernel_bytes(&self) -> Result<u64> {
        if self.v2 {
            let stat = std::fs::read_to_string(self.dir.join("memory.stat"))?;
            stat.lines()
                .find_map(|l| l.strip_prefix("kernel "))
                .and_then(|v| v.trim().parse().ok())
                .context("kernel in memory.stat")
        } else {
            Ok(
                std::fs::read_to_string(self.dir.join("memory.kmem.usage_in_bytes"))?
                    .trim()
                    .parse()?,
            )
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = self.join(&self.home.clone());
        // the maps' memory goes back after an RCU grace period; an empty cgroup goes
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("flowlens-bench: {} left behind", self.dir.display());
    }
}

/// kmalloc-cg-* objects in use, by size class (/proc/slabinfo, host-wide): the sanity
/// check of a per-flow figure, which cannot be below one object per flow.
fn slab_objects() -> Result<std::collections::BTreeMap<u32, u64>> {
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
    Ok(objects)
}

/// Real kernel memory one layout takes for `n` flows: cgroup growth per flow from the
/// empty maps to the full ones, the kmalloc classes its objects landed in, memlock per
/// flow.
struct Cost {
    per_flow: f64,
    /// kmalloc-cg objects grown per flow, host-wide
    objects_per_flow: f64,
    classes: String,
    memlock_per_flow: f64,
}

/// Measures `fill_maps` (which creates the maps, then calls its argument with their
/// memlock when empty, fills them and returns the memlock when full), inside a cgroup of
/// its own.
fn measure<T>(
    n: u32,
    fill_maps: impl FnOnce(&mut dyn FnMut() -> Result<()>) -> Result<(T, u64, u64)>,
) -> Result<Cost> {
    let cg = Cgroup::enter("flows")?;
    let mut empty = (0, Default::default());
    let mut mark = || -> Result<()> {
        empty = (cg.kernel_bytes()?, slab_objects()?);
        Ok(())
    };
    let (keep, lock_empty, lock_full) = fill_maps(&mut mark)?;
    let full = (cg.kernel_bytes()?, slab_objects()?);
    drop(keep);
    drop(cg);
    let mut objects = 0;
    let classes = full
        .1
        .iter()
        .filter_map(|(class, now)| {
            let grew = now.saturating_sub(*empty.1.get(class).unwrap_or(&0));
            objects += grew;
            (grew * 20 > u64::from(n))
                .then(|| format!("{class}: {:.2}/flow", grew as f64 / f64::from(n)))
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Cost {
        per_flow: full.0.saturating_sub(empty.0) as f64 / f64::from(n),
        objects_per_flow: objects as f64 / f64::from(n),
        classes,
        memlock_per_flow: lock_full.saturating_sub(lock_empty) as f64 / f64::from(n),
    })
}

/// Kernel memory a datapath of capacities `cap` holds with no flow: maps (bucket arrays,
/// the ring, the preallocated LRU) and programs, as its own cgroup is charged for them.
fn zero_flow_bytes(cap: Capacities) -> Result<u64> {
    let cg = Cgroup::enter("zero")?;
    let before = cg.kernel_bytes()?;
    let dp = Datapath::load(cap)?;
    let held = cg.kernel_bytes()?.saturating_sub(before);
    drop(dp);
    drop(cg);
    Ok(held)
}

/// Memory held by capacity: at the issue-29 explicit settings (the old shares) and at what
/// `--max-flows` alone now implies, at 1 Mi, and per unit of `--max-flows`.
fn capacity(t: &mut Table) -> Result<()> {
    const MI: u32 = 1 << 20;
    let old = Capacities {
        flows: MI,
        tcp: MI / 2,
        icmp: MI / 8,
        owner: Capacities::owner_for(MI),
    };
    let small = zero_flow_bytes(Capacities::for_flows(1 << 16))?;
    let before = zero_flow_bytes(old)?;
    let after = zero_flow_bytes(Capacities::for_flows(MI))?;
    let mb = |b: u64| b as f64 / 1e6;
    t.add(
        "memory",
        "zero flows, --max-flows 64 Ki (defaults)",
        mb(small),
        "MB",
        "TCP 16384, ICMP 4096: kernel memory of the bench's cgroup after load".into(),
    );
    t.add(
        "memory",
        "zero flows, 1 Mi capacity, old shares (1/2, 1/8)",
        mb(before),
        "MB",
        format!("--max-tcp-flows {} --max-icmp-flows {}", old.tcp, old.icmp),
    );
    t.add(
        "memory",
        "zero flows, 1 Mi capacity, new defaults (1/4, 1/16)",
        mb(after),
        "MB",
        format!(
            "x{:.2} of the old shares; x{:.2} of the 43.4 MB before issue 23",
            after as f64 / before as f64,
            mb(after) / 43.4
        ),
    );
    t.add(
        "memory",
        "zero flows, per unit of --max-flows",
        after.saturating_sub(small) as f64 / f64::from(MI - (1 << 16)),
        "B/unit",
        format!(
            "from 64 Ki to 1 Mi at the default shares; {:.1} MB per 1 M of capacity",
            after.saturating_sub(small) as f64 / f64::from(MI - (1 << 16))
        ),
    );
    Ok(())
}

fn split_cost(n: u32, mix: Mix, sampled: u32) -> Result<Cost> {
    measure(n, |mark| {
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
        mark()?;
        fill_split(&maps, n, mix, sampled)?;
        let full = total(&maps)?;
        Ok(((dp, maps), empty, full))
    })
}

/// One single map holding every flow: `naive` (base, TCP and ICMP fields in
/// every value) or best-packed (base plus the union of the extensions).
fn single_cost(n: u32, mix: Mix, naive: bool) -> Result<Cost> {
    measure(n, |mark| {
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
        mark()?;
        fill(&map, n, |i| {
            Some((bytes(&key(i, mix)).to_vec(), value.clone()))
        })?;
        let full = memlock(&map)?;
        Ok(((mono, map), empty, full))
    })
}

/// Adds a per-flow row, or an error row when the figure is impossible: fewer kmalloc
/// objects grew than there are flows (every flow is at least one element), beyond the
/// host's own churn (5 %: the count is host-wide).
fn per_flow_row(t: &mut Table, what: &str, c: &Cost) -> bool {
    if c.objects_per_flow < 0.95 {
        t.add(
            "memory",
            what,
            f64::NAN,
            "error",
            format!(
                "impossible figure withheld ({:.2} B/flow): {:.2} kmalloc-cg objects per flow \
                 grew host-wide, fewer than one per flow: something freed slab meanwhile, rerun",
                c.per_flow, c.objects_per_flow
            ),
        );
        return false;
    }
    t.add(
        "memory",
        what,
        c.per_flow,
        "B/flow",
        format!(
            "memlock {:.1} B/flow; kmalloc-cg objects {}",
            c.memlock_per_flow, c.classes
        ),
    );
    true
}

pub fn run(t: &mut Table) -> Result<()> {
    println!(
        "kernel memory, read from the bench's own memory cgroup (v1 memory.kmem.usage_in_bytes, \
         v2 memory.stat kernel): held at zero flows by capacity; per flow from the empty maps to \
         the full ones, with kmalloc-cg-* objects per flow (/proc/slabinfo) and fdinfo memlock"
    );
    capacity(t)?;
    for mix in [Mix::DEFAULT, Mix(20, 75, 5), Mix(70, 25, 5)] {
        for n in [100_000u32, 1_000_000] {
            let split = split_cost(n, mix, 100)?;
            let packed = single_cost(n, mix, false)?;
            let naive = single_cost(n, mix, true)?;
            let what = |layout: &str| format!("{layout}, {} mix, {n} flows", mix.label());
            let mut possible = true;
            for (layout, c) in [
                ("split, every TCP/ICMP flow sampled", &split),
                ("best-packed single", &packed),
                ("naive single", &naive),
            ] {
                possible &= per_flow_row(t, &what(layout), c);
            }
            if possible {
                t.add(
                    "memory",
                    &what("split / best-packed single"),
                    split.per_flow / packed.per_flow,
                    "ratio",
                    format!(
                        "split / naive x{:.2}; memlock split / best-packed x{:.2}",
                        split.per_flow / naive.per_flow,
                        split.memlock_per_flow / packed.memlock_per_flow
                    ),
                );
            }
            if mix.0 == Mix::DEFAULT.0 {
                let half = split_cost(n, mix, 50)?;
                if per_flow_row(t, &what("split, half the TCP/ICMP flows sampled"), &half)
                    && possible
                {
                    t.add(
                        "memory",
                        &what("split half sampled / best-packed single"),
                        half.per_flow / packed.per_flow,
                        "ratio",
                        String::new(),
                    );
                }
            }
        }
    }
    Ok(())
}
