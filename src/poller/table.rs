//! The poller's view of the flow maps: a `FlowTable` trait, implemented over the kernel maps here and in memory in `memory`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBuffer, RingBufferBuilder};

use super::decode::{decode, ext_id, owner_key, owner_of_key, ExtKind, RawFlow};
use super::owners::OwnerSync;
use super::probation::Tally;
use super::scan::{decode_rec, ScanKind, ScanSummary};
use super::PollError;
use crate::kernel::bpf::types;
use crate::kernel::datapath::FlowMaps;

/// The join's map, by extension id: SipHash was a quarter of a poll's time.
pub type JoinMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;

/// Where a scan hands the flows it ended or found due, a batch at a time, as they come.
pub type FlowSink<'a> = dyn FnMut(Vec<(ScanKind, RawFlow)>) -> Result<(), PollError> + 'a;

/// The kernel-internal "operation not supported" errno.
const ENOTSUPP: i32 = 524;

/// A map keyed by a flow's ext_id: an extension, or the owners of its local ends (keyed
/// by `owner_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtMap {
    Tcp,
    Icmp,
    Owner,
}

/// Names of the base, TCP and ICMP maps, in the order counts are given.
pub const MAP_NAMES: [&str; 3] = ["flows", "flows_tcp", "flows_icmp"];

/// What one read of the maps found.
pub struct Joined {
    pub flows: Vec<RawFlow>,
    /// Entries in flows, flows_tcp and flows_icmp.
    pub entries: [u64; 3],
    /// Ids of extension entries read without a base entry naming them: orphans.
    pub unjoined: Vec<(ExtMap, u64)>,
}

/// Joins base entries, as they are read, with the extension entries read before them:
/// each base takes the entry its id names, and those no base names are the orphans. Both
/// tables read through this, the kernel one straight from its batch buffers.
pub struct Joiner {
    tcp: JoinMap<types::flow_tcp>,
    icmp: JoinMap<types::flow_icmp>,
    /// Owners of local ends, by `owner_key`.
    owner: JoinMap<types::flow_owner>,
    flows: Vec<RawFlow>,
    entries: [u64; 3],
    /// Base entries waiting to be joined as a group (see `join_pending`).
    pending: Vec<(types::flow_key, types::flow_base)>,
    /// Extension entries a base took: TCP, ICMP, owners.
    joined: [usize; 3],
}

/// Base entries joined together: their lookups run back to back, so the CPU overlaps
/// their cache misses (the extension table is too big for the cache).
const JOIN_GROUP: usize = 32;

impl Joiner {
    pub fn new(
        tcp: JoinMap<types::flow_tcp>,
        icmp: JoinMap<types::flow_icmp>,
        owner: JoinMap<types::flow_owner>,
        capacity: usize,
    ) -> Joiner {
        let entries = [0, tcp.len() as u64, icmp.len() as u64];
        Joiner {
            tcp,
            icmp,
            owner,
            flows: Vec::with_capacity(capacity),
            entries,
            pending: Vec::with_capacity(JOIN_GROUP),
            joined: [0; 3],
        }
    }

    /// The owners of flow `b`'s local ends, if it has any.
    fn owners(&self, b: &types::flow_base) -> [Option<types::flow_owner>; 2] {
        if b.ext_id == 0 || self.owner.is_empty() {
            return [None, None];
        }
        [0, 1].map(|end| self.owner.get(&owner_key(b.ext_id, end)).copied())
    }

    pub fn push(&mut self, key: types::flow_key, base: types::flow_base) {
        self.pending.push((key, base));
        if self.pending.len() == JOIN_GROUP {
            self.join_pending();
        }
    }

