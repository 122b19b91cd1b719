//! Reads the split flow maps, joins base and extension entries, ends flows on idle/active timeout and TCP close, and deletes ended keys from every map.

pub mod decode;
pub mod memory;
pub mod owners;
pub mod probation;
pub mod scan;
pub mod table;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, select, Receiver, Sender};
use log::{debug, info, warn};
use thiserror::Error;

use crate::kernel::attach::IfNames;
use crate::kernel::bpf::types;
use crate::kernel::cgroup::CgroupNames;
use crate::record::flow::{EndReason, FlowRecord};
use crate::record::snapshot::SnapshotSlot;
use crate::status::{MapUsage, Status};
use decode::{local_process, monotonic_ns, window_start_ns, Clock, Counts, RawFlow, RecordMeta};
use scan::ScanKind;
pub use table::{ExtMap, FlowTable, Joined, KernelTable, ReadMode, MAP_NAMES};

#[derive(Debug, Error)]
pub enum PollError {
    #[error("reading map {map}: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("running the flow scan program: {0}")]
    Scan(#[source] std::io::Error),
    #[error("the record channel is closed")]
    ChannelClosed,
}

/// Timeouts and cadence of the poller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PollerConfig {
    pub poll_interval: Duration,
    pub idle_tcp: Duration,
    pub idle_udp: Duration,
    pub idle_icmp: Duration,
    /// Idle timeout of protocols other than TCP, UDP and ICMP.
    pub idle_other: Duration,
    /// How long a closed (FIN both ways) or reset TCP flow is kept for late packets.
    pub tcp_close_grace: Duration,
    pub active_timeout: Duration,
    /// Run the orphan sweep every this many polls.
    pub orphan_sweep_every: u32,
    /// Utilisation above which map pressure is reported.
    pub pressure_threshold: f64,
    /// Poll cadence while a map is under pressure (above the threshold, or full).
    pub pressure_poll_interval: Duration,
    /// Under pressure, a flow that sent one packet and nothing since for this long is
    /// evicted (ended early, `EndReason::Evicted`) by the scan to make room; long enough
    /// for the answer to a SYN or a query to have come back.
    pub evict_min_age: Duration,
    /// Under pressure, flows are evicted until each pressured map is at most this full
    /// (0..1), or no flow is left to evict.
    pub evict_target: f64,
    /// A bulk end (thousands of flows due to end in one poll) is split among this many
    /// concurrent scans, one per CPU. 1 by default: the one thread that emits the records
    /// is slower than two scans ending flows, so they fill the ring and walk the map again
    /// (a walk of 1 M flows costs more than the ends it saves there).
    pub scan_threads: u32,
}

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            poll_interval: Duration::from_secs(1),
            idle_tcp: Duration::from_secs(30),
            idle_udp: Duration::from_secs(30),
            idle_icmp: Duration::from_secs(10),
            idle_other: Duration::from_secs(30),
            tcp_close_grace: Duration::from_secs(2),
            active_timeout: Duration::from_secs(60),
            // A sweep reads every flow, so it is as rare as the orphans it removes (an
            // extension made by a sample that raced its flow's end): once a minute.
            orphan_sweep_every: 60,
            pressure_threshold: 0.8,
            pressure_poll_interval: Duration::from_millis(100),
            evict_min_age: Duration::from_secs(1),
            evict_target: 0.5,
            scan_threads: 1,
        }
    }
}

/// What one poll did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    pub flows: usize,
    pub ended: usize,
    pub active_records: usize,
    pub orphans_removed: usize,
    pub evicted: usize,
}

/// A stretch of polls during which a flow map was above the pressure threshold or
/// the datapath dropped new flows for want of room; logged at its start and end.
#[derive(Debug, Clone, Copy)]
struct Episode {
    started_ns: u64,
    /// The last poll that found pressure.
    last_pressed_ns: u64,
    evicted: u64,
    /// Map-full counters (base, TCP, ICMP) when it started.
    full_at_start: [u64; 3],
}

