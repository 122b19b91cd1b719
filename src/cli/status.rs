//! `flowlens status`: the agent's state from GetStatus (version, uptime, interfaces, maps and their fill, counters, sinks and subscribers with their losses), as text or JSON.

use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde_json::json;

use crate::cli::client::{describe, AgentAddr};
use crate::record::api::proto;
use crate::record::render;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub agent: AgentAddr,
    /// Print one JSON object (GetStatusResponse's fields) instead of text.
    #[arg(long, env = "FLOWLENS_STATUS_JSON")]
    pub json: bool,
}

/// Asks once and prints.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let status = rt.block_on(async {
        let mut client = args.agent.connect().await?;
        client
            .get_status(proto::GetStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| anyhow::anyhow!("status of {}: {}", args.agent.server, describe(&s)))
    })?;
    let text = if args.json {
        serde_json::to_string_pretty(&as_json(&status)).context("JSON")? + "\n"
    } else {
        as_text(&args.agent.server, &status)
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

fn time(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

fn duration(d: Option<prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(d).ok())
}

fn percent(entries: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        0.0
    } else {
        entries as f64 * 100.0 / capacity as f64
    }
}

/// What a person reads: one block per concern, aligned.
pub fn as_text(server: &str, s: &proto::GetStatusResponse) -> String {
    let mut o = String::new();
    let utc = |t: SystemTime| {
        let s = humantime::format_rfc3339_seconds(t).to_string();
        format!("{} {} UTC", &s[..10], &s[11..19])
    };
    let _ = writeln!(
        o,
        "flowlens {} at {server}{}",
        s.version,
        if s.observer.is_empty() {
            String::new()
        } else {
            format!(" (observer {})", s.observer)
        }
    );
    if let Some(up) = duration(s.uptime) {
        let since = time(s.started).map_or_else(String::new, |t| format!(", since {}", utc(t)));
        let _ = writeln!(
            o,
            "uptime:       {}{since}",
            humantime::format_duration(Duration::from_secs(up.as_secs()))
        );
    }
    let ifaces: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| format!("{} ({}, ifindex {})", i.name, i.hook, i.ifindex))
        .collect();
    let _ = writeln!(
        o,
        "interfaces:   {}",
        if ifaces.is_empty() {
            "none (waiting for a selected interface to appear)".to_owned()
        } else {
            ifaces.join(", ")
        }
    );
    let _ = writeln!(
        o,
        "flows:        {} in progress, {} ended, {} records emitted, {} evicted",
        s.active_flows, s.flows_seen, s.records_emitted, s.flows_evicted
    );
    let poll = duration(s.poll_interval).map_or_else(String::new, |d| {
        format!(", every {}", humantime::format_duration(d))
    });
    let _ = writeln!(
        o,
        "poller:       last poll took {}{poll}; {} map pressure events, {} orphan extensions removed",
        render::latency(s.last_poll_ns),
        s.map_pressure_events,
        s.orphans_removed
    );
    let _ = writeln!(o, "maps:");
    for m in &s.maps {
        let _ = writeln!(
            o,
            "  {:<12} {:>10} / {:<10} {:5.1} % full",
            m.name,
            m.entries,
            m.capacity,
            percent(m.entries, m.capacity)
        );
    }
    if let Some(p) = &s.probation {
        let waiting: u64 = p.protocols.iter().map(|x| x.waiting).sum();
        // Admission holds past half the base map (src/bpf/probation.h).
        let gate = s
            .maps
            .iter()
            .find(|m| m.name == "flows")
            .map_or_else(String::new, |m| {
                format!(
                    " (new flows wait here while flows holds {} or more)",
                    m.capacity / 2
                )
            });
        let _ = writeln!(
            o,
            "probation:    {waiting} / {} unanswered flows waiting{gate}",
            p.capacity
        );
        for x in &p.protocols {
            let _ = writeln!(
                o,
                "  {:<6} {:>12} entered {:>12} admitted {:>10} ended {:>12} evicted",
                x.protocol, x.entered, x.admitted, x.ended, x.evicted
            );
        }
        let evicted: u64 = p.protocols.iter().map(|x| x.evicted).sum();
        if p.tallied > 0 {
            let ports: Vec<String> = p
                .top_ports
                .iter()
                .map(|x| match x.protocol.as_str() {
                    "tcp" | "udp" => format!("{}/{} ({})", x.protocol, x.port, x.flows),
                    other => format!("{other} ({})", x.flows),
                })
                .collect();
            let _ = writeln!(
                o,
                "  {evicted} evicted; of {} unanswered flows sampled: ~{} sources, to {}",
                p.tallied,
                p.sources_estimate,
                ports.join(", ")
            );
        }
    }
    let _ = writeln!(
        o,
        "replay ring:  {} / {} records",
        s.ring_records, s.ring_capacity
    );
    let _ = writeln!(o, "sinks:");
    if s.sinks.is_empty() {
        let _ = writeln!(o, "  none besides gRPC (--output none, no --ipfix)");
    }
    for k in &s.sinks {
        let _ = writeln!(
            o,
            "  {:<7} {:<28} delivered {:>10}  queued {:>6}  lost {:>8}",
            k.kind, k.name, k.delivered, k.queued, k.lost
        );
    }
    let _ = writeln!(
        o,
        "subscribers:  {} now; {} records lost by subscribers and sinks since start",
        s.subscribers.len(),
        s.lost_total
    );
    for sub in &s.subscribers {
        let peer = if sub.peer.is_empty() {
            "local socket"
        } else {
            &sub.peer
        };
        let since = time(sub.connected).map_or_else(String::new, |t| format!(" since {}", utc(t)));
        let _ = writeln!(
            o,
            "  #{:<5} {peer:<28}{since}  queued {}  lost {}",
            sub.id, sub.records_queued, sub.lost
        );
    }
    let counter = |n: &str| s.kernel_counters.get(n).copied().unwrap_or(0);
    let _ = writeln!(
        o,
        "samples lost: {} TCP latency (flows_tcp full: raise --max-tcp-flows), {} ICMP RTT \
         (flows_icmp full: raise --max-icmp-flows)",
        counter("tcp_map_full"),
        counter("icmp_map_full")
    );
    let _ = writeln!(o, "kernel counters:");
    let mut counters: Vec<_> = s.kernel_counters.iter().collect();
    counters.sort();
    for (name, v) in counters {
        let _ = writeln!(o, "  {name:<32} {v:>14}");
    }
    o
}