    fn join_pending(&mut self) {
        let mut tcp = [None; JOIN_GROUP];
        let mut icmp = [None; JOIN_GROUP];
        let mut owner = [[None; 2]; JOIN_GROUP];
        // Lookups only, back to back; nothing is removed, so none waits on another.
        for (i, (_, b)) in self.pending.iter().enumerate() {
            tcp[i] = ext_id(b, ExtKind::Tcp).and_then(|id| self.tcp.get(&id).copied());
            icmp[i] = ext_id(b, ExtKind::Icmp).and_then(|id| self.icmp.get(&id).copied());
            owner[i] = self.owners(b);
        }
        self.entries[0] += self.pending.len() as u64;
        for (i, (key, base)) in self.pending.drain(..).enumerate() {
            self.joined[0] += usize::from(tcp[i].is_some());
            self.joined[1] += usize::from(icmp[i].is_some());
            self.joined[2] += owner[i].iter().flatten().count();
            self.flows.push(RawFlow {
                key,
                base,
                tcp: tcp[i],
                icmp: icmp[i],
                owner: owner[i],
            });
        }
    }

    pub fn finish(mut self) -> Joined {
        self.join_pending();
        // Entries no base took are orphans; usually every one was taken.
        let mut unjoined = Vec::new();
        if self.joined[2] < self.owner.len() {
            let named: std::collections::HashSet<u64, foldhash::fast::RandomState> = self
                .flows
                .iter()
                .filter(|f| f.owner.iter().any(Option::is_some))
                .map(|f| f.base.ext_id)
                .collect();
            unjoined.extend(
                self.owner
                    .keys()
                    .filter(|k| !named.contains(&owner_of_key(**k).0))
                    .map(|k| (ExtMap::Owner, *k)),
            );
        }
        if self.joined[0] < self.tcp.len() || self.joined[1] < self.icmp.len() {
            let named: std::collections::HashSet<(ExtMap, u64), foldhash::fast::RandomState> = self
                .flows
                .iter()
                .flat_map(|f| {
                    [
                        f.tcp
                            .and(ext_id(&f.base, ExtKind::Tcp))
                            .map(|id| (ExtMap::Tcp, id)),
                        f.icmp
                            .and(ext_id(&f.base, ExtKind::Icmp))
                            .map(|id| (ExtMap::Icmp, id)),
                    ]
                })
                .flatten()
                .collect();
            unjoined.extend(
                self.tcp
                    .into_keys()
                    .map(|k| (ExtMap::Tcp, k))
                    .chain(self.icmp.into_keys().map(|k| (ExtMap::Icmp, k)))
                    .filter(|e| !named.contains(e)),
            );
        }
        Joined {
            flows: self.flows,
            entries: self.entries,
            unjoined,
        }
    }
}

/// Joins a whole set of base entries (see `Joiner`).
pub fn join(
    base: impl IntoIterator<Item = (types::flow_key, types::flow_base)>,
    tcp: JoinMap<types::flow_tcp>,
    icmp: JoinMap<types::flow_icmp>,
    owner: JoinMap<types::flow_owner>,
) -> Joined {
    let mut j = Joiner::new(tcp, icmp, owner, 0);
    for (key, b) in base {
        j.push(key, b);
    }
    j.finish()
}

/// Where the poller reads flows from and deletes them: the kernel maps in the agent, an
/// in-memory table in the lifecycle tests.
pub trait FlowTable: Send {
    /// Reads every map once and joins each base entry with its extension.
    fn read(&mut self) -> Result<Joined, PollError>;
    /// One scan (`src/bpf/scan.h`): ends the flows due to end, taking them out of every
    /// map, and hands them to `sink` with the flows due an active-timeout record (whose
    /// entries keep only what the records do not carry), in batches as they come. A
    /// bulk end may be split among up to `threads` concurrent scans.
    fn scan(
        &mut self,
        args: &types::scan_args,
        threads: u32,
        sink: &mut FlowSink<'_>,
    ) -> Result<ScanSummary, PollError>;
    /// Deletes the orphan entry `id` of extension map `ext`; whether it did.
    fn remove_orphan(&mut self, ext: ExtMap, id: u64) -> Result<bool, PollError>;
    /// Capacities of the base, TCP and ICMP maps.
    fn capacities(&self) -> [u64; 3];
    /// Entries in the owners' map (`flows_owner`) and its capacity; None where there is
    /// no such map.
    fn owner_fill(&self) -> Option<(u64, u64)> {
        None
    }
    /// The datapath's counters by name.
    fn counters(&self) -> BTreeMap<String, u64>;
    /// When the latest full scan ran, this agent's or (maps kept across a restart) its
    /// predecessor's; None before any.
    fn last_scan(&self) -> Option<u64>;
    /// What the scan tallied of the flows it found in probation, and probation's
    /// capacity; None without one.
    fn probation_tally(&self) -> Option<(Tally, u64)> {
        None
    }
}

