//! The log: numbered blocks of encoded records, oldest first, bounded in bytes, that every reader follows with a cursor of its own.
//!
//! A block leaves the log when every reader has passed it and the newest `--replay-ring`
//! records do not include it, or, whoever has not read it yet, when the log holds more than
//! `--buffer-memory`: a reader that was still behind it has lost its records and learns so
//! from the gap between its cursor and the oldest block (`Gap`), exactly.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use crate::hub::{HubConfig, SinkKind};
use crate::record::encoding::{DecodeError, EncodedBatch, RecordDecoder, Stamp};
use crate::record::flow::FlowRecord;

/// Forms of a block a sink may derive once and share (a gRPC frame compressed with one
/// codec): at most this many per block.
pub const DERIVED_SLOTS: usize = 4;

/// What a block costs beyond its encoded bytes: the block itself, its `Arc`, its place in
/// the log.
const BLOCK_OVERHEAD: usize = 256;

/// Records numbered and encoded together, once, and shared by every reader: the unit the
/// log keeps and lets go of.
#[derive(Debug)]
pub struct Block {
    first_seq: u64,
    batch: EncodedBatch,
    derived: [OnceLock<Bytes>; DERIVED_SLOTS],
    /// Bytes of derived forms counted in the log's total; changed under the log's lock.
    counted: AtomicUsize,
    log: Weak<Shared>,
}

impl Block {
    /// The seq of its first record.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The seq after its last record.
    pub fn end_seq(&self) -> u64 {
        self.first_seq + self.batch.len() as u64
    }

    pub fn len(&self) -> usize {
        self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// The records as the `SubscribeResponse` gRPC message of one batch.
    pub fn batch(&self) -> &EncodedBatch {
        &self.batch
    }

    /// The form `slot` names, made by `make` the first time anyone asks and shared with
    /// everyone after; its bytes count against the log's bound while the block is in it.
    pub fn derived(&self, slot: usize, make: impl FnOnce(&Block) -> Bytes) -> Bytes {
        let mut made = 0;
        let form = self.derived[slot]
            .get_or_init(|| {
                let b = make(self);
                made = b.len();
                b
            })
            .clone();
        if made > 0 {
            if let Some(log) = self.log.upgrade() {
                log.count_derived(self, made);
            }
        }
        form
    }

    /// Bytes this block holds.
    fn size(&self) -> usize {
        self.batch.heap_bytes() + BLOCK_OVERHEAD + self.counted.load(Ordering::Relaxed)
    }
}

/// Consecutive records of one block: what a reader takes from the log at a time.
#[derive(Debug, Clone)]
pub struct Run {
    block: Arc<Block>,
    start: usize,
    end: usize,
}

impl Run {
    /// Records `0..end` of `block`.
    pub(crate) fn head(block: Arc<Block>, end: usize) -> Run {
        Run {
            end: end.min(block.len()),
            block,
            start: 0,
        }
    }

    pub fn block(&self) -> &Arc<Block> {
        &self.block
    }

    /// The records of the block it covers: `start..end`.
    pub fn range(&self) -> (usize, usize) {
        (self.start, self.end)
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn first_seq(&self) -> u64 {
        self.block.first_seq + self.start as u64
    }

    pub fn end_seq(&self) -> u64 {
        self.block.first_seq + self.end as u64
    }

    /// Whether it is its whole block.
    pub fn is_whole(&self) -> bool {
        self.start == 0 && self.end == self.block.len()
    }

    /// Its `FlowBatch.records` entries, end to end.
    pub fn entries(&self) -> &[u8] {
        self.block.batch.entries(self.start, self.end)
    }

    /// Each record's seq and `FlowRecord` bytes.
    pub fn encoded(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        (self.start..self.end)
            .map(|i| (self.block.first_seq + i as u64, self.block.batch.record(i)))
    }

    /// The records decoded into `into`'s first entries, reusing the records it holds
    /// ([`RecordDecoder::decode_into`]) and keeping those after them for the next run:
    /// how many decoded (a record that does not is left out).
    pub fn decode_into(&self, dec: &mut RecordDecoder, into: &mut Vec<FlowRecord>) -> usize {
        let mut n = 0;
        for (_, bytes) in self.encoded() {
            if let Some(r) = into.get_mut(n) {
                n += usize::from(dec.decode_into(bytes, r).is_ok());
            } else if let Ok((_, r)) = dec.decode(bytes) {
                into.push(r);
                n += 1;
            }
        }
        n
    }

    /// The records, decoded.
    pub fn decode<'a>(
        &'a self,
        dec: &'a mut RecordDecoder,
    ) -> impl Iterator<Item = Result<(Stamp, FlowRecord), DecodeError>> + 'a {
        self.encoded().map(|(_, bytes)| dec.decode(bytes))
    }
}

