//! Agent self-state shared by the poller (writer) and the gRPC service (reader).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::poller::probation::ProbationStatus;
use crate::sinks::ipfix::{IpfixCounts, IpfixStats};
use crate::sinks::kafka::{KafkaCounts, KafkaStats};

/// Fill level of one BPF map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapUsage {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

/// An interface the agent's programs are attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedInterface {
    pub name: String,
    pub ifindex: u32,
    /// "tcx" or "tc".
    pub hook: &'static str,
}

/// A point-in-time view of the agent, as `GetStatus` reports it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub started: Option<SystemTime>,
    /// Flows the poller has seen end (records emitted with a final reason).
    pub flows_ended: u64,
    /// Records emitted, active-timeout records included.
    pub records_emitted: u64,
    /// Flows in the base map at the last poll.
    pub active_flows: u64,
    pub maps: Vec<MapUsage>,
    /// Kernel per-reason counters, summed over CPUs (errors and informational).
    pub kernel_counters: BTreeMap<String, u64>,
    /// Extension entries removed because their base entry was gone.
    pub orphans_removed: u64,
    /// Duration of the last poll cycle.
    pub last_poll_ns: u64,
    /// The gap the poller keeps before its next poll.
    pub poll_interval_ns: u64,
    /// Times a flow map crossed the pressure threshold (80 % full by default).
    pub map_pressure_events: u64,
    /// Flows ended early to make room under map pressure (`EndReason::Evicted`).
    pub flows_evicted: u64,
    /// Each IPFIX exporter's counters, by destination.
    pub exporters: Vec<(String, IpfixCounts)>,
    /// The interfaces attached to, as of the last interface sync.
    pub interfaces: Vec<AttachedInterface>,
    /// The name records carry in `observer`.
    pub observer: String,
    /// When the gRPC server certificate in use expires (None: no TLS).
    pub tls_cert_expiry: Option<SystemTime>,
    /// The Kafka sink's counters, with its name (`kafka://BROKERS/TOPIC`).
    pub kafka: Option<(String, KafkaCounts)>,
    /// Flows not answered yet: what entered, moved, ended and was evicted, and where
    /// the unanswered ones come from and go to.
    pub probation: ProbationStatus,
}

/// Shared, cheaply updated agent state.
#[derive(Debug, Default)]
pub struct Status {
    pub flows_ended: AtomicU64,
    pub records_emitted: AtomicU64,
    pub orphans_removed: AtomicU64,
    pub last_poll_ns: AtomicU64,
    pub poll_interval_ns: AtomicU64,
    pub active_flows: AtomicU64,
    pub map_pressure_events: AtomicU64,
    pub flows_evicted: AtomicU64,
    /// Full scans the poller ran (closing-only passes left out), and the walks of the map
    /// they took (more than one when the poller fell a whole ring of records behind).
    pub scans: AtomicU64,
    pub scan_walks: AtomicU64,
    detail: Mutex<(Vec<MapUsage>, BTreeMap<String, u64>)>,
    exporters: Mutex<Vec<(String, Arc<IpfixStats>)>>,
    kafka: Mutex<Option<(String, Arc<KafkaStats>)>>,
    started: Mutex<Option<SystemTime>>,
    interfaces: Mutex<Vec<AttachedInterface>>,
    observer: Mutex<String>,
    tls_cert_expiry: Mutex<Option<SystemTime>>,
    probation: Mutex<ProbationStatus>,
}

impl Status {
    pub fn new() -> Status {
        let s = Status::default();
        *s.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
        s
    }

    /// Makes an exporter's counters part of every snapshot.
    pub fn add_exporter(&self, destination: String, stats: Arc<IpfixStats>) {
        self.exporters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((destination, stats));
    }

    /// The interfaces attached to now (after each interface sync).
    pub fn set_interfaces(&self, interfaces: Vec<AttachedInterface>) {
        *self.interfaces.lock().unwrap_or_else(|e| e.into_inner()) = interfaces;
    }

    /// The expiry of the gRPC certificate in use (at start and after each reload).
    pub fn set_tls_cert_expiry(&self, at: Option<SystemTime>) {
        *self
            .tls_cert_expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = at;
    }

    pub fn set_observer(&self, observer: &str) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = observer.to_owned();
    }

    /// Makes the Kafka sink's counters part of every snapshot.
    pub fn set_kafka(&self, name: String, stats: Arc<KafkaStats>) {
        *self.kafka.lock().unwrap_or_else(|e| e.into_inner()) = Some((name, stats));
    }

    /// Probation's figures and tally (each full scan, the tally at most once a second).
    pub fn set_probation(&self, p: ProbationStatus) {
        *self.probation.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Probation's per-protocol figures, the tally as it was.
    pub fn update_probation(&self, protocols: Vec<crate::poller::probation::ProbationProto>) {
        self.probation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .protocols = protocols;
    }

    pub fn set_detail(&self, maps: Vec<MapUsage>, counters: BTreeMap<String, u64>) {
        *self.detail.lock().unwrap_or_else(|e| e.into_inner()) = (maps, counters);
    }

    pub fn snapshot(&self) -> Snapshot {
        let (maps, kernel_counters) = self
            .detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Snapshot {
            started: *self.started.lock().unwrap_or_else(|e| e.into_inner()),
            flows_ended: self.flows_ended.load(Ordering::Relaxed),
            records_emitted: self.records_emitted.load(Ordering::Relaxed),
            active_flows: self.active_flows.load(Ordering::Relaxed),
            maps,
            kernel_counters,
            orphans_removed: self.orphans_removed.load(Ordering::Relaxed),
            last_poll_ns: self.last_poll_ns.load(Ordering::Relaxed),
            poll_interval_ns: self.poll_interval_ns.load(Ordering::Relaxed),
            map_pressure_events: self.map_pressure_events.load(Ordering::Relaxed),
            flows_evicted: self.flows_evicted.load(Ordering::Relaxed),
            exporters: self
                .exporters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(d, s)| (d.clone(), s.snapshot()))
                .collect(),
            interfaces: self
                .interfaces
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            observer: self
                .observer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            tls_cert_expiry: *self
                .tls_cert_expiry
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            probation: self
                .probation
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            kafka: self
                .kafka
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|(n, s)| (n.clone(), s.snapshot())),
        }
    }
}