/// One scan's flows, gathered (for tests and benchmarks; the poller emits them as they
/// come).
pub fn collect_scan<T: FlowTable + ?Sized>(
    table: &mut T,
    args: &types::scan_args,
    threads: u32,
) -> Result<(Vec<(ScanKind, RawFlow)>, ScanSummary), PollError> {
    let mut flows = Vec::new();
    let done = table.scan(args, threads, &mut |batch| {
        flows.extend(batch);
        Ok(())
    })?;
    Ok((flows, done))
}

/// How entries are read: batch syscalls where the kernel has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    Batch,
    KeyByKey,
}

/// The kernel's split flow maps.
pub struct KernelTable {
    /// Declared before the maps: it reads their ring, which must outlive it.
    ring: Option<ScanRing>,
    /// The owners' ring, drained into `flows_owner`; made at the first read or scan.
    owners: Option<OwnerSync>,
    maps: FlowMaps,
    mode: ReadMode,
    /// Entries the previous read or scan found, to size the next read's collections.
    last_entries: [u64; 3],
    /// Owner entries the previous read found.
    owner_entries: usize,
}

impl KernelTable {
    pub fn new(maps: FlowMaps) -> KernelTable {
        KernelTable {
            ring: None,
            owners: None,
            maps,
            mode: ReadMode::Batch,
            last_entries: [0; 3],
            owner_entries: 0,
        }
    }

    /// The owners' ring, drained into `flows_owner` now.
    fn sync_owners(&mut self) -> Result<&OwnerSync, PollError> {
        if self.owners.is_none() {
            self.owners = Some(OwnerSync::new(&self.maps)?);
        }
        let owners = self.owners.as_ref().expect("made above");
        owners.sync()?;
        Ok(owners)
    }

    pub fn set_read_mode(&mut self, mode: ReadMode) {
        self.mode = mode;
    }

    pub fn maps(&self) -> &FlowMaps {
        &self.maps
    }
}

/// Records a scan may have ended before it stops to hand the rest of a bulk end to
/// concurrent scans (one per CPU): a poll with a few ends stays one walk on one CPU.
const BULK_AFTER: u32 = 4096;

/// Records taken off the ring at a time: one batch of the poller's.
const RING_CHUNK: usize = super::OUT_BATCH;

/// `scan_ring` consumed in this process: each record is decoded as it is taken off.
struct ScanRing {
    rb: RingBuffer<'static>,
    got: Arc<Mutex<Vec<(ScanKind, RawFlow)>>>,
}