/// A poll may take at most this share (1/n) of a core; see `Poller::next_interval`.
const POLL_BUDGET: u32 = 40;

/// Records handed to the hub in one batch at most (a block of the hub's), and the room a
/// new batch starts with: most polls end a few flows, a bulk end fills whole batches.
pub const OUT_BATCH: usize = 1024;
pub const OUT_FIRST: usize = 16;

/// How long without pressure ends an episode.
const EPISODE_CALM: Duration = Duration::from_secs(2);

/// Names of the datapath counters of new flows dropped for a full map, in `MAP_NAMES` order.
const FULL_COUNTERS: [&str; 3] = ["base_map_full", "tcp_map_full", "icmp_map_full"];

fn full_counts(counters: &BTreeMap<String, u64>) -> [u64; 3] {
    let mut full = FULL_COUNTERS.map(|n| counters.get(n).copied().unwrap_or(0));
    // An answered flow that finds the base map full waits in probation, at risk of
    // eviction there: pressure on the base map all the same.
    full[0] += counters
        .get("admission_deferred_base_full")
        .copied()
        .unwrap_or(0);
    full
}

/// What a scan pass evicts during a pressure episode (see `Poller::eviction`).
#[derive(Debug, Clone, Copy)]
struct Eviction {
    age_ns: u64,
    /// Entries flows, flows_tcp and flows_icmp may keep.
    keep: [u64; 3],
}

/// The host name, the default observer id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Ends flows by the lifecycle rules and emits their records; generic over where the
/// flows live, so the rules are tested on an in-memory table. It keeps no state per flow:
/// what a flow's records have carried, and who it is, live in its kernel entry.
pub struct Poller<T: FlowTable = KernelTable> {
    table: T,
    cfg: PollerConfig,
    emit: Emitter,
    status: Arc<Status>,
    polls: u64,
    /// When the previous poll ran (BPF clock); 0 before the first.
    last_poll_ns: u64,
    pressured: [bool; 3],
    episode: Option<Episode>,
    /// Map-full counters at the previous poll.
    last_full: [u64; 3],
    /// The eviction age in force: `evict_min_age`, halved while the datapath still
    /// drops new flows (a flood faster than eviction at that age keeps up with).
    evict_age_ns: u64,
    /// Flows the kernel evicted from probation, per protocol.
    probation_evicted: probation::EvictionCount,
    /// The scan's probation tally is read at most this often.
    probation_read_ns: u64,
    snapshots: Option<SnapshotSlot>,
    /// `owner_map_full` when its rise was last logged (or at the first poll), and when.
    owner_full: Option<(u64, Option<Instant>)>,
}

/// Builds records from what the scan hands over and passes them to the hub in batches.
struct Emitter {
    clock: Clock,
    tx: Sender<Vec<FlowRecord>>,
    /// Records of the poll in progress, handed over in batches: the hub keeps a batch as
    /// one block, so a record costs no allocation of its own on the way to the sinks.
    out: Vec<FlowRecord>,
    status: Arc<Status>,
    ifnames: IfNames,
    observer: Arc<str>,
    /// Names of interfaces the attacher does not know, looked up once each.
    other_names: std::cell::RefCell<HashMap<u32, String>>,
    /// Names of the cgroups flows' local sockets are in.
    cgroups: std::cell::RefCell<CgroupNames>,
}

impl<T: FlowTable> Poller<T> {
    pub fn new(
        table: T,
        cfg: PollerConfig,
        tx: Sender<Vec<FlowRecord>>,
        status: Arc<Status>,
        ifnames: IfNames,
    ) -> Poller<T> {
        Poller {
            table,
            cfg,
            emit: Emitter {
                clock: Clock::new(),
                tx,
                out: Vec::new(),
                status: status.clone(),
                ifnames,
                observer: host_name().into(),
                other_names: Default::default(),
                cgroups: std::cell::RefCell::new(CgroupNames::new(None)),
            },
            status,
            polls: 0,
            last_poll_ns: 0,
            pressured: [false; 3],
            episode: None,
            last_full: [0; 3],
            evict_age_ns: cfg.evict_min_age.as_nanos() as u64,
            probation_evicted: Default::default(),
            probation_read_ns: 0,
            snapshots: None,
            owner_full: None,
        }
    }

