//! Who gets a connection, for every listener (gRPC and /metrics): caps in all and per source address that shed the oldest connection that has not yet proven itself, the accept back-off, events logged once per episode, and the descriptor budget the caps must fit in.
//!
//! A connection *proves* itself by doing what an attacker holding slots avoids: finishing its
//! TLS handshake (or, in cleartext gRPC, sending the HTTP/2 preface), or sending a complete
//! HTTP request head. At a cap, a new connection closes the oldest open one that is not in
//! the middle of a request, first among those that never proved themselves, then among
//! idle proven ones; only when every candidate is mid-request is the new one refused. The
//! per-source cap (an IPv4 address, or an IPv6 /64) is applied the same way among that
//! source's own connections, so one peer's flood sheds its own connections first.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{info, warn};
use tokio::sync::Notify;

/// How many connections a listener holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Connections open at once, all peers together.
    pub total: usize,
    /// Connections open at once from one source address (an IPv6 /64); unix sockets have
    /// no source and only the total applies.
    pub per_source: usize,
}

/// What a listener knows about one open connection.
#[derive(Debug, Default)]
pub struct Slot {
    /// Requests (or streams) in progress.
    busy: AtomicUsize,
    /// Finished its handshake or sent a complete request.
    proven: AtomicBool,
    /// Told to close: shed at a cap, or the server is stopping.
    closing: AtomicBool,
    close: Notify,
}

impl Slot {
    /// The peer has shown it speaks the protocol: from now on it is shed only after every
    /// connection that has not.
    pub fn prove(&self) {
        self.proven.store(true, Ordering::Release);
    }

    pub fn is_proven(&self) -> bool {
        self.proven.load(Ordering::Acquire)
    }

    /// Marks a request in progress until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }

    /// Tells the connection to close (it finishes what it is doing if it chooses to).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.close.notify_waiters();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Resolves once the connection is told to close.
    pub fn closed(self: &Arc<Self>) -> impl Future<Output = ()> + Send + Sync + 'static {
        let slot = self.clone();
        async move {
            let notified = slot.close.notified();
            tokio::pin!(notified);
            // Registered before the flag is read: a close in between is not missed.
            notified.as_mut().enable();
            if slot.is_closing() {
                return;
            }
            notified.await;
        }
    }
}

/// A request in progress on a connection.
#[derive(Debug)]
pub struct Busy(Arc<Slot>);