impl ScanRing {
    fn new(map: &MapHandle) -> Result<ScanRing, PollError> {
        let got: Arc<Mutex<Vec<(ScanKind, RawFlow)>>> = Arc::default();
        let sink = got.clone();
        let mut b = RingBufferBuilder::new();
        let err = |e: libbpf_rs::Error| PollError::Read {
            map: "scan_ring",
            source: std::io::Error::other(e),
        };
        b.add(map, move |data: &[u8]| {
            // A record this build cannot read (never: one layout per pin directory) is
            // skipped rather than stopping the scan's consumer.
            if data.len() >= std::mem::size_of::<types::scan_rec>() {
                let r: types::scan_rec = decode(&data[..std::mem::size_of::<types::scan_rec>()]);
                if let Some(f) = decode_rec(&r) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(f);
                }
            }
            0
        })
        .map_err(err)?;
        Ok(ScanRing {
            rb: b.build().map_err(err)?,
            got,
        })
    }

    /// Takes up to `RING_CHUNK` records off the ring and hands them to `sink`; how many.
    fn drain(&self, sink: &mut FlowSink<'_>) -> Result<usize, PollError> {
        let n = self.rb.consume_raw_n(RING_CHUNK);
        if n < 0 {
            return Err(PollError::Read {
                map: "scan_ring",
                source: std::io::Error::from_raw_os_error(-n),
            });
        }
        let batch = std::mem::take(&mut *self.got.lock().unwrap_or_else(|e| e.into_inner()));
        if !batch.is_empty() {
            sink(batch)?;
        }
        Ok(n as usize)
    }

    /// Waits until the ring has records to wake up for, or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        wait_ring(self.rb.epoll_fd(), timeout);
    }
}

/// Waits until a ring buffer's epoll descriptor says the ring was woken, or `timeout`
/// passes; whether it was. The caller keeps the ring buffer, and so the descriptor, alive.
pub(super) fn wait_ring(epoll: i32, timeout: Duration) -> bool {
    let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
    // SAFETY: epoll_wait writes at most one event into `ev`, which has room for one; the
    // descriptor is alive (see above).
    let n = unsafe { libc::epoll_wait(epoll, ev.as_mut_ptr(), 1, timeout.as_millis() as i32) };
    n > 0
}

/// How often the poller looks at the ring while a scan runs (records wake it up
/// sooner once a quarter of the ring is waiting).
const RING_LOOK: Duration = Duration::from_millis(1);

/// Runs one scan per `args` (concurrently, each on a thread of its own) while this
/// thread drains their records into `sink`. A scan that fills the ring waits until the
/// ring was drained and goes on with another pass. Returns each scan's returned
/// arguments (of its last pass) and its passes.
fn scan_draining(
    prog: BorrowedFd<'_>,
    ring: &ScanRing,
    args: &[types::scan_args],
    sink: &mut FlowSink<'_>,
) -> Result<Vec<(types::scan_args, u32)>, PollError> {
    let running = AtomicUsize::new(args.len());
    // Counts the times the ring was found empty: a scan that filled it waits for one.
    let drained = AtomicU64::new(0);
    let abort = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut spawned = Ok(());
        let scans: Vec<_> = args
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let (running, drained, abort) = (&running, &drained, &abort);
                let mut a = *a;
                std::thread::Builder::new()
                    .name(format!("flowlens-scan{i}"))
                    .spawn_scoped(s, move || {
                        // Counted down however the scan ends, so the drain stops.
                        struct Done<'a>(&'a AtomicUsize);
                        impl Drop for Done<'_> {
                            fn drop(&mut self) {
                                self.0.fetch_sub(1, Ordering::Release);
                            }
                        }
                        let _done = Done(running);
                        let mut passes = 0;
                        loop {
                            run_scan(prog, &mut a)?;
                            passes += 1;
                            if a.stopped != types::scan_stop::SCAN_RING_FULL.0 {
                                return Ok((a, passes));
                            }
                            let seen = drained.load(Ordering::Acquire);
                            while drained.load(Ordering::Acquire) == seen {
                                if abort.load(Ordering::Relaxed) {
                                    return Ok((a, passes));
                                }
                                std::thread::sleep(Duration::from_micros(200));
                            }
                        }
                    })
                    .map_err(|e| {
                        running.fetch_sub(1, Ordering::Release);
                        spawned = Err(PollError::Scan(e));
                    })
                    .ok()
            })
            .collect();
        let mut took = Ok(());
        loop {
            // Read before the drain: once every scan is done, one empty drain after
            // that has taken every record they wrote.
            let done = running.load(Ordering::Acquire) == 0;
            match ring.drain(sink) {
                Ok(0) => {
                    drained.fetch_add(1, Ordering::Release);
                    if done {
                        break;
                    }
                    ring.wait(RING_LOOK);
                }
                Ok(_) => {}
                Err(e) => {
                    // The scans stop at their next full ring; what they wrote since
                    // waits in the ring for the next scan's drain.
                    abort.store(true, Ordering::Relaxed);
                    took = Err(e);
                    break;
                }
            }
        }
        let ran: Result<Vec<_>, PollError> = scans
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(PollError::Scan(std::io::Error::other(
                        "a scan thread panicked",
                    )))
                })
            })
            .collect();
        took.and(spawned).and(ran)
    })
}

