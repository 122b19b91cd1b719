//! The record hub: numbers each record from the poller, keeps a ring for replay, and hands every record to every sink (stdout, each gRPC subscriber, exporters) without ever waiting on one.
//!
//! Each sink has its own bounded queue. The hub only `try_send`s into it: a full queue
//! loses the record for that sink alone, counts it, and the sink is told. Subscriber
//! filters run on the subscriber's own task, never under the hub's lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::filter::Selector;
use crate::flow::FlowRecord;

/// Most records in one delivered batch.
pub const BATCH_MAX_RECORDS: usize = 1000;
/// Longest a record waits in a partial batch.
pub const BATCH_MAX_DELAY: Duration = Duration::from_millis(100);

/// Records the fanout thread takes from the poller per hub lock, so a busy
/// poller does not pay one lock round-trip per record.
const FANOUT_CHUNK: usize = 256;

/// Filter evaluations a subscriber's task does before it lets other tasks run, so a
/// subscriber with a huge filter list cannot starve the others on its worker.
const FILTER_BUDGET: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubConfig {
    /// Records kept for replay.
    pub ring_capacity: usize,
    /// Records (plus loss markers) queued per subscriber before it loses some.
    pub subscriber_queue: usize,
    /// Records queued for each local sink (stdout, exporters) before it loses some.
    pub sink_queue: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            ring_capacity: 10_000,
            subscriber_queue: 4096,
            sink_queue: 65_536,
        }
    }
}

/// A record as the hub hands it out: numbered in emission order, shared by every sink,
/// with a slot for its wire encoding so that is done once, not once per subscriber.
#[derive(Debug)]
pub struct Envelope {
    /// 1 for the first record of this agent run, then +1 per record.
    pub seq: u64,
    pub record: FlowRecord,
    wire: OnceLock<Bytes>,
}

impl Envelope {
    pub fn new(seq: u64, record: FlowRecord) -> Envelope {
        Envelope {
            seq,
            record,
            wire: OnceLock::new(),
        }
    }

    /// The record's wire encoding, made by the first caller and shared with the rest.
    pub fn wire(&self, encode: impl FnOnce(u64, &FlowRecord) -> Bytes) -> Bytes {
        self.wire
            .get_or_init(|| encode(self.seq, &self.record))
            .clone()
    }
}

pub type Shared = Arc<Envelope>;

/// What kind of consumer a sink is, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// The agent's own stdout.
    Output,
    /// A gRPC subscriber.
    Subscriber,
    /// A record exporter (IPFIX).
    Export,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Output => "output",
            SinkKind::Subscriber => "subscriber",
            SinkKind::Export => "export",
        }
    }
}

#[derive(Debug)]
struct SinkCounters {
    id: u64,
    kind: SinkKind,
    name: String,
    connected: SystemTime,
    /// Records in the sink's queues now.
    queued: AtomicU64,
    /// Records handed to the sink since it registered.
    delivered: AtomicU64,
    lost: AtomicU64,
    /// Lost but not yet reported; whoever swaps it to 0 reports it.
    lost_pending: AtomicU64,
}

