//! The collector on real traffic between two test namespaces: exact counts, lifecycle, no leaks.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::agent::{fast_config, Agent};
use common::capture::{sent_by, Capture};
use common::netns::NetPair;
use flowlens::kernel::datapath::Capacities;
use flowlens::record::flow::{EndReason, FlowRecord, TcpState};

const WAIT: Duration = Duration::from_secs(20);

fn find(recs: &[FlowRecord], pred: impl Fn(&FlowRecord) -> bool) -> Vec<&FlowRecord> {
    recs.iter().filter(|r| pred(r)).collect()
}

fn check_ping(v6: bool) {
    let net = NetPair::new();
    let mut agent = Agent::start(&net, fast_config(), Capacities::default());
    let (a, b) = net.addrs(v6);
    let n = 5;
    net.ping_from_a(b, n);
    let proto = if v6 { 58 } else { 1 };
    let recs = agent.wait_for("the echo flow", WAIT, |r| {
        r.iter().any(|f| {
            f.protocol == proto && f.client_addr == a && f.icmp.is_some_and(|i| i.echo_id.is_some())
        })
    });
    let echo = find(recs, |f| {
        f.protocol == proto && f.client_addr == a && f.icmp.is_some_and(|i| i.echo_id.is_some())
    });
    assert_eq!(echo.len(), 1, "one flow for the whole ping run: {echo:#?}");
    let f = echo[0];
    // 56 data bytes + 8 ICMP + 20 (IPv4) or 40 (IPv6)
    let size = if v6 { 104 } else { 84 };
    assert_eq!(f.server_addr, b);
    assert_eq!(
        (f.client.packets, f.client.bytes),
        (u64::from(n), u64::from(n) * size)
    );
    assert_eq!(
        (f.server.packets, f.server.bytes),
        (u64::from(n), u64::from(n) * size)
    );
    let icmp = f.icmp.expect("icmp info");
    let (req, rep) = if v6 { (128, 129) } else { (8, 0) };
    assert_eq!((icmp.client_type, icmp.server_type), (Some(req), Some(rep)));
    let rtt = icmp.echo_rtt.expect("echo RTT");
    assert_eq!(rtt.count, n, "one RTT sample per answered request: {f:#?}");
    assert!(rtt.min_ns > 0 && rtt.max_ns < 1_000_000_000, "{rtt:?}");
    assert_eq!(f.end_reason, EndReason::IdleTimeout);
    assert_eq!(f.interface, net.if_a);
    assert!(f.last_seen >= f.first_seen);
    let age = std::time::SystemTime::now()
        .duration_since(f.first_seen)
        .expect("first_seen in the past");
    assert!(
        age < Duration::from_secs(60),
        "wall clock conversion: first_seen {age:?} ago"
    );
}

#[test]
fn ping_v4_is_one_flow_with_exact_counts() {
    check_ping(false);
}

#[test]
fn ping_v6_is_one_flow_with_exact_counts() {
    check_ping(true);
}

/// A TCP transfer of known size; counts cross-checked against a capture on the same interface.
fn check_tcp(v6: bool) {
    let net = NetPair::new();
    let mut agent = Agent::start(&net, fast_config(), Capacities::default());
    let (a, b) = net.addrs(v6);
    let ifindex = net.ifindex_a();
    let cap = net
        .in_ns(&net.a, move || Capture::open(ifindex))
        .join()
        .expect("capture");

    const UP: usize = 300_000;
    const DOWN: usize = 5_000;
    let (port, client_port) = common::traffic::tcp_transfer(&net, v6, UP, DOWN);

    let is_conn = move |f: &FlowRecord| {
        f.protocol == 6 && f.server_port == port && f.client_port == client_port
    };
    let recs = agent.wait_for("the TCP flow", WAIT, |r| r.iter().any(is_conn));
    let conn = find(recs, is_conn);
    assert_eq!(conn.len(), 1, "{conn:#?}");
    let f = conn[0];
    assert_eq!(
        (f.client_addr, f.server_addr),
        (a, b),
        "the connecting side is the client"
    );
    assert_eq!(f.end_reason, EndReason::TcpFin);

    let pkts = cap.drain();
    let keep = |p: &common::capture::Packet| {
        p.proto == 6
            && (p.sport == port || p.dport == port)
            && (p.sport == client_port || p.dport == client_port)
    };
    let (cp, cb) = sent_by(&pkts, a, keep);
    let (sp, sb) = sent_by(&pkts, b, keep);
    assert_eq!(
        (f.client.packets, f.client.bytes),
        (cp, cb),
        "client side vs capture"
    );
    assert_eq!(
        (f.server.packets, f.server.bytes),
        (sp, sb),
        "server side vs capture"
    );
    assert!(f.client.bytes > UP as u64 && f.server.bytes > DOWN as u64);

    let t = f.tcp.expect("tcp info");
    assert_eq!(t.state, TcpState::Closed);
    let (hc, hs) = (
        t.handshake_client_ns.expect("client handshake"),
        t.handshake_server_ns.expect("server handshake"),
    );
    assert!(hc > 0 && hc < 1_000_000_000, "SYN -> SYN-ACK {hc} ns");
    assert!(hs > 0 && hs < 1_000_000_000, "SYN-ACK -> ACK {hs} ns");
    assert!(!t.late_start);
    assert!(
        t.client_flags & 0x02 != 0 && t.server_flags & 0x12 == 0x12,
        "SYN / SYN-ACK seen"
    );
}

