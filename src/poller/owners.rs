//! Moves the owners of flows' local ends from the datapath's ring (`owner_ring`) into `flows_owner`, where the scan joins them with their flows.
//!
//! The datapath never makes a hash element on a packet's path for an owner: it sends
//! each one through the ring, and this puts them into the map before each scan and
//! read, and whenever the datapath wakes it because the ring is filling. A record the
//! scan gave before the owner got there (the flow started and ended within one scan) is
//! completed from the ring: the flow's entry says which ends were sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBuffer, RingBufferBuilder};

use super::decode::{decode, owners_sent, RawFlow};
use super::scan::ScanKind;
use super::table::JoinMap;
use super::PollError;
use crate::kernel::bpf::types;

/// How long the waker waits for the datapath's wake-up before looking at its stop flag.
const WAKER_TICK: Duration = Duration::from_millis(100);

/// What the ring's callback collects.
type Got = Arc<Mutex<Vec<types::owner_event>>>;

/// The ring, its consumer and the maps it fills: one at a time, whichever thread drains.
struct Drain {
    rb: RingBuffer<'static>,
    got: Got,
    owner: MapHandle,
    counters: MapHandle,
    /// Owners taken off the ring during a scan, not yet in the map: records of flows the
    /// scan ended take theirs from here, and the rest go into the map after the scan.
    late: JoinMap<types::flow_owner>,
}

/// The owners' ring of one datapath, drained into its `flows_owner`.
pub struct OwnerSync {
    drain: Arc<Mutex<Drain>>,
    stop: Arc<AtomicBool>,
    /// Drains the ring when the datapath says it is filling between scans.
    waker: Option<JoinHandle<()>>,
}

fn ring_err(e: impl Into<std::io::Error>) -> PollError {
    PollError::Read {
        map: "owner_ring",
        source: e.into(),
    }
}

impl OwnerSync {
    pub fn new(ring: &MapHandle, owner: &MapHandle, counters: &MapHandle) -> Result<Self, PollError> {
        let got: Got = Arc::default();
        let sink = got.clone();
        let mut b = RingBufferBuilder::new();
        b.add(ring, move |data: &[u8]| {
            // One layout per pin directory: a shorter record is never written.
            if let Some(ev) = data.get(..std::mem::size_of::<types::owner_event>()) {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(decode(ev));
            }
            0
        })
        .map_err(|e| ring_err(std::io::Error::other(e)))?;
        let rb = b.build().map_err(|e| ring_err(std::io::Error::other(e)))?;
        let clone = |m: &MapHandle, map: &'static str| {
            MapHandle::from_map_id(m.info().map_err(|e| read_err(map, e))?.info.id)
                .map_err(|e| read_err(map, e))
        };
        let drain = Arc::new(Mutex::new(Drain {
            rb,
            got,
            owner: clone(owner, "flows_owner")?,
            counters: clone(counters, "owner_counters")?,
            late: JoinMap::default(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let waker = {
            let (drain, stop) = (drain.clone(), stop.clone());
            // The epoll descriptor is the ring's, alive as long as `drain`, which the
            // thread holds.
            let epoll = lock(&drain).rb.epoll_fd();
            std::thread::Builder::new()
                .name("flowlens-owners".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if wait(epoll, WAKER_TICK) {
                            let _ = lock(&drain).put();
                        }
                    }
                })
                .map_err(PollError::Scan)?
        };
        Ok(OwnerSync {
            drain,
            stop,
            waker: Some(waker),
        })
    }

    /// Puts every owner the ring holds into `flows_owner`: before a read or a scan.
    pub fn sync(&self) -> Result<(), PollError> {
        lock(&self.drain).put()
    }

    /// Completes the records of a scan's batch whose owners were sent after the scan's
    /// sync: taken off the ring now, kept apart until `after_scan`, except those of flows
    /// the scan ended, which would have no flow to join in the map.
    pub fn complete(&self, batch: &mut [(ScanKind, RawFlow)]) -> Result<(), PollError> {
        let mut d: Option<MutexGuard<'_, Drain>> = None;
        for (kind, f) in batch.iter_mut() {
            let sent = owners_sent(&f.base);
            for end in 0..2 {
                if sent >> end & 1 == 0 || f.owner[end].is_some() || f.base.ext_id == 0 {
                    continue;
                }
                let d = match &mut d {
                    Some(d) => d,
                    None => d.insert(lock(&self.drain)),
                };
                let key = super::decode::owner_key(f.base.ext_id, end);
                if !d.late.contains_key(&key) {
                    d.take_late()?;
                }
                f.owner[end] = if *kind == ScanKind::Active {
                    d.late.get(&key).copied()
                } else {
                    d.late.remove(&key)
                };
            }
        }
        Ok(())
    }

    /// After a scan: the owners `complete` took off the ring go into the map.
    pub fn after_scan(&self) -> Result<(), PollError> {
        let mut d = lock(&self.drain);
        let late: Vec<_> = d.late.drain().collect();
        d.insert(late.into_iter())
    }
}

impl Drop for OwnerSync {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.waker.take() {
            let _ = w.join();
        }
    }
}

