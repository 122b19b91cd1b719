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

use crate::record::filter::{Selector, SubscribeOptions};
use crate::record::flow::FlowRecord;

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

/// Records handed out together: numbered once, shared by the ring and every sink, and freed
/// together. One allocation per record, made on one thread and freed on another, cost more
/// in glibc's arena locks than the stream's own work once it passed 1 M records/s.
///
/// A block is kept whole while any of its records is wanted, so what holds a few records of
/// a large block for long (a filter's matches, the head of a run a full queue cut short)
/// holds copies of them in a block of their own instead.
#[derive(Debug)]
pub struct Block {
    seqs: Seqs,
    records: Vec<FlowRecord>,
    wire: OnceLock<Wire>,
}

#[derive(Debug)]
enum Seqs {
    /// A batch as published: `first`, `first + 1`, ...
    From(u64),
    /// Records picked from several batches: each its own.
    Each(Vec<u64>),
}

impl Block {
    fn new(first_seq: u64, records: Vec<FlowRecord>) -> Block {
        Block {
            seqs: Seqs::From(first_seq),
            records,
            wire: OnceLock::new(),
        }
    }

    /// A block of copies of `picked`.
    fn copied<'a>(picked: impl IntoIterator<Item = RecordRef<'a>>) -> Block {
        let (seqs, records) = picked
            .into_iter()
            .map(|r| (r.seq(), r.record().clone()))
            .unzip();
        Block {
            seqs: Seqs::Each(seqs),
            records,
            wire: OnceLock::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn seq(&self, idx: usize) -> u64 {
        match &self.seqs {
            Seqs::From(first) => first + idx as u64,
            Seqs::Each(seqs) => seqs[idx],
        }
    }

    /// The records with their numbers, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &FlowRecord)> + '_ {
        self.records
            .iter()
            .enumerate()
            .map(|(i, r)| (self.seq(i), r))
    }

    /// The records' wire encodings, made once (by the first subscriber that sends a run of
    /// this block) and shared with the rest.
    pub fn wire(&self, encode: impl FnOnce(&Block) -> Wire) -> &Wire {
        self.wire.get_or_init(|| encode(self))
    }
}

/// A block's records encoded end to end, so that a run of them is one slice.
#[derive(Debug, Default)]
pub struct Wire {
    bytes: Vec<u8>,
    /// Where each record's encoding ends in `bytes`.
    ends: Vec<usize>,
}

impl Wire {
    /// The buffer the next record is appended to; `record_done` marks where it ends.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    pub fn record_done(&mut self) {
        self.ends.push(self.bytes.len());
    }

    /// The encodings of records `start..end`, end to end.
    pub fn slice(&self, start: usize, end: usize) -> &[u8] {
        if start >= end {
            return &[];
        }
        let from = if start == 0 { 0 } else { self.ends[start - 1] };
        &self.bytes[from..self.ends[end - 1]]
    }
}

/// A record as the hub hands it out: numbered in emission order and shared by every sink.
#[derive(Debug, Clone)]
pub struct Shared {
    block: Arc<Block>,
    idx: usize,
}

impl Shared {
    /// 1 for the first record of this agent run, then +1 per record.
    pub fn seq(&self) -> u64 {
        self.block.seq(self.idx)
    }

    pub fn record(&self) -> &FlowRecord {
        &self.block.records[self.idx]
    }
}

/// A record of a run or batch, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    block: &'a Arc<Block>,
    idx: usize,
}

impl<'a> RecordRef<'a> {
    pub fn seq(self) -> u64 {
        self.block.seq(self.idx)
    }

    pub fn record(self) -> &'a FlowRecord {
        &self.block.records[self.idx]
    }

    fn to_shared(self) -> Shared {
        Shared {
            block: self.block.clone(),
            idx: self.idx,
        }
    }
}

/// Consecutive records of a block: what moves through a subscriber's queues as one item.
/// Every subscriber shares the same block; only the bounds are its own.
#[derive(Debug, Clone)]
pub struct Run {
    block: Arc<Block>,
    start: usize,
    end: usize,
}

