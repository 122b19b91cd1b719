//! A random-source SYN/UDP/ICMP flood at the capacity of small maps: flows started during it still get exact records, the log tells what the flood cost, and the agent drains afterwards.

mod common;

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bin::start;
use common::capture::{sent_by, Capture, Packet};
use common::netns::NetPair;
use serde_json::Value;

/// Longest the flood runs.
const FLOOD: Duration = Duration::from_secs(12);

/// hping3 is a test dependency (Makefile APT_PACKAGES); install it when missing.
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

/// hping3 processes, killed on drop (even on panic).
struct Flood(Vec<Child>);

impl Flood {
    /// One paced random-source stream per kind, from namespace `ns` out of `ifc` to `to`;
    /// `gap_us` between packets of each stream.
    fn start(ns: &str, ifc: &str, to: IpAddr, gap_us: u32) -> Flood {
        let gap = format!("u{gap_us}");
        let to = to.to_string();
        let kinds: [&[&str]; 3] = [&["-S", "-p", "80"], &["--udp", "-p", "53"], &["--icmp"]];
        Flood(
            kinds
                .iter()
                .map(|kind| {
                    Command::new("ip")
                        .args(["netns", "exec", ns, "hping3", "-q", "-I", ifc])
                        .args(*kind)
                        .args(["--rand-source", "-i", &gap, &to])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("spawn hping3")
                })
                .collect(),
        )
    }

    fn stop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Packets between the pair's two v4 addresses, captured on `a`'s veth and drained often
/// enough that the flood cannot overrun the socket buffer.
struct Tap {
    kept: Arc<Mutex<Vec<Packet>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tap {
    fn start(net: &NetPair) -> Tap {
        let ifindex = net.ifindex_a();
        let cap = net
            .in_ns(&net.a, move || Capture::open(ifindex))
            .join()
            .expect("capture");
        let (a, b) = net.addrs(false);
        let kept = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (k, s) = (kept.clone(), stop.clone());
        let thread = std::thread::spawn(move || loop {
            let done = s.load(Ordering::Relaxed);
            let ours = cap
                .drain()
                .into_iter()
                .filter(|p| [p.src, p.dst] == [a, b] || [p.src, p.dst] == [b, a]);
            k.lock().expect("tap").extend(ours);
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        });
        Tap {
            kept,
            stop,
            thread: Some(thread),
        }
    }

    fn packets(mut self) -> Vec<Packet> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("tap thread");
        }
        std::mem::take(&mut *self.kept.lock().expect("tap"))
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// (packets, bytes) per side summed over `recs`.
fn totals(recs: &[&Value]) -> ((u64, u64), (u64, u64)) {
    let side = |s: &str| {
        recs.iter().fold((0, 0), |(p, b), r| {
            (p + u(&r[s]["packets"]), b + u(&r[s]["bytes"]))
        })
    };
    (side("client"), side("server"))
}

#[test]
fn flows_started_during_a_flood_get_exact_records() {
    ensure_hping3();
    let net = NetPair::new();
    let (a, b) = net.addrs(false);
    let mut agent = start(
        &net.a,
        &[
            "--interface",
            &net.if_a,
            "--max-flows",
            "4096",
            "--idle-timeout-tcp",
            "8s",
            "--idle-timeout-udp",
            "8s",
            "--idle-timeout-icmp",
            "8s",
            "--tcp-close-grace",
            "300ms",
        ],
    );
    agent.wait_log("attached to", Duration::from_secs(10));
    let tap = Tap::start(&net);

    // ~1000 new flows per second per kind: 4096 entries fill in about a second and a
    // half, long before an idle timeout frees one.
    let started = Instant::now();
    let mut flood = Flood::start(&net.a, &net.if_a, b, 1000);
    agent.wait_log("flow map pressure (", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));

    // Mid-flood: a ping and a TCP transfer.
    net.ping_from_a(b, 5);
    let (port, client_port) = common::traffic::tcp_transfer(&net, false, 200_000, 3_000);

    std::thread::sleep(FLOOD.saturating_sub(started.elapsed()));
    flood.stop();
    let flood_secs = started.elapsed().as_secs_f64();