/// Records a reader missed: seqs `first_seq..=last_seq` left the log before it read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub first_seq: u64,
    pub last_seq: u64,
}

impl Gap {
    pub fn count(&self) -> u64 {
        self.last_seq + 1 - self.first_seq
    }
}

/// What the log says about the end of what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tail {
    /// The seq the next record will get.
    pub next_seq: u64,
    pub closed: bool,
}

/// One reader's place, for the log (what it may let go) and for status.
#[derive(Debug)]
pub(crate) struct Slot {
    pub id: u64,
    pub kind: SinkKind,
    pub name: String,
    pub connected: SystemTime,
    /// Every record before this one was read, skipped or lost by the reader.
    pub next_seq: AtomicU64,
    pub delivered: AtomicU64,
    /// Losses reported to the reader.
    pub lost: AtomicU64,
    /// It reads the log itself (no filter task): what the log let go between its place
    /// and the oldest block held is lost already, though not yet reported.
    pub direct: bool,
}

impl Slot {
    /// Lost so far: reported, and (for a direct reader) gone from the log before it got
    /// there, so that a reader stuck on a blocked output shows its losses.
    pub fn lost_by(&self, front_seq: u64) -> u64 {
        let pending = if self.direct {
            front_seq.saturating_sub(self.next_seq.load(Ordering::Relaxed))
        } else {
            0
        };
        self.lost.load(Ordering::Relaxed) + pending
    }
}

#[derive(Debug)]
struct State {
    blocks: VecDeque<Arc<Block>>,
    bytes: usize,
    records: usize,
    next_seq: u64,
    closed: bool,
    readers: Vec<Arc<Slot>>,
}

impl State {
    fn front_seq(&self) -> u64 {
        self.blocks.front().map_or(self.next_seq, |b| b.first_seq)
    }

    /// Lets go of the blocks no reader needs beyond the replay minimum, then of the
    /// oldest, read or not, while the log is over its bound (never the newest block).
    fn trim(&mut self, cfg: &HubConfig) {
        let passed = self
            .readers
            .iter()
            .map(|r| r.next_seq.load(Ordering::Relaxed))
            .min()
            .unwrap_or(self.next_seq);
        while let Some(front) = self.blocks.front() {
            let read = front.end_seq() <= passed && self.records - front.len() >= cfg.ring_capacity;
            let over = self.bytes > cfg.buffer_memory && self.blocks.len() > 1;
            if !(read || over) {
                break;
            }
            self.bytes -= front.size();
            self.records -= front.len();
            self.blocks.pop_front();
        }
    }

    /// The run of the block holding `seq` (which the log holds), at most `max` records.
    fn run_at(&self, seq: u64, max: usize, end: Option<u64>) -> Run {
        let i = self.blocks.partition_point(|b| b.end_seq() <= seq);
        let block = self.blocks[i].clone();
        let start = (seq - block.first_seq) as usize;
        let mut stop = block.len().min(start + max);
        if let Some(e) = end {
            stop = stop.min((e.saturating_sub(block.first_seq)) as usize);
        }
        Run {
            block,
            start,
            end: stop,
        }
    }
}

