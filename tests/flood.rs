//! A random-source SYN and UDP flood at the rate this machine sustains (hping3 --flood) against the monitored host, while legitimate flows run (some started before it, some during): every flow that started before is recorded exactly, at least 95 % of all of them are, at the default --max-flows and at 4,096; the agent's CPU during the flood is printed.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bin::start;
use common::capture::{Capture, Packet};
use common::netns::NetPair;
use serde_json::Value;

/// How long each flood runs (hping3 is stopped by `timeout`, so it ends by itself).
const FLOOD_SECS: u64 = 9;

/// hping3 is a test dependency (Makefile TEST_APT_PACKAGES); install it when missing.
fn ensure_hping3() {
    let have = || {
        Command::new("sh")
            .args(["-c", "command -v hping3"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have() {
        return;
    }
    let ok = Command::new("sh")
        .args([
            "-c",
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hping3 >/dev/null 2>&1 || \
             (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hping3 >/dev/null)",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok && have(), "hping3 is needed: apt-get install hping3");
}

/// The floods, each stopped by `timeout` after FLOOD_SECS; killed on drop (even on panic).
struct Flood(Vec<(&'static str, Child)>);

impl Flood {
    fn start(ns: &str, ifc: &str, to: IpAddr) -> Flood {
        let to = to.to_string();
        let kinds: [(&str, &[&str]); 2] = [
            ("SYN", &["-S", "-p", "80"]),
            ("UDP", &["--udp", "-p", "53"]),
        ];
        Flood(
            kinds
                .iter()
                .map(|(name, kind)| {
                    let child = Command::new("timeout")
                        .args(["-s", "INT", &FLOOD_SECS.to_string()])
                        .args(["ip", "netns", "exec", ns, "hping3", "-I", ifc])
                        .args(*kind)
                        .args(["--flood", "--rand-source", &to])
                        .stdin(Stdio::null())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("spawn hping3");
                    (*name, child)
                })
                .collect(),
        )
    }

    /// Waits for every flood to end; the packets each sent, from its statistics.
    fn wait(&mut self) -> Vec<(&'static str, u64)> {
        self.0
            .drain(..)
            .map(|(name, mut c)| {
                let mut out = String::new();
                if let Some(mut s) = c.stdout.take() {
                    let _ = s.read_to_string(&mut out);
                }
                if let Some(mut s) = c.stderr.take() {
                    let _ = s.read_to_string(&mut out);
                }
                let _ = c.wait();
                // "N packets tramitted, M packets received" (sic)
                let sent = out
                    .lines()
                    .find(|l| l.contains("packets tr"))
                    .and_then(|l| l.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                (name, sent)
            })
            .collect()
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Packets between the two hosts, captured on b's veth (filtered in the kernel) and
/// drained often; `mark` notes how many came before a point in time.
struct Tap {
    kept: Arc<Mutex<Vec<Packet>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tap {
    fn start(net: &NetPair) -> Tap {
        let (IpAddr::V4(a), IpAddr::V4(b)) = net.addrs(false) else {
            unreachable!("v4 addresses")
        };
        let ifindex = common::netns::ifindex_in(&net.b, &net.if_b);
        let cap = net
            .in_ns(&net.b, move || Capture::open_between(ifindex, a, b))
            .join()
            .expect("capture");
        let kept = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (k, s) = (kept.clone(), stop.clone());
        let thread = std::thread::spawn(move || loop {
            let done = s.load(Ordering::Relaxed);
            let got = cap.drain();
            k.lock().expect("tap").extend(got);
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        });
        Tap {
            kept,
            stop,
            thread: Some(thread),
        }
    }

    /// Packets captured so far (a moment later: the drain runs every 5 ms).
    fn mark(&self) -> usize {
        std::thread::sleep(Duration::from_millis(20));
        self.kept.lock().expect("tap").len()
    }

    fn packets(mut self) -> Vec<Packet> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("tap thread");
        }
        std::mem::take(&mut *self.kept.lock().expect("tap"))
    }
}

/// A flow as both the capture and the records name it: protocol and its two ends,
/// ordered (ICMP echo: the identifier as both ports).
type FlowKey = (u8, (IpAddr, u16), (IpAddr, u16));

fn key(proto: u8, x: (IpAddr, u16), y: (IpAddr, u16)) -> FlowKey {
    (proto, x.min(y), x.max(y))
}

/// Per direction (packets, bytes), by sender.
type Sent = BTreeMap<IpAddr, (u64, u64)>;

/// User and system CPU time of a process so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // fields 14 and 15 of stat(5), counted from the state (field 3) here
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A UDP echo server in b's namespace until `stop`; returns its port.
fn udp_echo(net: &NetPair, stop: Arc<AtomicBool>) -> (u16, std::thread::JoinHandle<()>) {
    let (_, b) = net.addrs(false);
    let (tx, rx) = std::sync::mpsc::channel();
    let h = net.in_ns(&net.b, move || {
        let s = UdpSocket::bind(SocketAddr::new(b, 0)).expect("bind udp");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        tx.send(s.local_addr().expect("addr").port()).expect("port");
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n.min(64)], from);
            }
        }
    });
    (rx.recv().expect("udp port"), h)
}

/// From a's namespace: `n` requests from one socket, `gap` apart, each awaiting its reply.
fn udp_client(net: &NetPair, port: u16, n: u32, gap: Duration) -> std::thread::JoinHandle<()> {
    let (_, b) = net.addrs(false);
    net.in_ns(&net.a, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        for i in 0..n {
            s.send_to(&[i as u8; 120], SocketAddr::new(b, port))
                .expect("send");
            let _ = s.recv_from(&mut buf);
            std::thread::sleep(gap);
        }
    })
}

/// From a's namespace: a connection that sends 1,500 bytes every 100 ms for `secs`.
fn tcp_trickle(net: &NetPair, secs: u64) -> std::thread::JoinHandle<()> {
    let (_, b) = net.addrs(false);
    let listener = net.listen_b(false, 0);
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        s.write_all(b"done").expect("write");
    });
    net.in_ns(&net.a, move || {
        let mut c = TcpStream::connect(SocketAddr::new(b, port)).expect("connect");
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            c.write_all(&[3u8; 1500]).expect("send");
            std::thread::sleep(Duration::from_millis(100));
        }
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut back = Vec::new();
        c.read_to_end(&mut back).expect("read back");
        server.join().expect("server");
    })
}

fn ping(net: &NetPair, count: u32, interval: &str) -> Child {
    let (_, b) = net.addrs(false);
    Command::new("ip")
        .args(["netns", "exec", &net.a, "ping", "-q", "-i", interval])
        .args(["-c", &count.to_string(), &b.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ping")
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn run(max_flows: Option<&str>) {
    ensure_hping3();
    let net = NetPair::new();
    let (a, b) = net.addrs(false);
    let mut args = vec![
        "--interface",
        net.if_b.as_str(),
        "--idle-timeout-tcp",
        "5s",
        "--idle-timeout-udp",
        "3s",
        "--idle-timeout-icmp",
        "3s",
        "--tcp-close-grace",
        "300ms",
    ];
    if let Some(n) = max_flows {
        args.extend(["--max-flows", n]);
    }
    let mut agent = start(&net.b, &args);
    // The verifier takes seconds on a busy machine (a debug build loads the same object).
    agent.wait_log("attached to", Duration::from_secs(60));
    let tap = Tap::start(&net);
    let stop_udp = Arc::new(AtomicBool::new(false));
    let (udp_port, udp_server) = udp_echo(&net, stop_udp.clone());

    // Before the flood, running through it: a ping, a trickling connection, a UDP
    // request/response exchange.
    let long = FLOOD_SECS + 3;
    let mut long_ping = ping(&net, (long * 5) as u32, "0.2");
    let trickle = tcp_trickle(&net, long);
    let long_udp = udp_client(
        &net,
        udp_port,
        (long * 5) as u32,
        Duration::from_millis(200),
    );
    std::thread::sleep(Duration::from_secs(1));
    let before_flood = tap.mark();

    let cpu0 = cpu_secs(agent.child.id());
    let t0 = Instant::now();
    let mut flood = Flood::start(&net.a, &net.if_a, b);
    std::thread::sleep(Duration::from_secs(1));
    // During it: short connections, a bulk transfer, lone UDP exchanges, pings.
    let mut pings: Vec<Child> = (0..4).map(|_| ping(&net, 3, "0.2")).collect();
    for _ in 0..10 {
        common::traffic::tcp_transfer(&net, false, 20_000, 2_000);
        udp_client(&net, udp_port, 1, Duration::ZERO)
            .join()
            .expect("udp exchange");
        std::thread::sleep(Duration::from_millis(150));
    }
    common::traffic::tcp_transfer(&net, false, 4_000_000, 1_000);
    let sent = flood.wait();
    let flood_secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_secs(agent.child.id()) - cpu0) / flood_secs;

    trickle.join().expect("trickle");
    long_udp.join().expect("long udp");
    let _ = long_ping.wait();
    for p in &mut pings {
        let _ = p.wait();
    }
    stop_udp.store(true, Ordering::Relaxed);
    udp_server.join().expect("udp server");
    // A full scan after the flood, then what the agent counted.
    std::thread::sleep(Duration::from_millis(1500));
    let metrics = net.scrape(&net.b, "127.0.0.1:9464");
    let metric = |name: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let evicted = metric("flowlens_probation_flows_total{protocol=\"tcp\",outcome=\"evicted\"}")
        + metric("flowlens_probation_flows_total{protocol=\"udp\",outcome=\"evicted\"}");
    let entered = metric("flowlens_probation_flows_total{protocol=\"tcp\",outcome=\"entered\"}")
        + metric("flowlens_probation_flows_total{protocol=\"udp\",outcome=\"entered\"}");
    let base_full = metric("flowlens_kernel_packets_unaccounted_total{reason=\"base_map_full\"}");
    let deferred =
        metric("flowlens_kernel_packets_total{counter=\"admission_deferred_base_full\"}");
    let sources = metric("flowlens_probation_sources_estimate");
    let top_port: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("flowlens_probation_port_flows_total"))
        .collect();
    let pkts = tap.packets();
    let (status, lines) = agent.stop();
    assert!(status.success(), "the agent stays up through the flood");

    // The truth: what each host sent, per flow.
    let mut truth: BTreeMap<FlowKey, Sent> = BTreeMap::new();
    let mut started_before = std::collections::BTreeSet::new();
    for (i, p) in pkts.iter().enumerate() {
        let k = key(p.proto, (p.src, p.sport), (p.dst, p.dport));
        let e = truth.entry(k).or_default().entry(p.src).or_default();
        e.0 += 1;
        e.1 += p.ip_bytes;
        if i < before_flood {
            started_before.insert(k);
        }
    }
    // What flowlens recorded, the same way.
    let mut seen: BTreeMap<FlowKey, Sent> = BTreeMap::new();
    let mut partial = 0;
    let mut not_json = Vec::new();
    for l in &lines {
        let Ok(r) = serde_json::from_str::<Value>(l) else {
            not_json.push(l);
            continue;
        };
        let addr = |f: &str| r[f].as_str().and_then(|s| s.parse::<IpAddr>().ok());
        let (Some(c), Some(s)) = (addr("client_addr"), addr("server_addr")) else {
            continue;
        };
        if ![c, s].contains(&a) || ![c, s].contains(&b) {
            continue;
        }
        let proto = u(&r["protocol"]) as u8;
        let (cp, sp) = match r["icmp"]["echo_id"].as_u64() {
            Some(id) => (id as u16, id as u16),
            None => (u(&r["client_port"]) as u16, u(&r["server_port"]) as u16),
        };
        partial += usize::from(r["partial"] == true);
        let k = key(proto, (c, cp), (s, sp));
        let e = seen.entry(k).or_default();
        for (who, side) in [(c, "client"), (s, "server")] {
            let x = e.entry(who).or_default();
            x.0 += u(&r[side]["packets"]);
            x.1 += u(&r[side]["bytes"]);
        }
    }
    let exact = |k: &FlowKey| {
        let t = &truth[k];
        let s = seen.get(k);
        [a, b].iter().all(|h| {
            t.get(h).copied().unwrap_or_default()
                == s.and_then(|s| s.get(h).copied()).unwrap_or_default()
        })
    };
    let wrong: Vec<(&FlowKey, &Sent, Option<&Sent>)> = truth
        .iter()
        .filter(|(k, _)| !exact(k))
        .map(|(k, t)| (k, t, seen.get(k)))
        .collect();
    let n = truth.len();
    let rate: Vec<String> = sent
        .iter()
        .map(|(k, p)| format!("{k} {:.0} k/s", *p as f64 / FLOOD_SECS as f64 / 1e3))
        .collect();
    eprintln!(
        "flood ({}) for {flood_secs:.1} s at --max-flows {}: {} of {n} legitimate flows exact, {} started before the flood; {partial} partial records; agent CPU during the flood {:.0} % of a core; probation: {entered} entered, {evicted} evicted, ~{sources} sources, ports {top_port:?}; base_map_full {base_full}, admission deferred {deferred}",
        rate.join(", "),
        max_flows.unwrap_or("65536 (default)"),
        n - wrong.len(),
        started_before.len(),
        cpu * 100.0
    );
    assert!(
        not_json.is_empty(),
        "stdout lines not JSON: {:?}",
        &not_json[..not_json.len().min(3)]
    );
    assert!(evicted > 0 && sources > 1_000, "the flood was counted");
    assert!(
        top_port.iter().any(|l| l.contains("port=\"80\"")),
        "{top_port:?}"
    );
    assert!(
        sent.iter().all(|(_, p)| *p > 10_000),
        "the flood ran: {sent:?}"
    );
    assert!(n >= 25, "{n} legitimate flows captured");
    let before_wrong: Vec<_> = wrong
        .iter()
        .filter(|(k, _, _)| started_before.contains(*k))
        .collect();
    assert!(
        before_wrong.is_empty(),
        "flows started before the flood, not exact: {before_wrong:#?}"
    );
    assert!(
        (n - wrong.len()) as f64 >= 0.95 * n as f64,
        "{} of {n} flows not exact: {wrong:#?}",
        wrong.len()
    );
}

#[test]
fn legitimate_flows_stay_exact_through_a_flood_at_the_default_max_flows() {
    run(None);
}

#[test]
fn legitimate_flows_stay_exact_through_a_flood_at_4096_max_flows() {
    run(Some("4096"));
}
