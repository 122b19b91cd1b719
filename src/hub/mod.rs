//! The record hub: numbers the poller's records in blocks, encodes each block once, and keeps them in one log bounded in bytes that every reader (stdout, each gRPC subscriber, exporters) follows at its own pace; it never waits on a reader.
//!
//! The log is the replay ring and every reader's queue at once: a block stays while a
//! reader still has to read it (within `--buffer-memory`) and while it is among the newest
//! `--replay-ring` records. A reader that keeps up on average loses nothing to a burst; one
//! that falls behind the bound loses the records the log let go, and is told exactly how
//! many (after its filters, for a subscriber). Records carry the agent run's random id, so
//! a subscriber can resume after `(run, seq)` across blips and restarts.

mod log;
mod reader;
mod subscription;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use log::{Block, Gap, Run, DERIVED_SLOTS};
pub use reader::{Next, SinkRx};
pub use subscription::{Event, Lost, LostReason, Records, Restart, Subscription, SHARE_MIN};

use crate::record::encoding::{BatchWriter, Stamp};
use crate::record::filter::SubscribeOptions;
use crate::record::flow::FlowRecord;

/// Most records in one block, and in one batch a subscriber receives.
pub const BATCH_MAX_RECORDS: usize = 1000;

/// Records the fanout thread takes from the poller per publish, so a busy poller does not
/// pay one lock round-trip per batch.
const FANOUT_CHUNK: usize = 4 * BATCH_MAX_RECORDS;

/// How long the fanout thread lets records gather when fewer than a block are waiting: a
/// poller handing over a few records at a time would otherwise make a block, and a wake-up
/// of every reader, every few records.
const FANOUT_LINGER: Duration = Duration::from_micros(200);

/// `--buffer-memory` unless given: a burst of 1 M records of the realistic mix fits.
pub const DEFAULT_BUFFER_MEMORY: usize = 256 << 20;

/// The smallest `--buffer-memory` accepted. The log always keeps its newest block, so
/// below a full block (about 200 KiB) it holds just that.
pub const MIN_BUFFER_MEMORY: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubConfig {
    /// Bytes the log may hold: encoded records and the compressed forms made of them.
    pub buffer_memory: usize,
    /// Records kept for replay after every reader has read them.
    pub ring_capacity: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            buffer_memory: DEFAULT_BUFFER_MEMORY,
            ring_capacity: 10_000,
        }
    }
}

/// What kind of reader a sink is, for status and metrics.
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStats {
    pub id: u64,
    pub kind: SinkKind,
    /// "stdout", an exporter's destination, or a subscriber's peer address.
    pub name: String,
    pub connected: SystemTime,
    /// Records published that it has not read yet (before filters): how far behind it is.
    pub queued: u64,
    pub delivered: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubStats {
    /// This agent run's id.
    pub run: u64,
    /// Records the log holds.
    pub ring_len: usize,
    /// Records it keeps after every reader read them (`--replay-ring`).
    pub ring_capacity: usize,
    /// Bytes the log holds, and its bound.
    pub buffer_bytes: usize,
    pub buffer_capacity: usize,
    /// The oldest record held; 0 when none.
    pub oldest_seq: u64,
    pub published: u64,
    /// Lost by all subscribers since start, departed ones included.
    pub lost_total: u64,
    pub sinks: Vec<SinkStats>,
}

impl HubStats {
    pub fn subscribers(&self) -> impl Iterator<Item = &SinkStats> {
        self.sinks.iter().filter(|s| s.kind == SinkKind::Subscriber)
    }
}

/// Cheap to clone: all clones share one hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<log::Shared>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("cfg", &self.inner.cfg)
            .field("run", &self.inner.run)
            .finish()
    }
}

impl Hub {
    /// A hub for a new agent run, with a random run id.
    pub fn new(cfg: HubConfig) -> Hub {
        Hub::with_run(cfg, random_run())
    }

    /// A hub whose run id is `run` (tests).
    pub fn with_run(cfg: HubConfig, run: u64) -> Hub {
        Hub {
            inner: log::Shared::new(cfg, run),
        }
    }

    pub fn config(&self) -> HubConfig {
        self.inner.cfg
    }

    /// This agent run's id: `run` of every record.
    pub fn run(&self) -> u64 {
        self.inner.run
    }

    /// When this run's hub was made.
    pub fn started(&self) -> SystemTime {
        self.inner.started
    }

    /// Spawns the fanout thread: it drains `rx` (the poller's batches of records) and
    /// publishes them in blocks of [`BATCH_MAX_RECORDS`]. While more are coming it keeps
    /// the tail that does not fill a block for the next round, so a bulk end makes full
    /// blocks (each one batch for a subscriber, compressed once for all) even though the
    /// poller's batches are of another size. When `rx` disconnects it closes the hub, so
    /// every reader sees the end of its stream after the last record.
    pub fn spawn_fanout(
        &self,
        rx: crossbeam_channel::Receiver<Vec<FlowRecord>>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let hub = self.clone();
        std::thread::Builder::new()
            .name("flowlens-fanout".into())
            .spawn(move || {
                let mut pending = Pending::default();
                while let Ok(first) = rx.recv() {
                    pending.push(first);
                    if pending.len < BATCH_MAX_RECORDS && rx.is_empty() {
                        std::thread::sleep(FANOUT_LINGER);
                    }
                    while pending.len < FANOUT_CHUNK {
                        let Ok(more) = rx.try_recv() else { break };
                        pending.push(more);
                    }
                    let whole = if rx.is_empty() {
                        pending.len
                    } else {
                        pending.len / BATCH_MAX_RECORDS * BATCH_MAX_RECORDS
                    };
                    hub.publish_records(pending.iter().take(whole));
                    pending.consume(whole);
                }
                hub.publish_records(pending.iter());
                hub.close();
            })
    }