/// The log and what readers wait on; one per hub.
#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: HubConfig,
    pub run: u64,
    pub started: SystemTime,
    state: Mutex<State>,
    /// Blocking readers wait on it; async readers on `tail`.
    appended: Condvar,
    tail: watch::Sender<Tail>,
    /// The next seq to hand out: held while a publisher numbers and encodes, so blocks
    /// reach the log in seq order.
    pub numbering: Mutex<u64>,
    next_id: AtomicU64,
    pub published: AtomicU64,
    /// Records lost by subscribers, departed ones included.
    pub lost_total: AtomicU64,
}

impl Shared {
    pub fn new(cfg: HubConfig, run: u64) -> Arc<Shared> {
        let (tail, _) = watch::channel(Tail {
            next_seq: 1,
            closed: false,
        });
        Arc::new(Shared {
            cfg,
            run,
            started: SystemTime::now(),
            state: Mutex::new(State {
                blocks: VecDeque::new(),
                bytes: 0,
                records: 0,
                next_seq: 1,
                closed: false,
                readers: Vec::new(),
            }),
            appended: Condvar::new(),
            tail,
            numbering: Mutex::new(1),
            next_id: AtomicU64::new(1),
            published: AtomicU64::new(0),
            lost_total: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the log consistent enough to go on
        // streaming; refusing every later publish would be worse.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn block(self: &Arc<Shared>, first_seq: u64, batch: EncodedBatch) -> Block {
        Block {
            first_seq,
            batch,
            derived: Default::default(),
            counted: AtomicUsize::new(0),
            log: Arc::downgrade(self),
        }
    }

    /// Appends blocks numbered from the log's tail on, lets go of what it no longer needs,
    /// and wakes the readers.
    pub fn append(&self, blocks: Vec<Block>) {
        if blocks.is_empty() {
            return;
        }
        let mut st = self.lock();
        let mut n = 0;
        for b in blocks {
            debug_assert_eq!(b.first_seq, st.next_seq, "blocks out of order");
            st.next_seq = b.end_seq();
            st.bytes += b.size();
            st.records += b.len();
            n += b.len();
            st.blocks.push_back(Arc::new(b));
        }
        st.trim(&self.cfg);
        let tail = Tail {
            next_seq: st.next_seq,
            closed: st.closed,
        };
        drop(st);
        self.published.fetch_add(n as u64, Ordering::Relaxed);
        self.appended.notify_all();
        self.tail.send_replace(tail);
    }

    fn count_derived(&self, block: &Block, n: usize) {
        let mut st = self.lock();
        if block.first_seq >= st.front_seq() && block.first_seq < st.next_seq {
            block.counted.fetch_add(n, Ordering::Relaxed);
            st.bytes += n;
        }
    }

    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        let tail = Tail {
            next_seq: st.next_seq,
            closed: true,
        };
        drop(st);
        self.appended.notify_all();
        self.tail.send_replace(tail);
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn watch_tail(&self) -> watch::Receiver<Tail> {
        self.tail.subscribe()
    }

    /// A new reader's slot, placed where `at` says given the log's oldest seq, next seq
    /// and whether it is closed (so the log keeps what the reader will read from there).
    /// Returns it with those three, as they were at that instant.
    pub fn register(
        &self,
        kind: SinkKind,
        name: &str,
        direct: bool,
        at: impl FnOnce(u64, u64, bool) -> u64,
    ) -> (Arc<Slot>, u64, u64, bool) {
        let mut st = self.lock();
        let (front, tail, closed) = (st.front_seq(), st.next_seq, st.closed);
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            kind,
            name: name.to_owned(),
            connected: SystemTime::now(),
            next_seq: AtomicU64::new(at(front, tail, closed)),
            delivered: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            direct,
        });
        st.readers.push(slot.clone());
        (slot, front, tail, closed)
    }