/// Runs the scan program once with `a` as its context; the kernel writes the results
/// back into `a`.
fn run_scan(prog: BorrowedFd<'_>, a: &mut types::scan_args) -> Result<(), PollError> {
    run_syscall(prog, a)
}

/// The entries of `flows_owner`, counted by its `owner_entries` program; None if it
/// failed to run.
fn count_entries(prog: &std::os::fd::OwnedFd) -> Option<u64> {
    let mut a = types::owner_count_args::default();
    run_syscall(prog.as_fd(), &mut a).ok()?;
    Some(a.entries)
}

/// Runs a syscall program once with `a` as its context; the kernel writes its results
/// back into `a`.
fn run_syscall<T: plain::Plain>(prog: BorrowedFd<'_>, a: &mut T) -> Result<(), PollError> {
    let size = std::mem::size_of::<T>();
    let ctx: *mut T = a;
    let mut opts = libbpf_sys::bpf_test_run_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _,
        ctx_in: ctx.cast(),
        ctx_size_in: size as _,
        ..Default::default()
    };
    // SAFETY: the context is `a`, a plain struct of the size given, which the kernel
    // copies in and (a syscall program's results) back; nothing else of ours is touched.
    let ret = unsafe { libbpf_sys::bpf_prog_test_run_opts(prog.as_raw_fd(), &mut opts) };
    if ret < 0 {
        return Err(PollError::Scan(std::io::Error::from_raw_os_error(-ret)));
    }
    Ok(())
}

impl FlowTable for KernelTable {
    /// The extension maps are read before the base map: an extension is only ever made
    /// from a base entry that exists, and ids are never reused, so one whose base the
    /// later read does not name is an orphan.
    fn read(&mut self) -> Result<Joined, PollError> {
        let [_, tcp_n, icmp_n] = self.last_entries.map(|n| n as usize);
        // Room for a full map: address space only, the pages are touched as flows come,
        // and the vector never grows by copying.
        let flows = self.maps.flows.max_entries() as usize;
        let mut tcp = JoinMap::with_capacity_and_hasher(tcp_n, Default::default());
        walk(&self.maps.tcp, "flows_tcp", self.mode, false, |k, v| {
            tcp.insert(decode(k), decode(v));
        })?;
        let mut icmp = JoinMap::with_capacity_and_hasher(icmp_n, Default::default());
        walk(&self.maps.icmp, "flows_icmp", self.mode, false, |k, v| {
            icmp.insert(decode(k), decode(v));
        })?;
        // Owners are made after their base entry, like extensions: read before it.
        self.sync_owners()?;
        let mut owner = JoinMap::with_capacity_and_hasher(self.owner_entries, Default::default());
        walk(&self.maps.owner, "flows_owner", self.mode, false, |k, v| {
            owner.insert(decode(k), decode(v));
        })?;
        self.owner_entries = owner.len();
        // Each base entry is joined as it comes out of the batch buffer, with no copy in
        // between; locked, as the TCP state in a base entry changes under its lock.
        let mut j = Joiner::new(tcp, icmp, owner, flows);
        walk(&self.maps.flows, "flows", self.mode, true, |k, v| {
            j.push(decode(k), decode(v));
        })?;
        let joined = j.finish();
        self.last_entries = joined.entries;
        Ok(joined)
    }