impl SinkCounters {
    fn lose(&self, n: u64, lost_total: &AtomicU64) {
        self.lost.fetch_add(n, Ordering::Relaxed);
        self.lost_pending.fetch_add(n, Ordering::Relaxed);
        lost_total.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStats {
    pub id: u64,
    pub kind: SinkKind,
    /// "stdout", an exporter's destination, or a subscriber's peer address.
    pub name: String,
    pub connected: SystemTime,
    /// Records waiting in the sink's queues now.
    pub queued: u64,
    pub delivered: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubStats {
    pub ring_len: usize,
    pub ring_capacity: usize,
    pub published: u64,
    /// Lost by all sinks since start, departed ones included.
    pub lost_total: u64,
    pub sinks: Vec<SinkStats>,
}

impl HubStats {
    pub fn subscribers(&self) -> impl Iterator<Item = &SinkStats> {
        self.sinks.iter().filter(|s| s.kind == SinkKind::Subscriber)
    }
}

struct SinkEntry {
    tx: mpsc::Sender<Shared>,
    counters: Arc<SinkCounters>,
}

struct State {
    ring: VecDeque<Shared>,
    sinks: Vec<SinkEntry>,
    next_seq: u64,
    closed: bool,
}

struct Inner {
    cfg: HubConfig,
    state: Mutex<State>,
    next_id: AtomicU64,
    published: AtomicU64,
    lost_total: AtomicU64,
}

/// Cheap to clone: all clones share one hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("cfg", &self.inner.cfg).finish()
    }
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(State {
                    ring: VecDeque::with_capacity(cfg.ring_capacity.min(1 << 16)),
                    sinks: Vec::new(),
                    next_seq: 1,
                    closed: false,
                }),
                next_id: AtomicU64::new(1),
                published: AtomicU64::new(0),
                lost_total: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> HubConfig {
        self.inner.cfg
    }

    /// Spawns the fanout thread: it drains `rx` (records from the poller) and publishes
    /// them in chunks. When `rx` disconnects it closes the hub, so every sink sees the end
    /// of its stream after the last record.
    pub fn spawn_fanout(
        &self,
        rx: crossbeam_channel::Receiver<FlowRecord>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let hub = self.clone();
        std::thread::Builder::new()
            .name("flowlens-fanout".into())
            .spawn(move || {
                let mut chunk = Vec::with_capacity(FANOUT_CHUNK);
                while let Ok(first) = rx.recv() {
                    chunk.push(first);
                    chunk.extend(rx.try_iter().take(FANOUT_CHUNK - 1));
                    hub.publish_all(chunk.drain(..));
                }
                hub.close();
            })
    }

    /// Stores `rec` for replay and offers it to every sink; never waits on a sink.
    pub fn publish(&self, rec: FlowRecord) {
        self.publish_all(std::iter::once(rec));
    }

    pub fn publish_all(&self, recs: impl IntoIterator<Item = FlowRecord>) {
        let cap = self.inner.cfg.ring_capacity;
        let lost_total = &self.inner.lost_total;
        let mut st = self.lock();
        let mut n = 0;
        let mut gone = false;
        for rec in recs {
            n += 1;
            let env = Arc::new(Envelope::new(st.next_seq, rec));
            st.next_seq += 1;
            if cap > 0 {
                if st.ring.len() >= cap {
                    st.ring.pop_front();
                }
                st.ring.push_back(env.clone());
            }
            for s in &st.sinks {
                match s.tx.try_send(env.clone()) {
                    Ok(()) => {
                        s.counters.queued.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Full(_)) => s.counters.lose(1, lost_total),
                    Err(TrySendError::Closed(_)) => gone = true,
                }
            }
        }
        if gone {
            st.sinks.retain(|s| !s.tx.is_closed());
        }
        drop(st);
        self.inner.published.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether `close` was called: no record will be published any more.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Ends every sink's stream (after what is already queued) and makes later
    /// subscriptions replay-only.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.sinks.clear();
    }

    /// Registers a local sink (stdout, an exporter) with a queue of `sink_queue` records.
    pub fn add_sink(&self, kind: SinkKind, name: &str) -> SinkRx {
        let (counters, rx) = self.register(kind, name, self.inner.cfg.sink_queue);
        SinkRx {
            hub: self.clone(),
            counters,
            rx,
        }
    }

    fn new_counters(&self, kind: SinkKind, name: &str) -> Arc<SinkCounters> {
        Arc::new(SinkCounters {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            kind,
            name: name.to_owned(),
            connected: SystemTime::now(),
            queued: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            lost_pending: AtomicU64::new(0),
        })
    }

    fn register(
        &self,
        kind: SinkKind,
        name: &str,
        queue: usize,
    ) -> (Arc<SinkCounters>, mpsc::Receiver<Shared>) {
        let counters = self.new_counters(kind, name);
        let (tx, rx) = mpsc::channel(queue.max(1));
        let mut st = self.lock();
        if !st.closed {
            st.sinks.push(SinkEntry {
                tx,
                counters: counters.clone(),
            });
        }
        (counters, rx)
    }

    /// Registers a subscriber and starts its filter task on the current tokio runtime
    /// (so this must be called from within one). Its replay is taken atomically with
    /// registration, so replayed and live records neither overlap nor leave a gap.
    pub fn subscribe(&self, opts: SubscribeOptions) -> Subscription {
        let counters = self.new_counters(SinkKind::Subscriber, &opts.peer);
        let queue = self.inner.cfg.subscriber_queue.max(1);
        let (in_tx, in_rx) = mpsc::channel(queue);
        let mut st = self.lock();
        let ring: Vec<Shared> = if opts.wants_replay() {
            st.ring.iter().cloned().collect()
        } else {
            Vec::new()
        };
        let inbox = if opts.follow && !st.closed {
            st.sinks.push(SinkEntry {
                tx: in_tx,
                counters: counters.clone(),
            });
            Some(in_rx)
        } else {
            None
        };
        drop(st);
        let (out_tx, out_rx) = mpsc::channel(queue);
        let stage = FilterStage {
            selector: opts.selector.clone(),
            counters: counters.clone(),
            out: out_tx,
            lost_total: self.clone(),
            marker_owed: false,
            next_seq: None,
            spent: 0,
        };
        tokio::spawn(stage.run(ring, opts, inbox));
        Subscription {
            hub: self.clone(),
            counters,
            rx: Some(out_rx),
            marker_seen: false,
        }
    }

    pub fn stats(&self) -> HubStats {
        let st = self.lock();
        HubStats {
            ring_len: st.ring.len(),
            ring_capacity: self.inner.cfg.ring_capacity,
            published: self.inner.published.load(Ordering::Relaxed),
            lost_total: self.inner.lost_total.load(Ordering::Relaxed),
            sinks: st
                .sinks
                .iter()
                .map(|s| {
                    let c = &s.counters;
                    SinkStats {
                        id: c.id,
                        kind: c.kind,
                        name: c.name.clone(),
                        connected: c.connected,
                        queued: c.queued.load(Ordering::Relaxed),
                        delivered: c.delivered.load(Ordering::Relaxed),
                        lost: c.lost.load(Ordering::Relaxed),
                    }
                })
                .collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent enough to go on
        // streaming; refusing all later publishes would be worse.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unregister(&self, id: u64) {
        self.lock().sinks.retain(|s| s.counters.id != id);
    }
}

/// A local sink's end of the hub: records in emission order. Dropping it unregisters.
pub struct SinkRx {
    hub: Hub,
    counters: Arc<SinkCounters>,
    rx: mpsc::Receiver<Shared>,
}

impl SinkRx {
    /// Waits for up to `max` records (at least one); None once the hub is closed and
    /// everything queued was taken. For sinks on std threads.
    pub fn blocking_recv_many(&mut self, buf: &mut Vec<Shared>, max: usize) -> Option<usize> {
        let first = self.rx.blocking_recv()?;
        buf.push(first);
        while buf.len() < max {
            match self.rx.try_recv() {
                Ok(r) => buf.push(r),
                Err(_) => break,
            }
        }
        let n = buf.len();
        self.counters.queued.fetch_sub(n as u64, Ordering::Relaxed);
        self.counters
            .delivered
            .fetch_add(n as u64, Ordering::Relaxed);
        Some(n)
    }

    /// Waits for up to `max` records (at least one); 0 once the hub is closed and
    /// everything queued was taken.
    pub async fn recv_many(&mut self, buf: &mut Vec<Shared>, max: usize) -> usize {
        let n = self.rx.recv_many(buf, max).await;
        self.counters.queued.fetch_sub(n as u64, Ordering::Relaxed);
        self.counters
            .delivered
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// The next queued record, without waiting.
    pub fn try_recv(&mut self) -> Option<Shared> {
        let r = self.rx.try_recv().ok()?;
        self.counters.queued.fetch_sub(1, Ordering::Relaxed);
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        Some(r)
    }

    /// Records lost since the previous call.
    pub fn take_lost(&self) -> u64 {
        self.counters.lost_pending.swap(0, Ordering::Relaxed)
    }
}

impl Drop for SinkRx {
    fn drop(&mut self) {
        self.hub.unregister(self.counters.id);
    }
}

// ---------------------------------------------------------------------------
// Subscribers
// ---------------------------------------------------------------------------

/// What a subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub selector: Selector,
    /// Replay at most this many recent matching ring records (0: no limit).
    pub replay: usize,
    /// Replay the matching ring records with `last_seen >= since`.
    pub since: Option<SystemTime>,
    /// Replay the matching ring records numbered after this one.
    pub after_seq: Option<u64>,
    /// Stream new records after the replay.
    pub follow: bool,
    /// Remote address, for status.
    pub peer: String,
}

impl SubscribeOptions {
    fn wants_replay(&self) -> bool {
        self.replay > 0 || self.since.is_some() || self.after_seq.is_some()
    }
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            selector: Selector::default(),
            replay: 0,
            since: None,
            after_seq: None,
            follow: true,
            peer: String::new(),
        }
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// In emission order, at most [`BATCH_MAX_RECORDS`].
    Records(Vec<Shared>),
    /// This many records were dropped because a queue was full.
    Lost(u64),
}

enum Item {
    Record(Shared),
    /// Records were lost here; the count is in `SinkCounters::lost_pending`.
    LostMarker,
}

/// A subscriber's own task: replays, then filters live records from its inbox into its
/// outbox. A client that does not read fills the outbox, and the records its filters
/// matched are counted as lost, exactly; the hub's fanout is never held up.
struct FilterStage {
    selector: Selector,
    counters: Arc<SinkCounters>,
    out: mpsc::Sender<Item>,
    lost_total: Hub,
    /// A loss happened and its marker is not queued yet.
    marker_owed: bool,
    /// The sequence number the next live record should have; a gap was lost in the inbox.
    next_seq: Option<u64>,
    /// Filter evaluations since the task last yielded.
    spent: usize,
}

impl FilterStage {
    async fn run(
        mut self,
        ring: Vec<Shared>,
        opts: SubscribeOptions,
        inbox: Option<mpsc::Receiver<Shared>>,
    ) {
        if opts.wants_replay() {
            let limit = if opts.replay == 0 {
                usize::MAX
            } else {
                opts.replay
            };
            let mut replay = Vec::new();
            for r in ring.iter().rev() {
                if replay.len() >= limit {
                    break;
                }
                if opts.after_seq.is_some_and(|after| r.seq <= after) {
                    // The ring is in seq order: everything before this was seen too.
                    break;
                }
                if opts.since.is_none_or(|t| r.record.last_seen >= t) && self.matches(r).await {
                    replay.push(r.clone());
                }
            }
            drop(ring);
            for r in replay.into_iter().rev() {
                // Replay is bounded by the ring: it waits for the client instead of losing.
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                if self.out.send(Item::Record(r)).await.is_err() {
                    return;
                }
            }
        }
        let Some(mut inbox) = inbox else { return };
        // Taken in runs, so a busy stream costs one wake-up per run, not per record.
        let mut run = Vec::with_capacity(BATCH_MAX_RECORDS);
        while inbox.recv_many(&mut run, BATCH_MAX_RECORDS).await > 0 {
            self.counters
                .queued
                .fetch_sub(run.len() as u64, Ordering::Relaxed);
            for r in run.drain(..) {
                if let Some(want) = self.next_seq {
                    if r.seq > want {
                        // Counted by the hub when its queue was full; the marker goes here.
                        self.marker_owed = true;
                    }
                }
                self.next_seq = Some(r.seq + 1);
                if self.matches(&r).await && !self.offer(r) {
                    return;
                }
            }
        }
        if self.marker_owed {
            let _ = self.out.send(Item::LostMarker).await;
        }
    }

