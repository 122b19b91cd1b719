//! The producer: hands each record to librdkafka, serves its delivery reports, counts every record delivered or lost (and why), tells when no broker is reachable, and logs each episode of trouble once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _, ProducerContext, PurgeConfig};
use serde::Deserialize;

use super::config::KafkaConfig;
use super::message::{
    write_key, HEADER_OBSERVER, HEADER_SCHEMA, HEADER_SCHEMA_VERSION, SCHEMA, SCHEMA_VERSION,
};
use crate::record::encoding::Endpoints;

/// Longest a batch waits for room in librdkafka's buffer while the brokers are reachable
/// (a burst faster than the brokers take it); past it, and at once during an outage, a
/// record that finds the buffer full is lost.
const FULL_BUFFER_WAIT: Duration = Duration::from_millis(100);
/// How long each upkeep serves librdkafka's events.
const EVENT_BUDGET: Duration = Duration::from_millis(2);

/// Why a record was lost, as the `reason` label of `flowlens_kafka_records_lost_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    /// The producer thread fell the whole record buffer (`--buffer-memory`) behind and lost
    /// these before reading them (the name of the gRPC `Lost` reason for the same).
    QueueFull,
    /// librdkafka's buffer was full (an outage longer than it holds, or a burst).
    BufferFull,
    /// The broker did not acknowledge it: `message.timeout.ms` expired, the broker refused
    /// it, or it was still unacknowledged when the agent stopped.
    DeliveryFailed,
    /// librdkafka refused it on the spot (too large, unknown topic or partition).
    Rejected,
}

impl LossReason {
    pub const ALL: [LossReason; 4] = [
        LossReason::QueueFull,
        LossReason::BufferFull,
        LossReason::DeliveryFailed,
        LossReason::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::QueueFull => "queue_full",
            LossReason::BufferFull => "buffer_full",
            LossReason::DeliveryFailed => "delivery_failed",
            LossReason::Rejected => "rejected",
        }
    }
}

/// The sink's counters, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct KafkaStats {
    /// Records handed to librdkafka.
    pub records_produced: AtomicU64,
    /// Records the brokers acknowledged (`acks=all`).
    pub records_delivered: AtomicU64,
    /// Value bytes of the acknowledged records (before compression).
    pub bytes_delivered: AtomicU64,
    lost: [AtomicU64; 4],
    /// Records in librdkafka's buffer, not yet acknowledged (a gauge).
    pub records_buffered: AtomicU64,
    /// Brokers with an open connection, from librdkafka's statistics (a gauge).
    pub brokers_up: AtomicU64,
    /// Episodes with no broker reachable.
    pub outages: AtomicU64,
    /// Producers made again after a fatal error.
    pub producer_restarts: AtomicU64,
}

/// A plain copy of [`KafkaStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KafkaCounts {
    pub records_produced: u64,
    pub records_delivered: u64,
    pub bytes_delivered: u64,
    /// By [`LossReason`], in the order of [`LossReason::ALL`].
    pub lost: [u64; 4],
    pub records_buffered: u64,
    pub brokers_up: u64,
    pub outages: u64,
    pub producer_restarts: u64,
}

impl KafkaCounts {
    pub fn lost(&self, why: LossReason) -> u64 {
        self.lost[why as usize]
    }

    pub fn lost_total(&self) -> u64 {
        self.lost.iter().sum()
    }
}

impl KafkaStats {
    pub fn snapshot(&self) -> KafkaCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KafkaCounts {
            records_produced: get(&self.records_produced),
            records_delivered: get(&self.records_delivered),
            bytes_delivered: get(&self.bytes_delivered),
            lost: [0, 1, 2, 3].map(|i| get(&self.lost[i])),
            records_buffered: get(&self.records_buffered),
            brokers_up: get(&self.brokers_up),
            outages: get(&self.outages),
            producer_restarts: get(&self.producer_restarts),
        }
    }

    pub fn lose(&self, why: LossReason, n: u64) {
        if n > 0 {
            self.lost[why as usize].fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// What librdkafka's callbacks tell the producer thread. They run on that thread (inside
/// `poll`), but librdkafka's types require `Sync`.
struct Context {
    stats: Arc<KafkaStats>,
    /// Cleared when librdkafka reports every broker down, set by a delivery or by statistics
    /// that show a broker up.
    reachable: AtomicBool,
    /// The idempotent producer hit a fatal error: it must be made again.
    fatal: AtomicBool,
    /// The latest error librdkafka reported (a delivery's or the client's), for the logs.
    last_error: Mutex<Option<String>>,
}

impl Context {
    fn note_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "no detail from librdkafka".into())
    }
}

