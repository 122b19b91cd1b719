//! Prometheus self-metrics: renders the agent's status as text exposition format 0.0.4 (served by [`crate::metrics::http`]).
//!
//! Metric families (all prefixed `flowlens_`):
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `build_info` | gauge | `version` | always 1 |
//! | `start_time_seconds` | gauge | | Unix time the agent started |
//! | `uptime_seconds` | gauge | | seconds since the agent started |
//! | `flows_active` | gauge | | flows in the base map at the last poll |
//! | `flows_ended_total` | counter | | flows the poller has seen end |
//! | `records_emitted_total` | counter | | flow records emitted (active-timeout records included) |
//! | `subscribers` | gauge | | connected stream subscribers |
//! | `subscriber_lost_records_total` | counter | | records lost by subscribers a whole buffer behind (departed ones included) |
//! | `replay_ring_records` | gauge | | records the buffer holds (replay and resume reach back to them) |
//! | `replay_ring_capacity_records` | gauge | | records kept after every reader read them (`--replay-ring`) |
//! | `buffer_bytes` | gauge | | bytes the record buffer holds |
//! | `buffer_capacity_bytes` | gauge | | its bound (`--buffer-memory`) |
//! | `sink_behind_records` | gauge | `sink` | records a local sink has yet to read |
//! | `sink_lost_records_total` | counter | `sink` | records a local sink lost (it fell a whole buffer behind) |
//! | `map_entries` | gauge | `map` | entries in a flow map at the last poll |
//! | `map_capacity_entries` | gauge | `map` | a flow map's maximum entries |
//! | `map_utilization_ratio` | gauge | `map` | entries / capacity (0..1) |
//! | `map_pressure_events_total` | counter | | times a flow map crossed the pressure threshold |
//! | `orphans_removed_total` | counter | | extension entries removed because their base was gone |
//! | `flows_evicted_total` | counter | | flows ended early to make room under map pressure |
//! | `kernel_packets_unaccounted_total` | counter | `reason` | packets the datapath could not account (error counters) |
//! | `kernel_packets_total` | counter | `counter` | informational kernel counts (not disjoint: do not sum) |
//! | `kernel_attribution_lost_total` | counter | `reason` | flows kept without their local socket's owner, sockets whose owner was not noted |
//! | `kernel_samples_lost_total` | counter | `reason` | latency/RTT samples lost to a full extension map: `tcp_map_full`, `icmp_map_full` (the packets were accounted) |
//! | `probation_flows_total` | counter | `protocol`, `outcome` | unanswered flows through probation: `entered`, `admitted`, `ended`, `evicted` (by the kernel) |
//! | `probation_waiting_flows` | gauge | `protocol` | unanswered flows waiting in probation |
//! | `probation_sources_estimate` | gauge | | distinct sources among the unanswered flows tallied (estimate, sampled) |
//! | `probation_port_flows_total` | counter | `protocol`, `port` | unanswered flows tallied by the answering side's port (top few) |
//! | `last_poll_duration_seconds` | gauge | | duration of the last poll cycle |
//! | `tls_cert_expiry_seconds` | gauge | | Unix time the gRPC server certificate expires (with TLS only) |
//! | `kafka_records_produced_total` | counter | | records handed to librdkafka (with `--kafka`) |
//! | `kafka_records_delivered_total` | counter | | records the brokers acknowledged |
//! | `kafka_delivered_bytes_total` | counter | | value bytes of those records, before compression |
//! | `kafka_records_lost_total` | counter | `reason` | records lost: `queue_full`, `buffer_full`, `delivery_failed`, `rejected` |
//! | `kafka_records_buffered` | gauge | | records in librdkafka waiting for an acknowledgement |
//! | `kafka_brokers_up` | gauge | | brokers the producer has a connection to |
//! | `kafka_outages_total` | counter | | episodes with no broker reachable |
//! | `kafka_producer_restarts_total` | counter | | producers made again after a fatal error |
//!
//! The kernel counters are split with [`crate::kernel::datapath::is_error_counter`]: summing
//! `kernel_packets_unaccounted_total` over `reason` gives every packet not accounted, while the
//! informational counts (`packets_accounted`, `non_ip_skipped`, `ip_fragments_non_first`) overlap
//! and are exposed separately. A counter name the datapath does not know is informational.

pub mod http;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::hub::{Hub, HubStats, SinkKind};
use crate::kernel::datapath::{
    counter_names, is_error_counter, is_sample_loss_counter, owner_counter_names,
};
use crate::metrics::http::{HttpLimits, Render};
use crate::sinks::ipfix::IpfixCounts;
use crate::sinks::kafka::LossReason;
use crate::status::{Snapshot, Status};