    /// Names the cgroups of flows' local sockets from `names` (the host's cgroup v2
    /// hierarchy).
    pub fn with_cgroups(mut self, names: CgroupNames) -> Self {
        self.emit.cgroups = std::cell::RefCell::new(names);
        self
    }

    /// Also publishes the flows in progress into `slot` after each poll, while someone
    /// reads them.
    pub fn with_snapshots(mut self, slot: SnapshotSlot) -> Poller<T> {
        self.snapshots = Some(slot);
        self
    }

    /// Names the agent in every record (`--observer-id`).
    pub fn with_observer(mut self, observer: &str) -> Self {
        self.emit.observer = observer.into();
        self
    }

    pub fn table(&self) -> &T {
        &self.table
    }

    pub fn table_mut(&mut self) -> &mut T {
        &mut self.table
    }

    /// The table, given back without a flush (as an agent that dies leaves its pinned maps).
    pub fn into_table(self) -> T {
        self.table
    }

    /// Whether a map is under pressure (the poller then polls faster and evicts).
    pub fn under_pressure(&self) -> bool {
        self.episode.is_some()
    }

    /// Polls every interval (faster under map pressure) until `stop` fires or
    /// disconnects, then flushes every flow.
    pub fn run(mut self, stop: Receiver<()>) -> Result<(), PollError> {
        self.spaced_by(self.next_interval());
        let mut next_full = Instant::now();
        loop {
            // Between spaced-out polls, the closed TCP flows are still ended every poll
            // interval, from the datapath's notes.
            let wait = next_full
                .saturating_duration_since(Instant::now())
                .min(self.cfg.poll_interval);
            select! {
                recv(after(wait)) -> _ => {
                    let started = Instant::now();
                    let res = if started >= next_full {
                        let res = self.poll_once(monotonic_ns());
                        self.status.last_poll_ns.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        next_full = Instant::now() + self.spaced_by(self.next_interval());
                        res
                    } else {
                        self.poll_closing(monotonic_ns())
                    };
                    match res {
                        Ok(s) => debug!("poll: {s:?}"),
                        Err(PollError::ChannelClosed) => return Err(PollError::ChannelClosed),
                        Err(e) => warn!("poll failed: {e}"),
                    }
                }
                recv(stop) -> _ => break,
            }
        }
        let n = self.flush()?;
        info!("shutdown: flushed {n} flows");
        Ok(())
    }

    /// Publishes the gap before the next poll (`flowlens_poll_interval_seconds`).
    fn spaced_by(&self, interval: Duration) -> Duration {
        self.status
            .poll_interval_ns
            .store(interval.as_nanos() as u64, Ordering::Relaxed);
        interval
    }

    /// Ends the TCP flows the datapath noted as closed and past the close grace, without
    /// walking every flow (the run loop's step between spaced-out polls).
    pub fn poll_closing(&mut self, now_ns: u64) -> Result<PollStats, PollError> {
        self.handing_over(|p| {
            let mut stats = PollStats::default();
            let args = scan::closing_args(&p.cfg, now_ns);
            p.scan(args, &mut stats)?;
            Ok(stats)
        })
    }

    /// Runs a step that emits records, then hands them all over, even when the step
    /// failed halfway.
    fn handing_over<R>(
        &mut self,
        step: impl FnOnce(&mut Self) -> Result<R, PollError>,
    ) -> Result<R, PollError> {
        let res = step(self);
        let sent = self.emit.hand_over();
        res.and_then(|r| sent.map(|()| r))
    }