/// Whether an "all brokers down" error still says so: librdkafka counts when it writes the
/// message ("2/2 brokers are down"), and a broker that just reconnected makes it "0/2".
fn all_down(reason: &str) -> bool {
    let counts = reason
        .split_whitespace()
        .find_map(|w| w.split_once('/'))
        .and_then(|(d, n)| Some((d.parse::<u32>().ok()?, n.parse::<u32>().ok()?)));
    counts.is_none_or(|(down, of)| down == of)
}

#[derive(Deserialize)]
struct RawStats {
    brokers: HashMap<String, RawBroker>,
}

#[derive(Deserialize)]
struct RawBroker {
    state: String,
    nodeid: i32,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        // librdkafka logs every failed reconnect; the producer logs each episode once
        // instead, so its own lines are for debugging.
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                error!(target: "librdkafka", "{fac} {msg}")
            }
            _ => debug!(target: "librdkafka", "{fac} {msg}"),
        }
    }

    fn error(&self, e: KafkaError, reason: &str) {
        debug!(target: "librdkafka", "error: {e}: {reason}");
        match e.rdkafka_error_code() {
            // Its text ("1/1 brokers are down") would hide the cause just noted.
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                if all_down(reason) {
                    self.reachable.store(false, Ordering::Relaxed)
                }
                return;
            }
            Some(RDKafkaErrorCode::Fatal) => self.fatal.store(true, Ordering::Relaxed),
            _ => {}
        }
        self.note_error(reason.to_owned());
    }

    fn stats_raw(&self, json: &[u8]) {
        let Ok(s) = serde_json::from_slice::<RawStats>(json) else {
            return;
        };
        // Bootstrap entries (node id -1) stand for addresses, not brokers.
        let up = s
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0 && b.state == "UP")
            .count() as u64;
        self.stats.brokers_up.store(up, Ordering::Relaxed);
        if up > 0 {
            self.reachable.store(true, Ordering::Relaxed);
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                self.stats.records_delivered.fetch_add(1, Ordering::Relaxed);
                let len = m.payload_len() as u64;
                self.stats.bytes_delivered.fetch_add(len, Ordering::Relaxed);
                self.reachable.store(true, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.stats.lose(LossReason::DeliveryFailed, 1);
                self.note_error(e.to_string());
            }
        }
    }
}

/// An episode of trouble: no broker reachable, or records being lost.
struct Episode {
    since: Instant,
    /// Lost records (all reasons) when it began.
    lost_before: u64,
    /// Whether the losses were logged (an outage may last without losing anything).
    told_losses: bool,
}

/// One Kafka producer fed by one sink.
pub struct Producer {
    cfg: KafkaConfig,
    client_id: String,
    inner: BaseProducer<Context>,
    stats: Arc<KafkaStats>,
    key: Vec<u8>,
    episode: Option<Episode>,
    /// Counts at the previous upkeep, to see what changed since.
    seen: KafkaCounts,
    /// Since when records have waited with a broker up and none was acknowledged.
    waiting_since: Option<Instant>,
    /// How long that may last before the producer counts as stuck.
    stall_after: Duration,
}

