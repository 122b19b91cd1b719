//! Prometheus self-metrics: the exposition parses, a real scrape over TCP serves a Status's values, and slow, idle or too many clients neither block scrapes nor shutdown.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowlens::hub::{Hub, HubConfig};
use flowlens::metrics::http::{self, HttpLimits};
use flowlens::metrics::{self, MetricsHandle};
use flowlens::record::filter::SubscribeOptions;
use flowlens::status::{MapUsage, Snapshot, Status};

/// One parsed sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict parser for the subset of text format 0.0.4 we emit: every sample line is
/// `name{labels} value`, every family has exactly one HELP and one TYPE before its samples,
/// and a family's lines are contiguous.
fn parse(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
    let name_re = regex::Regex::new(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$").unwrap();
    let sample_re = regex::Regex::new(
        r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})? (\S+)$"#,
    )
    .unwrap();
    let label_re = regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)""#).unwrap();
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    let mut help: HashMap<String, String> = HashMap::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut samples = Vec::new();
    let mut enter = |name: &str, current: &mut Option<String>| {
        if current.as_deref() != Some(name) {
            assert!(
                !finished.iter().any(|f| f == name),
                "family {name} is not contiguous"
            );
            if let Some(c) = current.take() {
                finished.push(c);
            }
            *current = Some(name.to_owned());
        }
    };
    for line in text.lines() {
        assert!(!line.is_empty(), "empty line in exposition");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').expect("HELP has text");
            assert!(name_re.is_match(name), "bad name {name:?}");
            assert!(!doc.trim().is_empty(), "empty HELP for {name}");
            enter(name, &mut current);
            assert!(
                help.insert(name.into(), doc.into()).is_none(),
                "second HELP for {name}"
            );
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type {kind:?}"
            );
            enter(name, &mut current);
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "second TYPE for {name}"
            );
        } else {
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let c = sample_re
                .captures(line)
                .unwrap_or_else(|| panic!("not `name{{labels}} value`: {line:?}"));
            let name = c[1].to_owned();
            assert!(types.contains_key(&name), "sample before TYPE: {line:?}");
            assert!(help.contains_key(&name), "sample before HELP: {line:?}");
            enter(&name, &mut current);
            let mut labels = BTreeMap::new();
            if let Some(l) = c.get(3) {
                for lc in label_re.captures_iter(l.as_str()) {
                    assert!(
                        labels.insert(lc[1].to_owned(), lc[2].to_owned()).is_none(),
                        "duplicate label in {line:?}"
                    );
                }
            }
            let value: f64 = c[4]
                .parse()
                .unwrap_or_else(|e| panic!("value of {line:?}: {e}"));
            if types[&name] == "counter" {
                assert!(name.ends_with("_total"), "counter {name} lacks _total");
                assert!(value >= 0.0, "negative counter {line:?}");
            }
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
    }
    for name in types.keys() {
        assert!(help.contains_key(name), "{name} has TYPE but no HELP");
        assert!(name.starts_with("flowlens_"), "{name} lacks the prefix");
    }
    for name in help.keys() {
        assert!(types.contains_key(name), "{name} has HELP but no TYPE");
    }
    // No two samples with the same name and labels.
    for (i, a) in samples.iter().enumerate() {
        assert!(
            !samples[i + 1..]
                .iter()
                .any(|b| b.name == a.name && b.labels == a.labels),
            "duplicate sample {a:?}"
        );
    }
    (samples, types)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .value
}