    /// When to poll next: every poll interval, faster under pressure (at most half a
    /// core), and, when many flows make a poll long, spaced so polling costs at most
    /// 1/`POLL_BUDGET` of a core, but never more than half the shortest idle timeout apart.
    fn next_interval(&self) -> Duration {
        let last = Duration::from_nanos(self.status.last_poll_ns.load(Ordering::Relaxed));
        if self.under_pressure() {
            // Making room comes first, but never more than half a core.
            let fast = self.cfg.pressure_poll_interval.min(self.cfg.poll_interval);
            return fast.max(last.saturating_mul(2));
        }
        let cfg = &self.cfg;
        let cap = [cfg.idle_tcp, cfg.idle_udp, cfg.idle_icmp, cfg.idle_other]
            .into_iter()
            .min()
            .unwrap_or(cfg.poll_interval)
            / 2;
        cfg.poll_interval
            .max(last.saturating_mul(POLL_BUDGET).min(cap))
    }

    /// Reads every map once and joins each base entry with its extension.
    pub fn read_flows(&mut self) -> Result<Joined, PollError> {
        self.table.read()
    }

    /// One poll: the scan ends due flows (deleting them from every map), evicts flows
    /// during a pressure episode, and hands over those due an active-timeout record;
    /// every flow is read only when something needs them all (a ListFlows snapshot, the
    /// orphan sweep).
    pub fn poll_once(&mut self, now_ns: u64) -> Result<PollStats, PollError> {
        self.handing_over(|p| p.poll_flows(now_ns))
    }

    fn poll_flows(&mut self, now_ns: u64) -> Result<PollStats, PollError> {
        self.polls += 1;
        let mut stats = PollStats::default();
        let counters = self.table.counters();
        if self.polls == 1 {
            // Drops before this agent's first poll (pinned maps) are not this episode's.
            self.last_full = full_counts(&counters);
            // "Busy since the previous scan" goes on from the predecessor's last scan
            // (pinned maps): a flow quiet since then gets no active-timeout record now.
            self.last_poll_ns = self.table.last_scan().unwrap_or(0);
        }
        let full = full_counts(&counters);
        // Every flow is read only when something needs them all: a ListFlows snapshot,
        // the orphan sweep. Before the scan, so the snapshot shows each flow's window up
        // to now, and the next one the window this poll's records start.
        let sweep = self.cfg.orphan_sweep_every > 0
            && self
                .polls
                .is_multiple_of(u64::from(self.cfg.orphan_sweep_every));
        let snapshot = self.snapshots.as_ref().is_some_and(|s| s.wanted());
        if sweep || snapshot {
            let Joined {
                flows, unjoined, ..
            } = self.read_flows()?;
            if snapshot {
                self.publish_snapshot(&flows, now_ns);
            }
            drop(flows);
            if sweep {
                stats.orphans_removed = self.sweep_orphans(&unjoined)?;
                // Interfaces come, go and get renamed: look names up afresh now and then.
                self.emit.other_names.get_mut().clear();
            }
        }
        if let Some(slot) = self.snapshots.as_ref().filter(|_| !snapshot) {
            slot.release_if_unwanted();
        }
        // An episode going on evicts in the same pass as the timeouts.
        let evict = self.episode.is_some().then(|| self.eviction(full));
        let (mut entries, waiting) = self.scan_all_probation(now_ns, evict, &mut stats)?;
        stats.flows = entries[0] as usize + stats.ended;
        if let Some(waiting) = waiting {
            self.update_probation(now_ns, &counters, waiting);
        }
        let pressure = self.pressure(&entries, &counters);
        // Crossings are judged before eviction makes room, so each one is counted.
        for (i, u) in self.usage(entries).iter().enumerate() {
            self.check_pressure(i, u);
        }
        let started = self.episode.is_none();
        self.episode_check(pressure.iter().any(|p| *p), now_ns, &entries, &counters);
        if started && self.episode.is_some() {
            // An episode that starts now makes room now: a second pass that only evicts
            // (everything else it would do, the first one did).
            let evict = self.eviction(full);
            entries = self.scan_all(now_ns, false, Some(evict), &mut stats)?;
        }
        if stats.evicted > 0 {
            self.status
                .flows_evicted
                .fetch_add(stats.evicted as u64, Ordering::Relaxed);
            if let Some(ep) = &mut self.episode {
                // Still making room: the episode goes on.
                ep.evicted += stats.evicted as u64;
                ep.last_pressed_ns = now_ns;
            }
        }
        self.last_full = full;
        self.update_status(entries, counters);
        self.last_poll_ns = now_ns;
        Ok(stats)
    }