impl Busy {
    pub fn slot(&self) -> &Arc<Slot> {
        &self.0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The address connections are counted under: an IPv4 address, or an IPv6 /64 (what one
/// host is usually given, so it cannot pick a fresh address per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(_) => Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

/// The open connections of one listener, oldest first (ids only grow).
#[derive(Debug)]
pub struct Connections {
    caps: Caps,
    next_id: u64,
    open: BTreeMap<u64, (Option<Source>, Arc<Slot>)>,
    per_source: HashMap<Source, usize>,
}

/// Why a connection was not let in: every candidate to make room is mid-request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// At the cap for its source address.
    Source,
    /// At the cap in all.
    Total,
}

/// A connection let in, and how many others were closed to make room.
#[derive(Debug)]
pub struct Admitted {
    pub held: Held,
    pub shed: usize,
}

impl Connections {
    pub fn new(caps: Caps) -> Arc<Mutex<Connections>> {
        Arc::new(Mutex::new(Connections {
            caps,
            next_id: 0,
            open: BTreeMap::new(),
            per_source: HashMap::new(),
        }))
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Connections open from `source`.
    pub fn from_source(&self, source: Source) -> usize {
        self.per_source.get(&source).copied().unwrap_or(0)
    }

    /// Registers a new connection from `peer`, first shedding others at a cap; the returned
    /// `Held` unregisters it when dropped.
    pub fn admit(
        table: &Arc<Mutex<Connections>>,
        peer: Option<IpAddr>,
    ) -> Result<Admitted, Refused> {
        let mut this = lock(table);
        let source = peer.map(Source::of);
        let mut shed = 0;
        if let Some(src) = source {
            while this.from_source(src) >= this.caps.per_source.max(1) {
                let victim = this.victim(|s| s == Some(src)).ok_or(Refused::Source)?;
                this.evict(victim);
                shed += 1;
            }
        }
        while this.open.len() >= this.caps.total.max(1) {
            let victim = this.victim(|_| true).ok_or(Refused::Total)?;
            this.evict(victim);
            shed += 1;
        }
        let id = this.next_id;
        this.next_id += 1;
        let slot = Arc::new(Slot::default());
        this.open.insert(id, (source, slot.clone()));
        if let Some(src) = source {
            *this.per_source.entry(src).or_default() += 1;
        }
        Ok(Admitted {
            held: Held {
                id,
                slot,
                table: table.clone(),
            },
            shed,
        })
    }

    /// The oldest connection among `of` that is not mid-request, preferring one that never
    /// proved itself.
    fn victim(&self, of: impl Fn(Option<Source>) -> bool) -> Option<u64> {
        let idle = || {
            self.open
                .iter()
                .filter(|(_, (src, s))| of(*src) && !s.is_busy())
        };
        idle()
            .find(|(_, (_, s))| !s.is_proven())
            .or_else(|| idle().next())
            .map(|(&id, _)| id)
    }

    fn evict(&mut self, id: u64) {
        if let Some((_, slot)) = self.remove(id) {
            slot.close();
        }
    }

    fn remove(&mut self, id: u64) -> Option<(Option<Source>, Arc<Slot>)> {
        let (src, slot) = self.open.remove(&id)?;
        if let Some(src) = src {
            if let Some(n) = self.per_source.get_mut(&src) {
                *n -= 1;
                if *n == 0 {
                    self.per_source.remove(&src);
                }
            }
        }
        Some((src, slot))
    }

    /// Tells every open connection to close (the server is stopping).
    pub fn close_all(&mut self) {
        let ids: Vec<u64> = self.open.keys().copied().collect();
        for id in ids {
            self.evict(id);
        }
    }
}

/// A registered connection; dropping it (with the connection) frees its place.
#[derive(Debug)]
pub struct Held {
    id: u64,
    slot: Arc<Slot>,
    table: Arc<Mutex<Connections>>,
}

impl Held {
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        lock(&self.table).remove(self.id);
    }
}

pub fn lock(table: &Mutex<Connections>) -> MutexGuard<'_, Connections> {
    // Each change is one map call: a panic elsewhere leaves the table consistent.
    table.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Episodes and the accept back-off
// ---------------------------------------------------------------------------

/// Events that come in bursts (failed accepts, shed connections, a failing interface
/// sync), so a log says when one starts and when it is over instead of once per event.
#[derive(Debug, Default)]
pub struct Episode {
    events: u64,
    since: Option<Instant>,
    last: Option<Instant>,
}

impl Episode {
    /// Records an event; true when it starts an episode (the one to log).
    pub fn event(&mut self) -> bool {
        let now = Instant::now();
        self.events += 1;
        self.last = Some(now);
        self.since.get_or_insert(now);
        self.events == 1
    }

    /// Ends the episode, if one is running: its events and how long it lasted.
    pub fn end(&mut self) -> Option<(u64, Duration)> {
        let since = self.since.take()?;
        self.last = None;
        Some((std::mem::take(&mut self.events), since.elapsed()))
    }

    /// Ends the episode once no event came for `quiet`.
    pub fn end_after(&mut self, quiet: Duration) -> Option<(u64, Duration)> {
        match self.last {
            Some(last) if last.elapsed() >= quiet => self.end(),
            _ => None,
        }
    }

    pub fn events(&self) -> u64 {
        self.events
    }
}

/// A shedding episode is over (and logged as such) after this long without shedding.
pub const SHED_QUIET: Duration = Duration::from_secs(10);

/// Logs a listener's shedding once per episode: when it starts, and when it has been quiet
/// for [`SHED_QUIET`] (checked at each admission).
pub fn log_shedding(episode: &mut Episode, shed: usize, what: &str, cap: usize) {
    if shed == 0 {
        if let Some((n, over)) = episode.end_after(SHED_QUIET) {
            info!("{what}: no longer shedding connections; {n} shed over {over:?}");
        }
        return;
    }
    for _ in 0..shed {
        if episode.event() {
            warn!(
                "{what}: at a connection cap ({cap} in all, or per source address); closing the \
                 oldest connections that have not proven themselves (logged once per episode)"
            );
        }
    }
}

/// First and longest pause after a failed accept.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Pauses between failed accepts: BACKOFF_MIN doubling to BACKOFF_MAX, reset by a success.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Episode,
}

impl Backoff {
    /// Records a failure; returns how long to pause before the next accept.
    pub fn failed(&mut self) -> Duration {
        self.failures.event();
        let shift = (self.failures.events() - 1).min(4) as u32;
        (BACKOFF_MIN * (1 << shift)).min(BACKOFF_MAX)
    }

    /// Whether the failure just recorded started an episode (the one to log).
    pub fn first_of_episode(&self) -> bool {
        self.failures.events() == 1
    }

    /// Ends an episode on success; returns its failure count and length if there was one.
    pub fn recovered(&mut self) -> Option<(u64, Duration)> {
        self.failures.end()
    }
}

/// Accept errors that concern one connection only (it went away before we took it).
pub fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EINTR | libc::EAGAIN | libc::EPROTO)
    )
}

// ---------------------------------------------------------------------------
// Descriptors
// ---------------------------------------------------------------------------

/// Descriptors kept free of connections for everything else the agent opens while it runs:
/// link and netlink descriptors of interfaces that appear, exporters' reconnections, map
/// handles, a connection accepted only to be refused.
pub const RESERVE: usize = 64;

