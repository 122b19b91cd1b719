//! The record hub: numbers each record from the poller, keeps a ring for replay, and hands every record to every sink (stdout, each gRPC subscriber, exporters) without ever waiting on one.
//!
//! Each sink has its own bounded queue. The hub only `try_send`s into it: a full queue
//! loses the record for that sink alone, counts it, and the sink is told. Subscriber
//! filters run on the subscriber's own task, never under the hub's lock. Records travel
//! to a subscriber in runs (the records of one publish call), so a busy stream costs one
//! queue slot and one wake-up per run, not per record; the queues are still bounded in
//! records.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

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
const FANOUT_CHUNK: usize = 1024;

/// How long the fanout thread lets records gather when fewer than a chunk are waiting. A
/// poller sends records one at a time; without the pause every few records would cost a
/// wake-up of the fanout thread, and then of every subscriber's task, each.
const FANOUT_LINGER: Duration = Duration::from_micros(200);

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
    /// Boxed from the poller on: the record is never copied on its way to the sinks.
    pub record: Box<FlowRecord>,
    wire: OnceLock<Box<[u8]>>,
}

impl Envelope {
    pub fn new(seq: u64, record: Box<FlowRecord>) -> Envelope {
        Envelope {
            seq,
            record,
            wire: OnceLock::new(),
        }
    }

    /// The record's wire encoding, made by the first caller and shared with the rest.
    pub fn wire(&self, encode: impl FnOnce(u64, &FlowRecord) -> Box<[u8]>) -> &[u8] {
        self.wire.get_or_init(|| encode(self.seq, &self.record))
    }
}

pub type Shared = Arc<Envelope>;

/// Consecutive records of one publish call: what moves through a subscriber's queues as
/// one item. Every subscriber shares the same records; only the bounds are its own.
#[derive(Debug, Clone)]
struct Run {
    recs: RunRecords,
    start: usize,
    end: usize,
}

/// A lone record (a single publish, a replayed record) needs no shared slice.
#[derive(Debug, Clone)]
enum RunRecords {
    One(Shared),
    Many(Arc<[Shared]>),
}