    /// Removes a reader; returns what it had lost without being told (see `Slot::lost_by`).
    pub fn unregister(&self, slot: &Slot) -> u64 {
        let mut st = self.lock();
        st.readers.retain(|r| r.id != slot.id);
        let unreported = slot.lost_by(st.front_seq()) - slot.lost.load(Ordering::Relaxed);
        st.trim(&self.cfg);
        unreported
    }

    /// Moves a reader's slot, and lets go of what no reader needs any more.
    pub fn moved(&self, slot: &Slot, next_seq: u64) {
        slot.next_seq.store(next_seq, Ordering::Relaxed);
        let mut st = self.lock();
        if st.blocks.front().is_some_and(|b| b.end_seq() <= next_seq)
            && st.records > self.cfg.ring_capacity
        {
            st.trim(&self.cfg);
        }
    }

    /// The block holding record `seq - 1`, if the log still holds it.
    pub fn block_before(&self, seq: u64) -> Option<Arc<Block>> {
        let st = self.lock();
        if seq <= st.front_seq() || seq > st.next_seq {
            return None;
        }
        let i = st.blocks.partition_point(|b| b.end_seq() < seq);
        st.blocks.get(i).cloned()
    }

    /// Waits (blocking) until a record at or after `seq` is published, the log closes, or
    /// `wait` passes; false when it timed out.
    pub fn wait_blocking(&self, seq: u64, wait: Option<Duration>) -> bool {
        let mut st = self.lock();
        let deadline = wait.map(|w| std::time::Instant::now() + w);
        while st.next_seq <= seq && !st.closed {
            match deadline {
                None => st = self.appended.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    st = self
                        .appended
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        true
    }

    pub fn stats(&self) -> LogStats {
        let st = self.lock();
        LogStats {
            records: st.records,
            bytes: st.bytes,
            front_seq: if st.blocks.is_empty() {
                0
            } else {
                st.front_seq()
            },
            next_seq: st.next_seq,
            held_from: st.front_seq(),
            readers: st.readers.clone(),
        }
    }
}

pub(crate) struct LogStats {
    pub records: usize,
    pub bytes: usize,
    /// 0 when the log holds nothing.
    pub front_seq: u64,
    pub next_seq: u64,
    /// The log's front as readers see it (the next seq when empty).
    pub held_from: u64,
    pub readers: Vec<Arc<Slot>>,
}

/// What a cursor found at its place in the log.
#[derive(Debug)]
pub(crate) enum Step {
    Run(Run),
    /// Records it had not read left the log; the cursor now stands at the oldest held.
    Gap(Gap),
    /// Nothing to read yet.
    Wait,
    /// Nothing more will come: the log closed, or the cursor reached its end.
    End,
}

/// A place in the log, moved by its reader alone.
#[derive(Debug)]
pub(crate) struct Cursor {
    pub next: u64,
    /// Where reading stops (a replay without follow); None: never.
    pub end: Option<u64>,
}

impl Cursor {
    /// The next run of at most `max` records, or why there is none. With `only_small`
    /// (adding to a batch already begun) only a whole block of fewer than `share_min`
    /// records that fits is taken; a gap, a large block or a part of one is left for the
    /// next call (Wait), so that large blocks are sent whole, as they are shared.
    pub fn step(&mut self, log: &Shared, max: usize, only_small: Option<usize>) -> Step {
        let st = log.lock();
        if self.end.is_some_and(|e| self.next >= e) {
            return Step::End;
        }
        let front = st.front_seq();
        if self.next < front {
            if only_small.is_some() {
                return Step::Wait;
            }
            let gap = Gap {
                first_seq: self.next,
                last_seq: front - 1,
            };
            self.next = front;
            return Step::Gap(gap);
        }
        if self.next >= st.next_seq {
            return if st.closed { Step::End } else { Step::Wait };
        }
        let run = st.run_at(self.next, max, self.end);
        if let Some(share_min) = only_small {
            if !run.is_whole() || run.len() >= share_min {
                return Step::Wait;
            }
        }
        self.next = run.end_seq();
        Step::Run(run)
    }
}