#[test]
fn tcp_v4_transfer_counts_match_a_capture() {
    check_tcp(false);
}

#[test]
fn tcp_v6_transfer_counts_match_a_capture() {
    check_tcp(true);
}

fn check_udp(v6: bool) {
    let net = NetPair::new();
    let mut agent = Agent::start(&net, fast_config(), Capacities::default());
    let (a, b) = net.addrs(v6);
    let server = net
        .in_ns(&net.b, move || {
            UdpSocket::bind(SocketAddr::new(b, 0)).expect("bind")
        })
        .join()
        .expect("server");
    let sport = server.local_addr().expect("addr").port();
    let (sent, answered, size) = (40u64, 15u64, 300usize);
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for i in 0..sent {
            let (n, from) = server.recv_from(&mut buf).expect("recv");
            if i < answered {
                server.send_to(&buf[..n], from).expect("answer");
            }
        }
    });
    let cport = net
        .in_ns(&net.a, move || {
            let s = UdpSocket::bind(SocketAddr::new(a, 0)).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = [0u8; 2048];
            for i in 0..sent {
                s.send_to(&vec![9u8; size], SocketAddr::new(b, sport))
                    .expect("send");
                if i < answered {
                    s.recv_from(&mut buf).expect("answer");
                }
            }
            s.local_addr().expect("local").port()
        })
        .join()
        .expect("client");
    echo.join().expect("echo");
    let is_flow =
        move |f: &FlowRecord| f.protocol == 17 && f.server_port == sport && f.client_port == cport;
    let recs = agent.wait_for("the UDP flow", WAIT, |r| r.iter().any(is_flow));
    let f = find(recs, is_flow);
    assert_eq!(f.len(), 1);
    let hdr = if v6 { 48 } else { 28 };
    let one = (size + hdr) as u64;
    assert_eq!((f[0].client.packets, f[0].client.bytes), (sent, sent * one));
    assert_eq!(
        (f[0].server.packets, f[0].server.bytes),
        (answered, answered * one)
    );
    assert_eq!(f[0].client_addr, a);
    assert_eq!(f[0].client.ttl, 64);
    assert!(f[0].tcp.is_none() && f[0].icmp.is_none());
}

#[test]
fn udp_v4_datagrams_counted_exactly() {
    check_udp(false);
}

#[test]
fn udp_v6_datagrams_counted_exactly() {
    check_udp(true);
}