    async fn matches(&mut self, r: &Shared) -> bool {
        let cost = self.selector.len().max(1);
        self.spent += cost;
        if self.spent >= FILTER_BUDGET {
            self.spent = 0;
            tokio::task::yield_now().await;
        }
        self.selector.matches(&r.record)
    }

    /// Queues one record; false when the subscriber is gone.
    fn offer(&mut self, r: Shared) -> bool {
        if self.marker_owed {
            match self.out.try_send(Item::LostMarker) {
                Ok(()) => self.marker_owed = false,
                Err(TrySendError::Full(_)) => {
                    self.lose();
                    return true;
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        match self.out.try_send(Item::Record(r)) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Full(_)) => {
                self.lose();
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    fn lose(&mut self) {
        self.counters.lose(1, &self.lost_total.inner.lost_total);
        self.marker_owed = true;
    }
}

/// One subscriber's view of the hub; dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    counters: Arc<SinkCounters>,
    /// The filter task's outbox; None once it ended.
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
                    self.delivered(batch.len());
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

    fn delivered(&self, n: usize) {
        self.counters.queued.fetch_sub(n as u64, Ordering::Relaxed);
        self.counters
            .delivered
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    async fn fill_batch(&mut self, batch: &mut Vec<Shared>) {
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
        self.hub.unregister(self.counters.id);
    }
}