/// librdkafka refused the settings.
#[derive(Debug, thiserror::Error)]
#[error("Kafka producer settings (--kafka-*): {0}")]
pub struct SettingsError(#[from] KafkaError);

impl Producer {
    /// Makes the producer; it connects in the background, so an unreachable broker is not an
    /// error here (its records wait in the buffer).
    pub fn new(
        cfg: KafkaConfig,
        client_id: &str,
        stats: Arc<KafkaStats>,
    ) -> Result<Producer, SettingsError> {
        let inner = make(&cfg, client_id, stats.clone())?;
        let request_timeout = cfg
            .client_config(client_id)
            .get("request.timeout.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(30_000);
        Ok(Producer {
            waiting_since: None,
            stall_after: Duration::from_millis(2 * request_timeout),
            cfg,
            client_id: client_id.to_owned(),
            inner,
            stats,
            key: Vec::with_capacity(128),
            episode: None,
            seen: KafkaCounts::default(),
        })
    }

    /// The sink's whole contract with its feeder: records in emission order, each its
    /// `FlowRecord` encoding (the message value as it is), go to librdkafka, and
    /// `upstream_lost` records the sink fell too far behind to read are counted. Never blocks
    /// for long: a full buffer costs at most [`FULL_BUFFER_WAIT`] per call, and nothing
    /// during an outage.
    pub fn send<'r>(&mut self, records: impl Iterator<Item = &'r [u8]>, upstream_lost: u64) {
        self.stats.lose(LossReason::QueueFull, upstream_lost);
        let mut may_wait = self.inner.context().reachable.load(Ordering::Relaxed);
        let started = Instant::now();
        let (mut produced, mut full, mut rejected) = (0u64, 0u64, 0u64);
        for value in records {
            let ends = match Endpoints::read(value) {
                Ok(e) => e,
                Err(e) => {
                    rejected += 1;
                    self.inner.context().note_error(e.to_string());
                    continue;
                }
            };
            self.key.clear();
            write_key(&ends, &mut self.key);
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: HEADER_SCHEMA,
                    value: Some(SCHEMA),
                })
                .insert(Header {
                    key: HEADER_SCHEMA_VERSION,
                    value: Some(SCHEMA_VERSION),
                })
                .insert(Header {
                    key: HEADER_OBSERVER,
                    value: Some(ends.observer),
                });
            let mut msg = BaseRecord::to(&self.cfg.topic)
                .payload(value)
                .key(&self.key[..])
                .headers(headers);
            loop {
                match self.inner.send(msg) {
                    Ok(()) => produced += 1,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if may_wait =>
                    {
                        // Delivery reports make room.
                        self.inner.poll(Duration::from_millis(5));
                        may_wait = started.elapsed() < FULL_BUFFER_WAIT;
                        msg = back;
                        continue;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        full += 1
                    }
                    Err((e, _)) => {
                        rejected += 1;
                        self.inner.context().note_error(e.to_string());
                    }
                }
                break;
            }
        }
        self.stats
            .records_produced
            .fetch_add(produced, Ordering::Relaxed);
        self.stats.lose(LossReason::BufferFull, full);
        self.stats.lose(LossReason::Rejected, rejected);
    }

    /// Serves delivery reports and statistics, updates the gauges, logs the start and end of
    /// an episode of trouble, and makes the producer again after a fatal error.
    pub fn upkeep(&mut self) {
        // One poll serves one event (a delivery report of many records, statistics, a log
        // line): a short budget serves the backlog too.
        self.inner.poll(EVENT_BUDGET);
        let buffered = self.buffered();
        self.stats
            .records_buffered
            .store(buffered, Ordering::Relaxed);
        if self.inner.context().fatal.load(Ordering::Relaxed) {
            let why = self.inner.client().fatal_error().map_or_else(
                || self.inner.context().last_error(),
                |(code, text)| format!("{code}: {text}"),
            );
            self.restart(&format!("it failed for good ({why})"));
        }
        self.watch_stall(buffered);
        self.watch();
    }

    /// Delivers what is buffered, waiting at most `grace`; what is still unacknowledged then
    /// is purged and counted lost (a purged record may still have reached a broker).
    pub fn finish(mut self, grace: Duration) {
        let _ = self.inner.flush(grace);
        self.inner.poll(EVENT_BUDGET);
        let left = self.buffered();
        if left > 0 {
            self.inner
                .purge(PurgeConfig::default().queue().inflight().non_blocking());
            // The purged records come back as failed deliveries.
            let deadline = Instant::now() + Duration::from_secs(1);
            while self.buffered() > 0 && Instant::now() < deadline {
                self.inner.poll(Duration::from_millis(10));
            }
            warn!(
                "Kafka {}: {left} flow records were not acknowledged within {:?} of stopping; \
                 counted as lost",
                self.cfg.name(),
                grace
            );
        }
        if let Some(ep) = self.episode.take() {
            let lost = self.stats.snapshot().lost_total() - ep.lost_before;
            info!(
                "Kafka {}: stopped {:.0?} into an episode of trouble; {lost} flow records lost in it",
                self.cfg.name(),
                ep.since.elapsed()
            );
        }
    }

    /// Records handed to librdkafka and not yet reported delivered or failed.
    fn buffered(&self) -> u64 {
        let c = self.stats.snapshot();
        let done = c.records_delivered + c.lost(LossReason::DeliveryFailed);
        c.records_produced.saturating_sub(done)
    }

    /// A producer connected to a broker that acknowledges nothing for `stall_after` while
    /// records wait is stuck: a broker that lost its producer state (restarted empty) refuses
    /// an idempotent producer's id for ever, and only a new producer gets a new one.
    fn watch_stall(&mut self, buffered: u64) {
        // From the statistics (every second), not from librdkafka's "all brokers down"
        // errors, which also come while it reconnects.
        let up = self.stats.brokers_up.load(Ordering::Relaxed) > 0;
        let delivered =
            self.stats.records_delivered.load(Ordering::Relaxed) > self.seen.records_delivered;
        if delivered || !up {
            self.waiting_since = None;
            return;
        }
        if buffered > 0 && self.waiting_since.is_none() {
            self.waiting_since = Some(Instant::now());
        }
        if self
            .waiting_since
            .is_some_and(|t| t.elapsed() >= self.stall_after)
        {
            self.waiting_since = None;
            let why = format!(
                "a broker is up but acknowledged nothing for {:?} ({})",
                self.stall_after,
                self.inner.context().last_error()
            );
            self.restart(&why);
        }
    }

    fn restart(&mut self, why: &str) {
        warn!(
            "Kafka {}: the producer is stuck: {why}; making a new one (its unacknowledged \
             records are lost)",
            self.cfg.name()
        );
        // Its records are purged (and counted failed) before the new producer exists: the
        // new one may be given the same producer id, under which a purged request still on
        // its way would then be accepted, and be on the topic while counted lost.
        self.inner
            .purge(PurgeConfig::default().queue().inflight().non_blocking());
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.buffered() > 0 && Instant::now() < deadline {
            self.inner.poll(Duration::from_millis(10));
        }
        match make(&self.cfg, &self.client_id, self.stats.clone()) {
            Ok(p) => {
                drop(std::mem::replace(&mut self.inner, p));
                self.stats.producer_restarts.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => error!("Kafka {}: {e}", self.cfg.name()),
        }
    }

    /// Logs each episode of trouble once when it starts (and once more when it starts
    /// losing records), and once when records are delivered again.
    fn watch(&mut self) {
        let now = self.stats.snapshot();
        let before = std::mem::replace(&mut self.seen, now);
        // librdkafka's "all brokers down" also comes, now and then, in a reconnect's race
        // with brokers up: an outage is one its statistics confirm (none up).
        let reachable =
            self.inner.context().reachable.load(Ordering::Relaxed) || now.brokers_up > 0;
        let lost = now.lost_total() - before.lost_total();
        let delivered = now.records_delivered - before.records_delivered;
        let name = self.cfg.name();
        if self.episode.is_none() && (!reachable || lost > 0) {
            if !reachable {
                self.stats.outages.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "Kafka {name}: no broker reachable ({}); flow records wait in the producer's \
                     buffer and are delivered when a broker is back (records older than \
                     message.timeout.ms, or beyond the buffer, are lost and counted)",
                    self.inner.context().last_error()
                );
            }
            self.episode = Some(Episode {
                since: Instant::now(),
                lost_before: before.lost_total(),
                told_losses: false,
            });
        }
        let Some(ep) = &mut self.episode else {
            return;
        };
        if lost > 0 && !ep.told_losses {
            ep.told_losses = true;
            let why: Vec<String> = LossReason::ALL
                .into_iter()
                .filter(|&r| now.lost(r) > before.lost(r))
                .map(|r| match r {
                    LossReason::DeliveryFailed | LossReason::Rejected => {
                        format!("{}: {}", r.as_str(), self.inner.context().last_error())
                    }
                    _ => r.as_str().to_owned(),
                })
                .collect();
            warn!(
                "Kafka {name}: losing flow records ({}); counted in \
                 flowlens_kafka_records_lost_total",
                why.join(", ")
            );
        }
        if reachable && delivered > 0 && lost == 0 {
            let lost = now.lost_total() - ep.lost_before;
            info!(
                "Kafka {name}: delivering again after {:.1?}; {lost} flow records were lost \
                 meanwhile",
                ep.since.elapsed()
            );
            self.episode = None;
        }
    }
}

fn make(
    cfg: &KafkaConfig,
    client_id: &str,
    stats: Arc<KafkaStats>,
) -> Result<BaseProducer<Context>, SettingsError> {
    let ctx = Context {
        stats,
        reachable: AtomicBool::new(true),
        fatal: AtomicBool::new(false),
        last_error: Mutex::new(None),
    };
    Ok(cfg.client_config(client_id).create_with_context(ctx)?)
}

#[cfg(test)]
mod tests {
    use super::all_down;

    #[test]
    fn all_brokers_down_is_believed_only_when_it_counts_them_all() {
        assert!(all_down("2/2 brokers are down"));
        assert!(!all_down("0/2 brokers are down"));
        assert!(all_down("brokers are down"));
    }
}
