//! Prometheus self-metrics: renders the agent's status as text exposition format 0.0.4 and serves it on `GET /metrics` from a small std-thread HTTP endpoint.
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
//! | `subscriber_lost_records_total` | counter | | records lost by slow subscribers (departed ones included) |
//! | `replay_ring_records` | gauge | | records held for replay |
//! | `replay_ring_capacity_records` | gauge | | replay ring capacity |
//! | `map_entries` | gauge | `map` | entries in a flow map at the last poll |
//! | `map_capacity_entries` | gauge | `map` | a flow map's maximum entries |
//! | `map_utilization_ratio` | gauge | `map` | entries / capacity (0..1) |
//! | `map_pressure_events_total` | counter | | times a flow map crossed the pressure threshold |
//! | `orphans_removed_total` | counter | | extension entries removed because their base was gone |
//! | `kernel_packets_unaccounted_total` | counter | `reason` | packets the datapath could not account (error counters) |
//! | `kernel_packets_total` | counter | `counter` | informational kernel counts (not disjoint: do not sum) |
//! | `last_poll_duration_seconds` | gauge | | duration of the last poll cycle |
//!
//! The kernel counters are split with [`crate::datapath::is_error_counter`]: summing
//! `kernel_packets_unaccounted_total` over `reason` gives every packet not accounted, while the
//! informational counts (`packets_accounted`, `non_ip_skipped`, `ip_fragments_non_first`) overlap
//! and are exposed separately. A counter name the datapath does not know is informational.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use log::{debug, warn};

use crate::datapath::{counter_names, is_error_counter};
use crate::hub::{Hub, HubStats, SinkKind};
use crate::status::{Snapshot, Status};

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Longest a client may take to send its request head, and we to write the response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; longer requests get 431.
const MAX_HEAD: usize = 8 * 1024;
/// Connections handled at once; more are closed straight away.
const MAX_CONNECTIONS: usize = 32;
/// How often the accept loop checks for shutdown.
const ACCEPT_TICK_MS: i32 = 200;

/// The running metrics endpoint; `shutdown` (or drop) stops it.
#[derive(Debug)]
pub struct MetricsHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsHandle {
    /// The bound address (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits (at most ~200 ms) for the accept thread to end; requests in
    /// flight finish on their own threads within their I/O timeouts.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Serves GET /metrics (Prometheus text format 0.0.4) on `listen` ("HOST:PORT") from a std
/// thread; errors clearly (naming the address) if it cannot bind (e.g. port in use).
pub fn spawn(listen: &str, status: Arc<Status>, hub: Hub) -> Result<MetricsHandle> {
    let listener = TcpListener::bind(listen)
        .with_context(|| format!("metrics endpoint: cannot listen on {listen}"))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("metrics endpoint: local address of {listen}"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("metrics endpoint: configuring {addr}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("flowlens-metrics".into())
        .spawn(move || accept_loop(listener, &thread_stop, &status, &hub))
        .context("spawning the metrics thread")?;
    Ok(MetricsHandle {
        addr,
        stop,
        thread: Some(thread),
    })
}

fn accept_loop(listener: TcpListener, stop: &AtomicBool, status: &Arc<Status>, hub: &Hub) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ACCEPT_TICK_MS) };
        if r <= 0 {
            continue; // timeout or EINTR: re-check the stop flag
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!("metrics endpoint: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            debug!("metrics endpoint: too many connections, closing one");
            continue;
        }
        let (status, hub, done) = (status.clone(), hub.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("flowlens-metrics-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &status, &hub) {
                    debug!("metrics endpoint: connection: {e}");
                }
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            warn!("metrics endpoint: spawning a connection thread: {e}");
        }
    }
}

/// Answers one request on `stream`, then closes it.
fn serve(mut stream: TcpStream, status: &Status, hub: &Hub) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = match read_head(&mut stream) {
        Ok(h) => h,
        Err(HeadError::TooLarge) => {
            return respond(
                &mut stream,
                431,
                "Request Header Fields Too Large",
                &[],
                "",
                true,
            )
        }
        Err(HeadError::Io(e)) => return Err(e),
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return respond(
            &mut stream,
            400,
            "Bad Request",
            &[],
            "bad request line\n",
            true,
        );
    };
    if !version.starts_with("HTTP/") {
        return respond(
            &mut stream,
            400,
            "Bad Request",
            &[],
            "bad request line\n",
            true,
        );
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    if path != "/metrics" {
        return respond(
            &mut stream,
            404,
            "Not Found",
            &[],
            "not found; try /metrics\n",
            true,
        );
    }
    let body_wanted = match method {
        "GET" => true,
        "HEAD" => false,
        _ => {
            return respond(
                &mut stream,
                405,
                "Method Not Allowed",
                &[("Allow", "GET, HEAD")],
                "method not allowed\n",
                true,
            )
        }
    };
    let text = render(&status.snapshot(), &hub.stats());
    respond(
        &mut stream,
        200,
        "OK",
        &[("Content-Type", CONTENT_TYPE)],
        &text,
        body_wanted,
    )
}

enum HeadError {
    TooLarge,
    Io(std::io::Error),
}

/// Reads up to the blank line ending the request head (or EOF).
fn read_head(stream: &mut TcpStream) -> Result<String, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).map_err(HeadError::Io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    headers: &[(&str, &str)],
    body: &str,
    body_wanted: bool,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {code} {reason}\r\n");
    let has_type = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    for (k, v) in headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    if !has_type {
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    }
    let _ = write!(
        out,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if body_wanted {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()?;
    // Tell the client we are done; errors here (client already gone) do not matter.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
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
        "Records lost by sinks whose queue was full (subscribers, stdout, exporters), departed subscribers included.",
        hub.lost_total,
    );
    e.family(
        "sink_lost_records_total",
        "counter",
        "Records lost by a local sink (stdout, an exporter) that did not keep up.",
    );
    for s in hub.sinks.iter().filter(|s| s.kind != SinkKind::Subscriber) {
        e.sample("sink_lost_records_total", &[("sink", &s.name)], s.lost);
    }
    e.single(
        "replay_ring_records",
        "gauge",
        "Records held in memory for subscribers' replay.",
        hub.ring_len,
    );
    e.single(
        "replay_ring_capacity_records",
        "gauge",
        "Capacity of the replay ring, in records.",
        hub.ring_capacity,
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

    let errors: std::collections::BTreeSet<&str> = counter_names()
        .into_iter()
        .filter(|&(slot, _)| is_error_counter(slot))
        .map(|(_, name)| name)
        .collect();
    let (unaccounted, info): (Vec<_>, Vec<_>) = snap
        .kernel_counters
        .iter()
        .partition(|(name, _)| errors.contains(name.as_str()));
    e.family(
        "kernel_packets_unaccounted_total",
        "counter",
        "Packets the kernel datapath could not account, by reason (sum over reasons for the total).",
    );
    for (name, v) in unaccounted {
        e.sample("kernel_packets_unaccounted_total", &[("reason", name)], v);
    }
    e.family(
        "kernel_packets_total",
        "counter",
        "Informational kernel packet counts (they overlap: do not sum over counter).",
    );
    for (name, v) in info {
        e.sample("kernel_packets_total", &[("counter", name)], v);
    }
    e.single(
        "last_poll_duration_seconds",
        "gauge",
        "Duration of the last poll cycle, in seconds.",
        float(snap.last_poll_ns as f64 / 1e9),
    );
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ring_len: 0,
            ring_capacity: 0,
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
