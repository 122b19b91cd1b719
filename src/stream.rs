//! Stream hub: fans flow records from the poller out to subscribers, each with its own bounded queue, and keeps a ring of recent records for replay.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::flow::{EndReason, FlowRecord};

/// Most records in one delivered batch.
pub const BATCH_MAX_RECORDS: usize = 1000;
/// Longest a record waits in a partial batch.
pub const BATCH_MAX_DELAY: Duration = Duration::from_millis(100);

/// Records the fanout thread takes from the poller per hub lock, so a busy
/// poller does not pay one lock round-trip per record.
const FANOUT_CHUNK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubConfig {
    /// Records kept for replay.
    pub ring_capacity: usize,
    /// Records (plus loss markers) queued per subscriber before it loses some.
    pub subscriber_queue: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            ring_capacity: 10_000,
            subscriber_queue: 4096,
        }
    }
}

// ---------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("not an IP address")]
    Address,
    #[error("prefix length is not a number")]
    PrefixSyntax,
    #[error("prefix length {len} exceeds {max}")]
    PrefixTooLong { len: u32, max: u8 },
}

/// An address block; host bits are cleared on parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, CidrError> {
        let max = max_prefix(addr);
        if len > max {
            return Err(CidrError::PrefixTooLong {
                len: u32::from(len),
                max,
            });
        }
        Ok(Cidr {
            net: mask(addr, len),
            len,
        })
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.net.is_ipv4() && mask(addr, self.len) == self.net
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| CidrError::Address)?;
        let max = max_prefix(addr);
        let len = match len {
            None => max,
            Some(l) => {
                let l: u32 = l.trim().parse().map_err(|_| CidrError::PrefixSyntax)?;
                u8::try_from(l)
                    .ok()
                    .filter(|&l| l <= max)
                    .ok_or(CidrError::PrefixTooLong { len: l, max })?
            }
        };
        Cidr::new(addr, len)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// Inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

/// One filter: matches when every set field matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Client (initiator) address.
    pub src: Option<Cidr>,
    /// Server address.
    pub dst: Option<Cidr>,
    /// Either address.
    pub addr: Option<Cidr>,
    pub src_port: Option<PortRange>,
    pub dst_port: Option<PortRange>,
    pub port: Option<PortRange>,
    pub protocol: Option<u8>,
    pub ip_version: Option<u8>,
    pub interface: Option<String>,
    /// Bits that must all appear in client_flags | server_flags.
    pub tcp_flags: Option<u8>,
    pub end_reason: Option<EndReason>,
    /// Minimum client.bytes + server.bytes.
    pub min_bytes: Option<u64>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        fn opt<T>(f: &Option<T>, pred: impl FnOnce(&T) -> bool) -> bool {
            f.as_ref().is_none_or(pred)
        }
        opt(&self.src, |c| c.contains(r.client_addr))
            && opt(&self.dst, |c| c.contains(r.server_addr))
            && opt(&self.addr, |c| {
                c.contains(r.client_addr) || c.contains(r.server_addr)
            })
            && opt(&self.src_port, |p| p.contains(r.client_port))
            && opt(&self.dst_port, |p| p.contains(r.server_port))
            && opt(&self.port, |p| {
                p.contains(r.client_port) || p.contains(r.server_port)
            })
            && opt(&self.protocol, |&p| p == r.protocol)
            && opt(&self.ip_version, |&v| v == r.ip_version)
            && opt(&self.interface, |i| *i == r.interface)
            && opt(&self.tcp_flags, |&want| {
                r.tcp
                    .as_ref()
                    .is_some_and(|t| (t.client_flags | t.server_flags) & want == want)
            })
            && opt(&self.end_reason, |&e| e == r.end_reason)
            && opt(&self.min_bytes, |&m| r.total_bytes() >= m)
    }
}

/// Which records a subscriber wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Any must match; empty means all records.
    pub include: Vec<Filter>,
    /// None may match.
    pub exclude: Vec<Filter>,
}

impl Selector {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        (self.include.is_empty() || self.include.iter().any(|f| f.matches(r)))
            && !self.exclude.iter().any(|f| f.matches(r))
    }
}

// ---------------------------------------------------------------------------
// Hub
// ---------------------------------------------------------------------------

/// What a subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub selector: Selector,
    /// Replay at most this many recent matching ring records (0: no limit).
    pub replay: usize,
    /// Replay the matching ring records with `last_seen >= since`.
    pub since: Option<SystemTime>,
    /// Stream new records after the replay.
    pub follow: bool,
    /// Remote address, for status.
    pub peer: String,
}

