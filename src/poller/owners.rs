//! Moves the owners of flows' local ends from the datapath's ring (`owner_ring`) into `flows_owner`, where the scan joins them with their flows.
//!
//! The datapath never makes a hash element on a packet's path for an owner: it sends
//! each one through the ring, and this puts them into the map before each scan and
//! read, and whenever the datapath wakes it because the ring is filling. A record the
//! scan gave before the owner got there (the flow started and ended within one scan) is
//! completed from the ring: the flow's entry says which ends were sent.
//!
//! An end that only receives comes as a request to look it up: done here, by the kernel's
//! own socket lookup (the `owner_resolve` program, run through BPF_PROG_TEST_RUN), off the
//! packet's path. A lookup matches a socket bound to the wildcard address whatever the
//! destination, so it is made only for a destination that is one of this host's addresses
//! (a packet it forwards is nobody's here).

use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBuffer, RingBufferBuilder};

use super::decode::{decode, owners_sent, RawFlow};
use super::scan::ScanKind;
use super::table::{wait_ring, JoinMap};
use super::PollError;
use crate::kernel::bpf::types;
use crate::kernel::datapath::FlowMaps;

/// How long the waker waits for the datapath's wake-up before looking at its stop flag.
const WAKER_TICK: Duration = Duration::from_millis(100);

/// A record of the owners' ring, told apart by its size.
enum Sent {
    /// An owner the datapath took.
    Owner(types::owner_event),
    /// A receiving end for the poller to look up.
    Want(types::owner_want_event),
}

/// What the ring's callback collects.
type Got = Arc<Mutex<Vec<Sent>>>;