    /// Numbers `rec` and appends it to the log as a block of its own.
    pub fn publish(&self, rec: FlowRecord) {
        self.publish_batches([vec![rec]]);
    }

    /// Publishes `recs` together: in blocks of up to [`BATCH_MAX_RECORDS`].
    pub fn publish_all(&self, recs: impl IntoIterator<Item = FlowRecord>) {
        self.publish_batches([recs.into_iter().collect::<Vec<_>>()]);
    }

    /// Numbers the records of `batches` in order, encodes them into blocks of up to
    /// [`BATCH_MAX_RECORDS`] (a block may hold the records of several batches), and
    /// appends the blocks to the log.
    pub fn publish_batches(&self, batches: impl IntoIterator<Item = Vec<FlowRecord>>) {
        let batches: Vec<Vec<FlowRecord>> = batches.into_iter().collect();
        self.publish_records(batches.iter().flatten());
    }

    /// Numbers and encodes `recs` into blocks, once, outside the log's lock (readers
    /// decode what they need), and appends them.
    fn publish_records<'a>(&self, recs: impl Iterator<Item = &'a FlowRecord>) {
        let mut numbering = self
            .inner
            .numbering
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut next = *numbering;
        let mut first = next;
        let mut blocks = Vec::new();
        let mut writer: Option<BatchWriter> = None;
        for r in recs {
            let w = writer.get_or_insert_with(|| BatchWriter::with_capacity(BATCH_MAX_RECORDS));
            w.record(
                Stamp {
                    run: self.inner.run,
                    seq: next,
                },
                r,
            );
            next += 1;
            if w.len() == BATCH_MAX_RECORDS {
                let full = writer.take().expect("a writer");
                blocks.push(self.inner.block(first, full.finish()));
                first = next;
            }
        }
        if let Some(w) = writer.filter(|w| !w.is_empty()) {
            blocks.push(self.inner.block(first, w.finish()));
        }
        *numbering = next;
        self.inner.append(blocks);
    }

    /// Whether `close` was called: no record will be published any more.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Ends every reader's stream once it has read everything the log holds, and makes
    /// later subscriptions replay-only.
    pub fn close(&self) {
        self.inner.close();
    }

    /// Registers a local sink (stdout, an exporter): it reads every record published from
    /// now on.
    pub fn add_sink(&self, kind: SinkKind, name: &str) -> SinkRx {
        SinkRx::new(self, kind, name)
    }

    /// Registers a subscriber. With filters (or `since`) it starts the subscriber's filter
    /// task on the current tokio runtime, so it must then be called within one.
    pub fn subscribe(&self, opts: SubscribeOptions) -> Subscription {
        Subscription::new(self, opts)
    }

    pub fn stats(&self) -> HubStats {
        let log = self.inner.stats();
        let unreported: u64 = log
            .readers
            .iter()
            .filter(|s| s.kind == SinkKind::Subscriber)
            .map(|s| s.lost_by(log.held_from) - s.lost.load(Ordering::Relaxed))
            .sum();
        HubStats {
            run: self.inner.run,
            ring_len: log.records,
            ring_capacity: self.inner.cfg.ring_capacity,
            buffer_bytes: log.bytes,
            buffer_capacity: self.inner.cfg.buffer_memory,
            oldest_seq: log.front_seq,
            published: self.inner.published.load(Ordering::Relaxed),
            lost_total: self.inner.lost_total.load(Ordering::Relaxed) + unreported,
            sinks: log
                .readers
                .iter()
                .map(|s| SinkStats {
                    id: s.id,
                    kind: s.kind,
                    name: s.name.clone(),
                    connected: s.connected,
                    queued: log
                        .next_seq
                        .saturating_sub(s.next_seq.load(Ordering::Relaxed)),
                    delivered: s.delivered.load(Ordering::Relaxed),
                    lost: s.lost_by(log.held_from),
                })
                .collect(),
        }
    }
}

/// The poller's batches the fanout holds: the front one from `start` on.
#[derive(Default)]
struct Pending {
    batches: std::collections::VecDeque<Vec<FlowRecord>>,
    start: usize,
    len: usize,
}

impl Pending {
    fn push(&mut self, batch: Vec<FlowRecord>) {
        self.len += batch.len();
        self.batches.push_back(batch);
    }

    fn iter(&self) -> impl Iterator<Item = &FlowRecord> + '_ {
        self.batches.iter().flatten().skip(self.start)
    }

    /// Lets go of the first `n` records.
    fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while let Some(front) = self.batches.front() {
            let left = front.len() - self.start;
            if n < left {
                self.start += n;
                return;
            }
            n -= left;
            self.start = 0;
            self.batches.pop_front();
        }
    }
}

/// A random, non-zero run id from the kernel's generator (the clock and pid if it has none
/// to give), below 2^53 so that JSON tools that read numbers as doubles (jq, JavaScript)
/// keep it exact.
fn random_run() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into the buffer we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    let mut run = u64::from_ne_bytes(buf);
    if n != buf.len() as isize {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        run = (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32);
    }
    (run & ((1 << 53) - 1)).max(1)
}

#[cfg(test)]
mod tests;