    // The episode ends once eviction and idle timeouts have drained the map; only a
    // summary logged after the flood counts.
    let during: Vec<String> = agent
        .err_seen
        .drain(..)
        .chain(agent.stderr.try_iter())
        .collect();
    let starts = during
        .iter()
        .filter(|l| l.contains("flow map pressure ("))
        .count();
    assert!(
        !during.iter().any(|l| l.contains("pressure over after")),
        "one episode for the whole flood: {during:#?}"
    );
    agent.wait_log("flow map pressure over after", Duration::from_secs(20));
    assert_eq!(starts, 1, "{during:#?}");
    let summary = agent
        .err_seen
        .iter()
        .find(|l| l.contains("flow map pressure over after"))
        .cloned()
        .expect("summary");
    assert!(summary.contains("flows evicted"), "{summary}");
    // Eviction kept room for every new flow: the datapath dropped none.
    assert!(
        summary.contains(" 0 packets of new flows dropped"),
        "{summary}"
    );

    // Records: every stdout line until both legit flows are in, then a little more.
    let a_s = a.to_string();
    let b_s = b.to_string();
    let mut recs: Vec<Value> = Vec::new();
    let is_ping = |r: &Value| r["protocol"] == 1 && r["client_addr"] == a_s.as_str();
    let is_conn = |r: &Value| {
        r["protocol"] == 6 && r["server_port"] == port && r["client_port"] == client_port
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut got_ping, mut got_conn) = (false, false);
    while !(got_ping && got_conn) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let ours: Vec<&Value> = recs
                .iter()
                .filter(|r| r["client_addr"] == a_s.as_str() || r["server_addr"] == a_s.as_str())
                .collect();
            let metrics = common::netns::sh_out(&[
                "ip",
                "netns",
                "exec",
                &net.a,
                "curl",
                "-s",
                "127.0.0.1:9464/metrics",
            ]);
            let metrics: Vec<&str> = metrics.lines().filter(|l| !l.starts_with('#')).collect();
            panic!(
                "no record of the ping or the connection ({} records); ours: {ours:#?}; log: {:#?}; metrics {metrics:#?}",
                recs.len(),
                agent.err_seen
            );
        }
        if let Ok(l) = agent.stdout.recv_timeout(left) {
            let r: Value = serde_json::from_str(&l).expect("a JSON record");
            got_ping |= is_ping(&r);
            got_conn |= is_conn(&r);
            recs.push(r);
        }
    }
    let pkts = tap.packets();

    let ping: Vec<&Value> = recs.iter().filter(|r| is_ping(r)).collect();
    assert!(
        ping.iter().all(|r| r["end_reason"] != "evicted"),
        "{ping:#?}"
    );
    let icmp = |p: &Packet| p.proto == 1;
    assert_eq!(
        totals(&ping),
        (sent_by(&pkts, a, icmp), sent_by(&pkts, b, icmp)),
        "ping vs capture: {ping:#?}"
    );
    assert_eq!(totals(&ping).0 .0, 5, "five requests");
    assert_eq!(ping[0]["server_addr"], b_s.as_str());

    let conn: Vec<&Value> = recs.iter().filter(|r| is_conn(r)).collect();
    assert_eq!(conn.len(), 1, "{conn:#?}");
    assert_eq!(conn[0]["end_reason"], "tcp_fin");
    let tcp = |p: &Packet| {
        p.proto == 6
            && [p.sport, p.dport].contains(&port)
            && [p.sport, p.dport].contains(&client_port)
    };
    assert_eq!(
        totals(&conn),
        (sent_by(&pkts, a, tcp), sent_by(&pkts, b, tcp)),
        "TCP transfer vs capture: {conn:#?}"
    );

    let evicted = recs.iter().filter(|r| r["end_reason"] == "evicted").count();
    assert!(evicted > 0, "flood flows are evicted");

    // Drained: after the idle timeout nothing of the flood is left to flush.
    std::thread::sleep(Duration::from_secs(9));
    let log = agent.stderr.clone();
    let (status, _) = agent.stop();
    assert!(status.success(), "the agent stays up through the flood");
    let flushed = log
        .try_iter()
        .find_map(|l| {
            let n = l.split("shutdown: flushed ").nth(1)?;
            n.split_whitespace().next()?.parse::<u64>().ok()
        })
        .expect("the shutdown line");
    assert!(flushed < 10, "{flushed} flows left after the flood");
    eprintln!("flood ran {flood_secs:.1} s; {evicted} evicted records; {summary}");
}
