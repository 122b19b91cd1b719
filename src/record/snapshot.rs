//! The flows in progress as of the latest poll: the poller publishes them, `ListFlows` reads them, and nobody else touches the maps for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::record::flow::FlowRecord;

/// The flows one poll found, with cumulative counters (`end_reason` is `InProgress`).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Counts publications since the agent started; 0 is "none yet".
    pub generation: u64,
    /// When the maps were read.
    pub taken: SystemTime,
    pub flows: Vec<FlowRecord>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            generation: 0,
            taken: SystemTime::UNIX_EPOCH,
            flows: Vec::new(),
        }
    }
}

/// How long after the last request the poller keeps building snapshots. Building one
/// costs a record per flow per poll, so an agent nobody asks pays nothing.
const DEMAND_WINDOW: Duration = Duration::from_secs(30);

/// The shared slot: one writer (the poller), any number of readers.
#[derive(Debug, Clone)]
pub struct SnapshotSlot {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
    /// Milliseconds since `origin` of the last request, plus one (0: never asked).
    wanted_at: Arc<AtomicU64>,
    origin: Instant,
    /// The poller's interval: how stale the latest snapshot may normally be.
    poll_interval: Duration,
}

impl SnapshotSlot {
    pub fn new(poll_interval: Duration) -> SnapshotSlot {
        SnapshotSlot {
            tx: Arc::new(watch::Sender::new(Arc::new(Snapshot::default()))),
            wanted_at: Arc::new(AtomicU64::new(0)),
            origin: Instant::now(),
            poll_interval,
        }
    }

    /// Whether someone asked recently enough for the poller to build a snapshot.
    pub fn wanted(&self) -> bool {
        let at = self.wanted_at.load(Ordering::Relaxed);
        at != 0 && (self.elapsed_ms() + 1).saturating_sub(at) <= DEMAND_WINDOW.as_millis() as u64
    }

    /// Marks a request now: the poller builds snapshots for the next 30 s.
    pub fn want(&self) {
        self.wanted_at
            .store(self.elapsed_ms() + 1, Ordering::Relaxed);
    }

    /// Publishes a new snapshot (the poller, after reading the maps).
    pub fn publish(&self, taken: SystemTime, flows: Vec<FlowRecord>) {
        self.tx.send_modify(|s| {
            *s = Arc::new(Snapshot {
                generation: s.generation + 1,
                taken,
                flows,
            })
        });
    }

    /// Drops the flows of the latest snapshot once nobody wants them, so an agent that was
    /// asked once does not hold a copy of every flow for ever.
    pub fn release_if_unwanted(&self) {
        if self.wanted() {
            return;
        }
        self.tx.send_if_modified(|s| {
            if s.flows.is_empty() {
                return false;
            }
            *s = Arc::new(Snapshot {
                generation: s.generation,
                taken: s.taken,
                flows: Vec::new(),
            });
            true
        });
    }

    /// The latest snapshot, without waiting.
    pub fn latest(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// The latest snapshot, first waiting (about one poll) for a fresh one when the
    /// poller was not building them because nobody had asked lately, or when the latest
    /// is older than two polls.
    pub async fn fresh(&self) -> Arc<Snapshot> {
        let was_wanted = self.wanted();
        self.want();
        let mut rx = self.tx.subscribe();
        let current = rx.borrow_and_update().clone();
        let recent = SystemTime::now()
            .checked_sub(self.poll_interval * 2)
            .is_some_and(|t| current.taken >= t);
        if was_wanted && recent {
            return current;
        }
        let wait = self.poll_interval * 2 + Duration::from_millis(500);
        match tokio::time::timeout(wait, rx.changed()).await {
            Ok(Ok(())) => rx.borrow().clone(),
            _ => current,
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

/// How long a snapshot stays pinned for a paged listing after its latest page.
const PAGE_TTL: Duration = Duration::from_secs(60);
/// Snapshots pinned for paged listings at once; a listing whose snapshot is pushed out
/// starts again.
const PAGED_SNAPSHOTS: usize = 4;

/// Snapshots that paged listings are still reading, so every page of one listing comes
/// from the same poll although the slot moves on.
#[derive(Debug, Default)]
pub struct PagedSnapshots {
    kept: std::sync::Mutex<Vec<(Instant, Arc<Snapshot>)>>,
}

impl PagedSnapshots {
    /// Keeps `snap` for the listing's next page.
    pub fn keep(&self, snap: &Arc<Snapshot>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|(at, s)| at.elapsed() < PAGE_TTL && s.generation != snap.generation);
        if kept.len() >= PAGED_SNAPSHOTS {
            kept.remove(0);
        }
        kept.push((Instant::now(), snap.clone()));
    }

    /// The kept snapshot of `generation`, if it has not expired.
    pub fn get(&self, generation: u64) -> Option<Arc<Snapshot>> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.iter()
            .find(|(at, s)| s.generation == generation && at.elapsed() < PAGE_TTL)
            .map(|(_, s)| s.clone())
    }
}

/// Where a paged listing goes on: "GENERATION.OFFSET".
pub fn page_token(generation: u64, offset: usize) -> String {
    format!("{generation}.{offset}")
}

/// The inverse of `page_token`.
pub fn parse_page_token(s: &str) -> Option<(u64, usize)> {
    let (g, o) = s.split_once('.')?;
    Some((g.parse().ok()?, o.parse().ok()?))
}