    /// A poll's scan: `scan_all`, also returning what waits in probation by protocol
    /// when the scan walked all of it.
    fn scan_all_probation(
        &mut self,
        now_ns: u64,
        evict: Option<Eviction>,
        stats: &mut PollStats,
    ) -> Result<([u64; 3], Option<[u64; 4]>), PollError> {
        let mut args = scan::args(&self.cfg, now_ns, self.last_poll_ns, false);
        if let Some(e) = evict {
            args.evict_age_ns = e.age_ns;
            args.evict_keep = e.keep;
        }
        self.scan_summary(args, stats)
            .map(|done| (done.entries, done.probation))
    }

    /// Derives probation's evictions from the counters read before the scan and after,
    /// and (at most once a second) reads the scan's tally of sources and ports.
    fn update_probation(&mut self, now_ns: u64, before: &BTreeMap<String, u64>, waiting: [u64; 4]) {
        let after = self.table.counters();
        let protocols = self.probation_evicted.update(before, &after, waiting);
        let evicted: u64 = protocols.iter().map(|p| p.evicted).sum();
        if now_ns < self.probation_read_ns + 1_000_000_000 && self.polls > 1 {
            self.status.update_probation(protocols);
            return;
        }
        self.probation_read_ns = now_ns;
        if let Some((tally, capacity)) = self.table.probation_tally() {
            let s = tally.status(protocols, capacity);
            if evicted > 0 {
                debug!(
                    "probation: {evicted} unanswered flows evicted so far, from ~{} sources",
                    s.sources_estimate
                );
            }
            self.status.set_probation(s);
        }
    }

    /// Runs one scan, emitting the records of the flows it ended, evicted or found due.
    /// Returns the entries left in each map.
    fn scan_all(
        &mut self,
        now_ns: u64,
        flush: bool,
        evict: Option<Eviction>,
        stats: &mut PollStats,
    ) -> Result<[u64; 3], PollError> {
        let mut args = scan::args(&self.cfg, now_ns, self.last_poll_ns, flush);
        if let Some(e) = evict {
            args.evict_age_ns = e.age_ns;
            args.evict_keep = e.keep;
        }
        self.scan(args, stats)
    }

    /// Runs the scan with `args`, emitting the records of the flows it hands over as they
    /// come. Returns the entries left.
    fn scan(
        &mut self,
        args: types::scan_args,
        stats: &mut PollStats,
    ) -> Result<[u64; 3], PollError> {
        self.scan_summary(args, stats).map(|done| done.entries)
    }

    fn scan_summary(
        &mut self,
        args: types::scan_args,
        stats: &mut PollStats,
    ) -> Result<scan::ScanSummary, PollError> {
        let Poller {
            table, emit, cfg, ..
        } = self;
        let done = table.scan(&args, cfg.scan_threads, &mut |flows| {
            emit.take(flows, args.now_ns, stats)
        })?;
        if args.closing_only == 0 {
            self.status.scans.fetch_add(1, Ordering::Relaxed);
            self.status
                .scan_walks
                .fetch_add(u64::from(done.passes), Ordering::Relaxed);
        }
        if done.passes > 1 {
            debug!(
                "the scan took {} walks of the map (the ring filled){}",
                done.passes,
                if done.split { ", split" } else { "" }
            );
        }
        Ok(done)
    }