    fn scan(
        &mut self,
        args: &types::scan_args,
        threads: u32,
        sink: &mut FlowSink<'_>,
    ) -> Result<ScanSummary, PollError> {
        if self.ring.is_none() {
            self.ring = Some(ScanRing::new(&self.maps.scan_ring)?);
        }
        self.sync_owners()?;
        let KernelTable {
            ring, maps, owners, ..
        } = self;
        let ring = ring.as_ref().expect("made above");
        let owners = owners.as_ref().expect("made by sync_owners");
        let sink = &mut |mut batch: Vec<(ScanKind, RawFlow)>| {
            owners.complete(&mut batch)?;
            sink(batch)
        };
        let prog = maps.scan.as_fd();
        let mut a = types::scan_args {
            part: 0,
            parts: 0,
            ..*args
        };
        // A bulk end is worth every CPU; eviction and the closing pass count for the whole
        // map, so they are never split.
        let split = threads > 1 && a.evict_age_ns == 0 && a.closing_only == 0;
        a.bulk_after = if split { BULK_AFTER } else { 0 };
        let [(first, mut passes)] = scan_draining(prog, ring, &[a], sink)?[..] else {
            unreachable!("one scan, one result")
        };
        let walked = |a: &types::scan_args| {
            (a.closing_only == 0 && a.stopped == types::scan_stop::SCAN_DONE.0)
                .then_some(a.probation)
        };
        let mut summary = ScanSummary {
            entries: first.entries,
            evict_left: first.evict_need,
            passes,
            split: false,
            probation: walked(&first),
        };
        if first.stopped == types::scan_stop::SCAN_BULK.0 {
            let parts: Vec<types::scan_args> = (0..threads)
                .map(|part| types::scan_args {
                    part,
                    parts: threads,
                    bulk_after: 0,
                    ..a
                })
                .collect();
            let ran = scan_draining(prog, ring, &parts, sink)?;
            // Each part counts its own share of probation.
            summary.probation = ran.iter().try_fold([0u64; 4], |sum, (r, _)| {
                walked(r).map(|w| [0, 1, 2, 3].map(|i| sum[i] + w[i]))
            });
            for (r, p) in ran {
                // Each part counts the maps when it ends; the last one to end saw the least.
                summary.entries = [0, 1, 2].map(|i| summary.entries[i].min(r.entries[i]));
                passes += p;
            }
            summary.passes = passes;
            summary.split = true;
        }
        owners.after_scan()?;
        self.last_entries = summary.entries;
        Ok(summary)
    }

    fn last_scan(&self) -> Option<u64> {
        self.maps.last_scan()
    }

    fn remove_orphan(&mut self, ext: ExtMap, id: u64) -> Result<bool, PollError> {
        // Ids are never reused and the read took the extension maps before the base, so
        // an unjoined extension is certainly an orphan: no re-check.
        let map = match ext {
            ExtMap::Tcp => &self.maps.tcp,
            ExtMap::Icmp => &self.maps.icmp,
            ExtMap::Owner => &self.maps.owner,
        };
        Ok(map.delete(&id.to_ne_bytes()).is_ok())
    }

    fn capacities(&self) -> [u64; 3] {
        [&self.maps.flows, &self.maps.tcp, &self.maps.icmp].map(|m| u64::from(m.max_entries()))
    }

    fn owner_fill(&self) -> Option<(u64, u64)> {
        let n = count_entries(&self.maps.owner_count)?;
        Some((n, u64::from(self.maps.owner.max_entries())))
    }

    fn probation_tally(&self) -> Option<(Tally, u64)> {
        let m = &self.maps;
        let sketch: types::probe_sketch = m
            .probe_sketch
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .map(|v| decode(&v))?;
        let ports = m
            .probe_ports
            .keys()
            .filter_map(|k| {
                let v = m.probe_ports.lookup(&k, MapFlags::ANY).ok()??;
                let p: types::probe_port = decode(&k);
                Some((
                    (p.proto, p.port),
                    u64::from_ne_bytes(v.get(..8)?.try_into().ok()?),
                ))
            })
            .collect();
        Some((
            Tally {
                tallied: sketch.tallied,
                registers: sketch.reg.to_vec(),
                ports,
            },
            u64::from(m.probation.max_entries()),
        ))
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        self.maps.counters().unwrap_or_default()
    }
}