#[test]
fn churn_of_short_flows_leaves_every_map_empty() {
    let net = NetPair::new();
    let mut agent = Agent::start(&net, fast_config(), Capacities::default());
    let b = net.v4_b;
    let a = net.v4_a;
    let listener = net.listen_b(false, 0);
    let port = listener.local_addr().expect("addr").port();
    const TCP: usize = 200;
    const UDP: usize = 2000;
    let acceptor = std::thread::spawn(move || {
        for _ in 0..TCP {
            let (mut s, _) = listener.accept().expect("accept");
            let mut v = Vec::new();
            let _ = s.read_to_end(&mut v);
        }
    });
    net.in_ns(&net.a, move || {
        for _ in 0..TCP {
            let mut c = TcpStream::connect(SocketAddr::new(b, port)).expect("connect");
            c.write_all(b"hello").expect("write");
        }
        // Fixed, distinct source ports: an ephemeral port could be reused
        // and merge two of the flows into one.
        for i in 0..UDP {
            let s = UdpSocket::bind(SocketAddr::new(a, 20_000 + i as u16)).expect("bind");
            s.send_to(&[i as u8; 16], SocketAddr::new(b, 9))
                .expect("send");
        }
    })
    .join()
    .expect("traffic");
    acceptor.join().expect("acceptor");
    // Every flow ends (FIN/RST or idle) and its key leaves all three maps.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = agent.map_entries();
        if left == [0, 0, 0] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "maps not empty after churn: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
        agent.wait_for("records", Duration::from_secs(1), |_| true);
    }
    let recs = agent.stop();
    let tcp = recs
        .iter()
        .filter(|f| f.protocol == 6 && f.server_port == port)
        .count();
    let udp = recs
        .iter()
        .filter(|f| f.protocol == 17 && f.server_port == 9)
        .count();
    assert_eq!(tcp, TCP, "one record per TCP connection");
    assert_eq!(udp, UDP, "one record per UDP flow");
}

#[test]
fn long_flow_reports_active_deltas_that_add_up() {
    let net = NetPair::new();
    let mut cfg = fast_config();
    cfg.active_timeout = Duration::from_millis(800);
    let mut agent = Agent::start(&net, cfg, Capacities::default());
    let (a, b) = (net.v4_a, net.v4_b);
    const N: u64 = 30;
    let cport = net
        .in_ns(&net.a, move || {
            let s = UdpSocket::bind(SocketAddr::new(a, 0)).expect("bind");
            for _ in 0..N {
                s.send_to(&[0u8; 100], SocketAddr::new(b, 9)).expect("send");
                std::thread::sleep(Duration::from_millis(100));
            }
            s.local_addr().expect("local").port()
        })
        .join()
        .expect("traffic");
    let is_flow = move |f: &FlowRecord| f.protocol == 17 && f.client_port == cport;
    let recs = agent.wait_for("the final record", WAIT, |r| {
        r.iter()
            .any(|f| is_flow(f) && f.end_reason == EndReason::IdleTimeout)
    });
    let parts = find(recs, is_flow);
    let active = parts
        .iter()
        .filter(|f| f.end_reason == EndReason::ActiveTimeout)
        .count();
    assert!(
        active >= 2,
        "a 3 s flow crosses an 0.8 s active timeout at least twice: {parts:#?}"
    );
    let packets: u64 = parts.iter().map(|f| f.client.packets).sum();
    let bytes: u64 = parts.iter().map(|f| f.client.bytes).sum();
    assert_eq!(packets, N, "deltas add up to the total");
    assert_eq!(bytes, N * 128);
    assert!(
        parts
            .iter()
            .filter(|f| f.end_reason == EndReason::ActiveTimeout)
            .all(|f| f.client.packets > 0),
        "an active record always carries news"
    );
}