/// A Status with a distinct value in every field.
fn filled_status() -> Arc<Status> {
    let s = Arc::new(Status::new());
    s.flows_ended.store(1234, Ordering::Relaxed);
    s.records_emitted.store(1500, Ordering::Relaxed);
    s.orphans_removed.store(7, Ordering::Relaxed);
    s.last_poll_ns.store(2_500_000, Ordering::Relaxed);
    s.active_flows.store(321, Ordering::Relaxed);
    s.map_pressure_events.store(3, Ordering::Relaxed);
    let maps = vec![
        MapUsage {
            name: "flows".into(),
            entries: 321,
            capacity: 65_536,
        },
        MapUsage {
            name: "flows_tcp".into(),
            entries: 16_384,
            capacity: 32_768,
        },
        MapUsage {
            name: "flows_icmp".into(),
            entries: 5,
            capacity: 8_192,
        },
    ];
    let mut counters: BTreeMap<String, u64> = flowlens::kernel::datapath::counter_names()
        .into_iter()
        .map(|(slot, name)| (name.to_owned(), 1000 + u64::from(slot)))
        .collect();
    counters.extend(
        flowlens::kernel::datapath::owner_counter_names()
            .into_iter()
            .map(|(slot, name)| (name.to_owned(), 2000 + u64::from(slot))),
    );
    s.set_detail(maps, counters);
    use flowlens::poller::probation::{ProbationPort, ProbationProto, ProbationStatus};
    s.set_probation(ProbationStatus {
        protocols: vec![ProbationProto {
            protocol: "udp",
            entered: 100,
            admitted: 10,
            ended: 5,
            evicted: 77,
            waiting: 8,
        }],
        capacity: 32_768,
        sources_estimate: 999,
        tallied: 60,
        top_ports: vec![ProbationPort {
            protocol: "tcp",
            port: 80,
            flows: 55,
        }],
    });
    s
}

#[test]
fn render_parses_and_carries_every_value() {
    let status = filled_status();
    let hub = Hub::new(HubConfig {
        ring_capacity: 100,
        buffer_memory: 1 << 20,
    });
    // Subscriptions run a task on the caller's runtime.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _rt = rt.enter();
    let _sub1 = hub.subscribe(SubscribeOptions::default());
    let _sub2 = hub.subscribe(SubscribeOptions::default());
    let text = metrics::render(&status.snapshot(), &hub.stats());
    let (samples, types) = parse(&text);

    assert_eq!(value(&samples, "flowlens_flows_active", &[]), 321.0);
    assert_eq!(types["flowlens_flows_active"], "gauge");
    assert_eq!(value(&samples, "flowlens_flows_ended_total", &[]), 1234.0);
    assert_eq!(types["flowlens_flows_ended_total"], "counter");
    assert_eq!(
        value(&samples, "flowlens_records_emitted_total", &[]),
        1500.0
    );
    assert_eq!(value(&samples, "flowlens_subscribers", &[]), 2.0);
    assert_eq!(types["flowlens_subscribers"], "gauge");
    assert_eq!(
        value(&samples, "flowlens_subscriber_lost_records_total", &[]),
        0.0
    );
    assert_eq!(value(&samples, "flowlens_orphans_removed_total", &[]), 7.0);
    assert_eq!(
        value(&samples, "flowlens_map_pressure_events_total", &[]),
        3.0
    );
    assert_eq!(
        value(&samples, "flowlens_last_poll_duration_seconds", &[]),
        0.0025
    );
    assert_eq!(
        value(&samples, "flowlens_replay_ring_capacity_records", &[]),
        100.0
    );
    let up = value(&samples, "flowlens_uptime_seconds", &[]);
    assert!((0.0..60.0).contains(&up), "uptime {up}");
    assert!(value(&samples, "flowlens_start_time_seconds", &[]) > 1.6e9);

    for (map, entries, cap) in [
        ("flows", 321.0, 65_536.0),
        ("flows_tcp", 16_384.0, 32_768.0),
        ("flows_icmp", 5.0, 8_192.0),
    ] {
        assert_eq!(
            value(&samples, "flowlens_map_entries", &[("map", map)]),
            entries
        );
        assert_eq!(
            value(&samples, "flowlens_map_capacity_entries", &[("map", map)]),
            cap
        );
        let ratio = value(&samples, "flowlens_map_utilization_ratio", &[("map", map)]);
        assert!((ratio - entries / cap).abs() < 1e-12, "{map}: {ratio}");
    }
    assert_eq!(
        value(
            &samples,
            "flowlens_map_utilization_ratio",
            &[("map", "flows_tcp")]
        ),
        0.5
    );

    // Every kernel counter appears once, in the family its class says; probation's count
    // flows and have a family of their own.
    let packet_counters: Vec<(u32, &str)> = flowlens::kernel::datapath::counter_names()
        .into_iter()
        .filter(|(_, name)| !name.starts_with("probation_"))
        .collect();
    for (slot, name) in packet_counters.iter().copied() {
        let (family, label) = if flowlens::kernel::datapath::is_error_counter(slot) {
            ("flowlens_kernel_packets_unaccounted_total", "reason")
        } else if flowlens::kernel::datapath::is_sample_loss_counter(slot) {
            ("flowlens_kernel_samples_lost_total", "reason")
        } else {
            ("flowlens_kernel_packets_total", "counter")
        };
        assert_eq!(
            value(&samples, family, &[(label, name)]),
            1000.0 + f64::from(slot),
            "{name}"
        );
    }
    // The attribution counters are no packets: a family of their own.
    for (slot, name) in flowlens::kernel::datapath::owner_counter_names() {
        assert_eq!(
            value(
                &samples,
                "flowlens_kernel_attribution_lost_total",
                &[("reason", name)]
            ),
            2000.0 + f64::from(slot),
            "{name}"
        );
    }
    assert_eq!(types["flowlens_kernel_attribution_lost_total"], "counter");
    let kernel = samples
        .iter()
        .filter(|s| s.name.starts_with("flowlens_kernel_"))
        .count();
    assert_eq!(
        kernel,
        packet_counters.len() + flowlens::kernel::datapath::owner_counter_names().len()
    );
    assert_eq!(
        value(
            &samples,
            "flowlens_probation_flows_total",
            &[("protocol", "udp"), ("outcome", "evicted")]
        ),
        77.0
    );
    assert_eq!(
        value(
            &samples,
            "flowlens_probation_port_flows_total",
            &[("protocol", "tcp"), ("port", "80")]
        ),
        55.0
    );
    assert_eq!(
        value(&samples, "flowlens_probation_sources_estimate", &[]),
        999.0
    );
    assert_eq!(
        value(
            &samples,
            "flowlens_kernel_packets_total",
            &[("counter", "packets_accounted")]
        ),
        1000.0 + f64::from(flowlens::kernel::bpf::types::flow_counter::CNT_PACKETS.0)
    );
}