pub use crate::metrics::http::{MetricsHandle, CONTENT_TYPE};

/// A render closure for [`crate::metrics::http::spawn`]: the live exposition of `status` and `hub`.
pub fn renderer(status: Arc<Status>, hub: Hub) -> Render {
    Arc::new(move || render(&status.snapshot(), &hub.stats()))
}

/// Serves GET /metrics for `status` and `hub` on `listen` ("HOST:PORT") from a one-thread tokio
/// runtime of its own, with the default [`HttpLimits`]; errors name the address if it cannot
/// bind (e.g. port in use). Callers that own a runtime use [`crate::metrics::http::spawn`].
pub fn spawn(listen: &str, status: Arc<Status>, hub: Hub) -> Result<MetricsHandle> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("flowlens-metrics")
        .enable_all()
        .build()
        .context("metrics endpoint: building its runtime")?;
    let h = crate::metrics::http::spawn(
        listen,
        rt.handle(),
        renderer(status, hub),
        HttpLimits::default(),
    )?;
    Ok(h.owning(rt))
}

// ---------------------------------------------------------------------------
// Exposition
// ---------------------------------------------------------------------------

/// Writes the text exposition of one family at a time.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP flowlens_{name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE flowlens_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "flowlens_{name}");
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A float the exposition format accepts (Rust's `Display` never uses exponents).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The exposition text (pure function, unit-testable).
pub fn render(snap: &Snapshot, hub: &HubStats) -> String {
    render_at(snap, hub, SystemTime::now())
}

fn render_at(snap: &Snapshot, hub: &HubStats, now: SystemTime) -> String {
    let mut e = Exposition {
        out: String::with_capacity(4096),
    };
    e.family(
        "build_info",
        "gauge",
        "Always 1; the version label is the running flowlens version.",
    );
    e.sample("build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    if let Some(started) = snap.started {
        e.single(
            "start_time_seconds",
            "gauge",
            "Unix time the agent started, in seconds.",
            float(unix_seconds(started)),
        );
        let up = now.duration_since(started).unwrap_or_default();
        e.single(
            "uptime_seconds",
            "gauge",
            "Seconds since the agent started.",
            float(up.as_secs_f64()),
        );
    }
    e.single(
        "flows_active",
        "gauge",
        "Flows in the base flow map at the last poll.",
        snap.active_flows,
    );
    e.single(
        "flows_ended_total",
        "counter",
        "Flows the poller has seen end.",
        snap.flows_ended,
    );
    e.single(
        "records_emitted_total",
        "counter",
        "Flow records emitted, active-timeout records included.",
        snap.records_emitted,
    );
    e.single(
        "subscribers",
        "gauge",
        "Connected flow stream subscribers.",
        hub.subscribers().count(),
    );
    e.single(
        "subscriber_lost_records_total",
        "counter",
        "Records gRPC subscribers lost (they fell a whole buffer behind; after their filters), departed subscribers included.",
        hub.lost_total,
    );
    for (name, help, get) in [
        (
            "ipfix_records_sent_total",
            "Flow records an IPFIX exporter sent.",
            (|c: &IpfixCounts| c.records_sent) as fn(&IpfixCounts) -> u64,
        ),
        (
            "ipfix_records_lost_total",
            "Flow records an IPFIX exporter lost: collector unreachable, send failed, or fell behind.",
            |c| c.records_lost,
        ),
        (
            "ipfix_messages_sent_total",
            "IPFIX messages sent.",
            |c| c.messages_sent,
        ),
        (
            "ipfix_reconnects_total",
            "TCP connections to an IPFIX collector made after the first.",
            |c| c.reconnects,
        ),
    ] {
        e.family(name, "counter", help);
        for (dest, c) in &snap.exporters {
            e.sample(name, &[("collector", dest)], get(c));
        }
    }
    if let Some((_, k)) = &snap.kafka {
        for (name, help, v) in [
            (
                "kafka_records_produced_total",
                "Flow records handed to librdkafka.",
                k.records_produced,
            ),
            (
                "kafka_records_delivered_total",
                "Flow records the Kafka brokers acknowledged (acks=all).",
                k.records_delivered,
            ),
            (
                "kafka_delivered_bytes_total",
                "Value bytes of the acknowledged records, before compression.",
                k.bytes_delivered,
            ),
            (
                "kafka_outages_total",
                "Episodes with no Kafka broker reachable.",
                k.outages,
            ),
            (
                "kafka_producer_restarts_total",
                "Kafka producers made again after a fatal error.",
                k.producer_restarts,
            ),
        ] {
            e.single(name, "counter", help, v);
        }
        e.family(
            "kafka_records_lost_total",
            "counter",
            "Flow records lost for Kafka: queue_full (the sink fell behind), buffer_full \
             (librdkafka's buffer was full), delivery_failed (not acknowledged in time, refused, \
             or unacknowledged at stop), rejected (refused by librdkafka on the spot).",
        );
        for r in LossReason::ALL {
            e.sample(
                "kafka_records_lost_total",
                &[("reason", r.as_str())],
                k.lost(r),
            );
        }
        e.single(
            "kafka_records_buffered",
            "gauge",
            "Flow records in librdkafka's buffer waiting for an acknowledgement.",
            k.records_buffered,
        );
        e.single(
            "kafka_brokers_up",
            "gauge",
            "Kafka brokers the producer has an open connection to.",
            k.brokers_up,
        );
    }
    e.family(
        "sink_lost_records_total",
        "counter",
        "Records lost by a local sink (stdout, an exporter) that did not keep up.",
    );
    for s in hub.sinks.iter().filter(|s| s.kind != SinkKind::Subscriber) {
        e.sample("sink_lost_records_total", &[("sink", &s.name)], s.lost);
    }
    e.family(
        "sink_behind_records",
        "gauge",
        "Records published that a local sink (stdout, an exporter) has yet to read.",
    );
    for s in hub.sinks.iter().filter(|s| s.kind != SinkKind::Subscriber) {
        e.sample("sink_behind_records", &[("sink", &s.name)], s.queued);
    }
    e.single(
        "replay_ring_records",
        "gauge",
        "Records the buffer holds: replay and resume reach back to them.",
        hub.ring_len,
    );
    e.single(
        "replay_ring_capacity_records",
        "gauge",
        "Records kept for replay after every reader has read them (--replay-ring).",
        hub.ring_capacity,
    );
    e.single(
        "buffer_bytes",
        "gauge",
        "Bytes the record buffer holds: encoded records and their compressed forms.",
        hub.buffer_bytes,
    );
    e.single(
        "buffer_capacity_bytes",
        "gauge",
        "Bound of the record buffer (--buffer-memory).",
        hub.buffer_capacity,
    );

    e.family(
        "map_entries",
        "gauge",
        "Entries in a kernel flow map at the last poll.",
    );
    for m in &snap.maps {
        e.sample("map_entries", &[("map", &m.name)], m.entries);
    }
    e.family(
        "map_capacity_entries",
        "gauge",
        "Maximum entries of a kernel flow map.",
    );
    for m in &snap.maps {
        e.sample("map_capacity_entries", &[("map", &m.name)], m.capacity);
    }
    e.family(
        "map_utilization_ratio",
        "gauge",
        "Fill level of a kernel flow map: entries / capacity.",
    );
    for m in snap.maps.iter().filter(|m| m.capacity > 0) {
        let ratio = m.entries as f64 / m.capacity as f64;
        e.sample("map_utilization_ratio", &[("map", &m.name)], float(ratio));
    }
    e.single(
        "map_pressure_events_total",
        "counter",
        "Times a flow map crossed the pressure threshold (80 % full by default).",
        snap.map_pressure_events,
    );
    e.single(
        "orphans_removed_total",
        "counter",
        "Extension map entries removed because their base entry was gone.",
        snap.orphans_removed,
    );
    e.single(
        "flows_evicted_total",
        "counter",
        "Flows ended early (end reason evicted) to make room in a flow map under pressure.",
        snap.flows_evicted,
    );

    let names = |class: fn(u32) -> bool| -> std::collections::BTreeSet<&str> {
        counter_names()
            .into_iter()
            .filter(|&(slot, _)| class(slot))
            .map(|(_, name)| name)
            .collect()
    };
    let (errors, sample_losses) = (names(is_error_counter), names(is_sample_loss_counter));
    let owner: std::collections::BTreeSet<&str> = owner_counter_names()
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    // Probation's counters count flows, and the attribution's flows and sockets, not
    // packets: their own families below.
    let (attribution, packets): (Vec<_>, Vec<_>) = snap
        .kernel_counters
        .iter()
        .filter(|(name, _)| !name.starts_with("probation_"))
        .partition(|(name, _)| owner.contains(name.as_str()));
    let (unaccounted, rest): (Vec<_>, Vec<_>) = packets
        .into_iter()
        .partition(|(name, _)| errors.contains(name.as_str()));
    let (lost, info): (Vec<_>, Vec<_>) = rest
        .into_iter()
        .partition(|(name, _)| sample_losses.contains(name.as_str()));
    e.family(
        "kernel_packets_unaccounted_total",
        "counter",
        "Packets the kernel datapath could not account, by reason (sum over reasons for the total).",
    );
    for (name, v) in unaccounted {
        e.sample("kernel_packets_unaccounted_total", &[("reason", name)], v);
    }
    e.family(
        "kernel_samples_lost_total",
        "counter",
        "Latency (TCP) or echo RTT (ICMP) samples lost because the extension map was full \
         (--max-tcp-flows, --max-icmp-flows); their packets were accounted.",
    );
    for (name, v) in lost {
        e.sample("kernel_samples_lost_total", &[("reason", name)], v);
    }
    e.family(
        "kernel_packets_total",
        "counter",
        "Informational kernel packet counts (they overlap: do not sum over counter).",
    );
    for (name, v) in info {
        e.sample("kernel_packets_total", &[("counter", name)], v);
    }
    e.family(
        "kernel_attribution_lost_total",
        "counter",
        "Flows kept without their local socket's owner (owner_map_full: flows_owner was full; \
         owner_ring_full: the ring the datapath sends owners through was full), and sockets \
         whose owner was not noted (socket_owner_lost), by reason.",
    );
    for (name, v) in attribution {
        e.sample("kernel_attribution_lost_total", &[("reason", name)], v);
    }
    e.family(
        "probation_flows_total",
        "counter",
        "Unanswered flows through probation by protocol and outcome: entered, admitted (answered: moved to the flow map), ended (reported from probation), evicted (by the kernel, to make room: never reported).",
    );
    for p in &snap.probation.protocols {
        for (outcome, v) in [
            ("entered", p.entered),
            ("admitted", p.admitted),
            ("ended", p.ended),
            ("evicted", p.evicted),
        ] {
            e.sample(
                "probation_flows_total",
                &[("protocol", p.protocol), ("outcome", outcome)],
                v,
            );
        }
    }
    e.family(
        "probation_waiting_flows",
        "gauge",
        "Unanswered flows waiting in probation at the last full scan, by protocol.",
    );
    for p in &snap.probation.protocols {
        e.sample(
            "probation_waiting_flows",
            &[("protocol", p.protocol)],
            p.waiting,
        );
    }
    e.single(
        "probation_sources_estimate",
        "gauge",
        "Distinct client addresses among the unanswered flows the scan tallied in probation (HyperLogLog estimate over a sample).",
        snap.probation.sources_estimate,
    );
    e.family(
        "probation_port_flows_total",
        "counter",
        "Unanswered flows the scan tallied in probation, by the answering side's port (the top few; 0 for ICMP and others).",
    );
    for p in &snap.probation.top_ports {
        let port = p.port.to_string();
        e.sample(
            "probation_port_flows_total",
            &[("protocol", p.protocol), ("port", &port)],
            p.flows,
        );
    }
    e.single(
        "last_poll_duration_seconds",
        "gauge",
        "Duration of the last poll cycle, in seconds.",
        float(snap.last_poll_ns as f64 / 1e9),
    );
    e.single(
        "poll_interval_seconds",
        "gauge",
        "Gap before the next poll: --poll-interval, shorter under map pressure, longer when many flows make a poll long.",
        float(snap.poll_interval_ns as f64 / 1e9),
    );
    if let Some(expiry) = snap.tls_cert_expiry {
        e.single(
            "tls_cert_expiry_seconds",
            "gauge",
            "Unix time the gRPC server certificate in use expires (the earliest notAfter of its chain).",
            float(unix_seconds(expiry)),
        );
    }
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn floats_never_use_exponents() {
        assert_eq!(float(1e-9), "0.000000001");
        assert_eq!(float(0.0), "0");
        assert_eq!(float(f64::NAN), "NaN");
    }

    #[test]
    fn uptime_follows_the_clock() {
        let started = UNIX_EPOCH + Duration::from_secs(1000);
        let snap = Snapshot {
            started: Some(started),
            ..Snapshot::default()
        };
        let hub = HubStats {
            run: 1,
            ring_len: 0,
            ring_capacity: 0,
            buffer_bytes: 0,
            buffer_capacity: 0,
            oldest_seq: 0,
            published: 0,
            lost_total: 0,
            sinks: Vec::new(),
        };
        let text = render_at(&snap, &hub, started + Duration::from_millis(2500));
        assert!(text.contains("\nflowlens_uptime_seconds 2.5\n"), "{text}");
        assert!(
            text.contains("\nflowlens_start_time_seconds 1000\n"),
            "{text}"
        );
    }
}