/// Raises the soft descriptor limit to the hard one (as systemd's LimitNOFILE= sets both,
/// this changes nothing under the unit) and returns the soft limit in force.
pub fn raise_descriptor_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return u64::MAX;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: a valid rlimit; raising the soft limit up to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// Descriptors this process has open.
pub fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// How many connections the listeners may hold, given the descriptor limit and what is
/// open already: `wanted` for each listener, lowered (the first first) to what fits beside
/// [`RESERVE`]. None when not even one connection per listener fits.
pub fn fit_descriptors(limit: u64, open: usize, wanted: &[usize]) -> Option<Vec<usize>> {
    let budget = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(open + RESERVE);
    let mut caps = wanted.to_vec();
    let mut over = caps.iter().sum::<usize>().saturating_sub(budget);
    for cap in caps.iter_mut() {
        let cut = over.min(cap.saturating_sub(1));
        *cap -= cut;
        over -= cut;
    }
    (over == 0).then_some(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn ids(t: &Arc<Mutex<Connections>>) -> Vec<u64> {
        lock(t).open.keys().copied().collect()
    }

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let pauses: Vec<u64> = (0..7).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert!(!b.first_of_episode());
        assert_eq!(b.recovered().map(|(n, _)| n), Some(7));
        assert_eq!(b.recovered(), None);
        assert_eq!(b.failed(), BACKOFF_MIN);
        assert!(b.first_of_episode());
    }

    #[test]
    fn the_oldest_unproven_idle_connection_goes_first() {
        let t = Connections::new(Caps {
            total: 4,
            per_source: 4,
        });
        let held: Vec<Held> = (0..4)
            .map(|_| Connections::admit(&t, None).unwrap().held)
            .collect();
        let _busy = held[0].slot().enter(); // mid-request: never shed
        held[1].slot().prove(); // proven and idle: second choice
        let a = Connections::admit(&t, None).unwrap();
        assert_eq!(a.shed, 1);
        assert!(held[2].slot().is_closing());
        assert_eq!(ids(&t), [0, 1, 3, 4]);
        let b = Connections::admit(&t, None).unwrap();
        assert_eq!(ids(&t), [0, 1, 4, 5]);
        a.held.slot().prove();
        b.held.slot().prove();
        let c = Connections::admit(&t, None).unwrap();
        assert_eq!(ids(&t), [0, 4, 5, 6], "then the oldest idle proven one");
        let _b1 = a.held.slot().enter();
        let _b2 = b.held.slot().enter();
        let _b3 = c.held.slot().enter();
        assert_eq!(
            Connections::admit(&t, None).unwrap_err(),
            Refused::Total,
            "every slot is mid-request"
        );
        assert_eq!(lock(&t).len(), 4);
        drop(held);
        assert_eq!(ids(&t), [4, 5, 6], "dropped connections leave the table");
    }

    #[test]
    fn one_source_sheds_its_own_connections() {
        let t = Connections::new(Caps {
            total: 10,
            per_source: 2,
        });
        let other = Connections::admit(&t, ip("192.0.2.1")).unwrap().held;
        let mine: Vec<Held> = (0..5)
            .map(|_| Connections::admit(&t, ip("2001:db8::1")).unwrap().held)
            .collect();
        // Another address of the same /64 counts as the same source.
        let again = Connections::admit(&t, ip("2001:db8::2:3")).unwrap();
        assert_eq!(again.shed, 1);
        assert!(!other.slot().is_closing());
        assert!(mine[..4].iter().all(|h| h.slot().is_closing()));
        assert_eq!(lock(&t).len(), 3);
        assert_eq!(
            lock(&t).from_source(Source::of("2001:db8::ffff".parse().unwrap())),
            2
        );
        let _b = (mine[4].slot().enter(), again.held.slot().enter());
        assert_eq!(
            Connections::admit(&t, ip("2001:db8::9")).unwrap_err(),
            Refused::Source
        );
        assert!(Connections::admit(&t, ip("::ffff:192.0.2.7")).is_ok());
    }

    #[tokio::test]
    async fn closed_resolves_whenever_close_came() {
        let slot = Arc::new(Slot::default());
        let waiting = tokio::spawn(slot.closed());
        tokio::task::yield_now().await;
        slot.close();
        waiting.await.unwrap();
        // Asked after the close: resolves at once.
        slot.closed().await;
    }

    #[test]
    fn caps_fit_the_descriptor_limit() {
        assert_eq!(
            fit_descriptors(16384, 100, &[1024, 32]),
            Some(vec![1024, 32])
        );
        // 256 - 40 open - 64 reserve = 152: the first listener gives way first.
        assert_eq!(fit_descriptors(256, 40, &[1024, 32]), Some(vec![120, 32]));
        assert_eq!(fit_descriptors(256, 40, &[10, 300]), Some(vec![1, 151]));
        assert_eq!(fit_descriptors(256, 40, &[100, 32]), Some(vec![100, 32]));
        assert_eq!(fit_descriptors(100, 40, &[1024, 32]), None);
    }

    #[test]
    fn episodes_end_on_success_or_quiet() {
        let mut e = Episode::default();
        assert!(e.event());
        assert!(!e.event());
        assert_eq!(e.end_after(Duration::from_secs(60)), None);
        assert_eq!(e.end_after(Duration::ZERO).map(|(n, _)| n), Some(2));
        assert!(e.event(), "a new episode");
    }
}