fn read_err(map: &'static str, e: libbpf_rs::Error) -> PollError {
    PollError::Read {
        map,
        source: std::io::Error::other(e),
    }
}

fn lock(d: &Mutex<Drain>) -> MutexGuard<'_, Drain> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until the ring's epoll descriptor says it was woken, or `timeout` passes.
fn wait(epoll: i32, timeout: Duration) -> bool {
    let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
    // SAFETY: epoll_wait writes at most one event into `ev`, which has room for one; the
    // descriptor is the ring buffer's, which the caller keeps alive.
    let n = unsafe { libc::epoll_wait(epoll, ev.as_mut_ptr(), 1, timeout.as_millis() as i32) };
    n > 0
}

impl Drain {
    /// Takes every owner waiting in the ring.
    fn take(&mut self) -> Result<Vec<types::owner_event>, PollError> {
        let n = self.rb.consume_raw();
        if n < 0 {
            return Err(ring_err(std::io::Error::from_raw_os_error(-n)));
        }
        Ok(std::mem::take(
            &mut *self.got.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// Everything waiting in the ring, into the map.
    fn put(&mut self) -> Result<(), PollError> {
        let got = self.take()?;
        self.insert(got.into_iter().map(|ev| (ev.key, ev.owner)))
    }

    /// Everything waiting in the ring, into `late`.
    fn take_late(&mut self) -> Result<(), PollError> {
        let got = self.take()?;
        self.late.extend(got.into_iter().map(|ev| (ev.key, ev.owner)));
        Ok(())
    }

    /// Puts owners into the map; one that finds it full is lost, and counted
    /// (`owner_map_full`) where the datapath's own losses are.
    fn insert(
        &mut self,
        owners: impl Iterator<Item = (u64, types::flow_owner)>,
    ) -> Result<(), PollError> {
        let mut full = 0u64;
        for (key, o) in owners {
            // SAFETY: flow_owner is plain integers with explicit padding.
            let v = unsafe { plain::as_bytes(&o) };
            // Full, or out of memory for an element: either way the end goes without.
            if self.owner.update(&key.to_ne_bytes(), v, MapFlags::ANY).is_err() {
                full += 1;
            }
        }
        if full > 0 {
            self.count_full(full)?;
        }
        Ok(())
    }

    /// Adds to the attribution counter the datapath leaves to the poller: its slot on
    /// the first CPU, which no program writes.
    fn count_full(&mut self, n: u64) -> Result<(), PollError> {
        let slot = types::owner_counter::OWN_FULL.0.to_ne_bytes();
        let err = |e| read_err("owner_counters", e);
        let mut per_cpu = self
            .counters
            .lookup_percpu(&slot, MapFlags::ANY)
            .map_err(err)?
            .unwrap_or_default();
        let Some(first) = per_cpu.first_mut() else {
            return Ok(());
        };
        let v = u64::from_ne_bytes(first[..8].try_into().expect("a u64 slot")) + n;
        first[..8].copy_from_slice(&v.to_ne_bytes());
        self.counters
            .update_percpu(&slot, &per_cpu, MapFlags::ANY)
            .map_err(err)
    }
}