/// What a script reads: GetStatusResponse's fields, times as RFC 3339 and seconds.
pub fn as_json(s: &proto::GetStatusResponse) -> serde_json::Value {
    let rfc = |t: Option<prost_types::Timestamp>| {
        time(t).map(|t| humantime::format_rfc3339_nanos(t).to_string())
    };
    let secs = |d: Option<prost_types::Duration>| duration(d).map(|d| d.as_secs_f64());
    json!({
        "version": s.version,
        "observer": s.observer,
        "started": rfc(s.started),
        "uptime_seconds": secs(s.uptime),
        "interfaces": s.interfaces.iter().map(|i| json!({
            "name": i.name, "ifindex": i.ifindex, "hook": i.hook,
        })).collect::<Vec<_>>(),
        "flows_in_progress": s.active_flows,
        "flows_seen": s.flows_seen,
        "records_emitted": s.records_emitted,
        "records_published": s.records_published,
        "flows_evicted": s.flows_evicted,
        "map_pressure_events": s.map_pressure_events,
        "orphans_removed": s.orphans_removed,
        "last_poll_ns": s.last_poll_ns,
        "poll_interval_seconds": secs(s.poll_interval),
        "maps": s.maps.iter().map(|m| json!({
            "name": m.name, "entries": m.entries, "capacity": m.capacity,
            "utilisation": m.utilisation,
        })).collect::<Vec<_>>(),
        "ring_records": s.ring_records,
        "ring_capacity": s.ring_capacity,
        "sinks": s.sinks.iter().map(|k| json!({
            "kind": k.kind, "name": k.name, "delivered": k.delivered,
            "queued": k.queued, "lost": k.lost,
        })).collect::<Vec<_>>(),
        "subscribers": s.subscribers.iter().map(|k| json!({
            "id": k.id, "peer": k.peer, "connected": rfc(k.connected),
            "records_queued": k.records_queued, "lost": k.lost,
        })).collect::<Vec<_>>(),
        "lost_total": s.lost_total,
        "samples_lost": {
            "tcp_latency": s.kernel_counters.get("tcp_map_full").copied().unwrap_or(0),
            "icmp_rtt": s.kernel_counters.get("icmp_map_full").copied().unwrap_or(0),
        },
        "kernel_counters": s.kernel_counters,
        "probation": s.probation.as_ref().map(|p| json!({
            "capacity": p.capacity,
            "sources_estimate": p.sources_estimate,
            "tallied": p.tallied,
            "protocols": p.protocols.iter().map(|x| json!({
                "protocol": x.protocol, "entered": x.entered, "admitted": x.admitted,
                "ended": x.ended, "waiting": x.waiting, "evicted": x.evicted,
            })).collect::<Vec<_>>(),
            "top_ports": p.top_ports.iter().map(|x| json!({
                "protocol": x.protocol, "port": x.port, "flows": x.flows,
            })).collect::<Vec<_>>(),
        })),
    })
}