impl Run {
    fn new(block: Arc<Block>) -> Run {
        Run {
            end: block.len(),
            block,
            start: 0,
        }
    }

    /// The record `r` alone.
    fn one(r: &Shared) -> Run {
        Run {
            block: r.block.clone(),
            start: r.idx,
            end: r.idx + 1,
        }
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn get(&self, idx: usize) -> RecordRef<'_> {
        RecordRef {
            block: &self.block,
            idx,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'_>> + '_ {
        (self.start..self.end).map(|i| self.get(i))
    }

    /// The block and the range of its records this run is.
    pub fn block_range(&self) -> (&Arc<Block>, usize, usize) {
        (&self.block, self.start, self.end)
    }

    /// The first `n` records as a run of their own.
    fn prefix(&self, n: usize) -> Run {
        Run {
            block: self.block.clone(),
            start: self.start,
            end: self.start + n.min(self.len()),
        }
    }

    /// The first `n` records, to be queued: copied when they are a small part of a large
    /// block, which a queue slow to drain would otherwise keep whole for them.
    fn head_to_keep(&self, n: usize) -> Run {
        let n = n.min(self.len());
        if n == 0 || n * COPY_BELOW >= self.block.len() {
            return self.prefix(n);
        }
        Run::new(Arc::new(Block::copied(self.prefix(n).iter())))
    }

    /// Takes the first `n` records off this run into a run of their own.
    fn split_front(&mut self, n: usize) -> Run {
        let front = self.prefix(n);
        self.start = front.end;
        front
    }
}

/// A queue keeps a share of a block by reference only when the share is at least
/// 1/`COPY_BELOW` of it, so what it holds is at most this many times what it queued.
const COPY_BELOW: usize = 4;

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

    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'_>> + '_ {
        self.runs.iter().flat_map(Run::iter)
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
    /// The newest `ring_capacity` records: whole blocks, the oldest from its `.1`-th record.
    ring: VecDeque<(Arc<Block>, usize)>,
    ring_len: usize,
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
                    ring: VecDeque::new(),
                    ring_len: 0,
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

    /// Spawns the fanout thread: it drains `rx` (the poller's batches of records) and
    /// publishes them, several batches per hub lock. When `rx` disconnects it closes the
    /// hub, so every sink sees the end of its stream after the last record.
    pub fn spawn_fanout(
        &self,
        rx: crossbeam_channel::Receiver<Vec<FlowRecord>>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let hub = self.clone();
        std::thread::Builder::new()
            .name("flowlens-fanout".into())
            .spawn(move || {
                let mut batches = Vec::new();
                while let Ok(first) = rx.recv() {
                    let mut n = first.len();
                    if n < FANOUT_CHUNK && rx.is_empty() {
                        std::thread::sleep(FANOUT_LINGER);
                    }
                    batches.push(first);
                    while n < FANOUT_CHUNK {
                        let Ok(more) = rx.try_recv() else { break };
                        n += more.len();
                        batches.push(more);
                    }
                    hub.publish_batches(batches.drain(..));
                }
                hub.close();
            })
    }

    /// Stores `rec` for replay and offers it to every sink; never waits on a sink.
    pub fn publish(&self, rec: FlowRecord) {
        self.publish_batches([vec![rec]]);
    }

    /// Publishes `recs` as one run.
    pub fn publish_all(&self, recs: impl IntoIterator<Item = FlowRecord>) {
        self.publish_batches([recs.into_iter().collect::<Vec<_>>()]);
    }

    /// Publishes each batch as a run of its own, its records never copied, all under one
    /// lock of the hub.
    pub fn publish_batches(&self, batches: impl IntoIterator<Item = Vec<FlowRecord>>) {
        let mut st = self.lock();
        let st = &mut *st;
        let mut n = 0;
        for recs in batches {
            if recs.is_empty() {
                continue;
            }
            let block = Arc::new(Block::new(st.next_seq, recs));
            st.next_seq += block.len() as u64;
            n += block.len();
            self.keep(st, &block);
            self.offer(st, Run::new(block));
        }
        self.inner.published.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Keeps the newest `ring_capacity` records for replay.
    fn keep(&self, st: &mut State, block: &Arc<Block>) {
        let cap = self.inner.cfg.ring_capacity;
        if cap == 0 {
            return;
        }
        // Only the last `cap` of a large block can stay.
        let from = block.len().saturating_sub(cap);
        st.ring.push_back((block.clone(), from));
        st.ring_len += block.len() - from;
        while st.ring_len > cap {
            let Some((oldest, start)) = st.ring.front_mut() else {
                break;
            };
            let drop = (st.ring_len - cap).min(oldest.len() - *start);
            *start += drop;
            st.ring_len -= drop;
            if *start == oldest.len() {
                st.ring.pop_front();
            }
        }
    }

    /// Offers a run to every sink; what a sink's queue has no room for is lost for it.
    fn offer(&self, st: &mut State, run: Run) {
        let queue = self.inner.cfg.subscriber_queue.max(1);
        let lost_total = &self.inner.lost_total;
        let n = run.len();
        let mut gone = false;
        for s in &st.sinks {
            let c = &s.counters;
            match &s.tx {
                SinkTx::Each(tx) => {
                    // What fits goes; the rest of the run is lost for this sink.
                    let fits = run.head_to_keep(tx.capacity());
                    for r in fits.iter() {
                        match tx.try_send(r.to_shared()) {
                            Ok(()) => {
                                c.queued.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(TrySendError::Full(_)) => c.lose(1, lost_total),
                            Err(TrySendError::Closed(_)) => gone = true,
                        }
                    }
                    if fits.len() < n {
                        gone |= tx.is_closed();
                        c.lose((n - fits.len()) as u64, lost_total);
                    }
                }
                SinkTx::Runs(tx) => {
                    // What fits goes; the rest of the run is lost for this subscriber.
                    let room = queue.saturating_sub(c.inbox.load(Ordering::Relaxed) as usize);
                    let take = room.min(n);
                    if take == 0 {
                        gone |= tx.is_closed();
                    } else {
                        match tx.try_send(run.head_to_keep(take)) {
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
            st.ring
                .iter()
                .flat_map(|(block, start)| {
                    (*start..block.len()).map(|idx| Shared {
                        block: block.clone(),
                        idx,
                    })
                })
                .collect()
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
            ring_len: st.ring_len,
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
                if opts.after_seq.is_some_and(|after| r.seq() <= after) {
                    // The ring is in seq order: everything before this was seen too.
                    break;
                }
                if opts.since.is_none_or(|t| r.record().emitted >= t)
                    && self.matches(r.record()).await
                {
                    replay.push(r.clone());
                }
            }
            drop(ring);
            for r in replay.into_iter().rev() {
                // Replay is bounded by the ring: it waits for the client instead of losing,
                // one record per queue slot so the outbox bound holds. It refers to the
                // ring's blocks, which every replay shares, so it keeps no more than the
                // ring held when it began.
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                self.counters.outbox.fetch_add(1, Ordering::Relaxed);
                let one = Run::one(&r);
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
                if run.is_empty() {
                    continue;
                }
                let (first, last) = (run.get(run.start).seq(), run.get(run.end - 1).seq());
                if self.next_seq.is_some_and(|want| first > want) {
                    // Counted by the hub when the inbox was full; the marker goes here.
                    self.marker_owed = true;
                }
                self.next_seq = Some(last + 1);
                let passed = if self.selector.is_empty() {
                    run
                } else {
                    let mut kept = Vec::new();
                    for r in run.iter() {
                        if self.matches(r.record()).await {
                            kept.push(r);
                        }
                    }
                    if kept.len() == run.len() {
                        run
                    } else if kept.is_empty() {
                        continue;
                    } else {
                        // Copies: a few matches must not keep whole batches queued.
                        Run::new(Arc::new(Block::copied(kept)))
                    }
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

    async fn matches(&mut self, r: &FlowRecord) -> bool {
        let cost = self.selector.len().max(1);
        self.spent += cost;
        if self.spent >= FILTER_BUDGET {
            self.spent = 0;
            tokio::task::yield_now().await;
        }
        self.selector.matches(r)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::filter::Filter;
    use crate::record::flow::IPPROTO_TCP;

    /// A poller batch of `n` UDP records, every tenth TCP.
    fn batch(n: usize) -> Vec<FlowRecord> {
        (0..n)
            .map(|i| {
                let mut r = FlowRecord::example();
                r.client_port = i as u16;
                if i % 10 == 0 {
                    r.protocol = IPPROTO_TCP;
                }
                r
            })
            .collect()
    }

    fn cfg(queue: usize) -> HubConfig {
        HubConfig {
            ring_capacity: 100,
            subscriber_queue: queue,
            sink_queue: queue,
        }
    }

    /// The records a batch holds and the block each run of it keeps.
    fn kept(recs: &Records) -> Vec<(u64, usize)> {
        recs.runs()
            .iter()
            .flat_map(|run| run.iter().map(|r| (r.seq(), run.block_range().0.len())))
            .collect()
    }

    #[test]
    fn a_sink_short_of_room_keeps_copies_of_what_fits_not_the_whole_batch() {
        let hub = Hub::new(cfg(10));
        let mut sink = hub.add_sink(SinkKind::Export, "test");
        hub.publish_batches([batch(1024)]);
        let got: Vec<Shared> = std::iter::from_fn(|| sink.try_recv()).collect();
        let seqs: Vec<u64> = got.iter().map(Shared::seq).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        assert!(got.iter().all(|r| r.block.len() == 10), "a copy of 10");
        assert_eq!(got[3].record().client_port, 3);
        assert_eq!(sink.take_lost(), 1014);
        // With room for a quarter of the batch or more, the batch itself is shared.
        hub.publish_batches([batch(40)]);
        let got: Vec<Shared> = std::iter::from_fn(|| sink.try_recv()).collect();
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(|r| r.block.len() == 40));
        assert_eq!(got[0].seq(), 1025);
    }

    /// Every record and the loss a subscription reports until its stream ends.
    async fn drain(sub: &mut Subscription) -> (Vec<(u64, usize)>, u64) {
        let (mut recs, mut lost) = (Vec::new(), 0);
        while let Some(ev) = sub.next_event().await {
            match ev {
                Event::Records(r) => recs.extend(kept(&r)),
                Event::Lost(n) => lost += n,
            }
        }
        (recs, lost)
    }

    #[tokio::test]
    async fn a_subscriber_keeps_copies_of_its_filters_matches_and_of_a_cut_run() {
        let hub = Hub::new(cfg(200));
        let tcp = Selector {
            include: vec![Filter {
                protocol: Some(IPPROTO_TCP),
                ..Filter::default()
            }],
            exclude: Vec::new(),
        };
        let mut filtered = hub.subscribe(SubscribeOptions {
            selector: tcp,
            ..SubscribeOptions::default()
        });
        let mut all = hub.subscribe(SubscribeOptions::default());
        hub.publish_batches([batch(1024)]);
        hub.close();
        // 200 of 1,024 fit a queue: copies, as a small part of the batch, numbered as
        // published. The filter's 20 matches among them are copied again, alone.
        let want: Vec<(u64, usize)> = (1..=200).step_by(10).map(|s| (s, 20)).collect();
        assert_eq!(drain(&mut filtered).await, (want, 824));
        let want: Vec<(u64, usize)> = (1..=200).map(|s| (s, 200)).collect();
        assert_eq!(drain(&mut all).await, (want, 824));
    }

    #[tokio::test]
    async fn a_replay_refers_to_the_rings_blocks() {
        let hub = Hub::new(cfg(200));
        hub.publish_batches([batch(50)]);
        let mut replay = hub.subscribe(SubscribeOptions {
            replay: 10,
            follow: false,
            ..SubscribeOptions::default()
        });
        // Shared with the ring and every other replay: bounded by what the ring holds.
        let want: Vec<(u64, usize)> = (41..=50).map(|s| (s, 50)).collect();
        assert_eq!(drain(&mut replay).await, (want, 0));
    }
}