    /// The flows in progress, for ListFlows: each with the counts its entry holds, those
    /// no record has carried yet, since its window start.
    fn publish_snapshot(&self, flows: &[RawFlow], now_ns: u64) {
        let Some(slot) = &self.snapshots else {
            return;
        };
        let v = flows
            .iter()
            .map(|f| self.emit.record(f, EndReason::InProgress, now_ns))
            .collect();
        slot.publish(self.emit.clock.to_wall(now_ns), v);
    }

    /// Which maps are under pressure: above the threshold, or the datapath dropped new
    /// flows for want of room in them since the previous poll.
    fn pressure(&self, entries: &[u64; 3], counters: &BTreeMap<String, u64>) -> [bool; 3] {
        let full = full_counts(counters);
        let caps = self.table.capacities();
        std::array::from_fn(|i| {
            entries[i] as f64 > self.cfg.pressure_threshold * caps[i].max(1) as f64
                || full[i] > self.last_full[i]
        })
    }

    /// Starts or ends a pressure episode, logging each once, with what it cost at its end.
    /// It ends after `EPISODE_CALM` without pressure or eviction, so a flood that eviction
    /// keeps under the threshold is one episode, not one per poll.
    fn episode_check(
        &mut self,
        pressured: bool,
        now_ns: u64,
        entries: &[u64; 3],
        counters: &BTreeMap<String, u64>,
    ) {
        let full = full_counts(counters);
        if pressured {
            if let Some(ep) = &mut self.episode {
                ep.last_pressed_ns = now_ns;
            }
        }
        match (pressured, self.episode) {
            (true, None) => {
                let caps = self.table.capacities();
                let fill: Vec<String> = MAP_NAMES
                    .iter()
                    .zip(entries.iter().zip(caps))
                    .map(|(n, (e, c))| format!("{n} {e}/{c}"))
                    .collect();
                warn!(
                    "flow map pressure ({}): polling every {:?} and evicting flows that sent one packet and nothing for {:?}",
                    fill.join(", "),
                    self.cfg.pressure_poll_interval.min(self.cfg.poll_interval),
                    self.cfg.evict_min_age
                );
                self.episode = Some(Episode {
                    started_ns: now_ns,
                    last_pressed_ns: now_ns,
                    evicted: 0,
                    full_at_start: self.last_full,
                });
            }
            (false, Some(ep))
                if now_ns.saturating_sub(ep.last_pressed_ns) >= EPISODE_CALM.as_nanos() as u64 =>
            {
                let dropped: Vec<String> = FULL_COUNTERS
                    .iter()
                    .zip(full.iter().zip(ep.full_at_start))
                    .map(|(n, (now, then))| format!("{n} +{}", now.saturating_sub(then)))
                    .collect();
                let total: u64 = full
                    .iter()
                    .zip(ep.full_at_start)
                    .map(|(now, then)| now.saturating_sub(then))
                    .sum();
                warn!(
                    "flow map pressure over after {:.1} s: {} flows evicted, {total} packets of new flows dropped for a full map ({})",
                    now_ns.saturating_sub(ep.started_ns) as f64 / 1e9,
                    ep.evicted,
                    dropped.join(", ")
                );
                self.episode = None;
            }
            _ => {}
        }
    }

    /// What to evict during an episode: flows that sent one packet and nothing since the
    /// eviction age, until every map is down to `evict_target`. The age is
    /// `evict_min_age`, halved at each poll the datapath dropped new flows (down to the
    /// pressure poll interval) and doubled back at each poll it did not. Which of the
    /// flows old enough go first is the map's order, not their age.
    fn eviction(&mut self, full: [u64; 3]) -> Eviction {
        let caps = self.table.capacities();
        let keep = caps.map(|c| (self.cfg.evict_target * c as f64) as u64);
        let max_age = self.cfg.evict_min_age.as_nanos() as u64;
        let floor = max_age.min(self.cfg.pressure_poll_interval.as_nanos() as u64);
        self.evict_age_ns = if (0..3).any(|i| full[i] > self.last_full[i]) {
            (self.evict_age_ns / 2).max(floor)
        } else {
            self.evict_age_ns.saturating_mul(2).min(max_age)
        };
        Eviction {
            age_ns: self.evict_age_ns.max(1),
            keep,
        }
    }