#[test]
fn render_of_an_empty_snapshot_parses() {
    let hub = Hub::new(HubConfig::default());
    let text = metrics::render(&Snapshot::default(), &hub.stats());
    let (samples, types) = parse(&text);
    assert_eq!(value(&samples, "flowlens_flows_active", &[]), 0.0);
    // Families without samples still carry HELP and TYPE.
    assert!(types.contains_key("flowlens_map_entries"));
    assert!(!samples.iter().any(|s| s.name == "flowlens_map_entries"));
}

#[test]
fn label_values_are_escaped_in_the_exposition() {
    let s = Status::new();
    s.set_detail(
        vec![MapUsage {
            name: "we\"ird\\map\nname".into(),
            entries: 1,
            capacity: 2,
        }],
        BTreeMap::new(),
    );
    let hub = Hub::new(HubConfig::default());
    let text = metrics::render(&s.snapshot(), &hub.stats());
    let (samples, _) = parse(&text);
    assert_eq!(
        value(
            &samples,
            "flowlens_map_entries",
            &[("map", "we\\\"ird\\\\map\\nname")]
        ),
        1.0
    );
}

/// One HTTP exchange on a fresh connection: (status code, headers, body).
fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    exchange(&mut s, request)
}

/// Sends `request` on `s` and reads one response: up to Content-Length when the server sends
/// one (the connection may stay open for the next request), else to the end of the stream.
fn exchange(s: &mut TcpStream, request: &str) -> (u16, String, String) {
    s.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).expect("read response head");
        assert!(n > 0, "connection closed inside the response head: {raw:?}");
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(raw[..head_end].to_vec()).expect("utf-8 head");
    let mut body = raw[head_end + 4..].to_vec();
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line of {head:?}"));
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|len| len.parse::<usize>().expect("Content-Length"));
    match length {
        _ if request.starts_with("HEAD ") => {}
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk).expect("read response body");
                assert!(n > 0, "connection closed inside the body");
                body.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(len, body.len(), "Content-Length");
        }
        None => {
            s.read_to_end(&mut body).expect("read response body");
        }
    }
    (code, head, String::from_utf8(body).expect("utf-8 body"))
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n"),
    )
}