impl Run {
    fn new(mut recs: Vec<Shared>) -> Run {
        let end = recs.len();
        let recs = match recs.pop() {
            Some(one) if recs.is_empty() => RunRecords::One(one),
            last => {
                recs.extend(last);
                RunRecords::Many(recs.into())
            }
        };
        Run {
            recs,
            start: 0,
            end,
        }
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn as_slice(&self) -> &[Shared] {
        let all = match &self.recs {
            RunRecords::One(r) => std::slice::from_ref(r),
            RunRecords::Many(rs) => rs,
        };
        &all[self.start..self.end]
    }

    /// The first `n` records as a run of their own.
    fn prefix(&self, n: usize) -> Run {
        Run {
            recs: self.recs.clone(),
            start: self.start,
            end: self.start + n.min(self.len()),
        }
    }

    /// Takes the first `n` records off this run into a run of their own.
    fn split_front(&mut self, n: usize) -> Run {
        let front = self.prefix(n);
        self.start = front.end;
        front
    }
}

/// A batch of records for one subscriber, in emission order: the runs it was taken from,
/// so handing a batch on costs nothing per record.
#[derive(Debug, Clone, Default)]
pub struct Records {
    runs: Vec<Run>,
    len: usize,
}

impl Records {
    fn push(&mut self, run: Run) {
        self.len += run.len();
        self.runs.push(run);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Shared> + '_ {
        self.runs.iter().flat_map(Run::as_slice)
    }
}

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
    /// A subscriber's records in its inbox, and in its outbox: each bounded by
    /// `subscriber_queue`. Only the sending side adds, so a reading is never too low.
    inbox: AtomicU64,
    outbox: AtomicU64,
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

/// A sink's queue: local sinks take records one by one, subscribers in runs.
enum SinkTx {
    Each(mpsc::Sender<Shared>),
    Runs(mpsc::Sender<Run>),
}

impl SinkTx {
    fn is_closed(&self) -> bool {
        match self {
            SinkTx::Each(tx) => tx.is_closed(),
            SinkTx::Runs(tx) => tx.is_closed(),
        }
    }
}

struct SinkEntry {
    tx: SinkTx,
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
        rx: crossbeam_channel::Receiver<Box<FlowRecord>>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let hub = self.clone();
        std::thread::Builder::new()
            .name("flowlens-fanout".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    if rx.len() < FANOUT_CHUNK - 1 {
                        std::thread::sleep(FANOUT_LINGER);
                    }
                    // Taken from the channel straight into the hub: one move per record.
                    let rest = rx.try_iter().take(FANOUT_CHUNK - 1);
                    hub.publish_all(std::iter::once(first).chain(rest));
                }
                hub.close();
            })
    }

    /// Stores `rec` for replay and offers it to every sink; never waits on a sink.
    pub fn publish(&self, rec: FlowRecord) {
        self.publish_all(std::iter::once(rec));
    }

    pub fn publish_all<R: Into<Box<FlowRecord>>>(&self, recs: impl IntoIterator<Item = R>) {
        let cap = self.inner.cfg.ring_capacity;
        let queue = self.inner.cfg.subscriber_queue.max(1);
        let lost_total = &self.inner.lost_total;
        let mut st = self.lock();
        let st = &mut *st;
        let mut next_seq = st.next_seq;
        let envs: Vec<Shared> = recs
            .into_iter()
            .map(|rec| {
                let env = Arc::new(Envelope::new(next_seq, rec.into()));
                next_seq += 1;
                env
            })
            .collect();
        st.next_seq = next_seq;
        let n = envs.len();
        if n == 0 {
            return;
        }
        if cap > 0 {
            // Only the last `cap` of a large call can stay.
            for env in &envs[n.saturating_sub(cap)..] {
                if st.ring.len() >= cap {
                    st.ring.pop_front();
                }
                st.ring.push_back(env.clone());
            }
        }
        let run = Run::new(envs);
        let mut gone = false;
        for s in &st.sinks {
            let c = &s.counters;
            match &s.tx {
                SinkTx::Each(tx) => {
                    for env in run.as_slice() {
                        match tx.try_send(env.clone()) {
                            Ok(()) => {
                                c.queued.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(TrySendError::Full(_)) => c.lose(1, lost_total),
                            Err(TrySendError::Closed(_)) => gone = true,
                        }
                    }
                }
                SinkTx::Runs(tx) => {
                    // What fits goes; the rest of the run is lost for this subscriber.
                    let room = queue.saturating_sub(c.inbox.load(Ordering::Relaxed) as usize);
                    let take = room.min(n);
                    if take == 0 {
                        gone |= tx.is_closed();
                    } else {
                        match tx.try_send(run.prefix(take)) {
                            Ok(()) => {
                                c.inbox.fetch_add(take as u64, Ordering::Relaxed);
                                c.queued.fetch_add(take as u64, Ordering::Relaxed);
                            }
                            Err(TrySendError::Full(_)) => c.lose(take as u64, lost_total),
                            Err(TrySendError::Closed(_)) => gone = true,
                        }
                    }
                    if take < n {
                        c.lose((n - take) as u64, lost_total);
                    }
                }
            }
        }
        if gone {
            st.sinks.retain(|s| !s.tx.is_closed());
        }
        self.inner.published.fetch_add(n as u64, Ordering::Relaxed);
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
            inbox: AtomicU64::new(0),
            outbox: AtomicU64::new(0),
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
                tx: SinkTx::Each(tx),
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
                tx: SinkTx::Runs(in_tx),
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
            queue,
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
            pending: None,
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
    Records(Records),
    /// This many records were dropped because a queue was full.
    Lost(u64),
}

enum Item {
    Records(Run),
    /// Records were lost here; the count is in `SinkCounters::lost_pending`.
    LostMarker,
}

/// Runs a subscriber's filter task takes from its inbox per wake-up.
const RUNS_PER_WAKE: usize = 64;

/// A subscriber's own task: replays, then filters live records from its inbox into its
/// outbox. A client that does not read fills the outbox, and the records its filters
/// matched are counted as lost, exactly; the hub's fanout is never held up.
struct FilterStage {
    selector: Selector,
    counters: Arc<SinkCounters>,
    /// Records the outbox holds at most.
    queue: usize,
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
        inbox: Option<mpsc::Receiver<Run>>,
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
                // Replay is bounded by the ring: it waits for the client instead of losing,
                // one record per queue slot so the outbox bound holds.
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                self.counters.outbox.fetch_add(1, Ordering::Relaxed);
                let one = Run::new(vec![r]);
                if self.out.send(Item::Records(one)).await.is_err() {
                    return;
                }
            }
        }
        let Some(mut inbox) = inbox else { return };
        let mut runs = Vec::with_capacity(RUNS_PER_WAKE);
        while inbox.recv_many(&mut runs, RUNS_PER_WAKE).await > 0 {
            for run in runs.drain(..) {
                let n = run.len() as u64;
                self.counters.inbox.fetch_sub(n, Ordering::Relaxed);
                self.counters.queued.fetch_sub(n, Ordering::Relaxed);
                let recs = run.as_slice();
                let (Some(first), Some(last)) = (recs.first(), recs.last()) else {
                    continue;
                };
                if self.next_seq.is_some_and(|want| first.seq > want) {
                    // Counted by the hub when the inbox was full; the marker goes here.
                    self.marker_owed = true;
                }
                self.next_seq = Some(last.seq + 1);
                let passed = if self.selector.is_empty() {
                    run
                } else {
                    let mut kept = Vec::new();
                    for r in recs {
                        if self.matches(r).await {
                            kept.push(r.clone());
                        }
                    }
                    if kept.is_empty() {
                        continue;
                    }
                    Run::new(kept)
                };
                if !self.offer(passed) {
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

    /// Queues what fits of `run` and loses the rest; false when the subscriber is gone.
    fn offer(&mut self, run: Run) -> bool {
        let n = run.len();
        if self.marker_owed {
            match self.out.try_send(Item::LostMarker) {
                Ok(()) => self.marker_owed = false,
                Err(TrySendError::Full(_)) => {
                    self.lose(n);
                    return true;
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        let queued = self.counters.outbox.load(Ordering::Relaxed) as usize;
        let take = self.queue.saturating_sub(queued).min(n);
        if take == 0 && self.out.is_closed() {
            return false;
        }
        if take > 0 {
            match self.out.try_send(Item::Records(run.prefix(take))) {
                Ok(()) => {
                    self.counters
                        .outbox
                        .fetch_add(take as u64, Ordering::Relaxed);
                    self.counters
                        .queued
                        .fetch_add(take as u64, Ordering::Relaxed);
                }
                Err(TrySendError::Full(_)) => self.lose(take),
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        if take < n {
            self.lose(n - take);
        }
        true
    }

    fn lose(&mut self, n: usize) {
        self.counters
            .lose(n as u64, &self.lost_total.inner.lost_total);
        self.marker_owed = true;
    }
}

/// One subscriber's view of the hub; dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    counters: Arc<SinkCounters>,
    /// The filter task's outbox; None once it ended.
    rx: Option<mpsc::Receiver<Item>>,
    /// The rest of a run the previous batch had no room for; it comes first.
    pending: Option<Run>,
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
        if let Some(run) = self.pending.take() {
            return Some(self.batch_from(run).await);
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
                Some(Item::Records(run)) => {
                    self.took(&run);
                    return Some(self.batch_from(run).await);
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

    /// A batch starting with `run`, filled from the outbox.
    async fn batch_from(&mut self, run: Run) -> Event {
        let mut batch = Records::default();
        self.add_to_batch(&mut batch, run);
        self.fill_batch(&mut batch).await;
        self.counters
            .queued
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        self.counters
            .delivered
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        Event::Records(batch)
    }

    /// Adds what fits of `run` to `batch`; the rest waits for the next batch.
    fn add_to_batch(&mut self, batch: &mut Records, mut run: Run) {
        let room = BATCH_MAX_RECORDS - batch.len();
        if run.len() > room {
            batch.push(run.split_front(room));
            self.pending = Some(run);
        } else {
            batch.push(run);
        }
    }

    /// A run left the outbox.
    fn took(&self, run: &Run) {
        self.counters
            .outbox
            .fetch_sub(run.len() as u64, Ordering::Relaxed);
    }

    async fn fill_batch(&mut self, batch: &mut Records) {
        let deadline = tokio::time::Instant::now() + BATCH_MAX_DELAY;
        while batch.len() < BATCH_MAX_RECORDS && self.pending.is_none() {
            let Some(rx) = self.rx.as_mut() else { return };
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
                Some(Item::Records(run)) => {
                    self.took(&run);
                    self.add_to_batch(batch, run);
                }
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
