//! The poller's view of the flow maps: a `FlowTable` trait, implemented over the kernel maps here and in memory in `memory`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The join's map, by extension id: SipHash was a quarter of a poll's time.
pub type JoinMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::decode::{decode, ext_id, owner_key, owner_of_key, ExtKind, RawFlow};
use super::scan::{decode_rec, Scanned};
use super::PollError;
use crate::kernel::bpf::types;
use crate::kernel::datapath::FlowMaps;

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
    /// One pass of the scan (`src/bpf/scan.h`): ends the flows due to end, taking them
    /// out of every map, and returns them with the flows due an active-timeout record.
    fn scan(&mut self, args: &types::scan_args) -> Result<Scanned, PollError>;
    /// The scan apart from the table, to run `parts` concurrent scans that each take
    /// the flows their share of the key hash names (a bulk end then uses more than one
    /// CPU); None where the table has no such program.
    fn split(&mut self, _parts: u32) -> Option<SplitScan> {
        None
    }
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
}

/// How entries are read: batch syscalls where the kernel has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    Batch,
    KeyByKey,
}

/// The kernel's split flow maps.
pub struct KernelTable {
    maps: FlowMaps,
    mode: ReadMode,
    /// Entries the previous read or scan found, to size the next read's collections.
    last_entries: [u64; 3],
    /// `scan_out` in this process, mapped at the first scan.
    scan_out: Option<Arc<ScanOut>>,
    /// Owner entries the previous read found.
    owners: usize,
}

impl KernelTable {
    pub fn new(maps: FlowMaps) -> KernelTable {
        KernelTable {
            maps,
            mode: ReadMode::Batch,
            last_entries: [0; 3],
            scan_out: None,
            owners: 0,
        }
    }

    pub fn set_read_mode(&mut self, mode: ReadMode) {
        self.mode = mode;
    }

    pub fn maps(&self) -> &FlowMaps {
        &self.maps
    }

    /// `scan_out`, mapped at the first call.
    fn scan_out(&mut self) -> Result<Arc<ScanOut>, PollError> {
        if let Some(out) = &self.scan_out {
            return Ok(out.clone());
        }
        let out = Arc::new(
            ScanOut::map(&self.maps.scan_out, &self.maps.scan_owner_out).map_err(|source| {
                PollError::Read {
                    map: "scan_out",
                    source,
                }
            })?,
        );
        self.scan_out = Some(out.clone());
        Ok(out)
    }
}

/// The scan split into parts, each run by a thread of its own: a part's passes write
/// its own slice of scan_out, which that thread reads back before its next pass.
pub struct SplitScan {
    prog: std::os::fd::OwnedFd,
    out: Arc<ScanOut>,
    parts: u32,
    capacity: u32,
}

impl SplitScan {
    pub fn parts(&self) -> u32 {
        self.parts
    }

    /// Runs the passes of part `part` until one leaves nothing of its own due, handing
    /// each pass's flows to `sink`; stops early when `sink` says so.
    pub fn run(
        &self,
        args: &types::scan_args,
        part: u32,
        mut sink: impl FnMut(Scanned) -> bool,
    ) -> Result<(), PollError> {
        let mut a = types::scan_args {
            capacity: self.capacity,
            part,
            parts: self.parts,
            first_slot: part * self.capacity,
            ..*args
        };
        let _slice = self.out.claim(a.first_slot, self.capacity)?;
        loop {
            run_scan(self.prog.as_fd(), &mut a)?;
            let pass = self.out.scanned(&a);
            let more = pass.more_due();
            if !sink(pass) || !more {
                return Ok(());
            }
        }
    }
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
        let mut owner = JoinMap::with_capacity_and_hasher(self.owners, Default::default());
        walk(&self.maps.owner, "flows_owner", self.mode, false, |k, v| {
            owner.insert(decode(k), decode(v));
        })?;
        self.owners = owner.len();
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

    fn scan(&mut self, args: &types::scan_args) -> Result<Scanned, PollError> {
        let out = self.scan_out()?;
        let mut a = *args;
        a.capacity = out.records;
        (a.part, a.parts, a.first_slot) = (0, 0, 0);
        let _all = out.claim(0, out.records)?;
        run_scan(self.maps.scan.as_fd(), &mut a)?;
        let pass = out.scanned(&a);
        self.last_entries = a.entries;
        Ok(pass)
    }