#[test]
fn scrape_over_tcp() {
    let status = filled_status();
    let hub = Hub::new(HubConfig::default());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _rt = rt.enter();
    let _sub = hub.subscribe(SubscribeOptions::default());
    let h = metrics::spawn("127.0.0.1:0", status.clone(), hub.clone()).expect("spawn");
    let addr = h.local_addr();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);

    let (code, head, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let (samples, _) = parse(&body);
    assert_eq!(value(&samples, "flowlens_flows_active", &[]), 321.0);
    assert_eq!(value(&samples, "flowlens_flows_ended_total", &[]), 1234.0);
    assert_eq!(value(&samples, "flowlens_subscribers", &[]), 1.0);
    assert_eq!(
        value(
            &samples,
            "flowlens_map_capacity_entries",
            &[("map", "flows_icmp")]
        ),
        8192.0
    );
    assert!(body.contains("\nflowlens_records_emitted_total 1500\n"));

    // Values are live: a change shows in the next scrape.
    status.flows_ended.store(99_999, Ordering::Relaxed);
    let (_, _, body) = get(addr, "/metrics?x=1");
    assert!(
        body.contains("\nflowlens_flows_ended_total 99999\n"),
        "{body}"
    );

    let (code, _, _) = get(addr, "/");
    assert_eq!(code, 404);
    let (code, _, _) = get(addr, "/metrics/x");
    assert_eq!(code, 404);
    let (code, head, _) = http(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(code, 405);
    assert!(head.contains("Allow: GET"), "{head}");
    let (code, _, body) = http(addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 200);
    assert!(body.is_empty());
    let (code, _, _) = http(addr, "garbage\r\n\r\n");
    assert_eq!(code, 400);

    h.shutdown();
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "still listening after shutdown"
    );
}

#[test]
fn a_silent_client_does_not_block_others() {
    let hub = Hub::new(HubConfig::default());
    let h = metrics::spawn("127.0.0.1:0", Arc::new(Status::new()), hub).expect("spawn");
    let addr = h.local_addr();
    // Connections that never send a request (and one that sends half of one).
    let silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /met").unwrap();
    let t = Instant::now();
    let (code, _, _) = get(addr, "/metrics");
    assert_eq!(code, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(silent);
    drop(half);
    h.shutdown();
}

#[test]
fn port_in_use_names_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = metrics::spawn(
        &addr,
        Arc::new(Status::new()),
        Hub::new(HubConfig::default()),
    )
    .expect_err("the port is taken");
    let msg = format!("{err:#}");
    assert!(msg.contains(&addr), "{msg}");
    assert!(msg.to_lowercase().contains("in use"), "{msg}");

    let err = metrics::spawn(
        "not-an-address",
        Arc::new(Status::new()),
        Hub::new(HubConfig::default()),
    )
    .expect_err("bad address");
    assert!(format!("{err:#}").contains("not-an-address"), "{err:#}");
}

// ---------------------------------------------------------------------------
// The HTTP endpoint under slow, idle and too many clients
// ---------------------------------------------------------------------------

/// An endpoint on a runtime the test owns, serving a fixed text.
fn serve_text(limits: HttpLimits) -> (tokio::runtime::Runtime, MetricsHandle) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let render: http::Render = Arc::new(|| "flowlens_up 1\n".to_owned());
    let h = http::spawn("127.0.0.1:0", rt.handle(), render, limits).expect("spawn");
    (rt, h)
}

/// The default limits but for a shorter request timeout, to keep the tests short.
fn limits_timing_out_after(request_timeout: Duration) -> HttpLimits {
    HttpLimits {
        request_timeout,
        ..HttpLimits::default()
    }
}