/// Issue 23's scenario: 10 TCP connections and 10 UDP flows of 4.6 s each, with a 5 s
/// active timeout (1 s polls, the default 2 s close grace, 1 s UDP idle timeout): the tick
/// finds them closed or gone quiet. Every flow ends exactly once, with its true reason
/// (tcp_fin, idle_timeout), and its records add up to the capture's counts, each way.
#[test]
fn flows_ending_just_before_their_active_tick_end_once_with_their_true_reason() {
    use std::collections::HashMap;
    let net = NetPair::new();
    let cfg = flowlens::poller::PollerConfig {
        poll_interval: Duration::from_secs(1),
        active_timeout: Duration::from_secs(5),
        tcp_close_grace: Duration::from_secs(2),
        idle_udp: Duration::from_secs(1),
        idle_tcp: Duration::from_secs(30),
        ..fast_config()
    };
    let mut agent = Agent::start(&net, cfg, Capacities::default());
    let (a, b) = (net.v4_a, net.v4_b);
    let ifindex = net.ifindex_a();
    let cap = net
        .in_ns(&net.a, move || Capture::open(ifindex))
        .join()
        .expect("capture");
    const N: usize = 10;
    const LIFE: Duration = Duration::from_millis(4600);
    const STEP: Duration = Duration::from_millis(200);
    let listener = net.listen_b(false, 0);
    let tport = listener.local_addr().expect("addr").port();
    let acceptor = std::thread::spawn(move || {
        let conns: Vec<_> = (0..N)
            .map(|_| {
                let (mut s, _) = listener.accept().expect("accept");
                std::thread::spawn(move || {
                    // Echo until the client closes, then close too.
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => s.write_all(&buf[..n]).expect("echo"),
                        }
                    }
                })
            })
            .collect();
        conns.into_iter().for_each(|c| c.join().expect("conn"));
    });
    let udp_server = net
        .in_ns(&net.b, move || {
            UdpSocket::bind(SocketAddr::new(b, 0)).expect("bind")
        })
        .join()
        .expect("server");
    let uport = udp_server.local_addr().expect("addr").port();
    udp_server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let udp_echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp_server.recv_from(&mut buf) {
            udp_server.send_to(&buf[..n], from).expect("answer");
        }
    });
    let flows: Vec<_> = (0..N)
        .flat_map(|_| {
            let tcp = net.in_ns(&net.a, move || {
                let mut c = TcpStream::connect(SocketAddr::new(b, tport)).expect("connect");
                let t0 = std::time::Instant::now();
                let mut buf = [0u8; 100];
                while t0.elapsed() + STEP < LIFE {
                    c.write_all(&[1u8; 100]).expect("send");
                    c.read_exact(&mut buf).expect("echo");
                    std::thread::sleep(STEP);
                }
                std::thread::sleep(LIFE.saturating_sub(t0.elapsed()));
                let port = c.local_addr().expect("local").port();
                c.shutdown(std::net::Shutdown::Write).expect("shutdown");
                let _ = c.read_to_end(&mut Vec::new());
                (6u8, port)
            });
            let udp = net.in_ns(&net.a, move || {
                let s = UdpSocket::bind(SocketAddr::new(a, 0)).expect("bind");
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                let t0 = std::time::Instant::now();
                let mut buf = [0u8; 100];
                while t0.elapsed() < LIFE {
                    s.send_to(&[2u8; 100], SocketAddr::new(b, uport))
                        .expect("send");
                    s.recv_from(&mut buf).expect("answer");
                    std::thread::sleep(STEP.min(LIFE.saturating_sub(t0.elapsed())));
                }
                (17u8, s.local_addr().expect("local").port())
            });
            [tcp, udp]
        })
        .collect();
    let flows: Vec<(u8, u16)> = flows.into_iter().map(|t| t.join().expect("flow")).collect();
    acceptor.join().expect("acceptor");
    udp_echo.join().expect("udp echo");
    let ours = move |r: &FlowRecord| flows.contains(&(r.protocol, r.client_port));
    let recs = agent.wait_for("20 final records", WAIT, |r| {
        r.iter()
            .filter(|f| ours(f) && f.end_reason != EndReason::ActiveTimeout)
            .count()
            >= 2 * N
    });
    let mut by_flow: HashMap<u64, Vec<&FlowRecord>> = HashMap::new();
    for r in recs.iter().filter(|r| ours(r)) {
        by_flow.entry(r.flow_id).or_default().push(r);
    }
    assert_eq!(by_flow.len(), 2 * N, "one flow id per flow: {by_flow:#?}");
    let pkts = cap.drain();
    for parts in by_flow.values() {
        let last: Vec<_> = parts
            .iter()
            .filter(|r| r.end_reason != EndReason::ActiveTimeout)
            .collect();
        assert_eq!(last.len(), 1, "one final record: {parts:#?}");
        let want = if last[0].protocol == 6 {
            EndReason::TcpFin
        } else {
            EndReason::IdleTimeout
        };
        assert_eq!(last[0].end_reason, want, "{parts:#?}");
        let (proto, cport) = (last[0].protocol, last[0].client_port);
        let keep = |p: &common::capture::Packet| {
            p.proto == proto && (p.sport == cport || p.dport == cport)
        };
        let sum = |f: fn(&FlowRecord) -> (u64, u64)| {
            parts.iter().fold((0, 0), |(n, b), r| {
                let (dn, db) = f(r);
                (n + dn, b + db)
            })
        };
        assert_eq!(
            sum(|r| (r.client.packets, r.client.bytes)),
            sent_by(&pkts, a, keep),
            "client side of {parts:#?}"
        );
        assert_eq!(
            sum(|r| (r.server.packets, r.server.bytes)),
            sent_by(&pkts, b, keep),
            "server side of {parts:#?}"
        );
    }
}