    fn split(&mut self, parts: u32) -> Option<SplitScan> {
        let out = self.scan_out().ok()?;
        // Each part needs room for a useful pass of its own.
        let parts = parts.min(out.records / 1024);
        if parts < 2 {
            return None;
        }
        Some(SplitScan {
            prog: self.maps.scan.try_clone().ok()?,
            capacity: out.records / parts,
            out,
            parts,
        })
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

/// An array map of `T` mapped read-only into this process.
struct Mapped<T> {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Bytes from one element to the next: an array element is its value rounded to 8.
    stride: usize,
    records: u32,
    _of: std::marker::PhantomData<T>,
}

impl<T: plain::Plain> Mapped<T> {
    fn map(m: &MapHandle, name: &str) -> std::io::Result<Mapped<T>> {
        let size = std::mem::size_of::<T>();
        if m.value_size() as usize != size {
            return Err(std::io::Error::other(format!(
                "{name} holds {}-byte values, {} is {size}",
                m.value_size(),
                std::any::type_name::<T>()
            )));
        }
        let stride = size.next_multiple_of(8);
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (stride * m.max_entries() as usize).next_multiple_of(page);
        // SAFETY: a new read-only shared mapping of the map's own fd, of no more than the
        // kernel allocated for it (it checks the length); no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                m.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped {
            ptr: std::ptr::NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?,
            len,
            stride,
            records: m.max_entries(),
            _of: std::marker::PhantomData,
        })
    }

    /// The `n` elements from slot `first` on. The caller makes sure nothing writes them
    /// meanwhile (see `ScanOut`'s Sync impl).
    fn slots(&self, first: u32, n: u32) -> impl Iterator<Item = &T> + '_ {
        let first = first.min(self.records);
        let n = n.min(self.records - first) as usize;
        // SAFETY: these elements lie inside the mapping, which lives as long as `self`;
        // the caller holds the claim on them and its scan has returned, so nothing
        // writes them (see ScanOut's Sync impl).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().add(first as usize * self.stride),
                n * self.stride,
            )
        };
        bytes.chunks_exact(self.stride).map(|c| {
            plain::from_bytes(&c[..std::mem::size_of::<T>()])
                .expect("array elements are 8-aligned in a page-aligned mapping")
        })
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; no reference to it outlives
        // `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The scan's output arrays mapped read-only into this process: a pass's records are
/// read where the scan program wrote them, instead of copied out through a syscall into
/// buffers faulted in afresh on every pass (15 % of a poll that ends 100 k flows).
pub struct ScanOut {
    recs: Mapped<types::scan_rec>,
    /// `scan_owner_out`, slot for slot: the owners of each record's flow.
    owners: Mapped<types::scan_owner>,
    records: u32,
    /// Slots claimed by the scans running now: a scan writes and reads back only its
    /// own slots, so no two claims overlap.
    claimed: std::sync::Mutex<Vec<std::ops::Range<u32>>>,
}

// SAFETY: the mappings are owned by this value alone. The kernel writes a slot only while
// a scan runs, and a scan runs only under a claim (`claim`) on its slots, which excludes
// every other claim on them; the records are read back under the same claim, on the
// same thread, after the scan returned. So no slot is ever read while written.
unsafe impl Send for ScanOut {}
// SAFETY: as for Send: threads share the mappings only through disjoint claims.
unsafe impl Sync for ScanOut {}

/// Slots of scan_out one scan holds; given back when dropped.
struct Claim<'a> {
    out: &'a ScanOut,
    slots: std::ops::Range<u32>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut held = self.out.claimed.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|r| *r != self.slots);
    }
}

impl ScanOut {
    fn map(recs: &MapHandle, owners: &MapHandle) -> std::io::Result<ScanOut> {
        let recs = Mapped::map(recs, "scan_out")?;
        let owners = Mapped::map(owners, "scan_owner_out")?;
        let records = recs.records.min(owners.records);
        Ok(ScanOut {
            recs,
            owners,
            records,
            claimed: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Claims the `n` slots from `first` for one scan, or fails if another scan holds
    /// any of them.
    fn claim(&self, first: u32, n: u32) -> Result<Claim<'_>, PollError> {
        let slots = first..first.saturating_add(n);
        let mut held = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
        if held
            .iter()
            .any(|r| r.start < slots.end && slots.start < r.end)
        {
            return Err(PollError::Scan(std::io::Error::other(
                "two scans at once over the same slots of scan_out",
            )));
        }
        held.push(slots.clone());
        Ok(Claim { out: self, slots })
    }

    /// The pass whose returned arguments are `a`: its records decoded out of its slots.
    /// Called under the claim that the pass ran under.
    fn scanned(&self, a: &types::scan_args) -> Scanned {
        Scanned {
            flows: self
                .recs
                .slots(a.first_slot, a.copied)
                .zip(self.owners.slots(a.first_slot, a.copied))
                .filter_map(|(r, o)| decode_rec(r, o))
                .collect(),
            entries: a.entries,
            truncated: a.truncated != 0,
            evict_left: a.evict_need,
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