    /// Ends every flow now (agent shutdown). Returns how many.
    pub fn flush(&mut self) -> Result<usize, PollError> {
        self.handing_over(Self::end_every_flow)
    }

    fn end_every_flow(&mut self) -> Result<usize, PollError> {
        let mut stats = PollStats::default();
        let entries = self.scan_all(monotonic_ns(), true, None, &mut stats)?;
        let counters = self.table.counters();
        self.update_status(entries, counters);
        Ok(stats.ended)
    }

    /// Deletes extension entries whose base entry is gone. The candidates are
    /// the extensions a read found without their base; each is checked again,
    /// since a flow created between the reads of two maps looks the same.
    fn sweep_orphans(&mut self, unjoined: &[(ExtMap, u64)]) -> Result<usize, PollError> {
        let mut removed = 0;
        for (ext, id) in unjoined {
            if self.table.remove_orphan(*ext, *id)? {
                removed += 1;
                debug!("removed an orphan {ext:?} extension entry");
            }
        }
        if removed > 0 {
            self.status
                .orphans_removed
                .fetch_add(removed as u64, Ordering::Relaxed);
        }
        Ok(removed)
    }

    fn usage(&self, entries: [u64; 3]) -> Vec<MapUsage> {
        MAP_NAMES
            .iter()
            .zip(entries)
            .zip(self.table.capacities())
            .map(|((name, entries), capacity)| MapUsage {
                name: (*name).to_owned(),
                entries,
                capacity,
            })
            .collect()
    }

    fn update_status(&mut self, entries: [u64; 3], counters: BTreeMap<String, u64>) {
        self.status
            .active_flows
            .store(entries[0], Ordering::Relaxed);
        let mut usage = self.usage(entries);
        if let Some((entries, capacity)) = self.table.owner_fill() {
            usage.push(MapUsage {
                name: "flows_owner".to_owned(),
                entries,
                capacity,
            });
        }
        self.check_owner_full(&counters);
        self.status.set_detail(usage, counters);
    }

    /// Logs, at most once a minute while it goes on, that a full `flows_owner` cost new
    /// flows their attribution (the flows themselves are kept).
    fn check_owner_full(&mut self, counters: &BTreeMap<String, u64>) {
        let now = counters.get("owner_map_full").copied().unwrap_or(0);
        let Some((told, at)) = self.owner_full else {
            // Losses before this agent's first poll (pinned maps) are not its own.
            self.owner_full = Some((now, None));
            return;
        };
        if now > told && at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            warn!(
                "the map of flows' local sockets (flows_owner) is full: {} new flows kept \
                 without their cgroup and process; raise --max-local-flows",
                now - told
            );
            self.owner_full = Some((now, Some(Instant::now())));
        }
    }

    /// Counts threshold crossings; logs them outside a pressure episode only (inside one,
    /// eviction keeps a map near the threshold and the episode's own lines say it all).
    fn check_pressure(&mut self, i: usize, u: &MapUsage) {
        let ratio = u.entries as f64 / u.capacity.max(1) as f64;
        let high = ratio > self.cfg.pressure_threshold;
        let quiet = self.episode.is_some();
        if high && !self.pressured[i] {
            self.status
                .map_pressure_events
                .fetch_add(1, Ordering::Relaxed);
        }
        if quiet {
            self.pressured[i] = high;
            return;
        }
        if high && !self.pressured[i] {
            warn!(
                "map {} is {:.0}% full ({}/{}): new flows will be dropped and counted when it fills; raise its capacity or lower timeouts",
                u.name,
                ratio * 100.0,
                u.entries,
                u.capacity
            );
        } else if !high && self.pressured[i] {
            info!("map {} back to {:.0}% full", u.name, ratio * 100.0);
        }
        self.pressured[i] = high;
    }
}