const SCRAPE: &str = "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Whether the server has closed `s` (reads EOF or a reset); never blocks.
fn closed_by_server(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let r = (&*s).read(&mut [0u8; 64]);
    s.set_nonblocking(false).unwrap();
    match r {
        Ok(0) => true,
        Ok(_) => false, // an error response (e.g. 408/400) precedes the close
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// A client sending a request one byte at a time, `every` apart.
struct Trickler {
    s: TcpStream,
    sent: usize,
    next: Instant,
}

impl Trickler {
    fn connect(addr: SocketAddr, first: Instant) -> Self {
        let s = TcpStream::connect(addr).expect("connect trickler");
        Trickler {
            s,
            sent: 0,
            next: first,
        }
    }

    /// Sends the next byte when due; false once the server has closed the connection.
    fn tick(&mut self, every: Duration) -> bool {
        if closed_by_server(&self.s) {
            return false;
        }
        if Instant::now() >= self.next {
            // Never completes: the blank line ending the head is not in the pattern.
            let pattern =
                b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            let byte = pattern[self.sent.min(pattern.len() - 1)];
            if (&self.s).write_all(&[byte]).is_err() {
                return false;
            }
            self.sent += 1;
            self.next += every;
        }
        true
    }
}

#[test]
fn trickling_clients_beyond_the_cap_do_not_block_scrapes() {
    let limits = HttpLimits::default();
    const TRICKLERS: usize = 40;
    assert!(TRICKLERS > limits.max_connections);
    let (_rt, h) = serve_text(limits);
    let addr = h.local_addr();
    let every = Duration::from_secs(2);
    let start = Instant::now();
    // Staggered so that some byte arrives every 50 ms; each reconnects as soon as it is closed.
    let mut ts: Vec<Trickler> = (0..TRICKLERS)
        .map(|i| Trickler::connect(addr, start + every * i as u32 / TRICKLERS as u32))
        .collect();
    let mut reconnects = 0;
    // A scraper keeping its connection alive; like any client it asks as soon as it connects
    // (a connection that has not sent a complete request is what gets evicted at the cap).
    let mut kept_alive = TcpStream::connect(addr).unwrap();
    kept_alive
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(exchange(&mut kept_alive, SCRAPE).0, 200);
    let (mut scrapes, mut worst) = (0, Duration::ZERO);
    let mut next_scrape = start + Duration::from_millis(500);
    while start.elapsed() < Duration::from_secs(10) {
        for t in &mut ts {
            if !t.tick(every) {
                *t = Trickler::connect(addr, Instant::now());
                reconnects += 1;
            }
        }
        if Instant::now() >= next_scrape {
            // A fresh connection, as a scraper arriving at the cap, and a kept-alive one.
            let t = Instant::now();
            let (code, _, body) = get(addr, "/metrics");
            assert_eq!((code, body.as_str()), (200, "flowlens_up 1\n"));
            let (code, _, body) = exchange(&mut kept_alive, SCRAPE);
            assert_eq!((code, body.as_str()), (200, "flowlens_up 1\n"));
            let took = t.elapsed();
            assert!(
                took < Duration::from_secs(2),
                "scrape {scrapes} took {took:?}"
            );
            worst = worst.max(took);
            scrapes += 1;
            next_scrape += Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{scrapes} scrape pairs under {TRICKLERS} tricklers, slowest {worst:?}, {reconnects} tricklers closed by the server");
    assert!(scrapes >= 15, "{scrapes}");
    // At the cap, scrapes evict tricklers; past the request timeout, the rest are cut off.
    assert!(reconnects >= TRICKLERS, "{reconnects}");
    drop(ts);
    h.shutdown();
}

#[test]
fn half_a_header_is_cut_off_after_the_request_timeout() {
    let timeout = Duration::from_secs(3);
    let (_rt, h) = serve_text(limits_timing_out_after(timeout));
    let start = Instant::now();
    // A byte every 500 ms: no single read ever waits long, only the whole head does.
    let mut t = Trickler::connect(h.local_addr(), start);
    while t.tick(Duration::from_millis(500)) {
        assert!(
            start.elapsed() < timeout * 2,
            "still open after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let open = start.elapsed();
    eprintln!("half a header ({} bytes) cut off after {open:?}", t.sent);
    assert!(open >= timeout - Duration::from_millis(200), "{open:?}");
    assert!(t.sent >= 5, "{} bytes", t.sent);
    h.shutdown();
}

#[test]
fn keep_alive_is_bounded_by_requests_and_idle_time() {
    let timeout = Duration::from_secs(2);
    let (_rt, h) = serve_text(HttpLimits {
        max_requests_per_connection: 3,
        ..limits_timing_out_after(timeout)
    });
    let mut s = TcpStream::connect(h.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 1..=3 {
        let (code, head, _) = exchange(&mut s, SCRAPE);
        assert_eq!(code, 200);
        assert_eq!(head.contains("Connection: close"), i == 3, "{head}");
    }
    assert_eq!(
        s.read(&mut [0u8; 16]).unwrap(),
        0,
        "closed after the last request"
    );

    // An idle kept-alive connection is closed once the next head is overdue.
    let mut s = TcpStream::connect(h.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    exchange(&mut s, SCRAPE);
    let idle = Instant::now();
    assert_eq!(s.read(&mut [0u8; 16]).unwrap_or(0), 0);
    let waited = idle.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(200) && waited < timeout * 2,
        "{waited:?}"
    );
    h.shutdown();
}

#[test]
fn shutdown_with_trickling_connections_is_prompt() {
    let (rt, h) = serve_text(HttpLimits::default());
    let addr = h.local_addr();
    let start = Instant::now();
    // Fewer than the connection cap, so none of them is closed to make room before the
    // shutdown this test is about.
    let cap = HttpLimits::default().max_connections;
    let mut ts: Vec<Trickler> = (0..cap - 2)
        .map(|_| Trickler::connect(addr, start))
        .collect();
    for t in &mut ts {
        assert!(t.tick(Duration::from_secs(1)));
    }
    let mut kept_alive = TcpStream::connect(addr).unwrap();
    kept_alive
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(exchange(&mut kept_alive, SCRAPE).0, 200);
    std::thread::sleep(Duration::from_millis(200));

    let t = Instant::now();
    h.shutdown();
    let took = t.elapsed();
    eprintln!("shutdown with 41 open connections took {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "still listening after shutdown"
    );
    // Every connection was closed, not left to its timeout.
    std::thread::sleep(Duration::from_millis(100));
    let open = ts.iter().filter(|t| !closed_by_server(&t.s)).count();
    assert_eq!(open, 0, "connections left open");
    assert!(closed_by_server(&kept_alive));
    drop(rt);
}

/// Set in the child process that `out_of_descriptors_backs_off_instead_of_spinning` starts.
const EMFILE_CHILD: &str = "FLOWLENS_TEST_EMFILE_CHILD";

/// CPU time this process has used (user + system).
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the zero-initialised struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out-pointer.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
fn out_of_descriptors_backs_off_instead_of_spinning() {
    if std::env::var_os(EMFILE_CHILD).is_some() {
        return emfile_child();
    }
    // The descriptor limit is per process: exhaust it in a child, not among the other tests.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "out_of_descriptors_backs_off_instead_of_spinning",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(EMFILE_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the child test");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "child failed: {}", out.status);
    assert!(text.contains("1 passed"), "the child ran no test");
    // One warning for the whole episode, one note when it ends.
    assert_eq!(
        text.matches("metrics endpoint: accept:").count(),
        1,
        "{text}"
    );
    assert_eq!(text.matches("accepting again after").count(), 1, "{text}");
    // 2 s out of descriptors at 100, 200, 400, 800 ms pauses: about five tries, not thousands.
    let tries: u32 = text
        .split("accepting again after ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("failed accept count");
    assert!((2..=10).contains(&tries), "{tries} failed accepts in 2 s");
}

fn emfile_child() {
    let _ = env_logger::builder()
        .is_test(true)
        .filter_level(log::LevelFilter::Info)
        .try_init();
    let (_rt, h) = serve_text(HttpLimits::default());
    let addr = h.local_addr();
    let lim = libc::rlimit {
        rlim_cur: 256,
        rlim_max: libc::RLIM_INFINITY,
    };
    let mut old: libc::rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to rlimit structs for the duration of the calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        let lim = libc::rlimit {
            rlim_max: old.rlim_max,
            ..lim
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let mut filler = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
    // One descriptor for the client; the server's accept then has none.
    filler.pop();
    let mut client = TcpStream::connect(addr).expect("connect");
    client.write_all(SCRAPE.as_bytes()).unwrap();
    let cpu = cpu_time();
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time() - cpu;
    eprintln!(
        "out of descriptors for {:?}: the process used {used:?} of CPU",
        wall.elapsed()
    );
    assert!(
        used < Duration::from_millis(300),
        "accept loop spinning: {used:?}"
    );

    drop(filler);
    let freed = Instant::now();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut raw = [0u8; 512];
    let n = client
        .read(&mut raw)
        .expect("response after descriptors came back");
    assert!(raw[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &raw[..n]);
    let waited = freed.elapsed();
    eprintln!("served {waited:?} after descriptors came back");
    assert!(waited < Duration::from_millis(1500), "{waited:?}");
    h.shutdown();
}