impl SubscribeOptions {
    fn wants_replay(&self) -> bool {
        self.replay > 0 || self.since.is_some()
    }
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            selector: Selector::default(),
            replay: 0,
            since: None,
            follow: true,
            peer: String::new(),
        }
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// In emission order, at most [`BATCH_MAX_RECORDS`].
    Records(Vec<Arc<FlowRecord>>),
    /// This many records were dropped because the queue was full.
    Lost(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberStats {
    pub id: u64,
    pub peer: String,
    pub connected: SystemTime,
    pub queued: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubStats {
    pub ring_len: usize,
    pub ring_capacity: usize,
    pub published: u64,
    /// Lost by all subscribers since start, departed ones included.
    pub lost_total: u64,
    pub subscribers: Vec<SubscriberStats>,
}

enum Item {
    Record(Arc<FlowRecord>),
    /// Records were lost here; the count is in `SubCounters::lost_pending`.
    LostMarker,
}

#[derive(Debug)]
struct SubCounters {
    id: u64,
    peer: String,
    connected: SystemTime,
    queued: AtomicU64,
    lost: AtomicU64,
    /// Lost but not yet reported; whoever swaps it to 0 reports it.
    lost_pending: AtomicU64,
}

struct SubEntry {
    tx: mpsc::Sender<Item>,
    selector: Selector,
    counters: Arc<SubCounters>,
    /// A loss happened and its marker is not queued yet.
    marker_owed: bool,
}

struct State {
    ring: VecDeque<Arc<FlowRecord>>,
    subs: Vec<SubEntry>,
    closed: bool,
}

struct Shared {
    cfg: HubConfig,
    state: Mutex<State>,
    next_id: AtomicU64,
    published: AtomicU64,
    lost_total: AtomicU64,
}

/// Cheap to clone: all clones share one hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Hub {
        Hub {
            shared: Arc::new(Shared {
                cfg,
                state: Mutex::new(State {
                    ring: VecDeque::with_capacity(cfg.ring_capacity.min(1 << 16)),
                    subs: Vec::new(),
                    closed: false,
                }),
                next_id: AtomicU64::new(1),
                published: AtomicU64::new(0),
                lost_total: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> HubConfig {
        self.shared.cfg
    }

    /// Spawns a std thread that drains `rx` (records from the poller) and fans out. The thread
    /// ends when `rx` is disconnected, after closing every subscriber's stream so clients see
    /// end-of-stream.
    pub fn spawn_fanout(
        &self,
        rx: crossbeam_channel::Receiver<FlowRecord>,
    ) -> std::thread::JoinHandle<()> {
        let hub = self.clone();
        let spawned: std::io::Result<JoinHandle<()>> = std::thread::Builder::new()
            .name("flowlens-fanout".into())
            .spawn(move || {
                let mut chunk = Vec::with_capacity(FANOUT_CHUNK);
                while let Ok(first) = rx.recv() {
                    chunk.push(first);
                    chunk.extend(rx.try_iter().take(FANOUT_CHUNK - 1));
                    hub.publish_all(chunk.drain(..));
                }
                hub.close();
            });
        // Thread creation only fails when the process is out of resources; the agent cannot
        // run without its fanout, and this signature has no error path.
        spawned.expect("spawning the flowlens-fanout thread")
    }

    /// Stores `rec` for replay and offers it to every subscriber; never waits on a subscriber.
    pub fn publish(&self, rec: FlowRecord) {
        self.publish_all(std::iter::once(rec));
    }

    fn publish_all(&self, recs: impl Iterator<Item = FlowRecord>) {
        let cap = self.shared.cfg.ring_capacity;
        let mut st = self.lock();
        let mut n = 0;
        for rec in recs {
            n += 1;
            let rec = Arc::new(rec);
            if cap > 0 {
                if st.ring.len() >= cap {
                    st.ring.pop_front();
                }
                st.ring.push_back(rec.clone());
            }
            let lost_total = &self.shared.lost_total;
            st.subs.retain_mut(|s| offer(s, &rec, lost_total));
        }
        self.shared.published.fetch_add(n, Ordering::Relaxed);
    }

    /// Ends every subscriber's stream (after what is already queued) and makes later
    /// subscriptions replay-only.
    /// Whether `close` was called: no record will be published any more.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.subs.clear();
    }

    /// Registers a subscriber. Its replay is taken atomically with registration, so replayed
    /// and live records neither overlap nor leave a gap.
    pub fn subscribe(&self, opts: SubscribeOptions) -> Subscription {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let counters = Arc::new(SubCounters {
            id,
            peer: opts.peer.clone(),
            connected: SystemTime::now(),
            queued: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            lost_pending: AtomicU64::new(0),
        });
        let mut st = self.lock();
        let replay = if opts.wants_replay() {
            let limit = if opts.replay == 0 {
                usize::MAX
            } else {
                opts.replay
            };
            let mut v: Vec<Arc<FlowRecord>> = st
                .ring
                .iter()
                .rev()
                .filter(|r| opts.since.is_none_or(|t| r.last_seen >= t))
                .filter(|r| opts.selector.matches(r))
                .take(limit)
                .cloned()
                .collect();
            v.reverse();
            v
        } else {
            Vec::new()
        };
        let rx = if opts.follow && !st.closed {
            let (tx, rx) = mpsc::channel(self.shared.cfg.subscriber_queue.max(1));
            st.subs.push(SubEntry {
                tx,
                selector: opts.selector,
                counters: counters.clone(),
                marker_owed: false,
            });
            Some(rx)
        } else {
            None
        };
        drop(st);
        Subscription {
            hub: self.clone(),
            counters,
            replay: replay.into(),
            rx,
            marker_seen: false,
        }
    }

    pub fn stats(&self) -> HubStats {
        let st = self.lock();
        HubStats {
            ring_len: st.ring.len(),
            ring_capacity: self.shared.cfg.ring_capacity,
            published: self.shared.published.load(Ordering::Relaxed),
            lost_total: self.shared.lost_total.load(Ordering::Relaxed),
            subscribers: st
                .subs
                .iter()
                .map(|s| SubscriberStats {
                    id: s.counters.id,
                    peer: s.counters.peer.clone(),
                    connected: s.counters.connected,
                    queued: s.counters.queued.load(Ordering::Relaxed),
                    lost: s.counters.lost.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent enough to go on
        // streaming; refusing all later publishes would be worse.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unregister(&self, id: u64) {
        self.lock().subs.retain(|s| s.counters.id != id);
    }
}

/// Offers one record to one subscriber; false when the subscriber is gone.
fn offer(s: &mut SubEntry, rec: &Arc<FlowRecord>, lost_total: &AtomicU64) -> bool {
    if !s.selector.matches(rec) {
        return true;
    }
    if s.marker_owed {
        match s.tx.try_send(Item::LostMarker) {
            Ok(()) => s.marker_owed = false,
            Err(TrySendError::Full(_)) => {
                lose(s, lost_total);
                return true;
            }
            Err(TrySendError::Closed(_)) => return false,
        }
    }
    match s.tx.try_send(Item::Record(rec.clone())) {
        Ok(()) => {
            s.counters.queued.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(TrySendError::Full(_)) => {
            lose(s, lost_total);
            true
        }
        Err(TrySendError::Closed(_)) => false,
    }
}

fn lose(s: &mut SubEntry, lost_total: &AtomicU64) {
    s.counters.lost.fetch_add(1, Ordering::Relaxed);
    s.counters.lost_pending.fetch_add(1, Ordering::Relaxed);
    lost_total.fetch_add(1, Ordering::Relaxed);
    s.marker_owed = true;
}

/// One subscriber's view of the hub; dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    counters: Arc<SubCounters>,
    replay: VecDeque<Arc<FlowRecord>>,
    /// None when not following (or the hub was closed before subscribing).
    rx: Option<mpsc::Receiver<Item>>,
    /// A loss marker ended the previous batch; report the loss next.
    marker_seen: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.counters.id)
            .finish()
    }
}

impl Subscription {
    pub fn id(&self) -> u64 {
        self.counters.id
    }

    /// Next batch or loss report; None at end of stream (replay done without follow, or hub
    /// closed). Cancel-safe only in the sense that a dropped call may lose a partial batch.
    pub async fn next_event(&mut self) -> Option<Event> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(BATCH_MAX_RECORDS);
            return Some(Event::Records(self.replay.drain(..n).collect()));
        }
        if self.marker_seen {
            self.marker_seen = false;
            if let Some(ev) = self.take_lost() {
                return Some(ev);
            }
        }
        loop {
            let rx = self.rx.as_mut()?;
            let item = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Queue drained: any loss happened after everything delivered so far, and
                    // there may be no later record to carry its marker.
                    if let Some(ev) = self.take_lost() {
                        return Some(ev);
                    }
                    self.rx.as_mut()?.recv().await
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            match item {
                Some(Item::Record(r)) => {
                    let mut batch = vec![r];
                    self.fill_batch(&mut batch).await;
                    return Some(Event::Records(batch));
                }
                Some(Item::LostMarker) => {
                    if let Some(ev) = self.take_lost() {
                        return Some(ev);
                    }
                }
                None => {
                    self.rx = None;
                    return self.take_lost();
                }
            }
        }
    }

    async fn fill_batch(&mut self, batch: &mut Vec<Arc<FlowRecord>>) {
        let deadline = tokio::time::Instant::now() + BATCH_MAX_DELAY;
        let Some(rx) = self.rx.as_mut() else { return };
        while batch.len() < BATCH_MAX_RECORDS {
            let item = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(item) => item,
                        Err(_) => return,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            match item {
                Some(Item::Record(r)) => batch.push(r),
                Some(Item::LostMarker) => {
                    self.marker_seen = true;
                    return;
                }
                // Disconnection is seen again (and handled) by the next call.
                None => return,
            }
        }
    }

    fn take_lost(&self) -> Option<Event> {
        match self.counters.lost_pending.swap(0, Ordering::Relaxed) {
            0 => None,
            n => Some(Event::Lost(n)),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.rx.is_some() {
            self.hub.unregister(self.counters.id);
        }
    }
}