impl Emitter {
    /// Emits the records of the flows one scan handed over: a final record for each
    /// flow it ended (always one, with its true reason, even when a previous record
    /// carried every packet), an active-timeout record for each flow it found due.
    fn take(
        &mut self,
        flows: Vec<(ScanKind, RawFlow)>,
        now_ns: u64,
        stats: &mut PollStats,
    ) -> Result<(), PollError> {
        for (kind, f) in flows {
            let reason = match kind {
                ScanKind::Ended(reason) => {
                    self.status.flows_ended.fetch_add(1, Ordering::Relaxed);
                    stats.ended += 1;
                    if reason == EndReason::Evicted {
                        stats.evicted += 1;
                    }
                    reason
                }
                ScanKind::Active => {
                    stats.active_records += 1;
                    EndReason::ActiveTimeout
                }
            };
            let rec = self.record(&f, reason, now_ns);
            self.send(rec)?;
        }
        Ok(())
    }

    /// The record of a flow as its entry (or the scan's copy of it) stands at `now_ns`:
    /// the counts it holds, those no record has carried yet, over the window since the
    /// flow's last record (or its first packet), and who it is.
    fn record(&self, f: &RawFlow, end_reason: EndReason, now_ns: u64) -> FlowRecord {
        f.to_record(
            RecordMeta {
                counts: Counts::of(&f.base),
                end_reason,
                interface: self.ifname(f.key.ifindex),
                observer: self.observer.clone(),
                window_start_ns: window_start_ns(&f.base, now_ns),
                emitted_ns: now_ns,
                flow_id: f.flow_id(),
                continuation: f.is_continuation(),
                local: self.local(f),
            },
            &self.clock,
        )
    }

    /// The owners of a flow's local ends, by key endpoint, in user terms.
    fn local(&self, f: &RawFlow) -> [Option<Box<crate::record::flow::LocalProcess>>; 2] {
        if f.owner.iter().all(Option::is_none) {
            return [None, None];
        }
        let mut names = self.cgroups.borrow_mut();
        f.owner
            .map(|o| o.map(|o| Box::new(local_process(&o, &mut names))))
    }

    fn send(&mut self, rec: FlowRecord) -> Result<(), PollError> {
        self.status.records_emitted.fetch_add(1, Ordering::Relaxed);
        self.out.push(rec);
        if self.out.len() >= OUT_BATCH {
            self.hand_over()?;
        }
        Ok(())
    }

    /// Sends the records emitted so far to the hub, waiting while its channel is full.
    fn hand_over(&mut self) -> Result<(), PollError> {
        if self.out.is_empty() {
            return Ok(());
        }
        // A full batch is a bulk end going on: the next one is likely full too.
        let room = if self.out.len() >= OUT_BATCH {
            OUT_BATCH
        } else {
            OUT_FIRST
        };
        let mut batch = std::mem::replace(&mut self.out, Vec::with_capacity(room));
        // The hub keeps a batch whole for as long as any of its records is wanted (the
        // replay ring holds thousands): it must not hold room for records it never got.
        if batch.capacity() - batch.len() > batch.len() / 8 {
            batch.shrink_to_fit();
        }
        self.tx.send(batch).map_err(|_| PollError::ChannelClosed)
    }

    fn ifname(&self, ifindex: u32) -> String {
        let known = self
            .ifnames
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ifindex)
            .cloned();
        if let Some(n) = known {
            return n;
        }
        self.other_names
            .borrow_mut()
            .entry(ifindex)
            .or_insert_with(|| ifindex_to_name(ifindex).unwrap_or_else(|| format!("if{ifindex}")))
            .clone()
    }
}

/// Name of an interface in this network namespace.
pub fn ifindex_to_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf is IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}