/// Reads every entry of a hash map, in batches where the kernel supports them.
pub fn read_all<K, V>(
    map: &MapHandle,
    name: &'static str,
    mode: ReadMode,
    locked: bool,
) -> Result<Vec<(K, V)>, PollError>
where
    K: plain::Plain + Default,
    V: plain::Plain + Default,
{
    let mut out = Vec::new();
    walk(map, name, mode, locked, |k, v| {
        out.push((decode(k), decode(v)))
    })?;
    Ok(out)
}

/// Hands every entry of a hash map, as key and value bytes, to `f`: in batches where the
/// kernel supports them, else key by key.
pub fn walk(
    map: &MapHandle,
    name: &'static str,
    mode: ReadMode,
    locked: bool,
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<(), PollError> {
    match mode {
        ReadMode::Batch => match walk_batch(map, locked, &mut f) {
            Ok(()) => Ok(()),
            // kernels without batch ops for this map type
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::ENOTSUP | ENOTSUPP)
                ) =>
            {
                walk_key_by_key(map, locked, f);
                Ok(())
            }
            Err(source) => Err(PollError::Read { map: name, source }),
        },
        ReadMode::KeyByKey => {
            walk_key_by_key(map, locked, f);
            Ok(())
        }
    }
}

fn lookup_flags(locked: bool) -> MapFlags {
    if locked {
        MapFlags::LOCK
    } else {
        MapFlags::ANY
    }
}

fn walk_key_by_key(map: &MapHandle, locked: bool, mut f: impl FnMut(&[u8], &[u8])) {
    let keys: Vec<Vec<u8>> = map.keys().collect();
    for k in keys {
        // A key deleted since the walk is simply gone.
        if let Ok(Some(v)) = map.lookup(&k, lookup_flags(locked)) {
            f(&k, &v);
        }
    }
}

/// BPF_MAP_LOOKUP_BATCH over the whole map, each entry handed to `f` straight from the
/// batch buffers. A hash bucket must fit in one batch (else ENOSPC), so the batch doubles
/// until it does.
fn walk_batch(
    map: &MapHandle,
    locked: bool,
    f: &mut impl FnMut(&[u8], &[u8]),
) -> std::io::Result<()> {
    let ks = map.key_size() as usize;
    let vs = map.value_size() as usize;
    let mut batch: u32 = 1024;
    let mut token = vec![0u8; ks.max(8)];
    let mut next = vec![0u8; ks.max(8)];
    let mut keys = vec![0u8; ks * batch as usize];
    let mut vals = vec![0u8; vs * batch as usize];
    let mut first = true;
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: lookup_flags(locked).bits(),
        flags: 0,
    };
    loop {
        let mut count = batch;
        // SAFETY: buffers are sized for `count` keys/values and the tokens
        // for a key; the kernel writes at most that.
        let ret = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                if first {
                    std::ptr::null_mut()
                } else {
                    token.as_mut_ptr().cast()
                },
                next.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                vals.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let err = if ret < 0 { -ret } else { 0 };
        if err == libc::ENOSPC && count == 0 {
            batch *= 2;
            keys.resize(ks * batch as usize, 0);
            vals.resize(vs * batch as usize, 0);
            continue;
        }
        if err != 0 && err != libc::ENOENT {
            return Err(std::io::Error::from_raw_os_error(err));
        }
        let n = count as usize;
        for (k, v) in keys[..n * ks]
            .chunks_exact(ks)
            .zip(vals[..n * vs].chunks_exact(vs))
        {
            f(k, v);
        }
        if err == libc::ENOENT {
            return Ok(());
        }
        std::mem::swap(&mut token, &mut next);
        first = false;
    }
}