/// The ring, its consumer and the maps it fills: one at a time, whichever thread drains.
struct Drain {
    rb: RingBuffer<'static>,
    got: Got,
    owner: MapHandle,
    counters: MapHandle,
    resolve: OwnedFd,
    resolve_io: MapHandle,
    /// A lookup failed (said once).
    resolve_failed: bool,
    /// Owners taken off the ring during a scan, not yet in the map: records of flows the
    /// scan ended take theirs from here, and the rest go into the map after the scan.
    late: JoinMap<types::flow_owner>,
    local: LocalAddrs,
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
    pub fn new(maps: &FlowMaps) -> Result<Self, PollError> {
        let got: Got = Arc::default();
        let sink = got.clone();
        let mut b = RingBufferBuilder::new();
        b.add(&maps.owner_ring, move |data: &[u8]| {
            // One layout per pin directory: no record of another size is written.
            let sent = match data.len() {
                n if n == std::mem::size_of::<types::owner_event>() => Sent::Owner(decode(data)),
                n if n == std::mem::size_of::<types::owner_want_event>() => {
                    Sent::Want(decode(data))
                }
                _ => return 0,
            };
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(sent);
            0
        })
        .map_err(|e| ring_err(std::io::Error::other(e)))?;
        let rb = b.build().map_err(|e| ring_err(std::io::Error::other(e)))?;
        // A duplicate descriptor: the service's capabilities open no map by id.
        let clone =
            |m: &MapHandle, map: &'static str| MapHandle::try_from(m).map_err(|e| read_err(map, e));
        let drain = Arc::new(Mutex::new(Drain {
            rb,
            got,
            owner: clone(&maps.owner, "flows_owner")?,
            counters: clone(&maps.owner_counters, "owner_counters")?,
            resolve: maps
                .owner_resolve
                .try_clone()
                .map_err(|e| read_err("owner_resolve", libbpf_rs::Error::from(e)))?,
            resolve_io: clone(&maps.owner_resolve_io, "owner_resolve_io")?,
            resolve_failed: false,
            late: JoinMap::default(),
            local: LocalAddrs::default(),
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
                        if wait_ring(epoll, WAKER_TICK) {
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

impl Drain {
    /// Takes every owner waiting in the ring, less those a local address check refuses.
    fn take(&mut self) -> Result<Vec<(u64, types::flow_owner)>, PollError> {
        let n = self.rb.consume_raw();
        if n < 0 {
            return Err(ring_err(std::io::Error::from_raw_os_error(-n)));
        }
        let got = std::mem::take(&mut *self.got.lock().unwrap_or_else(|e| e.into_inner()));
        let check = types::owner_want_flags::OWN_WANT_CHECK_LOCAL.0;
        let mut owners = Vec::with_capacity(got.len());
        for sent in got {
            let w = match sent {
                Sent::Owner(ev) => {
                    owners.push((ev.key, ev.owner));
                    continue;
                }
                Sent::Want(w) => w,
            };
            if w.flags & check != 0 && !self.local.is_local(&w.local) {
                continue;
            }
            match self.resolve(w.want, w.local) {
                Ok(Some(o)) => owners.push((w.key, o)),
                Ok(None) => {}
                // That end goes without; the flows and the other ends do not.
                Err(e) if !self.resolve_failed => {
                    log::warn!("looking up a receiving socket's owner: {e}; ends that only receive go without");
                    self.resolve_failed = true;
                }
                Err(_) => {}
            }
        }
        Ok(owners)
    }

    /// The owner of the socket a packet of `want` to `local` is delivered to, if any: the
    /// kernel's socket lookup, in this thread's network namespace (the agent's).
    fn resolve(
        &mut self,
        want: types::owner_want,
        local: [u8; 16],
    ) -> Result<Option<types::flow_owner>, PollError> {
        let io = types::owner_resolve_io {
            want,
            local,
            ..Default::default()
        };
        let key = 0u32.to_ne_bytes();
        let err = |e| read_err("owner_resolve_io", e);
        // SAFETY: owner_resolve_io is plain integers with explicit padding.
        let bytes = unsafe { plain::as_bytes(&io) };
        self.resolve_io
            .update(&key, bytes, MapFlags::ANY)
            .map_err(err)?;
        // A test run wants a frame: an Ethernet header's worth of zeros, never read.
        let frame = [0u8; 14];
        let mut opts = libbpf_sys::bpf_test_run_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _,
            data_in: frame.as_ptr().cast(),
            data_size_in: frame.len() as _,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: the program reads the frame (14 bytes, alive across the call) and its own
        // map; the kernel writes only into `opts`.
        let ret =
            unsafe { libbpf_sys::bpf_prog_test_run_opts(self.resolve.as_raw_fd(), &mut opts) };
        if ret < 0 {
            return Err(PollError::Scan(std::io::Error::from_raw_os_error(-ret)));
        }
        let Some(v) = self.resolve_io.lookup(&key, MapFlags::ANY).map_err(err)? else {
            return Ok(None);
        };
        let out: types::owner_resolve_io = decode(&v);
        Ok((out.found != 0).then_some(out.owner))
    }

    /// Everything waiting in the ring, into the map.
    fn put(&mut self) -> Result<(), PollError> {
        let got = self.take()?;
        self.insert(got.into_iter())
    }

    /// Everything waiting in the ring, into `late`.
    fn take_late(&mut self) -> Result<(), PollError> {
        let got = self.take()?;
        self.late.extend(got);
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
            if self
                .owner
                .update(&key.to_ne_bytes(), v, MapFlags::ANY)
                .is_err()
            {
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

/// This host's addresses (in the agent's network namespace), as IPv6 or IPv4-mapped bytes,
/// read again when an address is not among them, at most once a second.
#[derive(Default)]
struct LocalAddrs {
    addrs: HashSet<[u8; 16]>,
    read_at: Option<Instant>,
}

/// How often the addresses are read again at most: a forwarding host asks about other
/// hosts' addresses all the time.
const ADDRS_FRESH: Duration = Duration::from_secs(1);

impl LocalAddrs {
    /// Whether a packet to `a` is for this host: one of its addresses, loopback, or
    /// multicast and broadcast, which its wildcard-bound sockets receive too.
    fn is_local(&mut self, a: &[u8; 16]) -> bool {
        if always_local(a) || self.addrs.contains(a) {
            return true;
        }
        if self.read_at.is_some_and(|t| t.elapsed() < ADDRS_FRESH) {
            return false;
        }
        self.read();
        self.addrs.contains(a)
    }

    fn read(&mut self) {
        self.read_at = Some(Instant::now());
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs writes a list it allocated into `list`, freed below.
        if unsafe { libc::getifaddrs(&mut list) } != 0 {
            log::warn!(
                "reading this host's addresses: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        self.addrs.clear();
        let mut p = list;
        while !p.is_null() {
            // SAFETY: `p` is a node of the list getifaddrs made, alive until freed below.
            let ifa = unsafe { &*p };
            // The other address is a broadcast one only on a broadcast interface; on a
            // point-to-point one it is the peer's.
            let broadcast = ifa.ifa_flags & libc::IFF_BROADCAST as u32 != 0;
            let other = if broadcast {
                ifa.ifa_ifu
            } else {
                std::ptr::null_mut()
            };
            for sa in [ifa.ifa_addr, other] {
                if let Some(a) = sockaddr_bytes(sa) {
                    self.addrs.insert(a);
                }
            }
            p = ifa.ifa_next;
        }
        // SAFETY: the list getifaddrs made, freed once, nothing of it used after.
        unsafe { libc::freeifaddrs(list) };
    }
}

/// An IPv4 or IPv6 socket address's address, as IPv6 or IPv4-mapped bytes.
fn sockaddr_bytes(sa: *const libc::sockaddr) -> Option<[u8; 16]> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: a non-null sockaddr from getifaddrs; its family says which struct it is.
    let family = i32::from(unsafe { (*sa).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let v4 = unsafe { &*(sa as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(ip.to_ipv6_mapped().octets())
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address is a sockaddr_in6.
            let v6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            Some(v6.sin6_addr.s6_addr)
        }
        _ => None,
    }
}

/// Loopback, multicast and the limited broadcast: this host's on any interface.
fn always_local(a: &[u8; 16]) -> bool {
    let ip = std::net::Ipv6Addr::from(*a);
    match ip.to_ipv4_mapped() {
        Some(v4) => v4.is_loopback() || v4.is_multicast() || v4.is_broadcast(),
        None => ip.is_loopback() || ip.is_multicast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn bytes(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    #[test]
    fn loopback_multicast_and_broadcast_are_always_this_hosts() {
        for ip in [
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)),
            IpAddr::V4(Ipv4Addr::new(224, 0, 0, 251)),
            IpAddr::V4(Ipv4Addr::BROADCAST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6("ff02::fb".parse().unwrap()),
        ] {
            assert!(always_local(&bytes(ip)), "{ip}");
        }
        for ip in [
            IpAddr::V4(Ipv4Addr::new(10, 202, 0, 9)),
            IpAddr::V6("fd00::9".parse().unwrap()),
        ] {
            assert!(!always_local(&bytes(ip)), "{ip}");
        }
    }

    #[test]
    fn an_address_of_an_interface_is_local_and_an_unknown_one_is_read_again_at_most_once_a_second()
    {
        let mut l = LocalAddrs::default();
        // 203.0.113.7 (TEST-NET-3) is on no interface here.
        let far = bytes(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)));
        assert!(!l.is_local(&far));
        let read = l.read_at.expect("read on a miss");
        assert!(!l.is_local(&far));
        assert_eq!(l.read_at, Some(read), "not read again within a second");
        // Whatever the interfaces hold is local, as read.
        let any = *l
            .addrs
            .iter()
            .next()
            .expect("an interface address (lo's at least)");
        assert!(l.is_local(&any));
    }
}
