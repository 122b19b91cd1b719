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
/// Memory the snapshots pinned for paged listings may hold together (the one a listing
/// just asked for is always kept); past it the oldest is let go and its listing starts
/// again. Listings of the same poll share one snapshot, so this bounds distinct polls
/// (a record is 368 bytes on x86-64): about 350 of 1,000 flows, or 5 of 65,536.
pub const PAGED_MEMORY: usize = 128 << 20;

impl Snapshot {
    /// Bytes it holds: its records and the interface names they own.
    pub fn memory(&self) -> usize {
        self.flows.capacity() * std::mem::size_of::<FlowRecord>()
            + self
                .flows
                .iter()
                .map(|f| f.interface.capacity())
                .sum::<usize>()
    }
}

/// Snapshots that paged listings are still reading, so every page of one listing comes
/// from the same poll although the slot moves on; bounded by their memory, not by a count,
/// so many `top`s paging at once do not push each other out.
#[derive(Debug)]
pub struct PagedSnapshots {
    budget: usize,
    kept: std::sync::Mutex<Vec<(Instant, Arc<Snapshot>)>>,
}

impl Default for PagedSnapshots {
    fn default() -> Self {
        PagedSnapshots::with_budget(PAGED_MEMORY)
    }
}

impl PagedSnapshots {
    pub fn with_budget(budget: usize) -> PagedSnapshots {
        PagedSnapshots {
            budget,
            kept: Default::default(),
        }
    }

    /// Keeps `snap` for the listing's next page, letting the oldest others go while they
    /// hold more than the budget together.
    pub fn keep(&self, snap: &Arc<Snapshot>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|(at, s)| at.elapsed() < PAGE_TTL && s.generation != snap.generation);
        let mut held: usize = kept.iter().map(|(_, s)| s.memory()).sum::<usize>() + snap.memory();
        while held > self.budget && !kept.is_empty() {
            held -= kept.remove(0).1.memory();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::flow::{DirStats, EndReason, Hook};

    fn snapshot(generation: u64, flows: usize) -> Arc<Snapshot> {
        let now = SystemTime::now();
        let rec = FlowRecord {
            ip_version: 4,
            protocol: 17,
            client_addr: [10, 200, 0, 1].into(),
            client_port: 5000,
            server_addr: [10, 200, 0, 2].into(),
            server_port: 53,
            ifindex: 2,
            interface: "veth0".into(),
            first_hook: Hook::Egress,
            first_seen: now,
            last_seen: now,
            window_start: now,
            emitted: now,
            flow_id: 1,
            observer: "test".into(),
            continuation: false,
            fragment: false,
            partial: false,
            client: DirStats::default(),
            server: DirStats::default(),
            end_reason: EndReason::InProgress,
            tcp: None,
            icmp: None,
            client_process: None,
            server_process: None,
        };
        Arc::new(Snapshot {
            generation,
            taken: now,
            flows: vec![rec; flows],
        })
    }

    #[test]
    fn many_listings_keep_their_snapshots_within_the_memory_budget() {
        let paged = PagedSnapshots::default();
        // Twenty `top`s each paging through a snapshot of their own poll: none is pushed
        // out (a count of 4 used to expire all but the last four).
        let snaps: Vec<_> = (1..=20).map(|g| snapshot(g, 2000)).collect();
        for s in &snaps {
            paged.keep(s);
        }
        for g in 1..=20 {
            assert!(paged.get(g).is_some(), "generation {g} expired");
        }
    }

    #[test]
    fn the_oldest_goes_once_the_budget_is_spent() {
        let one = snapshot(1, 1000).memory();
        let paged = PagedSnapshots::with_budget(one * 3);
        for g in 1..=5 {
            paged.keep(&snapshot(g, 1000));
        }
        let kept: Vec<u64> = (1..=5).filter(|g| paged.get(*g).is_some()).collect();
        assert_eq!(kept, [3, 4, 5]);
        // One larger than the whole budget is still kept for its own listing.
        paged.keep(&snapshot(6, 5000));
        assert!(paged.get(6).is_some());
        assert!(paged.get(5).is_none());
    }
}
