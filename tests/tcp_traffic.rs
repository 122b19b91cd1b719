//! TCP metrics on real connections between two test namespaces: handshake, latency samples, late start.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::agent::{fast_config, Agent};
use common::netns::NetPair;
use flowlens::kernel::datapath::Capacities;
use flowlens::record::flow::{FlowRecord, TcpInfo};

const WAIT: Duration = Duration::from_secs(20);
/// Below the ephemeral range, as real services are: a connection seen
/// mid-stream is told apart by its ports alone.
const SERVER_PORT: u16 = 8080;

/// A connected pair: the client stream lives in namespace a, the server's in b.
fn connect(net: &NetPair) -> (TcpStream, TcpStream) {
    let b = net.v4_b;
    let listener = net.listen_b(false, SERVER_PORT);
    let port = listener.local_addr().expect("addr").port();
    let client = net
        .in_ns(&net.a, move || {
            TcpStream::connect(SocketAddr::new(b, port)).expect("connect")
        })
        .join()
        .expect("client");
    let (server, _) = listener.accept().expect("accept");
    for s in [&client, &server] {
        s.set_nodelay(true).expect("nodelay");
    }
    (client, server)
}

fn send(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8]) {
    from.write_all(msg).expect("write");
    let mut buf = vec![0u8; msg.len()];
    to.read_exact(&mut buf).expect("read");
    // the peer's answer comes after a pause, as a served request would
    std::thread::sleep(Duration::from_millis(2));
}

fn tcp_record(agent: &mut Agent, cport: u16) -> (FlowRecord, TcpInfo) {
    let is_conn = move |f: &FlowRecord| f.protocol == 6 && f.client_port == cport;
    let recs = agent.wait_for("the TCP flow", WAIT, |r| r.iter().any(is_conn));
    let f = recs.iter().find(|f| is_conn(f)).expect("record").clone();
    let t = f.tcp.expect("tcp info");
    (f, t)
}

fn close(c: TcpStream, s: TcpStream) -> u16 {
    let port = c.local_addr().expect("local").port();
    drop(c);
    drop(s);
    port
}

#[test]
fn request_response_gives_k_server_samples_and_handshake_times() {
    let net = NetPair::new();
    let mut agent = Agent::start(&net, fast_config(), Capacities::default());
    let (mut c, mut s) = connect(&net);
    let k = 5;
    for _ in 0..k {
        send(&mut c, &mut s, b"GET /\r\n");
        send(&mut s, &mut c, b"200 OK\r\n");
    }
    let (f, t) = tcp_record(&mut agent, close(c, s));
    assert_eq!(f.client_addr, net.v4_a);
    let srv = t.server_latency.expect("server latency");
    assert_eq!(srv.count, k, "one sample per answered request");
    let cli = t.client_latency.expect("client latency");
    assert_eq!(
        cli.count,
        k - 1,
        "the client answered every response but the last"
    );
    assert!(
        srv.min_ns > 0 && srv.max_ns >= srv.min_ns && srv.max_ns < 1_000_000_000,
        "{srv:?}"
    );
    assert!(srv.jitter_ns.is_some());
    let (hc, hs) = (
        t.handshake_client_ns.expect("client handshake"),
        t.handshake_server_ns.expect("server handshake"),
    );
    assert!(hc > 0 && hc < 1_000_000_000 && hs > 0 && hs < 1_000_000_000);
    assert!(!t.late_start);
}

#[test]
fn server_first_protocol_samples_both_sides() {
    let net = NetPair::new();
    let mut agent = Agent::start(&net, fast_config(), Capacities::default());
    let (mut c, mut s) = connect(&net);
    send(&mut s, &mut c, b"220 smtp ready\r\n");
    send(&mut c, &mut s, b"HELO a\r\n");
    send(&mut s, &mut c, b"250 hello\r\n");
    let (_, t) = tcp_record(&mut agent, close(c, s));
    assert_eq!(
        t.client_latency.expect("client answered the banner").count,
        1
    );
    assert_eq!(t.server_latency.expect("server answered HELO").count, 1);
}

#[test]
fn connection_opened_before_start_has_no_handshake_but_has_latency() {
    let net = NetPair::new();
    let (mut c, mut s) = connect(&net);
    send(&mut c, &mut s, b"before");
    send(&mut s, &mut c, b"before-reply");
    let mut agent = Agent::start(&net, fast_config(), Capacities::default());
    let k = 3;
    for _ in 0..k {
        send(&mut c, &mut s, b"req");
        send(&mut s, &mut c, b"resp");
    }
    let (f, t) = tcp_record(&mut agent, close(c, s));
    assert!(t.late_start);
    assert_eq!(
        (t.handshake_client_ns, t.handshake_server_ns),
        (None, None),
        "absent, not zero"
    );
    assert_eq!(f.client_addr, net.v4_a, "ephemeral port side is the client");
    // The first payload seen is a request; samples start at the first change of direction.
    assert_eq!(t.server_latency.expect("server latency").count, k);
    assert_eq!(t.client_latency.expect("client latency").count, k - 1);
}
